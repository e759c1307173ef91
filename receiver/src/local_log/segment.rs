//! Segment files of one shard and a cursor that walks their frames in order.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

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

struct OpenSegment {
    first_body: u128,
    path: PathBuf,
    reader: SegmentReader<File>,
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
}

impl SegmentCursor {
    /// A cursor that will start in the segment holding `target` (or the oldest one).
    pub(crate) fn new(shard_dir: PathBuf, target: Option<u128>) -> Self {
        Self {
            shard_dir,
            target,
            current: None,
            check: BodyCheck::Full,
        }
    }

    /// The same cursor, checking each frame's body as `check` says ([`BodyCheck::Full`] unless
    /// told).
    pub(crate) fn with_body_check(mut self, check: BodyCheck) -> Self {
        self.check = check;
        self
    }

    /// A cursor at the end of the newest segment's valid frames (for `LATEST`).
    pub(crate) fn at_tail(shard_dir: PathBuf) -> Result<Self> {
        let segments = list_segments(&shard_dir)?;
        let mut cursor = Self::new(shard_dir, None);
        if let Some(last) = segments.last() {
            let mut file = File::open(&last.path).map_err(|e| LocalLogError::io(&last.path, e))?;
            let (end, _) = frame::scan_segment(&mut file, |_| {}).map_err(|e| LocalLogError::io(&last.path, e))?;
            cursor.open(last, end)?;
        }
        Ok(cursor)
    }

    fn open(&mut self, segment: &SegmentFile, offset: u64) -> Result<()> {
        let file = File::open(&segment.path).map_err(|e| LocalLogError::io(&segment.path, e))?;
        let reader = SegmentReader::new(file, offset)
            .map_err(|e| LocalLogError::io(&segment.path, e))?
            .with_body_check(self.check);
        self.current = Some(OpenSegment {
            first_body: segment.first_body,
            path: segment.path.clone(),
            reader,
        });
        Ok(())
    }

    /// The next whole frame, or `None` at the tail.
    pub(crate) fn next_frame(&mut self) -> Result<Option<Frame>> {
        loop {
            let Some(current) = self.current.as_mut() else {
                let segments = list_segments(&self.shard_dir)?;
                let Some(first) = start_segment(&segments, self.target).cloned() else {
                    return Ok(None);
                };
                self.open(&first, 0)?;
                continue;
            };
            let read = current.reader.next().map_err(|e| LocalLogError::io(&current.path, e))?;
            let torn = match read {
                FrameRead::Frame(frame, _) => return Ok(Some(frame)),
                FrameRead::End => false,
                FrameRead::Incomplete | FrameRead::Corrupt => true,
            };
            // Discard whatever was read past the last whole frame; it is re-read next time.
            current
                .reader
                .rewind_to_last_frame()
                .map_err(|e| LocalLogError::io(&current.path, e))?;
            let first_body = current.first_body;
            let segments = list_segments(&self.shard_dir)?;
            let Some(next) = segments.iter().find(|s| s.first_body > first_body).cloned() else {
                return Ok(None);
            };
            // The producer finishes a segment before it creates the next one, so bytes left
            // after the last whole frame of a non-newest segment are garbage from a crash.
            if torn {
                let offset = current.reader.offset();
                tracing::warn!(segment = %current.path.display(), offset, "skipping torn bytes at the end of a closed segment");
            }
            self.open(&next, 0)?;
        }
    }
}
