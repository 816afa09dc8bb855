//! TLS at the edge, on rustls (its `ring` provider: it builds in a fraction of aws-lc-rs's time on
//! two cores and needs no cmake). Certificates are read from PEM files and checked before anything
//! binds (readable, the key matching the certificate, not expired), chosen by SNI (the first is the
//! default), and replaced in place by [`Certificates::reload`]: new handshakes get the new ones, open
//! connections carry on, and a broken replacement keeps the old ones in service.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate, X509Name};

/// A certificate chain and its private key, as PEM files.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertFiles {
    /// The chain, leaf first.
    pub cert: PathBuf,
    /// The leaf's private key (PKCS#8, RSA or SEC1).
    pub key: PathBuf,
}

/// The oldest TLS version accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum MinVersion {
    /// TLS 1.2 and 1.3.
    #[default]
    Tls12,
    /// TLS 1.3 only.
    Tls13,
}

impl MinVersion {
    /// The names `minVersion` takes, each with what it names.
    pub const NAMES: [(&str, Self); 2] = [("1.2", Self::Tls12), ("1.3", Self::Tls13)];
}

/// Client certificates (mTLS): the CA they must chain to, and whether one is required.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientAuth {
    /// PEM file of the accepted CA certificates.
    pub ca: PathBuf,
    /// Whether a client without a certificate fails the handshake.
    pub required: bool,
}

/// How a listener terminates TLS, besides its certificates.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// The oldest version accepted.
    pub min_version: MinVersion,
    /// Client certificates, when asked for.
    pub client_auth: Option<ClientAuth>,
    /// Whether ALPN offers HTTP/2 (before HTTP/1.1).
    pub http2: bool,
}

/// A TLS file that cannot be used, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}: {message}", file.display())]
pub struct TlsError {
    /// The file at fault.
    pub file: PathBuf,
    /// What is wrong with it.
    pub message: String,
}

fn tls_err(file: &Path, message: impl Into<String>) -> TlsError {
    TlsError {
        file: file.to_path_buf(),
        message: message.into(),
    }
}

/// The crypto every TLS configuration of the gateway uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// One certificate in service: the names it answers for and its chain and key.
struct Served {
    /// DNS names, lower case; `*.example.com` matches one label.
    names: Vec<String>,
    key: Arc<CertifiedKey>,
}

/// The certificates a listener serves, chosen by SNI, replaceable while it runs.
pub struct Certificates {
    files: Vec<CertFiles>,
    served: ArcSwap<Vec<Served>>,
}

impl fmt::Debug for Certificates {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Certificates")
            .field("files", &self.files)
            .finish_non_exhaustive()
    }
}

impl Certificates {
    /// Reads and checks every file of `files` (see [`check_pair`]).
    pub fn load(files: &[CertFiles]) -> Result<Self, TlsError> {
        Ok(Self {
            served: ArcSwap::from_pointee(read_all(files, SystemTime::now())?),
            files: files.to_vec(),
        })
    }

    /// Reads the files again and serves them from the next handshake on; on any error the
    /// certificates in service stay, and the error says which file is at fault.
    pub fn reload(&self) -> Result<(), TlsError> {
        let fresh = read_all(&self.files, SystemTime::now())?;
        self.served.store(Arc::new(fresh));
        Ok(())
    }

    /// The certificate for `server_name` (the default one without a match, or without SNI).
    fn pick(&self, server_name: Option<&str>) -> Option<Arc<CertifiedKey>> {
        let served = self.served.load();
        let by_name = server_name.and_then(|name| {
            let name = name.to_ascii_lowercase();
            served
                .iter()
                .find(|s| s.names.iter().any(|n| name_matches(n, &name)))
        });
        by_name.or_else(|| served.first()).map(|s| s.key.clone())
    }
}

impl ResolvesServerCert for Certificates {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.pick(hello.server_name())
    }
}

/// What a file looks like from outside: enough to see it replaced (a new file, a moved symlink, a
/// rewrite) without reading it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp(Option<(std::time::SystemTime, u64, u64)>);

impl Stamp {
    fn of(path: &Path) -> Self {
        use std::os::unix::fs::MetadataExt as _;
        // `metadata` follows symlinks: cert-manager and certbot swap a link to a new file.
        Stamp(
            std::fs::metadata(path)
                .ok()
                .and_then(|m| Some((m.modified().ok()?, m.ino(), m.len()))),
        )
    }
}

impl Certificates {
    fn stamps(&self) -> Vec<Stamp> {
        self.files
            .iter()
            .flat_map(|f| [Stamp::of(&f.cert), Stamp::of(&f.key)])
            .collect()
    }

    /// Reloads whenever one of the files changes on disk (looked at every `every`) and whenever
    /// `signals` yields (SIGHUP), until `stop` resolves. A failed reload logs one error and keeps
    /// the certificates in service; the next change is tried again.
    pub async fn watch(
        self: Arc<Self>,
        every: std::time::Duration,
        mut signals: impl futures_util::Stream<Item = ()> + Unpin,
        stop: impl std::future::Future<Output = ()>,
    ) {
        use futures_util::StreamExt as _;
        tokio::pin!(stop);
        let mut seen = self.stamps();
        loop {
            let signalled = tokio::select! {
                () = tokio::time::sleep(every) => false,
                s = signals.next() => s.is_some(),
                () = &mut stop => return,
            };
            let now = self.stamps();
            if !signalled && now == seen {
                continue;
            }
            // A half-written replacement shows as a change too: it fails to load, the old
            // certificates stay, and the write's end is the next change.
            seen = now;
            match self.reload() {
                Ok(()) => tracing::info!(signalled, "TLS certificates reloaded"),
                Err(e) => {
                    tracing::error!(error = %e, "TLS certificates not reloaded; the ones in service stay")
                }
            }
        }
    }
}

/// Whether the certificate name `pattern` (lower case, maybe `*.` wildcard) covers `name`.
fn name_matches(pattern: &str, name: &str) -> bool {
    match pattern.strip_prefix("*.") {
        Some(suffix) => name
            .split_once('.')
            .is_some_and(|(label, rest)| !label.is_empty() && rest == suffix),
        None => pattern == name,
    }
}

fn read_all(files: &[CertFiles], now: SystemTime) -> Result<Vec<Served>, TlsError> {
    files
        .iter()
        .map(|f| check_pair(f, now).map(|(served, _)| served))
        .collect()
}

/// Reads one chain and its key, and checks that the key is the certificate's and that the
/// certificate is valid at `now`; also gives the key as read (a client configuration takes it so).
fn check_pair(
    files: &CertFiles,
    now: SystemTime,
) -> Result<(Served, PrivateKeyDer<'static>), TlsError> {
    let (cert_file, key_file) = (&files.cert, &files.key);
    let chain = read_certs(cert_file)?;
    let key = PrivateKeyDer::from_pem_file(key_file)
        .map_err(|e| tls_err(key_file, format!("no private key read: {}", pem_reason(&e))))?;
    let provider = provider();
    let signing = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| tls_err(key_file, format!("unusable private key: {e}")))?;
    let certified = CertifiedKey::new(chain, signing);
    certified.keys_match().map_err(|_| {
        tls_err(
            key_file,
            format!(
                "this key does not belong to the certificate in {}",
                cert_file.display()
            ),
        )
    })?;
    let names = {
        let (_, leaf) = X509Certificate::from_der(&certified.cert[0])
            .map_err(|e| tls_err(cert_file, format!("unreadable certificate: {e}")))?;
        let validity = leaf.validity();
        let now = now
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| i64::try_from(d.as_secs()).unwrap_or(i64::MAX));
        if validity.not_after.timestamp() < now {
            return Err(tls_err(
                cert_file,
                format!("the certificate expired on {}", validity.not_after),
            ));
        }
        if validity.not_before.timestamp() > now {
            return Err(tls_err(
                cert_file,
                format!(
                    "the certificate is not valid before {}",
                    validity.not_before
                ),
            ));
        }
        leaf_names(&leaf)
    };
    let served = Served {
        names,
        key: Arc::new(certified),
    };
    Ok((served, key))
}

fn read_certs(file: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(file)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| tls_err(file, format!("no certificate read: {}", pem_reason(&e))))?;
    if certs.is_empty() {
        return Err(tls_err(file, "no certificate in the file (PEM expected)"));
    }
    Ok(certs)
}

fn pem_reason(e: &rustls::pki_types::pem::Error) -> String {
    match e {
        rustls::pki_types::pem::Error::Io(io) => io.to_string(),
        rustls::pki_types::pem::Error::NoItemsFound => "nothing in PEM form found".into(),
        other => format!("{other:?}"),
    }
}

/// The DNS names of a certificate's subjectAltName, else its common name.
fn leaf_names(leaf: &X509Certificate<'_>) -> Vec<String> {
    let mut names: Vec<String> = match leaf.subject_alternative_name() {
        Ok(Some(san)) => san
            .value
            .general_names
            .iter()
            .filter_map(|n| match n {
                GeneralName::DNSName(d) => Some(d.to_ascii_lowercase()),
                _ => None,
            })
            .collect(),
        _ => Vec::new(),
    };
    if names.is_empty() {
        names.extend(
            leaf.subject()
                .iter_common_name()
                .filter_map(|cn| cn.as_str().ok())
                .map(str::to_ascii_lowercase),
        );
    }
    names
}

/// The server side of TLS for `settings`, serving `certificates` (shared, so that a reload
/// reaches the running listener). ALPN offers HTTP/1.1, after HTTP/2 when `settings` say so.
pub fn server_config(
    settings: &TlsSettings,
    certificates: Arc<Certificates>,
) -> Result<ServerConfig, TlsError> {
    let versions: &[&rustls::SupportedProtocolVersion] = match settings.min_version {
        MinVersion::Tls12 => &[&rustls::version::TLS13, &rustls::version::TLS12],
        MinVersion::Tls13 => &[&rustls::version::TLS13],
    };
    let provider = provider();
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(versions)
        .map_err(|e| tls_err(Path::new("tls"), e.to_string()))?;
    let builder = match &settings.client_auth {
        None => builder.with_no_client_auth(),
        Some(auth) => {
            let mut roots = RootCertStore::empty();
            for ca in read_certs(&auth.ca)? {
                roots
                    .add(ca)
                    .map_err(|e| tls_err(&auth.ca, format!("unusable CA certificate: {e}")))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = if auth.required {
                verifier
            } else {
                verifier.allow_unauthenticated()
            };
            let verifier = verifier
                .build()
                .map_err(|e| tls_err(&auth.ca, format!("unusable CA: {e}")))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(certificates);
    // The server's order of cipher suites (the provider's: AES-GCM first where the CPU has AES
    // instructions), not whatever a client lists first.
    config.ignore_client_order = true;
    config.alpn_protocols = if settings.http2 {
        vec![b"h2".to_vec(), b"http/1.1".to_vec()]
    } else {
        vec![b"http/1.1".to_vec()]
    };
    Ok(config)
}

/// How the gateway reaches `https` upstreams: whom it trusts, and what it shows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UpstreamTlsFiles {
    /// PEM file of the CAs an upstream's certificate must chain to; none: the system's roots.
    pub ca: Option<PathBuf>,
    /// A client certificate for upstreams that require mTLS.
    pub client: Option<CertFiles>,
    /// Accept any certificate (logged as a warning at startup).
    pub insecure_skip_verify: bool,
}

/// A TLS client configuration for `https` upstreams (and JWKS URLs), described by its files and
/// built from them by [`ClientTls::open`]: validating a config reads no file.
#[derive(Debug)]
pub struct ClientTls {
    files: UpstreamTlsFiles,
    config: std::sync::OnceLock<Arc<rustls::ClientConfig>>,
}

impl ClientTls {
    /// The configuration `files` describe, not built yet.
    pub fn new(files: UpstreamTlsFiles) -> Self {
        Self {
            files,
            config: std::sync::OnceLock::new(),
        }
    }

    /// What it is made of.
    pub fn files(&self) -> &UpstreamTlsFiles {
        &self.files
    }

    /// Reads its files and builds the configuration (once; later calls keep the first).
    pub fn open(&self) -> Result<(), TlsError> {
        if self.config.get().is_none() {
            let config = Arc::new(client_config(&self.files)?);
            let _ = self.config.set(config);
        }
        Ok(())
    }

    /// The configuration, once opened.
    pub fn config(&self) -> Option<&Arc<rustls::ClientConfig>> {
        self.config.get()
    }
}

/// The system's root certificates, read once.
fn system_roots() -> Result<Arc<RootCertStore>, TlsError> {
    static ROOTS: std::sync::OnceLock<Arc<RootCertStore>> = std::sync::OnceLock::new();
    if let Some(roots) = ROOTS.get() {
        return Ok(roots.clone());
    }
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let why = found
            .errors
            .first()
            .map_or_else(|| "none found".to_string(), ToString::to_string);
        return Err(tls_err(
            Path::new("system certificates"),
            format!("no root certificate could be read ({why}); give upstreamTls.ca"),
        ));
    }
    Ok(ROOTS.get_or_init(|| Arc::new(roots)).clone())
}

/// The client side of TLS to upstreams: TLS 1.2 and 1.3, ALPN `http/1.1` (upstreams stay HTTP/1.1).
pub fn client_config(files: &UpstreamTlsFiles) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| tls_err(Path::new("upstreamTls"), e.to_string()))?;
    let builder = if files.insecure_skip_verify {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
    } else {
        let roots = match &files.ca {
            Some(ca) => {
                let mut roots = RootCertStore::empty();
                for cert in read_certs(ca)? {
                    roots
                        .add(cert)
                        .map_err(|e| tls_err(ca, format!("unusable CA certificate: {e}")))?;
                }
                Arc::new(roots)
            }
            None => system_roots()?,
        };
        builder.with_root_certificates(roots)
    };
    let mut config = match &files.client {
        None => builder.with_no_client_auth(),
        Some(pair) => {
            let (served, key) = check_pair(pair, SystemTime::now())?;
            let chain = served.key.cert.clone();
            builder
                .with_client_auth_cert(chain, key)
                .map_err(|e| tls_err(&pair.key, e.to_string()))?
        }
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}

/// `upstreamTls.insecureSkipVerify`: any certificate is accepted (signatures are still checked, so
/// the peer holds the key of the certificate it shows).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// What a TLS connection's handshake settled, for the access log.
#[derive(Debug, Clone)]
pub struct TlsInfo {
    /// `TLSv1.2` or `TLSv1.3`.
    pub version: &'static str,
    /// The client certificate's subject, under mTLS.
    pub client_subject: Option<String>,
}

impl TlsInfo {
    /// Reads what `conn`'s handshake settled.
    pub fn of(conn: &rustls::ServerConnection) -> Self {
        let version = match conn.protocol_version() {
            Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3",
            Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2",
            _ => "TLS",
        };
        let client_subject = conn
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| X509Certificate::from_der(leaf).ok())
            .map(|(_, leaf)| rfc4514(leaf.subject()));
        Self {
            version,
            client_subject,
        }
    }
}

/// A distinguished name as RFC 4514 writes it: the RDNs last to first, `+` within one, the short
/// names of §3 (other types as dotted OIDs with the value's DER in hex, §2.4), and the characters
/// §2.4 requires escaped. A subject is the client's text; this keeps it one unambiguous string.
fn rfc4514(name: &X509Name<'_>) -> String {
    use std::fmt::Write as _;
    use x509_parser::der_parser::asn1_rs::ToDer as _;
    let mut out = String::new();
    for (i, rdn) in name
        .iter_rdn()
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .enumerate()
    {
        if i > 0 {
            out.push(',');
        }
        for (j, attr) in rdn.iter().enumerate() {
            if j > 0 {
                out.push('+');
            }
            let oid = attr.attr_type().to_id_string();
            let short = match oid.as_str() {
                "2.5.4.3" => Some("CN"),
                "2.5.4.7" => Some("L"),
                "2.5.4.8" => Some("ST"),
                "2.5.4.10" => Some("O"),
                "2.5.4.11" => Some("OU"),
                "2.5.4.6" => Some("C"),
                "2.5.4.9" => Some("STREET"),
                "0.9.2342.19200300.100.1.25" => Some("DC"),
                "0.9.2342.19200300.100.1.1" => Some("UID"),
                _ => None,
            };
            match (short, attr.as_str()) {
                (Some(short), Ok(value)) => {
                    out.push_str(short);
                    out.push('=');
                    escape_dn_value(&mut out, value);
                }
                _ => {
                    out.push_str(short.unwrap_or(&oid));
                    out.push_str("=#");
                    for b in attr.attr_value().to_der_vec().unwrap_or_default() {
                        let _ = write!(out, "{b:02x}");
                    }
                }
            }
        }
    }
    out
}

/// An attribute value escaped as RFC 4514 §2.4 says: `"+,;<>\` and NUL always, `#` and space
/// first, space last; other controls too (as `\XX`), so that a log line holds no raw control.
fn escape_dn_value(out: &mut String, value: &str) {
    use std::fmt::Write as _;
    let last = value.chars().count().saturating_sub(1);
    for (i, c) in value.chars().enumerate() {
        match c {
            '"' | '+' | ',' | ';' | '<' | '>' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            '#' if i == 0 => out.push_str("\\#"),
            ' ' if i == 0 || i == last => out.push_str("\\ "),
            c if c.is_control() => {
                let mut utf8 = [0u8; 4];
                for b in c.encode_utf8(&mut utf8).bytes() {
                    let _ = write!(out, "\\{b:02x}");
                }
            }
            c => out.push(c),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_subjects_are_written_as_rfc_4514_does() {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        let mut dn = rcgen::DistinguishedName::new();
        dn.push(rcgen::DnType::CountryName, "DE");
        dn.push(rcgen::DnType::OrganizationName, "Acme, Inc; <x>");
        dn.push(rcgen::DnType::CommonName, "#partner+1\u{2028}\u{85}\\ ");
        params.distinguished_name = dn;
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let (_, parsed) = X509Certificate::from_der(cert.der()).unwrap();
        assert_eq!(
            rfc4514(parsed.subject()),
            "CN=\\#partner\\+1\u{2028}\\c2\\85\\\\\\ ,O=Acme\\, Inc\\; \\<x\\>,C=DE"
        );
    }

    fn pair(dir: &Path, name: &str, hosts: &[&str]) -> CertFiles {
        let cert = rcgen::generate_simple_self_signed(
            hosts.iter().map(|h| h.to_string()).collect::<Vec<_>>(),
        )
        .unwrap();
        let files = CertFiles {
            cert: dir.join(format!("{name}.crt")),
            key: dir.join(format!("{name}.key")),
        };
        std::fs::write(&files.cert, cert.cert.pem()).unwrap();
        std::fs::write(&files.key, cert.signing_key.serialize_pem()).unwrap();
        files
    }

    #[test]
    fn names_and_wildcards() {
        assert!(name_matches("api.example.com", "api.example.com"));
        assert!(name_matches("*.example.com", "api.example.com"));
        assert!(!name_matches("*.example.com", "example.com"));
        assert!(!name_matches("*.example.com", "a.b.example.com"));
        assert!(!name_matches("*.example.com", ".example.com"));
    }

    #[test]
    fn sni_picks_the_certificate_and_the_first_is_the_default() {
        let dir = tempfile::tempdir().unwrap();
        let a = pair(dir.path(), "a", &["api.example.com"]);
        let b = pair(dir.path(), "b", &["*.partner.example.net"]);
        let certs = Certificates::load(&[a, b]).unwrap();
        let served = certs.served.load();
        let (ka, kb) = (&served[0].key, &served[1].key);
        assert!(Arc::ptr_eq(
            &certs.pick(Some("API.example.com")).unwrap(),
            ka
        ));
        assert!(Arc::ptr_eq(
            &certs.pick(Some("x.partner.example.net")).unwrap(),
            kb
        ));
        assert!(Arc::ptr_eq(&certs.pick(Some("other.org")).unwrap(), ka));
        assert!(Arc::ptr_eq(&certs.pick(None).unwrap(), ka));
    }

    #[test]
    fn bad_files_are_named() {
        let dir = tempfile::tempdir().unwrap();
        let a = pair(dir.path(), "a", &["a.test"]);
        let b = pair(dir.path(), "b", &["b.test"]);
        // A key that is not the certificate's.
        let mixed = CertFiles {
            cert: a.cert.clone(),
            key: b.key.clone(),
        };
        let e = Certificates::load(&[mixed]).unwrap_err();
        assert_eq!(e.file, b.key);
        assert!(e.message.contains("does not belong"), "{e}");
        // Missing and empty files.
        let missing = CertFiles {
            cert: dir.path().join("nope.crt"),
            key: a.key.clone(),
        };
        assert_eq!(
            Certificates::load(&[missing]).unwrap_err().file,
            dir.path().join("nope.crt")
        );
        std::fs::write(dir.path().join("empty.key"), "").unwrap();
        let empty = CertFiles {
            cert: a.cert.clone(),
            key: dir.path().join("empty.key"),
        };
        assert_eq!(
            Certificates::load(&[empty]).unwrap_err().file,
            dir.path().join("empty.key")
        );
        // Expired.
        let mut params = rcgen::CertificateParams::new(vec!["old.test".to_string()]).unwrap();
        params.not_before = rcgen::date_time_ymd(2020, 1, 1);
        params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        let key = rcgen::KeyPair::generate().unwrap();
        let old = params.self_signed(&key).unwrap();
        let files = CertFiles {
            cert: dir.path().join("old.crt"),
            key: dir.path().join("old.key"),
        };
        std::fs::write(&files.cert, old.pem()).unwrap();
        std::fs::write(&files.key, key.serialize_pem()).unwrap();
        let e = Certificates::load(std::slice::from_ref(&files)).unwrap_err();
        assert_eq!(e.file, files.cert);
        assert!(e.message.contains("expired"), "{e}");
    }

    #[test]
    fn a_broken_reload_keeps_the_certificates_in_service() {
        let dir = tempfile::tempdir().unwrap();
        let a = pair(dir.path(), "a", &["a.test"]);
        let certs = Certificates::load(std::slice::from_ref(&a)).unwrap();
        let before = certs.pick(None).unwrap();
        std::fs::write(&a.cert, "garbage").unwrap();
        assert_eq!(certs.reload().unwrap_err().file, a.cert);
        assert!(Arc::ptr_eq(&certs.pick(None).unwrap(), &before));
        let fresh = pair(dir.path(), "a", &["a.test"]);
        assert_eq!(fresh, a);
        certs.reload().unwrap();
        assert!(!Arc::ptr_eq(&certs.pick(None).unwrap(), &before));
    }
}
