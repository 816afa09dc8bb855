//! Callers with JWTs (AWS's `apiKeySource: AUTHORIZER`): a verified claim names the API key whose
//! plan applies; tokens minted here with a generated P-256 key.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

use crate::util::{self, Gateway, KEY, client};

/// A P-256 signing key and its JWK.
struct Signer {
    kid: &'static str,
    key: EncodingKey,
    jwk: Value,
}

impl Signer {
    fn new(kid: &'static str) -> Self {
        let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
        let raw = pair.public_key_raw();
        Self {
            kid,
            key: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
            jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid,
                        "x": B64.encode(&raw[1..33]), "y": B64.encode(&raw[33..65])}),
        }
    }

    fn token(&self, claims: Value) -> String {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(self.kid.into());
        jsonwebtoken::encode(&header, &claims, &self.key).unwrap()
    }
}

/// A key that JWT callers name by value.
const MACHINE_KEY: &str = "machineKeyValue0123456789abcd";

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_verified_claim_names_the_key_whose_plan_applies() {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let signer = Signer::new("idp-1");
    let jwks = dir.path().join("jwks.json");
    std::fs::write(&jwks, json!({ "keys": [signer.jwk] }).to_string()).unwrap();
    let upstream = format!("http://{}", up.addr);
    let yaml = format!(
        r#"listen: 127.0.0.1:0
store: {{ sqlite: ./tollgate.db, flushInterval: 200ms }}
admin: {{ listen: 127.0.0.1:0 }}
apis:
  - id: warranty
    apiKeySource: AUTHORIZER
    authorizers:
      - name: partners
        jwks: {jwks}
        issuer: https://idp.example.com/
        audience: warranty-api
        usageIdentifierClaim: sub
      - name: machines
        jwks: {jwks}
        usageIdentifierClaim: client_id
        usageIdentifierIs: value
    stages: [ {{ name: prod }} ]
    routes:
      - {{ path: "/echo/{{rest+}}", method: GET, apiKeyRequired: true, authorizer: partners, upstream: "{upstream}" }}
      - {{ path: "/machine/{{rest+}}", method: GET, apiKeyRequired: true, authorizer: machines, upstream: "{upstream}" }}
      - {{ path: /public, method: GET, upstream: "{upstream}" }}
usagePlans:
  - name: partners
    apiStages: [ {{ apiId: warranty, stage: prod }} ]
    throttle: {{ rateLimit: 0.001, burstLimit: 3 }}
apiKeys:
  - {{ name: central-system, value: "${{CENTRAL_KEY}}", usagePlans: [partners] }}
  - {{ name: off-plan, value: offPlanKeyValue0123456789 }}
  - {{ name: machine, value: {MACHINE_KEY}, usagePlans: [partners] }}
"#,
        jwks = jwks.display()
    );
    util::write_config(dir.path(), &yaml);
    let mut env = util::admin_env();
    env.push(("CENTRAL_KEY", KEY));
    let gw = Gateway::start(dir.path(), &env);
    let c = client();
    let url = gw.url("/prod/echo/me");
    let claims = |sub: &str, exp: u64| json!({"sub": sub, "iss": "https://idp.example.com/", "aud": "warranty-api", "exp": exp});
    let get = |token: Option<String>, extra: &'static [(&'static str, &'static str)]| {
        let (c, url) = (client(), url.clone());
        async move {
            let bearer = token.map(|t| format!("Bearer {t}"));
            let mut headers: Vec<(&str, &str)> = extra.to_vec();
            if let Some(b) = &bearer {
                headers.push(("authorization", b));
            }
            c.send("GET", &url, &headers, "").await
        }
    };

    // A valid token naming the key: admitted under its plan, the subject passed on (a forged one
    // dropped), the key's limits advertised.
    let good = signer.token(claims("central-system", now() + 300));
    let r = get(Some(good.clone()), &[("x-tollgate-subject", "forged")]).await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    assert_eq!(r.json()["headers"]["x-tollgate-subject"], "central-system");
    assert_eq!(
        r.json()["headers"].get("authorization").map(Value::as_str),
        Some(Some(format!("Bearer {good}").as_str())),
        "the token itself goes on"
    );
    // Bad tokens: 401 as AWS's authorizers answer.
    let unauthorized = json!({"message": "Unauthorized"});
    for bad in [
        None,
        Some(signer.token(claims("central-system", now() - 3600))),
        Some(Signer::new("idp-1").token(claims("central-system", now() + 300))),
        Some(signer.token(json!({"sub": "central-system", "iss": "https://evil/", "aud": "warranty-api", "exp": now() + 300}))),
        Some("not.a.token".into()),
        // The same IdP's tokens for no audience, or with the claims mistyped (Cognito access
        // tokens and client-credentials tokens often carry no aud).
        Some(signer.token(json!({"sub": "central-system", "iss": "https://idp.example.com/", "exp": now() + 300}))),
        Some(signer.token(json!({"sub": "central-system", "iss": "https://idp.example.com/", "aud": null, "exp": now() + 300}))),
        Some(signer.token(json!({"sub": "central-system", "aud": "warranty-api", "exp": now() + 300}))),
        Some(signer.token(json!({"sub": "central-system", "iss": ["https://idp.example.com/"], "aud": "warranty-api", "exp": now() + 300}))),
        Some(signer.token(json!({"sub": "central-system", "iss": "https://idp.example.com/", "aud": "warranty-api", "exp": u64::MAX}))),
    ] {
        let r = get(bad.clone(), &[]).await;
        assert_eq!((r.status, r.json()), (401, unauthorized.clone()), "{bad:?}");
        assert_eq!(r.header("x-amzn-errortype"), Some("UnauthorizedException"));
    }
    // An x-api-key does not stand in for a token on these routes.
    let r = c.get(&url, Some(KEY)).await;
    assert_eq!(r.status, 401);
    // Valid tokens naming no key, or a key in no plan for the stage: 403.
    for sub in ["nobody", "off-plan"] {
        let r = get(Some(signer.token(claims(sub, now() + 300))), &[]).await;
        assert_eq!(
            (r.status, r.json()),
            (403, json!({"message": "Forbidden"})),
            "{sub}"
        );
    }
    // The key's plan throttles the caller: a burst of 3, then 429.
    for _ in 0..2 {
        assert_eq!(get(Some(good.clone()), &[]).await.status, 200);
    }
    let r = get(Some(good.clone()), &[]).await;
    assert_eq!(
        (r.status, r.json()),
        (429, json!({"message": "Too Many Requests"}))
    );

    // By value, as AWS's usageIdentifierKey: the claim holds the key's value, a secret, so the
    // backend gets the key's id instead.
    let token = signer.token(json!({"client_id": MACHINE_KEY, "exp": now() + 300}));
    let r = c
        .send(
            "GET",
            &gw.url("/prod/machine/x"),
            &[("authorization", &format!("Bearer {token}"))],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.body);
    let subject = r.json()["headers"]["x-tollgate-subject"]
        .as_str()
        .unwrap()
        .to_string();
    assert_ne!(subject, MACHINE_KEY);
    assert!(
        subject.len() == 10 && subject.bytes().all(|b| b.is_ascii_alphanumeric()),
        "the key's id: {subject}"
    );
    let machine = signer.token(json!({"client_id": KEY, "exp": now() + 300}));
    let r = c
        .send(
            "GET",
            &gw.url("/prod/machine/x"),
            &[("authorization", &format!("Bearer {machine}"))],
            "",
        )
        .await;
    assert_eq!(r.status, 429, "the same key, the same spent bucket");
    assert_eq!(c.get(&gw.url("/prod/public"), None).await.status, 200);

    // Key writes change who a name names as soon as they are answered: a key created and bound, then
    // renamed, then sharing its name with a second key (which names neither), then alone again.
    let admin = util::AdminClient::new(gw.admin.unwrap());
    let plan = admin.plan_id("partners").await;
    let create = |name: &str| {
        let body = json!({ "name": name, "enabled": true }).to_string();
        let admin = &admin;
        async move {
            admin.ok("POST", "/apikeys", &body).await["id"]
                .as_str()
                .unwrap()
                .to_string()
        }
    };
    let late = create("late-partner").await;
    let bind = json!({ "keyId": late, "keyType": "API_KEY" }).to_string();
    admin
        .ok("POST", &format!("/usageplans/{plan}/keys"), &bind)
        .await;
    let named = |name: &str| get(Some(signer.token(claims(name, now() + 300))), &[]);
    assert_eq!(named("late-partner").await.status, 200, "named at once");
    let rename =
        r#"{"patchOperations":[{"op":"replace","path":"/name","value":"renamed-partner"}]}"#;
    admin.ok("PATCH", &format!("/apikeys/{late}"), rename).await;
    assert_eq!(
        named("late-partner").await.status,
        403,
        "the old name names nothing"
    );
    assert_eq!(named("renamed-partner").await.status, 200);
    let twin = create("renamed-partner").await;
    assert_eq!(
        named("renamed-partner").await.status,
        403,
        "a shared name names no key"
    );
    admin.ok("DELETE", &format!("/apikeys/{twin}"), "").await;
    assert_eq!(named("renamed-partner").await.status, 200, "alone again");
    assert!(gw.terminate().success());
}

/// An IdP's JWKS endpoint over HTTPS: serves `jwks` to each GET, counting them.
async fn jwks_endpoint(
    dir: &std::path::Path,
    jwks: Arc<Mutex<String>>,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let ca = crate::tls::ca("IdP CA");
    std::fs::write(dir.join("idp-ca.pem"), ca.pem()).unwrap();
    crate::tls::server_cert(dir, "idp", &ca, &["127.0.0.1"]);
    let chain = vec![CertificateDer::from_pem_file(dir.join("idp.crt")).unwrap()];
    let key = PrivateKeyDer::from_pem_file(dir.join("idp.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(tollgate_gateway::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let fetches = Arc::new(AtomicUsize::new(0));
    let counted = fetches.clone();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, jwks, counted) = (acceptor.clone(), jwks.clone(), counted.clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match tls.read(&mut buf).await {
                        Ok(n) if n > 0 => head.extend_from_slice(&buf[..n]),
                        _ => return,
                    }
                }
                counted.fetch_add(1, Ordering::SeqCst);
                let body = jwks.lock().unwrap().clone();
                let resp = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                    body.len()
                );
                let _ = tls.write_all(resp.as_bytes()).await;
                let _ = tls.shutdown().await;
            });
        }
    });
    (addr, fetches)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jwks_by_https_url_is_fetched_and_refetched_for_an_unknown_kid() {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let (first, second) = (Signer::new("k1"), Signer::new("k2"));
    let set = |signers: &[&Signer]| {
        let keys: Vec<&Value> = signers.iter().map(|s| &s.jwk).collect();
        json!({ "keys": keys }).to_string()
    };
    let served = Arc::new(Mutex::new(set(&[&first])));
    let (idp, fetches) = jwks_endpoint(dir.path(), served.clone()).await;
    let yaml = format!(
        r#"listen: 127.0.0.1:0
store: {{ sqlite: ./tollgate.db }}
upstreamTls: {{ ca: idp-ca.pem }}
apis:
  - id: warranty
    apiKeySource: AUTHORIZER
    authorizers: [ {{ name: idp, jwks: "https://127.0.0.1:{port}/.well-known/jwks.json" }} ]
    stages: [ {{ name: prod }} ]
    routes:
      - {{ path: "/echo/{{rest+}}", method: GET, apiKeyRequired: true, upstream: "http://{up}" }}
usagePlans:
  - {{ name: p, apiStages: [ {{ apiId: warranty, stage: prod }} ] }}
apiKeys:
  - {{ name: central-system, value: "${{CENTRAL_KEY}}", usagePlans: [p] }}
"#,
        port = idp.port(),
        up = up.addr
    );
    util::write_config(dir.path(), &yaml);
    // `check` needs no network; `check --online` fetches, as `serve` does before it serves.
    let check = |online: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["check", "--config", "tollgate.yaml"])
            .args(online)
            .current_dir(dir.path())
            .env("CENTRAL_KEY", KEY)
            .output()
            .unwrap()
    };
    assert!(check(&[]).status.success());
    assert_eq!(fetches.load(Ordering::SeqCst), 0, "check fetched nothing");
    assert!(check(&["--online"]).status.success());
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "check --online fetched");
    fetches.store(0, Ordering::SeqCst);
    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);
    assert_eq!(fetches.load(Ordering::SeqCst), 1, "fetched at startup");
    let call = |signer: &Signer| {
        let token = signer.token(json!({"sub": "central-system", "exp": now() + 300}));
        let (c, url) = (client(), gw.url("/prod/echo/x"));
        async move {
            let bearer = format!("Bearer {token}");
            c.send("GET", &url, &[("authorization", &bearer)], "")
                .await
                .status
        }
    };
    assert_eq!(call(&first).await, 200);
    // The IdP adds a key: the first token naming it makes tollgate fetch the JWKS again.
    *served.lock().unwrap() = set(&[&first, &second]);
    assert_eq!(call(&second).await, 200);
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    // A kid the IdP does not have: refused, and not fetched again so soon.
    assert_eq!(call(&Signer::new("k3")).await, 401);
    assert_eq!(fetches.load(Ordering::SeqCst), 2);
    assert!(gw.terminate().success());
}

#[test]
fn an_unreachable_jwks_url_fails_serve_and_check_online_not_check() {
    let dir = tempfile::tempdir().unwrap();
    // Nothing listens on port 1.
    let yaml = r#"listen: 127.0.0.1:0
store: { sqlite: ./tollgate.db }
apis:
  - id: warranty
    apiKeySource: AUTHORIZER
    authorizers: [ { name: idp, jwks: "https://127.0.0.1:1/jwks.json", issuer: "https://idp.test/" } ]
    stages: [ { name: prod } ]
    routes:
      - { path: "/echo/{rest+}", method: GET, apiKeyRequired: true, upstream: "http://127.0.0.1:9" }
"#;
    util::write_config(dir.path(), yaml);
    let run = |args: &[&str]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap()
    };
    assert!(
        run(&["check", "--config", "tollgate.yaml"])
            .status
            .success()
    );
    for args in [
        &["check", "--config", "tollgate.yaml", "--online"][..],
        &["serve", "--config", "tollgate.yaml"][..],
    ] {
        let out = run(args);
        assert!(!out.status.success(), "{args:?}");
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(
            said.contains("tollgate.yaml:6:") && said.contains("apis[0].authorizers[0].jwks"),
            "{args:?}: {said}"
        );
    }
}
