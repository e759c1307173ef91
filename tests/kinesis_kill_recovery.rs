//! Kill -9 recovery of the Kinesis pipeline: a stream on kinesis-local holds a known corpus; the
//! `kinesis_word_count` example (leases in `DynamoDB` on moto) is killed at random moments and
//! restarted; at the end the Parquet output summed over batches equals the reference exactly.
//! Run through `scripts/with-emulators` (it exports the endpoints the example reads).
#![cfg(feature = "kinesis")]

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use sluice::operators::bench_data;
use sluice::receiver::AwsSettings;
use sluice::receiver::kinesis::{KinesisConfig, KinesisProducer};
use support::{example_binary, sum_parquet};

const CORPUS_LINES: usize = 8_000;

fn command(data: &Path, stream: &str, app: &str) -> Command {
    let mut cmd = Command::new(example_binary("kinesis_word_count"));
    cmd.args(["--stream", stream, "--app", app, "--data-dir", data.to_str().unwrap()])
        .args(["--batch-ms", "200", "--block-ms", "40", "--checkpoint-ms", "100"])
        .args(["--read-interval-ms", "20", "--timeout-s", "300"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

#[test]
fn killed_and_restarted_kinesis_word_count_is_exact() {
    let endpoint = std::env::var("SLUICE_KINESIS_ENDPOINT").expect(
        "SLUICE_KINESIS_ENDPOINT is not set: run through `scripts/with-emulators cargo test ...` (or `scripts/test`)",
    );
    assert!(
        std::env::var("SLUICE_DYNAMODB_ENDPOINT").is_ok(),
        "SLUICE_DYNAMODB_ENDPOINT is not set: run through `scripts/with-emulators`"
    );
    let stream = format!("kill-{}", std::process::id());
    let config = KinesisConfig {
        aws: AwsSettings {
            kinesis_endpoint: Some(endpoint),
            ..AwsSettings::default()
        },
        ..KinesisConfig::new(&stream)
    };
    let producer = KinesisProducer::new(&config).unwrap();
    producer.create_stream(2).unwrap();
    let lines = bench_data::zipf_lines(CORPUS_LINES, 2_000, 99);
    let records: Vec<(String, &[u8])> = lines
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), l.as_bytes()))
        .collect();
    producer.put(&records).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("wc");
    let app = format!("{stream}-app");
    let mut rng = rand::rngs::StdRng::seed_from_u64(5);
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < Duration::from_secs(90) && kills < 6 {
        let mut child = command(&data, &stream, &app).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(rng.random_range(200..1_200)));
        if child.try_wait().unwrap().is_some() {
            break; // finished on its own before the kill
        }
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        kills += 1;
    }
    eprintln!("killed the pipeline {kills} times");
    let output = command(&data, &stream, &app).output().unwrap();
    assert!(
        output.status.success(),
        "final run failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(kills > 0, "the child was never killed: the test proved nothing");
    let reference = bench_data::reference_word_count(&lines);
    let got = sum_parquet(&data.join("output"));
    assert_eq!(
        got.values().sum::<u64>(),
        reference.values().sum::<u64>(),
        "total words after {kills} kills"
    );
    assert_eq!(got, reference, "per-word counts after {kills} kills");
    producer.delete_stream().unwrap();
}
