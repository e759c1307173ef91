//! [`BlockBuilder`]: a block's columns filled one record at a time.
//!
//! [`Block::from_records`] builds through it, and so can a source that decodes its own storage
//! straight into a block (the local log's replay) without making a [`Record`](crate::Record) per
//! record first.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::builder::{ArrayBuilder, BinaryBuilder, TimestampMillisecondBuilder, UInt16Builder, UInt64Builder};
use arrow_array::types::UInt16Type;
use arrow_array::{ArrayRef, DictionaryArray, RecordBatch, StringArray};
use arrow_schema::{ArrowError, Schema};

use crate::block::SEQUENCE_PREFIX_KEY;
use crate::{Block, BlockId, BlockMeta, Result, SequenceNumberRanges, block_schema};

/// How much a block will hold, so that its columns are allocated once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct BlockCapacity {
    /// Records.
    pub records: usize,
    /// Bytes of the sequence numbers after the block's common prefix, all records together.
    pub sequence_suffix_bytes: usize,
    /// Bytes of the partition keys.
    pub key_bytes: usize,
    /// Bytes of the payloads.
    pub data_bytes: usize,
}

/// The columns of one block, filled record by record; [`finish`](Self::finish) makes the
/// [`Block`]. What it builds is exactly what [`Block::from_records`] builds from the same records
/// with the same sequence prefix.
///
/// ```
/// use std::sync::Arc;
/// use sluice_blockstore::{BlockBuilder, BlockCapacity, BlockId, SequenceNumberRanges};
///
/// let shard: Arc<str> = Arc::from("shard-0");
/// let mut builder = BlockBuilder::new("4959", BlockCapacity::default());
/// builder.push(&shard, b"0001", 0, b"key", 1_000, b"hello")?; // sequence number 49590001
/// builder.push(&shard, b"0001", 1, b"key", 1_000, b"world")?;
/// assert_eq!(builder.len(), 2);
/// let block = builder.finish(BlockId { input_id: 0, run_id: 0, seq: 1 }, SequenceNumberRanges::default())?;
/// let records = block.records()?;
/// assert_eq!(records[1].position.to_string(), "49590001/1");
/// # Ok::<(), sluice_blockstore::Error>(())
/// ```
#[derive(Debug)]
pub struct BlockBuilder {
    prefix: String,
    shards: Vec<Arc<str>>,
    /// Index in `shards` of the last record's shard (records come in runs of one shard).
    last_shard: usize,
    shard_keys: UInt16Builder,
    /// Sequence suffixes and keys are gathered as bytes and checked as UTF-8 once, in `finish`.
    suffixes: BinaryBuilder,
    sub_sequences: UInt64Builder,
    keys: BinaryBuilder,
    arrivals: TimestampMillisecondBuilder,
    data: BinaryBuilder,
}

impl BlockBuilder {
    /// An empty block whose every sequence number starts with `sequence_prefix` (the longer the
    /// common prefix, the smaller the block).
    pub fn new(sequence_prefix: &str, capacity: BlockCapacity) -> Self {
        let n = capacity.records;
        Self {
            prefix: sequence_prefix.to_owned(),
            shards: Vec::new(),
            last_shard: 0,
            shard_keys: UInt16Builder::with_capacity(n),
            suffixes: BinaryBuilder::with_capacity(n, capacity.sequence_suffix_bytes),
            sub_sequences: UInt64Builder::with_capacity(n),
            keys: BinaryBuilder::with_capacity(n, capacity.key_bytes),
            arrivals: TimestampMillisecondBuilder::with_capacity(n),
            data: BinaryBuilder::with_capacity(n, capacity.data_bytes),
        }
    }

    /// Appends one record: its shard, the digits of its sequence number after the block's prefix
    /// (the caller checks that the number starts with it), its sub-sequence number, partition key
    /// (UTF-8, checked by [`finish`](Self::finish)), arrival time and payload.
    ///
    /// # Errors
    /// [`Error::Arrow`](crate::Error::Arrow) once a block holds more than 65,536 shards.
    pub fn push(
        &mut self,
        shard_id: &Arc<str>,
        sequence_suffix: &[u8],
        sub_sequence: u64,
        partition_key: &[u8],
        arrival_ms: i64,
        data: &[u8],
    ) -> Result<()> {
        let same = |s: &Arc<str>| Arc::ptr_eq(s, shard_id) || **s == **shard_id;
        if !self.shards.get(self.last_shard).is_some_and(same) {
            self.last_shard = self.shards.iter().position(same).unwrap_or_else(|| {
                self.shards.push(Arc::clone(shard_id));
                self.shards.len() - 1
            });
        }
        let shard_key = u16::try_from(self.last_shard).map_err(|_| ArrowError::DictionaryKeyOverflowError)?;
        self.shard_keys.append_value(shard_key);
        self.suffixes.append_value(sequence_suffix);
        self.sub_sequences.append_value(sub_sequence);
        self.keys.append_value(partition_key);
        self.arrivals.append_value(arrival_ms);
        self.data.append_value(data);
        Ok(())
    }

    /// Records pushed so far.
    pub fn len(&self) -> usize {
        self.sub_sequences.len()
    }

    /// Whether no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The block of the records pushed, with this id and these ranges.
    ///
    /// # Errors
    /// [`Error::Arrow`](crate::Error::Arrow) if a partition key or a sequence suffix is not UTF-8.
    pub fn finish(mut self, id: BlockId, ranges: SequenceNumberRanges) -> Result<Block> {
        let utf8 = |builder: &mut BinaryBuilder| -> Result<StringArray> {
            let (offsets, values, nulls) = builder.finish().into_parts();
            Ok(StringArray::try_new(offsets, values, nulls)?)
        };
        let n = self.len();
        let num_bytes = (self.keys.values_slice().len() + self.data.values_slice().len()) as u64;
        let shard_names = StringArray::from_iter_values(self.shards.iter().map(|s| &**s));
        let shard = DictionaryArray::<UInt16Type>::try_new(self.shard_keys.finish(), Arc::new(shard_names))?;
        let columns: Vec<ArrayRef> = vec![
            Arc::new(shard),
            Arc::new(utf8(&mut self.suffixes)?),
            Arc::new(self.sub_sequences.finish()),
            Arc::new(utf8(&mut self.keys)?),
            Arc::new(self.arrivals.finish()),
            Arc::new(self.data.finish()),
        ];
        let schema = Schema::new(block_schema().fields().clone())
            .with_metadata(HashMap::from([(SEQUENCE_PREFIX_KEY.to_owned(), self.prefix)]));
        let batch = RecordBatch::try_new(Arc::new(schema), columns)?;
        let meta = BlockMeta {
            id,
            ranges,
            num_records: n as u64,
            num_bytes,
        };
        Block::try_new(meta, batch)
    }
}
