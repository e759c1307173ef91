//! The receiver end to end over the in-memory [`MemorySource`], on a manual clock, with every
//! checkpoint checked *at the moment it is written* against what the handler has stored.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_blockstore::{Block, ManualClock, Position, Record};
use sluice_receiver::testing::{HandlerAction, MemorySource, RecordingHandler, SourceFault};
use sluice_receiver::{
    Checkpoint, Lease, LeaseError, LeaseFence, LeaseStore, LocalLeaseStore, Receiver, ReceiverConfig, ReceiverState,
    ReceiverStatus, StartingPosition, StopMode,
};

const SHARD0: &str = "shardId-000000000000";

/// A lease store that checks every checkpoint against the handler's stored blocks before passing
/// it on: a position checkpoint must be a stored position, `SHARD_END` needs every record of the
/// shard stored. Violations are collected (the receiver's threads must not panic on our behalf).
#[derive(Debug)]
struct CheckingLeases {
    inner: LocalLeaseStore,
    handler: Arc<RecordingHandler>,
    source: MemorySource,
    violations: Mutex<Vec<String>>,
    checkpoints: Mutex<Vec<(String, Checkpoint)>>,
    /// Positions the engine already holds durably (`resume_after`): checkpointing them is fine.
    engine_stored: Mutex<HashMap<String, Position>>,
}

impl CheckingLeases {
    fn stored_positions(&self, shard: &str) -> Vec<Position> {
        self.handler
            .blocks()
            .iter()
            .flat_map(|b| b.records().unwrap())
            .filter(|r| &*r.shard_id == shard)
            .map(|r| r.position)
            .collect()
    }

    fn violations(&self) -> Vec<String> {
        self.violations.lock().unwrap().clone()
    }
}

impl LeaseStore for CheckingLeases {
    fn create_lease_if_absent(&self, lease: &Lease) -> Result<bool, LeaseError> {
        self.inner.create_lease_if_absent(lease)
    }
    fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>, LeaseError> {
        self.inner.get_lease(lease_key)
    }
    fn list_leases(&self) -> Result<Vec<Lease>, LeaseError> {
        self.inner.list_leases()
    }
    fn take_lease(&self, lease_key: &str, expected_counter: u64, new_owner: &str) -> Result<Lease, LeaseError> {
        self.inner.take_lease(lease_key, expected_counter, new_owner)
    }
    fn adopt_lease(
        &self,
        lease_key: &str,
        expected_counter: u64,
        new_owner: &str,
        floor: &Checkpoint,
    ) -> Result<Lease, LeaseError> {
        self.inner.adopt_lease(lease_key, expected_counter, new_owner, floor)
    }
    fn renew_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<Lease, LeaseError> {
        self.inner.renew_lease(lease_key, fence)
    }
    fn checkpoint(&self, lease_key: &str, fence: &LeaseFence, checkpoint: &Checkpoint) -> Result<Lease, LeaseError> {
        if let Checkpoint::Position(p) = checkpoint
            && !self.stored_positions(lease_key).contains(p)
            && self.engine_stored.lock().unwrap().get(lease_key) != Some(p)
        {
            self.violations
                .lock()
                .unwrap()
                .push(format!("checkpoint {p} of {lease_key} is not a stored position"));
        }
        self.checkpoints
            .lock()
            .unwrap()
            .push((lease_key.to_owned(), checkpoint.clone()));
        self.inner.checkpoint(lease_key, fence, checkpoint)
    }
    fn mark_shard_end(&self, lease_key: &str, fence: &LeaseFence, children: &[String]) -> Result<Lease, LeaseError> {
        let stored = self.stored_positions(lease_key).len();
        let total = self.source.records(lease_key).len();
        if stored < total {
            self.violations.lock().unwrap().push(format!(
                "SHARD_END of {lease_key} with {stored} of {total} records stored"
            ));
        }
        self.inner.mark_shard_end(lease_key, fence, children)
    }
    fn release_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<Lease, LeaseError> {
        self.inner.release_lease(lease_key, fence)
    }
}

struct Harness {
    _dir: tempfile::TempDir,
    source: MemorySource,
    leases: Arc<CheckingLeases>,
    handler: Arc<RecordingHandler>,
    clock: Arc<ManualClock>,
}

impl Harness {
    fn new(shards: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let source = MemorySource::new("events", shards);
        let handler = Arc::new(RecordingHandler::new());
        let leases = Arc::new(CheckingLeases {
            inner: LocalLeaseStore::open(dir.path().join("leases.json")).unwrap(),
            handler: handler.clone(),
            source: source.clone(),
            violations: Mutex::default(),
            checkpoints: Mutex::default(),
            engine_stored: Mutex::default(),
        });
        Self {
            _dir: dir,
            source,
            leases,
            handler,
            clock: Arc::new(ManualClock::new(1_700_000_000_000)),
        }
    }

    fn receiver(&self, config: ReceiverConfig, resume_after: HashMap<Arc<str>, Position>) -> Receiver {
        self.leases
            .engine_stored
            .lock()
            .unwrap()
            .extend(resume_after.iter().map(|(k, v)| (k.to_string(), v.clone())));
        Receiver::new(
            config,
            Arc::new(self.source.clone()),
            self.leases.clone(),
            self.handler.clone(),
            self.clock.clone(),
            3,
            resume_after,
        )
        .unwrap()
    }

    /// Moves the manual clock in small steps until `predicate` holds (real time only bounds the
    /// wait between steps; the test's outcome never depends on it).
    fn drive(&self, receiver: &Receiver, mut predicate: impl FnMut(&ReceiverStatus) -> bool) {
        for _ in 0..4_000 {
            if receiver.wait_for(Duration::from_millis(5), &mut predicate) {
                return;
            }
            self.clock.advance_ms(50);
        }
        panic!("condition never held: {:?}", receiver.status());
    }

    fn put(&self, shard: &str, n: usize) -> Vec<Position> {
        (0..n)
            .map(|i| self.source.put(shard, &format!("k{i}"), format!("{shard}:{i}")))
            .collect()
    }

    fn stored(&self) -> Vec<(u64, Record)> {
        self.handler
            .blocks()
            .iter()
            .flat_map(|b: &Block| {
                let seq = b.id().seq;
                b.records().unwrap().into_iter().map(move |r| (seq, r))
            })
            .collect()
    }

    fn leases_by_key(&self) -> BTreeMap<String, Lease> {
        self.leases
            .list_leases()
            .unwrap()
            .into_iter()
            .map(|l| (l.lease_key.clone(), l))
            .collect()
    }
}

fn config() -> ReceiverConfig {
    ReceiverConfig {
        worker_id: Some("worker-1".into()),
        push_retry_backoff_ms: 0,
        max_block_records: 50,
        restart_delay_ms: 100,
        ..ReceiverConfig::default()
    }
}

/// Stored positions per shard, asserting no duplicates and that every block's ranges describe
/// exactly its records.
fn check_exactly_once(h: &Harness) -> BTreeMap<String, Vec<Position>> {
    for block in h.handler.blocks() {
        let records = block.records().unwrap();
        let ranges = &block.meta().ranges;
        assert_eq!(ranges.record_count(), records.len() as u64, "{}", block.id());
        // Each range covers exactly its run of the block's records (a shard may have several
        // ranges in one block, one per page read, in order).
        let mut rest = records.as_slice();
        for range in ranges {
            let (run, tail) = rest.split_at(range.record_count as usize);
            assert!(run.iter().all(|r| r.shard_id == range.shard_id));
            assert_eq!(run.first().unwrap().position, range.from);
            assert_eq!(run.last().unwrap().position, range.to);
            rest = tail;
        }
    }
    let mut per_shard: BTreeMap<String, Vec<Position>> = BTreeMap::new();
    for (_, r) in h.stored() {
        per_shard.entry(r.shard_id.to_string()).or_default().push(r.position);
    }
    for (shard, positions) in &per_shard {
        let expected: Vec<Position> = h.source.records(shard).into_iter().map(|r| r.position).collect();
        assert_eq!(
            positions, &expected,
            "shard {shard}: every record exactly once, in order"
        );
    }
    per_shard
}

#[test]
fn every_record_is_stored_once_through_retryable_source_errors() {
    let h = Harness::new(3);
    for i in 0..3 {
        h.put(&format!("shardId-00000000000{i}"), 400);
    }
    h.source.fail_next(Some(SHARD0), 2, SourceFault::Throttled);
    h.source.fail_next(None, 3, SourceFault::IteratorExpired);
    h.source
        .fail_next(Some("shardId-000000000002"), 2, SourceFault::Unavailable);
    let mut cfg = config();
    cfg.queue_capacity = 2;
    let receiver = h.receiver(cfg, HashMap::new());
    receiver.start().unwrap();
    h.drive(&receiver, |s| s.caught_up);
    let status = receiver.status();
    assert_eq!(status.records_stored, 1_200);
    assert_eq!(status.records_received, 1_200);
    assert!(receiver.metrics().source_throttles >= 2);
    // Iterator expiry and unavailability reopened readers after the last record read.
    assert!(h.source.opened().len() >= 3 + 3, "{:?}", h.source.opened());
    receiver.stop(StopMode::Graceful).unwrap();

    let per_shard = check_exactly_once(&h);
    assert_eq!(per_shard.values().map(Vec::len).sum::<usize>(), 1_200);
    for (key, lease) in h.leases_by_key() {
        assert_eq!(lease.lease_owner, None);
        assert_eq!(
            lease.checkpoint,
            Checkpoint::Position(per_shard[&key].last().unwrap().clone())
        );
    }
    assert_eq!(h.leases.violations(), Vec::<String>::new());
}

#[test]
fn handler_failures_never_advance_checkpoints() {
    let h = Harness::new(1);
    h.put(SHARD0, 300);
    // The first block fails all 4 attempts (receiver restarts), later a single failure is retried.
    h.handler.script([HandlerAction::FailRetryable; 4]);
    let receiver = h.receiver(config(), HashMap::new());
    receiver.start().unwrap();
    h.drive(&receiver, |s| s.state == ReceiverState::Restarting);
    assert_eq!(h.leases_by_key()[SHARD0].checkpoint, Checkpoint::TrimHorizon);
    h.drive(&receiver, |s| s.caught_up);
    h.handler.script([HandlerAction::FailRetryable]);
    h.put(SHARD0, 100);
    h.drive(&receiver, |s| s.caught_up && s.records_stored >= 400);
    receiver.stop(StopMode::Graceful).unwrap();
    check_exactly_once(&h);
    assert_eq!(h.leases.violations(), Vec::<String>::new());
    assert!(!h.leases.checkpoints.lock().unwrap().is_empty());
    assert_eq!(
        h.leases_by_key()[SHARD0].checkpoint,
        Checkpoint::Position(h.source.records(SHARD0).last().unwrap().position.clone())
    );
}

#[test]
fn a_graceful_stop_drains_the_unsealed_buffer_into_the_handler() {
    let h = Harness::new(1);
    let positions = h.put(SHARD0, 30);
    // Blocks would only be sealed after a minute, or at 10 000 records: nothing seals by itself.
    let mut cfg = config();
    cfg.block_interval_ms = 60_000;
    cfg.max_block_records = 10_000;
    let receiver = h.receiver(cfg, HashMap::new());
    receiver.start().unwrap();
    // Wait in real time (the clock stands still) for the records to be read into the buffer.
    assert!(receiver.wait_for(Duration::from_secs(20), |s| s.records_received == 30));
    assert!(h.handler.blocks().is_empty(), "nothing sealed before stop");
    assert!(!receiver.status().caught_up, "read but not stored is not caught up");
    receiver.stop(StopMode::Graceful).unwrap();
    assert_eq!(receiver.status().state, ReceiverState::Stopped);
    assert_eq!(h.handler.blocks().len(), 1);
    check_exactly_once(&h);
    let lease = &h.leases_by_key()[SHARD0];
    assert_eq!(lease.checkpoint, Checkpoint::Position(positions[29].clone()));
    assert_eq!(lease.lease_owner, None);
    assert_eq!(h.leases.violations(), Vec::<String>::new());
}

#[test]
fn children_are_read_only_after_every_parent_is_stored_to_its_end() {
    let h = Harness::new(2);
    h.put(SHARD0, 120);
    h.put("shardId-000000000001", 80);
    // Shard 0 is split before the receiver starts: its children already hold records.
    let [left, right] = h.source.split(SHARD0);
    h.put(&left, 40);
    h.put(&right, 40);
    let receiver = h.receiver(config(), HashMap::new());
    receiver.start().unwrap();
    h.drive(&receiver, |s| s.caught_up && s.records_stored == 280);
    // Shard 1 is split while it is being read.
    let [low, high] = h.source.split("shardId-000000000001");
    h.put(&low, 25);
    h.put(&high, 25);
    h.drive(&receiver, |s| s.caught_up && s.records_stored == 330);
    receiver.stop(StopMode::Graceful).unwrap();

    check_exactly_once(&h);
    assert_eq!(h.leases.violations(), Vec::<String>::new());
    let stored = h.stored();
    let blocks_of = |shard: &str| -> Vec<u64> {
        stored
            .iter()
            .filter(|(_, r)| &*r.shard_id == shard)
            .map(|(seq, _)| *seq)
            .collect()
    };
    let leases = h.leases_by_key();
    for (parent, children) in [(SHARD0, [&left, &right]), ("shardId-000000000001", [&low, &high])] {
        let parent_end = h.source.end_reported(parent).expect("parent read to its end");
        assert_eq!(leases[parent].checkpoint, Checkpoint::ShardEnd);
        assert_eq!(leases[parent].child_shard_ids.len(), 2);
        for child in children {
            for opened in h.source.opened().iter().filter(|o| o.shard_id == *child) {
                assert!(
                    opened.reads_before >= parent_end,
                    "{child} opened before {parent} ended"
                );
            }
            assert!(h.source.first_record_read(child).unwrap() > parent_end);
            assert!(blocks_of(child).iter().min() > blocks_of(parent).iter().max());
            assert!(leases[&**child].parent_shard_ids.iter().eq([parent]));
        }
    }
}

#[test]
fn resume_after_wins_over_the_initial_position_and_is_exclusive() {
    let h = Harness::new(2);
    let positions = h.put(SHARD0, 100);
    h.put("shardId-000000000001", 10);
    let resume = HashMap::from([(Arc::<str>::from(SHARD0), positions[39].clone())]);
    let receiver = h.receiver(config(), resume);
    receiver.start().unwrap();
    h.drive(&receiver, |s| s.caught_up);
    receiver.stop(StopMode::Graceful).unwrap();
    let opened = h.source.opened();
    let first_open = opened.iter().find(|o| &*o.shard_id == SHARD0).unwrap();
    assert_eq!(first_open.start, StartingPosition::AfterPosition(positions[39].clone()));
    let stored: Vec<Position> = h
        .stored()
        .into_iter()
        .filter(|(_, r)| &*r.shard_id == SHARD0)
        .map(|(_, r)| r.position)
        .collect();
    assert_eq!(stored, positions[40..].to_vec());
    // The shard without a resume position starts at the configured initial position.
    assert!(
        opened
            .iter()
            .any(|o| &*o.shard_id == "shardId-000000000001" && o.start == StartingPosition::TrimHorizon)
    );
    assert_eq!(h.leases.violations(), Vec::<String>::new());
}

#[test]
fn read_max_records_overrides_the_source_page_size() {
    let h = Harness::new(1);
    h.put(SHARD0, 50);
    let mut cfg = config();
    cfg.read_max_records = Some(7);
    cfg.idle_poll_ms = Some(1);
    let receiver = h.receiver(cfg, HashMap::new());
    receiver.start().unwrap();
    h.drive(&receiver, |s| s.caught_up);
    receiver.stop(StopMode::Graceful).unwrap();
    let (reads, served) = h.source.reads();
    assert_eq!(served, 50);
    assert!(reads >= 8, "50 records in pages of at most 7 need 8 reads, got {reads}");
    check_exactly_once(&h);

    let invalid = ReceiverConfig {
        read_max_records: Some(0),
        ..ReceiverConfig::default()
    };
    assert!(invalid.validate().unwrap_err().to_string().contains("read_max_records"));
}
