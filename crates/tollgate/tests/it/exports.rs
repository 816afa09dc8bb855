//! Usage exporters against receivers on 127.0.0.1 that hold each published contract strictly
//! (Stripe's `POST /v1/billing/meter_events`, a CloudEvents 1.0 structured-mode batch as
//! OpenMeter ingests it) and reject anything else: what they and the files took equals GetUsage,
//! through a restart, a receiver that fails, and a `kill -9`; a replay sends the same ids.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use serde_json::Value;

use crate::util::{self, AdminClient, Gateway};

const STRIPE_KEY: &str = "sk_test_tollgate0123456789";
const OPENMETER_TOKEN: &str = "om_tollgate0123456789";
const ALPHA: &str = "alphaExportKeyValue0123456789";
const BETA: &str = "betaExportKeyValue01234567890";
const TEAM: [&str; 2] = [
    "teamAExportKeyValue012345678",
    "teamBExportKeyValue012345678",
];

/// What the receivers took, by id, and what they refused as breaking the contract.
#[derive(Default)]
struct Taken {
    /// Stripe: identifier → (stripe customer, value).
    stripe: HashMap<String, (String, u64)>,
    /// Meter events POSTed (repeats included).
    stripe_posts: usize,
    /// CloudEvents: id → the event.
    cloud: HashMap<String, Value>,
    /// Contract breaks and ids sent again with other values.
    broken: Vec<String>,
}

struct Receivers {
    addr: std::net::SocketAddr,
    taken: Arc<Mutex<Taken>>,
    /// Meter events to answer 500 before taking any: Stripe down for a while.
    failing: Arc<AtomicUsize>,
}

impl Receivers {
    async fn start() -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let taken: Arc<Mutex<Taken>> = Arc::default();
        let failing = Arc::new(AtomicUsize::new(0));
        let (t, f) = (taken.clone(), failing.clone());
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (t, f) = (t.clone(), f.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (t, f) = (t.clone(), f.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body.collect().await.unwrap().to_bytes();
                            let (status, said) = take(&parts, &body, &t, &f);
                            let mut resp = Response::new(Full::new(Bytes::from(said)));
                            *resp.status_mut() = http::StatusCode::from_u16(status).unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Receivers {
            addr,
            taken,
            failing,
        }
    }
}

/// One request to the receivers: (status, body).
fn take(
    parts: &http::request::Parts,
    body: &[u8],
    taken: &Mutex<Taken>,
    failing: &AtomicUsize,
) -> (u16, String) {
    let header = |name: &str| {
        parts
            .headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
    };
    let refuse = |why: String| {
        taken.lock().unwrap().broken.push(why.clone());
        (400, format!(r#"{{"error":{{"message":{why:?}}}}}"#))
    };
    match (parts.method.as_str(), parts.uri.path()) {
        ("POST", "/v1/billing/meter_events") => {
            if header("authorization") != format!("Bearer {STRIPE_KEY}") {
                return refuse("stripe: not the secret key".into());
            }
            if header("content-type") != "application/x-www-form-urlencoded" {
                return refuse(format!("stripe: content type {}", header("content-type")));
            }
            let form: BTreeMap<String, String> =
                form_urlencoded::parse(body).into_owned().collect();
            let names: Vec<&str> = form.keys().map(String::as_str).collect();
            let expected = [
                "event_name",
                "identifier",
                "payload[stripe_customer_id]",
                "payload[value]",
                "timestamp",
            ];
            if names != expected {
                return refuse(format!("stripe: fields {names:?}"));
            }
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_secs() as i64;
            let timestamp: Option<i64> = form["timestamp"].parse().ok();
            let value: Option<u64> = form["payload[value]"].parse().ok().filter(|v| *v > 0);
            let id = &form["identifier"];
            let customer = &form["payload[stripe_customer_id]"];
            if form["event_name"] != "api_requests"
                || customer.is_empty()
                || id.is_empty()
                || id.len() > 100
                || value.is_none()
                || !timestamp.is_some_and(|t| t >= now - 35 * 86_400 && t <= now + 300)
            {
                return refuse(format!("stripe: values {form:?}"));
            }
            if failing
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
            {
                return (500, r#"{"error":{"message":"down"}}"#.into());
            }
            let mut t = taken.lock().unwrap();
            t.stripe_posts += 1;
            let event = (customer.clone(), value.unwrap_or(0));
            if let Some(before) = t.stripe.insert(id.clone(), event.clone()) {
                if before != event {
                    t.broken
                        .push(format!("stripe: {id} sent as {before:?}, then {event:?}"));
                }
            }
            (200, r#"{"object":"billing.meter_event"}"#.into())
        }
        ("POST", "/api/v1/events") => {
            if header("authorization") != format!("Bearer {OPENMETER_TOKEN}") {
                return refuse("cloudevents: not the token".into());
            }
            if header("content-type") != "application/cloudevents-batch+json" {
                return refuse(format!(
                    "cloudevents: content type {}",
                    header("content-type")
                ));
            }
            let Ok(Value::Array(events)) = serde_json::from_slice::<Value>(body) else {
                return refuse("cloudevents: not a JSON array".into());
            };
            for e in &events {
                let text = |name: &str| e[name].as_str().filter(|s| !s.is_empty());
                let valid = e["specversion"] == "1.0"
                    && text("id").is_some()
                    && text("source").is_some()
                    && text("type") == Some("api_requests")
                    && text("subject").is_some()
                    && text("time").is_some_and(|t| t.parse::<jiff::Timestamp>().is_ok())
                    && e["datacontenttype"] == "application/json"
                    && e["data"]["value"].is_u64();
                if !valid {
                    return refuse(format!("cloudevents: {e}"));
                }
            }
            let mut t = taken.lock().unwrap();
            for e in events {
                let id = e["id"].as_str().unwrap_or_default().to_owned();
                if let Some(before) = t.cloud.insert(id.clone(), e.clone()) {
                    if before != e {
                        t.broken
                            .push(format!("cloudevents: {id} sent twice, changed"));
                    }
                }
            }
            (202, String::new())
        }
        (m, p) => refuse(format!("no such endpoint: {m} {p}")),
    }
}

fn config(up: &util::Upstream, rx: &Receivers, store: Option<&str>) -> String {
    let extra = format!(
        "admin: {{ listen: 127.0.0.1:0 }}\n\
         exporters:\n\
         \x20 - {{ name: ledger, type: file, path: ./usage, format: ndjson, interval: 1s }}\n\
         \x20 - {{ name: sheet, type: file, path: ./usage, format: csv, interval: 2s }}\n\
         \x20 - {{ name: meter, type: cloudevents, url: \"http://{rx}/api/v1/events\", secret: \"${{OPENMETER_TOKEN}}\", interval: 1s }}\n\
         \x20 - {{ name: billing, type: stripe, url: \"http://{rx}\", secret: \"${{STRIPE_KEY}}\", eventName: api_requests, interval: 2s }}\n\
         usagePlans:\n\
         \x20 - {{ name: metered, apiStages: [ {{ apiId: warranty, stage: prod }} ], quota: {{ limit: 10, period: DAY }} }}\n\
         \x20 - {{ name: team, limitsShareBy: customerId, apiStages: [ {{ apiId: warranty, stage: dev }} ] }}\n\
         apiKeys:\n\
         \x20 - {{ name: alpha, value: {ALPHA}, customerId: cus_alpha, usagePlans: [metered] }}\n\
         \x20 - {{ name: beta, value: {BETA}, usagePlans: [metered], tags: {{ \"tollgate:stripeCustomerId\": cus_beta }} }}\n\
         \x20 - {{ name: team-a, value: {a}, customerId: acme, usagePlans: [team] }}\n\
         \x20 - {{ name: team-b, value: {b}, customerId: acme, usagePlans: [team] }}\n",
        rx = rx.addr,
        a = TEAM[0],
        b = TEAM[1],
    );
    let yaml = util::config(&format!("http://{}", up.addr), &extra).replace(
        "      - name: prod\n",
        "      - name: prod\n      - name: dev\n",
    );
    match store {
        Some(store) => yaml.replace(
            "store: { sqlite: ./tollgate.db, flushInterval: 200ms }",
            store,
        ),
        None => yaml,
    }
}

fn start(dir: &std::path::Path) -> Gateway {
    let mut env = util::admin_env();
    env.extend([
        ("STRIPE_KEY", STRIPE_KEY),
        ("OPENMETER_TOKEN", OPENMETER_TOKEN),
    ]);
    Gateway::start(dir, &env)
}

/// Sends `n` requests with `key` to `path`; the statuses.
async fn send(gw: &Gateway, n: usize, path: &str, key: &str) -> Vec<u16> {
    let c = util::client();
    let mut statuses = Vec::new();
    for _ in 0..n {
        statuses.push(c.put(&gw.url(path), key).await.status);
    }
    statuses
}

/// The records in `dir`'s files of `exporter` (`ndjson` or `csv`), by id.
fn file_records(dir: &std::path::Path, exporter: &str) -> HashMap<String, Value> {
    let mut records = HashMap::new();
    let Ok(files) = std::fs::read_dir(dir.join("usage")) else {
        return records;
    };
    for f in files.map(Result::unwrap) {
        let name = f.file_name().to_string_lossy().into_owned();
        if !name.starts_with(&format!("{exporter}-")) {
            continue;
        }
        let text = std::fs::read_to_string(f.path()).unwrap();
        if name.ends_with(".ndjson") {
            for line in text.lines() {
                let r: Value = serde_json::from_str(line).unwrap();
                records.insert(r["id"].as_str().unwrap().to_owned(), r);
            }
        } else {
            let mut lines = text.lines();
            assert_eq!(
                lines.next(),
                Some(
                    "id,windowStart,windowEnd,usagePlanId,keyId,customerId,stripeCustomerId,value,throttled,quotaExceeded"
                )
            );
            for line in lines {
                let c: Vec<&str> = line.split(',').collect();
                let r = serde_json::json!({"keyId": c[4], "customerId": c[5], "value": c[7].parse::<u64>().unwrap(), "quotaExceeded": c[9].parse::<u64>().unwrap()});
                records.insert(c[0].to_owned(), r);
            }
        }
    }
    records
}

/// Sums `records`' `field` by what `by` names them.
fn sums<'r>(
    records: impl Iterator<Item = &'r Value>,
    by: impl Fn(&Value) -> String,
    field: &str,
) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for r in records {
        let v = r[field].as_u64().unwrap_or(0);
        if v > 0 {
            *out.entry(by(r)).or_default() += v;
        }
    }
    out
}

/// What GetUsage says each key of `metered` used today, and the customer's report what `acme`'s
/// keys used together in `team` (its own count: on Redis, a kill -9 can take what the keys' own
/// meters had not flushed, never the customer's).
async fn get_usage(admin: &AdminClient) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    let usage = admin.usage_today(&admin.plan_id("metered").await).await;
    for name in ["alpha", "beta"] {
        let id = admin.key_id(name).await;
        out.insert(
            name.to_owned(),
            usage["values"][&id][0][0].as_u64().unwrap_or(0),
        );
    }
    let (team, today) = (admin.plan_id("team").await, util::today());
    let path = format!(
        "/tollgate/usageplans/{team}/customers/acme/usage?startDate={today}&endDate={today}"
    );
    let acme = admin.ok("GET", &path, "").await;
    out.insert("acme".into(), acme["items"][0][0].as_u64().unwrap_or(0));
    out.retain(|_, v| *v > 0);
    out
}

async fn exports_equal_get_usage(store: Option<&str>) {
    let up = util::upstream().await;
    let rx = Receivers::start().await;
    let dir = tempfile::tempdir().unwrap();
    util::write_config(dir.path(), &config(&up, &rx, store));
    // Stripe is down for the first meter events: the exporter retries.
    rx.failing.store(3, Ordering::SeqCst);

    let gw = start(dir.path());
    let put = "/prod/registrations/1/warranty";
    let first = send(&gw, 4, put, ALPHA).await;
    assert!(first.iter().all(|s| *s == 200), "{first:?} {}", gw.stderr());
    let beta = send(&gw, 12, put, BETA).await;
    assert_eq!(beta.iter().filter(|s| **s == 429).count(), 2, "{beta:?}");
    assert!(
        send(&gw, 3, "/dev/echo/t", TEAM[0])
            .await
            .iter()
            .all(|s| *s == 200)
    );
    assert!(
        send(&gw, 2, "/dev/echo/t", TEAM[1])
            .await
            .iter()
            .all(|s| *s == 200)
    );
    // Windows close and the first meter events fail.
    for _ in 0..100 {
        if rx.failing.load(Ordering::SeqCst) == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let metrics = gw.metrics().await;
    let failures = metrics
        .lines()
        .find(|l| l.starts_with("tollgate_export_failures_total{exporter=\"billing\"}"))
        .unwrap_or_else(|| panic!("{metrics}"));
    assert!(!failures.ends_with(" 0"), "{failures} {}", gw.stderr());
    assert!(
        metrics.contains("tollgate_export_lag_seconds{exporter=\"ledger\"}"),
        "{metrics}"
    );

    // A clean restart, then a kill -9 of an exporting instance mid-run.
    assert!(gw.terminate().success());
    let gw = start(dir.path());
    assert!(send(&gw, 3, put, ALPHA).await.iter().all(|s| *s == 200));
    tokio::time::sleep(Duration::from_millis(2_500)).await;
    assert!(
        send(&gw, 2, "/dev/echo/t", TEAM[1])
            .await
            .iter()
            .all(|s| *s == 200)
    );
    gw.kill9();
    let gw = start(dir.path());
    assert!(send(&gw, 1, put, ALPHA).await.iter().all(|s| *s == 200));

    let admin = AdminClient::new(gw.admin.unwrap());
    // The last request's count is in the store a flush later.
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let expected = get_usage(&admin).await;
    assert_eq!(
        expected.get("alpha"),
        Some(&8),
        "nothing is lost but what kill -9 took: {expected:?} {}",
        admin.usage_today(&admin.plan_id("metered").await).await
    );
    let by_holder = |r: &Value| {
        r["customerId"]
            .as_str()
            .filter(|c| !c.is_empty() && *c != "cus_alpha")
            .or(r["keyId"].as_str())
            .map(str::to_owned)
            .unwrap_or_default()
    };
    let admin_names = {
        let mut names = HashMap::new();
        for name in ["alpha", "beta"] {
            names.insert(admin.key_id(name).await, name.to_owned());
        }
        names
    };
    let named = |sums: BTreeMap<String, u64>| -> BTreeMap<String, u64> {
        sums.into_iter()
            .map(|(k, v)| (admin_names.get(&k).cloned().unwrap_or(k), v))
            .collect()
    };
    // Every exporter's records add up to GetUsage, once the last windows are out.
    let mut last = None;
    for _ in 0..150 {
        let ledger = named(sums(
            file_records(dir.path(), "ledger").values(),
            by_holder,
            "value",
        ));
        let sheet = named(sums(
            file_records(dir.path(), "sheet").values(),
            by_holder,
            "value",
        ));
        let (stripe, cloud) = {
            let t = rx.taken.lock().unwrap();
            let mut stripe: BTreeMap<String, u64> = BTreeMap::new();
            for (customer, value) in t.stripe.values() {
                *stripe.entry(customer.clone()).or_default() += value;
            }
            let cloud = {
                let mut out: BTreeMap<String, u64> = BTreeMap::new();
                for e in t.cloud.values() {
                    let subject = e["subject"].as_str().unwrap_or_default();
                    let subject = admin_names.get(subject).map_or(subject, String::as_str);
                    let subject = if subject == "cus_alpha" {
                        "alpha"
                    } else {
                        subject
                    };
                    *out.entry(subject.to_owned()).or_default() +=
                        e["data"]["value"].as_u64().unwrap_or(0);
                }
                out.retain(|_, v| *v > 0);
                out
            };
            (stripe, cloud)
        };
        let stripe_named: BTreeMap<String, u64> = stripe
            .into_iter()
            .map(|(c, v)| {
                let name = match c.as_str() {
                    "cus_alpha" => "alpha",
                    "cus_beta" => "beta",
                    other => other,
                };
                (name.to_owned(), v)
            })
            .collect();
        let now = (ledger, sheet, cloud, stripe_named);
        if now.0 == expected && now.1 == expected && now.2 == expected && now.3 == expected {
            last = None;
            break;
        }
        last = Some(now);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(last.is_none(), "GetUsage {expected:?}; exported {last:?}");

    // Refusals are kept apart where the format has room.
    let ledger = file_records(dir.path(), "ledger");
    let refused = named(sums(ledger.values(), by_holder, "quotaExceeded"));
    assert_eq!(refused.get("beta"), Some(&2), "{refused:?}");
    assert!(
        rx.taken.lock().unwrap().broken.is_empty(),
        "{:?}",
        rx.taken.lock().unwrap().broken
    );

    // A replay sends the same identifiers, with the same values.
    let (ids, posts) = {
        let t = rx.taken.lock().unwrap();
        let mut ids: Vec<String> = t.stripe.keys().cloned().collect();
        ids.sort();
        (ids, t.stripe_posts)
    };
    let today = util::today();
    export_cli(
        dir.path(),
        &[
            "--exporter",
            "billing",
            "--from",
            &today,
            "--to",
            &today,
            "--replay",
        ],
    );
    let t = rx.taken.lock().unwrap();
    let mut again: Vec<String> = t.stripe.keys().cloned().collect();
    again.sort();
    assert_eq!(again, ids, "the same identifiers");
    assert!(t.stripe_posts >= posts + ids.len(), "every one sent again");
    assert!(t.broken.is_empty(), "{:?}", t.broken);
    drop(gw);
}

#[tokio::test(flavor = "multi_thread")]
async fn exports_equal_get_usage_on_sqlite() {
    exports_equal_get_usage(None).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn exports_equal_get_usage_on_redis() {
    let Some(redis) = util::redis() else { return };
    let store = format!(
        "store: {{ redis: {{ url: \"{}\" }}, flushInterval: 200ms }}",
        redis.url()
    );
    exports_equal_get_usage(Some(&store)).await;
}

/// Runs `tollgate usage export` with `args` on the config in `dir`; its output.
fn export_cli(dir: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["usage", "export", "--config"])
        .arg(dir.join("tollgate.yaml"))
        .args(args)
        .envs([
            ("STRIPE_KEY", STRIPE_KEY),
            ("OPENMETER_TOKEN", OPENMETER_TOKEN),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_sends_the_days_before_the_exporter_once_and_replays_them() {
    use tollgate_core::quota::EpochDay;
    use tollgate_store::{SqliteStore, Store, UsageDelta};

    let up = util::upstream().await;
    let rx = Receivers::start().await;
    let dir = tempfile::tempdir().unwrap();
    util::write_config(dir.path(), &config(&up, &rx, None));
    // The store as the config declares it, then a day of use before any exporter ran.
    assert!(start(dir.path()).terminate().success());
    let today: EpochDay = EpochDay::from_secs(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64,
    );
    let yesterday = EpochDay(today.0 - 1);
    let (plan, key) = {
        let store = SqliteStore::open(&dir.path().join("tollgate.db")).unwrap();
        let records = store.load().unwrap();
        let plan = records
            .plans
            .iter()
            .find(|p| p.name == "metered")
            .unwrap()
            .id
            .clone();
        let key = records
            .keys
            .iter()
            .find(|k| k.name == "beta")
            .unwrap()
            .id
            .clone();
        let delta = UsageDelta {
            plan_id: plan.clone(),
            key_id: key.clone(),
            day: yesterday,
            count: 5,
            throttled: 1,
            quota_exceeded: 0,
            last_used: None,
        };
        store.add_usage(&[delta]).unwrap();
        (plan, key)
    };
    let day = yesterday.to_string();
    let file = dir
        .path()
        .join("usage")
        .join(format!("ledger-{day}T000000Z-86400s.ndjson"));

    let out = export_cli(
        dir.path(),
        &["--exporter", "ledger", "--from", &day, "--to", &day],
    );
    assert!(
        out.contains("1 days exported") && out.contains("1 windows delivered (1 records)"),
        "{out}"
    );
    let first = std::fs::read_to_string(&file).unwrap();
    let record: Value = serde_json::from_str(first.trim()).unwrap();
    assert_eq!(
        (record["usagePlanId"].as_str(), record["keyId"].as_str()),
        (Some(plan.as_str()), Some(key.as_str()))
    );
    assert_eq!(
        (record["value"].as_u64(), record["throttled"].as_u64()),
        (Some(5), Some(1))
    );
    assert_eq!(record["stripeCustomerId"], "cus_beta");

    // Sent: again, nothing; replayed, the same record; today is the live exporter's.
    let out = export_cli(
        dir.path(),
        &["--exporter", "ledger", "--from", &day, "--to", &day],
    );
    assert!(
        out.contains("0 days exported") && out.contains("0 windows delivered"),
        "{out}"
    );
    std::fs::remove_file(&file).unwrap();
    let out = export_cli(
        dir.path(),
        &[
            "--exporter",
            "ledger",
            "--from",
            &day,
            "--to",
            &day,
            "--replay",
        ],
    );
    assert!(out.contains("1 windows delivered (1 records)"), "{out}");
    assert_eq!(std::fs::read_to_string(&file).unwrap(), first);
    let today = today.to_string();
    let out = export_cli(
        dir.path(),
        &["--exporter", "ledger", "--from", &day, "--to", &today],
    );
    assert!(out.contains("0 days exported"), "{out}");

    // Stripe takes it with the same identifier.
    export_cli(
        dir.path(),
        &["--exporter", "billing", "--from", &day, "--to", &day],
    );
    export_cli(
        dir.path(),
        &[
            "--exporter",
            "billing",
            "--from",
            &day,
            "--to",
            &day,
            "--replay",
        ],
    );
    {
        let t = rx.taken.lock().unwrap();
        assert_eq!(t.stripe_posts, 2);
        let sent: Vec<_> = t.stripe.iter().collect();
        assert_eq!(
            sent,
            vec![(
                &record["id"].as_str().unwrap().to_owned(),
                &("cus_beta".to_owned(), 5)
            )]
        );
        assert!(t.broken.is_empty(), "{:?}", t.broken);
    }

    // The live exporter starts today: yesterday, backfilled, is not sent again.
    let gw = start(dir.path());
    assert!(
        send(&gw, 2, "/prod/registrations/1/warranty", BETA)
            .await
            .iter()
            .all(|s| *s == 200)
    );
    let mut values = BTreeMap::new();
    for _ in 0..100 {
        values = sums(
            file_records(dir.path(), "ledger").values(),
            |r| r["windowStart"].as_str().unwrap_or_default()[..10].to_owned(),
            "value",
        );
        if values.get(&today) == Some(&2) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(values, BTreeMap::from([(day, 5), (today, 2)]));
}
