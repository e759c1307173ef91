//! Local-log throughput against raw file I/O of the same bytes, measured side by side in one run
//! (issue 14, targets 4 and 5).
//!
//! `cargo bench -p sluice-receiver --bench local_log` runs 1M records of 100 bytes, five times,
//! and prints the median of each case next to its raw baseline; without `--bench` (as `cargo test
//! --all-targets` runs it) it does one smoke pass on 2,000 records. Knobs (environment):
//! `SLUICE_BENCH_RECORDS` (records per run), `SLUICE_BENCH_REPEATS` (runs, median taken),
//! `SLUICE_BENCH_ONLY=log|load` (one section), `SLUICE_BENCH_SHARDS=1|2` (one shape of the log
//! section), `SLUICE_BENCH_API=put|append|append-hashed` (one way of writing in the log section),
//! `SLUICE_BENCH_BLOCK_BYTES` (the largest block rebuilt; the receiver's default, 16 MiB).
//!
//! **log** (target 4), for two shapes — one shard and one partition key; two shards and a distinct
//! key per record (what the word-count example writes) — and three ways of writing:
//! - *put* / *append* / *`hash_keys` + append*: `Producer::put` (a stored record each, its position
//!   returned) or `Producer::append` (aggregated, as bulk loads write) of every record, the last
//!   with each key's MD5 computed by `hash_keys` 500 keys at a time and passed as the explicit
//!   hash key (two shards only: one shard needs no MD5; the log it writes is the one `append`
//!   writes, so only its writing is timed), then `flush` (write + fsync), against a raw
//!   sequential `write_all` of the same payload bytes in 1 MiB slices + `fsync` to a new file;
//! - *read shard*: every shard read from `TrimHorizon` to its tail with `LocalShardReader::read`,
//!   *replay*: `Replay::replay` of each shard's whole range, and *replay into a block*:
//!   `Replay::replay_block` of each block a receiver would have cut from the shards (at most
//!   `ReceiverConfig::DEFAULT_MAX_BLOCK_BYTES` of keys and payloads each: the largest block the
//!   engine ever rebuilds), as a lost block is rebuilt, against a raw sequential read
//!   of the raw file into memory (1 MiB buffers, all kept, as the log's records keep theirs); all
//!   from the page cache, since the files were just written.
//!
//! **load** (target 5): a text file of the same records, one per line, loaded into a two-shard
//! stream by `local_log::cli::put` (what `sluice log put FILE` runs) and by the loop of the
//! word-count example's `load` (copied here, since examples cannot be benched), against a raw
//! `write_all` + `fsync` of the file's bytes.
//!
//! Ratios are payload rates (user bytes; the log also writes 6 bytes of lengths and the key per
//! record, and a 37-byte frame header per stored record: one per `put`, one per up to 64 KiB of
//! `append`s). Every read is checked against what was written: each record's payload must be
//! exactly the one put, and every record must come back exactly once.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{BufRead, Read, Write};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use sluice_blockstore::{BlockId, BlockMeta, Record, Replay, SequenceNumberRange, SequenceNumberRanges};
use sluice_receiver::local_log::{LocalLog, LocalStream, cli, hash_key, hash_keys, spread_hash_key};
use sluice_receiver::{ReceiverConfig, Source, StartingPosition};

const BENCH_RECORDS: usize = 1_000_000;
const SMOKE_RECORDS: usize = 2_000;
const BENCH_REPEATS: usize = 5;
const RECORD_BYTES: usize = 100;
/// Records asked for per `read` call (the receiver's default page is of this order).
const READ_PAGE: usize = 10_000;

type BenchResult<T = ()> = Result<T, Box<dyn std::error::Error>>;

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// Record `i`'s payload: its index in ten digits, then lowercase words, `RECORD_BYTES` in all.
fn payload(i: usize, out: &mut Vec<u8>) {
    const WORDS: [&str; 8] = ["stream", "sluice", "block", "shard", "replay", "log", "batch", "key"];
    let start = out.len();
    write!(out, "{i:010}").expect("write to a Vec");
    let mut state = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    while out.len() - start < RECORD_BYTES {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.push(b' ');
        out.extend_from_slice(WORDS[(state % 8) as usize].as_bytes());
    }
    out.truncate(start + RECORD_BYTES);
}

/// Every payload, concatenated (record `i` at `i * RECORD_BYTES`).
fn corpus(records: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(records * RECORD_BYTES);
    for i in 0..records {
        payload(i, &mut out);
    }
    out
}

fn record_payload(corpus: &[u8], i: usize) -> &[u8] {
    &corpus[i * RECORD_BYTES..(i + 1) * RECORD_BYTES]
}

/// Raw baseline: sequential `write_all` of `bytes` in 1 MiB slices to a new file, then fsync.
#[inline(never)] // a frame of its own in profiles
fn raw_write(path: &Path, bytes: &[u8]) -> BenchResult<Duration> {
    let _ = std::fs::remove_file(path);
    let start = Instant::now();
    let mut file = File::create(path)?;
    for chunk in bytes.chunks(1 << 20) {
        file.write_all(chunk)?;
    }
    file.sync_data()?;
    Ok(start.elapsed())
}

/// Raw baseline: the whole file read into memory, in fresh 1 MiB buffers that are all kept — the
/// memory pattern of the log's reader, whose records keep the 1 MiB chunks they were read into.
/// (`std::fs::read` into one buffer runs at about the same speed, but swings 4× between runs with
/// how the allocator happens to get its 95 MiB.)
#[inline(never)] // a frame of its own in profiles
fn raw_read(path: &Path, expected: &[u8]) -> BenchResult<Duration> {
    let start = Instant::now();
    let mut file = File::open(path)?;
    let mut chunks = Vec::new();
    loop {
        let mut chunk = Vec::with_capacity(1 << 20);
        if (&mut file).take(1 << 20).read_to_end(&mut chunk)? == 0 {
            break;
        }
        chunks.push(chunk);
    }
    let elapsed = start.elapsed();
    assert!(
        chunks.concat() == expected,
        "raw read-back differs from what was written"
    );
    Ok(elapsed)
}

/// How records are keyed and sharded.
#[derive(Clone, Copy)]
struct Shape {
    name: &'static str,
    shards: u32,
    distinct_keys: bool,
}

const SHAPES: [Shape; 2] = [
    Shape {
        name: "1 shard, 1 key",
        shards: 1,
        distinct_keys: false,
    },
    Shape {
        name: "2 shards, key per record",
        shards: 2,
        distinct_keys: true,
    },
];

/// How the log section writes its records.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Api {
    /// `Producer::put`: a stored record each, its position returned.
    Put,
    /// `Producer::append`: aggregated, no position returned.
    Append,
    /// `Producer::append` with each key's MD5 from `hash_keys`, [`HASH_BATCH`] keys at a time (a
    /// bulk load that routes by partition key). Only with more than one shard: one shard needs
    /// no MD5.
    AppendHashed,
}

/// Keys hashed per `hash_keys` call by [`Api::AppendHashed`] (Kinesis `PutRecords` takes up to
/// 500 records per call).
const HASH_BATCH: usize = 500;

/// Writes every record and flushes; returns the elapsed time.
#[inline(never)] // a frame of its own in profiles
fn log_append(stream: &LocalStream, corpus: &[u8], records: usize, shape: Shape, api: Api) -> BenchResult<Duration> {
    if api == Api::AppendHashed {
        return log_append_hashed(stream, corpus, records, shape);
    }
    let mut producer = stream.producer()?;
    let mut key = String::new();
    let start = Instant::now();
    for i in 0..records {
        let k = if shape.distinct_keys {
            key.clear();
            write!(key, "{i}").expect("format a key");
            key.as_str()
        } else {
            "k"
        };
        match api {
            Api::Put => drop(producer.put(k, record_payload(corpus, i))?),
            Api::Append => producer.append(k, None, record_payload(corpus, i))?,
            Api::AppendHashed => unreachable!("written by log_append_hashed"),
        }
    }
    producer.flush()?;
    Ok(start.elapsed())
}

/// [`Api::AppendHashed`]: every record appended with its key's MD5 from `hash_keys`,
/// [`HASH_BATCH`] keys at a time, then flushed; returns the elapsed time.
#[inline(never)] // a frame of its own in profiles
fn log_append_hashed(stream: &LocalStream, corpus: &[u8], records: usize, shape: Shape) -> BenchResult<Duration> {
    let mut producer = stream.producer()?;
    // A batch's keys written end to end into one buffer (no allocation per key).
    let (mut text, mut ends, mut hashes) = (String::new(), Vec::new(), Vec::with_capacity(HASH_BATCH));
    let start = Instant::now();
    for first in (0..records).step_by(HASH_BATCH) {
        let batch = first..(first + HASH_BATCH).min(records);
        text.clear();
        ends.clear();
        for i in batch.clone() {
            if shape.distinct_keys {
                write!(text, "{i}").expect("format a key");
            } else {
                text.push('k');
            }
            ends.push(text.len());
        }
        let starts = std::iter::once(0).chain(ends.iter().copied());
        let keys: Vec<&str> = starts.zip(&ends).map(|(from, &to)| &text[from..to]).collect();
        hashes.clear();
        hash_keys(&keys, &mut hashes);
        // The routing `None` would choose: the first key of each batch checked (~0.3 ms in all).
        assert_eq!(hashes[0], hash_key(keys[0]), "hash_keys differs from hash_key");
        for ((i, k), hash) in batch.zip(&keys).zip(&hashes) {
            producer.append(k, Some(*hash), record_payload(corpus, i))?;
        }
    }
    producer.flush()?;
    Ok(start.elapsed())
}

/// Checks that `payloads` are every payload exactly once and nothing else.
fn check_payloads<'a>(payloads: impl Iterator<Item = &'a [u8]>, corpus: &[u8], total: usize, what: &str) {
    let mut seen = vec![false; total];
    let mut n = 0;
    for data in payloads {
        let index: usize = std::str::from_utf8(&data[..10])
            .ok()
            .and_then(|d| d.parse().ok())
            .unwrap_or_else(|| panic!("{what}: a record that was never written"));
        assert!(
            index < total && !seen[index],
            "{what}: record {index} twice or out of range"
        );
        assert!(
            data == record_payload(corpus, index),
            "{what}: record {index} differs from what was written"
        );
        seen[index] = true;
        n += 1;
    }
    assert_eq!(n, total, "{what}: records missing");
}

/// What [`log_read_shards`] read: each shard's whole range, and the ranges of the blocks a
/// receiver would have cut from it, each with its key and payload bytes (for the replays).
struct ReadRanges {
    shards: Vec<(SequenceNumberRange, u64)>,
    blocks: Vec<(SequenceNumberRange, u64)>,
}

/// The range of `records` (consecutive records of one shard) and their key and payload bytes.
fn range_of(stream: &LocalStream, records: &[&Record]) -> (SequenceNumberRange, u64) {
    let bytes = records
        .iter()
        .map(|r| r.partition_key.len() + r.data.len())
        .sum::<usize>();
    let range = SequenceNumberRange {
        stream: Arc::from(stream.name()),
        shard_id: Arc::clone(&records[0].shard_id),
        from: records[0].position.clone(),
        to: records[records.len() - 1].position.clone(),
        record_count: records.len() as u64,
    };
    (range, bytes as u64)
}

/// Reads every shard from `TrimHorizon` to its tail; returns the elapsed time and the ranges read.
#[inline(never)] // a frame of its own in profiles
fn log_read_shards(stream: &LocalStream, corpus: &[u8], total: usize) -> BenchResult<(Duration, ReadRanges)> {
    let start = Instant::now();
    let mut all: Vec<Vec<Record>> = Vec::new();
    let mut pages_per_shard = Vec::new();
    for shard in stream.list_shards()? {
        let mut reader = stream.open_reader(&shard.shard_id, &StartingPosition::TrimHorizon)?;
        let first_page = all.len();
        loop {
            let batch = reader.read(READ_PAGE)?;
            if batch.records.is_empty() {
                break;
            }
            all.push(batch.records);
        }
        pages_per_shard.push(first_page..all.len());
    }
    let elapsed = start.elapsed();
    check_payloads(all.iter().flatten().map(|r| &r.data[..]), corpus, total, "read shard");
    let mut ranges = ReadRanges {
        shards: Vec::new(),
        blocks: Vec::new(),
    };
    // Blocks as the block generator cuts them: at most `max_block_bytes` each.
    let max_block_bytes = env_usize("SLUICE_BENCH_BLOCK_BYTES", ReceiverConfig::DEFAULT_MAX_BLOCK_BYTES);
    for pages in pages_per_shard.into_iter().filter(|pages| !pages.is_empty()) {
        let records: Vec<&Record> = all[pages].iter().flatten().collect();
        ranges.shards.push(range_of(stream, &records));
        let mut first = 0;
        let mut bytes = 0;
        for (i, record) in records.iter().enumerate() {
            let size = record.partition_key.len() + record.data.len();
            if bytes + size > max_block_bytes && i > first {
                ranges.blocks.push(range_of(stream, &records[first..i]));
                (first, bytes) = (i, 0);
            }
            bytes += size;
        }
        ranges.blocks.push(range_of(stream, &records[first..]));
    }
    Ok((elapsed, ranges))
}

/// Replays each shard's whole range.
#[inline(never)] // a frame of its own in profiles
fn log_replay(
    stream: &LocalStream,
    ranges: &[(SequenceNumberRange, u64)],
    corpus: &[u8],
    total: usize,
) -> BenchResult<Duration> {
    let ranges = SequenceNumberRanges::from(ranges.iter().map(|(range, _)| range.clone()).collect::<Vec<_>>());
    let start = Instant::now();
    let records = stream.replay(&ranges)?;
    let elapsed = start.elapsed();
    check_payloads(records.iter().map(|r| &r.data[..]), corpus, total, "replay");
    Ok(elapsed)
}

/// Rebuilds every block of `blocks` (the blocks a receiver would have cut), the way a lost block
/// is rebuilt (`Replay::replay_block`: frames decoded straight into the block's columns).
#[inline(never)] // a frame of its own in profiles
fn log_replay_block(
    stream: &LocalStream,
    ranges: &[(SequenceNumberRange, u64)],
    corpus: &[u8],
    total: usize,
) -> BenchResult<Duration> {
    let mut elapsed = Duration::ZERO;
    let mut blocks = Vec::new();
    for (seq, (range, num_bytes)) in ranges.iter().enumerate() {
        let id = BlockId {
            input_id: 0,
            run_id: 0,
            seq: seq as u64,
        };
        // The lost block's meta, as the block reader has it: its byte count sizes the columns.
        let meta = BlockMeta {
            id,
            ranges: SequenceNumberRanges::from(range.clone()),
            num_records: range.record_count,
            num_bytes: *num_bytes,
        };
        let start = Instant::now();
        let block = stream.replay_block(&meta)?;
        elapsed += start.elapsed();
        blocks.push(block);
    }
    check_payloads(
        blocks.iter().flat_map(|b| b.data().iter().flatten()),
        corpus,
        total,
        "replay block",
    );
    Ok(elapsed)
}

fn median(mut times: Vec<Duration>) -> Duration {
    times.sort();
    times[times.len() / 2]
}

struct Row {
    name: String,
    baseline: &'static str,
    base: Vec<Duration>,
    log: Vec<Duration>,
    bytes: usize,
    aim: f64,
}

fn print_rows(title: &str, rows: &[Row]) {
    let mib_s = |bytes: usize, d: Duration| bytes as f64 / 1_048_576.0 / d.as_secs_f64();
    println!("\n{title}");
    println!(
        "{:<52} {:<16} {:>10} {:>10} {:>7} {:>5}  ratios of each run",
        "case", "baseline", "base MiB/s", "log MiB/s", "ratio", "aim"
    );
    for row in rows {
        let (base, log) = (median(row.base.clone()), median(row.log.clone()));
        let runs: Vec<String> = row
            .base
            .iter()
            .zip(&row.log)
            .map(|(b, l)| format!("{:.2}", b.as_secs_f64() / l.as_secs_f64()))
            .collect();
        println!(
            "{:<52} {:<16} {:>10.0} {:>10.0} {:>6.2}x {:>4.2}x  {}",
            row.name,
            row.baseline,
            mib_s(row.bytes, base),
            mib_s(row.bytes, log),
            base.as_secs_f64() / log.as_secs_f64(),
            row.aim,
            runs.join(" ")
        );
    }
}

fn log_section(dir: &Path, records: usize, repeats: usize) -> BenchResult {
    let corpus = corpus(records);
    let raw_path = dir.join("raw.bin");
    let mut rows = Vec::new();
    let shards_only = std::env::var("SLUICE_BENCH_SHARDS")
        .ok()
        .and_then(|v| v.parse::<u32>().ok());
    let shapes = SHAPES.into_iter().filter(|s| shards_only.is_none_or(|n| n == s.shards));
    let api_only = std::env::var("SLUICE_BENCH_API").ok();
    let apis = [
        (Api::Put, "put"),
        (Api::Append, "append"),
        (Api::AppendHashed, "append-hashed"),
    ]
    .into_iter()
    .filter(|(_, name)| api_only.as_deref().is_none_or(|only| only == *name))
    .map(|(api, _)| api)
    .collect::<Vec<_>>();
    let cases = shapes.flat_map(|shape| apis.iter().map(move |api| (shape, *api)));
    for (shape, api) in cases.filter(|(shape, api)| *api != Api::AppendHashed || shape.shards > 1) {
        // The log an `AppendHashed` run writes is the one `Append` writes: only its writing is
        // measured.
        let reads = api != Api::AppendHashed;
        let mut raw_w = Vec::new();
        let mut raw_r = Vec::new();
        let mut append = Vec::new();
        let mut read = Vec::new();
        let mut replay = Vec::new();
        let mut replay_block = Vec::new();
        for run in 0..repeats {
            let log_dir = dir.join(format!("log-{run}"));
            raw_w.push(raw_write(&raw_path, &corpus)?);
            let stream = LocalLog::open(&log_dir)?.create_stream("bench", shape.shards)?;
            append.push(log_append(&stream, &corpus, records, shape, api)?);
            if reads {
                raw_r.push(raw_read(&raw_path, &corpus)?);
                let (elapsed, ranges) = log_read_shards(&stream, &corpus, records)?;
                read.push(elapsed);
                replay.push(log_replay(&stream, &ranges.shards, &corpus, records)?);
                replay_block.push(log_replay_block(&stream, &ranges.blocks, &corpus, records)?);
            } else {
                // Still checked: every record back exactly once.
                log_read_shards(&stream, &corpus, records)?;
            }
            std::fs::remove_dir_all(&log_dir)?;
        }
        let bytes = records * RECORD_BYTES;
        let (written_by, shape) = match api {
            Api::Put => ("put", shape.name.to_owned()),
            Api::Append => ("append", format!("{}, appended", shape.name)),
            Api::AppendHashed => ("hash_keys + append", format!("{}, appended", shape.name)),
        };
        rows.push(Row {
            name: format!("{written_by} + flush ({shape})"),
            baseline: "write + fsync",
            base: raw_w.clone(),
            log: append,
            bytes,
            aim: 0.5,
        });
        if !reads {
            continue;
        }
        rows.push(Row {
            name: format!("read shards ({shape})"),
            baseline: "read 1 MiB bufs",
            base: raw_r.clone(),
            log: read,
            bytes,
            aim: 0.5,
        });
        rows.push(Row {
            name: format!("replay ranges ({shape})"),
            baseline: "read 1 MiB bufs",
            base: raw_r.clone(),
            log: replay,
            bytes,
            aim: 0.5,
        });
        rows.push(Row {
            name: format!("replay into a block ({shape})"),
            baseline: "read 1 MiB bufs",
            base: raw_r,
            log: replay_block,
            bytes,
            aim: 0.5,
        });
    }
    if rows.is_empty() {
        println!("\nlocal log: no case to run (`append-hashed` runs with two shards only)");
        return Ok(());
    }
    print_rows(
        &format!(
            "local log vs raw file I/O: {records} records of {RECORD_BYTES} B ({:.1} MiB payload), median of {repeats}",
            (records * RECORD_BYTES) as f64 / 1_048_576.0
        ),
        &rows,
    );
    Ok(())
}

/// The loop of `examples/word_count.rs`'s `load`, over one file.
#[inline(never)] // a frame of its own in profiles
fn example_load(stream: &LocalStream, file: &Path) -> BenchResult {
    use std::fmt::Write as _;
    let mut producer = stream.producer()?;
    let mut reader = std::io::BufReader::new(File::open(file)?);
    let (mut line, mut key) = (Vec::new(), String::new());
    let mut n: u64 = 0;
    while reader.read_until(b'\n', &mut line)? > 0 {
        if line.last() == Some(&b'\n') {
            line.pop();
        }
        n += 1;
        key.clear();
        write!(key, "{n}")?;
        producer.append(&key, Some(spread_hash_key(n)), &line)?;
        line.clear();
    }
    producer.flush()?;
    Ok(())
}

fn load_section(dir: &Path, records: usize, repeats: usize) -> BenchResult {
    let corpus = corpus(records);
    let mut text = Vec::with_capacity(records * (RECORD_BYTES + 1));
    for i in 0..records {
        text.extend_from_slice(record_payload(&corpus, i));
        text.push(b'\n');
    }
    let input = dir.join("input.txt");
    std::fs::write(&input, &text)?;
    let raw_path = dir.join("raw.txt");
    let mut raw = Vec::new();
    let mut cli_put = Vec::new();
    let mut example = Vec::new();
    for run in 0..repeats {
        raw.push(raw_write(&raw_path, &text)?);

        let log_dir = dir.join(format!("cli-{run}"));
        let stream = LocalLog::open(&log_dir)?.create_stream("lines", 2)?;
        let start = Instant::now();
        // As `sluice log put --dir D --stream lines FILE` calls it.
        let reader = std::io::BufReader::new(File::open(&input)?);
        cli::put(&log_dir, "lines", reader, cli::KeyMode::Counter)?;
        cli_put.push(start.elapsed());
        log_read_shards(&stream, &corpus, records)?;
        std::fs::remove_dir_all(&log_dir)?;

        let log_dir = dir.join(format!("example-{run}"));
        let stream = LocalLog::open(&log_dir)?.create_stream("lines", 2)?;
        let start = Instant::now();
        example_load(&stream, &input)?;
        example.push(start.elapsed());
        log_read_shards(&stream, &corpus, records)?;
        std::fs::remove_dir_all(&log_dir)?;
    }
    let rows = [
        Row {
            name: "sluice log put FILE (2 shards)".into(),
            baseline: "write + fsync",
            base: raw.clone(),
            log: cli_put,
            bytes: text.len(),
            aim: 0.5,
        },
        Row {
            name: "word_count example load (2 shards)".into(),
            baseline: "write + fsync",
            base: raw,
            log: example,
            bytes: text.len(),
            aim: 0.5,
        },
    ];
    print_rows(
        &format!(
            "loading a text file vs raw write of its bytes: {records} lines, {:.1} MiB, median of {repeats}",
            text.len() as f64 / 1_048_576.0
        ),
        &rows,
    );
    Ok(())
}

fn main() -> BenchResult {
    let bench = std::env::args().any(|a| a == "--bench");
    let records = env_usize(
        "SLUICE_BENCH_RECORDS",
        if bench { BENCH_RECORDS } else { SMOKE_RECORDS },
    );
    let repeats = env_usize("SLUICE_BENCH_REPEATS", if bench { BENCH_REPEATS } else { 1 }).max(1);
    let only = std::env::var("SLUICE_BENCH_ONLY").unwrap_or_default();
    // In the target directory, not in /tmp (often a RAM disk, which would flatter fsync).
    let dir = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR"))?;
    if only.is_empty() || only == "log" {
        log_section(dir.path(), records, repeats)?;
    }
    if only.is_empty() || only == "load" {
        load_section(dir.path(), records, repeats)?;
    }
    Ok(())
}
