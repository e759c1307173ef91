//! The status page in a real browser: the word-count example runs with `--metrics-addr`, headless
//! Chromium loads its status page, lets the page's script poll `/api/status` and draw, and the
//! rendered DOM must show completed batches, the four charts with one point per batch, and the
//! shards. Needs Chromium: `scripts/test` (and `scripts/with-emulators`) install Debian's
//! `chromium` when missing and pass its path as `SLUICE_CHROMIUM`; without it this test fails.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use support::example_binary;

const WAIT: Duration = Duration::from_secs(180);

/// Kills the example when the test ends, however it ends.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _killed = self.0.kill();
        let _reaped = self.0.wait();
    }
}

/// The value of attribute `attr` in the tag of the element with id `id`.
fn attribute<'a>(dom: &'a str, id: &str, attr: &str) -> Option<&'a str> {
    let at = dom.find(&format!("id=\"{id}\""))?;
    let start = dom[..at].rfind('<')?;
    let tag = &dom[start..start + dom[start..].find('>')?];
    let value = &tag[tag.find(&format!(" {attr}=\""))? + attr.len() + 3..];
    Some(&value[..value.find('"')?])
}

/// The markup inside the element with id `id` (up to its closing `</tag>`; no nesting of the
/// same tag, as for the page's `svg`s).
fn inner<'a>(dom: &'a str, id: &str, tag: &str) -> &'a str {
    let at = dom.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no #{id}"));
    let end = dom[at..].find(&format!("</{tag}>")).unwrap();
    &dom[at..at + end]
}

#[test]
fn the_status_page_of_a_running_word_count_renders_its_batches_in_chromium() {
    let chromium = std::env::var("SLUICE_CHROMIUM").expect(
        "SLUICE_CHROMIUM is not set: run through `scripts/test` or `scripts/with-emulators cargo test ...` \
         (they install Debian's chromium with apt-get when missing), or set it to a Chromium binary",
    );
    assert!(
        std::path::Path::new(&chromium).is_file(),
        "SLUICE_CHROMIUM={chromium} does not exist: install Debian's chromium (apt-get install -y chromium)"
    );
    let dir = tempfile::tempdir().unwrap();
    let mut example = Command::new(example_binary("word_count"));
    example
        .args(["--data-dir", dir.path().join("wc").to_str().unwrap()])
        .args([
            "--corpus-lines",
            "40000",
            "--batch-ms",
            "200",
            "--block-ms",
            "50",
            "--threads",
            "2",
        ])
        .args(["--follow", "--metrics-addr", "127.0.0.1:0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut running = Running(example.spawn().unwrap());

    // The URL is on stderr; batch lines ("batch <time> | <n> records | …") on stdout.
    let (lines, seen) = mpsc::channel();
    for stream in [
        Box::new(running.0.stderr.take().unwrap()) as Box<dyn std::io::Read + Send>,
        Box::new(running.0.stdout.take().unwrap()),
    ] {
        let lines = lines.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    break;
                }
            }
        });
    }
    let started = Instant::now();
    let mut url = None;
    let mut batches_with_records = 0;
    let mut output = Vec::new();
    while url.is_none() || batches_with_records < 2 {
        let left = WAIT.checked_sub(started.elapsed()).unwrap_or_default();
        let Ok(line) = seen.recv_timeout(left) else {
            panic!(
                "no status page URL or no batch with records within {WAIT:?}; output:\n{}",
                output.join("\n")
            );
        };
        if let Some(rest) = line.strip_prefix("status page: ") {
            url = rest.split_whitespace().next().map(str::to_owned);
        }
        if line.starts_with("batch ")
            && line
                .split('|')
                .nth(1)
                .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
                > Some(0)
        {
            batches_with_records += 1;
        }
        output.push(line);
    }
    let url = url.unwrap();
    assert!(
        url.starts_with("http://127.0.0.1:") && !url.starts_with("http://127.0.0.1:0/"),
        "{url}"
    );

    let profile = tempfile::tempdir().unwrap();
    let mut browser = Command::new(&chromium)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--virtual-time-budget=5000",
            "--dump-dom",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .arg(&url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut dom = String::new();
    let reader = {
        let mut stdout = browser.stdout.take().unwrap();
        std::thread::spawn(move || {
            let mut dom = String::new();
            std::io::Read::read_to_string(&mut stdout, &mut dom).map(|_| dom)
        })
    };
    let browser_started = Instant::now();
    while browser.try_wait().unwrap().is_none() {
        if browser_started.elapsed() > WAIT {
            browser.kill().unwrap();
            panic!("chromium did not finish within {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    dom.push_str(&reader.join().unwrap().unwrap());
    drop(running);

    assert!(dom.contains("<h1>Sluice"), "not the status page:\n{dom}");
    assert!(
        !dom.contains("Cannot read /api/status"),
        "the page could not poll:\n{dom}"
    );
    let batches: u64 = attribute(&dom, "batch-count", "data-value")
        .unwrap_or_else(|| panic!("no batch count:\n{dom}"))
        .parse()
        .unwrap();
    assert!(batches > 0, "batch count {batches}");
    let records = inner(&dom, "records-processed", "div");
    assert!(!records.ends_with(">–"), "records processed not drawn: {records}");
    for chart in [
        "chart-input-rate",
        "chart-processing-time",
        "chart-scheduling-delay",
        "chart-total-delay",
    ] {
        let points: usize = attribute(&dom, chart, "data-points")
            .unwrap_or_else(|| panic!("{chart} was not drawn:\n{dom}"))
            .parse()
            .unwrap();
        assert!(points > 0, "{chart}: no point");
        let svg = inner(&dom, chart, "svg");
        assert!(svg.contains("class=\"series\" d=\"M"), "{chart} has no line: {svg}");
        assert_eq!(svg.matches("<circle").count(), points, "{chart}: a dot per batch");
    }
    let shards = inner(&dom, "shards", "table");
    assert!(
        shards.contains("shardId-000000000000") && shards.contains("shardId-000000000001"),
        "{shards}"
    );
    assert!(inner(&dom, "detectors", "table").contains("stuck processing"));
}
