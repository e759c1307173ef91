//! [`StreamingContext`]: the top layer. A program defines its inputs and operators on it (the
//! [plan](crate::plan)), then [`start`](StreamingContext::start) freezes the plan and starts the
//! [runtime](crate::runtime) that executes it.

mod builder;
mod inputs;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sluice_blockstore::{SharedClock, SystemClock};
use sluice_receiver::StopMode;

pub use builder::StreamingContextBuilder;
#[cfg(feature = "kinesis")]
pub use inputs::KinesisInput;

use crate::config::StreamingConfig;
use crate::monitor::MonitorServer;
use crate::plan::{GraphBuilder, Plan};
use crate::runtime::ingest::InputSpec;
use crate::runtime::metrics::{BatchInfo, HealthEvent, Listeners, Metrics, MetricsSnapshot};
use crate::runtime::status::StreamingStatus;
use crate::runtime::{Runtime, Started};
use crate::{Error, Result};

/// The entry point: define streams on it, then [`start`](Self::start) it.
pub struct StreamingContext {
    pub(crate) config: Arc<StreamingConfig>,
    clock: Option<SharedClock>,
    pub(crate) graph: GraphBuilder,
    /// The inputs the program defined, in input-id order.
    inputs: Mutex<Vec<InputSpec>>,
    /// The plan frozen by the first `start` (a later start after `stop` runs it again).
    plan: Mutex<Option<Arc<Plan>>>,
    listeners: Arc<Listeners>,
    running: Mutex<Option<Started>>,
    /// The metrics endpoint and status page, while running with a `metrics_addr`.
    monitor: Mutex<Option<MonitorServer>>,
    metrics: Arc<Metrics>,
}

impl StreamingContext {
    /// A builder with the defaults.
    pub fn builder() -> StreamingContextBuilder {
        StreamingContextBuilder::default()
    }

    /// A context configured by `config` (e.g. read from a file; see [`StreamingConfig`]).
    ///
    /// # Errors
    /// [`Error::Config`] naming the bad field and the fix.
    pub fn with_config(config: StreamingConfig) -> Result<Self> {
        Self::builder().config(config).build()
    }

    pub(crate) fn new(config: StreamingConfig, clock: Option<SharedClock>) -> Self {
        let graph = GraphBuilder::new(config.partitions());
        Self {
            config: Arc::new(config),
            clock,
            graph,
            inputs: Mutex::new(Vec::new()),
            plan: Mutex::new(None),
            listeners: Arc::default(),
            running: Mutex::new(None),
            monitor: Mutex::new(None),
            metrics: Arc::new(Metrics::default()),
        }
    }

    /// The configuration the context runs with.
    pub fn config(&self) -> &StreamingConfig {
        &self.config
    }

    /// Calls `listener` on the job thread after every completed batch (Spark's
    /// `StreamingListener.onBatchCompleted`), with no engine lock held: it may call the context.
    /// Listeners may be added at any time.
    pub fn add_batch_listener(&self, listener: impl Fn(&BatchInfo) + Send + Sync + 'static) {
        self.listeners.add_batch(listener);
    }

    /// Calls `listener` for every event raised by the built-in detectors (stuck processing, high
    /// error rate), like [`add_batch_listener`](Self::add_batch_listener).
    pub fn add_health_listener(&self, listener: impl Fn(&HealthEvent) + Send + Sync + 'static) {
        self.listeners.add_health(listener);
    }

    /// The running context's block store (for operations and tests).
    ///
    /// # Errors
    /// [`Error::NotStarted`] if the context is not running.
    pub fn block_store(&self) -> Result<Arc<sluice_blockstore::BlockStore>> {
        Ok(self.runtime()?.block_store().clone())
    }

    /// The engine's metrics so far.
    pub fn metrics(&self) -> MetricsSnapshot {
        self.metrics.snapshot()
    }

    /// Everything the running context can tell about itself now: the engine's counters, the
    /// last batches and health events, the detectors, every input with its receiver, source and
    /// lease-store counters per shard, the block store and the last recovery. It is what the
    /// [metrics endpoint and status page](StreamingContextBuilder::metrics_addr) serve; building
    /// one is cheap (no call to a source or a lease table).
    ///
    /// ```no_run
    /// # fn demo(ctx: &sluice_engine::StreamingContext) -> sluice_engine::Result<()> {
    /// let status = ctx.status()?;
    /// for input in &status.inputs {
    ///     for (shard, m) in &input.receiver.shards {
    ///         println!("{}/{shard}: {} records, owner {:?}", input.stream, m.records_received, m.lease_owner);
    ///     }
    /// }
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::NotStarted`] if the context is not running.
    pub fn status(&self) -> Result<StreamingStatus> {
        Ok(self.runtime()?.status())
    }

    /// The address the metrics endpoint and status page listen on while the context runs — the
    /// bound port when [`metrics_addr`](StreamingContextBuilder::metrics_addr) asked for port
    /// 0. `None` when not configured or not running.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.monitor
            .lock()
            .expect("monitor")
            .as_ref()
            .map(MonitorServer::local_addr)
    }

    /// The data directory.
    pub fn data_dir(&self) -> &std::path::Path {
        &self.config.data_dir
    }

    /// Freezes the plan (defining inputs or outputs afterwards is an [`Error::Started`]),
    /// recovers from the checkpoint location and starts the receivers and the job generator.
    /// Returns once they are running; it never waits for data.
    ///
    /// Recovery (ARCHITECTURE §6): the metadata log is replayed; operator state is restored to the
    /// last completed batch; batches allocated but not completed re-run first, in order, with
    /// exactly their blocks (blocks of the previous run are marked invalid and read by replay
    /// unless a valid copy is found); logged blocks not yet allocated go to the next batch; and
    /// every shard resumes strictly after its last logged position.
    ///
    /// With a [`metrics_addr`](StreamingContextBuilder::metrics_addr), the metrics endpoint and
    /// status page are served from here until [`stop`](Self::stop).
    ///
    /// # Errors
    /// [`Error::Started`] if it is running already; [`Error::MetricsServer`] if the metrics
    /// address cannot be bound (checked first: nothing runs then); configuration, checkpoint,
    /// block store or receiver start-up errors.
    pub fn start(&self) -> Result<()> {
        let mut running = self.running.lock().expect("context");
        if running.is_some() {
            return Err(Error::Started { what: "start" });
        }
        let monitor = self.config.metrics_addr.map(MonitorServer::bind).transpose()?;
        let plan = {
            let mut plan = self.plan.lock().expect("plan");
            match &*plan {
                Some(frozen) => frozen.clone(),
                None => plan.insert(Arc::new(self.graph.freeze()?)).clone(),
            }
        };
        let clock = self.clock.clone().unwrap_or_else(|| Arc::new(SystemClock));
        let inputs = self.inputs.lock().expect("inputs");
        let started = Runtime::start(
            self.config.clone(),
            clock,
            plan,
            self.listeners.clone(),
            &inputs,
            self.metrics.clone(),
        )?;
        if let Some(bound) = monitor {
            let runtime = started.runtime.clone();
            match bound.serve(Arc::new(move || runtime.status())) {
                Ok(server) => *self.monitor.lock().expect("monitor") = Some(server),
                Err(e) => {
                    if let Err(stop) = started.stop(StopMode::Immediate, self.config.graceful_stop_timeout()) {
                        tracing::warn!(error = %stop, "stopping after the monitoring server failed to start");
                    }
                    return Err(e);
                }
            }
        }
        *running = Some(started);
        Ok(())
    }

    /// Blocks until the context stops; returns the error that stopped it, if any.
    ///
    /// # Errors
    /// [`Error::Stopped`] with the cause (e.g. [`Error::Job`], [`Error::DataLost`]) when a batch
    /// failed or a receiver gave up; [`Error::NotStarted`].
    pub fn await_termination(&self) -> Result<()> {
        match self.runtime()?.await_termination() {
            Some(cause) => Err(Error::Stopped(cause)),
            None => Ok(()),
        }
    }

    /// Waits until every receiver has read its sources to their current end, every record read is
    /// stored and logged, and every logged block has been processed by a completed batch. Returns
    /// `Ok(false)` on timeout.
    ///
    /// # Errors
    /// [`Error::Stopped`] if the context stopped with an error meanwhile; [`Error::NotStarted`].
    pub fn await_drained(&self, timeout: Duration) -> Result<bool> {
        self.runtime()?.await_drained(timeout)
    }

    /// Stops the context. [`StopMode::Graceful`] stops the receivers (which seal, store and log
    /// what they buffered), processes every logged block, checkpoints and releases leases, within
    /// the graceful-stop timeout; [`StopMode::Immediate`] finishes only the batch in progress. Past the
    /// timeout the batch in progress is abandoned between records (it is logged and re-runs after
    /// a restart). Neither waits for the next batch time: a graceful stop runs its last batch (the
    /// next batch's time, holding every block left) as soon as the receivers are stopped, or none
    /// when no block is left (a restart then runs that batch time when it comes, once).
    ///
    /// # Errors
    /// [`Error::StopTimeout`] if the stop did not finish in time (what was not processed is still
    /// logged and runs after a restart); receiver stop errors; [`Error::Stopped`] with the error
    /// that had stopped the stream.
    pub fn stop(&self, mode: StopMode) -> Result<()> {
        let Some(started) = self.running.lock().expect("context").take() else {
            return Ok(());
        };
        // The status page stays up while the stop drains, then goes with the runtime.
        let stopped = started.stop(mode, self.config.graceful_stop_timeout());
        if let Some(mut monitor) = self.monitor.lock().expect("monitor").take() {
            monitor.stop();
        }
        stopped
    }

    fn runtime(&self) -> Result<Arc<Runtime>> {
        self.running
            .lock()
            .expect("context")
            .as_ref()
            .map(|r| r.runtime.clone())
            .ok_or(Error::NotStarted)
    }
}

impl Drop for StreamingContext {
    fn drop(&mut self) {
        // No detached threads: a context dropped while running stops without draining.
        if self.running.get_mut().is_ok_and(|r| r.is_some()) {
            let _ignored = self.stop(StopMode::Immediate);
        }
    }
}
