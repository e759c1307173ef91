//! # sluice-blockstore
//!
//! The bottom layer of Sluice: the data model every other crate shares and the replicated block
//! store.
//!
//! It owns:
//! - [`SequenceNumber`], [`Position`], [`SequenceNumberRange`] and [`SequenceNumberRanges`]: where
//!   records come from, exactly (Kinesis sequence numbers are up to 128 decimal digits, so they are
//!   kept as canonical decimal text and ordered numerically, never as strings);
//! - [`Record`] and [`Block`] (+ [`BlockId`], [`BlockMeta`]): immutable Arrow batches tagged with
//!   the ranges they cover, and their checksummed encoded form;
//! - [`StorageLevel`] and the [`BlockStore`] with its tiers — the bounded [`MemoryTier`], the
//!   [`DiskTier`] and the object-store [`ReplicaTier`] — behind one [`BlockTier`] contract;
//! - the [`Replay`] seam and the [`BlockReader`] that falls back to it when a block is gone.
//!
//! It must never know about receivers, sources, operators or the engine: `receiver` and
//! `operators` build on it, and only `engine` wires them together.
//!
//! ## Why it is built this way
//!
//! A block is lineage first, data second: its [`SequenceNumberRanges`] say how to re-read it from
//! the source, so every copy is a cache of the source that may be lost without losing data. That
//! is what lets the store bound memory (evict, spill, or drop `MEMORY_ONLY` blocks), treat a
//! corrupt copy exactly like a missing one, and survive a restart with nothing but the ranges in
//! the engine's metadata log. What the store guarantees in return is that it never returns wrong
//! bytes (every stored copy carries a CRC-32C, [`crc32c`], the project's one checksum) and that a
//! `put` returns only once the durable copies its level names exist, so the engine may log the
//! block and advance checkpoints.
//!
//! The API is synchronous: receivers and rayon task threads call it directly. The replica tier
//! owns a small tokio runtime for `object_store` and never leaves threads behind.
//!
//! `docs/blockstore.md` describes the behaviour at the limits (full budget, full disk, unreachable
//! replica, corrupt copies, restarts). Test doubles — an in-memory [`Replay`], fault-injecting
//! tiers, an auto-advancing clock, data generators — are in the `testing` module (feature
//! `testing`).

mod block;
mod block_builder;
mod checksum;
mod clock;
mod disk_tier;
mod error;
mod error_class;
mod ipc_stream;
mod level;
mod memory_tier;
mod object_location;
mod range;
mod reader;
mod record;
mod replay;
mod replica_tier;
mod sequence;
mod store;
mod store_config;
mod store_metrics;
mod tier;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use block::{Block, BlockId, BlockMeta, block_schema};
pub use block_builder::{BlockBuilder, BlockCapacity};
pub use checksum::crc32c;
pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use disk_tier::{DiskSync, DiskTier};
pub use error::{Error, Result};
pub use error_class::{Domain, ErrorClass};
pub use level::{ParseStorageLevelError, StorageLevel};
pub use memory_tier::{EvictedBlock, MemoryTier, TooLargeForMemory};
pub use object_location::{
    DEFAULT_OBJECT_STORE_MAX_RETRIES, DEFAULT_OBJECT_STORE_RETRY_TIMEOUT, object_store_from_url,
};
pub use range::{SequenceNumberRange, SequenceNumberRanges};
pub use reader::{
    BlockOrigin, BlockReader, BlockReaderConfig, DEFAULT_INITIAL_BACKOFF_MS, DEFAULT_MAX_BACKOFF_MS,
    DEFAULT_RETRY_TIMEOUT_MS, ReadError,
};
pub use record::Record;
pub use replay::{Replay, ReplayError};
pub use replica_tier::ReplicaTier;
pub use sequence::{MAX_SEQUENCE_DIGITS, ParseSequenceNumberError, Position, SequenceNumber};
pub use store::{BlockStore, BlockStoreTiers};
pub use store_config::{BlockStoreConfig, DEFAULT_DATA_DIR, DEFAULT_DISK_SYNC, DEFAULT_MEMORY_BUDGET_BYTES};
pub use store_metrics::BlockStoreMetrics;
pub use tier::{BlockTier, StoredBlock};

pub use arrow_array::RecordBatch;
pub use bytes::Bytes;
pub use object_store;
