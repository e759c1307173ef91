//! [`ReceiverConfig`] and [`InitialPosition`].

use serde::{Deserialize, Serialize};

use crate::block_generator::{BlockGeneratorConfig, WhenFull};
use crate::config_error::ConfigError;
use crate::lease::Checkpoint;
use crate::source::{ReadPacing, StartingPosition};

/// Where a shard without a checkpoint starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum InitialPosition {
    /// The oldest record still held (every record is read).
    TrimHorizon,
    /// Records written after the receiver starts (Spark's default; it skips whatever was written
    /// while nothing was running).
    Latest,
    /// The first record that arrived at or after this time.
    AtTimestamp {
        /// Milliseconds since the Unix epoch.
        timestamp_ms: i64,
    },
}

impl InitialPosition {
    /// The checkpoint a new lease starts with.
    pub(crate) fn checkpoint(self) -> Checkpoint {
        match self {
            InitialPosition::TrimHorizon => Checkpoint::TrimHorizon,
            InitialPosition::Latest => Checkpoint::Latest,
            InitialPosition::AtTimestamp { .. } => Checkpoint::AtTimestamp,
        }
    }

    /// Where a reader starts for a lease still at an initial checkpoint.
    pub(crate) fn starting_position(self, checkpoint: &Checkpoint) -> StartingPosition {
        match (checkpoint, self) {
            (Checkpoint::Latest, _) => StartingPosition::Latest,
            (Checkpoint::AtTimestamp, InitialPosition::AtTimestamp { timestamp_ms }) => {
                StartingPosition::AtTimestamp(timestamp_ms)
            }
            _ => StartingPosition::TrimHorizon,
        }
    }
}

/// Configuration of one [`Receiver`](crate::Receiver).
///
/// ```
/// use sluice_receiver::ReceiverConfig;
/// let config: ReceiverConfig = serde_json::from_str(r#"{"block_interval_ms": 100, "max_rate": 5000.0}"#)?;
/// config.validate()?;
/// assert_eq!(config.queue_capacity, ReceiverConfig::DEFAULT_QUEUE_CAPACITY);
/// assert!(serde_json::from_str::<ReceiverConfig>(r#"{"block_interval": 100}"#).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiverConfig {
    /// The input stream this receiver feeds (the `input_id` of its block ids).
    pub input_id: u32,
    /// Seal buffered records into a block this often (ms).
    pub block_interval_ms: u64,
    /// Seal as soon as a block holds this many records.
    pub max_block_records: usize,
    /// Seal as soon as a block's buffered records hold this many bytes of memory
    /// (`Record::memory_bytes`; about 2.5× the payload for 100-byte records).
    pub max_block_bytes: usize,
    /// Sealed blocks waiting to be stored, at most; beyond it readers block (backpressure).
    pub queue_capacity: usize,
    /// Ceiling on records accepted per second (`None`: unlimited). The backpressure controller
    /// moves the current rate below it with [`Receiver::set_max_rate`](crate::Receiver::set_max_rate).
    pub max_rate: Option<f64>,
    /// Attempts to store one block before the receiver fails and restarts.
    pub max_push_attempts: u32,
    /// Wait between store attempts (ms, times the attempt number).
    pub push_retry_backoff_ms: u64,
    /// Wait between a failure and the restart (Spark's `receiverRestartDelay`).
    pub restart_delay_ms: u64,
    /// Checkpoint each owned shard at most this often (ms); a final checkpoint is written at stop.
    pub checkpoint_interval_ms: u64,
    /// Where shards without a checkpoint start.
    pub initial_position: InitialPosition,
    /// The lease owner name; `None` uses the host name. Give receivers that share a lease table
    /// from one host distinct ids.
    pub worker_id: Option<String>,
    /// A lease whose counter has not moved for this long is expired and may be taken (ms).
    /// Held leases are renewed every third of it.
    pub lease_failover_ms: u64,
    /// Scan the lease table for leases to take (and shards for new leases) this often (ms).
    pub lease_taker_interval_ms: u64,
    /// Most records asked for in one read of a shard; `None` keeps the source's
    /// [`ReadPacing::max_records_per_read`](ReadPacing) (Kinesis: 10 000). The loop asks
    /// for fewer under a rate limit.
    pub read_max_records: Option<usize>,
    /// Wait after a read that returned no record before reading the shard again (ms); `None`
    /// keeps the source's [`ReadPacing::idle_interval_ms`](ReadPacing).
    pub idle_poll_ms: Option<u64>,
}

impl ReceiverConfig {
    /// Default block interval.
    pub const DEFAULT_BLOCK_INTERVAL_MS: u64 = BlockGeneratorConfig::DEFAULT_BLOCK_INTERVAL_MS;
    /// Default records per block.
    pub const DEFAULT_MAX_BLOCK_RECORDS: usize = BlockGeneratorConfig::DEFAULT_MAX_BLOCK_RECORDS;
    /// Default payload bytes per block.
    pub const DEFAULT_MAX_BLOCK_BYTES: usize = BlockGeneratorConfig::DEFAULT_MAX_BLOCK_BYTES;
    /// Default queue capacity (blocks).
    pub const DEFAULT_QUEUE_CAPACITY: usize = BlockGeneratorConfig::DEFAULT_QUEUE_CAPACITY;
    /// Default store attempts per block.
    pub const DEFAULT_MAX_PUSH_ATTEMPTS: u32 = BlockGeneratorConfig::DEFAULT_MAX_PUSH_ATTEMPTS;
    /// Default backoff unit between store attempts.
    pub const DEFAULT_PUSH_RETRY_BACKOFF_MS: u64 = BlockGeneratorConfig::DEFAULT_PUSH_RETRY_BACKOFF_MS;
    /// Default restart delay (Spark: 2 s).
    pub const DEFAULT_RESTART_DELAY_MS: u64 = 2_000;
    /// Default checkpoint interval.
    pub const DEFAULT_CHECKPOINT_INTERVAL_MS: u64 = 1_000;
    /// Default initial position: every record (the local log is usually filled before it is read;
    /// `Latest` would silently skip what was written while nothing ran).
    pub const DEFAULT_INITIAL_POSITION: InitialPosition = InitialPosition::TrimHorizon;
    /// Default lease failover time (KCL: 10 s).
    pub const DEFAULT_LEASE_FAILOVER_MS: u64 = 10_000;
    /// Default lease scan interval.
    pub const DEFAULT_LEASE_TAKER_INTERVAL_MS: u64 = 2_000;
    /// Default records per read: the source's own pacing decides.
    pub const DEFAULT_READ_MAX_RECORDS: Option<usize> = None;
    /// Default idle wait: the source's own pacing decides.
    pub const DEFAULT_IDLE_POLL_MS: Option<u64> = None;

    /// Checks every field.
    ///
    /// # Errors
    /// [`ConfigError`] naming the first invalid field.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.generator_config().validate()?;
        if let Some(rate) = self.max_rate
            && !(rate.is_finite() && rate > 0.0)
        {
            return Err(ConfigError::new(
                "max_rate",
                format!("must be a positive number of records per second (or absent for no limit), got {rate}"),
            ));
        }
        if self.checkpoint_interval_ms == 0 {
            return Err(ConfigError::new("checkpoint_interval_ms", "must be at least 1 ms"));
        }
        if self.lease_failover_ms < 3 {
            return Err(ConfigError::new(
                "lease_failover_ms",
                "must be at least 3 ms (leases are renewed every third of it)",
            ));
        }
        if self.lease_taker_interval_ms == 0 {
            return Err(ConfigError::new("lease_taker_interval_ms", "must be at least 1 ms"));
        }
        if self.read_max_records == Some(0) {
            return Err(ConfigError::new(
                "read_max_records",
                "must be at least 1 (or absent for the source's default)",
            ));
        }
        if let Some(id) = &self.worker_id
            && id.trim().is_empty()
        {
            return Err(ConfigError::new("worker_id", "must not be empty (or leave it unset)"));
        }
        Ok(())
    }

    /// The block generator part of the configuration.
    pub fn generator_config(&self) -> BlockGeneratorConfig {
        BlockGeneratorConfig {
            block_interval_ms: self.block_interval_ms,
            max_block_records: self.max_block_records,
            max_block_bytes: self.max_block_bytes,
            queue_capacity: self.queue_capacity,
            when_full: WhenFull::Block,
            max_push_attempts: self.max_push_attempts,
            push_retry_backoff_ms: self.push_retry_backoff_ms,
        }
    }

    /// The source's read pacing with this configuration's overrides applied.
    pub fn read_pacing(&self, source_pacing: ReadPacing) -> ReadPacing {
        ReadPacing {
            min_read_interval_ms: source_pacing.min_read_interval_ms,
            idle_interval_ms: self.idle_poll_ms.unwrap_or(source_pacing.idle_interval_ms),
            max_records_per_read: self.read_max_records.unwrap_or(source_pacing.max_records_per_read),
        }
    }

    /// The worker id: the configured one, or the host name.
    pub fn effective_worker_id(&self) -> String {
        self.worker_id.clone().unwrap_or_else(default_worker_id)
    }

    /// How often held leases are renewed (a third of the failover time).
    pub(crate) fn lease_renew_interval_ms(&self) -> u64 {
        (self.lease_failover_ms / 3).max(1)
    }
}

impl Default for ReceiverConfig {
    fn default() -> Self {
        Self {
            input_id: 0,
            block_interval_ms: Self::DEFAULT_BLOCK_INTERVAL_MS,
            max_block_records: Self::DEFAULT_MAX_BLOCK_RECORDS,
            max_block_bytes: Self::DEFAULT_MAX_BLOCK_BYTES,
            queue_capacity: Self::DEFAULT_QUEUE_CAPACITY,
            max_rate: None,
            max_push_attempts: Self::DEFAULT_MAX_PUSH_ATTEMPTS,
            push_retry_backoff_ms: Self::DEFAULT_PUSH_RETRY_BACKOFF_MS,
            restart_delay_ms: Self::DEFAULT_RESTART_DELAY_MS,
            checkpoint_interval_ms: Self::DEFAULT_CHECKPOINT_INTERVAL_MS,
            initial_position: Self::DEFAULT_INITIAL_POSITION,
            worker_id: None,
            lease_failover_ms: Self::DEFAULT_LEASE_FAILOVER_MS,
            lease_taker_interval_ms: Self::DEFAULT_LEASE_TAKER_INTERVAL_MS,
            read_max_records: Self::DEFAULT_READ_MAX_RECORDS,
            idle_poll_ms: Self::DEFAULT_IDLE_POLL_MS,
        }
    }
}

/// The machine's host name, for default worker ids.
/// The default worker id: this machine's host name (`localhost` if it has none).
pub fn default_worker_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_values_name_their_field() {
        ReceiverConfig::default().validate().unwrap();
        let cases: [(ReceiverConfig, &str); 5] = [
            (
                ReceiverConfig {
                    block_interval_ms: 0,
                    ..ReceiverConfig::default()
                },
                "block_interval_ms",
            ),
            (
                ReceiverConfig {
                    max_rate: Some(0.0),
                    ..ReceiverConfig::default()
                },
                "max_rate",
            ),
            (
                ReceiverConfig {
                    checkpoint_interval_ms: 0,
                    ..ReceiverConfig::default()
                },
                "checkpoint_interval_ms",
            ),
            (
                ReceiverConfig {
                    worker_id: Some(" ".into()),
                    ..ReceiverConfig::default()
                },
                "worker_id",
            ),
            (
                ReceiverConfig {
                    queue_capacity: 0,
                    ..ReceiverConfig::default()
                },
                "queue_capacity",
            ),
        ];
        for (config, field) in cases {
            assert_eq!(config.validate().unwrap_err().field, field);
        }
    }

    #[test]
    fn serde_names() {
        let json = r#"{"initial_position": {"at_timestamp": {"timestamp_ms": 5}}, "worker_id": "w1"}"#;
        let config: ReceiverConfig = serde_json::from_str(json).unwrap();
        assert_eq!(
            config.initial_position,
            InitialPosition::AtTimestamp { timestamp_ms: 5 }
        );
        assert_eq!(config.effective_worker_id(), "w1");
        let json = serde_json::to_string(&ReceiverConfig::default()).unwrap();
        assert!(json.contains(r#""initial_position":"trim_horizon""#), "{json}");
        assert!(!ReceiverConfig::default().effective_worker_id().is_empty());
    }
}
