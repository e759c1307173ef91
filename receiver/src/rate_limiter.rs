//! [`RateLimiter`]: caps how many records per second a receiver accepts, adjustable at run time.
//!
//! The limit is a ceiling (`max_rate` in the configuration; none means unlimited) and a current
//! rate at or below it, which the engine's backpressure controller moves with
//! [`RateLimiter::set_max_rate`] (Spark's `updateRate`: non-positive or non-finite rates are
//! ignored, higher ones are capped at the ceiling).
//!
//! Permits are reserved in batches (one reservation per page of records): a reservation of `n`
//! records waits until the previous reservations have been paid for at the current rate, then
//! charges `n / rate` seconds to the next one. The shard-reading loop asks for at most one
//! second's worth of records per read, so a rate change takes effect within about a second.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use sluice_blockstore::SharedClock;

use crate::signal::{StopSignal, Wake};

/// A records-per-second limiter on the injected clock.
///
/// ```
/// use std::sync::Arc;
/// use sluice_blockstore::ManualClock;
/// use sluice_receiver::RateLimiter;
/// let limiter = RateLimiter::new(Some(1_000.0), Arc::new(ManualClock::new(0)));
/// limiter.set_max_rate(Some(250.0));
/// assert_eq!(limiter.current_rate(), Some(250.0));
/// limiter.set_max_rate(Some(5_000.0)); // capped at the configured ceiling
/// assert_eq!(limiter.current_rate(), Some(1_000.0));
/// limiter.set_max_rate(Some(-1.0)); // ignored
/// assert_eq!(limiter.current_rate(), Some(1_000.0));
/// ```
#[derive(Debug)]
pub struct RateLimiter {
    clock: SharedClock,
    ceiling: Option<f64>,
    state: Mutex<LimiterState>,
    throttles: AtomicU64,
}

#[derive(Debug)]
struct LimiterState {
    rate: Option<f64>,
    /// Clock time (ms, fractional) at which the next reservation may start.
    next_free_ms: f64,
}

impl RateLimiter {
    /// A limiter with `max_rate` records/s as its ceiling (`None`: unlimited), starting at it.
    pub fn new(max_rate: Option<f64>, clock: SharedClock) -> Self {
        let ceiling = max_rate.filter(|r| r.is_finite() && *r > 0.0);
        Self {
            clock,
            ceiling,
            state: Mutex::new(LimiterState {
                rate: ceiling,
                next_free_ms: f64::MIN,
            }),
            throttles: AtomicU64::new(0),
        }
    }

    /// Sets the current rate (records/s). `None` returns to the configured ceiling; a rate above
    /// the ceiling is capped; a rate that is not finite and positive is ignored.
    pub fn set_max_rate(&self, rate: Option<f64>) {
        let mut state = self.state.lock().expect("rate limiter lock");
        match rate {
            None => state.rate = self.ceiling,
            Some(r) if r.is_finite() && r > 0.0 => {
                state.rate = Some(self.ceiling.map_or(r, |c| r.min(c)));
            }
            Some(_) => {}
        }
    }

    /// The current rate in records/s; `None` means unlimited.
    pub fn current_rate(&self) -> Option<f64> {
        self.state.lock().expect("rate limiter lock").rate
    }

    /// The configured ceiling in records/s; `None` means unlimited.
    pub fn ceiling(&self) -> Option<f64> {
        self.ceiling
    }

    /// How many reservations had to wait.
    pub fn throttles(&self) -> u64 {
        self.throttles.load(Ordering::Relaxed)
    }

    /// The most records worth asking the source for in one read: `max`, or one second's worth at
    /// the current rate if that is smaller (at least 1).
    pub fn records_per_read(&self, max: usize) -> usize {
        match self.current_rate() {
            Some(rate) => (rate.floor() as usize).clamp(1, max.max(1)),
            None => max.max(1),
        }
    }

    /// Reserves `n` records; returns the clock time to wait until, if any.
    fn reserve(&self, n: usize) -> Option<i64> {
        let mut state = self.state.lock().expect("rate limiter lock");
        let rate = state.rate?;
        let now = self.clock.now_ms() as f64;
        let start = state.next_free_ms.max(now);
        state.next_free_ms = start + n as f64 * 1000.0 / rate;
        (start > now).then(|| start.ceil() as i64)
    }

    /// Blocks until `n` more records may pass.
    pub fn acquire(&self, n: usize) {
        if let Some(deadline) = self.reserve(n) {
            self.throttles.fetch_add(1, Ordering::Relaxed);
            self.clock.sleep_until(deadline);
        }
    }

    /// Like [`acquire`](Self::acquire) but gives up when `signal` stops; returns whether the
    /// records may pass.
    pub(crate) fn acquire_or_stop(&self, n: usize, signal: &StopSignal) -> bool {
        let Some(deadline) = self.reserve(n) else {
            return !signal.is_stopped();
        };
        self.throttles.fetch_add(1, Ordering::Relaxed);
        loop {
            match signal.wait_until(&*self.clock, deadline) {
                Wake::Deadline => return true,
                Wake::Stopped => return false,
                Wake::Nudged => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use sluice_blockstore::{Clock, ManualClock};

    use super::*;

    #[test]
    fn unlimited_never_waits() {
        let clock = Arc::new(ManualClock::new(0));
        let limiter = RateLimiter::new(None, clock);
        assert_eq!(limiter.reserve(1_000_000), None);
        assert_eq!(limiter.records_per_read(500), 500);
        assert_eq!(limiter.throttles(), 0);
    }

    #[test]
    fn reservations_are_paid_at_the_current_rate() {
        let clock = Arc::new(ManualClock::new(10_000));
        let limiter = RateLimiter::new(Some(100.0), clock.clone());
        // The first reservation passes; 50 records at 100/s cost 500 ms for the next one.
        assert_eq!(limiter.reserve(50), None);
        assert_eq!(limiter.reserve(100), Some(10_500));
        assert_eq!(limiter.reserve(1), Some(11_500));
        // A slower rate makes later reservations cost more.
        limiter.set_max_rate(Some(10.0));
        assert_eq!(limiter.reserve(10), Some(11_510));
        assert_eq!(limiter.reserve(1), Some(12_510));
        assert_eq!(limiter.records_per_read(10_000), 10);
        // After idling, nothing is owed.
        clock.set_ms(20_000);
        assert_eq!(limiter.reserve(1), None);
        assert_eq!(clock.now_ms(), 20_000);
    }

    #[test]
    fn acquire_waits_on_the_clock_and_stop_interrupts() {
        let clock = Arc::new(ManualClock::new(0));
        let limiter = Arc::new(RateLimiter::new(Some(10.0), clock.clone()));
        let signal = Arc::new(StopSignal::new());
        assert!(limiter.acquire_or_stop(10, &signal));
        let waiter = {
            let (limiter, signal) = (limiter.clone(), signal.clone());
            std::thread::spawn(move || limiter.acquire_or_stop(1, &signal))
        };
        // The waiter counts its throttle when it reserves, before it waits.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while limiter.throttles() == 0 && std::time::Instant::now() < deadline {
            std::thread::yield_now();
        }
        assert_eq!(limiter.throttles(), 1);
        clock.advance_ms(1_000);
        assert!(waiter.join().unwrap());
        let waiter = {
            let (limiter, signal) = (limiter.clone(), signal.clone());
            std::thread::spawn(move || limiter.acquire_or_stop(1, &signal))
        };
        signal.stop();
        assert!(!waiter.join().unwrap());
    }
}
