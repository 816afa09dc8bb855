//! GetUsage, the detailed usage, and UpdateUsage.

use std::collections::HashMap;
use std::sync::Arc;

use tollgate_core::quota::{EpochDay, QuotaWindow};
use tollgate_core::sharing::LIMITS_SHARE_BY_TAG;
use tollgate_core::sharing::customer_of;
use tollgate_store::Holder;
use tollgate_store::report::{
    DayDetail, PlanUsage, check_range, customer_usage, plan_usage, used_in_period,
};

use super::paging::{Paging, first_page_of, start_at};
use super::patch::parse_number;
use super::{Admin, to_the_end};
use crate::error::{AdminError, bad, unknown_key, unknown_plan};
use crate::wire::{CustomerUsageOut, Page, PatchOp, UsageOut};

/// A report's range from its `YYYY-MM-DD` dates, checked.
fn report_range(
    start: Option<&str>,
    end: Option<&str>,
) -> Result<(EpochDay, EpochDay), AdminError> {
    let parse = |v: Option<&str>, which: &str| {
        v.and_then(|t| t.parse::<jiff::civil::Date>().ok())
            .and_then(EpochDay::from_date)
            .ok_or_else(|| {
                bad(format!(
                    "Invalid {which} date specified: expected YYYY-MM-DD"
                ))
            })
    };
    let (from, to) = (parse(start, "start")?, parse(end, "end")?);
    check_range(from, to).map_err(bad)?;
    Ok((from, to))
}

impl Admin {
    // ---- usage ----

    /// The plan `plan_id`, as last written.
    async fn plan(&self, plan_id: &str) -> Result<tollgate_core::UsagePlan, AdminError> {
        self.plans
            .lock()
            .await
            .iter()
            .find(|p| p.id == plan_id)
            .cloned()
            .ok_or_else(unknown_plan)
    }

    /// GetUsage, in real time: metering is flushed first.
    pub async fn usage(
        self: &Arc<Self>,
        plan_id: &str,
        key_id: Option<&str>,
        start: Option<&str>,
        end: Option<&str>,
        paging: &Paging,
    ) -> Result<UsageOut, AdminError> {
        self.usage_of(plan_id, key_id, (start, end), paging, false, |u, k| {
            u.report(k)
        })
        .await
    }

    /// tollgate's detailed usage: GetUsage's numbers per day, and the requests refused by a
    /// throttle and for the spent quota.
    pub async fn usage_detail(
        self: &Arc<Self>,
        plan_id: &str,
        key_id: Option<&str>,
        start: Option<&str>,
        end: Option<&str>,
        paging: &Paging,
    ) -> Result<UsageOut<DayDetail>, AdminError> {
        self.usage_of(plan_id, key_id, (start, end), paging, true, |u, k| {
            u.detail(k)
        })
        .await
    }

    /// What customer `customer_id`'s keys used together of a plan that shares limits by customer,
    /// and each of them, per day from `start` to `end` (`YYYY-MM-DD`); metering is flushed first.
    pub async fn customer_usage(
        self: &Arc<Self>,
        plan_id: &str,
        customer_id: &str,
        start: Option<&str>,
        end: Option<&str>,
    ) -> Result<CustomerUsageOut, AdminError> {
        let (from, to) = report_range(start, end)?;
        self.gateway.flush().await.map_err(AdminError::Internal)?;
        let plan = self.plan(plan_id).await?;
        if plan.limits_share_by().is_none() {
            return Err(bad(format!(
                "Usage plan {plan_id} does not share limits by customer: set limitsShareBy (the tag {LIMITS_SHARE_BY_TAG}=customerId)"
            )));
        }
        let served = self.gateway.served();
        let customer = customer_id.to_owned();
        self.blocking(move |admin| {
            let customers = served.customers_of(&plan.id);
            let keys = customers
                .iter()
                .find(|(c, _)| *c == customer)
                .map(|(_, keys)| keys.as_slice())
                .unwrap_or_default();
            let usage = customer_usage(&*admin.store, &plan, &customer, keys, from, to)?;
            if keys.is_empty() && usage.items.iter().all(|[used, _]| *used == 0) {
                return Err(AdminError::NotFound(
                    "Invalid customer identifier specified: no key of the plan has it".into(),
                ));
            }
            Ok(CustomerUsageOut {
                usage_plan_id: plan.id.clone(),
                customer_id: customer,
                start_date: from.to_string(),
                end_date: to.to_string(),
                usage,
            })
        })
        .await
    }

    /// A usage report over the range `dates` (`YYYY-MM-DD`), a page of keys at a time, each key's
    /// days made by `per_key`; `refusals`: it reads them.
    async fn usage_of<V: Send + 'static>(
        self: &Arc<Self>,
        plan_id: &str,
        key_id: Option<&str>,
        dates: (Option<&str>, Option<&str>),
        paging: &Paging,
        refusals: bool,
        per_key: fn(&PlanUsage<'_>, &str) -> Vec<V>,
    ) -> Result<UsageOut<V>, AdminError> {
        let (from, to) = report_range(dates.0, dates.1)?;
        self.gateway.flush().await.map_err(AdminError::Internal)?;
        let plan = self.plan(plan_id).await?;
        let served = self.gateway.served();
        let (plan_id, key_id) = (plan_id.to_owned(), key_id.map(str::to_owned));
        let paging = paging.clone();
        self.blocking(move |admin| {
            let members = served.keys_of(&plan_id);
            let store = &*admin.store;
            let mut usage = plan_usage(store, &members, &plan, key_id.as_deref(), from, to)?;
            if refusals {
                usage = usage.with_refusals(store, key_id.as_deref())?;
            }
            // Reports are computed for the page's keys only: a plan may have a million.
            let ids = usage.ids();
            let start = start_at(ids, String::as_str, &paging);
            let Page { position, item } =
                first_page_of(ids[start..].iter().cloned(), |k| k.clone(), &paging);
            if let Some(share_by) = plan.limits_share_by() {
                let mut customers = HashMap::new();
                for key in &item {
                    let record = store.key(key)?;
                    let customer_id = record.as_ref().and_then(|k| k.customer_id.as_deref());
                    if let Some(c) = customer_of(Some(share_by), customer_id) {
                        customers.insert(key.clone(), c.to_owned());
                    }
                }
                usage = usage.with_customers(store, customers)?;
            }
            Ok(UsageOut {
                usage_plan_id: plan.id.clone(),
                start_date: from.to_string(),
                end_date: to.to_string(),
                position,
                values: item
                    .into_iter()
                    .map(|k| {
                        let days = per_key(&usage, &k);
                        (k, days)
                    })
                    .collect(),
            })
        })
        .await
    }

    /// UpdateUsage: `replace /remaining` sets what the key has left in the current period.
    pub async fn update_usage(
        self: &Arc<Self>,
        plan_id: &str,
        key_id: &str,
        ops: Vec<PatchOp>,
    ) -> Result<UsageOut, AdminError> {
        let mut remaining = None;
        for op in &ops {
            match (op.op.as_deref(), op.path.as_deref()) {
                (Some("replace"), Some("/remaining")) => {
                    remaining = Some(parse_number::<i64>(op.value.as_deref(), "/remaining")?);
                }
                (verb, path) => {
                    return Err(bad(format!(
                        "Invalid patch path  '{}' specified for op '{}'. Must be one of: [/remaining]",
                        path.unwrap_or(""),
                        verb.unwrap_or("")
                    )));
                }
            }
        }
        let remaining =
            remaining.ok_or_else(|| bad("Invalid patch: replace /remaining is required"))?;
        self.set_remaining(plan_id, key_id, remaining).await
    }

    /// Sets what `key_id` has left of `plan_id`'s quota this period (0 to
    /// [`tollgate_core::MAX_REMAINING`]); answers the period's usage so far.
    pub async fn set_remaining(
        self: &Arc<Self>,
        plan_id: &str,
        key_id: &str,
        remaining: i64,
    ) -> Result<UsageOut, AdminError> {
        if !(0..=tollgate_core::MAX_REMAINING).contains(&remaining) {
            return Err(bad(format!(
                "Invalid value {remaining} for /remaining: it must be between 0 and {}",
                tollgate_core::MAX_REMAINING
            )));
        }
        self.gateway.flush().await.map_err(AdminError::Internal)?;
        let admin = Arc::clone(self);
        let (plan, key) = (plan_id.to_owned(), key_id.to_owned());
        // The live count and the stored adjustment change together, even if the caller goes away.
        let window_start = to_the_end(async move {
            let plans = admin.lock_plans().await;
            let plan = plans
                .iter()
                .find(|p| p.id == plan)
                .cloned()
                .ok_or_else(unknown_plan)?;
            if !admin.gateway.served().plans_of(&key).contains(&&*plan.id) {
                return Err(unknown_key());
            }
            let quota = plan
                .quota
                .ok_or_else(|| bad(format!("Usage plan {} has no quota", plan.id)))?;
            let today = admin.today();
            let live = admin
                .gateway
                .set_remaining(&plan.id, &key, remaining)
                .await
                .map_err(AdminError::Internal)?;
            admin
                .blocking(move |admin| {
                    let record = admin.store.key(&key)?.ok_or_else(unknown_key)?;
                    // A key that shares its customer's limits changes what the customer has left.
                    let customer =
                        customer_of(plan.limits_share_by(), record.customer_id.as_deref());
                    let holder = customer.map_or(Holder::Key(&key), Holder::Customer);
                    let delta = match live {
                        Some(delta) => delta,
                        // The key is in the plan but not served (e.g. the plan covers no configured
                        // stage): the change is computed from the stored count instead.
                        None => {
                            let now_used = used_in_period(&*admin.store, &plan, holder, today)?;
                            i64::from(quota.limit)
                                .checked_sub(remaining)
                                .and_then(|d| d.checked_sub(now_used))
                                .ok_or_else(|| bad("The stored usage is out of range"))?
                        }
                    };
                    // A plan in shadow keeps its counts under its shadow name.
                    let counts_as = &*plan.counts_as();
                    match holder {
                        Holder::Key(key) => admin.store.adjust_quota(counts_as, key, today, delta),
                        Holder::Customer(c) => admin
                            .store
                            .adjust_customer_quota(counts_as, c, today, delta),
                    }
                    .map_err(AdminError::from)
                })
                .await?;
            drop(plans);
            Ok(QuotaWindow::containing(&quota, today).start)
        })
        .await?;
        let paging = Paging::default();
        self.usage(
            plan_id,
            Some(key_id),
            Some(&window_start.to_string()),
            Some(&self.today().to_string()),
            &paging,
        )
        .await
    }
}
