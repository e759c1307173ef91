//! The cost of bad records, printed as a comparison (batch processing time, one run side by side).
//!
//! ```sh
//! cargo bench --bench dead_letters
//! ```
//!
//! 1. **Fallible parse**: `try_map` over N event lines of which 1 % are malformed (dead-lettered)
//!    against `map` over the same lines with the bad ones filtered out first — what routing an
//!    `Err` to the dead-letter sink costs over not having bad records at all.
//! 2. **Panic isolation**: one block of N records, three of which make the pipeline panic, with
//!    `FailurePolicy::DeadLetter`: the task fails its attempts, then the block's records run one
//!    by one. *Live*: the block is in memory. *Recovered*: every copy of it is deleted while the
//!    batch runs, so each read replays it from the log (as after a crash). The block is read once
//!    for the isolation, so both grow linearly with N: the time per record stays flat from 1,000
//!    to 10,000 records, and recovered costs a few replays more than live, not N.
//!
//! Under `cargo test` (debug) it runs with small sizes as a smoke test.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::time::Duration;

use bytes::Bytes;
use sluice::engine::{BatchInfo, BoxError, DStream, FailurePolicy, StopMode, StreamingContext};
use sluice::receiver::ReceiverConfig;
use sluice::receiver::local_log::LocalLog;

const STREAM: &str = "events";

fn lines(n: usize, bad_every: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            if bad_every > 0 && i % bad_every == bad_every - 1 {
                format!("user-{},click", i % 97)
            } else {
                format!("user-{},click,{}", i % 97, i % 10)
            }
        })
        .collect()
}

#[allow(clippy::needless_pass_by_value)] // `try_map` hands each line over by value
fn parse(line: Bytes) -> Result<(String, u64), BoxError> {
    let text = std::str::from_utf8(&line)?;
    let mut fields = text.split(',');
    let (Some(user), Some(_kind), Some(amount), None) = (fields.next(), fields.next(), fields.next(), fields.next())
    else {
        return Err("expected <user>,<kind>,<amount>".into());
    };
    Ok((user.to_owned(), amount.parse()?))
}

/// Runs `pipeline` over `lines` (one shard, one block, one batch) and returns the summed
/// processing time of the batches that had records, and the dead letters.
fn run(lines: &[String], lose_blocks: bool, pipeline: impl FnOnce(&DStream<Bytes>)) -> (Duration, u64) {
    let dir = tempfile::tempdir().unwrap();
    let log = LocalLog::open(dir.path().join("log")).unwrap();
    let mut producer = log.create_stream(STREAM, 1).unwrap().producer().unwrap();
    for (i, line) in lines.iter().enumerate() {
        producer
            .put(&i.to_string(), Bytes::copy_from_slice(line.as_bytes()))
            .unwrap();
    }
    producer.flush().unwrap();
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_millis(300))
        .data_dir(dir.path().join("data"))
        .failure_policy(FailurePolicy::DeadLetter)
        .dead_letter(dir.path().join("dead").display().to_string())
        .build()
        .unwrap();
    let config = ReceiverConfig {
        block_interval_ms: 250,
        ..ReceiverConfig::default()
    };
    let input = ctx.local_log_stream(&dir.path().join("log"), STREAM, config).unwrap();
    pipeline(&input);
    let micros = Arc::new(AtomicU64::new(0));
    let sum = micros.clone();
    ctx.add_batch_listener(move |info: &BatchInfo| {
        if info.num_records > 0 {
            sum.fetch_add(info.processing_micros, SeqCst);
        }
    });
    ctx.start().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let deleter = lose_blocks.then(|| {
        let store = ctx.block_store().unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                store.remove_older_than(i64::MAX).unwrap();
                std::thread::sleep(Duration::from_millis(1));
            }
        })
    });
    assert!(ctx.await_drained(Duration::from_secs(600)).unwrap(), "not drained");
    stop.store(true, SeqCst);
    if let Some(deleter) = deleter {
        deleter.join().unwrap();
    }
    ctx.stop(StopMode::Graceful).unwrap();
    let m = ctx.metrics();
    assert_eq!(m.records_processed, lines.len() as u64);
    assert!(!lose_blocks || m.blocks_replayed > 0, "no block was lost");
    (Duration::from_micros(micros.load(SeqCst)), m.dead_letters)
}

fn sum_amounts(pairs: &DStream<(String, u64)>) {
    pairs
        .reduce_by_key(|a, b| a + b)
        .foreach_batch(|_t, _all| Ok(()))
        .unwrap();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn fallible_parse(n: usize) {
    let with_bad = lines(n, 100);
    let good: Vec<String> = with_bad
        .iter()
        .filter(|l| parse(Bytes::from((*l).clone())).is_ok())
        .cloned()
        .collect();
    let (plain, _) = run(&good, false, |input| {
        sum_amounts(&input.map(|line| parse(line).expect("only good lines")));
    });
    let (fallible, dead) = run(&with_bad, false, |input| sum_amounts(&input.try_map(parse)));
    assert_eq!(dead as usize, n - good.len());
    println!(
        "fallible parse, {n} lines: map over the good lines {:>8.1} ms | try_map with {dead} dead letters {:>8.1} ms | ratio {:.2}",
        ms(plain),
        ms(fallible),
        fallible.as_secs_f64() / plain.as_secs_f64()
    );
}

fn isolation(n: usize) -> (f64, f64) {
    let mut input = lines(n, 0);
    for i in [n / 10, n / 2, n - 1] {
        input[i] = format!("POISON,click,{i}");
    }
    let pipeline = |input: &DStream<Bytes>| {
        sum_amounts(&input.map(|line: Bytes| {
            assert!(!line.starts_with(b"POISON"), "a bug");
            parse(line).expect("good line")
        }));
    };
    let (live, dead_live) = run(&input, false, pipeline);
    let (recovered, dead_recovered) = run(&input, true, pipeline);
    assert_eq!((dead_live, dead_recovered), (3, 3));
    let per_record = |d: Duration| d.as_secs_f64() * 1e6 / n as f64;
    println!(
        "panic isolation, one block of {n:>6} records: live {:>8.1} ms ({:.2} µs/record) | recovered {:>8.1} ms ({:.2} µs/record) | recovered/live {:.2}",
        ms(live),
        per_record(live),
        ms(recovered),
        per_record(recovered),
        recovered.as_secs_f64() / live.as_secs_f64()
    );
    (per_record(live), per_record(recovered))
}

fn main() {
    // Isolation makes the bench's own closures panic on purpose: keep stderr readable.
    std::panic::set_hook(Box::new(|_| {}));
    let sizes: &[usize] = if cfg!(debug_assertions) {
        &[200, 2_000]
    } else {
        &[1_000, 10_000]
    };
    fallible_parse(sizes[1] * 10);
    let (small_live, small_recovered) = isolation(sizes[0]);
    let (large_live, large_recovered) = isolation(sizes[1]);
    println!(
        "time per isolated record, {} → {} records: live ×{:.2}, recovered ×{:.2} (linear: about ×1; quadratic: ×{})",
        sizes[0],
        sizes[1],
        large_live / small_live,
        large_recovered / small_recovered,
        sizes[1] / sizes[0]
    );
}
