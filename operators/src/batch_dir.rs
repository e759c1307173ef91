//! The batch-directory writer shared by [`ParquetSink`](crate::ParquetSink) and
//! [`DeadLetterSink`](crate::DeadLetterSink): one implementation of the layout and the commit
//! protocol (also described in `docs/operators.md`).
//!
//! Several writers — the workers of one application, each under its worker id — share one
//! location, and every batch directory holds the parts of each writer that ran that batch time.
//! Writing batch `t` as writer `w` touches only `w`'s files:
//! 1. delete `w`'s parts in `t` that this attempt will not write (an earlier attempt that had
//!    more parts), so no row is ever in two visible files;
//! 2. put every non-empty part as `part-<w>-<i>.parquet` (each put is atomic);
//! 3. put the marker `_SUCCESS-<w>` **last**; it is never deleted.
//!
//! A re-run of the batch — the same writer after a restart, or the worker that adopted its log —
//! computes the same rows from the same blocks and writes them under the same names, so it
//! replaces the earlier attempt and nothing else. Readers count a writer's parts in a
//! directory once its marker is there. Every step is safe to repeat, so a failed write is
//! retried by running it whole again. The sinks differ only in what they turn into parts.

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

use crate::parquet_sink::{PART_PREFIX, SUCCESS_MARKER, batch_dir_name, part_file_name, success_marker_name};
use crate::{BATCH_DIR_PREFIX, Error, Result};

/// A store, a root inside it and a private runtime to drive it from plain threads.
///
/// Shared by [`crate::ParquetSink`] and [`crate::DeadLetterSink`], which have the same layout.
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

    /// Runs the commit protocol of the module doc for batch `batch_time_ms` of `writer`.
    ///
    /// Takes the parts by value so each batch is freed as soon as it is encoded.
    pub(crate) fn write_batch(&self, batch_time_ms: i64, writer: &str, parts: Vec<RecordBatch>) -> Result<()> {
        validate_writer(writer)?;
        let dir = self.batch_dir(batch_time_ms);
        let marker = dir.child(success_marker_name(writer));
        let mut encoded = Vec::with_capacity(parts.len());
        for (index, part) in parts.into_iter().enumerate() {
            if part.num_rows() == 0 {
                continue;
            }
            let path = dir.child(part_file_name(writer, index));
            let bytes = encode_parquet(&part, &path)?;
            encoded.push((path, bytes));
        }
        let store = &self.store;
        self.runtime.block_on(async {
            let listing = store.list_with_delimiter(Some(&dir)).await.map_err(store_error(&dir))?;
            for object in listing.objects {
                let ours = object.location.filename().and_then(|n| part_index(n, writer)).is_some();
                if ours && !encoded.iter().any(|(path, _)| *path == object.location) {
                    tracing::debug!(path = %object.location, "deleting a stale part from an earlier attempt");
                    match store.delete(&object.location).await {
                        Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
                        Err(e) => return Err(store_error(&object.location)(e)),
                    }
                }
            }
            for (path, bytes) in &encoded {
                store
                    .put(path, PutPayload::from(bytes.clone()))
                    .await
                    .map_err(store_error(path))?;
            }
            store
                .put(&marker, PutPayload::from_static(b""))
                .await
                .map_err(store_error(&marker))?;
            Ok(())
        })
    }

    /// Every committed part (its writer's marker is in its directory), in batch-time order, then
    /// writer, then part order.
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
                let names: Vec<String> = files
                    .objects
                    .iter()
                    .filter_map(|o| o.location.filename().map(str::to_owned))
                    .collect();
                let mut writers: Vec<&str> = names
                    .iter()
                    .filter_map(|n| n.strip_prefix(SUCCESS_MARKER)?.strip_prefix('-'))
                    .collect();
                writers.sort_unstable();
                for writer in writers {
                    let mut parts: Vec<(usize, &String)> = names
                        .iter()
                        .filter_map(|n| part_index(n, writer).map(|i| (i, n)))
                        .collect();
                    parts.sort();
                    for (_, name) in parts {
                        let path = dir.child(name.as_str());
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
            }
            Ok(out)
        })
    }
}

/// The index of part file `name` if it is a part of `writer` (`part-<writer>-<i:05>.parquet`).
fn part_index(name: &str, writer: &str) -> Option<usize> {
    let index = name
        .strip_prefix(PART_PREFIX)?
        .strip_prefix(writer)?
        .strip_prefix('-')?
        .strip_suffix(".parquet")?;
    (index.len() >= 5 && index.bytes().all(|b| b.is_ascii_digit()))
        .then(|| index.parse().ok())
        .flatten()
}

/// Writer names go into file names: letters, digits, `.`, `_` and `-`.
pub(crate) fn validate_writer(writer: &str) -> Result<()> {
    let ok = !writer.is_empty()
        && writer.len() <= 128
        && writer
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidWriter {
            writer: writer.to_owned(),
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
