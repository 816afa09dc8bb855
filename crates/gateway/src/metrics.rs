//! Counters of what the data plane decided, and the Prometheus text rendering of them. A handful of
//! atomics on the request path; no labels carry key values (nor key ids: cardinality).

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::limits::Refusal;

/// Outcomes counted, in rendering order.
const OUTCOMES: [&str; 7] = [
    "admitted",
    "no_route",
    "forbidden",
    "throttled",
    "quota_exceeded",
    "store_unavailable",
    "upstream_error",
];

/// Request counters by outcome, plus cluster-mode store failures.
#[derive(Debug, Default)]
pub struct Metrics {
    outcomes: [AtomicU64; 7],
    store_failures: AtomicU64,
    connections_refused: AtomicU64,
    handshakes_failed: AtomicU64,
    rapid_resets: AtomicU64,
    access_log_dropped: AtomicU64,
}

impl Metrics {
    /// Counts an admitted request whose answer had `status`.
    pub fn admitted(&self, status: u16) {
        let at = if status == 502 || status == 504 { 6 } else { 0 };
        self.outcomes[at].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a refusal.
    pub fn refused(&self, refusal: &Refusal) {
        let at = match refusal {
            Refusal::MissingAuthenticationToken => 1,
            Refusal::Forbidden => 2,
            Refusal::TooManyRequests { .. } => 3,
            Refusal::LimitExceeded { .. } => 4,
            Refusal::ServiceUnavailable => 5,
        };
        self.outcomes[at].fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a client connection closed, or an HTTP/2 stream refused, at once because the
    /// connection limit was reached.
    pub fn connection_refused(&self) {
        self.connections_refused.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a TLS handshake that failed or timed out.
    pub fn handshake_failed(&self) {
        self.handshakes_failed.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an HTTP/2 connection cut off for resetting most of its streams.
    pub fn http2_rapid_reset(&self) {
        self.rapid_resets.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts an access-log line dropped because the writer was that far behind.
    pub fn access_log_dropped(&self) {
        self.access_log_dropped.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a failed call to the shared store.
    pub fn store_failed(&self) {
        self.store_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// The Prometheus text exposition of these counters and the given gauges.
    pub fn render(
        &self,
        store_degraded: Option<bool>,
        api_keys: usize,
        usage_plans: usize,
    ) -> String {
        let mut out = String::new();
        out.push_str("# HELP tollgate_requests_total Requests by what the gateway decided.\n");
        out.push_str("# TYPE tollgate_requests_total counter\n");
        for (name, n) in OUTCOMES.iter().zip(&self.outcomes) {
            let _ = writeln!(
                out,
                "tollgate_requests_total{{outcome=\"{name}\"}} {}",
                n.load(Ordering::Relaxed)
            );
        }
        out.push_str("# HELP tollgate_api_keys API keys served.\n# TYPE tollgate_api_keys gauge\n");
        let _ = writeln!(out, "tollgate_api_keys {api_keys}");
        out.push_str("# HELP tollgate_usage_plans Usage plans with at least one key.\n# TYPE tollgate_usage_plans gauge\n");
        let _ = writeln!(out, "tollgate_usage_plans {usage_plans}");
        out.push_str("# HELP tollgate_connections_refused_total Client connections closed (or HTTP/2 streams refused) at once because maxConnections were in use.\n# TYPE tollgate_connections_refused_total counter\n");
        let _ = writeln!(
            out,
            "tollgate_connections_refused_total {}",
            self.connections_refused.load(Ordering::Relaxed)
        );
        out.push_str("# HELP tollgate_tls_handshakes_failed_total TLS handshakes that failed or timed out.\n# TYPE tollgate_tls_handshakes_failed_total counter\n");
        let _ = writeln!(
            out,
            "tollgate_tls_handshakes_failed_total {}",
            self.handshakes_failed.load(Ordering::Relaxed)
        );
        out.push_str("# HELP tollgate_http2_rapid_reset_total HTTP/2 connections closed with ENHANCE_YOUR_CALM for cancelling most of their streams (CVE-2023-44487).\n# TYPE tollgate_http2_rapid_reset_total counter\n");
        let _ = writeln!(
            out,
            "tollgate_http2_rapid_reset_total {}",
            self.rapid_resets.load(Ordering::Relaxed)
        );
        out.push_str("# HELP tollgate_access_log_dropped_total Access-log lines dropped because the writer could not keep up.\n# TYPE tollgate_access_log_dropped_total counter\n");
        let _ = writeln!(
            out,
            "tollgate_access_log_dropped_total {}",
            self.access_log_dropped.load(Ordering::Relaxed)
        );
        if let Some(degraded) = store_degraded {
            out.push_str("# HELP tollgate_store_degraded 1 while Redis is unavailable and onStoreFailure applies.\n");
            out.push_str("# TYPE tollgate_store_degraded gauge\n");
            let _ = writeln!(out, "tollgate_store_degraded {}", u8::from(degraded));
            out.push_str(
                "# HELP tollgate_store_failures_total Calls to Redis that failed or timed out.\n",
            );
            out.push_str("# TYPE tollgate_store_failures_total counter\n");
            let _ = writeln!(
                out,
                "tollgate_store_failures_total {}",
                self.store_failures.load(Ordering::Relaxed)
            );
        }
        out
    }
}
