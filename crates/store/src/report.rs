//! AWS GetUsage, computed from a store: one place for the CLI (offline) and the admin API.

use std::collections::{BTreeMap, HashMap};

use tollgate_core::UsagePlan;
use tollgate_core::quota::{EpochDay, QuotaWindow, usage_report};
use tollgate_core::sharing::customer_of;

use crate::{CreditBalance, DayValue, Holder, KeyIndex, Series, Store, StoreError};

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
    /// Read only for [`PlanUsage::with_customers`]: key id → the customer whose limits it shares,
    /// and the customers' counts from the period's start.
    customer_of: HashMap<String, String>,
    customer_used: Vec<DayValue>,
    customer_adjustments: Vec<DayValue>,
    since: EpochDay,
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
    let since = report_start(plan, from);
    let counts_as = plan.counts_as();
    let used = store.series(Series::Used, &counts_as, key_id, since, to)?;
    let adjustments = store.series(Series::QuotaAdjustment, &counts_as, key_id, since, to)?;
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
        customer_of: HashMap::new(),
        customer_used: Vec::new(),
        customer_adjustments: Vec::new(),
        since,
    })
}

/// The first day a report from `from` reads: remaining on `from` depends on everything since its
/// quota period began.
fn report_start(plan: &UsagePlan, from: EpochDay) -> EpochDay {
    plan.quota
        .as_ref()
        .map_or(from, |q| QuotaWindow::containing(q, from).start.min(from))
}

impl PlanUsage<'_> {
    /// The keys reported, in id order.
    pub fn ids(&self) -> &[String] {
        &self.ids
    }

    /// Reads the counts of the customers whose limits keys share, for the keys of `customer_of`
    /// (key id → customer id): their reports then show what the customer has left.
    pub fn with_customers(
        mut self,
        store: &dyn Store,
        customer_of: HashMap<String, String>,
    ) -> Result<Self, StoreError> {
        let customers: Vec<&str> = customer_of.values().map(String::as_str).collect();
        let (plan, since, to) = (self.plan.counts_as(), self.since, self.to);
        let plan = &*plan;
        self.customer_used = store.customer_series(Series::Used, plan, &customers, since, to)?;
        self.customer_adjustments =
            store.customer_series(Series::QuotaAdjustment, plan, &customers, since, to)?;
        self.customer_of = customer_of;
        Ok(self)
    }

    /// `[used, remaining]` for each day of the range, for key `key_id`: what it used, and what its
    /// quota (its customer's, when it shares its customer's limits) had left.
    pub fn report(&self, key_id: &str) -> Vec<[u64; 2]> {
        let own = report_of(self, &self.used, &self.adjustments, key_id);
        match self.customer_of.get(key_id) {
            None => own,
            Some(customer) => {
                let shared = report_of(
                    self,
                    &self.customer_used,
                    &self.customer_adjustments,
                    customer,
                );
                own.iter()
                    .zip(shared)
                    .map(|([used, _], [_, remaining])| [*used, remaining])
                    .collect()
            }
        }
    }

    /// `[used, remaining]` for each day of the range, for customer `customer_id` (read by
    /// [`PlanUsage::with_customers`]): what its keys used together, and what it has left.
    pub fn customer_report(&self, customer_id: &str) -> Vec<[u64; 2]> {
        report_of(
            self,
            &self.customer_used,
            &self.customer_adjustments,
            customer_id,
        )
    }

    /// Reads the refused requests too, for [`PlanUsage::detail`].
    pub fn with_refusals(
        mut self,
        store: &dyn Store,
        key_id: Option<&str>,
    ) -> Result<Self, StoreError> {
        let (plan, from, to) = (self.plan.counts_as(), self.from, self.to);
        let plan = &*plan;
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

/// A customer's usage in a plan that shares limits by customer, over a report's range.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomerUsage {
    /// `[used, remaining]` per day: what its keys used together, what the customer had left.
    pub items: Vec<[u64; 2]>,
    /// Per key of the customer: `[used, remaining]` per day, its own use and the customer's left.
    pub values: BTreeMap<String, Vec<[u64; 2]>>,
}

/// What customer `customer_id` used of `plan` from `from` to `to` inclusive, in total and through
/// each of `keys` (its keys in the plan).
pub fn customer_usage(
    store: &dyn Store,
    plan: &UsagePlan,
    customer_id: &str,
    keys: &[&str],
    from: EpochDay,
    to: EpochDay,
) -> Result<CustomerUsage, StoreError> {
    let (since, counts_as) = (report_start(plan, from), plan.counts_as());
    let plan_id = &*counts_as;
    let mut ids: Vec<String> = keys.iter().map(|&k| k.to_owned()).collect();
    ids.sort_unstable();
    ids.dedup();
    let (mut used, mut adjustments) = (Vec::new(), Vec::new());
    for key in &ids {
        let key = Some(key.as_str());
        used.extend(store.series(Series::Used, plan_id, key, since, to)?);
        adjustments.extend(store.series(Series::QuotaAdjustment, plan_id, key, since, to)?);
    }
    let customer = [customer_id];
    let usage = PlanUsage {
        plan,
        from,
        to,
        used,
        adjustments,
        throttled: Vec::new(),
        quota_exceeded: Vec::new(),
        customer_of: ids
            .iter()
            .map(|k| (k.clone(), customer_id.to_owned()))
            .collect(),
        ids,
        customer_used: store.customer_series(Series::Used, plan_id, &customer, since, to)?,
        customer_adjustments: store.customer_series(
            Series::QuotaAdjustment,
            plan_id,
            &customer,
            since,
            to,
        )?,
        since,
    };
    Ok(CustomerUsage {
        items: usage.customer_report(customer_id),
        values: usage.all(),
    })
}

/// The report of `holder` from its `used` and `adjustments` rows.
fn report_of(
    usage: &PlanUsage<'_>,
    used: &[DayValue],
    adjustments: &[DayValue],
    holder: &str,
) -> Vec<[u64; 2]> {
    let daily: Vec<(EpochDay, u64)> = of_key(used, holder)
        .iter()
        .map(|r| (r.day, r.count()))
        .collect();
    let adjusted: Vec<(EpochDay, i64)> = of_key(adjustments, holder)
        .iter()
        .map(|a| (a.day, a.value))
        .collect();
    usage_report(
        usage.plan.quota.as_ref(),
        &daily,
        &adjusted,
        usage.from,
        usage.to,
    )
}

/// The run of `items` (ordered by key) that belongs to `key_id`.
fn of_key<'a>(items: &'a [DayValue], key_id: &str) -> &'a [DayValue] {
    let start = items.partition_point(|x| x.key_id.as_str() < key_id);
    let end = start + items[start..].partition_point(|x| x.key_id == key_id);
    &items[start..end]
}

/// What was already counted in the quota periods containing a day: where a (re)built snapshot's
/// quota counts start from.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PeriodUsed {
    /// Per (the name the plan counts as, key id): its id, or in shadow its shadow name.
    pub keys: HashMap<(String, String), i64>,
    /// Per (the name the plan counts as, customer id), in plans that share limits by customer.
    pub customers: HashMap<(String, String), i64>,
    /// Keys' credits, by key id, for keys whose credits the data plane does not hold yet (all of
    /// them at a start).
    pub credits: HashMap<String, CreditBalance>,
}

impl PeriodUsed {
    /// What key `key_id` counted under plan `plan_id` (0 when nothing).
    pub fn key(&self, plan_id: &str, key_id: &str) -> i64 {
        lookup(&self.keys, plan_id, key_id)
    }

    /// What customer `customer_id`'s keys counted together under plan `plan_id` (0 when nothing).
    pub fn customer(&self, plan_id: &str, customer_id: &str) -> i64 {
        lookup(&self.customers, plan_id, customer_id)
    }
}

fn lookup(used: &HashMap<(String, String), i64>, plan_id: &str, id: &str) -> i64 {
    // Only rebuilds look up, once per new membership: the owned pair is not on the request path.
    used.get(&(plan_id.to_owned(), id.to_owned()))
        .copied()
        .unwrap_or(0)
}

/// What `holder` (a key, or a customer whose keys share the plan's limits) counted in `plan`'s
/// quota period containing `today`, operator adjustments included (0 without a quota).
pub fn used_in_period(
    store: &(impl Store + ?Sized),
    plan: &UsagePlan,
    holder: Holder<'_>,
    today: EpochDay,
) -> Result<i64, StoreError> {
    let Some(quota) = &plan.quota else {
        return Ok(0);
    };
    let window = QuotaWindow::containing(quota, today);
    let mut used = 0i64;
    let plan_id = &*plan.counts_as();
    for series in [Series::Used, Series::QuotaAdjustment] {
        let rows = match holder {
            Holder::Key(key_id) => {
                store.series(series, plan_id, Some(key_id), window.start, today)?
            }
            Holder::Customer(customer_id) => {
                store.customer_series(series, plan_id, &[customer_id], window.start, today)?
            }
        };
        used = rows.iter().fold(used, |n, r| n.saturating_add(r.value));
    }
    Ok(used)
}

/// What the keys `index` holds (the few a write changed) counted in their plans' quota periods
/// containing `today`, and their customers in plans that share limits by customer: what their new
/// memberships start from. Reads each binding's own counts, not its plan's.
pub fn keys_period_used(
    store: &(impl Store + ?Sized),
    index: &KeyIndex,
    today: EpochDay,
) -> Result<PeriodUsed, StoreError> {
    let mut used = PeriodUsed::default();
    for &(p, k) in index.bindings() {
        let plan = &index.plans[p as usize];
        if plan.quota.is_none() {
            continue;
        }
        let key_id = index.id(k as usize);
        let counts_as = plan.counts_as().to_string();
        let n = used_in_period(store, plan, Holder::Key(key_id), today)?;
        used.keys.insert((counts_as.clone(), key_id.to_owned()), n);
        let customer = customer_of(plan.limits_share_by(), index.customer(k as usize));
        if let Some(customer) = customer {
            let n = used_in_period(store, plan, Holder::Customer(customer), today)?;
            used.customers.insert((counts_as, customer.to_owned()), n);
        }
    }
    Ok(used)
}

/// [`period_usage`] of the plans `index` holds that `recount` picks, and of the customers whose
/// keys share a plan's limits. Customers are read for every sharing plan: a rebuild starts a
/// customer's count from it whenever the customer is new to the snapshot (its first key bound, or
/// its keys rebound), which `recount` cannot tell; one read per customer of such plans.
pub fn period_used(
    store: &(impl Store + ?Sized),
    index: &KeyIndex,
    recount: impl Fn(&UsagePlan) -> bool,
    today: EpochDay,
) -> Result<PeriodUsed, StoreError> {
    let keys = period_usage(store, index.plans.iter().filter(|p| recount(p)), today)?;
    let mut customers = HashMap::new();
    for (p, plan) in index.plans.iter().enumerate() {
        let Some(quota) = &plan.quota else {
            continue;
        };
        let Some(share_by) = plan.limits_share_by() else {
            continue;
        };
        let of_plan: Vec<&str> = index
            .bindings()
            .iter()
            .filter(|&&(bp, _)| bp as usize == p)
            .filter_map(|&(_, k)| customer_of(Some(share_by), index.customer(k as usize)))
            .collect();
        let (window, counts_as) = (QuotaWindow::containing(quota, today), plan.counts_as());
        for series in [Series::Used, Series::QuotaAdjustment] {
            let rows = store.customer_series(series, &counts_as, &of_plan, window.start, today)?;
            tally(&mut customers, &counts_as, rows);
        }
    }
    Ok(PeriodUsed {
        keys,
        customers,
        credits: HashMap::new(),
    })
}

/// Requests already counted, per (the name a plan counts as, key id), in each of `plans`' quota period containing
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
        let (window, counts_as) = (QuotaWindow::containing(quota, today), plan.counts_as());
        // Requests counted, then operators' adjustments.
        for series in [Series::Used, Series::QuotaAdjustment] {
            let rows = store.series(series, &counts_as, None, window.start, today)?;
            tally(&mut used, &counts_as, rows);
        }
    }
    Ok(used)
}

/// Adds each of `rows` to its holder's total under the name a plan counts as.
fn tally(totals: &mut HashMap<(String, String), i64>, counts_as: &str, rows: Vec<DayValue>) {
    for row in rows {
        let n = totals
            .entry((counts_as.to_owned(), row.key_id))
            .or_insert(0);
        *n = n.saturating_add(row.value);
    }
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

    #[test]
    fn keys_that_share_their_customers_limits_report_its_remaining() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let plan = UsagePlan {
            id: "p".into(),
            name: "p".into(),
            quota: Some(QuotaSettings {
                limit: 10,
                offset: 0,
                period: Period::Month,
            }),
            ..UsagePlan::default()
        };
        let day = EpochDay::from_date("2026-11-10".parse().unwrap()).unwrap();
        let delta = |key: &str, count| UsageDelta {
            plan_id: "p".into(),
            key_id: key.into(),
            day,
            count,
            ..UsageDelta::default()
        };
        store
            .add_usage(&[delta("a", 2), delta("b", 3), delta("c", 1)])
            .unwrap();
        let shared = |count| crate::CustomerDelta {
            plan_id: "p".into(),
            customer_id: "acme".into(),
            day,
            count,
        };
        // The day before the range is in the period: it counts for what is left.
        store
            .add_customer_usage(&[
                shared(5),
                crate::CustomerDelta {
                    day: EpochDay(day.0 - 1),
                    ..shared(1)
                },
            ])
            .unwrap();
        store.adjust_customer_quota("p", "acme", day, 1).unwrap();

        let usage = customer_usage(&store, &plan, "acme", &["b", "a"], day, day).unwrap();
        assert_eq!(usage.items, vec![[5, 3]], "10 - 1 - 5 - 1 adjusted");
        assert_eq!(
            usage.values,
            BTreeMap::from([("a".into(), vec![[2, 3]]), ("b".into(), vec![[3, 3]])])
        );
        let none = customer_usage(&store, &plan, "nobody", &[], day, day).unwrap();
        assert_eq!(none.items, vec![[0, 10]]);
        assert!(none.values.is_empty());

        // GetUsage: keys that share report the customer's remaining; the others their own.
        let usage = plan_usage(&store, &["a", "b", "c"], &plan, None, day, day)
            .unwrap()
            .with_customers(
                &store,
                HashMap::from([("a".into(), "acme".into()), ("b".into(), "acme".into())]),
            )
            .unwrap();
        assert_eq!(usage.report("a"), vec![[2, 3]]);
        assert_eq!(usage.report("b"), vec![[3, 3]]);
        assert_eq!(usage.report("c"), vec![[1, 9]]);
    }
}
