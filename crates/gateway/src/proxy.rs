//! Connections to HTTP upstreams, plain or over TLS. Each client connection owns the upstream
//! connection its requests go over, so a request costs no pool lookup and no hand-off to another
//! task; the shared idle pool is touched only when a client connection starts, ends, or switches
//! upstream.
//!
//! A connection is reused only while nothing is unaccounted for on it: before each reuse it must
//! have nothing to read (a byte the upstream sent unasked is the answer to a request the gateway did
//! not send, such as one hidden in a body the upstream did not read), and it goes to another client
//! only if it never carried a body, since whether an upstream read a body as a body cannot be known.

use std::collections::HashMap;
use std::io;
use std::sync::Mutex;

use http::Uri;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_util::either::Either;

use crate::config::UpstreamTls;
use crate::http1::InBuf;

/// Idle connections kept per upstream: enough for a client fleet's reconnects, bounded so a burst of
/// short-lived clients cannot hoard descriptors.
const MAX_IDLE_PER_UPSTREAM: usize = 256;

/// The bytes to and from an upstream: plain TCP (`Left`) or TLS over it (`Right`; boxed, the session
/// is large and most upstreams are plain). tokio-util's `Either` reads and writes whichever it holds.
pub type UpstreamIo = Either<TcpStream, Box<TlsStream<TcpStream>>>;

/// The read half of [`halves`].
pub type UpstreamReader<'a> =
    Either<tokio::net::tcp::ReadHalf<'a>, tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>>;
/// The write half of [`halves`].
pub type UpstreamWriter<'a> =
    Either<tokio::net::tcp::WriteHalf<'a>, tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>>;

/// A keep-alive connection to one upstream, and the bytes read from it.
#[derive(Debug)]
pub struct UpstreamConn {
    /// The `host[:port]` it is connected to.
    pub authority: String,
    /// 0 for plain TCP, else the TLS configuration it was opened with ([`UpstreamTls::pool_id`]).
    pub tls_id: usize,
    /// The connection.
    pub io: UpstreamIo,
    /// Bytes read and not yet relayed.
    pub buf: InBuf,
    /// Whether it has carried a request before (and so may have been closed by the upstream meanwhile).
    pub reused: bool,
    /// Whether it has carried a request body. Whether an upstream read a body as a body cannot be
    /// known (a sloppy one may read it as requests of its own, and answer them later), so such a
    /// connection serves only the client connection it was opened for, and closes with it.
    pub carried_body: bool,
}

/// Idle upstream connections, by authority.
#[derive(Debug)]
pub struct UpstreamPool {
    idle: Mutex<Idle>,
    /// The most idle connections kept, over all upstreams.
    max_idle: usize,
}

#[derive(Debug, Default)]
struct Idle {
    /// By authority: each connection with its `tls_id`.
    by_authority: HashMap<String, Vec<(usize, UpstreamIo)>>,
    count: usize,
}

impl UpstreamPool {
    /// A pool keeping at most `max_idle` idle connections (and [`MAX_IDLE_PER_UPSTREAM`] per upstream).
    pub fn new(max_idle: usize) -> Self {
        Self {
            idle: Mutex::default(),
            max_idle,
        }
    }

    /// An idle connection to `authority`, made with `tls_id`, that is still quiet.
    fn take(&self, authority: &str, tls_id: usize) -> Option<UpstreamIo> {
        loop {
            let mut io = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                let list = idle.by_authority.get_mut(authority)?;
                let at = list.iter().rposition(|(id, _)| *id == tls_id)?;
                let (_, io) = list.swap_remove(at);
                idle.count -= 1;
                io
            };
            if is_quiet(&mut io) {
                return Some(io);
            }
        }
    }

    /// Keeps `conn` for the next client connection, if nothing is unaccounted for on it.
    pub fn put(&self, mut conn: UpstreamConn) {
        if !conn.buf.is_empty() || conn.carried_body || !is_quiet(&mut conn.io) {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.count >= self.max_idle {
            return;
        }
        let list = idle.by_authority.entry(conn.authority).or_default();
        if list.len() < MAX_IDLE_PER_UPSTREAM {
            list.push((conn.tls_id, conn.io));
            idle.count += 1;
        }
    }

    /// Leaves in `slot` a connection to `url`'s authority (over `tls`, when given) that can carry a
    /// request at once, if there is one: the one already there if it goes to the same place and is
    /// quiet, else a quiet idle one from the pool (a connection to another place goes to the pool).
    /// Returns whether it did; a connection that sent bytes unasked, or closed, is dropped.
    pub fn reuse(
        &self,
        slot: &mut Option<UpstreamConn>,
        url: &Uri,
        tls: Option<&UpstreamTls>,
    ) -> bool {
        let authority = authority(url);
        let tls_id = tls.map_or(0, UpstreamTls::pool_id);
        match slot.as_mut() {
            Some(conn) if conn.authority == authority && conn.tls_id == tls_id => {
                if is_quiet(&mut conn.io) {
                    return true;
                }
                // It sent bytes unasked, or closed: dropped.
                *slot = None;
            }
            Some(_) => {
                if let Some(other) = slot.take() {
                    self.put(other);
                }
            }
            None => {}
        }
        match self.take(authority, tls_id) {
            Some(io) => {
                *slot = Some(UpstreamConn::new(authority, tls_id, io, true));
                true
            }
            None => false,
        }
    }

    /// Opens a new connection to `url` (over `tls`, when given) into `slot`, in place of whatever
    /// was there.
    pub async fn open(
        &self,
        slot: &mut Option<UpstreamConn>,
        url: &Uri,
        tls: Option<&UpstreamTls>,
    ) -> io::Result<()> {
        *slot = None;
        let io = open(url, tls).await?;
        let tls_id = tls.map_or(0, UpstreamTls::pool_id);
        *slot = Some(UpstreamConn::new(authority(url), tls_id, io, false));
        Ok(())
    }
}

impl UpstreamConn {
    fn new(authority: &str, tls_id: usize, io: UpstreamIo, reused: bool) -> Self {
        Self {
            authority: authority.to_owned(),
            tls_id,
            io,
            buf: InBuf::default(),
            reused,
            carried_body: false,
        }
    }
}

/// Whether an idle connection has nothing to read and is still open. Asks the socket itself
/// (`MSG_PEEK`): tokio's cached readiness may not have seen bytes that just arrived. Over TLS, the
/// session must hold no decrypted bytes either.
fn is_quiet(io: &mut UpstreamIo) -> bool {
    let tcp = match io {
        Either::Left(tcp) => &*tcp,
        Either::Right(tls) => {
            let (tcp, session) = tls.get_mut();
            let mut byte = [0u8; 1];
            match io::Read::read(&mut session.reader(), &mut byte) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                // Bytes, or the upstream's close_notify.
                _ => return false,
            }
            &*tcp
        }
    };
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    matches!(
        socket2::SockRef::from(tcp).peek(&mut byte),
        Err(e) if e.kind() == io::ErrorKind::WouldBlock
    )
}

/// Read and write halves of `io`, to upload a body while the answer comes back.
pub fn halves(io: &mut UpstreamIo) -> (UpstreamReader<'_>, UpstreamWriter<'_>) {
    match io {
        Either::Left(tcp) => {
            let (r, w) = tcp.split();
            (Either::Left(r), Either::Left(w))
        }
        Either::Right(tls) => {
            // Both halves drive one TLS session, behind tokio's lock.
            let (r, w) = tokio::io::split(&mut **tls);
            (Either::Right(r), Either::Right(w))
        }
    }
}

/// `url`'s `host[:port]`: what identifies an upstream connection.
fn authority(url: &Uri) -> &str {
    url.authority().map_or("", |a| a.as_str())
}

async fn open(url: &Uri, tls: Option<&UpstreamTls>) -> io::Result<UpstreamIo> {
    // The config accepts only http(s) URLs with an authority; brackets are URI syntax, not the
    // address.
    let host = url.host().unwrap_or_default().trim_matches(['[', ']']);
    let default_port = if tls.is_some() { 443 } else { 80 };
    let tcp = TcpStream::connect((host, url.port_u16().unwrap_or(default_port))).await?;
    tcp.set_nodelay(true)?;
    match tls {
        None => Ok(Either::Left(tcp)),
        Some(tls) => {
            // Opened with the config, before anything is served.
            let config = tls.client.config().ok_or_else(|| {
                io::Error::other("the upstream's TLS configuration was never opened")
            })?;
            let connector = TlsConnector::from(config.clone());
            let stream = connector.connect(tls.server_name.clone(), tcp).await?;
            Ok(Either::Right(Box::new(stream)))
        }
    }
}
