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
                ("x-forwarded-port", "9999"),
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
        h.get("x-forwarded-port").is_none(),
        "a client's X-Forwarded-Port was passed on: {h}"
    );
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
        logs.contains("\"requestId\":"),
        "access log missing: {logs}"
    );
    assert!(logs.contains("\"status\":\"403\""));
    assert!(!logs.contains(KEY), "a key value was logged");
    assert!(
        !logs.contains("wrongKeyValue0123456789abcdef"),
        "a presented key value was logged"
    );
}

/// Writes `bytes` on one connection and reads until the gateway closes it.
fn exchange_raw(addr: std::net::SocketAddr, steps: &[&[u8]]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    let mut got = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        s.write_all(step).unwrap();
        if i + 1 < steps.len() {
            // Wait for the interim answer before the next step (Expect: 100-continue).
            let mut chunk = [0u8; 256];
            let n = s.read(&mut chunk).unwrap();
            got.extend_from_slice(&chunk[..n]);
        }
    }
    s.read_to_end(&mut got).unwrap();
    String::from_utf8_lossy(&got).into_owned()
}

#[tokio::test]
async fn wire_framing_pipelining_chunked_and_expect_continue() {
    let (_dir, gw, _up) = start().await;
    let addr = gw.addr;
    let key = format!("x-api-key: {KEY}\r\n");
    tokio::task::spawn_blocking(move || {
        // Two requests in one write, then a chunked upload echoed back; the last one closes.
        let pipelined = format!(
            "GET /prod/echo/one HTTP/1.1\r\nHost: x\r\n{key}\r\n\
             GET /prod/unknown HTTP/1.1\r\nHost: x\r\n\r\n\
             POST /prod/echo/body HTTP/1.1\r\nHost: x\r\n{key}Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
             5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        );
        let out = exchange_raw(addr, &[pipelined.as_bytes()]);
        assert_eq!(out.matches("HTTP/1.1 ").count(), 3, "{out}");
        let first = out.find("\"uri\":\"/echo/one\"").expect(&out);
        let second = out.find("HTTP/1.1 403 Forbidden").expect(&out);
        // The upstream streams the echo back chunked as it came; the chunks pass through as they are.
        let third = out.find("5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n").expect(&out);
        assert!(first < second && second < third, "answers out of order: {out}");

        // Expect: 100-continue gets the interim answer before the body is sent.
        let head = format!(
            "PUT /prod/echo/body HTTP/1.1\r\nHost: x\r\n{key}Content-Length: 5\r\n\
             Expect: 100-continue\r\nConnection: close\r\n\r\n"
        );
        let out = exchange_raw(addr, &[head.as_bytes(), b"abcde"]);
        assert!(out.starts_with("HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.ends_with("abcde"), "{out}");

        // Refused with a body still to come: the answer, then the connection closes.
        let out = exchange_raw(
            addr,
            &[b"POST /prod/echo/body HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\npartial"],
        );
        assert!(out.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{out}");
        assert!(out.contains("connection: close\r\n"), "{out}");
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_keep_alive_connection_the_upstream_closed_is_replaced() {
    // An upstream that answers once per connection and then closes it without saying so, like a
    // server whose idle timeout fired between two requests.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let up = listener.local_addr().unwrap();
    std::thread::spawn(move || {
        use std::io::{Read, Write};
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { return };
            let mut buf = [0u8; 4096];
            let _ = s.read(&mut buf);
            let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        }
    });
    let dir = tempfile::tempdir().unwrap();
    util::write_config(dir.path(), &util::config(&format!("http://{up}"), ""));
    let gw = Gateway::start(dir.path(), &[]);
    let c = client();
    for i in 0..3 {
        let r = c.get(&gw.url("/prod/public"), None).await;
        assert_eq!((r.status, &r.body[..]), (200, &b"ok"[..]), "request {i}");
        // Let the close reach the gateway's idle upstream connection.
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn shutdown_finishes_requests_in_flight_and_closes_idle_connections() {
    let (_dir, gw, _up) = start().await;
    // Blocking sockets off the runtime: the test upstream runs on it.
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Write};
        let addr = gw.addr;
        let request = |path: &str| {
            format!("GET /prod{path} HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\n\r\n").into_bytes()
        };
        // A keep-alive connection that has been answered and now sits idle.
        let mut idle = std::net::TcpStream::connect(addr).unwrap();
        idle.set_read_timeout(Some(std::time::Duration::from_secs(20)))
            .unwrap();
        idle.write_all(&request("/echo/idle")).unwrap();
        let mut buf = [0u8; 4096];
        assert!(idle.read(&mut buf).unwrap() > 0);
        // A request the upstream answers only after the signal.
        let slow_request = request("/slow?ms=700");
        let slow = std::thread::spawn(move || {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(&slow_request).unwrap();
            let mut out = String::new();
            let _ = s.read_to_string(&mut out);
            out
        });
        std::thread::sleep(std::time::Duration::from_millis(200));
        let started = std::time::Instant::now();
        assert!(gw.terminate().success());
        // Well inside the 30 s drain timeout: nothing waited for the idle connection.
        assert!(started.elapsed() < std::time::Duration::from_secs(10));
        let out = slow.join().unwrap();
        assert!(out.starts_with("HTTP/1.1 200 OK\r\n"), "{out}");
        assert!(out.contains("connection: close\r\n"), "{out}");
        assert_eq!(
            idle.read(&mut buf).unwrap(),
            0,
            "the idle connection was closed"
        );
    })
    .await
    .unwrap();
}

/// AWS's shape of a request id: a version-4 UUID in lower-case hex.
fn is_request_id(id: &str) -> bool {
    id.len() == 36
        && id.bytes().enumerate().all(|(i, b)| match i {
            8 | 13 | 18 | 23 => b == b'-',
            14 => b == b'4',
            _ => b.is_ascii_digit() || (b'a'..=b'f').contains(&b),
        })
}

#[tokio::test]
async fn every_answer_has_a_request_id_that_the_upstream_and_the_log_share() {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = util::config(&format!("http://{}", up.addr), PLANS)
        .replace("rateLimitHeaders: true", "rateLimitHeaders: true\naccessLog: true")
        // An upstream nothing listens on, for a 502.
        .replace(
            "      - { path: /public,",
            "      - { path: /down, method: GET, upstream: \"http://127.0.0.1:9\" }\n      - { path: /public,",
        );
    util::write_config(dir.path(), &yaml);
    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);
    let c = client();

    // Proxied: the upstream gets the same id, and a traceparent starting a trace named after it.
    // A client's own x-amzn-RequestId is not passed on.
    let r = c
        .send(
            "GET",
            &gw.url("/prod/echo/a"),
            &[("x-api-key", KEY), ("x-amzn-requestid", "spoofed")],
            "",
        )
        .await;
    assert_eq!(r.status, 200);
    let id = r.header("x-amzn-requestid").unwrap().to_string();
    assert!(is_request_id(&id), "{id}");
    let h = &r.json()["headers"];
    assert_eq!(h["x-amzn-requestid"], id.as_str());
    let tp = h["traceparent"].as_str().unwrap();
    assert_eq!(tp.len(), 55, "{tp}");
    assert_eq!(&tp[3..35], id.replace('-', ""), "{tp}");
    assert!(tp.starts_with("00-") && tp.ends_with("-00"), "{tp}");

    // A client's traceparent is continued: its trace and flags, the gateway as the parent.
    let theirs = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = c
        .send(
            "GET",
            &gw.url("/prod/echo/a"),
            &[("x-api-key", KEY), ("traceparent", theirs)],
            "",
        )
        .await;
    let tp = r.json()["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        tp.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-") && tp.ends_with("-01"),
        "{tp}"
    );
    assert_ne!(&tp[36..52], "00f067aa0ba902b7");

    // Refused, mocked, no route, malformed, unreachable: each answer has an id of its own.
    let mut ids = vec![id];
    for (status, r) in [
        (403, c.get(&gw.url("/prod/echo/a"), None).await),
        (200, c.get(&gw.url("/prod/health"), None).await),
        (403, c.get(&gw.url("/prod/nowhere"), None).await),
        (502, c.get(&gw.url("/prod/down"), None).await),
    ] {
        assert_eq!(r.status, status);
        let id = r.header("x-amzn-requestid").unwrap().to_string();
        assert!(is_request_id(&id), "{id}");
        ids.push(id);
    }
    let raw = util::raw_exchange(gw.addr, b"GET /prod/health HTTP/1.1\r\n\r\n");
    assert_eq!(util::status_of(&raw), Some(400));
    assert!(
        raw.to_ascii_lowercase().contains("\r\nx-amzn-requestid: "),
        "{raw}"
    );
    let unique: std::collections::HashSet<_> = ids.iter().collect();
    assert_eq!(unique.len(), ids.len(), "{ids:?}");

    // The access log names each one, and the log line about the unreachable upstream does too.
    let stderr_path = gw.stderr_path.clone();
    assert!(gw.terminate().success());
    let logs = std::fs::read_to_string(stderr_path).unwrap();
    for id in &ids {
        assert!(
            logs.contains(&format!("\"requestId\":\"{id}\"")),
            "{id} not logged: {logs}"
        );
    }
    let failed = logs
        .lines()
        .find(|l| l.contains("upstream connection failed"))
        .unwrap_or_else(|| panic!("{logs}"));
    assert!(failed.contains(&ids[4]), "{failed}");
}

/// Waits until `path` holds `n` lines; returns them.
async fn lines_of(path: &std::path::Path, n: usize) -> Vec<String> {
    for _ in 0..200 {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    panic!(
        "{} does not hold {n} lines: {:?}",
        path.display(),
        std::fs::read_to_string(path)
    );
}

#[tokio::test]
async fn the_access_log_takes_aws_context_variables_and_reopens_on_sigusr1() {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let format = r#"$context.identity.sourceIp - $context.identity.apiKeyId [$context.requestTime] "$context.httpMethod $context.path $context.protocol" $context.status $context.responseLength $context.requestId $context.apiId/$context.stage $context.resourcePath ua=$context.identity.userAgent err=$context.error.responseType:$context.error.messageString int=$context.integration.status"#;
    let yaml = util::config(&format!("http://{}", up.addr), PLANS).replace(
        "rateLimitHeaders: true",
        &format!("rateLimitHeaders: true\naccessLog:\n  format: '{format}'\n  path: access.log"),
    );
    util::write_config(dir.path(), &yaml);
    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);
    let c = client();
    let tiny = "tinyKeyValue0123456789abcdef";
    let ua = [("user-agent", "partner \"batch\" 1.0")];
    let ok = c
        .send(
            "GET",
            &gw.url("/prod/echo/a?x=1"),
            &[("x-api-key", tiny), ua[0]],
            "",
        )
        .await;
    assert_eq!(ok.status, 200);
    for _ in 0..2 {
        assert_eq!(c.get(&gw.url("/prod/echo/a"), Some(tiny)).await.status, 200);
    }
    assert_eq!(c.get(&gw.url("/prod/echo/a"), Some(tiny)).await.status, 429);
    assert_eq!(c.get(&gw.url("/prod/echo/a"), None).await.status, 403);
    assert_eq!(c.get(&gw.url("/prod/health"), None).await.status, 200);

    let log = dir.path().join("access.log");
    let lines = lines_of(&log, 6).await;
    let id = ok.header("x-amzn-requestid").unwrap();
    let first = &lines[0];
    assert!(first.starts_with("127.0.0.1 - "), "{first}");
    assert!(
        first.contains(&format!(
            "\"GET /prod/echo/a HTTP/1.1\" 200 {} {id} warranty/prod /echo/{{rest+}} ua=partner \\\"batch\\\" 1.0 err=-:- int=200",
            ok.body.len()
        )),
        "{first}"
    );
    assert!(!first.contains(tiny), "no key values: {first}");
    assert!(
        lines[3].contains("\" 429 28 ")
            && lines[3].contains("err=QUOTA_EXCEEDED:\\\"Limit Exceeded\\\" int=-"),
        "{}",
        lines[3]
    );
    assert!(
        lines[4].contains(" - - [") && lines[4].contains("err=INVALID_API_KEY:\\\"Forbidden\\\""),
        "{}",
        lines[4]
    );
    assert!(
        lines[5].contains("/health ") && lines[5].contains("int=-"),
        "{}",
        lines[5]
    );

    // logrotate: the file is moved, SIGUSR1, and new lines go to a new file.
    std::fs::rename(&log, dir.path().join("access.log.1")).unwrap();
    util::signal(&gw.child, "USR1");
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(c.get(&gw.url("/prod/health"), None).await.status, 200);
    let fresh = lines_of(&log, 1).await;
    assert_eq!(fresh.len(), 1);
    assert_eq!(
        std::fs::read_to_string(dir.path().join("access.log.1"))
            .unwrap()
            .lines()
            .count(),
        6
    );

    // A graceful stop writes the last lines out before the process ends.
    for _ in 0..50 {
        assert_eq!(c.get(&gw.url("/prod/health"), None).await.status, 200);
    }
    assert!(gw.terminate().success());
    let written = std::fs::read_to_string(&log).unwrap();
    assert_eq!(written.lines().count(), 51, "{written}");

    // A key value cannot be asked for; an unknown variable is named, with where it was written.
    let bad = yaml.replace("$context.identity.apiKeyId", "$context.identity.apiKey");
    util::write_config(dir.path(), &bad);
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", "--config"])
        .arg(dir.path().join("tollgate.yaml"))
        .env("CENTRAL_KEY", KEY)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{err}");
    assert!(
        err.contains("accessLog.format") && err.contains("never logged"),
        "{err}"
    );
}

/// Line separators a client puts in a field (NEL, U+2028, U+2029, C1 controls) are escaped in the
/// access log: Python's `str.splitlines()`, which splits at all of them, reads one JSON record per
/// request.
#[tokio::test]
async fn no_line_reader_splits_an_access_log_record() {
    if !util::have("python3", &["--version"], "Debian: apt-get install python3") {
        return;
    }
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = util::config(&format!("http://{}", up.addr), PLANS).replace(
        "rateLimitHeaders: true",
        "rateLimitHeaders: true\naccessLog: { path: access.log }",
    );
    util::write_config(dir.path(), &yaml);
    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);
    let agents: [&[u8]; 4] = [
        "a\u{85}b".as_bytes(),
        "a\u{2028}b".as_bytes(),
        "a\u{2029}b\u{9b}c".as_bytes(),
        b"plain",
    ];
    for agent in agents {
        let mut req =
            b"GET /prod/health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\nUser-Agent: ".to_vec();
        req.extend_from_slice(agent);
        req.extend_from_slice(b"\r\n\r\n");
        let answer = util::raw_exchange(gw.addr, &req);
        assert_eq!(util::status_of(&answer), Some(200), "{answer}");
    }
    let log = dir.path().join("access.log");
    lines_of(&log, agents.len()).await;
    let read = std::process::Command::new("python3")
        .arg("-c")
        .arg(
            "import json, sys\n\
             lines = open(sys.argv[1], encoding='utf-8').read().splitlines()\n\
             print(json.dumps([json.loads(l)['userAgent'] for l in lines]))",
        )
        .arg(&log)
        .output()
        .unwrap();
    assert!(
        read.status.success(),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let agents_read: Vec<String> = serde_json::from_slice(&read.stdout).unwrap();
    assert_eq!(
        agents_read,
        ["a\u{85}b", "a\u{2028}b", "a\u{2029}b\u{9b}c", "plain"],
        "one record per request, each reading back as sent"
    );
}
