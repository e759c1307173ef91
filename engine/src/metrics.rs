//! Engine metrics: counters, per-batch timings, and the built-in failure detectors.
//!
//! Counters are plain atomics read through [`Metrics::snapshot`]. Two detectors from the Kinesis
//! failure-recovery guide are built in and raise [`HealthEvent`]s: **stuck processing** (a batch's
//! total delay above a bound) and a **high error rate** (task failures above 5 % of tasks).

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use crate::rate_estimator::PidRateEstimator;

/// Timings of one completed batch (Spark's `BatchInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchInfo {
    /// Batch time.
    pub batch_time_ms: i64,
    /// Records in the batch.
    pub num_records: u64,
    /// Processing start minus batch time.
    pub scheduling_delay_ms: i64,
    /// Processing end minus processing start.
    pub processing_delay_ms: i64,
    /// Records sent to the dead-letter sink.
    pub dead_letters: u64,
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
    pub(crate) blocks_replayed: AtomicU64,
    pub(crate) dead_letters: AtomicU64,
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
    /// Blocks rebuilt by replaying their ranges from the source.
    pub blocks_replayed: u64,
    /// Records sent to the dead-letter sink.
    pub dead_letters: u64,
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
        *self.last_batch.lock().expect("metrics") = Some(*info);
    }

    /// The current values.
    pub fn snapshot(&self) -> MetricsSnapshot {
        MetricsSnapshot {
            batches_completed: self.batches_completed.load(Relaxed),
            records_processed: self.records_processed.load(Relaxed),
            blocks_stored: self.blocks_stored.load(Relaxed),
            blocks_replayed: self.blocks_replayed.load(Relaxed),
            dead_letters: self.dead_letters.load(Relaxed),
            rate_limit: self.rate_limit.load(Relaxed),
            last_batch: *self.last_batch.lock().expect("metrics"),
        }
    }
}
