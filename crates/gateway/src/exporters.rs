//! Usage exporters: what each key (or customer, where a plan shares limits by customer) was
//! admitted per plan and window, written to files, sent to a CloudEvents endpoint (OpenMeter's
//! ingest) or to Stripe's Billing Meter Events.
//!
//! A window's records are what the store's per-day totals (those GetUsage reads) gained since the
//! exporter's marks of that day, so a day's records add up to its totals exactly, whichever
//! instance made them and however often instances restarted. A window is made once its counts
//! have settled (two flush intervals after it ends). Its records, the new marks and the exporter's
//! cursor are committed together, and only while the exporter's version is the one they were
//! computed from, so two instances never both make a window. Records stay in the store until
//! delivered (at least once), and for 40 days after for replays; each carries an id made from its
//! holder, plan and window, which Stripe (`identifier`) and OpenMeter (CloudEvents `id`)
//! deduplicate on.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::watch;
use tollgate_core::clock::epoch_secs;
use tollgate_core::event::{hashed_id, rfc3339_secs};
use tollgate_core::quota::{EpochDay, SECS_PER_DAY};
use tollgate_core::sharing::customer_of;
use tollgate_core::{ApiKey, UsagePlan};
use tollgate_store::{
    ExportBatch, ExportCommit, ExportMark, Memberships, Records, Series, Store, StoreError,
};

use crate::state::Shared;
use crate::tls::ClientTls;
use crate::webhooks::{post_to, sent};

/// The tag naming a key's Stripe customer, where it is not the key's `customerId`.
pub const STRIPE_CUSTOMER_TAG: &str = "tollgate:stripeCustomerId";

/// How long batches and marks are kept: past the 35 days Stripe takes meter events for.
const KEEP_SECS: i64 = 40 * SECS_PER_DAY;

/// The longest a failing exporter waits before it tries to deliver again.
const MAX_BACKOFF: i64 = 300;

/// A configured exporter.
#[derive(Debug, Clone)]
pub struct Exporter {
    /// Its name: its state in the store, and `tollgate usage export --exporter`.
    pub name: String,
    /// Where its records go.
    pub sink: Sink,
    /// Its windows' length in seconds (a day is a whole number of them).
    pub interval: i64,
}

/// Where an exporter's records go.
#[derive(Debug, Clone)]
pub enum Sink {
    /// A file per window in `dir`.
    File {
        /// The directory.
        dir: PathBuf,
        /// What each file holds.
        format: FileFormat,
    },
    /// A CloudEvents 1.0 structured-mode batch per window, POSTed to `url`.
    CloudEvents {
        /// Where (OpenMeter: `…/api/v1/events`).
        url: String,
        /// Sent as a bearer token, when set.
        secret: Option<String>,
        /// The events' `type` (OpenMeter's meter `eventType`).
        event_type: String,
        /// What `https` URLs are trusted with (`upstreamTls`).
        tls: Arc<ClientTls>,
    },
    /// A Billing Meter Event per record, POSTed to `url`'s `/v1/billing/meter_events`.
    Stripe {
        /// Stripe's API (`https://api.stripe.com`).
        url: String,
        /// The secret key.
        secret: String,
        /// The meter's `event_name`.
        event_name: String,
        /// What `https` URLs are trusted with (`upstreamTls`).
        tls: Arc<ClientTls>,
    },
}

/// What an exporter's files hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileFormat {
    /// A JSON record per line.
    Ndjson,
    /// A header line, then a record per line.
    Csv,
}

impl FileFormat {
    /// Each format by its name in the config.
    pub const NAMES: [(&'static str, Self); 2] = [("ndjson", Self::Ndjson), ("csv", Self::Csv)];

    fn extension(self) -> &'static str {
        match self {
            Self::Ndjson => "ndjson",
            Self::Csv => "csv",
        }
    }
}

/// One holder's counts under one plan in one window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageRecord {
    /// Made from the holder, the plan and the window: the same whenever it is made or sent.
    pub id: String,
    /// The usage plan.
    pub usage_plan_id: String,
    /// The API key, for a key's record.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// The customer: a customer's record, or the key's `customerId`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    /// The Stripe customer it is billed to (the tag `tollgate:stripeCustomerId`, else the
    /// `customerId`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stripe_customer_id: Option<String>,
    /// The window's start, RFC 3339.
    pub window_start: String,
    /// Its end (exclusive).
    pub window_end: String,
    /// Admitted: the routes' cost.
    pub value: u64,
    /// Refused by a throttle.
    pub throttled: u64,
    /// Refused for the spent quota.
    pub quota_exceeded: u64,
}

/// The customers whose keys share each plan's limits, with their keys' ids: an exporter reads
/// their counts as one.
#[derive(Debug, Default)]
pub struct Customers(HashMap<String, BTreeMap<String, Vec<String>>>);

impl Customers {
    /// Those `memberships` serves, for `plans`.
    pub fn served(memberships: &dyn Memberships, plans: &[UsagePlan]) -> Self {
        let mut of = HashMap::new();
        for plan in plans.iter().filter(|p| p.limits_share_by().is_some()) {
            let customers = memberships
                .customers_of(&plan.id)
                .into_iter()
                .map(|(c, keys)| (c.to_owned(), keys.into_iter().map(str::to_owned).collect()))
                .collect();
            of.insert(plan.id.clone(), customers);
        }
        Self(of)
    }

    /// Those `records` hold.
    pub fn stored(records: &Records) -> Self {
        let keys: HashMap<&str, &ApiKey> = records.keys.iter().map(|k| (&*k.id, k)).collect();
        let mut of: HashMap<String, BTreeMap<String, Vec<String>>> = HashMap::new();
        for plan in records.plans.iter() {
            let Some(share_by) = plan.limits_share_by() else {
                continue;
            };
            let customers = of.entry(plan.id.clone()).or_default();
            for (_, key_id) in records.bindings.iter().filter(|(p, _)| *p == plan.id) {
                let customer = keys
                    .get(key_id.as_str())
                    .and_then(|k| customer_of(Some(share_by), k.customer_id.as_deref()));
                if let Some(c) = customer {
                    customers
                        .entry(c.to_owned())
                        .or_default()
                        .push(key_id.clone());
                }
            }
        }
        Self(of)
    }

    /// Plan `plan_id`'s customers, each with its keys (none: the plan does not share limits).
    fn of(&self, plan_id: &str) -> Option<&BTreeMap<String, Vec<String>>> {
        self.0.get(plan_id)
    }
}

/// A key's holder name in marks.
fn key_holder(key_id: &str) -> String {
    format!("k:{key_id}")
}

/// A customer's holder name in marks.
fn customer_holder(customer_id: &str) -> String {
    format!("c:{customer_id}")
}

/// (plan, holder) → admitted, throttled, refused for the quota.
type Totals = BTreeMap<(String, String), [u64; 3]>;

/// The totals of `day` for every holder with a count under `plans`.
fn totals(
    store: &dyn Store,
    plans: &[UsagePlan],
    customers: &Customers,
    day: EpochDay,
) -> Result<Totals, StoreError> {
    let mut out = Totals::new();
    for plan in plans {
        let mut of_key: BTreeMap<String, [u64; 3]> = BTreeMap::new();
        for (i, series) in [Series::Used, Series::Throttled, Series::QuotaExceeded]
            .into_iter()
            .enumerate()
        {
            for v in store.series(series, &plan.id, None, day, day)? {
                of_key.entry(v.key_id.clone()).or_default()[i] += v.count();
            }
        }
        let mut customer_of_key: HashMap<&str, &str> = HashMap::new();
        let mut of_customer: BTreeMap<String, [u64; 3]> = BTreeMap::new();
        if let Some(shared) = customers.of(&plan.id).filter(|c| !c.is_empty()) {
            for (c, keys) in shared {
                customer_of_key.extend(keys.iter().map(|k| (k.as_str(), c.as_str())));
            }
            let ids: Vec<&str> = shared.keys().map(String::as_str).collect();
            for v in store.customer_series(Series::Used, &plan.id, &ids, day, day)? {
                let count = v.count();
                of_customer.entry(v.key_id).or_default()[0] += count;
            }
        }
        for (key, counts) in of_key {
            match customer_of_key.get(key.as_str()) {
                // The customer's admitted count is its own (the keys' together); its refusals
                // are its keys'.
                Some(c) => {
                    let sum = of_customer.entry((*c).to_owned()).or_default();
                    sum[1] += counts[1];
                    sum[2] += counts[2];
                }
                None => {
                    out.insert((plan.id.clone(), key_holder(&key)), counts);
                }
            }
        }
        for (c, counts) in of_customer {
            out.insert((plan.id.clone(), customer_holder(&c)), counts);
        }
    }
    out.retain(|_, counts| counts.iter().any(|&c| c > 0));
    Ok(out)
}

/// What one window covers, and the state it is computed from.
#[derive(Debug, Clone, Copy)]
pub struct Window<'d> {
    /// Its start, epoch seconds.
    pub start: i64,
    /// Its end (exclusive).
    pub end: i64,
    /// The days whose totals it takes what they gained: its own last; one before it only where
    /// the exporter sent something of it (a day it never sent is a backfill's).
    pub days: &'d [EpochDay],
    /// The exporter's version it is computed from.
    pub version: u64,
    /// A live window moves the exporter's cursor to its end; a backfill's does not.
    pub live: bool,
}

/// Makes exporter `ex`'s records of `window` and commits them, with the new marks and (live) the
/// cursor: how many records, or `None` when another instance committed first. Blocking.
pub fn export_window(
    store: &dyn Store,
    ex: &Exporter,
    plans: &[UsagePlan],
    customers: &Customers,
    window: &Window<'_>,
    now: i64,
) -> Result<Option<usize>, StoreError> {
    let mut marks = Vec::new();
    let mut gained = Totals::new();
    for &day in window.days {
        let sent: HashMap<(String, String), [u64; 3]> = store
            .export_marks(&ex.name, day)?
            .into_iter()
            .map(|m| ((m.plan_id, m.holder), m.counts))
            .collect();
        if sent.is_empty() && Some(&day) != window.days.last() {
            continue;
        }
        for (at, counts) in totals(store, plans, customers, day)? {
            let before = sent.get(&at).copied().unwrap_or_default();
            if counts.iter().zip(before).all(|(&c, b)| c <= b) {
                continue;
            }
            let sum = gained.entry(at.clone()).or_default();
            for i in 0..3 {
                sum[i] += counts[i].saturating_sub(before[i]);
            }
            let (plan_id, holder) = at;
            marks.push(ExportMark {
                day,
                plan_id,
                holder,
                // A count never goes down; the larger keeps what was sent.
                counts: [0, 1, 2].map(|i| counts[i].max(before[i])),
            });
        }
    }
    let records = make_records(store, customers, &gained, window.start, window.end)?;
    let batch = match records.is_empty() {
        true => None,
        false => Some(ExportBatch {
            start: window.start,
            end: window.end,
            records: serde_json::to_string(&records)
                .map_err(|e| StoreError::Backend(e.to_string()))?,
            delivered: false,
        }),
    };
    let commit = ExportCommit {
        version: window.version,
        cursor: window.live.then_some(window.end),
        marks: &marks,
        batch: batch.as_ref(),
        keep_from: now.saturating_sub(KEEP_SECS),
    };
    Ok(store
        .commit_export(&ex.name, &commit)?
        .then_some(records.len()))
}

/// The records of what each holder `gained` in the window `start..end`.
fn make_records(
    store: &dyn Store,
    customers: &Customers,
    gained: &Totals,
    start: i64,
    end: i64,
) -> Result<Vec<UsageRecord>, StoreError> {
    let mut keys: HashMap<String, Option<ApiKey>> = HashMap::new();
    let mut key = |id: &str| -> Result<Option<ApiKey>, StoreError> {
        if let Some(k) = keys.get(id) {
            return Ok(k.clone());
        }
        let k = store.key(id)?;
        keys.insert(id.to_owned(), k.clone());
        Ok(k)
    };
    let tagged = |k: &ApiKey| k.tags.get(STRIPE_CUSTOMER_TAG).cloned();
    let mut records = Vec::with_capacity(gained.len());
    for ((plan_id, holder), &[value, throttled, quota_exceeded]) in gained {
        let (key_id, customer_id, stripe_customer_id) = match holder.split_once(':') {
            Some(("c", c)) => {
                let mut stripe = None;
                for k in customers
                    .of(plan_id)
                    .and_then(|of| of.get(c))
                    .into_iter()
                    .flatten()
                {
                    stripe = stripe.or(key(k)?.as_ref().and_then(tagged));
                }
                (None, Some(c.to_owned()), stripe.or(Some(c.to_owned())))
            }
            Some((_, k)) => {
                let found = key(k)?;
                let customer = found
                    .as_ref()
                    .and_then(|k| k.customer_id.clone())
                    .filter(|c| !c.is_empty());
                let stripe = found.as_ref().and_then(tagged).or(customer.clone());
                (Some(k.to_owned()), customer, stripe)
            }
            None => continue,
        };
        records.push(UsageRecord {
            id: hashed_id("usage", &format!("{plan_id}|{start}|{end}|{holder}")),
            usage_plan_id: plan_id.clone(),
            key_id,
            customer_id,
            stripe_customer_id,
            window_start: rfc3339_secs(start),
            window_end: rfc3339_secs(end),
            value,
            throttled,
            quota_exceeded,
        });
    }
    Ok(records)
}

/// The start of the window of `interval` seconds that holds `secs`.
fn window_of(secs: i64, interval: i64) -> i64 {
    secs.div_euclid(interval) * interval
}

/// The live window due at `now` for an exporter at `cursor` whose counts settle `settle` seconds
/// after a window ends: from the cursor to the last settled window's end, within the cursor's
/// day (a start after downtime catches up a day at a time).
pub fn due_window(start: i64, interval: i64, settle: i64, now: i64) -> Option<(i64, i64)> {
    let settled = window_of(now - settle, interval);
    let day_end = EpochDay::from_secs(start).next().start_secs();
    let end = settled.min(day_end);
    (end > start).then_some((start, end))
}

/// Delivers `batch`'s records to `ex`'s sink: how many. Blocking; a Stripe batch (a request per
/// record) stops early once `stopping` is set, to be sent whole again later.
pub fn deliver(ex: &Exporter, batch: &ExportBatch, stopping: &AtomicBool) -> Result<usize, String> {
    let records: Vec<UsageRecord> =
        serde_json::from_str(&batch.records).map_err(|e| format!("a stored batch: {e}"))?;
    let sent = match &ex.sink {
        Sink::File { dir, format } => write_file(dir, &ex.name, *format, batch, &records),
        Sink::CloudEvents {
            url,
            secret,
            event_type,
            tls,
        } => {
            let events: Vec<_> = records.iter().map(|r| cloud_event(r, event_type)).collect();
            let mut request =
                post_to(url, tls)?.set("Content-Type", "application/cloudevents-batch+json");
            if let Some(secret) = secret {
                request = request.set("Authorization", &format!("Bearer {secret}"));
            }
            sent(url, request.send_string(&json!(events).to_string()))
        }
        Sink::Stripe {
            url,
            secret,
            event_name,
            tls,
        } => {
            let url = format!("{}/v1/billing/meter_events", url.trim_end_matches('/'));
            let timestamp = batch.start.to_string();
            for r in records.iter().filter(|r| r.value > 0) {
                if stopping.load(Ordering::Relaxed) {
                    return Err("stopped before the batch was sent whole".into());
                }
                let Some(customer) = &r.stripe_customer_id else {
                    tracing::warn!(exporter = %ex.name, record = %r.id, key = ?r.key_id,
                        "usage not sent to Stripe: the key has no customerId nor tollgate:stripeCustomerId tag");
                    continue;
                };
                let value = r.value.to_string();
                let request = post_to(&url, tls)?
                    .set("Authorization", &format!("Bearer {secret}"))
                    // Stripe answers a retry with the same key as it answered the first.
                    .set("Idempotency-Key", &r.id);
                sent(
                    &url,
                    request.send_form(&[
                        ("event_name", event_name.as_str()),
                        ("payload[stripe_customer_id]", customer),
                        ("payload[value]", &value),
                        ("identifier", &r.id),
                        ("timestamp", &timestamp),
                    ]),
                )?;
            }
            Ok(())
        }
    };
    sent.map(|()| records.len())
}

/// A record as a CloudEvent (OpenMeter reads `subject` as the customer, `data.value` by its
/// meter's `valueProperty`).
fn cloud_event(r: &UsageRecord, event_type: &str) -> serde_json::Value {
    json!({
        "specversion": "1.0",
        "id": r.id,
        "source": "tollgate",
        "type": event_type,
        "subject": r.customer_id.as_ref().or(r.key_id.as_ref()),
        "time": r.window_start,
        "datacontenttype": "application/json",
        "data": {
            "value": r.value,
            "throttled": r.throttled,
            "quotaExceeded": r.quota_exceeded,
            "usagePlanId": r.usage_plan_id,
            "keyId": r.key_id,
            "customerId": r.customer_id,
            "windowEnd": r.window_end,
        },
    })
}

/// The file of a window: `<exporter>-<start>-<seconds>s.<format>`, colons left out of the time.
pub fn file_name(exporter: &str, format: FileFormat, start: i64, end: i64) -> String {
    format!(
        "{exporter}-{}-{}s.{}",
        rfc3339_secs(start).replace(':', ""),
        end - start,
        format.extension()
    )
}

/// Writes a window's file whole (a temporary file renamed over it: a replay rewrites the same).
fn write_file(
    dir: &Path,
    exporter: &str,
    format: FileFormat,
    batch: &ExportBatch,
    records: &[UsageRecord],
) -> Result<(), String> {
    let name = file_name(exporter, format, batch.start, batch.end);
    let fail = |e: &dyn std::fmt::Display| format!("{}: {e}", dir.join(&name).display());
    let mut text = Vec::new();
    match format {
        FileFormat::Ndjson => {
            for r in records {
                serde_json::to_writer(&mut text, r).map_err(|e| fail(&e))?;
                text.push(b'\n');
            }
        }
        FileFormat::Csv => {
            let mut w = csv::Writer::from_writer(&mut text);
            let header = [
                "id",
                "windowStart",
                "windowEnd",
                "usagePlanId",
                "keyId",
                "customerId",
                "stripeCustomerId",
                "value",
                "throttled",
                "quotaExceeded",
            ];
            w.write_record(header).map_err(|e| fail(&e))?;
            for r in records {
                let none = String::new();
                w.write_record([
                    &r.id,
                    &r.window_start,
                    &r.window_end,
                    &r.usage_plan_id,
                    r.key_id.as_ref().unwrap_or(&none),
                    r.customer_id.as_ref().unwrap_or(&none),
                    r.stripe_customer_id.as_ref().unwrap_or(&none),
                    &r.value.to_string(),
                    &r.throttled.to_string(),
                    &r.quota_exceeded.to_string(),
                ])
                .map_err(|e| fail(&e))?;
            }
            w.flush().map_err(|e| fail(&e))?;
        }
    }
    std::fs::create_dir_all(dir).map_err(|e| fail(&e))?;
    let temp = dir.join(format!(".{name}.tmp"));
    let written = (|| {
        use std::io::Write;
        let mut f = std::fs::File::create(&temp)?;
        f.write_all(&text)?;
        f.sync_all()?;
        std::fs::rename(&temp, dir.join(&name))
    })();
    written.map_err(|e| fail(&e))
}

/// What a backfill did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Backfilled {
    /// Days made into a window of their own (with use the exporter had not sent).
    pub days: usize,
    /// Windows delivered.
    pub windows: usize,
    /// Records in them.
    pub records: usize,
}

/// `tollgate usage export`: makes a window of each day from `from` to `to` the exporter has not
/// sent (before its live cursor's day; from then on its live windows take what days gain), then
/// delivers those days' undelivered windows, or (`replay`) all of them again, with the same ids.
/// Blocking.
pub fn backfill(
    store: &dyn Store,
    ex: &Exporter,
    records: &Records,
    (from, to): (EpochDay, EpochDay),
    replay: bool,
    now: i64,
) -> Result<Backfilled, String> {
    let fail = |e: StoreError| e.to_string();
    let customers = Customers::stored(records);
    let mut done = Backfilled::default();
    let mut day = from;
    while day <= to {
        let (start, end) = (day.start_secs(), day.next().start_secs());
        let state = store.export_state(&ex.name).map_err(fail)?;
        let live_from = EpochDay::from_secs(state.cursor.unwrap_or(now));
        if day >= live_from {
            break;
        }
        let made = store
            .export_batches(&ex.name, start, start + 1, false)
            .map_err(fail)?;
        if made.iter().any(|b| b.end == end) {
            tracing::warn!(exporter = %ex.name, %day, "this day was backfilled before; what it gained since is not made into a window");
        } else {
            let window = Window {
                start,
                end,
                days: &[day],
                version: state.version,
                live: false,
            };
            match export_window(store, ex, &records.plans, &customers, &window, now)
                .map_err(fail)?
            {
                // A live window committed meanwhile: compute this day again from its state.
                None => continue,
                Some(0) => {}
                Some(_) => done.days += 1,
            }
        }
        day = day.next();
    }
    let (start, end) = (from.start_secs(), to.next().start_secs());
    for batch in store
        .export_batches(&ex.name, start, end, !replay)
        .map_err(fail)?
    {
        done.records += deliver(ex, &batch, &AtomicBool::new(false))?;
        store
            .export_delivered(&ex.name, batch.start, batch.end)
            .map_err(fail)?;
        done.windows += 1;
    }
    Ok(done)
}

/// A failing exporter's wait: when it may deliver again, and how many tries failed in a row.
#[derive(Debug, Default, Clone, Copy)]
struct Backoff {
    until: i64,
    failures: u32,
}

/// Exports and delivers every exporter's due windows each second until told to stop. `settle`:
/// how long after a window ends its counts are all in the store (two flush intervals).
pub(crate) async fn export_loop(
    shared: Arc<Shared>,
    settle: Duration,
    mut stop: watch::Receiver<bool>,
) {
    if shared.snapshot.load().config().exporters.is_empty() {
        return;
    }
    let settle = i64::try_from(settle.as_secs()).unwrap_or(i64::MAX).max(1);
    let mut ticker = tokio::time::interval(Duration::from_secs(1));
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut backoffs: HashMap<String, Backoff> = HashMap::new();
    loop {
        tokio::select! {
            _ = ticker.tick() => {}
            _ = stop.changed() => return,
        }
        let shared = shared.clone();
        let mut held = std::mem::take(&mut backoffs);
        let done = tokio::task::spawn_blocking(move || {
            let snap = shared.snapshot.load_full();
            for ex in &snap.config().exporters {
                let backoff = held.entry(ex.name.clone()).or_default();
                if let Err(err) = run(&shared, ex, settle, backoff) {
                    tracing::warn!(exporter = %ex.name, error = %err, "usage export failed; retried");
                }
            }
            held
        })
        .await;
        if let Ok(held) = done {
            backoffs = held;
        }
    }
}

/// Makes `ex`'s due window, delivers what is pending, and updates its lag. Blocking.
fn run(shared: &Shared, ex: &Exporter, settle: i64, backoff: &mut Backoff) -> Result<(), String> {
    let store = &*shared.store;
    let now = epoch_secs(shared.clock.now());
    let state = store.export_state(&ex.name).map_err(|e| e.to_string())?;
    // Where the exporter stands after this run (as it stood, when another instance moved first).
    let mut cursor = state.cursor;
    if state.cursor.is_none() {
        // The exporter's first run: it starts with the window in progress.
        let start = ExportCommit {
            version: state.version,
            cursor: Some(window_of(now, ex.interval)),
            keep_from: now.saturating_sub(KEEP_SECS),
            ..ExportCommit::default()
        };
        if store
            .commit_export(&ex.name, &start)
            .map_err(|e| e.to_string())?
        {
            cursor = start.cursor;
        }
    } else if let Some((start, end)) = state
        .cursor
        .and_then(|cursor| due_window(cursor, ex.interval, settle, now))
    {
        let plans = store.plans().map_err(|e| e.to_string())?;
        let customers = Customers::served(&**shared.snapshot.load(), &plans);
        let day = EpochDay::from_secs(start);
        // The day before too: what was written to it after its last window (a write-back).
        let days = [EpochDay(day.0.saturating_sub(1)), day];
        let window = Window {
            start,
            end,
            days: &days,
            version: state.version,
            live: true,
        };
        if export_window(store, ex, &plans, &customers, &window, now)
            .map_err(|e| e.to_string())?
            .is_some()
        {
            cursor = Some(end);
        }
    }
    let pending = store
        .export_batches(&ex.name, i64::MIN, i64::MAX, true)
        .map_err(|e| e.to_string())?;
    let mut through = pending.first().map(|b| b.start);
    if now >= backoff.until {
        for batch in &pending {
            match deliver(ex, batch, &shared.draining) {
                Ok(_) => {
                    store
                        .export_delivered(&ex.name, batch.start, batch.end)
                        .map_err(|e| e.to_string())?;
                    *backoff = Backoff::default();
                    through = None;
                }
                Err(err) => {
                    shared.metrics.export_failed(&ex.name);
                    backoff.failures += 1;
                    let wait = 1i64 << backoff.failures.min(9);
                    backoff.until = now + wait.min(MAX_BACKOFF);
                    through = Some(batch.start);
                    tracing::warn!(exporter = %ex.name, window = %rfc3339_secs(batch.start),
                        error = %err, "usage export not delivered; retried");
                    break;
                }
            }
        }
    }
    if let Some(through) = through.or(cursor) {
        shared
            .metrics
            .export_lag(&ex.name, now.saturating_sub(through));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_close_once_settled_and_stay_within_a_day() {
        let day = 20_000 * SECS_PER_DAY;
        assert_eq!(due_window(day + 60, 60, 2, day + 121), None);
        assert_eq!(
            due_window(day + 60, 60, 2, day + 122),
            Some((day + 60, day + 120))
        );
        // After downtime, the rest of the cursor's day at once, then the next.
        assert_eq!(
            due_window(day + 60, 60, 2, day + 3 * SECS_PER_DAY),
            Some((day + 60, day + SECS_PER_DAY))
        );
    }

    #[test]
    fn files_are_named_by_window() {
        let start = 1_764_850_800; // 2025-12-04T12:20:00Z
        assert_eq!(
            file_name("ledger", FileFormat::Csv, start, start + 3600),
            "ledger-2025-12-04T122000Z-3600s.csv"
        );
    }
}
