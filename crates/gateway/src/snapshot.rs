//! The immutable in-memory view the request path reads: routes, keys, plans and the live limiter
//! state, plus the admission pipeline (key ▸ throttles ▸ quota ▸ meter) over it.
//!
//! A snapshot is built from the store's records once and swapped whole (`ArcSwap`) when they change;
//! a request does one hash lookup for its key and a handful of atomic operations, no locks, no I/O.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::{Arc, Mutex};

use http::Method;
use tollgate_core::clock::NANOS_PER_SEC;
use tollgate_core::gcra::{Gcra, GcraState, ThrottleDecision};
use tollgate_core::model::KEY_VALUE_LEN;
use tollgate_core::quota::{EpochDay, QuotaDecision, QuotaState, QuotaWindow};
use tollgate_core::{KeyHash, ThrottleSettings, UsagePlan};
use tollgate_store::Records;

use crate::config::{GatewayConfig, Route};
use crate::meter::DailyMeter;
use crate::route::{RouteError, RouteMatch, Router};

/// One token bucket: its limits and its state.
#[derive(Debug)]
struct Bucket {
    gcra: Gcra,
    /// Shared with the same bucket in the snapshot this one replaced, so a change of records does not
    /// refill anyone's bucket.
    state: Arc<GcraState>,
}

impl Bucket {
    /// A bucket for `settings`; with the bucket it replaces, it keeps that bucket's tokens.
    fn new(settings: ThrottleSettings, previous: Option<&Bucket>, now: u64) -> Self {
        let gcra = Gcra::new(settings);
        let state = match previous {
            Some(old) if old.gcra == gcra => old.state.clone(),
            Some(old) => Arc::new(gcra.carry_over(&old.gcra, &old.state, now)),
            None => Arc::default(),
        };
        Self { gcra, state }
    }
}

/// One API key's membership in one usage plan: the per-key limiter state the plan defines.
#[derive(Debug)]
pub struct Grant {
    /// The key's id.
    pub key_id: Arc<str>,
    /// The plan's id.
    pub plan_id: Arc<str>,
    throttle: Option<Bucket>,
    /// Per-method overrides: (api, stage, route) → bucket.
    method_throttles: Vec<((usize, usize, usize), Bucket)>,
    quota: Option<Arc<QuotaState>>,
    /// Admitted requests not yet flushed to the store (shared across snapshots).
    pub meter: Arc<DailyMeter>,
}

impl Grant {
    fn throttle_for(&self, m: &RouteMatch<'_>) -> Option<&Bucket> {
        self.method_throttle_at((m.api, m.stage, m.route))
            .or(self.throttle.as_ref())
    }

    fn method_throttle_at(&self, at: (usize, usize, usize)) -> Option<&Bucket> {
        self.method_throttles
            .iter()
            .find(|(here, _)| *here == at)
            .map(|(_, b)| b)
    }

    /// The throttle that limits this key on the matched route: the per-method one, else the plan's.
    pub fn bucket_for(&self, m: &RouteMatch<'_>) -> Option<&Gcra> {
        self.throttle_for(m).map(|b| &b.gcra)
    }

    /// Whether the matched route has a per-method throttle of its own.
    pub fn has_method_throttle(&self, m: &RouteMatch<'_>) -> bool {
        self.method_throttle_at((m.api, m.stage, m.route)).is_some()
    }

    /// The live quota counter of this membership, if the plan has a quota.
    pub fn quota(&self) -> Option<&QuotaState> {
        self.quota.as_deref()
    }
}

#[derive(Debug)]
struct KeyEntry {
    enabled: bool,
    /// (api, stage) → the one plan membership that covers it.
    grants: Vec<((usize, usize), Arc<Grant>)>,
}

/// A hasher for [`KeyHash`], whose `Hash` impl feeds one u64 of an already uniform digest.
#[derive(Default)]
struct DigestHasher(u64);

impl Hasher for DigestHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only reached if something other than KeyHash is hashed; stay correct anyway.
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

/// A hasher for ids the store hands out (trusted input, hashed a million times at startup): one
/// multiply per 8 bytes instead of SipHash.
#[derive(Default)]
struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.0 = (self.0.rotate_left(5) ^ u64::from_le_bytes(word))
                .wrapping_mul(0x51_7c_c1_b7_27_22_0a_95);
        }
    }
}

/// What a usage plan covers in the configured APIs, resolved once per plan rather than once per
/// member key (unknown APIs, stages and methods are reported once, too).
struct PlanCover<'p> {
    plan: &'p UsagePlan,
    /// Shared by the plan's memberships.
    id: Arc<str>,
    /// (api, stage) indices.
    stages: Vec<(usize, usize)>,
    /// Per-method throttles: (api, stage, route) indices.
    methods: Vec<((usize, usize, usize), ThrottleSettings)>,
}

impl<'p> PlanCover<'p> {
    fn resolve(plan: &'p UsagePlan, config: &GatewayConfig) -> Self {
        let mut stages = Vec::new();
        let mut methods = Vec::new();
        for api_stage in &plan.api_stages {
            let Some((a, api)) = config
                .apis
                .iter()
                .enumerate()
                .find(|(_, a)| a.id == api_stage.api_id)
            else {
                tracing::warn!(plan = %plan.id, api = %api_stage.api_id, "usage plan names an unknown API; ignored");
                continue;
            };
            let Some(s) = api.stages.iter().position(|s| s.name == api_stage.stage) else {
                tracing::warn!(plan = %plan.id, api = %api.id, stage = %api_stage.stage, "usage plan names an unknown stage; ignored");
                continue;
            };
            stages.push((a, s));
            for (method_key, settings) in &api_stage.throttle {
                match api
                    .routes
                    .iter()
                    .position(|r| r.throttle_key() == *method_key)
                {
                    Some(r) => methods.push(((a, s, r), *settings)),
                    None => tracing::warn!(plan = %plan.id, method = %method_key,
                        "usage plan throttles a method the API does not have; ignored"),
                }
            }
        }
        Self {
            plan,
            id: plan.id.as_str().into(),
            stages,
            methods,
        }
    }
}

/// The limits a response can advertise (IETF RateLimit headers) or a refusal explains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitInfo {
    /// The key's throttle: capacity, tokens left, seconds until full.
    pub throttle: Option<BucketInfo>,
    /// The key's quota: limit, left, seconds until the period resets, period length in seconds.
    pub quota: Option<QuotaInfo>,
}

/// A throttle's state for headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketInfo {
    /// Bucket capacity.
    pub burst: u64,
    /// Tokens left.
    pub remaining: u64,
    /// Seconds until the bucket is full again.
    pub reset_secs: u64,
    /// Seconds an empty bucket takes to fill.
    pub window_secs: u64,
}

/// A quota's state for headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaInfo {
    /// Requests per period.
    pub limit: u64,
    /// Requests left in this period.
    pub remaining: u64,
    /// Seconds until the period ends.
    pub reset_secs: u64,
    /// Length of the current period in seconds.
    pub window_secs: u64,
}

/// Why a request was not admitted. Each maps to AWS's status and body in one place
/// ([`crate::response`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No route for this path and method: 403 `Missing Authentication Token`.
    MissingAuthenticationToken,
    /// Key missing, unknown, disabled or not in a plan for this stage: 403 `Forbidden`.
    Forbidden,
    /// A throttle refused: 429 `Too Many Requests`.
    TooManyRequests {
        /// Whole seconds until a retry can succeed (at least 1).
        retry_after_secs: u64,
        /// The key's limits, for headers.
        limits: LimitInfo,
    },
    /// The shared store is unavailable and `onStoreFailure: deny`: 503.
    ServiceUnavailable,
    /// The key's quota for this period is spent: 429 `Limit Exceeded`.
    LimitExceeded {
        /// Whole seconds until the period resets (at least 1).
        retry_after_secs: u64,
        /// The key's limits, for headers.
        limits: LimitInfo,
    },
}

/// An admitted request: where it goes and what to advertise.
#[derive(Debug)]
pub struct Admission<'s> {
    /// The matched route.
    pub route: &'s Route,
    /// The key's id, when the route required a key.
    pub key_id: Option<&'s str>,
    /// The key's limits after this request.
    pub limits: LimitInfo,
}

/// A request that passed the key check and the instance-wide throttles.
#[derive(Debug)]
pub struct SharedAdmission<'s> {
    /// The matched route.
    pub route: &'s Route,
    /// The key's membership, when the route requires a key.
    pub grant: Option<&'s Arc<Grant>>,
    taken: [Option<&'s Bucket>; 2],
}

impl SharedAdmission<'_> {
    /// Gives back the stage and account tokens, when the key's own limits refused the request.
    pub fn refund(&self) {
        for bucket in self.taken.iter().flatten() {
            bucket.gcra.refund(&bucket.state);
        }
    }
}

/// Why a snapshot could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The route table is invalid.
    #[error(transparent)]
    Route(#[from] RouteError),
}

/// The part of a snapshot that only the config decides: built once, shared by every snapshot.
#[derive(Debug)]
struct Routing {
    config: GatewayConfig,
    router: Router,
    /// [api][stage][route]: the stage's per-method throttle, shared by all callers.
    stage_buckets: Vec<Vec<Vec<Option<Bucket>>>>,
    account: Option<Bucket>,
}

/// Memberships holding counts the flusher has not taken, each queued by its first count since the
/// last take: the flusher visits these, not every membership (a million keys are not walked every
/// second). Shared by a gateway's successive snapshots, like the meters.
#[derive(Debug, Default)]
struct MeterQueue(Mutex<Vec<Arc<Grant>>>);

/// Everything the request path reads, immutable except for atomics.
#[derive(Debug)]
pub struct Snapshot {
    routing: Arc<Routing>,
    keys: HashMap<KeyHash, KeyEntry, BuildHasherDefault<DigestHasher>>,
    grants: Vec<Arc<Grant>>,
    metered: Arc<MeterQueue>,
}

fn ceil_secs(nanos: u64) -> u64 {
    nanos.div_ceil(NANOS_PER_SEC)
}

impl Snapshot {
    /// Builds the first snapshot. `period_used` gives, per (plan id, key id), the requests already
    /// counted in the quota period containing `today` (so limits survive restarts).
    pub fn build(
        config: GatewayConfig,
        records: &Records,
        period_used: &HashMap<(String, String), i64>,
        today: EpochDay,
    ) -> Result<Self, SnapshotError> {
        let router = Router::new(&config.apis)?;
        let stage_buckets = config
            .apis
            .iter()
            .map(|api| {
                api.stages
                    .iter()
                    .map(|stage| {
                        api.routes
                            .iter()
                            .map(|route| {
                                stage
                                    .method_throttle
                                    .get(&route.throttle_key())
                                    .or(stage.throttle.as_ref())
                                    .map(|t| Bucket::new(*t, None, 0))
                            })
                            .collect()
                    })
                    .collect()
            })
            .collect();
        let account = config.account_throttle.map(|t| Bucket::new(t, None, 0));
        let routing = Arc::new(Routing {
            config,
            router,
            stage_buckets,
            account,
        });
        Ok(Self::assemble(
            routing,
            records,
            period_used,
            today.start_nanos(),
            None,
        ))
    }

    /// A snapshot of changed records that keeps this one's live state at `now`: bucket levels (tokens
    /// carry over into changed throttles), quota counts of plans whose quota did not change, and
    /// unflushed metering. `period_used` is consulted only for memberships that are new or whose
    /// plan's quota changed.
    pub fn rebuild(
        &self,
        records: &Records,
        period_used: &HashMap<(String, String), i64>,
        now: u64,
    ) -> Self {
        Self::assemble(self.routing.clone(), records, period_used, now, Some(self))
    }

    fn assemble(
        routing: Arc<Routing>,
        records: &Records,
        period_used: &HashMap<(String, String), i64>,
        now: u64,
        previous: Option<&Snapshot>,
    ) -> Self {
        let today = EpochDay::from_nanos(now);
        let metered = previous.map_or_else(Arc::default, |p| p.metered.clone());
        let old: HashMap<(&str, &str), &Grant, BuildHasherDefault<IdHasher>> = previous
            .map(|p| {
                p.grants
                    .iter()
                    .map(|g| ((&*g.plan_id, &*g.key_id), &**g))
                    .collect()
            })
            .unwrap_or_default();
        let plans: HashMap<&str, PlanCover<'_>> = records
            .plans
            .iter()
            .map(|p| (p.id.as_str(), PlanCover::resolve(p, &routing.config)))
            .collect();
        let mut keys: HashMap<KeyHash, KeyEntry, BuildHasherDefault<DigestHasher>> =
            HashMap::with_capacity_and_hasher(records.keys.len(), BuildHasherDefault::default());
        let mut key_index: HashMap<&str, KeyHash, BuildHasherDefault<IdHasher>> =
            HashMap::with_capacity_and_hasher(records.keys.len(), BuildHasherDefault::default());
        for key in &records.keys {
            keys.insert(
                key.value_hash,
                KeyEntry {
                    enabled: key.enabled,
                    grants: Vec::new(),
                },
            );
            key_index.insert(&key.id, key.value_hash);
        }

        let mut grants = Vec::with_capacity(records.bindings.len());
        for (plan_id, key_id) in &records.bindings {
            let (Some(cover), Some(hash)) =
                (plans.get(plan_id.as_str()), key_index.get(key_id.as_str()))
            else {
                continue;
            };
            let Some(entry) = keys.get_mut(hash) else {
                continue;
            };
            let plan = cover.plan;
            let before = old.get(&(plan_id.as_str(), key_id.as_str())).copied();
            let mut covered = Vec::with_capacity(cover.stages.len());
            for &at in &cover.stages {
                if let Some((_, other)) = entry.grants.iter().find(|(here, _)| *here == at) {
                    tracing::warn!(key = %key_id, plan = %plan.id, other = %other.plan_id,
                        "key is in two plans for one stage; the first one applies");
                    continue;
                }
                covered.push(at);
            }
            let method_throttles = cover
                .methods
                .iter()
                .filter(|((a, s, _), _)| covered.contains(&(*a, *s)))
                .map(|&(at, settings)| {
                    let prior = before.and_then(|g| g.method_throttle_at(at));
                    (at, Bucket::new(settings, prior, now))
                })
                .collect();
            let quota = plan.quota.map(|q| {
                match before
                    .and_then(|g| g.quota.as_ref())
                    .filter(|s| *s.settings() == q)
                {
                    Some(same) => same.clone(),
                    None => {
                        let used = period_used
                            .get(&(plan_id.clone(), key_id.clone()))
                            .copied()
                            .unwrap_or(0);
                        Arc::new(QuotaState::new(q, today, used))
                    }
                }
            });
            let grant = Arc::new(Grant {
                key_id: key_id.as_str().into(),
                plan_id: cover.id.clone(),
                throttle: plan
                    .throttle
                    .map(|t| Bucket::new(t, before.and_then(|g| g.throttle.as_ref()), now)),
                method_throttles,
                quota,
                meter: before.map_or_else(Arc::default, |g| g.meter.clone()),
            });
            for at in covered {
                entry.grants.push((at, grant.clone()));
            }
            grants.push(grant);
        }
        Self {
            routing,
            keys,
            grants,
            metered,
        }
    }

    /// The configuration this snapshot serves.
    pub fn config(&self) -> &GatewayConfig {
        &self.routing.config
    }

    /// How many API keys are served.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// How many usage plans have members.
    pub fn plan_count(&self) -> usize {
        let mut plans: Vec<&str> = self.grants.iter().map(|g| &*g.plan_id).collect();
        plans.sort_unstable();
        plans.dedup();
        plans.len()
    }

    /// Every (key, plan) membership.
    pub fn grants(&self) -> &[Arc<Grant>] {
        &self.grants
    }

    /// Counts an admitted request of `grant` at `now`.
    pub fn meter(&self, grant: &Arc<Grant>, now: u64) {
        if grant.meter.record(EpochDay::from_nanos(now)) {
            self.metered_queue().push(grant.clone());
        }
    }

    /// The memberships counted since the last call, for the flusher to take their meters.
    pub fn take_metered(&self) -> Vec<Arc<Grant>> {
        std::mem::take(&mut *self.metered_queue())
    }

    fn metered_queue(&self) -> std::sync::MutexGuard<'_, Vec<Arc<Grant>>> {
        self.metered.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Finds the route for a request.
    pub fn route<'p>(&self, method: &Method, path: &'p str) -> Option<RouteMatch<'p>> {
        self.routing.router.route(method, path)
    }

    /// Runs the whole admission pipeline for a routed request presenting `api_key` at `now`, on this
    /// instance's state: the key, the throttles (the key's plan or per-method bucket, the stage's, the
    /// account's: a request must pass all, and a refusal anywhere hands back the tokens the others
    /// took), then the quota. An admitted keyed request is metered.
    pub fn admit<'s>(
        &'s self,
        m: &RouteMatch<'_>,
        api_key: Option<&[u8]>,
        now: u64,
    ) -> Result<Admission<'s>, Refusal> {
        let shared = self.admit_shared(m, api_key, now)?;
        let Some(grant) = shared.grant else {
            return Ok(Admission {
                route: shared.route,
                key_id: None,
                limits: LimitInfo::default(),
            });
        };
        match self.admit_key_locally(grant, m, now) {
            Ok(limits) => Ok(Admission {
                route: shared.route,
                key_id: Some(&grant.key_id),
                limits,
            }),
            Err(refusal) => {
                shared.refund();
                Err(refusal)
            }
        }
    }

    /// The part of admission that is never shared between instances: the key check and the
    /// instance-wide throttles (stage and account). In cluster mode the key's own limits are then
    /// decided in Redis; if that refuses, [`SharedAdmission::refund`] gives these tokens back.
    pub fn admit_shared<'s>(
        &'s self,
        m: &RouteMatch<'_>,
        api_key: Option<&[u8]>,
        now: u64,
    ) -> Result<SharedAdmission<'s>, Refusal> {
        let route = &self.routing.config.apis[m.api].routes[m.route];
        let grant = if route.api_key_required {
            Some(self.grant(m, api_key)?)
        } else {
            None
        };
        let layers = [
            self.routing.stage_buckets[m.api][m.stage][m.route].as_ref(),
            self.routing.account.as_ref(),
        ];
        for (i, bucket) in layers.iter().enumerate() {
            let Some(bucket) = bucket else { continue };
            if let ThrottleDecision::Refused { retry_after } = bucket.gcra.check(&bucket.state, now)
            {
                for taken in layers[..i].iter().flatten() {
                    taken.gcra.refund(&taken.state);
                }
                let limits = LimitInfo {
                    throttle: None,
                    quota: grant.and_then(|g| quota_info(g, now, None)),
                };
                return Err(Refusal::TooManyRequests {
                    retry_after_secs: ceil_secs(retry_after).max(1),
                    limits,
                });
            }
        }
        Ok(SharedAdmission {
            route,
            grant,
            taken: layers,
        })
    }

    /// The key's own limits on this instance's state: its plan or per-method bucket, then its quota;
    /// counts the request when admitted.
    pub fn admit_key_locally(
        &self,
        grant: &Arc<Grant>,
        m: &RouteMatch<'_>,
        now: u64,
    ) -> Result<LimitInfo, Refusal> {
        let mut limits = LimitInfo::default();
        if let Some(bucket) = grant.throttle_for(m) {
            match bucket.gcra.check(&bucket.state, now) {
                ThrottleDecision::Allowed { remaining } => {
                    limits.throttle = Some(bucket_info(bucket, u64::from(remaining), now));
                }
                ThrottleDecision::Refused { retry_after } => {
                    limits.throttle = Some(bucket_info(bucket, 0, now));
                    limits.quota = quota_info(grant, now, None);
                    return Err(Refusal::TooManyRequests {
                        retry_after_secs: ceil_secs(retry_after).max(1),
                        limits,
                    });
                }
            }
        }
        if let Some(quota) = &grant.quota {
            match quota.try_consume(now) {
                QuotaDecision::Allowed { remaining, .. } => {
                    limits.quota = quota_info(grant, now, Some(remaining));
                }
                QuotaDecision::Refused { resets_at } => {
                    // The bucket's token stays taken: hammering a spent quota is not free.
                    limits.quota = quota_info(grant, now, Some(0));
                    let retry = ceil_secs(resets_at.start_nanos().saturating_sub(now)).max(1);
                    return Err(Refusal::LimitExceeded {
                        retry_after_secs: retry,
                        limits,
                    });
                }
            }
        }
        self.meter(grant, now);
        Ok(limits)
    }

    fn grant(&self, m: &RouteMatch<'_>, api_key: Option<&[u8]>) -> Result<&Arc<Grant>, Refusal> {
        let value = api_key.ok_or(Refusal::Forbidden)?;
        // Values outside AWS's length bounds (20-128 characters, so at most 4 bytes each) cannot be
        // stored keys: refuse them without hashing.
        if value.len() < *KEY_VALUE_LEN.start() || value.len() > 4 * *KEY_VALUE_LEN.end() {
            return Err(Refusal::Forbidden);
        }
        let entry = self
            .keys
            .get(&KeyHash::of(value))
            .filter(|e| e.enabled)
            .ok_or(Refusal::Forbidden)?;
        entry
            .grants
            .iter()
            .find(|(at, _)| *at == (m.api, m.stage))
            .map(|(_, g)| g)
            .ok_or(Refusal::Forbidden)
    }
}

fn bucket_info(bucket: &Bucket, remaining: u64, now: u64) -> BucketInfo {
    BucketInfo {
        burst: bucket.gcra.burst(),
        remaining,
        reset_secs: ceil_secs(bucket.gcra.until_full(&bucket.state, now)),
        window_secs: ceil_secs(bucket.gcra.interval().saturating_mul(bucket.gcra.burst())).max(1),
    }
}

/// The quota part of the headers; `remaining` when just decided, else read from the counter.
fn quota_info(grant: &Grant, now: u64, remaining: Option<u64>) -> Option<QuotaInfo> {
    let quota = grant.quota.as_ref()?;
    let limit = quota.settings().limit;
    let window: QuotaWindow = quota.window(EpochDay::from_nanos(now));
    let remaining = remaining.unwrap_or_else(|| quota.remaining(now));
    Some(QuotaInfo {
        limit: u64::from(limit),
        remaining,
        reset_secs: ceil_secs(window.end.start_nanos().saturating_sub(now)),
        window_secs: u64::from(window.end.0 - window.start.0) * 86_400,
    })
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use tollgate_core::quota::Period;
    use tollgate_core::{ApiKey, ApiStage, QuotaSettings, UsagePlan};

    use super::*;
    use crate::config::{Api, Integration, RouteMethod, Stage};

    const KEY: &str = "central-system-key-0123456789";
    const OTHER: &str = "another-partner-key-0123456789";
    const T0: u64 = 1_795_000_000 * NANOS_PER_SEC; // 2026-11-19

    fn throttle(rate: f64, burst: u32) -> ThrottleSettings {
        ThrottleSettings {
            rate_limit: rate,
            burst_limit: burst,
        }
    }

    fn config(
        stage_throttle: Option<ThrottleSettings>,
        account: Option<ThrottleSettings>,
    ) -> GatewayConfig {
        let route = |path: &str, method: &str, api_key_required| Route {
            path: path.into(),
            method: RouteMethod::Only(method.parse().unwrap()),
            api_key_required,
            integration: Integration::Mock {
                status: http::StatusCode::OK,
                body: "ok".into(),
                headers: vec![],
            },
            cors: None,
        };
        GatewayConfig {
            account_throttle: account,
            rate_limit_headers: true,
            access_log: false,
            apis: vec![Api {
                id: "warranty".into(),
                stages: ["prod", "dev"]
                    .iter()
                    .map(|name| Stage {
                        name: (*name).into(),
                        base_path: format!("/{name}"),
                        throttle: stage_throttle,
                        method_throttle: BTreeMap::new(),
                    })
                    .collect(),
                routes: vec![
                    route("/registrations/{id}/warranty", "PUT", true),
                    route("/registrations/{id}", "GET", true),
                    route("/health", "GET", false),
                ],
            }],
        }
    }

    fn records(plan_throttle: Option<ThrottleSettings>, quota: Option<QuotaSettings>) -> Records {
        let key = |id: &str, value: &str, enabled| ApiKey {
            id: id.into(),
            name: id.into(),
            description: None,
            customer_id: None,
            enabled,
            value_hash: KeyHash::of(value),
            sealed_value: None,
            created_date: 0,
            last_updated_date: 0,
        };
        Records {
            plans: vec![UsagePlan {
                id: "plan01".into(),
                name: "central-batch".into(),
                description: None,
                api_stages: vec![ApiStage {
                    api_id: "warranty".into(),
                    stage: "prod".into(),
                    throttle: BTreeMap::from([(
                        "/registrations/{id}/warranty/PUT".into(),
                        throttle(1.0, 2),
                    )]),
                }],
                throttle: plan_throttle,
                quota,
            }],
            keys: vec![
                key("key0000001", KEY, true),
                key("key0000002", OTHER, false),
            ],
            bindings: vec![
                ("plan01".into(), "key0000001".into()),
                ("plan01".into(), "key0000002".into()),
            ],
        }
    }

    fn snap(cfg: GatewayConfig, rec: &Records) -> Snapshot {
        Snapshot::build(cfg, rec, &HashMap::new(), EpochDay::from_nanos(T0)).unwrap()
    }

    fn call(
        s: &Snapshot,
        method: &str,
        path: &str,
        key: Option<&str>,
        now: u64,
    ) -> Result<LimitInfo, Refusal> {
        let m = s
            .route(&method.parse().unwrap(), path)
            .ok_or(Refusal::MissingAuthenticationToken)?;
        s.admit(&m, key.map(str::as_bytes), now).map(|a| a.limits)
    }

    #[test]
    fn key_checks() {
        let s = snap(
            config(None, None),
            &records(Some(throttle(100.0, 50)), None),
        );
        let put = "/prod/registrations/42/warranty";
        assert_eq!(
            call(&s, "GET", "/prod/nowhere", Some(KEY), T0),
            Err(Refusal::MissingAuthenticationToken)
        );
        assert_eq!(call(&s, "PUT", put, None, T0), Err(Refusal::Forbidden));
        assert_eq!(
            call(&s, "PUT", put, Some("short"), T0),
            Err(Refusal::Forbidden)
        );
        assert_eq!(
            call(&s, "PUT", put, Some("unknown-key-value-0123456789"), T0),
            Err(Refusal::Forbidden)
        );
        assert_eq!(
            call(&s, "PUT", put, Some(OTHER), T0),
            Err(Refusal::Forbidden),
            "disabled"
        );
        assert_eq!(
            call(&s, "PUT", "/dev/registrations/42/warranty", Some(KEY), T0),
            Err(Refusal::Forbidden),
            "the plan does not cover dev"
        );
        assert!(call(&s, "PUT", put, Some(KEY), T0).is_ok());
        assert!(
            call(&s, "GET", "/dev/health", None, T0).is_ok(),
            "public route"
        );
    }

    #[test]
    fn method_throttle_replaces_plan_throttle() {
        let s = snap(config(None, None), &records(Some(throttle(100.0, 5)), None));
        let put = "/prod/registrations/42/warranty";
        let get = "/prod/registrations/42";
        // PUT has its own bucket of 2; GET uses the plan's bucket of 5.
        assert!(call(&s, "PUT", put, Some(KEY), T0).is_ok());
        assert!(call(&s, "PUT", put, Some(KEY), T0).is_ok());
        let refused = call(&s, "PUT", put, Some(KEY), T0).unwrap_err();
        assert!(
            matches!(
                refused,
                Refusal::TooManyRequests {
                    retry_after_secs: 1,
                    ..
                }
            ),
            "{refused:?}"
        );
        for _ in 0..5 {
            assert!(call(&s, "GET", get, Some(KEY), T0).is_ok());
        }
        assert!(matches!(
            call(&s, "GET", get, Some(KEY), T0),
            Err(Refusal::TooManyRequests { .. })
        ));
        // One second later the PUT bucket has one token again.
        assert!(call(&s, "PUT", put, Some(KEY), T0 + NANOS_PER_SEC).is_ok());
    }

    #[test]
    fn stage_and_account_layers_apply_and_refund_the_key() {
        // Stage allows 1 per method at once; the key's plan bucket (5) must not be drained by refusals.
        let s = snap(
            config(Some(throttle(1.0, 1)), None),
            &records(Some(throttle(1.0, 5)), None),
        );
        let get = "/prod/registrations/42";
        assert!(call(&s, "GET", get, Some(KEY), T0).is_ok());
        for _ in 0..10 {
            assert!(matches!(
                call(&s, "GET", get, Some(KEY), T0),
                Err(Refusal::TooManyRequests { .. })
            ));
        }
        let limits = call(&s, "GET", get, Some(KEY), T0 + NANOS_PER_SEC).unwrap();
        assert_eq!(
            limits.throttle.unwrap().remaining,
            4,
            "refused requests took no key tokens"
        );

        let s = snap(
            config(None, Some(throttle(1.0, 2))),
            &records(Some(throttle(100.0, 50)), None),
        );
        assert!(call(&s, "GET", "/prod/health", None, T0).is_ok());
        assert!(call(&s, "GET", get, Some(KEY), T0).is_ok());
        assert!(matches!(
            call(&s, "GET", "/dev/health", None, T0),
            Err(Refusal::TooManyRequests { .. })
        ));
    }

    #[test]
    fn quota_counts_only_admitted_requests_and_meters() {
        let quota = QuotaSettings {
            limit: 3,
            offset: 0,
            period: Period::Day,
        };
        let s = snap(
            config(None, None),
            &records(Some(throttle(1.0, 2)), Some(quota)),
        );
        let get = "/prod/registrations/42";
        assert_eq!(
            call(&s, "GET", get, Some(KEY), T0)
                .unwrap()
                .quota
                .unwrap()
                .remaining,
            2
        );
        assert!(call(&s, "GET", get, Some(KEY), T0).is_ok());
        // Throttled: does not count against the quota.
        assert!(matches!(
            call(&s, "GET", get, Some(KEY), T0),
            Err(Refusal::TooManyRequests { .. })
        ));
        assert_eq!(
            call(&s, "GET", get, Some(KEY), T0 + NANOS_PER_SEC)
                .unwrap()
                .quota
                .unwrap()
                .remaining,
            0
        );
        let refused = call(&s, "GET", get, Some(KEY), T0 + 3 * NANOS_PER_SEC).unwrap_err();
        let Refusal::LimitExceeded {
            retry_after_secs,
            limits,
        } = refused
        else {
            panic!("{refused:?}")
        };
        let midnight = EpochDay::from_nanos(T0).next().start_nanos();
        assert_eq!(
            retry_after_secs,
            (midnight - T0 - 3 * NANOS_PER_SEC).div_ceil(NANOS_PER_SEC)
        );
        assert_eq!(limits.quota.unwrap().remaining, 0);
        // The next UTC day the quota is back.
        assert!(call(&s, "GET", get, Some(KEY), midnight).is_ok());

        // The flusher is handed the one membership that counted, once, not every membership.
        let queued = s.take_metered();
        assert_eq!(queued.len(), 1);
        assert!(Arc::ptr_eq(&queued[0], &s.grants()[0]));
        assert!(s.take_metered().is_empty());
        let mut days = Vec::new();
        queued[0].meter.take(&mut days);
        days.sort();
        assert_eq!(
            days,
            vec![
                (EpochDay::from_nanos(T0), 3),
                (EpochDay::from_nanos(midnight), 1)
            ]
        );
    }

    #[test]
    fn restored_usage_counts_against_the_quota() {
        let quota = QuotaSettings {
            limit: 10,
            offset: 0,
            period: Period::Month,
        };
        let rec = records(None, Some(quota));
        let used = HashMap::from([(("plan01".to_string(), "key0000001".to_string()), 9i64)]);
        let s = Snapshot::build(config(None, None), &rec, &used, EpochDay::from_nanos(T0)).unwrap();
        let get = "/prod/registrations/42";
        assert_eq!(
            call(&s, "GET", get, Some(KEY), T0)
                .unwrap()
                .quota
                .unwrap()
                .remaining,
            0
        );
        assert!(matches!(
            call(&s, "GET", get, Some(KEY), T0),
            Err(Refusal::LimitExceeded { .. })
        ));
    }

    #[test]
    fn rebuild_keeps_live_state_and_applies_changes_at_once() {
        let quota = QuotaSettings {
            limit: 10,
            offset: 0,
            period: Period::Day,
        };
        let mut rec = records(Some(throttle(1.0, 3)), Some(quota));
        let s = snap(config(None, None), &rec);
        let get = "/prod/registrations/42";
        for _ in 0..3 {
            assert!(call(&s, "GET", get, Some(KEY), T0).is_ok());
        }

        // Same records: the bucket stays empty, the quota count and the unflushed meter carry over.
        let s2 = s.rebuild(&rec, &HashMap::new(), T0);
        assert!(matches!(
            call(&s2, "GET", get, Some(KEY), T0),
            Err(Refusal::TooManyRequests { .. })
        ));
        let limits = call(&s2, "GET", get, Some(KEY), T0 + NANOS_PER_SEC).unwrap();
        assert_eq!(limits.quota.unwrap().remaining, 6);
        let mut days = Vec::new();
        s2.grants()[0].meter.take(&mut days);
        assert_eq!(days, vec![(EpochDay::from_nanos(T0), 4)]);

        // A raised limit keeps the count; a disabled key is refused at once; a new key works at once.
        rec.plans[0].quota = Some(QuotaSettings { limit: 20, ..quota });
        rec.keys[0].enabled = false;
        rec.keys[1].enabled = true;
        let used = HashMap::from([(("plan01".to_string(), "key0000001".to_string()), 4i64)]);
        let s3 = s2.rebuild(&rec, &used, T0);
        assert_eq!(
            call(&s3, "GET", get, Some(KEY), T0 + 5 * NANOS_PER_SEC),
            Err(Refusal::Forbidden)
        );
        let limits = call(&s3, "GET", get, Some(OTHER), T0 + 5 * NANOS_PER_SEC).unwrap();
        assert_eq!(limits.quota.unwrap().remaining, 19);
        rec.keys[0].enabled = true;
        let s4 = s3.rebuild(&rec, &used, T0);
        let limits = call(&s4, "GET", get, Some(KEY), T0 + 5 * NANOS_PER_SEC).unwrap();
        assert_eq!(
            limits.quota.unwrap().remaining,
            15,
            "20 - 4 used - this one"
        );
    }
}
