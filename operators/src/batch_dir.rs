//! The batch-directory writer shared by [`ParquetSink`](crate::ParquetSink) and
//! [`DeadLetterSink`](crate::DeadLetterSink): one implementation of the layout and the commit
//! protocol (also described in `docs/operators.md`).
//!
//! Writing batch `t`:
//! 1. delete `t`'s `_SUCCESS` if present (a half-rewritten directory is never seen as committed);
//! 2. put every non-empty part as `part-<i>.parquet`;
//! 3. delete every other `part-*` object in the directory (an earlier attempt with more parts);
//! 4. put `_SUCCESS` **last**.
//!
//! Every step is safe to repeat, so a failed write is retried by running it whole again. The
//! sinks differ only in what they turn into parts.

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

use crate::parquet_sink::{PART_PREFIX, SUCCESS_MARKER, batch_dir_name, part_file_name};
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
