//! Prepaid credits: a key's balance, spent by admitted requests' cost after the quota check, topped
//! up by operators (idempotently) and, with a refill, back up to the refill's amount at the key's
//! first use in each calendar period (as a quota comes back). Whole or nothing: a request whose cost
//! is more than the balance spends none of it, so a balance reaches exactly zero, never below.
//!
//! The Redis twin of these rules is in the store's `lua/limit.lua`.

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};

use crate::model::{Period, QuotaSettings};
use crate::quota::{EpochDay, QuotaWindow};

/// The reserved key tag carrying a key's refill (`<amount>/<PERIOD>`, e.g. `1000/MONTH`), so that
/// AWS's own tools can set it.
pub const CREDIT_REFILL_TAG: &str = "tollgate:creditRefill";

/// The idempotency key of a refill's entry in a key's credit ledger starts with this, then the
/// refill period's first day (`YYYY-MM-DD`).
const REFILL_ENTRY: &str = "refill:";

/// The ledger's idempotency key for the refill of the period starting on `day`.
pub fn refill_entry(day: EpochDay) -> String {
    format!("{REFILL_ENTRY}{day}")
}

/// The refill period's first day a ledger entry's idempotency key marks, when it is a refill's.
pub fn refilled_by(entry: &str) -> Option<EpochDay> {
    entry
        .strip_prefix(REFILL_ENTRY)
        .and_then(|d| d.parse::<jiff::civil::Date>().ok())
        .and_then(EpochDay::from_date)
}

/// The most credits a key may hold: what a count keeps exactly everywhere (Lua's doubles hold whole
/// numbers exactly up to 2^53).
pub const MAX_CREDITS: u64 = 1 << 50;

/// A key's refill: at its first use in each calendar `period` (UTC), its balance comes back up to
/// `amount` if it is lower.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refill {
    /// What the balance comes back up to.
    pub amount: u64,
    /// How often.
    pub period: Period,
}

impl Refill {
    /// A refill as written in [`CREDIT_REFILL_TAG`]: `<amount>/<PERIOD>`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let bad = || {
            format!(
                "{text:?} is not a refill: write the amount and the period, as 1000/MONTH (DAY, WEEK or MONTH)"
            )
        };
        let (amount, period) = text.split_once('/').ok_or_else(bad)?;
        let amount: u64 = amount.trim().parse().map_err(|_| bad())?;
        let period = Period::named(&period.trim().to_ascii_uppercase()).ok_or_else(bad)?;
        Self::new(amount, period)
    }

    /// A refill of `amount` each `period`, checked.
    pub fn new(amount: u64, period: Period) -> Result<Self, String> {
        if amount == 0 || amount > MAX_CREDITS {
            return Err(format!(
                "a refill's amount must be between 1 and {MAX_CREDITS}, not {amount}"
            ));
        }
        Ok(Self { amount, period })
    }

    /// The refill as [`CREDIT_REFILL_TAG`] holds it.
    pub fn to_tag(&self) -> String {
        format!("{}/{}", self.amount, self.period)
    }

    /// The refill period containing `day` (calendar periods, as a quota's without an offset).
    pub fn window(&self, day: EpochDay) -> QuotaWindow {
        let calendar = QuotaSettings {
            limit: 0,
            offset: 0,
            period: self.period,
        };
        QuotaWindow::containing(&calendar, day)
    }
}

/// What the credits said about one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CreditDecision {
    /// Spent; `left` credits remain.
    Spent {
        /// The balance after this request.
        left: u64,
    },
    /// The balance is lower than the cost: nothing spent.
    Exhausted {
        /// The balance.
        left: u64,
    },
}

/// A key's credits on this instance: its balance, and the first day of the refill period it was
/// last refilled in (0: never).
#[derive(Debug, Default)]
pub struct Credits {
    balance: AtomicU64,
    refilled: AtomicU32,
}

impl Credits {
    /// Credits holding `balance`, last refilled in the period starting on `refilled`.
    pub fn new(balance: u64, refilled: Option<EpochDay>) -> Self {
        Self {
            balance: AtomicU64::new(balance.min(MAX_CREDITS)),
            refilled: AtomicU32::new(refilled.map_or(0, |d| d.0)),
        }
    }

    /// The balance.
    pub fn balance(&self) -> u64 {
        self.balance.load(Ordering::Acquire)
    }

    /// Brings the balance up to `refill`'s amount at `now` if this period's refill has not happened
    /// yet; returns the period's first day and what was added (0 when the balance was already at
    /// least the amount), for the ledger.
    pub fn refill(&self, refill: &Refill, now: u64) -> Option<(EpochDay, u64)> {
        let start = refill.window(EpochDay::from_nanos(now)).start;
        let last = self.refilled.load(Ordering::Acquire);
        if last == start.0 {
            return None;
        }
        // One request per period wins the refill; the others spend what it brings.
        self.refilled
            .compare_exchange(last, start.0, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        let before = self
            .balance
            .fetch_max(refill.amount, Ordering::AcqRel)
            .min(refill.amount);
        Some((start, refill.amount - before))
    }

    /// Spends `cost` if the balance holds it; never part of it. A cost of 0 spends nothing and is
    /// never refused.
    pub fn try_spend(&self, cost: u32) -> CreditDecision {
        let cost = u64::from(cost);
        let mut current = self.balance.load(Ordering::Acquire);
        loop {
            if current < cost {
                return CreditDecision::Exhausted { left: current };
            }
            match self.balance.compare_exchange_weak(
                current,
                current - cost,
                Ordering::AcqRel,
                Ordering::Acquire,
            ) {
                Ok(_) => {
                    return CreditDecision::Spent {
                        left: current - cost,
                    };
                }
                Err(seen) => current = seen,
            }
        }
    }

    /// Sets the balance (to what the shared store answered, so this instance can carry on from it
    /// when it must decide alone).
    pub fn set(&self, balance: u64) {
        self.balance
            .store(balance.min(MAX_CREDITS), Ordering::Release);
    }

    /// Adds `n` credits (a top-up), up to [`MAX_CREDITS`].
    pub fn add(&self, n: u64) {
        let _ = self
            .balance
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |b| {
                Some(b.saturating_add(n).min(MAX_CREDITS))
            });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::NANOS_PER_SEC;

    const DAY: u64 = 86_400 * NANOS_PER_SEC;

    #[test]
    fn refills_parse_from_their_tag() {
        let r = Refill::parse("1000/month").unwrap();
        assert_eq!((r.amount, r.period), (1000, Period::Month));
        assert_eq!(r.to_tag(), "1000/MONTH");
        for bad in ["1000", "0/DAY", "-5/DAY", "10/YEAR", "x/DAY"] {
            let err = Refill::parse(bad).unwrap_err();
            assert!(
                err.contains("refill") || err.contains("amount"),
                "{bad}: {err}"
            );
        }
    }

    #[test]
    fn spending_is_whole_or_nothing_and_stops_at_zero() {
        let c = Credits::new(5, None);
        assert_eq!(c.try_spend(3), CreditDecision::Spent { left: 2 });
        assert_eq!(c.try_spend(3), CreditDecision::Exhausted { left: 2 });
        assert_eq!(c.try_spend(0), CreditDecision::Spent { left: 2 }, "free");
        assert_eq!(c.try_spend(2), CreditDecision::Spent { left: 0 });
        assert_eq!(c.try_spend(1), CreditDecision::Exhausted { left: 0 });
        c.add(4);
        assert_eq!(c.try_spend(1), CreditDecision::Spent { left: 3 });
        c.add(u64::MAX);
        assert_eq!(c.balance(), MAX_CREDITS);
    }

    #[test]
    fn a_refill_tops_the_balance_up_once_per_period() {
        let day = EpochDay::from_date("2026-12-04".parse().unwrap()).unwrap();
        let now = day.start_nanos();
        let weekly = Refill::new(10, Period::Week).unwrap();
        let c = Credits::new(3, None);
        let sunday = EpochDay::from_date("2026-11-29".parse().unwrap()).unwrap();
        assert_eq!(
            c.refill(&weekly, now),
            Some((sunday, 7)),
            "the first at once"
        );
        assert_eq!(c.balance(), 10);
        assert_eq!(c.refill(&weekly, now + DAY), None, "once a period");
        assert_eq!(c.try_spend(4), CreditDecision::Spent { left: 6 });
        // The next week: back up to 10; credits above the amount are kept.
        let next = now + 3 * DAY;
        assert_eq!(c.refill(&weekly, next).map(|(_, n)| n), Some(4));
        c.add(20);
        assert_eq!(c.refill(&weekly, next + 7 * DAY).map(|(_, n)| n), Some(0));
        assert_eq!(c.balance(), 30);
        assert_eq!(refilled_by(&refill_entry(sunday)), Some(sunday));
        assert_eq!(refilled_by("order-42"), None);
        // Restored as last refilled this week: not again.
        let restored = Credits::new(1, Some(sunday));
        assert_eq!(restored.refill(&weekly, now), None);
    }

    #[test]
    fn concurrent_spending_reaches_exactly_zero() {
        let c = std::sync::Arc::new(Credits::new(10_000, None));
        let spent: u64 = std::thread::scope(|s| {
            let handles: Vec<_> = (0..4)
                .map(|_| {
                    let c = &c;
                    s.spawn(move || {
                        let mut n = 0;
                        while let CreditDecision::Spent { .. } = c.try_spend(3) {
                            n += 3;
                        }
                        n
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().unwrap()).sum()
        });
        assert_eq!(spent, 9_999);
        assert_eq!(c.balance(), 1);
    }
}
