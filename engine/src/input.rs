//! Inputs: receivers feeding the block store and the tracker, and the input node that reads a
//! batch's blocks.
//!
//! The engine is the only place where a receiver (`sluice-receiver`) meets the block store
//! (`sluice-blockstore`): [`EngineBlocks`] implements the receiver's `BlockHandler` by storing a
//! block at the context's storage level and then logging its `BlockAdded` (durability order steps
//! 1 and 2) — the receiver advances shard checkpoints only after that returns. Reading goes through
//! a `BlockReader` per input, which falls back to replaying the block's ranges from that input's
//! source.

use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::{Arc, Mutex, RwLock};

use bytes::Bytes;
use sluice_blockstore::{
    Block, BlockId, BlockOrigin, BlockReader, BlockStore, BlockStoreConfig, Position, SharedClock, StorageLevel,
};
use sluice_operators::{DeadLetterRow, DeadLetterSink};
use sluice_receiver::local_log::LocalLog;
use sluice_receiver::{
    BlockHandler, HandlerError, LeaseStore, LocalLeaseStore, Receiver, ReceiverConfig, Source, WorkerDirectory,
};

use crate::checkpoint_store::CheckpointStore;
use crate::context::StreamingContextBuilder;
use crate::dstream::DStream;
use crate::graph::{BatchEnv, DeadLetter, InstanceId, JobError, Node, ReadBlock, Scope, TaskError};
use crate::ingest_gate::IngestGate;
use crate::metrics::Metrics;
use crate::tracker::{ReceivedBlockTracker, TrackedBlock};
use crate::{Error, Result, StreamingContext};

/// An input of the graph: its stream, the lease table its shards are shared through, and how
/// the engine starts it when the context starts.
pub(crate) struct InputSpec {
    /// The stream name (floors of an adopted worker's log are matched by it).
    pub stream: Arc<str>,
    /// The lease table of the stream's shards (the first input's also holds the worker leases).
    pub leases: Arc<dyn LeaseStore>,
    /// The receiver's configuration (worker id, lease timings).
    pub config: ReceiverConfig,
    pub start: StartInput,
}

type StartInput = Box<dyn Fn(&InputWiring) -> Result<Box<dyn RunningInput>> + Send + Sync>;

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
    /// A receiver that gave up, with why.
    fn failure(&self) -> Option<String>;
    fn set_max_rate(&self, rate: Option<f64>);
    fn stop(&self, graceful: bool) -> Result<()>;
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
        config: &StreamingContextBuilder,
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
        self.gate
            .admit(block.id(), block.memory_size() as u64)
            .map_err(|e| Error::Receiver(e.to_string()))?;
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
    fn read(&self, block: &TrackedBlock) -> Result<Block, TaskError> {
        let readers = self.readers.read().expect("readers");
        let reader = readers
            .get(&block.meta.id.input_id)
            .ok_or_else(|| TaskError::BlockUnavailable {
                message: format!(
                    "block {} belongs to input {}, which this program does not define",
                    block.meta.id, block.meta.id.input_id
                ),
                data_lost: true,
            })?;
        let (read, origin) = reader
            .read_with_origin(&block.meta, block.is_block_id_valid)
            .map_err(|e| TaskError::BlockUnavailable {
                data_lost: e.is_data_lost(),
                message: e.to_string(),
            })?;
        // The reader says whether it replayed: the store's replay counter is shared by concurrent
        // tasks, so diffing it around this read would miscount.
        if origin == BlockOrigin::Replay {
            self.metrics.blocks_replayed.fetch_add(1, Relaxed);
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
            .map_err(|e| HandlerError::new(e.to_string(), e.is_retryable()))
    }
}

struct ReceiverInput {
    receiver: Receiver,
    stream: Arc<str>,
    leases: Arc<dyn LeaseStore>,
}

impl RunningInput for ReceiverInput {
    fn caught_up(&self) -> bool {
        self.receiver.status().caught_up
    }
    fn failure(&self) -> Option<String> {
        self.receiver.status().failed
    }
    fn set_max_rate(&self, rate: Option<f64>) {
        self.receiver.set_max_rate(rate);
    }
    fn stop(&self, graceful: bool) -> Result<()> {
        self.receiver.stop(graceful).map_err(|e| Error::Receiver(e.to_string()))
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
}

/// Opens the checkpoint location: a local path or an object-store URL.
pub(crate) fn checkpoint_store_for(location: &str) -> Result<CheckpointStore> {
    if location.contains("://") && !location.starts_with("file://") {
        let (store, prefix) = sluice_blockstore::object_store_from_url(location, &HashMap::new())?;
        CheckpointStore::object_store(store, prefix)
    } else {
        CheckpointStore::local(location.trim_start_matches("file://"))
    }
}

/// Reads the payloads of an input's blocks: one partition per block.
pub(crate) struct PayloadInputNode {
    pub input_id: u32,
}

/// Owns a block's payload buffer so that each record can be a zero-copy `Bytes` slice of it.
struct ArrowBytes(arrow_buffer::Buffer);

impl AsRef<[u8]> for ArrowBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.as_slice()
    }
}

impl Node<Bytes> for PayloadInputNode {
    fn num_partitions(&self, env: &BatchEnv) -> usize {
        env.inputs.get(&self.input_id).map_or(0, Vec::len)
    }

    fn prepare(&self, _env: &BatchEnv) -> Result<(), JobError> {
        Ok(())
    }

    fn compute(
        &self,
        env: &BatchEnv,
        scope: Scope<'_>,
        p: usize,
        emit: &mut dyn FnMut(Bytes),
    ) -> Result<(), TaskError> {
        let Some(tracked) = env.inputs.get(&self.input_id).and_then(|b| b.get(p)) else {
            return Ok(());
        };
        let read;
        let block = if let Some(block) = scope.block {
            debug_assert_eq!(block.id(), tracked.meta.id, "isolation passes the partition's block");
            block
        } else {
            read = Arc::new(env.blocks.read(tracked)?);
            &read
        };
        let data = block.data();
        let offsets = data.value_offsets();
        let values = Bytes::from_owner(ArrowBytes(data.values().clone()));
        let range = match scope.only_record {
            Some(i) => i..(i + 1).min(block.len()),
            None => 0..block.len(),
        };
        match scope.cursor {
            Some(cursor) => {
                cursor.enter(block);
                for i in range {
                    cursor.set(i);
                    emit(values.slice(offsets[i] as usize..offsets[i + 1] as usize));
                }
                cursor.leave();
            }
            None => {
                for i in range {
                    emit(values.slice(offsets[i] as usize..offsets[i + 1] as usize));
                }
            }
        }
        Ok(())
    }

    fn source_block(&self, env: &BatchEnv, p: usize) -> Option<TrackedBlock> {
        env.inputs.get(&self.input_id).and_then(|b| b.get(p)).cloned()
    }

    fn forget(&self, _instance: InstanceId, _time_ms: i64) {}
}

impl StreamingContext {
    /// A stream of record payloads read from `source` by a receiver.
    ///
    /// The receiver reads every shard (children after their parents), cuts blocks every
    /// `config.block_interval_ms`, and checkpoints shard positions in a local lease file under
    /// `<data_dir>/leases/` only after the blocks covering them are stored and logged. Each batch
    /// has one partition per block; payloads are zero-copy slices of the block.
    ///
    /// # Errors
    /// [`Error::Config`] if the receiver configuration is invalid.
    pub fn source_stream(&self, source: Arc<dyn Source>, config: ReceiverConfig) -> Result<DStream<Bytes>> {
        self.receiver_stream(source, None, config)
    }

    /// Like [`StreamingContext::source_stream`], with shard leases and checkpoints in `leases`
    /// (a table shared by every worker reading the stream, e.g. `DynamoDB`).
    ///
    /// # Errors
    /// [`Error::Config`] if the receiver configuration is invalid.
    pub fn source_stream_with_leases(
        &self,
        source: Arc<dyn Source>,
        leases: Arc<dyn LeaseStore>,
        config: ReceiverConfig,
    ) -> Result<DStream<Bytes>> {
        self.receiver_stream(source, Some(leases), config)
    }

    fn receiver_stream(
        &self,
        source: Arc<dyn Source>,
        leases: Option<Arc<dyn LeaseStore>>,
        config: ReceiverConfig,
    ) -> Result<DStream<Bytes>> {
        config.validate().map_err(|e| Error::Config {
            field: "receiver",
            reason: e.to_string(),
        })?;
        let stream: Arc<str> = Arc::from(source.stream_name());
        let leases: Arc<dyn LeaseStore> = if let Some(leases) = leases {
            leases
        } else {
            let lease_file = self.config.data_dir.join("leases").join(format!("{stream}.json"));
            Arc::new(LocalLeaseStore::open(&lease_file)?)
        };
        let input_id = self.graph.add_input(|input_id| InputSpec {
            stream: stream.clone(),
            leases: leases.clone(),
            config: config.clone(),
            start: Box::new(move |wiring: &InputWiring| {
                wiring.blocks.register_input(input_id, source.clone());
                let resume_after = wiring
                    .resume_after
                    .iter()
                    .filter(|((s, _), _)| *s == stream)
                    .map(|((_, shard), p)| (shard.clone(), p.clone()))
                    .collect();
                let handler = Arc::new(Handler {
                    blocks: wiring.blocks.clone(),
                });
                let config = ReceiverConfig {
                    input_id,
                    worker_id: Some(wiring.worker_id.clone()),
                    ..config.clone()
                };
                let mut receiver = Receiver::new(
                    config,
                    source.clone(),
                    leases.clone(),
                    handler,
                    wiring.clock.clone(),
                    wiring.run_id,
                    resume_after,
                )
                .map_err(|e| Error::Receiver(e.to_string()))?;
                if let Some(workers) = &wiring.workers {
                    receiver = receiver.with_workers(workers.clone());
                }
                receiver.start().map_err(|e| Error::Receiver(e.to_string()))?;
                Ok(Box::new(ReceiverInput {
                    receiver,
                    stream: stream.clone(),
                    leases: leases.clone(),
                }) as Box<dyn RunningInput>)
            }),
        });
        Ok(DStream {
            node: Arc::new(PayloadInputNode { input_id }),
            graph: self.graph.clone(),
        })
    }

    /// A stream of record payloads from stream `stream` of the embedded local log in `dir`.
    ///
    /// # Errors
    /// [`Error::Receiver`] if the log or stream cannot be opened; configuration errors.
    pub fn local_log_stream(&self, dir: &Path, stream: &str, config: ReceiverConfig) -> Result<DStream<Bytes>> {
        let log = LocalLog::open(dir).map_err(|e| Error::Receiver(e.to_string()))?;
        let stream = log.stream(stream).map_err(|e| Error::Receiver(e.to_string()))?;
        self.source_stream(Arc::new(stream), config)
    }
}

/// A Kinesis input: which stream, which application (it names the `DynamoDB` lease table shared
/// by every worker of the application, as in the KCL), and how the receiver cuts blocks.
///
/// Region, credentials and endpoints come from `kinesis.aws` and the SDK's default chain
/// (`AWS_REGION`, `AWS_ENDPOINT_URL_KINESIS`, `AWS_ENDPOINT_URL_DYNAMODB`, profiles, …). The
/// checkpoint interval, initial position, worker id and lease timings are in `receiver`.
#[cfg(feature = "kinesis")]
#[derive(Debug, Clone)]
pub struct KinesisInput {
    /// The stream and how to read it.
    pub kinesis: sluice_receiver::kinesis::KinesisConfig,
    /// The application name: the lease table's name.
    pub application_name: String,
    /// Lease-table retries.
    pub leases: sluice_receiver::DynamoLeaseOptions,
    /// Blocks, checkpoints, leases, initial position.
    pub receiver: ReceiverConfig,
}

#[cfg(feature = "kinesis")]
impl KinesisInput {
    /// An input for `stream_name` of application `application_name`, defaults elsewhere.
    pub fn new(stream_name: impl Into<String>, application_name: impl Into<String>) -> Self {
        Self {
            kinesis: sluice_receiver::kinesis::KinesisConfig::new(stream_name),
            application_name: application_name.into(),
            leases: sluice_receiver::DynamoLeaseOptions::default(),
            receiver: ReceiverConfig::default(),
        }
    }
}

#[cfg(feature = "kinesis")]
impl StreamingContext {
    /// A stream of record payloads read from a Kinesis stream, with shard leases and
    /// checkpoints in the application's `DynamoDB` lease table (KCL schema; created on demand).
    ///
    /// Connects at once, so a missing stream, an unknown region or an unreachable endpoint fails
    /// here with a message that names the fix. Checkpoints follow the durability order: a shard
    /// position is written only after the blocks covering it are stored and logged.
    ///
    /// # Errors
    /// [`Error::Kinesis`], [`Error::LeaseTable`], [`Error::Config`].
    pub fn kinesis_stream(&self, input: KinesisInput) -> Result<DStream<Bytes>> {
        let source = sluice_receiver::kinesis::KinesisSource::connect(input.kinesis.clone())?;
        let leases =
            sluice_receiver::DynamoLeaseStore::connect(&input.kinesis.aws, &input.application_name, input.leases)?;
        self.source_stream_with_leases(Arc::new(source), Arc::new(leases), input.receiver)
    }
}
