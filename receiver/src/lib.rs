//! # sluice-receiver
//!
//! Receivers: they read sharded, replayable sources and turn what they read into blocks tagged
//! with the exact ranges they cover.
//!
//! It owns:
//! - the [`Source`] seam (a sharded, replayable log: list shards with parent/child links, read a
//!   shard from a position, replay a range exactly) and its embedded implementation, the
//!   [`local_log`]; with the `kinesis` feature, the Kinesis source (`kinesis`) plugs into the same
//!   seam and a `DynamoDB` table (KCL schema) holds the leases;
//! - the shared shard-reading loop (one thread per owned shard: pacing, end-of-shard, children
//!   only after every parent is finished), inside the [`Receiver`];
//! - the [`BlockGenerator`] with its bounded queue (producers block, nothing is dropped) and the
//!   run-time adjustable [`RateLimiter`];
//! - leases and checkpoints ([`LeaseStore`], [`LocalLeaseStore`]) modelled on the KCL lease table.
//!
//! It depends only on `sluice-blockstore` and must never know about operators or the engine: the
//! engine plugs in through [`BlockHandler`], which stores a block and makes its metadata durable
//! before it returns. The receiver records a block's ranges as stored only after that, and
//! checkpoints only stored positions — durability order step 3.
//!
//! Threads, not async: each receiver runs a supervisor, a coordinator (leases, checkpoints), one
//! reader per owned shard, and the generator's timer and pusher. Every thread has an owner that
//! joins it; time comes from the injected clock.

#[cfg(feature = "kinesis")]
mod aws;
mod block_generator;
mod config_error;
mod file_lock;
#[cfg(feature = "kinesis")]
pub mod kinesis;
mod lease;
pub mod local_log;
mod named_counter;
mod rate_limiter;
mod receiver;
mod signal;
mod source;
mod stop_mode;
#[cfg(feature = "testing")]
pub mod testing;

#[cfg(feature = "kinesis")]
pub use aws::{AwsSettings, http_client as aws_http_client};
/// The AWS SDK for Kinesis this crate is built with, for code that needs the bare client next to
/// the [`kinesis`] source (the Kinesis benchmark measures the emulator's raw `GetRecords` rate
/// with it). Re-exported so that such code needs no dependency of its own on the SDK — a
/// dev-dependency of the facade would be compiled for every example, even word count on the
/// local log — and always gets the same version.
#[cfg(feature = "kinesis")]
pub use aws_sdk_kinesis;
pub use block_generator::{
    BlockGenerator, BlockGeneratorBuilder, BlockGeneratorConfig, BlockGeneratorStartError, BlockHandler,
    GeneratorError, GeneratorMetrics, GeneratorPhase, GeneratorStats, HandlerError, WhenFull,
};
pub use config_error::ConfigError;
pub use lease::{
    Checkpoint, Lease, LeaseError, LeaseFence, LeaseKind, LeaseStore, LocalLeaseStore, WORKER_LEASE_PREFIX,
    WorkerDirectory, WorkerRegistry, WorkerScan, WorkerStatus, split_multi_stream_key, worker_lease_key,
};
#[cfg(feature = "kinesis")]
pub use lease::{DynamoConnectError, DynamoLeaseMetrics, DynamoLeaseOptions, DynamoLeaseStore};
pub use local_log::{LocalLog, LocalLogError, LocalStream, Producer};
pub use named_counter::NamedCounter;
pub use rate_limiter::RateLimiter;
pub use receiver::{
    InitialPosition, Receiver, ReceiverConfig, ReceiverError, ReceiverMetrics, ReceiverState, ReceiverStatus,
    ShardMetrics, default_worker_id,
};
pub use source::{ReadBatch, ReadPacing, ShardInfo, ShardReader, Source, SourceError, SourceRelease, StartingPosition};
pub use stop_mode::StopMode;
