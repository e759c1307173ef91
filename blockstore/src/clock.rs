//! Injected time: [`Clock`], the real [`SystemClock`] and the test [`ManualClock`].
//!
//! Block intervals, batch intervals, retry backoff and lease expiry all read time through a
//! `Clock`, so tests drive time explicitly instead of sleeping.

use std::fmt;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// A source of wall-clock milliseconds that can also wait.
///
/// # Contract
/// - `now_ms` never goes backwards for one clock.
/// - `sleep_until(t)` returns once `now_ms() >= t` (immediately if it already is). A manual clock
///   returns only when the test advances it.
pub trait Clock: Send + Sync + fmt::Debug {
    /// Milliseconds since the Unix epoch.
    fn now_ms(&self) -> i64;
    /// Blocks the calling thread until `now_ms() >= deadline_ms`.
    fn sleep_until(&self, deadline_ms: i64);
    /// Blocks the calling thread for `duration` of this clock's time.
    fn sleep(&self, duration: Duration) {
        self.sleep_until(self.now_ms().saturating_add(duration.as_millis() as i64));
    }
}

/// A shared clock handle.
pub type SharedClock = Arc<dyn Clock>;

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }

    fn sleep_until(&self, deadline_ms: i64) {
        let now = self.now_ms();
        if deadline_ms > now {
            std::thread::sleep(Duration::from_millis((deadline_ms - now) as u64));
        }
    }
}

/// A clock that moves only when told to, for deterministic tests.
///
/// ```
/// use std::sync::Arc;
/// use sluice_blockstore::{Clock, ManualClock};
/// let clock = Arc::new(ManualClock::new(1_000));
/// let sleeper = { let c = clock.clone(); std::thread::spawn(move || { c.sleep_until(1_200); c.now_ms() }) };
/// clock.wait_for_sleepers(1);
/// clock.advance_ms(200);
/// assert_eq!(sleeper.join().unwrap(), 1_200);
/// ```
#[derive(Debug, Default)]
pub struct ManualClock {
    state: Mutex<ManualState>,
    changed: Condvar,
}

#[derive(Debug, Default)]
struct ManualState {
    now_ms: i64,
    sleepers: usize,
    /// Calls to `sleep_until` that blocked, ever.
    blocked_sleeps: u64,
}

impl ManualClock {
    /// A manual clock reading `start_ms`.
    pub fn new(start_ms: i64) -> Self {
        Self {
            state: Mutex::new(ManualState {
                now_ms: start_ms,
                sleepers: 0,
                blocked_sleeps: 0,
            }),
            changed: Condvar::new(),
        }
    }

    /// Moves time forward by `delta_ms` and wakes sleepers whose deadline has come.
    pub fn advance_ms(&self, delta_ms: i64) {
        let mut state = self.state.lock().expect("clock lock");
        state.now_ms += delta_ms;
        self.changed.notify_all();
    }

    /// Sets the time (never backwards: an earlier value is ignored).
    pub fn set_ms(&self, now_ms: i64) {
        let mut state = self.state.lock().expect("clock lock");
        state.now_ms = state.now_ms.max(now_ms);
        self.changed.notify_all();
    }

    /// Number of threads currently blocked in `sleep_until`.
    pub fn sleepers(&self) -> usize {
        self.state.lock().expect("clock lock").sleepers
    }

    /// Blocks until at least `n` threads are sleeping on this clock (so a test can advance time
    /// knowing who will observe it).
    ///
    /// A thread just woken by [`advance_ms`](Self::advance_ms) may still count as sleeping until
    /// it runs; to wait for a thread's *next* sleep, use
    /// [`wait_for_blocked_sleeps`](Self::wait_for_blocked_sleeps).
    pub fn wait_for_sleepers(&self, n: usize) {
        let mut state = self.state.lock().expect("clock lock");
        while state.sleepers < n {
            state = self.changed.wait(state).expect("clock lock");
        }
    }

    /// Blocks until `sleep_until` calls have blocked at least `n` times in all since the clock was
    /// created: a test that advances time after each wait steps a retry loop one sleep at a time.
    ///
    /// ```
    /// use std::sync::Arc;
    /// use sluice_blockstore::{Clock, ManualClock};
    /// let clock = Arc::new(ManualClock::new(0));
    /// let sleeper = { let c = clock.clone(); std::thread::spawn(move || { c.sleep_until(10); c.sleep_until(20); }) };
    /// for n in 1..=2 {
    ///     clock.wait_for_blocked_sleeps(n);
    ///     clock.advance_ms(10);
    /// }
    /// sleeper.join().unwrap();
    /// ```
    pub fn wait_for_blocked_sleeps(&self, n: u64) {
        let mut state = self.state.lock().expect("clock lock");
        while state.blocked_sleeps < n {
            state = self.changed.wait(state).expect("clock lock");
        }
    }
}

impl ManualClock {
    /// Like [`wait_for_blocked_sleeps`](Self::wait_for_blocked_sleeps), but gives up after
    /// `timeout` of real time and says whether the count was reached: a test whose sleeper died
    /// or never sleeps fails instead of hanging. The timeout is a deadlock guard, not a way to
    /// pace a test.
    ///
    /// ```
    /// use std::time::Duration;
    /// use sluice_blockstore::ManualClock;
    /// let clock = ManualClock::new(0);
    /// assert!(!clock.wait_for_blocked_sleeps_timeout(1, Duration::from_millis(1)));
    /// ```
    pub fn wait_for_blocked_sleeps_timeout(&self, n: u64, timeout: Duration) -> bool {
        let state = self.state.lock().expect("clock lock");
        let (state, _) = self
            .changed
            .wait_timeout_while(state, timeout, |state| state.blocked_sleeps < n)
            .expect("clock lock");
        state.blocked_sleeps >= n
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.state.lock().expect("clock lock").now_ms
    }

    fn sleep_until(&self, deadline_ms: i64) {
        let mut state = self.state.lock().expect("clock lock");
        if state.now_ms >= deadline_ms {
            return;
        }
        state.sleepers += 1;
        state.blocked_sleeps += 1;
        self.changed.notify_all();
        while state.now_ms < deadline_ms {
            state = self.changed.wait(state).expect("clock lock");
        }
        state.sleepers -= 1;
        self.changed.notify_all();
    }
}
