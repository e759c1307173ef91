//! Membership: this worker among the workers of its application, and the adoption of the logs
//! of workers that died.
//!
//! # Why
//!
//! A worker checkpoints a shard once the blocks covering it are in the worker's *own* metadata
//! log (durability order step 3), and processes those blocks in its own batches later. If the
//! worker dies for good — its machine is gone, another instance replaces it — the records in
//! blocks it logged but had not processed are behind the checkpoint, so nobody would read them
//! again. Someone must process that log: its **adopter**.
//!
//! # Protocol (see `docs/ARCHITECTURE.md`, "Several workers")
//!
//! Every worker holds a worker lease ([`WorkerRegistry`], in the lease table of the first input)
//! and renews it with its shard leases. This thread renews it, and every taker interval scans the
//! worker leases. A worker lease whose counter stood still for the failover time belongs to a
//! dead worker; the first live worker to take it (a conditional write) adopts that worker:
//!
//! 1. it **claims** the dead worker's log (`<checkpoint>/workers/<id>/metadata`): from then on
//!    the dead worker — should it be a paused zombie — can log no block and allocate no batch;
//! 2. it reads the log: the batches allocated but not completed, the blocks not yet allocated,
//!    and for every shard the last logged position;
//! 3. its receivers take the dead worker's shard leases with the checkpoint raised to that
//!    position in the same write (`LeaseStore::adopt_lease`), so they read on right after what
//!    the log holds — nothing twice, nothing skipped;
//! 4. its job generator runs the log's pending batches with exactly their blocks, and then one
//!    batch with the unallocated blocks, **as the dead worker**: with its operator state
//!    (restored from its snapshots) and writing under its name, so a batch its zombie may still
//!    be writing gets the same rows under the same file names;
//! 5. when all is processed and every shard lease is taken, it releases the worker lease: an
//!    unowned worker lease means "nothing left in this log".
//!
//! If the adopter dies in turn, its own worker lease and the one it adopts both expire, and
//! another worker adopts both. If the dead worker comes back under the same id, it takes its
//! worker lease back (the adopter's next renewal fails and it gives the adoption up) and claims
//! its log, recovering whatever the adopter had not finished.

use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use sluice_blockstore::Position;
use sluice_receiver::{Checkpoint, LeaseKind, WorkerRegistry};

use super::checkpoint_store::CheckpointStore;
use super::metadata_log::MetadataLog;
use super::tracker::ReceivedBlockTracker;
use super::{LogRuntime, Runtime};
use crate::{Error, Result};

/// Where a worker's metadata log and operator state live under the checkpoint location.
pub(crate) fn worker_dir(root: &CheckpointStore, worker_id: &str) -> CheckpointStore {
    root.child("workers").child(worker_id)
}

/// How far an adoption has got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Phase {
    /// Waiting for the job generator.
    Queued,
    /// The job generator runs its batches.
    Running,
    /// Every batch of the log ran.
    Done,
    /// Given up: the worker lease passed to another process (or the log was claimed again).
    Abandoned,
}

/// Per stream, per shard: the last position the adopted log holds.
pub(crate) type Floors = HashMap<Arc<str>, HashMap<Arc<str>, Position>>;

/// The log of a dead worker, being processed by this worker.
pub(crate) struct Adoption {
    pub worker: String,
    pub log: Arc<LogRuntime>,
    /// Where the log ends, per shard: the dead worker's shards are taken at these positions.
    pub floors: Floors,
    /// Batches allocated but not completed when the log was claimed, oldest first.
    pub pending: Vec<i64>,
    pub phase: Mutex<Phase>,
    /// Set when the worker lease was lost: the job generator stops between batches.
    pub abandon: AtomicBool,
}

impl Adoption {
    pub(crate) fn phase(&self) -> Phase {
        *self.phase.lock().expect("adoption phase")
    }

    pub(crate) fn set_phase(&self, phase: Phase) {
        *self.phase.lock().expect("adoption phase") = phase;
    }
}

/// A stop flag the membership thread waits on.
#[derive(Default)]
struct StopFlag {
    stopped: Mutex<bool>,
    changed: Condvar,
}

impl StopFlag {
    fn stop(&self) {
        *self.stopped.lock().expect("stop flag") = true;
        self.changed.notify_all();
    }

    /// Waits up to `timeout` of real time; returns whether stopped.
    fn wait(&self, timeout: Duration) -> bool {
        let stopped = self.stopped.lock().expect("stop flag");
        if *stopped {
            return true;
        }
        *self.changed.wait_timeout(stopped, timeout).expect("stop flag").0
    }
}

/// The membership thread: see the [module docs](self). Owned by the running context, which
/// stops and joins it.
pub(crate) struct Membership {
    stop: Arc<StopFlag>,
    thread: Option<JoinHandle<()>>,
}

/// Lease timings of the membership thread (those of the first input's receiver).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    pub failover_ms: u64,
    pub scan_interval_ms: u64,
}

impl Membership {
    /// Starts the thread.
    ///
    /// # Errors
    /// [`Error::Internal`] if the thread cannot be spawned.
    pub(crate) fn start(shared: Arc<Runtime>, registry: Arc<WorkerRegistry>, timing: Timing) -> Result<Self> {
        let stop = Arc::new(StopFlag::default());
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("sluice-membership".into())
            .spawn(move || run(&shared, &registry, &thread_stop, timing))
            .map_err(|e| Error::Internal(format!("cannot start the membership thread: {e}")))?;
        Ok(Self {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops and joins the thread.
    pub(crate) fn stop(&mut self) {
        self.stop.stop();
        if let Some(thread) = self.thread.take() {
            let _joined = thread.join();
        }
    }
}

impl Drop for Membership {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Real-time granularity of the thread's schedule (it follows the injected clock).
const POLL: Duration = Duration::from_millis(20);

fn run(shared: &Arc<Runtime>, registry: &Arc<WorkerRegistry>, stop: &StopFlag, timing: Timing) {
    let renew_every = i64::try_from((timing.failover_ms / 3).max(1)).unwrap_or(i64::MAX);
    let scan_every = i64::try_from(timing.scan_interval_ms.max(1)).unwrap_or(i64::MAX);
    let mut next_renew = shared.clock.now_ms().saturating_add(renew_every);
    let mut next_scan = i64::MIN;
    // Workers whose lease this worker holds but whose log it could not start processing yet.
    let mut to_adopt: Vec<String> = Vec::new();
    loop {
        let now = shared.clock.now_ms();
        if now >= next_renew {
            next_renew = now.saturating_add(renew_every);
            match registry.renew() {
                Ok(lost) => {
                    for worker in lost {
                        if worker == registry.worker_id() {
                            shared.fenced_off(&format!(
                                "its worker lease was taken by another worker (it was presumed dead after \
                                 {} ms without renewal)",
                                timing.failover_ms
                            ));
                        } else {
                            tracing::warn!(%worker, "lost the worker lease of an adopted worker; giving the adoption up");
                            to_adopt.retain(|w| *w != worker);
                            shared.abandon_adoption(&worker);
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not renew the worker leases; retrying"),
            }
        }
        if now >= next_scan {
            next_scan = now.saturating_add(scan_every);
            match registry.scan() {
                Ok(scan) => {
                    for lease in scan.expired {
                        match registry.take(&lease) {
                            Ok(true) => {
                                let worker = lease
                                    .lease_key
                                    .strip_prefix(sluice_receiver::WORKER_LEASE_PREFIX)
                                    .unwrap_or(&lease.lease_key)
                                    .to_owned();
                                tracing::warn!(%worker, "a worker stopped renewing its lease; adopting its log");
                                to_adopt.push(worker);
                            }
                            Ok(false) => {}
                            Err(e) => tracing::warn!(error = %e, "could not take an expired worker lease"),
                        }
                    }
                }
                Err(e) => tracing::warn!(error = %e, "could not scan the worker leases; retrying"),
            }
        }
        to_adopt.retain(|worker| match adopt(shared, registry, worker) {
            Ok(()) => false,
            Err(e) => {
                tracing::warn!(%worker, error = %e, "could not adopt the log of a dead worker; retrying");
                registry.holds(worker)
            }
        });
        for worker in settle(shared, registry) {
            if !to_adopt.contains(&worker) {
                to_adopt.push(worker);
            }
        }
        if stop.wait(POLL) {
            return;
        }
    }
}

/// Steps 1–3 of the protocol, then queues the log's batches for the job generator (step 4).
fn adopt(shared: &Arc<Runtime>, registry: &WorkerRegistry, worker: &str) -> Result<()> {
    let dir = worker_dir(&shared.root, worker);
    let holder = format!(
        "{} adopting {worker} (pid {})",
        registry.worker_id(),
        std::process::id()
    );
    let log = MetadataLog::claim(&dir, &holder)?;
    let (tracker, recovered) = ReceivedBlockTracker::recover(log)?;
    let tracker = Arc::new(tracker.with_empty_batches_logged(shared.stateful()));
    let mut floors: Floors = HashMap::new();
    for (stream, shard, position) in recovered.resume_after {
        floors.entry(stream).or_default().insert(shard, position);
    }
    take_shards_of(shared, worker, &floors);
    let log = Arc::new(LogRuntime {
        instance: shared.new_instance(),
        writer: Arc::from(worker),
        tracker,
        checkpoint: dir,
    });
    shared.restore_state(&log, recovered.last_completed)?;
    tracing::info!(
        %worker,
        pending = ?recovered.pending_batches,
        unallocated = recovered.unallocated_blocks,
        "adopted the log of a dead worker"
    );
    shared.queue_adoption(Adoption {
        worker: worker.to_owned(),
        log,
        floors,
        pending: recovered.pending_batches,
        phase: Mutex::new(Phase::Queued),
        abandon: AtomicBool::new(false),
    });
    Ok(())
}

/// Step 5: finishes adoptions whose batches all ran and whose shard leases are all taken.
/// Returns the workers of abandoned adoptions whose lease this worker still holds (to adopt
/// again: their log was claimed by someone who then lost it).
fn settle(shared: &Arc<Runtime>, registry: &WorkerRegistry) -> Vec<String> {
    let mut again = Vec::new();
    for adoption in shared.adoptions() {
        match adoption.phase() {
            Phase::Done => {
                if shared.inputs.iter().any(|i| i.is_adopting(&adoption.worker)) {
                    continue;
                }
                // A zombie of the dead worker may have taken more shards after the claim (it
                // logged nothing for them): take those too before letting the worker lease go,
                // or nobody would ever take them.
                if owns_shard_leases(shared, &adoption.worker) {
                    take_shards_of(shared, &adoption.worker, &adoption.floors);
                    continue;
                }
                match registry.release(&adoption.worker) {
                    Ok(()) => tracing::info!(worker = %adoption.worker, "finished the log of a dead worker"),
                    Err(e) => {
                        tracing::warn!(worker = %adoption.worker, error = %e, "could not release an adopted worker lease");
                    }
                }
                shared.drop_adoption(&adoption);
            }
            Phase::Abandoned => {
                for input in &shared.inputs {
                    input.cancel_adoption(&adoption.worker);
                }
                shared.drop_adoption(&adoption);
                if registry.holds(&adoption.worker) {
                    again.push(adoption.worker.clone());
                }
            }
            Phase::Queued | Phase::Running => {}
        }
    }
    again
}

/// Asks every input to take the shard leases `worker` owns, at the positions its log ends.
fn take_shards_of(shared: &Runtime, worker: &str, floors: &Floors) {
    for input in &shared.inputs {
        input.adopt(worker, floors.get(input.stream()).cloned().unwrap_or_default());
    }
}

/// Whether any input's lease table still has an unfinished shard lease owned by `worker` (or
/// cannot be read).
pub(crate) fn owns_shard_leases(shared: &Runtime, worker: &str) -> bool {
    shared.inputs.iter().any(|input| {
        input.leases().list_leases().map_or(true, |leases| {
            leases.iter().any(|l| {
                l.kind == LeaseKind::Shard
                    && l.lease_owner.as_deref() == Some(worker)
                    && l.checkpoint != Checkpoint::ShardEnd
            })
        })
    })
}
