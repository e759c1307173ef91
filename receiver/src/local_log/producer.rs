//! [`Producer`]: the single writer of a local-log stream.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use md5::{Digest, Md5};
use sluice_blockstore::{Position, SharedClock};

use super::LocalStream;
use super::error::{LocalLogError, Result};
use super::frame::{self, SHARD_INDEX_SPACE, SequenceText, sequence_of};
use super::meta::{RetentionPolicy, ShardMeta, StreamMeta, shard_id_of, sync_dir};
use super::segment::{SegmentFile, list_segments, segment_name};
use crate::file_lock::FileLock;

/// Frames are buffered in memory up to this many bytes per shard before they are written.
pub const DEFAULT_WRITE_BUFFER_BYTES: usize = 1024 * 1024;

/// Name of the writer lock file inside the stream directory.
const LOCK_FILE: &str = ".writer.lock";

/// What [`Producer::enforce_retention`] deleted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RetentionReport {
    /// Segment files deleted.
    pub segments_deleted: usize,
    /// Bytes freed.
    pub bytes_deleted: u64,
}

/// The open segment of one open shard, plus its write buffer.
#[derive(Debug)]
struct ShardWriter {
    shard_id: Arc<str>,
    index: u32,
    /// The shard's hash-key range, inclusive.
    hash_start: u128,
    hash_end: u128,
    dir: PathBuf,
    next_counter: u128,
    /// The open segment file and its path; `None` until the first write after open or a roll.
    file: Option<(File, PathBuf)>,
    /// Bytes of the current segment (written plus buffered).
    segment_len: u64,
    buffer: Vec<u8>,
    dirty: bool,
    /// Formats the sequence numbers `put` returns (consecutive, so mostly one digit changes).
    sequences: SequenceText,
}

impl ShardWriter {
    fn write_buffer(&mut self) -> Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let (file, path) = self.file.as_mut().expect("a buffered frame always has a segment");
        file.write_all(&self.buffer).map_err(|e| LocalLogError::io(&*path, e))?;
        self.buffer.clear();
        self.dirty = true;
        Ok(())
    }

    fn sync(&mut self) -> Result<()> {
        self.write_buffer()?;
        if self.dirty
            && let Some((file, path)) = &self.file
        {
            file.sync_data().map_err(|e| LocalLogError::io(path, e))?;
            self.dirty = false;
        }
        Ok(())
    }

    /// Starts a new segment whose first record has `first_body`.
    fn roll(&mut self, first_body: u128) -> Result<()> {
        self.sync()?;
        fs::create_dir_all(&self.dir).map_err(|e| LocalLogError::io(&self.dir, e))?;
        let path = self.dir.join(segment_name(first_body));
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| LocalLogError::io(&path, e))?;
        sync_dir(&self.dir)?;
        self.file = Some((file, path));
        self.segment_len = 0;
        Ok(())
    }
}

/// The single writer of a [`LocalStream`]: puts records (plain or aggregated), reshards, and
/// enforces retention.
///
/// Frames are buffered per shard and written when the buffer fills or on [`Producer::flush`],
/// which also fsyncs; readers see a record once it is written. Dropping the producer writes the
/// buffers without fsync and releases the lock; call [`Producer::flush`] to make data durable.
#[derive(Debug)]
pub struct Producer {
    stream: LocalStream,
    meta: StreamMeta,
    clock: SharedClock,
    /// One per open shard.
    writers: Vec<ShardWriter>,
    buffer_limit: usize,
    _lock: FileLock,
}

/// The Kinesis hash key of a partition key: MD5 as a big-endian `u128`.
pub fn hash_key(partition_key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

fn lock_writer(stream: &LocalStream) -> Result<FileLock> {
    let path = stream.dir().join(LOCK_FILE);
    match FileLock::try_exclusive(&path) {
        Ok(Some(lock)) => Ok(lock),
        Ok(None) => Err(LocalLogError::WriterLocked {
            stream: stream.name().to_owned(),
            lock_path: path,
        }),
        Err(e) => Err(LocalLogError::io(&path, e)),
    }
}

impl Producer {
    pub(crate) fn open(stream: LocalStream, clock: SharedClock) -> Result<Self> {
        let lock = lock_writer(&stream)?;
        let meta = stream.load_meta()?;
        let mut writers = Vec::new();
        for shard in meta.shards.iter().filter(|s| s.ending_sequence.is_none()) {
            writers.push(recover_shard(&stream, shard)?);
        }
        Ok(Self {
            stream,
            meta,
            clock,
            writers,
            buffer_limit: DEFAULT_WRITE_BUFFER_BYTES,
            _lock: lock,
        })
    }

    /// The stream this producer writes.
    pub fn stream(&self) -> &LocalStream {
        &self.stream
    }

    /// The writer of the open shard whose hash range holds `partition_key`.
    fn writer_for(&self, partition_key: &str) -> Result<usize> {
        if let [only] = &self.writers[..]
            && only.hash_start == 0
            && only.hash_end == u128::MAX
        {
            // Every hash key lands in the one open shard: skip the MD5.
            return Ok(0);
        }
        let key = hash_key(partition_key);
        self.writers
            .iter()
            .position(|w| w.hash_start <= key && key <= w.hash_end)
            .ok_or_else(|| LocalLogError::Invalid(format!("no open shard covers hash key {key}")))
    }

    fn append<K: AsRef<[u8]>, D: AsRef<[u8]>>(
        &mut self,
        partition_key: &str,
        aggregated: bool,
        sub_records: &[(K, D)],
    ) -> Result<Position> {
        for (key, data) in sub_records {
            if key.as_ref().len() > usize::from(u16::MAX) || data.as_ref().len() > frame::MAX_FRAME_BODY / 2 {
                return Err(LocalLogError::Invalid("partition key or data too large".into()));
            }
        }
        let writer = self.writer_for(partition_key)?;
        let arrival = self.clock.now_ms();
        let segment_bytes = self.meta.segment_bytes;
        let buffer_limit = self.buffer_limit;
        let writer = &mut self.writers[writer];
        let body = writer.next_counter * SHARD_INDEX_SPACE + u128::from(writer.index);
        let len = frame::frame_len(sub_records) as u64;
        if writer.file.is_none() || (writer.segment_len > 0 && writer.segment_len + len > segment_bytes) {
            writer.roll(body)?;
        }
        frame::encode_frame(&mut writer.buffer, body, arrival, aggregated, sub_records);
        writer.segment_len += len;
        writer.next_counter += 1;
        if writer.buffer.len() >= buffer_limit {
            writer.write_buffer()?;
        }
        Ok(Position::plain(writer.sequences.sequence(body)))
    }

    /// Appends one record to the shard whose hash range holds MD5(`partition_key`).
    ///
    /// # Errors
    /// [`LocalLogError::Invalid`] for a key longer than 65535 bytes; I/O errors.
    pub fn put(&mut self, partition_key: &str, data: impl AsRef<[u8]>) -> Result<Position> {
        self.append(partition_key, false, &[(partition_key, data)])
    }

    /// Appends one stored record holding several user records (KPL-style aggregation): they share
    /// one sequence number and get sub-sequence numbers `0..n`. The shard is chosen by the first
    /// record's partition key. Returns every position.
    ///
    /// # Errors
    /// [`LocalLogError::Invalid`] for an empty slice; as [`Producer::put`].
    pub fn put_aggregated<K: AsRef<str>, D: AsRef<[u8]>>(&mut self, records: &[(K, D)]) -> Result<Vec<Position>> {
        let Some((first_key, _)) = records.first() else {
            return Err(LocalLogError::Invalid(
                "an aggregated record needs at least one sub-record".into(),
            ));
        };
        let first_key = first_key.as_ref().to_owned();
        let subs: Vec<(&[u8], &[u8])> = records
            .iter()
            .map(|(k, d)| (k.as_ref().as_bytes(), d.as_ref()))
            .collect();
        let position = self.append(&first_key, true, &subs)?;
        Ok((0..records.len() as u64)
            .map(|i| Position::new(position.sequence.clone(), i))
            .collect())
    }

    /// Writes every buffered frame and fsyncs the segments written since the last flush.
    ///
    /// # Errors
    /// I/O errors; the data may then be partly written (readers and reopen handle torn tails).
    pub fn flush(&mut self) -> Result<()> {
        for writer in &mut self.writers {
            writer.sync()?;
        }
        Ok(())
    }

    fn open_shard(&self, shard_id: &str) -> Result<&ShardMeta> {
        let shard = self.meta.shard(shard_id).ok_or_else(|| LocalLogError::UnknownShard {
            stream: self.stream.name().to_owned(),
            shard_id: shard_id.to_owned(),
        })?;
        if shard.ending_sequence.is_some() {
            return Err(LocalLogError::ShardClosed {
                stream: self.stream.name().to_owned(),
                shard_id: shard_id.to_owned(),
            });
        }
        Ok(shard)
    }

    /// Closes `parents` (flushing them first) and opens `children`, then stores the metadata.
    fn reshard(&mut self, parents: &[Arc<str>], mut children: Vec<ShardMeta>) -> Result<Vec<Arc<str>>> {
        self.flush()?;
        let mut starting_counter = 0;
        for parent in parents {
            let at = self
                .writers
                .iter()
                .position(|w| w.shard_id == *parent)
                .expect("open shards have writers");
            let writer = self.writers.remove(at);
            starting_counter = starting_counter.max(writer.next_counter);
            let meta = self
                .meta
                .shards
                .iter_mut()
                .find(|s| s.shard_id == *parent)
                .expect("checked above");
            meta.ending_sequence = Some(sequence_of(writer.next_counter - 1, writer.index));
        }
        let mut ids = Vec::new();
        for child in &mut children {
            child.index = self.meta.shards.len() as u32;
            child.shard_id = shard_id_of(child.index);
            child.starting_counter = starting_counter;
            child.parents = parents.to_vec();
            ids.push(Arc::clone(&child.shard_id));
            self.writers.push(ShardWriter {
                shard_id: Arc::clone(&child.shard_id),
                index: child.index,
                hash_start: child.hash_start,
                hash_end: child.hash_end,
                dir: self.stream.shard_dir(&child.shard_id),
                next_counter: starting_counter,
                file: None,
                segment_len: 0,
                buffer: Vec::new(),
                dirty: false,
                sequences: SequenceText::default(),
            });
            self.meta.shards.push(child.clone());
        }
        self.meta.store(self.stream.dir())?;
        Ok(ids)
    }

    fn child(hash_start: u128, hash_end: u128) -> ShardMeta {
        ShardMeta {
            shard_id: Arc::from(""),
            index: 0,
            parents: Vec::new(),
            hash_start,
            hash_end,
            starting_counter: 0,
            ending_sequence: None,
            trim_horizon: None,
        }
    }

    /// Splits an open shard at `new_starting_hash_key`: the parent closes and two children take
    /// `start..key` and `key..=end`. Returns the children's ids (lower range first).
    ///
    /// # Errors
    /// [`LocalLogError::UnknownShard`], [`LocalLogError::ShardClosed`], [`LocalLogError::Invalid`]
    /// when the key is not strictly inside the shard's range.
    pub fn split_shard(&mut self, shard_id: &str, new_starting_hash_key: u128) -> Result<(Arc<str>, Arc<str>)> {
        let shard = self.open_shard(shard_id)?;
        if new_starting_hash_key <= shard.hash_start || new_starting_hash_key > shard.hash_end {
            return Err(LocalLogError::Invalid(format!(
                "split key {new_starting_hash_key} must lie in ({}, {}]",
                shard.hash_start, shard.hash_end
            )));
        }
        let (start, end, parent) = (shard.hash_start, shard.hash_end, Arc::clone(&shard.shard_id));
        let ids = self.reshard(
            &[parent],
            vec![
                Self::child(start, new_starting_hash_key - 1),
                Self::child(new_starting_hash_key, end),
            ],
        )?;
        Ok((Arc::clone(&ids[0]), Arc::clone(&ids[1])))
    }

    /// Merges two open shards with adjacent hash ranges into one child. Returns its id.
    ///
    /// # Errors
    /// As [`Producer::split_shard`]; [`LocalLogError::Invalid`] when the ranges are not adjacent.
    pub fn merge_shards(&mut self, shard_a: &str, shard_b: &str) -> Result<Arc<str>> {
        let a = self.open_shard(shard_a)?;
        let b = self.open_shard(shard_b)?;
        let (low, high) = if a.hash_start < b.hash_start { (a, b) } else { (b, a) };
        if low.hash_end.checked_add(1) != Some(high.hash_start) {
            return Err(LocalLogError::Invalid(format!(
                "shards {shard_a} and {shard_b} do not have adjacent hash ranges"
            )));
        }
        let child = Self::child(low.hash_start, high.hash_end);
        let parents = [Arc::clone(&a.shard_id), Arc::clone(&b.shard_id)];
        let ids = self.reshard(&parents, vec![child])?;
        Ok(Arc::clone(&ids[0]))
    }

    /// Sets the retention policy (stored in `meta.json`); segments go on the next
    /// [`Producer::enforce_retention`].
    ///
    /// # Errors
    /// [`LocalLogError::Invalid`] for a non-positive age; I/O errors.
    pub fn set_retention(&mut self, policy: RetentionPolicy) -> Result<()> {
        if policy.max_age_ms.is_some_and(|age| age <= 0) {
            return Err(LocalLogError::Invalid("max_age_ms must be positive".into()));
        }
        self.meta.retention = policy;
        self.meta.store(self.stream.dir())
    }

    /// Deletes whole old segments beyond the retention policy, oldest first, never the segment
    /// an open shard is writing. Positions below the first kept segment then read as expired.
    ///
    /// # Errors
    /// I/O errors.
    pub fn enforce_retention(&mut self) -> Result<RetentionReport> {
        self.flush()?;
        let policy = self.meta.retention;
        let now = self.clock.now_ms();
        let mut report = RetentionReport::default();
        let mut doomed: Vec<SegmentFile> = Vec::new();
        for i in 0..self.meta.shards.len() {
            let shard = &self.meta.shards[i];
            let dir = self.stream.shard_dir(&shard.shard_id);
            let segments = list_segments(&dir)?;
            let deletable = if shard.ending_sequence.is_some() {
                segments.len()
            } else {
                segments.len().saturating_sub(1)
            };
            let mut sizes = Vec::with_capacity(segments.len());
            for s in &segments {
                sizes.push(fs::metadata(&s.path).map_err(|e| LocalLogError::io(&s.path, e))?.len());
            }
            let mut total: u64 = sizes.iter().sum();
            let mut cut = 0;
            while cut < deletable {
                let too_big = policy.max_bytes.is_some_and(|max| total > max);
                let too_old = match policy.max_age_ms {
                    Some(age) => newest_arrival(&segments[cut])?.is_none_or(|t| t < now - age),
                    None => false,
                };
                if !(too_big || too_old) {
                    break;
                }
                total -= sizes[cut];
                report.bytes_deleted += sizes[cut];
                cut += 1;
            }
            if cut == 0 {
                continue;
            }
            let horizon = match segments.get(cut) {
                Some(kept) => sequence_of(kept.first_body / SHARD_INDEX_SPACE, shard.index),
                None => shard
                    .ending_sequence
                    .as_ref()
                    .expect("only closed shards lose all")
                    .successor(),
            };
            self.meta.shards[i].trim_horizon = Some(horizon);
            doomed.extend(segments.into_iter().take(cut));
        }
        if doomed.is_empty() {
            return Ok(report);
        }
        // Metadata first: a reader that still finds a doomed segment reads valid data.
        self.meta.store(self.stream.dir())?;
        for segment in &doomed {
            fs::remove_file(&segment.path).map_err(|e| LocalLogError::io(&segment.path, e))?;
            report.segments_deleted += 1;
        }
        Ok(report)
    }
}

impl Drop for Producer {
    fn drop(&mut self) {
        for writer in &mut self.writers {
            if let Err(error) = writer.write_buffer() {
                tracing::error!(%error, "local log producer dropped with unwritten records");
            }
        }
    }
}

/// The newest arrival time in a segment (`None` when it holds no whole frame).
fn newest_arrival(segment: &SegmentFile) -> Result<Option<i64>> {
    let mut file = File::open(&segment.path).map_err(|e| LocalLogError::io(&segment.path, e))?;
    let mut newest = None;
    frame::scan_segment(&mut file, |frame| {
        newest = Some(newest.unwrap_or(i64::MIN).max(frame.arrival_ms));
    })
    .map_err(|e| LocalLogError::io(&segment.path, e))?;
    Ok(newest)
}

/// Finds where an open shard's data ends, truncating a torn tail, and opens it for appends.
fn recover_shard(stream: &LocalStream, shard: &ShardMeta) -> Result<ShardWriter> {
    let dir = stream.shard_dir(&shard.shard_id);
    let mut segments = list_segments(&dir)?;
    let mut writer = ShardWriter {
        shard_id: Arc::clone(&shard.shard_id),
        index: shard.index,
        hash_start: shard.hash_start,
        hash_end: shard.hash_end,
        dir,
        next_counter: shard.starting_counter,
        file: None,
        segment_len: 0,
        buffer: Vec::new(),
        dirty: false,
        sequences: SequenceText::default(),
    };
    while let Some(last) = segments.pop() {
        let mut file = OpenOptions::new()
            .read(true)
            .append(true)
            .open(&last.path)
            .map_err(|e| LocalLogError::io(&last.path, e))?;
        let mut last_body = None;
        let (end, torn) = frame::scan_segment(&mut file, |frame| last_body = Some(frame.sequence_body))
            .map_err(|e| LocalLogError::io(&last.path, e))?;
        if torn {
            tracing::warn!(segment = %last.path.display(), valid_bytes = end, "truncating a torn tail");
            file.set_len(end).map_err(|e| LocalLogError::io(&last.path, e))?;
            file.sync_all().map_err(|e| LocalLogError::io(&last.path, e))?;
        }
        let Some(body) = last_body else {
            // Nothing whole survived in this segment: drop it and look at the previous one.
            drop(file);
            fs::remove_file(&last.path).map_err(|e| LocalLogError::io(&last.path, e))?;
            continue;
        };
        writer.next_counter = body / SHARD_INDEX_SPACE + 1;
        writer.file = Some((file, last.path));
        writer.segment_len = end;
        break;
    }
    Ok(writer)
}
