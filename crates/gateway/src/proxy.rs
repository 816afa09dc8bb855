//! Forwarding to HTTP upstreams: pooled keep-alive connections, streaming bodies both ways,
//! hop-by-hop headers stripped, `X-Forwarded-*` set.

use std::net::SocketAddr;
use std::time::Duration;

use http::header::{self, HeaderName};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Request, Response, Uri};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;

use crate::response::{self, Body, UpstreamFailure};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), never forwarded.
fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // Names listed in Connection are hop-by-hop too; collect first, the map is borrowed.
    if let Some(conn) = headers.get(header::CONNECTION) {
        if let Ok(list) = conn.to_str() {
            let named: Vec<HeaderName> = list
                .split(',')
                .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
                .collect();
            for name in named {
                headers.remove(name);
            }
        }
    }
    for name in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        headers.remove(name);
    }
}

/// The pooled HTTP client all routes share.
#[derive(Debug, Clone)]
pub struct Upstreams {
    client: Client<HttpConnector, Incoming>,
}

impl Default for Upstreams {
    fn default() -> Self {
        Self::new()
    }
}

impl Upstreams {
    /// A client with keep-alive pooling and no cap on idle connections per upstream, so the pool can
    /// match client concurrency (a small pool costs a reconnect per request under load).
    pub fn new() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(Duration::from_secs(10)));
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(Duration::from_secs(90))
            .build(connector);
        Self { client }
    }

    /// Sends `req` to `base` joined with the request path from byte `rest_start` on (the part after the
    /// stage's base path), keeping the query, waiting at most `timeout` for the response head. `peer`
    /// is the client's address for `X-Forwarded-For`.
    pub async fn forward(
        &self,
        req: Request<Incoming>,
        base: &Uri,
        rest_start: usize,
        timeout: Duration,
        peer: SocketAddr,
    ) -> Response<Body> {
        let (mut parts, body) = req.into_parts();
        let rest = parts.uri.path().get(rest_start..).unwrap_or_default();
        let Some(uri) = target(base, rest, parts.uri.query()) else {
            return response::upstream_failure(UpstreamFailure::Unreachable);
        };
        parts.uri = uri;
        let headers = &mut parts.headers;
        strip_hop_by_hop(headers);
        if let Some(host) = headers.remove(header::HOST) {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
        // An IP address always renders as a valid header value.
        let peer_ip = HeaderValue::try_from(peer.ip().to_string())
            .unwrap_or(HeaderValue::from_static("unknown"));
        let forwarded_for = match headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
            Some(prior) => {
                HeaderValue::try_from(format!("{prior}, {}", peer.ip())).unwrap_or(peer_ip)
            }
            None => peer_ip,
        };
        headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
        parts.version = http::Version::HTTP_11;

        match tokio::time::timeout(
            timeout,
            self.client.request(Request::from_parts(parts, body)),
        )
        .await
        {
            Ok(Ok(resp)) => {
                let (mut parts, body) = resp.into_parts();
                strip_hop_by_hop(&mut parts.headers);
                Response::from_parts(parts, Either::Left(body))
            }
            Ok(Err(err)) => {
                tracing::debug!(error = %err, "upstream request failed");
                response::upstream_failure(UpstreamFailure::Unreachable)
            }
            Err(_) => response::upstream_failure(UpstreamFailure::Timeout),
        }
    }
}

/// `base`'s scheme and authority, `base`'s path joined with `rest` (empty means `/`), and the
/// request's query.
fn target(base: &Uri, rest: &str, query: Option<&str>) -> Option<Uri> {
    let prefix = base.path().trim_end_matches('/');
    let rest = if rest.is_empty() { "/" } else { rest };
    let mut pq =
        String::with_capacity(prefix.len() + rest.len() + query.map_or(0, |q| q.len() + 1));
    pq.push_str(prefix);
    pq.push_str(rest);
    if let Some(q) = query {
        pq.push('?');
        pq.push_str(q);
    }
    let mut parts = base.clone().into_parts();
    parts.path_and_query = Some(PathAndQuery::try_from(pq).ok()?);
    Uri::from_parts(parts).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn target_joins_base_path_rest_and_query() {
        let base: Uri = "http://127.0.0.1:9000".parse().unwrap();
        assert_eq!(
            target(&base, "/a/b", Some("x=1")).unwrap(),
            "http://127.0.0.1:9000/a/b?x=1"
        );
        let base: Uri = "http://h:1/api/".parse().unwrap();
        assert_eq!(target(&base, "/a", None).unwrap(), "http://h:1/api/a");
        assert_eq!(target(&base, "", None).unwrap(), "http://h:1/api/");
    }

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert("connection", "close, x-secret-hop".parse().unwrap());
        h.insert("x-secret-hop", "1".parse().unwrap());
        h.insert("keep-alive", "timeout=5".parse().unwrap());
        h.insert("transfer-encoding", "chunked".parse().unwrap());
        h.insert("x-api-key", "kept".parse().unwrap());
        strip_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1);
        assert_eq!(h["x-api-key"], "kept");
    }
}
