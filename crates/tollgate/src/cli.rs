//! Command-line interface.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::failure::Failure;
use crate::manage::{self, EventsCommand, KeysCommand, PlansCommand};
use crate::serverless::{self, ServerlessOptions};
use crate::{config, migrate, serve, usage};

/// Exit status for a bad config or bad arguments (BSD `EX_USAGE`).
const EX_USAGE: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "tollgate",
    version,
    about = "API keys, usage plans, throttles and quotas in front of HTTP APIs"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the gateway from a tollgate.yaml, or from a Serverless Framework serverless.yml.
    Serve {
        /// The config file (tollgate.yaml).
        #[arg(
            long,
            short,
            required_unless_present = "serverless",
            conflicts_with = "serverless"
        )]
        config: Option<PathBuf>,
        /// A serverless.yml to serve instead.
        #[arg(long)]
        serverless: Option<PathBuf>,
        #[command(flatten)]
        flags: ServerlessFlags,
    },
    /// Copy keys, plans, memberships and usage history from one store to another.
    Migrate {
        /// The source: sqlite:PATH, redis://host:port or redis-cluster://host:port,host:port.
        #[arg(long)]
        from: String,
        /// The (empty) target, same forms.
        #[arg(long)]
        to: String,
    },
    /// Convert other formats to a tollgate config.
    #[command(subcommand)]
    Import(ImportCommand),
    /// Validate a config file and exit. The files it names (certificates, keys, CAs, JWKS) are
    /// read and checked; JWKS URLs are fetched only with --online.
    Check {
        /// The config file (tollgate.yaml).
        #[arg(long, short)]
        config: PathBuf,
        /// Also fetch the authorizers' JWKS URLs, as `serve` does before it serves.
        #[arg(long)]
        online: bool,
    },
    /// Report per-day usage of a plan's keys, like AWS GetUsage; or change what a key has left.
    Usage(usage::UsageCommand),
    /// Manage API keys through the admin API.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage usage plans and their keys through the admin API.
    #[command(subcommand)]
    Plans(PlansCommand),
    /// Webhook events through the admin API: list failed or pending ones, retry one, send a test.
    #[command(subcommand)]
    Events(EventsCommand),
}

/// `tollgate import …`
#[derive(Debug, Subcommand)]
enum ImportCommand {
    /// Print the tollgate.yaml equivalent to a serverless.yml.
    Serverless {
        /// The serverless.yml.
        file: PathBuf,
        #[command(flatten)]
        flags: ServerlessFlags,
    },
}

/// How a serverless.yml maps onto a running gateway.
#[derive(Debug, clap::Args)]
struct ServerlessFlags {
    /// Upstream URL for every function (serverless.yml only).
    #[arg(long)]
    upstream: Option<String>,
    /// Upstream for one function, NAME=URL (repeatable).
    #[arg(long = "function")]
    functions: Vec<String>,
    /// Stage (default: provider.stage, else dev).
    #[arg(long)]
    stage: Option<String>,
    /// Data-plane address (serverless.yml only) [default: 127.0.0.1:8080].
    #[arg(long)]
    listen: Option<String>,
    /// Store, as sqlite:PATH, relative to where the command runs (serverless.yml only)
    /// [default: sqlite:./tollgate.db].
    #[arg(long)]
    store: Option<String>,
    /// Admin API address (serverless.yml only; credentials from the environment).
    #[arg(long)]
    admin: Option<String>,
}

impl ServerlessFlags {
    /// The flags given on the command line (each applies to a serverless.yml only).
    fn given(&self) -> Vec<&'static str> {
        [
            ("--upstream", self.upstream.is_some()),
            ("--function", !self.functions.is_empty()),
            ("--stage", self.stage.is_some()),
            ("--listen", self.listen.is_some()),
            ("--store", self.store.is_some()),
            ("--admin", self.admin.is_some()),
        ]
        .into_iter()
        .filter_map(|(flag, given)| given.then_some(flag))
        .collect()
    }

    fn options(&self, file: PathBuf) -> Result<ServerlessOptions, Failure> {
        let spec = self.store.as_deref().unwrap_or("sqlite:./tollgate.db");
        let store = spec
            .strip_prefix("sqlite:")
            .ok_or_else(|| Failure::Usage(format!("--store {spec:?}: expected sqlite:PATH")))?;
        Ok(ServerlessOptions {
            file,
            stage: self.stage.clone(),
            upstream: self.upstream.clone(),
            functions: self.functions.clone(),
            listen: self
                .listen
                .clone()
                .unwrap_or_else(|| "127.0.0.1:8080".into()),
            store: store.to_string(),
            admin: self.admin.clone(),
        })
    }
}

/// Runs the command line and returns the process exit status.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve {
            config,
            serverless,
            flags,
        } => {
            let given = flags.given();
            let loaded = match (config, serverless) {
                // A tollgate.yaml says these itself: a flag it would ignore is refused.
                (Some(_), _) if !given.is_empty() => Err(Failure::Usage(format!(
                    "{} apply to --serverless only: with --config, the file says them (listen:, store:, admin:, routes' upstream:)",
                    given.join(", ")
                ))),
                (Some(config), _) => config::load(&config).map_err(Failure::Config),
                (None, Some(file)) => flags
                    .options(file)
                    .and_then(|o| serverless::load(&o).map_err(Failure::Config)),
                (None, None) => Err(Failure::Usage(
                    "give --config FILE or --serverless FILE".into(),
                )),
            };
            // Certificates, TLS configurations and the authorizers' keys are read (fetched) before
            // anything is served.
            loaded
                .and_then(|c| c.open(true).map(|()| c).map_err(Failure::Config))
                .and_then(|c| {
                    init_logging();
                    serve::serve(c).map_err(Failure::Runtime)
                })
        }
        Command::Migrate { from, to } => migrate::migrate(&from, &to)
            .map(|(plans, keys, bindings, rows)| {
                println!("copied {plans} usage plans, {keys} API keys, {bindings} plan memberships, {rows} days of usage");
            })
            .map_err(Failure::Runtime),
        Command::Import(ImportCommand::Serverless { file, flags }) => flags
            .options(file)
            .and_then(|o| serverless::import(&o).map_err(Failure::Config))
            .map(|yaml| print!("{yaml}")),
        Command::Check { config, online } => config::load(&config)
            .and_then(|c| c.open(online).map(|()| c))
            .map(|c| {
                for w in &c.warnings {
                    eprintln!("tollgate: warning: {w}");
                }
                println!(
                    "{}: ok ({} APIs, {} usage plans, {} API keys)",
                    config.display(),
                    c.gateway.apis.len(),
                    c.plans.len(),
                    c.keys.len()
                );
            })
            .map_err(Failure::Config),
        Command::Usage(args) => usage::run(&args),
        Command::Keys(cmd) => manage::keys(cmd).map_err(Failure::Runtime),
        Command::Plans(cmd) => manage::plans(cmd).map_err(Failure::Runtime),
        Command::Events(cmd) => manage::events(cmd).map_err(Failure::Runtime),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Config(e)) => {
            eprintln!("tollgate: invalid config: {e}");
            ExitCode::from(EX_USAGE)
        }
        Err(Failure::Usage(msg)) => {
            eprintln!("tollgate: {msg}");
            ExitCode::from(EX_USAGE)
        }
        Err(Failure::Runtime(e)) => {
            eprintln!("tollgate: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// JSON lines on stderr; `RUST_LOG` filters (default `info`).
fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .json()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}
