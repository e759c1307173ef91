//! Engine metrics: counters, per-batch timings, and the built-in failure detectors.
//!
//! Counters are plain atomics read through [`Metrics::snapshot`]. Two detectors from the Kinesis
//! failure-recovery guide are built in and raise [`HealthEvent`]s: **stuck processing** (a batch's
//! total delay above a bound) and a **high error rate** (task failures above 5 % of tasks).
//!
//! For monitoring ([`StreamingStatus`](super::status::StreamingStatus)) the metrics also keep
//! what a status page draws — the last [`RECENT_BATCHES`] batches, the last
//! [`RECENT_HEALTH_EVENTS`] health events, the last [`RECENT_REPLAYS`] replayed blocks and the
//! last recovery — each in a ring of fixed size, and a histogram per batch delay.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex, RwLock};

use serde::Serialize;

use super::rate_estimator::PidRateEstimator;

/// Completed batches the status keeps (oldest dropped first): what the status page's charts
/// span.
pub const RECENT_BATCHES: usize = 100;
/// Health events the status keeps.
pub const RECENT_HEALTH_EVENTS: usize = 50;
/// Replayed blocks the status keeps.
pub const RECENT_REPLAYS: usize = 20;

/// Timings of one completed batch (Spark's `BatchInfo`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct BatchInfo {
    /// Batch time (`batch_time_ms` in the JSON status).
    #[serde(rename = "batch_time_ms")]
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
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "detector", rename_all = "snake_case")]
#[non_exhaustive]
pub enum HealthEvent {
    /// A batch's total delay exceeded the bound: processing is stuck or cannot keep up.
    StuckProcessing {
        /// Batch time (`batch_time_ms` in the JSON status).
        #[serde(rename = "batch_time_ms")]
        batch_time: crate::BatchTime,
        /// Scheduling plus processing delay.
        total_delay_ms: i64,
        /// The configured bound.
        bound_ms: i64,
    },
    /// More than the allowed fraction of task attempts failed in a batch.
    HighErrorRate {
        /// Batch time (`batch_time_ms` in the JSON status).
        #[serde(rename = "batch_time_ms")]
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

    /// Failed task attempts over all task attempts (0 without tasks): what the high-error-rate
    /// detector compares with its bound.
    pub fn error_rate(&self) -> f64 {
        if self.tasks == 0 {
            0.0
        } else {
            self.task_failures as f64 / self.tasks as f64
        }
    }
}

impl HealthEvent {
    /// The detector that raised it: `stuck_processing` or `high_error_rate`.
    pub fn detector(&self) -> &'static str {
        match self {
            HealthEvent::StuckProcessing { .. } => STUCK_PROCESSING,
            HealthEvent::HighErrorRate { .. } => HIGH_ERROR_RATE,
        }
    }

    /// The batch that raised it.
    pub fn batch_time(&self) -> crate::BatchTime {
        match self {
            HealthEvent::StuckProcessing { batch_time, .. } | HealthEvent::HighErrorRate { batch_time, .. } => {
                *batch_time
            }
        }
    }
}

/// The stuck-processing detector's name (in metrics and the status).
pub(crate) const STUCK_PROCESSING: &str = "stuck_processing";
/// The high-error-rate detector's name.
pub(crate) const HIGH_ERROR_RATE: &str = "high_error_rate";

/// Upper bounds (ms) of the batch-delay histograms' buckets; a last, unbounded bucket follows.
pub const DELAY_BUCKETS_MS: [u64; 15] = [
    5, 10, 25, 50, 100, 250, 500, 1_000, 2_500, 5_000, 10_000, 30_000, 60_000, 120_000, 300_000,
];

/// A histogram of one batch delay over every completed batch, with the bounds of
/// [`DELAY_BUCKETS_MS`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DelayHistogram {
    /// Batches per bucket (not cumulative): `counts[i]` holds delays in
    /// `(DELAY_BUCKETS_MS[i-1], DELAY_BUCKETS_MS[i]]`, the last entry those above every bound.
    pub counts: Vec<u64>,
    /// Sum of the delays (ms).
    pub sum_ms: u64,
    /// Batches counted.
    pub count: u64,
}

/// The atomics behind a [`DelayHistogram`].
#[derive(Debug, Default)]
struct DelayCells {
    counts: [AtomicU64; DELAY_BUCKETS_MS.len() + 1],
    sum_ms: AtomicU64,
    count: AtomicU64,
}

impl DelayCells {
    fn observe(&self, delay_ms: i64) {
        let delay = u64::try_from(delay_ms).unwrap_or(0);
        let bucket = DELAY_BUCKETS_MS
            .iter()
            .position(|&bound| delay <= bound)
            .unwrap_or(DELAY_BUCKETS_MS.len());
        self.counts[bucket].fetch_add(1, Relaxed);
        self.sum_ms.fetch_add(delay, Relaxed);
        self.count.fetch_add(1, Relaxed);
    }

    fn snapshot(&self) -> DelayHistogram {
        DelayHistogram {
            counts: self.counts.iter().map(|c| c.load(Relaxed)).collect(),
            sum_ms: self.sum_ms.load(Relaxed),
            count: self.count.load(Relaxed),
        }
    }
}

/// One block rebuilt by replaying its ranges from the source.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ReplayInfo {
    /// When the replay finished (engine clock, ms).
    pub at_ms: i64,
    /// The block.
    pub block: String,
    /// The sequence-number ranges replayed (`stream/shard[from..=to] (n records)`, …).
    pub ranges: String,
    /// Records the replay returned.
    pub records: u64,
    /// How long the read took, replay included (ms, monotonic).
    pub millis: u64,
}

/// What started a recovery.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
#[non_exhaustive]
pub enum RecoveryKind {
    /// This worker restarted and recovered its own metadata log.
    Restart,
    /// This worker adopted the log of a dead worker.
    Adoption {
        /// The dead worker.
        worker: String,
    },
}

/// The last recovery: a restart that found unfinished work in the metadata log, or the adoption
/// of a dead worker's log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RecoveryStatus {
    /// Restart or adoption.
    #[serde(flatten)]
    pub kind: RecoveryKind,
    /// When it began (engine clock, ms).
    pub started_ms: i64,
    /// When its last batch completed; `None` while it runs.
    pub finished_ms: Option<i64>,
    /// Batches allocated but not completed in the log: they re-run with exactly their blocks.
    pub batches_to_rerun: Vec<i64>,
    /// How many of them have re-run.
    pub batches_rerun: u64,
    /// Logged blocks no batch had taken: they go to the next batch.
    pub unallocated_blocks: u64,
    /// Blocks rebuilt by replay while the recovery ran (their ranges are in the recent replays).
    pub blocks_replayed: u64,
    /// Records those replays returned.
    pub records_replayed: u64,
    #[serde(skip)]
    replayed_before: (u64, u64),
}

/// Engine-wide counters.
#[derive(Debug, Default)]
pub struct Metrics {
    pub(crate) batches_completed: AtomicU64,
    pub(crate) records_processed: AtomicU64,
    pub(crate) blocks_stored: AtomicU64,
    pub(crate) records_stored: AtomicU64,
    pub(crate) blocks_replayed: AtomicU64,
    pub(crate) records_replayed: AtomicU64,
    pub(crate) replay_micros: AtomicU64,
    pub(crate) ingest_gate_waits: AtomicU64,
    pub(crate) ingest_gate_wait_micros: AtomicU64,
    pub(crate) dead_letters: AtomicU64,
    pub(crate) dead_letters_by_stage: Mutex<BTreeMap<String, u64>>,
    pub(crate) task_attempts: AtomicU64,
    pub(crate) task_failures: AtomicU64,
    pub(crate) health_events: AtomicU64,
    pub(crate) stuck_processing_events: AtomicU64,
    pub(crate) high_error_rate_events: AtomicU64,
    pub(crate) rate_limit: AtomicU64,
    pub(crate) last_batch: Mutex<Option<BatchInfo>>,
    pub(crate) pid: Mutex<Option<PidRateEstimator>>,
    recent_batches: Mutex<VecDeque<BatchInfo>>,
    recent_health: Mutex<VecDeque<HealthEvent>>,
    recent_replays: Mutex<VecDeque<ReplayInfo>>,
    last_recovery: Mutex<Option<RecoveryStatus>>,
    scheduling_delay: DelayCells,
    processing_delay: DelayCells,
    total_delay: DelayCells,
}

/// A point-in-time copy of the engine's counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
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
    /// Records those replays returned.
    pub records_replayed: u64,
    /// Time spent reading the blocks that were replayed, in microseconds (monotonic):
    /// `records_replayed / replay_micros` is the replay rate.
    pub replay_micros: u64,
    /// Blocks that waited for the memory budget before they were stored: the ingest gate admits
    /// at most `memory_budget_bytes` of blocks no completed batch has processed, and the receivers
    /// stand still meanwhile.
    pub ingest_gate_waits: u64,
    /// Time those blocks waited, in microseconds. A large share of the run means ingest is bound
    /// by the memory budget and the batch interval, not by the source or the CPU: a larger
    /// budget or a shorter batch interval lets more records in per batch.
    pub ingest_gate_wait_micros: u64,
    /// Records sent to the dead-letter sink (each bad record once per batch, however many
    /// stages read it).
    pub dead_letters: u64,
    /// The same per stage that rejected them: `try_map#2`, … for fallible operators, `panic` for
    /// records isolated after panics.
    pub dead_letters_by_stage: BTreeMap<String, u64>,
    /// Task attempts (every task run, retries included).
    pub task_attempts: u64,
    /// Failed task attempts.
    pub task_failures: u64,
    /// Health events raised by the detectors.
    pub health_events: u64,
    /// Of those, raised by the stuck-processing detector.
    pub stuck_processing_events: u64,
    /// Of those, raised by the high-error-rate detector.
    pub high_error_rate_events: u64,
    /// The rate the backpressure controller last set (records/s; 0 = never set).
    pub rate_limit: u64,
    /// The last completed batch.
    pub last_batch: Option<BatchInfo>,
}

/// Pushes `item` onto a ring that keeps the newest `capacity` items.
fn push_bounded<T>(ring: &Mutex<VecDeque<T>>, capacity: usize, item: T) {
    let mut ring = ring.lock().expect("metrics");
    if ring.len() == capacity {
        ring.pop_front();
    }
    ring.push_back(item);
}

impl Metrics {
    pub(crate) fn record_batch(&self, info: &BatchInfo) {
        self.batches_completed.fetch_add(1, Relaxed);
        self.records_processed.fetch_add(info.num_records, Relaxed);
        self.dead_letters.fetch_add(info.dead_letters, Relaxed);
        self.task_attempts.fetch_add(info.tasks, Relaxed);
        self.task_failures.fetch_add(info.task_failures, Relaxed);
        self.scheduling_delay.observe(info.scheduling_delay_ms);
        self.processing_delay.observe(info.processing_delay_ms);
        self.total_delay.observe(info.total_delay_ms());
        *self.last_batch.lock().expect("metrics") = Some(*info);
        push_bounded(&self.recent_batches, RECENT_BATCHES, *info);
    }

    pub(crate) fn record_health_event(&self, event: &HealthEvent) {
        self.health_events.fetch_add(1, Relaxed);
        match event {
            HealthEvent::StuckProcessing { .. } => &self.stuck_processing_events,
            HealthEvent::HighErrorRate { .. } => &self.high_error_rate_events,
        }
        .fetch_add(1, Relaxed);
        push_bounded(&self.recent_health, RECENT_HEALTH_EVENTS, event.clone());
    }

    pub(crate) fn ingest_gate_waited(&self, waited: std::time::Duration) {
        self.ingest_gate_waits.fetch_add(1, Relaxed);
        self.ingest_gate_wait_micros
            .fetch_add(u64::try_from(waited.as_micros()).unwrap_or(u64::MAX), Relaxed);
    }

    pub(crate) fn record_replay(&self, replay: ReplayInfo, micros: u64) {
        self.blocks_replayed.fetch_add(1, Relaxed);
        self.records_replayed.fetch_add(replay.records, Relaxed);
        self.replay_micros.fetch_add(micros, Relaxed);
        push_bounded(&self.recent_replays, RECENT_REPLAYS, replay);
    }

    /// A recovery begins: it becomes the last recovery.
    pub(crate) fn recovery_started(
        &self,
        kind: RecoveryKind,
        now_ms: i64,
        batches_to_rerun: Vec<i64>,
        unallocated_blocks: u64,
    ) {
        *self.last_recovery.lock().expect("metrics") = Some(RecoveryStatus {
            kind,
            started_ms: now_ms,
            finished_ms: None,
            batches_to_rerun,
            batches_rerun: 0,
            unallocated_blocks,
            blocks_replayed: 0,
            records_replayed: 0,
            replayed_before: (self.blocks_replayed.load(Relaxed), self.records_replayed.load(Relaxed)),
        });
    }

    /// One of the recovery's batches re-ran.
    pub(crate) fn recovery_batch_rerun(&self) {
        if let Some(recovery) = self.last_recovery.lock().expect("metrics").as_mut() {
            recovery.batches_rerun += 1;
        }
    }

    /// The recovery's last batch completed: its replay counts stop moving.
    pub(crate) fn recovery_finished(&self, now_ms: i64) {
        let mut last = self.last_recovery.lock().expect("metrics");
        if let Some(recovery) = last.as_mut().filter(|r| r.finished_ms.is_none()) {
            self.fill_replays(recovery);
            recovery.finished_ms = Some(now_ms);
        }
    }

    fn fill_replays(&self, recovery: &mut RecoveryStatus) {
        let (blocks, records) = recovery.replayed_before;
        recovery.blocks_replayed = self.blocks_replayed.load(Relaxed).saturating_sub(blocks);
        recovery.records_replayed = self.records_replayed.load(Relaxed).saturating_sub(records);
    }

    /// The last recovery, with its replay counts up to now if it still runs.
    pub(crate) fn last_recovery(&self) -> Option<RecoveryStatus> {
        let mut recovery = self.last_recovery.lock().expect("metrics").clone()?;
        if recovery.finished_ms.is_none() {
            self.fill_replays(&mut recovery);
        }
        Some(recovery)
    }

    /// The last completed batches, oldest first.
    pub(crate) fn recent_batches(&self) -> Vec<BatchInfo> {
        self.recent_batches.lock().expect("metrics").iter().copied().collect()
    }

    /// The last health events, oldest first.
    pub(crate) fn recent_health_events(&self) -> Vec<HealthEvent> {
        self.recent_health.lock().expect("metrics").iter().cloned().collect()
    }

    /// The last replayed blocks, oldest first.
    pub(crate) fn recent_replays(&self) -> Vec<ReplayInfo> {
        self.recent_replays.lock().expect("metrics").iter().cloned().collect()
    }

    /// Scheduling, processing and total delay histograms.
    pub(crate) fn delay_histograms(&self) -> BatchDelays {
        BatchDelays {
            scheduling: self.scheduling_delay.snapshot(),
            processing: self.processing_delay.snapshot(),
            total: self.total_delay.snapshot(),
        }
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
            records_replayed: self.records_replayed.load(Relaxed),
            replay_micros: self.replay_micros.load(Relaxed),
            ingest_gate_waits: self.ingest_gate_waits.load(Relaxed),
            ingest_gate_wait_micros: self.ingest_gate_wait_micros.load(Relaxed),
            dead_letters: self.dead_letters.load(Relaxed),
            dead_letters_by_stage: self.dead_letters_by_stage.lock().expect("metrics").clone(),
            task_attempts: self.task_attempts.load(Relaxed),
            task_failures: self.task_failures.load(Relaxed),
            health_events: self.health_events.load(Relaxed),
            stuck_processing_events: self.stuck_processing_events.load(Relaxed),
            high_error_rate_events: self.high_error_rate_events.load(Relaxed),
            rate_limit: self.rate_limit.load(Relaxed),
            last_batch: *self.last_batch.lock().expect("metrics"),
        }
    }
}

/// Histograms of the batch delays over every completed batch.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct BatchDelays {
    /// Processing start minus batch time.
    pub scheduling: DelayHistogram,
    /// Processing end minus processing start.
    pub processing: DelayHistogram,
    /// Scheduling plus processing delay.
    pub total: DelayHistogram,
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
