//! Segment files of one shard and a cursor that walks their frames in order.

use std::collections::{BTreeMap, HashMap};
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use super::error::{LocalLogError, Result};
use super::frame::{self, BodyCheck, Frame, FrameRead, SEQUENCE_PREFIX, SegmentReader};

/// File extension of segment files.
pub(crate) const SEGMENT_EXTENSION: &str = "seg";

/// One segment file: the sequence body of its first record and its path.
#[derive(Debug, Clone)]
pub(crate) struct SegmentFile {
    pub first_body: u128,
    pub path: PathBuf,
}

/// The file name of a segment whose first record has this sequence body.
pub(crate) fn segment_name(first_body: u128) -> String {
    format!("{SEQUENCE_PREFIX}{first_body:038}.{SEGMENT_EXTENSION}")
}

/// The segments of a shard directory, oldest first. A missing directory has none.
pub(crate) fn list_segments(shard_dir: &Path) -> Result<Vec<SegmentFile>> {
    let entries = match fs::read_dir(shard_dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(LocalLogError::io(shard_dir, e)),
    };
    let mut segments = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| LocalLogError::io(shard_dir, e))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".seg") else {
            continue;
        };
        let Some(digits) = stem.strip_prefix(SEQUENCE_PREFIX) else {
            continue;
        };
        if let Ok(first_body) = digits.parse::<u128>() {
            segments.push(SegmentFile {
                first_body,
                path: entry.path(),
            });
        }
    }
    segments.sort_by_key(|s| s.first_body);
    Ok(segments)
}

/// The segment to start in for a target sequence body: the last one starting at or before it
/// (or the first one when all start after it).
pub(crate) fn start_segment(segments: &[SegmentFile], target: Option<u128>) -> Option<&SegmentFile> {
    match target {
        None => segments.first(),
        Some(target) => segments
            .iter()
            .rev()
            .find(|s| s.first_body <= target)
            .or_else(|| segments.first()),
    }
}

/// Bytes of a segment between two frames a cursor records in the [`FrameIndex`].
const INDEX_INTERVAL_BYTES: u64 = 1024 * 1024;

/// The most segments a [`FrameIndex`] holds frames of (64 GiB of segments at the default 64 MiB,
/// at most ~64 entries each); past it the index starts over.
const INDEX_MAX_SEGMENTS: usize = 1024;

/// Where frames start in segment files, learned as cursors read them: about one frame per
/// [`INDEX_INTERVAL_BYTES`] of a segment, so that a cursor that starts at a sequence number (a
/// replay, a reader resuming after a checkpoint) seeks to the last recorded frame at or before it
/// instead of reading the segment from its start. Segments are 64 MiB by default and a block at
/// most 16 MiB, so without it a replayed block read up to four times its own bytes first.
///
/// A recorded offset is only a hint. Sequence bodies increase within a segment file, so a frame
/// that passes its CRC at the recorded offset with the recorded body is a correct place to start
/// for any target at or after it; a cursor checks that on every seek, and on anything else (the
/// producer truncated the file after a torn or corrupt frame and wrote other frames there, the
/// stream was deleted and created again) it forgets the segment and reads it from its start.
///
/// Bounded: each listing of a shard's segments drops the frames of segments no longer listed
/// (retention deleted them), and past [`INDEX_MAX_SEGMENTS`] the index is emptied and learned
/// again. One per [`LocalStream`](super::LocalStream) handle and its clones.
#[derive(Debug)]
pub(crate) struct FrameIndex {
    shards: Mutex<HashMap<PathBuf, ShardFrames>>,
    max_segments: usize,
}

/// One shard's recorded frames: per segment (by its first sequence body), sequence body → file
/// offset.
type ShardFrames = BTreeMap<u128, BTreeMap<u128, u64>>;

impl Default for FrameIndex {
    fn default() -> Self {
        Self::with_max_segments(INDEX_MAX_SEGMENTS)
    }
}

impl FrameIndex {
    /// An empty index that holds the frames of at most `max_segments` segments.
    pub(crate) fn with_max_segments(max_segments: usize) -> Self {
        Self {
            shards: Mutex::default(),
            max_segments,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<PathBuf, ShardFrames>> {
        // Every change leaves the map consistent, so a panic elsewhere does not spoil it.
        self.shards.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records that the frame with sequence body `body` starts at `offset` of `segment`.
    fn record(&self, shard_dir: &Path, segment: u128, body: u128, offset: u64) {
        let mut shards = self.lock();
        let known = shards.get(shard_dir).is_some_and(|s| s.contains_key(&segment));
        if !known && shards.values().map(BTreeMap::len).sum::<usize>() >= self.max_segments {
            shards.clear();
        }
        let frames = shards
            .entry(shard_dir.to_owned())
            .or_default()
            .entry(segment)
            .or_default();
        frames.insert(body, offset);
    }

    /// The last recorded frame of `segment` with a sequence body at or before `target`:
    /// `(body, offset)`.
    fn seek(&self, shard_dir: &Path, segment: u128, target: u128) -> Option<(u128, u64)> {
        let shards = self.lock();
        let frames = shards.get(shard_dir)?.get(&segment)?;
        frames
            .range(..=target)
            .next_back()
            .map(|(body, offset)| (*body, *offset))
    }

    /// Forgets the frames of `segment` (its file is not what was recorded).
    fn forget(&self, shard_dir: &Path, segment: u128) {
        if let Some(segments) = self.lock().get_mut(shard_dir) {
            segments.remove(&segment);
        }
    }

    /// Forgets the segments of `shard_dir` that are not among `listed` (sorted oldest first).
    fn retain(&self, shard_dir: &Path, listed: &[SegmentFile]) {
        if let Some(segments) = self.lock().get_mut(shard_dir) {
            segments.retain(|first, _| listed.binary_search_by_key(first, |s| s.first_body).is_ok());
        }
    }
}

struct OpenSegment {
    segment: SegmentFile,
    reader: SegmentReader<File>,
    /// The sequence body of the frame the index said starts where the reader was opened, until
    /// the first frame read confirms it.
    unconfirmed_seek: Option<u128>,
    /// The offset past which the next frame is recorded in the index.
    next_recorded: u64,
}

/// Walks the frames of a shard across its segments, stopping (without error) at the tail: a clean
/// end of the newest segment or a torn/incomplete frame that may still be being written.
pub(crate) struct SegmentCursor {
    shard_dir: PathBuf,
    /// Where to start when no segment is open yet.
    target: Option<u128>,
    current: Option<OpenSegment>,
    /// How much of each frame's body is checked.
    check: BodyCheck,
    /// Where frames start, shared with the stream's other cursors.
    index: Arc<FrameIndex>,
}

impl SegmentCursor {
    /// A cursor that will start in the segment holding `target` (or the oldest one), at the last
    /// frame `index` knows at or before it; it records in `index` the frames it reads.
    pub(crate) fn new(shard_dir: PathBuf, target: Option<u128>, index: Arc<FrameIndex>) -> Self {
        Self {
            shard_dir,
            target,
            current: None,
            check: BodyCheck::Full,
            index,
        }
    }

    /// The same cursor, checking each frame's body as `check` says ([`BodyCheck::Full`] unless
    /// told).
    pub(crate) fn with_body_check(mut self, check: BodyCheck) -> Self {
        self.check = check;
        self
    }

    /// A cursor at the end of the newest segment's valid frames (for `LATEST`).
    pub(crate) fn at_tail(shard_dir: PathBuf, index: Arc<FrameIndex>) -> Result<Self> {
        let segments = list_segments(&shard_dir)?;
        let mut cursor = Self::new(shard_dir, None, index);
        if let Some(last) = segments.last() {
            let mut file = File::open(&last.path).map_err(|e| LocalLogError::io(&last.path, e))?;
            let (end, _) = frame::scan_segment(&mut file, |_| {}).map_err(|e| LocalLogError::io(&last.path, e))?;
            cursor.open(last, end, None)?;
        }
        Ok(cursor)
    }

    /// Opens `segment` at `offset`, where the frame with sequence body `seeked` starts if the
    /// offset came from the index.
    fn open(&mut self, segment: &SegmentFile, offset: u64, seeked: Option<u128>) -> Result<()> {
        let file = File::open(&segment.path).map_err(|e| LocalLogError::io(&segment.path, e))?;
        let reader = SegmentReader::new(file, offset)
            .map_err(|e| LocalLogError::io(&segment.path, e))?
            .with_body_check(self.check);
        self.current = Some(OpenSegment {
            segment: segment.clone(),
            reader,
            unconfirmed_seek: seeked,
            next_recorded: offset,
        });
        Ok(())
    }

    /// Opens the segment to start in, at the last frame the index knows at or before the target.
    fn open_start(&mut self, segment: &SegmentFile) -> Result<()> {
        match self
            .target
            .and_then(|target| self.index.seek(&self.shard_dir, segment.first_body, target))
        {
            Some((body, offset)) => self.open(segment, offset, Some(body)),
            None => self.open(segment, 0, None),
        }
    }

    /// The next whole frame, or `None` at the tail.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>> {
        loop {
            let Some(current) = self.current.as_mut() else {
                let segments = self.list_segments()?;
                let Some(first) = start_segment(&segments, self.target).cloned() else {
                    return Ok(None);
                };
                self.open_start(&first)?;
                continue;
            };
            let path = &current.segment.path;
            let at = current.reader.offset();
            let read = current.reader.next().map_err(|e| LocalLogError::io(path, e))?;
            if let Some(seeked) = current.unconfirmed_seek.take()
                && !matches!(&read, FrameRead::Frame(frame, _) if frame.sequence_body == seeked)
            {
                // The file is not the one the index learned: read it from its start.
                tracing::warn!(segment = %path.display(), offset = at, "the frame index does not match the segment; reading it from its start");
                let segment = current.segment.clone();
                self.index.forget(&self.shard_dir, segment.first_body);
                self.open(&segment, 0, None)?;
                continue;
            }
            let torn = match read {
                FrameRead::Frame(frame, _) => {
                    if at >= current.next_recorded {
                        let segment = current.segment.first_body;
                        self.index.record(&self.shard_dir, segment, frame.sequence_body, at);
                        current.next_recorded = at + INDEX_INTERVAL_BYTES;
                    }
                    return Ok(Some(frame));
                }
                FrameRead::End => false,
                FrameRead::Incomplete | FrameRead::Corrupt => true,
            };
            // Discard whatever was read past the last whole frame; it is re-read next time.
            current
                .reader
                .rewind_to_last_frame()
                .map_err(|e| LocalLogError::io(&current.segment.path, e))?;
            let first_body = current.segment.first_body;
            let segments = self.list_segments()?;
            let Some(next) = segments.iter().find(|s| s.first_body > first_body).cloned() else {
                return Ok(None);
            };
            let current = self.current.as_ref().expect("a segment is open");
            // The producer finishes a segment before it creates the next one, so bytes left
            // after the last whole frame of a non-newest segment are garbage from a crash.
            if torn {
                let offset = current.reader.offset();
                tracing::warn!(segment = %current.segment.path.display(), offset, "skipping torn bytes at the end of a closed segment");
            }
            self.open(&next, 0, None)?;
        }
    }

    /// The shard's segments, oldest first; the index forgets the segments no longer among them.
    fn list_segments(&self) -> Result<Vec<SegmentFile>> {
        let segments = list_segments(&self.shard_dir)?;
        self.index.retain(&self.shard_dir, &segments);
        Ok(segments)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Writes a segment of `frames` frames of `size` payload bytes each, sequence bodies
    /// `first..first + frames`, into `shard_dir`.
    fn write_segment(shard_dir: &Path, first: u128, frames: u128, size: usize) {
        let mut file = Vec::new();
        for body in first..first + frames {
            frame::encode_frame(&mut file, body, 0, false, &[("k", vec![body as u8; size])]);
        }
        fs::write(shard_dir.join(segment_name(first)), file).unwrap();
    }

    /// The sequence bodies a cursor starting at `target` returns.
    fn bodies(shard_dir: &Path, target: Option<u128>, index: &Arc<FrameIndex>) -> Vec<u128> {
        let mut cursor = SegmentCursor::new(shard_dir.to_owned(), target, Arc::clone(index));
        std::iter::from_fn(|| cursor.next_frame().unwrap())
            .map(|frame| frame.sequence_body)
            .collect()
    }

    /// The first sequence bodies of the segments `index` holds frames of.
    fn indexed(index: &FrameIndex) -> Vec<u128> {
        index
            .lock()
            .values()
            .flat_map(|segments| segments.keys().copied())
            .collect()
    }

    #[test]
    fn a_cursor_starts_at_the_last_frame_read_before_its_target() {
        let dir = tempfile::tempdir().unwrap();
        // 300 frames of ~10 KiB: about a hundred per index interval.
        write_segment(dir.path(), 0, 300, 10_000);
        let index = Arc::new(FrameIndex::default());
        assert_eq!(bodies(dir.path(), Some(250), &index), (0..300).collect::<Vec<_>>());
        // The first cursor read the whole segment: the next one starts within an interval of 250.
        let seeked = bodies(dir.path(), Some(250), &index);
        let first = seeked[0];
        assert!((150..=250).contains(&first), "started at {first}");
        assert_eq!(seeked, (first..300).collect::<Vec<_>>());
        // Before the first recorded frame, and with nothing recorded: from the start.
        assert_eq!(bodies(dir.path(), None, &index)[0], 0);
        assert_eq!(bodies(dir.path(), Some(250), &Arc::default())[0], 0);

        // The same file name with other frames (a stream created again): the recorded offset is
        // not the recorded frame's, so the cursor reads the file from its start...
        write_segment(dir.path(), 0, 700, 4_000);
        assert_eq!(bodies(dir.path(), Some(250), &index), (0..700).collect::<Vec<_>>());
        // ... and learns the new file's frames as it reads it.
        let seeked = bodies(dir.path(), Some(600), &index);
        assert!(seeked[0] > 0 && seeked[0] <= 600, "started at {}", seeked[0]);
        assert_eq!(seeked, (seeked[0]..700).collect::<Vec<_>>());

        // Cut before a recorded offset (a producer truncating after a corrupt frame): from the
        // start again, and only the frames left.
        let path = dir.path().join(segment_name(0));
        let file = fs::OpenOptions::new().write(true).open(&path).unwrap();
        file.set_len(fs::metadata(&path).unwrap().len() / 2).unwrap();
        let left = bodies(dir.path(), Some(600), &index);
        assert_eq!(left, (0..left.len() as u128).collect::<Vec<_>>());
        assert!(left.len() < 600);

        // A deleted segment's frames are forgotten when the shard is listed again.
        fs::remove_file(&path).unwrap();
        assert!(bodies(dir.path(), Some(250), &index).is_empty());
        assert!(indexed(&index).is_empty());
    }

    #[test]
    fn the_index_forgets_deleted_segments_while_a_cursor_reads_on_and_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        write_segment(dir.path(), 0, 300, 10_000);
        write_segment(dir.path(), 300, 300, 10_000);
        let index = Arc::new(FrameIndex::default());
        // One cursor reads both segments and waits at the tail, as a receiver's reader does.
        let mut cursor = SegmentCursor::new(dir.path().to_owned(), None, Arc::clone(&index));
        let read = std::iter::from_fn(|| cursor.next_frame().unwrap()).count();
        assert_eq!(read, 600);
        assert_eq!(indexed(&index), [0, 300]);
        // Retention deletes the older segment; the next poll at the tail forgets it.
        fs::remove_file(dir.path().join(segment_name(0))).unwrap();
        assert!(cursor.next_frame().unwrap().is_none());
        assert_eq!(indexed(&index), [300]);

        // At most `max_segments` segments: recording a frame of one more starts the index over.
        let small = Arc::new(FrameIndex::with_max_segments(1));
        write_segment(dir.path(), 0, 300, 10_000);
        assert_eq!(bodies(dir.path(), None, &small).len(), 600);
        assert_eq!(indexed(&small), [300]);
        // What it no longer knows, a cursor reads from the segment's start.
        assert_eq!(bodies(dir.path(), Some(250), &small)[0], 0);
        assert!(bodies(dir.path(), Some(550), &small)[0] > 300);
    }
}
