//! Leases and checkpoints: which worker reads which shard, and how far it has safely got.
//!
//! The model is the KCL lease table (see `shared/reference/kcl.md` §1, §3, §4), so the `DynamoDB`
//! implementation can share a table with Java KCL workers and both implementations pass the same
//! conformance suite (`sluice_receiver::testing::lease_store_conformance`, behind the `testing`
//! feature):
//!
//! | KCL attribute | [`Lease`] field |
//! |---|---|
//! | `leaseKey` | `lease_key` (the shard id) |
//! | `leaseOwner` | `lease_owner` (absent: unassigned) |
//! | `leaseCounter` | `lease_counter` (heartbeat and fencing token) |
//! | `checkpoint` + `checkpointSubSequenceNumber` | `checkpoint` ([`Checkpoint`]) |
//! | `ownerSwitchesSinceCheckpoint` | `owner_switches_since_checkpoint` |
//! | `parentShardId` (string set) | `parent_shard_ids` |
//! | `childShardIds` (string set) | `child_shard_ids` |
//! | `startingHashKey`, `endingHashKey` | `hash_key_range` |
//!
//! Every write is conditional. Renewals, checkpoints and releases are fenced on the owner **and**
//! the counter (KCL fences checkpoints on the counter only); a take (or a steal) is conditional on
//! the counter the taker observed. Any successful write bumps the counter, so a worker that lost
//! its lease — even to a worker with the same id — can no longer write.

#[cfg(feature = "kinesis")]
mod dynamodb;
mod local;
mod workers;

use std::cmp::Ordering;
use std::collections::BTreeSet;
use std::fmt;
use std::path::PathBuf;

use sluice_blockstore::{Position, SequenceNumber};

#[cfg(feature = "kinesis")]
pub use dynamodb::{DynamoConnectError, DynamoLeaseMetrics, DynamoLeaseOptions, DynamoLeaseStore};
pub use local::LocalLeaseStore;
pub use workers::{WORKER_LEASE_PREFIX, WorkerDirectory, WorkerRegistry, WorkerScan, WorkerStatus, worker_lease_key};

/// Splits a KCL multi-stream lease key `account:stream:creationEpoch:shardId` into the stream
/// identifier (`account:stream:creationEpoch`) and the shard id; `None` for any other key (a
/// plain shard id, a worker lease).
///
/// ```
/// use sluice_receiver::split_multi_stream_key;
/// assert_eq!(
///     split_multi_stream_key("123456789012:clicks:1700000000:shardId-000000000001"),
///     Some(("123456789012:clicks:1700000000", "shardId-000000000001"))
/// );
/// assert_eq!(split_multi_stream_key("shardId-000000000001"), None);
/// ```
pub fn split_multi_stream_key(key: &str) -> Option<(&str, &str)> {
    let (identifier, shard) = key.rsplit_once(':')?;
    let parts: Vec<&str> = identifier.split(':').collect();
    (parts.len() == 3 && parts.iter().all(|p| !p.is_empty()) && !shard.is_empty()).then_some((identifier, shard))
}

/// How far a shard has been processed: a position, or one of the KCL sentinels.
///
/// Ordered like KCL's `ExtendedSequenceNumber`: `AtTimestamp < TrimHorizon < Latest <` every
/// position (by sequence number, then sub-sequence number) `< ShardEnd`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Checkpoint {
    /// Nothing processed yet; start at the oldest record (`TRIM_HORIZON`).
    TrimHorizon,
    /// Nothing processed yet; start at the newest record (`LATEST`).
    Latest,
    /// Nothing processed yet; start at the configured timestamp (`AT_TIMESTAMP`).
    AtTimestamp,
    /// Every record up to and including this position is processed.
    Position(Position),
    /// The shard is closed and every record of it is processed (`SHARD_END`): its children may
    /// start.
    ShardEnd,
}

impl Checkpoint {
    /// The KCL string form of `checkpoint` and the `checkpointSubSequenceNumber`.
    pub fn to_kcl(&self) -> (String, u64) {
        match self {
            Checkpoint::TrimHorizon => ("TRIM_HORIZON".into(), 0),
            Checkpoint::Latest => ("LATEST".into(), 0),
            Checkpoint::AtTimestamp => ("AT_TIMESTAMP".into(), 0),
            Checkpoint::ShardEnd => ("SHARD_END".into(), 0),
            Checkpoint::Position(p) => (p.sequence.to_string(), p.sub_sequence),
        }
    }

    /// Parses the KCL string form.
    ///
    /// # Errors
    /// [`LeaseError::Corrupt`] when `checkpoint` is neither a sentinel nor a sequence number.
    pub fn from_kcl(checkpoint: &str, sub_sequence: u64) -> Result<Self, LeaseError> {
        Ok(match checkpoint {
            "TRIM_HORIZON" => Checkpoint::TrimHorizon,
            "LATEST" => Checkpoint::Latest,
            "AT_TIMESTAMP" => Checkpoint::AtTimestamp,
            "SHARD_END" => Checkpoint::ShardEnd,
            other => Checkpoint::Position(Position::new(
                SequenceNumber::parse(other).map_err(|e| LeaseError::Corrupt {
                    location: "checkpoint".into(),
                    detail: e.to_string(),
                })?,
                sub_sequence,
            )),
        })
    }

    /// Whether this is a sentinel that only a new lease carries (not a processed position).
    pub fn is_initial(&self) -> bool {
        matches!(
            self,
            Checkpoint::TrimHorizon | Checkpoint::Latest | Checkpoint::AtTimestamp
        )
    }

    fn rank(&self) -> i8 {
        match self {
            Checkpoint::AtTimestamp => -3,
            Checkpoint::TrimHorizon => -2,
            Checkpoint::Latest => -1,
            Checkpoint::Position(_) => 0,
            Checkpoint::ShardEnd => 1,
        }
    }
}

impl Ord for Checkpoint {
    fn cmp(&self, other: &Self) -> Ordering {
        match (self, other) {
            (Checkpoint::Position(a), Checkpoint::Position(b)) => a.cmp(b),
            _ => self.rank().cmp(&other.rank()),
        }
    }
}

impl PartialOrd for Checkpoint {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl fmt::Display for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Checkpoint::Position(p) => write!(f, "{p}"),
            other => f.write_str(&other.to_kcl().0),
        }
    }
}

/// What a lease stands for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum LeaseKind {
    /// A shard of the stream (KCL `entityType` `LEASE`).
    #[default]
    Shard,
    /// A worker and its metadata log (`entityType` `SLUICE_WORKER`, key
    /// [`worker_lease_key`]): held by the worker while it runs, by an adopter after the worker
    /// died, and unowned once the worker's log has no work left. See [`WorkerRegistry`].
    Worker,
}

/// One lease, as stored: a shard's (the KCL lease) or a worker's ([`LeaseKind::Worker`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Lease {
    /// The shard id (`leaseKey`), or [`worker_lease_key`] of a worker.
    pub lease_key: String,
    /// Shard or worker.
    pub kind: LeaseKind,
    /// The worker holding the lease (`leaseOwner`); `None` when unassigned.
    pub lease_owner: Option<String>,
    /// Bumped by every successful write (`leaseCounter`); the fencing token.
    pub lease_counter: u64,
    /// How far the shard is processed (`checkpoint` + `checkpointSubSequenceNumber`).
    pub checkpoint: Checkpoint,
    /// Owner changes since the last checkpoint (`ownerSwitchesSinceCheckpoint`).
    pub owner_switches_since_checkpoint: u64,
    /// Parent shards (`parentShardId`, a string set): this shard starts after they end.
    pub parent_shard_ids: BTreeSet<String>,
    /// Child shards (`childShardIds`), written at `SHARD_END`.
    pub child_shard_ids: BTreeSet<String>,
    /// The inclusive hash-key range of the shard (`startingHashKey`, `endingHashKey`).
    pub hash_key_range: Option<(u128, u128)>,
}

impl Lease {
    /// A new, unassigned lease for `shard_id` starting at `checkpoint`.
    pub fn new(shard_id: impl Into<String>, checkpoint: Checkpoint) -> Self {
        Self {
            lease_key: shard_id.into(),
            kind: LeaseKind::Shard,
            lease_owner: None,
            lease_counter: 0,
            checkpoint,
            owner_switches_since_checkpoint: 0,
            parent_shard_ids: BTreeSet::new(),
            child_shard_ids: BTreeSet::new(),
            hash_key_range: None,
        }
    }

    /// A new, unassigned worker lease for `worker_id`.
    pub fn worker(worker_id: &str) -> Self {
        Self {
            kind: LeaseKind::Worker,
            ..Self::new(worker_lease_key(worker_id), Checkpoint::TrimHorizon)
        }
    }

    /// The fence a holder writes with: the current owner and counter (`None` if unassigned).
    pub fn fence(&self) -> Option<LeaseFence> {
        self.lease_owner.as_ref().map(|owner| LeaseFence {
            owner: owner.clone(),
            counter: self.lease_counter,
        })
    }
}

/// What a holder proves when it writes: it is `owner` and saw `counter`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct LeaseFence {
    /// The worker id.
    pub owner: String,
    /// The counter the worker last wrote or read.
    pub counter: u64,
}

/// Why a lease operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LeaseError {
    /// The condition of a conditional write did not hold: the lease was taken, renewed or
    /// released by someone else (the caller's view is stale), or the caller does not own it.
    /// Not retryable with the same expectation; re-read the lease.
    #[error("conditional write on lease {lease_key} failed: {detail}")]
    ConditionFailed {
        /// The lease.
        lease_key: String,
        /// Expected versus found.
        detail: String,
    },
    /// No lease with this key. Not retryable.
    #[error("no lease {lease_key}")]
    NotFound {
        /// The lease.
        lease_key: String,
    },
    /// The checkpoint would move backwards (or to an initial sentinel). Not retryable.
    #[error("checkpoint of lease {lease_key} cannot move from {current} to {proposed}")]
    CheckpointRegression {
        /// The lease.
        lease_key: String,
        /// The stored checkpoint.
        current: Checkpoint,
        /// The rejected one.
        proposed: Checkpoint,
    },
    /// The store throttled the request. Retryable after a backoff.
    #[error("lease store throttled: {detail}")]
    Throttled {
        /// What the store said.
        detail: String,
    },
    /// A local file operation failed. Retryable (the file may be busy or the disk full).
    #[error("lease store I/O error on {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The cause.
        source: std::io::Error,
    },
    /// The stored table cannot be parsed. Not retryable.
    #[error("corrupt lease table at {location}: {detail}")]
    Corrupt {
        /// File or item.
        location: String,
        /// What is wrong.
        detail: String,
    },
    /// A transient failure of a remote store. Retryable.
    #[error("lease store unavailable: {detail}")]
    Unavailable {
        /// What failed.
        detail: String,
        /// The cause.
        #[source]
        source: Option<Box<dyn std::error::Error + Send + Sync>>,
    },
}

impl LeaseError {
    /// Whether retrying the same call may succeed.
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    /// Where the error comes from and whether it is retryable.
    pub fn class(&self) -> sluice_blockstore::ErrorClass {
        use sluice_blockstore::{Domain, ErrorClass};
        match self {
            LeaseError::Throttled { .. } | LeaseError::Io { .. } | LeaseError::Unavailable { .. } => {
                ErrorClass::transient(Domain::Lease)
            }
            LeaseError::ConditionFailed { .. }
            | LeaseError::NotFound { .. }
            | LeaseError::CheckpointRegression { .. } => ErrorClass::permanent(Domain::Lease),
            LeaseError::Corrupt { .. } => ErrorClass::permanent(Domain::Corrupt),
        }
    }

    /// Whether this means the caller no longer holds the lease (it must stop processing the
    /// shard and write nothing more for it).
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, LeaseError::ConditionFailed { .. } | LeaseError::NotFound { .. })
    }
}

/// A table of shard leases and checkpoints shared by the workers reading one stream.
///
/// # Contract
/// - Every operation is atomic with respect to every other operation on the same table, from any
///   thread or process (the local file uses a lock file; `DynamoDB` conditional writes).
/// - Every successful write increments `lease_counter` by exactly one and returns the lease as
///   stored after the write; a failed write changes nothing.
/// - `take_lease` succeeds only if the stored counter equals `expected_counter` (a steal is a take
///   of a lease someone else owns). It sets the owner and adds one to
///   `owner_switches_since_checkpoint` when the owner changes. `adopt_lease` is a take that also
///   raises the checkpoint to a floor, atomically.
/// - `list_leases` returns leases of every [`LeaseKind`]; shard logic must filter.
/// - `renew_lease`, `checkpoint`, `mark_shard_end` and `release_lease` succeed only if the stored
///   owner **and** counter equal the fence; otherwise [`LeaseError::ConditionFailed`] (the lease
///   was lost: the caller must stop writing for it).
/// - Checkpoints never move backwards: `checkpoint` with a value below the stored one, or with an
///   initial sentinel, is [`LeaseError::CheckpointRegression`] and changes nothing. An equal value
///   is accepted (idempotent retry). A checkpoint resets `owner_switches_since_checkpoint` to 0.
/// - `mark_shard_end` stores `SHARD_END` and the child shard ids; it is only called after every
///   record of the shard is durable downstream.
/// - Unknown keys are [`LeaseError::NotFound`].
pub trait LeaseStore: Send + Sync + fmt::Debug {
    /// Creates `lease` as given unless a lease with its key exists; returns whether it created
    /// it.
    ///
    /// # Errors
    /// Store failures ([`LeaseError::is_retryable`] says which are transient).
    fn create_lease_if_absent(&self, lease: &Lease) -> Result<bool, LeaseError>;

    /// Reads one lease.
    ///
    /// # Errors
    /// Store failures.
    fn get_lease(&self, lease_key: &str) -> Result<Option<Lease>, LeaseError>;

    /// Reads every lease, ordered by key.
    ///
    /// # Errors
    /// Store failures.
    fn list_leases(&self) -> Result<Vec<Lease>, LeaseError>;

    /// Takes (or steals) a lease for `new_owner` if its counter is still `expected_counter`.
    ///
    /// # Errors
    /// [`LeaseError::ConditionFailed`] if the counter moved; [`LeaseError::NotFound`].
    fn take_lease(&self, lease_key: &str, expected_counter: u64, new_owner: &str) -> Result<Lease, LeaseError>;

    /// Takes a lease for `new_owner` if its counter is still `expected_counter` **and** raises
    /// its checkpoint to at least `floor`, in one write. An adopter uses it to take a dead
    /// worker's shard at the position that worker's log ends: a crash between a take and a
    /// separate checkpoint would hand the shard on at a position some records past which are
    /// already logged (and so processed) elsewhere. A `SHARD_END` lease keeps `SHARD_END`; an
    /// initial-sentinel floor changes nothing.
    ///
    /// # Errors
    /// [`LeaseError::ConditionFailed`] if the counter moved; [`LeaseError::NotFound`].
    fn adopt_lease(
        &self,
        lease_key: &str,
        expected_counter: u64,
        new_owner: &str,
        floor: &Checkpoint,
    ) -> Result<Lease, LeaseError>;

    /// Renews a held lease (a heartbeat: bumps the counter).
    ///
    /// # Errors
    /// [`LeaseError::ConditionFailed`] if the lease was lost.
    fn renew_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<Lease, LeaseError>;

    /// Records that every record up to `checkpoint` is processed.
    ///
    /// # Errors
    /// [`LeaseError::ConditionFailed`] if the lease was lost;
    /// [`LeaseError::CheckpointRegression`] if it would move backwards.
    fn checkpoint(&self, lease_key: &str, fence: &LeaseFence, checkpoint: &Checkpoint) -> Result<Lease, LeaseError>;

    /// Records `SHARD_END` and the shard's children.
    ///
    /// # Errors
    /// [`LeaseError::ConditionFailed`] if the lease was lost.
    fn mark_shard_end(
        &self,
        lease_key: &str,
        fence: &LeaseFence,
        child_shard_ids: &[String],
    ) -> Result<Lease, LeaseError>;

    /// Gives a held lease up (clears the owner) so another worker can take it at once.
    ///
    /// # Errors
    /// [`LeaseError::ConditionFailed`] if the lease was already lost.
    fn release_lease(&self, lease_key: &str, fence: &LeaseFence) -> Result<Lease, LeaseError>;

    /// The store's own counters (calls, throttles, …) for monitoring; none by default. Must be
    /// cheap (no call to the store): the engine reads them on every metrics scrape.
    fn counters(&self) -> Vec<crate::NamedCounter> {
        Vec::new()
    }
}

/// Applies the contract's conditions to an in-memory table entry; shared by implementations that
/// read, modify and write the whole lease (the local file; test doubles).
pub(crate) mod rules {
    use super::{Checkpoint, Lease, LeaseError, LeaseFence};

    pub(crate) fn check_fence(lease: &Lease, fence: &LeaseFence) -> Result<(), LeaseError> {
        if lease.lease_owner.as_deref() != Some(fence.owner.as_str()) || lease.lease_counter != fence.counter {
            return Err(LeaseError::ConditionFailed {
                lease_key: lease.lease_key.clone(),
                detail: format!(
                    "expected owner {} with counter {}, found owner {} with counter {}",
                    fence.owner,
                    fence.counter,
                    lease.lease_owner.as_deref().unwrap_or("(none)"),
                    lease.lease_counter
                ),
            });
        }
        Ok(())
    }

    pub(crate) fn take(lease: &mut Lease, expected_counter: u64, new_owner: &str) -> Result<(), LeaseError> {
        if lease.lease_counter != expected_counter {
            return Err(LeaseError::ConditionFailed {
                lease_key: lease.lease_key.clone(),
                detail: format!(
                    "expected counter {expected_counter}, found {} (owner {})",
                    lease.lease_counter,
                    lease.lease_owner.as_deref().unwrap_or("(none)")
                ),
            });
        }
        if lease.lease_owner.as_deref() != Some(new_owner) {
            lease.owner_switches_since_checkpoint += 1;
        }
        lease.lease_owner = Some(new_owner.to_owned());
        lease.lease_counter += 1;
        Ok(())
    }

    pub(crate) fn adopt(
        lease: &mut Lease,
        expected_counter: u64,
        new_owner: &str,
        floor: &Checkpoint,
    ) -> Result<(), LeaseError> {
        take(lease, expected_counter, new_owner)?;
        if !floor.is_initial() && *floor > lease.checkpoint {
            lease.checkpoint = floor.clone();
            lease.owner_switches_since_checkpoint = 0;
        }
        Ok(())
    }

    pub(crate) fn renew(lease: &mut Lease, fence: &LeaseFence) -> Result<(), LeaseError> {
        check_fence(lease, fence)?;
        lease.lease_counter += 1;
        Ok(())
    }

    pub(crate) fn checkpoint(lease: &mut Lease, fence: &LeaseFence, checkpoint: &Checkpoint) -> Result<(), LeaseError> {
        check_fence(lease, fence)?;
        if checkpoint.is_initial() || *checkpoint < lease.checkpoint {
            return Err(LeaseError::CheckpointRegression {
                lease_key: lease.lease_key.clone(),
                current: lease.checkpoint.clone(),
                proposed: checkpoint.clone(),
            });
        }
        lease.checkpoint = checkpoint.clone();
        lease.owner_switches_since_checkpoint = 0;
        lease.lease_counter += 1;
        Ok(())
    }

    pub(crate) fn shard_end(lease: &mut Lease, fence: &LeaseFence, children: &[String]) -> Result<(), LeaseError> {
        checkpoint(lease, fence, &Checkpoint::ShardEnd)?;
        lease.child_shard_ids.extend(children.iter().cloned());
        Ok(())
    }

    pub(crate) fn release(lease: &mut Lease, fence: &LeaseFence) -> Result<(), LeaseError> {
        check_fence(lease, fence)?;
        lease.lease_owner = None;
        lease.lease_counter += 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pos(seq: &str, sub: u64) -> Checkpoint {
        Checkpoint::Position(Position::new(seq.parse().unwrap(), sub))
    }

    #[test]
    fn checkpoints_order_like_kcl() {
        let mut all = vec![
            Checkpoint::ShardEnd,
            pos("10", 0),
            pos("9", 5),
            Checkpoint::Latest,
            pos("10", 1),
            Checkpoint::TrimHorizon,
            Checkpoint::AtTimestamp,
        ];
        all.sort();
        assert_eq!(
            all,
            [
                Checkpoint::AtTimestamp,
                Checkpoint::TrimHorizon,
                Checkpoint::Latest,
                pos("9", 5),
                pos("10", 0),
                pos("10", 1),
                Checkpoint::ShardEnd
            ]
        );
    }

    #[test]
    fn kcl_round_trip() {
        for c in [
            Checkpoint::TrimHorizon,
            Checkpoint::Latest,
            Checkpoint::AtTimestamp,
            Checkpoint::ShardEnd,
            pos("49590338271490256608559692538361571095921575989136588898", 3),
        ] {
            let (s, sub) = c.to_kcl();
            assert_eq!(Checkpoint::from_kcl(&s, sub).unwrap(), c);
        }
        assert!(Checkpoint::from_kcl("NOPE", 0).is_err());
    }
}
