//! The seam between a generator and whoever stores its blocks.

use sluice_blockstore::{Block, Domain, ErrorClass};

/// Where sealed blocks go: the engine stores them and makes their metadata durable.
///
/// # Contract
/// - `store_block` is called from the generator's single pusher thread, one block at a time, in
///   block order (increasing `BlockId::seq`). It may block; while it does, the queue fills and
///   producers are eventually blocked (backpressure).
/// - It returns `Ok` only after the block is stored **and** its metadata is durable (durability
///   order steps 1 and 2). Only then does the receiver record the block's ranges as stored and
///   let checkpoints advance over them.
/// - On `Err`, the block counts as not stored. Retryable errors are retried (up to
///   `max_push_attempts` in all); afterwards, or on a non-retryable error, the generator fails and
///   the receiver restarts from the last stored positions. An implementation must therefore
///   tolerate the same records arriving again in a later block (a retried or re-read block gets a
///   new id).
/// - It must return eventually: a stop, even an aborting one, waits for the call in flight.
pub trait BlockHandler: Send + Sync {
    /// Stores `block` durably.
    ///
    /// # Errors
    /// [`HandlerError`], saying whether a retry may succeed.
    fn store_block(&self, block: Block) -> Result<(), HandlerError>;
}

/// Why a [`BlockHandler`] could not store a block.
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct HandlerError {
    message: String,
    class: ErrorClass,
    #[source]
    source: Option<Box<dyn std::error::Error + Send + Sync>>,
}

impl HandlerError {
    /// A storage error ([`Domain::Storage`]) with a message and whether retrying the same block
    /// may succeed.
    pub fn new(message: impl Into<String>, retryable: bool) -> Self {
        let class = if retryable {
            ErrorClass::transient(Domain::Storage)
        } else {
            ErrorClass::permanent(Domain::Storage)
        };
        Self {
            message: message.into(),
            class,
            source: None,
        }
    }

    /// An error wrapping its cause, with the cause's class (so a corrupt copy or a stopping
    /// context keeps its domain through the generator and the receiver).
    pub fn with_source(
        message: impl Into<String>,
        class: ErrorClass,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        Self {
            message: message.into(),
            class,
            source: Some(source.into()),
        }
    }

    /// Whether storing the same block again may succeed.
    pub fn is_retryable(&self) -> bool {
        self.class.is_retryable()
    }

    /// Where the failure comes from and whether it is retryable.
    pub fn class(&self) -> ErrorClass {
        self.class
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
    }
}

impl PartialEq for HandlerError {
    /// Equal message and class (the source is not compared: errors rarely implement
    /// `PartialEq`). Lets generator phases that hold a failure be compared.
    fn eq(&self, other: &Self) -> bool {
        self.message == other.message && self.class == other.class
    }
}

impl Eq for HandlerError {}
