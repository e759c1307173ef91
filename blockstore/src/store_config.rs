//! [`BlockStoreConfig`]: where the block store keeps its tiers and how big memory may grow.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::object_location::check_url;
use crate::{DiskSync, Error, Result};

/// Default [`BlockStoreConfig::data_dir`] (the engine's default data directory).
pub const DEFAULT_DATA_DIR: &str = ".sluice-data";
/// Default [`BlockStoreConfig::memory_budget_bytes`]: 64 MiB. The engine also admits at most
/// this many bytes of blocks that no batch has processed yet (its ingest gate), so it bounds a
/// batch's blocks too; `docs/benchmarks.md` has the memory and throughput figures behind it.
pub const DEFAULT_MEMORY_BUDGET_BYTES: u64 = 64 * 1024 * 1024;
/// Default [`BlockStoreConfig::disk_sync`]: sync every block file.
pub const DEFAULT_DISK_SYNC: DiskSync = DiskSync::Always;

/// Configuration of a [`BlockStore`](crate::BlockStore).
///
/// ```
/// use sluice_blockstore::BlockStoreConfig;
/// let config: BlockStoreConfig = serde_json::from_str(r#"{
///     "data_dir": "/var/lib/sluice",
///     "memory_budget_bytes": 67108864,
///     "replica_url": "s3://my-bucket/sluice/blocks",
///     "replica_options": { "region": "eu-west-1" }
/// }"#)?;
/// config.validate()?;
/// assert_eq!(config.blocks_dir(), std::path::Path::new("/var/lib/sluice/blocks"));
/// assert!(serde_json::from_str::<BlockStoreConfig>(r#"{ "memory_budget": 1 }"#).is_err());
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BlockStoreConfig {
    /// The process's data directory. The disk tier keeps one file per block in
    /// `<data_dir>/blocks/`; the default replica is the directory `<data_dir>/replica`.
    /// Default: [`DEFAULT_DATA_DIR`].
    pub data_dir: PathBuf,
    /// Upper bound of the memory tier, in bytes of [`Block::memory_size`](crate::Block::memory_size).
    /// Must be at least 1. Default: [`DEFAULT_MEMORY_BUDGET_BYTES`].
    pub memory_budget_bytes: u64,
    /// Whether block files are synced to stable storage before a put returns.
    /// Default: [`DEFAULT_DISK_SYNC`] ([`DiskSync::Always`]).
    pub disk_sync: DiskSync,
    /// Where the replica copies of `_2` levels go: `file:///abs/dir` (or a plain path),
    /// `memory://<name>/<prefix>` or `s3://<bucket>/<prefix>`. `None` (the default) means the
    /// local directory `<data_dir>/replica` — which survives the process but not the machine; use
    /// S3 for that.
    pub replica_url: Option<String>,
    /// Options for the replica's object store (for S3: `endpoint`, `allow_http`, `region`,
    /// `access_key_id`, `secret_access_key`, …; they override the `AWS_*` environment). Default:
    /// none.
    pub replica_options: BTreeMap<String, String>,
}

impl Default for BlockStoreConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from(DEFAULT_DATA_DIR),
            memory_budget_bytes: DEFAULT_MEMORY_BUDGET_BYTES,
            disk_sync: DEFAULT_DISK_SYNC,
            replica_url: None,
            replica_options: BTreeMap::new(),
        }
    }
}

impl BlockStoreConfig {
    /// A configuration with the defaults and `data_dir`.
    pub fn new(data_dir: impl Into<PathBuf>) -> Self {
        Self {
            data_dir: data_dir.into(),
            ..Self::default()
        }
    }

    /// Checks every field; the error names the field and the fix.
    ///
    /// # Errors
    /// [`Error::Config`] for an empty data directory or a zero or oversized memory budget;
    /// [`Error::InvalidUrl`] for a replica URL the store cannot use.
    pub fn validate(&self) -> Result<()> {
        if self.data_dir.as_os_str().is_empty() {
            return Err(Error::Config {
                field: "data_dir",
                reason: "is empty; set the directory that holds blocks/ and the default replica/".into(),
            });
        }
        if self.memory_budget_bytes == 0 {
            return Err(Error::Config {
                field: "memory_budget_bytes",
                reason: "is 0; give the memory tier at least one byte, or store blocks at a DISK_ONLY level".into(),
            });
        }
        if usize::try_from(self.memory_budget_bytes).is_err() {
            return Err(Error::Config {
                field: "memory_budget_bytes",
                reason: format!("{} does not fit this machine's address space", self.memory_budget_bytes),
            });
        }
        check_url(&self.replica_location())?;
        if self.replica_url.is_none() && !self.replica_options.is_empty() {
            return Err(Error::Config {
                field: "replica_options",
                reason: "options apply to replica_url, which is not set; set replica_url or remove the options".into(),
            });
        }
        Ok(())
    }

    /// The disk tier's directory, `<data_dir>/blocks`.
    pub fn blocks_dir(&self) -> PathBuf {
        self.data_dir.join("blocks")
    }

    /// The replica URL in effect: [`replica_url`](Self::replica_url) or the directory
    /// `<data_dir>/replica`.
    pub fn replica_location(&self) -> String {
        match &self.replica_url {
            Some(url) => url.clone(),
            None => self.data_dir.join("replica").display().to_string(),
        }
    }

    /// [`replica_options`](Self::replica_options) in the form the object-store opener takes.
    pub(crate) fn replica_options_map(&self) -> HashMap<String, String> {
        self.replica_options
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_bad_fields_are_named() {
        BlockStoreConfig::default().validate().unwrap();
        let zero = BlockStoreConfig {
            memory_budget_bytes: 0,
            ..BlockStoreConfig::default()
        };
        assert!(matches!(
            zero.validate(),
            Err(Error::Config {
                field: "memory_budget_bytes",
                ..
            })
        ));
        let empty = BlockStoreConfig::new("");
        assert!(matches!(empty.validate(), Err(Error::Config { field: "data_dir", .. })));
        let bad_url = BlockStoreConfig {
            replica_url: Some("gs://bucket/x".into()),
            ..BlockStoreConfig::default()
        };
        assert!(matches!(bad_url.validate(), Err(Error::InvalidUrl { .. })));
        let stray_options = BlockStoreConfig {
            replica_options: BTreeMap::from([("region".into(), "x".into())]),
            ..BlockStoreConfig::default()
        };
        assert!(matches!(
            stray_options.validate(),
            Err(Error::Config {
                field: "replica_options",
                ..
            })
        ));
    }

    #[test]
    fn serde_round_trip_fills_defaults() {
        let config: BlockStoreConfig = serde_json::from_str(r#"{"disk_sync": "never"}"#).unwrap();
        assert_eq!(config.disk_sync, DiskSync::Never);
        assert_eq!(config.memory_budget_bytes, DEFAULT_MEMORY_BUDGET_BYTES);
        let json = serde_json::to_string(&config).unwrap();
        assert_eq!(serde_json::from_str::<BlockStoreConfig>(&json).unwrap(), config);
    }
}
