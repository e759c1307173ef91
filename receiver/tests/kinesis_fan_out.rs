//! Enhanced fan-out against kinesis-local (started by `scripts/with-emulators`, which exports
//! `SLUICE_KINESIS_ENDPOINT`), with the fault proxy for what the emulator cannot do:
//!
//! - every record once and in key order while subscriptions are renewed before their expiry,
//!   ended by the "service" mid-stream (forced expiry), broken by an exception event mid-stream
//!   and gone silent — all done by the proxy to the real event streams;
//! - two consumers of one stream each see every record, and neither polls;
//! - shard end from a `ChildShards` event (recorded: kinesis-local never sends one) and, without
//!   it, from the closed-shard check; the receiver through split and merge;
//! - the consumer's lifecycle: registered when missing, deregistered by the last graceful stop
//!   only if this process registered it, a self-managed consumer must exist, bad names fail.
#![cfg(feature = "kinesis")]

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use sluice_blockstore::SystemClock;
use sluice_receiver::kinesis::{
    ConsumerLifecycle, FanOutConfig, KinesisConfig, KinesisError, KinesisProducer, KinesisSource, ReaderType,
};
use sluice_receiver::testing::{FaultProxy, RecordingHandler, StreamFault, event_stream_message};
use sluice_receiver::{LocalLeaseStore, Receiver, ReceiverConfig, Source, StartingPosition, StopMode};

mod emulators;

use emulators::{kinesis_config, kinesis_endpoint, unique};

/// A polling configuration for a new stream (the producer's, and the base of the others).
fn polling(prefix: &str) -> KinesisConfig {
    kinesis_config(kinesis_endpoint(), unique(prefix))
}

/// The same stream read through enhanced fan-out with `consumer`, checking for a closed shard's
/// end every 300 ms.
fn fan_out(base: &KinesisConfig, consumer: &str) -> KinesisConfig {
    KinesisConfig {
        reader: ReaderType::EnhancedFanOut {
            consumer_name: consumer.to_owned(),
        },
        fan_out: FanOutConfig {
            end_check_interval_ms: 300,
            consumer_active_timeout_ms: 10_000,
            ..FanOutConfig::default()
        },
        ..base.clone()
    }
}

/// Records `key<k>:<i>` for `keys` keys, `i` in `from..to`, counters ascending per key.
fn keyed(keys: u32, from: u32, to: u32) -> Vec<(String, Vec<u8>)> {
    (from..to)
        .flat_map(|i| (0..keys).map(move |k| (format!("key{k}"), format!("key{k}:{i}").into_bytes())))
        .collect()
}

fn receiver(source: Arc<dyn Source>, handler: Arc<RecordingHandler>, dir: &std::path::Path) -> Receiver {
    let leases = Arc::new(LocalLeaseStore::open(dir.join("leases.json")).unwrap());
    Receiver::new(
        ReceiverConfig {
            block_interval_ms: 100,
            checkpoint_interval_ms: 200,
            lease_taker_interval_ms: 200,
            ..ReceiverConfig::default()
        },
        source,
        leases,
        handler,
        Arc::new(SystemClock),
        1,
        HashMap::new(),
    )
    .unwrap()
}

/// Waits until `handler` stored `total` records.
fn wait_stored(handler: &RecordingHandler, total: usize) -> bool {
    handler.wait_for(Duration::from_secs(60), |blocks| {
        blocks.iter().map(|b| b.meta().num_records as usize).sum::<usize>() >= total
    })
}

/// Asserts `key<k>:<i>` payloads hold every `i` in `0..per_key` once, in order, for each key.
fn assert_every_record_once_in_key_order(handler: &RecordingHandler, keys: u32, per_key: u32) {
    let mut per: BTreeMap<String, Vec<u32>> = BTreeMap::new();
    for block in handler.blocks() {
        for record in block.records().unwrap() {
            let text = String::from_utf8(record.data.to_vec()).unwrap();
            let (key, counter) = text.split_once(':').unwrap();
            per.entry(key.to_owned()).or_default().push(counter.parse().unwrap());
        }
    }
    assert_eq!(per.len(), keys as usize, "keys seen: {:?}", per.keys());
    for (key, counters) in per {
        assert_eq!(
            counters,
            (0..per_key).collect::<Vec<_>>(),
            "{key}: lost, duplicated or reordered"
        );
    }
}

#[test]
fn every_record_once_through_renewals_forced_expiry_errors_and_silence_mid_stream() {
    let base = polling("efo-faults");
    let producer = KinesisProducer::new(&base).unwrap();
    // One shard: one subscription at a time, so each fault meets exactly one stream.
    producer.create_stream(1).unwrap();
    // Every SubscribeToShard goes through the proxy, which does to the real event streams, one
    // after the other: end one after two events (the service's 5-minute expiry, early), break
    // one with an exception after two events, let one go silent after two events (a "zombie"
    // subscription: the event timeout must notice), then leave them alone.
    let phase = Arc::new(AtomicU64::new(0));
    let proxy = {
        let phase = phase.clone();
        FaultProxy::start_with_streams(
            &kinesis_endpoint(),
            |_| None,
            move |request| {
                if request.operation() != "SubscribeToShard" {
                    return None;
                }
                match phase.load(Ordering::SeqCst) {
                    0 => Some(StreamFault::EndAfter { messages: 2 }),
                    1 => Some(StreamFault::InjectAfter {
                        messages: 2,
                        frames: event_stream_message(
                            &[
                                (":message-type", "exception"),
                                (":exception-type", "InternalFailureException"),
                                (":content-type", "application/json"),
                            ],
                            br#"{"message":"injected by the fault proxy"}"#,
                        ),
                    }),
                    2 => Some(StreamFault::StallAfter { messages: 2 }),
                    _ => None,
                }
            },
        )
        .unwrap()
    };
    let mut config = fan_out(&base, &unique("faults"));
    config.aws.kinesis_endpoint = Some(proxy.url());
    // Renewed before "expiry" every 4.5 s as well; silent for 1.8 s is stuck (kinesis-local
    // sends an event every second).
    config.fan_out.renew_subscription_after_ms = 4_500;
    config.fan_out.event_timeout_ms = 1_800;
    let source = Arc::new(KinesisSource::connect(config).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let handler = Arc::new(RecordingHandler::new());
    let receiver = receiver(source.clone(), handler.clone(), dir.path());
    receiver.start().unwrap();

    // Records keep arriving while subscriptions come and go.
    let (keys, waves, per_wave) = (8, 6, 10);
    for wave in 0..waves {
        producer
            .put(&keyed(keys, wave * per_wave, (wave + 1) * per_wave))
            .unwrap();
        let cut = phase.load(Ordering::SeqCst);
        if cut < 3 {
            // Wait until the proxy did this phase's harm to a stream, then go on to the next.
            let deadline = Instant::now() + Duration::from_secs(30);
            while proxy.streams_cut() <= cut {
                assert!(Instant::now() < deadline, "the proxy never applied fault {cut}");
                std::thread::sleep(Duration::from_millis(50));
            }
            phase.store(cut + 1, Ordering::SeqCst);
        } else {
            std::thread::sleep(Duration::from_millis(700));
        }
    }
    let all = wait_stored(&handler, (keys * waves * per_wave) as usize);
    // Nothing more may arrive (a duplicate after a resubscription would).
    std::thread::sleep(Duration::from_millis(1_500));
    receiver.stop(StopMode::Graceful).unwrap();
    assert!(all, "not every record arrived: {:?}", receiver.status());
    assert_every_record_once_in_key_order(&handler, keys, waves * per_wave);

    let m = source.metrics();
    eprintln!("{m:?}; receiver: {:?}", receiver.metrics());
    assert_eq!(proxy.streams_cut(), 3);
    // The expiry and the renewals continue in new subscriptions; the exception and the silence
    // are errors; ResourceInUse while the previous subscription closes is a throttle the shard
    // loop backs off from.
    assert!(m.subscription_renewals >= 1, "{m:?}");
    assert_eq!(m.silent_subscriptions, 1, "{m:?}");
    assert!(m.subscription_errors >= m.throttles + 2, "{m:?}");
    assert!(m.subscriptions >= 4, "{m:?}");
    assert_eq!(m.get_records_calls, 0, "an enhanced fan-out reader polled: {m:?}");
    producer.delete_stream().unwrap();
}

#[test]
fn two_consumers_of_one_stream_each_see_every_record() {
    let base = polling("efo-two");
    let producer = KinesisProducer::new(&base).unwrap();
    producer.create_stream(2).unwrap();
    let first = Arc::new(KinesisSource::connect(fan_out(&base, &unique("first"))).unwrap());
    let second = Arc::new(KinesisSource::connect(fan_out(&base, &unique("second"))).unwrap());
    let (dir1, dir2) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (h1, h2) = (Arc::new(RecordingHandler::new()), Arc::new(RecordingHandler::new()));
    let r1 = receiver(first.clone(), h1.clone(), dir1.path());
    let r2 = receiver(second.clone(), h2.clone(), dir2.path());
    r1.start().unwrap();
    r2.start().unwrap();
    let keys = 6;
    producer.put(&keyed(keys, 0, 40)).unwrap();
    std::thread::sleep(Duration::from_millis(500));
    producer.put(&keyed(keys, 40, 80)).unwrap();
    let total = (keys * 80) as usize;
    let (all1, all2) = (wait_stored(&h1, total), wait_stored(&h2, total));
    std::thread::sleep(Duration::from_secs(1));
    r1.stop(StopMode::Graceful).unwrap();
    r2.stop(StopMode::Graceful).unwrap();
    assert!(all1 && all2, "{:?} / {:?}", r1.status(), r2.status());
    assert_every_record_once_in_key_order(&h1, keys, 80);
    assert_every_record_once_in_key_order(&h2, keys, 80);
    for source in [&first, &second] {
        let m = source.metrics();
        assert!(m.fan_out_events > 0, "{m:?}");
        assert_eq!(m.get_records_calls, 0, "an enhanced fan-out reader polled: {m:?}");
    }
    producer.delete_stream().unwrap();
}

/// Reads `shard` with a fresh reader until it ends; returns the payloads and the children.
fn read_to_end(source: &KinesisSource, shard: &str) -> (Vec<String>, Vec<Arc<str>>) {
    let mut reader = source.open_reader(shard, &StartingPosition::TrimHorizon).unwrap();
    let mut payloads = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(Instant::now() < deadline, "{shard} never reported its end");
        let batch = reader.read(1_000).unwrap();
        payloads.extend(
            batch
                .records
                .iter()
                .map(|r| String::from_utf8(r.data.to_vec()).unwrap()),
        );
        if let Some(mut children) = batch.end_of_shard {
            children.sort();
            return (payloads, children);
        }
    }
}

#[test]
fn a_closed_shard_ends_on_child_shards_in_the_event_or_on_the_end_check() {
    let base = polling("efo-end");
    let producer = KinesisProducer::new(&base).unwrap();
    producer.create_stream(1).unwrap();
    let polled = KinesisSource::connect(base.clone()).unwrap();
    let parent = polled.list_shards().unwrap()[0].shard_id.clone();
    producer.put(&keyed(4, 0, 5)).unwrap();
    producer.split_shard(&parent, None).unwrap();
    let shards = polled.list_shards().unwrap();
    let mut children: Vec<Arc<str>> = shards
        .iter()
        .filter(|s| s.parent_shard_ids.contains(&parent))
        .map(|s| s.shard_id.clone())
        .collect();
    children.sort();
    assert_eq!(children.len(), 2);

    // kinesis-local never sends ChildShards in an event: the proxy appends the event the service
    // sends at a shard's end, recorded, after the emulator's first event (which holds every record
    // of the parent), and ends the stream.
    let child_shards: Vec<String> = shards
        .iter()
        .filter(|s| s.parent_shard_ids.contains(&parent))
        .map(|s| {
            format!(
                r#"{{"ShardId":"{}","ParentShards":["{parent}"],"HashKeyRange":{{"StartingHashKey":"{}","EndingHashKey":"{}"}}}}"#,
                s.shard_id, s.hash_key_range.0, s.hash_key_range.1
            )
        })
        .collect();
    let end_event = format!(
        r#"{{"Records":[],"MillisBehindLatest":0,"ChildShards":[{}]}}"#,
        child_shards.join(",")
    );
    let parent_in_body = format!(r#""ShardId":"{parent}""#);
    let proxy = FaultProxy::start_with_streams(
        &kinesis_endpoint(),
        |_| None,
        move |request| {
            (request.operation() == "SubscribeToShard" && request.body_text().contains(&parent_in_body)).then(|| {
                StreamFault::InjectAfter {
                    messages: 1,
                    frames: event_stream_message(
                        &[
                            (":message-type", "event"),
                            (":event-type", "SubscribeToShardEvent"),
                            (":content-type", "application/json"),
                        ],
                        end_event.as_bytes(),
                    ),
                }
            })
        },
    )
    .unwrap();
    let mut through_proxy = fan_out(&base, &unique("ended"));
    through_proxy.aws.kinesis_endpoint = Some(proxy.url());
    // The end check is out of the way: only the event can end the shard.
    through_proxy.fan_out.end_check_interval_ms = 3_600_000;
    let source = KinesisSource::connect(through_proxy).unwrap();
    let (payloads, ended) = read_to_end(&source, &parent);
    assert_eq!(payloads.len(), 20, "{payloads:?}");
    assert_eq!(ended, children);
    assert_eq!(source.metrics().fan_out_end_checks, 0);
    assert_eq!(proxy.streams_cut(), 1);

    // Straight to the emulator: the end check finds the closed parent read to its end.
    let source = KinesisSource::connect(fan_out(&base, &unique("checked"))).unwrap();
    let (payloads, ended) = read_to_end(&source, &parent);
    assert_eq!(payloads.len(), 20, "{payloads:?}");
    assert_eq!(ended, children);
    assert!(source.metrics().fan_out_end_checks >= 1);
    producer.delete_stream().unwrap();
}

#[test]
fn the_receiver_reads_through_split_and_merge_by_fan_out_every_record_once_in_key_order() {
    let base = polling("efo-reshard");
    let producer = KinesisProducer::new(&base).unwrap();
    producer.create_stream(2).unwrap();
    let polled = KinesisSource::connect(base.clone()).unwrap();
    let source = Arc::new(KinesisSource::connect(fan_out(&base, &unique("reshard"))).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let handler = Arc::new(RecordingHandler::new());
    let receiver = receiver(source.clone(), handler.clone(), dir.path());
    receiver.start().unwrap();
    let keys = 10;
    producer.put(&keyed(keys, 0, 20)).unwrap();
    std::thread::sleep(Duration::from_millis(1_200));
    let shards = polled.list_shards().unwrap();
    producer.split_shard(&shards[0].shard_id, None).unwrap();
    producer.put(&keyed(keys, 20, 40)).unwrap();
    std::thread::sleep(Duration::from_millis(1_200));
    let mut open: Vec<_> = polled
        .list_shards()
        .unwrap()
        .into_iter()
        .filter(|s| !s.is_closed())
        .collect();
    open.sort_by_key(|s| s.hash_key_range.0);
    producer.merge_shards(&open[1].shard_id, &open[2].shard_id).unwrap();
    producer.put(&keyed(keys, 40, 60)).unwrap();
    let all = wait_stored(&handler, (keys * 60) as usize);
    std::thread::sleep(Duration::from_secs(1));
    receiver.stop(StopMode::Graceful).unwrap();
    assert!(all, "not every record was stored: {:?}", receiver.status());
    assert_every_record_once_in_key_order(&handler, keys, 60);
    assert!(source.metrics().fan_out_end_checks >= 1);
    producer.delete_stream().unwrap();
}

#[test]
fn the_consumer_is_registered_when_missing_and_deregistered_only_by_whoever_registered_it() {
    let base = polling("efo-lifecycle");
    let producer = KinesisProducer::new(&base).unwrap();
    producer.create_stream(1).unwrap();
    let self_managed = |name: &str| KinesisConfig {
        fan_out: FanOutConfig {
            consumer_lifecycle: ConsumerLifecycle::SelfManaged,
            ..fan_out(&base, name).fan_out
        },
        ..fan_out(&base, name)
    };

    // A self-managed consumer must exist.
    let name = unique("lifecycle");
    let err = KinesisSource::connect(self_managed(&name)).unwrap_err();
    assert!(matches!(err, KinesisError::ConsumerNotFound { .. }), "{err}");
    assert!(err.to_string().contains("register-stream-consumer"), "{err}");

    // A managed one is registered, and deregistered by the last reader's graceful stop.
    let managed = Arc::new(KinesisSource::connect(fan_out(&base, &name)).unwrap());
    KinesisSource::connect(self_managed(&name)).expect("registered and active");
    let dir = tempfile::tempdir().unwrap();
    let handler = Arc::new(RecordingHandler::new());
    let receiver = receiver(managed.clone(), handler.clone(), dir.path());
    receiver.start().unwrap();
    producer.put(&keyed(3, 0, 10)).unwrap();
    assert!(wait_stored(&handler, 30));
    // Another source of the same application finds it registered: its stop leaves it alone.
    let other = KinesisSource::connect(fan_out(&base, &name)).unwrap();
    assert!(!other.deregister_consumer().unwrap());
    KinesisSource::connect(self_managed(&name)).expect("still registered");
    receiver.stop(StopMode::Graceful).unwrap();
    let err = KinesisSource::connect(self_managed(&name)).unwrap_err();
    assert!(
        matches!(err, KinesisError::ConsumerNotFound { .. }),
        "not deregistered by the graceful stop: {err}"
    );

    // Bad names fail before any call, naming the field.
    let err = KinesisSource::connect(fan_out(&base, "no spaces")).unwrap_err();
    assert!(
        matches!(err, KinesisError::Config(ref e) if e.field == "reader.enhanced_fan_out.consumer_name"),
        "{err}"
    );
    let mut too_late = fan_out(&base, &name);
    too_late.fan_out.renew_subscription_after_ms = 400_000;
    let err = KinesisSource::connect(too_late).unwrap_err();
    assert!(
        matches!(err, KinesisError::Config(ref e) if e.field == "fan_out.renew_subscription_after_ms"),
        "{err}"
    );
    producer.delete_stream().unwrap();
}
