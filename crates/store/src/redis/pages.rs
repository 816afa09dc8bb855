//! The key pages: where Redis keeps every key's record and memberships, in 16,384 pages of each, so
//! that a start reads a few hundred values per round trip instead of a million records.
//!
//! A keys page holds one row per key, `<id> <record>\n`, the record being `StoredKey`'s JSON with
//! its place (JSON holds no raw newline, and ids no space, so a script finds a key's row by its
//! id). A plans page holds one row per membership of its keys, `<planId>,<keyId>\n`. The scripts
//! that write keys and memberships edit the rows in place; a missing page is an empty one.

use tollgate_core::KeyHash;

use crate::StoreError;

/// How many pages: ~60 keys (~7 KB) each at a million, so that a write rewrites a small page.
pub(super) const PAGES: usize = 16_384;

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

/// Whether `id` can name a key or a plan in the pages: no byte that ends a row or a field.
pub(super) fn valid_id(id: &str) -> bool {
    !id.is_empty()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

fn corrupt(page: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Backend(format!("key page {page}: {e}"))
}

/// The rows of page `name`, each split at its first `separator`: (id, rest).
fn rows<'p>(
    name: &'p str,
    page: &'p [u8],
    separator: u8,
) -> impl Iterator<Item = Result<(&'p str, &'p str), StoreError>> + 'p {
    page.split(|&b| b == b'\n')
        .filter(|row| !row.is_empty())
        .map(move |row| {
            let row = std::str::from_utf8(row).map_err(|e| corrupt(name, e))?;
            row.split_once(char::from(separator)).ok_or_else(|| {
                corrupt(name, format!("a row without its {}", char::from(separator)))
            })
        })
}

/// Each key of keys page `name`: (id, record).
pub(super) fn key_rows<'p>(
    name: &'p str,
    page: &'p [u8],
) -> impl Iterator<Item = Result<(&'p str, &'p str), StoreError>> + 'p {
    rows(name, page, b' ')
}

/// Each membership of plans page `name`: (plan id, key id).
pub(super) fn plan_rows<'p>(
    name: &'p str,
    page: &'p [u8],
) -> impl Iterator<Item = Result<(&'p str, &'p str), StoreError>> + 'p {
    rows(name, page, b',')
}

/// Appends the row `<first><separator><second>\n` (what [`rows`] splits).
fn push_row(page: &mut Vec<u8>, first: &str, separator: u8, second: &str) {
    page.extend_from_slice(first.as_bytes());
    page.push(separator);
    page.extend_from_slice(second.as_bytes());
    page.push(b'\n');
}

/// Pages written whole (by the move from an older layout): rows by page.
#[derive(Default)]
pub(super) struct PageWriter {
    pages: std::collections::BTreeMap<usize, [Vec<u8>; 2]>,
}

impl PageWriter {
    fn page(&mut self, p: usize) -> &mut [Vec<u8>; 2] {
        self.pages.entry(p).or_default()
    }

    /// Adds key `id`'s row: its record, with its place.
    pub(super) fn key(&mut self, id: &str, record: &str) {
        push_row(&mut self.page(page_of(id))[0], id, b' ', record);
    }

    /// Adds key `key`'s membership of plan `plan`.
    pub(super) fn binding(&mut self, plan: &str, key: &str) {
        push_row(&mut self.page(page_of(key))[1], plan, b',', key);
    }

    /// Every page's name and contents, keys then plans, empty ones included (they replace what
    /// was there).
    pub(super) fn finish(mut self) -> Vec<super::Page> {
        let mut out = Vec::with_capacity(2 * PAGES);
        for p in 0..PAGES {
            let [keys, plans] = self.pages.remove(&p).unwrap_or_default();
            out.push((keys_page(p), keys));
            out.push((plans_page(p), plans));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rows_come_back_as_they_went_in() {
        let record =
            r#"{"name":"a \"name\", with\nlines and spaces","valueSha256":"ab","place":7}"#;
        let mut pages = PageWriter::default();
        pages.key("key1", record);
        pages.binding("plan1", "key1");
        let p = page_of("key1");
        let written = pages.finish();
        assert_eq!(written.len(), 2 * PAGES);
        let (keys, plans) = (&written[2 * p], &written[2 * p + 1]);
        assert_eq!(keys.0, keys_page(p));
        let rows: Vec<_> = key_rows(&keys.0, &keys.1)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, vec![("key1", record)]);
        let rows: Vec<_> = plan_rows(&plans.0, &plans.1)
            .collect::<Result<_, _>>()
            .unwrap();
        assert_eq!(rows, vec![("plan1", "key1")]);
        assert!(key_rows("x", b"no-separator\n").next().unwrap().is_err());
        assert!(valid_id("Ab_9-z") && !valid_id("a b") && !valid_id("a,b") && !valid_id(""));
        assert!(
            (0..5000)
                .map(|i| page_of(&format!("k{i}")))
                .all(|p| p < PAGES)
        );
    }
}
