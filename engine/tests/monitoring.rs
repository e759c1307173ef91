//! The monitoring server of a running context, scraped over real TCP: `/metrics` (Prometheus text
//! format) moves while a word count runs and agrees with `MetricsSnapshot`; `/api/status` and the
//! status page are served; the server starts with `start()`, stops with `stop()`, stays up while
//! a stop drains, and a taken address is a typed error. A restart with unfinished work shows as
//! the last recovery, with the blocks it replayed and their ranges.

#![allow(
    clippy::float_cmp,
    reason = "the samples compared are counts, exact in an f64 far beyond these tests' values"
)]

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_blockstore::{Clock, ManualClock};
use sluice_engine::{Error, StopMode, StreamingContext};
use sluice_operators::bench_data;
use sluice_receiver::ReceiverConfig;

mod support;

use support::{DRAIN_TIMEOUT, STREAM, fill_log, monitored_context, paced_receiver_config, word_count};

const WORKER: &str = "monitor-test";

/// A plain HTTP/1.1 request over a fresh connection: status code, headers (lower-case names) and
/// body.
fn http(addr: SocketAddr, method: &str, path: &str) -> (u16, HashMap<String, String>, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(
        stream,
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = String::new();
    stream.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a response head");
    let mut lines = head.lines();
    let code = lines.next().unwrap().split(' ').nth(1).unwrap().parse().unwrap();
    let headers = lines
        .filter_map(|l| l.split_once(": "))
        .map(|(k, v)| (k.to_ascii_lowercase(), v.to_owned()))
        .collect();
    (code, headers, body.to_owned())
}

/// `/metrics` as sample → value, where a sample is `name` or `name{labels}` as written.
fn scrape(addr: SocketAddr) -> HashMap<String, f64> {
    let (code, headers, body) = http(addr, "GET", "/metrics");
    assert_eq!(code, 200, "{body}");
    assert_eq!(headers["content-type"], "text/plain; version=0.0.4; charset=utf-8");
    parse_exposition(&body)
}

/// Parses the Prometheus text format, checking that every sample belongs to a family declared
/// once with `# HELP` and `# TYPE`, and that counters end in `_total`.
fn parse_exposition(body: &str) -> HashMap<String, f64> {
    let mut types: HashMap<String, String> = HashMap::new();
    let mut samples = HashMap::new();
    for line in body.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            assert!(
                types.insert(name.to_owned(), kind.to_owned()).is_none(),
                "{name} declared twice"
            );
            if kind == "counter" {
                assert!(name.ends_with("_total"), "counter {name} does not end in _total");
            }
            continue;
        }
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let (sample, value) = line.rsplit_once(' ').unwrap();
        let name = sample.split('{').next().unwrap();
        let family = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|f| types.get(*f).is_some_and(|k| k == "histogram"))
            })
            .unwrap_or(name);
        assert!(types.contains_key(family), "sample {sample} has no # TYPE");
        assert!(name.starts_with("sluice_"), "{name}");
        samples.insert(sample.to_owned(), value.parse::<f64>().unwrap());
    }
    samples
}

fn value(samples: &HashMap<String, f64>, sample: &str) -> f64 {
    *samples
        .get(sample)
        .unwrap_or_else(|| panic!("{sample} is not exported; got {:?}", samples.keys()))
}

/// Samples whose name is `name` (any labels).
fn family<'a>(samples: &'a HashMap<String, f64>, name: &str) -> Vec<(&'a String, f64)> {
    samples
        .iter()
        .filter(|(s, _)| s.split('{').next() == Some(name))
        .map(|(s, v)| (s, *v))
        .collect()
}

fn wait_until<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    let started = Instant::now();
    loop {
        if let Some(found) = probe() {
            return found;
        }
        assert!(started.elapsed() < DRAIN_TIMEOUT, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(25));
    }
}

fn any_port() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

#[test]
#[allow(
    clippy::too_many_lines,
    reason = "one scenario: scrapes while running, after draining and after stopping, in order"
)]
fn metrics_move_while_a_word_count_runs_and_match_the_snapshot() {
    let lines = bench_data::zipf_lines(12_000, 400, 11);
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 2);
    let ctx = monitored_context(&dir.path().join("data"), WORKER);
    let config = paced_receiver_config();
    let stream = ctx.local_log_stream(&dir.path().join("log"), STREAM, config).unwrap();
    let totals = word_count(&stream);
    assert_eq!(ctx.metrics_addr(), None, "nothing is served before start");
    ctx.start().unwrap();
    let addr = ctx.metrics_addr().expect("served while running");
    assert_ne!(addr.port(), 0, "the bound port, not the configured 0");

    let total = lines.len() as f64;
    let processed = |s: &HashMap<String, f64>| value(s, "sluice_records_processed_total");
    let first = wait_until("a scrape in the middle of the input", || {
        let s = scrape(addr);
        (processed(&s) > 0.0 && processed(&s) < total).then_some(s)
    });
    let later = wait_until("the counters to move", || {
        let s = scrape(addr);
        (processed(&s) > processed(&first)).then_some(s)
    });
    assert!(value(&later, "sluice_batches_completed_total") > value(&first, "sluice_batches_completed_total"));
    let received = |s: &HashMap<String, f64>| {
        value(
            s,
            &format!("sluice_receiver_records_received_total{{stream=\"{STREAM}\"}}"),
        )
    };
    assert!(received(&later) >= received(&first));

    // While batches run, a scrape lies between the snapshots taken around it.
    let before = ctx.metrics();
    let during = scrape(addr);
    let after = ctx.metrics();
    for (sample, low, high) in [
        (
            "sluice_batches_completed_total",
            before.batches_completed,
            after.batches_completed,
        ),
        (
            "sluice_records_processed_total",
            before.records_processed,
            after.records_processed,
        ),
        ("sluice_blocks_stored_total", before.blocks_stored, after.blocks_stored),
        ("sluice_task_attempts_total", before.task_attempts, after.task_attempts),
    ] {
        let v = value(&during, sample);
        assert!(
            (low as f64..=high as f64).contains(&v),
            "{sample} = {v}, snapshots {low}..={high}"
        );
    }

    assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap());
    // Drained: what moves only with records stands still and equals the snapshot exactly.
    let snapshot = ctx.metrics();
    let done = scrape(addr);
    assert_eq!(processed(&done), total);
    assert_eq!(snapshot.records_processed as f64, total);
    assert_eq!(
        value(&done, "sluice_blocks_stored_total"),
        snapshot.blocks_stored as f64
    );
    assert_eq!(
        value(&done, "sluice_ingest_gate_waits_total"),
        snapshot.ingest_gate_waits as f64
    );
    assert_eq!(
        value(&done, "sluice_ingest_gate_wait_seconds_total"),
        snapshot.ingest_gate_wait_micros as f64 / 1e6
    );
    assert_eq!(
        value(&done, "sluice_block_store_blocks_stored_total"),
        snapshot.blocks_stored as f64
    );
    assert_eq!(
        value(&done, "sluice_task_failures_total"),
        snapshot.task_failures as f64
    );
    assert_eq!(value(&done, "sluice_dead_letters_total"), snapshot.dead_letters as f64);
    assert_eq!(
        value(&done, "sluice_blocks_replayed_total"),
        snapshot.blocks_replayed as f64
    );
    assert_eq!(received(&done), total);
    let per_shard = family(&done, "sluice_shard_records_received_total");
    assert_eq!(per_shard.len(), 2, "{per_shard:?}");
    assert_eq!(per_shard.iter().map(|(_, v)| v).sum::<f64>(), total);
    // Bytes as Kinesis counts them: payload plus partition key (`fill_log` keys by line number).
    let bytes: f64 = family(&done, "sluice_shard_bytes_received_total")
        .iter()
        .map(|(_, v)| v)
        .sum();
    let expected: usize = lines
        .iter()
        .enumerate()
        .map(|(i, l)| l.len() + i.to_string().len())
        .sum();
    assert_eq!(bytes, expected as f64);
    let owners = family(&done, "sluice_shard_lease_owner_info");
    assert_eq!(owners.len(), 2);
    assert!(
        owners
            .iter()
            .all(|(s, v)| s.contains(&format!("owner=\"{WORKER}\"")) && *v == 1.0),
        "{owners:?}"
    );
    assert!(family(&done, "sluice_shard_arrival_age_seconds").len() == 2);
    let stream_label = format!("{{stream=\"{STREAM}\"}}");
    let checkpoints = value(
        &done,
        &format!("sluice_receiver_checkpoint_successes_total{stream_label}"),
    );
    assert!(checkpoints > 0.0);
    assert!(
        checkpoints
            <= value(
                &done,
                &format!("sluice_receiver_checkpoint_attempts_total{stream_label}")
            )
    );
    assert_eq!(value(&done, "sluice_stream_running"), 1.0);
    assert_eq!(value(&done, "sluice_stream_failed"), 0.0);
    assert_eq!(
        value(&done, "sluice_detector_active{detector=\"high_error_rate\"}"),
        0.0
    );
    assert_eq!(
        value(&done, "sluice_health_events_total{detector=\"stuck_processing\"}"),
        0.0
    );
    // Each histogram counts every completed batch; empty batches keep completing while idle.
    let low = ctx.metrics().batches_completed as f64;
    let histogram = scrape(addr);
    let high = ctx.metrics().batches_completed as f64;
    for name in ["scheduling", "processing", "total"] {
        let count = value(&histogram, &format!("sluice_batch_{name}_delay_seconds_count"));
        assert!((low..=high).contains(&count), "{name}: {count} not in {low}..={high}");
        let inf = value(
            &histogram,
            &format!("sluice_batch_{name}_delay_seconds_bucket{{le=\"+Inf\"}}"),
        );
        assert_eq!(inf, count);
    }

    // The JSON behind the page is the same status.
    let (code, headers, body) = http(addr, "GET", "/api/status");
    assert_eq!(code, 200);
    assert_eq!(headers["content-type"], "application/json");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(status["worker_id"], WORKER);
    assert_eq!(status["state"], "running");
    assert_eq!(status["metrics"]["records_processed"], lines.len());
    let batches = status["batches"].as_array().unwrap();
    assert!(!batches.is_empty() && batches.len() <= sluice_engine::RECENT_BATCHES);
    let shards = status["inputs"][0]["receiver"]["shards"].as_object().unwrap();
    assert_eq!(shards.len(), 2);
    assert!(
        shards
            .values()
            .all(|s| s["lease_owner"] == WORKER && s["owned"] == true)
    );
    // The same status, read in process.
    let in_process = ctx.status().unwrap();
    assert_eq!(in_process.worker_id, WORKER);
    assert_eq!(in_process.inputs[0].receiver.records_received, lines.len() as u64);

    // The page and its assets, served from the binary.
    let (code, headers, page) = http(addr, "GET", "/");
    assert_eq!(code, 200);
    assert!(headers["content-type"].starts_with("text/html"));
    assert!(page.contains("<script src=\"/status.js\">") && page.contains("id=\"chart-input-rate\""));
    let (code, _, script) = http(addr, "GET", "/status.js");
    assert_eq!(code, 200);
    assert!(script.contains("/api/status"));
    assert_eq!(http(addr, "GET", "/status.css").0, 200);
    let (code, _, missing) = http(addr, "GET", "/nope");
    assert_eq!(code, 404);
    assert!(missing.contains("/metrics"), "{missing}");
    let (code, headers, _) = http(addr, "POST", "/metrics");
    assert_eq!(code, 405);
    assert_eq!(headers["allow"], "GET, HEAD");

    ctx.stop(StopMode::Graceful).unwrap();
    assert_eq!(ctx.metrics_addr(), None);
    assert!(TcpStream::connect(addr).is_err(), "the server stopped with the context");
    assert_eq!(*totals.lock().unwrap(), bench_data::reference_word_count(&lines));
}

#[test]
fn a_taken_metrics_address_fails_start_with_a_typed_error_and_starts_nothing() {
    let lines = bench_data::zipf_lines(500, 50, 3);
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 1);
    let taken = TcpListener::bind(any_port()).unwrap();
    let addr = taken.local_addr().unwrap();
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_millis(100))
        .data_dir(dir.path().join("data"))
        .executor_threads(2)
        .metrics_addr(addr)
        .build()
        .unwrap();
    let stream = ctx
        .local_log_stream(&dir.path().join("log"), STREAM, ReceiverConfig::default())
        .unwrap();
    let totals = word_count(&stream);
    let err = ctx.start().unwrap_err();
    assert!(
        matches!(&err, Error::MetricsServer { addr: a, .. } if *a == addr),
        "{err:?}"
    );
    let message = err.to_string();
    assert!(
        message.contains(&addr.to_string()) && message.contains("metrics_addr"),
        "{message}"
    );
    assert!(matches!(ctx.status(), Err(Error::NotStarted)), "nothing runs");
    assert_eq!(ctx.metrics().blocks_stored, 0, "no receiver ran");

    drop(taken);
    ctx.start().unwrap();
    assert_eq!(ctx.metrics_addr(), Some(addr));
    assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap());
    ctx.stop(StopMode::Graceful).unwrap();
    assert_eq!(*totals.lock().unwrap(), bench_data::reference_word_count(&lines));
}

#[test]
fn a_bad_metrics_address_in_a_config_file_is_a_clear_error() {
    let err = serde_json::from_str::<sluice_engine::StreamingConfig>(r#"{ "metrics_addr": "localhost" }"#).unwrap_err();
    assert!(err.to_string().contains("socket address"), "{err}");
    let ok: sluice_engine::StreamingConfig = serde_json::from_str(r#"{ "metrics_addr": "[::1]:9898" }"#).unwrap();
    assert_eq!(ok.metrics_addr, Some("[::1]:9898".parse().unwrap()));
}

/// A graceful stop drains, an immediate one stops after the batch in progress; the page stays up
/// and says which until the batch it waits for is done, and goes with the stopped context.
#[test]
fn the_status_page_shows_a_stop_in_progress_until_its_batch_finishes() {
    for (mode, state) in [(StopMode::Graceful, "draining"), (StopMode::Immediate, "stopping")] {
        let lines = bench_data::zipf_lines(500, 50, 3);
        let dir = tempfile::tempdir().unwrap();
        fill_log(&dir.path().join("log"), &lines, 1);
        let ctx = monitored_context(&dir.path().join("data"), WORKER);
        let stream = ctx
            .local_log_stream(&dir.path().join("log"), STREAM, paced_receiver_config())
            .unwrap();
        // The first batch with records holds its output until the test has seen the page.
        let (release, released) = std::sync::mpsc::channel::<()>();
        let released = Mutex::new(released);
        let (entered, entered_rx) = std::sync::mpsc::channel::<()>();
        let entered = Mutex::new(entered);
        stream
            .foreach_batch(move |_, lines| {
                if !lines.is_empty() {
                    let _ = entered.lock().unwrap().send(());
                    let _ = released.lock().unwrap().recv();
                }
                Ok(())
            })
            .unwrap();
        ctx.start().unwrap();
        let addr = ctx.metrics_addr().unwrap();
        entered_rx.recv_timeout(DRAIN_TIMEOUT).expect("a batch with records");
        std::thread::scope(|scope| {
            let stopping = scope.spawn(|| ctx.stop(mode));
            wait_until(state, || {
                let (_, _, body) = http(addr, "GET", "/api/status");
                let status: serde_json::Value = serde_json::from_str(&body).unwrap();
                (status["state"] == state).then_some(())
            });
            drop(release);
            stopping.join().unwrap().unwrap();
        });
        assert!(
            TcpStream::connect(addr).is_err(),
            "the page goes with the stopped context"
        );
    }
}

/// The first run logs blocks but stops (non-graceful) before any batch takes them; the second
/// run recovers them: the status shows that recovery, the blocks it replayed (their copies died
/// with the first run) and their ranges.
#[test]
fn a_restart_with_unfinished_work_shows_as_the_last_recovery_with_its_replays() {
    let lines = bench_data::zipf_lines(3_000, 200, 5);
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 2);
    let config = ReceiverConfig {
        block_interval_ms: 50,
        ..ReceiverConfig::default()
    };

    let clock = Arc::new(ManualClock::new(1_000));
    let first = StreamingContext::builder()
        .batch_interval(Duration::from_secs(1))
        .data_dir(dir.path().join("data"))
        .executor_threads(2)
        .worker_id(WORKER)
        .metrics_addr(any_port())
        .clock(clock.clone())
        .build()
        .unwrap();
    let stream = first
        .local_log_stream(&dir.path().join("log"), STREAM, config.clone())
        .unwrap();
    let _first_totals = word_count(&stream);
    first.start().unwrap();
    // Blocks are sealed as the clock moves; the first batch is due at 2,000.
    wait_until("every record in a stored block", || {
        if clock.now_ms() < 1_900 {
            clock.advance_ms(50);
        }
        let status = first.status().unwrap();
        (status.inputs[0].receiver.records_stored == lines.len() as u64).then_some(())
    });
    assert!(
        first.status().unwrap().recovery.is_none(),
        "a fresh log has nothing to recover"
    );
    // Before the first batch time: the job generator sees the stop and runs no batch.
    first.stop(StopMode::Immediate).unwrap();
    assert_eq!(first.metrics().batches_completed, 0, "no batch ran in the first run");
    let logged = first.metrics().blocks_stored;
    assert!(logged > 0);

    let second = monitored_context(&dir.path().join("data"), WORKER);
    let stream = second
        .local_log_stream(&dir.path().join("log"), STREAM, config)
        .unwrap();
    let totals = word_count(&stream);
    second.start().unwrap();
    let addr = second.metrics_addr().unwrap();
    assert!(second.await_drained(DRAIN_TIMEOUT).unwrap());
    let status = second.status().unwrap();
    let recovery = status.recovery.clone().expect("the restart recovered the log");
    assert_eq!(recovery.kind, sluice_engine::RecoveryKind::Restart);
    assert!(recovery.batches_to_rerun.is_empty(), "no batch was allocated");
    assert_eq!(recovery.unallocated_blocks, logged);
    assert!(recovery.finished_ms.is_some(), "{recovery:?}");
    assert_eq!(
        recovery.blocks_replayed, logged,
        "every block's copy died with the first run"
    );
    assert_eq!(recovery.records_replayed, lines.len() as u64);
    assert_eq!(status.metrics.blocks_replayed, logged);
    let replays = &status.replays;
    assert_eq!(replays.len() as u64, logged.min(sluice_engine::RECENT_REPLAYS as u64));
    assert!(
        replays.iter().all(|r| r.ranges.contains(STREAM) && r.records > 0),
        "{replays:?}"
    );

    let metrics = scrape(addr);
    assert_eq!(value(&metrics, "sluice_blocks_replayed_total"), logged as f64);
    assert_eq!(value(&metrics, "sluice_records_replayed_total"), lines.len() as f64);
    assert_eq!(value(&metrics, "sluice_recovery_in_progress"), 0.0);
    assert_eq!(value(&metrics, "sluice_recovery_blocks_replayed"), logged as f64);
    assert!(value(&metrics, "sluice_replay_records_per_second") > 0.0);
    second.stop(StopMode::Graceful).unwrap();
    assert_eq!(*totals.lock().unwrap(), bench_data::reference_word_count(&lines));
}
