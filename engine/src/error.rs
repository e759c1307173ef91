//! The engine's error type.

use std::path::PathBuf;

use sluice_blockstore::{Domain, ErrorClass};

/// The error type user functions return (output functions, fallible operators): any error, or a
/// `String`/`&str` message.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

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
    /// The stream stopped because of an error; the cause is kept whole (match on it:
    /// [`Error::Job`], [`Error::DataLost`], [`Error::Receiver`], …).
    #[error("the stream stopped: {0}")]
    Stopped(#[source] std::sync::Arc<Error>),
    /// A batch failed: a task kept failing (or was rejected) and the failure policy says stop.
    #[error(transparent)]
    Job(crate::exec::JobError),
    /// A batch needs records the source no longer holds (past its retention) and no copy of their
    /// block survived: they are lost. The stream stops; nothing is skipped silently.
    #[error("batch {time}: data lost: {source}")]
    DataLost {
        /// The batch.
        time: crate::BatchTime,
        /// The block's ranges the source no longer holds.
        ranges: sluice_blockstore::SequenceNumberRanges,
        /// The reader's answer.
        source: std::sync::Arc<sluice_blockstore::ReadError>,
    },
    /// An output function or sink failed.
    #[error("output of batch {time} failed: {source}")]
    Output {
        /// The batch.
        time: crate::BatchTime,
        /// What the output returned.
        source: BoxError,
    },
    /// An input, output or operator was defined after `start()`: the plan is frozen then.
    #[error(
        "{what} cannot be added once the context is started: define every input, operator and output before \
         start() (as in Spark Streaming)"
    )]
    Started {
        /// What was added.
        what: &'static str,
    },
    /// The operation needs a started context.
    #[error("the context is not started: call start() first")]
    NotStarted,
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
    /// A receiver could not be created, started or stopped, or gave up (its source or lease
    /// table failed for good, or a block could not be stored).
    #[error("the receiver of stream {stream} failed: {source}")]
    Receiver {
        /// The stream it reads.
        stream: std::sync::Arc<str>,
        /// Why.
        source: std::sync::Arc<sluice_receiver::ReceiverError>,
    },
    /// The embedded local log could not be opened.
    #[error(transparent)]
    LocalLog(#[from] sluice_receiver::LocalLogError),
    /// The context is stopping immediately: a block handed over after that is not stored (no
    /// checkpoint covers it, so it is read again after a restart).
    #[error("the context is stopping: the block was not stored and is read again after a restart")]
    Stopping,
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
    /// The monitoring server (metrics endpoint and status page) could not listen on the
    /// configured address. Nothing was started.
    #[error(
        "cannot serve metrics and the status page on {addr}: {source}; choose another address with \
         StreamingContext::builder().metrics_addr(..) (or --metrics-addr; port 0 picks a free port), or leave \
         it unset to serve nothing"
    )]
    MetricsServer {
        /// The configured address.
        addr: std::net::SocketAddr,
        /// Why binding failed (address in use, not a local address, permission denied).
        source: std::io::Error,
    },
    /// A bug or an unexpected state inside the engine.
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    /// Whether retrying the same operation may succeed.
    pub fn is_retryable(&self) -> bool {
        self.class().is_retryable()
    }

    /// Where the error comes from and whether retrying may succeed: the cause's class for
    /// errors that wrap one, else the variant's own. One classification for every crate's errors
    /// ([`sluice_blockstore::ErrorClass`]), so a policy can match on the domain
    /// (`Domain::DataLoss`, `Domain::UserCode`, …) whatever layer the error came through.
    pub fn class(&self) -> ErrorClass {
        match self {
            Error::Io { .. } | Error::ObjectStore { .. } => ErrorClass::transient(Domain::Storage),
            Error::BlockStore(e) => e.class(),
            Error::Lease(e) => e.class(),
            Error::LocalLog(e) => e.class(),
            Error::Receiver { source, .. } => source.class(),
            Error::Stopped(cause) => cause.class(),
            Error::Job(job) => ErrorClass::permanent(job.error.class().domain),
            Error::DataLost { .. } => ErrorClass::permanent(Domain::DataLoss),
            Error::Output { .. } => ErrorClass::permanent(Domain::UserCode),
            Error::CorruptMetadata { .. } => ErrorClass::permanent(Domain::Corrupt),
            Error::Config { .. } | Error::MetricsServer { .. } => ErrorClass::permanent(Domain::Config),
            // A create-only write lost to another writer: writing the same file again loses again.
            Error::AlreadyExists { .. } => ErrorClass::permanent(Domain::Storage),
            Error::Fenced { .. } => ErrorClass::permanent(Domain::Lease),
            Error::Started { .. } | Error::NotStarted | Error::StopTimeout { .. } | Error::Stopping => {
                ErrorClass::permanent(Domain::Lifecycle)
            }
            #[cfg(feature = "kinesis")]
            Error::Kinesis(_) => ErrorClass::permanent(Domain::Source),
            #[cfg(feature = "kinesis")]
            Error::LeaseTable(_) => ErrorClass::permanent(Domain::Lease),
            Error::Sink { .. } => ErrorClass::permanent(Domain::Storage),
            Error::Internal(_) => ErrorClass::permanent(Domain::Internal),
        }
    }
}

impl From<crate::exec::JobError> for Error {
    /// A job that failed because its block's data is gone is [`Error::DataLost`]; any other
    /// failed job is [`Error::Job`].
    fn from(job: crate::exec::JobError) -> Self {
        match &job.error {
            crate::exec::TaskError::BlockUnavailable { source, .. } if source.is_data_lost() => Error::DataLost {
                time: job.time,
                ranges: source.ranges().clone(),
                source: source.clone(),
            },
            _ => Error::Job(job),
        }
    }
}

impl From<crate::plan::outputs::OutputError> for Error {
    fn from(e: crate::plan::outputs::OutputError) -> Self {
        match e {
            crate::plan::outputs::OutputError::Job(job) => job.into(),
            crate::plan::outputs::OutputError::Sink { time, source } => Error::Output { time, source },
        }
    }
}

/// Result with the engine's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
