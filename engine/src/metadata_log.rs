//! The metadata log: the engine's durable record of blocks, batch allocations and completions.
//!
//! This is the Rust counterpart of Spark's `receivedBlockMetadata` write-ahead log. It holds only
//! **metadata** — block ids and the source ranges they cover — never record data: the data is
//! either in the block store or re-readable from the source by range.
//!
//! # Layout on the checkpoint location
//!
//! ```text
//! <checkpoint>/metadata/entry-<seq:020>.log     one append: JSON array of LogEvent + CRC-32C
//! <checkpoint>/metadata/snapshot-<seq:020>.log  compaction: the events that rebuild the state
//!                                                as of entry <seq>, same framing
//! ```
//!
//! Every append writes one new object, create-only and atomic (temp + fsync + rename locally,
//! conditional put on object stores), so an entry is either wholly present or absent — there is
//! no torn tail to repair. Each file ends with a CRC-32C of its body; a file that fails its check
//! is an error (the log is not silently truncated: losing metadata could lose data).
//!
//! Compaction writes a snapshot covering everything up to an entry, then deletes the entries and
//! older snapshots it covers. Recovery reads the newest valid snapshot, then the entries after it.

use std::sync::Mutex;

use serde::{Deserialize, Serialize};
use std::sync::Arc;

use sluice_blockstore::{BlockId, BlockMeta, Position};

use crate::checkpoint_store::CheckpointStore;
use crate::{Error, Result};

/// One event in the metadata log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event")]
pub enum LogEvent {
    /// A block was stored; its ranges may now be checkpointed at the source.
    BlockAdded {
        /// The block's id, ranges and size.
        meta: BlockMeta,
    },
    /// These blocks form the batch at `time_ms`; its jobs may now run.
    BatchAllocated {
        /// Batch time.
        time_ms: i64,
        /// The blocks, in order.
        blocks: Vec<BlockId>,
    },
    /// The batch's output is committed and its state snapshotted.
    BatchCompleted {
        /// Batch time.
        time_ms: i64,
    },
    /// Metadata of batches before `before_ms` (and their blocks) may be forgotten.
    Cleanup {
        /// Batch times strictly below this are cleaned.
        before_ms: i64,
    },
    /// Written by compaction only: the last logged position of every shard, so that the resume
    /// point of a shard survives the cleanup of the blocks that carried it.
    ShardPositions {
        /// `(stream, shard, last logged position)`.
        positions: Vec<(Arc<str>, Arc<str>, Position)>,
    },
}

const ENTRY_PREFIX: &str = "entry-";
const SNAPSHOT_PREFIX: &str = "snapshot-";
const SUFFIX: &str = ".log";

/// The append-only, checksummed metadata log.
#[derive(Debug)]
pub struct MetadataLog {
    store: CheckpointStore,
    next_seq: Mutex<u64>,
}

fn frame(events: &[LogEvent]) -> Result<Vec<u8>> {
    let mut body = serde_json::to_vec(events).map_err(|e| Error::Internal(format!("encode log events: {e}")))?;
    let crc = crc32c::crc32c(&body);
    body.extend_from_slice(&crc.to_le_bytes());
    Ok(body)
}

fn unframe(name: &str, bytes: &[u8]) -> Result<Vec<LogEvent>> {
    let corrupt = |detail: String| Error::CorruptMetadata {
        file: name.to_owned(),
        detail,
    };
    if bytes.len() < 4 {
        return Err(corrupt("shorter than its checksum".into()));
    }
    let (body, crc) = bytes.split_at(bytes.len() - 4);
    let stored = u32::from_le_bytes(crc.try_into().expect("4 bytes"));
    if crc32c::crc32c(body) != stored {
        return Err(corrupt("CRC-32C mismatch".into()));
    }
    serde_json::from_slice(body).map_err(|e| corrupt(format!("bad JSON: {e}")))
}

fn parse_name(name: &str, prefix: &str) -> Option<u64> {
    name.strip_prefix(prefix)?.strip_suffix(SUFFIX)?.parse().ok()
}

impl MetadataLog {
    /// Opens (or creates) the log under `<checkpoint>/metadata`.
    ///
    /// # Errors
    /// Storage errors listing the location.
    pub fn open(checkpoint: &CheckpointStore) -> Result<Self> {
        let store = checkpoint.child("metadata");
        let next = store
            .list()?
            .iter()
            .filter_map(|n| parse_name(n, ENTRY_PREFIX).or_else(|| parse_name(n, SNAPSHOT_PREFIX)))
            .max()
            .map_or(0, |s| s + 1);
        Ok(Self {
            store,
            next_seq: Mutex::new(next),
        })
    }

    /// Durably appends `events` as one entry. Returns once the entry is durable.
    ///
    /// # Errors
    /// Storage errors; on error nothing was appended and the caller must not act as if it was.
    pub fn append(&self, events: &[LogEvent]) -> Result<()> {
        let bytes = frame(events)?;
        let mut next = self.next_seq.lock().expect("metadata log lock");
        self.store
            .put_new(&format!("{ENTRY_PREFIX}{:020}{SUFFIX}", *next), &bytes)?;
        *next += 1;
        Ok(())
    }

    /// Reads every event in order: the newest valid snapshot, then the entries after it.
    ///
    /// # Errors
    /// [`Error::CorruptMetadata`] if an entry after the snapshot fails its checksum.
    pub fn read_all(&self) -> Result<Vec<LogEvent>> {
        let names = self.store.list()?;
        let mut snapshots: Vec<u64> = names.iter().filter_map(|n| parse_name(n, SNAPSHOT_PREFIX)).collect();
        snapshots.sort_unstable();
        let mut entries: Vec<u64> = names.iter().filter_map(|n| parse_name(n, ENTRY_PREFIX)).collect();
        entries.sort_unstable();
        let mut events = Vec::new();
        let mut after = None;
        if let Some(&seq) = snapshots.last() {
            let name = format!("{SNAPSHOT_PREFIX}{seq:020}{SUFFIX}");
            events = unframe(&name, &self.store.get(&name)?)?;
            after = Some(seq);
        }
        for seq in entries.into_iter().filter(|s| after.is_none_or(|a| *s > a)) {
            let name = format!("{ENTRY_PREFIX}{seq:020}{SUFFIX}");
            events.extend(unframe(&name, &self.store.get(&name)?)?);
        }
        Ok(events)
    }

    /// Replaces everything logged so far with `state` (the events that rebuild the current state),
    /// then deletes what the snapshot covers.
    ///
    /// The caller must hold off appends while it computes `state` and calls this, so that the
    /// snapshot covers exactly the entries written before it.
    ///
    /// # Errors
    /// Storage errors. A failed compaction leaves the log readable as before.
    pub fn compact(&self, state: &[LogEvent]) -> Result<()> {
        let bytes = frame(state)?;
        let mut next = self.next_seq.lock().expect("metadata log lock");
        let seq = *next;
        self.store
            .put_new(&format!("{SNAPSHOT_PREFIX}{seq:020}{SUFFIX}"), &bytes)?;
        *next += 1;
        drop(next);
        for name in self.store.list()? {
            let covered = parse_name(&name, ENTRY_PREFIX)
                .or_else(|| parse_name(&name, SNAPSHOT_PREFIX))
                .is_some_and(|s| s < seq);
            if covered {
                self.store.delete(&name)?;
            }
        }
        Ok(())
    }

    /// Number of files currently in the log (for tests and metrics).
    ///
    /// # Errors
    /// Storage errors.
    pub fn file_count(&self) -> Result<usize> {
        Ok(self.store.list()?.len())
    }
}
