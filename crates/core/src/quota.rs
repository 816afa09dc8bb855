//! Quota periods: calendar days, weeks and months in UTC, shifted by `offset` days, and the atomic
//! counter that enforces a quota inside the current period.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};

use jiff::civil::Date;

use crate::clock::NANOS_PER_SEC;
pub use crate::model::Period;
use crate::model::QuotaSettings;

/// Seconds in a UTC day (no leap seconds: Unix time).
pub const SECS_PER_DAY: i64 = 86_400;
const NANOS_PER_DAY: u64 = SECS_PER_DAY.unsigned_abs() * NANOS_PER_SEC;

/// A UTC calendar day, counted from 1970-01-01 (day 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EpochDay(pub u32);

impl EpochDay {
    /// The day containing `nanos` since the epoch.
    pub fn from_nanos(nanos: u64) -> Self {
        Self(u32::try_from(nanos / NANOS_PER_DAY).unwrap_or(u32::MAX))
    }

    /// The first nanosecond of this day.
    pub fn start_nanos(self) -> u64 {
        u64::from(self.0) * NANOS_PER_DAY
    }

    /// The day containing `secs` since the epoch (day 0 before it).
    pub fn from_secs(secs: i64) -> Self {
        Self(u32::try_from(secs.max(0) / SECS_PER_DAY).unwrap_or(u32::MAX))
    }

    /// The first second of this day.
    pub fn start_secs(self) -> i64 {
        i64::from(self.0) * SECS_PER_DAY
    }

    /// The civil date of this day.
    pub fn date(self) -> Date {
        // Infallible for every u32 day below jiff's year 9999 bound; clamp beyond it.
        Date::constant(1970, 1, 1)
            .checked_add(jiff::Span::new().days(i64::from(self.0.min(2_932_896))))
            .unwrap_or(Date::MAX)
    }

    /// The day of a civil date, or `None` before 1970.
    pub fn from_date(date: Date) -> Option<Self> {
        let days = Date::constant(1970, 1, 1).until(date).ok()?.get_days();
        u32::try_from(days).ok().map(Self)
    }

    /// The following day.
    pub fn next(self) -> Self {
        Self(self.0.saturating_add(1))
    }
}

impl fmt::Display for EpochDay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.date())
    }
}

/// One quota period: days `start` (inclusive) to `end` (exclusive).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaWindow {
    /// First day of the period.
    pub start: EpochDay,
    /// First day of the next period.
    pub end: EpochDay,
}

impl QuotaWindow {
    /// The period of `quota` that contains `day`.
    pub fn containing(quota: &QuotaSettings, day: EpochDay) -> Self {
        match quota.period {
            Period::Day => Self {
                start: day,
                end: day.next(),
            },
            Period::Week => {
                // 1970-01-01 was a Thursday: weekday 4 when Sunday is 0.
                let weekday = (day.0 + 4) % 7;
                let back = (weekday + 7 - quota.offset % 7) % 7;
                let start = EpochDay(day.0.saturating_sub(back));
                Self {
                    start,
                    end: EpochDay(start.0 + 7),
                }
            }
            Period::Month => {
                let date = day.date();
                let anchor = i8::try_from(1 + quota.offset.min(27)).unwrap_or(1);
                let this_month = date.first_of_month();
                let first = if date.day() >= anchor {
                    this_month
                } else {
                    this_month
                        .checked_sub(jiff::Span::new().months(1))
                        .unwrap_or(this_month)
                };
                // `anchor` is at most 28, so it exists in every month.
                let start = first.with().day(anchor).build().unwrap_or(first);
                let end = start
                    .checked_add(jiff::Span::new().months(1))
                    .unwrap_or(Date::MAX);
                Self {
                    start: EpochDay::from_date(start).unwrap_or(EpochDay(0)),
                    end: EpochDay::from_date(end).unwrap_or(EpochDay(u32::MAX)),
                }
            }
        }
    }

    fn pack(self) -> u64 {
        (u64::from(self.start.0) << 32) | u64::from(self.end.0)
    }

    fn unpack(v: u64) -> Self {
        Self {
            start: EpochDay((v >> 32) as u32),
            end: EpochDay(v as u32),
        }
    }

    fn contains(self, day: EpochDay) -> bool {
        self.start <= day && day < self.end
    }
}

/// What a quota said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QuotaDecision {
    /// Counted; `remaining` requests are left in the period.
    Allowed {
        /// Requests left in this period after this one.
        remaining: u64,
        /// When the period ends.
        resets_at: EpochDay,
    },
    /// The period's quota is spent.
    Refused {
        /// When the period ends and the quota is refilled.
        resets_at: EpochDay,
    },
}

/// One plan's quota: its settings and its current period, cached so the common case is one
/// comparison. Shared by every key of the plan; each key's count is a [`QuotaCount`].
#[derive(Debug)]
pub struct Quota {
    settings: QuotaSettings,
    /// The cached current window, packed `start << 32 | end` (empty until first asked).
    window: AtomicU64,
}

/// One key's count under a [`Quota`]: `window start << 32 | used as i32`, valid only for the window
/// it names (so a new period starts at zero without anyone resetting it). It goes negative when an
/// operator grants more than the limit (AWS UpdateUsage).
#[derive(Debug, Default)]
pub struct QuotaCount(AtomicU64);

/// The most a key may be given to spend in a period (AWS UpdateUsage `remaining`): AWS's quota limit
/// is an Integer, and a period's count is held in 32 bits, so `limit - remaining` always fits.
pub const MAX_REMAINING: i64 = i32::MAX as i64;

fn pack_count(start: EpochDay, used: i64) -> u64 {
    let used = i32::try_from(used).unwrap_or(if used < 0 { i32::MIN } else { i32::MAX });
    (u64::from(start.0) << 32) | u64::from(used as u32)
}

impl Quota {
    /// The quota for `settings`.
    pub fn new(settings: QuotaSettings) -> Self {
        Self {
            settings,
            window: AtomicU64::new(0),
        }
    }

    /// The settings this quota enforces.
    pub fn settings(&self) -> &QuotaSettings {
        &self.settings
    }

    /// The period containing `day`, from the cache when it still applies.
    pub fn window(&self, day: EpochDay) -> QuotaWindow {
        let cached = QuotaWindow::unpack(self.window.load(Ordering::Relaxed));
        if cached.contains(day) {
            return cached;
        }
        let fresh = QuotaWindow::containing(&self.settings, day);
        self.window.store(fresh.pack(), Ordering::Relaxed);
        fresh
    }

    /// Spends `cost` (a request's cost: 1 unless its route says otherwise) of `count`'s period at
    /// `now` if the period has that much left; never part of it. A cost of 0 spends nothing and is
    /// never refused.
    pub fn try_consume(&self, count: &QuotaCount, cost: u32, now: u64) -> QuotaDecision {
        let window = self.window(EpochDay::from_nanos(now));
        let limit = i64::from(self.settings.limit);
        let cost = i64::from(cost);
        let mut current = count.0.load(Ordering::Acquire);
        loop {
            let used = used_in(current, window);
            let left = |used: i64| u64::try_from(limit - used).unwrap_or(0);
            if cost == 0 {
                return QuotaDecision::Allowed {
                    remaining: left(used),
                    resets_at: window.end,
                };
            }
            if used + cost > limit {
                return QuotaDecision::Refused {
                    resets_at: window.end,
                };
            }
            let next = pack_count(window.start, used + cost);
            match count
                .0
                .compare_exchange_weak(current, next, Ordering::AcqRel, Ordering::Acquire)
            {
                Ok(_) => {
                    return QuotaDecision::Allowed {
                        remaining: left(used + cost),
                        resets_at: window.end,
                    };
                }
                Err(seen) => current = seen,
            }
        }
    }

    /// Gives back `cost` that [`Quota::try_consume`] spent at `now` for a request refused further
    /// on (its credits), unless the period has turned since.
    pub fn give_back(&self, count: &QuotaCount, cost: u32, now: u64) {
        let window = self.window(EpochDay::from_nanos(now));
        let _ = count
            .0
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |current| {
                ((current >> 32) as u32 == window.start.0)
                    .then(|| pack_count(window.start, used_in(current, window) - i64::from(cost)))
            });
    }

    /// Requests `count` holds in the period containing `now` (negative after a grant above the
    /// limit).
    pub fn used(&self, count: &QuotaCount, now: u64) -> i64 {
        let window = self.window(EpochDay::from_nanos(now));
        used_in(count.0.load(Ordering::Acquire), window)
    }

    /// Requests left to `count` in the period containing `now`.
    pub fn remaining(&self, count: &QuotaCount, now: u64) -> u64 {
        u64::try_from(i64::from(self.settings.limit) - self.used(count, now)).unwrap_or(0)
    }

    /// Sets `count` to `used` requests in the period containing `now`; returns by how much the
    /// period's count changed.
    pub fn set_used(&self, count: &QuotaCount, now: u64, used: i64) -> i64 {
        let window = self.window(EpochDay::from_nanos(now));
        let before = count
            .0
            .swap(pack_count(window.start, used), Ordering::AcqRel);
        used - used_in(before, window)
    }

    /// Sets what is left to `count` in the current period (AWS UpdateUsage `replace /remaining`);
    /// returns by how much the period's count changed.
    pub fn set_remaining(&self, count: &QuotaCount, now: u64, remaining: i64) -> i64 {
        self.set_used(count, now, i64::from(self.settings.limit) - remaining)
    }
}

fn used_in(packed: u64, window: QuotaWindow) -> i64 {
    if (packed >> 32) as u32 == window.start.0 {
        i64::from(packed as u32 as i32)
    } else {
        0
    }
}

/// AWS GetUsage's `[used, remaining]` for each day from `from` to `to` inclusive, given the key's
/// per-day usage (`daily`, any order, days without an entry count zero) and the operator's quota
/// adjustments (`adjustments`, added to the count from their day on). `remaining` is what the quota
/// had left at the end of that day; without a quota it is 0, as AWS reports for plans without one.
pub fn usage_report(
    quota: Option<&QuotaSettings>,
    daily: &[(EpochDay, u64)],
    adjustments: &[(EpochDay, i64)],
    from: EpochDay,
    to: EpochDay,
) -> Vec<[u64; 2]> {
    let used_on = |day: EpochDay| {
        daily
            .iter()
            .filter(|(d, _)| *d == day)
            .map(|(_, n)| n)
            .sum::<u64>()
    };
    let mut out = Vec::new();
    let mut day = from;
    while day <= to {
        let used = used_on(day);
        let remaining = quota.map_or(0, |q| {
            let window = QuotaWindow::containing(q, day);
            let in_window = |d: &EpochDay| window.start <= *d && *d <= day;
            let counted: i64 = daily
                .iter()
                .filter(|(d, _)| in_window(d))
                .map(|(_, n)| i64::try_from(*n).unwrap_or(i64::MAX))
                .sum::<i64>()
                + adjustments
                    .iter()
                    .filter(|(d, _)| in_window(d))
                    .map(|(_, n)| n)
                    .sum::<i64>();
            u64::try_from(i64::from(q.limit) - counted).unwrap_or(0)
        });
        out.push([used, remaining]);
        if day.0 == u32::MAX {
            break;
        }
        day = day.next();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn day(y: i16, m: i8, d: i8) -> EpochDay {
        EpochDay::from_date(Date::constant(y, m, d)).unwrap()
    }

    fn q(period: Period, offset: u32) -> QuotaSettings {
        QuotaSettings {
            limit: 3,
            offset,
            period,
        }
    }

    #[test]
    fn epoch_day_roundtrip() {
        assert_eq!(day(1970, 1, 1), EpochDay(0));
        assert_eq!(day(2026, 11, 27).to_string(), "2026-11-27");
        assert_eq!(
            EpochDay::from_nanos(day(2024, 2, 29).start_nanos() + NANOS_PER_DAY - 1),
            day(2024, 2, 29)
        );
    }

    #[test]
    fn day_window() {
        let w = QuotaWindow::containing(&q(Period::Day, 0), day(2026, 11, 27));
        assert_eq!((w.start, w.end), (day(2026, 11, 27), day(2026, 11, 28)));
    }

    #[test]
    fn week_starts_on_sunday_plus_offset() {
        // 2026-11-27 is a Friday.
        let w = QuotaWindow::containing(&q(Period::Week, 0), day(2026, 11, 27));
        assert_eq!((w.start, w.end), (day(2026, 11, 22), day(2026, 11, 29)));
        let w = QuotaWindow::containing(&q(Period::Week, 1), day(2026, 11, 27));
        assert_eq!(w.start, day(2026, 11, 23)); // Monday
        let w = QuotaWindow::containing(&q(Period::Week, 6), day(2026, 11, 27));
        assert_eq!(w.start, day(2026, 11, 21)); // Saturday
        let w = QuotaWindow::containing(&q(Period::Week, 5), day(2026, 11, 27));
        assert_eq!(w.start, day(2026, 11, 27)); // Friday itself
    }

    #[test]
    fn month_with_offset_crosses_month_and_year_ends() {
        // offset 2: periods start on the 3rd, as in the seed article's plan.
        let w = QuotaWindow::containing(&q(Period::Month, 2), day(2026, 11, 27));
        assert_eq!((w.start, w.end), (day(2026, 11, 3), day(2026, 12, 3)));
        let w = QuotaWindow::containing(&q(Period::Month, 2), day(2026, 11, 2));
        assert_eq!((w.start, w.end), (day(2026, 10, 3), day(2026, 11, 3)));
        let w = QuotaWindow::containing(&q(Period::Month, 2), day(2027, 1, 1));
        assert_eq!((w.start, w.end), (day(2026, 12, 3), day(2027, 1, 3)));
        let w = QuotaWindow::containing(&q(Period::Month, 0), day(2024, 2, 29));
        assert_eq!((w.start, w.end), (day(2024, 2, 1), day(2024, 3, 1)));
        let w = QuotaWindow::containing(&q(Period::Month, 27), day(2023, 3, 1));
        assert_eq!((w.start, w.end), (day(2023, 2, 28), day(2023, 3, 28)));
    }

    #[test]
    fn quota_counts_and_rolls_over() {
        let settings = q(Period::Day, 0);
        let today = day(2026, 11, 27);
        let now = today.start_nanos() + 5;
        let quota = Quota::new(settings);
        let c = QuotaCount::default();
        quota.set_used(&c, now, 1);
        assert_eq!(
            quota.try_consume(&c, 1, now),
            QuotaDecision::Allowed {
                remaining: 1,
                resets_at: today.next()
            }
        );
        assert_eq!(
            quota.try_consume(&c, 1, now),
            QuotaDecision::Allowed {
                remaining: 0,
                resets_at: today.next()
            }
        );
        assert_eq!(
            quota.try_consume(&c, 1, now),
            QuotaDecision::Refused {
                resets_at: today.next()
            }
        );
        assert_eq!(quota.used(&c, now), 3);
        assert_eq!(quota.remaining(&c, now), 0);
        let tomorrow = today.next().start_nanos();
        assert_eq!(quota.used(&c, tomorrow), 0);
        assert!(matches!(
            quota.try_consume(&c, 1, tomorrow),
            QuotaDecision::Allowed { remaining: 2, .. }
        ));
    }

    #[test]
    fn a_request_spends_its_cost_whole_or_not_at_all() {
        let today = day(2026, 11, 27);
        let now = today.start_nanos() + 5;
        // A limit of 3 (see `q`), spent by costs.
        let quota = Quota::new(q(Period::Day, 0));
        let c = QuotaCount::default();
        let spend = |cost| match quota.try_consume(&c, cost, now) {
            QuotaDecision::Allowed { remaining, .. } => Some(remaining),
            QuotaDecision::Refused { .. } => None,
        };
        assert_eq!(spend(2), Some(1));
        assert_eq!(spend(2), None, "more than is left: nothing is spent");
        assert_eq!(quota.used(&c, now), 2);
        assert_eq!(spend(0), Some(1), "free");
        assert_eq!(spend(1), Some(0));
        assert_eq!(spend(1), None);
        assert_eq!(spend(0), Some(0), "free even when the quota is spent");
        assert_eq!(quota.used(&c, now), 3);
        assert_eq!(spend(4), None, "more than the whole limit");
    }

    #[test]
    fn remaining_can_be_set_above_and_below_the_limit() {
        let settings = q(Period::Day, 0);
        let today = day(2026, 11, 27);
        let now = today.start_nanos() + 5;
        let quota = Quota::new(settings);
        let c = QuotaCount::default();
        quota.set_used(&c, now, 2);
        assert_eq!(
            quota.set_remaining(&c, now, 5),
            -4,
            "3 - 5 = -2 used, from 2"
        );
        assert_eq!(quota.used(&c, now), -2);
        for left in (0..5).rev() {
            assert_eq!(
                quota.try_consume(&c, 1, now),
                QuotaDecision::Allowed {
                    remaining: left,
                    resets_at: today.next()
                }
            );
        }
        assert!(matches!(
            quota.try_consume(&c, 1, now),
            QuotaDecision::Refused { .. }
        ));
        assert_eq!(quota.set_remaining(&c, now, 0), 0);
        assert_eq!(quota.set_remaining(&c, now, 1), -1);
        assert!(matches!(
            quota.try_consume(&c, 1, now),
            QuotaDecision::Allowed { remaining: 0, .. }
        ));
    }

    #[test]
    fn report_remaining_resets_with_the_period() {
        let settings = QuotaSettings {
            limit: 10,
            offset: 0,
            period: Period::Week,
        };
        // Sat 2026-11-21, Sun 22, Mon 23: the week turns over on Sunday.
        let daily = [
            (day(2026, 11, 21), 4),
            (day(2026, 11, 22), 3),
            (day(2026, 11, 23), 2),
        ];
        let r = usage_report(
            Some(&settings),
            &daily,
            &[],
            day(2026, 11, 20),
            day(2026, 11, 23),
        );
        assert_eq!(r, vec![[0, 10], [4, 6], [3, 7], [2, 5]]);
        assert_eq!(
            usage_report(None, &daily, &[], day(2026, 11, 21), day(2026, 11, 21)),
            vec![[4, 0]]
        );
        // An operator set remaining to 20 on Monday the 23rd, when 3 + 2 had been used: 15 extra.
        let adjusted = usage_report(
            Some(&settings),
            &daily,
            &[(day(2026, 11, 23), -15)],
            day(2026, 11, 22),
            day(2026, 11, 23),
        );
        assert_eq!(adjusted, vec![[3, 7], [2, 20]]);
    }

    proptest! {
        /// Every day lies in exactly one period: its window contains it, starts on the right weekday or
        /// day of month, and the window of the day before the end is the same window. (From 1971 on:
        /// a window around 1970-01-01 would start before the first day an `EpochDay` can name.)
        #[test]
        fn windows_partition_time(d in 365u32..60_000, period in 0u8..3, offset in 0u32..28) {
            let period = [Period::Day, Period::Week, Period::Month][period as usize];
            let offset = offset.min(period.max_offset());
            let settings = q(period, offset);
            let w = QuotaWindow::containing(&settings, EpochDay(d));
            prop_assert!(w.start <= EpochDay(d) && EpochDay(d) < w.end);
            prop_assert_eq!(QuotaWindow::containing(&settings, EpochDay(w.end.0 - 1)), w);
            prop_assert_eq!(QuotaWindow::containing(&settings, w.start), w);
            let next = QuotaWindow::containing(&settings, w.end);
            prop_assert_eq!(next.start, w.end);
            match period {
                Period::Day => prop_assert_eq!(w.end.0 - w.start.0, 1),
                Period::Week => {
                    prop_assert_eq!(w.end.0 - w.start.0, 7);
                    prop_assert_eq!((w.start.0 + 4) % 7, offset);
                }
                Period::Month => {
                    prop_assert_eq!(w.start.date().day() as u32, offset + 1);
                    prop_assert!((28..=31).contains(&(w.end.0 - w.start.0)));
                }
            }
        }
    }
}
