//! Model-based test of the `ReceivedBlockTracker` and its metadata log: random operations and
//! crashes (reopen from the log) against a plain reference model.

use std::collections::{BTreeMap, BTreeSet};

use proptest::prelude::*;
use sluice_blockstore::{BlockId, BlockMeta, Position, SequenceNumber, SequenceNumberRange, SequenceNumberRanges};
use sluice_engine::internals::{CheckpointStore, MetadataLog, ReceivedBlockTracker};

#[derive(Debug, Clone)]
enum Op {
    AddBlock {
        shard: u8,
        records: u8,
    },
    Allocate,
    Complete {
        nth_pending: u8,
    },
    Cleanup {
        keep_last: u8,
    },
    /// `complete_batch`: completion and cleanup in one append.
    CompleteAndCleanup {
        nth_pending: u8,
        keep_last: u8,
    },
    Crash,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0u8..3, 1u8..20).prop_map(|(shard, records)| Op::AddBlock { shard, records }),
        2 => Just(Op::Allocate),
        1 => (0u8..4, 0u8..3).prop_map(|(nth_pending, keep_last)| Op::CompleteAndCleanup { nth_pending, keep_last }),
        2 => (0u8..4).prop_map(|nth_pending| Op::Complete { nth_pending }),
        1 => (0u8..4).prop_map(|keep_last| Op::Cleanup { keep_last }),
        1 => Just(Op::Crash),
    ]
}

#[derive(Default)]
struct Model {
    next_seq: u64,
    shard_next: BTreeMap<u8, u128>,
    unallocated: Vec<BlockId>,
    batches: BTreeMap<i64, Vec<BlockId>>,
    completed: BTreeSet<i64>,
    last_pos: BTreeMap<String, String>,
    now: i64,
    /// Empty batches the tracker keeps in memory only (`with_empty_batches_logged(false)`).
    unlogged: BTreeSet<i64>,
}

impl Model {
    /// Forgets completed batches before `before`; returns their blocks in batch order.
    fn cleanup(&mut self, before: i64) -> Vec<BlockId> {
        let done: Vec<i64> = self
            .batches
            .range(..before)
            .map(|(t, _)| *t)
            .filter(|t| self.completed.contains(t))
            .collect();
        let mut ids = Vec::new();
        for t in done {
            ids.extend(self.batches.remove(&t).unwrap());
            self.completed.remove(&t);
            self.unlogged.remove(&t);
        }
        ids
    }
}

fn open(
    store: &CheckpointStore,
    compact_every: usize,
    log_empty: bool,
) -> (ReceivedBlockTracker, sluice_engine::internals::RecoveredState) {
    // Every open is a new process: it claims the log (fencing the previous one).
    let log = MetadataLog::claim(store, "test-process").unwrap();
    let (t, r) = ReceivedBlockTracker::recover(log).unwrap();
    (
        t.with_compact_every(compact_every).with_empty_batches_logged(log_empty),
        r,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]
    #[test]
    fn tracker_survives_crashes(ops in proptest::collection::vec(op(), 1..60), compact_every in 1usize..5, log_empty in any::<bool>()) {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::local(dir.path()).unwrap();
        let (mut tracker, _) = open(&store, compact_every, log_empty);
        let mut m = Model::default();
        for op in ops {
            match op {
                Op::AddBlock { shard, records } => {
                    let from = *m.shard_next.entry(shard).or_insert(1_000_000);
                    let to = from + u128::from(records) - 1;
                    m.shard_next.insert(shard, to + 1);
                    let id = BlockId { input_id: 0, run_id: 1, seq: m.next_seq };
                    m.next_seq += 1;
                    let range = SequenceNumberRange {
                        stream: "s".into(),
                        shard_id: format!("shard-{shard}").into(),
                        from: Position::plain(SequenceNumber::from_u128(from)),
                        to: Position::plain(SequenceNumber::from_u128(to)),
                        record_count: u64::from(records),
                    };
                    let meta = BlockMeta { id, ranges: SequenceNumberRanges::from(range), num_records: u64::from(records), num_bytes: 10 };
                    tracker.add_block(meta).unwrap();
                    m.unallocated.push(id);
                    m.last_pos.insert(format!("shard-{shard}"), to.to_string());
                }
                Op::Allocate => {
                    m.now += 1000;
                    let got: Vec<BlockId> = tracker.allocate_blocks_to_batch(m.now).unwrap().iter().map(|b| b.meta.id).collect();
                    prop_assert_eq!(&got, &m.unallocated);
                    if !log_empty && m.unallocated.is_empty() {
                        m.unlogged.insert(m.now);
                    }
                    m.batches.insert(m.now, std::mem::take(&mut m.unallocated));
                }
                Op::Complete { nth_pending } => {
                    let pending: Vec<i64> = m.batches.keys().copied().filter(|t| !m.completed.contains(t)).collect();
                    if let Some(t) = pending.get(nth_pending as usize) {
                        tracker.batch_completed(*t).unwrap();
                        m.completed.insert(*t);
                    }
                }
                Op::Cleanup { keep_last } => {
                    let before = m.now - i64::from(keep_last) * 1000;
                    let removed = tracker.cleanup(before).unwrap();
                    prop_assert_eq!(removed, m.cleanup(before));
                }
                Op::CompleteAndCleanup { nth_pending, keep_last } => {
                    let pending: Vec<i64> = m.batches.keys().copied().filter(|t| !m.completed.contains(t)).collect();
                    if let Some(t) = pending.get(nth_pending as usize) {
                        let before = m.now - i64::from(keep_last) * 1000;
                        let removed = tracker.complete_batch(*t, before).unwrap();
                        m.completed.insert(*t);
                        prop_assert_eq!(removed, m.cleanup(before));
                    }
                }
                Op::Crash => {
                    drop(tracker);
                    let (t, recovered) = open(&store, compact_every, log_empty);
                    tracker = t;
                    // A crash forgets unlogged empty batches, done or not: nothing to re-run.
                    for t in std::mem::take(&mut m.unlogged) {
                        m.batches.remove(&t);
                        m.completed.remove(&t);
                    }
                    let pending: Vec<i64> = m.batches.keys().copied().filter(|t| !m.completed.contains(t)).collect();
                    prop_assert_eq!(&recovered.pending_batches, &pending);
                    prop_assert_eq!(recovered.unallocated_blocks, m.unallocated.len());
                    let mut resume: Vec<(String, String)> = recovered.resume_after.iter().map(|(_, sh, p)| (sh.to_string(), p.sequence.to_string())).collect();
                    resume.sort();
                    let expected: Vec<(String, String)> = m.last_pos.clone().into_iter().collect();
                    prop_assert_eq!(resume, expected);
                    for (t, ids) in &m.batches {
                        let got = tracker.blocks_of_batch(*t);
                        prop_assert!(got.iter().all(|b| !b.is_block_id_valid), "recovered blocks must be marked invalid");
                        prop_assert_eq!(&got.iter().map(|b| b.meta.id).collect::<Vec<_>>(), ids);
                    }
                }
            }
        }
    }
}

#[test]
fn a_corrupt_entry_is_an_error_not_a_silent_truncation() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::local(dir.path()).unwrap();
    let (tracker, _) = open(&store, 1000, true);
    tracker.allocate_blocks_to_batch(1000).unwrap();
    tracker.batch_completed(1000).unwrap();
    drop(tracker);
    let file = std::fs::read_dir(dir.path().join("metadata"))
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path();
    let mut bytes = std::fs::read(&file).unwrap();
    bytes[2] ^= 1;
    std::fs::write(&file, bytes).unwrap();
    let err = ReceivedBlockTracker::recover(MetadataLog::claim(&store, "after-corruption").unwrap()).unwrap_err();
    assert!(matches!(err, sluice_engine::Error::CorruptMetadata { .. }), "{err}");
}

#[test]
fn allocation_of_a_known_batch_returns_the_same_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::local(dir.path()).unwrap();
    let (tracker, _) = open(&store, 1000, true);
    let meta = BlockMeta {
        id: BlockId {
            input_id: 0,
            run_id: 1,
            seq: 0,
        },
        ranges: SequenceNumberRanges::new(),
        num_records: 0,
        num_bytes: 0,
    };
    tracker.add_block(meta).unwrap();
    let first = tracker.allocate_blocks_to_batch(1000).unwrap();
    assert_eq!(first.len(), 1);
    assert_eq!(tracker.allocate_blocks_to_batch(1000).unwrap(), first);
    assert!(tracker.allocate_blocks_to_batch(500).unwrap().is_empty());
}

#[test]
fn empty_batches_cost_no_log_writes_unless_they_clean_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = CheckpointStore::local(dir.path()).unwrap();
    let (tracker, _) = open(&store, 1000, false);
    let id = BlockId {
        input_id: 0,
        run_id: 1,
        seq: 0,
    };
    let range = SequenceNumberRange {
        stream: "s".into(),
        shard_id: "shard-0".into(),
        from: Position::plain(SequenceNumber::from_u128(10)),
        to: Position::plain(SequenceNumber::from_u128(19)),
        record_count: 10,
    };
    tracker
        .add_block(BlockMeta {
            id,
            ranges: SequenceNumberRanges::from(range),
            num_records: 10,
            num_bytes: 100,
        })
        .unwrap();
    assert_eq!(tracker.allocate_blocks_to_batch(1000).unwrap().len(), 1);
    assert!(tracker.complete_batch(1000, 1000).unwrap().is_empty());
    let files = tracker.log_file_count().unwrap();

    // The next batch is empty and its cleanup forgets the block of batch 1000: one append.
    assert!(tracker.allocate_blocks_to_batch(2000).unwrap().is_empty());
    assert_eq!(
        tracker.log_file_count().unwrap(),
        files,
        "an empty allocation is not logged"
    );
    assert_eq!(tracker.complete_batch(2000, 2000).unwrap(), vec![id]);
    assert_eq!(tracker.log_file_count().unwrap(), files + 1, "the cleanup is logged");

    // Idle from here on: nothing more is written.
    for t in [3000, 4000, 5000] {
        assert!(tracker.allocate_blocks_to_batch(t).unwrap().is_empty());
        assert!(tracker.complete_batch(t, t).unwrap().is_empty());
    }
    assert_eq!(tracker.log_file_count().unwrap(), files + 1);
    assert_eq!(tracker.last_allocated(), Some(5000));

    // A crash forgets the empty batches; the block is gone, the shard's position is not.
    drop(tracker);
    let (tracker, recovered) = open(&store, 1000, false);
    assert!(recovered.pending_batches.is_empty());
    assert_eq!(recovered.unallocated_blocks, 0);
    assert_eq!(recovered.last_allocated, Some(1000));
    assert_eq!(recovered.resume_after.len(), 1);
    assert_eq!(recovered.resume_after[0].2.sequence, SequenceNumber::from_u128(19));
    assert!(tracker.blocks_of_batch(1000).is_empty());
}
