//! The operator graph behind [`DStream`](crate::DStream): nodes, stages and the task runner.
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

use std::any::Any;
use std::collections::HashMap;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;

use rayon::prelude::*;
use sluice_blockstore::{Block, Record};

use crate::dead_letters::{DeadLetterCollector, RecordCursor};
use crate::tracker::TrackedBlock;

/// Why a task failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// User code panicked.
    #[error("user code panicked: {message}")]
    Panicked {
        /// The panic message.
        message: String,
    },
    /// An input block could not be read from the store nor replayed from the source.
    #[error("input block unavailable: {message}")]
    BlockUnavailable {
        /// What the block reader said (includes the ranges).
        message: String,
        /// Whether the source no longer holds the data (`DataLost`): retrying cannot help.
        data_lost: bool,
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

    fn is_retryable(&self) -> bool {
        !matches!(
            self,
            TaskError::BlockUnavailable { data_lost: true, .. } | TaskError::Rejected { .. } | TaskError::Cancelled
        )
    }
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

/// A failed batch: the policy said stop.
#[derive(Debug, Clone, thiserror::Error)]
#[error("batch {time_ms}: task for partition {partition} failed after {attempts} attempts: {error}")]
pub struct JobError {
    /// The batch time.
    pub time_ms: i64,
    /// The failing partition.
    pub partition: usize,
    /// Attempts made.
    pub attempts: u32,
    /// The last error.
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
    pub batch_time_ms: i64,
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
                    let job_error = JobError { time_ms: env.time_ms, partition: p, attempts, error };
                    if self.policy != FailurePolicy::DeadLetter || !job_error.error.is_retryable() {
                        return Err(job_error);
                    }
                    let Some(block) = source(p) else { return Err(job_error) };
                    self.isolate_records(env, p, attempts, &block, new_acc, merge, task)
                        .map_err(|error| match error {
                            // The block could not be read again: report the original failure.
                            TaskError::BlockUnavailable { data_lost: false, .. } => job_error,
                            error => JobError { error, ..job_error },
                        })
                })
                .collect()
        })
    }

    /// Whether a graceful stop ran out of time (tasks give up between records).
    fn is_cancelled(&self) -> bool {
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
                    let record = block.record(i).map_err(|e| TaskError::BlockUnavailable {
                        message: e.to_string(),
                        data_lost: false,
                    })?;
                    env.dead_letters.add(
                        block.id().input_id,
                        DeadLetter {
                            batch_time_ms: env.time_ms,
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
    /// pool with all elements in partition order. A panic in `f` is retried by recomputing the
    /// input from its lineage (cached stages, or the batch's blocks), up to `max_attempts`
    /// times; then the batch fails. The per-record dead-letter fallback does not apply: a
    /// whole-batch function has no single input record to blame.
    pub(crate) fn run_barrier<T: Send, O: Send>(
        &self,
        env: &BatchEnv,
        node: &dyn Node<T>,
        f: &(dyn Fn(i64, Vec<T>) -> Vec<O> + Sync),
    ) -> Result<Vec<O>, JobError> {
        use std::sync::atomic::Ordering::Relaxed;
        let mut attempts = 0;
        loop {
            if self.is_cancelled() {
                return Err(JobError {
                    time_ms: env.time_ms,
                    partition: 0,
                    attempts,
                    error: TaskError::Cancelled,
                });
            }
            attempts += 1;
            let items: Vec<T> = self.collect(env, node)?.into_iter().flatten().collect();
            self.tasks.fetch_add(1, Relaxed);
            let error = match self
                .pool
                .install(|| catch_unwind(AssertUnwindSafe(|| f(env.time_ms, items))))
            {
                Ok(out) => return Ok(out),
                Err(payload) => TaskError::from_panic(&payload),
            };
            self.task_failures.fetch_add(1, Relaxed);
            tracing::warn!(batch = env.time_ms, attempt = attempts, error = %error, "whole-batch function failed");
            if attempts >= self.max_attempts {
                return Err(JobError {
                    time_ms: env.time_ms,
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
