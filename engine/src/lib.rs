//! # sluice-engine
//!
//! The layer that wires Sluice together: it owns the [`StreamingContext`], the `DStream` graph,
//! the [`ReceivedBlockTracker`] and its [`MetadataLog`], the job generator that cuts a batch every
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

mod checkpoint_store;
mod context;
mod dead_letters;
mod dstream;
mod error;
pub mod graph;
mod ingest_gate;
mod input;
pub mod map_with_state;
mod membership;
mod metadata_log;
mod metrics;
mod outputs;
mod rate_estimator;
mod state;
mod tracker;
mod window;

pub use checkpoint_store::CheckpointStore;
pub use context::{
    DEFAULT_BATCH_INTERVAL, DEFAULT_DATA_DIR, DEFAULT_MAX_TASK_ATTEMPTS, StreamingContext, StreamingContextBuilder,
};
pub use dstream::{DStream, Data, Key};
pub use error::{Error, Result};
pub use graph::{DeadLetter, FailurePolicy, JobError, TaskError};
#[cfg(feature = "kinesis")]
pub use input::KinesisInput;
pub use map_with_state::{DEFAULT_FULL_SNAPSHOT_EVERY, MapWithStateStream, State, StateSpec};
pub use metadata_log::{LogEvent, MetadataLog};
pub use metrics::{BatchInfo, DEFAULT_ERROR_RATE_BOUND, HealthEvent, MetricsSnapshot};
pub use outputs::{BoxError, OutputError};
pub use rate_estimator::{
    BackpressureConfig, DEFAULT_DERIVATIVE, DEFAULT_INTEGRAL, DEFAULT_MIN_RATE, DEFAULT_PROPORTIONAL, PidRateEstimator,
};
pub use tracker::{DEFAULT_COMPACT_EVERY, ReceivedBlockTracker, RecoveredState, TrackedBlock};
