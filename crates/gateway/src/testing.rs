//! Fixtures for the data plane's unit tests: one API with two stages, a plan with a per-method
//! throttle, an enabled and a disabled key, and a call through the embedded admission pipeline.

use std::collections::BTreeMap;

use tollgate_store::report::PeriodUsed;

use arc_swap::ArcSwap;
use tollgate_core::clock::NANOS_PER_SEC;
use tollgate_core::quota::{EpochDay, Period};
use tollgate_core::{ApiKey, ApiStage, KeyHash, QuotaSettings, ThrottleSettings, UsagePlan};
use tollgate_store::{KeyIndex, Records};

use crate::admit::admit_locally;
use crate::client_ip::ClientAddress;
use crate::config::{Api, GatewayConfig, Integration, Route, RouteMethod, Stage};
use crate::limits::{LimitInfo, Refusal};
use crate::meter::Counted;
use crate::snapshot::{Snapshot, Taken};

pub(crate) const KEY: &str = "central-system-key-0123456789";
pub(crate) const OTHER: &str = "another-partner-key-0123456789";
pub(crate) const T0: u64 = 1_795_000_000 * NANOS_PER_SEC; // 2026-11-19
/// A client reached directly, from loopback.
pub(crate) const PEER: ClientAddress<'static> =
    ClientAddress::peer(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

pub(crate) fn throttle(rate: f64, burst: u32) -> ThrottleSettings {
    ThrottleSettings {
        rate_limit: rate,
        burst_limit: burst,
    }
}

pub(crate) fn quota(limit: u32, period: Period) -> QuotaSettings {
    QuotaSettings {
        limit,
        offset: 0,
        period,
    }
}

pub(crate) fn config(
    stage_throttle: Option<ThrottleSettings>,
    account: Option<ThrottleSettings>,
) -> GatewayConfig {
    let route = |path: &str, method: &str, api_key_required| Route {
        path: path.into(),
        method: RouteMethod::Only(method.parse().unwrap()),
        api_key_required,
        integration: Integration::Mock {
            status: http::StatusCode::OK,
            body: "ok".into(),
            headers: vec![],
        },
        cors: None,
        allow_get_body: false,
        authorizer: None,
        cost: 1,
    };
    GatewayConfig {
        account_throttle: account,
        rate_limit_headers: true,
        access_log: None,
        max_request_body: crate::config::DEFAULT_MAX_REQUEST_BODY,
        kept_fields: Default::default(),
        trusted_proxies: None,
        webhooks: Vec::new(),
        alerts: Vec::new(),
        exporters: Vec::new(),
        verify: None,
        apis: vec![Api {
            id: "warranty".into(),
            stages: ["prod", "dev"]
                .iter()
                .map(|name| Stage {
                    name: (*name).into(),
                    base_path: format!("/{name}"),
                    throttle: stage_throttle,
                    method_throttle: BTreeMap::new(),
                })
                .collect(),
            routes: vec![
                route("/registrations/{id}/warranty", "PUT", true),
                route("/registrations/{id}", "GET", true),
                route("/health", "GET", false),
            ],
            allow_encoded_slashes: false,
        }],
    }
}

pub(crate) fn records(
    plan_throttle: Option<ThrottleSettings>,
    quota: Option<QuotaSettings>,
) -> Records {
    let key = |id: &str, value: &str, enabled| ApiKey {
        id: id.into(),
        name: id.into(),
        description: None,
        customer_id: None,
        enabled,
        value_hash: KeyHash::of(value),
        sealed_value: None,
        created_date: 0,
        last_updated_date: 0,
        ..ApiKey::default()
    };
    Records {
        plans: vec![UsagePlan {
            id: "plan01".into(),
            name: "central-batch".into(),
            description: None,
            api_stages: vec![ApiStage {
                api_id: "warranty".into(),
                stage: "prod".into(),
                throttle: BTreeMap::from([(
                    "/registrations/{id}/warranty/PUT".into(),
                    throttle(1.0, 2),
                )]),
            }],
            throttle: plan_throttle,
            quota,
            ..UsagePlan::default()
        }],
        keys: vec![
            key("key0000001", KEY, true),
            key("key0000002", OTHER, false),
        ],
        bindings: vec![
            ("plan01".into(), "key0000001".into()),
            ("plan01".into(), "key0000002".into()),
        ],
    }
}

pub(crate) fn snap(cfg: GatewayConfig, rec: &Records) -> Snapshot {
    Snapshot::build(
        cfg,
        &KeyIndex::from(rec),
        &PeriodUsed::default(),
        EpochDay::from_nanos(T0),
    )
    .unwrap()
}

pub(crate) fn call(
    s: &Snapshot,
    method: &str,
    path: &str,
    key: Option<&str>,
    now: u64,
) -> Result<LimitInfo, Refusal> {
    let m = s.route(&method.parse().unwrap(), path);
    admit_locally(s, m.as_ref(), key.map(str::as_bytes), PEER, now)
        .map(|a| a.limits)
        .map_err(|r| r.refusal)
}

/// The admitted counts the flusher would be handed now, as (plan id, key id, day, count), sorted.
pub(crate) fn taken(cell: &ArcSwap<Snapshot>) -> Vec<(String, String, EpochDay, u64)> {
    let mut out = Vec::new();
    Snapshot::take_metered(cell, |plan, holder, taken| {
        if let Taken::Count(Counted::Admitted, day, n) = taken {
            out.push((plan.into(), holder_name(holder), day, n));
        }
    });
    out.sort();
    out
}

/// A key's id, or `customer:` and a customer's id.
pub(crate) fn holder_name(holder: tollgate_store::Holder<'_>) -> String {
    match holder {
        tollgate_store::Holder::Key(k) => k.to_owned(),
        tollgate_store::Holder::Customer(c) => format!("customer:{c}"),
    }
}

pub(crate) fn counted(key: &str, at: u64, n: u64) -> (String, String, EpochDay, u64) {
    ("plan01".into(), key.into(), EpochDay::from_nanos(at), n)
}
