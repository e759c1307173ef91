//! State snapshots: operator state written with its batch and restored on restart.
//!
//! # Protocol
//!
//! After a batch's outputs are committed and before its `BatchCompleted` is logged, every stateful
//! operator writes its state *as of that batch* to
//! `<checkpoint>/state/<batch time:020>-<operator index>.state` (JSON + CRC-32C, atomic replace).
//! On restart, state is restored from the snapshot of the last completed batch, and the batches
//! after it re-run in order — so the state a re-run sees is exactly the state the first run saw.
//! Operators are matched by their index in graph-construction order; a program that adds a
//! stateful operator starts it empty (with a warning), and one that removes operators ignores
//! their snapshots. Snapshots older than the previous completed batch are deleted.

use std::collections::HashMap;
use std::sync::Arc;

use super::checkpoint_store::CheckpointStore;
use crate::exec::InstanceId;
use crate::plan::state::{SnapshotKind, StatefulOp};
use crate::{Error, Result};

fn state_dir(checkpoint: &CheckpointStore) -> CheckpointStore {
    checkpoint.child("state")
}

fn file_name(time_ms: i64, index: usize, kind: SnapshotKind) -> String {
    format!("{time_ms:020}-{index}{}", kind.suffix())
}

/// `(time, operator index, kind)` of a state file name.
fn parse_name(name: &str) -> Option<(i64, usize, SnapshotKind)> {
    let (stem, kind) = if let Some(stem) = name.strip_suffix(".state") {
        (stem, SnapshotKind::Full)
    } else {
        (name.strip_suffix(".delta")?, SnapshotKind::Delta)
    };
    let (time, index) = stem.split_once('-')?;
    Some((time.parse().ok()?, index.parse().ok()?, kind))
}

/// Writes every operator's state (or delta) of `instance` for `time_ms`.
pub(crate) fn snapshot_all(
    checkpoint: &CheckpointStore,
    instance: InstanceId,
    time_ms: i64,
    ops: &[Arc<dyn StatefulOp>],
) -> Result<()> {
    let dir = state_dir(checkpoint);
    for (index, op) in ops.iter().enumerate() {
        if let Some((kind, mut bytes)) = op.snapshot(instance, time_ms)? {
            let crc = sluice_blockstore::crc32c(&bytes);
            bytes.extend_from_slice(&crc.to_le_bytes());
            dir.put_replace(&file_name(time_ms, index, kind), &bytes)?;
        }
    }
    Ok(())
}

fn read_checked(dir: &CheckpointStore, name: String) -> Result<Vec<u8>> {
    let mut bytes = dir.get(&name)?;
    if bytes.len() < 4 {
        return Err(Error::CorruptMetadata {
            file: name,
            detail: "too short".into(),
        });
    }
    let crc = bytes.split_off(bytes.len() - 4);
    if sluice_blockstore::crc32c(&bytes) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
        return Err(Error::CorruptMetadata {
            file: name,
            detail: "CRC-32C mismatch".into(),
        });
    }
    Ok(bytes)
}

/// Restores every operator to the last completed batch: its newest full snapshot at or before
/// that batch, then its deltas up to the batch (newer files belong to a batch that did not
/// complete and will re-run). A batch with no delta file changed nothing.
pub(crate) fn restore_all(
    checkpoint: &CheckpointStore,
    instance: InstanceId,
    last_completed: Option<i64>,
    ops: &[Arc<dyn StatefulOp>],
) -> Result<()> {
    let Some(last) = last_completed else { return Ok(()) };
    if ops.is_empty() {
        return Ok(());
    }
    let dir = state_dir(checkpoint);
    let files: Vec<(i64, usize, SnapshotKind)> = dir.list()?.iter().filter_map(|n| parse_name(n)).collect();
    for (index, op) in ops.iter().enumerate() {
        let mut mine: Vec<(i64, SnapshotKind)> = files
            .iter()
            .filter(|(t, i, _)| *i == index && *t <= last)
            .map(|(t, _, k)| (*t, *k))
            .collect();
        mine.sort_unstable_by_key(|(t, k)| (*t, *k == SnapshotKind::Delta));
        let Some(base) = mine.iter().rposition(|(_, k)| *k == SnapshotKind::Full) else {
            tracing::warn!(
                operator = index,
                batch = last,
                "no state snapshot for this operator; it starts empty"
            );
            continue;
        };
        let chain = mine[base..]
            .iter()
            .filter(|(t, k)| *k == SnapshotKind::Full || *t > mine[base].0)
            .map(|(t, k)| Ok((*t, *k, read_checked(&dir, file_name(*t, index, *k))?)))
            .collect::<Result<Vec<_>>>()?;
        op.restore(instance, &chain)?;
    }
    Ok(())
}

/// Deletes the state files no restore to `latest_ms` (the batch just completed) needs: per
/// operator, everything before its newest full snapshot at or before that batch.
pub(crate) fn cleanup_snapshots(checkpoint: &CheckpointStore, latest_ms: i64) -> Result<()> {
    let dir = state_dir(checkpoint);
    let names = dir.list()?;
    let mut newest_full: HashMap<usize, i64> = HashMap::new();
    for (t, i, k) in names.iter().filter_map(|n| parse_name(n)) {
        if k == SnapshotKind::Full && t <= latest_ms {
            let slot = newest_full.entry(i).or_insert(t);
            *slot = (*slot).max(t);
        }
    }
    for name in names {
        if let Some((t, i, _)) = parse_name(&name)
            && newest_full.get(&i).is_some_and(|keep| t < *keep)
        {
            dir.delete(&name)?;
        }
    }
    Ok(())
}
