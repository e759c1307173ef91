//! End-to-end pipelines over the embedded local log: word count against a reference, lost
//! blocks, task failures and the failure policies, graceful stop.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use sluice_blockstore::{Clock, ManualClock};
use sluice_engine::{Error, FailurePolicy, StopMode, StreamingContext};
use sluice_operators::bench_data;

mod support;

use support::{
    DRAIN_TIMEOUT, STREAM, await_stored, context, fill_log, manual_clock_context, receiver_config, word_count, words,
};

/// Word count whose totals (state) are captured after every batch.
#[test]
fn word_count_equals_the_reference_for_several_intervals_and_thread_counts() {
    let lines = bench_data::zipf_lines(6_000, 500, 7);
    let reference = bench_data::reference_word_count(&lines);
    for (batch_ms, block_ms, threads) in [(100, 20, 1), (250, 50, 2), (60, 60, 4)] {
        let dir = tempfile::tempdir().unwrap();
        fill_log(&dir.path().join("log"), &lines, 2);
        let ctx = context(&dir.path().join("data"), batch_ms, threads);
        let stream = ctx
            .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(block_ms))
            .unwrap();
        let totals = word_count(&stream);
        ctx.start().unwrap();
        assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap(), "not drained");
        ctx.stop(StopMode::Graceful).unwrap();
        assert_eq!(
            *totals.lock().unwrap(),
            reference,
            "batch {batch_ms} ms, block {block_ms} ms, {threads} threads"
        );
        assert_eq!(ctx.metrics().records_processed, lines.len() as u64);
    }
}

#[test]
fn parquet_output_summed_equals_the_reference() {
    let lines = bench_data::zipf_lines(4_000, 300, 11);
    let reference = bench_data::reference_word_count(&lines);
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 3);
    let ctx = context(&dir.path().join("data"), 80, 2);
    let stream = ctx
        .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(20))
        .unwrap();
    let out = dir.path().join("out").display().to_string();
    stream.flat_map(words).count_by_value().save_parquet(&out).unwrap();
    ctx.start().unwrap();
    assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap());
    ctx.stop(StopMode::Graceful).unwrap();
    assert_eq!(sum_parquet(&out), reference);
}

fn sum_parquet(location: &str) -> HashMap<String, u64> {
    use arrow_array::cast::AsArray;
    use arrow_array::types::UInt64Type;
    let mut sums = HashMap::new();
    for (_time, batch) in sluice_operators::ParquetSink::read_committed(location).unwrap() {
        let keys = batch.column(0).as_string::<i32>();
        let values = batch.column(1).as_primitive::<UInt64Type>();
        for i in 0..batch.num_rows() {
            *sums.entry(keys.value(i).to_owned()).or_default() += values.value(i);
        }
    }
    sums
}

#[test]
fn a_task_that_fails_once_is_retried_and_the_result_is_right() {
    let lines = bench_data::zipf_lines(2_000, 100, 3);
    let reference = bench_data::reference_word_count(&lines);
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 1);
    let ctx = context(&dir.path().join("data"), 100, 2);
    let stream = ctx
        .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(25))
        .unwrap();
    let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = failed_once.clone();
    let flaky = stream.map(move |line| {
        assert!(
            flag.swap(true, std::sync::atomic::Ordering::SeqCst),
            "injected failure (first attempt only)"
        );
        line
    });
    let totals = word_count(&flaky);
    ctx.start().unwrap();
    assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap());
    ctx.stop(StopMode::Graceful).unwrap();
    assert!(failed_once.load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(*totals.lock().unwrap(), reference);
}

fn poison_pipeline(policy: FailurePolicy, dir: &Path) -> (StreamingContext, Arc<Mutex<HashMap<String, u64>>>) {
    let mut lines = bench_data::zipf_lines(1_000, 50, 5);
    lines[137] = "POISON pill".into();
    lines[602] = "POISON again".into();
    fill_log(&dir.join("log"), &lines, 2);
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_millis(100))
        .data_dir(dir.join("data"))
        .failure_policy(policy)
        .dead_letter(dir.join("dead").display().to_string())
        .build()
        .unwrap();
    let stream = ctx
        .local_log_stream(&dir.join("log"), STREAM, receiver_config(25))
        .unwrap();
    let checked = stream.map(|line: Bytes| {
        assert!(!line.starts_with(b"POISON"), "cannot parse {line:?}");
        line
    });
    let totals = word_count(&checked);
    (ctx, totals)
}

#[test]
fn a_task_that_always_fails_stops_the_stream_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, _totals) = poison_pipeline(FailurePolicy::Stop, dir.path());
    ctx.start().unwrap();
    let err = ctx.await_termination().unwrap_err();
    assert!(matches!(err, Error::Stopped { .. }), "{err}");
    assert!(err.to_string().contains("cannot parse"), "{err}");
    let _ignored = ctx.stop(StopMode::Immediate);
    assert_eq!(ctx.metrics().dead_letters, 0);
}

#[test]
fn dead_letter_policy_routes_exactly_the_failing_records_with_their_positions() {
    let dir = tempfile::tempdir().unwrap();
    let (ctx, totals) = poison_pipeline(FailurePolicy::DeadLetter, dir.path());
    ctx.start().unwrap();
    assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap());
    ctx.stop(StopMode::Graceful).unwrap();
    let mut lines = bench_data::zipf_lines(1_000, 50, 5);
    lines.remove(602);
    lines.remove(137);
    assert_eq!(*totals.lock().unwrap(), bench_data::reference_word_count(&lines));
    assert_eq!(ctx.metrics().dead_letters, 2);
    let rows: usize = sluice_operators::DeadLetterSink::read_committed(&dir.path().join("dead").display().to_string())
        .unwrap()
        .iter()
        .map(|(_, b)| b.num_rows())
        .sum();
    assert_eq!(rows, 2, "both poison records in the dead-letter sink, nothing else");
}

#[test]
fn graceful_stop_processes_every_received_record() {
    let lines = bench_data::zipf_lines(3_000, 200, 9);
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 2);
    let ctx = context(&dir.path().join("data"), 200, 2);
    let stream = ctx
        .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(50))
        .unwrap();
    let totals = word_count(&stream);
    ctx.start().unwrap();
    // Stop right away: whatever the receiver has read must be processed before stop returns, and
    // the rest is read after a restart — never lost.
    ctx.stop(StopMode::Graceful).unwrap();
    let seen_first: u64 = totals.lock().unwrap().values().sum();
    let processed_first = ctx.metrics().records_processed;
    drop(ctx);

    let ctx = context(&dir.path().join("data"), 200, 2);
    let stream = ctx
        .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(50))
        .unwrap();
    let totals = word_count(&stream);
    ctx.start().unwrap();
    assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap());
    ctx.stop(StopMode::Graceful).unwrap();
    assert_eq!(*totals.lock().unwrap(), bench_data::reference_word_count(&lines));
    assert_eq!(
        processed_first + ctx.metrics().records_processed,
        lines.len() as u64,
        "no record twice, none lost"
    );
    assert!(seen_first <= totals.lock().unwrap().values().sum());
}

#[test]
fn a_stop_does_not_wait_out_a_long_batch_interval() {
    // Every record is stored long before the first ten-minute batch is due. A graceful stop runs
    // the last batch at once instead of at its time, and an immediate one returns without it; both
    // well inside the stop timeout (a stop that slept until the next batch time timed out here).
    let lines = bench_data::zipf_lines(2_000, 100, 21);
    for mode in [StopMode::Graceful, StopMode::Immediate] {
        let dir = tempfile::tempdir().unwrap();
        fill_log(&dir.path().join("log"), &lines, 2);
        let ctx = StreamingContext::builder()
            .batch_interval(Duration::from_secs(600))
            .data_dir(dir.path().join("data"))
            .executor_threads(2)
            .graceful_stop_timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let stream = ctx
            .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(20))
            .unwrap();
        let totals = word_count(&stream);
        ctx.start().unwrap();
        await_stored(&ctx, lines.len());
        ctx.stop(mode).unwrap();
        let counted: u64 = totals.lock().unwrap().values().sum();
        match mode {
            StopMode::Graceful => {
                assert_eq!(*totals.lock().unwrap(), bench_data::reference_word_count(&lines));
            }
            StopMode::Immediate => assert_eq!(counted, 0, "no batch was due"),
        }
    }
}

/// A graceful stop that comes before the next batch's time runs that batch at once (the drain),
/// ahead of the clock. With nothing left to process it must not run it at all: an empty batch of
/// a plan without state is not logged, so a restart before the clock reaches that time would
/// run the same batch time a second time (a second output for it, which a window fills).
#[test]
fn a_graceful_stop_ahead_of_the_next_batch_time_never_runs_a_batch_time_twice_across_a_restart() {
    let lines = bench_data::zipf_lines(300, 50, 5);
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 1);
    // A manual clock: blocks are cut as it moves, batches run when it reaches their times.
    let clock = Arc::new(ManualClock::new(1_000));
    let times: Arc<Mutex<Vec<i64>>> = Arc::default();
    let start = || {
        let ctx = manual_clock_context(&dir.path().join("data"), &clock);
        let stream = ctx
            .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(50))
            .unwrap();
        let times = times.clone();
        stream
            .foreach_batch(move |t, _: Vec<Bytes>| {
                times.lock().unwrap().push(t.as_millis());
                Ok(())
            })
            .unwrap();
        ctx.start().unwrap();
        ctx
    };

    // First run: every record is processed in the batches the clock reaches; then the clock
    // stands inside an interval, the job generator waits for the next batch time, and the stop
    // comes before it.
    let ctx = start();
    let waiting = std::time::Instant::now();
    while ctx.metrics().records_processed < lines.len() as u64 {
        assert!(waiting.elapsed() < DRAIN_TIMEOUT, "not processed");
        clock.advance_ms(50);
        std::thread::sleep(Duration::from_millis(10));
    }
    if clock.now_ms() % 1_000 == 0 {
        clock.advance_ms(50);
    }
    std::thread::sleep(Duration::from_millis(200));
    ctx.stop(StopMode::Graceful).unwrap();
    drop(ctx);

    // A restart within the same interval, stopped the same way.
    let ctx = start();
    std::thread::sleep(Duration::from_millis(200));
    ctx.stop(StopMode::Graceful).unwrap();

    let times = times.lock().unwrap();
    assert!(
        times.windows(2).all(|w| w[0] < w[1]),
        "batch times must increase across the restart, none twice: {times:?}"
    );
    assert!(
        times.iter().all(|t| *t <= clock.now_ms()),
        "an empty batch ran ahead of the clock: {times:?}"
    );
}

#[test]
fn lost_blocks_are_rebuilt_by_replay_with_identical_results() {
    let lines = bench_data::zipf_lines(5_000, 300, 13);
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 2);
    let ctx = context(&dir.path().join("data"), 300, 2);
    let stream = ctx
        .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(20))
        .unwrap();
    let totals = word_count(&stream);
    ctx.start().unwrap();
    // Keep deleting every copy (memory, disk, replica) of every stored block while batches run.
    let store = ctx.block_store().unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let deleter = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut removed = 0;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                removed += store.remove_older_than(i64::MAX).unwrap();
                std::thread::yield_now();
            }
            removed
        })
    };
    let drained = ctx.await_drained(DRAIN_TIMEOUT).unwrap();
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let removed = deleter.join().unwrap();
    ctx.stop(StopMode::Graceful).unwrap();
    assert!(drained);
    assert!(removed > 0, "the test deleted no block");
    assert!(ctx.metrics().blocks_replayed > 0, "no block was replayed");
    assert_eq!(*totals.lock().unwrap(), bench_data::reference_word_count(&lines));
}

#[test]
fn transform_sees_the_whole_batch_across_partitions_and_is_retried() {
    let lines = bench_data::zipf_lines(3_000, 400, 21);
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 3);
    let ctx = context(&dir.path().join("data"), 150, 3);
    let stream = ctx
        .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(20))
        .unwrap();
    let words = stream.flat_map(words);
    // Per batch: the input words, and the transform's output (sorted, de-duplicated).
    let inputs: Arc<Mutex<HashMap<i64, Vec<String>>>> = Arc::default();
    let outputs: Arc<Mutex<HashMap<i64, Vec<String>>>> = Arc::default();
    let keep = inputs.clone();
    words
        .foreach_batch(move |t, all| {
            keep.lock().unwrap().insert(t.as_millis(), all);
            Ok(())
        })
        .unwrap();
    let failed_once = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = failed_once.clone();
    let distinct_sorted = words.transform(move |_t, mut all: Vec<String>| {
        assert!(
            flag.swap(true, std::sync::atomic::Ordering::SeqCst),
            "injected failure (first attempt only)"
        );
        all.sort_unstable();
        all.dedup();
        all
    });
    // A narrow operator after the barrier runs over its (several) output partitions.
    let keep = outputs.clone();
    distinct_sorted
        .map(|w| w.to_uppercase())
        .foreach_batch(move |t, all| {
            keep.lock().unwrap().insert(t.as_millis(), all);
            Ok(())
        })
        .unwrap();
    ctx.start().unwrap();
    assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap());
    ctx.stop(StopMode::Graceful).unwrap();
    assert!(failed_once.load(std::sync::atomic::Ordering::SeqCst));
    let inputs = inputs.lock().unwrap();
    let outputs = outputs.lock().unwrap();
    assert_eq!(inputs.len(), outputs.len(), "one output per batch");
    for (t, input) in inputs.iter() {
        let mut expected: Vec<String> = input.iter().map(|w| w.to_uppercase()).collect();
        expected.sort_unstable();
        expected.dedup();
        assert_eq!(outputs[t], expected, "batch {t}");
    }
    let total: usize = inputs.values().map(Vec::len).sum();
    let reference_total: u64 = bench_data::reference_word_count(&lines).values().sum();
    assert_eq!(
        total as u64, reference_total,
        "every word went through exactly one batch"
    );
}
