//! `tollgate usage`: per-day `[used, remaining]` of a plan's keys in AWS GetUsage's shape, read from
//! the store directly (`--config`, works offline) or through the admin API (`--endpoint`); and
//! `tollgate usage set-remaining` (AWS UpdateUsage). `--detail` adds the requests refused by a
//! throttle and for the spent quota each day (tollgate's own report; GetUsage stays AWS's).

use std::collections::BTreeMap;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use serde_json::{Value, json};
use tollgate_core::quota::EpochDay;
use tollgate_core::sharing::customer_of;
use tollgate_store::report::{check_range, customer_usage, plan_usage};

use tollgate_gateway::exporters::backfill;

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
    /// For an https:// endpoint: the PEM file of the CAs it chains to (env TOLLGATE_CA_BUNDLE).
    #[arg(long, env = "TOLLGATE_CA_BUNDLE")]
    ca_bundle: Option<std::path::PathBuf>,
    /// The usage plan, by name or id.
    #[arg(long)]
    plan: Option<String>,
    /// One key, by name or id (default: every key of the plan).
    #[arg(long)]
    key: Option<String>,
    /// One customer of a plan that shares limits by customer: its keys' use together, what it has
    /// left, and each of its keys.
    #[arg(long, conflicts_with_all = ["key", "detail"])]
    customer: Option<String>,
    /// First day, YYYY-MM-DD (UTC).
    #[arg(long)]
    from: Option<String>,
    /// Last day, YYYY-MM-DD (UTC), inclusive.
    #[arg(long)]
    to: Option<String>,
    /// Also show the requests refused each day, by a throttle and for the spent quota.
    #[arg(long)]
    detail: bool,
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
    /// Backfill an exporter: send what it has not sent of the days from --from to --to (the
    /// days before it started), and deliver their windows it has not delivered.
    Export {
        /// The config file: the exporter and the store it keeps its place in.
        #[arg(long, short)]
        config: PathBuf,
        /// The exporter, by name.
        #[arg(long)]
        exporter: String,
        /// First day, YYYY-MM-DD (UTC).
        #[arg(long)]
        from: String,
        /// Last day, YYYY-MM-DD (UTC), inclusive.
        #[arg(long)]
        to: String,
        /// Send the days' windows again, delivered or not, with the same ids.
        #[arg(long)]
        replay: bool,
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
        return print(&out, common.output(), &BTreeMap::new(), None);
    }
    if let Some(UsageAction::Export {
        config,
        exporter,
        from,
        to,
        replay,
    }) = &cmd.action
    {
        return export(config, exporter, (from, to), *replay);
    }
    let plan = cmd
        .plan
        .as_deref()
        .ok_or_else(|| Failure::Usage("--plan is required".into()))?;
    let from = parse_day("from", cmd.from.as_deref())?;
    let to = parse_day("to", cmd.to.as_deref())?;
    check_range(from, to).map_err(Failure::Usage)?;
    match (&cmd.config, &cmd.endpoint) {
        (Some(config), _) => offline(config, cmd, plan, from, to),
        (None, Some(endpoint)) => {
            let common = Common::new(
                EndpointArgs {
                    endpoint: endpoint.clone(),
                    region: cmd.region.clone(),
                    ca_bundle: cmd.ca_bundle.clone(),
                },
                cmd.output,
            );
            let (from, to) = (from.to_string(), to.to_string());
            let out = match &cmd.customer {
                Some(customer) => {
                    manage::remote_customer_usage(&common, plan, customer, &from, &to)
                }
                None => {
                    manage::remote_usage(&common, plan, cmd.key.as_deref(), &from, &to, cmd.detail)
                }
            }
            .map_err(Failure::Runtime)?;
            print(&out, cmd.output, &BTreeMap::new(), None)
        }
        (None, None) => Err(Failure::Usage(
            "give --config FILE (read the store) or --endpoint URL (ask the admin API)".into(),
        )),
    }
}

/// Runs `tollgate usage export`.
fn export(
    path: &std::path::Path,
    exporter: &str,
    (from, to): (&str, &str),
    replay: bool,
) -> Result<(), Failure> {
    let (from, to) = (parse_day("from", Some(from))?, parse_day("to", Some(to))?);
    check_range(from, to).map_err(Failure::Usage)?;
    let config = config::load(path)
        .and_then(|c| c.open(false).map(|()| c))
        .map_err(Failure::Config)?;
    let ex = config
        .gateway
        .exporters
        .iter()
        .find(|e| e.name == exporter)
        .ok_or_else(|| {
            let names: Vec<&str> = config
                .gateway
                .exporters
                .iter()
                .map(|e| e.name.as_str())
                .collect();
            Failure::Usage(format!(
                "no exporter {exporter:?} in {}; its exporters are: {}",
                path.display(),
                names.join(", ")
            ))
        })?;
    let store = config
        .store
        .kind
        .open_existing()
        .map_err(|e| Failure::Runtime(e.into()))?;
    let records = store.load().map_err(|e| Failure::Runtime(e.into()))?;
    let now =
        tollgate_core::clock::epoch_secs(tollgate_core::Clock::now(&tollgate_core::SystemClock));
    let done = backfill(&*store, ex, &records, (from, to), replay, now)
        .map_err(|e| Failure::Runtime(anyhow::anyhow!("exporter {exporter:?}: {e}")))?;
    println!(
        "{exporter}: {} days exported; {} windows delivered ({} records)",
        done.days, done.windows, done.records
    );
    Ok(())
}

fn offline(
    config: &std::path::Path,
    cmd: &UsageCommand,
    plan: &str,
    from: EpochDay,
    to: EpochDay,
) -> Result<(), Failure> {
    let (key, output) = (cmd.key.as_deref(), cmd.output);
    // Only the store: a report needs no key values (their `${VAR}`s may be unset here).
    let config = config::load_store(config).map_err(Failure::Config)?;
    let store = config
        .kind
        .open_existing()
        .map_err(|e| Failure::Runtime(e.into()))?;
    let records = store.load().map_err(|e| Failure::Runtime(e.into()))?;
    let plan = records
        .plans
        .iter()
        .find(|p| p.id == plan || p.name == plan)
        .ok_or_else(|| {
            Failure::Usage(format!(
                "no usage plan {plan:?} in {}",
                config.kind.describe()
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
    let runtime = |e: tollgate_store::StoreError| Failure::Runtime(e.into());
    let names = records
        .keys
        .iter()
        .map(|k| (k.id.clone(), k.name.clone()))
        .collect();
    let share_by = plan.limits_share_by();
    if let Some(customer) = &cmd.customer {
        if share_by.is_none() {
            return Err(Failure::Usage(format!(
                "usage plan {:?} does not share limits by customer (limitsShareBy)",
                plan.name
            )));
        }
        let keys: Vec<&str> = records
            .keys
            .iter()
            .filter(|k| members.contains(&k.id.as_str()))
            .filter(|k| customer_of(share_by, k.customer_id.as_deref()) == Some(customer))
            .map(|k| k.id.as_str())
            .collect();
        let usage = customer_usage(&*store, plan, customer, &keys, from, to).map_err(runtime)?;
        let usage = json!({"usagePlanId": plan.id, "customerId": customer, "startDate": from.to_string(), "endDate": to.to_string(), "items": usage.items, "values": usage.values});
        return print(&usage, output, &names, Some(&plan.name));
    }
    // Keys that share their customer's limits report what the customer has left.
    let shared = records
        .keys
        .iter()
        .filter_map(|k| {
            customer_of(share_by, k.customer_id.as_deref()).map(|c| (k.id.clone(), c.to_owned()))
        })
        .collect();
    let usage = plan_usage(&*store, &members, plan, key_id, from, to)
        .and_then(|u| u.with_customers(&*store, shared))
        .map_err(runtime)?;
    let values = if cmd.detail {
        let usage = usage.with_refusals(&*store, key_id).map_err(runtime)?;
        let detail: BTreeMap<&String, _> =
            usage.ids().iter().map(|k| (k, usage.detail(k))).collect();
        json!(detail)
    } else {
        json!(usage.all())
    };
    let usage = json!({"usagePlanId": plan.id, "startDate": from.to_string(), "endDate": to.to_string(), "values": values});
    print(&usage, output, &names, Some(&plan.name))
}

/// Prints a Usage: JSON as is, or one row per key and day, under the plan's name when known.
fn print(
    usage: &Value,
    output: Output,
    names: &BTreeMap<String, String>,
    plan_name: Option<&str>,
) -> Result<(), Failure> {
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
    let id = usage["usagePlanId"].as_str().unwrap_or("");
    let plan = match plan_name {
        Some(name) => format!("{name} ({id})"),
        None => id.to_owned(),
    };
    println!(
        "usage plan {plan}, {start} to {}",
        usage["endDate"].as_str().unwrap_or("")
    );
    let values = usage["values"].as_object();
    // A detailed report's days are objects; GetUsage's are `[used, remaining]`.
    let detail = values
        .and_then(|v| v.values().next())
        .and_then(|days| days.get(0))
        .is_some_and(Value::is_object);
    print!(
        "{:<12} {:<24} {:<10} {:>10} {:>10}",
        "KEY ID", "KEY NAME", "DATE", "USED", "REMAINING"
    );
    println!(
        "{}",
        if detail {
            "  THROTTLED  QUOTA EXCEEDED"
        } else {
            ""
        }
    );
    let n = |v: &Value| v.as_u64().unwrap_or(0);
    // A customer's report: its keys together first.
    if let (Some(customer), Some(days)) = (usage["customerId"].as_str(), usage["items"].as_array())
    {
        let mut day = first;
        for v in days {
            let (used, remaining) = (n(&v[0]), n(&v[1]));
            println!(
                "{:<12} {customer:<24} {day} {used:>10} {remaining:>10}",
                "(customer)"
            );
            day = day.next();
        }
    }
    for (key_id, days) in values.into_iter().flatten() {
        let name = names.get(key_id).map_or("", String::as_str);
        let mut day = first;
        for v in days.as_array().into_iter().flatten() {
            if detail {
                let (used, remaining) = (n(&v["used"]), n(&v["remaining"]));
                let (throttled, exceeded) = (n(&v["throttled"]), n(&v["quotaExceeded"]));
                println!(
                    "{key_id:<12} {name:<24} {day} {used:>10} {remaining:>10} {throttled:>10} {exceeded:>14}"
                );
            } else {
                let (used, remaining) = (n(&v[0]), n(&v[1]));
                println!("{key_id:<12} {name:<24} {day} {used:>10} {remaining:>10}");
            }
            day = day.next();
        }
    }
    Ok(())
}
