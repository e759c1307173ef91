//! Helpers shared by the engine's integration tests: a filled local log, the word splitter and a
//! context with short intervals.

// Each test crate uses a different subset of these helpers.
#![allow(dead_code)]

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sluice_blockstore::ManualClock;
use sluice_engine::{DStream, StreamingContext};
use sluice_receiver::ReceiverConfig;
use sluice_receiver::local_log::LocalLog;

/// The local-log stream the tests read.
pub const STREAM: &str = "lines";
/// How long a test waits for a pipeline to drain.
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

/// Creates the local log under `dir` with `shards` shards and appends `lines`.
pub fn fill_log(dir: &Path, lines: &[String], shards: u32) {
    let log = LocalLog::open(dir).unwrap();
    let stream = log.create_stream(STREAM, shards).unwrap();
    let mut producer = stream.producer().unwrap();
    for (i, line) in lines.iter().enumerate() {
        producer
            .put(&i.to_string(), Bytes::copy_from_slice(line.as_bytes()))
            .unwrap();
    }
    producer.flush().unwrap();
}

/// The whitespace-separated words of a line.
#[allow(clippy::needless_pass_by_value)] // `flat_map` hands each line over by value
pub fn words(line: Bytes) -> Vec<String> {
    String::from_utf8_lossy(&line)
        .split_ascii_whitespace()
        .map(str::to_owned)
        .collect()
}

/// A context with its data under `data`.
pub fn context(data: &Path, batch_ms: u64, threads: usize) -> StreamingContext {
    StreamingContext::builder()
        .batch_interval(Duration::from_millis(batch_ms))
        .data_dir(data)
        .executor_threads(threads)
        .build()
        .unwrap()
}

/// A context with its data under `data`, one-second batches and `clock`'s time: blocks are cut
/// and batches run as the test moves the clock.
pub fn manual_clock_context(data: &Path, clock: &Arc<ManualClock>) -> StreamingContext {
    StreamingContext::builder()
        .batch_interval(Duration::from_secs(1))
        .data_dir(data)
        .clock(clock.clone())
        .build()
        .unwrap()
}

/// A context of worker `worker` that serves its metrics and status page on a free loopback port
/// (200 ms batches, two executor threads).
pub fn monitored_context(data: &Path, worker: &str) -> StreamingContext {
    StreamingContext::builder()
        .batch_interval(Duration::from_millis(200))
        .data_dir(data)
        .executor_threads(2)
        .worker_id(worker)
        .metrics_addr("127.0.0.1:0".parse().unwrap())
        .build()
        .unwrap()
}

/// A local-log receiver config with 50 ms blocks, read at most at 3,000 records/s so that the
/// input spans several batches.
pub fn paced_receiver_config() -> ReceiverConfig {
    ReceiverConfig {
        block_interval_ms: 50,
        max_rate: Some(3_000.0),
        ..ReceiverConfig::default()
    }
}

/// A receiver config with the given block interval.
pub fn receiver_config(block_ms: u64) -> ReceiverConfig {
    ReceiverConfig {
        block_interval_ms: block_ms,
        ..ReceiverConfig::default()
    }
}

/// Waits until the receivers of `ctx` have stored `records` records (at most [`DRAIN_TIMEOUT`]):
/// with a batch interval longer than the test, a stop then runs one batch holding all of them.
pub fn await_stored(ctx: &StreamingContext, records: usize) {
    let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
    while ctx.metrics().records_stored < records as u64 {
        assert!(std::time::Instant::now() < deadline, "records not stored");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Word count whose totals (state) are captured after every batch.
pub fn word_count(lines: &DStream<Bytes>) -> Arc<Mutex<HashMap<String, u64>>> {
    let totals =
        lines
            .flat_map(words)
            .count_by_value()
            .update_state_by_key(|_w: &String, new: Vec<u64>, old: Option<u64>| {
                Some(old.unwrap_or(0) + new.iter().sum::<u64>())
            });
    let latest: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let keep = latest.clone();
    totals
        .foreach_batch(move |_t, all| {
            *keep.lock().unwrap() = all.into_iter().collect();
            Ok(())
        })
        .unwrap();
    latest
}
