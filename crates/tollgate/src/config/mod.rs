//! Loading `tollgate.yaml`: parse into [`raw`] types, then validate into [`Config`]. Every error names
//! the file, the line and column, and the field.

pub mod raw;
mod validate;

pub(crate) use validate::parse_duration;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tollgate_admin::seal::Sealer;
use tollgate_admin::sigv4::Credentials;
use tollgate_gateway::GatewayConfig;
use tollgate_gateway::config::Http2Settings;
use tollgate_gateway::jwt::Authorizer;
use tollgate_gateway::tls::{self, CertFiles, Certificates, ClientTls, TlsError, TlsSettings};
use tollgate_store::OnStoreFailure;
use tollgate_store::RedisSettings;
use tollgate_store::{DeclaredKey, DeclaredPlan};

/// The validated configuration of one gateway instance.
#[derive(Debug, Clone)]
pub struct Config {
    /// Where the data plane listens for plain HTTP, if it does.
    pub listen: Option<SocketAddr>,
    /// Where it listens for HTTPS, and how it terminates TLS.
    pub tls: Option<TlsListener>,
    /// Where the decision endpoint for forward-auth listens, if it does.
    pub verify_listen: Option<SocketAddr>,
    /// Whether a route skips verifying its `https` upstream's certificate (warned about at startup).
    pub insecure_upstream_tls: bool,
    /// HTTP/2 to clients, unless turned off.
    pub http2: Option<Http2Settings>,
    /// The most client connections the data plane holds at once (`None`: as many as the descriptor
    /// limit allows).
    pub max_connections: Option<usize>,
    /// How long a client of either listener may take to send a request head (and, on the data
    /// plane, the next bytes of a body).
    pub header_timeout: Duration,
    /// The embedded store.
    pub store: StoreConfig,
    /// Routing and limits.
    pub gateway: GatewayConfig,
    /// Usage plans declared in the file.
    pub plans: Vec<DeclaredPlan>,
    /// API keys declared in the file.
    pub keys: Vec<DeclaredKey>,
    /// The admin API, when configured.
    pub admin: Option<AdminConfig>,
    /// Set when key values are kept encrypted (`keyValueStorage: encrypted`).
    pub sealer: Option<Sealer>,
    /// What is valid but risky, each naming its file, line and field: printed by `check`, logged
    /// by `serve`.
    pub warnings: Vec<ConfigError>,
    /// The TLS client configurations of `https` upstreams and JWKS URLs, built by
    /// [`Config::open`].
    pub clients: Vec<ToOpen<Arc<ClientTls>>>,
    /// The authorizers, whose JWKS [`Config::open`] reads.
    pub jwks: Vec<ToOpen<Arc<Authorizer>>>,
}

/// Something the config names on disk or on the network, opened by [`Config::open`] rather than
/// while validating, and where the config names it (for errors).
#[derive(Debug, Clone)]
pub struct ToOpen<T> {
    pub(crate) what: T,
    /// The error to give, its message left empty.
    pub(crate) written: ConfigError,
}

impl<T> ToOpen<T> {
    fn failed(&self, message: String) -> ConfigError {
        ConfigError {
            message,
            ..self.written.clone()
        }
    }
}

impl Config {
    /// Opens what the config names: the listeners' certificates, the TLS client configurations and
    /// the authorizers' JWKS files, and with `online` their `https` URLs (fetched). Validation does
    /// no I/O: `serve` opens everything before it serves; `check` reads the files, and fetches only
    /// when asked. Each error names the file, line and field that names what failed.
    pub fn open(&self, online: bool) -> Result<(), ConfigError> {
        let listeners = self.tls.iter().map(|l| &l.tls);
        for termination in listeners.chain(self.admin.iter().filter_map(|a| a.tls.as_ref())) {
            termination.open()?;
        }
        // Before the JWKS: a URL is fetched trusting what https upstreams trust.
        for c in &self.clients {
            c.what.open().map_err(|e| c.failed(e.to_string()))?;
        }
        for j in &self.jwks {
            if online || !j.what.fetches() {
                j.what.read_keys(0).map_err(|e| j.failed(e))?;
            }
        }
        Ok(())
    }
}

/// The data plane's HTTPS listener.
#[derive(Debug, Clone)]
pub struct TlsListener {
    /// Where it listens.
    pub listen: SocketAddr,
    /// How it terminates TLS.
    pub tls: TlsTermination,
}

/// TLS termination on a listener: its certificate files and settings, opened by [`Config::open`]
/// (the certificates read and checked, the rustls configuration built).
#[derive(Debug, Clone)]
pub struct TlsTermination {
    files: Vec<CertFiles>,
    settings: TlsSettings,
    /// The field naming each file (certificates, keys, the client CA), and where it is written.
    written: Vec<(PathBuf, ConfigError)>,
    /// Where the termination itself is written, for an error no file is at fault for.
    whole: ConfigError,
    opened: std::sync::OnceLock<Terminating>,
}

/// A termination opened: what a listener serves.
#[derive(Debug, Clone)]
pub struct Terminating {
    /// The certificates served, by SNI; reloaded in place.
    pub certificates: Arc<Certificates>,
    /// The rustls configuration serving them.
    pub server: Arc<rustls::ServerConfig>,
}

impl TlsTermination {
    pub(crate) fn new(
        files: Vec<CertFiles>,
        settings: TlsSettings,
        written: Vec<(PathBuf, ConfigError)>,
        whole: ConfigError,
    ) -> Self {
        Self {
            files,
            settings,
            written,
            whole,
            opened: std::sync::OnceLock::new(),
        }
    }

    /// Reads the certificates and builds the server configuration (once).
    fn open(&self) -> Result<(), ConfigError> {
        if self.opened.get().is_some() {
            return Ok(());
        }
        let certificates = Arc::new(Certificates::load(&self.files).map_err(|e| self.fault(e))?);
        let server =
            tls::server_config(&self.settings, certificates.clone()).map_err(|e| self.fault(e))?;
        let _ = self.opened.set(Terminating {
            certificates,
            server: Arc::new(server),
        });
        Ok(())
    }

    /// What it serves, once [`Config::open`] opened it.
    pub fn opened(&self) -> Option<&Terminating> {
        self.opened.get()
    }

    /// `e` as an error naming the field that names the file at fault.
    fn fault(&self, e: TlsError) -> ConfigError {
        let written = self.written.iter().find(|(file, _)| *file == e.file);
        ConfigError {
            message: e.to_string(),
            ..written.map_or(&self.whole, |(_, w)| w).clone()
        }
    }
}

/// The control plane's listener and credentials.
#[derive(Debug, Clone)]
pub struct AdminConfig {
    /// Where the admin API listens.
    pub listen: SocketAddr,
    /// The credentials requests must be signed with; `None` only on a loopback address.
    pub credentials: Option<Credentials>,
    /// The most connections the admin API holds at once.
    pub max_connections: usize,
    /// HTTPS instead of plain HTTP, when configured.
    pub tls: Option<TlsTermination>,
}

/// The admin API's default connection limit: operators and scripts, not traffic.
pub const DEFAULT_ADMIN_MAX_CONNECTIONS: usize = 64;

/// Environment variables holding the admin credentials (they override the config file).
pub const ADMIN_ACCESS_KEY_ENV: &str = "TOLLGATE_ADMIN_ACCESS_KEY_ID";
/// See [`ADMIN_ACCESS_KEY_ENV`].
pub const ADMIN_SECRET_KEY_ENV: &str = "TOLLGATE_ADMIN_SECRET_ACCESS_KEY";
/// The admin credentials: each half from the environment ([`ADMIN_ACCESS_KEY_ENV`],
/// [`ADMIN_SECRET_KEY_ENV`]; empty counts as unset), else the config file's. `Ok(None)` when
/// neither half is given; `Err` when only one is.
pub fn admin_credentials(
    file_access_key_id: Option<&str>,
    file_secret_access_key: Option<&str>,
) -> Result<Option<Credentials>, String> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let access_key_id = env(ADMIN_ACCESS_KEY_ENV).or_else(|| file_access_key_id.map(str::to_owned));
    let secret_access_key =
        env(ADMIN_SECRET_KEY_ENV).or_else(|| file_secret_access_key.map(str::to_owned));
    match (access_key_id, secret_access_key) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Some(Credentials {
            access_key_id,
            secret_access_key,
        })),
        (None, None) => Ok(None),
        _ => Err(format!(
            "give both an access key id and a secret access key ({ADMIN_ACCESS_KEY_ENV}, {ADMIN_SECRET_KEY_ENV}), or neither"
        )),
    }
}

/// Why a `rediss://` URL is refused: the Redis client is built without TLS, so say so before a
/// start or a migration tries to connect.
pub const REDIS_TLS: &str = "TLS to Redis (rediss://) is not supported: use redis://host:port on a \
     private network, or a local TLS tunnel (stunnel, spiped) to the server";

/// Environment variable holding the 64-hex-character key for `keyValueStorage: encrypted`.
pub const KEY_ENCRYPTION_KEY_ENV: &str = "TOLLGATE_KEY_ENCRYPTION_KEY";

/// Where usage and records are kept.
#[derive(Debug, Clone)]
pub struct StoreConfig {
    /// Where records and usage live.
    pub kind: StoreKind,
    /// How often metered usage is written.
    pub flush_interval: Duration,
    /// `durability: request`: an admitted request's count is stored before its response is sent.
    pub durable_requests: bool,
}

/// The embedded store or the shared one.
#[derive(Debug, Clone)]
pub enum StoreKind {
    /// One SQLite file (the default).
    Sqlite(PathBuf),
    /// Redis, shared by every instance, and what to do when it is unavailable.
    Redis(RedisSettings, OnStoreFailure),
}

impl StoreKind {
    /// Opens the store (blocking; Redis connects lazily).
    pub fn open(
        &self,
    ) -> Result<std::sync::Arc<dyn tollgate_store::Store>, tollgate_store::StoreError> {
        Ok(match self {
            StoreKind::Sqlite(path) => {
                std::sync::Arc::new(tollgate_store::SqliteStore::open(path)?)
            }
            StoreKind::Redis(settings, _) => {
                std::sync::Arc::new(tollgate_store::RedisStore::new(settings.clone())?)
            }
        })
    }

    /// Opens a store that must already be there, for commands that only read (`usage`): a SQLite
    /// file that does not exist is an error naming it, never a new empty database.
    pub fn open_existing(
        &self,
    ) -> Result<std::sync::Arc<dyn tollgate_store::Store>, tollgate_store::StoreError> {
        if let StoreKind::Sqlite(path) = self {
            if !path.exists() {
                return Err(tollgate_store::StoreError::NotFound(format!(
                    "no store at {} (the config's store.sqlite; `tollgate serve` creates it)",
                    path.display()
                )));
            }
        }
        self.open()
    }

    /// How to name it in messages.
    pub fn describe(&self) -> String {
        match self {
            StoreKind::Sqlite(path) => path.display().to_string(),
            StoreKind::Redis(settings, _) => settings.urls.join(", "),
        }
    }
}

/// A config file that cannot be used, and where.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file.
    pub file: PathBuf,
    /// 1-based line and column, when known.
    pub position: Option<(u64, u64)>,
    /// The field path, e.g. `usagePlans[0].quota.offset`.
    pub field: String,
    /// What is wrong.
    pub message: String,
}

impl ConfigError {
    /// An error about `field` of `file`, written at `at`.
    pub fn at(
        file: &Path,
        at: serde_saphyr::Location,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        ConfigError {
            file: file.to_path_buf(),
            // Values given on the command line (`tollgate serve --serverless … --listen`) have
            // no place in the file.
            position: (at != serde_saphyr::Location::UNKNOWN).then(|| (at.line(), at.column())),
            field: field.into(),
            message: message.into(),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some((line, column)) = self.position {
            write!(f, ":{line}:{column}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

/// Reads and validates the config file at `path`.
pub fn load(path: &Path) -> Result<Config, ConfigError> {
    parse(path, &read(path)?)
}

/// The text of the config file at `path`.
fn read(path: &Path) -> Result<String, ConfigError> {
    std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        position: None,
        field: String::new(),
        message: format!("cannot read: {e}"),
    })
}

/// The store the config at `path` names, read alone (the rest of the file is not validated, so
/// `${VAR}`s of key values need not be set): for commands that only read the store.
pub fn load_store(path: &Path) -> Result<StoreConfig, ConfigError> {
    #[derive(serde::Deserialize)]
    struct StoreOnly {
        #[serde(default)]
        store: Option<serde_saphyr::Spanned<raw::RawStore>>,
    }
    let raw: StoreOnly = serde_saphyr::from_str(&read(path)?).map_err(|e| yaml_error(path, &e))?;
    validate::store_only(path, raw.store.as_ref())
}

/// Parses and validates config `text`, reporting errors against `path`.
pub fn parse(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let raw: raw::RawConfig = serde_saphyr::from_str(text).map_err(|e| yaml_error(path, &e))?;
    validate(path, raw)
}

/// Validates a config read from `path` (`tollgate.yaml`, or a `serverless.yml` read into these
/// types: its locations are the user's own file's).
pub fn validate(path: &Path, raw: raw::RawConfig) -> Result<Config, ConfigError> {
    validate::validate(path, raw)
}

/// Turns a YAML error into a [`ConfigError`], keeping serde-saphyr's source snippet.
pub(crate) fn yaml_error(path: &Path, e: &serde_saphyr::Error) -> ConfigError {
    let position = e.location().map(|l| (l.line(), l.column()));
    let rendered = e.to_string();
    // The first line repeats "error: line L column C: "; the position is printed our way instead.
    let mut lines = rendered.lines();
    let first = lines.next().unwrap_or_default();
    let first = first.strip_prefix("error: ").unwrap_or(first);
    let first = match first.split_once(": ") {
        Some((prefix, msg)) if prefix.starts_with("line ") => msg,
        _ => first,
    };
    let snippet: Vec<String> = lines
        .map(|l| l.replace("<input>", &path.display().to_string()))
        .collect();
    let message = if snippet.is_empty() {
        first.to_string()
    } else {
        format!("{first}\n{}", snippet.join("\n"))
    };
    ConfigError {
        file: path.to_path_buf(),
        position,
        field: String::new(),
        message,
    }
}
