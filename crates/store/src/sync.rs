//! Applying the plans and keys a config file declares to a store, matched by name.

use tollgate_core::model::Tags;
use tollgate_core::{ApiKey, ApiStage, KeyHash, QuotaSettings, ThrottleSettings, UsagePlan};

use crate::{Records, Store, StoreError, ids};

/// A usage plan as a config file declares it (no id: the store assigns or keeps one).
#[derive(Debug, Clone, PartialEq)]
pub struct DeclaredPlan {
    /// Plan name, the match key.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// Covered (api, stage) pairs.
    pub api_stages: Vec<ApiStage>,
    /// Per-key throttle.
    pub throttle: Option<ThrottleSettings>,
    /// Per-key quota.
    pub quota: Option<QuotaSettings>,
    /// AWS tags.
    pub tags: Tags,
}

/// An API key as a config file declares it.
#[derive(Debug, Clone, PartialEq)]
pub struct DeclaredKey {
    /// Key name, the match key.
    pub name: String,
    /// The value; `None` keeps the stored value, or generates one for a new key.
    pub value: Option<String>,
    /// Free text.
    pub description: Option<String>,
    /// AWS customer id.
    pub customer_id: Option<String>,
    /// Whether the key is accepted.
    pub enabled: bool,
    /// Names of the declared plans the key belongs to (exactly these, after applying).
    pub plans: Vec<String>,
    /// AWS tags (the expiry among them).
    pub tags: Tags,
    /// The credits it opens with (`credits.balance`), when it holds credits: added once, when the
    /// key first gets them; later changes go through the admin API.
    pub opening_credits: Option<u64>,
}

/// The credit ledger's idempotency key of a declared key's opening balance.
pub const OPENING_CREDITS: &str = "opening";

/// A key whose value tollgate generated: the only time the value is ever visible.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratedKey {
    /// The key's name.
    pub name: String,
    /// The key's id.
    pub id: String,
    /// The generated value.
    pub value: String,
}

/// Encrypts a key value for a key id, when values are stored encrypted.
pub type SealFn<'a> = &'a dyn Fn(&str, &str) -> Vec<u8>;

/// Creates or updates the declared plans and keys (matched by name) and leaves every other record
/// alone. A declared key ends up in exactly the declared plans it lists. With `seal`, new and changed
/// values are also kept encrypted. Returns the values generated for new keys without a configured value.
///
/// Only what differs is written: an instance starting with the config the running ones were started
/// with writes nothing, so a rolling restart of a fleet does not make the others reload.
pub fn apply_declared(
    store: &dyn Store,
    plans: &[DeclaredPlan],
    keys: &[DeclaredKey],
    now_secs: i64,
    seal: Option<SealFn<'_>>,
) -> Result<Vec<GeneratedKey>, StoreError> {
    let stored_plans = store.plans()?;
    // Written as one batch at the end (announced once to the other instances in cluster mode).
    let mut changed = Records::default();
    let mut plan_ids = Vec::with_capacity(plans.len());
    for declared in plans {
        let stored = stored_plans.iter().find(|p| p.name == declared.name);
        let plan = UsagePlan {
            id: stored.map_or_else(ids::new_plan_id, |p| p.id.clone()),
            name: declared.name.clone(),
            description: declared.description.clone(),
            api_stages: declared.api_stages.clone(),
            throttle: declared.throttle,
            quota: declared.quota,
            tags: declared.tags.clone(),
            // Not in the config: what the admin API set stays.
            product_code: stored.and_then(|p| p.product_code.clone()),
        };
        plan_ids.push((declared.name.as_str(), plan.id.clone()));
        if stored != Some(&plan) {
            changed.plans.push(plan);
        }
    }

    // Looked up by name in one call: there may be millions of other keys.
    let names: Vec<&str> = keys.iter().map(|k| k.name.as_str()).collect();
    let found = store.keys_named(&names)?;
    let mut generated = Vec::new();
    let mut openings = Vec::new();
    for (declared, found) in keys.iter().zip(found) {
        let (existing, bound) = found.unzip();
        let bound = bound.unwrap_or_default();
        let existing = existing.as_ref();
        let id = existing.map_or_else(ids::new_key_id, |k| k.id.clone());
        let (value_hash, new_value) = match (&declared.value, existing) {
            // The configured value is the one a rotation replaced: the rotation stands (a restart
            // must not undo it), and the config's value works until its grace ends.
            (Some(value), Some(key))
                if key.previous.is_some_and(|p| p.hash == KeyHash::of(value)) =>
            {
                tracing::warn!(key = %key.id, name = %key.name,
                    "this key was rotated: the value in the config is its old one, accepted only until its grace period ends; put the new value in the config");
                (key.value_hash, None)
            }
            (Some(value), _) => (KeyHash::of(value), Some(value.clone())),
            (None, Some(key)) => (key.value_hash, None),
            (None, None) => {
                let value = ids::new_key_value();
                generated.push(GeneratedKey {
                    name: declared.name.clone(),
                    id: id.clone(),
                    value: value.clone(),
                });
                (KeyHash::of(&value), Some(value))
            }
        };
        let unchanged = existing.filter(|k| k.value_hash == value_hash);
        // An unchanged value keeps its sealed copy; a new one is sealed when a sealer is given. A
        // sealed copy of an old value never outlives the value.
        let sealed_value = match (
            seal,
            unchanged.and_then(|k| k.sealed_value.clone()),
            &new_value,
        ) {
            (_, Some(kept), _) => Some(kept),
            (Some(seal), None, Some(value)) => Some(seal(&id, value)),
            _ => None,
        };
        let mut key = ApiKey {
            id: id.clone(),
            name: declared.name.clone(),
            description: declared.description.clone(),
            customer_id: declared.customer_id.clone(),
            enabled: declared.enabled,
            value_hash,
            created_date: existing.map_or(now_secs, |k| k.created_date),
            last_updated_date: existing.map_or(now_secs, |k| k.last_updated_date),
            sealed_value,
            tags: declared.tags.clone(),
            value_prefix: existing.map(|k| k.value_prefix.clone()).unwrap_or_default(),
            value_length: existing.map_or(0, |k| k.value_length),
            // A rotation's grace survives a restart; a value changed in the config has none.
            previous: unchanged.and_then(|k| k.previous),
            // Credits once held stay (their balance lives in the ledger).
            credits: existing.is_some_and(|k| k.credits) || declared.opening_credits.is_some(),
        };
        if let Some(balance) = declared.opening_credits {
            openings.push((id.clone(), balance));
        }
        if let Some(value) = &new_value {
            key.set_value_hint(value);
        }
        if existing != Some(&key) {
            key.last_updated_date = now_secs;
            changed.keys.push(key);
        }

        let wanted: Vec<&str> = declared
            .plans
            .iter()
            .filter_map(|name| {
                plan_ids
                    .iter()
                    .find(|(n, _)| n == name)
                    .map(|(_, id)| id.as_str())
            })
            .collect();
        for plan_id in &bound {
            if !wanted.contains(&plan_id.as_str()) {
                store.unbind(plan_id, &id)?;
            }
        }
        for plan_id in wanted {
            if !bound.iter().any(|b| b == plan_id) {
                changed.bindings.push((plan_id.to_owned(), id.clone()));
            }
        }
    }
    match store.put_records(&changed) {
        Err(StoreError::DuplicateKeyValue) => Err(value_holder(store, &changed.keys)),
        Err(other) => Err(other),
        Ok(()) => {
            for (id, balance) in openings {
                store.add_credits(&id, OPENING_CREDITS, balance, now_secs)?;
            }
            Ok(generated)
        }
    }
}

/// Which of `keys` has a value another key holds, and which key that is: read from the index only
/// on this error path (it may hold millions of keys).
fn value_holder(store: &dyn Store, keys: &[ApiKey]) -> StoreError {
    let Ok(index) = store.load_index() else {
        return StoreError::DuplicateKeyValue;
    };
    for key in keys {
        let holder =
            (0..index.len()).find(|&i| index.hash(i) == key.value_hash && index.id(i) != key.id);
        if let Some(i) = holder {
            return StoreError::ValueHeld {
                declared: key.name.clone(),
                holder_id: index.id(i).to_owned(),
                holder_name: index.name(i).to_owned(),
            };
        }
    }
    StoreError::DuplicateKeyValue
}
