//! Control-plane errors and the one place they become AWS error responses: status, `x-amzn-ErrorType`
//! and a `{"message": …, "__type": …}` body (botocore reads the header, moto-style clients the body).

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use tollgate_store::StoreError;

use crate::sigv4::SignatureError;

/// Everything an admin request can fail with.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    /// 400 BadRequestException.
    #[error("{0}")]
    BadRequest(String),
    /// 404 NotFoundException.
    #[error("{0}")]
    NotFound(String),
    /// 409 ConflictException.
    #[error("{0}")]
    Conflict(String),
    /// 413: a body over the limit, refused before it is read.
    #[error("{0}")]
    TooLarge(String),
    /// 403 AccessDeniedException: a request the admin listener does not take from this caller.
    #[error("{0}")]
    AccessDenied(String),
    /// 415 UnsupportedMediaTypeException: a write in a format the operation does not take.
    #[error("{0}")]
    UnsupportedMediaType(String),
    /// 429 TooManyRequestsException: too many failed credentials; try again after these seconds.
    #[error("Too many failed attempts; retry after {0} s")]
    TooManyRequests(u64),
    /// 503 ServiceUnavailableException: too many unverified request bodies at once; try again
    /// after these seconds.
    #[error("Too many request bodies awaiting their signature check; retry after {0} s")]
    ServiceUnavailable(u64),
    /// 403, one of the SigV4 error types.
    #[error(transparent)]
    Signature(#[from] SignatureError),
    /// 500: the store or the gateway failed. The details are logged, not sent.
    #[error("{0}")]
    Internal(String),
}

impl From<StoreError> for AdminError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::DuplicateKeyValue => AdminError::Conflict("API Key already exists".into()),
            held @ StoreError::ValueHeld { .. } => AdminError::Conflict(held.to_string()),
            StoreError::NotFound(what) => AdminError::NotFound(what),
            other => AdminError::Internal(other.to_string()),
        }
    }
}

/// A 400 BadRequestException saying `msg`.
pub(crate) fn bad(msg: impl Into<String>) -> AdminError {
    AdminError::BadRequest(msg.into())
}

/// Shorthand for AWS's message for unknown API key ids.
pub fn unknown_key() -> AdminError {
    AdminError::NotFound("Invalid API Key identifier specified".into())
}

/// Shorthand for AWS's message for unknown usage plan ids.
pub fn unknown_plan() -> AdminError {
    AdminError::NotFound("Invalid Usage Plan ID specified".into())
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        let (status, error_type, message) = match &self {
            AdminError::BadRequest(m) => {
                (StatusCode::BAD_REQUEST, "BadRequestException", m.clone())
            }
            AdminError::NotFound(m) => (StatusCode::NOT_FOUND, "NotFoundException", m.clone()),
            AdminError::Conflict(m) => (StatusCode::CONFLICT, "ConflictException", m.clone()),
            AdminError::TooLarge(m) => (
                StatusCode::PAYLOAD_TOO_LARGE,
                "RequestTooLongException",
                m.clone(),
            ),
            AdminError::AccessDenied(m) => {
                (StatusCode::FORBIDDEN, "AccessDeniedException", m.clone())
            }
            AdminError::UnsupportedMediaType(m) => (
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "UnsupportedMediaTypeException",
                m.clone(),
            ),
            AdminError::TooManyRequests(_) => (
                StatusCode::TOO_MANY_REQUESTS,
                "TooManyRequestsException",
                self.to_string(),
            ),
            AdminError::ServiceUnavailable(_) => (
                StatusCode::SERVICE_UNAVAILABLE,
                "ServiceUnavailableException",
                self.to_string(),
            ),
            AdminError::Signature(e) => (StatusCode::FORBIDDEN, e.error_type(), e.to_string()),
            AdminError::Internal(detail) => {
                tracing::error!(error = %detail, "admin request failed");
                (
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "InternalFailure",
                    "Internal server error".to_string(),
                )
            }
        };
        let body = serde_json::json!({ "message": message, "__type": error_type }).to_string();
        let mut resp = (status, body).into_response();
        let h = resp.headers_mut();
        h.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert("x-amzn-errortype", HeaderValue::from_static(error_type));
        if let AdminError::TooManyRequests(wait) | AdminError::ServiceUnavailable(wait) = self {
            h.insert(http::header::RETRY_AFTER, HeaderValue::from(wait));
        }
        resp
    }
}
