//! ImportApiKeys: AWS's CSV key file, read as RFC 4180 by the `csv` crate (a quoted field may hold
//! commas, quotes and line breaks). Header names are case-insensitive and may come in any order;
//! `Name` and `Key` are required, `Description`, `Enabled` (default true) and `UsagePlanIds` (a
//! comma-separated list, in double quotes when it has more than one id) optional; unknown columns are
//! ignored. Re-importing a value overwrites the key that has it; the same value twice in one file is a
//! warning on the second row.
//!
//! The file is parsed and its values hashed before the admin write lock is taken; rows are then
//! written in batches, each under the lock, with every lookup by hash or id and one store batch per
//! batch of rows, so an import is linear in its rows and holds other writes for one batch at a time.

use std::collections::BTreeMap;
use std::sync::Arc;

use tollgate_core::model::validate_key_value;
use tollgate_core::{ApiKey, KeyHash};
use tollgate_store::Records;

use crate::error::AdminError;
use crate::service::{Admin, Catalog, Recount, Written, to_the_end};
use crate::wire::ImportOut;

/// One data row, checked.
struct Row {
    line: u64,
    name: String,
    value: String,
    hash: KeyHash,
    description: Option<String>,
    enabled: bool,
    plans: Vec<String>,
}

/// The file's rows that can be imported, and warnings about the others.
fn parse(body: &[u8]) -> Result<(Vec<Row>, Vec<String>), AdminError> {
    let text = std::str::from_utf8(body)
        .map_err(|_| AdminError::BadRequest("The CSV file is not UTF-8".into()))?;
    let text = text.strip_prefix('\u{feff}').unwrap_or(text);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(true)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    let header = reader
        .headers()
        .map_err(|e| AdminError::BadRequest(format!("Invalid CSV header: {e}")))?
        .clone();
    if header.iter().all(str::is_empty) {
        return Err(AdminError::BadRequest("The CSV file is empty".into()));
    }
    let col = |name: &str| header.iter().position(|c| c.eq_ignore_ascii_case(name));
    let (Some(name_col), Some(key_col)) = (col("name"), col("key")) else {
        return Err(AdminError::BadRequest(
            "Invalid CSV header: the Name and Key columns are required".into(),
        ));
    };
    let (desc_col, enabled_col, plans_col) =
        (col("description"), col("enabled"), col("usageplanids"));

    let mut warnings = Vec::new();
    let mut rows = Vec::new();
    let mut first_line_of: BTreeMap<KeyHash, u64> = BTreeMap::new();
    // Line numbers from byte offsets, counted as the reader moves on: the reader's own count, and
    // its record positions, include the blank lines it skipped before a record.
    let (mut counted_to, mut line) = (0usize, 1u64);
    let mut line_at = |position: Option<&csv::Position>| {
        let mut at = position
            .map_or(counted_to, |p| p.byte() as usize)
            .min(text.len());
        while matches!(text.as_bytes().get(at), Some(b'\r' | b'\n')) {
            at += 1;
        }
        if at > counted_to {
            line += text.as_bytes()[counted_to..at]
                .iter()
                .filter(|&&b| b == b'\n')
                .count() as u64;
            counted_to = at;
        }
        line
    };
    for record in reader.records() {
        let record = match record {
            Ok(r) => r,
            Err(e) => {
                warnings.push(format!("Line {}: {e}", line_at(e.position())));
                continue;
            }
        };
        let line = line_at(record.position());
        if record.iter().all(str::is_empty) {
            continue;
        }
        if record.len() > header.len() {
            warnings.push(format!(
                "Line {line}: more fields than the header has (a list of usage plan ids goes in double quotes)"
            ));
            continue;
        }
        let get = |c: Option<usize>| c.and_then(|c| record.get(c)).unwrap_or("");
        let value = get(Some(key_col)).to_string();
        if let Err(msg) = validate_key_value(&value) {
            warnings.push(format!("Line {line}: {msg}"));
            continue;
        }
        let enabled = match get(enabled_col).to_ascii_lowercase().as_str() {
            "" | "true" => true,
            "false" => false,
            other => {
                warnings.push(format!(
                    "Line {line}: invalid Enabled value {other:?} (use true or false)"
                ));
                continue;
            }
        };
        let hash = KeyHash::of(&value);
        if let Some(first) = first_line_of.get(&hash) {
            warnings.push(format!(
                "Line {line}: the same key value as line {first}; this row is skipped"
            ));
            continue;
        }
        first_line_of.insert(hash, line);
        // A single id in single quotes, as some files have it.
        let plans = get(plans_col)
            .trim_matches('\'')
            .split(',')
            .map(str::trim)
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect();
        rows.push(Row {
            line,
            name: get(Some(name_col)).to_string(),
            value,
            hash,
            description: Some(get(desc_col).to_string()).filter(|d| !d.is_empty()),
            enabled,
            plans,
        });
    }
    Ok((rows, warnings))
}

/// Rows written per hold of the admin write lock: other writes wait for one batch, not for a whole
/// import (measured: a write made during a 100k-row import waited 0.2-0.6 s, not 3.6 s).
const BATCH_ROWS: usize = 10_000;

impl Admin {
    /// ImportApiKeys (`POST /apikeys?mode=import&format=csv`). The file is parsed before the write
    /// lock is taken, its rows are written in batches, each under the lock (another write can come
    /// between two), and what was written is served once at the end, also after a failure half-way.
    pub async fn import_keys(
        self: &Arc<Self>,
        body: &[u8],
        fail_on_warnings: bool,
    ) -> Result<ImportOut, AdminError> {
        let (rows, mut warnings) = parse(body)?;
        // Plan references are checked before any write.
        let mut accepted = Vec::with_capacity(rows.len());
        {
            let plans = self.plans.lock().await;
            for row in rows {
                match row
                    .plans
                    .iter()
                    .find(|p| !plans.iter().any(|k| k.id == **p))
                {
                    Some(unknown) => warnings.push(format!(
                        "Line {}: Invalid Usage Plan ID specified: {unknown}",
                        row.line
                    )),
                    None => accepted.push(row),
                }
            }
        }
        if fail_on_warnings && !warnings.is_empty() {
            return Err(AdminError::BadRequest(format!(
                "Import failed with warnings: {}",
                warnings.join("; ")
            )));
        }
        let admin = Arc::clone(self);
        to_the_end(async move {
            let mut done = Imported {
                ids: Vec::with_capacity(accepted.len()),
                recount: Vec::new(),
                warnings,
            };
            let mut rows = accepted.into_iter();
            let mut written = Ok(());
            loop {
                let batch: Vec<Row> = rows.by_ref().take(BATCH_ROWS).collect();
                if batch.is_empty() {
                    break;
                }
                let plans = admin.lock_plans().await;
                let (_, batch_done) = admin
                    .apply(plans, |admin, catalog| admin.import_batch(batch, catalog))
                    .await?;
                match batch_done {
                    Ok(batch_done) => done.add(batch_done),
                    Err(e) => {
                        written = Err(e);
                        break;
                    }
                }
            }
            let mut plans = admin.lock_plans().await;
            let changed = match &written {
                Ok(()) => Written::Keys(done.ids.clone()),
                // What reached the store before the failure is served, whatever it was.
                Err(_) => Written::Plans(done.recount),
            };
            admin.serve_store(&mut plans, changed).await?;
            written.map(|()| ImportOut {
                ids: done.ids,
                warnings: done.warnings,
            })
        })
        .await
    }

    /// Writes one batch of rows: new keys created, existing ones (by value) updated, memberships
    /// added unless another plan of the key covers the same API stage; all in one store batch.
    fn import_batch(
        &self,
        batch: Vec<Row>,
        catalog: &mut Catalog<'_>,
    ) -> Result<Imported, AdminError> {
        let mut done = Imported::default();
        let Imported {
            ids,
            recount,
            warnings,
        } = &mut done;
        let mut records = Records::default();
        let now = self.now_secs();
        for row in batch {
            // A plan deleted since the file was checked.
            if let Some(gone) = row.plans.iter().find(|p| catalog.plan(p).is_none()) {
                warnings.push(format!(
                    "Line {}: Invalid Usage Plan ID specified: {gone}",
                    row.line
                ));
                continue;
            }
            let existing = match catalog.key_with_hash(&row.hash) {
                Some(id) => self.store.key(&id)?,
                None => None,
            };
            let key = match existing {
                Some(mut key) => {
                    key.name = row.name;
                    key.description = row.description;
                    key.enabled = row.enabled;
                    key.last_updated_date = now;
                    key
                }
                None => {
                    // Hashed when the file was read.
                    let draft = ApiKey {
                        name: row.name,
                        description: row.description,
                        enabled: row.enabled,
                        ..ApiKey::default()
                    };
                    let key = self.new_key(draft, (&row.value, row.hash), catalog)?;
                    catalog.added_key(&key);
                    key
                }
            };
            for plan_id in &row.plans {
                if catalog.is_bound(plan_id, &key.id) {
                    continue;
                }
                let stages = catalog
                    .plan(plan_id)
                    .map(|p| p.api_stages.clone())
                    .unwrap_or_default();
                if let Some((other, stage)) = Admin::stage_clash(catalog, plan_id, &key.id, &stages)
                {
                    warnings.push(format!(
                        "Line {}: API Key {} is already in usage plan {other}, which covers the same API Stage {}:{}",
                        row.line, key.id, stage.api_id, stage.stage
                    ));
                    continue;
                }
                records.bindings.push((plan_id.clone(), key.id.clone()));
                catalog.added_binding(plan_id, &key.id);
                if !recount.contains(plan_id) {
                    recount.push(plan_id.clone());
                }
            }
            ids.push(key.id.clone());
            records.keys.push(key);
        }
        self.store.put_records(&records)?;
        Ok(done)
    }
}

/// What an import (or one batch of it) did: the ids of the keys of its rows, the plans whose quota
/// counts it changed, its warnings.
#[derive(Default)]
struct Imported {
    ids: Vec<String>,
    recount: Recount,
    warnings: Vec<String>,
}

impl Imported {
    fn add(&mut self, batch: Imported) {
        self.ids.extend(batch.ids);
        for plan in batch.recount {
            if !self.recount.contains(&plan) {
                self.recount.push(plan);
            }
        }
        self.warnings.extend(batch.warnings);
    }
}

#[cfg(test)]
mod tests {
    use super::parse;

    /// Line, name and plans of each accepted row.
    type Accepted = Vec<(u64, String, Vec<String>)>;

    fn lines(csv: &str) -> (Accepted, Vec<String>) {
        let (rows, warnings) = parse(csv.as_bytes()).unwrap();
        (
            rows.into_iter()
                .map(|r| (r.line, r.name, r.plans))
                .collect(),
            warnings,
        )
    }

    #[test]
    fn rfc_4180_fields() {
        let (rows, warnings) = lines(
            "Key,name,description,enabled,usageplanIds\n\
             value000000000000000001,\"multi\nline, \"\"quoted\"\" name\",d,TRUE,\"c7y23b,glvrsr\"\n\
             \n\
             value000000000000000002,b,,false,'n371pt'\n\
             value000000000000000001,again,,,\n\
             value000000000000000003,c,,,c7y23b,glvrsr\n",
        );
        assert_eq!(
            rows,
            vec![
                (
                    2,
                    "multi\nline, \"quoted\" name".to_string(),
                    vec!["c7y23b".to_string(), "glvrsr".to_string()]
                ),
                (5, "b".to_string(), vec!["n371pt".to_string()]),
            ]
        );
        assert_eq!(
            warnings,
            vec![
                "Line 6: the same key value as line 2; this row is skipped",
                "Line 7: more fields than the header has (a list of usage plan ids goes in double quotes)",
            ]
        );
    }

    #[test]
    fn header_rules() {
        assert!(parse(b"").is_err());
        assert!(parse(b"name,description\nx,y\n").is_err());
        let (rows, _) = lines("\u{feff}NAME,KEY\nn,value000000000000000001\n");
        assert_eq!(rows.len(), 1);
        // Windows line ends (Excel's CSV): no carriage return ends up in a name or value.
        let (rows, warnings) = lines(
            "\u{feff}name,key,usageplanIds\r\nn,value000000000000000001,p1\r\n\"m\r\n2\",value000000000000000002,p2\r\n",
        );
        assert_eq!(
            rows,
            vec![
                (2, "n".to_string(), vec!["p1".to_string()]),
                (3, "m\r\n2".to_string(), vec!["p2".to_string()]),
            ]
        );
        assert!(warnings.is_empty(), "{warnings:?}");
    }
}
