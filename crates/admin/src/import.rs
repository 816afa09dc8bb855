//! ImportApiKeys: AWS's CSV key file. Header names are case-insensitive and may come in any order;
//! `Name` and `Key` are required, `Description`, `Enabled` (default true) and `UsagePlanIds` (a
//! comma-separated list, quoted with `"` or `'`) optional; unknown columns are ignored. Re-importing a
//! value overwrites the key that has it.

use tollgate_core::KeyHash;
use tollgate_core::model::validate_key_value;

use crate::error::AdminError;
use crate::service::Admin;
use crate::wire::ImportOut;

/// Splits one CSV line into trimmed fields; `"…"` and `'…'` quote commas (`""` is a literal quote).
fn fields(line: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut field = String::new();
    let mut quote: Option<char> = None;
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        match quote {
            Some(q) if c == q => {
                if chars.peek() == Some(&q) {
                    field.push(q);
                    chars.next();
                } else {
                    quote = None;
                }
            }
            Some(_) => field.push(c),
            None if (c == '"' || c == '\'') && field.trim().is_empty() => {
                field.clear();
                quote = Some(c);
            }
            None if c == ',' => out.push(std::mem::take(&mut field).trim().to_string()),
            None => field.push(c),
        }
    }
    out.push(field.trim().to_string());
    out
}

/// One data row, checked.
struct Row {
    line: usize,
    name: String,
    value: String,
    description: Option<String>,
    enabled: bool,
    plans: Vec<String>,
}

impl Admin {
    /// ImportApiKeys (`POST /apikeys?mode=import&format=csv`).
    pub async fn import_keys(
        &self,
        body: &[u8],
        fail_on_warnings: bool,
    ) -> Result<ImportOut, AdminError> {
        let text = std::str::from_utf8(body)
            .map_err(|_| AdminError::BadRequest("The CSV file is not UTF-8".into()))?;
        let text = text.strip_prefix('\u{feff}').unwrap_or(text);
        let mut lines = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty());
        let (_, header) = lines
            .next()
            .ok_or_else(|| AdminError::BadRequest("The CSV file is empty".into()))?;
        let columns: Vec<String> = fields(header)
            .iter()
            .map(|c| c.to_ascii_lowercase())
            .collect();
        let col = |name: &str| columns.iter().position(|c| c == name);
        let (Some(name_col), Some(key_col)) = (col("name"), col("key")) else {
            return Err(AdminError::BadRequest(
                "Invalid CSV header: the Name and Key columns are required".into(),
            ));
        };
        let (desc_col, enabled_col, plans_col) =
            (col("description"), col("enabled"), col("usageplanids"));

        let mut warnings = Vec::new();
        let mut rows = Vec::new();
        for (index, line) in lines {
            let line_no = index + 1;
            let f = fields(line);
            let get = |c: Option<usize>| c.and_then(|c| f.get(c)).map(String::as_str).unwrap_or("");
            let value = get(Some(key_col)).to_string();
            if let Err(msg) = validate_key_value(&value) {
                warnings.push(format!("Line {line_no}: {msg}"));
                continue;
            }
            let enabled = match get(enabled_col).to_ascii_lowercase().as_str() {
                "" | "true" => true,
                "false" => false,
                other => {
                    warnings.push(format!(
                        "Line {line_no}: invalid Enabled value {other:?} (use true or false)"
                    ));
                    continue;
                }
            };
            let plans = get(plans_col)
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect();
            let description = Some(get(desc_col).to_string()).filter(|d| !d.is_empty());
            rows.push(Row {
                line: line_no,
                name: get(Some(name_col)).to_string(),
                value,
                description,
                enabled,
                plans,
            });
        }

        self.write(move |admin, catalog| {
            // Plan references and stage clashes are checked before any write.
            let mut accepted = Vec::new();
            for row in rows {
                match row.plans.iter().find(|p| catalog.plan(p).is_none()) {
                    Some(unknown) => warnings.push(format!("Line {}: Invalid Usage Plan ID specified: {unknown}", row.line)),
                    None => accepted.push(row),
                }
            }
            if fail_on_warnings && !warnings.is_empty() {
                return Err(AdminError::BadRequest(format!("Import failed with warnings: {}", warnings.join("; "))));
            }
            let mut ids = Vec::with_capacity(accepted.len());
            let mut recount = Vec::new();
            for row in accepted {
                let hash = KeyHash::of(&row.value);
                let now = admin.now_secs();
                let existing = match catalog.key_with_hash(&hash) {
                    Some(id) => admin.store.key(&id)?,
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
                        let key = admin.new_key(row.name, &row.value, row.description, None, row.enabled, catalog)?;
                        catalog.added_key(&key);
                        key
                    }
                };
                admin.store.put_key(&key)?;
                for plan_id in &row.plans {
                    if catalog.is_bound(plan_id, &key.id) {
                        continue;
                    }
                    let stages = catalog.plan(plan_id).map(|p| p.api_stages.clone()).unwrap_or_default();
                    if let Some((other, stage)) = Admin::stage_clash(catalog, plan_id, &key.id, &stages) {
                        warnings.push(format!(
                            "Line {}: API Key {} is already in usage plan {other}, which covers the same API Stage {}:{}",
                            row.line, key.id, stage.api_id, stage.stage
                        ));
                        continue;
                    }
                    admin.store.bind(plan_id, &key.id)?;
                    catalog.added_binding(plan_id, &key.id);
                    recount.push(plan_id.clone());
                }
                ids.push(key.id);
            }
            Ok((ImportOut { ids, warnings }, recount))
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::fields;

    #[test]
    fn csv_fields() {
        assert_eq!(fields("Key,name"), vec!["Key", "name"]);
        assert_eq!(
            fields("key,name, description, enabled, usageplanIds"),
            vec!["key", "name", "description", "enabled", "usageplanIds"]
        );
        assert_eq!(
            fields(r#"true,MyFirstApiKey,apikey1234,"c7y23b,glvrsr""#),
            vec!["true", "MyFirstApiKey", "apikey1234", "c7y23b,glvrsr"]
        );
        assert_eq!(fields("a,'n371pt,m282qs'"), vec!["a", "n371pt,m282qs"]);
        assert_eq!(fields(r#"a,"say ""hi""",c"#), vec!["a", r#"say "hi""#, "c"]);
        assert_eq!(fields("a,,c"), vec!["a", "", "c"]);
        assert_eq!(fields("it's,x"), vec!["it's", "x"]);
    }
}
