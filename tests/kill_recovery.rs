//! Kill -9 recovery: run the word-count example as a child process over a known corpus, kill it
//! at random moments (repeatedly, within a bounded total time), restart it each time; at the end
//! the Parquet output, summed over batches, equals the reference counts exactly — nothing lost,
//! nothing counted twice.

mod support;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use support::{example_binary, sum_parquet};

const CORPUS_LINES: usize = 60_000;

fn command(data: &Path) -> Command {
    let mut cmd = Command::new(example_binary("word_count"));
    cmd.args([
        "--data-dir",
        data.to_str().unwrap(),
        "--batch-ms",
        "150",
        "--block-ms",
        "30",
    ])
    .args([
        "--corpus-lines",
        &CORPUS_LINES.to_string(),
        "--threads",
        "2",
        "--timeout-s",
        "300",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped());
    cmd
}

#[test]
fn killed_and_restarted_word_count_is_exact() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("wc");
    let mut rng = rand::rngs::StdRng::seed_from_u64(2026);
    let budget = Duration::from_secs(90);
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < budget && kills < 8 {
        let mut child = command(&data).spawn().unwrap();
        let wait = Duration::from_millis(rng.random_range(200..1_500));
        std::thread::sleep(wait);
        if child.try_wait().unwrap().is_some() {
            break; // finished on its own before the kill
        }
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        kills += 1;
    }
    let output = command(&data).output().unwrap();
    assert!(
        output.status.success(),
        "final run failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(kills > 0, "the child was never killed: the test proved nothing");
    let lines = sluice::operators::bench_data::zipf_lines(CORPUS_LINES, 50_000, 42);
    let reference = sluice::operators::bench_data::reference_word_count(&lines);
    let got = sum_parquet(&data.join("output"));
    assert_eq!(
        got.values().sum::<u64>(),
        reference.values().sum::<u64>(),
        "total words after {kills} kills"
    );
    assert_eq!(got, reference, "per-word counts after {kills} kills");
}
