//! [`IngestGate`]: the bound on the bytes of blocks stored but not yet processed.
//!
//! Receivers read as fast as the source allows; batches process at their own pace. Without a
//! bound, a fast source (the local log, a Kinesis stream with a backlog) piles blocks into the
//! store faster than batches consume them: memory grows with the batch, and a memory-only block
//! evicted before its batch runs must be replayed from the source. The gate admits a new block
//! only while the blocks admitted and not yet processed by a completed batch stay within the
//! budget; otherwise the engine's block handler waits, which backs up the block generator's
//! bounded queue and blocks the shard readers (backpressure down to the source). A batch releases
//! each block after its last read of it ([`BlockReads`](crate::exec::BlockReads)), and whatever
//! is left when it completes.
//!
//! One block is always admitted when nothing is pending, so a block larger than the budget
//! cannot wedge ingest. Closing the gate (at stop) wakes every waiter with an error.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use sluice_blockstore::BlockId;

/// See the [module docs](self).
#[derive(Debug)]
pub(crate) struct IngestGate {
    budget_bytes: u64,
    state: Mutex<GateState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct GateState {
    pending: HashMap<BlockId, u64>,
    pending_bytes: u64,
    /// Blocks waiting in `admit`.
    waiting: usize,
    closed: bool,
}

/// The gate was closed (the engine stops) while a block waited.
#[derive(Debug, thiserror::Error)]
#[error("the engine is stopping: the block was not admitted")]
pub(crate) struct GateClosed;

impl IngestGate {
    pub(crate) fn new(budget_bytes: u64) -> Self {
        Self {
            budget_bytes: budget_bytes.max(1),
            state: Mutex::new(GateState::default()),
            changed: Condvar::new(),
        }
    }

    /// Waits until a block of `bytes` fits within the budget (or nothing else is pending), then
    /// counts it as pending. Returns how long it waited (zero when the block fitted at once): the
    /// time ingest stood still for the memory budget.
    pub(crate) fn admit(&self, id: BlockId, bytes: u64) -> Result<Duration, GateClosed> {
        let mut state = self.state.lock().expect("ingest gate");
        let mut waited_since = None;
        while !state.closed && state.pending_bytes > 0 && state.pending_bytes + bytes > self.budget_bytes {
            if waited_since.is_none() {
                waited_since = Some(Instant::now());
                state.waiting += 1;
            }
            state = self.changed.wait(state).expect("ingest gate");
        }
        if waited_since.is_some() {
            state.waiting -= 1;
        }
        if state.closed {
            return Err(GateClosed);
        }
        if state.pending.insert(id, bytes).is_none() {
            state.pending_bytes += bytes;
        }
        Ok(waited_since.map_or(Duration::ZERO, |since| since.elapsed()))
    }

    /// Releases blocks processed by a completed batch (or never stored after all).
    pub(crate) fn release(&self, ids: impl IntoIterator<Item = BlockId>) {
        let mut state = self.state.lock().expect("ingest gate");
        let mut freed = false;
        for id in ids {
            if let Some(bytes) = state.pending.remove(&id) {
                state.pending_bytes -= bytes;
                freed = true;
            }
        }
        if freed {
            drop(state);
            self.changed.notify_all();
        }
    }

    /// Wakes every waiter with [`GateClosed`] and refuses new blocks.
    pub(crate) fn close(&self) {
        self.state.lock().expect("ingest gate").closed = true;
        self.changed.notify_all();
    }

    /// Blocks waiting to be admitted.
    #[cfg(test)]
    pub(crate) fn waiting(&self) -> usize {
        self.state.lock().expect("ingest gate").waiting
    }

    /// Bytes of blocks admitted and not yet released.
    #[cfg(test)]
    pub(crate) fn pending_bytes(&self) -> u64 {
        self.state.lock().expect("ingest gate").pending_bytes
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    fn id(seq: u64) -> BlockId {
        BlockId {
            input_id: 0,
            run_id: 1,
            seq,
        }
    }

    #[test]
    fn admits_within_the_budget_and_waits_beyond_it() {
        let gate = Arc::new(IngestGate::new(100));
        assert_eq!(gate.admit(id(1), 60).unwrap(), Duration::ZERO);
        assert_eq!(
            gate.admit(id(2), 40).unwrap(),
            Duration::ZERO,
            "a block that fits does not wait"
        );
        let waiting = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.admit(id(3), 30))
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while gate.waiting() == 0 {
            assert!(Instant::now() < deadline, "the third block never waited");
            std::thread::sleep(Duration::from_millis(1));
        }
        std::thread::sleep(Duration::from_millis(20));
        assert!(!waiting.is_finished(), "over the budget: it waits");
        gate.release([id(1)]);
        let waited = waiting.join().unwrap().unwrap();
        assert!(!waited.is_zero(), "a block that waited reports its wait");
        assert_eq!(gate.waiting(), 0);
        assert_eq!(gate.pending_bytes(), 70);
    }

    #[test]
    fn a_block_larger_than_the_budget_passes_alone_and_close_wakes_waiters() {
        let gate = Arc::new(IngestGate::new(10));
        gate.admit(id(1), 1_000).unwrap();
        let waiting = {
            let gate = gate.clone();
            std::thread::spawn(move || gate.admit(id(2), 1))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!waiting.is_finished());
        gate.close();
        assert!(waiting.join().unwrap().is_err());
        assert!(gate.admit(id(3), 1).is_err());
    }
}
