//! What is checked is what the backend reads: methods and field names as a CGI-style backend (Flask
//! on wsgiref) reads them, over HTTP/1.1, HTTP/2 and through the decision endpoint.

use std::net::SocketAddr;

use bytes::Bytes;
use serde_json::Value;

use crate::util::{self, CgiBackend, Gateway, KEY, client, raw_exchange, status_of};

/// A gateway in front of `backend`: `/shop/orders` public for any method but keyed for `DELETE`,
/// `/open/{proxy+}` public; a decision endpoint for nginx; `extra` at the config's top level.
fn gateway(backend: &CgiBackend, extra: &str) -> (tempfile::TempDir, Gateway) {
    let dir = tempfile::tempdir().unwrap();
    let up = format!("http://{}", backend.addr);
    let yaml = format!(
        "listen: 127.0.0.1:0\nverify: {{ listen: 127.0.0.1:0, proxy: nginx }}\n{extra}\n\
         store: {{ sqlite: ./tollgate.db }}\napis:\n  - id: warranty\n    \
         stages: [ {{ name: prod }} ]\n    routes:\n      \
         - {{ path: /shop/orders, method: ANY, upstream: \"{up}\" }}\n      \
         - {{ path: /shop/orders, method: DELETE, apiKeyRequired: true, upstream: \"{up}\" }}\n      \
         - {{ path: \"/open/{{proxy+}}\", method: ANY, upstream: \"{up}\" }}\n{}",
        util::ONE_PLAN
    );
    util::write_config(dir.path(), &yaml);
    let gw = Gateway::start(dir.path(), &[("CENTRAL_KEY", KEY)]);
    (dir, gw)
}

/// The backend's JSON answer in a raw HTTP/1.1 exchange.
fn backend_saw(raw: &str) -> Value {
    let body = raw.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|_| panic!("not the backend's answer: {raw}"))
}

/// An HTTP/2 connection with prior knowledge to `addr`.
async fn h2c(addr: SocketAddr) -> h2::client::SendRequest<Bytes> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, conn) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(conn);
    client
}

/// One bodiless request on a new stream: the status and the body.
async fn h2_request(
    client: &mut h2::client::SendRequest<Bytes>,
    req: http::Request<()>,
) -> (u16, Bytes) {
    *client = client.clone().ready().await.unwrap();
    let (resp, _) = client.send_request(req, true).unwrap();
    let (parts, mut body) = resp.await.unwrap().into_parts();
    let mut all = Vec::new();
    while let Some(chunk) = body.data().await {
        all.extend_from_slice(&chunk.unwrap());
    }
    (parts.status.as_u16(), all.into())
}

#[tokio::test(flavor = "multi_thread")]
async fn a_lower_case_method_does_not_walk_past_a_keyed_route() {
    let Some(flask) = CgiBackend::start() else {
        return;
    };
    let (_dir, gw) = gateway(&flask, "");
    // What the attack relies on: Flask reads `delete` as DELETE.
    let direct = raw_exchange(
        flask.addr,
        b"delete /shop/orders HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(backend_saw(&direct)["method"], "DELETE");
    // Through the gateway: DELETE needs the key; any spelling of it other than DELETE is refused.
    let ask = |method: &str, key: Option<&str>| {
        let key = key.map_or(String::new(), |k| format!("x-api-key: {k}\r\n"));
        raw_exchange(
            gw.addr,
            format!(
                "{method} /prod/shop/orders HTTP/1.1\r\nHost: gw\r\n{key}Connection: close\r\n\r\n"
            )
            .as_bytes(),
        )
    };
    assert_eq!(status_of(&ask("DELETE", None)), Some(403));
    let keyed = ask("DELETE", Some(KEY));
    assert_eq!(backend_saw(&keyed)["method"], "DELETE");
    assert_eq!(backend_saw(&ask("GET", None))["method"], "GET");
    for method in ["delete", "Delete", "dELETE", "get", "post", "Patch"] {
        let r = ask(method, None);
        assert_eq!(status_of(&r), Some(400), "{method}: {r}");
        assert!(r.contains("upper case"), "{method}: {r}");
    }
    // Over HTTP/2 the same.
    let mut h2 = h2c(gw.addr).await;
    for (method, want) in [("delete", 400), ("DELETE", 403), ("GET", 200)] {
        let req = http::Request::builder()
            .method(http::Method::from_bytes(method.as_bytes()).unwrap())
            .uri("http://gw/prod/shop/orders")
            .body(())
            .unwrap();
        let (status, body) = h2_request(&mut h2, req).await;
        assert_eq!(status, want, "{method} over HTTP/2: {body:?}");
    }
    // In the decision endpoint: nginx hears 403 with the real status.
    let r = client()
        .send(
            "GET",
            &format!("http://{}/auth", gw.verify_addr()),
            &[
                ("x-original-uri", "/prod/shop/orders"),
                ("x-original-method", "delete"),
            ],
            "",
        )
        .await;
    assert_eq!(
        (r.status, r.header("x-tollgate-status")),
        (403, Some("400"))
    );
}

/// The fields a client sends as `_` twins of those the gateway drops or sets.
const TWINS: [(&str, &str); 8] = [
    ("X_Tollgate_Subject", "partner-a"),
    ("X_Tollgate_Key_Id", "someone-else"),
    ("X_HTTP_Method_Override", "DELETE"),
    ("X_Original_URL", "/prod/admin"),
    ("X_Real_IP", "10.9.9.9"),
    ("X_Forwarded_Host", "evil.example"),
    ("X_Forwarded_Proto", "https"),
    ("X_API_KEY", "notTheCheckedKey0123456789"),
];

/// What the backend read of a public request through the gateway at `addr` carrying all of
/// [`TWINS`] and `X_Custom: 1`.
fn twins_through(addr: SocketAddr) -> Value {
    let twins: String = TWINS.iter().map(|(n, v)| format!("{n}: {v}\r\n")).collect();
    let head = format!(
        "GET /prod/open/x HTTP/1.1\r\nHost: gw\r\n{twins}X_Custom: 1\r\nConnection: close\r\n\r\n"
    );
    backend_saw(&raw_exchange(addr, head.as_bytes()))
}

/// Asserts that the backend saw none of [`TWINS`]' values under any name.
fn saw_no_twin(saw: &Value, how: &str) {
    let headers = saw["headers"].as_object().unwrap();
    for (name, value) in TWINS {
        assert!(
            headers
                .values()
                .all(|v| v.as_str().is_none_or(|v| !v.contains(value))),
            "{how}: {name} reached the backend: {saw}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn underscore_twins_never_reach_a_cgi_backend() {
    let Some(flask) = CgiBackend::start() else {
        return;
    };
    // What the attack relies on: wsgiref hands Flask `X_Tollgate_Subject` as `X-Tollgate-Subject`.
    let direct = raw_exchange(
        flask.addr,
        b"GET /open/x HTTP/1.1\r\nHost: b\r\nX_Tollgate_Subject: partner-a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(
        backend_saw(&direct)["headers"]["x-tollgate-subject"],
        "partner-a"
    );

    let (_dir, gw) = gateway(&flask, "");
    let saw = twins_through(gw.addr);
    saw_no_twin(&saw, "HTTP/1.1");
    assert!(
        saw["headers"].get("x-custom").is_none(),
        "dropped by default: {saw}"
    );
    assert_eq!(saw["headers"]["x-forwarded-proto"], "http");

    let mut h2 = h2c(gw.addr).await;
    let mut req = http::Request::get("http://gw/prod/open/x");
    for (name, value) in TWINS {
        req = req.header(name.to_ascii_lowercase(), value);
    }
    let (status, body) = h2_request(&mut h2, req.body(()).unwrap()).await;
    assert_eq!(status, 200);
    saw_no_twin(&serde_json::from_slice(&body).unwrap(), "HTTP/2");

    // The decision endpoint cannot drop a field the proxy forwards: it refuses the request.
    let verify = format!("http://{}/auth", gw.verify_addr());
    for (name, value) in TWINS {
        let r = client()
            .send(
                "GET",
                &verify,
                &[
                    ("x-original-uri", "/prod/open/x"),
                    ("x-original-method", "GET"),
                    (name, value),
                ],
                "",
            )
            .await;
        assert_eq!(
            (r.status, r.header("x-tollgate-status")),
            (403, Some("400")),
            "{name}"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn underscores_in_headers_keeps_other_names_but_never_twins() {
    let Some(flask) = CgiBackend::start() else {
        return;
    };
    let (_dir, gw) = gateway(&flask, "underscoresInHeaders: true");
    let saw = twins_through(gw.addr);
    saw_no_twin(&saw, "underscoresInHeaders");
    assert_eq!(saw["headers"]["x-custom"], "1", "{saw}");
    let r = client()
        .send(
            "GET",
            &format!("http://{}/auth", gw.verify_addr()),
            &[
                ("x-original-uri", "/prod/open/x"),
                ("x-original-method", "GET"),
                ("X_Custom", "1"),
            ],
            "",
        )
        .await;
    assert_eq!(r.status, 200, "{:?}", r.header("x-tollgate-message"));
}
