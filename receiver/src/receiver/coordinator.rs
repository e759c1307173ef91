//! One incarnation of a receiver: the coordinator thread that manages leases, shard loops and
//! checkpoints, and its orderly shutdown.
//!
//! Lease handling follows the KCL (see `shared/reference/kcl.md` §2–4), with its known problems
//! fixed: leases are released on stop instead of left to expire; a lease owned by this worker id
//! that this incarnation does not hold (a crash of the previous process) is taken at once on the
//! first pass; expiry is measured on this worker's clock as "counter unchanged for
//! `lease_failover_ms`"; checkpoints are fenced on owner and counter and only ever cover stored
//! records; children start only when every parent lease is at `SHARD_END` (or has no lease).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;

use sluice_blockstore::Position;

use super::metrics::MetricsCells;
use super::shard_loop::{self, LoopOutcome};
use super::{Core, ReceiverError};
use crate::block_generator::{BlockGenerator, StopMode};
use crate::lease::{Checkpoint, Lease, LeaseError, LeaseKind, WorkerStatus};
use crate::signal::StopSignal;
use crate::source::{ShardInfo, StartingPosition};

/// The coordinator's period when nothing nudges it (ms of clock time).
const TICK_MS: u64 = 50;

struct LoopHandle {
    signal: Arc<StopSignal>,
    handle: JoinHandle<LoopOutcome>,
}

struct Held {
    lease: Lease,
    last_renew_ms: i64,
    last_checkpoint_ms: i64,
    running: Option<LoopHandle>,
    /// The loop reached the end of the shard; its children.
    ended: Option<Vec<Arc<str>>>,
    /// Being handed back (engine mode, above this worker's share): the loop is stopped; once
    /// every record read is stored, the shard is checkpointed there and released.
    releasing: bool,
}

struct Observed {
    counter: u64,
    since_ms: i64,
}

struct Coordinator<'a> {
    core: &'a Arc<Core>,
    generator: Arc<BlockGenerator>,
    held: BTreeMap<Arc<str>, Held>,
    observed: HashMap<String, Observed>,
    table: HashMap<String, Lease>,
    first_pass: bool,
    need_scan: bool,
    next_scan_ms: i64,
    unclaimed: usize,
    stopping: Vec<LoopHandle>,
}

/// Runs one incarnation until the receiver is stopped (`Ok`) or fails (`Err`), then shuts it
/// down: graceful stops drain the generator, failures discard what is unstored.
pub(crate) fn run_incarnation(core: &Arc<Core>) -> Result<(), ReceiverError> {
    let generator = {
        let callback_core = Arc::downgrade(core);
        BlockGenerator::builder(
            core.config.generator_config(),
            core.stream.clone(),
            core.handler.clone(),
            core.clock.clone(),
        )
        .block_ids(core.config.input_id, core.run_id, core.next_block_seq.clone())
        .rate_limiter(core.rate.clone())
        .metrics(core.metrics.generator.clone())
        .on_stored(move |meta| {
            if let Some(core) = callback_core.upgrade() {
                core.on_stored(meta);
            }
        })
        .start()
        .map_err(|e| match e {
            crate::BlockGeneratorStartError::Config(c) => ReceiverError::Config(c),
            crate::BlockGeneratorStartError::Generator(g) => ReceiverError::Generator(g),
        })?
    };
    let generator = Arc::new(generator);
    // Whatever a previous incarnation read but did not store will be read again.
    core.progress.restart();
    *core.generator.lock().expect("generator slot") = Some(generator.clone());
    let mut coordinator = Coordinator {
        core,
        generator,
        held: BTreeMap::new(),
        observed: HashMap::new(),
        table: HashMap::new(),
        first_pass: true,
        need_scan: true,
        next_scan_ms: i64::MIN,
        unclaimed: 0,
        stopping: Vec::new(),
    };
    let result = coordinator.run();
    let mode = if result.is_ok() && core.graceful.load(Ordering::SeqCst) {
        StopMode::Graceful
    } else {
        StopMode::Immediate
    };
    let shutdown = coordinator.shutdown(mode);
    core.set_settled(false);
    *core.generator.lock().expect("generator slot") = None;
    result.and(shutdown)
}

impl Coordinator<'_> {
    fn run(&mut self) -> Result<(), ReceiverError> {
        loop {
            if self.core.stop.is_stopped() {
                return Ok(());
            }
            if let Some(e) = self.generator.failure() {
                return Err(e.into());
            }
            self.reap()?;
            if let Err(e) = self.tick() {
                if !e.is_retryable() {
                    return Err(e);
                }
                tracing::warn!(stream = %self.core.stream, error = %e, "lease or source call failed; retrying");
                MetricsCells::bump(&self.core.metrics.lease_store_errors);
                self.core.record_error(&e);
            }
            self.core.stop.wait_ms(&*self.core.clock, TICK_MS);
        }
    }

    fn tick(&mut self) -> Result<(), ReceiverError> {
        let now = self.core.clock.now_ms();
        let adopting = !self.core.adoptions.lock().expect("adoptions").is_empty();
        if self.need_scan || adopting || now >= self.next_scan_ms {
            self.scan(now)?;
        }
        self.renew(now)?;
        self.start_loops()?;
        self.checkpoint(now, false)?;
        self.finish_ended_shards()?;
        self.finish_releases(now)?;
        let settled = !self.need_scan
            && self.unclaimed == 0
            && self
                .held
                .values()
                .all(|h| h.running.is_some() && h.ended.is_none() && !h.releasing);
        self.core.set_settled(settled);
        Ok(())
    }

    /// Syncs shards into leases, reads the table, drops leases lost to others, takes new ones.
    fn scan(&mut self, now: i64) -> Result<(), ReceiverError> {
        self.sync_shards()?;
        let table: Vec<Lease> = self
            .core
            .leases
            .list_leases()?
            .into_iter()
            .filter(|l| l.kind == LeaseKind::Shard)
            .collect();
        for lease in &table {
            let seen = self.observed.entry(lease.lease_key.clone()).or_insert(Observed {
                counter: lease.lease_counter,
                since_ms: if lease.lease_owner.is_some() { now } else { i64::MIN },
            });
            if seen.counter != lease.lease_counter {
                seen.counter = lease.lease_counter;
                seen.since_ms = now;
            }
        }
        self.table = table.iter().map(|l| (l.lease_key.clone(), l.clone())).collect();
        self.core.metrics.lease_table(&table);
        let lost: Vec<Arc<str>> = self
            .held
            .iter()
            .filter(|(key, held)| {
                self.table.get(&***key).is_none_or(|l| {
                    l.lease_owner.as_deref() != Some(&self.core.worker_id)
                        || l.lease_counter != held.lease.lease_counter
                })
            })
            .map(|(key, _)| key.clone())
            .collect();
        for key in lost {
            self.lose(&key);
        }
        self.adopt_requested(now)?;
        self.take(&table, now)?;
        self.retire();
        self.first_pass = false;
        self.need_scan = false;
        self.next_scan_ms = now.saturating_add(self.core.config.lease_taker_interval_ms as i64);
        Ok(())
    }

    /// Creates a lease for every shard that needs one, parents first (KCL's shard sync).
    fn sync_shards(&self) -> Result<(), ReceiverError> {
        let shards = self.core.source.list_shards().map_err(|source| ReceiverError::Source {
            shard_id: "*".into(),
            source,
        })?;
        let mut has_lease: HashSet<String> = self
            .core
            .leases
            .list_leases()?
            .into_iter()
            .map(|l| l.lease_key)
            .collect();
        let initial = self.core.config.initial_position;
        for shard in parents_first(&shards) {
            if has_lease.contains(&*shard.shard_id) {
                continue;
            }
            let parent_has_lease = shard.parent_shard_ids.iter().any(|p| has_lease.contains(&**p));
            let checkpoint = match (parent_has_lease, initial.checkpoint()) {
                (_, Checkpoint::AtTimestamp) => Checkpoint::AtTimestamp,
                (true, _) => Checkpoint::TrimHorizon,
                // LATEST: closed shards hold nothing new; leases start at the open leaves.
                (false, Checkpoint::Latest) if shard.is_closed() => continue,
                (false, checkpoint) => checkpoint,
            };
            let mut lease = Lease::new(&*shard.shard_id, checkpoint);
            lease.parent_shard_ids = shard.parent_shard_ids.iter().map(ToString::to_string).collect();
            lease.hash_key_range = Some(shard.hash_key_range);
            self.core.leases.create_lease_if_absent(&lease)?;
            has_lease.insert(shard.shard_id.to_string());
        }
        Ok(())
    }

    fn take(&mut self, table: &[Lease], now: i64) -> Result<(), ReceiverError> {
        let me = self.core.worker_id.as_str();
        let failover = self.core.config.lease_failover_ms as i64;
        let workers = self.core.workers.clone();
        let expired = |l: &Lease| {
            self.observed
                .get(&l.lease_key)
                .is_some_and(|o| o.since_ms == i64::MIN || now.saturating_sub(o.since_ms) > failover)
        };
        let active: Vec<&Lease> = table
            .iter()
            .filter(|l| l.checkpoint != Checkpoint::ShardEnd && !self.core.source.is_retired(&l.lease_key))
            .collect();
        let available = |l: &&Lease| -> bool {
            if self.held.contains_key(l.lease_key.as_str()) {
                return false;
            }
            match (l.lease_owner.as_deref(), &workers) {
                (None, _) => true,
                // Engine mode: this process holds this worker's lease and log, so leases in its
                // name are its own (a previous process's, or ones it stopped reading).
                (Some(owner), Some(_)) if owner == me => true,
                (Some(owner), None) if owner == me => self.first_pass || expired(l),
                // An active worker's shard moves only when it releases it or through its
                // adopter — never by expiry, which would lose the position its log reached.
                (Some(owner), Some(directory)) if directory.worker_status(owner) == WorkerStatus::Active => false,
                // Unregistered owners (KCL semantics), and retired workers, whose logs hold
                // nothing unprocessed: the checkpoint is where the shard's unread records start.
                (Some(_), _) => expired(l),
            }
        };
        let mut load: BTreeMap<&str, usize> = BTreeMap::new();
        for l in &active {
            if let Some(owner) = l.lease_owner.as_deref()
                && !available(l)
                && owner != me
            {
                *load.entry(owner).or_default() += 1;
            }
        }
        let target = match &workers {
            Some(directory) => fair_share(active.len(), &directory.live_workers(), me),
            None => active.len().div_ceil(load.len() + 1).max(1),
        };
        let held_active = self.held.values().filter(|h| !h.releasing).count();
        let mut need = target.saturating_sub(held_active);
        let mut candidates: Vec<&Lease> = active.iter().copied().filter(|l| available(l)).collect();
        // Our own leases from a previous process first, then unowned, then expired ones.
        candidates.sort_by_key(|l| {
            let rank = match l.lease_owner.as_deref() {
                Some(o) if o == me => 0,
                None => 1,
                Some(_) => 2,
            };
            (rank, l.lease_key.clone())
        });
        let mut taken = 0;
        for lease in &candidates {
            // Our own leases are taken whatever the share: nobody else may read them.
            let own = lease.lease_owner.as_deref() == Some(me) && workers.is_some();
            if need == 0 && !own {
                break;
            }
            if self.try_take(lease, now)? {
                need = need.saturating_sub(1);
                taken += 1;
            }
        }
        self.unclaimed = if need > 0 { candidates.len() - taken } else { 0 };
        if workers.is_some() {
            self.release_above_share(target);
        } else if need > 0 && candidates.is_empty() {
            // Steal one lease from the most loaded worker if it holds more than its share.
            if let Some((victim, count)) = load.iter().max_by_key(|(_, c)| **c)
                && *count > target
                && let Some(lease) = active.iter().find(|l| l.lease_owner.as_deref() == Some(*victim))
            {
                tracing::info!(shard = %lease.lease_key, from = %victim, "stealing a lease to balance the load");
                self.try_take(lease, now)?;
            }
        }
        Ok(())
    }

    /// Hands back the held leases of retired shards ([`Source::is_retired`](crate::Source::is_retired):
    /// a stream removed from a multi-stream application): like a lease above the share, each is
    /// read to a stop, checkpointed at exactly its last stored position and released.
    fn retire(&mut self) {
        let retired: Vec<Arc<str>> = self
            .held
            .iter()
            .filter(|(key, h)| !h.releasing && h.ended.is_none() && self.core.source.is_retired(key))
            .map(|(key, _)| key.clone())
            .collect();
        for key in retired {
            tracing::info!(shard = %key, "the shard's stream is no longer read; releasing its lease");
            let held = self.held.get_mut(&key).expect("held");
            held.releasing = true;
            if let Some(running) = &held.running {
                running.signal.stop();
            }
        }
    }

    /// Engine mode: hands back the leases held above `target` (the share of the live workers),
    /// so that workers below it can take them — the cooperative counterpart of stealing. A
    /// released shard is first read to a stop and checkpointed at exactly its last stored
    /// position ([`finish_releases`](Self::finish_releases)).
    fn release_above_share(&mut self, target: usize) {
        let held_active = self.held.values().filter(|h| !h.releasing && h.ended.is_none()).count();
        let excess = held_active.saturating_sub(target);
        let give_back: Vec<Arc<str>> = self
            .held
            .iter()
            .rev()
            .filter(|(_, h)| !h.releasing && h.ended.is_none())
            .take(excess)
            .map(|(k, _)| k.clone())
            .collect();
        for key in give_back {
            tracing::info!(shard = %key, target, "releasing a lease above this worker's share");
            let held = self.held.get_mut(&key).expect("held");
            held.releasing = true;
            if let Some(running) = &held.running {
                running.signal.stop();
            }
        }
    }

    /// Releases the shards marked `releasing` whose loop has stopped and whose every record read
    /// is stored: checkpoint at exactly the last stored position, then release — so whoever
    /// takes it next starts right after what this worker logged.
    fn finish_releases(&mut self, now: i64) -> Result<(), ReceiverError> {
        let ready: Vec<Arc<str>> = self
            .held
            .iter()
            .filter(|(k, h)| {
                h.releasing && h.running.is_none() && h.ended.is_none() && self.core.progress.all_stored(k)
            })
            .map(|(k, _)| k.clone())
            .collect();
        for key in ready {
            if !self.checkpoint_one(&key, now, true)? {
                continue; // lost meanwhile
            }
            if !self.checkpoint_covers_stored(&key) {
                continue; // not written yet (a regression refused); try again next tick
            }
            let held = self.held.remove(&key).expect("held");
            let fence = held.lease.fence().expect("held leases have an owner");
            self.core.progress.released(&key);
            match self.core.leases.release_lease(&key, &fence) {
                Ok(_) => MetricsCells::bump(&self.core.metrics.leases_released),
                Err(e) if e.is_lease_lost() => {}
                Err(e) => return Err(e.into()),
            }
            self.need_scan = true;
        }
        Ok(())
    }

    /// Takes the shard leases of dead workers this process adopted (see `Receiver::adopt`), each
    /// at the position the dead worker's log ends, in one write.
    fn adopt_requested(&mut self, now: i64) -> Result<(), ReceiverError> {
        let requests = self.core.adoptions.lock().expect("adoptions").clone();
        for request in requests {
            let owned: Vec<Lease> = self
                .table
                .values()
                .filter(|l| l.lease_owner.as_deref() == Some(request.worker.as_str()))
                .filter(|l| l.checkpoint != Checkpoint::ShardEnd)
                .cloned()
                .collect();
            let mut remaining = false;
            for lease in owned {
                let floor = request
                    .floors
                    .get(lease.lease_key.as_str())
                    .map_or(Checkpoint::TrimHorizon, |p| Checkpoint::Position(p.clone()));
                match self
                    .core
                    .leases
                    .adopt_lease(&lease.lease_key, lease.lease_counter, &self.core.worker_id, &floor)
                {
                    Ok(taken) => {
                        tracing::info!(shard = %taken.lease_key, from = %request.worker, checkpoint = %taken.checkpoint,
                            "took over the shard of a dead worker");
                        self.hold(taken, now);
                    }
                    // Its counter moved (the dead worker's last renewal, or a release): next scan.
                    Err(e) if e.is_lease_lost() => remaining = true,
                    Err(e) => return Err(e.into()),
                }
            }
            if remaining {
                self.need_scan = true;
            } else {
                self.core
                    .adoptions
                    .lock()
                    .expect("adoptions")
                    .retain(|r| r.worker != request.worker);
            }
        }
        Ok(())
    }

    fn try_take(&mut self, lease: &Lease, now: i64) -> Result<bool, ReceiverError> {
        match self
            .core
            .leases
            .take_lease(&lease.lease_key, lease.lease_counter, &self.core.worker_id)
        {
            Ok(taken) => {
                self.hold(taken, now);
                Ok(true)
            }
            Err(e) if e.is_lease_lost() => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// Starts holding a lease just taken.
    fn hold(&mut self, taken: Lease, now: i64) {
        MetricsCells::bump(&self.core.metrics.leases_taken);
        let key: Arc<str> = Arc::from(taken.lease_key.as_str());
        self.table.insert(taken.lease_key.clone(), taken.clone());
        self.core.progress.taken(&key);
        self.held.insert(
            key,
            Held {
                lease: taken,
                last_renew_ms: now,
                last_checkpoint_ms: i64::MIN,
                running: None,
                ended: None,
                releasing: false,
            },
        );
    }

    fn renew(&mut self, now: i64) -> Result<(), ReceiverError> {
        let interval = self.core.config.lease_renew_interval_ms() as i64;
        let due: Vec<Arc<str>> = self
            .held
            .iter()
            .filter(|(_, h)| now.saturating_sub(h.last_renew_ms) >= interval)
            .map(|(k, _)| k.clone())
            .collect();
        for key in due {
            let fence = self.held[&key].lease.fence().expect("held leases have an owner");
            match self.core.leases.renew_lease(&key, &fence) {
                Ok(lease) => {
                    let held = self.held.get_mut(&key).expect("held");
                    held.lease = lease;
                    held.last_renew_ms = now;
                }
                Err(e) if e.is_lease_lost() => self.lose(&key),
                // Unrenewed for the failover time: another worker may already have taken it
                // (the KCL drops such leases too). Stop reading; write nothing more for it.
                Err(e)
                    if now.saturating_sub(self.held[&key].last_renew_ms)
                        > self.core.config.lease_failover_ms as i64 =>
                {
                    tracing::warn!(shard = %key, error = %e, "lease not renewed within the failover time; stopping the shard");
                    self.lose(&key);
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Forgets a lease another worker took: stop its loop (records already handed to the
    /// generator are still stored; this worker writes no more checkpoints for it).
    fn lose(&mut self, key: &Arc<str>) {
        if let Some(held) = self.held.remove(key) {
            tracing::warn!(shard = %key, "lease lost to another worker; stopping the shard");
            MetricsCells::bump(&self.core.metrics.leases_lost);
            if let Some(running) = held.running {
                running.signal.stop();
                self.stopping.push(running);
            }
            self.core.progress.lost(key);
        }
    }

    fn parents_done(&self, lease: &Lease) -> bool {
        lease
            .parent_shard_ids
            .iter()
            .all(|p| self.table.get(p).is_none_or(|l| l.checkpoint == Checkpoint::ShardEnd))
    }

    fn start_loops(&mut self) -> Result<(), ReceiverError> {
        let ready: Vec<Arc<str>> = self
            .held
            .iter()
            .filter(|(_, h)| h.running.is_none() && h.ended.is_none() && !h.releasing && self.parents_done(&h.lease))
            .map(|(k, _)| k.clone())
            .collect();
        for key in ready {
            let start = self.starting_position(&key);
            let signal = Arc::new(StopSignal::new());
            self.core.progress.started(&key);
            let handle = {
                let (core, generator, signal, key, start) = (
                    self.core.clone(),
                    self.generator.clone(),
                    signal.clone(),
                    key.clone(),
                    start.clone(),
                );
                std::thread::Builder::new()
                    .name(format!("sluice-shard-{key}"))
                    .spawn(move || shard_loop::run(&core, &generator, &key, start, &signal))
                    .map_err(|e| ReceiverError::Spawn { message: e.to_string() })?
            };
            tracing::debug!(shard = %key, ?start, "reading shard");
            self.held.get_mut(&key).expect("held").running = Some(LoopHandle { signal, handle });
        }
        Ok(())
    }

    /// Strictly after the latest of checkpoint, stored position and `resume_after`; else the
    /// lease's initial position.
    fn starting_position(&self, key: &Arc<str>) -> StartingPosition {
        let held = &self.held[key];
        let mut after: Option<Position> = match &held.lease.checkpoint {
            Checkpoint::Position(p) => Some(p.clone()),
            _ => None,
        };
        let mut consider = |p: Option<&Position>| {
            if let Some(p) = p
                && after.as_ref().is_none_or(|a| a < p)
            {
                after = Some(p.clone());
            }
        };
        consider(self.core.resume_after.get(key));
        let stored = self.core.progress.latest_stored(key);
        consider(stored.as_ref());
        match after {
            Some(p) => StartingPosition::AfterPosition(p),
            None => self
                .core
                .config
                .initial_position
                .starting_position(&held.lease.checkpoint),
        }
    }

    /// Checkpoints every held shard whose stored position moved (respecting the interval unless
    /// `force`).
    fn checkpoint(&mut self, now: i64, force: bool) -> Result<(), ReceiverError> {
        let keys: Vec<Arc<str>> = self.held.keys().cloned().collect();
        for key in keys {
            self.checkpoint_one(&key, now, force)?;
        }
        Ok(())
    }

    /// The last stored position of a shard.
    fn stored_position(&self, key: &Arc<str>) -> Option<Position> {
        self.core.progress.latest_stored(key)
    }

    /// Whether the held lease's checkpoint covers everything stored of its shard.
    fn checkpoint_covers_stored(&self, key: &Arc<str>) -> bool {
        let Some(held) = self.held.get(key) else { return false };
        self.stored_position(key)
            .is_none_or(|p| Checkpoint::Position(p) <= held.lease.checkpoint)
    }

    /// Checkpoints one held shard at its stored position if that moved (and the interval passed,
    /// unless `force`). Returns whether the lease is still held.
    fn checkpoint_one(&mut self, key: &Arc<str>, now: i64, force: bool) -> Result<bool, ReceiverError> {
        let interval = self.core.config.checkpoint_interval_ms as i64;
        let Some(position) = self.stored_position(key) else {
            return Ok(self.held.contains_key(key));
        };
        let Some(held) = self.held.get(key) else {
            return Ok(false);
        };
        let proposed = Checkpoint::Position(position);
        if proposed <= held.lease.checkpoint || (!force && now.saturating_sub(held.last_checkpoint_ms) < interval) {
            return Ok(true);
        }
        let fence = held.lease.fence().expect("held leases have an owner");
        MetricsCells::bump(&self.core.metrics.checkpoint_attempts);
        match self.core.leases.checkpoint(key, &fence, &proposed) {
            Ok(lease) => {
                MetricsCells::bump(&self.core.metrics.checkpoint_successes);
                let held = self.held.get_mut(key).expect("held");
                held.lease = lease;
                held.last_checkpoint_ms = now;
                Ok(true)
            }
            Err(e) if e.is_lease_lost() => {
                self.lose(key);
                Ok(false)
            }
            Err(LeaseError::CheckpointRegression { current, .. }) => {
                // Someone (a previous owner) checkpointed further; never move it back.
                tracing::warn!(shard = %key, %current, %proposed, "stored checkpoint is ahead of this receiver");
                self.held.get_mut(key).expect("held").last_checkpoint_ms = now;
                Ok(true)
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Records `SHARD_END` for shards read to their end whose every record is stored, then
    /// releases them; their children become eligible.
    fn finish_ended_shards(&mut self) -> Result<(), ReceiverError> {
        let ended: Vec<&Arc<str>> = self
            .held
            .iter()
            .filter(|(_, h)| h.ended.is_some())
            .map(|(k, _)| k)
            .collect();
        let ready: Vec<(Arc<str>, Vec<Arc<str>>)> = self
            .core
            .progress
            .fully_stored(ended)
            .into_iter()
            .map(|k| {
                let children = self.held[&k].ended.clone().expect("ended");
                (k, children)
            })
            .collect();
        for (key, children) in ready {
            let fence = self.held[&key].lease.fence().expect("held leases have an owner");
            let children: Vec<String> = children.iter().map(ToString::to_string).collect();
            MetricsCells::bump(&self.core.metrics.checkpoint_attempts);
            match self.core.leases.mark_shard_end(&key, &fence, &children) {
                Ok(lease) => {
                    MetricsCells::bump(&self.core.metrics.checkpoint_successes);
                    tracing::info!(shard = %key, ?children, "shard finished (SHARD_END)");
                    self.core.progress.finished(&key);
                    self.table.insert(lease.lease_key.clone(), lease.clone());
                    let fence = lease.fence().expect("owned");
                    self.held.remove(&key);
                    if let Err(e) = self.core.leases.release_lease(&key, &fence) {
                        tracing::warn!(shard = %key, error = %e, "could not release a finished lease");
                    }
                    self.need_scan = true;
                }
                Err(e) if e.is_lease_lost() => self.lose(&key),
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Joins finished shard loops; a non-retryable source error fails the incarnation.
    fn reap(&mut self) -> Result<(), ReceiverError> {
        self.stopping.retain(|l| !l.handle.is_finished());
        let finished: Vec<Arc<str>> = self
            .held
            .iter()
            .filter(|(_, h)| h.running.as_ref().is_some_and(|r| r.handle.is_finished()))
            .map(|(k, _)| k.clone())
            .collect();
        for key in finished {
            let held = self.held.get_mut(&key).expect("held");
            let running = held.running.take().expect("running");
            let outcome = running.handle.join().unwrap_or_else(|_| LoopOutcome::Panicked);
            match outcome {
                LoopOutcome::Ended { children } => {
                    held.ended = Some(children);
                    // Keep `running` empty but mark it so it is not restarted.
                }
                LoopOutcome::Stopped | LoopOutcome::GeneratorClosed => {}
                LoopOutcome::Failed(source) => {
                    return Err(ReceiverError::Source {
                        shard_id: key.to_string(),
                        source,
                    });
                }
                LoopOutcome::Panicked => {
                    return Err(ReceiverError::Spawn {
                        message: format!("the reader of shard {key} panicked"),
                    });
                }
            }
        }
        Ok(())
    }

    /// Stops every loop, stops the generator (draining it on a graceful stop), writes final
    /// checkpoints of stored positions and releases every held lease.
    fn shutdown(&mut self, mode: StopMode) -> Result<(), ReceiverError> {
        for held in self.held.values() {
            if let Some(running) = &held.running {
                running.signal.stop();
            }
        }
        for running in &self.stopping {
            running.signal.stop();
        }
        let drained = self.generator.stop(mode);
        for running in self.stopping.drain(..) {
            let _ = running.handle.join();
        }
        let keys: Vec<Arc<str>> = self.held.keys().cloned().collect();
        for key in &keys {
            let held = self.held.get_mut(key).expect("held");
            if let Some(running) = held.running.take()
                && let Ok(LoopOutcome::Ended { children }) = running.handle.join()
            {
                held.ended = Some(children);
            }
        }
        let now = self.core.clock.now_ms();
        let mut result = drained.map_err(ReceiverError::from);
        if let Err(e) = self.finish_ended_shards().and_then(|()| self.checkpoint(now, true)) {
            tracing::warn!(stream = %self.core.stream, error = %e, "final checkpoint failed");
            result = result.and(Err(e));
        }
        let keys: Vec<Arc<str>> = self.held.keys().cloned().collect();
        for key in keys {
            // A lease is handed on only at exactly its last stored position: released with an
            // older checkpoint, its next owner would read again what this worker logged. Such a
            // lease is left to expire (and, in engine mode, to this worker's adopter).
            let exact = self.checkpoint_covers_stored(&key);
            let held = self.held.remove(&key).expect("held");
            if exact
                && let Some(fence) = held.lease.fence()
                && let Err(e) = self.core.leases.release_lease(&key, &fence)
            {
                tracing::warn!(shard = %key, error = %e, "could not release a lease");
            } else if !exact {
                tracing::warn!(shard = %key, "not releasing a lease whose final checkpoint did not land");
            }
            self.core.progress.released(&key);
        }
        result
    }
}

/// This worker's share of `shards` among the `live` workers (sorted ids): the first
/// `shards % live` workers hold one more than the others, so that every worker holds as many as
/// it can (a ceiling for all would let two workers take everything while a third holds none).
/// Every worker computes the same split from the same view.
fn fair_share(shards: usize, live: &[String], me: &str) -> usize {
    let workers = live.len().max(1);
    let (base, extra) = (shards / workers, shards % workers);
    let rank = live.iter().position(|w| w == me).unwrap_or(workers);
    base + usize::from(rank < extra)
}

/// Shards ordered so that every parent comes before its children.
fn parents_first(shards: &[ShardInfo]) -> Vec<&ShardInfo> {
    let mut placed: HashSet<&str> = HashSet::new();
    let mut out = Vec::with_capacity(shards.len());
    let known: HashSet<&str> = shards.iter().map(|s| &*s.shard_id).collect();
    while out.len() < shards.len() {
        let before = out.len();
        for shard in shards {
            if placed.contains(&*shard.shard_id) {
                continue;
            }
            if shard
                .parent_shard_ids
                .iter()
                .all(|p| placed.contains(&**p) || !known.contains(&**p))
            {
                placed.insert(&shard.shard_id);
                out.push(shard);
            }
        }
        if out.len() == before {
            // A cycle cannot happen in a real shard graph; keep the rest in listed order.
            out.extend(shards.iter().filter(|s| !placed.contains(&*s.shard_id)));
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::fair_share;

    #[test]
    fn shares_differ_by_at_most_one_and_cover_every_shard() {
        let live: Vec<String> = ["a", "b", "c"].iter().map(|s| (*s).to_owned()).collect();
        for shards in 0..10 {
            let shares: Vec<usize> = live.iter().map(|w| fair_share(shards, &live, w)).collect();
            assert_eq!(shares.iter().sum::<usize>(), shards, "{shards}: {shares:?}");
            assert!(shares.iter().max().unwrap() - shares.iter().min().unwrap() <= 1);
        }
        assert_eq!(fair_share(4, &live, "a"), 2);
        assert_eq!(fair_share(4, &live, "c"), 1);
        // A worker the view does not list yet gets the smaller share.
        assert_eq!(fair_share(4, &live, "d"), 1);
    }
}
