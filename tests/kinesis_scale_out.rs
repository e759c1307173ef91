//! Several `kinesis_word_count` worker processes of one application on kinesis-local and moto:
//! shard leases in one `DynamoDB` table, and the checkpoint location, the block replicas and the
//! Parquet output all under one S3 prefix — what N machines share in production.
//!
//! - two workers, then a third joining while records flow: the summed output equals the
//!   reference exactly;
//! - a worker killed with SIGKILL and never restarted (its data directory deleted): the others
//!   adopt its log after the failover time and the output stays exact;
//! - a worker stopped with SIGSTOP (a zombie) while the others adopt it, then continued: it stops
//!   on its own, writes no batch that readers count, and the output stays exact.
//!
//! Run through `scripts/with-emulators` (it exports the endpoints); a missing emulator fails the
//! test, it is never skipped.
#![cfg(feature = "kinesis")]

mod support;

use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::TryStreamExt;
use object_store::ObjectStore;
use sluice::operators::{ParquetSink, bench_data};
use sluice::receiver::kinesis::{KinesisConfig, KinesisProducer};
use sluice::receiver::{AwsSettings, DynamoLeaseOptions, DynamoLeaseStore, LeaseKind, LeaseStore};
use support::example_binary;

/// Scenarios run one at a time: each starts several workers against the same emulators.
static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

const FAILOVER_MS: u64 = 2_000;

fn env(name: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| {
        panic!("{name} is not set: run through `scripts/with-emulators cargo test ...` (or `scripts/test`)")
    })
}

/// One application: a stream, a lease table, an S3 prefix, and its worker processes.
struct App {
    dir: tempfile::TempDir,
    stream: String,
    application: String,
    moto: String,
    prefix: String,
    producer: KinesisProducer,
    leases: DynamoLeaseStore,
    workers: HashMap<String, Child>,
    lines: Vec<String>,
}

impl App {
    fn new(name: &str, shards: u32) -> Self {
        let unique = format!(
            "{name}-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis()
                % 1_000_000
        );
        let kinesis = KinesisConfig {
            aws: AwsSettings {
                kinesis_endpoint: Some(env("SLUICE_KINESIS_ENDPOINT")),
                dynamodb_endpoint: Some(env("SLUICE_DYNAMODB_ENDPOINT")),
                ..AwsSettings::default()
            },
            ..KinesisConfig::new(&unique)
        };
        let producer = KinesisProducer::new(&kinesis).unwrap();
        producer.create_stream(shards).unwrap();
        let app = format!("{unique}-app");
        let leases = DynamoLeaseStore::connect(&kinesis.aws, &app, DynamoLeaseOptions::default()).unwrap();
        Self {
            dir: tempfile::tempdir().unwrap(),
            stream: unique.clone(),
            application: app,
            moto: env("SLUICE_MOTO_ENDPOINT"),
            prefix: format!("s3://{}/scale-out/{unique}", env("SLUICE_TEST_S3_BUCKET")),
            producer,
            leases,
            workers: HashMap::new(),
            lines: Vec::new(),
        }
    }

    /// Puts `n` more lines of the corpus into the stream.
    fn put(&mut self, n: usize) {
        let all = bench_data::zipf_lines(self.lines.len() + n, 1_000, 7);
        let new = &all[self.lines.len()..];
        let records: Vec<(String, &[u8])> = new
            .iter()
            .enumerate()
            .map(|(i, l)| ((self.lines.len() + i).to_string(), l.as_bytes()))
            .collect();
        self.producer.put(&records).unwrap();
        self.lines = all;
    }

    fn data_dir(&self, worker: &str) -> PathBuf {
        self.dir.path().join(worker)
    }

    /// Starts worker `id` in follow mode; its stderr goes to `<dir>/<id>.log`.
    fn start(&mut self, id: &str) {
        let log = std::fs::File::create(self.dir.path().join(format!("{id}.log"))).unwrap();
        let child = Command::new(example_binary("kinesis_word_count"))
            .args([
                "--stream",
                &self.stream,
                "--app",
                &self.application,
                "--worker-id",
                id,
                "--follow",
            ])
            .args(["--data-dir", self.data_dir(id).to_str().unwrap()])
            .args(["--checkpoint", &format!("{}/checkpoint", self.prefix)])
            .args(["--output", &format!("{}/output", self.prefix)])
            .args(["--replica", &format!("{}/replica", self.prefix)])
            .args(["--failover-ms", &FAILOVER_MS.to_string(), "--taker-ms", "200"])
            .args(["--batch-ms", "300", "--block-ms", "50", "--checkpoint-ms", "300"])
            .args(["--read-interval-ms", "50"])
            .env("AWS_ENDPOINT_URL_S3", &self.moto)
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.workers.insert(id.to_owned(), child);
    }

    fn worker_log(&self, id: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(format!("{id}.log"))).unwrap_or_default()
    }

    fn signal(&self, id: &str, signal: &str) {
        let pid = self.workers[id].id().to_string();
        let status = Command::new("kill").args([signal, &pid]).status().unwrap();
        assert!(status.success(), "kill {signal} {pid}");
    }

    fn output_store(&self) -> (Arc<dyn ObjectStore>, object_store::path::Path) {
        let options = HashMap::from([
            ("aws_endpoint".to_owned(), self.moto.clone()),
            ("aws_allow_http".to_owned(), "true".to_owned()),
        ]);
        sluice::blockstore::object_store_from_url(&format!("{}/output", self.prefix), &options).unwrap()
    }

    /// The committed output summed per word.
    fn summed_output(&self) -> HashMap<String, u64> {
        use arrow_array::cast::AsArray;
        use arrow_array::types::UInt64Type;
        let options = [
            ("aws_endpoint".to_owned(), self.moto.clone()),
            ("aws_allow_http".to_owned(), "true".to_owned()),
        ];
        let sink = ParquetSink::open_with_options(&format!("{}/output", self.prefix), &options).unwrap();
        let mut sums = HashMap::new();
        for (_time, batch) in sink.read_all_committed().unwrap() {
            // The word-count example writes words as bytes (a `Binary` key column).
            let keys = batch.column(0).as_binary::<i32>();
            let values = batch.column(1).as_primitive::<UInt64Type>();
            for i in 0..batch.num_rows() {
                *sums
                    .entry(String::from_utf8(keys.value(i).to_vec()).expect("UTF-8 words"))
                    .or_default() += values.value(i);
            }
        }
        sums
    }

    fn total_output(&self) -> u64 {
        self.summed_output().values().sum()
    }

    /// The batch directories holding a commit marker of `worker`.
    fn committed_batches_of(&self, worker: &str) -> BTreeSet<String> {
        let (store, root) = self.output_store();
        let marker = format!("_SUCCESS-{worker}");
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let objects: Vec<object_store::ObjectMeta> = runtime.block_on(store.list(Some(&root)).try_collect()).unwrap();
        objects
            .iter()
            .filter(|o| o.location.filename() == Some(marker.as_str()))
            .map(|o| o.location.to_string())
            .collect()
    }

    /// Waits until the output holds every word of the input (it must never hold more), then
    /// compares word by word.
    fn wait_for_exact_output(&self, timeout: Duration) {
        let reference = bench_data::reference_word_count(&self.lines);
        let want: u64 = reference.values().sum();
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.summed_output();
            let total: u64 = got.values().sum();
            assert!(
                total <= want,
                "more words in the output ({total}) than in the input ({want})"
            );
            if total == want {
                assert_eq!(got, reference, "per-word counts");
                return;
            }
            if Instant::now() >= deadline {
                for id in self.workers.keys() {
                    eprintln!("--- {id} ---\n{}", self.worker_log(id));
                }
                panic!("the output has {total} of {want} words after {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Shard lease owners, and worker lease owners by worker id.
    fn lease_owners(&self) -> (Vec<Option<String>>, HashMap<String, Option<String>>) {
        let mut shards = Vec::new();
        let mut workers = HashMap::new();
        for lease in self.leases.list_leases().unwrap() {
            match lease.kind {
                LeaseKind::Shard => shards.push(lease.lease_owner),
                LeaseKind::Worker => {
                    let id = lease.lease_key.trim_start_matches("sluice-worker:").to_owned();
                    workers.insert(id, lease.lease_owner);
                }
            }
        }
        (shards, workers)
    }

    fn wait(&self, what: &str, timeout: Duration, mut condition: impl FnMut(&Self) -> bool) {
        let deadline = Instant::now() + timeout;
        while !condition(self) {
            if Instant::now() >= deadline {
                for id in self.workers.keys() {
                    eprintln!("--- {id} ---\n{}", self.worker_log(id));
                }
                panic!("timed out waiting for {what}: leases {:?}", self.lease_owners());
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        for child in self.workers.values_mut() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = self.producer.delete_stream();
    }
}

fn owns_a_shard(app: &App, worker: &str) -> bool {
    app.lease_owners().0.iter().any(|o| o.as_deref() == Some(worker))
}

#[test]
fn two_then_three_workers_share_one_output_exactly_once() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut app = App::new("scale2to3", 4);
    app.put(3_000);
    app.start("w1");
    app.start("w2");
    app.wait("both workers to hold shards", Duration::from_secs(60), |a| {
        owns_a_shard(a, "w1") && owns_a_shard(a, "w2")
    });
    app.start("w3");
    app.put(3_000);
    app.wait("the third worker to get its share", Duration::from_secs(60), |a| {
        owns_a_shard(a, "w3")
    });
    app.wait_for_exact_output(Duration::from_secs(120));
    for w in ["w1", "w2", "w3"] {
        assert!(!app.committed_batches_of(w).is_empty(), "{w} committed no batch");
    }
}

#[test]
fn a_worker_killed_for_good_is_adopted_and_nothing_is_lost() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut app = App::new("killed", 4);
    app.put(3_000);
    for w in ["w1", "w2", "w3"] {
        app.start(w);
    }
    app.wait("w1 to hold shards and output to appear", Duration::from_secs(60), |a| {
        owns_a_shard(a, "w1") && a.total_output() > 0
    });
    // The machine of w1 is gone: the process is killed and its disk with it.
    app.signal("w1", "-KILL");
    app.workers.get_mut("w1").unwrap().wait().unwrap();
    std::fs::remove_dir_all(app.data_dir("w1")).unwrap();
    app.put(3_000);
    app.wait_for_exact_output(Duration::from_secs(120));
    app.wait(
        "w1's log to be finished and its shards taken",
        Duration::from_secs(60),
        |a| {
            let (shards, workers) = a.lease_owners();
            workers.get("w1") == Some(&None) && shards.iter().all(|o| o.as_deref() != Some("w1"))
        },
    );
}

#[test]
fn a_zombie_worker_writes_nothing_readers_count() {
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let mut app = App::new("zombie", 4);
    app.put(3_000);
    app.start("w1");
    app.start("w2");
    app.wait("w1 to hold shards and output to appear", Duration::from_secs(60), |a| {
        owns_a_shard(a, "w1") && a.total_output() > 0
    });
    // w1 freezes (a long GC pause, a stalled VM): the others presume it dead and adopt it.
    app.signal("w1", "-STOP");
    app.put(2_000);
    app.wait(
        "w2 to finish w1's log and own every shard",
        Duration::from_secs(90),
        |a| {
            let (shards, workers) = a.lease_owners();
            workers.get("w1") == Some(&None) && shards.iter().all(|o| o.as_deref() == Some("w2"))
        },
    );
    app.wait_for_exact_output(Duration::from_secs(120));
    let before = app.committed_batches_of("w1");
    // w1 wakes up believing it still holds its shards and its log.
    app.signal("w1", "-CONT");
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = app.workers.get_mut("w1").unwrap().try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the zombie kept running: {}",
            app.worker_log("w1")
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert!(!status.success(), "the zombie must stop with an error");
    let log = app.worker_log("w1");
    assert!(log.contains("claimed by") || log.contains("fenced"), "{log}");
    assert_eq!(
        app.committed_batches_of("w1"),
        before,
        "the zombie committed a batch after it was adopted"
    );
    app.put(1_000);
    app.wait_for_exact_output(Duration::from_secs(120));
}
