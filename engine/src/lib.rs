//! # sluice-engine
//!
//! The layer that wires Sluice together: it owns the [`StreamingContext`], the `DStream` graph,
//! the `ReceivedBlockTracker` and its `MetadataLog`, the job generator that cuts a batch every
//! interval, recovery after a crash, backpressure and metrics.
//!
//! It is the only crate that knows about all three lower crates: receivers (`sluice-receiver`)
//! push blocks into the block store (`sluice-blockstore`) through the engine, and the operator
//! kernels (`sluice-operators`) run over the blocks of each batch.
//!
//! ## The durability order
//!
//! Every change keeps this order (ARCHITECTURE §6):
//! 1. a block is stored at its storage level;
//! 2. its `BlockAdded` is durable in the metadata log;
//! 3. only then may its shards' checkpoints advance to the ranges' ends;
//! 4. a batch's `BatchAllocated` is durable before its jobs run;
//! 5. the batch's output is committed (idempotently, keyed by batch time), its operator state is
//!    snapshotted, then `BatchCompleted` is logged;
//! 6. blocks and log entries are cleaned up only behind completed batches.

// Layers, each using only those listed before it (no import circles): `error` and `config` are
// plain data; `exec` runs stages (the `Node` contract, the task runner, caches, dead letters);
// `plan` is what a program computes (DStream nodes, outputs); `runtime` executes a frozen plan
// (job generator, ingest, metadata logs, membership, snapshots, metrics, status); `monitor`
// serves a runtime's status over HTTP (Prometheus metrics, status page); `context` is the
// user's entry point over all of them.
mod batch_time;
mod config;
mod context;
mod error;
mod exec;
mod monitor;
mod plan;
mod runtime;
#[cfg(feature = "testing")]
pub mod testing;

pub use batch_time::BatchTime;
pub use config::{
    BackpressureConfig, DEFAULT_BATCH_INTERVAL, DEFAULT_DATA_DIR, DEFAULT_DERIVATIVE, DEFAULT_ERROR_RATE_BOUND,
    DEFAULT_INTEGRAL, DEFAULT_MAX_TASK_ATTEMPTS, DEFAULT_MIN_RATE, DEFAULT_PROPORTIONAL, StreamingConfig,
};
#[cfg(feature = "kinesis")]
pub use context::KinesisInput;
pub use context::{StreamingContext, StreamingContextBuilder};
pub use error::{BoxError, Error, Result};
pub use exec::{Data, DeadLetter, FailurePolicy, JobError, Key, TaskError, TrackedBlock};
pub use monitor::{MONITOR_HEADER_READ_TIMEOUT, MONITOR_MAX_CONNECTIONS};
pub use plan::dstream::DStream;
pub use plan::map_with_state::{DEFAULT_FULL_SNAPSHOT_EVERY, MapWithStateStream, State, StateSpec};
pub use plan::outputs::OutputError;
pub use plan::window::Window;
pub use runtime::metrics::{
    BatchDelays, BatchInfo, DELAY_BUCKETS_MS, DelayHistogram, HealthEvent, MetricsSnapshot, RECENT_BATCHES,
    RECENT_HEALTH_EVENTS, RECENT_REPLAYS, RecoveryKind, RecoveryStatus, ReplayInfo,
};
pub use runtime::status::{AdoptionStatus, DetectorStatus, InputStatus, RunState, StreamingStatus};
pub use runtime::tracker::DEFAULT_COMPACT_EVERY;
/// How a stop treats accepted work; the same enum at every layer (generator, receiver, engine).
pub use sluice_receiver::StopMode;

/// The engine's internal components, for model tests and tools (feature `testing`): the metadata
/// log, the block tracker, the checkpoint store and the PID rate estimator. Not part of the
/// supported API.
#[cfg(feature = "testing")]
pub mod internals {
    pub use crate::runtime::checkpoint_store::CheckpointStore;
    pub use crate::runtime::metadata_log::{LogEvent, MetadataLog};
    pub use crate::runtime::rate_estimator::PidRateEstimator;
    pub use crate::runtime::tracker::{ReceivedBlockTracker, RecoveredState};
}
