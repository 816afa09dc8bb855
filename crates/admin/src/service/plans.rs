//! Usage plans and the keys in them.

use std::sync::Arc;

use tollgate_core::model::validate_tags;
use tollgate_core::rules::{PlanError, check_api_stage};
use tollgate_core::{ApiKey, ApiStage, UsagePlan};
use tollgate_store::ids;

use super::paging::{Paging, first_page, page_in_order, start_at};
use super::patch::{api_stage_from, apply_plan_op, quota_from, throttle_from};
use super::{Admin, Catalog, Written};
use crate::error::{AdminError, bad, unknown_key, unknown_plan};
use crate::wire::{CreateUsagePlanIn, Page, PatchOp, QuotaIn, UsagePlanKeyOut, UsagePlanOut};

impl Admin {
    /// `with_tags`: always answer `tags` (GetUsagePlan), else only when there are some.
    fn plan_out(plan: &UsagePlan, with_tags: bool) -> UsagePlanOut {
        UsagePlanOut {
            id: plan.id.clone(),
            name: plan.name.clone(),
            description: plan.description.clone(),
            api_stages: plan.api_stages.clone(),
            throttle: plan.throttle,
            quota: plan.quota,
            product_code: plan.product_code.clone(),
            tags: (with_tags || !plan.tags.is_empty()).then(|| plan.tags.clone()),
        }
    }

    // ---- usage plans ----

    fn check_plan(&self, plan: &UsagePlan, catalog: &Catalog<'_>) -> Result<(), AdminError> {
        let apis = &self.settings.apis;
        for (i, stage) in plan.api_stages.iter().enumerate() {
            check_api_stage(apis, stage, plan.throttle.is_some()).map_err(|e| match e {
                PlanError::UnknownApi { api, stage } | PlanError::UnknownStage { api, stage } => {
                    AdminError::NotFound(format!(
                        "Invalid API Stage {{api: {api}, stage: {stage}}} specified for usageplan {}",
                        plan.id
                    ))
                }
                other => bad(other.to_string()),
            })?;
            if plan.api_stages[..i]
                .iter()
                .any(|s| s.api_id == stage.api_id && s.stage == stage.stage)
            {
                return Err(bad(format!(
                    "API Stage {}:{} is listed twice",
                    stage.api_id, stage.stage
                )));
            }
        }
        // A key may be in only one plan per API stage: only plans sharing a stage with this one can
        // clash, so the plan's members are looked at only if there is one.
        let shares_a_stage = catalog.plans.iter().any(|other| {
            other.id != plan.id
                && other.api_stages.iter().any(|o| {
                    plan.api_stages
                        .iter()
                        .any(|s| s.api_id == o.api_id && s.stage == o.stage)
                })
        });
        let members = if shares_a_stage {
            catalog.served.keys_of(&plan.id)
        } else {
            Vec::new()
        };
        for key_id in members {
            if let Some((other, stage)) =
                Self::stage_clash(catalog, &plan.id, key_id, &plan.api_stages)
            {
                return Err(AdminError::Conflict(format!(
                    "API Key {key_id} is already in usage plan {other}, which covers the same API Stage {}:{}",
                    stage.api_id, stage.stage
                )));
            }
        }
        Ok(())
    }

    /// Another plan of `key_id` that covers one of `stages`.
    pub(crate) fn stage_clash<'r>(
        catalog: &'r Catalog<'_>,
        plan_id: &str,
        key_id: &str,
        stages: &'r [ApiStage],
    ) -> Option<(&'r str, &'r ApiStage)> {
        catalog
            .plans_of(key_id)
            .into_iter()
            .filter(|p| *p != plan_id)
            .filter_map(|p| catalog.plan(p))
            .find_map(|other| {
                stages
                    .iter()
                    .find(|s| {
                        other
                            .api_stages
                            .iter()
                            .any(|o| o.api_id == s.api_id && o.stage == s.stage)
                    })
                    .map(|s| (other.id.as_str(), s))
            })
    }

    /// CreateUsagePlan.
    pub async fn create_plan(
        self: &Arc<Self>,
        input: CreateUsagePlanIn,
    ) -> Result<UsagePlanOut, AdminError> {
        let name = input
            .name
            .filter(|n| !n.is_empty())
            .ok_or_else(|| bad("Usage plan name is required"))?;
        let plan = UsagePlan {
            id: ids::new_plan_id(),
            name,
            description: input.description,
            api_stages: input
                .api_stages
                .iter()
                .flatten()
                .map(api_stage_from)
                .collect::<Result<_, _>>()?,
            throttle: input.throttle.as_ref().map(throttle_from).transpose()?,
            quota: input.quota.as_ref().map(quota_from).transpose()?,
            tags: input.tags.unwrap_or_default(),
            product_code: None,
        };
        validate_tags(&plan.tags).map_err(bad)?;
        self.write(move |admin, catalog| {
            admin.check_plan(&plan, catalog)?;
            admin.store.put_plan(&plan)?;
            let out = Self::plan_out(&plan, false);
            catalog.plans.push(plan);
            Ok((out, Written::Plans(Vec::new())))
        })
        .await
    }

    /// GetUsagePlan.
    pub async fn get_plan(&self, id: &str) -> Result<UsagePlanOut, AdminError> {
        let plans = self.plans.lock().await;
        let plan = plans.iter().find(|p| p.id == id).ok_or_else(unknown_plan)?;
        Ok(Self::plan_out(plan, true))
    }

    /// GetUsagePlans, optionally only the plans containing `key_id`.
    pub async fn list_plans(
        &self,
        key_id: Option<&str>,
        paging: &Paging,
    ) -> Result<Page<UsagePlanOut>, AdminError> {
        let plans = self.plans.lock().await;
        let served = self.gateway.served();
        let of_key = key_id.map(|k| served.plans_of(k));
        let items = plans
            .iter()
            .filter(|p| of_key.as_ref().is_none_or(|of| of.contains(&p.id.as_str())))
            .map(|p| Self::plan_out(p, false))
            .collect();
        page_in_order(items, paging)
    }

    /// UpdateUsagePlan.
    pub async fn update_plan(
        self: &Arc<Self>,
        id: &str,
        ops: Vec<PatchOp>,
    ) -> Result<UsagePlanOut, AdminError> {
        let id = id.to_owned();
        self.write(move |admin, catalog| {
            let at = catalog
                .plans
                .iter()
                .position(|p| p.id == id)
                .ok_or_else(unknown_plan)?;
            let before = catalog.plans[at].clone();
            let mut plan = before.clone();
            let mut quota: Option<QuotaIn> = plan.quota.map(|q| QuotaIn {
                limit: Some(i64::from(q.limit)),
                offset: Some(i64::from(q.offset)),
                period: Some(q.period.to_string()),
            });
            for op in &ops {
                apply_plan_op(&mut plan, &mut quota, op)?;
            }
            plan.quota = quota.as_ref().map(quota_from).transpose()?;
            admin.check_plan(&plan, catalog)?;
            admin.store.put_plan(&plan)?;
            let out = Self::plan_out(&plan, false);
            let recount = if plan.recounts_from(&before) {
                vec![plan.id.clone()]
            } else {
                Vec::new()
            };
            catalog.plans[at] = plan;
            Ok((out, Written::Plans(recount)))
        })
        .await
    }

    /// DeleteUsagePlan.
    pub async fn delete_plan(self: &Arc<Self>, id: &str) -> Result<(), AdminError> {
        let id = id.to_owned();
        self.write(move |admin, catalog| {
            if catalog.plan(&id).is_none() {
                return Err(unknown_plan());
            }
            admin.store.delete_plan(&id)?;
            catalog.plans.retain(|p| p.id != id);
            Ok(((), Written::Plans(Vec::new())))
        })
        .await
    }

    // ---- usage plan keys ----

    fn plan_key_out(&self, key: &ApiKey) -> UsagePlanKeyOut {
        UsagePlanKeyOut {
            id: key.id.clone(),
            key_type: "API_KEY",
            value: self.open(key),
            name: key.name.clone(),
        }
    }

    /// CreateUsagePlanKey.
    pub async fn create_plan_key(
        self: &Arc<Self>,
        plan_id: &str,
        key_id: Option<String>,
        key_type: Option<String>,
    ) -> Result<UsagePlanKeyOut, AdminError> {
        let key_id = key_id.ok_or_else(|| bad("Invalid API Key identifier specified"))?;
        if key_type.as_deref() != Some("API_KEY") {
            return Err(bad("Invalid key type specified: keyType must be API_KEY"));
        }
        let plan_id = plan_id.to_owned();
        self.write(move |admin, catalog| {
            let plan_id = plan_id.as_str();
            // AWS checks the key first: both unknown is "Invalid API Key identifier specified".
            let key = admin.store.key(&key_id)?.ok_or_else(unknown_key)?;
            let plan = catalog.plan(plan_id).ok_or_else(unknown_plan)?;
            if catalog.is_bound(plan_id, &key_id) {
                return Err(AdminError::Conflict(format!("Usage Plan Key {key_id} already exists in usage plan {plan_id}")));
            }
            if let Some((other, stage)) = Self::stage_clash(catalog, plan_id, &key_id, &plan.api_stages) {
                return Err(AdminError::Conflict(format!(
                    "Usage Plan {plan_id} cannot be added because API Key {key_id} cannot reference multiple Usage Plans with the same API Stage: {}:{} (usage plan {other})",
                    stage.api_id, stage.stage
                )));
            }
            let written = admin.store.bind_read(plan_id, &key_id)?;
            catalog.added_binding(plan_id, &key_id);
            Ok((admin.plan_key_out(&key), Written::Read(key_id, written.map(Box::new))))
        })
        .await
    }

    /// GetUsagePlanKey.
    pub async fn get_plan_key(
        self: &Arc<Self>,
        plan_id: &str,
        key_id: &str,
    ) -> Result<UsagePlanKeyOut, AdminError> {
        if !self.plans.lock().await.iter().any(|p| p.id == plan_id) {
            return Err(unknown_plan());
        }
        let bound = self.gateway.served().plans_of(key_id).contains(&plan_id);
        let key = match bound {
            true => {
                let key_id = key_id.to_owned();
                self.blocking(move |admin| Ok(admin.store.key(&key_id)?))
                    .await?
            }
            false => None,
        };
        key.map(|k| self.plan_key_out(&k)).ok_or_else(|| {
            AdminError::NotFound("Invalid Usage Plan Key identifier specified".into())
        })
    }

    /// GetUsagePlanKeys: `name` is a prefix of the key name. An unknown plan has no keys (as AWS).
    pub async fn list_plan_keys(
        self: &Arc<Self>,
        plan_id: &str,
        name: Option<String>,
        paging: Paging,
    ) -> Result<Page<UsagePlanKeyOut>, AdminError> {
        let served = self.gateway.served();
        let plan_id = plan_id.to_owned();
        self.blocking(move |admin| {
            let members = served.keys_of(&plan_id);
            let start = start_at(&members, |k| k, &paging);
            // Keys are read from the store only as far as the page goes.
            let keys = members[start..]
                .iter()
                .filter_map(|id| admin.store.key(id).transpose())
                .filter(|k| {
                    k.as_ref().map_or(true, |k| {
                        name.as_ref().is_none_or(|n| k.name.starts_with(n.as_str()))
                    })
                })
                .map(|k| k.map(|k| admin.plan_key_out(&k)));
            Ok(first_page(
                keys,
                |k: &UsagePlanKeyOut| k.id.clone(),
                &paging,
            )?)
        })
        .await
    }

    /// DeleteUsagePlanKey.
    pub async fn delete_plan_key(
        self: &Arc<Self>,
        plan_id: &str,
        key_id: &str,
    ) -> Result<(), AdminError> {
        let (plan_id, key_id) = (plan_id.to_owned(), key_id.to_owned());
        self.write(move |admin, catalog| {
            let (plan_id, key_id) = (plan_id.as_str(), key_id.as_str());
            if catalog.plan(plan_id).is_none() {
                return Err(unknown_plan());
            }
            if !catalog.is_bound(plan_id, key_id) {
                return Err(AdminError::NotFound(
                    "Invalid Usage Plan Key identifier specified".into(),
                ));
            }
            admin.store.unbind(plan_id, key_id)?;
            Ok(((), Written::Keys(vec![key_id.to_owned()])))
        })
        .await
    }
}
