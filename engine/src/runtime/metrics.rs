//! Engine metrics: counters, per-batch timings, and the built-in failure detectors.
//!
//! Counters are plain atomics read through [`Metrics::snapshot`]. Two detectors from the Kinesis
//! failure-recovery guide are built in and raise [`HealthEvent`]s: **stuck processing** (a batch's
//! total delay above a bound) and a **high error rate** (task failures above 5 % of tasks).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

use super::rate_estimator::PidRateEstimator;

/// Timings of one completed batch (Spark's `BatchInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchInfo {
    /// Batch time.
    pub batch_time: crate::BatchTime,
    /// The batch belongs to the metadata log of a dead worker that this worker adopted (its
    /// output carries that worker's name), not to this worker's own log.
    pub adopted: bool,
    /// Records in the batch.
    pub num_records: u64,
    /// Processing start minus batch time.
    pub scheduling_delay_ms: i64,
    /// Processing end minus processing start.
    pub processing_delay_ms: i64,
    /// Records sent to the dead-letter sink.
    pub dead_letters: u64,
    /// Processing time measured with a monotonic clock, in microseconds (independent of the
    /// injected clock; for overhead measurements).
    pub processing_micros: u64,
    /// Tasks run in this batch (including retries) and how many of them failed.
    pub tasks: u64,
    /// Failed task attempts in this batch.
    pub task_failures: u64,
}

/// Built-in failure detectors (from the Kinesis failure-recovery guide).
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum HealthEvent {
    /// A batch's total delay exceeded the bound: processing is stuck or cannot keep up.
    StuckProcessing {
        /// Batch time.
        batch_time: crate::BatchTime,
        /// Scheduling plus processing delay.
        total_delay_ms: i64,
        /// The configured bound.
        bound_ms: i64,
    },
    /// More than the allowed fraction of task attempts failed in a batch.
    HighErrorRate {
        /// Batch time.
        batch_time: crate::BatchTime,
        /// Failed attempts / all attempts.
        rate: f64,
        /// The configured bound (default 5 %).
        bound: f64,
    },
}

/// Evaluates the detectors for one batch.
pub(crate) fn detect(info: &BatchInfo, stuck_bound_ms: i64, error_rate_bound: f64) -> Vec<HealthEvent> {
    let mut events = Vec::new();
    if info.total_delay_ms() > stuck_bound_ms {
        events.push(HealthEvent::StuckProcessing {
            batch_time: info.batch_time,
            total_delay_ms: info.total_delay_ms(),
            bound_ms: stuck_bound_ms,
        });
    }
    if info.tasks > 0 {
        let rate = info.task_failures as f64 / info.tasks as f64;
        if rate > error_rate_bound {
            events.push(HealthEvent::HighErrorRate {
                batch_time: info.batch_time,
                rate,
                bound: error_rate_bound,
            });
        }
    }
    events
}

impl BatchInfo {
    /// Scheduling plus processing delay.
    pub fn total_delay_ms(&self) -> i64 {
        self.scheduling_delay_ms + self.processing_delay_ms
    }
}

/// Engine-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    pub(crate) batches_completed: AtomicU64,
    pub(crate) records_processed: AtomicU64,
    pub(crate) blocks_stored: AtomicU64,
    pub(crate) records_stored: AtomicU64,
    pub(crate) blocks_replayed: AtomicU64,
    pub(crate) dead_letters: AtomicU64,
    pub(crate) dead_letters_by_stage: Mutex<BTreeMap<String, u64>>,
    pub(crate) task_failures: AtomicU64,
    pub(crate) health_events: AtomicU64,
    pub(crate) rate_limit: AtomicU64,
    pub(crate) last_batch: Mutex<Option<BatchInfo>>,
    pub(crate) pid: Mutex<Option<PidRateEstimator>>,
}

/// A point-in-time copy of the engine's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MetricsSnapshot {
    /// Batches completed since start.
    pub batches_completed: u64,
    /// Records processed by completed batches.
    pub records_processed: u64,
    /// Blocks stored and logged by receivers.
    pub blocks_stored: u64,
    /// Records in those blocks.
    pub records_stored: u64,
    /// Blocks rebuilt by replaying their ranges from the source.
    pub blocks_replayed: u64,
    /// Records sent to the dead-letter sink (each bad record once per batch, however many
    /// stages read it).
    pub dead_letters: u64,
    /// The same per stage that rejected them: `try_map#2`, … for fallible operators, `panic` for
    /// records isolated after panics.
    pub dead_letters_by_stage: BTreeMap<String, u64>,
    /// Failed task attempts.
    pub task_failures: u64,
    /// Health events raised by the detectors.
    pub health_events: u64,
    /// The rate the backpressure controller last set (records/s; 0 = never set).
    pub rate_limit: u64,
    /// The last completed batch.
    pub last_batch: Option<BatchInfo>,
}

impl Metrics {
    pub(crate) fn record_batch(&self, info: &BatchInfo) {
        self.batches_completed.fetch_add(1, Relaxed);
        self.records_processed.fetch_add(info.num_records, Relaxed);
        self.dead_letters.fetch_add(info.dead_letters, Relaxed);
        self.task_failures.fetch_add(info.task_failures, Relaxed);
        *self.last_batch.lock().expect("metrics") = Some(*info);
    }

    pub(crate) fn record_dead_letters(&self, letters: &[crate::DeadLetter]) {
        if letters.is_empty() {
            return;
        }
        let mut by_stage = self.dead_letters_by_stage.lock().expect("metrics");
        for letter in letters {
            *by_stage.entry(letter.stage.to_string()).or_default() += 1;
        }
    }

    /// The current values.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            batches_completed: self.batches_completed.load(Relaxed),
            records_processed: self.records_processed.load(Relaxed),
            blocks_stored: self.blocks_stored.load(Relaxed),
            records_stored: self.records_stored.load(Relaxed),
            blocks_replayed: self.blocks_replayed.load(Relaxed),
            dead_letters: self.dead_letters.load(Relaxed),
            dead_letters_by_stage: self.dead_letters_by_stage.lock().expect("metrics").clone(),
            task_failures: self.task_failures.load(Relaxed),
            health_events: self.health_events.load(Relaxed),
            rate_limit: self.rate_limit.load(Relaxed),
            last_batch: *self.last_batch.lock().expect("metrics"),
        }
    }
}

type BatchListener = Arc<dyn Fn(&BatchInfo) + Send + Sync>;
type HealthListener = Arc<dyn Fn(&HealthEvent) + Send + Sync>;

/// The context's batch and health listeners. The job thread takes a copy of the list and calls
/// them with no lock held, so a listener may add listeners or call the context.
#[derive(Default)]
pub(crate) struct Listeners {
    batch: RwLock<Vec<BatchListener>>,
    health: RwLock<Vec<HealthListener>>,
}

impl Listeners {
    pub(crate) fn add_batch(&self, listener: impl Fn(&BatchInfo) + Send + Sync + 'static) {
        self.batch.write().expect("listeners").push(Arc::new(listener));
    }

    pub(crate) fn add_health(&self, listener: impl Fn(&HealthEvent) + Send + Sync + 'static) {
        self.health.write().expect("listeners").push(Arc::new(listener));
    }

    pub(crate) fn batch(&self) -> Vec<BatchListener> {
        self.batch.read().expect("listeners").clone()
    }

    pub(crate) fn health(&self) -> Vec<HealthListener> {
        self.health.read().expect("listeners").clone()
    }
}
