//! `tollgate serve`: open the store, apply the declared plans and keys, serve the data plane (and the
//! admin API, when configured) until a signal.

use std::io::Write as _;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tokio::signal::unix::SignalKind;
use tokio::sync::watch;
use tollgate_admin::data_plane::{BoxFuture, DataPlane};
use tollgate_admin::http::ListenerLimits;
use tollgate_admin::service::{Admin, AdminSettings, on_build_thread};
use tollgate_core::SystemClock;
use tollgate_gateway::{DescriptorBudget, Gateway, GatewayHandle, GatewayOptions, Listeners};
use tollgate_store::limiter::RedisLimiter;
use tollgate_store::report::PeriodUsed;
use tollgate_store::{KeyIndex, Memberships, OnStoreFailure, RedisStore, Store, apply_declared};

use crate::config::{AdminConfig, Config, StoreKind, TlsListener, TlsTermination};

/// How often a cluster instance checks Redis's record version even without a change message: the
/// periodic resync that catches a message missed while the subscription was down.
const RESYNC_INTERVAL: Duration = Duration::from_secs(1);
/// How long announcements of record changes must pause before a cluster instance reloads.
const CHANGES_SETTLE: Duration = Duration::from_millis(50);

/// Runs the gateway described by `config` until SIGTERM or SIGINT.
pub fn serve(config: Config) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(run(config))
}

async fn run(config: Config) -> anyhow::Result<()> {
    let store = config
        .store
        .kind
        .open()
        .with_context(|| format!("opening the store {}", config.store.kind.describe()))?;
    let limiter = connect_limiter(&config).await?;
    apply_declared_records(&config, &*store)?;

    let options = gateway_options(&config)?;
    // Cluster mode: the record version the first snapshot is built from, so the resync loop reloads only
    // what changes after it (a million keys are not loaded twice at startup).
    let loaded_version = match &config.store.kind {
        StoreKind::Redis(settings, _) => {
            let probe = RedisStore::new(settings.clone())?;
            Some(tokio::task::block_in_place(|| probe.version()).context("reading Redis")?)
        }
        StoreKind::Sqlite(_) => None,
    };
    // Loaded once, compact: the gateway serves from it, and the admin API keeps only its plans.
    let started = std::time::Instant::now();
    let records =
        tokio::task::block_in_place(|| store.load_index()).context("loading the records")?;
    let loaded = started.elapsed();
    // On the thread every later build runs on, so that they reuse what this one frees.
    let (runtime, built_store) = (tokio::runtime::Handle::current(), store.clone());
    let gateway_config = config.gateway;
    let (gateway, records) = on_build_thread(move || {
        let _runtime = runtime.enter();
        let gateway = Gateway::open(
            gateway_config,
            &records,
            built_store,
            Arc::new(SystemClock),
            options,
            limiter,
        );
        (gateway, records)
    })
    .await
    .map_err(|e| anyhow::anyhow!("building the first snapshot: {e}"))?;
    let gateway = gateway?;
    tracing::info!(
        keys = records.len(),
        load_ms = loaded.as_millis() as u64,
        build_ms = (started.elapsed() - loaded).as_millis() as u64,
        "records loaded and served"
    );
    let plans = records.into_plans();
    let admin = match &config.admin {
        Some(admin_config) => {
            let settings = AdminSettings {
                credentials: admin_config.credentials.clone().into_iter().collect(),
                sealer: config.sealer.clone(),
                apis: gateway.handle().snapshot().config().outline(),
                webhooks: gateway
                    .handle()
                    .snapshot()
                    .config()
                    .webhooks
                    .iter()
                    .map(|w| w.name.clone())
                    .collect(),
            };
            let plane = Arc::new(Plane(gateway.handle()));
            let admin = Admin::new(store.clone(), plans, plane, settings);
            let limits = ListenerLimits {
                max_connections: admin_config.max_connections,
                head_timeout: config.header_timeout,
            };
            Some((Arc::new(admin), admin_config, limits))
        }
        None => None,
    };

    let stop_rx = watch_signals(gateway.handle())?;

    if let StoreKind::Redis(settings, _) = &config.store.kind {
        let watcher = RedisStore::new(settings.clone())?;
        let admin = admin.as_ref().map(|(a, _, _)| a.clone());
        let changed = Arc::new(tokio::sync::Notify::new());
        tokio::spawn(subscribe(
            settings.urls[0].clone(),
            changed.clone(),
            stop_rx.clone(),
        ));
        tokio::spawn(resync(
            watcher,
            loaded_version,
            gateway.handle(),
            admin,
            changed,
            stop_rx.clone(),
        ));
    }

    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    if config.insecure_upstream_tls {
        tracing::warn!(
            "upstreamTls.insecureSkipVerify: the certificates of some https upstreams are not verified; anyone on the path to them can read and change their traffic"
        );
    }
    let addresses = (config.listen, config.tls.as_ref(), config.verify_listen);
    let listeners = bind_listeners(addresses, &stop_rx).await?;
    let admin_task = match admin {
        Some(admin) => Some(start_admin(admin, &stop_rx).await?),
        None => None,
    };
    if let Some((listener, _)) = &listeners.tls {
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "listening (HTTPS)");
        println!("tollgate: listening on https://{addr}");
    }
    if let Some(listener) = &listeners.plain {
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "listening");
        println!("tollgate: listening on http://{addr}");
    }
    let _ = std::io::stdout().flush();

    gateway.serve(listeners, stopped(stop_rx)).await?;
    if let Some(task) = admin_task {
        task.await.context("admin API task")?.context("admin API")?;
    }
    tracing::info!("stopped");
    Ok(())
}

/// SIGTERM and SIGINT become the stop every task watches; SIGUSR1 reopens the access log's file, as
/// logrotate's postrotate expects.
fn watch_signals(handle: GatewayHandle) -> anyhow::Result<watch::Receiver<bool>> {
    let stop_rx = stop_on_signals()?;
    let mut usr1 = signal(SignalKind::user_defined1(), "SIGUSR1")?;
    tokio::spawn(async move {
        while usr1.recv().await.is_some() {
            handle.reopen_access_log();
        }
    });
    Ok(stop_rx)
}

/// Connects to Redis for the shared limits, in cluster mode.
async fn connect_limiter(config: &Config) -> anyhow::Result<Option<RedisLimiter>> {
    Ok(match &config.store.kind {
        StoreKind::Sqlite(_) => None,
        StoreKind::Redis(settings, on_failure) => Some(
            RedisLimiter::connect(
                &settings.urls,
                settings.cluster,
                settings.timeout,
                *on_failure,
            )
            .await
            .context("connecting to Redis")?,
        ),
    })
}

/// Applies the config's plans and keys to the store; a value generated for a key is shown once, on
/// stdout.
fn apply_declared_records(config: &Config, store: &dyn Store) -> anyhow::Result<()> {
    let now_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let seal = config
        .sealer
        .clone()
        .map(|s| move |id: &str, value: &str| s.seal(id, value));
    let generated = tokio::task::block_in_place(|| {
        apply_declared(
            store,
            &config.plans,
            &config.keys,
            now_secs,
            seal.as_ref().map(|f| f as &dyn Fn(&str, &str) -> Vec<u8>),
        )
    })
    .with_context(|| {
        format!(
            "applying the config's plans and keys to the store {}",
            config.store.kind.describe()
        )
    })?;
    {
        // The one time a generated value is shown: on stdout for the operator, never in the logs.
        let mut out = std::io::stdout().lock();
        for key in &generated {
            let _ = writeln!(
                out,
                "tollgate: generated API key {:?} (id {}): {}  <- shown once, store it now",
                key.name, key.id, key.value
            );
        }
    }
    Ok(())
}

/// The gateway's options: the connection budget the descriptor limit allows, logged.
fn gateway_options(config: &Config) -> anyhow::Result<GatewayOptions> {
    let descriptors = raise_descriptor_limit();
    let admin_connections = config.admin.as_ref().map_or(0, |a| a.max_connections);
    let budget = DescriptorBudget::plan(descriptors, admin_connections, config.max_connections)
        .map_err(anyhow::Error::msg)?;
    tracing::info!(
        descriptors,
        max_connections = budget.max_connections,
        max_idle_upstream = budget.max_idle_upstream,
        admin_max_connections = admin_connections,
        "connection limits"
    );
    Ok(GatewayOptions {
        flush_interval: config.store.flush_interval,
        durable_requests: config.store.durable_requests,
        head_timeout: config.header_timeout,
        max_connections: budget.max_connections,
        max_idle_upstream: budget.max_idle_upstream,
        http2: config.http2,
        ..GatewayOptions::default()
    })
}

/// Binds the data plane's listeners: plain, TLS (with its certificates watched until `stop_rx`
/// says stop) and the decision endpoint's.
async fn bind_listeners(
    (listen, tls, verify_listen): (Option<SocketAddr>, Option<&TlsListener>, Option<SocketAddr>),
    stop_rx: &watch::Receiver<bool>,
) -> anyhow::Result<Listeners> {
    let mut listeners = Listeners::default();
    if let Some(listen) = listen {
        let listener = tokio::net::TcpListener::bind(listen)
            .await
            .with_context(|| format!("binding {listen}"))?;
        listeners.plain = Some(listener);
    }
    if let Some(tls) = tls {
        let listener = tokio::net::TcpListener::bind(tls.listen)
            .await
            .with_context(|| format!("binding {} (tls.listen)", tls.listen))?;
        let acceptor = terminate(&tls.tls, stopped(stop_rx.clone()))?;
        listeners.tls = Some((listener, acceptor));
    }
    if let Some(addr) = verify_listen {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr} (verify.listen)"))?;
        let bound = listener.local_addr()?;
        tracing::info!(addr = %bound, "decision endpoint listening");
        println!("tollgate: decisions on http://{bound}");
        listeners.verify = Some(listener);
    }
    Ok(listeners)
}

/// What the admin API serves with: the service, its listener's settings and its limits.
type AdminParts<'c> = (Arc<Admin>, &'c AdminConfig, ListenerLimits);

/// Binds the admin API's listener and serves it until `stop_rx` says stop.
async fn start_admin(
    (admin, admin_config, limits): AdminParts<'_>,
    stop_rx: &watch::Receiver<bool>,
) -> anyhow::Result<tokio::task::JoinHandle<std::io::Result<()>>> {
    let admin_addr = admin_config.listen;
    let admin_listener = tokio::net::TcpListener::bind(admin_addr)
        .await
        .with_context(|| format!("binding the admin API to {admin_addr}"))?;
    let bound = admin_listener.local_addr()?;
    let tls = match &admin_config.tls {
        Some(tls) => Some(terminate(tls, stopped(stop_rx.clone()))?),
        None => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(addr = %bound, "admin API listening");
    println!("tollgate: admin API on {scheme}://{bound}");
    Ok(tokio::spawn(tollgate_admin::http::serve(
        admin,
        admin_listener,
        tls,
        limits,
        stopped(stop_rx.clone()),
    )))
}

/// Resolves once `rx` says stop.
async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Cluster mode: wakes `changed` whenever a record change is published on Redis (on any node of a
/// cluster: PUBLISH reaches them all), resubscribing after a lost connection.
async fn subscribe(
    url: String,
    changed: Arc<tokio::sync::Notify>,
    mut stop: watch::Receiver<bool>,
) {
    use futures_util::StreamExt as _;
    loop {
        let connected = async {
            let mut pubsub = redis::Client::open(url.as_str())?
                .get_async_pubsub()
                .await?;
            pubsub
                .subscribe(tollgate_store::redis::keys::CHANGES)
                .await?;
            // Anything may have changed while we were not listening.
            changed.notify_one();
            let mut messages = pubsub.on_message();
            while messages.next().await.is_some() {
                changed.notify_one();
            }
            Ok::<_, redis::RedisError>(())
        };
        tokio::select! {
            result = connected => {
                if let Err(e) = result {
                    tracing::debug!(error = %e, "change subscription lost; retrying");
                }
            }
            _ = stop.changed() => return,
        }
        tokio::select! {
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
            _ = stop.changed() => return,
        }
    }
}

/// The running gateway, as the admin API drives it.
struct Plane(GatewayHandle);

impl DataPlane for Plane {
    fn served(&self) -> Arc<dyn Memberships> {
        self.0.snapshot()
    }

    fn reload(&self, records: &KeyIndex, period_used: &PeriodUsed) {
        self.0.reload(records, period_used);
    }

    fn change_keys(
        &self,
        changed: &KeyIndex,
        touched: &[String],
        period_used: &PeriodUsed,
    ) -> bool {
        self.0.change_keys(changed, touched, period_used)
    }

    fn flush(&self) -> BoxFuture<'_, Result<(), String>> {
        Box::pin(async { self.0.flush().await.map_err(|e| e.to_string()) })
    }

    fn set_remaining<'a>(
        &'a self,
        plan_id: &'a str,
        key_id: &'a str,
        remaining: i64,
    ) -> BoxFuture<'a, Result<Option<i64>, String>> {
        Box::pin(async move {
            self.0
                .set_remaining(plan_id, key_id, remaining)
                .await
                .map_err(|e| e.to_string())
        })
    }

    fn credit_balance(&self, key_id: &str) -> Option<u64> {
        self.0.snapshot().credit_balance(key_id)
    }

    fn add_credits(&self, key_id: &str, n: u64) -> bool {
        self.0.snapshot().add_credits(key_id, n)
    }

    fn now(&self) -> u64 {
        self.0.clock().now()
    }

    fn shared_store(&self) -> Option<(bool, OnStoreFailure)> {
        self.0.shared_store()
    }

    fn metrics_text(&self) -> String {
        self.0.metrics_text()
    }

    fn forbidden(&self) -> u64 {
        self.0.forbidden()
    }

    fn latency(&self, q: f64) -> Option<(f64, bool)> {
        self.0.latency(q)
    }
}

/// Cluster mode: serves what another instance changed whenever Redis's record version moves: at once
/// when the change is announced, else at the next periodic check. Changed keys that Redis's change
/// log names are read alone; anything else (a plan, or a gap in the log) reloads every record.
async fn resync(
    store: RedisStore,
    mut seen: Option<u64>,
    gateway: GatewayHandle,
    admin: Option<Arc<Admin>>,
    changed: Arc<tokio::sync::Notify>,
    mut stop: watch::Receiver<bool>,
) {
    let store = Arc::new(store);
    loop {
        let announced = tokio::select! {
            () = changed.notified() => true,
            () = tokio::time::sleep(RESYNC_INTERVAL) => false,
            _ = stop.changed() => return,
        };
        if announced {
            // A burst of changes (an import, an instance applying its config) is read once: wait
            // until the announcements pause, or at most a resync interval.
            let until = tokio::time::Instant::now() + RESYNC_INTERVAL;
            loop {
                tokio::select! {
                    () = changed.notified() => {}
                    () = tokio::time::sleep(CHANGES_SETTLE) => break,
                    () = tokio::time::sleep_until(until) => break,
                    _ = stop.changed() => return,
                }
            }
        }
        let s = store.clone();
        let checked = tokio::task::spawn_blocking(move || match seen {
            Some(before) => s.changes_since(before),
            None => s.version().map(|v| (v, None)),
        })
        .await;
        let Ok(Ok((version, changed))) = checked else {
            continue;
        };
        if seen == Some(version) {
            continue;
        }
        if let Some(ids) = changed.filter(|_| seen.is_some_and(|before| version > before)) {
            // Only keys changed, and the log says which: they are read alone.
            let s = store.clone();
            let read = tokio::task::spawn_blocking(move || {
                let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
                let found: Vec<_> = s.keys_by_id(&refs)?.into_iter().flatten().collect();
                Ok::<_, tollgate_store::StoreError>((KeyIndex::of_keys(s.plans()?, &found), ids))
            })
            .await;
            if let Ok(Ok((index, ids))) = read {
                let keys = ids.len();
                let served = match &admin {
                    Some(admin) => admin.refresh_keys(index, ids).await,
                    None => {
                        let gateway = gateway.clone();
                        on_build_thread(move || {
                            gateway.change_keys(&index, &ids, &PeriodUsed::default())
                        })
                        .await
                        .unwrap_or(false)
                    }
                };
                if served {
                    tracing::info!(version, announced, keys, "keys changed in Redis; served");
                    seen = Some(version);
                    continue;
                }
            }
        }
        let s = store.clone();
        let Ok(Ok(records)) = tokio::task::spawn_blocking(move || s.load_index()).await else {
            continue;
        };
        match seen {
            Some(before) if version < before => tracing::warn!(
                version,
                before,
                "Redis's record version went back: Redis lost data (restarted without persistence?); serving what it holds now"
            ),
            Some(_) => tracing::info!(version, announced, "records changed in Redis; reloaded"),
            None => {}
        }
        seen = Some(version);
        match &admin {
            Some(admin) => admin.refresh(records).await,
            None => {
                let gateway = gateway.clone();
                let reloaded = on_build_thread(move || {
                    gateway.reload(&records, &PeriodUsed::default());
                })
                .await;
                if let Err(e) = reloaded {
                    tracing::error!(error = %e, "could not serve the records another instance changed");
                }
            }
        }
    }
}

/// Raises the soft limit on open files to the hard limit (a gateway holds two descriptors per
/// proxied connection) and returns the limit now in force.
fn raise_descriptor_limit() -> u64 {
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(limit) => limit,
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the open file limit");
            rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(1024, |(soft, _)| soft)
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
/// How often the certificate files are looked at for a replacement.
const CERTIFICATE_CHECK: Duration = Duration::from_secs(2);

/// The acceptor for a listener terminating TLS as `tls` says; its certificates are reloaded on
/// SIGHUP and when their files change, until `stop`.
fn terminate(
    tls: &TlsTermination,
    stop: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<tokio_rustls::TlsAcceptor> {
    let opened = tls
        .opened()
        .context("the TLS listener's certificates were never opened")?;
    tokio::spawn(
        opened
            .certificates
            .clone()
            .watch(CERTIFICATE_CHECK, hangups()?, stop),
    );
    Ok(tokio_rustls::TlsAcceptor::from(opened.server.clone()))
}

/// Every SIGHUP, as a stream (SIGHUP reloads the TLS certificates).
fn hangups() -> anyhow::Result<std::pin::Pin<Box<dyn futures_util::Stream<Item = ()> + Send>>> {
    let signal = signal(SignalKind::hangup(), "SIGHUP")?;
    Ok(Box::pin(futures_util::stream::unfold(
        signal,
        |mut signal| async move { signal.recv().await.map(|()| ((), signal)) },
    )))
}

/// The stop every task watches, sent on the first SIGTERM or SIGINT.
///
/// The handlers are in place when this returns, not when a spawned task first runs: a SIGTERM sent as
/// soon as "listening" is printed would otherwise meet the default action and kill the gateway
/// without its drain and final flush.
fn stop_on_signals() -> anyhow::Result<watch::Receiver<bool>> {
    let mut term = signal(SignalKind::terminate(), "SIGTERM")?;
    let mut int = signal(SignalKind::interrupt(), "SIGINT")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        let _ = stop_tx.send(true);
    });
    Ok(stop_rx)
}

fn signal(kind: SignalKind, name: &str) -> anyhow::Result<tokio::signal::unix::Signal> {
    tokio::signal::unix::signal(kind).with_context(|| format!("listening for {name}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// On a runtime that has not run the stop's task yet (one thread, no await in between), a
    /// SIGTERM still reaches the handler instead of killing the process.
    #[tokio::test(flavor = "current_thread")]
    async fn a_sigterm_as_soon_as_the_handlers_are_set_is_caught() {
        let mut stop = stop_on_signals().unwrap();
        let sent = std::process::Command::new("kill")
            .args(["-TERM", &std::process::id().to_string()])
            .status()
            .unwrap();
        assert!(sent.success());
        tokio::time::timeout(Duration::from_secs(10), stop.wait_for(|stopped| *stopped))
            .await
            .expect("the stop was sent")
            .unwrap();
    }
}
