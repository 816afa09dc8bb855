use std::time::{Duration, Instant};

use serde_json::json;
use tollgate_store::testing::{RedisCluster, RedisServer};

use crate::util::{self, AdminClient, Gateway, KEY, client};

const PLANS: &str = r#"usagePlans:
  - name: shared
    apiStages: [ { apiId: warranty, stage: prod } ]
    throttle: { rateLimit: 0.01, burstLimit: 10 }
    quota: { limit: 25, period: DAY }
  - name: quota-only
    apiStages: [ { apiId: warranty, stage: dev } ]
    quota: { limit: 40, period: DAY }
  - name: trial
    enforcement: shadow
    apiStages: [ { apiId: warranty, stage: dev } ]
    quota: { limit: 5, period: DAY }
  - name: acme-shared
    limitsShareBy: customerId
    apiStages:
      - apiId: warranty
        stage: partner
        throttle: { "/registrations/{id}/warranty/PUT": { rateLimit: 0.01, burstLimit: 10 } }
    throttle: { rateLimit: 1000, burstLimit: 1000 }
    quota: { limit: 30, period: DAY }
apiKeys:
  - { name: central-system, value: "${CENTRAL_KEY}", usagePlans: [shared] }
  - { name: quota-key, value: quotaKeyValue0123456789abc, usagePlans: [quota-only] }
  - { name: acme-a, value: acmeKeyAValue0123456789, customerId: acme, usagePlans: [acme-shared] }
  - { name: acme-b, value: acmeKeyBValue0123456789, customerId: acme, usagePlans: [acme-shared] }
  - { name: prepaid, value: prepaidKeyValue0123456789, usagePlans: [quota-only], credits: { balance: 25 } }
  - { name: trial, value: trialKeyValue0123456789abc, usagePlans: [trial] }
"#;

/// The two keys of the customer `acme`, which share `acme-shared`'s limits.
const ACME: [&str; 2] = ["acmeKeyAValue0123456789", "acmeKeyBValue0123456789"];

/// The common test config, on Redis instead of SQLite, with a second stage for the quota-only plan
/// and a third for the customer's.
fn yaml(upstream: &str, store: &str) -> String {
    util::config(
        upstream,
        &format!("admin: {{ listen: 127.0.0.1:0 }}\n{PLANS}"),
    )
    .replace(
        "store: { sqlite: ./tollgate.db, flushInterval: 200ms }",
        store,
    )
    .replace(
        "      - name: prod\n",
        "      - name: prod\n      - name: dev\n      - name: partner\n",
    )
}

async fn two_instances(store: &str) -> (Vec<tempfile::TempDir>, Vec<Gateway>, util::Upstream) {
    let up = util::upstream().await;
    let mut dirs = Vec::new();
    let mut gws = Vec::new();
    for _ in 0..2 {
        let dir = tempfile::tempdir().unwrap();
        util::write_config(dir.path(), &yaml(&format!("http://{}", up.addr), store));
        gws.push(Gateway::start(dir.path(), &util::admin_env()));
        dirs.push(dir);
    }
    (dirs, gws, up)
}

/// Fires `n` GETs, alternating between the instances, `parallel` at a time; counts statuses.
async fn fire(
    gws: &[Gateway],
    path: &str,
    key: &str,
    n: usize,
    parallel: usize,
) -> std::collections::BTreeMap<u16, usize> {
    fire_keys(gws, ("GET", path), &[key], n, parallel).await
}

/// Fires `n` requests, alternating between the instances and, every other request, between
/// `keys`, `parallel` at a time; counts statuses.
async fn fire_keys(
    gws: &[Gateway],
    (method, path): (&'static str, &str),
    keys: &[&str],
    n: usize,
    parallel: usize,
) -> std::collections::BTreeMap<u16, usize> {
    let urls: Vec<String> = gws.iter().map(|g| g.url(path)).collect();
    let mut counts = std::collections::BTreeMap::new();
    let c = std::sync::Arc::new(client());
    for chunk in (0..n).collect::<Vec<_>>().chunks(parallel) {
        let tasks: Vec<_> = chunk
            .iter()
            .map(|i| {
                let url = urls[i % urls.len()].clone();
                let key = keys[i / urls.len() % keys.len()].to_string();
                let c = c.clone();
                tokio::spawn(async move {
                    c.send(method, &url, &[("x-api-key", &key)], "")
                        .await
                        .status
                })
            })
            .collect();
        for t in tasks {
            *counts.entry(t.await.unwrap()).or_insert(0) += 1;
        }
    }
    counts
}

fn redis_store(urls: &str, cluster: bool, extra: &str) -> String {
    format!(
        "store: {{ redis: {{ url: {urls}, cluster: {cluster}, timeout: 200ms }}, flushInterval: 200ms{extra} }}"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_share_exact_limits() {
    let redis = RedisServer::start();
    let (_dirs, gws, _up) =
        two_instances(&redis_store(&format!("\"{}\"", redis.url()), false, "")).await;

    // Quota: exactly `limit` between them, whatever the interleaving.
    let counts = fire(&gws, "/dev/echo/q", "quotaKeyValue0123456789abc", 100, 8).await;
    assert_eq!(counts.get(&200), Some(&40), "{counts:?}");
    assert_eq!(counts.get(&429), Some(&60), "{counts:?}");

    // Burst: one bucket of 10 for both (refill is one token per 100 s).
    let counts = fire(&gws, "/prod/echo/b", KEY, 30, 10).await;
    let admitted = counts.get(&200).copied().unwrap_or(0);
    assert!((10..=11).contains(&admitted), "{counts:?}");

    // Usage is counted in Redis: either instance's GetUsage sees all of it.
    let admin = AdminClient::new(gws[1].admin.unwrap());
    let plan_id = admin.plan_id("quota-only").await;
    let usage = admin.usage_today(&plan_id).await;
    let mut values: Vec<&serde_json::Value> =
        usage["values"].as_object().unwrap().values().collect();
    values.sort_by_key(|v| v.to_string());
    assert_eq!(
        values,
        vec![&json!([[0, 40]]), &json!([[40, 0]])],
        "the other key: unused"
    );
    // The refusals both instances counted, and the key's last use, are in Redis too: the other
    // instance's within its flush interval.
    let today = util::today();
    let detail_path =
        format!("/tollgate/usageplans/{plan_id}/usage?startDate={today}&endDate={today}");
    let expected = json!([{"used": 40, "remaining": 0, "throttled": 0, "quotaExceeded": 60}]);
    let mut detail = json!(null);
    for _ in 0..50 {
        detail = admin.ok("GET", &detail_path, "").await;
        if detail["values"]
            .as_object()
            .unwrap()
            .values()
            .any(|d| d == &expected)
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let (key_id, days) = detail["values"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(_, days)| days[0]["used"] != 0)
        .unwrap();
    assert_eq!(days, &expected);
    let key = admin.ok("GET", &format!("/apikeys/{key_id}"), "").await;
    assert!(key["lastUsedDate"].as_u64().is_some(), "{key}");
}

/// Two keys of one customer hammer two instances at once: never more than the customer's limits.
async fn a_customers_keys_share_exact_limits(gws: &[Gateway]) {
    // The per-method bucket of 10 (one token per 100 s) is the customer's, on both instances.
    let put = ("PUT", "/partner/registrations/7/warranty");
    let counts = fire_keys(gws, put, &ACME, 40, 10).await;
    let burst = counts.get(&200).copied().unwrap_or(0);
    assert!((10..=11).contains(&burst), "{counts:?}");
    // The quota of 30: what the burst left, exactly, whichever key and instance asks.
    let counts = fire_keys(gws, ("GET", "/partner/echo/q"), &ACME, 80, 8).await;
    assert_eq!(counts.get(&200), Some(&(30 - burst)), "{counts:?}");
    // The customer's total is counted in Redis: either instance sees all of it at once. Each key's
    // own count is metered by the instance that admitted it: the other one's within its flush
    // interval.
    let admin = AdminClient::new(gws[1].admin.unwrap());
    let plan_id = admin.plan_id("acme-shared").await;
    let today = util::today();
    let path = format!(
        "/tollgate/usageplans/{plan_id}/customers/acme/usage?startDate={today}&endDate={today}"
    );
    let report = admin.ok("GET", &path, "").await;
    assert_eq!(report["items"], json!([[30, 0]]), "{report}");
    let per_key = |report: &serde_json::Value| -> u64 {
        report["values"]
            .as_object()
            .unwrap()
            .values()
            .map(|days| days[0][0].as_u64().unwrap())
            .sum()
    };
    let mut report = report;
    for _ in 0..50 {
        if per_key(&report) == 30 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        report = admin.ok("GET", &path, "").await;
    }
    assert_eq!(per_key(&report), 30, "{report}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_spend_credits_to_exactly_zero() {
    let redis = RedisServer::start();
    let (_dirs, gws, _up) =
        two_instances(&redis_store(&format!("\"{}\"", redis.url()), false, "")).await;
    let counts = fire(&gws, "/dev/echo/p", "prepaidKeyValue0123456789", 60, 12).await;
    assert_eq!(counts.get(&200), Some(&25), "{counts:?}");
    assert_eq!(counts.get(&429), Some(&35), "{counts:?}");
    // Zero, never below, from either instance; a top-up through one is spent through the other.
    let admin = AdminClient::new(gws[0].admin.unwrap());
    let keys = admin.ok("GET", "/apikeys?name=prepaid", "").await;
    let id = keys["item"][0]["id"].as_str().unwrap().to_owned();
    let key = admin.ok("GET", &format!("/apikeys/{id}"), "").await;
    assert_eq!(key["credits"]["balance"], 0, "{key}");
    let body = r#"{"add": 3, "idempotencyKey": "order-7"}"#;
    admin
        .ok("POST", &format!("/tollgate/apikeys/{id}/credits"), body)
        .await;
    let counts = fire(&gws[1..], "/dev/echo/p", "prepaidKeyValue0123456789", 5, 1).await;
    assert_eq!(counts.get(&200), Some(&3), "{counts:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn two_instances_share_a_customers_exact_limits() {
    let redis = RedisServer::start();
    let (_dirs, gws, _up) =
        two_instances(&redis_store(&format!("\"{}\"", redis.url()), false, "")).await;
    a_customers_keys_share_exact_limits(&gws).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn an_admin_change_on_one_instance_reaches_the_other_within_a_second() {
    let redis = RedisServer::start();
    let (_dirs, gws, _up) =
        two_instances(&redis_store(&format!("\"{}\"", redis.url()), false, "")).await;
    let a = AdminClient::new(gws[0].admin.unwrap());
    let key = a
        .ok(
            "POST",
            "/apikeys",
            r#"{"name":"fresh","enabled":true,"value":"freshKeyValue0123456789abc"}"#,
        )
        .await;
    let plan_id = a.plan_id("quota-only").await;
    a.ok(
        "POST",
        &format!("/usageplans/{plan_id}/keys"),
        &json!({"keyId": key["id"], "keyType": "API_KEY"}).to_string(),
    )
    .await;

    let started = Instant::now();
    let c = client();
    loop {
        let status = c
            .get(
                &gws[1].url("/dev/echo/fresh"),
                Some("freshKeyValue0123456789abc"),
            )
            .await
            .status;
        if status == 200 {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "instance B still answers {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // And a disabled key is refused by the other instance too.
    a.ok(
        "PATCH",
        &format!("/apikeys/{}", key["id"].as_str().unwrap()),
        r#"{"patchOperations":[{"op":"replace","path":"/enabled","value":"false"}]}"#,
    )
    .await;
    let started = Instant::now();
    while c
        .get(
            &gws[1].url("/dev/echo/fresh"),
            Some("freshKeyValue0123456789abc"),
        )
        .await
        .status
        != 403
    {
        assert!(started.elapsed() < Duration::from_secs(1));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // It came by the change announcement (pub/sub), not by the periodic check.
    assert!(
        gws[1].stderr().contains("\"announced\":true"),
        "{}",
        gws[1].stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_written_on_one_instance_are_read_alone_by_the_other() {
    let redis = RedisServer::start();
    let (dirs, gws, _up) =
        two_instances(&redis_store(&format!("\"{}\"", redis.url()), false, "")).await;
    let a = AdminClient::new(gws[0].admin.unwrap());
    let (url, value) = (gws[1].url("/dev/echo/alone"), "aloneKeyValue0123456789abcd");
    let full = |gw: &Gateway| {
        gw.stderr()
            .matches("records changed in Redis; reloaded")
            .count()
    };
    let alone = |gw: &Gateway| gw.stderr().matches("keys changed in Redis; served").count();
    let reloaded = full(&gws[1]);

    // A key and its plan: served by the other instance at once, read alone.
    let key = a
        .ok(
            "POST",
            "/apikeys",
            &json!({"name": "alone", "enabled": true, "value": value}).to_string(),
        )
        .await;
    let key_id = key["id"].as_str().unwrap().to_owned();
    let plan_id = a.plan_id("quota-only").await;
    a.ok(
        "POST",
        &format!("/usageplans/{plan_id}/keys"),
        &json!({"keyId": key_id, "keyType": "API_KEY"}).to_string(),
    )
    .await;
    until_status(&url, value, 200).await;
    // Deleted: refused at once.
    a.ok("DELETE", &format!("/apikeys/{key_id}"), "").await;
    until_status(&url, value, 403).await;
    assert_eq!(full(&gws[1]), reloaded, "{}", gws[1].stderr());
    assert!(alone(&gws[1]) >= 2, "{}", gws[1].stderr());
    // The writing instance does not read everything again for its own writes either.
    assert_eq!(full(&gws[0]), 0, "{}", gws[0].stderr());

    // A plan's change reads everything again.
    a.ok(
        "PATCH",
        &format!("/usageplans/{plan_id}"),
        r#"{"patchOperations":[{"op":"replace","path":"/description","value":"changed"}]}"#,
    )
    .await;
    let started = Instant::now();
    while full(&gws[1]) == reloaded {
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{}",
            gws[1].stderr()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // A change the log does not hold (made by an older tollgate, or the log lost): the other
    // instance reads everything at its next look, and serves what changed.
    let mut c = redis::Client::open(redis.url())
        .unwrap()
        .get_connection()
        .unwrap();
    let reloaded = full(&gws[1]);
    redis::cmd("INCR")
        .arg(tollgate_store::redis::keys::VERSION)
        .query::<i64>(&mut c)
        .unwrap();
    let later = "laterKeyValue0123456789abcd";
    let key = a
        .ok(
            "POST",
            "/apikeys",
            &json!({"name": "later", "enabled": true, "value": later}).to_string(),
        )
        .await;
    a.ok(
        "POST",
        &format!("/usageplans/{plan_id}/keys"),
        &json!({"keyId": key["id"], "keyType": "API_KEY"}).to_string(),
    )
    .await;
    until_status(&url.replace("alone", "later"), later, 200).await;
    assert!(full(&gws[1]) > reloaded, "{}", gws[1].stderr());

    // An instance starting now reads the pages, which are the records: it serves the keys
    // written since.
    let dir = tempfile::tempdir().unwrap();
    let config = std::fs::read_to_string(dirs[0].path().join("tollgate.yaml")).unwrap();
    util::write_config(dir.path(), &config);
    let third = Gateway::start(dir.path(), &util::admin_env());
    until_status(&third.url("/dev/echo/later"), later, 200).await;
}

/// Waits (at most a second) until `url` answers `status` to `value`.
async fn until_status(url: &str, value: &str, status: u16) {
    let (c, started) = (client(), Instant::now());
    loop {
        let got = c.get(url, Some(value)).await.status;
        if got == status {
            return;
        }
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{value}: still {got}, not {status}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rotation_on_one_instance_is_honoured_by_the_other_to_the_same_instant() {
    let redis = RedisServer::start();
    let (_dirs, gws, _up) =
        two_instances(&redis_store(&format!("\"{}\"", redis.url()), false, "")).await;
    let (a, b) = (
        AdminClient::new(gws[0].admin.unwrap()),
        AdminClient::new(gws[1].admin.unwrap()),
    );
    let old = "rotatingKeyValue0123456789";
    let key = a
        .ok(
            "POST",
            "/apikeys",
            &json!({"name": "rotating", "enabled": true, "value": old}).to_string(),
        )
        .await;
    let id = key["id"].as_str().unwrap();
    let plan_id = a.plan_id("quota-only").await;
    a.ok(
        "POST",
        &format!("/usageplans/{plan_id}/keys"),
        &json!({"keyId": id, "keyType": "API_KEY"}).to_string(),
    )
    .await;
    let on_b = gws[1].url("/dev/echo/rotating");
    until_status(&on_b, old, 200).await;
    let r = client().get(&on_b, Some(old)).await;
    assert_eq!(util::quota_remaining(&r), 38, "40, less two");

    // Rotated on A: B takes the new value and keeps the old one until the same instant.
    let new = "rotatedKeyValue0123456789";
    let rotate = format!("/tollgate/apikeys/{id}/rotate");
    let rotated = a
        .ok(
            "POST",
            &rotate,
            &json!({"value": new, "graceSeconds": 3600}).to_string(),
        )
        .await;
    until_status(&on_b, new, 200).await;
    let r = client().get(&on_b, Some(old)).await;
    assert_eq!(r.status, 200, "the old value on B, in its grace");
    let r = client()
        .get(&gws[0].url("/dev/echo/rotating"), Some(new))
        .await;
    assert_eq!(
        util::quota_remaining(&r),
        35,
        "one quota count, in Redis, for both values"
    );
    let seen_by_b = b.ok("GET", &format!("/apikeys/{id}"), "").await;
    assert_eq!(
        seen_by_b["previousValueExpiresAt"],
        rotated["previousValueExpiresAt"]
    );

    // Rotated again with no grace: both older values are refused on B as on A.
    let third = "thirdRotatedValue0123456789";
    a.ok(
        "POST",
        &rotate,
        &json!({"value": third, "graceSeconds": 0}).to_string(),
    )
    .await;
    until_status(&on_b, third, 200).await;
    for gone in [old, new] {
        until_status(&on_b, gone, 403).await;
        let r = client()
            .get(&gws[0].url("/dev/echo/rotating"), Some(gone))
            .await;
        assert_eq!(r.status, 403);
    }
}

/// Kills Redis under traffic: each mode behaves as configured, no request hangs, and the instance
/// returns to Redis by itself.
#[tokio::test(flavor = "multi_thread")]
async fn store_failure_modes_and_recovery() {
    for (mode, expect_while_down) in [("local", 200), ("allow", 200), ("deny", 503)] {
        let mut redis = RedisServer::start();
        let up = util::upstream().await;
        let dir = tempfile::tempdir().unwrap();
        let store = redis_store(
            &format!("\"{}\"", redis.url()),
            false,
            &format!(", onStoreFailure: {mode}"),
        );
        util::write_config(dir.path(), &yaml(&format!("http://{}", up.addr), &store));
        let gw = Gateway::start(dir.path(), &util::admin_env());
        let c = client();
        let url = gw.url("/dev/echo/f");
        let key = "quotaKeyValue0123456789abc";
        for _ in 0..5 {
            assert_eq!(c.get(&url, Some(key)).await.status, 200, "{mode}");
        }
        redis.kill();
        for _ in 0..10 {
            let started = Instant::now();
            let r = c.get(&url, Some(key)).await;
            assert_eq!(r.status, expect_while_down, "{mode} while Redis is down");
            if r.status == 503 {
                assert_eq!(
                    r.header("x-amzn-errortype"),
                    Some("ServiceUnavailableException")
                );
            }
            assert!(
                started.elapsed() < Duration::from_secs(2),
                "{mode}: a request waited {:?}",
                started.elapsed()
            );
        }
        // Back on the same port: shared limits again, by itself. The quota count in Redis picks up
        // where it was (5), so the key has 35 left at most.
        let admin_url = |path: &str| format!("http://{}{path}", gw.admin.unwrap());
        let health = c.get(&admin_url("/health"), None).await;
        assert_eq!(
            health.status,
            if mode == "deny" { 503 } else { 200 },
            "{mode}"
        );
        assert_eq!(health.json()["status"], "degraded");
        assert_eq!(health.json()["onStoreFailure"], mode);
        let metrics =
            String::from_utf8(c.get(&admin_url("/metrics"), None).await.body.to_vec()).unwrap();
        assert!(metrics.contains("tollgate_store_degraded 1"), "{metrics}");
        let series = |name: &str| -> f64 {
            let line = metrics.lines().find(|l| l.starts_with(name));
            let value = line.and_then(|l| l.rsplit_once(' '));
            value.map_or(0.0, |(_, v)| v.parse().unwrap())
        };
        let decide = r#"{operation="decide"}"#;
        let errors = series(&format!("tollgate_store_operation_errors_total{decide} "));
        let calls = series(&format!(
            "tollgate_store_operation_duration_seconds_count{decide} "
        ));
        assert!(errors >= 1.0 && calls >= errors, "{metrics}");
        redis.restart();
        // Back on Redis: its quota count picks up where it was (5 used of 40), so a request decided
        // there reports 34 left; one decided locally could not know that.
        let started = Instant::now();
        loop {
            let r = c.get(&url, Some(key)).await;
            assert!(
                r.status == 200 || r.status == expect_while_down,
                "{mode}: {} {:?} {:?}",
                r.status,
                r.headers,
                r.body
            );
            // (allow mode's fail-open answers carry no limits to report)
            if r.status == 200 && r.header("ratelimit").is_some() && util::quota_remaining(&r) == 34
            {
                break;
            }
            assert!(
                started.elapsed() < Duration::from_secs(5),
                "{mode}: not back on Redis: {}",
                r.status
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        assert!(
            gw.stderr().contains("redis is unavailable"),
            "{mode}: the failure is logged"
        );
        assert!(
            gw.stderr().contains("redis is reachable again"),
            "{mode}: the recovery is logged"
        );
        drop(gw);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_cluster_works() {
    let cluster = RedisCluster::start(3);
    let urls = format!(
        "[{}]",
        cluster
            .urls()
            .iter()
            .map(|u| format!("\"{u}\""))
            .collect::<Vec<_>>()
            .join(", ")
    );
    let (_dirs, gws, _up) = two_instances(&redis_store(&urls, true, "")).await;
    let counts = fire(&gws, "/dev/echo/c", "quotaKeyValue0123456789abc", 60, 6).await;
    assert_eq!(counts.get(&200), Some(&40), "{counts:?}");
    let counts = fire(&gws, "/prod/echo/c", KEY, 20, 10).await;
    assert!(
        (10..=11).contains(&counts.get(&200).copied().unwrap_or(0)),
        "{counts:?}"
    );
    a_customers_keys_share_exact_limits(&gws).await;
    // Credits to exactly zero, and a plan in shadow, on the cluster too.
    let counts = fire(&gws, "/dev/echo/p", "prepaidKeyValue0123456789", 40, 8).await;
    assert_eq!(counts.get(&200), Some(&25), "{counts:?}");
    let counts = fire(&gws, "/dev/echo/t", "trialKeyValue0123456789abc", 12, 4).await;
    assert_eq!(counts.get(&200), Some(&12), "in shadow: {counts:?}");
    let mut would_have = 0.0;
    for gw in &gws {
        let metrics = gw.metrics().await;
        let line = metrics
            .lines()
            .find(|l| l.contains("decision=\"shadow_quota_exceeded\""))
            .unwrap_or("x 0");
        would_have += line.rsplit(' ').next().unwrap().parse::<f64>().unwrap();
    }
    assert_eq!(would_have, 7.0, "12 let through, 5 within the quota");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_from_sqlite_keeps_keys_plans_and_usage() {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let sqlite = yaml(
        &format!("http://{}", up.addr),
        "store: { sqlite: ./tollgate.db, flushInterval: 200ms }",
    );
    util::write_config(dir.path(), &sqlite);
    let gw = Gateway::start(dir.path(), &util::admin_env());
    let c = client();
    let key = "quotaKeyValue0123456789abc";
    for _ in 0..7 {
        assert_eq!(c.get(&gw.url("/dev/echo/m"), Some(key)).await.status, 200);
    }
    for _ in 0..2 {
        let r = c
            .get(&gw.url("/dev/echo/m"), Some("prepaidKeyValue0123456789"))
            .await;
        assert_eq!(r.status, 200);
    }
    // The customer's shared count moves too.
    for _ in 0..5 {
        let r = c.get(&gw.url("/partner/echo/m"), Some(ACME[0])).await;
        assert_eq!(r.status, 200);
    }
    // A key created through the admin API: only its hash exists, and it must still work afterwards.
    let admin = AdminClient::new(gw.admin.unwrap());
    let created = admin
        .ok(
            "POST",
            "/apikeys",
            r#"{"name":"api-made","enabled":true,"value":"apiMadeKeyValue0123456789",
                "tags":{"team":"b"},"expiresAt":"2099-01-01T00:00:00Z"}"#,
        )
        .await;
    let plan_id = admin.plan_id("quota-only").await;
    admin
        .ok(
            "POST",
            &format!("/usageplans/{plan_id}/keys"),
            &json!({"keyId": created["id"], "keyType": "API_KEY"}).to_string(),
        )
        .await;
    // Rotated, its old value in a grace period of an hour.
    let created_id = created["id"].as_str().unwrap();
    let rotate = format!("/tollgate/apikeys/{created_id}/rotate");
    let body = r#"{"value":"rotatedApiMadeValue0123456789","graceSeconds":3600}"#;
    let before = admin.ok("POST", &rotate, body).await;
    assert!(gw.terminate().success());

    let redis = RedisServer::start();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "migrate",
            "--from",
            &format!("sqlite:{}", dir.path().join("tollgate.db").display()),
            "--to",
            &redis.url(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("4 usage plans, 7 API keys"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    let on_redis = sqlite.replace(
        "store: { sqlite: ./tollgate.db, flushInterval: 200ms }",
        &redis_store(&format!("\"{}\"", redis.url()), false, ""),
    );
    util::write_config(dir.path(), &on_redis);
    let gw = Gateway::start(dir.path(), &util::admin_env());
    let r = c.get(&gw.url("/dev/echo/m"), Some(key)).await;
    assert_eq!(r.status, 200);
    assert_eq!(
        util::quota_remaining(&r),
        32,
        "40 - 7 used before the move - this one"
    );
    let r = c.get(&gw.url("/partner/echo/m"), Some(ACME[1])).await;
    assert_eq!(
        (r.status, util::quota_remaining(&r)),
        (200, 24),
        "30 - 5 the customer's other key used before the move - this one"
    );
    // Credits move with their balance: 25 less the 2 spent before the move.
    let r = c
        .get(&gw.url("/dev/echo/m"), Some("prepaidKeyValue0123456789"))
        .await;
    assert_eq!(
        r.header("ratelimit")
            .map(|h| h.contains("\"credits\";r=22")),
        Some(true)
    );
    for value in ["apiMadeKeyValue0123456789", "rotatedApiMadeValue0123456789"] {
        let r = c.get(&gw.url("/dev/echo/m"), Some(value)).await;
        assert_eq!(
            r.status, 200,
            "{value}: the new value and the old one in its grace"
        );
    }
    // Tags, the expiry, the value's first characters and the grace came along.
    let admin = AdminClient::new(gw.admin.unwrap());
    let after = admin.ok("GET", &format!("/apikeys/{created_id}"), "").await;
    for field in [
        "tags",
        "expiresAt",
        "valuePrefix",
        "valueLength",
        "previousValueExpiresAt",
    ] {
        assert_eq!(after[field], before[field], "{field}");
    }
    assert_eq!(after["valuePrefix"], "rota");
    assert!(after["lastUsedDate"].is_u64(), "{after}");
    // Migrating into a store that has keys is refused.
    let again = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "migrate",
            "--from",
            &format!("sqlite:{}", dir.path().join("tollgate.db").display()),
            "--to",
            &redis.url(),
        ])
        .output()
        .unwrap();
    assert!(!again.status.success());
}

/// How many times an instance logged serving records another instance changed (all of them read
/// again, or the changed keys alone).
fn reloads(gw: &Gateway) -> usize {
    let log = gw.stderr();
    log.matches("records changed in Redis; reloaded").count()
        + log.matches("keys changed in Redis; served").count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_fleet_restart_writes_nothing_and_a_burst_is_one_reload() {
    let redis = RedisServer::start();
    let up = util::upstream().await;
    let mut config = yaml(
        &format!("http://{}", up.addr),
        &redis_store(&format!("\"{}\"", redis.url()), false, ""),
    );
    // 1,001 declared keys (with the file's own two).
    for i in 0..999 {
        config.push_str(&format!(
            "  - {{ name: fleet{i}, value: fleetKeyValue{i:020}, usagePlans: [shared] }}\n"
        ));
    }
    let version = || -> u64 {
        let mut c = redis::Client::open(redis.url())
            .unwrap()
            .get_connection()
            .unwrap();
        redis::cmd("GET")
            .arg(tollgate_store::redis::keys::VERSION)
            .query::<Option<u64>>(&mut c)
            .unwrap()
            .unwrap_or(0)
    };
    let dirs: Vec<tempfile::TempDir> = (0..2).map(|_| tempfile::tempdir().unwrap()).collect();
    for dir in &dirs {
        util::write_config(dir.path(), &config);
    }
    let first = Gateway::start(dirs[0].path(), &util::admin_env());
    let before = version();
    // A second instance with the same config, as in a rolling restart.
    let second = Gateway::start(dirs[1].path(), &util::admin_env());
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(version(), before, "an unchanged config wrote records");
    assert_eq!(reloads(&first), 0, "{}", first.stderr());
    assert_eq!(
        client()
            .get(
                &second.url("/prod/echo/x"),
                Some("fleetKeyValue00000000000000000998")
            )
            .await
            .status,
        200
    );

    // A burst of record changes on one instance: the other reloads once for the announced batch (and
    // at most once more, should its periodic check land in the middle of the batch).
    let mut csv = String::from("name,key,usageplanids\n");
    let plan = AdminClient::new(second.admin.unwrap())
        .plan_id("shared")
        .await;
    for i in 0..2000 {
        csv.push_str(&format!("burst{i},burstKeyValue{i:020},{plan}\n"));
    }
    let out = AdminClient::new(second.admin.unwrap())
        .ok("POST", "/apikeys?mode=import&format=csv", &csv)
        .await;
    assert_eq!(out["ids"].as_array().unwrap().len(), 2000);
    let deadline = Instant::now() + Duration::from_secs(10);
    while client()
        .get(
            &first.url("/prod/echo/x"),
            Some("burstKeyValue00000000000000001999"),
        )
        .await
        .status
        != 200
    {
        assert!(
            Instant::now() < deadline,
            "the import never reached the first instance"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let n = reloads(&first);
    assert!((1..=2).contains(&n), "{n} reloads for one import");
}
