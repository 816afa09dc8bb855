//! The `tollgate` binary: parses the command line and hands off to the command.

mod cli;
mod config;
mod failure;
mod manage;
mod migrate;
mod remote;
mod serve;
mod serverless;
mod usage;

use std::process::ExitCode;

fn main() -> ExitCode {
    cli::run()
}
