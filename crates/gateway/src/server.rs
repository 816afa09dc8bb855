//! The running gateway: accept loop, per-request handling, metering flusher, graceful shutdown.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_rustls::TlsAcceptor;
use tollgate_core::Clock;
use tollgate_core::clock::NANOS_PER_SEC;
use tollgate_core::quota::EpochDay;
use tollgate_store::OnStoreFailure;
use tollgate_store::limiter::{LimiterError, RedisLimiter};
use tollgate_store::report::{PeriodUsed, period_used};
use tollgate_store::{CreditSpend, CustomerDelta, Holder, KeyIndex, Store, StoreError, UsageDelta};

use crate::access_log::Sink;
use crate::alerts::Alerts;
use crate::config::{GatewayConfig, Http2Settings};
use crate::conn;
use crate::exchange::Endpoint;
use crate::h2::{self, Rewind};
use crate::meter::Counted;
use crate::metrics::Metrics;
use crate::proxy::UpstreamPool;
use crate::snapshot::{Snapshot, SnapshotError, Taken};
use crate::state::{GroupCommit, Shared, Unflushed};
use crate::tls::TlsInfo;

/// How long a client may take to send a request head by default, idle keep-alive time included
/// (nginx's `client_header_timeout` is 60 s, hyper's 30 s).
pub const DEFAULT_HEAD_TIMEOUT: Duration = Duration::from_secs(30);

/// Runtime knobs that are not part of the routing config.
#[derive(Debug, Clone, Copy)]
pub struct GatewayOptions {
    /// How often metered usage is written to the store.
    pub flush_interval: Duration,
    /// `durability: request`: an admitted request's count is stored before its response is sent
    /// (group commit: one write for every request waiting).
    pub durable_requests: bool,
    /// How long shutdown waits for in-flight requests.
    pub drain_timeout: Duration,
    /// How long a client may take to send a request head (idle keep-alive time included), and to
    /// send the next bytes of a request body.
    pub head_timeout: Duration,
    /// The most client connections served at once; more are closed as soon as accepted.
    pub max_connections: usize,
    /// The most idle upstream connections kept for reuse, over all upstreams.
    pub max_idle_upstream: usize,
    /// HTTP/2 to clients (ALPN `h2` on TLS, prior knowledge on plain), when on.
    pub http2: Option<Http2Settings>,
}

/// How the process's file descriptors are shared out: the admin API and a reserve first, then each
/// client connection with the upstream connection it may hold, then idle upstream connections (up to
/// a quarter as many as client connections). So no listener can take the descriptors another needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DescriptorBudget {
    /// Client connections the data plane serves at once.
    pub max_connections: usize,
    /// Idle upstream connections kept for reuse.
    pub max_idle_upstream: usize,
}

/// Descriptors kept for the listeners, the store, the logs and Redis connections.
const RESERVED_DESCRIPTORS: u64 = 64;

impl DescriptorBudget {
    /// Shares `limit` descriptors with `admin` admin connections. `wanted` (the configured
    /// `maxConnections`) must fit; without it the data plane takes what is left.
    pub fn plan(limit: u64, admin: usize, wanted: Option<usize>) -> Result<Self, String> {
        let available = limit.saturating_sub(RESERVED_DESCRIPTORS + admin as u64);
        let needs = |n: u64| n.saturating_mul(2).saturating_add(n / 4);
        let max = match wanted {
            Some(n) if needs(n as u64) > available => {
                return Err(format!(
                    "maxConnections {n} needs {} file descriptors (2 per connection, for it and its \
                     upstream, and idle upstream connections), with {} for the admin API and the \
                     store, but the limit is {limit}: raise the limit (ulimit -n, systemd \
                     LimitNOFILE) or lower maxConnections",
                    needs(n as u64),
                    RESERVED_DESCRIPTORS + admin as u64,
                ));
            }
            Some(n) => n,
            None => usize::try_from(available * 4 / 9).unwrap_or(usize::MAX),
        };
        if max == 0 {
            return Err(format!(
                "the file descriptor limit {limit} leaves none for client connections"
            ));
        }
        Ok(Self {
            max_connections: max,
            max_idle_upstream: (max / 4).max(1),
        })
    }
}

impl Default for GatewayOptions {
    fn default() -> Self {
        Self {
            flush_interval: Duration::from_secs(1),
            durable_requests: false,
            drain_timeout: Duration::from_secs(30),
            head_timeout: DEFAULT_HEAD_TIMEOUT,
            max_connections: 10_000,
            max_idle_upstream: 2_500,
            http2: Some(Http2Settings::default()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    /// A flush waits for the slot book, which a change of keys holds on the control plane's
    /// lower-priority threads; the async worker it runs on goes on serving meanwhile. Here the
    /// runtime has one worker, and the book is let go only once that worker has run something
    /// else: were the flush to wait on the worker, it would wait out the holder's 10 s instead.
    #[test]
    fn a_flush_waits_for_the_slot_book_off_the_async_workers() {
        let dir = tempfile::tempdir().unwrap();
        let store = tollgate_store::SqliteStore::open(&dir.path().join("t.db")).unwrap();
        let records = testing::records(None, None);
        store.put_records(&records).unwrap();
        let gateway = Gateway::open(
            testing::config(None, None),
            &KeyIndex::from(&records),
            Arc::new(store),
            Arc::new(tollgate_core::clock::SystemClock),
            GatewayOptions::default(),
            None,
        )
        .unwrap();
        let slots = gateway.shared.snapshot.load().slots().clone();
        let (held, is_held) = std::sync::mpsc::channel();
        let (release, on_release) = std::sync::mpsc::channel::<()>();
        let holder = std::thread::spawn(move || {
            let _book = crate::slots::lock(&slots.book);
            held.send(()).unwrap();
            on_release.recv_timeout(Duration::from_secs(10)).is_ok()
        });
        is_held.recv().unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(async move {
            let handle = gateway.handle();
            let flush = tokio::spawn(async move { handle.flush().await });
            // The flush runs first, up to where it waits for the book.
            tokio::task::yield_now().await;
            release.send(()).unwrap();
            flush.await.unwrap().unwrap();
        });
        assert!(holder.join().unwrap(), "the flush held up the async worker");
    }

    #[test]
    fn descriptors_are_shared_without_overlap() {
        let b = DescriptorBudget::plan(1024, 64, None).unwrap();
        assert_eq!(b.max_connections, 398);
        assert!(2 * b.max_connections + b.max_idle_upstream + 64 + 64 <= 1024);
        let b = DescriptorBudget::plan(1024, 64, Some(100)).unwrap();
        assert_eq!((b.max_connections, b.max_idle_upstream), (100, 25));
        let e = DescriptorBudget::plan(1024, 64, Some(1000)).unwrap_err();
        assert!(e.contains("maxConnections 1000 needs 2250"), "{e}");
        assert!(DescriptorBudget::plan(100, 64, None).is_err());
    }
}

/// Why the gateway could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The config and records do not form a valid snapshot.
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    /// A blocking store task panicked or was cancelled.
    #[error("store task failed: {0}")]
    Task(String),
    /// The shared limiter could not be asked.
    #[error(transparent)]
    Limiter(#[from] LimiterError),
    /// The access log's file could not be opened.
    #[error("accessLog.path {0}: {1}")]
    AccessLog(String, std::io::Error),
}

/// A gateway ready to serve.
pub struct Gateway {
    shared: Arc<Shared>,
    options: GatewayOptions,
    /// Alerts' crossings, claimed by a task that runs while the gateway serves.
    crossings: Option<tokio::sync::mpsc::Receiver<crate::alerts::Crossing>>,
}

/// What the control plane holds of a running gateway: the live snapshot, and the means to replace it
/// and to flush metering on demand.
#[derive(Clone)]
pub struct GatewayHandle {
    shared: Arc<Shared>,
}

impl GatewayHandle {
    /// The snapshot requests are served from right now.
    pub fn snapshot(&self) -> Arc<Snapshot> {
        self.shared.snapshot.load_full()
    }

    /// The gateway's clock.
    pub fn clock(&self) -> &dyn Clock {
        &*self.shared.clock
    }

    /// Serves `records` from the next request on, keeping live limiter state (see
    /// [`Snapshot::rebuild`], which serialises reloads with each other and with the flusher).
    pub fn reload(&self, records: &KeyIndex, period_used: &PeriodUsed) {
        Snapshot::rebuild(
            &self.shared.snapshot,
            records,
            period_used,
            self.shared.clock.now(),
        );
    }

    /// Serves the keys whose ids are in `touched` as `changed` holds them (a touched key it lacks is
    /// gone), building again only what they touch (see [`Snapshot::change_keys`]); `false` when the
    /// change needs a [`GatewayHandle::reload`] instead.
    pub fn change_keys(
        &self,
        changed: &KeyIndex,
        touched: &[String],
        period_used: &PeriodUsed,
    ) -> bool {
        Snapshot::change_keys(
            &self.shared.snapshot,
            changed,
            touched,
            period_used,
            self.shared.clock.now(),
        )
    }

    /// In cluster mode, whether Redis is unavailable now and what keyed requests get meanwhile;
    /// `None` on the embedded store.
    pub fn shared_store(&self) -> Option<(bool, OnStoreFailure)> {
        let limiter = self.shared.limiter.as_ref()?;
        Some((limiter.degraded(), limiter.on_failure))
    }

    /// AWS UpdateUsage: sets what key `key_id` has left of plan `plan_id`'s quota in the current
    /// period (its customer's, when the plan shares limits by customer), on this instance and, in
    /// cluster mode, in Redis. Returns by how much the period's count changed, or `None` when the
    /// membership is not served or the plan has no quota.
    pub async fn set_remaining(
        &self,
        plan_id: &str,
        key_id: &str,
        remaining: i64,
    ) -> Result<Option<i64>, GatewayError> {
        let snap = self.snapshot();
        let now = self.shared.clock.now();
        let Some(membership) = snap.membership_of(plan_id, key_id) else {
            return Ok(None);
        };
        // The local count always follows (cluster mode falls back to it when Redis is down).
        let local = membership.set_remaining(now, remaining);
        match (&self.shared.limiter, membership.quota()) {
            (Some(limiter), Some(quota)) => limiter
                .set_remaining(
                    membership.holder(),
                    plan_id,
                    quota.settings(),
                    remaining,
                    now,
                )
                .await
                .map(Some)
                .map_err(GatewayError::from),
            _ => Ok(local),
        }
    }

    /// Has the access log's file opened again (`SIGUSR1`, after logrotate moved it).
    pub fn reopen_access_log(&self) {
        if let Some(sink) = &self.shared.access_log {
            sink.reopen();
        }
    }

    /// The OpenMetrics text exposition of the data plane's counters.
    pub fn metrics_text(&self) -> String {
        let snap = self.snapshot();
        let degraded = self.shared.limiter.as_ref().map(RedisLimiter::degraded);
        self.shared.metrics.render(
            degraded,
            snap.key_count(),
            (snap.plan_count(), snap.plan_names()),
            self.shared.clock.now(),
        )
    }

    /// Requests refused 403 for their key (none, unknown, disabled, expired) since it started.
    pub fn forbidden(&self) -> u64 {
        self.shared.metrics.forbidden()
    }

    /// The `q`-quantile of request durations since it started (see [`Metrics::latency`]).
    pub fn latency(&self, q: f64) -> Option<(f64, bool)> {
        self.shared.metrics.latency(q)
    }

    /// Writes all metering counted so far to the store, so that reads of usage are exact.
    pub async fn flush(&self) -> Result<(), GatewayError> {
        flush_once(&self.shared).await
    }
}

impl Gateway {
    /// Builds the first snapshot from `records` (as just loaded from `store`). Blocking: reads the
    /// current quota periods' usage; call before serving.
    pub fn open(
        config: GatewayConfig,
        records: &KeyIndex,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        options: GatewayOptions,
        limiter: Option<RedisLimiter>,
    ) -> Result<Self, GatewayError> {
        let today = EpochDay::from_nanos(clock.now());
        let mut used = period_used(&*store, records, |_| true, today)?;
        used.credits = store
            .credit_balances()?
            .into_iter()
            .map(|b| (b.key_id.clone(), b))
            .collect();
        let kept_fields = config.kept_fields;
        let metrics = Metrics::new(&config, limiter.is_some());
        let access_log = match &config.access_log {
            Some(log) => Some(Sink::start(log.path.clone()).map_err(|e| {
                let path = log
                    .path
                    .as_deref()
                    .unwrap_or(std::path::Path::new("stderr"));
                GatewayError::AccessLog(path.display().to_string(), e)
            })?),
            None => None,
        };
        let (alerts, crossings) = Alerts::new(config.alerts.clone());
        let snapshot = Snapshot::build(config, records, &used, today)?;
        let max_slots = options
            .max_connections
            .min(tokio::sync::Semaphore::MAX_PERMITS);
        let shared = Arc::new(Shared {
            snapshot: ArcSwap::from_pointee(snapshot),
            limiter,
            metrics,
            clock,
            upstreams: UpstreamPool::new(options.max_idle_upstream),
            head_timeout: options.head_timeout,
            http2: options.http2,
            slots: Arc::new(tokio::sync::Semaphore::new(max_slots)),
            max_slots,
            kept_fields,
            draining: AtomicBool::new(false),
            stop: Arc::default(),
            store,
            alerts,
            durable: options.durable_requests.then(GroupCommit::default),
            access_log,
            unflushed: tokio::sync::Mutex::default(),
        });
        Ok(Self {
            shared,
            options,
            crossings,
        })
    }

    /// A handle for the control plane.
    pub fn handle(&self) -> GatewayHandle {
        GatewayHandle {
            shared: self.shared.clone(),
        }
    }

    /// Serves `listeners` until `shutdown` resolves, then stops accepting, lets in-flight requests
    /// finish (up to the drain timeout) and flushes metering one last time.
    pub async fn serve(
        self,
        listeners: Listeners,
        shutdown: impl Future<Output = ()>,
    ) -> Result<(), GatewayError> {
        let (stop_tx, stop_rx) = watch::channel(false);
        if let Some(crossings) = self.crossings {
            tokio::spawn(crate::alerts::claim_loop(self.shared.clone(), crossings));
        }
        let expiries = tokio::spawn(crate::alerts::expiry_loop(self.shared.clone()));
        let deliverer = tokio::spawn(crate::webhooks::deliver_loop(
            self.shared.clone(),
            WEBHOOK_POLL,
            stop_rx.clone(),
        ));
        let exporter = tokio::spawn(crate::exporters::export_loop(
            self.shared.clone(),
            2 * self.options.flush_interval,
            stop_rx.clone(),
        ));
        let flusher = tokio::spawn(flush_loop(
            self.shared.clone(),
            self.options.flush_interval,
            stop_rx,
        ));

        // Each connection holds a receiver until it ends: the sender sees when all have.
        let (open_tx, open_rx) = watch::channel(());
        tokio::pin!(shutdown);
        let Listeners { plain, tls, verify } = listeners;
        loop {
            let (accepted, door) = tokio::select! {
                a = accept(plain.as_ref()) => (a, Listener::Plain),
                a = accept(tls.as_ref().map(|(l, _)| l)) => (a, Listener::Tls),
                a = accept(verify.as_ref()) => (a, Listener::Verify),
                () = &mut shutdown => break,
            };
            let (stream, peer) = match accepted {
                Ok(a) => a,
                Err(err) => {
                    // Out of descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            };
            // Over the limit: closed at once, so that the descriptors it would take stay
            // available to the connections being served and their upstreams.
            let Ok(slot) = self.shared.slots.clone().try_acquire_owned() else {
                self.shared.metrics.connection_refused();
                drop(stream);
                continue;
            };
            let _ = stream.set_nodelay(true);
            let held = (open_rx.clone(), slot);
            let shared = self.shared.clone();
            match (&tls, door) {
                (Some((_, acceptor)), Listener::Tls) => {
                    tokio::spawn(handshake(shared, acceptor.clone(), stream, peer, held));
                }
                (_, Listener::Verify) => {
                    tokio::spawn(serve_verify(shared, stream, peer, held));
                }
                _ => {
                    tokio::spawn(serve_plain(shared, stream, peer, held));
                }
            }
        }
        drop((plain, tls, verify));
        drop(open_rx);
        tracing::info!("shutting down: draining in-flight requests");
        self.shared.draining.store(true, Ordering::Relaxed);
        self.shared.stop.notify_waiters();
        if tokio::time::timeout(self.options.drain_timeout, open_tx.closed())
            .await
            .is_err()
        {
            tracing::warn!(timeout = ?self.options.drain_timeout, "drain timeout passed; closing remaining connections");
        }
        let _ = stop_tx.send(true);
        expiries.abort();
        // A delivery under way finishes (or its lease runs out and another instance sends it).
        let _ = deliverer.await;
        let _ = exporter.await;
        let flushed = match flusher.await {
            Ok(result) => result,
            Err(err) => Err(GatewayError::Task(err.to_string())),
        };
        let shared = self.shared.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(sink) = &shared.access_log {
                sink.finish(Duration::from_secs(5));
            }
        })
        .await;
        flushed
    }
}

/// Where the data plane listens: plain HTTP, TLS, or both; and the decision endpoint.
#[derive(Default)]
pub struct Listeners {
    /// Plain HTTP/1.1.
    pub plain: Option<TcpListener>,
    /// HTTPS, with the acceptor that terminates TLS.
    pub tls: Option<(TcpListener, TlsAcceptor)>,
    /// Decision requests from another proxy (forward-auth), plain HTTP/1.1.
    pub verify: Option<TcpListener>,
}

/// Which listener a connection came in on.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Listener {
    Plain,
    Tls,
    Verify,
}

/// The next connection on `listener`; never, without one.
async fn accept(listener: Option<&TcpListener>) -> std::io::Result<(TcpStream, SocketAddr)> {
    match listener {
        Some(l) => l.accept().await,
        None => std::future::pending().await,
    }
}

/// Serves a plain connection: HTTP/1.1, or HTTP/2 when it opens with the preface.
async fn serve_plain(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, held: Held) {
    let open = shared.metrics.connection_opened();
    if let Some((stream, read)) =
        conn::serve(shared.clone(), stream, peer, None, Endpoint::Proxy).await
    {
        h2::serve(shared.clone(), Rewind::new(read, stream), peer, None).await;
    }
    drop((open, held));
}

/// Serves a connection of decision requests (HTTP/1.1; the proxies asking speak it).
async fn serve_verify(shared: Arc<Shared>, stream: TcpStream, peer: SocketAddr, held: Held) {
    let open = shared.metrics.connection_opened();
    conn::serve(shared.clone(), stream, peer, None, Endpoint::Decide).await;
    drop((open, held));
}

/// What a connection holds until it ends: the gateway counts open connections by the receiver, and
/// limits them by the permit.
type Held = (watch::Receiver<()>, tokio::sync::OwnedSemaphorePermit);

/// Runs a TLS handshake, then serves the connection. A client that stalls mid-handshake or sends
/// garbage holds only this task, and only until the head timeout.
async fn handshake(
    shared: Arc<Shared>,
    acceptor: TlsAcceptor,
    stream: TcpStream,
    peer: SocketAddr,
    _held: Held,
) {
    match tokio::time::timeout(shared.head_timeout, acceptor.accept(stream)).await {
        Ok(Ok(tls)) => {
            let _open = shared.metrics.connection_opened();
            let info = TlsInfo::of(tls.get_ref().1);
            if tls.get_ref().1.alpn_protocol() == Some(b"h2") {
                h2::serve(shared.clone(), tls, peer, Some(info)).await;
            } else {
                conn::serve(shared.clone(), tls, peer, Some(info), Endpoint::Proxy).await;
            }
        }
        Ok(Err(err)) => {
            shared.metrics.handshake_failed();
            tracing::debug!(%peer, error = %err, "TLS handshake failed");
        }
        Err(_) => {
            shared.metrics.handshake_failed();
            tracing::debug!(%peer, "TLS handshake timed out");
        }
    }
}

/// Resolves when a request waits for its count to be stored (`durability: request`); never
/// otherwise.
async fn asked(shared: &Shared) {
    match &shared.durable {
        Some(group) => group.asked.notified().await,
        None => std::future::pending().await,
    }
}

/// How often each instance looks for webhook deliveries that are due.
const WEBHOOK_POLL: Duration = Duration::from_secs(1);

/// Writes metered usage every `interval` and once more when told to stop. Deltas a failed write could
/// not store are kept and retried, so a store outage delays metering but loses none of it.
async fn flush_loop(
    shared: Arc<Shared>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) -> Result<(), GatewayError> {
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Failed flushes in a row: the first is logged, then one in every `REMIND_EVERY`, and the
    // recovery once, so an outage reads as two lines, not one a second.
    const REMIND_EVERY: u64 = 60;
    let mut failures = 0u64;
    loop {
        let stopping = tokio::select! {
            _ = ticker.tick() => false,
            () = asked(&shared) => false,
            _ = stop.changed() => true,
        };
        let generation = shared.durable.as_ref().map(GroupCommit::start);
        let result = flush_once(&shared).await;
        if let (Some(group), Some(generation)) = (&shared.durable, generation) {
            group.done(generation, result.is_ok());
        }
        if stopping {
            return result;
        }
        match result {
            Ok(()) if failures > 0 => {
                tracing::info!(
                    failed_flushes = failures,
                    "metering flush succeeded again; the usage counted meanwhile is stored"
                );
                failures = 0;
            }
            Ok(()) => {}
            Err(err) => {
                if failures % REMIND_EVERY == 0 {
                    tracing::error!(error = %err, failed_flushes = failures + 1,
                        "metering flush failed; usage is kept in memory and retried");
                }
                failures += 1;
            }
        }
    }
}

async fn flush_once(shared: &Arc<Shared>) -> Result<(), GatewayError> {
    // Taking the counts waits for the slot book, which a change of keys holds on the control
    // plane's lower-priority threads: not on an async worker, which would serve no request until
    // that thread got the CPU back. They go straight into what is pending, so a flush given up
    // half-way loses none of them.
    let taking = Arc::clone(shared);
    tokio::task::spawn_blocking(move || {
        take_unflushed(&taking, &mut taking.unflushed.blocking_lock())
    })
    .await
    .map_err(|e| GatewayError::Task(e.to_string()))?;
    // One flush at a time: the lock also orders a retried batch before newer counts.
    let mut pending = shared.unflushed.lock().await;
    if pending.is_empty() {
        shared.metrics.flushed(0, shared.clock.now());
        return Ok(());
    }
    let mut batch = std::mem::take(&mut *pending);
    let store = shared.store.clone();
    let started = std::time::Instant::now();
    let secs = tollgate_core::clock::epoch_secs(shared.clock.now());
    let (batch, result) = tokio::task::spawn_blocking(move || {
        let r = batch.write(&*store, secs);
        (batch, r)
    })
    .await
    .map_err(|e| GatewayError::Task(e.to_string()))?;
    let took = started.elapsed().as_secs_f64();
    let now = shared.clock.now();
    if let Err(err) = result {
        shared.metrics.usage_written(took, false, batch.len(), now);
        *pending = batch;
        return Err(err.into());
    }
    shared.metrics.usage_written(took, true, 0, now);
    Ok(())
}

/// Takes the counts, sightings and credit events not yet taken from the snapshots into `pending`.
fn take_unflushed(shared: &Shared, pending: &mut Unflushed) {
    let Unflushed {
        keys,
        customers,
        spent,
        refills,
    } = pending;
    Snapshot::take_metered(&shared.snapshot, |plan_id, holder, taken| {
        let key_id = match holder {
            Holder::Key(key_id) => key_id,
            Holder::Customer(customer_id) => {
                // A customer's shared meter counts only what its keys were admitted for.
                if let Taken::Count(Counted::Admitted, day, count) = taken {
                    customers.push(CustomerDelta {
                        plan_id: plan_id.to_owned(),
                        customer_id: customer_id.to_owned(),
                        day,
                        count,
                    });
                }
                return;
            }
        };
        let mut delta = UsageDelta {
            plan_id: plan_id.to_owned(),
            key_id: key_id.to_owned(),
            ..UsageDelta::default()
        };
        match taken {
            Taken::Count(counted, day, n) => {
                delta.day = day;
                *match counted {
                    Counted::Admitted => &mut delta.count,
                    Counted::Throttled => &mut delta.throttled,
                    Counted::QuotaExceeded => &mut delta.quota_exceeded,
                } = n;
            }
            Taken::Seen(at) => {
                delta.day = EpochDay::from_nanos(at * NANOS_PER_SEC);
                delta.last_used = Some(at);
            }
        }
        keys.push(delta);
    });
    shared.snapshot.load().take_credits(|key_id, events| {
        for (day, n) in events.spent {
            spent.push(CreditSpend {
                key_id: key_id.to_owned(),
                day,
                spent: n,
            });
        }
        for (day, added) in events.refills {
            refills.push((key_id.to_owned(), day, added));
        }
    });
}
