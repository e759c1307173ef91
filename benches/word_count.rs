//! Word-count benchmarks, printed side by side in one run on the same data:
//! 2M lines of ~100 bytes, Zipf words over a 50k vocabulary, fixed seed.
//!
//! 1. Engine word count over pre-stored blocks (the processing time of one batch whose blocks are
//!    all stored before it starts) vs a hand-written rayon word count (per-thread `FxHashMap`,
//!    merged) over the same lines on the same number of threads.
//! 2. End to end through the local log (records/s from start to drained).
//! 3. Scheduling overhead per empty batch.
//! 4. Peak RSS of an end-to-end run with a 64 MiB block-store memory budget, in a child process
//!    that never holds the corpus (aim: at most the budget + 128 MiB).
//!
//! `cargo bench --bench word_count`. Settings: `SLUICE_BENCH_LINES` (a smaller run),
//! `SLUICE_BENCH_MAX_BLOCK_BYTES` (block size of section 1), `SLUICE_BENCH_ONLY=batch` (section 1
//! only); the RSS child also reads `SLUICE_BENCH_RSS_RATE` (a `max_rate`) and
//! `SLUICE_BENCH_RSS_BACKPRESSURE` (PID backpressure with this initial rate).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use sluice::engine::{BackpressureConfig, BatchInfo, StreamingContext};
use sluice::operators::bench_data;
use sluice::receiver::ReceiverConfig;
use sluice::receiver::local_log::LocalLog;

#[allow(clippy::needless_pass_by_value)] // `flat_map` hands each line over by value
fn words(line: Bytes) -> Vec<Bytes> {
    let mut out = Vec::with_capacity(16);
    let mut start = 0;
    for (i, b) in line.iter().enumerate() {
        if *b == b' ' {
            if i > start {
                out.push(line.slice(start..i));
            }
            start = i + 1;
        }
    }
    if line.len() > start {
        out.push(line.slice(start..));
    }
    out
}

fn hand_written(lines: &[String], threads: usize) -> (Duration, usize) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let start = Instant::now();
    let merged = pool.install(|| {
        lines
            .par_chunks(lines.len().div_ceil(threads * 8).max(1))
            .map(|chunk| {
                let mut m: FxHashMap<&str, u64> = FxHashMap::default();
                for line in chunk {
                    for w in line.split(' ').filter(|w| !w.is_empty()) {
                        *m.entry(w).or_default() += 1;
                    }
                }
                m
            })
            .reduce(FxHashMap::default, |mut a, b| {
                for (k, v) in b {
                    *a.entry(k).or_default() += v;
                }
                a
            })
    });
    (start.elapsed(), merged.len())
}

fn fill(dir: &std::path::Path, lines: &[String]) {
    let log = LocalLog::open(dir).unwrap();
    let stream = log.create_stream("lines", 4).unwrap();
    let mut producer = stream.producer().unwrap();
    for (i, line) in lines.iter().enumerate() {
        producer
            .put(&i.to_string(), Bytes::copy_from_slice(line.as_bytes()))
            .unwrap();
    }
    producer.flush().unwrap();
}

/// Runs word count; returns (processing time of the largest batch, wall time to drain, distinct words).
fn engine(dir: &std::path::Path, lines: usize, threads: usize, batch: Duration) -> (Duration, Duration, usize) {
    let ctx = StreamingContext::builder()
        .batch_interval(batch)
        .data_dir(dir.join("data"))
        .executor_threads(threads)
        .memory_budget_bytes(1 << 30)
        .storage_level(sluice::prelude::StorageLevel::MEMORY_ONLY)
        .build()
        .unwrap();
    let config = ReceiverConfig {
        block_interval_ms: 100,
        max_block_bytes: env_or("SLUICE_BENCH_MAX_BLOCK_BYTES", ReceiverConfig::DEFAULT_MAX_BLOCK_BYTES),
        ..ReceiverConfig::default()
    };
    let stream = ctx.local_log_stream(&dir.join("log"), "lines", config).unwrap();
    let distinct = Arc::new(Mutex::new(HashMap::<Bytes, u64>::new()));
    let keep = distinct.clone();
    stream
        .flat_map(words)
        .count_by_value()
        .foreach_batch(move |_t, counts| {
            let mut d = keep.lock().unwrap();
            for (w, c) in counts {
                *d.entry(w).or_default() += c;
            }
            Ok(())
        });
    let biggest: Arc<Mutex<(u64, i64)>> = Arc::default();
    let b = biggest.clone();
    ctx.add_batch_listener(move |info: &BatchInfo| {
        let mut b = b.lock().unwrap();
        if info.num_records > b.0 {
            *b = (info.num_records, info.processing_delay_ms);
        }
    });
    let start = Instant::now();
    ctx.start().unwrap();
    assert!(ctx.await_drained(Duration::from_secs(900)).unwrap());
    let wall = start.elapsed();
    ctx.stop(true).unwrap();
    let (records, ms) = *biggest.lock().unwrap();
    assert!(
        records as usize == lines,
        "expected one batch with every record (got {records} of {lines}); raise the batch interval"
    );
    let distinct = distinct.lock().unwrap().len();
    (Duration::from_millis(ms as u64), wall, distinct)
}

/// A numeric setting from the environment, or `default`.
fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The block-store memory budget of the peak-RSS run.
const RSS_BUDGET: u64 = 64 << 20;

/// Peak resident set size of this process (`VmHWM`), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The child of section 4: fills a log with `n` lines in chunks (never the whole corpus in
/// memory), runs word count end to end with a `RSS_BUDGET` block-store budget (and the receiver
/// rate limit in `SLUICE_BENCH_RSS_RATE`, if set), prints
/// `<rss before engine> <peak rss>` in bytes.
fn rss_child(n: usize) {
    let dir = tempfile::tempdir().unwrap();
    let log = LocalLog::open(dir.path().join("log")).unwrap();
    let mut producer = log.create_stream("lines", 4).unwrap().producer().unwrap();
    let chunk = 100_000;
    for (c, start) in (0..n).step_by(chunk).enumerate() {
        for (i, line) in bench_data::zipf_lines(chunk.min(n - start), 50_000, 42 + c as u64)
            .iter()
            .enumerate()
        {
            producer
                .put(&(start + i).to_string(), Bytes::copy_from_slice(line.as_bytes()))
                .unwrap();
        }
    }
    producer.flush().unwrap();
    drop(producer);
    let before = peak_rss();
    let mut builder = StreamingContext::builder()
        .batch_interval(Duration::from_secs(1))
        .data_dir(dir.path().join("data"))
        .memory_budget_bytes(RSS_BUDGET)
        .storage_level(sluice::prelude::StorageLevel::MEMORY_AND_DISK);
    if let Ok(initial) = std::env::var("SLUICE_BENCH_RSS_BACKPRESSURE") {
        builder = builder.backpressure(BackpressureConfig {
            enabled: true,
            initial_rate: initial.parse().ok(),
            ..BackpressureConfig::default()
        });
    }
    let ctx = builder.build().unwrap();
    let config = ReceiverConfig {
        max_rate: std::env::var("SLUICE_BENCH_RSS_RATE").ok().and_then(|r| r.parse().ok()),
        ..ReceiverConfig::default()
    };
    let stream = ctx.local_log_stream(&dir.path().join("log"), "lines", config).unwrap();
    stream.flat_map(words).count_by_value().foreach_batch(|_t, _c| Ok(()));
    ctx.start().unwrap();
    assert!(ctx.await_drained(Duration::from_secs(900)).unwrap());
    ctx.stop(true).unwrap();
    assert_eq!(ctx.metrics().records_processed, n as u64);
    println!("{before} {}", peak_rss());
}

fn main() {
    if let Ok(n) = std::env::var("SLUICE_BENCH_RSS_CHILD") {
        rss_child(n.parse().unwrap());
        return;
    }
    // `cargo test` builds benches with the test profile (debug assertions on): a smoke-sized run.
    let default_lines = if cfg!(debug_assertions) { 5_000 } else { 2_000_000 };
    let n = env_or("SLUICE_BENCH_LINES", default_lines);
    let threads = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    eprintln!("generating {n} lines (Zipf over 50k words, seed 42)...");
    let lines = bench_data::zipf_lines(n, 50_000, 42);
    let bytes: usize = lines.iter().map(String::len).sum();

    // 1. Pre-stored blocks: the batch interval is long enough that every block is stored before
    //    the first batch starts; the batch's processing time is the engine's figure.
    let dir = tempfile::tempdir().unwrap();
    fill(&dir.path().join("log"), &lines);
    let (hand, hand_distinct) = hand_written(&lines, threads);
    let (engine_batch, _wall, engine_distinct) = engine(dir.path(), n, threads, Duration::from_secs(30));
    assert_eq!(hand_distinct, engine_distinct, "both must find the same words");
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    println!(
        "\nword count over {n} lines ({:.0} MiB), {threads} threads",
        bytes as f64 / 1_048_576.0
    );
    println!("{:<44} {:>14} {:>12}", "", "lines/s", "time");
    println!(
        "{:<44} {:>14.0} {:>10.0}ms",
        "hand-written rayon (FxHashMap per thread)",
        rate(hand),
        hand.as_secs_f64() * 1e3
    );
    println!(
        "{:<44} {:>14.0} {:>10.0}ms",
        "engine batch over pre-stored blocks",
        rate(engine_batch),
        engine_batch.as_secs_f64() * 1e3
    );
    println!(
        "{:<44} {:>14.2}x   (aim >= 0.8x)",
        "ratio engine / hand-written",
        hand.as_secs_f64() / engine_batch.as_secs_f64()
    );

    if std::env::var("SLUICE_BENCH_ONLY").is_ok_and(|v| v == "batch") {
        return;
    }

    // 2. End to end through the local log, 1 s batches.
    let dir = tempfile::tempdir().unwrap();
    fill(&dir.path().join("log"), &lines);
    let ctx_start = Instant::now();
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_secs(1))
        .data_dir(dir.path().join("data"))
        .executor_threads(threads)
        .build()
        .unwrap();
    let stream = ctx
        .local_log_stream(&dir.path().join("log"), "lines", ReceiverConfig::default())
        .unwrap();
    stream.flat_map(words).count_by_value().foreach_batch(|_t, _c| Ok(()));
    ctx.start().unwrap();
    assert!(ctx.await_drained(Duration::from_secs(900)).unwrap());
    let e2e = ctx_start.elapsed();
    ctx.stop(true).unwrap();
    println!(
        "{:<44} {:>14.0} {:>10.0}ms",
        "end to end via local log (MEMORY_AND_DISK_2)",
        rate(e2e),
        e2e.as_secs_f64() * 1e3
    );

    // 3. Empty batches: scheduling overhead per batch.
    let dir = tempfile::tempdir().unwrap();
    fill(&dir.path().join("log"), &[]);
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_millis(5))
        .data_dir(dir.path().join("data"))
        .build()
        .unwrap();
    let stream = ctx
        .local_log_stream(&dir.path().join("log"), "lines", ReceiverConfig::default())
        .unwrap();
    stream.count_by_value().foreach_batch(|_t, _c| Ok(()));
    // `processing_micros` spans the whole batch: allocation, jobs, completion, cleanup.
    let total: Arc<Mutex<(u64, u64)>> = Arc::default();
    let t = total.clone();
    ctx.add_batch_listener(move |info: &BatchInfo| {
        let mut t = t.lock().unwrap();
        t.0 += 1;
        t.1 += info.processing_micros;
    });
    ctx.start().unwrap();
    std::thread::sleep(Duration::from_millis(if n < 100_000 { 300 } else { 3_000 }));
    ctx.stop(true).unwrap();
    let (batches, micros) = *total.lock().unwrap();
    println!(
        "{:<44} {:>14} {:>10.3}ms   (aim < 1 ms)",
        "empty batch processing time (mean)",
        format!("{batches} batches"),
        micros as f64 / 1e3 / batches.max(1) as f64
    );
    peak_rss_section(n);
}

/// Section 4: runs `rss_child` in a fresh process and prints its peak RSS.
fn peak_rss_section(n: usize) {
    let mib = |b: u64| b as f64 / 1_048_576.0;
    println!(
        "peak RSS end to end, {:.0} MiB block-store budget (aim <= {:.0} MiB):",
        mib(RSS_BUDGET),
        mib(RSS_BUDGET) + 128.0
    );
    for (label, setting) in [
        ("  unlimited ingest (one batch holds ~1 s of reads)", None),
        ("  max_rate 200k records/s", Some(("SLUICE_BENCH_RSS_RATE", "200000"))),
        (
            "  PID backpressure (initial rate 200k/s)",
            Some(("SLUICE_BENCH_RSS_BACKPRESSURE", "200000")),
        ),
    ] {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap());
        child.env("SLUICE_BENCH_RSS_CHILD", n.to_string());
        if let Some((name, value)) = setting {
            child.env(name, value);
        }
        let out = child.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8(out.stdout).unwrap();
        let figures: Vec<u64> = text
            .lines()
            .last()
            .unwrap_or("")
            .split(' ')
            .filter_map(|v| v.parse().ok())
            .collect();
        println!(
            "{label:<44} {:>11.0}MiB {:>10}   (before the engine started {:.0} MiB)",
            mib(figures[1]),
            "",
            mib(figures[0])
        );
    }
}
