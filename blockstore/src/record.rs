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
}
