//! Every response the gateway itself writes, in one place: AWS's status codes, `{"message": …}`
//! bodies and `x-amzn-ErrorType`, plus `Retry-After` and the IETF RateLimit headers.

use std::fmt::Write as _;

use bytes::Bytes;
use http::header::{
    ACCESS_CONTROL_ALLOW_CREDENTIALS, ACCESS_CONTROL_ALLOW_HEADERS, ACCESS_CONTROL_ALLOW_METHODS,
    ACCESS_CONTROL_ALLOW_ORIGIN, ACCESS_CONTROL_MAX_AGE, CACHE_CONTROL, CONTENT_TYPE, RETRY_AFTER,
    VARY,
};
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode};

use crate::config::Cors;
use crate::http1::HeadError;
use crate::limits::{KeyRejected, LimitInfo, Refusal};

/// AWS's error-type header.
pub static X_AMZN_ERROR_TYPE: HeaderName = HeaderName::from_static("x-amzn-errortype");
static RATELIMIT_POLICY: HeaderName = HeaderName::from_static("ratelimit-policy");
static RATELIMIT: HeaderName = HeaderName::from_static("ratelimit");
static APPLICATION_JSON: HeaderValue = HeaderValue::from_static("application/json");

/// Why the upstream could not answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamFailure {
    /// Connection refused, reset, or a malformed response: 502.
    Unreachable,
    /// No response head within the route's timeout: 504.
    Timeout,
}

/// A fixed response the gateway writes itself.
pub fn full(status: StatusCode, body: impl Into<Bytes>) -> Response<Bytes> {
    let mut resp = Response::new(body.into());
    *resp.status_mut() = status;
    resp
}

fn aws_error(
    status: StatusCode,
    error_type: &'static str,
    body: impl Into<Bytes>,
) -> Response<Bytes> {
    let mut resp = full(status, body);
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, APPLICATION_JSON.clone());
    h.insert(
        X_AMZN_ERROR_TYPE.clone(),
        HeaderValue::from_static(error_type),
    );
    resp
}

/// The response for a refused request.
pub fn refusal(refusal: Refusal, rate_limit_headers: bool) -> Response<Bytes> {
    match refusal {
        Refusal::MissingAuthenticationToken => aws_error(
            StatusCode::FORBIDDEN,
            "MissingAuthenticationTokenException",
            r#"{"message":"Missing Authentication Token"}"#,
        ),
        Refusal::ServiceUnavailable => {
            let mut resp = aws_error(
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailableException",
                r#"{"message":"Service Unavailable"}"#,
            );
            resp.headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            resp
        }
        Refusal::Forbidden(_) => aws_error(
            StatusCode::FORBIDDEN,
            "ForbiddenException",
            r#"{"message":"Forbidden"}"#,
        ),
        Refusal::Unauthorized => aws_error(
            StatusCode::UNAUTHORIZED,
            "UnauthorizedException",
            r#"{"message":"Unauthorized"}"#,
        ),
        Refusal::TooManyRequests {
            retry_after_secs,
            limits,
        } => {
            let mut resp = aws_error(
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequestsException",
                r#"{"message":"Too Many Requests"}"#,
            );
            finish_429(
                resp.headers_mut(),
                retry_after_secs,
                &limits,
                rate_limit_headers,
            );
            resp
        }
        Refusal::LimitExceeded {
            retry_after_secs,
            limits,
        } => limit_exceeded(Some(retry_after_secs), &limits, rate_limit_headers),
        Refusal::CreditsExhausted { limits } => {
            let retry = limits.credits.and_then(|c| c.retry_after_secs());
            limit_exceeded(retry, &limits, rate_limit_headers)
        }
    }
}

/// AWS's 429 for a spent allowance (a quota, or credits).
fn limit_exceeded(
    retry_after_secs: Option<u64>,
    limits: &LimitInfo,
    rate_limit_headers: bool,
) -> Response<Bytes> {
    let mut resp = aws_error(
        StatusCode::TOO_MANY_REQUESTS,
        "LimitExceededException",
        r#"{"message":"Limit Exceeded"}"#,
    );
    let headers = resp.headers_mut();
    if let Some(secs) = retry_after_secs {
        headers.insert(RETRY_AFTER, HeaderValue::from(secs));
    }
    if rate_limit_headers {
        add_rate_limit_headers(headers, limits);
    }
    resp
}

fn finish_429(
    headers: &mut HeaderMap,
    retry_after_secs: u64,
    limits: &LimitInfo,
    rate_limit_headers: bool,
) {
    headers.insert(RETRY_AFTER, HeaderValue::from(retry_after_secs));
    if rate_limit_headers {
        add_rate_limit_headers(headers, limits);
    }
}

/// A 400 (or 413) for a request that cannot be accepted as sent, saying why.
pub fn bad_request(err: HeadError) -> Response<Bytes> {
    let (status, error_type) = match err {
        HeadError::BodyTooLarge => (StatusCode::PAYLOAD_TOO_LARGE, "RequestTooLongException"),
        other => (other.status(), "BadRequestException"),
    };
    let body = serde_json::json!({ "message": err.message() }).to_string();
    aws_error(status, error_type, body)
}

/// The response when the upstream failed, with AWS's messages for integration errors.
pub fn upstream_failure(failure: UpstreamFailure) -> Response<Bytes> {
    match failure {
        UpstreamFailure::Unreachable => aws_error(
            StatusCode::BAD_GATEWAY,
            "InternalServerErrorException",
            r#"{"message":"Internal server error"}"#,
        ),
        UpstreamFailure::Timeout => aws_error(
            StatusCode::GATEWAY_TIMEOUT,
            "InternalServerErrorException",
            r#"{"message":"Endpoint request timed out"}"#,
        ),
    }
}

/// AWS's `$context.error.message` and `$context.error.responseType` (its gateway response types)
/// for a refusal.
pub fn refusal_error(refusal: &Refusal) -> (&'static str, &'static str) {
    match refusal {
        Refusal::MissingAuthenticationToken => (
            "Missing Authentication Token",
            "MISSING_AUTHENTICATION_TOKEN",
        ),
        // AWS's type for a caller its resource policy turns away by address.
        Refusal::Forbidden(KeyRejected::SourceIp) => ("Forbidden", "ACCESS_DENIED"),
        Refusal::Forbidden(_) => ("Forbidden", "INVALID_API_KEY"),
        Refusal::Unauthorized => ("Unauthorized", "UNAUTHORIZED"),
        Refusal::TooManyRequests { .. } => ("Too Many Requests", "THROTTLED"),
        Refusal::LimitExceeded { .. } | Refusal::CreditsExhausted { .. } => {
            ("Limit Exceeded", "QUOTA_EXCEEDED")
        }
        Refusal::ServiceUnavailable => ("Service Unavailable", "DEFAULT_5XX"),
    }
}

/// The same for a request that could not be accepted as sent ([`bad_request`]).
pub fn bad_request_error(err: HeadError) -> (&'static str, &'static str) {
    match err {
        HeadError::BodyTooLarge => (err.message(), "REQUEST_TOO_LARGE"),
        other => (other.message(), "DEFAULT_4XX"),
    }
}

/// The same for an upstream that failed ([`upstream_failure`]).
pub fn upstream_failure_error(failure: UpstreamFailure) -> (&'static str, &'static str) {
    match failure {
        UpstreamFailure::Unreachable => ("Internal server error", "INTEGRATION_FAILURE"),
        UpstreamFailure::Timeout => ("Endpoint request timed out", "INTEGRATION_TIMEOUT"),
    }
}

/// The CORS preflight answer: 200, empty, with the allowed origin, methods and headers.
pub fn preflight(
    cors: Option<&Cors>,
    methods: &str,
    origin: Option<&HeaderValue>,
) -> Response<Bytes> {
    let mut resp = full(StatusCode::OK, Bytes::new());
    if let Some(cors) = cors {
        let h = resp.headers_mut();
        if let Ok(v) = HeaderValue::from_str(methods) {
            h.insert(ACCESS_CONTROL_ALLOW_METHODS, v);
        }
        if let Ok(v) = HeaderValue::from_str(&cors.headers.join(",")) {
            h.insert(ACCESS_CONTROL_ALLOW_HEADERS, v);
        }
        if let Some(age) = cors.max_age {
            h.insert(ACCESS_CONTROL_MAX_AGE, HeaderValue::from(age));
        }
        if let Some(v) = cors
            .cache_control
            .as_deref()
            .and_then(|c| HeaderValue::from_str(c).ok())
        {
            h.insert(CACHE_CONTROL, v);
        }
        add_cors_headers(h, cors, origin);
    }
    resp
}

/// `Access-Control-Allow-Origin` (and `-Credentials`) for a response to a CORS-enabled route.
pub fn add_cors_headers(headers: &mut HeaderMap, cors: &Cors, origin: Option<&HeaderValue>) {
    let origin = origin.and_then(|o| o.to_str().ok());
    let Some(allowed) = cors
        .allow_origin(origin)
        .and_then(|o| HeaderValue::from_str(o).ok())
    else {
        return;
    };
    headers.insert(ACCESS_CONTROL_ALLOW_ORIGIN, allowed);
    if cors.allow_credentials {
        headers.insert(
            ACCESS_CONTROL_ALLOW_CREDENTIALS,
            HeaderValue::from_static("true"),
        );
    }
    if !cors.origins.iter().any(|o| o == "*") || cors.allow_credentials {
        headers.append(VARY, HeaderValue::from_static("Origin"));
    }
}

/// Adds `RateLimit-Policy` and `RateLimit` (draft-ietf-httpapi-ratelimit-headers) describing the key's
/// throttle (policy `"burst"`) and quota (policy `"quota"`).
pub fn add_rate_limit_headers(headers: &mut HeaderMap, limits: &LimitInfo) {
    let mut policy = String::new();
    let mut state = String::new();
    if let Some(t) = &limits.throttle {
        let _ = write!(policy, "\"burst\";q={};w={}", t.burst, t.window_secs);
        let _ = write!(state, "\"burst\";r={};t={}", t.remaining, t.reset_secs);
    }
    if let Some(q) = &limits.quota {
        let sep = if policy.is_empty() { "" } else { ", " };
        let _ = write!(policy, "{sep}\"quota\";q={};w={}", q.limit, q.window_secs);
        let _ = write!(state, "{sep}\"quota\";r={};t={}", q.remaining, q.reset_secs);
    }
    // Credits: with a refill, a policy of its amount per period and the time until it; without,
    // only what is left (a balance has no window).
    if let Some(c) = &limits.credits {
        let sep = if state.is_empty() { "" } else { ", " };
        if c.refill > 0 {
            let psep = if policy.is_empty() { "" } else { ", " };
            let window = u64::from(c.window_days) * 86_400;
            let _ = write!(policy, "{psep}\"credits\";q={};w={window}", c.refill);
            let _ = write!(
                state,
                "{sep}\"credits\";r={};t={}",
                c.remaining, c.reset_secs
            );
        } else {
            let _ = write!(state, "{sep}\"credits\";r={}", c.remaining);
        }
    }
    if state.is_empty() {
        return;
    }
    // Built only from digits and fixed ASCII, so always a valid header value.
    if let Ok(s) = HeaderValue::try_from(state) {
        headers.insert(RATELIMIT.clone(), s);
    }
    if policy.is_empty() {
        return;
    }
    if let Ok(p) = HeaderValue::try_from(policy) {
        headers.insert(RATELIMIT_POLICY.clone(), p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::limits::{BucketInfo, CreditInfo, QuotaInfo};

    #[test]
    fn rate_limit_header_syntax() {
        let mut h = HeaderMap::new();
        let limits = LimitInfo {
            throttle: Some(BucketInfo {
                burst: 50,
                remaining: 49,
                reset_secs: 1,
                window_secs: 1,
            }),
            quota: Some(QuotaInfo {
                limit: 1000,
                remaining: 998,
                reset_secs: 3600,
                window_secs: 2_592_000,
            }),
            credits: None,
        };
        add_rate_limit_headers(&mut h, &limits);
        assert_eq!(
            h["ratelimit-policy"],
            r#""burst";q=50;w=1, "quota";q=1000;w=2592000"#
        );
        assert_eq!(h["ratelimit"], r#""burst";r=49;t=1, "quota";r=998;t=3600"#);

        // Credits: with a refill, its amount per period and the time until it.
        let mut h = HeaderMap::new();
        let credits = |refill| LimitInfo {
            credits: Some(CreditInfo {
                remaining: 42,
                refill,
                reset_secs: 7200,
                window_days: 1,
            }),
            ..LimitInfo::default()
        };
        add_rate_limit_headers(&mut h, &credits(500));
        assert_eq!(h["ratelimit-policy"], r#""credits";q=500;w=86400"#);
        assert_eq!(h["ratelimit"], r#""credits";r=42;t=7200"#);
        // Without: only the balance.
        let mut h = HeaderMap::new();
        add_rate_limit_headers(&mut h, &credits(0));
        assert_eq!(h["ratelimit"], r#""credits";r=42"#);
        assert!(h.get("ratelimit-policy").is_none());

        let mut h = HeaderMap::new();
        add_rate_limit_headers(&mut h, &LimitInfo::default());
        assert!(h.is_empty());
    }

    #[test]
    fn refusals_carry_aws_bodies() {
        let r = refusal(
            Refusal::LimitExceeded {
                retry_after_secs: 7,
                limits: LimitInfo::default(),
            },
            true,
        );
        assert_eq!(r.status(), 429);
        assert_eq!(r.headers()["x-amzn-errortype"], "LimitExceededException");
        assert_eq!(r.headers()["retry-after"], "7");
    }
}
