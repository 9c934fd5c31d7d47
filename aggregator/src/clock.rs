//! Time as an input: wall-clock time in Unix milliseconds, read through a [`Clock`] that the
//! caller passes in, so that what depends on "now" (alert escalations, devices offline, retry
//! times) can be driven by a test without waiting.
//!
//! - [`SystemClock`] is the machine's clock (what the server passes).
//! - [`ManualClock`] stands still until it is [`set`](ManualClock::set) or
//!   [`advance`](ManualClock::advance)d; clones share one time.
//!
//! This is for timestamps only. Durations and periodic work use `tokio::time` (intervals,
//! sleeps, `Instant`), which tests can pause with `#[tokio::test(start_paused = true)]`.
//!
//! A leaf: depends on nothing in the crate.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

/// Where "now" comes from. Shared as an [`Arc<dyn Clock>`] ([`SharedClock`]).
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// The time now, Unix milliseconds.
    fn now_ms(&self) -> i64;
}

/// A clock as services hold it: cheap to clone.
pub type SharedClock = Arc<dyn Clock>;

/// The machine's wall clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl SystemClock {
    /// The system clock as a [`SharedClock`].
    pub fn shared() -> SharedClock {
        Arc::new(SystemClock)
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
            .unwrap_or(0)
    }
}

/// A clock that moves only when told to (tests). Clones share the same time.
#[derive(Debug, Clone)]
pub struct ManualClock {
    now_ms: Arc<AtomicI64>,
}

impl ManualClock {
    /// A clock standing at `now_ms` (Unix ms).
    pub fn new(now_ms: i64) -> Self {
        Self { now_ms: Arc::new(AtomicI64::new(now_ms)) }
    }

    /// A clock standing at the system clock's time now.
    pub fn at_system_time() -> Self {
        Self::new(SystemClock.now_ms())
    }

    /// Sets the time (it may go backwards, as a wall clock can).
    pub fn set(&self, now_ms: i64) {
        self.now_ms.store(now_ms, Ordering::SeqCst);
    }

    /// Moves the time forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_millis()).unwrap_or(i64::MAX);
        self.now_ms.fetch_add(by, Ordering::SeqCst);
    }

    /// This clock as a [`SharedClock`] (sharing its time).
    pub fn shared(&self) -> SharedClock {
        Arc::new(self.clone())
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_only_when_told_and_clones_share_it() {
        let clock = ManualClock::new(1_000);
        let shared = clock.shared();
        assert_eq!(shared.now_ms(), 1_000);
        clock.advance(Duration::from_secs(3));
        assert_eq!(shared.now_ms(), 4_000);
        clock.set(10);
        assert_eq!((clock.now_ms(), shared.now_ms()), (10, 10));
    }

    #[test]
    fn system_clock_is_unix_time() {
        // 2020-09-13: any machine running this is later.
        assert!(SystemClock.now_ms() > 1_600_000_000_000);
        let m = ManualClock::at_system_time().now_ms();
        assert!((m - SystemClock.now_ms()).abs() < 60_000);
    }
}
