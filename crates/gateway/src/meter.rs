//! Per-day request counting for one (key, plan), lock-free on the request path.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use tollgate_core::quota::EpochDay;

/// Counts admitted requests per UTC day until the flusher takes them.
#[derive(Debug, Default)]
pub struct DailyMeter {
    /// `day << 32 | count` not yet flushed.
    current: AtomicU64,
    /// Counts of earlier days displaced by a day rollover before the flusher took them. Touched at most
    /// once per key per day, so a plain mutex (never held across an await) costs nothing.
    spill: Mutex<Vec<(EpochDay, u64)>>,
}

fn pack(day: EpochDay, count: u32) -> u64 {
    (u64::from(day.0) << 32) | u64::from(count)
}

fn unpack(v: u64) -> (EpochDay, u32) {
    (EpochDay((v >> 32) as u32), v as u32)
}

impl DailyMeter {
    /// Counts one request on `day`. True when the meter held nothing before: the first count since
    /// the flusher last took it, so the caller queues the meter for the flusher.
    pub fn record(&self, day: EpochDay) -> bool {
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
                    if seen_day != day && count > 0 {
                        self.spill().push((seen_day, u64::from(count)));
                    }
                    return count == 0;
                }
                Err(seen) => current = seen,
            }
        }
    }

    /// Takes every count not yet taken, per day.
    pub fn take(&self, out: &mut Vec<(EpochDay, u64)>) {
        out.append(&mut self.spill());
        let mut current = self.current.load(Ordering::Relaxed);
        loop {
            let (day, count) = unpack(current);
            if count == 0 {
                return;
            }
            match self.current.compare_exchange_weak(
                current,
                pack(day, 0),
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => {
                    out.push((day, u64::from(count)));
                    return;
                }
                Err(seen) => current = seen,
            }
        }
    }

    fn spill(&self) -> std::sync::MutexGuard<'_, Vec<(EpochDay, u64)>> {
        self.spill.lock().unwrap_or_else(|p| p.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_per_day_across_rollover() {
        let m = DailyMeter::default();
        let mut out = Vec::new();
        m.take(&mut out);
        assert!(out.is_empty());
        assert!(m.record(EpochDay(10)), "the first count");
        assert!(!m.record(EpochDay(10)));
        assert!(!m.record(EpochDay(11)), "a rollover keeps the meter queued");
        m.take(&mut out);
        out.sort();
        assert_eq!(out, vec![(EpochDay(10), 2), (EpochDay(11), 1)]);
        out.clear();
        m.take(&mut out);
        assert!(out.is_empty());
        assert!(m.record(EpochDay(11)), "the first count after a take");
        m.take(&mut out);
        assert_eq!(out, vec![(EpochDay(11), 1)]);
    }

    #[test]
    fn concurrent_records_are_all_counted() {
        let m = std::sync::Arc::new(DailyMeter::default());
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let m = m.clone();
                std::thread::spawn(move || {
                    for i in 0..10_000u32 {
                        m.record(EpochDay(100 + (i + t) / 5_000));
                    }
                })
            })
            .collect();
        let mut out = Vec::new();
        for _ in 0..100 {
            m.take(&mut out);
        }
        for t in threads {
            t.join().unwrap();
        }
        m.take(&mut out);
        assert_eq!(out.iter().map(|(_, n)| n).sum::<u64>(), 40_000);
    }
}
