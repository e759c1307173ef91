//! The runtime: one started context — its metadata logs (its own and those it adopted), block
//! ingest, the [`JobGenerator`](job_generator::JobGenerator) thread, membership, state
//! snapshots and metrics. It executes a frozen [`Plan`] and never holds a lock while a user
//! callback (an output, a listener) runs.

pub(crate) mod checkpoint_store;
pub(crate) mod ingest;
pub(crate) mod ingest_gate;
pub(crate) mod job_generator;
pub(crate) mod membership;
pub(crate) mod metadata_log;
pub(crate) mod metrics;
pub(crate) mod rate_estimator;
pub(crate) mod snapshots;
pub(crate) mod status;
pub(crate) mod tracker;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use sluice_blockstore::SharedClock;
use sluice_receiver::{StopMode, WorkerDirectory, WorkerRegistry};

use checkpoint_store::CheckpointStore;
use ingest::{EngineBlocks, InputSpec, InputWiring, RunningInput};
use membership::{Adoption, Membership, Phase, Timing, owns_shard_leases, worker_dir};
use metadata_log::MetadataLog;
use metrics::{Listeners, Metrics};
use tracker::{ReceivedBlockTracker, RecoveredState};

use crate::config::StreamingConfig;
use crate::exec::{BatchEnv, BatchHistory, BlockReads, InstanceId, OWN_INSTANCE, StageRunner, TrackedBlock};
use crate::plan::Plan;
use crate::{Error, Result};

/// One metadata log and what its batches need: this worker's own log, or the log of a dead
/// worker this worker adopted (see [`membership`]).
pub(crate) struct LogRuntime {
    /// Keys the log's stage caches and operator state.
    pub instance: InstanceId,
    /// The worker the log belongs to: its output carries this name.
    pub writer: Arc<str>,
    pub tracker: Arc<ReceivedBlockTracker>,
    /// The worker's directory on the checkpoint location (its log and state snapshots).
    pub checkpoint: CheckpointStore,
}

/// A started context's engine, shared by the job generator thread, the membership thread and the
/// context.
pub(crate) struct Runtime {
    config: Arc<StreamingConfig>,
    pub(crate) clock: SharedClock,
    interval_ms: i64,
    /// This worker's own log.
    own: Arc<LogRuntime>,
    /// The root of the checkpoint location (every worker's directory is under it).
    pub(crate) root: CheckpointStore,
    registry: Option<Arc<WorkerRegistry>>,
    blocks: Arc<EngineBlocks>,
    runner: Arc<StageRunner>,
    plan: Arc<Plan>,
    listeners: Arc<Listeners>,
    pub(crate) inputs: Vec<Box<dyn RunningInput>>,
    metrics: Arc<Metrics>,
    adoptions: Mutex<Vec<Arc<Adoption>>>,
    next_instance: AtomicU32,
    stop_requested: AtomicBool,
    drain_requested: AtomicBool,
    status: Mutex<Status>,
    status_changed: Condvar,
    last_processed: AtomicU64,
    /// When the runtime started (engine clock, ms).
    started_ms: i64,
}

#[derive(Debug, Default)]
struct Status {
    stopped: bool,
    /// What stopped the stream, kept whole (`Error::DataLost`, `Error::Job`, …).
    error: Option<Arc<Error>>,
    last_processed_ms: Option<i64>,
}

/// A started runtime and its threads, as the context holds it until `stop`.
pub(crate) struct Started {
    pub runtime: Arc<Runtime>,
    generator: Option<JoinHandle<()>>,
    membership: Option<Membership>,
}

impl Runtime {
    /// Recovers this worker's log, opens the block store, starts the inputs, the job generator
    /// and (with shared leases) membership.
    ///
    /// # Errors
    /// Configuration, checkpoint, block store or receiver start-up errors.
    pub(crate) fn start(
        config: Arc<StreamingConfig>,
        clock: SharedClock,
        plan: Arc<Plan>,
        listeners: Arc<Listeners>,
        specs: &[InputSpec],
        metrics: Arc<Metrics>,
    ) -> Result<Started> {
        let interval_ms = config.interval_ms();
        let root = match &config.checkpoint {
            Some(location) => checkpoint_store::open(location)?,
            None => CheckpointStore::local(config.data_dir.join("checkpoint"))?,
        };
        let worker_id = resolve_worker_id(&config, specs)?;
        let run_id = new_run_id(&worker_id, clock.now_ms());
        // Join the application's workers before claiming the log: a worker takes its own worker
        // lease back from whoever holds it (an adopter stops when its renewal fails).
        let registry = match specs.first() {
            Some(first) => Some(Arc::new(WorkerRegistry::join(
                first.leases.clone(),
                &worker_id,
                first.config.lease_failover_ms,
                clock.clone(),
            )?)),
            None => None,
        };
        let started_ms = clock.now_ms();
        let (own, recovered) = recover_own_log(&root, &worker_id, run_id, &plan)?;
        if !recovered.pending_batches.is_empty() || recovered.unallocated_blocks > 0 {
            metrics.recovery_started(
                metrics::RecoveryKind::Restart,
                started_ms,
                recovered.pending_batches.clone(),
                recovered.unallocated_blocks as u64,
            );
        }
        let blocks = Arc::new(EngineBlocks::open(
            &config,
            clock.clone(),
            own.tracker.clone(),
            metrics.clone(),
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
        let inputs = specs
            .iter()
            .map(|spec| spec.start(&wiring))
            .collect::<Result<Vec<_>>>()?;
        let timing = specs.first().map(|first| Timing {
            failover_ms: first.config.lease_failover_ms,
            scan_interval_ms: first.config.lease_taker_interval_ms,
        });
        let runtime = Arc::new(Runtime {
            config,
            clock,
            interval_ms,
            own,
            root,
            registry: registry.clone(),
            blocks,
            runner,
            plan,
            listeners,
            inputs,
            metrics,
            adoptions: Mutex::new(Vec::new()),
            next_instance: AtomicU32::new(OWN_INSTANCE + 1),
            stop_requested: AtomicBool::new(false),
            drain_requested: AtomicBool::new(false),
            status: Mutex::new(Status::default()),
            status_changed: Condvar::new(),
            last_processed: AtomicU64::new(0),
            started_ms,
        });
        let generator = job_generator::JobGenerator::spawn(
            runtime.clone(),
            recovered.pending_batches,
            recovered.unallocated_blocks > 0,
        )?;
        let membership = match (registry, timing) {
            (Some(registry), Some(timing)) => Some(Membership::start(runtime.clone(), registry, timing)?),
            _ => None,
        };
        Ok(Started {
            runtime,
            generator: Some(generator),
            membership,
        })
    }

    /// The block store (for operations and tests).
    pub(crate) fn block_store(&self) -> &Arc<sluice_blockstore::BlockStore> {
        self.blocks.store()
    }

    /// Blocks until the runtime stops; the error that stopped it, if any.
    pub(crate) fn await_termination(&self) -> Option<Arc<Error>> {
        let mut status = self.status.lock().expect("status");
        while !status.stopped {
            status = self.status_changed.wait(status).expect("status");
        }
        status.error.clone()
    }

    /// See [`StreamingContext::await_drained`](crate::StreamingContext::await_drained).
    pub(crate) fn await_drained(&self, timeout: Duration) -> Result<bool> {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            {
                let status = self.status.lock().expect("status");
                if let Some(e) = &status.error {
                    return Err(Error::Stopped(e.clone()));
                }
                if status.stopped {
                    return Ok(true);
                }
            }
            // Read receiver state first: blocks they stored before reporting caught up are then
            // visible to the tracker check that follows.
            let caught_up = self.inputs.iter().all(|i| i.caught_up());
            let processed_one = self.status.lock().expect("status").last_processed_ms.is_some();
            if caught_up
                && processed_one
                && !self.own.tracker.has_unallocated_blocks()
                && self.all_allocated_processed()
                && self.adoptions().is_empty()
            {
                return Ok(true);
            }
            if std::time::Instant::now() >= deadline {
                return Ok(false);
            }
            let status = self.status.lock().expect("status");
            let _unused = self
                .status_changed
                .wait_timeout(status, Duration::from_millis(20))
                .expect("status");
        }
    }

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
            block_reads: Arc::new(BlockReads::new(&inputs, &self.plan.input_reads)),
            inputs: Arc::new(inputs),
            blocks: self.blocks.clone(),
            history: Arc::new(History {
                runtime: Arc::downgrade(self),
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

    fn finish(&self, error: Option<Error>) {
        // No batch will free the ingest gate any more: receivers waiting on it must not hang.
        self.blocks.close_gate();
        let mut status = self.status.lock().expect("status");
        status.stopped = true;
        if status.error.is_none() {
            status.error = error.map(Arc::new);
        }
        drop(status);
        self.status_changed.notify_all();
    }

    fn fail(&self, e: Error) {
        tracing::error!(error = %e, "stopping the stream");
        self.finish(Some(e));
    }

    /// This worker was presumed dead and adopted: it must stop (its log is claimed).
    pub(crate) fn fenced_off(&self, why: &str) {
        self.fail(Error::Fenced {
            location: format!("{}/metadata", self.own.checkpoint.location()),
            by: format!("another worker: {why}"),
        });
    }

    /// Whether the graph keeps operator state (empty batches are then logged).
    pub(crate) fn stateful(&self) -> bool {
        !self.plan.stateful.is_empty()
    }

    pub(crate) fn new_instance(&self) -> InstanceId {
        self.next_instance.fetch_add(1, Ordering::SeqCst)
    }

    /// Restores the operator state of an adopted log as of its last completed batch.
    pub(crate) fn restore_state(&self, log: &LogRuntime, last_completed: Option<i64>) -> Result<()> {
        snapshots::restore_all(&log.checkpoint, log.instance, last_completed, &self.plan.stateful)
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
        for op in &self.plan.outputs {
            op.forget(adoption.log.instance, i64::MAX);
        }
        for op in &self.plan.stateful {
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
}

impl Started {
    /// Stops the runtime: a graceful stop stops the receivers, processes every logged block and
    /// releases leases within `timeout`; an immediate one finishes only the batch in progress.
    /// Past the timeout the batch in progress is abandoned between records.
    ///
    /// # Errors
    /// [`Error::StopTimeout`]; receiver stop errors; the error that had stopped the stream.
    pub(crate) fn stop(mut self, mode: StopMode, timeout: Duration) -> Result<()> {
        let graceful = mode == StopMode::Graceful;
        let runtime = self.runtime.clone();
        let mut first_error = None;
        if !graceful {
            // No more batches will run to free the ingest gate for them.
            runtime.blocks.close_gate();
        }
        for input in &runtime.inputs {
            if let Err(e) = input.stop(mode) {
                first_error.get_or_insert(e);
            }
        }
        if graceful {
            runtime.drain_requested.store(true, Ordering::SeqCst);
        } else {
            runtime.stop_requested.store(true, Ordering::SeqCst);
        }
        runtime.status_changed.notify_all();
        let deadline = std::time::Instant::now() + timeout;
        let mut timed_out = false;
        {
            let mut status = runtime.status.lock().expect("status");
            while !status.stopped {
                let now = std::time::Instant::now();
                if now >= deadline {
                    timed_out = true;
                    runtime.stop_requested.store(true, Ordering::SeqCst);
                    // Abandon the batch in progress between records (it is logged: it re-runs
                    // after a restart) instead of joining it past the timeout.
                    runtime.runner.cancelled.store(true, Ordering::SeqCst);
                    break;
                }
                status = runtime
                    .status_changed
                    .wait_timeout(status, deadline - now)
                    .expect("status")
                    .0;
            }
        }
        if let Some(handle) = self.generator.take() {
            let _joined = handle.join();
        }
        if let Some(mut membership) = self.membership.take() {
            membership.stop();
        }
        if graceful && !timed_out && first_error.is_none() {
            runtime.release_worker_lease_if_done();
        }
        if timed_out {
            return Err(Error::StopTimeout { timeout });
        }
        if let Some(e) = first_error {
            return Err(e);
        }
        let status = runtime.status.lock().expect("status");
        match &status.error {
            Some(e) => Err(Error::Stopped(e.clone())),
            None => Ok(()),
        }
    }
}

/// Makes batch environments for any batch a log's tracker still knows.
struct History {
    runtime: std::sync::Weak<Runtime>,
    log: Arc<LogRuntime>,
}

impl BatchHistory for History {
    fn env_for(&self, time_ms: i64) -> Option<BatchEnv> {
        let runtime = self.runtime.upgrade()?;
        let blocks = self.log.tracker.blocks_of_batch(time_ms);
        Some(runtime.env(&self.log, time_ms, blocks))
    }
}

/// Claims this worker's log (fencing any earlier process of it), recovers it and restores the
/// operator state of its last completed batch.
fn recover_own_log(
    root: &CheckpointStore,
    worker_id: &str,
    run_id: u64,
    plan: &Plan,
) -> Result<(Arc<LogRuntime>, RecoveredState)> {
    let own_dir = worker_dir(root, worker_id);
    let holder = format!("{worker_id} (pid {}, run {run_id:x})", std::process::id());
    let (tracker, recovered) = ReceivedBlockTracker::recover(MetadataLog::claim(&own_dir, &holder)?)?;
    // An empty batch is logged only when operator state moves with it (see the tracker).
    let tracker = Arc::new(tracker.with_empty_batches_logged(!plan.stateful.is_empty()));
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
    snapshots::restore_all(&own.checkpoint, OWN_INSTANCE, recovered.last_completed, &plan.stateful)?;
    Ok((own, recovered))
}

fn new_runner(config: &StreamingConfig) -> Result<StageRunner> {
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
fn resolve_worker_id(config: &StreamingConfig, inputs: &[InputSpec]) -> Result<String> {
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
    crate::config::validate_worker_id(&id)?;
    Ok(id)
}

/// A block-id run id unique across the workers sharing a replica location: the time, the
/// process, the worker id and per-process randomness hashed together.
fn new_run_id(worker_id: &str, now_ms: i64) -> u64 {
    use std::hash::BuildHasher;
    std::collections::hash_map::RandomState::new().hash_one((worker_id, now_ms, std::process::id()))
}
