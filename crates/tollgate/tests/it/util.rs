use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioIo};

pub const KEY: &str = "centralSystemKey0123456789abcdef";

/// A running `tollgate serve`; killed when dropped.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    /// The admin API's address, when the config has one.
    pub admin: Option<SocketAddr>,
    /// Everything the process printed on stdout before and after "listening".
    pub stdout: std::sync::Arc<std::sync::Mutex<String>>,
    pub stderr_path: PathBuf,
}

impl Gateway {
    /// Starts `tollgate serve --config <dir>/tollgate.yaml` and waits until it listens.
    pub fn start(dir: &Path, envs: &[(&str, &str)]) -> Gateway {
        let stderr_path = dir.join(format!(
            "stderr-{}.log",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos()
        ));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.arg("serve")
            .arg("--config")
            .arg(dir.join("tollgate.yaml"))
            .current_dir(dir);
        cmd.stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).unwrap());
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd.spawn().unwrap();
        let stdout = child.stdout.take().unwrap();
        let seen = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel();
        let (admin_tx, admin_rx) = mpsc::channel();
        let sink = seen.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(addr) = line.strip_prefix("tollgate: listening on http://") {
                    let _ = tx.send(addr.parse::<SocketAddr>().unwrap());
                }
                if let Some(addr) = line.strip_prefix("tollgate: admin API on http://") {
                    let _ = admin_tx.send(addr.parse::<SocketAddr>().unwrap());
                }
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        let addr = match rx.recv_timeout(Duration::from_secs(30)) {
            Ok(addr) => addr,
            Err(_) => {
                let _ = child.kill();
                panic!(
                    "gateway did not start: {}",
                    std::fs::read_to_string(&stderr_path).unwrap_or_default()
                );
            }
        };
        // The admin line, when there is one, comes before the data plane's.
        let admin = admin_rx.try_recv().ok();
        Gateway {
            child,
            addr,
            admin,
            stdout: seen,
            stderr_path,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        signal(&self.child, "TERM");
        let status = wait_timeout(&mut self.child, Duration::from_secs(30))
            .expect("gateway did not stop after SIGTERM");
        std::mem::forget(self);
        status
    }

    /// SIGKILL: no chance to flush.
    pub fn kill9(mut self) {
        signal(&self.child, "KILL");
        let _ = self.child.wait();
        std::mem::forget(self);
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(child.id().to_string())
        .status()
        .unwrap()
        .success();
    assert!(ok, "kill -{sig} failed");
}

pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    while std::time::Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// Writes `yaml` as `<dir>/tollgate.yaml`.
pub fn write_config(dir: &Path, yaml: &str) {
    std::fs::write(dir.join("tollgate.yaml"), yaml).unwrap();
}

/// A config with one API `warranty` (stage `prod`) proxying to `upstream`, plus `extra` YAML appended.
pub fn config(upstream: &str, extra: &str) -> String {
    format!(
        r#"listen: 127.0.0.1:0
store: {{ sqlite: ./tollgate.db, flushInterval: 200ms }}
rateLimitHeaders: true
apis:
  - id: warranty
    stages:
      - name: prod
    routes:
      - {{ path: "/registrations/{{id}}/warranty", method: PUT, apiKeyRequired: true, upstream: "{upstream}" }}
      - {{ path: "/echo/{{rest+}}", method: ANY, apiKeyRequired: true, upstream: "{upstream}" }}
      - {{ path: /slow, method: GET, apiKeyRequired: true, upstream: "{upstream}", timeout: 1s }}
      - {{ path: /public, method: GET, upstream: "{upstream}" }}
      - {{ path: /health, method: GET, mock: {{ statusCode: 200, body: '{{"ok":true}}' }} }}
{extra}"#
    )
}

/// A test upstream: echoes the request as JSON (`/echo/...`), streams the request body back
/// (`/echo/body`), answers after `?ms=` milliseconds (`/slow`).
pub struct Upstream {
    pub addr: SocketAddr,
}

pub async fn upstream() -> Upstream {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let service = hyper::service::service_fn(upstream_handle);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Upstream { addr }
}

async fn upstream_handle(
    req: Request<Incoming>,
) -> Result<Response<http_body_util::Either<Incoming, Full<Bytes>>>, Infallible> {
    let path = req.uri().path().to_string();
    if path.ends_with("/echo/body") {
        return Ok(Response::new(http_body_util::Either::Left(req.into_body())));
    }
    if path == "/slow" {
        let ms: u64 = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("ms="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let headers: serde_json::Map<String, serde_json::Value> = req
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str().to_string(),
                serde_json::Value::String(v.to_str().unwrap_or("?").to_string()),
            )
        })
        .collect();
    let echo = serde_json::json!({
        "method": req.method().as_str(),
        "uri": req.uri().to_string(),
        "headers": headers,
    });
    let mut resp = Response::new(http_body_util::Either::Right(Full::new(Bytes::from(
        echo.to_string(),
    ))));
    resp.headers_mut()
        .insert("x-upstream", "yes".parse().unwrap());
    resp.headers_mut()
        .insert("connection", "keep-alive, x-hop".parse().unwrap());
    resp.headers_mut()
        .insert("x-hop", "should-not-pass".parse().unwrap());
    Ok(resp)
}

/// A response read whole.
pub struct Reply {
    pub status: u16,
    pub headers: http::HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", self.body))
    }
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(|v| v.to_str().unwrap())
    }
}

pub struct HttpClient(Client<HttpConnector, Full<Bytes>>);

pub fn client() -> HttpClient {
    HttpClient(Client::builder(TokioExecutor::new()).build(HttpConnector::new()))
}

impl HttpClient {
    pub async fn send(
        &self,
        method: &str,
        url: &str,
        headers: &[(&str, &str)],
        body: impl Into<Bytes>,
    ) -> Reply {
        let mut req = Request::builder().method(method).uri(url);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self
            .0
            .request(req.body(Full::new(body.into())).unwrap())
            .await
            .unwrap();
        let (parts, body) = resp.into_parts();
        Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    pub async fn get(&self, url: &str, key: Option<&str>) -> Reply {
        match key {
            Some(k) => {
                self.send("GET", url, &[("x-api-key", k)], Bytes::new())
                    .await
            }
            None => self.send("GET", url, &[], Bytes::new()).await,
        }
    }

    pub async fn put(&self, url: &str, key: &str) -> Reply {
        self.send("PUT", url, &[("x-api-key", key)], "{}").await
    }
}

/// The `r=` of the "quota" item of a `RateLimit` header: the quota left.
pub fn quota_remaining(reply: &Reply) -> u64 {
    let header = reply
        .header("ratelimit")
        .unwrap_or_else(|| panic!("no RateLimit header (status {})", reply.status));
    let item = header
        .split(", ")
        .find(|i| i.starts_with("\"quota\""))
        .unwrap();
    item.split(';')
        .find_map(|p| p.strip_prefix("r="))
        .unwrap()
        .parse()
        .unwrap()
}

pub const ACCESS_KEY: &str = "AKIDTOLLGATETEST";
pub const SECRET_KEY: &str = "tollgate/test/secret+key";

/// The environment that gives a gateway the test admin credentials.
pub fn admin_env() -> Vec<(&'static str, &'static str)> {
    vec![
        ("TOLLGATE_ADMIN_ACCESS_KEY_ID", ACCESS_KEY),
        ("TOLLGATE_ADMIN_SECRET_ACCESS_KEY", SECRET_KEY),
        ("CENTRAL_KEY", KEY),
    ]
}

/// A SigV4-signing client for the admin API, signing with tollgate's own signer (checked against
/// AWS's test vector and against curl elsewhere).
pub struct AdminClient {
    pub addr: SocketAddr,
    pub http: HttpClient,
    pub secret: String,
    /// Seconds added to the signing time (to test expired signatures).
    pub skew: i64,
}

impl AdminClient {
    pub fn new(addr: SocketAddr) -> Self {
        AdminClient {
            addr,
            http: client(),
            secret: SECRET_KEY.into(),
            skew: 0,
        }
    }

    pub async fn call(&self, method: &str, path_and_query: &str, body: &str) -> Reply {
        let (path, query) = path_and_query
            .split_once('?')
            .unwrap_or((path_and_query, ""));
        let mut headers = http::HeaderMap::new();
        headers.insert("host", self.addr.to_string().parse().unwrap());
        if !body.is_empty() {
            headers.insert("content-type", "application/json".parse().unwrap());
        }
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs() as i64;
        let creds = tollgate_admin::sigv4::Credentials {
            access_key_id: ACCESS_KEY.into(),
            secret_access_key: self.secret.clone(),
        };
        tollgate_admin::sigv4::sign(
            &method.parse().unwrap(),
            path,
            query,
            &mut headers,
            body.as_bytes(),
            &creds,
            "eu-west-1",
            now + self.skew,
        );
        let pairs: Vec<(String, String)> = headers
            .iter()
            .map(|(k, v)| (k.as_str().to_string(), v.to_str().unwrap().to_string()))
            .collect();
        let refs: Vec<(&str, &str)> = pairs
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        self.http
            .send(
                method,
                &format!("http://{}{}", self.addr, path_and_query),
                &refs,
                body.to_string(),
            )
            .await
    }

    pub async fn ok(&self, method: &str, path: &str, body: &str) -> serde_json::Value {
        let r = self.call(method, path, body).await;
        assert!(
            r.status < 300,
            "{method} {path}: {} {}",
            r.status,
            String::from_utf8_lossy(&r.body)
        );
        if r.body.is_empty() {
            serde_json::Value::Null
        } else {
            r.json()
        }
    }
}

/// Asserts an AWS error: status, x-amzn-ErrorType and message.
pub fn assert_aws_error(r: &Reply, status: u16, error_type: &str, message: &str) {
    assert_eq!(r.status, status, "{}", String::from_utf8_lossy(&r.body));
    assert_eq!(r.header("x-amzn-errortype"), Some(error_type));
    let body = r.json();
    assert_eq!(body["message"], message);
    assert_eq!(body["__type"], error_type);
}

/// Today's UTC date, `YYYY-MM-DD`.
pub fn today() -> String {
    use tollgate_core::Clock as _;
    tollgate_core::quota::EpochDay::from_nanos(tollgate_core::SystemClock.now()).to_string()
}

impl AdminClient {
    /// The id of the usage plan named `name`.
    pub async fn plan_id(&self, name: &str) -> String {
        let plans = self.ok("GET", "/usageplans", "").await;
        let plan = plans["item"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name);
        plan.unwrap_or_else(|| panic!("no plan {name}: {plans}"))["id"]
            .as_str()
            .unwrap()
            .to_string()
    }
}
