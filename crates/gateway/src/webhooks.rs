//! Webhooks: the outbox's events delivered to the configured endpoints, signed the way Stripe signs
//! ([`tollgate_core::signature`]), by every instance (each leases what it sends, so two instances
//! do not send one event at once), retried with exponential backoff for `retryFor` (a day by
//! default), then kept as failed until an operator retries them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tollgate_core::clock::epoch_secs;
use tollgate_core::signature::{SIGNATURE_HEADER, sign};
use tollgate_store::{Attempt, OutboxEvent};

use crate::state::Shared;
use crate::tls::ClientTls;

/// A configured webhook.
#[derive(Debug, Clone)]
pub struct Webhook {
    /// Its name, which alerts refer to.
    pub name: String,
    /// Where deliveries are POSTed.
    pub url: String,
    /// What deliveries are signed with (none: unsigned).
    pub secret: Option<String>,
    /// What a delivery's body is.
    pub format: WebhookFormat,
    /// How long a delivery is retried before the event is kept as failed, in seconds.
    pub retry_for: u64,
    /// The TLS settings of `https` URLs: what https upstreams trust (`upstreamTls`).
    pub tls: Arc<ClientTls>,
}

/// What a delivery's body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WebhookFormat {
    /// The event's JSON.
    Json,
    /// A Slack incoming webhook's message: `{"text": "…"}` saying what happened.
    Slack,
}

impl WebhookFormat {
    /// The format named `name` (`json`, `slack`).
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "json" => Some(Self::Json),
            "slack" => Some(Self::Slack),
            _ => None,
        }
    }
}

/// The longest a retry waits.
const MAX_BACKOFF: i64 = 3_600;
/// How long a delivery may take.
const DELIVERY_TIMEOUT: Duration = Duration::from_secs(10);
/// How long an instance holds the events it leased: past the delivery timeout, so they are not
/// sent twice at once.
const LEASE_SECS: i64 = 30;
/// Events leased at a time.
const BATCH: usize = 32;

/// When the delivery after `attempts` failed ones is due, for an event queued at `created` and
/// retried for `retry_for` seconds: `None` once that time has passed (the event is kept as failed).
/// Backoff doubles from a second, up to an hour.
pub fn next_try(created: i64, attempts: u32, retry_for: u64, now: i64) -> Option<i64> {
    let wait = 1i64
        .checked_shl(attempts.min(31))
        .unwrap_or(MAX_BACKOFF)
        .min(MAX_BACKOFF);
    let at = now.saturating_add(wait);
    (at <= created.saturating_add(i64::try_from(retry_for).unwrap_or(i64::MAX))).then_some(at)
}

/// Delivers due events every `interval` until told to stop.
pub(crate) async fn deliver_loop(
    shared: Arc<Shared>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    if shared.snapshot.load().config().webhooks.is_empty() {
        return;
    }
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let shared = shared.clone();
        let done = tokio::task::spawn_blocking(move || deliver_due(&shared)).await;
        if let Ok(Err(err)) | Err(err) = done.map_err(|e| e.to_string()) {
            tracing::warn!(error = %err, "webhook deliveries could not be read from the store");
        }
    }
}

/// Leases the due events and delivers each. Blocking.
fn deliver_due(shared: &Shared) -> Result<(), String> {
    let now = epoch_secs(shared.clock.now());
    let events = shared
        .store
        .lease_events(now, now + LEASE_SECS, BATCH)
        .map_err(|e| e.to_string())?;
    // Held across deliveries (seconds each at worst): an owned snapshot, not a guard.
    let snap = shared.snapshot.load_full();
    for event in events {
        let webhook = snap
            .config()
            .webhooks
            .iter()
            .find(|w| w.name == event.webhook);
        let sent = match webhook {
            Some(w) => post(w, &event, epoch_secs(shared.clock.now())),
            None => Err(format!("no webhook {:?} is configured", event.webhook)),
        };
        let attempt = match sent {
            Ok(()) => Attempt::Delivered,
            Err(error) => {
                let retry_for = webhook.map_or(0, |w| w.retry_for);
                let now = epoch_secs(shared.clock.now());
                match next_try(event.created, event.attempts, retry_for, now) {
                    Some(at) => Attempt::Retry { at, error },
                    None => {
                        tracing::warn!(event = %event.id, webhook = %event.webhook, error = %error,
                            "webhook delivery failed for good; kept as failed (tollgate events retry)");
                        Attempt::Failed { error }
                    }
                }
            }
        };
        shared
            .store
            .record_attempt(&event.id, &attempt)
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// POSTs `event` to `webhook`, signed at `now`: `Ok` when it answered 2xx. Blocking.
pub fn post(webhook: &Webhook, event: &OutboxEvent, now: i64) -> Result<(), String> {
    let body = match webhook.format {
        WebhookFormat::Json => event.body.clone(),
        WebhookFormat::Slack => slack_message(&event.body),
    };
    let mut request = post_to(&webhook.url, &webhook.tls)?
        .set("Content-Type", "application/json")
        .set("Tollgate-Event-Id", &event.id);
    if let Some(secret) = &webhook.secret {
        request = request.set(SIGNATURE_HEADER, &sign(secret, now, body.as_bytes()));
    }
    sent(&webhook.url, request.send_string(&body))
}

/// A POST to `url` (`https` with `tls`), following no redirects, within the delivery timeout.
pub(crate) fn post_to(url: &str, tls: &ClientTls) -> Result<ureq::Request, String> {
    let mut agent = ureq::AgentBuilder::new()
        .timeout(DELIVERY_TIMEOUT)
        .redirects(0);
    if url.starts_with("https://") {
        let tls = tls
            .config()
            .ok_or("its TLS configuration was never opened")?;
        agent = agent.tls_config(tls.clone());
    }
    Ok(agent.build().post(url).set(
        "User-Agent",
        concat!("tollgate/", env!("CARGO_PKG_VERSION")),
    ))
}

/// `Ok` when the POST to `url` was answered 2xx; otherwise what went wrong, with what the
/// receiver said (its first 200 bytes).
pub(crate) fn sent(url: &str, result: Result<ureq::Response, ureq::Error>) -> Result<(), String> {
    match result {
        Ok(_) => Ok(()),
        Err(ureq::Error::Status(code, response)) => {
            let said = response.into_string().unwrap_or_default();
            let said: String = said.chars().take(200).collect();
            Err(format!("{url} answered {code} {said}")
                .trim_end()
                .to_owned())
        }
        Err(e) => Err(format!("{url}: {e}")),
    }
}

/// A Slack message for an event: its type and what it is about, in a line.
fn slack_message(event: &str) -> String {
    let e: serde_json::Value = serde_json::from_str(event).unwrap_or_default();
    let field = |name: &str| e[name].as_str().map(str::to_owned);
    let about = [
        field("keyName"),
        field("customerId"),
        field("usagePlanName"),
    ]
    .into_iter()
    .flatten()
    .collect::<Vec<_>>()
    .join(", ");
    let text = format!(
        "tollgate: {}{}{}",
        field("type").unwrap_or_else(|| "event".into()),
        if about.is_empty() { "" } else { " — " },
        about
    );
    serde_json::json!({ "text": text }).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retries_back_off_for_a_day_then_stop() {
        let day: u64 = 86_400;
        assert_eq!(next_try(0, 0, day, 10), Some(11));
        assert_eq!(next_try(0, 3, day, 10), Some(18));
        assert_eq!(
            next_try(0, 40, day, 10),
            Some(10 + MAX_BACKOFF),
            "at most an hour"
        );
        assert_eq!(next_try(0, 5, day, 86_390), None, "past the day");
        assert_eq!(next_try(0, 0, 0, 0), None, "no retries");
    }

    #[test]
    fn slack_gets_a_line() {
        let msg =
            slack_message(r#"{"type":"quota.threshold","keyName":"acme","usagePlanName":"gold"}"#);
        assert_eq!(msg, r#"{"text":"tollgate: quota.threshold — acme, gold"}"#);
    }
}
