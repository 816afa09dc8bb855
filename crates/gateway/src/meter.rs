//! Per-day request counting for one (key, plan), lock-free on the request path.

use std::sync::atomic::{AtomicU64, Ordering};

use tollgate_core::quota::EpochDay;

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
    /// Counts one request on `day`.
    pub fn record(&self, day: EpochDay) -> Recorded {
        let mut current = self.current.load(Ordering::Relaxed);
        loop {
            let (seen_day, count) = unpack(current);
            let next = if seen_day == day {
                pack(day, count.saturating_add(1))
            } else {
                pack(day, 1)
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
        assert!(m.record(EpochDay(10)).first, "the first count");
        assert_eq!(
            m.record(EpochDay(10)),
            Recorded {
                first: false,
                displaced: None
            }
        );
        assert_eq!(
            m.record(EpochDay(11)),
            Recorded {
                first: false,
                displaced: Some((EpochDay(10), 2))
            },
            "a rollover hands back the earlier day and keeps the meter queued"
        );
        assert_eq!(m.take(), Some((EpochDay(11), 1)));
        assert_eq!(m.take(), None);
        assert!(m.is_empty());
        assert!(m.record(EpochDay(11)).first, "the first count after a take");
        assert_eq!(m.take(), Some((EpochDay(11), 1)));
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
                        let r = m.record(EpochDay(100 + (i + t) / 5_000));
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
