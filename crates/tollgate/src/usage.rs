//! `tollgate usage`: per-day `[used, remaining]` of a plan's keys, read from the store, in AWS
//! GetUsage's shape.

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, ValueEnum};
use serde::Serialize;
use tollgate_core::quota::EpochDay;
use tollgate_store::report::plan_usage;
use tollgate_store::{SqliteStore, Store};

use crate::cli::Failure;
use crate::config;

/// Arguments of `tollgate usage`.
#[derive(Debug, Args)]
pub struct UsageArgs {
    /// The config file naming the store.
    #[arg(long, short)]
    config: PathBuf,
    /// The usage plan, by name or id.
    #[arg(long)]
    plan: String,
    /// One key, by name or id (default: every key of the plan).
    #[arg(long)]
    key: Option<String>,
    /// First day, YYYY-MM-DD (UTC).
    #[arg(long)]
    from: String,
    /// Last day, YYYY-MM-DD (UTC), inclusive.
    #[arg(long)]
    to: String,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
}

/// AWS `Usage`, as GetUsage returns it.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Usage {
    usage_plan_id: String,
    start_date: String,
    end_date: String,
    values: BTreeMap<String, Vec<[u64; 2]>>,
}

fn parse_day(flag: &str, text: &str) -> Result<EpochDay, Failure> {
    text.parse::<jiff::civil::Date>()
        .ok()
        .and_then(EpochDay::from_date)
        .ok_or_else(|| Failure::Usage(format!("--{flag} {text:?} is not a date like 2026-11-01")))
}

/// Runs `tollgate usage`.
pub fn run(args: &UsageArgs) -> Result<(), Failure> {
    let config = config::load(&args.config).map_err(Failure::Config)?;
    let from = parse_day("from", &args.from)?;
    let to = parse_day("to", &args.to)?;
    if to < from {
        return Err(Failure::Usage("--to is before --from".into()));
    }
    let store = SqliteStore::open(&config.store.sqlite).map_err(|e| Failure::Runtime(e.into()))?;
    let records = store.load().map_err(|e| Failure::Runtime(e.into()))?;
    let plan = records
        .plans
        .iter()
        .find(|p| p.id == args.plan || p.name == args.plan)
        .ok_or_else(|| {
            Failure::Usage(format!(
                "no usage plan {:?} in {}",
                args.plan,
                config.store.sqlite.display()
            ))
        })?;
    let key_filter = match &args.key {
        None => None,
        Some(k) => Some(
            records
                .keys
                .iter()
                .find(|key| key.id == *k || key.name == *k)
                .ok_or_else(|| Failure::Usage(format!("no API key {k:?}")))?,
        ),
    };

    let values = plan_usage(
        &store,
        &records,
        plan,
        key_filter.map(|k| k.id.as_str()),
        from,
        to,
    )
    .map_err(|e| Failure::Runtime(e.into()))?;
    let usage = Usage {
        usage_plan_id: plan.id.clone(),
        start_date: from.to_string(),
        end_date: to.to_string(),
        values,
    };

    match args.output {
        Output::Json => {
            let json =
                serde_json::to_string_pretty(&usage).map_err(|e| Failure::Runtime(e.into()))?;
            println!("{json}");
        }
        Output::Table => {
            let name_of = |id: &str| {
                records
                    .keys
                    .iter()
                    .find(|k| k.id == id)
                    .map_or("", |k| k.name.as_str())
            };
            println!(
                "usage plan {} ({}), {} to {}",
                plan.name, plan.id, usage.start_date, usage.end_date
            );
            println!(
                "{:<12} {:<24} {:<10} {:>10} {:>10}",
                "KEY ID", "KEY NAME", "DATE", "USED", "REMAINING"
            );
            for (key_id, days) in &usage.values {
                let mut day = from;
                for [used, remaining] in days {
                    println!(
                        "{key_id:<12} {:<24} {day} {used:>10} {remaining:>10}",
                        name_of(key_id)
                    );
                    day = day.next();
                }
            }
        }
    }
    Ok(())
}
