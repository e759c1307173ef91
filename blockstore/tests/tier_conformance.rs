//! The one conformance suite for [`BlockTier`], run against every tier: memory, disk, and the
//! replica on `file://`, `memory://` and S3 (the moto emulator).
//!
//! The S3 case needs the emulator: run it through `scripts/test` or
//! `scripts/with-emulators cargo test -p sluice-blockstore --test tier_conformance`, which export
//! `SLUICE_MOTO_ENDPOINT`, `SLUICE_TEST_S3_BUCKET` and the `AWS_*` variables. Without them the test
//! fails (it never skips silently).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutPayload};
use sluice_blockstore::testing::{sample_block, sample_records};
use sluice_blockstore::{
    Block, BlockId, BlockTier, Clock, DiskSync, DiskTier, Error, MemoryTier, ReplicaTier, SystemClock,
};

/// How a test damages a stored copy.
#[derive(Debug, Clone, Copy)]
enum Damage {
    /// Flip one bit in the middle of the copy.
    FlipByte,
    /// Keep only the first half (a torn write).
    Truncate,
}

/// A tier under test, and how to damage its stored copies (tiers that store no bytes cannot be
/// damaged).
struct TierUnderTest {
    tier: Arc<dyn BlockTier>,
    damage: Option<Box<dyn Fn(BlockId, Damage)>>,
    /// Keeps temporary directories alive.
    _guard: Option<tempfile::TempDir>,
}

fn damaged(bytes: &[u8], damage: Damage) -> Vec<u8> {
    let mut copy = bytes.to_vec();
    match damage {
        Damage::FlipByte => {
            let middle = copy.len() / 2;
            copy[middle] ^= 0x10;
        }
        Damage::Truncate => copy.truncate(copy.len() / 2),
    }
    copy
}

fn wall_ms() -> i64 {
    SystemClock.now_ms()
}

fn block(seq: u64, count: usize, payload: usize) -> Block {
    sample_block(
        seq,
        &sample_records("shard-0", u128::from(seq) * 10_000, count, payload),
    )
}

/// The conformance suite: everything the [`BlockTier`] contract promises.
fn conformance(make: impl Fn() -> TierUnderTest) {
    let TierUnderTest { tier, damage, _guard } = make();
    let tier = &*tier;

    // Absent blocks.
    let absent = block(1, 3, 10);
    assert_eq!(tier.get(absent.id()).unwrap(), None, "get of an absent block");
    assert!(!tier.contains(absent.id()).unwrap());
    tier.remove(absent.id()).expect("removing an absent block is Ok");
    assert!(tier.list().unwrap().is_empty(), "a fresh tier lists nothing");

    // Put, get, contains, list with the stored time.
    let a = block(2, 50, 100);
    let before = wall_ms();
    tier.put(&a).unwrap();
    let after = wall_ms();
    assert_eq!(
        tier.get(a.id()).unwrap().as_ref(),
        Some(&a),
        "get returns what put stored"
    );
    assert!(tier.contains(a.id()).unwrap());
    let listed = tier.list().unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].id, a.id());
    assert!(listed[0].size_bytes > 0);
    // Object stores report last-modified with second granularity.
    assert!(
        (before - 2_000..=after + 2_000).contains(&listed[0].stored_at_ms),
        "stored time {} not within [{before}, {after}]",
        listed[0].stored_at_ms
    );

    // Ids are immutable: a second put of the same block succeeds and changes nothing.
    tier.put(&a).unwrap();
    assert_eq!(tier.list().unwrap().len(), 1);
    assert_eq!(tier.get(a.id()).unwrap().as_ref(), Some(&a));

    // An empty block and a 1 MiB block round-trip.
    let empty = block(3, 0, 0);
    tier.put(&empty).unwrap();
    assert_eq!(tier.get(empty.id()).unwrap(), Some(empty.clone()));
    let big = block(4, 1024, 1024);
    tier.put(&big).unwrap();
    assert_eq!(tier.get(big.id()).unwrap(), Some(big.clone()));

    // Removal is complete and idempotent.
    tier.remove(a.id()).unwrap();
    assert_eq!(tier.get(a.id()).unwrap(), None);
    assert!(!tier.contains(a.id()).unwrap());
    tier.remove(a.id()).unwrap();
    let mut ids: Vec<BlockId> = tier.list().unwrap().iter().map(|s| s.id).collect();
    ids.sort();
    assert_eq!(ids, vec![empty.id(), big.id()]);
    tier.remove(empty.id()).unwrap();
    tier.remove(big.id()).unwrap();

    // Concurrent puts and gets from several threads.
    let blocks: Vec<Block> = (100..112).map(|seq| block(seq, 20, 64)).collect();
    std::thread::scope(|scope| {
        for chunk in blocks.chunks(3) {
            scope.spawn(move || {
                for b in chunk {
                    tier.put(b).unwrap();
                    assert_eq!(tier.get(b.id()).unwrap().as_ref(), Some(b));
                }
            });
        }
    });
    assert_eq!(tier.list().unwrap().len(), blocks.len());
    for b in &blocks {
        assert_eq!(tier.get(b.id()).unwrap().as_ref(), Some(b));
        tier.remove(b.id()).unwrap();
    }

    // A damaged copy is reported as Corrupt (naming the block), never returned; it is still
    // listed (cleanup needs its name) and can be removed.
    if let Some(damage) = damage {
        for (seq, how) in [(200, Damage::FlipByte), (201, Damage::Truncate)] {
            let victim = block(seq, 30, 200);
            tier.put(&victim).unwrap();
            damage(victim.id(), how);
            match tier.get(victim.id()) {
                Err(Error::Corrupt { id: Some(id), .. }) => assert_eq!(id, victim.id()),
                other => panic!("{how:?}: expected Corrupt, got {other:?}"),
            }
            assert!(tier.contains(victim.id()).unwrap());
            assert!(tier.list().unwrap().iter().any(|s| s.id == victim.id()));
            tier.remove(victim.id()).unwrap();
            assert_eq!(tier.get(victim.id()).unwrap(), None);
        }
    }
    assert!(tier.list().unwrap().is_empty(), "everything was removed");
}

fn unique(name: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

fn replica_under_test(tier: ReplicaTier, guard: Option<tempfile::TempDir>) -> TierUnderTest {
    let tier = Arc::new(tier);
    let for_damage = tier.clone();
    TierUnderTest {
        tier,
        damage: Some(Box::new(move |id, how| {
            let store: Arc<dyn ObjectStore> = for_damage.object_store().clone();
            let path: ObjectPath = for_damage.object_path(id);
            for_damage.block_on(async move {
                let bytes = store.get(&path).await.unwrap().bytes().await.unwrap();
                store.put(&path, PutPayload::from(damaged(&bytes, how))).await.unwrap();
            });
        })),
        _guard: guard,
    }
}

#[test]
fn memory_tier() {
    conformance(|| TierUnderTest {
        tier: Arc::new(MemoryTier::new(64 << 20, Arc::new(SystemClock))),
        damage: None,
        _guard: None,
    });
}

#[test]
fn disk_tier() {
    conformance(|| {
        let dir = tempfile::tempdir().unwrap();
        let tier =
            Arc::new(DiskTier::open(dir.path().join("blocks"), Arc::new(SystemClock), DiskSync::Always).unwrap());
        let for_damage = tier.clone();
        TierUnderTest {
            tier,
            damage: Some(Box::new(move |id, how| {
                let path = for_damage.path_of(id);
                let bytes = std::fs::read(&path).unwrap();
                std::fs::write(&path, damaged(&bytes, how)).unwrap();
            })),
            _guard: Some(dir),
        }
    });
}

#[test]
fn replica_tier_on_a_local_directory() {
    conformance(|| {
        let dir = tempfile::tempdir().unwrap();
        let url = format!("file://{}", dir.path().join("replica").display());
        replica_under_test(ReplicaTier::open(&url, &HashMap::new()).unwrap(), Some(dir))
    });
}

#[test]
fn replica_tier_in_memory() {
    conformance(|| {
        let url = format!("memory://{}/blocks", unique("conformance"));
        replica_under_test(ReplicaTier::open(&url, &HashMap::new()).unwrap(), None)
    });
}

#[test]
fn replica_tier_on_s3_emulator() {
    let missing: Vec<&str> = ["SLUICE_MOTO_ENDPOINT", "SLUICE_TEST_S3_BUCKET"]
        .into_iter()
        .filter(|name| std::env::var(name).map_or(true, |v| v.is_empty()))
        .collect();
    assert!(
        missing.is_empty(),
        "{} not set: this test needs the moto S3 emulator; run it through `scripts/test` or \
         `scripts/with-emulators cargo test -p sluice-blockstore --test tier_conformance`",
        missing.join(" and ")
    );
    let endpoint = std::env::var("SLUICE_MOTO_ENDPOINT").unwrap();
    let bucket = std::env::var("SLUICE_TEST_S3_BUCKET").unwrap();
    conformance(|| {
        let url = format!("s3://{bucket}/{}", unique("conformance"));
        let options = HashMap::from([
            ("endpoint".to_owned(), endpoint.clone()),
            ("allow_http".to_owned(), "true".to_owned()),
        ]);
        replica_under_test(ReplicaTier::open(&url, &options).unwrap(), None)
    });
}

/// The replica tier may be used from inside a tokio runtime (it moves its blocking work off the
/// async thread) and dropped there.
#[test]
fn replica_tier_works_inside_a_tokio_runtime() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let url = format!("memory://{}/blocks", unique("in-runtime"));
        let tier = ReplicaTier::open(&url, &HashMap::new()).unwrap();
        let b = block(1, 5, 10);
        tier.put(&b).unwrap();
        assert_eq!(tier.get(b.id()).unwrap(), Some(b));
        drop(tier);
    });
}
