//! [`MemorySource`]: an in-memory sharded log implementing [`Source`] and [`Replay`].

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use sluice_blockstore::{Position, Record, Replay, ReplayError, SequenceNumber, SequenceNumberRanges};

use crate::source::{ReadBatch, ReadPacing, ShardInfo, ShardReader, Source, SourceError, StartingPosition};

/// A failure [`MemorySource`] can be told to return from the next reads or opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum SourceFault {
    /// [`SourceError::Throttled`] (retryable; the reader stays usable).
    Throttled,
    /// [`SourceError::IteratorExpired`] (retryable; the caller must reopen).
    IteratorExpired,
    /// [`SourceError::Unavailable`] (retryable).
    Unavailable,
    /// [`SourceError::Invalid`] (not retryable).
    Invalid,
}

impl SourceFault {
    fn error(self, shard: &str) -> SourceError {
        match self {
            SourceFault::Throttled => SourceError::Throttled(format!("injected on {shard}")),
            SourceFault::IteratorExpired => SourceError::IteratorExpired(format!("injected on {shard}")),
            SourceFault::Unavailable => SourceError::Unavailable {
                detail: format!("injected on {shard}"),
                source: None,
            },
            SourceFault::Invalid => SourceError::Invalid(format!("injected on {shard}")),
        }
    }
}

/// One reader opening, as the source saw it (for assertions on where reading started).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReaderOpened {
    /// The shard.
    pub shard_id: Arc<str>,
    /// Where the reader was asked to start.
    pub start: StartingPosition,
    /// How many reads (of any shard) the source had served before this opening.
    pub reads_before: u64,
}

#[derive(Debug)]
struct ShardData {
    records: Vec<Record>,
    parents: Vec<Arc<str>>,
    children: Vec<Arc<str>>,
    hash_key_range: (u128, u128),
    ending_sequence: Option<SequenceNumber>,
}

#[derive(Debug, Default)]
struct State {
    shards: BTreeMap<Arc<str>, ShardData>,
    next_sequence: u128,
    next_shard: u32,
    /// Faults for the next reads of a shard (`None` key: any shard).
    faults: VecDeque<(Option<Arc<str>>, SourceFault)>,
    reads: u64,
    records_served: u64,
    opened: Vec<ReaderOpened>,
    /// The first read that returned records, per shard, as a global read counter.
    first_record_read: BTreeMap<Arc<str>, u64>,
    /// The read that reported the end of each shard.
    end_reported: BTreeMap<Arc<str>, u64>,
}

#[derive(Debug)]
struct Inner {
    stream: Arc<str>,
    pacing: ReadPacing,
    state: Mutex<State>,
}

/// An in-memory sharded, replayable log: the receiver's test source.
///
/// - Sequence numbers are global and increasing (like Kinesis), so a child's records always sort
///   after its parent's.
/// - [`split`](Self::split) closes a shard (its ending sequence is its last record's, or a fresh one
///   when it is empty) and opens two children, each with half of the hash-key range.
/// - A reader returns records strictly in order and reports `end_of_shard` (with the children)
///   exactly once, after the last record of a closed shard.
/// - [`fail_next`](Self::fail_next) injects source errors into the next reads; the log of
///   [`opened`](Self::opened) readers and [`first_record_read`](Self::first_record_read) let tests
///   check where and in which order shards were read.
///
/// ```
/// use sluice_receiver::testing::MemorySource;
/// use sluice_receiver::{Source, StartingPosition};
/// let source = MemorySource::new("events", 1);
/// let p = source.put("shardId-000000000000", "k", "a");
/// source.put("shardId-000000000000", "k", "b");
/// let mut reader = source.open_reader("shardId-000000000000", &StartingPosition::AfterPosition(p)).unwrap();
/// let batch = reader.read(10).unwrap();
/// assert_eq!(&batch.records[0].data[..], b"b");
/// ```
#[derive(Debug, Clone)]
pub struct MemorySource {
    inner: Arc<Inner>,
}

/// Shard ids look like Kinesis ones: `shardId-000000000007`.
fn shard_name(n: u32) -> Arc<str> {
    Arc::from(format!("shardId-{n:012}"))
}

impl MemorySource {
    /// A stream with `shards` open shards splitting the hash-key space evenly, no pacing.
    pub fn new(stream: &str, shards: u32) -> Self {
        Self::with_pacing(
            stream,
            shards,
            ReadPacing {
                min_read_interval_ms: 0,
                idle_interval_ms: 10,
                max_records_per_read: ReadPacing::DEFAULT_MAX_RECORDS_PER_READ,
            },
        )
    }

    /// Like [`new`](Self::new) with explicit pacing.
    pub fn with_pacing(stream: &str, shards: u32, pacing: ReadPacing) -> Self {
        assert!(shards > 0, "a stream has at least one shard");
        let mut state = State {
            next_sequence: 1_000,
            ..State::default()
        };
        let width = u128::MAX / u128::from(shards);
        for i in 0..shards {
            let low = width * u128::from(i);
            let high = if i + 1 == shards { u128::MAX } else { low + width - 1 };
            state.shards.insert(
                shard_name(i),
                ShardData {
                    records: Vec::new(),
                    parents: Vec::new(),
                    children: Vec::new(),
                    hash_key_range: (low, high),
                    ending_sequence: None,
                },
            );
        }
        state.next_shard = shards;
        Self {
            inner: Arc::new(Inner {
                stream: Arc::from(stream),
                pacing,
                state: Mutex::new(state),
            }),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.inner.state.lock().expect("memory source lock")
    }

    /// Appends a record to an open shard and returns its position.
    ///
    /// # Panics
    /// If the shard does not exist or is closed.
    pub fn put(&self, shard_id: &str, partition_key: &str, data: impl Into<Bytes>) -> Position {
        let mut state = self.state();
        let sequence = state.next_sequence;
        state.next_sequence += 1;
        let shard = state.shards.get_mut(shard_id).expect("put to an unknown shard");
        assert!(shard.ending_sequence.is_none(), "put to closed shard {shard_id}");
        let position = Position::plain(SequenceNumber::from_u128(sequence));
        let shard_id: Arc<str> = Arc::from(shard_id);
        shard.records.push(Record {
            shard_id,
            position: position.clone(),
            partition_key: Arc::from(partition_key),
            approximate_arrival_ms: 0,
            data: data.into(),
        });
        position
    }

    /// Closes `shard_id` and opens two children covering its hash-key range; returns their ids.
    ///
    /// # Panics
    /// If the shard does not exist or is already closed.
    pub fn split(&self, shard_id: &str) -> [Arc<str>; 2] {
        let mut state = self.state();
        let fresh = state.next_sequence;
        state.next_sequence += 1;
        let (low, high) = {
            let parent = state.shards.get(shard_id).expect("split of an unknown shard");
            assert!(parent.ending_sequence.is_none(), "split of closed shard {shard_id}");
            parent.hash_key_range
        };
        let mid = low + (high - low) / 2;
        let children = [shard_name(state.next_shard), shard_name(state.next_shard + 1)];
        state.next_shard += 2;
        let parent_id: Arc<str> = Arc::from(shard_id);
        for (child, range) in children.iter().zip([(low, mid), (mid + 1, high)]) {
            state.shards.insert(
                child.clone(),
                ShardData {
                    records: Vec::new(),
                    parents: vec![parent_id.clone()],
                    children: Vec::new(),
                    hash_key_range: range,
                    ending_sequence: None,
                },
            );
        }
        let parent = state.shards.get_mut(shard_id).expect("checked above");
        let ending = parent
            .records
            .last()
            .map_or_else(|| SequenceNumber::from_u128(fresh), |r| r.position.sequence.clone());
        parent.ending_sequence = Some(ending);
        parent.children = children.to_vec();
        children
    }

    /// Makes the next `n` reads fail with `fault` — reads of `shard_id`, or of any shard when it
    /// is `None`. Faults are consumed in the order they were queued.
    pub fn fail_next(&self, shard_id: Option<&str>, n: usize, fault: SourceFault) {
        let shard: Option<Arc<str>> = shard_id.map(Arc::from);
        self.state().faults.extend(std::iter::repeat_n((shard, fault), n));
    }

    /// Every record of `shard_id`, in order.
    pub fn records(&self, shard_id: &str) -> Vec<Record> {
        self.state()
            .shards
            .get(shard_id)
            .map(|s| s.records.clone())
            .unwrap_or_default()
    }

    /// Every reader opened so far, in order.
    pub fn opened(&self) -> Vec<ReaderOpened> {
        self.state().opened.clone()
    }

    /// The global read number of the first read that returned records of `shard_id`.
    pub fn first_record_read(&self, shard_id: &str) -> Option<u64> {
        self.state().first_record_read.get(shard_id).copied()
    }

    /// The global read number of the read that reported the end of `shard_id`.
    pub fn end_reported(&self, shard_id: &str) -> Option<u64> {
        self.state().end_reported.get(shard_id).copied()
    }

    /// Reads served so far (failed ones included) and records returned by them.
    pub fn reads(&self) -> (u64, u64) {
        let state = self.state();
        (state.reads, state.records_served)
    }
}

impl Replay for MemorySource {
    fn replay(&self, ranges: &SequenceNumberRanges) -> Result<Vec<Record>, ReplayError> {
        let state = self.state();
        let mut out = Vec::new();
        for range in ranges {
            let shard = state
                .shards
                .get(&range.shard_id)
                .ok_or_else(|| ReplayError::UnknownShard {
                    stream: self.inner.stream.to_string(),
                    shard_id: range.shard_id.to_string(),
                })?;
            let found: Vec<Record> = shard
                .records
                .iter()
                .filter(|r| r.position >= range.from && r.position <= range.to)
                .cloned()
                .collect();
            if found.len() as u64 != range.record_count {
                return Err(ReplayError::CountMismatch {
                    range: range.clone(),
                    expected: range.record_count,
                    found: found.len() as u64,
                });
            }
            out.extend(found);
        }
        Ok(out)
    }
}

impl Source for MemorySource {
    fn stream_name(&self) -> &str {
        &self.inner.stream
    }

    fn default_storage_level(&self) -> sluice_blockstore::StorageLevel {
        sluice_blockstore::StorageLevel::MEMORY_ONLY
    }

    fn read_pacing(&self) -> ReadPacing {
        self.inner.pacing
    }

    fn list_shards(&self) -> Result<Vec<ShardInfo>, SourceError> {
        Ok(self
            .state()
            .shards
            .iter()
            .map(|(id, s)| ShardInfo {
                shard_id: id.clone(),
                parent_shard_ids: s.parents.clone(),
                hash_key_range: s.hash_key_range,
                ending_sequence: s.ending_sequence.clone(),
            })
            .collect())
    }

    fn open_reader(&self, shard_id: &str, start: &StartingPosition) -> Result<Box<dyn ShardReader>, SourceError> {
        let mut state = self.state();
        let reads_before = state.reads;
        let shard = state.shards.get(shard_id).ok_or_else(|| SourceError::UnknownShard {
            stream: self.inner.stream.to_string(),
            shard_id: shard_id.to_string(),
        })?;
        let records = &shard.records;
        let next = match start {
            StartingPosition::TrimHorizon => 0,
            StartingPosition::Latest => records.len(),
            StartingPosition::AtTimestamp(ts) => records.partition_point(|r| r.approximate_arrival_ms < *ts),
            StartingPosition::AtPosition(p) => records.partition_point(|r| r.position < *p),
            StartingPosition::AfterPosition(p) => records.partition_point(|r| r.position <= *p),
        };
        let shard_id: Arc<str> = Arc::from(shard_id);
        state.opened.push(ReaderOpened {
            shard_id: shard_id.clone(),
            start: start.clone(),
            reads_before,
        });
        Ok(Box::new(MemoryReader {
            inner: self.inner.clone(),
            shard_id,
            next,
            end_reported: false,
        }))
    }
}

#[derive(Debug)]
struct MemoryReader {
    inner: Arc<Inner>,
    shard_id: Arc<str>,
    next: usize,
    end_reported: bool,
}

impl ShardReader for MemoryReader {
    fn read(&mut self, max_records: usize) -> Result<ReadBatch, SourceError> {
        let mut state = self.inner.state.lock().expect("memory source lock");
        state.reads += 1;
        let read_number = state.reads;
        let fault = state
            .faults
            .iter()
            .position(|(shard, _)| shard.as_ref().is_none_or(|s| *s == self.shard_id));
        if let Some(i) = fault {
            let (_, fault) = state.faults.remove(i).expect("index from position");
            return Err(fault.error(&self.shard_id));
        }
        let shard = state
            .shards
            .get(&self.shard_id)
            .ok_or_else(|| SourceError::UnknownShard {
                stream: self.inner.stream.to_string(),
                shard_id: self.shard_id.to_string(),
            })?;
        let end = shard.records.len().min(self.next + max_records.max(1));
        let records = shard.records[self.next..end].to_vec();
        self.next = end;
        let end_of_shard = (shard.ending_sequence.is_some() && self.next == shard.records.len() && !self.end_reported)
            .then(|| shard.children.clone());
        if end_of_shard.is_some() {
            self.end_reported = true;
            state.end_reported.insert(self.shard_id.clone(), read_number);
        }
        if !records.is_empty() {
            state
                .first_record_read
                .entry(self.shard_id.clone())
                .or_insert(read_number);
        }
        state.records_served += records.len() as u64;
        Ok(ReadBatch {
            records,
            end_of_shard,
            millis_behind_latest: None,
            timed_out: false,
        })
    }
}
