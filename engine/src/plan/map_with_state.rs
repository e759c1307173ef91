//! `map_with_state`: per-key state whose cost grows with the batch, not with the state.
//!
//! [`update_state_by_key`](crate::DStream::update_state_by_key) calls its function for every key
//! that has a state, every batch, and snapshots the whole state every batch: a batch costs
//! O(total state). `map_with_state` (Spark 1.6's answer) touches only the keys that have new
//! values in the batch — and, with a timeout, the keys that have been idle for it — and writes
//! only what the batch changed:
//!
//! - the state lives in per-partition hash maps updated in place;
//! - idle keys are found through per-partition buckets of "last touched" times, so finding the
//!   ones that time out costs what was touched, not what is held;
//! - each batch writes a **delta** (the keys it changed or removed), and a full snapshot every
//!   [`StateSpec::full_snapshot_every`] batches; a restart restores the newest full snapshot at
//!   or before the last completed batch and applies the deltas after it.
//!
//! The function sees each key once per batch with all its new values in arrival order (within a
//! task; tasks in order), and returns what the mapped stream emits for that key, if anything.

use std::collections::{BTreeMap, HashMap};
use std::marker::PhantomData;
use std::ops::Deref;
use std::sync::{Arc, Mutex};

use rayon::prelude::*;
use rustc_hash::FxHashMap;
use serde::Serialize;
use serde::de::DeserializeOwned;
use sluice_operators::shuffle::{Group, partition_of};

use super::dstream::DStream;
use super::state::{SnapshotKind, StatefulOp};
use crate::exec::{
    BatchEnv, Data, InputReads, InstanceId, JobError, Key, MapSizeHint, Node, Scope, StageCache, TaskError,
    TrackedBlock, combine_by_key,
};
use crate::{Error, Result};

/// Default [`StateSpec::full_snapshot_every`]: a full snapshot every 10 batches (Spark
/// checkpoints `mapWithState` state every 10 batches by default).
pub const DEFAULT_FULL_SNAPSHOT_EVERY: usize = 10;

/// One key's state as the `map_with_state` function sees it.
#[derive(Debug)]
pub struct State<'a, S> {
    slot: &'a mut Option<S>,
    changed: bool,
    timing_out: bool,
}

impl<S> State<'_, S> {
    /// The current state, if the key has one.
    pub fn get(&self) -> Option<&S> {
        self.slot.as_ref()
    }

    /// Whether the key has a state.
    pub fn exists(&self) -> bool {
        self.slot.is_some()
    }

    /// Replaces the state.
    ///
    /// # Panics
    /// When the key is timing out (its state is removed after this call, as in Spark).
    pub fn update(&mut self, state: S) {
        assert!(!self.timing_out, "a timing-out state cannot be updated");
        *self.slot = Some(state);
        self.changed = true;
    }

    /// Removes the state.
    pub fn remove(&mut self) {
        if self.slot.take().is_some() {
            self.changed = true;
        }
    }

    /// Whether this call is the key's timeout: no new values, and the state goes after it.
    pub fn is_timing_out(&self) -> bool {
        self.timing_out
    }
}

type MapFn<K, V, S, O> = dyn Fn(&K, Vec<V>, &mut State<'_, S>) -> Option<O> + Send + Sync;

/// What `map_with_state` does: the function, and optional settings.
///
/// ```no_run
/// # fn demo(words: sluice_engine::DStream<(String, u64)>) {
/// use sluice_engine::StateSpec;
/// // Running totals; a word not seen for 100 batches is dropped (and its total emitted).
/// let totals = words.map_with_state(
///     StateSpec::new(|word: &String, counts: Vec<u64>, state| {
///         if state.is_timing_out() {
///             return state.get().map(|total| (word.clone(), *total));
///         }
///         let total = state.get().copied().unwrap_or(0) + counts.iter().sum::<u64>();
///         state.update(total);
///         Some((word.clone(), total))
///     })
///     .timeout(100),
/// );
/// totals.print(10).expect("defined before start");
/// # }
/// ```
pub struct StateSpec<K, V, S, O> {
    f: Arc<MapFn<K, V, S, O>>,
    timeout_batches: Option<usize>,
    full_snapshot_every: usize,
    partitions: Option<usize>,
}

impl<K, V, S, O> StateSpec<K, V, S, O> {
    /// A spec calling `f(key, new_values, state)` for every key with new values in a batch.
    pub fn new(f: impl Fn(&K, Vec<V>, &mut State<'_, S>) -> Option<O> + Send + Sync + 'static) -> Self {
        Self {
            f: Arc::new(f),
            timeout_batches: None,
            full_snapshot_every: DEFAULT_FULL_SNAPSHOT_EVERY,
            partitions: None,
        }
    }

    /// Removes a key's state after it got no value for `batches` batches; `f` is called once
    /// more for it, with no values and [`State::is_timing_out`] true.
    ///
    /// # Panics
    /// If `batches` is 0.
    #[must_use]
    pub fn timeout(mut self, batches: usize) -> Self {
        assert!(batches > 0, "a timeout is at least one batch");
        self.timeout_batches = Some(batches);
        self
    }

    /// Writes a full snapshot every `batches` batches, deltas in between (default 10). A restart
    /// reads at most this many files per operator.
    ///
    /// # Panics
    /// If `batches` is 0.
    #[must_use]
    pub fn full_snapshot_every(mut self, batches: usize) -> Self {
        assert!(batches > 0, "at least every batch");
        self.full_snapshot_every = batches;
        self
    }

    /// Partitions of the state (default: the context's shuffle partitions).
    #[must_use]
    pub fn partitions(mut self, partitions: usize) -> Self {
        self.partitions = Some(partitions.max(1));
        self
    }
}

/// One key's state and the batch that last touched it.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
struct Entry<S> {
    state: S,
    touched_ms: i64,
}

/// One partition of the state.
struct Part<K, S> {
    entries: FxHashMap<K, Entry<S>>,
    /// Keys by the batch that touched them (a key may also sit in older buckets; the entry's
    /// `touched_ms` says which one counts).
    touched: BTreeMap<i64, Vec<K>>,
}

impl<K, S> Default for Part<K, S> {
    fn default() -> Self {
        Self {
            entries: FxHashMap::default(),
            touched: BTreeMap::new(),
        }
    }
}

/// The state of one instance.
struct Table<K, S> {
    /// The batch the state is at.
    time_ms: Option<i64>,
    parts: Vec<Part<K, S>>,
    /// What the last batch changed: key → new entry (`None`: removed). Written as its delta.
    changes: DeltaData<K, S>,
    /// Batches since the last full snapshot (`None`: none yet since start or restore).
    since_full: Option<usize>,
}

impl<K, S> Table<K, S> {
    fn new(partitions: usize) -> Self {
        Self {
            time_ms: None,
            parts: (0..partitions).map(|_| Part::default()).collect(),
            changes: Vec::new(),
            since_full: None,
        }
    }
}

struct MapWithStateNode<K, V, S, O> {
    parent: Arc<dyn Node<(K, V)>>,
    f: Arc<MapFn<K, V, S, O>>,
    timeout_batches: Option<usize>,
    full_snapshot_every: usize,
    partitions: usize,
    keys_hint: MapSizeHint,
    tables: Mutex<HashMap<InstanceId, Table<K, S>>>,
    cache: StageCache<O>,
}

/// What one partition's update produced.
struct PartOutput<K, S, O> {
    out: Vec<O>,
    changes: DeltaData<K, S>,
}

/// What one partition's update changed, to put back when the user function panics part-way: the
/// retried update then starts from the state the batch began with. Recorded before each change;
/// it costs a clone of each touched key's entry, so it grows with the batch, not the state.
struct Undo<K, S> {
    /// Keys as they were before the update (`None`: absent). Each key is recorded once: a key
    /// with new values is not also timed out in the same batch.
    entries: Vec<(K, Option<Entry<S>>)>,
    /// Timeout buckets taken out.
    buckets: Vec<(i64, Vec<K>)>,
    /// The bucket of this batch, once inserted.
    inserted_bucket: Option<i64>,
}

impl<K: Key, S> Undo<K, S> {
    fn new() -> Self {
        Self {
            entries: Vec::new(),
            buckets: Vec::new(),
            inserted_bucket: None,
        }
    }

    fn restore(self, part: &mut Part<K, S>) {
        if let Some(t) = self.inserted_bucket {
            part.touched.remove(&t);
        }
        part.touched.extend(self.buckets);
        for (key, entry) in self.entries {
            match entry {
                Some(entry) => part.entries.insert(key, entry),
                None => part.entries.remove(&key),
            };
        }
    }
}

impl<K: Key, V: Data, S: Data + Clone, O: Data + Clone> MapWithStateNode<K, V, S, O> {
    /// Updates one partition in place: keys with new values, then keys that time out.
    /// Every change is recorded in `undo` before it is made.
    fn update_part(
        &self,
        part: &mut Part<K, S>,
        new_values: sluice_operators::shuffle::CombineMap<K, Vec<V>>,
        env: &BatchEnv,
        undo: &mut Undo<K, S>,
    ) -> PartOutput<K, S, O> {
        let f = &*self.f;
        let now = env.time_ms;
        let mut out = Vec::new();
        let mut changes = Vec::new();
        let mut touched = Vec::with_capacity(if self.timeout_batches.is_some() {
            new_values.len()
        } else {
            0
        });
        for (key, values) in new_values {
            undo.entries.push((key.clone(), part.entries.get(&key).cloned()));
            let mut slot = part.entries.remove(&key).map(|e| e.state);
            let had = slot.is_some();
            let mut state = State {
                slot: &mut slot,
                changed: false,
                timing_out: false,
            };
            if let Some(o) = f(&key, values, &mut state) {
                out.push(o);
            }
            let updated = state.changed;
            match slot {
                Some(state) => {
                    let entry = Entry { state, touched_ms: now };
                    if updated || !had {
                        changes.push((key.clone(), Some(entry.clone())));
                    }
                    if self.timeout_batches.is_some() {
                        touched.push(key.clone());
                    }
                    part.entries.insert(key, entry);
                }
                None if had => changes.push((key, None)),
                None => {}
            }
        }
        // Idle keys are only looked for with a timeout: without one, nothing is kept per batch.
        if self.timeout_batches.is_some() && !touched.is_empty() {
            undo.inserted_bucket = Some(now);
            part.touched.insert(now, touched);
        }
        if let Some(timeout) = self.timeout_batches {
            let cutoff = now - timeout as i64 * env.interval_ms;
            let idle: Vec<i64> = part.touched.range(..=cutoff).map(|(t, _)| *t).collect();
            for t in idle {
                let keys = part.touched.remove(&t).unwrap_or_default();
                undo.buckets.push((t, keys.clone()));
                for key in keys {
                    // Touched again later: it sits in a newer bucket too.
                    if part.entries.get(&key).is_none_or(|e| e.touched_ms != t) {
                        continue;
                    }
                    let entry = part.entries.remove(&key).expect("checked above");
                    undo.entries.push((key.clone(), Some(entry.clone())));
                    let mut slot = Some(entry.state);
                    let mut state = State {
                        slot: &mut slot,
                        changed: false,
                        timing_out: true,
                    };
                    if let Some(o) = f(&key, Vec::new(), &mut state) {
                        out.push(o);
                    }
                    changes.push((key, None));
                }
            }
        }
        PartOutput { out, changes }
    }
}

impl<K: Key, V: Data, S: Data + Clone, O: Data + Clone> MapWithStateNode<K, V, S, O> {
    /// Updates every partition in parallel, in place. A partition whose function panics is put
    /// back as it was (its [`Undo`]) and updated again with its new values computed again from
    /// their lineage, up to `max_task_attempts` times, like every other task; the partitions that
    /// succeeded keep their result. Past the attempts the batch fails under either policy (after
    /// the shuffle no single input record is to blame): the table is dropped with the error, and
    /// after a restart the batch re-runs from the last snapshot.
    fn update_with_retries(
        &self,
        env: &BatchEnv,
        table: &mut Table<K, S>,
        grouped: Vec<sluice_operators::shuffle::CombineMap<K, Vec<V>>>,
    ) -> Result<Vec<PartOutput<K, S, O>>, JobError> {
        use std::sync::atomic::Ordering::Relaxed;
        let runner = &env.runner;
        let mut done: Vec<Option<PartOutput<K, S, O>>> = table.parts.iter().map(|_| None).collect();
        let mut grouped = Some(grouped);
        let mut attempts = 0;
        loop {
            attempts += 1;
            let new_values = match grouped.take() {
                Some(g) => g,
                None => combine_by_key(env, &*self.parent, &Group::new(), self.partitions, &self.keys_hint)?,
            };
            let pending: Vec<bool> = done.iter().map(Option::is_none).collect();
            let results: Vec<Option<std::thread::Result<PartOutput<K, S, O>>>> = runner.pool.install(|| {
                table
                    .parts
                    .par_iter_mut()
                    .zip(new_values.into_par_iter())
                    .enumerate()
                    .map(|(q, (part, new_values))| {
                        if !pending[q] {
                            return None;
                        }
                        runner.tasks.fetch_add(1, Relaxed);
                        let mut undo = Undo::new();
                        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                            self.update_part(part, new_values, env, &mut undo)
                        }));
                        if result.is_err() {
                            undo.restore(part);
                        }
                        Some(result)
                    })
                    .collect()
            });
            let mut failed = None;
            let mut failures = 0;
            for (q, result) in results.into_iter().enumerate() {
                match result {
                    None => {}
                    Some(Ok(output)) => done[q] = Some(output),
                    Some(Err(payload)) => {
                        let error = TaskError::from_panic(&payload);
                        failures += 1;
                        tracing::warn!(batch = env.time_ms, partition = q, attempt = attempts, error = %error, "state update failed");
                        failed.get_or_insert((q, error));
                    }
                }
            }
            let Some((partition, error)) = failed else {
                return Ok(done.into_iter().map(|p| p.expect("every partition updated")).collect());
            };
            runner.task_failures.fetch_add(failures, Relaxed);
            if attempts >= runner.max_attempts || runner.is_cancelled() {
                return Err(JobError {
                    time: env.batch_time(),
                    partition,
                    attempts,
                    error,
                });
            }
            runner.task_retries.fetch_add(failures, Relaxed);
        }
    }
}

impl<K: Key, V: Data, S: Data + Clone, O: Data + Clone> Node<O> for MapWithStateNode<K, V, S, O> {
    fn num_partitions(&self, env: &BatchEnv) -> usize {
        self.cache.num_partitions(env)
    }

    fn prepare(&self, env: &BatchEnv) -> Result<(), JobError> {
        if self.cache.get(env).is_some() {
            return Ok(());
        }
        let grouped = combine_by_key(env, &*self.parent, &Group::new(), self.partitions, &self.keys_hint)?;
        // Take the table out: partitions are updated in parallel, in place.
        let mut table = {
            let mut tables = self.tables.lock().expect("state");
            let table = tables
                .remove(&env.instance)
                .unwrap_or_else(|| Table::new(self.partitions));
            if table.time_ms.is_some_and(|t| t >= env.time_ms) {
                let at = table.time_ms;
                tables.insert(env.instance, table);
                return Err(JobError {
                    time: env.batch_time(),
                    partition: 0,
                    attempts: 1,
                    error: TaskError::Panicked {
                        message: format!("state is already at batch {at:?}; batches must run in order"),
                    },
                });
            }
            table
        };
        let done = self.update_with_retries(env, &mut table, grouped)?;
        let mut parts_out = Vec::with_capacity(done.len());
        let mut changes = Vec::new();
        for p in done {
            changes.extend(p.changes);
            parts_out.push(p.out);
        }
        table.time_ms = Some(env.time_ms);
        table.changes = changes;
        self.tables.lock().expect("state").insert(env.instance, table);
        self.cache.put(env, parts_out);
        Ok(())
    }

    fn compute(&self, env: &BatchEnv, _scope: Scope<'_>, p: usize, emit: &mut dyn FnMut(O)) -> Result<(), TaskError> {
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

/// A state file: every `(key, entry)` (full), or every `(key, entry or None if removed)` a
/// batch changed (delta).
#[derive(Serialize, serde::Deserialize)]
struct Snapshot<T> {
    version: u32,
    time_ms: i64,
    data: T,
}

type FullData<K, S> = Vec<(K, Entry<S>)>;
type DeltaData<K, S> = Vec<(K, Option<Entry<S>>)>;

const SNAPSHOT_VERSION: u32 = 1;

fn decode<T: DeserializeOwned>(time_ms: i64, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| Error::CorruptMetadata {
        file: format!("map_with_state snapshot of batch {time_ms}"),
        detail: format!("cannot decode (did the key or state type change?): {e}"),
    })
}

impl<K, V, S, O> StatefulOp for MapWithStateNode<K, V, S, O>
where
    K: Key + Serialize + DeserializeOwned,
    V: Data,
    S: Data + Clone + Serialize + DeserializeOwned,
    O: Data + Clone,
{
    fn snapshot(&self, instance: InstanceId, time_ms: i64) -> Result<Option<(SnapshotKind, Vec<u8>)>> {
        let mut tables = self.tables.lock().expect("state");
        let Some(table) = tables.get_mut(&instance).filter(|t| t.time_ms == Some(time_ms)) else {
            return Ok(None);
        };
        let encode = |e: serde_json::Error| Error::Internal(format!("cannot encode state: {e}"));
        let full = table.since_full.is_none_or(|n| n + 1 >= self.full_snapshot_every);
        if full {
            table.since_full = Some(0);
            let entries: Vec<(&K, &Entry<S>)> = table.parts.iter().flat_map(|p| p.entries.iter()).collect();
            let snapshot = Snapshot {
                version: SNAPSHOT_VERSION,
                time_ms,
                data: entries,
            };
            return serde_json::to_vec(&snapshot)
                .map(|b| Some((SnapshotKind::Full, b)))
                .map_err(encode);
        }
        table.since_full = table.since_full.map(|n| n + 1);
        if table.changes.is_empty() {
            return Ok(None);
        }
        let snapshot = Snapshot {
            version: SNAPSHOT_VERSION,
            time_ms,
            data: &table.changes,
        };
        serde_json::to_vec(&snapshot)
            .map(|b| Some((SnapshotKind::Delta, b)))
            .map_err(encode)
    }

    fn restore(&self, instance: InstanceId, chain: &[(i64, SnapshotKind, Vec<u8>)]) -> Result<()> {
        let mut table = Table::new(self.partitions);
        for (time_ms, kind, bytes) in chain {
            match kind {
                SnapshotKind::Full => {
                    let full: Snapshot<FullData<K, S>> = decode(*time_ms, bytes)?;
                    check_version(full.version, *time_ms)?;
                    table = Table::new(self.partitions);
                    for (key, entry) in full.data {
                        table.put(key, Some(entry), self.partitions, self.timeout_batches.is_some());
                    }
                }
                SnapshotKind::Delta => {
                    let delta: Snapshot<DeltaData<K, S>> = decode(*time_ms, bytes)?;
                    check_version(delta.version, *time_ms)?;
                    for (key, entry) in delta.data {
                        table.put(key, entry, self.partitions, self.timeout_batches.is_some());
                    }
                }
            }
            table.time_ms = Some(*time_ms);
        }
        // The next snapshot is a full one: the chain restored from may be cleaned up after it.
        table.since_full = None;
        self.tables.lock().expect("state").insert(instance, table);
        Ok(())
    }

    fn drop_instance(&self, instance: InstanceId) {
        self.tables.lock().expect("state").remove(&instance);
    }
}

fn check_version(version: u32, time_ms: i64) -> Result<()> {
    if version == SNAPSHOT_VERSION {
        Ok(())
    } else {
        Err(Error::CorruptMetadata {
            file: format!("map_with_state snapshot of batch {time_ms}"),
            detail: format!("snapshot version {version} is not {SNAPSHOT_VERSION}"),
        })
    }
}

impl<K: Key, S> Table<K, S> {
    /// Sets (or with `None` removes) a key's entry while restoring; `timeouts`: keep the
    /// "last touched" buckets.
    fn put(&mut self, key: K, entry: Option<Entry<S>>, partitions: usize, timeouts: bool) {
        let part = &mut self.parts[partition_of(&key, partitions)];
        match entry {
            Some(entry) => {
                if timeouts {
                    part.touched.entry(entry.touched_ms).or_default().push(key.clone());
                }
                part.entries.insert(key, entry);
            }
            None => {
                part.entries.remove(&key);
            }
        }
    }
}

/// The stream `map_with_state` returns: what the function emitted for each batch (it derefs to
/// that [`DStream`]), and the state itself through
/// [`state_snapshots`](Self::state_snapshots).
pub struct MapWithStateStream<K, S, O> {
    mapped: DStream<O>,
    snapshots: DStream<(K, S)>,
}

impl<K, S, O> Deref for MapWithStateStream<K, S, O> {
    type Target = DStream<O>;
    fn deref(&self) -> &DStream<O> {
        &self.mapped
    }
}

impl<K, S, O> MapWithStateStream<K, S, O> {
    /// The stream of mapped values.
    pub fn mapped(&self) -> DStream<O> {
        self.mapped.clone()
    }

    /// Every key's state after each batch (Spark's `stateSnapshots`). Reading it costs the
    /// whole state per batch — use it where that is what you want.
    ///
    /// ```
    /// # use sluice_engine::{State, StateSpec};
    /// # use sluice_engine::testing::TestHarness;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// # let h = TestHarness::new()?;
    /// let words = h.input()?.map(text).map(|word| (word, 1u64));
    /// let spec = StateSpec::new(|word: &String, new: Vec<u64>, total: &mut State<'_, u64>| {
    ///     let sum = total.get().copied().unwrap_or(0) + new.iter().sum::<u64>();
    ///     total.update(sum);
    ///     Some((word.clone(), sum)) // emitted for the words of this batch only
    /// });
    /// let counted = words.map_with_state(spec);
    /// let states = h.collect(&counted.state_snapshots())?;
    /// h.start()?;
    /// h.push(["a", "b"]);
    /// h.run_batch()?;
    /// h.push(["a"]);
    /// h.run_batch()?;
    /// assert_eq!(states.sorted_batches()[1], vec![("a".to_owned(), 2), ("b".to_owned(), 1)]);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn state_snapshots(&self) -> DStream<(K, S)> {
        self.snapshots.clone()
    }
}

/// The whole state of a [`MapWithStateNode`] after each batch.
struct StateSnapshotsNode<K, V, S, O> {
    of: Arc<MapWithStateNode<K, V, S, O>>,
    _types: PhantomData<fn() -> (K, S)>,
}

impl<K: Key, V: Data, S: Data + Clone, O: Data + Clone> Node<(K, S)> for StateSnapshotsNode<K, V, S, O> {
    fn num_partitions(&self, _env: &BatchEnv) -> usize {
        self.of.partitions
    }
    fn prepare(&self, env: &BatchEnv) -> Result<(), JobError> {
        self.of.prepare(env)
    }
    fn compute(
        &self,
        env: &BatchEnv,
        _scope: Scope<'_>,
        p: usize,
        emit: &mut dyn FnMut((K, S)),
    ) -> Result<(), TaskError> {
        let tables = self.of.tables.lock().expect("state");
        if let Some(part) = tables.get(&env.instance).and_then(|t| t.parts.get(p)) {
            for (k, e) in &part.entries {
                emit((k.clone(), e.state.clone()));
            }
        }
        Ok(())
    }
    fn source_block(&self, _env: &BatchEnv, _p: usize) -> Option<TrackedBlock> {
        None
    }

    fn input_reads(&self, reads: &mut InputReads) {
        self.of.input_reads(reads);
    }

    fn forget(&self, instance: InstanceId, time_ms: i64) {
        self.of.forget(instance, time_ms);
    }
}

impl<K, V> DStream<(K, V)>
where
    K: Key + Serialize + DeserializeOwned,
    V: Data,
{
    /// Keeps a state per key and maps each batch through it, touching only the keys that have
    /// new values (or time out): a batch costs what it holds, not what the state holds, and each
    /// batch writes only the keys it changed (see the module docs of
    /// `engine/src/plan/map_with_state.rs`).
    /// Spark's `mapWithState`. The function must be deterministic: a re-run batch (after a
    /// restart, or by the worker that adopts a dead one) must reproduce its state and output.
    ///
    /// A panic in the function is retried like any task, up to `max_task_attempts`: the panicking
    /// partition's keys are put back as they were when the batch began (an undo record kept per
    /// update, proportional to the batch) and updated again. Past the attempts the batch fails and
    /// the stream stops under either failure policy; after a fix and a restart the batch re-runs
    /// from the last snapshot.
    ///
    /// ```
    /// # use sluice_engine::{State, StateSpec};
    /// # use sluice_engine::testing::TestHarness;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// # let h = TestHarness::new()?;
    /// let words = h.input()?.map(text).map(|word| (word, 1u64));
    /// let spec = StateSpec::new(|word: &String, new: Vec<u64>, total: &mut State<'_, u64>| {
    ///     let sum = total.get().copied().unwrap_or(0) + new.iter().sum::<u64>();
    ///     total.update(sum);
    ///     Some((word.clone(), sum)) // emitted for the words of this batch only
    /// });
    /// let counted = words.map_with_state(spec);
    /// let mapped = h.collect(&counted)?;
    /// h.start()?;
    /// h.push(["a", "b"]);
    /// h.run_batch()?;
    /// h.push(["a"]);
    /// h.run_batch()?;
    /// let (a, b) = ("a".to_owned(), "b".to_owned());
    /// assert_eq!(mapped.sorted_batches(), vec![vec![(a.clone(), 1), (b, 1)], vec![(a, 2)]]);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn map_with_state<S, O>(&self, spec: StateSpec<K, V, S, O>) -> MapWithStateStream<K, S, O>
    where
        S: Data + Clone + Serialize + DeserializeOwned,
        O: Data + Clone,
    {
        let partitions = spec.partitions.unwrap_or_else(|| self.graph.default_partitions());
        let node = Arc::new(MapWithStateNode {
            parent: self.node.clone(),
            f: spec.f,
            timeout_batches: spec.timeout_batches,
            full_snapshot_every: spec.full_snapshot_every,
            partitions,
            keys_hint: MapSizeHint::default(),
            tables: Mutex::new(HashMap::new()),
            cache: StageCache::default(),
        });
        self.graph.add_stateful(node.clone());
        MapWithStateStream {
            mapped: DStream {
                node: node.clone(),
                graph: self.graph.clone(),
            },
            snapshots: DStream {
                node: Arc::new(StateSnapshotsNode {
                    of: node,
                    _types: PhantomData,
                }),
                graph: self.graph.clone(),
            },
        }
    }
}
