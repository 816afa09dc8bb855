//! One client connection: read a request head, admit it, answer it (forward it, or write a mock, a
//! preflight or a refusal), and go on while keep-alive holds. Everything a request needs lives in
//! buffers this task owns and reuses, so the common exchange allocates nothing.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, Uri};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio::sync::{futures::OwnedNotified, watch};
use tokio::time::{Instant, Sleep};

use crate::config::Integration;
use crate::http1::{
    self, BodyLength, BodyProgress, HeadError, InBuf, RequestHead, ResponseHead, ResponseStart,
};
use crate::proxy::UpstreamConn;
use crate::response::{self, UpstreamFailure};
use crate::server::{Shared, admit_clustered};
use crate::snapshot::Refusal;

/// How long a client may take to send a request head, idle keep-alive time included (hyper's and
/// nginx's `client_header_timeout` default is similar).
const HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// A deadline on one reusable timer: moving it later costs a store, and the timer is re-registered
/// only when it fires early or must fire sooner, not once per request.
struct LazyDeadline {
    sleep: Pin<Box<Sleep>>,
    at: Instant,
}

impl LazyDeadline {
    fn new(at: Instant) -> Self {
        Self {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            at,
        }
    }

    fn set(&mut self, at: Instant) {
        self.at = at;
        if at < self.sleep.deadline() {
            self.sleep.as_mut().reset(at);
        }
    }

    /// Resolves once the deadline has passed.
    async fn expired(&mut self) {
        loop {
            self.sleep.as_mut().await;
            if Instant::now() >= self.at {
                return;
            }
            let at = self.at;
            self.sleep.as_mut().reset(at);
        }
    }
}

/// Serves one client connection until it closes, errs, idles out, or the gateway drains. `open` is
/// held until then: the gateway counts open connections by it.
pub(crate) async fn serve(
    shared: Arc<Shared>,
    client: TcpStream,
    peer: SocketAddr,
    open: watch::Receiver<()>,
) {
    // Enabled before the first look at `draining`, so a drain signalled after that look wakes it.
    let mut stop = Box::pin(shared.stop.clone().notified_owned());
    stop.as_mut().enable();
    let now = Instant::now();
    let mut conn = Conn {
        shared: &shared,
        client,
        peer,
        peer_ip: peer.ip().to_string(),
        inbuf: InBuf::default(),
        forwarded: Vec::new(),
        to_upstream: Vec::new(),
        to_client: Vec::new(),
        upstream: None,
        head_deadline: LazyDeadline::new(now + HEAD_TIMEOUT),
        upstream_deadline: None,
        stop,
    };
    conn.run().await;
    drop(open);
    if let Some(up) = conn.upstream.take() {
        shared.upstreams.put(up);
    }
}

struct Conn<'a> {
    shared: &'a Shared,
    client: TcpStream,
    peer: SocketAddr,
    peer_ip: String,
    /// Bytes from the client not yet handled.
    inbuf: InBuf,
    /// The current request's header lines as they go upstream.
    forwarded: Vec<u8>,
    /// The current request as it goes upstream (kept until answered, for a retry).
    to_upstream: Vec<u8>,
    /// The current response as it goes to the client.
    to_client: Vec<u8>,
    upstream: Option<UpstreamConn>,
    head_deadline: LazyDeadline,
    /// Made on the first forwarded request.
    upstream_deadline: Option<LazyDeadline>,
    /// Wakes an idle connection when the gateway drains.
    stop: Pin<Box<OwnedNotified>>,
}

/// How forwarding failed.
enum Failure {
    /// The upstream could not be reached or answered nonsense: 502 (504 is the deadline's).
    Upstream,
    /// The client went away or sent a malformed body: nothing more to say to it.
    Client,
}

impl Conn<'_> {
    async fn run(&mut self) {
        loop {
            let head = match self.read_head().await {
                Ok(Some(head)) => head,
                Ok(None) => return,
                Err(err) => {
                    self.to_client.clear();
                    let resp = response::full(err.status(), Bytes::new());
                    http1::encode_response(&resp, false, false, &mut self.to_client);
                    let _ = self.client.write_all(&self.to_client).await;
                    return;
                }
            };
            if !self.exchange(head).await {
                return;
            }
        }
    }

    /// The next request head, or `None` when the client closed, idled out, or the gateway drains.
    async fn read_head(&mut self) -> Result<Option<RequestHead>, HeadError> {
        self.head_deadline.set(Instant::now() + HEAD_TIMEOUT);
        loop {
            if !self.inbuf.is_empty() {
                let parsed =
                    http1::parse_request(self.inbuf.bytes(), &mut self.forwarded, &self.peer_ip)?;
                if parsed.is_some() {
                    return Ok(parsed);
                }
            }
            let idle = self.inbuf.is_empty();
            if idle {
                if self.shared.draining.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                self.inbuf.release();
            }
            let (inbuf, client) = (&mut self.inbuf, &mut self.client);
            let read = tokio::select! {
                biased;
                r = async {
                    // Between requests, wait for bytes before taking a buffer.
                    if idle {
                        std::future::poll_fn(|cx| client.poll_read_ready(cx)).await?;
                    }
                    inbuf.read_from(client).await
                } => r,
                () = self.head_deadline.expired() => return Ok(None),
                () = &mut self.stop, if idle => return Ok(None),
            };
            match read {
                Ok(n) if n > 0 => {}
                _ => return Ok(None),
            }
        }
    }

    /// Answers one request; returns whether the connection stays open.
    async fn exchange(&mut self, head: RequestHead) -> bool {
        let shared = self.shared;
        let snap = shared.snapshot.load_full();
        let config = snap.config();
        let started = config.access_log.then(std::time::Instant::now);
        let now = shared.clock.now();
        let buf = self.inbuf.bytes();
        // httparse hands out the target as text, so this holds; a failure would only mean no route.
        let path = std::str::from_utf8(&buf[head.path.clone()]).unwrap_or("");
        let log_path = started.map(|_| path.to_owned());

        let matched = snap.route(&head.method, path);
        let route = matched
            .as_ref()
            .map(|m| &config.apis[m.api].routes[m.route]);
        let cors = route.and_then(|r| r.cors.as_deref());
        let origin = cors
            .and(head.origin.clone())
            .and_then(|r| HeaderValue::from_bytes(&buf[r]).ok());
        let api_key = head.api_key.clone().map(|r| &buf[r]);
        let decided = match (&matched, &shared.limiter) {
            (None, _) => Err(Refusal::MissingAuthenticationToken),
            (Some(m), None) => snap
                .admit(m, api_key, now)
                .map(|a| (a, path.len() - m.rest.len())),
            (Some(m), Some(limiter)) => {
                admit_clustered(&snap, limiter, &shared.metrics, m, api_key, now)
                    .await
                    .map(|a| (a, path.len() - m.rest.len()))
            }
        };
        let keep_alive = head.keep_alive && !shared.draining.load(Ordering::Relaxed);
        let head_only = head.method == Method::HEAD;

        let (status, key_id, keep_alive) = match decided {
            Err(refusal) => {
                shared.metrics.refused(&refusal);
                let mut resp = response::refusal(refusal, config.rate_limit_headers);
                if let Some(cors) = cors {
                    response::add_cors_headers(resp.headers_mut(), cors, origin.as_ref());
                }
                let keep_alive = self.skip_body(&head) && keep_alive;
                (
                    self.reply(&resp, head_only, keep_alive).await,
                    None,
                    keep_alive,
                )
            }
            Ok((admission, rest_start)) => {
                let mut extra = HeaderMap::new();
                if config.rate_limit_headers {
                    response::add_rate_limit_headers(&mut extra, &admission.limits);
                }
                if let Some(cors) = cors {
                    response::add_cors_headers(&mut extra, cors, origin.as_ref());
                }
                let (status, keep_alive) = match &admission.route.integration {
                    Integration::Http { url, timeout } => {
                        let query = head.query.clone().map(|q| &buf[q]);
                        let rest = &path.as_bytes()[rest_start..];
                        let to_upstream = &mut self.to_upstream;
                        upstream_head(to_upstream, &head.method, url, rest, query);
                        to_upstream.extend_from_slice(&self.forwarded);
                        match head.body {
                            BodyLength::Length(n) => {
                                to_upstream.extend_from_slice(b"content-length: ");
                                to_upstream
                                    .extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                                to_upstream.extend_from_slice(b"\r\n");
                            }
                            BodyLength::Chunked => {
                                to_upstream.extend_from_slice(b"transfer-encoding: chunked\r\n");
                            }
                            BodyLength::Empty | BodyLength::UntilClose => {}
                        }
                        to_upstream.extend_from_slice(b"\r\n");
                        self.forward(&head, url, *timeout, &extra, keep_alive).await
                    }
                    Integration::Mock {
                        status,
                        body,
                        headers,
                    } => {
                        let mut resp = Response::new(body.clone());
                        *resp.status_mut() = *status;
                        for (name, value) in headers {
                            resp.headers_mut().insert(name.clone(), value.clone());
                        }
                        resp.headers_mut().extend(extra);
                        let keep_alive = self.skip_body(&head) && keep_alive;
                        (self.reply(&resp, head_only, keep_alive).await, keep_alive)
                    }
                    Integration::Preflight { methods } => {
                        let mut resp = response::preflight(cors, methods, origin.as_ref());
                        resp.headers_mut().extend(extra);
                        let keep_alive = self.skip_body(&head) && keep_alive;
                        (self.reply(&resp, head_only, keep_alive).await, keep_alive)
                    }
                };
                if status != 0 {
                    shared.metrics.admitted(status);
                }
                (status, admission.key_id, keep_alive)
            }
        };
        if let (Some(started), Some(path)) = (started, log_path) {
            // The key's id only: values are secrets and never logged.
            tracing::info!(target: "tollgate::access", method = %head.method, %path, status,
                key_id = key_id.unwrap_or("-"), peer = %self.peer,
                micros = started.elapsed().as_micros() as u64);
        }
        keep_alive && status != 0
    }

    /// Consumes the request (head and body) when its body has fully arrived; false when it has not,
    /// and the connection must close instead.
    fn skip_body(&mut self, head: &RequestHead) -> bool {
        self.inbuf.consume(head.len);
        let mut body = BodyProgress::new(head.body);
        match body.take(self.inbuf.bytes()) {
            Ok(n) => self.inbuf.consume(n),
            Err(_) => return false,
        }
        body.done()
    }

    /// Writes a response the gateway made; returns its status, or 0 when the client is gone.
    async fn reply(&mut self, resp: &Response<Bytes>, head_only: bool, keep_alive: bool) -> u16 {
        self.to_client.clear();
        http1::encode_response(resp, head_only, keep_alive, &mut self.to_client);
        match self.client.write_all(&self.to_client).await {
            Ok(()) => resp.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// Sends the request in `to_upstream` (head, then body) to `url`'s upstream and relays the
    /// answer. Returns the status sent (0 if the client got nothing more) and whether the client
    /// connection stays open.
    async fn forward(
        &mut self,
        head: &RequestHead,
        url: &Uri,
        timeout: Duration,
        extra: &HeaderMap,
        keep_alive: bool,
    ) -> (u16, bool) {
        self.inbuf.consume(head.len);
        let mut body = BodyProgress::new(head.body);
        match body.take(self.inbuf.bytes()) {
            Ok(n) => {
                self.to_upstream.extend_from_slice(&self.inbuf.bytes()[..n]);
                self.inbuf.consume(n);
            }
            Err(_) => {
                return (
                    self.reply_status(HeadError::Malformed.status()).await,
                    false,
                );
            }
        }
        let deadline = Instant::now() + timeout;
        let mut timer = match self.upstream_deadline.take() {
            Some(mut timer) => {
                timer.set(deadline);
                timer
            }
            None => LazyDeadline::new(deadline),
        };
        let sent = tokio::select! {
            biased;
            sent = self.send(url, &head.method, head.expect_continue, &mut body, extra) => Some(sent),
            () = timer.expired() => None,
        };
        self.upstream_deadline = Some(timer);
        let failure = match sent {
            Some(Ok(h)) => Ok(h),
            Some(Err(Failure::Client)) => {
                self.upstream = None;
                return (0, false);
            }
            Some(Err(Failure::Upstream)) => Err(UpstreamFailure::Unreachable),
            None => Err(UpstreamFailure::Timeout),
        };
        let resp_head = match failure {
            Ok(h) => h,
            Err(failure) => {
                self.upstream = None;
                // A request body cut short leaves the client's stream mid-message.
                let keep_alive = keep_alive && body.done();
                let resp = response::upstream_failure(failure);
                let status = self
                    .reply(&resp, head.method == Method::HEAD, keep_alive)
                    .await;
                return (status, keep_alive);
            }
        };

        let Some(up) = self.upstream.as_mut() else {
            return (0, false);
        };
        // A drain that began while the upstream worked still gets its `Connection: close`.
        let keep_alive = keep_alive
            && resp_head.body != BodyLength::UntilClose
            && !self.shared.draining.load(Ordering::Relaxed);
        if !keep_alive {
            self.to_client.extend_from_slice(b"connection: close\r\n");
        }
        http1::write_header_map(&mut self.to_client, extra);
        self.to_client.extend_from_slice(b"\r\n");
        up.buf.consume(resp_head.len);
        let mut resp_body = BodyProgress::new(resp_head.body);
        let Ok(n) = resp_body.take(up.buf.bytes()) else {
            self.upstream = None;
            return (0, false);
        };
        self.to_client.extend_from_slice(&up.buf.bytes()[..n]);
        up.buf.consume(n);
        if self.client.write_all(&self.to_client).await.is_err() {
            self.upstream = None;
            return (0, false);
        }
        let relayed = relay(&mut up.io, &mut up.buf, &mut self.client, &mut resp_body).await;
        let upstream_clean = relayed.is_ok() && resp_head.reusable && up.buf.is_empty();
        up.reused = true;
        up.buf.release();
        if !upstream_clean {
            self.upstream = None;
        }
        (resp_head.status, keep_alive && relayed.is_ok())
    }

    async fn reply_status(&mut self, status: http::StatusCode) -> u16 {
        self.reply(&response::full(status, Bytes::new()), false, false)
            .await
    }

    /// Writes the request to the upstream (retrying once on a fresh connection when a reused one
    /// turns out closed before anything could have been processed) and reads the response head, whose
    /// rewrite is left in `to_client`.
    async fn send(
        &mut self,
        url: &Uri,
        method: &Method,
        expect_continue: bool,
        body: &mut BodyProgress,
        extra: &HeaderMap,
    ) -> Result<ResponseHead, Failure> {
        let pool = &self.shared.upstreams;
        let mut up = pool
            .connect(&mut self.upstream, url)
            .await
            .map_err(|_| Failure::Upstream)?;
        let mut streamed = false;
        loop {
            let retryable = up.reused && !streamed;
            let wrote = up.io.write_all(&self.to_upstream).await;
            if wrote.is_ok() && !body.done() {
                if expect_continue {
                    self.client
                        .write_all(b"HTTP/1.1 100 Continue\r\n\r\n")
                        .await
                        .map_err(|_| Failure::Client)?;
                }
                streamed = true;
                relay(&mut self.client, &mut self.inbuf, &mut up.io, body)
                    .await
                    .map_err(|side| match side {
                        Side::Read => Failure::Client,
                        Side::Write => Failure::Upstream,
                    })?;
            }
            let answered = if wrote.is_ok() {
                read_response_head(up, method, extra, &mut self.to_client).await
            } else {
                Err(Stale)
            };
            match answered {
                Ok(head) => return Ok(head),
                Err(Stale) if retryable => {
                    up = pool
                        .reconnect(&mut self.upstream, url)
                        .await
                        .map_err(|_| Failure::Upstream)?;
                }
                Err(Stale) => return Err(Failure::Upstream),
            }
        }
    }
}

/// The upstream closed or failed before a whole response head arrived.
struct Stale;

/// Reads the upstream's response head, skipping interim (1xx) responses.
async fn read_response_head(
    up: &mut UpstreamConn,
    method: &Method,
    extra: &HeaderMap,
    to_client: &mut Vec<u8>,
) -> Result<ResponseHead, Stale> {
    loop {
        if !up.buf.is_empty() {
            to_client.clear();
            match http1::parse_response(up.buf.bytes(), method, extra, to_client) {
                Ok(ResponseStart::Final(head)) => return Ok(head),
                Ok(ResponseStart::Interim(len)) => {
                    up.buf.consume(len);
                    continue;
                }
                Ok(ResponseStart::Partial) => {}
                Err(_) => return Err(Stale),
            }
        }
        match up.buf.read_from(&mut up.io).await {
            Ok(n) if n > 0 => {}
            _ => return Err(Stale),
        }
    }
}

/// `METHOD <base path><rest>[?query] HTTP/1.1`, then `Host` (the upstream's own).
fn upstream_head(out: &mut Vec<u8>, method: &Method, url: &Uri, rest: &[u8], query: Option<&[u8]>) {
    out.clear();
    out.extend_from_slice(method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(url.path().trim_end_matches('/').as_bytes());
    out.extend_from_slice(if rest.is_empty() { b"/" } else { rest });
    if let Some(q) = query {
        out.push(b'?');
        out.extend_from_slice(q);
    }
    out.extend_from_slice(b" HTTP/1.1\r\nhost: ");
    out.extend_from_slice(url.authority().map_or("", |a| a.as_str()).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Which side of a relay failed.
enum Side {
    Read,
    Write,
}

/// Copies the rest of a body from `from` to `to` through `buf` (empty on entry, except for bytes past
/// the body, which stay for the next message).
async fn relay(
    from: &mut TcpStream,
    buf: &mut InBuf,
    to: &mut TcpStream,
    body: &mut BodyProgress,
) -> Result<(), Side> {
    while !body.done() {
        match buf.read_from(from).await {
            Ok(0) if matches!(body, BodyProgress::UntilClose) => return Ok(()),
            Ok(n) if n > 0 => {}
            _ => return Err(Side::Read),
        }
        let n = body.take(buf.bytes()).map_err(|_| Side::Read)?;
        to.write_all(&buf.bytes()[..n])
            .await
            .map_err(|_| Side::Write)?;
        buf.consume(n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_head_joins_base_path_rest_and_query() {
        let mut out = Vec::new();
        let head = |out: &mut Vec<u8>, url: &str, rest: &str, q: Option<&str>| {
            let url: Uri = url.parse().unwrap();
            upstream_head(
                out,
                &Method::GET,
                &url,
                rest.as_bytes(),
                q.map(str::as_bytes),
            );
            String::from_utf8(out.clone()).unwrap()
        };
        assert_eq!(
            head(&mut out, "http://127.0.0.1:9000", "/a/b", Some("x=1")),
            "GET /a/b?x=1 HTTP/1.1\r\nhost: 127.0.0.1:9000\r\n"
        );
        assert_eq!(
            head(&mut out, "http://h:1/api/", "/a", None),
            "GET /api/a HTTP/1.1\r\nhost: h:1\r\n"
        );
        assert_eq!(
            head(&mut out, "http://h:1/api/", "", None),
            "GET /api/ HTTP/1.1\r\nhost: h:1\r\n"
        );
    }
}
