//! The dashboard at `/dashboard` on the admin listener: a page and its script, compiled into the
//! binary (no CDN, no build step), and the JSON they read, computed by the same [`Admin`] calls the
//! AWS routes use.
//!
//! Login exchanges the admin credentials for a session cookie (HttpOnly, SameSite=Strict, Secure over
//! TLS) holding the access key id, an expiry and a nonce, signed with HMAC-SHA256 under a key derived
//! from the configured credentials (so sessions survive restarts and die when the credentials
//! change). Every change carries a CSRF token, an HMAC of the session's nonce, in `X-CSRF-Token`.
//! Without credentials the admin listener is loopback-only, and so is the dashboard: no login, but a
//! `Host` that is not loopback is refused (DNS rebinding) and changes still need the token.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Path, RawQuery, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use bytes::Bytes;
use hmac::{Hmac, KeyInit, Mac};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use tollgate_core::quota::{EpochDay, QuotaWindow};
use tollgate_store::Series;
use tollgate_store::report::{period_usage, plan_usage};

use crate::answer::{Answer, reply};
use crate::error::AdminError;
use crate::failures::ClientAddr;
use crate::service::{Admin, KeyChange, NameQuery, Paging};
use crate::wire::CreateApiKeyIn;

const INDEX: &str = include_str!("../assets/dashboard/index.html");
const SCRIPT: &str = include_str!("../assets/dashboard/app.js");
const STYLE: &str = include_str!("../assets/dashboard/style.css");
/// The dashboard's icon, served at `/favicon.ico` where browsers look for it (as SVG, which they
/// render whatever the name).
const ICON: &str = include_str!("../assets/dashboard/favicon.svg");

const COOKIE: &str = "tollgate_session";
/// How long a session lasts.
const SESSION_SECS: i64 = 12 * 3600;
/// The most keys the keys page lists at once (it searches by name prefix beyond that).
const KEYS_SHOWN: i64 = 500;

type HmacSha256 = Hmac<Sha256>;

/// The dashboard's state: the control plane and its sessions.
struct Dashboard {
    admin: Arc<Admin>,
    sessions: Sessions,
}

/// Signs and checks sessions and CSRF tokens.
struct Sessions {
    key: [u8; 32],
    /// Served over TLS: cookies are `Secure`.
    secure: bool,
}

/// A signed-in user (or the loopback user when no credentials are configured).
#[derive(Clone)]
struct Session {
    user: String,
    nonce: String,
    /// The user's sign-outs when it was issued: a later sign-out ends it.
    epoch: u64,
}

impl Sessions {
    /// Sessions under a key derived from `creds` (random when there are none).
    fn new(creds: &[crate::sigv4::Credentials], secure: bool) -> Self {
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

/// The dashboard's routes, for the admin router (`secure`: the listener is TLS).
pub(crate) fn router(admin: Arc<Admin>, secure: bool) -> Router {
    let sessions = Sessions::new(admin.credentials(), secure);
    let dash = Arc::new(Dashboard { admin, sessions });
    let api = Router::new()
        .route("/dashboard/api/session", get(session))
        .route("/dashboard/api/overview", get(overview))
        .route("/dashboard/api/keys", get(keys).post(create_key))
        .route("/dashboard/api/keys/{id}", get(key_detail))
        .route("/dashboard/api/keys/{id}/enabled", post(set_enabled))
        .route("/dashboard/api/keys/{id}/remaining", post(set_remaining))
        .route("/dashboard/api/plans", get(plans))
        .route("/dashboard/logout", post(logout))
        .layer(middleware::from_fn_with_state(dash.clone(), signed_in));
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
        .route("/dashboard/login", post(login))
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
async fn signed_in(State(dash): State<Arc<Dashboard>>, mut req: Request, next: Next) -> Response {
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

async fn login(
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
async fn logout(
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

async fn session(
    State(dash): State<Arc<Dashboard>>,
    axum::Extension(s): axum::Extension<Session>,
) -> Response {
    let login = !dash.admin.credentials().is_empty();
    reply(
        StatusCode::OK,
        &json!({ "user": s.user, "csrf": dash.sessions.csrf(&s.nonce), "login": login }),
    )
}

/// A JSON body, or a 400 with `expected`.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8], expected: &str) -> Result<T, AdminError> {
    serde_json::from_slice(body).map_err(|_| AdminError::BadRequest(expected.into()))
}

/// Every date from `from` to `to`, `YYYY-MM-DD`.
fn day_list(from: EpochDay, to: EpochDay) -> Vec<String> {
    let mut days = Vec::new();
    let mut d = from;
    while d <= to {
        days.push(d.to_string());
        d = d.next();
    }
    days
}

/// The last 30 days across every plan and key, by outcome; the top consumers by volume and by
/// refusals.
async fn overview(State(dash): State<Arc<Dashboard>>) -> Answer {
    let admin = &dash.admin;
    admin.gateway.flush().await.map_err(AdminError::Internal)?;
    let to = admin.today();
    let from = EpochDay(to.0.saturating_sub(29));
    let plans = admin.plans.lock().await.clone();
    let mut overview = admin
        .blocking(move |admin| {
            let n = (to.0 - from.0 + 1) as usize;
            let mut days = vec![[0u64; 3]; n];
            let mut by_key: HashMap<String, [u64; 2]> = HashMap::new();
            // Per day: allowed, throttled, quota exceeded; per key: allowed, refused.
            let series = [
                (Series::Used, 0, 0),
                (Series::Throttled, 1, 1),
                (Series::QuotaExceeded, 2, 1),
            ];
            for plan in &plans {
                for (series, on_day, of_key) in series {
                    for r in admin.store.series(series, &plan.id, None, from, to)? {
                        days[(r.day.0 - from.0) as usize][on_day] += r.count();
                        by_key.entry(r.key_id.clone()).or_default()[of_key] += r.count();
                    }
                }
            }
            let top = |i: usize| -> Result<Vec<Value>, AdminError> {
                let mut ranked: Vec<(&String, u64)> = by_key
                    .iter()
                    .map(|(k, v)| (k, v[i]))
                    .filter(|(_, v)| *v > 0)
                    .collect();
                ranked.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
                ranked
                    .into_iter()
                    .take(10)
                    .map(|(id, count)| {
                        let name = admin.store.key(id)?.map(|k| k.name).unwrap_or_default();
                        Ok(json!({ "id": id, "name": name, "count": count }))
                    })
                    .collect()
            };
            Ok(json!({
                "days": day_list(from, to),
                "allowed": days.iter().map(|d| d[0]).collect::<Vec<_>>(),
                "throttled": days.iter().map(|d| d[1]).collect::<Vec<_>>(),
                "quotaExceeded": days.iter().map(|d| d[2]).collect::<Vec<_>>(),
                "topByVolume": top(0)?,
                "topByRefusals": top(1)?,
            }))
        })
        .await?;
    // Refusals for the key come from the data plane's counters: most carry no key to store them by.
    overview["forbidden"] = json!(admin.gateway.forbidden());
    let quantile = |q| {
        admin
            .gateway
            .latency(q)
            .map(|(seconds, under)| json!({ "seconds": seconds, "under": under }))
    };
    overview["latency"] = json!({ "p50": quantile(0.5), "p99": quantile(0.99) });
    Ok(reply(StatusCode::OK, &overview))
}

/// Up to [`KEYS_SHOWN`] keys whose name starts with `q` in any case: their plans, last use, and this period's
/// quota use per plan with the date it resets.
async fn keys(State(dash): State<Arc<Dashboard>>, RawQuery(q): RawQuery) -> Answer {
    let admin = &dash.admin;
    let prefix = q
        .as_deref()
        .and_then(|q| q.split('&').find_map(|p| p.strip_prefix("q=")))
        .map(|v| {
            percent_encoding::percent_decode_str(&v.replace('+', " "))
                .decode_utf8_lossy()
                .into_owned()
        })
        .filter(|v| !v.is_empty())
        .map(|v| NameQuery::any_case(&v));
    let paging = Paging {
        limit: Some(KEYS_SHOWN),
        position: None,
    };
    let page = admin.list_keys(prefix, None, false, paging).await?;
    let plans = admin.plans.lock().await.clone();
    let served = admin.gateway.served();
    let today = admin.today();
    let ids: Vec<String> = page.item.iter().map(|k| k.id.clone()).collect();
    let listed = admin
        .blocking(move |admin| {
            // (plan, key) → [used this period, limit], for the listed keys' plans with a quota.
            let mut quota_use: HashMap<(String, String), Value> = HashMap::new();
            for plan in &plans {
                let Some(quota) = &plan.quota else { continue };
                let members = served.keys_of(&plan.id);
                let listed: Vec<&str> = ids
                    .iter()
                    .map(String::as_str)
                    .filter(|k| members.contains(k))
                    .collect();
                if listed.is_empty() {
                    continue;
                }
                let usage = plan_usage(&*admin.store, &listed, plan, None, today, today)?;
                let resets = QuotaWindow::containing(quota, today).end;
                for k in listed {
                    let remaining = usage.report(k).first().map_or(0, |d| d[1]);
                    let used = u64::from(quota.limit).saturating_sub(remaining);
                    quota_use.insert(
                        (plan.id.clone(), k.to_owned()),
                        json!({ "used": used, "limit": quota.limit, "resets": resets.to_string() }),
                    );
                }
            }
            let names: BTreeMap<&str, &str> = plans
                .iter()
                .map(|p| (p.id.as_str(), p.name.as_str()))
                .collect();
            let rows: Vec<Value> = page
                .item
                .iter()
                .map(|k| {
                    let of_key: Vec<Value> = served
                        .plans_of(&k.id)
                        .into_iter()
                        .map(|p| {
                            json!({
                                "id": p,
                                "name": names.get(p).copied().unwrap_or(p),
                                "quota": quota_use.get(&(p.to_owned(), k.id.clone())),
                            })
                        })
                        .collect();
                    json!({
                        "id": k.id, "name": k.name, "enabled": k.enabled,
                        "lastUsedDate": k.last_used_date, "plans": of_key,
                    })
                })
                .collect();
            Ok(json!({ "keys": rows, "more": page.position.is_some() }))
        })
        .await?;
    Ok(reply(StatusCode::OK, &listed))
}

/// One key: its record and, per plan, 90 days of usage by outcome against the quota.
async fn key_detail(State(dash): State<Arc<Dashboard>>, Path(id): Path<String>) -> Answer {
    let admin = &dash.admin;
    let key = admin.get_key(&id, false).await?;
    let to = admin.today();
    // From its creation, at most 90 days.
    let created_at = u64::try_from(key.created_date).unwrap_or(0);
    let created = EpochDay::from_nanos(created_at.saturating_mul(1_000_000_000));
    let from = EpochDay(to.0.saturating_sub(89)).max(created).min(to);
    let plans = admin.plans.lock().await.clone();
    let mut of_key = Vec::new();
    for plan_id in admin.gateway.served().plans_of(&id) {
        let Some(plan) = plans.iter().find(|p| p.id == plan_id) else {
            continue;
        };
        let paging = Paging::default();
        let (start, end) = (from.to_string(), to.to_string());
        let usage = admin
            .usage_detail(&plan.id, Some(&id), Some(&start), Some(&end), &paging)
            .await?;
        // Per-method throttles, as `apiId:stage /path/METHOD`.
        let methods: BTreeMap<String, _> = plan
            .api_stages
            .iter()
            .flat_map(|s| {
                s.throttle
                    .iter()
                    .map(move |(m, t)| (format!("{}:{} {m}", s.api_id, s.stage), t))
            })
            .collect();
        of_key.push(json!({
            "id": plan.id, "name": plan.name, "quota": plan.quota, "throttle": plan.throttle,
            "methodThrottles": methods,
            "days": usage.values.get(&id).cloned().unwrap_or_default(),
        }));
    }
    Ok(reply(
        StatusCode::OK,
        &json!({ "key": key, "days": day_list(from, to), "plans": of_key }),
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct NewKeyIn {
    name: String,
    usage_plan_id: Option<String>,
}

/// CreateApiKey (enabled), then CreateUsagePlanKey: the value is in this answer only.
async fn create_key(State(dash): State<Arc<Dashboard>>, body: Bytes) -> Answer {
    let input: NewKeyIn = parse(&body, "Expected name and usagePlanId")?;
    let admin = &dash.admin;
    let created = CreateApiKeyIn {
        name: Some(input.name),
        enabled: Some(true),
        ..CreateApiKeyIn::default()
    };
    let key = admin.create_key(created).await?;
    if let Some(plan) = input.usage_plan_id.filter(|p| !p.is_empty()) {
        admin
            .create_plan_key(&plan, Some(key.id.clone()), Some("API_KEY".into()))
            .await?;
    }
    Ok(reply(StatusCode::CREATED, &key))
}

#[derive(Deserialize)]
struct EnabledIn {
    enabled: bool,
}

async fn set_enabled(
    State(dash): State<Arc<Dashboard>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer {
    let input: EnabledIn = parse(&body, "Expected enabled")?;
    let change = vec![KeyChange::Enabled(input.enabled)];
    Ok(reply(
        StatusCode::OK,
        &dash.admin.change_key(&id, change).await?,
    ))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct RemainingIn {
    usage_plan_id: String,
    remaining: i64,
}

/// UpdateUsage: what the key has left this period.
async fn set_remaining(
    State(dash): State<Arc<Dashboard>>,
    Path(id): Path<String>,
    body: Bytes,
) -> Answer {
    let input: RemainingIn = parse(&body, "Expected usagePlanId and remaining")?;
    let usage = dash
        .admin
        .set_remaining(&input.usage_plan_id, &id, input.remaining)
        .await?;
    Ok(reply(StatusCode::OK, &usage))
}

/// Every plan: its limits, stages, number of keys and the requests counted this period.
async fn plans(State(dash): State<Arc<Dashboard>>) -> Answer {
    let admin = &dash.admin;
    admin.gateway.flush().await.map_err(AdminError::Internal)?;
    let plans = admin.plans.lock().await.clone();
    let served = admin.gateway.served();
    let today = admin.today();
    let listed = admin
        .blocking(move |admin| {
            let used = period_usage(&*admin.store, plans.iter(), today)?;
            let rows: Vec<Value> = plans
                .iter()
                .map(|p| {
                    let period: i64 = used
                        .iter()
                        .filter(|((plan, _), _)| *plan == p.id)
                        .map(|(_, n)| *n)
                        .sum();
                    let resets = p
                        .quota
                        .as_ref()
                        .map(|q| QuotaWindow::containing(q, today).end.to_string());
                    json!({
                        "id": p.id, "name": p.name, "description": p.description,
                        "apiStages": p.api_stages, "throttle": p.throttle, "quota": p.quota,
                        "keys": served.keys_of(&p.id).len(), "usedThisPeriod": period,
                        "resets": resets,
                    })
                })
                .collect();
            Ok(json!({ "plans": rows }))
        })
        .await?;
    Ok(reply(StatusCode::OK, &listed))
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
