//! Window operators: `window` and `reduce_by_key_and_window`.
//!
//! Window length and slide are whole numbers of batches, as in Spark (where they must be
//! multiples of the batch interval). A windowed stream is *active* only at batch times that are a
//! multiple of the slide; outputs skip it at other times.
//!
//! A window needs the outputs of its parent for the last `length` batches. They are kept in memory
//! as batches run; after a restart the missing ones are recomputed from those batches' blocks
//! (the engine keeps the blocks of the last `length + slide` batches for this; blocks from the
//! previous run are read from the store or replayed from the source). Windows over stateful
//! streams are not recomputed this way: put the window below the state.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};

use rustc_hash::FxHashMap;
use sluice_operators::window;

use super::dstream::DStream;
use crate::exec::{
    BatchEnv, Data, InputReads, InstanceId, JobError, Key, Node, Scope, StageCache, TaskError, TrackedBlock,
};
use crate::{Error, Result};

type Parts<T> = Arc<Vec<Vec<T>>>;

/// A window over a stream: the last `length` batches, computed every `slide` batches (Spark's
/// window and slide durations, counted in batch intervals).
///
/// ```
/// use sluice_engine::Window;
/// let sliding = Window::new(3, 1)?; // the last 3 batches, every batch
/// let tumbling = Window::tumbling(5)?; // 5 batches at a time, no overlap
/// assert_eq!((sliding.length(), sliding.slide()), (3, 1));
/// assert_eq!((tumbling.length(), tumbling.slide()), (5, 5));
/// assert!(Window::new(0, 1).is_err());
/// # Ok::<(), sluice_engine::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Window {
    length: usize,
    slide: usize,
}

impl Window {
    /// The last `length` batches, every `slide` batches. With `slide > length` some batches are in
    /// no window (Spark allows this too).
    ///
    /// # Errors
    /// [`Error::Config`] if `length` or `slide` is 0.
    pub fn new(length: usize, slide: usize) -> Result<Self> {
        if length == 0 || slide == 0 {
            return Err(Error::Config {
                field: "window",
                reason: format!(
                    "length and slide are counted in batches and must be at least 1 (got length {length}, slide \
                     {slide}); for every batch on its own use Window::new(1, 1)"
                ),
            });
        }
        Ok(Self { length, slide })
    }

    /// Windows of `length` batches that do not overlap (`slide == length`).
    ///
    /// # Errors
    /// [`Error::Config`] if `length` is 0.
    pub fn tumbling(length: usize) -> Result<Self> {
        Self::new(length, length)
    }

    /// Batches in one window.
    #[must_use]
    pub fn length(&self) -> usize {
        self.length
    }

    /// Batches between two windows.
    #[must_use]
    pub fn slide(&self) -> usize {
        self.slide
    }
}

/// Parent outputs per instance and batch time, computed on demand for earlier batches.
struct History<T> {
    by_batch: Mutex<BTreeMap<(InstanceId, i64), Parts<T>>>,
}

impl<T: Data> History<T> {
    fn new() -> Self {
        Self {
            by_batch: Mutex::new(BTreeMap::new()),
        }
    }

    fn get(&self, env: &BatchEnv, parent: &dyn Node<T>, time_ms: i64) -> Result<Parts<T>, JobError> {
        if let Some(parts) = self
            .by_batch
            .lock()
            .expect("window history")
            .get(&(env.instance, time_ms))
        {
            return Ok(parts.clone());
        }
        let parts = if time_ms == env.time_ms {
            env.runner.collect(env, parent)?
        } else {
            match env.history.env_for(time_ms) {
                Some(past) => env.runner.collect(&past, parent)?,
                None => Vec::new(),
            }
        };
        let parts = Arc::new(parts);
        self.by_batch
            .lock()
            .expect("window history")
            .insert((env.instance, time_ms), parts.clone());
        Ok(parts)
    }

    fn forget_before(&self, instance: InstanceId, time_ms: i64) {
        self.by_batch
            .lock()
            .expect("window history")
            .retain(|(i, t), _| *i != instance || *t >= time_ms);
    }
}

fn is_active(env: &BatchEnv, slide: usize) -> bool {
    (env.time_ms / env.interval_ms).rem_euclid(slide as i64) == 0
}

/// Batches' partitions as the window kernels take them.
fn slices<T>(batches: &[Arc<Vec<Vec<T>>>]) -> Vec<&[Vec<T>]> {
    batches.iter().map(|p| &p[..]).collect()
}

fn window_times(env: &BatchEnv, length: usize) -> impl Iterator<Item = i64> + '_ {
    (0..length as i64).rev().map(move |k| env.time_ms - k * env.interval_ms)
}

/// `window`: the union of the parent's last `length` batches.
struct WindowNode<T> {
    parent: Arc<dyn Node<T>>,
    length: usize,
    slide: usize,
    history: History<T>,
    cache: StageCache<T>,
}

impl<T: Data + Clone> Node<T> for WindowNode<T> {
    fn num_partitions(&self, env: &BatchEnv) -> usize {
        self.cache.num_partitions(env)
    }
    fn active(&self, env: &BatchEnv) -> bool {
        is_active(env, self.slide)
    }
    fn prepare(&self, env: &BatchEnv) -> Result<(), JobError> {
        // The parent runs every batch so that its outputs are at hand when the window slides.
        let current = self.history.get(env, &*self.parent, env.time_ms)?;
        if !self.active(env) || self.cache.get(env).is_some() {
            return Ok(());
        }
        let mut parts = Vec::new();
        for t in window_times(env, self.length) {
            let p = if t == env.time_ms {
                current.clone()
            } else {
                self.history.get(env, &*self.parent, t)?
            };
            parts.extend(p.iter().cloned());
        }
        self.cache.put(env, parts);
        Ok(())
    }
    fn compute(&self, env: &BatchEnv, _scope: Scope<'_>, p: usize, emit: &mut dyn FnMut(T)) -> Result<(), TaskError> {
        if self.cache.get(env).is_none() {
            return Ok(());
        }
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
        self.history.forget_before(instance, time_ms);
        self.parent.forget(instance, time_ms);
    }
}

type ReduceFn<V> = dyn Fn(V, V) -> V + Send + Sync;
/// The last window computed, per instance: its time and result.
type WindowResults<K, V> = HashMap<InstanceId, (i64, Arc<FxHashMap<K, V>>)>;
type FilterFn<K, V> = dyn Fn(&K, &V) -> bool + Send + Sync;

/// `reduce_by_key_and_window` with an inverse function: the previous window's result plus the
/// batches entering minus the batches leaving.
struct InvertibleWindowNode<K, V> {
    reduced: Arc<dyn Node<(K, V)>>,
    reduce: Arc<ReduceFn<V>>,
    inverse: Arc<ReduceFn<V>>,
    filter: Option<Arc<FilterFn<K, V>>>,
    length: usize,
    slide: usize,
    history: History<(K, V)>,
    previous: Mutex<WindowResults<K, V>>,
    cache: StageCache<(K, V)>,
}

impl<K: Key, V: Data + Clone> Node<(K, V)> for InvertibleWindowNode<K, V> {
    fn num_partitions(&self, env: &BatchEnv) -> usize {
        self.cache.num_partitions(env)
    }
    fn active(&self, env: &BatchEnv) -> bool {
        is_active(env, self.slide)
    }
    fn prepare(&self, env: &BatchEnv) -> Result<(), JobError> {
        self.history.get(env, &*self.reduced, env.time_ms)?;
        if !self.active(env) || self.cache.get(env).is_some() {
            return Ok(());
        }
        let step = self.slide as i64 * env.interval_ms;
        let previous = self.previous.lock().expect("window state").get(&env.instance).cloned();
        // The incremental form needs overlapping windows (`slide < length`): with `slide >=
        // length` the batches "entering" would include some outside the window and the ones
        // "leaving" some the previous window never held, and nothing is saved anyway.
        let incremental = match previous {
            Some((t, prev)) if t == env.time_ms - step && self.slide < self.length => {
                // Entering: the last `slide` batches. Leaving: the `slide` batches before the window.
                let mut entering = Vec::with_capacity(self.slide);
                let mut leaving = Vec::with_capacity(self.slide);
                for k in 0..self.slide as i64 {
                    let time = env.time_ms - k * env.interval_ms;
                    entering.push(self.history.get(env, &*self.reduced, time)?);
                    let time = env.time_ms - (self.length as i64 + k) * env.interval_ms;
                    leaving.push(self.history.get(env, &*self.reduced, time)?);
                }
                Some((prev, entering, leaving))
            }
            _ => None,
        };
        let spanned = match incremental {
            Some(_) => Vec::new(),
            // First window, after a restart, or not overlapping: reduce the batches it spans.
            None => window_times(env, self.length)
                .map(|t| self.history.get(env, &*self.reduced, t))
                .collect::<Result<Vec<_>, _>>()?,
        };
        // The user's functions run in the kernels as one task of the runner (retried like any
        // task).
        let (reduce, inverse) = (&*self.reduce, &*self.inverse);
        let result = env.runner.run_task(env, &|| {
            let keep = self.filter.as_deref().map(|f| f as &dyn Fn(&K, &V) -> bool);
            Ok(if let Some((previous, entering, leaving)) = &incremental {
                let (entering, leaving) = (slices(entering), slices(leaving));
                window::slide_window(previous, &entering, &leaving, &reduce, &inverse, keep)
            } else {
                window::reduce_window(&slices(&spanned), &reduce, keep)
            })
        })?;
        let result = Arc::new(result);
        self.previous
            .lock()
            .expect("window state")
            .insert(env.instance, (env.time_ms, result.clone()));
        self.cache
            .put(env, vec![result.iter().map(|(k, v)| (k.clone(), v.clone())).collect()]);
        Ok(())
    }
    fn compute(
        &self,
        env: &BatchEnv,
        _scope: Scope<'_>,
        p: usize,
        emit: &mut dyn FnMut((K, V)),
    ) -> Result<(), TaskError> {
        if self.cache.get(env).is_none() {
            return Ok(());
        }
        self.cache.emit(env, p, emit)
    }
    fn source_block(&self, _env: &BatchEnv, _p: usize) -> Option<TrackedBlock> {
        None
    }

    fn input_reads(&self, reads: &mut InputReads) {
        if reads.first_visit(self) {
            self.reduced.input_reads(reads);
        }
    }

    fn forget(&self, instance: InstanceId, time_ms: i64) {
        self.cache.forget_up_to(instance, time_ms);
        self.history.forget_before(instance, time_ms);
        self.previous
            .lock()
            .expect("window state")
            .retain(|i, (t, _)| *i != instance || *t > time_ms);
        self.reduced.forget(instance, time_ms);
    }
}

impl<T: Data + Clone> DStream<T> {
    /// The union of the last [`window.length()`](Window::length) batches, every
    /// [`window.slide()`](Window::slide) batches.
    ///
    /// ```
    /// # use sluice_engine::testing::TestHarness;
    /// # use sluice_engine::Window;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// # let h = TestHarness::new()?;
    /// let lines = h.input()?.map(text);
    /// let last_two = h.collect(&lines.window(Window::new(2, 1)?))?;
    /// h.start()?;
    /// for line in ["a", "b", "c"] {
    ///     h.push([line]);
    ///     h.run_batch()?;
    /// }
    /// assert_eq!(last_two.sorted_batches(), vec![vec!["a"], vec!["a", "b"], vec!["b", "c"]]);
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn window(&self, window: Window) -> DStream<T> {
        let Window { length, slide } = window;
        self.graph.remember(length + slide);
        DStream {
            node: Arc::new(WindowNode {
                parent: self.node.clone(),
                length,
                slide,
                history: History::new(),
                cache: StageCache::default(),
            }),
            graph: self.graph.clone(),
        }
    }
}

impl<K: Key, V: Data + Clone> DStream<(K, V)> {
    /// Reduces each key's values over the last [`window.length()`](Window::length) batches, every
    /// [`window.slide()`](Window::slide) batches.
    ///
    /// With `inverse` (which must undo `reduce`: `inverse(reduce(a, b), b) == a`), each window is
    /// computed incrementally from the previous one when windows overlap (`slide < length`;
    /// otherwise each window is reduced from its batches); `filter` then drops keys whose value no
    /// longer matters (for counts: `|_, c| *c > 0`). Without `inverse`, each window is reduced
    /// from the per-batch results it spans.
    ///
    /// ```
    /// # use std::sync::Arc;
    /// # use sluice_engine::testing::TestHarness;
    /// # use sluice_engine::Window;
    /// # fn text(b: bytes::Bytes) -> String { String::from_utf8_lossy(&b).into_owned() }
    /// # let h = TestHarness::new()?;
    /// let words = h.input()?.map(text).map(|word| (word, 1u64));
    /// let counts = words.reduce_by_key_and_window(
    ///     |a, b| a + b,
    ///     Some(Arc::new(|a, b| a - b)),               // the inverse: slide incrementally
    ///     Some(Arc::new(|_word: &String, n: &u64| *n > 0)), // drop words that left the window
    ///     Window::new(2, 1)?,
    /// );
    /// let counts = h.collect(&counts)?;
    /// h.start()?;
    /// for batch in [&["a", "b"][..], &["a"], &[]] {
    ///     h.push(batch.iter().copied());
    ///     h.run_batch()?;
    /// }
    /// let (a, b) = ("a".to_owned(), "b".to_owned());
    /// assert_eq!(
    ///     counts.sorted_batches(),
    ///     vec![vec![(a.clone(), 1), (b.clone(), 1)], vec![(a.clone(), 2), (b, 1)], vec![(a, 1)]]
    /// );
    /// # Ok::<(), sluice_engine::Error>(())
    /// ```
    pub fn reduce_by_key_and_window(
        &self,
        reduce: impl Fn(V, V) -> V + Send + Sync + 'static,
        inverse: Option<Arc<ReduceFn<V>>>,
        filter: Option<Arc<FilterFn<K, V>>>,
        window: Window,
    ) -> DStream<(K, V)> {
        let Window { length, slide } = window;
        let reduce: Arc<ReduceFn<V>> = Arc::new(reduce);
        let per_batch = {
            let r = reduce.clone();
            self.reduce_by_key(move |a, b| r(a, b))
        };
        match inverse {
            None => {
                let r = reduce.clone();
                let windowed = per_batch.window(window).reduce_by_key(move |a, b| r(a, b));
                match filter {
                    Some(f) => windowed.filter(move |(k, v)| f(k, v)),
                    None => windowed,
                }
            }
            Some(inverse) => {
                self.graph.remember(length + slide);
                DStream {
                    node: Arc::new(InvertibleWindowNode {
                        reduced: per_batch.node,
                        reduce,
                        inverse,
                        filter,
                        length,
                        slide,
                        history: History::new(),
                        previous: Mutex::new(HashMap::new()),
                        cache: StageCache::default(),
                    }),
                    graph: self.graph.clone(),
                }
            }
        }
    }
}
