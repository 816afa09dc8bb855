//! The admin HTTP server: AWS API Gateway's REST paths, SigV4 in front of all of them.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, RawQuery, Request, State};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch, post};
use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use serde::de::DeserializeOwned;
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tollgate_core::model::Tags;

use crate::answer::{Answer, reply};
use crate::body;
use crate::error::AdminError;
use crate::exposition::Exposition;
use crate::failures::ClientAddr;
use crate::service::{Admin, NameQuery, Paging};
use crate::sigv4::{self, SignedHead};
use crate::wire::{
    CreateApiKeyIn, CreateUsagePlanIn, CreateUsagePlanKeyIn, CreditsIn, PatchIn, RotateApiKeyIn,
};

/// What keeps the admin listener from starving the data plane.
#[derive(Debug, Clone, Copy)]
pub struct ListenerLimits {
    /// The most connections held at once; more are closed as soon as accepted.
    pub max_connections: usize,
    /// How long a client may take to send a request head (idle keep-alive time included), and to
    /// finish a TLS handshake.
    pub head_timeout: Duration,
}

type Shared = State<Arc<Admin>>;

/// The admin API's routes, and the dashboard's (`secure`: served over TLS).
pub fn router(admin: Arc<Admin>, secure: bool) -> Router {
    let aws = Router::new()
        .route("/apikeys", get(list_keys).post(create_key))
        .route(
            "/apikeys/{id}",
            get(get_key).patch(update_key).delete(delete_key),
        )
        .route("/usageplans", get(list_plans).post(create_plan))
        .route(
            "/usageplans/{id}",
            get(get_plan).patch(update_plan).delete(delete_plan),
        )
        .route(
            "/usageplans/{id}/keys",
            get(list_plan_keys).post(create_plan_key),
        )
        .route(
            "/usageplans/{id}/keys/{key}",
            get(get_plan_key).delete(delete_plan_key),
        )
        .route("/usageplans/{id}/usage", get(get_usage))
        .route("/tollgate/usageplans/{id}/usage", get(get_usage_detail))
        .route(
            "/tollgate/usageplans/{id}/customers/{customer}/usage",
            get(get_customer_usage),
        )
        .route("/usageplans/{id}/keys/{key}/usage", patch(update_usage))
        .route(
            "/tags/{*arn}",
            get(get_tags).put(tag_resource).delete(untag_resource),
        )
        .route("/tollgate/apikeys/find", post(find_key))
        .route("/tollgate/apikeys/{id}/rotate", post(rotate_key))
        .route("/tollgate/apikeys/{id}/credits", post(add_credits))
        .route("/tollgate/events", get(list_events))
        .route("/tollgate/events/{id}/retry", post(retry_event))
        .route("/tollgate/webhooks/{name}/test", post(test_webhook))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .fallback(unknown_operation)
        .layer(middleware::from_fn_with_state(admin.clone(), authenticate))
        .layer(DefaultBodyLimit::max(body::MAX_BODY))
        .with_state(admin.clone());
    crate::dashboard::router(admin, secure).merge(aws)
}

/// Serves the admin API on `listener` until `shutdown` resolves, within `limits`: its own
/// connection limit (so it cannot take the data plane's descriptors) and a head timeout; over TLS
/// when `tls` is given.
pub async fn serve(
    admin: Arc<Admin>,
    listener: TcpListener,
    tls: Option<TlsAcceptor>,
    limits: ListenerLimits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let service = TowerToHyperService::new(router(admin, tls.is_some()));
    let slots = Arc::new(tokio::sync::Semaphore::new(
        limits
            .max_connections
            .min(tokio::sync::Semaphore::MAX_PERMITS),
    ));
    let graceful = GracefulShutdown::new();
    let mut http = hyper::server::conn::http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(limits.head_timeout);
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            accepted = listener.accept() => {
                let (stream, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(err) => {
                        // Out of descriptors and the like: back off instead of spinning.
                        tracing::warn!(error = %err, "admin accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let Ok(slot) = slots.clone().try_acquire_owned() else {
                    drop(stream);
                    continue;
                };
                let (http, service) = (http.clone(), service.clone());
                // Each request knows its client's address (failed credentials back off by it).
                let peer = ClientAddr(peer.ip());
                let service = hyper::service::service_fn(move |mut req: http::Request<hyper::body::Incoming>| {
                    req.extensions_mut().insert(peer);
                    hyper::service::Service::call(&service, req)
                });
                match &tls {
                    None => {
                        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), service));
                        tokio::spawn(async move {
                            let _ = conn.await;
                            drop(slot);
                        });
                    }
                    Some(acceptor) => {
                        let (acceptor, watcher) = (acceptor.clone(), graceful.watcher());
                        tokio::spawn(async move {
                            // A stalled or broken handshake holds only this task, and only as long
                            // as a request head may take.
                            let handshake = tokio::time::timeout(limits.head_timeout, acceptor.accept(stream));
                            if let Ok(Ok(stream)) = handshake.await {
                                let _ = watcher.watch(http.serve_connection(TokioIo::new(stream), service)).await;
                            }
                            drop(slot);
                        });
                    }
                }
            }
            () = &mut shutdown => break,
        }
    }
    drop(listener);
    // Requests in flight finish; idle connections close.
    let _ = tokio::time::timeout(Duration::from_secs(30), graceful.shutdown()).await;
    Ok(())
}

/// Verifies SigV4, then hands the request on. Everything but the payload is checked before the body
/// is read; a body whose hash the client signed in `x-amz-content-sha256` is read only after the
/// signature over that hash checks out, any other within the listener's budget of unverified bytes
/// ([`body`](crate::body)). Without configured credentials (allowed on loopback only) requests pass
/// unauthenticated.
async fn authenticate(State(admin): Shared, req: Request, next: Next) -> Response {
    // Load balancers and Prometheus do not sign requests; neither answer holds anything secret.
    let open =
        matches!(req.uri().path(), "/health" | "/metrics") && req.method() == http::Method::GET;
    if admin.credentials().is_empty() {
        let import = req.uri().path() == "/apikeys"
            && is_import(&query(req.uri().query().map(str::to_owned)));
        if let Err(e) = crate::local::check(req.method(), req.headers(), import) {
            return e.into_response();
        }
        return next.run(req).await;
    }
    if open {
        return next.run(req).await;
    }
    let addr = req.extensions().get::<ClientAddr>().map(|a| a.0);
    let attempt = match admin.credentials_attempt(addr) {
        Ok(attempt) => attempt,
        Err(e) => return e.into_response(),
    };
    let (parts, body) = req.into_parts();
    let head = SignedHead {
        method: &parts.method,
        path: parts.uri.path(),
        query: parts.uri.query().unwrap_or(""),
        headers: &parts.headers,
    };
    let authorized = match sigv4::check_head(&head, admin.credentials(), admin.now_secs()) {
        Ok(a) => a,
        Err(e) => return AdminError::from(e).into_response(),
    };
    let claimed = authorized.claimed_payload_hash();
    let budget = match claimed {
        Some(hash) => match authorized.verify(hash) {
            Ok(_) => None,
            Err(e) => return AdminError::from(e).into_response(),
        },
        None => Some(&admin.unverified),
    };
    let declared = parts
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let read = match body::read(body, declared, budget).await {
        Ok(read) => read,
        Err(e) => return e.into_response(),
    };
    let verified = match claimed {
        Some(claimed) if claimed == read.sha256 => Ok(()),
        Some(_) => Err(sigv4::SignatureError::Mismatch),
        None => authorized.verify(&read.sha256).map(|_| ()),
    };
    if let Err(e) = verified {
        return AdminError::from(e).into_response();
    }
    drop(authorized);
    admin.failed.succeeded(attempt);
    next.run(Request::from_parts(parts, Body::from(read.bytes)))
        .await
}

#[derive(Default, serde::Deserialize)]
struct TagsIn {
    tags: Option<Tags>,
}

/// GetTags.
async fn get_tags(State(admin): Shared, Path(arn): Path<String>) -> Answer {
    let tags = admin.tags(&arn).await?;
    Ok(reply(StatusCode::OK, &serde_json::json!({ "tags": tags })))
}

/// TagResource: 204.
async fn tag_resource(State(admin): Shared, Path(arn): Path<String>, body: Bytes) -> Answer {
    let input: TagsIn = json(&body)?;
    let tags = input
        .tags
        .ok_or_else(|| AdminError::BadRequest("Tags are required".into()))?;
    admin.retag(&arn, tags, Vec::new()).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// UntagResource (`?tagKeys=a&tagKeys=b`): 204.
async fn untag_resource(
    State(admin): Shared,
    Path(arn): Path<String>,
    RawQuery(q): RawQuery,
) -> Answer {
    let keys = query_all(q.as_deref(), "tagKeys");
    if keys.is_empty() {
        return Err(AdminError::BadRequest("Tag keys are required".into()));
    }
    admin.retag(&arn, Tags::new(), keys).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// tollgate's own: a new value for a key, the old one kept for a grace period.
async fn rotate_key(State(admin): Shared, Path(id): Path<String>, body: Bytes) -> Answer {
    let input: RotateApiKeyIn = json(&body)?;
    Ok(reply(StatusCode::OK, &admin.rotate_key(&id, input).await?))
}

/// tollgate's own: the outbox's pending or failed (`?status=`) events.
async fn list_events(State(admin): Shared, RawQuery(q): RawQuery) -> Answer {
    let q = query(q);
    let out = admin.events(q.get("status").map(String::as_str)).await?;
    Ok(reply(StatusCode::OK, &out))
}

/// tollgate's own: a failed event delivered again.
async fn retry_event(State(admin): Shared, Path(id): Path<String>) -> Answer {
    Ok(reply(StatusCode::OK, &admin.retry_event(&id).await?))
}

/// tollgate's own: a test event sent to a webhook.
async fn test_webhook(State(admin): Shared, Path(name): Path<String>) -> Answer {
    Ok(reply(StatusCode::OK, &admin.test_webhook(&name).await?))
}

/// tollgate's own: adds prepaid credits to a key, once per idempotency key.
async fn add_credits(State(admin): Shared, Path(id): Path<String>, body: Bytes) -> Answer {
    let input: CreditsIn = json(&body)?;
    Ok(reply(StatusCode::OK, &admin.add_credits(&id, input).await?))
}

#[derive(Default, serde::Deserialize)]
struct FindIn {
    value: String,
}

/// tollgate's own: which key a value belongs to (POST, so that the value stays out of URLs and logs).
async fn find_key(State(admin): Shared, body: Bytes) -> Answer {
    let input: FindIn = json(&body)?;
    Ok(reply(StatusCode::OK, &admin.find_key(&input.value).await?))
}

/// Liveness and the shared store's state: 200 while the gateway serves, 503 when it refuses keyed
/// requests because Redis is down and `onStoreFailure: deny`.
async fn health(State(admin): Shared) -> Response {
    let (status, body) = admin.health();
    reply(status, &body)
}

/// The data plane's metrics, in the format the scraper's `Accept` asks for.
async fn metrics(State(admin): Shared, headers: HeaderMap) -> Response {
    let accept = headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let format = Exposition::negotiate(accept);
    let mut resp = (StatusCode::OK, format.write(admin.metrics_text())).into_response();
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static(format.content_type()),
    );
    resp
}

async fn unknown_operation() -> Response {
    let mut resp = (
        StatusCode::NOT_FOUND,
        r#"{"message":"Unknown operation","__type":"UnknownOperationException"}"#,
    )
        .into_response();
    resp.headers_mut().insert(
        "x-amzn-errortype",
        http::HeaderValue::from_static("UnknownOperationException"),
    );
    resp.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    resp
}

/// Query parameters, decoded, in order (a name may come more than once).
fn query_pairs(raw: Option<&str>) -> impl Iterator<Item = (String, String)> + '_ {
    raw.unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let decode = |s: &str| {
                String::from_utf8_lossy(&sigv4::percent_decode(&s.replace('+', " "))).into_owned()
            };
            (decode(k), decode(v))
        })
}

/// Query parameters, decoded; the last of a repeated name.
fn query(raw: Option<String>) -> BTreeMap<String, String> {
    query_pairs(raw.as_deref()).collect()
}

/// Every value of the query parameter `name`.
fn query_all(raw: Option<&str>, name: &str) -> Vec<String> {
    query_pairs(raw)
        .filter(|(k, _)| k == name)
        .map(|(_, v)| v)
        .collect()
}

/// Whether a `POST /apikeys` with query `q` is ImportApiKeys (`mode=import`).
fn is_import(q: &BTreeMap<String, String>) -> bool {
    q.get("mode").map(String::as_str) == Some("import")
}

fn flag(q: &BTreeMap<String, String>, name: &str) -> bool {
    q.get(name).is_some_and(|v| v.eq_ignore_ascii_case("true"))
}

fn paging(q: &BTreeMap<String, String>) -> Answer<Paging> {
    let limit = match q.get("limit") {
        None => None,
        Some(v) => Some(
            v.parse::<i64>()
                .map_err(|_| AdminError::BadRequest(format!("Invalid limit {v:?}")))?,
        ),
    };
    Ok(Paging {
        limit,
        position: q.get("position").cloned(),
    })
}

/// A JSON body; an empty body is the type's default (every member absent).
fn json<T: DeserializeOwned + Default>(body: &Bytes) -> Answer<T> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body)
        .map_err(|e| AdminError::BadRequest(format!("Invalid JSON body: {e}")))
}

fn accepted() -> Response {
    StatusCode::ACCEPTED.into_response()
}

async fn create_key(State(admin): Shared, RawQuery(q): RawQuery, body: Bytes) -> Answer {
    let q = query(q);
    if is_import(&q) {
        if q.get("format").map(String::as_str) != Some("csv") {
            return Err(AdminError::BadRequest(
                "Invalid format specified: only csv is supported".into(),
            ));
        }
        let out = admin.import_keys(&body, flag(&q, "failonwarnings")).await?;
        return Ok(reply(StatusCode::CREATED, &out));
    }
    let out = admin.create_key(json::<CreateApiKeyIn>(&body)?).await?;
    Ok(reply(StatusCode::CREATED, &out))
}

async fn list_keys(State(admin): Shared, RawQuery(q): RawQuery) -> Answer {
    let q = query(q);
    let page = admin
        .list_keys(
            q.get("name").cloned().map(NameQuery::Prefix),
            q.get("customerId").cloned(),
            flag(&q, "includeValues"),
            paging(&q)?,
        )
        .await?;
    Ok(reply(StatusCode::OK, &page))
}

async fn get_key(State(admin): Shared, Path(id): Path<String>, RawQuery(q): RawQuery) -> Answer {
    let q = query(q);
    Ok(reply(
        StatusCode::OK,
        &admin.get_key(&id, flag(&q, "includeValue")).await?,
    ))
}

async fn update_key(State(admin): Shared, Path(id): Path<String>, body: Bytes) -> Answer {
    let patch: PatchIn = json(&body)?;
    Ok(reply(
        StatusCode::OK,
        &admin.update_key(&id, patch.patch_operations).await?,
    ))
}

async fn delete_key(State(admin): Shared, Path(id): Path<String>) -> Answer {
    admin.delete_key(&id).await?;
    Ok(accepted())
}

async fn create_plan(State(admin): Shared, body: Bytes) -> Answer {
    let out = admin.create_plan(json::<CreateUsagePlanIn>(&body)?).await?;
    Ok(reply(StatusCode::CREATED, &out))
}

async fn list_plans(State(admin): Shared, RawQuery(q): RawQuery) -> Answer {
    let q = query(q);
    Ok(reply(
        StatusCode::OK,
        &admin
            .list_plans(q.get("keyId").map(String::as_str), &paging(&q)?)
            .await?,
    ))
}

async fn get_plan(State(admin): Shared, Path(id): Path<String>) -> Answer {
    Ok(reply(StatusCode::OK, &admin.get_plan(&id).await?))
}

async fn update_plan(State(admin): Shared, Path(id): Path<String>, body: Bytes) -> Answer {
    let patch: PatchIn = json(&body)?;
    Ok(reply(
        StatusCode::OK,
        &admin.update_plan(&id, patch.patch_operations).await?,
    ))
}

async fn delete_plan(State(admin): Shared, Path(id): Path<String>) -> Answer {
    admin.delete_plan(&id).await?;
    Ok(accepted())
}

async fn create_plan_key(State(admin): Shared, Path(id): Path<String>, body: Bytes) -> Answer {
    let input: CreateUsagePlanKeyIn = json(&body)?;
    let out = admin
        .create_plan_key(&id, input.key_id, input.key_type)
        .await?;
    Ok(reply(StatusCode::CREATED, &out))
}

async fn list_plan_keys(
    State(admin): Shared,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Answer {
    let q = query(q);
    Ok(reply(
        StatusCode::OK,
        &admin
            .list_plan_keys(&id, q.get("name").cloned(), paging(&q)?)
            .await?,
    ))
}

async fn get_plan_key(State(admin): Shared, Path((id, key)): Path<(String, String)>) -> Answer {
    Ok(reply(StatusCode::OK, &admin.get_plan_key(&id, &key).await?))
}

async fn delete_plan_key(State(admin): Shared, Path((id, key)): Path<(String, String)>) -> Answer {
    admin.delete_plan_key(&id, &key).await?;
    Ok(accepted())
}

async fn get_usage(State(admin): Shared, Path(id): Path<String>, RawQuery(q): RawQuery) -> Answer {
    let q = query(q);
    let arg = |name: &str| q.get(name).map(String::as_str);
    let (key, start, end) = (arg("keyId"), arg("startDate"), arg("endDate"));
    let out = admin.usage(&id, key, start, end, &paging(&q)?).await?;
    Ok(reply(StatusCode::OK, &out))
}

/// tollgate's own: GetUsage's query, each day with the requests refused.
async fn get_usage_detail(
    State(admin): Shared,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
) -> Answer {
    let q = query(q);
    let arg = |name: &str| q.get(name).map(String::as_str);
    let (key, start, end) = (arg("keyId"), arg("startDate"), arg("endDate"));
    let out = admin
        .usage_detail(&id, key, start, end, &paging(&q)?)
        .await?;
    Ok(reply(StatusCode::OK, &out))
}

async fn get_customer_usage(
    State(admin): Shared,
    Path((id, customer)): Path<(String, String)>,
    RawQuery(q): RawQuery,
) -> Answer {
    let q = query(q);
    let arg = |name: &str| q.get(name).map(String::as_str);
    let out = admin
        .customer_usage(&id, &customer, arg("startDate"), arg("endDate"))
        .await?;
    Ok(reply(StatusCode::OK, &out))
}

async fn update_usage(
    State(admin): Shared,
    Path((id, key)): Path<(String, String)>,
    body: Bytes,
) -> Answer {
    let patch: PatchIn = json(&body)?;
    Ok(reply(
        StatusCode::OK,
        &admin
            .update_usage(&id, &key, patch.patch_operations)
            .await?,
    ))
}
