//! Command-line interface.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::manage::{self, KeysCommand, PlansCommand};
use crate::{config, serve, usage};

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
    /// Run the gateway.
    Serve {
        /// The config file (tollgate.yaml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a config file and exit.
    Check {
        /// The config file (tollgate.yaml).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Report per-day usage of a plan's keys, like AWS GetUsage; or change what a key has left.
    Usage(usage::UsageCommand),
    /// Manage API keys through the admin API.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Manage usage plans and their keys through the admin API.
    #[command(subcommand)]
    Plans(PlansCommand),
}

/// Runs the command line and returns the process exit status.
pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve { config } => config::load(&config)
            .map_err(Failure::Config)
            .and_then(|c| {
                init_logging();
                serve::serve(c).map_err(Failure::Runtime)
            }),
        Command::Check { config } => config::load(&config)
            .map(|c| {
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

/// How a command failed, which decides the exit status.
#[derive(Debug)]
pub enum Failure {
    /// The config file is unusable: exit 64.
    Config(config::ConfigError),
    /// The arguments are unusable: exit 64.
    Usage(String),
    /// Something failed at run time: exit 1.
    Runtime(anyhow::Error),
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
