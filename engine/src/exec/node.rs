//! The execution contract: what a stage runs ([`Node`]), over what ([`BatchEnv`]), and the
//! seams the runtime fills in ([`ReadBlock`], [`BatchHistory`]).
//!
//! # The `Node` contract
//!
//! A node produces the elements of one batch, partition by partition:
//!
//! - [`prepare`](Node::prepare) runs once per batch before any `compute`, on the job thread: a
//!   stage boundary (shuffle, window, state, `transform`, `cache`) computes and caches its whole
//!   output there, running the stages below it through the [`StageRunner`](super::StageRunner);
//!   a narrow node forwards to its parent.
//! - [`compute`](Node::compute) pushes partition `p`'s elements into `emit`, on a pool thread,
//!   possibly several times (retries, the per-record fallback, several consumers). It must be
//!   deterministic for a given batch and must not block on other partitions. Narrow nodes call
//!   their parent's `compute` (fusion); a stage boundary emits from its cache.
//! - [`source_block`](Node::source_block) names the one input block behind a partition, when
//!   there is one, so failures can be pinned to input records; `Scope` carries the per-record
//!   restriction and the record cursor down the fused chain.
//! - [`forget`](Node::forget) drops per-batch caches once a batch completes (windows keep what
//!   they still cover).
//!
//! User closures run only inside `compute` (narrow operators) or inside tasks and barriers the
//! runner executes (reduce, window reduce and inverse, state updates, `transform`), so the
//! retries and the failure policy apply to all of them.

use std::collections::HashMap;
use std::hash::Hash;
use std::sync::Arc;

use sluice_blockstore::{Block, BlockMeta};

use super::dead_letters::{DeadLetterCollector, RecordCursor};
use super::runner::{JobError, StageRunner, TaskError};

/// Element types a stream can carry.
pub trait Data: Send + Sync + 'static {}
impl<T: Send + Sync + 'static> Data for T {}

/// Keys of keyed operators: hashed deterministically (`FxHash`) so a key lands in the same shuffle
/// partition in every run.
pub trait Key: Data + Clone + Eq + Hash {}
impl<T: Data + Clone + Eq + Hash> Key for T {}

/// A block of a batch, with whether its id is valid in this incarnation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrackedBlock {
    /// Id, ranges, size.
    pub meta: BlockMeta,
    /// `false` for blocks recovered from a previous run: their store copies may be gone, so
    /// reading goes to replay unless a valid copy is found.
    pub is_block_id_valid: bool,
}

/// Reads the blocks of a batch (the engine implements it with the block store + replay).
pub(crate) trait ReadBlock: Send + Sync {
    /// The block, from the store or rebuilt by replay.
    fn read(&self, block: &TrackedBlock) -> Result<Block, TaskError>;
}

/// Builds the environment of an earlier batch time (for windows after a restart).
pub(crate) trait BatchHistory: Send + Sync {
    /// The environment of batch `time_ms`, or `None` when that batch is unknown or cleaned.
    fn env_for(&self, time_ms: i64) -> Option<BatchEnv>;
}

/// Which metadata log a batch belongs to: this worker's own ([`OWN_INSTANCE`]) or that of a
/// worker whose log this process adopted. Stage caches and operator state are kept per instance,
/// so an adopted worker's batches run with that worker's state, beside this worker's own.
pub(crate) type InstanceId = u32;

/// The instance of this worker's own log.
pub(crate) const OWN_INSTANCE: InstanceId = 0;

/// Everything a node needs to compute one batch.
#[derive(Clone)]
pub(crate) struct BatchEnv {
    /// The metadata log the batch belongs to.
    pub instance: InstanceId,
    /// The worker whose identity the batch's output carries (the owner of that log).
    pub writer: Arc<str>,
    /// The batch time.
    pub time_ms: i64,
    /// The batch interval.
    pub interval_ms: i64,
    /// The blocks of this batch per input id, in allocation order.
    pub inputs: Arc<HashMap<u32, Vec<TrackedBlock>>>,
    /// Block reader.
    pub blocks: Arc<dyn ReadBlock>,
    /// Earlier batches.
    pub history: Arc<dyn BatchHistory>,
    /// The task runner (pool, retry, failure policy).
    pub runner: Arc<StageRunner>,
    /// This batch's dead letters (one per input record).
    pub dead_letters: Arc<DeadLetterCollector>,
}

impl BatchEnv {
    /// The batch time, as the public API names it.
    pub fn batch_time(&self) -> crate::BatchTime {
        crate::BatchTime::from_millis(self.time_ms)
    }
}

/// What a task passes down its fused chain to the input node.
#[derive(Clone, Copy, Default)]
pub(crate) struct Scope<'a> {
    /// Only this record of the source block, when set (the per-record fallback of a panicking
    /// partition).
    pub only_record: Option<usize>,
    /// The partition's block, already read (so the fallback reads it once, not once per record).
    pub block: Option<&'a Arc<Block>>,
    /// Where the input node says which record it is emitting (for fallible operators).
    pub cursor: Option<&'a RecordCursor>,
}

/// A node of the graph producing elements of type `T`.
pub(crate) trait Node<T>: Send + Sync {
    /// Number of partitions for this batch.
    fn num_partitions(&self, env: &BatchEnv) -> usize;
    /// Whether the stream has data at this batch time (windows are active only when they
    /// slide); outputs skip inactive streams.
    fn active(&self, _env: &BatchEnv) -> bool {
        true
    }
    /// Runs the stages this node depends on (bottom-up) and caches their output for the batch.
    ///
    /// # Errors
    /// The first stage failure that the failure policy turns into a stop.
    fn prepare(&self, env: &BatchEnv) -> Result<(), JobError>;
    /// Pushes the elements of one partition into `emit`. Only called after `prepare`.
    ///
    /// # Errors
    /// A task failure.
    fn compute(
        &self,
        env: &BatchEnv,
        scope: Scope<'_>,
        partition: usize,
        emit: &mut dyn FnMut(T),
    ) -> Result<(), TaskError>;
    /// The input block a partition reads, when the partition is a fused chain over one block.
    fn source_block(&self, env: &BatchEnv, partition: usize) -> Option<TrackedBlock>;
    /// Drops the per-batch caches of `instance` for batches up to `time_ms` (all of them with
    /// `i64::MAX`).
    fn forget(&self, instance: InstanceId, time_ms: i64);
}
