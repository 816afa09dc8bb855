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

mod credits;
mod events;
mod keys;
mod paging;
mod patch;
mod plans;
mod pool;
mod tags;
mod usage;

use std::collections::{BTreeMap, HashMap};
use std::future::Future;
use std::sync::Arc;

use tollgate_core::quota::EpochDay;
use tollgate_core::rules::ApiOutline;
use tollgate_core::{ApiKey, KeyHash, UsagePlan};
use tollgate_store::report::{PeriodUsed, keys_period_used, period_used};
use tollgate_store::{CreditBalance, KeyIndex, Memberships, NamedKey, OnStoreFailure, Store};

use crate::data_plane::DataPlane;
use crate::error::AdminError;
use crate::seal::Sealer;
use crate::sigv4::Credentials;

pub use keys::{KeyChange, NameQuery};
pub use paging::Paging;

/// How the control plane is set up.
#[derive(Debug, Clone, Default)]
pub struct AdminSettings {
    /// Accepted SigV4 credentials; empty means requests are not authenticated (loopback only).
    pub credentials: Vec<Credentials>,
    /// Set when key values are stored encrypted (`keyValueStorage: encrypted`).
    pub sealer: Option<Sealer>,
    /// What usage plans may name of the configured APIs.
    pub apis: Vec<ApiOutline>,
    /// The configured webhooks' names.
    pub webhooks: Vec<String>,
}

/// The plans whose live quota counts a write invalidates: they are recomputed from the store.
pub(crate) type Recount = Vec<String>;

/// Up to this many keys written at once (an import) are read alone; more, and reading every record
/// again costs less than reading each of them and its counts.
const KEYS_SERVED_ALONE: usize = 10_000;

/// What a write changed: what is served again after it.
#[derive(Debug, Clone)]
pub(crate) enum Written {
    /// These keys (their records or their plans): only they are read and served again.
    Keys(Vec<String>),
    /// This key (or none, gone) as the store answered its write: served as it is, not read again.
    Read(String, Option<Box<NamedKey>>),
    /// Plans: every record is read and served again, the live quota counts of these plans
    /// recomputed from the store.
    Plans(Recount),
}

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
    /// Where store calls and changes of what is served run: below the data plane's priority.
    pool: pool::Pool,
}

/// Runs `f` on the thread every snapshot is built on, the start's included (see [`pool::builds`]).
pub async fn on_build_thread<T: Send + 'static>(
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    pool::builds().run(f).await
}

/// The control plane's threads: writes are serialised, reads (listings, usage) may run beside them.
const ADMIN_THREADS: usize = 4;

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

/// Runs `work` to its end even if the caller goes away (a client that hangs up mid-write): a write
/// that has begun is finished and served.
pub(crate) async fn to_the_end<T: Send + 'static>(
    work: impl Future<Output = Result<T, AdminError>> + Send + 'static,
) -> Result<T, AdminError> {
    tokio::spawn(work)
        .await
        .map_err(|e| AdminError::Internal(format!("admin write: {e}")))?
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
            pool: pool::Pool::new("tollgate-admin", ADMIN_THREADS),
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
    pub async fn refresh(self: &Arc<Self>, fresh: KeyIndex) {
        let mut plans = self.plans.lock().await;
        plans.clone_from(&fresh.plans);
        let served = self
            .building(move |admin| {
                admin.gateway.reload(&fresh, &PeriodUsed::default());
                Ok(())
            })
            .await;
        if let Err(e) = served {
            tracing::error!(error = %e, "could not serve the records another instance changed");
        }
    }

    /// Serves keys `ids` as another instance changed them (cluster mode), as `changed` holds them,
    /// under the write lock; `false` when everything must be read again instead.
    pub async fn refresh_keys(self: &Arc<Self>, changed: KeyIndex, ids: Vec<String>) -> bool {
        let _plans = self.plans.lock().await;
        self.building(move |admin| {
            Ok(admin
                .gateway
                .change_keys(&changed, &ids, &PeriodUsed::default()))
        })
        .await
        .unwrap_or(false)
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
        tollgate_core::clock::epoch_secs(self.gateway.now())
    }

    pub(crate) fn today(&self) -> EpochDay {
        EpochDay::from_nanos(self.gateway.now())
    }

    /// Runs `f`, which calls the store, on the control plane's own threads, below the data plane's
    /// priority. Store calls block (SQLite's file, the Redis connection); this and
    /// [`Admin::building`] are the places the control plane waits for them, so no async worker is
    /// held up by one.
    pub(crate) async fn blocking<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Self) -> Result<T, AdminError> + Send + 'static,
    ) -> Result<T, AdminError> {
        self.run_on(&self.pool, f).await
    }

    /// [`Admin::blocking`] for work that changes what is served: on the thread every snapshot is
    /// built on (see [`pool::builds`]).
    pub(crate) async fn building<T: Send + 'static>(
        self: &Arc<Self>,
        f: impl FnOnce(&Self) -> Result<T, AdminError> + Send + 'static,
    ) -> Result<T, AdminError> {
        self.run_on(pool::builds(), f).await
    }

    async fn run_on<T: Send + 'static>(
        self: &Arc<Self>,
        pool: &pool::Pool,
        f: impl FnOnce(&Self) -> Result<T, AdminError> + Send + 'static,
    ) -> Result<T, AdminError> {
        let admin = Arc::clone(self);
        pool.run(move || f(&admin))
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
        f: impl FnOnce(&Self, &mut Catalog<'_>) -> Result<(T, Written), AdminError> + Send + 'static,
    ) -> Result<T, AdminError> {
        let admin = Arc::clone(self);
        to_the_end(async move {
            let plans = admin.lock_plans().await;
            let (mut plans, written) = admin.apply(plans, f).await?;
            match written {
                Ok((out, changed)) => {
                    admin.serve_store(&mut plans, changed).await?;
                    Ok(out)
                }
                // What reached the store before the failure is served, whatever it was.
                Err(e) => {
                    admin
                        .serve_store(&mut plans, Written::Plans(Vec::new()))
                        .await?;
                    Err(e)
                }
            }
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

    /// Serves what `written` changed in the store from the next request on, under the write lock
    /// `plans` is from.
    pub(crate) async fn serve_store(
        self: &Arc<Self>,
        plans: &mut HeldPlans,
        written: Written,
    ) -> Result<(), AdminError> {
        self.serve_store_with(plans, written, HashMap::new()).await
    }

    /// [`Self::serve_store`], with the stored `credits` of keys new to credits on this instance.
    pub(crate) async fn serve_store_with(
        self: &Arc<Self>,
        plans: &mut HeldPlans,
        written: Written,
        credits: HashMap<String, CreditBalance>,
    ) -> Result<(), AdminError> {
        let (ids, found) = match written {
            Written::Keys(ids) if ids.len() <= KEYS_SERVED_ALONE => (ids, None),
            Written::Read(id, key) => (vec![id], Some(key.into_iter().map(|k| *k).collect())),
            Written::Keys(_) => return self.serve_all(plans, Vec::new(), credits).await,
            Written::Plans(recount) => return self.serve_all(plans, recount, credits).await,
        };
        if self.serve_keys(plans, ids, found, credits.clone()).await? {
            return Ok(());
        }
        self.serve_all(plans, Vec::new(), credits).await
    }

    /// Serves keys `ids` as the store holds them now (with their plans, or gone): as `found`
    /// (those of them there are, as their write answered them), or read alone. A write of a few
    /// keys costs what it changed, whatever the number of other keys. Their new memberships and
    /// customers start from the store's counts. `false` when the data plane needs everything read
    /// again instead (see `Snapshot::change_keys`).
    async fn serve_keys(
        self: &Arc<Self>,
        plans: &HeldPlans,
        ids: Vec<String>,
        found: Option<Vec<NamedKey>>,
        credits: HashMap<String, CreditBalance>,
    ) -> Result<bool, AdminError> {
        let started = std::time::Instant::now();
        let (today, plans) = (self.today(), plans.to_vec());
        let (index, ids) = match found {
            Some(found) => (KeyIndex::of_keys(plans, &found), ids),
            None => {
                self.blocking(move |admin| {
                    let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
                    let found: Vec<_> = admin
                        .store
                        .keys_by_id(&refs)?
                        .into_iter()
                        .flatten()
                        .collect();
                    Ok((KeyIndex::of_keys(plans, &found), ids))
                })
                .await?
            }
        };
        let quota = index
            .bindings()
            .iter()
            .any(|&(p, _)| index.plans[p as usize].quota.is_some());
        if quota {
            // New memberships start from the store's counts: everything counted so far is in it.
            self.gateway.flush().await.map_err(AdminError::Internal)?;
        }
        let (ids, served) = self
            .building(move |admin| {
                let mut used = keys_period_used(&*admin.store, &index, today)?;
                used.credits = credits;
                let served = admin.gateway.change_keys(&index, &ids, &used);
                Ok((ids, served))
            })
            .await?;
        tracing::debug!(
            keys = ids.len(),
            served,
            us = started.elapsed().as_micros() as u64,
            "admin write of keys served"
        );
        Ok(served)
    }

    /// Serves every record in the store from the next request on; the live quota counts of the
    /// `recount` plans are rebuilt from the store.
    async fn serve_all(
        self: &Arc<Self>,
        plans: &mut HeldPlans,
        recount: Recount,
        credits: HashMap<String, CreditBalance>,
    ) -> Result<(), AdminError> {
        let started = std::time::Instant::now();
        // A customer new to the snapshot (e.g. its keys rebound) starts from the store too.
        let sharing = plans.iter().any(|p| p.limits_share_by().is_some());
        if !recount.is_empty() || sharing {
            // Quota counts are rebuilt from the store: everything counted so far must be in it.
            self.gateway.flush().await.map_err(AdminError::Internal)?;
        }
        let today = self.today();
        let (keys, stored_plans) = self
            .building(move |admin| {
                let index = admin.store.load_index()?;
                let mut used =
                    period_used(&*admin.store, &index, |p| recount.contains(&p.id), today)?;
                used.credits = credits;
                admin.gateway.reload(&index, &used);
                Ok((index.len(), index.into_plans()))
            })
            .await?;
        **plans = stored_plans;
        tracing::debug!(
            keys,
            ms = started.elapsed().as_millis() as u64,
            "admin write served"
        );
        Ok(())
    }
}
