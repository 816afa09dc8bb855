//! Forwarding to an upstream, in pieces the connection loop puts together: the request head as
//! the upstream gets it, the body streamed up, the response head read and rewritten, and the answer
//! relayed to the client; with how each can fail.

use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Method, Response, Uri};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt as _};

use crate::client::{within, write_all_progressing};
use crate::config::UpstreamTls;
use crate::deadline::LazyDeadline;
use crate::http1::{
    self, BodyProgress, HeadError, InBuf, ResponseFields, ResponseHead, ResponseStart,
};
use crate::proxy::UpstreamConn;
use crate::response::{self, UpstreamFailure};
use crate::rewrite;
use crate::state::Shared;
use crate::trace::RequestId;

/// Where an admitted request goes.
pub(crate) struct Forward<'r> {
    pub(crate) url: &'r Uri,
    /// For an `https` upstream.
    pub(crate) tls: Option<&'r UpstreamTls>,
    /// The route's timeout.
    pub(crate) timeout: Duration,
    /// The most request body bytes accepted.
    pub(crate) body_limit: u64,
    /// The request's id, for the answer and the logs.
    pub(crate) id: RequestId,
}

/// How forwarding failed.
pub(crate) enum Failure {
    /// The upstream could not be reached or answered nonsense: 502.
    Upstream,
    /// The upstream did not connect, take the body or answer within the route's timeout: 504.
    Timeout,
    /// The request body was malformed (400) or too long (413).
    Body(HeadError),
    /// The client went away or stalled: nothing more to say to it.
    Client,
}

impl Failure {
    /// AWS's answer for the failure, and its message and gateway response type.
    pub(crate) fn answer(self) -> (Response<Bytes>, (&'static str, &'static str)) {
        match self {
            Self::Body(e) => (response::bad_request(e), response::bad_request_error(e)),
            Self::Timeout => (
                response::upstream_failure(UpstreamFailure::Timeout),
                response::upstream_failure_error(UpstreamFailure::Timeout),
            ),
            Self::Upstream | Self::Client => (
                response::upstream_failure(UpstreamFailure::Unreachable),
                response::upstream_failure_error(UpstreamFailure::Unreachable),
            ),
        }
    }
}

/// How far an answer got to the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Relayed {
    /// Head and body.
    Whole,
    /// The head, not all of the body: the status was sent, the connection cannot go on.
    HeadOnly,
    /// Nothing.
    Nothing,
}

/// The upstream closed or failed before a whole response head arrived.
pub(crate) struct Stale;

/// Leaves in `slot` a connection to the upstream `to` names: one that can be reused unless `fresh`,
/// else a new one, opened before `timer` expires.
pub(crate) async fn connect(
    shared: &Shared,
    slot: &mut Option<UpstreamConn>,
    to: &Forward<'_>,
    fresh: bool,
    timer: &mut LazyDeadline,
) -> Result<(), Failure> {
    if !fresh && shared.upstreams.reuse(slot, to.url, to.tls) {
        return Ok(());
    }
    tokio::select! {
        biased;
        opened = shared.upstreams.open(slot, to.url, to.tls) => opened.map_err(|e| {
            // The why (refused, a certificate that does not verify, …) is only here: the client
            // gets AWS's 502.
            tracing::warn!(request_id = %to.id, upstream = %to.url, error = %e,
                "upstream connection failed");
            Failure::Upstream
        }),
        () = timer.expired() => Err(Failure::Timeout),
    }
}

/// Marks `up` as having carried an exchange whose answer had `head`; returns whether it may carry
/// another: only after a clean exchange, the whole request sent before the answer came (not
/// `early`), the answer completely framed and relayed (`whole`), and not one byte after it.
pub(crate) fn settle(up: &mut UpstreamConn, head: &ResponseHead, whole: bool, early: bool) -> bool {
    let clean = whole && !early && head.reusable && up.buf.is_empty();
    up.reused = true;
    up.buf.release();
    clean
}

/// Reads the upstream's response head (the answer to a `method` request) into `buf`, skipping
/// interim (1xx) responses; a final head's fields go to `rewrite` while they are in place.
pub(crate) async fn read_response_head<R: AsyncRead + Unpin>(
    io: &mut R,
    buf: &mut InBuf,
    method: &Method,
    mut rewrite: impl FnMut(&ResponseFields<'_, '_>),
) -> Result<ResponseHead, Stale> {
    loop {
        if !buf.is_empty() {
            match http1::parse_response(buf.bytes(), method, &mut rewrite) {
                Ok(ResponseStart::Final(head)) => return Ok(head),
                Ok(ResponseStart::Interim(len)) => {
                    buf.consume(len);
                    continue;
                }
                Ok(ResponseStart::Partial) => {}
                Err(_) => return Err(Stale),
            }
        }
        match buf.read_from(io).await {
            Ok(n) if n > 0 => {}
            _ => return Err(Stale),
        }
    }
}

/// The rewrite of a final response head for an HTTP/1.1 client, into `to_client`, with the
/// request's id and without the fields in `extra` (which [`respond`] adds).
pub(crate) fn for_client<'a>(
    to_client: &'a mut Vec<u8>,
    extra: &'a HeaderMap,
    id: &'a RequestId,
) -> impl FnMut(&ResponseFields<'_, '_>) + 'a {
    move |fields| {
        to_client.clear();
        rewrite::response_fields(fields, extra, to_client);
        http1::request_id_line(to_client, id);
    }
}

/// Finishes the response head rewritten in `to_client` (`Connection: close` unless `keep_alive`,
/// the gateway's `extra` fields) and sends it with the body to the client, each write within `idle`
/// of progress.
pub(crate) async fn respond<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    client: &mut W,
    to_client: &mut Vec<u8>,
    up: &mut R,
    up_buf: &mut InBuf,
    resp: &ResponseHead,
    (extra, keep_alive): (&HeaderMap, bool),
    idle: Duration,
) -> Relayed {
    if !keep_alive {
        to_client.extend_from_slice(b"connection: close\r\n");
    }
    http1::write_header_map(to_client, extra);
    to_client.extend_from_slice(b"\r\n");
    up_buf.consume(resp.len);
    let mut body = BodyProgress::new(resp.body);
    let Ok(n) = body.take(up_buf.bytes(), Some(to_client)) else {
        return Relayed::Nothing;
    };
    up_buf.consume(n);
    if write_all_progressing(client, to_client, idle)
        .await
        .is_err()
    {
        return Relayed::Nothing;
    }
    match relay(up, up_buf, client, &mut body, idle).await {
        Ok(()) => Relayed::Whole,
        Err(()) => Relayed::HeadOnly,
    }
}

/// `METHOD <base path><rest>[?query] HTTP/1.1`, then `Host` (the upstream's own).
pub(crate) fn upstream_head(
    out: &mut Vec<u8>,
    method: &Method,
    url: &Uri,
    rest: &[u8],
    query: Option<&[u8]>,
) {
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

/// Streams the rest of a request body from the client (bytes read land in `inbuf`; those past the
/// body stay there) to the upstream, re-encoded when chunked. Each wait for the client is bounded by
/// `idle`, each write to the upstream by `stall`.
pub(crate) async fn upload<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    client: &mut R,
    inbuf: &mut InBuf,
    up: &mut W,
    body: &mut BodyProgress,
    idle: Duration,
    stall: Duration,
) -> Result<(), Failure> {
    let mut scratch = Vec::new();
    while !body.done() {
        match tokio::time::timeout(idle, inbuf.read_from(client)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => return Err(Failure::Client),
        }
        let (n, data) = if body.reencodes() {
            scratch.clear();
            let n = body
                .take(inbuf.bytes(), Some(&mut scratch))
                .map_err(Failure::Body)?;
            (n, &scratch[..])
        } else {
            let n = body.take(inbuf.bytes(), None).map_err(Failure::Body)?;
            (n, &inbuf.bytes()[..n])
        };
        write_up(up, data, stall).await?;
        inbuf.consume(n);
    }
    Ok(())
}

/// Writes `data` to the upstream within `stall`: a failed write is [`Failure::Upstream`], a stalled
/// one [`Failure::Timeout`].
pub(crate) async fn write_up<W: AsyncWrite + Unpin>(
    up: &mut W,
    data: &[u8],
    stall: Duration,
) -> Result<(), Failure> {
    match within(stall, up.write_all(data)).await {
        Some(Ok(())) => Ok(()),
        Some(Err(_)) => Err(Failure::Upstream),
        None => Err(Failure::Timeout),
    }
}

/// Copies the rest of a response body from the upstream to the client through `buf` (empty on
/// entry, except for bytes past the body, which stay), re-encoding a chunked one; a client that
/// takes nothing for `idle` ends it.
async fn relay<R: AsyncRead + Unpin, W: AsyncWrite + Unpin>(
    from: &mut R,
    buf: &mut InBuf,
    to: &mut W,
    body: &mut BodyProgress,
    idle: Duration,
) -> Result<(), ()> {
    let mut scratch = Vec::new();
    while !body.done() {
        match buf.read_from(from).await {
            Ok(0) if matches!(body, BodyProgress::UntilClose) => return Ok(()),
            Ok(n) if n > 0 => {}
            _ => return Err(()),
        }
        let (n, data) = if body.reencodes() {
            scratch.clear();
            let n = body.take(buf.bytes(), Some(&mut scratch)).map_err(|_| ())?;
            (n, &scratch[..])
        } else {
            let n = body.take(buf.bytes(), None).map_err(|_| ())?;
            (n, &buf.bytes()[..n])
        };
        write_all_progressing(to, data, idle)
            .await
            .map_err(|_| ())?;
        buf.consume(n);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use http::Uri;

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
