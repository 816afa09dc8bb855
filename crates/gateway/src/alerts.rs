//! Alerts: events fired when a key (or a customer whose keys share a plan's limits) crosses a
//! threshold of its quota, when a key's credits fall below a level, and when a key nears its
//! expiry. The request path only compares numbers and, on a crossing, hands it to a task; the task
//! makes the event and claims it in the store, where the claim is unique (per alert, scope, plan,
//! period and threshold for a quota; per alert, key and day for credits; per alert, key and expiry
//! instant for an expiry), so each fires once across a fleet, whoever crossed first (UpdateUsage
//! giving a key back what it had does not re-fire a quota's threshold in its period). The claimed
//! event waits in the outbox for [`crate::webhooks`].

use std::sync::Arc;

use serde_json::json;
use tokio::sync::mpsc;
use tollgate_core::clock::{NANOS_PER_SEC, epoch_secs};
use tollgate_core::event::{event_id, rfc3339_secs};
use tollgate_core::quota::{EpochDay, QuotaWindow};
use tollgate_store::{EventStatus, OutboxEvent};

use crate::admit::Admission;
use crate::state::Shared;

/// A configured alert.
#[derive(Debug, Clone)]
pub struct Alert {
    /// Its name, part of each event's claim.
    pub name: String,
    /// What it watches.
    pub on: AlertOn,
    /// The webhook its events go to.
    pub webhook: String,
}

/// What an alert watches.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertOn {
    /// A quota's use crossing each of `thresholds` (percent of the limit), per key or per customer.
    Quota {
        /// Percentages, each 1 to 100.
        thresholds: Vec<u32>,
        /// Whose use.
        scope: AlertScope,
    },
    /// A key's credits falling below `below` (at most once a day per key).
    Credits {
        /// The level.
        below: u64,
    },
    /// A key's expiry coming within `within` seconds (once per key and expiry).
    Expiry {
        /// How long before the expiry.
        within: u64,
    },
}

/// Whose use a quota alert watches.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AlertScope {
    /// Each key's own (a key sharing its customer's limits watches the customer's count).
    Key,
    /// Each customer's, in plans that share limits by customer.
    Customer,
}

impl AlertScope {
    /// The scope named `name` (`key`, `customer`).
    pub fn named(name: &str) -> Option<Self> {
        match name {
            "key" => Some(Self::Key),
            "customer" => Some(Self::Customer),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Key => "key",
            Self::Customer => "customer",
        }
    }
}

/// A threshold crossed by an admitted request, as the request path saw it.
#[derive(Debug)]
pub(crate) struct Crossing {
    alert: usize,
    key_id: Box<str>,
    customer: Option<Box<str>>,
    plan_id: Arc<str>,
    counts_as: Arc<str>,
    what: Crossed,
    at: u64,
}

/// What was crossed.
#[derive(Debug)]
enum Crossed {
    /// `threshold` percent of a quota of `limit`, now at `used` in `window`.
    Quota {
        threshold: u32,
        used: u64,
        limit: u32,
        window: QuotaWindow,
    },
    /// Credits fell to `balance`, below `below`.
    Credits { balance: u64, below: u64 },
}

/// Crossings waiting for the alerts task: more than a burst of keys crossing at once would fill.
const QUEUE: usize = 4096;

/// The request path's side of alerts: the configured ones, and where crossings go.
#[derive(Debug)]
pub(crate) struct Alerts {
    alerts: Vec<Alert>,
    crossings: Option<mpsc::Sender<Crossing>>,
}

impl Alerts {
    /// `alerts`, and the receiving end of their crossings (none without alerts).
    pub(crate) fn new(alerts: Vec<Alert>) -> (Self, Option<mpsc::Receiver<Crossing>>) {
        if alerts.is_empty() {
            return (
                Self {
                    alerts,
                    crossings: None,
                },
                None,
            );
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        (
            Self {
                alerts,
                crossings: Some(tx),
            },
            Some(rx),
        )
    }

    /// Notes the thresholds `admission` crossed at `now`. Without alerts, one test; a plan in
    /// shadow alerts nothing (what it counts is not spent).
    pub(crate) fn admitted(&self, admission: &Admission<'_>, now: u64) {
        let Some(tx) = &self.crossings else {
            return;
        };
        let Some(m) = admission.membership.as_ref().filter(|m| !m.shadow()) else {
            return;
        };
        let cost = u64::from(admission.route.cost);
        if cost == 0 {
            return;
        }
        let customer = m.customer();
        let send = |alert: usize, what: Crossed| {
            let crossing = Crossing {
                alert,
                key_id: m.key_id.into(),
                customer: customer.map(Into::into),
                plan_id: m.plan_id().clone(),
                counts_as: m.counts_as().clone(),
                what,
                at: now,
            };
            if tx.try_send(crossing).is_err() {
                tracing::error!(alert = %self.alerts[alert].name, key = %m.key_id,
                    "alert queue full: this crossing is not alerted");
            }
        };
        for (i, alert) in self.alerts.iter().enumerate() {
            match &alert.on {
                AlertOn::Quota { thresholds, scope } => {
                    let (Some(q), Some(quota)) = (admission.limits.quota, m.quota()) else {
                        continue;
                    };
                    if *scope == AlertScope::Customer && customer.is_none() {
                        continue;
                    }
                    let used = u64::from(q.limit).saturating_sub(u64::from(q.remaining));
                    let before = used.saturating_sub(cost);
                    for &threshold in thresholds {
                        // The request that brings the use to t% of the limit (rounded up) crosses it.
                        let level = (u64::from(q.limit) * u64::from(threshold)).div_ceil(100);
                        if before < level && level <= used {
                            let window = quota.window(EpochDay::from_nanos(now));
                            let limit = q.limit;
                            send(
                                i,
                                Crossed::Quota {
                                    threshold,
                                    used,
                                    limit,
                                    window,
                                },
                            );
                        }
                    }
                }
                AlertOn::Credits { below } => {
                    let Some(c) = admission.limits.credits else {
                        continue;
                    };
                    if c.remaining < *below && c.remaining + cost >= *below {
                        let (balance, below) = (c.remaining, *below);
                        send(i, Crossed::Credits { balance, below });
                    }
                }
                AlertOn::Expiry { .. } => {}
            }
        }
    }
}

/// Makes an event of each crossing and claims it, until the gateway's alerts are dropped.
pub(crate) async fn claim_loop(shared: Arc<Shared>, mut crossings: mpsc::Receiver<Crossing>) {
    while let Some(crossing) = crossings.recv().await {
        let shared = shared.clone();
        let claimed = tokio::task::spawn_blocking(move || claim(&shared, &crossing)).await;
        if let Ok(Err(err)) | Err(err) = claimed.map_err(|e| e.to_string()) {
            tracing::error!(error = %err, "an alert could not be claimed in the store");
        }
    }
}

/// The event of `c`, queued once across the fleet. Blocking.
fn claim(shared: &Shared, c: &Crossing) -> Result<(), String> {
    let alert = &shared.alerts.alerts[c.alert];
    let key = shared.store.key(&c.key_id).map_err(|e| e.to_string())?;
    let snap = shared.snapshot.load();
    let plan_name = snap
        .plan_names()
        .find(|(id, _)| ***id == *c.plan_id)
        .map(|(_, name)| name.to_string());
    let secs = epoch_secs(c.at);
    let customer = c
        .customer
        .as_deref()
        .or(key.as_ref().and_then(|k| k.customer_id.as_deref()));
    let (claim, mut body) = match (&alert.on, &c.what) {
        (
            AlertOn::Quota { scope, .. },
            Crossed::Quota {
                threshold,
                used,
                limit,
                window,
            },
        ) => {
            let scope_id = match scope {
                AlertScope::Key => &*c.key_id,
                AlertScope::Customer => c.customer.as_deref().unwrap_or_default(),
            };
            let claim = format!(
                "quota|{}|{}|{scope_id}|{}|{}|{threshold}",
                alert.name,
                scope.name(),
                c.counts_as,
                window.start,
            );
            let body = json!({
                "type": "quota.threshold",
                "scope": scope.name(),
                "threshold": threshold,
                "used": used,
                "limit": limit,
                "periodStart": window.start.to_string(),
                "periodEnd": window.end.to_string(),
            });
            (claim, body)
        }
        (AlertOn::Credits { .. }, Crossed::Credits { balance, below }) => {
            let day = EpochDay::from_nanos(c.at);
            let claim = format!("credits|{}|{}|{day}", alert.name, c.key_id);
            let body = json!({
                "type": "credits.low",
                "scope": "key",
                "threshold": below,
                "balance": balance,
            });
            (claim, body)
        }
        _ => return Ok(()),
    };
    let extra = json!({
        "alert": alert.name,
        "keyId": &*c.key_id,
        "keyName": key.as_ref().map(|k| &k.name),
        "customerId": customer,
        "usagePlanId": &*c.plan_id,
        "usagePlanName": plan_name,
    });
    merge(&mut body, extra);
    queue(shared, alert, &claim, body, secs)
}

/// Adds `more`'s fields to `body`.
fn merge(body: &mut serde_json::Value, more: serde_json::Value) {
    if let (Some(body), serde_json::Value::Object(more)) = (body.as_object_mut(), more) {
        body.extend(more);
    }
}

/// Queues `body` as the event `claim` names, sent to `alert`'s webhook, once. Blocking.
fn queue(
    shared: &Shared,
    alert: &Alert,
    claim: &str,
    mut body: serde_json::Value,
    secs: i64,
) -> Result<(), String> {
    let id = event_id(claim);
    merge(&mut body, json!({ "id": id, "time": rfc3339_secs(secs) }));
    let event = OutboxEvent {
        id,
        webhook: alert.webhook.clone(),
        body: body.to_string(),
        created: secs,
        attempts: 0,
        next_at: secs,
        status: EventStatus::Pending,
        last_error: None,
    };
    shared
        .store
        .enqueue_event(claim, &event)
        .map(drop)
        .map_err(|e| e.to_string())
}

/// How often keys are looked at for expiry alerts.
const EXPIRY_SCAN: std::time::Duration = std::time::Duration::from_secs(60);

/// Fires the expiry alerts: at start, then every minute, each key whose expiry comes within an
/// alert's `within` (and has not passed) fires once per alert and expiry.
pub(crate) async fn expiry_loop(shared: Arc<Shared>) {
    if !shared
        .alerts
        .alerts
        .iter()
        .any(|a| matches!(a.on, AlertOn::Expiry { .. }))
    {
        return;
    }
    let mut ticker = tokio::time::interval(EXPIRY_SCAN);
    loop {
        ticker.tick().await;
        let shared = shared.clone();
        let done = tokio::task::spawn_blocking(move || expiring(&shared)).await;
        if let Ok(Err(err)) | Err(err) = done.map_err(|e| e.to_string()) {
            tracing::error!(error = %err, "expiry alerts could not be claimed in the store");
        }
    }
}

/// Claims the expiry alerts due now. Blocking.
fn expiring(shared: &Shared) -> Result<(), String> {
    let now = shared.clock.now();
    let secs = epoch_secs(now);
    // Held across store calls: an owned snapshot, not a guard.
    let snap = shared.snapshot.load_full();
    for alert in &shared.alerts.alerts {
        let AlertOn::Expiry { within } = alert.on else {
            continue;
        };
        let until = now.saturating_add(within.saturating_mul(NANOS_PER_SEC));
        for (key_id, at) in snap.expiring(now, until) {
            let claim = format!("expiry|{}|{key_id}|{at}", alert.name);
            let key = shared.store.key(key_id).map_err(|e| e.to_string())?;
            let at_secs = epoch_secs(at);
            let body = json!({
                "type": "key.expiring",
                "alert": alert.name,
                "scope": "key",
                "keyId": key_id,
                "keyName": key.as_ref().map(|k| &k.name),
                "customerId": key.as_ref().and_then(|k| k.customer_id.as_deref()),
                "expiresAt": rfc3339_secs(at_secs),
            });
            queue(shared, alert, &claim, body, secs)?;
        }
    }
    Ok(())
}
