//! One HTTP/1.1 client connection: read a request head, hand it to the [`exchange`], and go on while
//! keep-alive holds. As the exchange's [`Session`], the connection streams the request's body to the
//! upstream and the answer back, on buffers this task owns and reuses, so the common exchange
//! allocates nothing.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use bytes::Bytes;
use http::{HeaderMap, Method, Response};
use tokio::io::AsyncWriteExt as _;
use tokio::sync::futures::OwnedNotified;
use tokio::time::Instant;

use crate::client::{ClientIo, Protocol, write_all_progressing};
use crate::deadline::LazyDeadline;
use crate::exchange::{Endpoint, Exchange, Pipeline, Session, exchange};
use crate::forward::{
    Failure, Forward, Relayed, Stale, connect, for_client, read_response_head, respond, settle,
    upload,
};
use crate::http1::{self, BodyLength, BodyProgress, HeadError, RequestHead, ResponseHead};
use crate::proxy::{self, UpstreamConn};
use crate::response;
use crate::state::Shared;
use crate::tls::TlsInfo;
use crate::trace::RequestId;

/// Serves one client connection until it closes, errs, idles out, or the gateway drains. Returns
/// the connection and the bytes read from it when it opened with the HTTP/2 preface instead, for
/// the HTTP/2 server to take over.
pub(crate) async fn serve<C: ClientIo>(
    shared: Arc<Shared>,
    client: C,
    peer: SocketAddr,
    tls: Option<TlsInfo>,
    endpoint: Endpoint,
) -> Option<(C, Vec<u8>)> {
    // Enabled before the first look at `draining`, so a drain signalled after that look wakes it.
    let mut stop = Box::pin(shared.stop.clone().notified_owned());
    stop.as_mut().enable();
    let ip = peer.ip();
    let mut pipeline = Pipeline::new(&shared, ip, ip.to_string().into(), tls, endpoint);
    let mut conn = Conn {
        client,
        to_client: Vec::new(),
        upstream: None,
        head_deadline: LazyDeadline::new(Instant::now() + shared.head_timeout),
        upstream_deadline: None,
        stop,
    };
    let http2 = conn.run(&mut pipeline).await;
    if let Some(up) = conn.upstream.take() {
        shared.upstreams.put(up);
    }
    http2.then(|| (conn.client, pipeline.inbuf.bytes().to_vec()))
}

/// An HTTP/1.1 connection's own parts; the request's are in the [`Pipeline`].
struct Conn<C> {
    client: C,
    /// The current response as it goes to the client.
    to_client: Vec<u8>,
    upstream: Option<UpstreamConn>,
    head_deadline: LazyDeadline,
    /// Made on the first forwarded request.
    upstream_deadline: Option<LazyDeadline>,
    /// Wakes an idle connection when the gateway drains.
    stop: Pin<Box<OwnedNotified>>,
}

impl<C: ClientIo> Conn<C> {
    /// Serves requests until the connection ends; true when it turned out to open with the HTTP/2
    /// preface (and HTTP/2 is on).
    async fn run(&mut self, p: &mut Pipeline<'_>) -> bool {
        let mut first = true;
        loop {
            let head = match self.read_head(p).await {
                Ok(Some(head)) => head,
                Ok(None) => return false,
                // Not an HTTP/1 request line, so this costs HTTP/1 nothing.
                Err(_)
                    if first
                        && C::PRIOR_KNOWLEDGE
                        && p.shared.http2.is_some()
                        && p.inbuf.bytes().starts_with(http1::HTTP2_PREFACE_START) =>
                {
                    return true;
                }
                Err(err) => {
                    let resp = response::bad_request(err);
                    self.write_reply(p, &resp, false, false, &RequestId::new())
                        .await;
                    return false;
                }
            };
            first = false;
            if !exchange(self, p, head).await {
                return false;
            }
        }
    }

    /// The next request head, or `None` when the client closed, idled out, or the gateway drains.
    async fn read_head(&mut self, p: &mut Pipeline<'_>) -> Result<Option<RequestHead>, HeadError> {
        let shared = p.shared;
        self.head_deadline.set(Instant::now() + shared.head_timeout);
        loop {
            if !p.inbuf.is_empty() {
                let parsed = p.parse_head::<Self>()?;
                if parsed.is_some() {
                    return Ok(parsed);
                }
            }
            let idle = p.inbuf.is_empty();
            if idle {
                if shared.draining.load(Ordering::Relaxed) {
                    return Ok(None);
                }
                p.inbuf.release();
            }
            let (inbuf, client) = (&mut p.inbuf, &mut self.client);
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

    /// Writes a response the gateway made; returns its status, or 0 when the client is gone.
    async fn write_reply(
        &mut self,
        p: &Pipeline<'_>,
        resp: &Response<Bytes>,
        head_only: bool,
        keep_alive: bool,
        id: &RequestId,
    ) -> u16 {
        self.to_client.clear();
        http1::encode_response(resp, head_only, keep_alive, id, &mut self.to_client);
        let idle = p.shared.head_timeout;
        match write_all_progressing(&mut self.client, &self.to_client, idle).await {
            Ok(()) => resp.status().as_u16(),
            Err(_) => 0,
        }
    }
}

/// Consumes the request (head and body) when its body has fully arrived; false when it has not,
/// and the connection must close instead.
fn skip_body(p: &mut Pipeline<'_>, head: &RequestHead) -> bool {
    p.inbuf.consume(head.len);
    let mut body = BodyProgress::new(head.body);
    match body.take(p.inbuf.bytes(), None) {
        Ok(n) => p.inbuf.consume(n),
        Err(_) => return false,
    }
    body.done()
}

impl<C: ClientIo> Session for Conn<C> {
    const SCHEME: &'static str = C::SCHEME;
    const PROTOCOL: Protocol = Protocol::Http11;

    /// Closes the connection after the answer when the request's body is not all in hand.
    async fn reply(
        &mut self,
        p: &mut Pipeline<'_>,
        ex: &mut Exchange<'_>,
        resp: &Response<Bytes>,
    ) -> u16 {
        ex.keep_alive = skip_body(p, &ex.head) && ex.keep_alive;
        self.write_reply(p, resp, ex.head_only, ex.keep_alive, &ex.id)
            .await
    }

    async fn forward(
        &mut self,
        p: &mut Pipeline<'_>,
        ex: &Exchange<'_>,
        to: &Forward<'_>,
        extra: &HeaderMap,
    ) -> (u16, bool) {
        let (head, keep_alive) = (&ex.head, ex.keep_alive);
        let head_only = head.method == Method::HEAD;
        p.inbuf.consume(head.len);
        let mut body = BodyProgress::with_limit(head.body, to.body_limit);
        match body.take(p.inbuf.bytes(), Some(&mut p.to_upstream)) {
            Ok(n) => p.inbuf.consume(n),
            Err(e) => {
                p.failure = Some(response::bad_request_error(e));
                let resp = response::bad_request(e);
                return (
                    self.write_reply(p, &resp, head_only, false, &to.id).await,
                    false,
                );
            }
        }
        let mut timer = match self.upstream_deadline.take() {
            Some(timer) => timer,
            None => LazyDeadline::new(Instant::now() + to.timeout),
        };
        let proxied = self
            .proxy(p, head, to, (&mut timer, &mut body), extra, keep_alive)
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
                let (resp, error) = failure.answer();
                p.failure = Some(error);
                // A request body cut short leaves the client's stream mid-message.
                let keep_alive = keep_alive && body.done();
                let status = self
                    .write_reply(p, &resp, head_only, keep_alive, &to.id)
                    .await;
                (status, keep_alive)
            }
        }
    }
}

impl<C: ClientIo> Conn<C> {
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
        p: &mut Pipeline<'_>,
        head: &RequestHead,
        to: &Forward<'_>,
        (timer, body): (&mut LazyDeadline, &mut BodyProgress),
        extra: &HeaderMap,
        keep_alive: bool,
    ) -> Result<(u16, bool), Failure> {
        let shared = p.shared;
        let streaming = !body.done();
        let mut fresh = false;
        let (clean, done) = loop {
            timer.set(Instant::now() + to.timeout);
            connect(shared, &mut self.upstream, to, fresh, timer).await?;
            let Some(up) = self.upstream.as_mut() else {
                return Err(Failure::Upstream);
            };
            up.carried_body |= head.body != BodyLength::Empty;
            // A streamed body cannot be sent twice.
            let retryable = up.reused && !streaming;
            let answered = if streaming {
                let client = (&mut self.client, &mut self.to_client);
                Ok(streamed(client, up, p, (head, to, extra), (timer, body), keep_alive).await?)
            } else {
                // The whole request is in hand: out it goes, then the answer, within the timeout.
                let exchanged = tokio::select! {
                    biased;
                    h = async {
                        up.io.write_all(&p.to_upstream).await.map_err(|_| Stale)?;
                        let rewrite = for_client(&mut self.to_client, extra, &to.id);
                        read_response_head(&mut up.io, &mut up.buf, &head.method, rewrite).await
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
                    p.upstream_answer = Some((done.0.status, done.0.body.declared()));
                    done
                }
                Err(()) if retryable => {
                    fresh = true;
                    continue;
                }
                Err(()) => return Err(Failure::Upstream),
            };
            let whole = relayed == Relayed::Whole;
            let clean = settle(up, &resp_head, whole, early);
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

/// [`Conn::proxy`] for a request whose body is still to come: the head goes up, the body streams
/// while the answer is awaited (after a `100 Continue` when the client asked for one), and the
/// answer is relayed while whatever is left of the body keeps flowing. Returns the answer's head,
/// whether it came before the whole body went up, whether the client connection stays open, and
/// how far the answer got.
async fn streamed<C: ClientIo>(
    (client, to_client): (&mut C, &mut Vec<u8>),
    up: &mut UpstreamConn,
    p: &mut Pipeline<'_>,
    (head, to, extra): (&RequestHead, &Forward<'_>, &HeaderMap),
    (timer, body): (&mut LazyDeadline, &mut BodyProgress),
    keep_alive: bool,
) -> Result<(ResponseHead, bool, bool, Relayed), Failure> {
    let shared = p.shared;
    let (mut client_read, mut client_write) = client.halves();
    if head.expect_continue {
        let interim = b"HTTP/1.1 100 Continue\r\n\r\n";
        write_all_progressing(&mut client_write, interim, shared.head_timeout)
            .await
            .map_err(|_| Failure::Client)?;
    }
    let (mut up_read, mut up_write) = proxy::halves(&mut up.io);
    let written = tokio::select! {
        biased;
        w = up_write.write_all(&p.to_upstream) => w.is_ok(),
        () = timer.expired() => return Err(Failure::Timeout),
    };
    if !written {
        return Err(Failure::Upstream);
    }
    let mut uploaded = false;
    let mut upload = std::pin::pin!(upload(
        &mut client_read,
        &mut p.inbuf,
        &mut up_write,
        body,
        shared.head_timeout,
        to.timeout,
    ));
    // Until the response head: the upload, then the route's timeout.
    let answered = {
        let rewrite = for_client(to_client, extra, &to.id);
        let mut waiting = std::pin::pin!(read_response_head(
            &mut up_read,
            &mut up.buf,
            &head.method,
            rewrite,
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
        to_client,
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
            u = &mut upload, if !uploaded => {
                uploaded = true;
                // A body refused or broken off: the upstream will not finish its answer, so both
                // connections close rather than wait for it.
                if u.is_err() {
                    break Relayed::HeadOnly;
                }
            }
        }
    };
    Ok((resp_head, early, keep_alive, relayed))
}
