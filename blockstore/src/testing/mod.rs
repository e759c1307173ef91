//! Test doubles for this crate's tests and for downstream crates (feature `testing`).
//!
//! - [`MemoryReplay`]: an in-memory [`Replay`](crate::Replay) that serves ranges exactly per the
//!   contract and can be told to throttle, fail transiently, or report expired data;
//! - [`FaultyTier`]: a [`BlockTier`](crate::BlockTier) wrapper that injects I/O failures (a full
//!   disk, an unreachable replica);
//! - [`AutoAdvanceClock`]: a [`Clock`](crate::Clock) whose sleeps return at once by jumping
//!   virtual time forward (like tokio's paused time), so retry loops run instantly and
//!   deterministically;
//! - data generators ([`sample_records`], [`sample_block`], [`ranges_of`]) shared by tests and
//!   benchmarks.

mod auto_clock;
mod faulty_tier;
mod memory_replay;
mod sample_data;

pub use auto_clock::AutoAdvanceClock;
pub use faulty_tier::FaultyTier;
pub use memory_replay::{InjectedFailure, MemoryReplay};
pub use sample_data::{SAMPLE_STREAM, ranges_of, sample_block, sample_block_id, sample_records};
