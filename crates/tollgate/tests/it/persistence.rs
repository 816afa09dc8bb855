use std::time::Duration;

use crate::util::{self, Gateway, KEY, client, quota_remaining};

const PLANS: &str = r#"usagePlans:
  - name: monthly
    apiStages: [ { apiId: warranty, stage: prod } ]
    quota: { limit: 1000, offset: 2, period: MONTH }
apiKeys:
  - { name: central-system, value: "${CENTRAL_KEY}", usagePlans: [monthly] }
"#;

async fn setup() -> (tempfile::TempDir, util::Upstream) {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    util::write_config(
        dir.path(),
        &util::config(&format!("http://{}", up.addr), PLANS),
    );
    (dir, up)
}

async fn calls(gw: &Gateway, n: usize) -> u64 {
    let c = client();
    let mut last = 0;
    for _ in 0..n {
        let r = c.get(&gw.url("/prod/echo/p"), Some(KEY)).await;
        assert_eq!(r.status, 200);
        last = quota_remaining(&r);
    }
    last
}

#[tokio::test]
async fn graceful_restart_keeps_remaining_quota_exactly() {
    let (dir, _up) = setup().await;
    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);
    assert_eq!(calls(&gw, 25).await, 975);
    // Terminated well inside one flush interval after the last request: the final flush must save it.
    assert!(gw.terminate().success());

    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);
    assert_eq!(calls(&gw, 1).await, 974);
    assert!(gw.terminate().success());
}

#[tokio::test]
async fn graceful_shutdown_drains_in_flight_requests() {
    let (dir, _up) = setup().await;
    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);
    let url = gw.url("/prod/slow?ms=500"); // the route times out at 1 s
    let in_flight = tokio::spawn(async move { client().get(&url, Some(KEY)).await.status });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let status = tokio::task::spawn_blocking(move || gw.terminate())
        .await
        .unwrap();
    assert!(status.success());
    assert_eq!(
        in_flight.await.unwrap(),
        200,
        "the in-flight request was cut off"
    );
}

#[tokio::test]
async fn crash_loses_at_most_one_flush_interval() {
    let (dir, _up) = setup().await;
    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);
    assert_eq!(calls(&gw, 30).await, 970);
    // Five flush intervals (200 ms each) pass: those 30 are on disk.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    // Then a burst that kill -9 may cut off before its flush.
    assert_eq!(calls(&gw, 10).await, 960);
    gw.kill9();

    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);
    let after = calls(&gw, 1).await + 1;
    assert!(
        (960..=970).contains(&after),
        "remaining after crash {after}: lost more than the last interval"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_outage_loses_nothing_and_its_end_is_logged_once() {
    let (dir, _up) = setup().await;
    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);
    assert_eq!(calls(&gw, 5).await, 995);
    // Another process holds the database for longer than a write waits (5 s): flushes fail.
    let db = rusqlite::Connection::open(dir.path().join("tollgate.db")).unwrap();
    db.execute_batch("BEGIN EXCLUSIVE").unwrap();
    assert_eq!(calls(&gw, 5).await, 990);
    tokio::time::sleep(Duration::from_millis(6000)).await;
    db.execute_batch("COMMIT").unwrap();
    drop(db);
    assert_eq!(calls(&gw, 5).await, 985);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let stderr_path = gw.stderr_path.clone();
    assert!(gw.terminate().success());
    let logs = std::fs::read_to_string(stderr_path).unwrap();
    assert_eq!(logs.matches("metering flush failed").count(), 1, "{logs}");
    assert_eq!(
        logs.matches("metering flush succeeded again").count(),
        1,
        "{logs}"
    );
    // Every request of the outage was counted on disk.
    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);
    assert_eq!(calls(&gw, 1).await, 984);
}

/// `durability: request`: killed with SIGKILL at random points in the middle of a run, many times,
/// the gateway's GetUsage after each restart counts at least every 200 the clients received, and at
/// most every request the upstream was sent plus those in flight at the kill (admitted and counted,
/// stored by another request's write, not yet sent on: at most one per client connection).
#[tokio::test(flavor = "multi_thread")]
async fn with_request_durability_a_kill_9_loses_no_answered_request() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};

    // An upstream that counts what it is sent.
    let forwarded = Arc::new(AtomicU64::new(0));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let up_addr = listener.local_addr().unwrap();
    let seen = forwarded.clone();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let seen = seen.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    seen.fetch_add(1, Ordering::SeqCst);
                    async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(
                            http_body_util::Full::new(bytes::Bytes::from_static(b"ok")),
                        ))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    let dir = tempfile::tempdir().unwrap();
    let yaml = util::config(
        &format!("http://{up_addr}"),
        &format!("admin: {{ listen: 127.0.0.1:0 }}\n{PLANS}"),
    )
    .replace(
        "store: { sqlite: ./tollgate.db, flushInterval: 200ms }",
        "store: { sqlite: ./tollgate.db, flushInterval: 10s, durability: request }",
    );
    util::write_config(dir.path(), &yaml);
    let envs = util::admin_env();
    let answered = Arc::new(AtomicU64::new(0));
    const CLIENTS: u64 = 6;
    // A fixed sequence of kill points, so a failure can be replayed.
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    for round in 0..8 {
        let gw = Gateway::start(dir.path(), &envs);
        let url = gw.url("/prod/echo/k");
        let clients: Vec<_> = (0..CLIENTS)
            .map(|_| {
                let (url, answered) = (url.clone(), answered.clone());
                tokio::spawn(async move {
                    let c = client();
                    while let Some(r) = c.try_get(&url, KEY).await {
                        if r.status == 200 {
                            answered.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            })
            .collect();
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        tokio::time::sleep(Duration::from_millis(50 + seed % 300)).await;
        tokio::task::spawn_blocking(move || gw.kill9())
            .await
            .unwrap();
        for c in clients {
            let _ = c.await;
        }
        // After each restart: at least what was answered, at most what was forwarded.
        let gw = Gateway::start(dir.path(), &envs);
        let admin = util::AdminClient::new(gw.admin.unwrap());
        let plan = admin.plan_id("monthly").await;
        let usage = admin.usage_today(&plan).await;
        let used = usage["values"]
            .as_object()
            .unwrap()
            .values()
            .map(|days| days[0][0].as_u64().unwrap())
            .sum::<u64>();
        let (ok, sent) = (
            answered.load(Ordering::SeqCst),
            forwarded.load(Ordering::SeqCst),
        );
        let in_flight = CLIENTS * (round + 1);
        assert!(
            ok <= used && used <= sent + in_flight,
            "round {round}: {ok} answered, {used} counted, {sent} forwarded"
        );
        assert!(gw.terminate().success());
    }
    assert!(
        answered.load(Ordering::SeqCst) > 50,
        "the runs answered requests"
    );
}
