//! Replay by range: re-reading exactly a block's records from Kinesis.
//!
//! Spark's `KinesisBackedBlockRDD` re-read loop fails in known ways (`shared/reference/
//! spark-kinesis.md` §1.6–1.7): it throttles itself next to the live reader, gives up on an empty
//! page, and cannot start inside a KPL aggregate. Here a pass over one shard starts
//! `AT_SEQUENCE_NUMBER` at the first range's `from`, follows the returned iterators through empty
//! pages, drops positions below `from`, keeps what falls inside a range, stops at the first
//! position `>= to` of the last range, and takes every call's turn in the shard's read budget.
//! Consecutive ranges of one shard are read in one pass. Each range's count is checked against
//! what was found; a `from` that is no longer there (retention) is `DataExpired`.

use std::time::Duration;

use sluice_blockstore::{Position, Record, ReplayError, SequenceNumberRange, SequenceNumberRanges};

use super::{Inner, bump};
use crate::source::{SourceError, StartingPosition};

/// Consecutive empty pages at the tip of the shard (`millisBehindLatest == 0`) after which the
/// rest of a range is taken to be missing.
const EMPTY_PAGES_AT_TIP: u32 = 5;
/// Backoff cap for replay retries.
const MAX_BACKOFF_MS: u64 = 5_000;

pub(super) fn replay(inner: &Inner, ranges: &SequenceNumberRanges) -> Result<Vec<Record>, ReplayError> {
    let ranges = &ranges.0;
    let mut out = Vec::with_capacity(ranges.iter().map(|r| r.record_count as usize).sum());
    let mut i = 0;
    while i < ranges.len() {
        let first = &ranges[i];
        if *first.stream != *inner.stream {
            return Err(ReplayError::UnknownShard {
                stream: first.stream.to_string(),
                shard_id: first.shard_id.to_string(),
            });
        }
        let mut j = i + 1;
        while j < ranges.len()
            && ranges[j].shard_id == first.shard_id
            && ranges[j].stream == first.stream
            && ranges[j].from > ranges[j - 1].to
        {
            j += 1;
        }
        read_pass(inner, &ranges[i..j], &mut out)?;
        i = j;
    }
    bump(&inner.metrics.replays, 1);
    bump(&inner.metrics.replay_records, out.len() as u64);
    Ok(out)
}

/// Reads `group` (ranges of one shard, ascending, disjoint) in one pass into `out`.
fn read_pass(inner: &Inner, group: &[SequenceNumberRange], out: &mut Vec<Record>) -> Result<(), ReplayError> {
    let shard = &group[0].shard_id;
    let from = &group[0].from;
    let to = &group[group.len() - 1].to;
    let expected: u64 = group.iter().map(|r| r.record_count).sum();
    let start_len = out.len();
    let mut counts = vec![0u64; group.len()];
    let mut current = 0; // index of the range the next record can fall in
    let mut last_seen: Option<Position> = None;
    let mut iterator: Option<String> = None;
    let mut attempt = 0u32;
    let mut empty_at_tip = 0u32;
    let mut done = false;
    while !done {
        let Some(it) = iterator.as_deref() else {
            // (Re)start at `from`, or at the last position seen after an expired iterator.
            let start = StartingPosition::AtPosition(last_seen.clone().unwrap_or_else(|| from.clone()));
            match inner.shard_iterator(shard, &start) {
                Ok(it) => iterator = Some(it),
                Err(e) => retry_or_fail(inner, &group[0], e, &mut attempt)?,
            }
            continue;
        };
        let page = match inner.get_records(shard, it, inner.config.max_records_per_read, true) {
            Ok(page) => {
                attempt = 0;
                page
            }
            Err(e) => {
                if !matches!(e, SourceError::Throttled(_)) {
                    iterator = None;
                }
                retry_or_fail(inner, &group[0], e, &mut attempt)?;
                continue;
            }
        };
        if page.kinesis_records == 0 {
            if page.millis_behind_latest.unwrap_or(0) == 0 {
                empty_at_tip += 1;
                if empty_at_tip >= EMPTY_PAGES_AT_TIP {
                    break;
                }
            }
        } else {
            empty_at_tip = 0;
        }
        for record in page.records {
            let p = &record.position;
            if last_seen.is_none() && p.sequence > from.sequence {
                // `AT_SEQUENCE_NUMBER` on a trimmed record starts at the trim horizon.
                return Err(ReplayError::DataExpired {
                    range: group[0].clone(),
                    detail: format!("the oldest record the shard still holds is at {p}"),
                });
            }
            if last_seen.as_ref().is_some_and(|last| p <= last) {
                continue; // re-read after a restart at the last position
            }
            last_seen = Some(p.clone());
            if p < from {
                continue;
            }
            if p > to {
                done = true;
                break;
            }
            while current < group.len() && *p > group[current].to {
                current += 1;
            }
            let reached_end = *p == *to;
            if *p >= group[current].from {
                counts[current] += 1;
                out.push(record);
            }
            if reached_end {
                done = true;
                break;
            }
        }
        if page.children.is_some() {
            break; // the shard ended
        }
        iterator = page.next_iterator;
    }
    for (range, found) in group.iter().zip(&counts) {
        if *found != range.record_count {
            out.truncate(start_len);
            return Err(ReplayError::CountMismatch {
                range: range.clone(),
                expected: range.record_count,
                found: *found,
            });
        }
    }
    debug_assert_eq!(out.len() - start_len, expected as usize);
    Ok(())
}

/// Backs off and returns `Ok` to retry a retryable error, or the error once attempts run out.
fn retry_or_fail(
    inner: &Inner,
    range: &SequenceNumberRange,
    error: SourceError,
    attempt: &mut u32,
) -> Result<(), ReplayError> {
    *attempt += 1;
    if !error.is_retryable() || *attempt >= inner.config.replay_max_attempts {
        return Err(to_replay_error(error, range));
    }
    let backoff = inner
        .config
        .replay_backoff_ms
        .saturating_mul(1 << (*attempt - 1).min(16))
        .min(MAX_BACKOFF_MS);
    tracing::warn!(range = %range, attempt = *attempt, backoff_ms = backoff, error = %error, "replay call failed; retrying");
    std::thread::sleep(Duration::from_millis(backoff));
    Ok(())
}

fn to_replay_error(error: SourceError, range: &SequenceNumberRange) -> ReplayError {
    match error {
        SourceError::DataExpired { detail, .. } => ReplayError::DataExpired {
            range: range.clone(),
            detail,
        },
        SourceError::UnknownShard { stream, shard_id } => ReplayError::UnknownShard { stream, shard_id },
        SourceError::Throttled(detail) => ReplayError::Throttled(detail),
        other if !other.is_retryable() => ReplayError::Rejected {
            detail: format!("replaying {range}: {other}"),
            source: Some(Box::new(other)),
        },
        other => ReplayError::Unavailable {
            detail: format!("replaying {range}: {other}"),
            source: Some(Box::new(other)),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn errors_keep_their_kind() {
        let range = SequenceNumberRange {
            stream: Arc::from("s"),
            shard_id: Arc::from("shardId-0"),
            from: Position::new("1".parse().unwrap(), 0),
            to: Position::new("2".parse().unwrap(), 0),
            record_count: 2,
        };
        assert!(to_replay_error(SourceError::Throttled("x".into()), &range).is_retryable());
        assert!(
            to_replay_error(
                SourceError::Unavailable {
                    detail: "x".into(),
                    source: None
                },
                &range
            )
            .is_retryable()
        );
        assert!(!to_replay_error(SourceError::Invalid("x".into()), &range).is_retryable());
    }
}
