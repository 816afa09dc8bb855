//! HTTP/1.1 on the wire (RFC 9112), the codec the data plane speaks: request and response heads
//! parsed in place with `httparse` (their framing decided, their fields left for [`crate::rewrite`]
//! to filter), heads the gateway writes itself, and chunked bodies delimited without being decoded.
//! No header maps are built on the request path: heads are copied, not re-encoded.
use std::cell::RefCell;
use std::io::Write as _;
use std::mem::MaybeUninit;
use std::ops::Range;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http::{HeaderMap, Method, Response};

use crate::trace::RequestId;

/// The largest request or response head accepted (nginx: 4 buffers of 8 KiB for large headers).
pub const MAX_HEAD: usize = 64 * 1024;
/// How the HTTP/2 connection preface begins (RFC 9113 §3.4): a plain connection whose first request
/// line starts so, which the parser refuses as soon as it sees the version, speaks HTTP/2 with prior
/// knowledge (the HTTP/2 server checks the rest of the preface).
pub(crate) const HTTP2_PREFACE_START: &[u8] = b"PRI * HTTP/2";

/// The most header fields a head may have.
pub(crate) const MAX_HEADERS: usize = 128;
/// At most this many names in one `Connection` header are honoured as hop-by-hop.
const MAX_CONNECTION_NAMES: usize = 8;

/// Bytes read from a peer and not yet consumed. Consumed bytes are reclaimed lazily, so that a
/// request parsed in place stays valid until the next read.
#[derive(Debug, Default)]
pub struct InBuf {
    data: Vec<u8>,
    start: usize,
}

impl From<Vec<u8>> for InBuf {
    /// Bytes already in hand, as if read.
    fn from(data: Vec<u8>) -> Self {
        Self { data, start: 0 }
    }
}

/// How much a read asks for at once.
const READ_SIZE: usize = 16 * 1024;

impl InBuf {
    /// The unconsumed bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.data[self.start..]
    }

    /// How many unconsumed bytes there are.
    pub fn len(&self) -> usize {
        self.data.len() - self.start
    }

    /// Whether nothing is left unconsumed.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Marks the first `n` unconsumed bytes as used.
    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.data.len());
        if self.start == self.data.len() {
            self.data.clear();
            self.start = 0;
        }
    }

    /// Reads once from `io` into the buffer; `Ok(0)` means the peer closed.
    pub async fn read_from<R: tokio::io::AsyncRead + Unpin>(
        &mut self,
        io: &mut R,
    ) -> std::io::Result<usize> {
        use tokio::io::AsyncReadExt as _;
        if self.data.capacity() == 0 {
            if let Some(spare) = SPARE.with(|s| s.borrow_mut().pop()) {
                self.data = spare;
            }
        }
        if self.start > 0 && self.data.capacity() - self.data.len() < READ_SIZE / 2 {
            self.data.drain(..self.start);
            self.start = 0;
        }
        self.data.reserve(READ_SIZE);
        io.read_buf(&mut self.data).await
    }

    /// Hands the memory to this thread's spares when nothing is left unconsumed: a connection waiting
    /// for its next message holds no buffer (ten thousand idle keep-alive clients cost none).
    pub fn release(&mut self) {
        if !self.is_empty() || self.data.capacity() == 0 {
            return;
        }
        let mut data = std::mem::take(&mut self.data);
        self.start = 0;
        // A buffer grown for a large head goes back to the allocator.
        if data.capacity() <= 2 * READ_SIZE {
            data.clear();
            SPARE.with(|s| {
                let mut spare = s.borrow_mut();
                if spare.len() < MAX_SPARE {
                    spare.push(data);
                }
            });
        }
    }
}

/// Read buffers kept per thread for connections that have bytes to read.
const MAX_SPARE: usize = 256;

thread_local! {
    static SPARE: RefCell<Vec<Vec<u8>>> = const { RefCell::new(Vec::new()) };
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    /// No body.
    Empty,
    /// Exactly this many bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the sender closes (responses only).
    UntilClose,
}

impl BodyLength {
    /// The length the head declared: none for a chunked body or one that runs until close.
    pub fn declared(self) -> Option<u64> {
        match self {
            Self::Empty => Some(0),
            Self::Length(n) => Some(n),
            Self::Chunked | Self::UntilClose => None,
        }
    }
}

/// Why a head (or a body's framing) was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeadError {
    /// Not HTTP/1.x, or framing or fields that cannot be trusted: 400, with what was wrong.
    Malformed(&'static str),
    /// A head too big or with too many fields: 431.
    TooLarge,
    /// A transfer coding other than chunked: 501.
    UnsupportedCoding,
    /// A body over the configured limit: 413.
    BodyTooLarge,
}

impl HeadError {
    /// The status the client gets.
    pub fn status(self) -> http::StatusCode {
        match self {
            HeadError::Malformed(_) => http::StatusCode::BAD_REQUEST,
            HeadError::TooLarge => http::StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            HeadError::UnsupportedCoding => http::StatusCode::NOT_IMPLEMENTED,
            HeadError::BodyTooLarge => http::StatusCode::PAYLOAD_TOO_LARGE,
        }
    }

    /// What the client is told.
    pub fn message(self) -> &'static str {
        match self {
            HeadError::Malformed(why) => why,
            HeadError::TooLarge => "Request Header Fields Too Large",
            HeadError::UnsupportedCoding => "Transfer-Encoding other than chunked is not supported",
            HeadError::BodyTooLarge => "Request Too Long",
        }
    }
}

/// A parsed request head. Ranges index the buffer it was parsed from.
#[derive(Debug)]
pub struct RequestHead {
    /// Length of the head in bytes.
    pub len: usize,
    /// The method.
    pub method: Method,
    /// The path, without the query.
    pub path: Range<usize>,
    /// The query, without the `?`.
    pub query: Option<Range<usize>>,
    /// The first `x-api-key` value.
    pub api_key: Option<Range<usize>>,
    /// The `Origin` value.
    pub origin: Option<Range<usize>>,
    /// The first `traceparent` value.
    pub traceparent: Option<Range<usize>>,
    /// The first `tracestate` value (forwarded only with the trace it belongs to).
    pub tracestate: Option<Range<usize>>,
    /// The first `User-Agent` value.
    pub user_agent: Option<Range<usize>>,
    /// The `Authorization` value (a JWT caller's token).
    pub authorization: Option<Range<usize>>,
    /// An HTTP/1.0 request.
    pub http10: bool,
    /// How the body is delimited.
    pub body: BodyLength,
    /// Whether the client wants the connection kept open afterwards.
    pub keep_alive: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
}

/// The byte offset of `part` inside `buf` (`part` must be a subslice of `buf`).
fn range_in(buf: &[u8], part: &[u8]) -> Range<usize> {
    let start = part.as_ptr() as usize - buf.as_ptr() as usize;
    start..start + part.len()
}

/// Whether the field name `name` is `lower` (any case).
pub(crate) fn is(name: &str, lower: &str) -> bool {
    name.len() == lower.len() && name.eq_ignore_ascii_case(lower)
}

/// The header names a `Connection` header lists besides `close` and `keep-alive`, and what it says
/// about persistence.
#[derive(Default)]
pub(crate) struct ConnectionHeader<'b> {
    close: bool,
    keep_alive: bool,
    named: [&'b str; MAX_CONNECTION_NAMES],
    count: usize,
}

impl<'b> ConnectionHeader<'b> {
    fn add(&mut self, value: &'b [u8]) {
        let Ok(value) = std::str::from_utf8(value) else {
            return;
        };
        for token in value.split(',').map(str::trim) {
            if is(token, "close") {
                self.close = true;
            } else if is(token, "keep-alive") {
                self.keep_alive = true;
            } else if !token.is_empty() && self.count < MAX_CONNECTION_NAMES {
                self.named[self.count] = token;
                self.count += 1;
            }
        }
    }

    /// Whether `name` was listed as hop-by-hop.
    pub(crate) fn names(&self, name: &str) -> bool {
        self.named[..self.count]
            .iter()
            .any(|n| n.eq_ignore_ascii_case(name))
    }
}

/// A `Content-Length` value: digits only (RFC 9110 §8.6); a repeated header must agree.
fn content_length(value: &[u8], seen: Option<u64>) -> Result<u64, HeadError> {
    if value.is_empty() || value.len() > 18 || !value.iter().all(u8::is_ascii_digit) {
        return Err(HeadError::Malformed("Invalid Content-Length"));
    }
    let n = value.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
    match seen {
        Some(prior) if prior != n => Err(HeadError::Malformed("Conflicting Content-Length fields")),
        _ => Ok(n),
    }
}

/// A set of bytes as a lookup table: the ASCII letters and digits, and `extra`. Byte classes the
/// request path checks on every request (path segments, `Host`) are tables, built at compile time.
pub(crate) const fn byte_set(extra: &[u8]) -> [bool; 256] {
    let mut set = [false; 256];
    let mut i = 0;
    while i < extra.len() {
        set[extra[i] as usize] = true;
        i += 1;
    }
    let mut b = 0u8;
    while b < 128 {
        if b.is_ascii_alphanumeric() {
            set[b as usize] = true;
        }
        b += 1;
    }
    set
}

/// Bytes a `Host` may hold (RFC 9110 §7.2: `uri-host [ ":" port ]`): reg-name, IPv4 and bracketed
/// IPv6 characters, and nothing that could start a path, a query or userinfo.
static HOST_BYTE: [bool; 256] = byte_set(b"-._~!$&'()*+,=%:[]");

/// Whether `value` is a valid `Host` (or empty, which RFC 9110 allows).
fn valid_host(value: &[u8]) -> bool {
    value.iter().all(|&b| HOST_BYTE[usize::from(b)])
}

/// Whether a `Transfer-Encoding` value ends in `chunked` (the only coding whose end we can find).
fn ends_chunked(value: &[u8]) -> bool {
    std::str::from_utf8(value)
        .ok()
        .and_then(|v| v.rsplit(',').next())
        .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
}

/// A request method, as the gateway routes it. Methods are case-sensitive (RFC 9110 §9.1), but
/// Flask, Django and Rails upper-case them: a `delete` that no `DELETE` route would match could
/// reach a backend that reads it as `DELETE`. So a method with a lower-case letter is refused
/// outright (every standard and registered method is upper case).
pub(crate) fn parse_method(raw: &[u8]) -> Result<Method, HeadError> {
    if raw.iter().any(u8::is_ascii_lowercase) {
        return Err(HeadError::Malformed(
            "Method names are case-sensitive: send them in upper case",
        ));
    }
    Method::from_bytes(raw).map_err(|_| HeadError::Malformed("Invalid method"))
}

/// A parsed request head's fields as they came, handed to the proxy's rewrite.
pub(crate) struct RequestFields<'h, 'b> {
    pub fields: &'h [httparse::Header<'b>],
    /// What the `Connection` fields named.
    pub connection: &'h ConnectionHeader<'b>,
    /// The `Host` value, valid when present.
    pub host: Option<&'b [u8]>,
}

/// Parses a request head at the start of `buf`. `Ok(None)`: incomplete, read more. Framing that
/// could be read two ways (RFC 9112 §6.1, §3.2) is refused. The fields of a head accepted are
/// handed to `rewrite` while they are still in place (no copy of them is returned).
pub(crate) fn parse_request(
    buf: &[u8],
    rewrite: impl FnOnce(&RequestFields<'_, '_>),
) -> Result<Option<RequestHead>, HeadError> {
    // Left uninitialised: httparse writes the fields it parses, and initialising 128 of them
    // cost ~350 instructions a head (measured with bench/instructions.sh).
    let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) if buf.len() >= MAX_HEAD => return Err(HeadError::TooLarge),
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed("Malformed request")),
    };
    if len > MAX_HEAD {
        return Err(HeadError::TooLarge);
    }
    let method = parse_method(req.method.unwrap_or_default().as_bytes())?;
    let target = req.path.ok_or(HeadError::Malformed("Malformed request"))?;
    // Origin form only: a gateway is not a forward proxy.
    if !target.starts_with('/') {
        return Err(HeadError::Malformed("The request target must be a path"));
    }
    let http10 = req.version == Some(0);
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(range_in(buf, q.as_bytes()))),
        None => (target, None),
    };

    let mut connection = ConnectionHeader::default();
    let mut length = None;
    let mut chunked = false;
    let mut api_key = None;
    let mut origin = None;
    let mut traceparent = None;
    let mut tracestate = None;
    let mut user_agent = None;
    let mut authorization = None;
    let mut expect_continue = false;
    let mut host = None;
    let mut hosts = 0;
    for h in req.headers.iter() {
        let name = h.name;
        match name.len() {
            4 if is(name, "host") => {
                hosts += 1;
                host = Some(h.value);
            }
            6 if is(name, "origin") => origin = origin.or(Some(range_in(buf, h.value))),
            6 if is(name, "expect") => {
                expect_continue |= h.value.eq_ignore_ascii_case(b"100-continue");
            }
            // Two keys: the upstream might read the one that was not checked.
            9 if is(name, "x-api-key") => {
                if api_key.is_some() {
                    return Err(HeadError::Malformed("More than one x-api-key field"));
                }
                api_key = Some(range_in(buf, h.value));
            }
            10 if is(name, "connection") => connection.add(h.value),
            10 if is(name, "user-agent") => {
                user_agent = user_agent.or(Some(range_in(buf, h.value)));
            }
            10 if is(name, "tracestate") => {
                tracestate = tracestate.or(Some(range_in(buf, h.value)));
            }
            11 if is(name, "traceparent") => {
                traceparent = traceparent.or(Some(range_in(buf, h.value)));
            }
            // Two tokens: the upstream might read the one that was not checked.
            13 if is(name, "authorization") => {
                if authorization.is_some() {
                    return Err(HeadError::Malformed("More than one Authorization field"));
                }
                authorization = Some(range_in(buf, h.value));
            }
            14 if is(name, "content-length") => length = Some(content_length(h.value, length)?),
            17 if is(name, "transfer-encoding") => {
                if http10 {
                    return Err(HeadError::Malformed(
                        "Transfer-Encoding in an HTTP/1.0 request",
                    ));
                }
                if !ends_chunked(h.value) {
                    return Err(HeadError::UnsupportedCoding);
                }
                chunked = true;
            }
            _ => {}
        }
    }
    // RFC 9112 §3.2: exactly one valid Host (HTTP/1.0 may omit it).
    match (hosts, host) {
        (0, _) if !http10 => return Err(HeadError::Malformed("Missing Host field")),
        (2.., _) => return Err(HeadError::Malformed("More than one Host field")),
        (_, Some(h)) if !valid_host(h) => return Err(HeadError::Malformed("Invalid Host field")),
        _ => {}
    }
    let body = match (chunked, length) {
        // Both: a request-smuggling vector (RFC 9112 §6.1); refuse rather than guess.
        (true, Some(_)) => {
            return Err(HeadError::Malformed(
                "Both Content-Length and Transfer-Encoding",
            ));
        }
        (true, None) => BodyLength::Chunked,
        (false, Some(0) | None) => BodyLength::Empty,
        (false, Some(n)) => BodyLength::Length(n),
    };
    let keep_alive = if http10 {
        connection.keep_alive && !connection.close
    } else {
        !connection.close
    };
    rewrite(&RequestFields {
        fields: req.headers,
        connection: &connection,
        host,
    });
    Ok(Some(RequestHead {
        len,
        method,
        path: range_in(buf, path.as_bytes()),
        query,
        api_key,
        origin,
        traceparent,
        tracestate,
        user_agent,
        authorization,
        http10,
        body,
        keep_alive,
        expect_continue,
    }))
}

/// Appends `name: value\r\n`.
pub(crate) fn header_line(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

/// A parsed response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    /// Length of the head in bytes.
    pub len: usize,
    /// The status code.
    pub status: u16,
    /// How the body is delimited.
    pub body: BodyLength,
    /// Whether the connection may carry another request.
    pub reusable: bool,
}

/// What the upstream's bytes hold so far.
#[derive(Debug, PartialEq, Eq)]
pub enum ResponseStart {
    /// Not a whole head yet.
    Partial,
    /// An interim (1xx) response of this many bytes, to skip.
    Interim(usize),
    /// A final response head.
    Final(ResponseHead),
}

/// A final response head's fields as they came, handed to the proxy's rewrite.
pub(crate) struct ResponseFields<'h, 'b> {
    pub head: &'h ResponseHead,
    pub reason: &'b str,
    pub fields: &'h [httparse::Header<'b>],
    /// What the `Connection` fields named.
    pub connection: &'h ConnectionHeader<'b>,
    /// A `Transfer-Encoding` was present: any `Content-Length` is the coding's business.
    pub coded: bool,
    pub has_date: bool,
}

/// Parses the response head at the start of `buf` (the answer to a `method` request) and decides
/// its framing (RFC 9112 §6.3, in its order). The fields of a final head are handed to `rewrite`
/// while they are still in place.
pub(crate) fn parse_response(
    buf: &[u8],
    method: &Method,
    rewrite: impl FnOnce(&ResponseFields<'_, '_>),
) -> Result<ResponseStart, HeadError> {
    // Uninitialised, as in parse_request.
    let mut fields = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut fields,
    ) {
        Ok(httparse::Status::Complete(len)) if len <= MAX_HEAD => len,
        Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => return Ok(ResponseStart::Partial),
        Ok(_) | Err(httparse::Error::TooManyHeaders) => return Err(HeadError::TooLarge),
        Err(_) => return Err(HeadError::Malformed("Malformed response")),
    };
    let status = resp
        .code
        .ok_or(HeadError::Malformed("Malformed response"))?;
    if (100..200).contains(&status) {
        // 101 would switch protocols, which the gateway never asks for (Upgrade is not forwarded).
        return if status == 101 {
            Err(HeadError::Malformed("Unrequested protocol switch"))
        } else {
            Ok(ResponseStart::Interim(len))
        };
    }
    let http10 = resp.version == Some(0);
    let mut connection = ConnectionHeader::default();
    let mut length = None;
    let mut chunked = false;
    let mut coded = false;
    let mut has_date = false;
    for h in resp.headers.iter() {
        match h.name.len() {
            4 if is(h.name, "date") => has_date = true,
            10 if is(h.name, "connection") => connection.add(h.value),
            14 if is(h.name, "content-length") => length = Some(content_length(h.value, length)?),
            17 if is(h.name, "transfer-encoding") => {
                coded = true;
                chunked = ends_chunked(h.value);
            }
            _ => {}
        }
    }
    let body = if *method == Method::HEAD || status == 204 || status == 304 {
        BodyLength::Empty
    } else if coded {
        if chunked {
            BodyLength::Chunked
        } else {
            BodyLength::UntilClose
        }
    } else {
        match length {
            Some(0) => BodyLength::Empty,
            Some(n) => BodyLength::Length(n),
            None => BodyLength::UntilClose,
        }
    };
    // Both a coding and a length may be an attempt at response splitting: relay by the coding
    // (RFC 9112 §6.3), then close.
    let reusable = body != BodyLength::UntilClose
        && !connection.close
        && (!http10 || connection.keep_alive)
        && !(coded && length.is_some());
    let head = ResponseHead {
        len,
        status,
        body,
        reusable,
    };
    rewrite(&ResponseFields {
        head: &head,
        reason: resp.reason.unwrap_or_default(),
        fields: resp.headers,
        connection: &connection,
        coded,
        has_date,
    });
    Ok(ResponseStart::Final(head))
}

/// Appends a status line, as HTTP/1.1.
pub(crate) fn status_line(out: &mut Vec<u8>, status: u16, reason: &str) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason.as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// Appends the field that frames a body of `body`'s kind when it was re-framed (none for an
/// empty body or one that runs until close).
pub(crate) fn framing_line(out: &mut Vec<u8>, body: BodyLength) {
    match body {
        BodyLength::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        BodyLength::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        BodyLength::Empty | BodyLength::UntilClose => {}
    }
}

/// Appends a response the gateway wrote itself: status line, its headers, the request's id, `Date`,
/// the length, and `Connection: close` unless `keep_alive`; then the body (none for a `HEAD`
/// request).
pub fn encode_response(
    resp: &Response<Bytes>,
    head_only: bool,
    keep_alive: bool,
    id: &RequestId,
    out: &mut Vec<u8>,
) {
    let status = resp.status();
    status_line(
        out,
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
    );
    write_header_map(out, resp.headers());
    request_id_line(out, id);
    date_header(out);
    let _ = write!(out, "content-length: {}\r\n", resp.body().len());
    if !keep_alive {
        out.extend_from_slice(b"connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");
    if !head_only {
        out.extend_from_slice(resp.body());
    }
}

/// Appends `x-amzn-RequestId` (AWS's spelling) with `id`.
pub(crate) fn request_id_line(out: &mut Vec<u8>, id: &RequestId) {
    header_line(out, b"x-amzn-RequestId", id.as_str().as_bytes());
}

/// Appends every field of `headers` as header lines.
pub fn write_header_map(out: &mut Vec<u8>, headers: &HeaderMap) {
    for (name, value) in headers {
        header_line(out, name.as_str().as_bytes(), value.as_bytes());
    }
}

/// Appends `date: <IMF-fixdate>\r\n`, formatted at most once a second per thread.
pub(crate) fn date_header(out: &mut Vec<u8>) {
    date(|date| {
        out.extend_from_slice(b"date: ");
        out.extend_from_slice(date);
        out.extend_from_slice(b"\r\n");
    });
}

/// Hands the current time as an HTTP date to `with`: formatted once a second per thread.
pub(crate) fn date<T>(with: impl FnOnce(&[u8]) -> T) -> T {
    thread_local! {
        static CACHED: RefCell<(u64, [u8; 29])> = const { RefCell::new((u64::MAX, [b' '; 29])) };
    }
    let now = SystemTime::now();
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let text = httpdate::fmt_http_date(now);
            if text.len() == 29 {
                c.1.copy_from_slice(text.as_bytes());
                c.0 = secs;
            }
        }
        with(&c.1)
    })
}

/// Where a [`ChunkedDecoder`] is in the chunked syntax (RFC 9112 §7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
enum Chunked {
    /// In a chunk-size's hex digits.
    #[default]
    Size,
    /// After the digits: whitespace, then `;` or CR.
    SizeEnd,
    /// In chunk extensions, up to CR.
    Extension,
    /// Expecting the LF of a chunk-size line.
    SizeLf,
    /// Inside a chunk's data.
    Data {
        /// Bytes left in the chunk.
        left: u64,
    },
    /// Expecting the CR after a chunk's data.
    DataCr,
    /// Expecting the LF after a chunk's data.
    DataLf,
    /// At the start of a trailer field line, or of the final CRLF.
    TrailerStart,
    /// In a trailer field's name.
    TrailerName,
    /// In a trailer field's value, up to CR.
    TrailerValue,
    /// Expecting the LF of a trailer field line.
    TrailerLf,
    /// Expecting the LF of the final CRLF.
    LastLf,
    /// The body is complete.
    Done,
}

/// Most bytes of chunk extensions and trailer fields in one body, as for a head.
const MAX_CHUNK_METADATA: usize = MAX_HEAD;

/// Reads a chunked body strictly (CRLF line ends only, no control characters, trailer lines that
/// are header fields) and re-encodes it canonically: the data in chunks, without extensions or
/// trailers (which tollgate does not forward, as AWS does not). What reaches the other side is then
/// exactly the data this decoder saw, whatever a sloppy peer would have made of the original.
#[derive(Debug, Clone, Copy)]
pub struct ChunkedDecoder {
    state: Chunked,
    size: u64,
    digits: u8,
    metadata: usize,
    /// Data bytes announced so far.
    data: u64,
    /// The most data bytes accepted.
    limit: u64,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        Self::with_limit(u64::MAX)
    }
}

/// Bytes of a field name (RFC 9110 `tchar`).
static TCHAR: [bool; 256] = byte_set(b"!#$%&'*+-.^_`|~");

fn is_tchar(b: u8) -> bool {
    TCHAR[usize::from(b)]
}

/// A control character other than horizontal tab (a bare CR or LF among them).
fn is_ctl(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

impl ChunkedDecoder {
    /// A decoder refusing bodies of more than `limit` data bytes.
    pub fn with_limit(limit: u64) -> Self {
        Self {
            state: Chunked::Size,
            size: 0,
            digits: 0,
            metadata: 0,
            data: 0,
            limit,
        }
    }

    /// Whether the body's end has been seen.
    pub fn done(&self) -> bool {
        self.state == Chunked::Done
    }

    /// Reads `bytes` (the body's next bytes) and appends their canonical re-encoding to `out` (when
    /// given). Returns how many bytes belong to the body: fewer than given only when the end is
    /// inside `bytes`.
    pub fn decode(&mut self, bytes: &[u8], out: Option<&mut Vec<u8>>) -> Result<usize, HeadError> {
        self.decode_into(bytes, out, true)
    }

    /// As [`ChunkedDecoder::decode`], appending the body's data alone (for a peer that frames
    /// data itself, as HTTP/2 does).
    pub fn decode_data(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<usize, HeadError> {
        self.decode_into(bytes, Some(out), false)
    }

    #[inline(always)]
    fn decode_into(
        &mut self,
        bytes: &[u8],
        mut out: Option<&mut Vec<u8>>,
        framed: bool,
    ) -> Result<usize, HeadError> {
        const BAD: HeadError = HeadError::Malformed("Malformed chunked body");
        let mut i = 0;
        while i < bytes.len() {
            let b = bytes[i];
            match self.state {
                Chunked::Size => match (b as char).to_digit(16) {
                    Some(d) if self.digits < 15 => {
                        self.size = self.size << 4 | u64::from(d);
                        self.digits += 1;
                    }
                    None if self.digits > 0 => {
                        self.state = Chunked::SizeEnd;
                        continue;
                    }
                    _ => return Err(BAD),
                },
                Chunked::SizeEnd => match b {
                    b' ' | b'\t' => {}
                    b';' => self.state = Chunked::Extension,
                    b'\r' => self.state = Chunked::SizeLf,
                    _ => return Err(BAD),
                },
                Chunked::Extension => match b {
                    b'\r' => self.state = Chunked::SizeLf,
                    b if is_ctl(b) => return Err(BAD),
                    _ => self.metadata_byte()?,
                },
                Chunked::SizeLf => {
                    if b != b'\n' {
                        return Err(BAD);
                    }
                    let size = std::mem::take(&mut self.size);
                    self.digits = 0;
                    self.state = if size == 0 {
                        Chunked::TrailerStart
                    } else {
                        self.data = self.data.saturating_add(size);
                        if self.data > self.limit {
                            return Err(HeadError::BodyTooLarge);
                        }
                        Chunked::Data { left: size }
                    };
                }
                Chunked::Data { left } => {
                    let take = left.min((bytes.len() - i) as u64);
                    let span = &bytes[i..i + take as usize];
                    match out.as_deref_mut() {
                        Some(out) if framed => chunk(out, span),
                        Some(out) => out.extend_from_slice(span),
                        None => {}
                    }
                    i += span.len();
                    self.state = if take == left {
                        Chunked::DataCr
                    } else {
                        Chunked::Data { left: left - take }
                    };
                    continue;
                }
                Chunked::DataCr if b == b'\r' => self.state = Chunked::DataLf,
                Chunked::DataLf if b == b'\n' => self.state = Chunked::Size,
                Chunked::DataCr | Chunked::DataLf => return Err(BAD),
                Chunked::TrailerStart => match b {
                    b'\r' => self.state = Chunked::LastLf,
                    b if is_tchar(b) => {
                        self.metadata_byte()?;
                        self.state = Chunked::TrailerName;
                    }
                    _ => return Err(BAD),
                },
                Chunked::TrailerName => match b {
                    b':' => self.state = Chunked::TrailerValue,
                    b if is_tchar(b) => self.metadata_byte()?,
                    _ => return Err(BAD),
                },
                Chunked::TrailerValue => match b {
                    b'\r' => self.state = Chunked::TrailerLf,
                    b if is_ctl(b) => return Err(BAD),
                    _ => self.metadata_byte()?,
                },
                Chunked::TrailerLf if b == b'\n' => self.state = Chunked::TrailerStart,
                Chunked::TrailerLf => return Err(BAD),
                Chunked::LastLf => {
                    if b != b'\n' {
                        return Err(BAD);
                    }
                    self.state = Chunked::Done;
                    if let (Some(out), true) = (out, framed) {
                        out.extend_from_slice(b"0\r\n\r\n");
                    }
                    return Ok(i + 1);
                }
                Chunked::Done => return Ok(i),
            }
            i += 1;
        }
        Ok(i)
    }

    fn metadata_byte(&mut self) -> Result<(), HeadError> {
        self.metadata += 1;
        if self.metadata > MAX_CHUNK_METADATA {
            return Err(HeadError::Malformed(
                "Chunk extensions or trailers too large",
            ));
        }
        Ok(())
    }
}

/// Appends `data` as one chunk of a chunked body.
pub(crate) fn chunk(out: &mut Vec<u8>, data: &[u8]) {
    let _ = write!(out, "{:x}\r\n", data.len());
    out.extend_from_slice(data);
    out.extend_from_slice(b"\r\n");
}

/// Tracks a body being relayed: how much of the peer's next bytes belong to it.
#[derive(Debug, Clone, Copy)]
pub enum BodyProgress {
    /// Bytes left of a fixed-length body.
    Length(u64),
    /// A chunked body, re-encoded as it is relayed.
    Chunked(ChunkedDecoder),
    /// Everything until the peer closes.
    UntilClose,
}

impl BodyProgress {
    /// Progress at the start of a body delimited by `length`.
    pub fn new(length: BodyLength) -> Self {
        Self::with_limit(length, u64::MAX)
    }

    /// Progress at the start of a body delimited by `length` whose data may not exceed `limit`
    /// bytes (a fixed length is checked against it before the body is read).
    pub fn with_limit(length: BodyLength, limit: u64) -> Self {
        match length {
            BodyLength::Empty => BodyProgress::Length(0),
            BodyLength::Length(n) => BodyProgress::Length(n),
            BodyLength::Chunked => BodyProgress::Chunked(ChunkedDecoder::with_limit(limit)),
            BodyLength::UntilClose => BodyProgress::UntilClose,
        }
    }

    /// Whether the body is complete.
    pub fn done(&self) -> bool {
        match self {
            BodyProgress::Length(n) => *n == 0,
            BodyProgress::Chunked(c) => c.done(),
            BodyProgress::UntilClose => false,
        }
    }

    /// Whether what is relayed differs from what was read (so it must go through a buffer).
    pub fn reencodes(&self) -> bool {
        matches!(self, BodyProgress::Chunked(_))
    }

    /// As [`BodyProgress::take`], appending the body's data alone: a chunked body is decoded.
    pub fn take_data(&mut self, bytes: &[u8], out: &mut Vec<u8>) -> Result<usize, HeadError> {
        match self {
            BodyProgress::Chunked(c) => c.decode_data(bytes, out),
            _ => self.take(bytes, Some(out)),
        }
    }

    /// Takes the body's share of `bytes`: returns how many of them belong to it, and appends what
    /// is to be relayed of them to `out` when given (the bytes themselves, or a chunked body's
    /// canonical re-encoding).
    pub fn take(&mut self, bytes: &[u8], out: Option<&mut Vec<u8>>) -> Result<usize, HeadError> {
        let n = match self {
            BodyProgress::Length(n) => {
                let take = (*n).min(bytes.len() as u64);
                *n -= take;
                take as usize
            }
            BodyProgress::Chunked(c) => return c.decode(bytes, out),
            BodyProgress::UntilClose => bytes.len(),
        };
        if let Some(out) = out {
            out.extend_from_slice(&bytes[..n]);
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(raw: &[u8]) -> Result<Option<RequestHead>, HeadError> {
        parse_request(raw, |_| {})
    }

    #[test]
    fn request_framing_rules() {
        type Want = Result<Option<BodyLength>, HeadError>;
        let bad = |why| Err(HeadError::Malformed(why));
        let cases: [(&[u8], Want); 16] = [
            (b"GET / HTTP/1.1\r\nHost: x\r\n\r\n", Ok(Some(BodyLength::Empty))),
            (b"GET / HTTP/1.1\r\nHost: x\r\n", Ok(None)),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
                Ok(Some(BodyLength::Chunked)),
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
                Err(HeadError::UnsupportedCoding),
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n",
                bad("Both Content-Length and Transfer-Encoding"),
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n",
                bad("Conflicting Content-Length fields"),
            ),
            (
                b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n",
                bad("Invalid Content-Length"),
            ),
            (
                b"GET http://x/ HTTP/1.1\r\nHost: x\r\n\r\n",
                bad("The request target must be a path"),
            ),
            (
                b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
                bad("Transfer-Encoding in an HTTP/1.0 request"),
            ),
            (b"GET / HTTP/1.1\r\n\r\n", bad("Missing Host field")),
            (b"GET / HTTP/1.0\r\n\r\n", Ok(Some(BodyLength::Empty))),
            (
                b"GET / HTTP/1.0\r\nHost: a\r\nHost: b\r\n\r\n",
                bad("More than one Host field"),
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a/b\r\n\r\n",
                bad("Invalid Host field"),
            ),
            (
                b"GET / HTTP/1.1\r\nHost: a\r\nAuthorization: Bearer a\r\nauthorization: Bearer b\r\n\r\n",
                bad("More than one Authorization field"),
            ),
            (
                b"GET / HTTP/1.1\r\nHost: [::1]:8080\r\n\r\n",
                Ok(Some(BodyLength::Empty)),
            ),
            (
                b"GET / HTTP/1.1\r\nHost: x\r\nx-api-key: a\r\nX-Api-Key: b\r\n\r\n",
                bad("More than one x-api-key field"),
            ),
        ];
        for (raw, want) in cases {
            let got = req(raw).map(|h| h.map(|h| h.body));
            assert_eq!(got, want, "{}", String::from_utf8_lossy(raw));
        }
        let h = req(b"GET / HTTP/1.0\r\n\r\n");
        assert!(!h.unwrap().unwrap().keep_alive);
        let h = req(b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
        assert!(h.unwrap().unwrap().keep_alive);
        let h = req(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        assert!(!h.unwrap().unwrap().keep_alive);
        let many = format!("GET / HTTP/1.1\r\n{}\r\n", "a: b\r\n".repeat(200));
        assert_eq!(req(many.as_bytes()).unwrap_err(), HeadError::TooLarge);
        let huge = format!("GET / HTTP/1.1\r\na: {}", "b".repeat(MAX_HEAD));
        assert_eq!(req(huge.as_bytes()).unwrap_err(), HeadError::TooLarge);
    }

    fn decode_all(body: &[u8]) -> Result<(usize, Vec<u8>), HeadError> {
        let mut d = ChunkedDecoder::default();
        let mut out = Vec::new();
        let n = d.decode(body, Some(&mut out))?;
        assert!(d.done(), "{:?}", String::from_utf8_lossy(body));
        Ok((n, out))
    }

    #[test]
    fn chunked_bodies_are_reencoded_across_splits() {
        let body = b"5;ext=1\r\nhello\r\n10\r\n0123456789abcdef\r\n0\r\nX-Trailer: t\r\n\r\nNEXT";
        let end = body.len() - 4;
        for split in 0..body.len() {
            let mut r = ChunkedDecoder::default();
            let mut out = Vec::new();
            let a = r.decode(&body[..split], Some(&mut out)).unwrap();
            assert_eq!(a, split.min(end));
            if a < split {
                continue;
            }
            let b = r.decode(&body[split..], Some(&mut out)).unwrap();
            assert_eq!(a + b, end, "split at {split}");
            assert!(r.done());
            // The same data, without the extension and the trailer.
            assert_eq!(dechunk(&out), b"hello0123456789abcdef", "split at {split}");
        }
    }

    /// The data of a canonical chunked body.
    fn dechunk(mut body: &[u8]) -> Vec<u8> {
        let mut data = Vec::new();
        loop {
            let eol = body.windows(2).position(|w| w == b"\r\n").unwrap();
            let size =
                usize::from_str_radix(std::str::from_utf8(&body[..eol]).unwrap(), 16).unwrap();
            body = &body[eol + 2..];
            if size == 0 {
                assert_eq!(body, b"\r\n");
                return data;
            }
            data.extend_from_slice(&body[..size]);
            assert_eq!(&body[size..size + 2], b"\r\n");
            body = &body[size + 2..];
        }
    }

    #[test]
    fn chunked_syntax_is_strict() {
        assert_eq!(
            decode_all(b"0\r\n\r\n").unwrap(),
            (5, b"0\r\n\r\n".to_vec())
        );
        assert!(decode_all(b"3 ; a=\"b\"\r\nabc\r\n0\r\nA: b\r\nC:\r\n\r\n").is_ok());
        for bad in [
            &b"zz\r\n"[..],
            b"5\r\nhelloXX",
            b"\r\n",
            b"fffffffffffffffff\r\n",
            // Bare LF line ends, anywhere.
            b"5\nhello\r\n0\r\n\r\n",
            b"5\r\nhello\n0\r\n\r\n",
            b"0\r\n\n",
            // A bare LF hiding in an extension.
            b"5;a\nb\r\nhello\r\n0\r\n\r\n",
            // A request line where a trailer field belongs.
            b"0\r\nGET /registrations/666/warranty HTTP/1.1\r\nHost: x\r\n\r\n",
            // Folded trailer lines.
            b"0\r\nA: b\r\n c\r\n\r\n",
        ] {
            let mut d = ChunkedDecoder::default();
            assert!(
                d.decode(bad, None).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
        let mut limited = ChunkedDecoder::with_limit(4);
        assert_eq!(
            limited.decode(b"4\r\nabcd\r\n1\r\n", None),
            Err(HeadError::BodyTooLarge)
        );
        let huge_trailer = format!("0\r\nA: {}\r\n\r\n", "b".repeat(MAX_HEAD));
        assert!(
            ChunkedDecoder::default()
                .decode(huge_trailer.as_bytes(), None)
                .is_err()
        );
    }

    mod fuzz {
        use proptest::prelude::*;

        use super::super::*;
        use super::{dechunk, req};

        /// Request heads built from pieces attackers use: odd methods, targets, repeated and
        /// malformed framing fields, bare CR and LF, obsolete folding, NULs.
        fn head() -> impl Strategy<Value = Vec<u8>> {
            let line = prop_oneof![
                Just(b"Host: gw".to_vec()),
                Just(b"Content-Length: 5".to_vec()),
                Just(b"Content-Length: 99999999999999999999".to_vec()),
                Just(b"Transfer-Encoding: chunked".to_vec()),
                Just(b"Transfer-Encoding: gzip, chunked".to_vec()),
                Just(b"Transfer-Encoding: chunked, identity".to_vec()),
                Just(b"Connection: close, x-api-key, host".to_vec()),
                Just(b"x-api-key: k".to_vec()),
                Just(b" folded".to_vec()),
                Just(b"X-Forwarded-For: 1.2.3.4".to_vec()),
                Just(b"Expect: 100-continue".to_vec()),
                proptest::collection::vec(any::<u8>(), 0..24),
            ];
            let target = prop_oneof![
                Just(b"/prod/a".to_vec()),
                Just(b"*".to_vec()),
                Just(b"http://x/".to_vec()),
                proptest::collection::vec(any::<u8>(), 0..32),
            ];
            let method = prop_oneof![
                Just(b"GET".to_vec()),
                Just(b"POST".to_vec()),
                proptest::collection::vec(any::<u8>(), 0..8),
            ];
            let end = prop_oneof![
                Just(b"\r\n".to_vec()),
                Just(b"\n".to_vec()),
                Just(b"\r".to_vec())
            ];
            (
                method,
                target,
                proptest::collection::vec((line, end.clone()), 0..12),
                end,
            )
                .prop_map(|(m, t, lines, end)| {
                    let mut out = m;
                    out.push(b' ');
                    out.extend(t);
                    out.extend_from_slice(b" HTTP/1.1\r\n");
                    for (l, e) in lines {
                        out.extend(l);
                        out.extend(e);
                    }
                    out.extend(end);
                    out
                })
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(2048))]

            #[test]
            fn request_heads_never_panic(raw in head()) {
                if let Ok(Some(h)) = req(&raw) {
                    // A head that parses is framed one way only.
                    prop_assert!(h.len <= raw.len());
                }
            }

            #[test]
            fn arbitrary_bytes_never_panic(raw in proptest::collection::vec(any::<u8>(), 0..600)) {
                let _ = req(&raw);
                let _ = parse_response(&raw, &Method::GET, |_| {});
                let mut out = Vec::new();
                let _ = ChunkedDecoder::default().decode(&raw, Some(&mut out));
            }

            /// A chunked body, however it is cut into reads, decodes to its data, and the
            /// re-encoding decodes to the same data.
            #[test]
            fn chunked_decoding_keeps_exactly_the_data(
                chunks in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..40), 0..8),
                ext in proptest::option::of("[a-z=\"; ]{0,12}"),
                trailers in proptest::collection::vec("[A-Za-z-]{1,8}: [ -~]{0,10}", 0..3),
                cuts in proptest::collection::vec(0usize..400, 0..6),
            ) {
                let mut body = Vec::new();
                let mut data = Vec::new();
                for c in &chunks {
                    body.extend_from_slice(format!("{:X}", c.len()).as_bytes());
                    if let Some(e) = &ext {
                        body.push(b';');
                        body.extend_from_slice(e.as_bytes());
                    }
                    body.extend_from_slice(b"\r\n");
                    body.extend_from_slice(c);
                    body.extend_from_slice(b"\r\n");
                    data.extend_from_slice(c);
                }
                body.extend_from_slice(b"0\r\n");
                for t in &trailers {
                    body.extend_from_slice(t.as_bytes());
                    body.extend_from_slice(b"\r\n");
                }
                body.extend_from_slice(b"\r\n");
                let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c % (body.len() + 1)).collect();
                cuts.sort_unstable();
                let mut decoder = ChunkedDecoder::default();
                let mut out = Vec::new();
                let mut at = 0;
                for cut in cuts.into_iter().chain([body.len()]) {
                    if cut < at { continue; }
                    let n = decoder.decode(&body[at..cut], Some(&mut out)).unwrap();
                    prop_assert_eq!(n, cut - at);
                    at = cut;
                }
                prop_assert!(decoder.done());
                prop_assert_eq!(dechunk(&out), data);
            }
        }
    }

    #[tokio::test]
    async fn buffers_are_held_only_while_bytes_are() {
        let mut buf = InBuf::default();
        let mut io: &[u8] = b"GET / HTTP/1.1\r\n\r\n";
        assert_eq!(buf.read_from(&mut io).await.unwrap(), 18);
        let held = buf.data.as_ptr();
        buf.release();
        assert_eq!(buf.data.as_ptr(), held, "kept while unconsumed");
        buf.consume(18);
        buf.release();
        assert_eq!(buf.data.capacity(), 0, "an idle buffer holds no memory");
        let mut io: &[u8] = b"next";
        assert_eq!(buf.read_from(&mut io).await.unwrap(), 4);
        assert_eq!(buf.data.as_ptr(), held, "the spare is reused");
    }

    #[test]
    fn gateway_responses_encode_with_length_and_date() {
        let mut r = Response::new(Bytes::from_static(b"{}"));
        *r.status_mut() = http::StatusCode::FORBIDDEN;
        r.headers_mut()
            .insert("x-amzn-errortype", "ForbiddenException".parse().unwrap());
        let mut out = Vec::new();
        let id = RequestId::new();
        encode_response(&r, false, false, &id, &mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.starts_with(&format!(
            "HTTP/1.1 403 Forbidden\r\nx-amzn-errortype: ForbiddenException\r\nx-amzn-RequestId: {id}\r\ndate: "
        )));
        assert!(
            text.ends_with(" GMT\r\ncontent-length: 2\r\nconnection: close\r\n\r\n{}"),
            "{text}"
        );
    }
}
