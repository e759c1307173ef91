//! The `DynamoDB` lease store on moto (started by `scripts/with-emulators`, which exports
//! `SLUICE_MOTO_ENDPOINT`): the whole `LeaseStore` conformance suite, the KCL item schema, table
//! creation with on-demand billing, fast failures for bad configuration, and throttling retried
//! (visibly) or reported without changing anything.
#![cfg(feature = "kinesis")]

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use sluice_blockstore::{Position, SequenceNumber};
use sluice_receiver::testing::{FaultProxy, FaultResponse, lease_store_conformance};
use sluice_receiver::{
    AwsSettings, Checkpoint, DynamoConnectError, DynamoLeaseOptions, DynamoLeaseStore, Lease, LeaseError, LeaseStore,
};

mod emulators;

fn moto() -> String {
    emulators::env("SLUICE_MOTO_ENDPOINT")
}

fn settings(endpoint: &str) -> AwsSettings {
    AwsSettings {
        dynamodb_endpoint: Some(endpoint.to_owned()),
        ..AwsSettings::default()
    }
}

fn table_name(prefix: &str) -> String {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

fn fast_options() -> DynamoLeaseOptions {
    DynamoLeaseOptions {
        retry_delay_ms: 10,
        ..DynamoLeaseOptions::default()
    }
}

fn store(endpoint: &str, prefix: &str, options: DynamoLeaseOptions) -> DynamoLeaseStore {
    DynamoLeaseStore::connect(&settings(endpoint), &table_name(prefix), options).unwrap()
}

fn raw_client() -> aws_sdk_dynamodb::Client {
    let config = aws_sdk_dynamodb::config::Builder::new()
        .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
        .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
        .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "test", "test", None, None, "test",
        ))
        .endpoint_url(moto())
        .http_client(sluice_receiver::aws_http_client())
        .build();
    aws_sdk_dynamodb::Client::from_conf(config)
}

fn block_on<F: std::future::Future>(f: F) -> F::Output {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(f)
}

#[test]
fn conformance_suite_passes_on_dynamodb() {
    let endpoint = moto();
    lease_store_conformance(&|| Arc::new(store(&endpoint, "conformance", fast_options())) as Arc<dyn LeaseStore>);
}

#[test]
fn items_use_the_kcl_schema_and_the_table_is_on_demand() {
    let table = table_name("schema");
    let store = DynamoLeaseStore::connect(&settings(&moto()), &table, fast_options()).unwrap();
    let mut lease = Lease::new("shardId-000000000002", Checkpoint::TrimHorizon);
    lease.parent_shard_ids.insert("shardId-000000000000".into());
    lease.parent_shard_ids.insert("shardId-000000000001".into());
    lease.hash_key_range = Some((0, 170_141_183_460_469_231_731_687_303_715_884_105_727));
    assert!(store.create_lease_if_absent(&lease).unwrap());
    let taken = store.take_lease(&lease.lease_key, 0, "worker-1").unwrap();
    let position = Position::new(
        SequenceNumber::parse("49590338271490256608559692538361571095921575989136588898").unwrap(),
        4,
    );
    store
        .checkpoint(
            &lease.lease_key,
            &taken.fence().unwrap(),
            &Checkpoint::Position(position),
        )
        .unwrap();

    let client = raw_client();
    let item = block_on(
        client
            .get_item()
            .table_name(&table)
            .key("leaseKey", AttributeValue::S(lease.lease_key.clone()))
            .consistent_read(true)
            .send(),
    )
    .unwrap()
    .item
    .unwrap();
    let s = |name: &str| item[name].as_s().unwrap().clone();
    let n = |name: &str| item[name].as_n().unwrap().clone();
    assert_eq!(s("leaseOwner"), "worker-1");
    assert_eq!(n("leaseCounter"), "2");
    assert_eq!(
        s("checkpoint"),
        "49590338271490256608559692538361571095921575989136588898"
    );
    assert_eq!(n("checkpointSubSequenceNumber"), "4");
    assert_eq!(n("ownerSwitchesSinceCheckpoint"), "0");
    let mut parents = item["parentShardId"].as_ss().unwrap().clone();
    parents.sort();
    assert_eq!(parents, ["shardId-000000000000", "shardId-000000000001"]);
    assert_eq!(s("startingHashKey"), "0");
    assert_eq!(s("endingHashKey"), "170141183460469231731687303715884105727");
    assert!(
        !item.contains_key("childShardIds"),
        "an empty set is an absent attribute"
    );

    // A Java KCL 3.x worker's extra attributes survive our writes.
    block_on(
        client
            .update_item()
            .table_name(&table)
            .key("leaseKey", AttributeValue::S(lease.lease_key.clone()))
            .update_expression("SET throughputKBps = :t")
            .expression_attribute_values(":t", AttributeValue::N("42".into()))
            .send(),
    )
    .unwrap();
    let current = store.get_lease(&lease.lease_key).unwrap().unwrap();
    store.renew_lease(&lease.lease_key, &current.fence().unwrap()).unwrap();
    let item: HashMap<String, AttributeValue> = block_on(
        client
            .get_item()
            .table_name(&table)
            .key("leaseKey", AttributeValue::S(lease.lease_key.clone()))
            .consistent_read(true)
            .send(),
    )
    .unwrap()
    .item
    .unwrap();
    assert_eq!(item["throughputKBps"].as_n().unwrap(), "42");

    let description = block_on(client.describe_table().table_name(&table).send()).unwrap();
    let billing = description
        .table()
        .unwrap()
        .billing_mode_summary()
        .unwrap()
        .billing_mode()
        .unwrap();
    assert_eq!(billing.as_str(), "PAY_PER_REQUEST");
}

#[test]
fn bad_configuration_fails_fast() {
    let err = DynamoLeaseStore::connect(&settings(&moto()), "x", fast_options()).unwrap_err();
    assert!(
        matches!(err, DynamoConnectError::Config(ref e) if e.field == "application_name"),
        "{err}"
    );
    let started = Instant::now();
    let err = DynamoLeaseStore::connect(&settings("http://127.0.0.1:1"), "sluice-app", fast_options()).unwrap_err();
    assert!(matches!(err, DynamoConnectError::Unreachable { .. }), "{err}");
    assert!(err.to_string().contains("AWS_ENDPOINT_URL_DYNAMODB"), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );
}

#[test]
fn throttling_is_retried_and_counted_or_reported_without_a_change() {
    let throttle_puts = Arc::new(AtomicU64::new(0));
    let budget = throttle_puts.clone();
    let proxy = FaultProxy::start(&moto(), move |request| {
        (request.operation() == "PutItem"
            && budget
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok())
        .then(FaultResponse::throttle_dynamodb)
    })
    .unwrap();
    let table = table_name("throttle");
    let store = DynamoLeaseStore::connect(&settings(&proxy.url()), &table, fast_options()).unwrap();
    let lease = Lease::new("shardId-000000000000", Checkpoint::TrimHorizon);
    assert!(store.create_lease_if_absent(&lease).unwrap());
    let taken = store.take_lease(&lease.lease_key, 0, "w").unwrap();

    throttle_puts.store(3, Ordering::SeqCst);
    let position = Checkpoint::Position(Position::new(SequenceNumber::parse("100").unwrap(), 0));
    let before = store.metrics();
    let after_checkpoint = store
        .checkpoint(&lease.lease_key, &taken.fence().unwrap(), &position)
        .unwrap();
    let m = store.metrics();
    assert_eq!(m.throttles - before.throttles, 3, "{m:?}");
    assert_eq!(m.retries - before.retries, 3, "{m:?}");
    assert_eq!(after_checkpoint.checkpoint, position);
    assert_eq!(proxy.injected(), 3);

    // More throttles than retries: a typed, retryable error, and the table is unchanged.
    let few_options = DynamoLeaseOptions {
        max_retries: 2,
        ..fast_options()
    };
    let few = DynamoLeaseStore::connect(&settings(&proxy.url()), &table, few_options).unwrap();
    throttle_puts.store(100, Ordering::SeqCst);
    let err = few
        .renew_lease(&lease.lease_key, &after_checkpoint.fence().unwrap())
        .unwrap_err();
    assert!(
        matches!(err, LeaseError::Throttled { .. }) && err.is_retryable(),
        "{err}"
    );
    throttle_puts.store(0, Ordering::SeqCst);
    assert_eq!(few.get_lease(&lease.lease_key).unwrap().unwrap(), after_checkpoint);
}
