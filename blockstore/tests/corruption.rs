//! Corrupt copies are counted, discarded and never returned; the reader then rebuilds the block
//! from the source.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice_blockstore::testing::{AutoAdvanceClock, MemoryReplay, SAMPLE_STREAM, sample_block, sample_records};
use sluice_blockstore::{
    Block, BlockReader, BlockReaderConfig, BlockStore, BlockStoreConfig, DiskSync, StorageLevel, SystemClock,
};

fn flip_byte(path: &Path) {
    let mut bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x01;
    std::fs::write(path, bytes).unwrap();
}

struct Setup {
    _dir: tempfile::TempDir,
    store: Arc<BlockStore>,
    disk_file: PathBuf,
    replica_file: PathBuf,
    block: Block,
}

/// A store with the default local replica, holding one block at `DISK_ONLY_2` (disk + replica).
fn setup() -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let config = BlockStoreConfig {
        disk_sync: DiskSync::Never,
        ..BlockStoreConfig::new(dir.path())
    };
    let store = Arc::new(BlockStore::open(config).unwrap());
    let block = sample_block(9, &sample_records("shard-0", 500, 40, 300));
    store.put(&block, StorageLevel::DISK_ONLY_2).unwrap();
    let name = format!("{}.blk", block.id());
    Setup {
        disk_file: dir.path().join("blocks").join(&name),
        replica_file: dir.path().join("replica").join(&name),
        _dir: dir,
        store,
        block,
    }
}

#[test]
fn a_corrupt_disk_copy_is_skipped_for_the_replica() {
    let s = setup();
    flip_byte(&s.disk_file);
    assert_eq!(s.store.get(s.block.id()).unwrap(), Some(s.block.clone()));
    let metrics = s.store.metrics();
    assert_eq!(metrics.corrupt_copies, 1);
    assert_eq!((metrics.disk_hits, metrics.replica_hits), (0, 1));
    assert!(!s.disk_file.exists(), "the corrupt disk copy is removed");
}

#[test]
fn corrupt_disk_and_replica_copies_read_as_missing_and_the_reader_replays() {
    let s = setup();
    flip_byte(&s.disk_file);
    flip_byte(&s.replica_file);

    assert_eq!(
        s.store.get(s.block.id()).unwrap(),
        None,
        "a corrupt copy is never returned"
    );
    let metrics = s.store.metrics();
    assert_eq!(metrics.corrupt_copies, 2);
    assert_eq!(metrics.misses, 1);
    assert!(!s.store.contains(s.block.id()).unwrap(), "corrupt copies are removed");

    let records = s.block.records().unwrap();
    let source = Arc::new(MemoryReplay::from_records(SAMPLE_STREAM, records.clone()));
    let reader = BlockReader::new(s.store.clone(), source.clone(), Arc::new(AutoAdvanceClock::new(0)))
        .with_config(BlockReaderConfig {
            restore_level: Some(StorageLevel::DISK_ONLY_2),
            ..BlockReaderConfig::default()
        })
        .unwrap();
    let rebuilt = reader.read(s.block.meta(), true).unwrap();
    assert_eq!(rebuilt.records().unwrap(), records);
    assert_eq!(rebuilt, s.block);
    assert_eq!(source.calls(), 1);
    let metrics = s.store.metrics();
    assert_eq!((metrics.blocks_replayed, metrics.records_replayed), (1, 40));

    // The rebuilt block was stored again: the next read needs no replay.
    assert_eq!(reader.read(s.block.meta(), true).unwrap(), s.block);
    assert_eq!(source.calls(), 1);
    assert_eq!(s.store.metrics().disk_hits, 1);
}

#[test]
fn a_copy_with_other_ranges_than_expected_is_replayed() {
    let s = setup();
    let mut meta = s.block.meta().clone();
    // What the engine logged differs from the stored copy: trust the log, replay.
    let records = sample_records("shard-0", 500, 39, 300);
    meta.ranges = sluice_blockstore::testing::ranges_of(SAMPLE_STREAM, &records);
    meta.num_records = 39;
    let source = Arc::new(MemoryReplay::from_records(SAMPLE_STREAM, records.clone()));
    let reader = BlockReader::new(s.store.clone(), source.clone(), Arc::new(SystemClock));
    let block = reader.read(&meta, true).unwrap();
    assert_eq!(block.len(), 39);
    assert_eq!(source.calls(), 1);
}
