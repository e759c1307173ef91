//! Blocks: [`BlockId`], [`BlockMeta`] and [`Block`], and their checksummed on-disk form.
//!
//! The payload schema and the encoded form are documented on [`Block`].

use std::fmt;
use std::str::FromStr;
use std::sync::{Arc, LazyLock};

use arrow_array::cast::AsArray;
use arrow_array::types::{TimestampMillisecondType, UInt16Type, UInt64Type};
use arrow_array::{Array, BinaryArray, RecordBatch, StringArray};
use arrow_buffer::Buffer;
use arrow_data::ArrayData;
use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use bytes::{BufMut, Bytes, BytesMut};
use serde::{Deserialize, Serialize};

use crate::{BlockBuilder, BlockCapacity, Error, Position, Record, Result, SequenceNumber, SequenceNumberRanges};

const MAGIC: &[u8; 8] = b"SLUICEB1";
const ALIGNMENT: usize = 64;

/// Identifies a block: which input stream produced it, in which run, and its number in that run.
///
/// The run id keeps ids of different incarnations of the application apart, so a restarted
/// process never confuses its new blocks with copies left over from a previous run.
///
/// ```
/// use sluice_blockstore::BlockId;
/// let id = BlockId { input_id: 0, run_id: 0x1f, seq: 42 };
/// assert_eq!(id.to_string(), "input-0-000000000000001f-42");
/// assert_eq!(id.to_string().parse::<BlockId>()?, id);
/// # Ok::<(), sluice_blockstore::Error>(())
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct BlockId {
    /// The input stream (receiver) that produced the block.
    pub input_id: u32,
    /// The run (application incarnation) that produced the block.
    pub run_id: u64,
    /// The block's number within the run, increasing.
    pub seq: u64,
}

impl fmt::Display for BlockId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "input-{}-{:016x}-{}", self.input_id, self.run_id, self.seq)
    }
}

impl FromStr for BlockId {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad = || Error::InvalidBlockId { text: s.to_owned() };
        let rest = s.strip_prefix("input-").ok_or_else(bad)?;
        let mut parts = rest.splitn(3, '-');
        let input_id = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        let run_id = parts
            .next()
            .and_then(|p| u64::from_str_radix(p, 16).ok())
            .ok_or_else(bad)?;
        let seq = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
        Ok(Self { input_id, run_id, seq })
    }
}

/// What the engine knows about a block without reading it: its id, lineage and size.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockMeta {
    /// The block's id.
    pub id: BlockId,
    /// The source ranges its records came from.
    pub ranges: SequenceNumberRanges,
    /// Number of records.
    pub num_records: u64,
    /// Payload bytes (record data plus partition keys), the unit of memory budgets.
    pub num_bytes: u64,
}

/// An immutable block: its [`BlockMeta`] and its records as an Arrow [`RecordBatch`].
///
/// A block's payload is an Arrow [`RecordBatch`] with the schema of [`block_schema`]:
///
/// | column | type | |
/// |---|---|---|
/// | `shard_id` | `Dictionary(UInt16, Utf8)` | shard the record came from (each shard's id stored once) |
/// | `sequence_suffix` | `Utf8` or `Dictionary(UInt16, Utf8)` | the record's canonical decimal sequence number without the block's common prefix |
/// | `sub_sequence` | `UInt16` or `UInt64` | index inside a KPL aggregate, 0 for plain records |
/// | `partition_key` | `Utf8` | producer's partition key |
/// | `approximate_arrival` | `Timestamp(ms)` or `Dictionary(UInt16, Timestamp(ms))` | when the service accepted the record |
/// | `data` | `Binary` | payload |
///
/// The prefix that every sequence number of the block shares is the schema's
/// `sluice.sequence_prefix` metadata: consecutive sequence numbers of a shard differ only in their
/// last digits, so a 56-digit number costs a few bytes instead of 60 (with the shard's id once
/// per block, a 100-byte record takes ~150 bytes of block instead of ~215, and the store's memory
/// budget holds that many more records).
///
/// The records of a KPL aggregate share their sequence number and arrival time, so
/// `sequence_suffix` and `approximate_arrival` are each stored as `Dictionary(UInt16, _)` of
/// their runs of consecutive records (one value per run, a 2-byte key per record) when that is
/// smaller than the plain column; [`BlockBuilder`] decides per block and column. `sub_sequence` is
/// `UInt16` when every sub-sequence number of the block fits one (2 bytes a record instead of 8;
/// always, for the local log's aggregates), else `UInt64`. A 100-byte record of an aggregate then
/// takes ~123 bytes of block. Blocks written with the first layout
/// (`shard_id` as `Utf8`, whole numbers in a `sequence_number` column) are still read.
///
/// # Encoded form
///
/// ```text
/// "SLUICEB1"            8 bytes magic (format version 1)
/// meta_len: u32 LE      length of the JSON BlockMeta that follows
/// meta: JSON            BlockMeta (id, ranges, num_records, num_bytes)
/// padding               zeros up to a 64-byte boundary, so Arrow buffers stay aligned
/// Arrow IPC stream      schema, shard-id dictionary, one record batch, end-of-stream marker
/// crc32c: u32 LE        CRC-32C (Castagnoli) of every byte before it
/// ```
///
/// The disk tier and the replica tier store exactly these bytes, so a block file alone says which
/// ranges it covers. [`Block::decode`] checks the CRC before it parses anything and decodes the
/// Arrow buffers without copying them.
///
/// Cloning is cheap: the Arrow buffers are shared.
#[derive(Debug, Clone, PartialEq)]
pub struct Block {
    meta: BlockMeta,
    batch: RecordBatch,
}

/// The schema metadata key of the sequence numbers' common prefix.
pub(crate) const SEQUENCE_PREFIX_KEY: &str = "sluice.sequence_prefix";

/// A block schema's fields, with the shard, sequence, sub-sequence and arrival columns of one
/// layout.
fn layout(shard: DataType, sequence: (&str, DataType), sub_sequence: DataType, arrival: DataType) -> SchemaRef {
    Arc::new(Schema::new(vec![
        Field::new("shard_id", shard, false),
        Field::new(sequence.0, sequence.1, false),
        Field::new("sub_sequence", sub_sequence, false),
        Field::new("partition_key", DataType::Utf8, false),
        Field::new("approximate_arrival", arrival, false),
        Field::new("data", DataType::Binary, false),
    ]))
}

/// `Dictionary(UInt16, values)`.
fn dictionary_of(values: DataType) -> DataType {
    DataType::Dictionary(Box::new(DataType::UInt16), Box::new(values))
}

/// The arrival column's plain type.
const ARRIVAL: DataType = DataType::Timestamp(TimeUnit::Millisecond, None);

/// Which form each of a block's compactable columns takes (the current layout; see [`Block`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Layout {
    /// `sequence_suffix` is `Dictionary(UInt16, Utf8)` rather than `Utf8`.
    pub suffix_dictionary: bool,
    /// `approximate_arrival` is `Dictionary(UInt16, Timestamp(ms))` rather than `Timestamp(ms)`.
    pub arrival_dictionary: bool,
    /// `sub_sequence` is `UInt16` rather than `UInt64`.
    pub narrow_sub_sequence: bool,
}

impl Layout {
    /// The layout at `index` (the inverse of [`Layout::index`]).
    fn at(index: usize) -> Self {
        Self {
            suffix_dictionary: index & 4 != 0,
            arrival_dictionary: index & 2 != 0,
            narrow_sub_sequence: index & 1 != 0,
        }
    }

    fn index(self) -> usize {
        usize::from(self.suffix_dictionary) * 4
            + usize::from(self.arrival_dictionary) * 2
            + usize::from(self.narrow_sub_sequence)
    }

    fn schema(self) -> SchemaRef {
        let suffix = if self.suffix_dictionary {
            dictionary_of(DataType::Utf8)
        } else {
            DataType::Utf8
        };
        let arrival = if self.arrival_dictionary {
            dictionary_of(ARRIVAL)
        } else {
            ARRIVAL
        };
        let sub_sequence = if self.narrow_sub_sequence {
            DataType::UInt16
        } else {
            DataType::UInt64
        };
        layout(
            dictionary_of(DataType::Utf8),
            ("sequence_suffix", suffix),
            sub_sequence,
            arrival,
        )
    }
}

/// The schema of every current layout, indexed by [`Layout::index`].
static LAYOUTS: LazyLock<[SchemaRef; 8]> = LazyLock::new(|| std::array::from_fn(|i| Layout::at(i).schema()));

/// The block schema of `layout`.
pub(crate) fn block_layout(layout: Layout) -> SchemaRef {
    LAYOUTS[layout.index()].clone()
}

/// The first layout: a shard id and a whole sequence number per record. Read, never written.
static SCHEMA_V1: LazyLock<SchemaRef> = LazyLock::new(|| {
    layout(
        DataType::Utf8,
        ("sequence_number", DataType::Utf8),
        DataType::UInt64,
        ARRIVAL,
    )
});

/// The Arrow schema of a block's payload with every column plain (its fields; each block's schema
/// also carries its sequence prefix as metadata). A block's `sequence_suffix` and
/// `approximate_arrival` columns may each be `Dictionary(UInt16, _)` instead, and its
/// `sub_sequence` `UInt16` (see [`Block`]).
pub fn block_schema() -> SchemaRef {
    block_layout(Layout {
        suffix_dictionary: false,
        arrival_dictionary: false,
        narrow_sub_sequence: false,
    })
}

/// The length of the longest common prefix of `a` and `b`, on a `char` boundary of both.
fn common_prefix_len(a: &str, b: &str) -> usize {
    let mut n = a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count();
    while !a.is_char_boundary(n) {
        n -= 1;
    }
    n
}

impl Block {
    /// Builds a block from records and the ranges they cover.
    ///
    /// The records are read twice: once for the columns' sizes and the sequence numbers' common
    /// prefix, once to fill the columns, a run at a time. Consecutive records that share their
    /// sequence number's allocation (the user records of one aggregate, as a reader decodes
    /// them), their shard and their arrival time are one run: their sequence number is compared
    /// with the prefix, and their shard and suffix looked up, once for the run.
    ///
    /// # Errors
    /// [`Error::Arrow`] if Arrow rejects the arrays (it does not for well-formed records).
    pub fn from_records(id: BlockId, ranges: SequenceNumberRanges, records: &[Record]) -> Result<Self> {
        let (mut data_len, mut key_len, mut sequence_len) = (0, 0, 0);
        let mut prefix: Option<&str> = None;
        let mut last_sequence: Option<&SequenceNumber> = None;
        for r in records {
            data_len += r.data.len();
            key_len += r.partition_key.len();
            let sequence = &r.position.sequence;
            sequence_len += sequence.as_str().len();
            if last_sequence.is_some_and(|last| last.is_clone_of(sequence)) {
                continue;
            }
            last_sequence = Some(sequence);
            let digits = sequence.as_str();
            prefix = Some(match prefix {
                Some(prefix) if digits.starts_with(prefix) => prefix,
                Some(prefix) => &prefix[..common_prefix_len(prefix, digits)],
                None => digits,
            });
        }
        let prefix = prefix.unwrap_or("");
        let mut builder = BlockBuilder::new(
            prefix,
            BlockCapacity {
                records: records.len(),
                sequence_suffix_bytes: sequence_len - records.len() * prefix.len(),
                key_bytes: key_len,
                data_bytes: data_len,
            },
        );
        let same_run = |a: &Record, b: &Record| {
            a.position.sequence.is_clone_of(&b.position.sequence)
                && Arc::ptr_eq(&a.shard_id, &b.shard_id)
                && a.approximate_arrival_ms == b.approximate_arrival_ms
        };
        let mut rest = records;
        while let Some(head) = rest.first() {
            let (run, after) = rest.split_at(rest.iter().take_while(|r| same_run(head, r)).count());
            builder.push_run(
                &head.shard_id,
                &head.position.sequence.as_str().as_bytes()[prefix.len()..],
                head.approximate_arrival_ms,
                run.iter()
                    .map(|r| (r.position.sub_sequence, r.partition_key.as_bytes(), &r.data[..])),
            )?;
            rest = after;
        }
        builder.finish(id, ranges)
    }

    /// Wraps an existing batch; the batch must have [`block_schema`] (any of its layouts).
    ///
    /// # Errors
    /// [`Error::Corrupt`] if the schema or the record count disagrees with `meta`.
    pub fn try_new(meta: BlockMeta, batch: RecordBatch) -> Result<Self> {
        let fields = batch.schema_ref().fields();
        if !LAYOUTS
            .iter()
            .chain([&*SCHEMA_V1])
            .any(|layout| layout.fields() == fields)
        {
            return Err(Error::Corrupt {
                id: Some(meta.id),
                detail: "payload schema is not the block schema".into(),
            });
        }
        if batch.num_rows() as u64 != meta.num_records {
            return Err(Error::Corrupt {
                id: Some(meta.id),
                detail: format!(
                    "meta says {} records, payload has {}",
                    meta.num_records,
                    batch.num_rows()
                ),
            });
        }
        Ok(Self { meta, batch })
    }

    /// The block's metadata.
    pub fn meta(&self) -> &BlockMeta {
        &self.meta
    }

    /// The block's id.
    pub fn id(&self) -> BlockId {
        self.meta.id
    }

    /// The records as an Arrow batch.
    pub fn batch(&self) -> &RecordBatch {
        &self.batch
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.batch.num_rows()
    }

    /// Whether the block holds no records.
    pub fn is_empty(&self) -> bool {
        self.batch.num_rows() == 0
    }

    /// The payload column (record data), for kernels that only need the bytes.
    pub fn data(&self) -> &BinaryArray {
        self.batch.column(5).as_binary::<i32>()
    }

    /// The partition-key column.
    pub fn partition_keys(&self) -> &StringArray {
        self.batch.column(3).as_string::<i32>()
    }

    /// Heap bytes held by the block's Arrow buffers: what the memory tier charges for it.
    ///
    /// Each distinct allocation is counted once. This matters for decoded blocks, whose columns
    /// are all zero-copy slices of the one buffer they were read into: Arrow's own
    /// `get_array_memory_size` would charge that buffer once per column buffer (about ten times).
    ///
    /// ```
    /// # use sluice_blockstore::testing::{sample_block, sample_records};
    /// # use sluice_blockstore::Block;
    /// let block = sample_block(1, &sample_records("shard-0", 0, 100, 1_000));
    /// let decoded = Block::decode(block.encode()?)?;
    /// // The decoded block is charged about the size of its encoded buffer, not ten times that.
    /// assert!(decoded.memory_size() <= block.encode()?.len());
    /// assert!(block.memory_size() >= 100 * 1_000);
    /// # Ok::<(), sluice_blockstore::Error>(())
    /// ```
    pub fn memory_size(&self) -> usize {
        fn collect(data: &ArrayData, allocations: &mut Vec<(usize, usize)>) {
            let nulls = data.nulls().map(arrow_buffer::NullBuffer::buffer);
            for buffer in data.buffers().iter().chain(nulls) {
                allocations.push((buffer.data_ptr().as_ptr() as usize, buffer.capacity()));
            }
            // The shard dictionary's values.
            for child in data.child_data() {
                collect(child, allocations);
            }
        }
        let mut allocations: Vec<(usize, usize)> = Vec::new();
        for column in self.batch.columns() {
            collect(&column.to_data(), &mut allocations);
        }
        allocations.sort_unstable();
        allocations.dedup_by_key(|(start, _)| *start);
        allocations.iter().map(|(_, capacity)| capacity).sum()
    }

    /// The records, rebuilt as [`Record`] values (allocates per record; kernels that only need
    /// payloads should use [`Block::data`]).
    ///
    /// # Errors
    /// [`Error::Corrupt`] if a stored sequence number is not canonical.
    pub fn records(&self) -> Result<Vec<Record>> {
        let key = self.partition_keys();
        let data = self.data();
        let mut last_shard: Option<Arc<str>> = None;
        let prefix = self.sequence_prefix();
        let mut text = String::new();
        (0..self.len())
            .map(|i| {
                let shard_id = match &last_shard {
                    Some(s) if **s == *self.shard_at(i) => s.clone(),
                    _ => {
                        let s: Arc<str> = Arc::from(self.shard_at(i));
                        last_shard = Some(s.clone());
                        s
                    }
                };
                Ok(Record {
                    shard_id,
                    position: Position::new(self.sequence_at(i, prefix, &mut text)?, self.sub_sequence_at(i)),
                    partition_key: Arc::from(key.value(i)),
                    approximate_arrival_ms: self.arrival_at(i),
                    data: Bytes::copy_from_slice(data.value(i)),
                })
            })
            .collect()
    }

    /// The shard of record `i` (either layout).
    fn shard_at(&self, i: usize) -> &str {
        self.string_at(0, i)
    }

    /// Record `i`'s value in string column `column`, plain or dictionary-encoded.
    fn string_at(&self, column: usize, i: usize) -> &str {
        let column = self.batch.column(column);
        match column.as_dictionary_opt::<UInt16Type>() {
            Some(dictionary) => {
                let values = dictionary.values().as_string::<i32>();
                values.value(usize::from(dictionary.keys().value(i)))
            }
            None => column.as_string::<i32>().value(i),
        }
    }

    /// The sub-sequence number of record `i` (`UInt16` or `UInt64`).
    fn sub_sequence_at(&self, i: usize) -> u64 {
        let column = self.batch.column(2);
        match column.as_primitive_opt::<UInt16Type>() {
            Some(narrow) => u64::from(narrow.value(i)),
            None => column.as_primitive::<UInt64Type>().value(i),
        }
    }

    /// The arrival time of record `i` (plain or dictionary-encoded).
    fn arrival_at(&self, i: usize) -> i64 {
        let column = self.batch.column(4);
        match column.as_dictionary_opt::<UInt16Type>() {
            Some(dictionary) => {
                let values = dictionary.values().as_primitive::<TimestampMillisecondType>();
                values.value(usize::from(dictionary.keys().value(i)))
            }
            None => column.as_primitive::<TimestampMillisecondType>().value(i),
        }
    }

    /// The prefix every sequence number of the block shares ("" for the first layout).
    fn sequence_prefix(&self) -> &str {
        self.batch
            .schema_ref()
            .metadata()
            .get(SEQUENCE_PREFIX_KEY)
            .map_or("", String::as_str)
    }

    /// The sequence number of record `i` with the block's `prefix`, assembled in `text`.
    fn sequence_at(&self, i: usize, prefix: &str, text: &mut String) -> Result<SequenceNumber> {
        text.clear();
        text.push_str(prefix);
        text.push_str(self.string_at(1, i));
        SequenceNumber::parse(text).map_err(|e| Error::Corrupt {
            id: Some(self.meta.id),
            detail: format!("record {i}: {e}"),
        })
    }

    /// Record `index` alone, rebuilt as a [`Record`] (for one record's error report; use
    /// [`records`](Self::records) for many).
    ///
    /// # Errors
    /// [`Error::Corrupt`] if `index` is out of range or the stored sequence number is not
    /// canonical.
    pub fn record(&self, index: usize) -> Result<Record> {
        if index >= self.len() {
            return Err(Error::Corrupt {
                id: Some(self.meta.id),
                detail: format!("record {index} of a block of {}", self.len()),
            });
        }
        Ok(Record {
            shard_id: Arc::from(self.shard_at(index)),
            position: Position::new(
                self.sequence_at(index, self.sequence_prefix(), &mut String::new())?,
                self.sub_sequence_at(index),
            ),
            partition_key: Arc::from(self.partition_keys().value(index)),
            approximate_arrival_ms: self.arrival_at(index),
            data: Bytes::copy_from_slice(self.data().value(index)),
        })
    }

    /// Encodes the block in its checksummed on-disk form (see [`Block`]).
    ///
    /// # Errors
    /// [`Error::Arrow`] if IPC encoding fails.
    pub fn encode(&self) -> Result<Bytes> {
        let meta = serde_json::to_vec(&self.meta).map_err(|e| Error::Corrupt {
            id: Some(self.meta.id),
            detail: format!("cannot encode block meta: {e}"),
        })?;
        let header_len = (MAGIC.len() + 4 + meta.len()).next_multiple_of(ALIGNMENT);
        let mut buf = BytesMut::new();
        buf.put_slice(MAGIC);
        buf.put_u32_le(meta.len() as u32);
        buf.put_slice(&meta);
        buf.resize(header_len, 0);
        crate::ipc_stream::write_stream(&self.batch, &mut buf, 4)?;
        let crc = crate::crc32c(&buf);
        buf.put_u32_le(crc);
        Ok(buf.freeze())
    }

    /// Decodes and verifies an encoded block. Arrow buffers share `bytes` (no copy).
    ///
    /// # Errors
    /// [`Error::Corrupt`] if the checksum, magic, metadata or Arrow payload is wrong; a corrupt
    /// copy must be treated as missing, never returned.
    pub fn decode(bytes: Bytes) -> Result<Self> {
        let corrupt = |detail: String| Error::Corrupt { id: None, detail };
        if bytes.len() < MAGIC.len() + 8 {
            return Err(corrupt(format!("{} bytes is too short for a block", bytes.len())));
        }
        let body_len = bytes.len() - 4;
        let stored = u32::from_le_bytes(bytes[body_len..].try_into().expect("4 bytes"));
        let actual = crate::crc32c(&bytes[..body_len]);
        if stored != actual {
            return Err(corrupt(format!(
                "CRC32C mismatch: stored {stored:08x}, computed {actual:08x}"
            )));
        }
        if &bytes[..MAGIC.len()] != MAGIC {
            return Err(corrupt("bad magic: not a Sluice block (format 1)".into()));
        }
        let meta_len = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes")) as usize;
        let meta_end = 12 + meta_len;
        if meta_end > body_len {
            return Err(corrupt(format!("meta length {meta_len} runs past the end")));
        }
        let meta: BlockMeta =
            serde_json::from_slice(&bytes[12..meta_end]).map_err(|e| corrupt(format!("bad block meta: {e}")))?;
        let header_len = meta_end.next_multiple_of(ALIGNMENT);
        if header_len > body_len {
            return Err(Error::Corrupt {
                id: Some(meta.id),
                detail: "payload missing".into(),
            });
        }
        let mut payload = bytes;
        payload.truncate(body_len);
        let mut buffer = Buffer::from(payload.split_off(header_len));
        let mut decoder = arrow_ipc::reader::StreamDecoder::new();
        let mut batch = None;
        while !buffer.is_empty() {
            match decoder.decode(&mut buffer)? {
                Some(b) if batch.is_none() => batch = Some(b),
                Some(_) => {
                    return Err(Error::Corrupt {
                        id: Some(meta.id),
                        detail: "more than one record batch".into(),
                    });
                }
                None => {}
            }
        }
        decoder.finish()?;
        let batch = batch.ok_or_else(|| Error::Corrupt {
            id: Some(meta.id),
            detail: "no record batch".into(),
        })?;
        Self::try_new(meta, batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SequenceNumberRange;
    use arrow_array::ArrayRef;

    pub(crate) fn sample(n: usize) -> Block {
        let records: Vec<Record> = (0..n)
            .map(|i| Record {
                shard_id: "shard-0".into(),
                position: Position::new(SequenceNumber::from_u128(1000 + i as u128), (i % 3) as u64),
                partition_key: format!("k{i}").into(),
                approximate_arrival_ms: 1_700_000_000_000 + i as i64,
                data: Bytes::from(format!("record number {i}")),
            })
            .collect();
        block_of(&records)
    }

    #[test]
    fn encode_decode_round_trip() {
        let block = sample(100);
        let bytes = block.encode().unwrap();
        let back = Block::decode(bytes).unwrap();
        assert_eq!(back, block);
        assert_eq!(back.records().unwrap(), block.records().unwrap());
        assert_eq!(back.records().unwrap()[4].position.sub_sequence, 1);
    }

    /// Records of `shards` interleaved in runs, with 56-digit sequence numbers that share a long
    /// prefix within a shard (as Kinesis' and the local log's do).
    fn interleaved(shards: &[&str], n: usize) -> Vec<Record> {
        let shard_ids: Vec<Arc<str>> = shards.iter().map(|s| Arc::from(*s)).collect();
        (0..n)
            .map(|i| Record {
                shard_id: shard_ids[(i / 7) % shard_ids.len()].clone(),
                position: Position::plain(
                    SequenceNumber::parse(&format!(
                        "4959033827149025660855969253836157109592{:016}",
                        1000 + i * 13
                    ))
                    .unwrap(),
                ),
                partition_key: format!("k{i}").into(),
                approximate_arrival_ms: 1_700_000_000_000 + i as i64,
                data: Bytes::from(vec![b'x'; 100]),
            })
            .collect()
    }

    /// A block of `records`, its range from the first record's to the last's.
    fn block_of(records: &[Record]) -> Block {
        let ranges = SequenceNumberRanges::from(SequenceNumberRange {
            stream: "s".into(),
            shard_id: records[0].shard_id.clone(),
            from: records[0].position.clone(),
            to: records[records.len() - 1].position.clone(),
            record_count: records.len() as u64,
        });
        Block::from_records(
            BlockId {
                input_id: 1,
                run_id: 7,
                seq: 3,
            },
            ranges,
            records,
        )
        .unwrap()
    }

    #[test]
    fn shards_and_sequence_numbers_come_back_whole_from_the_compact_layout() {
        let records = interleaved(&["shardId-000000000001", "shardId-000000000002", "other"], 500);
        let block = block_of(&records);
        assert_eq!(block.records().unwrap(), records);
        let back = Block::decode(block.encode().unwrap()).unwrap();
        assert_eq!(back.records().unwrap(), records);
        for i in [0, 7, 14, 499] {
            assert_eq!(back.record(i).unwrap(), records[i]);
        }
        // Numbers of different lengths share no prefix beyond their common digits.
        let mut uneven = interleaved(&["a"], 2);
        uneven[0].position = Position::plain(SequenceNumber::from_u128(999));
        uneven[1].position = Position::plain(SequenceNumber::from_u128(1000));
        assert_eq!(block_of(&uneven).records().unwrap(), uneven);
    }

    #[test]
    fn records_of_aggregates_build_the_block_their_records_build_one_by_one() {
        // Aggregates as a reader decodes them: user records that share their sequence number's
        // allocation. Between and inside them, what must still split a run or be compared: an
        // equal number in an allocation of its own, an arrival time that changes inside an
        // aggregate, a shard id equal to the last but not shared, another shard, and a number
        // that shortens the common prefix.
        let (a, a_again, b): (Arc<str>, Arc<str>, Arc<str>) = (
            Arc::from("shardId-000000000001"),
            Arc::from("shardId-000000000001"),
            Arc::from("shardId-000000000002"),
        );
        let sequence =
            |tail: &str| SequenceNumber::parse(&format!("49590338271490256608559692538361571095921575{tail}")).unwrap();
        let (first, second, third) = (
            sequence("000000000100"),
            sequence("000000000200"),
            sequence("990000000300"),
        );
        let record = |shard: &Arc<str>, sequence: &SequenceNumber, sub: u64, arrival: i64| Record {
            shard_id: Arc::clone(shard),
            position: Position::new(sequence.clone(), sub),
            partition_key: format!("k{sub}").into(),
            approximate_arrival_ms: arrival,
            data: Bytes::from(format!("payload {sub} of {sequence}")),
        };
        let mut records: Vec<Record> = (0..3).map(|sub| record(&a, &first, sub, 10)).collect();
        records.extend((3..5).map(|sub| record(&a, &first, sub, 11)));
        records.push(record(&a, &sequence("000000000100"), 5, 11));
        records.extend((6..9).map(|sub| record(&a, &first, sub, 11)));
        records.extend((0..4).map(|sub| record(&a_again, &second, sub, 12)));
        records.push(record(&b, &second, 4, 12));
        records.extend((0..3).map(|sub| record(&b, &third, sub, 13)));
        records.push(record(&a, &second, 5, 12));

        let id = BlockId {
            input_id: 0,
            run_id: 0,
            seq: 1,
        };
        let built = Block::from_records(id, SequenceNumberRanges::default(), &records).unwrap();
        // The prefix every number shares: the first 44 digits.
        let prefix = records
            .iter()
            .map(|r| r.position.sequence.as_str())
            .fold(first.as_str(), |prefix, digits| {
                &prefix[..common_prefix_len(prefix, digits)]
            });
        assert_eq!(prefix.len(), 44);
        let mut one_by_one = BlockBuilder::new(prefix, BlockCapacity::default());
        for r in &records {
            let digits = r.position.sequence.as_str().as_bytes();
            one_by_one
                .push(
                    &r.shard_id,
                    &digits[prefix.len()..],
                    r.position.sub_sequence,
                    r.partition_key.as_bytes(),
                    r.approximate_arrival_ms,
                    &r.data,
                )
                .unwrap();
        }
        let one_by_one = one_by_one.finish(id, SequenceNumberRanges::default()).unwrap();
        assert_eq!(built, one_by_one);
        assert_eq!(built.records().unwrap(), records);
    }

    #[test]
    fn a_record_takes_about_its_payload_and_key_in_memory() {
        let block = block_of(&interleaved(&["shardId-000000000001", "shardId-000000000002"], 10_000));
        let per_record = block.memory_size() / block.len();
        // 100 bytes of payload, a 2–5 byte key, 2 + 8 of sub-sequence and arrival, four offsets,
        // two of shard key and a short sequence suffix; the first layout took ~215 bytes.
        assert!(per_record < 160, "{per_record} bytes of block per 100-byte record");
    }

    #[test]
    fn blocks_of_the_first_layout_are_still_read() {
        let records = interleaved(&["shardId-000000000001", "shardId-000000000002"], 50);
        let columns: Vec<ArrayRef> = vec![
            Arc::new(StringArray::from_iter_values(records.iter().map(|r| &*r.shard_id))),
            Arc::new(StringArray::from_iter_values(
                records.iter().map(|r| r.position.sequence.as_str()),
            )),
            Arc::new(arrow_array::UInt64Array::from_iter_values(
                records.iter().map(|r| r.position.sub_sequence),
            )),
            Arc::new(StringArray::from_iter_values(records.iter().map(|r| &*r.partition_key))),
            Arc::new(arrow_array::TimestampMillisecondArray::from_iter_values(
                records.iter().map(|r| r.approximate_arrival_ms),
            )),
            Arc::new(BinaryArray::from_iter_values(records.iter().map(|r| &r.data[..]))),
        ];
        let batch = RecordBatch::try_new(SCHEMA_V1.clone(), columns).unwrap();
        let old = Block::try_new(block_of(&records).meta().clone(), batch).unwrap();
        let back = Block::decode(old.encode().unwrap()).unwrap();
        assert_eq!(back.records().unwrap(), records);
        assert_eq!(back.record(3).unwrap(), records[3]);
        assert_eq!(back.data().value(0), &records[0].data[..]);
    }

    #[test]
    fn every_flipped_byte_is_detected() {
        let bytes = sample(5).encode().unwrap();
        for i in (0..bytes.len()).step_by(7) {
            let mut copy = bytes.to_vec();
            copy[i] ^= 0x40;
            assert!(
                matches!(Block::decode(Bytes::from(copy)), Err(Error::Corrupt { .. })),
                "flip at byte {i} not detected"
            );
        }
        assert!(Block::decode(bytes.slice(..bytes.len() - 1)).is_err());
    }

    #[test]
    fn block_id_parse_rejects_garbage() {
        assert!("input-x-1-2".parse::<BlockId>().is_err());
        assert!("block-1-2-3".parse::<BlockId>().is_err());
    }
}
