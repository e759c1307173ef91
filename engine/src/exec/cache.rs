//! Per-batch caches of stage outputs, and the size hint of map-side combiners.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::Mutex;

use super::node::{BatchEnv, InstanceId};
use super::runner::TaskError;

type Emit<'a, T> = &'a mut dyn FnMut(T);

/// The partitions of one stage output.
pub(crate) type Parts<T> = Arc<Vec<Vec<T>>>;

/// Output of a stage, cached per instance and batch time.
pub(crate) struct StageCache<T> {
    by_batch: Mutex<BTreeMap<(InstanceId, i64), Parts<T>>>,
}

impl<T> Default for StageCache<T> {
    fn default() -> Self {
        Self {
            by_batch: Mutex::new(BTreeMap::new()),
        }
    }
}

impl<T: Clone> StageCache<T> {
    pub(crate) fn get(&self, env: &BatchEnv) -> Option<Parts<T>> {
        self.by_batch
            .lock()
            .expect("stage cache")
            .get(&(env.instance, env.time_ms))
            .cloned()
    }
    pub(crate) fn put(&self, env: &BatchEnv, parts: Vec<Vec<T>>) -> Parts<T> {
        let parts = Arc::new(parts);
        self.by_batch
            .lock()
            .expect("stage cache")
            .insert((env.instance, env.time_ms), parts.clone());
        parts
    }
    pub(crate) fn forget_up_to(&self, instance: InstanceId, time_ms: i64) {
        self.by_batch
            .lock()
            .expect("stage cache")
            .retain(|(i, t), _| *i != instance || *t > time_ms);
    }
    pub(crate) fn emit(&self, env: &BatchEnv, p: usize, emit: Emit<'_, T>) -> Result<(), TaskError> {
        let parts = self.get(env).ok_or_else(|| TaskError::Panicked {
            message: format!("internal: stage output for batch {} not prepared", env.time_ms),
        })?;
        parts.get(p).into_iter().flatten().cloned().for_each(emit);
        Ok(())
    }
    pub(crate) fn num_partitions(&self, env: &BatchEnv) -> usize {
        self.get(env).map_or(0, |p| p.len())
    }
}

/// How many keys a keyed stage's map-side maps have been holding: a new chunk's map starts with
/// that much room instead of growing from empty (rehashing its way up costs about as much as the
/// lookups). A moving average over finished tasks (each observes its chunk's map so far), so one
/// outsized block does not make every later map large.
#[derive(Debug, Default)]
pub(crate) struct MapSizeHint(std::sync::atomic::AtomicUsize);

impl MapSizeHint {
    pub(crate) fn get(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub(crate) fn observe(&self, keys: usize) {
        let old = self.get();
        let new = if old == 0 { keys } else { (old * 3 + keys) / 4 };
        self.0.store(new, std::sync::atomic::Ordering::Relaxed);
    }
}
