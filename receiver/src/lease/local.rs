//! [`LocalLeaseStore`]: the lease table as one JSON file, for a single machine.
//!
//! The file holds every lease with the KCL attribute names, so it reads like a dump of the
//! `DynamoDB` table:
//!
//! ```json
//! {"format":1,"leases":[{"leaseKey":"shardId-000000000000","leaseOwner":"host-a","leaseCounter":7,
//!   "checkpoint":"10000000000000000000000000000000000000000000000000000016",
//!   "checkpointSubSequenceNumber":0,"ownerSwitchesSinceCheckpoint":0,"parentShardId":[],
//!   "childShardIds":[],"startingHashKey":"0","endingHashKey":"340282366920938463463374607431768211455"}]}
//! ```
//!
//! Every write takes an exclusive `flock` on `<file>.lock` (so several processes on the machine
//! can share the table), reads the file, applies the conditional update, and replaces the file
//! atomically (temporary file, fsync, rename, directory fsync). Reads need no lock: a rename is
//! atomic, so they see one complete version.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::{Checkpoint, Lease, LeaseError, LeaseFence, LeaseKind, LeaseStore, rules};
use crate::file_lock::{FileLock, replace_file};

/// A [`LeaseStore`] in a local JSON file; see the module docs of `receiver/src/lease/local.rs`.
///
/// ```
/// use sluice_receiver::{Checkpoint, Lease, LeaseStore, LocalLeaseStore};
/// let dir = tempfile::tempdir()?;
/// let store = LocalLeaseStore::open(dir.path().join("leases.json"))?;
/// assert!(store.create_lease_if_absent(&Lease::new("shard-0", Checkpoint::TrimHorizon))?);
/// let mine = store.take_lease("shard-0", 0, "worker-a")?;
/// assert_eq!(mine.lease_counter, 1);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct LocalLeaseStore {
    path: PathBuf,
    lock_path: PathBuf,
    /// `flock` does not exclude threads sharing one open file; this does.
    writers: Mutex<()>,
}

#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Table {
    format: u32,
    leases: Vec<Item>,
}

const FORMAT: u32 = 1;
/// `entityType` of worker leases (the `DynamoDB` store writes the same).
const WORKER_ENTITY: &str = "SLUICE_WORKER";

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct Item {
    lease_key: String,
    /// Absent for shard leases (as in a KCL 2.x table); `SLUICE_WORKER` for worker leases.
    #[serde(rename = "entityType", default, skip_serializing_if = "Option::is_none")]
    entity_type: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    lease_owner: Option<String>,
    lease_counter: u64,
    checkpoint: String,
    checkpoint_sub_sequence_number: u64,
    owner_switches_since_checkpoint: u64,
    #[serde(rename = "parentShardId", default)]
    parent_shard_ids: BTreeSet<String>,
    #[serde(default)]
    child_shard_ids: BTreeSet<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    starting_hash_key: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    ending_hash_key: Option<String>,
}

impl Item {
    fn from_lease(lease: &Lease) -> Self {
        let (checkpoint, sub) = lease.checkpoint.to_kcl();
        Self {
            lease_key: lease.lease_key.clone(),
            entity_type: match lease.kind {
                LeaseKind::Shard => None,
                LeaseKind::Worker => Some(WORKER_ENTITY.to_owned()),
            },
            lease_owner: lease.lease_owner.clone(),
            lease_counter: lease.lease_counter,
            checkpoint,
            checkpoint_sub_sequence_number: sub,
            owner_switches_since_checkpoint: lease.owner_switches_since_checkpoint,
            parent_shard_ids: lease.parent_shard_ids.clone(),
            child_shard_ids: lease.child_shard_ids.clone(),
            starting_hash_key: lease.hash_key_range.map(|(s, _)| s.to_string()),
            ending_hash_key: lease.hash_key_range.map(|(_, e)| e.to_string()),
        }
    }

    fn to_lease(&self, location: &Path) -> Result<Lease, LeaseError> {
        let corrupt = |detail: String| LeaseError::Corrupt {
            location: format!("{} lease {}", location.display(), self.lease_key),
            detail,
        };
        let hash = |key: &Option<String>| -> Result<Option<u128>, LeaseError> {
            key.as_deref()
                .map(|k| k.parse::<u128>().map_err(|e| corrupt(format!("hash key {k:?}: {e}"))))
                .transpose()
        };
        let hash_key_range = match (hash(&self.starting_hash_key)?, hash(&self.ending_hash_key)?) {
            (Some(s), Some(e)) => Some((s, e)),
            (None, None) => None,
            _ => return Err(corrupt("only one end of the hash key range is set".into())),
        };
        let kind = match self.entity_type.as_deref() {
            None | Some("LEASE") => LeaseKind::Shard,
            Some(WORKER_ENTITY) => LeaseKind::Worker,
            Some(other) => return Err(corrupt(format!("unknown entityType {other:?}"))),
        };
        Ok(Lease {
            lease_key: self.lease_key.clone(),
            kind,
            lease_owner: self.lease_owner.clone(),
            lease_counter: self.lease_counter,
            checkpoint: Checkpoint::from_kcl(&self.checkpoint, self.checkpoint_sub_sequence_number)
                .map_err(|e| corrupt(e.to_string()))?,
            owner_switches_since_checkpoint: self.owner_switches_since_checkpoint,
            parent_shard_ids: self.parent_shard_ids.clone(),
            child_shard_ids: self.child_shard_ids.clone(),
            hash_key_range,
        })
    }
}

impl LocalLeaseStore {
    /// Opens the table in `path`, creating it (and its directory) empty if it does not exist.
    ///
    /// # Errors
    /// [`LeaseError::Io`] if the file cannot be created or read; [`LeaseError::Corrupt`] if it is
    /// not a lease table.
    pub fn open(path: impl AsRef<Path>) -> Result<Self, LeaseError> {
        let path = path.as_ref().to_owned();
        let io = |source| LeaseError::Io {
            path: path.clone(),
            source,
        };
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).map_err(io)?;
        }
        let mut lock_path = path.as_os_str().to_owned();
        lock_path.push(".lock");
        let store = Self {
            path,
            lock_path: PathBuf::from(lock_path),
            writers: Mutex::new(()),
        };
        store.update(|_| Ok(((), false)))?;
        Ok(store)
    }

    /// The table file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> LeaseError {
        LeaseError::Io {
            path: self.path.clone(),
            source,
        }
    }

    fn read(&self) -> Result<Vec<Lease>, LeaseError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(self.io(e)),
        };
        let table: Table = serde_json::from_slice(&bytes).map_err(|e| LeaseError::Corrupt {
            location: self.path.display().to_string(),
            detail: e.to_string(),
        })?;
        if table.format != FORMAT {
            return Err(LeaseError::Corrupt {
                location: self.path.display().to_string(),
                detail: format!("unknown format {}; this build reads format {FORMAT}", table.format),
            });
        }
        table.leases.iter().map(|item| item.to_lease(&self.path)).collect()
    }

    /// Read-modify-write under both locks; `f` returns its result and whether to write.
    fn update<T>(&self, f: impl FnOnce(&mut Vec<Lease>) -> Result<(T, bool), LeaseError>) -> Result<T, LeaseError> {
        let _threads = self.writers.lock().expect("lease store lock");
        let _process = FileLock::exclusive(&self.lock_path).map_err(|e| self.io(e))?;
        let exists = self.path.exists();
        let mut leases = self.read()?;
        let (result, write) = f(&mut leases)?;
        if write || !exists {
            leases.sort_by(|a, b| a.lease_key.cmp(&b.lease_key));
            let table = Table {
                format: FORMAT,
                leases: leases.iter().map(Item::from_lease).collect(),
            };
            let bytes = serde_json::to_vec_pretty(&table).expect("lease table serializes");
            replace_file(&self.path, &bytes).map_err(|e| self.io(e))?;
        }
        Ok(result)
    }

    fn update_one(
        &self,
        lease_key: &str,
        f: impl FnOnce(&mut Lease) -> Result<(), LeaseError>,
    ) -> Result<Lease, LeaseError> {
        self.update(|leases| {
            let lease = leases
                .iter_mut()
                .find(|l| l.lease_key == lease_key)
                .ok_or_else(|| LeaseError::NotFound {
                    lease_key: lease_key.to_owned(),
                })?;
            f(lease)?;
            Ok((lease.clone(), true))
        })
    }
}

impl LeaseStore for LocalLeaseStore {
    fn create_lease_if_absent(&self, lease: &Lease) -> Result<bool, LeaseError> {
        self.update(|leases| {
            if leases.iter().any(|l| l.lease_key == lease.lease_key) {
                return Ok((false, false));
            }
            leases.push(lease.clone());
            Ok((true, true))
        })
    }

    fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>, LeaseError> {
        Ok(self.read()?.into_iter().find(|l| l.lease_key == lease_key))
    }

    fn list_leases(&self) -> Result<Vec<Lease>, LeaseError> {
        let mut leases = self.read()?;
        leases.sort_by(|a, b| a.lease_key.cmp(&b.lease_key));
        Ok(leases)
    }

    fn take_lease(&self, lease_key: &str, expected_counter: u64, new_owner: &str) -> Result<Lease, LeaseError> {
        self.update_one(lease_key, |l| rules::take(l, expected_counter, new_owner))
    }

    fn adopt_lease(
        &self,
        lease_key: &str,
        expected_counter: u64,
        new_owner: &str,
        floor: &Checkpoint,
    ) -> Result<Lease, LeaseError> {
        self.update_one(lease_key, |l| rules::adopt(l, expected_counter, new_owner, floor))
    }

    fn renew_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<Lease, LeaseError> {
        self.update_one(lease_key, |l| rules::renew(l, fence))
    }

    fn checkpoint(&self, lease_key: &str, fence: &LeaseFence, checkpoint: &Checkpoint) -> Result<Lease, LeaseError> {
        self.update_one(lease_key, |l| rules::checkpoint(l, fence, checkpoint))
    }

    fn mark_shard_end(
        &self,
        lease_key: &str,
        fence: &LeaseFence,
        child_shard_ids: &[String],
    ) -> Result<Lease, LeaseError> {
        self.update_one(lease_key, |l| rules::shard_end(l, fence, child_shard_ids))
    }

    fn release_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<Lease, LeaseError> {
        self.update_one(lease_key, |l| rules::release(l, fence))
    }
}
