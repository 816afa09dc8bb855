//! A start's fast read: what the gateway serves of every key (its fields in `{tg}:keys`, and its
//! plans), kept again in 1,024 pages of CSV, so that a start reads 2,048 values instead of scanning a
//! million records and a million memberships.
//!
//! Pages hold the records exactly as they were at the version `{tg}:pages` names. A start reads them,
//! then the keys the change log says changed since (see [`super::RedisStore::changes_since`]); when
//! the log does not reach back (pages never written, written by an older tollgate, or more than the
//! log's 10,000 changes ago), it reads every record the old way and writes the pages anew. Instances
//! running an older tollgate write no log, so their changes send a start down that path: safe while
//! both run. An instance that sees the pages fall [`REFRESH_AFTER`] changes behind rewrites the pages
//! those changes touched.

use std::borrow::Cow;

use tollgate_core::{ApiKey, KeyHash};

use super::ServedKey;
use crate::StoreError;

/// How many pages: ~1,000 keys each at a million.
pub(super) const PAGES: usize = 1024;

/// Pages this many changes behind the records are brought up to date (see
/// [`super::RedisStore::refresh_pages`]): well within the change log's 10,000.
pub const REFRESH_AFTER: u64 = 1000;

/// The page of key `id`: a stable hash of the id (SHA-256, as values are hashed).
pub(super) fn page_of(id: &str) -> usize {
    let h = KeyHash::of(id).0;
    usize::from(u16::from_be_bytes([h[0], h[1]])) % PAGES
}

/// The keys of page `p`: one row per key.
pub(super) fn keys_page(p: usize) -> String {
    format!("{{tg}}:page:{p}:keys")
}

/// The memberships of page `p`'s keys: one `plan,key` row each.
pub(super) fn plans_page(p: usize) -> String {
    format!("{{tg}}:page:{p}:plans")
}

/// An optional field: `=` and the value, or empty for none (so an empty value stays one).
fn optional(value: Option<&str>) -> Cow<'_, str> {
    value.map_or(Cow::Borrowed(""), |v| Cow::Owned(format!("={v}")))
}

fn read_optional(field: &str) -> Option<Cow<'_, str>> {
    field.strip_prefix('=').map(Cow::Borrowed)
}

/// Pages being written: their rows, each page's keys and plans apart.
pub(super) struct PageWriter {
    keys: Vec<csv::Writer<Vec<u8>>>,
    plans: Vec<csv::Writer<Vec<u8>>>,
}

fn writer() -> csv::Writer<Vec<u8>> {
    csv::WriterBuilder::new()
        .has_headers(false)
        .from_writer(Vec::new())
}

fn write_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("writing a key page: {e}"))
}

impl PageWriter {
    /// Writers of the pages `pages` names (all of them for a whole write).
    pub(super) fn new() -> Self {
        Self {
            keys: (0..PAGES).map(|_| writer()).collect(),
            plans: (0..PAGES).map(|_| writer()).collect(),
        }
    }

    /// Adds key `id` as Redis's record `k` has it.
    pub(super) fn key(&mut self, id: &str, k: &ServedKey<'_>) -> Result<(), StoreError> {
        let (expires, until) = (
            k.expires_at.map(|t| t.to_string()).unwrap_or_default(),
            k.previous
                .as_ref()
                .map(|p| p.previous_until.to_string())
                .unwrap_or_default(),
        );
        let previous = k.previous.as_ref().map(|p| p.previous_sha256.as_str());
        self.keys[page_of(id)]
            .write_record([
                id,
                &k.name,
                &k.value_sha256,
                if k.enabled { "1" } else { "0" },
                &expires,
                previous.unwrap_or(""),
                &until,
                &optional(k.allowed_source_ips.as_deref()),
                &optional(k.customer_id.as_deref()),
                &optional(k.credit_refill.as_deref()),
                if k.credits { "1" } else { "0" },
            ])
            .map_err(write_error)
    }

    /// Adds key `key` as the store hands it over.
    pub(super) fn api_key(&mut self, key: &ApiKey) -> Result<(), StoreError> {
        let stored = super::StoredKey::of(key);
        let body = serde_json::to_string(&stored).map_err(write_error)?;
        let served: ServedKey<'_> = serde_json::from_str(&body).map_err(write_error)?;
        self.key(&key.id, &served)
    }

    /// Adds key `key`'s membership of plan `plan`.
    pub(super) fn binding(&mut self, plan: &str, key: &str) -> Result<(), StoreError> {
        self.plans[page_of(key)]
            .write_record([plan, key])
            .map_err(write_error)
    }

    /// The pages' names and contents, keys then plans, for the pages `which` (all when `None`).
    pub(super) fn finish(
        self,
        which: Option<&[usize]>,
    ) -> Result<Vec<(String, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for (p, (keys, plans)) in self.keys.into_iter().zip(self.plans).enumerate() {
            if which.is_some_and(|w| !w.contains(&p)) {
                continue;
            }
            out.push((keys_page(p), keys.into_inner().map_err(write_error)?));
            out.push((plans_page(p), plans.into_inner().map_err(write_error)?));
        }
        Ok(out)
    }
}

fn corrupt(page: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("key page {page}: {e}"))
}

/// Each key of a keys page, as the records have it: `each(id, key)`.
pub(super) fn read_keys(
    name: &str,
    page: &[u8],
    mut each: impl FnMut(&str, ServedKey<'_>) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let mut rows = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(page);
    let mut row = csv::StringRecord::new();
    while rows.read_record(&mut row).map_err(|e| corrupt(name, e))? {
        let [
            id,
            key_name,
            hash,
            enabled,
            expires,
            previous,
            until,
            sources,
            customer,
            refill,
            credits,
        ] = std::array::from_fn(|i| row.get(i).unwrap_or(""));
        let number = |field: &str| -> Result<Option<u64>, StoreError> {
            (!field.is_empty())
                .then(|| {
                    field
                        .parse()
                        .map_err(|e| corrupt(name, format!("{id}: {e}")))
                })
                .transpose()
        };
        let previous = match (previous, number(until)?) {
            ("", _) | (_, None) => None,
            (hash, Some(until)) => Some(super::StoredPrevious {
                previous_sha256: hash.to_owned(),
                previous_until: until,
            }),
        };
        let key = ServedKey {
            name: Cow::Borrowed(key_name),
            enabled: enabled == "1",
            expires_at: number(expires)?,
            allowed_source_ips: read_optional(sources),
            customer_id: read_optional(customer),
            credit_refill: read_optional(refill),
            credits: credits == "1",
            previous,
            value_sha256: Cow::Borrowed(hash),
        };
        each(id, key)?;
    }
    Ok(())
}

/// Each membership of a plans page: `each(plan, key)`.
pub(super) fn read_plans(
    name: &str,
    page: &[u8],
    mut each: impl FnMut(&str, &str),
) -> Result<(), StoreError> {
    let mut rows = csv::ReaderBuilder::new()
        .has_headers(false)
        .from_reader(page);
    let mut row = csv::StringRecord::new();
    while rows.read_record(&mut row).map_err(|e| corrupt(name, e))? {
        each(row.get(0).unwrap_or(""), row.get(1).unwrap_or(""));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_comes_back_as_it_went_in() {
        let mut key = ApiKey {
            id: "k,1\"x".into(),
            name: "a \"name\", with\nlines\tand =signs".into(),
            enabled: true,
            value_hash: KeyHash::of("value"),
            customer_id: Some(String::new()),
            ..ApiKey::default()
        };
        key.tags
            .insert("tollgate:allowedSourceIps".into(), "10.0.0.0/8,::1".into());
        key.rotate("new", KeyHash::of("new"), 42);
        let mut pages = PageWriter::new();
        pages.api_key(&key).unwrap();
        pages.binding("plan,1", &key.id).unwrap();
        let p = page_of(&key.id);
        let written = pages.finish(Some(&[p])).unwrap();
        assert_eq!(written.len(), 2);
        let mut seen = Vec::new();
        read_keys("k", &written[0].1, |id, k| {
            seen.push((
                id.to_owned(),
                k.name.to_string(),
                k.value_sha256.to_string(),
                k.customer_id.map(|c| c.to_string()),
                k.allowed_source_ips.map(|c| c.to_string()),
                k.previous.map(|p| (p.previous_sha256, p.previous_until)),
                k.enabled,
            ));
            Ok(())
        })
        .unwrap();
        assert_eq!(
            seen,
            vec![(
                key.id.clone(),
                key.name.clone(),
                hex::encode(KeyHash::of("new").0),
                Some(String::new()),
                Some("10.0.0.0/8,::1".into()),
                Some((hex::encode(KeyHash::of("value").0), 42)),
                true,
            )]
        );
        let mut plans = Vec::new();
        read_plans("p", &written[1].1, |plan, k| {
            plans.push((plan.to_owned(), k.to_owned()))
        })
        .unwrap();
        assert_eq!(plans, vec![("plan,1".to_string(), key.id.clone())]);
        assert!(
            (0..5000)
                .map(|i| page_of(&format!("k{i}")))
                .all(|p| p < PAGES)
        );
    }
}
