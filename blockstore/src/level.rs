//! [`StorageLevel`]: where the copies of a block live, with Spark's names.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// Where a block is kept: memory, local disk, and how many copies in all.
///
/// `replication` counts copies the way Spark does: `_2` levels keep a second copy, which Sluice
/// writes to the replica tier (an object store), so it survives the loss of the process and, on
/// S3, of the machine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct StorageLevel {
    /// Keep a copy in the bounded memory tier.
    pub use_memory: bool,
    /// Keep a copy on local disk (and spill evicted memory copies there).
    pub use_disk: bool,
    /// Total number of copies; 2 adds a replica on the object store.
    pub replication: u8,
}

impl StorageLevel {
    /// Memory only; an evicted block is dropped and rebuilt by replay.
    pub const MEMORY_ONLY: Self = Self {
        use_memory: true,
        use_disk: false,
        replication: 1,
    };
    /// Memory plus a replica on the object store.
    pub const MEMORY_ONLY_2: Self = Self {
        use_memory: true,
        use_disk: false,
        replication: 2,
    };
    /// Memory, spilling to local disk.
    pub const MEMORY_AND_DISK: Self = Self {
        use_memory: true,
        use_disk: true,
        replication: 1,
    };
    /// Memory and local disk plus a replica on the object store (the default).
    pub const MEMORY_AND_DISK_2: Self = Self {
        use_memory: true,
        use_disk: true,
        replication: 2,
    };
    /// Local disk only.
    pub const DISK_ONLY: Self = Self {
        use_memory: false,
        use_disk: true,
        replication: 1,
    };
    /// Local disk plus a replica on the object store.
    pub const DISK_ONLY_2: Self = Self {
        use_memory: false,
        use_disk: true,
        replication: 2,
    };

    /// All named levels with their Spark names.
    pub const NAMED: [(&'static str, Self); 6] = [
        ("MEMORY_ONLY", Self::MEMORY_ONLY),
        ("MEMORY_ONLY_2", Self::MEMORY_ONLY_2),
        ("MEMORY_AND_DISK", Self::MEMORY_AND_DISK),
        ("MEMORY_AND_DISK_2", Self::MEMORY_AND_DISK_2),
        ("DISK_ONLY", Self::DISK_ONLY),
        ("DISK_ONLY_2", Self::DISK_ONLY_2),
    ];

    /// Whether a copy goes to the replica tier.
    pub fn use_replica(&self) -> bool {
        self.replication >= 2
    }

    /// Whether a copy survives the loss of the process (disk or replica).
    pub fn is_durable(&self) -> bool {
        self.use_disk || self.use_replica()
    }
}

impl Default for StorageLevel {
    fn default() -> Self {
        Self::MEMORY_AND_DISK_2
    }
}

impl fmt::Display for StorageLevel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match Self::NAMED.iter().find(|(_, level)| level == self) {
            Some((name, _)) => f.write_str(name),
            None => write!(
                f,
                "StorageLevel(memory={}, disk={}, replication={})",
                self.use_memory, self.use_disk, self.replication
            ),
        }
    }
}

/// An unknown storage level name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "unknown storage level {name:?}; use one of MEMORY_ONLY, MEMORY_ONLY_2, MEMORY_AND_DISK, MEMORY_AND_DISK_2, DISK_ONLY, DISK_ONLY_2"
)]
pub struct ParseStorageLevelError {
    /// The rejected name.
    pub name: String,
}

impl FromStr for StorageLevel {
    type Err = ParseStorageLevelError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::NAMED
            .iter()
            .find(|(name, _)| name.eq_ignore_ascii_case(s))
            .map(|(_, level)| *level)
            .ok_or_else(|| ParseStorageLevelError { name: s.to_owned() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (name, level) in StorageLevel::NAMED {
            assert_eq!(level.to_string(), name);
            assert_eq!(name.parse::<StorageLevel>().unwrap(), level);
        }
        assert_eq!(StorageLevel::default(), StorageLevel::MEMORY_AND_DISK_2);
        assert!("MEMORY_ONLY_3".parse::<StorageLevel>().is_err());
        assert!(!StorageLevel::MEMORY_ONLY.is_durable());
        assert!(StorageLevel::MEMORY_ONLY_2.is_durable());
    }
}
