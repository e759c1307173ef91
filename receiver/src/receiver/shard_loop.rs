//! The shard-reading loop every source shares: one thread per owned shard.
//!
//! It opens a reader at the starting position, reads pages no larger than one second's worth at
//! the current rate limit, hands each page to the block generator as one unit (which may block:
//! rate limit, full queue), keeps the source's pacing (minimum interval between reads, idle wait
//! after an empty read), retries retryable source errors with capped, jittered exponential backoff —
//! reopening the reader strictly after the last record read when the iterator expired or the
//! source was unavailable — and ends when the source reports the end of the shard.

use std::sync::Arc;

use sluice_blockstore::Record;

use super::Core;
use super::metrics::MetricsCells;
use crate::block_generator::{BlockGenerator, GeneratorError};
use crate::signal::{StopSignal, Wake};
use crate::source::{ShardReader, SourceError, StartingPosition};

/// Backoff after a retryable source error: doubles from this…
const BACKOFF_START_MS: u64 = 100;
/// …up to this.
const BACKOFF_MAX_MS: u64 = 5_000;

/// How a shard loop ended.
#[derive(Debug)]
pub(crate) enum LoopOutcome {
    /// The shard is closed and every record of it was handed to the generator.
    Ended { children: Vec<Arc<str>> },
    /// Its stop signal fired.
    Stopped,
    /// The generator refused records (it stopped or failed; the coordinator sees which).
    GeneratorClosed,
    /// A non-retryable source error.
    Failed(SourceError),
    /// The thread panicked (set by the joiner).
    Panicked,
}

pub(crate) fn run(
    core: &Arc<Core>,
    generator: &BlockGenerator,
    shard: &Arc<str>,
    start: StartingPosition,
    signal: &StopSignal,
) -> LoopOutcome {
    let pacing = core.config.read_pacing(core.source.read_pacing());
    let clock = &*core.clock;
    let mut start = start;
    let mut reader: Option<Box<dyn ShardReader>> = None;
    let mut backoff = 0;
    let mut last_read_ms: Option<i64> = None;
    loop {
        if signal.is_stopped() {
            return LoopOutcome::Stopped;
        }
        let error = match reader.as_mut() {
            None => match core.source.open_reader(shard, &start) {
                Ok(r) => {
                    reader = Some(r);
                    continue;
                }
                Err(e) => e,
            },
            Some(r) => {
                if let Some(last) = last_read_ms
                    && pacing.min_read_interval_ms > 0
                    && signal.wait_until(clock, last.saturating_add(pacing.min_read_interval_ms as i64))
                        == Wake::Stopped
                {
                    return LoopOutcome::Stopped;
                }
                last_read_ms = Some(clock.now_ms());
                let limit = core.rate.records_per_read(pacing.max_records_per_read);
                match r.read(limit) {
                    Ok(batch) if batch.timed_out && batch.records.is_empty() && batch.end_of_shard.is_none() => {
                        // A push-based reader between events: neither progress nor the end.
                        backoff = 0;
                        continue;
                    }
                    Ok(batch) => {
                        backoff = 0;
                        core.metrics.lag(shard, batch.millis_behind_latest);
                        let got_records = !batch.records.is_empty();
                        core.metrics.arrival_age(
                            shard,
                            arrival_age(&batch.records, clock.now_ms()),
                            !got_records && batch.millis_behind_latest.unwrap_or(0) == 0,
                        );
                        if got_records {
                            let last = batch.records.last().expect("non-empty").position.clone();
                            if let Err(outcome) = hand_over(core, generator, shard, batch.records) {
                                return outcome;
                            }
                            start = StartingPosition::AfterPosition(last);
                        }
                        if let Some(children) = batch.end_of_shard {
                            mark_ended(core, shard, children.clone());
                            return LoopOutcome::Ended { children };
                        }
                        if !got_records {
                            mark_at_end(core, shard);
                            if signal.wait_ms(clock, pacing.idle_interval_ms) == Wake::Stopped {
                                return LoopOutcome::Stopped;
                            }
                        }
                        continue;
                    }
                    Err(e) => {
                        if !matches!(e, SourceError::Throttled(_))
                            && let Some(resume) = r.resume_position()
                        {
                            start = resume;
                        }
                        e
                    }
                }
            }
        };
        if !error.is_retryable() {
            tracing::error!(shard = %shard, error = %error, "reading the shard failed");
            return LoopOutcome::Failed(error);
        }
        match &error {
            SourceError::Throttled(_) => MetricsCells::bump(&core.metrics.source_throttles),
            // Reopen strictly after the last record handed over (or at the original start).
            _ => reader = None,
        }
        backoff = if backoff == 0 {
            BACKOFF_START_MS
        } else {
            (backoff * 2).min(BACKOFF_MAX_MS)
        };
        let wait = jittered(backoff, shard, clock.now_ms());
        tracing::warn!(shard = %shard, error = %error, backoff_ms = wait, "retryable source error");
        if signal.wait_ms(clock, wait) == Wake::Stopped {
            return LoopOutcome::Stopped;
        }
    }
}

/// How old the newest record of a read is now (ms), if its arrival time is known (> 0).
fn arrival_age(records: &[Record], now_ms: i64) -> Option<i64> {
    let newest = records.iter().map(|r| r.approximate_arrival_ms).max()?;
    (newest > 0).then(|| (now_ms - newest).max(0))
}

/// "Equal jitter": half the backoff plus a random share of the other half, so shards throttled
/// together (one account limit, one outage) do not retry in lock step. The randomness comes from
/// the standard library's per-process random hasher keys; no RNG dependency is needed.
fn jittered(backoff_ms: u64, shard: &str, now_ms: i64) -> u64 {
    use std::hash::BuildHasher;
    let half = backoff_ms / 2;
    let random = std::hash::RandomState::new().hash_one((shard, now_ms));
    half + random % (backoff_ms - half + 1)
}

/// Hands a page to the generator, keeping the read counters exact if only part is accepted.
fn hand_over(
    core: &Core,
    generator: &BlockGenerator,
    shard: &Arc<str>,
    records: Vec<Record>,
) -> Result<(), LoopOutcome> {
    let n = records.len() as u64;
    let bytes: u64 = records.iter().map(|r| r.size_bytes() as u64).sum();
    let last = records.last().map(|r| r.position.clone());
    core.progress.read(shard, n);
    match generator.add_batch(records) {
        Ok(()) => {
            core.metrics.received(shard, n, bytes);
            core.progress.accepted(shard, last);
            Ok(())
        }
        Err(e) => {
            let accepted = match e {
                GeneratorError::Stopped { accepted } => accepted as u64,
                _ => 0,
            };
            core.progress.refused(shard, n - accepted);
            Err(LoopOutcome::GeneratorClosed)
        }
    }
}

fn mark_at_end(core: &Core, shard: &Arc<str>) {
    core.progress.at_end(shard);
    core.status_changed.notify_all();
}

fn mark_ended(core: &Core, shard: &Arc<str>, children: Vec<Arc<str>>) {
    core.progress.ended(shard, children);
    core.stop.nudge();
}

#[cfg(test)]
mod tests {
    use super::{arrival_age, jittered};

    #[test]
    fn arrival_age_is_the_newest_records_age_and_unknown_without_arrival_times() {
        let record = |arrival: i64| sluice_blockstore::Record {
            shard_id: "shard-0".into(),
            position: sluice_blockstore::Position::plain(sluice_blockstore::SequenceNumber::from_u128(1)),
            partition_key: "k".into(),
            approximate_arrival_ms: arrival,
            data: bytes::Bytes::new(),
        };
        assert_eq!(
            arrival_age(&[record(1_000), record(4_000), record(3_000)], 10_000),
            Some(6_000)
        );
        assert_eq!(
            arrival_age(&[record(12_000)], 10_000),
            Some(0),
            "clock skew never gives a negative age"
        );
        assert_eq!(arrival_age(&[record(0)], 10_000), None, "0 means no arrival time");
        assert_eq!(arrival_age(&[], 10_000), None);
    }

    #[test]
    fn jitter_stays_within_half_to_full_backoff() {
        let waits: Vec<u64> = (0..200).map(|i| jittered(1_000, "shard", i)).collect();
        assert!(waits.iter().all(|w| (500..=1_000).contains(w)), "{waits:?}");
        assert!(waits.iter().any(|w| *w != waits[0]), "the waits vary");
        assert_eq!(jittered(0, "shard", 0), 0);
    }
}
