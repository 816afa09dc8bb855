//! Alerts: events fired when a key (or a customer whose keys share a plan's limits) crosses a
//! threshold of its quota. The request path only compares numbers and, on a crossing, hands it to a
//! task; the task makes the event and claims it in the store, where the claim is unique per (alert,
//! scope, plan, period, threshold), so each fires once across a fleet, whoever crossed first, and
//! never again in that period (UpdateUsage giving a key back what it had does not re-fire it). The
//! claimed event waits in the outbox for [`crate::webhooks`].

use std::sync::Arc;

use serde_json::json;
use tokio::sync::mpsc;
use tollgate_core::clock::NANOS_PER_SEC;
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
    threshold: u32,
    key_id: Box<str>,
    customer: Option<Box<str>>,
    plan_id: Arc<str>,
    counts_as: Arc<str>,
    used: u64,
    limit: u32,
    window: QuotaWindow,
    at: u64,
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

    /// Notes the thresholds `admission` crossed at `now`. Without alerts, one test.
    pub(crate) fn admitted(&self, admission: &Admission<'_>, now: u64) {
        let Some(tx) = &self.crossings else {
            return;
        };
        let (Some(m), Some(q)) = (&admission.membership, admission.limits.quota) else {
            return;
        };
        let Some(quota) = m.quota() else {
            return;
        };
        let used = u64::from(q.limit).saturating_sub(u64::from(q.remaining));
        let before = used.saturating_sub(u64::from(admission.route.cost));
        if before == used {
            return;
        }
        for (i, alert) in self.alerts.iter().enumerate() {
            let AlertOn::Quota { thresholds, scope } = &alert.on;
            let customer = m.customer();
            if *scope == AlertScope::Customer && customer.is_none() {
                continue;
            }
            for &t in thresholds {
                // The request that brings the use to t% of the limit (rounded up) crosses it.
                let level = (u64::from(q.limit) * u64::from(t)).div_ceil(100);
                if before < level && level <= used {
                    let crossing = Crossing {
                        alert: i,
                        threshold: t,
                        key_id: m.key_id.into(),
                        customer: customer.map(Into::into),
                        plan_id: m.plan_id().clone(),
                        counts_as: m.counts_as().clone(),
                        used,
                        limit: q.limit,
                        window: quota.window(EpochDay::from_nanos(now)),
                        at: now,
                    };
                    if tx.try_send(crossing).is_err() {
                        tracing::error!(alert = %alert.name, threshold = t, key = %m.key_id,
                            "alert queue full: this crossing is not alerted");
                    }
                }
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
    let AlertOn::Quota { scope, .. } = &alert.on;
    let scope_id = match scope {
        AlertScope::Key => &*c.key_id,
        AlertScope::Customer => c.customer.as_deref().unwrap_or_default(),
    };
    let claim = format!(
        "quota|{}|{}|{scope_id}|{}|{}|{}",
        alert.name,
        scope.name(),
        c.counts_as,
        c.window.start,
        c.threshold
    );
    let id = event_id(&claim);
    let key = shared.store.key(&c.key_id).map_err(|e| e.to_string())?;
    let snap = shared.snapshot.load();
    let plan_name = snap
        .plan_names()
        .find(|(id, _)| ***id == *c.plan_id)
        .map(|(_, name)| name.to_string());
    let secs = i64::try_from(c.at / NANOS_PER_SEC).unwrap_or(i64::MAX);
    let body = json!({
        "id": id,
        "type": "quota.threshold",
        "alert": alert.name,
        "scope": scope.name(),
        "threshold": c.threshold,
        "keyId": &*c.key_id,
        "keyName": key.as_ref().map(|k| &k.name),
        "customerId": c.customer.as_deref().or(key.as_ref().and_then(|k| k.customer_id.as_deref())),
        "usagePlanId": &*c.plan_id,
        "usagePlanName": plan_name,
        "used": c.used,
        "limit": c.limit,
        "periodStart": c.window.start.to_string(),
        "periodEnd": c.window.end.to_string(),
        "time": rfc3339_secs(secs),
    });
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
        .enqueue_event(&claim, &event)
        .map(drop)
        .map_err(|e| e.to_string())
}
