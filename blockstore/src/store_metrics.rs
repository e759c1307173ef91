//! [`BlockStoreMetrics`]: the block store's counters and gauges.

use std::sync::atomic::{AtomicU64, Ordering};

macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        /// The store's atomic counters (incremented with relaxed ordering: they are statistics).
        #[derive(Debug, Default)]
        pub(crate) struct Counters {
            $(pub(crate) $name: AtomicU64,)*
        }

        impl Counters {
            fn fill(&self, metrics: &mut BlockStoreMetrics) {
                $(metrics.$name = self.$name.load(Ordering::Relaxed);)*
            }
        }

        /// A snapshot of a [`BlockStore`](crate::BlockStore)'s metrics.
        ///
        /// Counters only grow over the store's life; `memory_*` fields are gauges read at the
        /// snapshot. [`BlockReader`](crate::BlockReader)s count their replays in the metrics of
        /// the store they read from.
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
        #[non_exhaustive]
        pub struct BlockStoreMetrics {
            /// Gauge: bytes the memory tier is charged for its blocks (never above the budget).
            pub memory_bytes_in_use: u64,
            /// Gauge: the memory tier's budget.
            pub memory_budget_bytes: u64,
            /// Gauge: blocks in the memory tier.
            pub memory_blocks: u64,
            $($(#[doc = $doc])* pub $name: u64,)*
        }
    };
}

counters! {
    /// Successful `put`s.
    blocks_stored,
    /// Payload bytes ([`BlockMeta::num_bytes`](crate::BlockMeta::num_bytes)) of successful `put`s.
    bytes_stored,
    /// Copies written to the replica tier (by `put`).
    replicated,
    /// Blocks evicted from the memory tier to make room.
    evictions,
    /// Evicted blocks written to disk because their level includes disk and no disk copy existed.
    spilled_to_disk,
    /// Evicted blocks whose spill to disk failed (an I/O error).
    spill_failures,
    /// Evicted blocks that had no other copy (`MEMORY_ONLY`, or a failed spill with no replica):
    /// a later read rebuilds them by replay.
    dropped_on_eviction,
    /// Blocks larger than the whole memory budget, so not cached (stored in their other tiers).
    too_large_for_memory,
    /// Of those, blocks whose level names no other tier (`MEMORY_ONLY`): stored nowhere, rebuilt
    /// by replay when read.
    dropped_too_large,
    /// Copies that failed verification (checksum, torn file, wrong block) and were discarded.
    corrupt_copies,
    /// `get`s answered from memory.
    memory_hits,
    /// `get`s answered from disk.
    disk_hits,
    /// `get`s answered from the replica.
    replica_hits,
    /// `get`s that found no valid copy.
    misses,
    /// Tier operations that failed with an I/O or object-store error during `get` (the next tier
    /// was tried).
    tier_errors,
    /// Blocks put back into memory after a disk or replica hit.
    recached,
    /// Blocks rebuilt by replaying their ranges from the source.
    blocks_replayed,
    /// Records those replays returned.
    records_replayed,
    /// Calls to [`Replay::replay`](crate::Replay::replay), retries included.
    replay_attempts,
    /// Reads that gave up: replay failed for good (data expired, not retryable, retry timeout).
    replay_failures,
}

impl Counters {
    /// Adds one to `counter`.
    pub(crate) fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// Adds `n` to `counter`.
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// A snapshot with the memory gauges filled in by the caller.
    pub(crate) fn snapshot(
        &self,
        memory_bytes_in_use: u64,
        memory_budget_bytes: u64,
        memory_blocks: u64,
    ) -> BlockStoreMetrics {
        let mut metrics = BlockStoreMetrics {
            memory_bytes_in_use,
            memory_budget_bytes,
            memory_blocks,
            ..BlockStoreMetrics::default()
        };
        self.fill(&mut metrics);
        metrics
    }
}
