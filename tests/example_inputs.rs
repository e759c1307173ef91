//! What the examples do with their input, run as a user runs them (the example binaries as child
//! processes): a data directory loaded from one input is never silently reused for another —
//! same input resumes, other input is refused until `--reset` or a new `--data-dir`; words that
//! are not UTF-8 are counted as their bytes; errors name the input and line and print no
//! backtrace unless `RUST_BACKTRACE` asks for one.

mod support;

use std::collections::HashMap;
use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

use support::{example_binary, sum_parquet_bytes};

/// `word_count` on `data` with small intervals, no inherited backtrace settings, no stdin.
fn word_count(data: &Path) -> Command {
    example(data, "word_count")
}

fn example(data: &Path, name: &str) -> Command {
    let mut cmd = Command::new(example_binary(name));
    cmd.args(["--data-dir", data.to_str().unwrap()])
        .args([
            "--batch-ms",
            "100",
            "--block-ms",
            "20",
            "--threads",
            "2",
            "--timeout-s",
            "120",
        ])
        .env_remove("RUST_BACKTRACE")
        .env_remove("RUST_LIB_BACKTRACE")
        .stdin(Stdio::null());
    cmd
}

/// Runs `cmd` to its end with `stdin` as its standard input.
fn run_with_stdin(cmd: &mut Command, stdin: &[u8]) -> Output {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    child.wait_with_output().unwrap()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[track_caller]
fn assert_success(out: &Output, what: &str) {
    assert!(out.status.success(), "{what} failed: {}", stderr(out));
}

/// A refusal: exit code 1, an `error:` that names both ways out.
#[track_caller]
fn assert_refused(out: &Output, what: &str) {
    let text = stderr(out);
    assert_eq!(out.status.code(), Some(1), "{what} was not refused: {text}");
    assert!(
        text.starts_with("error: the data directory") && text.contains("--data-dir") && text.contains("--reset"),
        "{what}: the refusal must name --data-dir and --reset: {text}"
    );
}

/// Word counts of `text` split on ASCII whitespace, words as bytes: what the example must write.
fn reference(text: &[u8]) -> HashMap<Vec<u8>, u64> {
    let mut counts = HashMap::new();
    for word in text.split(u8::is_ascii_whitespace).filter(|w| !w.is_empty()) {
        *counts.entry(word.to_vec()).or_default() += 1;
    }
    counts
}

fn corpus_reference(lines: usize) -> HashMap<Vec<u8>, u64> {
    reference(
        sluice::operators::bench_data::zipf_lines(lines, 50_000, 42)
            .join("\n")
            .as_bytes(),
    )
}

#[test]
fn a_data_dir_loaded_from_other_input_is_refused_not_silently_reused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("wc");
    let output = data.join("output");
    let corpus = corpus_reference(3_000);

    let first = word_count(&data).args(["--corpus-lines", "3000"]).output().unwrap();
    assert_success(&first, "the first run");
    assert_eq!(sum_parquet_bytes(&output), corpus, "the first run's counts");

    // Other input on the loaded directory: refused, and nothing it holds is touched.
    let my_txt = dir.path().join("my.txt");
    std::fs::write(&my_txt, b"alpha beta\nbeta gamma\n").unwrap();
    let file = word_count(&data).arg(&my_txt).output().unwrap();
    assert_refused(&file, "a file after the built-in corpus");
    assert!(
        stderr(&file).contains("my.txt"),
        "the refusal names the new input: {}",
        stderr(&file)
    );
    let other_size = word_count(&data).args(["--corpus-lines", "2000"]).output().unwrap();
    assert_refused(&other_size, "another --corpus-lines");
    let other_shards = word_count(&data)
        .args(["--corpus-lines", "3000", "--shards", "3"])
        .output()
        .unwrap();
    assert_refused(&other_shards, "another --shards");
    assert_eq!(sum_parquet_bytes(&output), corpus, "after the refused runs");

    // The same input again: it resumes (a killed run recovers this way) and counts nothing twice.
    let again = word_count(&data).args(["--corpus-lines", "3000"]).output().unwrap();
    assert_success(&again, "the same input again");
    assert!(stderr(&again).contains("resuming"), "{}", stderr(&again));
    assert_eq!(sum_parquet_bytes(&output), corpus, "after running the same input again");

    // --reset loads the new input in place of the old.
    let reset = word_count(&data).arg(&my_txt).arg("--reset").output().unwrap();
    assert_success(&reset, "--reset with my.txt");
    assert_eq!(
        sum_parquet_bytes(&output),
        reference(b"alpha beta\nbeta gamma\n"),
        "--reset counts only the new input"
    );

    // The same path with other contents is other input.
    std::fs::write(&my_txt, b"alpha beta\nbeta gamma\ndelta\n").unwrap();
    let changed = word_count(&data).arg(&my_txt).output().unwrap();
    assert_refused(&changed, "my.txt changed in place");
}

#[test]
fn stdin_is_read_and_compared_before_a_loaded_dir_is_reused() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("wc");
    let output = data.join("output");
    let input = b"one two two\nthree three three\n";

    let first = run_with_stdin(word_count(&data).arg("-"), input);
    assert_success(&first, "the first run from stdin");
    assert_eq!(sum_parquet_bytes(&output), reference(input));

    let again = run_with_stdin(word_count(&data).arg("-"), input);
    assert_success(&again, "the same stdin again");
    assert_eq!(sum_parquet_bytes(&output), reference(input), "the same stdin resumes");

    let other = run_with_stdin(word_count(&data).arg("-"), b"four\n");
    assert_refused(&other, "other stdin");
    assert_eq!(sum_parquet_bytes(&output), reference(input), "after the refused run");
}

#[test]
fn parse_events_refuses_other_input_too() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("pe");
    let first = example(&data, "parse_events")
        .args(["--sample-events", "500"])
        .output()
        .unwrap();
    assert_success(&first, "parse_events on its sample");
    let events = dir.path().join("events.csv");
    std::fs::write(&events, b"u1,click,1\nu2,buy,3\n").unwrap();
    let other = example(&data, "parse_events").arg(&events).output().unwrap();
    assert_refused(&other, "parse_events with a file after its sample");
    let reset = example(&data, "parse_events")
        .arg(&events)
        .arg("--reset")
        .output()
        .unwrap();
    assert_success(&reset, "parse_events --reset");
    assert_eq!(
        support::sum_parquet(&data.join("output").join("per-user")),
        HashMap::from([("u1".to_owned(), 1), ("u2".to_owned(), 3)]),
        "--reset aggregates only the new events"
    );
}

#[test]
fn words_that_are_not_utf8_are_counted_as_their_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("wc");
    // Latin-1: `café` twice, `cafè` once, `naïve` once; one line ends in CRLF.
    let text: &[u8] = b"caf\xe9 caf\xe8 the\r\nna\xefve caf\xe9 the\n";
    let latin1 = dir.path().join("latin1.txt");
    std::fs::write(&latin1, text).unwrap();
    let out = word_count(&data).arg(&latin1).output().unwrap();
    assert_success(&out, "word count over Latin-1");
    let expected = HashMap::from([
        (b"caf\xe9".to_vec(), 2),
        (b"caf\xe8".to_vec(), 1),
        (b"na\xefve".to_vec(), 1),
        (b"the".to_vec(), 2),
    ]);
    assert_eq!(
        sum_parquet_bytes(&data.join("output")),
        expected,
        "each word counted as its own bytes"
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.lines().any(|l| l.trim() == "2  caf\\xE9"),
        "the top words show the Latin-1 word's byte: {stdout}"
    );
    // The run ends with one summary line: 6 words in 2 lines, and a rate.
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("processed "))
        .unwrap_or_else(|| panic!("a summary line: {stdout}"));
    assert!(
        summary.starts_with("processed 2 records in ") && summary.ends_with(" records/s"),
        "{summary}"
    );
}

#[test]
fn errors_name_the_input_and_line_and_print_no_backtrace_unless_asked() {
    let dir = tempfile::tempdir().unwrap();
    // A directory opens like a file on Unix; reading its first line fails.
    let unreadable = dir.path().join("not-a-file");
    std::fs::create_dir(&unreadable).unwrap();
    let out = word_count(&dir.path().join("a")).arg(&unreadable).output().unwrap();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    let first_line = text.lines().next().unwrap_or("");
    assert!(
        first_line.starts_with(&format!("error: cannot read {} at line 1: ", unreadable.display())),
        "one line naming the file, the line and the cause: {text}"
    );
    assert!(
        !text.to_lowercase().contains("backtrace"),
        "no backtrace unless asked: {text}"
    );

    let missing = dir.path().join("missing.txt");
    let out = word_count(&dir.path().join("b")).arg(&missing).output().unwrap();
    let text = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "{text}");
    assert!(
        text.starts_with(&format!("error: cannot open {}: ", missing.display())),
        "{text}"
    );
    assert!(
        !text.to_lowercase().contains("backtrace"),
        "no backtrace unless asked: {text}"
    );

    // Asked for, the backtrace is there: the checks above can tell the difference.
    let out = word_count(&dir.path().join("c"))
        .arg(&missing)
        .env("RUST_BACKTRACE", "1")
        .output()
        .unwrap();
    assert!(
        stderr(&out).contains("backtrace:"),
        "RUST_BACKTRACE=1 prints one: {}",
        stderr(&out)
    );
}
