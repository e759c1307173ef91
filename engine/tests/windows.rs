//! Window operators against a brute-force reference.
//!
//! Which records land in which batch depends on timing, so the reference is built from what each
//! batch actually received: a `foreach_batch` on the stream below the window records every
//! batch's input, and the window at batch time `t` must equal the union (or the per-key sum) of
//! the inputs of batches `t - (length - 1) * interval ..= t`, and exist exactly at the batch times
//! that are multiples of the slide. A receiver rate limit spreads the data over many batches.
//!
//! Restart: after a graceful stop, a new context on the same data directory recomputes the
//! batches a window still spans from their logged blocks (read from the store, or replayed from
//! the log), so the first windows after the restart still include the first run's batches.
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_engine::{DStream, StopMode, StreamingContext, Window};
use sluice_operators::bench_data;

mod support;

use support::{DRAIN_TIMEOUT, STREAM, context, fill_log, receiver_config, words};

const BATCH_MS: i64 = 100;

type PerBatch<T> = Arc<Mutex<BTreeMap<i64, T>>>;

/// What one run of the pipeline records, shared across a restart.
#[derive(Default, Clone)]
struct Recorded {
    /// Input words of every batch that ran.
    inputs: PerBatch<Vec<String>>,
    /// `window(length, slide)`, sorted.
    window: PerBatch<Vec<String>>,
    /// `reduce_by_key_and_window` without the inverse function.
    counts: PerBatch<HashMap<String, u64>>,
    /// `reduce_by_key_and_window` with the inverse function (and a filter dropping zeros).
    counts_inverse: PerBatch<HashMap<String, u64>>,
}

fn record<T: Send + Sync + 'static>(stream: &DStream<T>, into: &PerBatch<Vec<T>>) {
    let into = into.clone();
    stream
        .foreach_batch(move |t, all| {
            into.lock().unwrap().insert(t.as_millis(), all);
            Ok(())
        })
        .unwrap();
}

fn record_map(stream: &DStream<(String, u64)>, into: &PerBatch<HashMap<String, u64>>) {
    let into = into.clone();
    stream
        .foreach_batch(move |t, all| {
            let map: HashMap<String, u64> = all.into_iter().collect();
            assert!(
                into.lock().unwrap().insert(t.as_millis(), map).is_none(),
                "two outputs for batch {t}"
            );
            Ok(())
        })
        .unwrap();
}

/// Builds the pipeline on `ctx`: every window operator over the same words.
fn build(ctx: &StreamingContext, log: &Path, rate: f64, length: usize, slide: usize, rec: &Recorded) {
    let config = sluice_receiver::ReceiverConfig {
        max_rate: Some(rate),
        // Small reads, so the limit spreads records evenly instead of one second's worth at once.
        read_max_records: Some(25),
        ..receiver_config(20)
    };
    let words = ctx.local_log_stream(log, STREAM, config).unwrap().flat_map(words);
    record(&words, &rec.inputs);
    let window = words
        .window(Window::new(length, slide).unwrap())
        .transform(|_t, mut all: Vec<String>| {
            all.sort_unstable();
            all
        });
    record(&window, &rec.window);
    let pairs = words.map(|w| (w, 1u64));
    record_map(
        &pairs.reduce_by_key_and_window(|a, b| a + b, None, None, Window::new(length, slide).unwrap()),
        &rec.counts,
    );
    record_map(
        &pairs.reduce_by_key_and_window(
            |a, b| a + b,
            Some(Arc::new(|a, b| a - b)),
            Some(Arc::new(|_k: &String, c: &u64| *c > 0)),
            Window::new(length, slide).unwrap(),
        ),
        &rec.counts_inverse,
    );
}

/// Checks every window output against the brute-force reference; returns, per window time, the
/// batch times (with input) it spans.
fn check(rec: &Recorded, length: usize, slide: usize) -> BTreeMap<i64, Vec<i64>> {
    let inputs = rec.inputs.lock().unwrap();
    let window = rec.window.lock().unwrap();
    let counts = rec.counts.lock().unwrap();
    let counts_inverse = rec.counts_inverse.lock().unwrap();
    let expected_times: Vec<i64> = inputs
        .keys()
        .copied()
        .filter(|t| (t / BATCH_MS).rem_euclid(slide as i64) == 0)
        .collect();
    assert!(expected_times.len() >= 3, "too few windows to test: {expected_times:?}");
    assert_eq!(window.keys().copied().collect::<Vec<_>>(), expected_times);
    assert_eq!(counts.keys().copied().collect::<Vec<_>>(), expected_times);
    assert_eq!(counts_inverse.keys().copied().collect::<Vec<_>>(), expected_times);
    let mut spans = BTreeMap::new();
    for &t in &expected_times {
        let span: Vec<i64> = (0..length as i64)
            .map(|k| t - k * BATCH_MS)
            .filter(|b| inputs.get(b).is_some_and(|w| !w.is_empty()))
            .collect();
        let mut union: Vec<String> = span.iter().flat_map(|b| inputs[b].iter().cloned()).collect();
        union.sort_unstable();
        let mut reference: HashMap<String, u64> = HashMap::new();
        for w in &union {
            *reference.entry(w.clone()).or_default() += 1;
        }
        assert!(
            window[&t] == union,
            "window({length}, {slide}) at {t}: {} elements, the reference has {}",
            window[&t].len(),
            union.len()
        );
        assert_eq!(counts[&t], reference, "reduce_by_key_and_window at {t}");
        assert_eq!(
            counts_inverse[&t], reference,
            "reduce_by_key_and_window with inverse at {t}"
        );
        spans.insert(t, span);
    }
    spans
}

fn wait_for_batches(rec: &Recorded, with_input: usize) {
    let deadline = Instant::now() + DRAIN_TIMEOUT;
    while rec.inputs.lock().unwrap().values().filter(|w| !w.is_empty()).count() < with_input {
        assert!(Instant::now() < deadline, "batches did not run");
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn windows_equal_the_brute_force_reference_for_every_batch() {
    let lines = bench_data::zipf_lines(1_500, 60, 31);
    for (length, slide) in [(3, 1), (4, 2), (2, 3)] {
        let dir = tempfile::tempdir().unwrap();
        fill_log(&dir.path().join("log"), &lines, 2);
        let ctx = context(&dir.path().join("data"), BATCH_MS as u64, 2);
        let rec = Recorded::default();
        // 1 500 lines at 1 000 records/s: about 15 batches with input.
        build(&ctx, &dir.path().join("log"), 1_000.0, length, slide, &rec);
        ctx.start().unwrap();
        assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap(), "not drained");
        ctx.stop(StopMode::Graceful).unwrap();
        let spans = check(&rec, length, slide);
        assert!(
            spans.values().any(|s| s.len() > 1),
            "no window spanned two batches with input: {spans:?}"
        );
        let total: usize = rec.inputs.lock().unwrap().values().map(Vec::len).sum();
        assert_eq!(
            total as u64,
            bench_data::reference_word_count(&lines).values().sum::<u64>()
        );
    }
}

#[test]
fn windows_span_the_batches_of_the_previous_run_after_a_graceful_restart() {
    let (length, slide) = (8, 2);
    let lines = bench_data::zipf_lines(2_000, 60, 37);
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log");
    fill_log(&log, &lines, 2);
    let rec = Recorded::default();

    let ctx = context(&dir.path().join("data"), BATCH_MS as u64, 2);
    build(&ctx, &log, 1_000.0, length, slide, &rec);
    ctx.start().unwrap();
    wait_for_batches(&rec, 4);
    ctx.stop(StopMode::Graceful).unwrap();
    drop(ctx);
    let first_run_last = *rec.inputs.lock().unwrap().keys().next_back().unwrap();

    let ctx = context(&dir.path().join("data"), BATCH_MS as u64, 2);
    build(&ctx, &log, 1_000.0, length, slide, &rec);
    ctx.start().unwrap();
    assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap(), "not drained");
    ctx.stop(StopMode::Graceful).unwrap();

    let spans = check(&rec, length, slide);
    // Not vacuous: a window of the second run includes batches of the first run that had input
    // (the restart takes well under the window's 800 ms).
    assert!(
        spans
            .iter()
            .any(|(t, s)| *t > first_run_last && s.iter().any(|b| *b <= first_run_last)),
        "no window after the restart spans the first run (last batch {first_run_last}): {spans:?}"
    );
    let total: usize = rec.inputs.lock().unwrap().values().map(Vec::len).sum();
    assert_eq!(
        total as u64,
        bench_data::reference_word_count(&lines).values().sum::<u64>(),
        "every word in exactly one batch across both runs"
    );
}

/// The same reference check on the test harness: a manual clock and records pushed per batch,
/// so which batch holds which words is decided by the test, not by timing.
#[test]
fn windows_on_a_manual_clock_equal_the_brute_force_reference() {
    use sluice_engine::testing::TestHarness;
    let lines = bench_data::zipf_lines(240, 30, 41);
    for (length, slide) in [(3, 1), (4, 2), (2, 3)] {
        let h = TestHarness::new().unwrap();
        let stream = h.input().unwrap().flat_map(words);
        let window = h.collect(&stream.window(Window::new(length, slide).unwrap())).unwrap();
        let pairs = stream.map(|w| (w, 1u64));
        let counts = h
            .collect(&pairs.reduce_by_key_and_window(|a, b| a + b, None, None, Window::new(length, slide).unwrap()))
            .unwrap();
        let counts_inverse = h
            .collect(&pairs.reduce_by_key_and_window(
                |a, b| a + b,
                Some(Arc::new(|a, b| a - b)),
                Some(Arc::new(|_k: &String, c: &u64| *c > 0)),
                Window::new(length, slide).unwrap(),
            ))
            .unwrap();
        h.start().unwrap();
        // 12 batches of 20 lines; the batch times count from the harness's first batch.
        let mut per_batch: Vec<Vec<String>> = Vec::new();
        let mut emitted_at = Vec::new();
        for (i, chunk) in lines.chunks(20).enumerate() {
            h.push(chunk.iter().cloned());
            let info = h.run_batch().unwrap();
            per_batch.push(
                chunk
                    .iter()
                    .flat_map(|l| words(bytes::Bytes::from(l.clone())))
                    .collect(),
            );
            if (info.batch_time.as_millis() / BATCH_WINDOW_MS).rem_euclid(slide as i64) == 0 {
                emitted_at.push(i);
            }
        }
        assert!(emitted_at.len() >= 3);
        let windows = window.batches();
        let (counts, counts_inverse) = (counts.batches(), counts_inverse.batches());
        assert_eq!(windows.len(), emitted_at.len(), "one window per slide");
        for (k, &i) in emitted_at.iter().enumerate() {
            let mut reference: Vec<String> = per_batch[i.saturating_sub(length - 1)..=i].concat();
            reference.sort_unstable();
            let mut got = windows[k].clone();
            got.sort_unstable();
            assert_eq!(got, reference, "window({length}, {slide}) ending at batch {i}");
            let mut expected: HashMap<String, u64> = HashMap::new();
            for w in &reference {
                *expected.entry(w.clone()).or_default() += 1;
            }
            assert_eq!(counts[k].iter().cloned().collect::<HashMap<_, _>>(), expected);
            assert_eq!(counts_inverse[k].iter().cloned().collect::<HashMap<_, _>>(), expected);
        }
    }
}

/// The harness's batch interval, in the units window slides count.
const BATCH_WINDOW_MS: i64 = sluice_engine::testing::HARNESS_BATCH_MS;
