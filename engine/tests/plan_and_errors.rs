//! The engine's contract around its plan and its errors: the plan is frozen at `start()` (adding
//! an input or an output afterwards is a typed error), listeners run with no engine lock held,
//! every user function (window reduce, state update) goes through the task runner's retries, and
//! the error that stops a stream keeps its cause — `DataLost` is a variant, not a substring.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_blockstore::{Clock, Domain, ErrorClass, ManualClock};
use sluice_engine::{Error, FailurePolicy, StopMode, StreamingContext, TaskError, Window};
use sluice_operators::bench_data;
use sluice_receiver::local_log::{LocalLog, RetentionPolicy, StreamConfig};

mod support;

use support::{
    DRAIN_TIMEOUT, STREAM, await_stored, context, fill_log, manual_clock_context, receiver_config, word_count, words,
};

#[test]
fn inputs_and_outputs_cannot_be_added_after_start() {
    let lines = bench_data::zipf_lines(200, 50, 1);
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 1);
    let ctx = context(&dir.path().join("data"), 100, 2);
    let stream = ctx
        .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(20))
        .unwrap();
    let totals = word_count(&stream);
    ctx.start().unwrap();

    let late_input = ctx.local_log_stream(&dir.path().join("log"), STREAM, receiver_config(20));
    assert!(
        matches!(late_input, Err(Error::Started { .. })),
        "{:?}",
        late_input.err()
    );
    let late_output = stream.map(|l| l.len()).foreach_batch(|_t, _all| Ok(()));
    let err = late_output.unwrap_err();
    assert!(matches!(err, Error::Started { .. }), "{err}");
    assert!(err.to_string().contains("before start()"), "{err}");
    assert!(matches!(
        stream
            .flat_map(words)
            .count_by_value()
            .save_parquet(&dir.path().join("late").display().to_string()),
        Err(Error::Started { .. })
    ));
    assert!(matches!(ctx.start(), Err(Error::Started { .. })), "started twice");

    // What was defined before start still runs, exactly.
    assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap());
    ctx.stop(StopMode::Graceful).unwrap();
    assert_eq!(*totals.lock().unwrap(), bench_data::reference_word_count(&lines));
}

#[test]
fn a_listener_may_call_the_context_while_batches_run() {
    let lines = bench_data::zipf_lines(1_000, 50, 2);
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 1);
    let ctx = Arc::new(context(&dir.path().join("data"), 50, 2));
    let stream = ctx
        .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(20))
        .unwrap();
    let _totals = word_count(&stream);
    let seen = Arc::new(AtomicU64::new(0));
    let (me, counter) = (Arc::downgrade(&ctx), seen.clone());
    // Before: listeners ran under the graph lock, and this one deadlocked the job thread.
    ctx.add_batch_listener(move |_info| {
        let ctx: Arc<StreamingContext> = Weak::upgrade(&me).expect("context alive");
        let processed = ctx.metrics().records_processed;
        let c = counter.clone();
        ctx.add_batch_listener(move |_| {
            c.fetch_add(1, SeqCst);
        });
        assert!(processed <= 1_000);
    });
    // A listener that panics is skipped; the stream goes on.
    ctx.add_batch_listener(|_| panic!("a bug in a listener"));
    ctx.start().unwrap();
    assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap());
    // A listener added during batch N first runs for batch N + 1: wait for one more batch
    // (empty batches are cut too) instead of assuming the data spanned several batches.
    let deadline = std::time::Instant::now() + DRAIN_TIMEOUT;
    while seen.load(SeqCst) == 0 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    ctx.stop(StopMode::Graceful).unwrap();
    assert!(seen.load(SeqCst) > 0, "listeners added by a listener run");
}

/// Word counts over a 3-batch window whose reduce panics on its first call only.
#[test]
fn window_reduce_and_state_update_that_fail_once_are_retried() {
    let lines = bench_data::zipf_lines(3_000, 100, 3);
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 2);
    let ctx = context(&dir.path().join("data"), 80, 2);
    // Read over a dozen batches, so windows overlap batches that share words.
    let mut config = receiver_config(20);
    config.max_rate = Some(3_000.0);
    config.read_max_records = Some(50);
    let stream = ctx.local_log_stream(&dir.path().join("log"), STREAM, config).unwrap();
    let counts = stream.flat_map(words).count_by_value();
    let window_failed = Arc::new(AtomicU64::new(0));
    let flag = window_failed.clone();
    let windowed = counts.reduce_by_key_and_window(
        move |a, b| {
            assert!(flag.fetch_add(1, SeqCst) > 0, "injected failure in the window reduce");
            a + b
        },
        Some(Arc::new(|a: u64, b: u64| a - b)),
        None,
        Window::new(3, 1).unwrap(),
    );
    windowed.foreach_batch(|_t, _all| Ok(())).unwrap();
    let state_failed = Arc::new(AtomicU64::new(0));
    let flag = state_failed.clone();
    let totals: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let keep = totals.clone();
    counts
        .update_state_by_key(move |_w: &String, new: Vec<u64>, old: Option<u64>| {
            assert!(flag.fetch_add(1, SeqCst) > 0, "injected failure in the state update");
            Some(old.unwrap_or(0) + new.iter().sum::<u64>())
        })
        .foreach_batch(move |_t, all| {
            *keep.lock().unwrap() = all.into_iter().collect();
            Ok(())
        })
        .unwrap();
    ctx.start().unwrap();
    assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap());
    ctx.stop(StopMode::Graceful).unwrap();
    assert!(window_failed.load(SeqCst) > 0 && state_failed.load(SeqCst) > 0);
    assert_eq!(*totals.lock().unwrap(), bench_data::reference_word_count(&lines));
    assert!(
        ctx.metrics().task_failures >= 2,
        "both failures counted as failed task attempts"
    );
}

#[test]
fn a_state_update_that_always_fails_stops_the_stream_under_either_policy() {
    for policy in [FailurePolicy::Stop, FailurePolicy::DeadLetter] {
        let lines = bench_data::zipf_lines(300, 30, 4);
        let dir = tempfile::tempdir().unwrap();
        fill_log(&dir.path().join("log"), &lines, 1);
        let ctx = StreamingContext::builder()
            .batch_interval(Duration::from_millis(80))
            .data_dir(dir.path().join("data"))
            .failure_policy(policy)
            .max_task_attempts(2)
            .build()
            .unwrap();
        let stream = ctx
            .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(20))
            .unwrap();
        let calls = Arc::new(AtomicU64::new(0));
        let counter = calls.clone();
        stream
            .flat_map(words)
            .count_by_value()
            .update_state_by_key(move |_w: &String, _new: Vec<u64>, _old: Option<u64>| -> Option<u64> {
                counter.fetch_add(1, SeqCst);
                panic!("a bug in the update")
            })
            .foreach_batch(|_t, _all| Ok(()))
            .unwrap();
        ctx.start().unwrap();
        let err = ctx.await_termination().unwrap_err();
        let _ignored = ctx.stop(StopMode::Immediate);
        let Error::Stopped(cause) = &err else { panic!("{err}") };
        let Error::Job(job) = &**cause else { panic!("{cause}") };
        assert_eq!(job.attempts, 2, "{policy:?}: max_task_attempts applies to the update");
        assert_eq!(
            err.class(),
            ErrorClass::permanent(Domain::UserCode),
            "a panic is the user's code; retried, then final"
        );
        assert!(
            matches!(&job.error, TaskError::Panicked { message } if message.contains("a bug")),
            "{job}"
        );
        assert!(calls.load(SeqCst) >= 2);
    }
}

#[test]
fn data_gone_from_the_source_stops_the_stream_with_data_lost() {
    let dir = tempfile::tempdir().unwrap();
    let log = LocalLog::open(dir.path().join("log")).unwrap();
    let stream_config = StreamConfig {
        segment_bytes: 1_024,
        ..StreamConfig::new(1)
    };
    let mut producer = log
        .create_stream_with(STREAM, &stream_config)
        .unwrap()
        .producer()
        .unwrap();
    for i in 0..200 {
        producer.put("k", Bytes::from(format!("line {i:0>40}"))).unwrap();
    }
    producer.flush().unwrap();
    // A manual clock: blocks are cut as it moves, and no batch runs before it reaches 2,000.
    let clock = Arc::new(ManualClock::new(1_000));
    let ctx = manual_clock_context(&dir.path().join("data"), &clock);
    let stream = ctx
        .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(50))
        .unwrap();
    let _totals = word_count(&stream);
    ctx.start().unwrap();
    let waiting = Instant::now();
    while ctx.metrics().blocks_stored == 0 || clock.now_ms() < 1_500 {
        assert!(waiting.elapsed() < DRAIN_TIMEOUT, "no block stored");
        if clock.now_ms() < 1_900 {
            clock.advance_ms(50);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // Every copy of the blocks is gone, and so are the records in the source.
    ctx.block_store().unwrap().remove_older_than(i64::MAX).unwrap();
    for i in 0..100 {
        producer.put("k", Bytes::from(format!("more {i:0>40}"))).unwrap();
    }
    producer
        .set_retention(RetentionPolicy {
            max_bytes: Some(1_024),
            max_age_ms: None,
        })
        .unwrap();
    assert!(producer.enforce_retention().unwrap().segments_deleted > 0);
    // The first batch runs and cannot rebuild its blocks. The clock keeps moving while it does:
    // a replay attempt that fails with a retryable error backs off on this clock, and a clock
    // that stopped would leave it waiting for ever (seen once in many runs).
    clock.advance_ms(2_100 - clock.now_ms());
    let waiting = Instant::now();
    let err = loop {
        if let Err(e) = ctx.await_drained(Duration::from_millis(20)) {
            break e;
        }
        assert!(
            waiting.elapsed() < DRAIN_TIMEOUT,
            "the stream did not stop with DataLost: {:?}",
            ctx.metrics()
        );
        clock.advance_ms(50);
    };
    let _ignored = ctx.stop(StopMode::Immediate);
    match &err {
        Error::Stopped(cause) => match &**cause {
            Error::DataLost { ranges, .. } => assert!(!ranges.is_empty(), "{cause}"),
            other => panic!("expected DataLost, got {other}"),
        },
        other => panic!("expected Stopped, got {other}"),
    }
    assert!(
        std::error::Error::source(&err).is_some(),
        "the cause is kept as the source"
    );
    // One classification across crates: the reader's DataExpired, the task's BlockUnavailable and
    // the engine's DataLost all say the same.
    assert_eq!(err.class(), ErrorClass::permanent(Domain::DataLoss));
}

#[test]
fn an_output_function_that_panics_once_is_retried_and_one_that_keeps_panicking_stops_the_stream() {
    let lines = bench_data::zipf_lines(500, 40, 5);
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 1);
    let ctx = context(&dir.path().join("data"), 60, 2);
    let stream = ctx
        .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(20))
        .unwrap();
    let calls = Arc::new(AtomicU64::new(0));
    let delivered = Arc::new(AtomicU64::new(0));
    let (c, d) = (calls.clone(), delivered.clone());
    stream
        .foreach_batch(move |_t, lines| {
            assert!(c.fetch_add(1, SeqCst) > 0, "injected failure in the output function");
            d.fetch_add(lines.len() as u64, SeqCst);
            Ok(())
        })
        .unwrap();
    ctx.start().unwrap();
    assert!(ctx.await_drained(DRAIN_TIMEOUT).unwrap());
    ctx.stop(StopMode::Graceful).unwrap();
    assert_eq!(delivered.load(SeqCst), lines.len() as u64, "every line delivered once");

    // Before: a panic in an output unwound the job generator thread and the context hung.
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 1);
    let ctx = context(&dir.path().join("data"), 60, 2);
    let stream = ctx
        .local_log_stream(&dir.path().join("log"), STREAM, receiver_config(20))
        .unwrap();
    stream
        .foreach_batch(|_t, lines| {
            assert!(lines.is_empty(), "a bug in the output");
            Ok(())
        })
        .unwrap();
    ctx.start().unwrap();
    let err = ctx.await_termination().unwrap_err();
    let _ignored = ctx.stop(StopMode::Immediate);
    let Error::Stopped(cause) = &err else { panic!("{err}") };
    assert!(
        matches!(&**cause, Error::Job(job) if job.attempts == sluice_engine::DEFAULT_MAX_TASK_ATTEMPTS),
        "{cause}"
    );
}

/// `flat_map_count_by_value` (keys borrowed from the line, copied once per task) counts what
/// `flat_map` + `count_by_value` count, batch by batch; a line whose closure panics after it
/// emitted some of its words is retried, then isolated to the dead-letter sink, and none of its
/// words is counted — the partial map of a failed attempt is discarded, not merged.
#[test]
fn flat_map_count_by_value_counts_as_flat_map_then_count_and_discards_a_failed_attempt() {
    use sluice_engine::testing::TestHarness;

    let h = TestHarness::with_builder(|b| b.failure_policy(FailurePolicy::DeadLetter).max_task_attempts(2)).unwrap();
    let lines = h.input().unwrap();
    let attempts = Arc::new(AtomicU64::new(0));
    let seen = attempts.clone();
    let fused = lines.flat_map_count_by_value(move |line: &Bytes, emit| {
        for word in line.split(u8::is_ascii_whitespace).filter(|w| !w.is_empty()) {
            emit(word);
            if word == b"boom" {
                seen.fetch_add(1, SeqCst);
                panic!("a bug on this line, after some of its words were counted");
            }
        }
    });
    let fused = h
        .collect(&fused.map(|(w, c)| (String::from_utf8(w.to_vec()).unwrap(), c)))
        .unwrap();
    let plain = lines
        .filter(|line| !line.windows(4).any(|w| w == b"boom"))
        .flat_map(|line| {
            String::from_utf8(line.to_vec())
                .unwrap()
                .split_ascii_whitespace()
                .map(str::to_owned)
                .collect::<Vec<_>>()
        })
        .count_by_value();
    let plain = h.collect(&plain).unwrap();
    h.start().unwrap();
    let corpus = bench_data::zipf_lines(300, 40, 7);
    let mut dead_letters = 0;
    for (i, batch) in corpus.chunks(100).enumerate() {
        let mut batch = batch.to_vec();
        if i == 1 {
            batch[50] = "x y boom z".to_owned();
        }
        h.push(batch);
        dead_letters += h.run_batch().unwrap().dead_letters;
    }
    assert_eq!(fused.sorted_batches(), plain.sorted_batches());
    assert_eq!(fused.sorted_batches().len(), 3);
    assert_eq!(dead_letters, 1, "the bad line alone is dead-lettered");
    // Two attempts of the whole block, then the line alone.
    assert_eq!(attempts.load(SeqCst), 3);
    h.stop().unwrap();
}

/// A keyed stage's map side folds a worker's consecutive blocks into one shared map. A task that
/// panics after emitting some words leaves that map half-updated: the map is dropped and the
/// blocks already in it run again, so no word is lost or counted twice — a line that fails once
/// is retried, and one that always fails is isolated to the dead-letter sink alone.
#[test]
fn a_failed_task_in_a_shared_map_side_map_recomputes_its_chunk_exactly() {
    let mut lines = bench_data::zipf_lines(6_000, 100, 5);
    let fail_once = [150, 1_234, 2_500, 3_777, 5_999];
    for i in fail_once {
        lines[i] = format!("fail once {i}");
    }
    lines[4_000] = "always boom".to_owned();
    let dir = tempfile::tempdir().unwrap();
    fill_log(&dir.path().join("log"), &lines, 1);
    let ctx = StreamingContext::builder()
        .batch_interval(Duration::from_secs(600))
        .data_dir(dir.path().join("data"))
        .executor_threads(2)
        .failure_policy(FailurePolicy::DeadLetter)
        .max_task_attempts(2)
        .dead_letter(dir.path().join("dead-letter").display().to_string())
        .build()
        .unwrap();
    // 100 records a block: the one batch has 60 blocks, a few chunks of several blocks each.
    let config = sluice_receiver::ReceiverConfig {
        max_block_records: 100,
        ..receiver_config(20)
    };
    let stream = ctx.local_log_stream(&dir.path().join("log"), STREAM, config).unwrap();
    let failed: Arc<Mutex<std::collections::HashSet<Vec<u8>>>> = Arc::default();
    let counts = stream.flat_map_count_by_value(move |line: &Bytes, emit| {
        for word in line.split(u8::is_ascii_whitespace).filter(|w| !w.is_empty()) {
            emit(word);
        }
        let fails = line.starts_with(b"always")
            || line.starts_with(b"fail once") && failed.lock().unwrap().insert(line.to_vec());
        assert!(!fails, "a bug, after this line's words were counted");
    });
    let totals: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let keep = totals.clone();
    counts
        .foreach_batch(move |_t, counts| {
            let mut totals = keep.lock().unwrap();
            for (word, count) in counts {
                *totals.entry(String::from_utf8(word.to_vec()).unwrap()).or_default() += count;
            }
            Ok(())
        })
        .unwrap();
    ctx.start().unwrap();
    await_stored(&ctx, lines.len());
    // No batch is due for ten minutes: the graceful stop runs the one batch with every block.
    ctx.stop(StopMode::Graceful).unwrap();
    let metrics = ctx.metrics();
    assert_eq!(metrics.batches_completed, 1);
    assert!(metrics.blocks_stored >= 60, "{} blocks", metrics.blocks_stored);
    assert_eq!(metrics.dead_letters, 1, "the line that always fails, alone");
    // Each fail-once line failed once, the bad line twice and once more when isolated.
    assert_eq!(metrics.task_failures, fail_once.len() as u64 + 2);
    lines.remove(4_000);
    assert_eq!(*totals.lock().unwrap(), bench_data::reference_word_count(&lines));
}

/// A batch hands each block back (out of memory and the ingest gate) after the plan's last read
/// of it, not when the whole batch completes: so the receivers can store the next batch's blocks
/// while this one runs its later stages. Reads are counted over the whole plan: a second output
/// and a union of the input with itself read the blocks again, so the blocks stay until they
/// have, and nothing is replayed.
#[test]
fn a_block_leaves_memory_after_the_last_read_of_it_and_none_is_replayed() {
    use sluice_engine::testing::TestHarness;
    use std::sync::mpsc;

    // One executor thread: the union's two reads of a block cannot overlap.
    let h = TestHarness::with_builder(|b| b.executor_threads(1)).unwrap();
    let lines = h.input().unwrap();
    // Each output's function stops at a gate the test opens, after telling the test which
    // output it is: by then that output's stages have read what they read.
    let (reached, at) = mpsc::channel::<&'static str>();
    let (open, gate) = mpsc::channel::<()>();
    let gate = Arc::new(Mutex::new(gate));
    let pause = |name: &'static str| {
        let (reached, gate) = (reached.clone(), gate.clone());
        // Once the test has closed the gate (the batches of the stop), they run through.
        move || {
            let _ = reached.send(name);
            let _ = gate.lock().unwrap().recv();
        }
    };
    // First output: a word count (its shuffle reads every block once).
    let first = pause("word count");
    let counts: Arc<Mutex<HashMap<String, u64>>> = Arc::default();
    let into = counts.clone();
    lines
        .flat_map(words)
        .count_by_value()
        .foreach_batch(move |_t, items| {
            into.lock().unwrap().extend(items);
            first();
            Ok(())
        })
        .unwrap();
    // Second output: the input unioned with itself (two more reads of every block).
    let second = pause("union");
    let lengths = Arc::new(AtomicU64::new(0));
    let sum = lengths.clone();
    lines
        .union(std::slice::from_ref(&lines))
        .map(|line| line.len() as u64)
        .foreach_batch(move |_t, items| {
            sum.fetch_add(items.iter().sum::<u64>(), SeqCst);
            second();
            Ok(())
        })
        .unwrap();
    h.start().unwrap();
    let batch: Vec<String> = (0..300).map(|i| format!("w{} w{}", i % 7, i % 3)).collect();
    h.push(batch.iter().map(|l| Bytes::from(l.clone())));
    std::thread::scope(|s| {
        let run = s.spawn(|| h.run_batch().unwrap());
        let in_memory = || h.context().status().unwrap().block_store.memory_blocks;
        assert_eq!(at.recv().unwrap(), "word count");
        let blocks = in_memory();
        assert!(blocks > 0, "the union has not read the blocks yet");
        open.send(()).unwrap();
        assert_eq!(at.recv().unwrap(), "union");
        assert_eq!(
            in_memory(),
            0,
            "every read done: none of the {blocks} blocks is left in memory"
        );
        open.send(()).unwrap();
        run.join().unwrap();
    });
    assert_eq!(counts.lock().unwrap()["w0"], 300 / 7 + 1 + 300 / 3);
    let total: u64 = batch.iter().map(|l| l.len() as u64).sum();
    assert_eq!(lengths.load(SeqCst), 2 * total);
    let metrics = h.context().metrics();
    assert_eq!(metrics.blocks_replayed, 0, "no block was read after it was handed back");
    drop(open);
    h.stop().unwrap();
}
