//! The Kinesis source against kinesis-local (started by `scripts/with-emulators`, which exports
//! `SLUICE_KINESIS_ENDPOINT`): reading with every starting position, KPL de-aggregation, exact
//! replay by range (also starting and ending inside aggregates; a trimmed start is `DataExpired`),
//! shard end after a split, the receiver over a stream that is split and merged while it reads,
//! and fast failures for bad configuration.
#![cfg(feature = "kinesis")]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use sluice_blockstore::{Record, Replay, ReplayError, SequenceNumberRange, SequenceNumberRanges, SystemClock};
use sluice_receiver::kinesis::{KinesisConfig, KinesisError, KinesisProducer, KinesisSource};
use sluice_receiver::testing::RecordingHandler;
use sluice_receiver::{LocalLeaseStore, Receiver, ReceiverConfig, Source, StartingPosition, StopMode};

mod emulators;

use emulators::{kinesis_config, kinesis_endpoint, unique};

/// A configuration for a new stream name, fast pacing for the emulator.
fn config(prefix: &str) -> KinesisConfig {
    kinesis_config(kinesis_endpoint(), unique(prefix))
}

/// Creates a stream with `shards` shards and connects a source to it.
fn stream(prefix: &str, shards: u32) -> (KinesisProducer, KinesisSource) {
    let config = config(prefix);
    let producer = KinesisProducer::new(&config).unwrap();
    producer.create_stream(shards).unwrap();
    (producer, KinesisSource::connect(config).unwrap())
}

/// Reads a shard from `start` until `n` records arrived (or the shard ended); returns the first `n`.
fn read_shard(source: &KinesisSource, shard: &str, start: &StartingPosition, n: usize) -> (Vec<Record>, bool) {
    let mut reader = source.open_reader(shard, start).unwrap();
    let mut out = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while out.len() < n {
        assert!(Instant::now() < deadline, "only {} of {n} records arrived", out.len());
        let batch = reader.read(1_000).unwrap();
        out.extend(batch.records);
        if batch.end_of_shard.is_some() {
            return (out, true);
        }
    }
    out.truncate(n);
    (out, false)
}

fn range_of(records: &[Record], stream: &str) -> SequenceNumberRange {
    SequenceNumberRange {
        stream: Arc::from(stream),
        shard_id: records[0].shard_id.clone(),
        from: records[0].position.clone(),
        to: records[records.len() - 1].position.clone(),
        record_count: records.len() as u64,
    }
}

fn payloads(records: &[Record]) -> Vec<Bytes> {
    records.iter().map(|r| r.data.clone()).collect()
}

#[test]
fn reads_plain_and_aggregated_records_in_order_and_replays_exact_ranges() {
    let (producer, source) = stream("read", 1);
    let shard = source.list_shards().unwrap()[0].shard_id.clone();
    // plain 0..10, an aggregate of 7, plain 10..20, an aggregate of 5.
    let plain = |range: std::ops::Range<u32>| -> Vec<(String, Vec<u8>)> {
        range
            .map(|i| (format!("k{i}"), format!("plain-{i}").into_bytes()))
            .collect()
    };
    let agg = |tag: &str, n: u32| -> Vec<(String, Vec<u8>)> {
        (0..n)
            .map(|i| (format!("a{i}"), format!("{tag}-{i}").into_bytes()))
            .collect()
    };
    producer.put(&plain(0..10)).unwrap();
    let first_agg = producer.put_aggregated(&agg("agg1", 7)).unwrap();
    producer.put(&plain(10..20)).unwrap();
    producer.put_aggregated(&agg("agg2", 5)).unwrap();

    let (records, ended) = read_shard(&source, &shard, &StartingPosition::TrimHorizon, 32);
    assert!(!ended);
    assert_eq!(records.len(), 32);
    assert!(
        records.windows(2).all(|w| w[0].position < w[1].position),
        "positions ascend"
    );
    let agg1: Vec<&Record> = records.iter().filter(|r| r.position.sequence == first_agg).collect();
    assert_eq!(agg1.len(), 7);
    for (i, r) in agg1.iter().enumerate() {
        assert_eq!(r.position.sub_sequence, i as u64);
        assert_eq!(&*r.partition_key, format!("a{i}"));
        assert_eq!(r.data, Bytes::from(format!("agg1-{i}")));
    }

    // Starting positions inside an aggregate.
    let inside = agg1[3].position.clone();
    let (after, _) = read_shard(&source, &shard, &StartingPosition::AfterPosition(inside.clone()), 3);
    assert_eq!(payloads(&after), payloads(&records[14..17]));
    let (at, _) = read_shard(&source, &shard, &StartingPosition::AtPosition(inside), 3);
    assert_eq!(payloads(&at), payloads(&records[13..16]));

    // Replay: whole, from inside one aggregate to inside the other, one record, two consecutive
    // ranges of the shard in one pass.
    let name = source.stream_name().to_owned();
    for (lo, hi) in [(0, 32), (13, 30), (5, 6), (0, 1), (31, 32)] {
        let ranges = SequenceNumberRanges(vec![range_of(&records[lo..hi], &name)]);
        assert_eq!(
            payloads(&source.replay(&ranges).unwrap()),
            payloads(&records[lo..hi]),
            "{lo}..{hi}"
        );
    }
    let two = SequenceNumberRanges(vec![range_of(&records[2..9], &name), range_of(&records[12..28], &name)]);
    let got = source.replay(&two).unwrap();
    let want: Vec<Bytes> = payloads(&records[2..9])
        .into_iter()
        .chain(payloads(&records[12..28]))
        .collect();
    assert_eq!(payloads(&got), want);
    assert!(source.metrics().replays >= 6);

    // A range whose count disagrees with the stream is refused, not returned.
    let mut wrong = range_of(&records[4..12], &name);
    wrong.record_count += 1;
    let err = source.replay(&SequenceNumberRanges(vec![wrong])).unwrap_err();
    assert!(
        matches!(
            err,
            ReplayError::CountMismatch {
                expected: 9,
                found: 8,
                ..
            }
        ),
        "{err}"
    );
    producer.delete_stream().unwrap();
}

#[test]
fn latest_and_timestamp_start_where_asked() {
    let (producer, source) = stream("positions", 1);
    let shard = source.list_shards().unwrap()[0].shard_id.clone();
    producer.put(&[("k", b"old")]).unwrap();
    let mut latest = source.open_reader(&shard, &StartingPosition::Latest).unwrap();
    std::thread::sleep(Duration::from_millis(1_100));
    let cut = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    producer.put(&[("k", b"new")]).unwrap();
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.is_empty() && Instant::now() < deadline {
        got.extend(latest.read(100).unwrap().records);
    }
    assert_eq!(payloads(&got), [Bytes::from_static(b"new")]);
    let (at_time, _) = read_shard(&source, &shard, &StartingPosition::AtTimestamp(cut), 1);
    assert_eq!(payloads(&at_time), [Bytes::from_static(b"new")]);
    producer.delete_stream().unwrap();
}

#[test]
fn a_split_parent_ends_with_its_children() {
    let (producer, source) = stream("split", 1);
    let parent = source.list_shards().unwrap()[0].shard_id.clone();
    producer.put(&[("a", b"1"), ("b", b"2")]).unwrap();
    producer.split_shard(&parent, None).unwrap();
    let shards = source.list_shards().unwrap();
    assert_eq!(shards.len(), 3);
    assert!(shards.iter().find(|s| s.shard_id == parent).unwrap().is_closed());
    let children: Vec<Arc<str>> = shards
        .iter()
        .filter(|s| s.parent_shard_ids.contains(&parent))
        .map(|s| s.shard_id.clone())
        .collect();
    assert_eq!(children.len(), 2);
    let mut reader = source.open_reader(&parent, &StartingPosition::TrimHorizon).unwrap();
    let mut records = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    let ended = loop {
        assert!(Instant::now() < deadline, "the parent never reported its end");
        let batch = reader.read(100).unwrap();
        records.extend(batch.records);
        if let Some(ended) = batch.end_of_shard {
            break ended;
        }
    };
    assert_eq!(records.len(), 2);
    let mut ended = ended;
    ended.sort();
    assert_eq!(ended, children);
    producer.delete_stream().unwrap();
}

/// Records `key:counter` for `keys` keys, counters ascending per key.
fn keyed(keys: u32, from: u32, to: u32) -> Vec<(String, Vec<u8>)> {
    (from..to)
        .flat_map(|i| (0..keys).map(move |k| (format!("key{k}"), format!("key{k}:{i}").into_bytes())))
        .collect()
}

#[test]
fn receiver_keeps_every_record_once_and_per_key_order_through_split_and_merge() {
    let config = config("reshard");
    let producer = KinesisProducer::new(&config).unwrap();
    producer.create_stream(2).unwrap();
    let source = Arc::new(KinesisSource::connect(config).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let leases = Arc::new(LocalLeaseStore::open(dir.path().join("leases.json")).unwrap());
    let handler = Arc::new(RecordingHandler::new());
    let receiver = Receiver::new(
        ReceiverConfig {
            block_interval_ms: 100,
            checkpoint_interval_ms: 200,
            lease_taker_interval_ms: 200,
            ..ReceiverConfig::default()
        },
        source.clone(),
        leases,
        handler.clone(),
        Arc::new(SystemClock),
        1,
        HashMap::new(),
    )
    .unwrap();
    receiver.start().unwrap();

    let keys = 12;
    producer.put(&keyed(keys, 0, 30)).unwrap();
    let shards = source.list_shards().unwrap();
    producer.split_shard(&shards[0].shard_id, None).unwrap();
    producer.put(&keyed(keys, 30, 60)).unwrap();
    let open: Vec<Arc<str>> = source
        .list_shards()
        .unwrap()
        .into_iter()
        .filter(|s| !s.is_closed())
        .map(|s| s.shard_id)
        .collect();
    // The second original shard and the upper child are adjacent (hash ranges touch).
    let mut by_range: Vec<_> = source
        .list_shards()
        .unwrap()
        .into_iter()
        .filter(|s| !s.is_closed())
        .collect();
    by_range.sort_by_key(|s| s.hash_key_range.0);
    assert_eq!(open.len(), 3);
    producer
        .merge_shards(&by_range[1].shard_id, &by_range[2].shard_id)
        .unwrap();
    producer.put(&keyed(keys, 60, 90)).unwrap();

    let total = (keys * 90) as usize;
    let all_stored = handler.wait_for(Duration::from_secs(60), |blocks| {
        blocks.iter().map(|b| b.meta().num_records as usize).sum::<usize>() >= total
    });
    receiver.stop(StopMode::Graceful).unwrap();
    assert!(all_stored, "not every record was stored: {:?}", receiver.status());

    let mut per_key: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for block in handler.blocks() {
        for record in block.records().unwrap() {
            let text = String::from_utf8(record.data.to_vec()).unwrap();
            let (key, counter) = text.split_once(':').unwrap();
            per_key
                .entry(key.to_owned())
                .or_default()
                .push(counter.parse().unwrap());
        }
    }
    assert_eq!(per_key.len(), keys as usize);
    for (key, counters) in per_key {
        assert_eq!(
            counters,
            (0..90).collect::<Vec<_>>(),
            "{key}: lost, duplicated or reordered"
        );
    }
    producer.delete_stream().unwrap();
}

/// A checkpoint restored on a shard that has since been closed (the application was down while
/// the stream was split) resumes right after the checkpoint — it never re-reads the parent from
/// `TRIM_HORIZON` (Flink's FLINK-8484, qubole #60) — and the children start after it.
#[test]
fn a_restored_checkpoint_on_a_closed_parent_resumes_after_it() {
    use sluice_receiver::{Checkpoint, Lease, LeaseStore};
    let (producer, source) = stream("restored", 1);
    let parent = source.list_shards().unwrap()[0].shard_id.clone();
    let before: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (format!("k{}", i % 5), format!("p{i}").into_bytes()))
        .collect();
    let positions = producer.put(&before).unwrap();
    producer.split_shard(&parent, None).unwrap();
    let after: Vec<(String, Vec<u8>)> = (0..20)
        .map(|i| (format!("k{}", i % 5), format!("c{i}").into_bytes()))
        .collect();
    producer.put(&after).unwrap();

    // The previous run had processed the parent up to p11 when it stopped.
    let dir = tempfile::tempdir().unwrap();
    let leases = Arc::new(LocalLeaseStore::open(dir.path().join("leases.json")).unwrap());
    let mut lease = Lease::new(&*parent, Checkpoint::Position(positions[11].clone()));
    lease.hash_key_range = Some((0, u128::MAX));
    assert!(leases.create_lease_if_absent(&lease).unwrap());

    let handler = Arc::new(RecordingHandler::new());
    let receiver = Receiver::new(
        ReceiverConfig {
            block_interval_ms: 50,
            checkpoint_interval_ms: 100,
            lease_taker_interval_ms: 100,
            ..ReceiverConfig::default()
        },
        Arc::new(source),
        leases.clone(),
        handler.clone(),
        Arc::new(SystemClock),
        1,
        HashMap::new(),
    )
    .unwrap();
    receiver.start().unwrap();
    let want = 8 + 20;
    let all = handler.wait_for(Duration::from_secs(30), |blocks| {
        blocks.iter().map(|b| b.meta().num_records as usize).sum::<usize>() >= want
    });
    // Let a re-read from the trim horizon, if there were one, show up.
    std::thread::sleep(Duration::from_millis(500));
    receiver.stop(StopMode::Graceful).unwrap();
    assert!(all, "not every record arrived: {:?}", receiver.status());
    let got: Vec<String> = handler
        .blocks()
        .iter()
        .flat_map(|b| b.records().unwrap())
        .map(|r| String::from_utf8(r.data.to_vec()).unwrap())
        .collect();
    let from_parent: Vec<&String> = got.iter().filter(|t| t.starts_with('p')).collect();
    let expected: Vec<String> = (12..20).map(|i| format!("p{i}")).collect();
    assert_eq!(
        from_parent,
        expected.iter().collect::<Vec<_>>(),
        "the parent was not resumed after its checkpoint"
    );
    let mut from_children: Vec<&String> = got.iter().filter(|t| t.starts_with('c')).collect();
    from_children.sort_by_key(|t| t[1..].parse::<u32>().unwrap());
    assert_eq!(from_children.len(), 20, "{got:?}");
    // Every parent record precedes every child record.
    let last_parent = got.iter().rposition(|t| t.starts_with('p')).unwrap();
    let first_child = got.iter().position(|t| t.starts_with('c')).unwrap();
    assert!(last_parent < first_child, "{got:?}");
    assert_eq!(
        leases.get_lease(&parent).unwrap().unwrap().checkpoint,
        Checkpoint::ShardEnd
    );
    producer.delete_stream().unwrap();
}

#[test]
fn bad_configuration_fails_fast_with_the_fix_in_the_message() {
    let missing = KinesisSource::connect(config("never-created")).unwrap_err();
    assert!(matches!(missing, KinesisError::StreamNotFound { .. }), "{missing}");
    assert!(missing.to_string().contains("create it first"), "{missing}");

    let started = Instant::now();
    let mut unreachable = config("x");
    unreachable.aws.kinesis_endpoint = Some("http://127.0.0.1:1".into());
    let err = KinesisSource::connect(unreachable).unwrap_err();
    assert!(matches!(err, KinesisError::Unreachable { .. }), "{err}");
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "took {:?}",
        started.elapsed()
    );

    let mut bad_region = config("x");
    bad_region.aws.region = Some("moon-base".into());
    let err = KinesisSource::connect(bad_region).unwrap_err();
    assert!(
        matches!(err, KinesisError::Config(ref e) if e.field == "region"),
        "{err}"
    );

    let err = KinesisSource::connect(KinesisConfig::new("no spaces allowed")).unwrap_err();
    assert!(
        matches!(err, KinesisError::Config(ref e) if e.field == "stream_name"),
        "{err}"
    );
}

#[test]
fn replay_of_a_trimmed_range_is_data_expired() {
    use sluice_receiver::testing::{FaultProxy, FaultResponse};
    // The stream's oldest record is past the range's start, as after retention trimmed it: the
    // proxy answers GetRecords with a page that starts at a later sequence number.
    let (producer, source) = stream("trimmed", 1);
    let shard = source.list_shards().unwrap()[0].shard_id.clone();
    let positions = producer.put(&[("k", b"gone"), ("k", b"kept")]).unwrap();
    let later = positions[1].sequence.to_string();
    let page = format!(
        r#"{{"Records":[{{"SequenceNumber":"{later}","Data":"a2VwdA==","PartitionKey":"k","ApproximateArrivalTimestamp":1.7E9}}],"NextShardIterator":"x","MillisBehindLatest":0}}"#
    );
    let proxy = FaultProxy::start(&kinesis_endpoint(), move |request| {
        (request.operation() == "GetRecords").then(|| FaultResponse {
            status: 200,
            content_type: "application/x-amz-json-1.1".into(),
            body: page.clone(),
        })
    })
    .unwrap();
    let mut config = source.config().clone();
    config.aws.kinesis_endpoint = Some(proxy.url());
    let through_proxy = KinesisSource::connect(config).unwrap();
    let range = SequenceNumberRange {
        stream: Arc::from(source.stream_name()),
        shard_id: shard,
        from: positions[0].clone(),
        to: positions[1].clone(),
        record_count: 2,
    };
    let err = through_proxy.replay(&SequenceNumberRanges(vec![range])).unwrap_err();
    assert!(matches!(err, ReplayError::DataExpired { .. }), "{err}");
    assert!(!err.is_retryable());
    producer.delete_stream().unwrap();
}
