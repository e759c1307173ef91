//! [`ParquetSink`]: idempotent, batch-partitioned Parquet output on any object store.
//!
//! # Layout
//!
//! ```text
//! <root>/batch_time=<ms, 20 digits>/part-<i, 5 digits>.parquet
//! <root>/batch_time=<ms, 20 digits>/_SUCCESS
//! ```
//!
//! # Commit protocol
//!
//! Writing batch `t` (see [`ParquetSink::write_batch`]):
//! 1. delete `_SUCCESS` of `t` if present, so a half-rewritten directory is never seen as
//!    committed;
//! 2. put every non-empty part as `part-<i>.parquet` (snappy), `i` its index in the input;
//! 3. delete every other `part-*` object in the directory (left by an earlier attempt that had
//!    more parts);
//! 4. put `_SUCCESS` **last**.
//!
//! Readers ([`ParquetSink::read_committed`]) only look at directories holding `_SUCCESS`. Because
//! a batch's output depends only on its (replayable) input, re-running a batch after a crash
//! *replaces* its output rather than adding to it: the sink is exactly-once per batch time.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::RecordBatch;
use bytes::Bytes;
use object_store::path::Path;
use object_store::{ObjectStore, PutPayload};
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::Compression;
use parquet::file::properties::WriterProperties;

use sluice_blockstore::object_store_from_url;

use crate::{Error, Result};

/// Prefix of a batch directory name; the batch time follows, zero-padded to 20 digits.
pub const BATCH_DIR_PREFIX: &str = "batch_time=";
/// Name of the marker written last into a committed batch directory.
pub const SUCCESS_MARKER: &str = "_SUCCESS";
/// Prefix of a part file name.
pub const PART_PREFIX: &str = "part-";

/// The name of the directory holding batch `batch_time_ms`: `batch_time=<ms:020>`.
pub fn batch_dir_name(batch_time_ms: i64) -> String {
    format!("{BATCH_DIR_PREFIX}{batch_time_ms:020}")
}

/// The name of part `index`: `part-<i:05>.parquet`.
pub fn part_file_name(index: usize) -> String {
    format!("{PART_PREFIX}{index:05}.parquet")
}

/// A store, a root inside it and a private runtime to drive it from plain threads.
///
/// Shared by [`ParquetSink`] and [`crate::DeadLetterSink`], which have the same layout.
#[derive(Debug)]
pub(crate) struct BatchDirStore {
    url: String,
    store: Arc<dyn ObjectStore>,
    root: Path,
    runtime: tokio::runtime::Runtime,
}

fn store_error(location: &Path) -> impl FnOnce(object_store::Error) -> Error + '_ {
    move |source| Error::ObjectStore {
        location: location.to_string(),
        source,
    }
}

impl BatchDirStore {
    pub(crate) fn open(url: &str, options: &[(String, String)]) -> Result<Self> {
        // A current-thread runtime spawns no threads: it runs only inside `block_on`.
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|source| Error::Runtime { source })?;
        let options: HashMap<String, String> = options.iter().cloned().collect();
        let (store, root) = object_store_from_url(url, &options).map_err(|e| match e {
            sluice_blockstore::Error::ObjectStore { location, source } => Error::ObjectStore { location, source },
            sluice_blockstore::Error::InvalidUrl { url, reason } => Error::InvalidLocation { url, reason },
            other => Error::InvalidLocation {
                url: url.to_owned(),
                reason: other.to_string(),
            },
        })?;
        Ok(Self {
            url: url.to_owned(),
            store,
            root,
            runtime,
        })
    }

    pub(crate) fn url(&self) -> &str {
        &self.url
    }

    fn batch_dir(&self, batch_time_ms: i64) -> Path {
        self.root.child(batch_dir_name(batch_time_ms))
    }

    /// Runs the commit protocol of the module doc for one batch.
    ///
    /// Takes the parts by value so each batch is freed as soon as it is encoded.
    pub(crate) fn write_batch(&self, batch_time_ms: i64, parts: Vec<RecordBatch>) -> Result<()> {
        let dir = self.batch_dir(batch_time_ms);
        let success = dir.child(SUCCESS_MARKER);
        let mut encoded = Vec::with_capacity(parts.len());
        for (index, part) in parts.into_iter().enumerate() {
            if part.num_rows() == 0 {
                continue;
            }
            let path = dir.child(part_file_name(index));
            let bytes = encode_parquet(&part, &path)?;
            encoded.push((path, bytes));
        }
        let store = &self.store;
        self.runtime.block_on(async {
            match store.delete(&success).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(store_error(&success)(e)),
            }
            for (path, bytes) in &encoded {
                store
                    .put(path, PutPayload::from(bytes.clone()))
                    .await
                    .map_err(store_error(path))?;
            }
            let listing = store.list_with_delimiter(Some(&dir)).await.map_err(store_error(&dir))?;
            for object in listing.objects {
                let is_part = object.location.filename().is_some_and(|n| n.starts_with(PART_PREFIX));
                if is_part && !encoded.iter().any(|(path, _)| *path == object.location) {
                    tracing::debug!(path = %object.location, "deleting stale part from an earlier attempt");
                    match store.delete(&object.location).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(store_error(&object.location)(e)),
                    }
                }
            }
            store
                .put(&success, PutPayload::from_static(b""))
                .await
                .map_err(store_error(&success))?;
            Ok(())
        })
    }

    /// Every committed batch, in batch-time order, each part's batches in part order.
    pub(crate) fn read_committed(&self) -> Result<Vec<(i64, RecordBatch)>> {
        let store = &self.store;
        let root = &self.root;
        self.runtime.block_on(async {
            let prefix = (root.parts().count() > 0).then_some(root);
            let listing = store.list_with_delimiter(prefix).await.map_err(store_error(root))?;
            let mut dirs: Vec<(i64, Path)> = listing
                .common_prefixes
                .into_iter()
                .filter_map(|dir| {
                    let time = dir.filename()?.strip_prefix(BATCH_DIR_PREFIX)?.parse().ok()?;
                    Some((time, dir))
                })
                .collect();
            dirs.sort_by_key(|(time, _)| *time);
            let mut out = Vec::new();
            for (time, dir) in dirs {
                let files = store.list_with_delimiter(Some(&dir)).await.map_err(store_error(&dir))?;
                let committed = files
                    .objects
                    .iter()
                    .any(|o| o.location.filename() == Some(SUCCESS_MARKER));
                if !committed {
                    continue;
                }
                let mut parts: Vec<Path> = files
                    .objects
                    .into_iter()
                    .map(|o| o.location)
                    .filter(|p| p.filename().is_some_and(|n| n.starts_with(PART_PREFIX)))
                    .collect();
                parts.sort();
                for path in parts {
                    let bytes = store
                        .get(&path)
                        .await
                        .map_err(store_error(&path))?
                        .bytes()
                        .await
                        .map_err(store_error(&path))?;
                    for batch in decode_parquet(bytes, &path)? {
                        out.push((time, batch));
                    }
                }
            }
            Ok(out)
        })
    }
}

fn parquet_error(path: &Path) -> impl FnOnce(parquet::errors::ParquetError) -> Error + '_ {
    move |source| Error::Parquet {
        location: path.to_string(),
        source,
    }
}

fn encode_parquet(batch: &RecordBatch, path: &Path) -> Result<Bytes> {
    let props = WriterProperties::builder().set_compression(Compression::SNAPPY).build();
    let mut buffer = Vec::new();
    let mut writer = ArrowWriter::try_new(&mut buffer, batch.schema(), Some(props)).map_err(parquet_error(path))?;
    writer.write(batch).map_err(parquet_error(path))?;
    writer.close().map_err(parquet_error(path))?;
    Ok(Bytes::from(buffer))
}

fn decode_parquet(bytes: Bytes, path: &Path) -> Result<Vec<RecordBatch>> {
    let reader = ParquetRecordBatchReaderBuilder::try_new(bytes)
        .map_err(parquet_error(path))?
        .build()
        .map_err(parquet_error(path))?;
    reader.collect::<Result<Vec<_>, _>>().map_err(|source| Error::Arrow {
        context: format!("decoding {path}"),
        source,
    })
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
/// sink.write_batch(1_000, vec![<(String, u64)>::to_record_batch(&rows)?])?;
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

    /// Writes (or re-writes) the output of batch `batch_time_ms`: one Parquet file per non-empty
    /// part, stale parts of an earlier attempt removed, `_SUCCESS` written last.
    ///
    /// # Errors
    /// [`Error::Parquet`] if a part cannot be encoded, [`Error::ObjectStore`] if a put, list or
    /// delete fails (retryable: re-running the whole call is safe).
    pub fn write_batch(&self, batch_time_ms: i64, parts: Vec<RecordBatch>) -> Result<()> {
        self.inner.write_batch(batch_time_ms, parts)
    }

    /// Reads every committed batch (directories with `_SUCCESS`) of this sink, in batch-time
    /// order.
    ///
    /// # Errors
    /// As [`ParquetSink::read_committed`].
    pub fn read_all_committed(&self) -> Result<Vec<(i64, RecordBatch)>> {
        self.inner.read_committed()
    }

    /// Reads every committed batch under `url`, in batch-time order; uncommitted directories
    /// (no `_SUCCESS`) are skipped. Meant for tests and tools that check a sink's output.
    ///
    /// # Errors
    /// [`Error::InvalidLocation`] for a bad URL, [`Error::ObjectStore`] if listing or reading
    /// fails, [`Error::Parquet`] / [`Error::Arrow`] for an unreadable part.
    pub fn read_committed(url: &str) -> Result<Vec<(i64, RecordBatch)>> {
        BatchDirStore::open(url, &[])?.read_committed()
    }
}
