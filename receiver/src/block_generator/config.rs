//! A generator's block sizes, timing and queueing.

use serde::{Deserialize, Serialize};

use crate::config_error::ConfigError;

/// What a producer does when the generator's queue is full.
///
/// Only blocking exists: dropping data is never an option for a replayable source whose
/// positions are checkpointed. The enum documents the policy and leaves room for a
/// `FailFast` mode if a caller ever needs one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[non_exhaustive]
pub enum WhenFull {
    /// Block the producer until the pusher frees a slot.
    #[default]
    Block,
}

/// Block sizes, timing and queueing of a [`BlockGenerator`](crate::BlockGenerator).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlockGeneratorConfig {
    /// Seal the buffer into a block this often (ms, on the injected clock).
    pub block_interval_ms: u64,
    /// Seal as soon as the buffer holds this many records.
    pub max_block_records: usize,
    /// Seal as soon as the buffered records hold this many bytes of memory
    /// ([`Record::memory_bytes`](sluice_blockstore::Record::memory_bytes): payload, partition key,
    /// sequence number, per-record overhead).
    pub max_block_bytes: usize,
    /// Sealed blocks waiting for the pusher, at most.
    pub queue_capacity: usize,
    /// What producers do when the queue is full.
    pub when_full: WhenFull,
    /// Attempts to store one block (Spark: 4) before the generator fails.
    pub max_push_attempts: u32,
    /// Wait between attempts (ms, multiplied by the attempt number).
    pub push_retry_backoff_ms: u64,
}

impl BlockGeneratorConfig {
    /// Default block interval (Spark's `spark.streaming.blockInterval`).
    pub const DEFAULT_BLOCK_INTERVAL_MS: u64 = 200;
    /// Default records per block.
    pub const DEFAULT_MAX_BLOCK_RECORDS: usize = 500_000;
    /// Default memory per buffered block: with the default queue the generator holds at most
    /// 3 × 16 MiB = 48 MiB (about 6.5 MiB of payload per block for 100-byte records). Each block
    /// is a task with its own map-side combine, so smaller blocks cost batch throughput
    /// (`docs/benchmarks.md` has the figures for 8 and 16 MiB).
    pub const DEFAULT_MAX_BLOCK_BYTES: usize = 16 << 20;
    /// Default queue capacity. Spark's `spark.streaming.blockQueueSize` is 10; the engine's store
    /// applies its own backpressure (the ingest gate), so the queue only has to keep the block
    /// handler busy — one block waiting while another is stored — and every queued block is
    /// memory.
    pub const DEFAULT_QUEUE_CAPACITY: usize = 1;
    /// Default store attempts per block (Spark's Kinesis receiver).
    pub const DEFAULT_MAX_PUSH_ATTEMPTS: u32 = 4;
    /// Default backoff unit between store attempts.
    pub const DEFAULT_PUSH_RETRY_BACKOFF_MS: u64 = 100;

    /// Checks every field.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.block_interval_ms == 0 {
            return Err(ConfigError::new("block_interval_ms", "must be at least 1 ms"));
        }
        if self.max_block_records == 0 {
            return Err(ConfigError::new("max_block_records", "must be at least 1"));
        }
        if self.max_block_bytes == 0 {
            return Err(ConfigError::new("max_block_bytes", "must be at least 1"));
        }
        if self.queue_capacity == 0 {
            return Err(ConfigError::new(
                "queue_capacity",
                "must be at least 1 block (the queue is what bounds memory)",
            ));
        }
        if self.max_push_attempts == 0 {
            return Err(ConfigError::new("max_push_attempts", "must be at least 1"));
        }
        Ok(())
    }
}

impl Default for BlockGeneratorConfig {
    fn default() -> Self {
        Self {
            block_interval_ms: Self::DEFAULT_BLOCK_INTERVAL_MS,
            max_block_records: Self::DEFAULT_MAX_BLOCK_RECORDS,
            max_block_bytes: Self::DEFAULT_MAX_BLOCK_BYTES,
            queue_capacity: Self::DEFAULT_QUEUE_CAPACITY,
            when_full: WhenFull::Block,
            max_push_attempts: Self::DEFAULT_MAX_PUSH_ATTEMPTS,
            push_retry_backoff_ms: Self::DEFAULT_PUSH_RETRY_BACKOFF_MS,
        }
    }
}
