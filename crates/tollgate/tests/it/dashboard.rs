//! The dashboard in a real browser: Debian's Chromium driven through chromedriver's W3C WebDriver
//! endpoint. The few WebDriver calls are JSON over the tests' own HTTP client rather than a WebDriver
//! crate: a dozen requests do not earn a dependency tree.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use base64::Engine as _;
use serde_json::{Value, json};

use crate::util::{self, ACCESS_KEY, Gateway, HttpClient, KEY, SECRET_KEY, client};

/// The key under which W3C WebDriver names an element.
const ELEMENT: &str = "element-6066-11e4-a52e-4f735466cecf";

/// A chromedriver process and one headless Chromium session; both end when dropped.
struct Browser {
    driver: Child,
    base: String,
    http: HttpClient,
    shots: PathBuf,
    _profile: tempfile::TempDir,
}

impl Browser {
    /// `None` when Chromium or its driver is not installed (see [`util::have`]).
    async fn start(shots: &Path) -> Option<Browser> {
        Self::start_with(shots, &[]).await
    }

    /// [`Browser::start`] with more Chromium arguments.
    async fn start_with(shots: &Path, extra_args: &[&str]) -> Option<Browser> {
        let install = "Debian: apt-get install chromium chromium-driver";
        if !(util::have("chromedriver", &["--version"], install)
            && util::have("/usr/bin/chromium", &["--version"], install))
        {
            return None;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect(
                "chromedriver (Debian's chromium-driver) must be installed: .ci/run installs it",
            );
        let base = format!("http://127.0.0.1:{port}");
        let http = client();
        let profile = tempfile::tempdir().unwrap();
        let mut browser = Browser {
            driver,
            base,
            http,
            shots: shots.to_owned(),
            _profile: profile,
        };
        // Listening first (the client treats a refused connection as a failure), then ready.
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let status_url = format!("{}/status", browser.base);
        for _ in 0..100 {
            let status = browser.http.send("GET", &status_url, &[], "").await;
            if status.json()["value"]["ready"] == true {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let mut args = vec![
            "--headless=new".to_string(),
            "--no-sandbox".into(),
            "--disable-gpu".into(),
            "--disable-dev-shm-usage".into(),
            "--window-size=1280,900".into(),
            format!("--user-data-dir={}", browser._profile.path().display()),
        ];
        args.extend(extra_args.iter().map(|a| a.to_string()));
        let caps = json!({"capabilities": {"alwaysMatch": {
            "browserName": "chrome",
            "goog:chromeOptions": { "binary": "/usr/bin/chromium", "args": args },
        }}});
        let session = browser.call("POST", "/session", caps).await;
        let id = session["sessionId"]
            .as_str()
            .unwrap_or_else(|| panic!("no session: {session}"))
            .to_string();
        browser.base = format!("{}/session/{id}", browser.base);
        Some(browser)
    }

    /// A WebDriver command's value; a WebDriver error fails the test.
    async fn call(&self, method: &str, path: &str, body: Value) -> Value {
        let v = self.try_call(method, path, body).await;
        assert!(v.get("error").is_none(), "{method} {path}: {v}");
        v
    }

    /// A WebDriver command's value, or its error object.
    async fn try_call(&self, method: &str, path: &str, body: Value) -> Value {
        let r = self
            .http
            .send(
                method,
                &format!("{}{path}", self.base),
                &[("content-type", "application/json")],
                if method == "GET" {
                    String::new()
                } else {
                    body.to_string()
                },
            )
            .await;
        r.json()["value"].clone()
    }

    async fn goto(&self, url: &str) {
        self.call("POST", "/url", json!({ "url": url })).await;
    }

    /// The first element `css` selects, waiting up to 15 s for it to appear.
    async fn find(&self, css: &str) -> String {
        for _ in 0..150 {
            let v = self
                .try_call(
                    "POST",
                    "/element",
                    json!({"using": "css selector", "value": css}),
                )
                .await;
            if let Some(id) = v[ELEMENT].as_str() {
                return id.to_string();
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!(
            "no element {css}: {}",
            self.script("return document.body.innerText").await
        )
    }

    async fn count(&self, css: &str) -> usize {
        let v = self
            .call(
                "POST",
                "/elements",
                json!({"using": "css selector", "value": css}),
            )
            .await;
        v.as_array().map_or(0, Vec::len)
    }

    /// `command` (a path under `/element/{id}`) on the element `css` selects. The page re-renders
    /// as data arrives, so an element found may be replaced before the command reaches it: then it
    /// is found again.
    async fn on_element(&self, css: &str, method: &str, command: &str, body: Value) -> Value {
        for _ in 0..50 {
            let el = self.find(css).await;
            let path = format!("/element/{el}{command}");
            let v = self.try_call(method, &path, body.clone()).await;
            if v["error"] != "stale element reference" {
                assert!(v.get("error").is_none(), "{method} {path}: {v}");
                return v;
            }
        }
        panic!("{css} kept going stale");
    }

    async fn text(&self, css: &str) -> String {
        let v = self.on_element(css, "GET", "/text", Value::Null).await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// Waits until the element `css` selects reads `want`.
    async fn until_text(&self, css: &str, want: &str) {
        for _ in 0..150 {
            if self.text(css).await == want {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{css} never read {want:?}: {:?}", self.text(css).await);
    }

    async fn type_into(&self, css: &str, text: &str) {
        self.on_element(css, "POST", "/value", json!({ "text": text }))
            .await;
    }

    /// Waits (at most 10 s) until `css` matches `n` elements.
    async fn until_count(&self, css: &str, n: usize) {
        for _ in 0..100 {
            if self.count(css).await == n {
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        panic!("{css}: {} elements, not {n}", self.count(css).await);
    }

    async fn click(&self, css: &str) {
        self.on_element(css, "POST", "/click", json!({})).await;
    }

    async fn script(&self, script: &str) -> Value {
        self.call(
            "POST",
            "/execute/sync",
            json!({ "script": script, "args": [] }),
        )
        .await
    }

    /// Runs `script` as an async function's body (`done(value)` ends it); its value.
    async fn script_async(&self, script: &str) -> Value {
        let body = format!("const done = arguments[arguments.length - 1]; {script}");
        self.call(
            "POST",
            "/execute/async",
            json!({ "script": body, "args": [] }),
        )
        .await
    }

    async fn attribute(&self, css: &str, name: &str) -> String {
        let command = format!("/attribute/{name}");
        let v = self.on_element(css, "GET", &command, Value::Null).await;
        v.as_str().unwrap_or_default().to_string()
    }

    /// Saves a PNG of the page as `name`.png; returns its size in bytes.
    async fn screenshot(&self, name: &str) -> usize {
        let v = self.call("GET", "/screenshot", Value::Null).await;
        let png = base64::engine::general_purpose::STANDARD
            .decode(v.as_str().unwrap_or_default())
            .unwrap();
        assert!(png.starts_with(b"\x89PNG"), "a PNG");
        std::fs::write(self.shots.join(format!("{name}.png")), &png).unwrap();
        png.len()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // Ending the session quits Chromium; killing only the driver would leave it running.
        if let Some(rest) = self.base.strip_prefix("http://") {
            use std::io::{Read, Write};
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            if let Ok(mut s) = std::net::TcpStream::connect(host) {
                let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
                let _ = write!(
                    s,
                    "DELETE /{path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = s.read_to_end(&mut Vec::new());
            }
        }
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

// The per-method throttle is the plan's own, so the bucket is the same; the key page lists it.
const PLANS: &str = "usagePlans:\n  - name: partners\n    apiStages: [ { apiId: warranty, stage: prod, throttle: { \"/echo/{rest+}/ANY\": { rateLimit: 0.001, burstLimit: 6 } } } ]\n    \
                     throttle: { rateLimit: 0.001, burstLimit: 6 }\n    quota: { limit: 10, period: DAY }\n\
                     apiKeys:\n  - { name: central-system, value: \"${CENTRAL_KEY}\", usagePlans: [partners] }\n  \
                     - { name: quiet-partner, value: quietKeyValue0123456789abcdef, usagePlans: [partners] }\n";

/// A gateway with an admin listener serving [`PLANS`], started with `envs`.
async fn start(envs: &[(&str, &str)]) -> (tempfile::TempDir, Gateway, util::Upstream) {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let yaml = util::config(
        &format!("http://{}", up.addr),
        &format!("admin: {{ listen: 127.0.0.1:0 }}\n{PLANS}"),
    );
    util::write_config(dir.path(), &yaml);
    let gw = Gateway::start(dir.path(), envs);
    (dir, gw, up)
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_signs_in_reads_the_keys_and_disables_one() {
    let (dir, gw, _up) = start(&util::admin_env()).await;
    let c = client();
    // Six admitted, then the bucket is empty: two throttled.
    for expected in [200, 200, 200, 200, 200, 200, 429, 429] {
        assert_eq!(
            c.get(&gw.url("/prod/echo/d"), Some(KEY)).await.status,
            expected
        );
    }
    // Refused 403: no key, an unknown one.
    assert_eq!(c.get(&gw.url("/prod/echo/d"), None).await.status, 403);
    let unknown = Some("unknownKeyValue0123456789abcdef");
    assert_eq!(c.get(&gw.url("/prod/echo/d"), unknown).await.status, 403);
    let shots = std::env::var_os("TOLLGATE_SCREENSHOTS")
        .map_or_else(|| dir.path().join("screenshots"), PathBuf::from);
    std::fs::create_dir_all(&shots).unwrap();
    let Some(b) = Browser::start(&shots).await else {
        return;
    };
    let admin = format!("http://{}", gw.admin.unwrap());

    // Signed out: the login form; a wrong secret is refused.
    b.goto(&format!("{admin}/dashboard")).await;
    b.find("#login:not([hidden]) #access-key-id").await;
    b.screenshot("login").await;
    b.type_into("#access-key-id", ACCESS_KEY).await;
    b.type_into("#secret-access-key", "not-the-secret").await;
    b.click("#sign-in").await;
    b.until_text("#login-error", "The access key id or secret is not valid")
        .await;
    b.type_into("#access-key-id", "").await;
    b.script("document.getElementById('access-key-id').value = ''; document.getElementById('secret-access-key').value = '';").await;
    b.type_into("#access-key-id", ACCESS_KEY).await;
    b.type_into("#secret-access-key", SECRET_KEY).await;
    b.click("#sign-in").await;

    // The overview: 30 days, today's 6 allowed and 2 throttled.
    b.until_text("#stat-allowed", "6").await;
    assert_eq!(b.text("#stat-429").await, "25.0%");
    assert_eq!(b.text("#stat-403").await, "2");
    // Latency from the data plane's histogram: the proxied requests took well under a second.
    let p50 = b.text("#stat-p50").await;
    assert!(p50.ends_with(" ms") && !p50.starts_with('–'), "{p50}");
    // Refusals stand beside the admitted requests, not on top of them.
    let beside = b
        .script(
            "const a = document.querySelector('svg.chart rect.allowed').getBBox(); \
             const t = document.querySelector('svg.chart rect.throttled').getBBox(); \
             return [t.x >= a.x + a.width - 0.01, Math.abs(t.y + t.height - a.y - a.height) < 0.01];",
        )
        .await;
    assert_eq!(beside, json!([true, true]), "beside, on the same baseline");
    assert_eq!(b.attribute("svg.chart", "data-days").await, "30");
    let cookie = b.script("return document.cookie").await;
    assert_eq!(cookie, json!(""), "the session cookie is HttpOnly");
    b.screenshot("overview").await;

    // The keys table: both keys, the quota use as a bar.
    b.goto(&format!("{admin}/dashboard#/keys")).await;
    b.find("tr[data-key] progress").await;
    assert_eq!(b.count("#keys-body tr").await, 2);
    let table = b.text("#keys-table").await;
    assert!(
        table.contains("central-system") && table.contains("quiet-partner"),
        "{table}"
    );
    assert!(
        table.contains("6 / 10") && table.contains("never"),
        "{table}"
    );
    // The 80% filter keeps none of them (6 of 10 is 60%); sorting by name descending.
    b.click("#near-quota").await;
    assert_eq!(b.count("#keys-body tr").await, 0);
    b.click("#near-quota").await;
    b.click("th[data-sort=name]").await;
    let first = b.text("#keys-body tr:first-child td:first-child a").await;
    assert_eq!(first, "quiet-partner", "name, descending");
    b.click("th[data-sort=name]").await;
    // Search ignores case.
    b.type_into("#key-search", "QUIET").await;
    b.until_count("#keys-body tr", 1).await;
    assert!(b.text("#keys-body").await.contains("quiet-partner"));
    b.script("document.getElementById('key-search').value = ''; document.getElementById('key-search').dispatchEvent(new Event('input'));").await;
    b.until_count("#keys-body tr", 2).await;
    // A created key is listed at once, its value shown once with a copy button.
    b.type_into("#new-key-name", "new-partner").await;
    b.click("form.inline-form button[type=submit]").await;
    b.find("#new-key-value").await;
    b.until_count("#keys-body tr", 3).await;
    let value = b.text("#new-key-value").await;
    assert_eq!(value.len(), 40, "{value}");
    b.click("#copy-key-value").await;
    // The button answers once the clipboard has (it is asynchronous).
    let mut copied = b.text("#copy-key-value").await;
    for _ in 0..100 {
        if copied != "Copy" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        copied = b.text("#copy-key-value").await;
    }
    assert!(
        copied == "Copied" || copied.starts_with("Selected"),
        "{copied}"
    );
    b.screenshot("keys").await;

    // The key: from its creation (today), today's outcomes, the quota line, the per-method
    // throttle; disabling it asks first.
    b.goto(&format!("{admin}/dashboard#/keys")).await;
    b.find("tr[data-key]").await;
    b.click("#keys-body a").await;
    b.find("svg.chart").await;
    assert_eq!(b.text("#view h1").await, "central-system enabled");
    let meta = b.text("#view h1 + p").await;
    assert!(
        meta.contains("value starts cent… (32 characters)"),
        "{meta}"
    );
    assert_eq!(b.attribute("svg.chart", "data-days").await, "1");
    assert_eq!(b.count("svg.chart g.day").await, 1);
    assert_eq!(
        b.count("svg.chart g.day rect").await,
        2,
        "allowed and throttled, today only"
    );
    assert_eq!(b.count("svg.chart polyline.quota-line").await, 1);
    assert_eq!(b.count("svg.chart line.quota-limit").await, 1);
    let methods = b.text("ul.methods").await;
    assert_eq!(methods, "warranty:prod /echo/{rest+}/ANY: 0.001/s, burst 6");
    b.screenshot("key").await;
    b.click("#toggle-enabled").await;
    b.find("#confirm-disable").await;
    assert_eq!(
        c.get(&gw.url("/prod/echo/d"), Some(KEY)).await.status,
        429,
        "still enabled until confirmed"
    );
    b.click("#confirm-disable").await;
    b.until_text("#key-state", "disabled").await;
    assert_eq!(
        c.get(&gw.url("/prod/echo/d"), Some(KEY)).await.status,
        403,
        "disabled at once"
    );

    // Plans, and a phone-sized window.
    b.goto(&format!("{admin}/dashboard#/plans")).await;
    b.find("#plans-table tr[data-plan]").await;
    let plans = b.text("#plans-table").await;
    assert!(
        plans.contains("partners") && plans.contains("10 / day"),
        "{plans}"
    );
    b.screenshot("plans").await;
    b.call("POST", "/window/rect", json!({"width": 390, "height": 844}))
        .await;
    b.goto(&format!("{admin}/dashboard#/keys")).await;
    b.find("tr[data-key]").await;
    // The quota column fits on the phone's screen.
    let fits = b
        .script("return document.querySelector('th[data-sort=quota]').getBoundingClientRect().right <= window.innerWidth")
        .await;
    assert_eq!(fits, json!(true));
    b.screenshot("keys-phone").await;
    // The chart's axis text stays readable (at least 10 px) on the phone.
    b.goto(&format!("{admin}/dashboard#/")).await;
    b.find("svg.chart text").await;
    let px = b
        .script("return document.querySelector('svg.chart text').getBoundingClientRect().height")
        .await;
    assert!(px.as_f64().unwrap() >= 10.0, "{px}");
    b.screenshot("overview-phone").await;
    drop(b);
    assert!(gw.terminate().success());
}

/// Signs in with the test credentials and waits for the overview.
async fn sign_in(b: &Browser, admin: &str) {
    b.goto(&format!("{admin}/dashboard")).await;
    b.find("#login:not([hidden]) #access-key-id").await;
    b.type_into("#access-key-id", ACCESS_KEY).await;
    b.type_into("#secret-access-key", SECRET_KEY).await;
    b.click("#sign-in").await;
    b.find("#stat-allowed").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_customers_view_and_the_series_of_what_shadow_would_have_refused() {
    let up = util::upstream().await;
    let dir = tempfile::tempdir().unwrap();
    let plans = "usagePlans:\n  - { name: partners, limitsShareBy: customerId, apiStages: [ { apiId: warranty, stage: prod } ], quota: { limit: 10, period: DAY } }\n\
        apiKeys:\n\
        \x20 - { name: acme-prod, value: acmeProdKeyValue0123456789, customerId: acme, usagePlans: [partners] }\n\
        \x20 - { name: acme-staging, value: acmeStagingKeyValue0123456789, customerId: acme, usagePlans: [partners] }\n\
        \x20 - { name: globex, value: globexKeyValue0123456789, customerId: globex, usagePlans: [partners] }\n\
        \x20 - { name: solo, value: soloKeyValue0123456789abc, usagePlans: [partners] }\n\
        \x20 - { name: tried, value: triedKeyValue0123456789abc, usagePlans: [tried] }\n";
    let plans = plans.replace(
        "apiKeys:",
        "  - { name: tried, enforcement: shadow, apiStages: [ { apiId: warranty, stage: dev } ], quota: { limit: 1, period: DAY } }\napiKeys:",
    );
    let yaml = util::config(
        &format!("http://{}", up.addr),
        &format!("admin: {{ listen: 127.0.0.1:0 }}\n{plans}"),
    )
    .replace(
        "      - name: prod\n",
        "      - name: prod\n      - name: dev\n",
    );
    util::write_config(dir.path(), &yaml);
    let gw = Gateway::start(dir.path(), &util::admin_env());
    let c = client();
    // The plan in shadow lets all three through; enforced, it would have refused two.
    for _ in 0..3 {
        let r = c
            .get(&gw.url("/dev/echo/t"), Some("triedKeyValue0123456789abc"))
            .await;
        assert_eq!(r.status, 200);
    }
    for (key, n) in [
        ("acmeProdKeyValue0123456789", 3),
        ("acmeStagingKeyValue0123456789", 2),
        ("globexKeyValue0123456789", 1),
        ("soloKeyValue0123456789abc", 4),
    ] {
        for _ in 0..n {
            assert_eq!(c.get(&gw.url("/prod/echo/c"), Some(key)).await.status, 200);
        }
    }
    let shots = std::env::var_os("TOLLGATE_SCREENSHOTS")
        .map_or_else(|| dir.path().join("screenshots"), PathBuf::from);
    std::fs::create_dir_all(&shots).unwrap();
    let Some(b) = Browser::start(&shots).await else {
        return;
    };
    let admin = format!("http://{}", gw.admin.unwrap());
    sign_in(&b, &admin).await;
    // The overview: what plans in shadow would have refused, as a series of its own.
    b.until_text("#stat-shadow", "2").await;
    assert!(b.count("svg.chart rect.shadow").await >= 1);
    let legend = b.text(".legend").await;
    assert!(legend.contains("would have refused (shadow)"), "{legend}");
    assert_eq!(
        b.text("#stat-allowed").await,
        "11",
        "the shadow's admitted count too"
    );
    b.screenshot("overview-shadow").await;
    b.click("nav a[data-page=customers]").await;
    b.find("#customers-table tr[data-customer]").await;
    // One row per customer; the key without a customer has none.
    assert_eq!(b.count("#customers-table tbody tr").await, 2);
    let acme = "#customers-table tr[data-customer=acme]";
    assert_eq!(b.text(&format!("{acme} td.used")).await, "5");
    assert!(b.text(&format!("{acme} td.left")).await.starts_with('5'));
    let keys = b.text(&format!("{acme} td:nth-child(3)")).await;
    assert!(
        keys.contains("acme-prod") && keys.contains("acme-staging"),
        "{keys}"
    );
    let globex = "#customers-table tr[data-customer=globex]";
    assert_eq!(b.text(&format!("{globex} td.used")).await, "1");
    assert!(b.text(&format!("{globex} td.left")).await.starts_with('9'));
    assert!(b.text("#customers-table").await.contains("partners"));
    b.screenshot("customers").await;
    // A key of the customer opens its own page.
    let first = b.text(&format!("{acme} a")).await;
    b.click(&format!("{acme} a")).await;
    b.find("svg.chart").await;
    assert!(b.text("#view h1").await.starts_with(&first), "{first}");
    drop(b);
    assert!(gw.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn the_dashboard_api_needs_a_session_and_changes_need_the_csrf_token() {
    let (_dir, gw, _up) = start(&util::admin_env()).await;
    let admin = format!("http://{}", gw.admin.unwrap());
    let c = client();
    let page = c.get(&format!("{admin}/dashboard"), None).await;
    assert_eq!(page.status, 200);
    // Where browsers look for an icon, without signing in.
    let icon = c.get(&format!("{admin}/favicon.ico"), None).await;
    assert_eq!(icon.status, 200);
    assert_eq!(icon.header("content-type"), Some("image/svg+xml"));
    assert!(icon.body.starts_with(b"<svg"));
    assert!(
        page.header("content-security-policy")
            .unwrap()
            .contains("default-src 'self'")
    );
    assert_eq!(
        c.get(&format!("{admin}/dashboard/api/keys"), None)
            .await
            .status,
        401
    );
    let forged = [("cookie", "tollgate_session=AKID.9999999999.00.00")];
    let r = c
        .send("GET", &format!("{admin}/dashboard/api/keys"), &forged, "")
        .await;
    assert_eq!(r.status, 401);

    let login = |secret: &'static str| {
        let body = json!({"accessKeyId": ACCESS_KEY, "secretAccessKey": secret}).to_string();
        let (c, url) = (client(), format!("{admin}/dashboard/login"));
        async move {
            c.send("POST", &url, &[("content-type", "application/json")], body)
                .await
        }
    };
    assert_eq!(login("wrong").await.status, 403);
    let ok = login(SECRET_KEY).await;
    assert_eq!(ok.status, 200);
    let set = ok.header("set-cookie").unwrap().to_string();
    for attr in [
        "HttpOnly",
        "SameSite=Strict",
        "Path=/dashboard",
        "Max-Age=43200",
    ] {
        assert!(set.contains(attr), "{set}");
    }
    assert!(!set.contains("Secure"), "plain HTTP: {set}");
    let session = set.split(';').next().unwrap().to_string();
    let csrf = ok.json()["csrf"].as_str().unwrap().to_string();
    let keys = c
        .send(
            "GET",
            &format!("{admin}/dashboard/api/keys"),
            &[("cookie", &session)],
            "",
        )
        .await;
    assert_eq!(keys.status, 200);
    let id = keys.json()["keys"][0]["id"].as_str().unwrap().to_string();
    let disable = |token: Option<String>| {
        let (c, url, session) = (
            client(),
            format!("{admin}/dashboard/api/keys/{id}/enabled"),
            session.clone(),
        );
        async move {
            let mut headers = vec![
                ("cookie", session.as_str()),
                ("content-type", "application/json"),
            ];
            if let Some(t) = &token {
                headers.push(("x-csrf-token", t.as_str()));
            }
            c.send("POST", &url, &headers, r#"{"enabled":false}"#).await
        }
    };
    assert_eq!(disable(None).await.status, 403, "no token");
    assert_eq!(
        disable(Some("00".repeat(32))).await.status,
        403,
        "a wrong token"
    );
    let done = disable(Some(csrf.clone())).await;
    assert_eq!(done.status, 200, "{:?}", done.body);
    assert_eq!(done.json()["enabled"], false);
    // The admin API itself still wants SigV4, cookie or not.
    let r = c
        .send(
            "GET",
            &format!("{admin}/apikeys"),
            &[("cookie", &session)],
            "",
        )
        .await;
    assert_eq!(r.status, 403);
    assert!(gw.terminate().success());
}

#[tokio::test(flavor = "multi_thread")]
async fn without_credentials_only_loopback_hosts_are_served() {
    let (_dir, gw, _up) = start(&[("CENTRAL_KEY", KEY)]).await;
    let addr = gw.admin.unwrap();
    let c = client();
    let url = |path: &str| format!("http://{addr}/dashboard/api/{path}");
    // A page of another origin that resolves to 127.0.0.1 (DNS rebinding) sends its own Host.
    let rebound = c
        .send("GET", &url("keys"), &[("host", "evil.example:8081")], "")
        .await;
    assert_eq!(rebound.status, 403);
    let session = c.get(&url("session"), None).await;
    assert_eq!(session.status, 200);
    assert_eq!(session.json()["login"], false);
    let csrf = session.json()["csrf"].as_str().unwrap().to_string();
    let keys = c.get(&url("keys"), None).await.json();
    let id = keys["keys"][0]["id"].as_str().unwrap().to_string();
    let path = url(&format!("keys/{id}/enabled"));
    let json = ("content-type", "application/json");
    let r = c.send("POST", &path, &[json], r#"{"enabled":false}"#).await;
    assert_eq!(r.status, 403, "a change without the token");
    let token = ("x-csrf-token", csrf.as_str());
    let r = c
        .send("POST", &path, &[json, token], r#"{"enabled":false}"#)
        .await;
    assert_eq!(r.status, 200);
    assert!(gw.terminate().success());
}

/// Serves `html` at every path of a new listener on 127.0.0.1 (an attacker's site).
async fn serve_page(html: String) -> std::net::SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let html = html.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |_req| {
                    let html = html.clone();
                    async move {
                        let mut resp = hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from(html),
                        ));
                        resp.headers_mut()
                            .insert("content-type", "text/html".parse().unwrap());
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    addr
}

/// Without credentials, a page elsewhere can neither write the admin API (a cross-site form posting
/// JSON as text/plain, the classic) nor read or write it from a name that rebinds to 127.0.0.1; the
/// CLI on the same machine still can.
#[tokio::test(flavor = "multi_thread")]
async fn without_credentials_no_web_page_drives_the_admin_api() {
    let (dir, gw, _up) = start(&[("CENTRAL_KEY", KEY)]).await;
    let admin = gw.admin.unwrap();
    let stolen = "attackerChosenKeyValue0123456789";
    // The JSON body hides in a text/plain form field: `{"name":"evil",…,"x":"=` + `"}`.
    let body_start = format!(r#"{{"name":"evil","value":"{stolen}","enabled":true,"x":""#);
    let page = format!(
        "<html><body><form id=f method=POST action='http://{admin}/apikeys' enctype='text/plain'>\
         <input type=hidden name='{}' value='\"}}'></form>\
         <script>document.getElementById('f').submit()</script></body></html>",
        body_start.replace('\'', "&#39;")
    );
    let site = serve_page(page).await;
    let shots = dir.path().join("shots");
    std::fs::create_dir_all(&shots).unwrap();
    let Some(b) = Browser::start_with(
        &shots,
        &["--host-resolver-rules=MAP rebound.test 127.0.0.1"],
    )
    .await
    else {
        return;
    };
    // Another site (localhost is not 127.0.0.1's site): the form posts and navigates.
    b.goto(&format!("http://localhost:{}/", site.port())).await;
    for _ in 0..50 {
        let url = b.call("GET", "/url", Value::Null).await;
        if url.as_str().is_some_and(|u| u.contains("/apikeys")) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shown = b.script("return document.body.innerText").await;
    assert!(
        shown.as_str().unwrap_or_default().contains("Cross-origin"),
        "the form's answer: {shown}"
    );
    // A page on a name that resolves to 127.0.0.1 reads and writes with its own Host.
    b.goto(&format!("http://rebound.test:{}/health", admin.port()))
        .await;
    let tried = b
        .script_async(&format!(
            "Promise.all([\
               fetch('/apikeys').then(r => r.status),\
               fetch('/apikeys', {{method: 'POST', headers: {{'content-type': 'application/json'}},\
                 body: JSON.stringify({{name: 'rebound', value: '{stolen}', enabled: true}})}}).then(r => r.status),\
             ]).then(done, e => done(String(e)))"
        ))
        .await;
    assert_eq!(tried, json!([403, 403]), "rebinding");
    // No key came of it: the data plane refuses the value, the keys are the config's.
    let c = client();
    let r = c.get(&gw.url("/prod/echo/a"), Some(stolen)).await;
    assert_eq!(r.status, 403);
    let keys = c.get(&format!("http://{admin}/apikeys"), None).await.json();
    let mut names: Vec<&str> = keys["item"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["name"].as_str())
        .collect();
    names.sort_unstable();
    assert_eq!(names, ["central-system", "quiet-partner"]);
    // A write that is not JSON, a cross-origin one, and a rebinding Host, without a browser too.
    let url = format!("http://{admin}/apikeys");
    let body = format!(r#"{{"name":"plain","value":"{stolen}","enabled":true}}"#);
    for (headers, status) in [
        (vec![("content-type", "text/plain")], 415),
        (vec![], 415),
        (
            vec![
                ("content-type", "application/json"),
                ("origin", "http://evil.example"),
            ],
            403,
        ),
        (
            vec![
                ("content-type", "application/json"),
                ("sec-fetch-site", "cross-site"),
            ],
            403,
        ),
        (
            vec![
                ("content-type", "application/json"),
                ("host", "rebound.test"),
            ],
            403,
        ),
    ] {
        let r = c.send("POST", &url, &headers, body.clone()).await;
        assert_eq!(r.status, status, "{headers:?}: {:?}", r.body);
        assert!(r.header("x-amzn-errortype").is_some(), "AWS's shape");
    }
    let r = c
        .send("POST", &url, &[("content-type", "application/json")], body)
        .await;
    assert_eq!(
        r.status, 201,
        "the same machine's JSON client: {:?}",
        r.body
    );
}

/// The `name=value` of the session cookie a login's answer sets.
fn session_cookie(login: &util::Reply) -> String {
    let set = login.header("set-cookie").unwrap();
    set.split(';').next().unwrap().to_string()
}

/// A dashboard login over `c`: the answer.
async fn login(c: &HttpClient, admin: &str, secret: &str) -> util::Reply {
    let body = json!({"accessKeyId": ACCESS_KEY, "secretAccessKey": secret}).to_string();
    c.send(
        "POST",
        &format!("{admin}/dashboard/login"),
        &[("content-type", "application/json")],
        body,
    )
    .await
}

/// Guessing secrets over one keep-alive connection backs off after ten failures (429 with
/// Retry-After, before any secret is compared), for logins and SigV4 alike; a sign-out ends the
/// session on the server, so a copy of the cookie is refused, after a restart too.
#[tokio::test(flavor = "multi_thread")]
async fn guessing_backs_off_and_signing_out_ends_the_session() {
    let (dir, gw, _up) = start(&util::admin_env()).await;
    let admin = format!("http://{}", gw.admin.unwrap());
    let c = client();
    // An operator's session, and a copy of its cookie kept elsewhere.
    let ok = login(&c, &admin, SECRET_KEY).await;
    assert_eq!(ok.status, 200);
    let session = session_cookie(&ok);
    let csrf = ok.json()["csrf"].as_str().unwrap().to_string();
    let keys = format!("{admin}/dashboard/api/keys");
    let get_keys = |cookie: String| {
        let (c, url) = (client(), keys.clone());
        async move {
            c.send("GET", &url, &[("cookie", cookie.as_str())], "")
                .await
                .status
        }
    };
    assert_eq!(get_keys(session.clone()).await, 200);

    let mut statuses = Vec::new();
    for _ in 0..12 {
        statuses.push(login(&c, &admin, "wrongSecret").await.status);
    }
    assert_eq!(statuses[..10], [403; 10]);
    let r = login(&c, &admin, "wrongSecret").await;
    assert_eq!(
        (r.status, r.header("x-amzn-errortype")),
        (429, Some("TooManyRequestsException"))
    );
    let wait: u64 = r.header("retry-after").unwrap().parse().unwrap();
    assert!((1..=6).contains(&wait), "{wait}");
    // Even the right secret waits now: nothing is compared while backing off.
    assert_eq!(login(&c, &admin, SECRET_KEY).await.status, 429);
    // So do signatures from the same address.
    let signed = util::AdminClient::new(gw.admin.unwrap());
    assert_eq!(signed.call("GET", "/apikeys", "").await.status, 429);

    // Sign-out: the cookie and every copy of it are over.
    let r = c
        .send(
            "POST",
            &format!("{admin}/dashboard/logout"),
            &[
                ("cookie", session.as_str()),
                ("x-csrf-token", csrf.as_str()),
            ],
            "",
        )
        .await;
    assert_eq!(r.status, 204, "{:?}", r.body);
    assert_eq!(get_keys(session.clone()).await, 401);
    assert!(gw.terminate().success());
    let gw = Gateway::start(dir.path(), &util::admin_env());
    let admin = format!("http://{}", gw.admin.unwrap());
    let keys = format!("{admin}/dashboard/api/keys");
    let r = client()
        .send("GET", &keys, &[("cookie", session.as_str())], "")
        .await;
    assert_eq!(r.status, 401, "still over after a restart");
    let again = login(&client(), &admin, SECRET_KEY).await;
    assert_eq!(again.status, 200, "a new session after the restart");
    let fresh = session_cookie(&again);
    let r = client()
        .send("GET", &keys, &[("cookie", fresh.as_str())], "")
        .await;
    assert_eq!(r.status, 200);
}
