//! Advisory whole-file locks (`flock`) between processes, and atomic file replacement.
//!
//! `flock` locks belong to the open file description, so the operating system releases them when
//! a process dies — a crashed writer never leaves a stale lock behind. Two handles opened by the
//! same process also exclude each other. On platforms without `flock` the locks are no-ops and the
//! single-writer rule is the caller's to keep.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

/// An exclusive lock held for as long as the value lives.
#[derive(Debug)]
pub(crate) struct FileLock {
    _file: File,
}

impl FileLock {
    /// Takes the lock without waiting; `Ok(None)` if another holder has it.
    pub(crate) fn try_exclusive(path: &Path) -> io::Result<Option<Self>> {
        let file = open_lock_file(path)?;
        match lock(&file, false) {
            Ok(()) => Ok(Some(Self { _file: file })),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Takes the lock, waiting for the current holder.
    pub(crate) fn exclusive(path: &Path) -> io::Result<Self> {
        let file = open_lock_file(path)?;
        lock(&file, true)?;
        Ok(Self { _file: file })
    }
}

fn open_lock_file(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).truncate(false).write(true).open(path)
}

#[cfg(unix)]
fn lock(file: &File, wait: bool) -> io::Result<()> {
    use rustix::fs::{FlockOperation, flock};
    let op = if wait {
        FlockOperation::LockExclusive
    } else {
        FlockOperation::NonBlockingLockExclusive
    };
    flock(file, op).map_err(io::Error::from)
}

#[cfg(not(unix))]
fn lock(_file: &File, _wait: bool) -> io::Result<()> {
    Ok(())
}

/// Replaces `path` with `bytes` atomically and durably: write a temporary file beside it, fsync
/// it, rename it over `path`, fsync the directory. Readers see the old or the new content, never
/// a mix. The caller must hold the lock that serialises writers of `path`.
pub(crate) fn replace_file(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut file = File::create(&tmp)?;
        file.write_all(bytes)?;
        file.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    sync_dir(path.parent().unwrap_or_else(|| Path::new(".")))
}

/// Makes a directory's entries (creations, renames, deletions) durable.
pub(crate) fn sync_dir(dir: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        File::open(dir)?.sync_all()
    }
    #[cfg(not(unix))]
    {
        let _ = dir;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_handle_is_refused_until_the_first_is_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("lock");
        let first = FileLock::try_exclusive(&path).unwrap().expect("free");
        assert!(FileLock::try_exclusive(&path).unwrap().is_none());
        drop(first);
        assert!(FileLock::try_exclusive(&path).unwrap().is_some());
    }

    #[test]
    fn replace_is_atomic_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file.json");
        replace_file(&path, b"one").unwrap();
        replace_file(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
