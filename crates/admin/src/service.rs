//! The control plane's operations on keys, plans, plan keys and usage, independent of HTTP. Every
//! write goes to the store first, then into a new gateway snapshot built from the store, so it takes
//! effect on the very next data-plane request.
//!
//! Store calls block (SQLite's file, the Redis connection): they run on tokio's blocking pool, all
//! through [`Admin::blocking`], never on an async worker. A write, once begun, runs to its end and
//! is served even if its caller hangs up.
//!
//! Nothing here holds all keys: usage plans (few) are kept in memory; keys are read from the store
//! (one, or a page at a time) and memberships from the gateway's snapshot, which has them anyway.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::future::Future;
use std::sync::Arc;

use tollgate_core::clock::NANOS_PER_SEC;
use tollgate_core::model::{EXPIRES_TAG, Tags, parse_expiry, validate_key_value, validate_tags};
use tollgate_core::quota::{EpochDay, Period, QuotaWindow};
use tollgate_core::rules::{ApiOutline, PlanError, check_api_stage, check_throttle};
use tollgate_core::{ApiKey, ApiStage, KeyHash, QuotaSettings, ThrottleSettings, UsagePlan};
use tollgate_store::report::{DayDetail, PlanUsage, check_range, period_usage, plan_usage};
use tollgate_store::{KeyIndex, Memberships, OnStoreFailure, Store, ids};

use crate::data_plane::DataPlane;
use crate::error::{AdminError, unknown_key, unknown_plan};
use crate::seal::Sealer;
use crate::sigv4::Credentials;
use crate::wire::{
    ApiKeyOut, ApiStageIn, CreateApiKeyIn, CreateUsagePlanIn, Page, PatchOp, QuotaIn,
    RotateApiKeyIn, ThrottleIn, UsageOut, UsagePlanKeyOut, UsagePlanOut, pointer_unescape,
};

/// AWS's default and largest page sizes.
const DEFAULT_LIMIT: usize = 25;
const MAX_LIMIT: usize = 500;
const KEY_PATHS: &str = "[/description, /enabled, /name, /customerId]";

/// How the control plane is set up.
#[derive(Debug, Clone, Default)]
pub struct AdminSettings {
    /// Accepted SigV4 credentials; empty means requests are not authenticated (loopback only).
    pub credentials: Vec<Credentials>,
    /// Set when key values are stored encrypted (`keyValueStorage: encrypted`).
    pub sealer: Option<Sealer>,
    /// What usage plans may name of the configured APIs.
    pub apis: Vec<ApiOutline>,
}

/// How long a rotated key's old value keeps working when the rotation does not say.
const DEFAULT_GRACE_SECS: u64 = 86_400;
/// The longest grace a rotation gives the old value: 30 days. A rotation is often a leak's answer,
/// and a grace of years would leave the leaked value working as if nothing had happened.
const MAX_GRACE_SECS: u64 = 30 * 86_400;

/// Epoch nanoseconds as RFC 3339, as `expiresAt` is written.
fn rfc3339(nanos: u64) -> String {
    jiff::Timestamp::from_nanosecond(i128::from(nanos))
        .map_or_else(|_| nanos.to_string(), |t| t.to_string())
}

/// What an ARN names: `arn:aws:apigateway:{region}::/apikeys/{id}` or `…::/usageplans/{id}`.
enum Tagged {
    Key(String),
    Plan(String),
}

impl Tagged {
    fn parse(arn: &str) -> Result<Self, AdminError> {
        let invalid = || bad(format!("Invalid resource ARN specified: {arn}"));
        let mut parts = arn.splitn(6, ':');
        let head: Vec<&str> = parts.by_ref().take(5).collect();
        let resource = parts.next().ok_or_else(invalid)?;
        match head.as_slice() {
            ["arn", partition, "apigateway", _region, ""] if partition.starts_with("aws") => {}
            _ => return Err(invalid()),
        }
        let (kind, id) = resource
            .strip_prefix('/')
            .and_then(|r| r.split_once('/'))
            .filter(|(_, id)| !id.is_empty() && !id.contains('/'))
            .ok_or_else(invalid)?;
        match kind {
            "apikeys" => Ok(Self::Key(id.to_owned())),
            "usageplans" => Ok(Self::Plan(id.to_owned())),
            _ => Err(invalid()),
        }
    }
}

/// The plans whose live quota counts a write invalidates: they are recomputed from the store.
pub(crate) type Recount = Vec<String>;

/// The control plane.
pub struct Admin {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) gateway: Arc<dyn DataPlane>,
    /// The usage plans; the lock also serialises writes. Shared so that a write can hold it on a
    /// blocking thread ([`Admin::apply`]).
    pub(crate) plans: Arc<tokio::sync::Mutex<Vec<UsagePlan>>>,
    pub(crate) settings: AdminSettings,
    /// Failed logins and signatures, backing off by client address and overall.
    pub(crate) failed: crate::failures::FailedCredentials,
    /// Request bodies read before their signature can be checked share this.
    pub(crate) unverified: crate::body::UnverifiedBudget,
}

/// The usage plans, held under the write lock.
pub(crate) type HeldPlans = tokio::sync::OwnedMutexGuard<Vec<UsagePlan>>;

/// What a write checks against: the plans, the keys and memberships the gateway serves, and the keys
/// and memberships this write has added so far (kept by hash and by key, so that a write adding many
/// keys, an import, stays linear).
pub(crate) struct Catalog<'a> {
    pub(crate) plans: &'a mut Vec<UsagePlan>,
    served: &'a dyn Memberships,
    new_keys: BTreeMap<KeyHash, String>,
    new_bindings: HashMap<String, Vec<String>>,
}

impl Catalog<'_> {
    pub(crate) fn plan(&self, id: &str) -> Option<&UsagePlan> {
        self.plans.iter().find(|p| p.id == id)
    }

    pub(crate) fn has_key(&self, id: &str) -> bool {
        self.served.has_key(id) || self.new_keys.values().any(|k| k == id)
    }

    /// The id of the key with this value hash.
    pub(crate) fn key_with_hash(&self, hash: &KeyHash) -> Option<String> {
        self.served
            .key_with_hash(hash)
            .map(str::to_owned)
            .or_else(|| self.new_keys.get(hash).cloned())
    }

    /// The plans key `key_id` is in.
    pub(crate) fn plans_of(&self, key_id: &str) -> Vec<&str> {
        let mut plans = self.served.plans_of(key_id);
        if let Some(added) = self.new_bindings.get(key_id) {
            plans.extend(added.iter().map(String::as_str));
        }
        plans
    }

    pub(crate) fn is_bound(&self, plan_id: &str, key_id: &str) -> bool {
        self.plans_of(key_id).contains(&plan_id)
    }

    pub(crate) fn added_key(&mut self, key: &ApiKey) {
        self.new_keys.insert(key.value_hash, key.id.clone());
    }

    pub(crate) fn added_binding(&mut self, plan_id: &str, key_id: &str) {
        self.new_bindings
            .entry(key_id.into())
            .or_default()
            .push(plan_id.into());
    }
}

/// What a key's name must start with.
#[derive(Debug, Clone)]
pub enum NameQuery {
    /// As written: GetApiKeys's `name`, as AWS matches it.
    Prefix(String),
    /// In any case (held in lower case): the dashboard's search.
    PrefixAnyCase(String),
}

impl NameQuery {
    /// A prefix to match in any case.
    pub fn any_case(prefix: &str) -> Self {
        Self::PrefixAnyCase(prefix.to_lowercase())
    }

    /// Whether `name` starts with the query.
    pub fn matches(&self, name: &str) -> bool {
        match self {
            Self::Prefix(p) => name.starts_with(p.as_str()),
            Self::PrefixAnyCase(p) => {
                let mut name = name.chars().flat_map(char::to_lowercase);
                p.chars().all(|c| name.next() == Some(c))
            }
        }
    }
}

/// A parsed paging request.
#[derive(Debug, Clone, Default)]
pub struct Paging {
    /// `limit` (default 25, at most 500).
    pub limit: Option<i64>,
    /// `position` from the previous page.
    pub position: Option<String>,
}

/// One page of `items`, in their order, from the place `paging.position` on (an index).
fn page_in_order<T>(items: Vec<T>, paging: &Paging) -> Result<Page<T>, AdminError> {
    let start = usize::try_from(numbered_position(paging)?.unwrap_or(0)).unwrap_or(usize::MAX);
    let numbered = items.into_iter().enumerate().skip(start);
    let Page { position, item } = first_page_of(numbered, |(i, _)| i.to_string(), paging);
    Ok(Page {
        position,
        item: item.into_iter().map(|(_, x)| x).collect(),
    })
}

/// `paging.position` where positions are numbers (places in creation order).
fn numbered_position(paging: &Paging) -> Result<Option<u64>, AdminError> {
    paging
        .position
        .as_deref()
        .map(|p| {
            p.parse().map_err(|_| {
                bad(format!(
                    "Invalid position {p:?}: not one a previous page gave"
                ))
            })
        })
        .transpose()
}

/// Where in `items`, sorted by `id`, the page at `paging.position` starts.
fn start_at<T>(items: &[T], id: impl Fn(&T) -> &str, paging: &Paging) -> usize {
    paging
        .position
        .as_deref()
        .map_or(0, |p| items.partition_point(|x| id(x) < p))
}

/// The first page of `items`, which come in order from the page's position on. The next position
/// is `position_of` the first item left out.
fn first_page<T, E>(
    items: impl Iterator<Item = Result<T, E>>,
    position_of: impl Fn(&T) -> String,
    paging: &Paging,
) -> Result<Page<T>, E> {
    let limit = match paging.limit {
        Some(n) if n > 0 => usize::try_from(n).unwrap_or(MAX_LIMIT).min(MAX_LIMIT),
        _ => DEFAULT_LIMIT,
    };
    let mut item = Vec::with_capacity(limit + 1);
    for next in items {
        item.push(next?);
        if item.len() > limit {
            break;
        }
    }
    let position = item.get(limit).map(position_of);
    item.truncate(limit);
    Ok(Page { position, item })
}

/// [`first_page`] of items that cannot fail.
fn first_page_of<T>(
    items: impl Iterator<Item = T>,
    position_of: impl Fn(&T) -> String,
    paging: &Paging,
) -> Page<T> {
    match first_page(items.map(Ok::<T, Infallible>), position_of, paging) {
        Ok(page) => page,
        Err(never) => match never {},
    }
}

/// The stored keys in creation order from place `from` on, each with its place, read a page at a
/// time.
fn stored_keys(
    store: &dyn Store,
    from: Option<u64>,
) -> impl Iterator<Item = Result<(u64, ApiKey), AdminError>> {
    const BATCH: usize = 500;
    let mut from = from;
    let mut batch = std::collections::VecDeque::new();
    let mut done = false;
    std::iter::from_fn(move || {
        if batch.is_empty() && !done {
            match store.keys_from(from, BATCH + 1) {
                Ok(mut keys) => {
                    // The extra key starts the next batch.
                    from = (keys.len() > BATCH)
                        .then(|| keys.pop().map(|(place, _)| place))
                        .flatten();
                    done = from.is_none();
                    batch.extend(keys);
                }
                Err(e) => {
                    done = true;
                    return Some(Err(e.into()));
                }
            }
        }
        batch.pop_front().map(Ok)
    })
}

/// Runs `work` to its end even if the caller goes away (a client that hangs up mid-write): a write
/// that has begun is finished and served.
pub(crate) async fn to_the_end<T: Send + 'static>(
    work: impl Future<Output = Result<T, AdminError>> + Send + 'static,
) -> Result<T, AdminError> {
    tokio::spawn(work)
        .await
        .map_err(|e| AdminError::Internal(format!("admin write: {e}")))?
}

fn bad(msg: impl Into<String>) -> AdminError {
    AdminError::BadRequest(msg.into())
}

fn throttle_from(t: &ThrottleIn) -> Result<ThrottleSettings, AdminError> {
    let burst = t.burst_limit.unwrap_or(0);
    let settings = ThrottleSettings {
        rate_limit: t.rate_limit.unwrap_or(0.0),
        burst_limit: u32::try_from(burst)
            .map_err(|_| bad("burstLimit must be between 0 and 2147483647"))?,
    };
    check_throttle(&settings).map_err(|e| bad(e.to_string()))?;
    Ok(settings)
}

fn period_from(text: &str) -> Result<Period, AdminError> {
    match text {
        "DAY" => Ok(Period::Day),
        "WEEK" => Ok(Period::Week),
        "MONTH" => Ok(Period::Month),
        other => Err(bad(format!(
            "1 validation error detected: Value '{other}' at 'quota.period' failed to satisfy constraint: Member must satisfy enum value set: [DAY, WEEK, MONTH]"
        ))),
    }
}

fn quota_from(q: &QuotaIn) -> Result<QuotaSettings, AdminError> {
    let period = period_from(
        q.period
            .as_deref()
            .ok_or_else(|| bad("Invalid quota: period is required"))?,
    )?;
    let limit =
        u32::try_from(q.limit.unwrap_or(0)).map_err(|_| bad("Invalid quota limit specified"))?;
    let offset =
        u32::try_from(q.offset.unwrap_or(0)).map_err(|_| bad("Invalid quota offset specified"))?;
    let settings = QuotaSettings {
        limit,
        offset,
        period,
    };
    settings.validate().map_err(|e| bad(e.to_string()))?;
    Ok(settings)
}

fn api_stage_from(s: &ApiStageIn) -> Result<ApiStage, AdminError> {
    let (Some(api_id), Some(stage)) = (&s.api_id, &s.stage) else {
        return Err(bad("Invalid API Stage specified"));
    };
    let mut throttle = BTreeMap::new();
    for (k, t) in s.throttle.iter().flatten() {
        throttle.insert(k.clone(), throttle_from(t)?);
    }
    Ok(ApiStage {
        api_id: api_id.clone(),
        stage: stage.clone(),
        throttle,
    })
}

/// `apiId:stage` as the `/apiStages` patch value writes it.
fn parse_stage_ref(value: Option<&str>) -> Result<(String, String), AdminError> {
    let (api, stage) = value
        .and_then(|v| v.split_once(':'))
        .filter(|(a, s)| !a.is_empty() && !s.is_empty())
        .ok_or_else(|| bad("Invalid API Stage specified"))?;
    Ok((api.to_string(), stage.to_string()))
}

fn parse_number<T: std::str::FromStr>(value: Option<&str>, path: &str) -> Result<T, AdminError> {
    value.and_then(|v| v.trim().parse().ok()).ok_or_else(|| {
        bad(format!(
            "Invalid value {:?} for {path}",
            value.unwrap_or("")
        ))
    })
}

impl Admin {
    /// The control plane over `store` (whose `plans` the gateway was built with), driving `gateway`.
    pub fn new(
        store: Arc<dyn Store>,
        plans: Vec<UsagePlan>,
        gateway: Arc<dyn DataPlane>,
        settings: AdminSettings,
    ) -> Self {
        Self {
            store,
            gateway,
            plans: Arc::new(tokio::sync::Mutex::new(plans)),
            settings,
            failed: crate::failures::FailedCredentials::new(),
            unverified: crate::body::UnverifiedBudget::default(),
        }
    }

    /// The health answer: status code and body.
    pub fn health(&self) -> (http::StatusCode, serde_json::Value) {
        match self.gateway.shared_store() {
            None => (
                http::StatusCode::OK,
                serde_json::json!({"status": "ok", "store": "sqlite"}),
            ),
            Some((degraded, on_failure)) => {
                let mode = on_failure.name();
                let status = if degraded && on_failure == OnStoreFailure::Deny {
                    http::StatusCode::SERVICE_UNAVAILABLE
                } else {
                    http::StatusCode::OK
                };
                let body = serde_json::json!({
                    "status": if degraded { "degraded" } else { "ok" },
                    "store": "redis",
                    "redis": if degraded { "unavailable" } else { "ok" },
                    "onStoreFailure": mode,
                });
                (status, body)
            }
        }
    }

    /// The data plane's counters, for Prometheus.
    pub fn metrics_text(&self) -> String {
        self.gateway.metrics_text()
    }

    /// Adopts records another instance changed (cluster mode) and serves them.
    pub async fn refresh(&self, fresh: KeyIndex) {
        let mut plans = self.plans.lock().await;
        plans.clone_from(&fresh.plans);
        self.gateway
            .reload(&fresh, &std::collections::HashMap::new());
    }

    /// The credentials requests must be signed with.
    pub fn credentials(&self) -> &[Credentials] {
        &self.settings.credentials
    }

    /// A try at credentials from `addr` (a login, a signature), if failures have not used up its
    /// budget; `Err` answers 429 with the wait.
    pub(crate) fn credentials_attempt(
        &self,
        addr: Option<std::net::IpAddr>,
    ) -> Result<crate::failures::Attempt, AdminError> {
        self.failed
            .attempt(addr, self.gateway.now())
            .map_err(|wait| {
                tracing::warn!(client = ?addr, wait, "failed credentials: backing off");
                AdminError::TooManyRequests(wait)
            })
    }

    /// Current time, epoch seconds, by the gateway's clock.
    pub fn now_secs(&self) -> i64 {
        i64::try_from(self.gateway.now() / NANOS_PER_SEC).unwrap_or(i64::MAX)
    }

    pub(crate) fn today(&self) -> EpochDay {
        EpochDay::from_nanos(self.gateway.now())
    }

    /// Runs `f`, which calls the store, on tokio's blocking pool. Store calls block (SQLite's file,
    /// the Redis connection); this is the one place the control plane waits for them, so no async
    /// worker is held up by one.
    pub(crate) async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Self) -> Result<T, AdminError> + Send + 'static,
    ) -> Result<T, AdminError> {
        let admin = Arc::clone(self);
        tokio::task::spawn_blocking(move || f(&admin))
            .await
            .map_err(|e| AdminError::Internal(format!("store call: {e}")))?
    }

    /// Takes the write lock.
    pub(crate) async fn lock_plans(&self) -> HeldPlans {
        Arc::clone(&self.plans).lock_owned().await
    }

    /// Runs a write under the write lock, then serves the store's records from the next request on
    /// (also when the write failed half-way: what reached the store is served).
    pub(crate) async fn write<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Self, &mut Catalog<'_>) -> Result<(T, Recount), AdminError> + Send + 'static,
    ) -> Result<T, AdminError> {
        let admin = Arc::clone(self);
        to_the_end(async move {
            let plans = admin.lock_plans().await;
            let (mut plans, written) = admin.apply(plans, f).await?;
            let recount = written.as_ref().map_or(Vec::new(), |(_, r)| r.clone());
            admin.serve_store(&mut plans, recount).await?;
            written.map(|(out, _)| out)
        })
        .await
    }

    /// Runs `f` against what is served now and the store, under the write lock `plans` is, without
    /// serving what it wrote (see [`Self::serve_store`]); gives the lock back with `f`'s result.
    pub(crate) async fn apply<T: Send + 'static>(
        self: &Arc<Self>,
        mut plans: HeldPlans,
        f: impl FnOnce(&Self, &mut Catalog<'_>) -> Result<T, AdminError> + Send + 'static,
    ) -> Result<(HeldPlans, Result<T, AdminError>), AdminError> {
        self.blocking(move |admin| {
            let served = admin.gateway.served();
            let mut catalog = Catalog {
                plans: &mut plans,
                served: &*served,
                new_keys: BTreeMap::new(),
                new_bindings: HashMap::new(),
            };
            let out = f(admin, &mut catalog);
            Ok((plans, out))
        })
        .await
    }

    /// Serves the store's records from the next request on, under the write lock `plans` is from;
    /// the live quota counts of the `recount` plans are rebuilt from the store.
    pub(crate) async fn serve_store(
        self: &Arc<Self>,
        plans: &mut HeldPlans,
        recount: Recount,
    ) -> Result<(), AdminError> {
        let started = std::time::Instant::now();
        if !recount.is_empty() {
            // Quota counts are rebuilt from the store: everything counted so far must be in it.
            self.gateway.flush().await.map_err(AdminError::Internal)?;
        }
        let today = self.today();
        let (index, used) = self
            .blocking(move |admin| {
                let index = admin.store.load_index()?;
                let used = period_usage(
                    &*admin.store,
                    index.plans.iter().filter(|p| recount.contains(&p.id)),
                    today,
                )?;
                Ok((index, used))
            })
            .await?;
        self.gateway.reload(&index, &used);
        plans.clone_from(&index.plans);
        tracing::debug!(
            keys = index.len(),
            ms = started.elapsed().as_millis() as u64,
            "admin write served"
        );
        Ok(())
    }

    fn key_out(&self, key: &ApiKey, include_value: bool, last_used: Option<u64>) -> ApiKeyOut {
        ApiKeyOut {
            id: key.id.clone(),
            value: if include_value { self.open(key) } else { None },
            name: key.name.clone(),
            customer_id: key.customer_id.clone(),
            description: key.description.clone(),
            enabled: key.enabled,
            created_date: key.created_date,
            last_updated_date: key.last_updated_date,
            last_used_date: last_used,
            stage_keys: Vec::new(),
            tags: key.tags.clone(),
            expires_at: key.tags.get(EXPIRES_TAG).cloned(),
            value_prefix: (!key.value_prefix.is_empty()).then(|| key.value_prefix.clone()),
            value_length: (key.value_length > 0).then_some(key.value_length),
            previous_value_expires_at: key.previous.map(|p| rfc3339(p.until)),
        }
    }

    /// The key's value, when values are stored encrypted.
    fn open(&self, key: &ApiKey) -> Option<String> {
        let (sealer, sealed) = (self.settings.sealer.as_ref()?, key.sealed_value.as_ref()?);
        match sealer.open(&key.id, sealed) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!(key = %key.id, error = %e, "cannot return a key value");
                None
            }
        }
    }

    /// `with_tags`: always answer `tags` (GetUsagePlan), else only when there are some.
    fn plan_out(plan: &UsagePlan, with_tags: bool) -> UsagePlanOut {
        UsagePlanOut {
            id: plan.id.clone(),
            name: plan.name.clone(),
            description: plan.description.clone(),
            api_stages: plan.api_stages.clone(),
            throttle: plan.throttle,
            quota: plan.quota,
            product_code: plan.product_code.clone(),
            tags: (with_tags || !plan.tags.is_empty()).then(|| plan.tags.clone()),
        }
    }

    // ---- API keys ----

    /// CreateApiKey.
    pub async fn create_key(
        self: &Arc<Self>,
        input: CreateApiKeyIn,
    ) -> Result<ApiKeyOut, AdminError> {
        let name = input.name.unwrap_or_default();
        if name.chars().count() > 1024 {
            return Err(bad("Invalid API Key name, can be at most 1024 characters."));
        }
        if input
            .description
            .as_ref()
            .is_some_and(|d| d.chars().count() > 125_000)
        {
            return Err(bad("Invalid API Key description specified."));
        }
        let value = match input.value.filter(|v| !v.is_empty()) {
            Some(v) => {
                validate_key_value(&v).map_err(bad)?;
                v
            }
            None => ids::new_key_value(),
        };
        let mut tags = input.tags.unwrap_or_default();
        if let Some(at) = input.expires_at {
            tags.insert(EXPIRES_TAG.into(), at);
        }
        validate_tags(&tags).map_err(bad)?;
        let draft = ApiKey {
            name,
            description: input.description,
            customer_id: input.customer_id,
            enabled: input.enabled.unwrap_or(false),
            tags,
            ..ApiKey::default()
        };
        self.write(move |admin, catalog| {
            let value_hash = KeyHash::of(&value);
            let key = admin.new_key(draft, (&value, value_hash), catalog)?;
            admin.store.put_key(&key)?;
            catalog.added_key(&key);
            let mut out = admin.key_out(&key, false, None);
            out.value = Some(value);
            Ok((out, Vec::new()))
        })
        .await
    }

    /// A new key as `draft` describes it (name, description, customer id, enabled, tags) with
    /// `value`, whose hash is `value_hash`; a conflict if a key has that value.
    pub(crate) fn new_key(
        &self,
        draft: ApiKey,
        (value, value_hash): (&str, KeyHash),
        catalog: &Catalog<'_>,
    ) -> Result<ApiKey, AdminError> {
        if catalog.key_with_hash(&value_hash).is_some() {
            return Err(AdminError::Conflict("API Key already exists".into()));
        }
        let id = ids::new_key_id();
        let now = self.now_secs();
        let mut key = ApiKey {
            sealed_value: self.settings.sealer.as_ref().map(|s| s.seal(&id, value)),
            id,
            value_hash,
            created_date: now,
            last_updated_date: now,
            ..draft
        };
        key.set_value_hint(value);
        Ok(key)
    }

    /// GetApiKey.
    pub async fn get_key(
        self: &Arc<Self>,
        id: &str,
        include_value: bool,
    ) -> Result<ApiKeyOut, AdminError> {
        let id = id.to_owned();
        self.gateway.flush().await.map_err(AdminError::Internal)?;
        let (key, last_used) = self
            .blocking(move |admin| {
                let key = admin.store.key(&id)?;
                Ok((key, admin.store.last_used(&[&id])?))
            })
            .await?;
        let key = key.ok_or_else(unknown_key)?;
        Ok(self.key_out(&key, include_value, last_used.first().copied().flatten()))
    }

    /// GetApiKeys: keys whose name `name` matches, and whose customer is `customer_id`.
    pub async fn list_keys(
        self: &Arc<Self>,
        name: Option<NameQuery>,
        customer_id: Option<String>,
        include_values: bool,
        paging: Paging,
    ) -> Result<Page<ApiKeyOut>, AdminError> {
        self.gateway.flush().await.map_err(AdminError::Internal)?;
        let from = numbered_position(&paging)?;
        let (page, last_used) = self
            .blocking(move |admin| {
                let keys = stored_keys(&*admin.store, from).filter(|k| {
                    k.as_ref().is_err()
                        || k.as_ref().is_ok_and(|(_, k)| {
                            name.as_ref().is_none_or(|n| n.matches(&k.name))
                                && customer_id
                                    .as_ref()
                                    .is_none_or(|c| k.customer_id.as_ref() == Some(c))
                        })
                });
                let page = first_page(
                    keys,
                    |(place, _): &(u64, ApiKey)| place.to_string(),
                    &paging,
                )?;
                let ids: Vec<&str> = page.item.iter().map(|(_, k)| k.id.as_str()).collect();
                let last_used = admin.store.last_used(&ids)?;
                Ok((page, last_used))
            })
            .await?;
        Ok(Page {
            position: page.position,
            item: page
                .item
                .iter()
                .zip(last_used)
                .map(|((_, k), at)| self.key_out(k, include_values, at))
                .collect(),
        })
    }

    /// UpdateApiKey.
    pub async fn update_key(
        self: &Arc<Self>,
        id: &str,
        ops: Vec<PatchOp>,
    ) -> Result<ApiKeyOut, AdminError> {
        let id = id.to_owned();
        self.write(move |admin, _| {
            let mut key = admin.store.key(&id)?.ok_or_else(unknown_key)?;
            for op in &ops {
                let (verb, path) = (op.op.as_deref().unwrap_or(""), op.path.as_deref().unwrap_or(""));
                // tollgate's own path: the expiry, kept as its tag.
                if path == "/expiresAt" {
                    match (verb, &op.value) {
                        ("replace" | "add", Some(at)) => {
                            parse_expiry(at).map_err(bad)?;
                            key.tags.insert(EXPIRES_TAG.into(), at.clone());
                        }
                        ("remove", _) => {
                            key.tags.remove(EXPIRES_TAG);
                        }
                        _ => return Err(bad("Invalid expiresAt: replace it with an RFC 3339 time, or remove it")),
                    }
                    continue;
                }
                if verb != "replace" {
                    return Err(bad(format!("Invalid patch path  '{path}' specified for op '{verb}'. Must be one of: {KEY_PATHS}")));
                }
                let value = op.value.clone();
                match path {
                    "/description" => key.description = value,
                    // AWS treats anything but "true" as false.
                    "/enabled" => key.enabled = value.as_deref() == Some("true"),
                    "/name" => key.name = value.unwrap_or_default(),
                    "/customerId" => key.customer_id = value,
                    _ => {
                        return Err(bad(format!(
                            "Invalid patch path  '{path}' specified for op 'replace'. Must be one of: {KEY_PATHS}"
                        )));
                    }
                }
            }
            key.last_updated_date = admin.now_secs();
            admin.store.put_key(&key)?;
            let last_used = admin.store.last_used(&[&id])?.pop().flatten();
            Ok((admin.key_out(&key, false, last_used), Vec::new()))
        })
        .await
    }

    /// tollgate's own: the key whose value is `value`, found by its hash (values are not kept).
    pub async fn find_key(self: &Arc<Self>, value: &str) -> Result<ApiKeyOut, AdminError> {
        let hash = KeyHash::of(value);
        let id = self
            .gateway
            .served()
            .key_with_hash(&hash)
            .map(str::to_owned)
            .ok_or_else(|| AdminError::NotFound("No API key has this value".into()))?;
        self.get_key(&id, false).await
    }

    /// tollgate's own: gives key `id` a new value (`input.value`, or a generated one, in the answer
    /// only). The current value keeps working for `input.grace_seconds` (a day by default); an
    /// earlier rotation's grace ends at once. The same key: its id, plans, buckets, quota count and
    /// history go on.
    pub async fn rotate_key(
        self: &Arc<Self>,
        id: &str,
        input: RotateApiKeyIn,
    ) -> Result<ApiKeyOut, AdminError> {
        let value = match input.value.filter(|v| !v.is_empty()) {
            Some(v) => {
                validate_key_value(&v).map_err(bad)?;
                v
            }
            None => ids::new_key_value(),
        };
        let grace = input.grace_seconds.unwrap_or(DEFAULT_GRACE_SECS);
        if grace > MAX_GRACE_SECS {
            return Err(bad(format!(
                "graceSeconds must be at most {MAX_GRACE_SECS} (30 days)"
            )));
        }
        let id = id.to_owned();
        self.write(move |admin, catalog| {
            let mut key = admin.store.key(&id)?.ok_or_else(unknown_key)?;
            let hash = KeyHash::of(&value);
            if catalog.key_with_hash(&hash).is_some() {
                return Err(AdminError::Conflict("API Key already exists".into()));
            }
            let until = admin
                .gateway
                .now()
                .saturating_add(grace.saturating_mul(NANOS_PER_SEC));
            key.rotate(&value, hash, until);
            key.sealed_value = admin.settings.sealer.as_ref().map(|s| s.seal(&id, &value));
            key.last_updated_date = admin.now_secs();
            admin.store.put_key(&key)?;
            let last_used = admin.store.last_used(&[&id])?.pop().flatten();
            let mut out = admin.key_out(&key, false, last_used);
            out.value = Some(value);
            Ok((out, Vec::new()))
        })
        .await
    }

    // ---- tags ----

    /// GetTags.
    pub async fn tags(self: &Arc<Self>, arn: &str) -> Result<Tags, AdminError> {
        match Tagged::parse(arn)? {
            Tagged::Key(id) => {
                let key = self
                    .blocking(move |admin| Ok(admin.store.key(&id)?))
                    .await?;
                Ok(key.ok_or_else(unknown_key)?.tags)
            }
            Tagged::Plan(id) => {
                let plans = self.plans.lock().await;
                let plan = plans.iter().find(|p| p.id == id).ok_or_else(unknown_plan)?;
                Ok(plan.tags.clone())
            }
        }
    }

    /// TagResource (`add`: the tags to set) and UntagResource (`remove`: the tag keys to drop).
    pub async fn retag(
        self: &Arc<Self>,
        arn: &str,
        add: Tags,
        remove: Vec<String>,
    ) -> Result<(), AdminError> {
        let tagged = Tagged::parse(arn)?;
        let retag = move |tags: &mut Tags| {
            tags.extend(add);
            for k in &remove {
                tags.remove(k);
            }
            validate_tags(tags).map_err(bad)
        };
        self.write(move |admin, catalog| {
            match tagged {
                Tagged::Key(id) => {
                    let mut key = admin.store.key(&id)?.ok_or_else(unknown_key)?;
                    retag(&mut key.tags)?;
                    key.last_updated_date = admin.now_secs();
                    admin.store.put_key(&key)?;
                }
                Tagged::Plan(id) => {
                    let plan = catalog
                        .plans
                        .iter_mut()
                        .find(|p| p.id == id)
                        .ok_or_else(unknown_plan)?;
                    let mut changed = plan.clone();
                    retag(&mut changed.tags)?;
                    admin.store.put_plan(&changed)?;
                    *plan = changed;
                }
            }
            Ok(((), Vec::new()))
        })
        .await
    }

    /// DeleteApiKey: also removes the key from its plans.
    pub async fn delete_key(self: &Arc<Self>, id: &str) -> Result<(), AdminError> {
        let id = id.to_owned();
        self.write(move |admin, catalog| {
            if !catalog.has_key(&id) {
                return Err(unknown_key());
            }
            admin.store.delete_key(&id)?;
            Ok(((), Vec::new()))
        })
        .await
    }

    // ---- usage plans ----

    fn check_plan(&self, plan: &UsagePlan, catalog: &Catalog<'_>) -> Result<(), AdminError> {
        let apis = &self.settings.apis;
        for (i, stage) in plan.api_stages.iter().enumerate() {
            check_api_stage(apis, stage, plan.throttle.is_some()).map_err(|e| match e {
                PlanError::UnknownApi { api, stage } | PlanError::UnknownStage { api, stage } => {
                    AdminError::NotFound(format!(
                        "Invalid API Stage {{api: {api}, stage: {stage}}} specified for usageplan {}",
                        plan.id
                    ))
                }
                other => bad(other.to_string()),
            })?;
            if plan.api_stages[..i]
                .iter()
                .any(|s| s.api_id == stage.api_id && s.stage == stage.stage)
            {
                return Err(bad(format!(
                    "API Stage {}:{} is listed twice",
                    stage.api_id, stage.stage
                )));
            }
        }
        // A key may be in only one plan per API stage: only plans sharing a stage with this one can
        // clash, so the plan's members are looked at only if there is one.
        let shares_a_stage = catalog.plans.iter().any(|other| {
            other.id != plan.id
                && other.api_stages.iter().any(|o| {
                    plan.api_stages
                        .iter()
                        .any(|s| s.api_id == o.api_id && s.stage == o.stage)
                })
        });
        let members = if shares_a_stage {
            catalog.served.keys_of(&plan.id)
        } else {
            Vec::new()
        };
        for key_id in members {
            if let Some((other, stage)) =
                Self::stage_clash(catalog, &plan.id, key_id, &plan.api_stages)
            {
                return Err(AdminError::Conflict(format!(
                    "API Key {key_id} is already in usage plan {other}, which covers the same API Stage {}:{}",
                    stage.api_id, stage.stage
                )));
            }
        }
        Ok(())
    }

    /// Another plan of `key_id` that covers one of `stages`.
    pub(crate) fn stage_clash<'r>(
        catalog: &'r Catalog<'_>,
        plan_id: &str,
        key_id: &str,
        stages: &'r [ApiStage],
    ) -> Option<(&'r str, &'r ApiStage)> {
        catalog
            .plans_of(key_id)
            .into_iter()
            .filter(|p| *p != plan_id)
            .filter_map(|p| catalog.plan(p))
            .find_map(|other| {
                stages
                    .iter()
                    .find(|s| {
                        other
                            .api_stages
                            .iter()
                            .any(|o| o.api_id == s.api_id && o.stage == s.stage)
                    })
                    .map(|s| (other.id.as_str(), s))
            })
    }

    /// CreateUsagePlan.
    pub async fn create_plan(
        self: &Arc<Self>,
        input: CreateUsagePlanIn,
    ) -> Result<UsagePlanOut, AdminError> {
        let name = input
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("Usage plan name is required"))?;
        let plan = UsagePlan {
            id: ids::new_plan_id(),
            name,
            description: input.description,
            api_stages: input
                .api_stages
                .iter()
                .flatten()
                .map(api_stage_from)
                .collect::<Result<_, _>>()?,
            throttle: input.throttle.as_ref().map(throttle_from).transpose()?,
            quota: input.quota.as_ref().map(quota_from).transpose()?,
            tags: input.tags.unwrap_or_default(),
            product_code: None,
        };
        validate_tags(&plan.tags).map_err(bad)?;
        self.write(move |admin, catalog| {
            admin.check_plan(&plan, catalog)?;
            admin.store.put_plan(&plan)?;
            let out = Self::plan_out(&plan, false);
            catalog.plans.push(plan);
            Ok((out, Vec::new()))
        })
        .await
    }

    /// GetUsagePlan.
    pub async fn get_plan(&self, id: &str) -> Result<UsagePlanOut, AdminError> {
        let plans = self.plans.lock().await;
        let plan = plans.iter().find(|p| p.id == id).ok_or_else(unknown_plan)?;
        Ok(Self::plan_out(plan, true))
    }

    /// GetUsagePlans, optionally only the plans containing `key_id`.
    pub async fn list_plans(
        &self,
        key_id: Option<&str>,
        paging: &Paging,
    ) -> Result<Page<UsagePlanOut>, AdminError> {
        let plans = self.plans.lock().await;
        let served = self.gateway.served();
        let of_key = key_id.map(|k| served.plans_of(k));
        let items = plans
            .iter()
            .filter(|p| of_key.as_ref().is_none_or(|of| of.contains(&p.id.as_str())))
            .map(|p| Self::plan_out(p, false))
            .collect();
        page_in_order(items, paging)
    }

    /// UpdateUsagePlan.
    pub async fn update_plan(
        self: &Arc<Self>,
        id: &str,
        ops: Vec<PatchOp>,
    ) -> Result<UsagePlanOut, AdminError> {
        let id = id.to_owned();
        self.write(move |admin, catalog| {
            let at = catalog
                .plans
                .iter()
                .position(|p| p.id == id)
                .ok_or_else(unknown_plan)?;
            let before = catalog.plans[at].clone();
            let mut plan = before.clone();
            let mut quota: Option<QuotaIn> = plan.quota.map(|q| QuotaIn {
                limit: Some(i64::from(q.limit)),
                offset: Some(i64::from(q.offset)),
                period: Some(q.period.to_string()),
            });
            for op in &ops {
                apply_plan_op(&mut plan, &mut quota, op)?;
            }
            plan.quota = quota.as_ref().map(quota_from).transpose()?;
            admin.check_plan(&plan, catalog)?;
            admin.store.put_plan(&plan)?;
            let out = Self::plan_out(&plan, false);
            let recount = if plan.quota != before.quota {
                vec![plan.id.clone()]
            } else {
                Vec::new()
            };
            catalog.plans[at] = plan;
            Ok((out, recount))
        })
        .await
    }

    /// DeleteUsagePlan.
    pub async fn delete_plan(self: &Arc<Self>, id: &str) -> Result<(), AdminError> {
        let id = id.to_owned();
        self.write(move |admin, catalog| {
            if catalog.plan(&id).is_none() {
                return Err(unknown_plan());
            }
            admin.store.delete_plan(&id)?;
            catalog.plans.retain(|p| p.id != id);
            Ok(((), Vec::new()))
        })
        .await
    }

    // ---- usage plan keys ----

    fn plan_key_out(&self, key: &ApiKey) -> UsagePlanKeyOut {
        UsagePlanKeyOut {
            id: key.id.clone(),
            key_type: "API_KEY",
            value: self.open(key),
            name: key.name.clone(),
        }
    }

    /// CreateUsagePlanKey.
    pub async fn create_plan_key(
        self: &Arc<Self>,
        plan_id: &str,
        key_id: Option<String>,
        key_type: Option<String>,
    ) -> Result<UsagePlanKeyOut, AdminError> {
        let key_id = key_id.ok_or_else(|| bad("Invalid API Key identifier specified"))?;
        if key_type.as_deref() != Some("API_KEY") {
            return Err(bad("Invalid key type specified: keyType must be API_KEY"));
        }
        let plan_id = plan_id.to_owned();
        self.write(move |admin, catalog| {
            let plan_id = plan_id.as_str();
            // AWS checks the key first: both unknown is "Invalid API Key identifier specified".
            let key = admin.store.key(&key_id)?.ok_or_else(unknown_key)?;
            let plan = catalog.plan(plan_id).ok_or_else(unknown_plan)?;
            if catalog.is_bound(plan_id, &key_id) {
                return Err(AdminError::Conflict(format!("Usage Plan Key {key_id} already exists in usage plan {plan_id}")));
            }
            if let Some((other, stage)) = Self::stage_clash(catalog, plan_id, &key_id, &plan.api_stages) {
                return Err(AdminError::Conflict(format!(
                    "Usage Plan {plan_id} cannot be added because API Key {key_id} cannot reference multiple Usage Plans with the same API Stage: {}:{} (usage plan {other})",
                    stage.api_id, stage.stage
                )));
            }
            admin.store.bind(plan_id, &key_id)?;
            catalog.added_binding(plan_id, &key_id);
            Ok((admin.plan_key_out(&key), vec![plan_id.to_string()]))
        })
        .await
    }

    /// GetUsagePlanKey.
    pub async fn get_plan_key(
        self: &Arc<Self>,
        plan_id: &str,
        key_id: &str,
    ) -> Result<UsagePlanKeyOut, AdminError> {
        if !self.plans.lock().await.iter().any(|p| p.id == plan_id) {
            return Err(unknown_plan());
        }
        let bound = self.gateway.served().plans_of(key_id).contains(&plan_id);
        let key = match bound {
            true => {
                let key_id = key_id.to_owned();
                self.blocking(move |admin| Ok(admin.store.key(&key_id)?))
                    .await?
            }
            false => None,
        };
        key.map(|k| self.plan_key_out(&k)).ok_or_else(|| {
            AdminError::NotFound("Invalid Usage Plan Key identifier specified".into())
        })
    }

    /// GetUsagePlanKeys: `name` is a prefix of the key name. An unknown plan has no keys (as AWS).
    pub async fn list_plan_keys(
        self: &Arc<Self>,
        plan_id: &str,
        name: Option<String>,
        paging: Paging,
    ) -> Result<Page<UsagePlanKeyOut>, AdminError> {
        let served = self.gateway.served();
        let plan_id = plan_id.to_owned();
        self.blocking(move |admin| {
            let members = served.keys_of(&plan_id);
            let start = start_at(&members, |k| k, &paging);
            // Keys are read from the store only as far as the page goes.
            let keys = members[start..]
                .iter()
                .filter_map(|id| admin.store.key(id).transpose())
                .filter(|k| {
                    k.as_ref().map_or(true, |k| {
                        name.as_ref().is_none_or(|n| k.name.starts_with(n.as_str()))
                    })
                })
                .map(|k| k.map(|k| admin.plan_key_out(&k)));
            Ok(first_page(
                keys,
                |k: &UsagePlanKeyOut| k.id.clone(),
                &paging,
            )?)
        })
        .await
    }

    /// DeleteUsagePlanKey.
    pub async fn delete_plan_key(
        self: &Arc<Self>,
        plan_id: &str,
        key_id: &str,
    ) -> Result<(), AdminError> {
        let (plan_id, key_id) = (plan_id.to_owned(), key_id.to_owned());
        self.write(move |admin, catalog| {
            let (plan_id, key_id) = (plan_id.as_str(), key_id.as_str());
            if catalog.plan(plan_id).is_none() {
                return Err(unknown_plan());
            }
            if !catalog.is_bound(plan_id, key_id) {
                return Err(AdminError::NotFound(
                    "Invalid Usage Plan Key identifier specified".into(),
                ));
            }
            admin.store.unbind(plan_id, key_id)?;
            Ok(((), Vec::new()))
        })
        .await
    }

    // ---- usage ----

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
        let parse = |v: Option<&str>, which: &str| {
            v.and_then(|t| t.parse::<jiff::civil::Date>().ok())
                .and_then(EpochDay::from_date)
                .ok_or_else(|| {
                    bad(format!(
                        "Invalid {which} date specified: expected YYYY-MM-DD"
                    ))
                })
        };
        let (from, to) = (parse(dates.0, "start")?, parse(dates.1, "end")?);
        check_range(from, to).map_err(bad)?;
        self.gateway.flush().await.map_err(AdminError::Internal)?;
        let plan = self
            .plans
            .lock()
            .await
            .iter()
            .find(|p| p.id == plan_id)
            .cloned()
            .ok_or_else(unknown_plan)?;
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
                first_page_of(ids[start..].iter(), |k| k.to_string(), &paging);
            Ok(UsageOut {
                usage_plan_id: plan.id.clone(),
                start_date: from.to_string(),
                end_date: to.to_string(),
                position,
                values: item
                    .into_iter()
                    .map(|k| (k.clone(), per_key(&usage, k)))
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
                    let n = parse_number::<i64>(op.value.as_deref(), "/remaining")?;
                    if !(0..=tollgate_core::MAX_REMAINING).contains(&n) {
                        return Err(bad(format!(
                            "Invalid value {n} for /remaining: it must be between 0 and {}",
                            tollgate_core::MAX_REMAINING
                        )));
                    }
                    remaining = Some(n);
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
                    let delta = match live {
                        Some(delta) => delta,
                        // The key is in the plan but not served (e.g. the plan covers no configured
                        // stage): the change is computed from the stored count instead.
                        None => {
                            let used = period_usage(&*admin.store, [&plan], today)?;
                            let now_used = used.get(&(plan.id.clone(), key.clone())).copied();
                            i64::from(quota.limit)
                                .checked_sub(remaining)
                                .and_then(|d| d.checked_sub(now_used.unwrap_or(0)))
                                .ok_or_else(|| bad("The stored usage is out of range"))?
                        }
                    };
                    Ok(admin.store.adjust_quota(&plan.id, &key, today, delta)?)
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

/// Applies one UpdateUsagePlan operation (quota members are collected in `quota` and checked after).
fn apply_plan_op(
    plan: &mut UsagePlan,
    quota: &mut Option<QuotaIn>,
    op: &PatchOp,
) -> Result<(), AdminError> {
    let verb = op.op.as_deref().unwrap_or("");
    let path = op.path.as_deref().unwrap_or("");
    let value = op.value.as_deref();
    let invalid = || {
        bad(format!(
            "Invalid patch path {path} specified for op '{verb}'"
        ))
    };
    let set = matches!(verb, "replace" | "add");
    match (verb, path) {
        ("replace", "/name") => {
            plan.name = value
                .filter(|v| !v.is_empty())
                .ok_or_else(|| bad("Usage plan name is required"))?
                .to_string();
        }
        ("replace", "/description") => plan.description = value.map(str::to_string),
        // A Marketplace product code means nothing here, but it is kept and returned, as AWS does.
        ("replace" | "add", "/productCode") => plan.product_code = value.map(str::to_string),
        ("remove", "/productCode") => plan.product_code = None,
        (_, "/throttle/rateLimit") if set => {
            let t = plan.throttle.get_or_insert(ThrottleSettings {
                rate_limit: 0.0,
                burst_limit: 0,
            });
            t.rate_limit = parse_number(value, path)?;
            check_throttle(t).map_err(|e| bad(e.to_string()))?;
        }
        (_, "/throttle/burstLimit") if set => {
            let t = plan.throttle.get_or_insert(ThrottleSettings {
                rate_limit: 0.0,
                burst_limit: 0,
            });
            t.burst_limit = parse_number(value, path)?;
        }
        ("remove", "/throttle") => plan.throttle = None,
        (_, "/quota/limit") if set => {
            quota.get_or_insert_with(QuotaIn::default).limit = Some(parse_number(value, path)?)
        }
        (_, "/quota/offset") if set => {
            quota.get_or_insert_with(QuotaIn::default).offset = Some(parse_number(value, path)?);
        }
        (_, "/quota/period") if set => {
            quota.get_or_insert_with(QuotaIn::default).period = value.map(str::to_string);
        }
        ("remove", "/quota") => *quota = None,
        ("add", "/apiStages") => {
            let (api_id, stage) = parse_stage_ref(value)?;
            if !plan
                .api_stages
                .iter()
                .any(|s| s.api_id == api_id && s.stage == stage)
            {
                plan.api_stages.push(ApiStage {
                    api_id,
                    stage,
                    throttle: BTreeMap::new(),
                });
            }
        }
        ("remove", "/apiStages") => {
            let (api_id, stage) = parse_stage_ref(value)?;
            let before = plan.api_stages.len();
            plan.api_stages
                .retain(|s| !(s.api_id == api_id && s.stage == stage));
            if plan.api_stages.len() == before {
                return Err(AdminError::NotFound(format!(
                    "Invalid API Stage {{api: {api_id}, stage: {stage}}} specified for usageplan {}",
                    plan.id
                )));
            }
        }
        _ if path.starts_with("/apiStages/") => apply_method_throttle_op(plan, verb, path, value)?,
        _ => return Err(invalid()),
    }
    Ok(())
}

/// `/apiStages/{apiId}:{stage}/throttle[/{resourcePath}/{METHOD}[/rateLimit|/burstLimit]]`, with the
/// resource path's slashes plain or `~1`-escaped.
fn apply_method_throttle_op(
    plan: &mut UsagePlan,
    verb: &str,
    path: &str,
    value: Option<&str>,
) -> Result<(), AdminError> {
    let invalid = || {
        bad(format!(
            "Invalid patch path {path} specified for op '{verb}'"
        ))
    };
    let rest = &path["/apiStages/".len()..];
    let (stage_ref, tail) = rest.split_once('/').ok_or_else(invalid)?;
    let (api_id, stage) = parse_stage_ref(Some(&pointer_unescape(stage_ref)))?;
    let tail = tail.strip_prefix("throttle").ok_or_else(invalid)?;
    let plan_id = plan.id.clone();
    // A new method throttle starts as a copy of the plan's, then the operation changes one member.
    let start = plan.throttle.unwrap_or(ThrottleSettings {
        rate_limit: 0.0,
        burst_limit: 0,
    });
    let target = plan
        .api_stages
        .iter_mut()
        .find(|s| s.api_id == api_id && s.stage == stage)
        .ok_or_else(|| {
            AdminError::NotFound(format!("Invalid API Stage {{api: {api_id}, stage: {stage}}} specified for usageplan {plan_id}"))
        })?;
    if tail.is_empty() {
        return match verb {
            "remove" => {
                target.throttle.clear();
                Ok(())
            }
            "replace" | "add" => {
                let map: BTreeMap<String, ThrottleIn> =
                    serde_json::from_str(value.unwrap_or(""))
                        .map_err(|e| bad(format!("Invalid throttle map for {path}: {e}")))?;
                target.throttle = map
                    .iter()
                    .map(|(k, t)| Ok((k.clone(), throttle_from(t)?)))
                    .collect::<Result<_, AdminError>>()?;
                Ok(())
            }
            _ => Err(invalid()),
        };
    }
    let unescaped = pointer_unescape(tail.strip_prefix('/').ok_or_else(invalid)?);
    let (method_key, field) = match unescaped.rsplit_once('/') {
        Some((head, f @ ("rateLimit" | "burstLimit"))) => (head.to_string(), Some(f)),
        _ => (unescaped.clone(), None),
    };
    // `method_key` is "/resource/path/METHOD": the resource path's own slashes included.
    if !method_key.starts_with('/')
        || method_key
            .rsplit_once('/')
            .is_none_or(|(_, m)| m.is_empty())
    {
        return Err(invalid());
    }
    match (verb, field) {
        ("remove", None) => {
            target.throttle.remove(&method_key).ok_or_else(invalid)?;
        }
        ("replace" | "add", Some(field)) => {
            let t = target.throttle.entry(method_key).or_insert(start);
            if field == "rateLimit" {
                t.rate_limit = parse_number(value, path)?;
            } else {
                t.burst_limit = parse_number(value, path)?;
            }
            check_throttle(t).map_err(|e| bad(e.to_string()))?;
        }
        _ => return Err(invalid()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_keys_are_read_in_batches_in_creation_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = tollgate_store::SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let mut ids = Vec::new();
        // Created in the order opposite to their ids'.
        for i in (0..1203).rev() {
            let id = format!("key{i:05}");
            store
                .put_key(&ApiKey {
                    id: id.clone(),
                    name: format!("name{}", i % 3),
                    description: None,
                    customer_id: None,
                    enabled: true,
                    value_hash: KeyHash::of(format!("batchedKeyValue{i:010}")),
                    sealed_value: None,
                    created_date: 0,
                    last_updated_date: 0,
                    ..ApiKey::default()
                })
                .unwrap();
            ids.push(id);
        }
        let read: Vec<(u64, String)> = stored_keys(&store, None)
            .map(|k| k.map(|(place, k)| (place, k.id)).unwrap())
            .collect();
        let read_ids: Vec<&String> = read.iter().map(|(_, id)| id).collect();
        assert_eq!(
            read_ids,
            ids.iter().collect::<Vec<_>>(),
            "three batches, none repeated or lost"
        );
        let from: Vec<String> = stored_keys(&store, Some(read[600].0))
            .map(|k| k.unwrap().1.id)
            .collect();
        assert_eq!(from, ids[600..]);

        // A filtered page reads on until it is full, and says where the next one starts.
        let paging = Paging {
            limit: Some(400),
            position: None,
        };
        let name2 =
            stored_keys(&store, None).filter(|k| k.as_ref().is_ok_and(|(_, k)| k.name == "name2"));
        let page = first_page(
            name2,
            |(place, _): &(u64, ApiKey)| place.to_string(),
            &paging,
        )
        .unwrap();
        assert_eq!(page.item.len(), 400);
        // name2 is every third key created, from `key01202` down: the 400th is `key00005`, and
        // the next page starts at the 401st, `key00002`.
        assert_eq!(page.item[399].1.id, "key00005");
        assert_eq!(
            page.position.as_deref(),
            Some(read[1200].0.to_string().as_str())
        );
    }

    #[test]
    fn paging_in_order() {
        let items: Vec<String> = (0..7).map(|i| format!("id{}", 7 - i)).collect();
        let at = |position: Option<String>, limit| Paging {
            limit: Some(limit),
            position,
        };
        let p = page_in_order(items.clone(), &at(None, 3)).unwrap();
        assert_eq!(p.item, vec!["id7", "id6", "id5"]);
        assert_eq!(p.position.as_deref(), Some("3"));
        let p = page_in_order(items.clone(), &at(p.position, 3)).unwrap();
        assert_eq!(p.item, vec!["id4", "id3", "id2"]);
        let p = page_in_order(items.clone(), &at(p.position, 3)).unwrap();
        assert_eq!((p.item, p.position), (vec!["id1".to_string()], None));
        assert_eq!(
            page_in_order(items.clone(), &at(None, -1))
                .unwrap()
                .item
                .len(),
            7
        );
        assert!(
            page_in_order(items.clone(), &at(Some("99".into()), 3))
                .unwrap()
                .item
                .is_empty()
        );
        assert!(matches!(
            page_in_order(items, &at(Some("id3".into()), 3)),
            Err(AdminError::BadRequest(_))
        ));
    }

    fn plan() -> UsagePlan {
        UsagePlan {
            id: "p1".into(),
            name: "n".into(),
            description: None,
            api_stages: vec![ApiStage {
                api_id: "a".into(),
                stage: "prod".into(),
                throttle: BTreeMap::new(),
            }],
            throttle: None,
            quota: None,
            ..UsagePlan::default()
        }
    }

    fn op(verb: &str, path: &str, value: Option<&str>) -> PatchOp {
        PatchOp {
            op: Some(verb.into()),
            path: Some(path.into()),
            value: value.map(Into::into),
            from: None,
        }
    }

    #[test]
    fn plan_patch_paths() {
        let mut p = plan();
        let mut q = None;
        for o in [
            op("replace", "/throttle/rateLimit", Some("0.5")),
            op("replace", "/throttle/burstLimit", Some("3")),
            op("replace", "/quota/limit", Some("500")),
            op("replace", "/quota/period", Some("WEEK")),
            op(
                "replace",
                "/apiStages/a:prod/throttle/~1pets~1{id}/GET/rateLimit",
                Some("0.1"),
            ),
            op(
                "replace",
                "/apiStages/a:prod/throttle//pets/GET/burstLimit",
                Some("1"),
            ),
            op("add", "/apiStages", Some("a:dev")),
        ] {
            apply_plan_op(&mut p, &mut q, &o).unwrap();
        }
        assert_eq!(
            p.throttle,
            Some(ThrottleSettings {
                rate_limit: 0.5,
                burst_limit: 3
            })
        );
        assert_eq!(
            quota_from(q.as_ref().unwrap()).unwrap(),
            QuotaSettings {
                limit: 500,
                offset: 0,
                period: Period::Week
            }
        );
        // New method throttles start from the plan throttle (0.5/s, burst 3).
        assert_eq!(
            p.api_stages[0].throttle["/pets/{id}/GET"],
            ThrottleSettings {
                rate_limit: 0.1,
                burst_limit: 3
            }
        );
        assert_eq!(
            p.api_stages[0].throttle["/pets/GET"],
            ThrottleSettings {
                rate_limit: 0.5,
                burst_limit: 1
            }
        );
        assert_eq!(p.api_stages.len(), 2);

        apply_plan_op(
            &mut p,
            &mut q,
            &op(
                "remove",
                "/apiStages/a:prod/throttle/~1pets~1{id}/GET",
                None,
            ),
        )
        .unwrap();
        assert_eq!(p.api_stages[0].throttle.len(), 1);
        apply_plan_op(
            &mut p,
            &mut q,
            &op(
                "replace",
                "/apiStages/a:prod/throttle",
                Some(r#"{"//GET":{"rateLimit":1.0,"burstLimit":1}}"#),
            ),
        )
        .unwrap();
        assert_eq!(
            p.api_stages[0].throttle.keys().collect::<Vec<_>>(),
            vec!["//GET"]
        );
        apply_plan_op(
            &mut p,
            &mut q,
            &op("remove", "/apiStages/a:prod/throttle", None),
        )
        .unwrap();
        assert!(p.api_stages[0].throttle.is_empty());

        for bad_op in [
            op("remove", "/apiStages", None),
            op("remove", "/apiStages", Some("nocolon")),
            op("replace", "/id", Some("x")),
            op("replace", "/throttle/rateLimit", Some("fast")),
            op(
                "replace",
                "/apiStages/a:prod/throttle/pets/GET/rateLimit",
                Some("1"),
            ),
        ] {
            assert!(
                matches!(
                    apply_plan_op(&mut p, &mut q, &bad_op),
                    Err(AdminError::BadRequest(_))
                ),
                "{bad_op:?}"
            );
        }
        let err =
            apply_plan_op(&mut p, &mut q, &op("remove", "/apiStages", Some("a:nope"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid API Stage {api: a, stage: nope} specified for usageplan p1"
        );
    }
}
