//! The operators crate's error type.

/// Errors of the operators crate: sinks, their object stores and Arrow conversion.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A sink URL could not be understood or its store could not be built.
    #[error("invalid sink location {url:?}: {reason}")]
    InvalidLocation {
        /// The rejected URL.
        url: String,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// An object store operation failed.
    #[error("object store error at {location}: {source}")]
    ObjectStore {
        /// The object path or URL.
        location: String,
        /// The underlying error.
        source: object_store::Error,
    },
    /// Parquet could not encode or decode a file.
    #[error("parquet error at {location}: {source}")]
    Parquet {
        /// The object path being written or read.
        location: String,
        /// The underlying error.
        source: parquet::errors::ParquetError,
    },
    /// Arrow rejected a batch (wrong schema, mismatched column lengths).
    #[error("arrow error while {context}: {source}")]
    Arrow {
        /// What was being built or read.
        context: String,
        /// The underlying error.
        source: arrow_schema::ArrowError,
    },
    /// A writer name that cannot go into a file name.
    #[error(
        "invalid writer name {writer:?}: use 1 to 128 letters, digits, '.', '_' or '-' (it names the writer's files)"
    )]
    InvalidWriter {
        /// The name.
        writer: String,
    },
    /// A stored file does not have the layout or schema this crate writes.
    #[error("unexpected data at {location}: {detail}")]
    Corrupt {
        /// The object path.
        location: String,
        /// What was wrong.
        detail: String,
    },
    /// The sink's private I/O runtime could not be started.
    #[error("could not start the sink's I/O runtime: {source}")]
    Runtime {
        /// The underlying error.
        source: std::io::Error,
    },
}

impl Error {
    /// Whether retrying the same operation may succeed.
    ///
    /// Object-store failures are treated as transient (network, throttling); everything else is a
    /// bug or bad data that a retry would hit again.
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    /// Where the error comes from and whether it is retryable.
    pub fn class(&self) -> sluice_blockstore::ErrorClass {
        use sluice_blockstore::{Domain, ErrorClass};
        match self {
            Error::ObjectStore { .. } | Error::Runtime { .. } => ErrorClass::transient(Domain::Storage),
            Error::InvalidLocation { .. } | Error::InvalidWriter { .. } => ErrorClass::permanent(Domain::Config),
            Error::Corrupt { .. } => ErrorClass::permanent(Domain::Corrupt),
            Error::Parquet { .. } | Error::Arrow { .. } => ErrorClass::permanent(Domain::Internal),
        }
    }
}

/// Result with the operators crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
