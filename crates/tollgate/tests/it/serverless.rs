use std::process::{Command, Stdio};

use crate::util::{self, client};

const SEED_KEY: &str = "centralSystemKey0123456789abcdef";

fn seed() -> String {
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples/serverless.yml").to_string()
}

#[tokio::test]
async fn the_seed_serverless_yml_runs_as_is() {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite:{}", dir.path().join("sls.db").display());
    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "serve",
            "--serverless",
            &seed(),
            "--upstream",
            &format!("http://{}", up.addr),
            "--listen",
            "127.0.0.1:0",
            "--store",
            &store,
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let addr = {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(stdout).lines();
        loop {
            let line = lines.next().expect("gateway exited").unwrap();
            if let Some(a) = line.strip_prefix("tollgate: listening on http://") {
                break a.to_string();
            }
        }
    };
    let c = client();
    let url = format!("http://{addr}/dev/registrations/42/warranty");
    let r = c.put(&url, SEED_KEY).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["uri"], "/registrations/42/warranty");
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("*"),
        "cors: true labels responses"
    );
    let r = c.send("PUT", &url, &[], "{}").await;
    assert_eq!(r.status, 403);
    assert_eq!(
        r.header("access-control-allow-origin"),
        Some("*"),
        "refusals too, so browsers can read them"
    );

    // The preflight needs no key and is answered by the gateway.
    let r = c
        .send(
            "OPTIONS",
            &url,
            &[
                ("origin", "https://app.example"),
                ("access-control-request-method", "PUT"),
            ],
            "",
        )
        .await;
    assert_eq!(r.status, 200);
    assert_eq!(
        r.header("access-control-allow-methods"),
        Some("OPTIONS,PUT")
    );
    assert!(
        r.header("access-control-allow-headers")
            .unwrap()
            .contains("X-Api-Key")
    );
    assert_eq!(r.header("access-control-allow-origin"), Some("*"));
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn import_prints_a_config_that_checks() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args([
            "import",
            "serverless",
            &seed(),
            "--upstream",
            "http://127.0.0.1:9000",
            "--stage",
            "prod",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    assert!(yaml.starts_with("listen: 127.0.0.1:8080"), "{yaml}");
    assert!(yaml.contains("name: registrations-prod"), "{yaml}");
    std::fs::write(dir.path().join("tollgate.yaml"), &yaml).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["check", "--config", "tollgate.yaml"])
        .current_dir(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Without an upstream: a clear error, exit 64.
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["import", "serverless", &seed()])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("--upstream URL or --function updateRegistrationWarranty=URL")
    );
}

#[test]
fn import_keeps_environment_variables_as_variables() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("serverless.yml");
    std::fs::write(
        &file,
        "service: orders\nprovider:\n  name: aws\n  apiGateway:\n    apiKeys:\n      \
         - { name: whole, value: '${env:TG_IMPORT_KEY}' }\n      \
         - { name: part, value: 'acme-${env:TG_IMPORT_KEY}-${self:custom.tier}' }\n      \
         - { name: fallback, value: \"${env:TG_IMPORT_UNSET, 'fallbackValue0123456789abc'}\" }\n\
         custom: { tier: gold }\nfunctions:\n  f: { events: [ { http: { path: x, method: get, private: true } } ] }\n",
    )
    .unwrap();
    let secret = "partnerSecretValue0123456789";
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(["import", "serverless"])
        .arg(&file)
        .args(["--upstream", "http://127.0.0.1:9000"])
        .env("TG_IMPORT_KEY", secret)
        .env_remove("TG_IMPORT_UNSET")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let yaml = String::from_utf8(out.stdout).unwrap();
    // The key value stays in the environment; what came from the file is written as it is.
    assert!(!yaml.contains(secret), "{yaml}");
    assert!(yaml.contains("value: ${TG_IMPORT_KEY}"), "{yaml}");
    assert!(yaml.contains("value: acme-${TG_IMPORT_KEY}-gold"), "{yaml}");
    assert!(yaml.contains("value: fallbackValue0123456789abc"), "{yaml}");
    std::fs::write(dir.path().join("tollgate.yaml"), &yaml).unwrap();
    let check = |env: Option<&str>| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.args(["check", "--config", "tollgate.yaml"])
            .current_dir(dir.path())
            .env_remove("TG_IMPORT_KEY");
        if let Some(v) = env {
            cmd.env("TG_IMPORT_KEY", v);
        }
        cmd.output().unwrap()
    };
    let out = check(Some(secret));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Without the variable, the generated config says which one it needs.
    let out = check(None);
    assert!(!out.status.success());
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(
        said.contains("environment variable TG_IMPORT_KEY is not set"),
        "{said}"
    );
}
