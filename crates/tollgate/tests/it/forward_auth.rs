//! tollgate deciding for another proxy: the real nginx (`auth_request`) and Caddy (`forward_auth`)
//! in front of an upstream, each with its recipe from `examples/` as it is (addresses aside).

use serde_json::json;

use crate::util::{self, AdminClient, Caddy, Gateway, KEY, Nginx, client};

const QUOTA_KEY: &str = "quotaOnlyKeyValue0123456789";
/// Keys that may be used only from loopback, and only from a documentation network.
const LOOPBACK_KEY: &str = "loopbackOnlyKeyValue0123456789";
const FAR_KEY: &str = "farOnlyKeyValue0123456789";

/// A gateway whose decision endpoint follows `proxy`'s convention: `KEY` in a plan with a burst of 3,
/// `QUOTA_KEY` in one with a quota of 2.
fn gateway(up: &util::Upstream, proxy: &str) -> (tempfile::TempDir, Gateway) {
    let dir = tempfile::tempdir().unwrap();
    let plans = format!(
        "admin: {{ listen: 127.0.0.1:0 }}\nverify: {{ listen: 127.0.0.1:0, proxy: {proxy} }}\n\
         usagePlans:\n  - name: burst\n    apiStages: [ {{ apiId: warranty, stage: prod }} ]\n    \
         throttle: {{ rateLimit: 0.001, burstLimit: 3 }}\n  \
         - name: quota\n    apiStages: [ {{ apiId: warranty, stage: prod }} ]\n    \
         quota: {{ limit: 2, period: DAY }}\n  \
         - name: open\n    apiStages: [ {{ apiId: warranty, stage: prod }} ]\n\
         apiKeys:\n  - {{ name: central, value: \"${{CENTRAL_KEY}}\", usagePlans: [burst] }}\n  \
         - {{ name: quota-only, value: {QUOTA_KEY}, usagePlans: [quota] }}\n  \
         - {{ name: loopback-only, value: {LOOPBACK_KEY}, usagePlans: [open], allowedSourceIps: [127.0.0.0/8, \"::1\"] }}\n  \
         - {{ name: far-only, value: {FAR_KEY}, usagePlans: [open], allowedSourceIps: [203.0.113.0/24] }}\n"
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
    // A key used from where it may be (the proxy names the client: loopback), and one that may not.
    assert_eq!(
        c.get(&url("/prod/echo/near"), Some(LOOPBACK_KEY))
            .await
            .status,
        200
    );
    let r = c.get(&url("/prod/echo/far"), Some(FAR_KEY)).await;
    assert_eq!(
        (r.status, r.json()),
        (403, json!({ "message": "Forbidden" }))
    );
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

/// The recipe in `examples/`, pointed at the test's addresses: its proxy's port (`listen`), its
/// decision endpoint's and the backend's (9000). The proxy's own port is left as `{PORT}` for the
/// server helpers to fill.
fn recipe(
    name: &str,
    (listen, decisions): (u16, u16),
    verify: std::net::SocketAddr,
    up: &util::Upstream,
) -> String {
    let text = std::fs::read_to_string(
        concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/").to_owned() + name,
    )
    .unwrap();
    let (listen, decisions) = (
        format!("127.0.0.1:{listen}"),
        format!("127.0.0.1:{decisions}"),
    );
    for from in [&listen, &decisions, "127.0.0.1:9000"] {
        assert!(text.contains(from), "{name} no longer has {from}");
    }
    text.replace(&listen, "127.0.0.1:{PORT}")
        .replace(&decisions, &verify.to_string())
        .replace("127.0.0.1:9000", &up.addr.to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn nginx_auth_request_with_tollgate_deciding() {
    let up = util::upstream().await;
    let (_dir, gw) = gateway(&up, "nginx");
    let Some(nginx) = Nginx::start(&recipe(
        "nginx-forward-auth.conf",
        (8088, 8090),
        gw.verify_addr(),
        &up,
    )) else {
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
    let Some(caddy) = Caddy::start(&recipe(
        "Caddyfile.forward-auth",
        (8089, 8091),
        gw.verify_addr(),
        &up,
    )) else {
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

/// The lines of the README's `sh` block that begins with `first`.
fn readme_block(first: &str) -> Vec<String> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let start = readme
        .find(&format!("```sh\n{first}"))
        .unwrap_or_else(|| panic!("no README block begins with {first:?}"));
    let block = &readme[start + "```sh\n".len()..];
    let end = block.find("```").unwrap();
    block[..end].lines().map(str::to_owned).collect()
}

/// Background commands of a README block, each in a process group of its own; stopped when dropped.
struct Started(Vec<std::process::Child>);

impl Drop for Started {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = std::process::Command::new("kill")
                .args(["-s", "TERM", "--", &format!("-{}", child.id())])
                .status();
            let _ = child.wait();
        }
    }
}

/// Runs a README block as written, in a copy of `examples/` (so its files stay clean), with the
/// test's own build standing in for `cargo run --release -p tollgate --`: the lines ending in `&`
/// are started, then each `curl` line must answer the status its comment names.
fn run_readme_block(first: &str) {
    use std::os::unix::process::CommandExt as _;
    let dir = tempfile::tempdir().unwrap();
    let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
    let copied = std::process::Command::new("cp")
        .args(["-r", examples])
        .arg(dir.path().join("examples"))
        .status()
        .unwrap();
    assert!(copied.success());
    let bin = env!("CARGO_BIN_EXE_tollgate");
    let shell = |line: &str| {
        let mut cmd = std::process::Command::new("bash");
        cmd.arg("-c")
            .arg(line.replace("cargo run --release -p tollgate --", bin))
            .current_dir(dir.path())
            .env("HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path());
        cmd
    };
    let mut started = Started(Vec::new());
    for line in readme_block(first) {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        if let Some(background) = line.strip_suffix('&') {
            let child = shell(background)
                .process_group(0)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            started.0.push(child);
            continue;
        }
        let (command, expected) = line
            .split_once("  #")
            .expect("a curl line says what it gets");
        let status = expected
            .split_whitespace()
            .next()
            .unwrap()
            .trim_end_matches(',');
        assert!(command.trim_start().starts_with("curl "), "{line}");
        // The servers just started: the first answer may take a moment.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        loop {
            let out = shell(command).output().unwrap();
            let answer = String::from_utf8_lossy(&out.stdout).into_owned();
            if answer.starts_with(&format!("HTTP/1.1 {status}")) {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{line}: {answer}{}",
                String::from_utf8_lossy(&out.stderr)
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
    drop(started);
}

/// The README's try-out of both recipes, as written, with the real nginx and Caddy and a real
/// backend (Python's http.server), on the ports the examples give.
#[test]
fn the_readme_recipes_run_as_written() {
    if !(util::have_nginx() && util::have_caddy()) {
        return;
    }
    run_readme_block("# The nginx recipe");
    run_readme_block("# The Caddy recipe");
}
