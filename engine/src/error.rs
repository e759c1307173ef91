//! The engine's error type.

use std::path::PathBuf;

/// Errors of the engine.
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
    /// An object-store operation on the checkpoint location failed.
    #[error("object store error at {location}: {source}")]
    ObjectStore {
        /// The object path.
        location: String,
        /// The underlying error.
        source: object_store::Error,
    },
    /// A create-only write found the file already there.
    #[error("{location} already exists")]
    AlreadyExists {
        /// The file or object.
        location: String,
    },
    /// A metadata log or state file failed its checksum or could not be parsed.
    #[error(
        "corrupt metadata file {file}: {detail}; the checkpoint location is damaged — restore it or start with a new one (records since the last shard checkpoint would be re-read)"
    )]
    CorruptMetadata {
        /// The file.
        file: String,
        /// What was wrong.
        detail: String,
    },
    /// Another process claimed this worker's metadata log: a process of the same worker id
    /// started, or another worker adopted this worker's log after its leases expired. This
    /// process must stop; it can no longer log blocks or batches (what it already logged is
    /// processed by the new holder). Not retryable.
    #[error(
        "the metadata log {location} was claimed by {by}; this process is fenced off and stops (if it should \
         run, start it again: it claims the log back and recovers from it)"
    )]
    Fenced {
        /// The entry that took this holder's place.
        location: String,
        /// The new holder.
        by: String,
    },
    /// Invalid configuration; the message names the field and the fix.
    #[error("invalid configuration: {field}: {reason}")]
    Config {
        /// The offending field.
        field: &'static str,
        /// What is wrong and how to fix it.
        reason: String,
    },
    /// A block store operation failed.
    #[error(transparent)]
    BlockStore(#[from] sluice_blockstore::Error),
    /// The stream stopped because of an error (a batch failed under the stop policy, data was
    /// lost, a receiver gave up).
    #[error("the stream stopped: {reason}")]
    Stopped {
        /// Why.
        reason: String,
    },
    /// A graceful stop did not finish in time; what was not processed is logged and runs after a
    /// restart.
    #[error(
        "graceful stop did not finish within {timeout:?}; unprocessed blocks are logged and will run after a restart"
    )]
    StopTimeout {
        /// The timeout.
        timeout: std::time::Duration,
    },
    /// The lease table failed (joining the application's workers, renewing a worker lease).
    #[error(transparent)]
    Lease(#[from] sluice_receiver::LeaseError),
    /// A receiver could not be created, started or stopped.
    #[error("receiver error: {0}")]
    Receiver(String),
    /// A Kinesis input could not connect: missing stream, unreachable endpoint, bad settings.
    #[cfg(feature = "kinesis")]
    #[error(transparent)]
    Kinesis(#[from] sluice_receiver::kinesis::KinesisError),
    /// The `DynamoDB` lease table could not be opened or created.
    #[cfg(feature = "kinesis")]
    #[error(transparent)]
    LeaseTable(#[from] sluice_receiver::DynamoConnectError),
    /// A sink (Parquet output, dead-letter) failed.
    #[error("sink at {location} failed: {message}")]
    Sink {
        /// Where the sink writes.
        location: String,
        /// What failed.
        message: String,
    },
    /// A bug or an unexpected state inside the engine.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Whether retrying the same operation may succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::Io { .. } | Error::ObjectStore { .. } => true,
            Error::BlockStore(e) => e.is_retryable(),
            Error::Lease(e) => e.is_retryable(),
            _ => false,
        }
    }
}

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
