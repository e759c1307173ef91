//! The replay seam: re-reading the records of a block's ranges from its source.
//!
//! [`Replay`] is implemented by the sources in `sluice-receiver` (the embedded local log and
//! Kinesis); this crate only defines it so that the [`BlockReader`](crate::BlockReader) can fall
//! back to the source when no valid copy of a block exists.

use std::fmt;

use crate::{Block, BlockMeta, Record, SequenceNumberRange, SequenceNumberRanges};

/// Re-reads exactly the records of a set of ranges from the source they came from.
///
/// # Contract
/// - `replay(ranges)` returns, for each range in order, exactly the user records whose position
///   `p` satisfies `from <= p <= to` in that range's shard, in position order. Ranges may start or
///   end inside a KPL aggregate; sub-records outside the range are dropped.
/// - The number of records returned for a range equals its `record_count`; a source that finds a
///   different number returns [`ReplayError::CountMismatch`] rather than returning them.
/// - Data the source no longer holds (trimmed by retention) is [`ReplayError::DataExpired`], which
///   retrying cannot fix. Throttling and transient failures are retryable
///   ([`ReplayError::is_retryable`]); the caller owns the retry budget.
/// - Implementations are shared across threads and may be called concurrently; they must pace
///   themselves against the source's per-shard limits.
pub trait Replay: Send + Sync + fmt::Debug {
    /// Re-reads the records of `ranges`.
    ///
    /// # Errors
    /// See the contract above.
    fn replay(&self, ranges: &SequenceNumberRanges) -> Result<Vec<Record>, ReplayError>;

    /// Rebuilds the block `meta` describes (a lost block) by re-reading the records of its
    /// `ranges`, under the same contract as [`replay`](Self::replay); the block has `meta`'s id and
    /// ranges. The default builds [`Block::from_records`] from `replay`'s records; a source that can
    /// decode its storage straight into a [`BlockBuilder`](crate::BlockBuilder) skips the
    /// [`Record`] per record, and may size the block's columns by `meta`'s `num_records` and
    /// `num_bytes` (the caller checks the rebuilt block's record count against `meta`'s).
    ///
    /// # Errors
    /// As [`replay`](Self::replay); [`ReplayError::Rebuild`] if the records cannot be built into
    /// a block.
    fn replay_block(&self, meta: &BlockMeta) -> Result<Block, ReplayError> {
        let records = self.replay(&meta.ranges)?;
        Block::from_records(meta.id, meta.ranges.clone(), &records).map_err(|e| ReplayError::Rebuild(Box::new(e)))
    }
}

/// Why a replay failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReplayError {
    /// The source no longer holds (part of) the range: retention trimmed it. Not retryable.
    #[error("data expired: {range} is no longer held by the source ({detail})")]
    DataExpired {
        /// The range that cannot be served.
        range: SequenceNumberRange,
        /// What the source said.
        detail: String,
    },
    /// The source returned a different number of records than the range says. Not retryable.
    #[error("range {range} should hold {expected} records but the source returned {found}")]
    CountMismatch {
        /// The range.
        range: SequenceNumberRange,
        /// `record_count` of the range.
        expected: u64,
        /// What the source returned.
        found: u64,
    },
    /// The shard or stream does not exist at the source. Not retryable.
    #[error("unknown shard {shard_id} of stream {stream}")]
    UnknownShard {
        /// Stream name.
        stream: String,
        /// Shard id.
        shard_id: String,
    },
    /// The source throttled the read. Retryable.
    #[error("throttled by the source: {0}")]
    Throttled(String),
    /// The source rejected the request (invalid argument, access denied, bad data). Not
    /// retryable.
    #[error("the source rejected the replay: {detail}")]
    Rejected {
        /// What the source said.
        detail: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
    /// The records replayed could not be built into a block (more shards than a block holds, a
    /// partition key that is not UTF-8). Not retryable.
    #[error("the replayed records could not be built into a block: {0}")]
    Rebuild(#[source] Box<crate::Error>),
    /// A transient failure (network, I/O). Retryable.
    #[error("source temporarily unavailable: {detail}")]
    Unavailable {
        /// What failed.
        detail: String,
        /// The underlying error, when there is one.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl ReplayError {
    /// Whether retrying the same replay may succeed.
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    /// Where the error comes from and whether it is retryable.
    pub fn class(&self) -> crate::ErrorClass {
        use crate::{Domain, ErrorClass};
        match self {
            ReplayError::Throttled(_) | ReplayError::Unavailable { .. } => ErrorClass::transient(Domain::Source),
            ReplayError::DataExpired { .. } => ErrorClass::permanent(Domain::DataLoss),
            ReplayError::CountMismatch { .. } | ReplayError::Rebuild(_) => ErrorClass::permanent(Domain::Corrupt),
            ReplayError::UnknownShard { .. } | ReplayError::Rejected { .. } => ErrorClass::permanent(Domain::Source),
        }
    }
}
