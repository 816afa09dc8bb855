//! Admission, top to bottom: route ▸ key ▸ throttles ▸ quota ▸ meter.
//!
//! 1. **Route**: no route for the method and path: 403 `Missing Authentication Token`.
//! 2. **Key**: a route with `apiKeyRequired` takes the `x-api-key` value, hashes it, and finds the
//!    enabled, unexpired key's first plan that covers the stage, when the request comes from where
//!    the key may be used ([`crate::client_ip`]); anything else: 403 `Forbidden`.
//! 3. **Throttles**: the key's bucket (the plan's per-method throttle for this route, else the plan
//!    throttle), the stage's (per-method or default) and the account's. A request must pass every
//!    one; a refusal anywhere hands back the tokens the others took, so the outcome is the same in
//!    whatever order they are asked. The two shared by all callers live on this instance and are
//!    taken first; the key's own comes with its quota from [`KeyLimits`], which may have to ask
//!    Redis.
//! 4. **Quota**: only requests the throttles let through count, each spending its route's `cost`
//!    whole or not at all; a spent quota keeps the key's token (hammering is not free). 429 `Limit
//!    Exceeded`.
//! 5. **Meter**: an admitted keyed request counts its cost for (plan, key, UTC day); so does one refused by a
//!    throttle or for its quota, in counts of their own, and the key's last use is noted.
//!
//! Before the key, [`admit_caller`] works out who is calling: the `x-api-key` value, or on a route
//! with an authorizer the key its verified JWT names; and it says what was decided ([`Decision`]),
//! for the metrics and the access log, and whom to name to the backend.
//!
//! [`KeyLimits`] has two implementations: [`Local`], this instance's atomics (the embedded mode,
//! and cluster mode's `onStoreFailure: local`, in [`crate::local_limits`]), and
//! [`crate::shared_limits::SharedLimits`], the Redis script every instance shares.

use futures_util::FutureExt as _;
use tollgate_core::KeyHash;
use tollgate_core::gcra::ThrottleDecision;
use tollgate_core::model::KEY_VALUE_LEN;

use tollgate_store::limiter::RedisLimiter;

use crate::client_ip::ClientAddress;
use crate::config::Route;
use crate::jwt::UsageIdentifier;
use crate::limits::{KeyRejected, LimitInfo, Refusal};
use crate::local_limits::{KeyLimits, Local, quota_left};
use crate::meter::Counted;
use crate::metrics::{Decision, Metrics};
use crate::route::RouteMatch;
use crate::shared_limits::SharedLimits;
use crate::snapshot::{Membership, Snapshot};

/// An admitted request: where it goes and what to advertise.
#[derive(Debug)]
pub struct Admission<'s> {
    /// The matched route.
    pub route: &'s Route,
    /// The key's membership, when the route required a key.
    pub membership: Option<Membership<'s>>,
    /// The key's limits after this request.
    pub limits: LimitInfo,
    /// Let through by a plan in shadow that would have refused it: which refusal.
    pub shadow: Option<Decision>,
}

/// A refused request: why, and the key's membership when the key was accepted.
#[derive(Debug)]
pub struct Refused<'s> {
    /// Why, as the client is told.
    pub refusal: Refusal,
    /// The membership whose limits refused it.
    pub membership: Option<Membership<'s>>,
}

impl From<Refusal> for Refused<'_> {
    fn from(refusal: Refusal) -> Self {
        Self {
            refusal,
            membership: None,
        }
    }
}

/// How a caller says which API key is theirs.
#[derive(Debug, Clone, Copy)]
pub enum CallerKey<'a> {
    /// The `x-api-key` value, if any.
    ApiKey(Option<&'a [u8]>),
    /// A JWT caller's verified claim naming the key by its name.
    KeyName(&'a str),
    /// A JWT caller's verified claim holding the key's value (AWS's `usageIdentifierKey`).
    KeyValue(&'a [u8]),
}

/// What a request says about who is calling, as the client sent it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Credentials<'a> {
    /// The `x-api-key` value.
    pub(crate) api_key: Option<&'a [u8]>,
    /// The `Authorization` value (a bearer JWT, on routes with an authorizer).
    pub(crate) authorization: Option<&'a [u8]>,
    /// Where the request came from, for keys with a source-IP allowlist.
    pub(crate) from: ClientAddress<'a>,
}

/// What admission decided about a request.
#[derive(Debug)]
pub(crate) struct Decided<'s> {
    pub(crate) outcome: Result<Admission<'s>, Refused<'s>>,
    /// Its label, as the metrics and the access log name it.
    pub(crate) decision: Decision,
    /// Whom to name to the backend (`X-Tollgate-Subject`): a JWT caller's claim naming its key, or
    /// the key's id when the claim held the key's value (a secret).
    pub(crate) subject: Option<String>,
}

/// Works out who is calling from `credentials` (on a keyed route with an authorizer, the key its
/// verified token names), then admits the request `id`, which matched `m`, at `now`: on this
/// instance's limits, or with `limiter` on those every instance shares. The decision is counted in
/// `metrics`.
pub(crate) async fn admit_caller<'s>(
    snap: &'s Snapshot,
    limiter: Option<&RedisLimiter>,
    metrics: &Metrics,
    id: &str,
    m: Option<RouteMatch>,
    credentials: Credentials<'_>,
    now: u64,
) -> Decided<'s> {
    let authorizer = m
        .map(|m| snap.route_at(&m))
        .filter(|r| r.api_key_required)
        .and_then(|r| r.authorizer.as_deref());
    let mut claim = None;
    if let Some(a) = authorizer {
        match a.verify(credentials.authorization, now).await {
            Ok(subject) => claim = subject,
            Err(e) => {
                tracing::debug!(%id, authorizer = %a.settings.name, error = %e, "token refused");
                let decision = Decision::Unauthorized;
                metrics.decided(m, None, decision);
                return Decided {
                    outcome: Err(Refusal::Unauthorized.into()),
                    decision,
                    subject: None,
                };
            }
        }
    }
    let presented = match (authorizer, &claim) {
        (None, _) => CallerKey::ApiKey(credentials.api_key),
        (Some(a), Some(s)) if a.settings.identifier == UsageIdentifier::Name => {
            CallerKey::KeyName(s)
        }
        (Some(_), Some(s)) => CallerKey::KeyValue(s.as_bytes()),
        // A valid token naming no key.
        (Some(_), None) => CallerKey::ApiKey(None),
    };
    let outcome = match limiter {
        None => {
            admit(
                snap,
                &Local(snap),
                m.as_ref(),
                presented,
                credentials.from,
                now,
            )
            .await
        }
        Some(limiter) => {
            let limits = SharedLimits {
                snap,
                limiter,
                metrics,
            };
            admit(snap, &limits, m.as_ref(), presented, credentials.from, now).await
        }
    };
    let (membership, decision) = match &outcome {
        Ok(a) => (a.membership.as_ref(), a.shadow.unwrap_or(Decision::Allowed)),
        Err(r) => (r.membership.as_ref(), Decision::from(&r.refusal)),
    };
    metrics.decided(m, membership.map(|m| m.plan_id()), decision);
    let subject = match authorizer.map(|a| a.settings.identifier) {
        Some(UsageIdentifier::Name) => claim,
        Some(UsageIdentifier::Value) => membership.map(|m| m.key_id.to_owned()),
        None => None,
    };
    Decided {
        outcome,
        decision,
        subject,
    }
}

/// Runs the whole admission pipeline for a request that matched `m` (or no route) presenting
/// `presented` from `from` at `now`, with the key's own limits decided by `limits`.
pub(crate) async fn admit<'s>(
    snap: &'s Snapshot,
    limits: &impl KeyLimits,
    m: Option<&RouteMatch>,
    presented: CallerKey<'_>,
    from: ClientAddress<'_>,
    now: u64,
) -> Result<Admission<'s>, Refused<'s>> {
    // Route.
    let m = m.ok_or(Refusal::MissingAuthenticationToken)?;
    let route = snap.route_at(m);
    // Key.
    let membership = if route.api_key_required {
        let membership = key(snap, m, presented, &from, now)?;
        snap.saw(&membership, now);
        Some(membership)
    } else {
        None
    };
    let refused = |refusal: Refusal| {
        if let (Some(m), Some(c)) = (&membership, counted_as(&refusal)) {
            snap.count(m, c, 1, now);
        }
        Refused {
            refusal,
            membership,
        }
    };
    // Throttles every caller shares.
    let shared = snap.shared_buckets(m);
    for (i, bucket) in shared.iter().enumerate() {
        let Some(bucket) = bucket else { continue };
        if let ThrottleDecision::Refused { retry_after } = bucket.check(now) {
            shared[..i].iter().flatten().for_each(|b| b.refund());
            let limits = LimitInfo {
                quota: membership.as_ref().and_then(|m| quota_left(m, now)),
                ..LimitInfo::default()
            };
            return Err(refused(Refusal::throttled(retry_after, limits)));
        }
    }
    let Some(g) = membership else {
        return Ok(Admission {
            route,
            membership,
            limits: LimitInfo::default(),
            shadow: None,
        });
    };
    // The key's throttle and quota, and the meter.
    match limits.decide(&g, m, now).await {
        Ok(limits) => Ok(Admission {
            route,
            membership,
            limits,
            shadow: None,
        }),
        // A plan tried in shadow refuses nothing of its own: the request passes, and the refusal
        // it would have been is counted (in the shadow's meters) and named.
        Err(refusal) if g.shadow() && Decision::in_shadow(&refusal).is_some() => {
            if let Some(c) = counted_as(&refusal) {
                snap.count(&g, c, 1, now);
            }
            Ok(Admission {
                route,
                membership,
                limits: refusal.limits().unwrap_or_default(),
                shadow: Decision::in_shadow(&refusal),
            })
        }
        Err(refusal) => {
            shared.iter().flatten().for_each(|b| b.refund());
            Err(refused(refusal))
        }
    }
}

/// The per-day meter a refusal by a key's own limits counts in.
fn counted_as(refusal: &Refusal) -> Option<Counted> {
    match refusal {
        Refusal::TooManyRequests { .. } => Some(Counted::Throttled),
        Refusal::LimitExceeded { .. } => Some(Counted::QuotaExceeded),
        _ => None,
    }
}

/// [`admit`] on this instance's state alone (the embedded mode), which never waits.
// A refusal is as common as an admission under load (and under attack): it stays on the stack rather
// than costing an allocation each.
#[allow(clippy::result_large_err)]
pub fn admit_locally<'s>(
    snap: &'s Snapshot,
    m: Option<&RouteMatch>,
    api_key: Option<&[u8]>,
    from: ClientAddress<'_>,
    now: u64,
) -> Result<Admission<'s>, Refused<'s>> {
    admit(snap, &Local(snap), m, CallerKey::ApiKey(api_key), from, now)
        .now_or_never()
        .expect("local limits decide without waiting")
}

/// The membership of the key `presented` (from `from`) that covers the stage `m` matched, at `now`.
fn key<'s>(
    snap: &'s Snapshot,
    m: &RouteMatch,
    presented: CallerKey<'_>,
    from: &ClientAddress<'_>,
    now: u64,
) -> Result<Membership<'s>, Refusal> {
    let value = match presented {
        CallerKey::ApiKey(value) => value.ok_or(Refusal::Forbidden(KeyRejected::Missing))?,
        CallerKey::KeyValue(value) => value,
        CallerKey::KeyName(name) => {
            return snap
                .membership_by_name(name, m, from, now)
                .map_err(Refusal::Forbidden);
        }
    };
    // Values outside AWS's length bounds (20-128 characters, so at most 4 bytes each) cannot be
    // stored keys: refuse them without hashing.
    if value.len() < *KEY_VALUE_LEN.start() || value.len() > 4 * *KEY_VALUE_LEN.end() {
        return Err(Refusal::Forbidden(KeyRejected::Invalid));
    }
    snap.membership_for(&KeyHash::of(value), m, from, now)
        .map_err(Refusal::Forbidden)
}

#[cfg(test)]
mod tests {
    use arc_swap::ArcSwap;
    use tollgate_core::IpNetworks;
    use tollgate_core::clock::NANOS_PER_SEC;
    use tollgate_core::quota::{EpochDay, Period};

    use super::*;
    use crate::snapshot::Taken;
    use crate::testing::{
        KEY, OTHER, T0, call, config, counted, quota, records, snap, taken, throttle,
    };

    #[test]
    fn a_key_is_used_only_from_its_networks_and_spends_nothing_elsewhere() {
        let mut rec = records(None, None);
        rec.keys[0].tags.insert(
            tollgate_core::source_ips::SOURCE_IPS_TAG.into(),
            "203.0.113.0/24,2001:db8::/32".into(),
        );
        let s = snap(config(None, None), &rec);
        let put = "/prod/registrations/42/warranty";
        let m = s.route(&http::Method::PUT, put);
        let at = |ip: &str| ClientAddress::peer(ip.parse().unwrap());
        let from = |ip: &str| {
            admit_locally(&s, m.as_ref(), Some(KEY.as_bytes()), at(ip), T0).map_err(|r| r.refusal)
        };
        let forbidden = Err(Refusal::Forbidden(KeyRejected::SourceIp));
        // Refused from elsewhere, however often: the route's burst is not spent.
        for _ in 0..3 {
            assert_eq!(from("198.51.100.1").map(|_| ()), forbidden);
            assert_eq!(from("2001:db9::1").map(|_| ()), forbidden);
        }
        assert_eq!(
            Decision::from(&Refusal::Forbidden(KeyRejected::SourceIp)).name(),
            "ip_forbidden"
        );
        assert!(
            from("::ffff:203.0.113.7").is_ok(),
            "an IPv4 client on an IPv6 socket"
        );
        assert!(from("2001:db8::5").is_ok());
        // The route's burst of 2 is spent now (and only now): the next is throttled.
        assert!(matches!(
            from("2001:db8::5").map(|_| ()),
            Err(Refusal::TooManyRequests { .. })
        ));
        // Behind a trusted proxy, the client it names; an untrusted peer's word is not taken.
        let lb = IpNetworks::parse("10.0.0.0/8").unwrap();
        let behind = |chain: &'static str, peer: &str| ClientAddress {
            peer: peer.parse().unwrap(),
            chain: chain.as_bytes(),
            trusted: Some(&lb),
            vouched: false,
        };
        let key = |from: ClientAddress<'_>| {
            super::key(
                &s,
                m.as_ref().unwrap(),
                CallerKey::ApiKey(Some(KEY.as_bytes())),
                &from,
                T0,
            )
            .map(|_| ())
        };
        assert_eq!(
            key(behind("198.51.100.1, 10.0.0.9", "10.0.0.9")),
            Err(Refusal::Forbidden(KeyRejected::SourceIp))
        );
        assert_eq!(key(behind("203.0.113.1, 10.0.0.9", "10.0.0.9")), Ok(()));
        assert_eq!(
            key(behind("203.0.113.1, 198.51.100.1", "198.51.100.1")),
            Err(Refusal::Forbidden(KeyRejected::SourceIp))
        );
        // A key without a list is used from anywhere.
        let s = snap(
            config(None, None),
            &records(Some(throttle(100.0, 50)), None),
        );
        let m = s.route(&http::Method::PUT, put);
        assert!(
            admit_locally(&s, m.as_ref(), Some(KEY.as_bytes()), at("198.51.100.1"), T0).is_ok()
        );
    }

    #[test]
    fn key_checks() {
        let s = snap(
            config(None, None),
            &records(Some(throttle(100.0, 50)), None),
        );
        let put = "/prod/registrations/42/warranty";
        assert_eq!(
            call(&s, "GET", "/prod/nowhere", Some(KEY), T0),
            Err(Refusal::MissingAuthenticationToken)
        );
        let forbidden = Refusal::Forbidden;
        assert_eq!(
            call(&s, "PUT", put, None, T0),
            Err(forbidden(KeyRejected::Missing))
        );
        assert_eq!(
            call(&s, "PUT", put, Some("short"), T0),
            Err(forbidden(KeyRejected::Invalid))
        );
        assert_eq!(
            call(&s, "PUT", put, Some("unknown-key-value-0123456789"), T0),
            Err(forbidden(KeyRejected::Invalid))
        );
        assert_eq!(
            call(&s, "PUT", put, Some(OTHER), T0),
            Err(forbidden(KeyRejected::Disabled))
        );
        assert_eq!(
            call(&s, "PUT", "/dev/registrations/42/warranty", Some(KEY), T0),
            Err(forbidden(KeyRejected::Invalid)),
            "the plan does not cover dev"
        );
        assert!(call(&s, "PUT", put, Some(KEY), T0).is_ok());
        assert!(
            call(&s, "GET", "/dev/health", None, T0).is_ok(),
            "public route"
        );
    }

    #[test]
    fn method_throttle_replaces_plan_throttle() {
        let s = snap(config(None, None), &records(Some(throttle(100.0, 5)), None));
        let put = "/prod/registrations/42/warranty";
        let get = "/prod/registrations/42";
        // PUT has its own bucket of 2; GET uses the plan's bucket of 5.
        assert!(call(&s, "PUT", put, Some(KEY), T0).is_ok());
        assert!(call(&s, "PUT", put, Some(KEY), T0).is_ok());
        let refused = call(&s, "PUT", put, Some(KEY), T0).unwrap_err();
        assert!(
            matches!(
                refused,
                Refusal::TooManyRequests {
                    retry_after_secs: 1,
                    ..
                }
            ),
            "{refused:?}"
        );
        for _ in 0..5 {
            assert!(call(&s, "GET", get, Some(KEY), T0).is_ok());
        }
        assert!(matches!(
            call(&s, "GET", get, Some(KEY), T0),
            Err(Refusal::TooManyRequests { .. })
        ));
        // One second later the PUT bucket has one token again.
        assert!(call(&s, "PUT", put, Some(KEY), T0 + NANOS_PER_SEC).is_ok());
    }

    #[test]
    fn stage_and_account_layers_apply_and_refund_the_key() {
        // Stage allows 1 per method at once; the key's plan bucket (5) must not be drained by refusals.
        let s = snap(
            config(Some(throttle(1.0, 1)), None),
            &records(Some(throttle(1.0, 5)), None),
        );
        let get = "/prod/registrations/42";
        assert!(call(&s, "GET", get, Some(KEY), T0).is_ok());
        for _ in 0..10 {
            assert!(matches!(
                call(&s, "GET", get, Some(KEY), T0),
                Err(Refusal::TooManyRequests { .. })
            ));
        }
        let limits = call(&s, "GET", get, Some(KEY), T0 + NANOS_PER_SEC).unwrap();
        assert_eq!(
            limits.throttle.unwrap().remaining,
            4,
            "refused requests took no key tokens"
        );

        let s = snap(
            config(None, Some(throttle(1.0, 2))),
            &records(Some(throttle(100.0, 50)), None),
        );
        assert!(call(&s, "GET", "/prod/health", None, T0).is_ok());
        assert!(call(&s, "GET", get, Some(KEY), T0).is_ok());
        assert!(matches!(
            call(&s, "GET", "/dev/health", None, T0),
            Err(Refusal::TooManyRequests { .. })
        ));
    }

    #[test]
    fn quota_counts_only_admitted_requests_and_meters() {
        let quota = quota(3, Period::Day);
        let cell = ArcSwap::from_pointee(snap(
            config(None, None),
            &records(Some(throttle(1.0, 2)), Some(quota)),
        ));
        let s = cell.load_full();
        let get = "/prod/registrations/42";
        assert_eq!(
            call(&s, "GET", get, Some(KEY), T0)
                .unwrap()
                .quota
                .unwrap()
                .remaining,
            2
        );
        assert!(call(&s, "GET", get, Some(KEY), T0).is_ok());
        // Throttled: does not count against the quota.
        assert!(matches!(
            call(&s, "GET", get, Some(KEY), T0),
            Err(Refusal::TooManyRequests { .. })
        ));
        assert_eq!(
            call(&s, "GET", get, Some(KEY), T0 + NANOS_PER_SEC)
                .unwrap()
                .quota
                .unwrap()
                .remaining,
            0
        );
        let refused = call(&s, "GET", get, Some(KEY), T0 + 3 * NANOS_PER_SEC).unwrap_err();
        let Refusal::LimitExceeded {
            retry_after_secs,
            limits,
        } = refused
        else {
            panic!("{refused:?}")
        };
        let midnight = EpochDay::from_nanos(T0).next().start_nanos();
        assert_eq!(
            retry_after_secs,
            (midnight - T0 - 3 * NANOS_PER_SEC).div_ceil(NANOS_PER_SEC)
        );
        assert_eq!(limits.quota.unwrap().remaining, 0);
        // The next UTC day the quota is back.
        assert!(call(&s, "GET", get, Some(KEY), midnight).is_ok());

        // The flusher is handed what the one membership counted, per day, once.
        assert_eq!(
            taken(&cell),
            vec![
                counted("key0000001", T0, 3),
                counted("key0000001", midnight, 1)
            ]
        );
        assert!(taken(&cell).is_empty());
    }

    #[test]
    fn a_route_spends_its_cost_of_the_quota_and_is_metered_by_it() {
        let mut cfg = config(None, None);
        // GET /registrations/{id} costs 5; PUT …/warranty is free.
        cfg.apis[0].routes[1].cost = 5;
        cfg.apis[0].routes[0].cost = 0;
        let cell = ArcSwap::from_pointee(snap(cfg, &records(None, Some(quota(12, Period::Day)))));
        let s = cell.load_full();
        let get = "/prod/registrations/42";
        let left = |r: Result<LimitInfo, Refusal>| r.map(|l| l.quota.unwrap().remaining);
        assert_eq!(left(call(&s, "GET", get, Some(KEY), T0)), Ok(7));
        assert_eq!(left(call(&s, "GET", get, Some(KEY), T0)), Ok(2));
        // 5 is more than the 2 left: refused whole, nothing spent; a free route still passes.
        assert!(matches!(
            call(&s, "GET", get, Some(KEY), T0),
            Err(Refusal::LimitExceeded { .. })
        ));
        let put = "/prod/registrations/42/warranty";
        assert_eq!(left(call(&s, "PUT", put, Some(KEY), T0)), Ok(2));
        // Usage is what was spent: 10, not 3 requests (the free one is not metered).
        assert_eq!(taken(&cell), vec![counted("key0000001", T0, 10)]);
    }

    #[test]
    fn refusals_are_counted_by_kind_and_the_key_is_seen() {
        let cell = ArcSwap::from_pointee(snap(
            config(None, None),
            &records(Some(throttle(0.001, 3)), Some(quota(2, Period::Day))),
        ));
        let s = cell.load_full();
        let get = "/prod/registrations/42";
        let outcomes: Vec<_> = (0..5)
            .map(|_| call(&s, "GET", get, Some(KEY), T0).map(|_| ()))
            .collect();
        assert!(outcomes[..2].iter().all(Result::is_ok), "{outcomes:?}");
        assert!(matches!(outcomes[2], Err(Refusal::LimitExceeded { .. })));
        assert!(matches!(outcomes[3], Err(Refusal::TooManyRequests { .. })));
        // Keys that were not accepted leave nothing to count.
        assert!(call(&s, "GET", get, Some(OTHER), T0).is_err());
        let mut all = Vec::new();
        Snapshot::take_metered(&cell, |plan, holder, taken| {
            all.push((plan.to_owned(), crate::testing::holder_name(holder), taken));
        });
        all.sort_by_key(|(_, _, t)| format!("{t:?}"));
        let day = EpochDay::from_nanos(T0);
        let at = |t| ("plan01".to_owned(), "key0000001".to_owned(), t);
        assert_eq!(
            all,
            vec![
                at(Taken::Count(Counted::Admitted, day, 2)),
                at(Taken::Count(Counted::QuotaExceeded, day, 1)),
                at(Taken::Count(Counted::Throttled, day, 2)),
                at(Taken::Seen(T0 / NANOS_PER_SEC / 60 * 60)),
            ]
        );
    }

    #[test]
    fn an_expiry_refuses_from_its_instant_on() {
        let mut rec = records(None, None);
        let at = T0 + 5 * NANOS_PER_SEC + 123_456_789;
        let stamp = jiff::Timestamp::from_nanosecond(i128::from(at)).unwrap();
        rec.keys[0]
            .tags
            .insert(tollgate_core::model::EXPIRES_TAG.into(), stamp.to_string());
        let s = snap(config(None, None), &rec);
        let put = "/prod/registrations/42/warranty";
        assert!(
            call(&s, "PUT", put, Some(KEY), at - 1).is_ok(),
            "a nanosecond before"
        );
        let expired = Err(Refusal::Forbidden(KeyRejected::Expired));
        assert_eq!(
            call(&s, "PUT", put, Some(KEY), at),
            expired,
            "at the instant"
        );
        assert_eq!(
            call(&s, "PUT", put, Some(KEY), at + 1),
            expired,
            "a nanosecond after"
        );
        // A disabled key says so first; a key without an expiry never expires.
        rec.keys[0].enabled = false;
        let s = snap(config(None, None), &rec);
        assert_eq!(
            call(&s, "PUT", put, Some(KEY), at),
            Err(Refusal::Forbidden(KeyRejected::Disabled))
        );
        let s = snap(config(None, None), &records(None, None));
        assert!(call(&s, "PUT", put, Some(KEY), u64::MAX).is_ok());
    }
}
