//! The served keys in little memory (about 50 bytes a key), looked up by the hash of a presented
//! value in one probe of a directory and a short scan.
//!
//! Keys sit in one array sorted by value hash behind a directory on the hash's leading bits; their
//! ids in one string; each key's memberships (a plan index and a live-state slot, 8 bytes) in one
//! array in key order. It differs from the store's [`tollgate_store::KeyIndex`], which holds the
//! records as loaded (in store order, with bindings by id): this table is what the request path
//! reads, built from that index once per rebuild.

use std::collections::HashMap;
use std::ops::Range;

use tollgate_core::{IpNetworks, KeyHash};
use tollgate_store::KeyTerms;

use crate::slots::KeyAccount;

/// A key's record: 40 bytes. Its id and its memberships run up to the next record's.
#[derive(Debug, Clone, Copy)]
struct KeyRec {
    hash: KeyHash,
    id_start: u32,
    /// Index of its first membership, with [`DISABLED`], [`EXPIRES`], [`SOURCES`] and [`CREDITS`]
    /// as flags.
    members: u32,
}

const DISABLED: u32 = 1 << 31;
/// Set when the key has an expiry (in [`KeyTable::expiries`]): keys without one pay no lookup.
const EXPIRES: u32 = 1 << 30;
/// Set when the key has a source-IP allowlist (in [`KeyTable::sources`]): keys without one pay no
/// lookup.
const SOURCES: u32 = 1 << 29;
/// Set when the key holds credits (in [`KeyTable::credits`]): keys without pay no lookup.
const CREDITS: u32 = 1 << 28;
const FLAGS: u32 = DISABLED | EXPIRES | SOURCES | CREDITS;
/// A name more than one key has: it names none of them.
const AMBIGUOUS: u32 = u32::MAX;

/// One (key, plan) membership: 8 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Member {
    /// Index of the plan in the snapshot's plans.
    pub(crate) plan: u32,
    /// The slot holding the membership's live state.
    pub(crate) slot: u32,
}

/// The keys, sorted by value hash, with their memberships in key order.
#[derive(Debug, Default)]
pub(crate) struct KeyTable {
    recs: Vec<KeyRec>,
    /// `dir[p]..dir[p + 1]`: the records whose hash starts with the `bits`-bit prefix `p`.
    dir: Vec<u32>,
    bits: u32,
    ids: String,
    /// Record indices in id order, for lookups by id (operator calls, rebuilds).
    by_id: Vec<u32>,
    members: Vec<Member>,
    /// Record index → expiry (epoch nanoseconds), for the few keys that have one.
    expiries: HashMap<u32, u64>,
    /// Record index → the networks the key may be used from, for the few keys that have a list.
    sources: HashMap<u32, IpNetworks>,
    /// Record index → the key's credits, for the keys that hold some.
    credits: HashMap<u32, KeyAccount>,
    /// Old value hash → (record index, end of its grace), for the few keys in a rotation's grace.
    previous: HashMap<KeyHash, (u32, u64)>,
    /// Key name → record index, only when a JWT authorizer names keys by name ([`AMBIGUOUS`] for a
    /// name two keys share).
    by_name: HashMap<Box<str>, u32>,
}

impl KeyTable {
    /// An empty table with room for `keys` keys, `id_bytes` bytes of ids and `members` memberships.
    pub(crate) fn with_capacity(keys: usize, id_bytes: usize, members: usize) -> Self {
        Self {
            recs: Vec::with_capacity(keys),
            ids: String::with_capacity(id_bytes),
            members: Vec::with_capacity(members),
            ..Self::default()
        }
    }

    /// Appends a key; keys must come in hash order, each followed by its memberships.
    pub(crate) fn push_key(&mut self, hash: KeyHash, id: &str, terms: KeyTerms) {
        debug_assert!(self.recs.last().is_none_or(|r| r.hash <= hash));
        let mut members = self.members.len() as u32;
        if !terms.enabled {
            members |= DISABLED;
        }
        if let Some(at) = terms.expires_at {
            members |= EXPIRES;
            self.expiries.insert(self.recs.len() as u32, at);
        }
        if let Some(sources) = terms.sources {
            members |= SOURCES;
            self.sources.insert(self.recs.len() as u32, sources);
        }
        if let Some(old) = terms.previous {
            self.previous
                .insert(old.hash, (self.recs.len() as u32, old.until));
        }
        self.recs.push(KeyRec {
            hash,
            id_start: self.ids.len() as u32,
            members,
        });
        self.ids.push_str(id);
    }

    /// Gives the last key pushed its credits.
    pub(crate) fn set_credits(&mut self, account: KeyAccount) {
        if let Some(rec) = self.recs.last_mut() {
            rec.members |= CREDITS;
            self.credits.insert(self.recs.len() as u32 - 1, account);
        }
    }

    /// Appends a membership of the last key pushed.
    pub(crate) fn push_member(&mut self, member: Member) {
        self.members.push(member);
    }

    /// Makes the table searchable once every key is in: builds the hash directory, and takes
    /// `by_id`, the record indices (positions in push order) sorted by key id.
    pub(crate) fn finish(&mut self, by_id: Vec<u32>) {
        self.bits = usize::BITS - self.recs.len().leading_zeros();
        let mut dir = vec![0; (1 << self.bits) + 1];
        let mut at = 0;
        for (p, start) in dir.iter_mut().enumerate() {
            while at < self.recs.len() && self.prefix(&self.recs[at].hash) < p {
                at += 1;
            }
            *start = at as u32;
        }
        self.dir = dir;
        self.by_id = by_id;
    }

    fn prefix(&self, hash: &KeyHash) -> usize {
        let lead = u64::from_be_bytes([
            hash.0[0], hash.0[1], hash.0[2], hash.0[3], hash.0[4], hash.0[5], hash.0[6], hash.0[7],
        ]);
        lead.checked_shr(64 - self.bits).unwrap_or(0) as usize
    }

    /// How many keys there are.
    pub(crate) fn len(&self) -> usize {
        self.recs.len()
    }

    /// The record of the key whose value hashes to `hash`.
    pub(crate) fn find(&self, hash: &KeyHash) -> Option<usize> {
        let p = self.prefix(hash);
        let range = self.dir[p] as usize..self.dir[p + 1] as usize;
        range.into_iter().find(|&i| self.recs[i].hash == *hash)
    }

    /// The record of the key whose value before its last rotation hashes to `hash`, while that
    /// value's grace lasts at `now`. Only asked when [`KeyTable::find`] found nothing.
    pub(crate) fn find_previous(&self, hash: &KeyHash, now: u64) -> Option<usize> {
        if self.previous.is_empty() {
            return None;
        }
        let &(rec, until) = self.previous.get(hash)?;
        (now < until).then_some(rec as usize)
    }

    /// The record of the key whose current value, or old value still in (or past) its grace,
    /// hashes to `hash`: a value two keys may not share.
    pub(crate) fn holder(&self, hash: &KeyHash) -> Option<usize> {
        self.find(hash)
            .or_else(|| self.previous.get(hash).map(|&(rec, _)| rec as usize))
    }

    /// Makes keys findable by name: `names` holds (record index, name). A name two keys share
    /// names neither (a token must not pick one of them by chance); returns how many such names.
    pub(crate) fn name_keys<'n>(&mut self, names: impl Iterator<Item = (u32, &'n str)>) -> usize {
        let mut shared = 0;
        for (rec, name) in names {
            self.by_name
                .entry(name.into())
                .and_modify(|r| {
                    shared += usize::from(*r != AMBIGUOUS);
                    *r = AMBIGUOUS;
                })
                .or_insert(rec);
        }
        shared
    }

    /// The record of the one key named `name` (when keys are findable by name).
    pub(crate) fn by_name(&self, name: &str) -> Option<usize> {
        self.by_name
            .get(name)
            .filter(|&&rec| rec != AMBIGUOUS)
            .map(|&rec| rec as usize)
    }

    /// Record `i`'s value hash.
    pub(crate) fn hash(&self, i: usize) -> &KeyHash {
        &self.recs[i].hash
    }

    /// Record `i`'s key id.
    pub(crate) fn id(&self, i: usize) -> &str {
        let end = self
            .recs
            .get(i + 1)
            .map_or(self.ids.len(), |r| r.id_start as usize);
        &self.ids[self.recs[i].id_start as usize..end]
    }

    /// Whether record `i`'s key is enabled.
    pub(crate) fn enabled(&self, i: usize) -> bool {
        self.recs[i].members & DISABLED == 0
    }

    /// When record `i`'s key expires (epoch nanoseconds), if it does.
    pub(crate) fn expires_at(&self, i: usize) -> Option<u64> {
        if self.recs[i].members & EXPIRES == 0 {
            return None;
        }
        self.expiries.get(&(i as u32)).copied()
    }

    /// Every key with an expiry: (record index, epoch nanoseconds).
    pub(crate) fn expiries(&self) -> impl Iterator<Item = (usize, u64)> + '_ {
        self.expiries.iter().map(|(&i, &at)| (i as usize, at))
    }

    /// The networks record `i`'s key may be used from, if it has a list.
    pub(crate) fn sources(&self, i: usize) -> Option<&IpNetworks> {
        if self.recs[i].members & SOURCES == 0 {
            return None;
        }
        self.sources.get(&(i as u32))
    }

    /// Record `i`'s credits, if it holds some.
    pub(crate) fn credits(&self, i: usize) -> Option<&KeyAccount> {
        if self.recs[i].members & CREDITS == 0 {
            return None;
        }
        self.credits.get(&(i as u32))
    }

    /// Every key's credits, with the record index.
    pub(crate) fn accounts(&self) -> impl Iterator<Item = (usize, &KeyAccount)> {
        self.credits.iter().map(|(&i, a)| (i as usize, a))
    }

    /// Record `i`'s memberships, in the order they were bound.
    pub(crate) fn members_of(&self, i: usize) -> &[Member] {
        &self.members[self.member_range(i)]
    }

    fn member_range(&self, i: usize) -> Range<usize> {
        let start = (self.recs[i].members & !FLAGS) as usize;
        let end = self
            .recs
            .get(i + 1)
            .map_or(self.members.len(), |r| (r.members & !FLAGS) as usize);
        start..end
    }

    /// Every membership, as (index, membership).
    pub(crate) fn members(&self) -> impl Iterator<Item = (usize, &Member)> {
        self.members.iter().enumerate()
    }

    /// Membership number `member`.
    pub(crate) fn member(&self, member: usize) -> &Member {
        &self.members[member]
    }

    /// The record of the key with id `id`.
    pub(crate) fn by_id(&self, id: &str) -> Option<usize> {
        let at = self
            .by_id
            .binary_search_by(|&i| self.id(i as usize).cmp(id))
            .ok()?;
        Some(self.by_id[at] as usize)
    }

    /// Record indices in key id order.
    pub(crate) fn in_id_order(&self) -> impl Iterator<Item = usize> {
        self.by_id.iter().map(|&i| i as usize)
    }

    /// The key a membership belongs to.
    pub(crate) fn owner(&self, member: usize) -> usize {
        self.recs
            .partition_point(|r| (r.members & !FLAGS) as usize <= member)
            .saturating_sub(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A table of `n` keys `key0`, `key1`…, key `i` in `i % 3` plans, every third key disabled, every
    /// fourth expiring at `i`.
    fn table(n: u32) -> KeyTable {
        let mut keys: Vec<(KeyHash, String)> = (0..n)
            .map(|i| (KeyHash::of(format!("value{i}")), format!("key{i}")))
            .collect();
        keys.sort();
        let mut t = KeyTable::with_capacity(keys.len(), 0, 0);
        for (hash, id) in &keys {
            let i: u32 = id[3..].parse().unwrap();
            let terms = KeyTerms {
                enabled: i % 3 != 2,
                expires_at: (i % 4 == 0).then_some(u64::from(i)),
                previous: None,
                sources: None,
                customer_id: None,
                refill: None,
                credits: false,
            };
            t.push_key(*hash, id, terms);
            for plan in 0..i % 3 {
                t.push_member(Member { plan, slot: i });
            }
        }
        let mut by_id: Vec<u32> = (0..keys.len() as u32).collect();
        by_id.sort_by(|&a, &b| keys[a as usize].1.cmp(&keys[b as usize].1));
        t.finish(by_id);
        t
    }

    #[test]
    fn finds_every_key_by_hash_and_by_id() {
        for n in [0, 1, 2, 3, 100, 1000] {
            let t = table(n);
            assert_eq!(t.len(), n as usize);
            for i in 0..n {
                let at = t.find(&KeyHash::of(format!("value{i}"))).unwrap();
                assert_eq!(t.id(at), format!("key{i}"));
                assert_eq!(t.by_id(&format!("key{i}")), Some(at));
                assert_eq!(t.enabled(at), i % 3 != 2);
                assert_eq!(t.expires_at(at), (i % 4 == 0).then_some(u64::from(i)));
                let members = t.members_of(at);
                assert_eq!(members.len(), (i % 3) as usize);
                assert!(members.iter().all(|m| m.slot == i));
            }
            assert_eq!(t.find(&KeyHash::of("not a value")), None);
            assert_eq!(t.by_id("key-none"), None);
            let ids: Vec<&str> = t.in_id_order().map(|i| t.id(i)).collect();
            assert!(ids.is_sorted());
        }
    }

    #[test]
    fn a_membership_knows_its_key() {
        let t = table(50);
        for (m, member) in t.members() {
            let key = t.owner(m);
            assert!(t.members_of(key).contains(member));
            assert_eq!(t.id(key), format!("key{}", member.slot));
        }
    }

    #[test]
    fn a_shared_name_names_no_key() {
        let mut t = table(4);
        let shared = t.name_keys([(0, "solo"), (1, "twin"), (2, "twin"), (3, "twin")].into_iter());
        assert_eq!(shared, 1, "one name shared");
        assert_eq!(t.by_name("solo"), Some(0));
        assert_eq!(t.by_name("twin"), None);
        assert_eq!(t.by_name("nobody"), None);
    }
}
