//! [`StreamingStatus`]: everything a running context can tell about itself at one moment, in one
//! value — the engine's counters, the last batches and health events, the detectors, every input
//! (receiver, source and lease-store counters, per shard), the block store and the last
//! recovery.
//!
//! It is what the monitoring server exports (`/metrics` in the Prometheus text format, `/api/status`
//! as JSON for the status page), and what a program can read itself with
//! [`StreamingContext::status`](crate::StreamingContext::status). Building one reads counters and
//! takes short locks; it never calls a source or a lease table, so it is cheap enough for every
//! scrape.

use serde::Serialize;
use sluice_blockstore::BlockStoreMetrics;
use sluice_receiver::{NamedCounter, ReceiverMetrics};

use super::Runtime;
use super::membership::Phase;
use super::metrics::{
    BatchDelays, BatchInfo, HIGH_ERROR_RATE, HealthEvent, MetricsSnapshot, RecoveryStatus, ReplayInfo, STUCK_PROCESSING,
};

/// A running context at one moment. See the module docs of `engine/src/runtime/status.rs`.
#[derive(Debug, Clone, Serialize)]
#[non_exhaustive]
pub struct StreamingStatus {
    /// This worker's id.
    pub worker_id: String,
    /// When the status was taken (engine clock, ms since the epoch).
    pub now_ms: i64,
    /// When the context started (engine clock).
    pub started_ms: i64,
    /// The batch interval.
    pub batch_interval_ms: u64,
    /// Running, draining, stopping or stopped.
    pub state: RunState,
    /// What stopped the stream, if an error did.
    pub error: Option<String>,
    /// The engine's counters ([`StreamingContext::metrics`](crate::StreamingContext::metrics)).
    pub metrics: MetricsSnapshot,
    /// The last completed batches, oldest first (at most
    /// [`RECENT_BATCHES`](crate::RECENT_BATCHES)).
    pub batches: Vec<BatchInfo>,
    /// Histograms of the batch delays over every completed batch.
    pub delays: BatchDelays,
    /// The last health events, oldest first.
    pub health_events: Vec<HealthEvent>,
    /// The built-in detectors: `stuck_processing`, `high_error_rate`.
    pub detectors: Vec<DetectorStatus>,
    /// Every input, in the order the program defined them.
    pub inputs: Vec<InputStatus>,
    /// The block store's counters and memory gauges.
    pub block_store: BlockStoreMetrics,
    /// The last recovery of a metadata log (a restart with unfinished work, or an adoption).
    pub recovery: Option<RecoveryStatus>,
    /// The last blocks rebuilt by replaying their ranges, oldest first.
    pub replays: Vec<ReplayInfo>,
    /// Logs of dead workers this worker has adopted and not yet finished.
    pub adoptions: Vec<AdoptionStatus>,
}

/// Where a started context is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum RunState {
    /// Cutting and running batches.
    Running,
    /// A graceful stop: receivers stopped, the remaining blocks are being processed.
    Draining,
    /// A non-graceful stop: the batch in progress finishes, nothing more runs.
    Stopping,
    /// The job generator has stopped (after a stop, or because an error stopped the stream:
    /// see [`StreamingStatus::error`]).
    Stopped,
}

/// One built-in detector.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DetectorStatus {
    /// `stuck_processing` or `high_error_rate`.
    pub name: &'static str,
    /// Whether `value` is above `bound` now.
    pub active: bool,
    /// The configured bound: milliseconds of delay (`stuck_processing`), a fraction of failed
    /// task attempts (`high_error_rate`).
    pub bound: f64,
    /// What is compared with the bound. `stuck_processing`: the larger of the last batch's total
    /// delay and how long the next batch has been due without completing (a hung batch raises
    /// no event, as it never completes, but shows here). `high_error_rate`: the last batch's
    /// failed attempts over its attempts. `None` before the first batch.
    pub value: Option<f64>,
    /// Health events it raised since the context was built.
    pub events: u64,
}

/// One input: its receiver's counters (and per shard: records, bytes, lag, lease owner and
/// checkpoint), its source's and its lease store's.
#[derive(Debug, Clone, Serialize)]
pub struct InputStatus {
    /// The input's id (its position among the program's inputs).
    pub input_id: u32,
    /// The stream it reads.
    pub stream: String,
    /// Why its receiver gave up, if it did.
    pub failed: Option<String>,
    /// The receiver's counters.
    pub receiver: ReceiverMetrics,
    /// The source's own counters ([`Source::counters`](sluice_receiver::Source::counters); e.g.
    /// Kinesis calls and throttles).
    pub source: Vec<NamedCounter>,
    /// The lease store's own counters ([`LeaseStore::counters`](sluice_receiver::LeaseStore::counters);
    /// e.g. `DynamoDB` calls and throttles).
    pub lease_store: Vec<NamedCounter>,
}

/// A dead worker's log being processed by this worker.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AdoptionStatus {
    /// The dead worker.
    pub worker: String,
    /// `queued`, `running`, `done` or `abandoned`.
    pub phase: &'static str,
    /// Batches of its log to re-run.
    pub pending_batches: usize,
}

impl Runtime {
    /// The runtime's status now. See [`StreamingStatus`].
    pub(crate) fn status(&self) -> StreamingStatus {
        use std::sync::atomic::Ordering::SeqCst;
        let now_ms = self.clock.now_ms();
        let (stopped, error, last_processed_ms) = {
            let status = self.status.lock().expect("status");
            (
                status.stopped,
                status.error.as_ref().map(ToString::to_string),
                status.last_processed_ms,
            )
        };
        let state = if stopped {
            RunState::Stopped
        } else if self.stop_requested.load(SeqCst) {
            RunState::Stopping
        } else if self.drain_requested.load(SeqCst) {
            RunState::Draining
        } else {
            RunState::Running
        };
        let metrics = self.metrics.snapshot();
        let batches = self.metrics.recent_batches();
        let last_own = batches.iter().rev().find(|b| !b.adopted).copied();
        // The batch after the last completed one is due one interval later (the first one, an
        // interval after the start); while it has not completed, it waits.
        let due_ms = last_processed_ms.map_or(self.started_ms + self.interval_ms, |t| t + self.interval_ms);
        let waiting_ms = if stopped { 0 } else { (now_ms - due_ms).max(0) };
        let stuck_value = match last_own {
            Some(b) => Some(b.total_delay_ms().max(waiting_ms) as f64),
            None if waiting_ms > 0 => Some(waiting_ms as f64),
            None => None,
        };
        let stuck_bound = self.config.stuck_bound_ms() as f64;
        let error_value = last_own.map(|b| b.error_rate());
        let error_bound = self.config.error_rate_bound;
        let detectors = vec![
            DetectorStatus {
                name: STUCK_PROCESSING,
                active: stuck_value.is_some_and(|v| v > stuck_bound),
                bound: stuck_bound,
                value: stuck_value,
                events: metrics.stuck_processing_events,
            },
            DetectorStatus {
                name: HIGH_ERROR_RATE,
                active: error_value.is_some_and(|v| v > error_bound),
                bound: error_bound,
                value: error_value,
                events: metrics.high_error_rate_events,
            },
        ];
        let adoptions = self
            .adoptions()
            .iter()
            .map(|a| AdoptionStatus {
                worker: a.worker.clone(),
                phase: a.phase().as_str(),
                pending_batches: a.pending.len(),
            })
            .collect();
        StreamingStatus {
            worker_id: self.own.writer.to_string(),
            now_ms,
            started_ms: self.started_ms,
            batch_interval_ms: self.config.batch_interval_ms,
            state,
            error,
            metrics,
            batches,
            delays: self.metrics.delay_histograms(),
            health_events: self.metrics.recent_health_events(),
            detectors,
            inputs: self.inputs.iter().map(|i| i.status()).collect(),
            block_store: self.block_store().metrics(),
            recovery: self.metrics.last_recovery(),
            replays: self.metrics.recent_replays(),
            adoptions,
        }
    }
}

impl Phase {
    /// The phase's name in the status.
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Phase::Queued => "queued",
            Phase::Running => "running",
            Phase::Done => "done",
            Phase::Abandoned => "abandoned",
        }
    }
}
