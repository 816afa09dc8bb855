//! Cluster mode's limiter: a key's throttle bucket, its quota and its per-day usage decided by one Lua
//! script in one round trip, on Redis's clock, so every instance enforces the same exact limits.
//!
//! All keys the script touches carry the API key's hash tag `{keyId}`, so it runs on Redis Cluster.
//! Times are microseconds (Lua numbers are doubles: exact up to 2^53).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::Script;
use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use tokio::sync::{mpsc, oneshot};
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

/// Shared by both scripts: a period's count rebuilt from the per-day usage and quota adjustments
/// hashes, for when the live count is for another period or missing, e.g. right after
/// `tollgate migrate`.
const COUNTED: &str = r"
local function counted(usage, adjustments, ws, day)
  local n = 0
  for d = ws, day do
    n = n + (tonumber(redis.call('HGET', usage, d)) or 0) + (tonumber(redis.call('HGET', adjustments, d)) or 0)
  end
  return n
end
";

/// Decides a batch of requests, four keys and seven arguments each, on one reading of Redis's clock;
/// answers one `{status, a, b, c}` per request, in order (whole numbers of microseconds, exact in
/// Lua's doubles and returned as integers). A key's state is read once and written
/// once per batch however many of its requests the batch holds: a hot key costs Lua arithmetic per
/// request, not Redis commands.
const LIMIT: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local day = math.floor(tonumber(t[1]) / 86400)
local tats, quotas, usage = {}, {}, {}
local function decide(K, A)
  local interval, tolerance = tonumber(ARGV[A + 2]), tonumber(ARGV[A + 3])
  local has_quota = ARGV[A + 4] == '1'
  local limit, ws, we = tonumber(ARGV[A + 5]), tonumber(ARGV[A + 6]), tonumber(ARGV[A + 7])
  if has_quota and (day < ws or day >= we) then return {3, day, 0, 0} end
  local tokens, ahead = -1, 0
  if ARGV[A + 1] == '1' then
    local tat = tats[KEYS[K + 1]] or tonumber(redis.call('GET', KEYS[K + 1]) or '0')
    if tat < now then tat = now end
    local new_tat = tat + interval
    ahead = new_tat - now
    if ahead > tolerance then return {1, ahead - tolerance, 0, 0} end
    tokens = math.floor((tolerance - ahead) / interval)
    -- Taken even if the quota refuses: hammering a spent quota is not free.
    tats[KEYS[K + 1]] = new_tat
  end
  local remaining = -1
  if has_quota then
    local q = quotas[KEYS[K + 2]]
    if not q then
      local h = redis.call('HMGET', KEYS[K + 2], 's', 'u')
      if tonumber(h[1]) == ws then
        q = {used = tonumber(h[2]) or 0, ws = ws, we = we, fresh = false}
      else
        q = {used = counted(KEYS[K + 3], KEYS[K + 4], ws, day), ws = ws, we = we, fresh = true}
      end
      quotas[KEYS[K + 2]] = q
    end
    if q.used >= limit then return {2, we, tokens, ahead} end
    q.used = q.used + 1
    q.dirty = true
    remaining = limit - q.used
  end
  usage[KEYS[K + 3]] = (usage[KEYS[K + 3]] or 0) + 1
  return {0, tokens, remaining, ahead}
end
local out = {}
for i = 0, #KEYS / 4 - 1 do out[i + 1] = decide(i * 4, i * 7) end
for key, tat in pairs(tats) do
  redis.call('SET', key, string.format('%.0f', tat), 'PX', math.ceil((tat - now) / 1000) + 1000)
end
for key, q in pairs(quotas) do
  if q.dirty then
    redis.call('HSET', key, 's', q.ws, 'u', q.used)
    -- The count outlives its period by two days; set once per period, not per request.
    if q.fresh then redis.call('EXPIREAT', key, (q.we + 2) * 86400) end
  end
end
for key, n in pairs(usage) do redis.call('HINCRBY', key, day, n) end
return out
";

const SET_REMAINING: &str = r"
local q = redis.call('HMGET', KEYS[2], 's', 'u')
local used = 0
if tonumber(q[1]) == tonumber(ARGV[1]) then used = tonumber(q[2]) or 0 else used = counted(KEYS[3], KEYS[4], tonumber(ARGV[1]), tonumber(ARGV[4])) end
redis.call('HSET', KEYS[2], 's', ARGV[1], 'u', ARGV[2])
redis.call('EXPIREAT', KEYS[2], (tonumber(ARGV[3]) + 2) * 86400)
return tonumber(ARGV[2]) - used
";

/// The most requests one script call decides.
const MAX_BATCH: usize = 256;

/// The script's answer for one request: status, then three status-dependent values.
type Verdict = (i64, i64, i64, i64);

/// One request waiting for the batcher: whose records the script reads, and its seven arguments.
struct Job {
    key_id: Box<str>,
    plan_id: Arc<str>,
    /// The per-method bucket's route, empty for the plan's bucket.
    method: String,
    args: [u64; 7],
    reply: oneshot::Sender<Result<Verdict, LimiterError>>,
}

/// A Lua script sent by its SHA1, and its source for when Redis has not cached it (a new or restarted
/// server, or a cluster node).
struct LuaScript {
    sha: String,
    source: String,
}

impl LuaScript {
    fn new(source: String) -> Self {
        Self {
            sha: Script::new(&source).get_hash().to_owned(),
            source,
        }
    }

    /// An `EVALSHA` of this script with `keys` keys; the caller appends the keys, then the arguments.
    fn call(&self, keys: usize) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&self.sha).arg(keys);
        cmd
    }

    /// Runs `call` (from [`LuaScript::call`]), caching the script and retrying once when Redis lacks it;
    /// every round trip bounded by `timeout`.
    async fn eval<T: redis::FromRedisValue>(
        &self,
        conn: &Conn,
        timeout: Duration,
        call: &redis::Cmd,
    ) -> redis::RedisResult<T> {
        let answer = query(conn, timeout, call).await;
        match answer {
            Err(e) if e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                let mut load = redis::cmd("SCRIPT");
                load.arg("LOAD").arg(&self.source);
                query::<String>(conn, timeout, &load).await?;
                query(conn, timeout, call).await
            }
            other => other,
        }
    }
}

/// Sends queued requests to Redis, many per script call: while one call is in flight the next
/// requests queue, so under load a round trip and a script run are shared by everything that arrived
/// meanwhile, and when idle a request goes alone at once. Redis Cluster runs a script on one slot, so
/// there a call carries one API key's requests (its records share the key's hash tag).
async fn batcher(conn: Conn, script: LuaScript, timeout: Duration, mut jobs: mpsc::Receiver<Job>) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // The first request's wake-up ran this task ahead of the other connections that are ready
        // now; let them queue theirs first, so the call carries them too.
        tokio::task::yield_now().await;
        while batch.len() < MAX_BATCH {
            match jobs.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        match &conn {
            Conn::Single(_) => run_batch(&conn, &script, timeout, &mut batch).await,
            Conn::Cluster(_) => {
                batch.sort_by(|a, b| a.key_id.cmp(&b.key_id));
                let mut groups = Vec::new();
                while let Some(last) = batch.last() {
                    let key_id = last.key_id.clone();
                    let at = batch.partition_point(|j| j.key_id < key_id);
                    groups.push(batch.split_off(at));
                }
                futures_util::future::join_all(
                    groups
                        .iter_mut()
                        .map(|group| run_batch(&conn, &script, timeout, group)),
                )
                .await;
            }
        }
        batch.clear();
    }
}

/// One script call for `batch`; every job gets its verdict or the call's error.
async fn run_batch(conn: &Conn, script: &LuaScript, timeout: Duration, batch: &mut Vec<Job>) {
    let mut scratch = String::new();
    let mut call = script.call(batch.len() * 4);
    for job in batch.iter() {
        keys::limiter_keys(&mut scratch, &job.key_id, &job.plan_id, &job.method, |k| {
            call.arg(k);
        });
    }
    for job in batch.iter() {
        for arg in job.args {
            call.arg(arg);
        }
    }
    let answer = script.eval::<Vec<Verdict>>(conn, timeout, &call).await;
    let answer = answer.map_err(|e| LimiterError::Redis(e.to_string()));
    match answer {
        Ok(verdicts) if verdicts.len() == batch.len() => {
            for (job, verdict) in batch.drain(..).zip(verdicts) {
                let _ = job.reply.send(Ok(verdict));
            }
        }
        Ok(verdicts) => {
            let err = format!("{} answers for {} requests", verdicts.len(), batch.len());
            for job in batch.drain(..) {
                let _ = job.reply.send(Err(LimiterError::Redis(err.clone())));
            }
        }
        Err(LimiterError::Redis(err)) => {
            for job in batch.drain(..) {
                let _ = job.reply.send(Err(LimiterError::Redis(err.clone())));
            }
        }
    }
}

/// Sends `cmd`, bounded by `timeout`.
async fn query<T: redis::FromRedisValue>(
    conn: &Conn,
    timeout: Duration,
    cmd: &redis::Cmd,
) -> redis::RedisResult<T> {
    let mut conn = conn.clone();
    within(timeout, async move {
        match &mut conn {
            Conn::Single(c) => cmd.query_async(c).await,
            Conn::Cluster(c) => cmd.query_async(c).await,
        }
    })
    .await
}

/// `call`'s answer, or a timeout error once `timeout` has passed.
async fn within<T>(
    timeout: Duration,
    call: impl Future<Output = redis::RedisResult<T>>,
) -> redis::RedisResult<T> {
    tokio::time::timeout(timeout, call)
        .await
        .unwrap_or_else(|_| {
            Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "no answer",
                format!("within {timeout:?}"),
            )))
        })
}

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
    /// Requests for the batcher task.
    jobs: mpsc::Sender<Job>,
    set_remaining: LuaScript,
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
        let (jobs, queue) = mpsc::channel(4 * MAX_BATCH);
        let script = LuaScript::new(format!("{COUNTED}{LIMIT}"));
        tokio::spawn(batcher(conn.clone(), script, timeout, queue));
        Ok(Self {
            conn,
            jobs,
            set_remaining: LuaScript::new(format!("{COUNTED}{SET_REMAINING}")),
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

    /// Decides a keyed request's own limits (its plan or per-method bucket, its quota) and counts it.
    /// `Err` means Redis could not be asked: the caller applies [`OnStoreFailure`].
    pub async fn decide(
        &self,
        grant: &Grant<'_>,
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
        grant: &Grant<'_>,
        m: &RouteMatch<'_>,
        method_key: &str,
        day: EpochDay,
        now: u64,
    ) -> Result<Decision, LimiterError> {
        let bucket = grant.bucket_for(m);
        let method = match bucket {
            Some(_) if grant.has_method_throttle(m) => method_key.to_owned(),
            _ => String::new(),
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
        let (reply, answer) = oneshot::channel();
        let job = Job {
            key_id: grant.key_id.into(),
            plan_id: grant.plan_id().clone(),
            method,
            args: [
                u64::from(bucket.is_some()),
                interval_us,
                tolerance_us,
                u64::from(quota.is_some()),
                quota.map_or(0, |q| u64::from(q.settings().limit)),
                window.map_or(0, |w| u64::from(w.start.0)),
                window.map_or(0, |w| u64::from(w.end.0)),
            ],
            reply,
        };
        let gone = || LimiterError::Redis("the limiter's batcher stopped".into());
        self.jobs.send(job).await.map_err(|_| gone())?;
        let (status, a, b, c) = answer.await.map_err(|_| gone())??;
        let num = |v: i64| u64::try_from(v).unwrap_or(0);
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
                throttle: throttle_info(num(a), num(c)),
                quota: quota_info(num(b)),
            }),
            1 => Err(Refusal::TooManyRequests {
                retry_after_secs: (num(a) * 1000).div_ceil(NANOS_PER_SEC).max(1),
                limits: LimitInfo {
                    throttle: throttle_info(0, num(a)),
                    quota: None,
                },
            }),
            2 => Err(Refusal::LimitExceeded {
                retry_after_secs: until_reset.max(1),
                limits: LimitInfo {
                    throttle: throttle_info(num(b), num(c)),
                    quota: quota_info(0),
                },
            }),
            _ => {
                return Ok(Decision::WrongDay(EpochDay(
                    u32::try_from(num(a)).unwrap_or(0),
                )));
            }
        }))
    }

    /// AWS UpdateUsage in cluster mode: sets the shared count so `remaining` are left in the current
    /// period; returns by how much the count changed.
    pub async fn set_remaining(
        &self,
        grant: &Grant<'_>,
        remaining: i64,
        now: u64,
    ) -> Result<Option<i64>, LimiterError> {
        let Some(quota) = grant.quota() else {
            return Ok(None);
        };
        let today = EpochDay::from_nanos(now);
        let window = QuotaWindow::containing(quota.settings(), today);
        let used = i64::from(quota.settings().limit) - remaining;
        let mut call = self.set_remaining.call(4);
        let mut scratch = String::new();
        keys::limiter_keys(&mut scratch, grant.key_id, grant.plan_id(), "", |k| {
            call.arg(k);
        });
        call.arg(window.start.0)
            .arg(used)
            .arg(window.end.0)
            .arg(today.0);
        self.set_remaining
            .eval::<i64>(&self.conn, self.timeout, &call)
            .await
            .map(Some)
            .map_err(|e| LimiterError::Redis(e.to_string()))
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
            max_request_body: crate::config::DEFAULT_MAX_REQUEST_BODY,
            kept_fields: Default::default(),
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
                    allow_get_body: false,
                }],
                allow_encoded_slashes: false,
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
            keys: ["k", "k2"]
                .into_iter()
                .map(|id| ApiKey {
                    id: id.into(),
                    name: id.into(),
                    description: None,
                    customer_id: None,
                    enabled: true,
                    value_hash: KeyHash::of(format!("limiterTestValue0123456789{id}")),
                    created_date: 0,
                    last_updated_date: 0,
                    sealed_value: None,
                })
                .collect(),
            bindings: vec![("p".into(), "k".into()), ("p".into(), "k2".into())],
        };
        Snapshot::build(
            config,
            &tollgate_store::KeyIndex::from(&records),
            &HashMap::new(),
            EpochDay(20_000),
        )
        .unwrap()
    }

    async fn admitted(limiter: &RedisLimiter, snap: &Snapshot, n: usize) -> usize {
        let m = snap.route(&Method::GET, "/s/x").unwrap();
        let grant = &snap.grant_of("p", "k").unwrap();
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
                    &snap.grant_of("p", "k").unwrap(),
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

    #[tokio::test]
    async fn concurrent_requests_share_script_calls_and_stay_exact() {
        let redis = RedisServer::start();
        let limiter = RedisLimiter::connect(
            &[redis.url()],
            false,
            Duration::from_secs(2),
            OnStoreFailure::Deny,
        )
        .await
        .unwrap();
        let quota = QuotaSettings {
            limit: 100,
            offset: 0,
            period: Period::Day,
        };
        let snap = snapshot(
            ThrottleSettings {
                rate_limit: 1e6,
                burst_limit: 100_000,
            },
            Some(quota),
        );
        let m = snap.route(&Method::GET, "/s/x").unwrap();
        let grant = &snap.grant_of("p", "k").unwrap();
        let now = tollgate_core::Clock::now(&tollgate_core::SystemClock);
        let decisions =
            futures_util::future::join_all((0..300).map(|_| limiter.decide(grant, &m, "", now)))
                .await;
        let admitted = decisions.iter().filter(|d| matches!(d, Ok(Ok(_)))).count();
        assert_eq!(admitted, 100, "the quota holds under concurrency");
        assert!(decisions.iter().all(Result::is_ok), "no call failed");

        let mut c = redis::Client::open(redis.url())
            .unwrap()
            .get_connection()
            .unwrap();
        let used: u64 = redis::cmd("HGET")
            .arg(keys::usage("k", "p"))
            .arg(EpochDay::from_nanos(now).0)
            .query(&mut c)
            .unwrap();
        assert_eq!(used, 100, "every admitted request is metered once");
        let stats: String = redis::cmd("INFO")
            .arg("commandstats")
            .query(&mut c)
            .unwrap();
        let calls: u64 = stats
            .lines()
            .filter(|l| l.starts_with("cmdstat_evalsha:") || l.starts_with("cmdstat_eval:"))
            .filter_map(|l| {
                l.split("calls=")
                    .nth(1)?
                    .split(',')
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .sum();
        assert!(
            (1..=10).contains(&calls),
            "300 requests took {calls} script calls"
        );

        // A burst of 50 (one token per 100 s) holds as exactly under concurrency.
        redis::cmd("FLUSHALL").query::<()>(&mut c).unwrap();
        let snap = snapshot(
            ThrottleSettings {
                rate_limit: 0.01,
                burst_limit: 50,
            },
            None,
        );
        let m = snap.route(&Method::GET, "/s/x").unwrap();
        let grants = [
            snap.grant_of("p", "k").unwrap(),
            snap.grant_of("p", "k2").unwrap(),
        ];
        // Two keys' requests interleaved in the same calls: each keeps its own bucket.
        let decisions = futures_util::future::join_all(
            (0..600).map(|i| limiter.decide(&grants[i % 2], &m, "", now)),
        )
        .await;
        let admitted = |key| {
            decisions
                .iter()
                .skip(key)
                .step_by(2)
                .filter(|d| matches!(d, Ok(Ok(_))))
                .count()
        };
        assert_eq!((admitted(0), admitted(1)), (50, 50));
    }
}
