//! AWS GetUsage, computed from a store: one place for the CLI (offline) and the admin API.

use std::collections::BTreeMap;

use tollgate_core::UsagePlan;
use tollgate_core::quota::{EpochDay, QuotaWindow, usage_report};

use crate::{Store, StoreError};

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

/// Per key id, `[used, remaining]` for each day from `from` to `to` inclusive, for the plan's keys
/// `members` (or the one key `key_id`). Keys that left the plan but have usage in the range are
/// included, as their requests were metered under it.
pub fn plan_usage(
    store: &dyn Store,
    members: &[&str],
    plan: &UsagePlan,
    key_id: Option<&str>,
    from: EpochDay,
    to: EpochDay,
) -> Result<BTreeMap<String, Vec<[u64; 2]>>, StoreError> {
    // Remaining on `from` depends on everything since its period began.
    let since = plan
        .quota
        .as_ref()
        .map_or(from, |q| QuotaWindow::containing(q, from).start.min(from));
    let rows = store.usage(&plan.id, key_id, since, to)?;
    let adjustments = store.quota_adjustments(&plan.id, key_id, since, to)?;
    let mut key_ids: Vec<&str> = match key_id {
        Some(k) => vec![k],
        None => members.to_vec(),
    };
    for row in &rows {
        if !key_ids.contains(&row.key_id.as_str()) {
            key_ids.push(&row.key_id);
        }
    }
    let mut values = BTreeMap::new();
    for key in key_ids {
        let daily: Vec<(EpochDay, u64)> = rows
            .iter()
            .filter(|r| r.key_id == key)
            .map(|r| (r.day, r.used))
            .collect();
        let adjusted: Vec<(EpochDay, i64)> = adjustments
            .iter()
            .filter(|a| a.key_id == key)
            .map(|a| (a.day, a.delta))
            .collect();
        values.insert(
            key.to_string(),
            usage_report(plan.quota.as_ref(), &daily, &adjusted, from, to),
        );
    }
    Ok(values)
}
