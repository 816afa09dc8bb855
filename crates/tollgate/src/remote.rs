//! A client for the admin API, signing with the same SigV4 code the server verifies with.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde_json::Value;
use tollgate_admin::sigv4::{self, Credentials};

use crate::config::admin_credentials;

/// Where the admin API is and how to sign for it.
#[derive(Debug, clap::Args)]
pub struct EndpointArgs {
    /// The admin API, e.g. http://127.0.0.1:8081 (env TOLLGATE_ENDPOINT).
    #[arg(long, env = "TOLLGATE_ENDPOINT")]
    pub endpoint: String,
    /// Region to sign for (any region is accepted by tollgate).
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
}

/// A signed-request client for one endpoint.
pub struct Remote {
    endpoint: Uri,
    credentials: Option<Credentials>,
    region: String,
    http: Client<HttpConnector, Full<Bytes>>,
    runtime: tokio::runtime::Runtime,
}

impl Remote {
    /// A client for `args`, with credentials from the environment (unsigned when there are none).
    pub fn new(args: &EndpointArgs) -> anyhow::Result<Self> {
        let endpoint: Uri = args
            .endpoint
            .parse()
            .with_context(|| format!("--endpoint {:?} is not a URL", args.endpoint))?;
        if endpoint.scheme_str() != Some("http") || endpoint.authority().is_none() {
            bail!("--endpoint must be an http:// URL with a host, like http://127.0.0.1:8081");
        }
        let credentials = admin_credentials(None, None).map_err(|why| anyhow!(why))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let http = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
        Ok(Self {
            endpoint,
            credentials,
            region: args.region.clone(),
            http,
            runtime,
        })
    }

    /// Sends one request; returns the JSON body of a 2xx answer (Null when empty) or the AWS error.
    pub fn call(
        &self,
        method: Method,
        path_and_query: &str,
        body: &str,
        content_type: &str,
    ) -> anyhow::Result<Value> {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let authority = self
            .endpoint
            .authority()
            .map(|a| a.as_str())
            .unwrap_or_default();
        let mut headers = HeaderMap::new();
        headers.insert(http::header::HOST, HeaderValue::from_str(authority)?);
        // Every write says what it is: an admin listener without credentials takes no other.
        if !body.is_empty() || method != Method::GET {
            headers.insert(
                http::header::CONTENT_TYPE,
                HeaderValue::from_str(content_type)?,
            );
        }
        if let Some(creds) = &self.credentials {
            let now = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64);
            sigv4::sign(
                &method,
                path,
                query,
                &mut headers,
                body.as_bytes(),
                creds,
                &self.region,
                now,
            );
        }
        let uri = format!("http://{authority}{path_and_query}");
        let mut req = Request::builder()
            .method(method)
            .uri(&uri)
            .body(Full::new(Bytes::from(body.to_string())))?;
        *req.headers_mut() = headers;
        let (status, bytes) = self.runtime.block_on(async {
            let resp = tokio::time::timeout(Duration::from_secs(30), self.http.request(req))
                .await
                .map_err(|_| anyhow!("{uri}: no answer within 30 s"))?
                .with_context(|| format!("cannot reach the admin API at {uri}"))?;
            let status = resp.status();
            let bytes = resp.into_body().collect().await?.to_bytes();
            anyhow::Ok((status, bytes))
        })?;
        let json: Value = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes).unwrap_or(Value::Null)
        };
        if !status.is_success() {
            let kind = json["__type"].as_str().unwrap_or("Error");
            let message = json["message"]
                .as_str()
                .unwrap_or_else(|| status.canonical_reason().unwrap_or(""));
            bail!("{kind}: {message} (HTTP {})", status.as_u16());
        }
        Ok(json)
    }

    /// A JSON request; a body serialising to `null` (such as `()`) sends none.
    pub fn json(
        &self,
        method: Method,
        path: &str,
        body: &impl serde::Serialize,
    ) -> anyhow::Result<Value> {
        let body = serde_json::to_value(body)?;
        let text = if body.is_null() {
            String::new()
        } else {
            body.to_string()
        };
        self.call(method, path, &text, "application/json")
    }
}

/// Percent-encodes a query value or path segment as SigV4 does, so what is signed is what is sent.
pub fn encode(value: &str) -> String {
    percent_encoding::utf8_percent_encode(value, sigv4::COMPONENT).to_string()
}
