//! A small Kinesis producer and stream admin: what the examples, the `sluice kinesis` command and
//! the tests write with. Like the local log's [`Producer`](crate::Producer) it also reshards.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use aws_sdk_kinesis::Client;
use aws_sdk_kinesis::error::ProvideErrorMetadata;
use aws_sdk_kinesis::primitives::Blob;
use aws_sdk_kinesis::types::{PutRecordsRequestEntry, StreamStatus};
use sluice_blockstore::{Position, SequenceNumber};

use super::{KinesisConfig, KinesisError, classify, kpl};
use crate::aws::block_on;
use crate::source::SourceError;

/// `PutRecords` takes at most 500 records…
const MAX_BATCH_RECORDS: usize = 500;
/// …and 5 MiB per call.
const MAX_BATCH_BYTES: usize = 5 * 1024 * 1024;
/// Attempts for one batch whose entries keep failing (throttling).
const MAX_PUT_ATTEMPTS: u32 = 20;

/// Writes records to a stream and changes its shards.
#[derive(Debug, Clone)]
pub struct KinesisProducer {
    client: Client,
    stream: String,
}

impl KinesisProducer {
    /// A producer for `config.stream_name` (the stream need not exist yet: see
    /// [`KinesisProducer::create_stream`]).
    ///
    /// # Errors
    /// [`KinesisError::Config`].
    pub fn new(config: &KinesisConfig) -> Result<Self, KinesisError> {
        config.validate()?;
        let sdk = config.aws.load()?;
        Ok(Self {
            client: config.aws.kinesis_client(&sdk),
            stream: config.stream_name.clone(),
        })
    }

    /// Creates the stream with `shards` shards (provisioned mode) unless it exists, and waits
    /// until it is active. Returns whether it created it.
    ///
    /// # Errors
    /// What Kinesis said (shard limits, bad name).
    pub fn create_stream(&self, shards: u32) -> Result<bool, SourceError> {
        let request = self
            .client
            .create_stream()
            .stream_name(&self.stream)
            .shard_count(shards as i32);
        let created = match block_on(request.send()) {
            Ok(_) => true,
            Err(e) if e.code() == Some("ResourceInUseException") => false,
            Err(e) => return Err(classify(&e, "CreateStream")),
        };
        self.wait_active(Duration::from_secs(60))?;
        Ok(created)
    }

    /// Waits until the stream is `ACTIVE` again (after a create, split or merge).
    ///
    /// # Errors
    /// [`SourceError::Unavailable`] when it is not active within `timeout`.
    pub fn wait_active(&self, timeout: Duration) -> Result<(), SourceError> {
        let deadline = Instant::now() + timeout;
        loop {
            let request = self.client.describe_stream_summary().stream_name(&self.stream);
            let out = block_on(request.send()).map_err(|e| classify(&e, "DescribeStreamSummary"))?;
            if out
                .stream_description_summary()
                .map(aws_sdk_kinesis::types::StreamDescriptionSummary::stream_status)
                == Some(&StreamStatus::Active)
            {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(SourceError::Unavailable {
                    detail: format!("stream {} is not ACTIVE after {timeout:?}", self.stream),
                    source: None,
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Puts records, keeping each partition key's order: no two records of one key are in flight
    /// at once, and entries a batch failed (throttled) are retried before the next batch goes
    /// out. Returns each record's position, in input order.
    ///
    /// # Errors
    /// A call that failed outright, or entries still failing after 20 attempts in a row that
    /// got nothing through.
    pub fn put<K: AsRef<str>, D: AsRef<[u8]>>(&self, records: &[(K, D)]) -> Result<Vec<Position>, SourceError> {
        let mut positions = Vec::with_capacity(records.len());
        let mut batch: Vec<usize> = Vec::new();
        let mut keys: HashSet<&str> = HashSet::new();
        let mut bytes = 0;
        for (i, (key, data)) in records.iter().enumerate() {
            let (key, size) = (key.as_ref(), data.as_ref().len() + key.as_ref().len());
            if keys.contains(key) || batch.len() == MAX_BATCH_RECORDS || bytes + size > MAX_BATCH_BYTES {
                positions.extend(self.put_batch(records, &batch)?);
                batch.clear();
                keys.clear();
                bytes = 0;
            }
            batch.push(i);
            keys.insert(key);
            bytes += size;
        }
        if !batch.is_empty() {
            positions.extend(self.put_batch(records, &batch)?);
        }
        Ok(positions)
    }

    fn put_batch<K: AsRef<str>, D: AsRef<[u8]>>(
        &self,
        records: &[(K, D)],
        batch: &[usize],
    ) -> Result<Vec<Position>, SourceError> {
        let mut result: Vec<Option<Position>> = vec![None; batch.len()];
        let mut pending: Vec<usize> = (0..batch.len()).collect();
        // Attempts without progress: the backoff grows only while nothing gets through.
        let mut stalled = 0u32;
        while stalled < MAX_PUT_ATTEMPTS {
            if stalled > 0 {
                std::thread::sleep(put_backoff(stalled));
            }
            let entries = pending
                .iter()
                .map(|&j| {
                    let (key, data) = &records[batch[j]];
                    PutRecordsRequestEntry::builder()
                        .partition_key(key.as_ref())
                        .data(Blob::new(data.as_ref()))
                        .build()
                        .expect("partition key and data are set")
                })
                .collect::<Vec<_>>();
            let request = self
                .client
                .put_records()
                .stream_name(&self.stream)
                .set_records(Some(entries));
            let out = match block_on(request.send()) {
                Ok(out) => out,
                Err(e) => match classify(&e, "PutRecords") {
                    SourceError::Throttled(_) | SourceError::Unavailable { .. } => {
                        stalled += 1;
                        continue;
                    }
                    other => return Err(other),
                },
            };
            let mut still = Vec::new();
            for (&j, entry) in pending.iter().zip(out.records()) {
                match entry.sequence_number() {
                    Some(seq) => result[j] = Some(Position::new(parse(seq)?, 0)),
                    None => still.push(j),
                }
            }
            stalled = if still.len() < pending.len() { 1 } else { stalled + 1 };
            pending = still;
            if pending.is_empty() {
                return Ok(result.into_iter().map(|p| p.expect("every entry succeeded")).collect());
            }
        }
        Err(SourceError::Throttled(format!(
            "{} records to {} still failing after {MAX_PUT_ATTEMPTS} attempts",
            pending.len(),
            self.stream
        )))
    }

    /// Puts several user records as one KPL aggregate (under the first record's partition key,
    /// as the KPL does). Returns the aggregate's sequence number: sub-record `i` is at
    /// `(sequence, i)`.
    ///
    /// # Errors
    /// What Kinesis said; [`SourceError::Invalid`] for an empty `records`.
    pub fn put_aggregated<K: AsRef<str>, D: AsRef<[u8]>>(
        &self,
        records: &[(K, D)],
    ) -> Result<SequenceNumber, SourceError> {
        let Some((first_key, _)) = records.first() else {
            return Err(SourceError::Invalid("an aggregate needs at least one record".into()));
        };
        let payload = kpl::aggregate(records);
        for attempt in 0..MAX_PUT_ATTEMPTS {
            if attempt > 0 {
                std::thread::sleep(put_backoff(attempt));
            }
            let request = self
                .client
                .put_record()
                .stream_name(&self.stream)
                .partition_key(first_key.as_ref())
                .data(Blob::new(payload.clone()));
            match block_on(request.send()) {
                Ok(out) => return parse(out.sequence_number()),
                Err(e) => match classify(&e, "PutRecord") {
                    SourceError::Throttled(_) | SourceError::Unavailable { .. } => {}
                    other => return Err(other),
                },
            }
        }
        Err(SourceError::Throttled(format!(
            "aggregate to {} still failing after {MAX_PUT_ATTEMPTS} attempts",
            self.stream
        )))
    }

    /// Splits `shard_id` at the middle of its hash-key range (or at `new_starting_hash_key`)
    /// and waits for the stream to be active.
    ///
    /// # Errors
    /// What Kinesis said (unknown or closed shard, resharding limits).
    pub fn split_shard(&self, shard_id: &str, new_starting_hash_key: Option<u128>) -> Result<(), SourceError> {
        let key =
            if let Some(key) = new_starting_hash_key {
                key
            } else {
                let request = self.client.list_shards().stream_name(&self.stream);
                let out = block_on(request.send()).map_err(|e| classify(&e, "ListShards"))?;
                let shard = out.shards().iter().find(|s| s.shard_id() == shard_id).ok_or_else(|| {
                    SourceError::UnknownShard {
                        stream: self.stream.clone(),
                        shard_id: shard_id.to_owned(),
                    }
                })?;
                let range = shard
                    .hash_key_range()
                    .ok_or_else(|| SourceError::Invalid(format!("shard {shard_id} has no hash key range")))?;
                let low: u128 = range.starting_hash_key().parse().unwrap_or(0);
                let high: u128 = range.ending_hash_key().parse().unwrap_or(u128::MAX);
                low + (high - low) / 2 + 1
            };
        let request = self
            .client
            .split_shard()
            .stream_name(&self.stream)
            .shard_to_split(shard_id)
            .new_starting_hash_key(key.to_string());
        block_on(request.send()).map_err(|e| classify(&e, "SplitShard"))?;
        self.wait_active(Duration::from_secs(60))
    }

    /// Merges two adjacent shards and waits for the stream to be active.
    ///
    /// # Errors
    /// What Kinesis said (not adjacent, closed).
    pub fn merge_shards(&self, shard_id: &str, adjacent_shard_id: &str) -> Result<(), SourceError> {
        let request = self
            .client
            .merge_shards()
            .stream_name(&self.stream)
            .shard_to_merge(shard_id)
            .adjacent_shard_to_merge(adjacent_shard_id);
        block_on(request.send()).map_err(|e| classify(&e, "MergeShards"))?;
        self.wait_active(Duration::from_secs(60))
    }

    /// Deletes the stream (tests and examples clean up with it).
    ///
    /// # Errors
    /// What Kinesis said.
    pub fn delete_stream(&self) -> Result<(), SourceError> {
        let request = self
            .client
            .delete_stream()
            .stream_name(&self.stream)
            .enforce_consumer_deletion(true);
        match block_on(request.send()) {
            Ok(_) => Ok(()),
            Err(e) if e.code() == Some("ResourceNotFoundException") => Ok(()),
            Err(e) => Err(classify(&e, "DeleteStream")),
        }
    }
}

/// Backoff before attempt `n` (1-based) of a throttled put: 100 ms doubling to 1 s (the
/// service's limits are per second).
fn put_backoff(n: u32) -> Duration {
    Duration::from_millis((50u64 << n.min(5)).min(1_000))
}

fn parse(sequence: &str) -> Result<SequenceNumber, SourceError> {
    SequenceNumber::parse(sequence)
        .map_err(|e| SourceError::Invalid(format!("Kinesis returned sequence number {sequence:?}: {e}")))
}
