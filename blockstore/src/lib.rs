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
//! - [`StorageLevel`] and the block store with its memory, disk and object-store replica tiers;
//! - the [`Replay`] seam and the `BlockReader` that falls back to it when a block is gone.
//!
//! It must never know about receivers, sources, operators or the engine: `receiver` and
//! `operators` build on it, and only `engine` wires them together.

mod block;
mod clock;
mod error;
mod level;
mod range;
mod record;
mod replay;
mod sequence;

pub use block::{Block, BlockId, BlockMeta, block_schema};
pub use clock::{Clock, ManualClock, SharedClock, SystemClock};
pub use error::{Error, Result};
pub use level::{ParseStorageLevelError, StorageLevel};
pub use range::{SequenceNumberRange, SequenceNumberRanges};
pub use record::Record;
pub use replay::{Replay, ReplayError};
pub use sequence::{MAX_SEQUENCE_DIGITS, ParseSequenceNumberError, Position, SequenceNumber};

pub use arrow_array::RecordBatch;
pub use bytes::Bytes;
