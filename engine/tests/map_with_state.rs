//! `map_with_state`: running totals equal the reference, the function sees only keys with new
//! values, idle keys time out, state survives a crash through full snapshots plus deltas, and a
//! panicking function is retried from the state its batch began with.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sluice_engine::{DStream, StateSpec, StopMode};
use sluice_operators::bench_data;

mod support;

use support::{DRAIN_TIMEOUT, STREAM, context, fill_log, receiver_config, words};

type Totals = Arc<Mutex<HashMap<String, u64>>>;
type PerBatch = Arc<Mutex<Vec<usize>>>;
type Keys = Arc<Mutex<HashSet<String>>>;

/// Word totals through `map_with_state`; returns (totals after the last batch, how many keys the
/// function emitted per batch, keys that timed out).
fn totals(lines: &DStream<Bytes>, spec_timeout: Option<usize>, full_every: usize) -> (Totals, PerBatch, Keys) {
    let timed_out: Arc<Mutex<HashSet<String>>> = Arc::default();
    let t = timed_out.clone();
    let mut spec = StateSpec::new(move |word: &String, counts: Vec<u64>, state| {
        if state.is_timing_out() {
            t.lock().unwrap().insert(word.clone());
            return None;
        }
        let total = state.get().copied().unwrap_or(0) + counts.iter().sum::<u64>();
        state.update(total);
        Some((word.clone(), total))
    })
    .full_snapshot_every(full_every);
    if let Some(batches) = spec_timeout {
        spec = spec.timeout(batches);
    }
    let mapped = lines.flat_map(words).count_by_value().map_with_state(spec);
    let touched_per_batch: Arc<Mutex<Vec<usize>>> = Arc::default();
    let touched = touched_per_batch.clone();
    mapped
        .foreach_batch(move |_t, out: Vec<(String, u64)>| {
            touched.lock().unwrap().push(out.len());
            Ok(())
        })
        .unwrap();
    let latest: Totals = Arc::default();
    let keep = latest.clone();
    mapped
        .state_snapshots()
        .foreach_batch(move |_t, all| {
            *keep.lock().unwrap() = all.into_iter().collect();
            Ok(())
        })
        .unwrap();
    (latest, touched_per_batch, timed_out)
}

#[test]
fn running_totals_equal_the_reference_and_only_new_keys_are_touched() {
    let lines = bench_data::zipf_lines(5_000, 400, 3);
    let reference = bench_data::reference_word_count(&lines);
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 2);
    let ctx = context(&dir.path().join("data"), 100, 2);
    let stream = ctx
        .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(20))
        .unwrap();
    let (latest, touched, _) = totals(&stream, None, 4);
    ctx.start().unwrap();
    assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap());
    // A batch after the data was read touches nothing: the function sees only keys with values.
    // (A graceful stop with nothing left runs no batch, so wait for the next one.)
    let drained_at = touched.lock().unwrap().len();
    let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
    while touched.lock().unwrap().len() == drained_at {
        assert!(
            std::time::Instant::now() < deadline,
            "no batch ran after the data was read"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    ctx.stop(StopMode::Graceful).unwrap();
    assert_eq!(*latest.lock().unwrap(), reference);
    let touched = touched.lock().unwrap();
    assert_eq!(touched[drained_at], 0, "an idle batch must emit nothing: {touched:?}");
    assert!(touched.iter().all(|n| *n <= reference.len()));
}

#[test]
fn idle_keys_time_out_and_leave_the_state() {
    let lines = bench_data::zipf_lines(2_000, 200, 5);
    let reference = bench_data::reference_word_count(&lines);
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 2);
    let ctx = context(&dir.path().join("data"), 50, 2);
    let stream = ctx
        .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(20))
        .unwrap();
    let (latest, _, timed_out) = totals(&stream, Some(3), 2);
    ctx.start().unwrap();
    assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap());
    // Every word goes idle once the log is read: after the timeout every one is gone.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while timed_out.lock().unwrap().len() < reference.len() {
        assert!(std::time::Instant::now() < deadline, "not every key timed out");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    ctx.stop(StopMode::Graceful).unwrap();
    let timed_out = timed_out.lock().unwrap();
    assert_eq!(
        timed_out.iter().cloned().collect::<HashSet<_>>(),
        reference.keys().cloned().collect()
    );
    assert!(latest.lock().unwrap().is_empty(), "timed-out keys leave the state");
}

#[test]
fn state_survives_crashes_through_full_snapshots_and_deltas() {
    let lines = bench_data::zipf_lines(6_000, 300, 9);
    let reference = bench_data::reference_word_count(&lines);
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 2);
    let data = dir.path().join("data");
    // Read slowly so several runs each see part of the log; each run but the last is stopped
    // without draining (its unprocessed blocks are logged and re-run after the restart).
    let kinds: Arc<Mutex<HashSet<String>>> = Arc::default();
    for run in 0..4 {
        let ctx = context(&data, 60, 2);
        let mut config = receiver_config(20);
        if run < 3 {
            // Small pages at 4 000 records/s: every batch gets some.
            config.max_rate = Some(4_000.0);
            config.read_max_records = Some(50);
        }
        let stream = ctx.local_log_stream(&dir.path().join("log"), STREAM, config).unwrap();
        let (latest, _, _) = totals(&stream, None, 3);
        // After every batch (listeners run with no engine lock held): which kinds of state
        // files the checkpoint holds.
        let (seen, dir) = (kinds.clone(), data.clone());
        ctx.add_batch_listener(move |_| seen.lock().unwrap().extend(state_file_kinds(&dir)));
        ctx.start().unwrap();
        if run < 3 {
            std::thread::sleep(std::time::Duration::from_millis(400));
            let _ = ctx.stop(StopMode::Immediate);
            continue;
        }
        assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap());
        ctx.stop(StopMode::Graceful).unwrap();
        assert_eq!(*latest.lock().unwrap(), reference, "totals after 3 crashes");
    }
    // The restores above read deltas on top of full snapshots.
    let kinds = kinds.lock().unwrap();
    assert!(kinds.contains("state") && kinds.contains("delta"), "{kinds:?}");
}

/// The kinds of state files (`state`, `delta`) under the data directory's checkpoint.
fn state_file_kinds(data: &std::path::Path) -> HashSet<String> {
    let mut kinds = HashSet::new();
    for worker in std::fs::read_dir(data.join("checkpoint").join("workers")).unwrap() {
        let Ok(files) = std::fs::read_dir(worker.unwrap().path().join("state")) else {
            continue;
        };
        for file in files {
            let name = file.unwrap().file_name().into_string().unwrap();
            kinds.insert(name.rsplit('.').next().unwrap().to_owned());
        }
    }
    kinds
}

/// A running total that panics once, part-way through a partition (after it updated the
/// state of the keys before it), in a batch and in a timeout: the retried update starts from the
/// state the batch began with, so no key is counted twice and none is lost; a function that
/// always panics stops the stream after `max_task_attempts`.
#[test]
fn a_map_with_state_function_that_panics_part_way_is_retried_from_the_batch_start_state() {
    use std::sync::atomic::AtomicBool;
    use std::sync::atomic::Ordering::SeqCst;

    use sluice_engine::testing::TestHarness;
    use sluice_engine::{Error, State};

    let text = |b: Bytes| String::from_utf8_lossy(&b).into_owned();
    // One partition: every key of a batch is updated by the same task, in one pass.
    let h = TestHarness::with_builder(|b| b.max_task_attempts(3).shuffle_partitions(1)).unwrap();
    let (failed_update, failed_timeout) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let (update_flag, timeout_flag) = (failed_update.clone(), failed_timeout.clone());
    let spec = StateSpec::new(move |word: &String, new: Vec<u64>, total: &mut State<'_, u64>| {
        if total.is_timing_out() {
            assert!(
                word != "gone" || timeout_flag.swap(true, SeqCst),
                "injected failure while timing out"
            );
            return total.get().map(|t| (format!("{word} (timed out)"), *t));
        }
        let sum = total.get().copied().unwrap_or(0) + new.iter().sum::<u64>();
        total.update(sum);
        // Panics after its own update, once: the attempt leaves this key (and those before it
        // in the pass) already changed.
        assert!(
            word != "b" || sum != 3 || update_flag.swap(true, SeqCst),
            "injected failure after an update"
        );
        Some((word.clone(), sum))
    })
    .timeout(2);
    let words = h.input().unwrap().map(text).map(|w| (w, 1u64));
    let out = h.collect(&words.map_with_state(spec)).unwrap();
    h.start().unwrap();
    let batches: [&[&str]; 5] = [&["a", "b", "gone"], &["a", "b", "b", "c"], &["a", "c"], &["a"], &["a"]];
    let mut failures = 0;
    for batch in batches {
        h.push(batch.iter().copied());
        failures += h.run_batch().unwrap().task_failures;
    }
    assert!(failed_update.load(SeqCst) && failed_timeout.load(SeqCst));
    assert_eq!(failures, 2, "both injected panics were failed attempts, retried");
    let s = |w: &str, n: u64| (w.to_owned(), n);
    assert_eq!(
        out.sorted_batches(),
        vec![
            vec![s("a", 1), s("b", 1), s("gone", 1)],
            vec![s("a", 2), s("b", 3), s("c", 1)],
            // A key times out two batches after it was last seen; the first try for "gone" panicked.
            vec![s("a", 3), s("c", 2), s("gone (timed out)", 1)],
            vec![s("a", 4), s("b (timed out)", 3)],
            vec![s("a", 5), s("c (timed out)", 2)],
        ]
    );
    h.stop().unwrap();

    let h = TestHarness::with_builder(|b| b.max_task_attempts(2)).unwrap();
    let calls = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let counter = calls.clone();
    let spec = StateSpec::new(
        move |_w: &String, _new: Vec<u64>, _s: &mut State<'_, u64>| -> Option<u64> {
            counter.fetch_add(1, SeqCst);
            panic!("a bug in the update")
        },
    );
    let words = h.input().unwrap().map(text).map(|w| (w, 1u64));
    h.collect(&words.map_with_state(spec)).unwrap();
    h.start().unwrap();
    h.push(["a"]);
    let err = h.run_batch().unwrap_err();
    let Error::Stopped(cause) = &err else { panic!("{err}") };
    let Error::Job(job) = &**cause else { panic!("{cause}") };
    assert_eq!(job.attempts, 2, "max_task_attempts applies to map_with_state");
    assert_eq!(calls.load(SeqCst), 2);
}
