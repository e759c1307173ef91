//! The on-disk record frame and the sequence-number layout of the local log.
//!
//! See the module docs of [`crate::local_log`] for the format; this file is its only encoder and
//! decoder.

use std::fs::File;
use std::io::{self, Read};
use std::sync::Arc;

use bytes::Bytes;
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

/// The sequence number of (`counter`, `shard_index`): prefix + 38-digit zero-padded
/// `counter * 10^6 + shard_index`.
pub(crate) fn sequence_of(counter: u128, shard_index: u32) -> SequenceNumber {
    let body = counter * SHARD_INDEX_SPACE + u128::from(shard_index);
    // The prefix has no leading zero and only digits are appended, so this is always canonical.
    SequenceNumber::parse(&format!("{SEQUENCE_PREFIX}{body:038}")).expect("canonical local-log sequence")
}

/// The `u128` body of a local-log sequence number, or `None` when it is not one of ours.
pub(crate) fn sequence_body(sequence: &SequenceNumber) -> Option<u128> {
    let digits = sequence.as_str().strip_prefix(SEQUENCE_PREFIX)?;
    if digits.len() != 38 {
        return None;
    }
    digits.parse().ok()
}

/// One stored frame, decoded.
#[derive(Debug, Clone)]
pub(crate) struct Frame {
    /// `counter * 10^6 + shard_index`.
    pub sequence_body: u128,
    /// Arrival time in ms since the epoch.
    pub arrival_ms: i64,
    /// (partition key, data) of each user record; one for plain records.
    pub sub_records: Vec<(Arc<str>, Bytes)>,
}

impl Frame {
    /// The stored sequence number.
    pub fn sequence(&self) -> SequenceNumber {
        let counter = self.sequence_body / SHARD_INDEX_SPACE;
        let index = (self.sequence_body % SHARD_INDEX_SPACE) as u32;
        sequence_of(counter, index)
    }

    /// The user records of this frame, de-aggregated, with their positions.
    pub fn into_records(self, shard_id: &Arc<str>) -> impl Iterator<Item = Record> {
        let sequence = self.sequence();
        let shard_id = Arc::clone(shard_id);
        let arrival = self.arrival_ms;
        self.sub_records
            .into_iter()
            .enumerate()
            .map(move |(i, (partition_key, data))| Record {
                shard_id: Arc::clone(&shard_id),
                position: Position::new(sequence.clone(), i as u64),
                partition_key,
                approximate_arrival_ms: arrival,
                data,
            })
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
    out.extend_from_slice(&[0; FRAME_HEADER_LEN]);
    out.extend_from_slice(&sequence_body.to_le_bytes());
    out.extend_from_slice(&arrival_ms.to_le_bytes());
    out.push(if aggregated { FLAG_AGGREGATED } else { 0 });
    out.extend_from_slice(&(sub_records.len() as u32).to_le_bytes());
    for (key, data) in sub_records {
        let key = key.as_ref();
        let data = data.as_ref();
        out.extend_from_slice(&(key.len() as u16).to_le_bytes());
        out.extend_from_slice(key);
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out.extend_from_slice(data);
    }
    let body_len = out.len() - start - FRAME_HEADER_LEN;
    let crc = crc32c::crc32c(&out[start + FRAME_HEADER_LEN..]);
    out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// The encoded length of a frame holding these sub-records.
pub(crate) fn frame_len<K: AsRef<[u8]>, D: AsRef<[u8]>>(sub_records: &[(K, D)]) -> usize {
    FRAME_HEADER_LEN
        + BODY_FIXED_LEN
        + sub_records
            .iter()
            .map(|(k, d)| 2 + k.as_ref().len() + 4 + d.as_ref().len())
            .sum::<usize>()
}

/// What reading the next frame found.
#[derive(Debug)]
pub(crate) enum FrameRead {
    /// A whole, valid frame of `len` bytes.
    Frame(Frame, usize),
    /// Clean end of file: no byte after the last frame.
    End,
    /// Bytes follow that do not form a whole valid frame (torn, being written, or corrupt).
    Torn,
}

/// Decodes a frame body; `None` when it is malformed.
fn decode_body(body: &[u8]) -> Option<Frame> {
    let mut cursor = body;
    let mut take = |n: usize| -> Option<&[u8]> {
        if cursor.len() < n {
            return None;
        }
        let (head, tail) = cursor.split_at(n);
        cursor = tail;
        Some(head)
    };
    let sequence_body = u128::from_le_bytes(take(16)?.try_into().ok()?);
    let arrival_ms = i64::from_le_bytes(take(8)?.try_into().ok()?);
    let _flags = take(1)?[0];
    let count = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
    if count == 0 {
        return None;
    }
    let mut sub_records = Vec::with_capacity(count.min(1024));
    for _ in 0..count {
        let key_len = u16::from_le_bytes(take(2)?.try_into().ok()?) as usize;
        let key = std::str::from_utf8(take(key_len)?).ok()?;
        let data_len = u32::from_le_bytes(take(4)?.try_into().ok()?) as usize;
        let data = take(data_len)?;
        sub_records.push((Arc::from(key), Bytes::copy_from_slice(data)));
    }
    if !cursor.is_empty() {
        return None;
    }
    Some(Frame {
        sequence_body,
        arrival_ms,
        sub_records,
    })
}

/// Reads as many bytes as are available into `buf`; returns how many were read.
fn read_full(reader: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(filled)
}

/// Reads the next frame from `reader` (positioned at a frame boundary).
pub(crate) fn read_frame(reader: &mut impl Read, scratch: &mut Vec<u8>) -> io::Result<FrameRead> {
    let mut header = [0u8; FRAME_HEADER_LEN];
    let got = read_full(reader, &mut header)?;
    if got == 0 {
        return Ok(FrameRead::End);
    }
    if got < FRAME_HEADER_LEN {
        return Ok(FrameRead::Torn);
    }
    let body_len = u32::from_le_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_le_bytes(header[4..].try_into().expect("4 bytes"));
    if !(BODY_FIXED_LEN..=MAX_FRAME_BODY).contains(&body_len) {
        return Ok(FrameRead::Torn);
    }
    scratch.resize(body_len, 0);
    if read_full(reader, scratch)? < body_len || crc32c::crc32c(scratch) != crc {
        return Ok(FrameRead::Torn);
    }
    Ok(match decode_body(scratch) {
        Some(frame) => FrameRead::Frame(frame, FRAME_HEADER_LEN + body_len),
        None => FrameRead::Torn,
    })
}

/// Scans a whole segment file, calling `visit(frame)` for each valid frame; returns the offset
/// just past the last valid frame and whether a torn tail follows it.
pub(crate) fn scan_segment(file: &mut File, mut visit: impl FnMut(Frame)) -> io::Result<(u64, bool)> {
    let mut reader = io::BufReader::with_capacity(1 << 20, file);
    let mut scratch = Vec::new();
    let mut offset = 0u64;
    loop {
        match read_frame(&mut reader, &mut scratch)? {
            FrameRead::Frame(frame, len) => {
                offset += len as u64;
                visit(frame);
            }
            FrameRead::End => return Ok((offset, false)),
            FrameRead::Torn => return Ok((offset, true)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_round_trip_and_torn_detection() {
        let subs = [("a", &b"xy"[..]), ("bb", &b""[..])];
        let mut buf = Vec::new();
        encode_frame(&mut buf, 42, 7, true, &subs);
        assert_eq!(buf.len(), frame_len(&subs));
        let mut scratch = Vec::new();
        let FrameRead::Frame(frame, len) = read_frame(&mut &buf[..], &mut scratch).unwrap() else {
            panic!("expected a frame");
        };
        assert_eq!(len, buf.len());
        assert_eq!(frame.sequence_body, 42);
        assert_eq!(frame.arrival_ms, 7);
        assert_eq!(frame.sub_records.len(), 2);
        for cut in 1..buf.len() {
            assert!(matches!(
                read_frame(&mut &buf[..cut], &mut scratch).unwrap(),
                FrameRead::Torn
            ));
        }
        let mut flipped = buf.clone();
        flipped[20] ^= 1;
        assert!(matches!(
            read_frame(&mut &flipped[..], &mut scratch).unwrap(),
            FrameRead::Torn
        ));
    }

    #[test]
    fn sequences_are_56_digits_and_ordered() {
        let a = sequence_of(1, 3);
        let b = sequence_of(2, 0);
        assert_eq!(a.as_str().len(), 56);
        assert!(a < b);
        assert_eq!(sequence_body(&a), Some(1_000_003));
    }
}
