//! One application over several Kinesis streams (KCL multi-stream mode) on kinesis-local, leases
//! in one `DynamoDB` table on moto (both started by `scripts/with-emulators`):
//!
//! - two streams, two workers: the four leases balance 2/2, every record of each stream is
//!   stored exactly once, each key's records in order;
//! - a stream added to the list at run time is read; a stream removed is released at exactly
//!   what was stored (its leases stay, unowned) and no longer read; added back, it resumes there;
//! - the table holds KCL multi-stream leases: `leaseKey` `account:stream:creationEpoch:shardId`,
//!   `streamName` the stream identifier, `shardId` the shard.
#![cfg(feature = "kinesis")]

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use aws_sdk_dynamodb::types::AttributeValue;
use sluice_blockstore::{Block, Replay, SystemClock};
use sluice_receiver::kinesis::{
    KinesisConfig, KinesisError, KinesisProducer, MultiStreamSource, StreamList, StreamListProvider,
};
use sluice_receiver::testing::RecordingHandler;
use sluice_receiver::{
    DynamoLeaseOptions, DynamoLeaseStore, Lease, LeaseKind, LeaseStore, Receiver, ReceiverConfig, SourceError,
    WorkerDirectory, WorkerStatus, split_multi_stream_key,
};
use sluice_receiver::{Source, StopMode};

mod emulators;

use emulators::{env, kinesis_config, kinesis_endpoint, unique, with_moto};

fn config(stream: &str) -> KinesisConfig {
    with_moto(kinesis_config(kinesis_endpoint(), stream))
}

/// Both workers registered and alive: shards are shared by handing back, never stolen.
#[derive(Debug)]
struct BothAlive;

impl WorkerDirectory for BothAlive {
    fn live_workers(&self) -> Vec<String> {
        vec!["w1".into(), "w2".into()]
    }
    fn worker_status(&self, _worker_id: &str) -> WorkerStatus {
        WorkerStatus::Active
    }
}

/// The stream list the test edits while the workers run.
#[derive(Debug, Default)]
struct List(Mutex<Vec<String>>);

impl StreamListProvider for List {
    fn stream_names(&self) -> Result<Vec<String>, SourceError> {
        Ok(self.0.lock().unwrap().clone())
    }
}

fn wait(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `<stream>|key<k>:<i>` for `keys` keys and `i` in `from..to`.
fn put(producer: &KinesisProducer, stream: &str, from: u32, to: u32) {
    let records: Vec<(String, String)> = (from..to)
        .flat_map(|i| (0..4).map(move |k| (format!("key{k}"), format!("{stream}|key{k}:{i}"))))
        .collect();
    producer.put(&records).unwrap();
}

/// Per stream name (from each record's multi-stream shard id): its payloads.
fn by_stream(blocks: &[Block]) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for block in blocks {
        for record in block.records().unwrap() {
            let (identifier, _) = split_multi_stream_key(&record.shard_id).expect("a multi-stream shard id");
            let stream = identifier.split(':').nth(1).unwrap().to_owned();
            let payload = String::from_utf8(record.data.to_vec()).unwrap();
            assert!(
                payload.starts_with(&format!("{stream}|")),
                "{payload} under {}",
                record.shard_id
            );
            out.entry(stream).or_default().push(payload);
        }
    }
    out
}

/// Each key's counters within one worker's records ascend.
fn assert_key_order(payloads: &[String]) {
    let mut last: HashMap<&str, u32> = HashMap::new();
    for p in payloads {
        let (key, counter) = p.split_once(':').unwrap();
        let counter: u32 = counter.parse().unwrap();
        if let Some(previous) = last.insert(key, counter) {
            assert!(counter > previous, "{key}: {counter} after {previous}");
        }
    }
}

fn owned_per_stream(receiver: &Receiver) -> BTreeMap<String, usize> {
    let mut out = BTreeMap::new();
    for shard in receiver.status().owned_shards {
        let (identifier, _) = split_multi_stream_key(&shard).unwrap();
        *out.entry(identifier.split(':').nth(1).unwrap().to_owned()).or_default() += 1;
    }
    out
}

/// Every record of each `(stream, records per key)` once over both workers; each worker's
/// records of a key in order; both workers read something.
fn assert_every_record_once_in_key_order(blocks1: &[Block], blocks2: &[Block], streams: &[(&String, u32)]) {
    let (s1, s2) = (by_stream(blocks1), by_stream(blocks2));
    for &(stream, records) in streams {
        let mut got: Vec<String> = s1.get(stream).cloned().unwrap_or_default();
        got.extend(s2.get(stream).cloned().unwrap_or_default());
        let got_set: BTreeSet<&String> = got.iter().collect();
        assert_eq!(got.len(), got_set.len(), "{stream}: duplicates");
        let want: BTreeSet<String> = (0..records)
            .flat_map(|i| (0..4).map(move |k| format!("{stream}|key{k}:{i}")))
            .collect();
        assert_eq!(got_set, want.iter().collect(), "{stream}: lost records");
    }
    for payloads in s1.values().chain(s2.values()) {
        assert_key_order(payloads);
    }
    assert!(
        !s1.is_empty() && !s2.is_empty(),
        "one worker read everything: {:?} / {:?}",
        s1.keys(),
        s2.keys()
    );
}

/// A lost block is replayed from its streams by its ranges' multi-stream shard ids.
fn assert_replay_is_exact<'a>(source: &MultiStreamSource, blocks: impl Iterator<Item = &'a Block>) {
    let text = |r: &sluice_blockstore::Record| format!("{}/{}", r.shard_id, String::from_utf8_lossy(&r.data));
    for block in blocks {
        let replayed: Vec<String> = source.replay(&block.meta().ranges).unwrap().iter().map(text).collect();
        let stored: Vec<String> = block.records().unwrap().iter().map(text).collect();
        assert_eq!(replayed, stored, "replay of {}", block.meta().ranges);
    }
}

/// The lease table holds `stream`'s first shard as a Java KCL multi-stream application writes it.
fn assert_kcl_multi_stream_lease(table: &str, stream: &str) {
    let source = sluice_receiver::kinesis::KinesisSource::connect(config(stream)).unwrap();
    let identifier = source.stream_identifier().to_owned();
    assert!(
        identifier.starts_with("000000000000:") && identifier.contains(&format!(":{stream}:")),
        "{identifier}"
    );
    let raw = raw_item(table, &format!("{identifier}:shardId-000000000000"));
    assert_eq!(raw.get("streamName").and_then(|v| v.as_s().ok()), Some(&identifier));
    assert_eq!(
        raw.get("shardId").and_then(|v| v.as_s().ok()).map(String::as_str),
        Some("shardId-000000000000")
    );
}

/// Monitoring sees one set of counters for a multi-stream source: every stream's, added up.
fn assert_counters_add_up(source: &MultiStreamSource, streams: usize) {
    let counter = |name: &str| source.counters().iter().find(|c| c.name == name).unwrap().value;
    let sources = source.streams();
    assert_eq!(sources.len(), streams);
    let read: u64 = sources.iter().map(|(_, s)| s.metrics().kinesis_records_read).sum();
    let replays: u64 = sources.iter().map(|(_, s)| s.metrics().replays).sum();
    assert!(read > 0 && replays > 0, "{read} {replays}");
    assert_eq!(counter("kinesis_records_read"), read);
    assert_eq!(counter("replays"), replays);
}

#[test]
fn one_application_reads_several_streams_added_and_removed_at_run_time() {
    let (a, b, c) = (unique("ms-a"), unique("ms-b"), unique("ms-c"));
    let producers: BTreeMap<String, KinesisProducer> = [(&a, 2), (&b, 2), (&c, 1)]
        .into_iter()
        .map(|(name, shards)| {
            let producer = KinesisProducer::new(&config(name)).unwrap();
            producer.create_stream(shards).unwrap();
            (name.clone(), producer)
        })
        .collect();
    let app = unique("ms-app");
    let aws = config(&a).aws;
    let table = Arc::new(
        DynamoLeaseStore::connect(
            &aws,
            &app,
            DynamoLeaseOptions {
                retry_delay_ms: 20,
                ..DynamoLeaseOptions::default()
            },
        )
        .unwrap(),
    );
    let list = Arc::new(List(Mutex::new(vec![a.clone(), b.clone()])));
    let start = |worker: &str| {
        // The template's stream name is only the label block ranges carry: the application's.
        let source = Arc::new(MultiStreamSource::connect(config(&app), StreamList::shared(list.clone())).unwrap());
        let handler = Arc::new(RecordingHandler::new());
        let receiver = Receiver::new(
            ReceiverConfig {
                worker_id: Some(worker.into()),
                block_interval_ms: 50,
                checkpoint_interval_ms: 100,
                lease_taker_interval_ms: 200,
                ..ReceiverConfig::default()
            },
            source.clone(),
            table.clone(),
            handler.clone(),
            Arc::new(SystemClock),
            1,
            HashMap::new(),
        )
        .unwrap()
        .with_workers(Arc::new(BothAlive));
        receiver.start().unwrap();
        (receiver, handler, source)
    };
    let (w1, h1, source) = start("w1");
    let (w2, h2, _) = start("w2");
    wait("the four leases to balance 2/2", Duration::from_secs(30), || {
        w1.status().owned_shards.len() == 2 && w2.status().owned_shards.len() == 2
    });
    put(&producers[&a], &a, 0, 30);
    put(&producers[&b], &b, 0, 30);
    let stored = |stream: &str| -> usize {
        [&h1, &h2]
            .iter()
            .map(|h| by_stream(&h.blocks()).get(stream).map_or(0, Vec::len))
            .sum()
    };
    wait("both streams read", Duration::from_secs(30), || {
        stored(&a) == 120 && stored(&b) == 120
    });

    // A third stream appears in the list: read. The second disappears: released, not read.
    put(&producers[&c], &c, 0, 20);
    list.0.lock().unwrap().push(c.clone());
    wait("the new stream read", Duration::from_secs(30), || stored(&c) == 80);
    list.0.lock().unwrap().retain(|s| *s != b);
    let b_leases = || -> Vec<Lease> {
        table
            .list_leases()
            .unwrap()
            .into_iter()
            .filter(|l| l.kind == LeaseKind::Shard && l.lease_key.contains(&format!(":{b}:")))
            .collect()
    };
    // A worker drops a shard from its status just before its release reaches the table, so wait
    // for both.
    wait("the removed stream's leases released", Duration::from_secs(30), || {
        !owned_per_stream(&w1).contains_key(&b)
            && !owned_per_stream(&w2).contains_key(&b)
            && b_leases().iter().all(|l| l.lease_owner.is_none())
    });
    let b_leases = b_leases();
    assert_eq!(b_leases.len(), 2, "the removed stream's leases stay in the table");
    assert!(b_leases.iter().all(|l| l.lease_owner.is_none()), "{b_leases:?}");
    put(&producers[&b], &b, 30, 50);
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(stored(&b), 120, "a removed stream was read");

    // Listed again: it resumes where it was released.
    list.0.lock().unwrap().push(b.clone());
    wait("the stream listed again read on", Duration::from_secs(30), || {
        stored(&b) == 200
    });
    std::thread::sleep(Duration::from_millis(500));
    w1.stop(StopMode::Graceful).unwrap();
    w2.stop(StopMode::Graceful).unwrap();

    assert_every_record_once_in_key_order(&h1.blocks(), &h2.blocks(), &[(&a, 30), (&b, 50), (&c, 20)]);
    assert_replay_is_exact(&source, h1.blocks().iter().chain(&h2.blocks()).step_by(3));
    assert_counters_add_up(&source, 3);
    assert_kcl_multi_stream_lease(&app, &a);
    for producer in producers.values() {
        producer.delete_stream().unwrap();
    }
}

#[test]
fn a_missing_stream_in_the_initial_list_fails_at_connect() {
    let list = StreamList::from(vec![unique("ms-never-created")]);
    let err = MultiStreamSource::connect(config(&unique("ms-label")), list).unwrap_err();
    assert!(matches!(err, KinesisError::StreamNotFound { .. }), "{err}");
}

fn raw_item(table: &str, key: &str) -> HashMap<String, AttributeValue> {
    let client = aws_sdk_dynamodb::Client::from_conf(
        aws_sdk_dynamodb::config::Builder::new()
            .behavior_version(aws_sdk_dynamodb::config::BehaviorVersion::latest())
            .region(aws_sdk_dynamodb::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
                "test", "test", None, None, "test",
            ))
            .endpoint_url(env("SLUICE_MOTO_ENDPOINT"))
            .http_client(sluice_receiver::aws_http_client())
            .build(),
    );
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime
        .block_on(
            client
                .get_item()
                .table_name(table)
                .key("leaseKey", AttributeValue::S(key.to_owned()))
                .consistent_read(true)
                .send(),
        )
        .unwrap()
        .item
        .unwrap_or_else(|| panic!("no lease item {key:?}"))
}
