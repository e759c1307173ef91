//! Kinesis benchmarks on kinesis-local, printed side by side in one run on the same stream:
//!
//! 1. Raw `GetRecords` read rate: the SDK alone, every shard read from `TRIM_HORIZON` in its own
//!    thread with no pacing — what the emulator can serve.
//! 2. End to end through the engine: word count over the same stream (`source_stream`, default
//!    pacing of 5 calls/s per shard), from start until every record is processed.
//! 3. Replay of a lost block (one shard range of `SLUICE_BENCH_REPLAY` records) through the
//!    Kinesis source vs raw reading of the same range with the SDK.
//! 4. Live latency, polling vs enhanced fan-out: a record is put every 100 ms into a 1-shard
//!    stream that a receiver reads (default pacing for each reader type, 20 ms blocks); the
//!    latency is from just before the put to the block holding the record being stored.
//!
//! ```sh
//! scripts/with-emulators cargo bench --features kinesis --bench kinesis
//! ```
//! `SLUICE_BENCH_KINESIS_LINES` sets the stream size (default 40 000; a debug build — `cargo test`
//! runs benches once — uses 2 000), `SLUICE_BENCH_LATENCY_RECORDS` the records timed per reader
//! type (60; 10 in a debug build).

fn main() {
    bench::run();
}

mod bench {
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use sluice::blockstore::{
        Block, Position, Replay, SequenceNumber, SequenceNumberRange, SequenceNumberRanges, SystemClock,
    };
    use sluice::engine::{StopMode, StreamingContext};
    use sluice::operators::bench_data;
    use sluice::receiver::aws_sdk_kinesis;
    use sluice::receiver::aws_sdk_kinesis::types::ShardIteratorType;
    use sluice::receiver::kinesis::{KinesisConfig, KinesisProducer, KinesisSource, ReaderType};
    use sluice::receiver::{
        AwsSettings, BlockHandler, HandlerError, InitialPosition, LocalLeaseStore, Receiver, ReceiverConfig, Source,
    };

    fn client(endpoint: &str) -> aws_sdk_kinesis::Client {
        let config = aws_sdk_kinesis::config::Builder::new()
            .behavior_version(aws_sdk_kinesis::config::BehaviorVersion::latest())
            .region(aws_sdk_kinesis::config::Region::new("us-east-1"))
            .credentials_provider(aws_sdk_kinesis::config::Credentials::new(
                "test", "test", None, None, "bench",
            ))
            .endpoint_url(endpoint)
            .http_client(sluice::receiver::aws_http_client())
            .build();
        aws_sdk_kinesis::Client::from_conf(config)
    }

    /// Reads `shard` with the bare SDK from `start` (`AT_SEQUENCE_NUMBER`, or `TRIM_HORIZON`)
    /// until `n` records arrived; returns their sequence numbers.
    fn raw_read(
        rt: &tokio::runtime::Runtime,
        client: &aws_sdk_kinesis::Client,
        stream: &str,
        shard: &str,
        start: Option<&str>,
        n: usize,
    ) -> Vec<String> {
        rt.block_on(async {
            let mut request = client.get_shard_iterator().stream_name(stream).shard_id(shard);
            request = match start {
                Some(seq) => request
                    .shard_iterator_type(ShardIteratorType::AtSequenceNumber)
                    .starting_sequence_number(seq),
                None => request.shard_iterator_type(ShardIteratorType::TrimHorizon),
            };
            let mut iterator = request.send().await.unwrap().shard_iterator;
            let mut out = Vec::with_capacity(n);
            while out.len() < n {
                let page = client
                    .get_records()
                    .shard_iterator(iterator.take().expect("open shard"))
                    .limit(10_000)
                    .send()
                    .await
                    .unwrap();
                out.extend(page.records.into_iter().map(|r| r.sequence_number));
                iterator = page.next_shard_iterator;
            }
            out.truncate(n);
            out
        })
    }

    pub fn run() {
        let endpoint = std::env::var("SLUICE_KINESIS_ENDPOINT")
            .expect("SLUICE_KINESIS_ENDPOINT is not set: run `scripts/with-emulators cargo bench --features kinesis --bench kinesis`");
        let lines_n: usize = std::env::var("SLUICE_BENCH_KINESIS_LINES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if cfg!(debug_assertions) { 2_000 } else { 40_000 });
        let stream = format!("bench-{}", std::process::id());
        let config = KinesisConfig {
            aws: AwsSettings {
                kinesis_endpoint: Some(endpoint.clone()),
                ..AwsSettings::default()
            },
            ..KinesisConfig::new(&stream)
        };
        let producer = KinesisProducer::new(&config).unwrap();
        producer.create_stream(2).unwrap();
        let lines = bench_data::zipf_lines(lines_n, 50_000, 42);
        let records: Vec<(String, &[u8])> = lines
            .iter()
            .enumerate()
            .map(|(i, l)| (i.to_string(), l.as_bytes()))
            .collect();
        let load = Instant::now();
        producer.put(&records).unwrap();
        eprintln!("loaded {lines_n} records in {:.1} s", load.elapsed().as_secs_f64());

        let source = KinesisSource::connect(config).unwrap();
        let shards = source.list_shards().unwrap();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
            .unwrap();
        let sdk = client(&endpoint);

        // 1. Raw GetRecords, shards in parallel, each read to its tip.
        let started = Instant::now();
        let per_shard: Vec<usize> = std::thread::scope(|s| {
            let handles: Vec<_> = shards
                .iter()
                .map(|shard| {
                    let (rt, sdk, stream) = (&rt, &sdk, &stream);
                    s.spawn(move || read_to_tip(rt, sdk, stream, &shard.shard_id))
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).collect()
        });
        let raw_rate = lines_n as f64 / started.elapsed().as_secs_f64();
        assert_eq!(per_shard.iter().sum::<usize>(), lines_n);
        println!("raw GetRecords (SDK, no pacing)      {raw_rate:>10.0} records/s");

        let engine_rate = engine_word_count(&source, lines_n);
        println!(
            "engine end to end (word count)      {engine_rate:>10.0} records/s  = {:.2}x raw",
            engine_rate / raw_rate
        );
        compare_replay(&rt, &sdk, &source, &stream, &shards[0].shard_id, per_shard[0]);
        producer.delete_stream().unwrap();
        compare_latency(&endpoint);
    }

    /// A block handler that notes, for every record, the time from its put (the payload is the
    /// put time in µs since the epoch) to now.
    struct LatencyHandler {
        latencies_ms: std::sync::Mutex<Vec<f64>>,
    }

    fn now_us() -> u128 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_micros()
    }

    impl BlockHandler for LatencyHandler {
        fn store_block(&self, block: Block) -> Result<(), HandlerError> {
            let now = now_us();
            let mut latencies = self.latencies_ms.lock().unwrap();
            for record in block.records().unwrap() {
                let sent: u128 = std::str::from_utf8(&record.data).unwrap().parse().unwrap();
                latencies.push(now.saturating_sub(sent) as f64 / 1_000.0);
            }
            Ok(())
        }
    }

    /// Section 4: the latency of live records through a receiver, polling vs enhanced fan-out.
    fn compare_latency(endpoint: &str) {
        let records: usize = std::env::var("SLUICE_BENCH_LATENCY_RECORDS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(if cfg!(debug_assertions) { 10 } else { 60 });
        let stream = format!("bench-latency-{}", std::process::id());
        let base = KinesisConfig {
            aws: AwsSettings {
                kinesis_endpoint: Some(endpoint.to_owned()),
                ..AwsSettings::default()
            },
            ..KinesisConfig::new(&stream)
        };
        let producer = KinesisProducer::new(&base).unwrap();
        producer.create_stream(1).unwrap();
        let fan_out = KinesisConfig {
            reader: ReaderType::EnhancedFanOut {
                consumer_name: format!("{stream}-bench"),
            },
            ..base.clone()
        };
        for (label, config) in [
            ("polling (200 ms interval, 1 s idle)", base),
            ("enhanced fan-out", fan_out),
        ] {
            let source = KinesisSource::connect(config).unwrap();
            let dir = tempfile::tempdir().unwrap();
            let handler = Arc::new(LatencyHandler {
                latencies_ms: std::sync::Mutex::new(Vec::new()),
            });
            let receiver = Receiver::new(
                ReceiverConfig {
                    block_interval_ms: 20,
                    initial_position: InitialPosition::Latest,
                    lease_taker_interval_ms: 100,
                    ..ReceiverConfig::default()
                },
                Arc::new(source.clone()),
                Arc::new(LocalLeaseStore::open(dir.path().join("leases.json")).unwrap()),
                handler.clone(),
                Arc::new(SystemClock),
                1,
                std::collections::HashMap::new(),
            )
            .unwrap();
            receiver.start().unwrap();
            assert!(receiver.wait_for(Duration::from_secs(30), |s| s.caught_up));
            for _ in 0..records {
                let sent = now_us().to_string();
                producer.put(&[("k", sent.as_bytes())]).unwrap();
                std::thread::sleep(Duration::from_millis(100));
            }
            let deadline = Instant::now() + Duration::from_secs(30);
            while handler.latencies_ms.lock().unwrap().len() < records {
                assert!(Instant::now() < deadline, "{label}: records did not arrive");
                std::thread::sleep(Duration::from_millis(20));
            }
            receiver.stop(StopMode::Graceful).unwrap();
            let mut latencies = handler.latencies_ms.lock().unwrap().clone();
            assert_eq!(latencies.len(), records, "{label}: records read twice");
            latencies.sort_by(f64::total_cmp);
            let at = |q: f64| latencies[((latencies.len() - 1) as f64 * q).round() as usize];
            println!(
                "live latency, {label:<36} p50 {:>6.0} ms  p90 {:>6.0} ms  max {:>6.0} ms",
                at(0.5),
                at(0.9),
                at(1.0)
            );
        }
        producer.delete_stream().unwrap();
    }

    /// Reads a shard from `TRIM_HORIZON` until a page comes back empty twice; returns the count.
    fn read_to_tip(rt: &tokio::runtime::Runtime, sdk: &aws_sdk_kinesis::Client, stream: &str, shard: &str) -> usize {
        rt.block_on(async {
            let mut iterator = sdk
                .get_shard_iterator()
                .stream_name(stream)
                .shard_id(shard)
                .shard_iterator_type(ShardIteratorType::TrimHorizon)
                .send()
                .await
                .unwrap()
                .shard_iterator;
            let (mut n, mut empty) = (0, 0);
            while empty < 2 {
                let page = sdk
                    .get_records()
                    .shard_iterator(iterator.take().unwrap())
                    .limit(10_000)
                    .send()
                    .await
                    .unwrap();
                if page.records.is_empty() {
                    empty += 1;
                }
                n += page.records.len();
                iterator = page.next_shard_iterator;
            }
            n
        })
    }

    /// Word count through the engine over `source`, from start until `n` records are processed.
    fn engine_word_count(source: &KinesisSource, n: usize) -> f64 {
        let dir = tempfile::tempdir().unwrap();
        let ctx = StreamingContext::builder()
            .batch_interval(Duration::from_millis(200))
            .data_dir(dir.path())
            .build()
            .unwrap();
        let receiver = ReceiverConfig {
            block_interval_ms: 50,
            ..ReceiverConfig::default()
        };
        let input = ctx.source_stream(Arc::new(source.clone()), receiver).unwrap();
        // (the stream is read to its tip by the receiver; `n` records are all there is)
        input
            .flat_map(|line: Bytes| {
                line.split(|b| *b == b' ')
                    .filter(|w| !w.is_empty())
                    .map(<[u8]>::to_vec)
                    .collect::<Vec<_>>()
            })
            .count_by_value()
            .foreach_batch(|_t, _counts| Ok(()))
            .unwrap();
        let started = Instant::now();
        ctx.start().unwrap();
        while ctx.metrics().records_processed < n as u64 {
            assert!(
                started.elapsed() < Duration::from_secs(600),
                "the engine did not finish"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let rate = n as f64 / started.elapsed().as_secs_f64();
        ctx.stop(StopMode::Immediate).unwrap();
        rate
    }

    /// Replay of one block-sized range of `shard` (its last records) vs raw reading of it.
    fn compare_replay(
        rt: &tokio::runtime::Runtime,
        sdk: &aws_sdk_kinesis::Client,
        source: &KinesisSource,
        stream: &str,
        shard: &Arc<str>,
        shard_records: usize,
    ) {
        let replay_n: usize = std::env::var("SLUICE_BENCH_REPLAY")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(shard_records.min(5_000));
        let seqs = raw_read(rt, sdk, stream, shard, None, shard_records);
        let (first, last) = (&seqs[shard_records - replay_n], &seqs[shard_records - 1]);
        let range = SequenceNumberRanges(vec![SequenceNumberRange {
            stream: Arc::from(stream),
            shard_id: shard.clone(),
            from: Position::new(SequenceNumber::parse(first).unwrap(), 0),
            to: Position::new(SequenceNumber::parse(last).unwrap(), 0),
            record_count: replay_n as u64,
        }]);
        let started = Instant::now();
        let raw = raw_read(rt, sdk, stream, shard, Some(first), replay_n);
        let raw_secs = started.elapsed().as_secs_f64();
        assert_eq!(raw.len(), replay_n);
        let started = Instant::now();
        let replayed = source.replay(&range).unwrap();
        let replay_secs = started.elapsed().as_secs_f64();
        assert_eq!(replayed.len(), replay_n);
        println!(
            "replay of a {replay_n}-record range      {:>10.0} records/s  = {:.2}x raw read of the range ({:.0} records/s)",
            replay_n as f64 / replay_secs,
            raw_secs / replay_secs,
            replay_n as f64 / raw_secs
        );
    }
}
