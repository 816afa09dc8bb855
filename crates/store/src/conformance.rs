//! The behaviour every [`Store`] implementation must show. Each implementation's tests call
//! [`run_all`] on a fresh, empty store.

#![allow(clippy::unwrap_used, missing_docs)]

use std::collections::BTreeMap;

use tollgate_core::model::{EXPIRES_TAG, PreviousValue};
use tollgate_core::quota::{EpochDay, Period};
use tollgate_core::source_ips::SOURCE_IPS_TAG;
use tollgate_core::{ApiKey, ApiStage, KeyHash, QuotaSettings, ThrottleSettings, UsagePlan};

use crate::{
    Attempt, CreditSpend, CustomerDelta, DayValue, DeclaredKey, DeclaredPlan, EventStatus,
    ExportBatch, ExportCommit, ExportMark, ExportState, KeyTerms, OutboxEvent, Records, Series,
    Store, StoreError, UsageDelta, apply_declared,
};

/// Runs every conformance check against `store`, which must start empty.
pub fn run_all(store: &dyn Store) {
    records_roundtrip(store);
    duplicate_values_conflict(store);
    bindings_are_idempotent(store);
    writes_answer_what_a_read_finds(store);
    usage_accumulates_and_filters(store);
    refusals_and_last_use_are_kept_apart_from_usage(store);
    deletes_take_memberships_along(store);
    quota_adjustments_accumulate(store);
    customers_are_counted_apart_from_keys(store);
    credits_are_added_once_and_spent_down_to_zero(store);
    events_are_claimed_once_and_leased_until_delivered(store);
    exports_commit_once_per_version(store);
    declared_state_is_applied_by_name(store);
    bulk_writes_match_single_writes(store);
    keys_are_read_one_by_one_and_in_pages(store);
    index_holds_what_load_does(store);
    sign_outs_end_sessions_by_epoch(store);
}

pub fn sign_outs_end_sessions_by_epoch(store: &dyn Store) {
    assert_eq!(store.session_epoch("AKIDEXAMPLE").unwrap(), 0);
    assert_eq!(store.end_sessions("AKIDEXAMPLE").unwrap(), 1);
    assert_eq!(store.end_sessions("AKIDEXAMPLE").unwrap(), 2);
    assert_eq!(store.session_epoch("AKIDEXAMPLE").unwrap(), 2);
    assert_eq!(store.session_epoch("another").unwrap(), 0);
}

/// A key's value in a series on a day.
fn day(key: &str, day: u32, value: i64) -> DayValue {
    DayValue {
        key_id: key.into(),
        day: EpochDay(day),
        value,
    }
}

fn plan(id: &str) -> UsagePlan {
    UsagePlan {
        id: id.into(),
        name: format!("plan-{id}"),
        description: Some("d".into()),
        api_stages: vec![ApiStage {
            api_id: "api".into(),
            stage: "prod".into(),
            throttle: BTreeMap::from([(
                "/a/{id}/GET".to_string(),
                ThrottleSettings {
                    rate_limit: 0.5,
                    burst_limit: 2,
                },
            )]),
        }],
        throttle: Some(ThrottleSettings {
            rate_limit: 10.0,
            burst_limit: 20,
        }),
        quota: Some(QuotaSettings {
            limit: 100,
            offset: 2,
            period: Period::Month,
        }),
        tags: BTreeMap::from([("team".to_string(), "partners".to_string())]),
        product_code: Some("prod-code".into()),
    }
}

fn key(id: &str, value: &str) -> ApiKey {
    let mut key = ApiKey {
        id: id.into(),
        name: format!("key-{id}"),
        description: None,
        customer_id: Some("cust".into()),
        enabled: true,
        value_hash: KeyHash::of(value),
        sealed_value: Some(vec![1, 2, 3]),
        created_date: 1_700_000_000,
        last_updated_date: 1_700_000_000,
        tags: BTreeMap::from([
            ("owner".to_string(), "central".to_string()),
            (
                EXPIRES_TAG.to_string(),
                "2027-01-31T00:00:00.000000001Z".to_string(),
            ),
            (
                SOURCE_IPS_TAG.to_string(),
                "203.0.113.0/24,2001:db8::/32".to_string(),
            ),
        ]),
        previous: Some(PreviousValue {
            hash: KeyHash::of(format!("before-{value}")),
            until: 1_800_000_000_123_456_789,
        }),
        ..ApiKey::default()
    };
    key.set_value_hint(value);
    key
}

pub fn records_roundtrip(store: &dyn Store) {
    let p = plan("rt0001");
    let k = key("rtkey00001", "roundtrip-value-0123456789");
    store.put_plan(&p).unwrap();
    store.put_key(&k).unwrap();
    let loaded = store.load().unwrap();
    assert!(loaded.plans.contains(&p));
    assert!(loaded.keys.contains(&k));
    let mut plans = store.plans().unwrap();
    let mut all = loaded.plans.clone();
    plans.sort_by(|a, b| a.id.cmp(&b.id));
    all.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(plans, all, "plans() reads what load() does");

    let mut changed = k.clone();
    changed.enabled = false;
    changed.name = "renamed".into();
    store.put_key(&changed).unwrap();
    let loaded = store.load().unwrap();
    assert!(loaded.keys.contains(&changed));
    assert!(!loaded.keys.contains(&k));
}

/// `load_index` holds the same plans, keys and bindings as `load`; `keys_named` finds one of them.
pub fn index_holds_what_load_does(store: &dyn Store) {
    let p = plan("ix0001");
    store.put_plan(&p).unwrap();
    let mut off = key("ixkey00001", "index-value-0123456789");
    off.enabled = false;
    store.put_key(&off).unwrap();
    store.bind("ix0001", "ixkey00001").unwrap();
    let records = store.load().unwrap();
    let index = store.load_index().unwrap();
    let mut keys: Vec<_> = (0..index.len())
        .map(|i| (index.id(i).to_owned(), index.hash(i), index.terms(i)))
        .collect();
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    let mut want: Vec<_> = records
        .keys
        .iter()
        .map(|k| (k.id.clone(), k.value_hash, KeyTerms::of(k)))
        .collect();
    want.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(keys, want);
    let mut bindings: Vec<_> = index
        .bindings()
        .iter()
        .map(|&(p, k)| {
            (
                index.plans[p as usize].id.clone(),
                index.id(k as usize).to_owned(),
            )
        })
        .collect();
    bindings.sort();
    let mut want = records.bindings.clone();
    want.sort();
    assert_eq!(bindings, want);
    assert!(want.contains(&("ix0001".into(), "ixkey00001".into())));
    assert_eq!(
        store
            .keys_named(&["no such name", "key-ixkey00001"])
            .unwrap(),
        vec![None, Some((off.clone(), vec!["ix0001".to_string()]))],
        "keys_named finds the key and its plans"
    );
    let mut plans = index.plans.clone();
    plans.sort_by(|a, b| a.id.cmp(&b.id));
    let mut want = records.plans;
    want.sort_by(|a, b| a.id.cmp(&b.id));
    assert_eq!(plans, want);
}

/// `key` reads one key by id; `keys_from` pages through all of them in creation order (as `load`
/// and `plans` list theirs), each with a rising place; a rewrite keeps a key's place, and a deleted
/// key's is passed over.
pub fn keys_are_read_one_by_one_and_in_pages(store: &dyn Store) {
    let mut all = store.load().unwrap().keys;
    // Ids that sort against the order they are created in.
    for i in (0..7).rev() {
        let k = key(
            &format!("pgkey{i:05}"),
            &format!("paged-value-{i}-0123456789"),
        );
        store.put_key(&k).unwrap();
        all.push(k);
    }
    let at = all.len() - 7;
    all[at].name = "renamed".into();
    store.put_key(&all[at]).unwrap();
    let gone = all.remove(at + 3);
    store.delete_key(&gone.id).unwrap();
    assert_eq!(
        store.load().unwrap().keys,
        all,
        "load lists keys as created"
    );
    let third = &all[all.len() / 3];
    assert_eq!(store.key(&third.id).unwrap().as_ref(), Some(third));
    assert_eq!(store.key("no-such-key").unwrap(), None);

    // By id, more than a round trip's worth (Redis reads 16 keys a trip), missing ones between:
    // each answer in its asker's place.
    let asked: Vec<String> = (0..40)
        .map(|i| match i % 3 {
            2 => format!("missing-{i}"),
            _ => all[i % all.len()].id.clone(),
        })
        .collect();
    let refs: Vec<&str> = asked.iter().map(String::as_str).collect();
    let found = store.keys_by_id(&refs).unwrap();
    assert_eq!(found.len(), asked.len());
    for (i, (id, found)) in asked.iter().zip(found).enumerate() {
        let expected = (i % 3 != 2).then(|| &all[i % all.len()]);
        assert_eq!(found.map(|(k, _)| k).as_ref(), expected, "{id}");
    }

    // Pages of three, each asked for with one more: the extra one starts the next page.
    let mut paged = Vec::new();
    let mut from = None;
    loop {
        let mut page = store.keys_from(from, 4).unwrap();
        assert!(page.len() <= 4);
        from = (page.len() == 4)
            .then(|| page.pop().map(|(place, _)| place))
            .flatten();
        paged.extend(page);
        if from.is_none() {
            break;
        }
    }
    assert!(paged.windows(2).all(|w| w[0].0 < w[1].0), "rising places");
    let paged: Vec<ApiKey> = paged.into_iter().map(|(_, k)| k).collect();
    assert_eq!(paged, all);

    // Plans too, as created, whatever their ids.
    for id in ["zz0001", "aa0001"] {
        store.put_plan(&plan(id)).unwrap();
    }
    let ids: Vec<String> = store.plans().unwrap().into_iter().map(|p| p.id).collect();
    let (z, a) = (
        ids.iter().position(|id| id == "zz0001"),
        ids.iter().position(|id| id == "aa0001"),
    );
    assert!(z < a && a == Some(ids.len() - 1), "{ids:?}");
}

/// `put_records` (pages of many records per round trip where the backend batches) stores exactly
/// what one-at-a-time writes would, and still refuses a value another key holds.
pub fn bulk_writes_match_single_writes(store: &dyn Store) {
    let p = plan("bulk01");
    let keys: Vec<ApiKey> = (0..2500)
        .map(|i| {
            key(
                &format!("bulk{i:06}"),
                &format!("bulk-value-{i:06}-0123456789"),
            )
        })
        .collect();
    let bindings: Vec<(String, String)> =
        keys.iter().map(|k| (p.id.clone(), k.id.clone())).collect();
    let records = Records {
        plans: vec![p.clone()],
        keys: keys.clone(),
        bindings: bindings.clone(),
    };
    store.put_records(&records).unwrap();
    let loaded = store.load().unwrap();
    assert!(loaded.plans.contains(&p));
    for k in &keys {
        assert!(loaded.keys.contains(k), "{} missing", k.id);
    }
    for b in &bindings {
        assert!(loaded.bindings.contains(b), "{b:?} missing");
    }
    let clash = Records {
        plans: vec![],
        keys: vec![key("bulkclash1", "bulk-value-000007-0123456789")],
        bindings: vec![],
    };
    assert!(matches!(
        store.put_records(&clash),
        Err(StoreError::DuplicateKeyValue)
    ));
}

pub fn duplicate_values_conflict(store: &dyn Store) {
    store
        .put_key(&key("dupkey0001", "the-same-value-0123456789"))
        .unwrap();
    let err = store
        .put_key(&key("dupkey0002", "the-same-value-0123456789"))
        .unwrap_err();
    assert!(matches!(err, StoreError::DuplicateKeyValue), "{err:?}");
    // Re-putting the holder itself is not a conflict.
    store
        .put_key(&key("dupkey0001", "the-same-value-0123456789"))
        .unwrap();
}

/// `put_key_read` and `bind_read` answer the key as `keys_by_id` reads it right after: the record
/// as stored and its plans, sorted, for a new key, a rewritten one in plans, and a membership
/// already there; a value another key holds is refused and nothing is written.
pub fn writes_answer_what_a_read_finds(store: &dyn Store) {
    let read = |id: &str| store.keys_by_id(&[id]).unwrap().pop().flatten();
    for id in ["wrp2", "wrp1"] {
        store.put_plan(&plan(id)).unwrap();
    }
    let mut k = key("wrkey00001", "written-and-read-0123456789");
    k.description = Some("a \"quoted\" description,\nover two lines".into());
    let answered = store.put_key_read(&k).unwrap();
    assert_eq!(answered, Some((k.clone(), vec![])));
    assert_eq!(answered, read(&k.id));

    for p in ["wrp2", "wrp1", "wrp2"] {
        let answered = store.bind_read(p, &k.id).unwrap();
        assert_eq!(answered, read(&k.id));
    }
    assert_eq!(
        read(&k.id).map(|(_, plans)| plans),
        Some(vec!["wrp1".to_owned(), "wrp2".to_owned()])
    );

    k.name = "renamed".into();
    k.enabled = false;
    let answered = store.put_key_read(&k).unwrap();
    assert_eq!(
        answered,
        Some((k.clone(), vec!["wrp1".to_owned(), "wrp2".to_owned()]))
    );
    assert_eq!(answered, read(&k.id));
    // Unchanged: the same answer.
    assert_eq!(store.put_key_read(&k).unwrap(), answered);

    let clash = key("wrkey00002", "written-and-read-0123456789");
    let err = store.put_key_read(&clash).unwrap_err();
    assert!(matches!(err, StoreError::DuplicateKeyValue), "{err:?}");
    assert_eq!(read(&clash.id), None);
    // A membership of a key that is not there answers no key.
    assert_eq!(store.bind_read("wrp1", "wrnokey001").unwrap(), None);
    store.unbind("wrp1", "wrnokey001").unwrap();
}

pub fn bindings_are_idempotent(store: &dyn Store) {
    // Memberships are read for the plans there are (Redis keeps them by plan).
    store.put_plan(&plan("bindp1")).unwrap();
    store.bind("bindp1", "bindk00001").unwrap();
    store.bind("bindp1", "bindk00001").unwrap();
    let count = |s: &dyn Store| {
        s.load()
            .unwrap()
            .bindings
            .iter()
            .filter(|(p, k)| p == "bindp1" && k == "bindk00001")
            .count()
    };
    assert_eq!(count(store), 1);
    store.unbind("bindp1", "bindk00001").unwrap();
    store.unbind("bindp1", "bindk00001").unwrap();
    assert_eq!(count(store), 0);
}

pub fn usage_accumulates_and_filters(store: &dyn Store) {
    let d = |key: &str, day: u32, count: u64| UsageDelta {
        plan_id: "usep01".into(),
        key_id: key.into(),
        day: EpochDay(day),
        count,
        ..UsageDelta::default()
    };
    store
        .add_usage(&[d("k1", 10, 2), d("k1", 11, 1), d("k2", 10, 5)])
        .unwrap();
    store.add_usage(&[d("k1", 10, 3)]).unwrap();
    store.add_usage(&[]).unwrap();
    let used = |plan, key, from, to| {
        store
            .series(Series::Used, plan, key, EpochDay(from), EpochDay(to))
            .unwrap()
    };
    assert_eq!(
        used("usep01", None, 0, 100),
        vec![day("k1", 10, 5), day("k1", 11, 1), day("k2", 10, 5)]
    );
    assert_eq!(used("usep01", Some("k1"), 11, 11), vec![day("k1", 11, 1)]);
    assert!(used("other", None, 0, 100).is_empty());
}

pub fn refusals_and_last_use_are_kept_apart_from_usage(store: &dyn Store) {
    let refused = |key: &str, day: u32, throttled: u64, quota_exceeded: u64| UsageDelta {
        plan_id: "refp01".into(),
        key_id: key.into(),
        day: EpochDay(day),
        throttled,
        quota_exceeded,
        ..UsageDelta::default()
    };
    let seen = |key: &str, at: u64| UsageDelta {
        plan_id: "refp01".into(),
        key_id: key.into(),
        day: EpochDay((at / 86_400) as u32),
        last_used: Some(at),
        ..UsageDelta::default()
    };
    store
        .add_usage(&[
            refused("rk1", 20, 3, 0),
            refused("rk1", 21, 0, 4),
            seen("rk1", 1_800_000_060),
            refused("rk2", 20, 1, 1),
        ])
        .unwrap();
    store
        .add_usage(&[refused("rk1", 20, 2, 5), seen("rk1", 1_800_000_000)])
        .unwrap();
    let of = |series, key, from, to| {
        store
            .series(series, "refp01", key, EpochDay(from), EpochDay(to))
            .unwrap()
    };
    assert_eq!(
        of(Series::Throttled, None, 0, 100),
        vec![day("rk1", 20, 5), day("rk2", 20, 1)]
    );
    assert_eq!(
        of(Series::QuotaExceeded, None, 0, 100),
        vec![day("rk1", 20, 5), day("rk1", 21, 4), day("rk2", 20, 1)]
    );
    assert_eq!(
        of(Series::QuotaExceeded, Some("rk1"), 21, 21),
        vec![day("rk1", 21, 4)]
    );
    assert!(of(Series::Throttled, Some("rk1"), 21, 21).is_empty());
    assert!(
        of(Series::Used, None, 0, 100).is_empty(),
        "refusals are not usage"
    );
    assert_eq!(
        store.last_used(&["rk1", "rk2", "nokey"]).unwrap(),
        vec![Some(1_800_000_060), None, None],
        "the latest use is kept"
    );
}

pub fn declared_state_is_applied_by_name(store: &dyn Store) {
    let declared_plan = |name: &str, limit| DeclaredPlan {
        name: name.into(),
        description: None,
        api_stages: vec![],
        throttle: None,
        quota: Some(QuotaSettings {
            limit,
            offset: 0,
            period: Period::Day,
        }),
        tags: Default::default(),
    };
    let declared_key = |name: &str, value: Option<&str>, plans: &[&str]| DeclaredKey {
        name: name.into(),
        value: value.map(Into::into),
        description: None,
        customer_id: None,
        enabled: true,
        plans: plans.iter().map(|p| p.to_string()).collect(),
        tags: Default::default(),
        opening_credits: None,
    };
    let plans = [declared_plan("decl-a", 5), declared_plan("decl-b", 6)];
    let keys = [
        declared_key("decl-generated", None, &["decl-a"]),
        declared_key(
            "decl-given",
            Some("given-value-0123456789"),
            &["decl-a", "decl-b"],
        ),
    ];
    let seal = |id: &str, value: &str| format!("{id}:{value}").into_bytes();
    let generated = apply_declared(store, &plans, &keys, 1_800_000_000, Some(&seal)).unwrap();
    assert_eq!(generated.len(), 1);
    assert_eq!(generated[0].name, "decl-generated");
    assert_eq!(generated[0].value.len(), 40);

    let first = store.load().unwrap();
    let gen_key = first
        .keys
        .iter()
        .find(|k| k.name == "decl-generated")
        .unwrap();
    assert_eq!(gen_key.id, generated[0].id);
    assert_eq!(gen_key.value_hash, KeyHash::of(&generated[0].value));
    let sealed = format!("{}:{}", gen_key.id, generated[0].value).into_bytes();
    assert_eq!(
        gen_key.sealed_value.as_ref(),
        Some(&sealed),
        "generated values are sealed too"
    );
    let plan_a = first
        .plans
        .iter()
        .find(|p| p.name == "decl-a")
        .unwrap()
        .id
        .clone();
    let plan_b = first
        .plans
        .iter()
        .find(|p| p.name == "decl-b")
        .unwrap()
        .id
        .clone();

    // Applying again keeps ids and the generated value, updates fields and sets bindings exactly.
    let plans = [declared_plan("decl-a", 50), declared_plan("decl-b", 6)];
    let mut described = declared_key("decl-given", Some("given-value-0123456789"), &["decl-b"]);
    described.description = Some("now described".into());
    let keys = [declared_key("decl-generated", None, &["decl-a"]), described];
    assert!(
        apply_declared(store, &plans, &keys, 1_800_000_100, Some(&seal))
            .unwrap()
            .is_empty()
    );
    let second = store.load().unwrap();
    let gen_again = second
        .keys
        .iter()
        .find(|k| k.name == "decl-generated")
        .unwrap();
    assert_eq!(
        (gen_again.id.as_str(), gen_again.value_hash),
        (gen_key.id.as_str(), gen_key.value_hash)
    );
    let a = second.plans.iter().find(|p| p.name == "decl-a").unwrap();
    assert_eq!(
        (a.id.as_str(), a.quota.unwrap().limit),
        (plan_a.as_str(), 50)
    );
    let given = second.keys.iter().find(|k| k.name == "decl-given").unwrap();
    let given_plans: Vec<&str> = second
        .bindings
        .iter()
        .filter(|(_, k)| *k == given.id)
        .map(|(p, _)| p.as_str())
        .collect();
    assert_eq!(given_plans, vec![plan_b.as_str()]);
    assert_eq!(given.created_date, 1_800_000_000);
    assert_eq!(given.last_updated_date, 1_800_000_100);
    assert_eq!(given.description.as_deref(), Some("now described"));
    assert_eq!(
        gen_again.last_updated_date, 1_800_000_000,
        "an unchanged key keeps its timestamp"
    );
    // Records the file does not mention are untouched.
    assert!(second.plans.iter().any(|p| p.id == "rt0001"));
}

pub fn deletes_take_memberships_along(store: &dyn Store) {
    store.put_plan(&plan("del001")).unwrap();
    store.put_plan(&plan("del002")).unwrap();
    store
        .put_key(&key("delkey0001", "delete-me-value-0123456789"))
        .unwrap();
    store.bind("del001", "delkey0001").unwrap();
    store.bind("del002", "delkey0001").unwrap();
    let seen = UsageDelta {
        plan_id: "del002".into(),
        key_id: "delkey0001".into(),
        last_used: Some(1_800_000_000),
        ..UsageDelta::default()
    };
    store.add_usage(&[seen]).unwrap();
    store.delete_plan("del001").unwrap();
    let r = store.load().unwrap();
    assert!(!r.plans.iter().any(|p| p.id == "del001"));
    assert!(!r.bindings.iter().any(|(p, _)| p == "del001"));
    assert!(r.bindings.contains(&("del002".into(), "delkey0001".into())));
    store.delete_key("delkey0001").unwrap();
    let r = store.load().unwrap();
    assert!(!r.keys.iter().any(|k| k.id == "delkey0001"));
    assert!(!r.bindings.iter().any(|(_, k)| k == "delkey0001"));
    assert_eq!(store.last_used(&["delkey0001"]).unwrap(), vec![None]);
    // Its value is free again.
    store
        .put_key(&key("delkey0002", "delete-me-value-0123456789"))
        .unwrap();
    store.delete_key("never-existed").unwrap();
    store.delete_plan("never-existed").unwrap();
}

pub fn quota_adjustments_accumulate(store: &dyn Store) {
    store.adjust_quota("adjp01", "k1", EpochDay(20), 5).unwrap();
    store
        .adjust_quota("adjp01", "k1", EpochDay(20), -7)
        .unwrap();
    store.adjust_quota("adjp01", "k1", EpochDay(22), 1).unwrap();
    store.adjust_quota("adjp01", "k2", EpochDay(20), 3).unwrap();
    let adjusted = |key, from, to| {
        store
            .series(
                Series::QuotaAdjustment,
                "adjp01",
                key,
                EpochDay(from),
                EpochDay(to),
            )
            .unwrap()
    };
    assert_eq!(
        adjusted(None, 0, 21),
        vec![day("k1", 20, -2), day("k2", 20, 3)]
    );
    assert_eq!(adjusted(Some("k1"), 21, 30), vec![day("k1", 22, 1)]);
    // Past the range either way, an addition is refused and changes nothing.
    let max = crate::MAX_ADJUSTMENT;
    store
        .adjust_quota("adjp01", "k3", EpochDay(20), max)
        .unwrap();
    assert!(store.adjust_quota("adjp01", "k3", EpochDay(20), 1).is_err());
    assert!(
        store
            .adjust_quota("adjp01", "k3", EpochDay(20), i64::MAX)
            .is_err()
    );
    store
        .adjust_quota("adjp01", "k4", EpochDay(20), -max)
        .unwrap();
    assert!(
        store
            .adjust_quota("adjp01", "k4", EpochDay(20), i64::MIN)
            .is_err()
    );
    assert_eq!(
        adjusted(None, 20, 20)[2..],
        [day("k3", 20, max), day("k4", 20, -max)]
    );
}

pub fn customers_are_counted_apart_from_keys(store: &dyn Store) {
    let d = |customer: &str, day: u32, count: u64| CustomerDelta {
        plan_id: "cusp01".into(),
        customer_id: customer.into(),
        day: EpochDay(day),
        count,
    };
    // A customer may be named as a key is: their counts still stay apart.
    store
        .add_customer_usage(&[d("acme", 10, 2), d("acme", 11, 1), d("k1", 10, 4)])
        .unwrap();
    store
        .add_customer_usage(&[d("acme", 10, 3), d("ac}me", 10, 9), d("zero", 10, 0)])
        .unwrap();
    store
        .adjust_customer_quota("cusp01", "acme", EpochDay(11), -2)
        .unwrap();
    store
        .adjust_customer_quota("cusp01", "acme", EpochDay(11), 5)
        .unwrap();
    let of = |series, customers: &[&str], from, to| {
        store
            .customer_series(series, "cusp01", customers, EpochDay(from), EpochDay(to))
            .unwrap()
    };
    assert_eq!(
        of(
            Series::Used,
            &["k1", "acme", "ac}me", "zero", "acme"],
            0,
            99
        ),
        vec![
            day("acme", 10, 5),
            day("acme", 11, 1),
            day("ac}me", 10, 9),
            day("k1", 10, 4)
        ],
        "by customer, then day; each customer once"
    );
    assert_eq!(
        of(Series::Used, &["acme"], 11, 11),
        vec![day("acme", 11, 1)]
    );
    assert_eq!(
        of(Series::QuotaAdjustment, &["acme", "k1"], 0, 99),
        vec![day("acme", 11, 3)]
    );
    assert!(of(Series::Throttled, &["acme"], 0, 99).is_empty());
    assert!(
        store
            .series(Series::Used, "cusp01", None, EpochDay(0), EpochDay(99))
            .unwrap()
            .is_empty(),
        "no key's usage"
    );
    let max = crate::MAX_ADJUSTMENT;
    store
        .adjust_customer_quota("cusp01", "big", EpochDay(1), max)
        .unwrap();
    assert!(
        store
            .adjust_customer_quota("cusp01", "big", EpochDay(1), 1)
            .is_err()
    );
    assert_eq!(
        of(Series::QuotaAdjustment, &["big"], 0, 9),
        vec![day("big", 1, max)]
    );
}

pub fn credits_are_added_once_and_spent_down_to_zero(store: &dyn Store) {
    let balances = |s: &dyn Store| -> Vec<(String, u64, Option<EpochDay>)> {
        s.credit_balances()
            .unwrap()
            .into_iter()
            .filter(|b| b.key_id.starts_with("crk"))
            .map(|b| (b.key_id, b.balance, b.refilled))
            .collect()
    };
    assert!(balances(store).is_empty());
    assert!(store.add_credits("crk1", "order-1", 100, 1).unwrap());
    assert!(
        !store.add_credits("crk1", "order-1", 100, 2).unwrap(),
        "once per idempotency key"
    );
    assert!(store.add_credits("crk1", "order-2", 50, 3).unwrap());
    assert!(
        store.add_credits("crk2", "order-1", 7, 3).unwrap(),
        "per key"
    );
    let spend = |key: &str, day: u32, spent: u64| CreditSpend {
        key_id: key.into(),
        day: EpochDay(day),
        spent,
    };
    store
        .spend_credits(&[
            spend("crk1", 10, 30),
            spend("crk1", 11, 20),
            spend("crk2", 10, 0),
        ])
        .unwrap();
    assert_eq!(
        balances(store),
        vec![("crk1".into(), 100, None), ("crk2".into(), 7, None)]
    );
    // Spent down to exactly zero (the data plane never spends more than there is).
    store.spend_credits(&[spend("crk2", 11, 7)]).unwrap();
    // A refill's entry marks its period.
    let day = EpochDay(20_000);
    let entry = tollgate_core::credits::refill_entry(day);
    assert!(store.add_credits("crk2", &entry, 10, 4).unwrap());
    assert!(!store.add_credits("crk2", &entry, 10, 5).unwrap());
    assert_eq!(
        balances(store),
        vec![("crk1".into(), 100, None), ("crk2".into(), 10, Some(day))]
    );
}

pub fn events_are_claimed_once_and_leased_until_delivered(store: &dyn Store) {
    let event = |id: &str, next_at: i64| OutboxEvent {
        id: id.into(),
        webhook: "ops".into(),
        body: format!(r#"{{"id":"{id}"}}"#),
        created: 100,
        attempts: 0,
        next_at,
        status: EventStatus::Pending,
        last_error: None,
    };
    assert!(
        store
            .enqueue_event("claim-a", &event("evt-a", 100))
            .unwrap()
    );
    assert!(
        !store
            .enqueue_event("claim-a", &event("evt-a2", 100))
            .unwrap(),
        "claimed once"
    );
    assert!(
        store
            .enqueue_event("claim-b", &event("evt-b", 150))
            .unwrap()
    );
    let ids =
        |events: Vec<OutboxEvent>| -> Vec<String> { events.into_iter().map(|e| e.id).collect() };
    assert_eq!(ids(store.lease_events(120, 130, 10).unwrap()), ["evt-a"]);
    assert!(
        store.lease_events(125, 135, 10).unwrap().is_empty(),
        "leased"
    );
    // The lease ran out: due again.
    let leased = store.lease_events(160, 190, 10).unwrap();
    assert_eq!(ids(leased.clone()), ["evt-a", "evt-b"]);
    assert_eq!(leased[0].body, r#"{"id":"evt-a"}"#);
    store
        .record_attempt(
            "evt-a",
            &Attempt::Retry {
                at: 200,
                error: "503".into(),
            },
        )
        .unwrap();
    store.record_attempt("evt-b", &Attempt::Delivered).unwrap();
    assert_eq!(
        ids(store.events(EventStatus::Pending, 10).unwrap()),
        ["evt-a"]
    );
    let again = store.lease_events(200, 230, 10).unwrap();
    assert_eq!(
        (again[0].attempts, again[0].last_error.as_deref()),
        (1, Some("503"))
    );
    store
        .record_attempt(
            "evt-a",
            &Attempt::Failed {
                error: "refused".into(),
            },
        )
        .unwrap();
    assert!(store.lease_events(1_000, 1_030, 10).unwrap().is_empty());
    let failed = store.events(EventStatus::Failed, 10).unwrap();
    assert_eq!((failed.len(), failed[0].attempts), (1, 2));
    assert!(
        !store.retry_event("evt-b", 300).unwrap(),
        "delivered: not failed"
    );
    assert!(store.retry_event("evt-a", 300).unwrap());
    assert!(store.events(EventStatus::Failed, 10).unwrap().is_empty());
    assert_eq!(ids(store.lease_events(300, 330, 10).unwrap()), ["evt-a"]);
}

pub fn exports_commit_once_per_version(store: &dyn Store) {
    let ex = "ledger";
    assert_eq!(store.export_state(ex).unwrap(), ExportState::default());
    let mark = |day: u32, holder: &str, counts: [u64; 3]| ExportMark {
        day: EpochDay(day),
        plan_id: "p".into(),
        holder: holder.into(),
        counts,
    };
    let batch = |start: i64, end: i64| ExportBatch {
        start,
        end,
        records: format!(r#"[{{"w":{start}}}]"#),
        delivered: false,
    };
    let (b1, b2) = (
        batch(86_400 * 10, 86_400 * 10 + 60),
        batch(86_400 * 11, 86_400 * 11 + 60),
    );
    // A customer id made to break careless field names.
    let marks = [
        mark(10, "k:a", [3, 1, 0]),
        mark(10, "c:x\"] [y", [5, 0, 2]),
        mark(11, "k:a", [1, 0, 0]),
    ];
    let commit = ExportCommit {
        version: 0,
        cursor: Some(86_400 * 10 + 60),
        marks: &marks,
        batch: Some(&b1),
        keep_from: 0,
    };
    assert!(store.commit_export(ex, &commit).unwrap());
    assert!(
        !store.commit_export(ex, &commit).unwrap(),
        "the version moved on"
    );
    assert_eq!(
        store.export_state(ex).unwrap(),
        ExportState {
            version: 1,
            cursor: Some(86_400 * 10 + 60)
        }
    );
    let mut day10 = store.export_marks(ex, EpochDay(10)).unwrap();
    day10.sort_by(|a, b| a.holder.cmp(&b.holder));
    assert_eq!(day10, vec![marks[1].clone(), marks[0].clone()]);
    assert_eq!(
        store.export_marks(ex, EpochDay(11)).unwrap(),
        vec![marks[2].clone()]
    );
    assert!(
        store
            .export_marks("other", EpochDay(10))
            .unwrap()
            .is_empty()
    );

    // A commit without a cursor keeps it; a mark is replaced, not added to.
    let again = [mark(10, "k:a", [4, 1, 0])];
    let commit = ExportCommit {
        version: 1,
        cursor: None,
        marks: &again,
        batch: Some(&b2),
        keep_from: 0,
    };
    assert!(store.commit_export(ex, &commit).unwrap());
    assert_eq!(
        store.export_state(ex).unwrap().cursor,
        Some(86_400 * 10 + 60)
    );
    assert!(
        store
            .export_marks(ex, EpochDay(10))
            .unwrap()
            .contains(&again[0])
    );
    let window_exists = ExportCommit {
        version: 2,
        cursor: None,
        marks: &[],
        batch: Some(&b2),
        keep_from: 0,
    };
    assert!(
        store.commit_export(ex, &window_exists).is_err(),
        "a window is made once"
    );

    let all = store.export_batches(ex, 0, i64::MAX, false).unwrap();
    assert_eq!(all, vec![b1.clone(), b2.clone()]);
    store.export_delivered(ex, b1.start, b1.end).unwrap();
    assert_eq!(
        store.export_batches(ex, 0, i64::MAX, true).unwrap(),
        vec![b2.clone()]
    );
    let delivered = ExportBatch {
        delivered: true,
        ..b1.clone()
    };
    assert_eq!(
        store
            .export_batches(ex, b1.start, b1.start + 1, false)
            .unwrap(),
        vec![delivered]
    );
    assert!(
        store
            .export_batches(ex, b1.start + 1, b2.start, false)
            .unwrap()
            .is_empty()
    );

    // Old windows and marks age out.
    let version = store.export_state(ex).unwrap().version;
    let prune = ExportCommit {
        version,
        cursor: None,
        marks: &[],
        batch: None,
        keep_from: 86_400 * 11,
    };
    assert!(store.commit_export(ex, &prune).unwrap());
    assert_eq!(
        store.export_batches(ex, 0, i64::MAX, false).unwrap(),
        vec![b2]
    );
    assert!(store.export_marks(ex, EpochDay(10)).unwrap().is_empty());
    assert_eq!(store.export_marks(ex, EpochDay(11)).unwrap().len(), 1);
}
