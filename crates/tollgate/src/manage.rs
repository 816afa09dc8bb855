//! `tollgate keys …`, `tollgate plans …`, `tollgate usage set-remaining`: the admin API from the
//! command line, as readable tables or the API's JSON.

use std::collections::BTreeMap;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use clap::{Args, Subcommand, ValueEnum};
use http::Method;
use serde_json::{Value, json};
use tollgate_admin::wire::{
    ApiStageIn, CreateApiKeyIn, CreateUsagePlanIn, CreateUsagePlanKeyIn, PatchIn, PatchOp, QuotaIn,
    RotateApiKeyIn, ThrottleIn, pointer_escape,
};
use tollgate_core::credits::{CREDIT_REFILL_TAG, Refill};

use crate::remote::{EndpointArgs, Remote, encode};

/// Table or JSON.
#[derive(Debug, Clone, Copy, Default, ValueEnum)]
pub enum Output {
    /// Aligned columns.
    #[default]
    Table,
    /// The admin API's JSON.
    Json,
}

/// Flags every remote command takes.
#[derive(Debug, Args)]
pub struct Common {
    #[command(flatten)]
    endpoint: EndpointArgs,
    /// Output format.
    #[arg(long, value_enum, default_value_t = Output::Table)]
    output: Output,
}

/// `tollgate keys …`
#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Create a key (its value is shown once).
    Create {
        #[command(flatten)]
        common: Common,
        /// Name.
        #[arg(long)]
        name: String,
        /// Value (20-128 characters; generated when absent).
        #[arg(long)]
        value: Option<String>,
        /// Description.
        #[arg(long)]
        description: Option<String>,
        /// Customer id.
        #[arg(long)]
        customer_id: Option<String>,
        /// Create it disabled (AWS's default is disabled; tollgate's CLI enables unless told).
        #[arg(long)]
        disabled: bool,
        /// A tag, as KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
        /// When the key stops working, RFC 3339 (e.g. 2027-01-31T00:00:00Z).
        #[arg(long)]
        expires_at: Option<String>,
    },
    /// List keys.
    List {
        #[command(flatten)]
        common: Common,
        /// Name prefix.
        #[arg(long)]
        name: Option<String>,
        /// Customer id.
        #[arg(long)]
        customer_id: Option<String>,
        /// Include values (only with encrypted storage).
        #[arg(long)]
        include_values: bool,
    },
    /// Show one key.
    Get {
        #[command(flatten)]
        common: Common,
        /// Key id.
        id: String,
        /// Include the value (only with encrypted storage).
        #[arg(long)]
        include_value: bool,
    },
    /// Change a key.
    Update {
        #[command(flatten)]
        common: Common,
        /// Key id.
        id: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        /// New description.
        #[arg(long)]
        description: Option<String>,
        /// New customer id.
        #[arg(long)]
        customer_id: Option<String>,
        /// Enable or disable.
        #[arg(long)]
        enabled: Option<bool>,
        /// When the key stops working, RFC 3339.
        #[arg(long, conflicts_with = "no_expiry")]
        expires_at: Option<String>,
        /// Remove the key's expiry.
        #[arg(long)]
        no_expiry: bool,
    },
    /// Give a key a new value; the current one keeps working for a grace period.
    Rotate {
        #[command(flatten)]
        common: Common,
        /// Key id.
        id: String,
        /// The new value (20-128 characters; generated when absent). Shown once.
        #[arg(long)]
        value: Option<String>,
        /// How long the current value keeps working: 30m, 24h, 7d, 0 (default 24h).
        #[arg(long, default_value = "24h", value_parser = parse_grace)]
        grace: u64,
    },
    /// Which key a value belongs to (found by its hash; values are not kept).
    Find {
        #[command(flatten)]
        common: Common,
        /// The value a partner sent.
        #[arg(long)]
        value: String,
    },
    /// Add prepaid credits to a key (once per idempotency key), and set or remove its refill.
    Credits {
        #[command(flatten)]
        common: Common,
        /// Key id.
        id: String,
        /// Credits to add.
        #[arg(long)]
        add: Option<u64>,
        /// Adds once: the same idempotency key again adds nothing (default: every call adds).
        #[arg(long, requires = "add")]
        idempotency_key: Option<String>,
        /// Bring the balance back up to AMOUNT at the key's first use in each PERIOD, as
        /// 1000/MONTH (DAY, WEEK or MONTH); `none` removes the refill.
        #[arg(long)]
        refill: Option<String>,
    },
    /// Add or change tags on a key.
    Tag {
        #[command(flatten)]
        common: Common,
        /// Key id.
        id: String,
        /// Tags, as KEY=VALUE.
        #[arg(required = true, value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// Remove tags from a key.
    Untag {
        #[command(flatten)]
        common: Common,
        /// Key id.
        id: String,
        /// Tag keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Delete a key (and its plan memberships).
    Delete {
        #[command(flatten)]
        common: Common,
        /// Key id.
        id: String,
    },
    /// Import keys from an AWS-format CSV file.
    Import {
        #[command(flatten)]
        common: Common,
        /// The CSV file.
        file: PathBuf,
        /// Import nothing if any row has a problem.
        #[arg(long)]
        fail_on_warnings: bool,
    },
}

/// Plan settings shared by create and update.
#[derive(Debug, Args)]
pub struct PlanFlags {
    /// Description.
    #[arg(long)]
    description: Option<String>,
    /// Throttle: requests per second per key.
    #[arg(long)]
    rate_limit: Option<f64>,
    /// Throttle: burst per key.
    #[arg(long)]
    burst_limit: Option<u32>,
    /// Quota: requests per period per key.
    #[arg(long)]
    quota_limit: Option<u32>,
    /// Quota period: DAY, WEEK or MONTH.
    #[arg(long)]
    quota_period: Option<String>,
    /// Quota offset in days.
    #[arg(long)]
    quota_offset: Option<u32>,
    /// An API stage the plan covers, as API:STAGE (repeatable).
    #[arg(long = "api-stage")]
    api_stages: Vec<String>,
    /// A per-method throttle, as API:STAGE/path/METHOD=RATE,BURST (repeatable).
    #[arg(long = "method-throttle")]
    method_throttles: Vec<String>,
}

/// `tollgate plans …`
#[derive(Debug, Subcommand)]
pub enum PlansCommand {
    /// Create a usage plan.
    Create {
        #[command(flatten)]
        common: Common,
        /// Name.
        #[arg(long)]
        name: String,
        #[command(flatten)]
        flags: PlanFlags,
        /// A tag, as KEY=VALUE (repeatable).
        #[arg(long = "tag", value_parser = parse_tag)]
        tags: Vec<(String, String)>,
    },
    /// List usage plans.
    List {
        #[command(flatten)]
        common: Common,
        /// Only plans containing this key id.
        #[arg(long)]
        key_id: Option<String>,
    },
    /// Show one plan.
    Get {
        #[command(flatten)]
        common: Common,
        /// Plan id.
        id: String,
    },
    /// Change a plan: given flags replace, --api-stage adds.
    Update {
        #[command(flatten)]
        common: Common,
        /// Plan id.
        id: String,
        /// New name.
        #[arg(long)]
        name: Option<String>,
        #[command(flatten)]
        flags: PlanFlags,
        /// Remove an API stage, as API:STAGE (repeatable).
        #[arg(long = "remove-api-stage")]
        remove_api_stages: Vec<String>,
        /// Remove the throttle.
        #[arg(long)]
        remove_throttle: bool,
        /// Remove the quota.
        #[arg(long)]
        remove_quota: bool,
    },
    /// Delete a plan.
    Delete {
        #[command(flatten)]
        common: Common,
        /// Plan id.
        id: String,
    },
    /// Put a key in a plan.
    AddKey {
        #[command(flatten)]
        common: Common,
        /// Plan id.
        plan: String,
        /// Key id.
        key: String,
    },
    /// Take a key out of a plan.
    RemoveKey {
        #[command(flatten)]
        common: Common,
        /// Plan id.
        plan: String,
        /// Key id.
        key: String,
    },
    /// List a plan's keys.
    Keys {
        #[command(flatten)]
        common: Common,
        /// Plan id.
        plan: String,
    },
}

fn print(output: Output, value: &Value, columns: &[(&str, &str)]) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        ),
        Output::Table => {
            let rows: Vec<&Value> = match value.get("item") {
                Some(Value::Array(items)) => items.iter().collect(),
                _ => vec![value],
            };
            let cell = |row: &Value, field: &str| -> String {
                let value = match field.strip_prefix('/') {
                    Some(_) => row.pointer(field).unwrap_or(&Value::Null),
                    None => &row[field],
                };
                match value {
                    Value::Null => "-".into(),
                    // The first 4 characters and the length: enough to tell keys apart.
                    Value::String(p) if field == "valuePrefix" => {
                        format!("{p}…({})", row["valueLength"].as_u64().unwrap_or(0))
                    }
                    Value::String(s) => s.clone(),
                    Value::Array(a) if field == "apiStages" => a
                        .iter()
                        .map(|s| {
                            format!(
                                "{}:{}",
                                s["apiId"].as_str().unwrap_or(""),
                                s["stage"].as_str().unwrap_or("")
                            )
                        })
                        .collect::<Vec<_>>()
                        .join(","),
                    Value::Object(o) if field == "throttle" => {
                        format!(
                            "{}/s burst {}",
                            o.get("rateLimit").unwrap_or(&Value::Null),
                            o.get("burstLimit").unwrap_or(&Value::Null)
                        )
                    }
                    Value::Number(n) if field == "lastUsedDate" => n
                        .as_i64()
                        .and_then(|secs| jiff::Timestamp::from_second(secs).ok())
                        .map_or_else(
                            || n.to_string(),
                            |t| t.strftime("%Y-%m-%d %H:%MZ").to_string(),
                        ),
                    Value::Object(o) if field == "quota" => format!(
                        "{}/{} +{}",
                        o.get("limit").unwrap_or(&Value::Null),
                        o.get("period").and_then(Value::as_str).unwrap_or(""),
                        o.get("offset").unwrap_or(&Value::Null)
                    ),
                    other => other.to_string(),
                }
            };
            let table: Vec<Vec<String>> = rows
                .iter()
                .map(|r| columns.iter().map(|(_, f)| cell(r, f)).collect())
                .collect();
            let widths: Vec<usize> = columns
                .iter()
                .enumerate()
                .map(|(i, (h, _))| {
                    table
                        .iter()
                        .map(|r| r[i].len())
                        .chain([h.len()])
                        .max()
                        .unwrap_or(0)
                })
                .collect();
            let line = |cells: Vec<&str>| {
                let padded: Vec<String> = cells
                    .iter()
                    .zip(&widths)
                    .map(|(c, w)| format!("{c:<w$}"))
                    .collect();
                println!("{}", padded.join("  ").trim_end());
            };
            line(columns.iter().map(|(h, _)| *h).collect());
            for row in &table {
                line(row.iter().map(String::as_str).collect());
            }
            if let Some(pos) = value.get("position").and_then(Value::as_str) {
                println!("(more: --position {pos})");
            }
        }
    }
}

const KEY_COLUMNS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("NAME", "name"),
    ("ENABLED", "enabled"),
    ("CUSTOMER", "customerId"),
    ("VALUE STARTS", "valuePrefix"),
    ("EXPIRES", "expiresAt"),
    ("LAST USED", "lastUsedDate"),
    ("VALUE", "value"),
];
/// A rotation's answer: the new value, and until when the old one works.
/// `tollgate events`.
#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// The outbox's events: failed ones (default), or pending ones.
    List {
        #[command(flatten)]
        common: Common,
        /// `failed` or `pending`.
        #[arg(long, default_value = "failed")]
        status: String,
    },
    /// Deliver a failed event again.
    Retry {
        #[command(flatten)]
        common: Common,
        /// Event id.
        id: String,
    },
    /// Send a test event to a webhook.
    Test {
        #[command(flatten)]
        common: Common,
        /// Webhook name.
        webhook: String,
    },
}

/// Runs `tollgate events`.
pub fn events(cmd: EventsCommand) -> anyhow::Result<()> {
    match cmd {
        EventsCommand::List { common, status } => {
            let path = format!("/tollgate/events?status={}", encode(&status));
            let out = common.remote()?.json(Method::GET, &path, &())?;
            print(common.output, &out, EVENT_COLUMNS);
        }
        EventsCommand::Retry { common, id } => {
            let path = format!("/tollgate/events/{}/retry", encode(&id));
            let out = common.remote()?.json(Method::POST, &path, &())?;
            print(common.output, &out, EVENT_COLUMNS);
        }
        EventsCommand::Test { common, webhook } => {
            let path = format!("/tollgate/webhooks/{}/test", encode(&webhook));
            let out = common.remote()?.json(Method::POST, &path, &())?;
            print(common.output, &out, EVENT_COLUMNS);
        }
    }
    Ok(())
}

const EVENT_COLUMNS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("TYPE", "/event/type"),
    ("WEBHOOK", "webhook"),
    ("STATUS", "status"),
    ("ATTEMPTS", "attempts"),
    ("LAST ERROR", "lastError"),
];

/// JSON pointers reach into the answer's `credits`.
const CREDIT_COLUMNS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("ADDED", "added"),
    ("BALANCE", "/credits/balance"),
    ("REFILL", "/credits/refill/amount"),
    ("EACH", "/credits/refill/period"),
];
const ROTATED_COLUMNS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("NAME", "name"),
    ("VALUE", "value"),
    ("OLD VALUE WORKS UNTIL", "previousValueExpiresAt"),
];
const PLAN_COLUMNS: &[(&str, &str)] = &[
    ("ID", "id"),
    ("NAME", "name"),
    ("API STAGES", "apiStages"),
    ("THROTTLE", "throttle"),
    ("QUOTA", "quota"),
];
const PLAN_KEY_COLUMNS: &[(&str, &str)] = &[("ID", "id"), ("TYPE", "type"), ("NAME", "name")];

/// Runs `tollgate keys …`.
pub fn keys(cmd: KeysCommand) -> anyhow::Result<()> {
    match cmd {
        KeysCommand::Create {
            common,
            name,
            value,
            description,
            customer_id,
            disabled,
            tags,
            expires_at,
        } => {
            let body = CreateApiKeyIn {
                name: Some(name),
                value,
                description,
                customer_id,
                enabled: Some(!disabled),
                tags: (!tags.is_empty()).then(|| tags.into_iter().collect()),
                expires_at,
                ..CreateApiKeyIn::default()
            };
            let out = common.remote()?.json(Method::POST, "/apikeys", &body)?;
            print(common.output, &out, KEY_COLUMNS);
        }
        KeysCommand::List {
            common,
            name,
            customer_id,
            include_values,
        } => {
            let mut query = vec![
                format!("includeValues={include_values}"),
                "limit=500".to_string(),
            ];
            query.extend(name.map(|n| format!("name={}", encode(&n))));
            query.extend(customer_id.map(|c| format!("customerId={}", encode(&c))));
            let out = list_all(&common.remote()?, "/apikeys", &query)?;
            print(common.output, &out, KEY_COLUMNS);
        }
        KeysCommand::Get {
            common,
            id,
            include_value,
        } => {
            let out = common.remote()?.json(
                Method::GET,
                &format!("/apikeys/{}?includeValue={include_value}", encode(&id)),
                &(),
            )?;
            print(common.output, &out, KEY_COLUMNS);
        }
        KeysCommand::Update {
            common,
            id,
            name,
            description,
            customer_id,
            enabled,
            expires_at,
            no_expiry,
        } => {
            let mut ops = Vec::new();
            if no_expiry {
                ops.push(PatchOp::new("remove", "/expiresAt", None));
            }
            let mut replace = |path: &str, value: Option<String>| {
                if let Some(v) = value {
                    ops.push(PatchOp::new("replace", path, Some(v)));
                }
            };
            replace("/name", name);
            replace("/description", description);
            replace("/customerId", customer_id);
            replace("/enabled", enabled.map(|e| e.to_string()));
            replace("/expiresAt", expires_at);
            if ops.is_empty() {
                bail!(
                    "nothing to change: give --name, --description, --customer-id, --enabled, --expires-at or --no-expiry"
                );
            }
            let out = common.remote()?.json(
                Method::PATCH,
                &format!("/apikeys/{}", encode(&id)),
                &PatchIn {
                    patch_operations: ops,
                },
            )?;
            print(common.output, &out, KEY_COLUMNS);
        }
        KeysCommand::Rotate {
            common,
            id,
            value,
            grace,
        } => {
            let body = RotateApiKeyIn {
                value,
                grace_seconds: Some(grace),
            };
            let path = format!("/tollgate/apikeys/{}/rotate", encode(&id));
            let out = common.remote()?.json(Method::POST, &path, &body)?;
            print(common.output, &out, ROTATED_COLUMNS);
        }
        KeysCommand::Credits {
            common,
            id,
            add,
            idempotency_key,
            refill,
        } => {
            if add.is_none() && refill.is_none() {
                bail!("give --add N, --refill AMOUNT/PERIOD, or both");
            }
            let remote = common.remote()?;
            let tags = tags_path(&common, "apikeys", &id);
            match refill.as_deref() {
                None => {}
                Some("none") => {
                    let path = format!("{tags}?tagKeys={}", encode(CREDIT_REFILL_TAG));
                    remote.json(Method::DELETE, &path, &())?;
                }
                Some(text) => {
                    let refill =
                        Refill::parse(text).map_err(|e| anyhow::anyhow!("--refill: {e}"))?;
                    let tag = BTreeMap::from([(CREDIT_REFILL_TAG, refill.to_tag())]);
                    let body = json!({ "tags": tag });
                    remote.json(Method::PUT, &tags, &body)?;
                }
            }
            let out = match add {
                Some(add) => {
                    let body = json!({ "add": add, "idempotencyKey": idempotency_key });
                    let path = format!("/tollgate/apikeys/{}/credits", encode(&id));
                    remote.json(Method::POST, &path, &body)?
                }
                None => remote.json(Method::GET, &format!("/apikeys/{}", encode(&id)), &())?,
            };
            print(common.output, &out, CREDIT_COLUMNS);
        }
        KeysCommand::Find { common, value } => {
            let body = json!({ "value": value });
            let out = common
                .remote()?
                .json(Method::POST, "/tollgate/apikeys/find", &body)?;
            print(common.output, &out, KEY_COLUMNS);
        }
        KeysCommand::Tag { common, id, tags } => {
            let body = json!({ "tags": tags.into_iter().collect::<BTreeMap<_, _>>() });
            let remote = common.remote()?;
            remote.json(Method::PUT, &tags_path(&common, "apikeys", &id), &body)?;
            println!("tagged API key {id}");
        }
        KeysCommand::Untag { common, id, keys } => {
            let query: Vec<String> = keys
                .iter()
                .map(|k| format!("tagKeys={}", encode(k)))
                .collect();
            let path = format!("{}?{}", tags_path(&common, "apikeys", &id), query.join("&"));
            common.remote()?.json(Method::DELETE, &path, &())?;
            println!("untagged API key {id}");
        }
        KeysCommand::Delete { common, id } => {
            common
                .remote()?
                .json(Method::DELETE, &format!("/apikeys/{}", encode(&id)), &())?;
            println!("deleted API key {id}");
        }
        KeysCommand::Import {
            common,
            file,
            fail_on_warnings,
        } => {
            let csv = std::fs::read_to_string(&file)
                .with_context(|| format!("reading {}", file.display()))?;
            let path = format!("/apikeys?mode=import&format=csv&failonwarnings={fail_on_warnings}");
            let out = common
                .remote()?
                .call(Method::POST, &path, &csv, "text/csv")?;
            match common.output {
                Output::Json => println!("{}", serde_json::to_string_pretty(&out)?),
                Output::Table => {
                    for id in out["ids"].as_array().into_iter().flatten() {
                        println!("imported {}", id.as_str().unwrap_or(""));
                    }
                    for w in out["warnings"].as_array().into_iter().flatten() {
                        println!("warning: {}", w.as_str().unwrap_or(""));
                    }
                }
            }
        }
    }
    Ok(())
}

/// `/tags/{arn}` for the resource `kind` (`apikeys`, `usageplans`) `id`, the ARN in `common`'s region.
fn tags_path(common: &Common, kind: &str, id: &str) -> String {
    let arn = format!(
        "arn:aws:apigateway:{}::/{kind}/{id}",
        common.endpoint.region
    );
    format!("/tags/{}", encode(&arn))
}

/// `KEY=VALUE`.
fn parse_tag(text: &str) -> Result<(String, String), String> {
    let (k, v) = text
        .split_once('=')
        .ok_or_else(|| format!("{text:?}: expected KEY=VALUE"))?;
    Ok((k.to_owned(), v.to_owned()))
}

/// A grace period in whole seconds.
fn parse_grace(text: &str) -> Result<u64, String> {
    crate::config::parse_duration(text).map(|d| d.as_secs())
}

/// Follows `position` until the list ends.
fn list_all(remote: &Remote, path: &str, query: &[String]) -> anyhow::Result<Value> {
    let mut items = Vec::new();
    let mut position: Option<String> = None;
    loop {
        let mut q = query.to_vec();
        q.extend(position.as_ref().map(|p| format!("position={}", encode(p))));
        let page = remote.json(Method::GET, &format!("{path}?{}", q.join("&")), &())?;
        items.extend(page["item"].as_array().cloned().unwrap_or_default());
        match page.get("position").and_then(Value::as_str) {
            Some(p) => position = Some(p.to_string()),
            None => return Ok(json!({ "item": items })),
        }
    }
}

/// `API:STAGE/path/METHOD=RATE,BURST` → (api, stage, "/path/METHOD", rate, burst).
fn parse_method_throttle(spec: &str) -> anyhow::Result<(String, String, String, f64, u32)> {
    let bad =
        || anyhow::anyhow!("--method-throttle {spec:?}: expected API:STAGE/path/METHOD=RATE,BURST");
    let (target, limits) = spec.rsplit_once('=').ok_or_else(bad)?;
    let (stage_ref, method) = target.split_at(target.find('/').ok_or_else(bad)?);
    let (api, stage) = stage_ref.split_once(':').ok_or_else(bad)?;
    let (rate, burst) = limits.split_once(',').ok_or_else(bad)?;
    Ok((
        api.into(),
        stage.into(),
        method.into(),
        rate.trim().parse().map_err(|_| bad())?,
        burst.trim().parse().map_err(|_| bad())?,
    ))
}

fn plan_body(name: String, f: &PlanFlags) -> anyhow::Result<CreateUsagePlanIn> {
    let stage_in = |api: &str, stage: &str| ApiStageIn {
        api_id: Some(api.to_owned()),
        stage: Some(stage.to_owned()),
        throttle: None,
    };
    let mut stages = Vec::new();
    for s in &f.api_stages {
        let (api, stage) = s
            .split_once(':')
            .with_context(|| format!("--api-stage {s:?}: expected API:STAGE"))?;
        stages.push(stage_in(api, stage));
    }
    for spec in &f.method_throttles {
        let (api, stage, method, rate, burst) = parse_method_throttle(spec)?;
        let at = match stages
            .iter()
            .position(|s| s.api_id.as_ref() == Some(&api) && s.stage.as_ref() == Some(&stage))
        {
            Some(at) => at,
            None => {
                stages.push(stage_in(&api, &stage));
                stages.len() - 1
            }
        };
        stages[at].throttle.get_or_insert_default().insert(
            method,
            ThrottleIn {
                rate_limit: Some(rate),
                burst_limit: Some(i64::from(burst)),
            },
        );
    }
    let throttle = (f.rate_limit.is_some() || f.burst_limit.is_some()).then(|| ThrottleIn {
        rate_limit: Some(f.rate_limit.unwrap_or(0.0)),
        burst_limit: Some(f.burst_limit.map_or(0, i64::from)),
    });
    let quota = f.quota_limit.map(|limit| QuotaIn {
        limit: Some(i64::from(limit)),
        period: Some(f.quota_period.clone().unwrap_or_else(|| "MONTH".into())),
        offset: Some(i64::from(f.quota_offset.unwrap_or(0))),
    });
    Ok(CreateUsagePlanIn {
        name: Some(name),
        description: f.description.clone(),
        api_stages: Some(stages),
        throttle,
        quota,
        tags: None,
    })
}

/// Runs `tollgate plans …`.
pub fn plans(cmd: PlansCommand) -> anyhow::Result<()> {
    match cmd {
        PlansCommand::Create {
            common,
            name,
            flags,
            tags,
        } => {
            let mut body = plan_body(name, &flags)?;
            body.tags = (!tags.is_empty()).then(|| tags.into_iter().collect());
            let out = common.remote()?.json(Method::POST, "/usageplans", &body)?;
            print(common.output, &out, PLAN_COLUMNS);
        }
        PlansCommand::List { common, key_id } => {
            let mut query = vec!["limit=500".to_string()];
            query.extend(key_id.map(|k| format!("keyId={}", encode(&k))));
            let out = list_all(&common.remote()?, "/usageplans", &query)?;
            print(common.output, &out, PLAN_COLUMNS);
        }
        PlansCommand::Get { common, id } => {
            let out =
                common
                    .remote()?
                    .json(Method::GET, &format!("/usageplans/{}", encode(&id)), &())?;
            print(common.output, &out, PLAN_COLUMNS);
        }
        PlansCommand::Update {
            common,
            id,
            name,
            flags,
            remove_api_stages,
            remove_throttle,
            remove_quota,
        } => {
            let op = |op: &str, path: &str, value: String| PatchOp::new(op, path, Some(value));
            let mut ops = Vec::new();
            if let Some(n) = name {
                ops.push(op("replace", "/name", n));
            }
            if let Some(d) = &flags.description {
                ops.push(op("replace", "/description", d.clone()));
            }
            if remove_throttle {
                ops.push(PatchOp::new("remove", "/throttle", None));
            }
            if remove_quota {
                ops.push(PatchOp::new("remove", "/quota", None));
            }
            let numbers = [
                (
                    "/throttle/rateLimit",
                    flags.rate_limit.map(|v| v.to_string()),
                ),
                (
                    "/throttle/burstLimit",
                    flags.burst_limit.map(|v| v.to_string()),
                ),
                ("/quota/limit", flags.quota_limit.map(|v| v.to_string())),
                ("/quota/period", flags.quota_period.clone()),
                ("/quota/offset", flags.quota_offset.map(|v| v.to_string())),
            ];
            for (path, value) in numbers {
                if let Some(v) = value {
                    ops.push(op("replace", path, v));
                }
            }
            for s in &flags.api_stages {
                ops.push(op("add", "/apiStages", s.clone()));
            }
            for s in &remove_api_stages {
                ops.push(op("remove", "/apiStages", s.clone()));
            }
            for spec in &flags.method_throttles {
                let (api, stage, method, rate, burst) = parse_method_throttle(spec)?;
                let base = format!(
                    "/apiStages/{api}:{stage}/throttle/{}",
                    pointer_escape(&method)
                );
                ops.push(op(
                    "replace",
                    &format!("{base}/rateLimit"),
                    rate.to_string(),
                ));
                ops.push(op(
                    "replace",
                    &format!("{base}/burstLimit"),
                    burst.to_string(),
                ));
            }
            if ops.is_empty() {
                bail!("nothing to change");
            }
            let out = common.remote()?.json(
                Method::PATCH,
                &format!("/usageplans/{}", encode(&id)),
                &PatchIn {
                    patch_operations: ops,
                },
            )?;
            print(common.output, &out, PLAN_COLUMNS);
        }
        PlansCommand::Delete { common, id } => {
            common
                .remote()?
                .json(Method::DELETE, &format!("/usageplans/{}", encode(&id)), &())?;
            println!("deleted usage plan {id}");
        }
        PlansCommand::AddKey { common, plan, key } => {
            let out = common.remote()?.json(
                Method::POST,
                &format!("/usageplans/{}/keys", encode(&plan)),
                &CreateUsagePlanKeyIn {
                    key_id: Some(key),
                    key_type: Some("API_KEY".into()),
                },
            )?;
            print(common.output, &out, PLAN_KEY_COLUMNS);
        }
        PlansCommand::RemoveKey { common, plan, key } => {
            common.remote()?.json(
                Method::DELETE,
                &format!("/usageplans/{}/keys/{}", encode(&plan), encode(&key)),
                &(),
            )?;
            println!("removed API key {key} from usage plan {plan}");
        }
        PlansCommand::Keys { common, plan } => {
            let out = list_all(
                &common.remote()?,
                &format!("/usageplans/{}/keys", encode(&plan)),
                &["limit=500".into()],
            )?;
            print(common.output, &out, PLAN_KEY_COLUMNS);
        }
    }
    Ok(())
}

/// Runs `tollgate usage set-remaining`.
pub fn set_remaining(
    common: &Common,
    plan: &str,
    key: &str,
    remaining: i64,
) -> anyhow::Result<Value> {
    let body = PatchIn {
        patch_operations: vec![PatchOp::new(
            "replace",
            "/remaining",
            Some(remaining.to_string()),
        )],
    };
    common.remote()?.json(
        Method::PATCH,
        &format!("/usageplans/{}/keys/{}/usage", encode(plan), encode(key)),
        &body,
    )
}

/// GetUsage through the admin API.
pub fn remote_usage(
    common: &Common,
    plan: &str,
    key: Option<&str>,
    from: &str,
    to: &str,
    detail: bool,
) -> anyhow::Result<Value> {
    let mut q = format!(
        "startDate={}&endDate={}&limit=500",
        encode(from),
        encode(to)
    );
    if let Some(k) = key {
        q.push_str(&format!("&keyId={}", encode(k)));
    }
    let prefix = if detail { "/tollgate" } else { "" };
    common.remote()?.json(
        Method::GET,
        &format!("{prefix}/usageplans/{}/usage?{q}", encode(plan)),
        &(),
    )
}

/// A customer's usage in a plan that shares limits by customer, per day from `from` to `to`.
pub fn remote_customer_usage(
    common: &Common,
    plan: &str,
    customer: &str,
    from: &str,
    to: &str,
) -> anyhow::Result<Value> {
    common.remote()?.json(
        Method::GET,
        &format!(
            "/tollgate/usageplans/{}/customers/{}/usage?startDate={}&endDate={}",
            encode(plan),
            encode(customer),
            encode(from),
            encode(to)
        ),
        &(),
    )
}

impl Common {
    /// Flags built from parts (for commands with their own flag layout).
    pub fn new(endpoint: EndpointArgs, output: Output) -> Self {
        Self { endpoint, output }
    }

    /// The chosen output format.
    pub fn output(&self) -> Output {
        self.output
    }

    /// A client for the chosen endpoint.
    fn remote(&self) -> anyhow::Result<Remote> {
        Remote::new(&self.endpoint)
    }
}
