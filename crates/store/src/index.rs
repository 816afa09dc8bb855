//! The gateway's view of the records, compact: what a million keys need to be served, in a few
//! large buffers rather than millions of small allocations (which the allocator keeps resident
//! long after they are freed).

use std::collections::HashMap;

use tollgate_core::{KeyHash, UsagePlan};

use crate::Records;

/// Plans in full; per key only its id, value hash and whether it is enabled; bindings by position.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KeyIndex {
    /// All usage plans.
    pub plans: Vec<UsagePlan>,
    ids: String,
    id_ends: Vec<u32>,
    hashes: Vec<KeyHash>,
    enabled: Vec<bool>,
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

    /// The plans, the rest let go (a million keys' worth of buffers).
    pub fn into_plans(self) -> Vec<UsagePlan> {
        self.plans
    }

    /// Adds a key.
    pub fn push_key(&mut self, id: &str, hash: KeyHash, enabled: bool) {
        self.ids.push_str(id);
        self.id_ends
            .push(u32::try_from(self.ids.len()).unwrap_or(u32::MAX));
        self.hashes.push(hash);
        self.enabled.push(enabled);
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

    /// Key `i`'s value hash.
    pub fn hash(&self, i: usize) -> KeyHash {
        self.hashes[i]
    }

    /// Whether key `i` is enabled.
    pub fn enabled(&self, i: usize) -> bool {
        self.enabled[i]
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
        let plans: HashMap<&str, u32> = self
            .plans
            .iter()
            .enumerate()
            .map(|(i, p)| (p.id.as_str(), i as u32))
            .collect();
        let mut by_id: Vec<u32> = (0..self.len() as u32).collect();
        by_id.sort_unstable_by(|&a, &b| self.id(a as usize).cmp(self.id(b as usize)));
        let mut bindings = Vec::new();
        for (plan, key) in pairs {
            let Some(&p) = plans.get(plan.as_ref()) else {
                continue;
            };
            if let Ok(at) = by_id.binary_search_by(|&i| self.id(i as usize).cmp(key.as_ref())) {
                bindings.push((p, by_id[at]));
            }
        }
        self.bindings.extend(bindings);
        self.by_id = by_id;
    }

    /// Key indices in id order: empty unless [`bind_all`](Self::bind_all) ran after the last key.
    pub fn by_id(&self) -> &[u32] {
        if self.by_id.len() == self.len() {
            &self.by_id
        } else {
            &[]
        }
    }
}

impl From<&Records> for KeyIndex {
    fn from(records: &Records) -> Self {
        let mut index = Self::new(records.plans.clone());
        for key in &records.keys {
            index.push_key(&key.id, key.value_hash, key.enabled);
        }
        index.bind_all(records.bindings.iter().map(|(p, k)| (p, k)));
        index
    }
}
