//! One client connection: read a request head, run the exchange's phases (route, admit, answer,
//! log; see [`Conn::exchange`]), and go on while keep-alive holds. Everything a request needs lives
//! in buffers this task owns and reuses, so the common exchange allocates nothing.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Response, Uri};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::futures::OwnedNotified;
use tokio::time::{Instant, Sleep};

use crate::access_log::Record;
use crate::admit::{Admission, Credentials, Refused, admit_caller};
use crate::client::{ClientIo, Protocol, write_all_progressing};
use crate::config::{Cors, GatewayConfig, Integration, Route, UpstreamTls};
use crate::forward::{Failure, Relayed, Stale, read_response_head, respond, upload, upstream_head};
use crate::http1::{self, BodyLength, BodyProgress, HeadError, InBuf, RequestHead};
use crate::metrics::Decision;
use crate::path::{self, PathError};
use crate::proxy::{self, UpstreamConn};
use crate::response::{self, UpstreamFailure};
use crate::rewrite;
use crate::route::RouteMatch;
use crate::snapshot::Snapshot;
use crate::state::Shared;
use crate::tls::TlsInfo;
use crate::trace::RequestId;
use crate::verify::{self, Proxy};

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

/// Serves one client connection until it closes, errs, idles out, or the gateway drains. Returns
/// the connection and the bytes read from it when it opened with the HTTP/2 preface instead, for
/// the HTTP/2 server to take over.
///
/// With `role` [`Role::Verify`], each request is a decision request from another proxy.
pub(crate) async fn serve<C: ClientIo>(
    shared: Arc<Shared>,
    client: C,
    peer: SocketAddr,
    tls: Option<TlsInfo>,
    role: Role,
) -> Option<(C, Vec<u8>)> {
    // Enabled before the first look at `draining`, so a drain signalled after that look wakes it.
    let mut stop = Box::pin(shared.stop.clone().notified_owned());
    stop.as_mut().enable();
    let now = Instant::now();
    let mut conn = Conn {
        shared: &shared,
        client,
        peer_ip: peer.ip().to_string(),
        tls,
        inbuf: InBuf::default(),
        forwarded: Vec::new(),
        to_upstream: Vec::new(),
        to_client: Vec::new(),
        path_buf: Vec::new(),
        upstream: None,
        head_deadline: LazyDeadline::new(now + shared.head_timeout),
        upstream_deadline: None,
        stop,
        upstream_answer: None,
        failure: None,
        role,
    };
    let http2 = conn.run().await;
    if let Some(up) = conn.upstream.take() {
        shared.upstreams.put(up);
    }
    http2.then(|| (conn.client, conn.inbuf.bytes().to_vec()))
}

struct Conn<'a, C> {
    shared: &'a Shared,
    client: C,
    peer_ip: String,
    /// What the TLS handshake settled, on a TLS connection.
    tls: Option<TlsInfo>,
    /// Bytes from the client not yet handled.
    inbuf: InBuf,
    /// The current request's header lines as they go upstream.
    forwarded: Vec<u8>,
    /// The current request as it goes upstream (kept until answered, for a retry).
    to_upstream: Vec<u8>,
    /// The current response as it goes to the client.
    to_client: Vec<u8>,
    /// The current request's path, when it had to be normalised.
    path_buf: Vec<u8>,
    upstream: Option<UpstreamConn>,
    head_deadline: LazyDeadline,
    /// Made on the first forwarded request.
    upstream_deadline: Option<LazyDeadline>,
    /// Wakes an idle connection when the gateway drains.
    stop: Pin<Box<OwnedNotified>>,
    /// The last forwarded request's answer from the upstream: its status and declared body length.
    upstream_answer: Option<(u16, Option<u64>)>,
    /// Why the last forwarding failed: AWS's message and gateway response type.
    failure: Option<(&'static str, &'static str)>,
    role: Role,
}

/// What a connection's requests are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Role {
    /// Requests to admit and forward (the data plane).
    Proxy,
    /// Decision requests: admit the original request they describe, and say so ([`crate::verify`]).
    Verify,
}

impl<C: ClientIo> Conn<'_, C> {
    /// Serves requests until the connection ends; true when it turned out to open with the HTTP/2
    /// preface (and HTTP/2 is on).
    async fn run(&mut self) -> bool {
        let mut first = true;
        loop {
            let head = match self.read_head().await {
                Ok(Some(head)) => head,
                Ok(None) => return false,
                // Not an HTTP/1 request line, so this costs HTTP/1 nothing.
                Err(_)
                    if first
                        && C::PRIOR_KNOWLEDGE
                        && self.shared.http2.is_some()
                        && self.inbuf.bytes().starts_with(http1::HTTP2_PREFACE_START) =>
                {
                    return true;
                }
                Err(err) => {
                    self.to_client.clear();
                    let resp = response::bad_request(err);
                    let id = RequestId::new();
                    http1::encode_response(&resp, false, false, &id, &mut self.to_client);
                    let idle = self.shared.head_timeout;
                    let _ = write_all_progressing(&mut self.client, &self.to_client, idle).await;
                    return false;
                }
            };
            first = false;
            if !self.exchange(head).await {
                return false;
            }
        }
    }

    /// The next request head, or `None` when the client closed, idled out, or the gateway drains.
    async fn read_head(&mut self) -> Result<Option<RequestHead>, HeadError> {
        self.head_deadline
            .set(Instant::now() + self.shared.head_timeout);
        let kept = self.shared.kept_fields;
        loop {
            if !self.inbuf.is_empty() {
                let parsed = rewrite::request_head(
                    self.inbuf.bytes(),
                    &mut self.forwarded,
                    &self.peer_ip,
                    C::SCHEME,
                    kept,
                )?;
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
                        std::future::poll_fn(|cx| client.poll_readable(cx)).await?;
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

    /// Answers one request; returns whether the connection stays open. The phases, in order:
    /// route (the path normalised, matched, and the route's rules on paths and bodies), admit (key,
    /// throttles, quota, meter), answer (what to send: the upstream's answer, a mock, a preflight or
    /// a refusal), send, log.
    async fn exchange(&mut self, head: RequestHead) -> bool {
        let shared = self.shared;
        let _in_flight = shared.metrics.request_started();
        let snap = self.shared.snapshot.load_full();
        let mut ex = self.begin(&snap, head);
        let verify = match (self.role, &ex.config.verify) {
            (Role::Verify, Some(settings)) => Some(verify::take_original(
                self.inbuf.bytes(),
                &mut ex.head,
                settings,
                self.shared.kept_fields,
            )),
            _ => None,
        };
        let original = match verify {
            Some(Err(bad)) => Err(bad),
            _ => self.route(&snap, &mut ex),
        };
        let answer = match original {
            Err(bad) => {
                ex.error = Some(response::bad_request_error(bad));
                Answer::Respond(response::bad_request(bad))
            }
            Ok(matched) => {
                ex.matched = matched;
                let (decided, decision) = self.admit(&snap, &mut ex, matched).await;
                ex.decision = Some(decision);
                match decided {
                    Ok(admission) => self.answer(&mut ex, matched, admission),
                    Err(refused) => self.refuse(&mut ex, refused),
                }
            }
        };
        // Sent from here, not from a phase of its own: the forwarding future is the largest, and
        // each async layer around it costs a copy of it per request.
        let mut sent = None;
        let status = match answer {
            Answer::Forward(to, extra) => {
                sent = Some(shared.clock.now());
                let (status, keep_alive) = self.forward(&ex.head, &to, &extra, ex.keep_alive).await;
                ex.keep_alive = keep_alive;
                ex.error = self.failure;
                status
            }
            Answer::Respond(mut resp) => {
                // Only the decision endpoint's answers to nginx are reshaped; the data plane pays a
                // comparison.
                if self.role == Role::Verify
                    && ex.config.verify.as_ref().map(|v| v.proxy) == Some(Proxy::Nginx)
                {
                    resp = verify::for_nginx(resp, ex.error.map_or("", |e| e.0));
                }
                ex.response_length = Some(if ex.head_only {
                    0
                } else {
                    resp.body().len() as u64
                });
                self.reply_gateway(&mut ex, &resp).await
            }
        };
        if status != 0 {
            // The clock's readings, not the monotonic clock's: the exchange began with one.
            let end = shared.clock.now();
            let secs = |from: u64| end.saturating_sub(from) as f64 / 1e9;
            let integration = sent.map(secs);
            ex.integration_ms = integration.map(|s| (s * 1e3) as u64);
            let m = ex.matched;
            let how = (C::SCHEME, Self::protocol(&ex));
            shared
                .metrics
                .observe(m, &ex.head.method, how, status, secs(ex.now), integration);
        }
        self.finish(&ex, status)
    }

    /// The HTTP version the request came in.
    fn protocol(ex: &Exchange<'_>) -> Protocol {
        if ex.head.http10 {
            Protocol::Http10
        } else {
            C::PROTOCOL
        }
    }

    /// What every phase needs to know about the request, read once.
    fn begin<'s>(&self, snap: &'s Snapshot, head: RequestHead) -> Exchange<'s> {
        let config = snap.config();
        Exchange {
            config,
            id: RequestId::new(),
            now: self.shared.clock.now(),
            keep_alive: head.keep_alive && !self.shared.draining.load(Ordering::Relaxed),
            head_only: head.method == Method::HEAD,
            started: config.access_log.is_some().then(std::time::Instant::now),
            log_path: None,
            user_agent: None,
            matched: None,
            error: None,
            response_length: None,
            integration_ms: None,
            normalized: false,
            cors: None,
            origin: None,
            key_id: None,
            decision: None,
            subject: None,
            head,
        }
    }

    /// Phase 1, route. The path is normalised before anything looks at it, and the normalised path
    /// is what is routed and forwarded; a `..` may not climb out of the stage the request addressed.
    /// `Ok(None)`: no route matched (admission refuses that).
    fn route<'s>(
        &mut self,
        snap: &'s Snapshot,
        ex: &mut Exchange<'s>,
    ) -> Result<Option<RouteMatch>, HeadError> {
        if ex.started.is_some() {
            ex.user_agent = ex
                .head
                .user_agent
                .clone()
                .map(|r| String::from_utf8_lossy(&self.inbuf.bytes()[r]).into_owned());
        }
        let raw = &self.inbuf.bytes()[ex.head.path.clone()];
        let facts = match path::normalize(raw, &mut self.path_buf) {
            Ok(Some(facts)) if facts.min_depth < snap.base_depth(raw) => Err(PathError::AboveBase),
            other => other,
        };
        let facts = match facts {
            Ok(facts) => facts,
            Err(e) => {
                if ex.started.is_some() {
                    ex.log_path = Some(String::from_utf8_lossy(raw).into_owned());
                }
                return Err(e.into());
            }
        };
        ex.normalized = facts.is_some();
        let path = routed_path(&self.inbuf, &self.path_buf, ex);
        if ex.started.is_some() {
            ex.log_path = Some(path.to_owned());
        }
        let Some(m) = snap.route(&ex.head.method, path) else {
            return Ok(None);
        };
        let api = &ex.config.apis[m.api];
        let route = &api.routes[m.route];
        match facts {
            Some(facts) if facts.encoded_slash && !api.allow_encoded_slashes => {
                return Err(PathError::EncodedSlash.into());
            }
            Some(facts) if facts.min_depth < path::depth(&api.stages[m.stage].base_path) => {
                return Err(PathError::AboveBase.into());
            }
            _ => check_body(&ex.head, route, ex.config.max_request_body)?,
        }
        ex.cors = route.cors.as_deref();
        ex.origin = ex
            .cors
            .and(ex.head.origin.clone())
            .and_then(|r| HeaderValue::from_bytes(&self.inbuf.bytes()[r]).ok());
        Ok(Some(m))
    }

    /// Phase 2, admit ([`crate::admit`]): who is calling, and whether it may; told as a
    /// [`Decision`] for the access log.
    async fn admit<'s>(
        &self,
        snap: &'s Snapshot,
        ex: &mut Exchange<'s>,
        m: Option<RouteMatch>,
    ) -> (Result<Admission<'s>, Refused<'s>>, Decision) {
        let bytes = self.inbuf.bytes();
        let credentials = Credentials {
            api_key: ex.head.api_key.clone().map(|r| &bytes[r]),
            authorization: ex.head.authorization.clone().map(|r| &bytes[r]),
        };
        let shared = self.shared;
        let decided = admit_caller(
            snap,
            shared.limiter.as_ref(),
            &shared.metrics,
            ex.id.as_str(),
            m,
            credentials,
            ex.now,
        )
        .await;
        ex.subject = decided.subject;
        (decided.outcome, decided.decision)
    }

    /// Phase 3, answer an admitted request: forward it to the upstream, or answer with the route's
    /// mock or preflight; either way with the RateLimit and CORS headers.
    fn answer<'s>(
        &mut self,
        ex: &mut Exchange<'s>,
        m: Option<RouteMatch>,
        admission: Admission<'s>,
    ) -> Answer<'s> {
        ex.key_id = admission.grant.map(|g| g.key_id);
        let mut extra = HeaderMap::new();
        if ex.config.rate_limit_headers {
            response::add_rate_limit_headers(&mut extra, &admission.limits);
        }
        if self.role == Role::Verify {
            return Answer::Respond(verify::allowed(extra, ex.key_id));
        }
        if let Some(cors) = ex.cors {
            response::add_cors_headers(&mut extra, cors, ex.origin.as_ref());
        }
        match &admission.route.integration {
            Integration::Http { url, timeout, tls } => {
                self.upstream_request(ex, m, url);
                let to = Forward {
                    url,
                    tls: tls.as_ref(),
                    timeout: *timeout,
                    body_limit: ex.config.max_request_body,
                    id: ex.id,
                };
                Answer::Forward(to, extra)
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
                Answer::Respond(resp)
            }
            Integration::Preflight { methods } => {
                let mut resp = response::preflight(ex.cors, methods, ex.origin.as_ref());
                resp.headers_mut().extend(extra);
                Answer::Respond(resp)
            }
        }
    }

    /// Phase 3, answer a refused request: AWS's error, with the RateLimit and CORS headers.
    fn refuse<'s>(&self, ex: &mut Exchange<'s>, refused: Refused<'s>) -> Answer<'s> {
        let refusal = refused.refusal;
        ex.key_id = refused.grant.map(|g| g.key_id);
        ex.error = Some(response::refusal_error(&refusal));
        let mut resp = response::refusal(refusal, ex.config.rate_limit_headers);
        if let Some(cors) = ex.cors {
            response::add_cors_headers(resp.headers_mut(), cors, ex.origin.as_ref());
        }
        Answer::Respond(resp)
    }

    /// Phase 4, log: the access-log line, when the access log is on; returns whether the
    /// connection stays open.
    fn finish(&mut self, ex: &Exchange<'_>, status: u16) -> bool {
        if self.path_buf.capacity() > MAX_KEPT_PATH {
            self.path_buf = Vec::new();
        }
        if let (Some(started), Some(path), Some((log, sink))) = (
            ex.started,
            &ex.log_path,
            ex.config
                .access_log
                .as_ref()
                .zip(self.shared.access_log.as_ref()),
        ) {
            let m = ex.matched.map(|m| {
                let api = &ex.config.apis[m.api];
                (api, &api.stages[m.stage], &api.routes[m.route])
            });
            let (response_length, integration_status) = match self.upstream_answer {
                Some((status, length)) if ex.integration_ms.is_some() => (length, Some(status)),
                _ => (ex.response_length, None),
            };
            let record = Record {
                request_id: ex.id.as_str(),
                start_nanos: ex.now,
                http_method: ex.head.method.as_str(),
                resource_path: m.map(|(_, _, route)| route.path.as_str()),
                path,
                stage: m.map(|(_, stage, _)| stage.name.as_str()),
                api_id: m.map(|(api, _, _)| api.id.as_str()),
                status,
                response_length,
                response_latency_ms: started.elapsed().as_millis() as u64,
                integration_latency_ms: ex.integration_ms,
                integration_status,
                source_ip: &self.peer_ip,
                user_agent: ex.user_agent.as_deref(),
                // The key's id only: values are secrets and never logged.
                api_key_id: ex.key_id,
                error_message: ex.error.map(|e| e.0),
                error_response_type: ex.error.map(|e| e.1),
                protocol: Self::protocol(ex).name(),
                tls_version: self.tls.as_ref().map(|t| t.version),
                client_cert_subject: self.tls.as_ref().and_then(|t| t.client_subject.as_deref()),
                decision: ex.decision.map(Decision::name),
            };
            let mut line = String::with_capacity(512);
            log.format.render(&record, &mut line);
            if !sink.send(line) {
                self.shared.metrics.access_log_dropped();
            }
        }
        ex.keep_alive && status != 0
    }

    /// The request as it goes upstream, into `to_upstream`: the route's URL joined with the routed
    /// path after the stage's base path and the client's query, the rewritten fields, and the
    /// body's framing.
    fn upstream_request(&mut self, ex: &Exchange<'_>, m: Option<RouteMatch>, url: &Uri) {
        let path = routed_path(&self.inbuf, &self.path_buf, ex);
        let rest = m.map_or(path, |m| m.rest(path)).as_bytes();
        let query = ex.head.query.clone().map(|q| &self.inbuf.bytes()[q]);
        let out = &mut self.to_upstream;
        upstream_head(out, &ex.head.method, url, rest, query);
        out.extend_from_slice(&self.forwarded);
        let field = |r: Option<std::ops::Range<usize>>| r.map(|r| &self.inbuf.bytes()[r]);
        let (parent, state) = (
            field(ex.head.traceparent.clone()),
            field(ex.head.tracestate.clone()),
        );
        ex.id.upstream_fields(parent, state, out);
        // Verified, so backends need not verify again; a value that could not be a field is left out.
        if let Some(subject) = ex
            .subject
            .as_deref()
            .filter(|s| s.bytes().all(|b| b == b'\t' || (b' '..=b'~').contains(&b)))
        {
            http1::header_line(out, b"x-tollgate-subject", subject.as_bytes());
        }
        http1::framing_line(out, ex.head.body);
        out.extend_from_slice(b"\r\n");
    }

    /// Consumes the request (head and body) when its body has fully arrived; false when it has not,
    /// and the connection must close instead.
    fn skip_body(&mut self, head: &RequestHead) -> bool {
        self.inbuf.consume(head.len);
        let mut body = BodyProgress::new(head.body);
        match body.take(self.inbuf.bytes(), None) {
            Ok(n) => self.inbuf.consume(n),
            Err(_) => return false,
        }
        body.done()
    }

    /// Writes a response the gateway made instead of the upstream, closing the connection after it
    /// when the request's body is not all in hand; returns its status, 0 when the client is gone.
    async fn reply_gateway(&mut self, ex: &mut Exchange<'_>, resp: &Response<Bytes>) -> u16 {
        ex.keep_alive = self.skip_body(&ex.head) && ex.keep_alive;
        self.reply(resp, ex.head_only, ex.keep_alive, &ex.id).await
    }

    /// Writes a response the gateway made; returns its status, or 0 when the client is gone.
    async fn reply(
        &mut self,
        resp: &Response<Bytes>,
        head_only: bool,
        keep_alive: bool,
        id: &RequestId,
    ) -> u16 {
        self.to_client.clear();
        http1::encode_response(resp, head_only, keep_alive, id, &mut self.to_client);
        let idle = self.shared.head_timeout;
        match write_all_progressing(&mut self.client, &self.to_client, idle).await {
            Ok(()) => resp.status().as_u16(),
            Err(_) => 0,
        }
    }

    /// Sends the request in `to_upstream` (head, then body) to the upstream and relays the answer.
    /// Returns the status sent (0 if the client got nothing more) and whether the client connection
    /// stays open.
    async fn forward(
        &mut self,
        head: &RequestHead,
        to: &Forward<'_>,
        extra: &HeaderMap,
        keep_alive: bool,
    ) -> (u16, bool) {
        let head_only = head.method == Method::HEAD;
        self.upstream_answer = None;
        self.failure = None;
        self.inbuf.consume(head.len);
        let mut body = BodyProgress::with_limit(head.body, to.body_limit);
        match body.take(self.inbuf.bytes(), Some(&mut self.to_upstream)) {
            Ok(n) => self.inbuf.consume(n),
            Err(e) => {
                self.failure = Some(response::bad_request_error(e));
                return (
                    self.reply(&response::bad_request(e), head_only, false, &to.id)
                        .await,
                    false,
                );
            }
        }
        let mut timer = match self.upstream_deadline.take() {
            Some(timer) => timer,
            None => LazyDeadline::new(Instant::now() + to.timeout),
        };
        let proxied = self
            .proxy(head, to, &mut timer, &mut body, extra, keep_alive)
            .await;
        self.upstream_deadline = Some(timer);
        match proxied {
            Ok(done) => done,
            Err(Failure::Client) => {
                self.upstream = None;
                (0, false)
            }
            Err(failure) => {
                self.upstream = None;
                let (resp, error) = match failure {
                    Failure::Body(e) => (response::bad_request(e), response::bad_request_error(e)),
                    Failure::Timeout => (
                        response::upstream_failure(UpstreamFailure::Timeout),
                        response::upstream_failure_error(UpstreamFailure::Timeout),
                    ),
                    Failure::Upstream | Failure::Client => (
                        response::upstream_failure(UpstreamFailure::Unreachable),
                        response::upstream_failure_error(UpstreamFailure::Unreachable),
                    ),
                };
                self.failure = Some(error);
                // A request body cut short leaves the client's stream mid-message.
                let keep_alive = keep_alive && body.done();
                let status = self.reply(&resp, head_only, keep_alive, &to.id).await;
                (status, keep_alive)
            }
        }
    }

    /// Writes the request to the upstream (retrying once on a fresh connection when a reused one
    /// turns out closed and no body has been streamed) and relays the answer. A body still to come
    /// streams while the answer is awaited; an upstream may answer before it has the whole body (an
    /// early error, or a server streaming both ways): its answer is relayed while the body keeps
    /// flowing, and then both connections close.
    ///
    /// The route's timeout bounds connecting, each write to the upstream, and the wait for the
    /// response head, which counts from the end of the body: a slow upload is not the upstream's
    /// delay. An error before anything reached the client is returned, for the caller to answer.
    async fn proxy(
        &mut self,
        head: &RequestHead,
        to: &Forward<'_>,
        timer: &mut LazyDeadline,
        body: &mut BodyProgress,
        extra: &HeaderMap,
        keep_alive: bool,
    ) -> Result<(u16, bool), Failure> {
        let shared = self.shared;
        let streaming = !body.done();
        let mut fresh = false;
        let (clean, done) = loop {
            timer.set(Instant::now() + to.timeout);
            if fresh || !shared.upstreams.reuse(&mut self.upstream, to.url, to.tls) {
                tokio::select! {
                    biased;
                    opened = shared.upstreams.open(&mut self.upstream, to.url, to.tls) => {
                        opened.map_err(|e| {
                            // The why (refused, a certificate that does not verify, …) is only
                            // here: the client gets AWS's 502.
                            tracing::warn!(request_id = %to.id, upstream = %to.url, error = %e,
                                "upstream connection failed");
                            Failure::Upstream
                        })?;
                    }
                    () = timer.expired() => return Err(Failure::Timeout),
                }
            }
            let Some(up) = self.upstream.as_mut() else {
                return Err(Failure::Upstream);
            };
            up.carried_body |= head.body != BodyLength::Empty;
            // A streamed body cannot be sent twice.
            let retryable = up.reused && !streaming;
            let answered = if streaming {
                let (mut client_read, mut client_write) = self.client.halves();
                if head.expect_continue {
                    let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
                    write_all_progressing(&mut client_write, interim, shared.head_timeout)
                        .await
                        .map_err(|_| Failure::Client)?;
                }
                let (mut up_read, mut up_write) = proxy::halves(&mut up.io);
                let written = tokio::select! {
                    biased;
                    w = up_write.write_all(&self.to_upstream) => w.is_ok(),
                    () = timer.expired() => return Err(Failure::Timeout),
                };
                if !written {
                    return Err(Failure::Upstream);
                }
                let mut uploaded = false;
                let mut upload = std::pin::pin!(upload(
                    &mut client_read,
                    &mut self.inbuf,
                    &mut up_write,
                    body,
                    shared.head_timeout,
                    to.timeout,
                ));
                // Until the response head: the upload, then the route's timeout.
                let answered = {
                    let mut waiting = std::pin::pin!(read_response_head(
                        &mut up_read,
                        &mut up.buf,
                        &head.method,
                        (extra, &to.id),
                        &mut self.to_client,
                    ));
                    loop {
                        tokio::select! {
                            biased;
                            r = &mut upload, if !uploaded => {
                                r?;
                                uploaded = true;
                                timer.set(Instant::now() + to.timeout);
                            }
                            h = &mut waiting => break h,
                            () = timer.expired(), if uploaded => return Err(Failure::Timeout),
                        }
                    }
                };
                let Ok(resp_head) = answered else {
                    return Err(Failure::Upstream);
                };
                // The answer, while whatever is left of the body keeps flowing.
                let early = !uploaded;
                let keep_alive = !early && keep_alive && shared.keeps_alive(&resp_head);
                let mut responding = std::pin::pin!(respond(
                    &mut client_write,
                    &mut self.to_client,
                    &mut up_read,
                    &mut up.buf,
                    &resp_head,
                    (extra, keep_alive),
                    shared.head_timeout,
                ));
                let relayed = loop {
                    tokio::select! {
                        biased;
                        r = &mut responding => break r,
                        // Its failure ends the exchange anyway: both connections close.
                        _ = &mut upload, if !uploaded => uploaded = true,
                    }
                };
                Ok((resp_head, early, keep_alive, relayed))
            } else {
                // The whole request is in hand: out it goes, then the answer, within the timeout.
                let exchanged = tokio::select! {
                    biased;
                    h = async {
                        up.io.write_all(&self.to_upstream).await.map_err(|_| Stale)?;
                        let to_client = &mut self.to_client;
                        let added = (extra, &to.id);
                        read_response_head(&mut up.io, &mut up.buf, &head.method, added, to_client)
                            .await
                    } => h,
                    () = timer.expired() => return Err(Failure::Timeout),
                };
                match exchanged {
                    Ok(resp_head) => {
                        let keep_alive = keep_alive && shared.keeps_alive(&resp_head);
                        let relayed = respond(
                            &mut self.client,
                            &mut self.to_client,
                            &mut up.io,
                            &mut up.buf,
                            &resp_head,
                            (extra, keep_alive),
                            shared.head_timeout,
                        )
                        .await;
                        Ok((resp_head, false, keep_alive, relayed))
                    }
                    Err(Stale) => Err(()),
                }
            };
            let (resp_head, early, keep_alive, relayed) = match answered {
                Ok(done) => {
                    let length = match done.0.body {
                        BodyLength::Empty => Some(0),
                        BodyLength::Length(n) => Some(n),
                        BodyLength::Chunked | BodyLength::UntilClose => None,
                    };
                    self.upstream_answer = Some((done.0.status, length));
                    done
                }
                Err(()) if retryable => {
                    fresh = true;
                    continue;
                }
                Err(()) => return Err(Failure::Upstream),
            };
            // Reused only after a clean exchange: the whole request sent before the answer came,
            // the answer completely framed, and not one byte after it.
            let whole = relayed == Relayed::Whole;
            let clean = whole && !early && resp_head.reusable && up.buf.is_empty();
            up.reused = true;
            up.buf.release();
            let status = match relayed {
                Relayed::Whole | Relayed::HeadOnly => resp_head.status,
                Relayed::Nothing => 0,
            };
            break (clean, (status, keep_alive && whole));
        };
        if !clean {
            self.upstream = None;
        }
        Ok(done)
    }
}

/// Where an admitted request goes.
struct Forward<'r> {
    url: &'r Uri,
    /// For an `https` upstream.
    tls: Option<&'r UpstreamTls>,
    /// The route's timeout.
    timeout: Duration,
    /// The most request body bytes accepted.
    body_limit: u64,
    /// The request's id, for the answer and the logs.
    id: RequestId,
}

/// What the phases of one exchange share.
struct Exchange<'s> {
    head: RequestHead,
    config: &'s GatewayConfig,
    /// The request's `x-amzn-RequestId`.
    id: RequestId,
    /// The clock's reading admission uses.
    now: u64,
    keep_alive: bool,
    head_only: bool,
    /// When the access log is on: when the exchange started, and the path it logs.
    started: Option<std::time::Instant>,
    log_path: Option<String>,
    /// The client's `User-Agent`, when the access log is on.
    user_agent: Option<String>,
    /// The route it matched.
    matched: Option<RouteMatch>,
    /// Why it was refused or failed: AWS's message and gateway response type.
    error: Option<(&'static str, &'static str)>,
    /// The body length of an answer the gateway wrote.
    response_length: Option<u64>,
    /// How long forwarding took.
    integration_ms: Option<u64>,
    /// Whether the path routed and forwarded is the normalised one in `path_buf` (else the
    /// client's own).
    normalized: bool,
    /// The matched route's CORS settings, and the client's `Origin` when they apply.
    cors: Option<&'s Cors>,
    origin: Option<HeaderValue>,
    /// The key's id, once admission accepted the key.
    key_id: Option<&'s str>,
    /// What admission decided.
    decision: Option<Decision>,
    /// A JWT caller's identifying claim (or, when the claim is the key's value, the key's id),
    /// forwarded as `X-Tollgate-Subject`.
    subject: Option<String>,
}

/// What an exchange sends back.
enum Answer<'s> {
    /// The upstream's answer to the request in `to_upstream`, with these fields added.
    Forward(Forward<'s>, HeaderMap),
    /// The gateway's own answer: a mock, a preflight, a refusal, or the error for a request that
    /// could not be accepted.
    Respond(Response<Bytes>),
}

/// The path routed and forwarded: the client's own, or its normalised form. ASCII either way: a
/// canonical path holds only RFC 3986 path characters.
fn routed_path<'b>(inbuf: &'b InBuf, path_buf: &'b [u8], ex: &Exchange<'_>) -> &'b str {
    let path = if ex.normalized {
        path_buf
    } else {
        &inbuf.bytes()[ex.head.path.clone()]
    };
    std::str::from_utf8(path).unwrap_or("")
}

/// The longest normalised path whose buffer a connection keeps between requests.
const MAX_KEPT_PATH: usize = 4096;

/// Refuses a body `route` does not take: one on `GET` or `HEAD` (where a request hidden in it would
/// reach a backend that does not read such bodies) unless the route allows it, and one longer than
/// `limit`.
fn check_body(head: &RequestHead, route: &Route, limit: u64) -> Result<(), HeadError> {
    if head.body != BodyLength::Empty
        && (head.method == Method::GET || head.method == Method::HEAD)
        && !route.allow_get_body
    {
        return Err(HeadError::Malformed(
            "A body is not allowed on GET or HEAD requests",
        ));
    }
    match head.body {
        BodyLength::Length(n) if n > limit => Err(HeadError::BodyTooLarge),
        _ => Ok(()),
    }
}
