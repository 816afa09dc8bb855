//! The immutable in-memory view the request path reads, built from the store's records and swapped
//! whole (`ArcSwap`) when they change: the routes, the key table ([`crate::key_table`]), the resolved
//! plans ([`crate::plans`]) and handles on the live state that survives rebuilds
//! ([`crate::slots`]). A request does one lookup for its key and a handful of atomic operations, no
//! locks, no I/O; what it does with them is [`crate::admit`].
//!
//! This file builds snapshots (first build, rebuilds that keep every membership's live state, and
//! changes of a few keys that build only what they touch), answers the control plane's questions
//! about what is served, and hands metered counts to the flusher.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arc_swap::ArcSwap;
use http::Method;
use tollgate_core::gcra::{Gcra, GcraState};
use tollgate_core::quota::{EpochDay, Quota, QuotaCount};
use tollgate_core::sharing::customer_of;
use tollgate_core::{KeyHash, UsagePlan};
use tollgate_store::report::PeriodUsed;
use tollgate_store::{Holder, KeyIndex, Memberships};

use crate::client_ip::ClientAddress;
use crate::config::{GatewayConfig, Route};
use crate::jwt::UsageIdentifier;
use crate::key_table::{Entry, Key, KeyTable, Member, NO_GROUP};
use crate::limits::KeyRejected;
use crate::meter::Counted;
use crate::plans::{PlanRules, RouteAt};
use crate::route::{RouteError, RouteMatch, Router};
use crate::slots::{
    Bucket, Chunk, CreditEvents, Epoch, KeyAccount, KeyCredits, Live, NO_OWNER, Retired, SlotBook,
    Slots, live_at, lock,
};

/// One API key's membership in one usage plan, as a request uses it.
#[derive(Clone, Copy)]
pub struct Membership<'s> {
    /// The key's id.
    pub key_id: &'s str,
    plan: &'s PlanRules,
    slot: u32,
    live: &'s Live,
    /// The customer whose limits the key draws on, when the plan shares them by customer.
    customer: Option<Shared<'s>>,
    /// The key's credits, if it holds some.
    credits: Option<&'s KeyAccount>,
    /// The per-method buckets of the key's shard, by (slot, where).
    methods: &'s HashMap<(u32, RouteAt), Bucket>,
}

/// The limits a customer's keys share in a plan: its group, and the slot's state (its buckets,
/// quota count and shared meter).
#[derive(Clone, Copy)]
struct Shared<'s> {
    group: &'s CustomerGroup,
    live: &'s Live,
}

/// The customer of a plan that shares limits by customer, and the slot its keys share.
#[derive(Debug, Clone)]
struct CustomerGroup {
    plan: u32,
    id: Box<str>,
    slot: u32,
    /// How many memberships draw on it: at none, it is retired.
    members: u32,
    /// Its per-method buckets.
    methods: Vec<(RouteAt, Bucket)>,
}

/// The bucket limiting a key on a route, and its state on this instance.
pub(crate) struct KeyBucket<'s> {
    pub gcra: &'s Gcra,
    pub state: &'s GcraState,
    /// The route's per-method bucket, rather than the plan's.
    pub per_method: bool,
}

impl std::fmt::Debug for Membership<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Membership")
            .field("key_id", &self.key_id)
            .field("plan_id", &self.plan.id)
            .field("slot", &self.slot)
            .finish()
    }
}

impl<'s> Membership<'s> {
    /// The plan's id.
    pub fn plan_id(&self) -> &'s Arc<str> {
        &self.plan.id
    }

    /// The name the plan's counts are kept under (its shadow name in shadow).
    pub(crate) fn counts_as(&self) -> &'s Arc<str> {
        &self.plan.counts_as
    }

    /// Whether the plan is tried in shadow: its limits refuse nothing.
    pub(crate) fn shadow(&self) -> bool {
        self.plan.shadow
    }

    /// Whether the response carries the RateLimit headers: always, except in shadow without
    /// `shadowHeaders`.
    pub(crate) fn shows_limits(&self) -> bool {
        !self.plan.shadow || self.plan.shadow_headers
    }

    /// Whose limits the key draws on: its own, or its customer's.
    pub(crate) fn holder(&self) -> Holder<'s> {
        match self.customer {
            Some(c) => Holder::Customer(&c.group.id),
            None => Holder::Key(self.key_id),
        }
    }

    /// The slot and state holding the key's limits: its customer's, or its own.
    #[inline]
    fn limits_slot(&self) -> (u32, &'s Live) {
        self.customer
            .map_or((self.slot, self.live), |c| (c.group.slot, c.live))
    }

    /// The bucket that limits this key on the matched route, with its state on this instance: the
    /// per-method one, else the plan's.
    // Inlined (callgrind): out of line, the request path paid ~35 instructions for the call.
    #[inline]
    pub(crate) fn throttle_for(&self, m: &RouteMatch) -> Option<KeyBucket<'s>> {
        let (slot, live) = self.limits_slot();
        match self.plan.method_at(m) {
            Some(at) => {
                let bucket = match self.customer {
                    Some(c) => c
                        .group
                        .methods
                        .iter()
                        .find(|(a, _)| *a == at)
                        .map(|(_, b)| b),
                    None => self.methods.get(&(slot, at)),
                };
                bucket.map(|b| KeyBucket {
                    gcra: &b.gcra,
                    state: &b.state,
                    per_method: true,
                })
            }
            None => self.plan.throttle.as_ref().map(|gcra| KeyBucket {
                gcra,
                state: &live.bucket,
                per_method: false,
            }),
        }
    }

    /// The plan's quota, if it has one.
    pub fn quota(&self) -> Option<&'s Quota> {
        self.plan.quota.as_ref()
    }

    /// The quota count the membership spends on this instance: its customer's, or its own.
    #[inline]
    pub(crate) fn quota_count(&self) -> &'s QuotaCount {
        &self.limits_slot().1.quota
    }

    /// The key's credits, if it holds some.
    pub(crate) fn credits(&self) -> Option<&'s KeyAccount> {
        self.credits
    }

    /// The customer whose limits the key shares, if the plan shares them and the key has one.
    pub fn customer(&self) -> Option<&'s str> {
        self.customer.map(|c| &*c.group.id)
    }

    /// Sets what is left of the quota on this instance (AWS UpdateUsage; the customer's, when the
    /// key shares its customer's); returns by how much the period's count changed, or `None` when
    /// the plan has no quota.
    pub fn set_remaining(&self, now: u64, remaining: i64) -> Option<i64> {
        self.quota()
            .map(|q| q.set_remaining(self.quota_count(), now, remaining))
    }
}

/// What one take of the meters found for a membership.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Taken {
    /// Requests of one kind on one UTC day.
    Count(Counted, EpochDay, u64),
    /// The key was last presented at this time (epoch seconds, to the minute).
    Seen(u64),
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
    /// A JWT authorizer names keys by name.
    names_keys: bool,
}

/// Everything the request path reads, immutable except for atomics.
#[derive(Debug)]
pub struct Snapshot {
    routing: Arc<Routing>,
    plans: Arc<[PlanRules]>,
    /// The plans as stored, which `plans` resolves.
    plan_records: Arc<[UsagePlan]>,
    keys: KeyTable,
    /// The customers of plans that share limits by customer, by the slot they share.
    customers: Arc<HashMap<u32, CustomerGroup>>,
    /// (plan, customer id) → the slot of its group in `customers`.
    customer_index: Arc<HashMap<(u32, Box<str>), u32>>,
    /// The slots' state, as of this snapshot: every slot it gives out is in these chunks.
    chunks: Vec<Chunk>,
    slots: Arc<Slots>,
    epoch: Arc<Epoch>,
    /// Per plan, how many memberships it has.
    plan_members: Arc<[u32]>,
}

/// Marks a slot's owner in [`SlotBook::owners`] that is a customer's group (with its slot), rather
/// than a membership (its key's shard, and its index there: [`member_owner`]).
const CUSTOMER: u64 = 1 << 63;

fn member_owner(shard: u32, member: u32) -> u64 {
    (u64::from(shard) << 32) | u64::from(member)
}

/// Warns of `shared` names, each shared by several keys: a JWT caller's token names none of them.
fn warn_of_shared_names(shared: usize) {
    if shared > 0 {
        tracing::warn!(
            names = shared,
            "API key names shared by several keys name none of them for JWT callers"
        );
    }
}

/// The slots a rebuild keeps from the snapshot it replaces.
enum Kept {
    /// A whole rebuild: one flag per slot.
    All(Vec<bool>),
    /// A change of a few keys.
    Few(HashSet<u32>),
}

impl Kept {
    fn keep(&mut self, slot: u32) {
        match self {
            Kept::All(flags) => flags[slot as usize] = true,
            Kept::Few(set) => {
                set.insert(slot);
            }
        }
    }

    fn has(&self, slot: u32) -> bool {
        match self {
            Kept::All(flags) => flags.get(slot as usize).copied().unwrap_or(false),
            Kept::Few(set) => set.contains(&slot),
        }
    }
}

/// What a build or a change of keys works with: the plans, the live state's book, the snapshot it
/// replaces, and the customers' groups as they become.
struct Assembly<'a> {
    plans: &'a [PlanRules],
    period_used: &'a PeriodUsed,
    now: u64,
    previous: Option<&'a Snapshot>,
    book: &'a mut SlotBook,
    kept: Kept,
    /// Shared with the snapshot replaced until a change of keys changes them.
    customers: Arc<HashMap<u32, CustomerGroup>>,
    customer_index: Arc<HashMap<(u32, Box<str>), u32>>,
    plan_members: Vec<u32>,
}

impl Assembly<'_> {
    /// Makes `out` the entry of key `i` of `records`, bound to the plans `bound` (indices in
    /// `plans`, in the order they were bound), which was `old` in the snapshot replaced: its
    /// memberships keep their slots and live state, new ones start from the store's counts. `out`
    /// is reused: a build of a million keys allocates nothing per key for it.
    fn entry(
        &mut self,
        records: &KeyIndex,
        (i, bound): (usize, &[u32]),
        old: Option<Key<'_>>,
        out: &mut Entry,
    ) {
        let (key_id, hash, terms) = (records.id(i), records.hash(i), records.terms(i));
        let credits = (terms.credits || terms.refill.is_some()).then(|| {
            // The live balance carries on; a key new to credits here starts from the store's.
            let live = old
                .and_then(|k| k.credits())
                .map(|a| a.live.clone())
                .unwrap_or_else(|| {
                    let stored = self.period_used.credits.get(key_id);
                    Arc::new(stored.map_or_else(KeyCredits::default, |b| {
                        KeyCredits::new(b.balance, b.refilled)
                    }))
                });
            KeyAccount {
                live,
                refill: terms.refill,
            }
        });
        let (members, methods) = (&mut out.members, &mut out.methods);
        members.clear();
        methods.clear();
        for &plan in bound {
            let plans = self.plans;
            let rules = &plans[plan as usize];
            let before = old.and_then(|k| {
                let p = self.previous?;
                let member = p.member_in(k, &rules.id)?;
                Some((member, &p.plans[member.plan as usize], k))
            });
            let slot = match before {
                Some((m, _, _)) => {
                    self.kept.keep(m.slot);
                    m.slot
                }
                None => self.book.allocate(),
            };
            let group = match customer_of(rules.share_by, records.customer(i)) {
                None => {
                    // A key that drew on its customer's limits until now has its own again: they
                    // start from the store, as a new membership's do.
                    let own = before.filter(|(m, _, _)| m.group == NO_GROUP);
                    let limits = Limits {
                        rules,
                        before: own.map(|(_, r, _)| r),
                        now: self.now,
                    };
                    let used = || self.period_used.key(&rules.counts_as, key_id);
                    let prior = |at| own.and_then(|(_, _, k)| k.methods().get(&(slot, at)));
                    let mut started = Vec::new();
                    limits.start(live_at(&self.book.chunks, slot), used, prior, &mut started);
                    methods.extend(started.into_iter().map(|(at, b)| ((slot, at), b)));
                    NO_GROUP
                }
                Some(customer) => self.group(plan, customer),
            };
            for earlier in members.iter() {
                let Member { plan: other, .. } = earlier;
                let other = &self.plans[*other as usize];
                if other.stages.iter().any(|s| rules.stages.contains(s)) {
                    tracing::warn!(key = %key_id, plan = %rules.id, other = %other.id,
                        "key is in two plans for one stage; the first one applies");
                }
            }
            self.plan_members[plan as usize] += 1;
            members.push(Member { plan, slot, group });
        }
        out.hash = hash;
        out.id.clear();
        out.id.push_str(key_id);
        out.enabled = terms.enabled;
        out.expires_at = terms.expires_at;
        out.sources = terms.sources;
        out.previous = terms.previous;
        out.credits = credits;
    }

    /// The slot of customer `customer`'s group in plan `plan`, which gains a membership: the group
    /// as it is, or as it was in the snapshot replaced, or a new one starting from the store's count.
    fn group(&mut self, plan: u32, customer: &str) -> u32 {
        let known = self.customer_index.get(&(plan, customer.into())).copied();
        let slot = match known {
            Some(slot) => slot,
            None => {
                let rules = &self.plans[plan as usize];
                let before = self.previous.and_then(|p| {
                    let group = p.customer_group(&rules.id, customer)?;
                    Some((group, &p.plans[group.plan as usize]))
                });
                let slot = match before {
                    Some((g, _)) => {
                        self.kept.keep(g.slot);
                        g.slot
                    }
                    None => self.book.allocate(),
                };
                let limits = Limits {
                    rules,
                    before: before.map(|(_, r)| r),
                    now: self.now,
                };
                let used = || self.period_used.customer(&rules.counts_as, customer);
                let prior = |at| {
                    before
                        .and_then(|(g, _)| g.methods.iter().find(|(a, _)| *a == at).map(|(_, b)| b))
                };
                let mut methods = Vec::new();
                limits.start(live_at(&self.book.chunks, slot), used, prior, &mut methods);
                self.book.own(slot, CUSTOMER | u64::from(slot));
                Arc::make_mut(&mut self.customers).insert(
                    slot,
                    CustomerGroup {
                        plan,
                        id: customer.into(),
                        slot,
                        members: 0,
                        methods,
                    },
                );
                Arc::make_mut(&mut self.customer_index).insert((plan, customer.into()), slot);
                slot
            }
        };
        if let Some(group) = Arc::make_mut(&mut self.customers).get_mut(&slot) {
            group.members += 1;
        }
        slot
    }

    /// Retires slot `slot`, which `previous` gave to `id` (a key's, or a customer's) under
    /// `plan_id`: its counts are taken before it is handed out again.
    fn retire(&mut self, slot: u32, plan_id: Arc<str>, id: &str, customer: bool) {
        let Some(previous) = self.previous else {
            return;
        };
        self.book.own(slot, NO_OWNER);
        self.book.retired.insert(
            slot,
            Retired {
                plan_id,
                id: id.into(),
                customer,
                seen_by: Arc::downgrade(&previous.epoch),
            },
        );
    }

    /// The snapshot of `keys`, its slots' owners recorded (those of `shards`, or all).
    fn finish(
        self,
        routing: Arc<Routing>,
        (plans, plan_records): (Arc<[PlanRules]>, Arc<[UsagePlan]>),
        keys: KeyTable,
        shards: Option<Vec<u32>>,
        slots: &Arc<Slots>,
    ) -> Snapshot {
        let book = self.book;
        for s in shards.unwrap_or_else(|| (0..keys.shards()).collect()) {
            for (i, member) in keys.members_in(s) {
                book.own(member.slot, member_owner(s, i));
            }
        }
        let epoch = Arc::new(Epoch::default());
        if let Some(previous) = self.previous {
            // Only the latest snapshot is rebuilt, under the book's lock: this is its first successor.
            let _ = previous.epoch.newer.set(epoch.clone());
        }
        Snapshot {
            routing,
            plans,
            plan_records,
            keys,
            customers: self.customers,
            customer_index: self.customer_index,
            chunks: book.chunks.clone(),
            slots: slots.clone(),
            epoch,
            plan_members: self.plan_members.into(),
        }
    }
}

impl Snapshot {
    /// Builds the first snapshot. `period_used` gives, per key (and customer) and plan, the
    /// requests already counted in the quota period containing `today` (so limits survive
    /// restarts).
    pub fn build(
        config: GatewayConfig,
        records: &KeyIndex,
        period_used: &PeriodUsed,
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
        let names_keys = config.apis.iter().flat_map(|a| &a.routes).any(|r| {
            r.authorizer
                .as_ref()
                .is_some_and(|a| a.settings.identifier == UsageIdentifier::Name)
        });
        let routing = Arc::new(Routing {
            config,
            router,
            stage_buckets,
            account,
            names_keys,
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
        period_used: &PeriodUsed,
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

    /// Replaces the snapshot in `current` by one where the keys whose ids are in `touched` are as
    /// `changed` holds them (with their bindings; a touched key `changed` lacks is gone), at `now`.
    /// Only the shards of the table those keys fall in are built again, and every other key keeps
    /// its live state untouched. `changed` must hold the plans the snapshot serves, in its order,
    /// and `period_used` the stored counts of its keys and customers. Returns `false`, changing
    /// nothing, when it cannot apply the change alone (the plans differ): then the caller rebuilds.
    /// Serialised with other rebuilds and the flusher.
    pub fn change_keys(
        current: &ArcSwap<Snapshot>,
        changed: &KeyIndex,
        touched: &[String],
        period_used: &PeriodUsed,
        now: u64,
    ) -> bool {
        let slots = current.load().slots.clone();
        let mut book = lock(&slots.book);
        let previous = current.load_full();
        if *changed.plans != *previous.plan_records {
            return false;
        }
        book.reclaim();
        let gone: Vec<Key<'_>> = touched
            .iter()
            .filter_map(|id| previous.keys.by_id(id))
            .collect();
        let mut assembly = Assembly {
            plans: &previous.plans,
            period_used,
            now,
            previous: Some(&previous),
            book: &mut book,
            kept: Kept::Few(HashSet::new()),
            customers: previous.customers.clone(),
            customer_index: previous.customer_index.clone(),
            plan_members: previous.plan_members.to_vec(),
        };
        // The memberships going are counted out before the new ones are counted in: a group keeps
        // its slot while a changed key stays in it.
        let mut left = Vec::new();
        for key in &gone {
            for m in key.members() {
                assembly.plan_members[m.plan as usize] -= 1;
                if m.group != NO_GROUP {
                    let customers = Arc::make_mut(&mut assembly.customers);
                    if let Some(group) = customers.get_mut(&m.group) {
                        group.members -= 1;
                        left.push(m.group);
                    }
                }
            }
        }
        let mut bound: HashMap<u32, Vec<u32>> = HashMap::new();
        for &(plan, key) in changed.bindings() {
            bound.entry(key).or_default().push(plan);
        }
        let by_id: HashMap<&str, Key<'_>> = gone.iter().map(|k| (k.id(), *k)).collect();
        let added: Vec<Entry> = (0..changed.len())
            .map(|i| {
                let old = by_id.get(changed.id(i)).copied();
                let plans = bound.remove(&(i as u32)).unwrap_or_default();
                let mut entry = Entry::default();
                assembly.entry(changed, (i, &plans), old, &mut entry);
                if previous.routing.names_keys {
                    entry.name = Some(changed.name(i).to_owned());
                }
                entry
            })
            .collect();
        for key in &gone {
            for m in key.members() {
                if !assembly.kept.has(m.slot) {
                    let plan_id = previous.plans[m.plan as usize].counts_as.clone();
                    assembly.retire(m.slot, plan_id, key.id(), false);
                }
            }
        }
        left.sort_unstable();
        left.dedup();
        for slot in left {
            let customers = Arc::make_mut(&mut assembly.customers);
            let Some(group) = customers.remove_entry(&slot).map(|(_, g)| g) else {
                continue;
            };
            if group.members > 0 {
                customers.insert(slot, group);
                continue;
            }
            Arc::make_mut(&mut assembly.customer_index).remove(&(group.plan, group.id.clone()));
            let plan_id = previous.plans[group.plan as usize].counts_as.clone();
            assembly.retire(group.slot, plan_id, &group.id, true);
        }
        let (keys, shards) = previous.keys.with_changes(&gone, added);
        if previous.routing.names_keys {
            // The written keys' names alone: a change looks up what it wrote.
            let shared: HashSet<&str> = (0..changed.len())
                .map(|i| changed.name(i))
                .filter(|&n| keys.by_name(n).is_none())
                .collect();
            warn_of_shared_names(shared.len());
        }
        let next = assembly.finish(
            previous.routing.clone(),
            (previous.plans.clone(), previous.plan_records.clone()),
            keys,
            Some(shards),
            &slots,
        );
        current.store(Arc::new(next));
        true
    }

    fn assemble(
        routing: Arc<Routing>,
        records: &KeyIndex,
        period_used: &PeriodUsed,
        now: u64,
        previous: Option<&Snapshot>,
        (slots, book): (&Arc<Slots>, &mut SlotBook),
    ) -> Self {
        let plans: Arc<[PlanRules]> = records
            .plans
            .iter()
            .map(|p| PlanRules::resolve(p, &routing.config))
            .collect();
        let mut order: Vec<u32> = (0..records.len() as u32).collect();
        order.sort_unstable_by_key(|&i| records.hash(i as usize));
        // Each key's plans, in binding order: the first plan bound wins a stage two plans of one
        // key cover.
        let mut bound: Vec<(u32, u32)> = records
            .bindings()
            .iter()
            .map(|&(plan, key)| (key, plan))
            .collect();
        bound.sort_by_key(|&(key, _)| key);

        book.reclaim();
        book.owners.clear();
        let kept = Kept::All(vec![false; book.len as usize]);
        let mut assembly = Assembly {
            plans: &plans,
            period_used,
            now,
            previous,
            book,
            kept,
            customers: Arc::default(),
            customer_index: Arc::default(),
            plan_members: vec![0; plans.len()],
        };
        let mut table = KeyTable::build();
        let (mut entry, mut plans_of) = (Entry::default(), Vec::new());
        for &i in &order {
            let (key_id, hash) = (records.id(i as usize), records.hash(i as usize));
            // Found by value hash, or by id when its value changed (a rotation): its buckets and
            // quota count carry on.
            let old = previous.and_then(|p| {
                p.keys
                    .find(&hash)
                    .filter(|k| k.id() == key_id)
                    .or_else(|| p.keys.by_id(key_id))
            });
            let from = bound.partition_point(|&(k, _)| k < i);
            let to = bound.partition_point(|&(k, _)| k <= i);
            plans_of.clear();
            plans_of.extend(bound[from..to].iter().map(|&(_, p)| p));
            assembly.entry(records, (i as usize, &plans_of), old, &mut entry);
            if routing.names_keys {
                let name = entry.name.get_or_insert_with(String::new);
                name.clear();
                name.push_str(records.name(i as usize));
            }
            table.push(&entry);
        }
        drop(bound);
        let keys = table.finish();
        if routing.names_keys {
            warn_of_shared_names(keys.shared_names());
        }

        if let Some(previous) = previous {
            for key in previous.keys.keys() {
                for member in key.members() {
                    if !assembly.kept.has(member.slot) {
                        let plan_id = previous.plans[member.plan as usize].counts_as.clone();
                        assembly.retire(member.slot, plan_id, key.id(), false);
                    }
                }
            }
            for group in previous.customers.values() {
                if !assembly.kept.has(group.slot) {
                    let plan_id = previous.plans[group.plan as usize].counts_as.clone();
                    assembly.retire(group.slot, plan_id, &group.id, true);
                }
            }
        }
        let plan_records = records.plans.clone().into();
        assembly.finish(routing, (plans.clone(), plan_records), keys, None, slots)
    }

    /// The customer `customer`'s group in plan `plan_id`.
    fn customer_group(&self, plan_id: &str, customer: &str) -> Option<&CustomerGroup> {
        let plan = self.plans.iter().position(|p| *p.id == *plan_id)?;
        let slot = *self.customer_index.get(&(plan as u32, customer.into()))?;
        self.customers.get(&slot)
    }

    /// `key`'s membership in plan `plan_id`.
    fn member_in(&self, key: Key<'_>, plan_id: &str) -> Option<Member> {
        key.members()
            .iter()
            .find(|member| *self.plans[member.plan as usize].id == *plan_id)
            .copied()
    }

    /// The membership of key `key_id` in plan `plan_id`, if it is served.
    pub fn membership_of(&self, plan_id: &str, key_id: &str) -> Option<Membership<'_>> {
        let key = self.keys.by_id(key_id)?;
        self.member_in(key, plan_id)
            .map(|member| self.membership_at(key, member))
    }

    /// The membership of the enabled key, unexpired at `now` and used from where it may be
    /// (`from`), whose value (or old value, in its grace period at `now`) hashes to `hash`, in the
    /// first of its plans that covers the stage `m` matched.
    pub(crate) fn membership_for(
        &self,
        hash: &KeyHash,
        m: &RouteMatch,
        from: &ClientAddress<'_>,
        now: u64,
    ) -> Result<Membership<'_>, KeyRejected> {
        let key = self
            .keys
            .find(hash)
            .or_else(|| self.keys.find_previous(hash, now))
            .ok_or(KeyRejected::Invalid)?;
        self.membership_of_key(key, m, from, now)
    }

    /// The membership of `key`, when it is enabled, unexpired at `now` and used from where it may
    /// be (`from`), in the first of its plans that covers the stage `m` matched.
    fn membership_of_key<'s>(
        &'s self,
        key: Key<'s>,
        m: &RouteMatch,
        from: &ClientAddress<'_>,
        now: u64,
    ) -> Result<Membership<'s>, KeyRejected> {
        if !key.enabled() {
            return Err(KeyRejected::Disabled);
        }
        if key.expires_at().is_some_and(|at| now >= at) {
            return Err(KeyRejected::Expired);
        }
        if key.sources().is_some_and(|allowed| !from.within(allowed)) {
            return Err(KeyRejected::SourceIp);
        }
        key.members()
            .iter()
            .find(|member| self.plans[member.plan as usize].covers(m))
            .map(|&member| self.membership_at(key, member))
            .ok_or(KeyRejected::Invalid)
    }

    /// The membership of the enabled, unexpired (at `now`) key named `name`, used from where it may
    /// be, in the first of its plans that covers the stage `m` matched: a JWT caller's key.
    pub(crate) fn membership_by_name(
        &self,
        name: &str,
        m: &RouteMatch,
        from: &ClientAddress<'_>,
        now: u64,
    ) -> Result<Membership<'_>, KeyRejected> {
        let key = self.keys.by_name(name).ok_or(KeyRejected::Invalid)?;
        self.membership_of_key(key, m, from, now)
    }

    fn membership_at<'s>(&'s self, key: Key<'s>, member: Member) -> Membership<'s> {
        let plan = &self.plans[member.plan as usize];
        // Only a sharing plan's memberships look their customer up.
        let customer = plan
            .share_by
            .and_then(|_| self.customers.get(&member.group))
            .map(|group| Shared {
                group,
                live: live_at(&self.chunks, group.slot),
            });
        Membership {
            key_id: key.id(),
            plan,
            slot: member.slot,
            live: live_at(&self.chunks, member.slot),
            customer,
            credits: key.credits(),
            methods: key.methods(),
        }
    }

    /// The configuration this snapshot serves.
    pub fn config(&self) -> &GatewayConfig {
        &self.routing.config
    }

    /// The route `m` matched.
    pub(crate) fn route_at(&self, m: &RouteMatch) -> &Route {
        &self.routing.config.apis[m.api].routes[m.route]
    }

    /// The throttles every caller of the route `m` matched shares on this instance: the stage's
    /// (per-method or default), then the account's.
    pub(crate) fn shared_buckets(&self, m: &RouteMatch) -> [Option<&Bucket>; 2] {
        [
            self.routing.stage_buckets[m.api][m.stage][m.route].as_ref(),
            self.routing.account.as_ref(),
        ]
    }

    /// How many API keys are served.
    pub fn key_count(&self) -> usize {
        self.keys.len()
    }

    /// How many usage plans have members.
    pub fn plan_count(&self) -> usize {
        self.plan_members.iter().filter(|&&n| n > 0).count()
    }

    /// The usage plans served: their ids and names.
    pub fn plan_names(&self) -> impl Iterator<Item = (&Arc<str>, &Arc<str>)> {
        self.plans.iter().map(|p| (&p.id, &p.name))
    }

    /// Counts `n` for a request of `membership` at `now` as `counted` (an admitted request counts
    /// its cost), and an admitted one in its customer's shared meter too.
    pub fn count(&self, membership: &Membership<'_>, counted: Counted, n: u32, now: u64) {
        self.count_key(membership, counted, n, now);
        if let (Some(c), Counted::Admitted) = (membership.customer, counted) {
            self.slots.count(c.group.slot, c.live, counted, n, now);
        }
    }

    /// Counts `n` for a request of `membership` at `now` as `counted` in the key's own meter only
    /// (where the shared store counted its customer's).
    pub fn count_key(&self, membership: &Membership<'_>, counted: Counted, n: u32, now: u64) {
        self.slots
            .count(membership.slot, membership.live, counted, n, now);
    }

    /// Notes that `membership`'s key was presented at `now` (its `lastUsedDate`).
    pub(crate) fn saw(&self, membership: &Membership<'_>, now: u64) {
        self.slots.saw(membership.slot, membership.live, now);
    }

    /// The live state this snapshot's memberships are in (tests hold its book).
    #[cfg(test)]
    pub(crate) fn slots(&self) -> &Arc<Slots> {
        &self.slots
    }

    /// Takes every count and sight not yet taken from the snapshots `current` has held, with their
    /// plan id and holder (a key, or a customer's shared meter), memberships removed since
    /// included. Serialised with rebuilds.
    pub fn take_metered(
        current: &ArcSwap<Snapshot>,
        mut each: impl FnMut(&str, Holder<'_>, Taken),
    ) {
        let slots = current.load().slots.clone();
        let book = lock(&slots.book);
        let snap = current.load();
        let taken = std::mem::take(&mut *lock(&slots.metered));
        let ids = |slot: u32| -> Option<(&str, Holder<'_>)> {
            match book.owners.get(slot as usize).copied() {
                Some(NO_OWNER) | None => book.retired.get(&slot).map(|r| (&*r.plan_id, r.holder())),
                Some(owner) if owner & CUSTOMER != 0 => {
                    let group = snap.customers.get(&slot)?;
                    let plan = &snap.plans[group.plan as usize].counts_as;
                    Some((plan, Holder::Customer(&group.id)))
                }
                Some(owner) => {
                    let (key, member) = snap.keys.member((owner >> 32) as u32, owner as u32)?;
                    let plan = &snap.plans[member.plan as usize].counts_as;
                    Some((plan, Holder::Key(key.id())))
                }
            }
        };
        let displaced = taken
            .displaced
            .into_iter()
            .map(|(slot, counted, day, n)| (slot, Taken::Count(counted, day, n)));
        let current = taken.slots.into_iter().flat_map(|slot| {
            let live = live_at(&book.chunks, slot);
            let counts = Counted::ALL.into_iter().filter_map(move |counted| {
                let (day, n) = live.meters[counted as usize].take()?;
                Some((slot, Taken::Count(counted, day, n)))
            });
            counts.chain(live.seen.take().map(|at| (slot, Taken::Seen(at))))
        });
        for (slot, taken) in displaced.chain(current) {
            match ids(slot) {
                Some((plan_id, holder)) => each(plan_id, holder, taken),
                None => tracing::error!(slot, ?taken, "metered slot has no owner; counts dropped"),
            }
        }
    }

    /// Takes what every key's credits owe the ledger: per key id, the spending and the refills since
    /// the last take.
    pub(crate) fn take_credits(&self, mut each: impl FnMut(&str, CreditEvents)) {
        for (key, account) in self.keys.accounts() {
            let events = account.live.take();
            if !events.spent.is_empty() || !events.refills.is_empty() {
                each(key.id(), events);
            }
        }
    }

    /// The keys that expire after `from` and no later than `until` (epoch nanoseconds), with when.
    pub(crate) fn expiring(&self, from: u64, until: u64) -> Vec<(&str, u64)> {
        self.keys
            .expiries()
            .filter(|&(_, at)| from < at && at <= until)
            .map(|(k, at)| (k.id(), at))
            .collect()
    }

    /// The balance of key `key_id`'s credits on this instance, if it holds some.
    pub fn credit_balance(&self, key_id: &str) -> Option<u64> {
        let key = self.keys.by_id(key_id)?;
        key.credits().map(|a| a.live.credits.balance())
    }

    /// Adds `n` credits to key `key_id` on this instance; `false` when it holds none here yet.
    pub fn add_credits(&self, key_id: &str, n: u64) -> bool {
        let Some(account) = self.keys.by_id(key_id).and_then(|k| k.credits()) else {
            return false;
        };
        account.live.add(n);
        true
    }

    /// Finds the route for a request.
    pub fn route(&self, method: &Method, path: &str) -> Option<RouteMatch> {
        self.routing.router.route(method, path)
    }

    /// How many segments the base path of the stage `path` addresses has (0 when none).
    pub fn base_depth(&self, path: &[u8]) -> usize {
        self.routing.router.base_depth(path)
    }
}

/// The limits a slot keeps for a plan's rules (a membership's own, or a customer's its keys
/// share), as a rebuild starts them.
struct Limits<'a> {
    rules: &'a PlanRules,
    /// The rules the slot was under in the snapshot replaced, when it was.
    before: Option<&'a PlanRules>,
    now: u64,
}

impl Limits<'_> {
    /// Starts the limits in a slot (state `live`): tokens carry over into a changed throttle, the
    /// quota count carries on unless the quota changed (then it starts from `used`), per-method
    /// buckets keep their tokens (`prior` gives the slot's bucket before, where) and go into `out`;
    /// a switch in or out of shadow starts all of them afresh.
    fn start<'b>(
        &self,
        live: &Live,
        used: impl FnOnce() -> i64,
        prior: impl Fn(RouteAt) -> Option<&'b Bucket>,
        out: &mut Vec<(RouteAt, Bucket)>,
    ) {
        let (rules, now) = (self.rules, self.now);
        // Shadow counters are kept apart: a plan switched in or out of shadow starts clean.
        let before = self.before.filter(|r| r.shadow == rules.shadow);
        if self.before.is_some() && before.is_none() {
            live.bucket.reset();
        }
        if let (Some(gcra), Some(old)) = (&rules.throttle, before.and_then(|r| r.throttle.as_ref()))
        {
            if gcra != old {
                gcra.carry_over(old, &live.bucket, now);
            }
        }
        if let Some(quota) = &rules.quota {
            let same = before.is_some_and(|r| {
                r.share_by == rules.share_by
                    && r.quota.as_ref().map(Quota::settings) == Some(quota.settings())
            });
            if !same {
                quota.set_used(&live.quota, now, used());
            }
        }
        for &(at, settings) in &rules.methods {
            let prior = before.and_then(|_| prior(at));
            out.push((at, Bucket::new(settings, prior, now)));
        }
    }
}

impl Memberships for Snapshot {
    /// Whether key `key_id` exists (enabled or not).
    fn has_key(&self, key_id: &str) -> bool {
        self.keys.by_id(key_id).is_some()
    }

    /// The id of the key whose value hashes to `hash`.
    fn key_with_hash(&self, hash: &KeyHash) -> Option<&str> {
        self.keys.holder(hash).map(|k| k.id())
    }

    /// The ids of the plans key `key_id` is in.
    fn plans_of(&self, key_id: &str) -> Vec<&str> {
        self.keys.by_id(key_id).map_or_else(Vec::new, |k| {
            k.members()
                .iter()
                .map(|m| &*self.plans[m.plan as usize].id)
                .collect()
        })
    }

    /// The ids of the keys in plan `plan_id`, sorted.
    fn keys_of(&self, plan_id: &str) -> Vec<&str> {
        let Some(plan) = self.plans.iter().position(|p| *p.id == *plan_id) else {
            return Vec::new();
        };
        let mut ids: Vec<&str> = self
            .keys
            .keys()
            .filter(|k| k.members().iter().any(|m| m.plan as usize == plan))
            .map(|k| k.id())
            .collect();
        ids.sort_unstable();
        ids
    }

    fn customers_of(&self, plan_id: &str) -> Vec<(&str, Vec<&str>)> {
        let Some(plan) = self.plans.iter().position(|p| *p.id == *plan_id) else {
            return Vec::new();
        };
        let mut customers: Vec<(&str, Vec<&str>)> = self
            .customers
            .values()
            .filter(|g| g.plan as usize == plan)
            .map(|g| (&*g.id, Vec::new()))
            .collect();
        if customers.is_empty() {
            return customers;
        }
        customers.sort_unstable();
        for key in self.keys.keys() {
            for member in key.members() {
                if member.plan as usize != plan {
                    continue;
                }
                let Some(group) = self.customers.get(&member.group) else {
                    continue;
                };
                if let Ok(at) = customers.binary_search_by(|(c, _)| (*c).cmp(&group.id)) {
                    customers[at].1.push(key.id());
                }
            }
        }
        for (_, keys) in &mut customers {
            keys.sort_unstable();
        }
        customers
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use tollgate_core::QuotaSettings;
    use tollgate_core::clock::NANOS_PER_SEC;
    use tollgate_core::quota::Period;

    use super::*;
    use crate::limits::{KeyRejected, LimitInfo, Refusal};
    use crate::testing::{
        KEY, OTHER, T0, call, config, counted, quota, records, snap, taken, throttle,
    };

    fn slot_of(cell: &ArcSwap<Snapshot>, key: &str) -> u32 {
        cell.load().membership_of("plan01", key).unwrap().slot
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
        Snapshot::rebuild(&cell, &KeyIndex::from(&rec), &PeriodUsed::default(), T0);
        assert!(call(&old, "GET", get, Some(KEY), T0).is_ok());
        assert_eq!(
            call(&cell.load(), "GET", get, Some(KEY), T0),
            Err(Refusal::Forbidden(KeyRejected::Invalid))
        );
        // Key 2 joins: the retired slot is not reused while the old snapshot is in use.
        rec.bindings = one_plan[1..].to_vec();
        Snapshot::rebuild(&cell, &KeyIndex::from(&rec), &PeriodUsed::default(), T0);
        assert_ne!(slot_of(&cell, "key0000002"), slot);
        assert_eq!(taken(&cell), vec![counted("key0000001", T0, 2)]);

        // Once the old snapshot is gone and its counts taken, a new membership gets the slot, and
        // counts under it are its own.
        drop(old);
        rec.bindings = one_plan.iter().rev().cloned().collect();
        Snapshot::rebuild(&cell, &KeyIndex::from(&rec), &PeriodUsed::default(), T0);
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
        let quota = quota(10, Period::Month);
        let rec = records(None, Some(quota));
        let used = PeriodUsed {
            keys: HashMap::from([(("plan01".to_string(), "key0000001".to_string()), 9i64)]),
            ..PeriodUsed::default()
        };
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
    fn a_rotated_key_keeps_its_state_and_its_old_value_until_the_grace_ends() {
        let mut rec = records(Some(throttle(0.001, 5)), Some(quota(4, Period::Day)));
        let cell = ArcSwap::from_pointee(snap(config(None, None), &rec));
        let get = "/prod/registrations/42";
        for _ in 0..2 {
            assert!(call(&cell.load(), "GET", get, Some(KEY), T0).is_ok());
        }
        let slot = slot_of(&cell, "key0000001");

        // Rotated, with a grace period ending at `until`.
        let new = "rotated-central-value-0123456789";
        let until = T0 + 60 * NANOS_PER_SEC;
        rec.keys[0].rotate(new, KeyHash::of(new), until);
        Snapshot::rebuild(&cell, &KeyIndex::from(&rec), &PeriodUsed::default(), T0);
        assert_eq!(slot_of(&cell, "key0000001"), slot, "the same membership");
        let s = cell.load_full();
        // The quota count and the bucket carry on: 2 of 4 used, 3 of 5 tokens left.
        let limits = call(&s, "GET", get, Some(new), T0).unwrap();
        assert_eq!(limits.quota.unwrap().remaining, 1);
        assert_eq!(limits.throttle.unwrap().remaining, 2);
        let limits = call(&s, "GET", get, Some(KEY), until - 1).unwrap();
        assert_eq!(
            limits.quota.unwrap().remaining,
            0,
            "the old value, a nanosecond before"
        );
        let invalid = Err(Refusal::Forbidden(KeyRejected::Invalid));
        assert_eq!(
            call(&s, "GET", get, Some(KEY), until),
            invalid,
            "at the instant"
        );
        assert_eq!(call(&s, "GET", get, Some(KEY), until + 1), invalid);
        assert!(matches!(
            call(&s, "GET", get, Some(new), until),
            Err(Refusal::LimitExceeded { .. })
        ));
        assert_eq!(
            taken(&cell),
            vec![counted("key0000001", T0, 4)],
            "one membership counted every request, whichever value"
        );

        // A second rotation ends the first grace at once: at most two values live.
        let third = "third-central-value-0123456789";
        rec.keys[0].rotate(third, KeyHash::of(third), until);
        Snapshot::rebuild(&cell, &KeyIndex::from(&rec), &PeriodUsed::default(), T0);
        let s = cell.load_full();
        assert_eq!(
            call(&s, "GET", get, Some(KEY), T0),
            invalid,
            "the first value"
        );
        assert!(
            matches!(
                call(&s, "GET", get, Some(new), until - 1),
                Err(Refusal::TooManyRequests { .. } | Refusal::LimitExceeded { .. })
            ),
            "the second value, in its grace (and out of tokens)"
        );
        use tollgate_store::Memberships as _;
        assert_eq!(
            s.key_with_hash(&KeyHash::of(new)),
            Some("key0000001"),
            "not reusable"
        );
        assert_eq!(s.key_with_hash(&KeyHash::of(KEY)), None);
    }

    #[test]
    fn rebuild_keeps_live_state_and_applies_changes_at_once() {
        let quota = quota(10, Period::Day);
        let mut rec = records(Some(throttle(1.0, 3)), Some(quota));
        let cell = ArcSwap::from_pointee(snap(config(None, None), &rec));
        let get = "/prod/registrations/42";
        for _ in 0..3 {
            assert!(call(&cell.load(), "GET", get, Some(KEY), T0).is_ok());
        }

        // Same records: the bucket stays empty, the quota count and the unflushed meter carry over.
        Snapshot::rebuild(&cell, &KeyIndex::from(&rec), &PeriodUsed::default(), T0);
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
            &PeriodUsed::default(),
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
        let used = PeriodUsed {
            keys: HashMap::from([(("plan01".to_string(), "key0000001".to_string()), 4i64)]),
            ..PeriodUsed::default()
        };
        Snapshot::rebuild(&cell, &KeyIndex::from(&rec), &used, T0);
        let s3 = cell.load_full();
        assert_eq!(
            call(&s3, "GET", get, Some(KEY), T0 + 5 * NANOS_PER_SEC),
            Err(Refusal::Forbidden(KeyRejected::Disabled))
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

    #[test]
    fn keys_of_one_customer_share_its_buckets_and_quota_and_keep_their_own_meters() {
        use tollgate_core::sharing::LIMITS_SHARE_BY_TAG;
        let third = "third-partner-key-0123456789";
        let mut rec = records(Some(throttle(0.001, 3)), Some(quota(4, Period::Day)));
        rec.plans[0]
            .tags
            .insert(LIMITS_SHARE_BY_TAG.into(), "customerId".into());
        rec.keys[1].enabled = true;
        for k in &mut rec.keys {
            k.customer_id = Some("acme".into());
        }
        let mut lone = rec.keys[1].clone();
        (lone.id, lone.value_hash, lone.customer_id) =
            ("key0000003".into(), KeyHash::of(third), None);
        rec.keys.push(lone);
        rec.bindings.push(("plan01".into(), "key0000003".into()));
        let used = PeriodUsed {
            customers: HashMap::from([(("plan01".into(), "acme".into()), 1i64)]),
            ..PeriodUsed::default()
        };
        let cell = ArcSwap::from_pointee(
            Snapshot::build(
                config(None, None),
                &KeyIndex::from(&rec),
                &used,
                EpochDay::from_nanos(T0),
            )
            .unwrap(),
        );
        let get = "/prod/registrations/42";
        // The customer had spent 1 of 4 before: its two keys share the 3 left, and 3 tokens.
        let left = |r: Result<LimitInfo, Refusal>| {
            r.map(|l| (l.quota.unwrap().remaining, l.throttle.unwrap().remaining))
        };
        assert_eq!(
            left(call(&cell.load(), "GET", get, Some(KEY), T0)),
            Ok((2, 2))
        );
        assert_eq!(
            left(call(&cell.load(), "GET", get, Some(OTHER), T0)),
            Ok((1, 1))
        );
        assert_eq!(
            left(call(&cell.load(), "GET", get, Some(KEY), T0)),
            Ok((0, 0))
        );
        assert!(matches!(
            call(&cell.load(), "GET", get, Some(OTHER), T0),
            Err(Refusal::TooManyRequests { .. })
        ));
        // A key without a customerId keeps its own.
        assert_eq!(
            left(call(&cell.load(), "GET", get, Some(third), T0)),
            Ok((3, 2))
        );

        // A rebuild keeps the customer's state; the key that leaves the customer gets its own.
        rec.keys[1].customer_id = Some("other".into());
        Snapshot::rebuild(&cell, &KeyIndex::from(&rec), &PeriodUsed::default(), T0);
        assert!(matches!(
            call(&cell.load(), "GET", get, Some(KEY), T0),
            Err(Refusal::TooManyRequests { .. })
        ));
        assert_eq!(
            left(call(&cell.load(), "GET", get, Some(OTHER), T0)),
            Ok((3, 2))
        );
        let s = cell.load_full();
        let m = s.membership_of("plan01", "key0000001").unwrap();
        assert_eq!(m.customer(), Some("acme"));
        assert_eq!(m.holder(), Holder::Customer("acme"));
        assert_eq!(
            s.membership_of("plan01", "key0000003").unwrap().holder(),
            Holder::Key("key0000003")
        );
        // Each key's own admitted requests, and each customer's together.
        assert_eq!(
            taken(&cell),
            vec![
                counted("customer:acme", T0, 3),
                counted("customer:other", T0, 1),
                counted("key0000001", T0, 2),
                counted("key0000002", T0, 2),
                counted("key0000003", T0, 1),
            ]
        );

        // The customer's last key leaves it: its shared counts not yet taken are still taken.
        assert!(call(&s, "GET", get, Some(OTHER), T0).is_ok());
        rec.keys[1].customer_id = None;
        Snapshot::rebuild(&cell, &KeyIndex::from(&rec), &PeriodUsed::default(), T0);
        assert_eq!(
            taken(&cell),
            vec![
                counted("customer:other", T0, 1),
                counted("key0000002", T0, 1)
            ]
        );
    }
}

#[cfg(test)]
mod change_tests {
    use std::collections::BTreeMap;

    use tollgate_core::clock::NANOS_PER_SEC;
    use tollgate_core::quota::Period;
    use tollgate_core::sharing::LIMITS_SHARE_BY_TAG;
    use tollgate_core::{ApiKey, ApiStage, UsagePlan};
    use tollgate_store::Records;

    use super::*;
    use crate::limits::Refusal;
    use crate::testing::{T0, call, config, quota, snap, taken, throttle};

    fn value(i: usize) -> String {
        format!("partner-value-{i:05}-0123456789")
    }

    /// 300 keys in plan01 (prod, a per-method throttle); every third also in plan02 (dev, limits
    /// shared by customer, five customers); every seventh disabled.
    fn fleet() -> Records {
        let mut rec = crate::testing::records(Some(throttle(1000.0, 1000)), None);
        rec.plans[0].quota = Some(quota(1000, Period::Day));
        let mut shared = UsagePlan {
            id: "plan02".into(),
            name: "shared".into(),
            api_stages: vec![ApiStage {
                api_id: "warranty".into(),
                stage: "dev".into(),
                throttle: BTreeMap::from([(
                    "/registrations/{id}/warranty/PUT".into(),
                    throttle(1000.0, 1000),
                )]),
            }],
            quota: Some(quota(1000, Period::Day)),
            ..UsagePlan::default()
        };
        shared
            .tags
            .insert(LIMITS_SHARE_BY_TAG.into(), "customerId".into());
        rec.plans.push(shared);
        rec.keys.clear();
        rec.bindings.clear();
        for i in 0..300 {
            rec.keys.push(ApiKey {
                id: format!("k{i:04}"),
                name: format!("k{i:04}"),
                enabled: i % 7 != 0,
                value_hash: KeyHash::of(value(i)),
                customer_id: (i % 3 == 0).then(|| format!("c{}", i % 5)),
                ..ApiKey::default()
            });
            rec.bindings.push(("plan01".into(), format!("k{i:04}")));
            if i % 3 == 0 {
                rec.bindings.push(("plan02".into(), format!("k{i:04}")));
            }
        }
        rec
    }

    /// The keys `ids` of `rec`, with their plans, as the store hands a write's keys over.
    fn changed(rec: &Records, ids: &[String]) -> KeyIndex {
        let found: Vec<(ApiKey, Vec<String>)> = ids
            .iter()
            .filter_map(|id| rec.keys.iter().find(|k| k.id == *id))
            .map(|k| {
                let mut plans: Vec<String> = rec
                    .bindings
                    .iter()
                    .filter(|(_, key)| *key == k.id)
                    .map(|(p, _)| p.clone())
                    .collect();
                plans.sort();
                (k.clone(), plans)
            })
            .collect();
        KeyIndex::of_keys(rec.plans.clone(), &found)
    }

    /// What a request with each value (those of `values`) gets, on each stage: admitted, or why not.
    fn answers(s: &Snapshot, values: &[String]) -> Vec<String> {
        let mut out = Vec::new();
        for v in values {
            for stage in ["prod", "dev"] {
                let path = format!("/{stage}/registrations/42");
                let got = match call(s, "GET", &path, Some(v), T0) {
                    Ok(_) => "ok".to_string(),
                    Err(Refusal::Forbidden(why)) => format!("{why:?}"),
                    Err(other) => format!("{other:?}"),
                };
                out.push(got);
            }
        }
        out
    }

    fn served(s: &Snapshot, rec: &Records) -> Vec<String> {
        let mut out = vec![format!("{} keys, {} plans", s.key_count(), s.plan_count())];
        for plan in ["plan01", "plan02"] {
            out.push(format!("{:?}", s.keys_of(plan)));
            out.push(format!("{:?}", s.customers_of(plan)));
        }
        for k in &rec.keys {
            out.push(format!(
                "{} {:?} {:?} {:?}",
                k.id,
                s.has_key(&k.id),
                s.key_with_hash(&k.value_hash),
                s.plans_of(&k.id)
            ));
            for plan in ["plan01", "plan02"] {
                let holder = s
                    .membership_of(plan, &k.id)
                    .map(|m| crate::testing::holder_name(m.holder()));
                out.push(format!("{plan} {holder:?}"));
            }
        }
        out
    }

    #[test]
    fn a_change_of_keys_serves_what_a_rebuild_would() {
        let mut rec = fleet();
        let cell = ArcSwap::from_pointee(snap(config(None, None), &rec));
        let mut values: Vec<String> = (0..300).map(value).collect();
        values.push("never-issued-value-0123456789".into());
        let new = "a-brand-new-partner-value-0123456789".to_string();
        values.push(new.clone());
        let rotated = "the-rotated-partner-value-0123456789".to_string();
        values.push(rotated.clone());

        type Step = Box<dyn Fn(&mut Records) -> Vec<String>>;
        let steps: Vec<(&str, Step)> = vec![
            ("a key and its plan, in one write", {
                let new = new.clone();
                Box::new(move |rec: &mut Records| {
                    rec.keys.push(ApiKey {
                        id: "knew".into(),
                        name: "knew".into(),
                        enabled: true,
                        value_hash: KeyHash::of(&new),
                        customer_id: Some("c1".into()),
                        ..ApiKey::default()
                    });
                    rec.bindings.push(("plan01".into(), "knew".into()));
                    rec.bindings.push(("plan02".into(), "knew".into()));
                    vec!["knew".into()]
                })
            }),
            (
                "a key leaves a plan",
                Box::new(|rec: &mut Records| {
                    rec.bindings
                        .retain(|(p, k)| !(p == "plan01" && k == "k0003"));
                    vec!["k0003".into()]
                }),
            ),
            (
                "keys disabled and enabled",
                Box::new(|rec: &mut Records| {
                    rec.keys[6].enabled = false;
                    rec.keys[7].enabled = true;
                    vec!["k0006".into(), "k0007".into()]
                }),
            ),
            (
                "a key deleted",
                Box::new(|rec: &mut Records| {
                    rec.keys.retain(|k| k.id != "k0009");
                    rec.bindings.retain(|(_, k)| k != "k0009");
                    vec!["k0009".into()]
                }),
            ),
            ("a key rotated", {
                let rotated = rotated.clone();
                Box::new(move |rec: &mut Records| {
                    let k = rec.keys.iter_mut().find(|k| k.id == "k0010").unwrap();
                    k.rotate(&rotated, KeyHash::of(&rotated), T0 + 60 * NANOS_PER_SEC);
                    vec!["k0010".into()]
                })
            }),
            (
                "customers changed: one to a new customer, one to none",
                Box::new(|rec: &mut Records| {
                    rec.keys[12].customer_id = Some("cnew".into());
                    rec.keys[15].customer_id = None;
                    vec!["k0012".into(), "k0015".into()]
                }),
            ),
            (
                "the last key of a customer leaves it",
                Box::new(|rec: &mut Records| {
                    rec.keys[12].customer_id = Some("c2".into());
                    vec!["k0012".into()]
                }),
            ),
            (
                "a key touched that does not exist",
                Box::new(|_: &mut Records| vec!["nobody".into()]),
            ),
        ];
        for (what, step) in steps {
            let touched = step(&mut rec);
            let index = changed(&rec, &touched);
            let done = Snapshot::change_keys(&cell, &index, &touched, &PeriodUsed::default(), T0);
            assert!(done, "{what}: applied alone");
            let rebuilt = snap(config(None, None), &rec);
            assert_eq!(
                served(&cell.load(), &rec),
                served(&rebuilt, &rec),
                "{what}: served as a rebuild serves"
            );
            assert_eq!(
                answers(&cell.load(), &values),
                answers(&rebuilt, &values),
                "{what}: requests answered as a rebuild answers them"
            );
        }
        // The rotated key's old value works in its grace; the new key counts for itself and its
        // customer; every count is booked to its holder after all those shards were built again.
        assert!(
            call(
                &cell.load(),
                "GET",
                "/prod/registrations/42",
                Some(&value(10)),
                T0
            )
            .is_ok()
        );
        let counts = taken(&cell);
        let of = |holder: &str| -> u64 {
            counts
                .iter()
                .filter(|(_, h, _, _)| h == holder)
                .map(|(_, _, _, n)| n)
                .sum()
        };
        let steps = 8;
        assert_eq!(of("knew"), 2 * steps, "prod and dev, each step");
        assert_eq!(
            of("k0010"),
            4 + 4 * 2 + 1,
            "prod, each step; its old value and new one from the rotation on; and one more"
        );
        assert!(of("customer:c1") >= steps, "the new key's dev requests");
    }

    /// Where a JWT authorizer names keys by name, a write of a few keys changes the names index by
    /// what it changes, as it changes the rest (before, the whole table was built again).
    #[test]
    fn a_change_of_keys_found_by_name_is_applied_alone() {
        use crate::jwt::{Authorizer, AuthorizerSettings};
        use crate::tls::ClientTls;
        let mut rec = fleet();
        let settings = AuthorizerSettings {
            name: "partners".into(),
            jwks: "never-read.json".into(),
            issuer: None,
            audience: None,
            claim: "sub".into(),
            identifier: UsageIdentifier::Name,
        };
        let tls = Arc::new(ClientTls::new(Default::default()));
        let authorizer = Arc::new(Authorizer::new(settings, tls).unwrap());
        let mut cfg = config(None, None);
        for route in cfg.apis.iter_mut().flat_map(|a| a.routes.iter_mut()) {
            route.authorizer = Some(authorizer.clone());
        }
        let cell = ArcSwap::from_pointee(snap(cfg, &rec));
        let named = |name: &str| cell.load().keys.by_name(name).map(|k| k.id().to_owned());
        assert_eq!(named("k0002").as_deref(), Some("k0002"));
        // Renamed; and key 4 takes key 3's name, which then names neither.
        rec.keys[2].name = "renamed".into();
        rec.keys[4].name = "k0003".into();
        let touched = vec!["k0002".to_string(), "k0004".to_string()];
        let index = changed(&rec, &touched);
        let done = Snapshot::change_keys(&cell, &index, &touched, &PeriodUsed::default(), T0);
        assert!(done, "applied alone");
        assert_eq!(named("renamed").as_deref(), Some("k0002"));
        assert_eq!(named("k0002"), None);
        assert_eq!((named("k0003"), named("k0004")), (None, None));
        assert_eq!(named("k0005").as_deref(), Some("k0005"));
    }

    #[test]
    fn a_change_of_keys_keeps_the_others_state_and_its_own() {
        let mut rec = fleet();
        let cell = ArcSwap::from_pointee(snap(config(None, None), &rec));
        rec.plans[0].quota = Some(quota(1000, Period::Day));
        let get = "/prod/registrations/42";
        let left = |v: &str| {
            call(&cell.load(), "GET", get, Some(v), T0)
                .unwrap()
                .quota
                .unwrap()
                .remaining
        };
        for _ in 0..3 {
            left(&value(1));
        }
        assert_eq!(left(&value(2)), 999);
        // Key 2 changes (a new name), key 1 does not: both carry on from where they were.
        rec.keys[2].name = "renamed".into();
        let touched = vec!["k0002".to_string()];
        let apply = |rec: &Records| {
            let index = changed(rec, &touched);
            Snapshot::change_keys(&cell, &index, &touched, &PeriodUsed::default(), T0)
        };
        assert!(apply(&rec));
        assert_eq!(left(&value(1)), 996);
        assert_eq!(left(&value(2)), 998);
        // Disabled, then enabled again: the count is kept.
        for enabled in [false, true] {
            rec.keys[2].enabled = enabled;
            assert!(apply(&rec));
        }
        assert_eq!(left(&value(2)), 997);
        // A change that needs the plans read again is refused, and nothing changes.
        let mut other_plans = rec.clone();
        other_plans.plans[0].quota = Some(quota(5, Period::Day));
        let index = changed(&other_plans, &touched);
        let before = cell.load_full();
        assert!(!Snapshot::change_keys(
            &cell,
            &index,
            &touched,
            &PeriodUsed::default(),
            T0
        ));
        assert!(Arc::ptr_eq(&before, &cell.load_full()));
    }
}
