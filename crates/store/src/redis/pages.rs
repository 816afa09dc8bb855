//! A start's fast read: what the gateway serves of every key (its fields in `{tg}:keys`, and its
//! plans), kept again in 16,384 pages of CSV, so that a start reads them (a few hundred values per
//! round trip) instead of scanning a million records and a million memberships.
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

/// How many pages: ~60 keys (~8 KB) each at a million, so that bringing the pages up to date after
/// a thousand changes rewrites ~1,000 small pages, not most of the large ones.
pub(super) const PAGES: usize = 16_384;

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

/// Pages being written: their rows, each page's keys and plans apart, made as rows come.
#[derive(Default)]
pub(super) struct PageWriter {
    pages: std::collections::BTreeMap<usize, [csv::Writer<Vec<u8>>; 2]>,
}

fn writer() -> csv::Writer<Vec<u8>> {
    // A small buffer: a whole write holds two writers per page.
    csv::WriterBuilder::new()
        .has_headers(false)
        .buffer_capacity(256)
        .from_writer(Vec::new())
}

fn write_error(e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("writing a key page: {e}"))
}

impl PageWriter {
    fn page(&mut self, p: usize) -> &mut [csv::Writer<Vec<u8>>; 2] {
        self.pages.entry(p).or_insert_with(|| [writer(), writer()])
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
        self.page(page_of(id))[0]
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
        self.page(page_of(key))[1]
            .write_record([plan, key])
            .map_err(write_error)
    }

    /// The pages' names and contents, keys then plans, for the pages `which` (all of them when
    /// `None`, empty ones included: a start takes a missing page for pages not all written).
    pub(super) fn finish(
        mut self,
        which: Option<&[usize]>,
    ) -> Result<Vec<super::Page>, StoreError> {
        let which: Vec<usize> = which.map_or_else(|| (0..PAGES).collect(), <[usize]>::to_vec);
        let mut out = Vec::with_capacity(2 * which.len());
        for p in which {
            let [keys, plans] = self
                .pages
                .remove(&p)
                .unwrap_or_else(|| [writer(), writer()]);
            out.push((keys_page(p), keys.into_inner().map_err(write_error)?));
            out.push((plans_page(p), plans.into_inner().map_err(write_error)?));
        }
        Ok(out)
    }
}

fn corrupt(page: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("key page {page}: {e}"))
}

/// The fields of a keys page's row ([`PageWriter::key`] writes them).
const KEY_FIELDS: usize = 11;

/// Reads pages one after another with one CSV parser: building one costs more than reading a page
/// (csv-core compiles its state machine; 49% of a start at a million keys, when it was built per
/// page).
pub(super) struct PageReader {
    csv: csv::Reader<std::io::Cursor<Vec<u8>>>,
    row: csv::StringRecord,
}

impl Default for PageReader {
    fn default() -> Self {
        Self {
            // Keys pages and plans pages have rows of their own widths, which `rows` checks.
            csv: csv::ReaderBuilder::new()
                .has_headers(false)
                .flexible(true)
                .from_reader(std::io::Cursor::new(Vec::new())),
            row: csv::StringRecord::new(),
        }
    }
}

impl PageReader {
    /// Each row of page `name`, which must have `width` fields: `each(row)`.
    fn rows(
        &mut self,
        name: &str,
        page: Vec<u8>,
        width: usize,
        mut each: impl FnMut(&csv::StringRecord) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        *self.csv.get_mut() = std::io::Cursor::new(page);
        // Back to the start of the new page, with the parser's state (and its end of input) reset.
        self.csv
            .seek_raw(std::io::SeekFrom::Start(0), csv::Position::new())
            .map_err(|e| corrupt(name, e))?;
        while self
            .csv
            .read_record(&mut self.row)
            .map_err(|e| corrupt(name, e))?
        {
            if self.row.len() != width {
                return Err(corrupt(
                    name,
                    format!("a row of {} fields, not {width}", self.row.len()),
                ));
            }
            each(&self.row)?;
        }
        Ok(())
    }

    /// Each key of a keys page, as the records have it: `each(id, key)`.
    pub(super) fn keys(
        &mut self,
        name: &str,
        page: Vec<u8>,
        mut each: impl FnMut(&str, ServedKey<'_>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        self.rows(name, page, KEY_FIELDS, |row| {
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
            ] = std::array::from_fn::<_, KEY_FIELDS, _>(|i| row.get(i).unwrap_or(""));
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
            each(id, key)
        })
    }

    /// Each membership of a plans page: `each(plan, key)`.
    pub(super) fn plans(
        &mut self,
        name: &str,
        page: Vec<u8>,
        mut each: impl FnMut(&str, &str),
    ) -> Result<(), StoreError> {
        self.rows(name, page, 2, |row| {
            each(row.get(0).unwrap_or(""), row.get(1).unwrap_or(""));
            Ok(())
        })
    }
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
        let mut pages = PageWriter::default();
        pages.api_key(&key).unwrap();
        pages.binding("plan,1", &key.id).unwrap();
        let p = page_of(&key.id);
        let written = pages.finish(Some(&[p])).unwrap();
        assert_eq!(written.len(), 2);
        let mut seen = Vec::new();
        let mut reader = PageReader::default();
        // A page read before leaves nothing behind for the next.
        reader.plans("p", written[1].1.clone(), |_, _| ()).unwrap();
        reader
            .keys("k", written[0].1.clone(), |id, k| {
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
        reader
            .plans("p", written[1].1.clone(), |plan, k| {
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
