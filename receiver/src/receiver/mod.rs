//! [`Receiver`]: reads every owned shard of a [`Source`] into blocks, checkpoints what is stored.
//!
//! # Threads
//!
//! ```text
//! supervisor ── runs an incarnation; on a retryable failure waits restart_delay_ms and runs another
//!   └─ coordinator (the incarnation) ── leases: sync shards → take/steal → renew; start a shard
//!        │                               loop per held lease whose parents are finished;
//!        │                               checkpoint stored positions; SHARD_END; release
//!        ├─ shard loop × owned shards ── read (paced, rate limited) → BlockGenerator::add_batch
//!        └─ BlockGenerator timer + pusher ── seal blocks → BlockHandler::store_block → on_stored
//! ```
//!
//! # Positions
//!
//! Per shard the receiver tracks what it has *read* and what is *stored* (updated only from
//! `on_stored`, i.e. after the handler returned `Ok`). Checkpoints are written only from stored
//! positions, at most once per `checkpoint_interval_ms` per shard and once more at stop, fenced by
//! the lease. `SHARD_END` is written only when the reader reported the end of the shard and every
//! record read from it is stored. A restarted incarnation reads each shard strictly after the
//! latest of its checkpoint, its stored position and the engine's `resume_after` position — never
//! after an unstored one, so a failed block is read again, never skipped.

mod config;
mod coordinator;
mod metrics;
mod progress;
mod shard_loop;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sluice_blockstore::{BlockMeta, Position, SharedClock};

pub use config::{InitialPosition, ReceiverConfig, default_worker_id};
pub use metrics::{ReceiverMetrics, ShardMetrics};

use self::metrics::MetricsCells;
use self::progress::ShardProgressTable;
use crate::block_generator::{BlockGenerator, BlockHandler, GeneratorError};
use crate::config_error::ConfigError;
use crate::lease::{Checkpoint, LeaseKind};
use crate::lease::{LeaseError, LeaseStore, WorkerDirectory};
use crate::rate_limiter::RateLimiter;
use crate::signal::{MAX_REAL_WAIT, StopSignal, Wake};
use crate::source::{Source, SourceError, SourceRelease};
use crate::stop_mode::StopMode;

/// Why a receiver failed, or could not start or stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReceiverError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `start` was called twice.
    #[error("the receiver was already started")]
    AlreadyStarted,
    /// The source failed.
    #[error("source error on shard {shard_id}: {source}")]
    Source {
        /// The shard being read (or `*` for stream-wide calls).
        shard_id: String,
        /// The cause.
        #[source]
        source: SourceError,
    },
    /// The lease store failed.
    #[error("lease store error: {0}")]
    Lease(#[from] LeaseError),
    /// The block generator failed (a block could not be stored).
    #[error(transparent)]
    Generator(#[from] GeneratorError),
    /// A thread could not be spawned.
    #[error("could not spawn a receiver thread: {message}")]
    Spawn {
        /// The operating system's error.
        message: String,
    },
}

impl ReceiverError {
    /// Whether restarting the receiver may succeed (it is restarted after `restart_delay_ms`);
    /// otherwise the receiver gives up and reports [`ReceiverStatus::failed`].
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    /// Where the error comes from and whether it is retryable (its cause's class).
    pub fn class(&self) -> sluice_blockstore::ErrorClass {
        use sluice_blockstore::{Domain, ErrorClass};
        match self {
            ReceiverError::Source { source, .. } => source.class(),
            ReceiverError::Lease(e) => e.class(),
            ReceiverError::Generator(e) => e.class(),
            ReceiverError::Config(e) => e.class(),
            ReceiverError::Spawn { .. } => ErrorClass::transient(Domain::Internal),
            ReceiverError::AlreadyStarted => ErrorClass::permanent(Domain::Lifecycle),
        }
    }
}

/// Where a receiver is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverState {
    /// Built, not started.
    Created,
    /// Reading.
    Running,
    /// Waiting to restart after a retryable failure.
    Restarting,
    /// `stop` is in progress.
    Stopping,
    /// Stopped by `stop`.
    Stopped,
    /// Gave up after a non-retryable failure ([`ReceiverStatus::failed`] says why).
    Failed,
}

/// What the engine (and tests) can see of a receiver.
#[derive(Debug, Clone)]
pub struct ReceiverStatus {
    /// Lifecycle state.
    pub state: ReceiverState,
    /// Every owned shard is read to its current end (or finished), every record read is stored,
    /// and no lease is waiting to be taken or started. For a finite source this means "drained".
    pub caught_up: bool,
    /// Records read and accepted (this receiver's life; re-read records count again).
    pub records_received: u64,
    /// Records in stored blocks.
    pub records_stored: u64,
    /// Blocks stored.
    pub blocks_pushed: u64,
    /// Shards whose lease this receiver holds.
    pub owned_shards: Vec<String>,
    /// The error that made the receiver give up, if it did (kept whole: match on it).
    pub failed: Option<Arc<ReceiverError>>,
    /// The last error seen, retryable or not.
    pub last_error: Option<String>,
    /// Restarts after failures.
    pub restarts: u64,
}

/// A dead worker whose shard leases to take, with the position its log ends per shard.
#[derive(Debug, Clone)]
pub(crate) struct AdoptRequest {
    pub(crate) worker: String,
    pub(crate) floors: HashMap<Arc<str>, Position>,
}

#[derive(Debug)]
pub(crate) struct StatusCell {
    pub(crate) state: ReceiverState,
    /// The coordinator's last pass found nothing left to take, start or finish.
    pub(crate) settled: bool,
    pub(crate) failed: Option<Arc<ReceiverError>>,
    pub(crate) last_error: Option<String>,
}

/// Everything the receiver's threads share.
pub(crate) struct Core {
    pub(crate) config: ReceiverConfig,
    pub(crate) worker_id: String,
    pub(crate) source: Arc<dyn Source>,
    pub(crate) stream: Arc<str>,
    pub(crate) leases: Arc<dyn LeaseStore>,
    /// The application's workers (engine mode), or `None` (KCL mode: expiry and stealing).
    pub(crate) workers: Option<Arc<dyn WorkerDirectory>>,
    /// Dead workers whose shard leases this receiver is to take (see [`Receiver::adopt`]).
    pub(crate) adoptions: Mutex<Vec<AdoptRequest>>,
    pub(crate) handler: Arc<dyn BlockHandler>,
    pub(crate) clock: SharedClock,
    pub(crate) run_id: u64,
    pub(crate) resume_after: HashMap<Arc<str>, Position>,
    pub(crate) next_block_seq: Arc<AtomicU64>,
    pub(crate) rate: Arc<RateLimiter>,
    pub(crate) metrics: MetricsCells,
    pub(crate) progress: ShardProgressTable,
    pub(crate) status: Mutex<StatusCell>,
    pub(crate) status_changed: Condvar,
    /// Stopped by `Receiver::stop`; nudged when a shard ends or a block is stored.
    pub(crate) stop: StopSignal,
    pub(crate) graceful: AtomicBool,
    pub(crate) generator: Mutex<Option<Arc<BlockGenerator>>>,
    /// The error that ended the incarnation that `stop` shut down.
    pub(crate) stop_error: Mutex<Option<ReceiverError>>,
}

impl Core {
    /// Records a stored block's ranges (the generator's `on_stored`).
    fn on_stored(&self, meta: &BlockMeta) {
        self.progress.stored(&meta.ranges);
        self.stop.nudge();
    }

    pub(crate) fn set_state(&self, state: ReceiverState) {
        let mut status = self.status.lock().expect("status lock");
        // Failed is final; Stopped only yields to Failed.
        if status.state != ReceiverState::Failed {
            status.state = state;
        }
        self.status_changed.notify_all();
    }

    /// An error the receiver goes on after (retried, or seen while stopping).
    pub(crate) fn record_error(&self, error: &ReceiverError) {
        let mut status = self.status.lock().expect("status lock");
        status.last_error = Some(error.to_string());
        self.status_changed.notify_all();
    }

    /// The error the receiver gives up on.
    pub(crate) fn record_failure(&self, error: ReceiverError) {
        let mut status = self.status.lock().expect("status lock");
        status.last_error = Some(error.to_string());
        status.failed = Some(Arc::new(error));
        status.state = ReceiverState::Failed;
        self.status_changed.notify_all();
    }

    pub(crate) fn set_settled(&self, settled: bool) {
        let mut status = self.status.lock().expect("status lock");
        if status.settled != settled {
            status.settled = settled;
            self.status_changed.notify_all();
        }
    }

    fn status(&self) -> ReceiverStatus {
        let metrics = self.metrics.snapshot();
        let generator_idle = self
            .generator
            .lock()
            .expect("generator slot")
            .as_ref()
            .is_some_and(|g| g.is_idle());
        let (owned, shards_done) = self.progress.owned_and_done();
        let status = self.status.lock().expect("status lock");
        ReceiverStatus {
            state: status.state,
            caught_up: status.state == ReceiverState::Running && status.settled && generator_idle && shards_done,
            records_received: metrics.records_received,
            records_stored: metrics.records_stored,
            blocks_pushed: metrics.blocks_pushed,
            owned_shards: owned,
            failed: status.failed.clone(),
            last_error: status.last_error.clone(),
            restarts: metrics.restarts,
        }
    }
}

/// A receiver: see the module docs of `receiver/src/receiver/mod.rs`.
///
/// Build it with [`Receiver::new`], [`start`](Receiver::start) it (returns at once), watch
/// [`status`](Receiver::status), slow it with [`set_max_rate`](Receiver::set_max_rate), and
/// [`stop`](Receiver::stop) it. All methods take `&self`; the receiver is `Send + Sync`.
pub struct Receiver {
    core: Arc<Core>,
    supervisor: Mutex<Option<JoinHandle<()>>>,
    started: AtomicBool,
    /// [`Source::release`] was called.
    released: AtomicBool,
}

impl std::fmt::Debug for Receiver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Receiver")
            .field("stream", &self.core.stream)
            .field("worker_id", &self.core.worker_id)
            .field("status", &self.status())
            .finish_non_exhaustive()
    }
}

impl Receiver {
    /// A receiver of `source` (not started).
    ///
    /// `run_id` goes into every block id. `resume_after` (engine recovery) makes a shard start
    /// strictly after the given position when that is later than its checkpoint; it also counts as
    /// stored (its blocks are in the engine's metadata log), so the checkpoint may advance to it.
    ///
    /// # Errors
    /// [`ReceiverError::Config`] if the configuration is invalid.
    pub fn new(
        config: ReceiverConfig,
        source: Arc<dyn Source>,
        leases: Arc<dyn LeaseStore>,
        handler: Arc<dyn BlockHandler>,
        clock: SharedClock,
        run_id: u64,
        resume_after: HashMap<Arc<str>, Position>,
    ) -> Result<Self, ReceiverError> {
        config.validate()?;
        let progress = ShardProgressTable::resuming_after(&resume_after);
        let core = Core {
            worker_id: config.effective_worker_id(),
            stream: Arc::from(source.stream_name()),
            rate: Arc::new(RateLimiter::new(config.max_rate, clock.clone())),
            config,
            source,
            leases,
            workers: None,
            adoptions: Mutex::new(Vec::new()),
            handler,
            clock,
            run_id,
            resume_after,
            next_block_seq: Arc::new(AtomicU64::new(0)),
            metrics: MetricsCells::default(),
            progress,
            status: Mutex::new(StatusCell {
                state: ReceiverState::Created,
                settled: false,
                failed: None,
                last_error: None,
            }),
            status_changed: Condvar::new(),
            stop: StopSignal::new(),
            graceful: AtomicBool::new(true),
            generator: Mutex::new(None),
            stop_error: Mutex::new(None),
        };
        Ok(Self {
            core: Arc::new(core),
            supervisor: Mutex::new(None),
            started: AtomicBool::new(false),
            released: AtomicBool::new(false),
        })
    }

    /// Makes this receiver one worker of an application whose workers hold worker leases (the
    /// engine's mode; see [`WorkerDirectory`]): it never takes a shard lease of a registered
    /// worker by expiry (a dead worker's shards move through [`adopt`](Self::adopt)), and it
    /// balances by releasing what it holds above its share — after a checkpoint at exactly its
    /// last stored position — instead of stealing. Call before [`start`](Self::start).
    ///
    /// # Panics
    /// If the receiver was already started.
    #[must_use]
    pub fn with_workers(mut self, workers: Arc<dyn WorkerDirectory>) -> Self {
        Arc::get_mut(&mut self.core)
            .expect("with_workers is called before start")
            .workers = Some(workers);
        self
    }

    /// Takes every shard lease `worker` (a dead worker whose log this process adopted) still
    /// owns, each with its checkpoint raised to at least the position `floors` gives for its
    /// shard — where that worker's log ends — in one write ([`LeaseStore::adopt_lease`]). The
    /// shards then start after it. Runs on the receiver's thread; see
    /// [`is_adopting`](Self::is_adopting).
    pub fn adopt(&self, worker: &str, floors: HashMap<Arc<str>, Position>) {
        let mut adoptions = self.core.adoptions.lock().expect("adoptions");
        adoptions.retain(|r| r.worker != worker);
        adoptions.push(AdoptRequest {
            worker: worker.to_owned(),
            floors,
        });
        drop(adoptions);
        self.core.stop.nudge();
    }

    /// Forgets an [`adopt`](Self::adopt) request (the adoption passed to another process).
    pub fn cancel_adoption(&self, worker: &str) {
        self.core
            .adoptions
            .lock()
            .expect("adoptions")
            .retain(|r| r.worker != worker);
    }

    /// Whether some shard lease of `worker` is still to be taken after [`adopt`](Self::adopt).
    pub fn is_adopting(&self, worker: &str) -> bool {
        self.core
            .adoptions
            .lock()
            .expect("adoptions")
            .iter()
            .any(|r| r.worker == worker)
    }

    /// Starts reading in the background and returns at once (it never blocks on the source, the
    /// lease store or the handler).
    ///
    /// # Errors
    /// [`ReceiverError::AlreadyStarted`] on a second call; [`ReceiverError::Spawn`].
    pub fn start(&self) -> Result<(), ReceiverError> {
        if self.started.swap(true, Ordering::SeqCst) {
            return Err(ReceiverError::AlreadyStarted);
        }
        self.core.set_state(ReceiverState::Running);
        let core = self.core.clone();
        let handle = std::thread::Builder::new()
            .name(format!("sluice-receiver-{}", self.core.config.input_id))
            .spawn(move || supervise(&core))
            .map_err(|e| ReceiverError::Spawn { message: e.to_string() })?;
        *self.supervisor.lock().expect("supervisor slot") = Some(handle);
        Ok(())
    }

    /// Stops the receiver and joins its threads.
    ///
    /// [`StopMode::Graceful`]: stop reading, seal and store everything buffered (waiting for the
    /// handler), write a final checkpoint of every owned shard at its last stored position (and
    /// `SHARD_END` where due), release the leases. [`StopMode::Immediate`]: buffered, unstored
    /// records are discarded — they are not checkpointed and will be read again — then checkpoint
    /// what is stored and release the leases.
    ///
    /// # Errors
    /// The error that ended the last incarnation during the stop (for example a block that could
    /// not be stored while draining). A receiver that had already given up reports it in
    /// [`ReceiverStatus::failed`], not here.
    pub fn stop(&self, mode: StopMode) -> Result<(), ReceiverError> {
        self.core.graceful.store(mode == StopMode::Graceful, Ordering::SeqCst);
        self.core.set_state(ReceiverState::Stopping);
        self.core.stop.stop();
        let handle = self.supervisor.lock().expect("supervisor slot").take();
        match handle {
            // The supervisor catches panics of the incarnation and records them.
            Some(handle) => drop(handle.join()),
            None => self.core.set_state(ReceiverState::Stopped),
        }
        self.release_source(mode);
        match self.core.stop_error.lock().expect("stop error slot").take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Tells the source this receiver is done with it ([`Source::release`]), once. After a
    /// graceful stop it is the last reader unless another worker holds a lease of the stream
    /// or (engine mode) another worker of the application is alive.
    fn release_source(&self, mode: StopMode) {
        if self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        let core = &self.core;
        let last_reader = || {
            let me = core.worker_id.as_str();
            let others_hold = core.leases.list_leases().map_or(true, |leases| {
                leases.iter().any(|l| {
                    l.kind == LeaseKind::Shard
                        && l.checkpoint != Checkpoint::ShardEnd
                        && l.lease_owner.as_deref().is_some_and(|owner| owner != me)
                })
            });
            let others_live = core
                .workers
                .as_ref()
                .is_some_and(|directory| directory.live_workers().iter().any(|w| w != me));
            !others_hold && !others_live
        };
        self.core.source.release(&SourceRelease::new(mode, &last_reader));
    }

    /// Sets the current rate limit in records/s (`None`: back to the configured `max_rate`).
    /// Non-positive or non-finite values are ignored; values above `max_rate` are capped.
    pub fn set_max_rate(&self, records_per_second: Option<f64>) {
        self.core.rate.set_max_rate(records_per_second);
    }

    /// The rate limiter (shared: its rate can be read and set through this handle too).
    pub fn rate_limiter(&self) -> Arc<RateLimiter> {
        self.core.rate.clone()
    }

    /// The worker id used as lease owner.
    pub fn worker_id(&self) -> &str {
        &self.core.worker_id
    }

    /// A snapshot of the receiver's state; see [`ReceiverStatus::caught_up`].
    pub fn status(&self) -> ReceiverStatus {
        self.core.status()
    }

    /// A snapshot of the receiver's counters.
    pub fn metrics(&self) -> ReceiverMetrics {
        let mut metrics = self.core.metrics.snapshot();
        metrics.rate_limit = self.core.rate.current_rate();
        metrics.rate_limit_throttles = self.core.rate.throttles();
        self.core.progress.fill_metrics(&mut metrics);
        metrics
    }

    /// Waits (real time, at most `timeout`) until `predicate` holds for the status; returns
    /// whether it did. For the engine's drain checks and for tests.
    pub fn wait_for(&self, timeout: Duration, mut predicate: impl FnMut(&ReceiverStatus) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if predicate(&self.status()) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            let status = self.core.status.lock().expect("status lock");
            let _ = self
                .core
                .status_changed
                .wait_timeout(status, (deadline - now).min(MAX_REAL_WAIT))
                .expect("status lock");
        }
    }
}

impl Drop for Receiver {
    /// A safety net: a receiver dropped while running is stopped without draining (its unstored
    /// records are read again next time) and its threads are joined.
    fn drop(&mut self) {
        let running = self.supervisor.get_mut().ok().is_some_and(|s| s.is_some());
        if running {
            let _ = self.stop(StopMode::Immediate);
        }
    }
}

/// The supervisor thread: runs incarnations until stopped or a non-retryable failure.
fn supervise(core: &Arc<Core>) {
    loop {
        core.set_state(ReceiverState::Running);
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| coordinator::run_incarnation(core)));
        let result = match result {
            Ok(result) => result,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| (*s).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "panic".to_owned());
                Err(ReceiverError::Spawn {
                    message: format!("a receiver thread panicked: {message}"),
                })
            }
        };
        match result {
            Ok(()) => break,
            Err(e) if core.stop.is_stopped() => {
                tracing::warn!(stream = %core.stream, error = %e, "receiver stopped with an error");
                core.record_error(&e);
                *core.stop_error.lock().expect("stop error slot") = Some(e);
                break;
            }
            Err(e) if e.is_retryable() => {
                tracing::warn!(stream = %core.stream, error = %e, "receiver failed; restarting after the restart delay");
                core.record_error(&e);
                core.set_state(ReceiverState::Restarting);
                MetricsCells::bump(&core.metrics.restarts);
                let deadline = core.clock.now_ms().saturating_add(core.config.restart_delay_ms as i64);
                loop {
                    match core.stop.wait_until(&*core.clock, deadline) {
                        Wake::Stopped | Wake::Deadline => break,
                        Wake::Nudged => {}
                    }
                }
                if core.stop.is_stopped() {
                    break;
                }
            }
            Err(e) => {
                tracing::error!(stream = %core.stream, error = %e, "receiver failed for good");
                core.record_failure(e);
                break;
            }
        }
    }
    core.set_state(ReceiverState::Stopped);
}
