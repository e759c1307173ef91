//! Reading one shard forward with `GetRecords`, and turning Kinesis records into user records.

use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use sluice_blockstore::{Position, Record, SequenceNumber};

use super::kpl::{self, Deaggregated};
use super::{Inner, bump, classify};
use crate::aws::block_on;
use crate::source::{ReadBatch, ShardReader, SourceError, StartingPosition};

/// What a `GetRecords` page held, de-aggregated.
pub(super) struct Page {
    pub(super) records: Vec<Record>,
    pub(super) next_iterator: Option<String>,
    /// Set when the page reports the shard's end: `ChildShards`, or no next iterator.
    pub(super) children: Option<Vec<Arc<str>>>,
    pub(super) millis_behind_latest: Option<i64>,
    /// Kinesis records (not user records) on the page.
    pub(super) kinesis_records: usize,
}

impl Inner {
    /// One `GetRecords` call in the shard's budget. `replay` picks which counter it bumps.
    pub(super) fn get_records(
        &self,
        shard: &Arc<str>,
        iterator: &str,
        limit: usize,
        replay: bool,
    ) -> Result<Page, SourceError> {
        let waited = self.budget.acquire(shard);
        bump(&self.metrics.budget_wait_ms, waited.as_millis() as u64);
        let started = Instant::now();
        let request = self
            .client
            .get_records()
            .shard_iterator(iterator)
            .limit(limit.clamp(1, 10_000) as i32);
        let counter = if replay {
            &self.metrics.replay_get_records_calls
        } else {
            &self.metrics.get_records_calls
        };
        bump(counter, 1);
        let out = match block_on(request.send()) {
            Ok(out) => out,
            Err(e) => {
                let error = self.note(classify(&e, "GetRecords"));
                if matches!(error, SourceError::Throttled(_)) {
                    // Nobody in this process reads the shard for a second: the service's window.
                    self.budget.back_off(shard, std::time::Duration::from_secs(1));
                }
                return Err(error);
            }
        };
        let kinesis_records = out.records.len();
        let (records, bytes) = self.user_records(shard, out.records)?;
        self.budget.charge(shard, started, bytes);
        bump(&self.metrics.kinesis_records_read, kinesis_records as u64);
        bump(&self.metrics.bytes_read, bytes as u64);
        let children = match (&out.child_shards, &out.next_shard_iterator) {
            (Some(children), _) if !children.is_empty() => {
                Some(children.iter().map(|c| Arc::from(c.shard_id())).collect())
            }
            (_, None) => Some(Vec::new()),
            _ => None,
        };
        Ok(Page {
            records,
            next_iterator: out.next_shard_iterator,
            children,
            millis_behind_latest: out.millis_behind_latest,
            kinesis_records,
        })
    }

    /// Kinesis records of `shard` as user records (KPL aggregates de-aggregated, sub-record `i`
    /// of the record with sequence number `s` at position `(s, i)`), with their payload bytes.
    /// Polling pages and enhanced fan-out events both come through here.
    pub(super) fn user_records(
        &self,
        shard: &Arc<str>,
        kinesis_records: Vec<aws_sdk_kinesis::types::Record>,
    ) -> Result<(Vec<Record>, usize), SourceError> {
        let bytes = kinesis_records.iter().map(|r| r.data.as_ref().len()).sum();
        let mut records = Vec::with_capacity(kinesis_records.len());
        for record in kinesis_records {
            let sequence = SequenceNumber::parse(&record.sequence_number).map_err(|e| {
                SourceError::Invalid(format!(
                    "Kinesis returned sequence number {:?} on {}/{shard}: {e}",
                    record.sequence_number, self.stream
                ))
            })?;
            let arrival = record
                .approximate_arrival_timestamp
                .and_then(|t| t.to_millis().ok())
                .unwrap_or(0);
            let data = Bytes::from(record.data.into_inner());
            match kpl::deaggregate(&data) {
                Deaggregated::Aggregate(subs) => {
                    for (index, sub) in subs.into_iter().enumerate() {
                        records.push(Record {
                            shard_id: shard.clone(),
                            position: Position::new(sequence.clone(), index as u64),
                            partition_key: Arc::from(sub.partition_key),
                            approximate_arrival_ms: arrival,
                            data: sub.data,
                        });
                    }
                    continue;
                }
                Deaggregated::Invalid(why) => {
                    bump(&self.metrics.invalid_aggregates, 1);
                    tracing::warn!(stream = %self.stream, shard = %shard, sequence = %sequence, why,
                        "record starts with the KPL magic but is not a valid aggregate; delivered whole");
                }
                Deaggregated::Plain => {}
            }
            records.push(Record {
                shard_id: shard.clone(),
                position: Position::new(sequence, 0),
                partition_key: Arc::from(record.partition_key.unwrap_or_default()),
                approximate_arrival_ms: arrival,
                data,
            });
        }
        Ok((records, bytes))
    }

    /// The children of a closed shard from `ListShards`, for a shard end without `ChildShards`.
    pub(super) fn children_of(&self, shard: &str) -> Result<Vec<Arc<str>>, SourceError> {
        Ok(self
            .list_shards()?
            .into_iter()
            .filter(|s| s.parent_shard_ids.iter().any(|p| &**p == shard))
            .map(|s| s.shard_id)
            .collect())
    }
}

/// Which records at the start of a reader were already delivered.
#[derive(Debug, Clone)]
pub(super) enum Skip {
    Nothing,
    /// Drop positions `< p` (`AtPosition`).
    Before(Position),
    /// Drop positions `<= p` (`AfterPosition`).
    UpTo(Position),
}

impl Skip {
    /// What a reader opened at `start` drops: it starts at the position's sequence number, so
    /// the sub-records of an aggregate before (or at) the position come back too.
    pub(super) fn from_start(start: &StartingPosition) -> Self {
        match start {
            StartingPosition::AtPosition(p) => Skip::Before(p.clone()),
            StartingPosition::AfterPosition(p) => Skip::UpTo(p.clone()),
            _ => Skip::Nothing,
        }
    }

    fn keeps(&self, p: &Position) -> bool {
        match self {
            Skip::Nothing => true,
            Skip::Before(from) => p >= from,
            Skip::UpTo(after) => p > after,
        }
    }

    /// Drops the records at the start of `records` that were already delivered.
    pub(super) fn apply(&mut self, records: &mut Vec<Record>) {
        if !matches!(self, Skip::Nothing) {
            records.retain(|r| self.keeps(&r.position));
            if !records.is_empty() {
                // Positions ascend: past the starting position, nothing more to drop.
                *self = Skip::Nothing;
            }
        }
    }
}

pub(super) struct KinesisShardReader {
    inner: Arc<Inner>,
    shard: Arc<str>,
    iterator: Option<String>,
    skip: Skip,
    ended: bool,
}

impl KinesisShardReader {
    pub(super) fn open(inner: Arc<Inner>, shard_id: &str, start: &StartingPosition) -> Result<Self, SourceError> {
        let iterator = inner.shard_iterator(shard_id, start)?;
        Ok(Self {
            shard: Arc::from(shard_id),
            inner,
            iterator: Some(iterator),
            skip: Skip::from_start(start),
            ended: false,
        })
    }
}

impl ShardReader for KinesisShardReader {
    fn read(&mut self, max_records: usize) -> Result<ReadBatch, SourceError> {
        if self.ended {
            return Err(SourceError::Invalid(format!(
                "shard {}/{} was already read to its end",
                self.inner.stream, self.shard
            )));
        }
        let Some(iterator) = self.iterator.as_deref() else {
            return Err(SourceError::IteratorExpired(
                "the reader has no iterator; reopen it".into(),
            ));
        };
        let page = match self.inner.get_records(&self.shard, iterator, max_records, false) {
            Ok(page) => page,
            Err(e) => {
                if !matches!(e, SourceError::Throttled(_)) {
                    // The iterator may be spent; the loop reopens after the last record.
                    self.iterator = None;
                }
                return Err(e);
            }
        };
        let mut records = page.records;
        self.skip.apply(&mut records);
        let end_of_shard = match page.children {
            Some(children) if children.is_empty() => Some(self.inner.children_of(&self.shard)?),
            other => other,
        };
        self.ended = end_of_shard.is_some();
        self.iterator = page.next_iterator;
        Ok(ReadBatch {
            records,
            end_of_shard,
            millis_behind_latest: page.millis_behind_latest,
            timed_out: false,
        })
    }
}
