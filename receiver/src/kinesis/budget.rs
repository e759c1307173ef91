//! The per-shard read budget live reading and replay share.
//!
//! Kinesis allows 5 `GetRecords` calls per second and 2 MB/s per shard, counted over every
//! consumer of the shard. A replay that reads as fast as it can next to a live reader throttles
//! both — and Spark's re-read loop then fails the recovery it was running. Every `GetRecords`
//! this process makes on a shard therefore takes its turn here first: at least
//! `min_interval` after the previous call, and after a call that returned `n` bytes, no earlier
//! than `n / bytes_per_second` after it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub(crate) struct ReadBudget {
    min_interval: Duration,
    bytes_per_second: u64,
    /// Per shard: when the next call may start.
    next_call: Mutex<HashMap<Arc<str>, Instant>>,
}

impl ReadBudget {
    pub(crate) fn new(min_interval: Duration, bytes_per_second: u64) -> Self {
        Self {
            min_interval,
            bytes_per_second: bytes_per_second.max(1),
            next_call: Mutex::new(HashMap::new()),
        }
    }

    /// Waits for this shard's turn and claims it. Returns how long it waited.
    pub(crate) fn acquire(&self, shard: &Arc<str>) -> Duration {
        let mut waited = Duration::ZERO;
        loop {
            let now = Instant::now();
            let wait = {
                let mut next = self.next_call.lock().expect("read budget lock");
                let slot = next.entry(shard.clone()).or_insert(now);
                if *slot <= now {
                    *slot = now + self.min_interval;
                    return waited;
                }
                *slot - now
            };
            std::thread::sleep(wait);
            waited += wait;
        }
    }

    /// Charges a call that returned `bytes`: the shard's next call waits for the byte budget.
    pub(crate) fn charge(&self, shard: &Arc<str>, started: Instant, bytes: usize) {
        let byte_time = Duration::from_secs_f64(bytes as f64 / self.bytes_per_second as f64);
        let mut next = self.next_call.lock().expect("read budget lock");
        let slot = next.entry(shard.clone()).or_insert(started);
        *slot = (*slot).max(started + byte_time);
    }

    /// Pushes the shard's next call back after a throttle.
    pub(crate) fn back_off(&self, shard: &Arc<str>, delay: Duration) {
        let mut next = self.next_call.lock().expect("read budget lock");
        let now = Instant::now();
        let slot = next.entry(shard.clone()).or_insert(now);
        *slot = (*slot).max(now + delay);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_on_one_shard_are_spaced_and_shards_are_independent() {
        let budget = ReadBudget::new(Duration::from_millis(30), 1_000_000);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        let start = Instant::now();
        budget.acquire(&a);
        budget.acquire(&b);
        assert!(start.elapsed() < Duration::from_millis(30), "other shards do not wait");
        budget.acquire(&a);
        assert!(start.elapsed() >= Duration::from_millis(30));
    }

    #[test]
    fn bytes_read_delay_the_next_call() {
        let budget = ReadBudget::new(Duration::ZERO, 1_000);
        let shard: Arc<str> = "s".into();
        let started = Instant::now();
        budget.acquire(&shard);
        budget.charge(&shard, started, 50); // 50 ms at 1000 B/s
        let waited = budget.acquire(&shard);
        assert!(started.elapsed() >= Duration::from_millis(50), "waited {waited:?}");
    }
}
