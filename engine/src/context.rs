//! [`StreamingContext`]: configuration, the graph under construction, and the running engine.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use sluice_blockstore::{SharedClock, StorageLevel, SystemClock};
use sluice_receiver::{WorkerDirectory, WorkerRegistry};

use crate::checkpoint_store::CheckpointStore;
use crate::graph::{BatchEnv, BatchHistory, FailurePolicy, InstanceId, OWN_INSTANCE, StageRunner};
use crate::input::{EngineBlocks, InputSpec, InputWiring, RunningInput};
use crate::membership::{Adoption, Membership, Phase, Timing, owns_shard_leases, worker_dir};
use crate::metadata_log::MetadataLog;
use crate::metrics::{BatchInfo, DEFAULT_ERROR_RATE_BOUND, HealthEvent, Metrics, MetricsSnapshot};
use crate::outputs::OutputOp;
use crate::rate_estimator::{BackpressureConfig, PidRateEstimator};
use crate::state::StatefulOp;
use crate::tracker::{ReceivedBlockTracker, TrackedBlock};
use crate::{Error, Result};

/// Default batch interval.
pub const DEFAULT_BATCH_INTERVAL: Duration = Duration::from_secs(1);
/// Default attempts per task before the failure policy applies (Spark's `spark.task.maxFailures`
/// is 4; the issue asks for 3 retries' worth of attempts: 3).
pub const DEFAULT_MAX_TASK_ATTEMPTS: u32 = 3;
/// Default data directory (block store, local log, local leases).
pub const DEFAULT_DATA_DIR: &str = ".sluice-data";

/// Builds a [`StreamingContext`].
///
/// ```no_run
/// use std::time::Duration;
/// use sluice_engine::StreamingContext;
/// let ctx = StreamingContext::builder()
///     .batch_interval(Duration::from_millis(500))
///     .data_dir("/tmp/sluice-demo")
///     .build()?;
/// # Ok::<(), sluice_engine::Error>(())
/// ```
#[derive(Debug, Clone)]
pub struct StreamingContextBuilder {
    batch_interval: Duration,
    pub(crate) data_dir: PathBuf,
    checkpoint: Option<String>,
    pub(crate) storage_level: Option<StorageLevel>,
    executor_threads: usize,
    shuffle_partitions: Option<usize>,
    clock: Option<SharedClock>,
    max_task_attempts: u32,
    failure_policy: FailurePolicy,
    pub(crate) dead_letter: Option<String>,
    backpressure: BackpressureConfig,
    graceful_stop_timeout: Option<Duration>,
    pub(crate) memory_budget_bytes: Option<u64>,
    pub(crate) replica_url: Option<String>,
    stuck_bound: Option<Duration>,
    error_rate_bound: f64,
    worker_id: Option<String>,
}

impl Default for StreamingContextBuilder {
    fn default() -> Self {
        Self {
            batch_interval: DEFAULT_BATCH_INTERVAL,
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            checkpoint: None,
            storage_level: None,
            executor_threads: std::thread::available_parallelism().map_or(2, std::num::NonZero::get),
            shuffle_partitions: None,
            clock: None,
            max_task_attempts: DEFAULT_MAX_TASK_ATTEMPTS,
            failure_policy: FailurePolicy::Stop,
            dead_letter: None,
            backpressure: BackpressureConfig::default(),
            graceful_stop_timeout: None,
            memory_budget_bytes: None,
            replica_url: None,
            stuck_bound: None,
            error_rate_bound: DEFAULT_ERROR_RATE_BOUND,
            worker_id: None,
        }
    }
}

impl StreamingContextBuilder {
    /// How often a batch is cut (default 1 s).
    #[must_use]
    pub fn batch_interval(mut self, interval: Duration) -> Self {
        self.batch_interval = interval;
        self
    }
    /// Directory for the block store's disk tier, the local log and local leases.
    #[must_use]
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.data_dir = dir.into();
        self
    }
    /// Where the metadata log and operator state live: a local directory or an object-store URL
    /// (`s3://bucket/prefix`, `file:///…`). Default: `<data_dir>/checkpoint`.
    #[must_use]
    pub fn checkpoint(mut self, location: impl Into<String>) -> Self {
        self.checkpoint = Some(location.into());
        self
    }
    /// Storage level of every input's blocks. Default: each source's own
    /// ([`Source::default_storage_level`](sluice_receiver::Source::default_storage_level)):
    /// `MEMORY_ONLY` for the local log, whose replay reads the same disk a stored copy would;
    /// `MEMORY_AND_DISK` for Kinesis, where replay spends the shard's read quota. A lost block is
    /// replayed from its source by range either way; choose a `_2` level with a shared
    /// [`replica_url`](Self::replica_url) (S3) so that a restart on a new machine, or the worker
    /// that adopts a dead one, reads blocks from the replica instead.
    #[must_use]
    pub fn storage_level(mut self, level: StorageLevel) -> Self {
        self.storage_level = Some(level);
        self
    }
    /// Threads of the rayon pool that runs tasks (default: available cores).
    #[must_use]
    pub fn executor_threads(mut self, threads: usize) -> Self {
        self.executor_threads = threads;
        self
    }
    /// Partitions of keyed shuffles (default: 2 × executor threads).
    #[must_use]
    pub fn shuffle_partitions(mut self, partitions: usize) -> Self {
        self.shuffle_partitions = Some(partitions);
        self
    }
    /// The clock for batch and block intervals (default: the system clock; tests pass a
    /// [`ManualClock`](sluice_blockstore::ManualClock)).
    #[must_use]
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }
    /// Attempts per task before the failure policy applies (default 3).
    #[must_use]
    pub fn max_task_attempts(mut self, attempts: u32) -> Self {
        self.max_task_attempts = attempts;
        self
    }
    /// What to do with a task that keeps failing (default: stop the stream).
    #[must_use]
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.failure_policy = policy;
        self
    }
    /// Where dead-letter Parquet files go (local path or URL; default `<data_dir>/dead-letter`).
    #[must_use]
    pub fn dead_letter(mut self, location: impl Into<String>) -> Self {
        self.dead_letter = Some(location.into());
        self
    }
    /// Backpressure (PID rate controller; off by default).
    #[must_use]
    pub fn backpressure(mut self, config: BackpressureConfig) -> Self {
        self.backpressure = config;
        self
    }
    /// How long a graceful stop may take (default 10 × batch interval, as in Spark).
    #[must_use]
    pub fn graceful_stop_timeout(mut self, timeout: Duration) -> Self {
        self.graceful_stop_timeout = Some(timeout);
        self
    }
    /// Byte budget of the block store's memory tier.
    #[must_use]
    pub fn memory_budget_bytes(mut self, bytes: u64) -> Self {
        self.memory_budget_bytes = Some(bytes);
        self
    }
    /// Object-store URL of the block replica tier (default `file://<data_dir>/replica`).
    #[must_use]
    pub fn replica_url(mut self, url: impl Into<String>) -> Self {
        self.replica_url = Some(url.into());
        self
    }

    /// Total delay above which a batch raises [`HealthEvent::StuckProcessing`] (default 10 ×
    /// batch interval).
    #[must_use]
    pub fn stuck_bound(mut self, bound: Duration) -> Self {
        self.stuck_bound = Some(bound);
        self
    }
    /// Fraction of failed task attempts above which a batch raises
    /// [`HealthEvent::HighErrorRate`] (default 0.05).
    #[must_use]
    pub fn error_rate_bound(mut self, bound: f64) -> Self {
        self.error_rate_bound = bound;
        self
    }

    /// This worker's id among the workers of its application (default: the host name). It owns
    /// the worker's shard leases, names its metadata log (`<checkpoint>/workers/<id>/`) and its
    /// output files (`part-<id>-<i>.parquet`).
    ///
    /// Give every worker that shares a lease table and a checkpoint location its own id. A
    /// process started with the id of a previous one (the same machine after a restart, or a
    /// replacement configured with the same id) recovers that worker's log itself; a process
    /// with a new id leaves the old worker's log to be adopted by a live worker once its lease
    /// expires. Letters, digits, `.`, `_` and `-`, at most 128.
    #[must_use]
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.worker_id = Some(id.into());
        self
    }

    /// Validates the settings and builds the context. Nothing runs until
    /// [`StreamingContext::start`].
    ///
    /// # Errors
    /// [`Error::Config`] naming the bad setting and the fix.
    pub fn build(self) -> Result<StreamingContext> {
        let interval_ms = i64::try_from(self.batch_interval.as_millis()).unwrap_or(i64::MAX);
        if interval_ms < 1 {
            return Err(Error::Config {
                field: "batch_interval",
                reason: "must be at least 1 ms".into(),
            });
        }
        if self.executor_threads == 0 {
            return Err(Error::Config {
                field: "executor_threads",
                reason: "must be at least 1".into(),
            });
        }
        if self.max_task_attempts == 0 {
            return Err(Error::Config {
                field: "max_task_attempts",
                reason: "must be at least 1".into(),
            });
        }
        if self.shuffle_partitions == Some(0) {
            return Err(Error::Config {
                field: "shuffle_partitions",
                reason: "must be at least 1".into(),
            });
        }
        self.backpressure.validate()?;
        if !(0.0..=1.0).contains(&self.error_rate_bound) {
            return Err(Error::Config {
                field: "error_rate_bound",
                reason: format!("{} is not a fraction in 0..=1", self.error_rate_bound),
            });
        }
        if let Some(id) = &self.worker_id {
            validate_worker_id(id)?;
        }
        let shuffle_partitions = self.shuffle_partitions.unwrap_or(self.executor_threads * 2);
        let graph = GraphBuilder {
            inner: Arc::new(Mutex::new(GraphParts::default())),
            shuffle_partitions,
        };
        Ok(StreamingContext {
            config: Arc::new(self),
            graph,
            running: Mutex::new(None),
            metrics: Arc::new(Metrics::default()),
        })
    }
}

/// Worker ids name directories and files: letters, digits, `.`, `_` and `-`, at most 128.
fn validate_worker_id(id: &str) -> Result<()> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::Config {
            field: "worker_id",
            reason: format!(
                "{id:?} is not a valid worker id: use 1 to 128 letters, digits, '.', '_' or '-' (it names the \
                 worker's log directory and output files)"
            ),
        })
    }
}

type BatchListener = Box<dyn Fn(&BatchInfo) + Send + Sync>;
type HealthListener = Box<dyn Fn(&HealthEvent) + Send + Sync>;

#[derive(Default)]
pub(crate) struct GraphParts {
    pub outputs: Vec<Box<dyn OutputOp>>,
    pub stateful: Vec<Arc<dyn StatefulOp>>,
    pub inputs: Vec<InputSpec>,
    pub listeners: Vec<BatchListener>,
    pub health_listeners: Vec<HealthListener>,
    pub remember_batches: usize,
    /// Fallible operators named so far, for their stage names (`try_map#<n>`).
    pub named_stages: usize,
}

/// The graph under construction, shared by every [`DStream`](crate::DStream) of a context.
#[derive(Clone)]
pub(crate) struct GraphBuilder {
    pub inner: Arc<Mutex<GraphParts>>,
    shuffle_partitions: usize,
}

impl GraphBuilder {
    pub(crate) fn default_partitions(&self) -> usize {
        self.shuffle_partitions
    }
    pub(crate) fn add_output(&self, op: Box<dyn OutputOp>) {
        self.inner.lock().expect("graph").outputs.push(op);
    }
    pub(crate) fn add_stateful(&self, op: Arc<dyn StatefulOp>) -> usize {
        let mut g = self.inner.lock().expect("graph");
        g.stateful.push(op);
        g.stateful.len() - 1
    }
    pub(crate) fn add_input(&self, make: impl FnOnce(u32) -> InputSpec) -> u32 {
        let mut g = self.inner.lock().expect("graph");
        let id = u32::try_from(g.inputs.len()).expect("fewer than 2^32 inputs");
        g.inputs.push(make(id));
        id
    }
    /// A stage name for dead letters and metrics: `<operator>#<n>`, `n` counting the fallible
    /// operators of this graph in the order the program defines them (stable across restarts).
    pub(crate) fn stage_name(&self, operator: &str) -> Arc<str> {
        let mut g = self.inner.lock().expect("graph");
        g.named_stages += 1;
        Arc::from(format!("{operator}#{}", g.named_stages))
    }
    /// Keeps the blocks of the last `batches` batches (windows read them again after a restart).
    pub(crate) fn remember(&self, batches: usize) {
        let mut g = self.inner.lock().expect("graph");
        g.remember_batches = g.remember_batches.max(batches);
    }
}

/// The entry point: build streams on it, then [`start`](Self::start) it.
pub struct StreamingContext {
    pub(crate) config: Arc<StreamingContextBuilder>,
    pub(crate) graph: GraphBuilder,
    running: Mutex<Option<Running>>,
    metrics: Arc<Metrics>,
}

struct Running {
    shared: Arc<Shared>,
    generator: Option<JoinHandle<()>>,
    membership: Option<Membership>,
}

/// One metadata log and what its batches need: this worker's own log, or the log of a dead
/// worker this worker adopted (see [`crate::membership`]).
pub(crate) struct LogRuntime {
    /// Keys the log's stage caches and operator state.
    pub instance: InstanceId,
    /// The worker the log belongs to: its output carries this name.
    pub writer: Arc<str>,
    pub tracker: Arc<ReceivedBlockTracker>,
    /// The worker's directory on the checkpoint location (its log and state snapshots).
    pub checkpoint: CheckpointStore,
}

/// State shared by the job generator thread, the membership thread and the context.
pub(crate) struct Shared {
    config: Arc<StreamingContextBuilder>,
    pub(crate) clock: SharedClock,
    interval_ms: i64,
    /// This worker's own log.
    own: Arc<LogRuntime>,
    /// The root of the checkpoint location (every worker's directory is under it).
    pub(crate) root: CheckpointStore,
    registry: Option<Arc<WorkerRegistry>>,
    blocks: Arc<EngineBlocks>,
    runner: Arc<StageRunner>,
    graph: Arc<Mutex<GraphParts>>,
    pub(crate) inputs: Vec<Box<dyn RunningInput>>,
    metrics: Arc<Metrics>,
    adoptions: Mutex<Vec<Arc<Adoption>>>,
    next_instance: AtomicU32,
    stop_requested: AtomicBool,
    drain_requested: AtomicBool,
    status: Mutex<Status>,
    status_changed: Condvar,
    last_processed: AtomicU64,
}

#[derive(Debug, Default)]
struct Status {
    stopped: bool,
    error: Option<String>,
    last_processed_ms: Option<i64>,
}

impl StreamingContext {
    /// A builder with the defaults.
    pub fn builder() -> StreamingContextBuilder {
        StreamingContextBuilder::default()
    }

    /// Calls `listener` on the job thread after every completed batch (Spark's
    /// `StreamingListener.onBatchCompleted`).
    pub fn add_batch_listener(&self, listener: impl Fn(&BatchInfo) + Send + Sync + 'static) {
        self.graph
            .inner
            .lock()
            .expect("graph")
            .listeners
            .push(Box::new(listener));
    }

    /// The running context's block store (for operations and tests).
    ///
    /// # Errors
    /// [`Error::Config`] if the context is not started.
    pub fn block_store(&self) -> Result<Arc<sluice_blockstore::BlockStore>> {
        Ok(self.shared()?.blocks.store().clone())
    }

    /// Calls `listener` for every event raised by the built-in detectors (stuck processing, high
    /// error rate).
    pub fn add_health_listener(&self, listener: impl Fn(&HealthEvent) + Send + Sync + 'static) {
        self.graph
            .inner
            .lock()
            .expect("graph")
            .health_listeners
            .push(Box::new(listener));
    }

    /// The engine's metrics so far.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// The data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.config.data_dir
    }

    /// Recovers from the checkpoint location and starts the receivers and the job generator.
    /// Returns once they are running; it never waits for data.
    ///
    /// Recovery (ARCHITECTURE §6): the metadata log is replayed; operator state is restored to the
    /// last completed batch; batches allocated but not completed re-run first, in order, with
    /// exactly their blocks (blocks of the previous run are marked invalid and read by replay
    /// unless a valid copy is found); logged blocks not yet allocated go to the next batch; and
    /// every shard resumes strictly after its last logged position.
    ///
    /// # Errors
    /// Configuration, checkpoint, block store or receiver start-up errors.
    pub fn start(&self) -> Result<()> {
        let mut running = self.running.lock().expect("context");
        if running.is_some() {
            return Err(Error::Config {
                field: "start",
                reason: "the context is already started".into(),
            });
        }
        let config = self.config.clone();
        let clock: SharedClock = config.clock.clone().unwrap_or_else(|| Arc::new(SystemClock));
        let interval_ms = i64::try_from(config.batch_interval.as_millis()).unwrap_or(i64::MAX);
        let root = match &config.checkpoint {
            Some(location) => crate::input::checkpoint_store_for(location)?,
            None => CheckpointStore::local(config.data_dir.join("checkpoint"))?,
        };
        let graph = self.graph.inner.lock().expect("graph");
        let worker_id = resolve_worker_id(&config, &graph.inputs)?;
        let run_id = new_run_id(&worker_id, clock.now_ms());
        // Join the application's workers before claiming the log: a worker takes its own worker
        // lease back from whoever holds it (an adopter stops when its renewal fails).
        let registry = match graph.inputs.first() {
            Some(first) => Some(Arc::new(WorkerRegistry::join(
                first.leases.clone(),
                &worker_id,
                first.config.lease_failover_ms,
                clock.clone(),
            )?)),
            None => None,
        };
        let (own, recovered) = recover_own_log(&root, &worker_id, run_id, &graph)?;
        let blocks = Arc::new(EngineBlocks::open(
            &config,
            clock.clone(),
            own.tracker.clone(),
            self.metrics.clone(),
        )?);
        let runner = Arc::new(new_runner(&config)?);
        let resume_after: HashMap<(Arc<str>, Arc<str>), sluice_blockstore::Position> = recovered
            .resume_after
            .iter()
            .map(|(s, sh, p)| ((s.clone(), sh.clone()), p.clone()))
            .collect();
        let wiring = InputWiring {
            run_id,
            clock: clock.clone(),
            blocks: blocks.clone(),
            resume_after,
            worker_id: worker_id.clone(),
            workers: registry.clone().map(|r| r as Arc<dyn WorkerDirectory>),
        };
        let mut inputs = Vec::new();
        for spec in &graph.inputs {
            inputs.push((spec.start)(&wiring)?);
        }
        let timing = graph.inputs.first().map(|first| Timing {
            failover_ms: first.config.lease_failover_ms,
            scan_interval_ms: first.config.lease_taker_interval_ms,
        });
        drop(graph);
        let shared = Arc::new(Shared {
            config: config.clone(),
            clock: clock.clone(),
            interval_ms,
            own,
            root,
            registry: registry.clone(),
            blocks,
            runner,
            graph: self.graph.inner.clone(),
            inputs,
            metrics: self.metrics.clone(),
            adoptions: Mutex::new(Vec::new()),
            next_instance: AtomicU32::new(OWN_INSTANCE + 1),
            stop_requested: AtomicBool::new(false),
            drain_requested: AtomicBool::new(false),
            status: Mutex::new(Status::default()),
            status_changed: Condvar::new(),
            last_processed: AtomicU64::new(0),
        });
        let thread_shared = shared.clone();
        let pending = recovered.pending_batches;
        let generator = std::thread::Builder::new()
            .name("sluice-job-generator".into())
            .spawn(move || thread_shared.run_generator(&pending))
            .map_err(|e| Error::Internal(format!("cannot start the job generator: {e}")))?;
        let membership = match (registry, timing) {
            (Some(registry), Some(timing)) => Some(Membership::start(shared.clone(), registry, timing)?),
            _ => None,
        };
        *running = Some(Running {
            shared,
            generator: Some(generator),
            membership,
        });
        Ok(())
    }

    /// Blocks until the context stops; returns the error that stopped it, if any.
    ///
    /// # Errors
    /// [`Error::Stopped`] with the reason when a batch failed or a receiver gave up.
    pub fn await_termination(&self) -> Result<()> {
        let shared = self.shared()?;
        let mut status = shared.status.lock().expect("status");
        while !status.stopped {
            status = shared.status_changed.wait(status).expect("status");
        }
        match &status.error {
            Some(e) => Err(Error::Stopped { reason: e.clone() }),
            None => Ok(()),
        }
    }

    /// Waits until every receiver has read its sources to their current end, every record read is
    /// stored and logged, and every logged block has been processed by a completed batch. Returns
    /// `Ok(false)` on timeout.
    ///
    /// # Errors
    /// [`Error::Stopped`] if the context stopped with an error meanwhile.
    pub fn await_drained(&self, timeout: Duration) -> Result<bool> {
        let shared = self.shared()?;
        let deadline = std::time::Instant::now() + timeout;
        loop {
            {
                let status = shared.status.lock().expect("status");
                if let Some(e) = &status.error {
                    return Err(Error::Stopped { reason: e.clone() });
                }
                if status.stopped {
                    return Ok(true);
                }
            }
            // Read receiver state first: blocks they stored before reporting caught up are then
            // visible to the tracker check that follows.
            let caught_up = shared.inputs.iter().all(|i| i.caught_up());
            let processed_one = shared.status.lock().expect("status").last_processed_ms.is_some();
            if caught_up
                && processed_one
                && !shared.own.tracker.has_unallocated_blocks()
                && shared.all_allocated_processed()
                && shared.adoptions().is_empty()
            {
                return Ok(true);
            }
            if std::time::Instant::now() >= deadline {
                return Ok(false);
            }
            let status = shared.status.lock().expect("status");
            let _unused = shared
                .status_changed
                .wait_timeout(status, Duration::from_millis(20))
                .expect("status");
        }
    }

    /// Stops the context. A graceful stop stops the receivers (which seal, store and log what they
    /// buffered), processes every logged block, checkpoints and releases leases, within the
    /// graceful-stop timeout; a non-graceful stop finishes only the batch in progress.
    ///
    /// # Errors
    /// [`Error::StopTimeout`] if the graceful stop did not finish in time (what was not processed
    /// is still logged and runs after a restart); receiver stop errors.
    pub fn stop(&self, graceful: bool) -> Result<()> {
        let mut running = self.running.lock().expect("context");
        let Some(mut run) = running.take() else { return Ok(()) };
        let shared = run.shared.clone();
        let timeout = self
            .config
            .graceful_stop_timeout
            .unwrap_or(self.config.batch_interval * 10);
        let mut first_error = None;
        if !graceful {
            // No more batches will run to free the ingest gate for them.
            shared.blocks.close_gate();
        }
        for input in &shared.inputs {
            if let Err(e) = input.stop(graceful) {
                first_error.get_or_insert(e);
            }
        }
        if graceful {
            shared.drain_requested.store(true, Ordering::SeqCst);
        } else {
            shared.stop_requested.store(true, Ordering::SeqCst);
        }
        shared.status_changed.notify_all();
        let deadline = std::time::Instant::now() + timeout;
        let mut timed_out = false;
        {
            let mut status = shared.status.lock().expect("status");
            while !status.stopped {
                let now = std::time::Instant::now();
                if now >= deadline {
                    timed_out = true;
                    shared.stop_requested.store(true, Ordering::SeqCst);
                    // Abandon the batch in progress between records (it is logged: it re-runs
                    // after a restart) instead of joining it past the timeout.
                    shared.runner.cancelled.store(true, Ordering::SeqCst);
                    break;
                }
                status = shared
                    .status_changed
                    .wait_timeout(status, deadline - now)
                    .expect("status")
                    .0;
            }
        }
        if let Some(handle) = run.generator.take() {
            let _joined = handle.join();
        }
        if let Some(mut membership) = run.membership.take() {
            membership.stop();
        }
        if graceful && !timed_out && first_error.is_none() {
            shared.release_worker_lease_if_done();
        }
        if timed_out {
            return Err(Error::StopTimeout { timeout });
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let status = shared.status.lock().expect("status");
        match &status.error {
            Some(e) => Err(Error::Stopped { reason: e.clone() }),
            None => Ok(()),
        }
    }

    fn shared(&self) -> Result<Arc<Shared>> {
        self.running
            .lock()
            .expect("context")
            .as_ref()
            .map(|r| r.shared.clone())
            .ok_or(Error::Config {
                field: "start",
                reason: "the context is not started".into(),
            })
    }
}

impl Drop for StreamingContext {
    fn drop(&mut self) {
        // No detached threads: a context dropped while running stops without draining.
        if self.running.get_mut().is_ok_and(|r| r.is_some()) {
            let _ignored = self.stop(false);
        }
    }
}

/// Claims this worker's log (fencing any earlier process of it), recovers it and restores the
/// operator state of its last completed batch.
fn recover_own_log(
    root: &CheckpointStore,
    worker_id: &str,
    run_id: u64,
    graph: &GraphParts,
) -> Result<(Arc<LogRuntime>, crate::tracker::RecoveredState)> {
    let own_dir = worker_dir(root, worker_id);
    let holder = format!("{worker_id} (pid {}, run {run_id:x})", std::process::id());
    let (tracker, recovered) = ReceivedBlockTracker::recover(MetadataLog::claim(&own_dir, &holder)?)?;
    // An empty batch is logged only when operator state moves with it (see the tracker).
    let tracker = Arc::new(tracker.with_empty_batches_logged(!graph.stateful.is_empty()));
    if !recovered.pending_batches.is_empty() || recovered.unallocated_blocks > 0 {
        tracing::info!(
            pending = ?recovered.pending_batches,
            unallocated = recovered.unallocated_blocks,
            "recovering from the metadata log"
        );
    }
    let own = Arc::new(LogRuntime {
        instance: OWN_INSTANCE,
        writer: Arc::from(worker_id),
        tracker,
        checkpoint: own_dir,
    });
    crate::state::restore_all(&own.checkpoint, OWN_INSTANCE, recovered.last_completed, &graph.stateful)?;
    Ok((own, recovered))
}

fn new_runner(config: &StreamingContextBuilder) -> Result<StageRunner> {
    Ok(StageRunner {
        pool: rayon::ThreadPoolBuilder::new()
            .num_threads(config.executor_threads)
            .thread_name(|i| format!("sluice-executor-{i}"))
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the executor pool: {e}")))?,
        max_attempts: config.max_task_attempts,
        policy: config.failure_policy,
        cancelled: std::sync::atomic::AtomicBool::new(false),
        task_failures: AtomicU64::new(0),
        task_retries: AtomicU64::new(0),
        tasks: AtomicU64::new(0),
    })
}

/// Builds the worker id of a starting context: the builder's, else the inputs' (they must agree),
/// else the host name.
fn resolve_worker_id(config: &StreamingContextBuilder, inputs: &[InputSpec]) -> Result<String> {
    let mut id = config.worker_id.clone();
    for input in inputs {
        match (&id, &input.config.worker_id) {
            (Some(a), Some(b)) if a != b => {
                return Err(Error::Config {
                    field: "worker_id",
                    reason: format!(
                        "the input {} sets worker_id {b:?} but this worker is {a:?}: a worker has one id; set it \
                         once, with StreamingContext::builder().worker_id(..)",
                        input.stream
                    ),
                });
            }
            (None, Some(b)) => id = Some(b.clone()),
            _ => {}
        }
    }
    let id = id.unwrap_or_else(sluice_receiver::default_worker_id);
    validate_worker_id(&id)?;
    Ok(id)
}

/// A block-id run id unique across the workers sharing a replica location: the time, the
/// process, the worker id and per-process randomness hashed together.
fn new_run_id(worker_id: &str, now_ms: i64) -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one((worker_id, now_ms, std::process::id()))
}

/// Makes batch environments for any batch a log's tracker still knows.
struct History {
    shared: std::sync::Weak<Shared>,
    log: Arc<LogRuntime>,
}

impl BatchHistory for History {
    fn env_for(&self, time_ms: i64) -> Option<BatchEnv> {
        let shared = self.shared.upgrade()?;
        let blocks = self.log.tracker.blocks_of_batch(time_ms);
        Some(shared.env(&self.log, time_ms, blocks))
    }
}

impl Shared {
    fn env(self: &Arc<Self>, log: &Arc<LogRuntime>, time_ms: i64, blocks: Vec<TrackedBlock>) -> BatchEnv {
        let mut inputs: HashMap<u32, Vec<TrackedBlock>> = HashMap::new();
        for b in blocks {
            inputs.entry(b.meta.id.input_id).or_default().push(b);
        }
        BatchEnv {
            instance: log.instance,
            writer: log.writer.clone(),
            time_ms,
            interval_ms: self.interval_ms,
            inputs: Arc::new(inputs),
            blocks: self.blocks.clone(),
            history: Arc::new(History {
                shared: Arc::downgrade(self),
                log: log.clone(),
            }),
            runner: self.runner.clone(),
            dead_letters: Arc::default(),
        }
    }

    fn all_allocated_processed(&self) -> bool {
        let last = self.status.lock().expect("status").last_processed_ms;
        self.own
            .tracker
            .last_allocated()
            .is_none_or(|t| last.is_some_and(|l| l >= t))
    }

    fn finish(&self, error: Option<String>) {
        // No batch will free the ingest gate any more: receivers waiting on it must not hang.
        self.blocks.close_gate();
        let mut status = self.status.lock().expect("status");
        status.stopped = true;
        if status.error.is_none() {
            status.error = error;
        }
        drop(status);
        self.status_changed.notify_all();
    }

    /// The job generator: re-runs recovered batches, then one batch per interval until stopped;
    /// between batches, the batches of adopted logs.
    fn run_generator(self: Arc<Self>, pending: &[i64]) {
        for &time_ms in pending {
            if let Err(e) = self.run_batch(&self.own, time_ms) {
                return self.fail(&e);
            }
        }
        let mut next = (self.clock.now_ms() / self.interval_ms + 1) * self.interval_ms;
        if let Some(last) = self.own.tracker.last_allocated() {
            next = next.max(last + self.interval_ms);
        }
        loop {
            if self.stop_requested.load(Ordering::SeqCst) {
                return self.finish(None);
            }
            if let Some(reason) = self.inputs.iter().find_map(|i| i.failure()) {
                return self.fail(&Error::Receiver(reason));
            }
            if let Err(e) = self.run_adoptions() {
                return self.fail(&e);
            }
            if self.drain_requested.load(Ordering::SeqCst) && !self.own.tracker.has_unallocated_blocks() {
                // Receivers are stopped (stop() stops them first), so nothing new can arrive.
                return self.finish(None);
            }
            self.clock.sleep_until(next);
            if self.stop_requested.load(Ordering::SeqCst) {
                return self.finish(None);
            }
            if let Err(e) = self.run_batch(&self.own, next) {
                return self.fail(&e);
            }
            next += self.interval_ms;
            // Do not pile up batches when the clock jumped ahead (manual clocks, long pauses).
            let now = self.clock.now_ms();
            if next + self.interval_ms <= now {
                next = now / self.interval_ms * self.interval_ms;
            }
        }
    }

    /// Runs the batches of every queued adoption: the pending batches of the adopted log, then
    /// one batch with its unallocated blocks. A claim of the log by someone else (the worker
    /// came back, or another adopter) abandons it; any other failure fails this worker, as the
    /// failure policy says for its own batches.
    fn run_adoptions(self: &Arc<Self>) -> Result<()> {
        for adoption in self.adoptions() {
            if adoption.phase() != Phase::Queued {
                continue;
            }
            adoption.set_phase(Phase::Running);
            let outcome = self.run_adopted_log(&adoption);
            match outcome {
                Ok(()) if !adoption.abandon.load(Ordering::SeqCst) => adoption.set_phase(Phase::Done),
                Ok(()) => adoption.set_phase(Phase::Abandoned),
                Err(Error::Fenced { by, .. }) => {
                    tracing::warn!(worker = %adoption.worker, %by, "the adopted log was claimed by another process");
                    adoption.set_phase(Phase::Abandoned);
                }
                Err(e) => {
                    adoption.set_phase(Phase::Abandoned);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn run_adopted_log(self: &Arc<Self>, adoption: &Adoption) -> Result<()> {
        let log = &adoption.log;
        for &time_ms in &adoption.pending {
            if adoption.abandon.load(Ordering::SeqCst) || self.stop_requested.load(Ordering::SeqCst) {
                return Ok(());
            }
            self.run_batch(log, time_ms)?;
        }
        if log.tracker.has_unallocated_blocks() && !adoption.abandon.load(Ordering::SeqCst) {
            // A time the dead worker never allocated (it cannot allocate any more).
            let now = self.clock.now_ms() / self.interval_ms * self.interval_ms;
            let time_ms = log.tracker.last_allocated().map_or(now, |l| l + self.interval_ms);
            self.run_batch(log, time_ms)?;
        }
        Ok(())
    }

    fn fail(&self, e: &Error) {
        tracing::error!(error = %e, "stopping the stream");
        self.finish(Some(e.to_string()));
    }

    /// This worker was presumed dead and adopted: it must stop (its log is claimed).
    pub(crate) fn fenced_off(&self, why: &str) {
        self.fail(&Error::Fenced {
            location: format!("{}/metadata", self.own.checkpoint.location()),
            by: format!("another worker: {why}"),
        });
    }

    /// Whether the graph keeps operator state (empty batches are then logged).
    pub(crate) fn stateful(&self) -> bool {
        !self.graph.lock().expect("graph").stateful.is_empty()
    }

    pub(crate) fn new_instance(&self) -> InstanceId {
        self.next_instance.fetch_add(1, Ordering::SeqCst)
    }

    /// Restores the operator state of an adopted log as of its last completed batch.
    pub(crate) fn restore_state(&self, log: &LogRuntime, last_completed: Option<i64>) -> Result<()> {
        let graph = self.graph.lock().expect("graph");
        crate::state::restore_all(&log.checkpoint, log.instance, last_completed, &graph.stateful)
    }

    pub(crate) fn queue_adoption(&self, adoption: Adoption) {
        self.adoptions.lock().expect("adoptions").push(Arc::new(adoption));
    }

    /// The adoptions in progress.
    pub(crate) fn adoptions(&self) -> Vec<Arc<Adoption>> {
        self.adoptions.lock().expect("adoptions").clone()
    }

    /// Stops an adoption between batches (its worker lease was lost).
    pub(crate) fn abandon_adoption(&self, worker: &str) {
        for adoption in self.adoptions() {
            if adoption.worker == worker {
                adoption.abandon.store(true, Ordering::SeqCst);
                if adoption.phase() == Phase::Queued {
                    adoption.set_phase(Phase::Abandoned);
                }
            }
        }
    }

    /// Forgets a finished or abandoned adoption and its caches and state.
    pub(crate) fn drop_adoption(&self, adoption: &Arc<Adoption>) {
        self.adoptions
            .lock()
            .expect("adoptions")
            .retain(|a| !Arc::ptr_eq(a, adoption));
        let graph = self.graph.lock().expect("graph");
        for op in &graph.outputs {
            op.forget(adoption.log.instance, i64::MAX);
        }
        for op in &graph.stateful {
            op.drop_instance(adoption.log.instance);
        }
    }

    /// After a clean graceful stop: releases this worker's lease when its log holds no work and
    /// no shard lease is left in its name, so nobody adopts it (a later start takes it again).
    fn release_worker_lease_if_done(&self) {
        let Some(registry) = &self.registry else { return };
        let idle = !self.own.tracker.has_unallocated_blocks() && self.all_allocated_processed();
        let clean = self.status.lock().expect("status").error.is_none();
        if idle
            && clean
            && !owns_shard_leases(self, registry.worker_id())
            && let Err(e) = registry.release(registry.worker_id())
        {
            tracing::warn!(error = %e, "could not release the worker lease; it will expire");
        }
    }

    fn run_batch(self: &Arc<Self>, log: &Arc<LogRuntime>, time_ms: i64) -> Result<()> {
        let own = log.instance == OWN_INSTANCE;
        let submitted = self.clock.now_ms();
        let monotonic = std::time::Instant::now();
        let tasks_before = self.runner.tasks.load(Ordering::Relaxed);
        let failures_before = self.runner.task_failures.load(Ordering::Relaxed);
        let blocks = log.tracker.allocate_blocks_to_batch(time_ms)?;
        let num_records: u64 = blocks.iter().map(|b| b.meta.num_records).sum();
        let block_ids: Vec<sluice_blockstore::BlockId> = blocks.iter().map(|b| b.meta.id).collect();
        let env = self.env(log, time_ms, blocks);
        let started = self.clock.now_ms();
        let outputs_result = {
            let graph = self.graph.lock().expect("graph");
            graph.outputs.iter().try_for_each(|op| op.run(&env))
        };
        outputs_result.map_err(|e| Error::Stopped { reason: e.to_string() })?;
        // This batch's letters only: earlier batches recomputed for a window or state collected
        // into their own environments (their letters were written when they ran).
        let dead = env.dead_letters.take();
        self.blocks.write_dead_letters(time_ms, &log.writer, &dead)?;
        let stateful = {
            let graph = self.graph.lock().expect("graph");
            crate::state::snapshot_all(&log.checkpoint, log.instance, time_ms, &graph.stateful)?;
            !graph.stateful.is_empty()
        };
        // Cleanup behind completed batches, keeping what windows need; logged together with
        // the completion (one durable append).
        let remember = {
            let graph = self.graph.lock().expect("graph");
            let keep = i64::try_from(graph.remember_batches.max(1)).unwrap_or(i64::MAX);
            graph
                .outputs
                .iter()
                .for_each(|op| op.forget(log.instance, time_ms - keep * self.interval_ms));
            keep
        };
        let before = time_ms - (remember - 1) * self.interval_ms;
        let removed = log.tracker.complete_batch(time_ms, before)?;
        self.blocks.processed(&block_ids);
        let ended = self.clock.now_ms();
        if own {
            {
                let mut status = self.status.lock().expect("status");
                status.last_processed_ms = Some(time_ms);
            }
            self.last_processed
                .store(u64::try_from(time_ms).unwrap_or(0), Ordering::SeqCst);
        }
        self.status_changed.notify_all();

        for id in removed {
            self.blocks.remove(id);
        }
        if stateful {
            crate::state::cleanup_snapshots(&log.checkpoint, time_ms)?;
        }

        let info = BatchInfo {
            batch_time_ms: time_ms,
            adopted: !own,
            num_records,
            // Spark: processing start minus submission; a batch is due at its batch time.
            scheduling_delay_ms: (started - time_ms.max(submitted.min(time_ms))).max(0),
            processing_delay_ms: ended - started,
            dead_letters: dead.len() as u64,
            processing_micros: u64::try_from(monotonic.elapsed().as_micros()).unwrap_or(u64::MAX),
            tasks: self.runner.tasks.load(Ordering::Relaxed) - tasks_before,
            task_failures: self.runner.task_failures.load(Ordering::Relaxed) - failures_before,
        };
        self.metrics.record_batch(&info);
        self.metrics.record_dead_letters(&dead);
        let stuck_bound = self.config.stuck_bound.map_or(self.interval_ms * 10, |d| {
            i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
        });
        let events = crate::metrics::detect(&info, stuck_bound, self.config.error_rate_bound);
        let graph = self.graph.lock().expect("graph");
        for listener in &graph.listeners {
            listener(&info);
        }
        for event in &events {
            tracing::warn!(?event, "health event");
            self.metrics.health_events.fetch_add(1, Ordering::Relaxed);
            for listener in &graph.health_listeners {
                listener(event);
            }
        }
        drop(graph);
        if own {
            self.update_rate(&info);
        }
        Ok(())
    }

    fn update_rate(&self, info: &BatchInfo) {
        if !self.config.backpressure.enabled {
            return;
        }
        let mut estimator = self.metrics.pid.lock().expect("pid");
        let pid = estimator.get_or_insert_with(|| PidRateEstimator::new(self.interval_ms, &self.config.backpressure));
        if let Some(rate) = pid.compute(
            info.batch_time_ms,
            info.num_records,
            info.processing_delay_ms,
            info.scheduling_delay_ms,
        ) {
            let per_input = rate / self.inputs.len().max(1) as f64;
            for input in &self.inputs {
                input.set_max_rate(Some(per_input));
            }
            self.metrics.rate_limit.store(rate as u64, Ordering::Relaxed);
        }
    }
}
