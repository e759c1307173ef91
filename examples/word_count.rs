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
//!
//! The data directory remembers what it was loaded from. Run again with the same input, it
//! resumes; with other input (other files, changed files, another `--corpus-lines` or
//! `--shards`) it refuses and says to pass a new `--data-dir` or `--reset`, instead of counting
//! the old log again. Words are bytes: a line that is not UTF-8 is counted like any other, and a
//! Latin-1 word is its own word (the Parquet `key` column is `Binary`).

mod support;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::bail;
use clap::Parser;
use sluice::engine::StreamingContext;
use sluice::operators::bench_data;
use sluice::receiver::ReceiverConfig;

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
    /// Delete what the data directory holds (log, checkpoint, output) and load the input again.
    /// Without it, a data directory loaded from other input is refused.
    #[arg(long)]
    reset: bool,
    /// Serve Prometheus metrics (`/metrics`) and a status page (`/`) on this address while
    /// running, e.g. 127.0.0.1:9898 (port 0 picks a free port; the URL is printed).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
}

const STREAM: &str = "lines";

/// Words in the built-in corpus's vocabulary.
const VOCABULARY: usize = 50_000;
/// The built-in corpus's seed.
const SEED: u64 = 42;

fn main() -> ExitCode {
    support::init_tracing();
    support::report(run(&Args::parse()))
}

fn run(args: &Args) -> anyhow::Result<()> {
    if args.batch_ms == 0 || args.block_ms == 0 {
        bail!("--batch-ms and --block-ms must be at least 1");
    }
    let load = support::LogLoad {
        data_dir: &args.data_dir,
        stream: STREAM,
        shards: args.shards,
        files: &args.files,
        built_in: format!(
            "the built-in corpus (--corpus-lines {}, vocabulary {VOCABULARY}, seed {SEED})",
            args.corpus_lines
        ),
        reset: args.reset,
    };
    let log_dir = support::load_once(&load, || bench_data::zipf_lines(args.corpus_lines, VOCABULARY, SEED))?;

    let mut builder = StreamingContext::builder()
        .batch_interval(Duration::from_millis(args.batch_ms))
        .data_dir(&args.data_dir);
    if let Some(threads) = args.threads {
        builder = builder.executor_threads(threads);
    }
    if let Some(addr) = args.metrics_addr {
        builder = builder.metrics_addr(addr);
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
