//! APIs, their stages, authorizers and routes.

use std::sync::Arc;
use tollgate_core::quota::MAX_REMAINING;

use http::{HeaderName, HeaderValue, Method, StatusCode, Uri};
use serde_saphyr::{Location, Spanned};
use tollgate_gateway::config::{
    Api, DEFAULT_UPSTREAM_TIMEOUT, Integration, Route, RouteMethod, Stage, add_preflight_routes,
};
use tollgate_gateway::jwt::{Authorizer, AuthorizerSettings, UsageIdentifier};
use tollgate_gateway::route::{Router, validate_template};

use super::{Ctx, parse_duration};
use crate::config::raw::{RawApi, RawCors, RawMock, RawRoute, RawUpstreamTls};
use crate::config::{ConfigError, ToOpen};

/// `apis:`: each valid, with a unique id, and no two stages on one base path.
pub(super) fn validate_apis(
    cx: &Ctx<'_>,
    raw: &[Spanned<RawApi>],
) -> Result<Vec<Api>, ConfigError> {
    let mut apis = Vec::with_capacity(raw.len());
    for (i, api) in raw.iter().enumerate() {
        let field = format!("apis[{i}]");
        if apis.iter().any(|a: &Api| a.id == api.value.id) {
            return cx.err(
                &api.referenced,
                format!("{field}.id"),
                format!("duplicate API id {:?}", api.value.id),
            );
        }
        apis.push(validate_api(cx, &field, &api.value, &api.referenced)?);
    }
    // Routing conflicts across APIs (two stages on one base path).
    if let Err(e) = Router::new(&apis) {
        let at = raw.first().map_or(Location::UNKNOWN, |a| a.referenced);
        return cx.err(&at, "apis", e.to_string());
    }
    Ok(apis)
}

pub(super) fn validate_api(
    cx: &Ctx<'_>,
    field: &str,
    api: &RawApi,
    at: &Location,
) -> Result<Api, ConfigError> {
    if api.id.is_empty() {
        return cx.err(at, format!("{field}.id"), "must not be empty");
    }
    if api.stages.is_empty() {
        return cx.err(
            at,
            format!("{field}.stages"),
            "an API needs at least one stage",
        );
    }
    let by_authorizer = match api.api_key_source.as_deref() {
        None => false,
        Some(written) => {
            let sources = [("HEADER", false), ("AUTHORIZER", true)];
            cx.one_of(&sources, written, at, format!("{field}.apiKeySource"))?
        }
    };
    let authorizers = validate_authorizers(cx, field, api)?;
    let mut routes = Vec::with_capacity(api.routes.len());
    for (i, route) in api.routes.iter().enumerate() {
        let rf = format!("{field}.routes[{i}]");
        let mut validated = validate_route(cx, &rf, &route.value, &route.referenced)?;
        let named = route.value.authorizer.as_deref();
        let keyed = (by_authorizer, validated.api_key_required);
        validated.authorizer =
            route_authorizer(cx, &rf, &route.referenced, named, keyed, &authorizers)?;
        routes.push(validated);
    }
    let throttle_keys: Vec<String> = routes.iter().map(Route::throttle_key).collect();

    let stages = validate_stages(cx, field, api, &throttle_keys)?;
    let mut api = Api {
        id: api.id.clone(),
        stages,
        routes,
        allow_encoded_slashes: api.allow_encoded_slashes,
    };
    add_preflight_routes(&mut api);
    if let Err(e) = Router::new(std::slice::from_ref(&api)) {
        return cx.err(at, format!("{field}.routes"), e.to_string());
    }
    Ok(api)
}

/// The API's `authorizers`, each to have its keys read once the whole file is valid.
fn validate_authorizers(
    cx: &Ctx<'_>,
    field: &str,
    api: &RawApi,
) -> Result<Vec<Arc<Authorizer>>, ConfigError> {
    let mut authorizers: Vec<Arc<Authorizer>> = Vec::new();
    for (i, a) in api.authorizers.iter().enumerate() {
        let (af, at) = (format!("{field}.authorizers[{i}]"), &a.referenced);
        let a = &a.value;
        if authorizers.iter().any(|o| o.settings.name == a.name) {
            return cx.err(
                at,
                format!("{af}.name"),
                format!("duplicate authorizer {:?}", a.name),
            );
        }
        let identifier = match a.usage_identifier_is.as_deref() {
            None => UsageIdentifier::Name,
            Some(written) => cx.one_of(
                &UsageIdentifier::NAMES,
                written,
                at,
                format!("{af}.usageIdentifierIs"),
            )?,
        };
        // A JWKS URL is fetched trusting what https upstreams trust.
        let default_tls = RawUpstreamTls {
            ca: None,
            cert: None,
            key: None,
            insecure_skip_verify: false,
        };
        let tls = match cx.upstream_tls {
            Some(global) => cx.client_tls(&global.value, &global.referenced, "upstreamTls")?,
            None => cx.client_tls(&default_tls, at, &format!("{af}.jwks"))?,
        };
        if a.issuer.is_none() && a.audience.is_none() {
            cx.warn(at, &af, "neither issuer nor audience is set: any token the JWKS's keys signed, for any application of that IdP, is accepted");
        }
        let settings = AuthorizerSettings {
            name: a.name.clone(),
            // A file is read from the config's directory; a URL is what it says.
            jwks: if a.jwks.starts_with("https://") {
                a.jwks.clone()
            } else {
                cx.path(&a.jwks).to_string_lossy().into_owned()
            },
            issuer: a.issuer.clone(),
            audience: a.audience.clone(),
            claim: a
                .usage_identifier_claim
                .clone()
                .unwrap_or_else(|| "sub".into()),
            identifier,
        };
        // Its keys are read once the whole file is valid ([`Config::open`]): a URL is a fetch.
        match Authorizer::new(settings, tls) {
            Ok(authorizer) => {
                let authorizer = Arc::new(authorizer);
                cx.jwks.borrow_mut().push(ToOpen {
                    what: authorizer.clone(),
                    written: cx.error(at, format!("{af}.jwks")),
                });
                authorizers.push(authorizer);
            }
            Err(e) => return cx.err(at, format!("{af}.jwks"), e),
        }
    }
    Ok(authorizers)
}

/// The authorizer that identifies a route's callers: the one it names, or the API's only one, when
/// the API takes keys from an authorizer (`keyed.0`) and the route requires one (`keyed.1`).
fn route_authorizer(
    cx: &Ctx<'_>,
    rf: &str,
    at: &Location,
    named: Option<&str>,
    keyed: (bool, bool),
    authorizers: &[Arc<Authorizer>],
) -> Result<Option<Arc<Authorizer>>, ConfigError> {
    Ok(match (named, keyed.0, keyed.1) {
        (None, false, _) | (None, true, false) => None,
        (Some(_), false, _) => {
            return cx.err(
                at,
                format!("{rf}.authorizer"),
                "an authorizer identifies the caller only with the API's apiKeySource: AUTHORIZER",
            );
        }
        (Some(_), true, false) => {
            return cx.err(
                at,
                format!("{rf}.authorizer"),
                "an authorizer names the caller's API key: set apiKeyRequired: true",
            );
        }
        (Some(name), true, true) => match authorizers.iter().find(|a| a.settings.name == name) {
            Some(a) => Some(a.clone()),
            None => {
                return cx.err(
                    at,
                    format!("{rf}.authorizer"),
                    format!("no authorizer named {name:?} in this API's authorizers"),
                );
            }
        },
        (None, true, true) => match authorizers {
            [only] => Some(only.clone()),
            _ => {
                return cx.err(at, format!("{rf}.authorizer"), "with apiKeySource: AUTHORIZER, a keyed route names one of the API's authorizers");
            }
        },
    })
}

/// The API's `stages`: unique names, normalised base paths, their throttles.
fn validate_stages(
    cx: &Ctx<'_>,
    field: &str,
    api: &RawApi,
    throttle_keys: &[String],
) -> Result<Vec<Stage>, ConfigError> {
    let mut stages = Vec::with_capacity(api.stages.len());
    for (i, stage) in api.stages.iter().enumerate() {
        let sf = format!("{field}.stages[{i}]");
        let (s, at) = (&stage.value, &stage.referenced);
        if s.name.is_empty() || s.name.contains('/') {
            return cx.err(
                at,
                format!("{sf}.name"),
                "a stage name must be non-empty and contain no /",
            );
        }
        if stages.iter().any(|x: &Stage| x.name == s.name) {
            return cx.err(
                at,
                format!("{sf}.name"),
                format!("duplicate stage {:?}", s.name),
            );
        }
        let base_path = s
            .base_path
            .clone()
            .unwrap_or_else(|| format!("/{}", s.name));
        if !base_path.starts_with('/') || base_path.contains("//") {
            return cx.err(
                at,
                format!("{sf}.basePath"),
                "must start with / (use / for no prefix)",
            );
        }
        if !is_canonical_path(&base_path) {
            return cx.err(
                at,
                format!("{sf}.basePath"),
                "must be a normalised path: no dot segments, percent-escapes or characters to escape",
            );
        }
        let throttle = s
            .throttle
            .as_ref()
            .map(|t| cx.throttle(t, at, &format!("{sf}.throttle")))
            .transpose()?;
        let method_throttle = cx.method_throttles(
            &s.method_throttle,
            throttle_keys,
            at,
            &format!("{sf}.methodThrottle"),
        )?;
        stages.push(Stage {
            name: s.name.clone(),
            base_path,
            throttle,
            method_throttle,
        });
    }
    Ok(stages)
}

pub(super) fn validate_route(
    cx: &Ctx<'_>,
    field: &str,
    r: &RawRoute,
    at: &Location,
) -> Result<Route, ConfigError> {
    if let Err(e) = validate_template(&r.path) {
        return cx.err(at, format!("{field}.path"), e.to_string());
    }
    let upper = r.method.to_ascii_uppercase();
    let method = match upper.as_str() {
        "ANY" | "*" => RouteMethod::Any,
        "GET" | "POST" | "PUT" | "PATCH" | "DELETE" | "HEAD" | "OPTIONS" => {
            match Method::from_bytes(upper.as_bytes()) {
                Ok(m) => RouteMethod::Only(m),
                Err(_) => return cx.err(at, format!("{field}.method"), "invalid method"),
            }
        }
        _ => {
            return cx.err(
                at,
                format!("{field}.method"),
                format!(
                    "{:?} is not one of GET, POST, PUT, PATCH, DELETE, HEAD, OPTIONS, ANY",
                    r.method
                ),
            );
        }
    };
    let integration = match (&r.upstream, &r.mock) {
        (Some(_), Some(_)) | (None, None) => {
            return cx.err(
                at,
                field,
                "a route needs exactly one of upstream (an http:// URL) or mock",
            );
        }
        (Some(url), None) => http_integration(cx, field, r, &url.0, at)?,
        (None, Some(mock)) => mock_integration(cx, field, r, mock, at)?,
    };
    let cost = match r.cost {
        None => 1,
        Some(cost) => {
            match u32::try_from(cost) {
                Ok(cost) if i64::from(cost) <= MAX_REMAINING => cost,
                _ => {
                    return cx.err(
                    at,
                    format!("{field}.cost"),
                    format!("{cost} is not a cost: give a whole number from 0 (free) to {MAX_REMAINING}"),
                );
                }
            }
        }
    };
    if r.cost.is_some() && !r.api_key_required {
        cx.warn(
            at,
            format!("{field}.cost"),
            "a route that needs no key spends no quota: its cost counts for nothing",
        );
    }
    Ok(Route {
        cors: r
            .cors
            .as_ref()
            .and_then(RawCors::settings)
            .map(std::sync::Arc::new),
        path: r.path.clone(),
        method,
        api_key_required: r.api_key_required,
        integration,
        allow_get_body: r.allow_get_body,
        authorizer: None,
        cost,
    })
}

/// A route's `upstream` (`url`), with its timeout and TLS settings.
fn http_integration(
    cx: &Ctx<'_>,
    field: &str,
    r: &RawRoute,
    url: &str,
    at: &Location,
) -> Result<Integration, ConfigError> {
    let uri: Uri = match url.parse() {
        Ok(u) => u,
        Err(e) => {
            return cx.err(
                at,
                format!("{field}.upstream"),
                format!("{:?} is not a URL: {e}", url),
            );
        }
    };
    let https = match uri.scheme_str() {
        Some("http") => false,
        Some("https") => true,
        _ => {
            return cx.err(
                at,
                format!("{field}.upstream"),
                format!("{:?} must be an http:// or https:// URL with a host", url),
            );
        }
    };
    if uri.authority().is_none() {
        return cx.err(
            at,
            format!("{field}.upstream"),
            format!("{:?} must be an http:// or https:// URL with a host", url),
        );
    }
    if uri.query().is_some() {
        return cx.err(
            at,
            format!("{field}.upstream"),
            "must not have a query string",
        );
    }
    // Requests are forwarded under this path as they were normalised: it must be normal too.
    if !is_canonical_path(uri.path()) {
        return cx.err(
            at,
            format!("{field}.upstream"),
            "its path must be normalised: no dot segments, empty segments or percent-escapes",
        );
    }
    let timeout = match &r.timeout {
        None => DEFAULT_UPSTREAM_TIMEOUT,
        Some(t) => match parse_duration(t) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                return cx.err(at, format!("{field}.timeout"), "must be more than zero");
            }
            Err(e) => return cx.err(at, format!("{field}.timeout"), e),
        },
    };
    let tls = match (https, &r.upstream_tls) {
        (false, None) => None,
        (false, Some(_)) => {
            return cx.err(
                at,
                format!("{field}.upstreamTls"),
                "only an https:// upstream takes upstreamTls",
            );
        }
        (true, own) => Some(cx.upstream_tls(&uri, own.as_ref(), at, field)?),
    };
    Ok(Integration::Http {
        url: uri,
        timeout,
        tls,
    })
}

/// A route's `mock`: its status, headers (a body gets a JSON `Content-Type` unless one is set) and
/// body.
fn mock_integration(
    cx: &Ctx<'_>,
    field: &str,
    r: &RawRoute,
    mock: &RawMock,
    at: &Location,
) -> Result<Integration, ConfigError> {
    if r.timeout.is_some() {
        return cx.err(
            at,
            format!("{field}.timeout"),
            "only upstream routes have a timeout",
        );
    }
    let Ok(status) = StatusCode::from_u16(mock.status_code) else {
        return cx.err(
            at,
            format!("{field}.mock.statusCode"),
            "must be an HTTP status code (100-999)",
        );
    };
    let mut headers = Vec::with_capacity(mock.headers.len() + 1);
    for (name, value) in &mock.headers {
        match (
            HeaderName::from_bytes(name.as_bytes()),
            HeaderValue::from_str(value),
        ) {
            (Ok(n), Ok(v)) => headers.push((n, v)),
            _ => {
                return cx.err(
                    at,
                    format!("{field}.mock.headers.{name}"),
                    "invalid header name or value",
                );
            }
        }
    }
    if !headers.iter().any(|(n, _)| n == http::header::CONTENT_TYPE) && !mock.body.is_empty() {
        headers.push((
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        ));
    }
    Ok(Integration::Mock {
        status,
        body: mock.body.clone().into(),
        headers,
    })
}

/// Whether `path` is one the data plane's normalisation leaves as it is.
pub(super) fn is_canonical_path(path: &str) -> bool {
    matches!(
        tollgate_gateway::path::normalize(path.as_bytes(), &mut Vec::new()),
        Ok(None)
    )
}
