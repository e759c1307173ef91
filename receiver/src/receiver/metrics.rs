//! Receiver counters ([`ReceiverMetrics`] snapshots of atomics the threads update).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use sluice_blockstore::Position;

use crate::Checkpoint;
use crate::block_generator::GeneratorMetrics;

/// Per-shard counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct ShardMetrics {
    /// Records read from the shard and accepted by the generator.
    pub records_received: u64,
    /// Payload bytes of those records.
    pub bytes_received: u64,
    /// Records of the shard in stored blocks.
    pub records_stored: u64,
    /// The last stored position of the shard.
    #[serde(serialize_with = "as_display")]
    pub latest_stored: Option<Position>,
    /// Whether this receiver holds the shard's lease.
    pub owned: bool,
    /// How far behind the newest record the last read was (ms; Kinesis `millisBehindLatest`),
    /// when the source reports it: the processing-lag signal.
    pub millis_behind_latest: Option<i64>,
    /// How old the newest record of the last read was when it was read (ms; the approximate
    /// arrival time to the read, Kinesis's `IteratorAgeMilliseconds`); 0 after a read found the
    /// shard caught up. `None` until a record with an arrival time was read.
    pub arrival_age_ms: Option<i64>,
    /// The shard lease's owner in the lease table as of the receiver's last table scan (`None`:
    /// unowned, or no lease seen yet).
    pub lease_owner: Option<String>,
    /// The shard lease's checkpoint as of the last table scan.
    #[serde(serialize_with = "as_display")]
    pub checkpoint: Option<Checkpoint>,
}

/// Positions and checkpoints as their display form (`49590…/2`, `SHARD_END`).
#[allow(clippy::ref_option, reason = "serde's serialize_with hands over the field itself")]
fn as_display<T: std::fmt::Display, S: serde::Serializer>(value: &Option<T>, s: S) -> Result<S::Ok, S::Error> {
    match value {
        Some(v) => s.collect_str(v),
        None => s.serialize_none(),
    }
}

/// A snapshot of a receiver's counters.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize)]
pub struct ReceiverMetrics {
    /// Records read and accepted, over all shards.
    pub records_received: u64,
    /// Their payload bytes.
    pub bytes_received: u64,
    /// Records in stored blocks.
    pub records_stored: u64,
    /// Blocks the handler stored.
    pub blocks_pushed: u64,
    /// Store attempts that failed and were retried.
    pub push_retries: u64,
    /// Times a reader waited for room in the block queue (backpressure).
    pub backpressure_waits: u64,
    /// Checkpoint writes attempted (`SHARD_END` included).
    pub checkpoint_attempts: u64,
    /// Checkpoint writes that succeeded.
    pub checkpoint_successes: u64,
    /// Times the rate limiter made a reader wait.
    pub rate_limit_throttles: u64,
    /// Times the source throttled a read.
    pub source_throttles: u64,
    /// Lease-store calls that failed with a retryable error (throttling, I/O).
    pub lease_store_errors: u64,
    /// The current rate limit in records/s (`None`: unlimited).
    pub rate_limit: Option<f64>,
    /// Leases taken (including steals).
    pub leases_taken: u64,
    /// Leases lost to another worker.
    pub leases_lost: u64,
    /// Leases handed back above this worker's share (engine mode's balancing).
    pub leases_released: u64,
    /// Restarts after a failure.
    pub restarts: u64,
    /// Per shard, by shard id.
    pub shards: BTreeMap<String, ShardMetrics>,
}

/// The atomics behind [`ReceiverMetrics`].
#[derive(Debug, Default)]
pub(crate) struct MetricsCells {
    pub(crate) generator: Arc<GeneratorMetrics>,
    pub(crate) checkpoint_attempts: AtomicU64,
    pub(crate) checkpoint_successes: AtomicU64,
    pub(crate) source_throttles: AtomicU64,
    pub(crate) lease_store_errors: AtomicU64,
    pub(crate) leases_taken: AtomicU64,
    pub(crate) leases_lost: AtomicU64,
    pub(crate) leases_released: AtomicU64,
    pub(crate) restarts: AtomicU64,
    pub(crate) shards: Mutex<HashMap<Arc<str>, ShardCells>>,
    /// Owner and checkpoint of every shard lease, as of the coordinator's last table scan.
    pub(crate) lease_table: Mutex<Vec<(String, Option<String>, Checkpoint)>>,
}

#[derive(Debug, Default, Clone)]
pub(crate) struct ShardCells {
    pub(crate) records_received: u64,
    pub(crate) bytes_received: u64,
    pub(crate) millis_behind_latest: Option<i64>,
    pub(crate) arrival_age_ms: Option<i64>,
}

impl MetricsCells {
    pub(crate) fn received(&self, shard: &Arc<str>, records: u64, bytes: u64) {
        let mut shards = self.shards.lock().expect("metrics lock");
        let cells = shards.entry(shard.clone()).or_default();
        cells.records_received += records;
        cells.bytes_received += bytes;
    }

    pub(crate) fn lag(&self, shard: &Arc<str>, millis_behind_latest: Option<i64>) {
        if millis_behind_latest.is_some() {
            let mut shards = self.shards.lock().expect("metrics lock");
            shards.entry(shard.clone()).or_default().millis_behind_latest = millis_behind_latest;
        }
    }

    /// The age of the newest record of a read when it was read (`None`: the read had no record
    /// with an arrival time); a read that found the shard caught up sets 0.
    pub(crate) fn arrival_age(&self, shard: &Arc<str>, age_ms: Option<i64>, caught_up: bool) {
        let age = if caught_up { Some(0) } else { age_ms };
        if age.is_some() {
            let mut shards = self.shards.lock().expect("metrics lock");
            shards.entry(shard.clone()).or_default().arrival_age_ms = age;
        }
    }

    /// Keeps the owners and checkpoints of the shard leases the coordinator just read.
    pub(crate) fn lease_table(&self, table: &[crate::Lease]) {
        *self.lease_table.lock().expect("metrics lock") = table
            .iter()
            .map(|l| (l.lease_key.clone(), l.lease_owner.clone(), l.checkpoint.clone()))
            .collect();
    }

    pub(crate) fn bump(cell: &AtomicU64) {
        cell.fetch_add(1, Relaxed);
    }

    pub(crate) fn snapshot(&self) -> ReceiverMetrics {
        let shards = self.shards.lock().expect("metrics lock");
        let mut out = ReceiverMetrics {
            records_stored: self.generator.records_stored.load(Relaxed),
            blocks_pushed: self.generator.blocks_stored.load(Relaxed),
            push_retries: self.generator.push_retries.load(Relaxed),
            backpressure_waits: self.generator.producer_waits.load(Relaxed),
            checkpoint_attempts: self.checkpoint_attempts.load(Relaxed),
            checkpoint_successes: self.checkpoint_successes.load(Relaxed),
            source_throttles: self.source_throttles.load(Relaxed),
            lease_store_errors: self.lease_store_errors.load(Relaxed),
            leases_taken: self.leases_taken.load(Relaxed),
            leases_lost: self.leases_lost.load(Relaxed),
            leases_released: self.leases_released.load(Relaxed),
            restarts: self.restarts.load(Relaxed),
            ..ReceiverMetrics::default()
        };
        for (shard, cells) in shards.iter() {
            out.records_received += cells.records_received;
            out.bytes_received += cells.bytes_received;
            out.shards.insert(
                shard.to_string(),
                ShardMetrics {
                    records_received: cells.records_received,
                    bytes_received: cells.bytes_received,
                    millis_behind_latest: cells.millis_behind_latest,
                    arrival_age_ms: cells.arrival_age_ms,
                    ..ShardMetrics::default()
                },
            );
        }
        for (shard, owner, checkpoint) in self.lease_table.lock().expect("metrics lock").iter() {
            let m = out.shards.entry(shard.clone()).or_default();
            m.lease_owner.clone_from(owner);
            m.checkpoint = Some(checkpoint.clone());
        }
        out
    }
}
