//! A [`StreamingStatus`] in the Prometheus text exposition format (version 0.0.4), encoded by
//! `prometheus-client`: every scrape takes a fresh status and hands it to a registry as one
//! [`Collector`], so the counters that live in receivers, sources, lease stores and the block
//! store are read where they are kept, never copied into a second set of metrics.
//!
//! Every name is `sluice_…`; counters end in `_total`, durations are in seconds. Per-stream
//! metrics carry a `stream` label, per-shard ones `stream` and `shard`. `docs/operations.md`
//! explains each metric and what to alert on.

use std::collections::BTreeMap;
use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Registry;
use sluice_blockstore::BlockStoreMetrics;
use sluice_receiver::NamedCounter;

use crate::runtime::metrics::{DELAY_BUCKETS_MS, DelayHistogram};
use crate::runtime::status::{RunState, StreamingStatus};

/// The `Content-Type` of [`encode`]'s output.
pub(crate) const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// Encodes `status` in the Prometheus text format.
pub(crate) fn encode(status: StreamingStatus) -> String {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(StatusCollector(status)));
    let mut out = String::new();
    prometheus_client::encoding::prometheus_text::encode(&mut out, &registry)
        .expect("encoding into a String cannot fail");
    out
}

/// Label pairs of one sample.
type Labels = Vec<(&'static str, String)>;

/// One status, exported once.
#[derive(Debug)]
struct StatusCollector(StreamingStatus);

impl Collector for StatusCollector {
    fn encode(&self, encoder: DescriptorEncoder<'_>) -> fmt::Result {
        let mut out = Out(encoder);
        let status = &self.0;
        engine(&mut out, status)?;
        batch_delays(&mut out, status)?;
        recovery(&mut out, status)?;
        detectors(&mut out, status)?;
        block_store(&mut out, &status.block_store)?;
        inputs(&mut out, status)
    }
}

/// Writes metric families.
struct Out<'a>(DescriptorEncoder<'a>);

impl Out<'_> {
    fn counter(&mut self, name: &str, help: &str, value: u64) -> fmt::Result {
        let metric = ConstCounter::new(value);
        let encoder = self.0.encode_descriptor(name, help, None, metric.metric_type())?;
        metric.encode(encoder)
    }

    /// A counter of seconds (fractional).
    fn counter_seconds(&mut self, name: &str, help: &str, value: f64) -> fmt::Result {
        let metric = ConstCounter::new(value);
        let encoder = self.0.encode_descriptor(name, help, None, metric.metric_type())?;
        metric.encode(encoder)
    }

    fn gauge(&mut self, name: &str, help: &str, value: f64) -> fmt::Result {
        let metric = ConstGauge::new(value);
        let encoder = self.0.encode_descriptor(name, help, None, metric.metric_type())?;
        metric.encode(encoder)
    }

    /// A counter with one sample per label set; nothing when there are no samples.
    fn counters(&mut self, name: &str, help: &str, samples: &[(Labels, u64)]) -> fmt::Result {
        if samples.is_empty() {
            return Ok(());
        }
        let mut encoder = self.0.encode_descriptor(name, help, None, MetricType::Counter)?;
        for (labels, value) in samples {
            ConstCounter::new(*value).encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    /// A gauge with one sample per label set; nothing when there are no samples.
    fn gauges(&mut self, name: &str, help: &str, samples: &[(Labels, f64)]) -> fmt::Result {
        if samples.is_empty() {
            return Ok(());
        }
        let mut encoder = self.0.encode_descriptor(name, help, None, MetricType::Gauge)?;
        for (labels, value) in samples {
            ConstGauge::new(*value).encode(encoder.encode_family(labels)?)?;
        }
        Ok(())
    }

    fn histogram(&mut self, name: &str, help: &str, histogram: &DelayHistogram) -> fmt::Result {
        let mut encoder = self.0.encode_descriptor(name, help, None, MetricType::Histogram)?;
        let bounds = DELAY_BUCKETS_MS
            .iter()
            .map(|&ms| ms as f64 / 1_000.0)
            .chain([f64::INFINITY]);
        let buckets: Vec<(f64, u64)> = bounds.zip(histogram.counts.iter().copied()).collect();
        encoder.encode_histogram::<NoLabelSet>(histogram.sum_ms as f64 / 1_000.0, histogram.count, &buckets, None)
    }
}

fn seconds(ms: i64) -> f64 {
    ms as f64 / 1_000.0
}

fn engine(out: &mut Out<'_>, status: &StreamingStatus) -> fmt::Result {
    let m = &status.metrics;
    out.gauge(
        "sluice_stream_running",
        "1 while the context runs batches (also while it drains for a graceful stop), 0 once it stopped.",
        f64::from(u8::from(matches!(status.state, RunState::Running | RunState::Draining))),
    )?;
    out.gauge(
        "sluice_stream_failed",
        "1 if an error stopped the stream (the status page and /api/status say which).",
        f64::from(u8::from(status.error.is_some())),
    )?;
    out.gauge(
        "sluice_batch_interval_seconds",
        "The configured batch interval.",
        status.batch_interval_ms as f64 / 1_000.0,
    )?;
    out.counter(
        "sluice_batches_completed",
        "Batches completed (their output committed, then BatchCompleted logged).",
        m.batches_completed,
    )?;
    out.counter(
        "sluice_records_processed",
        "Records in completed batches.",
        m.records_processed,
    )?;
    out.counter(
        "sluice_blocks_stored",
        "Blocks the receivers' block handler stored and logged (BlockAdded).",
        m.blocks_stored,
    )?;
    out.counter(
        "sluice_ingest_gate_waits",
        "Blocks that waited for the memory budget (the ingest gate) before they were stored; the receivers stand still meanwhile.",
        m.ingest_gate_waits,
    )?;
    out.counter_seconds(
        "sluice_ingest_gate_wait_seconds",
        "Time blocks waited for the memory budget.",
        m.ingest_gate_wait_micros as f64 / 1e6,
    )?;
    out.counter(
        "sluice_blocks_replayed",
        "Blocks rebuilt by replaying their sequence-number ranges from the source (no valid stored copy).",
        m.blocks_replayed,
    )?;
    out.counter(
        "sluice_records_replayed",
        "Records those replays returned.",
        m.records_replayed,
    )?;
    out.counter_seconds(
        "sluice_replay_seconds",
        "Time spent reading the blocks that were replayed.",
        m.replay_micros as f64 / 1e6,
    )?;
    let replay_rate = if m.replay_micros == 0 {
        0.0
    } else {
        m.records_replayed as f64 / (m.replay_micros as f64 / 1e6)
    };
    out.gauge(
        "sluice_replay_records_per_second",
        "Records replayed per second of replay (records_replayed over replay time; 0 before any replay).",
        replay_rate,
    )?;
    out.counter(
        "sluice_dead_letters",
        "Records sent to the dead-letter sink (each bad record once per batch).",
        m.dead_letters,
    )?;
    let by_stage: Vec<(Labels, u64)> = m
        .dead_letters_by_stage
        .iter()
        .map(|(stage, n)| (vec![("stage", stage.clone())], *n))
        .collect();
    out.counters(
        "sluice_dead_letters_by_stage",
        "Dead letters per stage that rejected them (try_map#2, …; panic for records isolated after panics).",
        &by_stage,
    )?;
    out.counter(
        "sluice_task_attempts",
        "Task attempts (every task run, retries included).",
        m.task_attempts,
    )?;
    out.counter(
        "sluice_task_failures",
        "Failed task attempts (a panic in user code, a block that could not be read).",
        m.task_failures,
    )?;
    out.gauge(
        "sluice_rate_limit_records_per_second",
        "The rate the backpressure controller last set for all inputs together (0: never set).",
        m.rate_limit as f64,
    )?;
    Ok(())
}

/// The last batch's delays and the histograms over every batch.
fn batch_delays(out: &mut Out<'_>, status: &StreamingStatus) -> fmt::Result {
    if let Some(last) = status.batches.last() {
        out.gauge(
            "sluice_last_batch_time_seconds",
            "Batch time of the last completed batch (Unix time).",
            seconds(last.batch_time.as_millis()),
        )?;
        out.gauge(
            "sluice_last_batch_records",
            "Records in the last completed batch.",
            last.num_records as f64,
        )?;
        out.gauge(
            "sluice_last_batch_scheduling_delay_seconds",
            "Scheduling delay of the last completed batch (processing start minus batch time).",
            seconds(last.scheduling_delay_ms),
        )?;
        out.gauge(
            "sluice_last_batch_processing_delay_seconds",
            "Processing time of the last completed batch.",
            seconds(last.processing_delay_ms),
        )?;
        out.gauge(
            "sluice_last_batch_total_delay_seconds",
            "Scheduling plus processing delay of the last completed batch.",
            seconds(last.total_delay_ms()),
        )?;
    }
    out.histogram(
        "sluice_batch_scheduling_delay_seconds",
        "Scheduling delay of every completed batch (processing start minus batch time).",
        &status.delays.scheduling,
    )?;
    out.histogram(
        "sluice_batch_processing_delay_seconds",
        "Processing time of every completed batch.",
        &status.delays.processing,
    )?;
    out.histogram(
        "sluice_batch_total_delay_seconds",
        "Scheduling plus processing delay of every completed batch.",
        &status.delays.total,
    )?;
    Ok(())
}

/// The last recovery and the adoptions in progress.
fn recovery(out: &mut Out<'_>, status: &StreamingStatus) -> fmt::Result {
    let recovery = status.recovery.as_ref();
    out.gauge(
        "sluice_recovery_in_progress",
        "1 while the last recovery (a restart with unfinished batches, or an adopted log) still runs its batches.",
        f64::from(u8::from(recovery.is_some_and(|r| r.finished_ms.is_none()))),
    )?;
    if let Some(r) = recovery {
        out.gauge(
            "sluice_recovery_batches_to_rerun",
            "Batches the last recovery found allocated but not completed.",
            r.batches_to_rerun.len() as f64,
        )?;
        out.gauge(
            "sluice_recovery_batches_rerun",
            "Of those, batches re-run so far.",
            r.batches_rerun as f64,
        )?;
        out.gauge(
            "sluice_recovery_blocks_replayed",
            "Blocks replayed from the source while the last recovery ran.",
            r.blocks_replayed as f64,
        )?;
    }
    out.gauge(
        "sluice_adoptions_in_progress",
        "Logs of dead workers this worker adopted and is still processing.",
        status.adoptions.len() as f64,
    )
}

fn detectors(out: &mut Out<'_>, status: &StreamingStatus) -> fmt::Result {
    let per_detector = |f: &dyn Fn(&crate::runtime::status::DetectorStatus) -> f64| -> Vec<(Labels, f64)> {
        status
            .detectors
            .iter()
            .map(|d| (vec![("detector", d.name.to_owned())], f(d)))
            .collect()
    };
    out.gauges(
        "sluice_detector_active",
        "1 while a built-in detector's value is above its bound (stuck_processing, high_error_rate).",
        &per_detector(&|d| f64::from(u8::from(d.active))),
    )?;
    let events: Vec<(Labels, u64)> = status
        .detectors
        .iter()
        .map(|d| (vec![("detector", d.name.to_owned())], d.events))
        .collect();
    out.counters(
        "sluice_health_events",
        "Health events raised by the built-in detectors (one per batch that crossed a bound).",
        &events,
    )?;
    for d in &status.detectors {
        match d.name {
            crate::runtime::metrics::STUCK_PROCESSING => {
                out.gauge(
                    "sluice_stuck_processing_delay_seconds",
                    "The stuck-processing detector's value: the larger of the last batch's total delay and how long the next batch has been due.",
                    d.value.unwrap_or(0.0) / 1_000.0,
                )?;
                out.gauge(
                    "sluice_stuck_processing_bound_seconds",
                    "The stuck-processing detector's bound (default 10 batch intervals).",
                    d.bound / 1_000.0,
                )?;
            }
            crate::runtime::metrics::HIGH_ERROR_RATE => {
                out.gauge(
                    "sluice_task_error_rate",
                    "Failed task attempts over task attempts in the last batch: the high-error-rate detector's value.",
                    d.value.unwrap_or(0.0),
                )?;
                out.gauge(
                    "sluice_task_error_rate_bound",
                    "The high-error-rate detector's bound (default 0.05).",
                    d.bound,
                )?;
            }
            _ => {}
        }
    }
    Ok(())
}

fn block_store(out: &mut Out<'_>, m: &BlockStoreMetrics) -> fmt::Result {
    let counters: [(&str, &str, u64); 20] = [
        ("blocks_stored", "Blocks put into the block store.", m.blocks_stored),
        ("bytes_stored", "Payload bytes of the blocks put.", m.bytes_stored),
        ("replicated", "Block copies written to the replica tier.", m.replicated),
        (
            "evictions",
            "Blocks evicted from the memory tier to make room.",
            m.evictions,
        ),
        (
            "spilled_to_disk",
            "Evicted blocks written to disk because their level includes disk.",
            m.spilled_to_disk,
        ),
        (
            "spill_failures",
            "Evicted blocks whose spill to disk failed.",
            m.spill_failures,
        ),
        (
            "dropped_on_eviction",
            "Evicted blocks with no other copy (MEMORY_ONLY): a later read replays them.",
            m.dropped_on_eviction,
        ),
        (
            "too_large_for_memory",
            "Blocks larger than the whole memory budget, not cached.",
            m.too_large_for_memory,
        ),
        (
            "dropped_too_large",
            "Of those, blocks stored nowhere (MEMORY_ONLY): replayed when read.",
            m.dropped_too_large,
        ),
        (
            "corrupt_copies",
            "Copies that failed their checksum and were discarded.",
            m.corrupt_copies,
        ),
        ("memory_hits", "Reads answered from memory.", m.memory_hits),
        ("disk_hits", "Reads answered from disk.", m.disk_hits),
        ("replica_hits", "Reads answered from the replica.", m.replica_hits),
        ("misses", "Reads that found no valid copy.", m.misses),
        (
            "tier_errors",
            "Tier reads that failed with an I/O or object-store error (the next tier was tried).",
            m.tier_errors,
        ),
        (
            "recached",
            "Blocks put back into memory after a disk or replica hit.",
            m.recached,
        ),
        (
            "blocks_replayed",
            "Blocks the store's readers rebuilt by replay.",
            m.blocks_replayed,
        ),
        (
            "records_replayed",
            "Records those replays returned.",
            m.records_replayed,
        ),
        ("replay_attempts", "Replay calls, retries included.", m.replay_attempts),
        (
            "replay_failures",
            "Reads that gave up: the replay failed for good (data expired, retry timeout).",
            m.replay_failures,
        ),
    ];
    for (name, help, value) in counters {
        out.counter(&format!("sluice_block_store_{name}"), help, value)?;
    }
    out.gauge(
        "sluice_block_store_memory_bytes",
        "Bytes the memory tier holds.",
        m.memory_bytes_in_use as f64,
    )?;
    out.gauge(
        "sluice_block_store_memory_budget_bytes",
        "The memory tier's budget.",
        m.memory_budget_bytes as f64,
    )?;
    out.gauge(
        "sluice_block_store_memory_blocks",
        "Blocks in the memory tier.",
        m.memory_blocks as f64,
    )
}

fn inputs(out: &mut Out<'_>, status: &StreamingStatus) -> fmt::Result {
    type Field = (&'static str, &'static str, fn(&sluice_receiver::ReceiverMetrics) -> u64);
    let receiver_counters: [Field; 15] = [
        ("records_received", "Records read and accepted by the receiver.", |r| {
            r.records_received
        }),
        ("bytes_received", "Payload bytes of those records.", |r| {
            r.bytes_received
        }),
        ("records_stored", "Records in stored blocks.", |r| r.records_stored),
        ("blocks_pushed", "Blocks the receiver handed to the engine.", |r| {
            r.blocks_pushed
        }),
        ("push_retries", "Block stores that failed and were retried.", |r| {
            r.push_retries
        }),
        (
            "backpressure_waits",
            "Times a shard reader waited for room in the block queue.",
            |r| r.backpressure_waits,
        ),
        (
            "checkpoint_attempts",
            "Shard checkpoint writes attempted (SHARD_END included).",
            |r| r.checkpoint_attempts,
        ),
        ("checkpoint_successes", "Shard checkpoint writes that succeeded.", |r| {
            r.checkpoint_successes
        }),
        (
            "rate_limit_throttles",
            "Times the rate limiter made a shard reader wait.",
            |r| r.rate_limit_throttles,
        ),
        (
            "source_throttles",
            "Reads the source throttled (retried after a backoff).",
            |r| r.source_throttles,
        ),
        (
            "lease_store_errors",
            "Lease-store calls that failed with a retryable error (throttling, I/O).",
            |r| r.lease_store_errors,
        ),
        (
            "leases_taken",
            "Shard leases taken (steals and adoptions included).",
            |r| r.leases_taken,
        ),
        ("leases_lost", "Shard leases lost to another worker.", |r| r.leases_lost),
        (
            "leases_released",
            "Shard leases handed back above this worker's share.",
            |r| r.leases_released,
        ),
        ("restarts", "Receiver restarts after a failure.", |r| r.restarts),
    ];
    let stream = |i: &crate::runtime::status::InputStatus| vec![("stream", i.stream.clone())];
    for (name, help, get) in receiver_counters {
        let samples: Vec<(Labels, u64)> = status.inputs.iter().map(|i| (stream(i), get(&i.receiver))).collect();
        out.counters(&format!("sluice_receiver_{name}"), help, &samples)?;
    }
    let failed: Vec<(Labels, f64)> = status
        .inputs
        .iter()
        .map(|i| (stream(i), f64::from(u8::from(i.failed.is_some()))))
        .collect();
    out.gauges(
        "sluice_receiver_failed",
        "1 if the input's receiver gave up (the stream then stops).",
        &failed,
    )?;
    let rate_limits: Vec<(Labels, f64)> = status
        .inputs
        .iter()
        .filter_map(|i| i.receiver.rate_limit.map(|r| (stream(i), r)))
        .collect();
    out.gauges(
        "sluice_receiver_rate_limit_records_per_second",
        "The receiver's current rate limit (absent: unlimited).",
        &rate_limits,
    )?;
    shards(out, status)?;
    named(
        out,
        "sluice_source",
        status.inputs.iter().map(|i| (&i.stream, &i.source)),
    )?;
    named(
        out,
        "sluice_lease_store",
        status.inputs.iter().map(|i| (&i.stream, &i.lease_store)),
    )
}

fn shards(out: &mut Out<'_>, status: &StreamingStatus) -> fmt::Result {
    let shards: Vec<(Labels, &sluice_receiver::ShardMetrics)> = status
        .inputs
        .iter()
        .flat_map(|i| {
            i.receiver
                .shards
                .iter()
                .map(|(shard, m)| (vec![("stream", i.stream.clone()), ("shard", shard.clone())], m))
        })
        .collect();
    let counter = |f: fn(&sluice_receiver::ShardMetrics) -> u64| -> Vec<(Labels, u64)> {
        shards.iter().map(|(l, m)| (l.clone(), f(m))).collect()
    };
    out.counters(
        "sluice_shard_records_received",
        "Records read from the shard by this worker.",
        &counter(|m| m.records_received),
    )?;
    out.counters(
        "sluice_shard_bytes_received",
        "Payload bytes read from the shard by this worker.",
        &counter(|m| m.bytes_received),
    )?;
    out.counters(
        "sluice_shard_records_stored",
        "Records of the shard in stored blocks.",
        &counter(|m| m.records_stored),
    )?;
    let gauge = |f: fn(&sluice_receiver::ShardMetrics) -> Option<f64>| -> Vec<(Labels, f64)> {
        shards
            .iter()
            .filter_map(|(l, m)| f(m).map(|v| (l.clone(), v)))
            .collect()
    };
    out.gauges(
        "sluice_shard_behind_latest_seconds",
        "How far the last read was behind the newest record of the shard (Kinesis millisBehindLatest, in seconds).",
        &gauge(|m| m.millis_behind_latest.map(|ms| ms as f64 / 1_000.0)),
    )?;
    out.gauges(
        "sluice_shard_arrival_age_seconds",
        "Age of the newest record of the last read when it was read (arrival to read; 0 when caught up).",
        &gauge(|m| m.arrival_age_ms.map(|ms| ms as f64 / 1_000.0)),
    )?;
    out.gauges(
        "sluice_shard_lease_owned",
        "1 if this worker holds the shard's lease.",
        &gauge(|m| Some(f64::from(u8::from(m.owned)))),
    )?;
    let owners: Vec<(Labels, f64)> = shards
        .iter()
        .filter(|(_, m)| m.checkpoint.is_some())
        .map(|(l, m)| {
            let mut labels = l.clone();
            labels.push(("owner", m.lease_owner.clone().unwrap_or_default()));
            (labels, 1.0)
        })
        .collect();
    out.gauges(
        "sluice_shard_lease_owner_info",
        "The shard lease's owner in the lease table as of the last scan (owner=\"\": unowned); always 1.",
        &owners,
    )
}

/// Counters a source or lease store names itself: `<prefix>_<name>_total{stream=…}`, one family
/// per name over every input that reports it.
fn named<'a>(
    out: &mut Out<'_>,
    prefix: &str,
    inputs: impl Iterator<Item = (&'a String, &'a Vec<NamedCounter>)>,
) -> fmt::Result {
    // Metric name → its help and samples.
    type Family = (&'static str, Vec<(Labels, u64)>);
    let mut families: BTreeMap<String, Family> = BTreeMap::new();
    for (stream, counters) in inputs {
        for c in counters {
            let name = format!("{prefix}_{}", metric_name_part(c.name));
            families
                .entry(name)
                .or_insert_with(|| (c.help, Vec::new()))
                .1
                .push((vec![("stream", stream.clone())], c.value));
        }
    }
    for (name, (help, samples)) in families {
        out.counters(&name, help, &samples)?;
    }
    Ok(())
}

/// A counter's own name made safe for a metric name (`[a-zA-Z0-9_]`).
fn metric_name_part(name: &str) -> String {
    name.chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' { c } else { '_' })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use sluice_receiver::{ReceiverMetrics, ShardMetrics};

    use super::*;
    use crate::runtime::metrics::{BatchInfo, Metrics, RecoveryKind};
    use crate::runtime::status::{DetectorStatus, InputStatus};

    fn batch(time_ms: i64, records: u64, scheduling: i64, processing: i64) -> BatchInfo {
        BatchInfo {
            batch_time: crate::BatchTime::from_millis(time_ms),
            adopted: false,
            num_records: records,
            scheduling_delay_ms: scheduling,
            processing_delay_ms: processing,
            dead_letters: 0,
            processing_micros: 0,
            tasks: 4,
            task_failures: 1,
        }
    }

    fn input(stream: &str, throttles: u64) -> InputStatus {
        let mut shards = BTreeMap::new();
        shards.insert(
            "shard-0".to_owned(),
            ShardMetrics {
                records_received: 10,
                bytes_received: 100,
                millis_behind_latest: Some(1_500),
                lease_owner: Some("w\"1".to_owned()),
                checkpoint: Some(sluice_receiver::Checkpoint::TrimHorizon),
                ..ShardMetrics::default()
            },
        );
        InputStatus {
            input_id: 0,
            stream: stream.to_owned(),
            failed: None,
            receiver: ReceiverMetrics {
                records_received: 10,
                shards,
                ..ReceiverMetrics::default()
            },
            source: vec![
                NamedCounter::new("throttles", "Calls throttled.", throttles),
                NamedCounter::new("get-records", "Odd name.", 1),
            ],
            lease_store: Vec::new(),
        }
    }

    fn status(metrics: &Metrics, inputs: Vec<InputStatus>) -> StreamingStatus {
        StreamingStatus {
            worker_id: "w".into(),
            now_ms: 10_000,
            started_ms: 0,
            batch_interval_ms: 1_000,
            state: RunState::Running,
            error: None,
            metrics: metrics.snapshot(),
            batches: metrics.recent_batches(),
            delays: metrics.delay_histograms(),
            health_events: Vec::new(),
            detectors: vec![DetectorStatus {
                name: crate::runtime::metrics::HIGH_ERROR_RATE,
                active: true,
                bound: 0.05,
                value: Some(0.25),
                events: 2,
            }],
            inputs,
            block_store: BlockStoreMetrics::default(),
            recovery: metrics.last_recovery(),
            replays: Vec::new(),
            adoptions: Vec::new(),
        }
    }

    fn lines_of<'a>(text: &'a str, name: &str) -> Vec<&'a str> {
        text.lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .collect()
    }

    #[test]
    fn every_family_is_declared_once_and_counters_end_in_total() {
        let metrics = Metrics::default();
        metrics.record_batch(&batch(1_000, 50, 3, 40));
        let text = encode(status(&metrics, vec![input("a", 1), input("b", 2)]));
        let mut declared = std::collections::HashSet::new();
        for line in text.lines().filter(|l| l.starts_with("# TYPE ")) {
            let mut parts = line.split(' ').skip(2);
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap());
            assert!(declared.insert(name.to_owned()), "{name} declared twice");
            assert!(name.starts_with("sluice_"), "{name}");
            assert!(name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_'), "{name}");
            assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
        }
        // Two inputs reporting one counter: one family, a sample per stream.
        assert_eq!(
            lines_of(&text, "sluice_source_throttles_total"),
            [
                "sluice_source_throttles_total{stream=\"a\"} 1",
                "sluice_source_throttles_total{stream=\"b\"} 2"
            ]
        );
        assert!(text.contains("# HELP sluice_source_throttles_total Calls throttled.\n"));
        assert_eq!(lines_of(&text, "sluice_source_get_records_total").len(), 2);
    }

    #[test]
    fn shards_carry_their_labels_and_values_are_in_seconds() {
        let metrics = Metrics::default();
        metrics.record_batch(&batch(4_000, 50, 3, 40));
        let text = encode(status(&metrics, vec![input("we\"ird\n", 0)]));
        assert_eq!(
            lines_of(&text, "sluice_shard_behind_latest_seconds"),
            ["sluice_shard_behind_latest_seconds{stream=\"we\\\"ird\\n\",shard=\"shard-0\"} 1.5"]
        );
        assert_eq!(
            lines_of(&text, "sluice_shard_lease_owner_info"),
            ["sluice_shard_lease_owner_info{stream=\"we\\\"ird\\n\",shard=\"shard-0\",owner=\"w\\\"1\"} 1.0"]
        );
        assert_eq!(
            lines_of(&text, "sluice_last_batch_total_delay_seconds"),
            ["sluice_last_batch_total_delay_seconds 0.043"]
        );
        assert_eq!(
            lines_of(&text, "sluice_detector_active"),
            ["sluice_detector_active{detector=\"high_error_rate\"} 1.0"]
        );
        assert_eq!(
            lines_of(&text, "sluice_task_error_rate"),
            ["sluice_task_error_rate 0.25"]
        );
        assert_eq!(
            lines_of(&text, "sluice_task_failures_total"),
            ["sluice_task_failures_total 1"]
        );
        assert!(
            lines_of(&text, "sluice_recovery_blocks_replayed").is_empty(),
            "no recovery yet"
        );
    }

    #[test]
    fn delay_histograms_are_cumulative_in_seconds() {
        let metrics = Metrics::default();
        for (i, processing) in [4, 5, 6, 700, 400_000].into_iter().enumerate() {
            metrics.record_batch(&batch(i as i64 * 1_000, 1, 0, processing));
        }
        metrics.recovery_started(RecoveryKind::Restart, 0, vec![1_000], 3);
        let text = encode(status(&metrics, Vec::new()));
        let bucket = |le: &str| {
            let sample = format!("sluice_batch_processing_delay_seconds_bucket{{le=\"{le}\"}} ");
            text.lines()
                .find_map(|l| l.strip_prefix(&sample))
                .unwrap_or_else(|| panic!("no bucket {le}"))
                .to_owned()
        };
        assert_eq!(bucket("0.005"), "2", "4 ms and 5 ms (bounds are inclusive)");
        assert_eq!(bucket("0.01"), "3");
        assert_eq!(bucket("1"), "4");
        assert_eq!(bucket("300"), "4");
        assert_eq!(bucket("+Inf"), "5", "above every bound");
        assert!(
            text.contains("sluice_batch_processing_delay_seconds_sum 400.715\n"),
            "{text}"
        );
        assert!(text.contains("sluice_batch_processing_delay_seconds_count 5\n"));
        assert!(text.contains("sluice_recovery_in_progress 1.0\n"));
        assert!(text.contains("sluice_recovery_batches_to_rerun 1.0\n"));
    }
}
