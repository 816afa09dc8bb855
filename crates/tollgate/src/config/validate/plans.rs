//! Usage plans and API keys declared in the file.

use std::collections::{HashMap, HashSet};

use serde_saphyr::{Location, Spanned};
use tollgate_core::IpNetworks;
use tollgate_core::credits::{CREDIT_REFILL_TAG, MAX_CREDITS, Refill};
use tollgate_core::model::{EXPIRES_TAG, parse_expiry, validate_key_value, validate_tags};
use tollgate_core::quota::Period;
use tollgate_core::rules::{ApiOutline, PlanError, check_api_stage};
use tollgate_core::shadow::{ENFORCEMENT_TAG, Enforcement, SHADOW_HEADERS_TAG};
use tollgate_core::sharing::{LIMITS_SHARE_BY_TAG, ShareBy};
use tollgate_core::source_ips::SOURCE_IPS_TAG;
use tollgate_core::{ApiStage, QuotaSettings, ThrottleSettings};
use tollgate_store::{DeclaredKey, DeclaredPlan};

use super::Ctx;
use crate::config::ConfigError;
use crate::config::raw::{RawKey, RawPlan, RawQuota};

/// `usagePlans:`: each valid, with a unique name, on the configured APIs.
pub(super) fn validate_plans(
    cx: &Ctx<'_>,
    raw: &[Spanned<RawPlan>],
    outline: &[ApiOutline],
) -> Result<Vec<DeclaredPlan>, ConfigError> {
    let mut plans: Vec<DeclaredPlan> = Vec::with_capacity(raw.len());
    for (i, plan) in raw.iter().enumerate() {
        let field = format!("usagePlans[{i}]");
        if plans.iter().any(|p| p.name == plan.value.name) {
            return cx.err(
                &plan.referenced,
                format!("{field}.name"),
                format!("duplicate usage plan name {:?}", plan.value.name),
            );
        }
        plans.push(validate_plan(
            cx,
            &field,
            &plan.value,
            &plan.referenced,
            outline,
        )?);
    }
    Ok(plans)
}

pub(super) fn validate_plan(
    cx: &Ctx<'_>,
    field: &str,
    p: &RawPlan,
    at: &Location,
    apis: &[ApiOutline],
) -> Result<DeclaredPlan, ConfigError> {
    if p.name.is_empty() {
        return cx.err(at, format!("{field}.name"), "must not be empty");
    }
    let throttle = p
        .throttle
        .as_ref()
        .map(|t| cx.throttle(t, at, &format!("{field}.throttle")))
        .transpose()?;
    let quota = p
        .quota
        .as_ref()
        .map(|q| validate_quota(cx, &format!("{field}.quota"), &q.value, &q.referenced))
        .transpose()?;
    let mut api_stages = Vec::with_capacity(p.api_stages.len());
    for (i, s) in p.api_stages.iter().enumerate() {
        let sf = format!("{field}.apiStages[{i}]");
        let (v, sat) = (&s.value, &s.referenced);
        if api_stages
            .iter()
            .any(|x: &ApiStage| x.api_id == v.api_id && x.stage == v.stage)
        {
            return cx.err(
                sat,
                &sf,
                format!("{}/{} is listed twice", v.api_id, v.stage),
            );
        }
        let method_throttles = v
            .throttle
            .iter()
            .map(|(k, t)| (k.clone(), ThrottleSettings::from(*t)))
            .collect();
        let stage = ApiStage {
            api_id: v.api_id.clone(),
            stage: v.stage.clone(),
            throttle: method_throttles,
        };
        if let Err(e) = check_api_stage(apis, &stage, throttle.is_some()) {
            let sub = match e {
                PlanError::UnknownApi { .. } => "apiId",
                PlanError::UnknownStage { .. } => "stage",
                PlanError::FineGrainWithoutPlanThrottle
                | PlanError::UnknownMethod { .. }
                | PlanError::BadRate => "throttle",
            };
            return cx.err(sat, format!("{sf}.{sub}"), e.to_string());
        }
        api_stages.push(stage);
    }
    let mut tags = p.tags.clone();
    if let Some(share_by) = &p.limits_share_by {
        let share_by = ShareBy::parse(share_by)
            .or_else(|msg| cx.err(at, format!("{field}.limitsShareBy"), msg))?;
        tags.insert(LIMITS_SHARE_BY_TAG.into(), share_by.to_string());
    }
    if let Some(enforcement) = &p.enforcement {
        let enforcement = Enforcement::parse(enforcement)
            .or_else(|msg| cx.err(at, format!("{field}.enforcement"), msg))?;
        tags.insert(ENFORCEMENT_TAG.into(), enforcement.to_string());
    }
    if let Some(on) = p.shadow_headers {
        tags.insert(SHADOW_HEADERS_TAG.into(), on.to_string());
    }
    if let Err(msg) = validate_tags(&tags) {
        return cx.err(at, format!("{field}.tags"), msg);
    }
    Ok(DeclaredPlan {
        name: p.name.clone(),
        description: p.description.clone(),
        api_stages,
        throttle,
        quota,
        tags,
    })
}

pub(super) fn validate_quota(
    cx: &Ctx<'_>,
    field: &str,
    q: &RawQuota,
    at: &Location,
) -> Result<QuotaSettings, ConfigError> {
    // Any case, as the Serverless Framework takes it.
    let Some(period) = Period::named(&q.period.to_ascii_uppercase()) else {
        let names = Period::ALL.map(|p| p.to_string()).join(", ");
        return cx.err(
            at,
            format!("{field}.period"),
            format!("{:?} is not one of {names}", q.period),
        );
    };
    let settings = QuotaSettings {
        limit: q.limit,
        offset: q.offset,
        period,
    };
    if let Err(e) = settings.validate() {
        return cx.err(at, format!("{field}.offset"), e.to_string());
    }
    Ok(settings)
}

/// `apiKeys:`: each with a valid, unique value, in declared plans that cover each API stage once.
pub(super) fn validate_keys(
    cx: &Ctx<'_>,
    raw: &[Spanned<RawKey>],
    plans: &[DeclaredPlan],
) -> Result<Vec<DeclaredKey>, ConfigError> {
    let mut keys: Vec<DeclaredKey> = Vec::with_capacity(raw.len());
    let mut values = HashSet::new();
    for (i, key) in raw.iter().enumerate() {
        let field = format!("apiKeys[{i}]");
        let at = &key.referenced;
        let k = &key.value;
        if keys.iter().any(|d| d.name == k.name) {
            return cx.err(
                at,
                format!("{field}.name"),
                format!("duplicate API key name {:?}", k.name),
            );
        }
        if let Some(value) = &k.value {
            if let Err(msg) = validate_key_value(&value.0) {
                return cx.err(at, format!("{field}.value"), msg);
            }
            if !values.insert(value.0.clone()) {
                return cx.err(
                    at,
                    format!("{field}.value"),
                    "API Key already exists (another key in this file has the same value)",
                );
            }
        }
        let mut covered: HashMap<(&str, &str), &str> = HashMap::new();
        for name in &k.usage_plans {
            let Some(plan) = plans.iter().find(|p| p.name == *name) else {
                return cx.err(
                    at,
                    format!("{field}.usagePlans"),
                    format!("no usage plan named {name:?} in usagePlans"),
                );
            };
            for s in &plan.api_stages {
                if let Some(other) = covered.insert((&s.api_id, &s.stage), &plan.name) {
                    return cx.err(
                        at,
                        format!("{field}.usagePlans"),
                        format!(
                            "usage plans {other:?} and {name:?} both cover {}/{}; a key can be in only one plan per API stage",
                            s.api_id, s.stage
                        ),
                    );
                }
            }
        }
        let mut tags = k.tags.clone();
        if let Some(expires) = &k.expires_at {
            if let Err(msg) = parse_expiry(expires) {
                return cx.err(at, format!("{field}.expiresAt"), msg);
            }
            tags.insert(EXPIRES_TAG.into(), expires.clone());
        }
        if let Some(written) = &k.allowed_source_ips {
            let field = format!("{field}.allowedSourceIps");
            let list =
                IpNetworks::parse(&written.join(",")).or_else(|msg| cx.err(at, &field, msg))?;
            let tag = list.to_tag();
            // Kept as a tag, whose values AWS bounds.
            if tag.chars().count() > 256 {
                return cx.err(at, field, format!("{tag:?} is longer than the 256 characters a tag value holds: use wider networks"));
            }
            tags.insert(SOURCE_IPS_TAG.into(), tag);
        }
        let mut opening_credits = None;
        if let Some(credits) = &k.credits {
            let field = format!("{field}.credits");
            if k.usage_plans.is_empty() {
                return cx.err(at, field, "credits on a key in no usage plan: its requests spend them through a plan; list one in usagePlans");
            }
            if credits.balance > MAX_CREDITS {
                return cx.err(
                    at,
                    format!("{field}.balance"),
                    format!("at most {MAX_CREDITS}"),
                );
            }
            if let Some(r) = &credits.refill {
                let field = format!("{field}.refill");
                let Some(period) = Period::named(&r.period.to_ascii_uppercase()) else {
                    let names = Period::ALL.map(|p| p.to_string()).join(", ");
                    return cx.err(
                        at,
                        format!("{field}.period"),
                        format!("{:?} is not one of {names}", r.period),
                    );
                };
                let refill = Refill::new(r.amount, period)
                    .or_else(|msg| cx.err(at, format!("{field}.amount"), msg))?;
                tags.insert(CREDIT_REFILL_TAG.into(), refill.to_tag());
            }
            opening_credits = Some(credits.balance);
        }
        if let Err(msg) = validate_tags(&tags) {
            return cx.err(at, format!("{field}.tags"), msg);
        }
        keys.push(DeclaredKey {
            name: k.name.clone(),
            value: k.value.as_ref().map(|v| v.0.clone()),
            description: k.description.clone(),
            customer_id: k.customer_id.clone(),
            enabled: k.enabled,
            plans: k.usage_plans.clone(),
            tags,
            opening_credits,
        });
    }
    Ok(keys)
}
