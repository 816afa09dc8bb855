//! The dashboard at `/dashboard` on the admin listener: a page, its script, style and icon, compiled
//! into the binary (no CDN, no build step), served here with headers that keep them to their own
//! origin; the JSON they read ([`api`]) and who may read it ([`session`]).
//!
//! Login exchanges the admin credentials for a session cookie; every change carries a CSRF token.
//! Without credentials the admin listener is loopback-only, and so is the dashboard: no login, but a
//! `Host` that is not loopback is refused (DNS rebinding) and changes still need the token.

mod api;
mod session;

use std::sync::Arc;

use axum::Router;
use axum::extract::Request;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use http::{HeaderValue, header};

use crate::error::AdminError;
use crate::service::Admin;

const INDEX: &str = include_str!("../../assets/dashboard/index.html");
const SCRIPT: &str = include_str!("../../assets/dashboard/app.js");
const STYLE: &str = include_str!("../../assets/dashboard/style.css");
/// The dashboard's icon, served at `/favicon.ico` where browsers look for it (as SVG, which they
/// render whatever the name).
const ICON: &str = include_str!("../../assets/dashboard/favicon.svg");

/// The dashboard's state: the control plane and its sessions.
struct Dashboard {
    admin: Arc<Admin>,
    sessions: session::Sessions,
}

/// The dashboard's routes, for the admin router (`secure`: the listener is TLS).
pub(crate) fn router(admin: Arc<Admin>, secure: bool) -> Router {
    let sessions = session::Sessions::new(admin.credentials(), secure);
    let dash = Arc::new(Dashboard { admin, sessions });
    let api = Router::new()
        .route("/dashboard/api/session", get(session::current))
        .route("/dashboard/api/overview", get(api::overview))
        .route("/dashboard/api/keys", get(api::keys).post(api::create_key))
        .route("/dashboard/api/keys/{id}", get(api::key_detail))
        .route("/dashboard/api/keys/{id}/enabled", post(api::set_enabled))
        .route(
            "/dashboard/api/keys/{id}/remaining",
            post(api::set_remaining),
        )
        .route("/dashboard/api/plans", get(api::plans))
        .route("/dashboard/api/customers", get(api::customers))
        .route("/dashboard/logout", post(session::logout))
        .layer(middleware::from_fn_with_state(
            dash.clone(),
            session::signed_in,
        ));
    Router::new()
        .route(
            "/dashboard",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/dashboard/",
            get(|| async { asset(INDEX, "text/html; charset=utf-8") }),
        )
        .route(
            "/dashboard/app.js",
            get(|| async { asset(SCRIPT, "text/javascript; charset=utf-8") }),
        )
        .route(
            "/dashboard/style.css",
            get(|| async { asset(STYLE, "text/css; charset=utf-8") }),
        )
        .route(
            "/favicon.ico",
            get(|| async { asset(ICON, "image/svg+xml") }),
        )
        .route("/dashboard/login", post(session::login))
        .merge(api)
        .layer(middleware::from_fn(hardened))
        .with_state(dash)
}

fn asset(body: &'static str, content_type: &'static str) -> Response {
    let mut resp = body.into_response();
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp
}

/// Headers every dashboard answer carries: only its own scripts and styles, never in a frame, never
/// cached.
async fn hardened(req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'; base-uri 'none'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// A JSON body, or a 400 with `expected`.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8], expected: &str) -> Result<T, AdminError> {
    serde_json::from_slice(body).map_err(|_| AdminError::BadRequest(expected.into()))
}
