//! [`DStream`]: a stream of per-batch partitioned collections, and its operators.
//!
//! A `DStream<T>` is a node of the operator graph; building one does no work. When the
//! [`StreamingContext`](crate::StreamingContext) runs a batch, every output operation
//! (`foreach_batch`, `print`, `save_parquet`) computes its stream for that batch time. See the
//! [`graph`](crate::graph) module for how narrow operators are fused and where stages begin.

use std::collections::BTreeMap;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use sluice_blockstore::Block;
use sluice_operators::shuffle::{BorrowedKey, CombineMap, Reduce};

use super::GraphBuilder;
use crate::exec::{
    BatchEnv, Data, InputReads, InstanceId, JobError, Key, MapSizeHint, Node, RecordCursor, Scope, StageCache,
    TaskError, TrackedBlock, combine_with, reject,
};
use crate::{BatchTime, BoxError};

/// A discretized stream: for every batch time, a partitioned collection of `T`.
#[must_use = "a DStream does nothing until an output operation (foreach_batch, print, save_parquet) uses it"]
pub struct DStream<T> {
    pub(crate) node: Arc<dyn Node<T>>,
    pub(crate) graph: GraphBuilder,
}

impl<T> Clone for DStream<T> {
    fn clone(&self) -> Self {
        Self {
            node: self.node.clone(),
            graph: self.graph.clone(),
        }
    }
}

type Emit<'a, T> = &'a mut dyn FnMut(T);
type EmitFn<I, O> = dyn Fn(I, Emit<'_, O>) + Send + Sync;

/// Element-wise narrow node: `f(x, emit)` may emit zero or more outputs per input.
struct FlatMapNode<I, O> {
    parent: Arc<dyn Node<I>>,
    f: Arc<EmitFn<I, O>>,
}

impl<I: Data, O: Data> Node<O> for FlatMapNode<I, O> {
    fn num_partitions(&self, env: &BatchEnv) -> usize {
        self.parent.num_partitions(env)
    }
    fn active(&self, env: &BatchEnv) -> bool {
        self.parent.active(env)
    }
    fn prepare(&self, env: &BatchEnv) -> Result<(), JobError> {
        self.parent.prepare(env)
    }
    fn compute(&self, env: &BatchEnv, scope: Scope<'_>, p: usize, emit: Emit<'_, O>) -> Result<(), TaskError> {
        let f = &*self.f;
        self.parent.compute(env, scope, p, &mut |x| f(x, emit))
    }
    fn source_block(&self, env: &BatchEnv, p: usize) -> Option<TrackedBlock> {
        self.parent.source_block(env, p)
    }

    fn input_reads(&self, reads: &mut InputReads) {
        self.parent.input_reads(reads);
    }

    fn forget(&self, instance: InstanceId, time_ms: i64) {
        self.parent.forget(instance, time_ms);
    }
}

type TryEmitFn<I, O> = dyn Fn(I, Emit<'_, O>) -> Result<(), BoxError> + Send + Sync;

/// Fallible element-wise narrow node (`try_map`, `try_flat_map`, `try_filter`): an `Err` goes to
/// [`reject`] — the batch's dead letters or a stopping [`TaskError::Rejected`] — and the element
/// emits nothing.
struct TryFlatMapNode<I, O> {
    parent: Arc<dyn Node<I>>,
    f: Arc<TryEmitFn<I, O>>,
    stage: Arc<str>,
}

impl<I: Data, O: Data> Node<O> for TryFlatMapNode<I, O> {
    fn num_partitions(&self, env: &BatchEnv) -> usize {
        self.parent.num_partitions(env)
    }
    fn active(&self, env: &BatchEnv) -> bool {
        self.parent.active(env)
    }
    fn prepare(&self, env: &BatchEnv) -> Result<(), JobError> {
        self.parent.prepare(env)
    }
    fn compute(&self, env: &BatchEnv, scope: Scope<'_>, p: usize, emit: Emit<'_, O>) -> Result<(), TaskError> {
        let f = &*self.f;
        let mut stopped = None;
        self.parent.compute(env, scope, p, &mut |x| {
            if stopped.is_some() {
                return;
            }
            if let Err(error) = f(x, emit) {
                stopped = reject(env, &self.stage, scope.cursor, &error).err();
            }
        })?;
        stopped.map_or(Ok(()), Err)
    }
    fn source_block(&self, env: &BatchEnv, p: usize) -> Option<TrackedBlock> {
        self.parent.source_block(env, p)
    }

    fn input_reads(&self, reads: &mut InputReads) {
        self.parent.input_reads(reads);
    }

    fn forget(&self, instance: InstanceId, time_ms: i64) {
        self.parent.forget(instance, time_ms);
    }
}

/// One partition of a cached stream: its elements and, when they came from one input block, the
/// block and each element's record index (so fallible operators and the per-record fallback
/// above the cache still know each element's input record).
struct CachedPartition<T> {
    block: Option<Arc<Block>>,
    items: Vec<T>,
    /// Record index of each item (ascending), when `block` is set.
    records: Vec<usize>,
}

impl<T> CachedPartition<T> {
    fn new() -> Self {
        Self {
            block: None,
            items: Vec::new(),
            records: Vec::new(),
        }
    }

    fn push(&mut self, cursor: Option<&RecordCursor>, item: T) {
        if let Some(index) = cursor.and_then(RecordCursor::index) {
            if self.block.is_none() {
                self.block = cursor.and_then(RecordCursor::current).map(|(block, _)| block);
            }
            self.records.push(index);
        }
        self.items.push(item);
    }

    fn append(&mut self, mut other: Self) {
        if self.block.is_none() {
            self.block = other.block.take();
        }
        self.items.append(&mut other.items);
        self.records.append(&mut other.records);
    }
}

/// `cache()`: the parent's output for a batch, computed once (one task per partition, with the
/// runner's retries and failure policy) and shared by every stage that reads it.
struct CacheNode<T> {
    parent: Arc<dyn Node<T>>,
    by_batch: Mutex<BTreeMap<(InstanceId, i64), CachedParts<T>>>,
}

type CachedParts<T> = Arc<Vec<CachedPartition<T>>>;

impl<T: Data + Clone> CacheNode<T> {
    fn get(&self, env: &BatchEnv) -> Option<CachedParts<T>> {
        self.by_batch
            .lock()
            .expect("cache")
            .get(&(env.instance, env.time_ms))
            .cloned()
    }
}

impl<T: Data + Clone> Node<T> for CacheNode<T> {
    fn num_partitions(&self, env: &BatchEnv) -> usize {
        self.get(env).map_or(0, |parts| parts.len())
    }
    fn active(&self, env: &BatchEnv) -> bool {
        self.parent.active(env)
    }
    fn prepare(&self, env: &BatchEnv) -> Result<(), JobError> {
        if self.get(env).is_some() {
            return Ok(());
        }
        self.parent.prepare(env)?;
        let parent = &*self.parent;
        let parts = env.runner.run(
            env,
            parent.num_partitions(env),
            &CachedPartition::new,
            &CachedPartition::append,
            &|p| parent.source_block(env, p),
            &|p, scope, part: &mut CachedPartition<T>| {
                parent.compute(env, scope, p, &mut |x| part.push(scope.cursor, x))
            },
        )?;
        self.by_batch
            .lock()
            .expect("cache")
            .insert((env.instance, env.time_ms), Arc::new(parts));
        Ok(())
    }
    fn compute(&self, env: &BatchEnv, scope: Scope<'_>, p: usize, emit: Emit<'_, T>) -> Result<(), TaskError> {
        let parts = self.get(env).ok_or_else(|| TaskError::Panicked {
            message: format!("internal: cached stream for batch {} not prepared", env.time_ms),
        })?;
        let Some(part) = parts.get(p) else { return Ok(()) };
        let block = part.block.as_ref().filter(|_| part.records.len() == part.items.len());
        let Some(block) = block else {
            if scope.only_record.is_some() {
                // The per-record fallback, with no record index kept: evaluate that record again.
                return self.parent.compute(env, scope, p, emit);
            }
            part.items.iter().cloned().for_each(emit);
            return Ok(());
        };
        // All elements, or one record's (the per-record fallback); the cursor follows them.
        let range = match scope.only_record {
            Some(i) => part.records.partition_point(|&r| r < i)..part.records.partition_point(|&r| r <= i),
            None => 0..part.items.len(),
        };
        if let Some(cursor) = scope.cursor {
            cursor.enter(block);
        }
        for (item, &record) in part.items[range.clone()].iter().zip(&part.records[range]) {
            if let Some(cursor) = scope.cursor {
                cursor.set(record);
            }
            emit(item.clone());
        }
        if let Some(cursor) = scope.cursor {
            cursor.leave();
        }
        Ok(())
    }
    fn source_block(&self, env: &BatchEnv, p: usize) -> Option<TrackedBlock> {
        self.parent.source_block(env, p)
    }

    fn input_reads(&self, reads: &mut InputReads) {
        if reads.first_visit(self) {
            self.parent.input_reads(reads);
        }
    }

    fn forget(&self, instance: InstanceId, time_ms: i64) {
        self.by_batch
            .lock()
            .expect("cache")
            .retain(|(i, t), _| *i != instance || *t > time_ms);
        self.parent.forget(instance, time_ms);
    }
}

/// Whole-partition narrow node.
struct MapPartitionsNode<I, O> {
    parent: Arc<dyn Node<I>>,
    f: Arc<dyn Fn(usize, Vec<I>) -> Vec<O> + Send + Sync>,
}

impl<I: Data, O: Data> Node<O> for MapPartitionsNode<I, O> {
    fn num_partitions(&self, env: &BatchEnv) -> usize {
        self.parent.num_partitions(env)
    }
    fn active(&self, env: &BatchEnv) -> bool {
        self.parent.active(env)
    }
    fn prepare(&self, env: &BatchEnv) -> Result<(), JobError> {
        self.parent.prepare(env)
    }
    fn compute(&self, env: &BatchEnv, scope: Scope<'_>, p: usize, emit: Emit<'_, O>) -> Result<(), TaskError> {
        let mut items = Vec::new();
        self.parent.compute(env, scope, p, &mut |x| items.push(x))?;
        (self.f)(p, items).into_iter().for_each(emit);
        Ok(())
    }
    fn source_block(&self, env: &BatchEnv, p: usize) -> Option<TrackedBlock> {
        self.parent.source_block(env, p)
    }

    fn input_reads(&self, reads: &mut InputReads) {
        self.parent.input_reads(reads);
    }

    fn forget(&self, instance: InstanceId, time_ms: i64) {
        self.parent.forget(instance, time_ms);
    }
}

type BatchFn<I, O> = dyn Fn(BatchTime, Vec<I>) -> Vec<O> + Send + Sync;

/// `transform`: a whole-batch function, so a stage boundary. Its result is cut into `partitions`
/// contiguous chunks, so downstream narrow operators run in parallel and the concatenation of
/// the partitions (what `foreach_batch` sees) keeps the order `f` returned.
struct TransformNode<I, O> {
    parent: Arc<dyn Node<I>>,
    f: Arc<BatchFn<I, O>>,
    partitions: usize,
    cache: StageCache<O>,
}

impl<I: Data, O: Data + Clone> Node<O> for TransformNode<I, O> {
    fn num_partitions(&self, env: &BatchEnv) -> usize {
        self.cache.num_partitions(env)
    }
    fn active(&self, env: &BatchEnv) -> bool {
        self.parent.active(env)
    }
    fn prepare(&self, env: &BatchEnv) -> Result<(), JobError> {
        if self.cache.get(env).is_some() {
            return Ok(());
        }
        self.parent.prepare(env)?;
        if !self.parent.active(env) {
            // No batch to transform (a window that does not slide now): no output.
            self.cache.put(env, Vec::new());
            return Ok(());
        }
        let out = env.runner.run_barrier(env, &*self.parent, &*self.f)?;
        self.cache.put(env, split_contiguous(out, self.partitions));
        Ok(())
    }
    fn compute(&self, env: &BatchEnv, _scope: Scope<'_>, p: usize, emit: Emit<'_, O>) -> Result<(), TaskError> {
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

/// Cuts `items` into at most `n` contiguous, nearly equal chunks (none when `items` is empty).
fn split_contiguous<T>(items: Vec<T>, n: usize) -> Vec<Vec<T>> {
    let chunk = items.len().div_ceil(n.max(1)).max(1);
    let mut parts = Vec::with_capacity(n);
    let mut items = items.into_iter();
    loop {
        let part: Vec<T> = items.by_ref().take(chunk).collect();
        if part.is_empty() {
            return parts;
        }
        parts.push(part);
    }
}

/// Concatenation of the partitions of several streams.
struct UnionNode<T> {
    parents: Vec<Arc<dyn Node<T>>>,
}

impl<T: Data> UnionNode<T> {
    fn locate(&self, env: &BatchEnv, mut p: usize) -> Option<(&Arc<dyn Node<T>>, usize)> {
        for parent in &self.parents {
            let n = parent.num_partitions(env);
            if p < n {
                return Some((parent, p));
            }
            p -= n;
        }
        None
    }
}

impl<T: Data> Node<T> for UnionNode<T> {
    fn num_partitions(&self, env: &BatchEnv) -> usize {
        self.parents.iter().map(|p| p.num_partitions(env)).sum()
    }
    fn active(&self, env: &BatchEnv) -> bool {
        self.parents.iter().any(|p| p.active(env))
    }
    fn prepare(&self, env: &BatchEnv) -> Result<(), JobError> {
        self.parents.iter().try_for_each(|p| p.prepare(env))
    }
    fn compute(&self, env: &BatchEnv, scope: Scope<'_>, p: usize, emit: Emit<'_, T>) -> Result<(), TaskError> {
        match self.locate(env, p) {
            Some((parent, q)) => parent.compute(env, scope, q, emit),
            None => Ok(()),
        }
    }
    fn source_block(&self, env: &BatchEnv, p: usize) -> Option<TrackedBlock> {
        self.locate(env, p).and_then(|(parent, q)| parent.source_block(env, q))
    }

    fn input_reads(&self, reads: &mut InputReads) {
        self.parents.iter().for_each(|p| p.input_reads(reads));
    }

    fn forget(&self, instance: InstanceId, time_ms: i64) {
        self.parents.iter().for_each(|p| p.forget(instance, time_ms));
    }
}

/// The reduce function of a keyed stage, as its map side's combiner.
type ReduceFn<V> = dyn Fn(V, V) -> V + Send + Sync;
/// How a keyed stage folds one element of its parent into its chunk's map. Each fold calls its
/// operator's own combine function, not the stage's `dyn` [`ReduceFn`]: per key that is a call the
/// compiler inlines (`a + b`) instead of an indirect one.
type FoldFn<T, K, V> = dyn Fn(T, &mut CombineMap<K, V>) + Send + Sync;

/// `reduce_by_key` and `flat_map_reduce_by_key`: map-side combine in the fused stage below (each
/// element folded into its chunk's map by `fold`), then a hash shuffle.
struct ReduceByKeyNode<T, K, V> {
    parent: Arc<dyn Node<T>>,
    fold: Arc<FoldFn<T, K, V>>,
    reduce: Arc<ReduceFn<V>>,
    partitions: usize,
    keys_hint: MapSizeHint,
    cache: StageCache<(K, V)>,
}

impl<T: Data, K: Key, V: Data + Clone> ReduceByKeyNode<T, K, V> {
    fn stream(
        parent: &DStream<T>,
        fold: Arc<FoldFn<T, K, V>>,
        reduce: Arc<ReduceFn<V>>,
        partitions: usize,
    ) -> DStream<(K, V)> {
        DStream {
            node: Arc::new(ReduceByKeyNode {
                parent: parent.node.clone(),
                fold,
                reduce,
                partitions: partitions.max(1),
                keys_hint: MapSizeHint::default(),
                cache: StageCache::default(),
            }),
            graph: parent.graph.clone(),
        }
    }
}

impl<T: Data, K: Key, V: Data + Clone> Node<(K, V)> for ReduceByKeyNode<T, K, V> {
    fn num_partitions(&self, env: &BatchEnv) -> usize {
        self.cache.num_partitions(env)
    }
    fn active(&self, env: &BatchEnv) -> bool {
        self.parent.active(env)
    }
    fn prepare(&self, env: &BatchEnv) -> Result<(), JobError> {
        if self.cache.get(env).is_some() {
            return Ok(());
        }
        let merged = combine_with(
            env,
            &*self.parent,
            &Reduce(&*self.reduce),
            self.partitions,
            &self.keys_hint,
            &|x, map| (self.fold)(x, map),
        )?;
        self.cache
            .put(env, merged.into_iter().map(|m| m.into_iter().collect()).collect());
        Ok(())
    }
    fn compute(&self, env: &BatchEnv, _scope: Scope<'_>, p: usize, emit: Emit<'_, (K, V)>) -> Result<(), TaskError> {
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

impl<T: Data> DStream<T> {
    fn narrow<O: Data>(&self, f: impl Fn(T, Emit<'_, O>) + Send + Sync + 'static) -> DStream<O> {
        DStream {
            node: Arc::new(FlatMapNode {
                parent: self.node.clone(),
                f: Arc::new(f),
            }),
            graph: self.graph.clone(),
        }
    }

    /// Applies `f` to every element.
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// # let h = TestHarness::new()?;
    /// let lines = h.input()?.map(text);
    /// let lengths = h.collect(&lines.map(|line| line.len()))?;
    /// h.start()?;
    /// h.push(["a", "bb"]);
    /// h.run_batch()?;
    /// assert_eq!(lengths.batches(), vec![vec![1, 2]]);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn map<O: Data>(&self, f: impl Fn(T) -> O + Send + Sync + 'static) -> DStream<O> {
        self.narrow(move |x, emit| emit(f(x)))
    }

    /// Applies `f` to every element and flattens the results.
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// # let h = TestHarness::new()?;
    /// let lines = h.input()?.map(text);
    /// let words = h.collect(&lines.flat_map(|line| line.split(' ').map(str::to_owned).collect::<Vec<_>>()))?;
    /// h.start()?;
    /// h.push(["a b", "c"]);
    /// h.run_batch()?;
    /// assert_eq!(words.batches(), vec![vec!["a", "b", "c"]]);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn flat_map<O: Data, I: IntoIterator<Item = O>>(
        &self,
        f: impl Fn(T) -> I + Send + Sync + 'static,
    ) -> DStream<O> {
        self.narrow(move |x, emit| f(x).into_iter().for_each(&mut *emit))
    }

    /// `flat_map` then [`reduce_by_key`](DStream::reduce_by_key), fused, with keys that borrow
    /// from their element: `pairs` is given each element by reference and emits `(key, value)`
    /// pairs whose keys may be slices of it (`&[u8]`, `&str`). The map side looks a key up as it
    /// is and copies it only the first time a task sees it, so a repeated key costs one hash
    /// lookup — no allocation, no reference count, no intermediate collection — and the result
    /// holds no slice of an input block. Keys come out owned: a [`ByteKey`](sluice_operators::ByteKey) for `[u8]` (inline up to 22 bytes), `Box<str>`
    /// for `str`. `reduce` must be associative and commutative, as for `reduce_by_key`.
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # let h = TestHarness::new()?;
    /// let lines = h.input()?;
    /// let sums = lines.flat_map_reduce_by_key(
    ///     |line: &bytes::Bytes, emit| {
    ///         for pair in line.split(|b| *b == b' ') {
    ///             let (key, value) = pair.split_at(1);
    ///             emit(key, value.len() as u64);
    ///         }
    ///     },
    ///     |a, b| a + b,
    /// );
    /// let sums = h.collect(&sums)?;
    /// h.start()?;
    /// h.push(["a12 b1", "a123"]);
    /// h.run_batch()?;
    /// let expected: Vec<(sluice_operators::ByteKey, u64)> = vec![(b"a"[..].into(), 5), (b"b"[..].into(), 1)];
    /// assert_eq!(sums.sorted_batches(), vec![expected]);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn flat_map_reduce_by_key<Q, V>(
        &self,
        pairs: impl Fn(&T, &mut dyn FnMut(&Q, V)) + Send + Sync + 'static,
        reduce: impl Fn(V, V) -> V + Send + Sync + 'static,
    ) -> DStream<(Q::Owned, V)>
    where
        Q: BorrowedKey + ?Sized + 'static,
        V: Data + Clone,
    {
        let reduce = Arc::new(reduce);
        let combine = reduce.clone();
        let fold = move |x: T, map: &mut CombineMap<Q::Owned, V>| {
            pairs(&x, &mut |key, value| map.add_borrowed(key, value, &Reduce(&*combine)));
        };
        ReduceByKeyNode::stream(self, Arc::new(fold), reduce, self.graph.default_partitions())
    }

    /// `flat_map` then [`count_by_value`](DStream::count_by_value), fused, with keys that borrow
    /// from their element (see [`flat_map_reduce_by_key`](Self::flat_map_reduce_by_key)): word
    /// count without a `Bytes` or `String` per word.
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # let h = TestHarness::new()?;
    /// let lines = h.input()?;
    /// let counts = lines.flat_map_count_by_value(|line: &bytes::Bytes, emit| {
    ///     line.split(u8::is_ascii_whitespace).filter(|w| !w.is_empty()).for_each(emit);
    /// });
    /// let counts = h.collect(&counts)?;
    /// h.start()?;
    /// h.push(["to be or", "not to be"]);
    /// h.run_batch()?;
    /// let words: Vec<(String, u64)> = counts.sorted_batches()[0]
    ///     .iter()
    ///     .map(|(w, c)| (String::from_utf8_lossy(w).into_owned(), *c))
    ///     .collect();
    /// assert_eq!(words, [("be".into(), 2), ("not".into(), 1), ("or".into(), 1), ("to".into(), 2)]);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn flat_map_count_by_value<Q>(
        &self,
        keys: impl Fn(&T, &mut dyn FnMut(&Q)) + Send + Sync + 'static,
    ) -> DStream<(Q::Owned, u64)>
    where
        Q: BorrowedKey + ?Sized + 'static,
    {
        // Not through `flat_map_reduce_by_key`: its `emit` would be one more indirect call per key.
        // Counts are never zero, and `Option<NonZeroU64>` is 8 bytes where `Option<u64>` is 16:
        // the map's slots (key and count) are a fifth smaller, and so is the table a lookup walks.
        let add = |a: NonZeroU64, b: NonZeroU64| a.saturating_add(b.get());
        let fold = move |x: T, map: &mut CombineMap<Q::Owned, NonZeroU64>| {
            keys(&x, &mut |key| map.add_borrowed(key, NonZeroU64::MIN, &Reduce(add)));
        };
        ReduceByKeyNode::stream(self, Arc::new(fold), Arc::new(add), self.graph.default_partitions())
            .map(|(key, count)| (key, count.get()))
    }

    /// Keeps the elements for which `f` is true.
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// # let h = TestHarness::new()?;
    /// let lines = h.input()?.map(text);
    /// let long = h.collect(&lines.filter(|line| line.len() > 1))?;
    /// h.start()?;
    /// h.push(["a", "bb", "ccc"]);
    /// h.run_batch()?;
    /// assert_eq!(long.batches(), vec![vec!["bb", "ccc"]]);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn filter(&self, f: impl Fn(&T) -> bool + Send + Sync + 'static) -> DStream<T> {
        self.narrow(move |x, emit| {
            if f(&x) {
                emit(x);
            }
        })
    }

    fn try_narrow<O: Data>(
        &self,
        operator: &str,
        f: impl Fn(T, Emit<'_, O>) -> Result<(), BoxError> + Send + Sync + 'static,
    ) -> DStream<O> {
        DStream {
            node: Arc::new(TryFlatMapNode {
                parent: self.node.clone(),
                f: Arc::new(f),
                stage: self.graph.stage_name(operator),
            }),
            graph: self.graph.clone(),
        }
    }

    /// Applies a fallible `f` to every element: `Ok` values flow on; an `Err` is a bad record,
    /// not a bug. Under [`FailurePolicy::DeadLetter`](crate::FailurePolicy::DeadLetter) the input
    /// record that produced the element goes to the dead-letter sink with its shard, sequence
    /// number, sub-sequence number, partition key, payload, the error's text (with its sources)
    /// and this operator's stage name (`try_map#<n>`) — once per batch, without re-running the
    /// partition and without a panic. Under `FailurePolicy::Stop` the first `Err` stops the
    /// stream with [`TaskError::Rejected`] naming the record's position. An `Err` for an element
    /// that no single input record produced (after a shuffle, a window, `map_partitions` or
    /// `transform`) always stops the stream.
    ///
    /// Panics keep their meaning: a bug. A panicking task is retried, then the failure policy
    /// applies (see [`FailurePolicy`](crate::FailurePolicy)).
    ///
    /// `examples/parse_events.rs` runs this end to end and reads the dead letters back.
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # use sluice_engine::FailurePolicy;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// let h = TestHarness::with_builder(|b| b.failure_policy(FailurePolicy::DeadLetter))?;
    /// let lines = h.input()?.map(text);
    /// let numbers = h.collect(&lines.try_map(|line| line.trim().parse::<u64>()))?;
    /// h.start()?;
    /// h.push(["1", "two", "3"]);
    /// let batch = h.run_batch()?;
    /// assert_eq!(numbers.batches(), vec![vec![1, 3]]);
    /// // "two" went to the dead-letter sink with its shard, sequence number, payload and the error.
    /// assert_eq!(batch.dead_letters, 1);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn try_map<O: Data, E: Into<BoxError>>(
        &self,
        f: impl Fn(T) -> std::result::Result<O, E> + Send + Sync + 'static,
    ) -> DStream<O> {
        self.try_narrow("try_map", move |x, emit| {
            emit(f(x).map_err(Into::into)?);
            Ok(())
        })
    }

    /// Like [`flat_map`](Self::flat_map) with a fallible `f`; an `Err` is handled as in
    /// [`try_map`](Self::try_map) (the element emits nothing).
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # use sluice_engine::FailurePolicy;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// let h = TestHarness::with_builder(|b| b.failure_policy(FailurePolicy::DeadLetter))?;
    /// let lines = h.input()?.map(text);
    /// let numbers = lines.try_flat_map(|line| line.split(',').map(str::parse::<u64>).collect::<Result<Vec<_>, _>>());
    /// let numbers = h.collect(&numbers)?;
    /// h.start()?;
    /// h.push(["1,2", "3,x"]);
    /// assert_eq!(h.run_batch()?.dead_letters, 1);
    /// assert_eq!(numbers.batches(), vec![vec![1, 2]]);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn try_flat_map<O: Data, I: IntoIterator<Item = O>, E: Into<BoxError>>(
        &self,
        f: impl Fn(T) -> std::result::Result<I, E> + Send + Sync + 'static,
    ) -> DStream<O> {
        self.try_narrow("try_flat_map", move |x, emit| {
            f(x).map_err(Into::into)?.into_iter().for_each(&mut *emit);
            Ok(())
        })
    }

    /// Like [`filter`](Self::filter) with a fallible predicate; an `Err` is handled as in
    /// [`try_map`](Self::try_map) (the element is dropped from the stream and dead-lettered).
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # use sluice_engine::FailurePolicy;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// let h = TestHarness::with_builder(|b| b.failure_policy(FailurePolicy::DeadLetter))?;
    /// let lines = h.input()?.map(text);
    /// let even = h.collect(&lines.try_filter(|line| line.parse::<u64>().map(|n| n % 2 == 0)))?;
    /// h.start()?;
    /// h.push(["1", "2", "x"]);
    /// assert_eq!(h.run_batch()?.dead_letters, 1);
    /// assert_eq!(even.batches(), vec![vec!["2"]]);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn try_filter<E: Into<BoxError>>(
        &self,
        f: impl Fn(&T) -> std::result::Result<bool, E> + Send + Sync + 'static,
    ) -> DStream<T> {
        self.try_narrow("try_filter", move |x, emit| {
            if f(&x).map_err(Into::into)? {
                emit(x);
            }
            Ok(())
        })
    }

    /// Applies `f` to each whole partition (given its index).
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// # let h = TestHarness::new()?;
    /// let lines = h.input()?.map(text);
    /// // One partition per input block: its size.
    /// let sizes = h.collect(&lines.map_partitions(|_index, lines| vec![lines.len()]))?;
    /// h.start()?;
    /// h.push(["a", "b", "c"]);
    /// h.run_batch()?;
    /// assert_eq!(sizes.last().iter().sum::<usize>(), 3);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn map_partitions<O: Data>(&self, f: impl Fn(usize, Vec<T>) -> Vec<O> + Send + Sync + 'static) -> DStream<O> {
        DStream {
            node: Arc::new(MapPartitionsNode {
                parent: self.node.clone(),
                f: Arc::new(f),
            }),
            graph: self.graph.clone(),
        }
    }

    /// Applies `f` to the whole batch at once: `f(batch_time_ms, elements)` returns the batch of
    /// the new stream (Spark's `transform`). Use it for what needs every element of the batch
    /// together: sorting, de-duplicating across partitions, top-k, joining with a table.
    ///
    /// This is a stage boundary (a barrier, like a shuffle): the stream below it is computed in
    /// parallel, its partitions are concatenated in order and handed to `f` on the executor pool
    /// (so `f` may itself use rayon); `f`'s result is cut into the context's default number of
    /// partitions, in order. A panic in `f` is retried (the input is recomputed), up to the
    /// context's `max_task_attempts`; then the batch fails and the stream stops — the dead-letter
    /// policy does not apply, since no single input record is to blame. `f` must be a
    /// deterministic function of its input for re-run batches to reproduce their output.
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// # let h = TestHarness::new()?;
    /// let lines = h.input()?.map(text);
    /// // Every distinct line of the batch, sorted (across all partitions).
    /// let sorted = h.collect(&lines.transform(|_batch_time, mut lines: Vec<String>| {
    ///     lines.sort_unstable();
    ///     lines.dedup();
    ///     lines
    /// }))?;
    /// h.start()?;
    /// h.push(["b", "a", "b"]);
    /// h.run_batch()?;
    /// assert_eq!(sorted.batches(), vec![vec!["a", "b"]]);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn transform<O: Data + Clone>(
        &self,
        f: impl Fn(BatchTime, Vec<T>) -> Vec<O> + Send + Sync + 'static,
    ) -> DStream<O> {
        DStream {
            node: Arc::new(TransformNode {
                parent: self.node.clone(),
                f: Arc::new(f),
                partitions: self.graph.default_partitions(),
                cache: StageCache::default(),
            }),
            graph: self.graph.clone(),
        }
    }

    /// Computes this stream once per batch and keeps the result until the batch completes
    /// (Spark's `cache()`/`persist()` on a `DStream`): every stage and output that reads it
    /// shares one evaluation instead of re-running the fused chain below it. Use it where
    /// several keyed stages, windows or outputs read one parsed stream — the parse (and its
    /// dead letters, its side effects) then runs once per record per batch.
    ///
    /// The cached partitions keep each element's input record, so fallible operators and the
    /// per-record dead-letter fallback above the cache still name the right record. It costs the
    /// memory of one batch of `T`, released when the batch completes (a window keeps the
    /// batches it covers, as without a cache).
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # use sluice_engine::FailurePolicy;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// let h = TestHarness::with_builder(|b| b.failure_policy(FailurePolicy::DeadLetter))?;
    /// let lines = h.input()?.map(text);
    /// let parsed = lines.try_map(|line| line.parse::<u64>()).cache(); // parsed once, read twice
    /// let sum = h.collect(&parsed.map(|n| ("sum", n)).reduce_by_key(|a, b| a + b))?;
    /// let count = h.collect(&parsed.map(|_| ("count", 1)).reduce_by_key(|a, b| a + b))?;
    /// h.start()?;
    /// h.push(["1", "2", "x", "3"]);
    /// assert_eq!(h.run_batch()?.dead_letters, 1); // "x": one letter, though two stages read it
    /// assert_eq!(sum.batches(), vec![vec![("sum", 6)]]);
    /// assert_eq!(count.batches(), vec![vec![("count", 3)]]);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn cache(&self) -> DStream<T>
    where
        T: Clone,
    {
        DStream {
            node: Arc::new(CacheNode {
                parent: self.node.clone(),
                by_batch: Mutex::new(BTreeMap::new()),
            }),
            graph: self.graph.clone(),
        }
    }

    /// The partitions of `self` followed by those of `others`, per batch.
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// # let h = TestHarness::new()?;
    /// let lines = h.input()?.map(text);
    /// let shouted = lines.map(|line| line.to_uppercase());
    /// let both = h.collect(&lines.union(&[shouted]))?;
    /// h.start()?;
    /// h.push(["a"]);
    /// h.run_batch()?;
    /// assert_eq!(both.batches(), vec![vec!["a", "A"]]);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn union(&self, others: &[DStream<T>]) -> DStream<T> {
        let mut parents = vec![self.node.clone()];
        parents.extend(others.iter().map(|o| o.node.clone()));
        DStream {
            node: Arc::new(UnionNode { parents }),
            graph: self.graph.clone(),
        }
    }
}

impl<K: Key, V: Data + Clone> DStream<(K, V)> {
    /// Combines the values of each key with `reduce` (associative and commutative), combining
    /// map-side before the shuffle into the context's default number of partitions.
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// # let h = TestHarness::new()?;
    /// let pairs = h.input()?.map(text).map(|line| {
    ///     let (key, value) = line.split_once('=').expect("key=value");
    ///     (key.to_owned(), value.parse::<u64>().expect("a number"))
    /// });
    /// let totals = h.collect(&pairs.reduce_by_key(|a, b| a + b))?;
    /// h.start()?;
    /// h.push(["x=1", "y=2", "x=3"]);
    /// h.run_batch()?;
    /// assert_eq!(totals.sorted_batches(), vec![vec![("x".to_owned(), 4), ("y".to_owned(), 2)]]);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn reduce_by_key(&self, reduce: impl Fn(V, V) -> V + Send + Sync + 'static) -> DStream<(K, V)> {
        let partitions = self.graph.default_partitions();
        self.reduce_by_key_into(reduce, partitions)
    }

    /// [`reduce_by_key`](Self::reduce_by_key) into `partitions` shuffle partitions.
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// # let h = TestHarness::new()?;
    /// let pairs = h.input()?.map(text).map(|line| {
    ///     let (key, value) = line.split_once('=').expect("key=value");
    ///     (key.to_owned(), value.parse::<u64>().expect("a number"))
    /// });
    /// let totals = h.collect(&pairs.reduce_by_key_into(|a, b| a + b, 8))?;
    /// h.start()?;
    /// h.push(["x=1", "x=3"]);
    /// h.run_batch()?;
    /// assert_eq!(totals.batches(), vec![vec![("x".to_owned(), 4)]]);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn reduce_by_key_into(
        &self,
        reduce: impl Fn(V, V) -> V + Send + Sync + 'static,
        partitions: usize,
    ) -> DStream<(K, V)> {
        let reduce = Arc::new(reduce);
        let combine = reduce.clone();
        let fold = move |(key, value): (K, V), map: &mut CombineMap<K, V>| map.add(key, value, &Reduce(&*combine));
        ReduceByKeyNode::stream(self, Arc::new(fold), reduce, partitions)
    }
}

impl<T: Key> DStream<T> {
    /// Counts each distinct element per batch.
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// # let h = TestHarness::new()?;
    /// let words = h.input()?.map(text);
    /// let counts = h.collect(&words.count_by_value())?;
    /// h.start()?;
    /// h.push(["a", "b", "a"]);
    /// h.run_batch()?;
    /// assert_eq!(counts.sorted_batches(), vec![vec![("a".to_owned(), 2), ("b".to_owned(), 1)]]);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn count_by_value(&self) -> DStream<(T, u64)> {
        self.map(|x| (x, 1u64)).reduce_by_key(|a, b| a + b)
    }
}

#[cfg(test)]
mod tests {
    use super::split_contiguous;

    #[test]
    fn split_contiguous_keeps_order_and_balances() {
        let parts = split_contiguous((0..10).collect(), 4);
        assert_eq!(parts, vec![vec![0, 1, 2], vec![3, 4, 5], vec![6, 7, 8], vec![9]]);
        assert_eq!(split_contiguous((0..2).collect(), 4), vec![vec![0], vec![1]]);
        assert!(split_contiguous(Vec::<u8>::new(), 4).is_empty());
        assert_eq!(split_contiguous(vec![1, 2], 0), vec![vec![1, 2]]);
    }
}
