//! A client connection's byte stream: plain TCP, or TLS over it. The connection loop is written
//! once over [`ClientIo`] and compiled for each.

use std::io;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;

/// The HTTP version a request came in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Protocol {
    Http10,
    Http11,
    Http2,
}

impl Protocol {
    /// As AWS's `$context.protocol` names it.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Self::Http10 => "HTTP/1.0",
            Self::Http11 => "HTTP/1.1",
            Self::Http2 => "HTTP/2.0",
        }
    }

    /// As OpenTelemetry's `network.protocol.version` names it.
    pub(crate) fn version(self) -> &'static str {
        match self {
            Self::Http10 => "1.0",
            Self::Http11 => "1.1",
            Self::Http2 => "2",
        }
    }
}

/// What the connection loop needs of a client's stream beyond reading and writing.
pub(crate) trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send + 'static {
    /// The read half of [`ClientIo::halves`].
    type Reader<'a>: AsyncRead + Unpin + Send
    where
        Self: 'a;
    /// The write half of [`ClientIo::halves`].
    type Writer<'a>: AsyncWrite + Unpin + Send
    where
        Self: 'a;

    /// `http` or `https`: what `X-Forwarded-Proto` tells the upstream.
    const SCHEME: &'static str;

    /// Whether a client may open with the HTTP/2 preface, without TLS's ALPN (h2c).
    const PRIOR_KNOWLEDGE: bool = false;

    /// Read and write halves, to upload a body while the answer comes back.
    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>);

    /// Ready when a read may find bytes: an idle connection takes no read buffer until then.
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl ClientIo for TcpStream {
    type Reader<'a> = tokio::net::tcp::ReadHalf<'a>;
    type Writer<'a> = tokio::net::tcp::WriteHalf<'a>;
    const SCHEME: &'static str = "http";
    const PRIOR_KNOWLEDGE: bool = true;

    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        self.split()
    }

    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.poll_read_ready(cx)
    }
}

impl ClientIo for TlsStream<TcpStream> {
    type Reader<'a> = tokio::io::ReadHalf<&'a mut Self>;
    type Writer<'a> = tokio::io::WriteHalf<&'a mut Self>;
    const SCHEME: &'static str = "https";

    fn halves(&mut self) -> (Self::Reader<'_>, Self::Writer<'_>) {
        // Both halves drive one TLS session, so they share it behind tokio's lock; only a
        // streamed upload takes this path.
        tokio::io::split(self)
    }

    fn poll_readable(&self, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The TLS session may already hold decrypted bytes the socket's readiness cannot show.
        Poll::Ready(Ok(()))
    }
}

/// `wait`'s output, or `None` when it is not ready within `idle`. A wait that is ready at once, the
/// common case on the request path, arms no timer (a timer costs more than the write it guards).
pub(crate) async fn within<F: std::future::Future>(
    idle: std::time::Duration,
    wait: F,
) -> Option<F::Output> {
    let mut wait = std::pin::pin!(wait);
    match std::future::poll_fn(|cx| Poll::Ready(wait.as_mut().poll(cx))).await {
        Poll::Ready(out) => Some(out),
        Poll::Pending => tokio::time::timeout(idle, wait).await.ok(),
    }
}

/// Writes all of `data` to a client, giving up (`TimedOut`) when no byte goes out for `idle`: a
/// client that stops reading holds its slot and its upstream connection only that long (nginx's
/// `send_timeout`).
pub(crate) async fn write_all_progressing<W: AsyncWrite + Unpin + ?Sized>(
    to: &mut W,
    mut data: &[u8],
    idle: std::time::Duration,
) -> io::Result<()> {
    use tokio::io::AsyncWriteExt as _;
    while !data.is_empty() {
        let n = within(idle, to.write(data))
            .await
            .ok_or(io::ErrorKind::TimedOut)??;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        data = &data[n..];
    }
    Ok(())
}
