//! Deterministic records and blocks for tests and benchmarks.

use std::sync::Arc;

use bytes::Bytes;

use crate::{Block, BlockId, Position, Record, SequenceNumber, SequenceNumberRange, SequenceNumberRanges};

/// The stream name sample records and their ranges carry.
pub const SAMPLE_STREAM: &str = "sample-stream";

/// `count` plain records of `shard` with sequence numbers `first_sequence..`, partition keys
/// `key-0`..`key-15`, and `payload_bytes` bytes of payload each (a pattern that depends on the
/// sequence number, so different records differ).
pub fn sample_records(shard: &str, first_sequence: u128, count: usize, payload_bytes: usize) -> Vec<Record> {
    let shard: Arc<str> = Arc::from(shard);
    (0..count)
        .map(|i| {
            let sequence = first_sequence + i as u128;
            let seed = sequence as u8;
            let data: Vec<u8> = (0..payload_bytes).map(|j| seed.wrapping_add(j as u8)).collect();
            Record {
                shard_id: shard.clone(),
                position: Position::plain(SequenceNumber::from_u128(sequence)),
                partition_key: Arc::from(format!("key-{}", i % 16)),
                approximate_arrival_ms: 1_700_000_000_000 + sequence as i64,
                data: Bytes::from(data),
            }
        })
        .collect()
}

/// The ranges `records` cover in stream `stream`: one range per run
/// of consecutive records of the same shard.
pub fn ranges_of(stream: &str, records: &[Record]) -> SequenceNumberRanges {
    let stream: Arc<str> = Arc::from(stream);
    let mut ranges: Vec<SequenceNumberRange> = Vec::new();
    for record in records {
        match ranges.last_mut() {
            Some(last) if last.shard_id == record.shard_id && last.to < record.position => {
                last.to = record.position.clone();
                last.record_count += 1;
            }
            _ => ranges.push(SequenceNumberRange {
                stream: stream.clone(),
                shard_id: record.shard_id.clone(),
                from: record.position.clone(),
                to: record.position.clone(),
                record_count: 1,
            }),
        }
    }
    SequenceNumberRanges::from(ranges)
}

/// The id of sample block `seq`: input 0, run 1.
pub fn sample_block_id(seq: u64) -> BlockId {
    BlockId {
        input_id: 0,
        run_id: 1,
        seq,
    }
}

/// Block [`sample_block_id`]`(seq)` holding `records`, with their ranges in [`SAMPLE_STREAM`].
///
/// # Panics
/// If Arrow rejects the records (it does not for well-formed records).
pub fn sample_block(seq: u64, records: &[Record]) -> Block {
    Block::from_records(sample_block_id(seq), ranges_of(SAMPLE_STREAM, records), records)
        .expect("sample records always form a block")
}
