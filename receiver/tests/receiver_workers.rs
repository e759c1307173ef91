//! Receivers in engine mode (`Receiver::with_workers`): the `WorkerDirectory` contract.
//!
//! - a worker above its share hands shards back at exactly its last stored position, and the
//!   worker that takes them reads on from there: every record is stored once, by one of them;
//! - a registered worker's shard lease is never taken by expiry, however old;
//! - `adopt` takes a dead worker's shard with the checkpoint raised to where its log ends, and
//!   reading starts right after it.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_blockstore::{Block, SystemClock};
use sluice_receiver::testing::{MemoryLeaseStore, MemorySource, RecordingHandler};
use sluice_receiver::{
    Checkpoint, Lease, LeaseStore, Receiver, ReceiverConfig, StopMode, WorkerDirectory, WorkerStatus,
};

const SHARDS: u32 = 4;

/// A directory the test controls.
#[derive(Debug, Default)]
struct Directory {
    live: Mutex<Vec<String>>,
    registered: Mutex<BTreeSet<String>>,
}

impl Directory {
    fn set(&self, live: &[&str], registered: &[&str]) {
        *self.live.lock().unwrap() = live.iter().map(|s| (*s).to_owned()).collect();
        *self.registered.lock().unwrap() = registered.iter().map(|s| (*s).to_owned()).collect();
    }
}

impl WorkerDirectory for Directory {
    fn live_workers(&self) -> Vec<String> {
        self.live.lock().unwrap().clone()
    }
    fn worker_status(&self, worker_id: &str) -> WorkerStatus {
        if self.registered.lock().unwrap().contains(worker_id) {
            WorkerStatus::Active
        } else {
            WorkerStatus::Unregistered
        }
    }
}

fn config(worker: &str) -> ReceiverConfig {
    ReceiverConfig {
        worker_id: Some(worker.into()),
        block_interval_ms: 10,
        checkpoint_interval_ms: 20,
        lease_failover_ms: 300,
        lease_taker_interval_ms: 20,
        ..ReceiverConfig::default()
    }
}

fn start(
    worker: &str,
    source: &MemorySource,
    leases: &Arc<MemoryLeaseStore>,
    directory: &Arc<Directory>,
) -> (Receiver, Arc<RecordingHandler>) {
    let handler = Arc::new(RecordingHandler::new());
    let receiver = Receiver::new(
        config(worker),
        Arc::new(source.clone()),
        leases.clone(),
        handler.clone(),
        Arc::new(SystemClock),
        1,
        HashMap::new(),
    )
    .unwrap()
    .with_workers(directory.clone());
    receiver.start().unwrap();
    (receiver, handler)
}

fn payloads(blocks: &[Block]) -> Vec<String> {
    blocks
        .iter()
        .flat_map(|b| b.records().unwrap())
        .map(|r| String::from_utf8(r.data.to_vec()).unwrap())
        .collect()
}

fn wait(what: &str, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn put(source: &MemorySource, from: u32, to: u32) {
    for i in from..to {
        source.put(&format!("shardId-{:012}", i % SHARDS), &i.to_string(), format!("r{i}"));
    }
}

#[test]
fn shards_handed_back_above_the_share_are_read_on_exactly_where_they_stopped() {
    let source = MemorySource::new("s", SHARDS);
    let leases = Arc::new(MemoryLeaseStore::new());
    let directory = Arc::new(Directory::default());
    directory.set(&["a"], &["a"]);
    put(&source, 0, 400);
    let (a, handler_a) = start("a", &source, &leases, &directory);
    wait("a to hold every shard", || {
        a.status().owned_shards.len() == SHARDS as usize
    });
    put(&source, 400, 800);
    // b joins: a's share drops to 2; it hands two shards back, b takes them.
    directory.set(&["a", "b"], &["a", "b"]);
    let (b, handler_b) = start("b", &source, &leases, &directory);
    wait("a 2/2 split", || {
        a.status().owned_shards.len() == 2 && b.status().owned_shards.len() == 2
    });
    put(&source, 800, 1_200);
    wait("every record to be stored", || {
        payloads(&handler_a.blocks()).len() + payloads(&handler_b.blocks()).len() >= 1_200
    });
    std::thread::sleep(Duration::from_millis(100));
    let mut all = payloads(&handler_a.blocks());
    all.extend(payloads(&handler_b.blocks()));
    let distinct: BTreeSet<&String> = all.iter().collect();
    assert_eq!(all.len(), 1_200, "every record stored exactly once");
    assert_eq!(distinct.len(), 1_200);
    assert!(a.metrics().leases_released >= 2, "{:?}", a.metrics());
    b.stop(StopMode::Graceful).unwrap();
    a.stop(StopMode::Graceful).unwrap();
}

#[test]
fn a_registered_workers_shard_moves_only_by_adoption_and_at_its_logs_end() {
    let source = MemorySource::new("s", 1);
    let shard = "shardId-000000000000";
    for i in 0..30 {
        source.put(shard, &i.to_string(), format!("r{i}"));
    }
    let records = source.records(shard);
    let leases = Arc::new(MemoryLeaseStore::new());
    // A dead worker "ghost" owns the shard, checkpointed at record 9; its log reaches record 19.
    leases
        .create_lease_if_absent(&Lease::new(shard, Checkpoint::TrimHorizon))
        .unwrap();
    let held = leases.take_lease(shard, 0, "ghost").unwrap();
    leases
        .checkpoint(
            shard,
            &held.fence().unwrap(),
            &Checkpoint::Position(records[9].position.clone()),
        )
        .unwrap();
    let directory = Arc::new(Directory::default());
    directory.set(&["b"], &["b", "ghost"]);
    let (b, handler) = start("b", &source, &leases, &directory);
    // Far beyond the failover time: b must not take it by expiry.
    std::thread::sleep(Duration::from_millis(900));
    assert!(b.status().owned_shards.is_empty(), "{:?}", b.status());
    assert_eq!(
        leases.get_lease(shard).unwrap().unwrap().lease_owner.as_deref(),
        Some("ghost")
    );
    // The adopter of ghost's log hands over the log's end.
    b.adopt(
        "ghost",
        HashMap::from([(Arc::from(shard), records[19].position.clone())]),
    );
    wait("b to adopt the shard and read it", || {
        !b.is_adopting("ghost") && payloads(&handler.blocks()).len() >= 10
    });
    std::thread::sleep(Duration::from_millis(100));
    let got = payloads(&handler.blocks());
    let want: Vec<String> = (20..30).map(|i| format!("r{i}")).collect();
    assert_eq!(got, want, "b reads right after the adopted log's end, nothing before");
    b.stop(StopMode::Graceful).unwrap();
    let lease = leases.get_lease(shard).unwrap().unwrap();
    assert_eq!(lease.checkpoint, Checkpoint::Position(records[29].position.clone()));
    assert_eq!(lease.lease_owner, None, "released after an exact final checkpoint");
}
