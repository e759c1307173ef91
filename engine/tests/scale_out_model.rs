//! Model test of the scale-out protocol (`docs/ARCHITECTURE.md`, "Several workers").
//!
//! Workers of one application are simulated step by step — read records, log a block, checkpoint,
//! balance shards, allocate / write / complete a batch, renew and scan leases, adopt a dead
//! worker — in random orders, with crashes at any step (some for good), pauses that turn a
//! worker into a zombie, and several workers racing to adopt one log. The steps drive the real
//! components the engine uses: `MetadataLog` claims and fencing, `ReceivedBlockTracker`,
//! `WorkerRegistry`, and a lease store with the contract's rules (`MemoryLeaseStore`, which
//! passes the conformance suite). The output is modelled like the Parquet sink: one file per
//! batch and writer, replaced on re-write.
//!
//! After the random steps every surviving worker runs until nothing is left to do; then every
//! record of the source must be in the output exactly once.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;

use proptest::prelude::*;
use sluice_blockstore::{
    BlockId, BlockMeta, Clock, ManualClock, Position, SequenceNumber, SequenceNumberRange, SequenceNumberRanges,
};
use sluice_engine::Error;
use sluice_engine::internals::{CheckpointStore, MetadataLog, ReceivedBlockTracker, RecoveredState};
use sluice_receiver::testing::MemoryLeaseStore;
use sluice_receiver::{
    Checkpoint, Lease, LeaseKind, LeaseStore, WORKER_LEASE_PREFIX, WorkerDirectory, WorkerRegistry, WorkerStatus,
};

const SHARDS: usize = 3;
const RECORDS: u64 = 18;
const WORKERS: usize = 3;
const FAILOVER_MS: u64 = 120;
const STREAM: &str = "s";

type Rec = (usize, u64);

#[derive(Debug, Clone)]
enum Op {
    Start(usize),
    Read(usize),
    LogBlock(usize),
    Checkpoint(usize),
    Balance(usize),
    Allocate(usize, usize),
    Write(usize, usize),
    Complete(usize, usize),
    Membership(usize),
    Crash { worker: usize, forever: bool },
    Pause(usize),
    Resume(usize),
    Tick(u8),
}

fn op() -> impl Strategy<Value = Op> {
    let w = 0..WORKERS;
    prop_oneof![
        2 => w.clone().prop_map(Op::Start),
        4 => w.clone().prop_map(Op::Read),
        4 => w.clone().prop_map(Op::LogBlock),
        3 => w.clone().prop_map(Op::Checkpoint),
        3 => w.clone().prop_map(Op::Balance),
        3 => (w.clone(), 0..3usize).prop_map(|(a, b)| Op::Allocate(a, b)),
        3 => (w.clone(), 0..3usize).prop_map(|(a, b)| Op::Write(a, b)),
        3 => (w.clone(), 0..3usize).prop_map(|(a, b)| Op::Complete(a, b)),
        3 => w.clone().prop_map(Op::Membership),
        1 => (w.clone(), any::<bool>()).prop_map(|(worker, forever)| Op::Crash { worker, forever }),
        1 => w.clone().prop_map(Op::Pause),
        1 => w.prop_map(Op::Resume),
        3 => any::<u8>().prop_map(Op::Tick),
    ]
}

fn shard_id(shard: usize) -> String {
    format!("shard-{shard}")
}

fn shard_of(id: &str) -> usize {
    id.trim_start_matches("shard-").parse().expect("a model shard id")
}

fn position(seq: u64) -> Position {
    Position::plain(SequenceNumber::from_u128(u128::from(seq)))
}

fn seq_of(position: &Position) -> u64 {
    position.sequence.as_str().parse().expect("a model sequence number")
}

fn checkpoint_seq(checkpoint: &Checkpoint) -> u64 {
    match checkpoint {
        Checkpoint::Position(p) => seq_of(p),
        _ => 0,
    }
}

/// The same split as the receiver's: the first `shards % workers` live workers by id hold one
/// more.
fn fair_share(live: &[String], me: &str) -> usize {
    let workers = live.len().max(1);
    let rank = live.iter().position(|w| w == me).unwrap_or(workers);
    SHARDS / workers + usize::from(rank < SHARDS % workers)
}

/// One metadata log and its batches in flight, as the job generator runs them.
struct LogRun {
    writer: String,
    /// Where the log ends per shard (the floors an adopter takes the worker's shards at).
    floors: HashMap<usize, u64>,
    tracker: ReceivedBlockTracker,
    /// Allocated, not completed, oldest first.
    pending: VecDeque<i64>,
    /// Pending batches whose output this process wrote.
    written: BTreeSet<i64>,
}

/// A running process of a worker (everything here is lost in a crash).
struct Proc {
    registry: WorkerRegistry,
    /// `[0]` is the worker's own log; the others are adopted logs.
    logs: Vec<LogRun>,
    held: BTreeMap<usize, Lease>,
    next_read: BTreeMap<usize, u64>,
    buffer: Vec<Rec>,
    stored: BTreeMap<usize, u64>,
    resume_after: BTreeMap<usize, u64>,
    /// Shard lease counters as last seen, and since when (expiry, on this process's clock).
    observed: HashMap<usize, (u64, i64)>,
}

struct Slot {
    id: String,
    proc: Option<Proc>,
    paused: bool,
    lost: bool,
    incarnation: u32,
}

struct World {
    clock: Arc<ManualClock>,
    leases: Arc<MemoryLeaseStore>,
    root: CheckpointStore,
    /// Output files: (writer, batch time) → rows.
    output: BTreeMap<(String, i64), Vec<Rec>>,
    slots: Vec<Slot>,
    next_batch: i64,
    next_block: u64,
}

fn records_of(tracker: &ReceivedBlockTracker, time_ms: i64) -> Vec<Rec> {
    let mut rows = Vec::new();
    for block in tracker.blocks_of_batch(time_ms) {
        for range in &block.meta.ranges {
            let shard = shard_of(&range.shard_id);
            rows.extend((seq_of(&range.from)..=seq_of(&range.to)).map(|s| (shard, s)));
        }
    }
    rows
}

impl World {
    fn new() -> Self {
        let leases = Arc::new(MemoryLeaseStore::new());
        for shard in 0..SHARDS {
            leases
                .create_lease_if_absent(&Lease::new(shard_id(shard), Checkpoint::TrimHorizon))
                .unwrap();
        }
        let store = Arc::new(object_store::memory::InMemory::new());
        Self {
            clock: Arc::new(ManualClock::new(0)),
            leases,
            root: CheckpointStore::object_store(store, object_store::path::Path::from("checkpoint")).unwrap(),
            output: BTreeMap::new(),
            slots: (0..WORKERS)
                .map(|i| Slot {
                    id: format!("w{i}"),
                    proc: None,
                    paused: false,
                    lost: false,
                    incarnation: 0,
                })
                .collect(),
            next_batch: 1_000,
            next_block: 0,
        }
    }

    fn worker_dir(&self, worker: &str) -> CheckpointStore {
        self.root.child("workers").child(worker)
    }

    fn open_log(&self, worker: &str, holder: &str) -> (LogRun, RecoveredState) {
        let log = MetadataLog::claim(&self.worker_dir(worker), holder).unwrap();
        let (tracker, recovered) = ReceivedBlockTracker::recover(log).unwrap();
        let run = LogRun {
            writer: worker.to_owned(),
            floors: recovered
                .resume_after
                .iter()
                .map(|(_, shard, p)| (shard_of(shard), seq_of(p)))
                .collect(),
            tracker: tracker.with_compact_every(1),
            pending: recovered.pending_batches.iter().copied().collect(),
            written: BTreeSet::new(),
        };
        (run, recovered)
    }

    fn start(&mut self, w: usize) {
        if self.slots[w].lost || self.slots[w].proc.is_some() {
            return;
        }
        let id = self.slots[w].id.clone();
        self.slots[w].incarnation += 1;
        let registry = WorkerRegistry::join(self.leases.clone(), &id, FAILOVER_MS, self.clock.clone()).unwrap();
        let holder = format!("{id}#{}", self.slots[w].incarnation);
        let (own, recovered) = self.open_log(&id, &holder);
        let resume_after: BTreeMap<usize, u64> = recovered
            .resume_after
            .iter()
            .map(|(_, shard, p)| (shard_of(shard), seq_of(p)))
            .collect();
        self.slots[w].proc = Some(Proc {
            registry,
            logs: vec![own],
            held: BTreeMap::new(),
            next_read: BTreeMap::new(),
            buffer: Vec::new(),
            // What the log holds counts as stored (as in `Receiver::new`): a release checkpoints
            // up to it.
            stored: resume_after.clone(),
            resume_after,
            observed: HashMap::new(),
        });
        self.slots[w].paused = false;
    }

    /// The slot's process if it runs and is not paused.
    fn active(&mut self, w: usize) -> Option<&mut Proc> {
        let slot = &mut self.slots[w];
        if slot.paused { None } else { slot.proc.as_mut() }
    }

    /// A stop after this process learned it is fenced: final exact checkpoints, releases of the
    /// leases whose checkpoint covers what it logged, and the process ends.
    fn shut_down(&mut self, w: usize) {
        let Some(mut proc) = self.slots[w].proc.take() else {
            return;
        };
        let leases = self.leases.clone();
        for (shard, lease) in std::mem::take(&mut proc.held) {
            let stored = proc.stored.get(&shard).copied().unwrap_or(0);
            let mut lease = lease;
            if stored > checkpoint_seq(&lease.checkpoint) {
                match leases.checkpoint(
                    &shard_id(shard),
                    &lease.fence().unwrap(),
                    &Checkpoint::Position(position(stored)),
                ) {
                    Ok(l) => lease = l,
                    Err(_) => continue,
                }
            }
            if checkpoint_seq(&lease.checkpoint) >= stored {
                let _ = leases.release_lease(&shard_id(shard), &lease.fence().unwrap());
            }
        }
    }

    fn read(&mut self, w: usize) {
        let Some(proc) = self.active(w) else { return };
        let shards: Vec<usize> = proc.held.keys().copied().collect();
        for shard in shards {
            let next = proc.next_read.entry(shard).or_insert(1);
            while *next <= RECORDS && proc.buffer.len() < 8 {
                proc.buffer.push((shard, *next));
                *next += 1;
            }
        }
    }

    fn log_block(&mut self, w: usize) {
        let id = self.next_block;
        let Some(proc) = self.active(w) else { return };
        if proc.buffer.is_empty() {
            return;
        }
        let mut per_shard: BTreeMap<usize, (u64, u64, u64)> = BTreeMap::new();
        for (shard, seq) in &proc.buffer {
            let entry = per_shard.entry(*shard).or_insert((*seq, *seq, 0));
            entry.1 = *seq;
            entry.2 += 1;
        }
        let ranges: Vec<SequenceNumberRange> = per_shard
            .iter()
            .map(|(shard, (from, to, count))| SequenceNumberRange {
                stream: STREAM.into(),
                shard_id: shard_id(*shard).into(),
                from: position(*from),
                to: position(*to),
                record_count: *count,
            })
            .collect();
        let meta = BlockMeta {
            id: BlockId {
                input_id: 0,
                run_id: 1,
                seq: id,
            },
            ranges: SequenceNumberRanges::from(ranges),
            num_records: proc.buffer.len() as u64,
            num_bytes: 0,
        };
        match proc.logs[0].tracker.add_block(meta) {
            Ok(()) => {
                for (shard, (_, to, _)) in per_shard {
                    proc.stored.insert(shard, to);
                }
                proc.buffer.clear();
                self.next_block += 1;
            }
            Err(Error::Fenced { .. }) => self.shut_down(w),
            Err(e) => panic!("{e}"),
        }
    }

    fn checkpoint(&mut self, w: usize) {
        let leases = self.leases.clone();
        let Some(proc) = self.active(w) else { return };
        let shards: Vec<usize> = proc.held.keys().copied().collect();
        for shard in shards {
            let stored = proc.stored.get(&shard).copied().unwrap_or(0);
            let lease = &proc.held[&shard];
            if stored <= checkpoint_seq(&lease.checkpoint) {
                continue;
            }
            match leases.checkpoint(
                &shard_id(shard),
                &lease.fence().unwrap(),
                &Checkpoint::Position(position(stored)),
            ) {
                Ok(l) => {
                    proc.held.insert(shard, l);
                }
                Err(e) if e.is_lease_lost() => {
                    proc.held.remove(&shard);
                }
                Err(e) => panic!("{e}"),
            }
        }
    }

    /// Takes unowned leases up to the fair share (own leases always), and hands back what is
    /// held above it — after an exact checkpoint, never with records still in the buffer.
    fn balance(&mut self, w: usize) {
        let leases = self.leases.clone();
        let now = self.clock.now_ms();
        let id = self.slots[w].id.clone();
        let Some(proc) = self.active(w) else { return };
        let target = fair_share(&proc.registry.live_workers(), &id);
        while proc.held.len() > target {
            let buffered: BTreeSet<usize> = proc.buffer.iter().map(|(s, _)| *s).collect();
            let Some(&shard) = proc.held.keys().rev().find(|s| !buffered.contains(s)) else {
                break;
            };
            let stored = proc.stored.get(&shard).copied().unwrap_or(0);
            let mut lease = proc.held.remove(&shard).unwrap();
            if stored > checkpoint_seq(&lease.checkpoint) {
                match leases.checkpoint(
                    &shard_id(shard),
                    &lease.fence().unwrap(),
                    &Checkpoint::Position(position(stored)),
                ) {
                    Ok(l) => lease = l,
                    Err(_) => continue, // lost meanwhile
                }
            }
            let _ = leases.release_lease(&shard_id(shard), &lease.fence().unwrap());
        }
        for lease in leases.list_leases().unwrap() {
            if lease.kind != LeaseKind::Shard {
                continue;
            }
            let seen = proc
                .observed
                .entry(shard_of(&lease.lease_key))
                .or_insert((lease.lease_counter, now));
            if seen.0 != lease.lease_counter {
                *seen = (lease.lease_counter, now);
            }
            let expired = now - seen.1 > FAILOVER_MS as i64;
            if proc.held.contains_key(&shard_of(&lease.lease_key)) {
                continue;
            }
            let own = lease.lease_owner.as_deref() == Some(id.as_str());
            // Unowned, or left by a retired worker (its log holds nothing past the checkpoint).
            let free = match lease.lease_owner.as_deref() {
                None => true,
                Some(owner) => expired && proc.registry.worker_status(owner) == WorkerStatus::Retired,
            };
            if !(own || (free && proc.held.len() < target)) {
                continue;
            }
            let Ok(taken) = leases.take_lease(&lease.lease_key, lease.lease_counter, &id) else {
                continue;
            };
            let shard = shard_of(&taken.lease_key);
            let start = checkpoint_seq(&taken.checkpoint)
                .max(proc.resume_after.get(&shard).copied().unwrap_or(0))
                .max(proc.stored.get(&shard).copied().unwrap_or(0));
            proc.next_read.insert(shard, start + 1);
            proc.held.insert(shard, taken);
        }
    }

    fn log_index(&mut self, w: usize, which: usize) -> Option<usize> {
        let proc = self.active(w)?;
        Some(which % proc.logs.len())
    }

    /// A log append was fenced: the process stops if it is its own log, else gives the adoption
    /// up — and claims the log again if it still holds that worker's lease.
    fn fenced(&mut self, w: usize, i: usize) {
        if i == 0 {
            self.shut_down(w);
            return;
        }
        let proc = self.slots[w].proc.as_mut().unwrap();
        let run = proc.logs.remove(i);
        if proc.registry.holds(&run.writer) {
            self.adopt(w, &run.writer);
        }
    }

    fn allocate(&mut self, w: usize, which: usize) {
        let Some(i) = self.log_index(w, which) else { return };
        let t = self.next_batch;
        self.next_batch += 1;
        let run = &mut self.slots[w].proc.as_mut().unwrap().logs[i];
        match run.tracker.allocate_blocks_to_batch(t) {
            Ok(_) => run.pending.push_back(t),
            Err(Error::Fenced { .. }) => self.fenced(w, i),
            Err(e) => panic!("{e}"),
        }
    }

    fn write(&mut self, w: usize, which: usize) {
        let Some(i) = self.log_index(w, which) else { return };
        let run = &mut self.slots[w].proc.as_mut().unwrap().logs[i];
        let Some(&t) = run.pending.front() else { return };
        let rows = records_of(&run.tracker, t);
        run.written.insert(t);
        let key = (run.writer.clone(), t);
        // Like the sink: an empty batch leaves no part; a re-write replaces the part.
        if rows.is_empty() {
            self.output.remove(&key);
        } else {
            self.output.insert(key, rows);
        }
    }

    fn complete(&mut self, w: usize, which: usize) {
        let Some(i) = self.log_index(w, which) else { return };
        let proc = self.slots[w].proc.as_mut().unwrap();
        let run = &mut proc.logs[i];
        let Some(&t) = run.pending.front() else { return };
        if !run.written.contains(&t) {
            return;
        }
        match run.tracker.complete_batch(t, t) {
            Ok(_) => {
                run.pending.pop_front();
                run.written.remove(&t);
            }
            Err(Error::Fenced { .. }) => self.fenced(w, i),
            Err(e) => panic!("{e}"),
        }
    }

    /// Claims `worker`'s log, takes its shard leases at the positions the log ends, and queues
    /// the log's batches.
    fn adopt(&mut self, w: usize, worker: &str) {
        let holder = format!("{} adopting {worker} #{}", self.slots[w].id, self.next_block);
        let (run, _) = self.open_log(worker, &holder);
        self.take_shards_of(w, &run);
        self.slots[w].proc.as_mut().unwrap().logs.push(run);
    }

    /// Takes every unfinished shard lease the adopted log's worker owns, raised to the log's end.
    fn take_shards_of(&mut self, w: usize, run: &LogRun) {
        let leases = self.leases.clone();
        let id = self.slots[w].id.clone();
        let proc = self.slots[w].proc.as_mut().unwrap();
        for shard in 0..SHARDS {
            loop {
                let lease = leases.get_lease(&shard_id(shard)).unwrap().unwrap();
                if lease.lease_owner.as_deref() != Some(run.writer.as_str()) || lease.checkpoint == Checkpoint::ShardEnd
                {
                    break;
                }
                let floor = run
                    .floors
                    .get(&shard)
                    .map_or(Checkpoint::TrimHorizon, |s| Checkpoint::Position(position(*s)));
                if let Ok(taken) = leases.adopt_lease(&lease.lease_key, lease.lease_counter, &id, &floor) {
                    proc.next_read.insert(shard, checkpoint_seq(&taken.checkpoint) + 1);
                    proc.held.insert(shard, taken);
                    break;
                }
            }
        }
    }

    /// Adopted logs with nothing left: their worker lease is released once no shard lease is in
    /// their worker's name any more (a zombie may have taken some after the claim).
    fn settle(&mut self, w: usize) {
        let leases = self.leases.clone();
        let Some(proc) = self.slots[w].proc.as_mut() else {
            return;
        };
        let finished: Vec<usize> = (1..proc.logs.len())
            .filter(|i| {
                let run = &proc.logs[*i];
                run.pending.is_empty() && !run.tracker.has_unallocated_blocks()
            })
            .collect();
        for i in finished.into_iter().rev() {
            let writer = self.slots[w].proc.as_ref().unwrap().logs[i].writer.clone();
            let owns = leases.list_leases().unwrap().iter().any(|l| {
                l.kind == LeaseKind::Shard
                    && l.lease_owner.as_deref() == Some(writer.as_str())
                    && l.checkpoint != Checkpoint::ShardEnd
            });
            if owns {
                let run = self.slots[w].proc.as_mut().unwrap().logs.remove(i);
                self.take_shards_of(w, &run);
                self.slots[w].proc.as_mut().unwrap().logs.insert(i, run);
            } else {
                let proc = self.slots[w].proc.as_mut().unwrap();
                proc.logs.remove(i);
                let _ = proc.registry.release(&writer);
            }
        }
    }

    fn membership(&mut self, w: usize) {
        let leases = self.leases.clone();
        let id = self.slots[w].id.clone();
        let Some(proc) = self.active(w) else { return };
        let lost = proc.registry.renew().unwrap();
        for worker in &lost {
            if *worker == id {
                self.shut_down(w);
                return;
            }
            proc.logs.retain(|l| l.writer != *worker);
        }
        let shards: Vec<usize> = proc.held.keys().copied().collect();
        for shard in shards {
            let fence = proc.held[&shard].fence().unwrap();
            match leases.renew_lease(&shard_id(shard), &fence) {
                Ok(l) => {
                    proc.held.insert(shard, l);
                }
                Err(_) => {
                    proc.held.remove(&shard);
                }
            }
        }
        let scan = proc.registry.scan().unwrap();
        for lease in scan.expired {
            let proc = self.slots[w].proc.as_mut().unwrap();
            if proc.registry.take(&lease).unwrap() {
                let worker = lease.lease_key.trim_start_matches(WORKER_LEASE_PREFIX).to_owned();
                self.adopt(w, &worker);
            }
        }
        self.settle(w);
    }

    fn apply(&mut self, op: &Op) {
        match *op {
            Op::Start(w) => self.start(w),
            Op::Read(w) => self.read(w),
            Op::LogBlock(w) => self.log_block(w),
            Op::Checkpoint(w) => self.checkpoint(w),
            Op::Balance(w) => self.balance(w),
            Op::Allocate(w, l) => self.allocate(w, l),
            Op::Write(w, l) => self.write(w, l),
            Op::Complete(w, l) => self.complete(w, l),
            Op::Membership(w) => self.membership(w),
            Op::Crash { worker, forever } => {
                self.slots[worker].proc = None;
                // Worker 0 always comes back, so someone is left to finish.
                self.slots[worker].lost |= forever && worker != 0;
            }
            Op::Pause(w) => self.slots[w].paused = true,
            Op::Resume(w) => self.slots[w].paused = false,
            Op::Tick(n) => self.clock.advance_ms(i64::from(n % 4 + 1) * FAILOVER_MS as i64 / 4),
        }
    }

    /// Every surviving worker runs every step until nothing is left to do. Paused workers stay
    /// paused for the first rounds — long enough to be adopted and their logs compacted — and
    /// then wake up as zombies.
    fn drain(&mut self) {
        let mut quiet_rounds = 0;
        for round in 0..400 {
            if round == 12 {
                // Zombies wake up and act on what they believe before their membership thread
                // notices anything.
                let woken: Vec<usize> = (0..WORKERS).filter(|w| self.slots[*w].paused).collect();
                for &w in &woken {
                    self.slots[w].paused = false;
                    self.read(w);
                    self.log_block(w);
                    self.checkpoint(w);
                    for l in 0..3 {
                        self.allocate(w, l);
                        self.write(w, l);
                        self.complete(w, l);
                    }
                }
            }
            let before = (self.output.clone(), self.next_block);
            for w in 0..WORKERS {
                self.start(w);
                self.membership(w);
                self.balance(w);
                self.read(w);
                self.log_block(w);
                self.checkpoint(w);
                for l in 0..3 {
                    let unallocated = self.slots[w]
                        .proc
                        .as_ref()
                        .is_some_and(|p| p.logs.get(l).is_some_and(|run| run.tracker.has_unallocated_blocks()));
                    if unallocated {
                        self.allocate(w, l);
                    }
                    self.write(w, l);
                    self.complete(w, l);
                    self.write(w, l);
                    self.complete(w, l);
                }
            }
            self.clock.advance_ms(FAILOVER_MS as i64 / 3);
            let all_read = self.count_output().len() == SHARDS * RECORDS as usize;
            quiet_rounds = if all_read && before == (self.output.clone(), self.next_block) {
                quiet_rounds + 1
            } else {
                0
            };
            if quiet_rounds >= 8 && round > 12 {
                return;
            }
        }
        panic!(
            "did not settle: {} of {} records in the output",
            self.count_output().len(),
            SHARDS * RECORDS as usize
        );
    }

    fn count_output(&self) -> BTreeMap<Rec, usize> {
        let mut counts = BTreeMap::new();
        for rows in self.output.values() {
            for r in rows {
                *counts.entry(*r).or_default() += 1;
            }
        }
        counts
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]
    #[test]
    fn every_record_is_in_the_output_exactly_once(ops in proptest::collection::vec(op(), 1..120)) {
        let mut world = World::new();
        for w in 0..WORKERS {
            world.start(w);
        }
        for op in &ops {
            world.apply(op);
        }
        world.drain();
        let counts = world.count_output();
        let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
        prop_assert!(twice.is_empty(), "records in the output more than once: {:?}", twice);
        for shard in 0..SHARDS {
            for seq in 1..=RECORDS {
                prop_assert!(counts.contains_key(&(shard, seq)), "record {:?} was lost", (shard, seq));
            }
        }
    }
}

/// The scenario the issue names, spelled out: a worker dies for good with logged but
/// unprocessed blocks, two others race to adopt it, its zombie wakes up afterwards.
#[test]
fn two_takers_and_a_zombie() {
    let mut world = World::new();
    for w in 0..WORKERS {
        world.start(w);
    }
    for w in 0..WORKERS {
        world.membership(w);
        world.balance(w);
    }
    // w1 reads and logs, allocates and writes a batch but does not complete it, logs more.
    for _ in 0..3 {
        world.read(1);
        world.log_block(1);
    }
    world.checkpoint(1);
    world.allocate(1, 0);
    world.write(1, 0);
    world.read(1);
    world.log_block(1);
    // w1 freezes; after the failover time w0 and w2 race for its log.
    world.apply(&Op::Pause(1));
    for _ in 0..6 {
        world.clock.advance_ms(FAILOVER_MS as i64 / 3);
        world.membership(0);
        world.membership(2);
    }
    let adopters = [0, 2]
        .iter()
        .filter(|w| {
            world.slots[**w]
                .proc
                .as_ref()
                .unwrap()
                .logs
                .iter()
                .any(|l| l.writer == "w1")
        })
        .count();
    assert_eq!(adopters, 1, "exactly one of the two takers adopts w1");
    // The zombie wakes: its appends are fenced, its rewrite of the batch it had in flight is the
    // adopter's rows under the same name.
    world.apply(&Op::Resume(1));
    world.write(1, 0);
    world.log_block(1);
    world.complete(1, 0);
    assert!(world.slots[1].proc.is_none(), "the zombie must stop once fenced");
    world.drain();
    let counts = world.count_output();
    assert_eq!(counts.len(), SHARDS * RECORDS as usize);
    assert!(counts.values().all(|n| *n == 1), "{counts:?}");
}
