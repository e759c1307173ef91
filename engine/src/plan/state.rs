//! Operator state: the [`StatefulOp`] contract and `update_state_by_key`. How state is written
//! with its batch and restored is in the runtime's `snapshots` module.
//!

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use rustc_hash::FxHashMap;
use serde::Serialize;
use serde::de::DeserializeOwned;

use sluice_operators::shuffle::{Group, partition_of};
use sluice_operators::state::update_states;

use super::dstream::DStream;
use crate::exec::{
    BatchEnv, Data, InputReads, InstanceId, JobError, Key, MapSizeHint, Node, Scope, StageCache, TaskError,
    TrackedBlock, combine_by_key,
};
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
    pub(crate) fn suffix(self) -> &'static str {
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
                    time: env.batch_time(),
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
        // The user's function runs as one task of the runner, over every partition in parallel;
        // a retry regroups the new values (they were handed to the function by value) and starts
        // again from the unchanged previous state.
        let update = &*self.update;
        let first_attempt = Mutex::new(Some(grouped));
        let parts: Vec<FxHashMap<K, S>> = env.runner.run_task(env, &|| {
            let taken = first_attempt.lock().expect("grouped values").take();
            let grouped = match taken {
                Some(grouped) => grouped,
                None => combine_by_key(env, &*self.parent, &Group::new(), self.partitions, &self.keys_hint)?,
            };
            Ok(grouped
                .into_par_iter()
                .enumerate()
                .map(|(q, new_values)| update_states(previous.get(q), new_values, &update))
                .collect())
        })?;
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

    fn input_reads(&self, reads: &mut InputReads) {
        if reads.first_visit(self) {
            self.parent.input_reads(reads);
        }
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
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// # let h = TestHarness::new()?;
    /// let words = h.input()?.map(text).map(|word| (word, 1u64));
    /// let totals = words.update_state_by_key(|_word, new: Vec<u64>, total: Option<u64>| {
    ///     Some(total.unwrap_or(0) + new.iter().sum::<u64>())
    /// });
    /// let totals = h.collect(&totals)?;
    /// h.start()?;
    /// h.push(["a", "b"]);
    /// h.run_batch()?;
    /// h.push(["a"]);
    /// h.run_batch()?;
    /// let (a, b) = ("a".to_owned(), "b".to_owned());
    /// assert_eq!(totals.sorted_batches(), vec![vec![(a.clone(), 1), (b.clone(), 1)], vec![(a, 2), (b, 1)]]);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
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
