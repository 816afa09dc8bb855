//! The decision endpoint for forward-auth (`verify: { listen }`): another proxy (nginx `auth_request`,
//! Caddy `forward_auth`, Traefik `forwardAuth`, Envoy `ext_authz`) asks whether a request may pass,
//! and tollgate runs the whole admission pipeline on it (route, key, throttles, quota, meter) without
//! proxying it.
//!
//! Each proxy says what the original request was in its own way; [`take_original`] reads it into the
//! request head, so routing, normalisation and admission are the data plane's own code. The config
//! names the proxy (`verify.proxy`) and only its fields are read: Caddy and Traefik pass the client's
//! own fields on to the decision request, so a client could otherwise send an `X-Original-URI` naming
//! a public route while the proxy forwards another path.
//! - nginx: `X-Original-URI` and `X-Original-Method`, which the recipe sets. nginx accepts only 2xx,
//!   401 and 403 from its subrequest (anything else becomes a 500), so every refusal is answered 403,
//!   with the real status, AWS's message and the wait in `X-Tollgate-Status`, `X-Tollgate-Message`
//!   and `Retry-After` for the recipe to restore ([`for_nginx`]).
//! - Caddy and Traefik: `X-Forwarded-Method` and `X-Forwarded-Uri`. They pass the answer through, so
//!   refusals keep AWS's statuses and bodies.
//! - Envoy `ext_authz`: the original method, and the original path after `verify.pathPrefix`.

use bytes::Bytes;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode};

use crate::http1::{HeadError, RequestHead, is};
use crate::rewrite::KeptFields;

/// The header naming the admitted key's id, for the proxy to pass upstream or log: always answered
/// ([`NO_KEY`] on a public route), so a proxy that copies it replaces the client's own.
pub const KEY_ID_HEADER: &str = "x-tollgate-key-id";
/// [`KEY_ID_HEADER`]'s value when no key was checked.
pub const NO_KEY: &str = "-";
/// nginx's convention: the refusal's real status.
pub const STATUS_HEADER: &str = "x-tollgate-status";
/// nginx's convention: AWS's message for the refusal.
pub const MESSAGE_HEADER: &str = "x-tollgate-message";

/// The proxy asking, as `verify.proxy` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proxy {
    /// nginx `auth_request`: `X-Original-URI` and `X-Original-Method`; refusals are told as 403.
    Nginx,
    /// Caddy `forward_auth` or Traefik `forwardAuth`: `X-Forwarded-Method` and `X-Forwarded-Uri`.
    Forwarded,
    /// Envoy `ext_authz`: the original method, and the original path after the path prefix.
    Envoy,
}

impl Proxy {
    /// The names `verify.proxy` takes, each with the proxy it names.
    pub const NAMES: [(&str, Self); 4] = [
        ("nginx", Self::Nginx),
        ("caddy", Self::Forwarded),
        ("traefik", Self::Forwarded),
        ("envoy", Self::Envoy),
    ];
}

/// The decision endpoint's settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifySettings {
    /// The proxy asking.
    pub proxy: Proxy,
    /// Envoy's `path_prefix`: taken off the path of a decision request.
    pub path_prefix: String,
}

/// Puts the original request's method, path and query into `head` (the decision request's head, in
/// `buf`), as `settings.proxy` tells them.
///
/// The proxy forwards the client's fields as they came, and the data plane's drops cannot apply
/// there: so a request carrying a field that could make the backend serve another method or path
/// (one of the [`STEERING_FIELDS`](crate::rewrite::STEERING_FIELDS) not `kept`) or, unless `kept`, a
/// field name with `_` (read as `-` by CGI-style servers) is refused, so that what was decided on is
/// what the backend reads.
pub(crate) fn take_original(
    buf: &[u8],
    head: &mut RequestHead,
    settings: &VerifySettings,
    kept: KeptFields,
) -> Result<(), HeadError> {
    // The head parsed once already (so this cannot fail where it did not); read again on this
    // listener only, so that the data plane's parser looks for none of these fields.
    let mut fields = [httparse::EMPTY_HEADER; crate::http1::MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    req.parse(&buf[..head.len])
        .map_err(|_| HeadError::Malformed("Malformed request"))?;
    for h in req.headers.iter() {
        if kept.steers_route(h.name) {
            return Err(HeadError::Malformed(
                "A field that can steer the backend (X-HTTP-Method-Override, X-Original-URL, …) is not allowed",
            ));
        }
        if h.name.as_bytes().contains(&b'_') && kept.drops_underscored(h.name) {
            return Err(HeadError::Malformed(
                "Field names with '_' are not allowed (servers may read them as '-')",
            ));
        }
    }
    let field = |name: &str| {
        req.headers
            .iter()
            .find(|h| is(h.name, name))
            .map(|h| h.value)
    };
    let (uri, method) = match settings.proxy {
        Proxy::Nginx => (field("x-original-uri"), field("x-original-method")),
        Proxy::Forwarded => (field("x-forwarded-uri"), field("x-forwarded-method")),
        Proxy::Envoy => {
            let prefix = settings.path_prefix.trim_end_matches('/').as_bytes();
            let path = &buf[head.path.clone()];
            match path.strip_prefix(prefix) {
                Some(rest) if rest.first() == Some(&b'/') => {
                    head.path = head.path.end - rest.len()..head.path.end;
                    return Ok(());
                }
                _ => {
                    return Err(HeadError::Malformed(
                        "The path is not under verify.pathPrefix",
                    ));
                }
            }
        }
    };
    let uri = uri.ok_or(HeadError::Malformed(
        "The original URI is missing (X-Original-URI or X-Forwarded-Uri)",
    ))?;
    let method = method.ok_or(HeadError::Malformed(
        "The original method is missing (X-Original-Method or X-Forwarded-Method)",
    ))?;
    head.method = crate::http1::parse_method(method)?;
    // Origin form only, as on the data plane.
    if !uri.starts_with(b"/") {
        return Err(HeadError::Malformed("The original URI must be a path"));
    }
    let at = |part: &[u8]| {
        let start = part.as_ptr() as usize - buf.as_ptr() as usize;
        start..start + part.len()
    };
    match uri.iter().position(|&b| b == b'?') {
        Some(q) => {
            head.path = at(&uri[..q]);
            head.query = Some(at(&uri[q + 1..]));
        }
        None => {
            head.path = at(uri);
            head.query = None;
        }
    }
    Ok(())
}

/// The answer letting a request through: 200, the key's limits in the `extra` fields (RateLimit),
/// and the key's id ([`NO_KEY`] on a public route).
pub(crate) fn allowed(extra: HeaderMap, key_id: Option<&str>) -> Response<Bytes> {
    let mut resp = Response::new(Bytes::new());
    *resp.headers_mut() = extra;
    let id = key_id
        .and_then(|id| HeaderValue::from_str(id).ok())
        .unwrap_or(HeaderValue::from_static(NO_KEY));
    resp.headers_mut()
        .insert(HeaderName::from_static(KEY_ID_HEADER), id);
    resp
}

/// `resp`, a refusal with AWS's `message`, as nginx's `auth_request` can take it: 403, with the real
/// status and message in fields of their own (its body and `Retry-After` stay).
pub(crate) fn for_nginx(mut resp: Response<Bytes>, message: &str) -> Response<Bytes> {
    if resp.status().is_success() {
        return resp;
    }
    let status = HeaderValue::from(resp.status().as_u16());
    let h = resp.headers_mut();
    h.insert(HeaderName::from_static(STATUS_HEADER), status);
    if let Ok(m) = HeaderValue::from_str(message) {
        h.insert(HeaderName::from_static(MESSAGE_HEADER), m);
    }
    *resp.status_mut() = StatusCode::FORBIDDEN;
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::http1::parse_request;

    type Original = (String, String, Option<String>);

    fn original(raw: &str, proxy: Proxy, prefix: &str) -> Result<Original, HeadError> {
        let buf = raw.as_bytes();
        let mut head = parse_request(buf, |_| {}).unwrap().unwrap();
        let settings = VerifySettings {
            proxy,
            path_prefix: prefix.into(),
        };
        take_original(buf, &mut head, &settings, KeptFields::default())?;
        let text = |r: std::ops::Range<usize>| String::from_utf8_lossy(&buf[r]).into_owned();
        Ok((
            head.method.to_string(),
            text(head.path.clone()),
            head.query.map(text),
        ))
    }

    const NGINX: &str = "GET /auth HTTP/1.1\r\nHost: t\r\nX-Original-URI: /prod/a/b?x=1\r\nX-Original-Method: PUT\r\n\r\n";
    const CADDY: &str = "GET / HTTP/1.1\r\nHost: t\r\nX-Forwarded-Method: DELETE\r\nX-Forwarded-Uri: /prod/x\r\nX-Forwarded-Host: api\r\n\r\n";

    #[test]
    fn each_proxys_convention_is_read() {
        assert_eq!(
            original(NGINX, Proxy::Nginx, "").unwrap(),
            ("PUT".into(), "/prod/a/b".into(), Some("x=1".into()))
        );
        assert_eq!(
            original(CADDY, Proxy::Forwarded, "").unwrap(),
            ("DELETE".into(), "/prod/x".into(), None)
        );
        let envoy = "POST /authz/prod/x?y HTTP/1.1\r\nHost: t\r\nContent-Length: 0\r\n\r\n";
        assert_eq!(
            original(envoy, Proxy::Envoy, "/authz").unwrap(),
            ("POST".into(), "/prod/x".into(), Some("y".into()))
        );
        assert_eq!(
            original(envoy, Proxy::Envoy, "/authz/").unwrap().1,
            "/prod/x"
        );
    }

    #[test]
    fn only_the_configured_proxys_fields_count() {
        // A client's own X-Original-URI, passed on by Caddy, names nothing.
        let injected = "GET / HTTP/1.1\r\nHost: t\r\nX-Original-URI: /prod/public\r\nX-Original-Method: GET\r\nX-Forwarded-Method: PUT\r\nX-Forwarded-Uri: /prod/private\r\n\r\n";
        assert_eq!(
            original(injected, Proxy::Forwarded, "").unwrap().1,
            "/prod/private"
        );
        assert!(
            original(CADDY, Proxy::Nginx, "").is_err(),
            "nginx's fields are required"
        );
        assert!(original(NGINX, Proxy::Forwarded, "").is_err());
    }

    #[test]
    fn what_cannot_be_an_original_request_is_refused() {
        for (bad, proxy) in [
            (
                "GET / HTTP/1.1\r\nHost: t\r\nX-Original-URI: /prod/a\r\n\r\n",
                Proxy::Nginx,
            ),
            (
                "GET / HTTP/1.1\r\nHost: t\r\nX-Original-URI: http://evil/prod/a\r\nX-Original-Method: GET\r\n\r\n",
                Proxy::Nginx,
            ),
            (
                "GET / HTTP/1.1\r\nHost: t\r\nX-Original-URI: *\r\nX-Original-Method: GET\r\n\r\n",
                Proxy::Nginx,
            ),
            (
                "GET / HTTP/1.1\r\nHost: t\r\nX-Forwarded-Uri: /p\r\nX-Forwarded-Method: G(T\r\n\r\n",
                Proxy::Forwarded,
            ),
            (
                "GET /other/prod/x HTTP/1.1\r\nHost: t\r\n\r\n",
                Proxy::Envoy,
            ),
            ("GET /authzprod/x HTTP/1.1\r\nHost: t\r\n\r\n", Proxy::Envoy),
        ] {
            assert!(original(bad, proxy, "/authz").is_err(), "{bad}");
        }
    }

    #[test]
    fn what_the_backend_could_read_otherwise_is_refused() {
        let with = |field: &str| {
            format!(
                "GET /auth HTTP/1.1\r\nHost: t\r\nX-Original-URI: /prod/a\r\nX-Original-Method: GET\r\n{field}\r\n\r\n"
            )
        };
        for bad in [
            "X-HTTP-Method-Override: DELETE",
            "x-original-url: /prod/secret",
            "X_HTTP_Method_Override: DELETE",
            "X_Tollgate_Key_Id: someone",
            "X_Original_URL: /prod/secret",
        ] {
            assert!(original(&with(bad), Proxy::Nginx, "").is_err(), "{bad}");
        }
        let lower = with("").replace("Method: GET", "Method: delete");
        assert!(original(&lower, Proxy::Nginx, "").is_err(), "{lower}");
        assert!(original(&with("X-Other: 1"), Proxy::Nginx, "").is_ok());
        // Address claims are the proxies' own (Traefik sets X-Real-Ip): not refused.
        assert!(original(&with("X-Real-Ip: 10.0.0.1"), Proxy::Nginx, "").is_ok());
        assert!(original(&with("Forwarded: for=10.0.0.1"), Proxy::Nginx, "").is_ok());
        // Kept by the config: an underscore name that is nobody's twin, a steering field listed.
        let buf = with("X_Custom: 1\r\nX-HTTP-Method-Override: PUT");
        let mut head = parse_request(buf.as_bytes(), |_| {}).unwrap().unwrap();
        let settings = VerifySettings {
            proxy: Proxy::Nginx,
            path_prefix: String::new(),
        };
        let mut kept = KeptFields::default();
        kept.keep_underscores();
        assert!(kept.keep("x-http-method-override"));
        assert!(take_original(buf.as_bytes(), &mut head, &settings, kept).is_ok());
        let twin = with("X_Tollgate_Subject: someone");
        let mut head = parse_request(twin.as_bytes(), |_| {}).unwrap().unwrap();
        assert!(take_original(twin.as_bytes(), &mut head, &settings, kept).is_err());
    }

    #[test]
    fn nginx_gets_403_with_the_real_status() {
        let mut r = Response::new(Bytes::from_static(b"{\"message\":\"Too Many Requests\"}"));
        *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        r.headers_mut()
            .insert("retry-after", HeaderValue::from_static("3"));
        let r = for_nginx(r, "Too Many Requests");
        assert_eq!(r.status(), 403);
        assert_eq!(r.headers()[STATUS_HEADER], "429");
        assert_eq!(r.headers()[MESSAGE_HEADER], "Too Many Requests");
        assert_eq!(r.headers()["retry-after"], "3");
        let ok = for_nginx(allowed(HeaderMap::new(), Some("k1")), "");
        assert_eq!(ok.status(), StatusCode::OK);
        assert_eq!(ok.headers()[KEY_ID_HEADER], "k1");
        let public = allowed(HeaderMap::new(), None);
        assert_eq!(public.headers()[KEY_ID_HEADER], NO_KEY);
    }
}
