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
    let Some(redis) = util::redis() else {
        return;
    };
    deliveries_hold(&util::on_redis(&redis)).await;
}

/// Two instances on one Redis deliver each event once.
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_deliver_each_event_once() {
    let Some(redis) = util::redis() else {
        return;
    };
    let store = util::on_redis(&redis);
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

const TIGHT: &str = "tightKeyValue0123456789abc";
const ACME: [&str; 2] = [
    "acmeAlertKeyAValue0123456789",
    "acmeAlertKeyBValue0123456789",
];

/// A gateway alerting at 80% and 100% of each key's quota (10 a day), and at 100% of a customer's
/// (5 a day, shared by two keys).
fn alerting_gateway(
    up: &util::Upstream,
    hook: &Receiver,
    dir: &std::path::Path,
    store: &str,
) -> Gateway {
    let extra = format!(
        "admin: {{ listen: 127.0.0.1:0 }}\n\
         webhooks:\n  - {{ name: ops, url: \"http://{hook}/hooks\", secret: \"{SECRET}\" }}\n\
         alerts:\n\
         \x20 - {{ name: quota-warn, on: quota, thresholds: [80, 100], scope: key, webhook: ops }}\n\
         \x20 - {{ name: customer-out, on: quota, thresholds: [100], scope: customer, webhook: ops }}\n\
         usagePlans:\n\
         \x20 - {{ name: tight, apiStages: [ {{ apiId: warranty, stage: prod }} ], quota: {{ limit: 10, period: DAY }} }}\n\
         \x20 - {{ name: shared, limitsShareBy: customerId, apiStages: [ {{ apiId: warranty, stage: dev }} ], quota: {{ limit: 5, period: DAY }} }}\n\
         apiKeys:\n\
         \x20 - {{ name: tight, value: {TIGHT}, usagePlans: [tight] }}\n\
         \x20 - {{ name: acme-a, value: {a}, customerId: acme, usagePlans: [shared] }}\n\
         \x20 - {{ name: acme-b, value: {b}, customerId: acme, usagePlans: [shared] }}\n",
        hook = hook.addr,
        a = ACME[0],
        b = ACME[1]
    );
    let yaml = util::config(&format!("http://{}", up.addr), &extra)
        .replace(
            "store: { sqlite: ./tollgate.db, flushInterval: 200ms }",
            store,
        )
        .replace(
            "      - name: prod\n",
            "      - name: prod\n      - name: dev\n",
        );
    util::write_config(dir, &yaml);
    Gateway::start(dir, &util::admin_env())
}

/// The events the receiver took, parsed.
fn events_of(got: &[(http::HeaderMap, Bytes)]) -> Vec<serde_json::Value> {
    got.iter()
        .map(|(_, body)| serde_json::from_slice(body).unwrap())
        .collect()
}

async fn alerts_hold(store: &str) {
    let up = util::upstream().await;
    let hook = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let gw = alerting_gateway(&up, &hook, dir.path(), store);
    let c = util::client();
    let statuses = |n: usize, path: &'static str, key: &'static str| {
        let (c, url) = (&c, gw.url(path));
        async move {
            let mut out = Vec::new();
            for _ in 0..n {
                out.push(c.get(&url, Some(key)).await.status);
            }
            out
        }
    };
    // Hammered past its quota: one event at 80%, one at 100%.
    let got = statuses(12, "/prod/echo/a", TIGHT).await;
    assert_eq!(got.iter().filter(|s| **s == 200).count(), 10);
    let events = events_of(&hook.until(2).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(hook.got.lock().unwrap().len(), 2, "once each");
    let admin = util::AdminClient::new(gw.admin.unwrap());
    let (key_id, plan_id) = (admin.key_id("tight").await, admin.plan_id("tight").await);
    let today = util::today();
    let mut thresholds: Vec<u64> = events
        .iter()
        .map(|e| e["threshold"].as_u64().unwrap())
        .collect();
    thresholds.sort_unstable();
    assert_eq!(thresholds, [80, 100]);
    let at_80 = events.iter().find(|e| e["threshold"] == 80).unwrap();
    assert_eq!(at_80["type"], "quota.threshold");
    assert_eq!(
        (
            &at_80["keyId"],
            &at_80["keyName"],
            &at_80["usagePlanId"],
            &at_80["usagePlanName"]
        ),
        (
            &json!(key_id),
            &json!("tight"),
            &json!(plan_id),
            &json!("tight")
        )
    );
    assert_eq!((&at_80["used"], &at_80["limit"]), (&json!(8), &json!(10)));
    assert_eq!(at_80["periodStart"], today.as_str());
    assert!(at_80["id"].as_str().unwrap().starts_with("evt_"));

    // Given back what it had (UpdateUsage), it crosses again: nothing fires twice in a period.
    let patch = r#"{"patchOperations":[{"op":"replace","path":"/remaining","value":"10"}]}"#;
    admin
        .ok(
            "PATCH",
            &format!("/usageplans/{plan_id}/keys/{key_id}/usage"),
            patch,
        )
        .await;
    assert_eq!(statuses(10, "/prod/echo/b", TIGHT).await, vec![200; 10]);

    // A customer's two keys together reach its quota: one event for the customer; the key alert
    // watches what the keys draw on (the customer's count) and fires for the key that crossed.
    statuses(3, "/dev/echo/c", ACME[0]).await;
    statuses(2, "/dev/echo/c", ACME[1]).await;
    let events = events_of(&hook.until(5).await);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        hook.got.lock().unwrap().len(),
        5,
        "the given-back key fired nothing more"
    );
    let customer: Vec<&serde_json::Value> = events
        .iter()
        .filter(|e| e["alert"] == "customer-out")
        .collect();
    assert_eq!(customer.len(), 1, "{events:?}");
    assert_eq!(
        (
            &customer[0]["scope"],
            &customer[0]["customerId"],
            &customer[0]["used"]
        ),
        (&json!("customer"), &json!("acme"), &json!(5))
    );
    let by_key: Vec<(&serde_json::Value, &serde_json::Value)> = events[2..]
        .iter()
        .filter(|e| e["alert"] == "quota-warn")
        .map(|e| (&e["keyName"], &e["threshold"]))
        .collect();
    assert_eq!(by_key.len(), 2, "{events:?}");
    assert!(
        by_key.contains(&(&json!("acme-b"), &json!(80))),
        "{events:?}"
    );
    assert!(
        by_key.contains(&(&json!("acme-b"), &json!(100))),
        "{events:?}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn quota_alerts_fire_once_per_period_on_sqlite() {
    alerts_hold("store: { sqlite: ./tollgate.db, flushInterval: 200ms }").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn quota_alerts_fire_once_per_period_on_redis() {
    let Some(redis) = util::redis() else {
        return;
    };
    alerts_hold(&util::on_redis(&redis)).await;
}

/// Two instances on one Redis crossing 80% at once still deliver exactly one event.
#[tokio::test(flavor = "multi_thread")]
async fn two_instances_crossing_at_once_fire_once() {
    let Some(redis) = util::redis() else {
        return;
    };
    let store = util::on_redis(&redis);
    let up = util::upstream().await;
    let hook = Receiver::start().await;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let gws: Vec<Gateway> = dirs
        .iter()
        .map(|d| alerting_gateway(&up, &hook, d.path(), &store))
        .collect();
    // Both instances, many requests in flight at once: the quota counts are shared, and whichever
    // instance sees a crossing claims it; the other finds it claimed.
    let c = Arc::new(util::client());
    let tasks: Vec<_> = (0..24)
        .map(|i| {
            let (c, url) = (c.clone(), gws[i % 2].url("/prod/echo/x"));
            tokio::spawn(async move { c.get(&url, Some(TIGHT)).await.status })
        })
        .collect();
    let mut ok = 0;
    for t in tasks {
        ok += usize::from(t.await.unwrap() == 200);
    }
    assert_eq!(ok, 10);
    let got = hook.until(2).await;
    tokio::time::sleep(Duration::from_millis(2000)).await;
    let events = events_of(&hook.got.lock().unwrap());
    let mut thresholds: Vec<u64> = events
        .iter()
        .map(|e| e["threshold"].as_u64().unwrap())
        .collect();
    thresholds.sort_unstable();
    assert_eq!(
        (got.len(), thresholds),
        (2, vec![80, 100]),
        "one event per threshold"
    );
}

/// A key falling below its credits level fires once; a key nearing its expiry fires once, also
/// across a restart.
#[tokio::test(flavor = "multi_thread")]
async fn credits_and_expiry_alerts_fire_once() {
    let up = util::upstream().await;
    let hook = Receiver::start().await;
    let dir = tempfile::tempdir().unwrap();
    let soon =
        jiff::Timestamp::from_second(jiff::Timestamp::now().as_second() + 72 * 3600).unwrap();
    let extra = format!(
        "admin: {{ listen: 127.0.0.1:0 }}\n\
         webhooks:\n  - {{ name: ops, url: \"http://{hook}/hooks\", secret: \"{SECRET}\" }}\n\
         alerts:\n\
         \x20 - {{ name: low-credit, on: credits, below: 3, webhook: ops }}\n\
         \x20 - {{ name: expiring, on: expiry, within: 7d, webhook: ops }}\n\
         usagePlans:\n  - {{ name: prepaid, apiStages: [ {{ apiId: warranty, stage: prod }} ] }}\n\
         apiKeys:\n\
         \x20 - {{ name: prepaid, value: prepaidAlertKeyValue0123456789, usagePlans: [prepaid], credits: {{ balance: 5 }} }}\n\
         \x20 - {{ name: leaving, value: leavingKeyValue0123456789abc, usagePlans: [prepaid], expiresAt: \"{soon}\" }}\n",
        hook = hook.addr
    );
    let yaml = util::config(&format!("http://{}", up.addr), &extra);
    util::write_config(dir.path(), &yaml);
    let gw = Gateway::start(dir.path(), &util::admin_env());
    // The expiry: at once.
    let got = events_of(&hook.until(1).await);
    assert_eq!(
        (&got[0]["type"], &got[0]["keyName"]),
        (&json!("key.expiring"), &json!("leaving"))
    );
    assert_eq!(
        got[0]["expiresAt"],
        soon.round(jiff::Unit::Second).unwrap().to_string()
    );
    // The credits: 5, 4, 3 left after each request… the one that leaves 2 crosses below 3.
    let c = util::client();
    for _ in 0..5 {
        assert_eq!(
            c.get(
                &gw.url("/prod/echo/p"),
                Some("prepaidAlertKeyValue0123456789")
            )
            .await
            .status,
            200
        );
    }
    let got = events_of(&hook.until(2).await);
    assert_eq!(
        (&got[1]["type"], &got[1]["balance"], &got[1]["threshold"]),
        (&json!("credits.low"), &json!(2), &json!(3))
    );
    // Restarted: nothing fires again.
    assert!(gw.terminate().success());
    let _gw = Gateway::start(dir.path(), &util::admin_env());
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert_eq!(hook.got.lock().unwrap().len(), 2);
}
