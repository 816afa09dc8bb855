//! The served keys in little memory (about 85 bytes a key), looked up by the hash of a presented
//! value in one probe of a directory and a short scan, and changed a few keys at a time.
//!
//! Keys sit in 4,096 shards by the leading bits of their value hash. A shard holds its keys sorted by
//! hash behind a directory on the next bits, their ids in one string, and each key's memberships (a
//! plan index, a live-state slot and a customer's group: 12 bytes) in one array in key order. A
//! shard is immutable and shared by the snapshots that did not change it: a write of a few keys
//! builds the few shards they fall in again (a few hundred keys each at a million), never the table
//! (see [`KeyTable::with_changes`]). Ids are found through a second set of shards by the hash of
//! the id, and names (when a JWT authorizer names keys by name) through a third by the hash of the
//! name.
//!
//! It differs from the store's [`tollgate_store::KeyIndex`], which holds the records as loaded (in
//! store order, with bindings by id): this table is what the request path reads.

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
use std::ops::Range;
use std::sync::Arc;

use tollgate_core::model::PreviousValue;
use tollgate_core::{IpNetworks, KeyHash};

use crate::plans::RouteAt;
use crate::slots::{Bucket, KeyAccount};

/// 4,096 shards: a write at a million keys builds shards of ~250 keys again (and copies the groups
/// of pointers it changes, see [`Grouped`]).
const SHARD_BITS: u32 = 12;
const SHARDS: usize = 1 << SHARD_BITS;
/// Pointers per group of [`Grouped`].
const GROUP: usize = 64;

/// `SHARDS` values (each an `Arc`) in groups of `GROUP` behind an `Arc` each: a copy shares every
/// group, and a change copies only the group it falls in. Copying or dropping a pointer counts on
/// a cache line of its own: with two flat arrays of 4,096, that counting was a third of a key
/// write's CPU at a million keys (perf); the request path pays one more pointer to follow.
#[derive(Debug, Clone)]
struct Grouped<T>(Box<[Arc<[T; GROUP]>; SHARDS / GROUP]>);

impl<T: Clone> Grouped<T> {
    fn from_fn(mut f: impl FnMut(usize) -> T) -> Self {
        Self(Box::new(std::array::from_fn(|g| {
            Arc::new(std::array::from_fn(|i| f(g * GROUP + i)))
        })))
    }

    #[inline]
    fn get(&self, s: usize) -> &T {
        &self.0[s / GROUP][s % GROUP]
    }

    /// Value `s`, unless there is none.
    fn try_get(&self, s: usize) -> Option<&T> {
        self.0.get(s / GROUP).map(|g| &g[s % GROUP])
    }

    /// Replaces value `s`, copying its group if another table shares it.
    fn set(&mut self, s: usize, value: T) {
        Arc::make_mut(&mut self.0[s / GROUP])[s % GROUP] = value;
    }

    fn iter(&self) -> impl Iterator<Item = &T> {
        self.0.iter().flat_map(|g| g.iter())
    }
}

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
/// Set when the key has an expiry (in [`Shard::expiries`]): keys without one pay no lookup.
const EXPIRES: u32 = 1 << 30;
/// Set when the key has a source-IP allowlist (in [`Shard::sources`]): keys without one pay no
/// lookup.
const SOURCES: u32 = 1 << 29;
/// Set when the key holds credits (in [`Shard::credits`]): keys without pay no lookup.
const CREDITS: u32 = 1 << 28;
const FLAGS: u32 = DISABLED | EXPIRES | SOURCES | CREDITS;
/// [`Member::group`] of a membership that does not share its customer's limits.
pub(crate) const NO_GROUP: u32 = u32::MAX;

/// One (key, plan) membership: 12 bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Member {
    /// Index of the plan in the snapshot's plans.
    pub(crate) plan: u32,
    /// The slot holding the membership's live state.
    pub(crate) slot: u32,
    /// The slot of the customer's group whose limits it draws on, or [`NO_GROUP`].
    pub(crate) group: u32,
}

/// Where a key is in one table: its shard and its place there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KeyRef {
    shard: u32,
    at: u32,
}

/// A key as a write hands it to [`KeyTable::with_changes`], and as a changed shard gives its
/// unchanged keys back to be built again. A build reuses one for every key.
#[derive(Debug, Clone, Default)]
pub(crate) struct Entry {
    pub(crate) hash: KeyHash,
    pub(crate) id: String,
    pub(crate) enabled: bool,
    pub(crate) expires_at: Option<u64>,
    pub(crate) sources: Option<IpNetworks>,
    pub(crate) previous: Option<PreviousValue>,
    pub(crate) credits: Option<KeyAccount>,
    pub(crate) members: Vec<Member>,
    /// The per-method buckets of its memberships' slots.
    pub(crate) methods: Vec<((u32, RouteAt), Bucket)>,
    /// Its name, in a table that finds keys by name (every key of it has one, empty or not).
    pub(crate) name: Option<String>,
}

/// What a key holds beyond its record, kept for the few keys that hold it ([`Shard::append`]).
struct Held<'a> {
    expires_at: Option<u64>,
    sources: Option<&'a IpNetworks>,
    credits: Option<&'a KeyAccount>,
    previous: Option<PreviousValue>,
}

/// Some of the keys, sorted by value hash, with their memberships in key order.
#[derive(Debug, Default)]
struct Shard {
    recs: Vec<KeyRec>,
    /// `dir[p]..dir[p + 1]`: the records whose hash continues (after the shard's bits) with the
    /// `bits`-bit prefix `p`.
    dir: Vec<u32>,
    bits: u32,
    ids: String,
    /// The keys' names, one after another, in a table that finds keys by name.
    names: String,
    /// Record index → where its name starts in `names`; empty when the table keeps no names.
    name_starts: Vec<u32>,
    members: Vec<Member>,
    /// Record index → expiry (epoch nanoseconds), for the few keys that have one.
    expiries: HashMap<u32, u64>,
    /// Record index → the networks the key may be used from, for the few keys that have a list.
    sources: HashMap<u32, IpNetworks>,
    /// Record index → the key's credits, for the keys that hold some.
    credits: HashMap<u32, KeyAccount>,
    /// Record index → its value before its last rotation, for the few keys in a rotation's grace.
    previous: HashMap<u32, PreviousValue>,
    /// Per-method buckets, by (membership slot, where), of the plans that have them.
    methods: HashMap<(u32, RouteAt), Bucket>,
}

/// The keys, in shards by value hash, with an index by id.
#[derive(Debug, Clone)]
pub(crate) struct KeyTable {
    /// Arrays: a shard number (12 bits of a hash) needs no bounds check on the request path.
    shards: Grouped<Arc<Shard>>,
    /// By the hash of the id: (id hash, leading 8 bytes of the value hash), sorted.
    ids: Grouped<Arc<[(u64, u64)]>>,
    /// By the hash of the name, as `ids`: empty unless the keys have names ([`Entry::name`]).
    names: Grouped<Arc<[(u64, u64)]>>,
    /// Old value hash → (the key's value hash, end of its grace), for the few keys in a rotation's
    /// grace; copied whole by a write that changes it.
    previous: Arc<HashMap<KeyHash, (KeyHash, u64)>>,
    len: usize,
}

impl Default for KeyTable {
    fn default() -> Self {
        let empty = Arc::new(Shard::finished(Shard::default()));
        Self {
            shards: Grouped::from_fn(|_| empty.clone()),
            ids: Grouped::from_fn(|_| Arc::from([])),
            names: Grouped::from_fn(|_| Arc::from([])),
            previous: Arc::default(),
            len: 0,
        }
    }
}

/// One key of a table, as the request path and the control plane read it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Key<'t> {
    shard: &'t Shard,
    at: u32,
    place: KeyRef,
}

/// The first 8 bytes of a value hash, as a number: what shards and directories are cut on.
fn lead(hash: &KeyHash) -> u64 {
    let h = &hash.0;
    u64::from_be_bytes([h[0], h[1], h[2], h[3], h[4], h[5], h[6], h[7]])
}

fn shard_of(lead: u64) -> usize {
    (lead >> (64 - SHARD_BITS)) as usize
}

/// A fixed hash of a key's id or name: which shard of the id or name index holds it.
fn id_hash(id: &str) -> u64 {
    BuildHasherDefault::<DefaultHasher>::default().hash_one(id)
}

impl Shard {
    /// Appends a key; keys must come in hash order, each followed by its memberships.
    fn push(&mut self, e: &Entry) {
        let held = Held {
            expires_at: e.expires_at,
            sources: e.sources.as_ref(),
            credits: e.credits.as_ref(),
            previous: e.previous,
        };
        self.append(
            e.hash,
            (&e.id, e.name.as_deref()),
            !e.enabled,
            held,
            &e.members,
        );
        for (at, bucket) in &e.methods {
            self.methods.insert(*at, bucket.clone());
        }
    }

    /// Appends a key after those pushed before it: its record (whose flags follow from `disabled`
    /// and what it holds), its id and name, its memberships and what the few keys hold.
    fn append(
        &mut self,
        hash: KeyHash,
        (id, name): (&str, Option<&str>),
        disabled: bool,
        held: Held<'_>,
        members: &[Member],
    ) {
        debug_assert!(self.recs.last().is_none_or(|r| r.hash <= hash));
        let at = self.recs.len() as u32;
        let mut flags = if disabled { DISABLED } else { 0 };
        if let Some(t) = held.expires_at {
            flags |= EXPIRES;
            self.expiries.insert(at, t);
        }
        if let Some(sources) = held.sources {
            flags |= SOURCES;
            self.sources.insert(at, sources.clone());
        }
        if let Some(account) = held.credits {
            flags |= CREDITS;
            self.credits.insert(at, account.clone());
        }
        if let Some(p) = held.previous {
            self.previous.insert(at, p);
        }
        self.recs.push(KeyRec {
            hash,
            id_start: self.ids.len() as u32,
            members: self.members.len() as u32 | flags,
        });
        self.ids.push_str(id);
        if let Some(name) = name {
            self.name_starts.push(self.names.len() as u32);
            self.names.push_str(name);
        }
        debug_assert!(self.name_starts.is_empty() || self.name_starts.len() == self.recs.len());
        self.members.extend_from_slice(members);
    }

    /// The shard, searchable: its directory built, its buffers trimmed.
    fn finished(mut self) -> Self {
        self.bits = usize::BITS - self.recs.len().leading_zeros();
        let mut dir = vec![0; (1 << self.bits) + 1];
        let mut at = 0;
        for (p, start) in dir.iter_mut().enumerate() {
            while at < self.recs.len() && self.prefix(lead(&self.recs[at].hash)) < p {
                at += 1;
            }
            *start = at as u32;
        }
        self.dir = dir;
        self.recs.shrink_to_fit();
        self.ids.shrink_to_fit();
        self.names.shrink_to_fit();
        self.name_starts.shrink_to_fit();
        self.members.shrink_to_fit();
        self
    }

    /// The directory entry of a hash whose leading 8 bytes are `lead`.
    fn prefix(&self, lead: u64) -> usize {
        (lead << SHARD_BITS)
            .checked_shr(64 - self.bits)
            .unwrap_or(0) as usize
    }

    /// The records whose hash starts with `lead`'s directory prefix.
    fn candidates(&self, lead: u64) -> Range<usize> {
        let p = self.prefix(lead);
        self.dir[p] as usize..self.dir[p + 1] as usize
    }

    /// The record of `hash`, whose leading 8 bytes are `lead`.
    #[inline]
    fn find(&self, lead: u64, hash: &KeyHash) -> Option<u32> {
        self.candidates(lead)
            .find(|&i| self.recs[i].hash == *hash)
            .map(|i| i as u32)
    }

    fn id(&self, i: usize) -> &str {
        let end = self
            .recs
            .get(i + 1)
            .map_or(self.ids.len(), |r| r.id_start as usize);
        &self.ids[self.recs[i].id_start as usize..end]
    }

    /// Record `i`'s name, in a table that keeps names.
    fn name(&self, i: usize) -> Option<&str> {
        let start = *self.name_starts.get(i)? as usize;
        let end = self
            .name_starts
            .get(i + 1)
            .map_or(self.names.len(), |&e| e as usize);
        self.names.get(start..end)
    }

    fn member_range(&self, i: usize) -> Range<usize> {
        let start = (self.recs[i].members & !FLAGS) as usize;
        let end = self
            .recs
            .get(i + 1)
            .map_or(self.members.len(), |r| (r.members & !FLAGS) as usize);
        start..end
    }

    /// Appends record `i` of `old` as it is, after the keys pushed before it in hash order: what
    /// [`Shard::push`] does with a key's [`Entry`], without building one (a write at a million
    /// keys copies ~250 records a shard it builds again; their ids and memberships in entries of
    /// their own cost two allocations a record).
    fn push_from(&mut self, old: &Shard, i: usize) {
        let from = i as u32;
        let held = Held {
            expires_at: old.expiries.get(&from).copied(),
            sources: old.sources.get(&from),
            // The same account: its live balance carries over.
            credits: old.credits.get(&from),
            previous: old.previous.get(&from).copied(),
        };
        let members = &old.members[old.member_range(i)];
        let disabled = old.recs[i].members & DISABLED != 0;
        self.append(
            old.recs[i].hash,
            (old.id(i), old.name(i)),
            disabled,
            held,
            members,
        );
        if !old.methods.is_empty() {
            for (k, bucket) in &old.methods {
                if members.iter().any(|m| m.slot == k.0) {
                    self.methods.insert(*k, bucket.clone());
                }
            }
        }
    }
}

impl<'t> Key<'t> {
    /// Record `at` of `shard`, shard number `s`.
    fn new(shard: &'t Shard, s: usize, at: u32) -> Self {
        let place = KeyRef {
            shard: s as u32,
            at,
        };
        Key { shard, at, place }
    }

    fn rec(&self) -> &'t KeyRec {
        &self.shard.recs[self.at as usize]
    }

    /// Where the key is in its table.
    #[cfg(test)]
    pub(crate) fn place(&self) -> KeyRef {
        self.place
    }

    /// Its value hash.
    pub(crate) fn hash(&self) -> &'t KeyHash {
        &self.rec().hash
    }

    /// Its id.
    pub(crate) fn id(&self) -> &'t str {
        self.shard.id(self.at as usize)
    }

    /// Its name, in a table whose keys have names.
    pub(crate) fn name(&self) -> Option<&'t str> {
        self.shard.name(self.at as usize)
    }

    /// Whether it is enabled.
    pub(crate) fn enabled(&self) -> bool {
        self.rec().members & DISABLED == 0
    }

    /// When it expires (epoch nanoseconds), if it does.
    pub(crate) fn expires_at(&self) -> Option<u64> {
        if self.rec().members & EXPIRES == 0 {
            return None;
        }
        self.shard.expiries.get(&self.at).copied()
    }

    /// The networks it may be used from, if it has a list.
    pub(crate) fn sources(&self) -> Option<&'t IpNetworks> {
        if self.rec().members & SOURCES == 0 {
            return None;
        }
        self.shard.sources.get(&self.at)
    }

    /// Its credits, if it holds some.
    pub(crate) fn credits(&self) -> Option<&'t KeyAccount> {
        if self.rec().members & CREDITS == 0 {
            return None;
        }
        self.shard.credits.get(&self.at)
    }

    /// Its memberships, in the order they were bound.
    pub(crate) fn members(&self) -> &'t [Member] {
        &self.shard.members[self.shard.member_range(self.at as usize)]
    }

    /// The per-method buckets of the key's shard, by (membership slot, where).
    pub(crate) fn methods(&self) -> &'t HashMap<(u32, RouteAt), Bucket> {
        &self.shard.methods
    }
}

/// Builds a table from keys given in hash order ([`KeyTable::build`]).
#[derive(Debug)]
pub(crate) struct TableBuilder {
    shards: Vec<Shard>,
    /// The shard keys go into now: keys come in hash order, so shards fill one after another.
    at: usize,
    previous: HashMap<KeyHash, (KeyHash, u64)>,
    len: usize,
}

impl TableBuilder {
    /// Appends a key, which must come after the keys pushed before it in hash order.
    pub(crate) fn push(&mut self, e: &Entry) {
        let s = shard_of(lead(&e.hash));
        debug_assert!(s >= self.at);
        self.at = s;
        if let Some(p) = e.previous {
            self.previous.insert(p.hash, (e.hash, p.until));
        }
        self.shards[s].push(e);
        self.len += 1;
    }

    /// The table, searchable.
    pub(crate) fn finish(self) -> KeyTable {
        let mut built = self.shards.into_iter().map(|s| Arc::new(s.finished()));
        let shards = Grouped::from_fn(|_| {
            built
                .next()
                .unwrap_or_else(|| Arc::new(Shard::default().finished()))
        });
        let mut ids: Vec<Vec<(u64, u64)>> = vec![Vec::new(); SHARDS];
        let mut names: Vec<Vec<(u64, u64)>> = vec![Vec::new(); SHARDS];
        for shard in shards.iter() {
            for (i, rec) in shard.recs.iter().enumerate() {
                let h = id_hash(shard.id(i));
                ids[shard_of(h)].push((h, lead(&rec.hash)));
                if let Some(name) = shard.name(i) {
                    let h = id_hash(name);
                    names[shard_of(h)].push((h, lead(&rec.hash)));
                }
            }
        }
        let sorted = |index: Vec<Vec<(u64, u64)>>| {
            let mut index = index.into_iter().map(|mut s| {
                s.sort_unstable();
                Arc::from(s)
            });
            Grouped::from_fn(|_| index.next().unwrap_or_else(|| Arc::from([])))
        };
        KeyTable {
            shards,
            ids: sorted(ids),
            names: sorted(names),
            previous: Arc::new(self.previous),
            len: self.len,
        }
    }
}

/// Takes the entries `out` out of `index` (the id or the name index) and puts `new` in, copying only
/// the shards of it they fall in.
fn reindex(
    index: &mut Grouped<Arc<[(u64, u64)]>>,
    out: impl Iterator<Item = (u64, u64)>,
    new: Vec<(u64, u64)>,
) {
    // Per shard of the index: the entries going, and those coming.
    type Change = (Vec<(u64, u64)>, Vec<(u64, u64)>);
    let mut changes: HashMap<usize, Change> = HashMap::new();
    for pair in out {
        changes.entry(shard_of(pair.0)).or_default().0.push(pair);
    }
    for pair in new {
        changes.entry(shard_of(pair.0)).or_default().1.push(pair);
    }
    for (s, (out, new)) in changes {
        let mut entries: Vec<(u64, u64)> = index.get(s).to_vec();
        for pair in out {
            if let Some(at) = entries.iter().position(|&e| e == pair) {
                entries.swap_remove(at);
            }
        }
        entries.extend(new);
        entries.sort_unstable();
        index.set(s, Arc::from(entries));
    }
}

impl KeyTable {
    /// A builder of a table from keys in hash order.
    pub(crate) fn build() -> TableBuilder {
        TableBuilder {
            shards: (0..SHARDS).map(|_| Shard::default()).collect(),
            at: 0,
            previous: HashMap::new(),
            len: 0,
        }
    }

    /// This table with the keys whose ids are in `gone` taken out and `added` put in (an id may be
    /// in both: the key changed), sharing every shard neither touches. Returns the shards it built
    /// again, whose memberships moved.
    pub(crate) fn with_changes(&self, gone: &[Key<'_>], added: Vec<Entry>) -> (Self, Vec<u32>) {
        let ids_in: Vec<(u64, u64)> = added
            .iter()
            .map(|e| (id_hash(&e.id), lead(&e.hash)))
            .collect();
        let names_in: Vec<(u64, u64)> = added
            .iter()
            .filter_map(|e| Some((id_hash(e.name.as_deref()?), lead(&e.hash))))
            .collect();
        let mut by_shard: HashMap<usize, Vec<Entry>> = HashMap::new();
        for e in added {
            by_shard.entry(shard_of(lead(&e.hash))).or_default().push(e);
        }
        let mut removed: HashMap<usize, Vec<u32>> = HashMap::new();
        for key in gone {
            removed
                .entry(key.place.shard as usize)
                .or_default()
                .push(key.at);
        }
        let mut touched: Vec<usize> = by_shard.keys().chain(removed.keys()).copied().collect();
        touched.sort_unstable();
        touched.dedup();

        let mut next = self.clone();
        let mut len = self.len;
        for &s in &touched {
            let out = removed.remove(&s).unwrap_or_default();
            let old = self.shards.get(s);
            let mut new = by_shard.remove(&s).unwrap_or_default();
            new.sort_by_key(|e| e.hash);
            len += new.len();
            // The records kept and the new ones, merged in hash order.
            let mut new = new.iter().peekable();
            let mut shard = Shard::default();
            for i in 0..old.recs.len() {
                if out.contains(&(i as u32)) {
                    len -= 1;
                    continue;
                }
                while let Some(e) = new.next_if(|e| e.hash < old.recs[i].hash) {
                    shard.push(e);
                }
                shard.push_from(old, i);
            }
            for e in new {
                shard.push(e);
            }
            next.shards.set(s, Arc::new(shard.finished()));
        }
        next.len = len;

        // The id and name indexes: out with the gone keys' entries, in with the added ones'.
        let ids_out = gone.iter().map(|k| (id_hash(k.id()), lead(k.hash())));
        reindex(&mut next.ids, ids_out, ids_in);
        let names_out = gone
            .iter()
            .filter_map(|k| Some((id_hash(k.name()?), lead(k.hash()))));
        reindex(&mut next.names, names_out, names_in);

        // Rotations' old values, when a changed key had or has one.
        let had = gone.iter().any(|k| k.shard.previous.contains_key(&k.at));
        let has: Vec<(KeyHash, KeyHash, u64)> = touched
            .iter()
            .flat_map(|&s| {
                let shard = next.shards.get(s);
                shard
                    .previous
                    .iter()
                    .map(|(&at, p)| (p.hash, shard.recs[at as usize].hash, p.until))
            })
            .collect();
        if had || !has.is_empty() {
            let mut previous = (*self.previous).clone();
            for key in gone {
                if let Some(p) = key.shard.previous.get(&key.at) {
                    previous.remove(&p.hash);
                }
            }
            for (old, current, until) in has {
                previous.insert(old, (current, until));
            }
            next.previous = Arc::new(previous);
        }
        (next, touched.into_iter().map(|s| s as u32).collect())
    }

    /// How many keys there are.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    fn key(&self, place: KeyRef) -> Key<'_> {
        Key {
            shard: self.shards.get(place.shard as usize),
            at: place.at,
            place,
        }
    }

    /// The key whose value hashes to `hash`.
    #[inline]
    pub(crate) fn find(&self, hash: &KeyHash) -> Option<Key<'_>> {
        let lead = lead(hash);
        let s = shard_of(lead);
        let shard = self.shards.get(s);
        shard.find(lead, hash).map(|at| Key::new(shard, s, at))
    }

    /// The key whose value before its last rotation hashes to `hash`, while that value's grace
    /// lasts at `now`. Only asked when [`KeyTable::find`] found nothing.
    pub(crate) fn find_previous(&self, hash: &KeyHash, now: u64) -> Option<Key<'_>> {
        if self.previous.is_empty() {
            return None;
        }
        let &(current, until) = self.previous.get(hash)?;
        if now >= until {
            return None;
        }
        self.find(&current)
    }

    /// The key whose current value, or old value still in (or past) its grace, hashes to `hash`: a
    /// value two keys may not share.
    pub(crate) fn holder(&self, hash: &KeyHash) -> Option<Key<'_>> {
        self.find(hash).or_else(|| {
            let (current, _) = self.previous.get(hash)?;
            self.find(current)
        })
    }

    /// The key with id `id`.
    pub(crate) fn by_id(&self, id: &str) -> Option<Key<'_>> {
        let [key, _] = self.indexed(&self.ids, id, |shard, i| shard.id(i) == id);
        key
    }

    /// The one key named `name`, in a table whose keys have names. A name two keys share names
    /// neither: a token must not pick one of them by chance.
    pub(crate) fn by_name(&self, name: &str) -> Option<Key<'_>> {
        match self.indexed(&self.names, name, |shard, i| shard.name(i) == Some(name)) {
            [Some(key), None] => Some(key),
            _ => None,
        }
    }

    /// How many names several keys share, in one pass over the name index: equal names have equal
    /// hashes, so their entries sit side by side (a start with a million names looks none up).
    pub(crate) fn shared_names(&self) -> usize {
        let mut shared = 0;
        // The run's keys: name, shard, record.
        let mut keys: Vec<(&str, usize, usize)> = Vec::new();
        for index in self.names.iter() {
            for run in index
                .chunk_by(|a, b| a.0 == b.0)
                .filter(|run| run.len() > 1)
            {
                let h = run[0].0;
                keys.clear();
                for &(_, lead) in run {
                    let at = shard_of(lead);
                    let shard = self.shards.get(at);
                    keys.extend(shard.candidates(lead).filter_map(|i| {
                        let name = shard.name(i)?;
                        (self::lead(&shard.recs[i].hash) == lead && id_hash(name) == h)
                            .then_some((name, at, i))
                    }));
                }
                // A key found from two entries counts once; names of equal hashes may differ.
                keys.sort_unstable();
                keys.dedup();
                shared += keys
                    .chunk_by(|a, b| a.0 == b.0)
                    .filter(|same| same.len() > 1)
                    .count();
            }
        }
        shared
    }

    /// The first two keys `index` (the id or the name index) files under `what` for which `is`
    /// holds.
    fn indexed(
        &self,
        index: &Grouped<Arc<[(u64, u64)]>>,
        what: &str,
        is: impl Fn(&Shard, usize) -> bool,
    ) -> [Option<Key<'_>>; 2] {
        let h = id_hash(what);
        let s = index.get(shard_of(h));
        let from = s.partition_point(|&(e, _)| e < h);
        let mut found = [None, None];
        let mut n = 0;
        for &(_, lead) in s[from..].iter().take_while(|&&(e, _)| e == h) {
            let at = shard_of(lead);
            let shard = self.shards.get(at);
            for i in shard.candidates(lead) {
                if self::lead(&shard.recs[i].hash) == lead && is(shard, i) {
                    found[n] = Some(self.key(KeyRef {
                        shard: at as u32,
                        at: i as u32,
                    }));
                    n += 1;
                    if n == found.len() {
                        return found;
                    }
                }
            }
        }
        found
    }

    /// Every key, in hash order.
    pub(crate) fn keys(&self) -> impl Iterator<Item = Key<'_>> {
        self.shards.iter().enumerate().flat_map(|(s, shard)| {
            (0..shard.recs.len() as u32).map(move |at| Key::new(shard, s, at))
        })
    }

    /// The keys of shard `s`, with the index each membership has in it (what [`KeyTable::member`]
    /// takes).
    pub(crate) fn members_in(&self, s: u32) -> impl Iterator<Item = (u32, &Member)> {
        self.shards
            .get(s as usize)
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| (i as u32, m))
    }

    /// How many shards there are.
    pub(crate) fn shards(&self) -> u32 {
        SHARDS as u32
    }

    /// Membership `member` of shard `s`, with its key.
    pub(crate) fn member(&self, s: u32, member: u32) -> Option<(Key<'_>, Member)> {
        let shard = self.shards.try_get(s as usize)?;
        let m = *shard.members.get(member as usize)?;
        let at = shard
            .recs
            .partition_point(|r| (r.members & !FLAGS) <= member)
            .checked_sub(1)?;
        Some((
            self.key(KeyRef {
                shard: s,
                at: at as u32,
            }),
            m,
        ))
    }

    /// Every key with an expiry, with when (epoch nanoseconds).
    pub(crate) fn expiries(&self) -> impl Iterator<Item = (Key<'_>, u64)> {
        self.shards.iter().enumerate().flat_map(move |(s, shard)| {
            shard
                .expiries
                .iter()
                .map(move |(&at, &t)| (Key::new(shard, s, at), t))
        })
    }

    /// Every key's credits, with the key.
    pub(crate) fn accounts(&self) -> impl Iterator<Item = (Key<'_>, &KeyAccount)> {
        self.shards.iter().enumerate().flat_map(move |(s, shard)| {
            shard
                .credits
                .iter()
                .map(move |(&at, a)| (Key::new(shard, s, at), a))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Key `i`: id `key{i}`, value `value{i}`, in `i % 3` plans (slots `i`), every third disabled,
    /// every fourth expiring at `i`, every fifth usable from [`sources`]`(i)` only, every seventh
    /// holding credits.
    fn entry(i: u32) -> Entry {
        Entry {
            hash: KeyHash::of(format!("value{i}")),
            id: format!("key{i}"),
            enabled: i % 3 != 2,
            expires_at: (i % 4 == 0).then_some(u64::from(i)),
            sources: (i % 5 == 0).then(|| sources(i)),
            previous: None,
            credits: (i % 7 == 0).then(|| KeyAccount {
                live: Arc::default(),
                refill: None,
            }),
            members: (0..i % 3)
                .map(|plan| Member {
                    plan,
                    slot: i,
                    group: NO_GROUP,
                })
                .collect(),
            methods: Vec::new(),
            name: None,
        }
    }

    fn sources(i: u32) -> IpNetworks {
        IpNetworks::parse(&format!("10.{}.{}.0/24", i / 256 % 256, i % 256)).unwrap()
    }

    fn table(ids: impl Iterator<Item = u32>) -> KeyTable {
        let mut entries: Vec<Entry> = ids.map(entry).collect();
        entries.sort_by_key(|e| e.hash);
        let mut t = KeyTable::build();
        for e in &entries {
            t.push(e);
        }
        t.finish()
    }

    /// `t` holds the keys `present` as [`entry`] makes them, none of `absent`, and `others` more.
    fn check(
        t: &KeyTable,
        present: impl Iterator<Item = u32>,
        absent: impl Iterator<Item = u32>,
        others: usize,
    ) {
        let mut n = others;
        for i in present {
            n += 1;
            let key = t.find(&KeyHash::of(format!("value{i}"))).unwrap();
            assert_eq!(key.id(), format!("key{i}"));
            assert_eq!(
                t.by_id(&format!("key{i}")).map(|k| k.place()),
                Some(key.place())
            );
            assert_eq!(key.enabled(), i % 3 != 2);
            assert_eq!(key.expires_at(), (i % 4 == 0).then_some(u64::from(i)));
            assert_eq!(key.sources(), (i % 5 == 0).then(|| sources(i)).as_ref());
            assert_eq!(key.credits().is_some(), i % 7 == 0);
            assert_eq!(key.members().len(), (i % 3) as usize);
            assert!(key.members().iter().all(|m| m.slot == i));
        }
        for i in absent {
            assert!(t.find(&KeyHash::of(format!("value{i}"))).is_none(), "{i}");
            assert!(t.by_id(&format!("key{i}")).is_none(), "{i}");
        }
        assert_eq!(t.len(), n);
        assert_eq!(t.keys().count(), n);
        let hashes: Vec<KeyHash> = t.keys().map(|k| *k.hash()).collect();
        assert!(hashes.is_sorted(), "hash order");
        for s in 0..t.shards() {
            for (m, member) in t.members_in(s) {
                let (key, found) = t.member(s, m).unwrap();
                assert_eq!(found, *member);
                assert!(key.members().contains(member));
            }
        }
    }

    #[test]
    fn finds_every_key_by_hash_and_by_id() {
        for n in [0, 1, 2, 3, 100, 20_000] {
            let t = table(0..n);
            check(&t, 0..n, n..n + 10, 0);
            assert!(t.find(&KeyHash::of("not a value")).is_none());
            assert!(t.by_id("key-none").is_none());
        }
    }

    #[test]
    fn a_change_builds_only_the_shards_it_touches() {
        let t = table(0..20_000);
        // Out: 10 and 11; changed: 12 (now disabled, by a new value); in: 20,000 and 20,001.
        let gone: Vec<Key<'_>> = ["key10", "key11", "key12"]
            .iter()
            .map(|id| t.by_id(id).unwrap())
            .collect();
        let mut twelve = entry(12);
        twelve.enabled = false;
        twelve.hash = KeyHash::of("value12-new");
        let (next, rebuilt) = t.with_changes(&gone, vec![entry(20_000), entry(20_001), twelve]);
        assert!(rebuilt.len() <= 7, "{rebuilt:?}");
        check(&next, (0..10).chain(13..20_002), 10..12, 1);
        let key = next.by_id("key12").unwrap();
        assert!(!key.enabled());
        assert_eq!(
            next.find(&KeyHash::of("value12-new")).map(|k| k.id()),
            Some("key12")
        );
        assert!(next.find(&KeyHash::of("value12")).is_none());
        // Every other shard is the one the old table has.
        let shared = (0..SHARDS)
            .filter(|&s| Arc::ptr_eq(t.shards.get(s), next.shards.get(s)))
            .count();
        assert_eq!(shared, SHARDS - rebuilt.len());
        // Of the groups of shard pointers, only those of the shards built again were copied.
        let copied = (0..SHARDS / GROUP)
            .filter(|&g| !Arc::ptr_eq(&t.shards.0[g], &next.shards.0[g]))
            .count();
        let groups: std::collections::HashSet<usize> =
            rebuilt.iter().map(|&s| s as usize / GROUP).collect();
        assert_eq!(copied, groups.len());
        // A key copied into a shard built again keeps its live credits.
        for i in (0..20_000).filter(|i| i % 7 == 0 && *i != 12) {
            let (before, after) = (t.by_id(&format!("key{i}")), next.by_id(&format!("key{i}")));
            let live =
                |k: Option<Key<'_>>| k.and_then(|k| k.credits()).map(|a| Arc::as_ptr(&a.live));
            assert_eq!(live(before), live(after), "key{i}");
        }
        // The old table is untouched.
        check(&t, 0..20_000, 20_000..20_002, 0);
    }

    #[test]
    fn an_old_value_finds_its_key_through_a_change_and_goes_with_it() {
        let mut rotated = entry(5);
        rotated.hash = KeyHash::of("value5-new");
        rotated.previous = Some(PreviousValue {
            hash: KeyHash::of("value5"),
            until: 100,
        });
        let t = table(0..50);
        let gone = vec![t.by_id("key5").unwrap()];
        let (t, _) = t.with_changes(&gone, vec![rotated]);
        let old = KeyHash::of("value5");
        assert_eq!(t.find_previous(&old, 99).map(|k| k.id()), Some("key5"));
        assert!(t.find_previous(&old, 100).is_none(), "its grace is over");
        assert_eq!(t.holder(&old).map(|k| k.id()), Some("key5"));
        // Another change of the same key carries the old value; its deletion ends it.
        let gone = vec![t.by_id("key7").unwrap()];
        let (t, _) = t.with_changes(&gone, vec![entry(7)]);
        assert_eq!(t.find_previous(&old, 99).map(|k| k.id()), Some("key5"));
        let gone = vec![t.by_id("key5").unwrap()];
        let (t, _) = t.with_changes(&gone, Vec::new());
        assert!(t.find_previous(&old, 99).is_none());
        assert!(t.holder(&old).is_none());
    }

    /// `entry(i)` named `name{i}`, as a table that finds keys by name holds it.
    fn named(i: u32) -> Entry {
        Entry {
            name: Some(format!("name{i}")),
            ..entry(i)
        }
    }

    #[test]
    fn names_follow_changes_and_a_shared_name_names_no_key() {
        let mut entries: Vec<Entry> = (0..20_000).map(named).collect();
        entries[2].name = Some("name1".into());
        // A name three keys share.
        entries[7].name = Some("name6".into());
        entries[8].name = Some("name6".into());
        entries.sort_by_key(|e| e.hash);
        let mut b = KeyTable::build();
        for e in &entries {
            b.push(e);
        }
        let t = b.finish();
        let named_id = |t: &KeyTable, name: &str| t.by_name(name).map(|k| k.id().to_owned());
        assert_eq!(named_id(&t, "name0").as_deref(), Some("key0"));
        assert_eq!(named_id(&t, "name1"), None, "key1 and key2 share it");
        assert_eq!(named_id(&t, "name2"), None);
        assert_eq!(named_id(&t, "nobody"), None);
        assert_eq!(named_id(&t, ""), None);
        assert_eq!(t.shared_names(), 2, "name1 and name6");

        // key2 (a twin) goes; key12 is renamed; key20,000 comes in, taking key5's name.
        let gone: Vec<Key<'_>> = ["key2", "key12"]
            .iter()
            .map(|id| t.by_id(id).unwrap())
            .collect();
        let twelve = Entry {
            name: Some("renamed".into()),
            ..named(12)
        };
        let late = Entry {
            name: Some("name5".into()),
            ..named(20_000)
        };
        let (next, rebuilt) = t.with_changes(&gone, vec![twelve, late]);
        assert!(rebuilt.len() <= 3, "{rebuilt:?}");
        assert_eq!(
            named_id(&next, "name1").as_deref(),
            Some("key1"),
            "no twin left"
        );
        assert_eq!(named_id(&next, "renamed").as_deref(), Some("key12"));
        assert_eq!(
            named_id(&next, "name12"),
            None,
            "the old name names nothing"
        );
        assert_eq!(named_id(&next, "name5"), None, "shared now");
        assert_eq!(named_id(&next, "name20000"), None);
        assert_eq!(next.shared_names(), 2, "name5 and name6");
        // Every other key keeps its name, in the shards built again too.
        for i in (0..20_000).filter(|i| ![1, 2, 5, 6, 7, 8, 12].contains(i)) {
            assert_eq!(
                named_id(&next, &format!("name{i}")),
                Some(format!("key{i}")),
                "{i}"
            );
        }
        let indexed = |t: &KeyTable| t.names.iter().map(|s| s.len()).sum::<usize>();
        assert_eq!(indexed(&next), next.len(), "one name entry a key");
        // The old table is as it was.
        assert_eq!(named_id(&t, "name12").as_deref(), Some("key12"));
        assert_eq!(named_id(&t, "name5").as_deref(), Some("key5"));
        // A table without names finds no key by name.
        assert!(table(0..10).by_name("name1").is_none());
        assert_eq!(table(0..10).shared_names(), 0);
    }
}
