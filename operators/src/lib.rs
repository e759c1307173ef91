//! # sluice-operators
//!
//! The per-batch side of Sluice: what a batch's records turn into and where they end up.
//!
//! It owns:
//! - [`shuffle`]: the keyed-shuffle kernels (map-side combining with a [`shuffle::Combiner`], hash
//!   partitioning, the merge after the shuffle) that the engine's keyed operators run in their
//!   tasks;
//! - [`window`] and [`state`]: the kernels of windowed reductions (reduce a window, slide it with
//!   an inverse function) and of `update_state_by_key` (one partition's step);
//! - [`ParquetSink`]: idempotent, batch-partitioned Parquet output on a local directory,
//!   `memory://` or S3 (`batch_time=<ms>/part-<writer>-<i>.parquet` + `_SUCCESS-<writer>` written
//!   last, re-runs replace only their writer's files), which is what makes Parquet output
//!   exactly-once, with several workers writing to one location;
//! - [`ToRecordBatch`]: how row types become Arrow;
//! - [`ByteKey`]: the byte-string key of a borrowed-key combine, inline when short;
//! - [`DeadLetterSink`] and [`DeadLetterRow`]: records that failed processing, with their error;
//! - [`bench_data`]: the deterministic Zipf text generator shared by examples, tests and benches.
//!
//! It builds on `sluice-blockstore`'s data model only. It must never know about receivers,
//! sources, the job scheduler or checkpoints: only `engine` wires those to operators.

mod batch_dir;
pub mod bench_data;
mod byte_key;
mod dead_letter;
mod error;
mod parquet_sink;
pub mod shuffle;
pub mod state;
mod to_record_batch;
pub mod window;

pub use byte_key::ByteKey;
pub use dead_letter::{DeadLetterRow, DeadLetterSink, dead_letter_schema, dead_letters_to_record_batch};
pub use error::{Error, Result};
pub use parquet_sink::{
    BATCH_DIR_PREFIX, PART_PREFIX, ParquetSink, SUCCESS_MARKER, batch_dir_name, part_file_name, success_marker_name,
};
pub use to_record_batch::ToRecordBatch;
