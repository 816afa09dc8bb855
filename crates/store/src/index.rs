//! The gateway's view of the records, compact: what a million keys need to be served, in a few
//! large buffers rather than millions of small allocations (which the allocator keeps resident
//! long after they are freed).

use std::borrow::Cow;
use std::collections::HashMap;

use tollgate_core::IpNetworks;
use tollgate_core::credits::Refill;
use tollgate_core::model::PreviousValue;
use tollgate_core::{ApiKey, KeyHash, UsagePlan};

use crate::Records;

/// What the gateway needs of a key besides its id and value hash.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KeyTerms {
    /// Disabled keys are refused.
    pub enabled: bool,
    /// From this instant (epoch nanoseconds) the key is refused.
    pub expires_at: Option<u64>,
    /// The value before the last rotation and when it stops working.
    pub previous: Option<PreviousValue>,
    /// The networks the key may be used from (none: anywhere).
    pub sources: Option<IpNetworks>,
    /// AWS `customerId`: whose limits the key draws on in a plan that shares them by customer.
    pub customer_id: Option<Box<str>>,
    /// Its credits' refill.
    pub refill: Option<Refill>,
    /// It holds credits.
    pub credits: bool,
}

impl KeyTerms {
    /// `key`'s terms.
    pub fn of(key: &ApiKey) -> Self {
        Self {
            enabled: key.enabled,
            expires_at: key.expires_at(),
            previous: key.previous,
            sources: key.source_ips(),
            customer_id: key.customer_id.as_deref().map(Box::from),
            refill: key.refill(),
            credits: key.credits,
        }
    }
}

/// Plans in full; per key only its id, value hash and terms; bindings by position.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyIndex {
    /// All usage plans.
    pub plans: Vec<UsagePlan>,
    ids: String,
    id_ends: Vec<u32>,
    /// The keys' names, as `ids` (JWT callers may name their key by name).
    names: String,
    name_ends: Vec<u32>,
    hashes: Vec<KeyHash>,
    enabled: Vec<bool>,
    /// (key index, expiry) of the few keys that expire, in key order.
    expiries: Vec<(u32, u64)>,
    /// (key index, old value) of the few keys in a rotation's grace period, in key order.
    previous: Vec<(u32, PreviousValue)>,
    /// (key index, allowlist) of the few keys with one, in key order.
    sources: Vec<(u32, IpNetworks)>,
    /// (key index, refill) of the few keys with one, in key order.
    refills: Vec<(u32, Refill)>,
    /// The keys that hold credits, in key order.
    with_credits: Vec<u32>,
    /// (key index, end in `customer_ids`) of the keys with a `customerId`, in key order.
    customers: Vec<(u32, u32)>,
    customer_ids: String,
    /// (plan index, key index).
    bindings: Vec<(u32, u32)>,
    /// Key indices in id order, once [`bind_all`](Self::bind_all) has run.
    by_id: Vec<u32>,
}

impl KeyIndex {
    /// An index of `plans`, to which keys and then bindings are added.
    pub fn new(plans: Vec<UsagePlan>) -> Self {
        Self {
            plans,
            ..Self::default()
        }
    }

    /// An index of `keys` (each with the ids of its plans) over `plans`: the few keys a write
    /// changed.
    pub fn of_keys(plans: Vec<UsagePlan>, keys: &[crate::NamedKey]) -> Self {
        let mut index = Self::new(plans);
        for (key, _) in keys {
            index.push_key(&key.id, &key.name, key.value_hash, KeyTerms::of(key));
        }
        index.bind_all(
            keys.iter()
                .flat_map(|(k, plans)| plans.iter().map(move |p| (p, &k.id))),
        );
        index
    }

    /// The plans, the rest let go (a million keys' worth of buffers).
    pub fn into_plans(self) -> Vec<UsagePlan> {
        self.plans
    }

    /// Adds a key.
    pub fn push_key(&mut self, id: &str, name: &str, hash: KeyHash, terms: KeyTerms) {
        self.names.push_str(name);
        self.name_ends
            .push(u32::try_from(self.names.len()).unwrap_or(u32::MAX));
        if let Some(at) = terms.expires_at {
            self.expiries.push((self.hashes.len() as u32, at));
        }
        if let Some(previous) = terms.previous {
            self.previous.push((self.hashes.len() as u32, previous));
        }
        if let Some(sources) = terms.sources {
            self.sources.push((self.hashes.len() as u32, sources));
        }
        if let Some(refill) = terms.refill {
            self.refills.push((self.hashes.len() as u32, refill));
        }
        if terms.credits {
            self.with_credits.push(self.hashes.len() as u32);
        }
        if let Some(customer) = terms.customer_id {
            self.customer_ids.push_str(&customer);
            let end = u32::try_from(self.customer_ids.len()).unwrap_or(u32::MAX);
            self.customers.push((self.hashes.len() as u32, end));
        }
        self.ids.push_str(id);
        self.id_ends
            .push(u32::try_from(self.ids.len()).unwrap_or(u32::MAX));
        self.hashes.push(hash);
        self.enabled.push(terms.enabled);
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.hashes.len()
    }

    /// Whether there are no keys.
    pub fn is_empty(&self) -> bool {
        self.hashes.is_empty()
    }

    /// The length of all ids together.
    pub fn id_bytes(&self) -> usize {
        self.ids.len()
    }

    /// Key `i`'s id.
    pub fn id(&self, i: usize) -> &str {
        let start = i.checked_sub(1).map_or(0, |p| self.id_ends[p] as usize);
        &self.ids[start..self.id_ends[i] as usize]
    }

    /// Key `i`'s name.
    pub fn name(&self, i: usize) -> &str {
        let start = i.checked_sub(1).map_or(0, |p| self.name_ends[p] as usize);
        &self.names[start..self.name_ends[i] as usize]
    }

    /// Key `i`'s value hash.
    pub fn hash(&self, i: usize) -> KeyHash {
        self.hashes[i]
    }

    /// Key `i`'s terms.
    pub fn terms(&self, i: usize) -> KeyTerms {
        let i32 = i as u32;
        let expires_at = self
            .expiries
            .binary_search_by_key(&i32, |&(k, _)| k)
            .ok()
            .map(|at| self.expiries[at].1);
        let previous = self
            .previous
            .binary_search_by_key(&i32, |&(k, _)| k)
            .ok()
            .map(|at| self.previous[at].1);
        let sources = self
            .sources
            .binary_search_by_key(&i32, |(k, _)| *k)
            .ok()
            .map(|at| self.sources[at].1.clone());
        KeyTerms {
            enabled: self.enabled[i],
            expires_at,
            previous,
            sources,
            customer_id: self.customer(i).map(Box::from),
            refill: self
                .refills
                .binary_search_by_key(&i32, |&(k, _)| k)
                .ok()
                .map(|at| self.refills[at].1),
            credits: self.with_credits.binary_search(&i32).is_ok(),
        }
    }

    /// Key `i`'s `customerId`, if it has one.
    pub fn customer(&self, i: usize) -> Option<&str> {
        let at = self
            .customers
            .binary_search_by_key(&(i as u32), |&(k, _)| k)
            .ok()?;
        let start = at
            .checked_sub(1)
            .map_or(0, |p| self.customers[p].1 as usize);
        Some(&self.customer_ids[start..self.customers[at].1 as usize])
    }

    /// (plan index, key index) of every binding, in the order they were added.
    pub fn bindings(&self) -> &[(u32, u32)] {
        &self.bindings
    }

    /// Adds the bindings given by (plan id, key id), once every key is in; pairs naming an unknown
    /// plan or key are skipped.
    pub fn bind_all<P: AsRef<str>, K: AsRef<str>>(
        &mut self,
        pairs: impl IntoIterator<Item = (P, K)>,
    ) {
        let mut binder = self.binder();
        for (plan, key) in pairs {
            binder.bind(plan.as_ref(), key.as_ref());
        }
        binder.finish();
    }

    /// A binder for adding bindings a page at a time, once every key is in. A key id pushed twice
    /// (a paged scan may return one twice) is kept once.
    pub fn binder(&mut self) -> Binder<'_> {
        let mut by_id = self.sorted_by_id();
        if by_id
            .windows(2)
            .any(|w| w[0].0 == w[1].0 && self.id(w[0].1 as usize) == self.id(w[1].1 as usize))
        {
            self.drop_repeated_ids(&by_id);
            by_id = self.sorted_by_id();
        }
        Binder {
            plans: self
                .plans
                .iter()
                .enumerate()
                .map(|(i, p)| (p.id.clone(), i as u32))
                .collect(),
            by_id,
            bindings: Vec::new(),
            short: Vec::new(),
            index: self,
        }
    }

    /// (leading bytes of the id, key index) in id order: comparisons mostly stay in this compact
    /// array instead of reaching into a million ids at random.
    fn sorted_by_id(&self) -> Vec<(u128, u32)> {
        let mut by_id: Vec<(u128, u32)> = (0..self.len())
            .map(|i| (id_prefix(self.id(i)), i as u32))
            .collect();
        by_id.sort_unstable_by(|a, b| {
            a.0.cmp(&b.0)
                .then_with(|| self.id(a.1 as usize).cmp(self.id(b.1 as usize)))
        });
        by_id
    }

    /// Keeps the first of keys with the same id (`by_id` as from `sorted_by_id`).
    fn drop_repeated_ids(&mut self, by_id: &[(u128, u32)]) {
        let mut keep = vec![true; self.len()];
        for run in by_id.chunk_by(|a, b| self.id(a.1 as usize) == self.id(b.1 as usize)) {
            let first = run.iter().map(|x| x.1).min().unwrap_or_default();
            for &(_, i) in run {
                keep[i as usize] = i == first;
            }
        }
        let mut old = std::mem::take(self);
        self.plans = std::mem::take(&mut old.plans);
        for i in (0..old.len()).filter(|&i| keep[i]) {
            self.push_key(old.id(i), old.name(i), old.hash(i), old.terms(i));
        }
    }

    /// Key indices in id order: kept since the bindings were added, sorted here if keys came after.
    pub fn by_id(&self) -> Cow<'_, [u32]> {
        if self.by_id.len() == self.len() {
            Cow::Borrowed(&self.by_id)
        } else {
            Cow::Owned(self.sorted_by_id().into_iter().map(|(_, i)| i).collect())
        }
    }
}

/// Adds bindings to a [`KeyIndex`]; see [`KeyIndex::binder`].
#[derive(Debug)]
pub struct Binder<'i> {
    index: &'i mut KeyIndex,
    plans: HashMap<String, u32>,
    by_id: Vec<(u128, u32)>,
    bindings: Vec<(u32, u32)>,
    /// (id, plan) of the bindings whose key id fits in [`id_prefix`] whole, found in one pass at
    /// the end: a million binary searches into a million ids at random took half a Redis start.
    short: Vec<(u128, u32)>,
}

impl Binder<'_> {
    /// Adds the binding (plan id, key id), unless it names an unknown plan or key.
    pub fn bind(&mut self, plan: &str, key: &str) {
        let Some(&p) = self.plans.get(plan) else {
            return;
        };
        let (index, prefix) = (&*self.index, id_prefix(key));
        if key.len() <= ID_PREFIX {
            self.short.push((prefix, p));
        } else if let Ok(at) = self.by_id.binary_search_by(|&(lead, i)| {
            lead.cmp(&prefix)
                .then_with(|| index.id(i as usize).cmp(key))
        }) {
            self.bindings.push((p, self.by_id[at].1));
        }
    }

    /// Stores the bindings, each once, ordered by plan (plans are in id order) then key.
    pub fn finish(mut self) {
        // Both in id order, walked together. Of the ids with one prefix, the one it holds whole
        // (if any) comes first: a shorter id sorts before those it starts.
        self.short.sort_unstable();
        let index = &*self.index;
        let mut keys = self.by_id.iter().peekable();
        for &(prefix, plan) in &self.short {
            while keys.next_if(|&&(lead, _)| lead < prefix).is_some() {}
            if let Some(&&(lead, i)) = keys.peek() {
                if lead == prefix && index.id(i as usize).len() <= ID_PREFIX {
                    self.bindings.push((plan, i));
                }
            }
        }
        self.bindings.sort_unstable();
        self.bindings.dedup();
        self.index.bindings = self.bindings;
        self.index.by_id = self.by_id.into_iter().map(|(_, i)| i).collect();
    }
}

/// The bytes of an id [`id_prefix`] holds.
const ID_PREFIX: usize = 16;

/// An id's first 16 bytes as a number that orders as the ids do (ids hold no NUL bytes).
fn id_prefix(id: &str) -> u128 {
    let mut lead = [0u8; ID_PREFIX];
    let n = id.len().min(ID_PREFIX);
    lead[..n].copy_from_slice(&id.as_bytes()[..n]);
    u128::from_be_bytes(lead)
}

impl From<&Records> for KeyIndex {
    fn from(records: &Records) -> Self {
        let mut index = Self::new(records.plans.clone());
        for key in &records.keys {
            index.push_key(&key.id, &key.name, key.value_hash, KeyTerms::of(key));
        }
        index.bind_all(records.bindings.iter().map(|(p, k)| (p, k)));
        index
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(id: &str) -> UsagePlan {
        UsagePlan {
            id: id.into(),
            name: id.into(),
            description: None,
            api_stages: Vec::new(),
            throttle: None,
            quota: None,
            ..UsagePlan::default()
        }
    }

    #[test]
    fn ids_sharing_their_first_sixteen_bytes_sort_and_resolve() {
        let mut index = KeyIndex::new(vec![plan("p")]);
        for id in [
            "sixteen-byte-id-Z",
            "sixteen-byte-id-A",
            "sixteen-byte-id",
            "a",
        ] {
            let terms = KeyTerms {
                enabled: true,
                ..KeyTerms::default()
            };
            index.push_key(id, id, KeyHash::of(id), terms);
        }
        let ids = |index: &KeyIndex| -> Vec<String> {
            index
                .by_id()
                .iter()
                .map(|&i| index.id(i as usize).to_owned())
                .collect()
        };
        assert_eq!(
            ids(&index),
            [
                "a",
                "sixteen-byte-id",
                "sixteen-byte-id-A",
                "sixteen-byte-id-Z"
            ],
            "sorted on demand before any binding"
        );
        index.bind_all([("p", "sixteen-byte-id-A"), ("p", "sixteen-byte-id")]);
        let by_id: Vec<&str> = index
            .by_id()
            .iter()
            .map(|&i| index.id(i as usize))
            .collect();
        assert_eq!(
            by_id,
            [
                "a",
                "sixteen-byte-id",
                "sixteen-byte-id-A",
                "sixteen-byte-id-Z"
            ]
        );
        let bound: Vec<&str> = index
            .bindings()
            .iter()
            .map(|&(_, k)| index.id(k as usize))
            .collect();
        assert_eq!(bound, ["sixteen-byte-id-A", "sixteen-byte-id"]);
    }

    /// Ids held whole by their prefix are bound in one pass at the end, longer ones at once: an
    /// id of exactly 16 bytes and a longer one it starts, ids not there, a key in two plans.
    #[test]
    fn bindings_resolve_ids_of_every_length() {
        let mut index = KeyIndex::new(vec![plan("p1"), plan("p2")]);
        let ids = [
            "0123456789abcdef-long",
            "0123456789abcdef",
            "fedcba9876543210-long",
            "a",
            "b",
        ];
        for id in ids {
            let terms = KeyTerms {
                enabled: true,
                ..KeyTerms::default()
            };
            index.push_key(id, id, KeyHash::of(id), terms);
        }
        index.bind_all([
            ("p1", "0123456789abcdef-long"),
            ("p2", "0123456789abcdef"),
            ("p1", "0123456789abcdeX"),
            ("p1", "0123456789abcdef-other"),
            ("p2", "b"),
            ("p1", "b"),
            ("p1", "b"),
            ("p1", "missing"),
            ("p1", "fedcba9876543210"),
            ("p3", "a"),
        ]);
        let bound: Vec<(&str, &str)> = index
            .bindings()
            .iter()
            .map(|&(p, k)| (&*index.plans[p as usize].id, index.id(k as usize)))
            .collect();
        assert_eq!(
            bound,
            [
                ("p1", "0123456789abcdef-long"),
                ("p1", "b"),
                ("p2", "0123456789abcdef"),
                ("p2", "b")
            ]
        );
    }

    #[test]
    fn keys_and_bindings_read_twice_are_kept_once() {
        let mut index = KeyIndex::new(vec![plan("p1"), plan("p2")]);
        for id in ["b", "a", "b", "c"] {
            let terms = KeyTerms {
                enabled: id != "c",
                expires_at: (id == "b").then_some(7),
                previous: None,
                sources: None,
                customer_id: (id == "a").then(|| "acme".into()),
                refill: None,
                credits: false,
            };
            index.push_key(
                id,
                &format!("name-{id}"),
                KeyHash::of(format!("value-of-{id}")),
                terms,
            );
        }
        let mut binder = index.binder();
        for (p, k) in [
            ("p2", "a"),
            ("p1", "b"),
            ("p2", "a"),
            ("p9", "a"),
            ("p1", "zz"),
        ] {
            binder.bind(p, k);
        }
        binder.finish();
        let ids: Vec<&str> = (0..index.len()).map(|i| index.id(i)).collect();
        assert_eq!(
            ids,
            ["b", "a", "c"],
            "the first of two b's is kept, order kept"
        );
        assert!(!index.terms(2).enabled);
        assert_eq!(index.terms(0).expires_at, Some(7), "kept with the first b");
        assert_eq!(index.terms(1).expires_at, None);
        assert_eq!(index.customer(1), Some("acme"), "kept with its key");
        assert_eq!(index.customer(0), None);
        assert_eq!(index.hash(0), KeyHash::of("value-of-b"));
        let bound: Vec<(&str, &str)> = index
            .bindings()
            .iter()
            .map(|&(p, k)| (index.plans[p as usize].id.as_str(), index.id(k as usize)))
            .collect();
        assert_eq!(
            bound,
            [("p1", "b"), ("p2", "a")],
            "unknown plans and keys are skipped"
        );
        let by_id: Vec<&str> = index
            .by_id()
            .iter()
            .map(|&i| index.id(i as usize))
            .collect();
        assert_eq!(by_id, ["a", "b", "c"]);
    }
}
