use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio::io::AsyncWriteExt as _;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::util::{self, Gateway, KEY};

type Issuer = CertifiedIssuer<'static, KeyPair>;

pub(crate) fn ca(name: &str) -> Issuer {
    let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, name);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    CertifiedIssuer::self_signed(p, KeyPair::generate().unwrap()).unwrap()
}

/// A certificate for `names` signed by `ca`: (PEM, key PEM, DER).
fn leaf(
    ca: &Issuer,
    names: &[&str],
    usage: ExtendedKeyUsagePurpose,
) -> (String, String, CertificateDer<'static>) {
    let mut p =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    p.distinguished_name.push(DnType::CommonName, names[0]);
    p.extended_key_usages = vec![usage];
    let key = KeyPair::generate().unwrap();
    let cert = p.signed_by(&key, ca).unwrap();
    (cert.pem(), key.serialize_pem(), cert.der().clone())
}

/// Writes a server certificate for `names` signed by `ca` as `<name>.crt`/`<name>.key`; its DER.
pub(crate) fn server_cert(
    dir: &Path,
    name: &str,
    ca: &Issuer,
    names: &[&str],
) -> CertificateDer<'static> {
    let (cert, key, der) = leaf(ca, names, ExtendedKeyUsagePurpose::ServerAuth);
    std::fs::write(dir.join(format!("{name}.crt")), cert).unwrap();
    std::fs::write(dir.join(format!("{name}.key")), key).unwrap();
    der
}

/// A gateway on HTTPS only, in front of a real upstream, with `tls_extra` added to its `tls:` block
/// (`gw.addr` is the HTTPS listener's).
async fn start(dir: &Path, tls_extra: &str, top_extra: &str) -> (Gateway, util::Upstream) {
    start_on(dir, tls_extra, top_extra, false).await
}

/// [`start`], also on plain HTTP when `plain` (then `gw.addr` is the plain listener's, `gw.tls` the
/// HTTPS one's).
async fn start_on(
    dir: &Path,
    tls_extra: &str,
    top_extra: &str,
    plain: bool,
) -> (Gateway, util::Upstream) {
    let up = util::upstream().await;
    let routes = format!(
        "      - {{ path: \"/echo/{{rest+}}\", method: ANY, apiKeyRequired: true, upstream: \"http://{}\" }}\n",
        up.addr
    );
    let yaml = util::config_with_routes(&routes, "").replacen(
        "listen: 127.0.0.1:0\n",
        &format!(
            "{}tls:\n  listen: 127.0.0.1:0\n  certificates:\n    - {{ cert: api.crt, key: api.key }}\n    - {{ cert: partner.crt, key: partner.key }}\n{tls_extra}{top_extra}",
            if plain { "listen: 127.0.0.1:0\n" } else { "" }
        ),
        1,
    );
    util::write_config(dir, &yaml);
    let gw = if plain {
        Gateway::start(dir, &util::admin_env())
    } else {
        Gateway::start_tls(dir, &util::admin_env())
    };
    (gw, up)
}

/// A TLS client trusting `roots`, offering `client` (chain and key PEM) when given.
pub(crate) fn connector(
    roots: &[&CertificateDer<'static>],
    client: Option<(&str, &str)>,
) -> TlsConnector {
    TlsConnector::from(Arc::new(client_config(roots, client)))
}

/// The settings of [`connector`].
pub(crate) fn client_config(
    roots: &[&CertificateDer<'static>],
    client: Option<(&str, &str)>,
) -> rustls::ClientConfig {
    let mut store = rustls::RootCertStore::empty();
    for r in roots {
        store.add((*r).clone()).unwrap();
    }
    let builder = rustls::ClientConfig::builder_with_provider(tollgate_gateway::tls::provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(store);
    match client {
        None => builder.with_no_client_auth(),
        Some((cert, key)) => {
            use rustls::pki_types::pem::PemObject as _;
            let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
            let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
            builder.with_client_auth_cert(chain, key).unwrap()
        }
    }
}

/// A handshake with `addr` as `server_name`: the stream and the leaf certificate served.
async fn handshake(
    connector: &TlsConnector,
    addr: SocketAddr,
    server_name: &str,
) -> std::io::Result<(
    tokio_rustls::client::TlsStream<TcpStream>,
    CertificateDer<'static>,
)> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(server_name.to_string()).unwrap();
    let tls = connector.connect(name, tcp).await?;
    let leaf = tls.get_ref().1.peer_certificates().unwrap()[0].clone();
    Ok((tls, leaf))
}

/// An HTTP/1.1 client on one connection, plain or TLS (kept alive across requests).
async fn http_over<T>(io: T) -> hyper::client::conn::http1::SendRequest<Full<Bytes>>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// GET `path` with the key: status and body.
async fn get(
    sender: &mut hyper::client::conn::http1::SendRequest<Full<Bytes>>,
    host: &str,
    path: &str,
) -> Result<(u16, String), hyper::Error> {
    let req = hyper::Request::get(path)
        .header("host", host)
        .header("x-api-key", KEY)
        .body(Full::new(Bytes::new()))
        .unwrap();
    sender.ready().await?;
    let resp = sender.send_request(req).await?;
    let status = resp.status().as_u16();
    let body = resp.into_body().collect().await?.to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

pub(crate) fn curl(args: &[&str]) -> (Option<i32>, String) {
    let out = Command::new("curl")
        .args(["-s", "-o", "-", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl is installed");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn curl_over_https_gets_the_same_pipeline() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = ca("test CA");
    server_cert(dir.path(), "api", &issuer, &["api.test", "127.0.0.1"]);
    server_cert(dir.path(), "partner", &issuer, &["partner.test"]);
    std::fs::write(dir.path().join("ca.pem"), issuer.pem()).unwrap();
    let admin = "admin: { listen: 127.0.0.1:0 }\n";
    let (gw, _up) = start_on(dir.path(), "", admin, true).await;
    let port = gw.tls.unwrap().port();
    let resolve = format!("api.test:{port}:127.0.0.1");
    let url = format!("https://api.test:{port}/prod/echo/a");
    let key = format!("x-api-key: {KEY}");
    let cacert = dir.path().join("ca.pem");
    let cacert = cacert.to_str().unwrap();
    let base = ["--cacert", cacert, "--resolve", resolve.as_str()];

    let (code, out) = curl(&[&base[..], &["-H", key.as_str(), url.as_str()]].concat());
    assert_eq!(code, Some(0), "{out}");
    assert!(out.ends_with("\n200"), "{out}");
    assert!(out.contains("\"x-forwarded-proto\":\"https\""), "{out}");
    // The whole pipeline: no key, 403 with AWS's body.
    let (_, out) = curl(&[&base[..], &[url.as_str()]].concat());
    assert!(out.ends_with("{\"message\":\"Forbidden\"}\n403"), "{out}");
    // TLS 1.3, and 1.2 (the default minimum); nothing older.
    let (code, out) = curl(&[&base[..], &["--tlsv1.3", "-H", key.as_str(), url.as_str()]].concat());
    assert_eq!((code, out.ends_with("\n200")), (Some(0), true), "{out}");
    let (code, out) = curl(
        &[
            &base[..],
            &[
                "--tlsv1.2",
                "--tls-max",
                "1.2",
                "-H",
                key.as_str(),
                url.as_str(),
            ],
        ]
        .concat(),
    );
    assert_eq!((code, out.ends_with("\n200")), (Some(0), true), "{out}");
    let (code, _) = curl(&[&base[..], &["--tlsv1", "--tls-max", "1.1", url.as_str()]].concat());
    assert_eq!(code, Some(35), "TLS 1.1 refused in the handshake");
    // The server's cipher order, not the client's: ChaCha20 listed first, AES-256-GCM chosen.
    let chosen = Command::new("curl")
        .args(base)
        .args(["-sv", "-o", "/dev/null", "--tls-max", "1.2", "--ciphers"])
        .arg("ECDHE-ECDSA-CHACHA20-POLY1305:ECDHE-ECDSA-AES256-GCM-SHA384")
        .arg(&url)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&chosen.stderr);
    assert!(said.contains("/ ECDHE-ECDSA-AES256-GCM-SHA384"), "{said}");
    // Not plain HTTP on the TLS port; the plain listener beside it says so upstream.
    let (code, _) = curl(&[format!("http://127.0.0.1:{port}/prod/echo/a").as_str()]);
    assert_ne!(code, Some(0));
    let (_, out) = curl(&["-H", key.as_str(), gw.url("/prod/echo/a").as_str()]);
    assert!(out.contains("\"x-forwarded-proto\":\"http\""), "{out}");
    // curl speaks HTTP/2 over TLS when it can; HTTP/1.1 too, and the metrics tell the three apart.
    let (code, out) = curl(&[&base[..], &["--http1.1", "-H", key.as_str(), url.as_str()]].concat());
    assert_eq!((code, out.ends_with("\n200")), (Some(0), true), "{out}");
    let text = gw.metrics().await;
    for (how, n) in [
        (r#"url_scheme="https",network_protocol_version="1.1""#, 1),
        (r#"url_scheme="https",network_protocol_version="2""#, 3),
        (r#"url_scheme="http",network_protocol_version="1.1""#, 1),
    ] {
        let series = format!(
            r#"tollgate_request_duration_seconds_count{{api="warranty",stage="prod",http_route="/echo/{{rest+}}",http_request_method="GET",http_response_status_code="200",{how}}} {n}"#
        );
        assert!(text.contains(&series), "{series}: {text}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn sni_picks_the_certificate_and_reloads_keep_open_connections() {
    let dir = tempfile::tempdir().unwrap();
    let first = ca("first CA");
    let api = server_cert(dir.path(), "api", &first, &["api.test", "127.0.0.1"]);
    let partner = server_cert(dir.path(), "partner", &first, &["partner.test"]);
    let (gw, _up) = start(dir.path(), "", "").await;
    let trusts_first = connector(&[first.der()], None);

    let (_, served) = handshake(&trusts_first, gw.addr, "partner.test")
        .await
        .unwrap();
    assert_eq!(served, partner, "SNI partner.test");
    let (_, served) = handshake(&trusts_first, gw.addr, "api.test").await.unwrap();
    assert_eq!(served, api, "SNI api.test");
    // No SNI (an IP address): the first certificate.
    let (open, served) = handshake(&trusts_first, gw.addr, "127.0.0.1")
        .await
        .unwrap();
    assert_eq!(served, api, "the default");
    let mut open = http_over(open).await;
    assert_eq!(
        get(&mut open, "api.test", "/prod/echo/a").await.unwrap().0,
        200
    );

    // SIGHUP after the files were replaced: new handshakes get the new certificate.
    let second = ca("second CA");
    let renewed = server_cert(dir.path(), "api", &second, &["api.test", "127.0.0.1"]);
    let trusts_second = connector(&[second.der()], None);
    Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status()
        .unwrap();
    let served = eventually(|| handshake(&trusts_second, gw.addr, "api.test")).await;
    assert_eq!(served, renewed);
    assert!(handshake(&trusts_first, gw.addr, "api.test").await.is_err());
    let started = Instant::now();
    while !gw.stderr().contains("\"signalled\":true") {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "SIGHUP did not reload: {}",
            gw.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // The connection opened before carries on.
    assert_eq!(
        get(&mut open, "api.test", "/prod/echo/b").await.unwrap().0,
        200
    );

    // Replaced on disk without a signal, as cert-manager and certbot do: picked up by itself.
    let third = ca("third CA");
    let again = server_cert(dir.path(), "api", &third, &["api.test", "127.0.0.1"]);
    let trusts_third = connector(&[third.der()], None);
    let served = eventually(|| handshake(&trusts_third, gw.addr, "api.test")).await;
    assert_eq!(served, again);

    // A broken replacement: one clear error, and the certificate in service stays.
    std::fs::write(dir.path().join("api.crt"), "not a certificate").unwrap();
    Command::new("kill")
        .args(["-HUP", &gw.child.id().to_string()])
        .status()
        .unwrap();
    let started = Instant::now();
    while !gw.stderr().contains("TLS certificates not reloaded") {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{}",
            gw.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(gw.stderr().contains("api.crt"), "{}", gw.stderr());
    let (tls, served) = handshake(&trusts_third, gw.addr, "api.test").await.unwrap();
    assert_eq!(served, again);
    let mut sender = http_over(tls).await;
    assert_eq!(
        get(&mut sender, "api.test", "/prod/echo/c")
            .await
            .unwrap()
            .0,
        200
    );
}

/// Retries `attempt` until it succeeds (a reload is not instant), at most 10 s.
async fn eventually<F, Fut, T, S>(attempt: F) -> CertificateDer<'static>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = std::io::Result<(T, S)>>,
    S: Into<CertificateDer<'static>>,
{
    let started = Instant::now();
    loop {
        if let Ok((_, served)) = attempt().await {
            return served.into();
        }
        assert!(started.elapsed() < Duration::from_secs(10), "never served");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mutual_tls_requires_a_client_certificate_from_the_ca() {
    let dir = tempfile::tempdir().unwrap();
    let servers = ca("server CA");
    server_cert(dir.path(), "api", &servers, &["api.test"]);
    server_cert(dir.path(), "partner", &servers, &["partner.test"]);
    let clients = ca("partners CA");
    std::fs::write(dir.path().join("partners-ca.pem"), clients.pem()).unwrap();
    let (gw, _up) = start(
        dir.path(),
        "  clientAuth: { ca: partners-ca.pem }\n",
        "accessLog: true\n",
    )
    .await;

    // Without a certificate: the handshake fails (under TLS 1.3 the client learns it on its
    // first read).
    let anonymous = connector(&[servers.der()], None);
    let refused = match handshake(&anonymous, gw.addr, "api.test").await {
        Err(_) => true,
        Ok((tls, _)) => get(&mut http_over(tls).await, "api.test", "/prod/echo/a")
            .await
            .is_err(),
    };
    assert!(refused, "a client without a certificate got an answer");
    // With one from another CA: refused too.
    let stranger = ca("stranger CA");
    let (cert, key, _) = leaf(
        &stranger,
        &["central.partner"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let outsider = connector(&[servers.der()], Some((&cert, &key)));
    let refused = match handshake(&outsider, gw.addr, "api.test").await {
        Err(_) => true,
        Ok((tls, _)) => get(&mut http_over(tls).await, "api.test", "/prod/echo/a")
            .await
            .is_err(),
    };
    assert!(refused, "a certificate from another CA got an answer");
    // With one from the CA: served, and the access log says who and how.
    let (cert, key, _) = leaf(
        &clients,
        &["central.partner"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let partner = connector(&[servers.der()], Some((&cert, &key)));
    let (tls, _) = handshake(&partner, gw.addr, "api.test").await.unwrap();
    let (status, _) = get(&mut http_over(tls).await, "api.test", "/prod/echo/a")
        .await
        .unwrap();
    assert_eq!(status, 200);
    let started = Instant::now();
    while !gw.stderr().contains("CN=central.partner") {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{}",
            gw.stderr()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        gw.stderr().contains("\"tlsVersion\":\"TLSv1.3\""),
        "{}",
        gw.stderr()
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn garbage_and_stalled_handshakes_do_not_hold_up_others() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = ca("test CA");
    server_cert(dir.path(), "api", &issuer, &["api.test"]);
    server_cert(dir.path(), "partner", &issuer, &["partner.test"]);
    let (gw, _up) = start(dir.path(), "", "headerTimeout: 1s\n").await;
    // A client that opens and says nothing, and one that sends a malformed TLS record.
    let _stalled = TcpStream::connect(gw.addr).await.unwrap();
    let mut garbage = TcpStream::connect(gw.addr).await.unwrap();
    garbage
        .write_all(b"\x16\x03\x01\x00\x05hello world, not a handshake\r\n\r\n")
        .await
        .unwrap();
    let client = connector(&[issuer.der()], None);
    for _ in 0..3 {
        let (tls, _) = handshake(&client, gw.addr, "api.test").await.unwrap();
        let (status, _) = get(&mut http_over(tls).await, "api.test", "/prod/echo/a")
            .await
            .unwrap();
        assert_eq!(status, 200);
    }
    // The garbage connection was closed; the stalled one is, after the head timeout.
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        use tokio::io::AsyncReadExt as _;
        loop {
            match garbage.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(read.is_ok(), "the malformed connection stayed open");
}

#[test]
fn check_names_the_file_at_fault() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = ca("test CA");
    server_cert(dir.path(), "api", &issuer, &["api.test"]);
    server_cert(dir.path(), "partner", &issuer, &["partner.test"]);
    // Expired.
    let mut p = CertificateParams::new(vec!["old.test".to_string()]).unwrap();
    p.not_before = rcgen::date_time_ymd(2020, 1, 1);
    p.not_after = rcgen::date_time_ymd(2021, 1, 1);
    let key = KeyPair::generate().unwrap();
    std::fs::write(
        dir.path().join("old.crt"),
        p.signed_by(&key, &issuer).unwrap().pem(),
    )
    .unwrap();
    std::fs::write(dir.path().join("old.key"), key.serialize_pem()).unwrap();
    let check = |certificates: &str, extra: &str| {
        let yaml = format!(
            "tls:\n  listen: 127.0.0.1:0\n  certificates:\n{certificates}{extra}apis: []\n"
        );
        std::fs::write(dir.path().join("tollgate.yaml"), yaml).unwrap();
        let out = Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .args(["check", "--config", "tollgate.yaml"])
            .current_dir(dir.path())
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, out) = check("    - { cert: api.crt, key: api.key }\n", "");
    assert_eq!(code, Some(0), "{out}");
    let cases = [
        (
            "    - { cert: api.crt, key: partner.key }\n",
            "",
            "tls.certificates[0].key: partner.key: this key does not belong to the certificate in api.crt",
        ),
        (
            "    - { cert: api.crt, key: api.key }\n    - { cert: old.crt, key: old.key }\n",
            "",
            "tls.certificates[1].cert: old.crt: the certificate expired on",
        ),
        (
            "    - { cert: missing.crt, key: api.key }\n",
            "",
            "tls.certificates[0].cert: missing.crt: no certificate read",
        ),
        (
            "    - { cert: api.crt, key: api.key }\n",
            "  minVersion: \"1.1\"\n",
            "tls.minVersion: \"1.1\" is not one of 1.2, 1.3",
        ),
        (
            "    - { cert: api.crt, key: api.key }\n",
            "  clientAuth: { ca: nowhere.pem }\n",
            "tls.clientAuth.ca: nowhere.pem",
        ),
    ];
    for (certificates, extra, expect) in cases {
        let (code, out) = check(certificates, extra);
        assert_eq!(code, Some(64), "{out}");
        assert!(out.contains(expect), "{expect:?} not in {out:?}");
        assert!(out.contains("tollgate.yaml:"), "{out}");
    }
}

/// An HTTPS upstream on 127.0.0.1 (the echo server of `util`), its certificate from `issuer`; with
/// `clients`, it requires a client certificate from that CA. The counter counts its handshakes.
async fn https_upstream(
    issuer: &Issuer,
    clients: Option<&Issuer>,
) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
    use rustls::pki_types::pem::PemObject as _;
    let (cert, key, _) = leaf(
        issuer,
        &["localhost", "127.0.0.1"],
        ExtendedKeyUsagePurpose::ServerAuth,
    );
    let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let provider = tollgate_gateway::tls::provider();
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match clients {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots.add(ca.der().clone()).unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = Arc::new(builder.with_single_cert(chain, key).unwrap());
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let handshakes = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let counter = handshakes.clone();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            let counter = counter.clone();
            tokio::spawn(async move {
                let Ok(tls) = acceptor.accept(tcp).await else {
                    return;
                };
                counter.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let service = hyper::service::service_fn(util::upstream_handle);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(tls), service)
                    .await;
            });
        }
    });
    (addr, handshakes)
}

#[tokio::test(flavor = "multi_thread")]
async fn https_upstreams_are_verified_and_may_take_a_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let internal = ca("internal CA");
    let other = ca("other CA");
    let upstream_clients = ca("gateway clients CA");
    std::fs::write(dir.path().join("internal-ca.pem"), internal.pem()).unwrap();
    std::fs::write(dir.path().join("other-ca.pem"), other.pem()).unwrap();
    let (cert, key, _) = leaf(
        &upstream_clients,
        &["tollgate"],
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    std::fs::write(dir.path().join("client.crt"), cert).unwrap();
    std::fs::write(dir.path().join("client.key"), key).unwrap();
    let (plain_tls, handshakes) = https_upstream(&internal, None).await;
    let (mtls, _) = https_upstream(&internal, Some(&upstream_clients)).await;

    let route = |path: &str, upstream: String, tls: &str| {
        format!(
            "      - {{ path: \"/{path}/{{rest+}}\", method: ANY, apiKeyRequired: true, upstream: \"{upstream}\"{tls} }}\n"
        )
    };
    let routes = [
        route(
            "verified",
            format!("https://localhost:{}", plain_tls.port()),
            "",
        ),
        route(
            "wrong-ca",
            format!("https://localhost:{}", plain_tls.port()),
            ", upstreamTls: { ca: other-ca.pem }",
        ),
        route(
            "skip",
            format!("https://localhost:{}", plain_tls.port()),
            ", upstreamTls: { insecureSkipVerify: true }",
        ),
        route(
            "mtls",
            format!("https://127.0.0.1:{}/base", mtls.port()),
            ", upstreamTls: { ca: internal-ca.pem, cert: client.crt, key: client.key }",
        ),
        route(
            "mtls-without",
            format!("https://127.0.0.1:{}", mtls.port()),
            "",
        ),
    ]
    .concat();
    let yaml = format!(
        "{}upstreamTls: {{ ca: internal-ca.pem }}\n",
        util::config_with_routes(&routes, "")
    );
    util::write_config(dir.path(), &yaml);
    let gw = Gateway::start(dir.path(), &util::admin_env());
    assert!(
        gw.stderr().contains("insecureSkipVerify"),
        "{}",
        gw.stderr()
    );
    let c = util::client();

    // Verified against the file's CA, over one kept-alive upstream connection.
    // One client connection, so that its upstream connection is the one to reuse.
    let mut one = http_over(TcpStream::connect(gw.addr).await.unwrap()).await;
    for _ in 0..3 {
        let (status, body) = get(&mut one, "gw", "/prod/verified/a?x=1").await.unwrap();
        assert_eq!(status, 200, "{body}");
        let echo: serde_json::Value = serde_json::from_str(&body).unwrap();
        assert_eq!(echo["uri"], "/verified/a?x=1");
        assert_eq!(echo["headers"]["x-forwarded-proto"], "http");
    }
    assert_eq!(
        handshakes.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "one kept-alive TLS connection upstream"
    );
    // A certificate from another CA: 502 with AWS's body, and the log says why.
    let r = c.get(&gw.url("/prod/wrong-ca/a"), Some(KEY)).await;
    assert_eq!(r.status, 502);
    assert_eq!(r.json()["message"], "Internal server error");
    assert!(
        gw.stderr().contains("upstream connection failed"),
        "{}",
        gw.stderr()
    );
    assert!(gw.stderr().contains("UnknownIssuer"), "{}", gw.stderr());
    // Unverified, when asked for.
    assert_eq!(c.get(&gw.url("/prod/skip/a"), Some(KEY)).await.status, 200);
    // An upstream that requires a client certificate: with one, 200 (under the URL's base path);
    // without, 502.
    let r = c.get(&gw.url("/prod/mtls/a"), Some(KEY)).await;
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["uri"], "/base/mtls/a");
    assert_eq!(
        c.get(&gw.url("/prod/mtls-without/a"), Some(KEY))
            .await
            .status,
        502
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn the_admin_api_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let issuer = ca("admin CA");
    server_cert(dir.path(), "admin", &issuer, &["admin.test", "127.0.0.1"]);
    server_cert(dir.path(), "api", &issuer, &["api.test"]);
    server_cert(dir.path(), "partner", &issuer, &["partner.test"]);
    std::fs::write(dir.path().join("ca.pem"), issuer.pem()).unwrap();
    let (gw, _up) = start(
        dir.path(),
        "",
        "admin: { listen: 127.0.0.1:0, tls: { certificates: [ { cert: admin.crt, key: admin.key } ], minVersion: \"1.3\" } }\n",
    )
    .await;
    // The tollgate CLI over HTTPS: trusting the CA in --ca-bundle (the system's roots do not).
    let cli = |extra: &[&str], signed: bool| {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
        cmd.args(["keys", "list", "--endpoint"])
            .arg(format!("https://127.0.0.1:{}", gw.admin.unwrap().port()))
            .args(extra)
            .env_remove("TOLLGATE_ADMIN_ACCESS_KEY_ID")
            .env_remove("TOLLGATE_ADMIN_SECRET_ACCESS_KEY");
        if signed {
            cmd.env("TOLLGATE_ADMIN_ACCESS_KEY_ID", util::ACCESS_KEY)
                .env("TOLLGATE_ADMIN_SECRET_ACCESS_KEY", util::SECRET_KEY);
        }
        let out = cmd.output().unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    };
    let ca_bundle = dir.path().join("ca.pem");
    let ca_bundle = ca_bundle.to_str().unwrap();
    let (ok, out) = cli(&["--ca-bundle", ca_bundle], true);
    assert!(ok && out.contains("cent…(32)"), "{out}");
    let (ok, out) = cli(&[], true);
    assert!(!ok && out.contains("cannot reach the admin API"), "{out}");
    let (ok, out) = cli(&["--ca-bundle", ca_bundle], false);
    assert!(
        !ok && out
            .contains("set TOLLGATE_ADMIN_ACCESS_KEY_ID and TOLLGATE_ADMIN_SECRET_ACCESS_KEY"),
        "{out}"
    );
    let admin = gw.admin.unwrap();
    let resolve = format!("admin.test:{}:127.0.0.1", admin.port());
    let cacert = dir.path().join("ca.pem");
    let cacert = cacert.to_str().unwrap();
    let url = |path: &str| format!("https://admin.test:{}{path}", admin.port());
    let (code, out) = curl(&["--cacert", cacert, "--resolve", &resolve, &url("/health")]);
    assert_eq!(code, Some(0), "{out}");
    assert!(
        out.contains("\"status\":\"ok\"") && out.ends_with("\n200"),
        "{out}"
    );
    // Signed operations work over it as over plain HTTP.
    let user = format!("{}:{}", util::ACCESS_KEY, util::SECRET_KEY);
    let (_, out) = curl(&[
        "--cacert",
        cacert,
        "--resolve",
        &resolve,
        "--aws-sigv4",
        "aws:amz:us-east-1:apigateway",
        "--user",
        &user,
        &url("/apikeys"),
    ]);
    assert!(out.ends_with("\n200") && out.contains("\"item\""), "{out}");
    // Plain HTTP, and TLS 1.2 (below this listener's minimum), are refused.
    let (code, _) = curl(&[&format!("http://127.0.0.1:{}/health", admin.port())]);
    assert_ne!(code, Some(0));
    let (code, _) = curl(&[
        "--cacert",
        cacert,
        "--resolve",
        &resolve,
        "--tls-max",
        "1.2",
        &url("/health"),
    ]);
    assert_eq!(code, Some(35));
}
