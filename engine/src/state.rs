//! Operator state: `update_state_by_key`, and how state is snapshotted with its batch.
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
use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use rustc_hash::FxHashMap;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::checkpoint_store::CheckpointStore;
use sluice_operators::shuffle::{Group, partition_of};

use crate::dstream::{DStream, Data, Key, MapSizeHint, StageCache, combine_by_key};
use crate::graph::{BatchEnv, InstanceId, JobError, Node, Scope, TaskError};
use crate::tracker::TrackedBlock;
use crate::{Error, Result};

/// What one state file holds: the whole state, or the changes one batch made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum SnapshotKind {
    /// The whole state as of the batch (`<time>-<operator>.state`).
    Full,
    /// The keys the batch changed or removed (`<time>-<operator>.delta`): applied in order on top
    /// of the newest full snapshot before it.
    Delta,
}

impl SnapshotKind {
    fn suffix(self) -> &'static str {
        match self {
            SnapshotKind::Full => ".state",
            SnapshotKind::Delta => ".delta",
        }
    }
}

/// An operator whose state must survive restarts. State is kept per instance: this worker's
/// own, and one per worker whose log it adopts.
pub(crate) trait StatefulOp: Send + Sync {
    /// The state of `instance` as of batch `time_ms`, or the changes that batch made (`None` if
    /// the operator has not run that batch, or a delta would be empty).
    fn snapshot(&self, instance: InstanceId, time_ms: i64) -> Result<Option<(SnapshotKind, Vec<u8>)>>;
    /// Replaces the state of `instance` with a full snapshot followed by the deltas after it, in
    /// batch order: `(batch time, kind, bytes)`; the first is always full.
    fn restore(&self, instance: InstanceId, chain: &[(i64, SnapshotKind, Vec<u8>)]) -> Result<()>;
    /// Drops the state of `instance` (an adoption finished).
    fn drop_instance(&self, instance: InstanceId);
}

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
            let crc = crc32c::crc32c(&bytes);
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
    if crc32c::crc32c(&bytes) != u32::from_le_bytes(crc.try_into().expect("4 bytes")) {
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

type UpdateFn<K, V, S> = dyn Fn(&K, Vec<V>, Option<S>) -> Option<S> + Send + Sync;

struct StateTable<K, S> {
    time_ms: Option<i64>,
    parts: Arc<Vec<FxHashMap<K, S>>>,
}

/// `update_state_by_key`: groups new values by key, then updates every key's state.
struct UpdateStateNode<K, V, S> {
    parent: Arc<dyn Node<(K, V)>>,
    update: Arc<UpdateFn<K, V, S>>,
    partitions: usize,
    keys_hint: MapSizeHint,
    state: Mutex<HashMap<InstanceId, StateTable<K, S>>>,
    cache: StageCache<(K, S)>,
}

impl<K: Key, V: Data, S: Data + Clone> Node<(K, S)> for UpdateStateNode<K, V, S> {
    fn num_partitions(&self, env: &BatchEnv) -> usize {
        self.cache.num_partitions(env)
    }

    fn prepare(&self, env: &BatchEnv) -> Result<(), JobError> {
        if self.cache.get(env).is_some() {
            return Ok(());
        }
        let grouped = combine_by_key(env, &*self.parent, &Group::new(), self.partitions, &self.keys_hint)?;
        let previous = {
            let tables = self.state.lock().expect("state");
            let table = tables.get(&env.instance);
            if let Some(table) = table
                && table.time_ms.is_some_and(|t| t >= env.time_ms)
            {
                return Err(JobError {
                    time_ms: env.time_ms,
                    partition: 0,
                    attempts: 1,
                    error: TaskError::Panicked {
                        message: format!(
                            "state is already at batch {:?}; batches must run in order",
                            table.time_ms
                        ),
                    },
                });
            }
            table.map(|t| t.parts.clone()).unwrap_or_default()
        };
        let update = &*self.update;
        let new_parts: Vec<Result<FxHashMap<K, S>, (usize, TaskError)>> = env.runner.pool.install(|| {
            grouped
                .into_par_iter()
                .enumerate()
                .map(|(q, mut new_values)| {
                    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        let mut out = FxHashMap::default();
                        if let Some(prev) = previous.get(q) {
                            for (k, s) in prev {
                                let values = new_values.remove(k).unwrap_or_default();
                                if let Some(s) = update(k, values, Some(s.clone())) {
                                    out.insert(k.clone(), s);
                                }
                            }
                        }
                        for (k, values) in new_values {
                            if let Some(s) = update(&k, values, None) {
                                out.insert(k, s);
                            }
                        }
                        out
                    }))
                    .map_err(|payload| (q, TaskError::from_panic(&payload)))
                })
                .collect()
        });
        let mut parts = Vec::with_capacity(new_parts.len());
        for part in new_parts {
            match part {
                Ok(p) => parts.push(p),
                Err((partition, error)) => {
                    return Err(JobError {
                        time_ms: env.time_ms,
                        partition,
                        attempts: 1,
                        error,
                    });
                }
            }
        }
        self.cache.put(
            env,
            parts
                .iter()
                .map(|m| m.iter().map(|(k, s)| (k.clone(), s.clone())).collect())
                .collect(),
        );
        self.state.lock().expect("state").insert(
            env.instance,
            StateTable {
                time_ms: Some(env.time_ms),
                parts: Arc::new(parts),
            },
        );
        Ok(())
    }

    fn compute(
        &self,
        env: &BatchEnv,
        _scope: Scope<'_>,
        p: usize,
        emit: &mut dyn FnMut((K, S)),
    ) -> Result<(), TaskError> {
        self.cache.emit(env, p, emit)
    }

    fn source_block(&self, _env: &BatchEnv, _p: usize) -> Option<TrackedBlock> {
        None
    }

    fn forget(&self, instance: InstanceId, time_ms: i64) {
        self.cache.forget_up_to(instance, time_ms);
        self.parent.forget(instance, time_ms);
    }
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Snapshot<K, S> {
    version: u32,
    time_ms: i64,
    entries: Vec<(K, S)>,
}

const SNAPSHOT_VERSION: u32 = 1;

impl<K, V, S> StatefulOp for UpdateStateNode<K, V, S>
where
    K: Key + Serialize + DeserializeOwned,
    V: Data,
    S: Data + Clone + Serialize + DeserializeOwned,
{
    fn snapshot(&self, instance: InstanceId, time_ms: i64) -> Result<Option<(SnapshotKind, Vec<u8>)>> {
        let tables = self.state.lock().expect("state");
        let Some(table) = tables.get(&instance).filter(|t| t.time_ms == Some(time_ms)) else {
            return Ok(None);
        };
        let entries: Vec<(&K, &S)> = table.parts.iter().flat_map(|m| m.iter()).collect();
        let snapshot = Snapshot {
            version: SNAPSHOT_VERSION,
            time_ms,
            entries,
        };
        serde_json::to_vec(&snapshot)
            .map(|bytes| Some((SnapshotKind::Full, bytes)))
            .map_err(|e| Error::Internal(format!("cannot encode state: {e}")))
    }

    fn restore(&self, instance: InstanceId, chain: &[(i64, SnapshotKind, Vec<u8>)]) -> Result<()> {
        // Every batch writes a full snapshot: the newest is the state.
        let Some((time_ms, _, bytes)) = chain.iter().rev().find(|(_, k, _)| *k == SnapshotKind::Full) else {
            return Ok(());
        };
        let time_ms = *time_ms;
        let snapshot: Snapshot<K, S> = serde_json::from_slice(bytes).map_err(|e| Error::CorruptMetadata {
            file: format!("state snapshot of batch {time_ms}"),
            detail: format!("cannot decode (did the key or state type change?): {e}"),
        })?;
        if snapshot.version != SNAPSHOT_VERSION {
            return Err(Error::CorruptMetadata {
                file: format!("state snapshot of batch {time_ms}"),
                detail: format!("snapshot version {} is not {SNAPSHOT_VERSION}", snapshot.version),
            });
        }
        let mut parts: Vec<FxHashMap<K, S>> = (0..self.partitions).map(|_| FxHashMap::default()).collect();
        for (k, s) in snapshot.entries {
            parts[partition_of(&k, self.partitions)].insert(k, s);
        }
        self.state.lock().expect("state").insert(
            instance,
            StateTable {
                time_ms: Some(time_ms),
                parts: Arc::new(parts),
            },
        );
        Ok(())
    }

    fn drop_instance(&self, instance: InstanceId) {
        self.state.lock().expect("state").remove(&instance);
    }
}

impl<K, V> DStream<(K, V)>
where
    K: Key + Serialize + DeserializeOwned,
    V: Data,
{
    /// Keeps a state per key across batches: every batch, `update(key, new_values, old_state)`
    /// runs for every key that has new values or a state; returning `None` removes the key.
    ///
    /// The state is snapshotted with each batch and restored on restart (see the module docs), so
    /// a re-run batch sees exactly the state its first run saw.
    pub fn update_state_by_key<S>(
        &self,
        update: impl Fn(&K, Vec<V>, Option<S>) -> Option<S> + Send + Sync + 'static,
    ) -> DStream<(K, S)>
    where
        S: Data + Clone + Serialize + DeserializeOwned,
    {
        let partitions = self.graph.default_partitions();
        let node = Arc::new(UpdateStateNode {
            parent: self.node.clone(),
            update: Arc::new(update),
            partitions,
            keys_hint: MapSizeHint::default(),
            state: Mutex::new(HashMap::new()),
            cache: StageCache::default(),
        });
        self.graph.add_stateful(node.clone());
        DStream {
            node,
            graph: self.graph.clone(),
        }
    }
}
