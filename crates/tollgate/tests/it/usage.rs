use std::process::Command;

use crate::util::{self, Gateway, KEY, client};

#[tokio::test]
async fn usage_reports_get_usage_shape() {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let plans = r#"usagePlans:
  - name: central-batch
    apiStages: [ { apiId: warranty, stage: prod } ]
    quota: { limit: 100, period: DAY }
apiKeys:
  - { name: central-system, value: "${CENTRAL_KEY}", usagePlans: [central-batch] }
  - { name: idle, value: idleKeyValue0123456789abcdef, usagePlans: [central-batch] }
"#;
    util::write_config(
        dir.path(),
        &util::config(&format!("http://{}", up.addr), plans),
    );
    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);
    let c = client();
    for _ in 0..7 {
        assert_eq!(c.get(&gw.url("/prod/echo/u"), Some(KEY)).await.status, 200);
    }
    assert!(gw.terminate().success());

    use tollgate_core::Clock as _;
    let day = tollgate_core::quota::EpochDay::from_nanos(tollgate_core::SystemClock.now());
    let today = day.date();
    let yesterday = tollgate_core::quota::EpochDay(day.0 - 1).date();
    let run = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args([
                "usage",
                "--config",
                "tollgate.yaml",
                "--plan",
                "central-batch",
            ])
            .args(args)
            .current_dir(dir.path())
            .env("CENTRAL_KEY", KEY)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    };
    let json: serde_json::Value = serde_json::from_str(&run(&[
        "--from",
        &yesterday.to_string(),
        "--to",
        &today.to_string(),
        "--output",
        "json",
    ]))
    .unwrap();
    assert_eq!(json["startDate"], yesterday.to_string());
    assert_eq!(json["endDate"], today.to_string());
    assert_eq!(json["usagePlanId"].as_str().unwrap().len(), 6);
    let values = json["values"].as_object().unwrap();
    assert_eq!(values.len(), 2, "both keys of the plan: {json}");
    let counts: Vec<&serde_json::Value> = values.values().collect();
    assert!(
        counts.contains(&&serde_json::json!([[0, 100], [7, 93]])),
        "{json}"
    );
    assert!(
        counts.contains(&&serde_json::json!([[0, 100], [0, 100]])),
        "{json}"
    );

    let table = run(&[
        "--key",
        "central-system",
        "--from",
        &today.to_string(),
        "--to",
        &today.to_string(),
    ]);
    assert!(table.contains("central-system"), "{table}");
    assert!(
        table
            .lines()
            .any(|l| l.contains(&today.to_string()) && l.ends_with("         7         93")),
        "{table}"
    );
}
