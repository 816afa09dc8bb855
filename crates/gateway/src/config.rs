//! The data plane's runtime configuration: validated, with parsed types, built by the binary from the
//! config file (or a serverless.yml).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use tollgate_core::rules::ApiOutline;
use tollgate_core::{IpNetworks, ThrottleSettings};

use crate::access_log::AccessLogConfig;
use crate::rewrite::KeptFields;
use crate::tls::ClientTls;

/// AWS's default integration timeout.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(29);
/// AWS's request payload limit: 10 MB.
pub const DEFAULT_MAX_REQUEST_BODY: u64 = 10 * 1024 * 1024;

/// Everything the data plane needs besides the store's records.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The account-level throttle shared by every request, if any.
    pub account_throttle: Option<ThrottleSettings>,
    /// Whether metered responses carry `RateLimit-Policy` / `RateLimit` headers.
    pub rate_limit_headers: bool,
    /// The access log, when on: every request's line, in its format.
    pub access_log: Option<AccessLogConfig>,
    /// The largest request body accepted, in bytes (413 beyond it).
    pub max_request_body: u64,
    /// The client fields that could steer a backend and are forwarded anyway.
    pub kept_fields: KeptFields,
    /// The APIs served.
    pub apis: Vec<Api>,
    /// The decision endpoint for forward-auth, when it is on.
    pub verify: Option<crate::verify::VerifySettings>,
    /// The proxies whose `X-Forwarded-For` names the client, for keys with a source-IP allowlist.
    pub trusted_proxies: Option<IpNetworks>,
    /// Where events are delivered.
    pub webhooks: Vec<crate::webhooks::Webhook>,
    /// What fires events.
    pub alerts: Vec<crate::alerts::Alert>,
    /// Where usage is exported.
    pub exporters: Vec<crate::exporters::Exporter>,
}

/// One API (AWS RestApi): a set of routes deployed to one or more stages.
#[derive(Debug, Clone)]
pub struct Api {
    /// The API id usage plans refer to.
    pub id: String,
    /// Its stages.
    pub stages: Vec<Stage>,
    /// Its routes (AWS resources and methods).
    pub routes: Vec<Route>,
    /// Whether paths may hold encoded slashes (`%2F`, `%5C`), forwarded as they are.
    pub allow_encoded_slashes: bool,
}

/// A deployment of an API, reachable under `base_path`.
#[derive(Debug, Clone)]
pub struct Stage {
    /// The stage name usage plans refer to.
    pub name: String,
    /// URL prefix the stage is served under: `/{name}` by default, `/` for none.
    pub base_path: String,
    /// Default per-method throttle shared by all callers (AWS `*/*` method settings).
    pub throttle: Option<ThrottleSettings>,
    /// Per-method throttles keyed `"/path/METHOD"`, replacing `throttle` for that method.
    pub method_throttle: BTreeMap<String, ThrottleSettings>,
}

/// The HTTP method a route answers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RouteMethod {
    /// Every method (AWS `ANY`).
    Any,
    /// One method.
    Only(Method),
}

impl RouteMethod {
    /// The AWS spelling: `GET`, `ANY`, ….
    pub fn as_str(&self) -> &str {
        match self {
            RouteMethod::Any => "ANY",
            RouteMethod::Only(m) => m.as_str(),
        }
    }
}

/// One route: a path template and method bound to an integration.
#[derive(Debug, Clone)]
pub struct Route {
    /// Path template, e.g. `/registrations/{id}/warranty` or `/files/{proxy+}`.
    pub path: String,
    /// The method.
    pub method: RouteMethod,
    /// Whether callers must present an API key in a plan for this stage.
    pub api_key_required: bool,
    /// Where matched requests go.
    pub integration: Integration,
    /// Cross-origin settings: the gateway answers the preflight and labels responses.
    pub cors: Option<Arc<Cors>>,
    /// Whether `GET` and `HEAD` requests may carry a body.
    pub allow_get_body: bool,
    /// With a key required: the JWT authorizer identifying the caller instead of `x-api-key`.
    pub authorizer: Option<Arc<crate::jwt::Authorizer>>,
    /// What one admitted request spends of its key's quota and usage (1 unless the route says; 0
    /// is free). Throttles count requests whatever the cost.
    pub cost: u32,
}

/// CORS for a route, as Serverless's `cors:` configures it on AWS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cors {
    /// Allowed origins; `*` allows any.
    pub origins: Vec<String>,
    /// `Access-Control-Allow-Headers`.
    pub headers: Vec<String>,
    /// `Access-Control-Allow-Credentials: true` when set.
    pub allow_credentials: bool,
    /// `Access-Control-Max-Age`, seconds.
    pub max_age: Option<u32>,
    /// `Cache-Control` on preflight answers.
    pub cache_control: Option<String>,
}

impl Cors {
    /// Serverless's `cors: true`.
    pub fn permissive() -> Self {
        Self {
            origins: vec!["*".into()],
            headers: [
                "Content-Type",
                "X-Amz-Date",
                "Authorization",
                "X-Api-Key",
                "X-Amz-Security-Token",
                "X-Amz-User-Agent",
                "X-Amzn-Trace-Id",
            ]
            .map(String::from)
            .to_vec(),
            allow_credentials: false,
            max_age: None,
            cache_control: None,
        }
    }

    /// The `Access-Control-Allow-Origin` to send for a request from `origin`, if it is allowed.
    pub fn allow_origin<'a>(&'a self, origin: Option<&'a str>) -> Option<&'a str> {
        if self.origins.iter().any(|o| o == "*") {
            // With credentials a wildcard is not allowed by browsers: echo the origin instead.
            return Some(match (self.allow_credentials, origin) {
                (true, Some(o)) => o,
                _ => "*",
            });
        }
        origin.filter(|o| self.origins.iter().any(|allowed| allowed == o))
    }
}

/// Adds an `OPTIONS` route answering the CORS preflight to every resource that has a CORS-enabled
/// route and no `OPTIONS` route of its own, as API Gateway does for Serverless's `cors: true`.
pub fn add_preflight_routes(api: &mut Api) {
    let mut added = Vec::new();
    for route in &api.routes {
        let Some(cors) = &route.cors else { continue };
        let has_options = api
            .routes
            .iter()
            .chain(&added)
            .any(|r| r.path == route.path && r.method == RouteMethod::Only(Method::OPTIONS));
        if has_options {
            continue;
        }
        let mut methods: Vec<String> = api
            .routes
            .iter()
            .filter(|r| r.path == route.path && r.cors.is_some())
            .map(|r| r.method.as_str().to_string())
            .collect();
        if methods.iter().any(|m| m == "ANY") {
            methods = ["DELETE", "GET", "HEAD", "PATCH", "POST", "PUT"]
                .map(String::from)
                .to_vec();
        }
        methods.insert(0, "OPTIONS".into());
        added.push(Route {
            path: route.path.clone(),
            method: RouteMethod::Only(Method::OPTIONS),
            api_key_required: false,
            integration: Integration::Preflight {
                methods: methods.join(","),
            },
            cors: Some(cors.clone()),
            allow_get_body: false,
            authorizer: None,
            cost: 1,
        });
    }
    api.routes.extend(added);
}

impl Route {
    /// The key usage plans and stages use for per-method throttles: `"/path/METHOD"`.
    pub fn throttle_key(&self) -> String {
        format!("{}/{}", self.path, self.method.as_str())
    }
}

/// What answers a matched request.
#[derive(Debug, Clone)]
pub enum Integration {
    /// Proxy to an HTTP upstream (AWS HTTP_PROXY).
    Http {
        /// Scheme, authority and optional base path; the request path after the stage is appended.
        url: Uri,
        /// How long to wait for the upstream's response head before answering 504.
        timeout: Duration,
        /// For an `https` URL: how TLS to it is set up.
        tls: Option<UpstreamTls>,
    },
    /// A fixed response (AWS MOCK).
    Mock {
        /// Status code.
        status: StatusCode,
        /// Body.
        body: Bytes,
        /// Extra headers.
        headers: Vec<(HeaderName, HeaderValue)>,
    },
    /// The CORS preflight answer for a resource (the route's `cors` holds the settings).
    Preflight {
        /// `Access-Control-Allow-Methods`.
        methods: String,
    },
}

/// TLS to an `https` upstream: the client configuration, shared by the routes that use the same
/// one, and the name the upstream's certificate must hold (the URL's host, also sent as SNI).
#[derive(Debug, Clone)]
pub struct UpstreamTls {
    /// The client configuration (opened before the config is served).
    pub client: Arc<ClientTls>,
    /// The URL's host.
    pub server_name: rustls::pki_types::ServerName<'static>,
}

impl UpstreamTls {
    /// What tells connections made with different configurations apart in the idle pool.
    pub fn pool_id(&self) -> usize {
        Arc::as_ptr(&self.client) as usize
    }
}

impl GatewayConfig {
    /// What usage plans may name of the configured APIs: each API's stages and per-method throttle
    /// keys.
    pub fn outline(&self) -> Vec<ApiOutline> {
        self.apis.iter().map(Api::outline).collect()
    }
}

impl Api {
    /// What usage plans may name of this API: its stages and per-method throttle keys.
    pub fn outline(&self) -> ApiOutline {
        ApiOutline {
            id: self.id.clone(),
            stages: self.stages.iter().map(|s| s.name.clone()).collect(),
            methods: self.routes.iter().map(Route::throttle_key).collect(),
        }
    }
}

/// The data plane's HTTP/2 settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Http2Settings {
    /// The most streams a client may have open on one connection (SETTINGS_MAX_CONCURRENT_STREAMS).
    pub max_concurrent_streams: u32,
}

impl Default for Http2Settings {
    fn default() -> Self {
        // RFC 9113 recommends no fewer than 100 (nginx: 128); a bound keeps one client's fan-out
        // within reach of the connection limit.
        Self {
            max_concurrent_streams: 100,
        }
    }
}
