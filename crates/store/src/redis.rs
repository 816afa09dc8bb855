//! The cluster store: records, bindings and usage in Redis (standalone, Redis Cluster or Valkey).
//!
//! Record keys share the hash tag `{tg}` so writes that touch several of them run as one atomic script
//! on a cluster too; each API key's usage lives under its own tag `{<keyId>}`, next to the limiter state
//! the data plane's script keeps for that key (see `keys` below). Every record change bumps
//! `{tg}:version` and publishes it on `tollgate:changes`, which instances subscribe to (and poll, in case
//! a message was missed) to reload.
//!
//! What Redis keeps of each key, and the move from an older layout, are in the `layout` module.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use redis::{Cmd, ConnectionLike, Script};
use tollgate_core::credits::{CREDIT_REFILL_TAG, MAX_CREDITS, Refill, refilled_by};
use tollgate_core::model::{PreviousValue, Tags};
use tollgate_core::quota::EpochDay;
use tollgate_core::source_ips::SOURCE_IPS_TAG;
use tollgate_core::{ApiKey, IpNetworks, KeyHash, UsagePlan};

use crate::{
    Attempt, CreditBalance, CreditSpend, CustomerDelta, DayValue, EventStatus, ExportBatch,
    ExportCommit, ExportMark, ExportState, KeyIndex, KeyTerms, OutboxEvent, Records, Series, Store,
    StoreError, UsageDelta,
};

/// Places per set of `key_order!`: under Redis's default `zset-max-listpack-entries` (128), so each
/// set stays a compact list.
macro_rules! order_bucket {
    () => {
        128
    };
}

/// Keys in creation order, `order_bucket!` places to a set `{tg}:order:keys:<place / 128>`: key id
/// → place (see [`keys::PLACES`]). Small sets, which Redis keeps as compact lists (~20 bytes a key,
/// against ~100 in one set of a million); a key's record holds its place. The scripts alone read
/// and write them, through the Lua functions this gives: `ORDER(place)`, the name of the set that
/// holds `place`, and `PLACED(record, place)`, a key's record (`StoredKey`'s JSON) holding its
/// place.
macro_rules! key_order {
    () => {
        concat!(
            "local function ORDER(place)
  return '{tg}:order:keys:' .. string.format('%d', math.floor(place / ",
            order_bucket!(),
            "))
end
-- A record is a JSON object: '}' ends it.
local function PLACED(record, place)
  return string.sub(record, 1, -2) .. ',\\34place\\34:' .. string.format('%d', place) .. '}'
end
"
        )
    };
}

/// The Lua functions over the key pages' rows (see `pages`): `ROW(page, id)`, where key `id`'s
/// row starts and ends (its newline) in a keys page, or nothing; `DROP(page, row)`, the page
/// without whole row `row` (newline included), and whether it was there.
macro_rules! page_rows {
    () => {
        "local function ROW(page, id)
  local s = 1
  if string.sub(page, 1, #id + 1) ~= id .. ' ' then
    s = string.find(page, '\\n' .. id .. ' ', 1, true)
    if not s then return nil end
    s = s + 1
  end
  return s, string.find(page, '\\n', s, true)
end
local function DROP(page, row)
  local s = 1
  if string.sub(page, 1, #row) ~= row then
    s = string.find(page, '\\n' .. row, 1, true)
    if not s then return page, false end
    s = s + 1
  end
  return string.sub(page, 1, s - 1) .. string.sub(page, s + #row), true
end
"
    };
}

/// The Lua function `VALUE(hash)`: where value hash `hash` (hex) names its key, for uniqueness (the
/// scripts alone read and write it). 65,536 small hashes `{tg}:values:<first four hex digits>`,
/// each field the rest of the value hash in bytes: ~55 bytes a key, against ~130 in one hash of
/// hex. Up to 128 fields a hash (Redis's default `hash-max-listpack-entries`) at 8 million keys,
/// so each stays a compact list.
macro_rules! key_value {
    () => {
        "local function VALUE(hash)
  local rest = string.gsub(string.sub(hash, 5), '%x%x', function(x) return string.char(tonumber(x, 16)) end)
  return '{tg}:values:' .. string.sub(hash, 1, 4), rest
end
"
    };
}

// After the macros the modules use.
mod layout;
mod pages;

/// Key names, in one place for the store and the data plane's limiter script.
pub mod keys {
    use tollgate_core::quota::EpochDay;

    use crate::Holder;

    /// All usage plans: id → JSON.
    pub const PLANS: &str = "{tg}:plans";
    /// Plans in creation order: plan id → place.
    pub const PLAN_ORDER: &str = "{tg}:order:plans";
    /// The last place given: each new key or plan takes the next.
    pub const PLACES: &str = "{tg}:order:last";
    /// The keys of one plan: the only place memberships are kept (see the `layout` module).
    pub fn plan_keys(plan_id: &str) -> String {
        format!("{{tg}}:pk:{plan_id}")
    }
    /// The dashboard's session epochs: admin access key id → epoch (bumped by a sign-out).
    pub const SESSIONS: &str = "{tg}:sessions";
    /// Bumped on every record change.
    pub const VERSION: &str = "{tg}:version";
    /// The last record changes: members `"<version> <key id>"` (`*` for a plan), scored by version.
    pub const CHANGE_LOG: &str = "{tg}:changelog";
    /// Channel announcing record changes (the scripts publish the new version on it).
    pub const CHANGES: &str = "tollgate:changes";

    /// Per-day usage of a key under a plan: day → count.
    pub fn usage(key_id: &str, plan_id: &str) -> String {
        per_key_name(key_id, "u", plan_id, None)
    }
    /// Keys with usage under a plan.
    pub fn usage_index(plan_id: &str) -> String {
        format!("{{tg}}:usage:{plan_id}")
    }
    /// Requests of a key refused by a throttle under a plan: day → count.
    pub fn throttled(key_id: &str, plan_id: &str) -> String {
        per_key_name(key_id, "rt", plan_id, None)
    }
    /// Requests of a key refused for the spent quota under a plan: day → count.
    pub fn quota_exceeded(key_id: &str, plan_id: &str) -> String {
        per_key_name(key_id, "rq", plan_id, None)
    }
    /// When each key was last used: key id → epoch seconds.
    pub const LAST_USED: &str = "{tg}:lastused";
    /// Quota adjustments of a key under a plan: day → delta.
    pub fn adjustments(key_id: &str, plan_id: &str) -> String {
        per_key_name(key_id, "a", plan_id, None)
    }
    /// Keys with adjustments under a plan.
    pub fn adjustments_index(plan_id: &str) -> String {
        format!("{{tg}}:adj:{plan_id}")
    }

    /// A key's credits: `b` the balance, `w` the first day of the refill period last refilled in.
    pub fn credits(key_id: &str) -> String {
        format!("tg:{{{key_id}}}:cr")
    }
    /// A key's credit ledger: idempotency key → amount added.
    pub fn credit_ledger(key_id: &str) -> String {
        format!("tg:{{{key_id}}}:crl")
    }
    /// The keys with credits.
    pub const CREDIT_KEYS: &str = "{tg}:credits";
    /// An event claim, made once (`SET NX`).
    pub fn event_claim(claim: &str) -> String {
        format!("{{tg}}:ev:claim:{claim}")
    }
    /// The outbox: event id → the event as JSON.
    pub const EVENTS: &str = "{tg}:ev";
    /// Pending events by when they are due.
    pub const EVENTS_DUE: &str = "{tg}:ev:due";
    /// Failed events by when they were queued.
    pub const EVENTS_FAILED: &str = "{tg}:ev:failed";

    /// An exporter's place: `v` its version, `cursor` the end of its last live window.
    pub fn export(exporter: &str) -> String {
        format!("{{tg}}:xp:{exporter}")
    }
    /// What an exporter sent of a day's totals: `["plan","holder"]` → `"used throttled refused"`.
    pub fn export_marks(exporter: &str, day: EpochDay) -> String {
        format!("{{tg}}:xp:{exporter}:m:{}", day.0)
    }
    /// An exporter's batches: `start-end` → the records' JSON.
    pub fn export_batches(exporter: &str) -> String {
        format!("{{tg}}:xp:{exporter}:b")
    }
    /// An exporter's windows by start.
    pub fn export_windows(exporter: &str) -> String {
        format!("{{tg}}:xp:{exporter}:w")
    }
    /// An exporter's undelivered windows by start.
    pub fn export_pending(exporter: &str) -> String {
        format!("{{tg}}:xp:{exporter}:p")
    }

    /// A customer's shared count under a plan: day → count.
    pub fn customer_usage(customer_id: &str, plan_id: &str) -> String {
        let mut name = String::new();
        write_name(&mut name, Holder::Customer(customer_id), "u", plan_id, None);
        name
    }
    /// Quota adjustments of a customer under a plan: day → delta.
    pub fn customer_adjustments(customer_id: &str, plan_id: &str) -> String {
        let mut name = String::new();
        write_name(&mut name, Holder::Customer(customer_id), "a", plan_id, None);
        name
    }

    /// The records the data plane's limiter script keeps for a key (or a customer) under a plan,
    /// in its `KEYS` order, each handed to `each` in turn from one reused buffer (the request path
    /// allocates no names): the live quota count (`s` window start day, `u` used, and `t` the plan
    /// bucket's theoretical arrival time when the plan has a quota too), the per-day usage, the
    /// quota adjustments, then the token bucket when it is kept apart (`Some(method)`: a method's
    /// bucket, or the plan's, `method` empty, in a plan without a quota).
    pub fn limiter_keys(
        scratch: &mut String,
        holder: Holder<'_>,
        plan_id: &str,
        bucket: Option<&str>,
        mut each: impl FnMut(&str),
    ) {
        for (kind, suffix) in [("q", None), ("u", None), ("a", None)] {
            scratch.clear();
            write_name(scratch, holder, kind, plan_id, suffix);
            each(scratch);
        }
        if let Some(method) = bucket {
            scratch.clear();
            write_name(scratch, holder, "t", plan_id, Some(method));
            each(scratch);
        }
    }

    fn per_key_name(key_id: &str, kind: &str, plan_id: &str, suffix: Option<&str>) -> String {
        let mut name = String::new();
        write_name(&mut name, Holder::Key(key_id), kind, plan_id, suffix);
        name
    }

    /// `tg:{<keyId>}:<kind>:<planId>[:<suffix>]`, or `tg:{c<length>:<customerId>}:…` for a
    /// customer: the holder is the hash tag, so everything the limiter keeps for one API key (or
    /// customer) lives in one Redis Cluster slot. Key ids are alphanumeric and a customer's id is
    /// free text, so its length goes first: no two holders' names meet.
    fn write_name(
        out: &mut String,
        holder: Holder<'_>,
        kind: &str,
        plan_id: &str,
        suffix: Option<&str>,
    ) {
        use std::fmt::Write as _;
        out.push_str("tg:{");
        match holder {
            Holder::Key(key_id) => out.push_str(key_id),
            Holder::Customer(customer_id) => {
                let _ = write!(out, "c{}:{customer_id}", customer_id.len());
            }
        }
        for part in ["}:", kind, ":", plan_id] {
            out.push_str(part);
        }
        if let Some(suffix) = suffix {
            out.push(':');
            out.push_str(suffix);
        }
    }
}

/// Where the Redis store connects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// `redis://host:port[/db]` URLs: one for a single server, the seed nodes for a cluster.
    pub urls: Vec<String>,
    /// Redis Cluster mode.
    pub cluster: bool,
    /// Connect and response timeout.
    pub timeout: Duration,
}

enum Connection {
    Single(redis::Connection),
    Cluster(Box<redis::cluster::ClusterConnection>),
}

impl Connection {
    fn get(&mut self) -> &mut dyn ConnectionLike {
        match self {
            Connection::Single(c) => c,
            Connection::Cluster(c) => &mut **c,
        }
    }
}

/// The Redis store. One connection behind a mutex: calls are short, made off the request path.
pub struct RedisStore {
    settings: RedisSettings,
    conn: Mutex<Option<Connection>>,
}

impl std::fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisStore")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

fn backend(e: redis::RedisError) -> StoreError {
    StoreError::Backend(e.to_string())
}

/// An API key as stored: the value only as its hash (and sealed, when configured). What is absent,
/// empty or zero is left out, as are the id (its row in the key pages starts with it), `enabled`
/// when true and `lastUpdatedDate` when it is the creation date: ~100 bytes for a key with a short
/// name, against layout 1's ~250 (whose records still read).
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredKey {
    name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    customer_id: Option<String>,
    #[serde(default = "yes", skip_serializing_if = "is_yes")]
    enabled: bool,
    value_sha256: String,
    created_date: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    last_updated_date: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    sealed_value: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    tags: Tags,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    value_prefix: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    value_length: u32,
    /// Derived from the expiry tag, for the gateway's index (which reads nothing else of the tags).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    expires_at: Option<u64>,
    /// The allowlist tag's value, for the gateway's index likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    allowed_source_ips: Option<String>,
    /// The credit refill tag's value, likewise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    credit_refill: Option<String>,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    credits: bool,
    #[serde(default, flatten, skip_serializing_if = "Option::is_none")]
    previous: Option<StoredPrevious>,
    /// Its place in listings, given (and written) by the script that stores it.
    #[serde(default, skip_serializing)]
    place: Option<u64>,
}

/// A rotated key's old value in its stored record.
#[derive(serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct StoredPrevious {
    previous_sha256: String,
    previous_until: u64,
}

impl StoredPrevious {
    fn of(previous: Option<PreviousValue>) -> Option<Self> {
        previous.map(|p| Self {
            previous_sha256: hex::encode(p.hash.0),
            previous_until: p.until,
        })
    }

    fn parse(&self, id: &str) -> Result<PreviousValue, StoreError> {
        Ok(PreviousValue {
            hash: parse_hash(id, &self.previous_sha256)?,
            until: self.previous_until,
        })
    }
}

/// The Lua function the scripts that change records call after bumping the version: `LOG(log,
/// version, id)` notes the change in [`keys::CHANGE_LOG`], which keeps the last 10,000 (an instance
/// further behind reads everything again).
macro_rules! change_log {
    () => {
        "local function LOG(log, version, id)
  redis.call('ZADD', log, version, version .. ' ' .. id)
  redis.call('ZREMRANGEBYRANK', log, 0, -10001)
end
"
    };
}

/// Stores key `ARGV[1]` (value hash `ARGV[2]`, record `ARGV[3]` without its place) in its keys page
/// `KEYS[1]`, unless another key has that value (0, or `{}` when reading); `ARGV[4]` is the
/// [`Mode`]: `batch` leaves the announcement to the batch, `read` answers the key's row and its
/// plans page `KEYS[5]` as the write left them.
const PUT_KEY: &str = concat!(
    change_log!(),
    key_order!(),
    key_value!(),
    page_rows!(),
    r"
local function DONE(row)
  if ARGV[4] ~= 'read' then return 1 end
  return {row, redis.call('GET', KEYS[5]) or ''}
end
local values, value = VALUE(ARGV[2])
local holder = redis.call('HGET', values, value)
if holder and holder ~= ARGV[1] then
  if ARGV[4] == 'read' then return {} end
  return 0
end
local page = redis.call('GET', KEYS[1]) or ''
local s, e = ROW(page, ARGV[1])
local place, oldhash
if s then
  local o = cjson.decode(string.sub(page, s + #ARGV[1] + 1, e - 1))
  place, oldhash = o['place'], o['valueSha256']
end
-- A new key's place in listings is after every other's; a rewrite keeps it.
if not place then
  place = redis.call('INCR', KEYS[3])
  redis.call('ZADD', ORDER(place), place, ARGV[1])
end
local row = ARGV[1] .. ' ' .. PLACED(ARGV[3], place) .. '\n'
-- Unchanged: no version bump, so no instance reloads for nothing.
if s and string.sub(page, s, e) == row then return DONE(row) end
if s then
  page = string.sub(page, 1, s - 1) .. row .. string.sub(page, e + 1)
else
  page = page .. row
end
redis.call('SET', KEYS[1], page)
if oldhash and oldhash ~= ARGV[2] then redis.call('HDEL', VALUE(oldhash)) end
redis.call('HSET', values, value, ARGV[1])
local version = redis.call('INCR', KEYS[2])
LOG(KEYS[4], version, ARGV[1])
-- A batch announces itself once, at its end.
if ARGV[4] ~= 'batch' then redis.call('PUBLISH', 'tollgate:changes', version) end
return DONE(row)
"
);

/// Deletes key `ARGV[1]`: its row in its keys page `KEYS[1]`, its memberships (and their rows in its
/// plans page `KEYS[2]`), its value hash, its place and its last use (`KEYS[4]`).
const DELETE_KEY: &str = concat!(
    change_log!(),
    key_order!(),
    key_value!(),
    page_rows!(),
    r"
local page = redis.call('GET', KEYS[1]) or ''
local s, e = ROW(page, ARGV[1])
if s then
  local o = cjson.decode(string.sub(page, s + #ARGV[1] + 1, e - 1))
  redis.call('HDEL', VALUE(o['valueSha256']))
  if o['place'] then redis.call('ZREM', ORDER(o['place']), ARGV[1]) end
  redis.call('SET', KEYS[1], string.sub(page, 1, s - 1) .. string.sub(page, e + 1))
end
-- Memberships are kept by plan: one check per plan.
local memberships = redis.call('GET', KEYS[2]) or ''
for _, plan in ipairs(redis.call('HKEYS', KEYS[3])) do
  if redis.call('SREM', '{tg}:pk:' .. plan, ARGV[1]) == 1 then
    -- Its usage under that plan stays reachable.
    redis.call('SADD', '{tg}:usage:' .. plan, ARGV[1])
  end
  memberships = DROP(memberships, plan .. ',' .. ARGV[1] .. '\n')
end
redis.call('SET', KEYS[2], memberships)
redis.call('HDEL', KEYS[4], ARGV[1])
local version = redis.call('INCR', KEYS[5])
LOG(KEYS[6], version, ARGV[1])
redis.call('PUBLISH', 'tollgate:changes', version)
return 1
"
);

/// Keeps the later of the stored and the given last use of key `ARGV[1]`.
const NOTE_LAST_USED: &str = r"
local at = tonumber(redis.call('HGET', KEYS[1], ARGV[1])) or 0
if tonumber(ARGV[2]) > at then redis.call('HSET', KEYS[1], ARGV[1], ARGV[2]) end
return 1
";

/// Adds to a key's credits once per idempotency key. KEYS: the ledger, the credits. ARGV: the
/// idempotency key, the amount, the refill period's first day it marks (0: not a refill), the most
/// credits a key may hold.
const ADD_CREDITS: &str = r"
if redis.call('HSETNX', KEYS[1], ARGV[1], ARGV[2]) == 0 then return 0 end
-- The balance, and what plans in shadow spend (once they have started).
for _, field in ipairs({'b', 'sb'}) do
  local b = tonumber(redis.call('HGET', KEYS[2], field))
  if b or field == 'b' then
    b = math.min(math.max(b or 0, 0) + tonumber(ARGV[2]), tonumber(ARGV[4]))
    redis.call('HSET', KEYS[2], field, string.format('%.0f', b))
  end
end
local day = tonumber(ARGV[3])
if day > (tonumber(redis.call('HGET', KEYS[2], 'w')) or 0) then redis.call('HSET', KEYS[2], 'w', day) end
return 1
";

/// Takes what was spent off a key's credits, down to 0. KEYS: the credits. ARGV: the amount.
const SPEND_CREDITS: &str = r"
local b = tonumber(redis.call('HGET', KEYS[1], 'b')) or 0
redis.call('HSET', KEYS[1], 'b', string.format('%.0f', math.max(b - tonumber(ARGV[1]), 0)))
return 1
";

/// Claims an event and queues it, or does nothing when it was claimed before. KEYS: the claim, the
/// outbox, the due set. ARGV: the event's id, its JSON, when it is due, how long the claim lasts (s).
const ENQUEUE_EVENT: &str = r"
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[4]) then return 0 end
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2])
redis.call('ZADD', KEYS[3], ARGV[3], ARGV[1])
return 1
";

/// Leases the due events. KEYS: the outbox, the due set. ARGV: now, the lease's end, how many.
const LEASE_EVENTS: &str = r"
local ids = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, ARGV[3])
if #ids == 0 then return {} end
for _, id in ipairs(ids) do redis.call('ZADD', KEYS[2], ARGV[2], id) end
return redis.call('HMGET', KEYS[1], unpack(ids))
";

/// Saves an event where it now stands (one script: Redis Cluster clients do not pipeline). KEYS:
/// the outbox, the due set, the failed set. ARGV: the id, then `delete`, or its JSON, `due` or
/// `failed`, and its score there.
const SAVE_EVENT: &str = r"
if ARGV[2] == 'delete' then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[1])
  return 1
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local into, out = KEYS[2], KEYS[3]
if ARGV[3] == 'failed' then into, out = KEYS[3], KEYS[2] end
redis.call('ZREM', out, ARGV[1])
redis.call('ZADD', into, ARGV[4], ARGV[1])
return 1
";

/// Makes an exporter's commit while its version is `ARGV[1]`. KEYS: its place, batches, windows,
/// pending windows, the marks of the day before the oldest kept (deleted; older ones went before,
/// or expire), then the mark hashes. ARGV: the version, the cursor (`''`: unchanged), the
/// batch's window (`''`: none), its start and records, the oldest window kept, the marks' time to
/// live, then (mark hash's index in KEYS, field, value) per mark.
const COMMIT_EXPORT: &str = r"
local v = tonumber(redis.call('HGET', KEYS[1], 'v') or '0')
if v ~= tonumber(ARGV[1]) then return 0 end
if ARGV[3] ~= '' then
  if redis.call('HSETNX', KEYS[2], ARGV[3], ARGV[5]) == 0 then
    return redis.error_reply('an export batch of window ' .. ARGV[3] .. ' exists')
  end
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[3])
  redis.call('ZADD', KEYS[4], ARGV[4], ARGV[3])
end
redis.call('HSET', KEYS[1], 'v', v + 1)
if ARGV[2] ~= '' then redis.call('HSET', KEYS[1], 'cursor', ARGV[2]) end
for i = 8, #ARGV, 3 do
  local k = KEYS[tonumber(ARGV[i])]
  redis.call('HSET', k, ARGV[i + 1], ARGV[i + 2])
  redis.call('EXPIRE', k, ARGV[7])
end
local old = redis.call('ZRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[6])
for _, w in ipairs(old) do
  redis.call('HDEL', KEYS[2], w)
  redis.call('ZREM', KEYS[4], w)
end
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. ARGV[6])
redis.call('DEL', KEYS[5])
return 1
";

/// The field of an export batch's window.
fn export_window(start: i64, end: i64) -> String {
    format!("{start}-{end}")
}

/// How long an event's claim is kept: past any period a claim stands for (a month and a week).
const EVENT_CLAIM_SECS: i64 = 40 * 86_400;

/// A key page's name and its body.
type Page = (String, Vec<u8>);

/// Pages' bodies as MGET answers them (none for a missing page).
type Bodies = Vec<Option<Vec<u8>>>;

/// Key pages per round trip (~8 KB each at a million keys): Redis spends a millisecond or so on
/// each such command, and the data plane's calls wait meanwhile.
const PAGES_PER_TRIP: usize = 128;

/// Keys read per round trip by id (two pages each): a resync reads the keys other instances changed
/// while the data plane runs, so each read is kept short. At 128 (256 pages, ~2 MB) Redis's slow
/// log showed 0.7-1.7 ms reads while 8 clients signed up; at 16 a read stays near 0.2 ms.
const KEYS_PER_TRIP: usize = 16;

/// The record version and the change log's entries after `ARGV[1]` (an exclusive score).
const CHANGES_SINCE: &str = r"
local version = tonumber(redis.call('GET', KEYS[1]) or '0')
return {version, redis.call('ZRANGEBYSCORE', KEYS[2], ARGV[1], '+inf')}
";

/// Up to `ARGV[2]` keys from place `ARGV[1]` on, in place order, from the sets of
/// `key_order!` up to the last place given (`KEYS[1]`): their ids with their places.
const KEYS_FROM: &str = concat!(
    key_order!(),
    r"
local from, want = tonumber(ARGV[1]), tonumber(ARGV[2])
local last = tonumber(redis.call('GET', KEYS[1]) or '0')
local placed, ids = {}, {}
-- Set by set: the places of deleted keys are simply not there.
while #ids < want and from <= last do
  local got = redis.call('ZRANGEBYSCORE', ORDER(from), from, '+inf', 'WITHSCORES', 'LIMIT', 0, want - #ids)
  for i = 1, #got, 2 do
    placed[#placed + 1] = {got[i], got[i + 1]}
    ids[#ids + 1] = got[i]
  end
  from = (math.floor(from / ",
    order_bucket!(),
    r") + 1) * ",
    order_bucket!(),
    r"
end
return placed
"
);

/// Deletes lock `KEYS[1]` if `ARGV[1]` still holds it.
const UNLOCK: &str = r"
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
";

/// Records per pipelined round trip in a bulk write.
const PIPELINE_PAGE: usize = 1000;

/// How a script that changes a key's record or memberships ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// It announces the change.
    Announce,
    /// It leaves the announcement to the batch it is part of (which makes it once).
    Batch,
    /// It announces the change and answers the key's row and its plans page as the write left
    /// them: what the writer serves, without reading it again.
    Read,
}

impl Mode {
    /// The script's last argument.
    fn arg(self) -> &'static str {
        match self {
            Self::Announce => "",
            Self::Batch => "batch",
            Self::Read => "read",
        }
    }
}

/// The `PUT_KEY` call that stores `key` (its value's hash, never the value).
fn put_key_call<'s>(
    script: &'s Script,
    key: &ApiKey,
    mode: Mode,
) -> Result<redis::ScriptInvocation<'s>, StoreError> {
    checked_id(&key.id)?;
    let stored = StoredKey::of(key);
    let body = stored.json()?;
    let page = pages::page_of(&key.id);
    let mut call = script.prepare_invoke();
    call.key(pages::keys_page(page))
        .key(keys::VERSION)
        .key(keys::PLACES)
        .key(keys::CHANGE_LOG)
        .key(pages::plans_page(page))
        .arg(&key.id)
        .arg(&stored.value_sha256)
        .arg(body)
        .arg(mode.arg());
    Ok(call)
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

fn yes() -> bool {
    true
}

fn is_yes(b: &bool) -> bool {
    *b
}

/// `record` (`StoredKey`'s JSON) holding its place: the twin of the scripts' `PLACED` (see
/// `key_order!`), for the move from layout 1, which writes pages whole. A record written again
/// by `PUT_KEY` unchanged is then left alone (the layout tests check it).
fn placed(record: &str, place: u64) -> String {
    let object = record.strip_suffix('}').unwrap_or(record);
    format!("{object},\"place\":{place}}}")
}

impl StoredKey {
    /// The record: its JSON (the scripts add its place).
    fn json(&self) -> Result<String, StoreError> {
        serde_json::to_string(self).map_err(|e| StoreError::Backend(e.to_string()))
    }

    /// `key` as stored.
    fn of(key: &ApiKey) -> Self {
        Self {
            name: key.name.clone(),
            description: key.description.clone(),
            customer_id: key.customer_id.clone(),
            enabled: key.enabled,
            value_sha256: hex::encode(key.value_hash.0),
            created_date: key.created_date,
            last_updated_date: (key.last_updated_date != key.created_date)
                .then_some(key.last_updated_date),
            sealed_value: key.sealed_value.as_deref().map(hex::encode),
            tags: key.tags.clone(),
            value_prefix: key.value_prefix.clone(),
            value_length: key.value_length,
            expires_at: key.expires_at(),
            allowed_source_ips: key.tags.get(SOURCE_IPS_TAG).cloned(),
            credit_refill: key.tags.get(CREDIT_REFILL_TAG).cloned(),
            credits: key.credits,
            previous: StoredPrevious::of(key.previous),
            place: None,
        }
    }
}

/// The `BIND` call that adds (`member`) or removes a membership.
fn binding_call<'s>(
    script: &'s Script,
    plan_id: &str,
    key_id: &str,
    member: bool,
    mode: Mode,
) -> Result<redis::ScriptInvocation<'s>, StoreError> {
    checked_id(plan_id)?;
    checked_id(key_id)?;
    let page = pages::page_of(key_id);
    let mut call = script.prepare_invoke();
    call.key(keys::plan_keys(plan_id))
        .key(keys::VERSION)
        .key(keys::usage_index(plan_id))
        .key(keys::CHANGE_LOG)
        .key(pages::plans_page(page))
        .key(pages::keys_page(page))
        .arg(if member { "1" } else { "0" })
        .arg(plan_id)
        .arg(key_id)
        .arg(mode.arg());
    Ok(call)
}

/// Refuses `id` unless the key pages can hold it (see [`pages::valid_id`]): ids tollgate makes can.
fn checked_id(id: &str) -> Result<(), StoreError> {
    if pages::valid_id(id) {
        Ok(())
    } else {
        Err(StoreError::Backend(format!(
            "the id {id:?} holds a character other than letters, digits, '-' and '_'"
        )))
    }
}

/// For each of `ids`, in order, the key and its plans' ids (sorted) found in `read`: page numbers,
/// each with its keys page's body (or some of its rows) and its plans page's.
fn named_in<'a>(
    ids: &[&str],
    read: impl IntoIterator<Item = (usize, &'a [u8], &'a [u8])>,
) -> Result<Vec<Option<crate::NamedKey>>, StoreError> {
    let wanted: HashSet<&str> = ids.iter().copied().collect();
    let mut records: HashMap<&str, ApiKey> = HashMap::new();
    let mut plans: HashMap<&str, Vec<String>> = HashMap::new();
    for (p, keys_page, plans_page) in read {
        for row in pages::key_rows(&pages::keys_page(p), keys_page) {
            let (id, record) = row?;
            if let Some(&id) = wanted.get(id) {
                records.insert(id, parse_key(id, record)?);
            }
        }
        for row in pages::plan_rows(&pages::plans_page(p), plans_page) {
            let (plan, key) = row?;
            if let Some(&key) = wanted.get(key) {
                plans.entry(key).or_default().push(plan.to_owned());
            }
        }
    }
    Ok(ids
        .iter()
        .map(|id| {
            let mut of_key = plans.remove(id).unwrap_or_default();
            of_key.sort();
            of_key.dedup();
            records.remove(id).map(|k| (k, of_key))
        })
        .collect())
}

/// A page's body as MGET answered it (empty when the page is not there).
fn body_of(page: &Option<Vec<u8>>) -> &[u8] {
    page.as_deref().unwrap_or_default()
}

/// Key `id` as a script in [`Mode::Read`] answered it: its row and its plans page.
fn written_key(id: &str, read: &[Vec<u8>]) -> Result<Option<crate::NamedKey>, StoreError> {
    let [row, plans_page] = read else {
        return Err(StoreError::Backend(format!(
            "a write of key {id} answered {} values, not its row and its plans page",
            read.len()
        )));
    };
    Ok(
        named_in(&[id], [(pages::page_of(id), &row[..], &plans_page[..])])?
            .pop()
            .flatten(),
    )
}

/// Fields per SCAN page when loading records.
const SCAN_PAGE: u32 = 10_000;

const PUT_PLAN: &str = concat!(
    change_log!(),
    r"
if not redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  redis.call('ZADD', KEYS[3], redis.call('INCR', KEYS[4]), ARGV[1])
end
if redis.call('HGET', KEYS[1], ARGV[1]) == ARGV[2] then return 0 end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local version = redis.call('INCR', KEYS[2])
LOG(KEYS[5], version, '*')
return redis.call('PUBLISH', 'tollgate:changes', version)
"
);

/// `SADD` (ARGV[1] = 1) or `SREM` (0) of key `ARGV[3]` in plan `ARGV[2]`'s set `KEYS[1]`, its row
/// in the key's plans page `KEYS[5]` likewise, and a version bump when that changed anything (1,
/// else 0). A removed key's usage stays reachable through the plan's usage index (`KEYS[3]`).
/// `ARGV[4]` is the [`Mode`]: `read` answers the key's row in its keys page `KEYS[6]` (empty if
/// none) and its plans page as the write left them.
const BIND: &str = concat!(
    change_log!(),
    page_rows!(),
    r"
local function DONE(changed)
  if ARGV[4] ~= 'read' then return changed end
  local keys = redis.call('GET', KEYS[6]) or ''
  local s, e = ROW(keys, ARGV[3])
  return {s and string.sub(keys, s, e) or '', redis.call('GET', KEYS[5]) or ''}
end
if redis.call('SISMEMBER', KEYS[1], ARGV[3]) == tonumber(ARGV[1]) then return DONE(0) end
local page = redis.call('GET', KEYS[5]) or ''
local row = ARGV[2] .. ',' .. ARGV[3] .. '\n'
if ARGV[1] == '1' then
  redis.call('SADD', KEYS[1], ARGV[3])
  redis.call('SET', KEYS[5], DROP(page, row) .. row)
else
  redis.call('SREM', KEYS[1], ARGV[3])
  redis.call('SADD', KEYS[3], ARGV[3])
  redis.call('SET', KEYS[5], (DROP(page, row)))
end
local version = redis.call('INCR', KEYS[2])
LOG(KEYS[4], version, ARGV[3])
if ARGV[4] ~= 'batch' then redis.call('PUBLISH', 'tollgate:changes', version) end
return DONE(1)
"
);

/// Deletes plan `ARGV[1]`: its record, its set of keys, its rows in the plans pages `ARGV[2…]`.
const DELETE_PLAN: &str = concat!(
    change_log!(),
    r"
redis.call('HDEL', KEYS[1], ARGV[1])
-- Its keys' usage under it stays reachable.
local members = redis.call('SMEMBERS', KEYS[2])
for i = 1, #members, 1000 do
  redis.call('SADD', '{tg}:usage:' .. ARGV[1], unpack(members, i, math.min(i + 999, #members)))
end
redis.call('DEL', KEYS[2])
-- Its rows in the plans pages of its keys (`ARGV[2…]`).
local prefix = ARGV[1] .. ','
for i = 2, #ARGV do
  local kept = {}
  for row in string.gmatch(redis.call('GET', ARGV[i]) or '', '[^\n]+') do
    if string.sub(row, 1, #prefix) ~= prefix then kept[#kept + 1] = row .. '\n' end
  end
  redis.call('SET', ARGV[i], table.concat(kept))
end
redis.call('ZREM', KEYS[4], ARGV[1])
local version = redis.call('INCR', KEYS[3])
LOG(KEYS[5], version, '*')
redis.call('PUBLISH', 'tollgate:changes', version)
return 1
"
);

/// With `ARGV[1]` = `place`: places the plans (`KEYS[1]`) named in the rest of `ARGV`, in that
/// order, that are still there and have no place in `KEYS[2]` yet (written before places were
/// kept). With `drop`: removes the places of those that are gone.
const TIDY_PLACES: &str = r"
local place = ARGV[1] == 'place'
for i = 2, #ARGV do
  local id = ARGV[i]
  local there = redis.call('HEXISTS', KEYS[1], id) == 1
  if place and there and not redis.call('ZSCORE', KEYS[2], id) then
    redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), id)
  elseif not place and not there then
    redis.call('ZREM', KEYS[2], id)
  end
end
return 1
";

/// The least time a record read or write waits for Redis.
const RECORDS_TIMEOUT: Duration = Duration::from_secs(2);

impl RedisStore {
    /// A store for `settings`; connects on first use (and again after a failure).
    pub fn new(settings: RedisSettings) -> Result<Self, StoreError> {
        if settings.urls.is_empty() {
            return Err(StoreError::Backend("no Redis URL given".into()));
        }
        Ok(Self {
            settings,
            conn: Mutex::new(None),
        })
    }

    /// Checks that Redis answers.
    pub fn ping(&self) -> Result<(), StoreError> {
        self.with(|c| redis::cmd("PING").query::<String>(c).map(|_| ()))
    }

    fn connect(&self) -> Result<Connection, redis::RedisError> {
        // Records are never read or written on the request path (the limiter has its own
        // connection, on the configured timeout): a startup scan, an import's pipelined batches or
        // a flush on a busy Redis may take longer than a request may wait.
        let t = self.settings.timeout.max(RECORDS_TIMEOUT);
        if self.settings.cluster {
            let client = redis::cluster::ClusterClientBuilder::new(self.settings.urls.clone())
                .connection_timeout(t)
                .response_timeout(t)
                .build()?;
            Ok(Connection::Cluster(Box::new(client.get_connection()?)))
        } else {
            let client = redis::Client::open(self.settings.urls[0].as_str())?;
            let conn = client.get_connection_with_timeout(t)?;
            conn.set_read_timeout(Some(t))?;
            conn.set_write_timeout(Some(t))?;
            Ok(Connection::Single(conn))
        }
    }

    fn lock(&self) -> MutexGuard<'_, Option<Connection>> {
        self.conn.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on a connection, reconnecting first when the last one failed.
    fn with<T>(
        &self,
        f: impl FnOnce(&mut dyn ConnectionLike) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let mut guard = self.lock();
        if guard.is_none() {
            let mut conn = self.connect().map_err(backend)?;
            // On every new connection: Redis may have restarted empty, or been moved meanwhile.
            layout::ensure(conn.get(), &self.settings.urls[0])?;
            *guard = Some(conn);
        }
        let conn = guard
            .as_mut()
            .ok_or_else(|| StoreError::Backend("no connection".into()))?;
        match f(conn.get()) {
            Ok(v) => Ok(v),
            Err(e) => {
                if e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_unrecoverable_error()
                {
                    *guard = None;
                }
                Err(backend(e))
            }
        }
    }

    /// `read`'s answer once no write slipped in during it (the record version is the same before and
    /// after; at most five tries). Reads scan in pages, so a million keys never block Redis for long,
    /// and are not atomic.
    fn consistent<T>(
        &self,
        mut read: impl FnMut() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let mut attempt = 0;
        loop {
            let before = self.version()?;
            let out = read()?;
            attempt += 1;
            if self.version()? == before || attempt == 5 {
                return Ok(out);
            }
        }
    }

    /// Visits every entry of a hash (`HSCAN`: field and value) or a set (`SSCAN`), a page at a time.
    /// An entry can come twice: SCAN's guarantee.
    fn scan_pages<T: redis::FromRedisValue>(
        &self,
        scan: &str,
        key: &str,
        mut page: impl FnMut(Vec<T>) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let mut cursor = 0u64;
        loop {
            let (next, items): (u64, Vec<T>) = self.with(|c| {
                redis::cmd(scan)
                    .arg(key)
                    .arg(cursor)
                    .arg("COUNT")
                    .arg(SCAN_PAGE)
                    .query(c)
            })?;
            page(items)?;
            if next == 0 {
                return Ok(());
            }
            cursor = next;
        }
    }

    fn scan_hash(&self, key: &str) -> Result<Vec<(String, String)>, StoreError> {
        let mut out: Vec<(String, String)> = Vec::new();
        self.scan_pages("HSCAN", key, |page| {
            out.extend(page);
            Ok(())
        })?;
        out.sort();
        out.dedup_by(|a, b| a.0 == b.0);
        Ok(out)
    }

    /// Makes the plans' places match the plans: each plan without one (written by a version from
    /// before places) gets one after the others, by id, and places of plans gone are dropped. Two
    /// counts when nothing is amiss.
    fn tidy_plan_places(&self) -> Result<(), StoreError> {
        let (hash, order) = (keys::PLANS, keys::PLAN_ORDER);
        let records: u64 = self.with(|c| redis::cmd("HLEN").arg(hash).query(c))?;
        let places: u64 = self.with(|c| redis::cmd("ZCARD").arg(order).query(c))?;
        if records == places {
            return Ok(());
        }
        // Places first: a record written in between is then a record with a place, which the
        // script leaves alone, never a place without its record.
        let placed: Vec<String> =
            self.with(|c| redis::cmd("ZRANGE").arg(order).arg(0).arg(-1).query(c))?;
        let ids: Vec<String> = self.with(|c| redis::cmd("HKEYS").arg(hash).query(c))?;
        let (is_placed, is_record): (HashSet<&str>, HashSet<&str>) = (
            placed.iter().map(String::as_str).collect(),
            ids.iter().map(String::as_str).collect(),
        );
        let gone: Vec<&String> = placed
            .iter()
            .filter(|id| !is_record.contains(id.as_str()))
            .collect();
        let mut unplaced: Vec<&String> = ids
            .iter()
            .filter(|id| !is_placed.contains(id.as_str()))
            .collect();
        unplaced.sort();
        let script = Script::new(TIDY_PLACES);
        let run = |mode: &str, ids: &[&String]| {
            self.with(|c| {
                script
                    .key(hash)
                    .key(order)
                    .key(keys::PLACES)
                    .arg(mode)
                    .arg(ids)
                    .invoke::<i64>(c)
            })
        };
        for page in gone.chunks(PIPELINE_PAGE) {
            run("drop", page)?;
        }
        for page in unplaced.chunks(PIPELINE_PAGE) {
            run("place", page)?;
        }
        Ok(())
    }

    /// The places in `order`, by id.
    fn places(&self, order: &str) -> Result<HashMap<String, u64>, StoreError> {
        let placed: Vec<(String, u64)> = self.with(|c| {
            redis::cmd("ZRANGE")
                .arg(order)
                .arg(0)
                .arg(-1)
                .arg("WITHSCORES")
                .query(c)
        })?;
        Ok(placed.into_iter().collect())
    }

    /// Every plan, in creation order (plans placed by this version's first start go by id).
    fn ordered_plans(&self) -> Result<Vec<UsagePlan>, StoreError> {
        self.tidy_plan_places()?;
        let places = self.places(keys::PLAN_ORDER)?;
        let mut plans = parse_plans(self.scan_hash(keys::PLANS)?)?;
        plans
            .sort_by_cached_key(|p| (places.get(&p.id).copied().unwrap_or(u64::MAX), p.id.clone()));
        Ok(plans)
    }

    /// Hands every page named by `name` (keys or plans) to `each` (name, body; empty when missing)
    /// as it is read, a round trip's worth at a time: a start never holds them all (~100 MB at a
    /// million keys, which the allocator would keep).
    fn each_page(
        &self,
        name: fn(usize) -> String,
        mut each: impl FnMut(&str, &[u8]) -> Result<(), StoreError>,
    ) -> Result<(), StoreError> {
        let all: Vec<usize> = (0..pages::PAGES).collect();
        for chunk in all.chunks(PAGES_PER_TRIP) {
            // One MGET (a cluster client does not pipeline; the pages are under `{tg}`).
            let names: Vec<String> = chunk.iter().map(|&p| name(p)).collect();
            let bodies: Bodies = self.with(|c| redis::cmd("MGET").arg(&names).query(c))?;
            for (name, body) in names.iter().zip(bodies) {
                each(name, body_of(&body))?;
            }
        }
        Ok(())
    }

    /// The ids of the keys named one of `names`, from the keys pages (names are not indexed).
    fn ids_named(&self, names: &[&str]) -> Result<Vec<String>, StoreError> {
        let wanted: HashSet<&str> = names.iter().copied().collect();
        let mut ids = Vec::new();
        self.each_page(pages::keys_page, |name, body| {
            for row in pages::key_rows(name, body) {
                let (id, record) = row?;
                let k: ServedKey<'_> =
                    serde_json::from_str(record).map_err(|e| corrupt_key(id, e.to_string()))?;
                if wanted.contains(&*k.name) {
                    ids.push(id.to_owned());
                }
            }
            Ok(())
        })?;
        Ok(ids)
    }

    /// The record version: changes whenever a plan, key or binding does.
    pub fn version(&self) -> Result<u64, StoreError> {
        self.with(|c| Cmd::get(keys::VERSION).query::<Option<u64>>(c))
            .map(|v| v.unwrap_or(0))
    }

    /// What changed since version `seen`: the record version now, and the ids of the keys changed
    /// since (each once), when the change log holds every change since and none was a plan's.
    /// `None` for the ids means everything must be read again: a plan changed, or the log no longer
    /// reaches back to `seen` (it keeps the last 10,000), or Redis lost data.
    pub fn changes_since(&self, seen: u64) -> Result<(u64, Option<Vec<String>>), StoreError> {
        // One script, so that the version and the log are read at one instant (a cluster runs no
        // MULTI across connections; both keys are under `{tg}`).
        let (version, logged): (u64, Vec<String>) = self.with(|c| {
            Script::new(CHANGES_SINCE)
                .key(keys::VERSION)
                .key(keys::CHANGE_LOG)
                .arg(format!("({seen}"))
                .invoke(c)
        })?;
        if version < seen || logged.len() as u64 != version - seen {
            return Ok((version, None));
        }
        let mut ids = Vec::with_capacity(logged.len());
        for (entry, expected) in logged.iter().zip(seen + 1..) {
            match entry.split_once(' ') {
                Some((v, id)) if v.parse() == Ok(expected) && id != "*" => ids.push(id.to_owned()),
                _ => return Ok((version, None)),
            }
        }
        ids.sort_unstable();
        ids.dedup();
        Ok((version, Some(ids)))
    }

    fn days(
        &self,
        hash_key: &str,
        from: EpochDay,
        to: EpochDay,
    ) -> Result<Vec<(EpochDay, i64)>, StoreError> {
        let all: Vec<(u32, i64)> = self.with(|c| Cmd::hgetall(hash_key).query(c))?;
        let mut days: Vec<(EpochDay, i64)> = all
            .into_iter()
            .map(|(d, n)| (EpochDay(d), n))
            .filter(|(d, _)| from <= *d && *d <= to)
            .collect();
        days.sort();
        Ok(days)
    }

    fn set_binding(&self, plan_id: &str, key_id: &str, member: bool) -> Result<(), StoreError> {
        let script = Script::new(BIND);
        let call = binding_call(&script, plan_id, key_id, member, Mode::Announce)?;
        self.with(|c| call.invoke::<i64>(c))?;
        Ok(())
    }

    /// The keys whose per-day hashes to read: `key_id`, or the plan's members and every key in its
    /// `index` (usage is counted by the data plane's script, which cannot touch the index's slot).
    /// Appends the days of `series` from `from` to `to` kept in the hash `days` of `holder`.
    fn read_series(
        &self,
        series: Series,
        plan_id: &str,
        days: &str,
        holder: String,
        (from, to): (EpochDay, EpochDay),
        out: &mut Vec<DayValue>,
    ) -> Result<(), StoreError> {
        for (day, value) in self.days(days, from, to)? {
            let value = match series {
                Series::QuotaAdjustment => {
                    crate::readable_adjustment(plan_id, &holder, day, Some(value)).unwrap_or(0)
                }
                _ => value.max(0),
            };
            if value != 0 {
                out.push(DayValue {
                    key_id: holder.clone(),
                    day,
                    value,
                });
            }
        }
        Ok(())
    }

    /// Saves event `id` where it stands (`None`: delivered, gone).
    fn save_event(&self, id: &str, event: Option<&OutboxEvent>) -> Result<(), StoreError> {
        let script = Script::new(SAVE_EVENT);
        let mut call = script.prepare_invoke();
        call.key(keys::EVENTS)
            .key(keys::EVENTS_DUE)
            .key(keys::EVENTS_FAILED)
            .arg(id);
        match event {
            None => {
                call.arg("delete");
            }
            Some(e) => {
                let json =
                    serde_json::to_string(e).map_err(|e| StoreError::Backend(e.to_string()))?;
                match e.status {
                    EventStatus::Pending => call.arg(json).arg("due").arg(e.next_at),
                    EventStatus::Failed => call.arg(json).arg("failed").arg(e.created),
                };
            }
        }
        self.with(|c| call.invoke::<i64>(c))?;
        Ok(())
    }

    /// Adds `delta` to day `day` of the adjustments hash `hash`, within [`crate::MAX_ADJUSTMENT`].
    fn adjust(&self, hash: &str, day: EpochDay, delta: i64) -> Result<(), StoreError> {
        // HINCRBY refuses to overflow; the range is checked on the result, and undone past it.
        let sum: i64 = self.with(|c| Cmd::hincr(hash, day.0, delta).query(c))?;
        if let Err(e) = crate::added_adjustment(sum - delta, delta) {
            self.with(|c| Cmd::hincr(hash, day.0, -delta).query::<i64>(c))?;
            return Err(e);
        }
        Ok(())
    }

    fn indexed_keys(
        &self,
        plan_id: &str,
        index: &str,
        key_id: Option<&str>,
    ) -> Result<Vec<String>, StoreError> {
        if let Some(k) = key_id {
            return Ok(vec![k.to_string()]);
        }
        let (mut ids, members): (Vec<String>, Vec<String>) = self.with(|c| {
            let ids = Cmd::smembers(index).query(c)?;
            Ok((ids, Cmd::smembers(keys::plan_keys(plan_id)).query(c)?))
        })?;
        ids.extend(members);
        ids.sort();
        ids.dedup();
        Ok(ids)
    }
}

/// Plans from their stored JSON, by id.
fn parse_plans(stored: Vec<(String, String)>) -> Result<Vec<UsagePlan>, StoreError> {
    stored
        .into_iter()
        .map(|(id, body)| {
            serde_json::from_str(&body).map_err(|e| StoreError::Corrupt {
                id,
                reason: e.to_string(),
            })
        })
        .collect()
}

impl Store for RedisStore {
    fn series(
        &self,
        series: Series,
        plan_id: &str,
        key_id: Option<&str>,
        from: EpochDay,
        to: EpochDay,
    ) -> Result<Vec<DayValue>, StoreError> {
        let (index, days_of): (String, fn(&str, &str) -> String) = match series {
            Series::Used => (keys::usage_index(plan_id), keys::usage),
            Series::Throttled => (keys::usage_index(plan_id), keys::throttled),
            Series::QuotaExceeded => (keys::usage_index(plan_id), keys::quota_exceeded),
            Series::QuotaAdjustment => (keys::adjustments_index(plan_id), keys::adjustments),
        };
        let mut out = Vec::new();
        for key in self.indexed_keys(plan_id, &index, key_id)? {
            self.read_series(
                series,
                plan_id,
                &days_of(&key, plan_id),
                key,
                (from, to),
                &mut out,
            )?;
        }
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
        let days_of: fn(&str, &str) -> String = match series {
            Series::Used => keys::customer_usage,
            Series::QuotaAdjustment => keys::customer_adjustments,
            Series::Throttled | Series::QuotaExceeded => return Ok(Vec::new()),
        };
        let mut customers = customers.to_vec();
        customers.sort_unstable();
        customers.dedup();
        let mut out = Vec::new();
        for c in customers {
            let hash = days_of(c, plan_id);
            self.read_series(series, plan_id, &hash, c.to_owned(), (from, to), &mut out)?;
        }
        Ok(out)
    }

    fn plans(&self) -> Result<Vec<UsagePlan>, StoreError> {
        self.ordered_plans()
    }

    fn load(&self) -> Result<Records, StoreError> {
        let (plans, mut placed, mut bindings) = self.consistent(|| {
            let plans = self.ordered_plans()?;
            let known: HashSet<&str> = plans.iter().map(|p| p.id.as_str()).collect();
            let (mut placed, mut bindings) = (Vec::new(), Vec::new());
            self.each_page(pages::keys_page, |name, body| {
                for row in pages::key_rows(name, body) {
                    let (id, record) = row?;
                    placed.push(parse_placed_key(id, record)?);
                }
                Ok(())
            })?;
            self.each_page(pages::plans_page, |name, body| {
                for row in pages::plan_rows(name, body) {
                    let (plan, key) = row?;
                    if known.contains(plan) {
                        bindings.push((plan.to_owned(), key.to_owned()));
                    }
                }
                Ok(())
            })?;
            Ok((plans, placed, bindings))
        })?;
        placed.sort_by(|(a, at), (b, bt)| {
            (at.unwrap_or(u64::MAX), &a.id).cmp(&(bt.unwrap_or(u64::MAX), &b.id))
        });
        bindings.sort();
        bindings.dedup();
        Ok(Records {
            plans,
            keys: placed.into_iter().map(|(key, _)| key).collect(),
            bindings,
        })
    }

    fn load_index(&self) -> Result<KeyIndex, StoreError> {
        // Pages are read a round trip at a time while writes go on: a key written meanwhile may be
        // read half old, half new. The caller read the record version before, and reads the keys
        // changed since again, whole, once this is served (see `changes_since`).
        let mut index = KeyIndex::new(self.ordered_plans()?);
        self.each_page(pages::keys_page, |name, body| {
            for row in pages::key_rows(name, body) {
                let (id, record) = row?;
                let k: ServedKey<'_> =
                    serde_json::from_str(record).map_err(|e| corrupt_key(id, e.to_string()))?;
                let (key_name, hash, terms) = served(id, k)?;
                index.push_key(id, &key_name, hash, terms);
            }
            Ok(())
        })?;
        let mut binder = index.binder();
        self.each_page(pages::plans_page, |name, body| {
            for row in pages::plan_rows(name, body) {
                let (plan, key) = row?;
                binder.bind(plan, key);
            }
            Ok(())
        })?;
        binder.finish();
        Ok(index)
    }

    fn key(&self, key_id: &str) -> Result<Option<ApiKey>, StoreError> {
        Ok(self
            .keys_by_id(&[key_id])?
            .pop()
            .flatten()
            .map(|(key, _)| key))
    }

    fn keys_named(&self, names: &[&str]) -> Result<Vec<Option<crate::NamedKey>>, StoreError> {
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let ids = self.ids_named(names)?;
        let refs: Vec<&str> = ids.iter().map(String::as_str).collect();
        let found = self.keys_by_id(&refs)?.into_iter().flatten();
        Ok(crate::oldest_named(names, found))
    }

    fn keys_by_id(&self, ids: &[&str]) -> Result<Vec<Option<crate::NamedKey>>, StoreError> {
        let mut found = Vec::with_capacity(ids.len());
        for chunk in ids.chunks(KEYS_PER_TRIP) {
            let mut pages: Vec<usize> = chunk.iter().map(|id| pages::page_of(id)).collect();
            pages.sort_unstable();
            pages.dedup();
            // One MGET: a key's row and its memberships' rows read at one instant (the pages are
            // under `{tg}`). Not a script: Redis copies each page into Lua and out again, which
            // cost it four times as much (17 µs a pair of pages, against 4).
            let mut names: Vec<String> = pages.iter().map(|&p| pages::keys_page(p)).collect();
            names.extend(pages.iter().map(|&p| pages::plans_page(p)));
            let mut keys_pages: Bodies = self.with(|c| redis::cmd("MGET").arg(&names).query(c))?;
            let plans_pages = keys_pages.split_off(pages.len());
            let read =
                pages.iter().zip(&keys_pages).zip(&plans_pages).map(
                    |((&p, keys_page), plans_page)| (p, body_of(keys_page), body_of(plans_page)),
                );
            found.extend(named_in(chunk, read)?);
        }
        Ok(found)
    }

    fn put_key_read(&self, key: &ApiKey) -> Result<Option<crate::NamedKey>, StoreError> {
        let script = Script::new(PUT_KEY);
        let call = put_key_call(&script, key, Mode::Read)?;
        let read: Vec<Vec<u8>> = self.with(|c| call.invoke(c))?;
        if read.is_empty() {
            return Err(StoreError::DuplicateKeyValue);
        }
        written_key(&key.id, &read)
    }

    fn bind_read(
        &self,
        plan_id: &str,
        key_id: &str,
    ) -> Result<Option<crate::NamedKey>, StoreError> {
        let script = Script::new(BIND);
        let call = binding_call(&script, plan_id, key_id, true, Mode::Read)?;
        let read: Vec<Vec<u8>> = self.with(|c| call.invoke(c))?;
        written_key(key_id, &read)
    }

    fn keys_from(&self, from: Option<u64>, limit: usize) -> Result<Vec<(u64, ApiKey)>, StoreError> {
        let mut out = Vec::with_capacity(limit.min(PIPELINE_PAGE));
        let mut from = from.unwrap_or(0);
        while out.len() < limit {
            let want = (limit - out.len()).min(PAGES_PER_TRIP);
            let placed: Vec<(String, u64)> = self.with(|c| {
                Script::new(KEYS_FROM)
                    .key(keys::PLACES)
                    .arg(from)
                    .arg(want)
                    .invoke(c)
            })?;
            let ids: Vec<&str> = placed.iter().map(|(id, _)| id.as_str()).collect();
            for ((_, place), key) in placed.iter().zip(self.keys_by_id(&ids)?) {
                // A key deleted between the two reads is passed over.
                if let Some((key, _)) = key {
                    out.push((*place, key));
                }
            }
            match placed.last() {
                Some(&(_, last)) if placed.len() == want => from = last + 1,
                _ => break,
            }
        }
        Ok(out)
    }

    fn put_plan(&self, plan: &UsagePlan) -> Result<(), StoreError> {
        let body = serde_json::to_string(plan).map_err(|e| StoreError::Backend(e.to_string()))?;
        self.with(|c| {
            Script::new(PUT_PLAN)
                .key(keys::PLANS)
                .key(keys::VERSION)
                .key(keys::PLAN_ORDER)
                .key(keys::PLACES)
                .key(keys::CHANGE_LOG)
                .arg(&plan.id)
                .arg(body)
                .invoke::<i64>(c)
        })?;
        Ok(())
    }

    fn put_key(&self, key: &ApiKey) -> Result<(), StoreError> {
        let script = Script::new(PUT_KEY);
        let call = put_key_call(&script, key, Mode::Announce)?;
        let done: i64 = self.with(|c| call.invoke(c))?;
        if done == 0 {
            return Err(StoreError::DuplicateKeyValue);
        }
        Ok(())
    }

    fn put_records(&self, records: &Records) -> Result<(), StoreError> {
        if self.settings.cluster {
            // The cluster client does not pipeline.
            return crate::put_each(self, records);
        }
        let (put_key, bind) = (Script::new(PUT_KEY), Script::new(BIND));
        for plan in &records.plans {
            self.put_plan(plan)?;
        }
        // The same scripts as one-at-a-time writes, a page per round trip.
        let pipeline = |calls: Vec<redis::ScriptInvocation<'_>>| -> Result<Vec<i64>, StoreError> {
            let mut pipe = redis::pipe();
            pipe.load_script(&put_key)
                .ignore()
                .load_script(&bind)
                .ignore();
            for call in &calls {
                pipe.invoke_script(call);
            }
            self.with(|c| pipe.query(c))
        };
        // Announced once when done (also after a failure part-way: what was written is served).
        let announce = || {
            self.with(|c| {
                redis::cmd("PUBLISH")
                    .arg(keys::CHANGES)
                    .arg("batch")
                    .query::<i64>(c)
            })
        };
        let written = (|| {
            for page in records.keys.chunks(PIPELINE_PAGE) {
                let calls = page
                    .iter()
                    .map(|k| put_key_call(&put_key, k, Mode::Batch))
                    .collect::<Result<Vec<_>, _>>()?;
                if pipeline(calls)?.contains(&0) {
                    return Err(StoreError::DuplicateKeyValue);
                }
            }
            for page in records.bindings.chunks(PIPELINE_PAGE) {
                let calls = page
                    .iter()
                    .map(|(plan, key)| binding_call(&bind, plan, key, true, Mode::Batch))
                    .collect::<Result<Vec<_>, _>>()?;
                pipeline(calls)?;
            }
            Ok(())
        })();
        if !records.keys.is_empty() || !records.bindings.is_empty() {
            announce()?;
        }
        written
    }

    fn delete_key(&self, key_id: &str) -> Result<(), StoreError> {
        let page = pages::page_of(key_id);
        self.with(|c| {
            Script::new(DELETE_KEY)
                .key(pages::keys_page(page))
                .key(pages::plans_page(page))
                .key(keys::PLANS)
                .key(keys::LAST_USED)
                .key(keys::VERSION)
                .key(keys::CHANGE_LOG)
                .arg(key_id)
                .invoke::<i64>(c)
        })?;
        Ok(())
    }

    fn delete_plan(&self, plan_id: &str) -> Result<(), StoreError> {
        // The plans pages of its keys: a membership added after this read keeps a row for a plan
        // that is gone, which every reader passes over.
        let members: Vec<String> =
            self.with(|c| Cmd::smembers(keys::plan_keys(plan_id)).query(c))?;
        let mut touched: Vec<usize> = members.iter().map(|k| pages::page_of(k)).collect();
        touched.sort_unstable();
        touched.dedup();
        self.with(|c| {
            let script = Script::new(DELETE_PLAN);
            let mut call = script.prepare_invoke();
            call.key(keys::PLANS)
                .key(keys::plan_keys(plan_id))
                .key(keys::VERSION)
                .key(keys::PLAN_ORDER)
                .key(keys::CHANGE_LOG)
                .arg(plan_id);
            for &p in &touched {
                call.arg(pages::plans_page(p));
            }
            call.invoke::<i64>(c)
        })?;
        Ok(())
    }

    fn bind(&self, plan_id: &str, key_id: &str) -> Result<(), StoreError> {
        self.set_binding(plan_id, key_id, true)
    }

    fn unbind(&self, plan_id: &str, key_id: &str) -> Result<(), StoreError> {
        self.set_binding(plan_id, key_id, false)
    }

    fn adjust_quota(
        &self,
        plan_id: &str,
        key_id: &str,
        day: EpochDay,
        delta: i64,
    ) -> Result<(), StoreError> {
        self.adjust(&keys::adjustments(key_id, plan_id), day, delta)?;
        self.with(|c| Cmd::sadd(keys::adjustments_index(plan_id), key_id).query::<i64>(c))?;
        Ok(())
    }

    fn adjust_customer_quota(
        &self,
        plan_id: &str,
        customer_id: &str,
        day: EpochDay,
        delta: i64,
    ) -> Result<(), StoreError> {
        self.adjust(
            &keys::customer_adjustments(customer_id, plan_id),
            day,
            delta,
        )
    }

    fn add_credits(
        &self,
        key_id: &str,
        idempotency_key: &str,
        amount: u64,
        _at: i64,
    ) -> Result<bool, StoreError> {
        let refilled = refilled_by(idempotency_key).map_or(0, |d| d.0);
        let added: i64 = self.with(|c| {
            Script::new(ADD_CREDITS)
                .key(keys::credit_ledger(key_id))
                .key(keys::credits(key_id))
                .arg(idempotency_key)
                .arg(amount.min(MAX_CREDITS))
                .arg(refilled)
                .arg(MAX_CREDITS)
                .invoke(c)
        })?;
        // Apart from the script: the index lives in another cluster slot (and adding twice is safe).
        self.with(|c| Cmd::sadd(keys::CREDIT_KEYS, key_id).query::<i64>(c))?;
        Ok(added == 1)
    }

    fn spend_credits(&self, spent: &[CreditSpend]) -> Result<(), StoreError> {
        let script = Script::new(SPEND_CREDITS);
        self.with(|c| {
            for s in spent.iter().filter(|s| s.spent > 0) {
                script
                    .key(keys::credits(&s.key_id))
                    .arg(s.spent.min(MAX_CREDITS))
                    .invoke::<i64>(c)?;
            }
            Ok(())
        })
    }

    fn credit_balances(&self) -> Result<Vec<CreditBalance>, StoreError> {
        let mut ids: Vec<String> = self.with(|c| Cmd::smembers(keys::CREDIT_KEYS).query(c))?;
        ids.sort_unstable();
        let mut out = Vec::with_capacity(ids.len());
        for key_id in ids {
            out.extend(self.credit_balance(&key_id)?);
        }
        Ok(out)
    }

    fn credit_balance(&self, key_id: &str) -> Result<Option<CreditBalance>, StoreError> {
        let (b, w): (Option<i64>, Option<u32>) = self.with(|c| {
            redis::cmd("HMGET")
                .arg(keys::credits(key_id))
                .arg("b")
                .arg("w")
                .query(c)
        })?;
        Ok(b.map(|b| CreditBalance {
            key_id: key_id.to_owned(),
            balance: u64::try_from(b).unwrap_or(0),
            refilled: w.filter(|&w| w > 0).map(EpochDay),
        }))
    }

    fn enqueue_event(&self, claim: &str, event: &OutboxEvent) -> Result<bool, StoreError> {
        let json = serde_json::to_string(event).map_err(|e| StoreError::Backend(e.to_string()))?;
        let queued: i64 = self.with(|c| {
            Script::new(ENQUEUE_EVENT)
                .key(keys::event_claim(claim))
                .key(keys::EVENTS)
                .key(keys::EVENTS_DUE)
                .arg(&event.id)
                .arg(&json)
                .arg(event.next_at)
                .arg(EVENT_CLAIM_SECS)
                .invoke(c)
        })?;
        Ok(queued == 1)
    }

    fn lease_events(
        &self,
        now: i64,
        lease_until: i64,
        limit: usize,
    ) -> Result<Vec<OutboxEvent>, StoreError> {
        let found: Vec<Option<String>> = self.with(|c| {
            Script::new(LEASE_EVENTS)
                .key(keys::EVENTS)
                .key(keys::EVENTS_DUE)
                .arg(now)
                .arg(lease_until)
                .arg(limit)
                .invoke(c)
        })?;
        found
            .into_iter()
            .flatten()
            .map(|j| parse_event(&j))
            .collect()
    }

    fn record_attempt(&self, id: &str, attempt: &Attempt) -> Result<(), StoreError> {
        if let Attempt::Delivered = attempt {
            return self.save_event(id, None);
        }
        let Some(json) = self.with(|c| Cmd::hget(keys::EVENTS, id).query::<Option<String>>(c))?
        else {
            return Ok(());
        };
        let mut event = parse_event(&json)?;
        event.attempts += 1;
        match attempt {
            Attempt::Retry { at, error } => {
                (event.next_at, event.last_error) = (*at, Some(error.clone()));
            }
            Attempt::Failed { error } => {
                (event.status, event.last_error) = (EventStatus::Failed, Some(error.clone()));
            }
            Attempt::Delivered => {}
        }
        self.save_event(id, Some(&event))
    }

    fn export_state(&self, exporter: &str) -> Result<ExportState, StoreError> {
        let (version, cursor): (Option<u64>, Option<i64>) = self.with(|c| {
            redis::cmd("HMGET")
                .arg(keys::export(exporter))
                .arg("v")
                .arg("cursor")
                .query(c)
        })?;
        Ok(ExportState {
            version: version.unwrap_or(0),
            cursor,
        })
    }

    fn export_marks(&self, exporter: &str, day: EpochDay) -> Result<Vec<ExportMark>, StoreError> {
        let name = keys::export_marks(exporter, day);
        let all: HashMap<String, String> = self.with(|c| Cmd::hgetall(&name).query(c))?;
        all.into_iter()
            .map(|(field, value)| {
                let corrupt = |reason: &str| StoreError::Corrupt {
                    id: format!("{name} {field}"),
                    reason: reason.into(),
                };
                let (plan_id, holder): (String, String) =
                    serde_json::from_str(&field).map_err(|_| corrupt("not [plan, holder]"))?;
                let mut counts = [0u64; 3];
                let mut parts = value.split(' ');
                for c in &mut counts {
                    *c = parts
                        .next()
                        .and_then(|p| p.parse().ok())
                        .ok_or_else(|| corrupt("not three counts"))?;
                }
                Ok(ExportMark {
                    day,
                    plan_id,
                    holder,
                    counts,
                })
            })
            .collect()
    }

    fn commit_export(&self, exporter: &str, commit: &ExportCommit<'_>) -> Result<bool, StoreError> {
        let script = Script::new(COMMIT_EXPORT);
        let mut invocation = script.prepare_invoke();
        invocation
            .key(keys::export(exporter))
            .key(keys::export_batches(exporter))
            .key(keys::export_windows(exporter))
            .key(keys::export_pending(exporter))
            .key(keys::export_marks(
                exporter,
                EpochDay(EpochDay::from_secs(commit.keep_from).0.saturating_sub(1)),
            ));
        let mut days: Vec<EpochDay> = commit.marks.iter().map(|m| m.day).collect();
        days.sort_unstable();
        days.dedup();
        for day in &days {
            invocation.key(keys::export_marks(exporter, *day));
        }
        let (window, start, records) = commit.batch.map_or((String::new(), 0, ""), |b| {
            (export_window(b.start, b.end), b.start, b.records.as_str())
        });
        invocation
            .arg(commit.version)
            .arg(commit.cursor.map(|c| c.to_string()).unwrap_or_default())
            .arg(window)
            .arg(start)
            .arg(records)
            .arg(commit.keep_from)
            .arg(EVENT_CLAIM_SECS);
        for m in commit.marks {
            let index = days.binary_search(&m.day).unwrap_or(0) + 6;
            let field = serde_json::to_string(&(&m.plan_id, &m.holder))
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            let [u, t, q] = m.counts;
            invocation.arg(index).arg(field).arg(format!("{u} {t} {q}"));
        }
        let made: i64 = self.with(|c| invocation.invoke(c))?;
        Ok(made == 1)
    }

    fn export_batches(
        &self,
        exporter: &str,
        from: i64,
        to: i64,
        pending: bool,
    ) -> Result<Vec<ExportBatch>, StoreError> {
        let to = format!("({to}");
        // Listing the pending ones, all are undelivered; listing all, the pending set says which.
        let (windows, undelivered): (Vec<String>, Option<HashSet<String>>) = self.with(|c| {
            let pending_set = keys::export_pending(exporter);
            if pending {
                return Ok((Cmd::zrangebyscore(pending_set, from, &to).query(c)?, None));
            }
            let all = Cmd::zrangebyscore(keys::export_windows(exporter), from, &to).query(c)?;
            let undelivered = Cmd::zrangebyscore(pending_set, from, &to).query(c)?;
            Ok((all, Some(undelivered)))
        })?;
        if windows.is_empty() {
            return Ok(Vec::new());
        }
        let found: Vec<Option<String>> = self.with(|c| {
            redis::cmd("HMGET")
                .arg(keys::export_batches(exporter))
                .arg(&windows)
                .query(c)
        })?;
        let mut batches = Vec::with_capacity(windows.len());
        for (window, records) in windows.iter().zip(found) {
            let Some(records) = records else { continue };
            let (start, end) = window
                .split_once('-')
                .and_then(|(s, e)| Some((s.parse().ok()?, e.parse().ok()?)))
                .ok_or_else(|| StoreError::Corrupt {
                    id: format!("{} {window}", keys::export_batches(exporter)),
                    reason: "not a window start-end".into(),
                })?;
            batches.push(ExportBatch {
                start,
                end,
                records,
                delivered: undelivered.as_ref().is_some_and(|u| !u.contains(window)),
            });
        }
        batches.sort_by_key(|b| (b.start, b.end));
        Ok(batches)
    }

    fn export_delivered(&self, exporter: &str, start: i64, end: i64) -> Result<(), StoreError> {
        self.with(|c| {
            Cmd::zrem(keys::export_pending(exporter), export_window(start, end)).query::<i64>(c)
        })?;
        Ok(())
    }

    fn events(&self, status: EventStatus, limit: usize) -> Result<Vec<OutboxEvent>, StoreError> {
        let set = match status {
            EventStatus::Pending => keys::EVENTS_DUE,
            EventStatus::Failed => keys::EVENTS_FAILED,
        };
        let end = isize::try_from(limit)
            .unwrap_or(isize::MAX)
            .saturating_sub(1);
        let ids: Vec<String> = self.with(|c| Cmd::zrange(set, 0, end).query(c))?;
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let found: Vec<Option<String>> =
            self.with(|c| redis::cmd("HMGET").arg(keys::EVENTS).arg(&ids).query(c))?;
        let mut events: Vec<OutboxEvent> = found
            .into_iter()
            .flatten()
            .map(|j| parse_event(&j))
            .collect::<Result<_, _>>()?;
        events.sort_by(|a, b| (a.created, &a.id).cmp(&(b.created, &b.id)));
        Ok(events)
    }

    fn retry_event(&self, id: &str, now: i64) -> Result<bool, StoreError> {
        let Some(json) = self.with(|c| Cmd::hget(keys::EVENTS, id).query::<Option<String>>(c))?
        else {
            return Ok(false);
        };
        let mut event = parse_event(&json)?;
        if event.status != EventStatus::Failed {
            return Ok(false);
        }
        (event.status, event.next_at) = (EventStatus::Pending, now);
        self.save_event(id, Some(&event))?;
        Ok(true)
    }

    fn add_customer_usage(&self, deltas: &[CustomerDelta]) -> Result<(), StoreError> {
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.with(|c| {
            for d in deltas.iter().filter(|d| d.count > 0) {
                let hash = keys::customer_usage(&d.customer_id, &d.plan_id);
                Cmd::hincr(hash, d.day.0, n(d.count)).query::<i64>(c)?;
            }
            Ok(())
        })
    }

    fn add_usage(&self, deltas: &[UsageDelta]) -> Result<(), StoreError> {
        if deltas.is_empty() {
            return Ok(());
        }
        let note_last_used = Script::new(NOTE_LAST_USED);
        let n = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
        self.with(|c| {
            for d in deltas {
                let counts = [
                    (keys::usage(&d.key_id, &d.plan_id), d.count),
                    (keys::throttled(&d.key_id, &d.plan_id), d.throttled),
                    (
                        keys::quota_exceeded(&d.key_id, &d.plan_id),
                        d.quota_exceeded,
                    ),
                ];
                let mut counted = false;
                for (hash, count) in counts.into_iter().filter(|(_, v)| *v > 0) {
                    Cmd::hincr(hash, d.day.0, n(count)).query::<i64>(c)?;
                    counted = true;
                }
                if counted {
                    Cmd::sadd(keys::usage_index(&d.plan_id), &d.key_id).query::<i64>(c)?;
                }
                if let Some(at) = d.last_used {
                    note_last_used
                        .key(keys::LAST_USED)
                        .arg(&d.key_id)
                        .arg(at)
                        .invoke::<i64>(c)?;
                }
            }
            Ok(())
        })
    }

    fn session_epoch(&self, user: &str) -> Result<u64, StoreError> {
        let epoch: Option<u64> = self.with(|c| Cmd::hget(keys::SESSIONS, user).query(c))?;
        Ok(epoch.unwrap_or(0))
    }

    fn end_sessions(&self, user: &str) -> Result<u64, StoreError> {
        self.with(|c| Cmd::hincr(keys::SESSIONS, user, 1).query(c))
    }

    fn last_used(&self, key_ids: &[&str]) -> Result<Vec<Option<u64>>, StoreError> {
        if key_ids.is_empty() {
            return Ok(Vec::new());
        }
        self.with(|c| {
            redis::cmd("HMGET")
                .arg(keys::LAST_USED)
                .arg(key_ids)
                .query(c)
        })
    }
}

/// An outbox event as stored.
fn parse_event(json: &str) -> Result<OutboxEvent, StoreError> {
    serde_json::from_str(json).map_err(|e| StoreError::Corrupt {
        id: "outbox event".into(),
        reason: e.to_string(),
    })
}

/// A key record as stored in the keys hash.
fn parse_key(id: &str, body: &str) -> Result<ApiKey, StoreError> {
    parse_placed_key(id, body).map(|(key, _)| key)
}

/// Key `id` from its record, and its place in listings (none in records from before layout 2).
fn parse_placed_key(id: &str, body: &str) -> Result<(ApiKey, Option<u64>), StoreError> {
    let k: StoredKey = serde_json::from_str(body).map_err(|e| corrupt_key(id, e.to_string()))?;
    let key = ApiKey {
        value_hash: parse_hash(id, &k.value_sha256)?,
        id: id.to_owned(),
        name: k.name,
        description: k.description,
        customer_id: k.customer_id,
        enabled: k.enabled,
        created_date: k.created_date,
        last_updated_date: k.last_updated_date.unwrap_or(k.created_date),
        sealed_value: k.sealed_value.as_deref().and_then(|s| hex::decode(s).ok()),
        tags: k.tags,
        value_prefix: k.value_prefix,
        value_length: k.value_length,
        previous: k.previous.map(|p| p.parse(id)).transpose()?,
        credits: k.credits,
    };
    Ok((key, k.place))
}

/// What the gateway serves of a stored key (the rest of the record is skipped, not decoded).
#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServedKey<'a> {
    #[serde(borrow)]
    name: std::borrow::Cow<'a, str>,
    #[serde(default = "yes")]
    enabled: bool,
    #[serde(default)]
    expires_at: Option<u64>,
    #[serde(default, borrow)]
    allowed_source_ips: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    customer_id: Option<std::borrow::Cow<'a, str>>,
    #[serde(default, borrow)]
    credit_refill: Option<std::borrow::Cow<'a, str>>,
    #[serde(default)]
    credits: bool,
    #[serde(default, flatten)]
    previous: Option<StoredPrevious>,
    #[serde(borrow)]
    value_sha256: std::borrow::Cow<'a, str>,
}

/// What the gateway serves of key `id`: its name (borrowed from the page or record it was read
/// from, as the index copies it), value hash and terms.
fn served<'k>(
    id: &str,
    k: ServedKey<'k>,
) -> Result<(std::borrow::Cow<'k, str>, KeyHash, KeyTerms), StoreError> {
    let terms = KeyTerms {
        enabled: k.enabled,
        expires_at: k.expires_at,
        previous: k.previous.map(|p| p.parse(id)).transpose()?,
        sources: k.allowed_source_ips.as_deref().map(IpNetworks::stored),
        customer_id: k.customer_id.as_deref().map(Box::from),
        refill: k
            .credit_refill
            .as_deref()
            .and_then(|r| Refill::parse(r).ok()),
        credits: k.credits,
    };
    Ok((k.name, parse_hash(id, &k.value_sha256)?, terms))
}

fn parse_hash(id: &str, hex: &str) -> Result<KeyHash, StoreError> {
    let mut hash = [0u8; 32];
    hex::decode_to_slice(hex, &mut hash)
        .map_err(|e| corrupt_key(id, format!("bad value hash: {e}")))?;
    Ok(KeyHash(hash))
}

fn corrupt_key(id: &str, reason: String) -> StoreError {
    StoreError::Corrupt {
        id: id.to_owned(),
        reason,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::testing::{RedisCluster, RedisServer};

    fn store(urls: Vec<String>, cluster: bool) -> RedisStore {
        RedisStore::new(RedisSettings {
            urls,
            cluster,
            timeout: Duration::from_millis(500),
        })
        .unwrap()
    }

    #[test]
    fn conformance_on_redis() {
        let server = RedisServer::start();
        crate::conformance::run_all(&store(vec![server.url()], false));
    }

    /// Makes Redis look as layout 1 (issue 28's first sessions) left it, from what `s` holds now:
    /// records in one hash (`verbose` in the old JSON, nulls and id spelled out), each membership
    /// kept three ways, one set of places (for `placed` alone, in that order, from 1), one hash of
    /// value hashes, no key pages.
    fn to_layout_1(s: &RedisStore, placed: &[&str], verbose: &str) {
        let now = s.load().unwrap();
        s.with(|c| {
            let mut pipe = redis::pipe();
            pipe.del(layout::LAYOUT_KEY).del("{tg}:bindings");
            for bucket in 0..16 {
                pipe.del(format!("{{tg}}:order:keys:{bucket}"));
            }
            for key in &now.keys {
                let page = pages::page_of(&key.id);
                let hex = hex::encode(key.value_hash.0);
                pipe.del(pages::keys_page(page))
                    .del(pages::plans_page(page))
                    .del(format!("{{tg}}:values:{}", &hex[..4]))
                    .hset("{tg}:values", &hex, &key.id);
                let record = if key.id == verbose {
                    serde_json::json!({
                        "id": key.id, "name": key.name, "description": null, "customerId": null,
                        "enabled": key.enabled, "valueSha256": hex,
                        "createdDate": key.created_date, "lastUpdatedDate": key.last_updated_date,
                        "sealedValue": null, "valuePrefix": "", "valueLength": 0,
                    })
                    .to_string()
                } else {
                    StoredKey::of(key).json().unwrap()
                };
                pipe.hset("{tg}:keys", &key.id, record);
            }
            for (place, id) in placed.iter().enumerate() {
                pipe.zadd("{tg}:order:keys", *id, place + 1);
            }
            for (p, k) in &now.bindings {
                pipe.sadd("{tg}:bindings", format!("{p} {k}"))
                    .sadd(format!("{{tg}}:kp:{k}"), p);
            }
            each_command(c, &pipe)
        })
        .unwrap();
    }

    #[test]
    fn layout_1_places_move_into_the_pages_and_unplaced_keys_go_last_by_creation() {
        let server = RedisServer::start();
        let s = store(vec![server.url()], false);
        let ids = ["old3", "old1", "placed", "old2"];
        for (id, created) in ids.iter().zip([30, 10, 40, 20]) {
            s.put_key(&ApiKey {
                id: (*id).into(),
                name: (*id).into(),
                value_hash: KeyHash::of(format!("{id}-value-0123456789")),
                created_date: created,
                ..ApiKey::default()
            })
            .unwrap();
        }
        for id in ["zzplan", "aaplan"] {
            s.put_plan(&UsagePlan {
                id: id.into(),
                name: id.into(),
                ..UsagePlan::default()
            })
            .unwrap();
        }
        // One key placed, the others not (written before places were kept), a place of a key
        // since deleted, and no places of plans.
        to_layout_1(&s, &["placed"], "old1");
        s.with(|c| {
            redis::pipe()
                .zadd("{tg}:order:keys", "ghost", 2)
                .del(keys::PLAN_ORDER)
                .query::<()>(c)
        })
        .unwrap();
        let moved = store(vec![server.url()], false);
        let listed: Vec<(u64, String)> = moved
            .keys_from(None, 10)
            .unwrap()
            .into_iter()
            .map(|(place, k)| (place, k.id))
            .collect();
        let in_order: Vec<&str> = listed.iter().map(|(_, id)| id.as_str()).collect();
        assert_eq!(
            in_order,
            ["placed", "old1", "old2", "old3"],
            "layout 1's places, then by creation date"
        );
        assert_eq!(listed[0].0, 1, "a place layout 1 gave is kept");
        assert!(listed.windows(2).all(|w| w[0].0 < w[1].0));
        let load: Vec<String> = moved
            .load()
            .unwrap()
            .keys
            .into_iter()
            .map(|k| k.id)
            .collect();
        assert_eq!(load, in_order, "loaded in the same order");
        let plans: Vec<String> = moved.plans().unwrap().into_iter().map(|p| p.id).collect();
        assert_eq!(
            plans,
            ["aaplan", "zzplan"],
            "by id: plans have no creation date"
        );
        // Keys written from now on come after them.
        moved
            .put_key(&ApiKey {
                id: "new0".into(),
                name: "new0".into(),
                value_hash: KeyHash::of("new0-value-0123456789"),
                ..ApiKey::default()
            })
            .unwrap();
        assert_eq!(moved.load().unwrap().keys.pop().unwrap().id, "new0");
    }

    #[test]
    fn listings_walk_the_order_sets_past_deleted_keys() {
        let server = RedisServer::start();
        let s = store(vec![server.url()], false);
        let id = |i: usize| format!("walk{i:04}");
        for i in 0..300 {
            s.put_key(&ApiKey {
                id: id(i),
                name: id(i),
                value_hash: KeyHash::of(format!("walk-value-{i}-0123456789")),
                ..ApiKey::default()
            })
            .unwrap();
        }
        // Places 1-300 in sets of 128: the middle set emptied whole, the others partly.
        for i in (100..270).chain([0, 299]) {
            s.delete_key(&id(i)).unwrap();
        }
        let want: Vec<String> = (1..100).chain(270..299).map(id).collect();
        let mut got = Vec::new();
        let mut from = None;
        loop {
            let page = s.keys_from(from, 7).unwrap();
            assert!(page.len() <= 7);
            let Some(&(last, _)) = page.last() else {
                break;
            };
            got.extend(page.into_iter().map(|(_, k)| k.id));
            from = Some(last + 1);
        }
        assert_eq!(got, want);
        let all: Vec<String> = s
            .keys_from(None, 1000)
            .unwrap()
            .into_iter()
            .map(|(_, k)| k.id)
            .collect();
        assert_eq!(all, want);
    }

    /// What an index serves, in an order of its own: each key's id, name, value hash, terms and
    /// plans.
    fn served_view(index: &KeyIndex) -> Vec<(String, String, KeyHash, KeyTerms, Vec<String>)> {
        let mut plans: HashMap<usize, Vec<String>> = HashMap::new();
        for &(p, k) in index.bindings() {
            plans
                .entry(k as usize)
                .or_default()
                .push(index.plans[p as usize].id.clone());
        }
        let mut out: Vec<_> = (0..index.len())
            .map(|i| {
                let mut of_key = plans.remove(&i).unwrap_or_default();
                of_key.sort();
                let (id, name) = (index.id(i).to_owned(), index.name(i).to_owned());
                (id, name, index.hash(i), index.terms(i), of_key)
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Plans `p1` (keys `key000` to `n - 1`) and `p2` (the even ones among them).
    fn in_two_plans(n: usize) -> Vec<(String, String)> {
        (0..n)
            .flat_map(|i| {
                let mut b = vec![("p1".to_string(), format!("key{i:03}"))];
                if i % 2 == 0 {
                    b.push(("p2".to_string(), format!("key{i:03}")));
                }
                b
            })
            .collect()
    }

    fn the_pages_hold_what_was_written(s: &RedisStore) {
        let plan = |id: &str| UsagePlan {
            id: id.into(),
            name: id.into(),
            ..UsagePlan::default()
        };
        let key = |i: usize| {
            let mut key = ApiKey {
                id: format!("key{i:03}"),
                name: format!("name, \"{i}\"\nwith a line"),
                enabled: i % 5 != 0,
                value_hash: KeyHash::of(format!("value-{i}-0123456789")),
                customer_id: (i % 3 == 0).then(|| format!("c{i}")),
                created_date: i as i64,
                last_updated_date: i as i64 + i as i64 % 2,
                ..ApiKey::default()
            };
            if i % 7 == 0 {
                key.tags.insert(SOURCE_IPS_TAG.into(), "10.0.0.0/8".into());
                key.tags
                    .insert(CREDIT_REFILL_TAG.into(), "100/month".into());
                key.credits = true;
            }
            key
        };
        let mut expected = Records {
            plans: vec![plan("p1"), plan("p2")],
            keys: (0..300).map(key).collect(),
            bindings: in_two_plans(300),
        };
        s.put_records(&expected).unwrap();
        // What a start serves, and what a full read gives, against what was written.
        let check = |expected: &Records| {
            assert_eq!(
                served_view(&s.load_index().unwrap()),
                served_view(&KeyIndex::from(expected))
            );
            let mut loaded = s.load().unwrap();
            let mut want = expected.clone();
            for records in [&mut loaded, &mut want] {
                records.keys.sort_by(|a, b| a.id.cmp(&b.id));
                records.bindings.sort();
            }
            assert_eq!(loaded, want);
        };
        check(&expected);

        let mut changed = key(2);
        changed.enabled = !changed.enabled;
        changed.value_hash = KeyHash::of("rotated-0123456789");
        s.put_key(&changed).unwrap();
        expected.keys[2] = changed;
        s.delete_key("key003").unwrap();
        expected.keys.retain(|k| k.id != "key003");
        expected.bindings.retain(|(_, k)| k != "key003");
        s.unbind("p1", "key004").unwrap();
        expected
            .bindings
            .retain(|b| *b != ("p1".into(), "key004".into()));
        s.put_key(&key(300)).unwrap();
        s.bind("p2", "key300").unwrap();
        expected.keys.push(key(300));
        expected.bindings.push(("p2".into(), "key300".into()));
        check(&expected);

        // A rewrite that changes nothing changes no version: no instance reads anything.
        let version = s.version().unwrap();
        s.put_key(&key(5)).unwrap();
        s.bind("p1", "key005").unwrap();
        assert_eq!(s.version().unwrap(), version);

        // Keys found by name through the pages.
        let mut renamed = key(7);
        renamed.name = "name, \"5\"\nwith a line".into();
        renamed.created_date = -1;
        s.put_key(&renamed).unwrap();
        if let Some(k) = expected.keys.iter_mut().find(|k| k.id == "key007") {
            *k = renamed;
        }
        let names = [
            "name, \"5\"\nwith a line",
            "name, \"2\"\nwith a line",
            "nobody",
        ];
        let by_name = s.keys_named(&names).unwrap();
        assert_eq!(by_name, crate::keys_named_in(expected.clone(), &names));
        assert_eq!(
            by_name[0].as_ref().map(|(k, _)| k.id.as_str()),
            Some("key007"),
            "the oldest"
        );
        assert!(by_name[1].is_some() && by_name[2].is_none());

        // A plan deleted takes its rows out of the plans pages.
        s.delete_plan("p2").unwrap();
        expected.plans.retain(|p| p.id != "p2");
        expected.bindings.retain(|(p, _)| p != "p2");
        check(&expected);
        let mut rows = 0;
        s.each_page(pages::plans_page, |name, body| {
            for row in pages::plan_rows(name, body) {
                assert_eq!(row?.0, "p1");
                rows += 1;
            }
            Ok(())
        })
        .unwrap();
        assert_eq!(rows, expected.bindings.len());

        // Ids the pages cannot hold are refused, not written.
        let mut spaced = key(400);
        spaced.id = "a b".into();
        assert!(s.put_key(&spaced).is_err());
        assert!(s.bind("p1", "a,b").is_err());
    }

    #[test]
    fn the_pages_hold_what_was_written_on_redis() {
        let server = RedisServer::start();
        the_pages_hold_what_was_written(&store(vec![server.url()], false));
    }

    #[test]
    fn the_pages_hold_what_was_written_on_a_redis_cluster() {
        let cluster = RedisCluster::start(3);
        the_pages_hold_what_was_written(&store(cluster.urls(), true));
    }

    #[test]
    fn conformance_on_a_redis_cluster() {
        let cluster = RedisCluster::start(3);
        crate::conformance::run_all(&store(cluster.urls(), true));
    }

    /// Runs `pipe`'s commands one after another (a cluster client does not pipeline).
    fn each_command(c: &mut dyn ConnectionLike, pipe: &redis::Pipeline) -> redis::RedisResult<()> {
        for cmd in pipe.cmd_iter() {
            cmd.query::<redis::Value>(c)?;
        }
        Ok(())
    }

    #[test]
    fn a_redis_of_layout_1_is_moved_once_no_older_instance_is_connected() {
        let server = RedisServer::start();
        a_redis_of_layout_1_is_moved(vec![server.url()], false, server.port);
    }

    #[test]
    fn a_redis_cluster_of_layout_1_is_moved_once_no_older_instance_is_connected() {
        let cluster = RedisCluster::start(3);
        a_redis_of_layout_1_is_moved(cluster.urls(), true, cluster.ports[0]);
    }

    /// Writes `n` keys to `s`, in plans p1 and p2 (see `in_two_plans`), and 7 requests of key001's
    /// under p1 on day 10.
    fn put_keys_with_usage(s: &RedisStore, n: usize) {
        let records = Records {
            plans: ["p1", "p2"]
                .map(|id| UsagePlan {
                    id: id.into(),
                    name: id.into(),
                    ..UsagePlan::default()
                })
                .to_vec(),
            keys: (0..n)
                .map(|i| ApiKey {
                    id: format!("key{i:03}"),
                    name: format!("k{i}"),
                    enabled: true,
                    value_hash: KeyHash::of(format!("value-{i}-0123456789")),
                    ..ApiKey::default()
                })
                .collect(),
            bindings: in_two_plans(n),
        };
        s.put_records(&records).unwrap();
        s.add_usage(&[UsageDelta {
            plan_id: "p1".into(),
            key_id: "key001".into(),
            day: EpochDay(10),
            count: 7,
            ..UsageDelta::default()
        }])
        .unwrap();
    }

    /// What was used under p1, day by day.
    fn used_in_p1(s: &RedisStore) -> Vec<DayValue> {
        s.series(Series::Used, "p1", None, EpochDay(0), EpochDay(100))
            .unwrap()
    }

    /// Connects a store to `urls` while an older instance is subscribed on `port` (the first URL's:
    /// subscribers are counted per node), and checks that it refuses to move Redis from `layout`;
    /// returns once the older instance is gone.
    fn refused_while_an_older_instance_is_connected(
        urls: &[String],
        cluster: bool,
        port: u16,
        layout: u32,
    ) {
        use std::io::{Read, Write};

        let mut older = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
        older.write_all(b"SUBSCRIBE tollgate:changes\r\n").unwrap();
        let _ = older.read(&mut [0u8; 64]).unwrap();
        let err = store(urls.to_vec(), cluster)
            .load()
            .unwrap_err()
            .to_string();
        assert!(
            err.contains(&format!(
                "in layout {layout}, and 1 older tollgate instance(s) are connected"
            )),
            "{err}"
        );
        drop(older);
        let mut node = redis::Client::open(urls[0].as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        let mut numsub = || -> u64 {
            redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(keys::CHANGES)
                .query::<(String, u64)>(&mut node)
                .unwrap()
                .1
        };
        while numsub() > 0 {
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_redis_of_layout_2_is_moved_once_no_older_instance_is_connected() {
        let server = RedisServer::start();
        let urls = vec![server.url()];
        let s = store(urls.clone(), false);
        put_keys_with_usage(&s, 10);
        // A live quota count and a plan's bucket as layout 2 keeps them.
        let (count, bucket) = ("tg:{key001}:q:p1", "tg:{key001}:t:p1:");
        s.with(|c| {
            redis::pipe()
                .hset_multiple(count, &[("s", 10), ("u", 7)])
                .set(bucket, 123)
                .set(layout::LAYOUT_KEY, 2)
                .query::<()>(c)
        })
        .unwrap();
        let before = s.load().unwrap();
        let used_before = used_in_p1(&s);
        assert_eq!(used_before.len(), 1);

        refused_while_an_older_instance_is_connected(&urls, false, server.port, 2);
        let at =
            |s: &RedisStore| -> u32 { s.with(|c| Cmd::get(layout::LAYOUT_KEY).query(c)).unwrap() };
        assert_eq!(at(&s), 2, "nothing moved");

        // Once it is gone, the first connection moves it: nothing but the layout changes.
        let moved = store(urls, false);
        assert_eq!(moved.load().unwrap(), before);
        assert_eq!(used_in_p1(&moved), used_before);
        assert_eq!(at(&moved), layout::LAYOUT);
        let kept: (Vec<u32>, u32) = moved
            .with(|c| {
                Ok((
                    redis::cmd("HMGET").arg(count).arg("s").arg("u").query(c)?,
                    Cmd::get(bucket).query(c)?,
                ))
            })
            .unwrap();
        assert_eq!(kept, (vec![10, 7], 123));
    }

    /// Layout 1 made on `urls`, then moved; `port` is the first URL's, where instances subscribe.
    fn a_redis_of_layout_1_is_moved(urls: Vec<String>, cluster: bool, port: u16) {
        let s = store(urls.clone(), cluster);
        put_keys_with_usage(&s, 50);
        let before = s.load().unwrap();
        let used_before = used_in_p1(&s);
        assert_eq!(used_before.len(), 1);
        let ids: Vec<&str> = before.keys.iter().map(|k| k.id.as_str()).collect();
        to_layout_1(&s, &ids, "key001");
        // A membership only `{tg}:bindings` holds.
        s.with(|c| Cmd::srem(keys::plan_keys("p2"), "key000").query::<()>(c))
            .unwrap();
        let per_key_sets = |s: &RedisStore| -> usize {
            s.with(|c| {
                let mut exists = redis::cmd("EXISTS");
                for i in 0..50 {
                    exists.arg(format!("{{tg}}:kp:key{i:03}"));
                }
                exists.query(c)
            })
            .unwrap()
        };
        assert_eq!(per_key_sets(&s), 50);

        // An older instance is connected: refused, and nothing moved.
        refused_while_an_older_instance_is_connected(&urls, cluster, port, 1);
        assert_eq!(per_key_sets(&s), 50);

        // Once it is gone, the first connection moves them: the same records and usage, the
        // memberships kept once, layout 1's structures gone.
        let moved = store(urls.clone(), cluster);
        assert_eq!(moved.load().unwrap(), before);
        assert_eq!(used_in_p1(&moved), used_before);
        assert_eq!(per_key_sets(&moved), 0);
        let (kind, at, gone): (String, u32, usize) = moved
            .with(|c| {
                Ok((
                    redis::cmd("TYPE").arg("{tg}:bindings").query(c)?,
                    Cmd::get(layout::LAYOUT_KEY).query(c)?,
                    Cmd::exists(&["{tg}:keys", "{tg}:values", "{tg}:order:keys"]).query(c)?,
                ))
            })
            .unwrap();
        assert_eq!((kind.as_str(), at, gone), ("string", layout::LAYOUT, 0));
        // An older tollgate's scripts trip on what is left there instead of reading nothing.
        let older = moved.with(|c| {
            redis::cmd("SISMEMBER")
                .arg("{tg}:bindings")
                .arg("p1 key001")
                .query::<i64>(c)
        });
        assert!(
            older.is_err_and(|e| e.to_string().contains("WRONGTYPE")),
            "an older tollgate reads the memberships"
        );
        // The pages hold every record as this version writes it: the same key written again
        // changes nothing (the older record included).
        let version = moved.version().unwrap();
        for key in &before.keys {
            moved.put_key(key).unwrap();
        }
        assert_eq!(moved.version().unwrap(), version);
        // Again: nothing more to do.
        assert_eq!(store(urls.clone(), cluster).load().unwrap(), before);
        // Values stay unique, and a deleted key's value is free again.
        let mut twin = before.keys[5].clone();
        twin.id = "twin".into();
        assert!(matches!(
            moved.put_key(&twin),
            Err(StoreError::DuplicateKeyValue)
        ));
        moved.delete_key("key005").unwrap();
        moved.put_key(&twin).unwrap();
    }

    #[test]
    fn reconnects_after_redis_comes_back() {
        let mut server = RedisServer::start();
        let port = server.port;
        let s = store(vec![server.url()], false);
        s.ping().unwrap();
        let v = s.version().unwrap();
        server.kill();
        assert!(s.ping().is_err(), "a dead server is an error, not a hang");
        let _again = RedisServer::start_on(port);
        s.ping().unwrap();
        assert_eq!(s.version().unwrap(), 0, "a fresh server: {v} before");
    }
}
