//! The local-log CLI commands as functions returning printable text.

use std::fmt::Write as _;
use std::io::BufRead;
use std::path::Path;

use super::error::{LocalLogError, Result};
use super::{LocalLog, spread_hash_key};

/// How `put` derives each line's partition key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum KeyMode {
    /// The CRC32C of the line, in hex: equal lines go to the same shard.
    LineHash,
    /// A running counter: lines spread evenly over the shards by an explicit hash key per line
    /// ([`spread_hash_key`](super::spread_hash_key) of the counter) instead of the MD5 of the
    /// counter's text.
    Counter,
}

/// `create`: creates `stream` with `shards` shards.
///
/// # Errors
/// See [`LocalLog::create_stream`].
pub fn create(dir: &Path, stream: &str, shards: u32) -> Result<String> {
    LocalLog::open(dir)?.create_stream(stream, shards)?;
    Ok(format!(
        "created stream {stream} with {shards} shards in {}\n",
        dir.display()
    ))
}

/// `put`: appends each line of `lines` as one record ([`Producer::append`](super::Producer::append):
/// consecutive lines of a shard share a stored record, as a KPL producer's would), then flushes.
///
/// Lines end at `\n` (a `\r` before it is dropped too, as [`BufRead::lines`] does) and must be
/// UTF-8. One line buffer and one key buffer serve every line.
///
/// # Errors
/// Producer errors; [`LocalLogError::Io`] when reading `lines` fails or a line is not UTF-8.
pub fn put(dir: &Path, stream: &str, mut lines: impl BufRead, key_mode: KeyMode) -> Result<String> {
    let input_error = |e: std::io::Error| LocalLogError::io("<input>", e);
    let mut producer = LocalLog::open(dir)?.stream(stream)?.producer()?;
    let mut count = 0u64;
    let mut line = Vec::new();
    let mut key = String::new();
    loop {
        line.clear();
        if lines.read_until(b'\n', &mut line).map_err(input_error)? == 0 {
            break;
        }
        if line.last() == Some(&b'\n') {
            line.pop();
            if line.last() == Some(&b'\r') {
                line.pop();
            }
        }
        if std::str::from_utf8(&line).is_err() {
            return Err(input_error(std::io::Error::new(
                std::io::ErrorKind::InvalidData,
                format!("line {} is not valid UTF-8", count + 1),
            )));
        }
        key.clear();
        match key_mode {
            KeyMode::LineHash => write!(key, "{:08x}", sluice_blockstore::crc32c(&line)),
            KeyMode::Counter => write!(key, "{count}"),
        }
        .expect("formatting into a String cannot fail");
        let hash_key = match key_mode {
            KeyMode::LineHash => None,
            KeyMode::Counter => Some(spread_hash_key(count)),
        };
        producer.append(&key, hash_key, &line)?;
        count += 1;
    }
    producer.flush()?;
    Ok(format!("put {count} records into {stream}\n"))
}

/// `split`: splits `shard` at `new_starting_hash_key`, or at the middle of its range.
///
/// # Errors
/// See [`super::Producer::split_shard`].
pub fn split(dir: &Path, stream: &str, shard: &str, new_starting_hash_key: Option<u128>) -> Result<String> {
    let stream_handle = LocalLog::open(dir)?.stream(stream)?;
    let key = if let Some(key) = new_starting_hash_key {
        key
    } else {
        let info = stream_handle.describe()?;
        let shard_info =
            info.shards
                .iter()
                .find(|s| &*s.info.shard_id == shard)
                .ok_or_else(|| LocalLogError::UnknownShard {
                    stream: stream.into(),
                    shard_id: shard.into(),
                })?;
        let (start, end) = shard_info.info.hash_key_range;
        start + (end - start) / 2 + 1
    };
    let (a, b) = stream_handle.producer()?.split_shard(shard, key)?;
    Ok(format!("split {shard} at {key} into {a} and {b}\n"))
}

/// `merge`: merges two adjacent shards.
///
/// # Errors
/// See [`super::Producer::merge_shards`].
pub fn merge(dir: &Path, stream: &str, shard_a: &str, shard_b: &str) -> Result<String> {
    let child = LocalLog::open(dir)?
        .stream(stream)?
        .producer()?
        .merge_shards(shard_a, shard_b)?;
    Ok(format!("merged {shard_a} and {shard_b} into {child}\n"))
}

/// `describe`: shards, ranges, segments and sizes.
///
/// # Errors
/// See [`super::LocalStream::describe`].
pub fn describe(dir: &Path, stream: &str) -> Result<String> {
    Ok(LocalLog::open(dir)?.stream(stream)?.describe()?.to_string())
}
