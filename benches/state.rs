//! Batch time against state size: `update_state_by_key` vs `map_with_state`.
//!
//! ```sh
//! cargo bench --bench state                          # 10k, 100k, 1M, 10M keys
//! SLUICE_BENCH_STATE_SIZES=10000,100000 cargo bench --bench state
//! ```
//!
//! For each state size N: a local log holds N records with distinct keys; the pipeline (running
//! counts per key) reads them until drained, so the state holds N keys. Then a producer appends
//! 20 000 records per second for a few seconds, keyed at random among the N, and the processing
//! time of those 1 s batches is measured (median). `update_state_by_key` calls its function for
//! every key and snapshots the whole state every batch, so its batches grow with N;
//! `map_with_state` touches and writes only the keys of the batch, so its batches should not.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice::engine::{BatchInfo, DStream, StateSpec, StopMode, StreamingContext};
use sluice::receiver::ReceiverConfig;
use sluice::receiver::local_log::LocalLog;

const STREAM: &str = "keys";
const PROBE_RATE: u64 = 20_000;
const PROBE_SECONDS: u64 = 6;

#[derive(Clone, Copy, Debug)]
enum Op {
    UpdateStateByKey,
    MapWithState,
}

fn key_of(record: &Bytes) -> (u64, u64) {
    let text = std::str::from_utf8(record).unwrap_or("0");
    (text.parse().unwrap_or(0), 1)
}

fn pipeline(lines: &DStream<Bytes>, op: Op) {
    let pairs = lines.map(|r: Bytes| key_of(&r)).reduce_by_key(|a, b| a + b);
    match op {
        Op::UpdateStateByKey => pairs
            .update_state_by_key(|_k: &u64, new: Vec<u64>, old: Option<u64>| {
                Some(old.unwrap_or(0) + new.iter().sum::<u64>())
            })
            .foreach_batch(|_t, _all| Ok(())),
        Op::MapWithState => pairs
            .map_with_state(StateSpec::new(|_k: &u64, new: Vec<u64>, state| {
                let total = state.get().copied().unwrap_or(0) + new.iter().sum::<u64>();
                state.update(total);
                None::<()>
            }))
            .foreach_batch(|_t, _out| Ok(())),
    }
    .unwrap();
}

/// Median processing time (ms) of the probe batches with state size `n`.
fn run(n: u64, op: Op) -> (f64, Duration) {
    let dir = tempfile::tempdir().unwrap();
    let log = LocalLog::open(dir.path().join("log")).unwrap();
    let mut producer = log.create_stream(STREAM, 2).unwrap().producer().unwrap();
    for k in 0..n {
        producer.put(&k.to_string(), Bytes::from(k.to_string())).unwrap();
    }
    producer.flush().unwrap();
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_secs(1))
        .data_dir(dir.path().join("data"))
        .build()
        .unwrap();
    let lines = ctx
        .local_log_stream(&dir.path().join("log"), STREAM, ReceiverConfig::default())
        .unwrap();
    pipeline(&lines, op);
    let probes: Arc<Mutex<Vec<BatchInfo>>> = Arc::default();
    let seen = probes.clone();
    ctx.add_batch_listener(move |info: &BatchInfo| seen.lock().unwrap().push(*info));
    let load = Instant::now();
    ctx.start().unwrap();
    assert!(ctx.await_drained(Duration::from_secs(3_600)).unwrap());
    let load = load.elapsed();
    let loaded_batches = probes.lock().unwrap().len();
    // Probes: PROBE_RATE records per second, keys spread over the state.
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for _ in 0..PROBE_SECONDS {
        let second = Instant::now();
        for _ in 0..PROBE_RATE {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let k = x % n;
            producer.put(&k.to_string(), Bytes::from(k.to_string())).unwrap();
        }
        producer.flush().unwrap();
        std::thread::sleep(Duration::from_secs(1).saturating_sub(second.elapsed()));
    }
    assert!(ctx.await_drained(Duration::from_secs(3_600)).unwrap());
    ctx.stop(StopMode::Graceful).unwrap();
    let infos = probes.lock().unwrap();
    let mut times: Vec<f64> = infos[loaded_batches..]
        .iter()
        .filter(|i| i.num_records > 0)
        .map(|i| i.processing_micros as f64 / 1e3)
        .collect();
    times.sort_by(f64::total_cmp);
    let median = times.get(times.len() / 2).copied().unwrap_or(f64::NAN);
    (median, load)
}

fn main() {
    let default_sizes = if cfg!(debug_assertions) {
        vec![1_000]
    } else {
        vec![10_000, 100_000, 1_000_000, 10_000_000]
    };
    let sizes: Vec<u64> = std::env::var("SLUICE_BENCH_STATE_SIZES")
        .ok()
        .map_or(default_sizes, |s| {
            s.split(',').filter_map(|v| v.trim().parse().ok()).collect()
        });
    println!(
        "\nbatch processing time with {PROBE_RATE} records per 1 s batch, by state size (median of the probe batches)"
    );
    println!("{:>12} {:>22} {:>22}", "keys", "update_state_by_key", "map_with_state");
    for n in sizes {
        let (update, _) = run(n, Op::UpdateStateByKey);
        let (map, _) = run(n, Op::MapWithState);
        println!("{n:>12} {update:>19.1} ms {map:>19.1} ms");
    }
}
