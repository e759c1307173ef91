//! Two workers on one Kinesis stream (kinesis-local) sharing a `DynamoDB` lease table (moto):
//! leases balance; when one worker loses the table (killed, or partitioned) the other takes its
//! shards after the failover time and nothing is lost; when the partitioned worker comes back
//! believing it still holds them (a zombie), its writes are refused and it lets them go. Also: throttled `GetRecords`
//! and expired iterators (injected by a proxy in front of kinesis-local) lose nothing and show in
//! the metrics.
#![cfg(feature = "kinesis")]

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use sluice_blockstore::{Block, SystemClock};
use sluice_receiver::kinesis::{KinesisProducer, KinesisSource};
use sluice_receiver::testing::{FaultProxy, FaultResponse, RecordingHandler};
use sluice_receiver::{
    Checkpoint, DynamoLeaseOptions, DynamoLeaseStore, Lease, LeaseError, LeaseFence, LeaseStore, LocalLeaseStore,
    Receiver, ReceiverConfig, ReceiverStatus, StopMode,
};

mod emulators;

use emulators::{env, kinesis_config, unique, with_moto};

/// A lease store that can be cut off (every call fails as if the table were unreachable) and
/// that records every checkpoint it lets through, with the writer.
#[derive(Debug)]
struct Switchable {
    inner: Arc<DynamoLeaseStore>,
    cut_off: AtomicBool,
    checkpoints: Mutex<Vec<(String, String, Checkpoint)>>,
    /// Writes the table refused because the writer no longer held the lease.
    fenced_off: AtomicU64,
}

impl Switchable {
    fn new(inner: Arc<DynamoLeaseStore>) -> Arc<Self> {
        Arc::new(Self {
            inner,
            cut_off: AtomicBool::new(false),
            checkpoints: Mutex::default(),
            fenced_off: AtomicU64::new(0),
        })
    }

    fn count_fenced<T>(&self, result: Result<T, LeaseError>) -> Result<T, LeaseError> {
        if result.as_ref().is_err_and(LeaseError::is_lease_lost) {
            self.fenced_off.fetch_add(1, Ordering::SeqCst);
        }
        result
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
        self.count_fenced(self.inner.renew_lease(lease_key, fence))
    }
    fn checkpoint(&self, lease_key: &str, fence: &LeaseFence, checkpoint: &Checkpoint) -> Result<Lease, LeaseError> {
        self.check()?;
        let lease = self.count_fenced(self.inner.checkpoint(lease_key, fence, checkpoint))?;
        self.checkpoints
            .lock()
            .unwrap()
            .push((fence.owner.clone(), lease_key.to_owned(), checkpoint.clone()));
        Ok(lease)
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

fn receiver_config(worker: &str, failover_ms: u64, taker_ms: u64) -> ReceiverConfig {
    ReceiverConfig {
        block_interval_ms: 100,
        checkpoint_interval_ms: 200,
        lease_failover_ms: failover_ms,
        lease_taker_interval_ms: taker_ms,
        worker_id: Some(worker.to_owned()),
        ..ReceiverConfig::default()
    }
}

fn payloads(blocks: &[Block]) -> Vec<String> {
    blocks
        .iter()
        .flat_map(|b| b.records().unwrap())
        .map(|r| String::from_utf8(r.data.to_vec()).unwrap())
        .collect()
}

fn wait(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn owned(status: &ReceiverStatus) -> usize {
    status.owned_shards.len()
}

#[test]
fn two_workers_balance_fail_over_and_fence_the_zombie() {
    let stream = unique("workers");
    let config = with_moto(kinesis_config(env("SLUICE_KINESIS_ENDPOINT"), &stream));
    let producer = KinesisProducer::new(&config).unwrap();
    producer.create_stream(4).unwrap();
    let source = Arc::new(KinesisSource::connect(config.clone()).unwrap());
    let table = Arc::new(
        DynamoLeaseStore::connect(
            &config.aws,
            &unique("workers-app"),
            DynamoLeaseOptions {
                retry_delay_ms: 20,
                ..DynamoLeaseOptions::default()
            },
        )
        .unwrap(),
    );
    let (leases_a, leases_b) = (Switchable::new(table.clone()), Switchable::new(table.clone()));
    let (handler_a, handler_b) = (Arc::new(RecordingHandler::new()), Arc::new(RecordingHandler::new()));
    let start = |config: ReceiverConfig, leases: &Arc<Switchable>, handler: &Arc<RecordingHandler>| {
        let receiver = Receiver::new(
            config,
            source.clone(),
            leases.clone(),
            handler.clone(),
            Arc::new(SystemClock),
            1,
            HashMap::new(),
        )
        .unwrap();
        receiver.start().unwrap();
        receiver
    };
    let put = |from: u32, to: u32| {
        let records: Vec<(String, Vec<u8>)> = (from..to)
            .map(|i| (format!("k{i}"), format!("r{i}").into_bytes()))
            .collect();
        producer.put(&records).unwrap();
    };

    // A renews every 20/3 s, notices a lost table only after 20 s, and takes leases only on its
    // first pass (so it does not steal back afterwards). B fails over after 8 s (more than A's
    // renewal period) and balances every 200 ms.
    put(0, 200);
    let a = start(receiver_config("worker-a", 20_000, 600_000), &leases_a, &handler_a);
    wait("worker A to own all 4 shards", Duration::from_secs(20), || {
        owned(&a.status()) == 4
    });
    let b = start(receiver_config("worker-b", 8_000, 200), &leases_b, &handler_b);
    wait("leases to balance 2/2", Duration::from_secs(30), || {
        owned(&a.status()) == 2 && owned(&b.status()) == 2
    });
    put(200, 400);

    // A loses the lease table (a kill, or a partition): B takes A's shards after its failover
    // time.
    leases_a.cut_off.store(true, Ordering::SeqCst);
    let a_checkpoints = leases_a.checkpoints.lock().unwrap().len();
    wait("worker B to own all 4 shards", Duration::from_secs(30), || {
        owned(&b.status()) == 4
    });
    put(400, 600);

    // A comes back within its own failover time, still believing it holds 2 shards: a zombie.
    // Its writes are fenced off; it lets the shards go.
    assert_eq!(owned(&a.status()), 2, "A should still believe it holds its shards");
    leases_a.cut_off.store(false, Ordering::SeqCst);
    wait("the zombie to let its shards go", Duration::from_secs(20), || {
        owned(&a.status()) == 0
    });
    assert!(
        leases_a.fenced_off.load(Ordering::SeqCst) >= 1,
        "no write of the zombie was refused"
    );
    assert_eq!(
        leases_a.checkpoints.lock().unwrap().len(),
        a_checkpoints,
        "a checkpoint of the zombie landed after B took its shards"
    );
    assert!(a.metrics().leases_lost >= 2, "{:?}", a.metrics());

    let all: BTreeSet<String> = (0..600).map(|i| format!("r{i}")).collect();
    wait(
        "every record to be stored by one of the workers",
        Duration::from_secs(30),
        || {
            let mut seen: BTreeSet<String> = payloads(&handler_a.blocks()).into_iter().collect();
            seen.extend(payloads(&handler_b.blocks()));
            seen == all
        },
    );
    for lease in table.list_leases().unwrap() {
        assert_eq!(lease.lease_owner.as_deref(), Some("worker-b"), "{lease:?}");
    }
    b.stop(StopMode::Graceful).unwrap();
    a.stop(StopMode::Graceful).unwrap();
    // A graceful stop releases the leases instead of leaving them to expire.
    assert!(table.list_leases().unwrap().iter().all(|l| l.lease_owner.is_none()));
    producer.delete_stream().unwrap();
}

#[test]
fn throttled_reads_and_expired_iterators_lose_nothing_and_are_counted() {
    let throttles = Arc::new(AtomicU64::new(6));
    let expiries = Arc::new(AtomicU64::new(3));
    let (t, x) = (throttles.clone(), expiries.clone());
    let take = |n: &AtomicU64| {
        n.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |v| v.checked_sub(1))
            .is_ok()
    };
    let proxy = FaultProxy::start(&env("SLUICE_KINESIS_ENDPOINT"), move |request| {
        if request.operation() != "GetRecords" {
            return None;
        }
        if take(&t) {
            Some(FaultResponse::kinesis_error(
                "ProvisionedThroughputExceededException",
                "Rate exceeded for shard (injected)",
            ))
        } else if take(&x) {
            Some(FaultResponse::kinesis_error(
                "ExpiredIteratorException",
                "Iterator expired (injected)",
            ))
        } else {
            None
        }
    })
    .unwrap();
    let stream = unique("faults");
    let config = with_moto(kinesis_config(proxy.url(), &stream));
    let producer = KinesisProducer::new(&config).unwrap();
    producer.create_stream(2).unwrap();
    let records: Vec<(String, Vec<u8>)> = (0..300)
        .map(|i| (format!("k{i}"), format!("r{i}").into_bytes()))
        .collect();
    producer.put(&records).unwrap();

    let source = Arc::new(KinesisSource::connect(config).unwrap());
    let dir = tempfile::tempdir().unwrap();
    let handler = Arc::new(RecordingHandler::new());
    let receiver = Receiver::new(
        receiver_config("w", 10_000, 2_000),
        source.clone(),
        Arc::new(LocalLeaseStore::open(dir.path().join("leases.json")).unwrap()),
        handler.clone(),
        Arc::new(SystemClock),
        1,
        HashMap::new(),
    )
    .unwrap();
    receiver.start().unwrap();
    let all: Vec<String> = (0..300).map(|i| format!("r{i}")).collect();
    wait("every record stored", Duration::from_secs(60), || {
        payloads(&handler.blocks()).len() >= 300
    });
    receiver.stop(StopMode::Graceful).unwrap();
    let mut got = payloads(&handler.blocks());
    got.sort();
    let mut want = all;
    want.sort();
    assert_eq!(got, want, "lost or duplicated records");
    let m = source.metrics();
    assert_eq!(m.throttles, 6, "{m:?}");
    assert_eq!(m.expired_iterators, 3, "{m:?}");
    assert!(receiver.metrics().source_throttles >= 6, "{:?}", receiver.metrics());
    assert!(
        m.shard_iterators_requested >= 2 + 3,
        "expired iterators are renewed: {m:?}"
    );
    assert_eq!(proxy.injected(), 9);
    producer.delete_stream().unwrap();
}
