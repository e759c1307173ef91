//! [`BlockBuilder`]: a block's columns filled one record at a time.
//!
//! [`Block::from_records`] builds through it, and so can a source that decodes its own storage
//! straight into a block (the local log's replay) without making a [`Record`](crate::Record) per
//! record first.

use std::collections::HashMap;
use std::sync::Arc;

use arrow_array::Array;
use arrow_array::types::UInt16Type;
use arrow_array::{
    ArrayRef, BinaryArray, DictionaryArray, RecordBatch, StringArray, TimestampMillisecondArray, UInt16Array,
    UInt64Array,
};
use arrow_buffer::{Buffer, OffsetBuffer, ScalarBuffer};
use arrow_schema::{ArrowError, DataType, Schema};

use crate::block::SEQUENCE_PREFIX_KEY;
use crate::block::{Layout, block_layout};
use crate::{Block, BlockId, BlockMeta, Result, SequenceNumberRanges};

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
    sub_sequences: SubSequences,
    keys: ByteColumn,
    data: ByteColumn,
    /// Sequence suffixes and arrival times as runs of consecutive records that share them (the
    /// records of one KPL aggregate share both): `finish` stores each column as a dictionary of
    /// its runs when that is smaller, or plain.
    suffixes: Runs<ByteColumn>,
    arrivals: Runs<Vec<i64>>,
}

/// Runs of consecutive records that share a value: each run's value, and the record count at its
/// end.
#[derive(Debug)]
struct Runs<V> {
    values: V,
    ends: Vec<usize>,
}

impl<V> Runs<V> {
    /// Ends the last run at `records` if its value is `same`, else starts a run with `push`.
    fn extend(&mut self, records: usize, same: impl FnOnce(&V) -> bool, push: impl FnOnce(&mut V) -> bool) -> bool {
        match self.ends.last_mut() {
            Some(end) if same(&self.values) => *end = records,
            _ => {
                if !push(&mut self.values) {
                    return false;
                }
                self.ends.push(records);
            }
        }
        true
    }

    /// How many records each run holds, in order.
    fn lengths(&self) -> impl Iterator<Item = usize> + '_ {
        self.ends
            .iter()
            .scan(0, |start, &end| Some(end - std::mem::replace(start, end)))
    }

    /// The dictionary keys of the records (run `r`'s records get key `r`), if every key fits
    /// a `u16` and the dictionary (two bytes a record, `run_bytes` per run) is smaller than the
    /// plain column (`plain_bytes`).
    fn dictionary_keys(&self, run_bytes: usize, plain_bytes: usize) -> Option<UInt16Array> {
        let records = self.ends.last().copied().unwrap_or(0);
        let smaller = 2 * records + run_bytes < plain_bytes;
        if !smaller || self.ends.len() > usize::from(u16::MAX) + 1 {
            return None;
        }
        let mut keys = Vec::with_capacity(records);
        for (run, &end) in self.ends.iter().enumerate() {
            keys.resize(end, run as u16);
        }
        Some(UInt16Array::from(keys))
    }
}

/// The sub-sequence numbers: two bytes each while every one fits a `u16` (a KPL aggregate's
/// indexes do: an aggregate of 64 KiB holds at most ~10k records), eight from the first that does
/// not.
#[derive(Debug)]
enum SubSequences {
    Narrow(Vec<u16>),
    Wide(Vec<u64>),
}

impl SubSequences {
    #[inline]
    fn push(&mut self, sub_sequence: u64) {
        match self {
            Self::Narrow(narrow) => {
                if let Ok(value) = u16::try_from(sub_sequence) {
                    narrow.push(value);
                } else {
                    let mut wide: Vec<u64> = Vec::with_capacity(narrow.capacity());
                    wide.extend(narrow.iter().map(|&v| u64::from(v)));
                    wide.push(sub_sequence);
                    *self = Self::Wide(wide);
                }
            }
            Self::Wide(wide) => wide.push(sub_sequence),
        }
    }

    fn len(&self) -> usize {
        match self {
            Self::Narrow(narrow) => narrow.len(),
            Self::Wide(wide) => wide.len(),
        }
    }

    fn truncate(&mut self, len: usize) {
        match self {
            Self::Narrow(narrow) => narrow.truncate(len),
            Self::Wide(wide) => wide.truncate(len),
        }
    }

    /// The column: `UInt16` or `UInt64`.
    fn into_array(self) -> ArrayRef {
        match self {
            Self::Narrow(narrow) => Arc::new(UInt16Array::from(narrow)),
            Self::Wide(wide) => Arc::new(UInt64Array::from(wide)),
        }
    }
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

    /// The last value.
    fn last(&self) -> Option<&[u8]> {
        let n = self.offsets.len();
        let start = *self.offsets.get(n.checked_sub(2)?)? as usize;
        Some(&self.values[start..])
    }

    /// The last `n` values taken back out.
    fn truncate_last(&mut self, n: usize) {
        let len = self.offsets.len() - n;
        self.offsets.truncate(len);
        self.values.truncate(self.offsets[len - 1] as usize);
    }

    /// The column as Arrow buffers, without copying; a column with room to spare gives it back.
    fn into_parts(mut self) -> (OffsetBuffer<i32>, Buffer) {
        self.offsets.shrink_to_fit();
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
            sub_sequences: SubSequences::Narrow(Vec::with_capacity(n)),
            keys: ByteColumn::with_capacity(n, capacity.key_bytes),
            data: ByteColumn::with_capacity(n, capacity.data_bytes),
            // At most a run per record; usually far fewer, and the room is given back in `finish`.
            suffixes: Runs {
                values: ByteColumn::with_capacity(n, capacity.sequence_suffix_bytes),
                ends: Vec::new(),
            },
            arrivals: Runs {
                values: Vec::new(),
                ends: Vec::new(),
            },
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
        let records = before + n;
        let suffix_pushed = self.suffixes.extend(
            records,
            |runs| runs.last() == Some(sequence_suffix),
            |runs| runs.push(sequence_suffix),
        );
        if !suffix_pushed {
            self.take_back(before);
            return Err(column_overflow());
        }
        self.arrivals.extend(
            records,
            |runs| runs.last() == Some(&arrival_ms),
            |runs| {
                runs.push(arrival_ms);
                true
            },
        );
        self.shard_keys.resize(records, shard_key);
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
        // Each suffix stored once, or once per record (with a 4-byte offset).
        let suffix_bytes = self.suffixes.values.values.len();
        let plain_suffix_bytes = self
            .suffixes
            .lengths()
            .zip(self.suffixes.values.offsets.windows(2))
            .map(|(records, value)| records * (4 + (value[1] - value[0]) as usize))
            .sum();
        let suffix_keys = self
            .suffixes
            .dictionary_keys(suffix_bytes + 4 * self.suffixes.ends.len(), plain_suffix_bytes);
        let suffix: ArrayRef = if let Some(keys) = suffix_keys {
            Arc::new(DictionaryArray::try_new(keys, Arc::new(utf8(self.suffixes.values)?))?)
        } else if self.suffixes.ends.len() == n {
            // A run per record: the runs are the plain column.
            Arc::new(utf8(self.suffixes.values)?)
        } else {
            let mut plain = ByteColumn::with_capacity(n, plain_suffix_bytes - 4 * n);
            let lengths = self.suffixes.lengths();
            for (records, value) in lengths.zip(self.suffixes.values.offsets.windows(2)) {
                let value = &self.suffixes.values.values[value[0] as usize..value[1] as usize];
                if !plain.push_n(value, records) {
                    return Err(column_overflow());
                }
            }
            Arc::new(utf8(plain)?)
        };
        let arrival_keys = self.arrivals.dictionary_keys(8 * self.arrivals.ends.len(), 8 * n);
        let arrival: ArrayRef = if let Some(keys) = arrival_keys {
            let values = TimestampMillisecondArray::from(self.arrivals.values);
            Arc::new(DictionaryArray::try_new(keys, Arc::new(values))?)
        } else {
            let mut plain = Vec::with_capacity(n);
            for (&end, &arrival_ms) in self.arrivals.ends.iter().zip(&self.arrivals.values) {
                plain.resize(end, arrival_ms);
            }
            Arc::new(TimestampMillisecondArray::from(plain))
        };
        let dictionary = |column: &ArrayRef| matches!(column.data_type(), DataType::Dictionary(..));
        let sub_sequence = self.sub_sequences.into_array();
        let layout = block_layout(Layout {
            suffix_dictionary: dictionary(&suffix),
            arrival_dictionary: dictionary(&arrival),
            narrow_sub_sequence: sub_sequence.data_type() == &DataType::UInt16,
        });
        let columns: Vec<ArrayRef> = vec![
            Arc::new(shard),
            suffix,
            sub_sequence,
            Arc::new(utf8(self.keys)?),
            arrival,
            Arc::new(BinaryArray::try_new(data_offsets, data_values, None)?),
        ];
        let schema = Schema::new(layout.fields().clone())
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

    /// Whether a block stores its sequence suffix and arrival columns as dictionaries.
    fn dictionaries(block: &Block) -> (bool, bool) {
        let dictionary = |i: usize| matches!(block.batch().column(i).data_type(), DataType::Dictionary(..));
        (dictionary(1), dictionary(4))
    }

    /// A block of `runs` runs of `per_run` records; each run shares its sequence number, and
    /// arrival times change every `arrival_every` runs.
    fn block_of_runs(runs: usize, per_run: usize, arrival_every: usize) -> Block {
        let shard: Arc<str> = Arc::from("shard-0");
        let mut builder = BlockBuilder::new("4959", BlockCapacity::default());
        for run in 0..runs {
            let suffix = format!("{run:08}");
            let records: Vec<(u64, Vec<u8>, Vec<u8>)> = (0..per_run)
                .map(|sub| {
                    (
                        sub as u64,
                        format!("k{sub}").into_bytes(),
                        format!("{run}/{sub}").into_bytes(),
                    )
                })
                .collect();
            let arrival = 1_000 + (run / arrival_every) as i64;
            let pushed = builder
                .push_run(
                    &shard,
                    suffix.as_bytes(),
                    arrival,
                    records.iter().map(|(s, k, d)| (*s, &k[..], &d[..])),
                )
                .unwrap();
            assert_eq!(pushed, per_run);
        }
        builder.finish(id(), SequenceNumberRanges::default()).unwrap()
    }

    #[test]
    fn records_that_share_sequence_numbers_and_arrival_times_store_them_once_per_run() {
        for (runs, per_run, arrival_every, expected) in [
            // KPL aggregates: both columns as dictionaries of their runs.
            (50, 40, 1, (true, true)),
            // A record per sequence number, arriving in the same milliseconds: only the arrival.
            (2_000, 1, 100, (false, true)),
            // Nothing shared: both plain.
            (2_000, 1, 1, (false, false)),
            // More runs than a u16 key reaches: plain, though the dictionaries would be smaller.
            (70_000, 2, 1, (false, false)),
            (65_536, 2, 1, (true, true)),
        ] {
            let block = block_of_runs(runs, per_run, arrival_every);
            assert_eq!(
                dictionaries(&block),
                expected,
                "{runs} runs of {per_run}, arrival every {arrival_every}"
            );
            let records = block.records().unwrap();
            assert_eq!(records.len(), runs * per_run);
            for (i, record) in records.iter().enumerate().step_by(997) {
                let (run, sub) = (i / per_run, i % per_run);
                assert_eq!(record.position.sequence.as_str(), format!("4959{run:08}"));
                assert_eq!(record.position.sub_sequence, sub as u64);
                assert_eq!(record.approximate_arrival_ms, 1_000 + (run / arrival_every) as i64);
                assert_eq!(&record.data[..], format!("{run}/{sub}").as_bytes());
                assert_eq!(block.record(i).unwrap(), *record);
            }
            // Every layout goes through the codec and back unchanged.
            if runs <= 2_000 {
                assert_eq!(Block::decode(block.encode().unwrap()).unwrap(), block);
            }
        }
        // What a block of aggregates saves: its 2,000 records' suffixes and arrival times take
        // a quarter of the memory they take stored once per record.
        let columns = |block: &Block| -> usize {
            [1, 4]
                .iter()
                .map(|&i| block.batch().column(i).get_array_memory_size())
                .sum()
        };
        let (runs, plain) = (block_of_runs(50, 40, 1), block_of_runs(2_000, 1, 1));
        assert!(
            4 * columns(&runs) < columns(&plain),
            "{} vs {}",
            columns(&runs),
            columns(&plain)
        );
    }

    #[test]
    fn sub_sequences_take_two_bytes_while_they_fit_a_u16() {
        let shard: Arc<str> = Arc::from("s");
        let block_of = |subs: &[u64]| {
            let mut builder = BlockBuilder::new("4959", BlockCapacity::default());
            let records = subs.iter().map(|&sub| (sub, &b"k"[..], &b"d"[..]));
            builder.push_run(&shard, b"01", 7, records).unwrap();
            builder.finish(id(), SequenceNumberRanges::default()).unwrap()
        };
        let narrow = [0, 1, 2, u64::from(u16::MAX)];
        // The first that does not fit widens the column, keeping the ones before it.
        let wide = [0, 1, u64::from(u16::MAX) + 1, 2, u64::MAX];
        for (subs, column_type) in [(&narrow[..], DataType::UInt16), (&wide[..], DataType::UInt64)] {
            let block = block_of(subs);
            assert_eq!(block.batch().column(2).data_type(), &column_type);
            let read: Vec<u64> = block
                .records()
                .unwrap()
                .iter()
                .map(|r| r.position.sub_sequence)
                .collect();
            assert_eq!(read, subs);
            assert_eq!(
                block.record(subs.len() - 1).unwrap().position.sub_sequence,
                subs[subs.len() - 1]
            );
            assert_eq!(Block::decode(block.encode().unwrap()).unwrap(), block);
        }
        // The same records from `Record`s: the same narrow column.
        let records = block_of(&narrow).records().unwrap();
        let again = Block::from_records(id(), SequenceNumberRanges::default(), &records).unwrap();
        assert_eq!(again.batch().column(2).data_type(), &DataType::UInt16);
        assert_eq!(again.records().unwrap(), records);
    }

    #[test]
    fn keys_that_are_not_utf8_are_refused_by_finish() {
        let mut builder = BlockBuilder::new("", BlockCapacity::default());
        builder.push(&Arc::from("s"), b"1", 0, &[0xff, 0xfe], 0, b"d").unwrap();
        assert!(builder.finish(id(), SequenceNumberRanges::default()).is_err());
    }
}
