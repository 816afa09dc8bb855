//! What an admin handler (AWS's API or the dashboard's) answers: a JSON body with its status, or
//! an [`AdminError`] in AWS's error shape.

use axum::response::{IntoResponse, Response};
use http::StatusCode;
use serde::Serialize;

use crate::error::AdminError;

/// A handler's answer.
pub(crate) type Answer<T = Response> = Result<T, AdminError>;

/// `value` as a JSON body with `status`.
pub(crate) fn reply<T: Serialize>(status: StatusCode, value: &T) -> Response {
    match serde_json::to_vec(value) {
        Ok(body) => {
            let mut resp = (status, body).into_response();
            resp.headers_mut().insert(
                http::header::CONTENT_TYPE,
                http::HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(e) => AdminError::Internal(e.to_string()).into_response(),
    }
}
