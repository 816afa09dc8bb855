//! Raw config → runtime config: every check that YAML types cannot express.

use std::cell::{Cell, RefCell};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use rustls::pki_types::ServerName;
use serde_saphyr::{Location, Spanned};
use tollgate_core::model::{EXPIRES_TAG, parse_expiry, validate_key_value, validate_tags};
use tollgate_core::quota::Period;
use tollgate_core::rules::{ApiOutline, PlanError, check_api_stage, check_throttle};
use tollgate_core::{ApiStage, QuotaSettings, ThrottleSettings};
use tollgate_gateway::GatewayConfig;
use tollgate_gateway::access_log::{AccessLogConfig, DEFAULT_FORMAT, LogFormat};
use tollgate_gateway::config::Http2Settings;
use tollgate_gateway::config::UpstreamTls;
use tollgate_gateway::config::{
    Api, DEFAULT_MAX_REQUEST_BODY, DEFAULT_UPSTREAM_TIMEOUT, Integration, Route, RouteMethod,
    Stage, add_preflight_routes,
};
use tollgate_gateway::rewrite::{KeptFields, STEERING_FIELDS};
use tollgate_gateway::route::{Router, validate_template};
use tollgate_gateway::tls::{
    self, CertFiles, Certificates, ClientAuth, MinVersion, TlsError, TlsSettings, UpstreamTlsFiles,
};
use tollgate_store::OnStoreFailure;
use tollgate_store::RedisSettings;
use tollgate_store::{DeclaredKey, DeclaredPlan};

use super::raw::{
    EnvString, RawAccessLog, RawAdmin, RawApi, RawConfig, RawCors, RawHttp2, RawKey, RawPlan,
    RawQuota, RawRoute, RawSize, RawStore, RawThrottle, RawTls, RawUpstreamTls, RawUrls, RawVerify,
};
use super::{
    ADMIN_ACCESS_KEY_ENV, ADMIN_SECRET_KEY_ENV, AdminConfig, Config, ConfigError,
    DEFAULT_ADMIN_MAX_CONNECTIONS, JwksToRead, KEY_ENCRYPTION_KEY_ENV, StoreConfig, StoreKind,
    TlsListener, TlsTermination, admin_credentials,
};
use tollgate_admin::seal::Sealer;
use tollgate_gateway::jwt::{Authorizer, AuthorizerSettings, UsageIdentifier};
use tollgate_gateway::verify::{Proxy, VerifySettings};

/// Parses `500ms`, `1s`, `2m`, `1h`, `7d` (a bare number is seconds).
pub(crate) fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| format!("invalid duration {text:?}: expected e.g. 500ms, 1s, 2m"))?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86_400.0,
        other => {
            return Err(format!(
                "invalid duration unit {other:?} in {text:?}: use ms, s, m, h or d"
            ));
        }
    };
    Duration::try_from_secs_f64(secs).map_err(|_| format!("invalid duration {text:?}"))
}

/// Bytes in a size: `1048576`, `512KB`, `10MB`, `1GB` (powers of 1024).
pub(crate) fn parse_size(raw: &RawSize) -> Result<u64, String> {
    let text = match raw {
        RawSize::Bytes(n) => return Ok(*n),
        RawSize::Text(t) => t.trim(),
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (digits, unit) = text.split_at(split);
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("invalid size {text:?}: expected e.g. 1048576, 512KB, 10MB"))?;
    let scale: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        other => {
            return Err(format!(
                "invalid size unit {other:?} in {text:?}: use KB, MB or GB"
            ));
        }
    };
    n.checked_mul(scale)
        .ok_or_else(|| format!("size {text:?} is too large"))
}

struct Ctx<'a> {
    file: &'a Path,
    /// The config file's directory: relative paths in it are read from there, wherever the
    /// process runs (as Caddy and docker compose do).
    dir: &'a Path,
    /// The file's `upstreamTls`, for `https` routes without their own.
    upstream_tls: Option<&'a Spanned<RawUpstreamTls>>,
    /// The TLS client configurations built so far, shared by the routes with the same settings
    /// (so their connections share the idle pool).
    client_configs: RefCell<Vec<(UpstreamTlsFiles, Arc<rustls::ClientConfig>)>>,
    /// Whether a route skips verifying its upstream's certificate.
    insecure_upstream: Cell<bool>,
    /// What is valid but probably not what the operator meant (`check` prints them, `serve` logs
    /// them).
    warnings: RefCell<Vec<ConfigError>>,
    /// The authorizers whose JWKS is read after validation, each with where it is written.
    jwks: RefCell<Vec<JwksToRead>>,
}

impl Ctx<'_> {
    /// A path written in the config, relative to the config file's directory.
    fn path(&self, written: &str) -> PathBuf {
        self.dir.join(written)
    }

    fn warn(&self, at: &Location, field: impl Into<String>, message: impl Into<String>) {
        self.warnings
            .borrow_mut()
            .push(ConfigError::at(self.file, *at, field, message));
    }

    fn err<T>(
        &self,
        at: &Location,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Result<T, ConfigError> {
        Err(ConfigError::at(self.file, *at, field, message))
    }

    /// TLS to the `https` upstream `url`: the route's own settings, else the file's, else the
    /// system's roots.
    fn upstream_tls(
        &self,
        url: &Uri,
        own: Option<&RawUpstreamTls>,
        at: &Location,
        field: &str,
    ) -> Result<UpstreamTls, ConfigError> {
        let config = match (own, self.upstream_tls) {
            (Some(own), _) => self.client_config(own, at, &format!("{field}.upstreamTls"))?,
            (None, Some(global)) => {
                self.client_config(&global.value, &global.referenced, "upstreamTls")?
            }
            (None, None) => {
                self.client_config(&RawUpstreamTls::default(), at, &format!("{field}.upstream"))?
            }
        };
        let host = url.host().unwrap_or_default().trim_matches(['[', ']']);
        let server_name = ServerName::try_from(host.to_string()).or_else(|_| {
            self.err(
                at,
                format!("{field}.upstream"),
                format!("{host:?} cannot be checked against a certificate"),
            )
        })?;
        Ok(UpstreamTls {
            config,
            server_name,
        })
    }

    /// The TLS client configuration for `raw` (written at `at` as `field`), built once for all
    /// the routes with the same settings.
    fn client_config(
        &self,
        raw: &RawUpstreamTls,
        at: &Location,
        field: &str,
    ) -> Result<Arc<rustls::ClientConfig>, ConfigError> {
        let client = match (&raw.cert, &raw.key) {
            (Some(cert), Some(key)) => Some(CertFiles {
                cert: self.path(&cert.0),
                key: self.path(&key.0),
            }),
            (None, None) => None,
            _ => return self.err(at, field, "give both cert and key, or neither"),
        };
        let files = UpstreamTlsFiles {
            ca: raw.ca.as_ref().map(|ca| self.path(&ca.0)),
            client,
            insecure_skip_verify: raw.insecure_skip_verify,
        };
        self.insecure_upstream
            .set(self.insecure_upstream.get() || files.insecure_skip_verify);
        let known = self
            .client_configs
            .borrow()
            .iter()
            .find(|(f, _)| *f == files)
            .map(|(_, c)| c.clone());
        if let Some(config) = known {
            return Ok(config);
        }
        let config =
            Arc::new(tls::client_config(&files).or_else(|e| self.err(at, field, e.to_string()))?);
        self.client_configs
            .borrow_mut()
            .push((files, config.clone()));
        Ok(config)
    }

    /// A listening address.
    fn address(
        &self,
        raw: &EnvString,
        at: &Location,
        field: &str,
    ) -> Result<SocketAddr, ConfigError> {
        raw.0.parse().or_else(|_| {
            // A name (localhost:8080) could resolve to several addresses, or change: not taken.
            let named = raw.0.rsplit_once(':').is_some_and(|(host, port)| {
                port.parse::<u16>().is_ok() && host.chars().any(|c| c.is_ascii_alphabetic())
            });
            let why = if named {
                format!(
                    "{:?}: host names are not supported here; give an IP address and port, like 127.0.0.1:8080 or [::1]:8080",
                    raw.0
                )
            } else {
                format!("{:?} is not an address like 127.0.0.1:8080", raw.0)
            };
            self.err(at, field, why)
        })
    }

    fn throttle(
        &self,
        t: &RawThrottle,
        at: &Location,
        field: &str,
    ) -> Result<ThrottleSettings, ConfigError> {
        let settings = ThrottleSettings::from(*t);
        match check_throttle(&settings) {
            Ok(()) => Ok(settings),
            Err(e) => self.err(at, format!("{field}.rateLimit"), e.to_string()),
        }
    }

    /// Checks a `"/path/METHOD"` → throttle map against the API's routes (`known` throttle keys).
    fn method_throttles(
        &self,
        raw: &BTreeMap<String, RawThrottle>,
        known: &[String],
        at: &Location,
        field: &str,
    ) -> Result<BTreeMap<String, ThrottleSettings>, ConfigError> {
        let mut out = BTreeMap::new();
        for (key, t) in raw {
            if !known.contains(key) {
                let e = PlanError::UnknownMethod {
                    key: key.clone(),
                    known: known.to_vec(),
                };
                return self.err(at, field, e.to_string());
            }
            out.insert(
                key.clone(),
                self.throttle(t, at, &format!("{field}[{key:?}]"))?,
            );
        }
        Ok(out)
    }
}

impl<'a> Ctx<'a> {
    fn new(file: &'a Path, upstream_tls: Option<&'a Spanned<RawUpstreamTls>>) -> Self {
        Ctx {
            file,
            dir: file.parent().unwrap_or(Path::new("")),
            upstream_tls,
            client_configs: RefCell::default(),
            insecure_upstream: Cell::new(false),
            warnings: RefCell::default(),
            jwks: RefCell::default(),
        }
    }
}

/// The store a config at `file` names (`raw`, its `store:`), the rest of the file unread: what a
/// command that only reads the store needs (`usage`), without the keys' values or certificates.
pub(super) fn store_only(
    file: &Path,
    raw: Option<&Spanned<RawStore>>,
) -> Result<StoreConfig, ConfigError> {
    let cx = Ctx::new(file, None);
    match raw {
        None => Ok(default_store(&cx)),
        Some(s) => validate_store(&cx, &s.value, &s.referenced),
    }
}

/// The store of a config without `store:`: `tollgate.db` beside it.
fn default_store(cx: &Ctx<'_>) -> StoreConfig {
    StoreConfig {
        kind: StoreKind::Sqlite(cx.path("tollgate.db")),
        flush_interval: Duration::from_secs(1),
    }
}

pub(super) fn validate(file: &Path, raw: RawConfig) -> Result<Config, ConfigError> {
    let cx = Ctx::new(file, raw.upstream_tls.as_ref());
    // Checked even when no route uses it yet.
    if let Some(global) = &raw.upstream_tls {
        cx.client_config(&global.value, &global.referenced, "upstreamTls")?;
    }
    let listen = match &raw.listen {
        Some(listen) => Some(cx.address(&listen.value, &listen.referenced, "listen")?),
        None => None,
    };
    let verify = match &raw.verify {
        None => None,
        Some(v) => Some(validate_verify(&cx, &v.value, &v.referenced)?),
    };
    let http2 = validate_http2(&cx, raw.http2.as_ref())?;
    let tls = match &raw.tls {
        Some(tls) => Some(validate_tls(
            &cx,
            &tls.value,
            &tls.referenced,
            http2.is_some(),
        )?),
        None => None,
    };
    // A gateway that only decides for another proxy (forward-auth) needs no data plane listener.
    if listen.is_none() && tls.is_none() && raw.verify.is_none() {
        return cx.err(
            &Location::UNKNOWN,
            "listen",
            "give listen (plain HTTP), tls.listen (HTTPS), verify.listen (decisions for another proxy only), or several",
        );
    }

    let store = match &raw.store {
        None => default_store(&cx),
        Some(s) => validate_store(&cx, &s.value, &s.referenced)?,
    };

    let account_throttle = match &raw.account_throttle {
        Some(t) => Some(cx.throttle(&t.value, &t.referenced, "accountThrottle")?),
        None => None,
    };

    let apis = validate_apis(&cx, &raw.apis)?;
    let outline: Vec<ApiOutline> = apis.iter().map(Api::outline).collect();

    let plans = validate_plans(&cx, &raw.usage_plans, &outline)?;

    let keys = validate_keys(&cx, &raw.api_keys, &plans)?;

    let admin = raw
        .admin
        .as_ref()
        .map(|a| validate_admin(&cx, &a.value, &a.referenced))
        .transpose()?;
    let sealer = match &raw.key_value_storage {
        None => None,
        Some(kvs) => validate_key_value_storage(&cx, kvs)?,
    };

    let access_log = validate_access_log(&cx, raw.access_log.as_ref())?;
    let max_connections = match &raw.max_connections {
        None => None,
        Some(n) if n.value == 0 => {
            return cx.err(&n.referenced, "maxConnections", "must be at least 1");
        }
        Some(n) => Some(n.value as usize),
    };
    let header_timeout = match &raw.header_timeout {
        None => tollgate_gateway::DEFAULT_HEAD_TIMEOUT,
        Some(t) => positive_duration(&cx, &t.value, &t.referenced, "headerTimeout")?,
    };
    let max_request_body = match &raw.max_request_body_size {
        None => DEFAULT_MAX_REQUEST_BODY,
        Some(size) => match parse_size(&size.value) {
            Ok(n) => n,
            Err(e) => return cx.err(&size.referenced, "maxRequestBodySize", e),
        },
    };
    let kept_fields = validate_kept_fields(&cx, &raw)?;

    // Plain HTTP serves the same APIs: a client without a certificate goes there instead.
    if let (Some(plain), Some(t)) = (&raw.listen, &raw.tls) {
        if t.value
            .client_auth
            .as_ref()
            .is_some_and(|c| c.value.required)
        {
            cx.warn(&plain.referenced, "listen", "tls.clientAuth requires client certificates, but listen serves the same APIs over plain HTTP without them: mTLS can be bypassed there (drop listen, or keep it on an address clients cannot reach)");
        }
    }

    let (verify_listen, verify) = verify.unzip();
    Ok(Config {
        admin,
        sealer,
        listen,
        verify_listen,
        tls,
        insecure_upstream_tls: cx.insecure_upstream.get(),
        http2,
        max_connections,
        header_timeout,
        store,
        gateway: GatewayConfig {
            account_throttle,
            rate_limit_headers: raw.rate_limit_headers,
            access_log,
            max_request_body,
            kept_fields,
            apis,
            verify,
        },
        plans,
        keys,
        warnings: cx.warnings.take(),
        jwks: cx.jwks.take(),
    })
}

/// `apis:`: each valid, with a unique id, and no two stages on one base path.
fn validate_apis(cx: &Ctx<'_>, raw: &[Spanned<RawApi>]) -> Result<Vec<Api>, ConfigError> {
    let mut apis = Vec::with_capacity(raw.len());
    for (i, api) in raw.iter().enumerate() {
        let field = format!("apis[{i}]");
        if apis.iter().any(|a: &Api| a.id == api.value.id) {
            return cx.err(
                &api.referenced,
                format!("{field}.id"),
                format!("duplicate API id {:?}", api.value.id),
            );
        }
        apis.push(validate_api(cx, &field, &api.value, &api.referenced)?);
    }
    // Routing conflicts across APIs (two stages on one base path).
    if let Err(e) = Router::new(&apis) {
        let at = raw.first().map_or(Location::UNKNOWN, |a| a.referenced);
        return cx.err(&at, "apis", e.to_string());
    }
    Ok(apis)
}

/// `usagePlans:`: each valid, with a unique name, on the configured APIs.
fn validate_plans(
    cx: &Ctx<'_>,
    raw: &[Spanned<RawPlan>],
    outline: &[ApiOutline],
) -> Result<Vec<DeclaredPlan>, ConfigError> {
    let mut plans: Vec<DeclaredPlan> = Vec::with_capacity(raw.len());
    for (i, plan) in raw.iter().enumerate() {
        let field = format!("usagePlans[{i}]");
        if plans.iter().any(|p| p.name == plan.value.name) {
            return cx.err(
                &plan.referenced,
                format!("{field}.name"),
                format!("duplicate usage plan name {:?}", plan.value.name),
            );
        }
        plans.push(validate_plan(
            cx,
            &field,
            &plan.value,
            &plan.referenced,
            outline,
        )?);
    }
    Ok(plans)
}

/// `verify:`: where the decision endpoint listens, and for which proxy.
fn validate_verify(
    cx: &Ctx<'_>,
    raw: &RawVerify,
    at: &Location,
) -> Result<(SocketAddr, VerifySettings), ConfigError> {
    let listen = cx.address(&raw.listen, at, "verify.listen")?;
    if !listen.ip().is_loopback() {
        cx.warn(at, "verify.listen", format!(
            "{listen} is not a loopback address: the decision endpoint answers whoever asks, about whatever request they describe; keep it on loopback or a private network only your proxy reaches"
        ));
    }
    let Some(proxy) = Proxy::named(&raw.proxy) else {
        return cx.err(
            at,
            "verify.proxy",
            format!("{:?} is not one of nginx, caddy, traefik, envoy", raw.proxy),
        );
    };
    let path_prefix = raw.path_prefix.clone().unwrap_or_default();
    if !(path_prefix.is_empty() || path_prefix.starts_with('/')) {
        return cx.err(at, "verify.pathPrefix", "must start with /");
    }
    Ok((listen, VerifySettings { proxy, path_prefix }))
}

/// `http2:`: on unless turned off, with its stream limit.
fn validate_http2(
    cx: &Ctx<'_>,
    raw: Option<&Spanned<RawHttp2>>,
) -> Result<Option<Http2Settings>, ConfigError> {
    Ok(match raw {
        None => Some(Http2Settings::default()),
        Some(h) if h.value.enabled == Some(false) => None,
        Some(h) => match h.value.max_concurrent_streams {
            None => Some(Http2Settings::default()),
            Some(n @ 1..=10_000) => Some(Http2Settings {
                max_concurrent_streams: n,
            }),
            Some(n) => {
                return cx.err(
                    &h.referenced,
                    "http2.maxConcurrentStreams",
                    format!("{n}: give 1 to 10000"),
                );
            }
        },
    })
}

/// `apiKeys:`: each with a valid, unique value, in declared plans that cover each API stage once.
fn validate_keys(
    cx: &Ctx<'_>,
    raw: &[Spanned<RawKey>],
    plans: &[DeclaredPlan],
) -> Result<Vec<DeclaredKey>, ConfigError> {
    let mut keys: Vec<DeclaredKey> = Vec::with_capacity(raw.len());
    let mut values = HashSet::new();
    for (i, key) in raw.iter().enumerate() {
        let field = format!("apiKeys[{i}]");
        let at = &key.referenced;
        let k = &key.value;
        if keys.iter().any(|d| d.name == k.name) {
            return cx.err(
                at,
                format!("{field}.name"),
                format!("duplicate API key name {:?}", k.name),
            );
        }
        if let Some(value) = &k.value {
            if let Err(msg) = validate_key_value(&value.0) {
                return cx.err(at, format!("{field}.value"), msg);
            }
            if !values.insert(value.0.clone()) {
                return cx.err(
                    at,
                    format!("{field}.value"),
                    "API Key already exists (another key in this file has the same value)",
                );
            }
        }
        let mut covered: HashMap<(&str, &str), &str> = HashMap::new();
        for name in &k.usage_plans {
            let Some(plan) = plans.iter().find(|p| p.name == *name) else {
                return cx.err(
                    at,
                    format!("{field}.usagePlans"),
                    format!("no usage plan named {name:?} in usagePlans"),
                );
            };
            for s in &plan.api_stages {
                if let Some(other) = covered.insert((&s.api_id, &s.stage), &plan.name) {
                    return cx.err(
                        at,
                        format!("{field}.usagePlans"),
                        format!(
                            "usage plans {other:?} and {name:?} both cover {}/{}; a key can be in only one plan per API stage",
                            s.api_id, s.stage
                        ),
                    );
                }
            }
        }
        let mut tags = k.tags.clone();
        if let Some(expires) = &k.expires_at {
            if let Err(msg) = parse_expiry(expires) {
                return cx.err(at, format!("{field}.expiresAt"), msg);
            }
            tags.insert(EXPIRES_TAG.into(), expires.clone());
        }
        if let Err(msg) = validate_tags(&tags) {
            return cx.err(at, format!("{field}.tags"), msg);
        }
        keys.push(DeclaredKey {
            name: k.name.clone(),
            value: k.value.as_ref().map(|v| v.0.clone()),
            description: k.description.clone(),
            customer_id: k.customer_id.clone(),
            enabled: k.enabled,
            plans: k.usage_plans.clone(),
            tags,
        });
    }
    Ok(keys)
}

/// `keyValueStorage:`: `hashed`, or `encrypted` with the key from the environment.
fn validate_key_value_storage(
    cx: &Ctx<'_>,
    kvs: &Spanned<String>,
) -> Result<Option<Sealer>, ConfigError> {
    Ok(match kvs.value.as_str() {
        "hashed" => None,
        "encrypted" => {
            let Ok(hex) = std::env::var(KEY_ENCRYPTION_KEY_ENV) else {
                return cx.err(
                    &kvs.referenced,
                    "keyValueStorage",
                    format!("encrypted storage needs the key in {KEY_ENCRYPTION_KEY_ENV} (64 hex characters)"),
                );
            };
            match Sealer::from_hex(&hex) {
                Ok(s) => Some(s),
                Err(e) => {
                    return cx.err(
                        &kvs.referenced,
                        "keyValueStorage",
                        format!("{KEY_ENCRYPTION_KEY_ENV}: {e}"),
                    );
                }
            }
        }
        other => {
            return cx.err(
                &kvs.referenced,
                "keyValueStorage",
                format!("{other:?} is not one of hashed, encrypted"),
            );
        }
    })
}

/// `accessLog:`: off, AWS's default format, or a format and a file.
fn validate_access_log(
    cx: &Ctx<'_>,
    raw: Option<&Spanned<RawAccessLog>>,
) -> Result<Option<AccessLogConfig>, ConfigError> {
    Ok(match raw {
        None => None,
        Some(a) => match &a.value {
            RawAccessLog::On(false) => None,
            RawAccessLog::On(true) => Some(AccessLogConfig {
                format: LogFormat::parse(DEFAULT_FORMAT)
                    .map_err(|e| ConfigError::at(cx.file, a.referenced, "accessLog", e))?,
                path: None,
            }),
            RawAccessLog::Settings(settings) => Some(AccessLogConfig {
                format: LogFormat::parse(settings.format.as_deref().unwrap_or(DEFAULT_FORMAT))
                    .map_err(|e| ConfigError::at(cx.file, a.referenced, "accessLog.format", e))?,
                path: settings.path.as_ref().map(|p| cx.path(&p.0)),
            }),
        },
    })
}

/// `keepClientHeaders:` and `underscoresInHeaders:`: the client fields kept that the gateway would
/// drop.
fn validate_kept_fields(cx: &Ctx<'_>, raw: &RawConfig) -> Result<KeptFields, ConfigError> {
    let mut kept_fields = KeptFields::default();
    if let Some(names) = &raw.keep_client_headers {
        for name in &names.value {
            if !kept_fields.keep(name) {
                return cx.err(
                    &names.referenced,
                    "keepClientHeaders",
                    format!(
                        "{name:?} is not a field tollgate drops; the list is {}",
                        STEERING_FIELDS.join(", ")
                    ),
                );
            }
        }
    }

    if raw.underscores_in_headers == Some(true) {
        kept_fields.keep_underscores();
    }
    Ok(kept_fields)
}

/// Whether `path` is one the data plane's normalisation leaves as it is.
fn is_canonical_path(path: &str) -> bool {
    matches!(
        tollgate_gateway::path::normalize(path.as_bytes(), &mut Vec::new()),
        Ok(None)
    )
}

fn positive_duration(
    cx: &Ctx<'_>,
    text: &str,
    at: &Location,
    field: &str,
) -> Result<Duration, ConfigError> {
    match parse_duration(text) {
        Ok(d) if !d.is_zero() => Ok(d),
        Ok(_) => cx.err(at, field, "must be more than zero"),
        Err(e) => cx.err(at, field, e),
    }
}

fn validate_store(cx: &Ctx<'_>, s: &RawStore, at: &Location) -> Result<StoreConfig, ConfigError> {
    let flush_interval = match &s.flush_interval {
        None => Duration::from_secs(1),
        Some(text) => positive_duration(cx, text, at, "store.flushInterval")?,
    };
    let kind = match (&s.sqlite, &s.redis) {
        (Some(_), Some(_)) => return cx.err(at, "store", "give sqlite or redis, not both"),
        (Some(path), None) => StoreKind::Sqlite(cx.path(&path.0)),
        (None, None) => default_store(cx).kind,
        (None, Some(r)) => {
            let urls: Vec<String> = match &r.url {
                RawUrls::One(u) => vec![u.0.clone()],
                RawUrls::Many(us) => us.iter().map(|u| u.0.clone()).collect(),
            };
            if urls.is_empty()
                || urls
                    .iter()
                    .any(|u| !(u.starts_with("redis://") || u.starts_with("rediss://")))
            {
                return cx.err(at, "store.redis.url", "expected redis://host:port URLs");
            }
            if urls.len() > 1 && !r.cluster {
                return cx.err(
                    at,
                    "store.redis.url",
                    "several URLs are the seed nodes of a cluster: set cluster: true",
                );
            }
            // Short by default: a request never waits longer than this for Redis.
            let timeout = match &r.timeout {
                None => Duration::from_millis(50),
                Some(t) => positive_duration(cx, t, at, "store.redis.timeout")?,
            };
            let on_failure = match s.on_store_failure.as_deref() {
                None => OnStoreFailure::default(),
                Some(name) => match OnStoreFailure::named(name) {
                    Some(mode) => mode,
                    None => {
                        let names = OnStoreFailure::ALL.map(OnStoreFailure::name).join(", ");
                        return cx.err(
                            at,
                            "store.onStoreFailure",
                            format!("{name:?} is not one of {names}"),
                        );
                    }
                },
            };
            StoreKind::Redis(
                RedisSettings {
                    urls,
                    cluster: r.cluster,
                    timeout,
                },
                on_failure,
            )
        }
    };
    if s.on_store_failure.is_some() && matches!(kind, StoreKind::Sqlite(_)) {
        return cx.err(
            at,
            "store.onStoreFailure",
            "only a redis store can fail over",
        );
    }
    Ok(StoreConfig {
        kind,
        flush_interval,
    })
}

/// The data plane's HTTPS listener.
fn validate_tls(
    cx: &Ctx<'_>,
    raw: &RawTls,
    at: &Location,
    http2: bool,
) -> Result<TlsListener, ConfigError> {
    let Some(listen) = &raw.listen else {
        return cx.err(at, "tls.listen", "give the address HTTPS is served on");
    };
    Ok(TlsListener {
        listen: cx.address(listen, at, "tls.listen")?,
        tls: validate_termination(cx, raw, at, "tls", http2)?,
    })
}

/// TLS termination as `raw` (the field `name`) sets it: every certificate and key read and checked
/// now, before anything binds.
fn validate_termination(
    cx: &Ctx<'_>,
    raw: &RawTls,
    at: &Location,
    name: &str,
    http2: bool,
) -> Result<TlsTermination, ConfigError> {
    if raw.certificates.is_empty() {
        return cx.err(
            at,
            format!("{name}.certificates"),
            "give at least one { cert, key }",
        );
    }
    let files: Vec<CertFiles> = raw
        .certificates
        .iter()
        .map(|c| CertFiles {
            cert: cx.path(&c.value.cert.0),
            key: cx.path(&c.value.key.0),
        })
        .collect();
    let min_version = match raw
        .min_version
        .as_ref()
        .map(|v| (v.value.as_str(), v.referenced))
    {
        None | Some(("1.2", _)) => MinVersion::Tls12,
        Some(("1.3", _)) => MinVersion::Tls13,
        Some((other, vat)) => {
            return cx.err(
                &vat,
                format!("{name}.minVersion"),
                format!("{other:?}: use \"1.2\" or \"1.3\" (older versions are not offered)"),
            );
        }
    };
    let client_auth = raw.client_auth.as_ref().map(|c| ClientAuth {
        ca: cx.path(&c.value.ca.0),
        required: c.value.required,
    });
    // Which field a file at fault came from, and where that field is written.
    let field_of = |e: &TlsError| -> (String, Location) {
        for (i, (c, f)) in raw.certificates.iter().zip(&files).enumerate() {
            if e.file == f.cert {
                return (format!("{name}.certificates[{i}].cert"), c.referenced);
            }
            if e.file == f.key {
                return (format!("{name}.certificates[{i}].key"), c.referenced);
            }
        }
        match &raw.client_auth {
            Some(c) => (format!("{name}.clientAuth.ca"), c.referenced),
            None => (name.to_string(), *at),
        }
    };
    let fail = |e: TlsError| {
        let (field, at) = field_of(&e);
        ConfigError::at(cx.file, at, field, e.to_string())
    };
    let certificates = Arc::new(Certificates::load(&files).map_err(fail)?);
    let settings = TlsSettings {
        min_version,
        client_auth,
        http2,
    };
    let server = tls::server_config(&settings, certificates.clone()).map_err(fail)?;
    Ok(TlsTermination {
        certificates,
        server: Arc::new(server),
    })
}

fn validate_admin(cx: &Ctx<'_>, raw: &RawAdmin, at: &Location) -> Result<AdminConfig, ConfigError> {
    let listen = cx.address(&raw.listen, at, "admin.listen")?;
    let credentials = match admin_credentials(
        raw.access_key_id.as_ref().map(|v| v.0.as_str()),
        raw.secret_access_key.as_ref().map(|v| v.0.as_str()),
    ) {
        Ok(credentials) => credentials,
        Err(why) => return cx.err(at, "admin", why),
    };
    if credentials.is_none() && !listen.ip().is_loopback() {
        return cx.err(
            at,
            "admin.listen",
            format!("the admin API may listen on {} only with credentials ({ADMIN_ACCESS_KEY_ENV} and {ADMIN_SECRET_KEY_ENV})", listen.ip()),
        );
    }
    let max_connections = match raw.max_connections {
        None => DEFAULT_ADMIN_MAX_CONNECTIONS,
        Some(0) => return cx.err(at, "admin.maxConnections", "must be at least 1"),
        Some(n) => n as usize,
    };
    let tls = match &raw.tls {
        None => None,
        Some(tls) if tls.value.listen.is_some() => {
            return cx.err(
                &tls.referenced,
                "admin.tls.listen",
                "the admin API listens on admin.listen, over TLS when admin.tls is given",
            );
        }
        Some(tls) => Some(validate_termination(
            cx,
            &tls.value,
            &tls.referenced,
            "admin.tls",
            false,
        )?),
    };
    Ok(AdminConfig {
        listen,
        credentials,
        max_connections,
        tls,
    })
}

fn validate_api(
    cx: &Ctx<'_>,
    field: &str,
    api: &RawApi,
    at: &Location,
) -> Result<Api, ConfigError> {
    if api.id.is_empty() {
        return cx.err(at, format!("{field}.id"), "must not be empty");
    }
    if api.stages.is_empty() {
        return cx.err(
            at,
            format!("{field}.stages"),
            "an API needs at least one stage",
        );
    }
    let by_authorizer = match api.api_key_source.as_deref() {
        None | Some("HEADER") => false,
        Some("AUTHORIZER") => true,
        Some(other) => {
            return cx.err(
                at,
                format!("{field}.apiKeySource"),
                format!("{other:?} is not one of HEADER, AUTHORIZER"),
            );
        }
    };
    let mut authorizers: Vec<Arc<Authorizer>> = Vec::new();
    for (i, a) in api.authorizers.iter().enumerate() {
        let (af, at) = (format!("{field}.authorizers[{i}]"), &a.referenced);
        let a = &a.value;
        if authorizers.iter().any(|o| o.settings.name == a.name) {
            return cx.err(
                at,
                format!("{af}.name"),
                format!("duplicate authorizer {:?}", a.name),
            );
        }
        let identifier = match a.usage_identifier_is.as_deref() {
            None | Some("name") => UsageIdentifier::Name,
            Some("value") => UsageIdentifier::Value,
            Some(other) => {
                return cx.err(
                    at,
                    format!("{af}.usageIdentifierIs"),
                    format!("{other:?} is not one of name, value"),
                );
            }
        };
        // A JWKS URL is fetched trusting what https upstreams trust.
        let default_tls = RawUpstreamTls {
            ca: None,
            cert: None,
            key: None,
            insecure_skip_verify: false,
        };
        let tls = match cx.upstream_tls {
            Some(global) => cx.client_config(&global.value, &global.referenced, "upstreamTls")?,
            None => cx.client_config(&default_tls, at, &format!("{af}.jwks"))?,
        };
        if a.issuer.is_none() && a.audience.is_none() {
            cx.warn(at, &af, "neither issuer nor audience is set: any token the JWKS's keys signed, for any application of that IdP, is accepted");
        }
        let settings = AuthorizerSettings {
            name: a.name.clone(),
            // A file is read from the config's directory; a URL is what it says.
            jwks: if a.jwks.starts_with("https://") {
                a.jwks.clone()
            } else {
                cx.path(&a.jwks).to_string_lossy().into_owned()
            },
            issuer: a.issuer.clone(),
            audience: a.audience.clone(),
            claim: a
                .usage_identifier_claim
                .clone()
                .unwrap_or_else(|| "sub".into()),
            identifier,
        };
        // Its keys are read once the whole file is valid ([`Config::read_jwks`]): a URL is a fetch.
        match Authorizer::new(settings, tls) {
            Ok(authorizer) => {
                let authorizer = Arc::new(authorizer);
                cx.jwks.borrow_mut().push(JwksToRead {
                    authorizer: authorizer.clone(),
                    written: ConfigError::at(cx.file, *at, format!("{af}.jwks"), ""),
                });
                authorizers.push(authorizer);
            }
            Err(e) => return cx.err(at, format!("{af}.jwks"), e),
        }
    }
    let mut routes = Vec::with_capacity(api.routes.len());
    for (i, route) in api.routes.iter().enumerate() {
        let rf = format!("{field}.routes[{i}]");
        let mut validated = validate_route(cx, &rf, &route.value, &route.referenced)?;
        let named = route.value.authorizer.as_deref();
        let at = &route.referenced;
        validated.authorizer = match (named, by_authorizer, validated.api_key_required) {
            (None, false, _) | (None, true, false) => None,
            (Some(_), false, _) => {
                return cx.err(at, format!("{rf}.authorizer"), "an authorizer identifies the caller only with the API's apiKeySource: AUTHORIZER");
            }
            (Some(_), true, false) => {
                return cx.err(
                    at,
                    format!("{rf}.authorizer"),
                    "an authorizer names the caller's API key: set apiKeyRequired: true",
                );
            }
            (Some(name), true, true) => {
                match authorizers.iter().find(|a| a.settings.name == name) {
                    Some(a) => Some(a.clone()),
                    None => {
                        return cx.err(
                            at,
                            format!("{rf}.authorizer"),
                            format!("no authorizer named {name:?} in this API's authorizers"),
                        );
                    }
                }
            }
            (None, true, true) => match authorizers.as_slice() {
                [only] => Some(only.clone()),
                _ => {
                    return cx.err(at, format!("{rf}.authorizer"), "with apiKeySource: AUTHORIZER, a keyed route names one of the API's authorizers");
                }
            },
        };
        routes.push(validated);
    }
    let throttle_keys: Vec<String> = routes.iter().map(Route::throttle_key).collect();

    let mut stages = Vec::with_capacity(api.stages.len());
    for (i, stage) in api.stages.iter().enumerate() {
        let sf = format!("{field}.stages[{i}]");
        let (s, at) = (&stage.value, &stage.referenced);
        if s.name.is_empty() || s.name.contains('/') {
            return cx.err(
                at,
                format!("{sf}.name"),
                "a stage name must be non-empty and contain no /",
            );
        }
        if stages.iter().any(|x: &Stage| x.name == s.name) {
            return cx.err(
                at,
                format!("{sf}.name"),
                format!("duplicate stage {:?}", s.name),
            );
        }
        let base_path = s
            .base_path
            .clone()
            .unwrap_or_else(|| format!("/{}", s.name));
        if !base_path.starts_with('/') || base_path.contains("//") {
            return cx.err(
                at,
                format!("{sf}.basePath"),
                "must start with / (use / for no prefix)",
            );
        }
        if !is_canonical_path(&base_path) {
            return cx.err(
                at,
                format!("{sf}.basePath"),
                "must be a normalised path: no dot segments, percent-escapes or characters to escape",
            );
        }
        let throttle = s
            .throttle
            .as_ref()
            .map(|t| cx.throttle(t, at, &format!("{sf}.throttle")))
            .transpose()?;
        let method_throttle = cx.method_throttles(
            &s.method_throttle,
            &throttle_keys,
            at,
            &format!("{sf}.methodThrottle"),
        )?;
        stages.push(Stage {
            name: s.name.clone(),
            base_path,
            throttle,
            method_throttle,
        });
    }
    let mut api = Api {
        id: api.id.clone(),
        stages,
        routes,
        allow_encoded_slashes: api.allow_encoded_slashes,
    };
    add_preflight_routes(&mut api);
    if let Err(e) = Router::new(std::slice::from_ref(&api)) {
        return cx.err(at, format!("{field}.routes"), e.to_string());
    }
    Ok(api)
}

fn validate_route(
    cx: &Ctx<'_>,
    field: &str,
    r: &RawRoute,
    at: &Location,
) -> Result<Route, ConfigError> {
    if let Err(e) = validate_template(&r.path) {
        return cx.err(at, format!("{field}.path"), e.to_string());
    }
    let upper = r.method.to_ascii_uppercase();
    let method = match upper.as_str() {
        "ANY" | "*" => RouteMethod::Any,
        "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS" => {
            match Method::from_bytes(upper.as_bytes()) {
                Ok(m) => RouteMethod::Only(m),
                Err(_) => return cx.err(at, format!("{field}.method"), "invalid method"),
            }
        }
        _ => {
            return cx.err(
                at,
                format!("{field}.method"),
                format!(
                    "{:?} is not one of GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS, ANY",
                    r.method
                ),
            );
        }
    };
    let integration = match (&r.upstream, &r.mock) {
        (Some(_), Some(_)) | (None, None) => {
            return cx.err(
                at,
                field,
                "a route needs exactly one of upstream (an http:// URL) or mock",
            );
        }
        (Some(url), None) => {
            let uri: Uri = match url.0.parse() {
                Ok(u) => u,
                Err(e) => {
                    return cx.err(
                        at,
                        format!("{field}.upstream"),
                        format!("{:?} is not a URL: {e}", url.0),
                    );
                }
            };
            let https = match uri.scheme_str() {
                Some("http") => false,
                Some("https") => true,
                _ => {
                    return cx.err(
                        at,
                        format!("{field}.upstream"),
                        format!("{:?} must be an http:// or https:// URL with a host", url.0),
                    );
                }
            };
            if uri.authority().is_none() {
                return cx.err(
                    at,
                    format!("{field}.upstream"),
                    format!("{:?} must be an http:// or https:// URL with a host", url.0),
                );
            }
            if uri.query().is_some() {
                return cx.err(
                    at,
                    format!("{field}.upstream"),
                    "must not have a query string",
                );
            }
            // Requests are forwarded under this path as they were normalised: it must be normal too.
            if !is_canonical_path(uri.path()) {
                return cx.err(
                    at,
                    format!("{field}.upstream"),
                    "its path must be normalised: no dot segments, empty segments or percent-escapes",
                );
            }
            let timeout = match &r.timeout {
                None => DEFAULT_UPSTREAM_TIMEOUT,
                Some(t) => match parse_duration(t) {
                    Ok(d) if !d.is_zero() => d,
                    Ok(_) => {
                        return cx.err(at, format!("{field}.timeout"), "must be more than zero");
                    }
                    Err(e) => return cx.err(at, format!("{field}.timeout"), e),
                },
            };
            let tls = match (https, &r.upstream_tls) {
                (false, None) => None,
                (false, Some(_)) => {
                    return cx.err(
                        at,
                        format!("{field}.upstreamTls"),
                        "only an https:// upstream takes upstreamTls",
                    );
                }
                (true, own) => Some(cx.upstream_tls(&uri, own.as_ref(), at, field)?),
            };
            Integration::Http {
                url: uri,
                timeout,
                tls,
            }
        }
        (None, Some(mock)) => {
            if r.timeout.is_some() {
                return cx.err(
                    at,
                    format!("{field}.timeout"),
                    "only upstream routes have a timeout",
                );
            }
            let Ok(status) = StatusCode::from_u16(mock.status_code) else {
                return cx.err(
                    at,
                    format!("{field}.mock.statusCode"),
                    "must be an HTTP status code (100-999)",
                );
            };
            let mut headers = Vec::with_capacity(mock.headers.len() + 1);
            for (name, value) in &mock.headers {
                match (
                    HeaderName::from_bytes(name.as_bytes()),
                    HeaderValue::from_str(value),
                ) {
                    (Ok(n), Ok(v)) => headers.push((n, v)),
                    _ => {
                        return cx.err(
                            at,
                            format!("{field}.mock.headers.{name}"),
                            "invalid header name or value",
                        );
                    }
                }
            }
            if !headers.iter().any(|(n, _)| n == http::header::CONTENT_TYPE)
                && !mock.body.is_empty()
            {
                headers.push((
                    http::header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                ));
            }
            Integration::Mock {
                status,
                body: mock.body.clone().into(),
                headers,
            }
        }
    };
    Ok(Route {
        cors: r
            .cors
            .as_ref()
            .and_then(RawCors::settings)
            .map(std::sync::Arc::new),
        path: r.path.clone(),
        method,
        api_key_required: r.api_key_required,
        integration,
        allow_get_body: r.allow_get_body,
        authorizer: None,
    })
}

fn validate_plan(
    cx: &Ctx<'_>,
    field: &str,
    p: &RawPlan,
    at: &Location,
    apis: &[ApiOutline],
) -> Result<DeclaredPlan, ConfigError> {
    if p.name.is_empty() {
        return cx.err(at, format!("{field}.name"), "must not be empty");
    }
    let throttle = p
        .throttle
        .as_ref()
        .map(|t| cx.throttle(t, at, &format!("{field}.throttle")))
        .transpose()?;
    let quota = p
        .quota
        .as_ref()
        .map(|q| validate_quota(cx, &format!("{field}.quota"), &q.value, &q.referenced))
        .transpose()?;
    let mut api_stages = Vec::with_capacity(p.api_stages.len());
    for (i, s) in p.api_stages.iter().enumerate() {
        let sf = format!("{field}.apiStages[{i}]");
        let (v, sat) = (&s.value, &s.referenced);
        if api_stages
            .iter()
            .any(|x: &ApiStage| x.api_id == v.api_id && x.stage == v.stage)
        {
            return cx.err(
                sat,
                &sf,
                format!("{}/{} is listed twice", v.api_id, v.stage),
            );
        }
        let method_throttles = v
            .throttle
            .iter()
            .map(|(k, t)| (k.clone(), ThrottleSettings::from(*t)))
            .collect();
        let stage = ApiStage {
            api_id: v.api_id.clone(),
            stage: v.stage.clone(),
            throttle: method_throttles,
        };
        if let Err(e) = check_api_stage(apis, &stage, throttle.is_some()) {
            let sub = match e {
                PlanError::UnknownApi { .. } => "apiId",
                PlanError::UnknownStage { .. } => "stage",
                PlanError::FineGrainWithoutPlanThrottle
                | PlanError::UnknownMethod { .. }
                | PlanError::BadRate => "throttle",
            };
            return cx.err(sat, format!("{sf}.{sub}"), e.to_string());
        }
        api_stages.push(stage);
    }
    if let Err(msg) = validate_tags(&p.tags) {
        return cx.err(at, format!("{field}.tags"), msg);
    }
    Ok(DeclaredPlan {
        name: p.name.clone(),
        description: p.description.clone(),
        api_stages,
        throttle,
        quota,
        tags: p.tags.clone(),
    })
}

fn validate_quota(
    cx: &Ctx<'_>,
    field: &str,
    q: &RawQuota,
    at: &Location,
) -> Result<QuotaSettings, ConfigError> {
    let Some(period) = Period::named(&q.period.to_ascii_uppercase()) else {
        let names = Period::ALL.map(|p| p.to_string()).join(", ");
        return cx.err(
            at,
            format!("{field}.period"),
            format!("{:?} is not one of {names}", q.period),
        );
    };
    let settings = QuotaSettings {
        limit: q.limit,
        offset: q.offset,
        period,
    };
    if let Err(e) = settings.validate() {
        return cx.err(at, format!("{field}.offset"), e.to_string());
    }
    Ok(settings)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        use super::RawSize;
        let size = |t: &str| parse_size(&RawSize::Text(t.into()));
        assert_eq!(parse_size(&RawSize::Bytes(512)), Ok(512));
        assert_eq!(size("1048576"), Ok(1 << 20));
        assert_eq!(size("512KB"), Ok(512 << 10));
        assert_eq!(size("10MB"), Ok(10 << 20));
        assert_eq!(size("10 mib"), Ok(10 << 20));
        assert_eq!(size("1GB"), Ok(1 << 30));
        assert!(size("10TB").is_err());
        assert!(size("MB").is_err());
        assert!(size("99999999999999GB").is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("1s").unwrap(), Duration::from_secs(1));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2m").unwrap(), Duration::from_secs(120));
        assert_eq!(parse_duration("29").unwrap(), Duration::from_secs(29));
        assert_eq!(parse_duration("0.5s").unwrap(), Duration::from_millis(500));
        assert_eq!(
            parse_duration("7d").unwrap(),
            Duration::from_secs(7 * 86_400)
        );
        assert!(parse_duration("1w").is_err());
        assert!(parse_duration("fast").is_err());
    }
}
