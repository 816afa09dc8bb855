//! Where the gateway listens: plain HTTP, TLS (its certificate files named, read when the config is
//! opened), the decision endpoint, HTTP/2, the admin API.

use std::net::SocketAddr;

use serde_saphyr::{Location, Spanned};
use tollgate_gateway::config::Http2Settings;
use tollgate_gateway::tls::{CertFiles, ClientAuth, MinVersion, TlsSettings};
use tollgate_gateway::verify::{Proxy, VerifySettings};

use super::Ctx;
use crate::config::raw::{RawAdmin, RawHttp2, RawTls, RawVerify};
use crate::config::{
    ADMIN_ACCESS_KEY_ENV, ADMIN_SECRET_KEY_ENV, AdminConfig, ConfigError,
    DEFAULT_ADMIN_MAX_CONNECTIONS, TlsListener, TlsTermination, admin_credentials,
};

/// `verify:`: where the decision endpoint listens, and for which proxy.
pub(super) fn validate_verify(
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
    let proxy = cx.one_of(&Proxy::NAMES, &raw.proxy, at, "verify.proxy")?;
    let path_prefix = raw.path_prefix.clone().unwrap_or_default();
    if !(path_prefix.is_empty() || path_prefix.starts_with('/')) {
        return cx.err(at, "verify.pathPrefix", "must start with /");
    }
    Ok((listen, VerifySettings { proxy, path_prefix }))
}

/// `http2:`: on unless turned off, with its stream limit.
pub(super) fn validate_http2(
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

/// The data plane's HTTPS listener.
pub(super) fn validate_tls(
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

/// TLS termination as `raw` (the field `name`) sets it: its files are read and checked when the
/// config is opened ([`crate::config::Config::open`]), before anything binds.
pub(super) fn validate_termination(
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
    let min_version = match &raw.min_version {
        None => MinVersion::default(),
        Some(v) => cx.one_of(
            &MinVersion::NAMES,
            &v.value,
            &v.referenced,
            format!("{name}.minVersion"),
        )?,
    };
    let client_auth = raw.client_auth.as_ref().map(|c| ClientAuth {
        ca: cx.path(&c.value.ca.0),
        required: c.value.required,
    });
    // Which field names each file, and where it is written: for the errors of opening them.
    let mut written = Vec::new();
    for (i, (c, f)) in raw.certificates.iter().zip(&files).enumerate() {
        let field = format!("{name}.certificates[{i}]");
        written.push((
            f.cert.clone(),
            cx.error(&c.referenced, format!("{field}.cert")),
        ));
        written.push((
            f.key.clone(),
            cx.error(&c.referenced, format!("{field}.key")),
        ));
    }
    let whole = match &raw.client_auth {
        Some(c) => cx.error(&c.referenced, format!("{name}.clientAuth.ca")),
        None => cx.error(at, name),
    };
    let settings = TlsSettings {
        min_version,
        client_auth,
        http2,
    };
    Ok(TlsTermination::new(files, settings, written, whole))
}

pub(super) fn validate_admin(
    cx: &Ctx<'_>,
    raw: &RawAdmin,
    at: &Location,
) -> Result<AdminConfig, ConfigError> {
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
