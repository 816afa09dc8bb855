//! Reading a Serverless Framework `serverless.yml` (v1 `provider.apiKeys`/`provider.usagePlan` and
//! v2.18+/v3 `provider.apiGateway.*` layouts) into tollgate's native config.
//!
//! The file is read into a tree that keeps every node's line and column ([`tree`]), its variables
//! are resolved on that tree ([`vars`]), the parts tollgate serves are read from it into the typed
//! structs below (serde), and those become the native config's raw types ([`RawConfig`]) carrying
//! the user's own locations. They go through the one config validator, so both paths accept exactly
//! the same things, and every error points at a line and column of the file the user wrote.

mod tree;
mod vars;

use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::path::{Path, PathBuf};

use serde::Deserialize;
use serde::de::value::{MapAccessDeserializer, SeqAccessDeserializer};
use serde::de::{DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};
use serde_saphyr::{Location, Spanned};

use crate::config::raw::{
    EnvString, RawAdmin, RawApi, RawApiStage, RawConfig, RawCors, RawKey, RawPlan, RawQuota,
    RawRoute, RawStage, RawStore, RawThrottle,
};
use crate::config::{self, Config, ConfigError};
use tree::{FieldPath, Located, Node, ReadError};
use vars::Vars;

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

// ---- what tollgate reads of serverless.yml (the rest is Lambda's and CloudFormation's) ----

/// `service: name`, or `service: { name: … }` (v1).
#[derive(Deserialize)]
struct ServiceName {
    name: String,
}

#[derive(Deserialize)]
struct Function {
    #[serde(default)]
    events: Option<Vec<Event>>,
}

/// One event of a function; only `http` ones are served.
#[derive(Deserialize)]
struct Event {
    #[serde(default)]
    http: Option<TextOr<HttpEvent>>,
}

/// `http: { path, method, private, cors }` (or the `"GET /path"` shorthand).
#[derive(Deserialize)]
struct HttpEvent {
    path: String,
    method: String,
    #[serde(default)]
    private: bool,
    #[serde(default)]
    cors: Option<RawCors>,
}

/// A usage plan's settings (`usagePlan`, or one named plan of the list form).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PlanSettings {
    #[serde(default)]
    quota: Option<RawQuota>,
    #[serde(default)]
    throttle: Option<RawThrottle>,
}

/// `usagePlan`: one plan's settings, or a list of `{name: settings}`.
type UsagePlan = MapOrList<PlanSettings, Vec<BTreeMap<String, PlanSettings>>>;

/// One API key: its name, or its settings.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct KeySettings {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    value: Option<String>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    customer_id: Option<String>,
    #[serde(default)]
    enabled: Option<bool>,
}

/// A setting Serverless accepts as text or as a mapping. Told apart by the YAML node's kind, not
/// by trying each (serde's untagged enums), so an error inside the mapping keeps its place.
enum TextOr<M> {
    Text(String),
    Map(M),
}

impl<'de, M: Deserialize<'de>> Deserialize<'de> for TextOr<M> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<M>(PhantomData<M>);
        impl<'de, M: Deserialize<'de>> Visitor<'de> for V<M> {
            type Value = TextOr<M>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("text or a mapping")
            }
            fn visit_str<E>(self, s: &str) -> Result<Self::Value, E> {
                Ok(TextOr::Text(s.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                M::deserialize(MapAccessDeserializer::new(map)).map(TextOr::Map)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

/// A setting Serverless accepts as a mapping or as a list, told apart as [`TextOr`] is.
enum MapOrList<M, L> {
    Map(M),
    List(L),
}

impl<'de, M: Deserialize<'de>, L: Deserialize<'de>> Deserialize<'de> for MapOrList<M, L> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<M, L>(PhantomData<(M, L)>);
        impl<'de, M: Deserialize<'de>, L: Deserialize<'de>> Visitor<'de> for V<M, L> {
            type Value = MapOrList<M, L>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a mapping or a list")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                M::deserialize(MapAccessDeserializer::new(map)).map(MapOrList::Map)
            }
            fn visit_seq<A: SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                L::deserialize(SeqAccessDeserializer::new(seq)).map(MapOrList::List)
            }
        }
        d.deserialize_any(V(PhantomData))
    }
}

// ---- from the resolved document to the native config ----

/// The document with its variables resolved.
struct Doc<'a> {
    file: &'a Path,
    root: Located,
}

impl Doc<'_> {
    fn err(&self, path: &FieldPath, message: impl Into<String>) -> ConfigError {
        ConfigError::at(self.file, self.at(path), path.to_string(), message)
    }

    /// Where `path` is written (unknown when it is not).
    fn at(&self, path: &FieldPath) -> Location {
        self.root.find(&path.0).map_or(Location::UNKNOWN, |n| n.at)
    }

    fn node(&self, path: &FieldPath) -> Option<&Located> {
        self.root.find(&path.0).filter(|n| n.node != Node::Null)
    }

    /// The typed value at `path`; `None` when it is absent or null.
    fn read<T: DeserializeOwned>(&self, path: &FieldPath) -> Result<Option<T>, ConfigError> {
        self.node(path)
            .map(|n| n.read(path).map_err(|e| read_error(self.file, e)))
            .transpose()
    }

    /// A setting of `provider.apiGateway` (v2.18+), else of `provider` (v1).
    fn setting(&self, name: &str) -> FieldPath {
        let provider = FieldPath::default().key("provider");
        let v2 = provider.key("apiGateway").key(name);
        if self.root.find(&v2.0).is_some() {
            v2
        } else {
            provider.key(name)
        }
    }
}

/// A typed read of `file`'s tree that failed, as a config error at its place.
fn read_error(file: &Path, e: ReadError) -> ConfigError {
    ConfigError::at(file, e.at, e.path.to_string(), e.message)
}

/// `value` at `at` in the user's file.
fn sited<T>(value: T, at: Location) -> Spanned<T> {
    Spanned::new(value, at, at)
}

/// Reads `opts.file` into the native config's raw types, located in `opts.file`.
pub fn to_native(opts: &ServerlessOptions) -> Result<RawConfig, ConfigError> {
    let file = opts.file.as_path();
    let no_place =
        |field: &str, message: String| ConfigError::at(file, Location::UNKNOWN, field, message);
    let text =
        std::fs::read_to_string(file).map_err(|e| no_place("", format!("cannot read: {e}")))?;
    let written: Located =
        serde_saphyr::from_str(&text).map_err(|e| config::yaml_error(file, &e))?;
    if !matches!(written.node, Node::Map(_)) {
        return Err(ConfigError::at(
            file,
            written.at,
            "",
            "expected a mapping at the top of serverless.yml",
        ));
    }
    // The stage first: `${sls:stage}` anywhere else depends on it.
    let mut vars = Vars {
        file,
        root: &written,
        opt_stage: opts.stage.as_deref(),
        stage: None,
    };
    let stage_path = FieldPath::default().key("provider").key("stage");
    let (stage, stage_at) = match (&opts.stage, written.find(&stage_path.0)) {
        (Some(s), _) => (s.clone(), Location::UNKNOWN),
        (None, Some(v)) => {
            let v = vars.resolve(v, &stage_path)?;
            let stage = v
                .read::<String>(&stage_path)
                .map_err(|e| read_error(file, e))?;
            (stage, v.at)
        }
        (None, None) => ("dev".to_string(), Location::UNKNOWN),
    };
    vars.stage = Some(stage.clone());
    let doc = Doc {
        file,
        root: vars.resolve(&written, &FieldPath::default())?,
    };

    let service_path = FieldPath::default().key("service");
    let service = match doc.read::<TextOr<ServiceName>>(&service_path)? {
        Some(TextOr::Text(name)) | Some(TextOr::Map(ServiceName { name })) => name,
        None => return Err(doc.err(&service_path, "serverless.yml names no service")),
    };
    let source_type = doc.setting("apiKeySourceType");
    if let Some(t) = doc.read::<String>(&source_type)? {
        if !t.eq_ignore_ascii_case("HEADER") {
            return Err(doc.err(
                &source_type,
                format!("{t:?}: tollgate reads keys from the x-api-key header (HEADER) only"),
            ));
        }
    }

    let routes = routes(&doc, opts)?;
    let api_stage = sited(
        RawApiStage {
            api_id: service.clone(),
            stage: stage.clone(),
            throttle: BTreeMap::new(),
        },
        doc.at(&service_path),
    );
    let mut plans = plans(&doc, &service, &stage, &api_stage)?;
    let keys = keys(&doc, &mut plans, &service, &stage, &api_stage)?;

    let store = RawStore {
        sqlite: Some(EnvString::new(opts.store.clone())),
        redis: None,
        flush_interval: None,
        durability: None,
        on_store_failure: None,
    };
    Ok(RawConfig {
        listen: Some(sited(
            EnvString::new(opts.listen.clone()),
            Location::UNKNOWN,
        )),
        tls: None,
        upstream_tls: None,
        http2: None,
        trusted_proxies: None,
        webhooks: Vec::new(),
        alerts: Vec::new(),
        exporters: Vec::new(),
        store: Some(sited(store, Location::UNKNOWN)),
        account_throttle: None,
        admin: opts.admin.as_ref().map(|listen| {
            sited(
                RawAdmin {
                    listen: EnvString::new(listen.clone()),
                    access_key_id: None,
                    secret_access_key: None,
                    max_connections: None,
                    tls: None,
                },
                Location::UNKNOWN,
            )
        }),
        verify: None,
        key_value_storage: None,
        rate_limit_headers: false,
        access_log: None,
        max_connections: None,
        header_timeout: None,
        max_request_body_size: None,
        keep_client_headers: None,
        underscores_in_headers: None,
        apis: vec![sited(
            RawApi {
                id: service,
                allow_encoded_slashes: false,
                api_key_source: None,
                authorizers: Vec::new(),
                stages: vec![sited(
                    RawStage {
                        name: stage,
                        base_path: None,
                        throttle: None,
                        method_throttle: BTreeMap::new(),
                    },
                    stage_at,
                )],
                routes,
            },
            doc.at(&service_path),
        )],
        usage_plans: plans.plans,
        api_keys: keys,
    })
}

/// A route for every `http` event of every function.
fn routes(doc: &Doc<'_>, opts: &ServerlessOptions) -> Result<Vec<Spanned<RawRoute>>, ConfigError> {
    let option_err =
        |message: String| ConfigError::at(doc.file, Location::UNKNOWN, "--function", message);
    let mut per_function = BTreeMap::new();
    for spec in &opts.functions {
        let (name, url) = spec
            .split_once('=')
            .ok_or_else(|| option_err(format!("{spec:?}: expected NAME=URL")))?;
        per_function.insert(name.to_string(), url.to_string());
    }
    let functions_path = FieldPath::default().key("functions");
    let functions: BTreeMap<String, Option<Function>> =
        doc.read(&functions_path)?.unwrap_or_default();
    if let Some(name) = per_function.keys().find(|n| !functions.contains_key(*n)) {
        return Err(option_err(format!(
            "serverless.yml has no function {name:?}"
        )));
    }
    let mut routes = Vec::new();
    for (name, function) in &functions {
        let function_path = functions_path.key(name);
        let events = function.as_ref().and_then(|f| f.events.as_ref());
        for (i, event) in events.into_iter().flatten().enumerate() {
            let Some(http) = &event.http else {
                continue;
            };
            let path = function_path.key("events").index(i).key("http");
            let (method, route_path, private, cors) = match http {
                TextOr::Text(short) => {
                    let (method, route_path) = short.trim().split_once(' ').ok_or_else(|| {
                        doc.err(&path, format!("{short:?}: expected \"METHOD /path\""))
                    })?;
                    (method, route_path.trim(), false, None)
                }
                TextOr::Map(e) => (
                    e.method.as_str(),
                    e.path.as_str(),
                    e.private,
                    e.cors.clone(),
                ),
            };
            let method = match method.to_ascii_uppercase().as_str() {
                "*" | "ANY" => "ANY".to_string(),
                m => m.to_string(),
            };
            let upstream = per_function.get(name).or(opts.upstream.as_ref()).ok_or_else(|| {
                doc.err(&function_path, format!("no upstream for function {name:?}: give --upstream URL or --function {name}=URL"))
            })?;
            let route = RawRoute {
                path: format!("/{}", route_path.trim_matches('/')),
                method,
                api_key_required: private,
                upstream: Some(EnvString::new(upstream.clone())),
                timeout: None,
                mock: None,
                cors,
                allow_get_body: false,
                authorizer: None,
                upstream_tls: None,
                cost: None,
            };
            routes.push(sited(route, doc.at(&path)));
        }
    }
    if routes.is_empty() {
        return Err(doc.err(
            &functions_path,
            "no function has an http event: nothing to serve",
        ));
    }
    Ok(routes)
}

/// The usage plans, and the Serverless plan names mapped to the native plan names.
struct Plans {
    plans: Vec<Spanned<RawPlan>>,
    names: BTreeMap<String, String>,
}

fn plans(
    doc: &Doc<'_>,
    service: &str,
    stage: &str,
    api_stage: &Spanned<RawApiStage>,
) -> Result<Plans, ConfigError> {
    let path = doc.setting("usagePlan");
    let plan = |name, description, settings, at: &FieldPath| {
        let quota_at = doc.at(&at.key("quota"));
        plan_on(
            api_stage,
            name,
            description,
            settings,
            (doc.at(at), quota_at),
        )
    };
    let mut out = Plans {
        plans: Vec::new(),
        names: BTreeMap::new(),
    };
    match doc.read::<UsagePlan>(&path)? {
        None => {}
        Some(MapOrList::Map(settings)) => {
            out.plans
                .push(plan(format!("{service}-{stage}"), None, settings, &path));
        }
        Some(MapOrList::List(items)) => {
            for (i, item) in items.into_iter().enumerate() {
                let at = path.index(i);
                let mut item = item.into_iter();
                let (Some((name, settings)), None) = (item.next(), item.next()) else {
                    return Err(doc.err(
                        &at,
                        "each named plan is a mapping with one key, the plan's name",
                    ));
                };
                let native = format!("{service}-{name}-{stage}");
                let description = format!("Usage plan \"{name}\" for {service} {stage} stage");
                out.plans.push(plan(
                    native.clone(),
                    Some(description),
                    settings,
                    &at.key(&name),
                ));
                out.names.insert(name, native);
            }
        }
    }
    Ok(out)
}

/// The API keys, each in its plan; Serverless's default plan is added to `plans` when a key needs
/// it.
fn keys(
    doc: &Doc<'_>,
    plans: &mut Plans,
    service: &str,
    stage: &str,
    api_stage: &Spanned<RawApiStage>,
) -> Result<Vec<Spanned<RawKey>>, ConfigError> {
    let path = doc.setting("apiKeys");
    let Some(list) = doc.node(&path) else {
        return Ok(Vec::new());
    };
    let Node::Seq(items) = &list.node else {
        return Err(doc.err(&path, "expected a list of keys"));
    };
    let default_plan = format!("{service}-{stage}");
    let mut keys = Vec::new();
    let mut unnamed = 0;
    let mut needs_default = false;
    let mut one = |at: &FieldPath, plan: &str| -> Result<(), ConfigError> {
        let settings = match doc.read::<TextOr<KeySettings>>(at)? {
            Some(TextOr::Map(settings)) => settings,
            Some(TextOr::Text(name)) => KeySettings {
                name: Some(name),
                value: None,
                description: None,
                customer_id: None,
                enabled: None,
            },
            None => return Err(doc.err(at, "expected a key name or a key mapping")),
        };
        let name = settings.name.unwrap_or_else(|| {
            unnamed += 1;
            format!("{service}-{stage}-apikey-{unnamed}")
        });
        let key = RawKey {
            name,
            // A value from the environment is written back as its variable, never as the value.
            value: settings.value.map(|v| {
                let written = match doc.node(&at.key("value")).map(|v| &v.node) {
                    Some(Node::Env(_, written)) => Some(written.clone()),
                    _ => None,
                };
                EnvString(v, written)
            }),
            description: settings.description,
            customer_id: settings.customer_id,
            enabled: settings.enabled.unwrap_or(true),
            usage_plans: vec![plan.to_string()],
            tags: BTreeMap::new(),
            expires_at: None,
            allowed_source_ips: None,
            credits: None,
        };
        keys.push(sited(key, doc.at(at)));
        Ok(())
    };
    for (i, item) in items.iter().enumerate() {
        let at = path.index(i);
        match key_group(item) {
            Some((plan, keys_in_group)) => {
                let native = plans.names.get(plan).ok_or_else(|| {
                    doc.err(
                        &at,
                        format!(
                            "API key group {plan:?} has no usage plan defined (add it to usagePlan)"
                        ),
                    )
                })?;
                for j in 0..keys_in_group {
                    one(&at.key(plan).index(j), native)?;
                }
            }
            None => {
                if plans.names.len() > 1 {
                    let name = item.get("name").unwrap_or(item);
                    let name = match &name.node {
                        Node::Str(name) | Node::Env(name, _) => name.as_str(),
                        _ => "?",
                    };
                    return Err(doc.err(
                        &at,
                        format!("API key \"{name}\" has no usage plan defined (group it under a plan name)"),
                    ));
                }
                // The one named plan, else the v1 plan (or, without one, Serverless's default
                // plan), which has the default plan's name.
                let plan = match plans.names.values().next() {
                    Some(only) => only.clone(),
                    None => {
                        needs_default = true;
                        default_plan.clone()
                    }
                };
                one(&at, &plan)?;
            }
        }
    }
    if needs_default && plans.plans.is_empty() {
        // Serverless creates a plan for the keys even when usagePlan is not given.
        let none = PlanSettings {
            quota: None,
            throttle: None,
        };
        let at = doc.at(&path);
        plans
            .plans
            .push(plan_on(api_stage, default_plan, None, none, (at, at)));
    }
    Ok(keys)
}

/// A usage plan on the service's one API stage, written at `at` (its quota at `quota_at`).
fn plan_on(
    api_stage: &Spanned<RawApiStage>,
    name: String,
    description: Option<String>,
    settings: PlanSettings,
    (at, quota_at): (Location, Location),
) -> Spanned<RawPlan> {
    let plan = RawPlan {
        name,
        description,
        api_stages: vec![api_stage.clone()],
        throttle: settings.throttle,
        quota: settings.quota.map(|q| sited(q, quota_at)),
        limits_share_by: None,
        enforcement: None,
        shadow_headers: None,
        tags: BTreeMap::new(),
    };
    sited(plan, at)
}

/// `{planName: [keys…]}`, which groups keys under a named plan: the plan and how many keys.
fn key_group(item: &Located) -> Option<(&str, usize)> {
    match &item.node {
        Node::Map(entries) => match entries.as_slice() {
            [
                (
                    plan,
                    _,
                    Located {
                        node: Node::Seq(keys),
                        ..
                    },
                ),
            ] => Some((plan, keys.len())),
            _ => None,
        },
        _ => None,
    }
}

/// The validated config for `opts`, through the native validator.
pub fn load(opts: &ServerlessOptions) -> Result<Config, ConfigError> {
    // `--store` comes from the command line: relative to where the command runs. Paths in a file
    // are relative to the file, so it is made absolute before the file's rules apply.
    let mut opts = opts.clone();
    if Path::new(&opts.store).is_relative() {
        if let Ok(cwd) = std::env::current_dir() {
            opts.store = cwd.join(&opts.store).to_string_lossy().into_owned();
        }
    }
    config::validate(&opts.file, to_native(&opts)?)
}

/// What `tollgate import serverless` prints: the native config as YAML, once it validates.
pub fn import(opts: &ServerlessOptions) -> Result<String, ConfigError> {
    let native = to_native(opts)?;
    let yaml = serde_saphyr::to_string(&native).map_err(|e| {
        ConfigError::at(
            &opts.file,
            Location::UNKNOWN,
            "",
            format!("cannot write the config: {e}"),
        )
    })?;
    config::validate(&opts.file, native)?;
    Ok(yaml)
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
                "functions.f.events[0].http: missing field `method`",
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

    /// Errors found by the native validator, by a field's type, or by a variable all point at the
    /// line and column of serverless.yml where the cause is written.
    #[test]
    fn errors_point_into_the_users_file() {
        let base = "service: s\nprovider:\n  usagePlan:\n";
        let cases = [
            (
                "    quota: { limit: 10, offset: 3, period: DAY }\n",
                ":4:12: usagePlans[0].quota.offset",
            ),
            (
                "    throttle: { burstLimit: lots, rateLimit: 2 }\n",
                ":4:29: provider.usagePlan.throttle.burstLimit: invalid type",
            ),
            (
                "    throttle: { burstLimit: 5, rateLimit: 2 }\n  apiKeys:\n    - { name: k, value: '${env:TOLLGATE_SURELY_UNSET}' }\n",
                ":6:25: provider.apiKeys[0].value: variable ${env:TOLLGATE_SURELY_UNSET} has no value",
            ),
            (
                "    quote: { limit: 10, period: DAY }\n",
                ":4:5: provider.usagePlan.quote: unknown field `quote`",
            ),
        ];
        let functions =
            "functions:\n  f:\n    events:\n      - http: { path: 'reg/{id', method: get }\n";
        for (plan, expect) in cases {
            let (_dir, path) = write(&format!(
                "{base}{plan}functions: {{ f: {{ events: [ {{ http: GET /x }} ] }} }}\n"
            ));
            let e = load(&opts(&path)).unwrap_err().to_string();
            assert!(e.starts_with(&path.display().to_string()), "{e}");
            assert!(e.contains(expect), "{expect:?} not in {e:?}");
        }
        let (_dir, path) = write(&format!("service: s\n{functions}"));
        let e = load(&opts(&path)).unwrap_err().to_string();
        assert!(
            e.contains("serverless.yml:5:15: apis[0].routes[0].path"),
            "{e}"
        );
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
