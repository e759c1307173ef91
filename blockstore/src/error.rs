//! The block store's error type.

use std::path::PathBuf;

use crate::BlockId;

/// Errors of the block store, blocks and their codec.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A local file operation failed.
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
    /// The configuration is invalid; the message names the field and the fix.
    #[error("invalid block store configuration: {0}")]
    Config(String),
}

impl Error {
    /// Whether retrying the same operation may succeed (transient I/O and object-store errors).
    pub fn is_retryable(&self) -> bool {
        matches!(self, Error::Io { .. } | Error::ObjectStore { .. })
    }
}

/// Result with the block store's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
