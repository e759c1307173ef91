//! Inputs: receivers feeding the block store and the tracker, and the input node that reads a
//! batch's blocks.
//!
//! TEMPORARY store: replaced by sluice_blockstore::BlockStore + BlockReader once they land.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use sluice_blockstore::{Block, BlockId, Position, SharedClock};

use crate::checkpoint_store::CheckpointStore;
use crate::context::StreamingContextBuilder;
use crate::dstream::DStream;
use crate::graph::{BatchEnv, DeadLetter, JobError, Node, ReadBlock, Scope, TaskError};
use crate::metrics::Metrics;
use crate::tracker::{ReceivedBlockTracker, TrackedBlock};
use crate::{Error, Result};

/// How the engine starts one input when the context starts.
pub(crate) struct InputSpec {
    pub start: Box<dyn Fn(&InputWiring) -> Result<Box<dyn RunningInput>> + Send + Sync>,
}

/// What an input gets from the engine at start.
pub(crate) struct InputWiring {
    pub run_id: u64,
    pub clock: SharedClock,
    pub data_dir: PathBuf,
    pub handler: Arc<EngineBlocks>,
    pub resume_after: HashMap<(Arc<str>, Arc<str>), Position>,
    pub metrics: Arc<Metrics>,
}

/// A started input as the engine sees it.
pub(crate) trait RunningInput: Send + Sync {
    fn caught_up(&self) -> bool;
    fn set_max_rate(&self, rate: Option<f64>);
    fn stop(&self, graceful: bool) -> Result<()>;
}

/// The engine's side of the block store: stores and logs blocks, reads them back.
pub(crate) struct EngineBlocks {
    tracker: Arc<ReceivedBlockTracker>,
    metrics: Arc<Metrics>,
    store: Mutex<HashMap<BlockId, Block>>,
}

impl EngineBlocks {
    pub(crate) fn open(
        _config: &StreamingContextBuilder,
        _clock: SharedClock,
        tracker: Arc<ReceivedBlockTracker>,
        metrics: Arc<Metrics>,
    ) -> Result<Self> {
        Ok(Self {
            tracker,
            metrics,
            store: Mutex::new(HashMap::new()),
        })
    }

    /// Durability order steps 1 and 2: store the block, then log it.
    pub(crate) fn store_block(&self, block: Block) -> Result<()> {
        let meta = block.meta().clone();
        self.store.lock().expect("store").insert(meta.id, block);
        self.tracker.add_block(meta)?;
        self.metrics
            .blocks_stored
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        Ok(())
    }

    pub(crate) fn remove(&self, id: BlockId) {
        self.store.lock().expect("store").remove(&id);
    }

    pub(crate) fn write_dead_letters(&self, _time_ms: i64, _dead: &[DeadLetter]) -> Result<()> {
        Ok(())
    }

    pub(crate) fn shutdown(&self) {}
}

impl ReadBlock for EngineBlocks {
    fn read(&self, block: &TrackedBlock) -> Result<Block, TaskError> {
        self.store
            .lock()
            .expect("store")
            .get(&block.meta.id)
            .cloned()
            .ok_or_else(|| TaskError::BlockUnavailable {
                message: format!("block {} missing", block.meta.id),
                data_lost: false,
            })
    }
}

/// Opens the checkpoint location: a local path or an object-store URL.
pub(crate) fn checkpoint_store_for(location: &str) -> Result<CheckpointStore> {
    if location.contains("://") && !location.starts_with("file://") {
        return Err(Error::Config {
            field: "checkpoint",
            reason: format!("{location}: object-store URLs not wired yet"),
        });
    }
    CheckpointStore::local(location.trim_start_matches("file://"))
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

    fn compute(&self, env: &BatchEnv, scope: Scope, p: usize, emit: &mut dyn FnMut(Bytes)) -> Result<(), TaskError> {
        let Some(tracked) = env.inputs.get(&self.input_id).and_then(|b| b.get(p)) else {
            return Ok(());
        };
        let block = env.blocks.read(tracked)?;
        let data = block.data();
        let offsets = data.value_offsets();
        let values = Bytes::from_owner(ArrowBytes(data.values().clone()));
        let range = match scope.only_record {
            Some(i) => i..(i + 1).min(block.len()),
            None => 0..block.len(),
        };
        for i in range {
            emit(values.slice(offsets[i] as usize..offsets[i + 1] as usize));
        }
        Ok(())
    }

    fn source_block(&self, env: &BatchEnv, p: usize) -> Option<TrackedBlock> {
        env.inputs.get(&self.input_id).and_then(|b| b.get(p)).cloned()
    }

    fn forget(&self, _time_ms: i64) {}
}

impl crate::StreamingContext {
    /// A stream of record payloads from a custom input (temporary for compile checks).
    #[doc(hidden)]
    pub fn payload_stream_for_tests(&self) -> DStream<Bytes> {
        let id = self.graph.add_input(|_| InputSpec {
            start: Box::new(|_| Err(Error::Internal("no receiver".into()))),
        });
        DStream {
            node: Arc::new(PayloadInputNode { input_id: id }),
            graph: self.graph.clone(),
        }
    }
}
