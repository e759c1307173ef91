//! [`LocalLogError`]: why a local-log operation failed.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::SourceError;

/// The result of local-log operations.
pub type Result<T, E = LocalLogError> = std::result::Result<T, E>;

/// Why a local-log operation failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum LocalLogError {
    /// A file-system call failed. Retryable when the cause is transient (disk full, EINTR).
    ///
    /// From [`Producer::put`](super::Producer::put), `put_aggregated` and `flush`: the records
    /// of the failed call were not appended and nothing torn is left in the segment; records
    /// acknowledged earlier and not yet written stay buffered, so retrying the call writes each
    /// of them once.
    #[error("local log I/O on {}: {source}", path.display())]
    Io {
        /// The file or directory involved.
        path: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// `meta.json` could not be parsed or written. Not retryable.
    #[error("local log metadata {} is invalid: {source}", path.display())]
    Meta {
        /// The metadata file.
        path: PathBuf,
        /// The cause.
        #[source]
        source: serde_json::Error,
    },
    /// `create_stream` on a stream that already exists. Not retryable.
    #[error("stream {stream} already exists in the local log")]
    StreamExists {
        /// Stream name.
        stream: String,
    },
    /// No such stream in the log directory. Not retryable.
    #[error("unknown stream {stream} in the local log")]
    UnknownStream {
        /// Stream name.
        stream: String,
    },
    /// No such shard in the stream. Not retryable.
    #[error("unknown shard {shard_id} of stream {stream}")]
    UnknownShard {
        /// Stream name.
        stream: String,
        /// Shard id.
        shard_id: String,
    },
    /// The shard is closed (split or merged) and takes no more writes or reshards.
    #[error("shard {shard_id} of stream {stream} is closed")]
    ShardClosed {
        /// Stream name.
        stream: String,
        /// Shard id.
        shard_id: String,
    },
    /// Another producer holds the single-writer lock. Retryable once that producer exits.
    #[error(
        "stream {stream} already has a producer: the writer lock {} is held by another process or handle",
        lock_path.display()
    )]
    WriterLocked {
        /// Stream name.
        stream: String,
        /// The lock file.
        lock_path: PathBuf,
    },
    /// A producer's write could not be undone (a segment's fsync failed, or truncating a write
    /// that failed part-way failed), so the state of the segment on disk is unknown and the
    /// producer refuses every later call. Records acknowledged since its last successful flush may
    /// or may not be on disk. Not retryable on this producer: drop it and open a new one, which
    /// truncates a torn tail as it opens, then read the shard's tail to see what was kept.
    #[error(
        "the producer of stream {stream} is unusable: {cause} on {}: {source}; records acknowledged \
         since its last successful flush may be lost. Drop it and open a new producer (opening \
         truncates a torn tail), then read the shard's tail to see what was kept",
        path.display()
    )]
    ProducerPoisoned {
        /// Stream name.
        stream: String,
        /// The segment file.
        path: PathBuf,
        /// The step that failed.
        cause: PoisonCause,
        /// The I/O error of that step (shared: every later call returns it again).
        #[source]
        source: Arc<std::io::Error>,
    },
    /// Invalid argument (bad name, bad hash key, non-adjacent merge, empty aggregate…). Not retryable.
    #[error("invalid local log request: {0}")]
    Invalid(String),
}

impl LocalLogError {
    /// Whether retrying the same call may succeed.
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    /// Where the error comes from and whether it is retryable.
    pub fn class(&self) -> sluice_blockstore::ErrorClass {
        use sluice_blockstore::{Domain, ErrorClass};
        match self {
            LocalLogError::Io { .. } => ErrorClass::transient(Domain::Storage),
            // Another process holds the writer lock; it may let go.
            LocalLogError::WriterLocked { .. } => ErrorClass::transient(Domain::Lifecycle),
            LocalLogError::Meta { .. } => ErrorClass::permanent(Domain::Corrupt),
            // Only a new producer can go on.
            LocalLogError::ProducerPoisoned { .. } => ErrorClass::permanent(Domain::Storage),
            LocalLogError::StreamExists { .. }
            | LocalLogError::UnknownStream { .. }
            | LocalLogError::UnknownShard { .. }
            | LocalLogError::ShardClosed { .. }
            | LocalLogError::Invalid(_) => ErrorClass::permanent(Domain::Config),
        }
    }

    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        LocalLogError::Io {
            path: path.into(),
            source,
        }
    }
}

/// Which step left a producer unusable ([`LocalLogError::ProducerPoisoned`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoisonCause {
    /// `fsync` of a segment failed. The kernel may have dropped the written pages and marked them
    /// clean, so a second fsync could succeed without the data being on disk.
    SyncFailed,
    /// A write failed part-way and truncating its torn bytes off the segment failed too: writing
    /// on would leave a torn frame in the middle of the segment.
    TruncateFailed,
}

impl fmt::Display for PoisonCause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PoisonCause::SyncFailed => "fsync failed",
            PoisonCause::TruncateFailed => "truncating a write that failed part-way failed",
        })
    }
}

impl From<LocalLogError> for SourceError {
    fn from(error: LocalLogError) -> Self {
        match error {
            LocalLogError::UnknownShard { stream, shard_id } => SourceError::UnknownShard { stream, shard_id },
            LocalLogError::UnknownStream { stream } => SourceError::UnknownShard {
                stream,
                shard_id: String::new(),
            },
            LocalLogError::Invalid(detail) => SourceError::Invalid(detail),
            other => SourceError::Unavailable {
                detail: other.to_string(),
                source: Some(Box::new(other)),
            },
        }
    }
}
