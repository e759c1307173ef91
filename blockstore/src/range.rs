//! [`SequenceNumberRange`] and [`SequenceNumberRanges`]: what a block covers in its source.
//!
//! A block is tagged with the ranges of the records it holds, one range per (shard, contiguous run
//! of records added together). Both ends are inclusive positions, so a range can start or end
//! inside a KPL aggregated record. The ranges are the block's lineage: when no valid copy of the
//! block exists, re-reading exactly these ranges from the source rebuilds it.

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::Position;

/// A run of records of one shard, `from ..= to`, holding `record_count` user records.
///
/// `record_count` is the number of user records (after KPL de-aggregation) between the two
/// positions inclusive, as the receiver saw them; replay checks it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SequenceNumberRange {
    /// The stream (or local log) name.
    pub stream: Arc<str>,
    /// The shard the records came from.
    pub shard_id: Arc<str>,
    /// Position of the first record (inclusive).
    pub from: Position,
    /// Position of the last record (inclusive).
    pub to: Position,
    /// Number of user records in the range.
    pub record_count: u64,
}

impl SequenceNumberRange {
    /// Whether `position` of `shard_id` lies inside this range.
    pub fn contains(&self, shard_id: &str, position: &Position) -> bool {
        &*self.shard_id == shard_id && &self.from <= position && position <= &self.to
    }
}

impl fmt::Display for SequenceNumberRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}/{}[{}..={}]x{}",
            self.stream, self.shard_id, self.from, self.to, self.record_count
        )
    }
}

/// The ranges one block covers (several shards, several runs of one shard).
///
/// ```
/// use sluice_blockstore::{Position, SequenceNumber, SequenceNumberRange, SequenceNumberRanges};
/// let pos = |n: u128| Position::plain(SequenceNumber::from_u128(n));
/// let ranges = SequenceNumberRanges::from(vec![SequenceNumberRange {
///     stream: "clicks".into(), shard_id: "shard-0".into(), from: pos(10), to: pos(12), record_count: 3,
/// }]);
/// assert!(ranges.non_empty());
/// assert_eq!(ranges.to_string(), "clicks/shard-0[10..=12]x3");
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct SequenceNumberRanges(pub Vec<SequenceNumberRange>);

impl SequenceNumberRanges {
    /// No ranges.
    pub fn new() -> Self {
        Self(Vec::new())
    }

    /// Whether there are no ranges.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Whether there is at least one range.
    pub fn non_empty(&self) -> bool {
        !self.0.is_empty()
    }

    /// Total records over all ranges.
    pub fn record_count(&self) -> u64 {
        self.0.iter().map(|r| r.record_count).sum()
    }

    /// The ranges in order.
    pub fn iter(&self) -> std::slice::Iter<'_, SequenceNumberRange> {
        self.0.iter()
    }

    /// Appends a range.
    pub fn push(&mut self, range: SequenceNumberRange) {
        self.0.push(range);
    }

    /// The last position covered per shard (the furthest `to` of each shard's ranges).
    pub fn last_position_per_shard(&self) -> Vec<(Arc<str>, Arc<str>, Position)> {
        let mut out: Vec<(Arc<str>, Arc<str>, Position)> = Vec::new();
        for r in &self.0 {
            match out
                .iter_mut()
                .find(|(s, shard, _)| *s == r.stream && *shard == r.shard_id)
            {
                Some(entry) if entry.2 < r.to => entry.2 = r.to.clone(),
                Some(_) => {}
                None => out.push((r.stream.clone(), r.shard_id.clone(), r.to.clone())),
            }
        }
        out
    }
}

impl From<Vec<SequenceNumberRange>> for SequenceNumberRanges {
    fn from(ranges: Vec<SequenceNumberRange>) -> Self {
        Self(ranges)
    }
}

impl From<SequenceNumberRange> for SequenceNumberRanges {
    fn from(range: SequenceNumberRange) -> Self {
        Self(vec![range])
    }
}

impl<'a> IntoIterator for &'a SequenceNumberRanges {
    type Item = &'a SequenceNumberRange;
    type IntoIter = std::slice::Iter<'a, SequenceNumberRange>;
    fn into_iter(self) -> Self::IntoIter {
        self.0.iter()
    }
}

impl fmt::Display for SequenceNumberRanges {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("(no ranges)");
        }
        for (i, r) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{r}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SequenceNumber;

    fn range(shard: &str, from: u128, to: u128) -> SequenceNumberRange {
        SequenceNumberRange {
            stream: "s".into(),
            shard_id: shard.into(),
            from: Position::plain(SequenceNumber::from_u128(from)),
            to: Position::plain(SequenceNumber::from_u128(to)),
            record_count: (to - from + 1) as u64,
        }
    }

    #[test]
    fn empty_and_display() {
        let empty = SequenceNumberRanges::new();
        assert!(empty.is_empty() && !empty.non_empty());
        assert_eq!(empty.to_string(), "(no ranges)");
        let two = SequenceNumberRanges::from(vec![range("a", 1, 2), range("b", 5, 9)]);
        assert_eq!(two.to_string(), "s/a[1..=2]x2, s/b[5..=9]x5");
        assert_eq!(two.record_count(), 7);
    }

    #[test]
    fn serde_round_trip() {
        let two = SequenceNumberRanges::from(vec![range("a", 1, 2), range("b", 5, 9)]);
        let json = serde_json::to_string(&two).unwrap();
        assert_eq!(serde_json::from_str::<SequenceNumberRanges>(&json).unwrap(), two);
    }

    #[test]
    fn last_position_per_shard_takes_the_max() {
        let r = SequenceNumberRanges::from(vec![range("a", 1, 2), range("b", 5, 9), range("a", 3, 4)]);
        let last = r.last_position_per_shard();
        assert_eq!(last.len(), 2);
        assert_eq!(last[0].2.sequence.as_str(), "4");
        assert!(r.0[0].contains("a", &Position::plain(SequenceNumber::from_u128(2))));
        assert!(!r.0[0].contains("b", &Position::plain(SequenceNumber::from_u128(2))));
    }
}
