//! The job generator: the one thread that runs batches — recovered batches first, then one
//! batch per interval, and between them the batches of adopted logs.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Duration;

use super::membership::{Adoption, Phase};
use super::metrics::{self, BatchInfo, RecoveryKind};
use super::rate_estimator::PidRateEstimator;
use super::{LogRuntime, Runtime, snapshots};
use crate::exec::OWN_INSTANCE;
use crate::{BatchTime, Error, Result};

/// The longest the generator waits in real time before it re-reads the clock.
const MAX_REAL_WAIT: Duration = Duration::from_millis(5);

/// Cuts and runs batches on its own thread until the runtime stops.
pub(crate) struct JobGenerator {
    rt: Arc<Runtime>,
}

/// What a batch is to the recovery in progress (see the metrics' last recovery). The step is
/// recorded with the batch's metrics, before the batch counts as processed, so a caller of
/// `await_drained` sees the recovery finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RecoveryStep {
    /// Not part of a recovery.
    None,
    /// A batch the recovered log had allocated, re-run; `last` when the recovery ends with it.
    Rerun { last: bool },
    /// The batch that takes the recovered log's unallocated blocks: the recovery ends with it.
    Unallocated,
}

impl RecoveryStep {
    /// The step of re-run batch `i` of `n`, when `then_unallocated` says whether a batch with
    /// unallocated blocks follows.
    fn rerun(i: usize, n: usize, then_unallocated: bool) -> Self {
        RecoveryStep::Rerun {
            last: i + 1 == n && !then_unallocated,
        }
    }
}

impl JobGenerator {
    /// Starts the generator thread; it re-runs `pending` (recovered) batches first, then gives
    /// the recovered unallocated blocks (if `unallocated`) to the next batch.
    ///
    /// # Errors
    /// [`Error::Internal`] if the thread cannot be started.
    pub(crate) fn spawn(rt: Arc<Runtime>, pending: Vec<i64>, unallocated: bool) -> Result<JoinHandle<()>> {
        let generator = JobGenerator { rt };
        std::thread::Builder::new()
            .name("sluice-job-generator".into())
            .spawn(move || generator.run(&pending, unallocated))
            .map_err(|e| Error::Internal(format!("cannot start the job generator: {e}")))
    }

    /// The job generator: re-runs recovered batches, then one batch per interval until stopped;
    /// between batches, the batches of adopted logs.
    fn run(&self, pending: &[i64], unallocated: bool) {
        for (i, &time_ms) in pending.iter().enumerate() {
            let step = RecoveryStep::rerun(i, pending.len(), unallocated);
            if let Err(e) = self.run_batch(&self.rt.own, time_ms, step) {
                return self.rt.fail(e);
            }
        }
        let mut step = if unallocated {
            RecoveryStep::Unallocated
        } else {
            RecoveryStep::None
        };
        let mut next = (self.rt.clock.now_ms() / self.rt.interval_ms + 1) * self.rt.interval_ms;
        if let Some(last) = self.rt.own.tracker.last_allocated() {
            next = next.max(last + self.rt.interval_ms);
        }
        loop {
            if self.rt.stop_requested.load(Ordering::SeqCst) {
                return self.rt.finish(None);
            }
            if let Some(failure) = self.rt.inputs.iter().find_map(|i| i.failure()) {
                return self.rt.fail(failure);
            }
            if let Err(e) = self.run_adoptions() {
                return self.rt.fail(e);
            }
            if self.draining_with_nothing_left() {
                // Receivers are stopped (stop() stops them first), so nothing new can arrive.
                return self.rt.finish(None);
            }
            self.wait_for_batch_time(next);
            if self.rt.stop_requested.load(Ordering::SeqCst) {
                return self.rt.finish(None);
            }
            if self.draining_with_nothing_left() {
                // The drain woke the wait, possibly before `next`'s time, with nothing left to
                // process: a batch run now would run ahead of the clock, and when empty it is not
                // logged (a plan without state), so a restart before the clock reaches `next` would
                // run `next` again. The next pass sees what happened during the wait (a receiver
                // failure, a queued adoption) and then finishes.
                continue;
            }
            if let Err(e) = self.run_batch(&self.rt.own, next, std::mem::replace(&mut step, RecoveryStep::None)) {
                return self.rt.fail(e);
            }
            next += self.rt.interval_ms;
            // Do not pile up batches when the clock jumped ahead (manual clocks, long pauses).
            let now = self.rt.clock.now_ms();
            if next + self.rt.interval_ms <= now {
                next = now / self.rt.interval_ms * self.rt.interval_ms;
            }
        }
    }

    /// Whether a graceful stop asked for a drain and no logged block waits for a batch.
    fn draining_with_nothing_left(&self) -> bool {
        self.rt.drain_requested.load(Ordering::SeqCst) && !self.rt.own.tracker.has_unallocated_blocks()
    }

    /// Waits until the clock reads `time_ms`, or until `stop()` asks for a stop or a drain: a stop
    /// must not wait out a long batch interval, and a drain runs the last batch at once if any
    /// block is left (the receivers are stopped by then, so it holds every block there will be).
    /// `stop()` announces both on `status_changed`; the wait also re-reads the clock every
    /// [`MAX_REAL_WAIT`], so an injected clock that a test moves is seen to move (it cannot wake
    /// this thread itself), and a wake-up lost between the check and the wait costs at most that.
    fn wait_for_batch_time(&self, time_ms: i64) {
        let mut status = self.rt.status.lock().expect("status");
        while !self.rt.stop_requested.load(Ordering::SeqCst) && !self.rt.drain_requested.load(Ordering::SeqCst) {
            let now = self.rt.clock.now_ms();
            if now >= time_ms {
                return;
            }
            let remaining = Duration::from_millis(u64::try_from(time_ms - now).unwrap_or(0));
            status = self
                .rt
                .status_changed
                .wait_timeout(status, remaining.min(MAX_REAL_WAIT))
                .expect("status")
                .0;
        }
    }

    /// Runs the batches of every queued adoption: the pending batches of the adopted log, then
    /// one batch with its unallocated blocks. A claim of the log by someone else (the worker
    /// came back, or another adopter) abandons it; any other failure fails this worker, as the
    /// failure policy says for its own batches.
    fn run_adoptions(&self) -> Result<()> {
        for adoption in self.rt.adoptions() {
            if adoption.phase() != Phase::Queued {
                continue;
            }
            adoption.set_phase(Phase::Running);
            self.rt.metrics.recovery_started(
                RecoveryKind::Adoption {
                    worker: adoption.worker.clone(),
                },
                self.rt.clock.now_ms(),
                adoption.pending.clone(),
                adoption.log.tracker.unallocated_block_count(),
            );
            let outcome = self.run_adopted_log(&adoption);
            // Abandoned or failed part-way: what it did is what the recovery did.
            self.rt.metrics.recovery_finished(self.rt.clock.now_ms());
            match outcome {
                Ok(()) if !adoption.abandon.load(Ordering::SeqCst) => adoption.set_phase(Phase::Done),
                Ok(()) => adoption.set_phase(Phase::Abandoned),
                Err(Error::Fenced { by, .. }) => {
                    tracing::warn!(worker = %adoption.worker, %by, "the adopted log was claimed by another process");
                    adoption.set_phase(Phase::Abandoned);
                }
                Err(e) => {
                    adoption.set_phase(Phase::Abandoned);
                    return Err(e);
                }
            }
        }
        Ok(())
    }

    fn run_adopted_log(&self, adoption: &Adoption) -> Result<()> {
        let log = &adoption.log;
        // The dead worker cannot log blocks any more: its unallocated blocks are known now.
        let unallocated = log.tracker.has_unallocated_blocks();
        for (i, &time_ms) in adoption.pending.iter().enumerate() {
            if adoption.abandon.load(Ordering::SeqCst) || self.rt.stop_requested.load(Ordering::SeqCst) {
                return Ok(());
            }
            let step = RecoveryStep::rerun(i, adoption.pending.len(), unallocated);
            self.run_batch(log, time_ms, step)?;
        }
        if unallocated && !adoption.abandon.load(Ordering::SeqCst) {
            // A time the dead worker never allocated (it cannot allocate any more).
            let now = self.rt.clock.now_ms() / self.rt.interval_ms * self.rt.interval_ms;
            let time_ms = log.tracker.last_allocated().map_or(now, |l| l + self.rt.interval_ms);
            self.run_batch(log, time_ms, RecoveryStep::Unallocated)?;
        }
        Ok(())
    }

    fn run_batch(&self, log: &Arc<LogRuntime>, time_ms: i64, recovery: RecoveryStep) -> Result<()> {
        let own = log.instance == OWN_INSTANCE;
        let submitted = self.rt.clock.now_ms();
        let monotonic = std::time::Instant::now();
        let tasks_before = self.rt.runner.tasks.load(Ordering::Relaxed);
        let failures_before = self.rt.runner.task_failures.load(Ordering::Relaxed);
        let blocks = log.tracker.allocate_blocks_to_batch(time_ms)?;
        let num_records: u64 = blocks.iter().map(|b| b.meta.num_records).sum();
        let block_ids: Vec<sluice_blockstore::BlockId> = blocks.iter().map(|b| b.meta.id).collect();
        let env = self.rt.env(log, time_ms, blocks);
        let started = self.rt.clock.now_ms();
        for op in &self.rt.plan.outputs {
            op.run(&env)?;
        }
        // This batch's letters only: earlier batches recomputed for a window or state collected
        // into their own environments (their letters were written when they ran).
        let dead = env.dead_letters.take();
        self.rt.blocks.write_dead_letters(time_ms, &log.writer, &dead)?;
        let plan = &self.rt.plan;
        snapshots::snapshot_all(&log.checkpoint, log.instance, time_ms, &plan.stateful)?;
        // Cleanup behind completed batches, keeping what windows need; logged together with
        // the completion (one durable append).
        let remember = i64::try_from(plan.remember_batches.max(1)).unwrap_or(i64::MAX);
        for op in &plan.outputs {
            op.forget(log.instance, time_ms - remember * self.rt.interval_ms);
        }
        let before = time_ms - (remember - 1) * self.rt.interval_ms;
        let removed = log.tracker.complete_batch(time_ms, before)?;
        self.rt.blocks.processed(&block_ids);
        let ended = self.rt.clock.now_ms();
        let info = BatchInfo {
            batch_time: BatchTime::from_millis(time_ms),
            adopted: !own,
            num_records,
            // Spark: processing start minus submission; a batch is due at its batch time.
            scheduling_delay_ms: (started - time_ms.max(submitted.min(time_ms))).max(0),
            processing_delay_ms: ended - started,
            dead_letters: dead.len() as u64,
            processing_micros: u64::try_from(monotonic.elapsed().as_micros()).unwrap_or(u64::MAX),
            tasks: self.rt.runner.tasks.load(Ordering::Relaxed) - tasks_before,
            task_failures: self.rt.runner.task_failures.load(Ordering::Relaxed) - failures_before,
        };
        // Metrics first, then the batch counts as processed: whoever waited for it (e.g.
        // `await_drained`) then reads metrics and a status that include it.
        self.rt.metrics.record_batch(&info);
        self.rt.metrics.record_dead_letters(&dead);
        match recovery {
            RecoveryStep::None => {}
            RecoveryStep::Rerun { last } => {
                self.rt.metrics.recovery_batch_rerun();
                if last {
                    self.rt.metrics.recovery_finished(ended);
                }
            }
            RecoveryStep::Unallocated => self.rt.metrics.recovery_finished(ended),
        }
        let events = metrics::detect(&info, self.rt.config.stuck_bound_ms(), self.rt.config.error_rate_bound);
        for event in &events {
            tracing::warn!(?event, "health event");
            self.rt.metrics.record_health_event(event);
        }
        if own {
            {
                let mut status = self.rt.status.lock().expect("status");
                status.last_processed_ms = Some(time_ms);
            }
            self.rt
                .last_processed
                .store(u64::try_from(time_ms).unwrap_or(0), Ordering::SeqCst);
        }
        self.rt.status_changed.notify_all();

        for id in removed {
            self.rt.blocks.remove(id);
        }
        if !plan.stateful.is_empty() {
            snapshots::cleanup_snapshots(&log.checkpoint, time_ms)?;
        }

        // Listeners run on this thread with no engine lock held (they may call the context).
        // A listener that panics is reported and skipped (as Spark's listener bus does): the
        // batch is complete, and monitoring must not stop the stream.
        for listener in self.rt.listeners.batch() {
            if catch_unwind(AssertUnwindSafe(|| listener(&info))).is_err() {
                tracing::error!(batch = time_ms, "a batch listener panicked");
            }
        }
        for event in &events {
            for listener in self.rt.listeners.health() {
                if catch_unwind(AssertUnwindSafe(|| listener(event))).is_err() {
                    tracing::error!(batch = time_ms, "a health listener panicked");
                }
            }
        }
        if own {
            self.update_rate(&info);
        }
        Ok(())
    }

    fn update_rate(&self, info: &BatchInfo) {
        if !self.rt.config.backpressure.enabled {
            return;
        }
        let mut estimator = self.rt.metrics.pid.lock().expect("pid");
        let pid =
            estimator.get_or_insert_with(|| PidRateEstimator::new(self.rt.interval_ms, &self.rt.config.backpressure));
        if let Some(rate) = pid.compute(
            info.batch_time.as_millis(),
            info.num_records,
            info.processing_delay_ms,
            info.scheduling_delay_ms,
        ) {
            let per_input = rate / self.rt.inputs.len().max(1) as f64;
            for input in &self.rt.inputs {
                input.set_max_rate(Some(per_input));
            }
            self.rt.metrics.rate_limit.store(rate as u64, Ordering::Relaxed);
        }
    }
}
