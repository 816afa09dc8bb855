//! What admission answers: why a request was refused ([`Refusal`]), and the key's limits a response
//! advertises in the RateLimit headers ([`LimitInfo`]). Both ways of deciding a key's limits (this
//! instance's atomics and the shared Redis script) build them here, and [`crate::response`] writes
//! them.

use tollgate_core::clock::NANOS_PER_SEC;
use tollgate_core::credits::Refill;
use tollgate_core::gcra::Gcra;
use tollgate_core::quota::{EpochDay, QuotaWindow};

/// The limits a response can advertise (IETF RateLimit headers) or a refusal explains.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitInfo {
    /// The key's throttle: capacity, tokens left, seconds until full.
    pub throttle: Option<BucketInfo>,
    /// The key's quota: limit, left, seconds until the period resets, period length in seconds.
    pub quota: Option<QuotaInfo>,
    /// The key's credits: the balance, and its refill.
    pub credits: Option<CreditInfo>,
}

/// A key's credits for headers (kept small: it rides in every refusal).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CreditInfo {
    /// Credits left.
    pub remaining: u64,
    /// What a refill brings the balance back up to (0: no refill).
    pub refill: u64,
    /// With a refill: seconds until the next one.
    pub reset_secs: u32,
    /// With a refill: the refill period's length in days.
    pub window_days: u32,
}

impl CreditInfo {
    /// With a refill, whole seconds until it (at least 1): when a refused request may succeed.
    pub fn retry_after_secs(&self) -> Option<u64> {
        (self.refill > 0).then(|| u64::from(self.reset_secs.max(1)))
    }

    /// `remaining` credits at `now`, with `refill`.
    pub fn new(remaining: u64, refill: Option<&Refill>, now: u64) -> Self {
        let Some(r) = refill else {
            return Self {
                remaining,
                refill: 0,
                reset_secs: 0,
                window_days: 0,
            };
        };
        let window = r.window(EpochDay::from_nanos(now));
        let reset = ceil_secs(window.end.start_nanos().saturating_sub(now));
        Self {
            remaining,
            refill: r.amount,
            reset_secs: u32::try_from(reset).unwrap_or(u32::MAX),
            window_days: window.end.0 - window.start.0,
        }
    }
}

/// A throttle's state for headers. Its fields are 32 bits (a bucket holds at most `u32::MAX`, and
/// the seconds saturate): the limits ride in every admission, so they stay small.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BucketInfo {
    /// Bucket capacity.
    pub burst: u32,
    /// Tokens left.
    pub remaining: u32,
    /// Seconds until the bucket is full again.
    pub reset_secs: u32,
    /// Seconds an empty bucket takes to fill.
    pub window_secs: u32,
}

impl BucketInfo {
    /// `gcra`'s bucket with `remaining` tokens, full again in `until_full` nanoseconds.
    pub fn new(gcra: &Gcra, remaining: u64, until_full: u64) -> Self {
        Self {
            burst: sat32(gcra.burst()),
            remaining: sat32(remaining),
            reset_secs: sat32(ceil_secs(until_full)),
            window_secs: sat32(ceil_secs(gcra.interval().saturating_mul(gcra.burst())).max(1)),
        }
    }
}

/// A quota's state for headers (32 bits, as AWS's quota limit is).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QuotaInfo {
    /// Requests per period.
    pub limit: u32,
    /// Requests left in this period.
    pub remaining: u32,
    /// Seconds until the period ends.
    pub reset_secs: u32,
    /// Length of the current period in seconds.
    pub window_secs: u32,
}

impl QuotaInfo {
    /// A quota of `limit` in the period `window`, with `remaining` requests left at `now`.
    pub fn new(limit: u32, window: QuotaWindow, remaining: u64, now: u64) -> Self {
        Self {
            limit,
            remaining: sat32(remaining),
            reset_secs: sat32(ceil_secs(window.end.start_nanos().saturating_sub(now))),
            window_secs: (window.end.0 - window.start.0) * 86_400,
        }
    }
}

/// `n`, or `u32::MAX` when it does not fit.
fn sat32(n: u64) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Why a request was not admitted. Each maps to AWS's status and body in one place
/// ([`crate::response`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No route for this path and method: 403 `Missing Authentication Token`.
    MissingAuthenticationToken,
    /// Key missing, unknown, disabled or not in a plan for this stage: 403 `Forbidden`.
    Forbidden(KeyRejected),
    /// A JWT caller's token is missing, invalid or expired: 401 `Unauthorized`, as AWS's
    /// authorizers answer.
    Unauthorized,
    /// A throttle refused: 429 `Too Many Requests`.
    TooManyRequests {
        /// Whole seconds until a retry can succeed (at least 1).
        retry_after_secs: u64,
        /// The key's limits, for headers.
        limits: LimitInfo,
    },
    /// The shared store is unavailable and `onStoreFailure: deny`: 503.
    ServiceUnavailable,
    /// The key's quota for this period is spent: 429 `Limit Exceeded`.
    LimitExceeded {
        /// Whole seconds until the period resets (at least 1).
        retry_after_secs: u64,
        /// The key's limits, for headers.
        limits: LimitInfo,
    },
    /// The key's credits are fewer than the request's cost: 429 `Limit Exceeded`, as AWS says of
    /// a spent allowance.
    CreditsExhausted {
        /// The key's limits, for headers (with a refill, the time until it is the retry time).
        limits: LimitInfo,
    },
}

/// Why a key was not accepted (the client sees the same 403 for each; metrics tell them apart).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyRejected {
    /// No `x-api-key`.
    Missing,
    /// No such key, or not in a plan that covers the stage.
    Invalid,
    /// The key is disabled.
    Disabled,
    /// The key's expiry has passed.
    Expired,
    /// The key may not be used from where the request came (its source-IP allowlist).
    SourceIp,
}

impl Refusal {
    /// A throttle refused; a token frees up in `wait` nanoseconds.
    pub fn throttled(wait: u64, limits: LimitInfo) -> Self {
        Self::TooManyRequests {
            retry_after_secs: ceil_secs(wait).max(1),
            limits,
        }
    }

    /// The key's limits a refusal by them carries.
    pub fn limits(&self) -> Option<LimitInfo> {
        match self {
            Self::TooManyRequests { limits, .. }
            | Self::LimitExceeded { limits, .. }
            | Self::CreditsExhausted { limits } => Some(*limits),
            _ => None,
        }
    }

    /// The credits in `limits` are fewer than the cost (until a refill, if any).
    pub fn credits_exhausted(limits: LimitInfo) -> Self {
        Self::CreditsExhausted { limits }
    }

    /// The quota in `limits` is spent until its period resets.
    pub fn quota_spent(limits: LimitInfo) -> Self {
        Self::LimitExceeded {
            retry_after_secs: limits.quota.map_or(1, |q| u64::from(q.reset_secs.max(1))),
            limits,
        }
    }
}

/// Whole seconds, rounded up, in `nanos` nanoseconds.
pub(crate) fn ceil_secs(nanos: u64) -> u64 {
    nanos.div_ceil(NANOS_PER_SEC)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The limits ride in every admission and refusal: they stay as small as before credits.
    #[test]
    fn limits_stay_small() {
        assert_eq!(std::mem::size_of::<LimitInfo>(), 72);
        assert!(std::mem::size_of::<Refusal>() <= 88);
    }
}
