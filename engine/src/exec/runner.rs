//! The task runner: runs a stage's tasks on the pool with retries, the failure policy and the
//! per-record fallback.

use std::any::Any;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use rayon::prelude::*;
use sluice_blockstore::{BlockId, Domain, ErrorClass, ReadError, Record};
use sluice_operators::shuffle::{CombineMap, Combiner, shuffle};

use super::cache::MapSizeHint;
use super::dead_letters::RecordCursor;
use super::node::{BatchEnv, Data, Key, Node, Scope, TrackedBlock};
use crate::BatchTime;

/// Why a task failed.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// User code panicked.
    #[error("user code panicked: {message}")]
    Panicked {
        /// The panic message.
        message: String,
    },
    /// An input block could not be read from the store nor replayed from the source. Retryable
    /// unless the source no longer holds the data ([`ReadError::is_data_lost`]: the engine
    /// reports it as `Error::DataLost`).
    #[error("input block {block} unavailable: {source}")]
    BlockUnavailable {
        /// The block.
        block: BlockId,
        /// What the block reader said (with the ranges).
        source: Arc<ReadError>,
    },
    /// A block of an input the program does not define (its log holds blocks of a program that
    /// had more inputs). Not retryable.
    #[error(
        "block {block} belongs to input {input}, which this program does not define: run the program that \
         logged it, or start with a new checkpoint location"
    )]
    UnknownInput {
        /// The block.
        block: BlockId,
        /// Its input id.
        input: u32,
    },
    /// A fallible operator (`try_map`, `try_flat_map`, `try_filter`) returned an error and the
    /// failure policy is `Stop`, or no single input record produced the element (after a shuffle,
    /// a window, a whole-batch function) so there is nothing to dead-letter. Not retryable: the
    /// same record fails again.
    #[error("{stage} rejected {record}: {error}")]
    Rejected {
        /// The operator, e.g. `try_map#2`.
        stage: String,
        /// `record <sequence> of shard <shard>`, or `an element with no single input record (…)`.
        record: String,
        /// The error's display text.
        error: String,
    },
    /// The context is stopping and its graceful-stop timeout passed: the batch was abandoned
    /// (it is logged and re-runs after a restart).
    #[error("abandoned: the context is stopping")]
    Cancelled,
}

impl TaskError {
    pub(crate) fn from_panic(payload: &Box<dyn Any + Send>) -> Self {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "non-string panic payload".to_owned());
        TaskError::Panicked { message }
    }

    /// Whether another attempt may succeed.
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    /// Where the error comes from and whether another attempt may succeed: a panic may be
    /// transient (retried, then isolated per record); a block that cannot be read is retried
    /// unless its data is lost; a rejected record stays rejected.
    pub fn class(&self) -> ErrorClass {
        match self {
            TaskError::Panicked { .. } => ErrorClass::transient(Domain::UserCode),
            TaskError::BlockUnavailable { source, .. } if source.is_data_lost() => {
                ErrorClass::permanent(Domain::DataLoss)
            }
            TaskError::BlockUnavailable { source, .. } => ErrorClass::transient(source.class().domain),
            TaskError::Rejected { .. } => ErrorClass::permanent(Domain::UserCode),
            TaskError::UnknownInput { .. } => ErrorClass::permanent(Domain::Internal),
            TaskError::Cancelled => ErrorClass::permanent(Domain::Lifecycle),
        }
    }
}

/// A failed batch: the policy said stop.
#[derive(Debug, Clone, thiserror::Error)]
#[error("batch {time}: task for partition {partition} failed after {attempts} attempts: {error}")]
pub struct JobError {
    /// The batch time.
    pub time: BatchTime,
    /// The failing partition.
    pub partition: usize,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
    #[source]
    pub error: TaskError,
}

/// What to do with a task that still fails after its retries.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailurePolicy {
    /// Stop the stream with the error (the default): nothing is skipped, the batch re-runs after a
    /// fix and restart.
    #[default]
    Stop,
    /// Send records that fail — an `Err` from a fallible operator (`try_map`, …), or a panic
    /// that keeps failing its task, isolated record by record — to the dead-letter sink with their
    /// shard, position and error; the rest of the batch proceeds. Each bad record is written once
    /// per batch. Applies to records of input blocks; failures after a shuffle, a window or a
    /// whole-batch function still stop the stream (no single input record is to blame).
    DeadLetter,
}

/// An input record that failed, for the dead-letter sink.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetter {
    /// The batch it belonged to.
    pub batch_time: BatchTime,
    /// The record, with its shard and position.
    pub record: Record,
    /// The error.
    pub error: String,
    /// Attempts made on it: 1 for an `Err` of a fallible operator; for a panic, the attempts on
    /// its partition before it was isolated, plus its own.
    pub attempts: u32,
    /// The operator that rejected it (`try_map#2`), or `panic` for one isolated after panics.
    pub stage: Arc<str>,
}

/// Runs stage tasks on the context's pool with retries and the failure policy.
pub(crate) struct StageRunner {
    pub pool: rayon::ThreadPool,
    pub max_attempts: u32,
    pub policy: FailurePolicy,
    /// Set when a graceful stop ran out of time: tasks stop between records.
    pub cancelled: std::sync::atomic::AtomicBool,
    pub task_failures: std::sync::atomic::AtomicU64,
    pub task_retries: std::sync::atomic::AtomicU64,
    pub tasks: std::sync::atomic::AtomicU64,
}

/// The stage name of dead letters isolated after panics (fallible operators use their own).
pub(crate) const PANIC_STAGE: &str = "panic";

type Task<'t, A> = dyn Fn(usize, Scope<'_>, &mut A) -> Result<(), TaskError> + Sync + 't;

/// What every task of one stage shares (see [`StageRunner::run`]).
struct Stage<'s, A> {
    env: &'s BatchEnv,
    new_acc: &'s (dyn Fn() -> A + Sync),
    /// The accumulator of one record of the per-record fallback.
    new_one: &'s (dyn Fn() -> A + Sync),
    merge: &'s (dyn Fn(&mut A, A) + Sync),
    source: &'s (dyn Fn(usize) -> Option<TrackedBlock> + Sync),
    task: &'s Task<'s, A>,
}

impl<A> Stage<'_, A> {
    /// Partition `p`'s result is final (nothing will run it again in this batch): one of the
    /// batch's reads of its block is done, and after the last one the block is handed back
    /// ([`BlockReads`](super::BlockReads)).
    fn committed(&self, p: usize) {
        if let Some(block) = (self.source)(p)
            && self.env.block_reads.last_read(block.meta.id)
        {
            self.env.blocks.done_with(&block);
        }
    }
}

/// One rayon split's partitions in [`StageRunner::run_chunked`]: the accumulator they share so
/// far (`open`, holding the partitions `in_open`), and before it, in partition order, the
/// accumulators of partitions that had to run on their own after a failure.
struct Chunk<A> {
    done: Vec<A>,
    open: Option<A>,
    in_open: Vec<usize>,
}

impl<A> Default for Chunk<A> {
    fn default() -> Self {
        Self {
            done: Vec::new(),
            open: None,
            in_open: Vec::new(),
        }
    }
}

impl<A> Chunk<A> {
    fn finish(mut self) -> Vec<A> {
        self.done.extend(self.open);
        self.done
    }
}

fn run_guarded<A>(task: &Task<'_, A>, p: usize, scope: Scope<'_>, acc: &mut A) -> Result<(), TaskError> {
    match catch_unwind(AssertUnwindSafe(|| task(p, scope, acc))) {
        Ok(result) => result,
        Err(payload) => Err(TaskError::from_panic(&payload)),
    }
}

impl StageRunner {
    /// Runs `task` for every partition in parallel; each partition gets a fresh accumulator.
    ///
    /// `source` gives the input block behind a partition (for the per-record fallback) and
    /// `merge` folds a per-record accumulator into the partition's.
    pub(crate) fn run<A: Send>(
        &self,
        env: &BatchEnv,
        partitions: usize,
        new_acc: &(dyn Fn() -> A + Sync),
        merge: &(dyn Fn(&mut A, A) + Sync),
        source: &(dyn Fn(usize) -> Option<TrackedBlock> + Sync),
        task: &Task<'_, A>,
    ) -> Result<Vec<A>, JobError> {
        let stage = Stage {
            env,
            new_acc,
            new_one: new_acc,
            merge,
            source,
            task,
        };
        self.pool.install(|| {
            (0..partitions)
                .into_par_iter()
                .map(|p| self.run_committed(&stage, p, None))
                .collect()
        })
    }

    /// [`run`](Self::run) for a stage whose accumulators are merged afterwards in any grouping (a
    /// keyed stage's map side): consecutive partitions share one accumulator per rayon split — a
    /// worker's chunk of the stage — as the hand-written per-thread map does, so a map-side map is
    /// built once per chunk instead of once per block and the shuffle merges a few maps instead of
    /// one per block. Returns the chunks' accumulators in partition order.
    ///
    /// A task that fails leaves its chunk's accumulator half-updated: the accumulator is dropped,
    /// the chunk's earlier partitions run again each on its own (their output must not be lost
    /// nor counted twice; dead letters are kept once per record), and the failed partition goes on
    /// as in [`run`](Self::run), its first attempt counted — so a failure costs at most one
    /// chunk's recomputation, and retries, the failure policy and the per-record fallback are
    /// those of every task. `new_one` makes the accumulator of one record in the per-record
    /// fallback (an empty map, where a chunk's map starts at the size chunks have been reaching).
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn run_chunked<A: Send>(
        &self,
        env: &BatchEnv,
        partitions: usize,
        new_acc: &(dyn Fn() -> A + Sync),
        new_one: &(dyn Fn() -> A + Sync),
        merge: &(dyn Fn(&mut A, A) + Sync),
        source: &(dyn Fn(usize) -> Option<TrackedBlock> + Sync),
        task: &Task<'_, A>,
    ) -> Result<Vec<A>, JobError> {
        let stage = Stage {
            env,
            new_acc,
            new_one,
            merge,
            source,
            task,
        };
        let chunks: Vec<Vec<A>> = self.pool.install(|| {
            (0..partitions)
                .into_par_iter()
                .fold(
                    || Ok(Chunk::default()),
                    |chunk: Result<Chunk<A>, JobError>, p| {
                        chunk.and_then(|chunk| self.fold_partition(&stage, chunk, p))
                    },
                )
                .map(|chunk| {
                    chunk.map(|chunk| {
                        // The chunk is done: its shared accumulator's partitions are final.
                        chunk.in_open.iter().for_each(|&p| stage.committed(p));
                        chunk.finish()
                    })
                })
                .collect::<Result<_, _>>()
        })?;
        Ok(chunks.into_iter().flatten().collect())
    }

    /// Runs partition `p` into its chunk's shared accumulator (see [`run_chunked`](Self::run_chunked)).
    fn fold_partition<A: Send>(
        &self,
        stage: &Stage<'_, A>,
        mut chunk: Chunk<A>,
        p: usize,
    ) -> Result<Chunk<A>, JobError> {
        use std::sync::atomic::Ordering::Relaxed;
        if self.is_cancelled() {
            return Err(JobError {
                time: stage.env.batch_time(),
                partition: p,
                attempts: 0,
                error: TaskError::Cancelled,
            });
        }
        self.tasks.fetch_add(1, Relaxed);
        let acc = chunk.open.get_or_insert_with(stage.new_acc);
        let cursor = RecordCursor::default();
        let scope = Scope {
            cursor: Some(&cursor),
            ..Scope::default()
        };
        match run_guarded(stage.task, p, scope, acc) {
            Ok(()) => chunk.in_open.push(p),
            Err(e) => {
                self.task_failures.fetch_add(1, Relaxed);
                tracing::warn!(batch = stage.env.time_ms, partition = p, attempt = 1, error = %e, "task failed");
                chunk.open = None;
                for q in std::mem::take(&mut chunk.in_open) {
                    chunk.done.push(self.run_committed(stage, q, None)?);
                }
                chunk.done.push(self.run_committed(stage, p, Some((1, e)))?);
            }
        }
        Ok(chunk)
    }

    /// [`run_partition`](Self::run_partition), whose result is final once it succeeds.
    fn run_committed<A>(
        &self,
        stage: &Stage<'_, A>,
        p: usize,
        failed: Option<(u32, TaskError)>,
    ) -> Result<A, JobError> {
        let result = self.run_partition(stage, p, failed);
        if result.is_ok() {
            stage.committed(p);
        }
        result
    }

    /// One partition's task with a fresh accumulator: retried up to `max_attempts` (counting the
    /// `failed` attempt already made, if any), then the failure policy.
    fn run_partition<A>(
        &self,
        stage: &Stage<'_, A>,
        p: usize,
        failed: Option<(u32, TaskError)>,
    ) -> Result<A, JobError> {
        use std::sync::atomic::Ordering::Relaxed;
        let env = stage.env;
        let mut attempts = 0;
        let mut failed = failed;
        let error = loop {
            if let Some((made, e)) = failed.take() {
                attempts = made;
                if attempts >= self.max_attempts || !e.is_retryable() {
                    break e;
                }
                self.task_retries.fetch_add(1, Relaxed);
            }
            if self.is_cancelled() {
                break TaskError::Cancelled;
            }
            attempts += 1;
            self.tasks.fetch_add(1, Relaxed);
            let mut acc = (stage.new_acc)();
            let cursor = RecordCursor::default();
            let scope = Scope {
                cursor: Some(&cursor),
                ..Scope::default()
            };
            match run_guarded(stage.task, p, scope, &mut acc) {
                Ok(()) => return Ok(acc),
                Err(e) => {
                    self.task_failures.fetch_add(1, Relaxed);
                    tracing::warn!(batch = env.time_ms, partition = p, attempt = attempts, error = %e, "task failed");
                    failed = Some((attempts, e));
                }
            }
        };
        let job_error = JobError {
            time: env.batch_time(),
            partition: p,
            attempts,
            error,
        };
        if self.policy != FailurePolicy::DeadLetter || !job_error.error.is_retryable() {
            return Err(job_error);
        }
        let Some(block) = (stage.source)(p) else {
            return Err(job_error);
        };
        self.isolate_records(env, p, attempts, &block, stage)
            .map_err(|error| match error {
                // The block could not be read again: report the original failure.
                TaskError::BlockUnavailable { .. } if error.is_retryable() => job_error,
                error => JobError { error, ..job_error },
            })
    }

    /// Whether a graceful stop ran out of time (tasks give up between records).
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The per-record fallback of a partition whose task kept panicking: its block is read once
    /// and each record runs alone over it (linear in the block's size); the records that still
    /// panic go to the batch's dead letters, the others are merged.
    fn isolate_records<A>(
        &self,
        env: &BatchEnv,
        p: usize,
        attempts: u32,
        block: &TrackedBlock,
        stage: &Stage<'_, A>,
    ) -> Result<A, TaskError> {
        let block = Arc::new(env.blocks.read(block)?);
        let cursor = RecordCursor::default();
        let mut acc = (stage.new_acc)();
        let mut failed = 0usize;
        for i in 0..block.len() {
            if self.is_cancelled() {
                return Err(TaskError::Cancelled);
            }
            let mut one = (stage.new_one)();
            let scope = Scope {
                only_record: Some(i),
                block: Some(&block),
                cursor: Some(&cursor),
            };
            match run_guarded(stage.task, p, scope, &mut one) {
                Ok(()) => (stage.merge)(&mut acc, one),
                Err(TaskError::Panicked { message }) => {
                    let record = block.record(i).map_err(|e| TaskError::Panicked {
                        message: format!("internal: cannot rebuild record {i} of block {}: {e}", block.id()),
                    })?;
                    env.dead_letters.add(
                        block.id().input_id,
                        DeadLetter {
                            batch_time: env.batch_time(),
                            record,
                            error: message,
                            attempts: attempts + 1,
                            stage: Arc::from(PANIC_STAGE),
                        },
                    );
                    failed += 1;
                }
                Err(other) => return Err(other),
            }
        }
        tracing::warn!(
            batch = env.time_ms,
            partition = p,
            records = failed,
            "records that panicked sent to the dead-letter sink"
        );
        Ok(acc)
    }

    /// Runs a whole-batch function `f` over every element of `node` for the batch: a barrier,
    /// like a shuffle. `node`'s stages run first (with their own retries); then `f` runs on the
    /// pool with all elements in partition order, as a [`run_task`](Self::run_task): a panic in
    /// `f` is retried by recomputing the input from its lineage (cached stages, or the batch's
    /// blocks). The per-record dead-letter fallback does not apply: a whole-batch function has no
    /// single input record to blame.
    pub(crate) fn run_barrier<T: Send, O: Send>(
        &self,
        env: &BatchEnv,
        node: &dyn Node<T>,
        f: &(dyn Fn(BatchTime, Vec<T>) -> Vec<O> + Sync),
    ) -> Result<Vec<O>, JobError> {
        self.run_task(env, &|| {
            let items: Vec<T> = self.collect(env, node)?.into_iter().flatten().collect();
            Ok(f(env.batch_time(), items))
        })
    }

    /// Runs `task` — a user function over a whole stage (a window's reduce and inverse, a state
    /// update, a whole-batch function) — as one task on the pool with the same retries as every
    /// other task: a panic is retried (`task` must recompute what it consumes), up to
    /// `max_attempts` times; then the batch fails, whatever the policy (no single input record is
    /// to blame). An `Err` from `task` (a failed stage it ran) is returned as is.
    pub(crate) fn run_task<R: Send>(
        &self,
        env: &BatchEnv,
        task: &(dyn Fn() -> Result<R, JobError> + Sync),
    ) -> Result<R, JobError> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut attempts = 0;
        loop {
            if self.is_cancelled() {
                return Err(JobError {
                    time: env.batch_time(),
                    partition: 0,
                    attempts,
                    error: TaskError::Cancelled,
                });
            }
            attempts += 1;
            self.tasks.fetch_add(1, Relaxed);
            let error = match self.pool.install(|| catch_unwind(AssertUnwindSafe(task))) {
                Ok(result) => return result,
                Err(payload) => TaskError::from_panic(&payload),
            };
            self.task_failures.fetch_add(1, Relaxed);
            tracing::warn!(batch = env.time_ms, attempt = attempts, error = %error, "stage function failed");
            if attempts >= self.max_attempts {
                return Err(JobError {
                    time: env.batch_time(),
                    partition: 0,
                    attempts,
                    error,
                });
            }
            self.task_retries.fetch_add(1, Relaxed);
        }
    }

    /// Runs a fused chain into one `Vec` per partition.
    pub(crate) fn collect<T: Send>(&self, env: &BatchEnv, node: &dyn Node<T>) -> Result<Vec<Vec<T>>, JobError> {
        node.prepare(env)?;
        self.run(
            env,
            node.num_partitions(env),
            &Vec::new,
            &|acc: &mut Vec<T>, more| acc.extend(more),
            &|p| node.source_block(env, p),
            &|p, scope, acc: &mut Vec<T>| node.compute(env, scope, p, &mut |x| acc.push(x)),
        )
    }
}

/// The map side and the shuffle of a keyed stage: the fused chain below runs as tasks (with the
/// runner's retries and failure policy) that fold their records straight into a
/// [`CombineMap`] shared by a worker's consecutive tasks ([`StageRunner::run_chunked`]), then the
/// maps are hash-shuffled into `partitions`. The kernels are
/// `sluice_operators::shuffle`; this only runs them.
pub(crate) fn combine_by_key<K: Key, V: Data, C: Combiner<V>>(
    env: &BatchEnv,
    parent: &dyn Node<(K, V)>,
    combiner: &C,
    partitions: usize,
    keys_hint: &MapSizeHint,
) -> Result<Vec<CombineMap<K, C::Acc>>, JobError> {
    combine_with(env, parent, combiner, partitions, keys_hint, &|(k, v), map| {
        map.add(k, v, combiner);
    })
}

/// [`combine_by_key`] over any parent: `fold` puts each element's pairs into its chunk's map
/// (`flat_map_reduce_by_key` looks keys up by a borrowed form with
/// [`CombineMap::add_borrowed`]).
pub(crate) fn combine_with<T: Data, K: Key, V: Data, C: Combiner<V>>(
    env: &BatchEnv,
    parent: &dyn Node<T>,
    combiner: &C,
    partitions: usize,
    keys_hint: &MapSizeHint,
    fold: &(impl Fn(T, &mut CombineMap<K, C::Acc>) + Sync),
) -> Result<Vec<CombineMap<K, C::Acc>>, JobError> {
    parent.prepare(env)?;
    let maps = env.runner.run_chunked(
        env,
        parent.num_partitions(env),
        &|| CombineMap::with_capacity(keys_hint.get()),
        &CombineMap::new,
        &|acc: &mut CombineMap<K, C::Acc>, more| acc.merge_map(more, combiner),
        &|p| parent.source_block(env, p),
        &|p, scope, acc: &mut CombineMap<K, C::Acc>| {
            parent.compute(env, scope, p, &mut |x| fold(x, acc))?;
            keys_hint.observe(acc.len());
            Ok(())
        },
    )?;
    Ok(env
        .runner
        .pool
        .install(|| shuffle::<K, V, C>(maps, partitions, combiner)))
}
