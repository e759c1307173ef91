//! What the examples share: loading the local log, the word-count pipeline, the run loop.
#![allow(dead_code)] // each example uses a subset

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use sluice::engine::{BatchInfo, DStream, StreamingContext};
use sluice::receiver::local_log::LocalLog;

/// Logs to stderr, `warn` and above unless `RUST_LOG` says otherwise.
pub fn init_tracing() {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
}

/// Written into the log directory once loading finished.
const LOADED_MARKER: &str = "loaded";

/// Fills the local log under `<data_dir>/log` once, with the lines of `files` (`-` = stdin) or,
/// when none are given, `corpus()`; returns the log directory. A load that was killed starts
/// over (nothing has been consumed: the stream starts only after loading). Lines are bytes, not
/// necessarily UTF-8; a trailing `\r` is dropped.
pub fn load_once(
    data_dir: &Path,
    stream: &str,
    shards: u32,
    files: &[PathBuf],
    corpus: impl FnOnce() -> Vec<String>,
) -> anyhow::Result<PathBuf> {
    let log_dir = data_dir.join("log");
    if log_dir.join(LOADED_MARKER).exists() {
        return Ok(log_dir);
    }
    for sub in [
        "log",
        "checkpoint",
        "blocks",
        "replica",
        "leases",
        "output",
        "dead-letters",
    ] {
        let p = data_dir.join(sub);
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("cannot reset {}", p.display()))?;
        }
    }
    let log = LocalLog::open(&log_dir).context("open local log")?;
    let stream = log.create_stream(stream, shards).context("create stream")?;
    let mut producer = stream.producer().context("open producer")?;
    let mut n: u64 = 0;
    let mut put = |line: &[u8]| -> anyhow::Result<()> {
        n += 1;
        producer.put(&n.to_string(), Bytes::copy_from_slice(line))?;
        Ok(())
    };
    if files.is_empty() {
        for line in corpus() {
            put(line.as_bytes())?;
        }
    } else {
        for file in files {
            let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
                Box::new(std::io::stdin().lock())
            } else {
                Box::new(std::io::BufReader::new(
                    std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
                ))
            };
            for (i, line) in reader.split(b'\n').enumerate() {
                let mut line = line.with_context(|| format!("cannot read {} at line {}", file.display(), i + 1))?;
                if line.last() == Some(&b'\r') {
                    line.pop();
                }
                put(&line)?;
            }
        }
    }
    producer.flush()?;
    std::fs::write(log_dir.join(LOADED_MARKER), b"")?;
    eprintln!("loaded {n} lines into {}", log_dir.display());
    Ok(log_dir)
}

/// The latest top words with their totals, updated after every batch.
pub type TopWords = Arc<Mutex<Vec<(String, u64)>>>;

/// Splits a line into words (ASCII whitespace), as zero-copy slices of the line.
#[allow(clippy::needless_pass_by_value)] // `flat_map` hands each line over by value
pub fn words(line: Bytes) -> impl Iterator<Item = Bytes> {
    let mut start = 0;
    let mut out = Vec::new();
    for (i, b) in line.iter().enumerate() {
        if b.is_ascii_whitespace() {
            if i > start {
                out.push(line.slice(start..i));
            }
            start = i + 1;
        }
    }
    if line.len() > start {
        out.push(line.slice(start..));
    }
    out.into_iter()
}

/// Word count over `lines`: per-batch counts as Parquet under `output` (a path or a URL), totals
/// with `update_state_by_key`, a progress line per batch. Returns the latest top `top` words.
pub fn count_words(
    ctx: &StreamingContext,
    lines: &DStream<Bytes>,
    output: &str,
    top: usize,
) -> anyhow::Result<TopWords> {
    let counts = lines
        .flat_map(words)
        .count_by_value()
        .map(|(w, c)| (String::from_utf8_lossy(&w).into_owned(), c));
    counts.save_parquet(output)?;
    let totals = counts.update_state_by_key(|_word: &String, new: Vec<u64>, old: Option<u64>| {
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
            info.batch_time_ms,
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

/// Starts `ctx`; with `follow` runs until stopped, else until the input is drained (then a
/// graceful stop and the top words).
pub fn run(
    ctx: &StreamingContext,
    follow: bool,
    timeout: Duration,
    latest_top: &Mutex<Vec<(String, u64)>>,
) -> anyhow::Result<()> {
    ctx.start()?;
    if follow {
        ctx.await_termination()?;
        return Ok(());
    }
    let drained = ctx.await_drained(timeout)?;
    ctx.stop(true)?;
    if !drained {
        bail!("the input was not drained within {timeout:?}");
    }
    let m = ctx.metrics();
    let top = latest_top.lock().expect("top words");
    println!(
        "\nprocessed {} records in {} batches; top {} words in total:",
        m.records_processed,
        m.batches_completed,
        top.len()
    );
    for (word, count) in top.iter() {
        println!("{count:>10}  {word}");
    }
    Ok(())
}
