//! KPL record aggregation: the format the Kinesis Producer Library packs several user records
//! into one Kinesis record with, and its reverse.
//!
//! An aggregated record is `F3 89 9A C2` (magic), a protobuf `AggregatedRecord`, and the 16-byte
//! MD5 of the protobuf bytes:
//!
//! ```text
//! message AggregatedRecord {
//!   repeated string partition_key_table     = 1;
//!   repeated string explicit_hash_key_table = 2;
//!   repeated Record records                 = 3;
//! }
//! message Record {
//!   required uint64 partition_key_index     = 1;
//!   optional uint64 explicit_hash_key_index = 2;
//!   required bytes  data                    = 3;
//!   repeated Tag    tags                    = 4;
//! }
//! ```
//!
//! Sub-record `i` of the Kinesis record with sequence number `s` is at position `(s, i)`; a plain
//! record is at `(s, 0)`. Like the KCL, a record that starts with the magic but fails the MD5 or
//! protobuf check is delivered whole, as a plain record (it may be user data that happens to
//! start with those bytes), and counted.

use bytes::Bytes;
use md5::{Digest, Md5};

/// The four bytes an aggregated record starts with.
pub const MAGIC: [u8; 4] = [0xF3, 0x89, 0x9A, 0xC2];
const DIGEST_LEN: usize = 16;

/// One user record inside an aggregate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubRecord {
    /// Its partition key (from the aggregate's key table).
    pub partition_key: String,
    /// Its payload, sharing the aggregate's buffer.
    pub data: Bytes,
}

/// What [`deaggregate`] found in one Kinesis record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Deaggregated {
    /// Not an aggregate: the record is one user record.
    Plain,
    /// An aggregate and its sub-records, in order.
    Aggregate(Vec<SubRecord>),
    /// Starts with the magic but is not a valid aggregate; delivered as a plain record.
    Invalid(&'static str),
}

/// Splits a Kinesis record's payload into its user records.
pub fn deaggregate(payload: &Bytes) -> Deaggregated {
    if payload.len() < MAGIC.len() + DIGEST_LEN || payload[..MAGIC.len()] != MAGIC {
        return Deaggregated::Plain;
    }
    let body = &payload[MAGIC.len()..payload.len() - DIGEST_LEN];
    let digest = &payload[payload.len() - DIGEST_LEN..];
    if Md5::digest(body).as_slice() != digest {
        return Deaggregated::Invalid("MD5 of the protobuf body does not match");
    }
    match parse_aggregate(payload, MAGIC.len(), payload.len() - DIGEST_LEN) {
        Ok(records) if !records.is_empty() => Deaggregated::Aggregate(records),
        Ok(_) => Deaggregated::Invalid("aggregate holds no record"),
        Err(why) => Deaggregated::Invalid(why),
    }
}

/// Packs user records into one aggregated payload (what the KPL sends). The caller puts it with
/// the first record's partition key, as the KPL does.
///
/// # Panics
/// If `records` is empty (an aggregate holds at least one record).
pub fn aggregate<K: AsRef<str>, D: AsRef<[u8]>>(records: &[(K, D)]) -> Vec<u8> {
    assert!(!records.is_empty(), "an aggregate holds at least one record");
    let mut keys: Vec<&str> = Vec::new();
    let mut body = Vec::new();
    let mut record_fields = Vec::new();
    for (key, data) in records {
        let key = key.as_ref();
        let index = keys.iter().position(|k| *k == key).unwrap_or_else(|| {
            keys.push(key);
            keys.len() - 1
        });
        record_fields.clear();
        put_varint(&mut record_fields, 1 << 3); // partition_key_index, varint
        put_varint(&mut record_fields, index as u64);
        put_len_field(&mut record_fields, 3, data.as_ref());
        put_len_field(&mut body, 3, &record_fields);
    }
    let mut out = Vec::with_capacity(body.len() + 64);
    out.extend_from_slice(&MAGIC);
    let mut table = Vec::new();
    for key in keys {
        put_len_field(&mut table, 1, key.as_bytes());
    }
    out.extend_from_slice(&table);
    out.extend_from_slice(&body);
    let digest = Md5::digest(&out[MAGIC.len()..]);
    out.extend_from_slice(&digest);
    out
}

fn put_varint(out: &mut Vec<u8>, mut value: u64) {
    while value >= 0x80 {
        out.push((value as u8) | 0x80);
        value >>= 7;
    }
    out.push(value as u8);
}

fn put_len_field(out: &mut Vec<u8>, field: u64, bytes: &[u8]) {
    put_varint(out, (field << 3) | 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// A protobuf reader over `buf[pos..end]`.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    end: usize,
}

enum Value {
    Varint(u64),
    /// Start and end offsets of a length-delimited value in the buffer.
    Bytes(usize, usize),
    Skipped,
}

impl Reader<'_> {
    fn varint(&mut self) -> Result<u64, &'static str> {
        let mut value = 0u64;
        for shift in (0..64).step_by(7) {
            let byte = *self.buf[..self.end].get(self.pos).ok_or("truncated varint")?;
            self.pos += 1;
            value |= u64::from(byte & 0x7F) << shift;
            if byte & 0x80 == 0 {
                return Ok(value);
            }
        }
        Err("varint longer than 10 bytes")
    }

    fn skip(&mut self, n: usize) -> Result<(), &'static str> {
        if self.end - self.pos < n {
            return Err("field runs past the end of its message");
        }
        self.pos += n;
        Ok(())
    }

    /// The next field: its number and value, or `None` at the end.
    fn field(&mut self) -> Result<Option<(u64, Value)>, &'static str> {
        if self.pos == self.end {
            return Ok(None);
        }
        let key = self.varint()?;
        let value = match key & 7 {
            0 => Value::Varint(self.varint()?),
            1 => {
                self.skip(8)?;
                Value::Skipped
            }
            2 => {
                let len = usize::try_from(self.varint()?).map_err(|_| "length out of range")?;
                let start = self.pos;
                self.skip(len)?;
                Value::Bytes(start, self.pos)
            }
            5 => {
                self.skip(4)?;
                Value::Skipped
            }
            _ => return Err("unsupported protobuf wire type"),
        };
        Ok(Some((key >> 3, value)))
    }
}

fn parse_aggregate(payload: &Bytes, start: usize, end: usize) -> Result<Vec<SubRecord>, &'static str> {
    let mut keys = Vec::new();
    let mut raw = Vec::new(); // (partition key index, data start, data end)
    let mut reader = Reader {
        buf: payload,
        pos: start,
        end,
    };
    while let Some((field, value)) = reader.field()? {
        match (field, value) {
            (1, Value::Bytes(s, e)) => {
                keys.push(std::str::from_utf8(&payload[s..e]).map_err(|_| "partition key is not UTF-8")?);
            }
            (3, Value::Bytes(s, e)) => raw.push(parse_record(payload, s, e)?),
            (1 | 3, _) => return Err("wrong wire type for a known field"),
            _ => {}
        }
    }
    raw.into_iter()
        .map(|(key_index, s, e)| {
            let key = usize::try_from(key_index)
                .ok()
                .and_then(|i| keys.get(i))
                .ok_or("partition key index outside the key table")?;
            Ok(SubRecord {
                partition_key: (*key).to_owned(),
                data: payload.slice(s..e),
            })
        })
        .collect()
}

fn parse_record(payload: &[u8], start: usize, end: usize) -> Result<(u64, usize, usize), &'static str> {
    let mut reader = Reader {
        buf: payload,
        pos: start,
        end,
    };
    let (mut key_index, mut data) = (None, None);
    while let Some((field, value)) = reader.field()? {
        match (field, value) {
            (1, Value::Varint(v)) => key_index = Some(v),
            (3, Value::Bytes(s, e)) => data = Some((s, e)),
            (1 | 3, _) => return Err("wrong wire type for a known field"),
            _ => {}
        }
    }
    let key_index = key_index.ok_or("record without partition_key_index")?;
    let (s, e) = data.ok_or("record without data")?;
    Ok((key_index, s, e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_keeps_order_keys_and_data() {
        let records = [("a", &b"one"[..]), ("b", b""), ("a", b"three"), ("c", &[0xF3; 300][..])];
        let payload = Bytes::from(aggregate(&records));
        let Deaggregated::Aggregate(subs) = deaggregate(&payload) else {
            panic!("not recognised as an aggregate")
        };
        let got: Vec<(&str, &[u8])> = subs.iter().map(|s| (s.partition_key.as_str(), &s.data[..])).collect();
        assert_eq!(got, records);
    }

    #[test]
    fn plain_and_damaged_records() {
        assert_eq!(
            deaggregate(&Bytes::from_static(b"hello world, plain")),
            Deaggregated::Plain
        );
        let mut payload = aggregate(&[("k", b"data")]);
        let n = payload.len();
        payload[n - 1] ^= 1; // digest
        assert!(matches!(deaggregate(&Bytes::from(payload)), Deaggregated::Invalid(_)));
        // Valid digest over a truncated protobuf.
        let mut bad = MAGIC.to_vec();
        let body = [0x1A, 0x05, 0x08];
        bad.extend_from_slice(&body);
        bad.extend_from_slice(&Md5::digest(body));
        assert!(matches!(deaggregate(&Bytes::from(bad)), Deaggregated::Invalid(_)));
    }

    #[test]
    fn reads_a_kpl_aggregate_with_hash_keys_and_tags() {
        // Built field by field as the KPL writes it: an explicit hash key table and a tag.
        let mut body = Vec::new();
        put_len_field(&mut body, 1, b"pk");
        put_len_field(&mut body, 2, b"340282366920938463463374607431768211455");
        let mut record = Vec::new();
        put_varint(&mut record, 1 << 3);
        put_varint(&mut record, 0);
        put_varint(&mut record, 2 << 3);
        put_varint(&mut record, 0);
        put_len_field(&mut record, 3, b"payload");
        put_len_field(&mut record, 4, b"\x0a\x01t");
        put_len_field(&mut body, 3, &record);
        let mut payload = MAGIC.to_vec();
        payload.extend_from_slice(&body);
        payload.extend_from_slice(&Md5::digest(&body));
        let Deaggregated::Aggregate(subs) = deaggregate(&Bytes::from(payload)) else {
            panic!("not an aggregate")
        };
        assert_eq!(subs.len(), 1);
        assert_eq!(
            (subs[0].partition_key.as_str(), &subs[0].data[..]),
            ("pk", &b"payload"[..])
        );
    }
}
