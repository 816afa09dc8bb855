//! HTTP/2 to clients: ALPN `h2` on the TLS listener, prior knowledge (h2c) on the plain one. The
//! framing, flow control and stream states are the `h2` crate's.
//!
//! Each stream is an [`exchange`]'s [`Session`]: routing, path normalisation, the key check, limits,
//! metering and the access log are the same code as for HTTP/1.1, with one set of defences. The
//! stream's head is laid out once as the head the one request parser reads ([`request_head`]), its
//! DATA streams to the upstream (chunked when no length was declared), and the upstream's response
//! head maps to the stream's HEADERS once, its body to DATA. Upstreams stay HTTP/1.1.

use std::cell::RefCell;
use std::future::poll_fn;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::OptionFuture;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderMap, HeaderName, HeaderValue, Method, Response, StatusCode, header};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::time::Instant;

use crate::client::{Protocol, within};
use crate::deadline::LazyDeadline;
use crate::exchange::{Endpoint, Exchange, Pipeline, Session, exchange};
use crate::forward::{Failure, Forward, Stale, connect, read_response_head, settle, write_up};
use crate::http1::{self, BodyLength, BodyProgress, HeadError, InBuf, ResponseFields};
use crate::proxy::{self, UpstreamConn};
use crate::response;
use crate::rewrite::{self, is_hop_by_hop};
use crate::state::Shared;
use crate::tls::TlsInfo;
use crate::trace::RequestId;

/// The most bytes of a stream's answer h2 buffers before the client's flow control takes them.
const SEND_BUFFER: usize = 64 * 1024;

/// Serves one HTTP/2 connection until it closes, idles out, misbehaves, or the gateway drains.
pub(crate) async fn serve<I>(shared: Arc<Shared>, io: I, peer: SocketAddr, tls: Option<TlsInfo>)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Some(settings) = shared.http2 else {
        return;
    };
    let max = settings.max_concurrent_streams as usize;
    let handshake = h2::server::Builder::new()
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_header_list_size(http1::MAX_HEAD as u32)
        .max_send_buffer_size(SEND_BUFFER)
        .handshake::<_, Bytes>(io);
    let mut conn = match tokio::time::timeout(shared.head_timeout, handshake).await {
        Ok(Ok(conn)) => conn,
        Ok(Err(err)) => {
            tracing::debug!(%peer, error = %err, "HTTP/2 handshake failed");
            return;
        }
        Err(_) => return,
    };
    let https = tls.is_some();
    let peer_ip: Arc<str> = peer.ip().to_string().into();
    // Streams whose work is still running: a stream the client resets leaves h2's count at once,
    // but leaves this one only when its task has ended, so resets cannot pile up work. At most a
    // fair share of the gateway's slots (a quarter): one connection's streams cannot take them all.
    let share = max.min((shared.max_slots / 4).max(1));
    let running = Arc::new(Semaphore::new(share));
    let resets = Arc::new(AtomicUsize::new(0));
    let active = Arc::new(AtomicBool::new(false));
    let mut stop = pin!(shared.stop.clone().notified_owned());
    stop.as_mut().enable();
    let mut closing = false;
    if shared.draining.load(Ordering::Relaxed) {
        conn.graceful_shutdown();
        closing = true;
    }
    let mut idle = pin!(tokio::time::sleep(shared.head_timeout));
    let mut accepted = 0usize;
    loop {
        let (request, respond) = tokio::select! {
            biased;
            () = &mut stop, if !closing => {
                conn.graceful_shutdown();
                closing = true;
                continue;
            }
            () = &mut idle, if !closing => {
                // Idle for between one and two head timeouts: no stream began or ended since the
                // last look, and none is running.
                if !active.swap(false, Ordering::Relaxed) && running.available_permits() == share {
                    conn.graceful_shutdown();
                    closing = true;
                } else {
                    idle.as_mut().reset(tokio::time::Instant::now() + shared.head_timeout);
                }
                continue;
            }
            next = conn.accept() => match next {
                Some(Ok(stream)) => stream,
                Some(Err(err)) => {
                    // h2 itself calms a client down whose streams are reset before they are
                    // accepted, or that makes it reset too many.
                    if err.reason() == Some(Reason::ENHANCE_YOUR_CALM) && err.is_go_away() {
                        rapid_reset(&shared, peer, accepted, resets.load(Ordering::Relaxed));
                    }
                    tracing::debug!(%peer, error = %err, "HTTP/2 connection failed");
                    break;
                }
                None => break,
            },
        };
        accepted += 1;
        active.store(true, Ordering::Relaxed);
        // The rapid-reset pattern (CVE-2023-44487): a client that cancels most of what it asks
        // for, more than a connection's worth of streams, is told to calm down and cut off.
        let reset = resets.load(Ordering::Relaxed);
        if reset > max && reset * 2 > accepted {
            rapid_reset(&shared, peer, accepted, reset);
            conn.abrupt_shutdown(Reason::ENHANCE_YOUR_CALM);
            closing = true;
            continue;
        }
        let permit = match running.clone().try_acquire_owned() {
            Ok(permit) => permit,
            // The connection is driven (frames read, answers written) while a slot frees up.
            Err(_) => tokio::select! {
                permit = running.clone().acquire_owned() => match permit {
                    Ok(permit) => permit,
                    Err(_) => break,
                },
                _ = poll_fn(|cx| conn.poll_closed(cx)) => break,
            },
        };
        let Ok(slot) = shared.slots.clone().try_acquire_owned() else {
            shared.metrics.connection_refused();
            let mut respond = respond;
            respond.send_reset(Reason::REFUSED_STREAM);
            continue;
        };
        let job = Stream {
            shared: shared.clone(),
            peer: peer.ip(),
            peer_ip: peer_ip.clone(),
            tls: tls.clone(),
            resets: resets.clone(),
            active: active.clone(),
            _held: (permit, slot),
        };
        if https {
            tokio::spawn(job.serve::<true>(request, respond));
        } else {
            tokio::spawn(job.serve::<false>(request, respond));
        }
    }
}

/// Logs and counts a connection cut off for the rapid-reset pattern.
fn rapid_reset(shared: &Shared, peer: SocketAddr, streams: usize, resets: usize) {
    tracing::warn!(%peer, streams, resets,
        "HTTP/2 client cancels most of its streams; connection closed (rapid reset)");
    shared.metrics.http2_rapid_reset();
}

/// What one stream's task holds.
struct Stream {
    shared: Arc<Shared>,
    peer: IpAddr,
    peer_ip: Arc<str>,
    tls: Option<TlsInfo>,
    /// Streams of this connection the client reset.
    resets: Arc<AtomicUsize>,
    /// Set when a stream ends, for the connection's idle check.
    active: Arc<AtomicBool>,
    /// Its place among the connection's running streams, and among the gateway's slots.
    _held: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// How a stream ended early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// The client reset it.
    Reset,
    /// The client gave no flow-control credit for a head timeout: the stream was reset, and
    /// counts against the connection like a client's reset.
    Stalled,
    /// The client's body broke the protocol, or the upstream's answer broke off after its head:
    /// the stream was reset.
    Broken,
}

impl Stream {
    async fn serve<const HTTPS: bool>(
        self,
        request: http::Request<RecvStream>,
        respond: SendResponse<Bytes>,
    ) {
        let (parts, mut body) = request.into_parts();
        let shared = &*self.shared;
        let mut ended = body.is_end_stream();
        // A GET or HEAD whose END_STREAM comes on an empty DATA frame has no body: it is told
        // so before its head is read, or it would go on as a (refused) chunked body.
        let mut first = None;
        let bodiless = !ended
            && matches!(parts.method, Method::GET | Method::HEAD)
            && !parts.headers.contains_key(header::CONTENT_LENGTH);
        while bodiless && !ended && first.is_none() {
            match tokio::time::timeout(shared.head_timeout, body.data()).await {
                Ok(None) => ended = true,
                Ok(Some(Ok(data))) if data.is_empty() => {}
                // Its credit goes back once the upstream takes it, as any DATA's.
                Ok(Some(Ok(data))) => first = Some(data),
                // A reset or a broken body: the stream is over; its head is never read.
                Ok(Some(Err(_))) => return,
                // Still open after a head timeout: it goes on as a body.
                Err(_) => break,
            }
        }
        let peer_ip = self.peer_ip.clone();
        let mut p = Pipeline::new(
            shared,
            self.peer,
            peer_ip,
            self.tls.clone(),
            Endpoint::Proxy,
        );
        let mut session = StreamSession::<HTTPS> {
            respond,
            body: (!ended).then_some(body),
            first,
            upstream: None,
            gone: None,
        };
        // The head is whole, so the parser never finds it incomplete.
        let head = request_head(&parts, ended, &mut p.inbuf)
            .map_err(HeadError::Malformed)
            .and_then(|()| p.parse_head::<StreamSession<HTTPS>>())
            .and_then(|head| head.ok_or(HeadError::Malformed("Malformed request")));
        match head {
            Ok(head) => {
                // On the heap: the stream's task is spawned (moved) small, and the exchange, the
                // largest future, is made once in place.
                Box::pin(exchange(&mut session, &mut p, head)).await;
            }
            Err(bad) => session.bad_request(bad, &parts, shared).await,
        }
        if let Some(up) = session.upstream.take() {
            shared.upstreams.put(up);
        }
        if let Some(Ended::Reset | Ended::Stalled) = session.gone {
            self.resets.fetch_add(1, Ordering::Relaxed);
        }
        self.active.store(true, Ordering::Relaxed);
    }
}

/// One stream, as the exchange's client side. `HTTPS`: the stream came over TLS.
struct StreamSession<const HTTPS: bool> {
    respond: SendResponse<Bytes>,
    /// The request's DATA still to come, unless its head ended the stream.
    body: Option<RecvStream>,
    /// DATA read before the head was handed over.
    first: Option<Bytes>,
    upstream: Option<UpstreamConn>,
    /// How the stream ended early, if it did.
    gone: Option<Ended>,
}

impl<const HTTPS: bool> StreamSession<HTTPS> {
    /// Answers a head the exchange could not read.
    async fn bad_request(&mut self, bad: HeadError, parts: &http::request::Parts, shared: &Shared) {
        let resp = response::bad_request(bad);
        let head_only = parts.method == Method::HEAD;
        self.answer(&resp, head_only, &RequestId::new(), shared.head_timeout)
            .await;
    }

    /// Sends the gateway's own answer `resp` on the stream: its status and fields, the request's
    /// id, `Date` and `Content-Length`, then its body unless `head_only`. Returns the status, or 0
    /// when the client is gone (why, in [`StreamSession::gone`]).
    async fn answer(
        &mut self,
        resp: &Response<Bytes>,
        head_only: bool,
        id: &RequestId,
        idle: Duration,
    ) -> u16 {
        let mut head = Response::new(());
        *head.status_mut() = resp.status();
        let fields = head.headers_mut();
        fields.clone_from(resp.headers());
        add_gateway_fields(fields, id);
        fields.insert(header::CONTENT_LENGTH, HeaderValue::from(resp.body().len()));
        let end = head_only || resp.body().is_empty();
        let Ok(mut send) = self.respond.send_response(head, end) else {
            self.gone = Some(Ended::Reset);
            return 0;
        };
        if !end {
            if let Err(why) = send_data(&mut send, resp.body(), true, idle).await {
                self.gone = Some(why);
                return 0;
            }
        }
        resp.status().as_u16()
    }
}

impl<const HTTPS: bool> Session for StreamSession<HTTPS> {
    const SCHEME: &'static str = if HTTPS { "https" } else { "http" };
    const PROTOCOL: Protocol = Protocol::Http2;

    async fn reply(
        &mut self,
        p: &mut Pipeline<'_>,
        ex: &mut Exchange<'_>,
        resp: &Response<Bytes>,
    ) -> u16 {
        let idle = p.shared.head_timeout;
        self.answer(resp, ex.head_only, &ex.id, idle).await
    }

    async fn forward(
        &mut self,
        p: &mut Pipeline<'_>,
        ex: &Exchange<'_>,
        to: &Forward<'_>,
        extra: &HeaderMap,
    ) -> (u16, bool) {
        let status = match self.proxy(p, ex, to, extra).await {
            Ok(status) => status,
            Err(Failure::Client) => {
                self.upstream = None;
                0
            }
            Err(failure) => {
                self.upstream = None;
                let (resp, error) = failure.answer();
                p.failure = Some(error);
                let idle = p.shared.head_timeout;
                self.answer(&resp, ex.head_only, &ex.id, idle).await
            }
        };
        (status, false)
    }
}

impl<const HTTPS: bool> StreamSession<HTTPS> {
    /// Writes the request to the upstream (retrying once on a fresh connection when a reused one
    /// turns out closed and the stream has no body), streams the stream's DATA after it, and relays
    /// the answer as HEADERS and DATA. An upstream that answers before it has the whole body has its
    /// answer relayed while the body keeps flowing; the upstream connection then closes.
    ///
    /// The route's timeout bounds connecting, each write to the upstream, and the wait for the
    /// response head, which counts from the end of the body. An error before anything reached the
    /// client is returned, for the caller to answer.
    async fn proxy(
        &mut self,
        p: &mut Pipeline<'_>,
        ex: &Exchange<'_>,
        to: &Forward<'_>,
        extra: &HeaderMap,
    ) -> Result<u16, Failure> {
        let shared = p.shared;
        let Self {
            respond,
            body,
            first,
            upstream,
            gone,
        } = self;
        let (method, has_body) = (&ex.head.method, body.is_some());
        let chunked = ex.head.body == BodyLength::Chunked;
        let mut timer = LazyDeadline::new(Instant::now() + to.timeout);
        let mut fresh = false;
        let (head, whole, early) = loop {
            timer.set(Instant::now() + to.timeout);
            connect(shared, upstream, to, fresh, &mut timer).await?;
            let Some(up) = upstream.as_mut() else {
                return Err(Failure::Upstream);
            };
            up.carried_body |= ex.head.body != BodyLength::Empty;
            let (mut up_read, mut up_write) = proxy::halves(&mut up.io);
            let written = tokio::select! {
                biased;
                w = up_write.write_all(&p.to_upstream) => w.is_ok(),
                () = timer.expired() => return Err(Failure::Timeout),
            };
            let mut uploaded = !has_body;
            let mut uploading = pin!(OptionFuture::from(body.as_mut().map(|body| {
                upload(
                    first.take(),
                    body,
                    chunked,
                    to.body_limit,
                    &mut up_write,
                    to.timeout,
                )
            })));
            let mut answer = None;
            let head = if written {
                let parse = |f: &ResponseFields<'_, '_>| answer = h2_response(f, extra, &to.id);
                let mut waiting =
                    pin!(read_response_head(&mut up_read, &mut up.buf, method, parse));
                loop {
                    tokio::select! {
                        biased;
                        _ = poll_fn(|cx| respond.poll_reset(cx)) => {
                            *gone = Some(Ended::Reset);
                            return Err(Failure::Client);
                        }
                        u = &mut uploading, if !uploaded => {
                            match u {
                                Some(Err(Stopped::Forwarding(failure))) => return Err(failure),
                                Some(Err(Stopped::Client(why))) => {
                                    *gone = Some(why);
                                    return Err(Failure::Client);
                                }
                                Some(Ok(())) | None => {}
                            }
                            uploaded = true;
                            timer.set(Instant::now() + to.timeout);
                        }
                        h = &mut waiting => break h,
                        () = timer.expired(), if uploaded => return Err(Failure::Timeout),
                    }
                }
            } else {
                Err(Stale)
            };
            let (head, response) = match (head, answer) {
                (Ok(head), Some(response)) => (head, response),
                (Ok(_), None) => return Err(Failure::Upstream),
                // A reused connection the upstream had closed: once more on a new one.
                (Err(Stale), _) if up.reused && !has_body && !fresh => {
                    fresh = true;
                    continue;
                }
                (Err(Stale), _) => return Err(Failure::Upstream),
            };
            p.upstream_answer = Some((head.status, head.body.declared()));
            let early = !uploaded;
            let empty = head.body == BodyLength::Empty;
            let Ok(mut send) = respond.send_response(response, empty) else {
                *gone = Some(Ended::Reset);
                return Err(Failure::Client);
            };
            up.buf.consume(head.len);
            // The answer, while whatever is left of the body keeps flowing.
            let relayed = if empty {
                Ok(())
            } else {
                let idle = shared.head_timeout;
                let relayed = {
                    let mut relaying =
                        pin!(relay(&mut up_read, &mut up.buf, head.body, &mut send, idle));
                    loop {
                        tokio::select! {
                            biased;
                            r = &mut relaying => break r,
                            u = &mut uploading, if !uploaded => {
                                uploaded = true;
                                // A body refused or broken off: the upstream will not finish its
                                // answer, so the stream is cut rather than left waiting.
                                if let Some(Err(_)) = u {
                                    break Err(Ended::Broken);
                                }
                            }
                        }
                    }
                };
                if relayed == Err(Ended::Broken) {
                    send.send_reset(Reason::CANCEL);
                }
                relayed
            };
            if let Err(why) = relayed {
                *gone = Some(why);
            }
            break (head, relayed.is_ok(), early);
        };
        // Back to the pool when the stream ends, only after a clean exchange.
        if let Some(up) = upstream.as_mut() {
            if !settle(up, &head, whole, early) {
                *upstream = None;
            }
        }
        Ok(head.status)
    }
}

/// Lays out the stream's request (`parts`, whose body `ended` already) in `inbuf` as the HTTP/1.1
/// head the one request parser reads, so that an HTTP/2 request passes the same checks as any
/// other: the pseudo-header fields become its request line (checked here: nothing that could end it
/// early), `:authority` its `Host`, the cookie fields one `Cookie` (RFC 9113 §8.2.3); a body
/// without a declared length is framed as chunked, which is how it goes upstream.
fn request_head(
    parts: &http::request::Parts,
    ended: bool,
    inbuf: &mut InBuf,
) -> Result<(), &'static str> {
    if parts.method == Method::CONNECT {
        return Err("CONNECT is not supported");
    }
    let target = parts.uri.path_and_query().map_or("", |p| p.as_str());
    if !target.starts_with('/') || !target.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err("Malformed request target");
    }
    let mut out = Vec::with_capacity(1024);
    out.extend_from_slice(parts.method.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(target.as_bytes());
    out.extend_from_slice(b" HTTP/1.1\r\n");
    // `:authority` stands for `Host` (RFC 9113 §8.3.1).
    let host = match parts.uri.authority() {
        Some(authority) => Some(authority.as_str().as_bytes()),
        None => parts.headers.get(header::HOST).map(HeaderValue::as_bytes),
    };
    if let Some(host) = host {
        http1::header_line(&mut out, b"host", host);
    }
    let mut cookies: Option<Vec<u8>> = None;
    let mut length = false;
    for (name, value) in &parts.headers {
        let name = name.as_str();
        match name {
            "host" | "expect" => continue,
            "content-length" => length = true,
            "cookie" => {
                match &mut cookies {
                    Some(joined) => {
                        joined.extend_from_slice(b"; ");
                        joined.extend_from_slice(value.as_bytes());
                    }
                    None => cookies = Some(value.as_bytes().to_vec()),
                }
                continue;
            }
            // h2 refuses connection-specific fields; none frames or steers the request.
            name if is_hop_by_hop(name) => continue,
            _ => {}
        }
        http1::header_line(&mut out, name.as_bytes(), value.as_bytes());
    }
    if let Some(cookies) = cookies {
        http1::header_line(&mut out, b"cookie", &cookies);
    }
    if !ended && !length {
        http1::framing_line(&mut out, BodyLength::Chunked);
    }
    // One request per stream.
    out.extend_from_slice(b"connection: close\r\n\r\n");
    *inbuf = InBuf::from(out);
    Ok(())
}

/// How a stream's upload stopped early.
enum Stopped {
    /// Forwarding failed (the body was too long, the upstream failed or stalled): the caller
    /// answers as for any failure.
    Forwarding(Failure),
    /// The client's side of the stream ended: reset by the client, or broken and reset by h2.
    Client(Ended),
}

/// Sends the stream's DATA (after `first`, already taken) to the upstream as the request's body,
/// chunked when `chunked`, returning flow-control credit as the upstream takes the bytes. More than
/// `limit` bytes is 413; each write to the upstream is bounded by `stall`.
async fn upload<W: AsyncWrite + Unpin>(
    mut first: Option<Bytes>,
    body: &mut RecvStream,
    chunked: bool,
    limit: u64,
    to: &mut W,
    stall: Duration,
) -> Result<(), Stopped> {
    let mut frame = Vec::new();
    let mut sent = 0u64;
    while let Some(data) = match first.take() {
        Some(data) => Some(Ok(data)),
        None => body.data().await,
    } {
        let data = data.map_err(|e: h2::Error| {
            Stopped::Client(if e.is_reset() && e.is_remote() {
                Ended::Reset
            } else {
                Ended::Broken
            })
        })?;
        let n = data.len();
        if n == 0 {
            continue;
        }
        sent += n as u64;
        if sent > limit {
            return Err(Stopped::Forwarding(Failure::Body(HeadError::BodyTooLarge)));
        }
        let bytes = if chunked {
            frame.clear();
            http1::chunk(&mut frame, &data);
            &frame[..]
        } else {
            &data[..]
        };
        write_up(to, bytes, stall)
            .await
            .map_err(Stopped::Forwarding)?;
        let _ = body.flow_control().release_capacity(n);
    }
    if chunked {
        write_up(to, b"0\r\n\r\n", stall)
            .await
            .map_err(Stopped::Forwarding)?;
    }
    Ok(())
}

/// Relays the rest of the upstream's answer (a body framed as `length`, whose first bytes may be in
/// `buf`) to the client as DATA within its flow control, waiting at most `idle` for credit.
async fn relay<R: AsyncRead + Unpin>(
    from: &mut R,
    buf: &mut InBuf,
    length: BodyLength,
    send: &mut SendStream<Bytes>,
    idle: Duration,
) -> Result<(), Ended> {
    let mut body = BodyProgress::new(length);
    let mut data = Vec::new();
    loop {
        if !buf.is_empty() {
            data.clear();
            let n = body
                .take_data(buf.bytes(), &mut data)
                .map_err(|_| Ended::Broken)?;
            buf.consume(n);
            if !data.is_empty() || body.done() {
                send_data(send, &data, body.done(), idle).await?;
            }
            if body.done() {
                return Ok(());
            }
        }
        tokio::select! {
            biased;
            _ = poll_fn(|cx| send.poll_reset(cx)) => return Err(Ended::Reset),
            n = buf.read_from(from) => match n {
                Ok(0) if matches!(body, BodyProgress::UntilClose) => {
                    return send.send_data(Bytes::new(), true).map_err(|_| Ended::Reset);
                }
                Ok(n) if n > 0 => {}
                _ => {
                    send.send_reset(Reason::INTERNAL_ERROR);
                    return Err(Ended::Broken);
                }
            },
        }
    }
}

/// Sends `data` as DATA frames as the client's flow control allows, the last one ending the
/// stream when `end`. A client that grants no credit for `idle` (a window left at zero, a socket
/// not read) gets the stream reset: what the stream holds (a slot, an upstream connection) is freed.
async fn send_data(
    send: &mut SendStream<Bytes>,
    mut data: &[u8],
    end: bool,
    idle: Duration,
) -> Result<(), Ended> {
    if data.is_empty() {
        return send.send_data(Bytes::new(), end).map_err(|_| Ended::Reset);
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let Some(capacity) = within(idle, poll_fn(|cx| send.poll_capacity(cx))).await else {
            send.send_reset(Reason::CANCEL);
            return Err(Ended::Stalled);
        };
        let Some(Ok(granted)) = capacity else {
            return Err(Ended::Reset);
        };
        let (now, rest) = data.split_at(granted.min(data.len()));
        if now.is_empty() {
            continue;
        }
        send.send_data(Bytes::copy_from_slice(now), end && rest.is_empty())
            .map_err(|_| Ended::Reset)?;
        data = rest;
    }
    Ok(())
}

/// `x-amzn-RequestId` and `Date`, as every answer carries them.
fn add_gateway_fields(fields: &mut HeaderMap, id: &RequestId) {
    if let Ok(mut id) = HeaderValue::from_str(id.as_str()) {
        // Unique to each answer: kept out of HPACK's table, where it would only push out fields
        // that repeat.
        id.set_sensitive(true);
        fields.insert(HeaderName::from_static("x-amzn-requestid"), id);
    }
    if !fields.contains_key(header::DATE) {
        fields.insert(header::DATE, date());
    }
}

/// The current time as a `Date` value, made once a second per thread.
fn date() -> HeaderValue {
    thread_local! {
        static CACHED: RefCell<HeaderValue> = const { RefCell::new(HeaderValue::from_static("")) };
    }
    http1::date(|now| {
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.as_bytes() != now {
                if let Ok(value) = HeaderValue::from_bytes(now) {
                    *c = value;
                }
            }
            c.clone()
        })
    })
}

/// The HTTP/2 response for the upstream's response head: its status, the fields the proxy's rewrite
/// passes (none that only mean something to an HTTP/1.1 connection), the gateway's `extra` fields
/// and the request's id.
fn h2_response(
    f: &ResponseFields<'_, '_>,
    extra: &HeaderMap,
    id: &RequestId,
) -> Option<Response<()>> {
    let mut response = Response::new(());
    *response.status_mut() = StatusCode::from_u16(f.head.status).ok()?;
    let fields = response.headers_mut();
    fields.reserve(f.fields.len() + extra.len() + 2);
    // The values, copied once into one buffer that each field's value is a slice of.
    let mut values = BytesMut::with_capacity(f.fields.iter().map(|h| h.value.len()).sum());
    for h in f.fields {
        values.extend_from_slice(h.value);
    }
    let mut values = values.freeze();
    for h in f.fields {
        let value = values.split_to(h.value.len());
        if !rewrite::passes_response_field(f, h.name, extra) {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_maybe_shared(value),
        ) {
            fields.append(name, value);
        }
    }
    for (name, value) in extra {
        fields.append(name, value.clone());
    }
    add_gateway_fields(fields, id);
    Some(response)
}

/// A plain connection whose first bytes were read as the start of an HTTP/1 request before they
/// turned out to be the HTTP/2 preface: they are read again first.
pub(crate) struct Rewind<C> {
    read: Vec<u8>,
    at: usize,
    io: C,
}

impl<C> Rewind<C> {
    pub(crate) fn new(read: Vec<u8>, io: C) -> Self {
        Self { read, at: 0, io }
    }
}

impl<C: AsyncRead + Unpin> AsyncRead for Rewind<C> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        if this.at < this.read.len() {
            let n = buf.remaining().min(this.read.len() - this.at);
            buf.put_slice(&this.read[this.at..this.at + n]);
            this.at += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<C: AsyncWrite + Unpin> AsyncWrite for Rewind<C> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}
