//! How a command failed, which decides the exit status.

use crate::config;

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
