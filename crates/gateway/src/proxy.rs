//! Connections to HTTP upstreams. Each client connection owns the upstream connection its requests
//! go over, so a request costs no pool lookup and no hand-off to another task; the shared idle pool
//! is touched only when a client connection starts, ends, or switches upstream.
//!
//! A connection is reused only while nothing is unaccounted for on it: before each reuse it must
//! have nothing to read (a byte the upstream sent unasked is the answer to a request the gateway did
//! not send, such as one hidden in a body the upstream did not read), and it goes to another client
//! only if it never carried a body, since whether an upstream read a body as a body cannot be known.

use std::collections::HashMap;
use std::sync::Mutex;

use http::Uri;
use tokio::net::TcpStream;

use crate::http1::InBuf;

/// Idle connections kept per upstream: enough for a client fleet's reconnects, bounded so a burst of
/// short-lived clients cannot hoard descriptors.
const MAX_IDLE_PER_UPSTREAM: usize = 256;

/// A keep-alive connection to one upstream, and the bytes read from it.
#[derive(Debug)]
pub struct UpstreamConn {
    /// The `host[:port]` it is connected to.
    pub authority: String,
    /// The socket.
    pub io: TcpStream,
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
    by_authority: HashMap<String, Vec<TcpStream>>,
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

    /// An idle connection to `authority` that is still quiet.
    fn take(&self, authority: &str) -> Option<TcpStream> {
        loop {
            let io = {
                let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
                let io = idle.by_authority.get_mut(authority).and_then(Vec::pop)?;
                idle.count -= 1;
                io
            };
            if is_quiet(&io) {
                return Some(io);
            }
        }
    }

    /// Keeps `conn` for the next client connection, if nothing is unaccounted for on it.
    pub fn put(&self, conn: UpstreamConn) {
        if !conn.buf.is_empty() || conn.carried_body || !is_quiet(&conn.io) {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        if idle.count >= self.max_idle {
            return;
        }
        let list = idle.by_authority.entry(conn.authority).or_default();
        if list.len() < MAX_IDLE_PER_UPSTREAM {
            list.push(conn.io);
            idle.count += 1;
        }
    }

    /// Leaves in `slot` a connection to `url`'s authority that can carry a request at once, if there
    /// is one: the one already there if it goes to the same place and is quiet, else a quiet idle one
    /// from the pool (a connection to another place goes to the pool). Returns whether it did; a
    /// connection that sent bytes unasked, or closed, is dropped.
    pub fn reuse(&self, slot: &mut Option<UpstreamConn>, url: &Uri) -> bool {
        let authority = authority(url);
        match slot.take() {
            Some(conn) if conn.authority == authority && is_quiet(&conn.io) => {
                *slot = Some(conn);
                return true;
            }
            Some(conn) if conn.authority == authority => {}
            Some(other) => self.put(other),
            None => {}
        }
        match self.take(authority) {
            Some(io) => {
                *slot = Some(UpstreamConn::new(authority, io, true));
                true
            }
            None => false,
        }
    }

    /// Opens a new connection to `url` into `slot`, in place of whatever was there.
    pub async fn open(&self, slot: &mut Option<UpstreamConn>, url: &Uri) -> std::io::Result<()> {
        *slot = None;
        let io = open(url).await?;
        *slot = Some(UpstreamConn::new(authority(url), io, false));
        Ok(())
    }
}

impl UpstreamConn {
    fn new(authority: &str, io: TcpStream, reused: bool) -> Self {
        Self {
            authority: authority.to_owned(),
            io,
            buf: InBuf::default(),
            reused,
            carried_body: false,
        }
    }
}

/// Whether an idle connection has nothing to read and is still open. Asks the socket itself
/// (`MSG_PEEK`): tokio's cached readiness may not have seen bytes that just arrived.
fn is_quiet(io: &TcpStream) -> bool {
    let mut byte = [std::mem::MaybeUninit::<u8>::uninit()];
    matches!(
        socket2::SockRef::from(io).peek(&mut byte),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock
    )
}

/// `url`'s `host[:port]`: what identifies an upstream connection.
fn authority(url: &Uri) -> &str {
    url.authority().map_or("", |a| a.as_str())
}

async fn open(url: &Uri) -> std::io::Result<TcpStream> {
    // The config accepts only http URLs with an authority; brackets are URI syntax, not the address.
    let host = url.host().unwrap_or_default().trim_matches(['[', ']']);
    let io = TcpStream::connect((host, url.port_u16().unwrap_or(80))).await?;
    io.set_nodelay(true)?;
    Ok(io)
}
