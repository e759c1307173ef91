//! Execution: how the stages of a batch run — the [`Node`] contract, the task runner, stage
//! caches and dead letters. It knows nothing of the runtime (the job generator, the block store,
//! the metadata log) except through the [`ReadBlock`] and [`BatchHistory`] seams.
//!
//! # Execution model
//!
//! A batch is computed by **stages**. Narrow operators (`map`, `flat_map`, `filter`,
//! `map_partitions`, `union`) are *fused*: a node computes one partition by asking its parent to
//! push elements into a closure, so a chain `blocks → flat_map → map → reduce_by_key` runs as one
//! rayon task per input block that never materialises the intermediate elements. Keyed operators,
//! whole-batch functions (`transform`), windows, state and outputs are stage boundaries: they run
//! the fused chain below them as tasks (one per partition, in parallel on the context's rayon
//! pool), shuffle or collect the results, and cache them for the rest of the batch.
//!
//! # Failures
//!
//! A task that fails (a panic in user code, or a block that cannot be read) is retried up to
//! `max_task_attempts` times. After that the [`FailurePolicy`] applies:
//! stop the stream (default), or — for stages that read input blocks — evaluate the partition
//! record by record, keep what succeeds and send each failing input record, with its shard,
//! position and the error, to the dead-letter sink. Records are never skipped silently.

mod cache;
mod dead_letters;
mod node;
mod runner;

pub(crate) use cache::{MapSizeHint, StageCache};
pub(crate) use dead_letters::{RecordCursor, reject};
pub(crate) use node::{
    BatchEnv, BatchHistory, BlockReads, InputReads, InstanceId, Node, OWN_INSTANCE, ReadBlock, Scope,
};
pub use node::{Data, Key, TrackedBlock};
pub use runner::{DeadLetter, FailurePolicy, JobError, TaskError};
pub(crate) use runner::{StageRunner, combine_by_key, combine_with};
