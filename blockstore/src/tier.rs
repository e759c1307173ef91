//! [`BlockTier`]: one place a copy of a block can live (memory, local disk, object-store replica).
//!
//! The [`BlockStore`](crate::BlockStore) composes three tiers; every tier implementation passes the
//! same conformance suite (`blockstore/tests/tier_conformance.rs`), so the store can rely on the
//! contract below and nothing more.

use std::fmt;

use crate::{Block, BlockId, Result};

/// A stored copy as a tier lists it: enough to decide what to clean up without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct StoredBlock {
    /// The block's id.
    pub id: BlockId,
    /// When the copy was written, in milliseconds since the Unix epoch, by the tier's clock: the
    /// memory and disk tiers use the store's injected [`Clock`](crate::Clock) (the disk tier
    /// writes it as the file's modification time), the replica tier the object store's
    /// last-modified time.
    pub stored_at_ms: i64,
    /// Bytes the copy occupies in the tier (encoded size on disk and in the replica, charged
    /// memory in the memory tier).
    pub size_bytes: u64,
}

/// One storage tier of the block store.
///
/// # Contract
///
/// Implementors guarantee:
/// - **Atomic puts.** After `put(block)` returns `Ok`, `get(block.id())` returns a copy equal to
///   `block` (until it is removed or, for the bounded memory tier, evicted). A failed or
///   interrupted put leaves either no copy or the previous complete copy — never a partial one
///   that decodes (local files are written to a temporary name, synced and renamed; object stores
///   use create-only puts).
/// - **Immutable ids.** A block id names one content forever, so putting an id that already
///   exists succeeds without changing the stored copy (an object store answering
///   `AlreadyExists` to a create-only put is a success).
/// - **Verified reads.** `get` returns `Ok(None)` when the tier holds no copy, and
///   `Err(Error::Corrupt { id: Some(id), .. })` when the copy it holds fails its checksum or
///   cannot be decoded (a torn file, a flipped bit, a copy of another block under this name). A
///   corrupt copy is never returned as a block. Other errors (`Io`, `ObjectStore`) mean the tier
///   could not answer; [`Error::is_retryable`](crate::Error::is_retryable) says whether trying
///   again may help.
/// - **Idempotent removal.** `remove` of an absent id is `Ok`.
/// - **Listing.** `list` returns every id the tier holds a copy of (corrupt ones included: their
///   names are what cleanup needs), each once, in no particular order.
/// - Methods take `&self` and may be called concurrently from many threads. They block the
///   calling thread until the operation is done; they must not be called from inside an async
///   task that cannot block (the replica tier copes, see [`ReplicaTier`](crate::ReplicaTier)).
///
/// Callers may assume nothing about ordering between tiers: the store writes the durable tiers
/// before it reports a put as done.
///
/// Dropping a tier releases its resources; copies it wrote stay where they are (disk and replica
/// copies survive a restart by design).
pub trait BlockTier: Send + Sync + fmt::Debug {
    /// Stores `block`, atomically.
    ///
    /// # Errors
    /// `Io` / `ObjectStore` if the copy cannot be written (disk full, replica unreachable);
    /// `Arrow` if the block cannot be encoded; `TooLargeForMemory` from the memory tier.
    fn put(&self, block: &Block) -> Result<()>;

    /// The stored copy of `id`, verified; `Ok(None)` if there is none.
    ///
    /// # Errors
    /// `Corrupt` for a copy that fails verification; `Io` / `ObjectStore` if the tier cannot be
    /// read.
    fn get(&self, id: BlockId) -> Result<Option<Block>>;

    /// Removes the copy of `id`, if any.
    ///
    /// # Errors
    /// `Io` / `ObjectStore` if the copy exists but cannot be removed.
    fn remove(&self, id: BlockId) -> Result<()>;

    /// Whether the tier holds a copy of `id` (not verified: a corrupt copy counts).
    ///
    /// # Errors
    /// `Io` / `ObjectStore` if the tier cannot be asked.
    fn contains(&self, id: BlockId) -> Result<bool>;

    /// Every copy the tier holds.
    ///
    /// # Errors
    /// `Io` / `ObjectStore` if the tier cannot be listed.
    fn list(&self) -> Result<Vec<StoredBlock>>;
}
