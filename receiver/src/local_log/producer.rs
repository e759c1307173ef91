//! [`Producer`]: the single writer of a local-log stream.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::PathBuf;
use std::sync::Arc;

use md5::{Digest, Md5};
use sluice_blockstore::{Position, SharedClock};

use super::LocalStream;
use super::error::{LocalLogError, PoisonCause, Result};
use super::frame::{self, SHARD_INDEX_SPACE, SequenceText, sequence_of};
use super::meta::{RetentionPolicy, ShardMeta, StreamMeta, shard_id_of, sync_dir};
use super::segment::{SegmentFile, list_segments, segment_name};
use crate::file_lock::FileLock;

/// Frames are buffered in memory up to this many bytes per shard before they are written.
pub const DEFAULT_WRITE_BUFFER_BYTES: usize = 1024 * 1024;

/// The largest frame `append` grows one aggregate to, header included (the KPL's default
/// aggregate is 50 KiB), unless its first record alone is larger: its records share one frame
/// header, CRC and sequence number, and a reader decodes them as slices of one buffer.
const AGGREGATE_MAX_BYTES: usize = 64 * 1024;

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
    /// Bytes of the current segment (written plus buffered); the file holds
    /// `segment_len - buffer.len()` bytes, all whole frames.
    segment_len: u64,
    /// Encoded frames not yet written, whole frames only.
    buffer: Vec<u8>,
    /// Whether bytes were written since the last fsync.
    dirty: bool,
    /// Formats the sequence numbers `put` returns (consecutive, so mostly one digit changes).
    sequences: SequenceText,
    /// The aggregated frame [`Producer::append`] is filling at the end of `buffer`, completed
    /// before anything else is encoded or written.
    open: Option<OpenAggregate>,
    /// Stamps an aggregate's arrival time when it is completed.
    clock: SharedClock,
}

/// An aggregated frame still taking records: where it starts in the writer's buffer and how many
/// sub-records it holds.
#[derive(Debug, Clone, Copy)]
struct OpenAggregate {
    start: usize,
    count: u32,
}

/// A write or fsync that left the segment in a state the producer cannot undo: it must not write
/// again ([`LocalLogError::ProducerPoisoned`]).
#[derive(Debug, Clone)]
struct Poison {
    path: PathBuf,
    cause: PoisonCause,
    source: Arc<io::Error>,
}

impl Poison {
    fn error(&self, stream: &str) -> LocalLogError {
        LocalLogError::ProducerPoisoned {
            stream: stream.to_owned(),
            path: self.path.clone(),
            cause: self.cause,
            source: Arc::clone(&self.source),
        }
    }
}

/// Why a [`ShardWriter`] call failed.
#[derive(Debug)]
enum WriteFailure {
    /// The call failed and left the segment holding whole frames only; every frame it did not
    /// write is still buffered.
    Undone(LocalLogError),
    /// The segment's state is unknown.
    Poisoned(Poison),
}

impl From<LocalLogError> for WriteFailure {
    fn from(error: LocalLogError) -> Self {
        WriteFailure::Undone(error)
    }
}

impl ShardWriter {
    fn new(shard: &ShardMeta, dir: PathBuf, clock: SharedClock) -> Self {
        Self {
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
            open: None,
            clock,
        }
    }

    /// Completes the open aggregate, if any. Its arrival time is now, when it is handed to the
    /// segment (as Kinesis stamps an aggregated record when it accepts it), so no record in it
    /// arrived later than it says: a reader starting at a timestamp misses none of them.
    fn close_aggregate(&mut self) {
        if let Some(open) = self.open.take() {
            frame::finish_frame(&mut self.buffer[open.start..], self.clock.now_ms(), open.count);
        }
    }

    /// After a write of the buffer failed and left it whole: takes the last record `append`
    /// added (`sub_len` bytes) back out of the aggregate ending the buffer (`count` records,
    /// `aggregate_len` bytes), so the failed call appends nothing; an aggregate left empty goes
    /// too and gives back its sequence number. The rest of the aggregate takes records again.
    fn take_back_last_record(&mut self, count: u32, aggregate_len: usize, sub_len: usize) {
        // The write did not reach the end of the buffer, so the aggregate is still all there.
        let start = self.buffer.len() - aggregate_len;
        if count == 1 {
            self.buffer.truncate(start);
            self.segment_len -= aggregate_len as u64;
            self.next_counter -= 1;
        } else {
            self.buffer.truncate(self.buffer.len() - sub_len);
            self.segment_len -= sub_len as u64;
            self.open = Some(OpenAggregate {
                start,
                count: count - 1,
            });
        }
    }

    /// Writes the buffer to the segment.
    ///
    /// A write that fails part-way (disk full, EIO, file size limit) keeps the whole frames it
    /// wrote (a reader may have read them already) and truncates the torn rest off the file, so
    /// the segment never holds a torn frame that later writes would follow; the frames not written
    /// stay buffered for the next call.
    fn write_buffer(&mut self) -> Result<(), WriteFailure> {
        self.close_aggregate();
        if self.buffer.is_empty() {
            return Ok(());
        }
        let (file, path) = self.file.as_mut().expect("a buffered frame always has a segment");
        let mut written = 0;
        let error = loop {
            match file.write(&self.buffer[written..]) {
                Ok(0) => break io::Error::from(io::ErrorKind::WriteZero),
                Ok(n) => {
                    written += n;
                    if written == self.buffer.len() {
                        self.buffer.clear();
                        self.dirty = true;
                        return Ok(());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break e,
            }
        };
        let kept = frame::whole_frames_len(&self.buffer[..written]);
        let file_len = self.segment_len - self.buffer.len() as u64 + kept as u64;
        // Truncate even when `written` ends on a frame boundary: a failed `write` may have
        // written bytes it did not report. The file is opened for appending, so the next write
        // lands at the new end.
        if let Err(truncate) = file.set_len(file_len) {
            tracing::error!(segment = %path.display(), %error, %truncate, "cannot truncate a torn write");
            return Err(WriteFailure::Poisoned(Poison {
                path: path.clone(),
                cause: PoisonCause::TruncateFailed,
                source: Arc::new(truncate),
            }));
        }
        self.buffer.drain(..kept);
        self.dirty |= kept > 0;
        Err(WriteFailure::Undone(LocalLogError::io(&*path, error)))
    }

    /// Writes the buffer and fsyncs what was written since the last fsync.
    fn sync(&mut self) -> Result<(), WriteFailure> {
        self.write_buffer()?;
        if self.dirty
            && let Some((file, path)) = &self.file
        {
            if let Err(e) = file.sync_data() {
                return Err(WriteFailure::Poisoned(Poison {
                    path: path.clone(),
                    cause: PoisonCause::SyncFailed,
                    source: Arc::new(e),
                }));
            }
            self.dirty = false;
        }
        Ok(())
    }

    /// Starts a new segment whose first record has `first_body`. On failure the writer still
    /// writes the old segment.
    fn roll(&mut self, first_body: u128) -> Result<(), WriteFailure> {
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
///
/// # Failed writes
/// An `Err` from [`Producer::put`], [`Producer::append`], [`Producer::put_aggregated`] or
/// [`Producer::flush`] means the records of that call were not appended: a write that failed
/// part-way is truncated back to the last whole frame, the failed record gives back its sequence
/// number (or its place in an aggregate), and records acknowledged
/// earlier but not yet written stay buffered, so retrying writes each record exactly once. When
/// that cannot be guaranteed (an fsync failed, or the truncation failed) the producer is poisoned:
/// that call and every later one return [`LocalLogError::ProducerPoisoned`], dropping it writes
/// nothing, and a new producer must be opened (it truncates a torn tail as it opens).
#[derive(Debug)]
pub struct Producer {
    stream: LocalStream,
    meta: StreamMeta,
    clock: SharedClock,
    /// One per open shard.
    writers: Vec<ShardWriter>,
    buffer_limit: usize,
    /// Set when a write or fsync could not be undone; every later call fails with it.
    poisoned: Option<Poison>,
    _lock: FileLock,
}

/// The Kinesis hash key of a partition key: MD5 as a big-endian `u128`.
pub fn hash_key(partition_key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

/// [`hash_key`] of every key, in order, appended to `out`: for bulk appends that route records
/// by their partition keys, as Kinesis does. Sixteen keys of up to 55 bytes are hashed side by
/// side, two to three times as fast per key as one `hash_key` call each (an MD5 is 64 dependent
/// steps; the CPU can run several keys' steps at once). Pass each record's hash to
/// [`Producer::append`] as its explicit hash key: it lands in the shard `None` would have chosen.
///
/// ```
/// # let dir = tempfile::tempdir()?;
/// use sluice_receiver::local_log::{LocalLog, hash_key, hash_keys};
/// let stream = LocalLog::open(dir.path())?.create_stream("s", 4)?;
/// let mut producer = stream.producer()?;
/// let records = [("user-1", "a"), ("user-2", "b"), ("user-1", "c")];
/// let mut hashes = Vec::new();
/// hash_keys(&records.map(|(key, _)| key), &mut hashes);
/// assert_eq!(hashes[2], hash_key("user-1"));
/// for ((key, data), hash) in records.iter().zip(hashes) {
///     producer.append(key, Some(hash), data)?;
/// }
/// producer.flush()?;
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
pub fn hash_keys<K: AsRef<str>>(keys: &[K], out: &mut Vec<u128>) {
    super::md5_lanes::md5_of_keys(keys.iter().map(|k| k.as_ref().as_bytes()), out);
}

/// An explicit hash key for the `n`-th record of a bulk load whose keys are only counters:
/// consecutive `n` land far apart (`n` times the odd integer nearest `2^128 / φ`, Fibonacci
/// hashing), so records spread evenly over any split of the hash key space, as MD5 of the
/// counters would spread them, without an MD5 per record. For
/// [`Producer::put_with_hash_key`].
///
/// ```
/// use sluice_receiver::local_log::spread_hash_key;
/// let upper_half = (0..1_000).filter(|n| spread_hash_key(*n) > u128::MAX / 2).count();
/// assert!((490..=510).contains(&upper_half));
/// ```
#[must_use]
pub fn spread_hash_key(n: u64) -> u128 {
    const GOLDEN: u128 = 0x9E37_79B9_7F4A_7C15_F39C_C060_5CED_C835;
    u128::from(n).wrapping_mul(GOLDEN)
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
            writers.push(recover_shard(&stream, shard, clock.clone())?);
        }
        Ok(Self {
            stream,
            meta,
            clock,
            writers,
            buffer_limit: DEFAULT_WRITE_BUFFER_BYTES,
            poisoned: None,
            _lock: lock,
        })
    }

    /// The stream this producer writes.
    pub fn stream(&self) -> &LocalStream {
        &self.stream
    }

    /// Fails with [`LocalLogError::ProducerPoisoned`] once a write could not be undone.
    fn check_usable(&self) -> Result<()> {
        match &self.poisoned {
            Some(poison) => Err(poison.error(self.stream.name())),
            None => Ok(()),
        }
    }

    /// The error to return for `failure`, poisoning the producer when it cannot be undone.
    fn failed(&mut self, failure: WriteFailure) -> LocalLogError {
        match failure {
            WriteFailure::Undone(error) => error,
            WriteFailure::Poisoned(poison) => {
                let error = poison.error(self.stream.name());
                self.poisoned = Some(poison);
                error
            }
        }
    }

    /// The writer of the open shard whose hash range holds `explicit_hash_key`, or else the MD5
    /// of `partition_key`.
    fn writer_for(&self, partition_key: &str, explicit_hash_key: Option<u128>) -> Result<usize> {
        if let [only] = &self.writers[..]
            && only.hash_start == 0
            && only.hash_end == u128::MAX
        {
            // Every hash key lands in the one open shard: skip the MD5.
            return Ok(0);
        }
        let key = explicit_hash_key.unwrap_or_else(|| hash_key(partition_key));
        self.writers
            .iter()
            .position(|w| w.hash_start <= key && key <= w.hash_end)
            .ok_or_else(|| LocalLogError::Invalid(format!("no open shard covers hash key {key}")))
    }

    /// Encodes one frame into its shard's buffer (writing the buffer when it is full); returns
    /// the shard's writer and the frame's sequence body.
    fn append_frame<K: AsRef<[u8]>, D: AsRef<[u8]>>(
        &mut self,
        partition_key: &str,
        explicit_hash_key: Option<u128>,
        aggregated: bool,
        sub_records: &[(K, D)],
    ) -> Result<(usize, u128)> {
        for (key, data) in sub_records {
            check_record_size(key.as_ref(), data.as_ref())?;
        }
        self.check_usable()?;
        let index = self.writer_for(partition_key, explicit_hash_key)?;
        let arrival = self.clock.now_ms();
        let segment_bytes = self.meta.segment_bytes;
        let buffer_limit = self.buffer_limit;
        let writer = &mut self.writers[index];
        // Frames follow their sequence numbers: an aggregate `append` opened comes first.
        writer.close_aggregate();
        let body = writer.next_counter * SHARD_INDEX_SPACE + u128::from(writer.index);
        let len = frame::frame_len(sub_records);
        let rolls =
            writer.file.is_none() || (writer.segment_len > 0 && writer.segment_len + len as u64 > segment_bytes);
        if rolls && let Err(failure) = writer.roll(body) {
            return Err(self.failed(failure));
        }
        frame::encode_frame(&mut writer.buffer, body, arrival, aggregated, sub_records);
        writer.segment_len += len as u64;
        writer.next_counter += 1;
        if writer.buffer.len() >= buffer_limit
            && let Err(failure) = writer.write_buffer()
        {
            if matches!(failure, WriteFailure::Undone(_)) {
                // This record's frame is the last one buffered and was not written whole (the
                // write failed before the end of the buffer): take it back out, so the failed
                // put appends nothing and the next put reuses its sequence number.
                writer.buffer.truncate(writer.buffer.len() - len);
                writer.segment_len -= len as u64;
                writer.next_counter -= 1;
            }
            return Err(self.failed(failure));
        }
        Ok((index, body))
    }

    /// The position of the frame `append_frame` returned.
    fn position(&mut self, (writer, body): (usize, u128)) -> Position {
        Position::plain(self.writers[writer].sequences.sequence(body))
    }

    /// Appends one record to the shard whose hash range holds MD5(`partition_key`).
    ///
    /// # Errors
    /// [`LocalLogError::Invalid`] for a key longer than 65535 bytes; [`LocalLogError::Io`] when
    /// writing the buffer failed: the record was not appended (retrying appends it once) and
    /// records acknowledged earlier stay buffered; [`LocalLogError::ProducerPoisoned`] when a
    /// write could not be undone (see [`Producer`]'s "Failed writes").
    pub fn put(&mut self, partition_key: &str, data: impl AsRef<[u8]>) -> Result<Position> {
        let frame = self.append_frame(partition_key, None, false, &[(partition_key, data)])?;
        Ok(self.position(frame))
    }

    /// [`put`](Self::put) to the shard whose hash range holds `explicit_hash_key` (Kinesis'
    /// `ExplicitHashKey`): the partition key is stored with the record but not hashed. Records
    /// that must stay in order share a hash key, as they would share a partition key; a bulk load
    /// keyed by a counter can spread its records with [`spread_hash_key`] and skip the MD5.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// use sluice_receiver::local_log::LocalLog;
    /// let stream = LocalLog::open(dir.path())?.create_stream("s", 2)?;
    /// let mut producer = stream.producer()?;
    /// let low = producer.put_with_hash_key("any key", 0, b"to the first shard")?;
    /// let high = producer.put_with_hash_key("any key", u128::MAX, b"to the second")?;
    /// assert_ne!(low.sequence, high.sequence);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`put`](Self::put).
    pub fn put_with_hash_key(
        &mut self,
        partition_key: &str,
        explicit_hash_key: u128,
        data: impl AsRef<[u8]>,
    ) -> Result<Position> {
        let frame = self.append_frame(partition_key, Some(explicit_hash_key), false, &[(partition_key, data)])?;
        Ok(self.position(frame))
    }

    /// [`put`](Self::put), or with `Some` hash key [`put_with_hash_key`](Self::put_with_hash_key),
    /// for bulk loads that never read a record's position, aggregated as the KPL aggregates: the
    /// records appended to a shard one after another, until it is written (the buffer fills, a
    /// [`flush`](Self::flush)) or reaches 64 KiB, are stored as one aggregated record. They share
    /// its sequence number and arrival time, and take sub-sequence numbers `0, 1, …` in order — as
    /// [`put_aggregated`](Self::put_aggregated)'s records do, and as a Kinesis consumer sees a KPL
    /// producer's. Per record, that saves the frame header and CRC on disk and a sequence number
    /// on every read. Durability is the same (nothing is durable before a flush), and order within
    /// a shard is kept: a [`put`](Self::put) completes the open aggregate before its own record.
    /// `sluice log put` and the word-count example load this way.
    ///
    /// ```
    /// # let dir = tempfile::tempdir()?;
    /// use sluice_receiver::local_log::{LocalLog, spread_hash_key};
    /// let stream = LocalLog::open(dir.path())?.create_stream("s", 2)?;
    /// let mut producer = stream.producer()?;
    /// for (n, line) in ["a", "b", "c"].into_iter().enumerate() {
    ///     producer.append(&n.to_string(), Some(spread_hash_key(n as u64)), line)?;
    /// }
    /// producer.flush()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    ///
    /// # Errors
    /// As [`put`](Self::put): on an `Err` this record was not appended (the aggregate gives it
    /// back) and the records appended before it stay buffered.
    pub fn append(
        &mut self,
        partition_key: &str,
        explicit_hash_key: Option<u128>,
        data: impl AsRef<[u8]>,
    ) -> Result<()> {
        let (key, data) = (partition_key.as_bytes(), data.as_ref());
        check_record_size(key, data)?;
        self.check_usable()?;
        let index = self.writer_for(partition_key, explicit_hash_key)?;
        let segment_bytes = self.meta.segment_bytes;
        let buffer_limit = self.buffer_limit;
        let writer = &mut self.writers[index];
        let sub_len = frame::sub_record_len(key, data);
        if let Some(open) = writer.open
            && (writer.buffer.len() - open.start + sub_len > AGGREGATE_MAX_BYTES
                || writer.segment_len + sub_len as u64 > segment_bytes)
        {
            writer.close_aggregate();
        }
        if writer.open.is_none() {
            let body = writer.next_counter * SHARD_INDEX_SPACE + u128::from(writer.index);
            let len = (frame::FRAME_FIXED_LEN + sub_len) as u64;
            let rolls = writer.file.is_none() || (writer.segment_len > 0 && writer.segment_len + len > segment_bytes);
            if rolls && let Err(failure) = writer.roll(body) {
                return Err(self.failed(failure));
            }
            writer.open = Some(OpenAggregate {
                start: writer.buffer.len(),
                count: 0,
            });
            frame::begin_frame(&mut writer.buffer, body, true);
            writer.segment_len += frame::FRAME_FIXED_LEN as u64;
            writer.next_counter += 1;
        }
        frame::push_sub_record(&mut writer.buffer, key, data);
        writer.segment_len += sub_len as u64;
        let open = writer.open.as_mut().expect("opened above");
        open.count += 1;
        let open = *open;
        if writer.buffer.len() >= buffer_limit {
            let aggregate_len = writer.buffer.len() - open.start;
            if let Err(failure) = writer.write_buffer() {
                if matches!(failure, WriteFailure::Undone(_)) {
                    writer.take_back_last_record(open.count, aggregate_len, sub_len);
                }
                return Err(self.failed(failure));
            }
        }
        Ok(())
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
        let frame = self.append_frame(&first_key, None, true, &subs)?;
        let position = self.position(frame);
        Ok((0..records.len() as u64)
            .map(|i| Position::new(position.sequence.clone(), i))
            .collect())
    }

    /// Writes every buffered frame and fsyncs the segments written since the last flush.
    ///
    /// # Errors
    /// [`LocalLogError::Io`] when a write failed: the frames written whole stay, nothing torn is
    /// left, and the rest stays buffered for the next flush (which writes each record once);
    /// [`LocalLogError::ProducerPoisoned`] when an fsync failed or a torn write could not be
    /// truncated (see [`Producer`]'s "Failed writes").
    pub fn flush(&mut self) -> Result<()> {
        self.check_usable()?;
        for i in 0..self.writers.len() {
            if let Err(failure) = self.writers[i].sync() {
                return Err(self.failed(failure));
            }
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
            self.writers.push(ShardWriter::new(
                child,
                self.stream.shard_dir(&child.shard_id),
                self.clock.clone(),
            ));
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
        self.check_usable()?;
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
        if let Some(poison) = &self.poisoned {
            // The segments' state is unknown: writing on could leave a torn frame mid-segment.
            let error = poison.error(self.stream.name());
            tracing::error!(%error, "poisoned local log producer dropped; its unwritten records are lost");
            return;
        }
        for writer in &mut self.writers {
            let error = match writer.write_buffer() {
                Ok(()) => continue,
                Err(WriteFailure::Undone(error)) => error,
                Err(WriteFailure::Poisoned(poison)) => poison.error(self.stream.name()),
            };
            tracing::error!(%error, "local log producer dropped with unwritten records");
        }
    }
}

/// Refuses a record the frame format cannot hold.
fn check_record_size(key: &[u8], data: &[u8]) -> Result<()> {
    if key.len() > usize::from(u16::MAX) || data.len() > frame::MAX_FRAME_BODY / 2 {
        return Err(LocalLogError::Invalid("partition key or data too large".into()));
    }
    Ok(())
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
fn recover_shard(stream: &LocalStream, shard: &ShardMeta, clock: SharedClock) -> Result<ShardWriter> {
    let dir = stream.shard_dir(&shard.shard_id);
    let mut segments = list_segments(&dir)?;
    let mut writer = ShardWriter::new(shard, dir, clock);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local_log::LocalLog;
    use crate::{Source, StartingPosition};

    #[test]
    fn a_torn_write_that_cannot_be_truncated_poisons_the_producer() {
        let dir = tempfile::tempdir().unwrap();
        let stream = LocalLog::open(dir.path()).unwrap().create_stream("s", 1).unwrap();
        let mut producer = stream.producer().unwrap();
        for i in 0..3 {
            producer.put("k", format!("kept-{i}")).unwrap();
        }
        producer.flush().unwrap();
        producer.put("k", "buffered").unwrap();
        // A read-only handle on the segment: the write fails, and so does the truncation.
        let (file, path) = producer.writers[0].file.take().unwrap();
        let len = file.metadata().unwrap().len();
        producer.writers[0].file = Some((File::open(&path).unwrap(), path.clone()));

        let error = producer.flush().unwrap_err();
        assert!(
            matches!(
                error,
                LocalLogError::ProducerPoisoned {
                    cause: PoisonCause::TruncateFailed,
                    ..
                }
            ),
            "{error}"
        );
        assert!(!error.is_retryable());
        for error in [producer.put("k", "refused").unwrap_err(), producer.flush().unwrap_err()] {
            assert!(matches!(error, LocalLogError::ProducerPoisoned { .. }), "{error}");
        }
        // Even with a writable segment again, dropping a poisoned producer writes nothing.
        producer.writers[0].file = Some((OpenOptions::new().append(true).open(&path).unwrap(), path.clone()));
        drop(producer);
        assert_eq!(fs::metadata(&path).unwrap().len(), len);

        let mut producer = stream.producer().unwrap();
        producer.put("k", "reopened").unwrap();
        producer.flush().unwrap();
        let mut reader = stream
            .open_reader("shardId-000000000000", &StartingPosition::TrimHorizon)
            .unwrap();
        let data: Vec<_> = reader.read(10).unwrap().records.into_iter().map(|r| r.data).collect();
        assert_eq!(data, ["kept-0", "kept-1", "kept-2", "reopened"].map(str::as_bytes));
    }
}
