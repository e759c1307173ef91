//! The status page in a real browser: a word count runs on the local log with a metrics address
//! on port 0, headless Chromium loads the page from the address the context reports, lets the
//! page's script poll `/api/status` and draw, and the rendered DOM must show what the pipeline
//! did — the batches completed, every record processed, the four charts with a point per batch,
//! a row per shard with its records and lease owner, the detectors.
//!
//! Needs Chromium (`SLUICE_CHROMIUM`, default Debian's `/usr/bin/chromium`). `scripts/test` (and
//! `scripts/with-emulators`) install Debian's `chromium` package when it is missing; without it
//! this test fails and says how to install it — it never skips.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use sluice_engine::StopMode;
use sluice_operators::bench_data;

mod support;

use support::{DRAIN_TIMEOUT, STREAM, fill_log, monitored_context, paced_receiver_config, word_count};

/// Where Debian's `chromium` package installs the browser.
const DEFAULT_CHROMIUM: &str = "/usr/bin/chromium";
/// How long Chromium may take to load, run and dump the page.
const BROWSER_TIMEOUT: Duration = Duration::from_secs(120);
const WORKER: &str = "page-test";
const LINES: usize = 6_000;

/// The Chromium to drive: `SLUICE_CHROMIUM` if set, else Debian's `/usr/bin/chromium`. Missing
/// is a failure naming the fix, never a skip.
fn chromium() -> String {
    let (chromium, from) = match std::env::var("SLUICE_CHROMIUM") {
        Ok(path) => (path, "SLUICE_CHROMIUM"),
        Err(_) => (DEFAULT_CHROMIUM.to_owned(), "the default path"),
    };
    assert!(
        std::path::Path::new(&chromium).is_file(),
        "no Chromium at {chromium} ({from}): this browser test needs headless Chromium. Install Debian's \
         package with `sudo apt-get install -y chromium` (scripts/test does it when missing), or set \
         SLUICE_CHROMIUM to a Chromium binary"
    );
    chromium
}

/// Loads `url` in headless Chromium (a fresh profile, nothing fetched but the page), gives its
/// scripts `budget_ms` of virtual time, and returns the DOM as rendered then.
fn dump_dom(chromium: &str, url: &str, budget_ms: u64) -> String {
    let profile = tempfile::tempdir().unwrap();
    let mut browser = Command::new(chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--dump-dom",
        ])
        .arg(format!("--virtual-time-budget={budget_ms}"))
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {chromium}: {e}"));
    let (stdout, stderr) = (browser.stdout.take().unwrap(), browser.stderr.take().unwrap());
    let read = |mut from: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut from, &mut text).map(|_| text)
        })
    };
    let (dom, log) = (read(Box::new(stdout)), read(Box::new(stderr)));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = browser.try_wait().unwrap() {
            break status;
        }
        if started.elapsed() > BROWSER_TIMEOUT {
            browser.kill().unwrap();
            browser.wait().unwrap();
            panic!("chromium did not finish within {BROWSER_TIMEOUT:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let (dom, log) = (dom.join().unwrap().unwrap(), log.join().unwrap().unwrap());
    assert!(status.success(), "chromium failed ({status}):\n{log}");
    dom
}

/// The value of attribute `attr` in the tag of the element with id `id`.
fn attribute<'a>(dom: &'a str, id: &str, attr: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = dom[..at].rfind('<')?;
    let tag = &dom[start..start + dom[start..].find('>')?];
    let value = &tag[tag.find(&format!(" {attr}=\""))? + attr.len() + 3..];
    Some(&value[..value.find('"')?])
}

/// The markup inside the element with id `id`, up to its closing `</tag>` (the page does not nest
/// these tags in themselves).
fn inner<'a>(dom: &'a str, id: &str, tag: &str) -> &'a str {
    let at = dom
        .find(&format!("id=\"{id}\""))
        .unwrap_or_else(|| panic!("no #{id} in:\n{dom}"));
    let end = dom[at..].find(&format!("</{tag}>")).unwrap();
    &dom[at..at + end]
}

/// `n` as the page prints counts (`en-US`: `12,345`).
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Each of the four charts has a line, and a point and a dot per batch the status kept (at least
/// the `low` batches completed before the page loaded).
fn assert_charts(dom: &str, low: usize) {
    for chart in [
        "chart-input-rate",
        "chart-processing-time",
        "chart-scheduling-delay",
        "chart-total-delay",
    ] {
        let points: usize = attribute(dom, chart, "data-points")
            .unwrap_or_else(|| panic!("{chart} was not drawn:\n{dom}"))
            .parse()
            .unwrap();
        assert!(
            (low..=sluice_engine::RECENT_BATCHES).contains(&points),
            "{chart}: {points} points, expected one per batch kept ({low}..)"
        );
        let svg = inner(dom, chart, "svg");
        assert!(svg.contains("class=\"series\" d=\"M"), "{chart} has no line: {svg}");
        assert_eq!(svg.matches("<circle").count(), points, "{chart}: a dot per batch");
    }
    // Drawn from the batches, not the placeholder of a page with none.
    assert!(
        !inner(dom, "chart-input-rate", "svg").contains("no batch completed yet"),
        "input rate chart empty"
    );
}

/// A row per shard of `input`, with its records and lease owner as the context counts them.
fn assert_shard_rows(dom: &str, input: &sluice_engine::InputStatus) {
    let shards = inner(dom, "shards", "table");
    assert_eq!(input.receiver.shards.len(), 2);
    for (shard, m) in &input.receiver.shards {
        let row_at = shards
            .find(&format!(">{shard}<"))
            .unwrap_or_else(|| panic!("no row for {shard}: {shards}"));
        let row = &shards[row_at..row_at + shards[row_at..].find("</tr>").unwrap()];
        assert!(
            row.contains(&format!(">{WORKER}<")),
            "{shard}'s lease owner not shown: {row}"
        );
        assert!(
            row.contains(&format!(">{}<", grouped(m.records_received))),
            "{shard}'s {} records not shown: {row}",
            m.records_received
        );
    }
}

#[test]
fn the_status_page_of_a_running_word_count_renders_its_batches_in_chromium() {
    let chromium = chromium();
    let lines = bench_data::zipf_lines(LINES, 300, 7);
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 2);
    let ctx = monitored_context(&dir.path().join("data"), WORKER);
    let config = paced_receiver_config();
    let stream = ctx.local_log_stream(&dir.path().join("log"), STREAM, config).unwrap();
    let totals = word_count(&stream);
    ctx.start().unwrap();
    let addr = ctx.metrics_addr().expect("served while running");
    assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap());
    // Drained: records, shards and owners stand still; batches keep completing (empty ones).
    let before = ctx.status().unwrap();
    assert_eq!(before.metrics.records_processed, LINES as u64);
    let with_records = before.batches.iter().filter(|b| b.num_records > 0).count();
    assert!(
        with_records >= 2,
        "the input spans several batches: {:?}",
        before.batches
    );

    let dom = dump_dom(&chromium, &format!("http://{addr}/"), 3_000);
    let after = ctx.status().unwrap();
    ctx.stop(StopMode::Graceful).unwrap();
    assert_eq!(*totals.lock().unwrap(), bench_data::reference_word_count(&lines));

    assert!(dom.contains("<h1>Sluice"), "not the status page:\n{dom}");
    assert!(
        !dom.contains("Cannot read /api/status"),
        "the page could not poll:\n{dom}"
    );
    assert!(
        inner(&dom, "summary-line", "div").contains(WORKER),
        "the worker id was not drawn:\n{dom}"
    );
    // What the page shows was read between the two in-process statuses.
    let completed = |s: &sluice_engine::StreamingStatus| s.metrics.batches_completed;
    let shown: u64 = attribute(&dom, "batch-count", "data-value")
        .unwrap_or_else(|| panic!("no batch count:\n{dom}"))
        .parse()
        .unwrap();
    assert!(
        (completed(&before)..=completed(&after)).contains(&shown),
        "batch count {shown} not in {}..={}",
        completed(&before),
        completed(&after)
    );
    let records = inner(&dom, "records-processed", "div");
    assert!(
        records.ends_with(&format!(">{}", grouped(LINES as u64))),
        "records processed is not the {LINES} lines loaded: {records}"
    );
    assert_charts(&dom, before.batches.len());
    assert_shard_rows(&dom, &after.inputs[0]);
    let detectors = inner(&dom, "detectors", "table");
    assert!(
        detectors.contains("stuck processing") && detectors.contains("high error rate"),
        "{detectors}"
    );
    assert!(inner(&dom, "recovery", "dl").contains("none since the context was built"));
}
