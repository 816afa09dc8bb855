//! API keys: create, read, list, update, find, rotate, delete.

use std::sync::Arc;

use tollgate_core::clock::NANOS_PER_SEC;
use tollgate_core::model::{EXPIRES_TAG, parse_expiry, validate_key_value, validate_tags};
use tollgate_core::{ApiKey, KeyHash};
use tollgate_store::ids;

use super::paging::{Paging, first_page, numbered_position, stored_keys};
use super::{Admin, Catalog, Written};
use crate::error::{AdminError, bad, unknown_key};
use crate::wire::{ApiKeyOut, CreateApiKeyIn, Page, PatchOp, RotateApiKeyIn};

const KEY_PATHS: &str = "[/description, /enabled, /name, /customerId]";

/// One change UpdateApiKey can make to a key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyChange {
    /// `/name`.
    Name(String),
    /// `/description`.
    Description(Option<String>),
    /// `/enabled`: a disabled key is refused (403) from the next request on.
    Enabled(bool),
    /// `/customerId`.
    CustomerId(Option<String>),
    /// tollgate's own: the expiry (RFC 3339), kept as its tag; `None` removes it.
    ExpiresAt(Option<String>),
}

impl KeyChange {
    /// The change a patch operation asks for.
    fn of(op: &PatchOp) -> Result<Self, AdminError> {
        let (verb, path) = (
            op.op.as_deref().unwrap_or(""),
            op.path.as_deref().unwrap_or(""),
        );
        let value = op.value.clone();
        Ok(match (verb, path) {
            ("replace" | "add", "/expiresAt") if value.is_some() => Self::ExpiresAt(value),
            ("remove", "/expiresAt") => Self::ExpiresAt(None),
            (_, "/expiresAt") => {
                return Err(bad(
                    "Invalid expiresAt: replace it with an RFC 3339 time, or remove it",
                ));
            }
            ("replace", "/description") => Self::Description(value),
            // AWS treats anything but "true" as false.
            ("replace", "/enabled") => Self::Enabled(value.as_deref() == Some("true")),
            ("replace", "/name") => Self::Name(value.unwrap_or_default()),
            ("replace", "/customerId") => Self::CustomerId(value),
            _ => {
                return Err(bad(format!(
                    "Invalid patch path  '{path}' specified for op '{verb}'. Must be one of: {KEY_PATHS}"
                )));
            }
        })
    }
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

impl Admin {
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
            credits: None,
        }
    }

    /// The key's value, when values are stored encrypted.
    pub(super) fn open(&self, key: &ApiKey) -> Option<String> {
        let (sealer, sealed) = (self.settings.sealer.as_ref()?, key.sealed_value.as_ref()?);
        match sealer.open(&key.id, sealed) {
            Ok(v) => Some(v),
            Err(e) => {
                tracing::error!(key = %key.id, error = %e, "cannot return a key value");
                None
            }
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
            let written = admin.store.put_key_read(&key)?;
            catalog.added_key(&key);
            let mut out = admin.key_out(&key, false, None);
            out.value = Some(value);
            Ok((out, Written::Read(key.id, written.map(Box::new))))
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
        let (key, last_used, credits) = self
            .blocking(move |admin| {
                let key = admin.store.key(&id)?.ok_or_else(unknown_key)?;
                let credits = admin.credits_out(&key)?;
                Ok((key, admin.store.last_used(&[&id])?, credits))
            })
            .await?;
        let mut out = self.key_out(&key, include_value, last_used.first().copied().flatten());
        out.credits = credits;
        Ok(out)
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

    /// UpdateApiKey: AWS's patch operations, and tollgate's `/expiresAt`.
    pub async fn update_key(
        self: &Arc<Self>,
        id: &str,
        ops: Vec<PatchOp>,
    ) -> Result<ApiKeyOut, AdminError> {
        let changes = ops.iter().map(KeyChange::of).collect::<Result<_, _>>()?;
        self.change_key(id, changes).await
    }

    /// Makes `changes` to key `id`, in order.
    pub async fn change_key(
        self: &Arc<Self>,
        id: &str,
        changes: Vec<KeyChange>,
    ) -> Result<ApiKeyOut, AdminError> {
        let id = id.to_owned();
        self.write(move |admin, _| {
            let mut key = admin.store.key(&id)?.ok_or_else(unknown_key)?;
            for change in changes {
                match change {
                    KeyChange::Name(name) => key.name = name,
                    KeyChange::Description(d) => key.description = d,
                    KeyChange::Enabled(on) => key.enabled = on,
                    KeyChange::CustomerId(c) => key.customer_id = c,
                    KeyChange::ExpiresAt(Some(at)) => {
                        parse_expiry(&at).map_err(bad)?;
                        key.tags.insert(EXPIRES_TAG.into(), at);
                    }
                    KeyChange::ExpiresAt(None) => {
                        key.tags.remove(EXPIRES_TAG);
                    }
                }
            }
            key.last_updated_date = admin.now_secs();
            let written = admin.store.put_key_read(&key)?;
            let last_used = admin.store.last_used(&[&id])?.pop().flatten();
            // A key that joins or leaves a customer draws on that customer's counts, or its own,
            // from the store (see `Admin::serve_keys`).
            Ok((
                admin.key_out(&key, false, last_used),
                Written::Read(id, written.map(Box::new)),
            ))
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
            let written = admin.store.put_key_read(&key)?;
            let last_used = admin.store.last_used(&[&id])?.pop().flatten();
            let mut out = admin.key_out(&key, false, last_used);
            out.value = Some(value);
            Ok((out, Written::Read(id, written.map(Box::new))))
        })
        .await
    }
}
