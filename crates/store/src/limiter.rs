//! Cluster mode's shared limits: a key's throttle bucket, its quota and its per-day usage decided by
//! one Lua script (`lua/limit.lua`) in one round trip, on Redis's clock, so every instance enforces
//! the same exact limits. The script's answers are decoded into [`Verdict`]s here, at the boundary:
//! nothing above this module sees its status numbers.
//!
//! All keys the script touches carry the API key's hash tag `{keyId}`, so it runs on Redis Cluster.
//! Times are microseconds (Lua numbers are doubles: exact up to 2^53).

use std::future::Future;
use std::hash::BuildHasher as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::ConnectionManager;
use redis::cluster_async::ClusterConnection;
use redis::{IntoConnectionInfo as _, Script};
use std::sync::Arc;
use tokio::sync::{mpsc, oneshot};
use tollgate_core::gcra::Gcra;
use tollgate_core::quota::{EpochDay, QuotaWindow};

use tollgate_core::credits::Refill;
use tollgate_core::{Clock, QuotaSettings};

use crate::redis::keys;
use crate::{Holder, OnStoreFailure};

mod wire;
use wire::Wire;

const COUNTED: &str = include_str!("lua/counted.lua");
const LIMIT: &str = include_str!("lua/limit.lua");
const SET_REMAINING: &str = include_str!("lua/set_remaining.lua");

/// The most requests one script call decides.
const MAX_BATCH: usize = 256;
/// The most rounds of the runtime the batcher lets go by, while they bring more requests, before it
/// sends a call.
const GATHER_ROUNDS: usize = 8;
/// Rounds in a row that bring nothing, after which the batcher sends the call: one such round is
/// not yet a lull (see [`batcher`]).
const IDLE_ROUNDS: usize = 2;
// A record's count of identical requests is 2 bytes.
const _: () = assert!(MAX_BATCH <= u16::MAX as usize);

/// The numbers the script reads of one request, after its flags and its names' places in `KEYS`
/// (`RECORD` in `lua/limit.lua`): interval, tolerance, limit, window start and end, cost, and the
/// credits' refill amount, period start and end (0 without credits).
const NUMBERS: usize = 9;
/// A record in the script's second argument: how many requests in a row it stands for (2 bytes),
/// their flags (1 byte, [`Job::flags`]), the places in `KEYS` of their limits' first name and of
/// their credits' name (4 bytes each, 1-based, 0 for none), then the [`NUMBERS`] (8 bytes each), all
/// little-endian. One binary argument for the whole batch, instead of ten decimal ones a request
/// that Redis would parse one by one and Lua convert with `tonumber`; a busy key's requests on one
/// route (the same record again and again) are one record, which Lua reads once.
const RECORD_BYTES: usize = 2 + 1 + 4 + 4 + 8 * NUMBERS;
/// A run of answers in the script's reply (`RUN` in `lua/limit.lua`): how many requests in a row it
/// answers (2 bytes), their status (1 byte), the first one's four numbers and by how much each steps
/// from one request to the next (8 bytes each, signed), all little-endian.
const RUN_BYTES: usize = 2 + 1 + 8 * 8;

/// One request's own limits, as the script is asked about them.
#[derive(Debug, Clone, Copy)]
pub struct KeyCall<'a> {
    /// Whose bucket, quota and usage the script keeps: the API key's, or its customer's in a plan
    /// that shares limits by customer (the hash tag of everything the script keeps for it).
    pub holder: Holder<'a>,
    /// The usage plan's id (shared: the request path does not copy it).
    pub plan_id: &'a Arc<str>,
    /// The per-method bucket's name (`api:stage:METHOD /path`), empty for the plan's bucket.
    pub method: &'a str,
    /// The bucket that limits the request, if any.
    pub throttle: Option<&'a Gcra>,
    /// The plan's quota, if any.
    pub quota: Option<&'a QuotaSettings>,
    /// What the request spends of the quota, the credits and the day's usage (its route's `cost`).
    pub cost: u32,
    /// The API key's credits, when it holds some.
    pub credits: Option<CreditCall<'a>>,
}

/// The credits a request spends.
#[derive(Debug, Clone, Copy)]
pub struct CreditCall<'a> {
    /// The API key's id (their hash tag).
    pub key_id: &'a str,
    /// Their refill.
    pub refill: Option<&'a Refill>,
    /// Spend the credits of plans in shadow, apart from the balance.
    pub shadow: bool,
}

/// The script's verdict on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Admitted, and counted in the quota, the credits and the day's usage.
    Admitted {
        /// Tokens left in the bucket (0 without a throttle).
        tokens: u64,
        /// Requests left in the quota period (0 without a quota).
        quota_left: u64,
        /// Microseconds until the bucket is full again.
        until_full_us: u64,
        /// Credits left, when the key holds some.
        credits_left: Option<u64>,
    },
    /// The bucket is empty: nothing taken or counted.
    Throttled {
        /// Microseconds until a token frees up.
        wait_us: u64,
    },
    /// The quota period's requests are spent. The bucket's token stays taken: hammering a spent
    /// quota is not free.
    QuotaSpent {
        /// Tokens left in the bucket (0 without a throttle).
        tokens: u64,
        /// Microseconds until the bucket is full again.
        until_full_us: u64,
    },
    /// The key's credits are fewer than the cost: nothing spent of them or of the quota (the
    /// bucket's token stays taken, as for a spent quota).
    CreditsExhausted {
        /// Tokens left in the bucket (0 without a throttle).
        tokens: u64,
        /// Microseconds until the bucket is full again.
        until_full_us: u64,
        /// Requests left in the quota period (0 without a quota).
        quota_left: u64,
        /// The balance.
        credits_left: u64,
    },
}

/// A verdict and the quota window it was reached in (Redis's day decides which, around midnight).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decided {
    /// What the script decided.
    pub verdict: Verdict,
    /// The quota period the request was counted in or refused by.
    pub window: Option<QuotaWindow>,
}

/// The script's raw answer for one request: status, three status-dependent values, the credits.
type Raw = (i64, i64, i64, i64, i64);

/// What the script answered about one request, before the day was checked.
enum Answer {
    Decided(Verdict),
    /// The quota window sent is not the one containing the script's day.
    OtherDay(EpochDay),
}

impl Answer {
    /// How many answers one run of [`RUN_BYTES`] stands for.
    fn run_len(bytes: &[u8]) -> usize {
        usize::from(u16::from_le_bytes([bytes[0], bytes[1]]))
    }

    /// The answers one run of [`RUN_BYTES`] stands for, as the script packed it: the `k`th of them.
    fn run(bytes: &[u8]) -> impl Fn(usize) -> Raw {
        let status = i64::from(bytes[2]);
        let at = |i: usize| {
            let mut n = [0; 8];
            n.copy_from_slice(&bytes[3 + i * 8..11 + i * 8]);
            i64::from_le_bytes(n)
        };
        let (first, step) = ([at(0), at(1), at(2), at(3)], [at(4), at(5), at(6), at(7)]);
        // Wrapping: what Redis sent cannot make the data plane panic (a run that overflows is a
        // broken script, and its numbers are as good as any).
        move |k: usize| {
            let v = |i: usize| first[i].wrapping_add(step[i].wrapping_mul(k as i64));
            (status, v(0), v(1), v(2), v(3))
        }
    }

    /// The one place that knows the script's status numbers (`lua/limit.lua` lists them).
    fn decode((status, a, b, c, credits): Raw) -> Result<Self, LimiterError> {
        let num = |v: i64| u64::try_from(v).unwrap_or(0);
        Ok(match status {
            0 => Self::Decided(Verdict::Admitted {
                tokens: num(a),
                quota_left: num(b),
                until_full_us: num(c),
                credits_left: u64::try_from(credits).ok(),
            }),
            1 => Self::Decided(Verdict::Throttled { wait_us: num(a) }),
            2 => Self::Decided(Verdict::QuotaSpent {
                tokens: num(a),
                until_full_us: num(b),
            }),
            3 => Self::OtherDay(EpochDay(u32::try_from(num(a)).unwrap_or(0))),
            4 => Self::Decided(Verdict::CreditsExhausted {
                tokens: num(a),
                until_full_us: num(b),
                quota_left: num(c),
                credits_left: num(credits),
            }),
            other => {
                return Err(LimiterError::Redis(format!(
                    "the limiter script answered status {other}"
                )));
            }
        })
    }
}

/// A flag of [`Job::flags`]: the request has a throttle.
const THROTTLE: u8 = 1;
/// A flag of [`Job::flags`]: the request has a quota.
const QUOTA: u8 = 2;
/// A flag of [`Job::flags`]: it spends the credits of a plan in shadow.
const SHADOW_CREDITS: u8 = 4;
/// A flag of [`Job::flags`]: its bucket is the plan's, in a plan with a quota, so the script keeps it
/// in the quota's hash (read and written with the count: two commands fewer a key and call).
const BUCKET_IN_QUOTA: u8 = 8;

/// One request waiting for the batcher: whose records the script reads, and its arguments.
struct Job {
    /// The holder's id, and whether it is a customer's.
    holder: (bool, Box<str>),
    plan_id: Arc<str>,
    method: Box<str>,
    /// The API key whose credits the request spends, if any.
    credits: Option<Box<str>>,
    /// Flags: [`THROTTLE`], [`QUOTA`], [`SHADOW_CREDITS`], [`BUCKET_IN_QUOTA`].
    flags: u8,
    numbers: [u64; NUMBERS],
    reply: oneshot::Sender<Result<Raw, LimiterError>>,
}

impl Job {
    fn holder(&self) -> Holder<'_> {
        match &self.holder {
            (false, id) => Holder::Key(id),
            (true, id) => Holder::Customer(id),
        }
    }

    /// Whether `self` and `other` touch the same bucket, quota and usage, kept alike.
    fn same_limits(&self, other: &Job) -> bool {
        self.holder == other.holder
            && self.plan_id == other.plan_id
            && self.method == other.method
            && self.bucket_apart() == other.bucket_apart()
    }

    /// The name of the bucket the script keeps apart from the quota (see [`keys::limiter_keys`]).
    fn bucket_apart(&self) -> Option<&str> {
        (self.flags & (THROTTLE | BUCKET_IN_QUOTA) == THROTTLE).then_some(&*self.method)
    }

    /// `call`'s flags and numbers for the quota (and refill) period containing `day`, and the quota
    /// window.
    fn numbers_for(call: &KeyCall<'_>, day: EpochDay) -> (u8, [u64; NUMBERS], Option<QuotaWindow>) {
        // Microseconds for Lua's doubles; rates above 1M/s round to one token per microsecond, the
        // bucket's size stays exact.
        let (interval_us, tolerance_us) = call.throttle.map_or((0, 0), |g| {
            (
                (g.interval() / 1000).max(1),
                g.interval().saturating_mul(g.burst()) / 1000,
            )
        });
        let window = call.quota.map(|q| QuotaWindow::containing(q, day));
        let refill = call.credits.and_then(|c| c.refill);
        let refilled = refill.map(|r| r.window(day));
        let flag = |on: bool, flag: u8| if on { flag } else { 0 };
        let flags = flag(call.throttle.is_some(), THROTTLE)
            | flag(call.quota.is_some(), QUOTA)
            | flag(call.credits.is_some_and(|c| c.shadow), SHADOW_CREDITS)
            | flag(
                call.throttle.is_some() && call.quota.is_some() && call.method.is_empty(),
                BUCKET_IN_QUOTA,
            );
        let numbers = [
            interval_us,
            tolerance_us,
            call.quota.map_or(0, |q| u64::from(q.limit)),
            window.map_or(0, |w| u64::from(w.start.0)),
            window.map_or(0, |w| u64::from(w.end.0)),
            u64::from(call.cost),
            refill.map_or(0, |r| r.amount),
            refilled.map_or(0, |w| u64::from(w.start.0)),
            refilled.map_or(0, |w| u64::from(w.end.0)),
        ];
        (flags, numbers, window)
    }
}

/// A group of names in `KEYS` a batch shares: one holder's limits under one plan and bucket (three
/// names, or four with a bucket kept apart), or one API key's credits (one).
#[derive(Clone, Copy)]
struct Named {
    /// The first job that named it.
    job: usize,
    credits: bool,
    /// Its first name's place in `KEYS`, 1-based as Lua counts.
    at: u32,
}

/// Encodes a batch for the script, in buffers kept from batch to batch: a key the batch asks about
/// many times (a busy partner) is named once in `KEYS`, and each request's record points at its
/// names, so Redis parses and Lua looks up each name once a batch.
#[derive(Default)]
struct Encoder {
    /// The groups named so far in this batch, found by their hash.
    named: hashbrown::HashTable<Named>,
    /// The groups in `KEYS` order.
    order: Vec<Named>,
    /// The records ([`RECORD_BYTES`] each).
    records: Vec<u8>,
    /// The name being written.
    scratch: String,
}

impl Encoder {
    /// Writes the script call for `batch` on the clock `clock_us` to `call`.
    fn encode(&mut self, script: &LuaScript, clock_us: u64, batch: &[Job], call: &mut impl Call) {
        let hasher = foldhash::fast::FixedState::default();
        self.named.clear();
        self.order.clear();
        self.records.clear();
        self.records.reserve(batch.len() * RECORD_BYTES);
        let mut names = 0u32;
        // Where the last record starts, and how many requests it stands for.
        let mut last: Option<(usize, u16)> = None;
        for (i, job) in batch.iter().enumerate() {
            let mut place = |credits: bool, hash: u64, width: u32| {
                let same = |n: &Named| {
                    n.credits == credits
                        && if credits {
                            batch[n.job].credits == job.credits
                        } else {
                            batch[n.job].same_limits(job)
                        }
                };
                if let Some(n) = self.named.find(hash, same) {
                    return n.at;
                }
                let named = Named {
                    job: i,
                    credits,
                    at: names + 1,
                };
                names += width;
                self.order.push(named);
                let rehash = |n: &Named| group_hash(&hasher, &batch[n.job], n.credits);
                self.named.insert_unique(hash, named, rehash);
                named.at
            };
            let width = 3 + u32::from(job.bucket_apart().is_some());
            let limits = place(false, group_hash(&hasher, job, false), width);
            let credits = match job.credits {
                Some(_) => place(true, group_hash(&hasher, job, true), 1),
                None => 0,
            };
            let start = self.records.len();
            self.records.extend_from_slice(&1u16.to_le_bytes());
            self.records.push(job.flags);
            self.records.extend_from_slice(&limits.to_le_bytes());
            self.records.extend_from_slice(&credits.to_le_bytes());
            for n in job.numbers {
                self.records.extend_from_slice(&n.to_le_bytes());
            }
            match last {
                Some((at, count)) if self.records[at + 2..start] == self.records[start + 2..] => {
                    self.records.truncate(start);
                    let count = count + 1;
                    self.records[at..at + 2].copy_from_slice(&count.to_le_bytes());
                    last = Some((at, count));
                }
                _ => last = Some((start, 1)),
            }
        }
        call.evalsha(&script.sha, names as usize, 2);
        for n in &self.order {
            let job = &batch[n.job];
            match (&job.credits, n.credits) {
                (Some(key_id), true) => call.arg(keys::credits(key_id).as_bytes()),
                _ => keys::limiter_keys(
                    &mut self.scratch,
                    job.holder(),
                    &job.plan_id,
                    job.bucket_apart(),
                    |k| call.arg(k.as_bytes()),
                ),
            }
        }
        call.arg(itoa::Buffer::new().format(clock_us).as_bytes());
        call.arg(&self.records);
    }
}

/// Where [`Encoder::encode`] writes a script call: a `redis::Cmd` (on Redis Cluster), or the RESP
/// bytes of the batcher's own connection.
trait Call {
    /// Starts over with `EVALSHA sha` of `keys` names, which `args` more arguments follow.
    fn evalsha(&mut self, sha: &str, keys: usize, args: usize);
    fn arg(&mut self, arg: &[u8]);
}

impl Call for redis::Cmd {
    fn evalsha(&mut self, sha: &str, keys: usize, _: usize) {
        self.clear();
        self.arg("EVALSHA").arg(sha).arg(keys);
    }

    fn arg(&mut self, arg: &[u8]) {
        redis::Cmd::arg(self, arg);
    }
}

impl Call for Vec<u8> {
    fn evalsha(&mut self, sha: &str, keys: usize, args: usize) {
        self.clear();
        wire::array(self, 3 + keys + args);
        wire::bulk(self, b"EVALSHA");
        wire::bulk(self, sha.as_bytes());
        wire::bulk(self, itoa::Buffer::new().format(keys).as_bytes());
    }

    fn arg(&mut self, arg: &[u8]) {
        wire::bulk(self, arg);
    }
}

/// The hash of `job`'s limits, or of its credits, in [`Encoder::named`].
fn group_hash(hasher: &foldhash::fast::FixedState, job: &Job, credits: bool) -> u64 {
    match (&job.credits, credits) {
        (Some(id), true) => hasher.hash_one(&**id),
        _ => hasher.hash_one((&job.holder, &*job.plan_id, &*job.method)),
    }
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

/// How the batcher reaches Redis.
enum Route {
    /// One server, on the batcher's own connection.
    Single(Box<Wire>),
    /// Redis Cluster, through the `redis` crate's client (which follows the slots).
    Cluster(Conn),
}

/// Sends queued requests to Redis, many per script call: while one call is in flight the next
/// requests queue, so under load a round trip and a script run are shared by everything that arrived
/// meanwhile, and when idle a request goes alone at once. Redis Cluster runs a script on one slot, so
/// there a call carries one API key's requests (its records share the key's hash tag).
async fn batcher(
    mut route: Route,
    script: LuaScript,
    timeout: Duration,
    clock: Option<Arc<dyn Clock>>,
    mut jobs: mpsc::Receiver<Job>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    let mut encoder = Encoder::default();
    while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
        // The first request's wake-up ran this task ahead of the other connections that are ready
        // now; let them queue theirs first, so the call carries them too. A yield is a round: the
        // runtime polls its sockets and runs what they woke before this task. Under load a round
        // that brings no request is often one whose work (answers written to clients, forwards)
        // brings the clients' next requests a round later, so the call waits for two such rounds in
        // a row, eight rounds at most: in `bench/run.sh` a call then decides ~22 requests instead of
        // ~14 (one empty round), and the gateway serves 69-71k requests a second instead of 62k. An
        // idle request goes after two rounds of polling, microseconds.
        let mut idle = 0;
        for _ in 0..GATHER_ROUNDS {
            tokio::task::yield_now().await;
            let before = batch.len();
            while batch.len() < MAX_BATCH {
                match jobs.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
            idle = if batch.len() == before { idle + 1 } else { 0 };
            if idle == IDLE_ROUNDS || batch.len() == MAX_BATCH {
                break;
            }
        }
        // Microseconds since the epoch, or 0 for Redis's own clock.
        let clock_us = clock.as_ref().map_or(0, |c| c.now() / 1000);
        match &mut route {
            Route::Single(wire) => {
                encoder.encode(&script, clock_us, &batch, &mut wire.out);
                let answers = eval_on_wire(wire, &script, timeout).await;
                answer(&mut batch, answers);
            }
            Route::Cluster(conn) => {
                batch.sort_by(|a, b| a.holder.cmp(&b.holder));
                let mut groups = Vec::new();
                while let Some(last) = batch.last() {
                    let holder = last.holder.clone();
                    let at = batch.partition_point(|j| j.holder < holder);
                    groups.push(batch.split_off(at));
                }
                let calls: Vec<redis::Cmd> = groups
                    .iter()
                    .map(|group| {
                        let mut call = redis::Cmd::new();
                        encoder.encode(&script, clock_us, group, &mut call);
                        call
                    })
                    .collect();
                futures_util::future::join_all(groups.iter_mut().zip(&calls).map(
                    |(group, call)| async {
                        let answers = script.eval::<Vec<u8>>(conn, timeout, call).await;
                        answer(group, answers.as_deref().map_err(|e| e.to_string()));
                    },
                ))
                .await;
            }
        }
        batch.clear();
    }
}

/// Sends the script call in `wire`'s buffer; loads the script and sends it again when Redis lacks
/// it (a new or restarted server). Answers the reply's bytes, or why there are none.
async fn eval_on_wire<'w>(
    wire: &'w mut Wire,
    script: &LuaScript,
    timeout: Duration,
) -> Result<&'w [u8], String> {
    match wire.call(timeout).await.map_err(|e| e.to_string())? {
        Err(e) if e.starts_with("NOSCRIPT") => {
            let call = std::mem::take(&mut wire.out);
            wire::command(
                &mut wire.out,
                &[b"SCRIPT", b"LOAD", script.source.as_bytes()],
            );
            let loaded = wire.call(timeout).await;
            wire.out = call;
            loaded.map_err(|e| e.to_string())??;
            wire.call(timeout).await.map_err(|e| e.to_string())??;
        }
        answered => answered?,
    }
    Ok(wire.reply())
}

/// Gives every job of `batch` its answer from `runs` (the script's reply), or the call's error.
fn answer(batch: &mut Vec<Job>, runs: Result<&[u8], String>) {
    let answered =
        |runs: &[u8]| -> usize { runs.chunks_exact(RUN_BYTES).map(Answer::run_len).sum() };
    let err = match runs {
        Ok(runs) if runs.len() % RUN_BYTES == 0 && answered(runs) == batch.len() => {
            let mut jobs = batch.drain(..);
            for run in runs.chunks_exact(RUN_BYTES) {
                let nth = Answer::run(run);
                for (k, job) in jobs.by_ref().take(Answer::run_len(run)).enumerate() {
                    let _ = job.reply.send(Ok(nth(k)));
                }
            }
            return;
        }
        Ok(runs) => format!(
            "{} bytes of answers for {} requests",
            runs.len(),
            batch.len()
        ),
        Err(e) => e,
    };
    for job in batch.drain(..) {
        let _ = job.reply.send(Err(LimiterError::Redis(err.clone())));
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

/// The shared limiter of one instance.
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
    /// A limiter on `urls` (seed nodes when `cluster`), every call bounded by `timeout`, deciding on
    /// Redis's clock.
    pub async fn connect(
        urls: &[String],
        cluster: bool,
        timeout: Duration,
        on_failure: OnStoreFailure,
    ) -> Result<Self, LimiterError> {
        Self::connect_with_clock(urls, cluster, timeout, on_failure, None).await
    }

    /// [`RedisLimiter::connect`], with the script reading `clock` instead of Redis's: for tests that
    /// replay requests at chosen instants.
    async fn connect_with_clock(
        urls: &[String],
        cluster: bool,
        timeout: Duration,
        on_failure: OnStoreFailure,
        clock: Option<Arc<dyn Clock>>,
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
        let route = match &conn {
            Conn::Single(_) => {
                let url = urls.first().map_or("", String::as_str);
                Route::Single(Box::new(Wire::new(
                    url.into_connection_info().map_err(err)?,
                )))
            }
            Conn::Cluster(_) => Route::Cluster(conn.clone()),
        };
        let (jobs, queue) = mpsc::channel(4 * MAX_BATCH);
        let script = LuaScript::new(format!("{COUNTED}{LIMIT}"));
        tokio::spawn(batcher(route, script, timeout, clock, queue));
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

    /// Decides a keyed request's own limits (its bucket, its quota) and counts it when admitted.
    /// `now` (this instance's clock) picks the quota window and times the backoff after a failure;
    /// the bucket runs on Redis's clock. `Err` means Redis could not be asked: the caller applies
    /// [`OnStoreFailure`].
    pub async fn decide(&self, call: &KeyCall<'_>, now: u64) -> Result<Decided, LimiterError> {
        // One script runs on one Redis Cluster slot: a customer's limits and a key's credits are in
        // two.
        if matches!(self.conn, Conn::Cluster(_))
            && matches!(call.holder, Holder::Customer(_))
            && call.credits.is_some()
        {
            return Err(LimiterError::Redis(
                "on Redis Cluster a key's credits cannot be spent with its customer's shared limits"
                    .into(),
            ));
        }
        if now < self.skip_until.load(Ordering::Relaxed) {
            return Err(LimiterError::Redis("backing off after a failure".into()));
        }
        let result = match self.decide_on(call, EpochDay::from_nanos(now)).await {
            // Our clock and Redis's disagree about the day (around midnight): use Redis's day.
            Ok(Err(day)) => self.decide_on(call, day).await,
            other => other,
        };
        match result {
            Ok(Ok(decided)) => {
                self.mark(true, now, "");
                Ok(decided)
            }
            Ok(Err(_)) => Err(LimiterError::Redis(
                "redis and this instance disagree about the date".into(),
            )),
            Err(e) => {
                self.mark(false, now, &e.to_string());
                Err(e)
            }
        }
    }

    /// One ask with the quota window containing `day`; `Ok(Err(day))` when the script's day differs.
    async fn decide_on(
        &self,
        call: &KeyCall<'_>,
        day: EpochDay,
    ) -> Result<Result<Decided, EpochDay>, LimiterError> {
        let (flags, numbers, window) = Job::numbers_for(call, day);
        let (reply, answer) = oneshot::channel();
        let job = Job {
            holder: match call.holder {
                Holder::Key(id) => (false, id.into()),
                Holder::Customer(id) => (true, id.into()),
            },
            plan_id: call.plan_id.clone(),
            method: call.method.into(),
            credits: call.credits.map(|c| c.key_id.into()),
            flags,
            numbers,
            reply,
        };
        let gone = || LimiterError::Redis("the limiter's batcher stopped".into());
        self.jobs.send(job).await.map_err(|_| gone())?;
        let raw = answer.await.map_err(|_| gone())??;
        Ok(match Answer::decode(raw)? {
            Answer::Decided(verdict) => Ok(Decided { verdict, window }),
            Answer::OtherDay(day) => Err(day),
        })
    }

    /// AWS UpdateUsage in cluster mode: sets the shared count of `holder` (a key, or the customer
    /// whose keys share it) under `plan_id` (whose quota is `quota`) so `remaining` are left in the
    /// period containing `now`; returns by how much the count changed.
    pub async fn set_remaining(
        &self,
        holder: Holder<'_>,
        plan_id: &str,
        quota: &QuotaSettings,
        remaining: i64,
        now: u64,
    ) -> Result<i64, LimiterError> {
        let today = EpochDay::from_nanos(now);
        let window = QuotaWindow::containing(quota, today);
        let used = i64::from(quota.limit) - remaining;
        let mut call = self.set_remaining.call(3);
        let mut scratch = String::new();
        keys::limiter_keys(&mut scratch, holder, plan_id, None, |k| {
            call.arg(k);
        });
        call.arg(window.start.0)
            .arg(used)
            .arg(window.end.0)
            .arg(today.0);
        self.set_remaining
            .eval::<i64>(&self.conn, self.timeout, &call)
            .await
            .map_err(|e| LimiterError::Redis(e.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use crate::Store as _;
    use tollgate_core::clock::{ManualClock, NANOS_PER_SEC};
    use tollgate_core::credits::{CreditDecision, Credits};
    use tollgate_core::gcra::{GcraState, ThrottleDecision};
    use tollgate_core::quota::{Period, Quota, QuotaCount, QuotaDecision};
    use tollgate_core::{SystemClock, ThrottleSettings};

    use super::*;
    use crate::testing::RedisServer;

    static PLAN: std::sync::LazyLock<Arc<str>> = std::sync::LazyLock::new(|| "p".into());

    fn gcra(rate_limit: f64, burst_limit: u32) -> Gcra {
        Gcra::new(ThrottleSettings {
            rate_limit,
            burst_limit,
        })
    }

    fn day_quota(limit: u32) -> QuotaSettings {
        QuotaSettings {
            limit,
            offset: 0,
            period: Period::Day,
        }
    }

    fn call<'a>(
        key_id: &'a str,
        throttle: &'a Gcra,
        quota: Option<&'a QuotaSettings>,
    ) -> KeyCall<'a> {
        KeyCall {
            holder: Holder::Key(key_id),
            plan_id: &PLAN,
            method: "",
            throttle: Some(throttle),
            quota,
            cost: 1,
            credits: None,
        }
    }

    fn admitted(d: &Result<Decided, LimiterError>) -> bool {
        matches!(
            d,
            Ok(Decided {
                verdict: Verdict::Admitted { .. },
                ..
            })
        )
    }

    async fn count_admitted(limiter: &RedisLimiter, call: &KeyCall<'_>, n: usize) -> usize {
        let mut ok = 0;
        for _ in 0..n {
            ok += usize::from(admitted(&limiter.decide(call, SystemClock.now()).await));
        }
        ok
    }

    fn flush_all(redis: &RedisServer) {
        let mut c = redis::Client::open(redis.url())
            .unwrap()
            .get_connection()
            .unwrap();
        redis::cmd("FLUSHALL").query::<()>(&mut c).unwrap();
    }

    #[tokio::test]
    async fn buckets_and_quotas_in_redis() {
        let redis = RedisServer::start();
        let limiter = RedisLimiter::connect(
            &[redis.url()],
            false,
            Duration::from_millis(500),
            OnStoreFailure::Deny,
        )
        .await
        .unwrap();

        // A slow bucket of 3: three pass, the rest wait (the refill is one per 100 s).
        let slow = gcra(0.01, 3);
        assert_eq!(
            count_admitted(&limiter, &call("k", &slow, None), 10).await,
            3
        );

        // A rate above a million per second keeps its bucket (it once rounded to zero and refused all).
        flush_all(&redis);
        let fast = gcra(1e9, 1_000_000);
        assert_eq!(
            count_admitted(&limiter, &call("k", &fast, None), 50).await,
            50
        );

        // A quota of 5 a day, from a clean slate (the count starts from the day's usage so far).
        flush_all(&redis);
        let quota = day_quota(5);
        let roomy = gcra(1e6, 1000);
        let limited = call("k", &roomy, Some(&quota));
        assert_eq!(count_admitted(&limiter, &limited, 8).await, 5);
        let changed = limiter
            .set_remaining(Holder::Key("k"), "p", &quota, 2, SystemClock.now())
            .await
            .unwrap();
        assert_eq!(changed, -2);
        assert_eq!(count_admitted(&limiter, &limited, 8).await, 2);
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
        let quota = day_quota(100);
        let roomy = gcra(1e6, 100_000);
        let limited = call("k", &roomy, Some(&quota));
        let now = SystemClock.now();
        let decisions =
            futures_util::future::join_all((0..300).map(|_| limiter.decide(&limited, now))).await;
        assert_eq!(
            decisions.iter().filter(|d| admitted(d)).count(),
            100,
            "the quota holds under concurrency"
        );
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
        let calls = script_calls(&mut c);
        assert!(
            (1..=10).contains(&calls),
            "300 requests took {calls} script calls"
        );

        // A burst of 50 (one token per 100 s) holds as exactly under concurrency, for two keys whose
        // requests are interleaved in the same calls: each keeps its own bucket.
        redis::cmd("FLUSHALL").query::<()>(&mut c).unwrap();
        let slow = gcra(0.01, 50);
        let calls = [call("k", &slow, None), call("k2", &slow, None)];
        let decisions =
            futures_util::future::join_all((0..600).map(|i| limiter.decide(&calls[i % 2], now)))
                .await;
        let admitted_of = |key| {
            decisions
                .iter()
                .skip(key)
                .step_by(2)
                .filter(|d| admitted(d))
                .count()
        };
        assert_eq!((admitted_of(0), admitted_of(1)), (50, 50));

        // A key's plan bucket and a per-method bucket of the same plan in the same calls: two
        // buckets of 50, one quota of 70 (whose names the call holds under each bucket).
        redis::cmd("FLUSHALL").query::<()>(&mut c).unwrap();
        let quota = day_quota(70);
        let plan = call("k", &slow, Some(&quota));
        let per_method = KeyCall {
            method: "api:prod:GET /x",
            ..plan
        };
        let calls = [plan, per_method];
        let decisions =
            futures_util::future::join_all((0..200).map(|i| limiter.decide(&calls[i % 2], now)))
                .await;
        let count = |f: fn(&Verdict) -> bool| {
            decisions
                .iter()
                .filter(|d| d.as_ref().is_ok_and(|d| f(&d.verdict)))
                .count()
        };
        assert_eq!(
            (
                count(|v| matches!(v, Verdict::Admitted { .. })),
                count(|v| matches!(v, Verdict::QuotaSpent { .. })),
                count(|v| matches!(v, Verdict::Throttled { .. })),
            ),
            (70, 30, 100),
            "the quota is shared, each bucket is its own"
        );
    }

    /// A run as the script packs it: `count` answers of `status`, from `first`, by `step`.
    fn run(count: u16, status: u8, first: [i64; 4], step: [i64; 4]) -> Vec<u8> {
        let mut run = count.to_le_bytes().to_vec();
        run.push(status);
        for n in first.into_iter().chain(step) {
            run.extend_from_slice(&n.to_le_bytes());
        }
        assert_eq!(run.len(), RUN_BYTES);
        run
    }

    /// The answers `reply` gives a batch of `n` requests: each one's raw answer, or `None` for an
    /// error.
    fn answered(n: usize, reply: &[u8]) -> Vec<Option<Raw>> {
        let (mut batch, mut answers) = (Vec::new(), Vec::new());
        for _ in 0..n {
            let (reply, answer) = oneshot::channel();
            batch.push(Job {
                holder: (false, "k".into()),
                plan_id: Arc::from("p"),
                method: "".into(),
                credits: None,
                flags: THROTTLE,
                numbers: [0; NUMBERS],
                reply,
            });
            answers.push(answer);
        }
        answer(&mut batch, Ok(reply));
        assert!(batch.is_empty(), "every request answered");
        answers
            .into_iter()
            .map(|mut a| a.try_recv().ok().and_then(Result::ok))
            .collect()
    }

    #[test]
    fn runs_expand_to_one_answer_a_request_and_a_reply_that_does_not_fit_fails_them_all() {
        // Three admitted (tokens 9, 8, 7; until full 10, 20, 30 µs), then two throttled alike.
        let reply = [
            run(3, 0, [9, -1, 10, -1], [-1, 0, 10, 0]),
            run(2, 1, [500, 0, 0, -1], [0; 4]),
        ]
        .concat();
        assert_eq!(
            answered(5, &reply),
            vec![
                Some((0, 9, -1, 10, -1)),
                Some((0, 8, -1, 20, -1)),
                Some((0, 7, -1, 30, -1)),
                Some((1, 500, 0, 0, -1)),
                Some((1, 500, 0, 0, -1)),
            ]
        );
        // Runs that answer more or fewer requests than were asked, or a run cut short: every
        // request gets the error, none another's answer.
        for (n, reply) in [(6, &reply[..]), (4, &reply), (5, &reply[..reply.len() - 1])] {
            assert_eq!(answered(n, reply), vec![None; n], "{n} requests");
        }
        // An empty run answers nothing; steps that overflow wrap rather than panic.
        let empty_first = [run(0, 0, [0; 4], [0; 4]), run(1, 0, [1; 4], [0; 4])].concat();
        assert_eq!(answered(1, &empty_first), vec![Some((0, 1, 1, 1, 1))]);
        let overflowing = run(u16::MAX, 0, [i64::MAX; 4], [i64::MAX; 4]);
        let got = answered(usize::from(u16::MAX), &overflowing);
        assert!(got.iter().all(Option::is_some));
    }

    /// Script calls Redis has run since its statistics were last reset.
    fn script_calls(c: &mut redis::Connection) -> u64 {
        let stats: String = redis::cmd("INFO").arg("commandstats").query(c).unwrap();
        stats
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
            .sum()
    }

    /// Under load, requests keep arriving while the batcher gathers a call: those the next few
    /// rounds of the runtime's I/O polling wake still ride on it.
    #[tokio::test]
    async fn requests_arriving_over_a_few_rounds_share_one_call() {
        let redis = RedisServer::start();
        let limiter = Arc::new(
            RedisLimiter::connect(
                &[redis.url()],
                false,
                Duration::from_secs(2),
                OnStoreFailure::Deny,
            )
            .await
            .unwrap(),
        );
        let roomy = gcra(1e6, 100_000);
        let now = SystemClock.now();
        // The script is cached and the connection made before counting.
        assert!(admitted(
            &limiter.decide(&call("k", &roomy, None), now).await
        ));
        let mut c = redis::Client::open(redis.url())
            .unwrap()
            .get_connection()
            .unwrap();
        redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query::<()>(&mut c)
            .unwrap();
        // A request that arrives `rounds` polls of the I/O driver from now: a socket registered
        // with it is readable at its next poll, then the next one, and so on.
        let arrive = |rounds: usize| {
            let limiter = limiter.clone();
            async move {
                for _ in 0..rounds {
                    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
                    (&theirs).write_all(b"!").unwrap();
                    ours.set_nonblocking(true).unwrap();
                    let ours = tokio::net::UnixStream::from_std(ours).unwrap();
                    ours.readable().await.unwrap();
                }
                admitted(&limiter.decide(&call("k", &roomy, None), now).await)
            }
        };
        let tasks: Vec<_> = (0..40).map(|i| tokio::spawn(arrive(i % 4))).collect();
        for task in tasks {
            assert!(task.await.unwrap());
        }
        assert_eq!(
            script_calls(&mut c),
            1,
            "40 requests over four rounds, one call"
        );

        // One round that brings nothing does not end the gathering, two in a row do: a lone
        // request waits for one that comes a round after an empty one, not for one after two.
        for (later, calls) in [(2, 1), (3, 2)] {
            redis::cmd("CONFIG")
                .arg("RESETSTAT")
                .query::<()>(&mut c)
                .unwrap();
            let (a, b) = tokio::join!(tokio::spawn(arrive(0)), tokio::spawn(arrive(later)));
            assert!(a.unwrap() && b.unwrap());
            assert_eq!(
                script_calls(&mut c),
                calls,
                "a request {later} rounds after a lone one"
            );
        }
    }

    /// A key's limits kept by the Rust rules in `tollgate-core`, as the embedded mode keeps them.
    struct RustSide {
        gcra: Option<Gcra>,
        bucket: GcraState,
        quota: Option<Quota>,
        /// Shared by the sides of one key's buckets under one plan.
        count: Arc<QuotaCount>,
        credits: Option<(Credits, Option<Refill>)>,
    }

    impl RustSide {
        fn decide(&self, cost: u32, now: u64) -> Verdict {
            let mut tokens = 0;
            let mut until_full_us = 0;
            if let Some(g) = &self.gcra {
                match g.check(&self.bucket, now) {
                    ThrottleDecision::Allowed { remaining } => {
                        tokens = u64::from(remaining);
                        until_full_us = g.until_full(&self.bucket, now) / 1000;
                    }
                    ThrottleDecision::Refused { retry_after } => {
                        return Verdict::Throttled {
                            wait_us: retry_after / 1000,
                        };
                    }
                }
            }
            let mut quota_left = 0;
            if let Some(q) = &self.quota {
                match q.try_consume(&self.count, cost, now) {
                    QuotaDecision::Allowed { remaining, .. } => quota_left = remaining,
                    QuotaDecision::Refused { .. } => {
                        return Verdict::QuotaSpent {
                            tokens,
                            until_full_us,
                        };
                    }
                }
            }
            // As the embedded mode does (the gateway's `local_limits`): the refill, then the cost,
            // the quota given back when the credits refuse.
            let mut credits_left = None;
            if let Some((credits, refill)) = &self.credits {
                if let Some(refill) = refill {
                    credits.refill(refill, now);
                }
                match credits.try_spend(cost) {
                    CreditDecision::Spent { left } => credits_left = Some(left),
                    CreditDecision::Exhausted { left } => {
                        if let Some(q) = &self.quota {
                            q.give_back(&self.count, cost, now);
                            quota_left += u64::from(cost);
                        }
                        return Verdict::CreditsExhausted {
                            tokens,
                            until_full_us,
                            quota_left,
                            credits_left: left,
                        };
                    }
                }
            }
            Verdict::Admitted {
                tokens,
                quota_left,
                until_full_us,
                credits_left,
            }
        }
    }

    /// splitmix64: a fixed, seedable sequence, so a failing run can be replayed by its seed.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }

        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// The batcher's own connection: it authenticates and picks the URL's database, comes back
    /// after Redis restarts (and loads the script again), and drops a connection whose answer came
    /// too late, so that answer is never read as the next call's.
    #[tokio::test]
    async fn the_limiters_connection_follows_the_url_and_starts_over_after_a_failure() {
        let mut redis = RedisServer::start_with_password("s3cret");
        let url = |auth: &str| format!("redis://:{auth}@127.0.0.1:{}/2", redis.port);
        let connect = |url: String| async move {
            RedisLimiter::connect(&[url], false, Duration::from_secs(2), OnStoreFailure::Deny)
                .await
                .unwrap()
        };
        let slow = gcra(0.01, 3);
        let limiter = connect(url("s3cret")).await;
        assert_eq!(
            count_admitted(&limiter, &call("k", &slow, None), 5).await,
            3
        );
        let mut c = redis::Client::open(url("s3cret"))
            .unwrap()
            .get_connection()
            .unwrap();
        let usage = keys::usage("k", "p");
        assert!(
            redis::cmd("EXISTS")
                .arg(&usage)
                .query::<bool>(&mut c)
                .unwrap(),
            "in db 2"
        );
        redis::cmd("SELECT").arg(0).query::<()>(&mut c).unwrap();
        assert!(
            !redis::cmd("EXISTS")
                .arg(&usage)
                .query::<bool>(&mut c)
                .unwrap(),
            "not in db 0"
        );

        let wrong = connect(url("wrong")).await;
        let refused = wrong
            .decide(&call("k", &slow, None), SystemClock.now())
            .await;
        assert!(
            matches!(&refused, Err(LimiterError::Redis(e)) if e.contains("AUTH")),
            "{refused:?}"
        );

        // A restarted server (the script is gone from it): the first call after it fails, the next
        // connects again and loads the script; the bucket kept its state on disk.
        redis.kill();
        let now = SystemClock.now();
        assert!(limiter.decide(&call("k", &slow, None), now).await.is_err());
        redis.restart();
        let later = now + 2 * NANOS_PER_SEC;
        let decided = limiter.decide(&call("k2", &slow, None), later).await;
        assert!(admitted(&decided), "{decided:?}");
        let spent = limiter.decide(&call("k", &slow, None), later).await;
        assert!(
            matches!(&spent, Ok(d) if matches!(d.verdict, Verdict::Throttled { .. })),
            "{spent:?}"
        );

        // A server that answers after the timeout: that connection is dropped, and the next call
        // goes on a new one, whose answer it gets.
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicU64::new(0));
        let counter = accepted.clone();
        tokio::spawn(async move {
            use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
            // An answer to one request: a run of one, admitted, nothing of anything left, no credits.
            let admitted = run(1, 0, [0, 0, 0, -1], [0; 4]);
            let mut reply = format!("${RUN_BYTES}\r\n").into_bytes();
            reply.extend_from_slice(&admitted);
            reply.extend_from_slice(b"\r\n");
            loop {
                let (mut s, _) = listener.accept().await.unwrap();
                let first = counter.fetch_add(1, Ordering::Relaxed) == 0;
                let reply = reply.clone();
                tokio::spawn(async move {
                    let mut buf = vec![0; 65536];
                    while s.read(&mut buf).await.unwrap_or(0) > 0 {
                        if first {
                            tokio::time::sleep(Duration::from_millis(600)).await;
                        }
                        if s.write_all(&reply).await.is_err() {
                            return;
                        }
                    }
                });
            }
        });
        let limiter = RedisLimiter::connect(
            &[format!("redis://127.0.0.1:{port}")],
            false,
            Duration::from_millis(200),
            OnStoreFailure::Deny,
        )
        .await
        .unwrap();
        let now = SystemClock.now();
        assert!(limiter.decide(&call("k", &slow, None), now).await.is_err());
        // Past the late answer, and past the backoff after a failure.
        tokio::time::sleep(Duration::from_millis(700)).await;
        let decided = limiter
            .decide(&call("k", &slow, None), now + NANOS_PER_SEC)
            .await;
        assert!(admitted(&decided), "{decided:?}");
        assert_eq!(accepted.load(Ordering::Relaxed), 2, "a new connection");
    }

    /// Exactness in both modes is the product's promise, and the limits are written twice: in Rust
    /// (`tollgate-core`, the embedded mode) and in Lua (`lua/limit.lua`, cluster mode). The same
    /// random sequences of requests (several keys and a customer whose keys share limits, bursts,
    /// refills, quota period boundaries, costs from 0 to 3, credits with and without a refill, in
    /// shadow, and top-ups) go through both, on one manual clock, and every decision must be the same.
    #[tokio::test]
    async fn the_lua_script_decides_as_the_rust_rules_do() {
        let redis = RedisServer::start();
        // The test's clock starts at the next whole second of real time (so Redis's expiries, which
        // run on real time, are in the future) and moves only when the sequence says.
        let start = SystemClock.now().div_ceil(NANOS_PER_SEC) * NANOS_PER_SEC;
        let clock = Arc::new(ManualClock::new(start));
        let limiter = RedisLimiter::connect_with_clock(
            &[redis.url()],
            false,
            Duration::from_secs(2),
            OnStoreFailure::Deny,
            Some(clock.clone()),
        )
        .await
        .unwrap();
        // Rates whose token interval is a whole number of microseconds (the script's unit).
        // (rate, burst) and quota of each key.
        type Shape = (Option<(f64, u32)>, Option<QuotaSettings>);
        let shapes: [Shape; 7] = [
            (Some((1.0, 3)), Some(day_quota(7))),
            (Some((20.0, 5)), None),
            (None, Some(day_quota(4))),
            (
                Some((0.5, 2)),
                Some(QuotaSettings {
                    limit: 12,
                    offset: 3,
                    period: Period::Week,
                }),
            ),
            (
                Some((100.0, 1)),
                Some(QuotaSettings {
                    limit: 30,
                    offset: 0,
                    period: Period::Month,
                }),
            ),
            // The customer whose keys share limits: its calls come from several keys.
            (Some((2.0, 4)), Some(day_quota(9))),
            // The first key's calls to a method with a bucket of its own: kept apart from the
            // plan's quota they share, while the plan's bucket is kept in the quota's hash.
            (Some((4.0, 2)), Some(day_quota(7))),
        ];
        let method = |k: usize| if k == 6 { "GET /x" } else { "" };
        // Side 5 is a customer's, with an id that would break a careless key name.
        let customer = "acme}:u:{key0";
        // Credits of some sides: the opening balance, and the refill.
        let weekly = Refill::new(5, Period::Week).unwrap();
        let daily = Refill::new(6, Period::Day).unwrap();
        let credit_shapes: [Option<(u64, Option<&Refill>)>; 7] = [
            None,
            Some((0, Some(&daily))),
            None,
            Some((15, None)),
            None,
            Some((4, Some(&weekly))),
            None,
        ];
        let store = crate::RedisStore::new(crate::RedisSettings {
            urls: vec![redis.url()],
            cluster: false,
            timeout: Duration::from_secs(2),
        })
        .unwrap();
        let (mut decisions, mut exhausted) = (0, 0);
        for seed in 0..6u64 {
            flush_all(&redis);
            clock.set(start);
            let first_count = Arc::new(QuotaCount::default());
            let sides: Vec<RustSide> = shapes
                .iter()
                .zip(credit_shapes)
                .enumerate()
                .map(|(k, ((t, q), c))| RustSide {
                    gcra: t.map(|(rate, burst)| gcra(rate, burst)),
                    bucket: GcraState::default(),
                    quota: q.map(Quota::new),
                    count: match k {
                        0 | 6 => first_count.clone(),
                        _ => Arc::default(),
                    },
                    credits: c
                        .map(|(balance, refill)| (Credits::new(balance, None), refill.copied())),
                })
                .collect();
            // The last side's calls are the first key's.
            let ids: Vec<String> = (0..sides.len() - 1).map(|i| format!("key{i}")).collect();
            for (k, c) in credit_shapes.iter().enumerate() {
                if let Some((balance, _)) = c {
                    assert!(store.add_credits(&ids[k], "opening", *balance, 0).unwrap());
                }
            }
            let holder = |k: usize| match k {
                5 => Holder::Customer(customer),
                6 => Holder::Key(&ids[0]),
                _ => Holder::Key(&ids[k]),
            };
            let mut rng = Rng(seed);
            // What each key spent, as the embedded mode meters it (admitted requests' costs).
            let mut spent = vec![0u64; sides.len()];
            let mut topped_up = vec![0u64; sides.len()];
            for step in 0..400 {
                match rng.below(10) {
                    // A burst of requests, mostly from one key, sent together: the script decides
                    // them in one call (or a few), in order, naming a key the call shares once.
                    0..=5 => {
                        let first = rng.below(sides.len() as u64) as usize;
                        let burst: Vec<(usize, u32)> = (0..=rng.below(6))
                            .map(|_| {
                                let k = match rng.below(3) {
                                    0 => rng.below(sides.len() as u64) as usize,
                                    _ => first,
                                };
                                // Mostly 1, as most routes cost; sometimes free, sometimes more.
                                (k, [1, 1, 0, 2, 3][rng.below(5) as usize])
                            })
                            .collect();
                        let calls: Vec<KeyCall> = burst
                            .iter()
                            .map(|&(k, cost)| KeyCall {
                                holder: holder(k),
                                plan_id: &PLAN,
                                method: method(k),
                                throttle: sides[k].gcra.as_ref(),
                                quota: shapes[k].1.as_ref(),
                                cost,
                                credits: credit_shapes[k].map(|(_, refill)| CreditCall {
                                    key_id: ids[k].as_str(),
                                    refill,
                                    // One key's credits are spent by a plan in shadow.
                                    shadow: k == 3,
                                }),
                            })
                            .collect();
                        let now = clock.now();
                        let lua = futures_util::future::join_all(
                            calls.iter().map(|call| limiter.decide(call, now)),
                        )
                        .await;
                        for (&(k, cost), lua) in burst.iter().zip(lua) {
                            let rust = sides[k].decide(cost, now);
                            assert_eq!(
                                lua.unwrap().verdict,
                                rust,
                                "seed {seed}, step {step}, key {k}"
                            );
                            if matches!(rust, Verdict::Admitted { .. }) {
                                spent[k] += u64::from(cost);
                            }
                            if matches!(rust, Verdict::CreditsExhausted { .. }) {
                                exhausted += 1;
                            }
                            decisions += 1;
                        }
                    }
                    // Time for some tokens to come back: up to three seconds, to the microsecond.
                    6..=7 => clock.advance(rng.below(3_000_000) * 1000),
                    // A top-up of a key with credits (twice under one idempotency key).
                    8 => {
                        let k = [1, 3, 5][rng.below(3) as usize];
                        let n = rng.below(5);
                        let idem = format!("order-{step}");
                        assert!(store.add_credits(&ids[k], &idem, n, 0).unwrap());
                        assert!(!store.add_credits(&ids[k], &idem, n, 0).unwrap());
                        if let Some((credits, _)) = &sides[k].credits {
                            credits.add(n);
                        }
                        topped_up[k] += n;
                    }
                    // To a second before the next UTC midnight: the next steps cross it.
                    _ => {
                        let day = EpochDay::from_nanos(clock.now());
                        clock.set(day.next().start_nanos() - NANOS_PER_SEC);
                    }
                }
            }
            // The script meters what was spent, day by day, as the embedded mode does.
            let mut c = redis::Client::open(redis.url())
                .unwrap()
                .get_connection()
                .unwrap();
            for (k, id) in ids.iter().enumerate() {
                let usage = match holder(k) {
                    Holder::Key(_) => keys::usage(id, &PLAN),
                    Holder::Customer(c) => keys::customer_usage(c, &PLAN),
                };
                let days: std::collections::HashMap<u32, u64> =
                    redis::cmd("HGETALL").arg(usage).query(&mut c).unwrap();
                let spent = spent[k] + if k == 0 { spent[6] } else { 0 };
                assert_eq!(days.values().sum::<u64>(), spent, "seed {seed}, key {k}");
                if let Some((credits, _)) = &sides[k].credits {
                    let b: u64 = redis::cmd("HGET")
                        .arg(keys::credits(id))
                        .arg(if k == 3 { "sb" } else { "b" })
                        .query(&mut c)
                        .unwrap();
                    assert_eq!(b, credits.balance(), "seed {seed}, key {k}: the balance");
                }
                if k == 3 {
                    let b: u64 = redis::cmd("HGET")
                        .arg(keys::credits(id))
                        .arg("b")
                        .query(&mut c)
                        .unwrap();
                    assert_eq!(
                        b,
                        15 + topped_up[k],
                        "seed {seed}: shadow spends none of it"
                    );
                }
            }
        }
        assert!(decisions > 3_000, "{decisions} decisions compared");
        assert!(exhausted > 50, "{exhausted} refused for their credits");
    }
}
