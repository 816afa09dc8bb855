//! Cluster mode's [`KeyLimits`]: a key's bucket, quota and usage decided by the store's shared
//! limiter ([`tollgate_store::limiter`]), so every instance enforces the same exact limits; while
//! Redis cannot answer, `onStoreFailure` decides.

use std::future::Future;

use tollgate_core::clock::NANOS_PER_SEC;
use tollgate_store::OnStoreFailure;
use tollgate_store::limiter::{CreditCall, KeyCall, RedisLimiter, Verdict};

use crate::limits::{BucketInfo, CreditInfo, LimitInfo, QuotaInfo, Refusal};
use crate::local_limits::{KeyLimits, Local};
use crate::meter::Counted;
use crate::metrics::Metrics;
use crate::route::RouteMatch;
use crate::snapshot::{Membership, Snapshot};

/// A key's limits in Redis, for requests served from `snap`.
pub(crate) struct SharedLimits<'s> {
    pub(crate) snap: &'s Snapshot,
    pub(crate) limiter: &'s RedisLimiter,
    pub(crate) metrics: &'s Metrics,
}

impl KeyLimits for SharedLimits<'_> {
    fn decide(
        &self,
        membership: &Membership<'_>,
        m: &RouteMatch,
        now: u64,
    ) -> impl Future<Output = Result<LimitInfo, Refusal>> {
        self.decide_shared(membership, m, now)
    }
}

impl SharedLimits<'_> {
    async fn decide_shared(
        &self,
        membership: &Membership<'_>,
        m: &RouteMatch,
        now: u64,
    ) -> Result<LimitInfo, Refusal> {
        let route = self.snap.route_at(m);
        let bucket = membership.throttle_for(m);
        let gcra = bucket.as_ref().map(|b| b.gcra);
        // A per-method bucket is named after its route; the plan's bucket has no name.
        let method = match bucket {
            Some(b) if b.per_method => {
                let api = &self.snap.config().apis[m.api];
                format!(
                    "{}:{}:{}",
                    api.id,
                    api.stages[m.stage].name,
                    route.throttle_key()
                )
            }
            _ => String::new(),
        };
        let quota = membership.quota().map(|q| q.settings());
        let account = membership.credits();
        let call = KeyCall {
            holder: membership.holder(),
            plan_id: membership.counts_as(),
            method: &method,
            throttle: gcra,
            quota,
            cost: route.cost,
            credits: account.map(|a| CreditCall {
                key_id: membership.key_id,
                refill: a.refill.as_ref(),
                shadow: membership.shadow(),
            }),
        };
        let started = std::time::Instant::now();
        let decided = self.limiter.decide(&call, now).await;
        self.metrics
            .store_called(started.elapsed().as_secs_f64(), decided.is_ok());
        let Ok(decided) = decided else {
            return match self.limiter.on_failure {
                OnStoreFailure::Local => Local(self.snap).decide_now(membership, m, now),
                OnStoreFailure::Allow => {
                    // Fail open, as AWS does, but keep metering: the usage is written back later.
                    self.snap
                        .count(membership, Counted::Admitted, route.cost, now);
                    Ok(LimitInfo::default())
                }
                OnStoreFailure::Deny => Err(Refusal::ServiceUnavailable),
            };
        };
        let micros = |us: u64| us.saturating_mul(NANOS_PER_SEC / 1_000_000);
        let bucket =
            |tokens, until_full_us| gcra.map(|g| BucketInfo::new(g, tokens, micros(until_full_us)));
        let quota_info = |left| {
            decided
                .window
                .zip(quota)
                .map(|(w, q)| QuotaInfo::new(q.limit, w, left, now))
        };
        let credit_info = |left| {
            account.map(|a| {
                // This instance's balance follows, for when it must decide alone.
                a.live.spent_by(membership.shadow()).set(left);
                CreditInfo::new(left, a.refill.as_ref(), now)
            })
        };
        match decided.verdict {
            Verdict::Admitted {
                tokens,
                quota_left,
                until_full_us,
                credits_left,
            } => {
                if membership.customer().is_some() {
                    // The script counted the customer's usage; the key's own is metered here.
                    self.snap
                        .count_key(membership, Counted::Admitted, route.cost, now);
                }
                Ok(LimitInfo {
                    throttle: bucket(tokens, until_full_us),
                    quota: quota_info(quota_left),
                    credits: credits_left.and_then(credit_info),
                })
            }
            Verdict::Throttled { wait_us } => Err(Refusal::throttled(
                micros(wait_us),
                LimitInfo {
                    throttle: bucket(0, wait_us),
                    ..LimitInfo::default()
                },
            )),
            Verdict::QuotaSpent {
                tokens,
                until_full_us,
            } => Err(Refusal::quota_spent(LimitInfo {
                throttle: bucket(tokens, until_full_us),
                quota: quota_info(0),
                credits: None,
            })),
            Verdict::CreditsExhausted {
                tokens,
                until_full_us,
                quota_left,
                credits_left,
            } => Err(Refusal::credits_exhausted(LimitInfo {
                throttle: bucket(tokens, until_full_us),
                quota: quota_info(quota_left),
                credits: credit_info(credits_left),
            })),
        }
    }
}
