//! Pages of a listing, as AWS pages them: `limit` and `position`.

use std::convert::Infallible;

use tollgate_core::ApiKey;
use tollgate_store::Store;

use crate::error::{AdminError, bad};
use crate::wire::Page;

/// AWS's default and largest page sizes.
const DEFAULT_LIMIT: usize = 25;
const MAX_LIMIT: usize = 500;

/// A parsed paging request.
#[derive(Debug, Clone, Default)]
pub struct Paging {
    /// `limit` (default 25, at most 500).
    pub limit: Option<i64>,
    /// `position` from the previous page.
    pub position: Option<String>,
}

/// One page of `items`, in their order, from the place `paging.position` on (an index).
pub(super) fn page_in_order<T>(items: Vec<T>, paging: &Paging) -> Result<Page<T>, AdminError> {
    let start = usize::try_from(numbered_position(paging)?.unwrap_or(0)).unwrap_or(usize::MAX);
    let numbered = items.into_iter().enumerate().skip(start);
    let Page { position, item } = first_page_of(numbered, |(i, _)| i.to_string(), paging);
    Ok(Page {
        position,
        item: item.into_iter().map(|(_, x)| x).collect(),
    })
}

/// `paging.position` where positions are numbers (places in creation order).
pub(super) fn numbered_position(paging: &Paging) -> Result<Option<u64>, AdminError> {
    paging
        .position
        .as_deref()
        .map(|p| {
            p.parse().map_err(|_| {
                bad(format!(
                    "Invalid position {p:?}: not one a previous page gave"
                ))
            })
        })
        .transpose()
}

/// Where in `items`, sorted by `id`, the page at `paging.position` starts.
pub(super) fn start_at<T>(items: &[T], id: impl Fn(&T) -> &str, paging: &Paging) -> usize {
    paging
        .position
        .as_deref()
        .map_or(0, |p| items.partition_point(|x| id(x) < p))
}

/// The first page of `items`, which come in order from the page's position on. The next position
/// is `position_of` the first item left out.
pub(super) fn first_page<T, E>(
    items: impl Iterator<Item = Result<T, E>>,
    position_of: impl Fn(&T) -> String,
    paging: &Paging,
) -> Result<Page<T>, E> {
    let limit = match paging.limit {
        Some(n) if n > 0 => usize::try_from(n).unwrap_or(MAX_LIMIT).min(MAX_LIMIT),
        _ => DEFAULT_LIMIT,
    };
    let mut item = Vec::with_capacity(limit + 1);
    for next in items {
        item.push(next?);
        if item.len() > limit {
            break;
        }
    }
    let position = item.get(limit).map(position_of);
    item.truncate(limit);
    Ok(Page { position, item })
}

/// [`first_page`] of items that cannot fail.
pub(super) fn first_page_of<T>(
    items: impl Iterator<Item = T>,
    position_of: impl Fn(&T) -> String,
    paging: &Paging,
) -> Page<T> {
    match first_page(items.map(Ok::<T, Infallible>), position_of, paging) {
        Ok(page) => page,
        Err(never) => match never {},
    }
}

/// The stored keys in creation order from place `from` on, each with its place, read a page at a
/// time.
pub(super) fn stored_keys(
    store: &dyn Store,
    from: Option<u64>,
) -> impl Iterator<Item = Result<(u64, ApiKey), AdminError>> {
    const BATCH: usize = 500;
    let mut from = from;
    let mut batch = std::collections::VecDeque::new();
    let mut done = false;
    std::iter::from_fn(move || {
        if batch.is_empty() && !done {
            match store.keys_from(from, BATCH + 1) {
                Ok(mut keys) => {
                    // The extra key starts the next batch.
                    from = (keys.len() > BATCH)
                        .then(|| keys.pop().map(|(place, _)| place))
                        .flatten();
                    done = from.is_none();
                    batch.extend(keys);
                }
                Err(e) => {
                    done = true;
                    return Some(Err(e.into()));
                }
            }
        }
        batch.pop_front().map(Ok)
    })
}

#[cfg(test)]
mod tests {
    use tollgate_core::{ApiKey, KeyHash};
    use tollgate_store::Store;

    use super::*;

    #[test]
    fn stored_keys_are_read_in_batches_in_creation_order() {
        let dir = tempfile::tempdir().unwrap();
        let store = tollgate_store::SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let mut ids = Vec::new();
        // Created in the order opposite to their ids'.
        for i in (0..1203).rev() {
            let id = format!("key{i:05}");
            store
                .put_key(&ApiKey {
                    id: id.clone(),
                    name: format!("name{}", i % 3),
                    description: None,
                    customer_id: None,
                    enabled: true,
                    value_hash: KeyHash::of(format!("batchedKeyValue{i:010}")),
                    sealed_value: None,
                    created_date: 0,
                    last_updated_date: 0,
                    ..ApiKey::default()
                })
                .unwrap();
            ids.push(id);
        }
        let read: Vec<(u64, String)> = stored_keys(&store, None)
            .map(|k| k.map(|(place, k)| (place, k.id)).unwrap())
            .collect();
        let read_ids: Vec<&String> = read.iter().map(|(_, id)| id).collect();
        assert_eq!(
            read_ids,
            ids.iter().collect::<Vec<_>>(),
            "three batches, none repeated or lost"
        );
        let from: Vec<String> = stored_keys(&store, Some(read[600].0))
            .map(|k| k.unwrap().1.id)
            .collect();
        assert_eq!(from, ids[600..]);

        // A filtered page reads on until it is full, and says where the next one starts.
        let paging = Paging {
            limit: Some(400),
            position: None,
        };
        let name2 =
            stored_keys(&store, None).filter(|k| k.as_ref().is_ok_and(|(_, k)| k.name == "name2"));
        let page = first_page(
            name2,
            |(place, _): &(u64, ApiKey)| place.to_string(),
            &paging,
        )
        .unwrap();
        assert_eq!(page.item.len(), 400);
        // name2 is every third key created, from `key01202` down: the 400th is `key00005`, and
        // the next page starts at the 401st, `key00002`.
        assert_eq!(page.item[399].1.id, "key00005");
        assert_eq!(
            page.position.as_deref(),
            Some(read[1200].0.to_string().as_str())
        );
    }

    #[test]
    fn paging_in_order() {
        let items: Vec<String> = (0..7).map(|i| format!("id{}", 7 - i)).collect();
        let at = |position: Option<String>, limit| Paging {
            limit: Some(limit),
            position,
        };
        let p = page_in_order(items.clone(), &at(None, 3)).unwrap();
        assert_eq!(p.item, vec!["id7", "id6", "id5"]);
        assert_eq!(p.position.as_deref(), Some("3"));
        let p = page_in_order(items.clone(), &at(p.position, 3)).unwrap();
        assert_eq!(p.item, vec!["id4", "id3", "id2"]);
        let p = page_in_order(items.clone(), &at(p.position, 3)).unwrap();
        assert_eq!((p.item, p.position), (vec!["id1".to_string()], None));
        assert_eq!(
            page_in_order(items.clone(), &at(None, -1))
                .unwrap()
                .item
                .len(),
            7
        );
        assert!(
            page_in_order(items.clone(), &at(Some("99".into()), 3))
                .unwrap()
                .item
                .is_empty()
        );
        assert!(matches!(
            page_in_order(items, &at(Some("id3".into()), 3)),
            Err(AdminError::BadRequest(_))
        ));
    }
}
