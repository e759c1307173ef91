//! [`ParquetSink`]: idempotent, batch-partitioned Parquet output on any object store, shared by
//! every worker of an application.
//!
//! # Layout
//!
//! ```text
//! <root>/batch_time=<ms, 20 digits>/part-<writer>-<i, 5 digits>.parquet
//! <root>/batch_time=<ms, 20 digits>/_SUCCESS-<writer>
//! ```
//!
//! `<writer>` is the worker id of the worker whose batch it is. Workers with the same batch
//! interval cut batches at the same times, so one batch directory holds the parts of every
//! worker that ran that batch time: the per-batch results of each worker over the records it
//! read. A downstream query sums or unions them (`docs/operators.md` has `DuckDB`, Spark and
//! Athena examples).
//!
//! # Commit protocol
//!
//! Writing batch `t` as writer `w` (see [`ParquetSink::write_batch`]) touches only `w`'s files:
//! 1. delete `w`'s parts of `t` that this attempt will not write (an attempt with more parts);
//! 2. put every non-empty part as `part-<w>-<i>.parquet` (snappy), `i` its index in the input;
//! 3. put `_SUCCESS-<w>` **last**.
//!
//! Because a batch's output depends only on its (replayable) input, re-running a batch after a
//! crash — by the same worker, or by the worker that adopted its log — *replaces* its output
//! rather than adding to it: the sink is exactly-once per batch and writer. Readers
//! ([`ParquetSink::read_committed`]) count a writer's parts once its marker is there; a plain
//! glob over `part-*.parquet` never sees a row twice either, but may see a batch that is still
//! being written.

use arrow_array::RecordBatch;

#[cfg(doc)]
use crate::Error;
use crate::Result;
use crate::batch_dir::BatchDirStore;

/// Prefix of a batch directory name; the batch time follows, zero-padded to 20 digits.
pub const BATCH_DIR_PREFIX: &str = "batch_time=";
/// Prefix of the marker a writer puts last into a batch directory: `_SUCCESS-<writer>`.
pub const SUCCESS_MARKER: &str = "_SUCCESS";
/// Prefix of a part file name.
pub const PART_PREFIX: &str = "part-";

/// The name of the directory holding batch `batch_time_ms`: `batch_time=<ms:020>`.
pub fn batch_dir_name(batch_time_ms: i64) -> String {
    format!("{BATCH_DIR_PREFIX}{batch_time_ms:020}")
}

/// The name of part `index` of `writer`: `part-<writer>-<i:05>.parquet`.
pub fn part_file_name(writer: &str, index: usize) -> String {
    format!("{PART_PREFIX}{writer}-{index:05}.parquet")
}

/// The name of `writer`'s commit marker: `_SUCCESS-<writer>`.
pub fn success_marker_name(writer: &str) -> String {
    format!("{SUCCESS_MARKER}-{writer}")
}

/// Idempotent Parquet output, one directory per batch time (layout and protocol in the module
/// doc).
///
/// The API is synchronous: the sink owns a current-thread tokio runtime (no threads of its own)
/// and drives the object store inside `block_on`. Call it from plain threads, never from inside
/// an async runtime (tokio panics on a nested `block_on`).
///
/// ```
/// use sluice_operators::{ParquetSink, ToRecordBatch};
/// let dir = tempfile::tempdir()?;
/// let url = dir.path().to_str().unwrap();
/// let sink = ParquetSink::open(url)?;
/// let rows = vec![("a".to_owned(), 2_u64), ("b".to_owned(), 1)];
/// sink.write_batch(1_000, "worker-1", vec![<(String, u64)>::to_record_batch(&rows)?])?;
/// let committed = ParquetSink::read_committed(url)?;
/// assert_eq!(committed.len(), 1);
/// assert_eq!(committed[0].0, 1_000);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct ParquetSink {
    inner: BatchDirStore,
}

impl ParquetSink {
    /// Opens a sink rooted at `url` (a local path, `file:///abs/dir`, `memory://<name>/<prefix>`
    /// or `s3://<bucket>/<prefix>`; S3 is configured from the `AWS_*` environment). URLs are
    /// resolved by [`sluice_blockstore::object_store_from_url`], the one URL parser of the
    /// workspace: every `memory://<name>` URL in a process shares one store per name.
    ///
    /// # Errors
    /// [`Error::InvalidLocation`] for an unsupported URL or an uncreatable directory,
    /// [`Error::ObjectStore`] if the store cannot be built, [`Error::Runtime`] if the I/O runtime
    /// cannot start.
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with_options(url, &[])
    }

    /// Like [`ParquetSink::open`], with explicit store options that override the environment
    /// (for S3, `object_store` `AmazonS3ConfigKey` names such as `endpoint` / `aws_endpoint` or
    /// `allow_http` / `aws_allow_http`). Only S3 takes options.
    ///
    /// # Errors
    /// As [`ParquetSink::open`]; also [`Error::InvalidLocation`] for an unknown option key, a
    /// `bucket` option (the bucket comes from the URL), or options given to a local or
    /// `memory://` location.
    pub fn open_with_options(url: &str, options: &[(String, String)]) -> Result<Self> {
        Ok(Self {
            inner: BatchDirStore::open(url, options)?,
        })
    }

    /// The URL this sink was opened with.
    pub fn url(&self) -> &str {
        self.inner.url()
    }

    /// Writes (or re-writes) `writer`'s output of batch `batch_time_ms`: one Parquet file per
    /// non-empty part, stale parts of an earlier attempt of this writer removed,
    /// `_SUCCESS-<writer>` written last. Other writers' files are never touched.
    ///
    /// # Errors
    /// [`Error::InvalidWriter`] for a writer name that cannot go into a file name;
    /// [`Error::Parquet`] if a part cannot be encoded; [`Error::ObjectStore`] if a put, list or
    /// delete fails (retryable: re-running the whole call is safe).
    pub fn write_batch(&self, batch_time_ms: i64, writer: &str, parts: Vec<RecordBatch>) -> Result<()> {
        self.inner.write_batch(batch_time_ms, writer, parts)
    }

    /// Reads every committed part of this sink (parts whose writer's `_SUCCESS-<writer>` marker
    /// is in their directory), in batch-time order.
    ///
    /// # Errors
    /// As [`ParquetSink::read_committed`].
    pub fn read_all_committed(&self) -> Result<Vec<(i64, RecordBatch)>> {
        self.inner.read_committed()
    }

    /// Reads every committed part under `url`, in batch-time order (then writer, then part);
    /// parts whose writer has no marker in their directory are skipped. Meant for tests and tools
    /// that check a sink's output.
    ///
    /// # Errors
    /// [`Error::InvalidLocation`] for a bad URL, [`Error::ObjectStore`] if listing or reading
    /// fails, [`Error::Parquet`] / [`Error::Arrow`] for an unreadable part.
    pub fn read_committed(url: &str) -> Result<Vec<(i64, RecordBatch)>> {
        BatchDirStore::open(url, &[])?.read_committed()
    }
}
