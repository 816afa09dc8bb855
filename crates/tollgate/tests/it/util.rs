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

/// The plan `p` on stage `prod` of the API `warranty`, and the key `k` (`${CENTRAL_KEY}`) in it: YAML
/// to append to [`config`].
pub const ONE_PLAN: &str = "usagePlans:\n  - { name: p, apiStages: [ { apiId: warranty, stage: prod } ] }\n\
                            apiKeys:\n  - { name: k, value: \"${CENTRAL_KEY}\", usagePlans: [p] }\n";

/// A running `tollgate serve`; killed when dropped.
pub struct Gateway {
    pub child: Child,
    pub addr: SocketAddr,
    /// The admin API's address, when the config has one.
    pub admin: Option<SocketAddr>,
    /// The HTTPS listener's address, when the config has one.
    pub tls: Option<SocketAddr>,
    /// Everything the process printed on stdout before and after "listening".
    pub stdout: std::sync::Arc<std::sync::Mutex<String>>,
    pub stderr_path: PathBuf,
}

impl Gateway {
    /// Starts `tollgate serve --config <dir>/tollgate.yaml` and waits until it listens.
    pub fn start(dir: &Path, envs: &[(&str, &str)]) -> Gateway {
        Self::launch(dir, dir, envs, "http")
    }

    /// [`Gateway::start`] with another working directory: `cwd`.
    pub fn start_from(dir: &Path, cwd: &Path, envs: &[(&str, &str)]) -> Gateway {
        Self::launch(dir, cwd, envs, "http")
    }

    /// [`Gateway::start`] for a config whose data plane listens for HTTPS only (`addr` is the
    /// HTTPS listener's).
    pub fn start_tls(dir: &Path, envs: &[(&str, &str)]) -> Gateway {
        Self::launch(dir, dir, envs, "https")
    }

    fn launch(dir: &Path, cwd: &Path, envs: &[(&str, &str)], scheme: &'static str) -> Gateway {
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
            .current_dir(cwd);
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
                for scheme in ["http", "https"] {
                    let prefix = format!("tollgate: listening on {scheme}://");
                    if let Some(addr) = line.strip_prefix(&prefix) {
                        let _ = tx.send((scheme, addr.parse::<SocketAddr>().unwrap()));
                    }
                }
                let admin = line
                    .strip_prefix("tollgate: admin API on http://")
                    .or_else(|| line.strip_prefix("tollgate: admin API on https://"));
                if let Some(addr) = admin {
                    let _ = admin_tx.send(addr.parse::<SocketAddr>().unwrap());
                }
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
            }
        });
        // The HTTPS line, when there is one, comes before the plain one.
        let mut tls = None;
        let addr = loop {
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(("https", addr)) if scheme == "https" => break addr,
                Ok(("https", addr)) => tls = Some(addr),
                Ok((_, addr)) => break addr,
                Err(_) => {
                    let _ = child.kill();
                    panic!(
                        "gateway did not start: {}",
                        std::fs::read_to_string(&stderr_path).unwrap_or_default()
                    );
                }
            }
        };
        let tls = if scheme == "https" { Some(addr) } else { tls };
        // The admin line, when there is one, comes before the data plane's.
        let admin = admin_rx.try_recv().ok();
        Gateway {
            child,
            addr,
            admin,
            tls,
            stdout: seen,
            stderr_path,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// What the admin API's `/metrics` says now, as text.
    pub async fn metrics(&self) -> String {
        let admin = self.admin.expect("an admin API serves /metrics");
        let r = client().get(&format!("http://{admin}/metrics"), None).await;
        String::from_utf8(r.body.to_vec()).unwrap()
    }

    /// The decision endpoint's address (`verify.listen`), from the line the gateway printed.
    pub fn verify_addr(&self) -> SocketAddr {
        let seen = self.stdout.lock().unwrap();
        let line = seen
            .lines()
            .find_map(|l| l.strip_prefix("tollgate: decisions on http://"))
            .unwrap_or_else(|| panic!("no decision endpoint in: {seen}"));
        line.parse().unwrap()
    }

    /// SIGTERM, then wait for a clean exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        signal(&self.child, "TERM");
        let status = wait_timeout(&mut self.child, Duration::from_secs(30))
            .expect("gateway did not stop after SIGTERM");
        if !status.success() {
            // Shown with the failing test's output: why the stop was not clean.
            eprintln!(
                "gateway exited with {status}; its stderr:\n{}",
                self.stderr()
            );
        }
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

pub fn signal(child: &Child, sig: &str) {
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

/// A config serving the API `warranty` at stage `prod` with `routes` (YAML list items, indented as
/// route entries), then `more_apis` (further list items of `apis`), with the plan `p` on that stage
/// and the key `k` (`${CENTRAL_KEY}`) in it.
pub fn config_with_routes(routes: &str, more_apis: &str) -> String {
    format!(
        "listen: 127.0.0.1:0\nstore: {{ sqlite: ./tollgate.db }}\napis:\n  - id: warranty\n    \
         stages: [ {{ name: prod }} ]\n    routes:\n{routes}{more_apis}{ONE_PLAN}"
    )
}

/// A test upstream: echoes the request as JSON (`/echo/...`), streams the request body back
/// (`/echo/body`), answers `?mb=` megabytes (`…/big`), answers after `?ms=` milliseconds (`/slow`).
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

pub async fn upstream_handle(
    req: Request<Incoming>,
) -> Result<Response<http_body_util::Either<Incoming, Full<Bytes>>>, Infallible> {
    let path = req.uri().path().to_string();
    if path.ends_with("/echo/body") {
        return Ok(Response::new(http_body_util::Either::Left(req.into_body())));
    }
    if path.ends_with("/big") {
        // `?mb=` megabytes of zeros: an answer larger than any socket buffer.
        let mb: usize = req
            .uri()
            .query()
            .and_then(|q| q.strip_prefix("mb="))
            .and_then(|v| v.parse().ok())
            .unwrap_or(1);
        let body = Full::new(Bytes::from(vec![0u8; mb << 20]));
        return Ok(Response::new(http_body_util::Either::Right(body)));
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

    /// A keyed GET, or `None` when the connection failed (the gateway went away).
    pub async fn try_get(&self, url: &str, key: &str) -> Option<Reply> {
        let req = Request::builder()
            .uri(url)
            .header("x-api-key", key)
            .body(Full::new(Bytes::new()))
            .ok()?;
        let (parts, body) = self.0.request(req).await.ok()?.into_parts();
        Some(Reply {
            status: parts.status.as_u16(),
            headers: parts.headers,
            body: body.collect().await.ok()?.to_bytes(),
        })
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
/// Runs the `tollgate` CLI against the admin API with the test credentials; returns stdout or panics.
pub fn cli(gw: &Gateway, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .args(args)
        .env("TOLLGATE_ENDPOINT", format!("http://{}", gw.admin.unwrap()))
        .env("TOLLGATE_ADMIN_ACCESS_KEY_ID", ACCESS_KEY)
        .env("TOLLGATE_ADMIN_SECRET_ACCESS_KEY", SECRET_KEY)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "tollgate {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A real redis-server for a test, when one is installed (see [`have`]).
pub fn redis() -> Option<tollgate_store::testing::RedisServer> {
    have("redis-server", &["--version"], "apt install redis-server")
        .then(tollgate_store::testing::RedisServer::start)
}

/// The `store:` line of a gateway on `redis`.
pub fn on_redis(redis: &tollgate_store::testing::RedisServer) -> String {
    format!("store: {{ redis: {{ url: \"{}\" }} }}", redis.url())
}

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
    /// Creates a usage plan named `name` on the `warranty` API's `prod` stage; its id.
    pub async fn create_prod_plan(&self, name: &str) -> String {
        let body =
            format!(r#"{{"name":"{name}","apiStages":[{{"apiId":"warranty","stage":"prod"}}]}}"#);
        let plan = self.ok("POST", "/usageplans", &body).await;
        plan["id"].as_str().unwrap().to_string()
    }

    /// GetUsage of the plan `plan_id` for today (UTC).
    pub async fn usage_today(&self, plan_id: &str) -> serde_json::Value {
        let today = today();
        let path = format!("/usageplans/{plan_id}/usage?startDate={today}&endDate={today}");
        self.ok("GET", &path, "").await
    }

    /// The id of the API key named `name`.
    pub async fn key_id(&self, name: &str) -> String {
        let keys = self.ok("GET", "/apikeys", "").await;
        let key = keys["item"]
            .as_array()
            .unwrap()
            .iter()
            .find(|k| k["name"] == name);
        key.unwrap_or_else(|| panic!("no key {name}: {keys}"))["id"]
            .as_str()
            .unwrap()
            .to_string()
    }

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

/// Sends `bytes` on a new connection and reads until the peer closes (or 10 s pass): the raw
/// answer, for requests no HTTP client library would send.
pub fn raw_exchange(addr: SocketAddr, bytes: &[u8]) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    // The server may answer and close before reading everything; a failed write is fine then.
    let _ = s.write_all(bytes);
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

/// The status code of the first response in a raw answer.
pub fn status_of(raw: &str) -> Option<u16> {
    raw.strip_prefix("HTTP/1.1 ")
        .and_then(|t| t.get(..3))
        .and_then(|c| c.parse().ok())
}

/// The variable that makes every outside program the tests use mandatory (`scripts/test` and CI set it).
pub const REQUIRE_TOOLS: &str = "TOLLGATE_REQUIRE_TOOLS";

/// Whether `program` runs here (`args`: a harmless invocation that succeeds when it works). When it
/// does not, the test asking is skipped with a note on the real stderr (so `cargo test` shows it
/// whatever it captures), or fails when [`REQUIRE_TOOLS`] is set. `install` says how to get it.
pub fn have(program: &str, args: &[&str], install: &str) -> bool {
    let works = Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !works {
        assert!(
            std::env::var_os(REQUIRE_TOOLS).is_none(),
            "{program} is required ({REQUIRE_TOOLS} is set) but does not run: {install}"
        );
        let test = std::thread::current().name().unwrap_or("a test").to_owned();
        use std::io::Write as _;
        let _ = writeln!(
            std::io::stderr(),
            "SKIPPED {test}: it needs {program}, which does not run here ({install}; scripts/test installs it)"
        );
    }
    works
}

/// [`have`] for nginx.
pub fn have_nginx() -> bool {
    have(
        nginx_binary(),
        &["-v"],
        "Debian: apt-get install nginx-light",
    )
}

/// [`have`] for Caddy.
pub fn have_caddy() -> bool {
    have("caddy", &["version"], "Debian: apt-get install caddy")
}

/// [`have`] for Flask (under `python3`).
pub fn have_flask() -> bool {
    have("python3", &["-c", "import flask"], "pip install flask")
}

/// A real nginx, from Debian's package, on a free port of 127.0.0.1; stopped when dropped.
pub struct Nginx {
    pub addr: SocketAddr,
    pub dir: tempfile::TempDir,
    child: Child,
}

impl Nginx {
    /// Runs nginx with `http` as its `http {}` block, where `{PORT}` is the port it listens on and
    /// `{DIR}` its directory (logs go there); `None` when nginx is not installed (see [`have`]).
    pub fn start(http: &str) -> Option<Nginx> {
        if !have_nginx() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = tollgate_store::testing::free_port();
        let conf = format!(
            "daemon off; master_process off; worker_processes 1; pid {d}/nginx.pid;\n\
             error_log {d}/error.log;\nevents {{ worker_connections 1024; }}\n\
             http {{\n client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;\n\
             fastcgi_temp_path {d}/fastcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;\n{}\n}}\n",
            http.replace("{PORT}", &port.to_string())
                .replace("{DIR}", &dir.path().display().to_string()),
            d = dir.path().display(),
        );
        std::fs::write(dir.path().join("nginx.conf"), conf).unwrap();
        let child = Command::new(nginx_binary())
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(dir.path().join("nginx.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx is required for these tests (Debian: apt-get install nginx)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "nginx did not start: {}",
                std::fs::read_to_string(dir.path().join("error.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Nginx { addr, dir, child })
    }

    /// A file nginx wrote in its directory.
    pub fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.dir.path().join(name)).unwrap_or_default()
    }
}

/// A Caddy server run by the test (`caddy run`), with its state in a temporary directory.
pub struct Caddy {
    pub addr: SocketAddr,
    /// Its Caddyfile, state and log, removed when it stops.
    _dir: tempfile::TempDir,
    child: Child,
}

impl Caddy {
    /// Runs Caddy with `caddyfile`, where `{PORT}` is the port it listens on; `None` when Caddy is
    /// not installed (see [`have`]).
    pub fn start(caddyfile: &str) -> Option<Caddy> {
        if !have_caddy() {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = tollgate_store::testing::free_port();
        let file = dir.path().join("Caddyfile");
        std::fs::write(&file, caddyfile.replace("{PORT}", &port.to_string())).unwrap();
        let child = Command::new("caddy")
            .args(["run", "--adapter", "caddyfile", "--config"])
            .arg(&file)
            .env("HOME", dir.path())
            .env("XDG_DATA_HOME", dir.path())
            .env("XDG_CONFIG_HOME", dir.path())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("caddy.log")).unwrap())
            .spawn()
            .expect("caddy is required for these tests (Debian: apt-get install caddy)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "caddy did not start: {}",
                std::fs::read_to_string(dir.path().join("caddy.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Some(Caddy {
            addr,
            _dir: dir,
            child,
        })
    }
}

impl Drop for Caddy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A real Prometheus (Debian's `prometheus` package) scraping one target every second, with its
/// data in a temporary directory; stopped when dropped.
pub struct Prometheus {
    addr: SocketAddr,
    dir: tempfile::TempDir,
    child: Child,
}

impl Prometheus {
    /// Runs Prometheus scraping `/metrics` at `target`; `None` when it is not installed (see
    /// [`have`]).
    pub fn start(target: SocketAddr) -> Option<Prometheus> {
        if !have(
            "prometheus",
            &["--version"],
            "Debian: apt-get install prometheus",
        ) {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global: {{ scrape_interval: 1s }}\n\
                 scrape_configs:\n  - {{ job_name: tollgate, static_configs: [{{ targets: [\"{target}\"] }}] }}\n"
            ),
        )
        .unwrap();
        // Prometheus cannot say which port it took, so it is given one; one another process took
        // in between makes it exit, and it is tried again.
        for _ in 0..3 {
            let port = tollgate_store::testing::free_port();
            let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
            let mut child = Command::new("prometheus")
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
                .spawn()
                .unwrap();
            let deadline = std::time::Instant::now() + Duration::from_secs(20);
            loop {
                if std::net::TcpStream::connect(addr).is_ok() {
                    return Some(Prometheus { addr, dir, child });
                }
                if child.try_wait().unwrap().is_some() {
                    break;
                }
                assert!(
                    std::time::Instant::now() < deadline,
                    "prometheus did not start: {}",
                    std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        panic!(
            "prometheus did not start: {}",
            std::fs::read_to_string(dir.path().join("prometheus.log")).unwrap_or_default()
        );
    }

    /// `GET /api/v1/{path}`, as JSON.
    pub async fn api(&self, path: &str) -> serde_json::Value {
        let r = client()
            .get(&format!("http://{}/api/v1/{path}", self.addr), None)
            .await;
        serde_json::from_slice(&r.body).unwrap_or(serde_json::Value::Null)
    }

    /// The value of an instant query with one result, if it has one yet.
    pub async fn try_query(&self, query: &str) -> Option<f64> {
        let encoded =
            percent_encoding::utf8_percent_encode(query, percent_encoding::NON_ALPHANUMERIC);
        let r = self.api(&format!("query?query={encoded}")).await;
        r["data"]["result"][0]["value"][1].as_str()?.parse().ok()
    }

    /// The value of an instant query with one result.
    pub async fn query(&self, query: &str) -> f64 {
        self.try_query(query)
            .await
            .unwrap_or_else(|| panic!("no result for {query}: {}", self.log()))
    }

    /// Waits (at most 30 s) until `query`'s value satisfies `ok`.
    pub async fn until(&self, query: &str, ok: impl Fn(f64) -> bool) {
        for _ in 0..120 {
            if self.try_query(query).await.is_some_and(&ok) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        panic!("{query} never got there: {}", self.log());
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("prometheus.log")).unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn nginx_binary() -> &'static str {
    if Path::new("/usr/sbin/nginx").exists() {
        "/usr/sbin/nginx"
    } else {
        "nginx"
    }
}

/// One request as a [`SloppyUpstream`] understood it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Served {
    pub method: String,
    pub path: String,
    pub api_key: Option<String>,
}

/// An upstream as careless as many small frameworks: it reads a request head and answers it, then
/// reads the next head from whatever follows. It never reads a body on `GET` nor on paths under
/// `/sloppy`, and it ends a chunked body at its last chunk without reading trailers. So a request
/// hidden in a body it skips becomes a request it serves. Each answer names the path it served.
pub struct SloppyUpstream {
    pub addr: SocketAddr,
    pub served: std::sync::Arc<std::sync::Mutex<Vec<Served>>>,
}

pub async fn sloppy_upstream() -> SloppyUpstream {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let served = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let log = served.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let log = log.clone();
            tokio::spawn(async move {
                let mut buf: Vec<u8> = Vec::new();
                let mut chunk = [0u8; 8192];
                loop {
                    // Blank lines before a request line are skipped, as RFC 9112 allows.
                    while buf.starts_with(b"\r\n") {
                        buf.drain(..2);
                    }
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match stream.read(&mut chunk).await {
                            Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                            _ => return,
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    buf.drain(..end + 4);
                    let mut lines = head.split("\r\n");
                    let mut parts = lines.next().unwrap_or("").split(' ');
                    let method = parts.next().unwrap_or("").to_string();
                    let path = parts.next().unwrap_or("").to_string();
                    let mut length = 0usize;
                    let mut chunked = false;
                    let mut api_key = None;
                    for line in lines {
                        let (name, value) = line.split_once(':').unwrap_or((line, ""));
                        let value = value.trim();
                        match name.to_ascii_lowercase().as_str() {
                            "content-length" => length = value.parse().unwrap_or(0),
                            "transfer-encoding" => chunked = value.contains("chunked"),
                            "x-api-key" => api_key = Some(value.to_string()),
                            _ => {}
                        }
                    }
                    log.lock().unwrap().push(Served {
                        method: method.clone(),
                        path: path.clone(),
                        api_key,
                    });
                    let skips_body = method == "GET" || path.starts_with("/sloppy");
                    if !skips_body && chunked {
                        // Up to and including the last chunk's size line; trailers are not read.
                        loop {
                            if let Some(at) = buf.windows(5).position(|w| w == b"\r\n0\r\n") {
                                buf.drain(..at + 5);
                                break;
                            }
                            if buf.starts_with(b"0\r\n") {
                                buf.drain(..3);
                                break;
                            }
                            match stream.read(&mut chunk).await {
                                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                                _ => return,
                            }
                        }
                    } else if !skips_body {
                        while buf.len() < length {
                            match stream.read(&mut chunk).await {
                                Ok(n) if n > 0 => buf.extend_from_slice(&chunk[..n]),
                                _ => return,
                            }
                        }
                        buf.drain(..length);
                    }
                    let body = format!("served {method} {path}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if stream.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    SloppyUpstream { addr, served }
}

impl SloppyUpstream {
    /// Everything it served so far.
    pub fn served(&self) -> Vec<Served> {
        self.served.lock().unwrap().clone()
    }
}

/// A Flask app on the stdlib's wsgiref server (`backends/cgi_echo.py`): a CGI-style backend that
/// reads `_` in a field name as `-` and upper-cases methods, and answers with the method, path and
/// fields it read. Stopped when dropped.
pub struct CgiBackend {
    pub addr: SocketAddr,
    child: Child,
}

impl CgiBackend {
    /// `None` when Flask is not installed (see [`have`]).
    pub fn start() -> Option<CgiBackend> {
        if !have_flask() {
            return None;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/it/backends/cgi_echo.py");
        let mut child = Command::new("python3")
            .arg(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("python3 is required for these tests");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let Ok(port) = line.trim().parse::<u16>() else {
            let mut err = String::new();
            let _ = std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err);
            panic!("the Flask backend did not start (pip install flask): {err}");
        };
        Some(CgiBackend {
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
        })
    }
}

impl Drop for CgiBackend {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
