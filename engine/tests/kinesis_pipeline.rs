//! Word count over a Kinesis stream on kinesis-local, leases in `DynamoDB` on moto (both started
//! by `scripts/with-emulators`): the
//! totals equal a plain reference count, also while every stored block is deleted as soon as it
//! lands — then batches are rebuilt by replaying exact ranges from Kinesis, including ranges that
//! start or end inside KPL aggregates. Both again with the live records read by enhanced fan-out
//! (`SubscribeToShard`): the same totals, and lost blocks still replayed with `GetRecords`.
#![cfg(feature = "kinesis")]

mod support;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use sluice_engine::{KinesisInput, StopMode, StreamingContext};
use sluice_operators::bench_data;
use sluice_receiver::kinesis::{
    ConsumerLifecycle, FanOutConfig, KinesisConfig, KinesisError, KinesisProducer, KinesisSource, ReaderType,
};
use sluice_receiver::{AwsSettings, ReceiverConfig, Source};
use support::word_count;

const DRAIN_TIMEOUT: Duration = Duration::from_secs(120);

fn kinesis_config(prefix: &str) -> KinesisConfig {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let endpoint = std::env::var("SLUICE_KINESIS_ENDPOINT").expect(
        "SLUICE_KINESIS_ENDPOINT is not set: run through `scripts/with-emulators cargo test ...` (or `scripts/test`)",
    );
    KinesisConfig {
        aws: AwsSettings {
            kinesis_endpoint: Some(endpoint),
            ..AwsSettings::default()
        },
        min_read_interval_ms: 20,
        idle_interval_ms: 50,
        replay_backoff_ms: 20,
        ..KinesisConfig::new(format!(
            "{prefix}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ))
    }
}

/// The pipelines' context: 300 ms batches, two executor threads.
fn context(dir: &std::path::Path) -> StreamingContext {
    StreamingContext::builder()
        .batch_interval(Duration::from_millis(300))
        .data_dir(dir)
        .executor_threads(2)
        .build()
        .unwrap()
}

/// moto's endpoint (lease tables), exported by `scripts/with-emulators`.
fn moto_endpoint() -> String {
    std::env::var("SLUICE_MOTO_ENDPOINT")
        .expect("SLUICE_MOTO_ENDPOINT is not set: run through `scripts/with-emulators cargo test ...`")
}

/// Creates a 2-shard stream holding `lines`: the first third as KPL aggregates of 10 lines, the
/// rest as plain records.
fn fill_stream(config: &KinesisConfig, lines: &[String]) -> KinesisProducer {
    let producer = KinesisProducer::new(config).unwrap();
    producer.create_stream(2).unwrap();
    let third = lines.len() / 3;
    for (n, chunk) in lines[..third].chunks(10).enumerate() {
        let records: Vec<(String, &[u8])> = chunk
            .iter()
            .enumerate()
            .map(|(i, l)| (format!("{n}-{i}"), l.as_bytes()))
            .collect();
        producer.put_aggregated(&records).unwrap();
    }
    let plain: Vec<(String, &[u8])> = lines[third..]
        .iter()
        .enumerate()
        .map(|(i, l)| (i.to_string(), l.as_bytes()))
        .collect();
    producer.put(&plain).unwrap();
    producer
}

/// Runs word count over a fresh stream; with `delete_blocks`, a thread deletes every stored
/// block (memory, disk, replica) while batches run. Without, the input is wired the way users
/// wire it — `kinesis_stream` with leases in `DynamoDB` (moto); with, through `source_stream` so
/// the test can read the source's replay counters.
fn run(lines: &[String], delete_blocks: bool, fan_out: bool) -> (HashMap<String, u64>, u64, KinesisSource) {
    let mut config = kinesis_config(if delete_blocks { "lost" } else { "wc" });
    let producer = fill_stream(&config, lines);
    if fan_out {
        config.reader = ReaderType::EnhancedFanOut {
            consumer_name: format!("{}-consumer", config.stream_name),
        };
        config.fan_out = FanOutConfig {
            end_check_interval_ms: 500,
            ..FanOutConfig::default()
        };
    }
    let source = KinesisSource::connect(config).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path());
    let receiver = ReceiverConfig {
        block_interval_ms: 50,
        // Small blocks: block boundaries fall inside aggregates.
        max_block_records: 7,
        ..ReceiverConfig::default()
    };
    let stream = if delete_blocks {
        ctx.source_stream(Arc::new(source.clone()), receiver).unwrap()
    } else {
        let moto = moto_endpoint();
        let mut input = KinesisInput::new(source.stream_name(), format!("{}-app", source.stream_name()));
        input.kinesis = source.config().clone();
        input.kinesis.aws.dynamodb_endpoint = Some(moto);
        input.receiver = receiver;
        ctx.kinesis_stream(input).unwrap()
    };
    let totals = word_count(&stream);
    ctx.start().unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let deleter = delete_blocks.then(|| {
        let store = ctx.block_store().unwrap();
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut removed = 0;
            while !stop.load(Ordering::SeqCst) {
                removed += store.remove_older_than(i64::MAX).unwrap();
                std::thread::sleep(Duration::from_millis(2));
            }
            removed
        })
    });
    let drained = ctx.await_drained(DRAIN_TIMEOUT).unwrap();
    stop.store(true, Ordering::SeqCst);
    let removed = deleter.map_or(0, |d| d.join().unwrap());
    ctx.stop(StopMode::Graceful).unwrap();
    assert!(drained, "the stream was not drained");
    if delete_blocks {
        assert!(removed > 0, "the test deleted no block");
    }
    let replayed = ctx.metrics().blocks_replayed;
    producer.delete_stream().unwrap();
    let totals = totals.lock().unwrap().clone();
    (totals, replayed, source)
}

#[test]
fn kinesis_word_count_equals_the_reference() {
    let lines = bench_data::zipf_lines(1_500, 300, 5);
    let (totals, _, _) = run(&lines, false, false);
    assert_eq!(totals, bench_data::reference_word_count(&lines));
}

/// Through `kinesis_stream`, the way users wire it: the context registers the consumer (it did
/// not exist), reads by fan-out, and its graceful stop — the application's last reader —
/// deregisters it.
#[test]
fn kinesis_word_count_by_enhanced_fan_out_equals_the_reference() {
    let lines = bench_data::zipf_lines(1_500, 300, 7);
    let config = kinesis_config("efo-wc");
    let producer = fill_stream(&config, &lines);
    let fan_out = KinesisConfig {
        reader: ReaderType::EnhancedFanOut {
            consumer_name: format!("{}-consumer", config.stream_name),
        },
        fan_out: FanOutConfig {
            end_check_interval_ms: 500,
            ..FanOutConfig::default()
        },
        ..config.clone()
    };
    let registered = || {
        let self_managed = KinesisConfig {
            fan_out: FanOutConfig {
                consumer_lifecycle: ConsumerLifecycle::SelfManaged,
                ..fan_out.fan_out.clone()
            },
            ..fan_out.clone()
        };
        match KinesisSource::connect(self_managed) {
            Ok(_) => true,
            Err(KinesisError::ConsumerNotFound { .. }) => false,
            Err(e) => panic!("{e}"),
        }
    };
    assert!(!registered());
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path());
    let moto = moto_endpoint();
    let mut input = KinesisInput::new(&config.stream_name, format!("{}-app", config.stream_name));
    input.kinesis = fan_out.clone();
    input.kinesis.aws.dynamodb_endpoint = Some(moto);
    input.receiver = ReceiverConfig {
        block_interval_ms: 50,
        max_block_records: 7,
        ..ReceiverConfig::default()
    };
    let totals = word_count(&ctx.kinesis_stream(input).unwrap());
    assert!(registered(), "kinesis_stream did not register the consumer");
    ctx.start().unwrap();
    let drained = ctx.await_drained(DRAIN_TIMEOUT).unwrap();
    ctx.stop(StopMode::Graceful).unwrap();
    assert!(drained, "the stream was not drained");
    assert_eq!(*totals.lock().unwrap(), bench_data::reference_word_count(&lines));
    assert!(
        !registered(),
        "the graceful stop did not deregister the consumer it registered"
    );
    producer.delete_stream().unwrap();
}

/// One application over two streams (KCL multi-stream mode) through `kinesis_stream`: the
/// totals equal the reference over both streams' lines.
#[test]
fn kinesis_word_count_over_two_streams_equals_the_reference() {
    let (lines_a, lines_b) = (
        bench_data::zipf_lines(800, 300, 9),
        bench_data::zipf_lines(700, 300, 10),
    );
    let (config_a, config_b) = (kinesis_config("ms-wc-a"), kinesis_config("ms-wc-b"));
    let producers = [fill_stream(&config_a, &lines_a), fill_stream(&config_b, &lines_b)];
    let dir = tempfile::tempdir().unwrap();
    let ctx = context(dir.path());
    let moto = moto_endpoint();
    let mut input = KinesisInput::multi_stream(
        vec![config_a.stream_name.clone(), config_b.stream_name.clone()],
        format!("{}-app", config_a.stream_name),
    );
    input.kinesis = KinesisConfig {
        stream_name: input.kinesis.stream_name.clone(),
        ..config_a.clone()
    };
    input.kinesis.aws.dynamodb_endpoint = Some(moto);
    input.receiver = ReceiverConfig {
        block_interval_ms: 50,
        ..ReceiverConfig::default()
    };
    let totals = word_count(&ctx.kinesis_stream(input).unwrap());
    ctx.start().unwrap();
    let drained = ctx.await_drained(DRAIN_TIMEOUT).unwrap();
    ctx.stop(StopMode::Graceful).unwrap();
    assert!(drained, "the streams were not drained");
    let all: Vec<String> = lines_a.iter().chain(&lines_b).cloned().collect();
    assert_eq!(*totals.lock().unwrap(), bench_data::reference_word_count(&all));
    for producer in producers {
        producer.delete_stream().unwrap();
    }
}

#[test]
fn lost_blocks_are_replayed_exactly_from_kinesis() {
    let lines = bench_data::zipf_lines(1_500, 300, 6);
    let (totals, replayed, source) = run(&lines, true, false);
    assert_eq!(totals, bench_data::reference_word_count(&lines));
    assert!(replayed > 0, "no block was replayed");
    let m = source.metrics();
    assert!(m.replays > 0 && m.replay_records > 0, "{m:?}");
}

#[test]
fn lost_blocks_read_by_enhanced_fan_out_are_replayed_with_get_records() {
    let lines = bench_data::zipf_lines(1_500, 300, 8);
    let (totals, replayed, source) = run(&lines, true, true);
    assert_eq!(totals, bench_data::reference_word_count(&lines));
    assert!(replayed > 0, "no block was replayed");
    let m = source.metrics();
    assert!(m.replays > 0 && m.replay_get_records_calls > 0, "{m:?}");
    assert!(m.fan_out_events > 0 && m.get_records_calls == 0, "{m:?}");
}
