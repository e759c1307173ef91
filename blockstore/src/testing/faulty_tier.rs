//! [`FaultyTier`]: a tier wrapper that injects I/O failures.

use std::io;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::{Block, BlockId, BlockTier, Error, Result, StoredBlock};

/// Wraps a tier and, when told to, fails its operations with an [`Error::Io`] of a chosen kind
/// (e.g. [`io::ErrorKind::StorageFull`] for a full disk, [`io::ErrorKind::ConnectionRefused`] for
/// an unreachable replica). Counts the calls that reach it.
///
/// ```
/// use std::io::ErrorKind;
/// use std::sync::Arc;
/// use sluice_blockstore::testing::{FaultyTier, sample_block, sample_records};
/// use sluice_blockstore::{BlockTier, MemoryTier, SystemClock};
/// let tier = FaultyTier::new(Arc::new(MemoryTier::new(1 << 20, Arc::new(SystemClock))));
/// let block = sample_block(1, &sample_records("shard-0", 0, 3, 10));
/// tier.fail_puts(Some(ErrorKind::StorageFull));
/// assert!(tier.put(&block).unwrap_err().is_retryable());
/// tier.fail_puts(None);
/// tier.put(&block)?;
/// # Ok::<(), sluice_blockstore::Error>(())
/// ```
#[derive(Debug)]
pub struct FaultyTier {
    inner: Arc<dyn BlockTier>,
    faults: Mutex<Faults>,
    puts: AtomicU64,
    gets: AtomicU64,
}

#[derive(Debug, Default, Clone, Copy)]
struct Faults {
    put: Option<io::ErrorKind>,
    get: Option<io::ErrorKind>,
    remove: Option<io::ErrorKind>,
}

impl FaultyTier {
    /// Wraps `inner`, injecting nothing yet.
    pub fn new(inner: Arc<dyn BlockTier>) -> Self {
        Self {
            inner,
            faults: Mutex::new(Faults::default()),
            puts: AtomicU64::new(0),
            gets: AtomicU64::new(0),
        }
    }

    /// Fails `put` with `kind` (`None`: stop failing).
    pub fn fail_puts(&self, kind: Option<io::ErrorKind>) {
        self.faults.lock().expect("faults lock").put = kind;
    }

    /// Fails `get`, `contains` and `list` with `kind` (`None`: stop failing).
    pub fn fail_gets(&self, kind: Option<io::ErrorKind>) {
        self.faults.lock().expect("faults lock").get = kind;
    }

    /// Fails `remove` with `kind` (`None`: stop failing).
    pub fn fail_removes(&self, kind: Option<io::ErrorKind>) {
        self.faults.lock().expect("faults lock").remove = kind;
    }

    /// Fails every operation with `kind`, as an unreachable store would (`None`: heal).
    pub fn fail_everything(&self, kind: Option<io::ErrorKind>) {
        *self.faults.lock().expect("faults lock") = Faults {
            put: kind,
            get: kind,
            remove: kind,
        };
    }

    /// Successful and failed `put` calls so far.
    pub fn puts(&self) -> u64 {
        self.puts.load(Ordering::Relaxed)
    }

    /// Successful and failed `get` calls so far.
    pub fn gets(&self) -> u64 {
        self.gets.load(Ordering::Relaxed)
    }

    fn check(&self, pick: impl Fn(&Faults) -> Option<io::ErrorKind>, operation: &str) -> Result<()> {
        match pick(&self.faults.lock().expect("faults lock")) {
            Some(kind) => Err(Error::Io {
                path: PathBuf::from(format!("<fault injected into {operation}>")),
                source: io::Error::new(kind, "injected by FaultyTier"),
            }),
            None => Ok(()),
        }
    }
}

impl BlockTier for FaultyTier {
    fn put(&self, block: &Block) -> Result<()> {
        self.puts.fetch_add(1, Ordering::Relaxed);
        self.check(|f| f.put, "put")?;
        self.inner.put(block)
    }

    fn get(&self, id: BlockId) -> Result<Option<Block>> {
        self.gets.fetch_add(1, Ordering::Relaxed);
        self.check(|f| f.get, "get")?;
        self.inner.get(id)
    }

    fn remove(&self, id: BlockId) -> Result<()> {
        self.check(|f| f.remove, "remove")?;
        self.inner.remove(id)
    }

    fn contains(&self, id: BlockId) -> Result<bool> {
        self.check(|f| f.get, "contains")?;
        self.inner.contains(id)
    }

    fn list(&self) -> Result<Vec<StoredBlock>> {
        self.check(|f| f.get, "list")?;
        self.inner.list()
    }
}
