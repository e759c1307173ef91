//! [`DiskTier`]: one file per block in a local directory.
//!
//! The design and its invariants are documented on [`DiskTier`].

use std::fs::{self, File};
use std::io::{ErrorKind, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::{Block, BlockId, BlockTier, Error, Result, SharedClock, StoredBlock};

const BLOCK_SUFFIX: &str = ".blk";
const TEMP_SUFFIX: &str = ".tmp";

/// When the disk tier forces written blocks to stable storage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DiskSync {
    /// `fsync` every block file and its directory before a put returns, so a stored block survives
    /// the loss of the machine, not only of the process (the default).
    #[default]
    Always,
    /// Leave flushing to the operating system: a stored block survives the loss of the process
    /// but may be lost with the machine (the replay path then rebuilds it). Faster.
    Never,
}

/// Blocks as files in one directory.
///
/// A block `input-0-…-7` lives in `<dir>/input-0-…-7.blk` and holds exactly
/// [`Block::encode`]'s bytes (format in the [`Block`] docs), so a file alone says which ranges it
/// covers and whether it is intact (CRC32C).
///
/// Writes are atomic: the bytes go to a hidden temporary file in the same directory
/// (`.<name>.<pid>-<n>.tmp`), which is synced (per [`DiskSync`]), stamped with the store clock's
/// time as its modification time, and renamed over the final name; the directory is synced after
/// the rename. A crash leaves either no file, the old file, or the new one — at worst a stray
/// temporary file, which [`DiskTier::open`] deletes. A file damaged any other way (torn by a
/// filesystem without atomic rename, a flipped bit, truncated) fails its checksum and is reported
/// as [`Error::Corrupt`].
///
/// ```
/// use std::sync::Arc;
/// use sluice_blockstore::testing::{sample_block, sample_records};
/// use sluice_blockstore::{BlockTier, DiskSync, DiskTier, SystemClock};
///
/// let dir = tempfile::tempdir()?;
/// let tier = DiskTier::open(dir.path().join("blocks"), Arc::new(SystemClock), DiskSync::Always)?;
/// let block = sample_block(1, &sample_records("shard-0", 0, 10, 100));
/// tier.put(&block)?;
/// assert_eq!(tier.get(block.id())?, Some(block));
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug)]
pub struct DiskTier {
    dir: PathBuf,
    clock: SharedClock,
    sync: DiskSync,
    temp_counter: AtomicU64,
}

impl DiskTier {
    /// Opens (creating it if needed) the block directory `dir` and deletes temporary files left
    /// by interrupted writes. Complete block files from earlier runs are kept.
    ///
    /// # Errors
    /// [`Error::Io`] if the directory cannot be created or read.
    pub fn open(dir: impl Into<PathBuf>, clock: SharedClock, sync: DiskSync) -> Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(|source| Error::Io {
            path: dir.clone(),
            source,
        })?;
        let mut leftovers = 0_usize;
        for entry in read_dir(&dir)? {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with('.') && name.ends_with(TEMP_SUFFIX) {
                let path = entry.path();
                match fs::remove_file(&path) {
                    Ok(()) => leftovers += 1,
                    Err(e) if e.kind() == ErrorKind::NotFound => {}
                    Err(source) => return Err(Error::Io { path, source }),
                }
            }
        }
        if leftovers > 0 {
            tracing::info!(dir = %dir.display(), leftovers, "removed temporary files of interrupted block writes");
        }
        Ok(Self {
            dir,
            clock,
            sync,
            temp_counter: AtomicU64::new(0),
        })
    }

    /// The block directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file that holds (or would hold) block `id`.
    pub fn path_of(&self, id: BlockId) -> PathBuf {
        self.dir.join(format!("{id}{BLOCK_SUFFIX}"))
    }

    fn write_atomically(&self, path: &Path, bytes: &[u8]) -> Result<()> {
        let n = self.temp_counter.fetch_add(1, Ordering::Relaxed);
        let file_name = path
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp = self
            .dir
            .join(format!(".{file_name}.{}-{n}{TEMP_SUFFIX}", std::process::id()));
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        let written = (|| {
            let mut file = File::create_new(&temp).map_err(io(&temp))?;
            file.write_all(bytes).map_err(io(&temp))?;
            let stored_at = UNIX_EPOCH + Duration::from_millis(self.clock.now_ms().max(0) as u64);
            file.set_modified(stored_at).map_err(io(&temp))?;
            if self.sync == DiskSync::Always {
                file.sync_all().map_err(io(&temp))?;
            }
            drop(file);
            fs::rename(&temp, path).map_err(io(path))
        })();
        if written.is_err() {
            // Best effort: a stray temporary file is also removed by the next `open`.
            let _ = fs::remove_file(&temp);
            return written;
        }
        if self.sync == DiskSync::Always {
            File::open(&self.dir)
                .and_then(|d| d.sync_all())
                .map_err(io(&self.dir))?;
        }
        Ok(())
    }
}

fn read_dir(dir: &Path) -> Result<Vec<fs::DirEntry>> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    fs::read_dir(dir).map_err(io)?.map(|e| e.map_err(io)).collect()
}

fn millis_since_epoch(time: SystemTime) -> i64 {
    match time.duration_since(UNIX_EPOCH) {
        Ok(d) => d.as_millis() as i64,
        Err(before) => -(before.duration().as_millis() as i64),
    }
}

/// Decodes a stored copy of `id` and checks it is that block.
pub(crate) fn decode_copy(id: BlockId, bytes: Bytes) -> Result<Block> {
    let block = Block::decode(bytes).map_err(|e| e.for_block(id))?;
    if block.id() != id {
        return Err(Error::Corrupt {
            id: Some(id),
            detail: format!("the copy stored under this name is block {}", block.id()),
        });
    }
    Ok(block)
}

impl BlockTier for DiskTier {
    fn put(&self, block: &Block) -> Result<()> {
        let bytes = block.encode()?;
        self.write_atomically(&self.path_of(block.id()), &bytes)
    }

    fn get(&self, id: BlockId) -> Result<Option<Block>> {
        let path = self.path_of(id);
        match fs::read(&path) {
            Ok(bytes) => decode_copy(id, Bytes::from(bytes)).map(Some),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
            Err(source) => Err(Error::Io { path, source }),
        }
    }

    fn remove(&self, id: BlockId) -> Result<()> {
        let path = self.path_of(id);
        match fs::remove_file(&path) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
            Err(source) => Err(Error::Io { path, source }),
        }
    }

    fn contains(&self, id: BlockId) -> Result<bool> {
        let path = self.path_of(id);
        match fs::metadata(&path) {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == ErrorKind::NotFound => Ok(false),
            Err(source) => Err(Error::Io { path, source }),
        }
    }

    fn list(&self) -> Result<Vec<StoredBlock>> {
        let mut out = Vec::new();
        for entry in read_dir(&self.dir)? {
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(BLOCK_SUFFIX))
                .and_then(|n| n.parse::<BlockId>().ok())
            else {
                continue;
            };
            let metadata = match entry.metadata() {
                Ok(m) => m,
                // Removed between listing and stat: not held any more.
                Err(e) if e.kind() == ErrorKind::NotFound => continue,
                Err(source) => {
                    return Err(Error::Io {
                        path: entry.path(),
                        source,
                    });
                }
            };
            let stored_at_ms = metadata.modified().map_or(0, millis_since_epoch);
            out.push(StoredBlock {
                id,
                stored_at_ms,
                size_bytes: metadata.len(),
            });
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::ManualClock;
    use crate::testing::{sample_block, sample_records};

    #[test]
    fn open_removes_temporary_leftovers_and_keeps_blocks() {
        let dir = tempfile::tempdir().unwrap();
        let clock = Arc::new(ManualClock::new(1_700_000_000_000));
        let tier = DiskTier::open(dir.path(), clock.clone(), DiskSync::Never).unwrap();
        let block = sample_block(1, &sample_records("s", 0, 3, 10));
        tier.put(&block).unwrap();
        let stray = dir.path().join(".input-0-0000000000000001-9.blk.1-0.tmp");
        fs::write(&stray, b"half a block").unwrap();
        drop(tier);
        let tier = DiskTier::open(dir.path(), clock, DiskSync::Never).unwrap();
        assert!(!stray.exists());
        assert_eq!(tier.get(block.id()).unwrap(), Some(block));
        let listed = tier.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            listed[0].stored_at_ms, 1_700_000_000_000,
            "mtime is the injected clock's time"
        );
    }

    #[test]
    fn a_copy_of_another_block_under_this_name_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let tier = DiskTier::open(dir.path(), Arc::new(ManualClock::new(0)), DiskSync::Never).unwrap();
        let a = sample_block(1, &sample_records("s", 0, 3, 10));
        let b = sample_block(2, &sample_records("s", 3, 3, 10));
        tier.put(&a).unwrap();
        fs::copy(tier.path_of(a.id()), tier.path_of(b.id())).unwrap();
        assert!(matches!(tier.get(b.id()), Err(Error::Corrupt { id: Some(id), .. }) if id == b.id()));
    }
}
