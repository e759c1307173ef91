//! The metadata log: a worker's durable record of blocks, batch allocations and completions.
//!
//! This is the Rust counterpart of Spark's `receivedBlockMetadata` write-ahead log. It holds only
//! **metadata** — block ids and the source ranges they cover — never record data: the data is
//! either in the block store or re-readable from the source by range.
//!
//! # Layout on the checkpoint location
//!
//! ```text
//! <checkpoint>/workers/<worker id>/metadata/entry-<seq:020>.log   JSON array of LogEvent + CRC-32C
//! ```
//!
//! Every append — events, a claim, a compaction — writes one new object at the next sequence
//! number, **create-only** and atomic (a hard link locally, a conditional put on object stores),
//! so an entry is either wholly present or absent and two writers racing for one number get
//! exactly one winner. Each file ends with a CRC-32C of its body; a file that fails its check is
//! an error (the log is never silently truncated: losing metadata could lose data).
//!
//! # Claims and fencing
//!
//! A process may append only after it has **claimed** the log: [`MetadataLog::claim`] appends a
//! [`LogEvent::Claimed`] entry at the next free number and then reads the log. The previous
//! holder — a crashed process of the same worker, a paused "zombie", or an adopter that lost the
//! worker's lease — appends strictly in sequence, so its next append targets exactly the number
//! the claim took: the create-only write fails and the old holder gets [`Error::Fenced`]. It can
//! log no block and allocate no batch after that. Claim entries are **never deleted** (compaction
//! keeps them), so the fence outlives any compaction; a log accumulates one small file per claim.
//!
//! A write whose outcome is unknown (a timeout after the object may have landed) is resolved by
//! reading the entry back: the same bytes mean it landed, other bytes mean a claim fenced us.
//!
//! # Compaction
//!
//! A compaction entry starts with [`LogEvent::Compacted`] and holds the events that rebuild the
//! state as of that point; the entries before it are then deleted, except claims. Recovery reads
//! backwards from the newest entry to the newest compaction entry, and applies what it read in
//! order.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use sluice_blockstore::{BlockId, BlockMeta, Position};

use super::checkpoint_store::CheckpointStore;
use crate::{Error, Result};

/// One event in the metadata log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "event")]
#[non_exhaustive]
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
    /// A process took the log over; every earlier holder is fenced. Changes no state.
    Claimed {
        /// Who claimed it: the worker and its process incarnation, or the adopting worker.
        holder: String,
    },
    /// First event of a compaction entry: the events after it rebuild the whole state, and the
    /// entries before it are covered.
    Compacted,
}

const ENTRY_PREFIX: &str = "entry-";
const SUFFIX: &str = ".log";
/// Claims retried when other appends keep taking the next number (a zombie still appending).
const CLAIM_ATTEMPTS: usize = 64;

fn entry_name(seq: u64) -> String {
    format!("{ENTRY_PREFIX}{seq:020}{SUFFIX}")
}

fn parse_name(name: &str) -> Option<u64> {
    name.strip_prefix(ENTRY_PREFIX)?.strip_suffix(SUFFIX)?.parse().ok()
}

/// The append-only, checksummed, claimable metadata log.
#[derive(Debug)]
pub struct MetadataLog {
    store: CheckpointStore,
    #[cfg_attr(not(feature = "testing"), allow(dead_code, reason = "read by `holder()`, for tests"))]
    holder: String,
    cursor: Mutex<Cursor>,
}

#[derive(Debug, Default)]
struct Cursor {
    /// The number the next append takes.
    next_seq: u64,
    /// The newest compaction entry (entries below it are claims, or leftovers of an interrupted
    /// compaction that nothing reads).
    last_compaction: Option<u64>,
    /// The lowest entry this holder may delete at its next compaction.
    first_deletable: u64,
    /// Claim entries at or above `first_deletable`: compaction keeps them.
    claims: BTreeSet<u64>,
}

fn frame(events: &[LogEvent]) -> Result<Vec<u8>> {
    let mut body = serde_json::to_vec(events).map_err(|e| Error::Internal(format!("encode log events: {e}")))?;
    let crc = sluice_blockstore::crc32c(&body);
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
    if sluice_blockstore::crc32c(body) != stored {
        return Err(corrupt("CRC-32C mismatch".into()));
    }
    serde_json::from_slice(body).map_err(|e| corrupt(format!("bad JSON: {e}")))
}

impl MetadataLog {
    /// Opens (or creates) the log under `<checkpoint>/metadata` and claims it for `holder`:
    /// appends a [`LogEvent::Claimed`] entry at the next free number, which fences every earlier
    /// holder. Call [`read_all`](Self::read_all) next to recover what the log holds.
    ///
    /// # Errors
    /// Storage errors; [`Error::CorruptMetadata`] for a log in the pre-claim format (files named
    /// `snapshot-*`); [`Error::Fenced`] if other appends kept taking the next number.
    pub fn claim(checkpoint: &CheckpointStore, holder: &str) -> Result<Self> {
        let store = checkpoint.child("metadata");
        let bytes = frame(&[LogEvent::Claimed {
            holder: holder.to_owned(),
        }])?;
        for _ in 0..CLAIM_ATTEMPTS {
            let names = store.list()?;
            if let Some(old) = names.iter().find(|n| n.starts_with("snapshot-")) {
                return Err(Error::CorruptMetadata {
                    file: format!("{}/{old}", store.location()),
                    detail: "this metadata log was written by an older version of Sluice (before per-worker \
                             logs); finish it with that version, or delete the checkpoint location to start over"
                        .into(),
                });
            }
            let seq = names.iter().filter_map(|n| parse_name(n)).max().map_or(0, |s| s + 1);
            match write_entry(&store, seq, &bytes) {
                Ok(()) => {
                    return Ok(Self {
                        store,
                        holder: holder.to_owned(),
                        cursor: Mutex::new(Cursor {
                            next_seq: seq + 1,
                            last_compaction: None,
                            // Until `read_all` says otherwise, only what this holder writes.
                            first_deletable: seq,
                            claims: BTreeSet::from([seq]),
                        }),
                    });
                }
                // Someone appended at that number meanwhile: look again.
                Err(Error::Fenced { .. }) => {}
                Err(e) => return Err(e),
            }
        }
        Err(Error::Fenced {
            location: store.location(),
            by: "another process that kept appending".into(),
        })
    }

    #[cfg(feature = "testing")] // only `sluice_engine::internals` (tests) calls it
    /// Who holds this log.
    pub fn holder(&self) -> &str {
        &self.holder
    }

    /// Durably appends `events` as one entry. Returns once the entry is durable.
    ///
    /// # Errors
    /// [`Error::Fenced`] if a later claim took the log (nothing was appended; this holder must
    /// stop); other storage errors (nothing was appended; the next append reuses the number).
    pub fn append(&self, events: &[LogEvent]) -> Result<()> {
        let bytes = frame(events)?;
        let mut cursor = self.cursor.lock().expect("metadata log lock");
        write_entry(&self.store, cursor.next_seq, &bytes)?;
        cursor.next_seq += 1;
        Ok(())
    }

    /// Reads every event in order: the newest compaction entry, then the entries after it.
    ///
    /// # Errors
    /// [`Error::CorruptMetadata`] if an entry fails its checksum.
    pub fn read_all(&self) -> Result<Vec<LogEvent>> {
        let mut cursor = self.cursor.lock().expect("metadata log lock");
        let mut seqs: Vec<u64> = self.store.list()?.iter().filter_map(|n| parse_name(n)).collect();
        seqs.sort_unstable_by(|a, b| b.cmp(a));
        let mut newest_first: Vec<Vec<LogEvent>> = Vec::new();
        let mut first_read = 0;
        let next_seq = cursor.next_seq;
        for seq in seqs.into_iter().filter(|s| *s < next_seq) {
            let name = entry_name(seq);
            let Some(bytes) = self.store.get_if_exists(&name)? else {
                // Deleted by a compaction of an earlier holder: a compaction entry above covers it.
                continue;
            };
            let mut events = unframe(&name, &bytes)?;
            first_read = seq;
            match events.first() {
                Some(LogEvent::Compacted) => {
                    events.remove(0);
                    newest_first.push(events);
                    cursor.last_compaction = Some(seq);
                    break;
                }
                Some(LogEvent::Claimed { .. }) => {
                    cursor.claims.insert(seq);
                }
                _ => {}
            }
            newest_first.push(events);
        }
        cursor.first_deletable = first_read;
        Ok(newest_first.into_iter().rev().flatten().collect())
    }

    /// Replaces everything logged so far with `state` (the events that rebuild the current state):
    /// appends a compaction entry, then deletes the entries it covers — except claims, which
    /// fence earlier holders forever.
    ///
    /// The caller must hold off appends while it computes `state` and calls this, so that the
    /// compaction covers exactly the entries written before it.
    ///
    /// # Errors
    /// [`Error::Fenced`]; storage errors. A failed compaction leaves the log readable as before.
    pub fn compact(&self, state: &[LogEvent]) -> Result<()> {
        let mut events = Vec::with_capacity(state.len() + 1);
        events.push(LogEvent::Compacted);
        events.extend_from_slice(state);
        let bytes = frame(&events)?;
        let mut cursor = self.cursor.lock().expect("metadata log lock");
        let seq = cursor.next_seq;
        write_entry(&self.store, seq, &bytes)?;
        cursor.next_seq += 1;
        let covered: Vec<u64> = (cursor.first_deletable..seq)
            .filter(|s| !cursor.claims.contains(s))
            .collect();
        cursor.last_compaction = Some(seq);
        cursor.first_deletable = seq;
        cursor.claims.clear();
        drop(cursor);
        for s in covered {
            self.store.delete(&entry_name(s))?;
        }
        Ok(())
    }

    #[cfg(feature = "testing")] // only `sluice_engine::internals` (tests) calls it
    /// Number of files currently in the log (for tests and metrics).
    ///
    /// # Errors
    /// Storage errors.
    pub fn file_count(&self) -> Result<usize> {
        Ok(self.store.list()?.len())
    }
}

/// Writes entry `seq` create-only; resolves a conflict or an unknown outcome by reading it back.
fn write_entry(store: &CheckpointStore, seq: u64, bytes: &[u8]) -> Result<()> {
    let name = entry_name(seq);
    let outcome = store.put_new(&name, bytes);
    let conflict = match outcome {
        Ok(()) => return Ok(()),
        Err(Error::AlreadyExists { .. }) => true,
        Err(_) => false,
    };
    // Did an earlier attempt of ours land (a retried put), or did someone else write it?
    let found = match store.get_if_exists(&name) {
        Ok(found) => found,
        Err(_) if !conflict => return outcome,
        Err(e) => return Err(e),
    };
    match found {
        Some(existing) if existing == bytes => Ok(()),
        Some(existing) => Err(Error::Fenced {
            location: format!("{}/{name}", store.location()),
            by: claimant(&name, &existing),
        }),
        None if conflict => Err(Error::Internal(format!(
            "{name} was reported to exist but cannot be read back"
        ))),
        None => outcome,
    }
}

/// Who wrote the entry that took our number (a claim, normally).
fn claimant(name: &str, bytes: &[u8]) -> String {
    match unframe(name, bytes).ok().as_deref() {
        Some([LogEvent::Claimed { holder }, ..]) => holder.clone(),
        _ => "an unknown writer".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> (tempfile::TempDir, CheckpointStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::local(dir.path()).unwrap();
        (dir, store)
    }

    fn completed(time_ms: i64) -> LogEvent {
        LogEvent::BatchCompleted { time_ms }
    }

    #[test]
    fn a_claim_fences_the_previous_holder_and_sees_all_it_wrote() {
        let (_dir, store) = store();
        let a = MetadataLog::claim(&store, "a").unwrap();
        assert!(
            a.read_all()
                .unwrap()
                .iter()
                .all(|e| matches!(e, LogEvent::Claimed { .. }))
        );
        a.append(&[completed(1)]).unwrap();
        a.append(&[completed(2)]).unwrap();
        let b = MetadataLog::claim(&store, "b").unwrap();
        let err = a.append(&[completed(3)]).unwrap_err();
        assert!(matches!(&err, Error::Fenced { by, .. } if by == "b"), "{err}");
        assert!(!err.is_retryable());
        // A fenced holder stays fenced: its number is taken for good.
        assert!(matches!(a.append(&[completed(3)]), Err(Error::Fenced { .. })));
        let events: Vec<LogEvent> = b
            .read_all()
            .unwrap()
            .into_iter()
            .filter(|e| !matches!(e, LogEvent::Claimed { .. }))
            .collect();
        assert_eq!(events, [completed(1), completed(2)]);
        b.append(&[completed(3)]).unwrap();
    }

    #[test]
    fn claims_survive_compaction_so_a_zombie_stays_fenced() {
        let (_dir, store) = store();
        let a = MetadataLog::claim(&store, "a").unwrap();
        a.append(&[completed(1)]).unwrap();
        a.append(&[completed(2)]).unwrap();
        // b claims while a is paused; b then writes and compacts everything away.
        let b = MetadataLog::claim(&store, "b").unwrap();
        b.read_all().unwrap();
        b.append(&[completed(3)]).unwrap();
        b.compact(&[completed(3)]).unwrap();
        b.append(&[completed(4)]).unwrap();
        // Files left: a's claim, b's claim, the compaction, the entry after it.
        assert_eq!(b.file_count().unwrap(), 4);
        // a wakes up: its next number is b's claim, which compaction kept.
        assert!(matches!(a.append(&[completed(99)]), Err(Error::Fenced { .. })));
        assert!(matches!(a.compact(&[]), Err(Error::Fenced { .. })));
        let c = MetadataLog::claim(&store, "c").unwrap();
        let events: Vec<LogEvent> = c
            .read_all()
            .unwrap()
            .into_iter()
            .filter(|e| !matches!(e, LogEvent::Claimed { .. }))
            .collect();
        assert_eq!(events, [completed(3), completed(4)]);
        // c compacts again: the older claims and c's own stay, the rest goes.
        c.compact(&[completed(4)]).unwrap();
        assert_eq!(c.file_count().unwrap(), 4, "three claims and one compaction");
        assert!(matches!(b.append(&[completed(5)]), Err(Error::Fenced { .. })));
    }

    #[test]
    fn an_append_that_landed_before_an_error_is_recognised() {
        let (_dir, store) = store();
        let log = MetadataLog::claim(&store, "a").unwrap();
        // The same bytes already at the next number: an earlier attempt of this append landed.
        let next = log.cursor.lock().unwrap().next_seq;
        store
            .child("metadata")
            .put_new(&entry_name(next), &frame(&[completed(7)]).unwrap())
            .unwrap();
        log.append(&[completed(7)]).unwrap();
        log.append(&[completed(8)]).unwrap();
        let events: Vec<LogEvent> = MetadataLog::claim(&store, "b")
            .unwrap()
            .read_all()
            .unwrap()
            .into_iter()
            .filter(|e| !matches!(e, LogEvent::Claimed { .. }))
            .collect();
        assert_eq!(events, [completed(7), completed(8)]);
    }

    #[test]
    fn a_log_in_the_old_format_is_refused_with_the_fix() {
        let (_dir, store) = store();
        store
            .child("metadata")
            .put_new("snapshot-00000000000000000003.log", b"x")
            .unwrap();
        let err = MetadataLog::claim(&store, "a").unwrap_err();
        assert!(err.to_string().contains("older version of Sluice"), "{err}");
    }
}
