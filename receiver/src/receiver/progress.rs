//! How far a receiver has read and stored each shard, and where each shard is in its life — one
//! owner type whose transitions are the only way to change it (the shard loops, the generator's
//! `on_stored` callback and the coordinator each call the transition they mean).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};

use sluice_blockstore::{Position, SequenceNumberRanges};

use super::metrics::ReceiverMetrics;

/// Read and stored progress of one shard.
#[derive(Debug, Default, Clone)]
struct ShardProgress {
    records_read: u64,
    records_stored: u64,
    latest_read: Option<Position>,
    latest_stored: Option<Position>,
    /// The last read of the running loop returned nothing: the shard is at its current end.
    at_end: bool,
    /// The reader reached the end of the closed shard; its children.
    ended: Option<Vec<Arc<str>>>,
    /// `SHARD_END` is recorded for it (by this receiver).
    finished: bool,
    /// This receiver holds its lease.
    owned: bool,
}

impl ShardProgress {
    /// Every record read is in a stored block.
    fn all_stored(&self) -> bool {
        self.records_stored >= self.records_read
    }
}

/// Every shard's [`ShardProgress`], behind one lock.
#[derive(Debug, Default)]
pub(crate) struct ShardProgressTable(Mutex<HashMap<Arc<str>, ShardProgress>>);

impl ShardProgressTable {
    /// Shards resumed strictly after the given (logged) positions.
    pub(crate) fn resuming_after(resume_after: &HashMap<Arc<str>, Position>) -> Self {
        let table = resume_after
            .iter()
            .map(|(shard, position)| {
                let p = ShardProgress {
                    latest_stored: Some(position.clone()),
                    latest_read: Some(position.clone()),
                    ..ShardProgress::default()
                };
                (shard.clone(), p)
            })
            .collect();
        Self(Mutex::new(table))
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Arc<str>, ShardProgress>> {
        self.0.lock().expect("progress lock")
    }

    fn update(&self, shard: &Arc<str>, f: impl FnOnce(&mut ShardProgress)) {
        f(self.lock().entry(shard.clone()).or_default());
    }

    /// A new incarnation of the reading side starts: whatever was read but not stored will be
    /// read again, and no shard is owned, at its end or ended yet.
    pub(crate) fn restart(&self) {
        for p in self.lock().values_mut() {
            p.records_read = p.records_stored;
            p.latest_read.clone_from(&p.latest_stored);
            p.at_end = false;
            p.ended = None;
            p.owned = false;
        }
    }

    /// A loop read `n` records of `shard` (before handing them to the generator).
    pub(crate) fn read(&self, shard: &Arc<str>, n: u64) {
        self.update(shard, |p| {
            p.records_read += n;
            p.at_end = false;
        });
    }

    /// The generator accepted the page read last; `last` is its last position.
    pub(crate) fn accepted(&self, shard: &Arc<str>, last: Option<Position>) {
        self.update(shard, |p| p.latest_read = last);
    }

    /// The generator refused `refused` records of the page read last (it is stopping).
    pub(crate) fn refused(&self, shard: &Arc<str>, refused: u64) {
        self.update(shard, |p| p.records_read -= refused);
    }

    /// The last read of `shard` returned nothing: it is at its current end.
    pub(crate) fn at_end(&self, shard: &Arc<str>) {
        self.update(shard, |p| p.at_end = true);
    }

    /// The reader reached the end of the closed `shard`, whose children are `children`.
    pub(crate) fn ended(&self, shard: &Arc<str>, children: Vec<Arc<str>>) {
        self.update(shard, |p| {
            p.ended = Some(children);
            p.at_end = true;
        });
    }

    /// A block with these ranges is stored (and logged).
    pub(crate) fn stored(&self, ranges: &SequenceNumberRanges) {
        let mut table = self.lock();
        for range in ranges {
            let p = table.entry(range.shard_id.clone()).or_default();
            p.records_stored += range.record_count;
            if p.latest_stored.as_ref().is_none_or(|s| *s < range.to) {
                p.latest_stored = Some(range.to.clone());
            }
        }
    }

    /// This receiver took `shard`'s lease.
    pub(crate) fn taken(&self, shard: &Arc<str>) {
        self.update(shard, |p| p.owned = true);
    }

    /// A loop starts reading `shard`.
    pub(crate) fn started(&self, shard: &Arc<str>) {
        self.update(shard, |p| {
            p.at_end = false;
            p.ended = None;
            p.owned = true;
        });
    }

    /// This receiver gave `shard`'s lease up (released it, or stops).
    pub(crate) fn released(&self, shard: &Arc<str>) {
        self.update(shard, |p| p.owned = false);
    }

    /// Another worker took `shard`'s lease: it finishes the shard, this receiver no longer waits
    /// for it.
    pub(crate) fn lost(&self, shard: &Arc<str>) {
        self.update(shard, |p| {
            p.owned = false;
            p.ended = None;
        });
    }

    /// `SHARD_END` is recorded for `shard` and its lease released.
    pub(crate) fn finished(&self, shard: &Arc<str>) {
        self.update(shard, |p| {
            p.finished = true;
            p.owned = false;
        });
    }

    /// The last stored position of `shard`.
    pub(crate) fn latest_stored(&self, shard: &str) -> Option<Position> {
        self.lock().get(shard).and_then(|p| p.latest_stored.clone())
    }

    /// Whether every record read from `shard` is stored (`true` for a shard never read).
    pub(crate) fn all_stored(&self, shard: &str) -> bool {
        self.lock().get(shard).is_none_or(ShardProgress::all_stored)
    }

    /// Of `shards`, those this receiver read whose every record read is stored.
    pub(crate) fn fully_stored<'a>(&self, shards: impl IntoIterator<Item = &'a Arc<str>>) -> Vec<Arc<str>> {
        let table = self.lock();
        shards
            .into_iter()
            .filter(|s| table.get(*s).is_some_and(ShardProgress::all_stored))
            .cloned()
            .collect()
    }

    /// The shards this receiver owns (sorted), and whether every shard is done for now: all it
    /// read is stored, and it is at its end, not owned, or (a closed shard) finished.
    pub(crate) fn owned_and_done(&self) -> (Vec<String>, bool) {
        let table = self.lock();
        let mut owned: Vec<String> = table
            .iter()
            .filter(|(_, p)| p.owned)
            .map(|(s, _)| s.to_string())
            .collect();
        owned.sort();
        let done = table.values().all(|p| {
            let idle = if p.ended.is_some() {
                p.finished
            } else {
                !p.owned || p.at_end
            };
            p.all_stored() && idle
        });
        (owned, done)
    }

    /// Adds each shard's stored count, last stored position and ownership to `metrics`.
    pub(crate) fn fill_metrics(&self, metrics: &mut ReceiverMetrics) {
        for (shard, p) in self.lock().iter() {
            let m = metrics.shards.entry(shard.to_string()).or_default();
            m.records_stored = p.records_stored;
            m.latest_stored.clone_from(&p.latest_stored);
            m.owned = p.owned;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use sluice_blockstore::{Position, SequenceNumber, SequenceNumberRange, SequenceNumberRanges};

    use super::ShardProgressTable;

    fn at(n: u128) -> Position {
        Position::plain(SequenceNumber::from_u128(n))
    }

    fn range(shard: &Arc<str>, from: u128, to: u128) -> SequenceNumberRanges {
        SequenceNumberRanges::from(vec![SequenceNumberRange {
            stream: Arc::from("s"),
            shard_id: shard.clone(),
            from: at(from),
            to: at(to),
            record_count: u64::try_from(to - from + 1).unwrap(),
        }])
    }

    #[test]
    fn a_shard_is_done_when_all_it_read_is_stored_and_it_is_at_its_end() {
        let shard: Arc<str> = Arc::from("shard-0");
        let table = ShardProgressTable::resuming_after(&HashMap::from([(shard.clone(), at(10))]));
        assert_eq!(table.latest_stored(&shard), Some(at(10)));
        table.taken(&shard);
        table.started(&shard);
        table.read(&shard, 5);
        table.accepted(&shard, Some(at(15)));
        assert!(!table.all_stored(&shard));
        table.at_end(&shard);
        assert_eq!(
            table.owned_and_done(),
            (vec!["shard-0".to_owned()], false),
            "read, not stored"
        );
        table.stored(&range(&shard, 11, 15));
        assert!(table.all_stored(&shard));
        assert_eq!(table.latest_stored(&shard), Some(at(15)));
        assert_eq!(table.owned_and_done(), (vec!["shard-0".to_owned()], true));
        // A closed shard is done only once finished (SHARD_END recorded).
        table.ended(&shard, vec![Arc::from("shard-1")]);
        assert!(!table.owned_and_done().1);
        assert_eq!(table.fully_stored([&shard]), vec![shard.clone()]);
        table.finished(&shard);
        assert_eq!(table.owned_and_done(), (vec![], true));
    }

    #[test]
    fn a_restart_forgets_what_was_read_but_not_stored() {
        let shard: Arc<str> = Arc::from("shard-0");
        let table = ShardProgressTable::default();
        table.taken(&shard);
        table.read(&shard, 8);
        table.stored(&range(&shard, 1, 3));
        table.restart();
        assert!(table.all_stored(&shard), "the unstored 5 will be read again");
        assert_eq!(table.owned_and_done(), (vec![], true), "nothing owned after a restart");
        table.read(&shard, 4);
        table.refused(&shard, 4);
        assert!(table.all_stored(&shard), "refused records were never taken");
    }
}
