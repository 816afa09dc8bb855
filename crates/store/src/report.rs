//! AWS GetUsage, computed from a store: one place for the CLI (offline) and the admin API.

use std::collections::{BTreeMap, HashMap};

use tollgate_core::UsagePlan;
use tollgate_core::quota::{EpochDay, QuotaWindow, usage_report};

use crate::{DayValue, Series, Store, StoreError};

/// The longest range one usage report covers: a year (reports are computed day by day).
pub const MAX_REPORT_DAYS: u32 = 366;

/// Checks a report's date range: not reversed, at most [`MAX_REPORT_DAYS`] days.
pub fn check_range(from: EpochDay, to: EpochDay) -> Result<(), String> {
    if to < from {
        return Err("The end date must not be before the start date".into());
    }
    if to.0 - from.0 >= MAX_REPORT_DAYS {
        return Err(format!(
            "A usage report covers at most {MAX_REPORT_DAYS} days"
        ));
    }
    Ok(())
}

/// A plan's usage records over a report's range, read once; reports are computed per key from them.
#[derive(Debug)]
pub struct PlanUsage<'p> {
    plan: &'p UsagePlan,
    from: EpochDay,
    to: EpochDay,
    /// Each ordered by key, then day (as the store returns them).
    used: Vec<DayValue>,
    adjustments: Vec<DayValue>,
    /// Read only for [`PlanUsage::detail`].
    throttled: Vec<DayValue>,
    quota_exceeded: Vec<DayValue>,
    ids: Vec<String>,
}

/// One day of one key in a detailed report: AWS's `[used, remaining]` and the requests refused.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct DayDetail {
    /// Requests admitted.
    pub used: u64,
    /// Quota left at the end of the day (AWS's second number).
    pub remaining: u64,
    /// Requests refused by a throttle.
    pub throttled: u64,
    /// Requests refused for the spent quota.
    pub quota_exceeded: u64,
}

/// Reads what AWS GetUsage reports for the plan's keys `members` (or the one key `key_id`) from `from`
/// to `to` inclusive. Keys that left the plan but have usage in the range are included, as their
/// requests were metered under it.
pub fn plan_usage<'p>(
    store: &dyn Store,
    members: &[&str],
    plan: &'p UsagePlan,
    key_id: Option<&str>,
    from: EpochDay,
    to: EpochDay,
) -> Result<PlanUsage<'p>, StoreError> {
    // Remaining on `from` depends on everything since its period began.
    let since = plan
        .quota
        .as_ref()
        .map_or(from, |q| QuotaWindow::containing(q, from).start.min(from));
    let used = store.series(Series::Used, &plan.id, key_id, since, to)?;
    let adjustments = store.series(Series::QuotaAdjustment, &plan.id, key_id, since, to)?;
    let mut ids: Vec<String> = match key_id {
        Some(k) => vec![k.to_owned()],
        None => members.iter().map(|&k| k.to_owned()).collect(),
    };
    ids.extend(used.iter().map(|r| r.key_id.clone()));
    ids.sort_unstable();
    ids.dedup();
    Ok(PlanUsage {
        plan,
        from,
        to,
        used,
        adjustments,
        throttled: Vec::new(),
        quota_exceeded: Vec::new(),
        ids,
    })
}

impl PlanUsage<'_> {
    /// The keys reported, in id order.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// `[used, remaining]` for each day of the range, for key `key_id`.
    pub fn report(&self, key_id: &str) -> Vec<[u64; 2]> {
        let daily: Vec<(EpochDay, u64)> = of_key(&self.used, key_id)
            .iter()
            .map(|r| (r.day, r.count()))
            .collect();
        let adjusted: Vec<(EpochDay, i64)> = of_key(&self.adjustments, key_id)
            .iter()
            .map(|a| (a.day, a.value))
            .collect();
        usage_report(
            self.plan.quota.as_ref(),
            &daily,
            &adjusted,
            self.from,
            self.to,
        )
    }

    /// Reads the refused requests too, for [`PlanUsage::detail`].
    pub fn with_refusals(
        mut self,
        store: &dyn Store,
        key_id: Option<&str>,
    ) -> Result<Self, StoreError> {
        let (plan, from, to) = (self.plan.id.as_str(), self.from, self.to);
        self.throttled = store.series(Series::Throttled, plan, key_id, from, to)?;
        self.quota_exceeded = store.series(Series::QuotaExceeded, plan, key_id, from, to)?;
        Ok(self)
    }

    /// Each day of the range for key `key_id`: its report, and its refusals (read by
    /// [`PlanUsage::with_refusals`]).
    pub fn detail(&self, key_id: &str) -> Vec<DayDetail> {
        let mut days: Vec<DayDetail> = self
            .report(key_id)
            .into_iter()
            .map(|[used, remaining]| DayDetail {
                used,
                remaining,
                ..DayDetail::default()
            })
            .collect();
        // Each refusal series into its field of the days it has.
        let mut fill = |series: &[DayValue], set: fn(&mut DayDetail, u64)| {
            for r in of_key(series, key_id) {
                if let Some(day) = days.get_mut(r.day.0.wrapping_sub(self.from.0) as usize) {
                    set(day, r.count());
                }
            }
        };
        fill(&self.throttled, |d, n| d.throttled = n);
        fill(&self.quota_exceeded, |d, n| d.quota_exceeded = n);
        days
    }

    /// Every key's report.
    pub fn all(&self) -> BTreeMap<String, Vec<[u64; 2]>> {
        self.ids
            .iter()
            .map(|k| (k.clone(), self.report(k)))
            .collect()
    }
}

/// The run of `items` (ordered by key) that belongs to `key_id`.
fn of_key<'a>(items: &'a [DayValue], key_id: &str) -> &'a [DayValue] {
    let start = items.partition_point(|x| x.key_id.as_str() < key_id);
    let end = start + items[start..].partition_point(|x| x.key_id == key_id);
    &items[start..end]
}

/// Requests already counted, per (plan id, key id), in each of `plans`' quota period containing
/// `today`, operator adjustments included: what a (re)built snapshot must start from so quotas survive
/// restarts and plan changes.
pub fn period_usage<'p>(
    store: &(impl Store + ?Sized),
    plans: impl IntoIterator<Item = &'p UsagePlan>,
    today: EpochDay,
) -> Result<HashMap<(String, String), i64>, StoreError> {
    let mut used = HashMap::new();
    for plan in plans {
        let Some(quota) = &plan.quota else { continue };
        let window = QuotaWindow::containing(quota, today);
        // Requests counted, then operators' adjustments.
        for series in [Series::Used, Series::QuotaAdjustment] {
            for row in store.series(series, &plan.id, None, window.start, today)? {
                let n = used.entry((plan.id.clone(), row.key_id)).or_insert(0i64);
                *n = n.saturating_add(row.value);
            }
        }
    }
    Ok(used)
}

#[cfg(test)]
mod tests {
    use tollgate_core::{Period, QuotaSettings};

    use super::*;
    use crate::{SqliteStore, UsageDelta};

    #[test]
    fn reports_are_per_key_and_include_keys_that_left() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let plan = UsagePlan {
            id: "p".into(),
            name: "p".into(),
            description: None,
            api_stages: Vec::new(),
            throttle: None,
            quota: Some(QuotaSettings {
                limit: 10,
                offset: 0,
                period: Period::Month,
            }),
            ..UsagePlan::default()
        };
        let day = EpochDay::from_date("2026-11-10".parse().unwrap()).unwrap();
        let delta = |key: &str, day: EpochDay, count| UsageDelta {
            plan_id: "p".into(),
            key_id: key.into(),
            day,
            count,
            ..UsageDelta::default()
        };
        store
            .add_usage(&[
                delta("b", day, 2),
                delta("b", day.next(), 3),
                delta("gone", day, 1),
                delta("a", EpochDay(day.0 - 1), 4),
            ])
            .unwrap();
        let usage = plan_usage(&store, &["c", "a", "b"], &plan, None, day, day.next()).unwrap();
        assert_eq!(usage.ids(), ["a", "b", "c", "gone"]);
        assert_eq!(
            usage.report("a"),
            vec![[0, 6], [0, 6]],
            "earlier days of the period count"
        );
        assert_eq!(usage.report("b"), vec![[2, 8], [3, 5]]);
        assert_eq!(usage.report("c"), vec![[0, 10], [0, 10]]);
        assert_eq!(usage.report("gone"), vec![[1, 9], [0, 9]]);
        assert_eq!(usage.all().len(), 4);
    }
}
