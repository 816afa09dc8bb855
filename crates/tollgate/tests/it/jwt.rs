//! Callers with JWTs (AWS's `apiKeySource: AUTHORIZER`): a verified claim names the API key whose
//! plan applies; tokens minted here with a generated P-256 key.

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
"#,
        jwks = jwks.display()
    );
    util::write_config(dir.path(), &yaml);
    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);
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

    // By value, as AWS's usageIdentifierKey: the claim holds the key's value.
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
    assert!(gw.terminate().success());
}
