//! What the admin listener accepts when it runs without credentials (loopback only): requests a
//! browser page elsewhere cannot make. A page on another site, or on a name that rebinds to
//! 127.0.0.1, could otherwise list keys or create one whose value it chose.
//! - `Host` must be a loopback name or address, so DNS rebinding finds nothing to talk to;
//! - a browser's request must be same-origin (`Sec-Fetch-Site`, `Origin`), so no page elsewhere
//!   reads or writes;
//! - a write must be JSON (CSV for ImportApiKeys), which no cross-site form or no-cors `fetch` can
//!   send, or carry an `Authorization` (the AWS CLI signs even when nothing checks it), which needs
//!   a CORS preflight this listener never grants.

use http::{HeaderMap, Method, header};

use crate::error::AdminError;

/// Whether `headers`' `Host` names a loopback address (`localhost`, `127.0.0.0/8`, `::1`).
pub(crate) fn is_loopback_host(headers: &HeaderMap) -> bool {
    let Some(host) = headers.get(header::HOST).and_then(|h| h.to_str().ok()) else {
        return false;
    };
    let name = match host.strip_prefix('[') {
        Some(v6) => v6.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(h, _)| h),
    };
    name.eq_ignore_ascii_case("localhost")
        || name
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback())
}

/// Whether a browser sent the request from a page of another origin: `Sec-Fetch-Site` other than
/// `same-origin` or `none` (typed by the user), or an `Origin` that is not this listener's own.
fn cross_origin(headers: &HeaderMap) -> bool {
    let text = |name| headers.get(name).map(|v| v.to_str().unwrap_or(""));
    if let Some(site) = text("sec-fetch-site") {
        if site != "same-origin" && site != "none" {
            return true;
        }
    }
    match (text("origin"), text("host")) {
        (None, _) => false,
        (Some(origin), Some(host)) => {
            let own = |scheme: &str| {
                origin
                    .strip_prefix(scheme)
                    .is_some_and(|o| o.eq_ignore_ascii_case(host))
            };
            !(own("http://") || own("https://"))
        }
        (Some(_), None) => true,
    }
}

/// Whether a write's `Content-Type` is `want` (parameters aside).
fn content_type_is(headers: &HeaderMap, want: &str) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|v| v.trim().eq_ignore_ascii_case(want))
}

/// Lets through only what a local client (the CLI, the AWS CLI, the dashboard's own page) sends;
/// `import` is whether the request is ImportApiKeys (its body is CSV).
pub(crate) fn check(method: &Method, headers: &HeaderMap, import: bool) -> Result<(), AdminError> {
    if !is_loopback_host(headers) {
        return Err(AdminError::AccessDenied(
            "Without credentials the admin API answers only loopback Host names".into(),
        ));
    }
    if cross_origin(headers) {
        return Err(AdminError::AccessDenied(
            "Cross-origin requests are not accepted".into(),
        ));
    }
    let write = !matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS);
    let typed = content_type_is(headers, "application/json")
        || (import && content_type_is(headers, "text/csv"));
    // A bodiless DELETE: browsers send it cross-origin only after a preflight, never granted.
    let bodiless_delete = *method == Method::DELETE && !headers.contains_key(header::CONTENT_TYPE);
    if write && !typed && !bodiless_delete && !headers.contains_key(header::AUTHORIZATION) {
        return Err(AdminError::UnsupportedMediaType(if import {
            "Content-Type must be text/csv or application/json".into()
        } else {
            "Content-Type must be application/json".into()
        }));
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use http::HeaderValue;

    use super::*;

    /// A header map of `pairs`, for tests.
    pub(crate) fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn loopback_hosts_only() {
        for ok in [
            "127.0.0.1:8081",
            "localhost:9",
            "[::1]:8081",
            "127.0.0.1",
            "LOCALHOST",
        ] {
            assert!(is_loopback_host(&headers(&[("host", ok)])), "{ok}");
        }
        for bad in [
            "evil.example:8081",
            "10.0.0.1:8081",
            "[::2]:1",
            "localhost.evil.example",
        ] {
            assert!(!is_loopback_host(&headers(&[("host", bad)])), "{bad}");
        }
        assert!(!is_loopback_host(&HeaderMap::new()));
    }

    #[test]
    fn only_same_origin_typed_writes() {
        let host = ("host", "127.0.0.1:9");
        let json = ("content-type", "application/json; charset=utf-8");
        let ok =
            |m: Method, h: &[(&'static str, &str)], import| check(&m, &headers(h), import).is_ok();
        assert!(ok(Method::GET, &[host], false));
        assert!(ok(Method::POST, &[host, json], false));
        assert!(ok(
            Method::POST,
            &[host, json, ("origin", "http://127.0.0.1:9")],
            false
        ));
        assert!(ok(
            Method::POST,
            &[host, json, ("sec-fetch-site", "same-origin")],
            false
        ));
        assert!(ok(
            Method::POST,
            &[host, ("content-type", "text/csv")],
            true
        ));
        assert!(ok(
            Method::POST,
            &[host, ("authorization", "AWS4-HMAC-SHA256 …")],
            true
        ));
        assert!(ok(Method::DELETE, &[host], false));
        // Cross-site forms and fetches, and rebinding names.
        assert!(!ok(
            Method::POST,
            &[host, ("content-type", "text/plain")],
            false
        ));
        assert!(!ok(Method::POST, &[host], false));
        assert!(!ok(
            Method::POST,
            &[host, ("content-type", "text/csv")],
            false
        ));
        assert!(!ok(
            Method::PATCH,
            &[host, ("content-type", "application/x-www-form-urlencoded")],
            false
        ));
        assert!(!ok(
            Method::POST,
            &[host, json, ("origin", "http://evil.example")],
            false
        ));
        assert!(!ok(Method::POST, &[host, json, ("origin", "null")], false));
        assert!(!ok(
            Method::GET,
            &[host, ("sec-fetch-site", "cross-site")],
            false
        ));
        assert!(!ok(
            Method::GET,
            &[host, ("sec-fetch-site", "same-site")],
            false
        ));
        assert!(!ok(
            Method::GET,
            &[("host", "rebound.evil.example:9")],
            false
        ));
        assert!(!ok(
            Method::DELETE,
            &[host, ("content-type", "text/plain")],
            false
        ));
    }
}
