//! Failed credentials back off: a dashboard login with a wrong secret and a request whose SigV4
//! signature does not check out each take a token from their client address's bucket and from one
//! shared by all addresses (GCRA, `tollgate_core`'s throttle); with either empty, the next try is
//! refused before any secret is compared (429 TooManyRequestsException, `Retry-After`). A success
//! gives its token back, so an operator who signs correctly never runs out. One connection tried
//! thousands of secrets a second before; now an address gets ten, then one every six seconds, and
//! all addresses together ten a second.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;

use tollgate_core::{Gcra, GcraState, ThrottleDecision, ThrottleSettings};

/// One address: ten failures, then one every six seconds.
const PER_ADDRESS: ThrottleSettings = ThrottleSettings {
    rate_limit: 1.0 / 6.0,
    burst_limit: 10,
};
/// All addresses together: a hundred failures, then ten a second.
const OVERALL: ThrottleSettings = ThrottleSettings {
    rate_limit: 10.0,
    burst_limit: 100,
};
/// Addresses remembered at most; past it, those whose bucket has refilled are forgotten.
const MAX_ADDRESSES: usize = 10_000;

/// The client address of an admin request, put in its extensions by the listener.
#[derive(Debug, Clone, Copy)]
pub struct ClientAddr(pub IpAddr);

/// The buckets of failed credentials.
pub(crate) struct FailedCredentials {
    per_address: Gcra,
    overall: Gcra,
    all: GcraState,
    addresses: Mutex<HashMap<IpAddr, GcraState>>,
}

/// A try the budget allowed: its tokens, given back by [`FailedCredentials::succeeded`].
#[must_use]
pub(crate) struct Attempt(Option<IpAddr>);

impl FailedCredentials {
    pub(crate) fn new() -> Self {
        Self {
            per_address: Gcra::new(PER_ADDRESS),
            overall: Gcra::new(OVERALL),
            all: GcraState::default(),
            addresses: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a try's tokens from `addr`'s bucket and the shared one at `now` (nanoseconds); `Err`
    /// with the seconds to wait when either is empty (nothing taken then).
    pub(crate) fn attempt(&self, addr: Option<IpAddr>, now: u64) -> Result<Attempt, u64> {
        let secs = |nanos: u64| nanos.div_ceil(tollgate_core::clock::NANOS_PER_SEC).max(1);
        if let ThrottleDecision::Refused { retry_after } = self.overall.check(&self.all, now) {
            return Err(secs(retry_after));
        }
        let Some(ip) = addr else {
            return Ok(Attempt(None));
        };
        let mut addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
        if addresses.len() >= MAX_ADDRESSES && !addresses.contains_key(&ip) {
            let full = self.per_address.burst();
            addresses.retain(|_, s| self.per_address.available(s, now) < full);
        }
        let state = addresses.entry(ip).or_default();
        match self.per_address.check(state, now) {
            ThrottleDecision::Allowed { .. } => Ok(Attempt(Some(ip))),
            ThrottleDecision::Refused { retry_after } => {
                self.overall.refund(&self.all);
                Err(secs(retry_after))
            }
        }
    }

    /// The try's credentials were good: its tokens go back.
    pub(crate) fn succeeded(&self, attempt: Attempt) {
        self.overall.refund(&self.all);
        if let Some(ip) = attempt.0 {
            let addresses = self.addresses.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(state) = addresses.get(&ip) {
                self.per_address.refund(state);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use tollgate_core::clock::NANOS_PER_SEC;

    use super::*;

    #[test]
    fn failures_back_off_per_address_and_overall_and_successes_cost_nothing() {
        let f = FailedCredentials::new();
        let a = Some(IpAddr::from([10, 0, 0, 1]));
        let now = 1_000 * NANOS_PER_SEC;
        for _ in 0..10 {
            let _failed = f.attempt(a, now).unwrap();
        }
        assert_eq!(f.attempt(a, now).err(), Some(6));
        let later = now + 6 * NANOS_PER_SEC;
        let _failed = f.attempt(a, later).expect("one more six seconds on");
        // Successes give their tokens back: an operator signing correctly never runs out.
        let b = Some(IpAddr::from([10, 0, 0, 2]));
        for _ in 0..1000 {
            f.succeeded(f.attempt(b, later).unwrap());
        }
        // Many addresses: the shared bucket (100, one still taken) runs out, for everyone.
        let mut refused = None;
        for i in 0..200u32 {
            if let Err(wait) = f.attempt(Some(IpAddr::from(i.to_be_bytes())), later) {
                refused = Some((i, wait));
                break;
            }
        }
        assert_eq!(refused, Some((99, 1)));
        assert!(f.attempt(b, later).is_err());
        assert!(f.attempt(b, later + NANOS_PER_SEC).is_ok());
    }
}
