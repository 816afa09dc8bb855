use crate::util::{self, Gateway, KEY, client, quota_remaining};

const PLANS: &str = r#"usagePlans:
  - name: central-batch
    apiStages:
      - apiId: warranty
        stage: prod
        throttle: { "/registrations/{id}/warranty/PUT": { rateLimit: 0.01, burstLimit: 2 } }
    throttle: { rateLimit: 100, burstLimit: 50 }
    quota: { limit: 1000, offset: 2, period: MONTH }
  - name: tiny
    apiStages: [ { apiId: warranty, stage: prod } ]
    quota: { limit: 3, period: DAY }
apiKeys:
  - { name: central-system, value: "${CENTRAL_KEY}", usagePlans: [central-batch] }
  - { name: tiny-key, value: tinyKeyValue0123456789abcdef, usagePlans: [tiny] }
  - { name: disabled, value: disabledKey0123456789abcdef, enabled: false, usagePlans: [central-batch] }
  - { name: no-plan, value: noPlanKey0123456789abcdefgh }
  - { name: generated, usagePlans: [central-batch] }
"#;

async fn start() -> (tempfile::TempDir, Gateway, util::Upstream) {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    util::write_config(
        dir.path(),
        &util::config(&format!("http://{}", up.addr), PLANS),
    );
    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);
    (dir, gw, up)
}

#[tokio::test]
async fn proxies_with_forwarded_headers_and_without_hop_by_hop() {
    let (_dir, gw, up) = start().await;
    let c = client();
    let r = c
        .send(
            "POST",
            &gw.url("/prod/echo/a/b?x=1&y=two"),
            &[
                ("x-api-key", KEY),
                ("connection", "keep-alive, x-drop-me"),
                ("x-drop-me", "1"),
                ("x-forwarded-for", "10.9.8.7"),
            ],
            "{}",
        )
        .await;
    assert_eq!(r.status, 200);
    let echo = r.json();
    assert_eq!(echo["method"], "POST");
    assert_eq!(echo["uri"], "/echo/a/b?x=1&y=two");
    let h = &echo["headers"];
    assert_eq!(h["x-forwarded-for"], "10.9.8.7, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], gw.addr.to_string());
    assert!(
        h.get("x-drop-me").is_none(),
        "connection-listed header forwarded: {h}"
    );
    assert_eq!(
        h["host"],
        up.addr.to_string(),
        "the upstream sees its own host"
    );
    // Response: upstream headers pass, hop-by-hop ones do not.
    assert_eq!(r.header("x-upstream"), Some("yes"));
    assert_eq!(r.header("x-hop"), None);
    assert!(r.header("ratelimit").is_some());
}

#[tokio::test]
async fn every_status_aws_defines() {
    let (_dir, gw, _up) = start().await;
    let c = client();
    let put = gw.url("/prod/registrations/42/warranty");

    let r = c.get(&gw.url("/prod/unknown"), Some(KEY)).await;
    assert_eq!(
        (r.status, r.json()["message"].as_str()),
        (403, Some("Missing Authentication Token"))
    );
    assert_eq!(
        r.header("x-amzn-errortype"),
        Some("MissingAuthenticationTokenException")
    );
    let r = c
        .get(&gw.url("/staging/registrations/42/warranty"), Some(KEY))
        .await;
    assert_eq!(r.status, 403, "unknown stage");

    for key in [
        None,
        Some("wrongKeyValue0123456789abcdef"),
        Some("disabledKey0123456789abcdef"),
        Some("noPlanKey0123456789abcdefgh"),
    ] {
        let r = match key {
            Some(k) => c.put(&put, k).await,
            None => c.send("PUT", &put, &[], "{}").await,
        };
        assert_eq!(r.status, 403, "{key:?}");
        assert_eq!(r.json(), serde_json::json!({"message": "Forbidden"}));
        assert_eq!(r.header("x-amzn-errortype"), Some("ForbiddenException"));
    }

    // The per-method throttle for PUT: burst 2, then 429 with Retry-After (one token per 100 s).
    let first = c.put(&put, KEY).await;
    assert_eq!(first.status, 200);
    assert_eq!(quota_remaining(&first), 999);
    let policy = first.header("ratelimit-policy").unwrap();
    assert!(
        policy.starts_with(r#""burst";q=2;w=200, "quota";q=1000;w="#),
        "{policy}"
    );
    assert_eq!(c.put(&put, KEY).await.status, 200);
    let r = c.put(&put, KEY).await;
    assert_eq!(r.status, 429);
    assert_eq!(
        r.json(),
        serde_json::json!({"message": "Too Many Requests"})
    );
    assert_eq!(
        r.header("x-amzn-errortype"),
        Some("TooManyRequestsException")
    );
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=100).contains(&retry), "{retry}");
    assert_eq!(
        quota_remaining(&r),
        998,
        "a throttled request does not use quota"
    );
    // Other methods of the same key still have the plan's bucket.
    assert_eq!(c.get(&gw.url("/prod/echo/x"), Some(KEY)).await.status, 200);

    // Quota of 3 per day, then 429 Limit Exceeded until the next UTC midnight.
    for expect in [2, 1, 0] {
        let r = c
            .get(
                &gw.url("/prod/echo/q"),
                Some("tinyKeyValue0123456789abcdef"),
            )
            .await;
        assert_eq!(r.status, 200);
        assert_eq!(quota_remaining(&r), expect);
    }
    let r = c
        .get(
            &gw.url("/prod/echo/q"),
            Some("tinyKeyValue0123456789abcdef"),
        )
        .await;
    assert_eq!(r.status, 429);
    assert_eq!(r.json(), serde_json::json!({"message": "Limit Exceeded"}));
    assert_eq!(r.header("x-amzn-errortype"), Some("LimitExceededException"));
    let retry: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=86_400).contains(&retry));

    // Public routes and mocks need no key.
    assert_eq!(c.get(&gw.url("/prod/public"), None).await.status, 200);
    let r = c.get(&gw.url("/prod/health"), None).await;
    assert_eq!((r.status, r.json()), (200, serde_json::json!({"ok": true})));
    assert_eq!(r.header("content-type"), Some("application/json"));
}

#[tokio::test]
async fn generated_key_is_printed_once_and_works() {
    let (_dir, gw, _up) = start().await;
    let out = gw.stdout.lock().unwrap().clone();
    let line = out
        .lines()
        .find(|l| l.contains("generated API key \"generated\""))
        .expect(&out);
    let value = line
        .split("): ")
        .nth(1)
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .to_string();
    assert_eq!(value.len(), 40);
    let r = client().get(&gw.url("/prod/echo/g"), Some(&value)).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn upstream_down_is_502_and_slow_is_504() {
    let up = util::upstream().await;
    // A port nothing listens on: bind, note it, close.
    let dead = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let yaml = util::config(&format!("http://{}", up.addr), PLANS).replace(
        "- { path: /public, method: GET, upstream: \"",
        &format!("- {{ path: /dead, method: GET, upstream: \"http://{dead}\" }}\n      - {{ path: /public, method: GET, upstream: \""),
    );
    util::write_config(dir.path(), &yaml);
    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);
    let c = client();
    let r = c.get(&gw.url("/prod/dead"), None).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["message"], "Internal server error");
    let r = c.get(&gw.url("/prod/slow?ms=3000"), Some(KEY)).await;
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["message"], "Endpoint request timed out");
    let r = c.get(&gw.url("/prod/slow?ms=10"), Some(KEY)).await;
    assert_eq!(r.status, 200);
}

#[tokio::test]
async fn bodies_stream_both_ways() {
    let (_dir, gw, _up) = start().await;
    // 8 MiB up, echoed back down through the gateway.
    let body: Vec<u8> = (0..8 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let r = client()
        .send(
            "POST",
            &gw.url("/prod/echo/body"),
            &[("x-api-key", KEY)],
            body.clone(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), body.len());
    assert!(r.body == body);
}

#[tokio::test]
async fn key_values_never_reach_the_logs() {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = util::config(&format!("http://{}", up.addr), PLANS).replace(
        "rateLimitHeaders: true",
        "rateLimitHeaders: true\naccessLog: true",
    );
    util::write_config(dir.path(), &yaml);
    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY), ("RUST_LOG", "trace")]);
    let c = client();
    assert_eq!(c.get(&gw.url("/prod/echo/a"), Some(KEY)).await.status, 200);
    assert_eq!(
        c.get(
            &gw.url("/prod/echo/a"),
            Some("wrongKeyValue0123456789abcdef")
        )
        .await
        .status,
        403
    );
    let stderr_path = gw.stderr_path.clone();
    assert!(gw.terminate().success());
    let logs = std::fs::read_to_string(stderr_path).unwrap();
    assert!(
        logs.contains("tollgate::access"),
        "access log missing: {logs}"
    );
    assert!(logs.contains("\"status\":403"));
    assert!(!logs.contains(KEY), "a key value was logged");
    assert!(
        !logs.contains("wrongKeyValue0123456789abcdef"),
        "a presented key value was logged"
    );
}
