//! [`DeadLetterSink`]: records that failed processing, kept with their error for inspection and
//! replay.
//!
//! Same layout and commit protocol as [`crate::ParquetSink`] (one `batch_time=<ms>` directory per
//! batch, parts and a `_SUCCESS-<writer>` marker per writer, re-runs replace), with one part per
//! batch and writer and the schema
//! [`dead_letter_schema`]:
//!
//! | column | type | meaning |
//! |---|---|---|
//! | `batch_time` | Int64 | the batch the record belonged to (ms since epoch) |
//! | `shard_id` | Utf8 | shard it was read from |
//! | `sequence_number` | Utf8 | its sequence number, canonical decimal text (up to 128 digits) |
//! | `sub_sequence` | UInt64 | index inside a KPL aggregate (0 for plain records) |
//! | `partition_key` | Utf8 | producer's partition key |
//! | `data` | Binary | the payload, unchanged |
//! | `error` | Utf8 | the last error, as displayed |
//! | `attempts` | UInt32 | how many times processing was tried |
//! | `stage` | Utf8 | the operator that rejected it (`try_map#2`), or `panic` |

use std::sync::Arc;

use arrow_array::{ArrayRef, BinaryArray, Int64Array, RecordBatch, StringArray, UInt32Array, UInt64Array};
use arrow_schema::{DataType, Field, Schema, SchemaRef};
use sluice_blockstore::Record;

use crate::batch_dir::BatchDirStore;
use crate::{Error, Result};

/// One record that could not be processed, with why and how often it was tried.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeadLetterRow {
    /// The failed record, as read from its shard.
    pub record: Record,
    /// The last error, as displayed.
    pub error: String,
    /// How many times processing was attempted.
    pub attempts: u32,
    /// The operator that rejected it: a fallible operator's stage name (`try_map#2`), or
    /// `panic` for a record isolated after its task kept panicking.
    pub stage: String,
}

/// The Arrow schema of dead-letter files (see the module doc).
pub fn dead_letter_schema() -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("batch_time", DataType::Int64, false),
        Field::new("shard_id", DataType::Utf8, false),
        Field::new("sequence_number", DataType::Utf8, false),
        Field::new("sub_sequence", DataType::UInt64, false),
        Field::new("partition_key", DataType::Utf8, false),
        Field::new("data", DataType::Binary, false),
        Field::new("error", DataType::Utf8, false),
        Field::new("attempts", DataType::UInt32, false),
        Field::new("stage", DataType::Utf8, false),
    ]))
}

/// Converts dead-letter rows of batch `batch_time_ms` into one batch with [`dead_letter_schema`].
///
/// # Errors
/// [`Error::Arrow`] if Arrow rejects the columns (a bug).
pub fn dead_letters_to_record_batch(batch_time_ms: i64, rows: &[DeadLetterRow]) -> Result<RecordBatch> {
    let columns: Vec<ArrayRef> = vec![
        Arc::new(Int64Array::from(vec![batch_time_ms; rows.len()])),
        Arc::new(rows.iter().map(|r| Some(&*r.record.shard_id)).collect::<StringArray>()),
        Arc::new(
            rows.iter()
                .map(|r| Some(r.record.position.sequence.as_str()))
                .collect::<StringArray>(),
        ),
        Arc::new(
            rows.iter()
                .map(|r| Some(r.record.position.sub_sequence))
                .collect::<UInt64Array>(),
        ),
        Arc::new(
            rows.iter()
                .map(|r| Some(&*r.record.partition_key))
                .collect::<StringArray>(),
        ),
        Arc::new(rows.iter().map(|r| Some(&r.record.data[..])).collect::<BinaryArray>()),
        Arc::new(rows.iter().map(|r| Some(r.error.as_str())).collect::<StringArray>()),
        Arc::new(rows.iter().map(|r| Some(r.attempts)).collect::<UInt32Array>()),
        Arc::new(rows.iter().map(|r| Some(r.stage.as_str())).collect::<StringArray>()),
    ];
    RecordBatch::try_new(dead_letter_schema(), columns).map_err(|source| Error::Arrow {
        context: "building a dead-letter batch".to_owned(),
        source,
    })
}

/// Idempotent dead-letter output (layout and schema in the module doc).
///
/// Synchronous like [`crate::ParquetSink`]; call from plain threads.
///
/// ```
/// use sluice_blockstore::{Bytes, Position, Record, SequenceNumber};
/// use sluice_operators::{DeadLetterRow, DeadLetterSink};
/// let sink = DeadLetterSink::open("memory://dead-letter-doc/dlq")?;
/// let record = Record {
///     shard_id: "shardId-000000000000".into(),
///     position: Position::plain(SequenceNumber::from_u128(42)),
///     partition_key: "pk".into(),
///     approximate_arrival_ms: 0,
///     data: Bytes::from_static(b"not json"),
/// };
/// let row = DeadLetterRow {
///     record,
///     error: "expected value at line 1".into(),
///     attempts: 1,
///     stage: "try_map#1".into(),
/// };
/// sink.write_batch(2_000, "worker-1", &[row])?;
/// assert_eq!(DeadLetterSink::read_committed("memory://dead-letter-doc/dlq")?[0].1.num_rows(), 1);
/// # Ok::<(), sluice_operators::Error>(())
/// ```
#[derive(Debug)]
pub struct DeadLetterSink {
    inner: BatchDirStore,
}

impl DeadLetterSink {
    /// Opens a dead-letter sink rooted at `url` (same URL forms as [`crate::ParquetSink::open`]).
    ///
    /// # Errors
    /// As [`crate::ParquetSink::open`].
    pub fn open(url: &str) -> Result<Self> {
        Self::open_with_options(url, &[])
    }

    /// Like [`DeadLetterSink::open`] with explicit store options (see
    /// [`crate::ParquetSink::open_with_options`]).
    ///
    /// # Errors
    /// As [`crate::ParquetSink::open_with_options`].
    pub fn open_with_options(url: &str, options: &[(String, String)]) -> Result<Self> {
        Ok(Self {
            inner: BatchDirStore::open(url, options)?,
        })
    }

    /// The URL this sink was opened with.
    pub fn url(&self) -> &str {
        self.inner.url()
    }

    /// Writes (or replaces) `writer`'s dead letters of batch `batch_time_ms` as one part, then
    /// `_SUCCESS-<writer>`. With no rows, the batch is still committed, with no part.
    ///
    /// # Errors
    /// As [`crate::ParquetSink::write_batch`].
    pub fn write_batch(&self, batch_time_ms: i64, writer: &str, rows: &[DeadLetterRow]) -> Result<()> {
        let batch = dead_letters_to_record_batch(batch_time_ms, rows)?;
        self.inner.write_batch(batch_time_ms, writer, vec![batch])
    }

    /// Reads this sink's committed dead-letter batches, in batch-time order.
    ///
    /// # Errors
    /// As [`crate::ParquetSink::read_committed`].
    pub fn read_all_committed(&self) -> Result<Vec<(i64, RecordBatch)>> {
        self.inner.read_committed()
    }

    /// Reads every committed dead-letter batch under `url`, in batch-time order.
    ///
    /// # Errors
    /// As [`crate::ParquetSink::read_committed`].
    pub fn read_committed(url: &str) -> Result<Vec<(i64, RecordBatch)>> {
        BatchDirStore::open(url, &[])?.read_committed()
    }
}
