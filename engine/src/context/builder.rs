//! [`StreamingContextBuilder`]: a [`StreamingConfig`] set field by field, plus the clock.

use std::path::PathBuf;
use std::time::Duration;

use sluice_blockstore::{SharedClock, StorageLevel};

use super::StreamingContext;
use crate::Result;
use crate::config::{BackpressureConfig, StreamingConfig};
use crate::exec::FailurePolicy;

/// Builds a [`StreamingContext`].
///
/// ```no_run
/// use std::time::Duration;
/// use sluice_engine::StreamingContext;
/// let ctx = StreamingContext::builder()
///     .batch_interval(Duration::from_millis(500))
///     .data_dir("/tmp/sluice-demo")
///     .build()?;
/// # Ok::<(), sluice_engine::Error>(())
/// ```
#[derive(Debug, Clone, Default)]
pub struct StreamingContextBuilder {
    config: StreamingConfig,
    clock: Option<SharedClock>,
}

impl StreamingContextBuilder {
    /// How often a batch is cut (default 1 s).
    #[must_use]
    pub fn batch_interval(mut self, interval: Duration) -> Self {
        self.config.batch_interval_ms = u64::try_from(interval.as_millis()).unwrap_or(u64::MAX);
        self
    }
    /// Directory for the block store's disk tier, the local log and local leases.
    #[must_use]
    pub fn data_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.config.data_dir = dir.into();
        self
    }
    /// Where the metadata log and operator state live: a local directory or an object-store URL
    /// (`s3://bucket/prefix`, `file:///…`). Default: `<data_dir>/checkpoint`.
    #[must_use]
    pub fn checkpoint(mut self, location: impl Into<String>) -> Self {
        self.config.checkpoint = Some(location.into());
        self
    }
    /// Storage level of every input's blocks. Default: each source's own
    /// ([`Source::default_storage_level`](sluice_receiver::Source::default_storage_level)):
    /// `MEMORY_ONLY` for the local log, whose replay reads the same disk a stored copy would;
    /// `MEMORY_AND_DISK` for Kinesis, where replay spends the shard's read quota. A lost block is
    /// replayed from its source by range either way; choose a `_2` level with a shared
    /// [`replica_url`](Self::replica_url) (S3) so that a restart on a new machine, or the worker
    /// that adopts a dead one, reads blocks from the replica instead.
    #[must_use]
    pub fn storage_level(mut self, level: StorageLevel) -> Self {
        self.config.storage_level = Some(level);
        self
    }
    /// Threads of the rayon pool that runs tasks (default: available cores).
    #[must_use]
    pub fn executor_threads(mut self, threads: usize) -> Self {
        self.config.executor_threads = threads;
        self
    }
    /// Partitions of keyed shuffles (default: 2 × executor threads).
    #[must_use]
    pub fn shuffle_partitions(mut self, partitions: usize) -> Self {
        self.config.shuffle_partitions = Some(partitions);
        self
    }
    /// The clock for batch and block intervals (default: the system clock; tests pass a
    /// [`ManualClock`](sluice_blockstore::ManualClock)).
    #[must_use]
    pub fn clock(mut self, clock: SharedClock) -> Self {
        self.clock = Some(clock);
        self
    }
    /// Attempts per task before the failure policy applies (default 3).
    #[must_use]
    pub fn max_task_attempts(mut self, attempts: u32) -> Self {
        self.config.max_task_attempts = attempts;
        self
    }
    /// What to do with a task that keeps failing (default: stop the stream).
    #[must_use]
    pub fn failure_policy(mut self, policy: FailurePolicy) -> Self {
        self.config.failure_policy = policy;
        self
    }
    /// Where dead-letter Parquet files go (local path or URL; default `<data_dir>/dead-letter`).
    #[must_use]
    pub fn dead_letter(mut self, location: impl Into<String>) -> Self {
        self.config.dead_letter = Some(location.into());
        self
    }
    /// Backpressure (PID rate controller; off by default).
    #[must_use]
    pub fn backpressure(mut self, config: BackpressureConfig) -> Self {
        self.config.backpressure = config;
        self
    }
    /// How long a graceful stop may take (default 10 × batch interval, as in Spark).
    #[must_use]
    pub fn graceful_stop_timeout(mut self, timeout: Duration) -> Self {
        self.config.graceful_stop_timeout_ms = Some(u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX));
        self
    }
    /// Byte budget of the block store's memory tier.
    #[must_use]
    pub fn memory_budget_bytes(mut self, bytes: u64) -> Self {
        self.config.memory_budget_bytes = Some(bytes);
        self
    }
    /// Object-store URL of the block replica tier (default `file://<data_dir>/replica`).
    #[must_use]
    pub fn replica_url(mut self, url: impl Into<String>) -> Self {
        self.config.replica_url = Some(url.into());
        self
    }

    /// Total delay above which a batch raises
    /// [`HealthEvent::StuckProcessing`](crate::HealthEvent::StuckProcessing) (default 10 × batch
    /// interval).
    #[must_use]
    pub fn stuck_bound(mut self, bound: Duration) -> Self {
        self.config.stuck_bound_ms = Some(u64::try_from(bound.as_millis()).unwrap_or(u64::MAX));
        self
    }
    /// Fraction of failed task attempts above which a batch raises
    /// [`HealthEvent::HighErrorRate`](crate::HealthEvent::HighErrorRate) (default 0.05).
    #[must_use]
    pub fn error_rate_bound(mut self, bound: f64) -> Self {
        self.config.error_rate_bound = bound;
        self
    }

    /// This worker's id among the workers of its application (default: the host name). It owns
    /// the worker's shard leases, names its metadata log (`<checkpoint>/workers/<id>/`) and its
    /// output files (`part-<id>-<i>.parquet`).
    ///
    /// Give every worker that shares a lease table and a checkpoint location its own id. A
    /// process started with the id of a previous one (the same machine after a restart, or a
    /// replacement configured with the same id) recovers that worker's log itself; a process
    /// with a new id leaves the old worker's log to be adopted by a live worker once its lease
    /// expires. Letters, digits, `.`, `_` and `-`, at most 128.
    #[must_use]
    pub fn worker_id(mut self, id: impl Into<String>) -> Self {
        self.config.worker_id = Some(id.into());
        self
    }

    /// Serves metrics and a status page over HTTP on `addr` while the context runs (from
    /// [`start`](StreamingContext::start) to [`stop`](StreamingContext::stop)):
    ///
    /// - `/metrics`: every engine, receiver, source, lease-store and block-store counter in the
    ///   Prometheus text format (`docs/operations.md` explains each);
    /// - `/`: a status page like Spark's Streaming tab (input rate and processing time per batch,
    ///   scheduling delay, per-shard lag and lease owner, the last recovery, detector alerts);
    /// - `/api/status`: the [`StreamingStatus`](crate::StreamingStatus) behind it, as JSON.
    ///
    /// Port 0 picks a free port ([`StreamingContext::metrics_addr`] tells which). The endpoint
    /// has no authentication: bind it to a loopback or private address. Default: not served.
    ///
    /// ```no_run
    /// use sluice_engine::StreamingContext;
    /// let ctx = StreamingContext::builder().metrics_addr("127.0.0.1:9898".parse()?).build()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    #[must_use]
    pub fn metrics_addr(mut self, addr: std::net::SocketAddr) -> Self {
        self.config.metrics_addr = Some(addr);
        self
    }

    /// Validates the settings and builds the context. Nothing runs until
    /// [`StreamingContext::start`].
    ///
    /// # Errors
    /// [`Error::Config`](crate::Error::Config) naming the bad setting and the fix.
    pub fn build(self) -> Result<StreamingContext> {
        self.config.validate()?;
        Ok(StreamingContext::new(self.config, self.clock))
    }

    /// Replaces every setting with `config` (the clock stays).
    #[must_use]
    pub fn config(mut self, config: StreamingConfig) -> Self {
        self.config = config;
        self
    }
}
