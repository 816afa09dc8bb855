//! Reading a Serverless Framework `serverless.yml` (v1 `provider.apiKeys`/`provider.usagePlan` and
//! v2.18+/v3 `provider.apiGateway.*` layouts) into tollgate's native config.
//!
//! The file becomes the native YAML document (what `tollgate import serverless` prints), which then
//! goes through the one config validator, so both paths accept exactly the same things.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value, json};

use crate::config::{self, Config, ConfigError};

/// How to turn a serverless.yml into a gateway.
#[derive(Debug, Clone, Default)]
pub struct ServerlessOptions {
    /// The serverless.yml.
    pub file: PathBuf,
    /// `--stage` (default: `provider.stage`, else `dev`).
    pub stage: Option<String>,
    /// Upstream for every function without its own.
    pub upstream: Option<String>,
    /// Per-function upstreams, `NAME=URL`.
    pub functions: Vec<String>,
    /// Data-plane address.
    pub listen: String,
    /// SQLite file.
    pub store: String,
    /// Admin API address, if any.
    pub admin: Option<String>,
}

fn err(file: &Path, field: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError {
        file: file.to_path_buf(),
        position: None,
        field: field.into(),
        message: message.into(),
    }
}

/// Variable sources tollgate resolves: `${env:X}`, `${opt:stage}`, `${sls:stage}`, `${self:a.b}`,
/// quoted and numeric literals, and `, fallback` lists.
struct Vars<'a> {
    file: &'a Path,
    root: &'a Value,
    opt_stage: Option<&'a str>,
    stage: Option<String>,
}

const MAX_DEPTH: usize = 16;

impl Vars<'_> {
    fn resolve(&self, v: &Value, path: &str, depth: usize) -> Result<Value, ConfigError> {
        if depth > MAX_DEPTH {
            return Err(err(
                self.file,
                path,
                "variables nest too deeply (a ${self:…} cycle?)",
            ));
        }
        Ok(match v {
            Value::String(s) => self.resolve_string(s, path, depth)?,
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, x)| self.resolve(x, &format!("{path}[{i}]"), depth))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, x)| Ok((k.clone(), self.resolve(x, &join(path, k), depth)?)))
                    .collect::<Result<_, ConfigError>>()?,
            ),
            other => other.clone(),
        })
    }

    fn resolve_string(&self, s: &str, path: &str, depth: usize) -> Result<Value, ConfigError> {
        let Some(start) = s.find("${") else {
            return Ok(Value::String(s.to_string()));
        };
        let end = closing_brace(s, start)
            .ok_or_else(|| err(self.file, path, format!("unterminated variable in {s:?}")))?;
        let value = self.expression(&s[start + 2..end], &s[start..=end], path, depth)?;
        if start == 0 && end == s.len() - 1 {
            // The whole string is one variable: keep the value's type (number, object, …).
            return Ok(value);
        }
        let text = match &value {
            Value::String(t) => t.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            _ => {
                return Err(err(
                    self.file,
                    path,
                    format!(
                        "{} is not text and cannot be part of {s:?}",
                        &s[start..=end]
                    ),
                ));
            }
        };
        let rest = self.resolve_string(&s[end + 1..], path, depth)?;
        let rest = rest.as_str().unwrap_or_default();
        Ok(Value::String(format!("{}{text}{rest}", &s[..start])))
    }

    /// One `${…}`: the first of its comma-separated sources that has a value.
    fn expression(
        &self,
        expr: &str,
        whole: &str,
        path: &str,
        depth: usize,
    ) -> Result<Value, ConfigError> {
        let mut missing = Vec::new();
        for source in split_top_level(expr) {
            let source = source.trim();
            let found = if source.starts_with("${") {
                Some(self.resolve_string(source, path, depth + 1)?)
            } else if let Some(lit) = quoted(source) {
                Some(Value::String(lit.to_string()))
            } else if let Ok(n) = source.parse::<f64>() {
                serde_json::Number::from_f64(n).map(Value::Number)
            } else if source == "opt:stage" {
                self.opt_stage.map(|s| Value::String(s.into()))
            } else if source == "sls:stage" {
                match &self.stage {
                    Some(stage) => Some(Value::String(stage.clone())),
                    None => {
                        return Err(err(
                            self.file,
                            path,
                            "provider.stage cannot use ${sls:stage}",
                        ));
                    }
                }
            } else if let Some(name) = source.strip_prefix("env:") {
                let v = std::env::var(name.trim()).ok();
                if v.is_none() {
                    missing.push(format!("environment variable {} is not set", name.trim()));
                }
                v.map(Value::String)
            } else if let Some(target) = source.strip_prefix("self:") {
                let mut at = self.root;
                for part in target.trim().split('.').filter(|p| !p.is_empty()) {
                    at = at.get(part).unwrap_or(&Value::Null);
                }
                match at {
                    Value::Null => {
                        missing.push(format!("{target} is not in the file"));
                        None
                    }
                    found => Some(self.resolve(found, target, depth + 1)?),
                }
            } else if source.starts_with("opt:") {
                None
            } else {
                return Err(err(
                    self.file,
                    path,
                    format!(
                        "unsupported variable {whole}: tollgate resolves ${{env:…}}, ${{opt:stage}}, ${{sls:stage}} and ${{self:…}}"
                    ),
                ));
            };
            if let Some(v) = found.filter(|v| !v.is_null()) {
                return Ok(v);
            }
        }
        let why = if missing.is_empty() {
            String::new()
        } else {
            format!(" ({})", missing.join("; "))
        };
        Err(err(
            self.file,
            path,
            format!("variable {whole} has no value{why}"),
        ))
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_string()
    } else {
        format!("{path}.{key}")
    }
}

/// Index of the `}` closing the `${` at `start`.
fn closing_brace(s: &str, start: usize) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in s[start..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    return Some(start + i);
                }
            }
            _ => {}
        }
    }
    None
}

/// Splits on commas outside quotes and nested `${…}`.
fn split_top_level(expr: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let (mut depth, mut quote, mut from) = (0usize, None, 0);
    for (i, c) in expr.char_indices() {
        match (c, quote) {
            ('\'' | '"', None) => quote = Some(c),
            (q, Some(open)) if q == open => quote = None,
            ('{', None) => depth += 1,
            ('}', None) => depth = depth.saturating_sub(1),
            (',', None) if depth == 0 => {
                parts.push(&expr[from..i]);
                from = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&expr[from..]);
    parts
}

fn quoted(s: &str) -> Option<&str> {
    let b = s.as_bytes();
    (b.len() >= 2 && (b[0] == b'\'' || b[0] == b'"') && b[b.len() - 1] == b[0])
        .then(|| &s[1..s.len() - 1])
}

/// Text that the native config would expand as `${VAR}` stays literal.
fn literal(s: &str) -> Value {
    Value::String(s.replace("${", "$${"))
}

fn as_str<'v>(v: &'v Value, file: &Path, field: &str) -> Result<&'v str, ConfigError> {
    v.as_str()
        .ok_or_else(|| err(file, field, format!("expected text, found {v}")))
}

/// Reads `opts.file` into the native config document.
pub fn to_native(opts: &ServerlessOptions) -> Result<Value, ConfigError> {
    let file = opts.file.as_path();
    let text =
        std::fs::read_to_string(file).map_err(|e| err(file, "", format!("cannot read: {e}")))?;
    let raw: Value = serde_saphyr::from_str(&text).map_err(|e| config::yaml_error(file, &e))?;
    if !raw.is_object() {
        return Err(err(
            file,
            "",
            "expected a mapping at the top of serverless.yml",
        ));
    }
    // The stage first: `${sls:stage}` anywhere else depends on it.
    let mut vars = Vars {
        file,
        root: &raw,
        opt_stage: opts.stage.as_deref(),
        stage: None,
    };
    let stage = match (&opts.stage, raw.pointer("/provider/stage")) {
        (Some(s), _) => s.clone(),
        (None, Some(v)) => as_str(
            &vars.resolve(v, "provider.stage", 0)?,
            file,
            "provider.stage",
        )?
        .to_string(),
        (None, None) => "dev".into(),
    };
    vars.stage = Some(stage.clone());
    let doc = vars.resolve(&raw, "", 0)?;

    let service = match doc.get("service") {
        Some(Value::Object(o)) => o.get("name").cloned().unwrap_or(Value::Null),
        Some(v) => v.clone(),
        None => Value::Null,
    };
    let service = as_str(&service, file, "service")?.to_string();
    let provider = doc.get("provider").cloned().unwrap_or(json!({}));
    let api_gateway = provider.get("apiGateway").cloned().unwrap_or(json!({}));
    let pick = |name: &str| -> (Value, String) {
        match api_gateway.get(name) {
            Some(v) => (v.clone(), format!("provider.apiGateway.{name}")),
            None => (
                provider.get(name).cloned().unwrap_or(Value::Null),
                format!("provider.{name}"),
            ),
        }
    };
    let (source_type, source_field) = pick("apiKeySourceType");
    if let Some(t) = source_type.as_str() {
        if !t.eq_ignore_ascii_case("HEADER") {
            return Err(err(
                file,
                source_field,
                format!("{t:?}: tollgate reads keys from the x-api-key header (HEADER) only"),
            ));
        }
    }

    let routes = routes(&doc, opts, file)?;
    let (plans, plan_names) = plans(&pick("usagePlan"), &service, &stage, file)?;
    let (keys, needs_default_plan) = keys(&pick("apiKeys"), &plan_names, &service, &stage, file)?;
    let mut plans = plans;
    if needs_default_plan && plans.is_empty() {
        // Serverless creates a plan for the keys even when usagePlan is not given.
        plans.push(json!({"name": format!("{service}-{stage}"), "apiStages": [{"apiId": service, "stage": stage}]}));
    }

    let mut native = Map::new();
    native.insert("listen".into(), literal(&opts.listen));
    native.insert("store".into(), json!({ "sqlite": literal(&opts.store) }));
    if let Some(admin) = &opts.admin {
        native.insert("admin".into(), json!({ "listen": literal(admin) }));
    }
    native.insert(
        "apis".into(),
        json!([{ "id": service, "stages": [{ "name": stage }], "routes": routes }]),
    );
    native.insert("usagePlans".into(), Value::Array(plans));
    native.insert("apiKeys".into(), Value::Array(keys));
    Ok(Value::Object(native))
}

fn routes(doc: &Value, opts: &ServerlessOptions, file: &Path) -> Result<Vec<Value>, ConfigError> {
    let mut per_function = BTreeMap::new();
    for spec in &opts.functions {
        let (name, url) = spec
            .split_once('=')
            .ok_or_else(|| err(file, "--function", format!("{spec:?}: expected NAME=URL")))?;
        per_function.insert(name.to_string(), url.to_string());
    }
    let empty = Map::new();
    let functions = doc
        .get("functions")
        .and_then(Value::as_object)
        .unwrap_or(&empty);
    for name in per_function.keys() {
        if !functions.contains_key(name) {
            return Err(err(
                file,
                "--function",
                format!("serverless.yml has no function {name:?}"),
            ));
        }
    }
    let mut routes = Vec::new();
    for (name, function) in functions {
        let events = function
            .get("events")
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default();
        for (i, event) in events.iter().enumerate() {
            let Some(http) = event.get("http") else {
                continue;
            };
            let field = format!("functions.{name}.events[{i}].http");
            let (method, path, private, cors) = match http {
                Value::String(short) => {
                    let (method, path) = short.trim().split_once(' ').ok_or_else(|| {
                        err(
                            file,
                            &field,
                            format!("{short:?}: expected \"METHOD /path\""),
                        )
                    })?;
                    (
                        method.to_string(),
                        path.trim().to_string(),
                        false,
                        Value::Null,
                    )
                }
                Value::Object(o) => {
                    let path = as_str(
                        o.get("path").unwrap_or(&Value::Null),
                        file,
                        &format!("{field}.path"),
                    )?
                    .to_string();
                    let method = as_str(
                        o.get("method").unwrap_or(&Value::Null),
                        file,
                        &format!("{field}.method"),
                    )?
                    .to_string();
                    let private = o.get("private").and_then(Value::as_bool).unwrap_or(false);
                    (
                        method,
                        path,
                        private,
                        o.get("cors").cloned().unwrap_or(Value::Null),
                    )
                }
                other => {
                    return Err(err(
                        file,
                        &field,
                        format!("expected \"METHOD /path\" or a mapping, found {other}"),
                    ));
                }
            };
            let method = match method.to_ascii_uppercase().as_str() {
                "*" | "ANY" => "ANY".to_string(),
                m => m.to_string(),
            };
            let path = format!("/{}", path.trim_matches('/'));
            let upstream = per_function.get(name).or(opts.upstream.as_ref()).ok_or_else(|| {
                err(file, format!("functions.{name}"), format!("no upstream for function {name:?}: give --upstream URL or --function {name}=URL"))
            })?;
            let mut route = json!({ "path": path, "method": method, "apiKeyRequired": private, "upstream": literal(upstream) });
            if !cors.is_null() {
                route["cors"] = cors;
            }
            routes.push(route);
        }
    }
    if routes.is_empty() {
        return Err(err(
            file,
            "functions",
            "no function has an http event: nothing to serve",
        ));
    }
    Ok(routes)
}

/// The usage plans, and the Serverless plan names mapped to the native plan names.
fn plans(
    (usage_plan, field): &(Value, String),
    service: &str,
    stage: &str,
    file: &Path,
) -> Result<(Vec<Value>, BTreeMap<String, String>), ConfigError> {
    let settings = |v: &Value, at: &str| -> Result<Map<String, Value>, ConfigError> {
        let o = v
            .as_object()
            .ok_or_else(|| err(file, at, "expected a mapping with quota and throttle"))?;
        let mut out = Map::new();
        for (k, x) in o {
            match k.as_str() {
                "quota" | "throttle" => {
                    out.insert(k.clone(), x.clone());
                }
                other => {
                    return Err(err(
                        file,
                        format!("{at}.{other}"),
                        "unknown setting: a usage plan has quota and throttle",
                    ));
                }
            }
        }
        Ok(out)
    };
    let api_stages = json!([{ "apiId": service, "stage": stage }]);
    match usage_plan {
        Value::Null => Ok((Vec::new(), BTreeMap::new())),
        Value::Object(_) => {
            let mut plan = settings(usage_plan, field)?;
            plan.insert("name".into(), json!(format!("{service}-{stage}")));
            plan.insert("apiStages".into(), api_stages);
            Ok((vec![Value::Object(plan)], BTreeMap::new()))
        }
        Value::Array(items) => {
            let mut plans = Vec::new();
            let mut names = BTreeMap::new();
            for (i, item) in items.iter().enumerate() {
                let at = format!("{field}[{i}]");
                let Some((name, body)) = item
                    .as_object()
                    .filter(|o| o.len() == 1)
                    .and_then(|o| o.iter().next())
                else {
                    return Err(err(
                        file,
                        &at,
                        "each named plan is a mapping with one key, the plan's name",
                    ));
                };
                let mut plan = settings(body, &format!("{at}.{name}"))?;
                let native = format!("{service}-{name}-{stage}");
                plan.insert("name".into(), json!(native));
                plan.insert(
                    "description".into(),
                    json!(format!("Usage plan \"{name}\" for {service} {stage} stage")),
                );
                plan.insert("apiStages".into(), api_stages.clone());
                names.insert(name.clone(), native);
                plans.push(Value::Object(plan));
            }
            Ok((plans, names))
        }
        other => Err(err(
            file,
            field,
            format!("expected a mapping or a list of named plans, found {other}"),
        )),
    }
}

/// The API keys; the flag says whether any key needs the default plan.
fn keys(
    (api_keys, field): &(Value, String),
    plan_names: &BTreeMap<String, String>,
    service: &str,
    stage: &str,
    file: &Path,
) -> Result<(Vec<Value>, bool), ConfigError> {
    let Some(items) = api_keys.as_array() else {
        return match api_keys {
            Value::Null => Ok((Vec::new(), false)),
            other => Err(err(
                file,
                field,
                format!("expected a list of keys, found {other}"),
            )),
        };
    };
    let default_plan = if plan_names.is_empty() {
        vec![json!(format!("{service}-{stage}"))]
    } else {
        Vec::new()
    };
    let mut keys = Vec::new();
    let mut unnamed = 0;
    let mut one = |key: &Value, at: &str, plans: Vec<Value>| -> Result<(), ConfigError> {
        let mut native = Map::new();
        match key {
            Value::String(name) => {
                native.insert("name".into(), json!(name));
            }
            Value::Object(o) => {
                for (k, v) in o {
                    match k.as_str() {
                        "name" | "description" | "customerId" | "enabled" => {
                            native.insert(k.clone(), v.clone());
                        }
                        "value" => {
                            native.insert(
                                k.clone(),
                                literal(as_str(v, file, &format!("{at}.value"))?),
                            );
                        }
                        other => {
                            return Err(err(
                                file,
                                format!("{at}.{other}"),
                                "unknown key setting: use name, value, description, customerId, enabled",
                            ));
                        }
                    }
                }
                if !native.contains_key("name") {
                    unnamed += 1;
                    native.insert(
                        "name".into(),
                        json!(format!("{service}-{stage}-apikey-{unnamed}")),
                    );
                }
            }
            other => {
                return Err(err(
                    file,
                    at,
                    format!("expected a key name or a key mapping, found {other}"),
                ));
            }
        }
        native.insert("usagePlans".into(), Value::Array(plans));
        keys.push(Value::Object(native));
        Ok(())
    };
    let mut needs_default = false;
    for (i, item) in items.iter().enumerate() {
        let at = format!("{field}[{i}]");
        // `{planName: [keys…]}` groups keys under a named plan.
        let grouped = item
            .as_object()
            .filter(|o| o.len() == 1)
            .and_then(|o| o.iter().next())
            .filter(|(_, v)| v.is_array());
        match grouped {
            Some((plan, group)) => {
                let native = plan_names.get(plan).ok_or_else(|| {
                    err(
                        file,
                        &at,
                        format!(
                            "API key group {plan:?} has no usage plan defined (add it to usagePlan)"
                        ),
                    )
                })?;
                for (j, key) in group.as_array().into_iter().flatten().enumerate() {
                    one(key, &format!("{at}.{plan}[{j}]"), vec![json!(native)])?;
                }
            }
            None => {
                if plan_names.len() > 1 {
                    let name = item
                        .get("name")
                        .and_then(Value::as_str)
                        .or(item.as_str())
                        .unwrap_or("?");
                    return Err(err(
                        file,
                        &at,
                        format!(
                            "API key \"{name}\" has no usage plan defined (group it under a plan name)"
                        ),
                    ));
                }
                let plans = match plan_names.values().next() {
                    Some(only) => vec![json!(only)],
                    None => {
                        needs_default = true;
                        default_plan.clone()
                    }
                };
                one(item, &at, plans)?;
            }
        }
    }
    Ok((keys, needs_default))
}

/// The validated config for `opts`, through the native validator.
pub fn load(opts: &ServerlessOptions) -> Result<Config, ConfigError> {
    let native = to_native(opts)?;
    let yaml = to_yaml(&native, &opts.file)?;
    let label = PathBuf::from(format!("{} (as tollgate config)", opts.file.display()));
    config::parse(&label, &yaml)
}

/// The native document as YAML.
pub fn to_yaml(native: &Value, file: &Path) -> Result<String, ConfigError> {
    serde_saphyr::to_string(native)
        .map_err(|e| err(file, "", format!("cannot write the config: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(file: &Path) -> ServerlessOptions {
        ServerlessOptions {
            file: file.to_path_buf(),
            upstream: Some("http://127.0.0.1:9000".into()),
            listen: "127.0.0.1:8080".into(),
            store: "./tollgate.db".into(),
            ..Default::default()
        }
    }

    fn write(yaml: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("serverless.yml");
        std::fs::write(&path, yaml).unwrap();
        (dir, path)
    }

    #[test]
    fn the_seed_file_runs_as_is() {
        let seed = PathBuf::from(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../examples/serverless.yml"
        ));
        let config = load(&opts(&seed)).unwrap();
        let api = &config.gateway.apis[0];
        assert_eq!(
            (
                api.id.as_str(),
                api.stages[0].name.as_str(),
                api.stages[0].base_path.as_str()
            ),
            ("registrations", "dev", "/dev")
        );
        let put = &api.routes[0];
        assert_eq!(
            (put.path.as_str(), put.method.as_str(), put.api_key_required),
            ("/registrations/{id}/warranty", "PUT", true)
        );
        assert!(put.cors.is_some());
        assert!(
            api.routes.iter().any(|r| r.method.as_str() == "OPTIONS"),
            "the preflight route"
        );
        assert_eq!(config.plans[0].name, "registrations-dev");
        assert_eq!(config.plans[0].quota.unwrap().offset, 2);
        assert_eq!(config.plans[0].throttle.unwrap().burst_limit, 50);
        assert_eq!(config.keys[0].name, "central-system-key");
        assert_eq!(
            config.keys[0].value.as_deref(),
            Some("centralSystemKey0123456789abcdef")
        );
        assert_eq!(config.keys[0].plans, vec!["registrations-dev"]);
    }

    #[test]
    fn v3_named_plans_variables_and_shorthand() {
        let yaml = r#"
service: orders-api
custom: { owner: team-a }
provider:
  name: aws
  stage: ${opt:stage, 'dev'}
  apiGateway:
    apiKeys:
      - free:
          - ${sls:stage}-free-partner-a
          - name: ${sls:stage}-free-partner-b
            value: freePartnerBkey0123456789abcdef
            customerId: ${self:custom.owner}
      - paid:
          - name: ${sls:stage}-acme
            value: ${env:TOLLGATE_TEST_ACME_KEY, 'acmeFallbackValue0123456789'}
            enabled: false
    usagePlan:
      - free: { quota: { limit: 1000, offset: 0, period: DAY }, throttle: { burstLimit: 5, rateLimit: 2 } }
      - paid: { quota: { limit: 500000, offset: 1, period: MONTH }, throttle: { burstLimit: 200, rateLimit: 100 } }
functions:
  listOrders:
    handler: src/orders.list
    events:
      - http: { path: orders, method: get, private: true, cors: true }
  health:
    handler: src/health.handler
    events:
      - http: GET /health
      - schedule: rate(5 minutes)
"#;
        let (_dir, path) = write(yaml);
        let mut o = opts(&path);
        o.stage = Some("prod".into());
        o.functions = vec!["health=http://127.0.0.1:9100".into()];
        let config = load(&o).unwrap();
        let names: Vec<&str> = config.plans.iter().map(|p| p.name.as_str()).collect();
        assert_eq!(names, vec!["orders-api-free-prod", "orders-api-paid-prod"]);
        let key = |n: &str| config.keys.iter().find(|k| k.name == n).unwrap();
        assert_eq!(
            key("prod-free-partner-a").value,
            None,
            "a name only: value generated"
        );
        assert_eq!(
            key("prod-free-partner-b").customer_id.as_deref(),
            Some("team-a")
        );
        assert_eq!(
            key("prod-acme").value.as_deref(),
            Some("acmeFallbackValue0123456789")
        );
        assert!(!key("prod-acme").enabled);
        assert_eq!(key("prod-acme").plans, vec!["orders-api-paid-prod"]);
        let routes = &config.gateway.apis[0].routes;
        let health = routes.iter().find(|r| r.path == "/health").unwrap();
        match &health.integration {
            tollgate_gateway::config::Integration::Http { url, .. } => {
                assert_eq!(url.to_string(), "http://127.0.0.1:9100/")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(config.gateway.apis[0].stages[0].base_path, "/prod");
    }

    #[test]
    fn clear_errors() {
        let cases = [
            (
                "service: s\nprovider: { stage: '${ssm:/x}' }\nfunctions: {}\n",
                "unsupported variable ${ssm:/x}",
            ),
            (
                "service: s\nprovider: { apiKeys: [{ name: k, value: '${env:TOLLGATE_SURELY_UNSET}' }] }\nfunctions: { f: { events: [ { http: GET /x } ] } }\n",
                "environment variable TOLLGATE_SURELY_UNSET is not set",
            ),
            (
                "service: s\nprovider: { apiGateway: { usagePlan: [ { free: {} }, { paid: {} } ], apiKeys: [ k ] } }\nfunctions: { f: { events: [ { http: GET /x } ] } }\n",
                "API key \"k\" has no usage plan defined",
            ),
            (
                "service: s\nprovider: { apiGateway: { usagePlan: [ { free: {} } ], apiKeys: [ { gold: [ k ] } ] } }\nfunctions: { f: { events: [ { http: GET /x } ] } }\n",
                "API key group \"gold\" has no usage plan defined",
            ),
            (
                "service: s\nprovider: { apiGateway: { apiKeySourceType: AUTHORIZER } }\nfunctions: { f: { events: [ { http: GET /x } ] } }\n",
                "HEADER",
            ),
            (
                "service: s\nfunctions: { f: { events: [ { http: { path: x } } ] } }\n",
                "functions.f.events[0].http.method",
            ),
        ];
        for (yaml, expect) in cases {
            let (_dir, path) = write(yaml);
            let e = load(&opts(&path)).unwrap_err().to_string();
            assert!(e.contains(expect), "{expect:?} not in {e:?}");
            assert!(e.contains("serverless.yml"), "{e}");
        }
        let (_dir, path) =
            write("service: s\nfunctions: { f: { events: [ { http: GET /x } ] } }\n");
        let mut o = opts(&path);
        o.upstream = None;
        let e = load(&o).unwrap_err().to_string();
        assert!(e.contains("give --upstream URL or --function f=URL"), "{e}");
    }

    #[test]
    fn v1_keys_without_a_plan_get_the_default_plan() {
        let (_dir, path) = write(
            "service: s\nprovider: { apiKeys: [ first ] }\nfunctions: { f: { events: [ { http: { path: /x, method: '*', private: true } } ] } }\n",
        );
        let config = load(&opts(&path)).unwrap();
        assert_eq!(config.plans[0].name, "s-dev");
        assert_eq!(config.keys[0].plans, vec!["s-dev"]);
        assert_eq!(config.gateway.apis[0].routes[0].method.as_str(), "ANY");
    }
}
