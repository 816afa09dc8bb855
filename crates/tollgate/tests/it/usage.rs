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
    let plan_id = json["usagePlanId"].as_str().unwrap();
    assert!(
        table.starts_with(&format!(
            "usage plan central-batch ({plan_id}), {today} to {today}\n"
        )),
        "the plan by name, as the README shows: {table}"
    );
    assert!(
        table
            .lines()
            .any(|l| l.contains(&today.to_string()) && l.ends_with("         7         93")),
        "{table}"
    );
}

/// Paths in a config are read from the config file's directory, wherever the command runs: `serve`
/// started elsewhere (as systemd with another WorkingDirectory) keeps its store, certificates and
/// access log beside the config; `usage` run elsewhere (without the keys' values in its
/// environment) reports from that store, and where there is none it says which file it looked for
/// and creates nothing.
#[tokio::test]
async fn paths_are_relative_to_the_config_file() {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let plans = "accessLog: { path: logs/access.log }\nusagePlans:\n  - name: central-batch\n    \
                 apiStages: [ { apiId: warranty, stage: prod } ]\n    quota: { limit: 100, period: DAY }\n\
                 apiKeys:\n  - { name: central-system, value: \"${CENTRAL_KEY}\", usagePlans: [central-batch] }\n";
    let yaml = util::config(&format!("http://{}", up.addr), plans)
        .replace("./tollgate.db", "data/tollgate.db");
    util::write_config(dir.path(), &yaml);
    std::fs::create_dir_all(dir.path().join("data")).unwrap();
    std::fs::create_dir_all(dir.path().join("logs")).unwrap();
    let config = dir.path().join("tollgate.yaml");
    let gw = Gateway::start_from(dir.path(), elsewhere.path(), &[("CENTRAL_KEY", KEY)]);
    let c = client();
    for _ in 0..3 {
        assert_eq!(c.get(&gw.url("/prod/echo/u"), Some(KEY)).await.status, 200);
    }
    assert!(gw.terminate().success());
    assert!(dir.path().join("data/tollgate.db").exists());
    assert!(dir.path().join("logs/access.log").exists());
    let left: Vec<_> = std::fs::read_dir(elsewhere.path()).unwrap().collect();
    assert!(
        left.is_empty(),
        "nothing in the working directory: {left:?}"
    );

    let usage = |config: &std::path::Path| {
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args([
                "usage",
                "--plan",
                "central-batch",
                "--output",
                "json",
                "--from",
                &util::today(),
                "--to",
                &util::today(),
                "--config",
            ])
            .arg(config)
            .current_dir(elsewhere.path())
            // A report needs no key values: the config's ${CENTRAL_KEY} may be unset.
            .env_remove("CENTRAL_KEY")
            .output()
            .unwrap()
    };
    let out = usage(&config);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let used: u64 = json["values"]
        .as_object()
        .unwrap()
        .values()
        .flat_map(|days| days.as_array().unwrap().iter())
        .map(|d| d[0].as_u64().unwrap())
        .sum();
    assert_eq!(used, 3, "{json}");
    // Where no store is, it says which file it looked for, and makes none.
    let bare = tempfile::tempdir().unwrap();
    std::fs::write(bare.path().join("tollgate.yaml"), &yaml).unwrap();
    let out = usage(&bare.path().join("tollgate.yaml"));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    let looked = bare.path().join("data/tollgate.db");
    assert!(
        err.contains(&format!("no store at {}", looked.display())),
        "{err}"
    );
    assert!(
        !looked.exists()
            && std::fs::read_dir(elsewhere.path())
                .unwrap()
                .next()
                .is_none()
    );
}
