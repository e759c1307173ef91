//! How the block store behaves at its limits: a full memory budget, a block bigger than the
//! budget, a full disk, an unreachable replica, tier read errors, restarts with leftovers, cleanup.

use std::collections::HashMap;
use std::io::ErrorKind;
use std::sync::Arc;

use sluice_blockstore::testing::{FaultyTier, sample_block, sample_records};
use sluice_blockstore::{
    Block, BlockStore, BlockStoreConfig, BlockStoreTiers, BlockTier, DiskSync, DiskTier, Error, ManualClock,
    MemoryTier, ReplicaTier, SharedClock, StorageLevel,
};

const START_MS: i64 = 1_700_000_000_000;

fn block(seq: u64, records: usize, payload: usize) -> Block {
    sample_block(
        seq,
        &sample_records("shard-0", u128::from(seq) * 1_000, records, payload),
    )
}

/// A store whose disk and replica tiers can be made to fail.
struct Faulty {
    _dir: tempfile::TempDir,
    store: BlockStore,
    disk: Arc<FaultyTier>,
    replica: Arc<FaultyTier>,
}

fn faulty_store(budget: usize) -> Faulty {
    let dir = tempfile::tempdir().unwrap();
    let clock: SharedClock = Arc::new(ManualClock::new(START_MS));
    let disk = Arc::new(FaultyTier::new(Arc::new(
        DiskTier::open(dir.path().join("blocks"), clock.clone(), DiskSync::Never).unwrap(),
    )));
    let replica_url = format!("file://{}", dir.path().join("replica").display());
    let replica = Arc::new(FaultyTier::new(Arc::new(
        ReplicaTier::open(&replica_url, &HashMap::new()).unwrap(),
    )));
    let store = BlockStore::from_tiers(BlockStoreTiers {
        memory: MemoryTier::new(budget, clock),
        disk: disk.clone(),
        replica: replica.clone(),
    });
    Faulty {
        _dir: dir,
        store,
        disk,
        replica,
    }
}

fn open(dir: &std::path::Path, budget: u64, clock: &Arc<ManualClock>) -> BlockStore {
    let config = BlockStoreConfig {
        memory_budget_bytes: budget,
        disk_sync: DiskSync::Never,
        ..BlockStoreConfig::new(dir)
    };
    BlockStore::open_with_clock(config, clock.clone()).unwrap()
}

#[test]
fn a_full_budget_evicts_lru_and_durable_blocks_stay_readable_from_disk() {
    let one = block(1, 10, 1_000).memory_size();
    let f = faulty_store(3 * one + one / 2);
    let blocks: Vec<Block> = (1..=6).map(|seq| block(seq, 10, 1_000)).collect();
    for b in &blocks {
        f.store.put(b, StorageLevel::MEMORY_AND_DISK).unwrap();
        assert!(f.store.metrics().memory_bytes_in_use <= 3 * one as u64 + one as u64 / 2);
    }
    let metrics = f.store.metrics();
    assert_eq!(metrics.memory_blocks, 3);
    assert_eq!(metrics.evictions, 3);
    assert_eq!(metrics.spilled_to_disk, 0, "disk copies were written at put time");
    assert_eq!(metrics.dropped_on_eviction, 0);
    // The three oldest were evicted; they come from disk (and go back into memory).
    for b in &blocks {
        assert_eq!(f.store.get(b.id()).unwrap().as_ref(), Some(b));
    }
    let metrics = f.store.metrics();
    assert!(metrics.disk_hits >= 3, "{metrics:?}");
    assert!(metrics.recached >= 3, "{metrics:?}");
}

#[test]
fn an_evicted_block_without_a_disk_copy_spills_to_disk() {
    let one = block(1, 10, 1_000).memory_size();
    let f = faulty_store(one + one / 2);
    let a = block(1, 10, 1_000);
    f.store.put(&a, StorageLevel::MEMORY_AND_DISK_2).unwrap();
    // The disk copy is lost; the replica serves the block and it is cached again.
    f.store.disk_tier().remove(a.id()).unwrap();
    f.store.memory_tier().remove_block(a.id());
    assert_eq!(f.store.get(a.id()).unwrap().as_ref(), Some(&a));
    assert_eq!(f.store.metrics().replica_hits, 1);
    assert!(f.store.memory_tier().contains_block(a.id()));
    // Pressure evicts it: its level has disk and no disk copy exists, so it spills.
    f.store.put(&block(2, 10, 1_000), StorageLevel::MEMORY_ONLY).unwrap();
    assert_eq!(f.store.metrics().spilled_to_disk, 1);
    assert!(f.disk.contains(a.id()).unwrap());
}

#[test]
fn memory_only_blocks_are_dropped_on_eviction_and_read_as_missing() {
    let one = block(1, 10, 1_000).memory_size();
    let f = faulty_store(one + one / 2);
    let (a, b) = (block(1, 10, 1_000), block(2, 10, 1_000));
    f.store.put(&a, StorageLevel::MEMORY_ONLY).unwrap();
    f.store.put(&b, StorageLevel::MEMORY_ONLY).unwrap();
    assert_eq!(f.store.metrics().dropped_on_eviction, 1);
    assert_eq!(f.store.get(a.id()).unwrap(), None);
    assert_eq!(f.store.get(b.id()).unwrap(), Some(b));
    assert_eq!(
        f.disk.puts() + f.replica.puts(),
        0,
        "MEMORY_ONLY never touches disk or replica"
    );
}

#[test]
fn a_block_bigger_than_the_budget_skips_memory() {
    let big = block(1, 100, 1_000);
    let f = faulty_store(big.memory_size() / 2);
    f.store.put(&big, StorageLevel::MEMORY_AND_DISK).unwrap();
    let metrics = f.store.metrics();
    assert_eq!((metrics.too_large_for_memory, metrics.dropped_too_large), (1, 0));
    assert_eq!(metrics.memory_bytes_in_use, 0);
    assert_eq!(f.store.get(big.id()).unwrap(), Some(big.clone()));
    assert_eq!(f.store.metrics().disk_hits, 1);

    // At MEMORY_ONLY it is stored nowhere (counted): reading it must replay.
    let big2 = block(2, 100, 1_000);
    f.store.put(&big2, StorageLevel::MEMORY_ONLY).unwrap();
    assert_eq!(f.store.metrics().dropped_too_large, 1);
    assert_eq!(f.store.get(big2.id()).unwrap(), None);
}

#[test]
fn a_full_disk_fails_the_put_with_a_retryable_error_and_caches_nothing() {
    let f = faulty_store(1 << 20);
    let a = block(1, 10, 100);
    f.disk.fail_puts(Some(ErrorKind::StorageFull));
    let err = f.store.put(&a, StorageLevel::MEMORY_AND_DISK).unwrap_err();
    assert!(
        matches!(&err, Error::Io { source, .. } if source.kind() == ErrorKind::StorageFull),
        "{err:?}"
    );
    assert!(err.is_retryable());
    let metrics = f.store.metrics();
    assert_eq!((metrics.blocks_stored, metrics.memory_blocks), (0, 0));
    // MEMORY_ONLY needs no disk.
    f.store.put(&a, StorageLevel::MEMORY_ONLY).unwrap();
    f.store.remove(a.id()).unwrap();
    // Space is freed: the retry succeeds.
    f.disk.fail_puts(None);
    f.store.put(&a, StorageLevel::MEMORY_AND_DISK).unwrap();
    assert_eq!(f.store.get(a.id()).unwrap(), Some(a));
}

#[test]
fn an_unreachable_replica_fails_replicated_puts_only() {
    let f = faulty_store(1 << 20);
    let a = block(1, 10, 100);
    f.replica.fail_everything(Some(ErrorKind::ConnectionRefused));
    let err = f.store.put(&a, StorageLevel::MEMORY_AND_DISK_2).unwrap_err();
    assert!(err.is_retryable(), "{err:?}");
    assert_eq!(f.store.metrics().blocks_stored, 0);
    f.store.put(&a, StorageLevel::MEMORY_AND_DISK).unwrap();
    f.replica.fail_everything(None);
    f.store.put(&a, StorageLevel::MEMORY_AND_DISK_2).unwrap();
    assert_eq!(f.store.metrics().replicated, 1);
}

#[test]
fn an_unreachable_s3_endpoint_is_a_retryable_object_store_error() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 9 (discard) of loopback in the test environment.
    let config = BlockStoreConfig {
        replica_url: Some("s3://no-such-bucket/blocks".into()),
        replica_options: [
            ("endpoint", "http://127.0.0.1:9"),
            ("allow_http", "true"),
            ("region", "us-east-1"),
            ("access_key_id", "test"),
            ("secret_access_key", "test"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect(),
        disk_sync: DiskSync::Never,
        ..BlockStoreConfig::new(dir.path())
    };
    let store = BlockStore::open(config).unwrap();
    let a = block(1, 3, 10);
    let err = store.put(&a, StorageLevel::DISK_ONLY_2).unwrap_err();
    assert!(matches!(err, Error::ObjectStore { .. }), "{err:?}");
    assert!(err.is_retryable());
    assert!(err.to_string().contains("no-such-bucket"), "{err}");
}

#[test]
fn a_tier_that_cannot_be_read_is_skipped_for_the_next_and_reported_when_nothing_answers() {
    let f = faulty_store(1 << 20);
    let a = block(1, 10, 100);
    f.store.put(&a, StorageLevel::DISK_ONLY_2).unwrap();
    f.disk.fail_gets(Some(ErrorKind::PermissionDenied));
    assert_eq!(f.store.get(a.id()).unwrap(), Some(a.clone()));
    assert_eq!(f.store.metrics().tier_errors, 1);
    assert_eq!(f.store.metrics().replica_hits, 1);
    f.replica.fail_gets(Some(ErrorKind::ConnectionRefused));
    assert!(
        f.store.get(a.id()).is_err(),
        "no tier could answer: not reported as missing"
    );
}

#[test]
fn restart_keeps_durable_blocks_and_deletes_interrupted_writes() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    let (durable, volatile) = (block(1, 10, 100), block(2, 10, 100));
    {
        let store = open(dir.path(), 1 << 20, &clock);
        store.put(&durable, StorageLevel::MEMORY_AND_DISK_2).unwrap();
        store.put(&volatile, StorageLevel::MEMORY_ONLY).unwrap();
    }
    let stray = dir
        .path()
        .join("blocks")
        .join(format!(".{}.blk.1-0.tmp", block(3, 1, 1).id()));
    std::fs::write(&stray, b"torn").unwrap();

    let store = open(dir.path(), 1 << 20, &clock);
    assert!(
        !stray.exists(),
        "temporary files of interrupted writes are deleted on open"
    );
    assert_eq!(store.get(durable.id()).unwrap(), Some(durable.clone()));
    assert_eq!(store.get(volatile.id()).unwrap(), None);
    let metrics = store.metrics();
    assert_eq!((metrics.disk_hits, metrics.misses), (1, 1));
    assert_eq!(
        metrics.memory_blocks, 0,
        "leftovers of an earlier run are not re-cached"
    );
    store.remove(durable.id()).unwrap();
    assert!(!store.contains(durable.id()).unwrap());
}

#[test]
fn remove_older_than_cleans_up_by_stored_time() {
    let dir = tempfile::tempdir().unwrap();
    let clock = Arc::new(ManualClock::new(START_MS));
    let store = open(dir.path(), 1 << 20, &clock);
    let (old_disk, old_memory, new) = (block(1, 5, 10), block(2, 5, 10), block(3, 5, 10));
    store.put(&old_disk, StorageLevel::DISK_ONLY).unwrap();
    store.put(&old_memory, StorageLevel::MEMORY_ONLY).unwrap();
    clock.advance_ms(60_000);
    store.put(&new, StorageLevel::MEMORY_AND_DISK).unwrap();
    assert_eq!(store.remove_older_than(START_MS + 1).unwrap(), 2);
    assert_eq!(store.get(old_disk.id()).unwrap(), None);
    assert_eq!(store.get(old_memory.id()).unwrap(), None);
    assert_eq!(store.get(new.id()).unwrap(), Some(new));
}

#[test]
fn levels_the_store_cannot_honour_are_rejected() {
    let f = faulty_store(1 << 20);
    let a = block(1, 1, 1);
    for level in [
        StorageLevel {
            use_memory: true,
            use_disk: true,
            replication: 3,
        },
        StorageLevel {
            use_memory: false,
            use_disk: false,
            replication: 1,
        },
    ] {
        let err = f.store.put(&a, level).unwrap_err();
        assert!(matches!(err, Error::UnsupportedStorageLevel { .. }), "{err:?}");
        assert!(!err.is_retryable());
    }
}

#[test]
fn concurrent_use_keeps_the_budget_and_the_durable_blocks() {
    let one = block(1, 10, 500).memory_size();
    let budget = 4 * one;
    let f = faulty_store(budget);
    let store = &f.store;
    std::thread::scope(|scope| {
        for t in 0..4_u64 {
            scope.spawn(move || {
                for i in 0..15 {
                    let b = block(t * 100 + i, 10, 500);
                    let level = if i % 3 == 0 {
                        StorageLevel::MEMORY_ONLY
                    } else {
                        StorageLevel::MEMORY_AND_DISK
                    };
                    store.put(&b, level).unwrap();
                    assert!(store.metrics().memory_bytes_in_use <= budget as u64);
                    let got = store.get(b.id()).unwrap();
                    assert!(got.is_none() || got.as_ref() == Some(&b));
                    if i % 5 == 4 {
                        store.remove(b.id()).unwrap();
                        assert_eq!(store.get(b.id()).unwrap(), None);
                    } else if level.is_durable() {
                        assert_eq!(got.as_ref(), Some(&b));
                    }
                }
            });
        }
    });
    assert!(store.metrics().memory_bytes_in_use <= budget as u64);
}
