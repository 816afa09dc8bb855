//! What the accept loop, every connection, the metering flusher and the control plane's handle share
//! of one running gateway.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tollgate_core::Clock;
use tollgate_store::limiter::RedisLimiter;
use tollgate_store::{CustomerDelta, Store, UsageDelta};

use crate::access_log::Sink;
use crate::config::Http2Settings;
use crate::http1::{BodyLength, ResponseHead};
use crate::metrics::Metrics;
use crate::proxy::UpstreamPool;
use crate::rewrite::KeptFields;
use crate::snapshot::Snapshot;

/// One gateway's state, behind an `Arc`.
pub(crate) struct Shared {
    pub(crate) snapshot: ArcSwap<Snapshot>,
    /// Cluster mode: keys' limits are decided in Redis.
    pub(crate) limiter: Option<RedisLimiter>,
    pub(crate) metrics: Metrics,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) upstreams: UpstreamPool,
    pub(crate) head_timeout: Duration,
    /// HTTP/2 to clients, when on.
    pub(crate) http2: Option<Http2Settings>,
    /// `maxConnections`: a client connection holds one slot while open, and so does each HTTP/2
    /// stream while it runs (it may hold an upstream connection of its own), so that the
    /// descriptors they take stay within the budget.
    pub(crate) slots: Arc<tokio::sync::Semaphore>,
    /// How many [`Shared::slots`] there are.
    pub(crate) max_slots: usize,
    /// The config's `keepClientHeaders` (the config does not change while serving).
    pub(crate) kept_fields: KeptFields,
    /// Set when the gateway drains: connections finish the request in hand, then close.
    pub(crate) draining: AtomicBool,
    /// Wakes idle connections when draining starts.
    pub(crate) stop: Arc<tokio::sync::Notify>,
    pub(crate) store: Arc<dyn Store>,
    /// Where access-log lines go, when the access log is on.
    pub(crate) access_log: Option<Sink>,
    /// Deltas a failed store write could not save, retried on the next flush. Held across the
    /// blocking write, never on the request path.
    pub(crate) unflushed: tokio::sync::Mutex<(Vec<UsageDelta>, Vec<CustomerDelta>)>,
}

impl Shared {
    /// Whether a client connection may carry another request after relaying a response with
    /// `head`: not if the response ends when the upstream closes, nor once the gateway drains (a
    /// drain that began while the upstream worked still gets its `Connection: close`).
    pub(crate) fn keeps_alive(&self, head: &ResponseHead) -> bool {
        head.body != BodyLength::UntilClose && !self.draining.load(Ordering::Relaxed)
    }
}
