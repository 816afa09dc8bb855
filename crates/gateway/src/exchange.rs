//! One exchange, whatever protocol the client speaks: the phases route (the path normalised and
//! matched, the route's rules on paths and bodies), admit (identity, throttles, quota, meter; see
//! [`crate::admit`]), answer (the upstream's answer, a mock, a preflight, a refusal, or a decision for
//! the proxy asking), send, and log.
//!
//! The phases are written once, over a [`Session`]: the client side that reads the request's body and
//! writes the answer. HTTP/1.1 ([`crate::conn`]) and each HTTP/2 stream ([`crate::h2`]) are sessions;
//! both hand over a [`RequestHead`] parsed by the one parser, with its bytes in [`Pipeline::inbuf`].

use bytes::Bytes;
use std::net::IpAddr;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use http::{HeaderMap, HeaderValue, Method, Response, Uri};

use crate::access_log::Record;
use crate::admit::{Admission, Credentials, Refused, admit_caller};
use crate::client::Protocol;
use crate::client_ip::ClientAddress;
use crate::config::{Cors, GatewayConfig, Integration, Route};
use crate::forward::{Forward, upstream_head};
use crate::http1::{self, BodyLength, HeadError, InBuf, RequestHead};
use crate::metrics::Decision;
use crate::path::{self, PathError};
use crate::response;
use crate::route::RouteMatch;
use crate::snapshot::Snapshot;
use crate::state::Shared;
use crate::tls::TlsInfo;
use crate::trace::RequestId;
use crate::verify::{self, Proxy};

/// The client side of an exchange: how the request's body is read and the answer written.
pub(crate) trait Session {
    /// `http` or `https`: what `X-Forwarded-Proto` tells the upstream.
    const SCHEME: &'static str;
    /// The protocol the client speaks (HTTP/1.0 is told by the request).
    const PROTOCOL: Protocol;

    /// Sends the gateway's own answer `resp` (the request's body, if any, is not forwarded); returns
    /// its status, or 0 when the client is gone. May clear `ex.keep_alive`.
    async fn reply(
        &mut self,
        p: &mut Pipeline<'_>,
        ex: &mut Exchange<'_>,
        resp: &Response<Bytes>,
    ) -> u16;

    /// Sends the request in [`Pipeline::to_upstream`], then its body, to the upstream and relays the
    /// answer with the `extra` fields, setting [`Pipeline::upstream_answer`] (once an answer came)
    /// and [`Pipeline::failure`] (when forwarding failed). Returns the status sent (0 if the client got nothing more) and
    /// whether the client connection stays open.
    async fn forward(
        &mut self,
        p: &mut Pipeline<'_>,
        ex: &Exchange<'_>,
        to: &Forward<'_>,
        extra: &HeaderMap,
    ) -> (u16, bool);
}

/// What a connection's (or a stream's) exchanges keep, reused from one request to the next.
pub(crate) struct Pipeline<'a> {
    pub(crate) shared: &'a Shared,
    /// The socket's peer.
    peer: IpAddr,
    /// The peer's address, as `X-Forwarded-For` and the access log tell it.
    pub(crate) peer_ip: Arc<str>,
    /// What the TLS handshake settled, on a TLS connection.
    pub(crate) tls: Option<TlsInfo>,
    /// Bytes from the client not yet handled: the request head (parsed in place) and what follows.
    pub(crate) inbuf: InBuf,
    /// The current request's header lines as they go upstream.
    pub(crate) forwarded: Vec<u8>,
    /// Where its `X-Forwarded-For` chain sits in [`Pipeline::forwarded`].
    forwarded_for: Range<usize>,
    /// The current request's head as it goes upstream (kept until answered, for a retry).
    pub(crate) to_upstream: Vec<u8>,
    /// The current request's path, when it had to be normalised.
    path_buf: Vec<u8>,
    /// The last forwarded request's answer from the upstream: its status and declared body length.
    pub(crate) upstream_answer: Option<(u16, Option<u64>)>,
    /// Why the last forwarding failed: AWS's message and gateway response type.
    pub(crate) failure: Option<(&'static str, &'static str)>,
    endpoint: Endpoint,
}

/// What a listener's requests are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Endpoint {
    /// Requests to admit and forward (the data plane).
    Proxy,
    /// Decision requests: admit the original request they describe, and say so ([`crate::verify`]).
    Decide,
}

impl<'a> Pipeline<'a> {
    pub(crate) fn new(
        shared: &'a Shared,
        peer: IpAddr,
        peer_ip: Arc<str>,
        tls: Option<TlsInfo>,
        endpoint: Endpoint,
    ) -> Self {
        Self {
            shared,
            peer,
            peer_ip,
            forwarded_for: 0..0,
            tls,
            inbuf: InBuf::default(),
            // Sized for a common request, so that building one does not grow them step by step.
            forwarded: Vec::with_capacity(1024),
            to_upstream: Vec::with_capacity(2048),
            path_buf: Vec::new(),
            upstream_answer: None,
            failure: None,
            endpoint,
        }
    }

    /// Where the current request came from (see [`crate::client_ip`]).
    fn client<'p>(&'p self, config: &'p GatewayConfig) -> ClientAddress<'p> {
        ClientAddress {
            peer: self.peer,
            chain: self
                .forwarded
                .get(self.forwarded_for.clone())
                .unwrap_or_default(),
            trusted: config.trusted_proxies.as_ref(),
            vouched: self.endpoint == Endpoint::Decide,
        }
    }

    /// Parses the request head at the start of [`Pipeline::inbuf`] (`Ok(None)`: incomplete), with
    /// its fields for the upstream into [`Pipeline::forwarded`].
    pub(crate) fn parse_head<S: Session>(&mut self) -> Result<Option<RequestHead>, HeadError> {
        crate::rewrite::request_head(
            self.inbuf.bytes(),
            &mut self.forwarded,
            &mut self.forwarded_for,
            &self.peer_ip,
            S::SCHEME,
            self.shared.kept_fields,
        )
    }
}

/// Answers one request over `session`; returns whether the connection stays open.
pub(crate) async fn exchange<S: Session>(
    session: &mut S,
    p: &mut Pipeline<'_>,
    head: RequestHead,
) -> bool {
    let shared = p.shared;
    let _in_flight = shared.metrics.request_started();
    let snap = shared.snapshot.load_full();
    let mut ex = p.begin(&snap, head);
    let answer = match p.endpoint {
        Endpoint::Decide => p.decide(&snap, &mut ex).await,
        Endpoint::Proxy => match p.route(&snap, &mut ex) {
            Err(bad) => Answer::Respond(p.bad_request(&mut ex, bad)),
            Ok(matched) => match p.admit(&snap, &mut ex, matched).await {
                Ok(admission) => p.answer(&mut ex, matched, admission),
                Err(refused) => Answer::Respond(p.refuse(&mut ex, refused)),
            },
        },
    };
    // Sent from here, not from a phase of its own: the forwarding future is the largest, and each
    // async layer around it costs a copy of it per request.
    let mut sent = None;
    let status = match answer {
        Answer::Forward(to, extra) => {
            sent = Some(shared.clock.now());
            p.upstream_answer = None;
            p.failure = None;
            let (status, keep_alive) = session.forward(p, &ex, &to, &extra).await;
            ex.keep_alive = keep_alive;
            ex.error = p.failure;
            status
        }
        Answer::Respond(resp) => {
            ex.response_length = Some(if ex.head_only {
                0
            } else {
                resp.body().len() as u64
            });
            session.reply(p, &mut ex, &resp).await
        }
    };
    let protocol = if ex.head.http10 {
        Protocol::Http10
    } else {
        S::PROTOCOL
    };
    if status != 0 {
        // The clock's readings, not the monotonic clock's: the exchange began with one.
        let end = shared.clock.now();
        let secs = |from: u64| end.saturating_sub(from) as f64 / 1e9;
        let integration = sent.map(secs);
        ex.integration_ms = integration.map(|s| (s * 1e3) as u64);
        let how = (S::SCHEME, protocol);
        shared.metrics.observe(
            ex.matched,
            &ex.head.method,
            how,
            status,
            secs(ex.now),
            integration,
        );
    }
    p.finish(&ex, status, protocol)
}

impl Pipeline<'_> {
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

    /// The decision endpoint's exchange: the original request the proxy describes is routed and
    /// admitted as the data plane would, and the answer says whether it may pass, in the form the
    /// proxy asking takes.
    async fn decide<'s>(&mut self, snap: &'s Snapshot, ex: &mut Exchange<'s>) -> Answer<'s> {
        let settings = ex.config.verify.as_ref();
        let kept = self.shared.kept_fields;
        let original = settings
            .map_or(Ok(()), |settings| {
                verify::take_original(self.inbuf.bytes(), &mut ex.head, settings, kept)
            })
            .and_then(|()| self.route(snap, ex));
        let resp = match original {
            Err(bad) => self.bad_request(ex, bad),
            Ok(matched) => match self.admit(snap, ex, matched).await {
                Ok(admission) => verify::allowed(admitted(ex, &admission), ex.key_id),
                Err(refused) => self.refuse(ex, refused),
            },
        };
        Answer::Respond(match settings.map(|s| s.proxy) {
            Some(Proxy::Nginx) => verify::for_nginx(resp, ex.error.map_or("", |e| e.0)),
            _ => resp,
        })
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
        ex.matched = Some(m);
        Ok(Some(m))
    }

    /// The answer to a request that could not be accepted as it came.
    fn bad_request(&self, ex: &mut Exchange<'_>, bad: HeadError) -> Response<Bytes> {
        ex.error = Some(response::bad_request_error(bad));
        response::bad_request(bad)
    }

    /// Phase 2, admit ([`crate::admit`]): who is calling, and whether it may; what was decided is
    /// kept for the metrics and the access log.
    async fn admit<'s>(
        &self,
        snap: &'s Snapshot,
        ex: &mut Exchange<'s>,
        m: Option<RouteMatch>,
    ) -> Result<Admission<'s>, Refused<'s>> {
        let bytes = self.inbuf.bytes();
        let credentials = Credentials {
            api_key: ex.head.api_key.clone().map(|r| &bytes[r]),
            authorization: ex.head.authorization.clone().map(|r| &bytes[r]),
            from: self.client(ex.config),
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
        ex.decision = Some(decided.decision);
        if let Ok(admission) = &decided.outcome {
            shared.alerts.admitted(admission, ex.now);
            // `durability: request`: a keyed request goes on once its count is stored (in cluster
            // mode the limit script stored it already).
            if let (Some(group), Some(_), None) =
                (&shared.durable, &admission.membership, &shared.limiter)
            {
                if !group.stored().await {
                    return Err(crate::limits::Refusal::ServiceUnavailable.into());
                }
            }
        }
        decided.outcome
    }

    /// Phase 3, answer an admitted request: forward it to the upstream, or answer with the route's
    /// mock or preflight; either way with the RateLimit and CORS headers.
    fn answer<'s>(
        &mut self,
        ex: &mut Exchange<'s>,
        m: Option<RouteMatch>,
        admission: Admission<'s>,
    ) -> Answer<'s> {
        let mut extra = admitted(ex, &admission);
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
    fn refuse<'s>(&self, ex: &mut Exchange<'s>, refused: Refused<'s>) -> Response<Bytes> {
        let refusal = refused.refusal;
        ex.key_id = refused.membership.map(|m| m.key_id);
        ex.error = Some(response::refusal_error(&refusal));
        let mut resp = response::refusal(refusal, ex.config.rate_limit_headers);
        if let Some(cors) = ex.cors {
            response::add_cors_headers(resp.headers_mut(), cors, ex.origin.as_ref());
        }
        resp
    }

    /// Phase 5, log: the access-log line, when the access log is on; returns whether the
    /// connection stays open.
    fn finish(&mut self, ex: &Exchange<'_>, status: u16, protocol: Protocol) -> bool {
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
            // Behind trusted proxies, the client they name (as nginx's realip module logs it).
            let source_ip = ex
                .config
                .trusted_proxies
                .as_ref()
                .and_then(|_| self.client(ex.config).resolve())
                .map(|ip| ip.to_string());
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
                source_ip: source_ip.as_deref().unwrap_or(&self.peer_ip),
                user_agent: ex.user_agent.as_deref(),
                // The key's id only: values are secrets and never logged.
                api_key_id: ex.key_id,
                error_message: ex.error.map(|e| e.0),
                error_response_type: ex.error.map(|e| e.1),
                protocol: protocol.name(),
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
}

/// What the phases of one exchange share.
pub(crate) struct Exchange<'s> {
    pub(crate) head: RequestHead,
    config: &'s GatewayConfig,
    /// The request's `x-amzn-RequestId`.
    pub(crate) id: RequestId,
    /// The clock's reading admission uses.
    now: u64,
    pub(crate) keep_alive: bool,
    pub(crate) head_only: bool,
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
    /// The gateway's own answer: a mock, a preflight, a refusal, a decision, or the error for a
    /// request that could not be accepted.
    Respond(Response<Bytes>),
}

/// Notes the admitted key's id, and returns the fields every admitted request's answer carries: the
/// RateLimit headers, when the config asks for them.
fn admitted<'s>(ex: &mut Exchange<'s>, admission: &Admission<'s>) -> HeaderMap {
    ex.key_id = admission.membership.map(|m| m.key_id);
    let mut extra = HeaderMap::new();
    let shown = admission.membership.is_none_or(|m| m.shows_limits());
    if ex.config.rate_limit_headers && shown {
        response::add_rate_limit_headers(&mut extra, &admission.limits);
    }
    extra
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
