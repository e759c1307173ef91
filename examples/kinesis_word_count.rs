//! Word count over an Amazon Kinesis stream, leases and checkpoints in `DynamoDB` (KCL table).
//!
//! On the local emulators (no AWS account needed), one command starts kinesis-local and moto,
//! creates the stream, loads 20 000 lines and counts them:
//!
//! ```sh
//! scripts/with-emulators cargo run --release --features kinesis --example kinesis_word_count -- --load 20000
//! ```
//!
//! Against AWS: credentials and region from the default chain, no endpoint flags:
//!
//! ```sh
//! cargo run --release --features kinesis --example kinesis_word_count -- --stream my-stream --app my-app --follow
//! ```
//!
//! Counts per batch are written as Parquet (one directory per batch, re-runs replace) under
//! `<data-dir>/output` or `--output`; totals are kept with `update_state_by_key`. Kill it at any
//! moment and start it again: batches in flight are re-run with exactly their blocks (replayed
//! from Kinesis by range when the block store lost them), and the summed output stays exact.
//! `--pipeline copy` writes every line as one row instead, in the order read, so that the output
//! shows both exactly-once and each partition key's order across shard splits and merges.
//!
//! `--reader fan-out` reads by enhanced fan-out (`SubscribeToShard`) instead of polling.
//! `--streams a,b` (or `--streams-file`, re-read while running) reads several streams in one
//! application, with KCL multi-stream lease keys.
//!
//! Several workers (on several machines) share the stream's shards through the lease table and
//! write one output: give each a `--worker-id` and point all of them at the same `--checkpoint`
//! and `--output` (S3 URLs in production). A worker that dies for good is adopted by the others
//! after `--failover-ms`: they process what it had logged and read on where it stopped.
//!
//! ```sh
//! kinesis_word_count --follow --worker-id w1 --checkpoint s3://bucket/app/checkpoint --output s3://bucket/app/output
//! kinesis_word_count --follow --worker-id w2 --checkpoint s3://bucket/app/checkpoint --output s3://bucket/app/output
//! ```

mod support;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use sluice::engine::{KinesisInput, StreamingContext};
use sluice::operators::bench_data;
use sluice::receiver::SourceError;
use sluice::receiver::kinesis::{KinesisConfig, KinesisProducer, ReaderType, StreamList};
use sluice::receiver::{AwsSettings, InitialPosition, ReceiverConfig};

/// Count words in a Kinesis stream, exactly once, across crashes.
#[derive(Debug, Parser)]
struct Args {
    /// Kinesis stream name.
    #[arg(long, default_value = "sluice-lines")]
    stream: String,
    /// Application name: the `DynamoDB` lease table.
    #[arg(long, default_value = "sluice-word-count")]
    app: String,
    /// Region (default: `AWS_REGION` / the profile).
    #[arg(long)]
    region: Option<String>,
    /// Kinesis endpoint override (`scripts/with-emulators` sets it to kinesis-local).
    #[arg(long, env = "SLUICE_KINESIS_ENDPOINT")]
    kinesis_endpoint: Option<String>,
    /// `DynamoDB` endpoint override (`scripts/with-emulators` sets it to moto).
    #[arg(long, env = "SLUICE_DYNAMODB_ENDPOINT")]
    dynamodb_endpoint: Option<String>,
    /// Before counting, put this many lines of the built-in corpus (creating the stream with
    /// `--shards` shards if it does not exist).
    #[arg(long)]
    load: Option<usize>,
    /// Shards of a stream `--load` creates.
    #[arg(long, default_value_t = 2)]
    shards: u32,
    /// Where to start in a shard that has no checkpoint yet.
    #[arg(long, value_enum, default_value = "trim-horizon")]
    initial_position: Start,
    /// Data directory (block store, metadata log, output).
    #[arg(long, default_value = ".sluice-data/kinesis-word-count")]
    data_dir: PathBuf,
    /// Batch interval in milliseconds.
    #[arg(long, default_value_t = 1_000)]
    batch_ms: u64,
    /// Block interval in milliseconds.
    #[arg(long, default_value_t = 200)]
    block_ms: u64,
    /// Shard checkpoint interval in milliseconds.
    #[arg(long, default_value_t = 1_000)]
    checkpoint_ms: u64,
    /// This worker's id among the application's workers (default: the host name). Names its
    /// leases, its log under the checkpoint location and its output files.
    #[arg(long)]
    worker_id: Option<String>,
    /// Checkpoint location shared by the application's workers (a path or `s3://bucket/prefix`;
    /// default `<data-dir>/checkpoint`).
    #[arg(long)]
    checkpoint: Option<String>,
    /// Parquet output location (a path or `s3://bucket/prefix`; default `<data-dir>/output`).
    #[arg(long)]
    output: Option<String>,
    /// Object-store location of the block replicas (default `<data-dir>/replica`).
    #[arg(long)]
    replica: Option<String>,
    /// A worker whose lease is not renewed for this long is presumed dead and adopted (ms).
    #[arg(long, default_value_t = ReceiverConfig::DEFAULT_LEASE_FAILOVER_MS)]
    failover_ms: u64,
    /// How often the lease table is scanned for leases to take (ms).
    #[arg(long, default_value_t = ReceiverConfig::DEFAULT_LEASE_TAKER_INTERVAL_MS)]
    taker_ms: u64,
    /// Minimum time between `GetRecords` calls per shard (ms; the service allows 5/s).
    #[arg(long, default_value_t = 200)]
    read_interval_ms: u64,
    /// Read several streams in one application (KCL multi-stream mode), comma-separated,
    /// instead of `--stream`.
    #[arg(long, value_delimiter = ',')]
    streams: Vec<String>,
    /// Like `--streams`, from a file with one stream name per line, read again at every lease
    /// scan: edit it to add or remove streams while the application runs.
    #[arg(long, conflicts_with = "streams")]
    streams_file: Option<PathBuf>,
    /// How live records are read: `polling` (`GetRecords`) or `fan-out` (enhanced fan-out:
    /// `SubscribeToShard` through a registered stream consumer, 2 MB/s per shard of its own).
    #[arg(long, value_enum, default_value = "polling")]
    reader: Reader,
    /// The enhanced fan-out consumer's name (default: `<app>`; registered if missing, and
    /// deregistered by the last worker's graceful stop if it registered it).
    #[arg(long)]
    consumer_name: Option<String>,
    /// Wait after a read that returned nothing before reading the shard again (ms; default:
    /// the reader's own, 1 s for polling).
    #[arg(long)]
    idle_ms: Option<u64>,
    /// What to compute: `word-count` (counts per batch as Parquet, totals in state) or `copy`
    /// (every line as one Parquet row, in the order read: each partition key's records in
    /// stream order, a parent shard's before its children's).
    #[arg(long, value_enum, default_value = "word-count")]
    pipeline: Pipeline,
    /// Keep running after the stream is drained.
    #[arg(long)]
    follow: bool,
    /// Words to show at the end.
    #[arg(long, default_value_t = 10)]
    top: usize,
    /// Give up waiting for the stream to drain after this many seconds.
    #[arg(long, default_value_t = 600)]
    timeout_s: u64,
    /// Serve Prometheus metrics (`/metrics`) and a status page (`/`) on this address while
    /// running, e.g. 127.0.0.1:9898 (port 0 picks a free port; the URL is printed).
    #[arg(long)]
    metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Reader {
    Polling,
    FanOut,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Pipeline {
    WordCount,
    Copy,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum Start {
    TrimHorizon,
    Latest,
}

/// The stream names in `file`, one per line (blank lines and `#` comments skipped).
fn read_stream_list(file: &std::path::Path) -> Result<Vec<String>, SourceError> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| SourceError::Invalid(format!("cannot read the stream list {}: {e}", file.display())))?;
    Ok(text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_owned)
        .collect())
}

fn load(config: &KinesisConfig, lines: usize, shards: u32) -> anyhow::Result<()> {
    let producer = KinesisProducer::new(config)?;
    if producer.create_stream(shards).context("create the stream")? {
        eprintln!("created stream {} with {shards} shards", config.stream_name);
    }
    let corpus = bench_data::zipf_lines(lines, 50_000, 42);
    let records: Vec<(String, &[u8])> = corpus
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), l.as_bytes()))
        .collect();
    producer.put(&records).context("put the corpus")?;
    eprintln!("put {lines} lines into {}", config.stream_name);
    Ok(())
}

fn main() -> ExitCode {
    support::init_tracing();
    support::report(run(&Args::parse()))
}

fn run(args: &Args) -> anyhow::Result<()> {
    if args.batch_ms == 0 || args.block_ms == 0 {
        bail!("--batch-ms and --block-ms must be at least 1");
    }
    let kinesis = KinesisConfig {
        aws: AwsSettings {
            region: args.region.clone(),
            kinesis_endpoint: args.kinesis_endpoint.clone(),
            dynamodb_endpoint: args.dynamodb_endpoint.clone(),
            ..AwsSettings::default()
        },
        min_read_interval_ms: args.read_interval_ms,
        reader: match args.reader {
            Reader::Polling => ReaderType::Polling,
            Reader::FanOut => ReaderType::EnhancedFanOut {
                consumer_name: args.consumer_name.clone().unwrap_or_else(|| args.app.clone()),
            },
        },
        ..KinesisConfig::new(&args.stream)
    };
    if let Some(lines) = args.load {
        load(&kinesis, lines, args.shards)?;
    }

    let mut builder = StreamingContext::builder()
        .batch_interval(Duration::from_millis(args.batch_ms))
        .data_dir(&args.data_dir);
    if let Some(id) = &args.worker_id {
        builder = builder.worker_id(id);
    }
    if let Some(checkpoint) = &args.checkpoint {
        builder = builder.checkpoint(checkpoint);
    }
    if let Some(replica) = &args.replica {
        builder = builder.replica_url(replica);
    }
    if let Some(addr) = args.metrics_addr {
        builder = builder.metrics_addr(addr);
    }
    let ctx = builder.build()?;
    let mut input = if let Some(file) = args.streams_file.clone() {
        KinesisInput::multi_stream(StreamList::new(move || read_stream_list(&file)), &args.app)
    } else if !args.streams.is_empty() {
        KinesisInput::multi_stream(args.streams.clone(), &args.app)
    } else {
        KinesisInput::new(&args.stream, &args.app)
    };
    input.kinesis = KinesisConfig {
        stream_name: input.kinesis.stream_name.clone(),
        ..kinesis
    };
    input.receiver = ReceiverConfig {
        block_interval_ms: args.block_ms,
        checkpoint_interval_ms: args.checkpoint_ms,
        initial_position: match args.initial_position {
            Start::TrimHorizon => InitialPosition::TrimHorizon,
            Start::Latest => InitialPosition::Latest,
        },
        lease_failover_ms: args.failover_ms,
        lease_taker_interval_ms: args.taker_ms,
        idle_poll_ms: args.idle_ms,
        ..ReceiverConfig::default()
    };
    let lines = ctx.kinesis_stream(input)?;

    let output = args
        .output
        .clone()
        .unwrap_or_else(|| args.data_dir.join("output").display().to_string());
    let latest_top = match args.pipeline {
        Pipeline::WordCount => support::count_words(&ctx, &lines, &output, args.top)?,
        Pipeline::Copy => {
            lines
                .map(|line| String::from_utf8_lossy(&line).into_owned())
                .save_parquet(&output)?;
            support::TopWords::default()
        }
    };
    support::run(&ctx, args.follow, Duration::from_secs(args.timeout_s), &latest_top)
}
