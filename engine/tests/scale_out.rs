//! Several workers of one application in one process: one local log, one lease table, one
//! checkpoint location and one Parquet output shared by all (what N machines share in
//! production: a Kinesis stream, a `DynamoDB` table and an S3 prefix).
//!
//! - three workers split the shards and write one output: the summed Parquet equals the
//!   reference exactly;
//! - a worker cut off from the lease table and stopped (its data directory deleted) never comes
//!   back: another worker adopts its log after the failover time and the output stays exact;
//! - a worker cut off from the lease table but still running (a zombie) is adopted, is fenced off
//!   by the claim on its log and stops; the output stays exact.

mod support;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use sluice_engine::{StopMode, StreamingContext};
use sluice_operators::bench_data;
use sluice_receiver::local_log::LocalLog;
use sluice_receiver::{
    Checkpoint, Lease, LeaseError, LeaseFence, LeaseKind, LeaseStore, LocalLeaseStore, ReceiverConfig,
};
use support::{STREAM, fill_log, words};

const FAILOVER_MS: u64 = 600;

/// A lease table a test can cut a worker off from (a network partition, or a dead machine).
#[derive(Debug)]
struct Switchable {
    inner: Arc<dyn LeaseStore>,
    cut_off: AtomicBool,
}

impl Switchable {
    fn new(inner: Arc<dyn LeaseStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            cut_off: AtomicBool::new(false),
        })
    }
    fn check(&self) -> Result<(), LeaseError> {
        if self.cut_off.load(Ordering::SeqCst) {
            return Err(LeaseError::Unavailable {
                detail: "cut off by the test".into(),
                source: None,
            });
        }
        Ok(())
    }
}

impl LeaseStore for Switchable {
    fn create_lease_if_absent(&self, lease: &Lease) -> Result<bool, LeaseError> {
        self.check()?;
        self.inner.create_lease_if_absent(lease)
    }
    fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>, LeaseError> {
        self.check()?;
        self.inner.get_lease(lease_key)
    }
    fn list_leases(&self) -> Result<Vec<Lease>, LeaseError> {
        self.check()?;
        self.inner.list_leases()
    }
    fn take_lease(&self, lease_key: &str, expected_counter: u64, new_owner: &str) -> Result<Lease, LeaseError> {
        self.check()?;
        self.inner.take_lease(lease_key, expected_counter, new_owner)
    }
    fn adopt_lease(
        &self,
        lease_key: &str,
        expected_counter: u64,
        new_owner: &str,
        floor: &Checkpoint,
    ) -> Result<Lease, LeaseError> {
        self.check()?;
        self.inner.adopt_lease(lease_key, expected_counter, new_owner, floor)
    }
    fn renew_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<Lease, LeaseError> {
        self.check()?;
        self.inner.renew_lease(lease_key, fence)
    }
    fn checkpoint(&self, lease_key: &str, fence: &LeaseFence, checkpoint: &Checkpoint) -> Result<Lease, LeaseError> {
        self.check()?;
        self.inner.checkpoint(lease_key, fence, checkpoint)
    }
    fn mark_shard_end(&self, lease_key: &str, fence: &LeaseFence, children: &[String]) -> Result<Lease, LeaseError> {
        self.check()?;
        self.inner.mark_shard_end(lease_key, fence, children)
    }
    fn release_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<Lease, LeaseError> {
        self.check()?;
        self.inner.release_lease(lease_key, fence)
    }
}

/// What the workers of one application share.
struct App {
    _dir: tempfile::TempDir,
    root: std::path::PathBuf,
    table: Arc<dyn LeaseStore>,
    reference: HashMap<String, u64>,
}

impl App {
    fn new(lines: usize, shards: u32) -> Self {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let corpus = bench_data::zipf_lines(lines, 500, 11);
        fill_log(&root.join("log"), &corpus, shards);
        let table: Arc<dyn LeaseStore> = Arc::new(LocalLeaseStore::open(root.join("leases.json")).unwrap());
        Self {
            _dir: dir,
            root,
            table,
            reference: bench_data::reference_word_count(&corpus),
        }
    }

    fn output(&self) -> String {
        self.root.join("output").display().to_string()
    }

    /// Starts worker `id` (data under `<root>/<id>`) reading through `leases`, at most
    /// `max_rate` records/s in pages of 100 so that the shards are still being read when the
    /// others join.
    fn worker(&self, id: &str, leases: Arc<dyn LeaseStore>, max_rate: f64, batch_ms: u64) -> StreamingContext {
        let ctx = StreamingContext::builder()
            .worker_id(id)
            .batch_interval(Duration::from_millis(batch_ms))
            .data_dir(self.root.join(id))
            .checkpoint(self.root.join("checkpoint").display().to_string())
            .executor_threads(2)
            .build()
            .unwrap();
        let log = LocalLog::open(self.root.join("log")).unwrap();
        let stream = log.stream(STREAM).unwrap();
        let config = ReceiverConfig {
            block_interval_ms: 20,
            checkpoint_interval_ms: 50,
            lease_failover_ms: FAILOVER_MS,
            lease_taker_interval_ms: 100,
            max_rate: Some(max_rate),
            read_max_records: Some(100),
            ..ReceiverConfig::default()
        };
        let lines = ctx.source_stream_with_leases(Arc::new(stream), leases, config).unwrap();
        let counts = lines
            .flat_map(words)
            .count_by_value()
            .map(|(w, c): (String, u64)| (w, c));
        counts.save_parquet(&self.output()).unwrap();
        // State too: an adopted log's batches must run with the dead worker's state.
        counts
            .update_state_by_key(|_w: &String, new: Vec<u64>, old: Option<u64>| {
                Some(old.unwrap_or(0) + new.iter().sum::<u64>())
            })
            .foreach_batch(|_t, _all| Ok(()))
            .unwrap();
        ctx.start().unwrap();
        ctx
    }

    /// The committed output summed per word.
    fn summed_output(&self) -> HashMap<String, u64> {
        use arrow_array::cast::AsArray;
        use arrow_array::types::UInt64Type;
        let mut sums = HashMap::new();
        for (_time, batch) in sluice_operators::ParquetSink::read_committed(&self.output()).unwrap() {
            let keys = batch.column(0).as_string::<i32>();
            let values = batch.column(1).as_primitive::<UInt64Type>();
            for i in 0..batch.num_rows() {
                *sums.entry(keys.value(i).to_owned()).or_default() += values.value(i);
            }
        }
        sums
    }

    /// Waits until the summed output reaches the reference's total (it never goes beyond it if
    /// nothing is counted twice), then compares word by word.
    fn wait_for_exact_output(&self, timeout: Duration) {
        let want: u64 = self.reference.values().sum();
        let deadline = Instant::now() + timeout;
        loop {
            let got = self.summed_output();
            let total: u64 = got.values().sum();
            assert!(
                total <= want,
                "more words in the output ({total}) than in the input ({want})"
            );
            if total == want {
                assert_eq!(got, self.reference, "per-word counts");
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the output has {total} of {want} words after {timeout:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Shard lease owners, and worker leases (owner per worker id).
    fn leases(&self) -> (BTreeMap<String, Option<String>>, BTreeMap<String, Option<String>>) {
        let mut shards = BTreeMap::new();
        let mut workers = BTreeMap::new();
        for lease in self.table.list_leases().unwrap() {
            match lease.kind {
                LeaseKind::Shard => shards.insert(lease.lease_key, lease.lease_owner),
                LeaseKind::Worker => workers.insert(lease.lease_key, lease.lease_owner),
            };
        }
        (shards, workers)
    }

    /// The batch directories of `worker`'s committed parts.
    fn committed_batches_of(&self, worker: &str) -> usize {
        let marker = format!("_SUCCESS-{worker}");
        std::fs::read_dir(self.root.join("output")).map_or(0, |dirs| {
            dirs.filter(|d| d.as_ref().unwrap().path().join(&marker).exists())
                .count()
        })
    }
}

fn wait(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn three_workers_share_shards_and_one_output_exactly_once() {
    let app = App::new(6_000, 4);
    let a = app.worker("worker-a", app.table.clone(), 1_500.0, 100);
    wait("worker-a to read", Duration::from_secs(20), || {
        a.metrics().records_processed > 0
    });
    let b = app.worker("worker-b", app.table.clone(), 1_500.0, 100);
    let c = app.worker("worker-c", app.table.clone(), 1_500.0, 100);
    // worker-a releases what it holds above its share; the others take it.
    wait("the shards to spread over the workers", Duration::from_secs(30), || {
        let (shards, _) = app.leases();
        ["worker-a", "worker-b", "worker-c"]
            .iter()
            .all(|w| shards.values().any(|o| o.as_deref() == Some(*w)))
    });
    app.wait_for_exact_output(Duration::from_secs(60));
    for ctx in [&a, &b, &c] {
        ctx.stop(StopMode::Graceful).unwrap();
    }
    app.wait_for_exact_output(Duration::from_secs(1));
    for worker in ["worker-a", "worker-b", "worker-c"] {
        assert!(app.committed_batches_of(worker) > 0, "{worker} wrote no batch");
    }
    // A graceful stop leaves nothing to adopt: every lease is released.
    let (shards, workers) = app.leases();
    assert!(shards.values().all(Option::is_none), "{shards:?}");
    assert_eq!(workers.len(), 3);
    assert!(workers.values().all(Option::is_none), "{workers:?}");
}

#[test]
fn a_worker_that_never_comes_back_is_adopted_and_nothing_is_lost() {
    let app = App::new(5_000, 4);
    let cut = Switchable::new(app.table.clone());
    // worker-a cuts long batches: when it goes, it has logged blocks it has not processed.
    let a = app.worker("worker-a", cut.clone(), 1_000.0, 1_000);
    let b = app.worker("worker-b", app.table.clone(), 1_000.0, 100);
    wait(
        "both workers to hold shards and worker-a to log blocks",
        Duration::from_secs(30),
        || {
            let (shards, _) = app.leases();
            a.metrics().blocks_stored > 5 && shards.values().any(|o| o.as_deref() == Some("worker-b"))
        },
    );
    // worker-a's machine goes away: no lease write lands any more, the process stops without
    // processing what it logged, and its disk is gone.
    cut.cut_off.store(true, Ordering::SeqCst);
    let _ = a.stop(StopMode::Immediate);
    drop(a);
    std::fs::remove_dir_all(app.root.join("worker-a")).unwrap();
    // After the failover time worker-b adopts worker-a's log and shards.
    app.wait_for_exact_output(Duration::from_secs(60));
    wait(
        "worker-b to own every shard and release worker-a's lease",
        Duration::from_secs(20),
        || {
            let (shards, workers) = app.leases();
            shards.values().all(|o| o.as_deref() == Some("worker-b"))
                && workers.get("sluice-worker:worker-a") == Some(&None)
        },
    );
    assert!(
        b.metrics().blocks_replayed > 0,
        "worker-a's blocks were lost with its disk: they must have been replayed by range"
    );
    b.stop(StopMode::Graceful).unwrap();
    app.wait_for_exact_output(Duration::from_secs(1));
}

#[test]
fn a_zombie_worker_is_fenced_off_and_counts_nothing_twice() {
    let app = App::new(5_000, 4);
    let cut = Switchable::new(app.table.clone());
    // worker-a cuts long batches: when it goes, it has logged blocks it has not processed.
    let a = app.worker("worker-a", cut.clone(), 1_000.0, 1_000);
    let b = app.worker("worker-b", app.table.clone(), 1_000.0, 100);
    wait(
        "both workers to hold shards and worker-a to log blocks",
        Duration::from_secs(30),
        || {
            let (shards, _) = app.leases();
            a.metrics().blocks_stored > 5 && shards.values().any(|o| o.as_deref() == Some("worker-b"))
        },
    );
    // worker-a loses the lease table but keeps running: it keeps reading what it was reading,
    // logging blocks and running batches, while the others presume it dead.
    cut.cut_off.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let err = a.await_termination().unwrap_err();
    assert!(
        err.to_string().contains("claimed by worker-b adopting worker-a"),
        "the zombie must stop because its log was claimed: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(30));
    drop(a);
    app.wait_for_exact_output(Duration::from_secs(60));
    assert!(
        b.metrics().blocks_replayed > 0,
        "worker-b must have run batches of worker-a's log (its blocks are replayed by range)"
    );
    b.stop(StopMode::Graceful).unwrap();
    // The zombie wrote nothing after it was fenced that changed what readers count.
    app.wait_for_exact_output(Duration::from_secs(1));
}
