//! Connections to HTTP upstreams. Each client connection owns the upstream connection its requests
//! go over, so a request costs no pool lookup and no hand-off to another task; the shared idle pool
//! is touched only when a client connection starts, ends, or switches upstream.

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
}

/// Idle upstream connections, by authority.
#[derive(Debug, Default)]
pub struct UpstreamPool {
    idle: Mutex<HashMap<String, Vec<TcpStream>>>,
}

impl UpstreamPool {
    fn take(&self, authority: &str) -> Option<TcpStream> {
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        idle.get_mut(authority).and_then(Vec::pop)
    }

    /// Keeps `conn` for the next client connection, if it is clean.
    pub fn put(&self, conn: UpstreamConn) {
        if !conn.buf.is_empty() {
            return;
        }
        let mut idle = self.idle.lock().unwrap_or_else(|e| e.into_inner());
        let list = idle.entry(conn.authority).or_default();
        if list.len() < MAX_IDLE_PER_UPSTREAM {
            list.push(conn.io);
        }
    }

    /// The connection to `url`'s authority in `slot`: the one already there if it goes to the same
    /// place, else an idle one from the pool, else a new one (the one it replaces goes to the pool).
    pub async fn connect<'c>(
        &self,
        slot: &'c mut Option<UpstreamConn>,
        url: &Uri,
    ) -> std::io::Result<&'c mut UpstreamConn> {
        let authority = authority(url);
        let conn = match slot.take() {
            Some(conn) if conn.authority == authority => conn,
            other => {
                if let Some(old) = other {
                    self.put(old);
                }
                match self.take(authority) {
                    Some(io) => UpstreamConn::new(authority, io, true),
                    None => UpstreamConn::new(authority, open(url).await?, false),
                }
            }
        };
        Ok(slot.insert(conn))
    }

    /// Replaces the connection in `slot` with a new one to `url` (after the old one turned out to be
    /// closed).
    pub async fn reconnect<'c>(
        &self,
        slot: &'c mut Option<UpstreamConn>,
        url: &Uri,
    ) -> std::io::Result<&'c mut UpstreamConn> {
        *slot = None;
        let io = open(url).await?;
        Ok(slot.insert(UpstreamConn::new(authority(url), io, false)))
    }
}

impl UpstreamConn {
    fn new(authority: &str, io: TcpStream, reused: bool) -> Self {
        Self {
            authority: authority.to_owned(),
            io,
            buf: InBuf::default(),
            reused,
        }
    }
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
