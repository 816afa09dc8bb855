//! Cluster mode's limiter: a key's throttle bucket, its quota and its per-day usage decided by one Lua
//! script in one round trip, on Redis's clock, so every instance enforces the same exact limits.
//!
//! All keys the script touches carry the API key's hash tag `{keyId}`, so it runs on Redis Cluster.
//! Times are microseconds (Lua numbers are doubles: exact up to 2^53).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use tollgate_core::clock::NANOS_PER_SEC;
use tollgate_core::quota::{EpochDay, QuotaWindow};
use tollgate_store::redis::keys;

use crate::route::RouteMatch;
use crate::snapshot::{BucketInfo, Grant, LimitInfo, QuotaInfo, Refusal};

/// What to do when Redis is slow or down.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum OnStoreFailure {
    /// Enforce with this instance's own state, meter locally, write the usage back later.
    #[default]
    Local,
    /// Let keyed requests through (AWS's behaviour when its usage-plan check fails).
    Allow,
    /// Answer 503.
    Deny,
}

/// Shared by both scripts: the period's count rebuilt from the per-day usage (KEYS[3]) and quota
/// adjustments (KEYS[4]) when the live count (KEYS[2]) is for another period or missing, e.g. right
/// after `tollgate migrate`.
const COUNTED: &str = r"
local function counted(ws, day)
  local n = 0
  for d = ws, day do
    n = n + (tonumber(redis.call('HGET', KEYS[3], d)) or 0) + (tonumber(redis.call('HGET', KEYS[4], d)) or 0)
  end
  return n
end
";

const LIMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local day = math.floor(tonumber(t[1]) / 86400)
local interval, tolerance = tonumber(ARGV[2]), tonumber(ARGV[3])
local limit, ws, we = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if ARGV[4] == '1' and (day < ws or day >= we) then return {3, day, 0, 0} end
local tokens, ahead = -1, 0
if ARGV[1] == '1' then
  local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
  if tat < now then tat = now end
  local new_tat = tat + interval
  ahead = new_tat - now
  if ahead > tolerance then return {1, string.format('%.0f', ahead - tolerance), 0, 0} end
  redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', math.ceil(ahead / 1000) + 1000)
  tokens = math.floor((tolerance - ahead) / interval)
end
local remaining = -1
if ARGV[4] == '1' then
  local q = redis.call('HMGET', KEYS[2], 's', 'u')
  local used = 0
  if tonumber(q[1]) == ws then used = tonumber(q[2]) or 0 else used = counted(ws, day) end
  if used >= limit then return {2, we, tokens, string.format('%.0f', ahead)} end
  redis.call('HSET', KEYS[2], 's', ws, 'u', used + 1)
  redis.call('EXPIREAT', KEYS[2], (we + 2) * 86400)
  remaining = limit - used - 1
end
redis.call('HINCRBY', KEYS[3], day, 1)
return {0, tokens, remaining, string.format('%.0f', ahead)}
";

const SET_REMAINING: &str = r"
local q = redis.call('HMGET', KEYS[2], 's', 'u')
local used = 0
if tonumber(q[1]) == tonumber(ARGV[1]) then used = tonumber(q[2]) or 0 else used = counted(tonumber(ARGV[1]), tonumber(ARGV[4])) end
redis.call('HSET', KEYS[2], 's', ARGV[1], 'u', ARGV[2])
redis.call('EXPIREAT', KEYS[2], (tonumber(ARGV[3]) + 2) * 86400)
return tonumber(ARGV[2]) - used
";

#[derive(Clone)]
enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Why the script could not decide.
#[derive(Debug, thiserror::Error)]
pub enum LimiterError {
    /// Redis failed or did not answer in time.
    #[error("redis: {0}")]
    Redis(String),
}

/// The Redis limiter of one instance.
pub struct RedisLimiter {
    conn: Conn,
    limit: Script,
    set_remaining: Script,
    timeout: Duration,
    /// What happens while Redis is unavailable.
    pub on_failure: OnStoreFailure,
    degraded: AtomicBool,
    /// Until when (clock nanos) requests skip Redis after a failure, so a dead Redis costs one
    /// timeout per interval rather than one per request.
    skip_until: AtomicU64,
}

/// How long requests bypass Redis after it failed, before one tries again.
const BACKOFF_NANOS: u64 = 500_000_000;

impl RedisLimiter {
    /// A limiter on `urls` (seed nodes when `cluster`), every call bounded by `timeout`.
    pub async fn connect(
        urls: &[String],
        cluster: bool,
        timeout: Duration,
        on_failure: OnStoreFailure,
    ) -> Result<Self, LimiterError> {
        let err = |e: redis::RedisError| LimiterError::Redis(e.to_string());
        let conn = if cluster {
            let client = redis::cluster::ClusterClientBuilder::new(urls.to_vec())
                .connection_timeout(timeout)
                .response_timeout(timeout)
                .build()
                .map_err(err)?;
            Conn::Cluster(client.get_async_connection().await.map_err(err)?)
        } else {
            let url = urls
                .first()
                .ok_or_else(|| LimiterError::Redis("no Redis URL".into()))?;
            let client = redis::Client::open(url.as_str()).map_err(err)?;
            let config = redis::aio::ConnectionManagerConfig::new()
                .set_connection_timeout(Some(timeout))
                .set_response_timeout(Some(timeout))
                .set_number_of_retries(1)
                .set_max_delay(Duration::from_millis(200));
            // Lazy: an instance may start while Redis is down and serve in its fallback mode.
            Conn::Single(client.get_connection_manager_lazy(config).map_err(err)?)
        };
        Ok(Self {
            conn,
            limit: Script::new(&format!("{COUNTED}{LIMIT}")),
            set_remaining: Script::new(&format!("{COUNTED}{SET_REMAINING}")),
            timeout,
            on_failure,
            degraded: AtomicBool::new(false),
            skip_until: AtomicU64::new(0),
        })
    }

    /// Whether Redis is currently considered unavailable.
    pub fn degraded(&self) -> bool {
        self.degraded.load(Ordering::Relaxed)
    }

    fn mark(&self, healthy: bool, now: u64, why: &str) {
        if !healthy {
            self.skip_until
                .store(now.saturating_add(BACKOFF_NANOS), Ordering::Relaxed);
        }
        // Logged once per change of state, not per request.
        if self.degraded.swap(!healthy, Ordering::Relaxed) == healthy {
            if healthy {
                tracing::warn!("redis is reachable again; limits are shared again");
            } else {
                tracing::error!(error = %why, mode = ?self.on_failure, "redis is unavailable; serving with onStoreFailure");
            }
        }
    }

    async fn run<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, LimiterError> {
        let mut conn = self.conn.clone();
        let call = async move {
            match &mut conn {
                Conn::Single(c) => invocation.invoke_async(c).await,
                Conn::Cluster(c) => invocation.invoke_async(c).await,
            }
        };
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(LimiterError::Redis(e.to_string())),
            Err(_) => Err(LimiterError::Redis(format!(
                "no answer within {:?}",
                self.timeout
            ))),
        }
    }

    /// Decides a keyed request's own limits (its plan or per-method bucket, its quota) and counts it.
    /// `Err` means Redis could not be asked: the caller applies [`OnStoreFailure`].
    pub async fn decide(
        &self,
        grant: &Grant,
        m: &RouteMatch<'_>,
        method_key: &str,
        now: u64,
    ) -> Result<Result<LimitInfo, Refusal>, LimiterError> {
        if now < self.skip_until.load(Ordering::Relaxed) {
            return Err(LimiterError::Redis("backing off after a failure".into()));
        }
        let result = self
            .decide_once(grant, m, method_key, EpochDay::from_nanos(now), now)
            .await;
        let result = match result {
            // Our clock and Redis's disagree about the day (around midnight): use Redis's day.
            Ok(Decision::WrongDay(day)) => self.decide_once(grant, m, method_key, day, now).await,
            other => other,
        };
        match result {
            Ok(Decision::Done(d)) => {
                self.mark(true, now, "");
                Ok(d)
            }
            Ok(Decision::WrongDay(_)) => Err(LimiterError::Redis(
                "redis and this instance disagree about the date".into(),
            )),
            Err(e) => {
                self.mark(false, now, &e.to_string());
                Err(e)
            }
        }
    }

    async fn decide_once(
        &self,
        grant: &Grant,
        m: &RouteMatch<'_>,
        method_key: &str,
        day: EpochDay,
        now: u64,
    ) -> Result<Decision, LimiterError> {
        let (key_id, plan_id) = (&*grant.key_id, &*grant.plan_id);
        let bucket = grant.bucket_for(m);
        let bucket_key = match bucket {
            Some(_) if grant.has_method_throttle(m) => keys::bucket(key_id, plan_id, method_key),
            _ => keys::bucket(key_id, plan_id, ""),
        };
        // Microseconds for Lua's doubles; rates above 1M/s round to one token per microsecond, the
        // bucket's size stays exact.
        let (interval_us, tolerance_us) = bucket.map_or((0, 0), |g| {
            (
                (g.interval() / 1000).max(1),
                g.interval().saturating_mul(g.burst()) / 1000,
            )
        });
        let quota = grant.quota();
        let window = quota.map(|q| QuotaWindow::containing(q.settings(), day));
        let mut invocation = self.limit.prepare_invoke();
        invocation
            .key(bucket_key)
            .key(keys::quota(key_id, plan_id))
            .key(keys::usage(key_id, plan_id))
            .key(keys::adjustments(key_id, plan_id))
            .arg(u8::from(bucket.is_some()))
            .arg(interval_us)
            .arg(tolerance_us)
            .arg(u8::from(quota.is_some()))
            .arg(quota.map_or(0, |q| q.settings().limit))
            .arg(window.map_or(0, |w| w.start.0))
            .arg(window.map_or(0, |w| w.end.0));
        let (status, a, b, c): (i64, String, i64, String) = self.run(&invocation).await?;
        let num = |s: &str| s.parse::<f64>().unwrap_or(0.0).max(0.0) as u64;
        let throttle_info = |remaining: u64, ahead_us: u64| {
            bucket.map(|g| BucketInfo {
                burst: g.burst(),
                remaining,
                reset_secs: (ahead_us * 1000).div_ceil(NANOS_PER_SEC),
                window_secs: g
                    .interval()
                    .saturating_mul(g.burst())
                    .div_ceil(NANOS_PER_SEC)
                    .max(1),
            })
        };
        let until_reset = window.map_or(0, |w| {
            w.end
                .start_nanos()
                .saturating_sub(now)
                .div_ceil(NANOS_PER_SEC)
        });
        let quota_info = |remaining: u64| {
            window.zip(quota).map(|(w, q)| QuotaInfo {
                limit: u64::from(q.settings().limit),
                remaining,
                reset_secs: until_reset,
                window_secs: u64::from(w.end.0 - w.start.0) * 86_400,
            })
        };
        Ok(Decision::Done(match status {
            0 => Ok(LimitInfo {
                throttle: throttle_info(num(&a), num(&c)),
                quota: quota_info(u64::try_from(b).unwrap_or(0)),
            }),
            1 => Err(Refusal::TooManyRequests {
                retry_after_secs: (num(&a) * 1000).div_ceil(NANOS_PER_SEC).max(1),
                limits: LimitInfo {
                    throttle: throttle_info(0, num(&a)),
                    quota: None,
                },
            }),
            2 => Err(Refusal::LimitExceeded {
                retry_after_secs: until_reset.max(1),
                limits: LimitInfo {
                    throttle: throttle_info(u64::try_from(b).unwrap_or(0), num(&c)),
                    quota: quota_info(0),
                },
            }),
            _ => {
                return Ok(Decision::WrongDay(EpochDay(
                    u32::try_from(num(&a)).unwrap_or(0),
                )));
            }
        }))
    }

    /// AWS UpdateUsage in cluster mode: sets the shared count so `remaining` are left in the current
    /// period; returns by how much the count changed.
    pub async fn set_remaining(
        &self,
        grant: &Grant,
        remaining: i64,
        now: u64,
    ) -> Result<Option<i64>, LimiterError> {
        let Some(quota) = grant.quota() else {
            return Ok(None);
        };
        let today = EpochDay::from_nanos(now);
        let window = QuotaWindow::containing(quota.settings(), today);
        let used = i64::from(quota.settings().limit) - remaining;
        let (key_id, plan_id) = (&*grant.key_id, &*grant.plan_id);
        let mut invocation = self.set_remaining.prepare_invoke();
        invocation
            .key(keys::bucket(key_id, plan_id, ""))
            .key(keys::quota(key_id, plan_id))
            .key(keys::usage(key_id, plan_id))
            .key(keys::adjustments(key_id, plan_id))
            .arg(window.start.0)
            .arg(used)
            .arg(window.end.0)
            .arg(today.0);
        self.run::<i64>(&invocation).await.map(Some)
    }
}

enum Decision {
    Done(Result<LimitInfo, Refusal>),
    WrongDay(EpochDay),
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeMap, HashMap};

    use http::Method;
    use tollgate_core::quota::Period;
    use tollgate_core::{ApiKey, ApiStage, KeyHash, QuotaSettings, ThrottleSettings, UsagePlan};
    use tollgate_store::Records;
    use tollgate_store::testing::RedisServer;

    use super::*;
    use crate::config::{Api, GatewayConfig, Integration, Route, RouteMethod, Stage};
    use crate::snapshot::Snapshot;

    fn snapshot(throttle: ThrottleSettings, quota: Option<QuotaSettings>) -> Snapshot {
        let config = GatewayConfig {
            account_throttle: None,
            rate_limit_headers: false,
            access_log: false,
            apis: vec![Api {
                id: "a".into(),
                stages: vec![Stage {
                    name: "s".into(),
                    base_path: "/s".into(),
                    throttle: None,
                    method_throttle: BTreeMap::new(),
                }],
                routes: vec![Route {
                    path: "/x".into(),
                    method: RouteMethod::Only(Method::GET),
                    api_key_required: true,
                    integration: Integration::Mock {
                        status: http::StatusCode::OK,
                        body: "".into(),
                        headers: vec![],
                    },
                    cors: None,
                }],
            }],
        };
        let records = Records {
            plans: vec![UsagePlan {
                id: "p".into(),
                name: "p".into(),
                description: None,
                api_stages: vec![ApiStage {
                    api_id: "a".into(),
                    stage: "s".into(),
                    throttle: BTreeMap::new(),
                }],
                throttle: Some(throttle),
                quota,
            }],
            keys: vec![ApiKey {
                id: "k".into(),
                name: "k".into(),
                description: None,
                customer_id: None,
                enabled: true,
                value_hash: KeyHash::of("limiterTestValue0123456789"),
                created_date: 0,
                last_updated_date: 0,
                sealed_value: None,
            }],
            bindings: vec![("p".into(), "k".into())],
        };
        Snapshot::build(config, &records, &HashMap::new(), EpochDay(20_000)).unwrap()
    }

    async fn admitted(limiter: &RedisLimiter, snap: &Snapshot, n: usize) -> usize {
        let m = snap.route(&Method::GET, "/s/x").unwrap();
        let grant = &snap.grants()[0];
        let mut ok = 0;
        for _ in 0..n {
            let now = tollgate_core::Clock::now(&tollgate_core::SystemClock);
            if limiter.decide(grant, &m, "", now).await.unwrap().is_ok() {
                ok += 1;
            }
        }
        ok
    }

    #[tokio::test]
    async fn buckets_and_quotas_in_redis() {
        let redis = RedisServer::start();
        let urls = [redis.url()];
        let limiter = RedisLimiter::connect(
            &urls,
            false,
            Duration::from_millis(500),
            OnStoreFailure::Deny,
        )
        .await
        .unwrap();

        // A slow bucket of 3: three pass, the rest wait (the refill is one per 100 s).
        let snap = snapshot(
            ThrottleSettings {
                rate_limit: 0.01,
                burst_limit: 3,
            },
            None,
        );
        assert_eq!(admitted(&limiter, &snap, 10).await, 3);

        // A rate above a million per second keeps its bucket (it once rounded to zero and refused all).
        redis::cmd("FLUSHALL")
            .query::<()>(
                &mut redis::Client::open(redis.url())
                    .unwrap()
                    .get_connection()
                    .unwrap(),
            )
            .unwrap();
        let snap = snapshot(
            ThrottleSettings {
                rate_limit: 1e9,
                burst_limit: 1_000_000,
            },
            None,
        );
        assert_eq!(admitted(&limiter, &snap, 50).await, 50);

        // A quota of 5 a day. The count starts from the day's usage so far (53 requests above), so
        // start from a clean slate.
        redis::cmd("FLUSHALL")
            .query::<()>(
                &mut redis::Client::open(redis.url())
                    .unwrap()
                    .get_connection()
                    .unwrap(),
            )
            .unwrap();
        let quota = QuotaSettings {
            limit: 5,
            offset: 0,
            period: Period::Day,
        };
        let snap = snapshot(
            ThrottleSettings {
                rate_limit: 1e6,
                burst_limit: 1000,
            },
            Some(quota),
        );
        assert_eq!(admitted(&limiter, &snap, 8).await, 5);
        assert_eq!(
            limiter
                .set_remaining(
                    &snap.grants()[0],
                    2,
                    tollgate_core::Clock::now(&tollgate_core::SystemClock)
                )
                .await
                .unwrap(),
            Some(-2)
        );
        assert_eq!(admitted(&limiter, &snap, 8).await, 2);
        assert!(!limiter.degraded());
    }
}
