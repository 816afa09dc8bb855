//! `tollgate migrate --from sqlite:./tollgate.db --to redis://…`: copies keys (hashes and sealed
//! values), plans, memberships, usage history (refused requests and last uses included) and quota
//! adjustments between stores, so outgrowing one machine keeps every record.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tollgate_core::credits::refill_entry;
use tollgate_core::quota::EpochDay;
use tollgate_core::shadow::shadow_counts;
use tollgate_store::{
    CustomerDelta, OPENING_CREDITS, RedisSettings, RedisStore, Series, SqliteStore, Store,
    UsageDelta,
};

use crate::config::REDIS_TLS;

/// Where records are copied from or to, read from the command line before anything is opened.
enum Spec<'a> {
    Sqlite(&'a str),
    Redis { urls: Vec<String>, cluster: bool },
}

/// Reads `sqlite:PATH`, `redis://…` or `redis-cluster://host:port,host:port`.
fn parse(spec: &str) -> anyhow::Result<Spec<'_>> {
    if let Some(path) = spec.strip_prefix("sqlite:") {
        Ok(Spec::Sqlite(path))
    } else if spec.starts_with("rediss://") {
        bail!("{spec:?}: {REDIS_TLS}")
    } else if spec.starts_with("redis://") {
        Ok(Spec::Redis {
            urls: vec![spec.to_string()],
            cluster: false,
        })
    } else if let Some(nodes) = spec.strip_prefix("redis-cluster://") {
        Ok(Spec::Redis {
            urls: nodes.split(',').map(|n| format!("redis://{n}")).collect(),
            cluster: true,
        })
    } else {
        bail!(
            "{spec:?}: expected sqlite:PATH, redis://host:port or redis-cluster://host:port,host:port"
        )
    }
}

fn open(spec: &str, parsed: Spec<'_>) -> anyhow::Result<Arc<dyn Store>> {
    Ok(match parsed {
        Spec::Sqlite(path) => {
            Arc::new(SqliteStore::open(path.as_ref()).with_context(|| format!("opening {path}"))?)
        }
        Spec::Redis { urls, cluster } => {
            let store = RedisStore::new(RedisSettings {
                urls,
                cluster,
                timeout: Duration::from_secs(5),
            })?;
            store
                .ping()
                .with_context(|| format!("cannot reach {spec}"))?;
            Arc::new(store)
        }
    })
}

/// Copies everything from `from` to `to`; returns (plans, keys, memberships, usage rows) copied.
pub fn migrate(from: &str, to: &str) -> anyhow::Result<(usize, usize, usize, usize)> {
    // Both are read, and a SQLite source looked for, before either is opened: opening a SQLite path
    // creates the file, and a mistyped source must not leave an empty database behind.
    let (from_spec, to_spec) = (parse(from)?, parse(to)?);
    if let Spec::Sqlite(path) = from_spec
        && !std::path::Path::new(path).exists()
    {
        bail!("the source {path} does not exist");
    }
    let (source, target) = (open(from, from_spec)?, open(to, to_spec)?);
    let records = source.load().context("reading the source")?;
    if !target.load().context("reading the target")?.keys.is_empty() {
        bail!("the target {to} already holds API keys: migrate into an empty store");
    }
    target
        .put_records(&records)
        .context("writing the records")?;
    let mut rows = 0;
    let all = (EpochDay(0), EpochDay(u32::MAX));
    // The customers' shared counts are read by customer: those the keys name.
    let mut customers: Vec<&str> = records
        .keys
        .iter()
        .filter_map(|k| k.customer_id.as_deref())
        .collect();
    customers.sort_unstable();
    customers.dedup();
    // Each plan's counts, and those it kept in shadow.
    let names = records
        .plans
        .iter()
        .flat_map(|p| [p.id.clone(), shadow_counts(&p.id)]);
    for plan_id in names {
        let plan_id = plan_id.as_str();
        // Each counted series goes where `add_usage` takes it.
        for series in [Series::Used, Series::Throttled, Series::QuotaExceeded] {
            let days = source.series(series, plan_id, None, all.0, all.1)?;
            if series == Series::Used {
                rows += days.len();
            }
            let deltas: Vec<UsageDelta> = days
                .into_iter()
                .map(|r| {
                    let n = r.count();
                    let (count, throttled, quota_exceeded) = match series {
                        Series::Used => (n, 0, 0),
                        Series::Throttled => (0, n, 0),
                        _ => (0, 0, n),
                    };
                    UsageDelta {
                        plan_id: plan_id.to_owned(),
                        key_id: r.key_id,
                        day: r.day,
                        count,
                        throttled,
                        quota_exceeded,
                        ..UsageDelta::default()
                    }
                })
                .collect();
            target.add_usage(&deltas)?;
        }
        for adj in source.series(Series::QuotaAdjustment, plan_id, None, all.0, all.1)? {
            target.adjust_quota(plan_id, &adj.key_id, adj.day, adj.value)?;
        }
        let shared = source.customer_series(Series::Used, plan_id, &customers, all.0, all.1)?;
        rows += shared.len();
        let deltas: Vec<CustomerDelta> = shared
            .into_iter()
            .map(|r| CustomerDelta {
                plan_id: plan_id.to_owned(),
                count: r.count(),
                customer_id: r.key_id,
                day: r.day,
            })
            .collect();
        target.add_customer_usage(&deltas)?;
        let adjusted =
            source.customer_series(Series::QuotaAdjustment, plan_id, &customers, all.0, all.1)?;
        for adj in adjusted {
            target.adjust_customer_quota(plan_id, &adj.key_id, adj.day, adj.value)?;
        }
    }
    // Credits move as their balance (and the refill period they were last refilled in), as the
    // opening entry: a declared key's opening balance is in it, and is not added again.
    for b in source.credit_balances()? {
        target.add_credits(&b.key_id, OPENING_CREDITS, b.balance, 0)?;
        if let Some(day) = b.refilled {
            target.add_credits(&b.key_id, &refill_entry(day), 0, 0)?;
        }
    }
    let ids: Vec<&str> = records.keys.iter().map(|k| k.id.as_str()).collect();
    for page in ids.chunks(10_000) {
        let seen: Vec<UsageDelta> = page
            .iter()
            .zip(source.last_used(page)?)
            .filter_map(|(id, at)| {
                Some(UsageDelta {
                    key_id: (*id).to_owned(),
                    last_used: Some(at?),
                    ..UsageDelta::default()
                })
            })
            .collect();
        target.add_usage(&seen)?;
    }
    Ok((
        records.plans.len(),
        records.keys.len(),
        records.bindings.len(),
        rows,
    ))
}

#[cfg(test)]
mod tests {
    use tollgate_core::UsagePlan;

    use super::*;

    #[test]
    fn every_series_is_copied() {
        let dir = tempfile::tempdir().unwrap();
        let (from, to) = (dir.path().join("from.db"), dir.path().join("to.db"));
        let source = SqliteStore::open(&from).unwrap();
        source
            .put_plan(&UsagePlan {
                id: "p1".into(),
                name: "p1".into(),
                ..UsagePlan::default()
            })
            .unwrap();
        let day = |d| UsageDelta {
            plan_id: "p1".into(),
            key_id: "k1".into(),
            day: EpochDay(d),
            ..UsageDelta::default()
        };
        source
            .add_usage(&[
                UsageDelta {
                    count: 5,
                    throttled: 2,
                    ..day(10)
                },
                UsageDelta {
                    quota_exceeded: 3,
                    ..day(11)
                },
            ])
            .unwrap();
        source.adjust_quota("p1", "k1", EpochDay(11), -4).unwrap();
        migrate(
            &format!("sqlite:{}", from.display()),
            &format!("sqlite:{}", to.display()),
        )
        .unwrap();
        let target = SqliteStore::open(&to).unwrap();
        for series in [
            Series::Used,
            Series::Throttled,
            Series::QuotaExceeded,
            Series::QuotaAdjustment,
        ] {
            let read = |store: &SqliteStore| {
                store
                    .series(series, "p1", None, EpochDay(0), EpochDay(99))
                    .unwrap()
            };
            assert_eq!(read(&target), read(&source), "{series:?}");
            assert_eq!(read(&target).len(), 1, "{series:?}");
        }
    }
}
