use std::net::SocketAddr;
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::tls::{self as tls_util, ca, curl, server_cert};
use crate::util::{self, AdminClient, Gateway, KEY};

const QUOTA_KEY: &str = "quotaKey0123456789abcdefghijkl";
const BURST_KEY: &str = "burstKey0123456789abcdefghijkl";

/// A gateway on plain HTTP and HTTPS (`api.test`, signed by the CA written to `ca.pem`) in front
/// of a real upstream, with an admin API; `http2` is put at the config's top level. Keys: `KEY` in
/// an unlimited plan, `QUOTA_KEY` with a quota of 30 a day, `BURST_KEY` with a burst of 10 and
/// hardly any refill.
async fn start(dir: &Path, http2: &str) -> (Gateway, rustls::pki_types::CertificateDer<'static>) {
    let issuer = ca("test CA");
    server_cert(dir, "api", &issuer, &["api.test"]);
    std::fs::write(dir.join("ca.pem"), issuer.pem()).unwrap();
    let up = util::upstream().await;
    let yaml = format!(
        r#"listen: 127.0.0.1:0
tls:
  listen: 127.0.0.1:0
  certificates: [ {{ cert: api.crt, key: api.key }} ]
{http2}
store: {{ sqlite: ./tollgate.db, flushInterval: 100ms }}
rateLimitHeaders: true
accessLog: true
admin: {{ listen: 127.0.0.1:0 }}
apis:
  - id: warranty
    stages: [ {{ name: prod }} ]
    routes:
      - {{ path: "/echo/{{rest+}}", method: ANY, apiKeyRequired: true, upstream: "http://{up}" }}
      - {{ path: /slow, method: GET, apiKeyRequired: true, upstream: "http://{up}" }}
usagePlans:
  - {{ name: p, apiStages: [ {{ apiId: warranty, stage: prod }} ] }}
  - {{ name: quota, apiStages: [ {{ apiId: warranty, stage: prod }} ], quota: {{ limit: 30, period: DAY }} }}
  - {{ name: burst, apiStages: [ {{ apiId: warranty, stage: prod }} ], throttle: {{ rateLimit: 0.001, burstLimit: 10 }} }}
apiKeys:
  - {{ name: k, value: "${{CENTRAL_KEY}}", usagePlans: [p] }}
  - {{ name: q, value: "{QUOTA_KEY}", usagePlans: [quota] }}
  - {{ name: b, value: "{BURST_KEY}", usagePlans: [burst] }}
"#,
        up = up.addr
    );
    util::write_config(dir, &yaml);
    let gw = Gateway::start(dir, &util::admin_env());
    (gw, issuer.der().clone())
}

/// An HTTP/2 connection negotiated by ALPN on `addr` (as `api.test`).
async fn h2_over_tls(
    addr: SocketAddr,
    ca: &rustls::pki_types::CertificateDer<'static>,
) -> h2::client::SendRequest<Bytes> {
    let mut config = tls_util::client_config(&[ca], None);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let tcp = TcpStream::connect(addr).await.unwrap();
    let name = ServerName::try_from("api.test").unwrap();
    let tls = TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .unwrap();
    assert_eq!(tls.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let (client, conn) = h2::client::handshake(tls).await.unwrap();
    tokio::spawn(conn);
    client
}

/// An HTTP/2 connection with prior knowledge (h2c) to `addr`, and the task driving it.
pub(crate) async fn h2c(
    addr: SocketAddr,
) -> (
    h2::client::SendRequest<Bytes>,
    tokio::task::JoinHandle<Result<(), h2::Error>>,
) {
    let (client, conn) = h2::client::handshake(TcpStream::connect(addr).await.unwrap())
        .await
        .unwrap();
    (client, tokio::spawn(conn))
}

/// GET `path` on a stream of `client`, with `key` when given; the response head and body.
async fn get(
    client: &mut h2::client::SendRequest<Bytes>,
    path: &str,
    key: Option<&str>,
) -> Result<(http::response::Parts, Bytes), h2::Error> {
    let mut req = http::Request::get(format!("https://api.test{path}"));
    if let Some(key) = key {
        req = req.header("x-api-key", key);
    }
    let req = req.body(()).unwrap();
    *client = client.clone().ready().await?;
    let (resp, _) = client.send_request(req, true)?;
    read(resp).await
}

pub(crate) async fn read(
    resp: h2::client::ResponseFuture,
) -> Result<(http::response::Parts, Bytes), h2::Error> {
    let (parts, mut body) = resp.await?.into_parts();
    let mut all = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        all.extend_from_slice(&chunk);
    }
    Ok((parts, all.into()))
}

/// curl's arguments to reach `api.test` on `port` (127.0.0.1) trusting the CA in `dir`, and to print
/// the status and the HTTP version after the body.
fn api_args(dir: &Path, port: u16) -> Vec<String> {
    let cacert = dir.join("ca.pem");
    [
        "--cacert",
        cacert.to_str().unwrap(),
        "--resolve",
        &format!("api.test:{port}:127.0.0.1"),
        "-w",
        "\n%{http_code} %{http_version}",
    ]
    .map(str::to_string)
    .to_vec()
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_gets_the_same_pipeline_over_http2() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, _) = start(dir.path(), "").await;
    let port = gw.tls.unwrap().port();
    let url = format!("https://api.test:{port}/prod/echo/a?x=1");
    let key = format!("x-api-key: {KEY}");
    let base = api_args(dir.path(), port);
    let base: Vec<&str> = base.iter().map(String::as_str).collect();

    // ALPN picks HTTP/2; the upstream gets HTTP/1.1 with the same rewrite as ever.
    let (code, out) = curl(&[&base[..], &["--http2", "-H", key.as_str(), url.as_str()]].concat());
    assert_eq!(code, Some(0), "{out}");
    assert!(out.ends_with("\n200 2"), "{out}");
    assert!(out.contains("\"x-forwarded-proto\":\"https\""), "{out}");
    assert!(out.contains("\"uri\":\"/echo/a?x=1\""), "{out}");
    assert!(out.contains("\"x-forwarded-host\":\"api.test:"), "{out}");
    // Refusals keep AWS's bodies.
    let (_, out) = curl(&[&base[..], &["--http2", url.as_str()]].concat());
    assert!(out.ends_with("{\"message\":\"Forbidden\"}\n403 2"), "{out}");
    // Bodies both ways: with a length, and without one (sent chunked to the upstream).
    let body_url = format!("https://api.test:{port}/prod/echo/body");
    let (_, out) = curl(
        &[
            &base[..],
            &[
                "--http2",
                "-H",
                key.as_str(),
                "--data-binary",
                "hello h2",
                body_url.as_str(),
            ],
        ]
        .concat(),
    );
    assert!(out.ends_with("hello h2\n200 2"), "{out}");
    let streamed = Command::new("curl")
        .args(["-s", "-o", "-"])
        .args(&base)
        .args(["--http2", "-H", key.as_str(), "-T", "-", body_url.as_str()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    {
        use std::io::Write as _;
        let mut stdin = streamed.stdin.as_ref().unwrap();
        stdin.write_all(&vec![b'z'; 100_000]).unwrap();
    }
    let out = streamed.wait_with_output().unwrap();
    let out = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.ends_with("\n200 2"),
        "{}",
        &out[out.len().saturating_sub(20)..]
    );
    assert_eq!(out.len(), 100_000 + "\n200 2".len());
    // HTTP/1.1 is still offered on the same port.
    let (_, out) = curl(&[&base[..], &["--http1.1", "-H", key.as_str(), url.as_str()]].concat());
    assert!(out.ends_with("\n200 1.1"), "{out}");

    // h2c with prior knowledge on the plain listener.
    let plain = gw.url("/prod/echo/a");
    let (_, out) = curl(&[
        "-w",
        "\n%{http_code} %{http_version}",
        "--http2-prior-knowledge",
        "-H",
        key.as_str(),
        plain.as_str(),
    ]);
    assert!(out.ends_with("\n200 2"), "{out}");
    assert!(out.contains("\"x-forwarded-proto\":\"http\""), "{out}");
    // The access log has each stream (written off the request path: read once it is there).
    let mut log = gw.stderr();
    for _ in 0..200 {
        if log.matches("\"path\":\"/prod/echo/a\"").count() >= 4 {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(25)).await;
        log = gw.stderr();
    }
    assert!(
        log.matches("\"path\":\"/prod/echo/a\"").count() >= 4,
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn multiplexed_streams_are_admitted_and_counted_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, ca) = start(dir.path(), "").await;
    let mut client = h2_over_tls(gw.tls.unwrap(), &ca).await;

    // 100 streams at once on one connection: 40 against a quota of 30, 20 against a burst of
    // 10, 20 with a key that does not exist, 20 without a key.
    let mut kinds = Vec::new();
    kinds.extend(std::iter::repeat_n(Some(QUOTA_KEY), 40));
    kinds.extend(std::iter::repeat_n(Some(BURST_KEY), 20));
    kinds.extend(std::iter::repeat_n(
        Some("noSuchKey0123456789abcdefghijk"),
        20,
    ));
    kinds.extend(std::iter::repeat_n(None, 20));
    let mut pending = Vec::new();
    for (i, key) in kinds.iter().enumerate() {
        let mut req = http::Request::get(format!("https://api.test/prod/echo/{i}"));
        if let Some(key) = key {
            req = req.header("x-api-key", *key);
        }
        client = client.ready().await.unwrap();
        let (resp, _) = client.send_request(req.body(()).unwrap(), true).unwrap();
        pending.push(tokio::spawn(read(resp)));
    }
    let mut answers = std::collections::BTreeMap::<(Option<&str>, u16, String), usize>::new();
    for (i, (key, task)) in kinds.iter().zip(pending).enumerate() {
        let (parts, body) = task.await.unwrap().unwrap();
        assert!(parts.headers.contains_key("x-amzn-requestid"), "{parts:?}");
        let body = String::from_utf8_lossy(&body).into_owned();
        let what = if parts.status == 200 {
            // Each stream got its own answer: the upstream saw this stream's path.
            assert!(body.contains(&format!("\"uri\":\"/echo/{i}\"")), "{body}");
            "upstream".to_string()
        } else {
            body
        };
        *answers
            .entry((*key, parts.status.as_u16(), what))
            .or_default() += 1;
    }
    let limit_exceeded = r#"{"message":"Limit Exceeded"}"#.to_string();
    let too_many = r#"{"message":"Too Many Requests"}"#.to_string();
    let forbidden = r#"{"message":"Forbidden"}"#.to_string();
    let expected = std::collections::BTreeMap::from([
        ((Some(QUOTA_KEY), 200, "upstream".to_string()), 30),
        ((Some(QUOTA_KEY), 429, limit_exceeded), 10),
        ((Some(BURST_KEY), 200, "upstream".to_string()), 10),
        ((Some(BURST_KEY), 429, too_many), 10),
        (
            (
                Some("noSuchKey0123456789abcdefghijk"),
                403,
                forbidden.clone(),
            ),
            20,
        ),
        ((None, 403, forbidden), 20),
    ]);
    assert_eq!(answers, expected);

    // Metered once per admitted stream: the stored usage says 30.
    let admin = AdminClient::new(gw.admin.unwrap());
    let plan_id = admin.plan_id("quota").await;
    let today = util::today();
    let usage_path = format!("/usageplans/{plan_id}/usage?startDate={today}&endDate={today}");
    let usage = admin.ok("GET", &usage_path, "").await;
    let values = usage["values"].as_object().unwrap();
    assert_eq!(values.len(), 1, "{usage}");
    assert_eq!(
        values.values().next().unwrap(),
        &serde_json::json!([[30, 0]])
    );

    // The connection goes on: a stream with a header list over the bound is refused on its own,
    // the next one is served.
    let req = http::Request::get("https://api.test/prod/echo/big")
        .header("x-api-key", KEY)
        .header("x-big", "b".repeat(70 * 1024))
        .body(())
        .unwrap();
    client = client.ready().await.unwrap();
    let refused = match client.send_request(req, true) {
        Ok((resp, _)) => read(resp).await.map(|(p, _)| p.status.as_u16()),
        Err(e) => Err(e),
    };
    assert!(
        matches!(refused, Ok(431) | Err(_)),
        "an oversized header list is refused: {refused:?}"
    );
    let (parts, _) = get(&mut client, "/prod/echo/after", Some(KEY))
        .await
        .unwrap();
    assert_eq!(parts.status, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn streams_are_bounded_per_connection() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, ca) = start(dir.path(), "http2: { maxConcurrentStreams: 3 }").await;
    let mut client = h2_over_tls(gw.tls.unwrap(), &ca).await;
    let (parts, _) = get(&mut client, "/prod/echo/a", Some(KEY)).await.unwrap();
    assert_eq!(parts.status, 200);
    assert_eq!(client.current_max_send_streams(), 3);

    // Each running stream takes one of the gateway's maxConnections slots (it may hold an upstream
    // connection, a descriptor, of its own), and one connection's streams at most a quarter of them
    // (the rest wait their turn): with 8, two streams at a time, and all five served.
    let dir = tempfile::tempdir().unwrap();
    let (gw, ca) = start(dir.path(), "maxConnections: 8").await;
    let slow_streams = |client: h2::client::SendRequest<Bytes>, ms: u64| async move {
        let mut client = client;
        let mut pending = Vec::new();
        for _ in 0..5 {
            let req = http::Request::get(format!("https://api.test/prod/slow?ms={ms}"))
                .header("x-api-key", KEY)
                .body(())
                .unwrap();
            client = client.ready().await.unwrap();
            let (resp, _) = client.send_request(req, true).unwrap();
            pending.push(tokio::spawn(read(resp)));
        }
        let (mut served, mut refused) = (0, 0);
        for task in pending {
            match task.await.unwrap() {
                Ok((parts, _)) if parts.status == 200 => served += 1,
                Err(e) if e.reason() == Some(h2::Reason::REFUSED_STREAM) => refused += 1,
                other => panic!("{other:?}"),
            }
        }
        (served, refused)
    };
    let client = h2_over_tls(gw.tls.unwrap(), &ca).await;
    assert_eq!(slow_streams(client, 200).await, (5, 0));
    // With the other slots held by connections of their own (six, and this one), a stream that
    // finds none free is refused at once, for the client to retry.
    let held: Vec<_> = (0..6)
        .map(|_| std::net::TcpStream::connect(gw.tls.unwrap()).unwrap())
        .collect();
    let mut client = h2_over_tls(gw.tls.unwrap(), &ca).await;
    let (parts, _) = get(&mut client, "/prod/echo/a", Some(KEY)).await.unwrap();
    assert_eq!(parts.status, 200, "the last slot");
    // The first stream holds the last slot for two seconds, well past the others' refusals.
    assert_eq!(slow_streams(client.clone(), 2000).await, (1, 4));
    drop(held);
    let (parts, _) = get(&mut client, "/prod/echo/after", Some(KEY))
        .await
        .unwrap();
    assert_eq!(parts.status, 200, "the slots are given back");

    // Off: ALPN offers HTTP/1.1 only, and prior knowledge gets an HTTP/1 answer.
    let dir = tempfile::tempdir().unwrap();
    let (gw, _) = start(dir.path(), "http2: { enabled: false }").await;
    let port = gw.tls.unwrap().port();
    let url = format!("https://api.test:{port}/prod/echo/a");
    let key = format!("x-api-key: {KEY}");
    let base = api_args(dir.path(), port);
    let base: Vec<&str> = base.iter().map(String::as_str).collect();
    let (_, out) = curl(&[&base[..], &["--http2", "-H", key.as_str(), url.as_str()]].concat());
    assert!(out.ends_with("\n200 1.1"), "{out}");
    let (_, out) = curl(&["--http2-prior-knowledge", gw.url("/prod/echo/a").as_str()]);
    assert!(!out.ends_with("200"), "{out}");
}

/// Appends an HTTP/2 frame. The attacker below writes frames itself: a well-behaved client library
/// does not put a stream it has already cancelled on the wire.
pub(crate) fn frame(out: &mut Vec<u8>, kind: u8, flags: u8, stream: u32, payload: &[u8]) {
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes()[1..]);
    out.extend_from_slice(&[kind, flags]);
    out.extend_from_slice(&stream.to_be_bytes());
    out.extend_from_slice(payload);
}

/// A header block of literal fields without indexing or Huffman coding (RFC 7541 §6.2.2).
pub(crate) fn header_block(fields: &[(&str, &str)]) -> Vec<u8> {
    let mut block = Vec::new();
    for (name, value) in fields {
        assert!(name.len() < 127 && value.len() < 127, "one-byte lengths");
        block.push(0);
        block.push(name.len() as u8);
        block.extend_from_slice(name.as_bytes());
        block.push(value.len() as u8);
        block.extend_from_slice(value.as_bytes());
    }
    block
}

/// CVE-2023-44487 against `addr`: HEADERS, then RST_STREAM, stream after stream, answers never
/// read; in batches of 50 streams, or one at a time with the reset 1 ms after its request when
/// `paced` (so that the gateway has begun work on it). Returns how many streams were opened before
/// the gateway closed the connection, and its GOAWAY's error code.
async fn flood(addr: SocketAddr, paced: bool) -> (u32, Option<u32>) {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let (mut from_gw, mut to_gw) = TcpStream::connect(addr).await.unwrap().into_split();
    let block = header_block(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "api.test"),
        // Answered after 200 ms: a reset 1 ms after the request always finds its work under way.
        (":path", "/prod/slow?ms=200"),
        ("x-api-key", KEY),
    ]);
    let flood = tokio::spawn(async move {
        let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        frame(&mut out, 4, 0, 0, &[]);
        let mut stream = 1u32;
        while stream < 40_000 {
            for _ in 0..if paced { 1 } else { 50 } {
                frame(&mut out, 1, 0x4 | 0x1, stream, &block);
                if paced {
                    if to_gw.write_all(&out).await.is_err() {
                        return stream / 2;
                    }
                    out.clear();
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                frame(&mut out, 3, 0, stream, &0x8u32.to_be_bytes());
                stream += 2;
            }
            if to_gw.write_all(&out).await.is_err() {
                break;
            }
            out.clear();
        }
        stream / 2
    });
    // The gateway's frames until it closes; the GOAWAY's error code.
    let told = tokio::spawn(async move {
        let mut buf = Vec::new();
        let mut goaway = None;
        let mut chunk = [0u8; 16 * 1024];
        loop {
            match from_gw.read(&mut chunk).await {
                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                _ => break,
            }
            while buf.len() >= 9 {
                let len = u32::from_be_bytes([0, buf[0], buf[1], buf[2]]) as usize;
                if buf.len() < 9 + len {
                    break;
                }
                if buf[3] == 7 && len >= 8 {
                    goaway = Some(u32::from_be_bytes(buf[13..17].try_into().unwrap()));
                }
                buf.drain(..9 + len);
            }
        }
        goaway
    });
    let goaway = tokio::time::timeout(Duration::from_secs(60), told)
        .await
        .expect("the gateway closes the connection")
        .unwrap();
    (flood.await.unwrap(), goaway)
}

#[tokio::test(flavor = "multi_thread")]
async fn rapid_reset_is_cut_off_without_stalling_other_connections() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, _) = start(dir.path(), "").await;
    let (mut other, _) = h2c(gw.addr).await;
    let addr = gw.addr;
    // Resets that arrive with their requests are refused by h2 before any work (its pending-accept
    // limit); resets that arrive after the work has begun are counted by the gateway.
    let floods = tokio::spawn(async move { (flood(addr, false).await, flood(addr, true).await) });

    // Meanwhile another client is served.
    for i in 0..20 {
        let (parts, _) = get(&mut other, &format!("/prod/echo/other{i}"), Some(KEY))
            .await
            .unwrap();
        assert_eq!(parts.status, 200);
    }
    let (burst, paced) = floods.await.unwrap();
    assert_eq!(burst.1, Some(0xb), "GOAWAY ENHANCE_YOUR_CALM");
    assert_eq!(paced.1, Some(0xb), "GOAWAY ENHANCE_YOUR_CALM");
    // (A burst's count says only what the socket took; paced streams were each seen.)
    assert!(paced.0 < 1_000, "cut off after {} streams", paced.0);
    // Still serving, and both cut-offs are counted.
    let (parts, _) = get(&mut other, "/prod/echo/after", Some(KEY))
        .await
        .unwrap();
    assert_eq!(parts.status, 200);
    let text = gw.metrics().await;
    assert!(
        text.contains("tollgate_http2_rapid_reset_total 2"),
        "{text}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn idle_connections_close_and_a_drain_finishes_streams_in_flight() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, _) = start(dir.path(), "headerTimeout: 1s").await;

    // No stream for one to two header timeouts: the gateway says goodbye.
    let (mut idle, idle_conn) = h2c(gw.addr).await;
    let (parts, _) = get(&mut idle, "/prod/echo/a", Some(KEY)).await.unwrap();
    assert_eq!(parts.status, 200);
    tokio::time::timeout(Duration::from_secs(10), idle_conn)
        .await
        .expect("an idle HTTP/2 connection is closed")
        .unwrap()
        .unwrap();

    // SIGTERM with a stream in flight: it is answered, then the connection and the process end.
    let (mut busy, _) = h2c(gw.addr).await;
    let req = http::Request::get("http://api.test/prod/slow?ms=700")
        .header("x-api-key", KEY)
        .body(())
        .unwrap();
    busy = busy.ready().await.unwrap();
    let (resp, _) = busy.send_request(req, true).unwrap();
    let in_flight = tokio::spawn(read(resp));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let stopped = tokio::task::spawn_blocking(move || gw.terminate());
    let (parts, _) = in_flight.await.unwrap().unwrap();
    assert_eq!(parts.status, 200);
    assert!(stopped.await.unwrap().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_preface_split_across_reads_is_still_http2() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let dir = tempfile::tempdir().unwrap();
    let (gw, _) = start(dir.path(), "").await;
    let mut s = TcpStream::connect(gw.addr).await.unwrap();
    // The HTTP/1 parser gives up at the version, before the preface's first line is whole.
    s.write_all(b"PRI * HTTP/2").await.unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut rest = b".0\r\n\r\nSM\r\n\r\n".to_vec();
    frame(&mut rest, 4, 0, 0, &[]);
    let block = header_block(&[
        (":method", "GET"),
        (":scheme", "http"),
        (":authority", "api.test"),
        (":path", "/prod/echo/split"),
        ("x-api-key", KEY),
    ]);
    frame(&mut rest, 1, 0x4 | 0x1, 1, &block);
    s.write_all(&rest).await.unwrap();
    // The gateway's SETTINGS, then (maybe after other frames) the stream's HEADERS: `:status: 200`.
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let status = loop {
        let n = tokio::time::timeout(Duration::from_secs(10), s.read(&mut chunk))
            .await
            .expect("an answer")
            .unwrap();
        assert!(n > 0, "closed: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
        let mut at = 0;
        let mut found = None;
        while buf.len() >= at + 9 {
            let len = u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
            if buf[at + 3] == 1 && buf.len() > at + 9 {
                found = Some(buf[at + 9]);
                break;
            }
            at += 9 + len;
        }
        if let Some(first) = found {
            break first;
        }
    };
    assert_eq!(status, 0x88);
}

/// One HTTP/2 connection that leaves every stream's window at zero (SETTINGS_INITIAL_WINDOW_SIZE 0,
/// never a WINDOW_UPDATE) holds at most a quarter of `maxConnections`, and each stalled stream is
/// reset after a header timeout without credit, its slot freed.
#[tokio::test(flavor = "multi_thread")]
async fn streams_left_without_credit_are_reset_and_hold_a_fair_share() {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    util::write_config(
        dir.path(),
        &util::config(
            &format!("http://{}", up.addr),
            &format!("maxConnections: 40\nheaderTimeout: 1s\n{}", util::ONE_PLAN),
        ),
    );
    let gw = Gateway::start(dir.path(), &util::admin_env());
    let tcp = TcpStream::connect(gw.addr).await.unwrap();
    let (client, conn) = h2::client::Builder::new()
        .initial_window_size(0)
        .handshake::<_, Bytes>(tcp)
        .await
        .unwrap();
    tokio::spawn(conn);
    let mut streams = Vec::new();
    // As many as there are slots: without a fair share, they would take them all.
    for _ in 0..40 {
        let req = http::Request::get("http://gw/prod/echo/stall")
            .header("x-api-key", KEY)
            .body(())
            .unwrap();
        let mut client = client.clone().ready().await.unwrap();
        let (resp, _) = client.send_request(req, true).unwrap();
        streams.push(tokio::spawn(async move {
            let (parts, mut body) = resp.await?.into_parts();
            assert_eq!(parts.status, 200);
            // Never released: the window stays at zero.
            match body.data().await {
                Some(Err(e)) => Err::<(), _>(e),
                other => panic!("a stream without credit got {other:?}"),
            }
        }));
    }
    // While the streams stall, the other slots serve everyone else.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let c = util::client();
    for _ in 0..5 {
        assert_eq!(c.get(&gw.url("/prod/health"), None).await.status, 200);
    }
    // Each stalled stream is reset (CANCEL), ten at a time, each after a header timeout.
    for s in streams {
        let e = tokio::time::timeout(Duration::from_secs(20), s)
            .await
            .expect("a stalled stream was never reset")
            .unwrap()
            .unwrap_err();
        assert_eq!(e.reason(), Some(h2::Reason::CANCEL), "{e}");
    }
}

/// A GET whose END_STREAM comes on an empty DATA frame (HEADERS without END_STREAM, then DATA with
/// no bytes) is a bodiless request: served, not refused as a GET with a body.
#[tokio::test(flavor = "multi_thread")]
async fn a_get_ended_by_an_empty_data_frame_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, _) = start(dir.path(), "").await;
    let (mut client, _conn) = h2c(gw.addr).await;
    let req = http::Request::get("http://gw/prod/echo/empty-data")
        .header("x-api-key", KEY)
        .body(())
        .unwrap();
    client = client.ready().await.unwrap();
    let (resp, mut stream) = client.send_request(req, false).unwrap();
    stream.send_data(Bytes::new(), true).unwrap();
    let (parts, body) = read(resp).await.unwrap();
    assert_eq!(parts.status, 200, "{body:?}");
    let echo: serde_json::Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(echo["method"], "GET");
    assert!(echo["headers"].get("transfer-encoding").is_none(), "{echo}");
    // With bytes in its DATA, it is still a GET with a body: refused.
    let req = http::Request::get("http://gw/prod/echo/with-data")
        .header("x-api-key", KEY)
        .body(())
        .unwrap();
    client = client.ready().await.unwrap();
    let (resp, mut stream) = client.send_request(req, false).unwrap();
    stream.send_data(Bytes::from_static(b"x"), true).unwrap();
    assert_eq!(read(resp).await.unwrap().0.status, 400);
}

/// `maxRequestBodySize` holds over HTTP/2 as over HTTP/1.1: a declared length over it is refused
/// before anything goes upstream, and a body without one is cut off once it passes it: with 413, or,
/// when the upstream (this one echoes as it reads) has already answered, by resetting the stream, so
/// that neither side waits for the rest.
#[tokio::test(flavor = "multi_thread")]
async fn bodies_over_the_limit_are_refused_over_http2() {
    let dir = tempfile::tempdir().unwrap();
    let (gw, _) = start(dir.path(), "maxRequestBodySize: 1KB").await;
    let (mut client, _conn) = h2c(gw.addr).await;
    // POSTs `data` (in `frames` DATA frames) to the echo route, with `content-length` when
    // `declared`.
    async fn post(
        client: &mut h2::client::SendRequest<Bytes>,
        data: &[u8],
        frames: usize,
        declared: bool,
    ) -> Result<(http::response::Parts, Bytes), h2::Error> {
        let mut req = http::Request::post("http://gw/prod/echo/body").header("x-api-key", KEY);
        if declared {
            req = req.header("content-length", data.len());
        }
        *client = client.clone().ready().await.unwrap();
        let (resp, mut stream) = client.send_request(req.body(()).unwrap(), false).unwrap();
        let size = data.len().div_ceil(frames);
        for (i, chunk) in data.chunks(size).enumerate() {
            stream.reserve_capacity(chunk.len());
            let last = (i + 1) * size >= data.len();
            // The gateway may answer and reset the stream before it has taken every frame.
            let _ = stream.send_data(Bytes::copy_from_slice(chunk), last);
        }
        tokio::time::timeout(Duration::from_secs(30), read(resp))
            .await
            .expect("the stream was left waiting")
    }
    let (parts, _) = post(&mut client, &[b'a'; 2000], 2, true).await.unwrap();
    assert_eq!(parts.status, 413);
    for _ in 0..5 {
        match post(&mut client, &[b'b'; 1800], 3, false).await {
            Ok((parts, body)) => assert_eq!(parts.status, 413, "{body:?}"),
            Err(e) => assert_eq!(e.reason(), Some(h2::Reason::CANCEL), "{e}"),
        }
    }
    let (parts, body) = post(&mut client, &[b'c'; 1024], 4, false).await.unwrap();
    assert_eq!(parts.status, 200);
    assert_eq!(&body[..], &[b'c'; 1024][..]);
    let (parts, _) = post(&mut client, &[b'd'; 1024], 1, true).await.unwrap();
    assert_eq!(parts.status, 200);
}
