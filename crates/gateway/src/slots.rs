//! Live state that survives rebuilds: each (key, plan) membership's bucket, quota count and meter in
//! a numbered slot, and the token buckets that outlive a snapshot.
//!
//! A slot holds 48 bytes of atomics in chunked arrays shared by successive snapshots and keeps its
//! number across rebuilds, so a change of records neither refills buckets nor loses counts. A slot a
//! membership gives up is retired, and handed out again only once the flusher has taken its last
//! counts and no snapshot that could still count into it is in use. The request path only touches
//! atomics; rebuilds and the flusher take the book's lock.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, Weak};

use tollgate_core::ThrottleSettings;
use tollgate_core::credits::{Credits, Refill};
use tollgate_core::gcra::{Gcra, GcraState, ThrottleDecision};
use tollgate_core::quota::{EpochDay, QuotaCount};

use crate::meter::{Counted, DailyMeter, LastSeen};

/// One token bucket with its own state: the stage, account and per-method throttles.
#[derive(Debug, Clone)]
pub(crate) struct Bucket {
    pub(crate) gcra: Gcra,
    /// Shared with the same bucket in the snapshot this one replaced (carried over in place when its
    /// limits change), so a change of records does not refill anyone's bucket.
    pub(crate) state: Arc<GcraState>,
}

impl Bucket {
    /// A bucket for `settings`; with the bucket it replaces, it keeps that bucket's tokens.
    pub(crate) fn new(settings: ThrottleSettings, previous: Option<&Bucket>, now: u64) -> Self {
        let gcra = Gcra::new(settings);
        let state = match previous {
            Some(old) if old.gcra == gcra => old.state.clone(),
            Some(old) => {
                gcra.carry_over(&old.gcra, &old.state, now);
                old.state.clone()
            }
            None => Arc::default(),
        };
        Self { gcra, state }
    }

    /// Takes a token at `now`.
    pub(crate) fn check(&self, now: u64) -> ThrottleDecision {
        self.gcra.check(&self.state, now)
    }

    /// Gives back a token taken for a request refused further on.
    pub(crate) fn refund(&self) {
        self.gcra.refund(&self.state);
    }
}

/// A key's credits on this instance, shared by successive snapshots (a change of records keeps the
/// balance): the balance and its last refill, and what was spent and refilled since the flusher
/// last took them.
#[derive(Debug, Default)]
pub(crate) struct KeyCredits {
    pub(crate) credits: Credits,
    /// What plans in shadow spend instead (never written to the ledger): it starts from the
    /// balance and follows its top-ups.
    pub(crate) shadow: Credits,
    pub(crate) spent: DailyMeter,
    /// Rare events the flusher writes: spending displaced by a new day, and refills (the period's
    /// first day, what was added).
    pending: Mutex<CreditEvents>,
}

/// What a key's credits owe the ledger, besides today's spending.
#[derive(Debug, Default)]
pub(crate) struct CreditEvents {
    pub(crate) spent: Vec<(EpochDay, u64)>,
    pub(crate) refills: Vec<(EpochDay, u64)>,
}

impl KeyCredits {
    /// Credits holding `balance`, last refilled in the period starting on `refilled`.
    pub(crate) fn new(balance: u64, refilled: Option<EpochDay>) -> Self {
        Self {
            credits: Credits::new(balance, refilled),
            shadow: Credits::new(balance, refilled),
            ..Self::default()
        }
    }

    /// The credits a plan spends: the balance, or in shadow its own.
    pub(crate) fn spent_by(&self, shadow: bool) -> &Credits {
        if shadow { &self.shadow } else { &self.credits }
    }

    /// Adds `n` credits (a top-up), to the balance and to what plans in shadow spend.
    pub(crate) fn add(&self, n: u64) {
        self.credits.add(n);
        self.shadow.add(n);
    }

    /// Records `cost` spent at `now`.
    pub(crate) fn spent(&self, cost: u32, now: u64) {
        if cost == 0 {
            return;
        }
        let recorded = self.spent.record(EpochDay::from_nanos(now), cost);
        if let Some(displaced) = recorded.displaced {
            lock(&self.pending).spent.push(displaced);
        }
    }

    /// Brings the balance up to `refill`'s amount when this period's refill is due, and notes it
    /// for the ledger.
    pub(crate) fn refill(&self, refill: &Refill, now: u64) {
        if let Some(done) = self.credits.refill(refill, now) {
            lock(&self.pending).refills.push(done);
        }
    }

    /// Takes what the ledger has not been told yet.
    pub(crate) fn take(&self) -> CreditEvents {
        let mut events = std::mem::take(&mut *lock(&self.pending));
        events.spent.extend(self.spent.take());
        events
    }
}

/// A key's credits as a snapshot serves them: the live state, and the key's refill.
#[derive(Debug, Clone)]
pub(crate) struct KeyAccount {
    pub(crate) live: Arc<KeyCredits>,
    pub(crate) refill: Option<Refill>,
}

/// The live state of one membership: what its requests change.
#[derive(Debug, Default)]
pub(crate) struct Live {
    /// The plan's bucket (per-method buckets are [`Bucket`]s of their own).
    pub(crate) bucket: GcraState,
    pub(crate) quota: QuotaCount,
    /// Per [`Counted`] kind.
    pub(crate) meters: [DailyMeter; 3],
    pub(crate) seen: LastSeen,
}

impl Live {
    /// Whether the flusher has taken everything counted here.
    fn is_taken(&self) -> bool {
        self.meters.iter().all(DailyMeter::is_empty) && self.seen.is_empty()
    }
}

const CHUNK_BITS: u32 = 12;
const CHUNK_LEN: usize = 1 << CHUNK_BITS;

/// Slot numbers index chunks of this many [`Live`]s: growing never moves a slot.
pub(crate) type Chunk = Arc<[Live]>;

/// The live state of slot `slot`.
pub(crate) fn live_at(chunks: &[Chunk], slot: u32) -> &Live {
    &chunks[(slot >> CHUNK_BITS) as usize][slot as usize & (CHUNK_LEN - 1)]
}

/// A slot no membership holds any more, kept with its owner's ids until the flusher has taken its
/// last counts and no snapshot that could still count into it is in use.
#[derive(Debug)]
pub(crate) struct Retired {
    pub(crate) plan_id: Arc<str>,
    /// The key's id, or the customer's when `customer`.
    pub(crate) id: Box<str>,
    pub(crate) customer: bool,
    pub(crate) seen_by: Weak<Epoch>,
}

impl Retired {
    /// Whose counts the slot held.
    pub(crate) fn holder(&self) -> tollgate_store::Holder<'_> {
        if self.customer {
            tollgate_store::Holder::Customer(&self.id)
        } else {
            tollgate_store::Holder::Key(&self.id)
        }
    }
}

/// Which slots are taken. Rebuilds and the flusher lock it, never the request path.
#[derive(Debug, Default)]
pub(crate) struct SlotBook {
    pub(crate) chunks: Vec<Chunk>,
    pub(crate) len: u32,
    free: Vec<u32>,
    pub(crate) retired: HashMap<u32, Retired>,
    /// Slot → who holds it in the latest snapshot, as the snapshot encodes it ([`NO_OWNER`]: none).
    pub(crate) owners: Vec<u64>,
}

/// [`SlotBook::owners`] of a slot no one holds.
pub(crate) const NO_OWNER: u64 = u64::MAX;

impl SlotBook {
    /// A slot for a new membership: a free one, else the next (a new chunk when the last is full).
    pub(crate) fn allocate(&mut self) -> u32 {
        if let Some(slot) = self.free.pop() {
            return slot;
        }
        if self.len as usize == self.chunks.len() * CHUNK_LEN {
            self.chunks
                .push((0..CHUNK_LEN).map(|_| Live::default()).collect());
        }
        self.len += 1;
        self.len - 1
    }

    /// Records who holds slot `slot` now.
    pub(crate) fn own(&mut self, slot: u32, owner: u64) {
        let at = slot as usize;
        if at >= self.owners.len() {
            self.owners.resize(at + 1, NO_OWNER);
        }
        self.owners[at] = owner;
    }

    /// Frees the retired slots whose counts are all taken and that no snapshot in use can reach. A
    /// slot is handed to a new membership only then, so no count is ever booked to the wrong one.
    pub(crate) fn reclaim(&mut self) {
        let (chunks, free) = (&self.chunks, &mut self.free);
        self.retired.retain(|&slot, retired| {
            let live = live_at(chunks, slot);
            let done = retired.seen_by.strong_count() == 0 && live.is_taken();
            if done {
                live.bucket.reset();
                free.push(slot);
            }
            !done
        });
    }
}

/// Counts the flusher has not taken: slots queued by their first count or sight since the last take
/// (the flusher visits these, not a million memberships every second; a slot may be queued once per
/// meter), and counts of an earlier day a rollover displaced.
#[derive(Debug, Default)]
pub(crate) struct Metered {
    pub(crate) slots: Vec<u32>,
    pub(crate) displaced: Vec<(u32, Counted, EpochDay, u64)>,
}

/// The live state shared by a gateway's successive snapshots.
#[derive(Debug, Default)]
pub(crate) struct Slots {
    pub(crate) book: Mutex<SlotBook>,
    pub(crate) metered: Mutex<Metered>,
}

impl Slots {
    /// Counts `n` of kind `counted` in slot `slot` (whose state is `live`) at `now`, queueing
    /// the slot for the flusher on that meter's first count since the last take.
    pub(crate) fn count(&self, slot: u32, live: &Live, counted: Counted, n: u32, now: u64) {
        if n == 0 {
            return;
        }
        let recorded = live.meters[counted as usize].record(EpochDay::from_nanos(now), n);
        if recorded.first || recorded.displaced.is_some() {
            let mut metered = lock(&self.metered);
            if recorded.first {
                metered.slots.push(slot);
            }
            if let Some((day, count)) = recorded.displaced {
                metered.displaced.push((slot, counted, day, count));
            }
        }
    }

    /// Notes that slot `slot`'s key was presented at `now`, queueing the slot when the minute moved.
    pub(crate) fn saw(&self, slot: u32, live: &Live, now: u64) {
        if live.seen.saw(now) {
            lock(&self.metered).slots.push(slot);
        }
    }
}

/// `m`'s guard, whether or not a holder panicked (the state stays consistent: every update under
/// these locks is a single push or swap).
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One per snapshot. Each holds on to its successor's, so a snapshot's epoch stays alive while it or
/// any older snapshot is in use: what a retired slot waits for.
#[derive(Debug, Default)]
pub(crate) struct Epoch {
    pub(crate) newer: OnceLock<Arc<Epoch>>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_grow_by_chunks_and_never_move() {
        let mut book = SlotBook::default();
        let first: Vec<u32> = (0..CHUNK_LEN as u32 + 1).map(|_| book.allocate()).collect();
        assert_eq!(first, (0..CHUNK_LEN as u32 + 1).collect::<Vec<_>>());
        assert_eq!(book.chunks.len(), 2);
        let before: *const Live = live_at(&book.chunks, 5);
        book.allocate();
        assert!(std::ptr::eq(before, live_at(&book.chunks, 5)));
    }

    #[test]
    fn a_retired_slot_is_freed_once_unseen_and_flushed() {
        let slots = Slots::default();
        let mut book = lock(&slots.book);
        let slot = book.allocate();
        let epoch = Arc::new(Epoch::default());
        book.retired.insert(
            slot,
            Retired {
                plan_id: "p".into(),
                id: "k".into(),
                customer: false,
                seen_by: Arc::downgrade(&epoch),
            },
        );
        let live = live_at(&book.chunks, slot);
        slots.count(slot, live, Counted::Admitted, 1, 0);
        slots.count(slot, live, Counted::Admitted, 1, 0);
        assert_eq!(lock(&slots.metered).slots, vec![slot], "queued once");

        // Still seen by a snapshot, and holding a count: kept.
        book.reclaim();
        assert_ne!(book.allocate(), slot);
        drop(epoch);
        book.reclaim();
        assert!(book.retired.contains_key(&slot), "its count is not taken");
        assert!(live_at(&book.chunks, slot).meters[0].take().is_some());
        slots.saw(
            slot,
            live_at(&book.chunks, slot),
            1_800_000_000 * 1_000_000_000,
        );
        book.reclaim();
        assert!(
            book.retired.contains_key(&slot),
            "its last sight is not taken"
        );
        assert!(live_at(&book.chunks, slot).seen.take().is_some());
        book.reclaim();
        assert!(book.retired.is_empty());
        assert_eq!(book.allocate(), slot, "handed out again");
    }
}
