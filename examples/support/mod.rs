//! What the examples share: loading the local log, the word-count pipeline, the run loop.
#![allow(dead_code)] // each example uses a subset

use std::backtrace::BacktraceStatus;
use std::fmt;
use std::fmt::Write as _;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use md5::{Digest, Md5};
use serde::{Deserialize, Serialize};
use sluice::engine::{BatchInfo, DStream, StopMode, StreamingContext};
use sluice::operators::ByteKey;
use sluice::receiver::local_log::{LocalLog, spread_hash_key};

/// Logs to stderr, `warn` and above unless `RUST_LOG` says otherwise.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
}

/// Runs an example's `main` body and turns its error into what a person reads: `error: ` and the
/// chain of causes on stderr (`{:#}`), exit code 1. A backtrace is printed only when
/// `RUST_BACKTRACE` (or `RUST_LIB_BACKTRACE`) asks for one — anyhow captures one only then —
/// instead of `main` returning the error, whose `Debug` form would be printed.
pub fn report(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            if e.backtrace().status() == BacktraceStatus::Captured {
                eprintln!("\nbacktrace:\n{}", e.backtrace());
            }
            ExitCode::FAILURE
        }
    }
}

/// Written into the log directory once loading finished: what the log was loaded from.
const MANIFEST: &str = "input.json";
/// The empty marker earlier versions wrote instead, recording nothing about the input.
const LEGACY_MARKER: &str = "loaded";
/// What a data directory holds besides the log: all of it belongs to the loaded input
/// (`dead-letter` is the engine's default dead-letter location, `dead-letters` the one
/// `parse_events` names).
const DATA_SUBDIRS: [&str; 8] = [
    "log",
    "checkpoint",
    "blocks",
    "replica",
    "leases",
    "output",
    "dead-letter",
    "dead-letters",
];

/// What to load into an example's local log, and where.
pub struct LogLoad<'a> {
    /// The data directory (`--data-dir`); the log is `<data_dir>/log`.
    pub data_dir: &'a Path,
    /// The stream to create.
    pub stream: &'a str,
    /// Its shards.
    pub shards: u32,
    /// Files to load (`-` = stdin); none means the built-in input.
    pub files: &'a [PathBuf],
    /// The built-in input with its parameters, for messages ("the built-in corpus (…)").
    pub built_in: String,
    /// `--reset`: delete what the data directory holds and load again.
    pub reset: bool,
}

/// One input a log was loaded from: its name and its content's size and MD5.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputFingerprint {
    /// A path as given, `-` for stdin, or the built-in input's description.
    source: String,
    /// Bytes read (for the built-in input: its lines, each with a `\n`).
    bytes: u64,
    /// MD5 of those bytes, lower-case hex.
    md5: String,
}

impl fmt::Display for InputFingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let source = if self.source == "-" { "stdin" } else { &self.source };
        write!(f, "{source} ({} bytes, md5 {})", self.bytes, self.md5)
    }
}

/// What a data directory's log was loaded from (`<data_dir>/log/input.json`), written once
/// loading finished. Two loads are the same input when the stream layout and every input's
/// content (size and MD5, in order) are the same; names do not matter (a moved file resumes).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct LoadManifest {
    stream: String,
    shards: u32,
    inputs: Vec<InputFingerprint>,
    /// Records loaded.
    lines: u64,
}

impl LoadManifest {
    fn same_input(&self, stream: &str, shards: u32, inputs: &[InputFingerprint]) -> bool {
        self.stream == stream
            && self.shards == shards
            && self.inputs.len() == inputs.len()
            && self
                .inputs
                .iter()
                .zip(inputs)
                .all(|(a, b)| a.bytes == b.bytes && a.md5 == b.md5)
    }
}

/// Describes inputs and a layout for an error message.
fn describe(inputs: &[InputFingerprint], shards: u32) -> String {
    let inputs: Vec<String> = inputs.iter().map(ToString::to_string).collect();
    format!("{} in {shards} shard(s)", inputs.join(", "))
}

/// Why an example refuses to use its data directory.
#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    /// The directory was loaded from other input (or with another shard count) than this run
    /// asks for: using it would silently count the old data.
    #[error(
        "the data directory {data_dir} was loaded from {held},\n  but this run asks for {asked}.\n  \
         Its log, checkpoint and outputs belong to the old input: counting here would report the old data.\n  \
         Pass --data-dir <another directory> for this input, or --reset to delete what {data_dir} holds \
         (log, checkpoint, blocks, output, dead letters) and load this input there"
    )]
    InputChanged {
        /// The data directory.
        data_dir: String,
        /// What it holds.
        held: String,
        /// What this run asked for.
        asked: String,
    },
    /// The directory was loaded by an earlier version of the example, which recorded nothing
    /// about its input, so it cannot be told whether this run's input is the same.
    #[error(
        "the data directory {data_dir} was loaded by an earlier version of this example, which did not record \
         what it loaded, so it cannot be checked against this run's input.\n  Pass --reset to delete what it \
         holds and load again, or --data-dir <another directory>"
    )]
    InputUnknown {
        /// The data directory.
        data_dir: String,
    },
    /// `<data_dir>/log/input.json` cannot be read or parsed.
    #[error(
        "cannot read {path}, the record of what the data directory was loaded from: {reason}.\n  \
         Pass --reset to delete what the data directory holds and load again, or --data-dir <another directory>"
    )]
    ManifestUnreadable {
        /// The manifest's path.
        path: String,
        /// What is wrong with it.
        reason: String,
    },
}

/// The size and MD5 of an input's bytes, as they are read.
#[derive(Default)]
struct ContentHash {
    md5: Md5,
    bytes: u64,
}

impl ContentHash {
    fn update(&mut self, data: &[u8]) {
        self.md5.update(data);
        self.bytes += data.len() as u64;
    }

    fn finish(self, source: String) -> InputFingerprint {
        InputFingerprint {
            source,
            bytes: self.bytes,
            md5: format!("{:x}", self.md5.finalize()),
        }
    }
}

/// A reader that hashes what passes through it.
struct Hashing<R> {
    inner: R,
    hash: ContentHash,
}

impl<R: Read> Read for Hashing<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hash.update(&buf[..n]);
        Ok(n)
    }
}

impl<R> Hashing<R> {
    fn new(inner: R) -> Self {
        Self {
            inner,
            hash: ContentHash::default(),
        }
    }
}

/// Opens `file` (`-` = stdin) for reading.
fn open_input(file: &Path) -> anyhow::Result<Box<dyn Read>> {
    if file.as_os_str() == "-" {
        return Ok(Box::new(std::io::stdin().lock()));
    }
    let opened = std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
    Ok(Box::new(opened))
}

/// The built-in input's lines as one stream of bytes, each line ended by `\n`.
fn corpus_fingerprint(description: &str, lines: &[String]) -> InputFingerprint {
    let mut hash = ContentHash::default();
    for line in lines {
        hash.update(line.as_bytes());
        hash.update(b"\n");
    }
    hash.finish(description.to_owned())
}

/// Fingerprints `files` without loading them (stdin is read to its end).
fn fingerprint_files(files: &[PathBuf]) -> anyhow::Result<Vec<InputFingerprint>> {
    files
        .iter()
        .map(|file| {
            let mut hashing = Hashing::new(open_input(file)?);
            std::io::copy(&mut hashing, &mut std::io::sink())
                .with_context(|| format!("cannot read {}", file.display()))?;
            Ok(hashing.hash.finish(file.display().to_string()))
        })
        .collect()
}

/// Deletes what `data_dir` holds for a loaded input; returns whether anything was there.
fn clear_data_dir(data_dir: &Path) -> anyhow::Result<bool> {
    let mut found = false;
    for sub in DATA_SUBDIRS {
        let p = data_dir.join(sub);
        if p.exists() {
            found = true;
            std::fs::remove_dir_all(&p).with_context(|| format!("cannot delete {}", p.display()))?;
        }
    }
    Ok(found)
}

/// Fills the local log under `<data_dir>/log` once, with the lines of `files` (`-` = stdin) or,
/// when none are given, `corpus()`, and returns the log directory. Lines are bytes, not
/// necessarily UTF-8; a trailing `\r` is dropped.
///
/// The data directory remembers what it was loaded from (`log/input.json`: each input's name,
/// size and MD5, the stream and its shards). A later run with the same input resumes where the
/// last one stopped — that is how a killed run recovers; a run with other input (other files,
/// other contents, another built-in size, another shard count) is refused with
/// [`DataDirError::InputChanged`] rather than silently counting the old log again, unless
/// `reset` deletes the old data first. A run with `-` on a loaded directory reads stdin to its
/// end to compare it. A load that was killed starts over: nothing has been consumed yet, since
/// the stream starts only after loading.
///
/// # Errors
/// [`DataDirError`] as above; an input that cannot be opened or read (naming the file and, while
/// loading, the line); a local-log error.
pub fn load_once(load: &LogLoad<'_>, corpus: impl FnOnce() -> Vec<String>) -> anyhow::Result<PathBuf> {
    let data_dir = load.data_dir;
    let log_dir = data_dir.join("log");
    let manifest_path = log_dir.join(MANIFEST);
    if load.reset {
        if clear_data_dir(data_dir)? {
            eprintln!(
                "--reset: deleted the log, checkpoint, blocks, output and dead letters in {}",
                data_dir.display()
            );
        }
    } else if manifest_path.exists() {
        resume_or_refuse(load, &manifest_path, corpus)?;
        return Ok(log_dir);
    } else if log_dir.join(LEGACY_MARKER).exists() {
        return Err(DataDirError::InputUnknown {
            data_dir: data_dir.display().to_string(),
        }
        .into());
    } else if clear_data_dir(data_dir)? {
        eprintln!(
            "an earlier load into {} did not finish; starting it over",
            log_dir.display()
        );
    }

    let manifest = fill_log(&log_dir, load, corpus)?;
    // Written whole and synced under another name, then renamed: a kill never leaves half a
    // manifest, and a manifest is never there without the log it describes.
    let partial = log_dir.join(format!("{MANIFEST}.partial"));
    let write_partial = || -> std::io::Result<()> {
        let mut file = std::fs::File::create(&partial)?;
        file.write_all(&serde_json::to_vec_pretty(&manifest)?)?;
        file.sync_all()
    };
    write_partial().with_context(|| format!("cannot write {}", partial.display()))?;
    std::fs::rename(&partial, &manifest_path).with_context(|| format!("cannot write {}", manifest_path.display()))?;
    eprintln!(
        "loaded {} lines from {} into {}",
        manifest.lines,
        describe(&manifest.inputs, manifest.shards),
        log_dir.display()
    );
    Ok(log_dir)
}

/// The latest top words with their totals, updated after every batch.
pub type TopWords = Arc<Mutex<Vec<(ByteKey, u64)>>>;

/// Splits a line into words (ASCII whitespace), borrowed from the line.
pub fn words(line: &[u8]) -> impl Iterator<Item = &[u8]> {
    line.split(u8::is_ascii_whitespace).filter(|word| !word.is_empty())
}

/// Word count over `lines`: per-batch counts as Parquet under `output` (a path or a URL; the
/// `key` column is `Binary`, the word's bytes as they were), totals with `update_state_by_key`,
/// a progress line per batch. Returns the latest top `top` words.
pub fn count_words(
    ctx: &StreamingContext,
    lines: &DStream<Bytes>,
    output: &str,
    top: usize,
) -> anyhow::Result<TopWords> {
    // Words are looked up as slices of their line and copied once per task when new: no
    // allocation or reference count per word, and no key keeps its block in memory.
    let counts = lines.flat_map_count_by_value(|line: &Bytes, emit| words(line).for_each(emit));
    counts.save_parquet(output)?;
    let totals = counts.update_state_by_key(|_word: &ByteKey, new: Vec<u64>, old: Option<u64>| {
        Some(old.unwrap_or(0) + new.iter().sum::<u64>())
    });
    let latest_top: TopWords = Arc::default();
    let keep = latest_top.clone();
    totals.foreach_batch(move |_time, mut all| {
        all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(top);
        *keep.lock().expect("top words") = all;
        Ok(())
    })?;
    ctx.add_batch_listener(|info: &BatchInfo| {
        println!(
            "batch {:>14} | {:>8} records | processing {:>5} ms | scheduling delay {:>5} ms{}",
            info.batch_time.as_millis(),
            info.num_records,
            info.processing_delay_ms,
            info.scheduling_delay_ms,
            if info.adopted {
                " | adopted from a dead worker"
            } else {
                ""
            }
        );
    });
    Ok(latest_top)
}

/// Says where the status page and the metrics are served, when `--metrics-addr` is set.
pub fn print_monitor_urls(ctx: &StreamingContext) {
    if let Some(addr) = ctx.metrics_addr() {
        eprintln!("status page: http://{addr}/  metrics: http://{addr}/metrics  status JSON: http://{addr}/api/status");
    }
}

/// Starts `ctx`; with `follow` runs until stopped, else until the input is drained (then a
/// graceful stop and the top words).
pub fn run(
    ctx: &StreamingContext,
    follow: bool,
    timeout: Duration,
    latest_top: &Mutex<Vec<(ByteKey, u64)>>,
) -> anyhow::Result<()> {
    let started = std::time::Instant::now();
    ctx.start()?;
    print_monitor_urls(ctx);
    if follow {
        ctx.await_termination()?;
        return Ok(());
    }
    let drained = ctx.await_drained(timeout)?;
    let elapsed = started.elapsed();
    ctx.stop(StopMode::Graceful)?;
    if !drained {
        bail!("the input was not drained within {timeout:?}");
    }
    let m = ctx.metrics();
    let top = latest_top.lock().expect("top words");
    println!("\n{}", summary_line(m.records_processed, m.batches_completed, elapsed));
    println!("top {} words in total:", top.len());
    for (word, count) in top.iter() {
        println!("{count:>10}  {word}");
    }
    Ok(())
}

/// The line a finished run ends with: how much, how long, how fast (from start to drained), as
/// in `processed 2000000 records in 12 batches in 4.00 s: 500000 records/s`.
fn summary_line(records: u64, batches: u64, elapsed: Duration) -> String {
    let seconds = elapsed.as_secs_f64();
    let rate = if seconds > 0.0 { records as f64 / seconds } else { 0.0 };
    format!("processed {records} records in {batches} batches in {seconds:.2} s: {rate:.0} records/s")
}

/// Compares the input this run asks for with what `manifest_path` says the data directory holds:
/// `Ok` to resume, else [`DataDirError::InputChanged`].
fn resume_or_refuse(
    load: &LogLoad<'_>,
    manifest_path: &Path,
    corpus: impl FnOnce() -> Vec<String>,
) -> anyhow::Result<()> {
    let unreadable = |reason: String| DataDirError::ManifestUnreadable {
        path: manifest_path.display().to_string(),
        reason,
    };
    let text = std::fs::read(manifest_path).map_err(|e| unreadable(e.to_string()))?;
    let held: LoadManifest = serde_json::from_slice(&text).map_err(|e| unreadable(e.to_string()))?;
    let asked = if load.files.is_empty() {
        vec![corpus_fingerprint(&load.built_in, &corpus())]
    } else {
        fingerprint_files(load.files)?
    };
    if !held.same_input(load.stream, load.shards, &asked) {
        return Err(DataDirError::InputChanged {
            data_dir: load.data_dir.display().to_string(),
            held: describe(&held.inputs, held.shards),
            asked: describe(&asked, load.shards),
        }
        .into());
    }
    eprintln!(
        "resuming: {} already holds {}",
        load.data_dir.display(),
        describe(&held.inputs, held.shards)
    );
    Ok(())
}

/// Creates the stream in a new log at `log_dir` and appends every line of the input to it.
fn fill_log(log_dir: &Path, load: &LogLoad<'_>, corpus: impl FnOnce() -> Vec<String>) -> anyhow::Result<LoadManifest> {
    let log = LocalLog::open(log_dir).context("open local log")?;
    let stream = log.create_stream(load.stream, load.shards).context("create stream")?;
    let mut producer = stream.producer().context("open producer")?;
    // One key buffer for every line, and the line's bytes straight from the caller's buffer: the
    // producer copies them into its frame anyway. The key is the line's number; an explicit hash
    // key spread from it picks the shard (no MD5 per line), and no position is returned.
    let mut n: u64 = 0;
    let mut key = String::new();
    let mut put = |line: &[u8]| -> anyhow::Result<()> {
        n += 1;
        key.clear();
        write!(key, "{n}")?;
        producer.append(&key, Some(spread_hash_key(n)), line)?;
        Ok(())
    };
    let mut inputs = Vec::new();
    if load.files.is_empty() {
        let lines = corpus();
        for (i, line) in lines.iter().enumerate() {
            put(line.as_bytes()).with_context(|| format!("cannot append line {} of the built-in input", i + 1))?;
        }
        inputs.push(corpus_fingerprint(&load.built_in, &lines));
    } else {
        for file in load.files {
            let mut reader = BufReader::new(Hashing::new(open_input(file)?));
            let mut line = Vec::new();
            for number in 1u64.. {
                line.clear();
                let read = reader
                    .read_until(b'\n', &mut line)
                    .with_context(|| format!("cannot read {} at line {number}", file.display()))?;
                if read == 0 {
                    break;
                }
                if line.last() == Some(&b'\n') {
                    line.pop();
                }
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                put(&line).with_context(|| format!("cannot append line {number} of {}", file.display()))?;
            }
            inputs.push(reader.into_inner().hash.finish(file.display().to_string()));
        }
    }
    producer.flush()?;
    Ok(LoadManifest {
        stream: load.stream.to_owned(),
        shards: load.shards,
        inputs,
        lines: n,
    })
}
