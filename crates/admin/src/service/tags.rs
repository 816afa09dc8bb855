//! Tags of keys and plans, by ARN.

use std::sync::Arc;

use tollgate_core::model::{Tags, validate_tags};

use super::{Admin, Written};
use crate::error::{AdminError, bad, unknown_key, unknown_plan};

/// What an ARN names: `arn:aws:apigateway:{region}::/apikeys/{id}` or `…::/usageplans/{id}`.
enum Tagged {
    Key(String),
    Plan(String),
}

impl Tagged {
    fn parse(arn: &str) -> Result<Self, AdminError> {
        let invalid = || bad(format!("Invalid resource ARN specified: {arn}"));
        let mut parts = arn.splitn(6, ':');
        let head: Vec<&str> = parts.by_ref().take(5).collect();
        let resource = parts.next().ok_or_else(invalid)?;
        match head.as_slice() {
            ["arn", partition, "apigateway", _region, ""] if partition.starts_with("aws") => {}
            _ => return Err(invalid()),
        }
        let (kind, id) = resource
            .strip_prefix('/')
            .and_then(|r| r.split_once('/'))
            .filter(|(_, id)| !id.is_empty() && !id.contains('/'))
            .ok_or_else(invalid)?;
        match kind {
            "apikeys" => Ok(Self::Key(id.to_owned())),
            "usageplans" => Ok(Self::Plan(id.to_owned())),
            _ => Err(invalid()),
        }
    }
}

impl Admin {
    // ---- tags ----

    /// GetTags.
    pub async fn tags(self: &Arc<Self>, arn: &str) -> Result<Tags, AdminError> {
        match Tagged::parse(arn)? {
            Tagged::Key(id) => {
                let key = self
                    .blocking(move |admin| Ok(admin.store.key(&id)?))
                    .await?;
                Ok(key.ok_or_else(unknown_key)?.tags)
            }
            Tagged::Plan(id) => {
                let plans = self.plans.lock().await;
                let plan = plans.iter().find(|p| p.id == id).ok_or_else(unknown_plan)?;
                Ok(plan.tags.clone())
            }
        }
    }

    /// TagResource (`add`: the tags to set) and UntagResource (`remove`: the tag keys to drop).
    pub async fn retag(
        self: &Arc<Self>,
        arn: &str,
        add: Tags,
        remove: Vec<String>,
    ) -> Result<(), AdminError> {
        let tagged = Tagged::parse(arn)?;
        let retag = move |tags: &mut Tags| {
            tags.extend(add);
            for k in &remove {
                tags.remove(k);
            }
            validate_tags(tags).map_err(bad)
        };
        self.write(move |admin, catalog| match tagged {
            Tagged::Key(id) => {
                let mut key = admin.store.key(&id)?.ok_or_else(unknown_key)?;
                retag(&mut key.tags)?;
                key.last_updated_date = admin.now_secs();
                let written = admin.store.put_key_read(&key)?;
                Ok(((), Written::Read(id, written.map(Box::new))))
            }
            Tagged::Plan(id) => {
                let plan = catalog
                    .plans
                    .iter_mut()
                    .find(|p| p.id == id)
                    .ok_or_else(unknown_plan)?;
                let mut changed = plan.clone();
                retag(&mut changed.tags)?;
                admin.store.put_plan(&changed)?;
                let recount = if changed.recounts_from(plan) {
                    vec![changed.id.clone()]
                } else {
                    Vec::new()
                };
                *plan = changed;
                Ok(((), Written::Plans(recount)))
            }
        })
        .await
    }

    /// DeleteApiKey: also removes the key from its plans.
    pub async fn delete_key(self: &Arc<Self>, id: &str) -> Result<(), AdminError> {
        let id = id.to_owned();
        self.write(move |admin, catalog| {
            if !catalog.has_key(&id) {
                return Err(unknown_key());
            }
            admin.store.delete_key(&id)?;
            Ok(((), Written::Keys(vec![id])))
        })
        .await
    }
}
