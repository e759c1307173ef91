//! # sluice-receiver
//!
//! Receivers: they read sharded, replayable sources and turn what they read into blocks tagged
//! with the exact ranges they cover.
//!
//! It owns the [`Source`] seam (the embedded local log; Kinesis later), the shared shard-reading
//! loop, the `BlockGenerator` with its bounded queue and rate limiter, the receiver lifecycle, and
//! leases and checkpoints (`LeaseStore`). It depends only on `sluice-blockstore` and must never
//! know about operators or the engine: the engine plugs in through the `BlockHandler` trait.

mod source;

pub use source::{ReadBatch, ShardInfo, ShardReader, Source, SourceError, StartingPosition};
