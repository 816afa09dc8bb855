//! Callers identified by a JWT instead of an API key (AWS's `apiKeySource: AUTHORIZER`): the token in
//! `Authorization: Bearer` is verified against the keys of a JWKS, and one of its claims names the API
//! key whose plan applies (by the key's name, or by its value as AWS's `usageIdentifierKey` does).
//!
//! Signatures are checked by the `jsonwebtoken` crate, with RS256, ES256 and EdDSA only: each JWKS
//! key is bound to the one algorithm its type allows, so a token's `alg` cannot pick another (no
//! `none`, no HMAC keyed with a public key). Times (`exp`, `nbf`) are checked here against the
//! gateway's clock, with a minute's leeway. The JWKS keys are cached; decisions are not.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use tollgate_core::clock::NANOS_PER_SEC;

use crate::tls::ClientTls;

/// How far ahead `exp` may be, in seconds: a year. IdPs issue tokens for minutes or hours; one that
/// never expires (`exp` near `u64::MAX`) would be a credential nobody can take back.
const MAX_LIFETIME_SECS: u64 = 366 * 24 * 3600;
/// How far `exp` and `nbf` may be off, in seconds (clocks drift).
const LEEWAY_SECS: u64 = 60;
/// The least time between two re-reads of the JWKS for a `kid` it does not hold.
const REFRESH_EVERY: u64 = 10 * NANOS_PER_SEC;

/// What the token's identifying claim is matched against.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UsageIdentifier {
    /// The API key's name.
    Name,
    /// The API key's value (AWS's `usageIdentifierKey`).
    Value,
}

impl UsageIdentifier {
    /// The names `usageIdentifierIs` takes, each with what it names.
    pub const NAMES: [(&str, Self); 2] = [("name", Self::Name), ("value", Self::Value)];
}

/// An authorizer as the config declares it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizerSettings {
    /// Its name, which routes refer to.
    pub name: String,
    /// The JWKS: a file, or an `https://` URL.
    pub jwks: String,
    /// The `iss` required, if any.
    pub issuer: Option<String>,
    /// An `aud` required, if any.
    pub audience: Option<String>,
    /// The claim naming the API key.
    pub claim: String,
    /// What that claim holds.
    pub identifier: UsageIdentifier,
}

/// One JWKS key, bound to its algorithm.
struct VerifyKey {
    kid: Option<String>,
    alg: Algorithm,
    key: DecodingKey,
}

/// Where a JWKS is read from.
enum JwksSource {
    File(String),
    /// Fetched trusting what https upstreams trust (`upstreamTls`).
    Url(String, Arc<ClientTls>),
}

/// How long a JWKS fetch may take.
const FETCH_TIMEOUT: Duration = Duration::from_secs(5);

impl JwksSource {
    fn describe(&self) -> &str {
        match self {
            Self::File(path) | Self::Url(path, _) => path,
        }
    }

    fn read(&self) -> Result<String, String> {
        match self {
            Self::File(path) => std::fs::read_to_string(path).map_err(|e| format!("{path}: {e}")),
            Self::Url(url, tls) => ureq::AgentBuilder::new()
                .tls_config(
                    tls.config()
                        .ok_or_else(|| format!("{url}: its TLS configuration was never opened"))?
                        .clone(),
                )
                .timeout(FETCH_TIMEOUT)
                .redirects(0)
                .build()
                .get(url)
                .call()
                .map_err(|e| format!("{url}: {e}"))?
                .into_string()
                .map_err(|e| format!("{url}: {e}")),
        }
    }
}

/// A configured authorizer, with its JWKS keys.
pub struct Authorizer {
    /// Its settings.
    pub settings: AuthorizerSettings,
    source: Arc<JwksSource>,
    keys: ArcSwap<Vec<VerifyKey>>,
    /// When the JWKS was last read (clock nanoseconds).
    read_at: Mutex<u64>,
}

impl std::fmt::Debug for Authorizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Authorizer")
            .field("settings", &self.settings)
            .field("keys", &self.keys.load().len())
            .finish()
    }
}

impl PartialEq for Authorizer {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings
    }
}

/// Why a token was not accepted: the caller gets 401 `Unauthorized` either way; the reason is logged.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TokenError {
    /// No `Authorization: Bearer` token.
    #[error("no bearer token")]
    Missing,
    /// The token could not be read, or its signature, algorithm or key is wrong.
    #[error("invalid token: {0}")]
    Invalid(String),
    /// `exp` has passed (or is missing).
    #[error("token expired")]
    Expired,
    /// `nbf` has not come yet.
    #[error("token not yet valid")]
    NotYetValid,
}

/// Reads the JWKS keys that tollgate accepts: RSA (RS256), EC P-256 (ES256), Ed25519 (EdDSA).
fn read_jwks(source: &JwksSource) -> Result<Vec<VerifyKey>, String> {
    let text = source.read()?;
    let path = source.describe();
    let set: JwkSet =
        serde_json::from_str(&text).map_err(|e| format!("{path}: not a JWKS: {e}"))?;
    let mut keys = Vec::new();
    for jwk in &set.keys {
        let alg = match &jwk.algorithm {
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
            AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                Algorithm::ES256
            }
            AlgorithmParameters::OctetKeyPair(okp) if okp.curve == EllipticCurve::Ed25519 => {
                Algorithm::EdDSA
            }
            // HMAC secrets and other curves: never.
            _ => continue,
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("{path}: {e}"))?;
        keys.push(VerifyKey {
            kid: jwk.common.key_id.clone(),
            alg,
            key,
        });
    }
    if keys.is_empty() {
        return Err(format!("{path}: no RSA, P-256 or Ed25519 key in the JWKS"));
    }
    Ok(keys)
}

impl Authorizer {
    /// The authorizer `settings` declare, without its keys yet ([`Authorizer::read_keys`] reads
    /// them); a JWKS URL must be `https`, fetched trusting `tls` (opened by then).
    pub fn new(settings: AuthorizerSettings, tls: Arc<ClientTls>) -> Result<Self, String> {
        let source = if settings.jwks.starts_with("https://") {
            JwksSource::Url(settings.jwks.clone(), tls)
        } else if settings.jwks.contains("://") {
            return Err(format!("{}: a JWKS URL must be https", settings.jwks));
        } else {
            JwksSource::File(settings.jwks.clone())
        };
        Ok(Self {
            settings,
            source: Arc::new(source),
            keys: ArcSwap::from_pointee(Vec::new()),
            read_at: Mutex::new(0),
        })
    }

    /// Whether its JWKS is fetched over the network (rather than read from a file).
    pub fn fetches(&self) -> bool {
        matches!(*self.source, JwksSource::Url(..))
    }

    /// Reads its JWKS now (blocking: a file, or a fetch; `now`: the clock's reading).
    pub fn read_keys(&self, now: u64) -> Result<(), String> {
        let keys = read_jwks(&self.source)?;
        self.keys.store(keys.into());
        *self.read_at.lock().unwrap_or_else(|e| e.into_inner()) = now;
        Ok(())
    }

    /// Reads the JWKS again (on a blocking thread: a file, or a fetch), unless it was read less
    /// than [`REFRESH_EVERY`] ago: a token with an unknown `kid` may be signed with a key added since.
    async fn refresh(&self, now: u64) -> bool {
        {
            let mut read_at = self.read_at.lock().unwrap_or_else(|e| e.into_inner());
            if now.saturating_sub(*read_at) < REFRESH_EVERY {
                return false;
            }
            *read_at = now;
        }
        let source = self.source.clone();
        let read = tokio::task::spawn_blocking(move || read_jwks(&source))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        match read {
            Ok(keys) => {
                self.keys.store(keys.into());
                true
            }
            Err(e) => {
                tracing::warn!(authorizer = %self.settings.name, error = %e, "JWKS not re-read");
                false
            }
        }
    }

    /// The identifying claim of the token in `authorization` (an `Authorization` field's value),
    /// once its signature, issuer, audience and times check out at `now`; `None` for a valid token
    /// without that claim (it names no key).
    pub async fn verify(
        &self,
        authorization: Option<&[u8]>,
        now: u64,
    ) -> Result<Option<String>, TokenError> {
        let token = authorization
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            })
            .filter(|t| !t.is_empty())
            .ok_or(TokenError::Missing)?;
        let invalid = |e: jsonwebtoken::errors::Error| TokenError::Invalid(e.to_string());
        let header = jsonwebtoken::decode_header(token).map_err(invalid)?;
        let pick = |keys: &[VerifyKey]| {
            keys.iter()
                .position(|k| k.alg == header.alg && (header.kid.is_none() || k.kid == header.kid))
        };
        let mut keys = self.keys.load_full();
        if pick(&keys).is_none() && self.refresh(now).await {
            keys = self.keys.load_full();
        }
        let key = pick(&keys)
            .map(|at| &keys[at])
            .ok_or_else(|| TokenError::Invalid(format!("no {:?} key for this kid", header.alg)))?;
        let mut validation = Validation::new(key.alg);
        // Times against the gateway's clock, below.
        validation.validate_exp = false;
        validation.required_spec_claims.clear();
        if let Some(iss) = &self.settings.issuer {
            validation.set_issuer(&[iss]);
        }
        match &self.settings.audience {
            Some(aud) => validation.set_audience(&[aud]),
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<HashMap<String, serde_json::Value>>(
            token,
            &key.key,
            &validation,
        )
        .map_err(invalid)?;
        let claims = data.claims;
        // jsonwebtoken checks `iss` and `aud` only when the token has them: a configured one is
        // required here, with the type RFC 7519 gives it (`iss` a string; `aud` a string or an
        // array of strings).
        let claim_invalid = |why: &str| TokenError::Invalid(why.to_owned());
        if let Some(iss) = &self.settings.issuer {
            match claims.get("iss") {
                Some(serde_json::Value::String(got)) if got == iss => {}
                _ => {
                    return Err(claim_invalid(
                        "iss is missing, not a string, or another issuer",
                    ));
                }
            }
        }
        if let Some(aud) = &self.settings.audience {
            let ours = match claims.get("aud") {
                Some(serde_json::Value::String(got)) => got == aud,
                Some(serde_json::Value::Array(all))
                    if all.iter().all(serde_json::Value::is_string) =>
                {
                    all.iter().any(|a| a.as_str() == Some(aud.as_str()))
                }
                _ => false,
            };
            if !ours {
                return Err(claim_invalid(
                    "aud is missing, mistyped, or for another audience",
                ));
            }
        }
        let secs = now / NANOS_PER_SEC;
        let time = |name: &str| match claims.get(name) {
            None => Ok(None),
            Some(v) => v.as_u64().map(Some).ok_or_else(|| {
                TokenError::Invalid(format!("{name} is not a whole number of seconds"))
            }),
        };
        match time("exp")? {
            Some(exp) if exp > secs.saturating_add(MAX_LIFETIME_SECS) => {
                return Err(claim_invalid("exp is further than a year ahead"));
            }
            Some(exp) if secs < exp.saturating_add(LEEWAY_SECS) => {}
            _ => return Err(TokenError::Expired),
        }
        if time("nbf")?.is_some_and(|nbf| secs.saturating_add(LEEWAY_SECS) < nbf) {
            return Err(TokenError::NotYetValid);
        }
        Ok(match claims.get(&self.settings.claim) {
            Some(serde_json::Value::String(s)) => Some(s.clone()),
            Some(serde_json::Value::Number(n)) => Some(n.to_string()),
            _ => None,
        })
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::path::Path;
    use std::process::Command;

    use base64::Engine as _;
    use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64;
    use jsonwebtoken::{EncodingKey, Header};
    use serde_json::json;

    use super::*;
    use crate::tls::UpstreamTlsFiles;

    /// A signing key and its JWK, for minting tokens in tests.
    pub(crate) struct Signer {
        pub alg: Algorithm,
        pub kid: String,
        pub key: EncodingKey,
        pub jwk: serde_json::Value,
        /// The public key as PEM (RSA only): what the HS256 confusion keys an HMAC with.
        pub public_pem: Option<String>,
    }

    impl Signer {
        pub(crate) fn ec(kid: &str) -> Self {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).unwrap();
            let raw = pair.public_key_raw();
            Self {
                alg: Algorithm::ES256,
                kid: kid.into(),
                key: EncodingKey::from_ec_pem(pair.serialize_pem().as_bytes()).unwrap(),
                jwk: json!({"kty": "EC", "crv": "P-256", "kid": kid,
                            "x": B64.encode(&raw[1..33]), "y": B64.encode(&raw[33..65])}),
                public_pem: None,
            }
        }

        pub(crate) fn ed(kid: &str) -> Self {
            let pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
            Self {
                alg: Algorithm::EdDSA,
                kid: kid.into(),
                key: EncodingKey::from_ed_pem(pair.serialize_pem().as_bytes()).unwrap(),
                jwk: json!({"kty": "OKP", "crv": "Ed25519", "kid": kid,
                            "x": B64.encode(pair.public_key_raw())}),
                public_pem: None,
            }
        }

        /// An RSA key made by the `openssl` command (ring cannot generate RSA keys).
        pub(crate) fn rsa(kid: &str, dir: &Path) -> Self {
            let pem = dir.join(format!("{kid}.pem"));
            let run = |args: &[&str]| {
                let out = Command::new("openssl")
                    .args(args)
                    .output()
                    .expect("openssl");
                assert!(
                    out.status.success(),
                    "{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                String::from_utf8(out.stdout).unwrap()
            };
            let path = pem.to_str().unwrap();
            run(&[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                "rsa_keygen_bits:2048",
                "-out",
                path,
            ]);
            let modulus = run(&["rsa", "-in", path, "-noout", "-modulus"]);
            let hex = modulus.trim().trim_start_matches("Modulus=");
            let n: Vec<u8> = (0..hex.len())
                .step_by(2)
                .map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap())
                .collect();
            let public_pem = run(&["rsa", "-in", path, "-pubout"]);
            Self {
                alg: Algorithm::RS256,
                kid: kid.into(),
                key: EncodingKey::from_rsa_pem(&std::fs::read(&pem).unwrap()).unwrap(),
                jwk: json!({"kty": "RSA", "kid": kid, "n": B64.encode(n), "e": "AQAB"}),
                public_pem: Some(public_pem),
            }
        }

        pub(crate) fn token(&self, claims: &serde_json::Value) -> String {
            let mut header = Header::new(self.alg);
            header.kid = Some(self.kid.clone());
            jsonwebtoken::encode(&header, claims, &self.key).unwrap()
        }
    }

    /// Writes a JWKS of `signers` to `path`.
    pub(crate) fn write_jwks(path: &Path, signers: &[&Signer]) {
        let keys: Vec<_> = signers.iter().map(|s| s.jwk.clone()).collect();
        std::fs::write(path, json!({ "keys": keys }).to_string()).unwrap();
    }

    const NOW: u64 = 1_800_000_000 * NANOS_PER_SEC;

    /// TLS settings for authorizers whose JWKS is a file (they never connect, so it is never
    /// opened).
    pub(crate) fn no_tls() -> Arc<ClientTls> {
        Arc::new(ClientTls::new(UpstreamTlsFiles::default()))
    }

    fn bearer(token: &str) -> Vec<u8> {
        format!("Bearer {token}").into_bytes()
    }

    #[tokio::test]
    async fn tokens_are_checked_as_aws_authorizers_would() {
        let dir = tempfile::tempdir().unwrap();
        let (ec, ed, rsa) = (
            Signer::ec("ec1"),
            Signer::ed("ed1"),
            Signer::rsa("rsa1", dir.path()),
        );
        let jwks = dir.path().join("jwks.json");
        write_jwks(&jwks, &[&ec, &ed, &rsa]);
        let settings = AuthorizerSettings {
            name: "partners".into(),
            jwks: jwks.display().to_string(),
            issuer: Some("https://idp.example.com/".into()),
            audience: Some("warranty-api".into()),
            claim: "sub".into(),
            identifier: UsageIdentifier::Name,
        };
        let auth = Authorizer::new(settings, no_tls()).unwrap();
        auth.read_keys(NOW).unwrap();
        let secs = NOW / NANOS_PER_SEC;
        let claims = |exp: u64| {
            json!({"sub": "central-system", "iss": "https://idp.example.com/",
                   "aud": "warranty-api", "exp": exp, "nbf": secs - 10})
        };
        let good = claims(secs + 300);
        for signer in [&ec, &ed, &rsa] {
            let t = bearer(&signer.token(&good));
            assert_eq!(
                auth.verify(Some(&t), NOW).await,
                Ok(Some("central-system".into())),
                "{:?}",
                signer.alg
            );
        }
        let check = |token: String| {
            let value = bearer(&token);
            let auth = &auth;
            async move { auth.verify(Some(&value), NOW).await }
        };
        // Expired (beyond the leeway), not yet valid, and the leeway itself.
        assert_eq!(
            check(ec.token(&claims(secs - LEEWAY_SECS))).await,
            Err(TokenError::Expired)
        );
        assert!(
            check(ec.token(&claims(secs - LEEWAY_SECS + 1)))
                .await
                .is_ok(),
            "within the leeway"
        );
        let mut early = good.clone();
        early["nbf"] = json!(secs + LEEWAY_SECS + 1);
        assert_eq!(check(ec.token(&early)).await, Err(TokenError::NotYetValid));
        let mut no_exp = good.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(
            check(ec.token(&no_exp)).await,
            Err(TokenError::Expired),
            "exp is required"
        );
        // Wrong, missing, null or mistyped issuer and audience; an exp or nbf that is no number of
        // seconds; an exp too far ahead.
        for (claim, value) in [
            ("iss", json!("https://evil.example.com/")),
            ("aud", json!("another-api")),
            ("iss", json!(null)),
            ("aud", json!(null)),
            ("iss", json!(["https://idp.example.com/"])),
            ("aud", json!({"warranty-api": true})),
            ("aud", json!(["warranty-api", 1])),
            ("aud", json!(7)),
            ("exp", json!(format!("{}", secs + 300))),
            ("exp", json!(secs as f64 + 300.5)),
            ("exp", json!(secs + MAX_LIFETIME_SECS + 1)),
            ("exp", json!(u64::MAX)),
            ("nbf", json!("0")),
        ] {
            let mut wrong = good.clone();
            wrong[claim] = value.clone();
            assert!(
                matches!(check(ec.token(&wrong)).await, Err(TokenError::Invalid(_))),
                "{claim}: {value}"
            );
        }
        for claim in ["iss", "aud"] {
            let mut without = good.clone();
            without.as_object_mut().unwrap().remove(claim);
            assert!(
                matches!(check(ec.token(&without)).await, Err(TokenError::Invalid(_))),
                "{claim} is required when configured"
            );
        }
        // An aud array naming this audience among others is for it.
        let mut many = good.clone();
        many["aud"] = json!(["other-api", "warranty-api"]);
        assert!(check(ec.token(&many)).await.is_ok());
        let mut long = good.clone();
        long["exp"] = json!(secs + MAX_LIFETIME_SECS);
        assert!(check(ec.token(&long)).await.is_ok(), "a year ahead");
        // Signed by another key under a known kid.
        let impostor = Signer::ec("ec1");
        assert!(matches!(
            check(impostor.token(&good)).await,
            Err(TokenError::Invalid(_))
        ));
        // alg: none.
        let none = format!(
            "{}.{}.",
            B64.encode(br#"{"alg":"none","typ":"JWT"}"#),
            B64.encode(good.to_string())
        );
        assert!(matches!(check(none).await, Err(TokenError::Invalid(_))));
        // HS256 keyed with the RSA public key: the classic confusion.
        let secret = EncodingKey::from_secret(rsa.public_pem.as_deref().unwrap().as_bytes());
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("rsa1".into());
        let hs = jsonwebtoken::encode(&header, &good, &secret).unwrap();
        assert!(matches!(check(hs).await, Err(TokenError::Invalid(_))));
        let secret = EncodingKey::from_secret(rsa.jwk["n"].as_str().unwrap().as_bytes());
        let hs = jsonwebtoken::encode(&header, &good, &secret).unwrap();
        assert!(matches!(check(hs).await, Err(TokenError::Invalid(_))));
        // No token, another scheme, garbage.
        assert_eq!(auth.verify(None, NOW).await, Err(TokenError::Missing));
        assert_eq!(
            auth.verify(Some(b"Basic abc"), NOW).await,
            Err(TokenError::Missing)
        );
        assert!(matches!(
            check("a.b.c".into()).await,
            Err(TokenError::Invalid(_))
        ));
        // A valid token without the identifying claim names no key.
        let mut anonymous = good.clone();
        anonymous.as_object_mut().unwrap().remove("sub");
        assert_eq!(check(ec.token(&anonymous)).await, Ok(None));
    }

    #[tokio::test]
    async fn an_unknown_kid_rereads_the_jwks_at_most_every_ten_seconds() {
        let dir = tempfile::tempdir().unwrap();
        let (old, new) = (Signer::ec("old"), Signer::ed("new"));
        let jwks = dir.path().join("jwks.json");
        write_jwks(&jwks, &[&old]);
        let settings = AuthorizerSettings {
            name: "p".into(),
            jwks: jwks.display().to_string(),
            issuer: None,
            audience: None,
            claim: "client_id".into(),
            identifier: UsageIdentifier::Value,
        };
        let auth = Authorizer::new(settings, no_tls()).unwrap();
        auth.read_keys(NOW).unwrap();
        let claims = json!({"client_id": "abc", "exp": NOW / NANOS_PER_SEC + 300});
        let token = bearer(&new.token(&claims));
        // The IdP rotates its keys; tollgate learns of the new one on a token naming it.
        write_jwks(&jwks, &[&old, &new]);
        assert!(
            matches!(
                auth.verify(Some(&token), NOW + 1).await,
                Err(TokenError::Invalid(_))
            ),
            "read moments ago"
        );
        let later = NOW + REFRESH_EVERY;
        assert_eq!(
            auth.verify(Some(&token), later).await,
            Ok(Some("abc".into())),
            "re-read, then accepted"
        );
        // A kid still unknown after the re-read is refused.
        let stranger = bearer(&Signer::ec("stranger").token(&claims));
        assert!(matches!(
            auth.verify(Some(&stranger), later + 2 * REFRESH_EVERY)
                .await,
            Err(TokenError::Invalid(_))
        ));
    }
}
