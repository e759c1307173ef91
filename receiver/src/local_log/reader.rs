//! [`LocalShardReader`]: the `ShardReader` of a local-log shard.

use std::collections::VecDeque;
use std::sync::Arc;

use sluice_blockstore::{Position, Record};

use super::LocalStream;
use super::error::LocalLogError;
use super::frame::{RecordDecoder, position_key};
use super::segment::SegmentCursor;
use crate::{ReadBatch, ShardReader, SourceError, StartingPosition};

/// Which records at the start of the read are skipped (until the first one that passes).
/// Positions are `(sequence body, sub-sequence)` keys, which order as the positions do.
#[derive(Debug, Clone)]
enum Skip {
    Nothing,
    Before((u128, u64)),
    UpTo((u128, u64)),
    ArrivedBefore(i64),
}

impl Skip {
    fn skips(&self, position: (u128, u64), arrival_ms: i64) -> bool {
        match self {
            Skip::Nothing => false,
            Skip::Before(p) => position < *p,
            Skip::UpTo(p) => position <= *p,
            Skip::ArrivedBefore(t) => arrival_ms < *t,
        }
    }
}

/// Reads one shard of a [`LocalStream`] forward; see the `Source` contract.
///
/// It re-scans the tail of the newest segment on every read, so it sees records appended (and
/// flushed) by a producer in another process. It reports `end_of_shard` once, after the last
/// record of a closed shard.
pub struct LocalShardReader {
    stream: LocalStream,
    shard_id: Arc<str>,
    cursor: SegmentCursor,
    skip: Skip,
    decoder: RecordDecoder,
    pending: VecDeque<Record>,
    ended: bool,
}

impl std::fmt::Debug for LocalShardReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalShardReader")
            .field("stream", &self.stream.name())
            .field("shard_id", &self.shard_id)
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl LocalShardReader {
    pub(crate) fn open(stream: &LocalStream, shard_id: &str, start: &StartingPosition) -> Result<Self, SourceError> {
        let meta = stream.load_meta()?;
        let shard = meta.shard(shard_id).ok_or_else(|| SourceError::UnknownShard {
            stream: stream.name().to_owned(),
            shard_id: shard_id.to_owned(),
        })?;
        let expired = |p: &Position| {
            if let Some(horizon) = &shard.trim_horizon
                && &p.sequence < horizon
            {
                return Err(SourceError::DataExpired {
                    stream: stream.name().to_owned(),
                    shard_id: shard_id.to_owned(),
                    detail: format!("position {p} is before the trim horizon {horizon}"),
                });
            }
            Ok(())
        };
        let key_of = |p: &Position| {
            position_key(p)
                .ok_or_else(|| SourceError::Invalid(format!("{} is not a local-log sequence number", p.sequence)))
        };
        let (cursor, skip) = match start {
            StartingPosition::TrimHorizon => (stream.cursor(shard_id, None), Skip::Nothing),
            StartingPosition::Latest => (stream.cursor_at_tail(shard_id)?, Skip::Nothing),
            StartingPosition::AtTimestamp(t) => (stream.cursor(shard_id, None), Skip::ArrivedBefore(*t)),
            StartingPosition::AtPosition(p) => {
                expired(p)?;
                let key = key_of(p)?;
                (stream.cursor(shard_id, Some(key.0)), Skip::Before(key))
            }
            StartingPosition::AfterPosition(p) => {
                expired(p)?;
                let key = key_of(p)?;
                (stream.cursor(shard_id, Some(key.0)), Skip::UpTo(key))
            }
        };
        Ok(Self {
            stream: stream.clone(),
            shard_id: Arc::clone(&shard.shard_id),
            cursor,
            skip,
            decoder: RecordDecoder::default(),
            pending: VecDeque::new(),
            ended: false,
        })
    }

    /// Decodes frames until `max_records` records are pending or the tail is reached.
    fn fill(&mut self, max_records: usize) -> Result<(), LocalLogError> {
        while self.pending.len() < max_records {
            let Some(frame) = self.cursor.next_frame()? else { break };
            let skip = &mut self.skip;
            let arrival_ms = frame.arrival_ms;
            let keep = |body: u128, sub: u64| {
                if matches!(skip, Skip::Nothing) || !skip.skips((body, sub), arrival_ms) {
                    *skip = Skip::Nothing;
                    true
                } else {
                    false
                }
            };
            frame.push_records(&self.shard_id, &mut self.decoder, keep, |r| {
                self.pending.push_back(r);
            });
        }
        Ok(())
    }

    fn take(&mut self, max_records: usize) -> Vec<Record> {
        if self.pending.len() <= max_records {
            return Vec::from(std::mem::take(&mut self.pending));
        }
        self.pending.drain(..max_records).collect()
    }
}

impl ShardReader for LocalShardReader {
    fn read(&mut self, max_records: usize) -> Result<ReadBatch, SourceError> {
        if self.ended {
            return Ok(ReadBatch::default());
        }
        let max_records = max_records.max(1);
        self.fill(max_records)?;
        if !self.pending.is_empty() {
            return Ok(ReadBatch {
                records: self.take(max_records),
                end_of_shard: None,
                millis_behind_latest: None,
                timed_out: false,
            });
        }
        // At the tail: if the metadata says the shard is closed, the producer flushed all of its
        // data before writing that, so one more scan finds everything there is.
        let meta = self.stream.load_meta()?;
        let closed = meta.shard(&self.shard_id).is_some_and(|s| s.ending_sequence.is_some());
        if !closed {
            return Ok(ReadBatch::default());
        }
        self.fill(max_records)?;
        if !self.pending.is_empty() {
            return Ok(ReadBatch {
                records: self.take(max_records),
                end_of_shard: None,
                millis_behind_latest: None,
                timed_out: false,
            });
        }
        self.ended = true;
        let children = meta
            .shards
            .iter()
            .filter(|s| s.parents.contains(&self.shard_id))
            .map(|s| Arc::clone(&s.shard_id))
            .collect();
        Ok(ReadBatch {
            records: Vec::new(),
            end_of_shard: Some(children),
            millis_behind_latest: None,
            timed_out: false,
        })
    }
}
