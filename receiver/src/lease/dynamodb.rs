//! The `DynamoDB` lease store: the KCL lease table, so Sluice workers and Java KCL workers can
//! share (or migrate) one application's table.
//!
//! Every mutation is a compare-and-swap on `leaseCounter`: the store reads the item (strongly
//! consistent), applies the [`LeaseStore`] contract's rules to it (owner and counter fence,
//! monotonic checkpoints), and writes the whole item back with the condition
//! `leaseCounter = :seen`. Any successful write bumps the counter, so the condition also fences
//! against every write that happened between the read and the put. Attributes this store does not
//! know (written by a KCL 3.x worker: `checkpointOwner`, `throughputKBps`, `pending*`, …) are
//! read back and written unchanged.
//!
//! Throttling and transient failures are retried here with capped exponential backoff and
//! jitter ([`DynamoLeaseOptions`]; KCL's defaults: 10 retries, 1 s); the SDK's own retries are off
//! so every retry is counted in [`DynamoLeaseMetrics`]. A write whose outcome is unknown (timeout
//! after sending) and whose retry then fails its condition is resolved by reading the item: if it
//! holds exactly what was written, the write succeeded.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::Client;
use aws_sdk_dynamodb::error::{DisplayErrorContext, ProvideErrorMetadata, SdkError};
use aws_sdk_dynamodb::types::{
    AttributeDefinition, AttributeValue, BillingMode, KeySchemaElement, KeyType, ScalarAttributeType, TableStatus,
};

use super::{Checkpoint, Lease, LeaseError, LeaseFence, LeaseKind, LeaseStore, rules};
use crate::ConfigError;
use crate::aws::{AwsSettings, block_on};

type Item = HashMap<String, AttributeValue>;

/// `entityType` of shard leases (KCL 3.5's value).
const SHARD_ENTITY: &str = "LEASE";
/// `entityType` of Sluice worker leases; KCL workers skip items of other entity types.
const WORKER_ENTITY: &str = "SLUICE_WORKER";

/// Retry and table options of a [`DynamoLeaseStore`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DynamoLeaseOptions {
    /// Retries of a throttled or failed call before it returns an error (KCL default 10).
    pub max_retries: u32,
    /// First backoff (ms); doubles per retry, capped at 10× this, with jitter (KCL default 1 s).
    pub retry_delay_ms: u64,
    /// How long `connect` waits for a new table to become `ACTIVE` (ms).
    pub table_active_timeout_ms: u64,
}

impl DynamoLeaseOptions {
    /// Default retries.
    pub const DEFAULT_MAX_RETRIES: u32 = 10;
    /// Default first backoff.
    pub const DEFAULT_RETRY_DELAY_MS: u64 = 1_000;
    /// Default wait for a new table.
    pub const DEFAULT_TABLE_ACTIVE_TIMEOUT_MS: u64 = 120_000;
}

impl Default for DynamoLeaseOptions {
    fn default() -> Self {
        Self {
            max_retries: Self::DEFAULT_MAX_RETRIES,
            retry_delay_ms: Self::DEFAULT_RETRY_DELAY_MS,
            table_active_timeout_ms: Self::DEFAULT_TABLE_ACTIVE_TIMEOUT_MS,
        }
    }
}

/// A snapshot of a [`DynamoLeaseStore`]'s counters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DynamoLeaseMetrics {
    /// `DynamoDB` calls made (retries included).
    pub calls: u64,
    /// Calls `DynamoDB` throttled.
    pub throttles: u64,
    /// Calls retried (throttled or transient failures).
    pub retries: u64,
    /// Conditional writes whose condition failed (the lease had moved on).
    pub condition_failures: u64,
}

impl DynamoLeaseMetrics {
    /// Every counter, named and explained, as the engine exports them
    /// (`sluice_lease_store_<name>_total{stream=…}`).
    pub fn counters(&self) -> Vec<crate::NamedCounter> {
        use crate::NamedCounter;
        vec![
            NamedCounter::new(
                "calls",
                "DynamoDB calls made by the lease store (retries included).",
                self.calls,
            ),
            NamedCounter::new(
                "throttles",
                "DynamoDB calls of the lease store that were throttled.",
                self.throttles,
            ),
            NamedCounter::new(
                "retries",
                "DynamoDB calls retried (throttled or transient failures).",
                self.retries,
            ),
            NamedCounter::new(
                "condition_failures",
                "Conditional lease writes whose condition failed (the lease had moved on).",
                self.condition_failures,
            ),
        ]
    }
}

#[derive(Debug, Default)]
struct MetricsCells {
    calls: AtomicU64,
    throttles: AtomicU64,
    retries: AtomicU64,
    condition_failures: AtomicU64,
}

/// Why [`DynamoLeaseStore::connect`] failed. Each message names the fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DynamoConnectError {
    /// A configuration value is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// `DynamoDB` could not be reached.
    #[error(
        "cannot reach DynamoDB at {endpoint}: {detail}; check the region, the endpoint override \
         (`dynamodb_endpoint` / AWS_ENDPOINT_URL_DYNAMODB), credentials and the network"
    )]
    Unreachable {
        /// The endpoint used.
        endpoint: String,
        /// What failed.
        detail: String,
    },
    /// The table could not be created or read.
    #[error(transparent)]
    Lease(#[from] LeaseError),
}

/// Leases and checkpoints in a `DynamoDB` table with the KCL schema.
#[derive(Debug)]
pub struct DynamoLeaseStore {
    client: Client,
    table: String,
    options: DynamoLeaseOptions,
    metrics: MetricsCells,
}

/// What a failed call means for the retry loop.
enum Failure {
    /// Retry after a backoff; `ambiguous`: the request may have been applied.
    Retry { error: LeaseError, ambiguous: bool },
    /// The write's condition did not hold.
    Condition,
    /// Give up with this error.
    Fatal(LeaseError),
}

impl DynamoLeaseStore {
    /// Connects to the lease table `table_name` (the application name), creating it on demand
    /// (on-demand billing, hash key `leaseKey`) and waiting until it is active.
    ///
    /// # Errors
    /// [`DynamoConnectError`]: an invalid table name or settings, an unreachable endpoint, a
    /// table that cannot be created.
    pub fn connect(
        settings: &AwsSettings,
        table_name: &str,
        options: DynamoLeaseOptions,
    ) -> Result<Self, DynamoConnectError> {
        validate_table_name(table_name)?;
        let sdk = settings.load()?;
        let store = Self {
            client: settings.dynamodb_client(&sdk),
            table: table_name.to_owned(),
            options,
            metrics: MetricsCells::default(),
        };
        let endpoint = settings.endpoint_of("dynamodb", &sdk);
        store.ensure_table(&endpoint)?;
        Ok(store)
    }

    /// The table name.
    pub fn table_name(&self) -> &str {
        &self.table
    }

    /// The store's counters.
    pub fn metrics(&self) -> DynamoLeaseMetrics {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        DynamoLeaseMetrics {
            calls: get(&self.metrics.calls),
            throttles: get(&self.metrics.throttles),
            retries: get(&self.metrics.retries),
            condition_failures: get(&self.metrics.condition_failures),
        }
    }

    fn ensure_table(&self, endpoint: &str) -> Result<(), DynamoConnectError> {
        let unreachable = |e: &dyn std::fmt::Display| DynamoConnectError::Unreachable {
            endpoint: endpoint.to_owned(),
            detail: e.to_string(),
        };
        let describe = || block_on(self.client.describe_table().table_name(&self.table).send()).map_err(Box::new);
        match describe() {
            Ok(_) => {}
            Err(e) if matches!(*e, SdkError::DispatchFailure(_) | SdkError::TimeoutError(_)) => {
                return Err(unreachable(&DisplayErrorContext(&*e)));
            }
            Err(e) if e.code() == Some("ResourceNotFoundException") => {
                let create = self
                    .client
                    .create_table()
                    .table_name(&self.table)
                    .billing_mode(BillingMode::PayPerRequest)
                    .key_schema(
                        KeySchemaElement::builder()
                            .attribute_name("leaseKey")
                            .key_type(KeyType::Hash)
                            .build()
                            .expect("name and type are set"),
                    )
                    .attribute_definitions(
                        AttributeDefinition::builder()
                            .attribute_name("leaseKey")
                            .attribute_type(ScalarAttributeType::S)
                            .build()
                            .expect("name and type are set"),
                    );
                match block_on(create.send()) {
                    Ok(_) => tracing::info!(table = %self.table, "created the lease table (on-demand billing)"),
                    // Another worker created it first.
                    Err(e) if e.code() == Some("ResourceInUseException") => {}
                    Err(e) => return Err(unavailable("CreateTable", &e).into()),
                }
            }
            Err(e) => return Err(unavailable("DescribeTable", &e).into()),
        }
        let deadline = Instant::now() + Duration::from_millis(self.options.table_active_timeout_ms);
        loop {
            let out = describe().map_err(|e| unavailable("DescribeTable", &*e))?;
            if out.table().and_then(|t| t.table_status()) == Some(&TableStatus::Active) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(LeaseError::Unavailable {
                    detail: format!(
                        "lease table {} is not ACTIVE after {:?}",
                        self.table,
                        deadline.elapsed()
                    ),
                    source: None,
                }
                .into());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Runs `call` with the retry policy. `Ok(None)` means the condition failed.
    fn with_retries<T>(
        &self,
        what: &str,
        mut call: impl FnMut() -> Result<T, Failure>,
        mut resolve_ambiguous: impl FnMut() -> Result<Option<T>, LeaseError>,
    ) -> Result<Option<T>, LeaseError> {
        let mut ambiguous_before = false;
        for attempt in 0..=self.options.max_retries {
            if attempt > 0 {
                self.metrics.retries.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(self.backoff(attempt));
            }
            self.metrics.calls.fetch_add(1, Ordering::Relaxed);
            match call() {
                Ok(value) => return Ok(Some(value)),
                Err(Failure::Condition) => {
                    self.metrics.condition_failures.fetch_add(1, Ordering::Relaxed);
                    if ambiguous_before && let Some(value) = resolve_ambiguous()? {
                        return Ok(Some(value));
                    }
                    return Ok(None);
                }
                Err(Failure::Fatal(error)) => return Err(error),
                Err(Failure::Retry { error, ambiguous }) => {
                    ambiguous_before |= ambiguous;
                    if matches!(error, LeaseError::Throttled { .. }) {
                        self.metrics.throttles.fetch_add(1, Ordering::Relaxed);
                    }
                    tracing::warn!(table = %self.table, what, attempt, error = %error, "lease store call failed; retrying");
                    if attempt == self.options.max_retries {
                        return Err(error);
                    }
                }
            }
        }
        unreachable!("the loop returns on its last attempt")
    }

    fn backoff(&self, attempt: u32) -> Duration {
        let base = self.options.retry_delay_ms;
        let capped = base
            .saturating_mul(1 << (attempt - 1).min(10))
            .min(base.saturating_mul(10));
        let half = capped / 2;
        let random = std::hash::BuildHasher::hash_one(&std::hash::RandomState::new(), (attempt, Instant::now()));
        Duration::from_millis(half + random % (capped - half + 1))
    }

    /// Reads one item (strongly consistent), retrying transient failures.
    fn read_item(&self, lease_key: &str) -> Result<Option<Item>, LeaseError> {
        let got = self.with_retries(
            "GetItem",
            || {
                let request = self
                    .client
                    .get_item()
                    .table_name(&self.table)
                    .key("leaseKey", AttributeValue::S(lease_key.to_owned()))
                    .consistent_read(true);
                block_on(request.send())
                    .map(|out| out.item)
                    .map_err(|e| failure("GetItem", &e))
            },
            || Ok(None),
        )?;
        Ok(got.flatten())
    }

    /// Puts `item` if the stored counter is still `seen_counter` (or, with `None`, if no item
    /// with its key exists). `Ok(false)`: the condition failed.
    fn put_item(&self, item: &Item, seen_counter: Option<u64>) -> Result<bool, LeaseError> {
        let key = item_key(item);
        let written = self.with_retries(
            "PutItem",
            || {
                let mut request = self
                    .client
                    .put_item()
                    .table_name(&self.table)
                    .set_item(Some(item.clone()));
                request = match seen_counter {
                    None => request.condition_expression("attribute_not_exists(leaseKey)"),
                    Some(counter) => request
                        .condition_expression("leaseCounter = :seen")
                        .expression_attribute_values(":seen", number(counter)),
                };
                block_on(request.send()).map(|_| ()).map_err(|e| failure("PutItem", &e))
            },
            // A retried put whose condition failed: did the first attempt land?
            || {
                Ok(self
                    .read_item(&key)?
                    .filter(|stored| same_lease(stored, item))
                    .map(|_| ()))
            },
        )?;
        Ok(written.is_some())
    }

    /// Read, apply `change` to the lease, write back conditional on the counter read.
    fn update(
        &self,
        lease_key: &str,
        change: impl FnOnce(&mut Lease) -> Result<(), LeaseError>,
    ) -> Result<Lease, LeaseError> {
        let Some(mut item) = self.read_item(lease_key)? else {
            return Err(LeaseError::NotFound {
                lease_key: lease_key.to_owned(),
            });
        };
        let mut lease = from_item(&item)?;
        let seen = lease.lease_counter;
        change(&mut lease)?;
        write_lease(&mut item, &lease);
        if self.put_item(&item, Some(seen))? {
            Ok(lease)
        } else {
            let now = self.read_item(lease_key)?.map(|i| from_item(&i)).transpose()?;
            Err(LeaseError::ConditionFailed {
                lease_key: lease_key.to_owned(),
                detail: match now {
                    Some(now) => format!(
                        "expected counter {seen}, found {} (owner {})",
                        now.lease_counter,
                        now.lease_owner.as_deref().unwrap_or("(none)")
                    ),
                    None => "the lease was deleted".to_owned(),
                },
            })
        }
    }
}

impl LeaseStore for DynamoLeaseStore {
    fn counters(&self) -> Vec<crate::NamedCounter> {
        self.metrics().counters()
    }

    fn create_lease_if_absent(&self, lease: &Lease) -> Result<bool, LeaseError> {
        let mut item = Item::new();
        write_lease(&mut item, lease);
        self.put_item(&item, None)
    }

    fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>, LeaseError> {
        self.read_item(lease_key)?.map(|i| from_item(&i)).transpose()
    }

    fn list_leases(&self) -> Result<Vec<Lease>, LeaseError> {
        let mut leases = Vec::new();
        let mut start: Option<Item> = None;
        loop {
            let page = self
                .with_retries(
                    "Scan",
                    || {
                        let request = self
                            .client
                            .scan()
                            .table_name(&self.table)
                            .consistent_read(true)
                            .set_exclusive_start_key(start.clone());
                        block_on(request.send()).map_err(|e| failure("Scan", &e))
                    },
                    || Ok(None),
                )?
                .expect("a scan has no condition");
            for item in page.items() {
                // KCL 3.x tables may hold other entities; only shard and worker leases are ours.
                if item
                    .get("entityType")
                    .and_then(|v| v.as_s().ok())
                    .is_none_or(|t| t == SHARD_ENTITY || t == WORKER_ENTITY)
                {
                    leases.push(from_item(item)?);
                }
            }
            match page.last_evaluated_key {
                Some(key) if !key.is_empty() => start = Some(key),
                _ => break,
            }
        }
        leases.sort_by(|a, b| a.lease_key.cmp(&b.lease_key));
        Ok(leases)
    }

    fn take_lease(&self, lease_key: &str, expected_counter: u64, new_owner: &str) -> Result<Lease, LeaseError> {
        self.update(lease_key, |lease| rules::take(lease, expected_counter, new_owner))
    }

    fn adopt_lease(
        &self,
        lease_key: &str,
        expected_counter: u64,
        new_owner: &str,
        floor: &Checkpoint,
    ) -> Result<Lease, LeaseError> {
        self.update(lease_key, |lease| {
            rules::adopt(lease, expected_counter, new_owner, floor)
        })
    }

    fn renew_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<Lease, LeaseError> {
        self.update(lease_key, |lease| rules::renew(lease, fence))
    }

    fn checkpoint(&self, lease_key: &str, fence: &LeaseFence, checkpoint: &Checkpoint) -> Result<Lease, LeaseError> {
        self.update(lease_key, |lease| rules::checkpoint(lease, fence, checkpoint))
    }

    fn mark_shard_end(
        &self,
        lease_key: &str,
        fence: &LeaseFence,
        child_shard_ids: &[String],
    ) -> Result<Lease, LeaseError> {
        self.update(lease_key, |lease| rules::shard_end(lease, fence, child_shard_ids))
    }

    fn release_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<Lease, LeaseError> {
        self.update(lease_key, |lease| rules::release(lease, fence))
    }
}

/// `DynamoDB` table names: 3–255 characters of `a-z A-Z 0-9 _ . -`.
fn validate_table_name(name: &str) -> Result<(), ConfigError> {
    if (3..=255).contains(&name.len()) && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b)) {
        Ok(())
    } else {
        Err(ConfigError::new(
            "application_name",
            format!(
                "{name:?} cannot name the DynamoDB lease table: use 3-255 characters of a-z, A-Z, 0-9, '_', '.', '-'"
            ),
        ))
    }
}

fn classify<E, R>(call: &str, err: &SdkError<E, R>) -> (LeaseError, bool, bool)
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    // (error, retryable, ambiguous: the request may have been applied)
    let detail = format!("{call}: {}", DisplayErrorContext(err));
    match err {
        SdkError::TimeoutError(_) | SdkError::ResponseError(_) => {
            return (LeaseError::Unavailable { detail, source: None }, true, true);
        }
        SdkError::DispatchFailure(_) => return (LeaseError::Unavailable { detail, source: None }, true, false),
        _ => {}
    }
    match err.code() {
        Some(
            "ProvisionedThroughputExceededException"
            | "ThrottlingException"
            | "RequestLimitExceeded"
            | "LimitExceededException",
        ) => (LeaseError::Throttled { detail }, true, false),
        Some("InternalServerError" | "ServiceUnavailable") => {
            (LeaseError::Unavailable { detail, source: None }, true, true)
        }
        _ => (LeaseError::Unavailable { detail, source: None }, false, false),
    }
}

fn failure<E, R>(call: &str, err: &SdkError<E, R>) -> Failure
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    if err.code() == Some("ConditionalCheckFailedException") {
        return Failure::Condition;
    }
    match classify(call, err) {
        (error, true, ambiguous) => Failure::Retry { error, ambiguous },
        (error, false, _) => Failure::Fatal(error),
    }
}

fn unavailable<E, R>(call: &str, err: &SdkError<E, R>) -> LeaseError
where
    E: ProvideErrorMetadata + std::error::Error + 'static,
    R: std::fmt::Debug,
{
    classify(call, err).0
}

fn number(n: u64) -> AttributeValue {
    AttributeValue::N(n.to_string())
}

fn item_key(item: &Item) -> String {
    item.get("leaseKey")
        .and_then(|v| v.as_s().ok())
        .cloned()
        .unwrap_or_default()
}

/// Whether `stored` holds the lease `written` describes (for resolving an ambiguous write).
fn same_lease(stored: &Item, written: &Item) -> bool {
    matches!((from_item(stored), from_item(written)), (Ok(a), Ok(b)) if a == b)
}

/// Writes the lease's attributes into `item`, keeping attributes this store does not own.
fn write_lease(item: &mut Item, lease: &Lease) {
    let (checkpoint, sub) = lease.checkpoint.to_kcl();
    item.insert("leaseKey".into(), AttributeValue::S(lease.lease_key.clone()));
    match &lease.lease_owner {
        Some(owner) => item.insert("leaseOwner".into(), AttributeValue::S(owner.clone())),
        None => item.remove("leaseOwner"),
    };
    item.insert("leaseCounter".into(), number(lease.lease_counter));
    item.insert("checkpoint".into(), AttributeValue::S(checkpoint));
    item.insert("checkpointSubSequenceNumber".into(), number(sub));
    item.insert(
        "ownerSwitchesSinceCheckpoint".into(),
        number(lease.owner_switches_since_checkpoint),
    );
    // A multi-stream lease (`account:stream:epoch:shardId`) is stored as KCL's
    // `MultiStreamLease`: the stream identifier in `streamName`, the shard in `shardId`, and
    // parents and children as plain shard ids of the same stream.
    let stream = match (lease.kind, crate::lease::split_multi_stream_key(&lease.lease_key)) {
        (LeaseKind::Shard, Some((stream, shard))) => {
            item.insert("streamName".into(), AttributeValue::S(stream.to_owned()));
            item.insert("shardId".into(), AttributeValue::S(shard.to_owned()));
            Some(format!("{stream}:"))
        }
        _ => None,
    };
    let plain = |id: &String| match &stream {
        Some(prefix) => id.strip_prefix(prefix.as_str()).unwrap_or(id).to_owned(),
        None => id.clone(),
    };
    // DynamoDB rejects empty sets: an empty set is an absent attribute.
    for (name, set) in [
        ("parentShardId", &lease.parent_shard_ids),
        ("childShardIds", &lease.child_shard_ids),
    ] {
        if set.is_empty() {
            item.remove(name);
        } else {
            item.insert(name.into(), AttributeValue::Ss(set.iter().map(plain).collect()));
        }
    }
    if let Some((start, end)) = lease.hash_key_range {
        item.insert("startingHashKey".into(), AttributeValue::S(start.to_string()));
        item.insert("endingHashKey".into(), AttributeValue::S(end.to_string()));
    } else {
        item.remove("startingHashKey");
        item.remove("endingHashKey");
    }
    let entity = match lease.kind {
        LeaseKind::Shard => SHARD_ENTITY,
        LeaseKind::Worker => WORKER_ENTITY,
    };
    item.insert("entityType".into(), AttributeValue::S(entity.into()));
}

fn from_item(item: &Item) -> Result<Lease, LeaseError> {
    let key = item_key(item);
    let corrupt = |what: &str| LeaseError::Corrupt {
        location: format!("lease {key:?}"),
        detail: what.to_owned(),
    };
    let s = |name: &str| item.get(name).and_then(|v| v.as_s().ok());
    let n = |name: &str| -> Result<u64, LeaseError> {
        match item.get(name) {
            None => Ok(0),
            Some(v) => v
                .as_n()
                .ok()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| corrupt(&format!("{name} is not a non-negative number"))),
        }
    };
    // Parents and children of a multi-stream lease are stored as plain shard ids of its stream.
    let stream_prefix = s("streamName")
        .filter(|stream| key.starts_with(&format!("{stream}:")))
        .map(|stream| format!("{stream}:"));
    let set = |name: &str| -> BTreeSet<String> {
        item.get(name)
            .and_then(|v| v.as_ss().ok())
            .map(|v| {
                v.iter()
                    .map(|id| match &stream_prefix {
                        Some(prefix) if !id.starts_with(prefix.as_str()) => format!("{prefix}{id}"),
                        _ => id.clone(),
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    if key.is_empty() {
        return Err(corrupt("no leaseKey"));
    }
    let checkpoint = Checkpoint::from_kcl(
        s("checkpoint").map_or("TRIM_HORIZON", String::as_str),
        n("checkpointSubSequenceNumber")?,
    )?;
    let hash_key_range = match (s("startingHashKey"), s("endingHashKey")) {
        (Some(a), Some(b)) => Some((
            a.parse()
                .map_err(|_| corrupt("startingHashKey is not a decimal u128"))?,
            b.parse().map_err(|_| corrupt("endingHashKey is not a decimal u128"))?,
        )),
        _ => None,
    };
    let kind = match s("entityType").map(String::as_str) {
        Some(WORKER_ENTITY) => LeaseKind::Worker,
        _ => LeaseKind::Shard,
    };
    Ok(Lease {
        kind,
        lease_owner: s("leaseOwner").cloned(),
        lease_counter: n("leaseCounter")?,
        checkpoint,
        owner_switches_since_checkpoint: n("ownerSwitchesSinceCheckpoint")?,
        parent_shard_ids: set("parentShardId"),
        child_shard_ids: set("childShardIds"),
        hash_key_range,
        lease_key: key,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_round_trip_and_keep_foreign_attributes() {
        let mut lease = Lease::new("shardId-000000000001", Checkpoint::TrimHorizon);
        lease.lease_owner = Some("w1".into());
        lease.lease_counter = 7;
        lease.parent_shard_ids.insert("shardId-000000000000".into());
        lease.hash_key_range = Some((0, u128::MAX));
        let mut item = Item::new();
        item.insert("throughputKBps".into(), AttributeValue::N("12".into()));
        write_lease(&mut item, &lease);
        assert_eq!(from_item(&item).unwrap(), lease);
        assert!(item.contains_key("throughputKBps"));
        assert!(!item.contains_key("childShardIds"), "empty sets are absent");
        lease.lease_owner = None;
        write_lease(&mut item, &lease);
        assert!(!item.contains_key("leaseOwner"));
    }

    #[test]
    fn multi_stream_leases_are_stored_like_kcl_multi_stream_leases() {
        let stream = "123456789012:clicks:1700000000";
        let mut lease = Lease::new(format!("{stream}:shardId-000000000003"), Checkpoint::TrimHorizon);
        lease.parent_shard_ids.insert(format!("{stream}:shardId-000000000001"));
        lease.child_shard_ids.insert(format!("{stream}:shardId-000000000007"));
        let mut item = Item::new();
        write_lease(&mut item, &lease);
        let s = |name: &str| item.get(name).and_then(|v| v.as_s().ok()).cloned();
        assert_eq!(
            s("leaseKey").as_deref(),
            Some("123456789012:clicks:1700000000:shardId-000000000003")
        );
        assert_eq!(s("streamName").as_deref(), Some(stream));
        assert_eq!(s("shardId").as_deref(), Some("shardId-000000000003"));
        assert_eq!(
            item.get("parentShardId").and_then(|v| v.as_ss().ok()).unwrap(),
            &vec!["shardId-000000000001".to_owned()]
        );
        assert_eq!(from_item(&item).unwrap(), lease);
        // A plain lease gets neither attribute.
        let mut item = Item::new();
        write_lease(&mut item, &Lease::new("shardId-000000000003", Checkpoint::TrimHorizon));
        assert!(!item.contains_key("streamName") && !item.contains_key("shardId"));
    }

    #[test]
    fn table_names() {
        assert!(validate_table_name("my-app.v2_x").is_ok());
        assert_eq!(validate_table_name("ab").unwrap_err().field, "application_name");
        assert!(validate_table_name("has space").is_err());
    }
}
