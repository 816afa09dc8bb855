//! What the control plane needs of the data plane, and nothing more: the binary wires the running
//! gateway in (dependency inversion: this crate does not know the gateway's types).

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use tollgate_store::report::PeriodUsed;
use tollgate_store::{KeyIndex, Memberships, OnStoreFailure};

/// A boxed future, for a trait the admin API holds as an object.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// The data plane, as the control plane drives it.
pub trait DataPlane: Send + Sync {
    /// The keys and memberships served now.
    fn served(&self) -> Arc<dyn Memberships>;

    /// Serves `records` from the next request on, keeping live limiter state; memberships in
    /// `period_used` (per (plan id, key id)) restart their quota count from it.
    fn reload(&self, records: &KeyIndex, period_used: &PeriodUsed);

    /// Serves the keys whose ids are in `touched` as `changed` holds them (with their bindings; a
    /// touched key it lacks is gone), keeping every other key as it is; `false`, changing nothing,
    /// when it needs a [`DataPlane::reload`] instead.
    fn change_keys(&self, changed: &KeyIndex, touched: &[String], period_used: &PeriodUsed)
    -> bool;

    /// Writes all metering counted so far to the store, so that reads of usage are exact.
    fn flush(&self) -> BoxFuture<'_, Result<(), String>>;

    /// AWS UpdateUsage: sets what key `key_id` has left of plan `plan_id`'s quota in the current
    /// period. Returns by how much the period's count changed, or `None` when the membership is not
    /// served.
    fn set_remaining<'a>(
        &'a self,
        plan_id: &'a str,
        key_id: &'a str,
        remaining: i64,
    ) -> BoxFuture<'a, Result<Option<i64>, String>>;

    /// Key `key_id`'s credit balance on this instance, if it holds credits here (in cluster mode
    /// Redis holds the exact one).
    fn credit_balance(&self, key_id: &str) -> Option<u64>;

    /// Adds `n` credits to key `key_id` on this instance; `false` when it holds none here yet (a
    /// reload with its stored balance gives it them).
    fn add_credits(&self, key_id: &str, n: u64) -> bool;

    /// The data plane's clock, nanoseconds since the epoch.
    fn now(&self) -> u64;

    /// In cluster mode, whether the shared store is unavailable now and what keyed requests get
    /// meanwhile; `None` on the embedded store.
    fn shared_store(&self) -> Option<(bool, OnStoreFailure)>;

    /// The data plane's metrics, OpenMetrics text.
    fn metrics_text(&self) -> String;

    /// Requests refused 403 for their key (none, unknown, disabled, expired) since it started.
    fn forbidden(&self) -> u64;

    /// The `q`-quantile of request durations since it started, as Prometheus estimates it from the
    /// histogram: seconds, and whether it is only known to be under that (the first bucket).
    fn latency(&self, q: f64) -> Option<(f64, bool)>;
}
