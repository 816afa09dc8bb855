use std::process::Command;

use crate::util::{self, KEY};

fn tollgate(dir: &std::path::Path, args: &[&str], envs: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.args(args).current_dir(dir).env_remove("CENTRAL_KEY");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check(yaml: &str, envs: &[(&str, &str)]) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    util::write_config(dir.path(), yaml);
    let (code, out, err) = tollgate(dir.path(), &["check", "--config", "tollgate.yaml"], envs);
    (code, format!("{out}{err}"))
}

const GOOD: &str = r#"listen: 127.0.0.1:0
apis:
  - id: warranty
    stages: [ { name: prod } ]
    routes:
      - { path: "/registrations/{id}/warranty", method: PUT, apiKeyRequired: true, upstream: "http://127.0.0.1:9" }
usagePlans:
  - name: central-batch
    apiStages: [ { apiId: warranty, stage: prod } ]
    throttle: { rateLimit: 100, burstLimit: 50 }
    quota: { limit: 1000, offset: 2, period: MONTH }
apiKeys:
  - { name: central-system, value: "${CENTRAL_KEY}", usagePlans: [central-batch] }
"#;

#[test]
fn example_configs_are_valid() {
    let (code, out) = check(GOOD, &[("CENTRAL_KEY", KEY)]);
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("ok (1 APIs, 1 usage plans, 1 API keys)"),
        "{out}"
    );
    let example = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../examples/tollgate.yaml"
    ))
    .unwrap();
    let (code, out) = check(&example, &[("CENTRAL_KEY", KEY)]);
    assert_eq!(code, 0, "{out}");
}

/// Each bad config exits 64 and names file, line and field.
#[test]
fn bad_configs_name_file_line_and_field() {
    let cases: &[(&str, &str, &str)] = &[
        // (replace this, with this, expect this in the message)
        (
            "offset: 2, period: MONTH",
            "offset: 31, period: MONTH",
            "tollgate.yaml:11:12: usagePlans[0].quota.offset: quota offset 31 is out of range for period MONTH (allowed: 0 to 27)",
        ),
        (
            "period: MONTH",
            "period: YEAR",
            "usagePlans[0].quota.period: \"YEAR\" is not one of DAY, WEEK, MONTH",
        ),
        ("burstLimit: 50", "burstLimit: -5", "tollgate.yaml:10:"),
        (
            "burstLimit: 50",
            "burstLimt: 50",
            "unknown field `burstLimt`",
        ),
        (
            "stage: prod",
            "stage: staging",
            "tollgate.yaml:9:18: usagePlans[0].apiStages[0].stage: Invalid API Stage {api: warranty, stage: staging}",
        ),
        (
            "apiId: warranty",
            "apiId: nope",
            "usagePlans[0].apiStages[0].apiId",
        ),
        (
            "usagePlans: [central-batch]",
            "usagePlans: [nope]",
            "tollgate.yaml:13:5: apiKeys[0].usagePlans: no usage plan named \"nope\"",
        ),
        (
            "method: PUT",
            "method: FETCH",
            "tollgate.yaml:6:9: apis[0].routes[0].method",
        ),
        (
            "upstream: \"http://127.0.0.1:9\"",
            "upstream: \"ftp://example.com\"",
            "apis[0].routes[0].upstream",
        ),
        (
            "\"/registrations/{id}/warranty\"",
            "\"registrations\"",
            "apis[0].routes[0].path: invalid path \"registrations\": must start with /",
        ),
        (
            "listen: 127.0.0.1:0",
            "listen: nowhere",
            "tollgate.yaml:1:9: listen",
        ),
        (
            "value: \"${CENTRAL_KEY}\"",
            "value: tooShort",
            "apiKeys[0].value: API Key value should be at least 20 characters",
        ),
        (
            "throttle: { rateLimit: 100, burstLimit: 50 }",
            "throttle: { rateLimit: -1, burstLimit: 50 }",
            "usagePlans[0].throttle.rateLimit",
        ),
        (
            "apiStages: [ { apiId: warranty, stage: prod } ]\n    throttle: { rateLimit: 100, burstLimit: 50 }",
            "apiStages: [ { apiId: warranty, stage: prod, throttle: { \"/registrations/{id}/warranty/PUT\": { rateLimit: 1, burstLimit: 1 } } } ]",
            "Can not define fine grain throttling if usage plan throttle is not defined.",
        ),
        (
            "listen: 127.0.0.1:0\n",
            "listen: 127.0.0.1:0\nstore: { sqlite: ./x.db, flushInterval: soon }\n",
            "store.flushInterval",
        ),
        (
            "listen: 127.0.0.1:0\n",
            "listen: 127.0.0.1:0\nstore: { redis: { url: \"rediss://127.0.0.1:6380\" } }\n",
            "tollgate.yaml:2:8: store.redis.url: TLS to Redis (rediss://) is not supported",
        ),
        (
            "  - id: warranty\n",
            "  - id: warranty\n    apiKeySource: COOKIE\n",
            "tollgate.yaml:3:5: apis[0].apiKeySource: \"COOKIE\" is not one of HEADER, AUTHORIZER",
        ),
        (
            "  - id: warranty\n",
            "  - id: warranty\n    apiKeySource: AUTHORIZER\n    authorizers: [ { name: idp, jwks: ./missing.json } ]\n",
            "apis[0].authorizers[0].jwks: ./missing.json: No such file",
        ),
        (
            "  - id: warranty\n",
            "  - id: warranty\n    apiKeySource: AUTHORIZER\n",
            "apis[0].routes[0].authorizer: with apiKeySource: AUTHORIZER, a keyed route names one of the API's authorizers",
        ),
        (
            "listen: 127.0.0.1:0\n",
            "listen: 127.0.0.1:0\nverify: { listen: 127.0.0.1:0, proxy: apache }\n",
            "tollgate.yaml:2:9: verify.proxy: \"apache\" is not one of nginx, caddy, traefik, envoy",
        ),
        (
            "usagePlans: [central-batch] }",
            "usagePlans: [central-batch], expiresAt: next-tuesday }",
            "tollgate.yaml:13:5: apiKeys[0].expiresAt: Invalid expiresAt 'next-tuesday': expected an RFC 3339 time",
        ),
        (
            "usagePlans: [central-batch] }",
            "usagePlans: [central-batch], tags: { \"AWS:team\": x } }",
            "tollgate.yaml:13:5: apiKeys[0].tags: Invalid tag key. Tag keys cannot start with 'aws:' (case insensitive)",
        ),
        (
            "quota: { limit: 1000, offset: 2, period: MONTH }",
            "quota: { limit: 1000, offset: 2, period: MONTH }\n    tags: { \"\": x }",
            "usagePlans[0].tags: Invalid tag key. Tag keys must be 1 to 128 characters long",
        ),
    ];
    for (from, to, expect) in cases {
        assert!(GOOD.contains(from), "case does not apply: {from}");
        let yaml = GOOD.replacen(from, to, 1);
        let (code, out) = check(&yaml, &[("CENTRAL_KEY", KEY)]);
        assert_eq!(code, 64, "{to}: {out}");
        assert!(out.contains(expect), "{to}: expected {expect:?} in:\n{out}");
    }
}

/// `migrate` refuses a TLS Redis URL before connecting, as a config does: the client has no TLS.
/// Nothing is opened before both ends are read, so a refusal leaves no empty database behind.
#[test]
fn migrate_refuses_tls_to_redis_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = tollgate(
        dir.path(),
        &[
            "migrate",
            "--from",
            "sqlite:./t.db",
            "--to",
            "rediss://127.0.0.1:6380",
        ],
        &[],
    );
    assert_ne!(code, 0, "{out}{err}");
    assert!(
        err.contains("\"rediss://127.0.0.1:6380\": TLS to Redis (rediss://) is not supported"),
        "{err}"
    );
    assert!(!dir.path().join("t.db").exists());
}

/// A SQLite source that is not there is refused by name, not opened as a new, empty store.
#[test]
fn migrate_refuses_a_source_that_does_not_exist() {
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = tollgate(
        dir.path(),
        &[
            "migrate",
            "--from",
            "sqlite:./typo.db",
            "--to",
            "sqlite:./new.db",
        ],
        &[],
    );
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("the source ./typo.db does not exist"), "{err}");
    assert!(!dir.path().join("typo.db").exists());
    assert!(!dir.path().join("new.db").exists());
}

#[test]
fn unset_variable_is_named() {
    let (code, out) = check(GOOD, &[]);
    assert_eq!(code, 64);
    assert!(
        out.contains("tollgate.yaml:13:")
            && out.contains("environment variable CENTRAL_KEY is not set"),
        "{out}"
    );
}

#[test]
fn two_plans_on_one_stage_for_one_key_are_refused() {
    let yaml = GOOD
        .replace(
            "apiKeys:",
            "  - name: second\n    apiStages: [ { apiId: warranty, stage: prod } ]\napiKeys:",
        )
        .replace(
            "usagePlans: [central-batch]",
            "usagePlans: [central-batch, second]",
        );
    let (code, out) = check(&yaml, &[("CENTRAL_KEY", KEY)]);
    assert_eq!(code, 64);
    assert!(out.contains("both cover warranty/prod"), "{out}");
}

#[test]
fn serve_with_a_bad_config_binds_nothing() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let dir = tempfile::tempdir().unwrap();
    let yaml = GOOD
        .replace("listen: 127.0.0.1:0", &format!("listen: 127.0.0.1:{port}"))
        .replace("offset: 2", "offset: 40");
    util::write_config(dir.path(), &yaml);
    let (code, _, err) = tollgate(
        dir.path(),
        &["serve", "--config", "tollgate.yaml"],
        &[("CENTRAL_KEY", KEY)],
    );
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("tollgate.yaml:11:12: usagePlans[0].quota.offset"),
        "{err}"
    );
    assert!(
        !dir.path().join("tollgate.db").exists(),
        "the store was opened before validation"
    );
    // The port is still free.
    std::net::TcpListener::bind(("127.0.0.1", port)).unwrap();
}

#[test]
fn missing_file_is_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    let (code, _, err) = tollgate(dir.path(), &["check", "--config", "absent.yaml"], &[]);
    assert_eq!(code, 64);
    assert!(err.contains("absent.yaml: cannot read"), "{err}");
}

#[test]
fn check_warns_of_what_is_valid_but_risky() {
    let dir = tempfile::tempdir().unwrap();
    let servers = crate::tls::ca("server CA");
    crate::tls::server_cert(dir.path(), "api", &servers, &["api.test"]);
    std::fs::write(
        dir.path().join("partners-ca.pem"),
        crate::tls::ca("partners CA").pem(),
    )
    .unwrap();
    let raw = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256)
        .unwrap()
        .public_key_raw()
        .to_vec();
    let b64 = |b: &[u8]| {
        use base64::Engine as _;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
    };
    let jwk = serde_json::json!({"kty": "EC", "crv": "P-256", "kid": "k1",
                                 "x": b64(&raw[1..33]), "y": b64(&raw[33..65])});
    std::fs::write(
        dir.path().join("jwks.json"),
        serde_json::json!({ "keys": [jwk] }).to_string(),
    )
    .unwrap();
    let yaml = r#"listen: 127.0.0.1:0
tls:
  listen: 127.0.0.1:0
  certificates: [ { cert: api.crt, key: api.key } ]
  clientAuth: { ca: partners-ca.pem }
verify: { listen: 0.0.0.0:0, proxy: nginx }
apis:
  - id: warranty
    apiKeySource: AUTHORIZER
    authorizers:
      - { name: anyone, jwks: jwks.json }
    stages: [ { name: prod } ]
    routes:
      - { path: /a, method: GET, apiKeyRequired: true, upstream: "http://127.0.0.1:9" }
"#;
    util::write_config(dir.path(), yaml);
    let (code, out, err) = tollgate(dir.path(), &["check", "--config", "tollgate.yaml"], &[]);
    assert_eq!(code, 0, "{out}{err}");
    for (line, field, says) in [
        (1, "listen", "mTLS can be bypassed"),
        (6, "verify.listen", "not a loopback address"),
        (11, "apis[0].authorizers[0]", "neither issuer nor audience"),
    ] {
        let want = format!("tollgate: warning: tollgate.yaml:{line}:");
        assert!(
            err.lines()
                .any(|l| l.starts_with(&want) && l.contains(field) && l.contains(says)),
            "{field}: {err}"
        );
    }
}

#[test]
fn flags_a_config_would_ignore_are_refused_and_host_names_are_named() {
    let dir = tempfile::tempdir().unwrap();
    util::write_config(dir.path(), GOOD);
    let (code, _, err) = tollgate(
        dir.path(),
        &[
            "serve",
            "--config",
            "tollgate.yaml",
            "--listen",
            "127.0.0.1:0",
            "--store",
            "sqlite:x.db",
        ],
        &[("CENTRAL_KEY", "centralSystemKey0123456789abcdef")],
    );
    assert_eq!(code, 64, "{err}");
    assert!(
        err.contains("--listen, --store apply to --serverless only"),
        "{err}"
    );
    assert!(!dir.path().join("x.db").exists());
    let (code, out) = check(
        &GOOD.replace("listen: 127.0.0.1:0", "listen: localhost:8080"),
        &[("CENTRAL_KEY", "centralSystemKey0123456789abcdef")],
    );
    assert_eq!(code, 64);
    assert!(
        out.contains("listen: \"localhost:8080\": host names are not supported here"),
        "{out}"
    );
}

#[test]
fn a_declared_value_another_key_holds_names_that_key_and_the_store() {
    let dir = tempfile::tempdir().unwrap();
    let env = [("CENTRAL_KEY", "centralSystemKey0123456789abcdef")];
    util::write_config(dir.path(), GOOD);
    let gw = util::Gateway::start(dir.path(), &env);
    assert!(gw.terminate().success());
    // The same value under another name, in the same store (as two examples sharing a directory).
    util::write_config(
        dir.path(),
        &GOOD.replace("name: central-system", "name: partner-b"),
    );
    let (code, _, err) = tollgate(dir.path(), &["serve", "--config", "tollgate.yaml"], &env);
    assert_ne!(code, 0);
    assert!(
        err.contains("the value of API key \"partner-b\" is held by API key \"central-system\" (")
            && err.contains("tollgate.db"),
        "{err}"
    );
}
