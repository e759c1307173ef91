//! Bad records as values and the dead-letter path: fallible operators (`try_map`, …) route `Err`
//! to the dead-letter sink once per record per batch however many stages read it, `cache()`
//! evaluates a shared chain once, panics are isolated reading each block once, `Stop` names the
//! record, and a graceful stop honours its timeout while records are isolated.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use bytes::Bytes;
use sluice_engine::{BoxError, DStream, Error, FailurePolicy, StopMode, StreamingContext, Window};
use sluice_operators::{DeadLetterSink, bench_data};

mod support;

use support::{DRAIN_TIMEOUT, STREAM, fill_log, receiver_config, word_count};

const KINDS: [&str; 3] = ["click", "view", "buy"];

/// `n` event lines `<user>,<kind>,<amount>`; every 37th is malformed (five ways). Returns the
/// lines and the indices of the bad ones.
fn events(n: usize) -> (Vec<String>, Vec<usize>) {
    let mut bad = Vec::new();
    let lines = (0..n)
        .map(|i| {
            let user = format!("u{}", (i * 31) % 23);
            if i % 37 == 36 {
                bad.push(i);
                match (i / 37) % 5 {
                    0 => format!("{user},click"),
                    1 => format!("{user},hover,1"),
                    2 => format!("{user},buy,x{i}"),
                    3 => String::new(),
                    _ => format!("{user},view,-{i}"),
                }
            } else {
                format!("{user},{},{}", KINDS[i % 3], i % 7)
            }
        })
        .collect();
    (lines, bad)
}

#[derive(Debug, Clone)]
struct Event {
    user: String,
    kind: String,
    amount: u64,
}

#[allow(clippy::needless_pass_by_value)] // `try_map` hands each line over by value
fn parse(line: Bytes) -> Result<Event, BoxError> {
    let text = std::str::from_utf8(&line)?;
    let fields: Vec<&str> = text.split(',').collect();
    let [user, kind, amount] = fields[..] else {
        return Err(format!("expected 3 fields, found {}", fields.len()).into());
    };
    if !KINDS.contains(&kind) {
        return Err(format!("unknown kind {kind:?}").into());
    }
    Ok(Event {
        user: user.to_owned(),
        kind: kind.to_owned(),
        amount: amount.parse()?,
    })
}

/// Per-user amount sums of the good lines.
fn reference_per_user(lines: &[String], bad: &[usize]) -> HashMap<String, u64> {
    let mut sums = HashMap::new();
    for (i, line) in lines.iter().enumerate() {
        if !bad.contains(&i) {
            let e = parse(Bytes::copy_from_slice(line.as_bytes())).unwrap();
            *sums.entry(e.user).or_default() += e.amount;
        }
    }
    sums
}

/// A local log under `dir` holding `lines`, a context with `policy` and dead letters under `dir`,
/// and its input stream (blocks cut every `block_ms`).
fn dead_letter_pipeline(
    dir: &Path,
    lines: &[String],
    shards: u32,
    policy: FailurePolicy,
    block_ms: u64,
) -> (StreamingContext, DStream<Bytes>) {
    fill_log(&dir.join("log"), lines, shards);
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_millis(100))
        .data_dir(dir.join("data"))
        .executor_threads(3)
        .failure_policy(policy)
        .dead_letter(dead_letter_location(dir))
        .build()
        .unwrap();
    let input = ctx
        .local_log_stream(&dir.join("log"), STREAM, receiver_config(block_ms))
        .unwrap();
    (ctx, input)
}

fn dead_letter_location(dir: &Path) -> String {
    dir.join("dead").display().to_string()
}

/// One committed dead letter.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
struct Letter {
    shard: String,
    sequence: String,
    data: Vec<u8>,
    error: String,
    stage: String,
}

fn read_dead_letters(dir: &Path) -> Vec<Letter> {
    let mut letters = Vec::new();
    let committed = match DeadLetterSink::read_committed(&dead_letter_location(dir)) {
        Ok(committed) => committed,
        Err(_) if !dir.join("dead").exists() => return letters,
        Err(e) => panic!("{e}"),
    };
    for (_time, batch) in committed {
        let column = |name: &str| batch.column_by_name(name).unwrap().clone();
        let (shard, sequence, data, error, stage) = (
            column("shard_id"),
            column("sequence_number"),
            column("data"),
            column("error"),
            column("stage"),
        );
        for i in 0..batch.num_rows() {
            letters.push(Letter {
                shard: shard.as_string::<i32>().value(i).to_owned(),
                sequence: sequence.as_string::<i32>().value(i).to_owned(),
                data: data.as_binary::<i32>().value(i).to_vec(),
                error: error.as_string::<i32>().value(i).to_owned(),
                stage: stage.as_string::<i32>().value(i).to_owned(),
            });
        }
    }
    letters
}

/// Sums `(key, value)` pairs over every batch into `into`.
fn sum_into(stream: &DStream<(String, u64)>) -> Arc<Mutex<HashMap<String, u64>>> {
    let sums: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let keep = sums.clone();
    stream
        .foreach_batch(move |_t, pairs| {
            let mut sums = keep.lock().unwrap();
            for (k, v) in pairs {
                *sums.entry(k).or_default() += v;
            }
            Ok(())
        })
        .unwrap();
    sums
}

/// Parse with `try_map` (counting calls), optionally `cache()`, then four keyed stages.
fn four_stage_run(cached: bool) {
    let (lines, bad) = events(6_000);
    let dir = tempfile::tempdir().unwrap();
    let (ctx, input) = dead_letter_pipeline(dir.path(), &lines, 2, FailurePolicy::DeadLetter, 20);
    let calls = Arc::new(AtomicU64::new(0));
    let counter = calls.clone();
    let parsed = input.try_map(move |line| {
        counter.fetch_add(1, SeqCst);
        parse(line)
    });
    let parsed = if cached { parsed.cache() } else { parsed };
    let per_user = sum_into(&parsed.map(|e| (e.user.clone(), e.amount)).reduce_by_key(|a, b| a + b));
    let per_kind = sum_into(&parsed.map(|e| (e.kind.clone(), 1)).reduce_by_key(|a, b| a + b));
    parsed
        .map(|e| (e.kind.clone(), e.amount))
        .reduce_by_key_and_window(
            |a, b| a + b,
            Some(Arc::new(|a: u64, b: u64| a - b)),
            None,
            Window::new(3, 1).unwrap(),
        )
        .foreach_batch(|_t, _all| Ok(()))
        .unwrap();
    let totals: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let keep = totals.clone();
    parsed
        .map(|e| (e.user.clone(), e.amount))
        .update_state_by_key(|_k: &String, new: Vec<u64>, old: Option<u64>| {
            Some(old.unwrap_or(0) + new.iter().sum::<u64>())
        })
        .foreach_batch(move |_t, all| {
            *keep.lock().unwrap() = all.into_iter().collect();
            Ok(())
        })
        .unwrap();
    let per_batch = Arc::new(AtomicU64::new(0));
    let seen = per_batch.clone();
    ctx.add_batch_listener(move |info| {
        seen.fetch_add(info.dead_letters, SeqCst);
    });
    ctx.start().unwrap();
    assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap());
    ctx.stop(StopMode::Graceful).unwrap();

    let reference = reference_per_user(&lines, &bad);
    assert_eq!(*per_user.lock().unwrap(), reference, "per-user sums (cached: {cached})");
    assert_eq!(*totals.lock().unwrap(), reference, "per-user state (cached: {cached})");
    let good = (lines.len() - bad.len()) as u64;
    assert_eq!(per_kind.lock().unwrap().values().sum::<u64>(), good);

    let letters = read_dead_letters(dir.path());
    let mut got: Vec<Vec<u8>> = letters.iter().map(|l| l.data.clone()).collect();
    let mut expected: Vec<Vec<u8>> = bad.iter().map(|&i| lines[i].as_bytes().to_vec()).collect();
    got.sort();
    expected.sort();
    assert_eq!(got, expected, "exactly the bad lines, each once (cached: {cached})");
    let positions: std::collections::BTreeSet<_> = letters.iter().map(|l| (&l.shard, &l.sequence)).collect();
    assert_eq!(positions.len(), bad.len(), "one letter per bad record");
    assert!(letters.iter().all(|l| l.stage == "try_map#1" && !l.error.is_empty()));
    assert!(
        letters.iter().any(|l| l.error.contains("invalid digit")),
        "error text with its source"
    );
    let m = ctx.metrics();
    assert_eq!(m.dead_letters, bad.len() as u64, "the metric counts records");
    assert_eq!(
        m.dead_letters_by_stage,
        BTreeMap::from([("try_map#1".to_owned(), bad.len() as u64)])
    );
    assert_eq!(
        per_batch.load(SeqCst),
        bad.len() as u64,
        "BatchInfo::dead_letters summed"
    );
    assert_eq!(m.task_failures, 0, "an Err is a value, not a task failure");
    if cached {
        assert_eq!(calls.load(SeqCst), lines.len() as u64, "each line parsed exactly once");
    } else {
        assert!(
            calls.load(SeqCst) >= 4 * lines.len() as u64,
            "each keyed stage re-ran the parse"
        );
    }
}

#[test]
fn try_map_dead_letters_each_bad_line_once_across_four_keyed_stages() {
    four_stage_run(false);
}

#[test]
fn cache_parses_each_line_once_for_four_keyed_stages() {
    four_stage_run(true);
}

#[test]
fn fallible_operators_and_panics_above_a_cache_name_the_right_records() {
    let (mut lines, mut bad) = events(3_000);
    // Records that parse but make a later (buggy) operator panic.
    let poison = [100, 1_234, 2_900];
    for &i in &poison {
        lines[i] = "poison,click,1".into();
    }
    let dir = tempfile::tempdir().unwrap();
    let (ctx, input) = dead_letter_pipeline(dir.path(), &lines, 2, FailurePolicy::DeadLetter, 20);
    let cached = input.cache();
    let parsed = cached.try_map(parse).try_filter(|e| {
        if e.user == "u22" && e.amount == 6 {
            Err("u22 may not spend 6")
        } else {
            Ok(true)
        }
    });
    let per_user = sum_into(
        &parsed
            .map(|e| {
                assert!(e.user != "poison", "a bug in the pipeline");
                (e.user.clone(), e.amount)
            })
            .reduce_by_key(|a, b| a + b),
    );
    ctx.start().unwrap();
    assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap());
    ctx.stop(StopMode::Graceful).unwrap();

    let filtered: Vec<usize> = (0..lines.len())
        .filter(|i| !bad.contains(i) && lines[*i].starts_with("u22,") && lines[*i].ends_with(",6"))
        .collect();
    assert!(!filtered.is_empty());
    let mut expected: Vec<(String, Vec<u8>)> = Vec::new();
    expected.extend(
        bad.iter()
            .map(|&i| ("try_map#1".to_owned(), lines[i].clone().into_bytes())),
    );
    expected.extend(
        filtered
            .iter()
            .map(|&i| ("try_filter#2".to_owned(), lines[i].clone().into_bytes())),
    );
    expected.extend(
        poison
            .iter()
            .map(|&i| ("panic".to_owned(), lines[i].clone().into_bytes())),
    );
    expected.sort();
    let mut got: Vec<(String, Vec<u8>)> = read_dead_letters(dir.path())
        .into_iter()
        .map(|l| (l.stage, l.data))
        .collect();
    got.sort();
    assert_eq!(got, expected);
    bad.extend(filtered);
    bad.extend(poison);
    assert_eq!(*per_user.lock().unwrap(), reference_per_user(&lines, &bad));
}

#[test]
fn an_err_under_the_stop_policy_stops_the_stream_naming_the_record() {
    let (lines, _bad) = events(500);
    let dir = tempfile::tempdir().unwrap();
    let (ctx, input) = dead_letter_pipeline(dir.path(), &lines, 1, FailurePolicy::Stop, 200);
    let calls = Arc::new(AtomicU64::new(0));
    let counter = calls.clone();
    let _ = sum_into(
        &input
            .try_map(move |line| {
                counter.fetch_add(1, SeqCst);
                parse(line)
            })
            .map(|e| (e.user.clone(), e.amount))
            .reduce_by_key(|a, b| a + b),
    );
    ctx.start().unwrap();
    let err = ctx.await_termination().unwrap_err();
    let _ignored = ctx.stop(StopMode::Immediate);
    let text = err.to_string();
    assert!(matches!(err, Error::Stopped { .. }), "{text}");
    assert!(text.contains("try_map#1 rejected record"), "{text}");
    assert!(text.contains("of shard shardId-000000000000"), "{text}");
    assert!(
        ["expected 3 fields", "unknown kind", "invalid digit"]
            .iter()
            .any(|e| text.contains(e)),
        "the parse error: {text}"
    );
    assert_eq!(ctx.metrics().dead_letters, 0);
    assert!(read_dead_letters(dir.path()).is_empty());
    assert!(
        calls.load(SeqCst) <= lines.len() as u64,
        "a rejected record is not retried: {} calls",
        calls.load(SeqCst)
    );
}

#[test]
fn an_err_after_a_shuffle_stops_the_stream_even_with_dead_letters() {
    let (lines, _bad) = events(300);
    let dir = tempfile::tempdir().unwrap();
    let (ctx, input) = dead_letter_pipeline(dir.path(), &lines, 1, FailurePolicy::DeadLetter, 200);
    let per_user = input
        .try_map(parse)
        .map(|e| (e.user.clone(), e.amount))
        .reduce_by_key(|a, b| a + b);
    let _ = sum_into(&per_user.try_map(|(user, amount)| {
        if user == "u0" {
            Err(format!("{user} spent {amount}"))
        } else {
            Ok((user, amount))
        }
    }));
    ctx.start().unwrap();
    let err = ctx.await_termination().unwrap_err().to_string();
    let _ignored = ctx.stop(StopMode::Immediate);
    assert!(
        err.contains("try_map#2 rejected an element with no single input record"),
        "{err}"
    );
}

#[test]
fn panicking_records_of_lost_blocks_are_isolated_reading_each_block_once() {
    let mut lines = bench_data::zipf_lines(4_000, 200, 17);
    let poison = [10, 1_500, 3_999];
    for &i in &poison {
        lines[i] = format!("POISON {i}");
    }
    let dir = tempfile::tempdir().unwrap();
    let (ctx, input) = dead_letter_pipeline(dir.path(), &lines, 2, FailurePolicy::DeadLetter, 100);
    let totals = word_count(&input.map(|line: Bytes| {
        assert!(!line.starts_with(b"POISON"), "cannot handle {line:?}");
        line
    }));
    ctx.start().unwrap();
    // Keep deleting every copy of every stored block: each read is a replay from the log.
    let store = ctx.block_store().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let deleter = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                store.remove_older_than(i64::MAX).unwrap();
                std::thread::yield_now();
            }
        })
    };
    let drained = ctx.await_drained(DRAIN_TIMEOUT).unwrap();
    stop.store(true, SeqCst);
    deleter.join().unwrap();
    ctx.stop(StopMode::Graceful).unwrap();
    assert!(drained);
    let mut good = lines.clone();
    for &i in poison.iter().rev() {
        good.remove(i);
    }
    assert_eq!(*totals.lock().unwrap(), bench_data::reference_word_count(&good));
    let letters = read_dead_letters(dir.path());
    assert_eq!(letters.len(), poison.len());
    assert!(
        letters
            .iter()
            .all(|l| l.stage == "panic" && l.error.contains("cannot handle"))
    );
    let m = ctx.metrics();
    // A block is read at most once per task attempt (3) plus once for isolating its records;
    // re-reading it per record would replay it hundreds of times.
    assert!(m.blocks_replayed > 0, "no block was lost");
    assert!(
        m.blocks_replayed <= 4 * m.blocks_stored,
        "{} replays for {} blocks",
        m.blocks_replayed,
        m.blocks_stored
    );
}

#[test]
fn a_graceful_stop_honours_its_timeout_while_records_are_isolated() {
    let mut lines = bench_data::zipf_lines(4_000, 200, 19);
    lines[0] = "POISON first".into();
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 1);
    let build = |stop_timeout: Duration| {
        StreamingContext::builder()
            .batch_interval(Duration::from_secs(1))
            .data_dir(dir.path().join("data"))
            .failure_policy(FailurePolicy::DeadLetter)
            .dead_letter(dead_letter_location(dir.path()))
            .max_task_attempts(1)
            .graceful_stop_timeout(stop_timeout)
            .build()
            .unwrap()
    };
    let ctx = build(Duration::from_millis(300));
    let input = ctx
        .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(900))
        .unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let counter = calls.clone();
    // 5 ms a record: isolating a 4,000-record block takes 20 s.
    let _totals = word_count(&input.map(move |line: Bytes| {
        assert!(!line.starts_with(b"POISON"), "cannot handle {line:?}");
        counter.fetch_add(1, SeqCst);
        std::thread::sleep(Duration::from_millis(5));
        line
    }));
    ctx.start().unwrap();
    let waiting = Instant::now();
    while calls.load(SeqCst) < 20 {
        assert!(waiting.elapsed() < DRAIN_TIMEOUT, "isolation never started");
        std::thread::sleep(Duration::from_millis(10));
    }
    let stopping = Instant::now();
    let err = ctx.stop(StopMode::Graceful).unwrap_err();
    let took = stopping.elapsed();
    assert!(matches!(err, Error::StopTimeout { .. }), "{err}");
    assert!(
        took < Duration::from_secs(10),
        "stop took {took:?}: it waited for the isolation"
    );
    drop(ctx);

    // The abandoned batch is logged: after a restart it runs again, and nothing is lost.
    let ctx = build(Duration::from_secs(60));
    let input = ctx
        .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(900))
        .unwrap();
    let totals = word_count(&input.filter(|line| !line.starts_with(b"POISON")));
    ctx.start().unwrap();
    assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap());
    ctx.stop(StopMode::Graceful).unwrap();
    assert_eq!(*totals.lock().unwrap(), bench_data::reference_word_count(&lines[1..]));
}
