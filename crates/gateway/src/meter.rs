//! Per-day request counting for one (key, plan), and when the key was last presented; lock-free on
//! the request path.

use std::sync::atomic::{AtomicU64, Ordering};

use tollgate_core::clock::NANOS_PER_SEC;
use tollgate_core::quota::EpochDay;

/// What a membership counts per day: the requests admitted (AWS's usage) and those refused by a
/// throttle or for a spent quota (tollgate's own history of who is hammering).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Counted {
    /// Admitted, and metered against the quota.
    Admitted = 0,
    /// Refused by a throttle (429 Too Many Requests).
    Throttled = 1,
    /// Refused for the spent quota (429 Limit Exceeded).
    QuotaExceeded = 2,
}

impl Counted {
    /// Every kind, in the order of a membership's meters.
    pub const ALL: [Self; 3] = [Self::Admitted, Self::Throttled, Self::QuotaExceeded];
}

/// The minute a key was last presented (with its membership's plan covering the stage), kept until
/// the flusher takes it: one word, `minute | UNTAKEN`.
#[derive(Debug, Default)]
pub struct LastSeen(AtomicU64);

const UNTAKEN: u64 = 1 << 63;
const NANOS_PER_MINUTE: u64 = 60 * NANOS_PER_SEC;

impl LastSeen {
    /// Notes a request at `now`; returns whether the flusher must be told (the first change since
    /// it last took the minute). Costs one load while the minute has not moved.
    pub fn saw(&self, now: u64) -> bool {
        let minute = now / NANOS_PER_MINUTE;
        if self.0.load(Ordering::Relaxed) & !UNTAKEN >= minute {
            return false;
        }
        let before = self.0.fetch_max(minute | UNTAKEN, Ordering::AcqRel);
        before & UNTAKEN == 0
    }

    /// Takes the minute not yet taken, as epoch seconds.
    pub fn take(&self) -> Option<u64> {
        let before = self.0.fetch_and(!UNTAKEN, Ordering::AcqRel);
        (before & UNTAKEN != 0).then_some((before & !UNTAKEN) * 60)
    }

    /// Whether the last minute has been taken.
    pub fn is_empty(&self) -> bool {
        self.0.load(Ordering::Acquire) & UNTAKEN == 0
    }
}

/// Counts admitted requests of the current UTC day until the flusher takes them: one word, so a
/// million memberships cost 8 bytes each.
#[derive(Debug, Default)]
pub struct DailyMeter {
    /// `day << 32 | count` not yet taken.
    current: AtomicU64,
}

/// What one count did to a meter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Recorded {
    /// The meter held nothing before: the first count since the flusher last took it, so the caller
    /// queues the meter for the flusher.
    pub first: bool,
    /// Counts of an earlier day this count displaced (a day rollover before the flusher took
    /// them): the caller keeps them for the flusher.
    pub displaced: Option<(EpochDay, u64)>,
}

fn pack(day: EpochDay, count: u32) -> u64 {
    (u64::from(day.0) << 32) | u64::from(count)
}

fn unpack(v: u64) -> (EpochDay, u32) {
    (EpochDay((v >> 32) as u32), v as u32)
}

impl DailyMeter {
    /// Counts `n` (at least 1) on `day`.
    pub fn record(&self, day: EpochDay, n: u32) -> Recorded {
        let mut current = self.current.load(Ordering::Relaxed);
        loop {
            let (seen_day, count) = unpack(current);
            let next = if seen_day == day {
                pack(day, count.saturating_add(n))
            } else {
                pack(day, n)
            };
            match self.current.compare_exchange_weak(
                current,
                next,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    return Recorded {
                        first: count == 0,
                        displaced: (seen_day != day && count > 0)
                            .then_some((seen_day, u64::from(count))),
                    };
                }
                Err(seen) => current = seen,
            }
        }
    }

    /// Takes the count not yet taken, if any.
    pub fn take(&self) -> Option<(EpochDay, u64)> {
        let mut current = self.current.load(Ordering::Relaxed);
        loop {
            let (day, count) = unpack(current);
            if count == 0 {
                return None;
            }
            match self.current.compare_exchange_weak(
                current,
                pack(day, 0),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some((day, u64::from(count))),
                Err(seen) => current = seen,
            }
        }
    }

    /// Whether every count has been taken.
    pub fn is_empty(&self) -> bool {
        unpack(self.current.load(Ordering::Acquire)).1 == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_day_across_rollover() {
        let m = DailyMeter::default();
        assert_eq!(m.take(), None);
        assert!(m.is_empty());
        assert!(m.record(EpochDay(10), 1).first, "the first count");
        assert_eq!(
            m.record(EpochDay(10), 1),
            Recorded {
                first: false,
                displaced: None
            }
        );
        assert_eq!(
            m.record(EpochDay(11), 1),
            Recorded {
                first: false,
                displaced: Some((EpochDay(10), 2))
            },
            "a rollover hands back the earlier day and keeps the meter queued"
        );
        assert_eq!(m.take(), Some((EpochDay(11), 1)));
        assert_eq!(m.take(), None);
        assert!(m.is_empty());
        assert!(
            m.record(EpochDay(11), 1).first,
            "the first count after a take"
        );
        assert_eq!(m.take(), Some((EpochDay(11), 1)));
    }

    #[test]
    fn last_seen_moves_forward_and_is_taken_once() {
        let seen = LastSeen::default();
        assert!(seen.is_empty());
        assert_eq!(seen.take(), None);
        let t = 29_000_000 * NANOS_PER_MINUTE;
        assert!(seen.saw(t + 5), "the first sight tells the flusher");
        assert!(
            !seen.saw(t + 59 * NANOS_PER_SEC),
            "the same minute: nothing to do"
        );
        assert!(!seen.saw(t + NANOS_PER_MINUTE), "already queued");
        assert!(!seen.saw(t), "an older reading does not go back");
        assert!(!seen.is_empty());
        assert_eq!(seen.take(), Some((29_000_000 + 1) * 60));
        assert!(seen.is_empty());
        assert_eq!(seen.take(), None);
        assert!(!seen.saw(t + NANOS_PER_MINUTE), "taken, and not newer");
        assert!(seen.saw(t + 2 * NANOS_PER_MINUTE));
        assert_eq!(seen.take(), Some((29_000_000 + 2) * 60));
    }

    #[test]
    fn concurrent_records_are_all_counted() {
        let m = std::sync::Arc::new(DailyMeter::default());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    let mut displaced = 0;
                    for i in 0..10_000u32 {
                        let r = m.record(EpochDay(100 + (i + t) / 5_000), 1);
                        displaced += r.displaced.map_or(0, |(_, n)| n);
                    }
                    displaced
                })
            })
            .collect();
        let mut taken = 0;
        for _ in 0..100 {
            taken += m.take().map_or(0, |(_, n)| n);
        }
        for t in threads {
            taken += t.join().unwrap();
        }
        taken += m.take().map_or(0, |(_, n)| n);
        assert_eq!(taken, 40_000);
    }
}
