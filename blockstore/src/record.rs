//! [`Record`]: one user record as it travels from a source into a block.

use std::sync::Arc;

use bytes::Bytes;

use crate::Position;

/// One user record read from a shard (after KPL de-aggregation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// The shard it was read from.
    pub shard_id: Arc<str>,
    /// Its position in the shard.
    pub position: Position,
    /// The partition key the producer gave it.
    pub partition_key: Arc<str>,
    /// When the service accepted it, in milliseconds since the Unix epoch.
    pub approximate_arrival_ms: i64,
    /// The payload.
    pub data: Bytes,
}

impl Record {
    /// The payload size plus the partition key, which is what Kinesis bills and limits by.
    pub fn size_bytes(&self) -> usize {
        self.data.len() + self.partition_key.len()
    }

    /// The memory this record holds while it is buffered, an estimate: the struct itself, its
    /// payload, and the heap blocks of its partition key and sequence number (reference counts
    /// and an allocator header each). About 2.5× [`size_bytes`](Self::size_bytes) for 100-byte
    /// records, which is why buffers are bounded by this and not by the payload.
    pub fn memory_bytes(&self) -> usize {
        /// An allocator's per-allocation header and rounding, roughly.
        const ALLOCATION_OVERHEAD: usize = 16;
        /// The strong and weak counts in front of an `Arc<str>`'s bytes.
        const ARC_COUNTS: usize = 2 * std::mem::size_of::<usize>();
        std::mem::size_of::<Self>()
            + self.data.len()
            + ALLOCATION_OVERHEAD
            + ARC_COUNTS
            + self.partition_key.len()
            + ALLOCATION_OVERHEAD
            + ARC_COUNTS
            + self.position.sequence.as_str().len()
            + ALLOCATION_OVERHEAD
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SequenceNumber;

    #[test]
    fn memory_bytes_counts_more_than_the_payload() {
        let record = Record {
            shard_id: Arc::from("shard-0"),
            position: Position::plain(SequenceNumber::from_u128(49_000_000_000_000_000_000_000_000)),
            partition_key: Arc::from("key-1"),
            approximate_arrival_ms: 0,
            data: Bytes::from(vec![b'x'; 100]),
        };
        assert_eq!(record.size_bytes(), 105);
        let estimate = record.memory_bytes();
        assert!(estimate > 2 * record.size_bytes(), "{estimate}");
        assert!(estimate < 4 * record.size_bytes(), "{estimate}");
    }
}
