//! Time as the rest of tollgate sees it: nanoseconds since the Unix epoch, read through a trait so
//! tests can drive time by hand.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Nanoseconds in one second.
pub const NANOS_PER_SEC: u64 = 1_000_000_000;

/// Whole seconds since the epoch in `nanos` (as records and events write times).
pub fn epoch_secs(nanos: u64) -> i64 {
    i64::try_from(nanos / NANOS_PER_SEC).unwrap_or(i64::MAX)
}

/// A source of wall-clock time in nanoseconds since the Unix epoch (UTC).
///
/// Wall time rather than a monotonic clock because quota periods are calendar periods and, in cluster
/// mode, every instance must agree on one timeline.
pub trait Clock: Send + Sync + 'static {
    /// The current time, in nanoseconds since 1970-01-01T00:00:00Z.
    fn now(&self) -> u64;
}

/// The operating system's clock.
#[derive(Debug, Default, Clone, Copy)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> u64 {
        // A clock before 1970 is a broken machine; treat it as the epoch rather than panic.
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
    }
}

/// A clock that only moves when told to, for exact tests.
#[derive(Debug, Default)]
pub struct ManualClock(AtomicU64);

impl ManualClock {
    /// A clock reading `nanos` since the epoch.
    pub fn new(nanos: u64) -> Self {
        Self(AtomicU64::new(nanos))
    }

    /// Moves the clock forward by `nanos`.
    pub fn advance(&self, nanos: u64) {
        self.0.fetch_add(nanos, Ordering::Relaxed);
    }

    /// Sets the clock to `nanos` since the epoch.
    pub fn set(&self, nanos: u64) {
        self.0.store(nanos, Ordering::Relaxed);
    }
}

impl Clock for ManualClock {
    fn now(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}
