//! [`BlockGenerator`]: turns a stream of records into blocks tagged with the exact ranges they
//! cover, and hands them to a [`BlockHandler`] in order, with bounded memory.
//!
//! # Design
//!
//! Producers (the shard-reading loops) add pages of records of one shard. Under one lock, the
//! records are appended to the current buffer **together with** the [`SequenceNumberRange`] that
//! describes them, so a sealed block's ranges cover exactly its records (Spark's
//! `addMultipleDataWithCallback` + `onAddData`). A page that does not fit the current block is
//! split, and each part gets its own range. That logic is the `buffer` module's `BlockBuffer`,
//! which has no locks or threads and is checked by a property test against a reference model;
//! this module adds the lock, the timer and pusher threads, backpressure and failure handling.
//!
//! The buffer is sealed into a block every `block_interval_ms` (on the injected clock) or as soon
//! as it reaches `max_block_records` / `max_block_bytes`. Sealed blocks wait in a queue of
//! `queue_capacity` blocks for the single pusher thread, which builds the Arrow [`Block`] and calls
//! [`BlockHandler::store_block`], in block order, retrying retryable failures.
//!
//! **Backpressure**: when the queue is full, a full buffer cannot be sealed, and the producer that
//! needs room blocks until the pusher takes a block (the [`WhenFull::Block`] policy; nothing is
//! ever dropped). Spark's generator blocks only its timer and lets the current buffer grow without
//! limit; here the memory of buffered records ([`Record::memory_bytes`]: payload, key, sequence
//! number and per-record overhead — about 2.5× the payload of a 100-byte record) is bounded by
//! [`BlockGenerator::memory_bound_bytes`]: `(queue_capacity + 2) × max_block_bytes` (queue, the
//! block being stored, the current buffer).
//! A single record larger than `max_block_bytes` is sealed alone, so the bound grows to that
//! record's size in that case.
//!
//! **Rate limit**: with a [`RateLimiter`], every page first reserves its records at the current
//! rate (outside the lock), so the backpressure controller can slow producers at run time.
//!
//! **Failure**: if storing a block still fails after `max_push_attempts` (or with a
//! non-retryable error), the generator fails: queued data is discarded (it was never stored, so
//! no position covering it is ever recorded), producers get [`GeneratorError::StoreFailed`], and
//! the owner restarts reading from the last *stored* positions.

mod buffer;
mod builder;
mod config;
mod error;
mod handler;
mod stats;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use sluice_blockstore::{Block, BlockId, Record, SequenceNumberRanges, SharedClock};

pub use crate::stop_mode::StopMode;
use buffer::{BlockBuffer, Limits, Sealed};
use builder::StoredCallback;
pub use builder::{BlockGeneratorBuilder, BlockGeneratorStartError};
pub use config::{BlockGeneratorConfig, WhenFull};
pub use error::GeneratorError;
pub use handler::{BlockHandler, HandlerError};
pub use stats::{GeneratorMetrics, GeneratorPhase, GeneratorStats};

use crate::rate_limiter::RateLimiter;
use crate::signal::{MAX_REAL_WAIT, StopSignal, Wake};

struct Threads {
    timer: JoinHandle<()>,
    pusher: JoinHandle<()>,
}

/// Buffers records into blocks and stores them through a [`BlockHandler`]; see the module docs
/// of `receiver/src/block_generator/mod.rs`.
///
/// ```
/// use std::sync::{Arc, Mutex};
/// use sluice_blockstore::{Block, ManualClock, Position, Record, SequenceNumber};
/// use sluice_receiver::{BlockGenerator, BlockGeneratorConfig, BlockHandler, HandlerError, StopMode};
///
/// #[derive(Default)]
/// struct Collect(Mutex<Vec<Block>>);
/// impl BlockHandler for Collect {
///     fn store_block(&self, block: Block) -> Result<(), HandlerError> {
///         self.0.lock().unwrap().push(block);
///         Ok(())
///     }
/// }
///
/// let handler = Arc::new(Collect::default());
/// let clock = Arc::new(ManualClock::new(0));
/// let generator = BlockGenerator::builder(BlockGeneratorConfig::default(), "clicks", handler.clone(), clock)
///     .start()?;
/// let records: Vec<Record> = (1..=3u128)
///     .map(|n| Record {
///         shard_id: "shard-0".into(),
///         position: Position::plain(SequenceNumber::from_u128(n)),
///         partition_key: "k".into(),
///         approximate_arrival_ms: 0,
///         data: "hello".into(),
///     })
///     .collect();
/// generator.add_batch(records)?;
/// generator.stop(StopMode::Graceful)?; // seals and stores what is buffered
/// let blocks = handler.0.lock().unwrap();
/// assert_eq!(blocks.len(), 1);
/// assert_eq!(blocks[0].meta().ranges.to_string(), "clicks/shard-0[1..=3]x3");
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub struct BlockGenerator {
    shared: Arc<Shared>,
    threads: Mutex<Option<Threads>>,
}

impl std::fmt::Debug for BlockGenerator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockGenerator")
            .field("stream", &self.shared.stream)
            .field("input_id", &self.shared.input_id)
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}

struct Shared {
    config: BlockGeneratorConfig,
    stream: Arc<str>,
    handler: Arc<dyn BlockHandler>,
    clock: SharedClock,
    input_id: u32,
    run_id: u64,
    next_seq: Arc<AtomicU64>,
    rate_limiter: Option<Arc<RateLimiter>>,
    on_stored: Option<StoredCallback>,
    metrics: Arc<GeneratorMetrics>,
    records_hint: usize,
    state: Mutex<State>,
    /// Any change the pusher, a draining stop or an observer ([`BlockGenerator::wait_for`]) may
    /// be waiting for.
    changed: Condvar,
    /// Room in the sealed queue, or a phase change: what a blocked producer waits for. Kept apart
    /// from `changed` so that producers do not wake each other: a producer that finds the queue
    /// still full changes nothing a producer waits for, and two of them on one condition variable
    /// woke each other in turn for as long as the store stalled (two shard threads spent a third
    /// of their CPU on it while a batch held the memory budget).
    room: Condvar,
    /// Stopped when adding stops (interrupts rate-limit waits).
    adding: StopSignal,
    /// Stops the timer thread.
    timer: StopSignal,
    /// Stopped on abort or failure (interrupts retry backoff).
    abort: StopSignal,
}

#[derive(Default)]
struct State {
    buffer: BlockBuffer,
    phase: Phase,
    waiting_producers: usize,
    records_added: u64,
    records_stored: u64,
    blocks_stored: u64,
}

#[derive(Debug, Default, Clone, PartialEq, Eq)]
enum Phase {
    #[default]
    Active,
    /// No new records; the pusher keeps storing; the final buffer is being sealed.
    Closing,
    /// The pusher stores what is queued, then exits.
    Draining,
    Stopped,
    Failed(GeneratorError),
}

impl BlockGenerator {
    /// Starts building a generator for `stream` (the name its ranges are tagged with).
    pub fn builder(
        config: BlockGeneratorConfig,
        stream: impl Into<Arc<str>>,
        handler: Arc<dyn BlockHandler>,
        clock: SharedClock,
    ) -> BlockGeneratorBuilder {
        BlockGeneratorBuilder {
            config,
            stream: stream.into(),
            handler,
            clock,
            input_id: 0,
            run_id: 0,
            next_seq: Arc::new(AtomicU64::new(0)),
            rate_limiter: None,
            on_stored: None,
            metrics: Arc::new(GeneratorMetrics::default()),
        }
    }

    /// Adds one record (a batch of one; prefer [`add_batch`](Self::add_batch) for throughput).
    ///
    /// # Errors
    /// As [`add_batch`](Self::add_batch).
    pub fn add(&self, record: Record) -> Result<(), GeneratorError> {
        self.add_batch(vec![record])
    }

    /// Adds records of **one shard**, in increasing position order, as one unit: they get one
    /// range per block they land in. Blocks while the rate limiter or a full queue says so.
    ///
    /// # Errors
    /// - [`GeneratorError::Stopped`] if the generator stops before every record was accepted
    ///   (`accepted` says how many leading records were);
    /// - [`GeneratorError::StoreFailed`] / [`GeneratorError::BuildFailed`] once the generator has
    ///   failed;
    /// - [`GeneratorError::InvalidBatch`] if the records come from several shards.
    pub fn add_batch(&self, records: Vec<Record>) -> Result<(), GeneratorError> {
        self.shared.add_batch(records)
    }

    /// A snapshot of buffers and counters.
    pub fn stats(&self) -> GeneratorStats {
        Shared::stats(&self.shared.state.lock().expect("generator lock"))
    }

    /// Whether nothing is buffered, queued or being stored.
    pub fn is_idle(&self) -> bool {
        self.shared.state.lock().expect("generator lock").buffer.is_idle()
    }

    /// The error that failed the generator, if it failed.
    pub fn failure(&self) -> Option<GeneratorError> {
        match &self.shared.state.lock().expect("generator lock").phase {
            Phase::Failed(e) => Some(e.clone()),
            _ => None,
        }
    }

    /// The most memory ([`Record::memory_bytes`]) the generator's buffered records hold while
    /// each record is at most `max_block_bytes`: `(queue_capacity + 2) × max_block_bytes`.
    pub fn memory_bound_bytes(&self) -> usize {
        (self.shared.config.queue_capacity + 2) * self.shared.config.max_block_bytes
    }

    /// Waits (in real time, at most `timeout`) until `predicate` holds for the stats; returns
    /// whether it did. For monitoring and tests.
    pub fn wait_for(&self, timeout: Duration, mut predicate: impl FnMut(&GeneratorStats) -> bool) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.state.lock().expect("generator lock");
        loop {
            if predicate(&Shared::stats(&state)) {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .shared
                .changed
                .wait_timeout(state, (deadline - now).min(MAX_REAL_WAIT))
                .expect("generator lock")
                .0;
        }
    }

    /// Stops the generator and joins its threads.
    ///
    /// With [`StopMode::Graceful`], new records are refused, the buffer is sealed and every queued
    /// block is stored before this returns (it waits for the handler, however slow). With
    /// [`StopMode::Immediate`], buffered and queued records are dropped — they were never stored,
    /// so no checkpoint covers them and they will be read again.
    ///
    /// # Errors
    /// The generator's failure, if a block could not be stored (before or during the stop).
    pub fn stop(&self, mode: StopMode) -> Result<(), GeneratorError> {
        let threads = self.threads.lock().expect("generator threads").take();
        match mode {
            StopMode::Graceful => self.shared.drain(threads),
            StopMode::Immediate => {
                self.shared.abort_all();
                if let Some(t) = threads {
                    join(t);
                }
            }
        }
        match &self.shared.state.lock().expect("generator lock").phase {
            Phase::Failed(e) => Err(e.clone()),
            _ => Ok(()),
        }
    }
}

impl Drop for BlockGenerator {
    /// A safety net: a generator dropped without [`stop`](BlockGenerator::stop) discards what it
    /// buffers and joins its threads (waiting for a store in flight).
    fn drop(&mut self) {
        if let Some(threads) = self.threads.get_mut().ok().and_then(Option::take) {
            self.shared.abort_all();
            join(threads);
        }
    }
}

fn join(threads: Threads) {
    // A panicking generator thread has already reported through the panic hook; the state it
    // left is Failed or Stopped either way.
    let _ = threads.timer.join();
    let _ = threads.pusher.join();
}

impl Shared {
    fn stats(state: &State) -> GeneratorStats {
        GeneratorStats {
            phase: match &state.phase {
                Phase::Active => GeneratorPhase::Active,
                Phase::Closing | Phase::Draining => GeneratorPhase::Draining,
                Phase::Stopped => GeneratorPhase::Stopped,
                Phase::Failed(e) => GeneratorPhase::Failed(e.clone()),
            },
            buffered_records: state.buffer.records(),
            buffered_bytes: state.buffer.bytes(),
            queued_blocks: state.buffer.queued_blocks(),
            storing: state.buffer.storing(),
            waiting_producers: state.waiting_producers,
            records_added: state.records_added,
            records_stored: state.records_stored,
            blocks_stored: state.blocks_stored,
        }
    }

    fn add_batch(&self, mut records: Vec<Record>) -> Result<(), GeneratorError> {
        let Some(first) = records.first() else {
            return Ok(());
        };
        let shard = first.shard_id.clone();
        if let Some(other) = records
            .iter()
            .find(|r| !Arc::ptr_eq(&r.shard_id, &shard) && r.shard_id != shard)
        {
            return Err(GeneratorError::InvalidBatch {
                reason: format!(
                    "a batch holds records of one shard; found {} and {}",
                    shard, other.shard_id
                ),
            });
        }
        debug_assert!(
            records.windows(2).all(|w| w[0].position < w[1].position),
            "records of a batch must be in strictly increasing position order"
        );
        if let Some(limiter) = &self.rate_limiter
            && !limiter.acquire_or_stop(records.len(), &self.adding)
        {
            return Err(Self::refusal(&self.state.lock().expect("generator lock"), 0));
        }
        let total = records.len();
        let limits = self.limits();
        let mut state = self.state.lock().expect("generator lock");
        let mut waited = false;
        loop {
            if state.phase != Phase::Active {
                return Err(Self::refusal(&state, total - records.len()));
            }
            let taken = state.buffer.take(&self.stream, &mut records, limits);
            state.records_added += taken as u64;
            if records.is_empty() {
                if state.buffer.is_full(limits) {
                    self.try_seal(&mut state);
                }
                return Ok(());
            }
            // The open block is full: seal it, or wait for the pusher to make room. One wait
            // counted (and announced to observers) however often the producer wakes before there
            // is room: another producer may take the room first.
            if !self.try_seal(&mut state) {
                state.waiting_producers += 1;
                if !waited {
                    waited = true;
                    self.metrics.producer_waits.fetch_add(1, Ordering::Relaxed);
                    self.changed.notify_all();
                }
                state = self.room.wait(state).expect("generator lock");
                state.waiting_producers -= 1;
            }
        }
    }

    fn limits(&self) -> Limits {
        Limits {
            max_records: self.config.max_block_records,
            max_bytes: self.config.max_block_bytes,
            queue_capacity: self.config.queue_capacity,
        }
    }

    fn refusal(state: &State, accepted: usize) -> GeneratorError {
        match &state.phase {
            Phase::Failed(e) => e.clone(),
            _ => GeneratorError::Stopped { accepted },
        }
    }

    /// Seals the open block into the queue; `false` if the queue is full.
    fn try_seal(&self, state: &mut MutexGuard<'_, State>) -> bool {
        let queued = state.buffer.queued_blocks();
        let sealed = state.buffer.seal(self.limits(), self.records_hint, || BlockId {
            input_id: self.input_id,
            run_id: self.run_id,
            seq: self.next_seq.fetch_add(1, Ordering::Relaxed),
        });
        if state.buffer.queued_blocks() > queued {
            self.changed.notify_all();
        }
        sealed
    }

    /// Wakes every waiter: the phase changed or the buffer was discarded.
    fn notify_everyone(&self) {
        self.changed.notify_all();
        self.room.notify_all();
    }

    fn run_timer(&self) {
        let interval = self.config.block_interval_ms as i64;
        loop {
            let now = self.clock.now_ms();
            let tick = (now.div_euclid(interval) + 1) * interval;
            match self.timer.wait_until(&*self.clock, tick) {
                Wake::Stopped => return,
                Wake::Nudged => continue,
                Wake::Deadline => {}
            }
            let mut state = self.state.lock().expect("generator lock");
            if state.phase == Phase::Active {
                // A full queue leaves the buffer in place; producers block once it is full.
                self.try_seal(&mut state);
            }
        }
    }

    fn run_pusher(&self) {
        loop {
            let sealed = {
                let mut state = self.state.lock().expect("generator lock");
                loop {
                    if let Some(sealed) = state.buffer.pop() {
                        self.notify_everyone();
                        break sealed;
                    }
                    match state.phase {
                        Phase::Active | Phase::Closing => {
                            state = self.changed.wait(state).expect("generator lock");
                        }
                        Phase::Draining | Phase::Stopped | Phase::Failed(_) => return,
                    }
                }
            };
            if !self.push(sealed) {
                return;
            }
        }
    }

    /// Builds and stores one block; `false` when the pusher must exit (failure or abort).
    fn push(&self, sealed: Sealed) -> bool {
        let Sealed {
            id, records, ranges, ..
        } = sealed;
        let block = match Block::from_records(id, SequenceNumberRanges::from(ranges), &records) {
            Ok(block) => block,
            Err(e) => {
                self.fail(GeneratorError::BuildFailed {
                    block: id,
                    message: e.to_string(),
                });
                return false;
            }
        };
        let count = records.len();
        drop(records);
        let max = self.config.max_push_attempts;
        let mut attempt = 1;
        loop {
            match self.handler.store_block(block.clone()) {
                Ok(()) => break,
                Err(e) if e.is_retryable() && attempt < max => {
                    tracing::warn!(block = %id, attempt, error = %e, "storing a block failed; retrying");
                    self.metrics.push_retries.fetch_add(1, Ordering::Relaxed);
                    let backoff = self.config.push_retry_backoff_ms * u64::from(attempt);
                    if self.abort.wait_ms(&*self.clock, backoff) == Wake::Stopped {
                        self.finish_in_flight(None);
                        return false;
                    }
                    attempt += 1;
                }
                Err(e) => {
                    tracing::error!(block = %id, attempt, error = %e, "storing a block failed for good");
                    self.fail(GeneratorError::StoreFailed {
                        block: id,
                        attempts: attempt,
                        source: Arc::new(e),
                    });
                    return false;
                }
            }
        }
        if let Some(callback) = &self.on_stored {
            callback(block.meta());
        }
        self.metrics.blocks_stored.fetch_add(1, Ordering::Relaxed);
        self.metrics.records_stored.fetch_add(count as u64, Ordering::Relaxed);
        self.metrics
            .bytes_stored
            .fetch_add(block.meta().num_bytes, Ordering::Relaxed);
        self.finish_in_flight(Some(count))
    }

    /// Clears the in-flight slot; returns whether the pusher should go on.
    fn finish_in_flight(&self, stored: Option<usize>) -> bool {
        let mut state = self.state.lock().expect("generator lock");
        state.buffer.finish_in_flight();
        if let Some(count) = stored {
            state.records_stored += count as u64;
            state.blocks_stored += 1;
        }
        self.changed.notify_all();
        !matches!(state.phase, Phase::Stopped | Phase::Failed(_))
    }

    fn fail(&self, error: GeneratorError) {
        {
            let mut state = self.state.lock().expect("generator lock");
            state.phase = Phase::Failed(error);
            state.buffer.discard();
            self.notify_everyone();
        }
        self.adding.stop();
        self.abort.stop();
        self.timer.stop();
    }

    fn abort_all(&self) {
        {
            let mut state = self.state.lock().expect("generator lock");
            if !matches!(state.phase, Phase::Failed(_)) {
                state.phase = Phase::Stopped;
            }
            state.buffer.discard();
            self.notify_everyone();
        }
        self.adding.stop();
        self.abort.stop();
        self.timer.stop();
    }

    fn drain(&self, threads: Option<Threads>) {
        {
            let mut state = self.state.lock().expect("generator lock");
            if state.phase == Phase::Active {
                state.phase = Phase::Closing;
            }
            self.notify_everyone();
        }
        self.adding.stop();
        self.timer.stop();
        let Some(Threads { timer, pusher }) = threads else {
            return;
        };
        let _ = timer.join();
        {
            let mut state = self.state.lock().expect("generator lock");
            while state.phase == Phase::Closing && !self.try_seal(&mut state) {
                state = self.changed.wait(state).expect("generator lock");
            }
            if state.phase == Phase::Closing {
                state.phase = Phase::Draining;
            }
            self.notify_everyone();
        }
        let _ = pusher.join();
        let mut state = self.state.lock().expect("generator lock");
        if state.phase == Phase::Draining {
            state.phase = Phase::Stopped;
        }
        self.notify_everyone();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicU32;

    use sluice_blockstore::{ManualClock, Position, SequenceNumber};

    use super::*;

    #[derive(Default)]
    struct Collect {
        blocks: Mutex<Vec<Block>>,
        fail_first: AtomicU32,
        retryable: bool,
    }

    impl BlockHandler for Collect {
        fn store_block(&self, block: Block) -> Result<(), HandlerError> {
            if self
                .fail_first
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return Err(HandlerError::new("injected", self.retryable));
            }
            self.blocks.lock().unwrap().push(block);
            Ok(())
        }
    }

    fn records(shard: &str, from: u128, n: u128, size: usize) -> Vec<Record> {
        let shard: Arc<str> = shard.into();
        (from..from + n)
            .map(|i| Record {
                shard_id: shard.clone(),
                position: Position::plain(SequenceNumber::from_u128(i)),
                partition_key: "k".into(),
                approximate_arrival_ms: 0,
                data: vec![0u8; size].into(),
            })
            .collect()
    }

    fn config() -> BlockGeneratorConfig {
        BlockGeneratorConfig {
            push_retry_backoff_ms: 0,
            ..BlockGeneratorConfig::default()
        }
    }

    #[test]
    fn the_timer_seals_on_the_clock() {
        let clock = Arc::new(ManualClock::new(0));
        let handler = Arc::new(Collect::default());
        let generator = BlockGenerator::builder(config(), "s", handler.clone(), clock.clone())
            .start()
            .unwrap();
        generator.add_batch(records("a", 1, 3, 10)).unwrap();
        assert_eq!(
            generator.stats().blocks_stored,
            0,
            "nothing is sealed before the interval"
        );
        // The timer may not have read the clock yet; keep moving time until it seals.
        let mut ticks = 0;
        while !generator.wait_for(Duration::from_millis(20), |s| s.blocks_stored == 1) {
            clock.advance_ms(200);
            ticks += 1;
            assert!(ticks < 500, "the timer never sealed the block");
        }
        generator.stop(StopMode::Graceful).unwrap();
        let blocks = handler.blocks.lock().unwrap();
        assert_eq!(blocks[0].meta().ranges.to_string(), "s/a[1..=3]x3");
    }

    #[test]
    fn a_batch_that_does_not_fit_is_split_with_one_range_per_part() {
        let clock = Arc::new(ManualClock::new(0));
        let handler = Arc::new(Collect::default());
        let cfg = BlockGeneratorConfig {
            max_block_records: 4,
            ..config()
        };
        let generator = BlockGenerator::builder(cfg, "s", handler.clone(), clock)
            .start()
            .unwrap();
        generator.add_batch(records("a", 1, 3, 1)).unwrap();
        generator.add_batch(records("b", 10, 6, 1)).unwrap();
        generator.stop(StopMode::Graceful).unwrap();
        let blocks = handler.blocks.lock().unwrap();
        let ranges: Vec<String> = blocks.iter().map(|b| b.meta().ranges.to_string()).collect();
        assert_eq!(
            ranges,
            ["s/a[1..=3]x3, s/b[10..=10]x1", "s/b[11..=14]x4", "s/b[15..=15]x1"]
        );
        let seqs: Vec<u64> = blocks.iter().map(|b| b.id().seq).collect();
        assert_eq!(seqs, [0, 1, 2]);
    }

    #[test]
    fn byte_limit_and_oversized_records() {
        let clock = Arc::new(ManualClock::new(0));
        let handler = Arc::new(Collect::default());
        // Room for two and a half 48-byte records: two per block; a 500-byte record is sealed
        // alone.
        let one = records("a", 1, 1, 48)[0].memory_bytes();
        let cfg = BlockGeneratorConfig {
            max_block_bytes: 2 * one + one / 2,
            ..config()
        };
        let generator = BlockGenerator::builder(cfg, "s", handler.clone(), clock)
            .start()
            .unwrap();
        generator.add_batch(records("a", 1, 3, 48)).unwrap();
        generator.add_batch(records("a", 4, 1, 500)).unwrap();
        generator.stop(StopMode::Graceful).unwrap();
        let sizes: Vec<usize> = handler.blocks.lock().unwrap().iter().map(Block::len).collect();
        assert_eq!(sizes, [2, 1, 1]);
    }

    #[test]
    fn mixed_shards_are_rejected() {
        let clock = Arc::new(ManualClock::new(0));
        let handler = Arc::new(Collect::default());
        let generator = BlockGenerator::builder(config(), "s", handler, clock).start().unwrap();
        let mut batch = records("a", 1, 2, 1);
        batch.extend(records("b", 3, 1, 1));
        assert!(matches!(
            generator.add_batch(batch),
            Err(GeneratorError::InvalidBatch { .. })
        ));
        generator.stop(StopMode::Graceful).unwrap();
    }

    #[test]
    fn retryable_failures_are_retried_then_stored() {
        let clock = Arc::new(ManualClock::new(0));
        let handler = Arc::new(Collect {
            fail_first: AtomicU32::new(3),
            retryable: true,
            ..Collect::default()
        });
        let metrics = Arc::new(GeneratorMetrics::default());
        let generator = BlockGenerator::builder(config(), "s", handler.clone(), clock)
            .metrics(metrics.clone())
            .start()
            .unwrap();
        generator.add_batch(records("a", 1, 2, 1)).unwrap();
        generator.stop(StopMode::Graceful).unwrap();
        assert_eq!(handler.blocks.lock().unwrap().len(), 1);
        assert_eq!(metrics.push_retries.load(Ordering::Relaxed), 3);
    }

    #[test]
    fn exhausted_retries_fail_the_generator_and_refuse_records() {
        let clock = Arc::new(ManualClock::new(0));
        let handler = Arc::new(Collect {
            fail_first: AtomicU32::new(4),
            retryable: true,
            ..Collect::default()
        });
        let stored = Arc::new(AtomicU64::new(0));
        let cfg = BlockGeneratorConfig {
            max_block_records: 2,
            ..config()
        };
        let generator = {
            let stored = stored.clone();
            BlockGenerator::builder(cfg, "s", handler.clone(), clock)
                .on_stored(move |_| {
                    stored.fetch_add(1, Ordering::SeqCst);
                })
                .start()
                .unwrap()
        };
        // Two records fill the block: it is sealed at once and the pusher starts failing.
        generator.add_batch(records("a", 1, 2, 1)).unwrap();
        assert!(generator.wait_for(Duration::from_secs(10), |s| matches!(
            s.phase,
            GeneratorPhase::Failed(_)
        )));
        let err = generator.add_batch(records("a", 3, 1, 1)).unwrap_err();
        assert!(matches!(err, GeneratorError::StoreFailed { attempts: 4, .. }), "{err}");
        assert!(err.is_retryable());
        assert!(generator.stop(StopMode::Graceful).is_err());
        assert_eq!(stored.load(Ordering::SeqCst), 0, "nothing counts as stored");
    }

    #[test]
    fn a_non_retryable_failure_is_not_retried() {
        let clock = Arc::new(ManualClock::new(0));
        let handler = Arc::new(Collect {
            fail_first: AtomicU32::new(1),
            retryable: false,
            ..Collect::default()
        });
        let generator = BlockGenerator::builder(config(), "s", handler, clock).start().unwrap();
        generator.add_batch(records("a", 1, 2, 1)).unwrap();
        let err = generator.stop(StopMode::Graceful).unwrap_err();
        assert!(
            matches!(
                err,
                GeneratorError::StoreFailed { attempts: 1, ref source, .. } if !source.is_retryable()
            ),
            "{err}"
        );
    }

    #[test]
    fn discard_drops_buffered_records() {
        let clock = Arc::new(ManualClock::new(0));
        let handler = Arc::new(Collect::default());
        let generator = BlockGenerator::builder(config(), "s", handler.clone(), clock)
            .start()
            .unwrap();
        generator.add_batch(records("a", 1, 2, 1)).unwrap();
        generator.stop(StopMode::Immediate).unwrap();
        assert!(handler.blocks.lock().unwrap().is_empty());
        assert_eq!(
            generator.add_batch(records("a", 3, 1, 1)),
            Err(GeneratorError::Stopped { accepted: 0 })
        );
    }

    #[test]
    fn invalid_configs_are_rejected() {
        let bad = BlockGeneratorConfig {
            queue_capacity: 0,
            ..BlockGeneratorConfig::default()
        };
        assert_eq!(bad.validate().unwrap_err().field, "queue_capacity");
        let json = r#"{"block_interval_ms": 50, "bogus": 1}"#;
        assert!(serde_json::from_str::<BlockGeneratorConfig>(json).is_err());
        let json = r#"{"block_interval_ms": 50}"#;
        let cfg: BlockGeneratorConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg.block_interval_ms, 50);
        assert_eq!(cfg.queue_capacity, BlockGeneratorConfig::DEFAULT_QUEUE_CAPACITY);
    }
}
