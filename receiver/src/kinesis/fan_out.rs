//! Enhanced fan-out: reading a shard through a `SubscribeToShard` subscription of a registered
//! stream consumer, behind the same [`ShardReader`] seam as polling.
//!
//! A consumer has its own 2 MB/s per shard and records are pushed to it (about 70 ms after they
//! are written on AWS), where polling consumers share 5 calls/s and 2 MB/s per shard. The design
//! answers the known failures of other enhanced fan-out readers (`shared/reference/peers.md`:
//! Flink's idle "zombie" subscriptions, lost resubscriptions after the 5-minute expiry,
//! unbounded buffers; KCL's read timeouts):
//!
//! - **Demand-driven and bounded.** One task per subscription pulls events off the HTTP event
//!   stream into a channel of one event; the shard loop takes them with `read`. A reader that is
//!   not read (backpressure from a full block queue) stops pulling, and the service's flow
//!   control does the rest. Nothing is buffered beyond one event in the channel and the
//!   records of one event the loop has not taken yet.
//! - **Exact resubscription.** The reader knows the position after everything it received:
//!   the last record, or the event's continuation sequence number when that is later (a
//!   subscription that started at `LATEST` and has seen no record yet). Subscriptions are renewed
//!   before the service's 5-minute expiry (`renew_subscription_after_ms`), when the service
//!   completes them, and when no event arrived for `event_timeout_ms` (a watchdog against
//!   silent, "zombie" subscriptions) — always from that position, inside the reader, so the
//!   shard loop sees an uninterrupted sequence. Errors go to the loop: `LimitExceeded` and
//!   `ResourceInUse` (another subscription of the consumer on the shard is still open) are
//!   throttles — the loop backs off with jitter and keeps the reader; anything else makes the
//!   loop reopen the reader from [`ShardReader::resume_position`].
//! - **Shard end.** An event with `ChildShards` ends the shard once its records are taken. An
//!   emulator that never sends `ChildShards` (kinesis-local) is covered by a check every
//!   `end_check_interval_ms` while the subscription delivers empty events: if `ListShards` says
//!   the shard is closed and `GetRecords` after the reader's position returns nothing but the
//!   shard's end, the shard has ended.
//!
//! Replay never uses a subscription: it re-reads ranges with `GetRecords` (`replay.rs`).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_kinesis::operation::subscribe_to_shard::SubscribeToShardError;
use aws_sdk_kinesis::types::error::SubscribeToShardEventStreamError;
use aws_sdk_kinesis::types::{ConsumerStatus, SubscribeToShardEvent, SubscribeToShardEventStream};
use sluice_blockstore::{Position, Record, SequenceNumber};

use super::reader::Skip;
use super::{ConsumerLifecycle, Inner, KinesisError, bump, classify, iterator_start};
use crate::aws::{block_on, spawn};
use crate::source::{ReadBatch, ShardReader, SourceError, StartingPosition};

/// How long one `read` waits for the next event before it returns without an answer.
const EVENT_WAIT: Duration = Duration::from_millis(200);
/// Pause between two `DescribeStreamConsumer` calls while waiting for `ACTIVE` (the call's limit
/// is 20 per second per stream).
const DESCRIBE_INTERVAL: Duration = Duration::from_millis(250);

/// The registered stream consumer enhanced fan-out reads through, shared by the source's readers.
#[derive(Debug)]
pub(super) struct FanOutConsumer {
    name: String,
    stream_arn: String,
    lifecycle: ConsumerLifecycle,
    active_timeout: Duration,
    state: Mutex<ConsumerState>,
}

#[derive(Debug, Default)]
struct ConsumerState {
    /// The ARN of the consumer once it was seen `ACTIVE`.
    arn: Option<String>,
    /// This process registered it (so a graceful stop may deregister it).
    registered_here: bool,
}

/// Why the consumer could not be made ready.
#[derive(Debug)]
pub(super) enum ConsumerError {
    /// It does not exist and the lifecycle forbids registering it.
    NotFound,
    /// It did not become `ACTIVE` in time.
    NotActive { status: String, waited_ms: u64 },
    /// A call failed.
    Call(SourceError),
}

impl ConsumerError {
    pub(super) fn into_kinesis_error(self, consumer: &str, stream: &str) -> KinesisError {
        match self {
            ConsumerError::NotFound => KinesisError::ConsumerNotFound {
                consumer: consumer.to_owned(),
                stream: stream.to_owned(),
            },
            ConsumerError::NotActive { status, waited_ms } => KinesisError::ConsumerNotActive {
                consumer: consumer.to_owned(),
                stream: stream.to_owned(),
                status,
                waited_ms,
            },
            ConsumerError::Call(e) => KinesisError::Source(e),
        }
    }

    fn into_source_error(self, consumer: &str, stream: &str) -> SourceError {
        match self {
            ConsumerError::Call(e) => e,
            // Retryable: another worker may be registering it, or an operator re-creating it.
            other => SourceError::Unavailable {
                detail: other.into_kinesis_error(consumer, stream).to_string(),
                source: None,
            },
        }
    }
}

impl FanOutConsumer {
    pub(super) fn new(
        name: String,
        stream_arn: String,
        lifecycle: ConsumerLifecycle,
        active_timeout: Duration,
    ) -> Self {
        Self {
            name,
            stream_arn,
            lifecycle,
            active_timeout,
            state: Mutex::new(ConsumerState::default()),
        }
    }

    pub(super) fn name(&self) -> &str {
        &self.name
    }

    /// Describes the consumer — registering it first if it does not exist and the lifecycle
    /// allows — and waits (at most `active_timeout`) until it is `ACTIVE`. Returns its ARN.
    pub(super) fn resolve(&self, client: &Client) -> Result<String, ConsumerError> {
        let started = Instant::now();
        let mut status = String::from("(not described yet)");
        loop {
            let request = client
                .describe_stream_consumer()
                .stream_arn(&self.stream_arn)
                .consumer_name(&self.name);
            match block_on(request.send()) {
                Ok(out) => {
                    if let Some(description) = out.consumer_description {
                        if description.consumer_status == ConsumerStatus::Active {
                            self.state.lock().expect("consumer state").arn = Some(description.consumer_arn);
                            return Ok(self.arn_cached().expect("just set"));
                        }
                        description.consumer_status.as_str().clone_into(&mut status);
                    }
                }
                Err(e) if e.code() == Some("ResourceNotFoundException") => {
                    if self.lifecycle == ConsumerLifecycle::SelfManaged {
                        return Err(ConsumerError::NotFound);
                    }
                    status = "(not registered)".into();
                    self.register(client)?;
                }
                Err(e) => match classify(&e, "DescribeStreamConsumer") {
                    // 20 calls/s per stream, shared by every worker: wait and ask again.
                    SourceError::Throttled(_) => {}
                    other => return Err(ConsumerError::Call(other)),
                },
            }
            let waited = started.elapsed();
            if waited >= self.active_timeout {
                return Err(ConsumerError::NotActive {
                    status,
                    waited_ms: waited.as_millis() as u64,
                });
            }
            std::thread::sleep(DESCRIBE_INTERVAL);
        }
    }

    fn register(&self, client: &Client) -> Result<(), ConsumerError> {
        let request = client
            .register_stream_consumer()
            .stream_arn(&self.stream_arn)
            .consumer_name(&self.name);
        match block_on(request.send()) {
            Ok(_) => {
                tracing::info!(consumer = %self.name, stream = %self.stream_arn, "registered the enhanced fan-out consumer");
                self.state.lock().expect("consumer state").registered_here = true;
                Ok(())
            }
            // Registered meanwhile by another worker (or still being deleted): describe again.
            Err(e) if e.code() == Some("ResourceInUseException") => Ok(()),
            Err(e) => match classify(&e, "RegisterStreamConsumer") {
                SourceError::Throttled(_) => Ok(()),
                other => Err(ConsumerError::Call(other)),
            },
        }
    }

    /// Whether this process registered the consumer.
    pub(super) fn registered_here(&self) -> bool {
        self.state.lock().expect("consumer state").registered_here
    }

    fn arn_cached(&self) -> Option<String> {
        self.state.lock().expect("consumer state").arn.clone()
    }

    /// The consumer's ARN, resolving it again if it was forgotten.
    fn arn(&self, client: &Client, stream: &str) -> Result<String, SourceError> {
        match self.arn_cached() {
            Some(arn) => Ok(arn),
            None => self
                .resolve(client)
                .map_err(|e| e.into_source_error(&self.name, stream)),
        }
    }

    /// Forgets the ARN (the service no longer knows it: deregistered by someone else).
    fn forget(&self) {
        self.state.lock().expect("consumer state").arn = None;
    }

    /// Deregisters the consumer if this process registered it. Returns whether it did.
    pub(super) fn deregister_if_registered_here(&self, client: &Client) -> Result<bool, SourceError> {
        let mut state = self.state.lock().expect("consumer state");
        if !state.registered_here {
            return Ok(false);
        }
        let request = client
            .deregister_stream_consumer()
            .stream_arn(&self.stream_arn)
            .consumer_name(&self.name);
        match block_on(request.send()) {
            Ok(_) => {}
            Err(e) if e.code() == Some("ResourceNotFoundException") => {}
            Err(e) => return Err(classify(&e, "DeregisterStreamConsumer")),
        }
        state.registered_here = false;
        state.arn = None;
        tracing::info!(consumer = %self.name, stream = %self.stream_arn, "deregistered the enhanced fan-out consumer");
        Ok(true)
    }
}

/// What the pump task hands the reader.
enum Delivery {
    Event(SubscribeToShardEvent),
    /// The service ended the subscription (its 5-minute lifetime, or the shard's end).
    Completed,
    /// The stream failed; `true` if the service did not know the consumer or shard.
    Failed(SourceError, bool),
}

/// One open `SubscribeToShard` event stream and the task that pulls it.
struct Subscription {
    /// `None` only while a `next` call has it on the runtime.
    events: Option<tokio::sync::mpsc::Receiver<Delivery>>,
    pump: tokio::task::JoinHandle<()>,
    opened: Instant,
    /// Time spent waiting for an event since the last one arrived — only while the loop asks
    /// for records, so a loop held up by backpressure does not look like a silent subscription.
    waited_for_event: Duration,
}

impl Subscription {
    /// The next delivery, or `None` if none arrived within `wait`.
    fn next(&mut self, wait: Duration) -> Option<Delivery> {
        let mut events = self.events.take()?;
        let (events, got) = block_on(async move {
            let got = tokio::time::timeout(wait, events.recv()).await;
            (events, got)
        });
        self.events = Some(events);
        match got {
            Err(_elapsed) => None,
            Ok(Some(delivery)) => Some(delivery),
            Ok(None) => Some(Delivery::Failed(
                SourceError::Unavailable {
                    detail: "the subscription's event task ended".into(),
                    source: None,
                },
                false,
            )),
        }
    }
}

impl Drop for Subscription {
    /// Closes the event stream: the task owns it and is aborted (it holds nothing else).
    fn drop(&mut self) {
        self.pump.abort();
    }
}

/// Maps a failed `SubscribeToShard` call to a [`SourceError`] and whether the service did not
/// know the consumer or shard: `ResourceInUse` (the previous subscription of this consumer on the
/// shard is still open) and `LimitExceeded` are throttles.
fn subscribe_error<R: std::fmt::Debug>(error: &SdkError<SubscribeToShardError, R>) -> (SourceError, bool) {
    let service = error.as_service_error();
    let throttled = service.is_some_and(|e| e.is_resource_in_use_exception() || e.is_limit_exceeded_exception());
    let not_found = service.is_some_and(SubscribeToShardError::is_resource_not_found_exception);
    if throttled {
        (
            SourceError::Throttled(format!("SubscribeToShard: {}", DisplayErrorContext(error))),
            false,
        )
    } else {
        (classify(error, "SubscribeToShard"), not_found)
    }
}

/// The same for an error the event stream delivered. Its error metadata carries no code, so
/// the exception is matched by type.
fn event_stream_error<R: std::fmt::Debug>(
    error: &SdkError<SubscribeToShardEventStreamError, R>,
) -> (SourceError, bool) {
    let detail = || format!("SubscribeToShard event stream: {}", DisplayErrorContext(error));
    match error.as_service_error() {
        Some(e) if e.is_resource_in_use_exception() || e.is_kms_throttling_exception() => {
            (SourceError::Throttled(detail()), false)
        }
        Some(e) if e.is_resource_not_found_exception() => (
            SourceError::Unavailable {
                detail: detail(),
                source: None,
            },
            true,
        ),
        Some(e)
            if e.is_kms_access_denied_exception()
                || e.is_kms_disabled_exception()
                || e.is_kms_not_found_exception() =>
        {
            (SourceError::Invalid(detail()), false)
        }
        _ => (
            SourceError::Unavailable {
                detail: detail(),
                source: None,
            },
            false,
        ),
    }
}

/// Reads one shard through enhanced fan-out: see the [module docs](self).
pub(super) struct FanOutShardReader {
    inner: Arc<Inner>,
    consumer: Arc<FanOutConsumer>,
    shard: Arc<str>,
    /// Where this reader was opened.
    start: StartingPosition,
    /// What the current subscription delivers again at its start.
    skip: Skip,
    subscription: Option<Subscription>,
    /// Records received but not yet returned (`read` asked for fewer).
    pending: VecDeque<Record>,
    /// The shard's end arrived; reported once `pending` is empty.
    pending_end: Option<Vec<Arc<str>>>,
    /// The position of the last record received.
    last_received: Option<Position>,
    /// The latest event's continuation sequence number.
    continuation: Option<SequenceNumber>,
    millis_behind_latest: Option<i64>,
    last_end_check: Option<Instant>,
    ended: bool,
}

impl FanOutShardReader {
    pub(super) fn open(
        inner: Arc<Inner>,
        consumer: Arc<FanOutConsumer>,
        shard_id: &str,
        start: &StartingPosition,
    ) -> Result<Self, SourceError> {
        let mut reader = Self {
            inner,
            consumer,
            shard: Arc::from(shard_id),
            start: start.clone(),
            skip: Skip::from_start(start),
            subscription: None,
            pending: VecDeque::new(),
            pending_end: None,
            last_received: None,
            continuation: None,
            millis_behind_latest: None,
            last_end_check: None,
            ended: false,
        };
        reader.subscribe()?;
        Ok(reader)
    }

    /// The position right after everything received: where the next subscription starts.
    fn resubscribe_position(&self) -> StartingPosition {
        let after_continuation =
            |c: &SequenceNumber| StartingPosition::AfterPosition(Position::new(c.clone(), u64::MAX));
        match (&self.last_received, &self.continuation) {
            (Some(last), Some(c)) if *c > last.sequence => after_continuation(c),
            (Some(last), _) => StartingPosition::AfterPosition(last.clone()),
            // Nothing received yet: the start is exact, except where it names no position.
            (None, Some(c)) if matches!(self.start, StartingPosition::Latest | StartingPosition::AtTimestamp(_)) => {
                after_continuation(c)
            }
            (None, _) => self.start.clone(),
        }
    }

    fn subscribe(&mut self) -> Result<(), SourceError> {
        let position = self.resubscribe_position();
        let arn = self.consumer.arn(&self.inner.client, &self.inner.stream)?;
        let (kind, sequence, timestamp) = iterator_start(&position);
        let starting = aws_sdk_kinesis::types::StartingPosition::builder()
            .r#type(kind)
            .set_sequence_number(sequence)
            .set_timestamp(timestamp)
            .build()
            .map_err(|e| SourceError::Invalid(format!("SubscribeToShard starting position: {e}")))?;
        let request = self
            .inner
            .client
            .subscribe_to_shard()
            .consumer_arn(arn)
            .shard_id(&*self.shard)
            .starting_position(starting);
        bump(&self.inner.metrics.subscriptions, 1);
        let output = match block_on(request.send()) {
            Ok(output) => output,
            Err(e) => {
                let (error, not_found) = subscribe_error(&e);
                return Err(self.failed(error, not_found));
            }
        };
        let (tx, rx) = tokio::sync::mpsc::channel(1);
        let mut stream = output.event_stream;
        let pump = spawn(async move {
            loop {
                let delivery = match stream.recv().await {
                    Ok(Some(SubscribeToShardEventStream::SubscribeToShardEvent(event))) => Delivery::Event(event),
                    Ok(Some(_)) => continue, // an event type this SDK does not know
                    Ok(None) => Delivery::Completed,
                    Err(e) => {
                        let (error, not_found) = event_stream_error(&e);
                        Delivery::Failed(error, not_found)
                    }
                };
                let last = !matches!(delivery, Delivery::Event(_));
                if tx.send(delivery).await.is_err() || last {
                    return;
                }
            }
        });
        tracing::debug!(stream = %self.inner.stream, shard = %self.shard, ?position, "subscribed");
        self.skip = Skip::from_start(&position);
        self.subscription = Some(Subscription {
            events: Some(rx),
            pump,
            opened: Instant::now(),
            waited_for_event: Duration::ZERO,
        });
        Ok(())
    }

    /// Counts a failed subscription and returns its error. After `ResourceNotFound` the consumer
    /// may have been deregistered (another worker's graceful stop, an operator): it is resolved
    /// again — and registered again if the lifecycle allows — before the next subscription.
    fn failed(&mut self, error: SourceError, not_found: bool) -> SourceError {
        self.subscription = None;
        bump(&self.inner.metrics.subscription_errors, 1);
        if not_found {
            self.consumer.forget();
        }
        self.inner.note(error)
    }

    /// Returns up to `max_records` pending records (and the shard's end once none are left).
    fn take_pending(&mut self, max_records: usize) -> ReadBatch {
        let n = max_records.max(1).min(self.pending.len());
        let records: Vec<Record> = self.pending.drain(..n).collect();
        let end_of_shard = if self.pending.is_empty() {
            self.pending_end.take()
        } else {
            None
        };
        self.ended = end_of_shard.is_some();
        ReadBatch {
            records,
            end_of_shard,
            millis_behind_latest: self.millis_behind_latest,
            timed_out: false,
        }
    }

    fn on_event(&mut self, event: SubscribeToShardEvent, max_records: usize) -> Result<ReadBatch, SourceError> {
        let metrics = &self.inner.metrics;
        bump(&metrics.fan_out_events, 1);
        let kinesis_records = event.records.len();
        let (mut records, bytes) = self.inner.user_records(&self.shard, event.records)?;
        bump(&metrics.kinesis_records_read, kinesis_records as u64);
        bump(&metrics.bytes_read, bytes as u64);
        if let Some(last) = records.last() {
            self.last_received = Some(last.position.clone());
        }
        self.skip.apply(&mut records);
        if !event.continuation_sequence_number.is_empty() {
            let c = SequenceNumber::parse(&event.continuation_sequence_number).map_err(|e| {
                SourceError::Invalid(format!(
                    "SubscribeToShard on {}/{} returned continuation sequence number {:?}: {e}",
                    self.inner.stream, self.shard, event.continuation_sequence_number
                ))
            })?;
            self.continuation = Some(c);
        }
        self.millis_behind_latest = Some(event.millis_behind_latest);
        if let Some(children) = event.child_shards.filter(|c| !c.is_empty()) {
            self.pending_end = Some(children.iter().map(|c| Arc::from(c.shard_id())).collect());
        }
        let idle = records.is_empty() && self.pending_end.is_none();
        self.pending.extend(records);
        if idle && kinesis_records == 0 {
            self.check_end()?;
        }
        Ok(self.take_pending(max_records))
    }

    /// The fallback for a source that never sends `ChildShards` in events: at most every
    /// `end_check_interval_ms`, asks `ListShards` whether the shard is closed and, if it is,
    /// whether `GetRecords` after this reader's position finds nothing but the shard's end.
    fn check_end(&mut self) -> Result<(), SourceError> {
        let interval = Duration::from_millis(self.inner.config.fan_out.end_check_interval_ms);
        if self.last_end_check.is_some_and(|t| t.elapsed() < interval) {
            return Ok(());
        }
        self.last_end_check = Some(Instant::now());
        let closed = self
            .inner
            .list_shards()?
            .iter()
            .any(|s| s.shard_id == self.shard && s.is_closed());
        if !closed {
            return Ok(());
        }
        bump(&self.inner.metrics.fan_out_end_checks, 1);
        let position = self.resubscribe_position();
        let iterator = self.inner.shard_iterator(&self.shard, &position)?;
        let page = self.inner.get_records(&self.shard, &iterator, 100, false)?;
        let mut records = page.records;
        Skip::from_start(&position).apply(&mut records);
        if records.is_empty()
            && let Some(children) = page.children
        {
            let children = if children.is_empty() {
                self.inner.children_of(&self.shard)?
            } else {
                children
            };
            tracing::debug!(stream = %self.inner.stream, shard = %self.shard, ?children,
                "the closed shard is read to its end (no ChildShards event from the subscription)");
            self.pending_end = Some(children);
        }
        Ok(())
    }
}

impl ShardReader for FanOutShardReader {
    fn read(&mut self, max_records: usize) -> Result<ReadBatch, SourceError> {
        if self.ended {
            return Err(SourceError::Invalid(format!(
                "shard {}/{} was already read to its end",
                self.inner.stream, self.shard
            )));
        }
        if !self.pending.is_empty() || self.pending_end.is_some() {
            return Ok(self.take_pending(max_records));
        }
        let settings = &self.inner.config.fan_out;
        let renew_after = Duration::from_millis(settings.renew_subscription_after_ms);
        let event_timeout = Duration::from_millis(settings.event_timeout_ms);
        if let Some(subscription) = &self.subscription {
            if subscription.opened.elapsed() >= renew_after {
                // Before the service's 5-minute expiry, at an event boundary.
                bump(&self.inner.metrics.subscription_renewals, 1);
                self.subscription = None;
            } else if subscription.waited_for_event >= event_timeout {
                tracing::warn!(stream = %self.inner.stream, shard = %self.shard, timeout_ms = settings.event_timeout_ms,
                    "no event from the subscription within the event timeout; subscribing again");
                bump(&self.inner.metrics.subscription_errors, 1);
                bump(&self.inner.metrics.silent_subscriptions, 1);
                self.subscription = None;
            }
        }
        if self.subscription.is_none() {
            self.subscribe()?;
        }
        let subscription = self.subscription.as_mut().expect("subscribed");
        let waiting = Instant::now();
        let Some(delivery) = subscription.next(EVENT_WAIT) else {
            subscription.waited_for_event += waiting.elapsed();
            return Ok(ReadBatch {
                timed_out: true,
                ..ReadBatch::default()
            });
        };
        subscription.waited_for_event = Duration::ZERO;
        match delivery {
            Delivery::Event(event) => self.on_event(event, max_records),
            Delivery::Completed => {
                // The service's 5-minute lifetime ended: continue in a new subscription.
                bump(&self.inner.metrics.subscription_renewals, 1);
                self.subscription = None;
                Ok(ReadBatch {
                    timed_out: true,
                    ..ReadBatch::default()
                })
            }
            Delivery::Failed(error, not_found) => Err(self.failed(error, not_found)),
        }
    }

    fn resume_position(&self) -> Option<StartingPosition> {
        // Records received but not returned are not the loop's yet: it resumes after what it got.
        self.pending.is_empty().then(|| self.resubscribe_position())
    }
}
