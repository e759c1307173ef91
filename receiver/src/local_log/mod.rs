//! The embedded local log: a Kinesis-like sharded, replayable log in a directory, the default
//! source (no AWS needed).
//!
//! # Why
//! Sluice's exactly-once story rests on replay: a block that has no valid copy is rebuilt by
//! re-reading its ranges from the source. The local log gives that property on one machine, with
//! the same shapes as Kinesis (56-digit sequence numbers, hash-key ranges, split/merge with
//! parent/child links, KPL-style aggregated records, retention), so the shared shard-reading
//! loop is exercised exactly as it would be against Kinesis.
//!
//! # Layout
//! ```text
//! <dir>/<stream>/meta.json             shard map (atomic temp + rename writes)
//! <dir>/<stream>/.writer.lock          flock'd by the one producer
//! <dir>/<stream>/<shard id>/<first sequence>.seg   append-only segments, rolled at a size limit
//! ```
//! `meta.json` holds the stream name, the segment size limit, the [`RetentionPolicy`] and one
//! entry per shard: `shard_id`, `index`, `parents`, `hash_start`/`hash_end` (inclusive, decimal
//! strings), `starting_counter`, `ending_sequence` (set when closed) and `trim_horizon` (set
//! after retention deleted segments; every position below it is gone).
//!
//! # Sequence numbers
//! `495903382714902566` followed by `counter * 10^6 + shard_index` zero-padded to 38 digits: 56
//! digits, fixed width. The counter increases by one per stored record in a shard, so numbers
//! are strictly increasing per shard; the shard index in the low digits makes them unique across
//! shards; children start at a counter above all their parents', so a child's numbers are
//! greater than its parents'.
//!
//! # Record frame (all integers little-endian)
//! ```text
//! u32 body_len | u32 crc32c(body) | body:
//!   u128 sequence body (counter * 10^6 + shard index)
//!   i64  approximate arrival, ms since the epoch
//!   u8   flags (bit 0: aggregated)
//!   u32  sub-record count n (1 for a plain record)
//!   n × { u16 key_len, key (UTF-8), u32 data_len, data }
//! ```
//! Sub-record `i` of a frame has position `(sequence, i)`. [`Producer::put`] writes a plain
//! frame per record; [`Producer::append`] (bulk loads) aggregates a shard's consecutive records
//! into frames of up to 64 KiB, as the KPL does.
//!
//! # Reading
//! Segments are read in chunks of 1 MiB (a larger frame gets a buffer of its own size) and a
//! record's `data` is a slice of its chunk, so reading copies nothing per record; a record keeps
//! its chunk alive until it is dropped (the receiver builds records into blocks and drops them
//! within a block interval). A read at the tail of a live segment that found little keeps only
//! what it found. Sequence numbers of consecutive frames are formatted by carrying the previous
//! one's digits, and positions are compared as `(sequence body, sub-sequence)` integers, never as
//! 56-digit text.
//!
//! # Crash safety and concurrency
//! One producer per stream (an exclusive `flock` on `.writer.lock`). It buffers frames in memory
//! and writes them on [`Producer::flush`] (which also fsyncs) or when the buffer fills; readers see
//! what has been written. A write that fails part-way is truncated back to its last whole frame
//! and the failed call appends nothing (see [`Producer`]'s "Failed writes"; a failed fsync poisons
//! the producer). When a producer opens it scans the newest segment of each open shard and
//! truncates a torn tail (partial frame or CRC mismatch). Readers, possibly in other processes,
//! re-scan segment tails on every read and stop without error at the first incomplete frame, which
//! may still be being written. Before a shard is closed (split/merge) its data is flushed, so a
//! reader that sees the closed shard in `meta.json` and then reaches the end of the data has seen
//! every record and reports `end_of_shard` once.

mod cli_commands;
mod error;
mod frame;
mod md5_lanes;
mod meta;
mod producer;
mod reader;
mod segment;

/// CLI command functions (the `sluice` binary wires them to clap).
pub mod cli {
    pub use super::cli_commands::{KeyMode, create, describe, merge, put, split};
}

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sluice_blockstore::{
    Block, BlockBuilder, BlockCapacity, BlockMeta, Record, Replay, ReplayError, SequenceNumberRange,
    SequenceNumberRanges,
};

pub use error::{LocalLogError, PoisonCause, Result};
pub use meta::RetentionPolicy;
pub use producer::{DEFAULT_WRITE_BUFFER_BYTES, Producer, RetentionReport, hash_key, hash_keys, spread_hash_key};
pub use reader::LocalShardReader;

use frame::{BodyCheck, RecordDecoder, SequenceText, position_key};
use meta::{ShardMeta, StreamMeta, shard_id_of};
use segment::{FrameIndex, SegmentCursor, list_segments};

use crate::{ShardInfo, ShardReader, Source, SourceError, StartingPosition};

/// Default size at which a segment file is rolled.
pub const DEFAULT_SEGMENT_BYTES: u64 = 64 * 1024 * 1024;

/// How a stream is created.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StreamConfig {
    /// Number of shards, which split the hash-key space evenly.
    pub shard_count: u32,
    /// Segment files are rolled once they reach this many bytes.
    pub segment_bytes: u64,
    /// What `enforce_retention` keeps.
    pub retention: RetentionPolicy,
}

impl StreamConfig {
    /// A config with `shard_count` shards and the defaults.
    pub fn new(shard_count: u32) -> Self {
        Self {
            shard_count,
            segment_bytes: DEFAULT_SEGMENT_BYTES,
            retention: RetentionPolicy::default(),
        }
    }

    /// Checks the values.
    ///
    /// # Errors
    /// [`LocalLogError::Invalid`] for zero shards, too many shards or a zero segment size.
    pub fn validate(&self) -> Result<()> {
        if self.shard_count == 0 || u128::from(self.shard_count) >= frame::SHARD_INDEX_SPACE / 2 {
            return Err(LocalLogError::Invalid(format!(
                "shard_count must be in 1..{}, got {}",
                frame::SHARD_INDEX_SPACE / 2,
                self.shard_count
            )));
        }
        if self.segment_bytes == 0 {
            return Err(LocalLogError::Invalid("segment_bytes must be positive".into()));
        }
        Ok(())
    }
}

/// A directory holding local-log streams.
///
/// ```
/// use sluice_receiver::local_log::LocalLog;
/// use sluice_receiver::{Source, StartingPosition};
/// let dir = tempfile::tempdir()?;
/// let log = LocalLog::open(dir.path())?;
/// log.create_stream("events", 2)?;
/// let stream = log.stream("events")?;
/// let mut producer = stream.producer()?;
/// let position = producer.put("user-1", b"hello")?;
/// producer.flush()?;
/// assert_eq!(stream.list_shards()?.len(), 2);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone)]
pub struct LocalLog {
    dir: PathBuf,
}

impl LocalLog {
    /// Opens (creating if needed) a log directory.
    ///
    /// # Errors
    /// [`LocalLogError::Io`] when the directory cannot be created.
    pub fn open(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref().to_path_buf();
        fs::create_dir_all(&dir).map_err(|e| LocalLogError::io(&dir, e))?;
        Ok(Self { dir })
    }

    /// The log directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Creates a stream with `shard_count` shards and default settings.
    ///
    /// # Errors
    /// See [`LocalLog::create_stream_with`].
    pub fn create_stream(&self, name: &str, shard_count: u32) -> Result<LocalStream> {
        self.create_stream_with(name, &StreamConfig::new(shard_count))
    }

    /// Creates a stream.
    ///
    /// # Errors
    /// [`LocalLogError::StreamExists`], [`LocalLogError::Invalid`] for a bad name or config,
    /// [`LocalLogError::Io`].
    pub fn create_stream_with(&self, name: &str, config: &StreamConfig) -> Result<LocalStream> {
        validate_stream_name(name)?;
        config.validate()?;
        let stream_dir = self.dir.join(name);
        if StreamMeta::path(&stream_dir).exists() {
            return Err(LocalLogError::StreamExists { stream: name.into() });
        }
        fs::create_dir_all(&stream_dir).map_err(|e| LocalLogError::io(&stream_dir, e))?;
        let n = u128::from(config.shard_count);
        let step = u128::MAX / n;
        let shards = (0..config.shard_count)
            .map(|i| {
                let start = step * u128::from(i);
                let end = if i + 1 == config.shard_count {
                    u128::MAX
                } else {
                    step * u128::from(i + 1) - 1
                };
                ShardMeta {
                    shard_id: shard_id_of(i),
                    index: i,
                    parents: Vec::new(),
                    hash_start: start,
                    hash_end: end,
                    starting_counter: 1,
                    ending_sequence: None,
                    trim_horizon: None,
                }
            })
            .collect();
        let meta = StreamMeta {
            stream: name.into(),
            segment_bytes: config.segment_bytes,
            retention: config.retention,
            shards,
        };
        meta.store(&stream_dir)?;
        meta::sync_dir(&self.dir)?;
        self.stream(name)
    }

    /// Opens an existing stream.
    ///
    /// # Errors
    /// [`LocalLogError::UnknownStream`] when it does not exist.
    pub fn stream(&self, name: &str) -> Result<LocalStream> {
        validate_stream_name(name)?;
        let stream_dir = self.dir.join(name);
        if !StreamMeta::path(&stream_dir).exists() {
            return Err(LocalLogError::UnknownStream { stream: name.into() });
        }
        Ok(LocalStream {
            inner: Arc::new(StreamInner {
                dir: stream_dir,
                name: Arc::from(name),
                frames: Arc::default(),
            }),
        })
    }
}

fn validate_stream_name(name: &str) -> Result<()> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(LocalLogError::Invalid(format!(
            "stream name {name:?} must be 1-128 characters of [A-Za-z0-9-_.] not starting with '.'"
        )))
    }
}

#[derive(Debug)]
struct StreamInner {
    dir: PathBuf,
    name: Arc<str>,
    /// Where the frames its cursors read start, for the next cursor that starts among them.
    frames: Arc<FrameIndex>,
}

/// One stream of a [`LocalLog`]: a [`Source`] (and [`Replay`]). Cheap to clone; every call
/// re-reads `meta.json` and the segment files, so handles in other processes stay current.
#[derive(Debug, Clone)]
pub struct LocalStream {
    inner: Arc<StreamInner>,
}

/// One shard as [`LocalStream::describe`] reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShardDescription {
    /// Id, parents, hash range, ending sequence.
    pub info: ShardInfo,
    /// Number of segment files.
    pub segments: usize,
    /// Bytes in segment files.
    pub bytes: u64,
    /// Positions below this were deleted by retention.
    pub trim_horizon: Option<sluice_blockstore::SequenceNumber>,
}

/// What [`LocalStream::describe`] returns; `Display` prints it for the CLI.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct StreamDescription {
    /// Stream name.
    pub stream: String,
    /// Segment roll size.
    pub segment_bytes: u64,
    /// Retention policy.
    pub retention: RetentionPolicy,
    /// Every shard, open and closed.
    pub shards: Vec<ShardDescription>,
}

impl fmt::Display for StreamDescription {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "stream {} (segment {} bytes, retention bytes {:?} age ms {:?})",
            self.stream, self.segment_bytes, self.retention.max_bytes, self.retention.max_age_ms
        )?;
        for shard in &self.shards {
            let parents: Vec<&str> = shard.info.parent_shard_ids.iter().map(|p| &**p).collect();
            writeln!(
                f,
                "  {} {} hash {}..={} parents [{}] segments {} bytes {}{}",
                shard.info.shard_id,
                match &shard.info.ending_sequence {
                    Some(end) => format!("CLOSED at {end}"),
                    None => "OPEN".to_owned(),
                },
                shard.info.hash_key_range.0,
                shard.info.hash_key_range.1,
                parents.join(", "),
                shard.segments,
                shard.bytes,
                shard
                    .trim_horizon
                    .as_ref()
                    .map(|h| format!(" trimmed below {h}"))
                    .unwrap_or_default(),
            )?;
        }
        Ok(())
    }
}

impl LocalStream {
    /// The stream name.
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// The stream directory.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub(crate) fn shard_dir(&self, shard_id: &str) -> PathBuf {
        self.inner.dir.join(shard_id)
    }

    /// A cursor over a shard's frames that starts at `target` (or the oldest frame), seeking
    /// through the frames this handle's cursors have read.
    pub(crate) fn cursor(&self, shard_id: &str, target: Option<u128>) -> SegmentCursor {
        SegmentCursor::new(self.shard_dir(shard_id), target, Arc::clone(&self.inner.frames))
    }

    /// A cursor at the end of a shard's valid frames.
    pub(crate) fn cursor_at_tail(&self, shard_id: &str) -> Result<SegmentCursor> {
        SegmentCursor::at_tail(self.shard_dir(shard_id), Arc::clone(&self.inner.frames))
    }

    pub(crate) fn load_meta(&self) -> Result<StreamMeta> {
        StreamMeta::load(&self.inner.dir)
    }

    /// Opens the single producer of this stream (system clock for arrival times).
    ///
    /// # Errors
    /// [`LocalLogError::WriterLocked`] when another producer holds the lock; I/O errors.
    pub fn producer(&self) -> Result<Producer> {
        Producer::open(self.clone(), Arc::new(sluice_blockstore::SystemClock))
    }

    /// Opens the producer with an injected clock for arrival times and retention age.
    ///
    /// # Errors
    /// As [`LocalStream::producer`].
    pub fn producer_with_clock(&self, clock: sluice_blockstore::SharedClock) -> Result<Producer> {
        Producer::open(self.clone(), clock)
    }

    /// Shards, segments and sizes, for the CLI.
    ///
    /// # Errors
    /// I/O or metadata errors.
    pub fn describe(&self) -> Result<StreamDescription> {
        let meta = self.load_meta()?;
        let mut shards = Vec::with_capacity(meta.shards.len());
        for shard in &meta.shards {
            let segments = list_segments(&self.shard_dir(&shard.shard_id))?;
            let mut bytes = 0;
            for s in &segments {
                bytes += fs::metadata(&s.path).map_or(0, |m| m.len());
            }
            shards.push(ShardDescription {
                info: shard.info(),
                segments: segments.len(),
                bytes,
                trim_horizon: shard.trim_horizon.clone(),
            });
        }
        Ok(StreamDescription {
            stream: meta.stream,
            segment_bytes: meta.segment_bytes,
            retention: meta.retention,
            shards,
        })
    }

    /// The stream's metadata, for a replay (failing to read it is retryable).
    fn replay_meta(&self) -> Result<StreamMeta, ReplayError> {
        self.load_meta().map_err(|e| ReplayError::Unavailable {
            detail: e.to_string(),
            source: Some(Box::new(e)),
        })
    }

    /// Walks the frames holding `range`'s records (and maybe others before or after it in the
    /// same frames) in order, handing each to `visit`, which returns how many of the range's
    /// records it took from it. Checked: the shard exists, retention kept the records, and the
    /// frames hold exactly `record_count` of them.
    ///
    /// One pass, frame by frame: a visitor that keeps nothing of a frame lets the segment reader
    /// read the next chunk into the same buffer.
    fn scan_range(
        &self,
        meta: &StreamMeta,
        range: &SequenceNumberRange,
        check: BodyCheck,
        mut visit: impl FnMut(&RangeScan, &frame::Frame) -> Result<usize, ReplayError>,
    ) -> Result<(), ReplayError> {
        let unavailable = |e: LocalLogError| ReplayError::Unavailable {
            detail: e.to_string(),
            source: Some(Box::new(e)),
        };
        let shard = meta.shard(&range.shard_id).ok_or_else(|| ReplayError::UnknownShard {
            stream: self.name().to_owned(),
            shard_id: range.shard_id.to_string(),
        })?;
        if let Some(horizon) = &shard.trim_horizon
            && range.from.sequence < *horizon
        {
            return Err(ReplayError::DataExpired {
                range: range.clone(),
                detail: format!("retention trimmed everything below {horizon}"),
            });
        }
        let not_ours = |p: &sluice_blockstore::Position| ReplayError::UnknownShard {
            stream: self.name().to_owned(),
            shard_id: format!("{} (not a local-log sequence {})", range.shard_id, p.sequence),
        };
        let scan = RangeScan {
            shard_id: Arc::clone(&shard.shard_id),
            from: position_key(&range.from).ok_or_else(|| not_ours(&range.from))?,
            to: position_key(&range.to).ok_or_else(|| not_ours(&range.to))?,
        };
        let mut cursor = self.cursor(&range.shard_id, Some(scan.from.0)).with_body_check(check);
        let mut found = 0u64;
        loop {
            let frame = match cursor.next_frame() {
                Ok(Some(frame)) => frame,
                Ok(None) => break,
                Err(LocalLogError::Io { source, .. }) if source.kind() == std::io::ErrorKind::NotFound => {
                    return Err(ReplayError::DataExpired {
                        range: range.clone(),
                        detail: "a segment was deleted by retention during the replay".into(),
                    });
                }
                Err(e) => return Err(unavailable(e)),
            };
            if frame.sequence_body > scan.to.0 {
                break;
            }
            if frame.sequence_body >= scan.from.0 {
                found += visit(&scan, &frame)? as u64;
            }
        }
        if found != range.record_count {
            return Err(ReplayError::CountMismatch {
                range: range.clone(),
                expected: range.record_count,
                found,
            });
        }
        Ok(())
    }
}

/// One replayed range of a shard ([`LocalStream::scan_range`]).
struct RangeScan {
    shard_id: Arc<str>,
    /// The range's ends as `(sequence body, sub-sequence)`.
    from: (u128, u64),
    to: (u128, u64),
}

impl RangeScan {
    fn contains(&self, body: u128, sub: u64) -> bool {
        self.from <= (body, sub) && (body, sub) <= self.to
    }

    /// Whether every sub-record of `frame` is in the range (most frames of a range are), so that
    /// none has to be compared.
    fn contains_frame(&self, frame: &frame::Frame) -> bool {
        self.contains(frame.sequence_body, 0) && self.contains(frame.sequence_body, u64::from(frame.count) - 1)
    }
}

impl Replay for LocalStream {
    fn replay(&self, ranges: &SequenceNumberRanges) -> Result<Vec<Record>, ReplayError> {
        let meta = self.replay_meta()?;
        let mut out = Vec::new();
        let mut decoder = RecordDecoder::default();
        for range in ranges {
            out.reserve(usize::try_from(range.record_count).unwrap_or(0));
            self.scan_range(&meta, range, BodyCheck::Full, |scan, frame| {
                let before = out.len();
                let whole = scan.contains_frame(frame);
                let in_range = |body, sub| whole || scan.contains(body, sub);
                frame.push_records(&scan.shard_id, &mut decoder, in_range, |r| out.push(r));
                Ok(out.len() - before)
            })?;
        }
        Ok(out)
    }

    /// Decodes the ranges' frames straight into the block's columns, in one pass: no [`Record`]
    /// per record, one sequence number formatted per stored record (not per aggregated one), the
    /// payloads copied once, from the segment reader's buffer (reused from chunk to chunk, since
    /// nothing keeps a slice of it) into the block, whose columns are sized by `meta`.
    fn replay_block(&self, meta: &BlockMeta) -> Result<Block, ReplayError> {
        let ranges = &meta.ranges;
        let stream_meta = self.replay_meta()?;
        // Every local-log sequence number has 56 digits, so every number of a range starts with
        // what its two ends have in common, and the block's prefix is what all the ends share.
        let ends = ranges
            .iter()
            .flat_map(|r| [r.from.sequence.as_str(), r.to.sequence.as_str()]);
        let prefix = ends
            .clone()
            .reduce(|a, b| &a[..a.bytes().zip(b.bytes()).take_while(|(x, y)| x == y).count()])
            .unwrap_or("");
        let suffix_len = ends.map(str::len).max().unwrap_or(0).saturating_sub(prefix.len());
        let records = ranges
            .iter()
            .map(|r| usize::try_from(r.record_count).unwrap_or(0))
            .sum::<usize>();
        // `num_bytes` counts keys and payloads together: the payload column gets room for both
        // (and gives back what it did not use); the key column grows.
        let mut builder = BlockBuilder::new(
            prefix,
            BlockCapacity {
                records,
                sequence_suffix_bytes: records * suffix_len,
                key_bytes: 0,
                data_bytes: usize::try_from(meta.num_bytes).unwrap_or(0),
            },
        );
        let rebuild = |e: sluice_blockstore::Error| ReplayError::Rebuild(Box::new(e));
        let mut sequences = SequenceText::default();
        for range in ranges {
            self.scan_range(&stream_meta, range, BodyCheck::FixedPart, |scan, frame| {
                let formatted;
                let digits = if let Some(digits) = sequences.digits(frame.sequence_body) {
                    &digits[..]
                } else {
                    formatted = frame::sequence_of_body(frame.sequence_body);
                    formatted.as_str().as_bytes()
                };
                // Every number of the range is 56 digits long and starts with the prefix.
                let suffix = &digits[prefix.len()..];
                let whole = scan.contains_frame(frame);
                let records = frame.sub_records_where(|body, sub| whole || scan.contains(body, sub));
                builder
                    .push_run(&scan.shard_id, suffix, frame.arrival_ms, records)
                    .map_err(rebuild)
            })?;
        }
        builder.finish(meta.id, ranges.clone()).map_err(rebuild)
    }
}

impl Source for LocalStream {
    fn stream_name(&self) -> &str {
        self.name()
    }

    /// Replaying a range reads the same local disk a stored copy would be read from.
    fn default_storage_level(&self) -> sluice_blockstore::StorageLevel {
        sluice_blockstore::StorageLevel::MEMORY_ONLY
    }

    fn list_shards(&self) -> Result<Vec<ShardInfo>, SourceError> {
        Ok(self.load_meta()?.shards.iter().map(ShardMeta::info).collect())
    }

    fn open_reader(&self, shard_id: &str, start: &StartingPosition) -> Result<Box<dyn ShardReader>, SourceError> {
        Ok(Box::new(LocalShardReader::open(self, shard_id, start)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replay_cursor_starts_where_the_handles_live_reads_indexed_its_range() {
        let dir = tempfile::tempdir().unwrap();
        let stream = LocalLog::open(dir.path()).unwrap().create_stream("s", 1).unwrap();
        let mut producer = stream.producer().unwrap();
        // 3,000 frames of ~2 KB: about five hundred per indexed MiB.
        for i in 0..3_000 {
            producer.put("k", vec![(i % 251) as u8; 2_000]).unwrap();
        }
        producer.flush().unwrap();
        let shard = stream.list_shards().unwrap()[0].shard_id.clone();
        // The receiver's live read, through the handle.
        let mut reader = stream.open_reader(&shard, &StartingPosition::TrimHorizon).unwrap();
        let mut bodies = Vec::new();
        loop {
            let page = reader.read(1_000).unwrap();
            if page.records.is_empty() {
                break;
            }
            bodies.extend(page.records.iter().map(|r| position_key(&r.position).unwrap().0));
        }
        assert_eq!(bodies.len(), 3_000);
        // A clone of the handle (what the engine's block reader holds) starts a replay of record
        // 2,500 within an indexed MiB of it, not at the segment's first frame.
        let target = bodies[2_500];
        let first = |stream: &LocalStream| {
            let mut cursor = stream.cursor(&shard, Some(target));
            cursor.next_frame().unwrap().unwrap().sequence_body
        };
        let started = first(&stream.clone());
        assert!((bodies[1_900]..=target).contains(&started), "started at {started}");
        // A handle that read nothing reads the segment from its start.
        let fresh = LocalLog::open(dir.path()).unwrap().stream("s").unwrap();
        assert_eq!(first(&fresh), bodies[0]);
    }
}
