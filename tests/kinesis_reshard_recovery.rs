//! Resharding under load and across crashes, end to end: records flow into a kinesis-local
//! stream while its shards are split and merged — some of that while the pipeline runs, some
//! while it is dead — and the `kinesis_word_count` example (`--pipeline copy`: every line one
//! Parquet row, leases in `DynamoDB` on moto) is killed with SIGKILL again and again. At the end
//! the committed output, read in batch and part order, must hold every record exactly once and
//! each partition key's records in the order they were written, across parents and children.
//!
//! Run through `scripts/with-emulators` (it exports the endpoints); a missing emulator fails the
//! test, it is never skipped.
#![cfg(feature = "kinesis")]

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use sluice::receiver::kinesis::{KinesisConfig, KinesisProducer, KinesisSource};
use sluice::receiver::{AwsSettings, ShardInfo, Source};
use support::{example_binary, read_lines};

/// Partition keys, and records per key: 24 × 150 = 3 600 records.
const KEYS: usize = 24;
const PER_KEY: usize = 150;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run through `scripts/with-emulators cargo test ...` (or `scripts/test`)")
    })
}

fn start(data: &Path, stream: &str, app: &str, follow: bool) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(data.with_extension("log"))
        .unwrap();
    let mut cmd = Command::new(example_binary("kinesis_word_count"));
    cmd.args(["--stream", stream, "--app", app, "--data-dir", data.to_str().unwrap()])
        .args(["--pipeline", "copy"])
        .args(["--batch-ms", "200", "--block-ms", "40", "--checkpoint-ms", "100"])
        .args(["--read-interval-ms", "20", "--idle-ms", "100", "--timeout-s", "120"])
        .args(["--failover-ms", "3000", "--taker-ms", "200"])
        .env("RUST_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(log);
    if follow {
        cmd.arg("--follow");
    }
    cmd.spawn().unwrap()
}

/// The open shards, lowest hash range first.
fn open_shards(source: &KinesisSource) -> Vec<ShardInfo> {
    let mut open: Vec<ShardInfo> = source
        .list_shards()
        .unwrap()
        .into_iter()
        .filter(|s| !s.is_closed())
        .collect();
    open.sort_by_key(|s| s.hash_key_range.0);
    open
}

/// One resharding step: splits the widest open shard, or merges the two adjacent open shards
/// whose union is narrowest.
fn reshard(producer: &KinesisProducer, source: &KinesisSource, split: bool) -> String {
    let open = open_shards(source);
    if split {
        let widest = open
            .iter()
            .max_by_key(|s| s.hash_key_range.1 - s.hash_key_range.0)
            .unwrap();
        producer.split_shard(&widest.shard_id, None).unwrap();
        format!("split {}", widest.shard_id)
    } else {
        let (a, b) = open
            .windows(2)
            .map(|w| (&w[0], &w[1]))
            .min_by_key(|(a, b)| b.hash_key_range.1 - a.hash_key_range.0)
            .unwrap();
        producer.merge_shards(&a.shard_id, &b.shard_id).unwrap();
        format!("merge {} + {}", a.shard_id, b.shard_id)
    }
}

/// The load: `key<k>:<i>` for i ascending, every key in each round; ~300 records/s.
fn spawn_load(
    config: &KinesisConfig,
    written: &Arc<AtomicUsize>,
    done: &Arc<AtomicBool>,
) -> std::thread::JoinHandle<()> {
    let (config, written, done) = (config.clone(), written.clone(), done.clone());
    std::thread::spawn(move || {
        let producer = KinesisProducer::new(&config).unwrap();
        for round in (0..PER_KEY).step_by(3) {
            let records: Vec<(String, String)> = (round..(round + 3).min(PER_KEY))
                .flat_map(|i| (0..KEYS).map(move |k| (format!("key{k}"), format!("key{k}:{i}"))))
                .collect();
            producer.put(&records).unwrap();
            written.fetch_add(records.len(), Ordering::SeqCst);
            std::thread::sleep(Duration::from_millis(200));
        }
        done.store(true, Ordering::SeqCst);
    })
}

/// Every record once, each key's records in write order.
fn assert_exact_and_in_key_order(lines: &[String], steps: &[String]) {
    assert_eq!(
        lines.len(),
        KEYS * PER_KEY,
        "records lost or duplicated after {steps:?}"
    );
    let mut per_key: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for line in lines {
        let (key, counter) = line.split_once(':').unwrap();
        per_key
            .entry(key.to_owned())
            .or_default()
            .push(counter.parse().unwrap());
    }
    assert_eq!(per_key.len(), KEYS);
    for (key, counters) in per_key {
        assert_eq!(
            counters,
            (0..PER_KEY).collect::<Vec<_>>(),
            "{key}: lost, duplicated or out of order after {steps:?}"
        );
    }
}

#[test]
fn split_and_merge_while_streaming_and_killed_keep_every_record_once_and_in_key_order() {
    let stream = format!("reshard-kill-{}", std::process::id());
    let config = KinesisConfig {
        aws: AwsSettings {
            kinesis_endpoint: Some(env("SLUICE_KINESIS_ENDPOINT")),
            dynamodb_endpoint: Some(env("SLUICE_DYNAMODB_ENDPOINT")),
            ..AwsSettings::default()
        },
        ..KinesisConfig::new(&stream)
    };
    let producer = KinesisProducer::new(&config).unwrap();
    producer.create_stream(2).unwrap();
    let source = KinesisSource::connect(config.clone()).unwrap();
    let app = format!("{stream}-app");
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("copy");

    let written = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let load = spawn_load(&config, &written, &done);

    // Kill the pipeline again and again; reshard both while it runs and while it is dead.
    let mut rng = rand::rngs::StdRng::seed_from_u64(12);
    let mut steps = Vec::new();
    let mut kills = 0;
    // Rows committed after each kill: the killed runs must have done part of the work.
    let mut committed = Vec::new();
    let started = Instant::now();
    while !done.load(Ordering::SeqCst) && started.elapsed() < Duration::from_secs(90) {
        // split while running, split while dead, merge while running, merge while dead, again.
        let (split, while_dead) = [(true, false), (true, true), (false, false), (false, true)][kills % 4];
        if while_dead {
            steps.push(format!("{} (dead)", reshard(&producer, &source, split)));
        }
        let mut child = start(&data, &stream, &app, true);
        std::thread::sleep(Duration::from_millis(rng.random_range(1_000..2_500)));
        if !while_dead {
            steps.push(format!("{} (running)", reshard(&producer, &source, split)));
            std::thread::sleep(Duration::from_millis(rng.random_range(300..1_500)));
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the pipeline exited on its own: {}",
            std::fs::read_to_string(data.with_extension("log")).unwrap_or_default()
        );
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        kills += 1;
        committed.push(read_lines(&data.join("output")).len());
    }
    load.join().unwrap();
    eprintln!(
        "{} records written; killed the pipeline {kills} times; rows committed after each kill: {committed:?}; \
         resharding: {steps:?}",
        written.load(Ordering::SeqCst)
    );
    assert!(kills >= 4, "only {kills} kills: the test proved little");
    assert!(
        committed.windows(2).filter(|w| w[1] > w[0]).count() >= 2,
        "the killed runs committed (almost) nothing: {committed:?}"
    );
    assert!(
        steps.iter().any(|s| s.starts_with("split") && s.ends_with("(running)"))
            && steps.iter().any(|s| s.starts_with("merge") && s.ends_with("(running)"))
            && steps.iter().any(|s| s.starts_with("split") && s.ends_with("(dead)"))
            && steps.iter().any(|s| s.starts_with("merge") && s.ends_with("(dead)")),
        "every kind of resharding step must have happened: {steps:?}"
    );

    // A last run reads to the end of every open shard and exits.
    let status = start(&data, &stream, &app, false).wait().unwrap();
    assert!(
        status.success(),
        "final run failed: {}",
        std::fs::read_to_string(data.with_extension("log")).unwrap_or_default()
    );

    assert_exact_and_in_key_order(&read_lines(&data.join("output")), &steps);
    producer.delete_stream().unwrap();
}
