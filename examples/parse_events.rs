//! Bad records as values: parse an event log that has malformed lines, send those to the
//! dead-letter sink, aggregate the good ones in four keyed stages, and read the dead letters back.
//!
//! ```sh
//! cargo run --release --example parse_events               # built-in sample with bad lines
//! cargo run --release --example parse_events -- events.csv # your own "<user>,<kind>,<amount>" lines
//! ```
//!
//! Each line is `<user>,<kind>,<amount>` with `kind` one of `click`, `view`, `buy`. Parsing is a
//! `try_map` returning `Result`: an `Err` (a missing field, an unknown kind, an amount that is not
//! a number, bytes that are not UTF-8) sends the line to the dead-letter Parquet sink under
//! `<data-dir>/dead-letters` with its shard, sequence number, partition key, payload and the error
//! — no panic, no partition evaluated twice. The parsed stream is `cache()`d: four keyed stages
//! read it (per-user amounts and per-kind counts per batch as Parquet under `<data-dir>/output/`,
//! per-kind amounts over the last three batches, per-user totals with `update_state_by_key`),
//! and each line is parsed once per batch.
//!
//! Kill it at any moment and start it again: the outputs and the dead letters stay exactly once
//! (a re-run batch replaces its files). Like `word_count`, the data directory remembers what it
//! was loaded from: other input is refused unless `--reset` (or a new `--data-dir`).

mod support;

use std::fmt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::bail;
use arrow_array::cast::AsArray;
use bytes::Bytes;
use clap::Parser;
use sluice::engine::{FailurePolicy, StopMode, StreamingContext, Window};
use sluice::operators::DeadLetterSink;
use sluice::receiver::ReceiverConfig;

/// Parse events with bad lines; aggregate the good ones, dead-letter the bad ones.
#[derive(Debug, Parser)]
struct Args {
    /// Event files to load into the log (`-` = stdin). Default: a built-in sample.
    files: Vec<PathBuf>,
    /// Data directory (log, block store, checkpoint, output, dead letters).
    #[arg(long, default_value = ".sluice-data/parse-events")]
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
    /// Events in the built-in sample.
    #[arg(long, default_value_t = 50_000)]
    sample_events: usize,
    /// Shards of the local log.
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// Records read per second at most (default: as fast as the pipeline keeps up).
    #[arg(long)]
    max_rate: Option<f64>,
    /// Dead letters to show at the end.
    #[arg(long, default_value_t = 5)]
    show: usize,
    /// Give up waiting for the log to drain after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Delete what the data directory holds (log, checkpoint, outputs, dead letters) and load
    /// the input again. Without it, a data directory loaded from other input is refused.
    #[arg(long)]
    reset: bool,
    /// Serve Prometheus metrics (`/metrics`) and a status page (`/`) on this address while
    /// running, e.g. 127.0.0.1:9898 (port 0 picks a free port; the URL is printed).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
}

const STREAM: &str = "events";

/// What users do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Click,
    View,
    Buy,
}

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::Click => "click",
            Kind::View => "view",
            Kind::Buy => "buy",
        }
    }
}

#[derive(Debug, Clone)]
struct Event {
    user: String,
    kind: Kind,
    amount: u64,
}

/// Why a line is not an event.
#[derive(Debug)]
enum ParseError {
    NotUtf8(std::str::Utf8Error),
    Fields(usize),
    Kind(String),
    Amount(String, std::num::ParseIntError),
}

impl fmt::Display for ParseError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ParseError::NotUtf8(_) => write!(f, "the line is not UTF-8"),
            ParseError::Fields(n) => write!(f, "expected 3 fields <user>,<kind>,<amount>, found {n}"),
            ParseError::Kind(k) => write!(f, "unknown kind {k:?} (expected click, view or buy)"),
            ParseError::Amount(a, _) => write!(f, "amount {a:?} is not a whole number"),
        }
    }
}

impl std::error::Error for ParseError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ParseError::NotUtf8(e) => Some(e),
            ParseError::Amount(_, e) => Some(e),
            _ => None,
        }
    }
}

#[allow(clippy::needless_pass_by_value)] // `try_map` hands each line over by value
fn parse(line: Bytes) -> Result<Event, ParseError> {
    let text = std::str::from_utf8(&line).map_err(ParseError::NotUtf8)?;
    let fields: Vec<&str> = text.split(',').map(str::trim).collect();
    let [user, kind, amount] = fields[..] else {
        return Err(ParseError::Fields(fields.len()));
    };
    if user.is_empty() {
        return Err(ParseError::Fields(2));
    }
    let kind = match kind {
        "click" => Kind::Click,
        "view" => Kind::View,
        "buy" => Kind::Buy,
        other => return Err(ParseError::Kind(other.to_owned())),
    };
    let amount = amount.parse().map_err(|e| ParseError::Amount(amount.to_owned(), e))?;
    Ok(Event {
        user: user.to_owned(),
        kind,
        amount,
    })
}

/// `n` events, deterministic; every 50th line is malformed in one of five ways.
fn sample(n: usize) -> Vec<String> {
    const KINDS: [&str; 3] = ["click", "view", "buy"];
    (0..n)
        .map(|i| {
            let user = format!("user-{}", (i * 7919) % 97);
            if i % 50 == 49 {
                match (i / 50) % 5 {
                    0 => format!("{user},click"),
                    1 => format!("{user},hover,3"),
                    2 => format!("{user},buy,three"),
                    3 => String::new(),
                    _ => format!("{user},view,-4"),
                }
            } else {
                format!("{user},{},{}", KINDS[i % 3], i % 10)
            }
        })
        .collect()
}

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
        built_in: format!("the built-in sample (--sample-events {})", args.sample_events),
        reset: args.reset,
    };
    let log_dir = support::load_once(&load, || sample(args.sample_events))?;
    let dead_letters = args.data_dir.join("dead-letters").display().to_string();
    let output = args.data_dir.join("output");

    let mut builder = StreamingContext::builder()
        .batch_interval(Duration::from_millis(args.batch_ms))
        .data_dir(&args.data_dir)
        .failure_policy(FailurePolicy::DeadLetter)
        .dead_letter(&dead_letters);
    if let Some(threads) = args.threads {
        builder = builder.executor_threads(threads);
    }
    if let Some(addr) = args.metrics_addr {
        builder = builder.metrics_addr(addr);
    }
    let ctx = builder.build()?;
    let config = ReceiverConfig {
        block_interval_ms: args.block_ms,
        max_rate: args.max_rate,
        ..ReceiverConfig::default()
    };
    let lines = ctx.local_log_stream(&log_dir, STREAM, config)?;

    // Parsed once per batch, read by four keyed stages.
    let events = lines.try_map(parse).cache();
    events
        .map(|e| (e.user.clone(), e.amount))
        .reduce_by_key(|a, b| a + b)
        .save_parquet(&output.join("per-user").display().to_string())?;
    events
        .map(|e| (e.kind.name().to_owned(), 1u64))
        .reduce_by_key(|a, b| a + b)
        .save_parquet(&output.join("per-kind").display().to_string())?;
    let windowed: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let keep = windowed.clone();
    events
        .map(|e| (e.kind.name().to_owned(), e.amount))
        .reduce_by_key_and_window(
            |a, b| a + b,
            Some(Arc::new(|a: u64, b: u64| a - b)),
            Some(Arc::new(|_: &String, v: &u64| *v > 0)),
            Window::new(3, 1)?,
        )
        .foreach_batch(move |_time, mut last_three| {
            last_three.sort_unstable();
            *keep.lock().expect("window") = last_three;
            Ok(())
        })?;
    let top_users: Arc<Mutex<Vec<(String, u64)>>> = Arc::default();
    let keep = top_users.clone();
    events
        .map(|e| (e.user.clone(), e.amount))
        .update_state_by_key(|_user: &String, new: Vec<u64>, old: Option<u64>| {
            Some(old.unwrap_or(0) + new.iter().sum::<u64>())
        })
        .foreach_batch(move |_time, mut all| {
            all.sort_unstable_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
            all.truncate(3);
            *keep.lock().expect("top users") = all;
            Ok(())
        })?;
    ctx.add_batch_listener(|info| {
        println!(
            "batch {:>14} | {:>7} records | {:>4} dead letters | processing {:>5} ms",
            info.batch_time.as_millis(),
            info.num_records,
            info.dead_letters,
            info.processing_delay_ms
        );
    });

    ctx.start()?;
    support::print_monitor_urls(&ctx);
    let timeout = Duration::from_secs(args.timeout_s);
    let drained = ctx.await_drained(timeout)?;
    ctx.stop(StopMode::Graceful)?;
    if !drained {
        bail!("the input was not drained within {timeout:?}");
    }
    let m = ctx.metrics();
    println!(
        "\nprocessed {} records in {} batches; {} dead letters this run {:?}",
        m.records_processed, m.batches_completed, m.dead_letters, m.dead_letters_by_stage
    );
    println!(
        "amounts per kind over the last 3 batches: {:?}",
        windowed.lock().expect("window")
    );
    println!("top users: {:?}", top_users.lock().expect("top users"));
    show_dead_letters(&dead_letters, args.show)
}

/// Reads the committed dead letters back (every run, every batch) and shows the first `show`.
fn show_dead_letters(location: &str, show: usize) -> anyhow::Result<()> {
    let committed = match DeadLetterSink::read_committed(location) {
        Ok(committed) => committed,
        // No batch had a bad line: nothing was ever written there.
        Err(_) if !std::path::Path::new(location).exists() => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    let total: usize = committed.iter().map(|(_, b)| b.num_rows()).sum();
    println!("\n{total} dead letters in {location}; the first {}:", show.min(total));
    let mut shown = 0;
    for (_time, batch) in &committed {
        let column = |name: &str| batch.column_by_name(name).expect("dead-letter schema");
        let shard = column("shard_id").as_string::<i32>();
        let sequence = column("sequence_number").as_string::<i32>();
        let data = column("data").as_binary::<i32>();
        let error = column("error").as_string::<i32>();
        let stage = column("stage").as_string::<i32>();
        for i in 0..batch.num_rows() {
            if shown == show {
                return Ok(());
            }
            println!(
                "  {} @ {} [{}] {:?}: {}",
                shard.value(i),
                sequence.value(i),
                stage.value(i),
                String::from_utf8_lossy(data.value(i)),
                error.value(i)
            );
            shown += 1;
        }
    }
    Ok(())
}
