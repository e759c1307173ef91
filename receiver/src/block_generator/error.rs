//! Why a generator refused records or failed.

use sluice_blockstore::BlockId;

use super::handler::HandlerError;

/// Why the generator did not accept records or could not store them.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum GeneratorError {
    /// The generator is stopping or stopped. The first `accepted` records of the batch were taken
    /// (they will be stored by a draining stop); the rest were not.
    #[error("the block generator is stopped; {accepted} record(s) of the batch were accepted")]
    Stopped {
        /// Leading records of the batch that were accepted before the stop.
        accepted: usize,
    },
    /// Storing a block failed for good; nothing after it was stored.
    #[error("storing block {block} failed after {attempts} attempt(s): {source}")]
    StoreFailed {
        /// The block that could not be stored.
        block: BlockId,
        /// Attempts made.
        attempts: u32,
        /// The handler's last error, whole (its [`HandlerError::is_retryable`] says whether a
        /// restart may succeed).
        source: std::sync::Arc<HandlerError>,
    },
    /// Arrow rejected the records of a block (not expected for well-formed records).
    #[error("block {block} could not be built: {message}")]
    BuildFailed {
        /// The block.
        block: BlockId,
        /// Arrow's error.
        message: String,
    },
    /// The batch breaks the `add_batch` contract (records of several shards).
    #[error("invalid batch: {reason}")]
    InvalidBatch {
        /// What is wrong.
        reason: String,
    },
    /// A generator thread could not be spawned.
    #[error("could not spawn a block generator thread: {message}")]
    Spawn {
        /// The operating system's error.
        message: String,
    },
}

impl GeneratorError {
    /// Whether restarting the receiver (re-reading from the last stored positions) may succeed.
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    /// Where the error comes from and whether it is retryable.
    pub fn class(&self) -> sluice_blockstore::ErrorClass {
        use sluice_blockstore::{Domain, ErrorClass};
        match self {
            GeneratorError::StoreFailed { source, .. } => source.class(),
            GeneratorError::Spawn { .. } => ErrorClass::transient(Domain::Internal),
            GeneratorError::Stopped { .. } => ErrorClass::permanent(Domain::Lifecycle),
            GeneratorError::BuildFailed { .. } => ErrorClass::permanent(Domain::Internal),
            GeneratorError::InvalidBatch { .. } => ErrorClass::permanent(Domain::Config),
        }
    }
}
