//! Model-based property test of [`BlockStore`] under a small memory budget.
//!
//! Random sequences of puts (at every named level, blocks of many sizes — some bigger than the
//! whole budget), gets, removes, memory pressure and restarts run against the store and against a
//! reference model (id → block and level). After every step:
//! - a block the store returns is exactly the block the model holds (never wrong bytes, never a
//!   removed block);
//! - a block whose level includes disk or a replica is always returned, across restarts;
//!   a `MEMORY_ONLY` block may be gone (then `get` is `None`);
//! - memory in use never exceeds the budget, and no copy is ever corrupt.

use std::collections::HashMap;
use std::sync::Arc;

use proptest::prelude::*;
use sluice_blockstore::testing::{sample_block, sample_records};
use sluice_blockstore::{Block, BlockStore, BlockStoreConfig, DiskSync, ManualClock, StorageLevel};

const BUDGET: u64 = 48 * 1024;
const KEYS: u64 = 8;

#[derive(Debug, Clone)]
enum Op {
    Put {
        key: u64,
        level: usize,
        records: usize,
        payload: usize,
    },
    Get {
        key: u64,
    },
    Remove {
        key: u64,
    },
    /// Puts several memory-only filler blocks (distinct ids) to push others out of memory.
    Pressure {
        blocks: u64,
    },
    /// Drops the store and opens it again on the same directory and replica.
    Restart,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        4 => (0..KEYS, 0..StorageLevel::NAMED.len(), 0_usize..40, 0_usize..1_500)
            .prop_map(|(key, level, records, payload)| Op::Put { key, level, records, payload }),
        4 => (0..KEYS).prop_map(|key| Op::Get { key }),
        2 => (0..KEYS).prop_map(|key| Op::Remove { key }),
        1 => (1_u64..4).prop_map(|blocks| Op::Pressure { blocks }),
        1 => Just(Op::Restart),
    ]
}

struct Harness {
    config: BlockStoreConfig,
    clock: Arc<ManualClock>,
    store: BlockStore,
    /// The reference model: key → (block, level).
    model: HashMap<u64, (Block, StorageLevel)>,
    /// Bumped on every put so a re-put after a remove carries different bytes than the old one.
    generation: u64,
    next_filler: u64,
}

impl Harness {
    fn new(dir: &std::path::Path, case: u64) -> Self {
        let config = BlockStoreConfig {
            memory_budget_bytes: BUDGET,
            disk_sync: DiskSync::Never,
            replica_url: Some(format!("memory://store-model-{}-{case}/replica", std::process::id())),
            ..BlockStoreConfig::new(dir)
        };
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let store = BlockStore::open_with_clock(config.clone(), clock.clone()).unwrap();
        Self {
            config,
            clock,
            store,
            model: HashMap::new(),
            generation: 0,
            next_filler: 1_000,
        }
    }

    fn block(&mut self, seq: u64, records: usize, payload: usize) -> Block {
        self.generation += 1;
        // The first sequence number encodes the generation, so bytes differ between generations.
        sample_block(
            seq,
            &sample_records("shard-0", u128::from(self.generation) * 1_000, records, payload),
        )
    }

    fn apply(&mut self, op: &Op) -> Result<(), TestCaseError> {
        match *op {
            Op::Put {
                key,
                level,
                records,
                payload,
            } => {
                if self.model.contains_key(&key) {
                    // Ids are immutable: the engine never re-puts a stored id with other content.
                    return Ok(());
                }
                let level = StorageLevel::NAMED[level].1;
                let block = self.block(key, records, payload);
                self.store.put(&block, level).unwrap();
                self.model.insert(key, (block, level));
            }
            Op::Get { key } => self.check(key)?,
            Op::Remove { key } => {
                self.store.remove(sample_block_id(key)).unwrap();
                self.model.remove(&key);
                prop_assert_eq!(
                    self.store.get(sample_block_id(key)).unwrap(),
                    None,
                    "removed block {} came back",
                    key
                );
            }
            Op::Pressure { blocks } => {
                for _ in 0..blocks {
                    let seq = self.next_filler;
                    self.next_filler += 1;
                    let filler = self.block(seq, 20, 1_000);
                    self.store.put(&filler, StorageLevel::MEMORY_ONLY).unwrap();
                }
            }
            Op::Restart => {
                let reopened = BlockStore::open_with_clock(self.config.clone(), self.clock.clone()).unwrap();
                self.store = reopened;
            }
        }
        let metrics = self.store.metrics();
        prop_assert!(
            metrics.memory_bytes_in_use <= BUDGET,
            "memory in use {} over the budget {}",
            metrics.memory_bytes_in_use,
            BUDGET
        );
        prop_assert_eq!(metrics.corrupt_copies, 0);
        Ok(())
    }

    fn check(&self, key: u64) -> Result<(), TestCaseError> {
        let got = self.store.get(sample_block_id(key)).unwrap();
        match (self.model.get(&key), got) {
            (None, None) => {}
            (None, Some(block)) => prop_assert!(
                false,
                "block {} was never stored or was removed, got {:?}",
                key,
                block.id()
            ),
            (Some((expected, _)), Some(block)) => {
                prop_assert!(block == *expected, "block {} came back with other bytes", key);
            }
            (Some((_, level)), None) => prop_assert!(!level.is_durable(), "block {} stored at {} was lost", key, level),
        }
        Ok(())
    }
}

fn sample_block_id(key: u64) -> sluice_blockstore::BlockId {
    sluice_blockstore::testing::sample_block_id(key)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn block_store_agrees_with_the_model(ops in proptest::collection::vec(op(), 1..40)) {
        static CASE: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let case = CASE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = tempfile::tempdir().unwrap();
        let mut harness = Harness::new(dir.path(), case);
        for op in &ops {
            harness.apply(op)?;
        }
        // Every block the model holds answers consistently at the end, too.
        for key in 0..KEYS {
            harness.check(key)?;
        }
    }
}
