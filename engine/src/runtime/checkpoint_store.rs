//! [`CheckpointStore`]: the files of the checkpoint location (metadata log, state snapshots).
//!
//! The checkpoint location is a local directory or an object-store URL. Local writes are atomic
//! and durable (temp file, fsync, rename, fsync of the directory), so a `kill -9` or a power cut
//! leaves either the old or the new file. Object-store writes are single PUTs, atomic by nature.
//! Create-only writes are atomic too — a hard link locally, a conditional put (`If-None-Match`)
//! on object stores — so two processes racing for one name get exactly one winner: the metadata
//! log's claims and fencing rest on this.

use std::collections::HashMap;
use std::fmt;
use std::fs;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, PutMode, PutOptions, PutPayload};

use crate::{Error, Result};

/// A named-file store rooted at a checkpoint location.
#[derive(Clone)]
pub struct CheckpointStore {
    backend: Backend,
}

#[derive(Clone)]
enum Backend {
    Local(PathBuf),
    Object {
        store: Arc<dyn ObjectStore>,
        prefix: ObjectPath,
        runtime: Arc<tokio::runtime::Runtime>,
    },
}

impl fmt::Debug for CheckpointStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.location())
    }
}

/// Distinguishes the temp files of concurrent writers in one process.
static NEXT_TEMP: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

fn io(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> Error {
    let path = path.into();
    move |source| Error::Io { path, source }
}

impl CheckpointStore {
    /// A store in a local directory (created if missing).
    ///
    /// # Errors
    /// [`Error::Io`] if the directory cannot be created.
    pub fn local(dir: impl Into<PathBuf>) -> Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io(&dir))?;
        Ok(Self {
            backend: Backend::Local(dir),
        })
    }

    /// A store on an object store under `prefix`.
    ///
    /// # Errors
    /// [`Error::Internal`] if the I/O runtime cannot be started.
    pub fn object_store(store: Arc<dyn ObjectStore>, prefix: ObjectPath) -> Result<Self> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Internal(format!("cannot start the checkpoint I/O runtime: {e}")))?;
        Ok(Self {
            backend: Backend::Object {
                store,
                prefix,
                runtime: Arc::new(runtime),
            },
        })
    }

    /// A printable location.
    pub fn location(&self) -> String {
        match &self.backend {
            Backend::Local(dir) => dir.display().to_string(),
            Backend::Object { store, prefix, .. } => format!("{store}/{prefix}"),
        }
    }

    /// The store for a sub-directory.
    #[must_use]
    pub fn child(&self, name: &str) -> Self {
        let backend = match &self.backend {
            Backend::Local(dir) => Backend::Local(dir.join(name)),
            Backend::Object { store, prefix, runtime } => Backend::Object {
                store: store.clone(),
                prefix: prefix.child(name),
                runtime: runtime.clone(),
            },
        };
        Self { backend }
    }

    fn put(&self, name: &str, bytes: &[u8], create_only: bool) -> Result<()> {
        match &self.backend {
            Backend::Local(dir) => {
                fs::create_dir_all(dir).map_err(io(dir))?;
                let path = dir.join(name);
                // A temp name no other writer uses: several processes may share the directory.
                let tmp = dir.join(format!(
                    ".{name}.{}-{}.tmp",
                    std::process::id(),
                    NEXT_TEMP.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                ));
                let written = (|| {
                    let mut file = fs::File::create(&tmp).map_err(io(&tmp))?;
                    file.write_all(bytes).map_err(io(&tmp))?;
                    file.sync_all().map_err(io(&tmp))?;
                    drop(file);
                    if create_only {
                        // `link` fails if the name exists: an atomic create-only, unlike a check
                        // followed by a rename.
                        fs::hard_link(&tmp, &path).map_err(|e| {
                            if e.kind() == std::io::ErrorKind::AlreadyExists {
                                Error::AlreadyExists {
                                    location: path.display().to_string(),
                                }
                            } else {
                                io(&path)(e)
                            }
                        })
                    } else {
                        fs::rename(&tmp, &path).map_err(io(&path))
                    }
                })();
                if create_only || written.is_err() {
                    let _ignored = fs::remove_file(&tmp);
                }
                written?;
                fs::File::open(dir).and_then(|d| d.sync_all()).map_err(io(dir))?;
                Ok(())
            }
            Backend::Object { store, prefix, runtime } => {
                let path = prefix.child(name);
                let mode = if create_only {
                    PutMode::Create
                } else {
                    PutMode::Overwrite
                };
                let opts = PutOptions {
                    mode,
                    ..PutOptions::default()
                };
                let payload = PutPayload::from(bytes.to_vec());
                runtime
                    .block_on(store.put_opts(&path, payload, opts))
                    .map_err(|source| match source {
                        object_store::Error::AlreadyExists { .. } => Error::AlreadyExists {
                            location: path.to_string(),
                        },
                        source => Error::ObjectStore {
                            location: path.to_string(),
                            source,
                        },
                    })?;
                Ok(())
            }
        }
    }

    /// Writes a new file; fails with [`Error::AlreadyExists`] if it exists.
    ///
    /// # Errors
    /// Storage errors.
    pub fn put_new(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.put(name, bytes, true)
    }

    /// Writes a file, replacing any previous version atomically.
    ///
    /// # Errors
    /// Storage errors.
    pub fn put_replace(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.put(name, bytes, false)
    }

    /// Reads a file.
    ///
    /// # Errors
    /// Storage errors (including not found).
    pub fn get(&self, name: &str) -> Result<Vec<u8>> {
        match &self.backend {
            Backend::Local(dir) => {
                let path = dir.join(name);
                fs::read(&path).map_err(io(path))
            }
            Backend::Object { store, prefix, runtime } => {
                let path = prefix.child(name);
                runtime
                    .block_on(async { store.get(&path).await?.bytes().await })
                    .map(|b| b.to_vec())
                    .map_err(|source| Error::ObjectStore {
                        location: path.to_string(),
                        source,
                    })
            }
        }
    }

    /// Reads a file, or `None` if it does not exist.
    ///
    /// # Errors
    /// Storage errors other than not found.
    pub fn get_if_exists(&self, name: &str) -> Result<Option<Vec<u8>>> {
        match self.get(name) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(Error::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(Error::ObjectStore {
                source: object_store::Error::NotFound { .. },
                ..
            }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Names of the files directly in this store (temp files excluded), unsorted.
    ///
    /// # Errors
    /// Storage errors.
    pub fn list(&self) -> Result<Vec<String>> {
        match &self.backend {
            Backend::Local(dir) => {
                let entries = match fs::read_dir(dir) {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(io(dir)(e)),
                };
                let mut names = Vec::new();
                for entry in entries {
                    let entry = entry.map_err(io(dir))?;
                    if entry.file_type().map_err(io(entry.path()))?.is_file()
                        && let Some(name) = entry.file_name().to_str()
                        && !name.starts_with('.')
                    {
                        names.push(name.to_owned());
                    }
                }
                Ok(names)
            }
            Backend::Object { store, prefix, runtime } => runtime
                .block_on(async { store.list_with_delimiter(Some(prefix)).await })
                .map(|listing| {
                    listing
                        .objects
                        .into_iter()
                        .filter_map(|o| o.location.filename().map(str::to_owned))
                        .collect()
                })
                .map_err(|source| Error::ObjectStore {
                    location: prefix.to_string(),
                    source,
                }),
        }
    }

    /// Deletes a file; deleting a missing file is not an error.
    ///
    /// # Errors
    /// Storage errors.
    pub fn delete(&self, name: &str) -> Result<()> {
        match &self.backend {
            Backend::Local(dir) => {
                let path = dir.join(name);
                match fs::remove_file(&path) {
                    Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
                    _ => Ok(()),
                }
            }
            Backend::Object { store, prefix, runtime } => {
                let path = prefix.child(name);
                match runtime.block_on(store.delete(&path)) {
                    Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                    Err(source) => Err(Error::ObjectStore {
                        location: path.to_string(),
                        source,
                    }),
                }
            }
        }
    }

    #[cfg(feature = "testing")] // only `sluice_engine::internals` (tests) calls it
    /// Deletes every file under this store recursively (object stores) or the directory (local).
    ///
    /// # Errors
    /// Storage errors.
    pub fn delete_all(&self) -> Result<()> {
        match &self.backend {
            Backend::Local(dir) => match fs::remove_dir_all(dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(dir)(e)),
                _ => Ok(()),
            },
            Backend::Object { store, prefix, runtime } => runtime
                .block_on(async {
                    use futures::TryStreamExt;
                    let paths: Vec<_> = store.list(Some(prefix)).map_ok(|o| o.location).try_collect().await?;
                    for p in paths {
                        store.delete(&p).await?;
                    }
                    Ok(())
                })
                .map_err(|source| Error::ObjectStore {
                    location: prefix.to_string(),
                    source,
                }),
        }
    }
}

/// Opens the checkpoint location: a local path or an object-store URL.
pub(crate) fn open(location: &str) -> Result<CheckpointStore> {
    if location.contains("://") && !location.starts_with("file://") {
        let (store, prefix) = sluice_blockstore::object_store_from_url(location, &HashMap::new())?;
        CheckpointStore::object_store(store, prefix)
    } else {
        CheckpointStore::local(location.trim_start_matches("file://"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn racing_create_only_writes_have_one_winner() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::local(dir.path()).unwrap();
        for round in 0..20 {
            let name = format!("entry-{round}");
            let wins = std::thread::scope(|s| {
                let handles: Vec<_> = (0..4)
                    .map(|i| {
                        let (store, name) = (&store, &name);
                        s.spawn(move || store.put_new(name, format!("writer {i}").as_bytes()).is_ok())
                    })
                    .collect();
                handles
                    .into_iter()
                    .map(|h| h.join().expect("writer thread"))
                    .filter(|won| *won)
                    .count()
            });
            assert_eq!(wins, 1, "round {round}");
            assert!(store.get(&name).unwrap().starts_with(b"writer "));
        }
        assert!(matches!(
            store.put_new("entry-0", b"again"),
            Err(Error::AlreadyExists { .. })
        ));
        assert_eq!(store.get_if_exists("missing").unwrap(), None);
        // No temp files are left behind.
        assert_eq!(store.list().unwrap().len(), 20);
    }
}
