//! The receiver end to end over the embedded local log, on a manual clock: every record is
//! stored exactly once (or again after a failure, never skipped), checkpoints follow stored
//! blocks only, children start after their parents, leases are fenced.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use sluice_blockstore::{Block, ManualClock, Position, Record};
use sluice_receiver::local_log::{LocalLog, LocalStream};
use sluice_receiver::testing::{HandlerAction, RecordingHandler};
use sluice_receiver::{
    Checkpoint, GeneratorError, LeaseStore, LocalLeaseStore, Receiver, ReceiverConfig, ReceiverError, ReceiverState,
    ReceiverStatus, StopMode,
};

const STREAM: &str = "events";

struct Harness {
    _dir: tempfile::TempDir,
    stream: LocalStream,
    leases: Arc<LocalLeaseStore>,
    handler: Arc<RecordingHandler>,
    clock: Arc<ManualClock>,
}

impl Harness {
    fn new(shards: u32) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let log = LocalLog::open(dir.path().join("log")).unwrap();
        let stream = log.create_stream(STREAM, shards).unwrap();
        let leases = Arc::new(LocalLeaseStore::open(dir.path().join("leases.json")).unwrap());
        Self {
            _dir: dir,
            stream,
            leases,
            handler: Arc::new(RecordingHandler::new()),
            clock: Arc::new(ManualClock::new(1_700_000_000_000)),
        }
    }

    fn receiver(&self, config: ReceiverConfig, resume_after: HashMap<Arc<str>, Position>) -> Receiver {
        Receiver::new(
            config,
            Arc::new(self.stream.clone()),
            self.leases.clone(),
            self.handler.clone(),
            self.clock.clone(),
            7,
            resume_after,
        )
        .unwrap()
    }

    /// Moves the manual clock in small steps until `predicate` holds.
    fn drive(&self, receiver: &Receiver, mut predicate: impl FnMut(&ReceiverStatus) -> bool) {
        for _ in 0..3_000 {
            if receiver.wait_for(Duration::from_millis(5), &mut predicate) {
                return;
            }
            self.clock.advance_ms(50);
        }
        panic!("condition never held: {:?}", receiver.status());
    }

    /// Puts `n` records with keys `k0..k9` and payload `key:i`, numbered from `first`.
    fn put(&self, first: usize, n: usize) -> Vec<Position> {
        let mut producer = self.stream.producer().unwrap();
        let positions = (first..first + n)
            .map(|i| {
                let key = format!("k{}", i % 10);
                producer.put(&key, Bytes::from(format!("{key}:{i}"))).unwrap()
            })
            .collect();
        producer.flush().unwrap();
        positions
    }

    fn stored(&self) -> Vec<(u64, Record)> {
        stored_records(&self.handler.blocks())
    }
}

fn config() -> ReceiverConfig {
    ReceiverConfig {
        worker_id: Some("worker-1".into()),
        push_retry_backoff_ms: 0,
        max_block_records: 64,
        ..ReceiverConfig::default()
    }
}

fn stored_records(blocks: &[Block]) -> Vec<(u64, Record)> {
    blocks
        .iter()
        .flat_map(|b| {
            let seq = b.id().seq;
            b.records().unwrap().into_iter().map(move |r| (seq, r))
        })
        .collect()
}

fn payloads(records: &[(u64, Record)]) -> Vec<String> {
    records
        .iter()
        .map(|(_, r)| String::from_utf8(r.data.to_vec()).unwrap())
        .collect()
}

fn index_of(payload: &str) -> usize {
    payload.split(':').nth(1).unwrap().parse().unwrap()
}

#[test]
fn reads_every_record_once_and_checkpoints_only_stored_positions() {
    let h = Harness::new(2);
    let positions = h.put(0, 500);
    let receiver = h.receiver(config(), HashMap::new());
    receiver.start().unwrap();
    h.drive(&receiver, |s| s.caught_up);
    let status = receiver.status();
    assert_eq!(status.state, ReceiverState::Running);
    assert_eq!(status.owned_shards.len(), 2);
    assert_eq!(status.records_stored, 500);

    let stored = h.stored();
    let mut indexes: Vec<usize> = payloads(&stored).iter().map(|p| index_of(p)).collect();
    indexes.sort_unstable();
    assert_eq!(indexes, (0..500).collect::<Vec<_>>(), "every record exactly once");
    assert!(h.handler.blocks().iter().all(|b| b.len() <= 64));
    for block in h.handler.blocks() {
        assert_eq!(block.id().input_id, 0);
        assert_eq!(block.id().run_id, 7);
    }

    receiver.stop(StopMode::Graceful).unwrap();
    assert_eq!(receiver.status().state, ReceiverState::Stopped);
    // The final checkpoint of each shard is its last record, and the leases are released.
    let mut last_per_shard: BTreeMap<String, Position> = BTreeMap::new();
    for (_, r) in &stored {
        last_per_shard.insert(r.shard_id.to_string(), r.position.clone());
    }
    for lease in h.leases.list_leases().unwrap() {
        assert_eq!(lease.lease_owner, None, "released at stop");
        assert_eq!(
            lease.checkpoint,
            Checkpoint::Position(last_per_shard[&lease.lease_key].clone()),
            "checkpoint of {}",
            lease.lease_key
        );
    }
    assert!(positions.iter().all(|p| last_per_shard.values().any(|l| l >= p)));
    let metrics = receiver.metrics();
    assert_eq!(metrics.records_received, 500);
    assert_eq!(metrics.blocks_pushed, h.handler.blocks().len() as u64);
    assert!(metrics.checkpoint_successes >= 2);
    assert_eq!(metrics.shards.len(), 2);
    assert_eq!(metrics.shards.values().map(|s| s.records_received).sum::<u64>(), 500);
}

#[test]
fn a_restart_after_a_failed_store_rereads_what_was_not_stored() {
    let h = Harness::new(1);
    h.put(0, 200);
    // Every attempt at the first block fails: the generator gives up and the receiver restarts.
    h.handler.script([HandlerAction::FailRetryable; 4]);
    let receiver = h.receiver(config(), HashMap::new());
    receiver.start().unwrap();
    h.drive(&receiver, |s| s.state == ReceiverState::Restarting);
    // Nothing was stored, so nothing was checkpointed; the lease was released for the restart.
    let lease = &h.leases.list_leases().unwrap()[0];
    assert_eq!(lease.checkpoint, Checkpoint::TrimHorizon);
    assert_eq!(lease.lease_owner, None);
    assert!(receiver.status().last_error.is_some());
    h.drive(&receiver, |s| s.caught_up);
    let status = receiver.status();
    assert_eq!(status.restarts, 1);
    assert!(status.failed.is_none(), "{status:?}");
    let mut indexes: Vec<usize> = payloads(&h.stored()).iter().map(|p| index_of(p)).collect();
    indexes.sort_unstable();
    assert_eq!(
        indexes,
        (0..200).collect::<Vec<_>>(),
        "the failed block's records come back"
    );
    assert_eq!(receiver.metrics().push_retries, 3);
    receiver.stop(StopMode::Graceful).unwrap();
}

#[test]
fn a_permanent_store_failure_fails_the_receiver_without_advancing_checkpoints() {
    let h = Harness::new(1);
    h.put(0, 10);
    h.handler.script([HandlerAction::FailPermanently]);
    let receiver = h.receiver(config(), HashMap::new());
    receiver.start().unwrap();
    h.drive(&receiver, |s| s.state == ReceiverState::Failed);
    let status = receiver.status();
    let failed = status.failed.as_deref().expect("failed");
    let ReceiverError::Generator(GeneratorError::StoreFailed { source, .. }) = failed else {
        panic!("the store failure is kept as a typed cause: {status:?}")
    };
    assert!(
        !source.is_retryable() && source.message().contains("permanent"),
        "{source}"
    );
    assert_eq!(
        failed.class(),
        sluice_blockstore::ErrorClass::permanent(sluice_blockstore::Domain::Storage),
        "the receiver's failure has its handler's class"
    );
    assert!(!status.caught_up);
    assert_eq!(h.leases.list_leases().unwrap()[0].checkpoint, Checkpoint::TrimHorizon);
    receiver.stop(StopMode::Graceful).unwrap();
    assert_eq!(receiver.status().state, ReceiverState::Failed);
}

#[test]
fn resharding_while_reading_keeps_key_order_and_starts_children_after_parents() {
    let h = Harness::new(1);
    let receiver = h.receiver(config(), HashMap::new());
    receiver.start().unwrap();
    h.put(0, 300);
    h.drive(&receiver, |s| s.caught_up && s.records_stored == 300);

    let mut producer = h.stream.producer().unwrap();
    let (low, high) = producer.split_shard("shardId-000000000000", 1u128 << 127).unwrap();
    drop(producer);
    h.put(300, 300);
    h.drive(&receiver, |s| s.caught_up && s.records_stored == 600);

    let mut producer = h.stream.producer().unwrap();
    let merged = producer.merge_shards(&low, &high).unwrap();
    drop(producer);
    h.put(600, 300);
    h.drive(&receiver, |s| s.caught_up && s.records_stored == 900);
    receiver.stop(StopMode::Graceful).unwrap();

    let stored = h.stored();
    // Per partition key, records come out in the order they were put.
    let mut per_key: HashMap<String, Vec<usize>> = HashMap::new();
    for p in payloads(&stored) {
        per_key
            .entry(p.split(':').next().unwrap().to_owned())
            .or_default()
            .push(index_of(&p));
    }
    assert_eq!(per_key.values().map(Vec::len).sum::<usize>(), 900, "each record once");
    for (key, indexes) in &per_key {
        assert!(
            indexes.windows(2).all(|w| w[0] < w[1]),
            "key {key} out of order: {indexes:?}"
        );
    }
    // A child's first block comes after its parents' last block.
    let blocks_of = |shard: &str| -> Vec<u64> {
        stored
            .iter()
            .filter(|(_, r)| &*r.shard_id == shard)
            .map(|(seq, _)| *seq)
            .collect()
    };
    let parent = blocks_of("shardId-000000000000");
    for child in [&low, &high] {
        let child_blocks = blocks_of(child);
        assert!(!child_blocks.is_empty());
        assert!(child_blocks.iter().min() > parent.iter().max());
        let merged_blocks = blocks_of(&merged);
        assert!(merged_blocks.iter().min() > child_blocks.iter().max());
    }
    // The lease table shows the lineage and SHARD_END for every closed shard.
    let leases: HashMap<String, _> = h
        .leases
        .list_leases()
        .unwrap()
        .into_iter()
        .map(|l| (l.lease_key.clone(), l))
        .collect();
    let root = &leases["shardId-000000000000"];
    assert_eq!(root.checkpoint, Checkpoint::ShardEnd);
    assert_eq!(root.child_shard_ids.len(), 2);
    assert_eq!(leases[&*low].checkpoint, Checkpoint::ShardEnd);
    assert_eq!(leases[&*high].checkpoint, Checkpoint::ShardEnd);
    assert_eq!(leases[&*merged].parent_shard_ids.len(), 2);
    assert!(matches!(leases[&*merged].checkpoint, Checkpoint::Position(_)));
}

#[test]
fn resume_after_starts_strictly_after_the_engine_position() {
    let h = Harness::new(1);
    let positions = h.put(0, 100);
    let resume: HashMap<Arc<str>, Position> =
        HashMap::from([(Arc::from("shardId-000000000000"), positions[49].clone())]);
    let receiver = h.receiver(config(), resume);
    receiver.start().unwrap();
    h.drive(&receiver, |s| s.caught_up);
    receiver.stop(StopMode::Graceful).unwrap();
    let indexes: Vec<usize> = payloads(&h.stored()).iter().map(|p| index_of(p)).collect();
    assert_eq!(indexes, (50..100).collect::<Vec<_>>());
}

#[test]
fn a_stolen_lease_stops_the_shard_and_its_old_owner_writes_nothing() {
    let h = Harness::new(1);
    h.put(0, 20);
    let config = ReceiverConfig {
        lease_failover_ms: 3_000,
        ..config()
    };
    let receiver = h.receiver(config, HashMap::new());
    receiver.start().unwrap();
    h.drive(&receiver, |s| s.caught_up);
    // Another worker steals the lease with the counter it observed; if the owner wrote in
    // between (a renewal or checkpoint bumps the counter), the take is refused and it retries.
    let (lease, stolen) = loop {
        let lease = h.leases.list_leases().unwrap().remove(0);
        match h.leases.take_lease(&lease.lease_key, lease.lease_counter, "worker-2") {
            Ok(stolen) => break (lease, stolen),
            Err(e) => assert!(e.is_lease_lost(), "{e}"),
        }
    };
    h.drive(&receiver, |s| s.owned_shards.is_empty());
    let after = h.leases.get_lease(&lease.lease_key).unwrap().unwrap();
    assert_eq!(after.lease_owner.as_deref(), Some("worker-2"));
    assert_eq!(after, stolen, "the old owner wrote nothing after losing the lease");
    assert_eq!(receiver.metrics().leases_lost, 1);
    receiver.stop(StopMode::Graceful).unwrap();
    assert_eq!(
        h.leases.get_lease(&lease.lease_key).unwrap().unwrap(),
        stolen,
        "stop does not release a lease it no longer holds"
    );
}

#[test]
fn the_rate_limit_paces_reads_and_can_change_at_run_time() {
    let h = Harness::new(1);
    h.put(0, 300);
    let config = ReceiverConfig {
        max_rate: Some(100.0),
        ..config()
    };
    let receiver = h.receiver(config, HashMap::new());
    let start_ms = sluice_blockstore::Clock::now_ms(&*h.clock);
    receiver.start().unwrap();
    h.drive(&receiver, |s| s.caught_up);
    let elapsed = sluice_blockstore::Clock::now_ms(&*h.clock) - start_ms;
    assert!(
        elapsed >= 2_000,
        "300 records at 100/s take at least 2 s of clock time, took {elapsed}"
    );
    let metrics = receiver.metrics();
    assert!(metrics.rate_limit_throttles >= 2, "{metrics:?}");
    assert_eq!(metrics.rate_limit, Some(100.0));
    receiver.set_max_rate(Some(40.0));
    assert_eq!(receiver.metrics().rate_limit, Some(40.0));
    receiver.set_max_rate(Some(1_000.0));
    assert_eq!(receiver.metrics().rate_limit, Some(100.0), "capped at max_rate");
    receiver.stop(StopMode::Graceful).unwrap();
    assert_eq!(payloads(&h.stored()).len(), 300);
}

#[test]
fn start_returns_at_once_and_a_second_start_is_refused() {
    let h = Harness::new(1);
    // The handler is stalled: reading and storing cannot make progress, start must not care.
    h.handler.stall();
    h.put(0, 5);
    let receiver = h.receiver(config(), HashMap::new());
    receiver.start().unwrap();
    assert!(receiver.start().is_err());
    h.handler.resume();
    h.drive(&receiver, |s| s.caught_up);
    receiver.stop(StopMode::Graceful).unwrap();
}
