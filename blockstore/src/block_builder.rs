//! [`BlockBuilder`]: a block's columns filled one record at a time.
//!
//! [`Block::from_records`] builds through it, and so can a source that decodes its own storage
//! straight into a block (the local log's replay) without making a [`Record`](crate::Record) per
//! record first.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::types::UInt16Type;
use arrow_array::{
    ArrayRef, BinaryArray, DictionaryArray, RecordBatch, StringArray, TimestampMillisecondArray, UInt16Array,
    UInt64Array,
};
use arrow_buffer::{Buffer, OffsetBuffer, ScalarBuffer};
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
    /// The columns as plain vectors, handed to Arrow without a copy by `finish` (Arrow's builders
    /// track a validity bit per value, which a block never has). Sequence suffixes and keys are
    /// gathered as bytes and checked as UTF-8 once, in `finish`.
    shard_keys: Vec<u16>,
    suffixes: ByteColumn,
    sub_sequences: Vec<u64>,
    keys: ByteColumn,
    arrivals: Vec<i64>,
    data: ByteColumn,
}

/// A variable-length column: its values end to end and where each one ends.
#[derive(Debug)]
struct ByteColumn {
    /// `offsets[i]..offsets[i + 1]` are value `i`'s bytes; starts with 0.
    offsets: Vec<i32>,
    values: Vec<u8>,
}

impl ByteColumn {
    fn with_capacity(items: usize, bytes: usize) -> Self {
        let mut offsets = Vec::with_capacity(items + 1);
        offsets.push(0);
        Self {
            offsets,
            values: Vec::with_capacity(bytes),
        }
    }

    /// Appends one value; `false` (and nothing appended) when the column would pass 2 GiB, the
    /// most an `i32` offset reaches.
    #[inline]
    fn push(&mut self, value: &[u8]) -> bool {
        let Ok(end) = i32::try_from(self.values.len() + value.len()) else {
            return false;
        };
        self.values.extend_from_slice(value);
        self.offsets.push(end);
        true
    }

    /// Appends `value` `n` times.
    fn push_n(&mut self, value: &[u8], n: usize) -> bool {
        if i32::try_from(self.values.len() + value.len() * n).is_err() {
            return false;
        }
        self.values.reserve(value.len() * n);
        self.offsets.reserve(n);
        for _ in 0..n {
            self.values.extend_from_slice(value);
            self.offsets.push(self.values.len() as i32);
        }
        true
    }

    /// The last `n` values taken back out.
    fn truncate_last(&mut self, n: usize) {
        let len = self.offsets.len() - n;
        self.offsets.truncate(len);
        self.values.truncate(self.offsets[len - 1] as usize);
    }

    /// The column as Arrow buffers, without copying; values with room to spare give it back.
    fn into_parts(mut self) -> (OffsetBuffer<i32>, Buffer) {
        self.values.shrink_to_fit();
        // The offsets start at 0 and never decrease: `push` only appends ends past the last.
        let offsets = OffsetBuffer::new(ScalarBuffer::from(self.offsets));
        (offsets, Buffer::from_vec(self.values))
    }
}

/// A block column would pass 2 GiB.
fn column_overflow() -> crate::Error {
    ArrowError::OffsetOverflowError(i32::MAX as usize).into()
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
            shard_keys: Vec::with_capacity(n),
            suffixes: ByteColumn::with_capacity(n, capacity.sequence_suffix_bytes),
            sub_sequences: Vec::with_capacity(n),
            keys: ByteColumn::with_capacity(n, capacity.key_bytes),
            arrivals: Vec::with_capacity(n),
            data: ByteColumn::with_capacity(n, capacity.data_bytes),
        }
    }

    /// Appends one record: its shard, the digits of its sequence number after the block's prefix
    /// (the caller checks that the number starts with it), its sub-sequence number, partition key
    /// (UTF-8, checked by [`finish`](Self::finish)), arrival time and payload.
    ///
    /// # Errors
    /// [`Error::Arrow`](crate::Error::Arrow) once a block holds more than 65,536 shards or a
    /// column would pass 2 GiB; nothing is appended then.
    pub fn push(
        &mut self,
        shard_id: &Arc<str>,
        sequence_suffix: &[u8],
        sub_sequence: u64,
        partition_key: &[u8],
        arrival_ms: i64,
        data: &[u8],
    ) -> Result<()> {
        self.push_run(
            shard_id,
            sequence_suffix,
            arrival_ms,
            [(sub_sequence, partition_key, data)],
        )
        .map(drop)
    }

    /// Appends a run of records that share a shard, a sequence number and an arrival time (the
    /// user records of one KPL aggregate): `(sub-sequence number, partition key, payload)` each,
    /// otherwise as [`push`](Self::push). Returns how many were appended.
    ///
    /// # Errors
    /// As [`push`](Self::push); none of the run is appended then.
    pub fn push_run<'a>(
        &mut self,
        shard_id: &Arc<str>,
        sequence_suffix: &[u8],
        arrival_ms: i64,
        records: impl IntoIterator<Item = (u64, &'a [u8], &'a [u8])>,
    ) -> Result<usize> {
        let before = self.sub_sequences.len();
        for (sub_sequence, key, data) in records {
            if !self.keys.push(key) {
                self.take_back(before);
                return Err(column_overflow());
            }
            if !self.data.push(data) {
                self.keys.truncate_last(1);
                self.take_back(before);
                return Err(column_overflow());
            }
            self.sub_sequences.push(sub_sequence);
        }
        let n = self.sub_sequences.len() - before;
        if n == 0 {
            return Ok(0);
        }
        let shard_key = match self.shard_key(shard_id) {
            Ok(key) => key,
            Err(e) => {
                self.take_back(before);
                return Err(e);
            }
        };
        if !self.suffixes.push_n(sequence_suffix, n) {
            self.take_back(before);
            return Err(column_overflow());
        }
        self.shard_keys.resize(before + n, shard_key);
        self.arrivals.resize(before + n, arrival_ms);
        Ok(n)
    }

    /// The dictionary key of `shard_id`, added to the dictionary if new.
    fn shard_key(&mut self, shard_id: &Arc<str>) -> Result<u16> {
        let same = |s: &Arc<str>| Arc::ptr_eq(s, shard_id) || **s == **shard_id;
        if !self.shards.get(self.last_shard).is_some_and(same) {
            self.last_shard = match self.shards.iter().position(same) {
                Some(index) => index,
                None if self.shards.len() > usize::from(u16::MAX) => {
                    return Err(ArrowError::DictionaryKeyOverflowError.into());
                }
                None => {
                    self.shards.push(Arc::clone(shard_id));
                    self.shards.len() - 1
                }
            };
        }
        Ok(self.last_shard as u16)
    }

    /// Takes back the keys, payloads and sub-sequence numbers of the records after the first
    /// `records` (a run that could not be appended whole).
    fn take_back(&mut self, records: usize) {
        let n = self.sub_sequences.len() - records;
        self.keys.truncate_last(n);
        self.data.truncate_last(n);
        self.sub_sequences.truncate(records);
    }

    /// Records pushed so far.
    pub fn len(&self) -> usize {
        self.shard_keys.len()
    }

    /// Whether no record was pushed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The block of the records pushed, with this id and these ranges.
    ///
    /// # Errors
    /// [`Error::Arrow`](crate::Error::Arrow) if a partition key or a sequence suffix is not UTF-8.
    pub fn finish(self, id: BlockId, ranges: SequenceNumberRanges) -> Result<Block> {
        let utf8 = |column: ByteColumn| -> Result<StringArray> {
            let (offsets, values) = column.into_parts();
            Ok(StringArray::try_new(offsets, values, None)?)
        };
        let n = self.len();
        let num_bytes = (self.keys.values.len() + self.data.values.len()) as u64;
        let shard_names = StringArray::from_iter_values(self.shards.iter().map(|s| &**s));
        let shard = DictionaryArray::<UInt16Type>::try_new(UInt16Array::from(self.shard_keys), Arc::new(shard_names))?;
        let (data_offsets, data_values) = self.data.into_parts();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(shard),
            Arc::new(utf8(self.suffixes)?),
            Arc::new(UInt64Array::from(self.sub_sequences)),
            Arc::new(utf8(self.keys)?),
            Arc::new(TimestampMillisecondArray::from(self.arrivals)),
            Arc::new(BinaryArray::try_new(data_offsets, data_values, None)?),
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

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> BlockId {
        BlockId {
            input_id: 0,
            run_id: 0,
            seq: 1,
        }
    }

    #[test]
    fn a_run_builds_what_its_records_pushed_one_by_one_build() {
        let (a, b): (Arc<str>, Arc<str>) = (Arc::from("shard-a"), Arc::from("shard-b"));
        let mut one_by_one = BlockBuilder::new("49", BlockCapacity::default());
        let mut runs = BlockBuilder::new("49", BlockCapacity::default());
        let run: [(u64, &[u8], &[u8]); 3] = [(0, b"k1", b"x"), (1, b"k2", b""), (2, b"k1", b"yz")];
        for (sub, key, data) in run {
            one_by_one.push(&a, b"0007", sub, key, 5, data).unwrap();
        }
        one_by_one.push(&b, b"0009", 0, b"k3", 6, b"w").unwrap();
        assert_eq!(runs.push_run(&a, b"0007", 5, run).unwrap(), 3);
        assert_eq!(runs.push_run(&b, b"0009", 6, [(0, &b"k3"[..], &b"w"[..])]).unwrap(), 1);
        // An empty run appends nothing, and puts no shard in the dictionary.
        assert_eq!(runs.push_run(&Arc::from("shard-c"), b"0010", 7, []).unwrap(), 0);
        let (one_by_one, runs) = (
            one_by_one.finish(id(), SequenceNumberRanges::default()).unwrap(),
            runs.finish(id(), SequenceNumberRanges::default()).unwrap(),
        );
        assert_eq!(runs, one_by_one);
        assert_eq!(runs.meta().num_bytes, 2 + 2 + 2 + 2 + 1 + 2 + 1);
        assert_eq!(runs.records().unwrap()[2].position.to_string(), "490007/2");
    }

    #[test]
    fn keys_that_are_not_utf8_are_refused_by_finish() {
        let mut builder = BlockBuilder::new("", BlockCapacity::default());
        builder.push(&Arc::from("s"), b"1", 0, &[0xff, 0xfe], 0, b"d").unwrap();
        assert!(builder.finish(id(), SequenceNumberRanges::default()).is_err());
    }
}
