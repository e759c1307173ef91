//! The generator's buffers without threads or locks: the open block (records and the ranges
//! that tag them), the queue of sealed blocks and the block being stored.
//!
//! The invariant the whole receiver rests on lives here: **a sealed block's ranges cover exactly
//! its records**. A page of one shard's records is taken into the open block together with the
//! range that describes the part taken; a page that does not fit is split, and each part gets its
//! own range in its own block. The property test below checks it against a reference model.

use std::collections::VecDeque;
use std::sync::Arc;

use sluice_blockstore::{BlockId, Record, SequenceNumberRange};

/// How big one block may get.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    pub max_records: usize,
    pub max_bytes: usize,
    /// Sealed blocks waiting for the pusher, at most.
    pub queue_capacity: usize,
}

/// A block sealed and waiting to be built and stored.
pub(crate) struct Sealed {
    pub id: BlockId,
    pub records: Vec<Record>,
    pub ranges: Vec<SequenceNumberRange>,
    pub bytes: usize,
}

/// The open block, the sealed queue and the block in flight.
#[derive(Default)]
pub(crate) struct BlockBuffer {
    records: Vec<Record>,
    bytes: usize,
    ranges: Vec<SequenceNumberRange>,
    queue: VecDeque<Sealed>,
    queued_records: usize,
    queued_bytes: usize,
    in_flight: Option<(usize, usize)>,
}

impl BlockBuffer {
    /// Moves as many leading records of `page` (one shard, increasing positions) into the open
    /// block as fit `limits`, with one range for them; returns how many. An empty block always
    /// takes one record, however large, so progress is always made.
    pub(crate) fn take(&mut self, stream: &Arc<str>, page: &mut Vec<Record>, limits: Limits) -> usize {
        let Some(first) = page.first() else { return 0 };
        let room_records = limits.max_records.saturating_sub(self.records.len());
        let room_bytes = limits.max_bytes.saturating_sub(self.bytes);
        let mut take = 0;
        let mut bytes = 0;
        for r in page.iter().take(room_records) {
            let size = r.memory_bytes();
            if bytes + size > room_bytes && !(take == 0 && self.records.is_empty()) {
                break;
            }
            bytes += size;
            take += 1;
        }
        if take == 0 {
            return 0;
        }
        self.ranges.push(SequenceNumberRange {
            stream: stream.clone(),
            shard_id: first.shard_id.clone(),
            from: first.position.clone(),
            to: page[take - 1].position.clone(),
            record_count: take as u64,
        });
        if take == page.len() && self.records.is_empty() {
            std::mem::swap(&mut self.records, page);
        } else if take == page.len() {
            self.records.append(page);
        } else {
            self.records.extend(page.drain(..take));
        }
        self.bytes += bytes;
        take
    }

    /// Whether the open block has reached a limit (it should be sealed now).
    pub(crate) fn is_full(&self, limits: Limits) -> bool {
        self.records.len() >= limits.max_records || self.bytes >= limits.max_bytes
    }

    /// Seals the open block into the queue under the id `next_id` gives; `true` if there was
    /// nothing to seal or it was sealed, `false` if the queue is full. `capacity_hint` sizes the
    /// next open block.
    pub(crate) fn seal(&mut self, limits: Limits, capacity_hint: usize, next_id: impl FnOnce() -> BlockId) -> bool {
        if self.records.is_empty() {
            return true;
        }
        if self.queue.len() >= limits.queue_capacity {
            return false;
        }
        let hint = self.records.len().min(capacity_hint);
        let records = std::mem::replace(&mut self.records, Vec::with_capacity(hint));
        let ranges = std::mem::take(&mut self.ranges);
        let bytes = std::mem::take(&mut self.bytes);
        self.queued_records += records.len();
        self.queued_bytes += bytes;
        self.queue.push_back(Sealed {
            id: next_id(),
            records,
            ranges,
            bytes,
        });
        true
    }

    /// The next sealed block, now in flight.
    pub(crate) fn pop(&mut self) -> Option<Sealed> {
        let sealed = self.queue.pop_front()?;
        self.queued_records -= sealed.records.len();
        self.queued_bytes -= sealed.bytes;
        self.in_flight = Some((sealed.records.len(), sealed.bytes));
        Some(sealed)
    }

    /// The block in flight was stored, or given up.
    pub(crate) fn finish_in_flight(&mut self) {
        self.in_flight = None;
    }

    /// Drops everything buffered, queued and in flight (never stored: it will be read again).
    pub(crate) fn discard(&mut self) {
        *self = Self::default();
    }

    /// Nothing open, queued or in flight.
    pub(crate) fn is_idle(&self) -> bool {
        self.records.is_empty() && self.queue.is_empty() && self.in_flight.is_none()
    }

    /// Records held: open, queued and in flight.
    pub(crate) fn records(&self) -> usize {
        self.records.len() + self.queued_records + self.in_flight.map_or(0, |(r, _)| r)
    }

    /// Bytes ([`Record::memory_bytes`]) held: open, queued and in flight.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes + self.queued_bytes + self.in_flight.map_or(0, |(_, b)| b)
    }

    /// Records in the open block.
    #[cfg(test)]
    fn open_records(&self) -> usize {
        self.records.len()
    }

    pub(crate) fn queued_blocks(&self) -> usize {
        self.queue.len()
    }

    pub(crate) fn storing(&self) -> bool {
        self.in_flight.is_some()
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;
    use sluice_blockstore::{BlockId, Bytes, Position, Record, SequenceNumber};

    use super::{BlockBuffer, Limits, Sealed};

    #[derive(Debug, Clone)]
    enum Op {
        /// A page of `n` records of shard `shard`, payloads of `size` bytes.
        Offer {
            shard: u8,
            n: usize,
            size: usize,
        },
        Seal,
        Pop,
    }

    fn ops() -> impl Strategy<Value = Vec<Op>> {
        prop::collection::vec(
            prop_oneof![
                4 => (0u8..3, 1usize..12, 0usize..300).prop_map(|(shard, n, size)| Op::Offer { shard, n, size }),
                2 => Just(Op::Seal),
                2 => Just(Op::Pop),
            ],
            1..60,
        )
    }

    proptest! {
        /// Whatever the pages, limits and interleaving: every record taken lands in exactly one
        /// block, in order; each block's ranges cover exactly its records (shard, first and last
        /// position, count, in order); blocks respect the limits (a lone oversized record
        /// aside); the queue never exceeds its capacity.
        #[test]
        fn sealed_blocks_are_covered_exactly_by_their_ranges(
            ops in ops(),
            max_records in 1usize..10,
            max_bytes in 100usize..2_000,
            queue_capacity in 1usize..4,
        ) {
            let limits = Limits { max_records, max_bytes, queue_capacity };
            let stream: Arc<str> = Arc::from("s");
            let mut buffer = BlockBuffer::default();
            let mut next_seq = [0u128; 3];
            let mut taken: Vec<Record> = Vec::new();
            let mut blocks: Vec<Sealed> = Vec::new();
            let mut seq = 0;
            let mut id = || { seq += 1; BlockId { input_id: 0, run_id: 0, seq } };
            for op in ops {
                match op {
                    Op::Offer { shard, n, size } => {
                        let shard_id: Arc<str> = Arc::from(format!("shard-{shard}"));
                        let mut page: Vec<Record> = (0..n)
                            .map(|_| {
                                next_seq[shard as usize] += 1;
                                Record {
                                    shard_id: shard_id.clone(),
                                    position: Position::plain(SequenceNumber::from_u128(next_seq[shard as usize])),
                                    partition_key: Arc::from("k"),
                                    approximate_arrival_ms: 0,
                                    data: Bytes::from(vec![0u8; size]),
                                }
                            })
                            .collect();
                        // Like a producer: take what fits, seal when full, until the page is in
                        // or the queue is full (then the rest of the page is not accepted).
                        while !page.is_empty() {
                            let before: Vec<Record> = page.clone();
                            let n = buffer.take(&stream, &mut page, limits);
                            taken.extend(before.into_iter().take(n));
                            if page.is_empty() {
                                if buffer.is_full(limits) {
                                    buffer.seal(limits, 16, &mut id);
                                }
                            } else if !buffer.seal(limits, 16, &mut id) {
                                break;
                            }
                        }
                    }
                    Op::Seal => {
                        let expected = buffer.open_records() == 0 || buffer.queued_blocks() < queue_capacity;
                        prop_assert_eq!(buffer.seal(limits, 16, &mut id), expected);
                    }
                    Op::Pop => {
                        if let Some(block) = buffer.pop() {
                            buffer.finish_in_flight();
                            blocks.push(block);
                        }
                    }
                }
                prop_assert!(buffer.queued_blocks() <= queue_capacity);
            }
            // Drain: seal the rest and take every block.
            loop {
                while let Some(block) = buffer.pop() {
                    buffer.finish_in_flight();
                    blocks.push(block);
                }
                if buffer.is_idle() {
                    break;
                }
                prop_assert!(buffer.seal(limits, 16, &mut id));
            }
            let mut all: Vec<Record> = Vec::new();
            for block in &blocks {
                prop_assert!(!block.records.is_empty());
                prop_assert!(block.records.len() <= max_records);
                let bytes: usize = block.records.iter().map(Record::memory_bytes).sum();
                prop_assert_eq!(bytes, block.bytes);
                prop_assert!(bytes <= max_bytes || block.records.len() == 1, "{} bytes in {} records", bytes, block.records.len());
                let mut at = 0;
                for range in &block.ranges {
                    let count = usize::try_from(range.record_count).unwrap();
                    let part = &block.records[at..at + count];
                    prop_assert!(part.iter().all(|r| r.shard_id == range.shard_id));
                    prop_assert_eq!(&part[0].position, &range.from);
                    prop_assert_eq!(&part[count - 1].position, &range.to);
                    at += count;
                }
                prop_assert_eq!(at, block.records.len(), "the ranges cover the whole block");
                all.extend(block.records.iter().cloned());
            }
            prop_assert_eq!(all, taken, "every record taken is in exactly one block, in order");
        }
    }
}
