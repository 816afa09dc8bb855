//! AWS Signature Version 4: verifying the admin API's requests, and signing the CLI's.
//!
//! One canonicalisation serves both sides, so the CLI and the server cannot drift apart; the tests also
//! check it against AWS's published example and against `curl --aws-sigv4`.

use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, HeaderName, HeaderValue, Method};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC};
use sha2::{Digest, Sha256};

/// The service name requests must be signed for.
pub const SERVICE: &str = "apigateway";
/// How far a request's time may be from ours, as AWS allows.
pub const MAX_SKEW_SECS: i64 = 15 * 60;
const ALGORITHM: &str = "AWS4-HMAC-SHA256";

/// An access key pair.
#[derive(Clone, PartialEq, Eq)]
pub struct Credentials {
    /// The public half, e.g. `AKIDEXAMPLE`.
    pub access_key_id: String,
    /// The secret half.
    pub secret_access_key: String,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the secret.
        f.debug_struct("Credentials")
            .field("access_key_id", &self.access_key_id)
            .finish_non_exhaustive()
    }
}

/// Why a request's signature was not accepted; each is an AWS error type with AWS's message.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    /// No `Authorization` header.
    #[error("Missing Authentication Token")]
    Missing,
    /// The header is not a well-formed SigV4 authorization.
    #[error("{0}")]
    Incomplete(String),
    /// The access key is not one we know.
    #[error("The security token included in the request is invalid.")]
    UnknownAccessKey,
    /// The signature does not match.
    #[error(
        "The request signature we calculated does not match the signature you provided. Check your AWS Secret Access Key and signing method. Consult the service documentation for details."
    )]
    Mismatch,
    /// The request time is more than 15 minutes from ours.
    #[error("{0}")]
    Expired(String),
}

impl SignatureError {
    /// The `x-amzn-ErrorType` AWS uses for this failure.
    pub fn error_type(&self) -> &'static str {
        match self {
            SignatureError::Missing => "MissingAuthenticationTokenException",
            SignatureError::Incomplete(_) => "IncompleteSignatureException",
            SignatureError::UnknownAccessKey => "UnrecognizedClientException",
            SignatureError::Mismatch | SignatureError::Expired(_) => "InvalidSignatureException",
        }
    }
}

fn mac(key: &[u8], data: &[u8]) -> Hmac<Sha256> {
    // HMAC takes keys of any length, so this cannot fail.
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(data);
    mac
}

fn hmac(key: &[u8], data: &[u8]) -> [u8; 32] {
    mac(key, data).finalize().into_bytes().into()
}

/// Hex SHA-256 of a payload.
pub fn payload_hash(body: &[u8]) -> String {
    hex::encode(Sha256::digest(body))
}

/// Bytes SigV4 percent-encodes in a URI component: all but RFC 3986's unreserved characters. Also
/// what a client encodes a query value or path segment with.
pub const COMPONENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

/// [`COMPONENT`] but for `/`, for a path.
const PATH: &AsciiSet = &COMPONENT.remove(b'/');

/// RFC 3986 encoding as SigV4 wants it: everything but unreserved characters (and `/` when asked).
fn uri_encode(input: &[u8], keep_slash: bool, out: &mut String) {
    let set = if keep_slash { PATH } else { COMPONENT };
    out.extend(percent_encoding::percent_encode(input, set));
}

/// The bytes `input` percent-decodes to (malformed escapes stay as they are).
pub(crate) fn percent_decode(input: &str) -> Vec<u8> {
    percent_encoding::percent_decode_str(input).collect()
}

/// The canonical query string: parameters decoded, re-encoded, sorted by name then value.
fn canonical_query(query: &str) -> String {
    canonical_query_in(query, true)
}

/// The canonical query string, optionally keeping the client's parameter order (curl before 8.1
/// signed its query unsorted).
fn canonical_query_in(query: &str, sorted: bool) -> String {
    let mut pairs: Vec<(String, String)> = query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let mut ek = String::new();
            uri_encode(&percent_decode(k), false, &mut ek);
            let mut ev = String::new();
            uri_encode(&percent_decode(v), false, &mut ev);
            (ek, ev)
        })
        .collect();
    if sorted {
        pairs.sort();
    }
    let mut out = String::new();
    for (i, (k, v)) in pairs.iter().enumerate() {
        if i > 0 {
            out.push('&');
        }
        out.push_str(k);
        out.push('=');
        out.push_str(v);
    }
    out
}

/// `name:value\n` for each signed header, values trimmed with inner runs of spaces collapsed.
fn canonical_headers(headers: &HeaderMap, signed: &[&str]) -> Option<String> {
    let mut out = String::new();
    for name in signed {
        let mut values = headers.get_all(*name).iter().peekable();
        values.peek()?;
        out.push_str(name);
        out.push(':');
        let mut first = true;
        for v in values {
            if !first {
                out.push(',');
            }
            first = false;
            let text = String::from_utf8_lossy(v.as_bytes());
            out.push_str(&text.split_whitespace().collect::<Vec<_>>().join(" "));
        }
        out.push('\n');
    }
    Some(out)
}

struct Parts<'a> {
    method: &'a Method,
    canonical_uri: String,
    canonical_query: String,
    headers: &'a HeaderMap,
    signed: &'a [&'a str],
    payload_hash: &'a str,
}

fn string_to_sign(p: &Parts<'_>, amz_date: &str, scope: &str) -> Option<String> {
    let canonical = format!(
        "{}\n{}\n{}\n{}\n{}\n{}",
        p.method.as_str(),
        p.canonical_uri,
        p.canonical_query,
        canonical_headers(p.headers, p.signed)?,
        p.signed.join(";"),
        p.payload_hash
    );
    Some(format!(
        "{ALGORITHM}\n{amz_date}\n{scope}\n{}",
        payload_hash(canonical.as_bytes())
    ))
}

fn signing_key(secret: &str, date: &str, region: &str, service: &str) -> [u8; 32] {
    let k_date = hmac(format!("AWS4{secret}").as_bytes(), date.as_bytes());
    let k_region = hmac(&k_date, region.as_bytes());
    let k_service = hmac(&k_region, service.as_bytes());
    hmac(&k_service, b"aws4_request")
}

/// Whether `signature` is the HMAC of `data` under `key`, compared in constant time (`hmac`'s
/// `verify_slice`), so timing tells nothing about the signature.
fn signature_matches(key: &[u8], data: &[u8], signature: &[u8]) -> bool {
    mac(key, data).verify_slice(signature).is_ok()
}

/// The `X-Amz-Date` format: ISO 8601 basic, UTC.
const AMZ_DATE: &str = "%Y%m%dT%H%M%SZ";

/// `YYYYMMDDTHHMMSSZ` for a Unix time.
pub fn amz_date(unix_secs: i64) -> String {
    jiff::Timestamp::from_second(unix_secs)
        .unwrap_or(jiff::Timestamp::UNIX_EPOCH)
        .strftime(AMZ_DATE)
        .to_string()
}

/// The Unix time an `X-Amz-Date` value names: digits exactly where AWS puts them (jiff alone would
/// also take signs and padded fields).
fn parse_amz_date(text: &str) -> Option<i64> {
    let b = text.as_bytes();
    if b.len() != 16
        || b[8] != b'T'
        || b[15] != b'Z'
        || !b[..8].iter().chain(&b[9..15]).all(u8::is_ascii_digit)
    {
        return None;
    }
    let at = jiff::civil::DateTime::strptime(AMZ_DATE, text).ok()?;
    Some(jiff::tz::TimeZone::UTC.to_timestamp(at).ok()?.as_second())
}

/// Signs a request in place: adds `x-amz-date`, `x-amz-content-sha256` and `authorization`. `headers`
/// must already hold `host`. `path` is the request path as sent (percent-encoded); `query` the raw
/// query string without `?`.
#[allow(clippy::too_many_arguments)]
pub fn sign(
    method: &Method,
    path: &str,
    query: &str,
    headers: &mut HeaderMap,
    body: &[u8],
    credentials: &Credentials,
    region: &str,
    unix_secs: i64,
) {
    let date_time = amz_date(unix_secs);
    let hash = payload_hash(body);
    headers.insert(
        "x-amz-date",
        HeaderValue::try_from(date_time.as_str()).expect("digits are a valid header"),
    );
    headers.insert(
        "x-amz-content-sha256",
        HeaderValue::try_from(hash.as_str()).expect("hex is a valid header"),
    );
    let mut names: Vec<String> = headers
        .keys()
        .map(HeaderName::as_str)
        .filter(|n| *n == "host" || *n == "content-type" || n.starts_with("x-amz-"))
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    let signed: Vec<&str> = names.iter().map(String::as_str).collect();
    let scope = format!("{}/{region}/{SERVICE}/aws4_request", &date_time[..8]);
    let mut canonical_uri = String::new();
    uri_encode(path.as_bytes(), true, &mut canonical_uri);
    let parts = Parts {
        method,
        canonical_uri,
        canonical_query: canonical_query(query),
        headers,
        signed: &signed,
        payload_hash: &hash,
    };
    let to_sign =
        string_to_sign(&parts, &date_time, &scope).expect("every signed header is present");
    let key = signing_key(
        &credentials.secret_access_key,
        &date_time[..8],
        region,
        SERVICE,
    );
    let signature = hex::encode(hmac(&key, to_sign.as_bytes()));
    let auth = format!(
        "{ALGORITHM} Credential={}/{scope}, SignedHeaders={}, Signature={signature}",
        credentials.access_key_id,
        signed.join(";")
    );
    if let Ok(v) = HeaderValue::try_from(auth) {
        headers.insert(http::header::AUTHORIZATION, v);
    }
}

/// A request as the verifier sees it.
#[derive(Debug, Clone, Copy)]
pub struct SignedRequest<'a> {
    /// Everything but the body.
    pub head: SignedHead<'a>,
    /// The whole body.
    pub body: &'a [u8],
}

/// A request's head as the verifier sees it, before its body is read.
#[derive(Debug, Clone, Copy)]
pub struct SignedHead<'a> {
    /// The method.
    pub method: &'a Method,
    /// The path as received (still percent-encoded).
    pub path: &'a str,
    /// The raw query, without `?`.
    pub query: &'a str,
    /// All headers.
    pub headers: &'a HeaderMap,
}

/// A request whose authorization, access key and time have been checked: what is left is the
/// signature itself, over the payload's hash.
#[derive(Debug)]
pub struct Authorized<'a, 'c> {
    head: SignedHead<'a>,
    credentials: &'c Credentials,
    date_header: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed: Vec<&'a str>,
    signature: &'a str,
}

/// Checks a request's SigV4 signature against `known` credentials at time `now_secs`; returns the
/// access key id that signed it.
pub fn verify<'c>(
    req: &SignedRequest<'_>,
    known: &'c [Credentials],
    now_secs: i64,
) -> Result<&'c str, SignatureError> {
    let authorized = check_head(&req.head, known, now_secs)?;
    let hash = payload_hash(req.body);
    if let Some(claimed) = authorized.claimed_payload_hash() {
        if claimed != hash {
            return Err(SignatureError::Mismatch);
        }
    }
    authorized.verify(&hash)
}

/// Checks everything but the payload: the `Authorization` header's form, that the access key is
/// known, the scope, and the request time. What a server can refuse before reading a body.
pub fn check_head<'a, 'c>(
    req: &SignedHead<'a>,
    known: &'c [Credentials],
    now_secs: i64,
) -> Result<Authorized<'a, 'c>, SignatureError> {
    let auth = req
        .headers
        .get(http::header::AUTHORIZATION)
        .ok_or(SignatureError::Missing)?;
    let auth = auth
        .to_str()
        .map_err(|_| SignatureError::Incomplete("Authorization header is not ASCII".into()))?;
    let rest = auth.strip_prefix(ALGORITHM).ok_or_else(|| {
        SignatureError::Incomplete(format!(
            "Authorization header requires the {ALGORITHM} algorithm"
        ))
    })?;
    let (mut credential, mut signed_headers, mut signature) = (None, None, None);
    for part in rest.split(',') {
        let part = part.trim();
        if let Some(v) = part.strip_prefix("Credential=") {
            credential = Some(v);
        } else if let Some(v) = part.strip_prefix("SignedHeaders=") {
            signed_headers = Some(v);
        } else if let Some(v) = part.strip_prefix("Signature=") {
            signature = Some(v);
        }
    }
    let missing = |what: &str| {
        SignatureError::Incomplete(format!(
            "Authorization header requires '{what}' parameter. Authorization={auth}"
        ))
    };
    let credential = credential.ok_or_else(|| missing("Credential"))?;
    let signed_headers = signed_headers.ok_or_else(|| missing("SignedHeaders"))?;
    let signature = signature.ok_or_else(|| missing("Signature"))?;

    let mut scope_parts = credential.splitn(5, '/');
    let (Some(access_key), Some(date), Some(region), Some(service), Some(terminator)) = (
        scope_parts.next(),
        scope_parts.next(),
        scope_parts.next(),
        scope_parts.next(),
        scope_parts.next(),
    ) else {
        return Err(SignatureError::Incomplete(format!(
            "Credential should be scoped to a valid region, service and date. {credential}"
        )));
    };
    if service != SERVICE || terminator != "aws4_request" {
        return Err(SignatureError::Incomplete(format!(
            "Credential should be scoped to correct service: '{SERVICE}'. {credential}"
        )));
    }
    let credentials = known
        .iter()
        .find(|c| c.access_key_id == access_key)
        .ok_or(SignatureError::UnknownAccessKey)?;

    let date_header = req
        .headers
        .get("x-amz-date")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            SignatureError::Incomplete("Authorization requires the X-Amz-Date header".into())
        })?;
    let signed_at = parse_amz_date(date_header)
        .ok_or_else(|| SignatureError::Incomplete(format!("Invalid X-Amz-Date: {date_header}")))?;
    if !date_header.starts_with(date) {
        return Err(SignatureError::Incomplete(format!(
            "Date in Credential scope does not match YYYYMMDD from ISO-8601 version of date from HTTP: '{date}' != '{}'",
            &date_header[..8]
        )));
    }
    if signed_at < now_secs - MAX_SKEW_SECS {
        return Err(SignatureError::Expired(format!(
            "Signature expired: {date_header} is now earlier than {} ({} - 15 min.)",
            amz_date(now_secs - MAX_SKEW_SECS),
            amz_date(now_secs)
        )));
    }
    if signed_at > now_secs + MAX_SKEW_SECS {
        return Err(SignatureError::Expired(format!(
            "Signature not yet current: {date_header} is still later than {} ({} + 15 min.)",
            amz_date(now_secs + MAX_SKEW_SECS),
            amz_date(now_secs)
        )));
    }

    let signed: Vec<&str> = signed_headers.split(';').collect();
    if !signed.contains(&"host") {
        return Err(SignatureError::Incomplete(
            "'Host' must be a signed header".into(),
        ));
    }
    Ok(Authorized {
        head: *req,
        credentials,
        date_header,
        date,
        region,
        service,
        signed,
        signature,
    })
}

impl<'c> Authorized<'_, 'c> {
    /// The payload hash the client put in `x-amz-content-sha256`, when it sent one: a signature over
    /// it can be checked before the body is read (the body must then hash to it).
    pub fn claimed_payload_hash(&self) -> Option<&str> {
        self.head
            .headers
            .get("x-amz-content-sha256")
            .and_then(|v| v.to_str().ok())
            .filter(|v| *v != "UNSIGNED-PAYLOAD")
    }

    /// Checks the signature over the request with a payload hashing to `payload_hash` (hex);
    /// returns the access key id that signed it.
    pub fn verify(&self, payload_hash: &str) -> Result<&'c str, SignatureError> {
        let req = &self.head;
        let scope = format!(
            "{}/{}/{}/aws4_request",
            self.date, self.region, self.service
        );
        let key = signing_key(
            &self.credentials.secret_access_key,
            self.date,
            self.region,
            self.service,
        );
        let Ok(signature) = hex::decode(self.signature) else {
            return Err(SignatureError::Mismatch);
        };
        // AWS services other than S3 encode the (already encoded) path a second time; some clients
        // encode once. Older curl signs the query in the order it sends it. Accept each: every
        // candidate is an HMAC with the same secret over this very request.
        let mut once = String::new();
        uri_encode(&percent_decode(req.path), true, &mut once);
        let mut twice = String::new();
        uri_encode(req.path.as_bytes(), true, &mut twice);
        let mut uris = vec![twice];
        if once != uris[0] {
            uris.push(once);
        }
        let mut queries = vec![canonical_query_in(req.query, true)];
        let as_sent = canonical_query_in(req.query, false);
        if as_sent != queries[0] {
            queries.push(as_sent);
        }
        for canonical_uri in &uris {
            for canonical_query in &queries {
                let parts = Parts {
                    method: req.method,
                    canonical_uri: canonical_uri.clone(),
                    canonical_query: canonical_query.clone(),
                    headers: req.headers,
                    signed: &self.signed,
                    payload_hash,
                };
                let Some(to_sign) = string_to_sign(&parts, self.date_header, &scope) else {
                    return Err(SignatureError::Incomplete(
                        "a signed header is missing from the request".into(),
                    ));
                };
                if signature_matches(&key, to_sign.as_bytes(), &signature) {
                    return Ok(&self.credentials.access_key_id);
                }
            }
        }
        Err(SignatureError::Mismatch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds() -> Credentials {
        Credentials {
            access_key_id: "AKIDEXAMPLE".into(),
            secret_access_key: "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".into(),
        }
    }

    /// AWS's published SigV4 test suite case "get-vanilla".
    #[test]
    fn aws_test_vector_get_vanilla() {
        let mut headers = HeaderMap::new();
        headers.insert("host", "example.amazonaws.com".parse().unwrap());
        headers.insert("x-amz-date", "20150830T123600Z".parse().unwrap());
        let signed = ["host", "x-amz-date"];
        let parts = Parts {
            method: &Method::GET,
            canonical_uri: "/".into(),
            canonical_query: String::new(),
            headers: &headers,
            signed: &signed,
            payload_hash: &payload_hash(b""),
        };
        let scope = "20150830/us-east-1/service/aws4_request";
        let to_sign = string_to_sign(&parts, "20150830T123600Z", scope).unwrap();
        let key = signing_key(
            &creds().secret_access_key,
            "20150830",
            "us-east-1",
            "service",
        );
        assert_eq!(
            hex::encode(hmac(&key, to_sign.as_bytes())),
            "5fa00fa31553b73ebf1942676e86291e8372ff2a2260956d9b8aae1d763fbf31"
        );
    }

    fn signed_request(body: &[u8], at: i64) -> (HeaderMap, Credentials) {
        let mut headers = HeaderMap::new();
        headers.insert("host", "127.0.0.1:8081".parse().unwrap());
        headers.insert("content-type", "application/json".parse().unwrap());
        let c = creds();
        sign(
            &Method::POST,
            "/apikeys",
            "mode=import&format=csv",
            &mut headers,
            body,
            &c,
            "eu-west-1",
            at,
        );
        (headers, c)
    }

    #[test]
    fn sign_then_verify() {
        let now = 1_795_000_000;
        let (headers, c) = signed_request(b"{}", now);
        let req = SignedRequest {
            head: SignedHead {
                method: &Method::POST,
                path: "/apikeys",
                query: "format=csv&mode=import",
                headers: &headers,
            },
            body: b"{}",
        };
        assert_eq!(
            verify(&req, std::slice::from_ref(&c), now + 60),
            Ok("AKIDEXAMPLE")
        );

        // A changed body, method, path or query breaks it.
        let bad = SignedRequest {
            body: b"{ }",
            ..req
        };
        assert_eq!(
            verify(&bad, std::slice::from_ref(&c), now),
            Err(SignatureError::Mismatch)
        );
        let bad = SignedRequest {
            head: SignedHead {
                path: "/usageplans",
                ..req.head
            },
            ..req
        };
        assert_eq!(
            verify(&bad, std::slice::from_ref(&c), now),
            Err(SignatureError::Mismatch)
        );
        let bad = SignedRequest {
            head: SignedHead {
                query: "mode=import",
                ..req.head
            },
            ..req
        };
        assert_eq!(
            verify(&bad, std::slice::from_ref(&c), now),
            Err(SignatureError::Mismatch)
        );
        // A wrong secret, an unknown key, a stale or future time.
        let wrong = Credentials {
            secret_access_key: "other".into(),
            ..c.clone()
        };
        assert_eq!(verify(&req, &[wrong], now), Err(SignatureError::Mismatch));
        let other = Credentials {
            access_key_id: "AKIDOTHER".into(),
            ..c.clone()
        };
        assert_eq!(
            verify(&req, &[other], now),
            Err(SignatureError::UnknownAccessKey)
        );
        let expired = verify(&req, std::slice::from_ref(&c), now + 16 * 60).unwrap_err();
        assert!(
            matches!(expired, SignatureError::Expired(ref m) if m.starts_with("Signature expired: ")),
            "{expired:?}"
        );
        assert!(matches!(
            verify(&req, std::slice::from_ref(&c), now - 16 * 60),
            Err(SignatureError::Expired(_))
        ));
    }

    #[test]
    fn malformed_authorization() {
        let mut headers = HeaderMap::new();
        let c = [creds()];
        let req = |h: &HeaderMap| {
            verify(
                &SignedRequest {
                    head: SignedHead {
                        method: &Method::GET,
                        path: "/",
                        query: "",
                        headers: h,
                    },
                    body: b"",
                },
                &c,
                0,
            )
            .unwrap_err()
        };
        assert_eq!(req(&headers), SignatureError::Missing);
        headers.insert("authorization", "Basic abc".parse().unwrap());
        assert!(matches!(req(&headers), SignatureError::Incomplete(_)));
        headers.insert("authorization", "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/s3/aws4_request, SignedHeaders=host, Signature=00".parse().unwrap());
        assert!(
            matches!(req(&headers), SignatureError::Incomplete(m) if m.contains("'apigateway'"))
        );
    }

    #[test]
    fn dates_roundtrip() {
        assert_eq!(amz_date(1_440_938_160), "20150830T123600Z");
        assert_eq!(parse_amz_date("20150830T123600Z"), Some(1_440_938_160));
        assert_eq!(parse_amz_date("20151330T123600Z"), None);
        assert_eq!(parse_amz_date("garbage"), None);
        assert_eq!(parse_amz_date("2015083 T123600Z"), None);
        assert_eq!(parse_amz_date("+2015830T123600Z"), None);
    }

    #[test]
    fn query_canonicalisation() {
        assert_eq!(canonical_query("b=2&a=1&a=0&c"), "a=0&a=1&b=2&c=");
        assert_eq!(canonical_query("name=a%20b&x=%7e"), "name=a%20b&x=~");
    }
}
