//! The JSON the dashboard's pages read and the changes they make, through the same [`Admin`] calls
//! the AWS routes use.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::extract::{Path, RawQuery, State};
use bytes::Bytes;
use http::StatusCode;
use serde::Deserialize;
use serde_json::{Value, json};
use tollgate_core::UsagePlan;
use tollgate_core::quota::{EpochDay, QuotaWindow};
use tollgate_core::shadow::shadow_counts;
use tollgate_store::report::{period_usage, plan_usage, used_in_period};
use tollgate_store::{Holder, Series};

use super::{Dashboard, parse};
use crate::answer::{Answer, reply};
use crate::error::AdminError;
use crate::service::{KeyChange, NameQuery, Paging};
use crate::wire::CreateApiKeyIn;

/// The most keys the keys page lists at once (it searches by name prefix beyond that).
const KEYS_SHOWN: i64 = 500;

/// Every date from `from` to `to`, `YYYY-MM-DD`.
fn day_list(from: EpochDay, to: EpochDay) -> Vec<String> {
    let mut days = Vec::new();
    let mut d = from;
    while d <= to {
        days.push(d.to_string());
        d = d.next();
    }
    days
}

/// The last 30 days across every plan and key, by outcome; the top consumers by volume and by
/// refusals.
pub(super) async fn overview(State(dash): State<Arc<Dashboard>>) -> Answer {
    let admin = &dash.admin;
    admin.gateway.flush().await.map_err(AdminError::Internal)?;
    let to = admin.today();
    let from = EpochDay(to.0.saturating_sub(29));
    let plans = admin.plans.lock().await.clone();
    let mut overview = admin
        .blocking(move |admin| {
            let n = (to.0 - from.0 + 1) as usize;
            let mut days = vec![[0u64; 4]; n];
            let mut by_key: HashMap<String, [u64; 2]> = HashMap::new();
            // Per day: allowed, throttled, quota exceeded, let through by a plan in shadow that
            // would have refused; per key: allowed, refused. A plan's counts in shadow are kept
            // under its shadow name, whatever it does now.
            let series = [
                (Series::Used, false, 0, Some(0)),
                (Series::Throttled, false, 1, Some(1)),
                (Series::QuotaExceeded, false, 2, Some(1)),
                (Series::Used, true, 0, Some(0)),
                (Series::Throttled, true, 3, None),
                (Series::QuotaExceeded, true, 3, None),
            ];
            for plan in &plans {
                let shadow = shadow_counts(&plan.id);
                for (series, in_shadow, on_day, of_key) in series {
                    let counts_as = if in_shadow { &shadow } else { &plan.id };
                    for r in admin.store.series(series, counts_as, None, from, to)? {
                        days[(r.day.0 - from.0) as usize][on_day] += r.count();
                        if let Some(of_key) = of_key {
                            by_key.entry(r.key_id.clone()).or_default()[of_key] += r.count();
                        }
                    }
                }
            }
            let top = |i: usize| -> Result<Vec<Value>, AdminError> {
                let mut ranked: Vec<(&String, u64)> = by_key
                    .iter()
                    .map(|(k, v)| (k, v[i]))
                    .filter(|(_, v)| *v > 0)
                    .collect();
                ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
                ranked
                    .into_iter()
                    .take(10)
                    .map(|(id, count)| {
                        let name = admin.store.key(id)?.map(|k| k.name).unwrap_or_default();
                        Ok(json!({ "id": id, "name": name, "count": count }))
                    })
                    .collect()
            };
            Ok(json!({
                "days": day_list(from, to),
                "allowed": days.iter().map(|d| d[0]).collect::<Vec<_>>(),
                "throttled": days.iter().map(|d| d[1]).collect::<Vec<_>>(),
                "quotaExceeded": days.iter().map(|d| d[2]).collect::<Vec<_>>(),
                "wouldHaveRefused": days.iter().map(|d| d[3]).collect::<Vec<_>>(),
                "topByVolume": top(0)?,
                "topByRefusals": top(1)?,
            }))
        })
        .await?;
    // Refusals for the key come from the data plane's counters: most carry no key to store them by.
    overview["forbidden"] = json!(admin.gateway.forbidden());
    let quantile = |q| {
        admin
            .gateway
            .latency(q)
            .map(|(seconds, under)| json!({ "seconds": seconds, "under": under }))
    };
    overview["latency"] = json!({ "p50": quantile(0.5), "p99": quantile(0.99) });
    Ok(reply(StatusCode::OK, &overview))
}

/// Up to [`KEYS_SHOWN`] keys whose name starts with `q` in any case: their plans, last use, and this period's
/// quota use per plan with the date it resets.
pub(super) async fn keys(State(dash): State<Arc<Dashboard>>, RawQuery(q): RawQuery) -> Answer {
    let admin = &dash.admin;
    let prefix = q
        .as_deref()
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("q=")))
        .map(|v| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
        .filter(|v| !v.is_empty())
        .map(|v| NameQuery::any_case(&v));
    let paging = Paging {
        limit: Some(KEYS_SHOWN),
        position: None,
    };
    let page = admin.list_keys(prefix, None, false, paging).await?;
    let plans = admin.plans.lock().await.clone();
    let served = admin.gateway.served();
    let today = admin.today();
    let ids: Vec<String> = page.item.iter().map(|k| k.id.clone()).collect();
    let listed = admin
        .blocking(move |admin| {
            // (plan, key) → [used this period, limit], for the listed keys' plans with a quota.
            let mut quota_use: HashMap<(String, String), Value> = HashMap::new();
            for plan in &plans {
                let Some(quota) = &plan.quota else { continue };
                let members = served.keys_of(&plan.id);
                let listed: Vec<&str> = ids
                    .iter()
                    .map(String::as_str)
                    .filter(|k| members.contains(k))
                    .collect();
                if listed.is_empty() {
                    continue;
                }
                let usage = plan_usage(&*admin.store, &listed, plan, None, today, today)?;
                let resets = QuotaWindow::containing(quota, today).end;
                for k in listed {
                    let remaining = usage.report(k).first().map_or(0, |d| d[1]);
                    let used = u64::from(quota.limit).saturating_sub(remaining);
                    quota_use.insert(
                        (plan.id.clone(), k.to_owned()),
                        json!({ "used": used, "limit": quota.limit, "resets": resets.to_string() }),
                    );
                }
            }
            let names: BTreeMap<&str, &str> = plans
                .iter()
                .map(|p| (p.id.as_str(), p.name.as_str()))
                .collect();
            let rows: Vec<Value> = page
                .item
                .iter()
                .map(|k| {
                    let of_key: Vec<Value> = served
                        .plans_of(&k.id)
                        .into_iter()
                        .map(|p| {
                            json!({
                                "id": p,
                                "name": names.get(p).copied().unwrap_or(p),
                                "quota": quota_use.get(&(p.to_owned(), k.id.clone())),
                            })
                        })
                        .collect();
                    json!({
                        "id": k.id, "name": k.name, "enabled": k.enabled,
                        "lastUsedDate": k.last_used_date, "plans": of_key,
                    })
                })
                .collect();
            Ok(json!({ "keys": rows, "more": page.position.is_some() }))
        })
        .await?;
    Ok(reply(StatusCode::OK, &listed))
}

/// One key: its record and, per plan, 90 days of usage by outcome against the quota.
pub(super) async fn key_detail(
    State(dash): State<Arc<Dashboard>>,
    Path(id): Path<String>,
) -> Answer {
    let admin = &dash.admin;
    let key = admin.get_key(&id, false).await?;
    let to = admin.today();
    // From its creation, at most 90 days.
    let created_at = u64::try_from(key.created_date).unwrap_or(0);
    let created = EpochDay::from_nanos(created_at.saturating_mul(1_000_000_000));
    let from = EpochDay(to.0.saturating_sub(89)).max(created).min(to);
    let plans = admin.plans.lock().await.clone();
    let mut of_key = Vec::new();
    for plan_id in admin.gateway.served().plans_of(&id) {
        let Some(plan) = plans.iter().find(|p| p.id == plan_id) else {
            continue;
        };
        let paging = Paging::default();
        let (start, end) = (from.to_string(), to.to_string());
        let usage = admin
            .usage_detail(&plan.id, Some(&id), Some(&start), Some(&end), &paging)
            .await?;
        // Per-method throttles, as `apiId:stage /path/METHOD`.
        let methods: BTreeMap<String, _> = plan
            .api_stages
            .iter()
            .flat_map(|s| {
                s.throttle
                    .iter()
                    .map(move |(m, t)| (format!("{}:{} {m}", s.api_id, s.stage), t))
            })
            .collect();
        of_key.push(json!({
            "id": plan.id, "name": plan.name, "quota": plan.quota, "throttle": plan.throttle,
            "methodThrottles": methods,
            "days": usage.values.get(&id).cloned().unwrap_or_default(),
        }));
    }
    Ok(reply(
        StatusCode::OK,
        &json!({ "key": key, "days": day_list(from, to), "plans": of_key }),
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewKeyIn {
    name: String,
    usage_plan_id: Option<String>,
}

/// CreateApiKey (enabled), then CreateUsagePlanKey: the value is in this answer only.
pub(super) async fn create_key(State(dash): State<Arc<Dashboard>>, body: Bytes) -> Answer {
    let input: NewKeyIn = parse(&body, "Expected name and usagePlanId")?;
    let admin = &dash.admin;
    let created = CreateApiKeyIn {
        name: Some(input.name),
        enabled: Some(true),
        ..CreateApiKeyIn::default()
    };
    let key = admin.create_key(created).await?;
    if let Some(plan) = input.usage_plan_id.filter(|p| !p.is_empty()) {
        admin
            .create_plan_key(&plan, Some(key.id.clone()), Some("API_KEY".into()))
            .await?;
    }
    Ok(reply(StatusCode::CREATED, &key))
}

#[derive(Deserialize)]
struct EnabledIn {
    enabled: bool,
}

pub(super) async fn set_enabled(
    State(dash): State<Arc<Dashboard>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer {
    let input: EnabledIn = parse(&body, "Expected enabled")?;
    let change = vec![KeyChange::Enabled(input.enabled)];
    Ok(reply(
        StatusCode::OK,
        &dash.admin.change_key(&id, change).await?,
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RemainingIn {
    usage_plan_id: String,
    remaining: i64,
}

/// UpdateUsage: what the key has left this period.
pub(super) async fn set_remaining(
    State(dash): State<Arc<Dashboard>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer {
    let input: RemainingIn = parse(&body, "Expected usagePlanId and remaining")?;
    let usage = dash
        .admin
        .set_remaining(&input.usage_plan_id, &id, input.remaining)
        .await?;
    Ok(reply(StatusCode::OK, &usage))
}

/// The day plan `p`'s quota period containing `today` ends, `YYYY-MM-DD`.
fn resets(p: &UsagePlan, today: EpochDay) -> Option<String> {
    p.quota
        .as_ref()
        .map(|q| QuotaWindow::containing(q, today).end.to_string())
}

/// Every plan: its limits, stages, number of keys and the requests counted this period.
pub(super) async fn plans(State(dash): State<Arc<Dashboard>>) -> Answer {
    let admin = &dash.admin;
    admin.gateway.flush().await.map_err(AdminError::Internal)?;
    let plans = admin.plans.lock().await.clone();
    let served = admin.gateway.served();
    let today = admin.today();
    let listed = admin
        .blocking(move |admin| {
            let used = period_usage(&*admin.store, plans.iter(), today)?;
            let rows: Vec<Value> = plans
                .iter()
                .map(|p| {
                    let period: i64 = used
                        .iter()
                        .filter(|((plan, _), _)| *plan == *p.counts_as())
                        .map(|(_, n)| *n)
                        .sum();
                    let resets = resets(p, today);
                    json!({
                        "id": p.id, "name": p.name, "description": p.description,
                        "apiStages": p.api_stages, "throttle": p.throttle, "quota": p.quota,
                        "keys": served.keys_of(&p.id).len(), "usedThisPeriod": period,
                        "resets": resets,
                    })
                })
                .collect();
            Ok(json!({ "plans": rows }))
        })
        .await?;
    Ok(reply(StatusCode::OK, &listed))
}

/// The customers whose keys share a plan's limits (plans with `limitsShareBy`): each with its keys,
/// what they used together this period and what the customer has left.
pub(super) async fn customers(State(dash): State<Arc<Dashboard>>) -> Answer {
    let admin = &dash.admin;
    admin.gateway.flush().await.map_err(AdminError::Internal)?;
    let plans = admin.plans.lock().await.clone();
    let served = admin.gateway.served();
    let today = admin.today();
    let listed = admin
        .blocking(move |admin| {
            let mut rows = Vec::new();
            for p in plans.iter().filter(|p| p.limits_share_by().is_some()) {
                let resets = resets(p, today);
                for (customer, keys) in served.customers_of(&p.id) {
                    let used = used_in_period(&*admin.store, p, Holder::Customer(customer), today)?;
                    let mut named = Vec::with_capacity(keys.len());
                    for id in keys {
                        let name = admin.store.key(id)?.map(|k| k.name);
                        named.push(json!({ "id": id, "name": name }));
                    }
                    rows.push(json!({
                        "customerId": customer, "usagePlanId": p.id, "usagePlanName": p.name,
                        "keys": named, "usedThisPeriod": used,
                        "remaining": p.quota.map(|q| (i64::from(q.limit) - used).max(0)),
                        "resets": resets,
                    }));
                }
            }
            Ok(json!({ "customers": rows }))
        })
        .await?;
    Ok(reply(StatusCode::OK, &listed))
}
