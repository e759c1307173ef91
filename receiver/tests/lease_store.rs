//! The lease-store conformance suite against the local file store, plus what only a file store
//! has: persistence across reopening and several handles (processes) on one table.

use std::sync::Arc;

use sluice_blockstore::{Position, SequenceNumber};
use sluice_receiver::testing::{MemoryLeaseStore, lease_store_conformance};
use sluice_receiver::{Checkpoint, Lease, LeaseError, LeaseStore, LocalLeaseStore};

#[test]
fn local_lease_store_passes_the_conformance_suite() {
    let dir = tempfile::tempdir().unwrap();
    let next = std::sync::atomic::AtomicU32::new(0);
    lease_store_conformance(&|| {
        let n = next.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Arc::new(LocalLeaseStore::open(dir.path().join(format!("table-{n}/leases.json"))).unwrap())
    });
}

#[test]
fn the_memory_test_double_passes_the_conformance_suite() {
    lease_store_conformance(&|| Arc::new(MemoryLeaseStore::new()));
}

fn position(n: u128, sub: u64) -> Checkpoint {
    Checkpoint::Position(Position::new(SequenceNumber::from_u128(n), sub))
}

#[test]
fn the_table_survives_reopening_and_reads_like_the_kcl_schema() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.json");
    {
        let store = LocalLeaseStore::open(&path).unwrap();
        let mut lease = Lease::new("shardId-000000000002", Checkpoint::TrimHorizon);
        lease.parent_shard_ids.insert("shardId-000000000000".into());
        lease.hash_key_range = Some((0, u128::MAX));
        store.create_lease_if_absent(&lease).unwrap();
        let held = store.take_lease("shardId-000000000002", 0, "host-a").unwrap();
        store
            .checkpoint("shardId-000000000002", &held.fence().unwrap(), &position(77, 2))
            .unwrap();
    }
    let text = std::fs::read_to_string(&path).unwrap();
    for attribute in [
        "\"leaseKey\"",
        "\"leaseOwner\": \"host-a\"",
        "\"leaseCounter\": 2",
        "\"checkpoint\": \"77\"",
        "\"checkpointSubSequenceNumber\": 2",
        "\"ownerSwitchesSinceCheckpoint\": 0",
        "\"parentShardId\"",
        "\"childShardIds\"",
        "\"startingHashKey\": \"0\"",
        "\"endingHashKey\": \"340282366920938463463374607431768211455\"",
    ] {
        assert!(text.contains(attribute), "missing {attribute} in {text}");
    }
    let reopened = LocalLeaseStore::open(&path).unwrap();
    let lease = reopened.get_lease("shardId-000000000002").unwrap().unwrap();
    assert_eq!(lease.checkpoint, position(77, 2));
    assert_eq!(lease.lease_counter, 2);
    assert_eq!(lease.hash_key_range, Some((0, u128::MAX)));
}

#[test]
fn two_handles_on_one_file_see_and_fence_each_other() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.json");
    let a = LocalLeaseStore::open(&path).unwrap();
    let b = LocalLeaseStore::open(&path).unwrap();
    a.create_lease_if_absent(&Lease::new("s", Checkpoint::TrimHorizon))
        .unwrap();
    assert!(!b.create_lease_if_absent(&Lease::new("s", Checkpoint::Latest)).unwrap());
    let held_by_a = a.take_lease("s", 0, "worker-a").unwrap();
    let stolen = b.take_lease("s", held_by_a.lease_counter, "worker-b").unwrap();
    let err = a
        .checkpoint("s", &held_by_a.fence().unwrap(), &position(5, 0))
        .unwrap_err();
    assert!(err.is_lease_lost(), "{err}");
    b.checkpoint("s", &stolen.fence().unwrap(), &position(5, 0)).unwrap();
    assert_eq!(a.get_lease("s").unwrap().unwrap().checkpoint, position(5, 0));
}

#[test]
fn a_corrupt_table_is_reported_not_reset() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("leases.json");
    std::fs::write(&path, b"{ not json").unwrap();
    assert!(matches!(LocalLeaseStore::open(&path), Err(LeaseError::Corrupt { .. })));
    assert_eq!(std::fs::read(&path).unwrap(), b"{ not json", "left untouched");
}
