//! The block store's error type.

use std::path::PathBuf;

use crate::{BlockId, Domain, ErrorClass, StorageLevel};

/// Errors of the block store, its tiers, blocks and their codec.
///
/// [`Error::is_retryable`] says whether repeating the same operation may succeed; callers decide
/// from that, never from the message text.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A local file operation failed (including a full disk).
    #[error("I/O error on {path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// An object store operation failed.
    #[error("object store error at {location}: {source}")]
    ObjectStore {
        /// The object path or URL.
        location: String,
        /// The underlying error.
        source: object_store::Error,
    },
    /// A stored copy failed its checksum or could not be parsed; it must be treated as missing.
    #[error("corrupt block{}: {detail}", id.map(|i| format!(" {i}")).unwrap_or_default())]
    Corrupt {
        /// The block, when known.
        id: Option<BlockId>,
        /// What was wrong.
        detail: String,
    },
    /// Arrow rejected a batch or an IPC stream.
    #[error("arrow error: {0}")]
    Arrow(#[from] arrow_schema::ArrowError),
    /// A string is not a block id.
    #[error("{text:?} is not a block id; expected input-<input>-<run hex>-<seq>")]
    InvalidBlockId {
        /// The rejected text.
        text: String,
    },
    /// The configuration is invalid.
    #[error("invalid block store configuration: `{field}`: {reason}")]
    Config {
        /// The offending field.
        field: &'static str,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// An object-store URL cannot be used.
    #[error("cannot use object store URL {url:?}: {reason}")]
    InvalidUrl {
        /// The rejected URL.
        url: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A storage level the store cannot honour (no tier at all, or more copies than tiers).
    #[error("storage level {level} is not supported: {reason}")]
    UnsupportedStorageLevel {
        /// The rejected level.
        level: StorageLevel,
        /// Why, and what to use instead.
        reason: &'static str,
    },
    /// A block is larger than the whole memory budget, so the memory tier cannot hold it.
    #[error("block {id} needs {size_bytes} bytes of memory, more than the whole memory budget of {budget_bytes} bytes")]
    TooLargeForMemory {
        /// The block.
        id: BlockId,
        /// What it would be charged.
        size_bytes: usize,
        /// The memory tier's budget.
        budget_bytes: usize,
    },
    /// The replica tier's I/O runtime could not be started.
    #[error("cannot start the I/O runtime for replica {url}: {source}")]
    Runtime {
        /// The replica URL.
        url: String,
        /// The underlying error.
        source: std::io::Error,
    },
}

impl Error {
    /// Whether retrying the same operation may succeed (transient I/O and object-store errors).
    ///
    /// Corrupt copies, configuration and URL errors, unsupported levels and oversized blocks are
    /// not retryable.
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    /// Where the error comes from and whether it is retryable (see [`Error::is_retryable`]).
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Io { .. } | Error::Runtime { .. } => ErrorClass::transient(Domain::Storage),
            Error::ObjectStore { source, .. } => match source {
                object_store::Error::NotSupported { .. }
                | object_store::Error::NotImplemented
                | object_store::Error::InvalidPath { .. }
                | object_store::Error::UnknownConfigurationKey { .. }
                | object_store::Error::PermissionDenied { .. }
                | object_store::Error::Unauthenticated { .. } => ErrorClass::permanent(Domain::Config),
                _ => ErrorClass::transient(Domain::Storage),
            },
            Error::Corrupt { .. } | Error::Arrow(_) => ErrorClass::permanent(Domain::Corrupt),
            Error::InvalidBlockId { .. }
            | Error::Config { .. }
            | Error::InvalidUrl { .. }
            | Error::UnsupportedStorageLevel { .. }
            | Error::TooLargeForMemory { .. } => ErrorClass::permanent(Domain::Config),
        }
    }

    /// Whether this error reports a corrupt copy.
    pub fn is_corrupt(&self) -> bool {
        matches!(self, Error::Corrupt { .. })
    }

    /// Sets the block id of a [`Error::Corrupt`] that does not name one yet (decoding alone
    /// cannot know which block a damaged copy was meant to be).
    #[must_use]
    pub(crate) fn for_block(self, block: BlockId) -> Self {
        match self {
            Error::Corrupt { id: None, detail } => Error::Corrupt {
                id: Some(block),
                detail,
            },
            other => other,
        }
    }
}

/// Result with the block store's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
