//! Partner accounts: keys used only from their networks (IPv4 and IPv6, behind trusted proxies and
//! not, and through the decision endpoint), and routes that cost more than one request; on SQLite
//! and on a real redis-server, across restarts.

use serde_json::json;

use crate::util::{self, Gateway, client};

const V4_KEY: &str = "loopbackV4KeyValue0123456789";
const V6_KEY: &str = "loopbackV6KeyValue0123456789";
const PARTNER_KEY: &str = "partnerOfficeKeyValue0123456789";

/// A gateway on every address (IPv4 and IPv6), `store` its store, trusting `::1` as a proxy: keys
/// for 127.0.0.0/8 only, for ::1 only, and for 203.0.113.0/24 only (a partner's office, reached
/// through the proxy); a decision endpoint in Envoy's convention.
fn gateway(up: &util::Upstream, dir: &std::path::Path, store: &str) -> Gateway {
    let extra = "admin: { listen: 127.0.0.1:0 }\ntrustedProxies: [\"::1/128\"]\n\
        accessLog: { path: access.log }\n\
        verify: { listen: 127.0.0.1:0, proxy: envoy }\n\
        usagePlans:\n  - { name: partners, apiStages: [ { apiId: warranty, stage: prod } ] }\n\
        apiKeys:\n\
        \x20 - { name: v4, value: loopbackV4KeyValue0123456789, usagePlans: [partners], allowedSourceIps: [127.0.0.0/8] }\n\
        \x20 - { name: v6, value: loopbackV6KeyValue0123456789, usagePlans: [partners], allowedSourceIps: [\"::1\"] }\n\
        \x20 - { name: partner, value: partnerOfficeKeyValue0123456789, usagePlans: [partners], allowedSourceIps: [\"203.0.113.0/24\", \"2001:db8::/32\"] }\n";
    let yaml = util::config(&format!("http://{}", up.addr), extra)
        .replace("listen: 127.0.0.1:0\nstore:", "listen: \"[::]:0\"\nstore:")
        .replace(
            "store: { sqlite: ./tollgate.db, flushInterval: 200ms }",
            store,
        );
    util::write_config(dir, &yaml);
    Gateway::start(dir, &util::admin_env())
}

/// Each key from where it may and may not be used, directly and behind the trusted proxy; the
/// access log in `dir` names the client the proxy named.
async fn allowlists_hold(gw: &Gateway, dir: &std::path::Path) {
    let c = client();
    let port = gw.addr.port();
    let v4 = |path: &str| format!("http://127.0.0.1:{port}{path}");
    let v6 = |path: &str| format!("http://[::1]:{port}{path}");
    let forbidden = (403, json!({ "message": "Forbidden" }));
    let status = |r: util::Reply| (r.status, r.json());

    assert_eq!(c.get(&v4("/prod/echo/a"), Some(V4_KEY)).await.status, 200);
    assert_eq!(
        status(c.get(&v6("/prod/echo/a"), Some(V4_KEY)).await),
        forbidden
    );
    // ::1 is a trusted proxy that names nobody before it: it is the client.
    assert_eq!(c.get(&v6("/prod/echo/a"), Some(V6_KEY)).await.status, 200);
    assert_eq!(
        status(c.get(&v4("/prod/echo/a"), Some(V6_KEY)).await),
        forbidden
    );

    let via = |url: String, chain: &'static [&'static str]| {
        let c = client();
        async move {
            let mut headers = vec![("x-api-key", PARTNER_KEY)];
            headers.extend(chain.iter().map(|hop| ("x-forwarded-for", *hop)));
            c.send("GET", &url, &headers, "").await
        }
    };
    // Through the trusted proxy, from the office: let through, and the backend reads the chain
    // that was checked.
    let r = via(v6("/prod/echo/b"), &["203.0.113.5"]).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["headers"]["x-forwarded-for"], "203.0.113.5, ::1");
    assert_eq!(via(v6("/prod/echo/b"), &["2001:db8::9"]).await.status, 200);
    // A client that writes the office's address itself, before the hop the proxy added (in the
    // same field, or in a field of its own): the hop the proxy added is the client.
    assert_eq!(
        status(via(v6("/prod/echo/b"), &["203.0.113.5, 198.51.100.1"]).await),
        forbidden
    );
    let r = via(v6("/prod/echo/b"), &["203.0.113.5", "198.51.100.1"]).await;
    assert_eq!(status(r), forbidden);
    // Written off the request path: read once the line is there, as the last one (the log also
    // holds the lines of a run before a restart).
    let mut logged = String::new();
    for _ in 0..200 {
        logged = std::fs::read_to_string(dir.join("access.log")).unwrap_or_default();
        if logged
            .lines()
            .last()
            .is_some_and(|l| l.contains("198.51.100.1"))
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    let last: serde_json::Value = serde_json::from_str(logged.lines().last().unwrap()).unwrap();
    assert_eq!(
        (&last["ip"], &last["decision"], &last["status"]),
        (
            &json!("198.51.100.1"),
            &json!("ip_forbidden"),
            &json!("403")
        ),
        "{logged}"
    );
    // Over HTTP/2 (prior knowledge), the same chain and the same rules.
    let (h2, _conn) = crate::http2::h2c(format!("[::1]:{port}").parse().unwrap()).await;
    let over_h2 = |hops: &'static [&'static str]| {
        let mut h2 = h2.clone();
        async move {
            let mut req =
                http::Request::get("http://api.test/prod/echo/h2").header("x-api-key", PARTNER_KEY);
            for hop in hops {
                req = req.header("x-forwarded-for", *hop);
            }
            h2 = h2.ready().await.unwrap();
            let (resp, _) = h2.send_request(req.body(()).unwrap(), true).unwrap();
            crate::http2::read(resp).await.unwrap().0.status.as_u16()
        }
    };
    assert_eq!(over_h2(&["203.0.113.5"]).await, 200);
    assert_eq!(over_h2(&["203.0.113.5", "198.51.100.1"]).await, 403);
    // An untrusted peer's X-Forwarded-For is not read at all.
    assert_eq!(
        status(via(v4("/prod/echo/b"), &["203.0.113.5"]).await),
        forbidden
    );
    // A trusted hop naming no address: refused, never let through.
    assert_eq!(
        status(via(v6("/prod/echo/b"), &["unknown"]).await),
        forbidden
    );

    // The decision endpoint: the client is what the proxy asking names.
    let verify = gw.verify_addr();
    let ask = |chain: Option<&'static str>| {
        let c = client();
        async move {
            let mut headers = vec![("x-api-key", PARTNER_KEY)];
            headers.extend(chain.map(|hop| ("x-forwarded-for", hop)));
            c.send("GET", &format!("http://{verify}/prod/echo/c"), &headers, "")
                .await
                .status
        }
    };
    assert_eq!(ask(Some("203.0.113.77")).await, 200);
    assert_eq!(ask(Some("198.51.100.1")).await, 403);
    assert_eq!(ask(None).await, 403, "a proxy that names no client");

    let metrics = gw.metrics().await;
    assert!(
        // Seven on the data plane, two decisions; the plan is named only for keys it admits.
        metrics.contains(r#"usage_plan="",decision="ip_forbidden"} 9"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_used_only_from_their_networks_on_sqlite_across_a_restart() {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let store = "store: { sqlite: ./tollgate.db, flushInterval: 200ms }";
    let gw = gateway(&up, dir.path(), store);
    allowlists_hold(&gw, dir.path()).await;
    assert!(gw.terminate().success());
    let gw = gateway(&up, dir.path(), store);
    allowlists_hold(&gw, dir.path()).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_are_used_only_from_their_networks_on_redis_across_a_restart() {
    let Some(redis) = util::redis() else {
        return;
    };
    let up = util::upstream().await;
    let store = util::on_redis(&redis);
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&up, dir.path(), &store);
    allowlists_hold(&gw, dir.path()).await;
    assert!(gw.terminate().success());
    // Another instance, from what Redis keeps.
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&up, dir.path(), &store);
    allowlists_hold(&gw, dir.path()).await;
}

const COST_KEY: &str = "exportingPartnerKeyValue0123456789";

/// A gateway whose plan has a quota of 12 a day, with an export route costing 5, a free status
/// route, and the echo route at the default cost of 1.
fn costly_gateway(up: &util::Upstream, dir: &std::path::Path, store: &str) -> Gateway {
    let upstream = format!("http://{}", up.addr);
    let yaml = format!(
        "listen: 127.0.0.1:0\n{store}\nadmin: {{ listen: 127.0.0.1:0 }}\nrateLimitHeaders: true\n\
         apis:\n  - id: warranty\n    stages: [ {{ name: prod }} ]\n    routes:\n\
         \x20     - {{ path: /export, method: GET, apiKeyRequired: true, upstream: \"{upstream}\", cost: 5 }}\n\
         \x20     - {{ path: /status, method: GET, apiKeyRequired: true, upstream: \"{upstream}\", cost: 0 }}\n\
         \x20     - {{ path: \"/echo/{{rest+}}\", method: ANY, apiKeyRequired: true, upstream: \"{upstream}\" }}\n\
         usagePlans:\n  - {{ name: exports, apiStages: [ {{ apiId: warranty, stage: prod }} ], quota: {{ limit: 12, period: DAY }} }}\n\
         apiKeys:\n  - {{ name: exporter, value: {COST_KEY}, usagePlans: [exports] }}\n"
    );
    util::write_config(dir, &yaml);
    Gateway::start(dir, &util::admin_env())
}

/// What the key spent today, as GetUsage reports it: `[used, remaining]`.
async fn spent_today(gw: &Gateway) -> serde_json::Value {
    let admin = util::AdminClient::new(gw.admin.unwrap());
    let usage = admin.usage_today(&admin.plan_id("exports").await).await;
    let values = usage["values"].as_object().unwrap();
    values.values().next().unwrap()[0].clone()
}

async fn costs_hold(store: &str) {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = costly_gateway(&up, dir.path(), store);
    let get = |gw: &Gateway, path: &str| {
        let url = gw.url(path);
        let c = client();
        async move { c.get(&url, Some(COST_KEY)).await }
    };
    let r = get(&gw, "/prod/export").await;
    assert_eq!((r.status, util::quota_remaining(&r)), (200, 7));
    let r = get(&gw, "/prod/export").await;
    assert_eq!((r.status, util::quota_remaining(&r)), (200, 2));
    // 5 is more than the 2 left: refused whole, nothing spent.
    let r = get(&gw, "/prod/export").await;
    assert_eq!(
        (r.status, r.json()),
        (429, json!({ "message": "Limit Exceeded" }))
    );
    // The free route passes, spending nothing; the echo route spends its 1.
    let r = get(&gw, "/prod/status").await;
    assert_eq!((r.status, util::quota_remaining(&r)), (200, 2));
    let r = get(&gw, "/prod/echo/x").await;
    assert_eq!((r.status, util::quota_remaining(&r)), (200, 1));
    // GetUsage reports what was spent (11), not the requests admitted (4), right away.
    assert_eq!(spent_today(&gw).await, json!([11, 1]));

    // Across a restart, the spent quota holds.
    assert!(gw.terminate().success());
    let gw = costly_gateway(&up, dir.path(), store);
    assert_eq!(get(&gw, "/prod/export").await.status, 429);
    assert_eq!(get(&gw, "/prod/echo/y").await.status, 200);
    assert_eq!(get(&gw, "/prod/echo/z").await.status, 429);
    assert_eq!(get(&gw, "/prod/status").await.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_spend_their_cost_on_sqlite_across_a_restart() {
    costs_hold("store: { sqlite: ./tollgate.db, flushInterval: 200ms }").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn routes_spend_their_cost_on_redis_across_a_restart() {
    let Some(redis) = util::redis() else {
        return;
    };
    costs_hold(&util::on_redis(&redis)).await;
}

const ACME_PROD: &str = "acmeProductionKeyValue0123456789";
const ACME_STAGING: &str = "acmeStagingKeyValue0123456789";
const SOLO: &str = "soloPartnerKeyValue0123456789";

/// A gateway whose plan shares limits by customer: 6 a day and a bucket of 7 (refilled once in
/// 1000 s) for each customer; two keys of `acme`, one key without a customer.
fn sharing_gateway(up: &util::Upstream, dir: &std::path::Path, store: &str) -> Gateway {
    let extra = "admin: { listen: 127.0.0.1:0 }\n\
        usagePlans:\n  - { name: shared, limitsShareBy: customerId, apiStages: [ { apiId: warranty, stage: prod } ], \
        throttle: { rateLimit: 0.001, burstLimit: 7 }, quota: { limit: 6, period: DAY } }\n\
        apiKeys:\n\
        \x20 - { name: acme-prod, value: acmeProductionKeyValue0123456789, customerId: acme, usagePlans: [shared] }\n\
        \x20 - { name: acme-staging, value: acmeStagingKeyValue0123456789, customerId: acme, usagePlans: [shared] }\n\
        \x20 - { name: solo, value: soloPartnerKeyValue0123456789, usagePlans: [shared] }\n";
    let yaml = util::config(&format!("http://{}", up.addr), extra).replace(
        "store: { sqlite: ./tollgate.db, flushInterval: 200ms }",
        store,
    );
    util::write_config(dir, &yaml);
    Gateway::start(dir, &util::admin_env())
}

async fn customer_limits_hold(store: &str) {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = sharing_gateway(&up, dir.path(), store);
    let get = |gw: &Gateway, key: &'static str| {
        let url = gw.url("/prod/echo/x");
        let c = client();
        async move { c.get(&url, Some(key)).await }
    };
    // The customer's quota goes down whichever of its keys spends it.
    for left in [5, 4, 3, 2] {
        let r = get(&gw, ACME_PROD).await;
        assert_eq!((r.status, util::quota_remaining(&r)), (200, left));
    }
    for left in [1, 0] {
        let r = get(&gw, ACME_STAGING).await;
        assert_eq!((r.status, util::quota_remaining(&r)), (200, left));
    }
    let r = get(&gw, ACME_STAGING).await;
    assert_eq!(
        (r.status, r.json()),
        (429, json!({ "message": "Limit Exceeded" }))
    );
    // Seven tokens taken from one bucket: the production key, which took four, is throttled.
    let r = get(&gw, ACME_PROD).await;
    assert_eq!(
        (r.status, r.json()),
        (429, json!({ "message": "Too Many Requests" }))
    );
    // A key without a customerId keeps its own.
    let r = get(&gw, SOLO).await;
    assert_eq!((r.status, util::quota_remaining(&r)), (200, 5));

    // GetUsage: each key's own count, and what its quota (the customer's) has left.
    let admin = util::AdminClient::new(gw.admin.unwrap());
    let plan_id = admin.plan_id("shared").await;
    let (prod, staging, solo) = (
        admin.key_id("acme-prod").await,
        admin.key_id("acme-staging").await,
        admin.key_id("solo").await,
    );
    let usage = admin.usage_today(&plan_id).await;
    assert_eq!(
        usage["values"],
        json!({ &prod: [[4, 0]], &staging: [[2, 0]], &solo: [[1, 5]] })
    );
    // The customer's report: its keys together, and each.
    let today = util::today();
    let path = format!(
        "/tollgate/usageplans/{plan_id}/customers/acme/usage?startDate={today}&endDate={today}"
    );
    let report = admin.ok("GET", &path, "").await;
    assert_eq!(report["customerId"], "acme");
    assert_eq!(report["items"], json!([[6, 0]]));
    assert_eq!(
        report["values"],
        json!({ &prod: [[4, 0]], &staging: [[2, 0]] })
    );
    let unknown = format!(
        "/tollgate/usageplans/{plan_id}/customers/nobody/usage?startDate={today}&endDate={today}"
    );
    let r = admin.call("GET", &unknown, "").await;
    assert_eq!(
        (r.status, r.header("x-amzn-errortype")),
        (404, Some("NotFoundException"))
    );
    let cli = util::cli(
        &gw,
        &[
            "usage",
            "--plan",
            &plan_id,
            "--customer",
            "acme",
            "--from",
            &today,
            "--to",
            &today,
            "--output",
            "json",
        ],
    );
    let cli: serde_json::Value = serde_json::from_str(&cli).unwrap();
    assert_eq!(cli["items"], json!([[6, 0]]));

    // Across a restart, the customer's spent quota holds for every key of it.
    assert!(gw.terminate().success());
    let gw = sharing_gateway(&up, dir.path(), store);
    assert_eq!(get(&gw, ACME_STAGING).await.status, 429);
    assert_eq!(get(&gw, SOLO).await.status, 200);
    // UpdateUsage through one key gives the customer, and so its other key, back what it sets.
    let admin = util::AdminClient::new(gw.admin.unwrap());
    let patch = r#"{"patchOperations":[{"op":"replace","path":"/remaining","value":"1"}]}"#;
    admin
        .ok(
            "PATCH",
            &format!("/usageplans/{plan_id}/keys/{staging}/usage"),
            patch,
        )
        .await;
    // The customer's bucket stays empty for a long while: what was set is read back, not spent.
    let report = admin.ok("GET", &path, "").await;
    assert_eq!(report["items"], json!([[6, 1]]));
    assert_eq!(
        admin.usage_today(&plan_id).await["values"][&prod],
        json!([[4, 1]])
    );
    assert!(gw.terminate().success());

    // Offline, from the store alone.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "usage",
            "--config",
            "tollgate.yaml",
            "--plan",
            "shared",
            "--customer",
            "acme",
            "--from",
            &today,
            "--to",
            &today,
            "--output",
            "json",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let offline: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(offline["items"], json!([[6, 1]]));
    assert_eq!(offline["values"][&staging], json!([[2, 1]]));
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_of_one_customer_share_its_limits_on_sqlite_across_a_restart() {
    customer_limits_hold("store: { sqlite: ./tollgate.db, flushInterval: 200ms }").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn keys_of_one_customer_share_its_limits_on_redis_across_a_restart() {
    let Some(redis) = util::redis() else {
        return;
    };
    customer_limits_hold(&util::on_redis(&redis)).await;
}

const PREPAID: &str = "prepaidPartnerKeyValue0123456789";
const REFILLED: &str = "refilledPartnerKeyValue0123456789";

/// A gateway with a prepaid key (10 credits) and a key whose credits come back up to 3 a day, an
/// export route costing 5 and a free one; the plan's quota is far away.
fn prepaid_gateway(up: &util::Upstream, dir: &std::path::Path, store: &str) -> Gateway {
    let upstream = format!("http://{}", up.addr);
    let yaml = format!(
        "listen: 127.0.0.1:0\n{store}\nadmin: {{ listen: 127.0.0.1:0 }}\nrateLimitHeaders: true\n\
         accessLog: {{ path: access.log }}\n\
         apis:\n  - id: warranty\n    stages: [ {{ name: prod }} ]\n    routes:\n\
         \x20     - {{ path: /export, method: GET, apiKeyRequired: true, upstream: \"{upstream}\", cost: 5 }}\n\
         \x20     - {{ path: /status, method: GET, apiKeyRequired: true, upstream: \"{upstream}\", cost: 0 }}\n\
         \x20     - {{ path: \"/echo/{{rest+}}\", method: ANY, apiKeyRequired: true, upstream: \"{upstream}\" }}\n\
         usagePlans:\n  - {{ name: prepaid, apiStages: [ {{ apiId: warranty, stage: prod }} ], quota: {{ limit: 1000, period: DAY }} }}\n\
         apiKeys:\n\
         \x20 - {{ name: prepaid, value: {PREPAID}, usagePlans: [prepaid], credits: {{ balance: 10 }} }}\n\
         \x20 - {{ name: refilled, value: {REFILLED}, usagePlans: [prepaid], credits: {{ refill: {{ amount: 3, period: DAY }} }} }}\n"
    );
    util::write_config(dir, &yaml);
    Gateway::start(dir, &util::admin_env())
}

/// What the RateLimit header says of the credits.
fn credits_left(r: &util::Reply) -> Option<String> {
    let header = r.header("ratelimit")?;
    header
        .split(", ")
        .find(|item| item.starts_with("\"credits\""))
        .map(str::to_owned)
}

async fn credits_hold(store: &str) {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = prepaid_gateway(&up, dir.path(), store);
    let get = |gw: &Gateway, key: &'static str, path: &str| {
        let url = gw.url(path);
        let c = client();
        async move { c.get(&url, Some(key)).await }
    };
    let r = get(&gw, PREPAID, "/prod/export").await;
    assert_eq!(
        (r.status, credits_left(&r).as_deref()),
        (200, Some("\"credits\";r=5"))
    );
    let r = get(&gw, PREPAID, "/prod/export").await;
    assert_eq!(
        (r.status, credits_left(&r).as_deref()),
        (200, Some("\"credits\";r=0"))
    );
    // Empty: AWS's 429 for a spent allowance, nothing spent of the quota, no retry time without a
    // refill; the free route still passes.
    let r = get(&gw, PREPAID, "/prod/echo/x").await;
    assert_eq!(
        (r.status, r.json(), r.header("retry-after")),
        (429, json!({ "message": "Limit Exceeded" }), None)
    );
    assert_eq!(credits_left(&r).as_deref(), Some("\"credits\";r=0"));
    assert_eq!(util::quota_remaining(&r), 990);
    assert_eq!(get(&gw, PREPAID, "/prod/status").await.status, 200);
    // A refill: back up to 3 at the first use today; refused until tomorrow once spent.
    for left in [2, 1, 0] {
        let r = get(&gw, REFILLED, "/prod/echo/r").await;
        assert_eq!(r.status, 200);
        let item = credits_left(&r).unwrap();
        assert!(
            item.starts_with(&format!("\"credits\";r={left};t=")),
            "{item}"
        );
    }
    let r = get(&gw, REFILLED, "/prod/echo/r").await;
    assert_eq!(r.status, 429);
    assert!(r.header("retry-after").is_some(), "until the refill");

    // The metrics and the access log name the decision.
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains(r#"decision="credits_exhausted"} 2"#),
        "{metrics}"
    );
    let mut logged = String::new();
    for _ in 0..200 {
        logged = std::fs::read_to_string(dir.path().join("access.log")).unwrap_or_default();
        if logged.matches("credits_exhausted").count() == 2 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(logged.matches("credits_exhausted").count(), 2, "{logged}");

    // A top-up, twice with one idempotency key: added once. GetApiKey shows the balance.
    let admin = util::AdminClient::new(gw.admin.unwrap());
    let prepaid = admin.key_id("prepaid").await;
    let top_up = |cli_args: &[&str]| {
        let mut args = vec!["keys", "credits", &prepaid, "--output", "json"];
        args.extend_from_slice(cli_args);
        serde_json::from_str::<serde_json::Value>(&util::cli(&gw, &args)).unwrap()
    };
    let once = top_up(&["--add", "7", "--idempotency-key", "order-1"]);
    assert_eq!(
        (&once["added"], &once["credits"]["balance"]),
        (&json!(true), &json!(7))
    );
    let again = top_up(&["--add", "7", "--idempotency-key", "order-1"]);
    assert_eq!(
        (&again["added"], &again["credits"]["balance"]),
        (&json!(false), &json!(7))
    );
    assert_eq!(get(&gw, PREPAID, "/prod/export").await.status, 200);
    let key = admin.ok("GET", &format!("/apikeys/{prepaid}"), "").await;
    assert_eq!(key["credits"], json!({ "balance": 2 }));
    let refilled = admin.key_id("refilled").await;
    let refilled = admin.ok("GET", &format!("/apikeys/{refilled}"), "").await;
    assert_eq!(
        refilled["credits"],
        json!({ "balance": 0, "refill": { "amount": 3, "period": "DAY" } })
    );
    // Bad input is refused, naming what is wrong.
    let path = format!("/tollgate/apikeys/{prepaid}/credits");
    let r = admin.call("POST", &path, r#"{"add": -5}"#).await;
    assert_eq!(r.status, 400);
    assert!(
        r.json()["message"]
            .as_str()
            .unwrap()
            .contains("Invalid add"),
        "{:?}",
        r.body
    );
    let r = admin
        .call("POST", &path, r#"{"add": 1, "idempotencyKey": "opening"}"#)
        .await;
    assert_eq!(r.status, 400);
    let r = admin
        .call(
            "POST",
            "/tollgate/apikeys/nosuchkey0/credits",
            r#"{"add": 1}"#,
        )
        .await;
    assert_eq!(r.status, 404);

    // Across a restart: the balance holds, the opening balance is not added again.
    assert!(gw.terminate().success());
    let gw = prepaid_gateway(&up, dir.path(), store);
    assert_eq!(get(&gw, PREPAID, "/prod/export").await.status, 429);
    let r = get(&gw, PREPAID, "/prod/echo/y").await;
    assert_eq!(
        (r.status, credits_left(&r).as_deref()),
        (200, Some("\"credits\";r=1"))
    );
    assert_eq!(
        get(&gw, REFILLED, "/prod/echo/r").await.status,
        429,
        "refilled once a day"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn prepaid_credits_are_spent_exactly_on_sqlite_across_a_restart() {
    credits_hold("store: { sqlite: ./tollgate.db, flushInterval: 200ms }").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn prepaid_credits_are_spent_exactly_on_redis_across_a_restart() {
    let Some(redis) = util::redis() else {
        return;
    };
    credits_hold(&util::on_redis(&redis)).await;
}

const TRIED: &str = "triedInShadowKeyValue0123456789";
const SHOWN: &str = "shadowWithHeadersKeyValue0123456789";

/// A gateway whose plan `tried` is in shadow (a bucket of 4 refilled once in 1000 s, 3 a day), and
/// a plan in shadow that sends the RateLimit headers.
fn shadow_gateway(up: &util::Upstream, dir: &std::path::Path, store: &str) -> Gateway {
    let extra = "admin: { listen: 127.0.0.1:0 }\naccessLog: { path: access.log }\n\
        usagePlans:\n\
        \x20 - { name: tried, enforcement: shadow, apiStages: [ { apiId: warranty, stage: prod } ], \
        throttle: { rateLimit: 0.001, burstLimit: 4 }, quota: { limit: 3, period: DAY } }\n\
        \x20 - { name: shown, enforcement: shadow, shadowHeaders: true, apiStages: [ { apiId: warranty, stage: prod } ], \
        quota: { limit: 1, period: DAY } }\n\
        apiKeys:\n\
        \x20 - { name: tried, value: triedInShadowKeyValue0123456789, usagePlans: [tried] }\n\
        \x20 - { name: shown, value: shadowWithHeadersKeyValue0123456789, usagePlans: [shown] }\n";
    let yaml = util::config(&format!("http://{}", up.addr), extra).replace(
        "store: { sqlite: ./tollgate.db, flushInterval: 200ms }",
        store,
    );
    util::write_config(dir, &yaml);
    Gateway::start(dir, &util::admin_env())
}

async fn shadow_holds(store: &str) {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = shadow_gateway(&up, dir.path(), store);
    let get = |gw: &Gateway, key: &'static str| {
        let url = gw.url("/prod/echo/s");
        let c = client();
        async move { c.get(&url, Some(key)).await }
    };
    // Nothing is refused; no RateLimit headers, which would tell a partner of limits not enforced.
    for _ in 0..8 {
        let r = get(&gw, TRIED).await;
        assert_eq!((r.status, r.header("ratelimit")), (200, None));
    }
    // Exactly what enforcing would have done: 3 admitted, the 4th token spent on a refused quota,
    // then the empty bucket.
    let metrics = gw.metrics().await;
    for (decision, n) in [
        ("allowed", 3),
        ("shadow_quota_exceeded", 1),
        ("shadow_throttled", 4),
    ] {
        assert!(
            metrics.contains(&format!("decision=\"{decision}\"}} {n}")),
            "{decision}: {metrics}"
        );
    }
    // With shadowHeaders, the headers say what enforcing would.
    let r = get(&gw, SHOWN).await;
    assert_eq!((r.status, util::quota_remaining(&r)), (200, 0));
    let r = get(&gw, SHOWN).await;
    assert_eq!((r.status, util::quota_remaining(&r)), (200, 0));
    // The access log names the decision.
    let mut logged = String::new();
    for _ in 0..200 {
        logged = std::fs::read_to_string(dir.path().join("access.log")).unwrap_or_default();
        if logged.contains("shadow_quota_exceeded") && logged.lines().count() >= 10 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
    }
    assert_eq!(
        logged.matches("\"shadow_throttled\"").count(),
        4,
        "{logged}"
    );
    // The plan's usage is what enforcing would have admitted; the refusals are in the detail.
    let admin = util::AdminClient::new(gw.admin.unwrap());
    let plan_id = admin.plan_id("tried").await;
    let usage = admin.usage_today(&plan_id).await;
    let days = usage["values"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()
        .clone();
    assert_eq!(days, json!([[3, 0]]));
    let today = util::today();
    let path = format!("/tollgate/usageplans/{plan_id}/usage?startDate={today}&endDate={today}");
    let detail = admin.ok("GET", &path, "").await;
    let day = &detail["values"]
        .as_object()
        .unwrap()
        .values()
        .next()
        .unwrap()[0];
    assert_eq!(
        (&day["throttled"], &day["quotaExceeded"]),
        (&json!(4), &json!(1))
    );

    // Across a restart, the shadow's counts hold: it would still refuse (for the quota; on Redis,
    // where the bucket outlives the restart too, for the empty bucket first).
    assert!(gw.terminate().success());
    let gw = shadow_gateway(&up, dir.path(), store);
    assert_eq!(get(&gw, TRIED).await.status, 200);
    let metrics = gw.metrics().await;
    assert!(
        metrics.contains("decision=\"shadow_quota_exceeded\"} 1")
            || metrics.contains("decision=\"shadow_throttled\"} 1"),
        "{metrics}"
    );
    assert!(!metrics.contains("decision=\"allowed\""), "{metrics}");

    // Enforced from now on (the tag removed, as the AWS CLI's untag-resource does): it starts
    // clean, with a full bucket and all of today's quota, and refuses.
    let admin = util::AdminClient::new(gw.admin.unwrap());
    let arn = format!("arn:aws:apigateway:us-east-1::/usageplans/{plan_id}");
    let untag = format!(
        "/tags/{}?tagKeys=tollgate%3Aenforcement",
        arn.replace(':', "%3A").replace('/', "%2F")
    );
    let r = admin.call("DELETE", &untag, "").await;
    assert!(r.status < 300, "{}", r.status);
    for left in [2, 1, 0] {
        let r = get(&gw, TRIED).await;
        assert_eq!((r.status, util::quota_remaining(&r)), (200, left));
    }
    let r = get(&gw, TRIED).await;
    assert_eq!(
        (r.status, r.json()),
        (429, json!({ "message": "Limit Exceeded" }))
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plan_in_shadow_refuses_nothing_and_counts_apart_on_sqlite() {
    shadow_holds("store: { sqlite: ./tollgate.db, flushInterval: 200ms }").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plan_in_shadow_refuses_nothing_and_counts_apart_on_redis() {
    let Some(redis) = util::redis() else {
        return;
    };
    shadow_holds(&util::on_redis(&redis)).await;
}
