//! [`BlockStore`]: a block's copies in memory, on local disk and on an object-store replica, per
//! its [`StorageLevel`].
//!
//! The design and its invariants are documented on [`BlockStore`].

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};

use crate::store_metrics::Counters;
use crate::{
    Block, BlockId, BlockStoreConfig, BlockStoreMetrics, BlockTier, DiskTier, Error, EvictedBlock, MemoryTier,
    ReplicaTier, Result, SharedClock, StorageLevel, SystemClock,
};

/// The tiers a [`BlockStore`] is made of, for [`BlockStore::from_tiers`] (tests wrap them in
/// fault-injecting tiers).
#[derive(Debug)]
pub struct BlockStoreTiers {
    /// The bounded memory tier.
    pub memory: MemoryTier,
    /// The local disk tier.
    pub disk: Arc<dyn BlockTier>,
    /// The object-store replica tier.
    pub replica: Arc<dyn BlockTier>,
}

/// Memory, disk and replica copies of blocks, per storage level.
///
/// # Invariants
///
/// - **A put is done only when every durable copy its level names is written.** `put` writes the
///   disk copy (if the level has disk), then the replica (if `replication >= 2`), and only then
///   caches the block in memory (if the level has memory). The engine logs `BlockAdded` only
///   after `put` returns, so a logged block always has its durable copies.
/// - **Memory is bounded.** The memory tier never holds more than its budget. An evicted block
///   spills to disk when its level includes disk and no disk copy exists, stays available from the
///   replica when its level has one, and is otherwise dropped and counted (replay rebuilds it). A
///   block larger than the whole budget is not cached; it lives in its other tiers, or — at
///   `MEMORY_ONLY` — nowhere, counted, until a read replays it.
/// - **Only verified bytes are returned.** `get` tries memory, then disk, then the replica. A copy
///   that fails its checksum is counted, removed from its tier (best effort) and skipped; it is
///   never returned.
///
/// The store remembers the level of every block it stored in this process (an id → level map, as
/// bounded as the blocks themselves: `remove` drops the entry). Copies left by an earlier run are
/// readable, listed, and removable (`remove`, `remove_older_than`), but not re-cached in memory,
/// since their level is unknown.
///
/// All methods take `&self` and block the calling thread; the store is `Send + Sync` and meant to
/// be shared (`Arc<BlockStore>`) by receivers and task threads. Do not call it from an async task
/// that must not block.
///
/// ```
/// use sluice_blockstore::testing::{sample_block, sample_records};
/// use sluice_blockstore::{BlockStore, BlockStoreConfig, StorageLevel};
///
/// let dir = tempfile::tempdir()?;
/// let store = BlockStore::open(BlockStoreConfig::new(dir.path()))?;
/// let block = sample_block(1, &sample_records("shard-0", 0, 100, 64));
/// store.put(&block, StorageLevel::MEMORY_AND_DISK_2)?;
/// assert_eq!(store.get(block.id())?, Some(block.clone()));
/// store.remove(block.id())?;
/// assert_eq!(store.get(block.id())?, None);
/// let metrics = store.metrics();
/// assert_eq!((metrics.blocks_stored, metrics.replicated, metrics.memory_hits), (1, 1, 1));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct BlockStore {
    memory: MemoryTier,
    disk: Arc<dyn BlockTier>,
    replica: Arc<dyn BlockTier>,
    /// Level of each block stored by this process. Also serialises spills with removals, so that a
    /// spill never brings back a block that is being removed.
    levels: Mutex<HashMap<BlockId, StorageLevel>>,
    pub(crate) counters: Counters,
}

/// Which of the durable tiers a copy was found in.
#[derive(Debug, Clone, Copy)]
enum DurableTier {
    Disk,
    Replica,
}

impl BlockStore {
    /// Opens the store `config` describes, with the system clock.
    ///
    /// # Errors
    /// As [`BlockStore::open_with_clock`].
    pub fn open(config: BlockStoreConfig) -> Result<Self> {
        Self::open_with_clock(config, Arc::new(SystemClock))
    }

    /// Opens the store `config` describes: validates it, creates `<data_dir>/blocks/` (deleting
    /// temporary files of interrupted writes) and opens the replica. `clock` stamps the stored
    /// time of memory and disk copies.
    ///
    /// # Errors
    /// [`Error::Config`] / [`Error::InvalidUrl`] for an invalid configuration; [`Error::Io`] if
    /// the block directory cannot be created; [`Error::ObjectStore`] / [`Error::Runtime`] if the
    /// replica cannot be set up.
    // Owned like every other `open(config)`; only borrowed inside for now.
    #[allow(clippy::needless_pass_by_value)]
    pub fn open_with_clock(config: BlockStoreConfig, clock: SharedClock) -> Result<Self> {
        config.validate()?;
        let budget = usize::try_from(config.memory_budget_bytes).map_err(|_| Error::Config {
            field: "memory_budget_bytes",
            reason: "does not fit this machine's address space".into(),
        })?;
        let disk = DiskTier::open(config.blocks_dir(), clock.clone(), config.disk_sync)?;
        let replica = ReplicaTier::open(&config.replica_location(), &config.replica_options_map())?;
        Ok(Self::from_tiers(BlockStoreTiers {
            memory: MemoryTier::new(budget, clock),
            disk: Arc::new(disk),
            replica: Arc::new(replica),
        }))
    }

    /// A store over the given tiers.
    pub fn from_tiers(tiers: BlockStoreTiers) -> Self {
        Self {
            memory: tiers.memory,
            disk: tiers.disk,
            replica: tiers.replica,
            levels: Mutex::new(HashMap::new()),
            counters: Counters::default(),
        }
    }

    /// Stores `block` at `level`; returns once every durable copy the level names (disk, replica)
    /// is written, after which it is cached in memory if the level says so.
    ///
    /// A failed put may leave copies in the tiers written before the failure; they are valid
    /// copies of the same immutable block, overwritten by a retry and deleted by
    /// [`remove`](Self::remove).
    ///
    /// # Errors
    /// [`Error::UnsupportedStorageLevel`] for a level naming no tier or more than two copies;
    /// the disk or replica tier's error (`Io` for a full disk, `ObjectStore` for an unreachable
    /// replica — both retryable); `Arrow` if the block cannot be encoded. A block too large for
    /// memory is not an error (see [`BlockStoreMetrics::too_large_for_memory`]).
    pub fn put(&self, block: &Block, level: StorageLevel) -> Result<()> {
        check_level(level)?;
        if level.use_disk {
            self.disk.put(block)?;
        }
        if level.use_replica() {
            self.replica.put(block)?;
            Counters::incr(&self.counters.replicated);
        }
        self.levels.lock().expect("levels lock").insert(block.id(), level);
        if level.use_memory {
            self.cache(block.clone(), level);
        }
        Counters::incr(&self.counters.blocks_stored);
        Counters::add(&self.counters.bytes_stored, block.meta().num_bytes);
        Ok(())
    }

    /// A verified copy of block `id` from memory, else disk, else the replica; `Ok(None)` when no
    /// valid copy exists. Corrupt copies are counted, removed and skipped. A disk or replica hit
    /// of a block stored at a memory level is cached in memory again.
    ///
    /// # Errors
    /// When no tier has a valid copy and a tier could not be read (I/O or object-store error),
    /// the first such error — the block may exist where it could not be looked for. Errors of a
    /// tier are not reported when a later tier has the block.
    pub fn get(&self, id: BlockId) -> Result<Option<Block>> {
        if let Some(block) = self.memory.get_block(id) {
            Counters::incr(&self.counters.memory_hits);
            return Ok(Some(block));
        }
        let mut first_error = None;
        for which in [DurableTier::Disk, DurableTier::Replica] {
            let tier = self.durable(which);
            match tier.get(id) {
                Ok(Some(block)) => {
                    Counters::incr(match which {
                        DurableTier::Disk => &self.counters.disk_hits,
                        DurableTier::Replica => &self.counters.replica_hits,
                    });
                    self.recache(&block);
                    return Ok(Some(block));
                }
                Ok(None) => {}
                Err(e @ Error::Corrupt { .. }) => {
                    Counters::incr(&self.counters.corrupt_copies);
                    tracing::warn!(block = %id, tier = ?which, error = %e, "discarding a corrupt copy");
                    if let Err(e) = tier.remove(id) {
                        tracing::warn!(block = %id, tier = ?which, error = %e, "could not remove a corrupt copy");
                    }
                }
                Err(e) => {
                    Counters::incr(&self.counters.tier_errors);
                    tracing::warn!(block = %id, tier = ?which, error = %e, "could not read a tier; trying the next");
                    first_error.get_or_insert(e);
                }
            }
        }
        Counters::incr(&self.counters.misses);
        first_error.map_or(Ok(None), Err)
    }

    /// Whether any tier holds a copy of `id` (not verified).
    ///
    /// # Errors
    /// A tier's error if it cannot be asked.
    pub fn contains(&self, id: BlockId) -> Result<bool> {
        Ok(self.memory.contains_block(id) || self.disk.contains(id)? || self.replica.contains(id)?)
    }

    /// Drops the memory copy of `id`, keeping its disk and replica copies; returns whether there
    /// was one. For a block whose work is done for now: its memory goes to the blocks still to
    /// be processed, and a later read finds a durable copy or, for a memory-only block, replays
    /// it from the source.
    pub fn uncache(&self, id: BlockId) -> bool {
        self.memory.remove_block(id)
    }

    /// Removes every copy of `id`. Removing an absent block is `Ok`.
    ///
    /// # Errors
    /// The first tier error; the other tiers are still tried.
    pub fn remove(&self, id: BlockId) -> Result<()> {
        // Holding the lock while the memory copy goes keeps a concurrent spill of this block from
        // writing it back (see `spill`).
        {
            let mut levels = self.levels.lock().expect("levels lock");
            levels.remove(&id);
            self.memory.remove_block(id);
        }
        let disk = self.disk.remove(id);
        let replica = self.replica.remove(id);
        disk.and(replica)
    }

    /// Removes every block with a copy stored before `cutoff_ms` (each tier's stored time, see
    /// [`StoredBlock::stored_at_ms`](crate::StoredBlock::stored_at_ms)) from all tiers, e.g. copies
    /// left behind by earlier runs. Returns how many blocks were removed.
    ///
    /// # Errors
    /// A tier's error if it cannot be listed; the first removal error (after trying the rest).
    pub fn remove_older_than(&self, cutoff_ms: i64) -> Result<usize> {
        let mut old = BTreeSet::new();
        for tier in [&self.memory as &dyn BlockTier, &*self.disk, &*self.replica] {
            old.extend(
                tier.list()?
                    .into_iter()
                    .filter(|stored| stored.stored_at_ms < cutoff_ms)
                    .map(|stored| stored.id),
            );
        }
        let mut first_error = None;
        for id in &old {
            if let Err(e) = self.remove(*id) {
                first_error.get_or_insert(e);
            }
        }
        first_error.map_or(Ok(old.len()), Err)
    }

    /// A snapshot of the metrics.
    pub fn metrics(&self) -> BlockStoreMetrics {
        self.counters.snapshot(
            self.memory.used_bytes() as u64,
            self.memory.budget_bytes() as u64,
            self.memory.len() as u64,
        )
    }

    /// The memory tier.
    pub fn memory_tier(&self) -> &MemoryTier {
        &self.memory
    }

    /// The disk tier.
    pub fn disk_tier(&self) -> &Arc<dyn BlockTier> {
        &self.disk
    }

    /// The replica tier.
    pub fn replica_tier(&self) -> &Arc<dyn BlockTier> {
        &self.replica
    }

    fn durable(&self, which: DurableTier) -> &dyn BlockTier {
        match which {
            DurableTier::Disk => &*self.disk,
            DurableTier::Replica => &*self.replica,
        }
    }

    /// Puts a block found on disk or in the replica back into memory if it was stored (by this
    /// process) at a level with memory.
    fn recache(&self, block: &Block) {
        let level = self.levels.lock().expect("levels lock").get(&block.id()).copied();
        if let Some(level) = level.filter(|l| l.use_memory) {
            Counters::incr(&self.counters.recached);
            self.cache(block.clone(), level);
        }
    }

    /// Caches `block` in memory and deals with what that evicts.
    fn cache(&self, block: Block, level: StorageLevel) {
        match self.memory.insert(block, level) {
            Ok(evicted) => {
                for victim in evicted {
                    self.spill(victim);
                }
            }
            Err(refused) => {
                Counters::incr(&self.counters.too_large_for_memory);
                if level.is_durable() {
                    tracing::debug!(block = %refused.block.id(), size = refused.size_bytes, "block larger than the memory budget; kept in its other tiers only");
                } else {
                    Counters::incr(&self.counters.dropped_too_large);
                    self.levels.lock().expect("levels lock").remove(&refused.block.id());
                    tracing::warn!(block = %refused.block.id(), size = refused.size_bytes, budget = refused.budget_bytes, level = %level, "block larger than the whole memory budget and its level has no other tier: not stored; reading it will replay it");
                }
            }
        }
    }

    /// Spills an evicted block to disk if its level includes disk and no disk copy exists, else
    /// drops it (counted) unless the replica holds it.
    #[allow(clippy::needless_pass_by_value)] // the evicted block is dropped here unless spilled
    fn spill(&self, victim: EvictedBlock) {
        Counters::incr(&self.counters.evictions);
        let id = victim.block.id();
        let mut levels = self.levels.lock().expect("levels lock");
        if !levels.contains_key(&id) {
            // Removed while it was being evicted: nothing to keep.
            return;
        }
        if victim.level.use_disk {
            let spilled = match self.disk.contains(id) {
                Ok(true) => Ok(false),
                Ok(false) | Err(_) => self.disk.put(&victim.block).map(|()| true),
            };
            match spilled {
                Ok(true) => Counters::incr(&self.counters.spilled_to_disk),
                Ok(false) => {}
                Err(e) => {
                    Counters::incr(&self.counters.spill_failures);
                    tracing::warn!(block = %id, error = %e, "could not spill an evicted block to disk");
                    if !victim.level.use_replica() {
                        Counters::incr(&self.counters.dropped_on_eviction);
                        levels.remove(&id);
                    }
                }
            }
        } else if !victim.level.use_replica() {
            Counters::incr(&self.counters.dropped_on_eviction);
            levels.remove(&id);
            tracing::debug!(block = %id, "evicted a MEMORY_ONLY block; reading it will replay it");
        }
    }
}

fn check_level(level: StorageLevel) -> Result<()> {
    if level.replication == 0 || level.replication > 2 {
        return Err(Error::UnsupportedStorageLevel {
            level,
            reason: "replication must be 1 or 2: the store keeps one local copy and at most one replica; use a named level such as MEMORY_AND_DISK_2",
        });
    }
    if !level.use_memory && !level.use_disk && !level.use_replica() {
        return Err(Error::UnsupportedStorageLevel {
            level,
            reason: "it names no tier; use a named level such as MEMORY_ONLY or DISK_ONLY",
        });
    }
    Ok(())
}
