//! Which layout of records Redis holds, and the move from an older one.
//!
//! Layout 2 keeps a million keys in a third of layout 1's memory (up to issue 28; measured figures
//! in BENCHMARKS.md):
//! - **The key pages are the records.** Every key's record is a row of its keys page (see
//!   `pages`), written in place by the scripts; layout 1 kept each record in `{tg}:keys` (~370 bytes
//!   a key) and what the gateway serves of it again in pages refreshed behind the records.
//! - **A plan's memberships are kept once** in the plan's set `{tg}:pk:<planId>`, and as rows of
//!   the key's plans page for a start to read. Layout 1 also kept them in `{tg}:bindings` (members
//!   `"<planId> <keyId>"`) and in a set per key `{tg}:kp:<keyId>` (~260 bytes a key).
//! - **The listing order is kept in small sets** of 128 places (see `key_order!`), and each
//!   record holds its place; layout 1 kept one sorted set of every key (~100 bytes a key).
//! - **Value hashes are kept in small hashes** (see `key_value!`), ~75 bytes a key less.
//! - **Records leave out what is empty or default** (see `StoredKey`).
//!
//! The first connection of this version to a Redis without `{tg}:layout` moves it: memberships
//! (the plans' sets are completed from `{tg}:bindings`, then the per-key sets go), then records
//! (the key pages written whole from `{tg}:keys` and the plans' sets, each key with its place
//! from layout 1's set, those without one after every other in creation order, as layout 1's
//! listings put them), then value hashes; then layout 1's structures go. It leaves a string at
//! `{tg}:bindings`, so that an older tollgate fails loudly (`WRONGTYPE`) instead of reading no
//! memberships or keeping them apart. It refuses while an older instance is connected (subscribed
//! to `tollgate:changes`): that one would keep serving what it read before, deleted keys included.
//! Every step can run again: layout 1's records go last.
//!
//! Layout 3 changes no record. It keeps the data plane's bucket of a plan with a quota in the
//! quota's hash (field `t`), where layout 2 kept it in a string of its own: the limiter script
//! reads and writes it with the count, two commands fewer a key in every call (BENCHMARKS.md,
//! issue 28). The move from layout 2 waits for older instances to stop, as the move from layout 1
//! does: they would keep such a bucket apart, giving a key two. It moves no bucket: a bucket is a
//! few seconds of state, the fleet has just been stopped, and those layout 2 kept expire on their
//! own; each such bucket starts full once.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use redis::{Cmd, ConnectionLike, Script};

use super::{backend, keys, pages};
use crate::StoreError;

/// The layout this version writes.
pub(super) const LAYOUT: u32 = 3;

/// The layout Redis holds (absent: layout 1, or an empty Redis).
pub(super) const LAYOUT_KEY: &str = "{tg}:layout";

/// Layout 1's set of every membership; in layout 2, a string saying where they went.
const BINDINGS: &str = "{tg}:bindings";

/// Layout 1's records: key id → JSON.
const RECORDS: &str = "{tg}:keys";

/// Layout 1's record version its key pages held, and their lock: layout 2's pages are the records.
const PAGES_VERSION: &str = "{tg}:pages:version";
const PAGES_LOCK: &str = "{tg}:pages:lock";

/// Layout 1's keys in creation order: key id → place.
const KEY_ORDER: &str = "{tg}:order:keys";

/// Layout 1's value hashes (hex) → key id.
const VALUES: &str = "{tg}:values";

/// What layout 2 leaves at [`BINDINGS`] for an older tollgate to trip on.
const MOVED: &str = "tollgate layout 2: memberships are in {tg}:pk:<planId> only";

/// Held by the instance moving the layout.
const LOCK: &str = "{tg}:layout:lock";

/// How long the move's lock holds at most, should its holder die; another instance waits as long.
const LOCK_MS: u64 = 300_000;

/// Records, memberships or value hashes per script call while moving.
const CHUNK: usize = 1000;

/// Adds each `"<planId> <keyId>"` of `ARGV` to its plan's set and removes the key's own set
/// (`KEYS[1]`, the layout, only routes the call to the node of `{tg}` on a cluster).
const MOVE_MEMBERSHIPS: &str = r"
for i = 1, #ARGV do
  local plan, key = string.match(ARGV[i], '^(%S+) (%S+)$')
  if plan then
    redis.call('SADD', '{tg}:pk:' .. plan, key)
    redis.call('DEL', '{tg}:kp:' .. key)
  end
end
return 1
";

/// Places layout 1 did not give: each key of `ARGV` still in the records (`KEYS[1]`) and without
/// a place in layout 1's set (`KEYS[2]`) gets the next one (`KEYS[3]`), in that order.
const PLACE_UNPLACED: &str = r"
for i = 1, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 and not redis.call('ZSCORE', KEYS[2], ARGV[i]) then
    redis.call('ZADD', KEYS[2], redis.call('INCR', KEYS[3]), ARGV[i])
  end
end
return 1
";

/// Puts each (key id, place) pair of `ARGV` in its set of `key_order!` (`KEYS[1]`, the
/// layout, only routes the call on a cluster).
const ORDER_KEYS: &str = concat!(
    key_order!(),
    r"
for i = 1, #ARGV, 2 do
  redis.call('ZADD', ORDER(tonumber(ARGV[i + 1])), ARGV[i + 1], ARGV[i])
end
return 1
"
);

/// Writes each (value hash, key id) pair of `ARGV` where layout 2 keeps it (`KEYS[1]`, the
/// layout, only routes the call on a cluster).
const MOVE_VALUES: &str = concat!(
    key_value!(),
    r"
for i = 1, #ARGV, 2 do
  local values, value = VALUE(ARGV[i])
  redis.call('HSET', values, value, ARGV[i + 1])
end
return 1
"
);

/// Ends the move: `{tg}:bindings` becomes the string `ARGV[1]`, the layout `ARGV[2]`.
const FINISH: &str = r"
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
redis.call('SET', KEYS[2], ARGV[2])
return 1
";

/// Makes sure Redis holds layout [`LAYOUT`], moving an older one (see the module's notes); `url`
/// names Redis in the messages.
pub(super) fn ensure(c: &mut dyn ConnectionLike, url: &str) -> Result<(), StoreError> {
    let started = Instant::now();
    loop {
        let layout: Option<u32> = Cmd::get(LAYOUT_KEY).query(c).map_err(backend)?;
        match layout {
            Some(LAYOUT) => return Ok(()),
            Some(newer) if newer > LAYOUT => {
                return Err(StoreError::Backend(format!(
                    "Redis at {url} holds tollgate's records in layout {newer}, written by a newer \
                     tollgate; this one reads layout {LAYOUT}: run the newer version"
                )));
            }
            _ => {}
        }
        let token = crate::ids::new_key_value();
        let locked: Option<String> = redis::cmd("SET")
            .arg(LOCK)
            .arg(&token)
            .arg("NX")
            .arg("PX")
            .arg(LOCK_MS)
            .query(c)
            .map_err(backend)?;
        if locked.is_none() {
            // Another instance is moving it.
            if started.elapsed() > Duration::from_millis(LOCK_MS) {
                return Err(StoreError::Backend(format!(
                    "Redis at {url}: another tollgate has been moving the records to layout \
                     {LAYOUT} for {} s; try again once it is done",
                    LOCK_MS / 1000
                )));
            }
            std::thread::sleep(Duration::from_millis(200));
            continue;
        }
        let moved = move_to_this_layout(c, url);
        let _ = Script::new(super::UNLOCK)
            .key(LOCK)
            .arg(&token)
            .invoke::<i64>(c);
        return moved;
    }
}

/// The move to [`LAYOUT`] from the layout Redis holds, under the lock (another instance may have
/// made it while this one waited for the lock).
fn move_to_this_layout(c: &mut dyn ConnectionLike, url: &str) -> Result<(), StoreError> {
    let layout: Option<u32> = Cmd::get(LAYOUT_KEY).query(c).map_err(backend)?;
    match layout {
        Some(LAYOUT) => Ok(()),
        None => move_from_layout_1(c, url),
        Some(2) => {
            refuse_while_older_connected(url, 2)?;
            Cmd::set(LAYOUT_KEY, LAYOUT).query(c).map_err(backend)
        }
        Some(other) => Err(StoreError::Backend(format!(
            "Redis at {url} holds tollgate's records in layout {other}, which no tollgate wrote"
        ))),
    }
}

/// Refuses to move Redis from `layout` while an older instance is connected: it would keep serving
/// what it read before (deleted keys included) and keep its limits as `layout` does.
fn refuse_while_older_connected(url: &str, layout: u32) -> Result<(), StoreError> {
    // Asked of the node instances subscribe on (the first URL, on a cluster too: a cluster counts
    // subscribers per node).
    let subscribed: (String, u64) = redis::Client::open(url)
        .and_then(|client| client.get_connection_with_timeout(Duration::from_secs(2)))
        .and_then(|mut node| {
            redis::cmd("PUBSUB")
                .arg("NUMSUB")
                .arg(keys::CHANGES)
                .query(&mut node)
        })
        .map_err(backend)?;
    if subscribed.1 > 0 {
        return Err(StoreError::Backend(format!(
            "Redis at {url} holds tollgate's records in layout {layout}, and {} older tollgate \
             instance(s) are connected to it (subscribed to {}). Stop them, then start this \
             version again: its first start moves the records to layout {LAYOUT}, which older \
             versions cannot read",
            subscribed.1,
            keys::CHANGES
        )));
    }
    Ok(())
}

/// The move from layout 1 (or an empty Redis), under the lock.
fn move_from_layout_1(c: &mut dyn ConnectionLike, url: &str) -> Result<(), StoreError> {
    let started = Instant::now();
    let kind: String = redis::cmd("TYPE").arg(BINDINGS).query(c).map_err(backend)?;
    let has_keys: bool = Cmd::exists(RECORDS).query(c).map_err(backend)?;
    if kind == "set" || has_keys {
        refuse_while_older_connected(url, 1)?;
    }
    if kind == "set" {
        let mut members: Vec<String> = Vec::new();
        let mut cursor = 0u64;
        loop {
            let (next, page): (u64, Vec<String>) = redis::cmd("SSCAN")
                .arg(BINDINGS)
                .arg(cursor)
                .arg("COUNT")
                .arg(10_000)
                .query(c)
                .map_err(backend)?;
            members.extend(page);
            if next == 0 {
                break;
            }
            cursor = next;
        }
        let script = Script::new(MOVE_MEMBERSHIPS);
        for chunk in members.chunks(CHUNK) {
            script
                .key(LAYOUT_KEY)
                .arg(chunk)
                .invoke::<i64>(c)
                .map_err(backend)?;
        }
    } else if kind != "none" && kind != "string" {
        return Err(StoreError::Backend(format!(
            "Redis at {url}: {BINDINGS} is a {kind}; tollgate's layout 1 keeps a set there"
        )));
    }
    if has_keys {
        write_pages(c)?;
        move_values(c)?;
    }
    if kind == "set" || has_keys {
        tracing::info!(
            seconds = started.elapsed().as_secs_f64(),
            "Redis records moved to layout {LAYOUT}"
        );
    }
    Cmd::del(&[RECORDS, KEY_ORDER, VALUES, PAGES_VERSION, PAGES_LOCK])
        .query::<()>(c)
        .map_err(backend)?;
    Script::new(FINISH)
        .key(BINDINGS)
        .key(LAYOUT_KEY)
        .arg(MOVED)
        .arg(LAYOUT)
        .invoke::<i64>(c)
        .map_err(backend)?;
    Ok(())
}

/// Writes the key pages from layout 1's records (each as layout 2 writes it, with its place) and
/// the plans' sets, and each key's place in its set of `key_order!`. Keys layout 1 did not
/// place go after the others, by creation date and id, as its listings put them; their places are
/// written to layout 1's set first, so that a move run again gives them the same.
fn write_pages(c: &mut dyn ConnectionLike) -> Result<(), StoreError> {
    let placed: Vec<String> = redis::cmd("ZRANGE")
        .arg(KEY_ORDER)
        .arg(0)
        .arg(-1)
        .query(c)
        .map_err(backend)?;
    let ids: Vec<String> = Cmd::hkeys(RECORDS).query(c).map_err(backend)?;
    let is_placed: HashSet<&str> = placed.iter().map(String::as_str).collect();
    let loose: Vec<&String> = ids
        .iter()
        .filter(|id| !is_placed.contains(id.as_str()))
        .collect();
    let mut unplaced: Vec<(i64, &String)> = Vec::new();
    for chunk in loose.chunks(CHUNK) {
        for (id, body) in chunk.iter().zip(records(c, chunk)?) {
            if let Some(body) = body {
                unplaced.push((super::parse_key(id, &body)?.created_date, id));
            }
        }
    }
    unplaced.sort();
    let script = Script::new(PLACE_UNPLACED);
    for chunk in unplaced.chunks(CHUNK) {
        let mut call = script.prepare_invoke();
        call.key(RECORDS).key(KEY_ORDER).key(keys::PLACES);
        for (_, id) in chunk {
            call.arg(*id);
        }
        call.invoke::<i64>(c).map_err(backend)?;
    }
    let places: Vec<(String, u64)> = redis::cmd("ZRANGE")
        .arg(KEY_ORDER)
        .arg(0)
        .arg(-1)
        .arg("WITHSCORES")
        .query(c)
        .map_err(backend)?;
    let mut pages = pages::PageWriter::default();
    let order = Script::new(ORDER_KEYS);
    for chunk in places.chunks(CHUNK) {
        let ids: Vec<&String> = chunk.iter().map(|(id, _)| id).collect();
        let mut call = order.prepare_invoke();
        call.key(LAYOUT_KEY);
        // A place layout 1 kept for a key since deleted has no record: passed over.
        for ((id, place), body) in chunk.iter().zip(records(c, &ids)?) {
            if let Some(body) = body {
                let key = super::parse_key(id, &body)?;
                pages.key(
                    id,
                    &super::placed(&super::StoredKey::of(&key).json()?, *place),
                );
                call.arg(id).arg(place);
            }
        }
        call.invoke::<i64>(c).map_err(backend)?;
    }
    let plans: Vec<String> = Cmd::hkeys(keys::PLANS).query(c).map_err(backend)?;
    for plan in &plans {
        let members: Vec<String> = Cmd::smembers(keys::plan_keys(plan))
            .query(c)
            .map_err(backend)?;
        for key in &members {
            pages.binding(plan, key);
        }
    }
    for chunk in pages.finish().chunks(super::PAGES_PER_TRIP) {
        let mut mset = redis::cmd("MSET");
        for (name, body) in chunk {
            mset.arg(name).arg(body);
        }
        mset.query::<()>(c).map_err(backend)?;
    }
    Ok(())
}

/// The records of keys `ids`.
fn records(c: &mut dyn ConnectionLike, ids: &[&String]) -> Result<Vec<Option<String>>, StoreError> {
    redis::cmd("HMGET")
        .arg(RECORDS)
        .arg(ids)
        .query(c)
        .map_err(backend)
}

/// Moves layout 1's value hashes into layout 2's small hashes (see [`MOVE_VALUES`]).
fn move_values(c: &mut dyn ConnectionLike) -> Result<(), StoreError> {
    let script = Script::new(MOVE_VALUES);
    let mut cursor = 0u64;
    loop {
        let (next, page): (u64, Vec<(String, String)>) = redis::cmd("HSCAN")
            .arg(VALUES)
            .arg(cursor)
            .arg("COUNT")
            .arg(CHUNK)
            .query(c)
            .map_err(backend)?;
        if !page.is_empty() {
            let mut call = script.prepare_invoke();
            call.key(LAYOUT_KEY);
            for (hash, id) in &page {
                call.arg(hash).arg(id);
            }
            call.invoke::<i64>(c).map_err(backend)?;
        }
        if next == 0 {
            return Ok(());
        }
        cursor = next;
    }
}
