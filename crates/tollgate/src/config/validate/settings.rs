//! The store, how key values are kept, the access log, and the client fields kept.

use std::time::Duration;

use serde_saphyr::{Location, Spanned};
use tollgate_gateway::access_log::{AccessLogConfig, DEFAULT_FORMAT, LogFormat};
use tollgate_gateway::rewrite::{KeptFields, STEERING_FIELDS};
use tollgate_store::OnStoreFailure;
use tollgate_store::RedisSettings;

use super::{Ctx, default_store, positive_duration};
use crate::config::raw::{RawAccessLog, RawConfig, RawStore, RawUrls};
use crate::config::{ConfigError, KEY_ENCRYPTION_KEY_ENV, REDIS_TLS, StoreConfig, StoreKind};
use tollgate_admin::seal::Sealer;

pub(super) fn validate_store(
    cx: &Ctx<'_>,
    s: &RawStore,
    at: &Location,
) -> Result<StoreConfig, ConfigError> {
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
            if urls.iter().any(|u| u.starts_with("rediss://")) {
                return cx.err(at, "store.redis.url", REDIS_TLS);
            }
            if urls.is_empty() || urls.iter().any(|u| !u.starts_with("redis://")) {
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
                Some(written) => {
                    let names = OnStoreFailure::ALL.map(|mode| (mode.name(), mode));
                    cx.one_of(&names, written, at, "store.onStoreFailure")?
                }
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
    let durable_requests = match s.durability.as_deref() {
        None => false,
        Some(written) => {
            let names = [("interval", false), ("request", true)];
            cx.one_of(&names, written, at, "store.durability")?
        }
    };
    Ok(StoreConfig {
        kind,
        flush_interval,
        durable_requests,
    })
}

/// `keyValueStorage:`: `hashed`, or `encrypted` with the key from the environment.
pub(super) fn validate_key_value_storage(
    cx: &Ctx<'_>,
    kvs: &Spanned<String>,
) -> Result<Option<Sealer>, ConfigError> {
    let storage = [("hashed", false), ("encrypted", true)];
    if !cx.one_of(&storage, &kvs.value, &kvs.referenced, "keyValueStorage")? {
        return Ok(None);
    }
    let Ok(hex) = std::env::var(KEY_ENCRYPTION_KEY_ENV) else {
        return cx.err(
            &kvs.referenced,
            "keyValueStorage",
            format!(
                "encrypted storage needs the key in {KEY_ENCRYPTION_KEY_ENV} (64 hex characters)"
            ),
        );
    };
    match Sealer::from_hex(&hex) {
        Ok(s) => Ok(Some(s)),
        Err(e) => cx.err(
            &kvs.referenced,
            "keyValueStorage",
            format!("{KEY_ENCRYPTION_KEY_ENV}: {e}"),
        ),
    }
}

/// `accessLog:`: off, AWS's default format, or a format and a file.
pub(super) fn validate_access_log(
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
pub(super) fn validate_kept_fields(
    cx: &Ctx<'_>,
    raw: &RawConfig,
) -> Result<KeptFields, ConfigError> {
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
