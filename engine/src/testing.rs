//! A harness for tests and examples (feature `testing`), like Spark's `TestSuiteBase`: a
//! [`StreamingContext`] over an in-memory source with a manual clock, where a test pushes records
//! and runs batches one at a time, and reads each batch's output.
//!
//! ```
//! use sluice_engine::testing::TestHarness;
//!
//! let h = TestHarness::new()?;
//! let lines = h.input()?;
//! let lengths = h.collect(&lines.map(|line| line.len()))?;
//! h.start()?;
//! h.push(["a", "bb"]);
//! h.run_batch()?;
//! h.push(["ccc"]);
//! h.run_batch()?;
//! assert_eq!(lengths.batches(), vec![vec![1, 2], vec![3]]);
//! # Ok::<(), sluice_engine::Error>(())
//! ```
//!
//! Batches are cut by the manual clock only, so a batch holds exactly the records pushed before
//! its `run_batch`; nothing depends on wall-clock timing.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_blockstore::{Clock, ManualClock};
use sluice_receiver::ReceiverConfig;
use sluice_receiver::testing::MemorySource;

use crate::{BatchInfo, DStream, Data, Error, Result, StopMode, StreamingContext, StreamingContextBuilder};

/// The batch interval of a harness.
pub const HARNESS_BATCH_MS: i64 = 1_000;
/// How far the clock moves at a time while records are cut into blocks.
const STEP_MS: i64 = 10;
/// How long (real time) the engine may make no progress before the clock moves a step.
const STEP_PATIENCE: Duration = Duration::from_millis(10);
/// How long `run_batch` waits for the engine (wall clock) before it reports a hang.
const WAIT: Duration = Duration::from_secs(60);
/// The source's one shard.
const SHARD: &str = "shardId-000000000000";

static NEXT_DIR: AtomicU64 = AtomicU64::new(0);

/// A context over an in-memory source and a manual clock; see the [module docs](self).
pub struct TestHarness {
    ctx: StreamingContext,
    clock: Arc<ManualClock>,
    source: MemorySource,
    dir: PathBuf,
    /// Records pushed so far.
    pushed: AtomicU64,
    /// The batch time the next `run_batch` runs.
    next_batch: Mutex<i64>,
    completed: Arc<(Mutex<BTreeMap<i64, BatchInfo>>, Condvar)>,
}

/// The elements a stream produced, per batch (see [`TestHarness::collect`]).
pub struct Collected<T> {
    batches: Arc<Mutex<BTreeMap<i64, Vec<T>>>>,
}

impl<T: Clone> Collected<T> {
    /// Every batch's elements so far, in batch order (within a batch, in partition order).
    pub fn batches(&self) -> Vec<Vec<T>> {
        self.batches.lock().expect("collected").values().cloned().collect()
    }

    /// The last batch's elements (empty before the first batch).
    pub fn last(&self) -> Vec<T> {
        self.batches
            .lock()
            .expect("collected")
            .values()
            .next_back()
            .cloned()
            .unwrap_or_default()
    }
}

impl<T: Clone + Ord> Collected<T> {
    /// Every batch's elements, each batch sorted (for outputs of keyed operators, whose order
    /// within a batch is the shuffle's).
    pub fn sorted_batches(&self) -> Vec<Vec<T>> {
        let mut batches = self.batches();
        for batch in &mut batches {
            batch.sort();
        }
        batches
    }
}

impl TestHarness {
    /// A harness with the default settings (two executor threads).
    ///
    /// # Errors
    /// As [`StreamingContextBuilder::build`].
    pub fn new() -> Result<Self> {
        Self::with_builder(|b| b)
    }

    /// A harness whose context `configure` may adjust (failure policy, attempts, …); the data
    /// directory, batch interval and clock are the harness's.
    ///
    /// # Errors
    /// As [`StreamingContextBuilder::build`].
    pub fn with_builder(configure: impl FnOnce(StreamingContextBuilder) -> StreamingContextBuilder) -> Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "sluice-harness-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        let start_ms = 1_000 * HARNESS_BATCH_MS;
        let clock = Arc::new(ManualClock::new(start_ms));
        let ctx = configure(StreamingContext::builder().executor_threads(2))
            .data_dir(&dir)
            .dead_letter(dir.join("dead-letter").display().to_string())
            .batch_interval(Duration::from_millis(HARNESS_BATCH_MS.unsigned_abs()))
            .clock(clock.clone())
            .build()?;
        let completed: Arc<(Mutex<BTreeMap<i64, BatchInfo>>, Condvar)> = Arc::default();
        let done = completed.clone();
        ctx.add_batch_listener(move |info| {
            done.0
                .lock()
                .expect("batches")
                .insert(info.batch_time.as_millis(), *info);
            done.1.notify_all();
        });
        Ok(Self {
            ctx,
            clock,
            source: MemorySource::new("harness", 1),
            dir,
            pushed: AtomicU64::new(0),
            next_batch: Mutex::new(start_ms + HARNESS_BATCH_MS),
            completed,
        })
    }

    /// The context (to define more streams, read metrics, …).
    pub fn context(&self) -> &StreamingContext {
        &self.ctx
    }

    /// The stream of the records [`push`](Self::push)ed (payloads). Call once.
    ///
    /// # Errors
    /// As [`StreamingContext::source_stream`].
    pub fn input(&self) -> Result<DStream<Bytes>> {
        let config = ReceiverConfig {
            block_interval_ms: STEP_MS.unsigned_abs(),
            ..ReceiverConfig::default()
        };
        self.ctx.source_stream(Arc::new(self.source.clone()), config)
    }

    /// Collects `stream`'s elements per batch.
    ///
    /// # Errors
    /// [`Error::Started`] after [`start`](Self::start).
    pub fn collect<T: Data + Clone>(&self, stream: &DStream<T>) -> Result<Collected<T>> {
        let batches: Arc<Mutex<BTreeMap<i64, Vec<T>>>> = Arc::default();
        let keep = batches.clone();
        stream.foreach_batch(move |time, items| {
            keep.lock().expect("collected").insert(time.as_millis(), items);
            Ok(())
        })?;
        Ok(Collected { batches })
    }

    /// Starts the context.
    ///
    /// # Errors
    /// As [`StreamingContext::start`].
    pub fn start(&self) -> Result<()> {
        self.ctx.start()
    }

    /// Appends records to the input; the next [`run_batch`](Self::run_batch) processes them.
    pub fn push<I: IntoIterator<Item = D>, D: Into<Bytes>>(&self, records: I) {
        for (i, data) in records.into_iter().enumerate() {
            self.source.put(SHARD, &i.to_string(), data);
            self.pushed.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Runs one batch: lets the receiver cut everything pushed so far into blocks (moving the
    /// clock in block intervals, never up to the batch time), then moves the clock to the batch
    /// time and waits for the batch to complete.
    ///
    /// # Errors
    /// [`Error::Stopped`] if the stream stopped (a failed batch); [`Error::Internal`] if the
    /// engine did not get there within a minute.
    pub fn run_batch(&self) -> Result<BatchInfo> {
        let mut next = self.next_batch.lock().expect("next batch");
        let deadline = Instant::now() + WAIT;
        let pushed = self.pushed.load(Ordering::SeqCst);
        // The clock moves one step only after the engine made no progress for a while (real
        // time): a reader or block timer that has not run yet must not find the clock already
        // at the batch time's last step, where a deadline past it would never come.
        let mut stored = self.ctx.metrics().records_stored;
        let mut last_progress = Instant::now();
        while stored < pushed {
            self.check(deadline, "store the pushed records")?;
            if last_progress.elapsed() >= STEP_PATIENCE && self.clock.now_ms() + STEP_MS < *next {
                self.clock.advance_ms(STEP_MS);
                last_progress = Instant::now();
            }
            std::thread::sleep(Duration::from_millis(1));
            let now_stored = self.ctx.metrics().records_stored;
            if now_stored != stored {
                stored = now_stored;
                last_progress = Instant::now();
            }
        }
        self.clock.advance_ms(*next - self.clock.now_ms());
        let time = *next;
        *next += HARNESS_BATCH_MS;
        let (batches, changed) = &*self.completed;
        let mut done = batches.lock().expect("batches");
        loop {
            if let Some(info) = done.get(&time) {
                return Ok(*info);
            }
            drop(done);
            self.check(deadline, "run the batch")?;
            done = batches.lock().expect("batches");
            done = changed.wait_timeout(done, Duration::from_millis(5)).expect("batches").0;
        }
    }

    /// Fails when the stream stopped or the engine takes too long.
    fn check(&self, deadline: Instant, what: &str) -> Result<()> {
        // Fails only when the stream stopped with an error.
        self.ctx.await_drained(Duration::ZERO)?;
        if Instant::now() > deadline {
            return Err(Error::Internal(format!(
                "the test harness waited {WAIT:?} for the engine to {what}"
            )));
        }
        Ok(())
    }

    /// Stops the context (a graceful stop: everything pushed and cut is processed).
    ///
    /// # Errors
    /// As [`StreamingContext::stop`].
    pub fn stop(&self) -> Result<()> {
        // The job generator and the receiver wait on the manual clock: keep it moving.
        let stopping = Arc::new(AtomicBool::new(false));
        let ticker = {
            let (clock, stopping) = (self.clock.clone(), stopping.clone());
            std::thread::spawn(move || {
                while !stopping.load(Ordering::SeqCst) {
                    clock.advance_ms(STEP_MS);
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let result = self.ctx.stop(StopMode::Graceful);
        stopping.store(true, Ordering::SeqCst);
        let _ = ticker.join();
        result
    }
}

impl Drop for TestHarness {
    fn drop(&mut self) {
        let _stopped = self.stop();
        let _removed = std::fs::remove_dir_all(&self.dir);
    }
}
