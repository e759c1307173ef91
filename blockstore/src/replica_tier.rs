//! [`ReplicaTier`]: the second copy of a block, on an object store chosen by URL.
//!
//! The design and its invariants are documented on [`ReplicaTier`].

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};
use tokio::runtime::Runtime;

use crate::disk_tier::decode_copy;
use crate::{Block, BlockId, BlockTier, Error, Result, StoredBlock, object_store_from_url};

const BLOCK_SUFFIX: &str = ".blk";

/// Blocks as objects on an object store.
///
/// Block `id` is stored as the object `<prefix>/<id>.blk` holding [`Block::encode`]'s bytes.
/// Puts are create-only ([`PutMode::Create`]): an object store answering `AlreadyExists` means
/// the block (ids are immutable) is already there, which is a success. A local directory store
/// writes through a temporary file and a rename; S3 makes a create-only put atomic by itself.
///
/// # Threads and the async runtime
///
/// `object_store` is async; the rest of Sluice calls the block store from plain and rayon
/// threads. The tier therefore owns a small current-thread tokio runtime (no worker threads of its
/// own) and blocks on it: any number of threads may call the tier concurrently. When a method is
/// called from inside a tokio runtime — where blocking would stall that runtime, and nesting
/// `block_on` panics — the request runs on a scoped thread that the call joins before it returns.
/// Prefer calling from plain threads. Dropping the tier shuts the runtime down, likewise off any
/// async context.
///
/// ```
/// use std::collections::HashMap;
/// use sluice_blockstore::testing::{sample_block, sample_records};
/// use sluice_blockstore::{BlockTier, ReplicaTier};
///
/// let tier = ReplicaTier::open("memory://doc-replica/blocks", &HashMap::new())?;
/// let block = sample_block(1, &sample_records("shard-0", 0, 10, 100));
/// tier.put(&block)?;
/// tier.put(&block)?; // already there: still a success
/// assert_eq!(tier.get(block.id())?, Some(block));
/// # Ok::<(), sluice_blockstore::Error>(())
/// ```
pub struct ReplicaTier {
    url: String,
    store: Arc<dyn ObjectStore>,
    prefix: ObjectPath,
    /// `Some` until dropped.
    runtime: Option<Runtime>,
}

impl std::fmt::Debug for ReplicaTier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicaTier")
            .field("url", &self.url)
            .field("store", &self.store.to_string())
            .finish_non_exhaustive()
    }
}

impl ReplicaTier {
    /// Opens the replica at `url` (`file://`, a plain path, `memory://` or `s3://`; see
    /// [`object_store_from_url`] for the forms and the S3 options).
    ///
    /// # Errors
    /// [`Error::InvalidUrl`] naming the URL and the fix; [`Error::ObjectStore`] if the store
    /// rejects its configuration; [`Error::Runtime`] if the I/O runtime cannot start. Nothing is
    /// sent to the store yet, so an unreachable endpoint shows up on the first put or get.
    pub fn open(url: &str, options: &HashMap<String, String>) -> Result<Self> {
        let (store, prefix) = object_store_from_url(url, options)?;
        Self::from_store(url, store, prefix)
    }

    /// A replica tier over an existing store, keeping blocks under `prefix`; `description` names
    /// it in errors and logs (usually its URL).
    ///
    /// # Errors
    /// [`Error::Runtime`] if the I/O runtime cannot start.
    pub fn from_store(description: &str, store: Arc<dyn ObjectStore>, prefix: ObjectPath) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .thread_name("sluice-replica-io")
            .build()
            .map_err(|source| Error::Runtime {
                url: description.to_owned(),
                source,
            })?;
        Ok(Self {
            url: description.to_owned(),
            store,
            prefix,
            runtime: Some(runtime),
        })
    }

    /// The URL (or description) the tier was opened with.
    pub fn url(&self) -> &str {
        &self.url
    }

    /// The underlying object store (for operations tooling and tests).
    pub fn object_store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The object that holds (or would hold) block `id`.
    pub fn object_path(&self, id: BlockId) -> ObjectPath {
        self.prefix.child(format!("{id}{BLOCK_SUFFIX}"))
    }

    /// Runs `future` to completion on the tier's runtime; called from inside a tokio runtime, it
    /// runs on a scoped thread instead of blocking that runtime (see [`ReplicaTier`]).
    pub fn block_on<F>(&self, future: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let runtime = self.runtime.as_ref().expect("the runtime lives until drop");
        if tokio::runtime::Handle::try_current().is_ok() {
            std::thread::scope(|scope| {
                scope
                    .spawn(|| runtime.block_on(future))
                    .join()
                    .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
            })
        } else {
            runtime.block_on(future)
        }
    }

    fn error(&self, path: &ObjectPath, source: object_store::Error) -> Error {
        Error::ObjectStore {
            location: format!("{}: {path}", self.url),
            source,
        }
    }
}

impl Drop for ReplicaTier {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take()
            && tokio::runtime::Handle::try_current().is_ok()
        {
            // Shutting a runtime down blocks, which is not allowed on an async thread.
            std::thread::scope(|scope| {
                scope.spawn(move || drop(runtime));
            });
        }
    }
}

impl BlockTier for ReplicaTier {
    fn put(&self, block: &Block) -> Result<()> {
        let path = self.object_path(block.id());
        let payload = PutPayload::from_bytes(block.encode()?);
        let options = PutOptions {
            mode: PutMode::Create,
            ..PutOptions::default()
        };
        match self.block_on(self.store.put_opts(&path, payload, options)) {
            Ok(_) | Err(object_store::Error::AlreadyExists { .. }) => Ok(()),
            Err(source) => Err(self.error(&path, source)),
        }
    }

    fn get(&self, id: BlockId) -> Result<Option<Block>> {
        let path = self.object_path(id);
        let bytes = self.block_on(async {
            let result = self.store.get(&path).await?;
            result.bytes().await
        });
        match bytes {
            Ok(bytes) => decode_copy(id, bytes).map(Some),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(source) => Err(self.error(&path, source)),
        }
    }

    fn remove(&self, id: BlockId) -> Result<()> {
        let path = self.object_path(id);
        match self.block_on(self.store.delete(&path)) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(source) => Err(self.error(&path, source)),
        }
    }

    fn contains(&self, id: BlockId) -> Result<bool> {
        let path = self.object_path(id);
        match self.block_on(self.store.head(&path)) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(source) => Err(self.error(&path, source)),
        }
    }

    fn list(&self) -> Result<Vec<StoredBlock>> {
        let prefix = (!self.prefix.as_ref().is_empty()).then_some(&self.prefix);
        let listed = self.block_on(async {
            self.store
                .list_with_delimiter(prefix)
                .await
                .map(|listing| listing.objects)
        });
        let objects = listed.map_err(|source| self.error(&self.prefix, source))?;
        Ok(objects
            .into_iter()
            .filter_map(|object| {
                let id = object
                    .location
                    .filename()?
                    .strip_suffix(BLOCK_SUFFIX)?
                    .parse::<BlockId>()
                    .ok()?;
                Some(StoredBlock {
                    id,
                    stored_at_ms: object.last_modified.timestamp_millis(),
                    size_bytes: object.size,
                })
            })
            .collect())
    }
}
