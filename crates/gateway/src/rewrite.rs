//! The proxy's rewrite of message heads (RFC 9110 §7.6): what of a client's request reaches the
//! upstream, and what of the upstream's response reaches the client. Hop-by-hop fields and those a
//! `Connection` field names are dropped both ways, as are request fields a client could steer a
//! backend with; `X-Forwarded-For`, `-Proto` and `-Host` are set by the gateway, never passed on.
//! Parsing and framing are [`crate::http1`]'s; this module only decides which fields go through.

use std::ops::Range;

use http::HeaderMap;

use crate::http1::{
    self, BodyLength, HeadError, RequestFields, RequestHead, ResponseFields, header_line, is,
};

/// Request fields a client could steer a backend with, dropped unless the config keeps them:
/// `X-Original-URL` and `X-Rewrite-URL` re-route requests on IIS and Symfony, the method overrides
/// turn an admitted `GET` into another method, and `Forwarded` / `X-Real-IP` would let a client
/// claim an address (tollgate sets `X-Forwarded-*` itself).
pub const STEERING_FIELDS: [&str; 7] = [
    "x-original-url",
    "x-rewrite-url",
    "x-http-method-override",
    "x-method-override",
    "x-http-method",
    "forwarded",
    "x-real-ip",
];

/// Which of [`STEERING_FIELDS`] are passed to upstreams anyway, and whether field names with `_` are
/// (the bit above the steering fields': `underscoresInHeaders`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KeptFields(u8);

/// The first of [`STEERING_FIELDS`] that claims an address rather than a method or a path.
const ADDRESS_CLAIMS: u8 = 5;

/// `name`'s place in [`STEERING_FIELDS`], if it is one. By length first: this runs for every field
/// of every request, and most fields are none of these.
fn steering_bit(name: &str) -> Option<u8> {
    Some(match name.len() {
        9 if is(name, "forwarded") => 5,
        9 if is(name, "x-real-ip") => 6,
        13 if is(name, "x-rewrite-url") => 1,
        13 if is(name, "x-http-method") => 4,
        14 if is(name, "x-original-url") => 0,
        17 if is(name, "x-method-override") => 3,
        22 if is(name, "x-http-method-override") => 2,
        _ => return None,
    })
}

/// [`KeptFields`]'s bit for field names with `_`.
const UNDERSCORES: u8 = 1 << STEERING_FIELDS.len();

impl KeptFields {
    /// Keeps also client fields whose names hold `_`, as nginx's `underscores_in_headers on`; but
    /// never one that a CGI-style server would read as a field the gateway checks, drops or sets.
    pub fn keep_underscores(&mut self) {
        self.0 |= UNDERSCORES;
    }

    /// Whether a client's field `name` holding `_` is dropped. CGI-style servers (wsgiref, older
    /// gunicorn and Puma) read `_` as `-`, so `X_Tollgate_Subject` would reach them as the gateway's
    /// own `X-Tollgate-Subject`: by default every such name is dropped (nginx does the same); kept,
    /// a name is still dropped when, read with `-`, it is one the gateway reads, sets or may drop.
    pub(crate) fn drops_underscored(self, name: &str) -> bool {
        if self.0 & UNDERSCORES == 0 {
            return true;
        }
        let mut dashed = [0u8; 128];
        let Some(dashed) = dashed.get_mut(..name.len()) else {
            // Past any name an API means to use: dropped rather than read through.
            return true;
        };
        for (d, b) in dashed.iter_mut().zip(name.bytes()) {
            *d = if b == b'_' { b'-' } else { b };
        }
        // Field names are tokens (ASCII), and `-` for `_` keeps them so.
        let dashed = std::str::from_utf8(dashed).unwrap_or_default();
        // Every steering field's twin, kept or not: a kept one reaches the backend as the client
        // wrote it, once.
        is_gateway_field(dashed)
            || KeptFields::default().drops(dashed)
            || is_read_by_gateway(dashed)
    }

    /// Keeps also the field `name` (any case); false if it is not one of [`STEERING_FIELDS`].
    pub fn keep(&mut self, name: &str) -> bool {
        match STEERING_FIELDS
            .iter()
            .position(|f| f.eq_ignore_ascii_case(name))
        {
            Some(i) => {
                self.0 |= 1 << i;
                true
            }
            None => false,
        }
    }

    /// Whether a client's field `name` is one of the [`STEERING_FIELDS`] not kept.
    pub(crate) fn drops(self, name: &str) -> bool {
        steering_bit(name).is_some_and(|bit| self.0 & (1 << bit) == 0)
    }

    /// Whether a client's field `name` is one of the [`STEERING_FIELDS`] that change the method or
    /// the path a backend serves, not kept. The address claims (`Forwarded`, `X-Real-IP`) are left
    /// out: proxies in front of the decision endpoint set them themselves (Traefik's `X-Real-Ip`).
    pub(crate) fn steers_route(self, name: &str) -> bool {
        steering_bit(name).is_some_and(|bit| bit < ADDRESS_CLAIMS && self.0 & (1 << bit) == 0)
    }
}

/// Whether the client's field `name` is one the gateway sets or replaces itself: `X-Forwarded-*`,
/// its own `X-Tollgate-*` (a JWT caller's subject, a key's id), `Host`, `Expect` and the trace
/// fields, besides hop-by-hop ones.
fn is_gateway_field(name: &str) -> bool {
    // Field names are tokens (ASCII), so the slice is on a character boundary.
    (name.len() > 11
        && (name[..11].eq_ignore_ascii_case("x-forwarded")
            || name[..11].eq_ignore_ascii_case("x-tollgate-")))
        || is_hop_by_hop(name)
        || is(name, "host")
        || is(name, "expect")
        || is(name, "traceparent")
        || is(name, "tracestate")
        || is(name, "x-amzn-requestid")
}

/// Whether the gateway reads the field `name` to decide (the caller's key or token): forwarded as
/// checked, so a twin must not reach the backend beside it.
fn is_read_by_gateway(name: &str) -> bool {
    is(name, "x-api-key") || is(name, "authorization")
}

/// Headers that describe one connection, not the message (RFC 9110 §7.6.1), never forwarded.
/// `Transfer-Encoding` and `Content-Length` are re-emitted by whoever frames the message.
pub(crate) fn is_hop_by_hop(name: &str) -> bool {
    match name.len() {
        2 => is(name, "te"),
        7 => is(name, "trailer") || is(name, "upgrade"),
        10 => is(name, "connection") || is(name, "keep-alive"),
        14 => is(name, "content-length"),
        16 => is(name, "proxy-connection"),
        17 => is(name, "transfer-encoding"),
        18 => is(name, "proxy-authenticate"),
        19 => is(name, "proxy-authorization"),
        _ => false,
    }
}

/// Parses a request head at the start of `buf` (`Ok(None)`: incomplete, read more). On success
/// `forwarded` holds the header lines to send upstream: the client's, minus hop-by-hop ones and
/// those the `Connection` header names, minus `Host`, `Expect` and the [`STEERING_FIELDS`] not in
/// `kept`, plus `X-Forwarded-For` (the client's chain, all its fields in order, with `peer_ip`
/// appended; where it sits in `forwarded` is put in `chain`), `X-Forwarded-Proto` (`scheme`, how the
/// client reached the gateway) and `X-Forwarded-Host`.
pub fn request_head(
    buf: &[u8],
    forwarded: &mut Vec<u8>,
    chain: &mut Range<usize>,
    peer_ip: &str,
    scheme: &str,
    kept: KeptFields,
) -> Result<Option<RequestHead>, HeadError> {
    http1::parse_request(buf, |parsed| {
        *chain = forward_request_fields(parsed, forwarded, (peer_ip, scheme), kept);
    })
}

/// The request header lines for the upstream, into `forwarded` (see [`request_head`]); returns where
/// the `X-Forwarded-For` chain sits in it.
fn forward_request_fields(
    parsed: &RequestFields<'_, '_>,
    forwarded: &mut Vec<u8>,
    (peer_ip, scheme): (&str, &str),
    kept: KeptFields,
) -> Range<usize> {
    forwarded.clear();
    let mut forwarded_for: Option<&[u8]> = None;
    let mut more = false;
    for h in parsed.fields {
        let name = h.name;
        if is(name, "x-forwarded-for") {
            more |= forwarded_for.is_some();
            forwarded_for = forwarded_for.or(Some(h.value));
        }
        // The gateway's own fields replace the client's (the trace fields: see `trace`).
        if is_gateway_field(name)
            || kept.drops(name)
            || parsed.connection.names(name)
            || (name.as_bytes().contains(&b'_') && kept.drops_underscored(name))
        {
            continue;
        }
        header_line(forwarded, name.as_bytes(), h.value);
    }
    forwarded.extend_from_slice(b"x-forwarded-for: ");
    let start = forwarded.len();
    // Several fields are one list, in order (RFC 9110 §5.3): a proxy that adds a field of its own
    // rather than appending to the client's is read as it meant.
    let mut prior = |value: &[u8]| {
        if !value.trim_ascii().is_empty() {
            forwarded.extend_from_slice(value);
            forwarded.extend_from_slice(b", ");
        }
    };
    match forwarded_for {
        Some(value) if !more => prior(value),
        Some(_) => parsed
            .fields
            .iter()
            .filter(|h| is(h.name, "x-forwarded-for"))
            .for_each(|h| prior(h.value)),
        None => {}
    }
    forwarded.extend_from_slice(peer_ip.as_bytes());
    let chain = start..forwarded.len();
    forwarded.extend_from_slice(b"\r\nx-forwarded-proto: ");
    forwarded.extend_from_slice(scheme.as_bytes());
    forwarded.extend_from_slice(b"\r\n");
    if let Some(host) = parsed.host {
        header_line(forwarded, b"x-forwarded-host", host);
    }
    chain
}

/// The rewrite of a parsed response head for the client, into `out`: the status line as HTTP/1.1,
/// the fields [`passes_response_field`] lets through, the framing, and a `Date` if the upstream sent
/// none. The blank line is left to the caller, which may add fields.
pub(crate) fn response_fields(
    parsed: &ResponseFields<'_, '_>,
    replaced: &HeaderMap,
    out: &mut Vec<u8>,
) {
    http1::status_line(out, parsed.head.status, parsed.reason);
    for h in parsed.fields {
        if passes_response_field(parsed, h.name, replaced) {
            header_line(out, h.name.as_bytes(), h.value);
        }
    }
    if parsed.head.body == BodyLength::Chunked {
        http1::framing_line(out, BodyLength::Chunked);
    }
    if !parsed.has_date {
        http1::date_header(out);
    }
}

/// Whether the upstream's response field `name` reaches the client: not a hop-by-hop one (nor one
/// its `Connection` names), not its request id (the gateway answers with its own, as AWS's does),
/// not one of the gateway's `replaced` ones, and not a coded body's length (RFC 9112 §6.3 rule 3).
pub(crate) fn passes_response_field(
    parsed: &ResponseFields<'_, '_>,
    name: &str,
    replaced: &HeaderMap,
) -> bool {
    let length = is(name, "content-length");
    !((is_hop_by_hop(name) && !length)
        || parsed.connection.names(name)
        || is(name, "x-amzn-requestid")
        || (!replaced.is_empty() && !is(name, "vary") && replaced.contains_key(name))
        || (parsed.coded && length))
}

#[cfg(test)]
mod tests {
    use http::Method;

    use super::*;
    use crate::http1::{ResponseHead, ResponseStart};

    fn req(raw: &[u8]) -> (Result<Option<RequestHead>, HeadError>, String) {
        req_keeping(raw, KeptFields::default())
    }

    /// [`req`] with a config's `kept` fields.
    fn req_keeping(
        raw: &[u8],
        kept: KeptFields,
    ) -> (Result<Option<RequestHead>, HeadError>, String) {
        let mut fwd = Vec::new();
        let r = request_head(raw, &mut fwd, &mut (0..0), "127.0.0.1", "http", kept);
        (r, String::from_utf8(fwd).unwrap())
    }

    #[test]
    fn request_head_rewrite() {
        let raw = b"POST /prod/a?x=1 HTTP/1.1\r\nHost: gw\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\n\
            x-api-key: k1\r\nX-Forwarded-For: 10.0.0.1\r\nContent-Length: 3\r\nTE: trailers\r\n\
            Expect: 100-continue\r\nAccept: */*\r\n\r\nabc";
        let (head, fwd) = req(raw);
        let head = head.unwrap().unwrap();
        assert_eq!(&raw[head.path.clone()], b"/prod/a");
        assert_eq!(&raw[head.query.clone().unwrap()], b"x=1");
        assert_eq!(&raw[head.api_key.clone().unwrap()], b"k1");
        assert_eq!(head.body, BodyLength::Length(3));
        assert!(head.keep_alive && head.expect_continue);
        assert_eq!(&raw[head.len..], b"abc");
        assert_eq!(
            fwd,
            "x-api-key: k1\r\nAccept: */*\r\nx-forwarded-for: 10.0.0.1, 127.0.0.1\r\n\
             x-forwarded-proto: http\r\nx-forwarded-host: gw\r\n"
        );
    }

    #[test]
    fn every_forwarded_for_field_is_one_chain() {
        let raw = b"GET /a HTTP/1.1\r\nHost: gw\r\nX-Forwarded-For: 203.0.113.9\r\nX: 1\r\n\
            x-forwarded-for: 10.0.0.2,10.0.0.3\r\nX-Forwarded-For:  \r\n\r\n";
        let mut fwd = Vec::new();
        let mut chain = 0..0;
        let head = request_head(
            raw,
            &mut fwd,
            &mut chain,
            "10.0.0.1",
            "http",
            KeptFields::default(),
        );
        assert!(head.unwrap().is_some());
        assert_eq!(&fwd[chain], b"203.0.113.9, 10.0.0.2,10.0.0.3, 10.0.0.1");
        assert!(
            String::from_utf8_lossy(&fwd).starts_with(
                "X: 1\r\nx-forwarded-for: 203.0.113.9, 10.0.0.2,10.0.0.3, 10.0.0.1\r\n"
            ),
            "{}",
            String::from_utf8_lossy(&fwd)
        );
    }

    #[test]
    fn steering_fields_are_dropped_unless_kept() {
        let raw =
            b"GET /a HTTP/1.1\r\nHost: gw\r\nX-Original-URL: /admin\r\nx-rewrite-url: /admin\r\n\
            X-HTTP-Method-Override: PUT\r\nX-Method-Override: PUT\r\nX-HTTP-Method: PUT\r\n\
            Forwarded: for=1.2.3.4\r\nX-Real-IP: 1.2.3.4\r\nX-Keep: 1\r\n\r\n";
        let (head, fwd) = req(raw);
        assert!(head.unwrap().is_some());
        assert!(
            fwd.starts_with("X-Keep: 1\r\nx-forwarded-for: 127.0.0.1\r\n"),
            "{fwd}"
        );
        for (i, name) in STEERING_FIELDS.iter().enumerate() {
            let mut one = KeptFields::default();
            assert!(one.keep(&name.to_ascii_uppercase()));
            for (j, other) in STEERING_FIELDS.iter().enumerate() {
                assert_eq!(one.drops(other), i != j, "{name} kept, {other}");
            }
        }
        let mut kept = KeptFields::default();
        assert!(kept.keep("X-Real-IP") && kept.keep("x-http-method-override"));
        assert!(!kept.keep("X-Other"));
        let (head, fwd) = req_keeping(raw, kept);
        assert!(head.unwrap().is_some());
        assert!(
            fwd.starts_with("X-HTTP-Method-Override: PUT\r\nX-Real-IP: 1.2.3.4\r\nX-Keep: 1\r\n"),
            "{fwd}"
        );
    }

    #[test]
    fn underscore_names_are_dropped_unless_kept_and_never_as_twins() {
        let raw = b"GET /a HTTP/1.1\r\nHost: gw\r\nX_Tollgate_Subject: partner-a\r\n\
            X_Tollgate_Key_Id: k\r\nX_HTTP_Method_Override: DELETE\r\nX_Original_URL: /admin\r\n\
            X_Real_IP: 1.2.3.4\r\nX_Forwarded_Host: evil\r\nX_Forwarded_Proto: https\r\n\
            X_API_KEY: other\r\nTrace_Parent: x\r\nTransfer_Encoding: chunked\r\nX_Custom: 1\r\n\
            X-Keep: 1\r\n\r\n";
        let (head, fwd) = req(raw);
        assert!(head.unwrap().is_some());
        assert!(!fwd.contains('_'), "{fwd}");
        assert!(fwd.starts_with("X-Keep: 1\r\nx-forwarded-for: "), "{fwd}");
        let mut kept = KeptFields::default();
        kept.keep_underscores();
        let (head, fwd) = req_keeping(raw, kept);
        assert!(head.unwrap().is_some());
        // Kept: names nobody reads as the gateway's; never the twins of what it checks or sets.
        assert!(
            fwd.starts_with("Trace_Parent: x\r\nX_Custom: 1\r\nX-Keep: 1\r\n"),
            "{fwd}"
        );
        assert_eq!(fwd.matches('_').count(), 2, "{fwd}");
        // A steering field kept by the config keeps its twin out all the same.
        assert!(kept.keep("x-http-method-override"));
        assert!(kept.drops_underscored("X_HTTP_Method_Override"));
        assert!(!kept.drops_underscored(&"a_".repeat(60)));
        assert!(kept.drops_underscored(&format!("X_Tollgate_{}", "a".repeat(120))));
    }

    fn resp(raw: &[u8], method: Method) -> (Result<ResponseStart, HeadError>, String) {
        let mut out = Vec::new();
        let none = HeaderMap::new();
        let r = http1::parse_response(raw, &method, |f| response_fields(f, &none, &mut out));
        (r, String::from_utf8(out).unwrap())
    }

    #[test]
    fn response_head_rewrite_and_framing() {
        let (r, out) = resp(
            b"HTTP/1.1 200 OK\r\nDate: d\r\nConnection: x-hop\r\nX-Hop: 1\r\nKeep-Alive: timeout=5\r\n\
              Content-Length: 2\r\nX-Up: yes\r\n\r\nok",
            Method::GET,
        );
        assert_eq!(
            r.unwrap(),
            ResponseStart::Final(ResponseHead {
                len: 110,
                status: 200,
                body: BodyLength::Length(2),
                reusable: true
            })
        );
        assert_eq!(
            out,
            "HTTP/1.1 200 OK\r\nDate: d\r\nContent-Length: 2\r\nX-Up: yes\r\n"
        );

        let body = |raw: &[u8], m| match resp(raw, m).0.unwrap() {
            ResponseStart::Final(h) => (h.body, h.reusable),
            other => panic!("{other:?}"),
        };
        assert_eq!(
            body(
                b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n",
                Method::HEAD
            ),
            (BodyLength::Empty, true)
        );
        assert_eq!(
            body(b"HTTP/1.1 304 Not Modified\r\n\r\n", Method::GET),
            (BodyLength::Empty, true)
        );
        assert_eq!(
            body(b"HTTP/1.1 200 OK\r\n\r\n", Method::GET),
            (BodyLength::UntilClose, false)
        );
        assert_eq!(
            body(
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 5\r\n\r\n",
                Method::GET
            ),
            (BodyLength::Chunked, false)
        );
        assert_eq!(
            body(b"HTTP/1.0 200 OK\r\nContent-Length: 1\r\n\r\n", Method::GET),
            (BodyLength::Length(1), false)
        );
        assert_eq!(
            body(
                b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 1\r\n\r\n",
                Method::GET
            ),
            (BodyLength::Length(1), false)
        );
        assert_eq!(
            resp(b"HTTP/1.1 100 Continue\r\n\r\n", Method::GET)
                .0
                .unwrap(),
            ResponseStart::Interim(25)
        );
        assert!(
            resp(b"HTTP/1.1 101 Switching\r\n\r\n", Method::GET)
                .0
                .is_err()
        );
        // Chunked replaces the upstream's length; a Date is added when missing.
        let (_, out) = resp(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n",
            Method::GET,
        );
        assert!(
            out.starts_with("HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ndate: "),
            "{out}"
        );
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1024))]

        /// Whatever the bytes, rewriting never panics, and a request it accepts always carries the
        /// gateway's own X-Forwarded-For.
        #[test]
        fn rewriting_arbitrary_bytes_never_panics(
            raw in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600),
        ) {
            if let (Ok(Some(_)), fwd) = req(&raw) {
                proptest::prop_assert!(fwd.contains("x-forwarded-for: "));
            }
            let _ = resp(&raw, Method::GET);
        }
    }
}
