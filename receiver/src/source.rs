//! Sources: sharded, replayable logs behind one trait.
//!
//! A [`Source`] is what the shared shard-reading loop reads from: it lists shards with their
//! parent/child links, opens a [`ShardReader`] at a [`StartingPosition`], and — through the
//! [`Replay`] supertrait — re-reads an exact range. The embedded local log and Kinesis both
//! implement it, so pacing, end-of-shard handling, parent-before-child ordering, blocks and
//! checkpoints are written once.

use std::fmt;
use std::sync::Arc;

use sluice_blockstore::{Domain, ErrorClass, Position, Record, Replay, SequenceNumber, StorageLevel};

use crate::stop_mode::StopMode;

/// Where a reader starts in a shard.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StartingPosition {
    /// The oldest record the source still holds.
    TrimHorizon,
    /// Only records written after the reader opens.
    Latest,
    /// The first record that arrived at or after this time (ms since the epoch).
    AtTimestamp(i64),
    /// The record at this position (inclusive).
    AtPosition(Position),
    /// The first record strictly after this position. Resuming after a checkpoint or after the
    /// last logged range uses this; it skips the remaining sub-records of an aggregate correctly.
    AfterPosition(Position),
}

/// How often and how much the shared shard-reading loop reads one shard.
///
/// Kinesis allows 5 `GetRecords` calls per second per shard, so its source asks for at least
/// 200 ms between reads; the local log can be read as fast as the disk allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadPacing {
    /// Minimum time between two reads of one shard (ms), whatever they return.
    pub min_read_interval_ms: u64,
    /// Time to wait after a read that returned no record (ms) before reading again.
    pub idle_interval_ms: u64,
    /// Most records asked for in one read (the loop asks for fewer under a rate limit).
    pub max_records_per_read: usize,
}

impl ReadPacing {
    /// Default minimum time between reads: none.
    pub const DEFAULT_MIN_READ_INTERVAL_MS: u64 = 0;
    /// Default wait after an empty read.
    pub const DEFAULT_IDLE_INTERVAL_MS: u64 = 100;
    /// Default records per read (the Kinesis `GetRecords` maximum).
    pub const DEFAULT_MAX_RECORDS_PER_READ: usize = 10_000;
}

impl Default for ReadPacing {
    fn default() -> Self {
        Self {
            min_read_interval_ms: Self::DEFAULT_MIN_READ_INTERVAL_MS,
            idle_interval_ms: Self::DEFAULT_IDLE_INTERVAL_MS,
            max_records_per_read: Self::DEFAULT_MAX_RECORDS_PER_READ,
        }
    }
}

/// One shard as the source describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardInfo {
    /// The shard id.
    pub shard_id: Arc<str>,
    /// Parents (one after a split, two after a merge); children start only after all parents end.
    pub parent_shard_ids: Vec<Arc<str>>,
    /// Inclusive hash-key range of the partition keys this shard receives (MD5 of the key as u128).
    pub hash_key_range: (u128, u128),
    /// Set when the shard is closed: its last sequence number (no record will follow it).
    pub ending_sequence: Option<SequenceNumber>,
}

impl ShardInfo {
    /// Whether the shard is closed to writes.
    pub fn is_closed(&self) -> bool {
        self.ending_sequence.is_some()
    }
}

/// What one read returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ReadBatch {
    /// User records (after KPL de-aggregation), in position order. May be empty even mid-shard.
    pub records: Vec<Record>,
    /// The shard is closed and every record has now been returned: `ChildShards` in Kinesis.
    pub end_of_shard: Option<Vec<Arc<str>>>,
    /// How far behind the newest record this read was (ms), when the source knows.
    pub millis_behind_latest: Option<i64>,
    /// The reader's bounded wait ended before the source answered (a push-based reader between
    /// two events). Unlike an empty answer this says nothing about the shard being read to its
    /// current end: the loop reads again at once, without the idle wait.
    pub timed_out: bool,
}

/// Why a source operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SourceError {
    /// The requested position is older than what the source still holds (retention). Not retryable.
    #[error("data expired in {stream}/{shard_id}: {detail}")]
    DataExpired {
        /// Stream name.
        stream: String,
        /// Shard id.
        shard_id: String,
        /// What is gone.
        detail: String,
    },
    /// No such stream or shard. Not retryable.
    #[error("unknown shard {shard_id} of stream {stream}")]
    UnknownShard {
        /// Stream name.
        stream: String,
        /// Shard id.
        shard_id: String,
    },
    /// The source throttled the call. Retryable after a backoff.
    #[error("throttled by the source: {0}")]
    Throttled(String),
    /// The reader's iterator expired; reopen from the last position. Retryable.
    #[error("shard iterator expired: {0}")]
    IteratorExpired(String),
    /// A transient failure (I/O, network). Retryable.
    #[error("source unavailable: {detail}")]
    Unavailable {
        /// What failed.
        detail: String,
        /// The cause.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The request is invalid (bad position, bad configuration). Not retryable.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// The source's stored data failed a check (checksum, gap between segments). The records
    /// cannot be served; never skipped silently. Not retryable.
    #[error("corrupt data in {stream}/{shard_id}: {detail}")]
    Corrupt {
        /// Stream name.
        stream: String,
        /// Shard id.
        shard_id: String,
        /// What is wrong and where.
        detail: String,
    },
}

impl SourceError {
    /// Whether retrying (after a backoff, reopening the reader if needed) may succeed.
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    /// Where the error comes from and whether it is retryable.
    pub fn class(&self) -> ErrorClass {
        match self {
            SourceError::Throttled(_) | SourceError::IteratorExpired(_) | SourceError::Unavailable { .. } => {
                ErrorClass::transient(Domain::Source)
            }
            SourceError::DataExpired { .. } => ErrorClass::permanent(Domain::DataLoss),
            SourceError::UnknownShard { .. } => ErrorClass::permanent(Domain::Source),
            SourceError::Invalid(_) => ErrorClass::permanent(Domain::Config),
            SourceError::Corrupt { .. } => ErrorClass::permanent(Domain::Corrupt),
        }
    }
}

/// How a [`Receiver`](crate::Receiver) of a source stopped: what [`Source::release`] is told.
pub struct SourceRelease<'a> {
    /// How the receiver stopped: [`StopMode::Graceful`] drained and checkpointed; an
    /// [`StopMode::Immediate`] stop (also a drop) did not.
    pub mode: StopMode,
    last_reader: &'a dyn Fn() -> bool,
}

impl<'a> SourceRelease<'a> {
    /// A release; `last_reader` answers [`SourceRelease::is_last_reader`].
    pub fn new(mode: StopMode, last_reader: &'a dyn Fn() -> bool) -> Self {
        Self { mode, last_reader }
    }

    /// Whether, as far as the receiver can tell (the lease table and the application's live
    /// workers), no other worker of the application reads the stream any more. Asked only when
    /// the answer matters: it may cost a lease-table scan.
    pub fn is_last_reader(&self) -> bool {
        (self.last_reader)()
    }
}

impl fmt::Debug for SourceRelease<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SourceRelease")
            .field("mode", &self.mode)
            .finish_non_exhaustive()
    }
}

/// A sharded, replayable log.
///
/// # Contract
/// - `list_shards` returns every shard the reader may need, open and closed, with parent links;
///   closed shards carry their ending sequence number.
/// - A reader returns records of its shard in strictly increasing position order, never one twice,
///   and reports `end_of_shard` exactly once, after the last record of a closed shard.
/// - `replay` (from [`Replay`]) returns exactly the records of the ranges, per its contract.
/// - All methods may be called from several threads; readers are used by one thread at a time.
pub trait Source: Replay + fmt::Debug {
    /// The stream name ranges are tagged with.
    fn stream_name(&self) -> &str;
    /// How the shard-reading loop paces reads of one shard of this source.
    fn read_pacing(&self) -> ReadPacing {
        ReadPacing::default()
    }
    /// The storage level the engine stores this source's blocks at unless told otherwise.
    ///
    /// Every block can be rebuilt by replaying its ranges from the source, so copies beyond
    /// memory only make a lost block cheaper to get back. A source whose replay costs about what
    /// reading a stored copy costs (the local log: the same local disk) returns
    /// [`StorageLevel::MEMORY_ONLY`]; a remote one whose reads are metered (Kinesis: 5 reads/s
    /// and 2 MB/s per shard) keeps a local disk copy — the default,
    /// [`StorageLevel::MEMORY_AND_DISK`].
    fn default_storage_level(&self) -> StorageLevel {
        StorageLevel::MEMORY_AND_DISK
    }
    /// The source's own counters (calls, throttles, …) for monitoring; none by default. Must be
    /// cheap: the engine reads them on every metrics scrape.
    fn counters(&self) -> Vec<crate::NamedCounter> {
        Vec::new()
    }
    /// The shards of the stream.
    ///
    /// # Errors
    /// [`SourceError`]; retryable ones are retried by the caller.
    fn list_shards(&self) -> Result<Vec<ShardInfo>, SourceError>;
    /// Opens a reader on one shard.
    ///
    /// # Errors
    /// [`SourceError::UnknownShard`], [`SourceError::DataExpired`] when the position is trimmed.
    fn open_reader(&self, shard_id: &str, start: &StartingPosition) -> Result<Box<dyn ShardReader>, SourceError>;
    /// Whether the shard belongs to a stream the application no longer reads (a stream removed
    /// from a multi-stream application's list). A receiver stops reading a retired shard,
    /// checkpoints it at exactly what it stored, releases its lease and takes no lease of it;
    /// the lease stays in the table, so the shard resumes there if its stream comes back. The
    /// default: no shard is ever retired.
    fn is_retired(&self, shard_id: &str) -> bool {
        let _ = shard_id;
        false
    }
    /// Called once by a receiver of this source after it stopped for good (every reader it
    /// opened is dropped). A source that acquired something for its readers on the service —
    /// an enhanced fan-out consumer it registered — gives it back here when `how` allows. Must
    /// not fail: problems are logged. The default does nothing.
    fn release(&self, how: &SourceRelease<'_>) {
        let _ = how;
    }
}

/// Reads one shard forward.
pub trait ShardReader: Send {
    /// Reads up to `max_records` records. May return none (nothing new yet, or an empty page).
    ///
    /// # Errors
    /// [`SourceError`]; after a retryable error the caller may call `read` again or reopen.
    fn read(&mut self, max_records: usize) -> Result<ReadBatch, SourceError>;
    /// Where a new reader must start to continue exactly after what this one returned, if the
    /// reader knows better than "after the last record it returned" — which is what the shard
    /// loop uses when this returns `None` (the default). An enhanced fan-out reader that started
    /// at `LATEST` and has returned no record yet knows the subscription's continuation sequence
    /// number; reopening at `LATEST` instead would skip what arrived in between.
    fn resume_position(&self) -> Option<StartingPosition> {
        None
    }
}
