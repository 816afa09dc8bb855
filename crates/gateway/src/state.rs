//! What the accept loop, every connection, the metering flusher and the control plane's handle share
//! of one running gateway.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tollgate_core::Clock;
use tollgate_core::credits::refill_entry;
use tollgate_core::quota::EpochDay;
use tollgate_store::limiter::RedisLimiter;
use tollgate_store::{CreditSpend, CustomerDelta, Store, StoreError, UsageDelta};

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
    /// The configured alerts, and where the request path hands their crossings.
    pub(crate) alerts: crate::alerts::Alerts,
    /// `durability: request`: admitted requests wait for the write that stores their count.
    pub(crate) durable: Option<GroupCommit>,
    /// Where access-log lines go, when the access log is on.
    pub(crate) access_log: Option<Sink>,
    /// Deltas a failed store write could not save, retried on the next flush. Held across the
    /// blocking write, never on the request path.
    pub(crate) unflushed: tokio::sync::Mutex<Unflushed>,
}

impl Shared {
    /// Whether a client connection may carry another request after relaying a response with
    /// `head`: not if the response ends when the upstream closes, nor once the gateway drains (a
    /// drain that began while the upstream worked still gets its `Connection: close`).
    pub(crate) fn keeps_alive(&self, head: &ResponseHead) -> bool {
        head.body != BodyLength::UntilClose && !self.draining.load(Ordering::Relaxed)
    }
}

/// Metering taken from the snapshots and not yet in the store, in the order it is written.
#[derive(Debug, Default)]
pub(crate) struct Unflushed {
    pub(crate) keys: Vec<UsageDelta>,
    pub(crate) customers: Vec<CustomerDelta>,
    pub(crate) spent: Vec<CreditSpend>,
    /// (key id, the refill period's first day, what it added): ledger entries, written once each.
    pub(crate) refills: Vec<(String, EpochDay, u64)>,
}

impl Unflushed {
    pub(crate) fn is_empty(&self) -> bool {
        self.keys.is_empty()
            && self.customers.is_empty()
            && self.spent.is_empty()
            && self.refills.is_empty()
    }

    /// How many records are waiting.
    pub(crate) fn len(&self) -> usize {
        self.keys.len() + self.customers.len() + self.spent.len() + self.refills.len()
    }

    /// Writes everything to `store` in turn, `now` (epoch seconds) the refills' time; what was
    /// written is let go at once, so a failure part-way leaves only the rest for the retry (the
    /// writes that add to counts must not be repeated).
    pub(crate) fn write(&mut self, store: &dyn Store, now: i64) -> Result<(), StoreError> {
        if self.is_empty() {
            return Ok(());
        }
        store.add_usage(&self.keys)?;
        self.keys.clear();
        store.add_customer_usage(&self.customers)?;
        self.customers.clear();
        store.spend_credits(&self.spent)?;
        self.spent.clear();
        while let Some((key_id, day, added)) = self.refills.last() {
            store.add_credits(key_id, &refill_entry(*day), *added, now)?;
            self.refills.pop();
        }
        Ok(())
    }
}

/// Group commit for `durability: request`: a request whose count is metered asks for a flush and
/// waits for one that started after its count was, so every request waiting then shares one write.
#[derive(Debug)]
pub(crate) struct GroupCommit {
    /// Flushes started.
    started: std::sync::atomic::AtomicU64,
    /// The last flush finished, and whether it stored everything.
    finished: tokio::sync::watch::Sender<(u64, bool)>,
    /// Wakes the flusher.
    pub(crate) asked: tokio::sync::Notify,
}

impl Default for GroupCommit {
    fn default() -> Self {
        Self {
            started: Default::default(),
            finished: tokio::sync::watch::Sender::new((0, true)),
            asked: Default::default(),
        }
    }
}

impl GroupCommit {
    /// A flush starts: it takes every count metered before this; its number.
    pub(crate) fn start(&self) -> u64 {
        let generation = self.started.fetch_add(1, Ordering::SeqCst) + 1;
        // Pairs with the fence in `stored`: a request that read the number before this one had
        // metered its count before the flush takes the meters.
        std::sync::atomic::fence(Ordering::SeqCst);
        generation
    }

    /// Flush `generation` finished (`stored`: everything it took is in the store).
    pub(crate) fn done(&self, generation: u64, stored: bool) {
        self.finished.send_replace((generation, stored));
    }

    /// Waits until what was metered before this call is stored: `false` when the write failed
    /// (the counts are kept and written later, but not before the answer).
    pub(crate) async fn stored(&self) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        let needed = self.started.load(Ordering::SeqCst) + 1;
        let mut finished = self.finished.subscribe();
        self.asked.notify_one();
        loop {
            let (generation, stored) = *finished.borrow_and_update();
            if generation >= needed {
                return stored;
            }
            if finished.changed().await.is_err() {
                return false;
            }
        }
    }
}
