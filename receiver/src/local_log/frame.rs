//! The on-disk record frame and the sequence-number layout of the local log.
//!
//! See the module docs of [`crate::local_log`] for the format; this file is its only encoder and
//! decoder.

use std::fs::File;
use std::io::{self, Read};
use std::sync::Arc;

use bytes::{Buf, Bytes};
use sluice_blockstore::{Position, Record, SequenceNumber};

/// The fixed 18-digit prefix of every local-log sequence number (makes them 56 digits, like
/// Kinesis, so code paths that cannot use `u128` are exercised).
pub(crate) const SEQUENCE_PREFIX: &str = "495903382714902566";

/// How many shard indexes fit in the low digits of the sequence body.
pub(crate) const SHARD_INDEX_SPACE: u128 = 1_000_000;

/// Frame header: body length (u32 LE) + CRC32C of the body (u32 LE).
pub(crate) const FRAME_HEADER_LEN: usize = 8;

/// Largest accepted frame body; anything larger is treated as a torn header.
pub(crate) const MAX_FRAME_BODY: usize = 64 * 1024 * 1024;

/// Flag bit: the frame is an aggregate of several user records (KPL-style).
pub(crate) const FLAG_AGGREGATED: u8 = 1;

/// Fixed part of the body: sequence body (16) + arrival ms (8) + flags (1) + sub-record count (4).
const BODY_FIXED_LEN: usize = 16 + 8 + 1 + 4;

/// `10^19`: the sequence body's 38 digits are formatted as two 19-digit halves.
const TEN_POW_19: u128 = 10_000_000_000_000_000_000;

/// Writes `value` as exactly `out.len()` (at most 19) decimal digits, zero-padded.
fn write_padded_digits(out: &mut [u8], mut value: u64) {
    for digit in out.iter_mut().rev() {
        *digit = b'0' + (value % 10) as u8;
        value /= 10;
    }
}

/// The 56 ASCII digits of the sequence number with this sequence body.
///
/// Formatted by hand into a stack buffer: `format!("{body:038}")` pads one `char` at a time
/// through `fmt::Write` and was, with the re-validation, most of the cost of appending and
/// reading a record.
fn sequence_digits(body: u128) -> Option<[u8; 56]> {
    let high = u64::try_from(body / TEN_POW_19)
        .ok()
        .filter(|h| u128::from(*h) < TEN_POW_19)?;
    let low = (body % TEN_POW_19) as u64;
    let mut digits = [0u8; 56];
    digits[..18].copy_from_slice(SEQUENCE_PREFIX.as_bytes());
    write_padded_digits(&mut digits[18..37], high);
    write_padded_digits(&mut digits[37..], low);
    Some(digits)
}

/// The sequence number with this sequence body (`counter * 10^6 + shard_index`): the prefix and
/// the body zero-padded to 38 digits.
pub(crate) fn sequence_of_body(body: u128) -> SequenceNumber {
    let parsed = match sequence_digits(body) {
        Some(digits) => SequenceNumber::parse(std::str::from_utf8(&digits).expect("ascii digits")),
        // A body of 39 digits (a counter above 10^32, never reached) keeps the old formatting.
        None => SequenceNumber::parse(&format!("{SEQUENCE_PREFIX}{body:038}")),
    };
    // The prefix has no leading zero and only digits are appended, so this is always canonical.
    parsed.expect("canonical local-log sequence")
}

/// Formats the sequence numbers of one shard's frames, which mostly follow each other: the
/// digits of the next counter are the previous digits plus one, carried in place.
#[derive(Debug, Clone, Default)]
pub(crate) struct SequenceText {
    /// The last body formatted and its 56 digits.
    last: Option<(u128, [u8; 56])>,
}

/// Index of the units digit of the counter in the 56 digits (the six after it are the shard index).
const COUNTER_UNITS_DIGIT: usize = 56 - 7;

impl SequenceText {
    /// The sequence number with this sequence body.
    pub(crate) fn sequence(&mut self, body: u128) -> SequenceNumber {
        match self.digits(body) {
            Some(digits) => SequenceNumber::parse(std::str::from_utf8(digits).expect("ascii digits"))
                .expect("canonical local-log sequence"),
            None => sequence_of_body(body),
        }
    }

    /// The 56 digits of the sequence number with this sequence body, or `None` for a counter past
    /// 10^32 (never reached; [`sequence_of_body`] formats those).
    pub(crate) fn digits(&mut self, body: u128) -> Option<&[u8; 56]> {
        let carried = match &mut self.last {
            Some((last, _)) if *last == body => true,
            Some((last, digits)) if last.checked_add(SHARD_INDEX_SPACE) == Some(body) => {
                let mut i = COUNTER_UNITS_DIGIT;
                while digits[i] == b'9' && i > SEQUENCE_PREFIX.len() {
                    digits[i] = b'0';
                    i -= 1;
                }
                // All 38 digits were nines (a counter past 10^32): never in practice.
                let overflows = digits[i] == b'9';
                if !overflows {
                    digits[i] += 1;
                    *last = body;
                }
                !overflows
            }
            _ => false,
        };
        if !carried {
            self.last = sequence_digits(body).map(|digits| (body, digits));
        }
        self.last.as_ref().map(|(_, digits)| digits)
    }
}

/// The sequence number of (`counter`, `shard_index`): prefix + 38-digit zero-padded
/// `counter * 10^6 + shard_index`.
pub(crate) fn sequence_of(counter: u128, shard_index: u32) -> SequenceNumber {
    sequence_of_body(counter * SHARD_INDEX_SPACE + u128::from(shard_index))
}

/// The `u128` body of a local-log sequence number, or `None` when it is not one of ours.
pub(crate) fn sequence_body(sequence: &SequenceNumber) -> Option<u128> {
    let digits = sequence.as_str().strip_prefix(SEQUENCE_PREFIX)?;
    if digits.len() != 38 {
        return None;
    }
    digits.parse().ok()
}

/// A position as `(sequence body, sub-sequence)`, which orders exactly as the [`Position`]
/// (every local-log sequence number has the same prefix and width); `None` when the position is
/// not a local-log one.
pub(crate) fn position_key(position: &Position) -> Option<(u128, u64)> {
    Some((sequence_body(&position.sequence)?, position.sub_sequence))
}

/// One stored frame, decoded as slices of the buffer it was read from (no per-record copy).
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    /// `counter * 10^6 + shard_index`.
    pub sequence_body: u128,
    /// Arrival time in ms since the epoch.
    pub arrival_ms: i64,
    /// How many sub-records the frame holds (at least one).
    pub count: u32,
    /// The sub-record section of the body, `n × {u16 key_len, key, u32 data_len, data}`: checked
    /// (every length fits, every key is UTF-8) unless it was decoded with [`BodyCheck::FixedPart`].
    sub_records: Bytes,
}

/// How much of a frame's body [`decode_frame`] checks once its CRC matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum BodyCheck {
    /// Every sub-record: its lengths fit and its key is UTF-8. What a reader that hands keys out
    /// as `str` needs; a frame that passes its CRC but not this is treated as corrupt, like a
    /// torn one.
    Full,
    /// The fixed part only, for a caller that copies the sub-records into a block: the block
    /// checks the keys when it is finished, and a malformed sub-record ends
    /// [`Frame::sub_records_where`], so the caller's count of what it took falls short. A frame
    /// whose CRC matches was written whole by the producer, so neither happens unless the
    /// encoder has a bug; checking every sub-record a second time cost ~10 % of a replay.
    FixedPart,
}

/// The partition key of the previous record, reused while keys repeat (one allocation per
/// distinct run of keys instead of one per record).
#[derive(Debug, Default)]
pub(crate) struct KeyCache {
    last: Option<Arc<str>>,
}

impl KeyCache {
    /// The key with these bytes, which [`check_body`] found to be UTF-8.
    fn get(&mut self, key: &[u8]) -> Arc<str> {
        match &self.last {
            Some(last) if last.as_bytes() == key => Arc::clone(last),
            _ => {
                let key: Arc<str> = Arc::from(std::str::from_utf8(key).expect("checked when decoded"));
                self.last = Some(Arc::clone(&key));
                key
            }
        }
    }
}

/// What decoding frames of one shard into records reuses from record to record.
#[derive(Debug, Default)]
pub(crate) struct RecordDecoder {
    keys: KeyCache,
    sequences: SequenceText,
}

/// Splits `n` bytes off the front of `cursor`.
fn take<'a>(cursor: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
    if cursor.len() < n {
        return None;
    }
    let (head, tail) = cursor.split_at(n);
    *cursor = tail;
    Some(head)
}

fn take_u16(cursor: &mut &[u8]) -> Option<usize> {
    Some(u16::from_le_bytes(take(cursor, 2)?.try_into().ok()?) as usize)
}

fn take_u32(cursor: &mut &[u8]) -> Option<usize> {
    Some(u32::from_le_bytes(take(cursor, 4)?.try_into().ok()?) as usize)
}

impl Frame {
    /// `(sub-sequence, key, data)` of each sub-record whose `(sequence body, sub-sequence)`
    /// passes `keep`, in order.
    pub fn sub_records_where<'a>(
        &'a self,
        mut keep: impl FnMut(u128, u64) -> bool + 'a,
    ) -> impl Iterator<Item = (u64, &'a [u8], &'a [u8])> + 'a {
        let mut cursor = &self.sub_records[..];
        let spans = std::iter::from_fn(move || {
            if cursor.is_empty() {
                return None;
            }
            // Checked when the frame was decoded (unless with `BodyCheck::FixedPart`), so none of
            // these fail; if one does, the walk ends there.
            let key_len = take_u16(&mut cursor)?;
            let key = take(&mut cursor, key_len)?;
            let data_len = take_u32(&mut cursor)?;
            Some((key, take(&mut cursor, data_len)?))
        });
        (0u64..)
            .zip(spans)
            .filter(move |(i, _)| keep(self.sequence_body, *i))
            .map(|(i, (key, data))| (i, key, data))
    }

    /// Hands `push` the user records of this frame whose `(sequence body, index)` passes `keep`,
    /// de-aggregated, with their positions. Payloads are slices of the frame's buffer.
    pub fn push_records(
        &self,
        shard_id: &Arc<str>,
        decoder: &mut RecordDecoder,
        mut keep: impl FnMut(u128, u64) -> bool,
        mut push: impl FnMut(Record),
    ) {
        let mut sequence: Option<SequenceNumber> = None;
        for (i, key, data) in self.sub_records_where(&mut keep) {
            let sequence = sequence
                .get_or_insert_with(|| decoder.sequences.sequence(self.sequence_body))
                .clone();
            push(Record {
                shard_id: Arc::clone(shard_id),
                position: Position::new(sequence, i),
                partition_key: decoder.keys.get(key),
                approximate_arrival_ms: self.arrival_ms,
                data: self.sub_records.slice_ref(data),
            });
        }
    }
}

/// Appends the encoded frame of a record to `out`.
pub(crate) fn encode_frame<K: AsRef<[u8]>, D: AsRef<[u8]>>(
    out: &mut Vec<u8>,
    sequence_body: u128,
    arrival_ms: i64,
    aggregated: bool,
    sub_records: &[(K, D)],
) {
    let start = out.len();
    begin_frame(out, sequence_body, aggregated);
    for (key, data) in sub_records {
        push_sub_record(out, key.as_ref(), data.as_ref());
    }
    finish_frame(&mut out[start..], arrival_ms, sub_records.len() as u32);
}

/// Bytes a frame holds before its sub-records (header and fixed part of the body).
pub(crate) const FRAME_FIXED_LEN: usize = FRAME_HEADER_LEN + BODY_FIXED_LEN;

/// Starts a frame at the end of `out`: its header and the fixed part of its body, with the
/// length, CRC, arrival time and sub-record count left for [`finish_frame`] once the
/// sub-records ([`push_sub_record`]) follow.
pub(crate) fn begin_frame(out: &mut Vec<u8>, sequence_body: u128, aggregated: bool) {
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    out.extend_from_slice(&sequence_body.to_le_bytes());
    out.extend_from_slice(&[0; 8]);
    out.push(if aggregated { FLAG_AGGREGATED } else { 0 });
    out.extend_from_slice(&[0; 4]);
}

/// Appends one sub-record to the frame being built at the end of `out`; its encoded length is
/// [`sub_record_len`].
pub(crate) fn push_sub_record(out: &mut Vec<u8>, key: &[u8], data: &[u8]) {
    out.extend_from_slice(&(key.len() as u16).to_le_bytes());
    out.extend_from_slice(key);
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out.extend_from_slice(data);
}

/// The encoded length of one sub-record.
pub(crate) fn sub_record_len(key: &[u8], data: &[u8]) -> usize {
    2 + key.len() + 4 + data.len()
}

/// Completes `frame` (a whole frame, from its header to its last sub-record, as [`begin_frame`]
/// and [`push_sub_record`] left it): arrival time, sub-record count, body length and CRC.
/// Completing it again (after more sub-records, or fewer) rewrites all four.
pub(crate) fn finish_frame(frame: &mut [u8], arrival_ms: i64, count: u32) {
    const ARRIVAL: usize = FRAME_HEADER_LEN + 16;
    const COUNT: usize = ARRIVAL + 8 + 1;
    frame[ARRIVAL..ARRIVAL + 8].copy_from_slice(&arrival_ms.to_le_bytes());
    frame[COUNT..COUNT + 4].copy_from_slice(&count.to_le_bytes());
    let body_len = frame.len() - FRAME_HEADER_LEN;
    let crc = sluice_blockstore::crc32c(&frame[FRAME_HEADER_LEN..]);
    frame[..4].copy_from_slice(&(body_len as u32).to_le_bytes());
    frame[4..8].copy_from_slice(&crc.to_le_bytes());
}

/// The encoded length of a frame holding these sub-records.
pub(crate) fn frame_len<K: AsRef<[u8]>, D: AsRef<[u8]>>(sub_records: &[(K, D)]) -> usize {
    FRAME_FIXED_LEN
        + sub_records
            .iter()
            .map(|(k, d)| sub_record_len(k.as_ref(), d.as_ref()))
            .sum::<usize>()
}

/// What decoding the frame at the start of a buffer found.
#[derive(Debug)]
pub(crate) enum FrameRead {
    /// A whole, valid frame of `len` bytes.
    Frame(Frame, usize),
    /// The buffer is empty.
    End,
    /// The buffer ends inside a frame whose header is plausible: more bytes may complete it.
    Incomplete,
    /// Bytes that can never form a valid frame (bad length, CRC mismatch, malformed body).
    Corrupt,
}

/// Checks a frame body (its fixed part, and with [`BodyCheck::Full`] every sub-record's lengths
/// and UTF-8 key) and returns its sequence body, arrival time and sub-record count; `None` when it
/// is malformed.
fn check_body(body: &[u8], check: BodyCheck) -> Option<(u128, i64, u32)> {
    let mut cursor = body;
    let sequence_body = u128::from_le_bytes(take(&mut cursor, 16)?.try_into().ok()?);
    let arrival_ms = i64::from_le_bytes(take(&mut cursor, 8)?.try_into().ok()?);
    let _flags = take(&mut cursor, 1)?[0];
    let count = u32::from_le_bytes(take(&mut cursor, 4)?.try_into().ok()?);
    if count == 0 {
        return None;
    }
    if check == BodyCheck::FixedPart {
        return Some((sequence_body, arrival_ms, count));
    }
    for _ in 0..count {
        let key_len = take_u16(&mut cursor)?;
        let key = take(&mut cursor, key_len)?;
        // Keys are mostly ASCII, which is checked inline; `from_utf8` is a call per key.
        if !key.is_ascii() {
            std::str::from_utf8(key).ok()?;
        }
        let data_len = take_u32(&mut cursor)?;
        take(&mut cursor, data_len)?;
    }
    cursor.is_empty().then_some((sequence_body, arrival_ms, count))
}

/// Decodes the frame at the start of `buf`, its body checked as `check` says; the frame's
/// payloads share `buf`.
pub(crate) fn decode_frame(buf: &Bytes, check: BodyCheck) -> FrameRead {
    if buf.is_empty() {
        return FrameRead::End;
    }
    if buf.len() < FRAME_HEADER_LEN {
        return FrameRead::Incomplete;
    }
    let body_len = u32::from_le_bytes(buf[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(buf[4..8].try_into().expect("4 bytes"));
    if !(BODY_FIXED_LEN..=MAX_FRAME_BODY).contains(&body_len) {
        return FrameRead::Corrupt;
    }
    let len = FRAME_HEADER_LEN + body_len;
    if buf.len() < len {
        return FrameRead::Incomplete;
    }
    let body = &buf[FRAME_HEADER_LEN..len];
    if sluice_blockstore::crc32c(body) != crc {
        return FrameRead::Corrupt;
    }
    match check_body(body, check) {
        Some((sequence_body, arrival_ms, count)) => FrameRead::Frame(
            Frame {
                sequence_body,
                arrival_ms,
                count,
                sub_records: buf.slice(FRAME_HEADER_LEN + BODY_FIXED_LEN..len),
            },
            len,
        ),
        None => FrameRead::Corrupt,
    }
}

/// The length of the whole frames at the start of `bytes`, which must begin at a frame boundary
/// of frames this process encoded (the producer's write buffer). A write that failed part-way
/// wrote a prefix of the buffer: the frames inside it stay on disk, the rest is cut off.
pub(crate) fn whole_frames_len(bytes: &[u8]) -> usize {
    let mut at = 0;
    while let Some(header) = bytes.get(at..at + FRAME_HEADER_LEN) {
        let body_len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
        let end = at + FRAME_HEADER_LEN + body_len;
        if end > bytes.len() {
            break;
        }
        at = end;
    }
    at
}

/// Scans a whole segment file, calling `visit(frame)` for each valid frame; returns the offset
/// just past the last valid frame and whether a torn tail follows it.
pub(crate) fn scan_segment(file: &mut File, mut visit: impl FnMut(Frame)) -> io::Result<(u64, bool)> {
    let mut reader = SegmentReader::new(file, 0)?;
    loop {
        match reader.next()? {
            FrameRead::Frame(frame, _) => visit(frame),
            FrameRead::End => return Ok((reader.offset(), false)),
            FrameRead::Incomplete | FrameRead::Corrupt => return Ok((reader.offset(), true)),
        }
    }
}

/// Bytes read from a segment file per `read` call (and the largest buffer that payload slices of
/// a read keep alive), unless a frame is larger.
pub(crate) const READ_CHUNK_BYTES: usize = 1024 * 1024;

/// Reads the frames of one segment file forward, in chunks of [`READ_CHUNK_BYTES`]: each frame is
/// decoded as slices of the chunk it lies in.
///
/// Every chunk is a fresh buffer (records keep slices of the old ones); one that found less than a
/// quarter of its size is shrunk to what it holds, so a reader at the tail of a live segment does
/// not pin a mostly empty megabyte per record it returns. A frame cut by the end of a chunk is
/// copied to the start of the next one.
#[derive(Debug)]
pub(crate) struct SegmentReader<F> {
    file: F,
    /// Bytes read but not yet decoded; they start at file offset `offset`.
    buf: Bytes,
    /// File offset of the first byte of `buf`: just past the last frame returned.
    offset: u64,
    /// The buffer of a read that found nothing, kept for the next one (a reader polling the tail
    /// of an idle segment does not allocate a chunk per poll).
    spare: Vec<u8>,
    /// How much of each frame's body is checked.
    check: BodyCheck,
}

impl<F: Read + io::Seek> SegmentReader<F> {
    /// A reader positioned at `offset`, which must be a frame boundary.
    pub(crate) fn new(mut file: F, offset: u64) -> io::Result<Self> {
        file.seek(io::SeekFrom::Start(offset))?;
        Ok(Self {
            file,
            buf: Bytes::new(),
            offset,
            spare: Vec::new(),
            check: BodyCheck::Full,
        })
    }

    /// The same reader, checking each frame's body as `check` says ([`BodyCheck::Full`] unless
    /// told).
    pub(crate) fn with_body_check(mut self, check: BodyCheck) -> Self {
        self.check = check;
        self
    }

    /// The file offset just past the last frame returned.
    pub(crate) fn offset(&self) -> u64 {
        self.offset
    }

    /// The next frame; [`FrameRead::End`] at a clean end of the file and
    /// [`FrameRead::Incomplete`] when it ends inside a frame (which a writer may be completing).
    pub(crate) fn next(&mut self) -> io::Result<FrameRead> {
        loop {
            match decode_frame(&self.buf, self.check) {
                FrameRead::Frame(frame, len) => {
                    self.buf.advance(len);
                    self.offset += len as u64;
                    return Ok(FrameRead::Frame(frame, len));
                }
                FrameRead::Corrupt => return Ok(FrameRead::Corrupt),
                FrameRead::End | FrameRead::Incomplete => {}
            }
            if !self.refill()? {
                return Ok(if self.buf.is_empty() {
                    FrameRead::End
                } else {
                    FrameRead::Incomplete
                });
            }
        }
    }

    /// Forgets the bytes read past the last frame returned, so the next call reads them again
    /// from the file (a writer may have completed or replaced them).
    pub(crate) fn rewind_to_last_frame(&mut self) -> io::Result<()> {
        self.file.seek(io::SeekFrom::Start(self.offset))?;
        self.buf = Bytes::new();
        Ok(())
    }

    /// Reads the next chunk after the undecoded bytes; `false` when the file has no more bytes.
    fn refill(&mut self) -> io::Result<bool> {
        let pending = self.buf.len();
        // A whole frame must fit: a frame larger than a chunk gets a buffer of its own size.
        let wanted = match self.buf.get(..4) {
            Some(len) if pending >= FRAME_HEADER_LEN => {
                let frame = FRAME_HEADER_LEN + u32::from_le_bytes(len.try_into().expect("4 bytes")) as usize;
                frame.max(READ_CHUNK_BYTES)
            }
            _ => READ_CHUNK_BYTES,
        };
        // When nothing kept a slice of the buffer (a replay into a block copies what it takes),
        // the undecoded bytes move to its front and it is read into again: no fresh memory per
        // chunk. Otherwise they are copied into a new chunk.
        let pending_bytes = std::mem::take(&mut self.buf);
        let mut chunk = if pending_bytes.is_unique() {
            Vec::from(pending_bytes)
        } else {
            let mut chunk = std::mem::take(&mut self.spare);
            chunk.clear();
            chunk.extend_from_slice(&pending_bytes);
            chunk
        };
        chunk.reserve_exact(wanted.saturating_sub(chunk.len()));
        // `read_to_end` reads into the spare capacity without zeroing it first; on an error, what
        // it read is in `chunk` too, and stays in the buffer, as the file offset has passed it.
        let read = match self
            .file
            .by_ref()
            .take((wanted - pending) as u64)
            .read_to_end(&mut chunk)
        {
            Ok(read) => read,
            Err(e) => {
                self.buf = Bytes::from(chunk);
                return Err(e);
            }
        };
        if read == 0 {
            if chunk.is_empty() {
                self.spare = chunk;
            } else {
                self.buf = Bytes::from(chunk);
            }
            return Ok(false);
        }
        if chunk.len() < chunk.capacity() / 4 {
            // Little was there (the tail of a live segment): do not pin a mostly empty buffer.
            chunk.shrink_to_fit();
        }
        self.buf = Bytes::from(chunk);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn records_of(frame: &Frame) -> Vec<Record> {
        let mut out = Vec::new();
        frame.push_records(
            &Arc::from("s"),
            &mut RecordDecoder::default(),
            |_, _| true,
            |r| out.push(r),
        );
        out
    }

    #[test]
    fn whole_frames_len_stops_before_a_cut_frame() {
        let mut buf = Vec::new();
        let mut ends = vec![0];
        for (i, data) in [&b"a"[..], &[7; 300][..], b""].into_iter().enumerate() {
            encode_frame(&mut buf, i as u128, 5, false, &[("k", data)]);
            ends.push(buf.len());
        }
        for cut in 0..=buf.len() {
            let expected = *ends.iter().rfind(|&&end| end <= cut).unwrap();
            assert_eq!(whole_frames_len(&buf[..cut]), expected, "cut at {cut}");
        }
    }

    #[test]
    fn frame_round_trip_and_torn_detection() {
        let subs = [("a", &b"xy"[..]), ("bb", &b""[..])];
        let mut buf = Vec::new();
        encode_frame(&mut buf, 42, 7, true, &subs);
        assert_eq!(buf.len(), frame_len(&subs));
        let bytes = Bytes::from(buf.clone());
        let FrameRead::Frame(frame, len) = decode_frame(&bytes, BodyCheck::Full) else {
            panic!("expected a frame");
        };
        assert_eq!(len, buf.len());
        assert_eq!(frame.sequence_body, 42);
        assert_eq!(frame.arrival_ms, 7);
        let records = records_of(&frame);
        assert_eq!(records.len(), 2);
        assert_eq!((&*records[0].partition_key, &records[0].data[..]), ("a", &b"xy"[..]));
        assert_eq!((&*records[1].partition_key, &records[1].data[..]), ("bb", &b""[..]));
        assert_eq!(records[1].position.sub_sequence, 1);
        assert!(matches!(decode_frame(&Bytes::new(), BodyCheck::Full), FrameRead::End));
        for cut in 1..buf.len() {
            assert!(matches!(
                decode_frame(&bytes.slice(..cut), BodyCheck::Full),
                FrameRead::Incomplete
            ));
        }
        for i in 0..buf.len() {
            let mut flipped = buf.clone();
            flipped[i] ^= 1;
            assert!(
                !matches!(
                    decode_frame(&Bytes::from(flipped), BodyCheck::Full),
                    FrameRead::Frame(..)
                ),
                "flip at {i} not detected"
            );
        }
    }

    #[test]
    fn a_body_checked_only_in_its_fixed_part_ends_its_walk_at_a_malformed_sub_record() {
        // Three sub-records whose CRC matches, the second malformed as `malform` says.
        let frame_with = |malform: &dyn Fn(&mut Vec<u8>, usize)| {
            let mut buf = Vec::new();
            begin_frame(&mut buf, 9, true);
            push_sub_record(&mut buf, b"a", b"first");
            let second = buf.len();
            push_sub_record(&mut buf, b"b", b"second");
            push_sub_record(&mut buf, b"c", b"third");
            malform(&mut buf, second);
            finish_frame(&mut buf, 5, 3);
            Bytes::from(buf)
        };
        let overrunning = frame_with(&|buf, at| buf[at + 3..at + 7].copy_from_slice(&u32::MAX.to_le_bytes()));
        let not_utf8 = frame_with(&|buf, at| buf[at + 2] = 0xFF);
        for bytes in [&overrunning, &not_utf8] {
            assert!(matches!(decode_frame(bytes, BodyCheck::Full), FrameRead::Corrupt));
        }
        let FrameRead::Frame(frame, len) = decode_frame(&overrunning, BodyCheck::FixedPart) else {
            panic!("the fixed part is whole");
        };
        assert_eq!((len, frame.count, frame.sequence_body), (overrunning.len(), 3, 9));
        let walked: Vec<_> = frame.sub_records_where(|_, _| true).collect();
        assert_eq!(walked, [(0, &b"a"[..], &b"first"[..])]);
        // A key that is not UTF-8 is walked as it is; the block it is copied into rejects it.
        let FrameRead::Frame(frame, _) = decode_frame(&not_utf8, BodyCheck::FixedPart) else {
            panic!("the fixed part is whole");
        };
        assert_eq!(frame.sub_records_where(|_, _| true).nth(1).unwrap().1, [0xFF]);
        // A count of zero is malformed either way.
        let mut empty = Vec::new();
        begin_frame(&mut empty, 9, false);
        finish_frame(&mut empty, 5, 0);
        assert!(matches!(
            decode_frame(&Bytes::from(empty), BodyCheck::FixedPart),
            FrameRead::Corrupt
        ));
    }

    #[test]
    fn segment_reader_decodes_frames_across_chunks_and_stops_at_torn_tails() {
        // Frames of every size around the chunk size, so some straddle chunk boundaries and one
        // is larger than a chunk.
        let sizes = [10, READ_CHUNK_BYTES - 100, 300, READ_CHUNK_BYTES + 5, 0, 77];
        let mut file = Vec::new();
        for (i, size) in sizes.iter().enumerate() {
            let data = vec![i as u8; *size];
            encode_frame(&mut file, i as u128, 0, false, &[("k", &data[..])]);
        }
        let whole = file.len() as u64;
        let mut reader = SegmentReader::new(io::Cursor::new(file.clone()), 0).unwrap();
        for (i, size) in sizes.iter().enumerate() {
            let FrameRead::Frame(frame, _) = reader.next().unwrap() else {
                panic!("frame {i}");
            };
            assert_eq!(frame.sequence_body, i as u128);
            assert_eq!(records_of(&frame)[0].data, vec![i as u8; *size]);
        }
        assert!(matches!(reader.next().unwrap(), FrameRead::End));
        assert_eq!(reader.offset(), whole);

        // A torn tail: whole frames first, then `Incomplete`, with the offset at the last frame.
        file.truncate(file.len() - 3);
        let mut reader = SegmentReader::new(io::Cursor::new(file), 0).unwrap();
        let mut frames = 0;
        let last = loop {
            match reader.next().unwrap() {
                FrameRead::Frame(..) => frames += 1,
                other => break other,
            }
        };
        assert_eq!(frames, sizes.len() - 1);
        assert!(matches!(last, FrameRead::Incomplete));
        assert_eq!(reader.offset(), whole - frame_len(&[("k", [0u8; 77])]) as u64);
    }

    #[test]
    fn sequences_are_56_digits_and_ordered() {
        let a = sequence_of(1, 3);
        let b = sequence_of(2, 0);
        assert_eq!(a.as_str().len(), 56);
        assert!(a < b);
        assert_eq!(sequence_body(&a), Some(1_000_003));
    }

    #[test]
    fn sequence_text_carries_like_the_formatter() {
        let mut text = SequenceText::default();
        for body in (0..2_500u128)
            .map(|c| c * SHARD_INDEX_SPACE + 7)
            .chain([5, 999_999_000_007, 1_000_000_000_007, 1_000_001_000_007, 3, 3])
            .chain((0..30).map(|c| (TEN_POW_19 - 5 + c) * SHARD_INDEX_SPACE + 1))
        {
            assert_eq!(text.sequence(body), sequence_of_body(body), "body {body}");
        }
        let last = (TEN_POW_19 * TEN_POW_19 - 1) / SHARD_INDEX_SPACE * SHARD_INDEX_SPACE;
        assert_eq!(
            text.sequence(last - SHARD_INDEX_SPACE),
            sequence_of_body(last - SHARD_INDEX_SPACE)
        );
        assert_eq!(text.sequence(last), sequence_of_body(last));
        assert_eq!(text.sequence(last + SHARD_INDEX_SPACE).as_str().len(), 57);
    }

    #[test]
    fn hand_formatted_sequences_equal_the_formatter() {
        let mut body: u128 = 0;
        for step in 0..400u32 {
            let expected = format!("{SEQUENCE_PREFIX}{body:038}");
            assert_eq!(sequence_of_body(body).as_str(), expected, "body {body}");
            assert_eq!(sequence_body(&sequence_of_body(body)), Some(body));
            body = body * 3 + u128::from(step) + 1;
            if body >= TEN_POW_19 * TEN_POW_19 {
                body %= 1_000_000_007;
            }
        }
        for body in [TEN_POW_19 - 1, TEN_POW_19, TEN_POW_19 * TEN_POW_19 - 1] {
            assert_eq!(sequence_of_body(body).as_str(), format!("{SEQUENCE_PREFIX}{body:038}"));
        }
        // Past 38 digits (never reached: a counter above 10^32) the old formatting is kept.
        let huge = TEN_POW_19 * TEN_POW_19;
        assert_eq!(sequence_of_body(huge).as_str().len(), 57);
    }
}
