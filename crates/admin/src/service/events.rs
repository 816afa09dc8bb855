//! The outbox as operators see it: pending and failed events, a failed one retried, and a test
//! event sent to a webhook.

use std::sync::Arc;

use serde_json::{Value, json};
use tollgate_store::{EventStatus, OutboxEvent, ids};

use tollgate_core::event::rfc3339_secs;

use super::Admin;
use crate::error::{AdminError, bad};

/// The most events one listing answers.
const EVENTS_LISTED: usize = 500;

impl Admin {
    /// The events with `status` (`pending` or `failed`), oldest first.
    pub async fn events(self: &Arc<Self>, status: Option<&str>) -> Result<Value, AdminError> {
        let status = match status {
            None => EventStatus::Failed,
            Some(name) => EventStatus::named(name)
                .ok_or_else(|| bad(format!("Invalid status {name:?}: pending or failed")))?,
        };
        let events = self
            .blocking(move |admin| Ok(admin.store.events(status, EVENTS_LISTED)?))
            .await?;
        Ok(json!({ "item": events.iter().map(event_out).collect::<Vec<_>>() }))
    }

    /// Makes failed event `id` due again now.
    pub async fn retry_event(self: &Arc<Self>, id: &str) -> Result<Value, AdminError> {
        let (id, now) = (id.to_owned(), self.now_secs());
        let retried = self
            .blocking({
                let id = id.clone();
                move |admin| Ok(admin.store.retry_event(&id, now)?)
            })
            .await?;
        if !retried {
            return Err(AdminError::NotFound(format!(
                "Invalid event identifier specified: no failed event {id}"
            )));
        }
        Ok(json!({ "id": id, "status": "pending" }))
    }

    /// Queues a `webhook.test` event for webhook `name`, so that its receiver can be tried.
    pub async fn test_webhook(self: &Arc<Self>, name: &str) -> Result<Value, AdminError> {
        if !self.settings.webhooks.iter().any(|w| w == name) {
            return Err(AdminError::NotFound(format!(
                "Invalid webhook specified: no webhook {name:?} is configured"
            )));
        }
        let now = self.now_secs();
        let id = format!("evt_{}", ids::new_key_value());
        let body = json!({
            "id": id,
            "type": "webhook.test",
            "webhook": name,
            "time": rfc3339_secs(now),
        });
        let event = OutboxEvent {
            id: id.clone(),
            webhook: name.to_owned(),
            body: body.to_string(),
            created: now,
            attempts: 0,
            next_at: now,
            status: EventStatus::Pending,
            last_error: None,
        };
        self.blocking(move |admin| Ok(admin.store.enqueue_event(&event.id.clone(), &event)?))
            .await?;
        Ok(json!({ "id": id, "status": "pending" }))
    }
}

/// An event as listed: where it stands, and the event itself.
fn event_out(e: &OutboxEvent) -> Value {
    json!({
        "id": e.id,
        "webhook": e.webhook,
        "status": e.status,
        "attempts": e.attempts,
        "created": e.created,
        "nextAt": e.next_at,
        "lastError": e.last_error,
        "event": serde_json::from_str::<Value>(&e.body).unwrap_or(Value::Null),
    })
}
