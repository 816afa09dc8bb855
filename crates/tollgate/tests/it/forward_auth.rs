//! tollgate deciding for another proxy: the real nginx (`auth_request`) and Caddy (`forward_auth`)
//! in front of an upstream, each with its recipe from `examples/` as it is (addresses aside).

use serde_json::json;

use crate::util::{self, AdminClient, Caddy, Gateway, KEY, Nginx, client};

const QUOTA_KEY: &str = "quotaOnlyKeyValue0123456789";

/// A gateway whose decision endpoint follows `proxy`'s convention: `KEY` in a plan with a burst of 3,
/// `QUOTA_KEY` in one with a quota of 2.
fn gateway(up: &util::Upstream, proxy: &str) -> (tempfile::TempDir, Gateway) {
    let dir = tempfile::tempdir().unwrap();
    let plans = format!(
        "admin: {{ listen: 127.0.0.1:0 }}\nverify: {{ listen: 127.0.0.1:0, proxy: {proxy} }}\n\
         usagePlans:\n  - name: burst\n    apiStages: [ {{ apiId: warranty, stage: prod }} ]\n    \
         throttle: {{ rateLimit: 0.001, burstLimit: 3 }}\n  \
         - name: quota\n    apiStages: [ {{ apiId: warranty, stage: prod }} ]\n    \
         quota: {{ limit: 2, period: DAY }}\n\
         apiKeys:\n  - {{ name: central, value: \"${{CENTRAL_KEY}}\", usagePlans: [burst] }}\n  \
         - {{ name: quota-only, value: {QUOTA_KEY}, usagePlans: [quota] }}\n"
    );
    util::write_config(
        dir.path(),
        &util::config(&format!("http://{}", up.addr), &plans),
    );
    let gw = Gateway::start(dir.path(), &util::admin_env());
    (dir, gw)
}

/// Through the proxy at `front`: every decision as tollgate would answer it itself, the key's id
/// passed upstream, and each request metered once.
async fn decisions_hold(front: std::net::SocketAddr, gw: &Gateway) {
    let c = client();
    let url = |path: &str| format!("http://{front}{path}");
    // Admitted: the upstream gets the request and the key's id, never a refusal's.
    let r = c.get(&url("/prod/echo/a?x=1"), Some(KEY)).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let echo = r.json();
    assert_eq!(echo["uri"], "/prod/echo/a?x=1");
    let central = AdminClient::new(gw.admin.unwrap());
    let keys = central.ok("GET", "/apikeys?name=central", "").await;
    let central_id = keys["item"][0]["id"].as_str().unwrap().to_string();
    assert_eq!(echo["headers"]["x-tollgate-key-id"], central_id.as_str());
    // A public route needs no key; a route that does not exist, no key, or a wrong one: 403.
    assert_eq!(c.get(&url("/prod/public"), None).await.status, 200);
    for (path, key, message) in [
        ("/prod/nowhere", Some(KEY), "Missing Authentication Token"),
        ("/prod/echo/a", None, "Forbidden"),
        ("/prod/echo/a", Some("wrongKeyValue0123456789"), "Forbidden"),
    ] {
        let r = c.get(&url(path), key).await;
        assert_eq!(
            (r.status, r.json()),
            (403, json!({ "message": message })),
            "{path}"
        );
        assert!(
            r.header("x-amzn-errortype").is_some_and(|t| !t.is_empty()),
            "{path}"
        );
    }
    // The burst of 3 (one taken above): two more, then 429 with Retry-After.
    for _ in 0..2 {
        assert_eq!(c.get(&url("/prod/echo/b"), Some(KEY)).await.status, 200);
    }
    let r = c.get(&url("/prod/echo/b"), Some(KEY)).await;
    assert_eq!(
        (r.status, r.json()),
        (429, json!({"message": "Too Many Requests"}))
    );
    assert!(r.header("retry-after").unwrap().parse::<u64>().unwrap() >= 1);
    // The quota of 2: then 429 Limit Exceeded.
    for _ in 0..2 {
        assert_eq!(
            c.get(&url("/prod/echo/q"), Some(QUOTA_KEY)).await.status,
            200
        );
    }
    let r = c.get(&url("/prod/echo/q"), Some(QUOTA_KEY)).await;
    assert_eq!(
        (r.status, r.json()),
        (429, json!({"message": "Limit Exceeded"}))
    );
    // Each admitted request was metered once, as GetUsage tells.
    let today = util::today();
    for (plan, admitted) in [("burst", 3), ("quota", 2)] {
        let id = central.plan_id(plan).await;
        let path = format!("/usageplans/{id}/usage?startDate={today}&endDate={today}");
        let usage = central.ok("GET", &path, "").await;
        let used: Vec<u64> = usage["values"]
            .as_object()
            .unwrap()
            .values()
            .map(|days| days[0][0].as_u64().unwrap())
            .collect();
        assert_eq!(used, vec![admitted], "{plan}: {usage}");
    }
}

/// Through the proxy at `front`, a client's own `X-Original-URI` naming a public route does not get a
/// keyless request to a private path through.
async fn forged_original_uri_decides_nothing(front: std::net::SocketAddr) {
    let forged = [
        ("x-original-uri", "/prod/public"),
        ("x-original-method", "GET"),
    ];
    let url = format!("http://{front}/prod/echo/x");
    assert_eq!(client().send("GET", &url, &forged, "").await.status, 403);
}

/// Through the proxy at `front`, on a public route: the backend gets tollgate's `-` as the key's id,
/// never the client's own; a field that steers backends is refused, so the backend never reads a
/// method or path tollgate did not decide on; and a field named with `_` never reaches it.
async fn what_the_backend_reads_is_what_was_decided(front: std::net::SocketAddr) {
    let c = client();
    let url = format!("http://{front}/prod/public");
    let r = c
        .send("GET", &url, &[("x-tollgate-key-id", "forged")], "")
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["headers"]["x-tollgate-key-id"], "-");
    for (name, value) in [
        ("x-http-method-override", "DELETE"),
        ("x-original-url", "/prod/echo/secret"),
        ("x-rewrite-url", "/prod/echo/secret"),
    ] {
        let r = c.send("GET", &url, &[(name, value)], "").await;
        assert_eq!(r.status, 400, "{name}: {:?}", r.body);
        assert!(
            r.json()["message"].as_str().unwrap().contains("steer"),
            "{name}: {:?}",
            r.body
        );
    }
    let r = c
        .send("GET", &url, &[("X_Tollgate_Key_Id", "forged")], "")
        .await;
    // nginx drops the field itself (underscores_in_headers off); Caddy passes it and tollgate refuses.
    match r.status {
        200 => assert_eq!(r.json()["headers"].get("x_tollgate_key_id"), None),
        status => assert_eq!(status, 400, "{:?}", r.body),
    }
}

/// The recipe in `examples/`, pointed at the test's addresses; the proxy's own port is left as
/// `{PORT}` for the server helpers to fill.
fn recipe(name: &str, verify: std::net::SocketAddr, up: &util::Upstream) -> String {
    let text = std::fs::read_to_string(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/").to_owned() + name,
    )
    .unwrap();
    for from in ["127.0.0.1:8080", "127.0.0.1:8090", "127.0.0.1:9000"] {
        assert!(text.contains(from), "{name} no longer has {from}");
    }
    text.replace("127.0.0.1:8080", "127.0.0.1:{PORT}")
        .replace("127.0.0.1:8090", &verify.to_string())
        .replace("127.0.0.1:9000", &up.addr.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_auth_request_with_tollgate_deciding() {
    let up = util::upstream().await;
    let (_dir, gw) = gateway(&up, "nginx");
    let Some(nginx) = Nginx::start(&recipe("nginx-forward-auth.conf", gw.verify_addr(), &up))
    else {
        return;
    };
    decisions_hold(nginx.addr, &gw).await;
    what_the_backend_reads_is_what_was_decided(nginx.addr).await;
    // nginx replaces the client's own X-Original-URI.
    forged_original_uri_decides_nothing(nginx.addr).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn caddy_forward_auth_with_tollgate_deciding() {
    let up = util::upstream().await;
    let (_dir, gw) = gateway(&up, "caddy");
    let Some(caddy) = Caddy::start(&recipe("Caddyfile.forward-auth", gw.verify_addr(), &up)) else {
        return;
    };
    decisions_hold(caddy.addr, &gw).await;
    what_the_backend_reads_is_what_was_decided(caddy.addr).await;
    // Caddy passes the client's own fields on to the decision request: only its own count.
    forged_original_uri_decides_nothing(caddy.addr).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_decision_endpoint_answers_in_each_convention() {
    let up = util::upstream().await;
    let (_dir, gw) = gateway(&up, "nginx");
    let verify = gw.verify_addr();
    let c = client();
    let ask = |uri: &'static str, method: &'static str, key: Option<&'static str>| {
        let c = client();
        async move {
            let mut headers = vec![("x-original-uri", uri), ("x-original-method", method)];
            headers.extend(key.map(|k| ("x-api-key", k)));
            c.send("GET", &format!("http://{verify}/auth"), &headers, "")
                .await
        }
    };
    let r = ask("/prod/registrations/7/warranty", "PUT", Some(KEY)).await;
    assert_eq!(r.status, 200);
    assert!(r.header("x-tollgate-key-id").is_some());
    assert!(
        r.header("ratelimit").unwrap().contains("burst"),
        "the key's limits"
    );
    assert!(r.body.is_empty());
    // The same path with another method has no route.
    let r = ask("/prod/registrations/7/warranty", "GET", Some(KEY)).await;
    assert_eq!(r.status, 403);
    assert_eq!(r.header("x-tollgate-status"), Some("403"));
    assert_eq!(
        r.header("x-tollgate-message"),
        Some("Missing Authentication Token")
    );
    // Paths are normalised as on the data plane: a dot segment cannot climb out of the stage.
    let r = ask("/prod/../prod/echo/%2e%2e/echo/x", "GET", Some(KEY)).await;
    assert_ne!(r.status, 200, "{:?}", r.header("x-tollgate-status"));
    // Without the original request's fields: 400, told as nginx can take it.
    let r = c
        .send("GET", &format!("http://{verify}/auth"), &[], "")
        .await;
    assert_eq!(
        (r.status, r.header("x-tollgate-status")),
        (403, Some("400"))
    );
    // The data plane itself is untouched: it still proxies.
    assert_eq!(
        c.get(&gw.url("/prod/echo/direct"), Some(KEY)).await.status,
        200
    );
}
