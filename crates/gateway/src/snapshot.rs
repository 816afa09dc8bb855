//! The immutable in-memory view the request path reads: routes, keys, plans and the live limiter
//! state, plus the admission pipeline (key ▸ throttles ▸ quota ▸ meter) over it.
//!
//! A snapshot is built from the store's records once and swapped whole (`ArcSwap`) when they change;
//! a request does one lookup for its key and a handful of atomic operations, no locks, no I/O.
//!
//! Layout, for a million keys in little memory: keys sit in one array sorted by value hash behind a
//! directory on the hash's leading bits; key ids in one string; each (key, plan) membership is a plan
//! index and a slot number. A slot holds the membership's live state (bucket, quota count, meter: 24
//! bytes of atomics) in chunked arrays shared by successive snapshots, and keeps its number across
//! rebuilds, so a change of records neither refills buckets nor loses counts.

use std::collections::HashMap;
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use arc_swap::ArcSwap;
use http::Method;
use tollgate_core::clock::NANOS_PER_SEC;
use tollgate_core::gcra::{Gcra, GcraState, ThrottleDecision};
use tollgate_core::model::KEY_VALUE_LEN;
use tollgate_core::quota::{EpochDay, Quota, QuotaCount, QuotaDecision, QuotaWindow};
use tollgate_core::{KeyHash, ThrottleSettings, UsagePlan};
use tollgate_store::KeyIndex;

use crate::config::{GatewayConfig, Route};
use crate::meter::DailyMeter;
use crate::route::{RouteError, RouteMatch, Router};

/// One token bucket with its own state: the stage, account and per-method throttles.
#[derive(Debug)]
struct Bucket {
    gcra: Gcra,
    /// Shared with the same bucket in the snapshot this one replaced (carried over in place when its
    /// limits change), so a change of records does not refill anyone's bucket.
    state: Arc<GcraState>,
}

impl Bucket {
    /// A bucket for `settings`; with the bucket it replaces, it keeps that bucket's tokens.
    fn new(settings: ThrottleSettings, previous: Option<&Bucket>, now: u64) -> Self {
        let gcra = Gcra::new(settings);
        let state = match previous {
            Some(old) if old.gcra == gcra => old.state.clone(),
            Some(old) => {
                gcra.carry_over(&old.gcra, &old.state, now);
                old.state.clone()
            }
            None => Arc::default(),
        };
        Self { gcra, state }
    }
}

/// The live state of one membership: what its requests change.
#[derive(Debug, Default)]
struct Live {
    /// The plan's bucket (per-method buckets are [`Bucket`]s of their own).
    bucket: GcraState,
    quota: QuotaCount,
    meter: DailyMeter,
}

const CHUNK_BITS: u32 = 12;
const CHUNK_LEN: usize = 1 << CHUNK_BITS;

/// Slot numbers index chunks of this many [`Live`]s: growing never moves a slot.
type Chunk = Arc<[Live]>;

fn live_at(chunks: &[Chunk], slot: u32) -> &Live {
    &chunks[(slot >> CHUNK_BITS) as usize][slot as usize & (CHUNK_LEN - 1)]
}

/// A slot no membership holds any more, kept with its owner's ids until the flusher has taken its
/// last counts and no snapshot that could still count into it is in use.
#[derive(Debug)]
struct Retired {
    plan_id: Arc<str>,
    key_id: Box<str>,
    seen_by: Weak<Epoch>,
}

/// Which slots are taken. Rebuilds and the flusher lock it, never the request path.
#[derive(Debug, Default)]
struct SlotBook {
    chunks: Vec<Chunk>,
    len: u32,
    free: Vec<u32>,
    retired: HashMap<u32, Retired>,
}

impl SlotBook {
    fn allocate(&mut self) -> u32 {
        if let Some(slot) = self.free.pop() {
            return slot;
        }
        if self.len as usize == self.chunks.len() * CHUNK_LEN {
            self.chunks
                .push((0..CHUNK_LEN).map(|_| Live::default()).collect());
        }
        self.len += 1;
        self.len - 1
    }

    /// Frees the retired slots whose counts are all taken and that no snapshot in use can reach. A
    /// slot is handed to a new membership only then, so no count is ever booked to the wrong one.
    fn reclaim(&mut self) {
        let (chunks, free) = (&self.chunks, &mut self.free);
        self.retired.retain(|&slot, retired| {
            let live = live_at(chunks, slot);
            let done = retired.seen_by.strong_count() == 0 && live.meter.is_empty();
            if done {
                live.bucket.reset();
                free.push(slot);
            }
            !done
        });
    }
}

/// Counts the flusher has not taken: slots queued by their first count since the last take (the
/// flusher visits these, not a million memberships every second), and counts of an earlier day a
/// rollover displaced.
#[derive(Debug, Default)]
struct Metered {
    slots: Vec<u32>,
    displaced: Vec<(u32, EpochDay, u64)>,
}

/// The live state shared by a gateway's successive snapshots.
#[derive(Debug, Default)]
struct Slots {
    book: Mutex<SlotBook>,
    metered: Mutex<Metered>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One per snapshot. Each holds on to its successor's, so a snapshot's epoch stays alive while it or
/// any older snapshot is in use: what a retired slot waits for.
#[derive(Debug, Default)]
struct Epoch {
    newer: OnceLock<Arc<Epoch>>,
}

/// A usage plan as the request path applies it.
#[derive(Debug)]
struct PlanRules {
    id: Arc<str>,
    throttle: Option<Gcra>,
    quota: Option<Quota>,
    /// (api, stage) indices it covers.
    stages: Vec<(usize, usize)>,
    /// Per-method throttles: (api, stage, route) indices.
    methods: Vec<((usize, usize, usize), ThrottleSettings)>,
}

impl PlanRules {
    /// Resolves what `plan` covers in the configured APIs (unknown APIs, stages and methods are
    /// reported once per plan).
    fn resolve(plan: &UsagePlan, config: &GatewayConfig) -> Self {
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
            id: plan.id.as_str().into(),
            throttle: plan.throttle.map(Gcra::new),
            quota: plan.quota.map(Quota::new),
            stages,
            methods,
        }
    }

    fn method_at(&self, m: &RouteMatch<'_>) -> Option<(usize, usize, usize)> {
        let at = (m.api, m.stage, m.route);
        self.methods
            .iter()
            .any(|(here, _)| *here == at)
            .then_some(at)
    }
}

/// A key's record: 40 bytes. Its id and its memberships run up to the next record's.
#[derive(Debug, Clone, Copy)]
struct KeyRec {
    hash: KeyHash,
    id_start: u32,
    /// Index of its first membership; [`DISABLED`] set when the key is disabled.
    members: u32,
}

const DISABLED: u32 = 1 << 31;

/// One (key, plan) membership: 8 bytes.
#[derive(Debug, Clone, Copy)]
struct Member {
    plan: u32,
    slot: u32,
}

/// The keys, sorted by value hash, with their memberships in key order.
#[derive(Debug, Default)]
struct KeyTable {
    recs: Vec<KeyRec>,
    /// `dir[p]..dir[p + 1]`: the records whose hash starts with the `bits`-bit prefix `p`.
    dir: Vec<u32>,
    bits: u32,
    ids: String,
    /// Record indices in id order, for lookups by id (operator calls, rebuilds).
    by_id: Vec<u32>,
    members: Vec<Member>,
}

impl KeyTable {
    fn prefix(&self, hash: &KeyHash) -> usize {
        let lead = u64::from_be_bytes([
            hash.0[0], hash.0[1], hash.0[2], hash.0[3], hash.0[4], hash.0[5], hash.0[6], hash.0[7],
        ]);
        lead.checked_shr(64 - self.bits).unwrap_or(0) as usize
    }

    fn find(&self, hash: &KeyHash) -> Option<usize> {
        let p = self.prefix(hash);
        let range = self.dir[p] as usize..self.dir[p + 1] as usize;
        range.into_iter().find(|&i| self.recs[i].hash == *hash)
    }

    fn id(&self, i: usize) -> &str {
        let end = self
            .recs
            .get(i + 1)
            .map_or(self.ids.len(), |r| r.id_start as usize);
        &self.ids[self.recs[i].id_start as usize..end]
    }

    fn enabled(&self, i: usize) -> bool {
        self.recs[i].members & DISABLED == 0
    }

    fn members_of(&self, i: usize) -> Range<usize> {
        let start = (self.recs[i].members & !DISABLED) as usize;
        let end = self
            .recs
            .get(i + 1)
            .map_or(self.members.len(), |r| (r.members & !DISABLED) as usize);
        start..end
    }

    fn by_id(&self, id: &str) -> Option<usize> {
        let at = self
            .by_id
            .binary_search_by(|&i| self.id(i as usize).cmp(id))
            .ok()?;
        Some(self.by_id[at] as usize)
    }

    /// The key a membership belongs to.
    fn owner(&self, member: usize) -> usize {
        self.recs
            .partition_point(|r| (r.members & !DISABLED) as usize <= member)
            .saturating_sub(1)
    }
}

/// One API key's membership in one usage plan, as a request uses it.
#[derive(Clone, Copy)]
pub struct Grant<'s> {
    /// The key's id.
    pub key_id: &'s str,
    plan: &'s PlanRules,
    slot: u32,
    live: &'s Live,
    method_buckets: &'s HashMap<(u32, (usize, usize, usize)), Bucket>,
}

impl std::fmt::Debug for Grant<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Grant")
            .field("key_id", &self.key_id)
            .field("plan_id", &self.plan.id)
            .field("slot", &self.slot)
            .finish()
    }
}

impl<'s> Grant<'s> {
    /// The plan's id.
    pub fn plan_id(&self) -> &'s Arc<str> {
        &self.plan.id
    }

    /// The bucket that limits this key on the matched route: the per-method one, else the plan's.
    fn throttle_for(&self, m: &RouteMatch<'_>) -> Option<(&'s Gcra, &'s GcraState)> {
        match self.plan.method_at(m) {
            Some(at) => self
                .method_buckets
                .get(&(self.slot, at))
                .map(|b| (&b.gcra, &*b.state)),
            None => self.plan.throttle.as_ref().map(|g| (g, &self.live.bucket)),
        }
    }

    /// The throttle that limits this key on the matched route: the per-method one, else the plan's.
    pub fn bucket_for(&self, m: &RouteMatch<'_>) -> Option<&'s Gcra> {
        self.throttle_for(m).map(|(g, _)| g)
    }

    /// Whether the matched route has a per-method throttle of its own.
    pub fn has_method_throttle(&self, m: &RouteMatch<'_>) -> bool {
        self.plan.method_at(m).is_some()
    }

    /// The plan's quota, if it has one.
    pub fn quota(&self) -> Option<&'s Quota> {
        self.plan.quota.as_ref()
    }

    /// Sets what is left of the quota on this instance (AWS UpdateUsage); returns by how much the
    /// period's count changed, or `None` when the plan has no quota.
    pub fn set_remaining(&self, now: u64, remaining: i64) -> Option<i64> {
        self.quota()
            .map(|q| q.set_remaining(&self.live.quota, now, remaining))
    }

    fn remaining_quota(&self, now: u64) -> Option<u64> {
        self.quota().map(|q| q.remaining(&self.live.quota, now))
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
    pub grant: Option<Grant<'s>>,
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

/// Everything the request path reads, immutable except for atomics.
#[derive(Debug)]
pub struct Snapshot {
    routing: Arc<Routing>,
    plans: Vec<PlanRules>,
    keys: KeyTable,
    /// Slot → index of the membership holding it here ([`NO_MEMBER`] for slots that are not).
    owners: Vec<u32>,
    /// Per-method buckets, by (slot, (api, stage, route)).
    method_buckets: HashMap<(u32, (usize, usize, usize)), Bucket>,
    /// The slots' state, as of this snapshot: every slot it gives out is in these chunks.
    chunks: Vec<Chunk>,
    slots: Arc<Slots>,
    epoch: Arc<Epoch>,
    plans_in_use: usize,
}

const NO_MEMBER: u32 = u32::MAX;

fn ceil_secs(nanos: u64) -> u64 {
    nanos.div_ceil(NANOS_PER_SEC)
}

impl Snapshot {
    /// Builds the first snapshot. `period_used` gives, per (plan id, key id), the requests already
    /// counted in the quota period containing `today` (so limits survive restarts).
    pub fn build(
        config: GatewayConfig,
        records: &KeyIndex,
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
        let slots = Arc::<Slots>::default();
        let mut book = lock(&slots.book);
        Ok(Self::assemble(
            routing,
            records,
            period_used,
            today.start_nanos(),
            None,
            (&slots, &mut book),
        ))
    }

    /// Replaces the snapshot in `current` by one of changed records that keeps its live state at
    /// `now`: bucket levels (tokens carry over into changed throttles), quota counts of plans whose
    /// quota did not change, and unflushed metering. `period_used` is consulted only for memberships
    /// that are new or whose plan's quota changed. Serialised with other rebuilds and the flusher.
    pub fn rebuild(
        current: &ArcSwap<Snapshot>,
        records: &KeyIndex,
        period_used: &HashMap<(String, String), i64>,
        now: u64,
    ) {
        let slots = current.load().slots.clone();
        let mut book = lock(&slots.book);
        // Under the lock: the latest one (snapshots are published only under it).
        let previous = current.load_full();
        let next = Self::assemble(
            previous.routing.clone(),
            records,
            period_used,
            now,
            Some(&previous),
            (&slots, &mut book),
        );
        current.store(Arc::new(next));
    }

    fn assemble(
        routing: Arc<Routing>,
        records: &KeyIndex,
        period_used: &HashMap<(String, String), i64>,
        now: u64,
        previous: Option<&Snapshot>,
        (slots, book): (&Arc<Slots>, &mut SlotBook),
    ) -> Self {
        let plans: Vec<PlanRules> = records
            .plans
            .iter()
            .map(|p| PlanRules::resolve(p, &routing.config))
            .collect();
        let mut order: Vec<u32> = (0..records.len() as u32).collect();
        order.sort_unstable_by_key(|&i| records.hash(i as usize));
        let mut position = vec![0u32; order.len()];
        for (pos, &i) in order.iter().enumerate() {
            position[i as usize] = pos as u32;
        }
        // (key position, plan): binding order is kept within a key, so the first plan bound wins a
        // stage two plans of one key cover.
        let mut bound: Vec<(u32, u32)> = records
            .bindings()
            .iter()
            .map(|&(plan, key)| (position[key as usize], plan))
            .collect();
        bound.sort_by_key(|&(pos, _)| pos);

        book.reclaim();
        let mut kept = vec![false; book.len as usize];
        let mut method_buckets = HashMap::new();
        let mut keys = KeyTable {
            recs: Vec::with_capacity(order.len()),
            ids: String::with_capacity(records.id_bytes()),
            members: Vec::with_capacity(bound.len()),
            ..KeyTable::default()
        };
        let mut next_bound = 0;
        // The previous snapshot's keys are walked alongside, in the same hash order: a key with the
        // same hash and id keeps its memberships' slots.
        let mut old_at = 0;
        for (pos, &i) in order.iter().enumerate() {
            let (key_id, i) = (records.id(i as usize), i as usize);
            let hash = records.hash(i);
            let old_key = previous.and_then(|p| {
                let recs = &p.keys.recs;
                while old_at < recs.len() && recs[old_at].hash < hash {
                    old_at += 1;
                }
                (recs.get(old_at).is_some_and(|r| r.hash == hash) && p.keys.id(old_at) == key_id)
                    .then_some((p, old_at))
            });
            let first = keys.members.len();
            keys.recs.push(KeyRec {
                hash,
                id_start: keys.ids.len() as u32,
                members: first as u32 | if records.enabled(i) { 0 } else { DISABLED },
            });
            keys.ids.push_str(key_id);
            while let Some(&(_, plan)) = bound.get(next_bound).filter(|(p, _)| *p as usize == pos) {
                next_bound += 1;
                let rules = &plans[plan as usize];
                let before = old_key.and_then(|(p, k)| p.membership(k, &rules.id));
                let slot = match before {
                    Some((slot, _)) => {
                        kept[slot as usize] = true;
                        slot
                    }
                    None => book.allocate(),
                };
                let live = live_at(&book.chunks, slot);
                let old_rules = before.map(|(_, r)| r);
                if let (Some(gcra), Some(old)) =
                    (&rules.throttle, old_rules.and_then(|r| r.throttle.as_ref()))
                {
                    if gcra != old {
                        gcra.carry_over(old, &live.bucket, now);
                    }
                }
                if let Some(quota) = &rules.quota {
                    let same = old_rules
                        .and_then(|r| r.quota.as_ref())
                        .is_some_and(|q| q.settings() == quota.settings());
                    if !same {
                        let used = period_used
                            .get(&(rules.id.to_string(), key_id.to_owned()))
                            .copied()
                            .unwrap_or(0);
                        quota.set_used(&live.quota, now, used);
                    }
                }
                for &(at, settings) in &rules.methods {
                    let prior = before.and_then(|(old_slot, _)| {
                        previous.and_then(|p| p.method_buckets.get(&(old_slot, at)))
                    });
                    method_buckets.insert((slot, at), Bucket::new(settings, prior, now));
                }
                for earlier in &keys.members[first..] {
                    let other = &plans[earlier.plan as usize];
                    if other.stages.iter().any(|s| rules.stages.contains(s)) {
                        tracing::warn!(key = %key_id, plan = %rules.id, other = %other.id,
                            "key is in two plans for one stage; the first one applies");
                    }
                }
                keys.members.push(Member { plan, slot });
            }
        }
        drop(bound);

        let bits = usize::BITS - keys.recs.len().leading_zeros();
        keys.bits = bits;
        let mut dir = vec![0; (1 << bits) + 1];
        let mut at = 0;
        for (p, start) in dir.iter_mut().enumerate() {
            while at < keys.recs.len() && keys.prefix(&keys.recs[at].hash) < p {
                at += 1;
            }
            *start = at as u32;
        }
        keys.dir = dir;
        keys.by_id = records
            .by_id()
            .iter()
            .map(|&i| position[i as usize])
            .collect();
        drop(position);

        let epoch = Arc::new(Epoch::default());
        if let Some(previous) = previous {
            for i in 0..previous.keys.recs.len() {
                for m in previous.keys.members_of(i) {
                    let member = previous.keys.members[m];
                    if !kept[member.slot as usize] {
                        book.retired.insert(
                            member.slot,
                            Retired {
                                plan_id: previous.plans[member.plan as usize].id.clone(),
                                key_id: previous.keys.id(i).into(),
                                seen_by: Arc::downgrade(&previous.epoch),
                            },
                        );
                    }
                }
            }
            // Only the latest snapshot is rebuilt, under the book's lock: this is its first successor.
            let _ = previous.epoch.newer.set(epoch.clone());
        }
        let mut owners = vec![NO_MEMBER; book.len as usize];
        let mut in_use = vec![false; plans.len()];
        for (i, member) in keys.members.iter().enumerate() {
            owners[member.slot as usize] = i as u32;
            in_use[member.plan as usize] = true;
        }
        Self {
            routing,
            plans_in_use: in_use.iter().filter(|&&u| u).count(),
            plans,
            keys,
            owners,
            method_buckets,
            chunks: book.chunks.clone(),
            slots: slots.clone(),
            epoch,
        }
    }

    /// The slot of key record `key`'s membership in `plan_id` and the rules it was under.
    fn membership(&self, key: usize, plan_id: &str) -> Option<(u32, &PlanRules)> {
        self.member_in(key, plan_id)
            .map(|member| (member.slot, &self.plans[member.plan as usize]))
    }

    /// Key record `key`'s membership in plan `plan_id`.
    fn member_in(&self, key: usize, plan_id: &str) -> Option<Member> {
        self.keys
            .members_of(key)
            .map(|m| self.keys.members[m])
            .find(|member| *self.plans[member.plan as usize].id == *plan_id)
    }

    /// The membership of key `key_id` in plan `plan_id`, if it is served.
    pub fn grant_of(&self, plan_id: &str, key_id: &str) -> Option<Grant<'_>> {
        let key = self.keys.by_id(key_id)?;
        self.member_in(key, plan_id)
            .map(|member| self.grant_at(key, member))
    }

    fn grant_at(&self, key: usize, member: Member) -> Grant<'_> {
        Grant {
            key_id: self.keys.id(key),
            plan: &self.plans[member.plan as usize],
            slot: member.slot,
            live: live_at(&self.chunks, member.slot),
            method_buckets: &self.method_buckets,
        }
    }

    /// Whether key `key_id` exists (enabled or not).
    pub fn has_key(&self, key_id: &str) -> bool {
        self.keys.by_id(key_id).is_some()
    }

    /// The id of the key whose value hashes to `hash`.
    pub fn key_with_hash(&self, hash: &KeyHash) -> Option<&str> {
        self.keys.find(hash).map(|k| self.keys.id(k))
    }

    /// The ids of the plans key `key_id` is in.
    pub fn plans_of(&self, key_id: &str) -> Vec<&str> {
        self.keys.by_id(key_id).map_or_else(Vec::new, |k| {
            self.keys
                .members_of(k)
                .map(|m| &*self.plans[self.keys.members[m].plan as usize].id)
                .collect()
        })
    }

    /// The ids of the keys in plan `plan_id`, sorted.
    pub fn keys_of(&self, plan_id: &str) -> Vec<&str> {
        let Some(plan) = self.plans.iter().position(|p| *p.id == *plan_id) else {
            return Vec::new();
        };
        self.keys
            .by_id
            .iter()
            .map(|&k| k as usize)
            .filter(|&k| {
                self.keys
                    .members_of(k)
                    .any(|m| self.keys.members[m].plan as usize == plan)
            })
            .map(|k| self.keys.id(k))
            .collect()
    }

    /// The configuration this snapshot serves.
    pub fn config(&self) -> &GatewayConfig {
        &self.routing.config
    }

    /// How many API keys are served.
    pub fn key_count(&self) -> usize {
        self.keys.recs.len()
    }

    /// How many usage plans have members.
    pub fn plan_count(&self) -> usize {
        self.plans_in_use
    }

    /// Counts an admitted request of `grant` at `now`.
    pub fn meter(&self, grant: &Grant<'_>, now: u64) {
        let recorded = grant.live.meter.record(EpochDay::from_nanos(now));
        if recorded.first || recorded.displaced.is_some() {
            let mut metered = lock(&self.slots.metered);
            if recorded.first {
                metered.slots.push(grant.slot);
            }
            if let Some((day, count)) = recorded.displaced {
                metered.displaced.push((grant.slot, day, count));
            }
        }
    }

    /// Takes every count not yet taken from the snapshots `current` has held, as (plan id, key id,
    /// day, count), memberships removed since included. Serialised with rebuilds.
    pub fn take_metered(
        current: &ArcSwap<Snapshot>,
        mut each: impl FnMut(&str, &str, EpochDay, u64),
    ) {
        let slots = current.load().slots.clone();
        let book = lock(&slots.book);
        let snap = current.load();
        let taken = std::mem::take(&mut *lock(&slots.metered));
        let ids = |slot: u32| -> Option<(&str, &str)> {
            match snap.owners.get(slot as usize).copied() {
                Some(member) if member != NO_MEMBER => {
                    let plan = snap.keys.members[member as usize].plan as usize;
                    let key = snap.keys.owner(member as usize);
                    Some((&snap.plans[plan].id, snap.keys.id(key)))
                }
                _ => book.retired.get(&slot).map(|r| (&*r.plan_id, &*r.key_id)),
            }
        };
        let counts = taken
            .displaced
            .into_iter()
            .chain(taken.slots.into_iter().filter_map(|slot| {
                live_at(&book.chunks, slot)
                    .meter
                    .take()
                    .map(|(d, n)| (slot, d, n))
            }));
        for (slot, day, count) in counts {
            match ids(slot) {
                Some((plan_id, key_id)) => each(plan_id, key_id, day, count),
                None => tracing::error!(slot, count, "metered slot has no owner; counts dropped"),
            }
        }
    }

    /// Finds the route for a request.
    pub fn route<'p>(&self, method: &Method, path: &'p str) -> Option<RouteMatch<'p>> {
        self.routing.router.route(method, path)
    }

    /// How many segments the base path of the stage `path` addresses has (0 when none).
    pub fn base_depth(&self, path: &[u8]) -> usize {
        self.routing.router.base_depth(path)
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
        let Some(grant) = &shared.grant else {
            return Ok(Admission {
                route: shared.route,
                key_id: None,
                limits: LimitInfo::default(),
            });
        };
        match self.admit_key_locally(grant, m, now) {
            Ok(limits) => Ok(Admission {
                route: shared.route,
                key_id: Some(grant.key_id),
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
                    quota: grant.as_ref().and_then(|g| quota_info(g, now, None)),
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
        grant: &Grant<'_>,
        m: &RouteMatch<'_>,
        now: u64,
    ) -> Result<LimitInfo, Refusal> {
        let mut limits = LimitInfo::default();
        if let Some((gcra, state)) = grant.throttle_for(m) {
            match gcra.check(state, now) {
                ThrottleDecision::Allowed { remaining } => {
                    limits.throttle = Some(bucket_info(gcra, state, u64::from(remaining), now));
                }
                ThrottleDecision::Refused { retry_after } => {
                    limits.throttle = Some(bucket_info(gcra, state, 0, now));
                    limits.quota = quota_info(grant, now, None);
                    return Err(Refusal::TooManyRequests {
                        retry_after_secs: ceil_secs(retry_after).max(1),
                        limits,
                    });
                }
            }
        }
        if let Some(quota) = grant.quota() {
            match quota.try_consume(&grant.live.quota, now) {
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

    fn grant(&self, m: &RouteMatch<'_>, api_key: Option<&[u8]>) -> Result<Grant<'_>, Refusal> {
        let value = api_key.ok_or(Refusal::Forbidden)?;
        // Values outside AWS's length bounds (20-128 characters, so at most 4 bytes each) cannot be
        // stored keys: refuse them without hashing.
        if value.len() < *KEY_VALUE_LEN.start() || value.len() > 4 * *KEY_VALUE_LEN.end() {
            return Err(Refusal::Forbidden);
        }
        let key = self
            .keys
            .find(&KeyHash::of(value))
            .filter(|&k| self.keys.enabled(k))
            .ok_or(Refusal::Forbidden)?;
        // The first of its plans that covers the stage.
        self.keys
            .members_of(key)
            .map(|i| self.keys.members[i])
            .find(|member| {
                self.plans[member.plan as usize]
                    .stages
                    .contains(&(m.api, m.stage))
            })
            .map(|member| self.grant_at(key, member))
            .ok_or(Refusal::Forbidden)
    }
}

fn bucket_info(gcra: &Gcra, state: &GcraState, remaining: u64, now: u64) -> BucketInfo {
    BucketInfo {
        burst: gcra.burst(),
        remaining,
        reset_secs: ceil_secs(gcra.until_full(state, now)),
        window_secs: ceil_secs(gcra.interval().saturating_mul(gcra.burst())).max(1),
    }
}

/// The quota part of the headers; `remaining` when just decided, else read from the counter.
fn quota_info(grant: &Grant<'_>, now: u64, remaining: Option<u64>) -> Option<QuotaInfo> {
    let quota = grant.quota()?;
    let window: QuotaWindow = quota.window(EpochDay::from_nanos(now));
    let remaining = remaining.or_else(|| grant.remaining_quota(now))?;
    Some(QuotaInfo {
        limit: u64::from(quota.settings().limit),
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
    use tollgate_store::Records;

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
            allow_get_body: false,
        };
        GatewayConfig {
            account_throttle: account,
            rate_limit_headers: true,
            access_log: false,
            max_request_body: crate::config::DEFAULT_MAX_REQUEST_BODY,
            kept_fields: Default::default(),
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
                allow_encoded_slashes: false,
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
        Snapshot::build(
            cfg,
            &KeyIndex::from(rec),
            &HashMap::new(),
            EpochDay::from_nanos(T0),
        )
        .unwrap()
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
        let cell = ArcSwap::from_pointee(snap(
            config(None, None),
            &records(Some(throttle(1.0, 2)), Some(quota)),
        ));
        let s = cell.load_full();
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

        // The flusher is handed what the one membership counted, per day, once.
        assert_eq!(
            taken(&cell),
            vec![
                counted("key0000001", T0, 3),
                counted("key0000001", midnight, 1)
            ]
        );
        assert!(taken(&cell).is_empty());
    }

    fn taken(cell: &ArcSwap<Snapshot>) -> Vec<(String, String, EpochDay, u64)> {
        let mut out = Vec::new();
        Snapshot::take_metered(cell, |plan, key, day, n| {
            out.push((plan.into(), key.into(), day, n));
        });
        out.sort();
        out
    }

    fn counted(key: &str, at: u64, n: u64) -> (String, String, EpochDay, u64) {
        ("plan01".into(), key.into(), EpochDay::from_nanos(at), n)
    }

    fn slot_of(cell: &ArcSwap<Snapshot>, key: &str) -> u32 {
        cell.load().grant_of("plan01", key).unwrap().slot
    }

    #[test]
    fn counts_of_a_removed_membership_are_flushed_before_its_slot_is_reused() {
        let mut rec = records(Some(throttle(100.0, 50)), None);
        rec.keys[1].enabled = true;
        let one_plan = rec.bindings.clone();
        rec.bindings.truncate(1);
        let cell = ArcSwap::from_pointee(snap(config(None, None), &rec));
        let get = "/prod/registrations/42";
        let old = cell.load_full();
        let slot = slot_of(&cell, "key0000001");
        assert!(call(&old, "GET", get, Some(KEY), T0).is_ok());

        // Key 1 leaves the plan while a request still holds the old snapshot and counts after.
        rec.bindings.clear();
        Snapshot::rebuild(&cell, &KeyIndex::from(&rec), &HashMap::new(), T0);
        assert!(call(&old, "GET", get, Some(KEY), T0).is_ok());
        assert_eq!(
            call(&cell.load(), "GET", get, Some(KEY), T0),
            Err(Refusal::Forbidden)
        );
        // Key 2 joins: the retired slot is not reused while the old snapshot is in use.
        rec.bindings = one_plan[1..].to_vec();
        Snapshot::rebuild(&cell, &KeyIndex::from(&rec), &HashMap::new(), T0);
        assert_ne!(slot_of(&cell, "key0000002"), slot);
        assert_eq!(taken(&cell), vec![counted("key0000001", T0, 2)]);

        // Once the old snapshot is gone and its counts taken, a new membership gets the slot, and
        // counts under it are its own.
        drop(old);
        rec.bindings = one_plan.iter().rev().cloned().collect();
        Snapshot::rebuild(&cell, &KeyIndex::from(&rec), &HashMap::new(), T0);
        assert_eq!(slot_of(&cell, "key0000001"), slot, "reused");
        assert!(call(&cell.load(), "GET", get, Some(KEY), T0).is_ok());
        assert!(call(&cell.load(), "GET", get, Some(OTHER), T0).is_ok());
        assert_eq!(
            taken(&cell),
            vec![counted("key0000001", T0, 1), counted("key0000002", T0, 1)]
        );
        let limits = call(&cell.load(), "GET", get, Some(KEY), T0).unwrap();
        assert_eq!(
            limits.throttle.unwrap().remaining,
            48,
            "a full bucket, less two"
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
        let s = Snapshot::build(
            config(None, None),
            &KeyIndex::from(&rec),
            &used,
            EpochDay::from_nanos(T0),
        )
        .unwrap();
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
        let cell = ArcSwap::from_pointee(snap(config(None, None), &rec));
        let get = "/prod/registrations/42";
        for _ in 0..3 {
            assert!(call(&cell.load(), "GET", get, Some(KEY), T0).is_ok());
        }

        // Same records: the bucket stays empty, the quota count and the unflushed meter carry over.
        Snapshot::rebuild(&cell, &KeyIndex::from(&rec), &HashMap::new(), T0);
        let s2 = cell.load_full();
        assert!(matches!(
            call(&s2, "GET", get, Some(KEY), T0),
            Err(Refusal::TooManyRequests { .. })
        ));
        let limits = call(&s2, "GET", get, Some(KEY), T0 + NANOS_PER_SEC).unwrap();
        assert_eq!(limits.quota.unwrap().remaining, 6);
        assert_eq!(taken(&cell), vec![counted("key0000001", T0, 4)]);

        // A slower throttle keeps the tokens the bucket holds (none), not a full new bucket.
        rec.plans[0].throttle = Some(throttle(0.5, 3));
        Snapshot::rebuild(
            &cell,
            &KeyIndex::from(&rec),
            &HashMap::new(),
            T0 + NANOS_PER_SEC,
        );
        assert!(matches!(
            call(&cell.load(), "GET", get, Some(KEY), T0 + NANOS_PER_SEC),
            Err(Refusal::TooManyRequests { .. })
        ));

        // A raised limit keeps the count; a disabled key is refused at once; a new key works at once.
        rec.plans[0].quota = Some(QuotaSettings { limit: 20, ..quota });
        rec.keys[0].enabled = false;
        rec.keys[1].enabled = true;
        let used = HashMap::from([(("plan01".to_string(), "key0000001".to_string()), 4i64)]);
        Snapshot::rebuild(&cell, &KeyIndex::from(&rec), &used, T0);
        let s3 = cell.load_full();
        assert_eq!(
            call(&s3, "GET", get, Some(KEY), T0 + 5 * NANOS_PER_SEC),
            Err(Refusal::Forbidden)
        );
        let limits = call(&s3, "GET", get, Some(OTHER), T0 + 5 * NANOS_PER_SEC).unwrap();
        assert_eq!(limits.quota.unwrap().remaining, 19);
        rec.keys[0].enabled = true;
        Snapshot::rebuild(&cell, &KeyIndex::from(&rec), &used, T0);
        let limits = call(&cell.load(), "GET", get, Some(KEY), T0 + 5 * NANOS_PER_SEC).unwrap();
        assert_eq!(
            limits.quota.unwrap().remaining,
            15,
            "20 - 4 used - this one"
        );
    }
}
