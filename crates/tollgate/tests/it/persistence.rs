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
