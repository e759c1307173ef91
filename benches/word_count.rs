//! Word-count benchmarks, printed side by side in one run on the same lines.
//!
//! ```sh
//! cargo bench --bench word_count                                # 2M generated lines (~190 MiB)
//! SLUICE_BENCH_FILE=big.txt cargo bench --bench word_count      # a text file instead
//! ```
//!
//! 1. **Hand-written** rayon word count over the file in memory (per-thread `FxHashMap`, merged),
//!    over its bytes in one buffer cut at line ends — the 1.0× every ratio below is measured
//!    against — and, for comparison with earlier figures, over a `String` per line (slower where
//!    memory latency is high: each line is its own allocation).
//! 2. **Engine batch** over pre-stored blocks: the processing time of one batch whose blocks are
//!    all stored before it starts (aim ≥ 1.0×).
//! 3. **Load**: the word-count example's loading of the lines into the local log, against a raw
//!    sequential write (+ fsync) of the same bytes (aim ≥ 0.5×).
//! 4. **End to end as the example does**, in a child process: the local log already loaded →
//!    drained, the example's settings (500 ms batches, 100 ms blocks, the rest default) and its
//!    pipeline (`examples/support`: word count per
//!    batch to Parquet, totals with `update_state_by_key`); lines/s, ratio and peak RSS (aim ≥
//!    0.5× and ≤ 256 MiB). The Parquet output summed over batches is checked against the
//!    reference.
//! 5. Scheduling overhead per empty batch.
//! 6. Peak RSS bounded by configuration: the end-to-end run with a receiver rate limit and with
//!    PID backpressure.
//!
//! Settings: `SLUICE_BENCH_FILE` (a text file), `SLUICE_BENCH_LINES` (size of the generated
//! corpus), `SLUICE_BENCH_ONLY=batch|e2e` (only section 2, or only 3–4),
//! `SLUICE_BENCH_MAX_BLOCK_BYTES` (block size of sections 2, 4 and 6), `SLUICE_BENCH_REPEATS`
//! (sections 1 and 2 run this many times, default 3, and print the best time of each); for the
//! end-to-end runs (sections 4 and 6), `SLUICE_BENCH_BATCH_MS` (the batch interval, the example's
//! 500 unless set), `SLUICE_BENCH_MEMORY_MIB` (the block store's memory budget) and
//! `SLUICE_BENCH_QUEUE` (the generator's queue of blocks).

#[path = "../examples/support/mod.rs"]
mod support;

use std::collections::HashMap;
use std::fmt::Write as _;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use rayon::prelude::*;
use rustc_hash::FxHashMap;
use sluice::engine::{BackpressureConfig, BatchInfo, StopMode, StreamingContext};
use sluice::operators::bench_data;
use sluice::receiver::ReceiverConfig;
use sluice::receiver::local_log::{LocalLog, spread_hash_key};

const STREAM: &str = "lines";
/// The word-count example's batch interval, which the end-to-end runs use unless
/// `SLUICE_BENCH_BATCH_MS` says otherwise.
const E2E_BATCH_INTERVAL_MS: usize = 500;

fn e2e_batch_interval() -> Duration {
    Duration::from_millis(env_or("SLUICE_BENCH_BATCH_MS", E2E_BATCH_INTERVAL_MS) as u64)
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
                    for w in line.split_ascii_whitespace() {
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

/// The same counter over the file's bytes in one buffer (`text`, lines joined by `\n`), cut into
/// chunks at line ends: what one would write for a file read into memory. The words of a chunk
/// are read from one contiguous run of memory instead of one allocation per line.
fn hand_written_buffer(text: &str, threads: usize) -> (Duration, usize) {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
    let start = Instant::now();
    let target = text.len().div_ceil(threads * 8).max(1);
    let mut chunks = Vec::new();
    let mut rest = text;
    while !rest.is_empty() {
        let end = rest[target.min(rest.len())..]
            .find('\n')
            .map_or(rest.len(), |i| target + i + 1);
        let (chunk, tail) = rest.split_at(end);
        chunks.push(chunk);
        rest = tail;
    }
    let merged = pool.install(|| {
        chunks
            .par_iter()
            .map(|chunk| {
                let mut m: FxHashMap<&str, u64> = FxHashMap::default();
                for w in chunk.split_ascii_whitespace() {
                    *m.entry(w).or_default() += 1;
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

/// Loads `lines` into a new local log under `dir` as the word-count example does: one record
/// per line, keyed by its number, 2 shards. Returns the time it took.
fn load(dir: &Path, lines: &[String]) -> Duration {
    let start = Instant::now();
    let log = LocalLog::open(dir).unwrap();
    let stream = log.create_stream(STREAM, 2).unwrap();
    let mut producer = stream.producer().unwrap();
    let mut key = String::new();
    for (i, line) in lines.iter().enumerate() {
        key.clear();
        write!(key, "{}", i + 1).unwrap();
        producer
            .append(&key, Some(spread_hash_key(i as u64 + 1)), line.as_bytes())
            .unwrap();
    }
    producer.flush().unwrap();
    start.elapsed()
}

/// A raw sequential write of `bytes` bytes (in 1 MiB writes) and an fsync.
fn raw_write(dir: &Path, bytes: usize) -> Duration {
    let chunk = vec![b'x'; 1 << 20];
    let start = Instant::now();
    let mut file = std::fs::File::create(dir.join("raw")).unwrap();
    let mut left = bytes;
    while left > 0 {
        let n = left.min(chunk.len());
        file.write_all(&chunk[..n]).unwrap();
        left -= n;
    }
    file.sync_all().unwrap();
    start.elapsed()
}

/// Section 2: the processing time of one batch holding every block of the log in `log`: no batch
/// is due within the hour, and once every record is stored a graceful stop runs the one batch.
fn engine_batch(log: &Path, data: &Path, lines: usize, threads: usize) -> (Duration, usize) {
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_secs(3_600))
        .graceful_stop_timeout(Duration::from_secs(900))
        .data_dir(data)
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
    let stream = ctx.local_log_stream(log, STREAM, config).unwrap();
    let distinct = Arc::new(Mutex::new(HashMap::<sluice::operators::ByteKey, u64>::new()));
    let keep = distinct.clone();
    stream
        .flat_map_count_by_value(|line: &Bytes, emit| support::words(line).for_each(emit))
        .foreach_batch(move |_t, counts| {
            let mut d = keep.lock().unwrap();
            for (w, c) in counts {
                *d.entry(w).or_default() += c;
            }
            Ok(())
        })
        .unwrap();
    let biggest: Arc<Mutex<(u64, i64)>> = Arc::default();
    let b = biggest.clone();
    ctx.add_batch_listener(move |info: &BatchInfo| {
        let mut b = b.lock().unwrap();
        if info.num_records > b.0 {
            *b = (info.num_records, info.processing_delay_ms);
        }
    });
    ctx.start().unwrap();
    let deadline = Instant::now() + Duration::from_secs(900);
    while ctx.metrics().records_stored < lines as u64 {
        assert!(Instant::now() < deadline, "the receivers did not store every record");
        std::thread::sleep(Duration::from_millis(10));
    }
    ctx.stop(StopMode::Graceful).unwrap();
    let (records, ms) = *biggest.lock().unwrap();
    assert!(
        records as usize == lines,
        "expected one batch with every record (got {records} of {lines})"
    );
    let distinct = distinct.lock().unwrap().len();
    (Duration::from_millis(ms as u64), distinct)
}

/// A numeric setting from the environment, or `default`.
fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Peak resident set size of this process (`VmHWM`), in bytes.
fn peak_rss() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// The child of sections 4 and 6: the word-count example's pipeline over the loaded log in
/// `dir`, default settings (plus a rate limit or backpressure when asked), from start to
/// drained. Prints `<milliseconds> <peak rss bytes>`.
fn e2e_child(dir: &Path) {
    // The word-count example's settings: 500 ms batches (unless `SLUICE_BENCH_BATCH_MS`), 100 ms
    // blocks; everything else default.
    let mut builder = StreamingContext::builder()
        .batch_interval(e2e_batch_interval())
        .data_dir(dir.join("data"));
    if let Ok(mib) = std::env::var("SLUICE_BENCH_MEMORY_MIB") {
        builder = builder.memory_budget_bytes(mib.parse::<u64>().unwrap() << 20);
    }
    if let Ok(initial) = std::env::var("SLUICE_BENCH_BACKPRESSURE") {
        builder = builder.backpressure(BackpressureConfig {
            enabled: true,
            initial_rate: initial.parse().ok(),
            ..BackpressureConfig::default()
        });
    }
    let ctx = builder.build().unwrap();
    let config = ReceiverConfig {
        block_interval_ms: 100,
        queue_capacity: env_or("SLUICE_BENCH_QUEUE", ReceiverConfig::DEFAULT_QUEUE_CAPACITY),
        max_block_bytes: env_or("SLUICE_BENCH_MAX_BLOCK_BYTES", ReceiverConfig::DEFAULT_MAX_BLOCK_BYTES),
        max_rate: std::env::var("SLUICE_BENCH_RATE").ok().and_then(|r| r.parse().ok()),
        ..ReceiverConfig::default()
    };
    let lines = ctx.local_log_stream(&dir.join("log"), STREAM, config).unwrap();
    let output = dir.join("data").join("output").display().to_string();
    let _top = support::count_words(&ctx, &lines, &output, 10).unwrap();
    // The example prints a line per batch; the child's stdout is only its figures.
    let start = Instant::now();
    ctx.start().unwrap();
    assert!(ctx.await_drained(Duration::from_secs(1_800)).unwrap());
    let elapsed = start.elapsed();
    let status = ctx.status().unwrap();
    ctx.stop(StopMode::Graceful).unwrap();
    let metrics = ctx.metrics();
    eprintln!("{metrics:?}");
    // The batches that held records: how many intervals the run took, and whether processing
    // (not the interval) was the bound.
    let batches: Vec<_> = status.batches.into_iter().filter(|b| b.num_records > 0).collect();
    let slowest_ms = batches.iter().map(|b| b.processing_delay_ms).max().unwrap_or(0);
    println!(
        "{} {} {} {} {}",
        elapsed.as_millis(),
        peak_rss(),
        metrics.ingest_gate_wait_micros / 1_000,
        batches.len(),
        slowest_ms
    );
}

/// What one end-to-end child run measured.
struct E2e {
    time: Duration,
    peak_rss: u64,
    /// How long the receivers' blocks waited for the memory budget (the ingest gate).
    gate_wait: Duration,
    /// Batches that held records, and the longest any of them took to process.
    batches: u64,
    slowest_batch: Duration,
    /// The Parquet output summed over batches.
    output: HashMap<String, u64>,
}

/// Runs `e2e_child` on a copy of the loaded log.
fn e2e(log_dir: &Path, env: &[(&str, &str)]) -> E2e {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(log_dir, &dir.path().join("log"));
    let mut child = std::process::Command::new(std::env::current_exe().unwrap());
    child.env("SLUICE_BENCH_E2E_CHILD", dir.path());
    for (k, v) in env {
        child.env(k, v);
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
    E2e {
        time: Duration::from_millis(figures[0]),
        peak_rss: figures[1],
        gate_wait: Duration::from_millis(figures[2]),
        batches: figures[3],
        slowest_batch: Duration::from_millis(figures[4]),
        output: summed_output(&dir.path().join("data").join("output")),
    }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

fn summed_output(location: &Path) -> HashMap<String, u64> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::UInt64Type;
    let mut sums = HashMap::new();
    for (_time, batch) in sluice::operators::ParquetSink::read_committed(&location.display().to_string()).unwrap() {
        // The word-count example writes words as bytes (a `Binary` key column).
        let keys = batch.column(0).as_binary::<i32>();
        let values = batch.column(1).as_primitive::<UInt64Type>();
        for i in 0..batch.num_rows() {
            *sums
                .entry(String::from_utf8(keys.value(i).to_vec()).expect("UTF-8 words"))
                .or_default() += values.value(i);
        }
    }
    sums
}

fn read_lines(path: &Path) -> Vec<String> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    bytes
        .split(|b| *b == b'\n')
        .filter(|l| !l.is_empty())
        .map(|l| String::from_utf8_lossy(l).into_owned())
        .collect()
}

#[allow(clippy::too_many_lines)] // the sections, in the order they print
fn main() {
    if let Ok(dir) = std::env::var("SLUICE_BENCH_E2E_CHILD") {
        e2e_child(&PathBuf::from(dir));
        return;
    }
    let only = std::env::var("SLUICE_BENCH_ONLY").unwrap_or_default();
    // `cargo test` builds benches with the test profile (debug assertions on): a smoke-sized run.
    let default_lines = if cfg!(debug_assertions) { 5_000 } else { 2_000_000 };
    let lines = if let Ok(path) = std::env::var("SLUICE_BENCH_FILE") {
        read_lines(Path::new(&path))
    } else {
        let n = env_or("SLUICE_BENCH_LINES", default_lines);
        eprintln!("generating {n} lines (Zipf over 50k words, seed 42)...");
        bench_data::zipf_lines(n, 50_000, 42)
    };
    let n = lines.len();
    let bytes: usize = lines.iter().map(|l| l.len() + 1).sum();
    let threads = std::thread::available_parallelism().map_or(2, std::num::NonZero::get);
    let rate = |d: Duration| n as f64 / d.as_secs_f64();
    let mib = |b: u64| b as f64 / 1_048_576.0;

    // Sections 1 and 2 run `repeats` times and keep the best time of each: on this shared
    // machine one run of either can take twice as long as the next.
    let repeats = env_or("SLUICE_BENCH_REPEATS", if cfg!(debug_assertions) { 1 } else { 3 }).max(1);

    // 1. Hand-written, over the file's bytes in one buffer (the 1.0x) and over a `String` per line.
    let text = lines.join("\n");
    let (mut hand, hand_distinct) = hand_written_buffer(&text, threads);
    let (mut per_line, per_line_distinct) = hand_written(&lines, threads);
    assert_eq!(
        hand_distinct, per_line_distinct,
        "both counters must find the same words"
    );
    for _ in 1..repeats {
        hand = hand.min(hand_written_buffer(&text, threads).0);
        per_line = per_line.min(hand_written(&lines, threads).0);
    }
    drop(text);
    println!(
        "\nword count over {n} lines ({:.0} MiB), {threads} threads",
        bytes as f64 / 1_048_576.0
    );
    println!("{:<48} {:>12} {:>10} {:>8}", "", "lines/s", "time", "ratio");
    let row = |label: &str, d: Duration, aim: &str| {
        println!(
            "{label:<48} {:>12.0} {:>8.0}ms {:>7.2}x  {aim}",
            rate(d),
            d.as_secs_f64() * 1e3,
            hand.as_secs_f64() / d.as_secs_f64()
        );
    };
    row("hand-written rayon (FxHashMap/thread), one buffer", hand, "");
    row("hand-written rayon, a String per line", per_line, "");

    // 2. Engine batch over pre-stored blocks.
    if only.is_empty() || only == "batch" {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("log");
        load(&log, &lines);
        let mut batch = Duration::MAX;
        for run in 0..repeats {
            let data = dir.path().join(format!("data-{run}"));
            let (time, distinct) = engine_batch(&log, &data, n, threads);
            assert_eq!(hand_distinct, distinct, "both must find the same words");
            batch = batch.min(time);
        }
        row("engine batch over pre-stored blocks", batch, "(aim >= 1.0x)");
    }
    if only == "batch" {
        return;
    }

    // 3. Load, against a raw write of the same bytes.
    let loaded = tempfile::tempdir().unwrap();
    let log_dir = loaded.path().join("log");
    let load_time = load(&log_dir, &lines);
    let raw = raw_write(loaded.path(), bytes);
    println!(
        "{:<48} {:>12.0} {:>8.0}ms {:>7.2}x  (of a raw write + fsync of the same {:.0} MiB: {:.0} ms; aim >= 0.5x)",
        "load into the local log (the example's loader)",
        rate(load_time),
        load_time.as_secs_f64() * 1e3,
        raw.as_secs_f64() / load_time.as_secs_f64(),
        bytes as f64 / 1_048_576.0,
        raw.as_secs_f64() * 1e3,
    );

    // 4. End to end as the example does.
    let reference = {
        let mut counts: HashMap<String, u64> = HashMap::new();
        for line in &lines {
            for w in line.split_ascii_whitespace() {
                *counts.entry(w.to_owned()).or_default() += 1;
            }
        }
        counts
    };
    let run = e2e(&log_dir, &[]);
    assert_eq!(run.output, reference, "the end-to-end output must equal the reference");
    row(
        "end to end as the example (default settings)",
        run.time,
        &format!(
            "(aim >= 0.5x)  peak RSS {:.0} MiB (aim <= 256); ingest waited {} ms for the memory budget; \
             {} batches of {} ms held records (batch times are multiples of the interval, so the last was cut \
             >= {} ms after the start), the slowest processed in {} ms",
            mib(run.peak_rss),
            run.gate_wait.as_millis(),
            run.batches,
            e2e_batch_interval().as_millis(),
            run.batches.saturating_sub(1) * e2e_batch_interval().as_millis() as u64,
            run.slowest_batch.as_millis()
        ),
    );
    if only == "e2e" {
        return;
    }

    // 5. Empty batches: scheduling overhead per batch.
    let dir = tempfile::tempdir().unwrap();
    load(&dir.path().join("log"), &[]);
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_millis(5))
        .data_dir(dir.path().join("data"))
        .build()
        .unwrap();
    let stream = ctx
        .local_log_stream(&dir.path().join("log"), STREAM, ReceiverConfig::default())
        .unwrap();
    stream.count_by_value().foreach_batch(|_t, _c| Ok(())).unwrap();
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
    ctx.stop(StopMode::Graceful).unwrap();
    let (batches, micros) = *total.lock().unwrap();
    println!(
        "{:<48} {:>12} {:>8.3}ms            (aim < 1 ms)",
        "empty batch processing time (mean)",
        format!("{batches} batches"),
        micros as f64 / 1e3 / batches.max(1) as f64
    );

    // 6. Peak RSS bounded by configuration.
    for (label, setting) in [
        ("end to end, max_rate 200k records/s", ("SLUICE_BENCH_RATE", "200000")),
        (
            "end to end, PID backpressure (initial 200k/s)",
            ("SLUICE_BENCH_BACKPRESSURE", "200000"),
        ),
    ] {
        let run = e2e(&log_dir, &[setting]);
        assert_eq!(run.output, reference, "{label}: the output must equal the reference");
        row(label, run.time, &format!("peak RSS {:.0} MiB", mib(run.peak_rss)));
    }
}
