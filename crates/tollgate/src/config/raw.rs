//! The config file as written: serde types mirroring `tollgate.yaml`, camelCase as in AWS. Nothing
//! here is checked beyond its YAML type; [`super::validate`] turns it into the runtime config. They
//! serialise back to the same YAML (what `tollgate import serverless` prints).

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_saphyr::Spanned;

/// A string in which `${VAR}` is replaced by the environment variable `VAR` (unset: an error at the
/// place in the file where it is used). The second field is how it is written back, when it came
/// from variables that should stay variables (`import serverless` keeps `${env:KEY}` as `${KEY}`,
/// so a key value never lands in a generated file).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnvString(pub String, pub Option<String>);

impl EnvString {
    /// `text` as it is, to be written back as it is.
    pub fn new(text: impl Into<String>) -> Self {
        Self(text.into(), None)
    }
}

impl<'de> Deserialize<'de> for EnvString {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw = String::deserialize(d)?;
        expand_env(&raw, |name| std::env::var(name).ok())
            .map(EnvString::new)
            .map_err(serde::de::Error::custom)
    }
}

impl Serialize for EnvString {
    /// Written so that reading it back gives this text: as its variables when it has them,
    /// otherwise with a literal `${` escaped as `$${`.
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.1 {
            Some(written) => s.serialize_str(written),
            None => s.serialize_str(&escape_env(&self.0)),
        }
    }
}

/// `text` as an [`EnvString`] that reads back as it is: a literal `${` is escaped as `$${`.
pub(crate) fn escape_env(text: &str) -> String {
    text.replace("${", "$${")
}

/// Whether `${name}` names an environment variable here.
pub(crate) fn is_env_name(name: &str) -> bool {
    !name.is_empty() && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// Replaces each `${NAME}` in `raw` with `lookup(NAME)`; `$${` escapes a literal `${`.
pub fn expand_env(raw: &str, lookup: impl Fn(&str) -> Option<String>) -> Result<String, String> {
    let mut out = String::with_capacity(raw.len());
    let mut rest = raw;
    while let Some(at) = rest.find("${") {
        if rest[..at].ends_with('$') {
            out.push_str(&rest[..at - 1]);
            out.push_str("${");
            rest = &rest[at + 2..];
            continue;
        }
        out.push_str(&rest[..at]);
        let after = &rest[at + 2..];
        let end = after
            .find('}')
            .ok_or_else(|| format!("unterminated variable in {raw:?}: missing }}"))?;
        let name = &after[..end];
        if !is_env_name(name) {
            return Err(format!("invalid environment variable name {name:?}"));
        }
        let value =
            lookup(name).ok_or_else(|| format!("environment variable {name} is not set"))?;
        out.push_str(&value);
        rest = &after[end + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<Spanned<EnvString>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Spanned<RawTls>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_tls: Option<Spanned<RawUpstreamTls>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub http2: Option<Spanned<RawHttp2>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<Spanned<RawStore>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account_throttle: Option<Spanned<RawThrottle>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<Spanned<RawAdmin>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify: Option<Spanned<RawVerify>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_value_storage: Option<Spanned<String>>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub rate_limit_headers: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_log: Option<Spanned<RawAccessLog>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<Spanned<u32>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub header_timeout: Option<Spanned<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_request_body_size: Option<Spanned<RawSize>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub keep_client_headers: Option<Spanned<Vec<String>>>,
    /// Forward client fields whose names hold `_` (nginx's `underscores_in_headers`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub underscores_in_headers: Option<bool>,
    /// The proxies whose `X-Forwarded-For` names the client (CIDRs), for source-IP allowlists.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trusted_proxies: Option<Spanned<Vec<String>>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub webhooks: Vec<Spanned<RawWebhook>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub alerts: Vec<Spanned<RawAlert>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub exporters: Vec<Spanned<RawExporter>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub apis: Vec<Spanned<RawApi>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usage_plans: Vec<Spanned<RawPlan>>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_keys: Vec<Spanned<RawKey>>,
}

/// `tls:`, the data plane's HTTPS listener, or `admin.tls` (which listens on `admin.listen`).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawTls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<EnvString>,
    pub certificates: Vec<Spanned<RawCertFiles>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_version: Option<Spanned<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_auth: Option<Spanned<RawClientAuth>>,
}

/// `accessLog:`: `true` (the default format, on stderr), or a format and a file.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawAccessLog {
    On(bool),
    Settings(RawAccessLogSettings),
}

/// `accessLog: { format, path }`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAccessLogSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<EnvString>,
}

/// `http2:`, HTTP/2 to clients (on unless `enabled: false`).
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawHttp2 {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_concurrent_streams: Option<u32>,
}

/// `upstreamTls:`, globally or on a route: how `https` upstreams are reached.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawUpstreamTls {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca: Option<EnvString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert: Option<EnvString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key: Option<EnvString>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub insecure_skip_verify: bool,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawCertFiles {
    pub cert: EnvString,
    pub key: EnvString,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawClientAuth {
    pub ca: EnvString,
    /// Whether a client without a certificate is refused (the default, as AWS's mutual TLS).
    #[serde(default = "enabled_by_default", skip_serializing_if = "is_true")]
    pub required: bool,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAdmin {
    pub listen: EnvString,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub access_key_id: Option<EnvString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret_access_key: Option<EnvString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<Spanned<RawTls>>,
}

/// `verify:`, the decision endpoint for forward-auth.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawVerify {
    pub listen: EnvString,
    /// `nginx`, `caddy`, `traefik` or `envoy`: whose fields describe the original request.
    pub proxy: String,
    /// Envoy's `path_prefix`, taken off a decision request's path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
}

/// A size in bytes: a number, or a number with a unit (`KB`, `MB`, `GB`, powers of 1024 as nginx
/// and AWS count them).
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawSize {
    Bytes(u64),
    Text(String),
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawStore {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sqlite: Option<EnvString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub redis: Option<RawRedis>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flush_interval: Option<String>,
    /// `interval` (default) or `request`: each admitted request's count is stored before its
    /// response is sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durability: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_store_failure: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRedis {
    pub url: RawUrls,
    #[serde(default, skip_serializing_if = "is_false")]
    pub cluster: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
}

/// One URL, or the seed URLs of a cluster.
#[derive(Debug, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawUrls {
    One(EnvString),
    Many(Vec<EnvString>),
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawThrottle {
    pub rate_limit: f64,
    pub burst_limit: u32,
}

impl From<RawThrottle> for tollgate_core::ThrottleSettings {
    fn from(t: RawThrottle) -> Self {
        Self {
            rate_limit: t.rate_limit,
            burst_limit: t.burst_limit,
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawApi {
    pub id: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_encoded_slashes: bool,
    /// `HEADER` (default) or `AUTHORIZER`, as AWS names them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_key_source: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub authorizers: Vec<Spanned<RawAuthorizer>>,
    pub stages: Vec<Spanned<RawStage>>,
    pub routes: Vec<Spanned<RawRoute>>,
}

/// A JWT authorizer: whose tokens, and which claim names the caller's API key.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAuthorizer {
    pub name: String,
    /// A JWKS file.
    pub jwks: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub issuer: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub audience: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_identifier_claim: Option<String>,
    /// `name` (default) or `value`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_identifier_is: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawStage {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base_path: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<RawThrottle>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub method_throttle: BTreeMap<String, RawThrottle>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRoute {
    pub path: String,
    pub method: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub api_key_required: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<EnvString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mock: Option<RawMock>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cors: Option<RawCors>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_get_body: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_tls: Option<RawUpstreamTls>,
    /// The API's JWT authorizer identifying the caller (with `apiKeySource: AUTHORIZER`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorizer: Option<String>,
    /// What one admitted request spends of its key's quota (default 1; 0 is free).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<i64>,
}

/// `cors: true`, or the settings, as Serverless writes them.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(untagged)]
pub enum RawCors {
    Enabled(bool),
    Settings(RawCorsSettings),
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawCorsSettings {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origin: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub origins: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub headers: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub allow_credentials: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_control: Option<String>,
    /// Accepted for Serverless compatibility; the allowed methods are the resource's own.
    #[serde(default, rename = "methods", skip_serializing)]
    pub _methods: Option<serde::de::IgnoredAny>,
}

impl RawCors {
    /// The runtime settings, `None` for `cors: false`.
    pub fn settings(&self) -> Option<tollgate_gateway::config::Cors> {
        let s = match self {
            RawCors::Enabled(false) => return None,
            RawCors::Enabled(true) => return Some(tollgate_gateway::config::Cors::permissive()),
            RawCors::Settings(s) => s,
        };
        let mut cors = tollgate_gateway::config::Cors::permissive();
        if let Some(origins) = s
            .origins
            .clone()
            .or_else(|| s.origin.clone().map(|o| vec![o]))
        {
            cors.origins = origins;
        }
        if let Some(headers) = &s.headers {
            cors.headers.clone_from(headers);
        }
        cors.allow_credentials = s.allow_credentials;
        cors.max_age = s.max_age;
        cors.cache_control.clone_from(&s.cache_control);
        Some(cors)
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawMock {
    pub status_code: u16,
    #[serde(default)]
    pub body: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub headers: BTreeMap<String, String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawPlan {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub api_stages: Vec<Spanned<RawApiStage>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<RawThrottle>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<Spanned<RawQuota>>,
    /// `customerId`: the keys of one customer share the plan's buckets and quota; kept as the tag
    /// `tollgate:limitsShareBy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limits_share_by: Option<String>,
    /// `enforce` (default) or `shadow`; kept as the tag `tollgate:enforcement`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enforcement: Option<String>,
    /// In shadow, send the RateLimit headers too; kept as the tag `tollgate:shadowHeaders`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shadow_headers: Option<bool>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawApiStage {
    pub api_id: String,
    pub stage: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub throttle: BTreeMap<String, RawThrottle>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawQuota {
    pub limit: u32,
    #[serde(default)]
    pub offset: u32,
    pub period: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawKey {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<EnvString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    #[serde(default = "enabled_by_default", skip_serializing_if = "is_true")]
    pub enabled: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub usage_plans: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    /// When the key stops working (RFC 3339); kept as the tag `tollgate:expiresAt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// The networks the key may be used from (CIDRs); kept as the tag `tollgate:allowedSourceIps`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allowed_source_ips: Option<Vec<String>>,
    /// Prepaid credits: the opening balance and a refill (kept as the tag `tollgate:creditRefill`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credits: Option<RawCredits>,
}

/// `alerts[]`: what fires events.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawAlert {
    pub name: String,
    pub on: String,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub thresholds: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    /// `on: credits`: the level a balance falls below.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub below: Option<u64>,
    /// `on: expiry`: how long before an expiry (`7d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub within: Option<String>,
    pub webhook: String,
}

/// `exporters[]`: where usage is exported.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawExporter {
    pub name: String,
    /// `file`, `cloudevents` or `stripe`.
    #[serde(rename = "type")]
    pub kind: String,
    /// `type: file`: the directory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// `type: file`: `ndjson` or `csv`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<EnvString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<EnvString>,
    /// Stripe's meter `event_name`; the CloudEvents' `type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub event_name: Option<String>,
    /// A window's length (default 1h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interval: Option<String>,
}

/// `webhooks[]`: where events are delivered.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawWebhook {
    pub name: String,
    pub url: EnvString,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub secret: Option<EnvString>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// How long deliveries are retried (default 24h).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retry_for: Option<String>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawCredits {
    #[serde(default)]
    pub balance: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refill: Option<RawRefill>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct RawRefill {
    pub amount: u64,
    pub period: String,
}

fn enabled_by_default() -> bool {
    true
}

fn is_false(b: &bool) -> bool {
    !b
}

fn is_true(b: &bool) -> bool {
    *b
}

#[cfg(test)]
mod tests {
    use super::expand_env;

    #[test]
    fn env_expansion() {
        let env = |n: &str| (n == "KEY").then(|| "s3cret".to_string());
        assert_eq!(expand_env("${KEY}", env).unwrap(), "s3cret");
        assert_eq!(expand_env("a-${KEY}-b", env).unwrap(), "a-s3cret-b");
        assert_eq!(expand_env("plain", env).unwrap(), "plain");
        assert_eq!(expand_env("$${KEY}", env).unwrap(), "${KEY}");
        assert_eq!(
            expand_env("${MISSING}", env).unwrap_err(),
            "environment variable MISSING is not set"
        );
        assert!(expand_env("${KEY", env).is_err());
        assert!(expand_env("${a b}", env).is_err());
    }
}
