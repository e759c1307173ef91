//! Test doubles and conformance suites (the `testing` feature).
//!
//! - [`lease_store_conformance`] runs every [`LeaseStore`] contract check against a fresh store
//!   from a factory. The local file store runs it in this crate's tests; the `DynamoDB` store runs
//!   the same suite against its emulator.
//! - [`RecordingHandler`] is a [`BlockHandler`] that keeps the blocks it is given, can be stalled
//!   (to exercise backpressure) and can fail on demand (to exercise retries and restarts).
//! - [`FaultProxy`] is a loopback HTTP proxy that injects AWS errors (throttling, expired
//!   iterators) in front of an emulator.
//! - [`MemoryLeaseStore`] is a lease table in memory that passes the same conformance suite, for
//!   model tests that need many cases.
//! - [`MemorySource`] is an in-memory sharded log implementing [`Source`](crate::Source) and
//!   [`Replay`](sluice_blockstore::Replay), with shard splits and injected source errors.

use std::collections::VecDeque;
use std::sync::{Arc, Barrier, Condvar, Mutex};
use std::time::{Duration, Instant};

use sluice_blockstore::{Block, Position, SequenceNumber};

use crate::{BlockHandler, Checkpoint, HandlerError, Lease, LeaseError, LeaseFence, LeaseKind, LeaseStore};

mod fault_proxy;
mod memory_leases;
mod memory_source;

pub use fault_proxy::{FaultProxy, FaultRequest, FaultResponse, StreamFault, event_stream_message};
pub use memory_leases::MemoryLeaseStore;
pub use memory_source::{MemorySource, ReaderOpened, SourceFault};

type Case = fn(&dyn LeaseStore);

/// Runs the whole [`LeaseStore`] conformance suite. `make_store` must return a new, empty table
/// each time it is called.
///
/// # Panics
/// On the first contract violation, naming the case.
pub fn lease_store_conformance(make_store: &dyn Fn() -> Arc<dyn LeaseStore>) {
    let cases: [(&str, Case); 12] = [
        ("create_is_conditional", create_is_conditional),
        ("take_unowned_lease", take_unowned_lease),
        ("take_with_a_stale_counter_fails", take_with_a_stale_counter_fails),
        ("renew_is_fenced", renew_is_fenced),
        ("steal_fences_the_stale_owner", steal_fences_the_stale_owner),
        ("checkpoints_are_monotonic", checkpoints_are_monotonic),
        ("shard_end_is_final", shard_end_is_final),
        ("release_lets_anyone_take", release_lets_anyone_take),
        ("unknown_leases_are_not_found", unknown_leases_are_not_found),
        ("concurrent_takes_have_one_winner", concurrent_takes_have_one_winner),
        (
            "adopt_takes_and_raises_the_checkpoint",
            adopt_takes_and_raises_the_checkpoint,
        ),
        ("worker_leases_keep_their_kind", worker_leases_keep_their_kind),
    ];
    for (name, case) in cases {
        let store = make_store();
        assert!(
            store.list_leases().expect("list").is_empty(),
            "{name}: make_store must return an empty table"
        );
        let outcome = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| case(&*store)));
        if let Err(panic) = outcome {
            eprintln!("lease store conformance case {name} failed");
            std::panic::resume_unwind(panic);
        }
    }
}

fn position(sequence: &str, sub: u64) -> Checkpoint {
    Checkpoint::Position(Position::new(
        SequenceNumber::parse(sequence).expect("valid sequence number"),
        sub,
    ))
}

fn new_lease(store: &dyn LeaseStore, key: &str) -> Lease {
    let mut lease = Lease::new(key, Checkpoint::TrimHorizon);
    lease.parent_shard_ids.insert("shardId-parent".into());
    lease.hash_key_range = Some((0, u128::MAX));
    assert!(store.create_lease_if_absent(&lease).expect("create"));
    lease
}

fn fence(lease: &Lease) -> LeaseFence {
    lease.fence().expect("lease has an owner")
}

fn create_is_conditional(store: &dyn LeaseStore) {
    let lease = new_lease(store, "shard-a");
    let mut other = Lease::new("shard-a", Checkpoint::Latest);
    other.lease_owner = Some("intruder".into());
    assert!(!store.create_lease_if_absent(&other).expect("create again"));
    let stored = store.get_lease("shard-a").expect("get").expect("exists");
    assert_eq!(stored, lease, "a second create must not overwrite");
    new_lease(store, "shard-b");
    let keys: Vec<String> = store
        .list_leases()
        .expect("list")
        .into_iter()
        .map(|l| l.lease_key)
        .collect();
    assert_eq!(keys, ["shard-a", "shard-b"]);
    assert_eq!(store.get_lease("shard-c").expect("get"), None);
}

fn take_unowned_lease(store: &dyn LeaseStore) {
    new_lease(store, "shard-a");
    let taken = store.take_lease("shard-a", 0, "worker-1").expect("take");
    assert_eq!(taken.lease_owner.as_deref(), Some("worker-1"));
    assert_eq!(taken.lease_counter, 1);
    assert_eq!(taken.owner_switches_since_checkpoint, 1);
    assert_eq!(taken.checkpoint, Checkpoint::TrimHorizon);
    assert_eq!(store.get_lease("shard-a").expect("get").as_ref(), Some(&taken));
    // Taking again as the same owner with the current counter is allowed and is not a switch.
    let again = store.take_lease("shard-a", 1, "worker-1").expect("retake");
    assert_eq!(again.lease_counter, 2);
    assert_eq!(again.owner_switches_since_checkpoint, 1);
}

fn take_with_a_stale_counter_fails(store: &dyn LeaseStore) {
    new_lease(store, "shard-a");
    store.take_lease("shard-a", 0, "worker-1").expect("take");
    let err = store.take_lease("shard-a", 0, "worker-2").expect_err("stale counter");
    assert!(matches!(err, LeaseError::ConditionFailed { .. }), "{err}");
    assert!(!err.is_retryable() && err.is_lease_lost());
    let stored = store.get_lease("shard-a").expect("get").expect("exists");
    assert_eq!(stored.lease_owner.as_deref(), Some("worker-1"));
    assert_eq!(stored.lease_counter, 1, "a failed write changes nothing");
}

fn renew_is_fenced(store: &dyn LeaseStore) {
    new_lease(store, "shard-a");
    let held = store.take_lease("shard-a", 0, "worker-1").expect("take");
    let renewed = store.renew_lease("shard-a", &fence(&held)).expect("renew");
    assert_eq!(renewed.lease_counter, held.lease_counter + 1);
    // The old counter no longer proves anything.
    let err = store.renew_lease("shard-a", &fence(&held)).expect_err("stale");
    assert!(err.is_lease_lost(), "{err}");
    // Nor does the right counter with the wrong owner.
    let wrong_owner = LeaseFence {
        owner: "worker-2".into(),
        counter: renewed.lease_counter,
    };
    assert!(
        store
            .renew_lease("shard-a", &wrong_owner)
            .expect_err("owner")
            .is_lease_lost()
    );
    // An unowned lease cannot be renewed.
    new_lease(store, "shard-b");
    let nobody = LeaseFence {
        owner: "worker-1".into(),
        counter: 0,
    };
    assert!(
        store
            .renew_lease("shard-b", &nobody)
            .expect_err("unowned")
            .is_lease_lost()
    );
}

fn steal_fences_the_stale_owner(store: &dyn LeaseStore) {
    new_lease(store, "shard-a");
    let a = store.take_lease("shard-a", 0, "worker-a").expect("take");
    let a = store
        .checkpoint("shard-a", &fence(&a), &position("100", 0))
        .expect("checkpoint");
    assert_eq!(a.owner_switches_since_checkpoint, 0);
    // Worker b observed counter `a.lease_counter` and steals.
    let b = store.take_lease("shard-a", a.lease_counter, "worker-b").expect("steal");
    assert_eq!(b.lease_owner.as_deref(), Some("worker-b"));
    assert_eq!(b.owner_switches_since_checkpoint, 1);
    // Worker a is now a zombie: none of its writes may land.
    let err = store
        .checkpoint("shard-a", &fence(&a), &position("200", 0))
        .expect_err("zombie checkpoint");
    assert!(err.is_lease_lost(), "{err}");
    assert!(
        store
            .renew_lease("shard-a", &fence(&a))
            .expect_err("zombie renew")
            .is_lease_lost()
    );
    assert!(
        store
            .release_lease("shard-a", &fence(&a))
            .expect_err("zombie release")
            .is_lease_lost()
    );
    assert!(
        store
            .mark_shard_end("shard-a", &fence(&a), &[])
            .expect_err("zombie shard end")
            .is_lease_lost()
    );
    let stored = store.get_lease("shard-a").expect("get").expect("exists");
    assert_eq!(stored.checkpoint, position("100", 0));
    assert_eq!(stored, b);
    // The new owner checkpoints normally.
    store
        .checkpoint("shard-a", &fence(&b), &position("200", 0))
        .expect("new owner checkpoints");
}

fn checkpoints_are_monotonic(store: &dyn LeaseStore) {
    new_lease(store, "shard-a");
    let mut held = store.take_lease("shard-a", 0, "worker-1").expect("take");
    for (cp, ok) in [
        (position("9", 0), true),
        // Numeric, not lexical: 10 > 9.
        (position("10", 0), true),
        (position("10", 0), true),
        (position("10", 3), true),
        (position("10", 2), false),
        (position("9", 7), false),
        (Checkpoint::TrimHorizon, false),
        (Checkpoint::Latest, false),
        (
            position("49590338271490256608559692538361571095921575989136588898", 0),
            true,
        ),
    ] {
        match store.checkpoint("shard-a", &fence(&held), &cp) {
            Ok(lease) => {
                assert!(ok, "checkpoint to {cp} from {} must be refused", held.checkpoint);
                assert_eq!(lease.checkpoint, cp);
                assert_eq!(lease.lease_counter, held.lease_counter + 1);
                held = lease;
            }
            Err(err) => {
                assert!(!ok, "checkpoint to {cp} failed: {err}");
                assert!(matches!(err, LeaseError::CheckpointRegression { .. }), "{err}");
                assert!(!err.is_retryable());
                let stored = store.get_lease("shard-a").expect("get").expect("exists");
                assert_eq!(stored, held, "a refused checkpoint changes nothing");
            }
        }
    }
}

fn shard_end_is_final(store: &dyn LeaseStore) {
    new_lease(store, "shard-a");
    let held = store.take_lease("shard-a", 0, "worker-1").expect("take");
    let held = store
        .checkpoint("shard-a", &fence(&held), &position("5", 0))
        .expect("checkpoint");
    let ended = store
        .mark_shard_end("shard-a", &fence(&held), &["shard-b".to_owned(), "shard-c".to_owned()])
        .expect("shard end");
    assert_eq!(ended.checkpoint, Checkpoint::ShardEnd);
    assert_eq!(
        ended.child_shard_ids.iter().map(String::as_str).collect::<Vec<_>>(),
        ["shard-b", "shard-c"]
    );
    assert_eq!(ended.parent_shard_ids.len(), 1, "parents are kept");
    let err = store
        .checkpoint("shard-a", &fence(&ended), &position("6", 0))
        .expect_err("past shard end");
    assert!(matches!(err, LeaseError::CheckpointRegression { .. }), "{err}");
    // Idempotent: recording SHARD_END again is accepted.
    store
        .mark_shard_end("shard-a", &fence(&ended), &["shard-b".to_owned()])
        .expect("shard end again");
}

fn release_lets_anyone_take(store: &dyn LeaseStore) {
    new_lease(store, "shard-a");
    let held = store.take_lease("shard-a", 0, "worker-1").expect("take");
    let released = store.release_lease("shard-a", &fence(&held)).expect("release");
    assert_eq!(released.lease_owner, None);
    assert_eq!(released.lease_counter, held.lease_counter + 1);
    assert!(
        store
            .release_lease("shard-a", &fence(&held))
            .expect_err("released twice")
            .is_lease_lost()
    );
    let taken = store
        .take_lease("shard-a", released.lease_counter, "worker-2")
        .expect("take released");
    assert_eq!(taken.lease_owner.as_deref(), Some("worker-2"));
}

fn adopt_takes_and_raises_the_checkpoint(store: &dyn LeaseStore) {
    new_lease(store, "shard-a");
    let held = store.take_lease("shard-a", 0, "dead").expect("take");
    store
        .checkpoint("shard-a", &fence(&held), &position("10", 0))
        .expect("checkpoint");
    let current = store.get_lease("shard-a").expect("get").expect("exists");
    // With a stale counter nothing changes.
    let err = store
        .adopt_lease("shard-a", current.lease_counter - 1, "adopter", &position("20", 0))
        .expect_err("stale counter");
    assert!(err.is_lease_lost(), "{err}");
    assert_eq!(store.get_lease("shard-a").expect("get").as_ref(), Some(&current));
    let adopted = store
        .adopt_lease("shard-a", current.lease_counter, "adopter", &position("20", 0))
        .expect("adopt");
    assert_eq!(adopted.lease_owner.as_deref(), Some("adopter"));
    assert_eq!(adopted.lease_counter, current.lease_counter + 1);
    assert_eq!(adopted.checkpoint, position("20", 0), "the floor is above: raised");
    assert_eq!(store.get_lease("shard-a").expect("get").as_ref(), Some(&adopted));
    // A floor below the checkpoint, or an initial sentinel, leaves it.
    let again = store
        .adopt_lease("shard-a", adopted.lease_counter, "other", &position("15", 0))
        .expect("adopt below");
    assert_eq!(again.checkpoint, position("20", 0));
    let sentinel = store
        .adopt_lease("shard-a", again.lease_counter, "other", &Checkpoint::TrimHorizon)
        .expect("adopt with a sentinel");
    assert_eq!(sentinel.checkpoint, position("20", 0));
    // The old owner is fenced.
    assert!(
        store
            .checkpoint("shard-a", &fence(&held), &position("30", 0))
            .expect_err("fenced")
            .is_lease_lost()
    );
}

fn worker_leases_keep_their_kind(store: &dyn LeaseStore) {
    new_lease(store, "shard-a");
    let worker = Lease::worker("host-1");
    assert_eq!(worker.kind, LeaseKind::Worker);
    assert!(store.create_lease_if_absent(&worker).expect("create worker lease"));
    let taken = store
        .take_lease(&worker.lease_key, 0, "host-1")
        .expect("take worker lease");
    assert_eq!(taken.kind, LeaseKind::Worker);
    let renewed = store
        .renew_lease(&worker.lease_key, &fence(&taken))
        .expect("renew worker lease");
    assert_eq!(renewed.kind, LeaseKind::Worker);
    let kinds: Vec<(String, LeaseKind)> = store
        .list_leases()
        .expect("list")
        .into_iter()
        .map(|l| (l.lease_key, l.kind))
        .collect();
    assert_eq!(
        kinds,
        [
            ("shard-a".to_owned(), LeaseKind::Shard),
            ("sluice-worker:host-1".to_owned(), LeaseKind::Worker)
        ]
    );
}

fn unknown_leases_are_not_found(store: &dyn LeaseStore) {
    let f = LeaseFence {
        owner: "w".into(),
        counter: 0,
    };
    let cp = position("1", 0);
    for err in [
        store.take_lease("nope", 0, "w").expect_err("take"),
        store.adopt_lease("nope", 0, "w", &cp).expect_err("adopt"),
        store.renew_lease("nope", &f).expect_err("renew"),
        store.checkpoint("nope", &f, &cp).expect_err("checkpoint"),
        store.mark_shard_end("nope", &f, &[]).expect_err("shard end"),
        store.release_lease("nope", &f).expect_err("release"),
    ] {
        assert!(matches!(err, LeaseError::NotFound { .. }), "{err}");
    }
}

fn concurrent_takes_have_one_winner(store: &dyn LeaseStore) {
    new_lease(store, "shard-a");
    let workers = 4;
    let barrier = Barrier::new(workers);
    let wins = std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|i| {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    store.take_lease("shard-a", 0, &format!("worker-{i}")).is_ok()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("taker thread"))
            .filter(|won| *won)
            .count()
    });
    assert_eq!(wins, 1, "exactly one of several racing takers may win");
    let stored = store.get_lease("shard-a").expect("get").expect("exists");
    assert_eq!(stored.lease_counter, 1);
}

/// What a [`RecordingHandler`] does with the next `store_block` call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandlerAction {
    /// Store it.
    Store,
    /// Fail with a retryable error.
    FailRetryable,
    /// Fail with a non-retryable error.
    FailPermanently,
}

#[derive(Debug, Default)]
struct RecordingState {
    blocks: Vec<Block>,
    script: VecDeque<HandlerAction>,
    stalled: bool,
    calls: u64,
    waiting: bool,
}

/// A [`BlockHandler`] double: records stored blocks, follows a script of failures, and can be
/// stalled so producers hit backpressure.
#[derive(Debug, Default)]
pub struct RecordingHandler {
    state: Mutex<RecordingState>,
    changed: Condvar,
}

impl RecordingHandler {
    /// A handler that stores everything.
    pub fn new() -> Self {
        Self::default()
    }

    /// Queues actions for the next calls (after the script runs out, blocks are stored).
    pub fn script(&self, actions: impl IntoIterator<Item = HandlerAction>) {
        self.state.lock().expect("handler lock").script.extend(actions);
    }

    /// Makes `store_block` wait (holding its block) until [`resume`](Self::resume).
    pub fn stall(&self) {
        self.state.lock().expect("handler lock").stalled = true;
    }

    /// Releases a stall.
    pub fn resume(&self) {
        self.state.lock().expect("handler lock").stalled = false;
        self.changed.notify_all();
    }

    /// Whether a call is currently waiting in a stall.
    pub fn is_waiting(&self) -> bool {
        self.state.lock().expect("handler lock").waiting
    }

    /// Blocks stored so far, in order.
    pub fn blocks(&self) -> Vec<Block> {
        self.state.lock().expect("handler lock").blocks.clone()
    }

    /// Number of `store_block` calls so far (including failed ones).
    pub fn calls(&self) -> u64 {
        self.state.lock().expect("handler lock").calls
    }

    /// Waits (real time, at most `timeout`) until `predicate` holds for the stored blocks;
    /// returns whether it did.
    pub fn wait_for(&self, timeout: Duration, mut predicate: impl FnMut(&[Block]) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.state.lock().expect("handler lock");
        loop {
            if predicate(&state.blocks) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .changed
                .wait_timeout(state, deadline - now)
                .expect("handler lock")
                .0;
        }
    }
}

impl BlockHandler for RecordingHandler {
    fn store_block(&self, block: Block) -> Result<(), HandlerError> {
        let mut state = self.state.lock().expect("handler lock");
        state.calls += 1;
        while state.stalled {
            state.waiting = true;
            self.changed.notify_all();
            state = self.changed.wait(state).expect("handler lock");
        }
        state.waiting = false;
        let action = state.script.pop_front().unwrap_or(HandlerAction::Store);
        let result = match action {
            HandlerAction::Store => {
                state.blocks.push(block);
                Ok(())
            }
            HandlerAction::FailRetryable => Err(HandlerError::new("injected retryable failure", true)),
            HandlerAction::FailPermanently => Err(HandlerError::new("injected permanent failure", false)),
        };
        self.changed.notify_all();
        result
    }
}
