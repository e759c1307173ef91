//! # Sluice
//!
//! Micro-batch stream processing over Amazon Kinesis or an embedded, replayable local log — in
//! the lineage of Spark Streaming's Kinesis integration, rebuilt so that no single failure loses
//! or silently skips a record.
//!
//! This facade re-exports the four crates and a [`prelude`]:
//! - [`blockstore`]: sequence numbers, ranges, blocks, the replicated block store, replay;
//! - [`receiver`]: receivers, the block generator, sources (local log; Kinesis), leases;
//! - [`operators`]: per-batch kernels, windows, state, Parquet sinks;
//! - [`engine`]: `StreamingContext`, `DStream`, the metadata log, scheduling and recovery.
//!
//! Why the split: each layer can be tested on its own with real components, and the dependency
//! direction (`blockstore ← receiver`, `blockstore ← operators`, all three `← engine`) keeps
//! sources and kernels from knowing about each other. Only the engine wires them together.

pub use sluice_blockstore as blockstore;
pub use sluice_engine as engine;
pub use sluice_operators as operators;
pub use sluice_receiver as receiver;

/// The types most pipelines use.
pub mod prelude {
    pub use sluice_blockstore::{Position, SequenceNumber, SequenceNumberRange, SequenceNumberRanges, StorageLevel};
    pub use sluice_engine::{DStream, FailurePolicy, StreamingContext};
}
