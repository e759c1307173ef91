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
//! - [`input_reads`](Node::input_reads) counts how many times a batch reads each input block, so
//!   that a block leaves memory and the ingest gate after the last task that reads it is final
//!   ([`BlockReads`]) rather than when the whole batch completes.
//!
//! User closures run only inside `compute` (narrow operators) or inside tasks and barriers the
//! runner executes (reduce, window reduce and inverse, state updates, `transform`), so the
//! retries and the failure policy apply to all of them.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use sluice_blockstore::{Block, BlockId, BlockMeta};

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
    /// The batch has read `block` for the last time ([`BlockReads`]): it may leave memory and
    /// the ingest gate now. A read after all (the count was wrong) still gets it, from a durable
    /// copy or by replay.
    fn done_with(&self, block: &TrackedBlock);
}

/// How many times one batch reads each input's blocks, counted over the plan by
/// [`Node::input_reads`]: an input node reads its block once per partition it computes, a narrow
/// node reads what its parent reads, and a stage boundary (which computes its parent once per
/// batch in `prepare`, however many consume it) counts its parent only the first time the count
/// meets it.
#[derive(Debug, Default)]
pub(crate) struct InputReads {
    /// The stage boundaries met so far, by address.
    boundaries: HashSet<usize>,
    per_input: HashMap<u32, usize>,
}

impl InputReads {
    /// One more read of each block of `input_id`.
    pub fn input(&mut self, input_id: u32) {
        *self.per_input.entry(input_id).or_default() += 1;
    }

    /// Whether the count meets this stage boundary for the first time.
    pub fn first_visit<T>(&mut self, boundary: &T) -> bool {
        self.boundaries.insert(std::ptr::from_ref(boundary) as usize)
    }

    /// Reads of each block of `input_id` per batch.
    pub fn of(&self, input_id: u32) -> usize {
        self.per_input.get(&input_id).copied().unwrap_or(0)
    }
}

/// The reads of each block of one batch still to come (from the plan's [`InputReads`]). The task
/// runner counts a read when the partition that read the block ([`Node::source_block`]) has its
/// final result, so a task that fails, or a chunk whose earlier partitions run again, has not
/// counted it; after the last one the block is handed back ([`ReadBlock::done_with`]): the
/// receivers may fill the ingest gate with the next batch's blocks while this batch still runs its
/// later stages. A count too high only hands a block back when the batch completes, as before.
#[derive(Debug, Default)]
pub(crate) struct BlockReads {
    left: HashMap<BlockId, AtomicUsize>,
}

impl BlockReads {
    /// The countdown of a batch of these blocks.
    pub fn new(inputs: &HashMap<u32, Vec<TrackedBlock>>, reads: &InputReads) -> Self {
        let left = inputs
            .iter()
            .flat_map(|(&input_id, blocks)| {
                blocks
                    .iter()
                    .map(move |b| (b.meta.id, AtomicUsize::new(reads.of(input_id))))
            })
            .collect();
        Self { left }
    }

    /// Counts a final read of block `id`; `true` when it was the last one the plan makes.
    pub fn last_read(&self, id: BlockId) -> bool {
        self.left
            .get(&id)
            .is_some_and(|left| left.fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| n.checked_sub(1)) == Ok(1))
    }
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
    /// The reads of each block still to come in this batch.
    pub block_reads: Arc<BlockReads>,
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
    /// Counts into `reads` how many times running this node for a batch reads each input block
    /// (see [`InputReads`]).
    fn input_reads(&self, reads: &mut InputReads);
    /// Drops the per-batch caches of `instance` for batches up to `time_ms` (all of them with
    /// `i64::MAX`).
    fn forget(&self, instance: InstanceId, time_ms: i64);
}
