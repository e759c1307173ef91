//! Worker leases: which workers of an application are alive, and who answers for a dead
//! worker's metadata log.
//!
//! Besides its shard leases, every worker holds a **worker lease** in the application's lease
//! table (key [`worker_lease_key`], [`LeaseKind::Worker`]) and renews it like the others. The
//! lease stands for the worker's metadata log — the blocks it logged and the batches it
//! allocated, which nobody else processes:
//!
//! | worker lease | meaning | what other workers do |
//! |---|---|---|
//! | owned, renewed | the worker (or its adopter) is alive | never take its shard leases by expiry; count it when balancing |
//! | owned, counter still for the failover time | the holder died | one takes it ([`WorkerRegistry::take`]) and adopts the log |
//! | unowned | the log has no work left (graceful stop, or adoption finished) | nothing |
//!
//! The adopter — whoever won the conditional take — claims the dead worker's log (fencing it),
//! takes the dead worker's shard leases at the positions its log ends
//! ([`LeaseStore::adopt_lease`]), processes what the log holds, then releases the worker lease.
//! A worker that starts takes its **own** worker lease whoever holds it (a previous process of
//! it, or an adopter, which stops adopting when its next renewal fails): the worker then recovers
//! its log itself.
//!
//! Expiry is measured like the KCL does for shard leases: a lease whose counter has not moved
//! for the failover time, on this worker's clock — so clocks of different machines need not
//! agree.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::sync::{Arc, Mutex};

use sluice_blockstore::SharedClock;

use super::{Lease, LeaseError, LeaseKind, LeaseStore};

/// Key prefix of worker leases in the lease table.
pub const WORKER_LEASE_PREFIX: &str = "sluice-worker:";

/// The lease key of worker `worker_id`: `sluice-worker:<worker id>`.
pub fn worker_lease_key(worker_id: &str) -> String {
    format!("{WORKER_LEASE_PREFIX}{worker_id}")
}

/// Attempts to take one's own worker lease while its holder keeps renewing it.
const JOIN_ATTEMPTS: usize = 16;

/// What the worker lease of a shard lease's owner says about that owner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerStatus {
    /// No worker lease: not an engine worker (a KCL worker, a bare receiver).
    Unregistered,
    /// Its worker lease is held — by the worker, or by the worker adopting its log.
    Active,
    /// Its worker lease is unowned: its log holds nothing unprocessed (it stopped gracefully, or
    /// its adoption finished), so a shard lease still in its name was taken by it after that
    /// and carries nothing beyond its checkpoint.
    Retired,
}

/// What a receiver needs to know about the other workers of its application. The engine
/// implements it with a [`WorkerRegistry`]; a receiver without one behaves like a KCL worker
/// (expired leases are taken, busy workers are stolen from).
///
/// # Contract
/// A receiver given a directory never takes a shard lease owned by an [`Active`] worker — such a
/// lease moves only when its owner releases it (after a checkpoint at exactly the last position
/// it logged) or when the owner's adopter takes it — and balances by releasing what it holds
/// above its share instead of stealing. A shard lease of a [`Retired`] worker is taken once
/// expired, like an unregistered owner's.
///
/// [`Active`]: WorkerStatus::Active
/// [`Retired`]: WorkerStatus::Retired
pub trait WorkerDirectory: Send + Sync + fmt::Debug {
    /// Workers whose worker lease is held and renewed, this one included, sorted.
    fn live_workers(&self) -> Vec<String>;
    /// What `worker_id`'s worker lease says about it.
    fn worker_status(&self, worker_id: &str) -> WorkerStatus;
}

/// What a [`WorkerRegistry::scan`] found.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct WorkerScan {
    /// Workers whose lease is held and renewed (this one included), sorted.
    pub live: Vec<String>,
    /// Worker leases held by someone else whose counter has not moved for the failover time:
    /// their logs wait for an adopter.
    pub expired: Vec<Lease>,
}

#[derive(Debug)]
struct Observed {
    counter: u64,
    since_ms: i64,
}

#[derive(Debug, Default)]
struct RegistryState {
    /// Worker leases this worker holds: its own, and those of workers it adopts.
    held: BTreeMap<String, Lease>,
    observed: HashMap<String, Observed>,
    /// Every worker with a worker lease, and whether that lease is owned.
    registered: HashMap<String, bool>,
    live: Vec<String>,
}

/// This worker's view of the worker leases of its application; see the module docs of
/// `receiver/src/lease/workers.rs`.
pub struct WorkerRegistry {
    store: Arc<dyn LeaseStore>,
    me: String,
    failover_ms: i64,
    clock: SharedClock,
    state: Mutex<RegistryState>,
}

impl fmt::Debug for WorkerRegistry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("WorkerRegistry")
            .field("me", &self.me)
            .field("store", &self.store)
            .finish_non_exhaustive()
    }
}

fn worker_id_of(lease: &Lease) -> Option<&str> {
    (lease.kind == LeaseKind::Worker)
        .then(|| lease.lease_key.strip_prefix(WORKER_LEASE_PREFIX))
        .flatten()
}

impl WorkerRegistry {
    /// Registers worker `me` in `store`: creates its worker lease if absent and takes it, whoever
    /// holds it (see the module docs). Call it before claiming the worker's log.
    ///
    /// # Errors
    /// Lease store failures; [`LeaseError::ConditionFailed`] if another process kept renewing
    /// the lease through every attempt (two running processes with one worker id).
    pub fn join(
        store: Arc<dyn LeaseStore>,
        me: &str,
        failover_ms: u64,
        clock: SharedClock,
    ) -> Result<Self, LeaseError> {
        let key = worker_lease_key(me);
        store.create_lease_if_absent(&Lease::worker(me))?;
        let mut last = None;
        for _ in 0..JOIN_ATTEMPTS {
            let current = store
                .get_lease(&key)?
                .ok_or_else(|| LeaseError::NotFound { lease_key: key.clone() })?;
            match store.take_lease(&key, current.lease_counter, me) {
                Ok(taken) => {
                    let registry = Self {
                        store,
                        me: me.to_owned(),
                        failover_ms: i64::try_from(failover_ms).unwrap_or(i64::MAX),
                        clock,
                        state: Mutex::new(RegistryState::default()),
                    };
                    {
                        let mut state = registry.state.lock().expect("registry");
                        state.held.insert(me.to_owned(), taken);
                        state.registered.insert(me.to_owned(), true);
                        state.live = vec![me.to_owned()];
                    }
                    return Ok(registry);
                }
                Err(e) if e.is_lease_lost() => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.expect("at least one attempt"))
    }

    /// This worker's id.
    pub fn worker_id(&self) -> &str {
        &self.me
    }

    /// The lease store holding the worker leases.
    pub fn store(&self) -> &Arc<dyn LeaseStore> {
        &self.store
    }

    /// Whether this worker holds `worker_id`'s worker lease (its own, or one it adopts).
    pub fn holds(&self, worker_id: &str) -> bool {
        self.state.lock().expect("registry").held.contains_key(worker_id)
    }

    /// Renews every worker lease this worker holds. Returns the workers whose lease was taken by
    /// someone else: for this worker's own id that means it was declared dead and adopted (its
    /// log is claimed; it must stop); for an adopted worker, that the adoption passed to another
    /// worker (or the worker restarted) and must stop here.
    ///
    /// # Errors
    /// Transient lease store failures (the leases stay held; renew again).
    pub fn renew(&self) -> Result<Vec<String>, LeaseError> {
        let held: Vec<(String, Lease)> = self
            .state
            .lock()
            .expect("registry")
            .held
            .iter()
            .map(|(w, l)| (w.clone(), l.clone()))
            .collect();
        let mut lost = Vec::new();
        let mut first_error = None;
        for (worker, lease) in held {
            let fence = lease.fence().expect("held leases have an owner");
            match self.store.renew_lease(&lease.lease_key, &fence) {
                Ok(renewed) => {
                    self.state.lock().expect("registry").held.insert(worker, renewed);
                }
                Err(e) if e.is_lease_lost() => {
                    self.state.lock().expect("registry").held.remove(&worker);
                    lost.push(worker);
                }
                Err(e) => {
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) if lost.is_empty() => Err(e),
            _ => Ok(lost),
        }
    }

    /// Reads the worker leases: which workers are alive, which logs wait for an adopter.
    ///
    /// # Errors
    /// Lease store failures.
    pub fn scan(&self) -> Result<WorkerScan, LeaseError> {
        let now = self.clock.now_ms();
        let table = self.store.list_leases()?;
        let mut state = self.state.lock().expect("registry");
        let mut live = Vec::new();
        let mut expired = Vec::new();
        let mut registered = HashMap::new();
        for lease in table.into_iter().filter(|l| l.kind == LeaseKind::Worker) {
            let Some(worker) = worker_id_of(&lease).map(str::to_owned) else {
                continue;
            };
            registered.insert(worker.clone(), lease.lease_owner.is_some());
            let seen = state.observed.entry(lease.lease_key.clone()).or_insert(Observed {
                counter: lease.lease_counter,
                since_ms: now,
            });
            if seen.counter != lease.lease_counter {
                seen.counter = lease.lease_counter;
                seen.since_ms = now;
            }
            let unrenewed = now.saturating_sub(seen.since_ms) > self.failover_ms;
            let Some(owner) = lease.lease_owner.as_deref() else {
                continue;
            };
            if owner == self.me && state.held.contains_key(&worker) {
                // Ours: alive as long as we renew it (counted once, below, for our own id).
                if worker == self.me {
                    live.push(worker);
                }
                continue;
            }
            if unrenewed {
                expired.push(lease);
            } else if owner == worker {
                live.push(worker);
            }
        }
        live.sort();
        live.dedup();
        state.live.clone_from(&live);
        state.registered = registered;
        state.registered.insert(self.me.clone(), true);
        Ok(WorkerScan { live, expired })
    }

    /// Takes `lease` — an expired worker lease from the last [`scan`](Self::scan) — for this
    /// worker, which thereby becomes the adopter of that worker's log. `Ok(false)` if someone
    /// else was first (its counter moved).
    ///
    /// # Errors
    /// Lease store failures.
    pub fn take(&self, lease: &Lease) -> Result<bool, LeaseError> {
        let Some(worker) = worker_id_of(lease) else {
            return Ok(false);
        };
        match self.store.take_lease(&lease.lease_key, lease.lease_counter, &self.me) {
            Ok(taken) => {
                self.state
                    .lock()
                    .expect("registry")
                    .held
                    .insert(worker.to_owned(), taken);
                Ok(true)
            }
            Err(e) if e.is_lease_lost() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Releases the held worker lease of `worker_id`: its log has no work left (a graceful stop,
    /// or a finished adoption). A released lease is never adopted.
    ///
    /// # Errors
    /// Lease store failures; [`LeaseError::ConditionFailed`] if the lease was lost meanwhile.
    pub fn release(&self, worker_id: &str) -> Result<(), LeaseError> {
        let Some(lease) = self.state.lock().expect("registry").held.remove(worker_id) else {
            return Ok(());
        };
        let fence = lease.fence().expect("held leases have an owner");
        self.store.release_lease(&lease.lease_key, &fence).map(|_| ())
    }

    /// Forgets a held worker lease without writing (an adoption given up).
    pub fn forget(&self, worker_id: &str) {
        self.state.lock().expect("registry").held.remove(worker_id);
    }
}

impl WorkerDirectory for WorkerRegistry {
    fn live_workers(&self) -> Vec<String> {
        let live = self.state.lock().expect("registry").live.clone();
        if live.is_empty() { vec![self.me.clone()] } else { live }
    }

    fn worker_status(&self, worker_id: &str) -> WorkerStatus {
        if worker_id == self.me {
            return WorkerStatus::Active;
        }
        match self.state.lock().expect("registry").registered.get(worker_id) {
            None => WorkerStatus::Unregistered,
            Some(true) => WorkerStatus::Active,
            Some(false) => WorkerStatus::Retired,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sluice_blockstore::{Clock, ManualClock};

    use super::*;
    use crate::LocalLeaseStore;

    fn store() -> (tempfile::TempDir, Arc<dyn LeaseStore>) {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(LocalLeaseStore::open(dir.path().join("leases.json")).unwrap());
        (dir, store)
    }

    #[test]
    fn a_dead_worker_expires_and_one_taker_wins() {
        let (_dir, store) = store();
        let clock = Arc::new(ManualClock::new(0));
        let a = WorkerRegistry::join(store.clone(), "a", 1_000, clock.clone()).unwrap();
        let b = WorkerRegistry::join(store.clone(), "b", 1_000, clock.clone()).unwrap();
        let c = WorkerRegistry::join(store.clone(), "c", 1_000, clock.clone()).unwrap();
        assert_eq!(b.scan().unwrap().live, ["a", "b", "c"]);
        assert_eq!(c.scan().unwrap().live, ["a", "b", "c"]);
        assert_eq!(b.worker_status("a"), WorkerStatus::Active);
        assert_eq!(b.worker_status("zz"), WorkerStatus::Unregistered);
        // a stops renewing; b and c keep renewing.
        clock.advance_ms(600);
        b.renew().unwrap();
        c.renew().unwrap();
        clock.advance_ms(600);
        let scan_b = b.scan().unwrap();
        let scan_c = c.scan().unwrap();
        assert_eq!(scan_b.live, ["b", "c"]);
        assert_eq!(scan_b.expired.len(), 1);
        assert_eq!(b.live_workers(), ["b", "c"]);
        // Two takers: exactly one wins.
        let won_b = b.take(&scan_b.expired[0]).unwrap();
        let won_c = c.take(&scan_c.expired[0]).unwrap();
        assert!(won_b ^ won_c, "one taker, not {won_b} and {won_c}");
        assert!(b.holds("a"));
        // a comes back: joining takes its own lease back from the adopter, whose renewal then
        // reports the loss.
        let a_again = WorkerRegistry::join(store.clone(), "a", 1_000, clock.clone()).unwrap();
        assert_eq!(b.renew().unwrap(), ["a"]);
        assert!(!b.holds("a"));
        // The old process of a is fenced: its renewal reports its own lease lost.
        assert_eq!(a.renew().unwrap(), ["a"]);
        a_again.release("a").unwrap();
        assert!(
            b.scan().unwrap().expired.is_empty(),
            "a released lease is never adopted"
        );
        assert_eq!(clock.now_ms(), 1_200);
    }
}
