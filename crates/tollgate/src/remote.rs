//! A client for the admin API, signing with the same SigV4 code the server verifies with.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context as _, anyhow, bail};
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tollgate_admin::sigv4::{self, Credentials};
use tollgate_gateway::tls::{UpstreamTlsFiles, client_config};

use crate::config::admin_credentials;

/// Where the admin API is and how to sign for it. Requests are signed with
/// TOLLGATE_ADMIN_ACCESS_KEY_ID and TOLLGATE_ADMIN_SECRET_ACCESS_KEY (unsigned without them, which
/// an admin API on loopback without credentials takes).
#[derive(Debug, clap::Args)]
#[command(after_help = "Credentials come from the environment:\n  \
    export TOLLGATE_ADMIN_ACCESS_KEY_ID=AKIDEXAMPLE TOLLGATE_ADMIN_SECRET_ACCESS_KEY=…\n  \
    tollgate keys list --endpoint https://gateway.example:8081 --ca-bundle ca.pem")]
pub struct EndpointArgs {
    /// The admin API, http:// or https://, e.g. http://127.0.0.1:8081 (env TOLLGATE_ENDPOINT).
    #[arg(long, env = "TOLLGATE_ENDPOINT")]
    pub endpoint: String,
    /// Region to sign for (any region is accepted by tollgate).
    #[arg(long, default_value = "us-east-1")]
    pub region: String,
    /// For an https:// endpoint: the PEM file of the CAs its certificate chains to, instead of the
    /// system's roots (as the AWS CLI's --ca-bundle; env TOLLGATE_CA_BUNDLE).
    #[arg(long, env = "TOLLGATE_CA_BUNDLE")]
    pub ca_bundle: Option<PathBuf>,
}

/// A signed-request client for one endpoint: a connection per request (a CLI makes few).
pub struct Remote {
    endpoint: Uri,
    credentials: Option<Credentials>,
    region: String,
    /// For an https:// endpoint: whom it trusts.
    tls: Option<Arc<rustls::ClientConfig>>,
    runtime: tokio::runtime::Runtime,
}

impl Remote {
    /// A client for `args`, with credentials from the environment (unsigned when there are none).
    pub fn new(args: &EndpointArgs) -> anyhow::Result<Self> {
        let endpoint: Uri = args
            .endpoint
            .parse()
            .with_context(|| format!("--endpoint {:?} is not a URL", args.endpoint))?;
        let https = match endpoint.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!("--endpoint must be an http:// or https:// URL, like http://127.0.0.1:8081"),
        };
        if endpoint.host().is_none() {
            bail!("--endpoint {:?} names no host", args.endpoint);
        }
        let tls = if https {
            let files = UpstreamTlsFiles {
                ca: args.ca_bundle.clone(),
                client: None,
                insecure_skip_verify: false,
            };
            let mut config = client_config(&files).map_err(|e| anyhow!("--ca-bundle: {e}"))?;
            config.alpn_protocols = vec![b"http/1.1".to_vec()];
            Some(Arc::new(config))
        } else {
            None
        };
        let credentials = admin_credentials(None, None).map_err(|why| anyhow!(why))?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        Ok(Self {
            endpoint,
            credentials,
            region: args.region.clone(),
            tls,
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
        let scheme = self.endpoint.scheme_str().unwrap_or("http");
        let uri = format!("{scheme}://{authority}{path_and_query}");
        let mut req = Request::builder()
            .method(method)
            .uri(path_and_query)
            .body(Full::new(Bytes::from(body.to_string())))?;
        *req.headers_mut() = headers;
        let (status, bytes) = self.runtime.block_on(async {
            let exchange = async {
                let resp = self.send(req).await?;
                let status = resp.status();
                let bytes = resp.into_body().collect().await?.to_bytes();
                anyhow::Ok((status, bytes))
            };
            tokio::time::timeout(Duration::from_secs(30), exchange)
                .await
                .map_err(|_| anyhow!("{uri}: no answer within 30 s"))?
                .with_context(|| format!("cannot reach the admin API at {uri}"))
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
            // Unsigned, and the admin API wants a signature: say what to set.
            let hint = if self.credentials.is_none() && status == http::StatusCode::FORBIDDEN {
                "\nset TOLLGATE_ADMIN_ACCESS_KEY_ID and TOLLGATE_ADMIN_SECRET_ACCESS_KEY to sign requests"
            } else {
                ""
            };
            bail!("{kind}: {message} (HTTP {}){hint}", status.as_u16());
        }
        Ok(json)
    }

    /// Sends `req` on a new connection to the endpoint, over TLS for https://.
    async fn send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> anyhow::Result<http::Response<hyper::body::Incoming>> {
        let host = self.endpoint.host().unwrap_or_default();
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let port = self
            .endpoint
            .port_u16()
            .unwrap_or(if self.tls.is_some() { 443 } else { 80 });
        let tcp = tokio::net::TcpStream::connect((host, port)).await?;
        match &self.tls {
            None => request_over(tcp, req).await,
            Some(config) => {
                let name = rustls::pki_types::ServerName::try_from(host.to_owned())?;
                let tls = tokio_rustls::TlsConnector::from(config.clone())
                    .connect(name, tcp)
                    .await?;
                request_over(tls, req).await
            }
        }
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

/// One HTTP/1.1 exchange over `io`.
async fn request_over<I>(
    io: I,
    req: Request<Full<Bytes>>,
) -> anyhow::Result<http::Response<hyper::body::Incoming>>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(sender.send_request(req).await?)
}
