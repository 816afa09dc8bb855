//! Webhooks: events delivered from the outbox to a real receiver on 127.0.0.1, signed as the
//! README's recipes (run here in Python and JavaScript) verify, retried while the receiver fails,
//! kept as failed, retried by an operator; on SQLite and by two instances on one Redis.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::json;

use crate::util::{self, Gateway};

const SECRET: &str = "whsec_0123456789abcdef";

/// A webhook receiver: keeps what it was sent, answers `status`.
struct Receiver {
    addr: std::net::SocketAddr,
    status: Arc<AtomicU16>,
    got: Arc<Mutex<Vec<(http::HeaderMap, Bytes)>>>,
}

impl Receiver {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let status = Arc::new(AtomicU16::new(200));
        let got: Arc<Mutex<Vec<(http::HeaderMap, Bytes)>>> = Arc::default();
        let (s, g) = (status.clone(), got.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (s, g) = (s.clone(), g.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (s, g) = (s.clone(), g.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let code = s.load(Ordering::SeqCst);
                            if code == 200 {
                                g.lock().unwrap().push((parts.headers, body));
                            }
                            let mut resp = Response::new(Full::new(Bytes::new()));
                            *resp.status_mut() = http::StatusCode::from_u16(code).unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receiver { addr, status, got }
    }

    /// What it took (answered 200), once `n` deliveries are in.
    async fn until(&self, n: usize) -> Vec<(http::HeaderMap, Bytes)> {
        for _ in 0..400 {
            if self.got.lock().unwrap().len() >= n {
                break;
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        self.got.lock().unwrap().clone()
    }
}

fn gateway(up: &util::Upstream, hook: &Receiver, dir: &std::path::Path, store: &str) -> Gateway {
    let extra = format!(
        "admin: {{ listen: 127.0.0.1:0 }}\n\
         webhooks:\n\
         \x20 - {{ name: ops, url: \"http://{0}/hooks\", secret: \"{SECRET}\", retryFor: 3s }}\n\
         \x20 - {{ name: chat, url: \"http://{0}/chat\", format: slack }}\n",
        hook.addr
    );
    let yaml = util::config(&format!("http://{}", up.addr), &extra).replace(
        "store: { sqlite: ./tollgate.db, flushInterval: 200ms }",
        store,
    );
    util::write_config(dir, &yaml);
    Gateway::start(dir, &util::admin_env())
}

/// The README's recipe in `language` (`python`, `javascript`), run on a delivery: whether it says
/// the delivery is genuine.
fn readme_verifies(language: &str, header: &str, body: &[u8]) -> bool {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../README.md")).unwrap();
    let marker = format!("<!-- verify-{language} -->");
    let start = readme.find(&marker).unwrap();
    let code = &readme[start..];
    let code = &code[code.find('\n').unwrap() + 1..];
    let code = &code[code.find('\n').unwrap() + 1..];
    let recipe = &code[..code.find("```").unwrap()];
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("body"), body).unwrap();
    let (program, script) = match language {
        "python" => (
            "python3",
            format!(
                "{recipe}\nimport sys\nbody = open(sys.argv[1], 'rb').read()\nsys.exit(0 if verify({SECRET:?}, sys.argv[2], body) else 1)\n"
            ),
        ),
        _ => (
            "node",
            format!(
                "{recipe}\nconst body = require('node:fs').readFileSync(process.argv[2]);\nprocess.exit(verify({SECRET:?}, process.argv[3], body) ? 0 : 1);\n"
            ),
        ),
    };
    let file = dir.path().join("verify");
    std::fs::write(&file, script).unwrap();
    let status = std::process::Command::new(program)
        .arg(&file)
        .arg(dir.path().join("body"))
        .arg(header)
        .status()
        .unwrap_or_else(|e| panic!("{program}: {e}"));
    status.success()
}

async fn deliveries_hold(store: &str) {
    let up = util::upstream().await;
    let hook = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = gateway(&up, &hook, dir.path(), store);
    let cli = |args: &[&str]| -> serde_json::Value {
        let mut all = vec!["events"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--output", "json"]);
        serde_json::from_str(&util::cli(&gw, &all)).unwrap()
    };

    // Delivered at once, signed; the README's recipes accept it, and refuse it tampered with.
    let sent = cli(&["test", "ops"]);
    let id = sent["id"].as_str().unwrap().to_owned();
    let got = hook.until(1).await;
    let (headers, body) = &got[0];
    let event: serde_json::Value = serde_json::from_slice(body).unwrap();
    assert_eq!(
        (&event["id"], &event["type"]),
        (&json!(id), &json!("webhook.test"))
    );
    assert_eq!(headers["tollgate-event-id"], id.as_str());
    let signature = headers["tollgate-signature"].to_str().unwrap();
    assert!(
        signature.starts_with("t=") && signature.contains(",v1="),
        "{signature}"
    );
    for language in ["python", "javascript"] {
        if language == "javascript" && !util::have("node", &["--version"], "apt install nodejs") {
            continue;
        }
        assert!(readme_verifies(language, signature, body), "{language}");
        let mut tampered = body.to_vec();
        tampered[1] ^= 1;
        assert!(
            !readme_verifies(language, signature, &tampered),
            "{language}: tampered"
        );
    }
    // Slack gets a message.
    cli(&["test", "chat"]);
    let got = hook.until(2).await;
    assert_eq!(
        got[1].1,
        Bytes::from(r#"{"text":"tollgate: webhook.test"}"#)
    );

    // A receiver down for a while gets it once it is back.
    hook.status.store(503, Ordering::SeqCst);
    cli(&["test", "ops"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    hook.status.store(200, Ordering::SeqCst);
    assert_eq!(hook.until(3).await.len(), 3);

    // A receiver that stays down past retryFor (3 s): the event is kept as failed, then retried.
    hook.status.store(500, Ordering::SeqCst);
    let failing = cli(&["test", "ops"])["id"].as_str().unwrap().to_owned();
    let mut failed = json!([]);
    for _ in 0..100 {
        failed = cli(&["list"])["item"].clone();
        if failed.as_array().is_some_and(|f| !f.is_empty()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(failed[0]["id"], failing.as_str(), "{failed}");
    assert!(failed[0]["attempts"].as_u64().unwrap() >= 2, "{failed}");
    assert!(
        failed[0]["lastError"].as_str().unwrap().contains("500"),
        "{failed}"
    );
    hook.status.store(200, Ordering::SeqCst);
    // Across a restart, the failed event is still there.
    assert!(gw.terminate().success());
    let gw = gateway(&up, &hook, dir.path(), store);
    let retried = serde_json::from_str::<serde_json::Value>(&util::cli(
        &gw,
        &["events", "retry", &failing, "--output", "json"],
    ))
    .unwrap();
    assert_eq!(retried["status"], "pending");
    let got = hook.until(4).await;
    let last: serde_json::Value = serde_json::from_slice(&got[3].1).unwrap();
    assert_eq!(last["id"], failing.as_str());
    assert_eq!(got.len(), 4, "each event delivered once");
    let list = util::cli(&gw, &["events", "list", "--output", "json"]);
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&list).unwrap()["item"],
        json!([])
    );
    // An unknown webhook, or an event that has not failed: 404.
    let admin = util::AdminClient::new(gw.admin.unwrap());
    assert_eq!(
        admin
            .call("POST", "/tollgate/webhooks/nope/test", "")
            .await
            .status,
        404
    );
    let again = format!("/tollgate/events/{failing}/retry");
    assert_eq!(admin.call("POST", &again, "").await.status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_are_delivered_signed_retried_and_kept_when_failed_on_sqlite() {
    deliveries_hold("store: { sqlite: ./tollgate.db, flushInterval: 200ms }").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn webhooks_are_delivered_signed_retried_and_kept_when_failed_on_redis() {
    if !util::have("redis-server", &["--version"], "apt install redis-server") {
        return;
    }
    let redis = tollgate_store::testing::RedisServer::start();
    deliveries_hold(&format!(
        "store: {{ redis: {{ url: \"{}\" }} }}",
        redis.url()
    ))
    .await;
}

/// Two instances on one Redis deliver each event once.
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_deliver_each_event_once() {
    if !util::have("redis-server", &["--version"], "apt install redis-server") {
        return;
    }
    let redis = tollgate_store::testing::RedisServer::start();
    let store = format!("store: {{ redis: {{ url: \"{}\" }} }}", redis.url());
    let up = util::upstream().await;
    let hook = Receiver::start().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let gws: Vec<Gateway> = dirs
        .iter()
        .map(|d| gateway(&up, &hook, d.path(), &store))
        .collect();
    for i in 0..10 {
        util::cli(&gws[i % 2], &["events", "test", "ops"]);
    }
    let got = hook.until(10).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let got_later = hook.got.lock().unwrap().len();
    let mut ids: Vec<String> = got
        .iter()
        .map(|(h, _)| h["tollgate-event-id"].to_str().unwrap().to_owned())
        .collect();
    ids.sort();
    ids.dedup();
    assert_eq!((ids.len(), got_later), (10, 10), "ten events, each once");
}
