//! Kill -9 recovery of a pipeline with bad records: the `parse_events` example parses an event
//! file with known malformed lines (`try_map`, dead letters, `cache()`, four keyed stages). It is
//! killed at random moments and restarted; at the end the per-user Parquet output equals the sums
//! of the good lines exactly, and the dead-letter output holds each bad line exactly once — never
//! a letter of a completed batch written again under a later one — and nothing printed a panic.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use arrow_array::cast::AsArray;
use rand::{Rng, SeedableRng};
use support::{example_binary, sum_parquet};

const EVENTS: usize = 60_000;

/// The event file: `<user>,<kind>,<amount>` lines, every 41st malformed (one of them not UTF-8).
/// Returns the per-user sums of the good lines and the bad lines.
fn write_events(path: &Path) -> (HashMap<String, u64>, Vec<Vec<u8>>) {
    let mut file = std::io::BufWriter::new(std::fs::File::create(path).unwrap());
    let mut sums: HashMap<String, u64> = HashMap::new();
    let mut bad = Vec::new();
    for i in 0..EVENTS {
        let user = format!("user-{}", (i * 13) % 101);
        let line: Vec<u8> = if i % 41 == 40 {
            let line = match (i / 41) % 5 {
                0 => format!("{user},click").into_bytes(),
                1 => format!("{user},scroll,2").into_bytes(),
                2 => format!("{user},buy,{i}x").into_bytes(),
                3 => b"caf\xe9,view,1".to_vec(),
                _ => format!(",view,{i}").into_bytes(),
            };
            bad.push(line.clone());
            line
        } else {
            let amount = (i % 9) as u64;
            *sums.entry(user.clone()).or_default() += amount;
            format!("{user},{},{amount}", ["click", "view", "buy"][i % 3]).into_bytes()
        };
        file.write_all(&line).unwrap();
        file.write_all(b"\n").unwrap();
    }
    file.flush().unwrap();
    (sums, bad)
}

fn command(data: &Path, events: &Path) -> Command {
    let mut cmd = Command::new(example_binary("parse_events"));
    cmd.arg(events)
        .args(["--data-dir", data.to_str().unwrap()])
        .args([
            "--batch-ms",
            "150",
            "--block-ms",
            "30",
            "--threads",
            "2",
            "--timeout-s",
            "300",
        ])
        // About 3 s of reading after the load, so that kills land while batches run.
        .args(["--max-rate", "20000"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    cmd
}

/// Payloads of every committed dead letter.
fn dead_letter_payloads(location: &Path) -> Vec<Vec<u8>> {
    let mut payloads = Vec::new();
    for (_time, batch) in sluice::operators::DeadLetterSink::read_committed(&location.display().to_string()).unwrap() {
        let data = batch.column_by_name("data").unwrap().as_binary::<i32>();
        let stage = batch.column_by_name("stage").unwrap().as_string::<i32>();
        for i in 0..batch.num_rows() {
            assert_eq!(stage.value(i), "try_map#1");
            payloads.push(data.value(i).to_vec());
        }
    }
    payloads
}

#[test]
fn killed_and_restarted_parse_events_keeps_outputs_and_dead_letters_exact() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.csv");
    let (reference, mut bad) = write_events(&events);
    let data = dir.path().join("pe");
    let mut rng = rand::rngs::StdRng::seed_from_u64(2027);
    let budget = Duration::from_secs(45);
    let started = Instant::now();
    let mut kills = 0;
    while started.elapsed() < budget && kills < 6 {
        let mut child = command(&data, &events).spawn().unwrap();
        std::thread::sleep(Duration::from_millis(rng.random_range(150..1_200)));
        if child.try_wait().unwrap().is_some() {
            break; // finished on its own before the kill
        }
        child.kill().unwrap(); // SIGKILL on Unix
        child.wait().unwrap();
        kills += 1;
    }
    let output = command(&data, &events).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "final run failed: {stderr}");
    assert!(!stderr.contains("panicked"), "a bad record printed a panic: {stderr}");
    assert!(kills > 0, "the child was never killed: the test proved nothing");
    eprintln!("{kills} kills");

    assert_eq!(
        sum_parquet(&data.join("output").join("per-user")),
        reference,
        "per-user sums after {kills} kills"
    );
    let mut letters = dead_letter_payloads(&data.join("dead-letters"));
    letters.sort();
    bad.sort();
    assert_eq!(letters.len(), bad.len(), "dead letters after {kills} kills");
    assert_eq!(letters, bad, "each bad line exactly once after {kills} kills");
}
