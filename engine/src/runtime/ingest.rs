//! Ingest: receivers feeding the block store and the tracker, and reading a batch's blocks back.
//!
//! The engine is the only place where a receiver (`sluice-receiver`) meets the block store
//! (`sluice-blockstore`): [`EngineBlocks`] implements the receiver's `BlockHandler` by storing a
//! block at the context's storage level and then logging its `BlockAdded` (durability order steps
//! 1 and 2) — the receiver advances shard checkpoints only after that returns. Reading goes through
//! a `BlockReader` per input, which falls back to replaying the block's ranges from that input's
//! source.

use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};

use sluice_blockstore::{
    Block, BlockId, BlockOrigin, BlockReader, BlockStore, BlockStoreConfig, Position, SharedClock, StorageLevel,
};
use sluice_operators::{DeadLetterRow, DeadLetterSink};
use sluice_receiver::{
    BlockHandler, HandlerError, LeaseStore, Receiver, ReceiverConfig, Source, StopMode, WorkerDirectory,
};

use super::ingest_gate::IngestGate;
use super::metrics::{Metrics, ReplayInfo};
use super::status::InputStatus;
use super::tracker::ReceivedBlockTracker;
use crate::config::StreamingConfig;
use crate::exec::{DeadLetter, ReadBlock, TaskError, TrackedBlock};
use crate::{Error, Result};

/// An input of the program: a receiver reading `source`, sharing its shards through `leases`;
/// started when the context starts.
pub(crate) struct InputSpec {
    pub input_id: u32,
    /// The stream name (floors of an adopted worker's log are matched by it).
    pub stream: Arc<str>,
    pub source: Arc<dyn Source>,
    /// The lease table of the stream's shards (the first input's also holds the worker leases).
    pub leases: Arc<dyn LeaseStore>,
    /// The receiver's configuration (worker id, lease timings).
    pub config: ReceiverConfig,
}

impl InputSpec {
    /// Starts the input's receiver, storing its blocks through `wiring.blocks`.
    ///
    /// # Errors
    /// [`Error::Receiver`] if the receiver cannot be created or started.
    pub(crate) fn start(&self, wiring: &InputWiring) -> Result<Box<dyn RunningInput>> {
        let input_id = self.input_id;
        wiring.blocks.register_input(input_id, self.source.clone());
        let resume_after = wiring
            .resume_after
            .iter()
            .filter(|((s, _), _)| *s == self.stream)
            .map(|((_, shard), p)| (shard.clone(), p.clone()))
            .collect();
        let handler = Arc::new(Handler {
            blocks: wiring.blocks.clone(),
        });
        let config = ReceiverConfig {
            input_id,
            worker_id: Some(wiring.worker_id.clone()),
            ..self.config.clone()
        };
        let mut receiver = Receiver::new(
            config,
            self.source.clone(),
            self.leases.clone(),
            handler,
            wiring.clock.clone(),
            wiring.run_id,
            resume_after,
        )
        .map_err(|e| receiver_error(&self.stream, e))?;
        if let Some(workers) = &wiring.workers {
            receiver = receiver.with_workers(workers.clone());
        }
        receiver.start().map_err(|e| receiver_error(&self.stream, e))?;
        Ok(Box::new(ReceiverInput {
            input_id,
            receiver,
            stream: self.stream.clone(),
            source: self.source.clone(),
            leases: self.leases.clone(),
        }))
    }
}

/// What an input gets from the engine at start.
pub(crate) struct InputWiring {
    pub run_id: u64,
    pub clock: SharedClock,
    pub blocks: Arc<EngineBlocks>,
    pub resume_after: HashMap<(Arc<str>, Arc<str>), Position>,
    /// This worker's id: the receivers' lease owner.
    pub worker_id: String,
    /// The application's workers, when the engine keeps worker leases.
    pub workers: Option<Arc<dyn WorkerDirectory>>,
}

/// A started input as the engine sees it.
pub(crate) trait RunningInput: Send + Sync {
    /// Every owned shard is read to its current end and everything read is stored and logged.
    fn caught_up(&self) -> bool;
    /// A receiver that gave up: [`Error::Receiver`] with why.
    fn failure(&self) -> Option<Error>;
    fn set_max_rate(&self, rate: Option<f64>);
    fn stop(&self, mode: StopMode) -> Result<()>;
    /// The stream it reads.
    fn stream(&self) -> &Arc<str>;
    /// The lease table of its shards.
    fn leases(&self) -> &Arc<dyn LeaseStore>;
    /// Takes the shard leases of dead worker `worker` at the positions its log ends.
    fn adopt(&self, worker: &str, floors: HashMap<Arc<str>, Position>);
    /// Whether shard leases of `worker` are still to be taken.
    fn is_adopting(&self, worker: &str) -> bool;
    /// Stops taking the shard leases of `worker` (the adoption passed to another worker).
    fn cancel_adoption(&self, worker: &str);
    /// Its counters for monitoring: the receiver's (per shard too), its source's and its lease
    /// store's. Cheap: no call to the source or the lease table.
    fn status(&self) -> InputStatus;
}

/// The engine's side of the block store: stores and logs blocks, reads them back.
pub(crate) struct EngineBlocks {
    tracker: Arc<ReceivedBlockTracker>,
    metrics: Arc<Metrics>,
    store: Arc<BlockStore>,
    /// The configured storage level; `None`: each input's source's default.
    level: Option<StorageLevel>,
    /// The level of each input's blocks.
    levels: RwLock<HashMap<u32, StorageLevel>>,
    clock: SharedClock,
    readers: RwLock<HashMap<u32, BlockReader>>,
    /// Bounds the bytes stored and not yet processed (the store's memory budget).
    gate: IngestGate,
    dead_letter: Mutex<Option<DeadLetterSink>>,
    dead_letter_location: String,
}

impl EngineBlocks {
    pub(crate) fn open(
        config: &StreamingConfig,
        clock: SharedClock,
        tracker: Arc<ReceivedBlockTracker>,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        let mut store_config = BlockStoreConfig {
            data_dir: config.data_dir.clone(),
            ..BlockStoreConfig::default()
        };
        if let Some(bytes) = config.memory_budget_bytes {
            store_config.memory_budget_bytes = bytes;
        }
        if let Some(url) = &config.replica_url {
            store_config.replica_url = Some(url.clone());
        }
        let gate = IngestGate::new(store_config.memory_budget_bytes);
        let store = Arc::new(BlockStore::open(store_config)?);
        let dead_letter_location = config
            .dead_letter
            .clone()
            .unwrap_or_else(|| config.data_dir.join("dead-letter").display().to_string());
        Ok(Self {
            tracker,
            metrics,
            store,
            level: config.storage_level,
            levels: RwLock::new(HashMap::new()),
            clock,
            readers: RwLock::new(HashMap::new()),
            gate,
            dead_letter: Mutex::new(None),
            dead_letter_location,
        })
    }

    /// Registers the source an input's blocks are replayed from, and the level they are stored
    /// at.
    pub(crate) fn register_input(&self, input_id: u32, source: Arc<dyn Source>) {
        let level = self.level.unwrap_or_else(|| source.default_storage_level());
        self.levels.write().expect("levels").insert(input_id, level);
        let reader = BlockReader::new(self.store.clone(), source, self.clock.clone());
        self.readers.write().expect("readers").insert(input_id, reader);
    }

    /// Durability order steps 1 and 2: store the block at its level, then log it — once the
    /// ingest gate admits it (see [`IngestGate`]).
    fn store_and_log(&self, block: &Block) -> Result<()> {
        let level = self
            .levels
            .read()
            .expect("levels")
            .get(&block.id().input_id)
            .copied()
            .unwrap_or_default();
        let waited = self
            .gate
            .admit(block.id(), block.memory_size() as u64)
            .map_err(|_closed| Error::Stopping)?;
        if !waited.is_zero() {
            self.metrics.ingest_gate_waited(waited);
        }
        let stored = self
            .store
            .put(block, level)
            .map_err(Error::from)
            .and_then(|()| self.tracker.add_block(block.meta().clone()));
        if stored.is_err() {
            self.gate.release([block.id()]);
        }
        stored?;
        self.metrics.blocks_stored.fetch_add(1, Relaxed);
        self.metrics.records_stored.fetch_add(block.meta().num_records, Relaxed);
        Ok(())
    }

    /// A batch completed: its blocks leave memory (a restart reads them from a durable copy or
    /// replays them; windows keep their parent's outputs, not blocks) and the ingest gate.
    pub(crate) fn processed(&self, ids: &[BlockId]) {
        for id in ids {
            self.store.uncache(*id);
        }
        self.gate.release(ids.iter().copied());
    }

    /// Stops admitting blocks and wakes receivers waiting to store one (the engine stops).
    pub(crate) fn close_gate(&self) {
        self.gate.close();
    }

    pub(crate) fn remove(&self, id: BlockId) {
        if let Err(e) = self.store.remove(id) {
            tracing::warn!(block = %id, error = %e, "could not remove a cleaned-up block");
        }
    }

    /// The block store (for metrics and tests).
    pub(crate) fn store(&self) -> &Arc<BlockStore> {
        &self.store
    }

    pub(crate) fn write_dead_letters(&self, time_ms: i64, writer: &str, dead: &[DeadLetter]) -> Result<()> {
        if dead.is_empty() {
            return Ok(());
        }
        let mut sink = self.dead_letter.lock().expect("dead letter sink");
        if sink.is_none() {
            *sink = Some(
                DeadLetterSink::open(&self.dead_letter_location).map_err(|e| Error::Sink {
                    location: self.dead_letter_location.clone(),
                    message: e.to_string(),
                })?,
            );
        }
        let rows: Vec<DeadLetterRow> = dead
            .iter()
            .map(|d| DeadLetterRow {
                record: d.record.clone(),
                error: d.error.clone(),
                attempts: d.attempts,
                stage: d.stage.to_string(),
            })
            .collect();
        sink.as_ref()
            .expect("opened above")
            .write_batch(time_ms, writer, &rows)
            .map_err(|e| Error::Sink {
                location: self.dead_letter_location.clone(),
                message: e.to_string(),
            })
    }
}

impl ReadBlock for EngineBlocks {
    /// As when its batch completes: the block leaves memory and the ingest gate.
    fn done_with(&self, block: &TrackedBlock) {
        self.processed(&[block.meta.id]);
    }

    fn read(&self, block: &TrackedBlock) -> Result<Block, TaskError> {
        let readers = self.readers.read().expect("readers");
        let reader = readers.get(&block.meta.id.input_id).ok_or(TaskError::UnknownInput {
            block: block.meta.id,
            input: block.meta.id.input_id,
        })?;
        let started = std::time::Instant::now();
        let (read, origin) = reader
            .read_with_origin(&block.meta, block.is_block_id_valid)
            .map_err(|e| TaskError::BlockUnavailable {
                block: block.meta.id,
                source: Arc::new(e),
            })?;
        // The reader says whether it replayed: the store's replay counter is shared by concurrent
        // tasks, so diffing it around this read would miscount.
        if origin == BlockOrigin::Replay {
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            let replay = ReplayInfo {
                at_ms: self.clock.now_ms(),
                block: block.meta.id.to_string(),
                ranges: block.meta.ranges.to_string(),
                records: read.meta().num_records,
                millis: micros / 1_000,
            };
            self.metrics.record_replay(replay, micros);
        }
        Ok(read)
    }
}

/// The engine's `BlockHandler` for one receiver.
struct Handler {
    blocks: Arc<EngineBlocks>,
}

impl BlockHandler for Handler {
    fn store_block(&self, block: Block) -> Result<(), HandlerError> {
        self.blocks
            .store_and_log(&block)
            .map_err(|e| HandlerError::with_source(e.to_string(), e.class(), e))
    }
}

struct ReceiverInput {
    input_id: u32,
    receiver: Receiver,
    stream: Arc<str>,
    source: Arc<dyn Source>,
    leases: Arc<dyn LeaseStore>,
}

impl RunningInput for ReceiverInput {
    fn caught_up(&self) -> bool {
        self.receiver.status().caught_up
    }
    fn failure(&self) -> Option<Error> {
        let source = self.receiver.status().failed?;
        Some(Error::Receiver {
            stream: self.stream.clone(),
            source,
        })
    }
    fn set_max_rate(&self, rate: Option<f64>) {
        self.receiver.set_max_rate(rate);
    }
    fn stop(&self, mode: StopMode) -> Result<()> {
        self.receiver.stop(mode).map_err(|e| receiver_error(&self.stream, e))
    }
    fn stream(&self) -> &Arc<str> {
        &self.stream
    }
    fn leases(&self) -> &Arc<dyn LeaseStore> {
        &self.leases
    }
    fn adopt(&self, worker: &str, floors: HashMap<Arc<str>, Position>) {
        self.receiver.adopt(worker, floors);
    }
    fn is_adopting(&self, worker: &str) -> bool {
        self.receiver.is_adopting(worker)
    }
    fn cancel_adoption(&self, worker: &str) {
        self.receiver.cancel_adoption(worker);
    }
    fn status(&self) -> InputStatus {
        InputStatus {
            input_id: self.input_id,
            stream: self.stream.to_string(),
            failed: self.receiver.status().failed.map(|e| e.to_string()),
            receiver: self.receiver.metrics(),
            source: self.source.counters(),
            lease_store: self.leases.counters(),
        }
    }
}

fn receiver_error(stream: &Arc<str>, source: sluice_receiver::ReceiverError) -> Error {
    Error::Receiver {
        stream: stream.clone(),
        source: Arc::new(source),
    }
}
