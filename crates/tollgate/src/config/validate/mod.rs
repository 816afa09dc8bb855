//! Raw config → runtime config: every check that YAML types cannot express, a section at a time
//! (listeners, APIs and routes, plans and keys, settings). Validation does no I/O: the files and
//! URLs the config names (certificates, keys, CAs, JWKS) are opened after it, by
//! [`Config::open`], with errors that name where the config names them.

mod apis;
mod exporters;
mod listeners;
mod plans;
mod settings;

use apis::validate_apis;
use exporters::validate_exporters;
use listeners::{validate_admin, validate_http2, validate_tls, validate_verify};
use plans::{validate_keys, validate_plans};
use settings::{
    validate_access_log, validate_kept_fields, validate_key_value_storage, validate_store,
};

use std::cell::{Cell, RefCell};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use http::Uri;
use rustls::pki_types::ServerName;
use serde_saphyr::{Location, Spanned};
use tollgate_core::rules::{ApiOutline, PlanError, check_throttle};
use tollgate_core::{IpNetworks, ThrottleSettings};
use tollgate_gateway::GatewayConfig;
use tollgate_gateway::alerts::{Alert, AlertOn, AlertScope};
use tollgate_gateway::config::UpstreamTls;
use tollgate_gateway::config::{Api, DEFAULT_MAX_REQUEST_BODY};
use tollgate_gateway::jwt::Authorizer;
use tollgate_gateway::tls::{CertFiles, ClientTls, UpstreamTlsFiles};
use tollgate_gateway::webhooks::{Webhook, WebhookFormat};

use super::raw::{
    EnvString, RawAlert, RawConfig, RawSize, RawStore, RawThrottle, RawUpstreamTls, RawWebhook,
};
use super::{Config, ConfigError, StoreConfig, StoreKind, ToOpen};

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
    /// The TLS client configurations named so far, shared by the routes with the same settings
    /// (so their connections share the idle pool), each with where it is first written.
    clients: RefCell<Vec<ToOpen<Arc<ClientTls>>>>,
    /// Whether a route skips verifying its upstream's certificate.
    insecure_upstream: Cell<bool>,
    /// What is valid but probably not what the operator meant (`check` prints them, `serve` logs
    /// them).
    warnings: RefCell<Vec<ConfigError>>,
    /// The authorizers whose JWKS is read after validation, each with where it is written.
    jwks: RefCell<Vec<ToOpen<Arc<Authorizer>>>>,
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

    /// What `written` (the field `field`, at `at`) names among `names`, or an error listing them:
    /// each enum's names are defined once, beside it.
    fn one_of<T: Copy>(
        &self,
        names: &[(&str, T)],
        written: &str,
        at: &Location,
        field: impl Into<String>,
    ) -> Result<T, ConfigError> {
        match names.iter().find(|(name, _)| *name == written) {
            Some(&(_, value)) => Ok(value),
            None => {
                let list: Vec<&str> = names.iter().map(|(name, _)| *name).collect();
                self.err(
                    at,
                    field,
                    format!("{written:?} is not one of {}", list.join(", ")),
                )
            }
        }
    }

    /// Where the field `field` is written, for an error found later (its message left empty).
    fn error(&self, at: &Location, field: impl Into<String>) -> ConfigError {
        ConfigError::at(self.file, *at, field, "")
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
            (Some(own), _) => self.client_tls(own, at, &format!("{field}.upstreamTls"))?,
            (None, Some(global)) => {
                self.client_tls(&global.value, &global.referenced, "upstreamTls")?
            }
            (None, None) => {
                self.client_tls(&RawUpstreamTls::default(), at, &format!("{field}.upstream"))?
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
            client: config,
            server_name,
        })
    }

    /// The TLS client configuration for `raw` (written at `at` as `field`), one for all the routes
    /// with the same settings, built when the config is opened.
    fn client_tls(
        &self,
        raw: &RawUpstreamTls,
        at: &Location,
        field: &str,
    ) -> Result<Arc<ClientTls>, ConfigError> {
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
        let mut clients = self.clients.borrow_mut();
        if let Some(known) = clients.iter().find(|c| *c.what.files() == files) {
            return Ok(known.what.clone());
        }
        let client = Arc::new(ClientTls::new(files));
        clients.push(ToOpen {
            what: client.clone(),
            written: self.error(at, field),
        });
        Ok(client)
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
            clients: RefCell::default(),
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
        durable_requests: false,
    }
}

pub(super) fn validate(file: &Path, raw: RawConfig) -> Result<Config, ConfigError> {
    let cx = Ctx::new(file, raw.upstream_tls.as_ref());
    // Opened even when no route uses it yet.
    if let Some(global) = &raw.upstream_tls {
        cx.client_tls(&global.value, &global.referenced, "upstreamTls")?;
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
    let webhooks = validate_webhooks(&cx, &raw.webhooks)?;
    let alerts = validate_alerts(&cx, &raw.alerts, &webhooks)?;
    let exporters = validate_exporters(&cx, &raw.exporters)?;
    let trusted_proxies = match &raw.trusted_proxies {
        None => None,
        Some(list) => Some(
            IpNetworks::parse(&list.value.join(","))
                .or_else(|msg| cx.err(&list.referenced, "trustedProxies", msg))?,
        ),
    };

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
            trusted_proxies,
            webhooks,
            alerts,
            exporters,
        },
        plans,
        keys,
        warnings: cx.warnings.take(),
        clients: cx.clients.take(),
        jwks: cx.jwks.take(),
    })
}

/// How long deliveries are retried unless a webhook says otherwise: a day, as the issue names it
/// (Stripe retries for three).
const DEFAULT_RETRY_FOR: u64 = 86_400;

/// `webhooks:`: each with a unique name, an http(s) URL and, for JSON, a secret to sign with.
fn validate_webhooks(
    cx: &Ctx<'_>,
    raw: &[Spanned<RawWebhook>],
) -> Result<Vec<Webhook>, ConfigError> {
    let mut webhooks: Vec<Webhook> = Vec::with_capacity(raw.len());
    for (i, w) in raw.iter().enumerate() {
        let (field, at, w) = (format!("webhooks[{i}]"), &w.referenced, &w.value);
        if w.name.is_empty() || webhooks.iter().any(|o| o.name == w.name) {
            return cx.err(
                at,
                format!("{field}.name"),
                format!("{:?}: a webhook needs a name of its own", w.name),
            );
        }
        let url = http_url(cx, &w.url.0, at, &format!("{field}.url"))?;
        let format = match &w.format {
            None => WebhookFormat::Json,
            Some(name) => WebhookFormat::named(name).ok_or(()).or_else(|()| {
                cx.err(
                    at,
                    format!("{field}.format"),
                    format!("{name:?} is not json or slack"),
                )
            })?,
        };
        let secret = w
            .secret
            .as_ref()
            .map(|s| s.0.clone())
            .filter(|s| !s.is_empty());
        if secret.is_none() && format == WebhookFormat::Json {
            return cx.err(
                at,
                format!("{field}.secret"),
                "a JSON webhook signs what it sends: give it a secret (e.g. \"${WEBHOOK_SECRET}\")",
            );
        }
        let retry_for = match &w.retry_for {
            None => DEFAULT_RETRY_FOR,
            Some(t) => positive_duration(cx, t, at, &format!("{field}.retryFor"))?.as_secs(),
        };
        let tls = cx.delivery_tls(at, &format!("{field}.url"))?;
        webhooks.push(Webhook {
            name: w.name.clone(),
            url,
            secret,
            format,
            retry_for,
            tls,
        });
    }
    Ok(webhooks)
}

/// `url` (the field `field`), when it is an http:// or https:// URL with a host.
fn http_url(cx: &Ctx<'_>, url: &str, at: &Location, field: &str) -> Result<String, ConfigError> {
    let host = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
        .and_then(|rest| rest.split('/').next())
        .filter(|host| !host.is_empty());
    match host {
        Some(_) => Ok(url.to_owned()),
        None => cx.err(
            at,
            field,
            format!("{url:?} is not an http:// or https:// URL"),
        ),
    }
}

impl Ctx<'_> {
    /// What deliveries to the URL at `field` trust: the file's `upstreamTls`, else the system's
    /// roots.
    fn delivery_tls(&self, at: &Location, field: &str) -> Result<Arc<ClientTls>, ConfigError> {
        match self.upstream_tls {
            Some(global) => self.client_tls(&global.value, &global.referenced, "upstreamTls"),
            None => self.client_tls(&RawUpstreamTls::default(), at, field),
        }
    }
}

/// `alerts:`: each with a unique name, watching what this version watches, sent to a webhook.
fn validate_alerts(
    cx: &Ctx<'_>,
    raw: &[Spanned<RawAlert>],
    webhooks: &[Webhook],
) -> Result<Vec<Alert>, ConfigError> {
    let mut alerts: Vec<Alert> = Vec::with_capacity(raw.len());
    for (i, a) in raw.iter().enumerate() {
        let (field, at, a) = (format!("alerts[{i}]"), &a.referenced, &a.value);
        if a.name.is_empty() || alerts.iter().any(|o| o.name == a.name) {
            return cx.err(
                at,
                format!("{field}.name"),
                format!("{:?}: an alert needs a name of its own", a.name),
            );
        }
        if !webhooks.iter().any(|w| w.name == a.webhook) {
            let known: Vec<&str> = webhooks.iter().map(|w| w.name.as_str()).collect();
            return cx.err(
                at,
                format!("{field}.webhook"),
                format!(
                    "{:?} names no webhook; the webhooks are: {}",
                    a.webhook,
                    known.join(", ")
                ),
            );
        }
        let on = match a.on.as_str() {
            "quota" => {
                if a.thresholds.is_empty() || a.thresholds.iter().any(|t| !(1..=100).contains(t)) {
                    return cx.err(at, format!("{field}.thresholds"), "give the percentages of the quota to alert at, each 1 to 100, e.g. [80, 100]");
                }
                let scope = match &a.scope {
                    None => AlertScope::Key,
                    Some(name) => AlertScope::named(name).ok_or(()).or_else(|()| {
                        cx.err(
                            at,
                            format!("{field}.scope"),
                            format!("{name:?} is not key or customer"),
                        )
                    })?,
                };
                let mut thresholds = a.thresholds.clone();
                thresholds.sort_unstable();
                thresholds.dedup();
                AlertOn::Quota { thresholds, scope }
            }
            "credits" => match a.below {
                Some(below) if below > 0 => AlertOn::Credits { below },
                _ => {
                    return cx.err(
                        at,
                        format!("{field}.below"),
                        "give the balance to alert below, a whole number of credits from 1",
                    );
                }
            },
            "expiry" => {
                let Some(within) = &a.within else {
                    return cx.err(
                        at,
                        format!("{field}.within"),
                        "give how long before a key's expiry to alert, e.g. 7d",
                    );
                };
                let within = positive_duration(cx, within, at, &format!("{field}.within"))?;
                AlertOn::Expiry {
                    within: within.as_secs(),
                }
            }
            other => {
                return cx.err(
                    at,
                    format!("{field}.on"),
                    format!("{other:?} is not quota, credits or expiry"),
                );
            }
        };
        alerts.push(Alert {
            name: a.name.clone(),
            on,
            webhook: a.webhook.clone(),
        });
    }
    Ok(alerts)
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

    /// Validation reads no file: what a config names is opened by `Config::open`, whose errors
    /// name the file, line and field naming what failed.
    #[test]
    fn validation_opens_nothing() {
        let file = Path::new("/nonexistent/tollgate.yaml");
        let config = |tls: &str| {
            format!(
                "{tls}apis:\n  - id: a\n    stages: [ {{ name: prod, basePath: / }} ]\n    routes:\n      - {{ path: /x, method: GET, upstream: \"https://127.0.0.1:1\", upstreamTls: {{ ca: ca.pem }} }}\n    authorizers:\n      - {{ name: idp, jwks: jwks.json, issuer: i }}\n"
            )
        };
        let opened = |text: &str| {
            let c = crate::config::parse(file, text).expect("valid without its files");
            c.open(false).expect_err("its files are missing")
        };
        let e = opened(&config(
            "tls: { listen: 127.0.0.1:0, certificates: [ { cert: a.crt, key: a.key } ] }\n",
        ));
        assert_eq!(e.field, "tls.certificates[0].cert", "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(1), "{e}");
        assert!(e.message.contains("a.crt"), "{e}");
        let e = opened(&config("listen: 127.0.0.1:0\n"));
        assert_eq!(e.field, "apis[0].routes[0].upstreamTls", "{e}");
        assert!(e.message.contains("ca.pem"), "{e}");
    }

    /// How a plan shares limits is checked where it is written; it is kept as the plan's tag.
    #[test]
    fn limits_share_by_is_checked_and_kept_as_a_tag() {
        let file = Path::new("/nonexistent/tollgate.yaml");
        let plan = |share_by: &str| {
            format!(
                "listen: 127.0.0.1:0\napis:\n  - id: a\n    stages: [ {{ name: prod }} ]\n    routes:\n      - {{ path: /x, method: GET, apiKeyRequired: true, upstream: \"http://127.0.0.1:1\" }}\nusagePlans:\n  - {{ name: p, limitsShareBy: {share_by}, apiStages: [ {{ apiId: a, stage: prod }} ] }}\n"
            )
        };
        let e = crate::config::parse(file, &plan("customer")).unwrap_err();
        assert_eq!(e.field, "usagePlans[0].limitsShareBy", "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(8), "{e}");
        assert!(e.message.contains("\"customerId\""), "{e}");
        let c = crate::config::parse(file, &plan("customerId")).unwrap();
        assert_eq!(
            c.plans[0]
                .tags
                .get("tollgate:limitsShareBy")
                .map(String::as_str),
            Some("customerId")
        );
    }

    /// `store.durability` is `interval` or `request`.
    #[test]
    fn durability_is_named() {
        let file = Path::new("/nonexistent/tollgate.yaml");
        let with = |d: &str| {
            format!("listen: 127.0.0.1:0\nstore: {{ sqlite: ./t.db, durability: {d} }}\n")
        };
        let e = crate::config::parse(file, &with("always")).unwrap_err();
        assert_eq!(e.field, "store.durability", "{e}");
        assert!(
            crate::config::parse(file, &with("request"))
                .unwrap()
                .store
                .durable_requests
        );
        assert!(
            !crate::config::parse(file, &with("interval"))
                .unwrap()
                .store
                .durable_requests
        );
    }

    /// Webhooks and alerts are checked where they are written, naming the field.
    #[test]
    fn webhooks_and_alerts_are_checked() {
        let file = Path::new("/nonexistent/tollgate.yaml");
        let base = "listen: 127.0.0.1:0\napis:\n  - id: a\n    stages: [ { name: prod } ]\n    routes:\n      - { path: /x, method: GET, apiKeyRequired: true, upstream: \"http://127.0.0.1:1\" }\n";
        let with =
            |webhooks: &str, alerts: &str| format!("{base}webhooks:\n{webhooks}alerts:\n{alerts}");
        let ops = "  - { name: ops, url: \"http://127.0.0.1:9/h\", secret: s3cret }\n";
        let quota = |rest: &str| format!("  - {{ name: q, on: quota, webhook: ops{rest} }}\n");
        let field = |yaml: String| crate::config::parse(file, &yaml).unwrap_err().field;
        assert_eq!(
            field(with(ops, &quota(", thresholds: [80, 101]"))),
            "alerts[0].thresholds"
        );
        assert_eq!(
            field(with(ops, &quota(", thresholds: []"))),
            "alerts[0].thresholds"
        );
        assert_eq!(
            field(with(ops, &quota(", thresholds: [80], scope: plan"))),
            "alerts[0].scope"
        );
        let unknown = "  - { name: q, on: quota, thresholds: [80], webhook: pager }\n";
        assert_eq!(field(with(ops, unknown)), "alerts[0].webhook");
        let no_level = "  - { name: c, on: credits, webhook: ops }\n";
        assert_eq!(field(with(ops, no_level)), "alerts[0].below");
        let no_time = "  - { name: e, on: expiry, webhook: ops }\n";
        assert_eq!(field(with(ops, no_time)), "alerts[0].within");
        let odd = "  - { name: o, on: spend, webhook: ops }\n";
        assert_eq!(field(with(ops, odd)), "alerts[0].on");
        let unsigned = "  - { name: ops, url: \"http://127.0.0.1:9/h\" }\n";
        assert_eq!(
            field(with(unsigned, &quota(", thresholds: [80]"))),
            "webhooks[0].secret"
        );
        let ftp = "  - { name: ops, url: \"ftp://h/\", secret: s }\n";
        assert_eq!(
            field(with(ftp, &quota(", thresholds: [80]"))),
            "webhooks[0].url"
        );
        let c =
            crate::config::parse(file, &with(ops, &quota(", thresholds: [100, 80, 80]"))).unwrap();
        assert_eq!(c.gateway.alerts.len(), 1);
    }

    /// Credits are checked where they are written; the refill is kept as the key's tag.
    #[test]
    fn credits_are_checked_and_the_refill_kept_as_a_tag() {
        let file = Path::new("/nonexistent/tollgate.yaml");
        let key = |plans: &str, credits: &str| {
            format!(
                "listen: 127.0.0.1:0\napis:\n  - id: a\n    stages: [ {{ name: prod }} ]\n    routes:\n      - {{ path: /x, method: GET, apiKeyRequired: true, upstream: \"http://127.0.0.1:1\" }}\nusagePlans:\n  - {{ name: p, apiStages: [ {{ apiId: a, stage: prod }} ] }}\napiKeys:\n  - {{ name: k, value: partnerKeyValue0123456789, usagePlans: [{plans}], credits: {credits} }}\n"
            )
        };
        let e = crate::config::parse(file, &key("", "{ balance: 5 }")).unwrap_err();
        assert_eq!(e.field, "apiKeys[0].credits", "{e}");
        assert!(e.message.contains("no usage plan"), "{e}");
        let e = crate::config::parse(file, &key("p", "{ refill: { amount: 5, period: YEAR } }"))
            .unwrap_err();
        assert_eq!(e.field, "apiKeys[0].credits.refill.period", "{e}");
        let e = crate::config::parse(file, &key("p", "{ refill: { amount: 0, period: DAY } }"))
            .unwrap_err();
        assert_eq!(e.field, "apiKeys[0].credits.refill.amount", "{e}");
        assert!(crate::config::parse(file, &key("p", "{ balance: -5 }")).is_err());
        let c = crate::config::parse(
            file,
            &key(
                "p",
                "{ balance: 5, refill: { amount: 100, period: month } }",
            ),
        )
        .unwrap();
        assert_eq!(c.keys[0].opening_credits, Some(5));
        assert_eq!(
            c.keys[0]
                .tags
                .get("tollgate:creditRefill")
                .map(String::as_str),
            Some("100/MONTH")
        );
    }

    /// A malformed network is named with its field and line, in a key's list and in the proxies'.
    #[test]
    fn networks_are_checked_where_they_are_written() {
        let file = Path::new("/nonexistent/tollgate.yaml");
        let base = "listen: 127.0.0.1:0\napis:\n  - id: a\n    stages: [ { name: prod } ]\n    routes:\n      - { path: /x, method: GET, apiKeyRequired: true, upstream: \"http://127.0.0.1:1\" }\nusagePlans:\n  - { name: p, apiStages: [ { apiId: a, stage: prod } ] }\n";
        let key = |list: &str| {
            format!(
                "{base}apiKeys:\n  - {{ name: k, value: partnerKeyValue0123456789, usagePlans: [p], allowedSourceIps: {list} }}\n"
            )
        };
        let e = crate::config::parse(file, &key("[10.0.0.0/8, 10.0.0.0/33]")).unwrap_err();
        assert_eq!(e.field, "apiKeys[0].allowedSourceIps", "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(10), "{e}");
        assert!(e.message.contains("'10.0.0.0/33' is not a CIDR"), "{e}");
        let c = crate::config::parse(file, &key("[\"2001:db8::/32\", 198.51.100.7]")).unwrap();
        assert_eq!(
            c.keys[0]
                .tags
                .get("tollgate:allowedSourceIps")
                .map(String::as_str),
            Some("2001:db8::/32,198.51.100.7/32")
        );
        let many: Vec<String> = (0..40).map(|i| format!("10.{i}.0.0/16")).collect();
        let e = crate::config::parse(file, &key(&format!("[{}]", many.join(", ")))).unwrap_err();
        assert!(e.message.contains("256 characters"), "{e}");
        let e = crate::config::parse(file, &format!("trustedProxies: [lb.internal]\n{base}"))
            .unwrap_err();
        assert_eq!(
            (e.field.as_str(), e.position.map(|p| p.0)),
            ("trustedProxies", Some(1)),
            "{e}"
        );
    }

    /// A route's cost is a whole number from 0; a negative one is named with its field and line.
    #[test]
    fn costs_are_whole_numbers_from_zero() {
        let file = Path::new("/nonexistent/tollgate.yaml");
        let config = |cost: &str| {
            format!(
                "listen: 127.0.0.1:0\napis:\n  - id: a\n    stages: [ {{ name: prod }} ]\n    routes:\n      - {{ path: /x, method: GET, apiKeyRequired: true, upstream: \"http://127.0.0.1:1\", cost: {cost} }}\n"
            )
        };
        let route = |c: &Config| c.gateway.apis[0].routes[0].cost;
        assert_eq!(
            crate::config::parse(file, &config("0")).map(|c| route(&c)),
            Ok(0)
        );
        assert_eq!(
            crate::config::parse(file, &config("25")).map(|c| route(&c)),
            Ok(25)
        );
        for bad in ["-1", "4294967296"] {
            let e = crate::config::parse(file, &config(bad)).unwrap_err();
            assert_eq!(
                (e.field.as_str(), e.position.map(|p| p.0)),
                ("apis[0].routes[0].cost", Some(6)),
                "{e}"
            );
            assert!(e.message.contains("from 0 (free)"), "{e}");
        }
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
