use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use crate::http2;
use crate::util::{self, Gateway, KEY, SloppyUpstream};

fn config(upstream: &str) -> String {
    util::config_with_routes(
        &format!(
            r#"      - {{ path: /health, method: GET, upstream: "http://{upstream}" }}
      - {{ path: "/search", method: GET, allowGetBody: true, upstream: "http://{upstream}" }}
      - {{ path: "/sloppy/{{x}}", method: POST, upstream: "http://{upstream}" }}
      - {{ path: "/upload", method: POST, upstream: "http://{upstream}" }}
      - {{ path: "/victim/{{n}}", method: GET, apiKeyRequired: true, upstream: "http://{upstream}" }}
      - {{ path: "/registrations/{{id}}/warranty", method: ANY, apiKeyRequired: true, upstream: "http://{upstream}" }}
"#
        ),
        "",
    )
}

async fn start() -> (tempfile::TempDir, Gateway, SloppyUpstream) {
    let up = util::sloppy_upstream().await;
    let dir = tempfile::tempdir().unwrap();
    util::write_config(dir.path(), &config(&up.addr.to_string()));
    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);
    (dir, gw, up)
}

const HIDDEN: &str = "GET /registrations/666/warranty HTTP/1.1\r\nHost: x\r\n\r\n";

fn reached_private(up: &SloppyUpstream) -> bool {
    up.served()
        .iter()
        .any(|s| s.path.starts_with("/registrations") && s.api_key.as_deref() != Some(KEY))
}

#[tokio::test(flavor = "multi_thread")]
async fn requests_hidden_in_bodies_and_trailers_never_reach_the_upstream() {
    let (_dir, gw, up) = start().await;
    let addr = gw.addr;
    let answers = tokio::task::spawn_blocking(move || {
        let attacks = [
            // A body on GET, where the upstream does not read one.
            format!(
                "GET /prod/health HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\n\r\n{HIDDEN}",
                HIDDEN.len()
            ),
            format!(
                "HEAD /prod/health HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\n\r\n{HIDDEN}",
                HIDDEN.len()
            ),
            format!(
                "GET /prod/health HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n{HIDDEN}\r\n0\r\n\r\n",
                HIDDEN.len()
            ),
            // A trailer section holding a request line (the upstream does not read trailers).
            "POST /prod/upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nGET /registrations/666/warranty HTTP/1.1\r\nHost: x\r\n\r\n".to_string(),
            // A well-formed trailer field, then the hidden request.
            "POST /prod/upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nX-T: 1\r\nGET /registrations/666/warranty HTTP/1.1\r\n\r\n".to_string(),
            // A bare LF in a chunk extension, where lenient parsers end the line.
            "POST /prod/upload HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\n3;x\nGET /registrations/666/warranty HTTP/1.1\r\n\r\nabc\r\n0\r\n\r\n".to_string(),
            // Two lengths, and a length with a coding.
            format!(
                "POST /prod/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{HIDDEN}",
                HIDDEN.len()
            ),
            format!(
                "POST /prod/upload HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{HIDDEN}",
                HIDDEN.len() + 5
            ),
            // Two Host fields, two keys.
            "GET /prod/health HTTP/1.1\r\nHost: gw\r\nHost: other\r\n\r\n".to_string(),
            format!("GET /prod/victim/1 HTTP/1.1\r\nHost: gw\r\nx-api-key: {KEY}\r\nx-api-key: other\r\n\r\n"),
            "GET /prod/health HTTP/1.1\r\n\r\n".to_string(),
        ];
        attacks
            .iter()
            .map(|a| (a.clone(), util::raw_exchange(addr, a.as_bytes())))
            .collect::<Vec<_>>()
    })
    .await
    .unwrap();
    for (attack, answer) in &answers {
        // 400, or 403 for HEAD, which the route does not have.
        assert!(
            matches!(util::status_of(answer), Some(400 | 403)),
            "{attack:?} was not refused: {answer}"
        );
        // The hidden request's path, not "666" alone: a random request id may hold that.
        assert!(!answer.contains("/registrations/666"), "{answer}");
    }
    assert!(
        !reached_private(&up),
        "a hidden request reached the upstream: {:?}",
        up.served()
    );

    // A route that takes bodies on GET (a search API) gets them, framed: the upstream sees one
    // request, whatever it makes of the body.
    let answer = tokio::task::spawn_blocking(move || {
        util::raw_exchange(
            addr,
            b"GET /prod/search HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\nConnection: close\r\n\r\n{}",
        )
    })
    .await
    .unwrap();
    assert!(answer.ends_with("served GET /search"), "{answer}");
}

/// Reads one response with a `content-length` from `s`; returns its body.
fn read_response(s: &mut TcpStream) -> Option<String> {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    while !got.ends_with(b"\r\n\r\n") {
        match s.read(&mut byte) {
            Ok(1) => got.push(byte[0]),
            _ => return None,
        }
    }
    let head = String::from_utf8_lossy(&got).to_ascii_lowercase();
    let length: usize = head
        .split("\r\n")
        .find_map(|l| l.strip_prefix("content-length: "))
        .and_then(|v| v.trim().parse().ok())?;
    let mut body = vec![0u8; length];
    s.read_exact(&mut body).ok()?;
    Some(String::from_utf8_lossy(&body).into_owned())
}

/// A keyless attacker smuggles requests through a body the upstream misreads (a POST route whose
/// upstream ignores bodies: the upstream's bug), while keyed victims use the gateway at the same
/// time. The smuggled requests run, but no answer ever reaches another client: the attacker gets
/// answers to its own requests only (smuggled ones included), each victim exactly its own.
#[tokio::test(flavor = "multi_thread")]
async fn responses_never_cross_between_clients() {
    let (_dir, gw, up) = start().await;
    let addr = gw.addr;
    let rounds = 20;
    let attacker = tokio::task::spawn_blocking(move || {
        let mut wrong = Vec::new();
        for round in 0..rounds {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            let smuggled =
                format!("GET /prod/victim/{round} HTTP/1.1\r\nHost: x\r\nx-api-key: {KEY}\r\n\r\n");
            let post = format!(
                "POST /prod/sloppy/{round} HTTP/1.1\r\nHost: gw\r\nContent-Length: {}\r\n\r\n{smuggled}",
                smuggled.len()
            );
            let own = [
                format!("served POST /sloppy/{round}"),
                format!("served GET /prod/victim/{round}"),
                format!("served POST /sloppy/next{round}"),
            ];
            s.write_all(post.as_bytes()).unwrap();
            let first = read_response(&mut s);
            if first.as_deref() != Some(own[0].as_str()) {
                wrong.push(format!("round {round}: POST answered {first:?}"));
            }
            std::thread::sleep(Duration::from_millis(2));
            s.write_all(
                format!("POST /prod/sloppy/next{round} HTTP/1.1\r\nHost: gw\r\nContent-Length: 0\r\n\r\n")
                    .as_bytes(),
            )
            .unwrap();
            let second = read_response(&mut s);
            if !second.as_ref().is_some_and(|a| own.contains(a)) {
                wrong.push(format!("round {round}: next request answered {second:?}"));
            }
        }
        wrong
    });
    let victims = tokio::task::spawn_blocking(move || {
        let mut wrong = Vec::new();
        for n in 0..rounds * 5 {
            let mut s = TcpStream::connect(addr).unwrap();
            s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            for i in 0..2 {
                let path = format!("/victim/{}", 1000 + n * 2 + i);
                s.write_all(
                    format!("GET /prod{path} HTTP/1.1\r\nHost: gw\r\nx-api-key: {KEY}\r\n\r\n")
                        .as_bytes(),
                )
                .unwrap();
                let got = read_response(&mut s);
                if got.as_deref() != Some(&format!("served GET {path}")) {
                    wrong.push(format!("{path} answered {got:?}"));
                }
            }
        }
        wrong
    });
    let (attacker, victims) = (attacker.await.unwrap(), victims.await.unwrap());
    assert_eq!(
        attacker,
        Vec::<String>::new(),
        "the attacker got others' answers"
    );
    assert_eq!(
        victims,
        Vec::<String>::new(),
        "a victim got another's answer"
    );
    // The smuggled requests did run (this upstream is as sloppy as intended): only their answers
    // went nowhere else.
    assert!(
        up.served()
            .iter()
            .any(|s| s.path.starts_with("/prod/victim/")),
        "{:?}",
        up.served()
    );
}

/// One HTTP/2 connection (prior knowledge) carrying `frames`; the first byte of the gateway's
/// first response header block (`0x88` is `:status: 200`), if it sent one before going quiet.
async fn h2_attack(addr: std::net::SocketAddr, frames: &[u8]) -> Option<u8> {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut out = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    http2::frame(&mut out, 4, 0, 0, &[]);
    out.extend_from_slice(frames);
    s.write_all(&out).await.unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match tokio::time::timeout(Duration::from_millis(500), s.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => break,
        }
        let mut at = 0;
        while buf.len() >= at + 9 {
            let len = u32::from_be_bytes([0, buf[at], buf[at + 1], buf[at + 2]]) as usize;
            if buf[at + 3] == 1 && buf.len() > at + 9 {
                return Some(buf[at + 9]);
            }
            at += 9 + len;
        }
    }
    None
}

/// The same attacks over HTTP/2: a stream's fields and DATA cannot say anything to the pipeline
/// that HTTP/1.1 could not, and what HTTP/1.1 refuses is refused.
#[tokio::test(flavor = "multi_thread")]
async fn http2_streams_cannot_smuggle_past_the_pipeline() {
    let (_dir, gw, up) = start().await;
    let get = |path: &'static str| -> Vec<(&'static str, &'static str)> {
        vec![
            (":method", "GET"),
            (":scheme", "http"),
            (":authority", "gw"),
            (":path", path),
        ]
    };
    let with = |mut fields: Vec<(&'static str, &'static str)>,
                more: &[(&'static str, &'static str)]| {
        fields.extend_from_slice(more);
        http2::header_block(&fields)
    };
    let hidden = HIDDEN.as_bytes();
    let chunked_hidden = format!("{:x}\r\n{HIDDEN}\r\n0\r\n\r\n", HIDDEN.len());
    // (what, HEADERS block, END_STREAM on HEADERS, DATA to follow)
    type Attack<'a> = (&'a str, Vec<u8>, bool, Option<&'a [u8]>);
    let attacks: Vec<Attack<'_>> = vec![
        (
            "a body past content-length: 0",
            with(get("/prod/health"), &[("content-length", "0")]),
            false,
            Some(hidden),
        ),
        (
            "a chunked coding",
            with(get("/prod/health"), &[("transfer-encoding", "chunked")]),
            false,
            Some(chunked_hidden.as_bytes()),
        ),
        (
            "a body on GET",
            with(get("/prod/health"), &[]),
            false,
            Some(hidden),
        ),
        (
            "CR LF in :path",
            with(
                get("/prod/health HTTP/1.1\r\nHost: x\r\n\r\nGET /registrations/666/warranty"),
                &[],
            ),
            true,
            None,
        ),
        (
            "a space in :path",
            with(get("/prod/health /registrations/666/warranty"), &[]),
            true,
            None,
        ),
        (
            "CR LF in a value",
            with(
                get("/prod/health"),
                &[("x-a", "1\r\nGET /registrations/666/warranty HTTP/1.1")],
            ),
            true,
            None,
        ),
        (
            "a request line as :method",
            http2::header_block(&[
                (":method", "GET /registrations/666/warranty HTTP/1.1\r\n"),
                (":scheme", "http"),
                (":authority", "gw"),
                (":path", "/prod/health"),
            ]),
            true,
            None,
        ),
        (
            "encoded slashes",
            with(
                get("/prod/victim/..%2f..%2fregistrations%2f666%2fwarranty"),
                &[],
            ),
            true,
            None,
        ),
        (
            "dot segments",
            with(get("/prod/victim/1/../../registrations/666/warranty"), &[]),
            true,
            None,
        ),
        (
            "an absolute :path",
            with(get("http://x/registrations/666/warranty"), &[]),
            true,
            None,
        ),
        ("an asterisk :path", with(get("*"), &[]), true, None),
        (
            "CR LF in :authority",
            http2::header_block(&[
                (":method", "GET"),
                (":scheme", "http"),
                (":authority", "gw\r\nx-api-key: k"),
                (":path", "/prod/victim/1"),
            ]),
            true,
            None,
        ),
    ];
    for (what, block, ended, data) in attacks {
        let mut frames = Vec::new();
        http2::frame(&mut frames, 1, 0x4 | if ended { 0x1 } else { 0 }, 1, &block);
        if let Some(data) = data {
            http2::frame(&mut frames, 0, 0x1, 1, data);
        }
        let status = h2_attack(gw.addr, &frames).await;
        assert_ne!(status, Some(0x88), "{what}: answered 200");
    }
    assert!(
        !reached_private(&up),
        "a hidden request reached the upstream: {:?}",
        up.served()
    );
    // The same connection kind still serves a keyed request.
    let mut frames = Vec::new();
    http2::frame(
        &mut frames,
        1,
        0x5,
        1,
        &with(get("/prod/victim/1"), &[("x-api-key", KEY)]),
    );
    assert_eq!(h2_attack(gw.addr, &frames).await, Some(0x88));
    assert_eq!(
        up.served().last().map(|s| s.path.as_str()),
        Some("/victim/1")
    );
}
