//! [`MemoryReplay`]: an in-memory replayable source.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::{Position, Record, Replay, ReplayError, SequenceNumberRanges};

/// A transient failure [`MemoryReplay`] can be told to return.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum InjectedFailure {
    /// [`ReplayError::Throttled`].
    Throttled,
    /// [`ReplayError::Unavailable`].
    Unavailable,
}

type ShardKey = (Arc<str>, Arc<str>);

/// An in-memory source: records per (stream, shard), served per the [`Replay`] contract.
///
/// - `replay(ranges)` returns, range by range, the records of the range's shard whose position
///   lies in `from..=to`, in position order; an unknown shard is
///   [`ReplayError::UnknownShard`], a record count other than `record_count` is
///   [`ReplayError::CountMismatch`].
/// - [`fail_next`](Self::fail_next) makes the next `n` calls fail with a retryable error;
///   [`trim_before`](Self::trim_before) and [`expire_all`](Self::expire_all) make ranges reaching
///   into trimmed data fail with [`ReplayError::DataExpired`].
///
/// ```
/// use sluice_blockstore::testing::{InjectedFailure, MemoryReplay, SAMPLE_STREAM, ranges_of, sample_records};
/// use sluice_blockstore::{Replay, ReplayError};
/// let records = sample_records("shard-0", 10, 5, 8);
/// let source = MemoryReplay::from_records(SAMPLE_STREAM, records.clone());
/// let ranges = ranges_of(SAMPLE_STREAM, &records[1..3]);
/// assert_eq!(source.replay(&ranges)?, records[1..3].to_vec());
/// source.fail_next(1, InjectedFailure::Throttled);
/// assert!(matches!(source.replay(&ranges), Err(ReplayError::Throttled(_))));
/// assert_eq!(source.calls(), 2);
/// # Ok::<(), ReplayError>(())
/// ```
#[derive(Debug, Default)]
pub struct MemoryReplay {
    state: Mutex<State>,
    calls: AtomicU64,
}

#[derive(Debug, Default)]
struct State {
    shards: BTreeMap<ShardKey, Vec<Record>>,
    /// Positions before these are trimmed (retention).
    trimmed_before: BTreeMap<ShardKey, Position>,
    expire_all: bool,
    failures: Vec<InjectedFailure>,
}

impl MemoryReplay {
    /// An empty source.
    pub fn new() -> Self {
        Self::default()
    }

    /// A source holding `records` in `stream`.
    pub fn from_records(stream: &str, records: impl IntoIterator<Item = Record>) -> Self {
        let source = Self::new();
        source.extend(stream, records);
        source
    }

    /// Adds `records` to `stream` (kept in position order per shard; a record at a position
    /// already held replaces it).
    pub fn extend(&self, stream: &str, records: impl IntoIterator<Item = Record>) {
        let stream: Arc<str> = Arc::from(stream);
        let mut state = self.state.lock().expect("replay lock");
        for record in records {
            let shard = state
                .shards
                .entry((stream.clone(), record.shard_id.clone()))
                .or_default();
            match shard.binary_search_by(|r| r.position.cmp(&record.position)) {
                Ok(i) => shard[i] = record,
                Err(i) => shard.insert(i, record),
            }
        }
    }

    /// Makes the next `n` calls to `replay` fail with `failure` (added after failures already
    /// queued).
    pub fn fail_next(&self, n: usize, failure: InjectedFailure) {
        let mut state = self.state.lock().expect("replay lock");
        state.failures.splice(0..0, std::iter::repeat_n(failure, n));
    }

    /// Trims `shard` of `stream` before `position`: a range starting earlier is
    /// [`ReplayError::DataExpired`].
    pub fn trim_before(&self, stream: &str, shard: &str, position: Position) {
        self.state
            .lock()
            .expect("replay lock")
            .trimmed_before
            .insert((Arc::from(stream), Arc::from(shard)), position);
    }

    /// Makes every non-empty replay fail with [`ReplayError::DataExpired`].
    pub fn expire_all(&self) {
        self.state.lock().expect("replay lock").expire_all = true;
    }

    /// Calls to `replay` so far, failed ones included.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }
}

impl Replay for MemoryReplay {
    fn replay(&self, ranges: &SequenceNumberRanges) -> Result<Vec<Record>, ReplayError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        let mut state = self.state.lock().expect("replay lock");
        if let Some(failure) = state.failures.pop() {
            return Err(match failure {
                InjectedFailure::Throttled => ReplayError::Throttled("injected by MemoryReplay".into()),
                InjectedFailure::Unavailable => ReplayError::Unavailable {
                    detail: "injected by MemoryReplay".into(),
                    source: None,
                },
            });
        }
        let mut out = Vec::with_capacity(ranges.record_count() as usize);
        for range in ranges {
            let key: ShardKey = (range.stream.clone(), range.shard_id.clone());
            let trimmed = state
                .trimmed_before
                .get(&key)
                .is_some_and(|horizon| range.from < *horizon);
            if state.expire_all || trimmed {
                return Err(ReplayError::DataExpired {
                    range: range.clone(),
                    detail: "trimmed by MemoryReplay".into(),
                });
            }
            let Some(records) = state.shards.get(&key) else {
                return Err(ReplayError::UnknownShard {
                    stream: range.stream.to_string(),
                    shard_id: range.shard_id.to_string(),
                });
            };
            let start = records.partition_point(|r| r.position < range.from);
            let end = records.partition_point(|r| r.position <= range.to);
            let selected = &records[start..end.max(start)];
            if selected.len() as u64 != range.record_count {
                return Err(ReplayError::CountMismatch {
                    range: range.clone(),
                    expected: range.record_count,
                    found: selected.len() as u64,
                });
            }
            out.extend_from_slice(selected);
        }
        drop(state);
        Ok(out)
    }
}
