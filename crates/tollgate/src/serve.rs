//! `tollgate serve`: open the store, apply the declared plans and keys, serve until a signal.

use std::io::Write as _;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context as _;
use tollgate_core::SystemClock;
use tollgate_gateway::{Gateway, GatewayOptions};
use tollgate_store::{SqliteStore, Store, apply_declared};

use crate::config::Config;

/// Runs the gateway described by `config` until SIGTERM or SIGINT.
pub fn serve(config: Config) -> anyhow::Result<()> {
    let store: Arc<dyn Store> = Arc::new(
        SqliteStore::open(&config.store.sqlite)
            .with_context(|| format!("opening the store {}", config.store.sqlite.display()))?,
    );
    let now_secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let generated = apply_declared(&*store, &config.plans, &config.keys, now_secs)
        .context("applying the config's plans and keys")?;
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

    let options = GatewayOptions {
        flush_interval: config.store.flush_interval,
        ..GatewayOptions::default()
    };
    let gateway = Gateway::open(config.gateway, store, Arc::new(SystemClock), options)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the runtime")?;
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .with_context(|| format!("binding {}", config.listen))?;
        let addr = listener.local_addr()?;
        tracing::info!(%addr, "listening");
        println!("tollgate: listening on http://{addr}");
        let _ = std::io::stdout().flush();
        gateway.serve(listener, shutdown_signal()).await?;
        tracing::info!("stopped");
        Ok(())
    })
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            // Without a SIGTERM handler, only Ctrl-C stops the gateway gracefully.
            Err(_) => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {},
        () = term => {},
    }
}
