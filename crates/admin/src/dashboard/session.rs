//! Sign-in, sessions and CSRF tokens. A session is a cookie (HttpOnly, SameSite=Strict, Secure over
//! TLS) holding the access key id, an expiry, a nonce and the user's session epoch, signed with
//! HMAC-SHA256 under a key derived from the configured credentials (so sessions survive restarts and
//! die when the credentials change). A sign-out raises the user's epoch in the store, ending every
//! session of that user everywhere. Every change carries a CSRF token, an HMAC of the session's
//! nonce, in `X-CSRF-Token`.

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde_json::json;
use sha2::{Digest, Sha256};

use super::{Dashboard, parse};
use crate::answer::{Answer, reply};
use crate::error::AdminError;
use crate::failures::ClientAddr;

const COOKIE: &str = "tollgate_session";
/// How long a session lasts.
const SESSION_SECS: i64 = 12 * 3600;

type HmacSha256 = Hmac<Sha256>;

/// Signs and checks sessions and CSRF tokens.
pub(super) struct Sessions {
    key: [u8; 32],
    /// Served over TLS: cookies are `Secure`.
    secure: bool,
}

/// A signed-in user (or the loopback user when no credentials are configured).
#[derive(Clone)]
pub(super) struct Session {
    user: String,
    nonce: String,
    /// The user's sign-outs when it was issued: a later sign-out ends it.
    epoch: u64,
}

impl Sessions {
    /// Sessions under a key derived from `creds` (random when there are none).
    pub(super) fn new(creds: &[crate::sigv4::Credentials], secure: bool) -> Self {
        let key = if creds.is_empty() {
            let mut key = [0u8; 32];
            getrandom::fill(&mut key).expect("the operating system's random source failed");
            key
        } else {
            let mut h = Sha256::new();
            h.update(b"tollgate dashboard sessions v1\0");
            for c in creds {
                h.update(c.access_key_id.as_bytes());
                h.update([0]);
                h.update(c.secret_access_key.as_bytes());
                h.update([0]);
            }
            h.finalize().into()
        };
        Self { key, secure }
    }

    fn mac(&self, parts: &[&str]) -> HmacSha256 {
        let mut mac = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        for p in parts {
            mac.update(p.as_bytes());
            mac.update(b"|");
        }
        mac
    }

    fn csrf(&self, nonce: &str) -> String {
        hex::encode(self.mac(&["csrf", nonce]).finalize().into_bytes())
    }

    /// The cookie for a new session of `user`, whose sign-outs so far are `epoch`.
    fn issue(&self, user: &str, epoch: u64, now: i64) -> (Session, String) {
        let mut nonce = [0u8; 16];
        getrandom::fill(&mut nonce).expect("the operating system's random source failed");
        let nonce = hex::encode(nonce);
        let expires = (now + SESSION_SECS).to_string();
        let epoch_text = epoch.to_string();
        let mac = hex::encode(
            self.mac(&["session", user, &expires, &epoch_text, &nonce])
                .finalize()
                .into_bytes(),
        );
        let value = format!("{user}.{expires}.{epoch_text}.{nonce}.{mac}");
        let session = Session {
            user: user.to_owned(),
            nonce,
            epoch,
        };
        (session, value)
    }

    /// The session a cookie value holds, if its signature checks out and it has not expired (its
    /// epoch is the caller's to compare with the store's).
    fn check(&self, value: &str, now: i64) -> Option<Session> {
        let mut parts = value.rsplitn(5, '.');
        let (mac, nonce, epoch, expires, user) = (
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
            parts.next()?,
        );
        let mac = hex::decode(mac).ok()?;
        self.mac(&["session", user, expires, epoch, nonce])
            .verify_slice(&mac)
            .ok()?;
        (expires.parse::<i64>().ok()? > now).then(|| Session {
            user: user.to_owned(),
            nonce: nonce.to_owned(),
            epoch: epoch.parse().unwrap_or(u64::MAX),
        })
    }

    fn set_cookie(&self, value: &str, max_age: i64) -> HeaderValue {
        let secure = if self.secure { "; Secure" } else { "" };
        let cookie = format!(
            "{COOKIE}={value}; Path=/dashboard; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
        );
        HeaderValue::from_str(&cookie).unwrap_or_else(|_| HeaderValue::from_static(""))
    }
}

fn refuse(status: StatusCode, message: &str) -> Response {
    reply(status, &json!({ "message": message }))
}

fn cookie<'h>(headers: &'h HeaderMap, name: &str) -> Option<&'h str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|c| c.trim().strip_prefix(name)?.strip_prefix('='))
}

/// Lets a request through with its [`Session`]: signed in (or loopback without credentials), and for
/// a change, with the session's CSRF token.
pub(super) async fn signed_in(
    State(dash): State<Arc<Dashboard>>,
    mut req: Request,
    next: Next,
) -> Response {
    let headers = req.headers();
    let session = if dash.admin.credentials().is_empty() {
        if !crate::local::is_loopback_host(headers) {
            return refuse(StatusCode::FORBIDDEN, "Forbidden");
        }
        Session {
            user: "local".into(),
            nonce: "loopback".into(),
            epoch: 0,
        }
    } else {
        let Some(s) =
            cookie(headers, COOKIE).and_then(|v| dash.sessions.check(v, dash.admin.now_secs()))
        else {
            return refuse(StatusCode::UNAUTHORIZED, "Unauthorized");
        };
        // Signed out since (on any instance, before any restart): over.
        match session_epoch(&dash, &s.user).await {
            Ok(epoch) if epoch == s.epoch => s,
            Ok(_) => return refuse(StatusCode::UNAUTHORIZED, "Unauthorized"),
            Err(e) => return e.into_response(),
        }
    };
    let headers = req.headers();
    if req.method() != http::Method::GET {
        let token = headers.get("x-csrf-token").and_then(|v| v.to_str().ok());
        let ok = token.and_then(|t| hex::decode(t).ok()).is_some_and(|t| {
            dash.sessions
                .mac(&["csrf", &session.nonce])
                .verify_slice(&t)
                .is_ok()
        });
        if !ok {
            return refuse(StatusCode::FORBIDDEN, "Missing or invalid CSRF token");
        }
    }
    req.extensions_mut().insert(session);
    next.run(req).await
}

/// How many times `user` has signed out, as the store keeps it.
async fn session_epoch(dash: &Dashboard, user: &str) -> Result<u64, AdminError> {
    let user = user.to_owned();
    dash.admin
        .blocking(move |a| Ok(a.store.session_epoch(&user)?))
        .await
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct LoginIn {
    access_key_id: String,
    secret_access_key: String,
}

pub(super) async fn login(
    State(dash): State<Arc<Dashboard>>,
    addr: Option<axum::Extension<ClientAddr>>,
    body: Bytes,
) -> Answer {
    let input: LoginIn = parse(&body, "Expected accessKeyId and secretAccessKey")?;
    let attempt = dash.admin.credentials_attempt(addr.map(|a| a.0.0))?;
    // Compared as MACs: constant time, whatever the lengths.
    let given = dash
        .sessions
        .mac(&["login", &input.secret_access_key])
        .finalize()
        .into_bytes();
    let known = dash.admin.credentials().iter().find(|c| {
        c.access_key_id == input.access_key_id
            && dash
                .sessions
                .mac(&["login", &c.secret_access_key])
                .verify_slice(&given)
                .is_ok()
    });
    let Some(known) = known else {
        tracing::warn!(access_key_id = %input.access_key_id, "dashboard login refused");
        return Ok(refuse(
            StatusCode::FORBIDDEN,
            "The access key id or secret is not valid",
        ));
    };
    dash.admin.failed.succeeded(attempt);
    let epoch = session_epoch(&dash, &known.access_key_id).await?;
    let (session, value) = dash
        .sessions
        .issue(&known.access_key_id, epoch, dash.admin.now_secs());
    let mut resp = reply(
        StatusCode::OK,
        &json!({ "user": session.user, "csrf": dash.sessions.csrf(&session.nonce) }),
    );
    resp.headers_mut().insert(
        header::SET_COOKIE,
        dash.sessions.set_cookie(&value, SESSION_SECS),
    );
    Ok(resp)
}

/// Signs out: the cookie is cleared, and the user's sessions end server-side (a copy of the cookie
/// kept elsewhere is refused from now on).
pub(super) async fn logout(
    State(dash): State<Arc<Dashboard>>,
    axum::Extension(s): axum::Extension<Session>,
) -> Answer {
    if !dash.admin.credentials().is_empty() {
        dash.admin
            .blocking(move |a| Ok(a.store.end_sessions(&s.user)?))
            .await?;
    }
    let mut resp = StatusCode::NO_CONTENT.into_response();
    resp.headers_mut()
        .insert(header::SET_COOKIE, dash.sessions.set_cookie("", 0));
    Ok(resp)
}

pub(super) async fn current(
    State(dash): State<Arc<Dashboard>>,
    axum::Extension(s): axum::Extension<Session>,
) -> Response {
    let login = !dash.admin.credentials().is_empty();
    reply(
        StatusCode::OK,
        &json!({ "user": s.user, "csrf": dash.sessions.csrf(&s.nonce), "login": login }),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::local::tests::headers;

    #[test]
    fn sessions_are_signed_and_expire() {
        let dash = Sessions {
            key: [7; 32],
            secure: false,
        };
        let (session, value) = dash.issue("AKIDEXAMPLE", 3, 1_000);
        let back = dash.check(&value, 1_000).expect("valid");
        assert_eq!(
            (back.user.as_str(), back.nonce.as_str(), back.epoch),
            ("AKIDEXAMPLE", session.nonce.as_str(), 3)
        );
        let older = value.replacen(".3.", ".4.", 1);
        assert!(dash.check(&older, 1_000).is_none(), "another epoch");
        assert!(
            dash.check(&value, 1_000 + SESSION_SECS).is_none(),
            "expired"
        );
        let forged = value.replacen("AKIDEXAMPLE", "AKIDOTHER", 1);
        assert!(dash.check(&forged, 1_000).is_none(), "another user");
        let later = value.replacen(&(1_000 + SESSION_SECS).to_string(), "9999999999", 1);
        assert!(dash.check(&later, 1_000).is_none(), "a longer life");
        assert!(dash.check("garbage", 1_000).is_none());
        let other = Sessions {
            key: [8; 32],
            secure: false,
        };
        assert!(other.check(&value, 1_000).is_none(), "another key");
        assert_ne!(other.csrf(&session.nonce), dash.csrf(&session.nonce));
    }

    #[test]
    fn cookies_are_found_among_others() {
        let h = headers(&[
            ("cookie", "a=1; tollgate_session=v.1.n.m"),
            ("cookie", "b=2"),
        ]);
        assert_eq!(cookie(&h, COOKIE), Some("v.1.n.m"));
        assert_eq!(cookie(&h, "b"), Some("2"));
        assert_eq!(cookie(&h, "tollgate"), None);
    }
}
