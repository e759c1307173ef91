//! [`BlockReader`]: read a block from the store, or rebuild it by replaying its ranges — the Rust
//! counterpart of Spark's `KinesisBackedBlockRDD` partition compute.
//!
//! The design and its invariants are documented on [`BlockReader`].

// `ReadError` carries the block id, its ranges and the last replay error so a failure names
// exactly what is missing; it is returned on the rare failure path only.
#![allow(clippy::result_large_err)]
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;
use serde::{Deserialize, Serialize};

use crate::store_metrics::Counters;
use crate::{
    Block, BlockId, BlockMeta, BlockStore, Error, Replay, ReplayError, Result, SequenceNumberRanges, SharedClock,
    StorageLevel,
};

/// Default [`BlockReaderConfig::retry_timeout_ms`]: 10 s.
pub const DEFAULT_RETRY_TIMEOUT_MS: u64 = 10_000;
/// Default [`BlockReaderConfig::initial_backoff_ms`]: 100 ms.
pub const DEFAULT_INITIAL_BACKOFF_MS: u64 = 100;
/// Default [`BlockReaderConfig::max_backoff_ms`]: 2 s.
pub const DEFAULT_MAX_BACKOFF_MS: u64 = 2_000;

/// How a [`BlockReader`] retries replays (the policy is described there).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlockReaderConfig {
    /// How long to keep retrying a retryable replay failure, from the first attempt, in ms
    /// (Spark's `retryTimeout`; independent of the batch interval). 0 means one attempt.
    /// Default: [`DEFAULT_RETRY_TIMEOUT_MS`].
    pub retry_timeout_ms: u64,
    /// The first backoff, in ms; at least 1. Default: [`DEFAULT_INITIAL_BACKOFF_MS`].
    pub initial_backoff_ms: u64,
    /// The largest backoff, in ms; at least `initial_backoff_ms`.
    /// Default: [`DEFAULT_MAX_BACKOFF_MS`].
    pub max_backoff_ms: u64,
    /// Put a rebuilt block back into the store at this level; `None` (the default) leaves the
    /// store as it was. A failure to store it is logged, not returned: the block was read.
    pub restore_level: Option<StorageLevel>,
}

impl Default for BlockReaderConfig {
    fn default() -> Self {
        Self {
            retry_timeout_ms: DEFAULT_RETRY_TIMEOUT_MS,
            initial_backoff_ms: DEFAULT_INITIAL_BACKOFF_MS,
            max_backoff_ms: DEFAULT_MAX_BACKOFF_MS,
            restore_level: None,
        }
    }
}

impl BlockReaderConfig {
    /// Checks the backoff bounds; the error names the field and the fix.
    ///
    /// # Errors
    /// [`Error::Config`] if `initial_backoff_ms` is 0 or `max_backoff_ms < initial_backoff_ms`.
    pub fn validate(&self) -> Result<()> {
        if self.initial_backoff_ms == 0 {
            return Err(Error::Config {
                field: "initial_backoff_ms",
                reason: "is 0; use at least 1 ms so retries do not spin".into(),
            });
        }
        if self.max_backoff_ms < self.initial_backoff_ms {
            return Err(Error::Config {
                field: "max_backoff_ms",
                reason: format!(
                    "{} is below initial_backoff_ms ({}); raise it",
                    self.max_backoff_ms, self.initial_backoff_ms
                ),
            });
        }
        Ok(())
    }
}

/// Why a [`BlockReader`] could not produce a block. Every variant names the block and its ranges.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ReadError {
    /// The source no longer holds (part of) the block's ranges: the data is lost. Not retryable.
    #[error("block {id}: data lost: the source no longer holds {ranges} (replay attempt {attempts}): {source}")]
    DataExpired {
        /// The block.
        id: BlockId,
        /// Its ranges.
        ranges: SequenceNumberRanges,
        /// Replay attempts made.
        attempts: u32,
        /// The source's answer.
        source: ReplayError,
    },
    /// Replay kept failing with retryable errors until the retry timeout elapsed.
    #[error(
        "block {id}: replay of {ranges} still failing after {attempts} attempts over {elapsed_ms} ms (retry timeout {retry_timeout_ms} ms); last error: {source}"
    )]
    RetryTimeout {
        /// The block.
        id: BlockId,
        /// Its ranges.
        ranges: SequenceNumberRanges,
        /// Replay attempts made.
        attempts: u32,
        /// Clock time from the first attempt to giving up.
        elapsed_ms: u64,
        /// The configured retry timeout.
        retry_timeout_ms: u64,
        /// The last failure.
        source: ReplayError,
    },
    /// Replay failed with an error retrying cannot fix (other than expired data).
    #[error("block {id}: replay of {ranges} failed and cannot be retried (attempt {attempts}): {source}")]
    ReplayFailed {
        /// The block.
        id: BlockId,
        /// Its ranges.
        ranges: SequenceNumberRanges,
        /// Replay attempts made.
        attempts: u32,
        /// The failure.
        source: ReplayError,
    },
    /// Replay returned a different number of records than the block holds.
    #[error("block {id}: replay of {ranges} returned {found} records, but the block holds {expected}")]
    RecordCountMismatch {
        /// The block.
        id: BlockId,
        /// Its ranges.
        ranges: SequenceNumberRanges,
        /// `num_records` of the block.
        expected: u64,
        /// Records the replay returned.
        found: u64,
    },
    /// The replayed records could not be built into a block.
    #[error("block {id}: cannot rebuild the block of {ranges} from replayed records: {source}")]
    Rebuild {
        /// The block.
        id: BlockId,
        /// Its ranges.
        ranges: SequenceNumberRanges,
        /// The failure.
        source: Error,
    },
}

impl ReadError {
    /// The block that could not be read.
    pub fn block_id(&self) -> BlockId {
        match self {
            ReadError::DataExpired { id, .. }
            | ReadError::RetryTimeout { id, .. }
            | ReadError::ReplayFailed { id, .. }
            | ReadError::RecordCountMismatch { id, .. }
            | ReadError::Rebuild { id, .. } => *id,
        }
    }

    /// The ranges the block covers (what was being replayed).
    pub fn ranges(&self) -> &SequenceNumberRanges {
        match self {
            ReadError::DataExpired { ranges, .. }
            | ReadError::RetryTimeout { ranges, .. }
            | ReadError::ReplayFailed { ranges, .. }
            | ReadError::RecordCountMismatch { ranges, .. }
            | ReadError::Rebuild { ranges, .. } => ranges,
        }
    }

    /// Whether the source no longer holds the data ([`ReadError::DataExpired`]): the engine
    /// reports this as `DataLost`; no retry can help.
    pub fn is_data_lost(&self) -> bool {
        matches!(self, ReadError::DataExpired { .. })
    }

    /// Whether reading again later may succeed (only after a [`ReadError::RetryTimeout`]: the
    /// source was throttling or unavailable).
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    /// Where the error comes from and whether it is retryable (see [`ReadError::is_retryable`]).
    pub fn class(&self) -> crate::ErrorClass {
        use crate::{Domain, ErrorClass};
        match self {
            ReadError::RetryTimeout { .. } => ErrorClass::transient(Domain::Source),
            ReadError::DataExpired { .. } => ErrorClass::permanent(Domain::DataLoss),
            ReadError::ReplayFailed { source, .. } => ErrorClass::permanent(source.class().domain),
            ReadError::RecordCountMismatch { .. } => ErrorClass::permanent(Domain::Corrupt),
            ReadError::Rebuild { source, .. } => ErrorClass::permanent(source.class().domain),
        }
    }

    /// The last replay error, if the failure came from the source.
    pub fn replay_error(&self) -> Option<&ReplayError> {
        match self {
            ReadError::DataExpired { source, .. }
            | ReadError::RetryTimeout { source, .. }
            | ReadError::ReplayFailed { source, .. } => Some(source),
            _ => None,
        }
    }
}

/// Where a block returned by [`BlockReader::read_with_origin`] came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum BlockOrigin {
    /// A valid copy in the [`BlockStore`] (memory, disk or replica).
    Store,
    /// Rebuilt by replaying the block's ranges from the source.
    Replay,
}

/// Reads blocks from a [`BlockStore`], falling back to replaying their ranges from the source; see
///
/// # Policy
///
/// 1. If `is_block_id_valid`, read the [`BlockStore`]. A copy whose metadata equals the expected
///    [`BlockMeta`] is returned. A missing or corrupt copy (the store counts and discards corrupt
///    ones), a copy with other metadata, or a store error all fall through to replay.
///    `is_block_id_valid == false` (a block from an earlier run whose copies are known to be gone)
///    goes straight to replay.
/// 2. Replay: [`Replay::replay`] of exactly `meta.ranges`; the records must number
///    `meta.num_records`, and are rebuilt into a block with the same id and ranges.
/// 3. Retryable [`ReplayError`]s (throttling, transient unavailability) are retried with jittered
///    exponential backoff: the `n`-th wait is drawn uniformly from `[b/2, b]` where
///    `b = min(initial_backoff · 2ⁿ⁻¹, max_backoff)`, and waits are cut short at the deadline
///    `start + retry_timeout`. After a failure at or past the deadline the read gives up. Waiting
///    goes through the injected [`Clock`](crate::Clock), so tests never sleep. The retry timeout is
///    independent of the batch interval.
/// 4. Errors that retrying cannot fix return at once: [`ReadError::DataExpired`] when the source
///    no longer holds the data (the engine reports `DataLost`), [`ReadError::ReplayFailed`] for
///    the others.
/// 5. Optionally ([`BlockReaderConfig::restore_level`]) the rebuilt block is put back into the
///    store, so that a re-run of the same batch does not replay it again.
///
/// Replays are counted in the store's metrics (`blocks_replayed`, `records_replayed`,
/// `replay_attempts`, `replay_failures`).
///
/// ```
/// use std::sync::Arc;
/// use sluice_blockstore::testing::{MemoryReplay, SAMPLE_STREAM, sample_block, sample_records};
/// use sluice_blockstore::{BlockReader, BlockStore, BlockStoreConfig, SystemClock};
///
/// let dir = tempfile::tempdir()?;
/// let store = Arc::new(BlockStore::open(BlockStoreConfig::new(dir.path()))?);
/// let records = sample_records("shard-0", 100, 5, 10);
/// let source = Arc::new(MemoryReplay::from_records(SAMPLE_STREAM, records.clone()));
/// let reader = BlockReader::new(store.clone(), source, Arc::new(SystemClock));
///
/// // Never stored (or lost): rebuilt from the source.
/// let block = sample_block(7, &records);
/// assert_eq!(reader.read(block.meta(), true)?, block);
/// assert_eq!(store.metrics().blocks_replayed, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct BlockReader {
    store: Arc<BlockStore>,
    replay: Arc<dyn Replay>,
    clock: SharedClock,
    config: BlockReaderConfig,
}

impl BlockReader {
    /// A reader over `store` replaying from `replay`, waiting on `clock`, with the default
    /// [`BlockReaderConfig`].
    pub fn new(store: Arc<BlockStore>, replay: Arc<dyn Replay>, clock: SharedClock) -> Self {
        Self {
            store,
            replay,
            clock,
            config: BlockReaderConfig::default(),
        }
    }

    /// The same reader with `config`.
    ///
    /// # Errors
    /// [`Error::Config`] if `config` is invalid.
    pub fn with_config(mut self, config: BlockReaderConfig) -> Result<Self> {
        config.validate()?;
        self.config = config;
        Ok(self)
    }

    /// The same reader retrying retryable replay failures for `retry_timeout` from the first
    /// attempt (whole milliseconds; [`Duration::ZERO`] means one attempt). Default:
    /// [`DEFAULT_RETRY_TIMEOUT_MS`].
    ///
    /// ```
    /// # use std::{sync::Arc, time::Duration};
    /// # use sluice_blockstore::testing::MemoryReplay;
    /// # use sluice_blockstore::{BlockReader, BlockStore, BlockStoreConfig, SystemClock};
    /// # let dir = tempfile::tempdir()?;
    /// # let store = Arc::new(BlockStore::open(BlockStoreConfig::new(dir.path()))?);
    /// let reader = BlockReader::new(store, Arc::new(MemoryReplay::new()), Arc::new(SystemClock))
    ///     .with_retry_timeout(Duration::from_secs(30));
    /// assert_eq!(reader.config().retry_timeout_ms, 30_000);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn with_retry_timeout(mut self, retry_timeout: Duration) -> Self {
        self.config.retry_timeout_ms = u64::try_from(retry_timeout.as_millis()).unwrap_or(u64::MAX);
        self
    }

    /// The configuration in effect.
    pub fn config(&self) -> &BlockReaderConfig {
        &self.config
    }

    /// The block `meta` describes: from the store when `is_block_id_valid` and a valid copy
    /// exists, else rebuilt by replay. [`read_with_origin`](Self::read_with_origin) also says
    /// which.
    ///
    /// # Errors
    /// [`ReadError`]: the data expired at the source, replay failed for good or kept failing past
    /// the retry timeout, or returned the wrong number of records.
    pub fn read(&self, meta: &BlockMeta, is_block_id_valid: bool) -> Result<Block, ReadError> {
        self.read_with_origin(meta, is_block_id_valid).map(|(block, _)| block)
    }

    /// Like [`read`](Self::read), and says where the block came from.
    ///
    /// Callers that count replays must use this rather than diffing the store's
    /// `blocks_replayed` metric around a read: the metric is shared by every reader of the store,
    /// so with concurrent reads a replay by one read would be counted by another.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use sluice_blockstore::testing::{MemoryReplay, SAMPLE_STREAM, sample_block, sample_records};
    /// use sluice_blockstore::{BlockOrigin, BlockReader, BlockStore, BlockStoreConfig, StorageLevel, SystemClock};
    ///
    /// let dir = tempfile::tempdir()?;
    /// let store = Arc::new(BlockStore::open(BlockStoreConfig::new(dir.path()))?);
    /// let records = sample_records("shard-0", 100, 5, 10);
    /// let source = Arc::new(MemoryReplay::from_records(SAMPLE_STREAM, records.clone()));
    /// let reader = BlockReader::new(store.clone(), source, Arc::new(SystemClock));
    /// let block = sample_block(7, &records);
    /// assert_eq!(reader.read_with_origin(block.meta(), true)?.1, BlockOrigin::Replay);
    /// store.put(&block, StorageLevel::MEMORY_ONLY)?;
    /// assert_eq!(reader.read_with_origin(block.meta(), true)?, (block, BlockOrigin::Store));
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`read`](Self::read).
    pub fn read_with_origin(
        &self,
        meta: &BlockMeta,
        is_block_id_valid: bool,
    ) -> Result<(Block, BlockOrigin), ReadError> {
        if is_block_id_valid {
            match self.store.get(meta.id) {
                Ok(Some(block)) if block.meta() == meta => return Ok((block, BlockOrigin::Store)),
                Ok(Some(block)) => {
                    tracing::warn!(block = %meta.id, stored = ?block.meta(), expected = ?meta, "stored copy describes other ranges; replaying");
                }
                Ok(None) => {
                    tracing::info!(block = %meta.id, ranges = %meta.ranges, "no valid copy of the block; replaying its ranges");
                }
                Err(e) => {
                    tracing::warn!(block = %meta.id, error = %e, "could not read the block store; replaying");
                }
            }
        }
        self.replay_block(meta).map(|block| (block, BlockOrigin::Replay))
    }

    fn replay_block(&self, meta: &BlockMeta) -> Result<Block, ReadError> {
        let counters = &self.store.counters;
        let result = self.replay_with_retries(meta);
        match &result {
            Ok(block) => {
                Counters::incr(&counters.blocks_replayed);
                Counters::add(&counters.records_replayed, block.len() as u64);
                if let Some(level) = self.config.restore_level
                    && let Err(e) = self.store.put(block, level)
                {
                    tracing::warn!(block = %meta.id, error = %e, "could not store the replayed block");
                }
            }
            Err(e) => {
                Counters::incr(&counters.replay_failures);
                tracing::warn!(block = %meta.id, error = %e, "giving up on the block");
            }
        }
        result
    }

    fn replay_with_retries(&self, meta: &BlockMeta) -> Result<Block, ReadError> {
        let started_ms = self.clock.now_ms();
        let deadline_ms = started_ms.saturating_add(self.config.retry_timeout_ms as i64);
        let mut backoff_ms = self.config.initial_backoff_ms;
        let mut attempts = 0_u32;
        loop {
            attempts += 1;
            Counters::incr(&self.store.counters.replay_attempts);
            let error = match self.replay.replay_block(meta) {
                Ok(block) => return Self::check_rebuilt(meta, block),
                Err(ReplayError::Rebuild(source)) => {
                    return Err(ReadError::Rebuild {
                        id: meta.id,
                        ranges: meta.ranges.clone(),
                        source: *source,
                    });
                }
                Err(e) => e,
            };
            let id = meta.id;
            let ranges = meta.ranges.clone();
            if matches!(error, ReplayError::DataExpired { .. }) {
                return Err(ReadError::DataExpired {
                    id,
                    ranges,
                    attempts,
                    source: error,
                });
            }
            if !error.is_retryable() {
                return Err(ReadError::ReplayFailed {
                    id,
                    ranges,
                    attempts,
                    source: error,
                });
            }
            let now_ms = self.clock.now_ms();
            if now_ms >= deadline_ms {
                return Err(ReadError::RetryTimeout {
                    id,
                    ranges,
                    attempts,
                    elapsed_ms: (now_ms - started_ms).max(0) as u64,
                    retry_timeout_ms: self.config.retry_timeout_ms,
                    source: error,
                });
            }
            let wait_ms = jittered(backoff_ms).min((deadline_ms - now_ms) as u64);
            tracing::debug!(block = %id, attempt = attempts, wait_ms, error = %error, "replay failed; retrying");
            self.clock.sleep(Duration::from_millis(wait_ms));
            backoff_ms = backoff_ms.saturating_mul(2).min(self.config.max_backoff_ms);
        }
    }

    /// The replayed block, if it holds as many records as the lost one did.
    fn check_rebuilt(meta: &BlockMeta, block: Block) -> Result<Block, ReadError> {
        if block.len() as u64 != meta.num_records {
            return Err(ReadError::RecordCountMismatch {
                id: meta.id,
                ranges: meta.ranges.clone(),
                expected: meta.num_records,
                found: block.len() as u64,
            });
        }
        Ok(block)
    }
}

/// A wait drawn uniformly from `[backoff / 2, backoff]` ("equal jitter"): retries of many tasks
/// spread out, and each still waits at least half the backoff.
fn jittered(backoff_ms: u64) -> u64 {
    let half = backoff_ms / 2;
    half + rand::rng().random_range(0..=backoff_ms - half)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jitter_stays_within_half_to_full_backoff() {
        for backoff in [1, 2, 3, 100, 2_000] {
            for _ in 0..200 {
                let wait = jittered(backoff);
                assert!((backoff / 2..=backoff).contains(&wait), "{wait} for {backoff}");
            }
        }
    }

    #[test]
    fn config_validation_names_the_field() {
        BlockReaderConfig::default().validate().unwrap();
        let zero = BlockReaderConfig {
            initial_backoff_ms: 0,
            ..BlockReaderConfig::default()
        };
        assert!(matches!(
            zero.validate(),
            Err(Error::Config {
                field: "initial_backoff_ms",
                ..
            })
        ));
        let inverted = BlockReaderConfig {
            max_backoff_ms: 50,
            ..BlockReaderConfig::default()
        };
        assert!(matches!(
            inverted.validate(),
            Err(Error::Config {
                field: "max_backoff_ms",
                ..
            })
        ));
        assert!(serde_json::from_str::<BlockReaderConfig>(r#"{"retry_timeout": 5}"#).is_err());
    }
}
