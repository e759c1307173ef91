//! Keyed shuffles: map-side combining, hash partitioning and the merge after the shuffle.
//!
//! These are the per-batch kernels behind every keyed operator of the engine (`reduce_by_key`,
//! `count_by_value`, `update_state_by_key`, the per-batch step of windows):
//!
//! 1. each map task folds the `(key, value)` pairs of its partition into a [`CombineMap`] with a
//!    [`Combiner`] (Spark's `combineByKey` triple: create, add, merge);
//! 2. [`shuffle`] cuts every task's map into `partitions` buckets by [`partition_of`] and merges
//!    the buckets of each partition with [`Combiner::merge`], one rayon task per partition.
//!
//! # Design
//!
//! - **Deterministic placement.** Keys are hashed with `FxHash`, which has no random seed, so a
//!   key lands in the same partition in every run and every process (state snapshots are
//!   re-partitioned with the same function on restore).
//! - **No per-record clone.** A combiner takes its accumulator by value. The map keeps each
//!   accumulator in an `Option` slot and moves it out (`Option::take`) for the call, so combining
//!   a record never clones the accumulated value (a `String` or `Vec` accumulator would otherwise
//!   be copied once per record).
//! - **Pure functions.** Nothing here knows about batches, tasks or failures: the engine runs
//!   these kernels inside its tasks and decides what a panic means. A panic inside a combiner
//!   leaves the slot being combined empty; discard a map whose combine panicked (the engine
//!   discards the whole task's output and retries it).
//!
//! ```
//! use sluice_operators::shuffle::{CombineMap, Reduce, shuffle};
//!
//! let sum = Reduce(|a: u64, b: u64| a + b);
//! let mut left = CombineMap::new();
//! let mut right = CombineMap::new();
//! for word in ["a", "b", "a"] {
//!     left.add(word, 1, &sum);
//! }
//! right.add("a", 1, &sum);
//! let partitions = shuffle(vec![left, right], 4, &sum);
//! assert_eq!(partitions.len(), 4);
//! let mut counts: Vec<(&str, u64)> = partitions.into_iter().flatten().collect();
//! counts.sort_unstable();
//! assert_eq!(counts, [("a", 3), ("b", 1)]);
//! ```

use std::borrow::Borrow;
use std::collections::hash_map::Entry;
use std::hash::{BuildHasher, Hash};
use std::marker::PhantomData;

use rayon::prelude::*;
use rustc_hash::{FxBuildHasher, FxHashMap};

/// The shuffle partition of `key` among `partitions` (at least one).
///
/// Deterministic across runs and processes (`FxHash`, no random seed).
///
/// ```
/// use sluice_operators::shuffle::partition_of;
/// let p = partition_of(&"word", 8);
/// assert!(p < 8);
/// assert_eq!(p, partition_of(&"word", 8));
/// assert_eq!(partition_of(&"word", 0), 0);
/// ```
#[must_use]
pub fn partition_of<K: Hash + ?Sized>(key: &K, partitions: usize) -> usize {
    let partitions = partitions.max(1) as u64;
    // The remainder is below `partitions`, which came from a usize.
    #[allow(clippy::cast_possible_truncation)]
    let p = (FxBuildHasher.hash_one(key) % partitions) as usize;
    p
}

/// How the values of one key are combined (Spark's `combineByKey`).
///
/// # Contract
/// `add` and `merge` must be associative and must not depend on the order in which records or
/// partial results arrive (tasks finish in any order): combining a key's values in any grouping
/// gives the same result. The engine may run them on any executor thread, hence `Sync`.
pub trait Combiner<V>: Sync {
    /// The per-key accumulator.
    type Acc: Send;
    /// The accumulator of a key's first value.
    fn create(&self, value: V) -> Self::Acc;
    /// Adds one more value.
    fn add(&self, acc: Self::Acc, value: V) -> Self::Acc;
    /// Merges two partial accumulators of the same key (from different tasks).
    fn merge(&self, acc: Self::Acc, other: Self::Acc) -> Self::Acc;
}

/// Combines with one associative, commutative function: `reduce_by_key`.
#[derive(Debug, Clone, Copy)]
pub struct Reduce<F>(pub F);

impl<V, F: Fn(V, V) -> V + Sync> Combiner<V> for Reduce<F>
where
    V: Send,
{
    type Acc = V;
    fn create(&self, value: V) -> V {
        value
    }
    fn add(&self, acc: V, value: V) -> V {
        (self.0)(acc, value)
    }
    fn merge(&self, acc: V, other: V) -> V {
        (self.0)(acc, other)
    }
}

/// Collects every value of a key into a `Vec`: the grouping step of `update_state_by_key`.
///
/// Within a task, values keep their arrival order; across tasks, partial lists are concatenated
/// in the order [`shuffle`] merges them (task order).
pub struct Group<V>(PhantomData<fn() -> V>);

impl<V> Group<V> {
    /// The grouping combiner.
    #[must_use]
    pub fn new() -> Self {
        Self(PhantomData)
    }
}

impl<V> Default for Group<V> {
    fn default() -> Self {
        Self::new()
    }
}

impl<V: Send> Combiner<V> for Group<V> {
    type Acc = Vec<V>;
    fn create(&self, value: V) -> Vec<V> {
        vec![value]
    }
    fn add(&self, mut acc: Vec<V>, value: V) -> Vec<V> {
        acc.push(value);
        acc
    }
    fn merge(&self, mut acc: Vec<V>, mut other: Vec<V>) -> Vec<V> {
        acc.append(&mut other);
        acc
    }
}

/// A key that a map-side combine looks up in its borrowed form and owns only when a task first
/// sees it: `flat_map_reduce_by_key`'s keys borrow from their element (a word of a line), so a
/// repeated key costs a hash lookup and no allocation or reference count, and each distinct key is
/// copied once per map. The owned keys hold no slice of the block they came from: a
/// [`ByteKey`](crate::ByteKey) for `[u8]` (short keys inline in the map's slot, so a hit compares
/// bytes without following a pointer), a `Box<str>` for `str`.
pub trait BorrowedKey: Hash + Eq {
    /// The key the map keeps (its `Hash` and `Eq` agree with the borrowed form's).
    type Owned: Borrow<Self> + Hash + Eq + Clone + Send + Sync + 'static;
    /// An owned copy of the key.
    fn to_owned_key(&self) -> Self::Owned;
}

impl BorrowedKey for [u8] {
    type Owned = crate::ByteKey;
    #[inline]
    fn to_owned_key(&self) -> crate::ByteKey {
        self.into()
    }
}

impl BorrowedKey for str {
    type Owned = Box<str>;
    fn to_owned_key(&self) -> Box<str> {
        self.into()
    }
}

/// Per-key accumulators of one task or one shuffle partition.
///
/// Each accumulator sits in an `Option` slot so a combine can move it out and back in without a
/// clone (see the module docs); a slot is empty only while its combine runs.
#[derive(Debug, Clone)]
pub struct CombineMap<K, A> {
    slots: FxHashMap<K, Option<A>>,
}

impl<K, A> Default for CombineMap<K, A> {
    fn default() -> Self {
        Self {
            slots: FxHashMap::default(),
        }
    }
}

const FILLED: &str = "a combine panicked on this map earlier; it must be discarded";

impl<K: Hash + Eq, A> CombineMap<K, A> {
    /// An empty map.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// An empty map with room for `keys` keys (a map that grows from empty rehashes its way
    /// there, which costs a map-side combine about as much as the lookups themselves).
    #[must_use]
    pub fn with_capacity(keys: usize) -> Self {
        Self {
            slots: FxHashMap::with_capacity_and_hasher(keys, FxBuildHasher),
        }
    }

    /// Number of keys.
    #[must_use]
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether no key is present.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Folds one record in: `create` for a new key, else `add`. One hash lookup, no clone.
    ///
    /// # Panics
    /// If an earlier combine on this map panicked (the map must be discarded then).
    pub fn add<V, C: Combiner<V, Acc = A>>(&mut self, key: K, value: V, combiner: &C) {
        match self.slots.entry(key) {
            Entry::Occupied(mut slot) => {
                let slot = slot.get_mut();
                let acc = slot.take().expect(FILLED);
                *slot = Some(combiner.add(acc, value));
            }
            Entry::Vacant(slot) => {
                slot.insert(Some(combiner.create(value)));
            }
        }
    }

    /// [`add`](Self::add) with a borrowed key: looks `key` up as it is and copies it
    /// ([`BorrowedKey::to_owned_key`]) only when it is new to this map.
    ///
    /// ```
    /// use sluice_operators::shuffle::{CombineMap, Reduce};
    ///
    /// let sum = Reduce(|a: u64, b: u64| a + b);
    /// let line = b"to be or not to be".to_vec();
    /// let mut map: CombineMap<sluice_operators::ByteKey, u64> = CombineMap::new();
    /// for word in line.split(|b| *b == b' ') {
    ///     map.add_borrowed(word, 1, &sum);
    /// }
    /// assert_eq!(map.len(), 4);
    /// assert_eq!(map.get(&b"be"[..].into()), Some(&2));
    /// ```
    ///
    /// # Panics
    /// If an earlier combine on this map panicked (the map must be discarded then).
    pub fn add_borrowed<Q, V, C>(&mut self, key: &Q, value: V, combiner: &C)
    where
        Q: BorrowedKey<Owned = K> + ?Sized,
        K: Borrow<Q>,
        C: Combiner<V, Acc = A>,
    {
        if let Some(slot) = self.slots.get_mut(key) {
            let acc = slot.take().expect(FILLED);
            *slot = Some(combiner.add(acc, value));
        } else {
            self.slots.insert(key.to_owned_key(), Some(combiner.create(value)));
        }
    }

    /// Merges a partial accumulator for `key` in.
    ///
    /// # Panics
    /// If an earlier combine on this map panicked.
    pub fn merge_acc(&mut self, key: K, acc: A, merge: &impl Fn(A, A) -> A) {
        match self.slots.entry(key) {
            Entry::Occupied(mut slot) => {
                let slot = slot.get_mut();
                let mine = slot.take().expect(FILLED);
                *slot = Some(merge(mine, acc));
            }
            Entry::Vacant(slot) => {
                slot.insert(Some(acc));
            }
        }
    }

    /// Merges every accumulator of `other` in (two tasks' partial results for the same keys).
    ///
    /// # Panics
    /// If an earlier combine on either map panicked.
    pub fn merge_map<V, C: Combiner<V, Acc = A>>(&mut self, other: Self, combiner: &C) {
        for (key, acc) in other {
            self.merge_acc(key, acc, &|a, b| combiner.merge(a, b));
        }
    }

    /// The accumulator of `key`.
    #[must_use]
    pub fn get(&self, key: &K) -> Option<&A> {
        self.slots.get(key).map(|slot| slot.as_ref().expect(FILLED))
    }

    /// Removes and returns the accumulator of `key`.
    pub fn remove(&mut self, key: &K) -> Option<A> {
        self.slots.remove(key).map(|slot| slot.expect(FILLED))
    }

    /// The keys and accumulators, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (&K, &A)> {
        self.slots.iter().map(|(k, slot)| (k, slot.as_ref().expect(FILLED)))
    }
}

impl<K, A> IntoIterator for CombineMap<K, A> {
    type Item = (K, A);
    type IntoIter = std::iter::Map<std::collections::hash_map::IntoIter<K, Option<A>>, fn((K, Option<A>)) -> (K, A)>;
    fn into_iter(self) -> Self::IntoIter {
        self.slots.into_iter().map(|(k, slot)| (k, slot.expect(FILLED)))
    }
}

impl<K: Hash + Eq, A> FromIterator<(K, A)> for CombineMap<K, A> {
    /// Later accumulators for a key replace earlier ones.
    fn from_iter<I: IntoIterator<Item = (K, A)>>(iter: I) -> Self {
        Self {
            slots: iter.into_iter().map(|(k, a)| (k, Some(a))).collect(),
        }
    }
}

/// Cuts `items` into `partitions` buckets by [`partition_of`] their key.
///
/// ```
/// use sluice_operators::shuffle::{partition_by_key, partition_of};
/// let buckets = partition_by_key(vec![("a", 1), ("b", 2), ("a", 3)], 3);
/// assert_eq!(buckets.len(), 3);
/// assert_eq!(buckets[partition_of(&"a", 3)].iter().filter(|(k, _)| *k == "a").count(), 2);
/// ```
pub fn partition_by_key<K: Hash, A>(items: impl IntoIterator<Item = (K, A)>, partitions: usize) -> Vec<Vec<(K, A)>> {
    let n = partitions.max(1);
    let mut buckets: Vec<Vec<(K, A)>> = (0..n).map(|_| Vec::new()).collect();
    for (k, a) in items {
        buckets[partition_of(&k, n)].push((k, a));
    }
    buckets
}

/// One list of `(key, accumulator)` pairs per shuffle partition.
type Buckets<K, A> = Vec<Vec<(K, A)>>;

/// The hash shuffle: splits every task's map into `partitions` buckets and merges each
/// partition's buckets (in task order) with `combiner`'s `merge`.
///
/// Runs on the current rayon pool (the engine calls it inside its executor pool): the split is
/// one rayon task per input map, the merge one per output partition. Returns exactly
/// `max(partitions, 1)` maps; key `k` is in map [`partition_of(&k, partitions)`](partition_of).
pub fn shuffle<K, V, C>(maps: Vec<CombineMap<K, C::Acc>>, partitions: usize, combiner: &C) -> Vec<CombineMap<K, C::Acc>>
where
    K: Hash + Eq + Send,
    C: Combiner<V>,
{
    let n = partitions.max(1);
    let bucketed: Vec<Buckets<K, C::Acc>> = maps.into_par_iter().map(|map| partition_by_key(map, n)).collect();
    let mut columns: Vec<Buckets<K, C::Acc>> = (0..n).map(|_| Vec::with_capacity(bucketed.len())).collect();
    for buckets in bucketed {
        for (q, bucket) in buckets.into_iter().enumerate() {
            columns[q].push(bucket);
        }
    }
    let merge = |a, b| combiner.merge(a, b);
    columns
        .into_par_iter()
        .map(|column| {
            let largest = column.iter().map(Vec::len).max().unwrap_or(0);
            let mut out = CombineMap::with_capacity(largest);
            for (k, acc) in column.into_iter().flatten() {
                out.merge_acc(k, acc, &merge);
            }
            out
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use proptest::prelude::*;

    use super::*;

    /// A value that cannot be cloned: combining must not need to clone accumulators.
    #[derive(Debug)]
    struct NoClone(u64);

    #[test]
    fn combining_never_clones_the_accumulator() {
        // `NoClone` is not `Clone` at all: this compiles only because nothing clones it.
        let sum = Reduce(|a: NoClone, b: NoClone| NoClone(a.0 + b.0));
        let mut map = CombineMap::new();
        for i in 0..100u64 {
            map.add(i % 7, NoClone(1), &sum);
        }
        let merged = shuffle(vec![map], 3, &sum);
        let total: u64 = merged.iter().flat_map(CombineMap::iter).map(|(_, v)| v.0).sum();
        assert_eq!(total, 100);
    }

    #[test]
    fn group_keeps_every_value_in_task_order() {
        let group = Group::new();
        let mut first = CombineMap::new();
        let mut second = CombineMap::new();
        first.add("k", 1, &group);
        first.add("k", 2, &group);
        second.add("k", 3, &group);
        let merged = shuffle(vec![first, second], 2, &group);
        let q = partition_of(&"k", 2);
        assert_eq!(merged[q].get(&"k"), Some(&vec![1, 2, 3]));
        assert!(merged[1 - q].is_empty());
    }

    #[test]
    fn merge_map_combines_partial_results() {
        let sum = Reduce(|a: u32, b: u32| a + b);
        let mut a: CombineMap<&str, u32> = [("x", 1), ("y", 2)].into_iter().collect();
        let b: CombineMap<&str, u32> = [("x", 10), ("z", 5)].into_iter().collect();
        a.merge_map(b, &sum);
        let mut all: Vec<_> = a.into_iter().collect();
        all.sort_unstable();
        assert_eq!(all, [("x", 11), ("y", 2), ("z", 5)]);
    }

    #[test]
    fn a_panicking_combine_poisons_only_that_map() {
        let boom = Reduce(|_a: u8, _b: u8| -> u8 { panic!("boom") });
        let mut map = CombineMap::new();
        map.add("k", 1, &boom);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| map.add("k", 2, &boom)));
        assert!(caught.is_err());
        let reused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| map.get(&"k").copied()));
        assert!(reused.is_err(), "an emptied slot must not pass for a value");
    }

    #[test]
    fn borrowed_and_owned_keys_meet_in_one_map() {
        let sum = Reduce(|a: u64, b: u64| a + b);
        let mut map: CombineMap<Box<str>, u64> = CombineMap::new();
        let line = String::from("a b a c a");
        for word in line.split(' ') {
            map.add_borrowed(word, 1, &sum);
        }
        map.add(Box::from("b"), 10, &sum);
        let merged = shuffle(vec![map], 2, &sum);
        let mut counts: Vec<(Box<str>, u64)> = merged.into_iter().flatten().collect();
        counts.sort_unstable();
        assert_eq!(counts, [("a".into(), 3), ("b".into(), 11), ("c".into(), 1)]);
    }

    proptest! {
        /// Map-side combine + shuffle equals a single-threaded count, and every key sits in its
        /// `partition_of` partition, for any split of the input into tasks.
        #[test]
        fn shuffle_equals_a_sequential_reduce(
            tasks in prop::collection::vec(prop::collection::vec((0u16..50, 1u64..10), 0..40), 0..6),
            partitions in 0usize..7,
        ) {
            let sum = Reduce(|a: u64, b: u64| a + b);
            let mut reference: HashMap<u16, u64> = HashMap::new();
            let maps: Vec<CombineMap<u16, u64>> = tasks
                .iter()
                .map(|records| {
                    let mut map = CombineMap::new();
                    for &(k, v) in records {
                        *reference.entry(k).or_default() += v;
                        map.add(k, v, &sum);
                    }
                    map
                })
                .collect();
            let merged = shuffle(maps, partitions, &sum);
            prop_assert_eq!(merged.len(), partitions.max(1));
            let mut seen: HashMap<u16, u64> = HashMap::new();
            for (q, map) in merged.into_iter().enumerate() {
                for (k, v) in map {
                    prop_assert_eq!(partition_of(&k, partitions), q);
                    prop_assert!(seen.insert(k, v).is_none(), "key {} in two partitions", k);
                }
            }
            prop_assert_eq!(seen, reference);
        }
    }
}
