//! The Kinesis source (the `kinesis` feature): polling `GetRecords` behind the [`Source`] seam, so
//! the shared shard-reading loop, blocks, leases and checkpoints work as for the local log.
//!
//! - `list_shards`: paginated `ListShards` (open and closed shards, parent links, hash ranges).
//! - Readers: `GetShardIterator` for every [`StartingPosition`] (positions inside a KPL aggregate
//!   start `AT_SEQUENCE_NUMBER` and drop the sub-records before or at the position), `GetRecords`
//!   following `NextShardIterator`, KPL de-aggregation ([`kpl`]), shard end on `ChildShards` or no
//!   next iterator, `millisBehindLatest` reported per read. Throttles and expired iterators are
//!   retryable errors: the shard loop backs off with jitter and reopens after the last record.
//! - [`Replay`]: exactly a block's ranges, `AT_SEQUENCE_NUMBER` at `from`, following iterators,
//!   dropping positions below `from`, stopping at the first position `>= to`, tolerating empty
//!   pages, merging consecutive ranges of one shard into one pass, counting what it found against
//!   the range, and reporting data trimmed by retention as [`ReplayError::DataExpired`].
//! - Every `GetRecords` of this process on a shard — live or replay — takes its turn in one
//!   per-shard budget (5 calls/s, 2 MB/s by default), so a recovery does not throttle itself and
//!   the live reader to failure.
//!
//! - [`ReaderType::EnhancedFanOut`] reads live records through a registered stream consumer's
//!   `SubscribeToShard` subscriptions instead (`fan_out.rs`); replay stays on `GetRecords`.
//! - [`MultiStreamSource`] reads several streams as one source for one application, with KCL
//!   multi-stream lease keys (`account:stream:creationEpoch:shardId`) and a stream list that may
//!   change at run time.
//!
//! SDK calls run on the crate's shared runtime; the SDK's own retries are off so that every
//! throttle is seen, counted and paced here.

mod budget;
mod counters;
mod fan_out;
pub mod kpl;
mod multi_stream;
mod producer;
mod reader;
mod replay;

use std::fmt;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use sluice_blockstore::{Record, Replay, ReplayError, SequenceNumber, SequenceNumberRanges};

use self::budget::ReadBudget;
use self::fan_out::FanOutConsumer;
pub use self::multi_stream::{MultiStreamSource, StreamList, StreamListProvider};
pub use self::producer::KinesisProducer;
use crate::ConfigError;
use crate::StopMode;
use crate::aws::{AwsSettings, block_on};
pub use crate::lease::split_multi_stream_key;
use crate::source::{ReadPacing, ShardInfo, ShardReader, Source, SourceError, SourceRelease, StartingPosition};

/// How a Kinesis source reads live records. Replay of a lost block always uses `GetRecords`.
///
/// ```
/// use sluice_receiver::kinesis::{KinesisConfig, ReaderType};
/// let config: KinesisConfig = serde_json::from_str(
///     r#"{"stream_name": "clicks", "reader": {"enhanced_fan_out": {"consumer_name": "click-counter"}}}"#,
/// )?;
/// assert_eq!(config.reader, ReaderType::EnhancedFanOut { consumer_name: "click-counter".into() });
/// config.validate()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum ReaderType {
    /// `GetRecords` polling: every polling consumer of the stream shares 5 calls/s and 2 MB/s
    /// per shard; latency is about the read interval.
    #[default]
    Polling,
    /// Enhanced fan-out: `SubscribeToShard` through the stream consumer `consumer_name`, which
    /// has 2 MB/s per shard of its own and gets records pushed. The consumer is registered if it
    /// does not exist (see [`FanOutConfig::consumer_lifecycle`]). Every worker of an application
    /// uses the same consumer name; different applications use different names.
    EnhancedFanOut {
        /// The stream consumer's name (1-128 characters of `a-z A-Z 0-9 _ . -`).
        consumer_name: String,
    },
}

/// Who registers and deregisters the enhanced fan-out consumer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConsumerLifecycle {
    /// Registered by the source if it does not exist; deregistered by a graceful stop of the last
    /// worker reading the stream, if this process registered it (Flink's `JOB_MANAGED`).
    #[default]
    Managed,
    /// Created and deleted by someone else (infrastructure as code): the source only describes it
    /// and fails at connect if it does not exist.
    SelfManaged,
}

/// Enhanced fan-out settings; used when [`KinesisConfig::reader`] is
/// [`ReaderType::EnhancedFanOut`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FanOutConfig {
    /// Who registers and deregisters the consumer.
    pub consumer_lifecycle: ConsumerLifecycle,
    /// How long `connect` waits for the consumer to become `ACTIVE` (ms).
    pub consumer_active_timeout_ms: u64,
    /// A subscription is renewed (from exactly where it got to) after this long (ms), before the
    /// service ends it at 5 minutes. At most 300 000.
    pub renew_subscription_after_ms: u64,
    /// A subscription that delivered no event (not even an empty one) for this long is taken to
    /// be stuck and renewed (ms).
    pub event_timeout_ms: u64,
    /// While a subscription delivers only empty events, check at most this often whether the
    /// shard was closed and is read to its end (ms) — for sources whose events never carry
    /// `ChildShards` (kinesis-local). On AWS the event with `ChildShards` ends the shard first.
    pub end_check_interval_ms: u64,
}

impl FanOutConfig {
    /// Default lifecycle: managed by the source.
    pub const DEFAULT_CONSUMER_LIFECYCLE: ConsumerLifecycle = ConsumerLifecycle::Managed;
    /// Default wait for `ACTIVE` (registration takes seconds on AWS).
    pub const DEFAULT_CONSUMER_ACTIVE_TIMEOUT_MS: u64 = 60_000;
    /// Default subscription renewal: 4 min 30 s, before the service's 5-minute expiry.
    pub const DEFAULT_RENEW_SUBSCRIPTION_AFTER_MS: u64 = 270_000;
    /// Default event watchdog (the KCL's limit between responses is 60 s too).
    pub const DEFAULT_EVENT_TIMEOUT_MS: u64 = 60_000;
    /// Default end check interval.
    pub const DEFAULT_END_CHECK_INTERVAL_MS: u64 = 10_000;
    /// The service ends every subscription after 5 minutes.
    pub const SUBSCRIPTION_LIFETIME_MS: u64 = 300_000;
}

impl Default for FanOutConfig {
    fn default() -> Self {
        Self {
            consumer_lifecycle: Self::DEFAULT_CONSUMER_LIFECYCLE,
            consumer_active_timeout_ms: Self::DEFAULT_CONSUMER_ACTIVE_TIMEOUT_MS,
            renew_subscription_after_ms: Self::DEFAULT_RENEW_SUBSCRIPTION_AFTER_MS,
            event_timeout_ms: Self::DEFAULT_EVENT_TIMEOUT_MS,
            end_check_interval_ms: Self::DEFAULT_END_CHECK_INTERVAL_MS,
        }
    }
}

/// How to read one Kinesis stream.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KinesisConfig {
    /// The stream name.
    pub stream_name: String,
    /// Region, endpoint override, timeouts.
    pub aws: AwsSettings,
    /// Records asked for per `GetRecords` (1..=10 000). The shard loop asks for fewer under a
    /// rate limit; de-aggregation can return more user records than this.
    pub max_records_per_read: usize,
    /// Minimum time between two `GetRecords` calls on one shard (ms); the service allows 5 per
    /// second per shard, shared by every consumer of the stream.
    pub min_read_interval_ms: u64,
    /// Wait after a read that returned nothing (ms), so idle shards are not hammered.
    pub idle_interval_ms: u64,
    /// Read budget per shard (bytes/s) shared by live reading and replay; the service's limit
    /// is 2 MB/s per shard.
    pub max_bytes_per_second_per_shard: u64,
    /// Attempts per replay page when throttled or the iterator expired, before the replay
    /// returns a retryable error to the block reader.
    pub replay_max_attempts: u32,
    /// First backoff after a throttled replay call (ms); doubles per attempt, capped at 5 s.
    pub replay_backoff_ms: u64,
    /// How live records are read: polling (default) or enhanced fan-out.
    pub reader: ReaderType,
    /// Enhanced fan-out settings (used with [`ReaderType::EnhancedFanOut`]).
    pub fan_out: FanOutConfig,
}

impl KinesisConfig {
    /// Default `GetRecords` limit (the service maximum).
    pub const DEFAULT_MAX_RECORDS_PER_READ: usize = 10_000;
    /// Default spacing of calls per shard: 5 per second.
    pub const DEFAULT_MIN_READ_INTERVAL_MS: u64 = 200;
    /// Default idle wait (the KCL's `idleTimeBetweenReadsInMillis`).
    pub const DEFAULT_IDLE_INTERVAL_MS: u64 = 1_000;
    /// Default byte budget per shard: the service's 2 MB/s.
    pub const DEFAULT_MAX_BYTES_PER_SECOND_PER_SHARD: u64 = 2 * 1024 * 1024;
    /// Default replay attempts per page.
    pub const DEFAULT_REPLAY_MAX_ATTEMPTS: u32 = 10;
    /// Default first replay backoff.
    pub const DEFAULT_REPLAY_BACKOFF_MS: u64 = 200;

    /// A configuration for `stream_name` with every other value at its default.
    pub fn new(stream_name: impl Into<String>) -> Self {
        Self {
            stream_name: stream_name.into(),
            ..Self::default()
        }
    }

    /// Checks every value that can be checked without the network.
    ///
    /// # Errors
    /// [`ConfigError`] naming the field and what would be accepted.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let name = &self.stream_name;
        if name.is_empty()
            || name.len() > 128
            || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
        {
            return Err(ConfigError::new(
                "stream_name",
                format!("{name:?} is not a Kinesis stream name (1-128 characters of a-z, A-Z, 0-9, '_', '.', '-')"),
            ));
        }
        if !(1..=10_000).contains(&self.max_records_per_read) {
            return Err(ConfigError::new(
                "max_records_per_read",
                format!(
                    "{} is outside 1..=10000 (the GetRecords limit)",
                    self.max_records_per_read
                ),
            ));
        }
        if self.max_bytes_per_second_per_shard == 0 {
            return Err(ConfigError::new("max_bytes_per_second_per_shard", "must be positive"));
        }
        if self.replay_max_attempts == 0 {
            return Err(ConfigError::new("replay_max_attempts", "must be at least 1"));
        }
        if let ReaderType::EnhancedFanOut { consumer_name } = &self.reader
            && (consumer_name.is_empty()
                || consumer_name.len() > 128
                || !consumer_name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)))
        {
            return Err(ConfigError::new(
                "reader.enhanced_fan_out.consumer_name",
                format!(
                    "{consumer_name:?} is not a stream consumer name (1-128 characters of a-z, A-Z, 0-9, '_', '.', '-')"
                ),
            ));
        }
        let fan_out = &self.fan_out;
        if !(1..=FanOutConfig::SUBSCRIPTION_LIFETIME_MS).contains(&fan_out.renew_subscription_after_ms) {
            return Err(ConfigError::new(
                "fan_out.renew_subscription_after_ms",
                format!(
                    "{} is outside 1..=300000: subscriptions end after 5 minutes, renew them before",
                    fan_out.renew_subscription_after_ms
                ),
            ));
        }
        for (field, value) in [
            ("fan_out.consumer_active_timeout_ms", fan_out.consumer_active_timeout_ms),
            ("fan_out.event_timeout_ms", fan_out.event_timeout_ms),
            ("fan_out.end_check_interval_ms", fan_out.end_check_interval_ms),
        ] {
            if value == 0 {
                return Err(ConfigError::new(field, "must be at least 1 ms"));
            }
        }
        self.aws.validate()
    }

    fn pacing(&self) -> ReadPacing {
        match self.reader {
            ReaderType::Polling => ReadPacing {
                min_read_interval_ms: self.min_read_interval_ms,
                idle_interval_ms: self.idle_interval_ms,
                max_records_per_read: self.max_records_per_read,
            },
            // Records are pushed: a read waits for the next event itself.
            ReaderType::EnhancedFanOut { .. } => ReadPacing {
                min_read_interval_ms: 0,
                idle_interval_ms: 0,
                max_records_per_read: self.max_records_per_read,
            },
        }
    }
}

impl Default for KinesisConfig {
    fn default() -> Self {
        Self {
            stream_name: String::new(),
            aws: AwsSettings::default(),
            max_records_per_read: Self::DEFAULT_MAX_RECORDS_PER_READ,
            min_read_interval_ms: Self::DEFAULT_MIN_READ_INTERVAL_MS,
            idle_interval_ms: Self::DEFAULT_IDLE_INTERVAL_MS,
            max_bytes_per_second_per_shard: Self::DEFAULT_MAX_BYTES_PER_SECOND_PER_SHARD,
            replay_max_attempts: Self::DEFAULT_REPLAY_MAX_ATTEMPTS,
            replay_backoff_ms: Self::DEFAULT_REPLAY_BACKOFF_MS,
            reader: ReaderType::Polling,
            fan_out: FanOutConfig::default(),
        }
    }
}

/// Why [`KinesisSource::connect`] failed. Each message names the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum KinesisError {
    /// A configuration value is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The stream does not exist.
    #[error(
        "Kinesis stream {stream:?} does not exist (region {region}, endpoint {endpoint}); create it first \
         (`aws kinesis create-stream --stream-name {stream} --shard-count 2`, or `KinesisProducer::create_stream`) or fix `stream_name`"
    )]
    StreamNotFound {
        /// The stream name.
        stream: String,
        /// The region used.
        region: String,
        /// The endpoint used.
        endpoint: String,
    },
    /// Kinesis could not be reached.
    #[error(
        "cannot reach Kinesis at {endpoint} (region {region}): {detail}; check the region, the endpoint \
         override (`kinesis_endpoint` / AWS_ENDPOINT_URL_KINESIS), credentials and the network"
    )]
    Unreachable {
        /// The endpoint used.
        endpoint: String,
        /// The region used.
        region: String,
        /// What failed.
        detail: String,
    },
    /// The enhanced fan-out consumer does not exist and is self-managed.
    #[error(
        "stream consumer {consumer:?} of stream {stream:?} does not exist and `fan_out.consumer_lifecycle` is \
         `self_managed`; register it (`aws kinesis register-stream-consumer`) or use the `managed` lifecycle"
    )]
    ConsumerNotFound {
        /// The consumer name.
        consumer: String,
        /// The stream name.
        stream: String,
    },
    /// The enhanced fan-out consumer did not become `ACTIVE` in time.
    #[error(
        "stream consumer {consumer:?} of stream {stream:?} is still {status} after {waited_ms} ms; raise \
         `fan_out.consumer_active_timeout_ms`, or check it with `aws kinesis describe-stream-consumer`"
    )]
    ConsumerNotActive {
        /// The consumer name.
        consumer: String,
        /// The stream name.
        stream: String,
        /// Its last status.
        status: String,
        /// How long `connect` waited.
        waited_ms: u64,
    },
    /// Kinesis answered with an error.
    #[error(transparent)]
    Source(#[from] SourceError),
}

/// A snapshot of a Kinesis source's counters (live reading and replay together).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KinesisMetrics {
    /// `GetRecords` calls made by shard readers.
    pub get_records_calls: u64,
    /// Kinesis records (before de-aggregation) those calls returned.
    pub kinesis_records_read: u64,
    /// Payload bytes those calls returned.
    pub bytes_read: u64,
    /// `GetShardIterator` calls (opening and re-opening readers, replay starts).
    pub shard_iterators_requested: u64,
    /// Calls the service throttled (`ProvisionedThroughputExceeded`, `LimitExceeded`, KMS).
    pub throttles: u64,
    /// Iterators the service reported expired.
    pub expired_iterators: u64,
    /// Records that carried the KPL magic but failed its MD5 or protobuf check (delivered whole).
    pub invalid_aggregates: u64,
    /// Replays served.
    pub replays: u64,
    /// User records those replays returned.
    pub replay_records: u64,
    /// `GetRecords` calls made by replays.
    pub replay_get_records_calls: u64,
    /// Time calls waited for their shard's read budget (ms).
    pub budget_wait_ms: u64,
    /// `SubscribeToShard` calls (enhanced fan-out; opening, renewing and resubscribing).
    pub subscriptions: u64,
    /// Subscriptions renewed before their expiry, or ended by the service and continued.
    pub subscription_renewals: u64,
    /// Subscriptions that failed (the call or its event stream, throttles included) or went
    /// silent for the event timeout.
    pub subscription_errors: u64,
    /// Subscriptions that went silent (no event for the event timeout) and were replaced.
    pub silent_subscriptions: u64,
    /// Events subscriptions delivered (empty ones included).
    pub fan_out_events: u64,
    /// Checks whether an idle subscribed shard was closed and read to its end.
    pub fan_out_end_checks: u64,
}

#[derive(Debug, Default)]
struct MetricsCells {
    get_records_calls: AtomicU64,
    kinesis_records_read: AtomicU64,
    bytes_read: AtomicU64,
    shard_iterators_requested: AtomicU64,
    throttles: AtomicU64,
    expired_iterators: AtomicU64,
    invalid_aggregates: AtomicU64,
    replays: AtomicU64,
    replay_records: AtomicU64,
    replay_get_records_calls: AtomicU64,
    budget_wait_ms: AtomicU64,
    subscriptions: AtomicU64,
    subscription_renewals: AtomicU64,
    subscription_errors: AtomicU64,
    silent_subscriptions: AtomicU64,
    fan_out_events: AtomicU64,
    fan_out_end_checks: AtomicU64,
}

fn bump(cell: &AtomicU64, by: u64) {
    cell.fetch_add(by, Ordering::Relaxed);
}

/// A Kinesis stream as a [`Source`]. Cheap to clone; clones share the client, the read budget
/// and the counters.
#[derive(Clone)]
pub struct KinesisSource {
    inner: Arc<Inner>,
}

struct Inner {
    stream: Arc<str>,
    client: Client,
    config: KinesisConfig,
    budget: ReadBudget,
    metrics: MetricsCells,
    /// The stream consumer of an enhanced fan-out reader.
    consumer: Option<Arc<FanOutConsumer>>,
    /// `account:stream:creationEpoch`, KCL's multi-stream identifier of the stream.
    identifier: String,
}

impl fmt::Debug for KinesisSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KinesisSource")
            .field("stream", &self.inner.stream)
            .field("endpoint", &self.inner.config.aws.kinesis_endpoint)
            .finish_non_exhaustive()
    }
}

impl KinesisSource {
    /// Connects to the stream: validates the configuration, loads credentials and region from
    /// the default chain, and checks that the stream exists, so bad configuration fails here and
    /// not in a shard loop.
    ///
    /// # Errors
    /// [`KinesisError`]: invalid configuration, missing stream, unreachable endpoint.
    pub fn connect(config: KinesisConfig) -> Result<Self, KinesisError> {
        config.validate()?;
        let sdk = config.aws.load()?;
        let client = config.aws.kinesis_client(&sdk);
        let region = sdk.region().map_or_else(|| "(none)".to_owned(), ToString::to_string);
        let endpoint = config.aws.endpoint_of("kinesis", &sdk);
        let request = client.describe_stream_summary().stream_name(&config.stream_name);
        let summary = match block_on(request.send()) {
            Ok(out) => out.stream_description_summary,
            Err(e @ (SdkError::DispatchFailure(_) | SdkError::TimeoutError(_))) => {
                return Err(KinesisError::Unreachable {
                    endpoint,
                    region,
                    detail: format!("{}", DisplayErrorContext(&e)),
                });
            }
            Err(e) if e.code() == Some("ResourceNotFoundException") => {
                return Err(KinesisError::StreamNotFound {
                    stream: config.stream_name,
                    region,
                    endpoint,
                });
            }
            Err(e) => return Err(classify(&e, "DescribeStreamSummary").into()),
        };
        let identifier = stream_identifier(&config.stream_name, summary.as_ref());
        let consumer = match &config.reader {
            ReaderType::Polling => None,
            ReaderType::EnhancedFanOut { consumer_name } => {
                let stream_arn = summary.map(|s| s.stream_arn).unwrap_or_default();
                let consumer = FanOutConsumer::new(
                    consumer_name.clone(),
                    stream_arn,
                    config.fan_out.consumer_lifecycle,
                    Duration::from_millis(config.fan_out.consumer_active_timeout_ms),
                );
                consumer
                    .resolve(&client)
                    .map_err(|e| e.into_kinesis_error(consumer_name, &config.stream_name))?;
                Some(Arc::new(consumer))
            }
        };
        let budget = ReadBudget::new(
            Duration::from_millis(config.min_read_interval_ms),
            config.max_bytes_per_second_per_shard,
        );
        Ok(Self {
            inner: Arc::new(Inner {
                stream: Arc::from(config.stream_name.as_str()),
                client,
                config,
                budget,
                metrics: MetricsCells::default(),
                consumer,
                identifier,
            }),
        })
    }

    /// The counters of live reading and replay.
    pub fn metrics(&self) -> KinesisMetrics {
        let m = &self.inner.metrics;
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        KinesisMetrics {
            get_records_calls: get(&m.get_records_calls),
            kinesis_records_read: get(&m.kinesis_records_read),
            bytes_read: get(&m.bytes_read),
            shard_iterators_requested: get(&m.shard_iterators_requested),
            throttles: get(&m.throttles),
            expired_iterators: get(&m.expired_iterators),
            invalid_aggregates: get(&m.invalid_aggregates),
            replays: get(&m.replays),
            replay_records: get(&m.replay_records),
            replay_get_records_calls: get(&m.replay_get_records_calls),
            budget_wait_ms: get(&m.budget_wait_ms),
            subscriptions: get(&m.subscriptions),
            subscription_renewals: get(&m.subscription_renewals),
            subscription_errors: get(&m.subscription_errors),
            silent_subscriptions: get(&m.silent_subscriptions),
            fan_out_events: get(&m.fan_out_events),
            fan_out_end_checks: get(&m.fan_out_end_checks),
        }
    }

    /// The configuration the source was connected with.
    pub fn config(&self) -> &KinesisConfig {
        &self.inner.config
    }

    /// The stream as KCL's multi-stream mode names it: `account:stream:creationEpoch` (the
    /// account from the stream's ARN, the creation time in seconds since the epoch).
    pub fn stream_identifier(&self) -> &str {
        &self.inner.identifier
    }

    /// Deregisters the enhanced fan-out consumer if this source registered it (a graceful stop
    /// of the last worker does this through [`Source::release`]). Returns whether it did.
    ///
    /// # Errors
    /// What Kinesis said.
    pub fn deregister_consumer(&self) -> Result<bool, SourceError> {
        match &self.inner.consumer {
            Some(consumer) => consumer.deregister_if_registered_here(&self.inner.client),
            None => Ok(false),
        }
    }
}

/// `account:stream:creationEpoch` from a `DescribeStreamSummary` answer.
fn stream_identifier(stream: &str, summary: Option<&aws_sdk_kinesis::types::StreamDescriptionSummary>) -> String {
    let account = summary
        .and_then(|s| s.stream_arn.split(':').nth(4))
        .filter(|a| !a.is_empty())
        .unwrap_or("000000000000");
    let epoch = summary.map_or(0, |s| s.stream_creation_timestamp.secs());
    format!("{account}:{stream}:{epoch}")
}

/// Where an iterator (or a fan-out subscription) for `start` begins: its type, sequence number
/// and timestamp.
///
/// A position inside a KPL aggregate shares its sequence number with the aggregate's other
/// sub-records, so both `AtPosition` and `AfterPosition` begin `AT_SEQUENCE_NUMBER` and the
/// reader drops what lies before (at) the position. An `AfterPosition` whose sub-sequence number
/// is `u64::MAX` — "after everything of this sequence number", a fan-out continuation sequence
/// number — begins `AFTER_SEQUENCE_NUMBER`.
pub(crate) fn iterator_start(
    start: &StartingPosition,
) -> (
    aws_sdk_kinesis::types::ShardIteratorType,
    Option<String>,
    Option<aws_sdk_kinesis::primitives::DateTime>,
) {
    use aws_sdk_kinesis::types::ShardIteratorType as T;
    match start {
        StartingPosition::TrimHorizon => (T::TrimHorizon, None, None),
        StartingPosition::Latest => (T::Latest, None, None),
        StartingPosition::AtTimestamp(ms) => (
            T::AtTimestamp,
            None,
            Some(aws_sdk_kinesis::primitives::DateTime::from_millis(*ms)),
        ),
        StartingPosition::AfterPosition(p) if p.sub_sequence == u64::MAX => {
            (T::AfterSequenceNumber, Some(p.sequence.to_string()), None)
        }
        StartingPosition::AtPosition(p) | StartingPosition::AfterPosition(p) => {
            (T::AtSequenceNumber, Some(p.sequence.to_string()), None)
        }
    }
}

/// Maps a failed call to a [`SourceError`] by the service's error code.
pub(crate) fn classify<E, R>(err: &SdkError<E, R>, call: &str) -> SourceError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: fmt::Debug,
{
    let detail = format!("{call}: {}", DisplayErrorContext(err));
    match err.code() {
        Some(
            "ProvisionedThroughputExceededException"
            | "LimitExceededException"
            | "KMSThrottlingException"
            | "ThrottlingException",
        ) => SourceError::Throttled(detail),
        Some("ExpiredIteratorException") => SourceError::IteratorExpired(detail),
        Some("InvalidArgumentException" | "ValidationException" | "AccessDeniedException") => {
            SourceError::Invalid(detail)
        }
        _ => SourceError::Unavailable { detail, source: None },
    }
}

impl Inner {
    /// `GetShardIterator` of the given type.
    fn shard_iterator(&self, shard_id: &str, start: &StartingPosition) -> Result<String, SourceError> {
        let (kind, sequence, timestamp) = iterator_start(start);
        let request = self
            .client
            .get_shard_iterator()
            .stream_name(&*self.stream)
            .shard_id(shard_id)
            .shard_iterator_type(kind)
            .set_starting_sequence_number(sequence)
            .set_timestamp(timestamp);
        bump(&self.metrics.shard_iterators_requested, 1);
        match block_on(request.send()) {
            Ok(out) => out.shard_iterator.ok_or_else(|| SourceError::Unavailable {
                detail: format!("GetShardIterator returned no iterator for {}/{shard_id}", self.stream),
                source: None,
            }),
            Err(e) if e.code() == Some("ResourceNotFoundException") => Err(SourceError::UnknownShard {
                stream: self.stream.to_string(),
                shard_id: shard_id.to_owned(),
            }),
            Err(e) => Err(self.note(classify(&e, "GetShardIterator"))),
        }
    }

    /// Every shard of the stream: paginated `ListShards`.
    fn list_shards(&self) -> Result<Vec<ShardInfo>, SourceError> {
        let mut shards = Vec::new();
        let mut token: Option<String> = None;
        loop {
            // A paginated call names the stream only on the first page.
            let request = match &token {
                None => self.client.list_shards().stream_name(&*self.stream),
                Some(t) => self.client.list_shards().next_token(t),
            };
            let out = block_on(request.send()).map_err(|e| {
                if e.code() == Some("ResourceNotFoundException") {
                    SourceError::UnknownShard {
                        stream: self.stream.to_string(),
                        shard_id: "(stream)".into(),
                    }
                } else {
                    self.note(classify(&e, "ListShards"))
                }
            })?;
            for shard in out.shards() {
                shards.push(shard_info(shard)?);
            }
            match out.next_token {
                Some(t) if !t.is_empty() => token = Some(t),
                _ => break,
            }
        }
        shards.sort_by(|a, b| a.shard_id.cmp(&b.shard_id));
        shards.dedup_by(|a, b| a.shard_id == b.shard_id);
        Ok(shards)
    }

    /// Counts an error by kind and returns it.
    fn note(&self, error: SourceError) -> SourceError {
        match &error {
            SourceError::Throttled(_) => bump(&self.metrics.throttles, 1),
            SourceError::IteratorExpired(_) => bump(&self.metrics.expired_iterators, 1),
            _ => {}
        }
        error
    }
}

impl Source for KinesisSource {
    fn stream_name(&self) -> &str {
        &self.inner.stream
    }

    fn read_pacing(&self) -> ReadPacing {
        self.inner.config.pacing()
    }

    fn counters(&self) -> Vec<crate::NamedCounter> {
        self.metrics().counters()
    }

    fn list_shards(&self) -> Result<Vec<ShardInfo>, SourceError> {
        self.inner.list_shards()
    }

    fn open_reader(&self, shard_id: &str, start: &StartingPosition) -> Result<Box<dyn ShardReader>, SourceError> {
        Ok(match &self.inner.consumer {
            None => Box::new(reader::KinesisShardReader::open(self.inner.clone(), shard_id, start)?),
            Some(consumer) => Box::new(fan_out::FanOutShardReader::open(
                self.inner.clone(),
                consumer.clone(),
                shard_id,
                start,
            )?),
        })
    }

    fn release(&self, how: &SourceRelease<'_>) {
        let Some(consumer) = &self.inner.consumer else { return };
        if !(how.mode == StopMode::Graceful && consumer.registered_here() && how.is_last_reader()) {
            return;
        }
        if let Err(e) = consumer.deregister_if_registered_here(&self.inner.client) {
            tracing::warn!(stream = %self.inner.stream, consumer = consumer.name(), error = %e,
                "could not deregister the enhanced fan-out consumer; deregister it by hand");
        }
    }
}

impl Replay for KinesisSource {
    fn replay(&self, ranges: &SequenceNumberRanges) -> Result<Vec<Record>, ReplayError> {
        replay::replay(&self.inner, ranges)
    }
}

fn shard_info(shard: &aws_sdk_kinesis::types::Shard) -> Result<ShardInfo, SourceError> {
    let invalid = |what: &str, value: &str| {
        SourceError::Invalid(format!(
            "ListShards returned shard {} with {what} {value:?}",
            shard.shard_id()
        ))
    };
    let range = shard.hash_key_range();
    let parse_key = |s: &str| s.parse::<u128>().map_err(|_| invalid("hash key", s));
    let hash_key_range = match range {
        Some(r) => (parse_key(r.starting_hash_key())?, parse_key(r.ending_hash_key())?),
        None => (0, u128::MAX),
    };
    let ending_sequence = match shard.sequence_number_range().and_then(|r| r.ending_sequence_number()) {
        Some(s) => Some(SequenceNumber::parse(s).map_err(|_| invalid("ending sequence number", s))?),
        None => None,
    };
    let parent_shard_ids = [shard.parent_shard_id(), shard.adjacent_parent_shard_id()]
        .into_iter()
        .flatten()
        .map(Arc::from)
        .collect();
    Ok(ShardInfo {
        shard_id: Arc::from(shard.shard_id()),
        parent_shard_ids,
        hash_key_range,
        ending_sequence,
    })
}
