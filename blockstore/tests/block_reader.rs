//! [`BlockReader`]: store first, replay when the block is gone or its id is invalid, retries with
//! backoff through the injected clock, typed failures.
#![allow(clippy::result_large_err)] // `ReadError` is large by design; see reader.rs

use std::sync::Arc;

use sluice_blockstore::testing::{
    AutoAdvanceClock, InjectedFailure, MemoryReplay, SAMPLE_STREAM, sample_block, sample_records,
};
use sluice_blockstore::{
    Block, BlockOrigin, BlockReader, BlockReaderConfig, BlockStore, BlockStoreConfig, DEFAULT_MAX_BACKOFF_MS,
    DEFAULT_RETRY_TIMEOUT_MS, DiskSync, ManualClock, ReadError, ReplayError, SharedClock, StorageLevel,
};

struct Setup {
    _dir: tempfile::TempDir,
    store: Arc<BlockStore>,
    source: Arc<MemoryReplay>,
    block: Block,
}

fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let config = BlockStoreConfig {
        disk_sync: DiskSync::Never,
        ..BlockStoreConfig::new(dir.path())
    };
    let store = Arc::new(BlockStore::open(config).unwrap());
    let records = sample_records("shard-0", 1_000, 25, 50);
    let source = Arc::new(MemoryReplay::from_records(SAMPLE_STREAM, records.clone()));
    Setup {
        _dir: dir,
        store,
        source,
        block: sample_block(3, &records),
    }
}

fn reader(s: &Setup, clock: SharedClock) -> BlockReader {
    BlockReader::new(s.store.clone(), s.source.clone(), clock)
}

#[test]
fn a_stored_block_is_read_without_replay() {
    let s = setup();
    s.store.put(&s.block, StorageLevel::MEMORY_AND_DISK).unwrap();
    let block = reader(&s, Arc::new(AutoAdvanceClock::new(0)))
        .read(s.block.meta(), true)
        .unwrap();
    assert_eq!(block, s.block);
    assert_eq!(s.source.calls(), 0);
    assert_eq!(s.store.metrics().memory_hits, 1);
}

#[test]
fn an_invalid_block_id_goes_straight_to_replay() {
    let s = setup();
    // Even with a valid copy in the store, an invalid id is not looked up.
    s.store.put(&s.block, StorageLevel::MEMORY_AND_DISK).unwrap();
    let block = reader(&s, Arc::new(AutoAdvanceClock::new(0)))
        .read(s.block.meta(), false)
        .unwrap();
    assert_eq!(block, s.block);
    assert_eq!(s.source.calls(), 1);
    let metrics = s.store.metrics();
    assert_eq!(
        metrics.memory_hits + metrics.disk_hits + metrics.replica_hits + metrics.misses,
        0,
        "the store was not read"
    );
    assert_eq!((metrics.blocks_replayed, metrics.records_replayed), (1, 25));
}

#[test]
fn throttled_twice_then_succeeds_waiting_on_the_manual_clock() {
    let s = setup();
    s.source.fail_next(2, InjectedFailure::Throttled);
    let clock = Arc::new(ManualClock::new(0));
    let reader = reader(&s, clock.clone());
    let block = std::thread::scope(|scope| {
        let reading = scope.spawn(|| reader.read(s.block.meta(), true));
        for n in 1..=2 {
            // The reader waits on the clock, not on wall time: it stays blocked until advanced.
            let slept = clock.wait_for_blocked_sleeps_timeout(n, std::time::Duration::from_secs(30));
            if !slept {
                // Past the retry deadline the reader stops sleeping, so the scope can join it.
                clock.advance_ms(DEFAULT_RETRY_TIMEOUT_MS as i64 * 10);
            }
            assert!(slept, "the reader never slept a {n}th time");
            assert_eq!(s.store.metrics().blocks_replayed, 0);
            clock.advance_ms(DEFAULT_MAX_BACKOFF_MS as i64);
        }
        reading.join().unwrap()
    })
    .unwrap();
    assert_eq!(block, s.block);
    assert_eq!(s.source.calls(), 3);
    let metrics = s.store.metrics();
    assert_eq!(
        (
            metrics.replay_attempts,
            metrics.blocks_replayed,
            metrics.replay_failures
        ),
        (3, 1, 0)
    );
}

#[test]
fn backoff_doubles_with_jitter() {
    let s = setup();
    s.source.fail_next(3, InjectedFailure::Unavailable);
    let clock = Arc::new(AutoAdvanceClock::new(0));
    let block = reader(&s, clock.clone()).read(s.block.meta(), true).unwrap();
    assert_eq!(block, s.block);
    let sleeps = clock.sleeps();
    assert_eq!(sleeps.len(), 3, "{sleeps:?}");
    for (wait, backoff) in sleeps.iter().zip([100, 200, 400]) {
        assert!(
            (backoff / 2..=backoff).contains(wait),
            "waited {wait} ms for a {backoff} ms backoff"
        );
    }
}

#[test]
fn data_expired_fails_fast_with_a_typed_error() {
    let s = setup();
    s.source.expire_all();
    let clock = Arc::new(AutoAdvanceClock::new(0));
    let err = reader(&s, clock.clone()).read(s.block.meta(), false).unwrap_err();
    assert!(err.is_data_lost(), "{err}");
    assert!(!err.is_retryable());
    match &err {
        ReadError::DataExpired {
            id,
            ranges,
            attempts,
            source,
        } => {
            assert_eq!(*id, s.block.id());
            assert_eq!(ranges, &s.block.meta().ranges);
            assert_eq!(*attempts, 1);
            assert!(matches!(source, ReplayError::DataExpired { .. }));
        }
        other => panic!("expected DataExpired, got {other:?}"),
    }
    assert!(clock.sleeps().is_empty(), "no retries for expired data");
    assert_eq!(s.source.calls(), 1);
    assert_eq!(s.store.metrics().replay_failures, 1);
    assert!(
        std::error::Error::source(&err).is_some(),
        "the replay error is the source"
    );
}

#[test]
fn retries_stop_at_the_retry_timeout_with_the_ranges_in_the_error() {
    let s = setup();
    s.source.fail_next(10_000, InjectedFailure::Throttled);
    let clock = Arc::new(AutoAdvanceClock::new(5_000));
    let err = reader(&s, clock.clone()).read(s.block.meta(), true).unwrap_err();
    let sleeps = clock.sleeps();
    match &err {
        ReadError::RetryTimeout {
            id,
            ranges,
            attempts,
            elapsed_ms,
            retry_timeout_ms,
            source,
        } => {
            assert_eq!(*id, s.block.id());
            assert_eq!(ranges, &s.block.meta().ranges);
            assert_eq!(*retry_timeout_ms, DEFAULT_RETRY_TIMEOUT_MS);
            assert_eq!(*elapsed_ms, DEFAULT_RETRY_TIMEOUT_MS);
            assert_eq!(*attempts as usize, sleeps.len() + 1);
            assert!(matches!(source, ReplayError::Throttled(_)));
        }
        other => panic!("expected RetryTimeout, got {other:?}"),
    }
    assert!(!err.is_data_lost() && err.is_retryable());
    assert_eq!(
        sleeps.iter().sum::<i64>(),
        DEFAULT_RETRY_TIMEOUT_MS as i64,
        "{sleeps:?}"
    );
    assert!(sleeps.iter().all(|&w| w <= DEFAULT_MAX_BACKOFF_MS as i64), "{sleeps:?}");
    assert!(err.to_string().contains(&s.block.meta().ranges.to_string()), "{err}");
    assert_eq!(s.source.calls() as usize, sleeps.len() + 1);
}

#[test]
fn a_zero_retry_timeout_makes_one_attempt() {
    let s = setup();
    s.source.fail_next(1, InjectedFailure::Throttled);
    let clock = Arc::new(AutoAdvanceClock::new(0));
    let reader = reader(&s, clock.clone())
        .with_config(BlockReaderConfig {
            retry_timeout_ms: 0,
            ..BlockReaderConfig::default()
        })
        .unwrap();
    let err = reader.read(s.block.meta(), true).unwrap_err();
    assert!(matches!(err, ReadError::RetryTimeout { attempts: 1, .. }), "{err:?}");
    assert!(clock.sleeps().is_empty());
}

#[test]
fn other_permanent_failures_are_not_retried_and_not_data_loss() {
    let s = setup();
    let mut meta = s.block.meta().clone();
    let mut range = meta.ranges.0[0].clone();
    range.shard_id = "shard-unknown".into();
    meta.ranges.0[0] = range;
    let clock = Arc::new(AutoAdvanceClock::new(0));
    let err = reader(&s, clock.clone()).read(&meta, false).unwrap_err();
    assert!(
        matches!(
            &err,
            ReadError::ReplayFailed {
                attempts: 1,
                source: ReplayError::UnknownShard { .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!err.is_data_lost());
    assert!(clock.sleeps().is_empty());
}

#[test]
fn a_replay_with_the_wrong_number_of_records_is_rejected() {
    let s = setup();
    let mut meta = s.block.meta().clone();
    meta.num_records += 1;
    let err = reader(&s, Arc::new(AutoAdvanceClock::new(0)))
        .read(&meta, false)
        .unwrap_err();
    assert!(
        matches!(
            err,
            ReadError::RecordCountMismatch {
                expected: 26,
                found: 25,
                ..
            }
        ),
        "{err:?}"
    );
}

#[test]
fn an_empty_block_rebuilds_to_an_empty_block() {
    let s = setup();
    let empty = sample_block(4, &[]);
    let block = reader(&s, Arc::new(AutoAdvanceClock::new(0)))
        .read(empty.meta(), false)
        .unwrap();
    assert!(block.is_empty());
    assert_eq!(block, empty);
}

#[test]
fn read_with_origin_says_store_or_replay_even_with_concurrent_replays() {
    let s = setup();
    s.store.put(&s.block, StorageLevel::MEMORY_AND_DISK).unwrap();
    let reader = reader(&s, Arc::new(AutoAdvanceClock::new(0)));
    // Concurrently: one thread reads the stored block, another replays (invalid id). Diffing the
    // store-wide `blocks_replayed` counter around the first read could blame it for the replay;
    // the origin cannot.
    std::thread::scope(|scope| {
        let replaying = scope.spawn(|| {
            (0..50)
                .map(|_| reader.read_with_origin(s.block.meta(), false).unwrap().1)
                .collect::<Vec<_>>()
        });
        for _ in 0..50 {
            let (block, origin) = reader.read_with_origin(s.block.meta(), true).unwrap();
            assert_eq!((block, origin), (s.block.clone(), BlockOrigin::Store));
        }
        assert!(replaying.join().unwrap().iter().all(|o| *o == BlockOrigin::Replay));
    });
    assert_eq!(s.store.metrics().blocks_replayed, 50);
    s.store.remove(s.block.meta().id).unwrap();
    assert_eq!(
        reader.read_with_origin(s.block.meta(), true).unwrap().1,
        BlockOrigin::Replay,
        "a lost block is replayed"
    );
}
