//! [`ReceivedBlockTracker`]: which blocks exist, which batch each belongs to, what is done.
//!
//! Every state change is written to the [`MetadataLog`] **before** it takes effect in memory, so
//! the in-memory state is always something the log can rebuild (Spark's `ReceivedBlockTracker`,
//! with the same recovery rule: blocks recovered from the log belong to a dead incarnation and are
//! marked invalid, so their batches read them by replay unless a valid copy is found).

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use sluice_blockstore::{BlockId, BlockMeta, Position};

use super::metadata_log::{LogEvent, MetadataLog};
use crate::Result;

pub use crate::exec::TrackedBlock;

type ShardKey = (Arc<str>, Arc<str>);

#[derive(Debug, Default)]
struct State {
    blocks: HashMap<BlockId, TrackedBlock>,
    unallocated: VecDeque<BlockId>,
    batches: BTreeMap<i64, Vec<BlockId>>,
    completed: BTreeSet<i64>,
    last_allocated: Option<i64>,
    last_completed: Option<i64>,
    last_logged: HashMap<ShardKey, Position>,
    appends_since_compaction: usize,
    /// Empty batches allocated without a log entry (see `log_empty_batches`): never written,
    /// forgotten by a crash, which is harmless because re-running them would read nothing.
    unlogged: BTreeSet<i64>,
}

impl State {
    fn apply(&mut self, event: &LogEvent, recovering: bool) {
        match event {
            LogEvent::BlockAdded { meta } => {
                for (stream, shard, to) in meta.ranges.last_position_per_shard() {
                    let slot = self.last_logged.entry((stream, shard)).or_insert_with(|| to.clone());
                    if *slot < to {
                        *slot = to;
                    }
                }
                let tracked = TrackedBlock {
                    meta: meta.clone(),
                    is_block_id_valid: !recovering,
                };
                if self.blocks.insert(meta.id, tracked).is_none() {
                    self.unallocated.push_back(meta.id);
                }
            }
            LogEvent::BatchAllocated { time_ms, blocks } => {
                self.unallocated.retain(|id| !blocks.contains(id));
                self.batches.insert(*time_ms, blocks.clone());
                self.last_allocated = Some(self.last_allocated.map_or(*time_ms, |t| t.max(*time_ms)));
            }
            LogEvent::BatchCompleted { time_ms } => {
                self.completed.insert(*time_ms);
                self.last_completed = Some(self.last_completed.map_or(*time_ms, |t| t.max(*time_ms)));
                // A completed batch was allocated: after its cleanup, this keeps later batches of
                // this log from reusing its time (and so its output names).
                self.last_allocated = Some(self.last_allocated.map_or(*time_ms, |t| t.max(*time_ms)));
            }
            LogEvent::Cleanup { before_ms } => {
                self.cleanup(*before_ms);
            }
            LogEvent::ShardPositions { positions } => {
                for (stream, shard, pos) in positions {
                    let slot = self
                        .last_logged
                        .entry((stream.clone(), shard.clone()))
                        .or_insert_with(|| pos.clone());
                    if *slot < *pos {
                        *slot = pos.clone();
                    }
                }
            }
            // Claims fence earlier holders; compaction markers are consumed by the log itself.
            LogEvent::Claimed { .. } | LogEvent::Compacted => {}
        }
    }

    fn cleanup(&mut self, before_ms: i64) -> Vec<BlockId> {
        let old: Vec<i64> = self
            .batches
            .range(..before_ms)
            .map(|(t, _)| *t)
            .filter(|t| self.completed.contains(t))
            .collect();
        let mut removed = Vec::new();
        for t in old {
            if let Some(ids) = self.batches.remove(&t) {
                for id in ids {
                    self.blocks.remove(&id);
                    removed.push(id);
                }
            }
            self.completed.remove(&t);
            self.unlogged.remove(&t);
        }
        removed
    }

    /// Whether a `Cleanup { before_ms }` would forget anything a log replay would rebuild.
    fn cleanup_needs_logging(&self, before_ms: i64) -> bool {
        self.batches
            .range(..before_ms)
            .any(|(t, _)| self.completed.contains(t) && !self.unlogged.contains(t))
    }

    /// The events that rebuild this state (for compaction).
    fn snapshot(&self) -> Vec<LogEvent> {
        let mut events = vec![LogEvent::ShardPositions {
            positions: self
                .last_logged
                .iter()
                .map(|((s, sh), p)| (s.clone(), sh.clone(), p.clone()))
                .collect(),
        }];
        let mut ids: Vec<&BlockId> = self.blocks.keys().collect();
        ids.sort();
        // Allocated blocks first in batch order, then the unallocated queue in order, so that
        // replaying BlockAdded re-creates the same queue order.
        let logged = |t: &i64| !self.unlogged.contains(t);
        for ids in self.batches.iter().filter(|(t, _)| logged(t)).map(|(_, ids)| ids) {
            events.extend(ids.iter().map(|id| LogEvent::BlockAdded {
                meta: self.blocks[id].meta.clone(),
            }));
        }
        events.extend(self.unallocated.iter().map(|id| LogEvent::BlockAdded {
            meta: self.blocks[id].meta.clone(),
        }));
        for (t, ids) in self.batches.iter().filter(|(t, _)| logged(t)) {
            events.push(LogEvent::BatchAllocated {
                time_ms: *t,
                blocks: ids.clone(),
            });
        }
        // No `Cleanup` event: this state already reflects every cleanup, and replaying one would
        // also drop batches completed after it.
        events.extend(
            self.completed
                .iter()
                .filter(|t| logged(t))
                .map(|t| LogEvent::BatchCompleted { time_ms: *t }),
        );
        if let Some(t) = self.last_completed.filter(|t| !self.completed.contains(t)) {
            events.push(LogEvent::BatchCompleted { time_ms: t });
        }
        events
    }
}

/// What recovery found in the metadata log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveredState {
    /// Batches allocated but not completed, oldest first: they re-run with exactly their blocks.
    pub pending_batches: Vec<i64>,
    /// The latest batch time allocated before the crash.
    pub last_allocated: Option<i64>,
    /// The latest completed batch: operator state is restored to its snapshot.
    pub last_completed: Option<i64>,
    /// Number of logged blocks not yet allocated: they go to the next batch.
    pub unallocated_blocks: usize,
    /// The last logged position of every shard: reading resumes strictly after it.
    pub resume_after: Vec<(Arc<str>, Arc<str>, Position)>,
}

/// Tracks blocks and batch allocations, logging every change before applying it.
#[derive(Debug)]
pub struct ReceivedBlockTracker {
    log: MetadataLog,
    state: Mutex<State>,
    compact_every: usize,
    log_empty_batches: bool,
}

/// Default number of log appends between compactions.
pub const DEFAULT_COMPACT_EVERY: usize = 200;

impl ReceivedBlockTracker {
    /// Opens the tracker on `log`, replaying what is there (blocks from it are marked invalid).
    ///
    /// # Errors
    /// Metadata log read errors (a corrupt log is an error, never silently truncated).
    pub fn recover(log: MetadataLog) -> Result<(Self, RecoveredState)> {
        let events = log.read_all()?;
        let mut state = State::default();
        for event in &events {
            state.apply(event, true);
        }
        let recovered = RecoveredState {
            pending_batches: state
                .batches
                .keys()
                .copied()
                .filter(|t| !state.completed.contains(t))
                .collect(),
            last_allocated: state.last_allocated,
            last_completed: state.last_completed,
            unallocated_blocks: state.unallocated.len(),
            resume_after: state
                .last_logged
                .iter()
                .map(|((s, sh), p)| (s.clone(), sh.clone(), p.clone()))
                .collect(),
        };
        Ok((
            Self {
                log,
                state: Mutex::new(state),
                compact_every: DEFAULT_COMPACT_EVERY,
                log_empty_batches: true,
            },
            recovered,
        ))
    }

    #[cfg(feature = "testing")] // only `sluice_engine::internals` (tests) calls it
    /// Sets how many appends may accumulate before the log is compacted.
    #[must_use]
    pub fn with_compact_every(mut self, appends: usize) -> Self {
        self.compact_every = appends.max(1);
        self
    }

    /// Whether a batch with no blocks is written to the log (default `true`).
    ///
    /// With `false`, an empty batch is allocated and completed in memory only: two durable
    /// appends fewer per idle batch. A crash forgets it, and nothing is lost by that — re-running
    /// it would read no records. Only correct when the batch has no other durable effect to
    /// re-run: the engine keeps logging empty batches when an operator keeps state, because
    /// an empty batch still moves that state (and restore points at the last completed batch).
    #[must_use]
    pub fn with_empty_batches_logged(mut self, log: bool) -> Self {
        self.log_empty_batches = log;
        self
    }

    fn log_and_apply(&self, event: &LogEvent) -> Result<()> {
        let mut state = self.state.lock().expect("tracker lock");
        self.log.append(std::slice::from_ref(event))?;
        state.apply(event, false);
        state.appends_since_compaction += 1;
        Ok(())
    }

    /// Durably records a stored block; after this returns `Ok` the block's ranges may be
    /// checkpointed at the source (durability order step 2 → 3).
    ///
    /// # Errors
    /// Metadata log errors: the block is then not tracked and its ranges must not be checkpointed.
    pub fn add_block(&self, meta: BlockMeta) -> Result<()> {
        self.log_and_apply(&LogEvent::BlockAdded { meta })
    }

    /// Allocates every unallocated block to the batch at `time_ms` and logs it, or returns the
    /// existing allocation if that batch was already allocated (recovery re-runs it with exactly
    /// its blocks).
    ///
    /// # Errors
    /// Metadata log errors: nothing is allocated and the batch must not run.
    pub fn allocate_blocks_to_batch(&self, time_ms: i64) -> Result<Vec<TrackedBlock>> {
        let mut state = self.state.lock().expect("tracker lock");
        if !state.batches.contains_key(&time_ms) {
            if state.last_allocated.is_some_and(|last| time_ms <= last) {
                // An earlier time than one already allocated: it gets nothing (Spark logs the same).
                return Ok(Vec::new());
            }
            let blocks: Vec<BlockId> = state.unallocated.iter().copied().collect();
            let unlogged = blocks.is_empty() && !self.log_empty_batches;
            let event = LogEvent::BatchAllocated { time_ms, blocks };
            if unlogged {
                state.unlogged.insert(time_ms);
            } else {
                self.log.append(std::slice::from_ref(&event))?;
                state.appends_since_compaction += 1;
            }
            state.apply(&event, false);
        }
        Ok(state.batches[&time_ms]
            .iter()
            .map(|id| state.blocks[id].clone())
            .collect())
    }

    /// The latest allocated batch time.
    pub fn last_allocated(&self) -> Option<i64> {
        self.state.lock().expect("tracker lock").last_allocated
    }

    /// Whether any logged block waits for a batch.
    pub fn has_unallocated_blocks(&self) -> bool {
        !self.state.lock().expect("tracker lock").unallocated.is_empty()
    }

    /// How many logged blocks wait for a batch.
    pub fn unallocated_block_count(&self) -> u64 {
        self.state.lock().expect("tracker lock").unallocated.len() as u64
    }

    #[cfg(feature = "testing")] // only `sluice_engine::internals` (tests) calls it
    /// Durably records that the batch's output is committed (durability order step 5).
    ///
    /// # Errors
    /// Metadata log errors: the batch then re-runs after a restart, which the idempotent sinks
    /// absorb.
    pub fn batch_completed(&self, time_ms: i64) -> Result<()> {
        let mut state = self.state.lock().expect("tracker lock");
        if state.unlogged.contains(&time_ms) {
            state.completed.insert(time_ms);
            return Ok(());
        }
        drop(state);
        self.log_and_apply(&LogEvent::BatchCompleted { time_ms })
    }

    #[cfg(feature = "testing")] // only `sluice_engine::internals` (tests) calls it
    /// Forgets completed batches before `before_ms` and returns their blocks, which the caller
    /// removes from the block store (durability order step 6). Compacts the log when due.
    ///
    /// # Errors
    /// Metadata log errors.
    pub fn cleanup(&self, before_ms: i64) -> Result<Vec<BlockId>> {
        let mut state = self.state.lock().expect("tracker lock");
        self.log.append(&[LogEvent::Cleanup { before_ms }])?;
        let removed = state.cleanup(before_ms);
        self.count_append(&mut state)?;
        Ok(removed)
    }

    /// [`batch_completed`](Self::batch_completed) and then [`cleanup`](Self::cleanup) in one
    /// durable append — one fsync per batch instead of two. Both events land or neither does.
    ///
    /// # Errors
    /// Metadata log errors: then neither is recorded (the batch re-runs after a restart).
    pub fn complete_batch(&self, time_ms: i64, cleanup_before_ms: i64) -> Result<Vec<BlockId>> {
        let mut state = self.state.lock().expect("tracker lock");
        let completed = LogEvent::BatchCompleted { time_ms };
        let cleanup = LogEvent::Cleanup {
            before_ms: cleanup_before_ms,
        };
        if state.unlogged.contains(&time_ms) {
            // An unlogged empty batch: its completion stays in memory; the cleanup is written
            // only if it forgets something a replay of the log would bring back.
            state.completed.insert(time_ms);
            if !state.cleanup_needs_logging(cleanup_before_ms) {
                return Ok(state.cleanup(cleanup_before_ms));
            }
            self.log.append(std::slice::from_ref(&cleanup))?;
        } else {
            self.log.append(&[completed.clone(), cleanup])?;
            state.apply(&completed, false);
        }
        let removed = state.cleanup(cleanup_before_ms);
        self.count_append(&mut state)?;
        Ok(removed)
    }

    /// Counts an append and compacts the log when due.
    fn count_append(&self, state: &mut State) -> Result<()> {
        state.appends_since_compaction += 1;
        if state.appends_since_compaction >= self.compact_every {
            self.log.compact(&state.snapshot())?;
            state.appends_since_compaction = 0;
        }
        Ok(())
    }

    /// The blocks of an allocated batch (empty if unknown).
    pub fn blocks_of_batch(&self, time_ms: i64) -> Vec<TrackedBlock> {
        let state = self.state.lock().expect("tracker lock");
        state
            .batches
            .get(&time_ms)
            .map(|ids| ids.iter().map(|id| state.blocks[id].clone()).collect())
            .unwrap_or_default()
    }

    #[cfg(feature = "testing")] // only `sluice_engine::internals` (tests) calls it
    /// The last logged position per `(stream, shard)`.
    pub fn last_logged_positions(&self) -> Vec<(Arc<str>, Arc<str>, Position)> {
        let state = self.state.lock().expect("tracker lock");
        state
            .last_logged
            .iter()
            .map(|((s, sh), p)| (s.clone(), sh.clone(), p.clone()))
            .collect()
    }

    #[cfg(feature = "testing")] // only `sluice_engine::internals` (tests) calls it
    /// Number of files in the metadata log.
    ///
    /// # Errors
    /// Storage errors.
    pub fn log_file_count(&self) -> Result<usize> {
        self.log.file_count()
    }
}
