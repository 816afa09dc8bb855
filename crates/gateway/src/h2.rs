//! HTTP/2 to clients: ALPN `h2` on the TLS listener, prior knowledge (h2c) on the plain one. The
//! framing, flow control and stream states are the `h2` crate's.
//!
//! Each stream is handed to the connection pipeline of [`crate::conn`] as one HTTP/1.1 request over
//! an in-memory pipe, so routing, path normalisation, the key check, limits, metering, forwarding
//! and the access log are one piece of code with one set of defences, whatever protocol the client
//! speaks. The stream's pseudo-header fields become a request line checked here, its fields header
//! lines that the HTTP/1 parser checks again, its DATA the body (chunked when no length was
//! declared); the pipeline's answer becomes the stream's HEADERS and DATA. Upstreams stay HTTP/1.1.

use std::future::poll_fn;
use std::io;
use std::net::SocketAddr;
use std::pin::{Pin, pin};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::task::{Context, Poll};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{Reason, RecvStream, SendStream};
use http::{HeaderName, HeaderValue, Method, Response, StatusCode, header};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _, DuplexStream, ReadBuf};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::client::{ClientIo, Protocol, within};
use crate::conn;
use crate::http1::{
    self, BodyLength, BodyProgress, HeadError, InBuf, ResponseFields, ResponseStart,
};
use crate::response;
use crate::rewrite::is_hop_by_hop;
use crate::state::Shared;
use crate::tls::TlsInfo;
use crate::trace::RequestId;

/// Bytes in flight between a stream and its pipeline, each way.
const PIPE: usize = 64 * 1024;

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
        .max_send_buffer_size(PIPE)
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
            peer,
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
    peer: SocketAddr,
    tls: Option<TlsInfo>,
    /// Streams of this connection the client reset.
    resets: Arc<AtomicUsize>,
    /// Set when a stream ends, for the connection's idle check.
    active: Arc<AtomicBool>,
    /// Its place among the connection's running streams, and among the gateway's slots.
    _held: (OwnedSemaphorePermit, OwnedSemaphorePermit),
}

/// How a stream ended early.
enum Gone {
    /// The client reset it.
    Reset,
    /// The client gave no flow-control credit for a head timeout: the stream was reset, and
    /// counts against the connection like a client's reset.
    Stalled,
    /// The pipeline or the client's body failed; the stream is dropped, which resets it.
    Broken,
}

impl Stream {
    async fn serve<const HTTPS: bool>(
        self,
        request: http::Request<RecvStream>,
        mut respond: SendResponse<Bytes>,
    ) {
        let (parts, mut body) = request.into_parts();
        let mut head = Vec::with_capacity(256);
        let mut ended = body.is_end_stream();
        // A GET or HEAD whose END_STREAM comes on an empty DATA frame has no body: it is told
        // so before its head is written, or it would go on as a (refused) chunked body.
        let mut first = None;
        let bodiless = !ended
            && matches!(parts.method, Method::GET | Method::HEAD)
            && !parts.headers.contains_key(header::CONTENT_LENGTH);
        while bodiless && !ended && first.is_none() {
            match tokio::time::timeout(self.shared.head_timeout, body.data()).await {
                Ok(None) => ended = true,
                Ok(Some(Ok(data))) if data.is_empty() => {}
                // Its credit goes back once the pipeline takes it, as any DATA's.
                Ok(Some(Ok(data))) => first = Some(data),
                // A reset or a broken body: the stream is over; its head is never sent.
                Ok(Some(Err(_))) => return,
                // Still open after a head timeout: it goes on as a body.
                Err(_) => break,
            }
        }
        let outcome = match request_head(&parts, ended, &mut head) {
            Ok(chunked) => {
                let (near, far) = tokio::io::duplex(PIPE);
                let (mut from_pipeline, mut to_pipeline) = tokio::io::split(near);
                let shared = self.shared.clone();
                let mut pipeline = pin!(conn::serve(
                    shared,
                    Bridge::<HTTPS>(far),
                    self.peer,
                    self.tls.clone(),
                    conn::Role::Proxy,
                ));
                let mut upload = pin!(upload(&head, first, body, chunked, &mut to_pipeline));
                let idle = self.shared.head_timeout;
                let mut answer = pin!(relay(&mut from_pipeline, &parts.method, &mut respond, idle));
                let (mut served, mut uploaded) = (false, false);
                let answered = loop {
                    tokio::select! {
                        biased;
                        _ = &mut pipeline, if !served => served = true,
                        u = &mut upload, if !uploaded => match u {
                            Ok(()) => uploaded = true,
                            Err(gone) => break Err(gone),
                        },
                        a = &mut answer => break a,
                    }
                };
                if answered.is_ok() && !served {
                    // Its access-log line comes after the bytes it wrote.
                    pipeline.await;
                }
                answered
            }
            Err(why) => {
                // Answered here: the pipeline never sees a request line it could read otherwise.
                let mut out = Vec::new();
                let resp = response::bad_request(HeadError::Malformed(why));
                let head_only = parts.method == Method::HEAD;
                http1::encode_response(&resp, head_only, false, &RequestId::new(), &mut out);
                relay(
                    &mut &out[..],
                    &parts.method,
                    &mut respond,
                    self.shared.head_timeout,
                )
                .await
            }
        };
        if let Err(Gone::Reset | Gone::Stalled) = outcome {
            self.resets.fetch_add(1, Ordering::Relaxed);
        }
        self.active.store(true, Ordering::Relaxed);
    }
}

/// Writes the HTTP/1.1 head of the stream's request (`parts`, whose body `ended` already) to
/// `out`; returns whether the body follows chunked.
fn request_head(
    parts: &http::request::Parts,
    ended: bool,
    out: &mut Vec<u8>,
) -> Result<bool, &'static str> {
    if parts.method == Method::CONNECT {
        return Err("CONNECT is not supported");
    }
    // Only an origin-form target may become a request line: nothing that could end it early.
    let target = parts.uri.path_and_query().map_or("", |p| p.as_str());
    if !target.starts_with('/') || !target.bytes().all(|b| (0x21..0x7f).contains(&b)) {
        return Err("Malformed request target");
    }
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
        http1::header_line(out, b"host", host);
    }
    let mut cookies: Option<Vec<u8>> = None;
    let mut length = false;
    for (name, value) in &parts.headers {
        let name = name.as_str();
        match name {
            "host" | "expect" => continue,
            "content-length" => length = true,
            // HTTP/2 splits cookies into fields; HTTP/1.1 allows one (RFC 9113 §8.2.3).
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
            // h2 refuses connection-specific fields; none frames or steers the HTTP/1 request.
            name if is_hop_by_hop(name) => continue,
            _ => {}
        }
        http1::header_line(out, name.as_bytes(), value.as_bytes());
    }
    if let Some(cookies) = cookies {
        http1::header_line(out, b"cookie", &cookies);
    }
    let chunked = !ended && !length;
    if chunked {
        http1::framing_line(out, BodyLength::Chunked);
    }
    // One request per pipe.
    out.extend_from_slice(b"connection: close\r\n\r\n");
    Ok(chunked)
}

/// Sends the request head, then the stream's DATA (after `first`, already taken) as its body,
/// returning flow-control credit as the pipeline takes the bytes. `Err`: the client reset the
/// stream, or its body broke the protocol (and h2 reset it).
async fn upload<W: AsyncWrite + Unpin>(
    head: &[u8],
    first: Option<Bytes>,
    mut body: RecvStream,
    chunked: bool,
    to: &mut W,
) -> Result<(), Gone> {
    // The pipeline may stop reading (a refusal does not wait for the body): waiting for it then
    // ends with the stream, which is fine.
    let _ = to.write_all(head).await;
    let mut frame = Vec::new();
    let mut first = first.map(Ok);
    while let Some(data) = match first.take() {
        Some(data) => Some(data),
        None => body.data().await,
    } {
        let data = data.map_err(|e: h2::Error| {
            if e.is_reset() && e.is_remote() {
                Gone::Reset
            } else {
                Gone::Broken
            }
        })?;
        let n = data.len();
        if n == 0 {
            continue;
        }
        let written = if chunked {
            frame.clear();
            http1::chunk(&mut frame, &data);
            to.write_all(&frame).await
        } else {
            to.write_all(&data).await
        };
        if written.is_err() {
            return Ok(());
        }
        let _ = body.flow_control().release_capacity(n);
    }
    if chunked {
        let _ = to.write_all(b"0\r\n\r\n").await;
    }
    Ok(())
}

/// Reads the pipeline's HTTP/1.1 answer from `from` and sends it on the stream: the head as
/// HEADERS (without HTTP/1's connection fields), the body's data as DATA within the client's flow
/// control, waiting at most `idle` for credit.
async fn relay<R: AsyncRead + Unpin>(
    from: &mut R,
    method: &Method,
    respond: &mut SendResponse<Bytes>,
    idle: std::time::Duration,
) -> Result<(), Gone> {
    let mut buf = InBuf::default();
    let mut response = None;
    let head = loop {
        if !buf.is_empty() {
            match http1::parse_response(buf.bytes(), method, |f| response = h2_response(f)) {
                Ok(ResponseStart::Final(head)) => break head,
                Ok(ResponseStart::Interim(n)) => {
                    buf.consume(n);
                    continue;
                }
                Ok(ResponseStart::Partial) => {}
                Err(_) => return Err(Gone::Broken),
            }
        }
        tokio::select! {
            biased;
            _ = poll_fn(|cx| respond.poll_reset(cx)) => return Err(Gone::Reset),
            n = buf.read_from(from) => match n {
                Ok(n) if n > 0 => {}
                _ => return Err(Gone::Broken),
            },
        }
    };
    let response = response.ok_or(Gone::Broken)?;
    buf.consume(head.len);
    let empty = head.body == BodyLength::Empty;
    let mut send = respond
        .send_response(response, empty)
        .map_err(|_| Gone::Reset)?;
    if empty {
        return Ok(());
    }
    let mut body = BodyProgress::new(head.body);
    let mut data = Vec::new();
    loop {
        if !buf.is_empty() {
            data.clear();
            let n = body
                .take_data(buf.bytes(), &mut data)
                .map_err(|_| Gone::Broken)?;
            buf.consume(n);
            if !data.is_empty() || body.done() {
                send_data(&mut send, &data, body.done(), idle).await?;
            }
            if body.done() {
                return Ok(());
            }
        }
        tokio::select! {
            biased;
            _ = poll_fn(|cx| send.poll_reset(cx)) => return Err(Gone::Reset),
            n = buf.read_from(from) => match n {
                Ok(0) if matches!(body, BodyProgress::UntilClose) => {
                    return send.send_data(Bytes::new(), true).map_err(|_| Gone::Reset);
                }
                Ok(n) if n > 0 => {}
                _ => {
                    send.send_reset(Reason::INTERNAL_ERROR);
                    return Err(Gone::Broken);
                }
            },
        }
    }
}

/// Sends `data` as DATA frames as the client's flow control allows, the last one ending the
/// stream when `end`. A client that grants no credit for `idle` (a window left at zero, a socket
/// not read) gets the stream reset: what the stream holds (a slot, a pipeline, an upstream
/// connection) is freed.
async fn send_data(
    send: &mut SendStream<Bytes>,
    mut data: &[u8],
    end: bool,
    idle: std::time::Duration,
) -> Result<(), Gone> {
    if data.is_empty() {
        return send.send_data(Bytes::new(), end).map_err(|_| Gone::Reset);
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let Some(capacity) = within(idle, poll_fn(|cx| send.poll_capacity(cx))).await else {
            send.send_reset(Reason::CANCEL);
            return Err(Gone::Stalled);
        };
        let Some(Ok(granted)) = capacity else {
            return Err(Gone::Reset);
        };
        let (now, rest) = data.split_at(granted.min(data.len()));
        if now.is_empty() {
            continue;
        }
        send.send_data(Bytes::copy_from_slice(now), end && rest.is_empty())
            .map_err(|_| Gone::Reset)?;
        data = rest;
    }
    Ok(())
}

/// The HTTP/2 response for the pipeline's response head: its status and fields, less those that
/// only mean something to an HTTP/1.1 connection.
fn h2_response(f: &ResponseFields<'_, '_>) -> Option<Response<()>> {
    let mut response = Response::new(());
    *response.status_mut() = StatusCode::from_u16(f.head.status).ok()?;
    let headers = response.headers_mut();
    for h in f.fields {
        let keep = !(is_hop_by_hop(h.name) || f.connection.names(h.name))
            || (!f.coded && http1::is(h.name, "content-length"));
        if !keep {
            continue;
        }
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(h.name.as_bytes()),
            HeaderValue::from_bytes(h.value),
        ) {
            headers.append(name, value);
        }
    }
    Some(response)
}

/// A stream's end of the pipe, as the pipeline's client. `HTTPS`: the stream came over TLS.
pub(crate) struct Bridge<const HTTPS: bool>(DuplexStream);

impl<const HTTPS: bool> AsyncRead for Bridge<HTTPS> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl<const HTTPS: bool> AsyncWrite for Bridge<HTTPS> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl<const HTTPS: bool> ClientIo for Bridge<HTTPS> {
    type Reader<'a> = tokio::io::ReadHalf<&'a mut Self>;
    type Writer<'a> = tokio::io::WriteHalf<&'a mut Self>;
    const SCHEME: &'static str = if HTTPS { "https" } else { "http" };
    const PROTOCOL: Protocol = Protocol::Http2;

    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        tokio::io::split(self)
    }

    fn poll_readable(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
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
