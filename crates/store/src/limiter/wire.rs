//! The batcher's own connection to a single Redis server, for the limiter's script calls alone.
//!
//! Hand-rolled because it was measured to matter: going through the `redis` crate's connection
//! manager instead cost the gateway 5,000 instructions a request (29.8k against 24.7k in
//! `bench/instructions.sh`, about two requests a call): the command built, then packed again; a
//! boxed future; a hop through the multiplexer's task and a channel back; the reply parsed into a
//! tree of values. Here the batcher writes the call's RESP straight from its buffers, reads the one reply it
//! waits for into a buffer it keeps, and nothing else shares the connection. It speaks the least of
//! RESP2 that the limiter needs: `AUTH` and `SELECT` from the URL, `EVALSHA`, and `SCRIPT LOAD` when
//! Redis lacks the script. Everything else (the store, `set_remaining`, Redis Cluster) keeps the
//! crate.
//!
//! A connection that fails, times out or answers something unexpected is dropped, so a late reply
//! can never be read as the next call's: the next call connects again.

use std::io;
use std::pin::Pin;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::TcpStream;
use tokio::time::{Instant, Sleep};

/// A byte stream to Redis: TCP (in tests, an in-memory pipe too).
trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// The limiter's connection, made when first needed and again after a failure.
pub(super) struct Wire {
    info: redis::ConnectionInfo,
    stream: Option<Box<dyn Stream>>,
    /// The command being sent (RESP).
    pub(super) out: Vec<u8>,
    /// What was read of the reply.
    input: Vec<u8>,
    /// Where the last reply's string lies in `input`.
    reply: Parsed,
    /// Each call's deadline: one timer, moved later at every call. A timer made per call (as
    /// `tokio::time::timeout` does) is registered with the runtime's timer each time, and when it is
    /// the only one, that wakes the runtime's driver (a write to its eventfd, and a turn of its
    /// loop) once a call. Moving a registered timer later is one atomic swap; it fires at its first
    /// deadline only to be put back at its last one.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl Wire {
    pub(super) fn new(info: redis::ConnectionInfo) -> Self {
        Self {
            info,
            stream: None,
            out: Vec::new(),
            input: Vec::new(),
            reply: Parsed::default(),
            deadline: None,
        }
    }

    /// Sends the command in [`Wire::out`] and reads its reply, connecting first if need be, all
    /// within `timeout`: `Ok(Ok(()))` for a string (then in [`Wire::reply`]), `Ok(Err(message))` for
    /// an error Redis answered.
    pub(super) async fn call(&mut self, timeout: Duration) -> io::Result<Result<(), String>> {
        let end = Instant::now() + timeout;
        let deadline = match &mut self.deadline {
            Some(deadline) => {
                deadline.as_mut().reset(end);
                deadline
            }
            none => none.insert(Box::pin(tokio::time::sleep_until(end))),
        };
        let exchanged = tokio::select! {
            biased;
            exchanged = exchange(&self.info, &mut self.stream, &self.out, &mut self.input) => exchanged,
            () = deadline.as_mut() => Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {timeout:?}"),
            )),
        };
        let at = match exchanged {
            Ok(at) => at,
            Err(e) => {
                self.stream = None;
                return Err(e);
            }
        };
        if at.error {
            return Ok(Err(
                String::from_utf8_lossy(&self.input[at.start..at.end]).into_owned()
            ));
        }
        self.reply = at;
        Ok(Ok(()))
    }

    /// The string of the last reply.
    pub(super) fn reply(&self) -> &[u8] {
        &self.input[self.reply.start..self.reply.end]
    }
}

/// Writes `out` on `stream` (connecting to `info` first if there is none), reads one reply into
/// `input`; answers where its parse ends (a whole reply).
async fn exchange(
    info: &redis::ConnectionInfo,
    stream: &mut Option<Box<dyn Stream>>,
    out: &[u8],
    input: &mut Vec<u8>,
) -> io::Result<Parsed> {
    let stream = match stream {
        Some(stream) => stream,
        none => none.insert(connect(info).await?),
    };
    stream.write_all(out).await?;
    read_reply(stream, input).await
}

/// A new connection to `info`, authenticated and on its database.
async fn connect(info: &redis::ConnectionInfo) -> io::Result<Box<dyn Stream>> {
    let mut stream: Box<dyn Stream> = match info.addr() {
        redis::ConnectionAddr::Tcp(host, port) => {
            let tcp = TcpStream::connect((host.as_str(), *port)).await?;
            // One small write a call, waited for: Nagle would hold it for the previous ACK.
            tcp.set_nodelay(true)?;
            Box::new(tcp)
        }
        other => {
            return Err(io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the limiter cannot connect to {other}"),
            ));
        }
    };
    let settings = info.redis_settings();
    let mut out = Vec::new();
    let mut input = Vec::new();
    if let Some(password) = settings.password() {
        match settings.username() {
            Some(user) => command(&mut out, &[b"AUTH", user.as_bytes(), password.as_bytes()]),
            None => command(&mut out, &[b"AUTH", password.as_bytes()]),
        }
        expect_ok(&mut stream, &mut out, &mut input, "AUTH").await?;
    }
    if settings.db() != 0 {
        let db = settings.db().to_string();
        command(&mut out, &[b"SELECT", db.as_bytes()]);
        expect_ok(&mut stream, &mut out, &mut input, "SELECT").await?;
    }
    Ok(stream)
}

/// Sends `out` (then clears it) and fails unless Redis answers with a string.
async fn expect_ok(
    stream: &mut Box<dyn Stream>,
    out: &mut Vec<u8>,
    input: &mut Vec<u8>,
    what: &str,
) -> io::Result<()> {
    stream.write_all(out).await?;
    out.clear();
    let at = read_reply(stream, input).await?;
    if at.error {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{what}: {}",
                String::from_utf8_lossy(&input[at.start..at.end])
            ),
        ));
    }
    Ok(())
}

/// Appends `args` to `out` as one RESP command.
pub(super) fn command(out: &mut Vec<u8>, args: &[&[u8]]) {
    array(out, args.len());
    for arg in args {
        bulk(out, arg);
    }
}

/// Appends the header of a command of `n` arguments.
pub(super) fn array(out: &mut Vec<u8>, n: usize) {
    out.push(b'*');
    out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends one argument.
pub(super) fn bulk(out: &mut Vec<u8>, arg: &[u8]) {
    out.push(b'$');
    out.extend_from_slice(itoa::Buffer::new().format(arg.len()).as_bytes());
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(arg);
    out.extend_from_slice(b"\r\n");
}

/// The longest reply read: a call's answers take 40 bytes a request, at most 256 requests.
const MOST: usize = 1 << 20;

/// Where a whole reply lies in the input: whether it is an error (`-`) or a string (`+`, `$`), its
/// payload's bounds, and where the reply ends.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Parsed {
    error: bool,
    start: usize,
    end: usize,
    next: usize,
}

/// Reads one reply into `input` (cleared first).
async fn read_reply(stream: &mut Box<dyn Stream>, input: &mut Vec<u8>) -> io::Result<Parsed> {
    input.clear();
    loop {
        if let Some(parsed) = whole(input)? {
            // One call, one reply: anything after it would be read as the next call's.
            if parsed.next != input.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "redis answered more than it was asked",
                ));
            }
            return Ok(parsed);
        }
        if input.capacity() - input.len() < 4096 {
            input.reserve(4096);
        }
        if stream.read_buf(input).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// The reply at the start of `input` once it is all there; an error for a kind the limiter never
/// asks for (an array, an integer, a null) or a malformed one.
fn whole(input: &[u8]) -> io::Result<Option<Parsed>> {
    let Some(eol) = input.windows(2).position(|w| w == b"\r\n") else {
        return Ok(None);
    };
    let bad = |what: &str| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "redis answered {what}: {:?}",
                String::from_utf8_lossy(&input[..eol.min(64)])
            ),
        )
    };
    match input.first() {
        Some(b'+') => Ok(Some(Parsed {
            error: false,
            start: 1,
            end: eol,
            next: eol + 2,
        })),
        Some(b'-') => Ok(Some(Parsed {
            error: true,
            start: 1,
            end: eol,
            next: eol + 2,
        })),
        Some(b'$') => {
            let len: usize = std::str::from_utf8(&input[1..eol])
                .ok()
                .and_then(|n| n.parse().ok())
                .ok_or_else(|| bad("a string of no length"))?;
            if len > MOST {
                return Err(bad("too long a string"));
            }
            let start = eol + 2;
            let end = start + len;
            if input.len() < end + 2 {
                return Ok(None);
            }
            if &input[end..end + 2] != b"\r\n" {
                return Err(bad("a string of another length"));
            }
            Ok(Some(Parsed {
                error: false,
                start,
                end,
                next: end + 2,
            }))
        }
        _ => Err(bad("what the limiter does not ask for")),
    }
}

#[cfg(test)]
mod tests {
    use redis::IntoConnectionInfo as _;

    use super::*;

    #[test]
    fn replies_are_whole_or_wait_for_more() {
        let at = |s: &[u8]| whole(s).unwrap();
        let string = |start, end: usize| {
            Some(Parsed {
                error: false,
                start,
                end,
                next: end + 2,
            })
        };
        assert_eq!(at(b"+OK"), None);
        assert_eq!(at(b"+OK\r\n"), string(1, 3));
        assert_eq!(
            at(b"-NOSCRIPT No matching script\r\n"),
            Some(Parsed {
                error: true,
                start: 1,
                end: 28,
                next: 30,
            })
        );
        assert_eq!(at(b"$5\r\nab"), None);
        assert_eq!(at(b"$5\r\nab\r\nc"), None);
        // A string holding CR LF is read by its length.
        assert_eq!(at(b"$5\r\nab\r\nc\r\n"), string(4, 9));
        assert_eq!(at(b"$0\r\n\r\n"), string(4, 4));
        // What the limiter never asks for, and what no server sends, close the connection.
        for bad in [
            &b"*1\r\n:1\r\n"[..],
            b":1\r\n",
            b"$-1\r\n",
            b"$x\r\n",
            b"$1\r\nabc\r\n",
            b"$18446744073709551615\r\n",
        ] {
            assert!(whole(bad).is_err(), "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[tokio::test]
    async fn a_reply_is_read_whole_and_alone() {
        let (near, mut far) = tokio::io::duplex(64);
        let mut stream: Box<dyn Stream> = Box::new(near);
        let mut input = Vec::new();
        // In two pieces: read until whole.
        far.write_all(b"$5\r\nab").await.unwrap();
        let writer = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            far.write_all(b"\r\nc\r\n").await.unwrap();
            far
        });
        let at = read_reply(&mut stream, &mut input).await.unwrap();
        assert_eq!(&input[at.start..at.end], b"ab\r\nc");
        // Two replies to one call: the connection cannot be trusted to line up any more.
        let mut far = writer.await.unwrap();
        far.write_all(b"+OK\r\n+OK\r\n").await.unwrap();
        let err = read_reply(&mut stream, &mut input).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        // A closed connection in the middle of a reply.
        far.write_all(b"$3\r\na").await.unwrap();
        drop(far);
        let err = read_reply(&mut stream, &mut input).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
    }

    /// One timer serves every call: a call after it fired (while idle) gets a whole timeout again,
    /// a call Redis does not answer fails once its own timeout has passed, and the next call
    /// connects again.
    #[tokio::test]
    async fn each_call_has_its_own_timeout_on_the_one_timer() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let server = tokio::spawn(async move {
            let mut command = [0u8; 14];
            let mut read = async |conn: &mut TcpStream| {
                conn.read_exact(&mut command).await?;
                assert_eq!(&command, b"*1\r\n$4\r\nPING\r\n");
                io::Result::Ok(())
            };
            let (mut first, _) = listener.accept().await.unwrap();
            for _ in 0..2 {
                read(&mut first).await.unwrap();
                first.write_all(b"$4\r\nPONG\r\n").await.unwrap();
            }
            // The third goes unanswered, on a connection left open.
            read(&mut first).await.unwrap();
            let (mut second, _) = listener.accept().await.unwrap();
            while read(&mut second).await.is_ok() {
                second.write_all(b"$4\r\nPONG\r\n").await.unwrap();
            }
            first
        });
        let info = format!("redis://127.0.0.1:{port}")
            .into_connection_info()
            .unwrap();
        let mut wire = Wire::new(info);
        command(&mut wire.out, &[b"PING"]);
        let timeout = Duration::from_millis(100);
        let pong = |wire: &Wire| wire.reply().to_vec();

        wire.call(timeout).await.unwrap().unwrap();
        assert_eq!(pong(&wire), b"PONG");
        // The first call's deadline passes while the wire is idle.
        tokio::time::sleep(3 * timeout).await;
        wire.call(timeout).await.unwrap().unwrap();
        assert_eq!(pong(&wire), b"PONG");

        let started = Instant::now();
        let err = tokio::time::timeout(10 * timeout, wire.call(timeout))
            .await
            .expect("the call's own timeout ends it")
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= timeout, "{:?}", started.elapsed());
        // Connected again: the late answer of the old connection can never be read as this one's.
        wire.call(timeout).await.unwrap().unwrap();
        assert_eq!(pong(&wire), b"PONG");
        drop(wire);
        server.await.unwrap();
    }

    #[test]
    fn commands_are_resp_arrays() {
        let mut out = Vec::new();
        command(&mut out, &[b"AUTH", b"pa\r\nss"]);
        assert_eq!(out, b"*2\r\n$4\r\nAUTH\r\n$6\r\npa\r\nss\r\n");
    }
}
