//! Word count over the embedded local log — the main example.
//!
//! ```sh
//! cargo run --release --example word_count            # built-in corpus, exits when drained
//! cargo run --release --example word_count -- a.txt - # files and stdin instead
//! cargo run --release --example word_count -- --follow
//! ```
//!
//! It creates a local log under the data directory (default `.sluice-data/word-count`), fills it
//! once with a deterministic corpus (or the given files), counts words per batch (written as
//! Parquet, one directory per batch) and in total (`update_state_by_key`), prints a progress line
//! per batch and the top words, and exits 0 once everything read has been processed.
//!
//! Kill it at any moment and start it again: it recovers from its checkpoint, re-runs the batch
//! that was in flight with exactly the same blocks, and resumes reading where its metadata log
//! says — the Parquet output summed over batches and the totals stay exact.

mod support;

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Parser;
use sluice::engine::StreamingContext;
use sluice::operators::bench_data;
use sluice::receiver::ReceiverConfig;
use sluice::receiver::local_log::LocalLog;

/// Count words in a stream of lines, exactly once, across crashes.
#[derive(Debug, Parser)]
struct Args {
    /// Text files to load into the log (`-` = stdin). Default: a built-in corpus.
    files: Vec<PathBuf>,
    /// Data directory (log, block store, checkpoint, output).
    #[arg(long, default_value = ".sluice-data/word-count")]
    data_dir: PathBuf,
    /// Batch interval in milliseconds.
    #[arg(long, default_value_t = 500)]
    batch_ms: u64,
    /// Block interval in milliseconds.
    #[arg(long, default_value_t = 100)]
    block_ms: u64,
    /// Executor threads (default: all cores).
    #[arg(long)]
    threads: Option<usize>,
    /// Lines of the built-in corpus.
    #[arg(long, default_value_t = 200_000)]
    corpus_lines: usize,
    /// Shards of the local log.
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// Keep running after the log is drained (new lines appended by `sluice log put` are counted).
    #[arg(long)]
    follow: bool,
    /// Words to show at the end.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Give up waiting for the log to drain after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
}

const STREAM: &str = "lines";
const LOADED_MARKER: &str = "loaded";

/// Fills the log once. The marker makes a killed load start over (nothing has been consumed yet:
/// the stream starts only after loading).
fn load(args: &Args, log_dir: &Path) -> anyhow::Result<()> {
    if log_dir.join(LOADED_MARKER).exists() {
        return Ok(());
    }
    for sub in ["log", "checkpoint", "blocks", "replica", "leases", "output"] {
        let p = args.data_dir.join(sub);
        if p.exists() {
            std::fs::remove_dir_all(&p).with_context(|| format!("cannot reset {}", p.display()))?;
        }
    }
    let log = LocalLog::open(log_dir).context("open local log")?;
    let stream = log.create_stream(STREAM, args.shards).context("create stream")?;
    let mut producer = stream.producer().context("open producer")?;
    let mut n: u64 = 0;
    {
        let mut put = |line: &str| -> anyhow::Result<()> {
            n += 1;
            producer.put(&n.to_string(), Bytes::copy_from_slice(line.as_bytes()))?;
            Ok(())
        };
        if args.files.is_empty() {
            for line in bench_data::zipf_lines(args.corpus_lines, 50_000, 42) {
                put(&line)?;
            }
        } else {
            for file in &args.files {
                let reader: Box<dyn BufRead> = if file.as_os_str() == "-" {
                    Box::new(std::io::stdin().lock())
                } else {
                    Box::new(std::io::BufReader::new(
                        std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?,
                    ))
                };
                for line in reader.lines() {
                    put(&line?)?;
                }
            }
        }
    }
    producer.flush()?;
    std::fs::write(log_dir.join(LOADED_MARKER), b"")?;
    eprintln!("loaded {n} lines into {}", log_dir.display());
    Ok(())
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()))
        .with_writer(std::io::stderr)
        .init();
    let args = Args::parse();
    if args.batch_ms == 0 || args.block_ms == 0 {
        bail!("--batch-ms and --block-ms must be at least 1");
    }
    let log_dir = args.data_dir.join("log");
    load(&args, &log_dir)?;

    let mut builder = StreamingContext::builder()
        .batch_interval(Duration::from_millis(args.batch_ms))
        .data_dir(&args.data_dir);
    if let Some(threads) = args.threads {
        builder = builder.executor_threads(threads);
    }
    let ctx = builder.build()?;
    let config = ReceiverConfig {
        block_interval_ms: args.block_ms,
        ..ReceiverConfig::default()
    };
    let lines = ctx.local_log_stream(&log_dir, STREAM, config)?;

    let output = args.data_dir.join("output").display().to_string();
    let latest_top = support::count_words(&ctx, &lines, &output, args.top)?;
    support::run(&ctx, args.follow, Duration::from_secs(args.timeout_s), &latest_top)
}
