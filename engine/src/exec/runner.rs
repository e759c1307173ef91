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
        use std::sync::atomic::Ordering::Relaxed;
        self.pool.install(|| {
            (0..partitions)
                .into_par_iter()
                .map(|p| {
                    let mut attempts = 0;
                    let error = loop {
                        if self.is_cancelled() {
                            break TaskError::Cancelled;
                        }
                        attempts += 1;
                        self.tasks.fetch_add(1, Relaxed);
                        let mut acc = new_acc();
                        let cursor = RecordCursor::default();
                        let scope = Scope {
                            cursor: Some(&cursor),
                            ..Scope::default()
                        };
                        match run_guarded(task, p, scope, &mut acc) {
                            Ok(()) => return Ok(acc),
                            Err(e) => {
                                self.task_failures.fetch_add(1, Relaxed);
                                tracing::warn!(batch = env.time_ms, partition = p, attempt = attempts, error = %e, "task failed");
                                if attempts >= self.max_attempts || !e.is_retryable() {
                                    break e;
                                }
                                self.task_retries.fetch_add(1, Relaxed);
                            }
                        }
                    };
                    let job_error = JobError { time: env.batch_time(), partition: p, attempts, error };
                    if self.policy != FailurePolicy::DeadLetter || !job_error.error.is_retryable() {
                        return Err(job_error);
                    }
                    let Some(block) = source(p) else { return Err(job_error) };
                    self.isolate_records(env, p, attempts, &block, new_acc, merge, task)
                        .map_err(|error| match error {
                            // The block could not be read again: report the original failure.
                            TaskError::BlockUnavailable { .. } if error.is_retryable() => job_error,
                            error => JobError { error, ..job_error },
                        })
                })
                .collect()
        })
    }

    /// Whether a graceful stop ran out of time (tasks give up between records).
    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The per-record fallback of a partition whose task kept panicking: its block is read once
    /// and each record runs alone over it (linear in the block's size); the records that still
    /// panic go to the batch's dead letters, the others are merged.
    #[allow(clippy::too_many_arguments)]
    fn isolate_records<A>(
        &self,
        env: &BatchEnv,
        p: usize,
        attempts: u32,
        block: &TrackedBlock,
        new_acc: &(dyn Fn() -> A + Sync),
        merge: &(dyn Fn(&mut A, A) + Sync),
        task: &Task<'_, A>,
    ) -> Result<A, TaskError> {
        let block = Arc::new(env.blocks.read(block)?);
        let cursor = RecordCursor::default();
        let mut acc = new_acc();
        let mut failed = 0usize;
        for i in 0..block.len() {
            if self.is_cancelled() {
                return Err(TaskError::Cancelled);
            }
            let mut one = new_acc();
            let scope = Scope {
                only_record: Some(i),
                block: Some(&block),
                cursor: Some(&cursor),
            };
            match run_guarded(task, p, scope, &mut one) {
                Ok(()) => merge(&mut acc, one),
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
/// [`CombineMap`], then the maps are hash-shuffled into `partitions`. The kernels are
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

/// [`combine_by_key`] over any parent: `fold` puts each element's pairs into its task's map
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
    let maps = env.runner.run(
        env,
        parent.num_partitions(env),
        &|| CombineMap::with_capacity(keys_hint.get()),
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
