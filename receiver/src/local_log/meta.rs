//! `meta.json`: the shard map of one local-log stream, written atomically (temp file + rename).

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use sluice_blockstore::SequenceNumber;

use super::error::{LocalLogError, Result};
use crate::ShardInfo;

/// Name of the metadata file inside a stream directory.
pub(crate) const META_FILE: &str = "meta.json";

/// How much of each shard the log keeps; whole segments older or beyond these limits are deleted
/// by `enforce_retention`. `None` means unlimited.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionPolicy {
    /// Keep at most this many bytes of segments per shard (the active segment is always kept).
    pub max_bytes: Option<u64>,
    /// Delete segments whose newest record arrived more than this many ms ago.
    pub max_age_ms: Option<i64>,
}

/// `u128` as a decimal string (JSON numbers lose precision past 2^53 in most readers).
mod u128_text {
    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(value: &u128, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&value.to_string())
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<u128, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// One shard in `meta.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct ShardMeta {
    pub shard_id: Arc<str>,
    /// The shard's index: the low digits of each of its sequence numbers.
    pub index: u32,
    pub parents: Vec<Arc<str>>,
    #[serde(with = "u128_text")]
    pub hash_start: u128,
    #[serde(with = "u128_text")]
    pub hash_end: u128,
    /// The counter of the shard's first sequence number.
    #[serde(with = "u128_text")]
    pub starting_counter: u128,
    /// Set when closed: the last sequence number the shard allocated.
    pub ending_sequence: Option<SequenceNumber>,
    /// Set after retention deleted segments: every position below it is gone.
    pub trim_horizon: Option<SequenceNumber>,
}

impl ShardMeta {
    pub(crate) fn info(&self) -> ShardInfo {
        ShardInfo {
            shard_id: Arc::clone(&self.shard_id),
            parent_shard_ids: self.parents.clone(),
            hash_key_range: (self.hash_start, self.hash_end),
            ending_sequence: self.ending_sequence.clone(),
        }
    }
}

/// The whole `meta.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct StreamMeta {
    pub stream: String,
    pub segment_bytes: u64,
    pub retention: RetentionPolicy,
    pub shards: Vec<ShardMeta>,
}

impl StreamMeta {
    pub(crate) fn path(stream_dir: &Path) -> PathBuf {
        stream_dir.join(META_FILE)
    }

    pub(crate) fn load(stream_dir: &Path) -> Result<Self> {
        let path = Self::path(stream_dir);
        let bytes = fs::read(&path).map_err(|e| LocalLogError::io(&path, e))?;
        serde_json::from_slice(&bytes).map_err(|source| LocalLogError::Meta { path, source })
    }

    /// Writes to a temp file, fsyncs it, renames it over `meta.json` and fsyncs the directory.
    pub(crate) fn store(&self, stream_dir: &Path) -> Result<()> {
        let path = Self::path(stream_dir);
        let tmp = stream_dir.join(format!("{META_FILE}.tmp"));
        let bytes = serde_json::to_vec_pretty(self).map_err(|source| LocalLogError::Meta {
            path: path.clone(),
            source,
        })?;
        let mut file = fs::File::create(&tmp).map_err(|e| LocalLogError::io(&tmp, e))?;
        file.write_all(&bytes).map_err(|e| LocalLogError::io(&tmp, e))?;
        file.sync_all().map_err(|e| LocalLogError::io(&tmp, e))?;
        fs::rename(&tmp, &path).map_err(|e| LocalLogError::io(&path, e))?;
        sync_dir(stream_dir)
    }

    pub(crate) fn shard(&self, shard_id: &str) -> Option<&ShardMeta> {
        self.shards.iter().find(|s| &*s.shard_id == shard_id)
    }
}

/// Fsyncs a directory so a rename or a new file in it survives a crash (no-op off Unix).
pub(crate) fn sync_dir(dir: &Path) -> Result<()> {
    #[cfg(unix)]
    {
        fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| LocalLogError::io(dir, e))?;
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The id of the shard with this index, Kinesis style.
pub(crate) fn shard_id_of(index: u32) -> Arc<str> {
    Arc::from(format!("shardId-{index:012}"))
}
