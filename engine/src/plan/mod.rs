//! The plan: what a program computes. [`DStream`](crate::DStream) operators add nodes (this
//! module's submodules) to a graph under construction, output operations register on it, and
//! [`StreamingContext::start`](crate::StreamingContext::start) freezes it into an immutable
//! [`Plan`] that the runtime executes without locks. Adding an input or an output afterwards is an
//! [`Error::Started`].
//!
//! Nodes implement the execution contract of [`crate::exec`]; the plan knows nothing of the
//! runtime (job generator, block store, metadata log).

pub(crate) mod dstream;
pub(crate) mod input_node;
pub(crate) mod map_with_state;
pub(crate) mod outputs;
pub(crate) mod state;
pub(crate) mod window;

use std::sync::{Arc, Mutex};

use outputs::OutputOp;
use state::StatefulOp;

use crate::exec::InputReads;
use crate::{Error, Result};

/// The graph, and once frozen the plan: every output (in registration order), every stateful
/// operator (in the order the program defined them: their snapshot files are named by that index)
/// and how many batches of blocks windows need.
#[derive(Default)]
pub(crate) struct Plan {
    pub outputs: Vec<Box<dyn OutputOp>>,
    /// How many times a batch reads each input block, over every output.
    pub input_reads: InputReads,
    pub stateful: Vec<Arc<dyn StatefulOp>>,
    pub remember_batches: usize,
    inputs: u32,
    named_stages: usize,
}

type Building = Plan;

/// The graph under construction, shared by every [`DStream`](crate::DStream) of a context; `None`
/// once frozen.
#[derive(Clone)]
pub(crate) struct GraphBuilder {
    building: Arc<Mutex<Option<Building>>>,
    shuffle_partitions: usize,
}

impl GraphBuilder {
    pub(crate) fn new(shuffle_partitions: usize) -> Self {
        Self {
            building: Arc::new(Mutex::new(Some(Building::default()))),
            shuffle_partitions,
        }
    }

    pub(crate) fn default_partitions(&self) -> usize {
        self.shuffle_partitions
    }

    /// Runs `f` on the graph under construction, or fails with [`Error::Started`] naming `what`.
    fn edit<R>(&self, what: &'static str, f: impl FnOnce(&mut Building) -> R) -> Result<R> {
        let mut building = self.building.lock().expect("graph");
        building.as_mut().map(f).ok_or(Error::Started { what })
    }

    /// Registers an output operation.
    ///
    /// # Errors
    /// [`Error::Started`] after `start()`.
    pub(crate) fn add_output(&self, op: Box<dyn OutputOp>) -> Result<()> {
        self.edit("an output operation", |g| g.outputs.push(op))
    }

    /// Registers a stateful operator (snapshotted with every batch). After `start()` it is not
    /// registered, and cannot run: every output on it fails to register.
    pub(crate) fn add_stateful(&self, op: Arc<dyn StatefulOp>) {
        let _after_start = self.edit("a stateful operator", |g| g.stateful.push(op));
    }

    /// A new input id.
    ///
    /// # Errors
    /// [`Error::Started`] after `start()`.
    pub(crate) fn add_input(&self) -> Result<u32> {
        self.edit("an input stream", |g| {
            let id = g.inputs;
            g.inputs += 1;
            id
        })
    }

    /// A stage name for dead letters and metrics: `<operator>#<n>`, `n` counting the fallible
    /// operators of this graph in the order the program defines them (stable across restarts).
    pub(crate) fn stage_name(&self, operator: &str) -> Arc<str> {
        let n = self
            .edit("an operator", |g| {
                g.named_stages += 1;
                g.named_stages
            })
            .unwrap_or(0);
        Arc::from(format!("{operator}#{n}"))
    }

    /// Keeps the blocks of the last `batches` batches (windows read them again after a restart).
    pub(crate) fn remember(&self, batches: usize) {
        let _after_start = self.edit("a window", |g| g.remember_batches = g.remember_batches.max(batches));
    }

    /// Freezes the graph into the plan the runtime executes.
    ///
    /// # Errors
    /// [`Error::Started`] if it was frozen already.
    pub(crate) fn freeze(&self) -> Result<Plan> {
        let mut plan = self
            .building
            .lock()
            .expect("graph")
            .take()
            .ok_or(Error::Started { what: "start" })?;
        let mut reads = InputReads::default();
        for output in &plan.outputs {
            output.input_reads(&mut reads);
        }
        plan.input_reads = reads;
        Ok(plan)
    }
}
