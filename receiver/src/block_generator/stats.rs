//! What a generator reports: shared counters and snapshots.

use std::sync::atomic::AtomicU64;

use super::error::GeneratorError;

/// Counters a generator updates; share one across generators to keep totals over restarts.
#[derive(Debug, Default)]
pub struct GeneratorMetrics {
    /// Blocks stored (handler returned `Ok`).
    pub blocks_stored: AtomicU64,
    /// Records in stored blocks.
    pub records_stored: AtomicU64,
    /// Payload bytes in stored blocks.
    pub bytes_stored: AtomicU64,
    /// Store attempts that failed and were retried.
    pub push_retries: AtomicU64,
    /// Times a producer had to wait for room (backpressure).
    pub producer_waits: AtomicU64,
}

/// Where the generator is in its life.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GeneratorPhase {
    /// Accepting records.
    Active,
    /// Stopping with [`StopMode::Graceful`](crate::StopMode::Graceful): no new records; buffered
    /// ones are being stored.
    Draining,
    /// Stopped; everything accepted was stored (or discarded by
    /// [`StopMode::Immediate`](crate::StopMode::Immediate)).
    Stopped,
    /// A block could not be stored; nothing after it will be.
    Failed(GeneratorError),
}

/// A snapshot of the generator's buffers and counters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratorStats {
    /// Phase.
    pub phase: GeneratorPhase,
    /// Records buffered (current buffer + queue + the block being stored).
    pub buffered_records: usize,
    /// Memory held by buffered records, as
    /// [`Record::memory_bytes`](sluice_blockstore::Record::memory_bytes) counts it (current
    /// buffer + queue + the block being stored).
    pub buffered_bytes: usize,
    /// Sealed blocks waiting for the pusher.
    pub queued_blocks: usize,
    /// Whether a block is being stored right now.
    pub storing: bool,
    /// Producers blocked waiting for room.
    pub waiting_producers: usize,
    /// Records accepted since start.
    pub records_added: u64,
    /// Records whose block was stored.
    pub records_stored: u64,
    /// Blocks stored by this generator.
    pub blocks_stored: u64,
}
