//! The data plane's runtime configuration: validated, with parsed types, built by the binary from the
//! config file (or a serverless.yml).

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use tollgate_core::ThrottleSettings;

/// AWS's default integration timeout.
pub const DEFAULT_UPSTREAM_TIMEOUT: Duration = Duration::from_secs(29);

/// Everything the data plane needs besides the store's records.
#[derive(Debug, Clone)]
pub struct GatewayConfig {
    /// The account-level throttle shared by every request, if any.
    pub account_throttle: Option<ThrottleSettings>,
    /// Whether metered responses carry `RateLimit-Policy` / `RateLimit` headers.
    pub rate_limit_headers: bool,
    /// Whether every request is logged (JSON, target `tollgate::access`).
    pub access_log: bool,
    /// The APIs served.
    pub apis: Vec<Api>,
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
}
