//! A key's own limits on a route, as admission asks for them ([`KeyLimits`]), and their
//! implementation on this instance's atomics ([`Local`]): the embedded mode, and cluster mode's
//! `onStoreFailure: local`. The Redis one is [`crate::shared_limits`].

use std::future::Future;

use tollgate_core::credits::CreditDecision;
use tollgate_core::gcra::ThrottleDecision;
use tollgate_core::quota::{EpochDay, QuotaDecision};

use crate::limits::{BucketInfo, CreditInfo, LimitInfo, QuotaInfo, Refusal};
use crate::meter::Counted;
use crate::route::RouteMatch;
use crate::snapshot::{KeyBucket, Membership, Snapshot};

/// A key's own limits on a route: its bucket, then its quota, and the meter.
pub(crate) trait KeyLimits {
    /// Decides `membership`'s bucket and quota for a request on the route `m` matched at `now`, and
    /// meters it when admitted.
    fn decide(
        &self,
        membership: &Membership<'_>,
        m: &RouteMatch,
        now: u64,
    ) -> impl Future<Output = Result<LimitInfo, Refusal>>;
}

/// A key's limits on this instance's atomics.
pub(crate) struct Local<'s>(pub(crate) &'s Snapshot);

impl KeyLimits for Local<'_> {
    fn decide(
        &self,
        membership: &Membership<'_>,
        m: &RouteMatch,
        now: u64,
    ) -> impl Future<Output = Result<LimitInfo, Refusal>> {
        std::future::ready(self.decide_now(membership, m, now))
    }
}

impl Local<'_> {
    /// [`KeyLimits::decide`], which never waits here.
    pub(crate) fn decide_now(
        &self,
        membership: &Membership<'_>,
        m: &RouteMatch,
        now: u64,
    ) -> Result<LimitInfo, Refusal> {
        let mut limits = LimitInfo::default();
        let cost = self.0.route_at(m).cost;
        if let Some(KeyBucket { gcra, state, .. }) = membership.throttle_for(m) {
            match gcra.check(state, now) {
                ThrottleDecision::Allowed { remaining } => {
                    limits.throttle = Some(BucketInfo::new(
                        gcra,
                        u64::from(remaining),
                        gcra.until_full(state, now),
                    ));
                }
                ThrottleDecision::Refused { retry_after } => {
                    limits.throttle = Some(BucketInfo::new(gcra, 0, gcra.until_full(state, now)));
                    limits.quota = quota_left(membership, now);
                    return Err(Refusal::throttled(retry_after, limits));
                }
            }
        }
        if let Some(quota) = membership.quota() {
            let window = quota.window(EpochDay::from_nanos(now));
            let limit = quota.settings().limit;
            match quota.try_consume(membership.quota_count(), cost, now) {
                QuotaDecision::Allowed { remaining, .. } => {
                    limits.quota = Some(QuotaInfo::new(limit, window, remaining, now));
                }
                QuotaDecision::Refused { .. } => {
                    // The bucket's token stays taken: hammering a spent quota is not free.
                    limits.quota = Some(QuotaInfo::new(limit, window, 0, now));
                    return Err(Refusal::quota_spent(limits));
                }
            }
        }
        // Credits, after the quota: a request they refuse gives its quota back.
        if let Some(account) = membership.credits() {
            // A plan in shadow spends credits of its own, and tells the ledger nothing.
            let shadow = membership.shadow();
            let credits = account.live.spent_by(shadow);
            if let Some(refill) = &account.refill {
                if shadow {
                    credits.refill(refill, now);
                } else {
                    account.live.refill(refill, now);
                }
            }
            let (left, spent) = match credits.try_spend(cost) {
                CreditDecision::Spent { left } => (left, true),
                CreditDecision::Exhausted { left } => (left, false),
            };
            limits.credits = Some(CreditInfo::new(left, account.refill.as_ref(), now));
            if !spent {
                if let Some(quota) = membership.quota() {
                    quota.give_back(membership.quota_count(), cost, now);
                    if let Some(q) = &mut limits.quota {
                        q.remaining = q.remaining.saturating_add(cost);
                    }
                }
                return Err(Refusal::credits_exhausted(limits));
            }
            if !shadow {
                account.live.spent(cost, now);
            }
        }
        self.0.count(membership, Counted::Admitted, cost, now);
        Ok(limits)
    }
}

/// The quota part of a refusal's headers: what the key has left, read from this instance.
pub(crate) fn quota_left(membership: &Membership<'_>, now: u64) -> Option<QuotaInfo> {
    let quota = membership.quota()?;
    let window = quota.window(EpochDay::from_nanos(now));
    let left = quota.remaining(membership.quota_count(), now);
    Some(QuotaInfo::new(quota.settings().limit, window, left, now))
}
