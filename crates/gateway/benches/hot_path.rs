//! The request path's pieces, in process and without sockets: throttle decision, quota check, route
//! match, key hashing and lookup among 1M keys, and the whole admission of a keyed request.
//! Run: `cargo bench -p tollgate-gateway --bench hot_path`.

#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::hint::black_box;
use std::time::Duration;

use criterion::{Criterion, criterion_group, criterion_main};
use http::Method;
use tollgate_core::clock::NANOS_PER_SEC;
use tollgate_core::quota::{EpochDay, Period, Quota, QuotaCount};
use tollgate_core::{
    ApiStage, Gcra, GcraState, KeyHash, QuotaSettings, ThrottleSettings, UsagePlan,
};
use tollgate_gateway::config::{Api, Integration, Route, RouteMethod, Stage};
use tollgate_gateway::{ClientAddress, GatewayConfig, Snapshot, admit_locally};

const PEER: ClientAddress<'static> =
    ClientAddress::peer(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
use tollgate_store::report::PeriodUsed;
use tollgate_store::{KeyIndex, KeyTerms};

const NOW: u64 = 1_795_000_000 * NANOS_PER_SEC;

fn config() -> GatewayConfig {
    let route = |path: &str, method: Method, key| Route {
        path: path.into(),
        method: RouteMethod::Only(method),
        api_key_required: key,
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
        account_throttle: None,
        rate_limit_headers: false,
        access_log: None,
        max_request_body: tollgate_gateway::config::DEFAULT_MAX_REQUEST_BODY,
        kept_fields: Default::default(),
        trusted_proxies: None,
        webhooks: Vec::new(),
        alerts: Vec::new(),
        exporters: Vec::new(),
        verify: None,
        apis: vec![Api {
            id: "warranty".into(),
            stages: vec![Stage {
                name: "prod".into(),
                base_path: "/prod".into(),
                throttle: None,
                method_throttle: BTreeMap::new(),
            }],
            routes: vec![
                route("/registrations/{id}/warranty", Method::PUT, true),
                route("/registrations/{id}", Method::GET, true),
                route("/registrations", Method::GET, true),
                route("/health", Method::GET, false),
                route("/files/{path+}", Method::GET, true),
            ],
            allow_encoded_slashes: false,
        }],
    }
}

/// `n` keys, all in one plan with a generous throttle and quota.
fn records(n: usize) -> KeyIndex {
    let plan = UsagePlan {
        id: "plan01".into(),
        name: "p".into(),
        description: None,
        api_stages: vec![ApiStage {
            api_id: "warranty".into(),
            stage: "prod".into(),
            throttle: BTreeMap::new(),
        }],
        throttle: Some(ThrottleSettings {
            rate_limit: 1e9,
            burst_limit: 1_000_000,
        }),
        quota: Some(QuotaSettings {
            limit: u32::MAX,
            offset: 0,
            period: Period::Month,
        }),
        ..UsagePlan::default()
    };
    let mut index = KeyIndex::new(vec![plan]);
    let ids: Vec<String> = (0..n).map(|i| format!("k{i:09}")).collect();
    for (i, id) in ids.iter().enumerate() {
        let terms = KeyTerms {
            enabled: true,
            ..KeyTerms::default()
        };
        index.push_key(id, id, KeyHash::of(value(i)), terms);
    }
    index.bind_all(ids.iter().map(|id| ("plan01", id)));
    index
}

fn value(i: usize) -> String {
    format!("benchmarkKeyValue{i:023}")
}

fn benches(c: &mut Criterion) {
    let gcra = Gcra::new(ThrottleSettings {
        rate_limit: 1e9,
        burst_limit: 1_000_000,
    });
    let state = GcraState::default();
    let mut now = NOW;
    c.bench_function("throttle decision (GCRA)", |b| {
        b.iter(|| {
            now += 1;
            black_box(gcra.check(&state, black_box(now)))
        })
    });

    let quota = Quota::new(QuotaSettings {
        limit: u32::MAX,
        offset: 2,
        period: Period::Month,
    });
    let count = QuotaCount::default();
    c.bench_function("quota check", |b| {
        b.iter(|| black_box(quota.try_consume(&count, 1, black_box(NOW))))
    });

    let small = Snapshot::build(
        config(),
        &records(1),
        &PeriodUsed::default(),
        EpochDay::from_nanos(NOW),
    )
    .unwrap();
    c.bench_function("route match", |b| {
        b.iter(|| {
            black_box(small.route(&Method::PUT, black_box("/prod/registrations/42/warranty")))
        })
    });

    let big = Snapshot::build(
        config(),
        &records(1_000_000),
        &PeriodUsed::default(),
        EpochDay::from_nanos(NOW),
    )
    .unwrap();
    let key = value(777_777);
    let m = big.route(&Method::GET, "/prod/registrations").unwrap();
    c.bench_function("key hash (SHA-256 of a 40-byte value)", |b| {
        b.iter(|| black_box(KeyHash::of(black_box(key.as_bytes()))))
    });
    c.bench_function(
        "admission of a keyed request, 1M keys (route, key, throttle, quota, meter)",
        |b| {
            b.iter(|| {
                let m = big
                    .route(&Method::GET, black_box("/prod/registrations"))
                    .unwrap();
                black_box(admit_locally(&big, Some(&m), Some(key.as_bytes()), PEER, NOW).is_ok())
            })
        },
    );
    c.bench_function("key lookup among 1M keys (hash + miss, refused)", |b| {
        let unknown: &[u8] = b"noSuchKeyValue00000000000000000000000000";
        b.iter(|| black_box(admit_locally(&big, Some(&m), Some(unknown), PEER, NOW).is_err()))
    });
}

criterion_group! {
    name = hot_path;
    config = Criterion::default().measurement_time(Duration::from_secs(3)).warm_up_time(Duration::from_secs(1));
    targets = benches
}
criterion_main!(hot_path);
