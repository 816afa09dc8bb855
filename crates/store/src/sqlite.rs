//! The embedded store: one SQLite file in WAL mode.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Mutex, MutexGuard};

use rusqlite::{Connection, OptionalExtension, params};
use tollgate_core::credits::{CREDIT_REFILL_TAG, MAX_CREDITS, Refill, refilled_by};
use tollgate_core::model::{PreviousValue, Tags};
use tollgate_core::quota::EpochDay;
use tollgate_core::source_ips::SOURCE_IPS_TAG;
use tollgate_core::{ApiKey, IpNetworks, KeyHash, UsagePlan};

use crate::{
    Attempt, CreditBalance, CreditSpend, CustomerDelta, DayValue, EventStatus, ExportBatch,
    ExportCommit, ExportMark, ExportState, KeyIndex, KeyTerms, NamedKey, OutboxEvent, Records,
    Series, Store, StoreError, UsageDelta,
};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS usage_plans (
    id   TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    body TEXT NOT NULL               -- the AWS UsagePlan as JSON
);
CREATE TABLE IF NOT EXISTS api_keys (
    id                TEXT PRIMARY KEY,
    name              TEXT NOT NULL,
    description       TEXT,
    customer_id       TEXT,
    enabled           INTEGER NOT NULL,
    value_sha256      BLOB NOT NULL UNIQUE,
    value_sealed      BLOB,            -- AES-256-GCM, only with keyValueStorage: encrypted
    created_date      INTEGER NOT NULL,
    last_updated_date INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS usage_plan_keys (
    plan_id TEXT NOT NULL,
    key_id  TEXT NOT NULL,
    PRIMARY KEY (plan_id, key_id)
) WITHOUT ROWID;
-- A key's plans and a key by name are looked up without reading a million rows.
CREATE INDEX IF NOT EXISTS usage_plan_keys_by_key ON usage_plan_keys (key_id);
CREATE INDEX IF NOT EXISTS api_keys_by_name ON api_keys (name);
CREATE TABLE IF NOT EXISTS usage (
    plan_id TEXT NOT NULL,
    key_id  TEXT NOT NULL,
    day     INTEGER NOT NULL,        -- days since 1970-01-01 UTC
    used    INTEGER NOT NULL,
    PRIMARY KEY (plan_id, key_id, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS refusals (
    plan_id        TEXT NOT NULL,
    key_id         TEXT NOT NULL,
    day            INTEGER NOT NULL,
    throttled      INTEGER NOT NULL,
    quota_exceeded INTEGER NOT NULL,
    PRIMARY KEY (plan_id, key_id, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS key_last_used (
    key_id TEXT PRIMARY KEY,
    at     INTEGER NOT NULL          -- epoch seconds
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS dashboard_sessions (
    user  TEXT PRIMARY KEY,          -- an admin access key id
    epoch INTEGER NOT NULL           -- sessions signed under an older one are over
) WITHOUT ROWID;
-- A key's credits: what was added (top-ups, the opening balance, refills), once per idempotency key,
-- and what admitted requests spent per day; the balance is the difference.
CREATE TABLE IF NOT EXISTS credit_ledger (
    key_id          TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    amount          INTEGER NOT NULL,
    at              INTEGER NOT NULL,  -- epoch seconds
    PRIMARY KEY (key_id, idempotency_key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS credit_spend (
    key_id TEXT NOT NULL,
    day    INTEGER NOT NULL,
    spent  INTEGER NOT NULL,
    PRIMARY KEY (key_id, day)
) WITHOUT ROWID;
-- Events: a claim made once per event a fleet may fire, and the outbox of deliveries (a delivered
-- event leaves it; one that failed for a day stays, failed, until retried).
CREATE TABLE IF NOT EXISTS event_claims (
    claim TEXT PRIMARY KEY
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS outbox (
    id         TEXT PRIMARY KEY,
    webhook    TEXT NOT NULL,
    body       TEXT NOT NULL,
    created    INTEGER NOT NULL,
    attempts   INTEGER NOT NULL,
    next_at    INTEGER NOT NULL,
    status     TEXT NOT NULL,     -- pending or failed
    last_error TEXT
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (status, next_at);
-- Usage exporters: each one's place (a version every commit moves on, and the end of the last
-- window exported live), what it sent of each day's totals, and the records of each window.
CREATE TABLE IF NOT EXISTS export_state (
    exporter TEXT PRIMARY KEY,
    version  INTEGER NOT NULL,
    cursor   INTEGER
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS export_marks (
    exporter       TEXT NOT NULL,
    day            INTEGER NOT NULL,
    plan_id        TEXT NOT NULL,
    holder         TEXT NOT NULL,
    used           INTEGER NOT NULL,
    throttled      INTEGER NOT NULL,
    quota_exceeded INTEGER NOT NULL,
    PRIMARY KEY (exporter, day, plan_id, holder)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS export_batches (
    exporter     TEXT NOT NULL,
    window_start INTEGER NOT NULL,
    window_end   INTEGER NOT NULL,
    records      TEXT NOT NULL,
    delivered    INTEGER NOT NULL,
    PRIMARY KEY (exporter, window_start, window_end)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS export_pending ON export_batches (exporter, window_start)
    WHERE delivered = 0;
-- A customer's shared count in a plan that shares limits by customer, beside its keys' own.
CREATE TABLE IF NOT EXISTS customer_usage (
    plan_id     TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    day         INTEGER NOT NULL,
    used        INTEGER NOT NULL,
    PRIMARY KEY (plan_id, customer_id, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS customer_adjustments (
    plan_id     TEXT NOT NULL,
    customer_id TEXT NOT NULL,
    day         INTEGER NOT NULL,
    delta       INTEGER NOT NULL,
    PRIMARY KEY (plan_id, customer_id, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quota_adjustments (
    plan_id TEXT NOT NULL,
    key_id  TEXT NOT NULL,
    day     INTEGER NOT NULL,
    delta   INTEGER NOT NULL,        -- added to the period's count (UpdateUsage)
    PRIMARY KEY (plan_id, key_id, day)
) WITHOUT ROWID;
";

/// The SQLite store. One connection behind a mutex: every call is short and runs on a blocking
/// thread, and SQLite serialises writers anyway.
#[derive(Debug)]
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

fn backend(e: rusqlite::Error) -> StoreError {
    StoreError::Backend(e.to_string())
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path`.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        let conn = Connection::open(path).map_err(backend)?;
        // WAL: readers never block the flusher. synchronous=NORMAL in WAL mode survives a process
        // crash (the only failure the metering bound promises about); it skips an fsync per commit.
        conn.pragma_update(None, "journal_mode", "WAL")
            .map_err(backend)?;
        conn.pragma_update(None, "synchronous", "NORMAL")
            .map_err(backend)?;
        conn.busy_timeout(std::time::Duration::from_secs(5))
            .map_err(backend)?;
        conn.execute_batch(SCHEMA).map_err(backend)?;
        migrate(&conn)?;
        Ok(Self {
            conn: Mutex::new(conn),
        })
    }

    /// The oldest key named `name`, and its plans.
    fn key_named(&self, name: &str) -> Result<Option<NamedKey>, StoreError> {
        self.key_with_plans("WHERE name = ?1 ORDER BY rowid LIMIT 1", name)
    }

    /// The first key `filter` (with `?1` for `arg`) selects, and the ids of its plans, sorted.
    fn key_with_plans(&self, filter: &str, arg: &str) -> Result<Option<NamedKey>, StoreError> {
        let conn = self.conn();
        let Some(key) = select_keys(&conn, filter, [arg])?.pop() else {
            return Ok(None);
        };
        let mut stmt = conn
            .prepare("SELECT plan_id FROM usage_plan_keys WHERE key_id = ?1 ORDER BY plan_id")
            .map_err(backend)?;
        let plans = stmt
            .query_map([&key.id], |r| r.get::<_, String>(0))
            .map_err(backend)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        Ok(Some((key, plans)))
    }

    fn conn(&self) -> MutexGuard<'_, Connection> {
        // A panic while holding the lock cannot leave SQLite inconsistent (transactions roll back), so
        // a poisoned lock is still usable.
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// Columns added since the first schema, by `user_version`: a database written by an older tollgate
/// gains them on open, in one transaction (so two processes opening it at once agree).
const MIGRATIONS: &[&str] = &[
    // 1: tags, what is kept in the clear of a value, and the expiry the gateway's index reads.
    "ALTER TABLE api_keys ADD COLUMN tags TEXT;
     ALTER TABLE api_keys ADD COLUMN value_prefix TEXT NOT NULL DEFAULT '';
     ALTER TABLE api_keys ADD COLUMN value_length INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE api_keys ADD COLUMN expires_at INTEGER;",
    // 2: the value before a rotation, accepted until the end of its grace period.
    "ALTER TABLE api_keys ADD COLUMN previous_sha256 BLOB;
     ALTER TABLE api_keys ADD COLUMN previous_until INTEGER;",
    // 3: the source-IP allowlist the gateway's index reads (the tag's value).
    "ALTER TABLE api_keys ADD COLUMN allowed_source_ips TEXT;",
    // 4: whether the key holds credits, and its refill (the tag's value) for the gateway's index.
    "ALTER TABLE api_keys ADD COLUMN credits INTEGER NOT NULL DEFAULT 0;
     ALTER TABLE api_keys ADD COLUMN credit_refill TEXT;",
];

fn migrate(conn: &Connection) -> Result<(), StoreError> {
    conn.execute_batch("BEGIN IMMEDIATE").map_err(backend)?;
    let migrated = (|| {
        let version: u32 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .map_err(backend)?;
        for step in MIGRATIONS.iter().skip(version as usize) {
            conn.execute_batch(step).map_err(backend)?;
        }
        conn.pragma_update(None, "user_version", MIGRATIONS.len() as u32)
            .map_err(backend)
    })();
    let end = if migrated.is_ok() {
        "COMMIT"
    } else {
        "ROLLBACK"
    };
    conn.execute_batch(end).map_err(backend)?;
    migrated
}

/// A batch of more rows than this gets a bigger page cache while it runs.
const BATCH_CACHE_ROWS: usize = 1000;
/// That cache, in KiB (SQLite's negative `cache_size`).
const BATCH_CACHE_KIB: i64 = -65_536;

// Writes use cached statements: a batch (an import, a migration) prepares each once, not per row.

fn put_plan(conn: &Connection, plan: &UsagePlan) -> Result<(), StoreError> {
    let body = serde_json::to_string(plan).map_err(|e| StoreError::Backend(e.to_string()))?;
    conn.prepare_cached(
        "INSERT INTO usage_plans (id, name, body) VALUES (?1, ?2, ?3)
         ON CONFLICT(id) DO UPDATE SET name = excluded.name, body = excluded.body",
    )
    .and_then(|mut stmt| stmt.execute(params![plan.id, plan.name, body]))
    .map_err(backend)?;
    Ok(())
}

fn put_key(conn: &Connection, key: &ApiKey) -> Result<(), StoreError> {
    let holder: Option<String> = conn
        .prepare_cached("SELECT id FROM api_keys WHERE value_sha256 = ?1")
        .and_then(|mut stmt| {
            stmt.query_row([&key.value_hash.0[..]], |r| r.get(0))
                .optional()
        })
        .map_err(backend)?;
    if holder.is_some_and(|id| id != key.id) {
        return Err(StoreError::DuplicateKeyValue);
    }
    let tags = (!key.tags.is_empty())
        .then(|| serde_json::to_string(&key.tags))
        .transpose()
        .map_err(|e| StoreError::Backend(e.to_string()))?;
    let expires_at = key
        .expires_at()
        .map(|at| i64::try_from(at).unwrap_or(i64::MAX));
    conn.prepare_cached(
        "INSERT INTO api_keys (id, name, description, customer_id, enabled, value_sha256, created_date,
                               last_updated_date, value_sealed, tags, value_prefix, value_length,
                               expires_at, previous_sha256, previous_until, allowed_source_ips,
                               credit_refill, credits)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18)
         ON CONFLICT(id) DO UPDATE SET name = excluded.name, description = excluded.description,
             customer_id = excluded.customer_id, enabled = excluded.enabled,
             value_sha256 = excluded.value_sha256, last_updated_date = excluded.last_updated_date,
             value_sealed = excluded.value_sealed, tags = excluded.tags,
             value_prefix = excluded.value_prefix, value_length = excluded.value_length,
             expires_at = excluded.expires_at, previous_sha256 = excluded.previous_sha256,
             previous_until = excluded.previous_until,
             allowed_source_ips = excluded.allowed_source_ips,
             credit_refill = excluded.credit_refill, credits = excluded.credits",
    )
    .and_then(|mut stmt| {
        stmt.execute(params![
            key.id,
            key.name,
            key.description,
            key.customer_id,
            key.enabled,
            &key.value_hash.0[..],
            key.created_date,
            key.last_updated_date,
            key.sealed_value,
            tags,
            key.value_prefix,
            key.value_length,
            expires_at,
            key.previous.map(|p| p.hash.0.to_vec()),
            key.previous.map(|p| i64::try_from(p.until).unwrap_or(i64::MAX)),
            key.tags.get(SOURCE_IPS_TAG),
            key.tags.get(CREDIT_REFILL_TAG),
            key.credits,
        ])
    })
    .map_err(backend)?;
    Ok(())
}

fn bind(conn: &Connection, plan_id: &str, key_id: &str) -> Result<(), StoreError> {
    conn.prepare_cached("INSERT OR IGNORE INTO usage_plan_keys (plan_id, key_id) VALUES (?1, ?2)")
        .and_then(|mut stmt| stmt.execute([plan_id, key_id]))
        .map_err(backend)?;
    Ok(())
}

/// Appends the days of `series`, read from `column` of `table` whose holder (key or customer) is
/// in `holder`, with a value for a plan's holders (or the one `id`) in `days`, ordered by holder
/// then day.
fn read_series(
    conn: &Connection,
    (table, holder, column): (&str, &str, &str),
    series: Series,
    plan_id: &str,
    id: Option<&str>,
    (from, to): (EpochDay, EpochDay),
    out: &mut Vec<DayValue>,
) -> Result<(), StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT {holder}, day, {column} FROM {table}
             WHERE plan_id = ?1 AND (?2 IS NULL OR {holder} = ?2) AND day BETWEEN ?3 AND ?4
               AND {column} IS NOT 0
             ORDER BY {holder}, day"
        ))
        .map_err(backend)?;
    let rows = stmt
        .query_map(params![plan_id, id, from.0, to.0], |r| {
            let value = match r.get_ref(2)? {
                rusqlite::types::ValueRef::Integer(n) => Some(n),
                _ => None,
            };
            Ok((r.get::<_, String>(0)?, to_day(r.get(1)?), value))
        })
        .map_err(backend)?;
    for row in rows {
        let (key_id, day, value) = row.map_err(backend)?;
        let value = match series {
            // Written only through checked arithmetic; one that is not is left out, and said.
            Series::QuotaAdjustment => crate::readable_adjustment(plan_id, &key_id, day, value),
            _ => value.filter(|n| *n > 0),
        };
        if let Some(value) = value {
            out.push(DayValue { key_id, day, value });
        }
    }
    Ok(())
}

/// Adds `delta` to the adjustment in `table` of (plan, `id` in column `holder`) on `day`.
fn adjust(
    conn: &mut Connection,
    (table, holder): (&str, &str),
    plan_id: &str,
    id: &str,
    day: EpochDay,
    delta: i64,
) -> Result<(), StoreError> {
    // Added here, checked, not by SQL: SQLite turns an integer overflow into a REAL.
    let tx = conn.transaction().map_err(backend)?;
    let stored: Option<rusqlite::types::Value> = tx
        .query_row(
            &format!("SELECT delta FROM {table} WHERE plan_id = ?1 AND {holder} = ?2 AND day = ?3"),
            params![plan_id, id, day.0],
            |r| r.get(0),
        )
        .optional()
        .map_err(backend)?;
    let stored = match stored {
        None => Some(0),
        Some(rusqlite::types::Value::Integer(n)) => Some(n),
        Some(_) => None,
    };
    // A row that cannot be read is replaced: it was being left out anyway.
    let stored = crate::readable_adjustment(plan_id, id, day, stored).unwrap_or(0);
    let sum = crate::added_adjustment(stored, delta)?;
    tx.execute(
        &format!(
            "INSERT OR REPLACE INTO {table} (plan_id, {holder}, day, delta) VALUES (?1, ?2, ?3, ?4)"
        ),
        params![plan_id, id, day.0, sum],
    )
    .map_err(backend)?;
    tx.commit().map_err(backend)
}

fn status_name(status: EventStatus) -> &'static str {
    match status {
        EventStatus::Pending => "pending",
        EventStatus::Failed => "failed",
    }
}

/// The outbox events `clause` selects.
fn select_events(
    conn: &Connection,
    clause: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<OutboxEvent>, StoreError> {
    let mut stmt = conn
        .prepare_cached(&format!(
            "SELECT id, webhook, body, created, attempts, next_at, status, last_error FROM outbox {clause}"
        ))
        .map_err(backend)?;
    let rows = stmt
        .query_map(params, |r| {
            let status: String = r.get(6)?;
            Ok(OutboxEvent {
                id: r.get(0)?,
                webhook: r.get(1)?,
                body: r.get(2)?,
                created: r.get(3)?,
                attempts: r.get(4)?,
                next_at: r.get(5)?,
                status: EventStatus::named(&status).unwrap_or(EventStatus::Failed),
                last_error: r.get(7)?,
            })
        })
        .map_err(backend)?;
    rows.collect::<Result<_, _>>().map_err(backend)
}

fn to_day(v: i64) -> EpochDay {
    EpochDay(u32::try_from(v).unwrap_or(0))
}

impl Store for SqliteStore {
    fn series(
        &self,
        series: Series,
        plan_id: &str,
        key_id: Option<&str>,
        from: EpochDay,
        to: EpochDay,
    ) -> Result<Vec<DayValue>, StoreError> {
        let (table, column) = match series {
            Series::Used => ("usage", "used"),
            Series::Throttled => ("refusals", "throttled"),
            Series::QuotaExceeded => ("refusals", "quota_exceeded"),
            Series::QuotaAdjustment => ("quota_adjustments", "delta"),
        };
        let conn = self.conn();
        let mut out = Vec::new();
        read_series(
            &conn,
            (table, "key_id", column),
            series,
            plan_id,
            key_id,
            (from, to),
            &mut out,
        )?;
        Ok(out)
    }

    fn customer_series(
        &self,
        series: Series,
        plan_id: &str,
        customers: &[&str],
        from: EpochDay,
        to: EpochDay,
    ) -> Result<Vec<DayValue>, StoreError> {
        let (table, column) = match series {
            Series::Used => ("customer_usage", "used"),
            Series::QuotaAdjustment => ("customer_adjustments", "delta"),
            Series::Throttled | Series::QuotaExceeded => return Ok(Vec::new()),
        };
        let mut customers = customers.to_vec();
        customers.sort_unstable();
        customers.dedup();
        let conn = self.conn();
        let mut out = Vec::new();
        for customer in customers {
            read_series(
                &conn,
                (table, "customer_id", column),
                series,
                plan_id,
                Some(customer),
                (from, to),
                &mut out,
            )?;
        }
        Ok(out)
    }

    fn plans(&self) -> Result<Vec<UsagePlan>, StoreError> {
        let conn = self.conn();
        let mut plans = Vec::new();
        let mut stmt = conn
            .prepare("SELECT id, body FROM usage_plans ORDER BY rowid")
            .map_err(backend)?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(backend)?;
        for row in rows {
            let (id, body) = row.map_err(backend)?;
            let plan: UsagePlan = serde_json::from_str(&body).map_err(|e| StoreError::Corrupt {
                id: id.clone(),
                reason: e.to_string(),
            })?;
            plans.push(plan);
        }
        Ok(plans)
    }

    fn load(&self) -> Result<Records, StoreError> {
        let plans = self.plans()?;
        let conn = self.conn();
        // In table order: ordering by id would walk the id index and fetch each row apart (a third
        // of a million-key load); whoever lists keys sorts them.
        let keys = select_keys(&conn, "", [])?;

        let mut stmt = conn
            .prepare("SELECT plan_id, key_id FROM usage_plan_keys ORDER BY plan_id, key_id")
            .map_err(backend)?;
        let bindings = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(backend)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(backend)?;
        Ok(Records {
            plans,
            keys,
            bindings,
        })
    }

    fn load_index(&self) -> Result<KeyIndex, StoreError> {
        let mut index = KeyIndex::new(self.plans()?);
        let conn = self.conn();
        let mut stmt = conn
            .prepare(
                "SELECT id, enabled, value_sha256, expires_at, previous_sha256, previous_until, name,
                        allowed_source_ips, customer_id, credit_refill, credits
                 FROM api_keys",
            )
            .map_err(backend)?;
        let mut rows = stmt.query([]).map_err(backend)?;
        while let Some(row) = rows.next().map_err(backend)? {
            let id = row
                .get_ref(0)
                .map_err(backend)?
                .as_str()
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            let hash = row
                .get_ref(2)
                .ok()
                .and_then(|v| v.as_blob().ok())
                .and_then(|b| <[u8; 32]>::try_from(b).ok())
                .ok_or_else(|| bad_hash(id))?;
            let terms = KeyTerms {
                enabled: row.get::<_, bool>(1).map_err(backend)?,
                expires_at: row
                    .get::<_, Option<i64>>(3)
                    .map_err(backend)?
                    .map(|at| u64::try_from(at).unwrap_or(0)),
                previous: previous_value(row, 4)?,
                sources: row
                    .get_ref(7)
                    .map_err(backend)?
                    .as_str_or_null()
                    .map_err(|e| StoreError::Backend(e.to_string()))?
                    .map(IpNetworks::stored),
                customer_id: row
                    .get_ref(8)
                    .map_err(backend)?
                    .as_str_or_null()
                    .map_err(|e| StoreError::Backend(e.to_string()))?
                    .map(Box::from),
                refill: row
                    .get_ref(9)
                    .map_err(backend)?
                    .as_str_or_null()
                    .map_err(|e| StoreError::Backend(e.to_string()))?
                    .and_then(|r| Refill::parse(r).ok()),
                credits: row.get::<_, bool>(10).map_err(backend)?,
            };
            let name = row
                .get_ref(6)
                .map_err(backend)?
                .as_str()
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            index.push_key(id, name, KeyHash(hash), terms);
        }
        let mut stmt = conn
            .prepare("SELECT plan_id, key_id FROM usage_plan_keys ORDER BY plan_id, key_id")
            .map_err(backend)?;
        // Streamed: a million (plan, key) pairs are never held at once.
        let mut failed = None;
        let pairs = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))
            .map_err(backend)?
            .map_while(|row| row.map_err(|e| failed = Some(backend(e))).ok());
        index.bind_all(pairs);
        failed.map_or(Ok(index), Err)
    }

    fn key(&self, key_id: &str) -> Result<Option<ApiKey>, StoreError> {
        Ok(select_keys(&self.conn(), "WHERE id = ?1", params![key_id])?.pop())
    }

    fn keys_named(&self, names: &[&str]) -> Result<Vec<Option<NamedKey>>, StoreError> {
        // Names are indexed: one lookup each, whatever the number of other keys.
        names.iter().map(|name| self.key_named(name)).collect()
    }

    fn keys_by_id(&self, ids: &[&str]) -> Result<Vec<Option<NamedKey>>, StoreError> {
        ids.iter()
            .map(|id| self.key_with_plans("WHERE id = ?1", id))
            .collect()
    }

    fn keys_from(&self, from: Option<u64>, limit: usize) -> Result<Vec<(u64, ApiKey)>, StoreError> {
        // A key's place is its rowid: rows are numbered as they are inserted, and an upsert
        // keeps a row's number.
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        let from = i64::try_from(from.unwrap_or(0)).unwrap_or(i64::MAX);
        select_placed_keys(
            &self.conn(),
            "WHERE rowid >= ?1 ORDER BY rowid LIMIT ?2",
            params![from, limit],
        )
    }

    fn put_plan(&self, plan: &UsagePlan) -> Result<(), StoreError> {
        put_plan(&self.conn(), plan)
    }

    fn put_key(&self, key: &ApiKey) -> Result<(), StoreError> {
        put_key(&self.conn(), key)
    }

    fn put_records(&self, records: &Records) -> Result<(), StoreError> {
        let mut conn = self.conn();
        // A large batch writes all over the key tables' indexes: with a bigger page cache for its
        // duration (given back after) a 100k-row import took 2.2 s instead of 3.7.
        let large = records.keys.len() + records.bindings.len() > BATCH_CACHE_ROWS;
        let cache: Option<i64> = if large {
            let before = conn
                .pragma_query_value(None, "cache_size", |r| r.get(0))
                .ok();
            let _ = conn.pragma_update(None, "cache_size", BATCH_CACHE_KIB);
            before
        } else {
            None
        };
        // One transaction: an import or a migration of many keys is one commit, not one per row.
        let written = conn.transaction().map_err(backend).and_then(|tx| {
            for plan in &records.plans {
                put_plan(&tx, plan)?;
            }
            for key in &records.keys {
                put_key(&tx, key)?;
            }
            for (plan, key) in &records.bindings {
                bind(&tx, plan, key)?;
            }
            tx.commit().map_err(backend)
        });
        if let Some(before) = cache {
            let _ = conn.pragma_update(None, "cache_size", before);
            let _ = conn.execute_batch("PRAGMA shrink_memory");
        }
        written
    }

    fn delete_key(&self, key_id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(backend)?;
        tx.execute("DELETE FROM usage_plan_keys WHERE key_id = ?1", [key_id])
            .map_err(backend)?;
        tx.execute("DELETE FROM api_keys WHERE id = ?1", [key_id])
            .map_err(backend)?;
        tx.execute("DELETE FROM key_last_used WHERE key_id = ?1", [key_id])
            .map_err(backend)?;
        tx.commit().map_err(backend)
    }

    fn delete_plan(&self, plan_id: &str) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(backend)?;
        tx.execute("DELETE FROM usage_plan_keys WHERE plan_id = ?1", [plan_id])
            .map_err(backend)?;
        tx.execute("DELETE FROM usage_plans WHERE id = ?1", [plan_id])
            .map_err(backend)?;
        tx.commit().map_err(backend)
    }

    fn adjust_quota(
        &self,
        plan_id: &str,
        key_id: &str,
        day: EpochDay,
        delta: i64,
    ) -> Result<(), StoreError> {
        let table = ("quota_adjustments", "key_id");
        adjust(&mut self.conn(), table, plan_id, key_id, day, delta)
    }

    fn adjust_customer_quota(
        &self,
        plan_id: &str,
        customer_id: &str,
        day: EpochDay,
        delta: i64,
    ) -> Result<(), StoreError> {
        let table = ("customer_adjustments", "customer_id");
        adjust(&mut self.conn(), table, plan_id, customer_id, day, delta)
    }

    fn add_credits(
        &self,
        key_id: &str,
        idempotency_key: &str,
        amount: u64,
        at: i64,
    ) -> Result<bool, StoreError> {
        let amount = i64::try_from(amount.min(MAX_CREDITS)).unwrap_or(0);
        let added = self
            .conn()
            .execute(
                "INSERT OR IGNORE INTO credit_ledger (key_id, idempotency_key, amount, at)
                 VALUES (?1, ?2, ?3, ?4)",
                params![key_id, idempotency_key, amount, at],
            )
            .map_err(backend)?;
        Ok(added == 1)
    }

    fn spend_credits(&self, spent: &[CreditSpend]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(backend)?;
        {
            let mut add = tx
                .prepare_cached(
                    "INSERT INTO credit_spend (key_id, day, spent) VALUES (?1, ?2, ?3)
                     ON CONFLICT(key_id, day) DO UPDATE SET spent = spent + excluded.spent",
                )
                .map_err(backend)?;
            for s in spent.iter().filter(|s| s.spent > 0) {
                let n = i64::try_from(s.spent.min(MAX_CREDITS)).unwrap_or(0);
                add.execute(params![s.key_id, s.day.0, n])
                    .map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)
    }

    fn credit_balances(&self) -> Result<Vec<CreditBalance>, StoreError> {
        let conn = self.conn();
        // (added, spent, last refill) per key; summed here, not by SQL: SQLite turns an integer
        // overflow into a REAL.
        let mut keys: BTreeMap<String, (u64, u64, Option<EpochDay>)> = BTreeMap::new();
        let mut ledger = conn
            .prepare("SELECT key_id, amount, idempotency_key FROM credit_ledger")
            .map_err(backend)?;
        let rows = ledger
            .query_map([], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                ))
            })
            .map_err(backend)?;
        for row in rows {
            let (key_id, amount, entry) = row.map_err(backend)?;
            let k = keys.entry(key_id).or_default();
            k.0 = k.0.saturating_add(u64::try_from(amount).unwrap_or(0));
            k.2 = k.2.max(refilled_by(&entry));
        }
        let mut spend = conn
            .prepare("SELECT key_id, spent FROM credit_spend")
            .map_err(backend)?;
        let rows = spend
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))
            .map_err(backend)?;
        for row in rows {
            let (key_id, spent) = row.map_err(backend)?;
            // Spending without a ledger entry is no account.
            if let Some(k) = keys.get_mut(&key_id) {
                k.1 = k.1.saturating_add(u64::try_from(spent).unwrap_or(0));
            }
        }
        Ok(keys
            .into_iter()
            .map(|(key_id, (added, spent, refilled))| CreditBalance {
                key_id,
                balance: added.saturating_sub(spent).min(MAX_CREDITS),
                refilled,
            })
            .collect())
    }

    fn enqueue_event(&self, claim: &str, event: &OutboxEvent) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(backend)?;
        let claimed = tx
            .execute(
                "INSERT OR IGNORE INTO event_claims (claim) VALUES (?1)",
                [claim],
            )
            .map_err(backend)?;
        if claimed == 0 {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO outbox (id, webhook, body, created, attempts, next_at, status, last_error)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                event.id,
                event.webhook,
                event.body,
                event.created,
                event.attempts,
                event.next_at,
                status_name(event.status),
                event.last_error
            ],
        )
        .map_err(backend)?;
        tx.commit().map_err(backend)?;
        Ok(true)
    }

    fn lease_events(
        &self,
        now: i64,
        lease_until: i64,
        limit: usize,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(backend)?;
        let events = select_events(
            &tx,
            "WHERE status = 'pending' AND next_at <= ?1 ORDER BY next_at LIMIT ?2",
            params![now, limit as i64],
        )?;
        for e in &events {
            tx.execute(
                "UPDATE outbox SET next_at = ?2 WHERE id = ?1",
                params![e.id, lease_until],
            )
            .map_err(backend)?;
        }
        tx.commit().map_err(backend)?;
        Ok(events)
    }

    fn record_attempt(&self, id: &str, attempt: &Attempt) -> Result<(), StoreError> {
        let conn = self.conn();
        match attempt {
            Attempt::Delivered => conn.execute("DELETE FROM outbox WHERE id = ?1", [id]),
            Attempt::Retry { at, error } => conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, next_at = ?2, last_error = ?3 WHERE id = ?1",
                params![id, at, error],
            ),
            Attempt::Failed { error } => conn.execute(
                "UPDATE outbox SET attempts = attempts + 1, status = 'failed', last_error = ?2 WHERE id = ?1",
                params![id, error],
            ),
        }
        .map_err(backend)?;
        Ok(())
    }

    fn events(&self, status: EventStatus, limit: usize) -> Result<Vec<OutboxEvent>, StoreError> {
        select_events(
            &self.conn(),
            "WHERE status = ?1 ORDER BY created, id LIMIT ?2",
            params![status_name(status), limit as i64],
        )
    }

    fn retry_event(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let changed = self
            .conn()
            .execute(
                "UPDATE outbox SET status = 'pending', next_at = ?2 WHERE id = ?1 AND status = 'failed'",
                params![id, now],
            )
            .map_err(backend)?;
        Ok(changed == 1)
    }

    fn export_state(&self, exporter: &str) -> Result<ExportState, StoreError> {
        let row = self
            .conn()
            .query_row(
                "SELECT version, cursor FROM export_state WHERE exporter = ?1",
                [exporter],
                |r| Ok((r.get::<_, i64>(0)?, r.get::<_, Option<i64>>(1)?)),
            )
            .optional()
            .map_err(backend)?;
        Ok(
            row.map_or_else(ExportState::default, |(version, cursor)| ExportState {
                version: u64::try_from(version).unwrap_or(0),
                cursor,
            }),
        )
    }

    fn export_marks(&self, exporter: &str, day: EpochDay) -> Result<Vec<ExportMark>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached(
                "SELECT plan_id, holder, used, throttled, quota_exceeded FROM export_marks
                 WHERE exporter = ?1 AND day = ?2",
            )
            .map_err(backend)?;
        let rows = stmt
            .query_map(params![exporter, day.0], |r| {
                let count = |i: usize| r.get::<_, i64>(i).map(|v| u64::try_from(v).unwrap_or(0));
                Ok(ExportMark {
                    day,
                    plan_id: r.get(0)?,
                    holder: r.get(1)?,
                    counts: [count(2)?, count(3)?, count(4)?],
                })
            })
            .map_err(backend)?;
        rows.collect::<Result<_, _>>().map_err(backend)
    }

    fn commit_export(&self, exporter: &str, commit: &ExportCommit<'_>) -> Result<bool, StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(backend)?;
        let version: i64 = tx
            .query_row(
                "SELECT version FROM export_state WHERE exporter = ?1",
                [exporter],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)?
            .unwrap_or(0);
        if u64::try_from(version).ok() != Some(commit.version) {
            return Ok(false);
        }
        tx.execute(
            "INSERT INTO export_state (exporter, version, cursor) VALUES (?1, ?2 + 1, ?3)
             ON CONFLICT (exporter) DO UPDATE SET version = ?2 + 1,
                 cursor = coalesce(?3, export_state.cursor)",
            params![exporter, version, commit.cursor],
        )
        .map_err(backend)?;
        {
            let mut mark = tx
                .prepare_cached(
                    "INSERT OR REPLACE INTO export_marks
                     (exporter, day, plan_id, holder, used, throttled, quota_exceeded)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                )
                .map_err(backend)?;
            for m in commit.marks {
                let [used, throttled, refused] =
                    m.counts.map(|c| i64::try_from(c).unwrap_or(i64::MAX));
                mark.execute(params![
                    exporter, m.day.0, m.plan_id, m.holder, used, throttled, refused
                ])
                .map_err(backend)?;
            }
        }
        if let Some(b) = commit.batch {
            tx.execute(
                "INSERT INTO export_batches (exporter, window_start, window_end, records, delivered)
                 VALUES (?1, ?2, ?3, ?4, ?5)",
                params![exporter, b.start, b.end, b.records, b.delivered],
            )
            .map_err(backend)?;
        }
        tx.execute(
            "DELETE FROM export_batches WHERE exporter = ?1 AND window_start < ?2",
            params![exporter, commit.keep_from],
        )
        .map_err(backend)?;
        tx.execute(
            "DELETE FROM export_marks WHERE exporter = ?1 AND day < ?2",
            params![exporter, EpochDay::from_secs(commit.keep_from).0],
        )
        .map_err(backend)?;
        tx.commit().map_err(backend)?;
        Ok(true)
    }

    fn export_batches(
        &self,
        exporter: &str,
        from: i64,
        to: i64,
        pending: bool,
    ) -> Result<Vec<ExportBatch>, StoreError> {
        let conn = self.conn();
        // Two statements, so that the pending ones are read through their own index.
        let mut stmt = conn
            .prepare_cached(if pending {
                "SELECT window_start, window_end, records, delivered FROM export_batches
                 WHERE exporter = ?1 AND window_start >= ?2 AND window_start < ?3
                   AND delivered = 0
                 ORDER BY window_start, window_end"
            } else {
                "SELECT window_start, window_end, records, delivered FROM export_batches
                 WHERE exporter = ?1 AND window_start >= ?2 AND window_start < ?3
                 ORDER BY window_start, window_end"
            })
            .map_err(backend)?;
        let rows = stmt
            .query_map(params![exporter, from, to], |r| {
                Ok(ExportBatch {
                    start: r.get(0)?,
                    end: r.get(1)?,
                    records: r.get(2)?,
                    delivered: r.get(3)?,
                })
            })
            .map_err(backend)?;
        rows.collect::<Result<_, _>>().map_err(backend)
    }

    fn export_delivered(&self, exporter: &str, start: i64, end: i64) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "UPDATE export_batches SET delivered = 1
                 WHERE exporter = ?1 AND window_start = ?2 AND window_end = ?3",
                params![exporter, start, end],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn add_customer_usage(&self, deltas: &[CustomerDelta]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(backend)?;
        {
            let mut used = tx
                .prepare_cached(
                    "INSERT INTO customer_usage (plan_id, customer_id, day, used) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(plan_id, customer_id, day) DO UPDATE SET used = used + excluded.used",
                )
                .map_err(backend)?;
            for d in deltas.iter().filter(|d| d.count > 0) {
                let count = i64::try_from(d.count).unwrap_or(i64::MAX);
                used.execute(params![d.plan_id, d.customer_id, d.day.0, count])
                    .map_err(backend)?;
            }
        }
        tx.commit().map_err(backend)
    }

    fn bind(&self, plan_id: &str, key_id: &str) -> Result<(), StoreError> {
        bind(&self.conn(), plan_id, key_id)
    }

    fn unbind(&self, plan_id: &str, key_id: &str) -> Result<(), StoreError> {
        self.conn()
            .execute(
                "DELETE FROM usage_plan_keys WHERE plan_id = ?1 AND key_id = ?2",
                [plan_id, key_id],
            )
            .map_err(backend)?;
        Ok(())
    }

    fn add_usage(&self, deltas: &[UsageDelta]) -> Result<(), StoreError> {
        let mut conn = self.conn();
        let tx = conn.transaction().map_err(backend)?;
        {
            let mut used = tx
                .prepare_cached(
                    "INSERT INTO usage (plan_id, key_id, day, used) VALUES (?1, ?2, ?3, ?4)
                     ON CONFLICT(plan_id, key_id, day) DO UPDATE SET used = used + excluded.used",
                )
                .map_err(backend)?;
            let mut refused = tx
                .prepare_cached(
                    "INSERT INTO refusals (plan_id, key_id, day, throttled, quota_exceeded)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(plan_id, key_id, day) DO UPDATE SET
                       throttled = throttled + excluded.throttled,
                       quota_exceeded = quota_exceeded + excluded.quota_exceeded",
                )
                .map_err(backend)?;
            let mut seen = tx
                .prepare_cached(
                    "INSERT INTO key_last_used (key_id, at) VALUES (?1, ?2)
                     ON CONFLICT(key_id) DO UPDATE SET at = max(at, excluded.at)",
                )
                .map_err(backend)?;
            let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            for d in deltas {
                if d.count > 0 {
                    used.execute(params![d.plan_id, d.key_id, d.day.0, n(d.count)])
                        .map_err(backend)?;
                }
                if d.throttled > 0 || d.quota_exceeded > 0 {
                    let (t, q) = (n(d.throttled), n(d.quota_exceeded));
                    refused
                        .execute(params![d.plan_id, d.key_id, d.day.0, t, q])
                        .map_err(backend)?;
                }
                if let Some(at) = d.last_used {
                    seen.execute(params![d.key_id, n(at)]).map_err(backend)?;
                }
            }
        }
        tx.commit().map_err(backend)
    }

    fn session_epoch(&self, user: &str) -> Result<u64, StoreError> {
        let epoch: Option<i64> = self
            .conn()
            .query_row(
                "SELECT epoch FROM dashboard_sessions WHERE user = ?1",
                [user],
                |r| r.get(0),
            )
            .optional()
            .map_err(backend)?;
        Ok(epoch.map_or(0, |e| u64::try_from(e).unwrap_or(0)))
    }

    fn end_sessions(&self, user: &str) -> Result<u64, StoreError> {
        let epoch: i64 = self
            .conn()
            .query_row(
                "INSERT INTO dashboard_sessions (user, epoch) VALUES (?1, 1)
                 ON CONFLICT(user) DO UPDATE SET epoch = epoch + 1 RETURNING epoch",
                [user],
                |r| r.get(0),
            )
            .map_err(backend)?;
        Ok(u64::try_from(epoch).unwrap_or(0))
    }

    fn last_used(&self, key_ids: &[&str]) -> Result<Vec<Option<u64>>, StoreError> {
        let conn = self.conn();
        let mut stmt = conn
            .prepare_cached("SELECT at FROM key_last_used WHERE key_id = ?1")
            .map_err(backend)?;
        key_ids
            .iter()
            .map(|id| {
                stmt.query_row([id], |r| r.get::<_, i64>(0))
                    .optional()
                    .map(|at| at.map(|a| u64::try_from(a).unwrap_or(0)))
                    .map_err(backend)
            })
            .collect()
    }
}

fn bad_hash(key_id: &str) -> StoreError {
    StoreError::Corrupt {
        id: key_id.to_owned(),
        reason: "value hash is not 32 bytes".into(),
    }
}

/// The keys `clause` selects (a WHERE / ORDER BY / LIMIT tail over `api_keys`), each with its place
/// (rowid).
fn select_placed_keys(
    conn: &Connection,
    clause: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<(u64, ApiKey)>, StoreError> {
    let mut stmt = conn
        .prepare(&format!(
            "SELECT id, name, description, customer_id, enabled, value_sha256, created_date,
                    last_updated_date, value_sealed, tags, value_prefix, value_length,
                    previous_sha256, previous_until, rowid, credits
             FROM api_keys {clause}"
        ))
        .map_err(backend)?;
    let mut rows = stmt.query(params).map_err(backend)?;
    let mut keys = Vec::new();
    while let Some(r) = rows.next().map_err(backend)? {
        let id: String = r.get(0).map_err(backend)?;
        let corrupt = |reason: String| StoreError::Corrupt {
            id: id.clone(),
            reason,
        };
        let hash = r.get_ref(5).ok().and_then(|v| v.as_blob().ok());
        let value_hash = hash
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .map(KeyHash)
            .ok_or_else(|| bad_hash(&id))?;
        let tags = match r.get::<_, Option<String>>(9).map_err(backend)? {
            Some(t) => serde_json::from_str(&t).map_err(|e| corrupt(format!("tags: {e}")))?,
            None => Tags::new(),
        };
        let previous = previous_value(r, 12).map_err(|e| corrupt(e.to_string()))?;
        let place: i64 = r.get(14).map_err(backend)?;
        let key = ApiKey {
            name: r.get(1).map_err(backend)?,
            description: r.get(2).map_err(backend)?,
            customer_id: r.get(3).map_err(backend)?,
            enabled: r.get(4).map_err(backend)?,
            value_hash,
            created_date: r.get(6).map_err(backend)?,
            last_updated_date: r.get(7).map_err(backend)?,
            sealed_value: r.get(8).map_err(backend)?,
            tags,
            value_prefix: r.get(10).map_err(backend)?,
            value_length: r.get(11).map_err(backend)?,
            previous,
            credits: r.get(15).map_err(backend)?,
            id,
        };
        keys.push((u64::try_from(place).unwrap_or(0), key));
    }
    Ok(keys)
}

/// The keys `clause` selects (a WHERE / ORDER BY / LIMIT tail over `api_keys`).
fn select_keys(
    conn: &Connection,
    clause: &str,
    params: impl rusqlite::Params,
) -> Result<Vec<ApiKey>, StoreError> {
    Ok(select_placed_keys(conn, clause, params)?
        .into_iter()
        .map(|(_, key)| key)
        .collect())
}

/// The old value's hash and grace end in columns `at` and `at + 1`, if the key was rotated.
fn previous_value(row: &rusqlite::Row<'_>, at: usize) -> Result<Option<PreviousValue>, StoreError> {
    let hash = row.get::<_, Option<Vec<u8>>>(at).map_err(backend)?;
    let until = row.get::<_, Option<i64>>(at + 1).map_err(backend)?;
    let (Some(hash), Some(until)) = (hash, until) else {
        return Ok(None);
    };
    let hash = <[u8; 32]>::try_from(hash.as_slice())
        .map_err(|_| StoreError::Backend("previous value hash is not 32 bytes".into()))?;
    Ok(Some(PreviousValue {
        hash: KeyHash(hash),
        until: u64::try_from(until).unwrap_or(0),
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conformance() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("t.db")).unwrap();
        crate::conformance::run_all(&store);
    }

    #[test]
    fn survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.db");
        let delta = UsageDelta {
            plan_id: "p".into(),
            key_id: "k".into(),
            day: EpochDay(5),
            count: 3,
            ..UsageDelta::default()
        };
        SqliteStore::open(&path)
            .unwrap()
            .add_usage(&[delta])
            .unwrap();
        let rows = SqliteStore::open(&path)
            .unwrap()
            .series(Series::Used, "p", None, EpochDay(0), EpochDay(9))
            .unwrap();
        assert_eq!(
            rows,
            vec![DayValue {
                key_id: "k".into(),
                day: EpochDay(5),
                value: 3
            }]
        );
    }
}
