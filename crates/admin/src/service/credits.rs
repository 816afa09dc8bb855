//! Prepaid credits: top-ups, added once per idempotency key, and the balance GetApiKey shows.

use std::collections::HashMap;
use std::sync::Arc;

use tollgate_core::ApiKey;
use tollgate_core::credits::{MAX_CREDITS, refilled_by};
use tollgate_store::{OPENING_CREDITS, ids};

use super::{Admin, Written, to_the_end};
use crate::error::{AdminError, bad, unknown_key};
use crate::wire::{CreditsAdded, CreditsIn, CreditsOut, RefillOut};

/// The longest idempotency key taken (Stripe's limit).
const MAX_IDEMPOTENCY_KEY: usize = 255;

impl Admin {
    /// tollgate's AddCredits: adds `add` credits to key `id` once per idempotency key (a key used
    /// before for this API key adds nothing, and says so). Without one, every call adds.
    pub async fn add_credits(
        self: &Arc<Self>,
        id: &str,
        input: CreditsIn,
    ) -> Result<CreditsAdded, AdminError> {
        let add = input
            .add
            .filter(|n| (0..=MAX_CREDITS as i64).contains(n))
            .ok_or_else(|| {
                bad(format!(
                    "Invalid add: give the credits to add, a whole number from 0 to {MAX_CREDITS}"
                ))
            })?;
        let add = u64::try_from(add).unwrap_or(0);
        let idempotency_key = match input.idempotency_key {
            Some(k) if k.is_empty() || k.chars().count() > MAX_IDEMPOTENCY_KEY => {
                return Err(bad(format!(
                    "Invalid idempotencyKey: 1 to {MAX_IDEMPOTENCY_KEY} characters"
                )));
            }
            Some(k) if k == OPENING_CREDITS || refilled_by(&k).is_some() => {
                return Err(bad(format!(
                    "Invalid idempotencyKey {k:?}: tollgate keeps it for its own entries"
                )));
            }
            Some(k) => k,
            None => format!("api-{}", ids::new_key_value()),
        };
        let now = self.now_secs();
        let admin = Arc::clone(self);
        let id = id.to_owned();
        // The ledger and the live balance change together, even if the caller goes away.
        to_the_end(async move {
            let mut plans = admin.lock_plans().await;
            let served = admin.gateway.served();
            let (key, added, stored) = admin
                .blocking(move |admin| {
                    let mut key = admin.store.key(&id)?.ok_or_else(unknown_key)?;
                    if served.plans_of(&id).is_empty() {
                        return Err(bad(format!(
                            "API key {id} is in no usage plan: its requests spend credits through a plan; add it to one first"
                        )));
                    }
                    if !key.credits {
                        // Announced as a change of the key: every instance then spends its credits.
                        key.credits = true;
                        key.last_updated_date = now;
                        admin.store.put_key(&key)?;
                    }
                    let added = admin.store.add_credits(&id, &idempotency_key, add, now)?;
                    Ok((key, added, admin.store.credit_balance(&id)?))
                })
                .await?;
            if added && !admin.gateway.add_credits(&key.id, add) {
                // New to credits here: served from its stored balance.
                let credits: HashMap<_, _> = stored.map(|b| (key.id.clone(), b)).into_iter().collect();
                admin
                    .serve_store_with(&mut plans, Written::Keys(vec![key.id.clone()]), credits)
                    .await?;
            }
            drop(plans);
            let credits = admin
                .blocking({
                    let key = key.clone();
                    move |admin| admin.credits_out(&key)
                })
                .await?
                .unwrap_or_default();
            Ok(CreditsAdded {
                id: key.id,
                added,
                credits,
            })
        })
        .await
    }

    /// Key `key`'s credits, when it holds some: the exact balance (this instance's on the embedded
    /// store, where it is live; Redis's in cluster mode), and its refill. Blocking.
    pub(super) fn credits_out(&self, key: &ApiKey) -> Result<Option<CreditsOut>, AdminError> {
        let refill = key.refill();
        if !key.credits && refill.is_none() {
            return Ok(None);
        }
        let live = self
            .gateway
            .shared_store()
            .is_none()
            .then(|| self.gateway.credit_balance(&key.id))
            .flatten();
        let balance = match live {
            Some(b) => b,
            None => self.store.credit_balance(&key.id)?.map_or(0, |b| b.balance),
        };
        Ok(Some(CreditsOut {
            balance,
            refill: refill.map(|r| RefillOut {
                amount: r.amount,
                period: r.period.to_string(),
            }),
        }))
    }
}
