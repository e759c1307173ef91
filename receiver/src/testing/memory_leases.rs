//! [`MemoryLeaseStore`]: a lease table in memory, for model tests that run many cases.

use std::collections::BTreeMap;
use std::sync::Mutex;

use crate::lease::rules;
use crate::{Checkpoint, Lease, LeaseError, LeaseFence, LeaseStore};

/// A [`LeaseStore`] in memory. It applies the same contract rules as the local and `DynamoDB`
/// stores (and passes the same conformance suite), without I/O, so model tests can run
/// thousands of lease operations per case.
#[derive(Debug, Default)]
pub struct MemoryLeaseStore {
    leases: Mutex<BTreeMap<String, Lease>>,
}

impl MemoryLeaseStore {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    fn update(
        &self,
        lease_key: &str,
        f: impl FnOnce(&mut Lease) -> Result<(), LeaseError>,
    ) -> Result<Lease, LeaseError> {
        let mut leases = self.leases.lock().expect("memory leases");
        let stored = leases.get_mut(lease_key).ok_or_else(|| LeaseError::NotFound {
            lease_key: lease_key.to_owned(),
        })?;
        // Apply to a copy: a failed write changes nothing.
        let mut changed = stored.clone();
        f(&mut changed)?;
        *stored = changed.clone();
        Ok(changed)
    }
}

impl LeaseStore for MemoryLeaseStore {
    fn create_lease_if_absent(&self, lease: &Lease) -> Result<bool, LeaseError> {
        let mut leases = self.leases.lock().expect("memory leases");
        if leases.contains_key(&lease.lease_key) {
            return Ok(false);
        }
        leases.insert(lease.lease_key.clone(), lease.clone());
        Ok(true)
    }
    fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>, LeaseError> {
        Ok(self.leases.lock().expect("memory leases").get(lease_key).cloned())
    }
    fn list_leases(&self) -> Result<Vec<Lease>, LeaseError> {
        Ok(self.leases.lock().expect("memory leases").values().cloned().collect())
    }
    fn take_lease(&self, lease_key: &str, expected_counter: u64, new_owner: &str) -> Result<Lease, LeaseError> {
        self.update(lease_key, |l| rules::take(l, expected_counter, new_owner))
    }
    fn adopt_lease(
        &self,
        lease_key: &str,
        expected_counter: u64,
        new_owner: &str,
        floor: &Checkpoint,
    ) -> Result<Lease, LeaseError> {
        self.update(lease_key, |l| rules::adopt(l, expected_counter, new_owner, floor))
    }
    fn renew_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<Lease, LeaseError> {
        self.update(lease_key, |l| rules::renew(l, fence))
    }
    fn checkpoint(&self, lease_key: &str, fence: &LeaseFence, checkpoint: &Checkpoint) -> Result<Lease, LeaseError> {
        self.update(lease_key, |l| rules::checkpoint(l, fence, checkpoint))
    }
    fn mark_shard_end(
        &self,
        lease_key: &str,
        fence: &LeaseFence,
        child_shard_ids: &[String],
    ) -> Result<Lease, LeaseError> {
        self.update(lease_key, |l| rules::shard_end(l, fence, child_shard_ids))
    }
    fn release_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<Lease, LeaseError> {
        self.update(lease_key, |l| rules::release(l, fence))
    }
}
