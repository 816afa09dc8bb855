//! `tollgate migrate --from sqlite:./tollgate.db --to redis://…`: copies keys (hashes and sealed
//! values), plans, memberships, usage history (refused requests and last uses included) and quota
//! adjustments between stores, so outgrowing one machine keeps every record.

use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, bail};
use tollgate_core::quota::EpochDay;
use tollgate_store::{RedisSettings, RedisStore, SqliteStore, Store, UsageDelta};

/// Opens `sqlite:PATH`, `redis://…` or `redis-cluster://host:port,host:port`.
fn open(spec: &str) -> anyhow::Result<Arc<dyn Store>> {
    let redis = |urls: Vec<String>, cluster| -> anyhow::Result<Arc<dyn Store>> {
        let store = RedisStore::new(RedisSettings {
            urls,
            cluster,
            timeout: Duration::from_secs(5),
        })?;
        store
            .ping()
            .with_context(|| format!("cannot reach {spec}"))?;
        Ok(Arc::new(store))
    };
    if let Some(path) = spec.strip_prefix("sqlite:") {
        Ok(Arc::new(
            SqliteStore::open(path.as_ref()).with_context(|| format!("opening {path}"))?,
        ))
    } else if spec.starts_with("redis://") || spec.starts_with("rediss://") {
        redis(vec![spec.to_string()], false)
    } else if let Some(nodes) = spec.strip_prefix("redis-cluster://") {
        redis(
            nodes.split(',').map(|n| format!("redis://{n}")).collect(),
            true,
        )
    } else {
        bail!(
            "{spec:?}: expected sqlite:PATH, redis://host:port or redis-cluster://host:port,host:port"
        )
    }
}

/// Copies everything from `from` to `to`; returns (plans, keys, memberships, usage rows) copied.
pub fn migrate(from: &str, to: &str) -> anyhow::Result<(usize, usize, usize, usize)> {
    let (source, target) = (open(from)?, open(to)?);
    let records = source.load().context("reading the source")?;
    if !target.load().context("reading the target")?.keys.is_empty() {
        bail!("the target {to} already holds API keys: migrate into an empty store");
    }
    target
        .put_records(&records)
        .context("writing the records")?;
    let mut rows = 0;
    let all = (EpochDay(0), EpochDay(u32::MAX));
    for plan in &records.plans {
        let usage = source.usage(&plan.id, None, all.0, all.1)?;
        let refusals = source.refusals(&plan.id, None, all.0, all.1)?;
        rows += usage.len();
        let delta = |key_id, day| UsageDelta {
            plan_id: plan.id.clone(),
            key_id,
            day,
            ..UsageDelta::default()
        };
        let used = usage.into_iter().map(|r| UsageDelta {
            count: r.used,
            ..delta(r.key_id, r.day)
        });
        let refused = refusals.into_iter().map(|r| UsageDelta {
            throttled: r.throttled,
            quota_exceeded: r.quota_exceeded,
            ..delta(r.key_id, r.day)
        });
        target.add_usage(&used.chain(refused).collect::<Vec<_>>())?;
        for adj in source.quota_adjustments(&plan.id, None, EpochDay(0), EpochDay(u32::MAX))? {
            target.adjust_quota(&plan.id, &adj.key_id, adj.day, adj.delta)?;
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
