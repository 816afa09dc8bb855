//! tollgate's persistent state: keys, usage plans, their bindings and per-day usage.
//!
//! [`Store`] is the one interface the gateway and the CLI use; [`SqliteStore`] is the embedded
//! default. Every implementation must pass [`conformance`].

#[cfg(any(test, feature = "testing"))]
pub mod conformance;
pub mod ids;
mod index;
pub mod limiter;
pub mod redis;
pub mod report;
mod sqlite;
mod sync;
#[cfg(any(test, feature = "testing"))]
pub mod testing;

pub use index::{KeyIndex, KeyTerms};
pub use redis::{RedisSettings, RedisStore};
pub use sqlite::SqliteStore;
pub use sync::{DeclaredKey, DeclaredPlan, GeneratedKey, OPENING_CREDITS, SealFn, apply_declared};

use std::collections::{HashMap, HashSet};

use tollgate_core::quota::EpochDay;
use tollgate_core::{ApiKey, UsagePlan};

/// What the data plane does with keyed requests while the shared store cannot decide their limits
/// (`store.onStoreFailure`).
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

impl OnStoreFailure {
    /// Every mode, in the order the docs list them.
    pub const ALL: [Self; 3] = [Self::Local, Self::Allow, Self::Deny];

    /// The mode's name in the config and the health report.
    pub fn name(self) -> &'static str {
        match self {
            Self::Local => "local",
            Self::Allow => "allow",
            Self::Deny => "deny",
        }
    }

    /// The mode named `name`.
    pub fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|m| m.name() == name)
    }
}

/// The keys and plan memberships a data plane serves, as the control plane checks writes against
/// them (the gateway's snapshot is one).
pub trait Memberships: Send + Sync {
    /// Whether key `key_id` exists (enabled or not).
    fn has_key(&self, key_id: &str) -> bool;
    /// The id of the key whose value, or value before its last rotation, hashes to `hash`.
    fn key_with_hash(&self, hash: &tollgate_core::KeyHash) -> Option<&str>;
    /// The ids of the plans key `key_id` is in.
    fn plans_of(&self, key_id: &str) -> Vec<&str>;
    /// The ids of the keys in plan `plan_id`, sorted.
    fn keys_of(&self, plan_id: &str) -> Vec<&str>;
    /// The customers whose keys share plan `plan_id`'s limits, each with the ids of its keys in
    /// it (sorted), in customer order.
    fn customers_of(&self, plan_id: &str) -> Vec<(&str, Vec<&str>)>;
}

/// Everything the gateway needs to build its in-memory snapshot.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Records {
    /// All usage plans.
    pub plans: Vec<UsagePlan>,
    /// All API keys.
    pub keys: Vec<ApiKey>,
    /// (plan id, key id): AWS's UsagePlanKeys.
    pub bindings: Vec<(String, String)>,
}

/// A key found by name, and the ids of the plans it is in.
pub type NamedKey = (ApiKey, Vec<String>);

/// For each of `names`, the oldest key of `records` with that name, and the ids of its plans,
/// sorted.
pub(crate) fn keys_named_in(records: Records, names: &[&str]) -> Vec<Option<NamedKey>> {
    let wanted: HashSet<&str> = names.iter().copied().collect();
    let mut plans: HashMap<String, Vec<String>> = HashMap::new();
    for (plan, key) in records.bindings {
        plans.entry(key).or_default().push(plan);
    }
    let found = records
        .keys
        .into_iter()
        .filter(|k| wanted.contains(k.name.as_str()))
        .map(|k| {
            let of_key = plans.remove(&k.id).unwrap_or_default();
            (k, of_key)
        });
    oldest_named(names, found)
}

/// For each of `names`, the oldest of `found` (keys with their plans) that has that name (by
/// creation date, then id), its plans sorted.
pub(crate) fn oldest_named(
    names: &[&str],
    found: impl IntoIterator<Item = NamedKey>,
) -> Vec<Option<NamedKey>> {
    let mut oldest: HashMap<String, NamedKey> = HashMap::new();
    for (key, mut plans) in found {
        if !names.contains(&key.name.as_str()) {
            continue;
        }
        let older = |k: &ApiKey| (key.created_date, &key.id) < (k.created_date, &k.id);
        if oldest.get(&key.name).is_none_or(|(k, _)| older(k)) {
            plans.sort();
            oldest.insert(key.name.clone(), (key, plans));
        }
    }
    names.iter().map(|n| oldest.get(*n).cloned()).collect()
}

/// Requests to add to one key's counts under one plan on one UTC day, and when it was last used.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageDelta {
    /// The usage plan.
    pub plan_id: String,
    /// The API key.
    pub key_id: String,
    /// The UTC day.
    pub day: EpochDay,
    /// Requests admitted: AWS's usage.
    pub count: u64,
    /// Requests refused by a throttle.
    pub throttled: u64,
    /// Requests refused for the spent quota.
    pub quota_exceeded: u64,
    /// When the key was presented (epoch seconds); a key's `lastUsedDate` is the latest of these.
    pub last_used: Option<u64>,
}

/// Requests to add to a customer's shared count under one plan on one UTC day: what the keys of one
/// `customerId` spent together in a plan that shares limits by customer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CustomerDelta {
    /// The usage plan.
    pub plan_id: String,
    /// The customer.
    pub customer_id: String,
    /// The UTC day.
    pub day: EpochDay,
    /// Requests admitted (their cost): the customer's usage.
    pub count: u64,
}

/// Credits admitted requests of one key spent on one UTC day (their cost).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreditSpend {
    /// The API key.
    pub key_id: String,
    /// The UTC day.
    pub day: EpochDay,
    /// Credits spent.
    pub spent: u64,
}

/// A key's credits as the store holds them.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreditBalance {
    /// The API key.
    pub key_id: String,
    /// What its ledger added, less what it spent (never below 0).
    pub balance: u64,
    /// The first day of the refill period it was last refilled in.
    pub refilled: Option<EpochDay>,
}

/// An event in the outbox: waiting to be delivered to its webhook, or kept after every delivery
/// failed for a day.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct OutboxEvent {
    /// The event's id (its JSON's `id`): receivers deduplicate on it.
    pub id: String,
    /// The webhook it goes to, by name.
    pub webhook: String,
    /// The event, as JSON.
    pub body: String,
    /// When it was queued, epoch seconds.
    pub created: i64,
    /// Deliveries tried.
    pub attempts: u32,
    /// When the next delivery is due, epoch seconds.
    pub next_at: i64,
    /// Where it stands.
    pub status: EventStatus,
    /// Why the last delivery failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
}

/// Where an event stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum EventStatus {
    /// Waiting for its next delivery.
    Pending,
    /// Every delivery failed for a day: kept until retried.
    Failed,
}

impl EventStatus {
    /// The status named `name` (`pending`, `failed`).
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "pending" => Some(Self::Pending),
            "failed" => Some(Self::Failed),
            _ => None,
        }
    }
}

/// How a delivery went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attempt {
    /// The webhook took it: the event leaves the outbox.
    Delivered,
    /// It failed; the next try is due at `at` (epoch seconds).
    Retry {
        /// When.
        at: i64,
        /// Why it failed.
        error: String,
    },
    /// It failed, and no more tries are due: kept as failed.
    Failed {
        /// Why it failed.
        error: String,
    },
}

/// What an exporter has sent of one holder's counts under a plan on one UTC day: the day's totals
/// as they stood when its last window closed, so the next window sends what came since.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExportMark {
    /// The UTC day.
    pub day: EpochDay,
    /// The usage plan.
    pub plan_id: String,
    /// Whose counts (the exporter's own name for a key or a customer; opaque to the store).
    pub holder: String,
    /// Admitted (their cost), throttled, refused for the quota.
    pub counts: [u64; 3],
}

/// The usage records an exporter made for one window, kept until delivered (and after, for
/// replays, until they age out).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportBatch {
    /// The window's start, epoch seconds.
    pub start: i64,
    /// Its end (exclusive).
    pub end: i64,
    /// The records, as JSON.
    pub records: String,
    /// Whether the exporter's receiver took them.
    pub delivered: bool,
}

/// An exporter's place: every commit moves its version on, so two instances (or a backfill) never
/// both commit what they computed from one state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExportState {
    /// Commits made.
    pub version: u64,
    /// The end of the last window exported live (none before its first).
    pub cursor: Option<i64>,
}

/// One exporter commit: what it moves its state to, given the state it was computed from.
#[derive(Debug, Clone, Default)]
pub struct ExportCommit<'a> {
    /// The version it was computed from: the commit is made only while it is still current.
    pub version: u64,
    /// The new cursor (none: unchanged).
    pub cursor: Option<i64>,
    /// Marks to write, replacing the same (day, plan, holder).
    pub marks: &'a [ExportMark],
    /// The window's records, when it has any: a new window (an existing one is an error).
    pub batch: Option<&'a ExportBatch>,
    /// Batches that start before this and marks of days before it are deleted (epoch seconds).
    pub keep_from: i64,
}

/// Whose limits and counts a record keeps: one API key's, or those one customer's keys share in a
/// plan that shares limits by customer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Holder<'a> {
    /// An API key, by id.
    Key(&'a str),
    /// A customer, by `customerId`.
    Customer(&'a str),
}

/// What a per-day series of a plan's keys counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Series {
    /// Requests admitted (and counted against the quota).
    Used,
    /// Requests refused by a throttle.
    Throttled,
    /// Requests refused because the quota was spent.
    QuotaExceeded,
    /// Changes to a quota period's count made through UpdateUsage (positive: fewer requests left).
    QuotaAdjustment,
}

/// One key's (or, in a customer's series, one customer's) value in a [`Series`] on one day.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayValue {
    /// The API key (or the customer).
    pub key_id: String,
    /// The UTC day.
    pub day: EpochDay,
    /// Requests (or, for an adjustment, requests added to the count); never 0.
    pub value: i64,
}

impl DayValue {
    /// The value as a count of requests (a series other than adjustments is never negative).
    pub fn count(&self) -> u64 {
        u64::try_from(self.value).unwrap_or(0)
    }
}

/// The largest quota adjustment a day may hold, either way: UpdateUsage's `remaining` is at most
/// [`tollgate_core::MAX_REMAINING`], so one day's adjustments stay far inside this; a stored row
/// outside it was written by something else and is not applied.
pub const MAX_ADJUSTMENT: i64 = 1 << 53;

/// A stored adjustment of (plan, key) on `day` as read (`None`: not an integer), when it can be
/// applied; otherwise it is logged with the key and plan and left out, so one bad row costs neither
/// a start nor a usage report.
pub(crate) fn readable_adjustment(
    plan_id: &str,
    key_id: &str,
    day: EpochDay,
    delta: Option<i64>,
) -> Option<i64> {
    match delta {
        Some(d) if d.unsigned_abs() <= MAX_ADJUSTMENT.unsigned_abs() => Some(d),
        _ => {
            tracing::warn!(
                plan_id,
                key_id,
                day = day.0,
                ?delta,
                "a stored quota adjustment is not an integer in range; left out"
            );
            None
        }
    }
}

/// `stored + delta`, the day's adjustment after one more, while it stays within [`MAX_ADJUSTMENT`].
pub(crate) fn added_adjustment(stored: i64, delta: i64) -> Result<i64, StoreError> {
    stored
        .checked_add(delta)
        .filter(|sum| sum.unsigned_abs() <= MAX_ADJUSTMENT.unsigned_abs())
        .ok_or_else(|| {
            StoreError::Backend(format!("quota adjustment out of range: {stored} + {delta}"))
        })
}

/// What can go wrong in a store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Another key already has this value (AWS: "API Key already exists").
    #[error("API Key already exists")]
    DuplicateKeyValue,
    /// A declared key's value is another key's in the store.
    #[error(
        "API Key already exists: the value of API key {declared:?} is held by API key {holder_name:?} ({holder_id}); give it another value, or remove that key"
    )]
    ValueHeld {
        /// The declared key's name.
        declared: String,
        /// The key holding the value.
        holder_id: String,
        /// Its name.
        holder_name: String,
    },
    /// A record the operation refers to does not exist.
    #[error("{0}")]
    NotFound(String),
    /// The backing database failed.
    #[error("store backend: {0}")]
    Backend(String),
    /// A stored record could not be decoded.
    #[error("corrupt record {id}: {reason}")]
    Corrupt {
        /// The record's id.
        id: String,
        /// What was wrong with it.
        reason: String,
    },
}

/// Writes `records` one write at a time.
fn put_each(store: &(impl Store + ?Sized), records: &Records) -> Result<(), StoreError> {
    for plan in &records.plans {
        store.put_plan(plan)?;
    }
    for key in &records.keys {
        store.put_key(key)?;
    }
    for (plan, key) in &records.bindings {
        store.bind(plan, key)?;
    }
    Ok(())
}

/// Persistent records and usage. Methods block (they do I/O); async callers run them on a blocking
/// thread, never on the request path.
pub trait Store: Send + Sync {
    /// Loads every plan, key and binding.
    fn load(&self) -> Result<Records, StoreError>;
    /// Loads what the gateway serves from. Backends override it to skip reading whole records.
    fn load_index(&self) -> Result<KeyIndex, StoreError> {
        Ok(KeyIndex::from(&self.load()?))
    }
    /// Loads every plan (and nothing of the keys: there may be millions), in creation order.
    fn plans(&self) -> Result<Vec<UsagePlan>, StoreError>;
    /// One key, by id.
    fn key(&self, key_id: &str) -> Result<Option<ApiKey>, StoreError>;
    /// For each of `names`, in order, the key with that name (the oldest, if several have it) and the
    /// ids of its plans. This default reads every record once; backends with an index on names look
    /// each one up instead.
    fn keys_named(&self, names: &[&str]) -> Result<Vec<Option<NamedKey>>, StoreError> {
        if names.is_empty() {
            // A config that declares no keys: a million records are not read for nothing.
            return Ok(Vec::new());
        }
        Ok(keys_named_in(self.load()?, names))
    }
    /// For each of `ids`, in order, the key with that id and the ids of its plans, sorted: what a
    /// write of a few keys serves again. This default reads every record once; backends look each
    /// one up instead.
    fn keys_by_id(&self, ids: &[&str]) -> Result<Vec<Option<NamedKey>>, StoreError> {
        let records = self.load()?;
        let mut found: HashMap<&str, NamedKey> = HashMap::new();
        let wanted: HashSet<&str> = ids.iter().copied().collect();
        for key in records
            .keys
            .iter()
            .filter(|k| wanted.contains(k.id.as_str()))
        {
            found.insert(&key.id, (key.clone(), Vec::new()));
        }
        for (plan, key) in &records.bindings {
            if let Some((_, plans)) = found.get_mut(key.as_str()) {
                plans.push(plan.clone());
            }
        }
        Ok(ids
            .iter()
            .map(|id| {
                found.remove(id).map(|(key, mut plans)| {
                    plans.sort();
                    (key, plans)
                })
            })
            .collect())
    }
    /// Up to `limit` keys in creation order from place `from` on (the first when `None`), each
    /// with its place: one page of a listing. A store gives each new key a place after all others'
    /// (a rewrite keeps it), so pages neither repeat nor skip a key as others come and go.
    fn keys_from(&self, from: Option<u64>, limit: usize) -> Result<Vec<(u64, ApiKey)>, StoreError>;
    /// Creates or replaces a plan (matched by id).
    fn put_plan(&self, plan: &UsagePlan) -> Result<(), StoreError>;
    /// Creates or replaces a key (matched by id). Fails with [`StoreError::DuplicateKeyValue`] when
    /// another key has the same value hash.
    fn put_key(&self, key: &ApiKey) -> Result<(), StoreError>;
    /// Deletes a key and its plan memberships (usage history stays). Unknown ids are not an error.
    fn delete_key(&self, key_id: &str) -> Result<(), StoreError>;
    /// Deletes a plan and its key memberships (usage history stays). Unknown ids are not an error.
    fn delete_plan(&self, plan_id: &str) -> Result<(), StoreError>;
    /// Adds a key to a plan (idempotent).
    fn bind(&self, plan_id: &str, key_id: &str) -> Result<(), StoreError>;
    /// Removes a key from a plan (idempotent).
    fn unbind(&self, plan_id: &str, key_id: &str) -> Result<(), StoreError>;
    /// [`Self::put_key`], answering the key as the store holds it right after the write, as
    /// [`Self::keys_by_id`] does: what the writer serves. This default reads it back; a backend
    /// with round trips answers with the write.
    fn put_key_read(&self, key: &ApiKey) -> Result<Option<NamedKey>, StoreError> {
        self.put_key(key)?;
        Ok(self.keys_by_id(&[&key.id])?.pop().flatten())
    }
    /// [`Self::bind`], answering as [`Self::put_key_read`] does.
    fn bind_read(&self, plan_id: &str, key_id: &str) -> Result<Option<NamedKey>, StoreError> {
        self.bind(plan_id, key_id)?;
        Ok(self.keys_by_id(&[key_id])?.pop().flatten())
    }
    /// Writes every plan, key and binding of `records` (what `tollgate migrate` copies); a backend
    /// with round trips batches them.
    fn put_records(&self, records: &Records) -> Result<(), StoreError> {
        put_each(self, records)
    }
    /// Adds counted requests and notes last uses, all in one transaction.
    fn add_usage(&self, deltas: &[UsageDelta]) -> Result<(), StoreError>;
    /// For each of `key_ids`, in order, when it was last used (epoch seconds), if ever.
    fn last_used(&self, key_ids: &[&str]) -> Result<Vec<Option<u64>>, StoreError>;
    /// The dashboard's session epoch of `user` (an admin access key id): 0 until its first
    /// sign-out. A session signed under an older epoch is over, on every instance and after restarts.
    fn session_epoch(&self, user: &str) -> Result<u64, StoreError>;
    /// Ends every dashboard session of `user` (sign-out): its epoch goes up by one; returns it.
    fn end_sessions(&self, user: &str) -> Result<u64, StoreError>;
    /// Adds `delta` to the quota adjustment of (plan, key) on `day`: what AWS UpdateUsage
    /// (`replace /remaining`) records, so a changed remaining count survives restarts.
    fn adjust_quota(
        &self,
        plan_id: &str,
        key_id: &str,
        day: EpochDay,
        delta: i64,
    ) -> Result<(), StoreError>;
    /// Adds `amount` credits to key `key_id`'s ledger under `idempotency_key`, once: `false` when
    /// that idempotency key was used before for the key (nothing is added then). A refill's entry
    /// ([`tollgate_core::credits::refill_entry`]) also marks its period refilled.
    fn add_credits(
        &self,
        key_id: &str,
        idempotency_key: &str,
        amount: u64,
        at: i64,
    ) -> Result<bool, StoreError>;
    /// Records credits spent, all in one transaction.
    fn spend_credits(&self, spent: &[CreditSpend]) -> Result<(), StoreError>;
    /// Every key with credits (a ledger entry), with its balance.
    fn credit_balances(&self) -> Result<Vec<CreditBalance>, StoreError>;
    /// Key `key_id`'s credits, if it has a ledger entry. This default reads every key's; backends
    /// that can read one key's do.
    fn credit_balance(&self, key_id: &str) -> Result<Option<CreditBalance>, StoreError> {
        Ok(self
            .credit_balances()?
            .into_iter()
            .find(|b| b.key_id == key_id))
    }
    /// Queues `event` for delivery once: `false` (and nothing queued) when `claim` was made before,
    /// by this instance or another. The claim and the queued event are written together.
    fn enqueue_event(&self, claim: &str, event: &OutboxEvent) -> Result<bool, StoreError>;
    /// Up to `limit` pending events due at `now`, each leased until `lease_until` (other instances
    /// skip them meanwhile; a lease that runs out makes them due again).
    fn lease_events(
        &self,
        now: i64,
        lease_until: i64,
        limit: usize,
    ) -> Result<Vec<OutboxEvent>, StoreError>;
    /// Records how the delivery of event `id` went.
    fn record_attempt(&self, id: &str, attempt: &Attempt) -> Result<(), StoreError>;
    /// Up to `limit` events with `status`, oldest first.
    fn events(&self, status: EventStatus, limit: usize) -> Result<Vec<OutboxEvent>, StoreError>;
    /// Makes failed event `id` due again at `now`; `false` when no failed event has that id.
    fn retry_event(&self, id: &str, now: i64) -> Result<bool, StoreError>;
    /// Exporter `exporter`'s version and cursor (both empty before its first commit).
    fn export_state(&self, exporter: &str) -> Result<ExportState, StoreError>;
    /// Exporter `exporter`'s marks of `day`.
    fn export_marks(&self, exporter: &str, day: EpochDay) -> Result<Vec<ExportMark>, StoreError>;
    /// Makes `commit`, all at once: `false` (and nothing written) when the exporter's version is
    /// no longer `commit.version`.
    fn commit_export(&self, exporter: &str, commit: &ExportCommit<'_>) -> Result<bool, StoreError>;
    /// Exporter `exporter`'s batches starting from `from` to before `to`, in window order; only
    /// the undelivered ones when `pending`.
    fn export_batches(
        &self,
        exporter: &str,
        from: i64,
        to: i64,
        pending: bool,
    ) -> Result<Vec<ExportBatch>, StoreError>;
    /// Marks exporter `exporter`'s batch of window `start`..`end` delivered.
    fn export_delivered(&self, exporter: &str, start: i64, end: i64) -> Result<(), StoreError>;
    /// Adds customers' shared counts, all in one transaction.
    fn add_customer_usage(&self, deltas: &[CustomerDelta]) -> Result<(), StoreError>;
    /// Adds `delta` to the quota adjustment of (plan, customer) on `day`: UpdateUsage on a key of a
    /// plan that shares limits by customer changes what the customer has left.
    fn adjust_customer_quota(
        &self,
        plan_id: &str,
        customer_id: &str,
        day: EpochDay,
        delta: i64,
    ) -> Result<(), StoreError>;
    /// The days of `series` (`Used` or `QuotaAdjustment`; the others are counted per key) with a
    /// value for `customers` under a plan, from `from` to `to` inclusive, ordered by customer then
    /// day; each value's `key_id` is the customer's id.
    fn customer_series(
        &self,
        series: Series,
        plan_id: &str,
        customers: &[&str],
        from: EpochDay,
        to: EpochDay,
    ) -> Result<Vec<DayValue>, StoreError>;
    /// The days of `series` with a value, for a plan's keys (or one key) from `from` to `to`
    /// inclusive, ordered by key then day.
    fn series(
        &self,
        series: Series,
        plan_id: &str,
        key_id: Option<&str>,
        from: EpochDay,
        to: EpochDay,
    ) -> Result<Vec<DayValue>, StoreError>;
}
