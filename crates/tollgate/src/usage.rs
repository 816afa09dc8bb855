//! `tollgate usage`: per-day `[used, remaining]` of a plan's keys in AWS GetUsage's shape, read from
//! the store directly (`--config`, works offline) or through the admin API (`--endpoint`); and
//! `tollgate usage set-remaining` (AWS UpdateUsage).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tollgate_core::quota::EpochDay;
use tollgate_store::report::{check_range, plan_usage};

use crate::config;
use crate::failure::Failure;
use crate::manage::{self, Common, Output};
use crate::remote::EndpointArgs;

/// Arguments of `tollgate usage`.
#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct UsageCommand {
    #[command(subcommand)]
    action: Option<UsageAction>,
    /// Read the store named in this config file (offline).
    #[arg(long, short, conflicts_with = "endpoint")]
    config: Option<PathBuf>,
    /// Read through the admin API instead, e.g. http://127.0.0.1:8081 (env TOLLGATE_ENDPOINT).
    #[arg(long, env = "TOLLGATE_ENDPOINT")]
    endpoint: Option<String>,
    /// Region to sign for.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// The usage plan, by name or id.
    #[arg(long)]
    plan: Option<String>,
    /// One key, by name or id (default: every key of the plan).
    #[arg(long)]
    key: Option<String>,
    /// First day, YYYY-MM-DD (UTC).
    #[arg(long)]
    from: Option<String>,
    /// Last day, YYYY-MM-DD (UTC), inclusive.
    #[arg(long)]
    to: Option<String>,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Debug, Subcommand)]
enum UsageAction {
    /// Set what a key has left in the current quota period (AWS UpdateUsage).
    SetRemaining {
        #[command(flatten)]
        common: Common,
        /// Plan id.
        #[arg(long)]
        plan: String,
        /// Key id.
        #[arg(long)]
        key: String,
        /// Requests left in the current period.
        #[arg(long)]
        remaining: i64,
    },
}

fn parse_day(flag: &str, text: Option<&str>) -> Result<EpochDay, Failure> {
    let text = text.ok_or_else(|| Failure::Usage(format!("--{flag} YYYY-MM-DD is required")))?;
    text.parse::<jiff::civil::Date>()
        .ok()
        .and_then(EpochDay::from_date)
        .ok_or_else(|| Failure::Usage(format!("--{flag} {text:?} is not a date like 2026-11-01")))
}

/// Runs `tollgate usage`.
pub fn run(cmd: &UsageCommand) -> Result<(), Failure> {
    if let Some(UsageAction::SetRemaining {
        common,
        plan,
        key,
        remaining,
    }) = &cmd.action
    {
        let out = manage::set_remaining(common, plan, key, *remaining).map_err(Failure::Runtime)?;
        return print(&out, common.output(), &BTreeMap::new());
    }
    let plan = cmd
        .plan
        .as_deref()
        .ok_or_else(|| Failure::Usage("--plan is required".into()))?;
    let from = parse_day("from", cmd.from.as_deref())?;
    let to = parse_day("to", cmd.to.as_deref())?;
    check_range(from, to).map_err(Failure::Usage)?;
    match (&cmd.config, &cmd.endpoint) {
        (Some(config), _) => offline(config, plan, cmd.key.as_deref(), from, to, cmd.output),
        (None, Some(endpoint)) => {
            let common = Common::new(
                EndpointArgs {
                    endpoint: endpoint.clone(),
                    region: cmd.region.clone(),
                },
                cmd.output,
            );
            let out = manage::remote_usage(
                &common,
                plan,
                cmd.key.as_deref(),
                &from.to_string(),
                &to.to_string(),
            )
            .map_err(Failure::Runtime)?;
            print(&out, cmd.output, &BTreeMap::new())
        }
        (None, None) => Err(Failure::Usage(
            "give --config FILE (read the store) or --endpoint URL (ask the admin API)".into(),
        )),
    }
}

fn offline(
    config: &std::path::Path,
    plan: &str,
    key: Option<&str>,
    from: EpochDay,
    to: EpochDay,
    output: Output,
) -> Result<(), Failure> {
    let config = config::load(config).map_err(Failure::Config)?;
    let store = config
        .store
        .kind
        .open()
        .map_err(|e| Failure::Runtime(e.into()))?;
    let records = store.load().map_err(|e| Failure::Runtime(e.into()))?;
    let plan = records
        .plans
        .iter()
        .find(|p| p.id == plan || p.name == plan)
        .ok_or_else(|| {
            Failure::Usage(format!(
                "no usage plan {plan:?} in {}",
                config.store.kind.describe()
            ))
        })?;
    let key_id = match key {
        None => None,
        Some(k) => Some(
            records
                .keys
                .iter()
                .find(|key| key.id == k || key.name == k)
                .map(|key| key.id.as_str())
                .ok_or_else(|| Failure::Usage(format!("no API key {k:?}")))?,
        ),
    };
    let members: Vec<&str> = records
        .bindings
        .iter()
        .filter(|(p, _)| *p == plan.id)
        .map(|(_, k)| k.as_str())
        .collect();
    let values = plan_usage(&*store, &members, plan, key_id, from, to)
        .map(|usage| usage.all())
        .map_err(|e| Failure::Runtime(e.into()))?;
    let usage = json!({"usagePlanId": plan.id, "startDate": from.to_string(), "endDate": to.to_string(), "values": values});
    let names = records
        .keys
        .iter()
        .map(|k| (k.id.clone(), k.name.clone()))
        .collect();
    print(&usage, output, &names)
}

/// Prints a Usage: JSON as is, or one row per key and day.
fn print(usage: &Value, output: Output, names: &BTreeMap<String, String>) -> Result<(), Failure> {
    if let Output::Json = output {
        println!(
            "{}",
            serde_json::to_string_pretty(usage).map_err(|e| Failure::Runtime(e.into()))?
        );
        return Ok(());
    }
    let start = usage["startDate"].as_str().unwrap_or_default();
    let first = start
        .parse::<jiff::civil::Date>()
        .ok()
        .and_then(EpochDay::from_date)
        .unwrap_or(EpochDay(0));
    println!(
        "usage plan {}, {} to {}",
        usage["usagePlanId"].as_str().unwrap_or(""),
        start,
        usage["endDate"].as_str().unwrap_or("")
    );
    println!(
        "{:<12} {:<24} {:<10} {:>10} {:>10}",
        "KEY ID", "KEY NAME", "DATE", "USED", "REMAINING"
    );
    for (key_id, days) in usage["values"].as_object().into_iter().flatten() {
        let name = names.get(key_id).map_or("", String::as_str);
        let mut day = first;
        for pair in days.as_array().into_iter().flatten() {
            let (used, remaining) = (pair[0].as_u64().unwrap_or(0), pair[1].as_u64().unwrap_or(0));
            println!("{key_id:<12} {name:<24} {day} {used:>10} {remaining:>10}");
            day = day.next();
        }
    }
    Ok(())
}
