//! The data plane's metrics and their exposition, with the `prometheus-client` crate. The request
//! path holds handles resolved once (a labelled counter is looked up when the gateway starts, not
//! per request), so counting costs an atomic add. No label carries a key value or key id
//! (cardinality, and secrets).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};

use http::Method;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::{
    DescriptorEncoder, EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet,
};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::{Registry, Unit};

use crate::client::Protocol;
use crate::config::GatewayConfig;
use crate::limits::{KeyRejected, Refusal};
use crate::route::RouteMatch;

/// What admission decided about a request (the `decision` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Let through.
    Allowed,
    /// No route for the method and path.
    NoRoute,
    /// The route wants a key and none came.
    MissingKey,
    /// No such key, or none in a plan for the stage.
    InvalidKey,
    /// The key is disabled.
    DisabledKey,
    /// The key's expiry has passed.
    Expired,
    /// The key may not be used from the request's source address.
    IpForbidden,
    /// A JWT caller's token was missing, invalid or expired.
    Unauthorized,
    /// A throttle refused.
    Throttled,
    /// The quota is spent.
    QuotaExceeded,
    /// The key's credits are fewer than the request's cost.
    CreditsExhausted,
    /// Let through by a plan in shadow whose throttle would have refused it.
    ShadowThrottled,
    /// Let through by a plan in shadow whose quota would have refused it.
    ShadowQuotaExceeded,
    /// Let through by a plan in shadow whose credits would have refused it.
    ShadowCreditsExhausted,
    /// Redis could not decide and `onStoreFailure: deny`.
    StoreUnavailable,
}

impl Decision {
    /// Whether the answer was 403 for the key: none, unknown, disabled or expired.
    pub fn forbids_the_key(self) -> bool {
        matches!(
            self,
            Self::MissingKey
                | Self::InvalidKey
                | Self::DisabledKey
                | Self::Expired
                | Self::IpForbidden
        )
    }

    /// The label's value.
    pub fn name(self) -> &'static str {
        match self {
            Self::Allowed => "allowed",
            Self::NoRoute => "no_route",
            Self::MissingKey => "missing_key",
            Self::InvalidKey => "invalid_key",
            Self::DisabledKey => "disabled_key",
            Self::Expired => "expired",
            Self::IpForbidden => "ip_forbidden",
            Self::Unauthorized => "unauthorized",
            Self::Throttled => "throttled",
            Self::QuotaExceeded => "quota_exceeded",
            Self::CreditsExhausted => "credits_exhausted",
            Self::ShadowThrottled => "shadow_throttled",
            Self::ShadowQuotaExceeded => "shadow_quota_exceeded",
            Self::ShadowCreditsExhausted => "shadow_credits_exhausted",
            Self::StoreUnavailable => "store_unavailable",
        }
    }
}

impl Decision {
    /// What a plan in shadow lets through instead of `refusal`, when its own limits refused.
    pub fn in_shadow(refusal: &Refusal) -> Option<Self> {
        match refusal {
            Refusal::TooManyRequests { .. } => Some(Self::ShadowThrottled),
            Refusal::LimitExceeded { .. } => Some(Self::ShadowQuotaExceeded),
            Refusal::CreditsExhausted { .. } => Some(Self::ShadowCreditsExhausted),
            _ => None,
        }
    }
}

impl From<&Refusal> for Decision {
    fn from(refusal: &Refusal) -> Self {
        match refusal {
            Refusal::MissingAuthenticationToken => Self::NoRoute,
            Refusal::Forbidden(KeyRejected::Missing) => Self::MissingKey,
            Refusal::Forbidden(KeyRejected::Invalid) => Self::InvalidKey,
            Refusal::Forbidden(KeyRejected::Disabled) => Self::DisabledKey,
            Refusal::Forbidden(KeyRejected::Expired) => Self::Expired,
            Refusal::Forbidden(KeyRejected::SourceIp) => Self::IpForbidden,
            Refusal::Unauthorized => Self::Unauthorized,
            Refusal::TooManyRequests { .. } => Self::Throttled,
            Refusal::LimitExceeded { .. } => Self::QuotaExceeded,
            Refusal::CreditsExhausted { .. } => Self::CreditsExhausted,
            Refusal::ServiceUnavailable => Self::StoreUnavailable,
        }
    }
}

/// A decision about a request to a stage, under the usage plan of the key it presented (empty when
/// it presented none that was accepted).
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct DecisionLabels {
    api: String,
    stage: String,
    usage_plan: String,
    decision: &'static str,
}

/// Where a request went, how it came and how it was answered, named after OpenTelemetry's HTTP
/// server attributes (`http.route` is the template, never the raw path). Unmatched requests have
/// empty `api`, `stage` and `http_route`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    api: String,
    stage: String,
    http_route: String,
    http_request_method: &'static str,
    http_response_status_code: u16,
    url_scheme: &'static str,
    network_protocol_version: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ExporterLabels {
    exporter: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StoreOperation {
    operation: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    api: String,
    stage: String,
    http_route: String,
}

/// Buckets for HTTP durations, in seconds: OpenTelemetry's defaults, below which a gateway's own
/// answers (tens of microseconds) and a proxied request on a LAN (a fraction of a millisecond) fall,
/// so six sub-millisecond bounds come first; with 5 ms as the first, `histogram_quantile` put the
/// p50 of 0.2 ms requests at 2.5 ms.
const DURATION_BUCKETS: [f64; 20] = [
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25,
    0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
];

/// A duration histogram over [`DURATION_BUCKETS`], in atomics: an observation is two atomic
/// additions, where `prometheus-client`'s histogram takes a lock each time (measured: the request
/// path's one lock). Its counts also give the dashboard's latency quantiles, which
/// `prometheus-client` would not hand back. Clones share the counts.
#[derive(Debug, Clone, Default)]
struct Durations(Arc<DurationCounts>);

#[derive(Debug, Default)]
struct DurationCounts {
    /// Per bound, the observations at or under it and over the one before (the last: above
    /// every bound).
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
}

impl Durations {
    fn observe(&self, secs: f64) {
        let bucket = DURATION_BUCKETS.partition_point(|bound| *bound < secs);
        self.0.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.0
            .sum_nanos
            .fetch_add((secs * 1e9) as u64, Ordering::Relaxed);
    }

    /// Adds this histogram's counts to `into`.
    fn add_to(&self, into: &mut [u64; DURATION_BUCKETS.len() + 1]) {
        for (sum, n) in into.iter_mut().zip(&self.0.buckets) {
            *sum += n.load(Ordering::Relaxed);
        }
    }
}

impl TypedMetric for Durations {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for Durations {
    fn encode(&self, mut encoder: MetricEncoder) -> std::fmt::Result {
        let mut counts = [0u64; DURATION_BUCKETS.len() + 1];
        self.add_to(&mut counts);
        // Per bucket: the encoder makes them cumulative.
        let buckets: Vec<(f64, u64)> = DURATION_BUCKETS
            .iter()
            .chain([f64::INFINITY].iter())
            .copied()
            .zip(counts)
            .collect();
        let count = counts.iter().sum();
        let sum = self.0.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

/// The `q`-quantile of `counts` (per bucket, as [`Durations`] keeps them), as Prometheus's
/// `histogram_quantile` estimates it (linear within a bucket): seconds, and whether it fell in the
/// first bucket, where it is only known to be under that bound. `None` without observations.
fn quantile(counts: &[u64; DURATION_BUCKETS.len() + 1], q: f64) -> Option<(f64, bool)> {
    let total: u64 = counts.iter().sum();
    if total == 0 {
        return None;
    }
    let rank = q * total as f64;
    let mut below = 0u64;
    for (i, &n) in counts.iter().enumerate() {
        if n > 0 && (below + n) as f64 >= rank {
            return Some(match (i, DURATION_BUCKETS.get(i)) {
                (0, _) => (DURATION_BUCKETS[0], true),
                // Above every bound: the largest bound, as Prometheus answers.
                (_, None) => (DURATION_BUCKETS[DURATION_BUCKETS.len() - 1], false),
                (_, Some(&upper)) => {
                    let lower = DURATION_BUCKETS[i - 1];
                    let within = (rank - below as f64) / n as f64;
                    (lower + (upper - lower) * within, false)
                }
            });
        }
        below += n;
    }
    None
}

/// The methods a label may name; any other is `_OTHER` (OpenTelemetry's convention), so that a client
/// cannot grow the series without bound.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::POST => "POST",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "_OTHER",
    }
}

/// The metrics of one family met so far under a cell, found by a small key under a read lock
/// without hashing labels; a new one is made (and registered in the family) once.
#[derive(Debug)]
struct Seen<K, M>(RwLock<Vec<(K, M)>>);

impl<K, M> Default for Seen<K, M> {
    fn default() -> Self {
        Self(RwLock::default())
    }
}

impl<K, M> Seen<K, M> {
    /// Applies `f` to every metric met so far.
    fn each(&self, f: impl FnMut(&M)) {
        let seen = self.0.read().unwrap_or_else(|e| e.into_inner());
        seen.iter().map(|(_, m)| m).for_each(f);
    }

    /// The sum of `count` over the metrics whose key `is` accepts.
    fn sum(&self, is: impl Fn(&K) -> bool, count: impl Fn(&M) -> u64) -> u64 {
        let seen = self.0.read().unwrap_or_else(|e| e.into_inner());
        seen.iter()
            .filter(|(k, _)| is(k))
            .map(|(_, m)| count(m))
            .sum()
    }

    /// Applies `f` to the metric whose key `is` accepts, made by `make` the first time.
    fn with(&self, is: impl Fn(&K) -> bool, make: impl FnOnce() -> (K, M), f: impl Fn(&M)) {
        let seen = self.0.read().unwrap_or_else(|e| e.into_inner());
        if let Some((_, m)) = seen.iter().find(|(k, _)| is(k)) {
            return f(m);
        }
        drop(seen);
        let mut seen = self.0.write().unwrap_or_else(|e| e.into_inner());
        match seen.iter().find(|(k, _)| is(k)) {
            Some((_, m)) => f(m),
            None => {
                let (k, m) = make();
                f(&m);
                seen.push((k, m));
            }
        }
    }
}

/// Whether `seen`, a plan's id kept by a [`Seen`], is `plan`: the snapshot's own `Arc` is compared by
/// address first, so the request path rarely compares strings.
fn same_plan(seen: &Option<Arc<str>>, plan: Option<&Arc<str>>) -> bool {
    match (seen, plan) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b) || a == b,
        (None, None) => true,
        _ => false,
    }
}

/// How a request came and was answered: method label, status, scheme and protocol.
type Answered = (&'static str, u16, &'static str, Protocol);

/// One route of one stage: its labels, the integration histogram, and the duration histograms met
/// so far by how requests came and were answered.
#[derive(Debug)]
struct RouteCell {
    labels: RouteLabels,
    integration: Durations,
    seen: Seen<Answered, Durations>,
}

/// One stage: the decision counters met so far by plan and decision.
#[derive(Debug)]
struct StageCell {
    api: String,
    stage: String,
    decisions: Seen<(Option<Arc<str>>, Decision), Counter>,
}

/// The route and stage cells of the configured APIs, indexed without a map.
#[derive(Debug, Default)]
struct RouteCells {
    cells: Vec<RouteCell>,
    stages: Vec<StageCell>,
    /// Per API: where its cells start, its routes per stage, and where its stages start.
    apis: Vec<(usize, usize, usize)>,
}

impl RouteCells {
    fn new(config: &GatewayConfig, integration: &Family<RouteLabels, Durations>) -> Self {
        let mut cells = Vec::new();
        let mut stages = Vec::new();
        let mut apis = Vec::new();
        let cell = |labels: RouteLabels| RouteCell {
            integration: integration.get_or_create(&labels).clone(),
            labels,
            seen: Seen::default(),
        };
        let stage_cell = |api: &str, stage: &str| StageCell {
            api: api.to_owned(),
            stage: stage.to_owned(),
            decisions: Seen::default(),
        };
        for api in &config.apis {
            apis.push((cells.len(), api.routes.len(), stages.len()));
            for stage in &api.stages {
                stages.push(stage_cell(&api.id, &stage.name));
                for route in &api.routes {
                    cells.push(cell(RouteLabels {
                        api: api.id.clone(),
                        stage: stage.name.clone(),
                        http_route: route.path.clone(),
                    }));
                }
            }
        }
        // The last cells: requests no route matched.
        cells.push(cell(RouteLabels {
            api: String::new(),
            stage: String::new(),
            http_route: String::new(),
        }));
        stages.push(stage_cell("", ""));
        Self {
            cells,
            stages,
            apis,
        }
    }

    fn of(&self, m: Option<RouteMatch>) -> Option<&RouteCell> {
        match m {
            Some(m) => {
                let (start, routes, _) = *self.apis.get(m.api)?;
                self.cells.get(start + m.stage * routes + m.route)
            }
            None => self.cells.last(),
        }
    }

    fn stage_of(&self, m: Option<RouteMatch>) -> Option<&StageCell> {
        match m {
            Some(m) => self.stages.get(self.apis.get(m.api)?.2 + m.stage),
            None => self.stages.last(),
        }
    }
}

/// The `tollgate_usage_plan_info{id,name}` series, one per usage plan served: other series name a
/// plan by id (as AWS's tools do), and a query joins on this for the name people read.
#[derive(Debug, Default)]
struct PlanNames(RwLock<Vec<(Arc<str>, Arc<str>)>>);

impl Collector for PlanNames {
    fn encode(&self, mut encoder: DescriptorEncoder) -> std::fmt::Result {
        let plans = self.0.read().unwrap_or_else(|e| e.into_inner());
        let mut family = encoder.encode_descriptor(
            "tollgate_usage_plan",
            "Usage plans served, by id and name",
            None,
            MetricType::Info,
        )?;
        let none: [(&str, &str); 0] = [];
        for (id, name) in plans.iter() {
            let labels = [("id", &**id), ("name", &**name)];
            family.encode_family(&labels)?.encode_info(&none)?;
        }
        Ok(())
    }
}

/// The data plane's counters and gauges.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    decisions: Family<DecisionLabels, Counter>,
    connections_refused: Counter,
    handshakes_failed: Counter,
    rapid_resets: Counter,
    access_log_dropped: Counter,
    open_connections: Gauge,
    in_flight: Gauge,
    api_keys: Gauge,
    usage_plans: Gauge,
    /// Cluster mode only: Redis's state, and the limiter calls each request makes (their duration and
    /// failures).
    store: Option<(Gauge, Durations, Counter)>,
    durations: Family<RequestLabels, Durations>,
    routes: RouteCells,
    /// The metering flusher's writes: their duration, their failures, the deltas waiting, and when
    /// (clock nanoseconds) nothing was last left waiting.
    usage_writes: (Durations, Counter),
    flush_pending: Gauge,
    flush_lag: Gauge,
    flushed_at: AtomicU64,
    plan_names: Arc<PlanNames>,
    /// Per exporter: seconds since the end of the last window it delivered, and its failed
    /// deliveries.
    exports: (
        Family<ExporterLabels, Gauge>,
        Family<ExporterLabels, Counter>,
    ),
}

impl Metrics {
    /// The metrics of a gateway serving `config`; `cluster`: it decides limits in Redis, whose
    /// state is shown too.
    pub fn new(config: &GatewayConfig, cluster: bool) -> Self {
        let mut registry = Registry::default();
        let durations = Family::<RequestLabels, Durations>::default();
        registry.register_with_unit(
            "tollgate_request_duration",
            "Time from a request's head to the end of its answer, by route, method, status, scheme and protocol",
            Unit::Seconds,
            durations.clone(),
        );
        let integration = Family::<RouteLabels, Durations>::default();
        registry.register_with_unit(
            "tollgate_integration_duration",
            "Time the upstream took to take the request and answer it, by route",
            Unit::Seconds,
            integration.clone(),
        );
        let routes = RouteCells::new(config, &integration);
        let store_durations = Family::<StoreOperation, Durations>::default();
        registry.register_with_unit(
            "tollgate_store_operation_duration",
            "Time the store took for an operation the data plane asked of it",
            Unit::Seconds,
            store_durations.clone(),
        );
        let store_errors = Family::<StoreOperation, Counter>::default();
        registry.register(
            "tollgate_store_operation_errors",
            "Store operations that failed",
            store_errors.clone(),
        );
        let add_usage = StoreOperation {
            operation: "add_usage",
        };
        let usage_writes = (
            store_durations.get_or_create(&add_usage).clone(),
            store_errors.get_or_create(&add_usage).clone(),
        );
        let decisions = Family::<DecisionLabels, Counter>::default();
        registry.register(
            "tollgate_decisions",
            "Requests by what admission decided, per stage and usage plan",
            decisions.clone(),
        );
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let c = Counter::default();
            registry.register(name, help, c.clone());
            c
        };
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let g = Gauge::default();
            registry.register(name, help, g.clone());
            g
        };
        let connections_refused = counter(
            &mut registry,
            "tollgate_connections_refused",
            "Client connections closed (or HTTP/2 streams refused) at once because maxConnections were in use",
        );
        let handshakes_failed = counter(
            &mut registry,
            "tollgate_tls_handshakes_failed",
            "TLS handshakes that failed or timed out",
        );
        let rapid_resets = counter(
            &mut registry,
            "tollgate_http2_rapid_reset",
            "HTTP/2 connections closed with ENHANCE_YOUR_CALM for cancelling most of their streams (CVE-2023-44487)",
        );
        let access_log_dropped = counter(
            &mut registry,
            "tollgate_access_log_dropped",
            "Access-log lines dropped because the writer could not keep up",
        );
        let open_connections = gauge(
            &mut registry,
            "tollgate_open_connections",
            "Client connections open on the data plane",
        );
        let in_flight = gauge(
            &mut registry,
            "tollgate_requests_in_flight",
            "Requests (HTTP/2 streams included) being answered",
        );
        let api_keys = gauge(&mut registry, "tollgate_api_keys", "API keys served");
        let usage_plans = gauge(
            &mut registry,
            "tollgate_usage_plans",
            "Usage plans with at least one key",
        );
        let flush_pending = gauge(
            &mut registry,
            "tollgate_metering_pending",
            "Metered usage deltas waiting to be written to the store",
        );
        let flush_lag = Gauge::default();
        registry.register_with_unit(
            "tollgate_metering_flush_lag",
            "Time since the metering flusher last left nothing waiting",
            Unit::Seconds,
            flush_lag.clone(),
        );
        let store = cluster.then(|| {
            let degraded = gauge(
                &mut registry,
                "tollgate_store_degraded",
                "1 while Redis is unavailable and onStoreFailure applies",
            );
            let decide = StoreOperation {
                operation: "decide",
            };
            let calls = store_durations.get_or_create(&decide).clone();
            let errors = store_errors.get_or_create(&decide).clone();
            (degraded, calls, errors)
        });
        registry.register(
            "tollgate_build",
            "The running build",
            Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]),
        );
        let plan_names = Arc::<PlanNames>::default();
        registry.register_collector(Box::new(plan_names.clone()));
        let exports = (
            Family::<ExporterLabels, Gauge>::default(),
            Family::<ExporterLabels, Counter>::default(),
        );
        registry.register_with_unit(
            "tollgate_export_lag",
            "Time since the end of the last window an exporter delivered, per exporter",
            Unit::Seconds,
            exports.0.clone(),
        );
        registry.register(
            "tollgate_export_failures",
            "Deliveries of an exporter's records that failed (retried)",
            exports.1.clone(),
        );
        for ex in &config.exporters {
            let labels = ExporterLabels {
                exporter: ex.name.clone(),
            };
            drop(exports.0.get_or_create(&labels));
            drop(exports.1.get_or_create(&labels));
        }
        Self {
            registry,
            decisions,
            connections_refused,
            handshakes_failed,
            rapid_resets,
            access_log_dropped,
            open_connections,
            in_flight,
            api_keys,
            usage_plans,
            store,
            durations,
            routes,
            usage_writes,
            flush_pending,
            flush_lag,
            flushed_at: AtomicU64::new(0),
            plan_names,
            exports,
        }
    }

    /// Records one answered request: how long it took (seconds), where it went, how it came (scheme
    /// and protocol) and its status; and, when it was forwarded, how long the upstream took.
    pub(crate) fn observe(
        &self,
        m: Option<RouteMatch>,
        method: &Method,
        (scheme, protocol): (&'static str, Protocol),
        status: u16,
        secs: f64,
        integration_secs: Option<f64>,
    ) {
        let Some(cell) = self.routes.of(m) else {
            return;
        };
        if let Some(secs) = integration_secs {
            cell.integration.observe(secs);
        }
        let method = method_label(method);
        let make = || {
            let labels = RequestLabels {
                api: cell.labels.api.clone(),
                stage: cell.labels.stage.clone(),
                http_route: cell.labels.http_route.clone(),
                http_request_method: method,
                http_response_status_code: status,
                url_scheme: scheme,
                network_protocol_version: protocol.version(),
            };
            (
                (method, status, scheme, protocol),
                self.durations.get_or_create(&labels).clone(),
            )
        };
        let answered = (method, status, scheme, protocol);
        cell.seen
            .with(|&k| k == answered, make, |h| h.observe(secs));
    }

    /// Counts what admission decided about a request that matched `m`, under `plan` (the plan of
    /// the key it presented, once the key was accepted).
    pub(crate) fn decided(
        &self,
        m: Option<RouteMatch>,
        plan: Option<&Arc<str>>,
        decision: Decision,
    ) {
        let Some(cell) = self.routes.stage_of(m) else {
            return;
        };
        let make = || {
            let labels = DecisionLabels {
                api: cell.api.clone(),
                stage: cell.stage.clone(),
                usage_plan: plan.map(|p| p.to_string()).unwrap_or_default(),
                decision: decision.name(),
            };
            let counter = self.decisions.get_or_create(&labels).clone();
            ((plan.cloned(), decision), counter)
        };
        let is = |(p, d): &(Option<Arc<str>>, Decision)| *d == decision && same_plan(p, plan);
        cell.decisions.with(is, make, |c| {
            c.inc();
        });
    }

    /// The `q`-quantile of every request's duration since the gateway started: seconds, and whether
    /// it is only known to be under that (the first bucket); `None` before the first request.
    pub fn latency(&self, q: f64) -> Option<(f64, bool)> {
        let mut counts = [0u64; DURATION_BUCKETS.len() + 1];
        for cell in &self.routes.cells {
            cell.seen.each(|h| h.add_to(&mut counts));
        }
        quantile(&counts, q)
    }

    /// Requests refused 403 for their key since the gateway started.
    pub fn forbidden(&self) -> u64 {
        self.routes
            .stages
            .iter()
            .map(|cell| {
                cell.decisions
                    .sum(|(_, d)| d.forbids_the_key(), Counter::get)
            })
            .sum()
    }

    /// Counts a client connection closed, or an HTTP/2 stream refused, at once because the
    /// connection limit was reached.
    /// Exporter `exporter` has delivered everything up to `secs` seconds ago.
    pub(crate) fn export_lag(&self, exporter: &str, secs: i64) {
        let labels = ExporterLabels {
            exporter: exporter.to_owned(),
        };
        self.exports.0.get_or_create(&labels).set(secs);
    }

    /// A delivery of exporter `exporter` failed.
    pub(crate) fn export_failed(&self, exporter: &str) {
        let labels = ExporterLabels {
            exporter: exporter.to_owned(),
        };
        self.exports.1.get_or_create(&labels).inc();
    }

    pub fn connection_refused(&self) {
        self.connections_refused.inc();
    }

    /// Counts a TLS handshake that failed or timed out.
    pub fn handshake_failed(&self) {
        self.handshakes_failed.inc();
    }

    /// Counts an HTTP/2 connection cut off for resetting most of its streams.
    pub fn http2_rapid_reset(&self) {
        self.rapid_resets.inc();
    }

    /// Counts an access-log line dropped because the writer was that far behind.
    pub fn access_log_dropped(&self) {
        self.access_log_dropped.inc();
    }

    /// Records a request's call to the shared limiter: how long it took and whether it answered.
    pub(crate) fn store_called(&self, secs: f64, ok: bool) {
        if let Some((_, calls, errors)) = &self.store {
            calls.observe(secs);
            if !ok {
                errors.inc();
            }
        }
    }

    /// A client connection is open until the guard is dropped.
    pub(crate) fn connection_opened(&self) -> GaugeGuard<'_> {
        GaugeGuard::new(&self.open_connections)
    }

    /// A request is being answered until the guard is dropped.
    pub(crate) fn request_started(&self) -> GaugeGuard<'_> {
        GaugeGuard::new(&self.in_flight)
    }

    /// Records one write of metered usage: how long it took and whether it worked, and how many
    /// deltas are left waiting (`now`: the clock's reading).
    pub(crate) fn usage_written(&self, secs: f64, ok: bool, pending: usize, now: u64) {
        self.usage_writes.0.observe(secs);
        if !ok {
            self.usage_writes.1.inc();
        }
        self.flushed(pending, now);
    }

    /// Records a flush that left `pending` deltas waiting.
    pub(crate) fn flushed(&self, pending: usize, now: u64) {
        self.flush_pending.set(pending as i64);
        if pending == 0 {
            self.flushed_at.store(now, Ordering::Relaxed);
        }
    }

    /// The OpenMetrics text exposition, with the given gauges and the usage plans served (`now`:
    /// the clock's reading).
    pub fn render<'p>(
        &self,
        store_degraded: Option<bool>,
        api_keys: usize,
        (usage_plans, plans): (usize, impl Iterator<Item = (&'p Arc<str>, &'p Arc<str>)>),
        now: u64,
    ) -> String {
        {
            let mut names = self.plan_names.0.write().unwrap_or_else(|e| e.into_inner());
            names.clear();
            names.extend(plans.map(|(id, name)| (id.clone(), name.clone())));
        }
        let flushed_at = self.flushed_at.load(Ordering::Relaxed);
        if flushed_at > 0 {
            self.flush_lag
                .set((now.saturating_sub(flushed_at) / 1_000_000_000) as i64);
        }
        self.api_keys.set(api_keys as i64);
        self.usage_plans.set(usage_plans as i64);
        if let (Some((gauge, ..)), Some(degraded)) = (&self.store, store_degraded) {
            gauge.set(i64::from(degraded));
        }
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }
}

/// Holds one unit of a gauge: added when made, taken back when dropped (also when the future
/// holding it is cancelled).
pub(crate) struct GaugeGuard<'a>(&'a Gauge);

impl<'a> GaugeGuard<'a> {
    fn new(gauge: &'a Gauge) -> Self {
        gauge.inc();
        Self(gauge)
    }
}

impl Drop for GaugeGuard<'_> {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_are_estimated_as_prometheus_does() {
        let counts = |h: &Durations| {
            let mut c = [0u64; DURATION_BUCKETS.len() + 1];
            h.add_to(&mut c);
            c
        };
        let all = Durations::default();
        assert_eq!(quantile(&counts(&all), 0.5), None);
        // 10 answers in (0.1 ms, 0.25 ms], 10 in (0.25 ms, 0.5 ms].
        for _ in 0..10 {
            all.observe(0.0002);
            all.observe(0.0004);
        }
        let (p50, under) = quantile(&counts(&all), 0.5).unwrap();
        assert!(!under && (p50 - 0.00025).abs() < 1e-12, "{p50}");
        let (p99, _) = quantile(&counts(&all), 0.99).unwrap();
        assert!((p99 - (0.00025 + 0.00025 * 0.98)).abs() < 1e-12, "{p99}");
        // In the first bucket: only "under 50 µs" is known.
        let fast = Durations::default();
        fast.observe(0.00001);
        assert_eq!(quantile(&counts(&fast), 0.5), Some((0.00005, true)));
        // Above every bound: the largest.
        let slow = Durations::default();
        slow.observe(60.0);
        assert_eq!(quantile(&counts(&slow), 0.99), Some((10.0, false)));
    }

    #[test]
    fn durations_are_exposed_as_a_prometheus_histogram() {
        let h = Durations::default();
        h.observe(0.0002);
        h.observe(0.003);
        let mut registry = Registry::default();
        registry.register_with_unit("d", "D", Unit::Seconds, h);
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        assert!(out.contains("d_seconds_sum 0.0032\n"), "{out}");
        assert!(out.contains("d_seconds_count 2\n"), "{out}");
        assert!(out.contains("d_seconds_bucket{le=\"0.0001\"} 0\n"), "{out}");
        assert!(
            out.contains("d_seconds_bucket{le=\"0.00025\"} 1\n"),
            "{out}"
        );
        assert!(out.contains("d_seconds_bucket{le=\"0.005\"} 2\n"), "{out}");
        assert!(out.contains("d_seconds_bucket{le=\"+Inf\"} 2\n"), "{out}");
    }
}
