//! Building and starting a generator.

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Condvar, Mutex};

use sluice_blockstore::{BlockMeta, SharedClock};

use super::{
    BlockGenerator, BlockGeneratorConfig, BlockHandler, GeneratorError, GeneratorMetrics, Shared, State, Threads,
};
use crate::config_error::ConfigError;
use crate::rate_limiter::RateLimiter;
use crate::signal::StopSignal;

pub(super) type StoredCallback = Arc<dyn Fn(&BlockMeta) + Send + Sync>;

/// Builds and starts a [`BlockGenerator`].
pub struct BlockGeneratorBuilder {
    pub(super) config: BlockGeneratorConfig,
    pub(super) stream: Arc<str>,
    pub(super) handler: Arc<dyn BlockHandler>,
    pub(super) clock: SharedClock,
    pub(super) input_id: u32,
    pub(super) run_id: u64,
    pub(super) next_seq: Arc<AtomicU64>,
    pub(super) rate_limiter: Option<Arc<RateLimiter>>,
    pub(super) on_stored: Option<StoredCallback>,
    pub(super) metrics: Arc<GeneratorMetrics>,
}

impl std::fmt::Debug for BlockGeneratorBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockGeneratorBuilder")
            .field("config", &self.config)
            .field("stream", &self.stream)
            .field("input_id", &self.input_id)
            .field("run_id", &self.run_id)
            .finish_non_exhaustive()
    }
}

impl BlockGeneratorBuilder {
    /// Block ids: `input_id`, `run_id`, and the counter the next `seq` is taken from (shared
    /// across generators of one run so ids never repeat). Default: input 0, run 0, a new counter.
    #[must_use]
    pub fn block_ids(mut self, input_id: u32, run_id: u64, next_seq: Arc<AtomicU64>) -> Self {
        self.input_id = input_id;
        self.run_id = run_id;
        self.next_seq = next_seq;
        self
    }

    /// Limits the rate at which records are accepted.
    #[must_use]
    pub fn rate_limiter(mut self, limiter: Arc<RateLimiter>) -> Self {
        self.rate_limiter = Some(limiter);
        self
    }

    /// Called on the pusher thread after each block is stored, before the next one is stored.
    #[must_use]
    pub fn on_stored(mut self, callback: impl Fn(&BlockMeta) + Send + Sync + 'static) -> Self {
        self.on_stored = Some(Arc::new(callback));
        self
    }

    /// Counters to update (shared across restarts by the receiver).
    #[must_use]
    pub fn metrics(mut self, metrics: Arc<GeneratorMetrics>) -> Self {
        self.metrics = metrics;
        self
    }

    /// Validates the configuration and starts the timer and pusher threads.
    ///
    /// # Errors
    /// [`GeneratorError::InvalidBatch`] never; [`GeneratorError::Spawn`] if a thread cannot be
    /// started. An invalid configuration is reported as a [`ConfigError`] inside
    /// [`BlockGeneratorStartError`].
    pub fn start(self) -> Result<BlockGenerator, BlockGeneratorStartError> {
        self.config.validate()?;
        let shared = Arc::new(Shared {
            records_hint: self.config.max_block_records.min(1 << 16),
            config: self.config,
            stream: self.stream,
            handler: self.handler,
            clock: self.clock,
            input_id: self.input_id,
            run_id: self.run_id,
            next_seq: self.next_seq,
            rate_limiter: self.rate_limiter,
            on_stored: self.on_stored,
            metrics: self.metrics,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
            room: Condvar::new(),
            adding: StopSignal::new(),
            timer: StopSignal::new(),
            abort: StopSignal::new(),
        });
        let pusher = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("sluice-block-pusher-{}", shared.input_id))
                .spawn(move || shared.run_pusher())
                .map_err(|e| GeneratorError::Spawn { message: e.to_string() })?
        };
        let timer = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("sluice-block-timer-{}", shared.input_id))
                .spawn(move || shared.run_timer())
        };
        let timer = match timer {
            Ok(t) => t,
            Err(e) => {
                shared.abort_all();
                let _ = pusher.join();
                return Err(GeneratorError::Spawn { message: e.to_string() }.into());
            }
        };
        Ok(BlockGenerator {
            shared,
            threads: Mutex::new(Some(Threads { timer, pusher })),
        })
    }
}

/// Why a [`BlockGenerator`] did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BlockGeneratorStartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// A thread could not be spawned.
    #[error(transparent)]
    Generator(#[from] GeneratorError),
}
