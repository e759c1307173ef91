//! A block's record batch as an Arrow IPC stream, with each buffer copied once.
//!
//! `arrow_ipc`'s `StreamWriter` gathers a batch's buffers into a `Vec` of its own, growing it as it
//! goes, and then copies that `Vec` into the writer: for a 4 MiB block, three copies and two large
//! allocations — with glibc's adaptive thresholds, fresh pages faulted in on every encode
//! (`docs/blockstore.md`, "Benchmarks"). Blocks have a handful of column types, so this writer lays
//! their body out itself: it sizes the stream first, then copies every buffer once into the
//! caller's buffer. The messages are Arrow's own — the schema message from `arrow_ipc`, the
//! dictionary and record-batch messages built with its flatbuffer types — so any Arrow reader reads
//! the result; [`crate::Block::decode`] reads it with `arrow_ipc`'s `StreamDecoder`.
//!
//! A batch with a column it does not lay out (nulls, byte arrays sliced away from their first
//! value, nested or view types: no block is built that way, but a block may come from elsewhere)
//! goes through `StreamWriter`.

use arrow_array::{Array, RecordBatch};
use arrow_buffer::Buffer;
use arrow_data::ArrayData;
use arrow_ipc::writer::{DictionaryTracker, IpcDataGenerator, IpcWriteOptions, StreamWriter};
use arrow_ipc::{FieldNode, MessageHeader, MetadataVersion};
use arrow_schema::{ArrowError, DataType};
use bytes::{BufMut, BytesMut};
use flatbuffers::{FlatBufferBuilder, UnionWIPOffset, WIPOffset};

/// Arrow's default body alignment, kept: the decoder shares 64-byte-aligned buffers as they are.
const ALIGNMENT: usize = 64;
const CONTINUATION: [u8; 4] = [0xFF; 4];
const PADDING: [u8; ALIGNMENT] = [0; ALIGNMENT];

/// Appends `batch` to `out` as an IPC stream: the schema, a dictionary batch per dictionary column,
/// the record batch and the end-of-stream marker. Buffers are aligned in the result when `out`'s
/// length is a multiple of 64 on entry. Reserves room for the stream and `trailer` more bytes
/// before it copies anything, so `out` is allocated once.
pub(crate) fn write_stream(batch: &RecordBatch, out: &mut BytesMut, trailer: usize) -> Result<(), ArrowError> {
    let columns: Option<Vec<Column>> = batch.columns().iter().map(|c| Column::of(&c.to_data())).collect();
    let Some(columns) = columns else {
        let mut writer = StreamWriter::try_new(BufMut::writer(&mut *out), batch.schema_ref())?;
        writer.write(batch)?;
        return writer.finish();
    };
    let options = IpcWriteOptions::default();
    let schema = IpcDataGenerator::default()
        .schema_to_bytes_with_dictionary_tracker(batch.schema_ref(), &mut DictionaryTracker::new(false), &options)
        .ipc_message;
    // The schema message numbers dictionary fields from 0 in field order; so do these.
    let mut messages = vec![(schema, Vec::new())];
    for (id, values) in columns.iter().filter_map(|c| c.dictionary.as_deref()).enumerate() {
        messages.push(dictionary_batch(id as i64, values));
    }
    messages.push(record_batch(batch.num_rows(), &columns));

    let framed_len: usize = messages
        .iter()
        .map(|(message, body)| 8 + message.len().next_multiple_of(8) + ALIGNMENT + body_len(body))
        .sum();
    out.reserve(framed_len + 8 + trailer);
    for (message, body) in &messages {
        write_message(out, message, body);
    }
    out.put_slice(&CONTINUATION);
    out.put_u32_le(0);
    Ok(())
}

/// A column as the body lays it out: its length and buffers, and a dictionary column's values.
/// No validity buffer: the column has no nulls, and a reader ignores it when the null count is 0.
struct Column {
    len: usize,
    buffers: Vec<Buffer>,
    dictionary: Option<Box<Column>>,
}

impl Column {
    /// `None` for anything this writer does not lay out itself.
    fn of(data: &ArrayData) -> Option<Self> {
        if data.null_count() > 0 {
            return None;
        }
        let column = |buffers, dictionary| {
            Some(Self {
                len: data.len(),
                buffers,
                dictionary,
            })
        };
        match data.data_type() {
            DataType::Utf8 | DataType::Binary => {
                let offsets = fixed_width(data, 4, 1)?;
                let bounds: &[i32] = offsets.typed_data();
                // A slice whose first value is not at 0 needs its offsets rewritten.
                if bounds.first() != Some(&0) {
                    return None;
                }
                let end = usize::try_from(*bounds.last()?).ok()?;
                let values = data.buffers().get(1)?;
                if end > values.len() {
                    return None;
                }
                column(vec![offsets, values.slice_with_length(0, end)], None)
            }
            DataType::Dictionary(key, _) => {
                let keys = fixed_width(data, key.primitive_width()?, 0)?;
                let values = Self::of(data.child_data().first()?)?;
                column(vec![keys], Some(Box::new(values)))
            }
            t if t.is_primitive() => column(vec![fixed_width(data, t.primitive_width()?, 0)?], None),
            _ => None,
        }
    }
}

/// A fixed-width buffer (values, keys or offsets) sliced to the array: `extra` more elements than
/// the array's length (offsets have one more).
fn fixed_width(data: &ArrayData, width: usize, extra: usize) -> Option<Buffer> {
    let buffer = data.buffers().first()?;
    let (start, len) = (data.offset() * width, (data.len() + extra) * width);
    (start + len <= buffer.len()).then(|| buffer.slice_with_length(start, len))
}

/// The padded length of a body made of `buffers`.
fn body_len(buffers: &[Buffer]) -> usize {
    buffers.iter().map(|b| b.len().next_multiple_of(ALIGNMENT)).sum()
}

/// Builds a `RecordBatch` table (the nodes and buffer locations of `columns`, in order) and
/// returns it with the buffers of its body.
fn record_batch_table<'fbb>(
    fbb: &mut FlatBufferBuilder<'fbb>,
    rows: usize,
    columns: &[&Column],
) -> (WIPOffset<arrow_ipc::RecordBatch<'fbb>>, Vec<Buffer>) {
    let nodes: Vec<FieldNode> = columns.iter().map(|c| FieldNode::new(c.len as i64, 0)).collect();
    let mut locations = Vec::new();
    let mut body = Vec::new();
    let mut offset = 0;
    for column in columns {
        // The validity buffer comes first: empty.
        locations.push(arrow_ipc::Buffer::new(offset as i64, 0));
        for buffer in &column.buffers {
            locations.push(arrow_ipc::Buffer::new(offset as i64, buffer.len() as i64));
            offset += buffer.len().next_multiple_of(ALIGNMENT);
            body.push(buffer.clone());
        }
    }
    let nodes = fbb.create_vector(&nodes);
    let locations = fbb.create_vector(&locations);
    let mut table = arrow_ipc::RecordBatchBuilder::new(fbb);
    table.add_length(rows as i64);
    table.add_nodes(nodes);
    table.add_buffers(locations);
    (table.finish(), body)
}

/// The record-batch message of `columns` (a dictionary column contributes its keys) and its body.
fn record_batch(rows: usize, columns: &[Column]) -> (Vec<u8>, Vec<Buffer>) {
    let mut fbb = FlatBufferBuilder::new();
    let columns: Vec<&Column> = columns.iter().collect();
    let (table, body) = record_batch_table(&mut fbb, rows, &columns);
    let message = message(
        &mut fbb,
        MessageHeader::RecordBatch,
        table.as_union_value(),
        body_len(&body),
    );
    fbb.finish(message, None);
    (fbb.finished_data().to_vec(), body)
}

/// The dictionary-batch message carrying dictionary `id`'s `values`, and its body.
fn dictionary_batch(id: i64, values: &Column) -> (Vec<u8>, Vec<Buffer>) {
    let mut fbb = FlatBufferBuilder::new();
    let (table, body) = record_batch_table(&mut fbb, values.len, &[values]);
    let mut dictionary = arrow_ipc::DictionaryBatchBuilder::new(&mut fbb);
    dictionary.add_id(id);
    dictionary.add_data(table);
    dictionary.add_isDelta(false);
    let dictionary = dictionary.finish();
    let message = message(
        &mut fbb,
        MessageHeader::DictionaryBatch,
        dictionary.as_union_value(),
        body_len(&body),
    );
    fbb.finish(message, None);
    (fbb.finished_data().to_vec(), body)
}

fn message<'fbb>(
    fbb: &mut FlatBufferBuilder<'fbb>,
    kind: MessageHeader,
    header: WIPOffset<UnionWIPOffset>,
    body_len: usize,
) -> WIPOffset<arrow_ipc::Message<'fbb>> {
    let mut message = arrow_ipc::MessageBuilder::new(fbb);
    message.add_version(MetadataVersion::V5);
    message.add_header_type(kind);
    message.add_bodyLength(body_len as i64);
    message.add_header(header);
    message.finish()
}

/// Frames `message` as the IPC stream does (continuation marker, length, flatbuffer padded so the
/// body starts 64-byte aligned) and copies its body's buffers after it, each padded to 64 bytes.
fn write_message(out: &mut BytesMut, message: &[u8], body: &[Buffer]) {
    let framed = (out.len() + 8 + message.len()).next_multiple_of(ALIGNMENT) - out.len();
    out.put_slice(&CONTINUATION);
    out.put_i32_le((framed - 8) as i32);
    out.put_slice(message);
    out.put_slice(&PADDING[..framed - 8 - message.len()]);
    for buffer in body {
        out.put_slice(buffer.as_slice());
        out.put_slice(&PADDING[..buffer.len().next_multiple_of(ALIGNMENT) - buffer.len()]);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow_array::types::UInt16Type;
    use arrow_array::{
        ArrayRef, BinaryArray, DictionaryArray, StringArray, TimestampMillisecondArray, UInt16Array, UInt64Array,
    };
    use arrow_ipc::reader::StreamReader;
    use arrow_schema::{Field, Schema};

    use super::*;

    fn batch() -> RecordBatch {
        let shards: DictionaryArray<UInt16Type> = ["shard-0", "shard-1", "shard-0", "shard-0"].into_iter().collect();
        let columns: Vec<ArrayRef> = vec![
            Arc::new(shards),
            Arc::new(StringArray::from(vec!["1", "22", "", "4444"])),
            Arc::new(UInt64Array::from(vec![0, 1, u64::MAX, 3])),
            Arc::new(BinaryArray::from(vec![&b"a"[..], b"", b"\xff\x00", &[7u8; 100]])),
            Arc::new(TimestampMillisecondArray::from(vec![1, 2, 3, 4])),
            // A block's suffix and arrival columns as dictionaries of their runs.
            Arc::new(
                DictionaryArray::<UInt16Type>::try_new(
                    UInt16Array::from(vec![0, 0, 1, 1]),
                    Arc::new(StringArray::from(vec!["17", "18"])),
                )
                .expect("suffix dictionary"),
            ),
            Arc::new(
                DictionaryArray::<UInt16Type>::try_new(
                    UInt16Array::from(vec![0, 1, 1, 1]),
                    Arc::new(TimestampMillisecondArray::from(vec![5, 6])),
                )
                .expect("arrival dictionary"),
            ),
        ];
        let fields: Vec<Field> = columns
            .iter()
            .enumerate()
            .map(|(i, c)| Field::new(format!("c{i}"), c.data_type().clone(), false))
            .collect();
        let metadata = [("sluice.sequence_prefix".to_string(), "4959".to_string())].into();
        RecordBatch::try_new(Arc::new(Schema::new_with_metadata(fields, metadata)), columns).expect("batch")
    }

    /// Writes `batch`, checks it is one aligned IPC stream that Arrow's own reader reads back, and
    /// returns what it read.
    fn round_trip(batch: &RecordBatch) -> RecordBatch {
        let mut out = BytesMut::new();
        write_stream(batch, &mut out, 0).expect("write");
        let mut reader = StreamReader::try_new(&out[..], None).expect("schema");
        let read = reader.next().expect("one batch").expect("decodes");
        assert!(reader.next().is_none(), "one batch, then end of stream");
        read
    }

    #[test]
    fn arrows_reader_reads_back_the_same_batch_and_schema() {
        let batch = batch();
        // Laid out here, not by Arrow's writer.
        assert!(batch.columns().iter().all(|c| Column::of(&c.to_data()).is_some()));
        let read = round_trip(&batch);
        assert_eq!(read, batch);
        assert_eq!(read.schema().metadata(), batch.schema().metadata());
    }

    #[test]
    fn never_larger_than_arrows_stream() {
        // Same messages, smaller body (empty validity buffers). That each buffer is copied once
        // is the codec benchmark's to show (`docs/blockstore.md`, "Benchmarks").
        let batch = batch();
        let mut ours = BytesMut::new();
        write_stream(&batch, &mut ours, 0).expect("write");
        let mut theirs = Vec::new();
        let mut writer = StreamWriter::try_new(&mut theirs, batch.schema_ref()).expect("writer");
        writer.write(&batch).expect("write");
        writer.finish().expect("finish");
        assert!(ours.len() <= theirs.len(), "{} > {}", ours.len(), theirs.len());
    }

    #[test]
    fn slices_are_written_as_their_rows() {
        let batch = batch();
        // Primitive columns slice by offset; a byte column sliced away from its first value goes
        // through StreamWriter; both read back as the slice.
        for (offset, len) in [(0, 2), (1, 3), (3, 1), (4, 0)] {
            let slice = batch.slice(offset, len);
            assert_eq!(round_trip(&slice), slice, "rows {offset}..{}", offset + len);
        }
    }

    #[test]
    fn columns_with_nulls_go_through_arrows_writer() {
        let schema = Arc::new(Schema::new(vec![Field::new("s", DataType::Utf8, true)]));
        let nullable: ArrayRef = Arc::new(StringArray::from(vec![Some("a"), None, Some("c")]));
        let batch = RecordBatch::try_new(schema, vec![nullable]).expect("batch");
        assert!(Column::of(&batch.column(0).to_data()).is_none());
        assert_eq!(round_trip(&batch), batch);
    }
}
