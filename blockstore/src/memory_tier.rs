//! [`MemoryTier`]: a byte-bounded, least-recently-used cache of blocks.
//!
//! The design and its invariants are documented on [`MemoryTier`].

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::{Block, BlockId, BlockTier, Error, Result, SharedClock, StorageLevel, StoredBlock};

/// A block evicted from the memory tier, with the level it was stored at.
#[derive(Debug, Clone)]
pub struct EvictedBlock {
    /// The evicted block.
    pub block: Block,
    /// The level it was inserted with (decides whether it spills to disk or is dropped).
    pub level: StorageLevel,
}

/// A block refused by [`MemoryTier::insert`] because it is larger than the whole budget; the
/// block is handed back.
#[derive(Debug, Clone)]
pub struct TooLargeForMemory {
    /// The refused block.
    pub block: Block,
    /// What it would be charged.
    pub size_bytes: usize,
    /// The tier's budget.
    pub budget_bytes: usize,
}

/// A byte-bounded LRU cache of blocks.
///
/// Each block is charged [`Block::memory_size`]. The tier never holds more than its budget: a
/// block that does not fit evicts least-recently-used blocks until it does, and the evicted blocks
/// are handed back to the caller ([`MemoryTier::insert`]) so the [`BlockStore`](crate::BlockStore)
/// can spill them to disk or count them as dropped, per the level they were stored at. A block
/// larger than the whole budget is refused and handed back ([`TooLargeForMemory`]).
///
/// The charge covers the copy the tier holds. A block handed to a reader shares the same Arrow
/// buffers; a reader that keeps it after it is evicted keeps that memory alive outside the budget.
///
/// ```
/// use std::sync::Arc;
/// use sluice_blockstore::testing::{sample_block, sample_records};
/// use sluice_blockstore::{MemoryTier, StorageLevel, SystemClock};
///
/// let a = sample_block(1, &sample_records("shard-0", 0, 10, 1_000));
/// let b = sample_block(2, &sample_records("shard-0", 10, 10, 1_000));
/// let tier = MemoryTier::new(a.memory_size() + b.memory_size() / 2, Arc::new(SystemClock));
/// assert!(tier.insert(a.clone(), StorageLevel::MEMORY_ONLY)?.is_empty());
/// let evicted = tier.insert(b, StorageLevel::MEMORY_AND_DISK)?;
/// assert_eq!(evicted[0].block.id(), a.id()); // `a` made room for `b`
/// assert!(tier.used_bytes() <= tier.budget_bytes());
/// # Ok::<(), sluice_blockstore::TooLargeForMemory>(())
/// ```
#[derive(Debug)]
pub struct MemoryTier {
    budget_bytes: usize,
    clock: SharedClock,
    state: Mutex<LruState>,
}

#[derive(Debug, Default)]
struct LruState {
    entries: HashMap<BlockId, Entry>,
    /// Last-use tick → id; the first entry is the least recently used.
    order: BTreeMap<u64, BlockId>,
    next_tick: u64,
    used_bytes: usize,
    evictions: u64,
}

#[derive(Debug)]
struct Entry {
    block: Block,
    level: StorageLevel,
    size_bytes: usize,
    tick: u64,
    stored_at_ms: i64,
}

impl LruState {
    fn tick(&mut self) -> u64 {
        self.next_tick += 1;
        self.next_tick
    }

    fn take(&mut self, id: BlockId) -> Option<Entry> {
        let entry = self.entries.remove(&id)?;
        self.order.remove(&entry.tick);
        self.used_bytes -= entry.size_bytes;
        Some(entry)
    }
}

impl MemoryTier {
    /// An empty tier holding at most `budget_bytes`; `clock` stamps each copy's stored time.
    pub fn new(budget_bytes: usize, clock: SharedClock) -> Self {
        Self {
            budget_bytes,
            clock,
            state: Mutex::new(LruState::default()),
        }
    }

    /// Caches `block`, tagged with the `level` it is stored at, evicting least-recently-used
    /// blocks until it fits. Returns the evicted blocks (possibly none). Inserting an id that is
    /// already cached replaces the copy and marks it most recently used.
    ///
    /// # Errors
    /// [`TooLargeForMemory`], handing `block` back, if it is larger than the whole budget; nothing
    /// is evicted then.
    pub fn insert(&self, block: Block, level: StorageLevel) -> Result<Vec<EvictedBlock>, TooLargeForMemory> {
        let size_bytes = block.memory_size();
        if size_bytes > self.budget_bytes {
            return Err(TooLargeForMemory {
                block,
                size_bytes,
                budget_bytes: self.budget_bytes,
            });
        }
        let stored_at_ms = self.clock.now_ms();
        let mut state = self.state.lock().expect("memory tier lock");
        state.take(block.id());
        let mut evicted = Vec::new();
        while state.used_bytes + size_bytes > self.budget_bytes {
            let Some((_, victim)) = state.order.pop_first() else {
                break;
            };
            if let Some(entry) = state.entries.remove(&victim) {
                state.used_bytes -= entry.size_bytes;
                state.evictions += 1;
                evicted.push(EvictedBlock {
                    block: entry.block,
                    level: entry.level,
                });
            }
        }
        let tick = state.tick();
        state.order.insert(tick, block.id());
        state.used_bytes += size_bytes;
        state.entries.insert(
            block.id(),
            Entry {
                block,
                level,
                size_bytes,
                tick,
                stored_at_ms,
            },
        );
        Ok(evicted)
    }

    /// The cached block `id`, marking it most recently used.
    pub fn get_block(&self, id: BlockId) -> Option<Block> {
        let mut state = self.state.lock().expect("memory tier lock");
        let tick = state.tick();
        let entry = state.entries.get_mut(&id)?;
        let old = std::mem::replace(&mut entry.tick, tick);
        let block = entry.block.clone();
        state.order.remove(&old);
        state.order.insert(tick, id);
        Some(block)
    }

    /// Removes `id`; returns whether it was cached.
    pub fn remove_block(&self, id: BlockId) -> bool {
        self.state.lock().expect("memory tier lock").take(id).is_some()
    }

    /// Whether `id` is cached (without marking it used).
    pub fn contains_block(&self, id: BlockId) -> bool {
        self.state.lock().expect("memory tier lock").entries.contains_key(&id)
    }

    /// The budget in bytes.
    pub fn budget_bytes(&self) -> usize {
        self.budget_bytes
    }

    /// Bytes charged for the cached blocks; never more than [`budget_bytes`](Self::budget_bytes).
    pub fn used_bytes(&self) -> usize {
        self.state.lock().expect("memory tier lock").used_bytes
    }

    /// Number of cached blocks.
    pub fn len(&self) -> usize {
        self.state.lock().expect("memory tier lock").entries.len()
    }

    /// Whether no block is cached.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Blocks evicted to make room, since the tier was created.
    pub fn evictions(&self) -> u64 {
        self.state.lock().expect("memory tier lock").evictions
    }
}

/// The tier interface over [`MemoryTier::insert`]: blocks put this way are tagged
/// [`StorageLevel::MEMORY_ONLY`], and blocks they evict are dropped (counted in
/// [`MemoryTier::evictions`]).
impl BlockTier for MemoryTier {
    fn put(&self, block: &Block) -> Result<()> {
        match self.insert(block.clone(), StorageLevel::MEMORY_ONLY) {
            Ok(_evicted) => Ok(()),
            Err(refused) => Err(Error::TooLargeForMemory {
                id: refused.block.id(),
                size_bytes: refused.size_bytes,
                budget_bytes: refused.budget_bytes,
            }),
        }
    }

    fn get(&self, id: BlockId) -> Result<Option<Block>> {
        Ok(self.get_block(id))
    }

    fn remove(&self, id: BlockId) -> Result<()> {
        self.remove_block(id);
        Ok(())
    }

    fn contains(&self, id: BlockId) -> Result<bool> {
        Ok(self.contains_block(id))
    }

    fn list(&self) -> Result<Vec<StoredBlock>> {
        let state = self.state.lock().expect("memory tier lock");
        Ok(state
            .entries
            .iter()
            .map(|(id, e)| StoredBlock {
                id: *id,
                stored_at_ms: e.stored_at_ms,
                size_bytes: e.size_bytes as u64,
            })
            .collect())
    }
}

impl std::fmt::Display for TooLargeForMemory {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "block {} needs {} bytes of memory, more than the whole budget of {} bytes",
            self.block.id(),
            self.size_bytes,
            self.budget_bytes
        )
    }
}

impl std::error::Error for TooLargeForMemory {}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ManualClock;
    use crate::testing::{sample_block, sample_records};

    fn block(seq: u64, bytes: usize) -> Block {
        sample_block(seq, &sample_records("s", u128::from(seq) * 100, 4, bytes / 4))
    }

    #[test]
    fn evicts_least_recently_used_first() {
        let (a, b, c) = (block(1, 4000), block(2, 4000), block(3, 4000));
        let budget = a.memory_size() + b.memory_size() + c.memory_size() / 2;
        let tier = MemoryTier::new(budget, Arc::new(ManualClock::new(0)));
        tier.insert(a.clone(), StorageLevel::MEMORY_ONLY).unwrap();
        tier.insert(b.clone(), StorageLevel::MEMORY_ONLY).unwrap();
        assert!(
            tier.get_block(a.id()).is_some(),
            "touch a: b is now least recently used"
        );
        let evicted = tier.insert(c.clone(), StorageLevel::DISK_ONLY).unwrap();
        assert_eq!(evicted.len(), 1);
        assert_eq!(evicted[0].block.id(), b.id());
        assert!(tier.contains_block(a.id()) && tier.contains_block(c.id()));
        assert!(tier.used_bytes() <= budget);
        assert_eq!(tier.evictions(), 1);
    }

    #[test]
    fn refuses_a_block_bigger_than_the_budget_without_evicting() {
        let small = block(1, 400);
        let big = block(2, 40_000);
        let tier = MemoryTier::new(big.memory_size() - 1, Arc::new(ManualClock::new(0)));
        tier.insert(small.clone(), StorageLevel::MEMORY_ONLY).unwrap();
        let refused = tier.insert(big.clone(), StorageLevel::MEMORY_ONLY).unwrap_err();
        assert_eq!(refused.block.id(), big.id());
        assert!(tier.contains_block(small.id()));
        assert_eq!(tier.used_bytes(), small.memory_size());
    }

    #[test]
    fn reinsert_replaces_without_double_charging() {
        let a = block(1, 1000);
        let tier = MemoryTier::new(10 * a.memory_size(), Arc::new(ManualClock::new(0)));
        tier.insert(a.clone(), StorageLevel::MEMORY_ONLY).unwrap();
        tier.insert(a.clone(), StorageLevel::MEMORY_ONLY).unwrap();
        assert_eq!(tier.used_bytes(), a.memory_size());
        assert_eq!(tier.len(), 1);
        assert!(tier.remove_block(a.id()));
        assert_eq!(tier.used_bytes(), 0);
        assert!(!tier.remove_block(a.id()));
    }
}
