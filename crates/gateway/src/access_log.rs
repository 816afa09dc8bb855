//! The access log as AWS's stage settings configure it: a format made of `$context` variables (a
//! JSON template or a CLF-like line), one line per request, written off the request path.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write as _};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

use tollgate_core::clock::NANOS_PER_SEC;
use tollgate_core::quota::EpochDay;

/// The format used when `accessLog: true` names none: every variable tollgate knows, as JSON.
pub const DEFAULT_FORMAT: &str = r#"{"requestId":"$context.requestId","requestTime":"$context.requestTime","httpMethod":"$context.httpMethod","path":"$context.path","resourcePath":"$context.resourcePath","apiId":"$context.apiId","stage":"$context.stage","status":"$context.status","responseLength":"$context.responseLength","responseLatency":"$context.responseLatency","integrationLatency":"$context.integrationLatency","integrationStatus":"$context.integration.status","ip":"$context.identity.sourceIp","userAgent":"$context.identity.userAgent","apiKeyId":"$context.identity.apiKeyId","errorMessage":"$context.error.message","errorResponseType":"$context.error.responseType","protocol":"$context.protocol","tlsVersion":"$context.tlsVersion","clientCert":"$context.identity.clientCert.subjectDN","decision":"$context.decision"}"#;

/// One `$context` variable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Var {
    RequestId,
    RequestTime,
    RequestTimeEpoch,
    HttpMethod,
    ResourcePath,
    Path,
    Stage,
    ApiId,
    Status,
    ResponseLength,
    ResponseLatency,
    IntegrationLatency,
    IntegrationStatus,
    SourceIp,
    UserAgent,
    ApiKeyId,
    ErrorMessage,
    ErrorMessageString,
    ErrorResponseType,
    Protocol,
    TlsVersion,
    ClientCertSubject,
    Decision,
}

/// The variables by their names after `$context.` (AWS's names; some have two, as AWS's do).
const VARS: &[(&str, Var)] = &[
    ("requestId", Var::RequestId),
    ("extendedRequestId", Var::RequestId),
    ("requestTime", Var::RequestTime),
    ("requestTimeEpoch", Var::RequestTimeEpoch),
    ("httpMethod", Var::HttpMethod),
    ("resourcePath", Var::ResourcePath),
    ("path", Var::Path),
    ("stage", Var::Stage),
    ("apiId", Var::ApiId),
    ("status", Var::Status),
    ("responseLength", Var::ResponseLength),
    ("responseLatency", Var::ResponseLatency),
    ("integrationLatency", Var::IntegrationLatency),
    ("integration.latency", Var::IntegrationLatency),
    ("integration.status", Var::IntegrationStatus),
    ("integrationStatus", Var::IntegrationStatus),
    ("identity.sourceIp", Var::SourceIp),
    ("identity.userAgent", Var::UserAgent),
    ("identity.apiKeyId", Var::ApiKeyId),
    ("error.message", Var::ErrorMessage),
    ("error.messageString", Var::ErrorMessageString),
    ("error.responseType", Var::ErrorResponseType),
    ("protocol", Var::Protocol),
    // tollgate's own: the TLS version a client connection negotiated.
    ("tlsVersion", Var::TlsVersion),
    ("identity.clientCert.subjectDN", Var::ClientCertSubject),
    // tollgate's own: what admission decided (the metrics' `decision`: `allowed`, `invalid_key`,
    // `expired`, …), finer than AWS's error types.
    ("decision", Var::Decision),
];

#[derive(Debug, Clone, PartialEq, Eq)]
enum Part {
    Text(String),
    Var(Var),
}

/// A compiled access-log format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogFormat {
    parts: Vec<Part>,
}

/// What one request's line can say. `None` and 0 print as `-`, as AWS prints a value it does not
/// have.
#[derive(Debug, Default)]
pub(crate) struct Record<'a> {
    pub request_id: &'a str,
    /// When the request started, nanoseconds since the epoch.
    pub start_nanos: u64,
    pub http_method: &'a str,
    /// The matched route's template.
    pub resource_path: Option<&'a str>,
    pub path: &'a str,
    pub stage: Option<&'a str>,
    pub api_id: Option<&'a str>,
    pub status: u16,
    /// Bytes of the response body sent.
    pub response_length: Option<u64>,
    /// Milliseconds from the request's head to the end of its answer.
    pub response_latency_ms: u64,
    /// Milliseconds the upstream took to answer (to its response head).
    pub integration_latency_ms: Option<u64>,
    pub integration_status: Option<u16>,
    pub source_ip: &'a str,
    pub user_agent: Option<&'a str>,
    pub api_key_id: Option<&'a str>,
    pub error_message: Option<&'a str>,
    /// AWS's gateway response type (`THROTTLED`, `QUOTA_EXCEEDED`, …).
    pub error_response_type: Option<&'a str>,
    pub protocol: &'a str,
    /// `TLSv1.2` or `TLSv1.3`, over TLS.
    pub tls_version: Option<&'a str>,
    /// The client certificate's subject, under mTLS.
    pub client_cert_subject: Option<&'a str>,
    /// What admission decided, when the request got that far.
    pub decision: Option<&'a str>,
}

impl LogFormat {
    /// Compiles `format`; the error names the variable it does not know.
    pub fn parse(format: &str) -> Result<Self, String> {
        const PREFIX: &str = "$context.";
        let mut parts = Vec::new();
        let mut text = String::new();
        let mut rest = format;
        while let Some(at) = rest.find(PREFIX) {
            text.push_str(&rest[..at]);
            let after = &rest[at + PREFIX.len()..];
            let len = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '.'))
                .unwrap_or(after.len());
            // A sentence may end right after a variable.
            let name = after[..len].trim_end_matches('.');
            if name == "identity.apiKey" {
                return Err(
                    "$context.identity.apiKey: key values are never logged; use $context.identity.apiKeyId"
                        .into(),
                );
            }
            let Some((_, var)) = VARS.iter().find(|(n, _)| *n == name) else {
                let known: Vec<&str> = VARS.iter().map(|(n, _)| *n).collect();
                return Err(format!(
                    "$context.{name} is not a variable tollgate knows; it knows {}",
                    known.join(", ")
                ));
            };
            if !text.is_empty() {
                parts.push(Part::Text(std::mem::take(&mut text)));
            }
            parts.push(Part::Var(*var));
            rest = &after[name.len()..];
        }
        text.push_str(rest);
        if !text.is_empty() {
            parts.push(Part::Text(text));
        }
        if !parts.iter().any(|p| matches!(p, Part::Var(_))) {
            return Err("the format has no $context variable".into());
        }
        Ok(Self { parts })
    }

    /// Appends `record`'s line (without the newline). Values are escaped as in a JSON string, so
    /// that no client-chosen text can end a field or a line.
    pub(crate) fn render(&self, record: &Record<'_>, out: &mut String) {
        for part in &self.parts {
            match part {
                Part::Text(t) => out.push_str(t),
                Part::Var(v) => value(*v, record, out),
            }
        }
    }
}

fn value(var: Var, r: &Record<'_>, out: &mut String) {
    let opt_num = |out: &mut String, n: Option<u64>| match n {
        Some(n) => {
            let _ = write!(out, "{n}");
        }
        None => out.push('-'),
    };
    match var {
        Var::RequestId => escaped(out, r.request_id),
        Var::RequestTime => request_time(r.start_nanos, out),
        Var::RequestTimeEpoch => opt_num(out, Some(r.start_nanos / 1_000_000)),
        Var::HttpMethod => escaped(out, r.http_method),
        Var::ResourcePath => opt_text(out, r.resource_path),
        Var::Path => escaped(out, r.path),
        Var::Stage => opt_text(out, r.stage),
        Var::ApiId => opt_text(out, r.api_id),
        Var::Status => opt_num(out, (r.status != 0).then_some(u64::from(r.status))),
        Var::ResponseLength => opt_num(out, r.response_length),
        Var::ResponseLatency => opt_num(out, Some(r.response_latency_ms)),
        Var::IntegrationLatency => opt_num(out, r.integration_latency_ms),
        Var::IntegrationStatus => opt_num(out, r.integration_status.map(u64::from)),
        Var::SourceIp => escaped(out, r.source_ip),
        Var::UserAgent => opt_text(out, r.user_agent),
        Var::ApiKeyId => opt_text(out, r.api_key_id),
        Var::ErrorMessage => opt_text(out, r.error_message),
        Var::ErrorMessageString => match r.error_message {
            // AWS's quoted form; its quotes are escaped like any value's.
            Some(m) => {
                out.push_str("\\\"");
                escaped(out, m);
                out.push_str("\\\"");
            }
            None => out.push('-'),
        },
        Var::ErrorResponseType => opt_text(out, r.error_response_type),
        Var::Protocol => escaped(out, r.protocol),
        Var::TlsVersion => opt_text(out, r.tls_version),
        Var::ClientCertSubject => opt_text(out, r.client_cert_subject),
        Var::Decision => opt_text(out, r.decision),
    }
}

fn opt_text(out: &mut String, v: Option<&str>) {
    match v {
        Some(v) if !v.is_empty() => escaped(out, v),
        _ => out.push('-'),
    }
}

/// `v` escaped as inside a JSON string, and so that no line reader splits the record: besides JSON's
/// controls, the C1 controls (U+0085 is NEL) and U+2028/U+2029 (line and paragraph separators,
/// line ends to `str.splitlines()` and JavaScript) are written as `\uXXXX`.
fn escaped(out: &mut String, v: &str) {
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20
                || ('\u{7f}'..='\u{9f}').contains(&c)
                || c == '\u{2028}'
                || c == '\u{2029}' =>
            {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
}

/// AWS's `requestTime`: `30/Nov/2026:06:26:49 +0000` (CLF), formatted at most once a second per
/// thread.
fn request_time(nanos: u64, out: &mut String) {
    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let secs = nanos / NANOS_PER_SEC;
    CACHED.with(|c| {
        let mut c = c.borrow_mut();
        if c.0 != secs {
            let date = EpochDay::from_nanos(nanos).date();
            let of_day = secs % 86_400;
            c.1.clear();
            let _ = write!(
                c.1,
                "{:02}/{}/{}:{:02}:{:02}:{:02} +0000",
                date.day(),
                MONTHS[usize::from(date.month().unsigned_abs()).clamp(1, 12) - 1],
                date.year(),
                of_day / 3600,
                of_day / 60 % 60,
                of_day % 60
            );
            c.0 = secs;
        }
        out.push_str(&c.1);
    });
}

/// The access log's settings: the line's format, and the file it goes to (stderr without one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessLogConfig {
    /// The compiled format.
    pub format: LogFormat,
    /// The file lines are appended to; `None`: stderr.
    pub path: Option<PathBuf>,
}

/// Lines waiting for the writer; more are dropped (and counted) rather than waited for.
const QUEUE: usize = 16 * 1024;

/// Where lines go: a bounded queue to a thread of its own that writes them, so that a slow disk or
/// a blocked stderr never holds up a request.
pub(crate) struct Sink {
    lines: SyncSender<Message>,
    reopen: Arc<AtomicBool>,
}

/// What the writer is sent.
enum Message {
    Line(String),
    /// Look at the reopen flag now.
    Wake,
    /// Write out everything queued before this, then say so.
    Flush(SyncSender<()>),
}

impl Sink {
    /// Opens the destination (so that an unwritable file fails at startup) and starts the writer.
    pub(crate) fn start(path: Option<PathBuf>) -> io::Result<Self> {
        let (lines, queue) = sync_channel::<Message>(QUEUE);
        let reopen = Arc::new(AtomicBool::new(false));
        let out = Output::open(path)?;
        let asked = reopen.clone();
        std::thread::Builder::new()
            .name("access-log".into())
            .spawn(move || write_lines(out, &queue, &asked))?;
        Ok(Self { lines, reopen })
    }

    /// Queues one line; false when the queue was full and the line was dropped.
    pub(crate) fn send(&self, line: String) -> bool {
        self.lines.try_send(Message::Line(line)).is_ok()
    }

    /// Waits (at most `wait`) until every line queued so far is written: at shutdown, so that the
    /// last requests' lines are not lost with the process. Blocks: call it off the async workers.
    pub(crate) fn finish(&self, wait: std::time::Duration) {
        let (done, written) = sync_channel(1);
        if self.lines.send(Message::Flush(done)).is_ok() {
            let _ = written.recv_timeout(wait);
        }
    }

    /// Has the writer open its file again before the next line (after logrotate moved it).
    pub(crate) fn reopen(&self) {
        self.reopen.store(true, Ordering::Relaxed);
        let _ = self.lines.try_send(Message::Wake);
    }
}

/// The writer's destination.
enum Output {
    Stderr,
    File(PathBuf, BufWriter<File>),
}

impl Output {
    fn open(path: Option<PathBuf>) -> io::Result<Self> {
        Ok(match path {
            None => Output::Stderr,
            Some(path) => {
                let file = OpenOptions::new().create(true).append(true).open(&path)?;
                Output::File(path, BufWriter::new(file))
            }
        })
    }

    fn write(&mut self, line: &str) -> io::Result<()> {
        match self {
            Output::Stderr => {
                let mut err = io::stderr().lock();
                err.write_all(line.as_bytes())?;
                err.write_all(b"\n")
            }
            Output::File(_, w) => {
                w.write_all(line.as_bytes())?;
                w.write_all(b"\n")
            }
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Output::Stderr => Ok(()),
            Output::File(_, w) => w.flush(),
        }
    }
}

/// The writer thread: lines as they come, flushed whenever the queue runs dry, the file reopened
/// when asked. It ends when the gateway drops its sink.
fn write_lines(mut out: Output, queue: &Receiver<Message>, reopen: &AtomicBool) {
    let mut failing = false;
    loop {
        let message = match queue.try_recv() {
            Ok(message) => message,
            Err(_) => {
                let _ = out.flush();
                match queue.recv() {
                    Ok(message) => message,
                    Err(_) => return,
                }
            }
        };
        if reopen.swap(false, Ordering::Relaxed) {
            if let Output::File(path, w) = &mut out {
                let _ = w.flush();
                match OpenOptions::new().create(true).append(true).open(&*path) {
                    Ok(file) => *w = BufWriter::new(file),
                    Err(e) => tracing::error!(path = %path.display(), error = %e,
                        "access log not reopened; writing on to the file open before"),
                }
            }
        }
        let line = match message {
            Message::Line(line) => line,
            Message::Wake => continue,
            Message::Flush(done) => {
                let _ = out.flush();
                let _ = done.try_send(());
                continue;
            }
        };
        // One error line per outage, not one per request.
        match out.write(&line) {
            Ok(()) => failing = false,
            Err(e) if !failing => {
                failing = true;
                tracing::error!(error = %e, "access log write failed; lines are lost until it works again");
            }
            Err(_) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record<'static> {
        Record {
            request_id: "c6af9ac6-7b61-41e6-9a41-93e8deadbeef",
            // 2026-11-30T06:26:49.123Z
            start_nanos: 1_796_020_009_123_000_000,
            http_method: "PUT",
            resource_path: Some("/registrations/{id}/warranty"),
            path: "/prod/registrations/7/warranty",
            stage: Some("prod"),
            api_id: Some("warranty"),
            status: 429,
            response_length: Some(28),
            response_latency_ms: 3,
            integration_latency_ms: None,
            integration_status: None,
            source_ip: "10.0.0.7",
            user_agent: Some("partner \"agent\"\r\nx"),
            api_key_id: Some("58v93i1885"),
            error_message: Some("Limit Exceeded"),
            error_response_type: Some("QUOTA_EXCEEDED"),
            protocol: "HTTP/1.1",
            tls_version: Some("TLSv1.3"),
            client_cert_subject: Some("CN=partner"),
            decision: Some("quota_exceeded"),
        }
    }

    fn line(format: &str, r: &Record<'_>) -> String {
        let mut out = String::new();
        LogFormat::parse(format).unwrap().render(r, &mut out);
        out
    }

    #[test]
    fn every_variable_renders() {
        let r = record();
        let all = VARS
            .iter()
            .map(|(n, _)| format!("{n}=$context.{n}"))
            .collect::<Vec<_>>()
            .join(" ");
        let out = line(&all, &r);
        let expected = [
            "requestId=c6af9ac6-7b61-41e6-9a41-93e8deadbeef",
            "extendedRequestId=c6af9ac6-7b61-41e6-9a41-93e8deadbeef",
            "requestTime=30/Nov/2026:06:26:49 +0000",
            "requestTimeEpoch=1796020009123",
            "httpMethod=PUT",
            "resourcePath=/registrations/{id}/warranty",
            "path=/prod/registrations/7/warranty",
            "stage=prod",
            "apiId=warranty",
            "status=429",
            "responseLength=28",
            "responseLatency=3",
            "integrationLatency=-",
            "integration.latency=-",
            "integration.status=-",
            "integrationStatus=-",
            "identity.sourceIp=10.0.0.7",
            "identity.userAgent=partner \\\"agent\\\"\\r\\nx",
            "identity.apiKeyId=58v93i1885",
            "error.message=Limit Exceeded",
            "error.messageString=\\\"Limit Exceeded\\\"",
            "error.responseType=QUOTA_EXCEEDED",
            "protocol=HTTP/1.1",
            "tlsVersion=TLSv1.3",
            "identity.clientCert.subjectDN=CN=partner",
            "decision=quota_exceeded",
        ];
        assert_eq!(expected.len(), VARS.len(), "one expectation a variable");
        for expected in expected {
            assert!(out.contains(expected), "{expected} missing from {out}");
        }
    }

    #[test]
    fn json_and_clf_templates_as_aws_writes_them() {
        let r = record();
        let json = line(
            r#"{"requestId":"$context.requestId","ip":"$context.identity.sourceIp","key":"$context.identity.apiKeyId","status":"$context.status","latency":"$context.responseLatency","agent":"$context.identity.userAgent"}"#,
            &r,
        );
        let v: serde_json::Value = serde_json::from_str(&json).unwrap();
        assert_eq!(v["key"], "58v93i1885");
        assert_eq!(v["status"], "429");
        assert_eq!(
            v["agent"], "partner \"agent\"\r\nx",
            "escaped, so still one JSON line"
        );
        let clf = line(
            r#"$context.identity.sourceIp - - [$context.requestTime] "$context.httpMethod $context.path $context.protocol" $context.status $context.responseLength $context.requestId."#,
            &r,
        );
        assert_eq!(
            clf,
            "10.0.0.7 - - [30/Nov/2026:06:26:49 +0000] \"PUT /prod/registrations/7/warranty HTTP/1.1\" 429 28 c6af9ac6-7b61-41e6-9a41-93e8deadbeef."
        );
        // The default is JSON with every variable.
        let all: serde_json::Value = serde_json::from_str(&line(DEFAULT_FORMAT, &r)).unwrap();
        assert_eq!(all.as_object().unwrap().len(), 21);
        assert_eq!(all["integrationStatus"], "-");
    }

    #[test]
    fn no_line_reader_splits_a_record() {
        let mut r = record();
        let agent = "a\u{85}b\u{2028}c\u{2029}d\u{9f}e\u{7f}f\u{a0}g\n";
        r.user_agent = Some(agent);
        r.client_cert_subject = Some("CN=x\u{2028}y");
        let out = line(DEFAULT_FORMAT, &r);
        // Python's str.splitlines() and JavaScript's line terminators, besides \n and \r.
        for sep in [
            '\n', '\r', '\u{b}', '\u{c}', '\u{1c}', '\u{1d}', '\u{1e}', '\u{85}', '\u{2028}',
            '\u{2029}',
        ] {
            assert!(!out.contains(sep), "{sep:?} in {out}");
        }
        assert!(
            out.contains(r"a\u0085b\u2028c\u2029d\u009fe\u007ff"),
            "{out}"
        );
        let back: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            back["userAgent"], agent,
            "the JSON still reads back as it came"
        );
    }

    #[test]
    fn unknown_variables_and_key_values_are_refused() {
        let e = LogFormat::parse("$context.identity.apiKey").unwrap_err();
        assert!(e.contains("never logged"), "{e}");
        let e = LogFormat::parse(r#"{"x":"$context.authorizer.claims"}"#).unwrap_err();
        assert!(
            e.starts_with("$context.authorizer.claims is not a variable"),
            "{e}"
        );
        assert!(LogFormat::parse("no variables").is_err());
    }
}
