//! UpdateUsagePlan's patch operations, and the plan settings AWS's shapes carry.

use std::collections::BTreeMap;

use tollgate_core::quota::Period;
use tollgate_core::rules::check_throttle;
use tollgate_core::{ApiStage, QuotaSettings, ThrottleSettings, UsagePlan};

use crate::error::{AdminError, bad};
use crate::wire::{ApiStageIn, PatchOp, QuotaIn, ThrottleIn, pointer_unescape};

pub(super) fn throttle_from(t: &ThrottleIn) -> Result<ThrottleSettings, AdminError> {
    let burst = t.burst_limit.unwrap_or(0);
    let settings = ThrottleSettings {
        rate_limit: t.rate_limit.unwrap_or(0.0),
        burst_limit: u32::try_from(burst)
            .map_err(|_| bad("burstLimit must be between 0 and 2147483647"))?,
    };
    check_throttle(&settings).map_err(|e| bad(e.to_string()))?;
    Ok(settings)
}

fn period_from(text: &str) -> Result<Period, AdminError> {
    Period::named(text).ok_or_else(|| {
        let names: Vec<String> = Period::ALL.iter().map(Period::to_string).collect();
        bad(format!(
            "1 validation error detected: Value '{text}' at 'quota.period' failed to satisfy constraint: Member must satisfy enum value set: [{}]",
            names.join(", ")
        ))
    })
}

pub(super) fn quota_from(q: &QuotaIn) -> Result<QuotaSettings, AdminError> {
    let period = period_from(
        q.period
            .as_deref()
            .ok_or_else(|| bad("Invalid quota: period is required"))?,
    )?;
    let limit =
        u32::try_from(q.limit.unwrap_or(0)).map_err(|_| bad("Invalid quota limit specified"))?;
    let offset =
        u32::try_from(q.offset.unwrap_or(0)).map_err(|_| bad("Invalid quota offset specified"))?;
    let settings = QuotaSettings {
        limit,
        offset,
        period,
    };
    settings.validate().map_err(|e| bad(e.to_string()))?;
    Ok(settings)
}

pub(super) fn api_stage_from(s: &ApiStageIn) -> Result<ApiStage, AdminError> {
    let (Some(api_id), Some(stage)) = (&s.api_id, &s.stage) else {
        return Err(bad("Invalid API Stage specified"));
    };
    let mut throttle = BTreeMap::new();
    for (k, t) in s.throttle.iter().flatten() {
        throttle.insert(k.clone(), throttle_from(t)?);
    }
    Ok(ApiStage {
        api_id: api_id.clone(),
        stage: stage.clone(),
        throttle,
    })
}

/// `apiId:stage` as the `/apiStages` patch value writes it.
fn parse_stage_ref(value: Option<&str>) -> Result<(String, String), AdminError> {
    let (api, stage) = value
        .and_then(|v| v.split_once(':'))
        .filter(|(a, s)| !a.is_empty() && !s.is_empty())
        .ok_or_else(|| bad("Invalid API Stage specified"))?;
    Ok((api.to_string(), stage.to_string()))
}

pub(super) fn parse_number<T: std::str::FromStr>(
    value: Option<&str>,
    path: &str,
) -> Result<T, AdminError> {
    value.and_then(|v| v.trim().parse().ok()).ok_or_else(|| {
        bad(format!(
            "Invalid value {:?} for {path}",
            value.unwrap_or("")
        ))
    })
}

/// Applies one UpdateUsagePlan operation (quota members are collected in `quota` and checked after).
pub(super) fn apply_plan_op(
    plan: &mut UsagePlan,
    quota: &mut Option<QuotaIn>,
    op: &PatchOp,
) -> Result<(), AdminError> {
    let verb = op.op.as_deref().unwrap_or("");
    let path = op.path.as_deref().unwrap_or("");
    let value = op.value.as_deref();
    let invalid = || {
        bad(format!(
            "Invalid patch path {path} specified for op '{verb}'"
        ))
    };
    let set = matches!(verb, "replace" | "add");
    match (verb, path) {
        ("replace", "/name") => {
            plan.name = value
                .filter(|v| !v.is_empty())
                .ok_or_else(|| bad("Usage plan name is required"))?
                .to_string();
        }
        ("replace", "/description") => plan.description = value.map(str::to_string),
        // A Marketplace product code means nothing here, but it is kept and returned, as AWS does.
        ("replace" | "add", "/productCode") => plan.product_code = value.map(str::to_string),
        ("remove", "/productCode") => plan.product_code = None,
        (_, "/throttle/rateLimit") if set => {
            let t = plan.throttle.get_or_insert(ThrottleSettings {
                rate_limit: 0.0,
                burst_limit: 0,
            });
            t.rate_limit = parse_number(value, path)?;
            check_throttle(t).map_err(|e| bad(e.to_string()))?;
        }
        (_, "/throttle/burstLimit") if set => {
            let t = plan.throttle.get_or_insert(ThrottleSettings {
                rate_limit: 0.0,
                burst_limit: 0,
            });
            t.burst_limit = parse_number(value, path)?;
        }
        ("remove", "/throttle") => plan.throttle = None,
        (_, "/quota/limit") if set => {
            quota.get_or_insert_with(QuotaIn::default).limit = Some(parse_number(value, path)?)
        }
        (_, "/quota/offset") if set => {
            quota.get_or_insert_with(QuotaIn::default).offset = Some(parse_number(value, path)?);
        }
        (_, "/quota/period") if set => {
            quota.get_or_insert_with(QuotaIn::default).period = value.map(str::to_string);
        }
        ("remove", "/quota") => *quota = None,
        ("add", "/apiStages") => {
            let (api_id, stage) = parse_stage_ref(value)?;
            if !plan
                .api_stages
                .iter()
                .any(|s| s.api_id == api_id && s.stage == stage)
            {
                plan.api_stages.push(ApiStage {
                    api_id,
                    stage,
                    throttle: BTreeMap::new(),
                });
            }
        }
        ("remove", "/apiStages") => {
            let (api_id, stage) = parse_stage_ref(value)?;
            let before = plan.api_stages.len();
            plan.api_stages
                .retain(|s| !(s.api_id == api_id && s.stage == stage));
            if plan.api_stages.len() == before {
                return Err(AdminError::NotFound(format!(
                    "Invalid API Stage {{api: {api_id}, stage: {stage}}} specified for usageplan {}",
                    plan.id
                )));
            }
        }
        _ if path.starts_with("/apiStages/") => apply_method_throttle_op(plan, verb, path, value)?,
        _ => return Err(invalid()),
    }
    Ok(())
}

/// `/apiStages/{apiId}:{stage}/throttle[/{resourcePath}/{METHOD}[/rateLimit|/burstLimit]]`, with the
/// resource path's slashes plain or `~1`-escaped.
fn apply_method_throttle_op(
    plan: &mut UsagePlan,
    verb: &str,
    path: &str,
    value: Option<&str>,
) -> Result<(), AdminError> {
    let invalid = || {
        bad(format!(
            "Invalid patch path {path} specified for op '{verb}'"
        ))
    };
    let rest = &path["/apiStages/".len()..];
    let (stage_ref, tail) = rest.split_once('/').ok_or_else(invalid)?;
    let (api_id, stage) = parse_stage_ref(Some(&pointer_unescape(stage_ref)))?;
    let tail = tail.strip_prefix("throttle").ok_or_else(invalid)?;
    let plan_id = plan.id.clone();
    // A new method throttle starts as a copy of the plan's, then the operation changes one member.
    let start = plan.throttle.unwrap_or(ThrottleSettings {
        rate_limit: 0.0,
        burst_limit: 0,
    });
    let target = plan
        .api_stages
        .iter_mut()
        .find(|s| s.api_id == api_id && s.stage == stage)
        .ok_or_else(|| {
            AdminError::NotFound(format!("Invalid API Stage {{api: {api_id}, stage: {stage}}} specified for usageplan {plan_id}"))
        })?;
    if tail.is_empty() {
        return match verb {
            "remove" => {
                target.throttle.clear();
                Ok(())
            }
            "replace" | "add" => {
                let map: BTreeMap<String, ThrottleIn> =
                    serde_json::from_str(value.unwrap_or(""))
                        .map_err(|e| bad(format!("Invalid throttle map for {path}: {e}")))?;
                target.throttle = map
                    .iter()
                    .map(|(k, t)| Ok((k.clone(), throttle_from(t)?)))
                    .collect::<Result<_, AdminError>>()?;
                Ok(())
            }
            _ => Err(invalid()),
        };
    }
    let unescaped = pointer_unescape(tail.strip_prefix('/').ok_or_else(invalid)?);
    let (method_key, field) = match unescaped.rsplit_once('/') {
        Some((head, f @ ("rateLimit" | "burstLimit"))) => (head.to_string(), Some(f)),
        _ => (unescaped.clone(), None),
    };
    // `method_key` is "/resource/path/METHOD": the resource path's own slashes included.
    if !method_key.starts_with('/')
        || method_key
            .rsplit_once('/')
            .is_none_or(|(_, m)| m.is_empty())
    {
        return Err(invalid());
    }
    match (verb, field) {
        ("remove", None) => {
            target.throttle.remove(&method_key).ok_or_else(invalid)?;
        }
        ("replace" | "add", Some(field)) => {
            let t = target.throttle.entry(method_key).or_insert(start);
            if field == "rateLimit" {
                t.rate_limit = parse_number(value, path)?;
            } else {
                t.burst_limit = parse_number(value, path)?;
            }
            check_throttle(t).map_err(|e| bad(e.to_string()))?;
        }
        _ => return Err(invalid()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan() -> UsagePlan {
        UsagePlan {
            id: "p1".into(),
            name: "n".into(),
            description: None,
            api_stages: vec![ApiStage {
                api_id: "a".into(),
                stage: "prod".into(),
                throttle: BTreeMap::new(),
            }],
            throttle: None,
            quota: None,
            ..UsagePlan::default()
        }
    }

    fn op(verb: &str, path: &str, value: Option<&str>) -> PatchOp {
        PatchOp {
            op: Some(verb.into()),
            path: Some(path.into()),
            value: value.map(Into::into),
            from: None,
        }
    }

    #[test]
    fn periods_are_aws_names() {
        let quota = |period: &str| QuotaIn {
            limit: Some(10),
            offset: None,
            period: Some(period.into()),
        };
        assert_eq!(quota_from(&quota("WEEK")).unwrap().period, Period::Week);
        match quota_from(&quota("week")) {
            Err(AdminError::BadRequest(m)) => assert!(
                m.ends_with("Value 'week' at 'quota.period' failed to satisfy constraint: Member must satisfy enum value set: [DAY, WEEK, MONTH]"),
                "{m}"
            ),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn plan_patch_paths() {
        let mut p = plan();
        let mut q = None;
        for o in [
            op("replace", "/throttle/rateLimit", Some("0.5")),
            op("replace", "/throttle/burstLimit", Some("3")),
            op("replace", "/quota/limit", Some("500")),
            op("replace", "/quota/period", Some("WEEK")),
            op(
                "replace",
                "/apiStages/a:prod/throttle/~1pets~1{id}/GET/rateLimit",
                Some("0.1"),
            ),
            op(
                "replace",
                "/apiStages/a:prod/throttle//pets/GET/burstLimit",
                Some("1"),
            ),
            op("add", "/apiStages", Some("a:dev")),
        ] {
            apply_plan_op(&mut p, &mut q, &o).unwrap();
        }
        assert_eq!(
            p.throttle,
            Some(ThrottleSettings {
                rate_limit: 0.5,
                burst_limit: 3
            })
        );
        assert_eq!(
            quota_from(q.as_ref().unwrap()).unwrap(),
            QuotaSettings {
                limit: 500,
                offset: 0,
                period: Period::Week
            }
        );
        // New method throttles start from the plan throttle (0.5/s, burst 3).
        assert_eq!(
            p.api_stages[0].throttle["/pets/{id}/GET"],
            ThrottleSettings {
                rate_limit: 0.1,
                burst_limit: 3
            }
        );
        assert_eq!(
            p.api_stages[0].throttle["/pets/GET"],
            ThrottleSettings {
                rate_limit: 0.5,
                burst_limit: 1
            }
        );
        assert_eq!(p.api_stages.len(), 2);

        apply_plan_op(
            &mut p,
            &mut q,
            &op(
                "remove",
                "/apiStages/a:prod/throttle/~1pets~1{id}/GET",
                None,
            ),
        )
        .unwrap();
        assert_eq!(p.api_stages[0].throttle.len(), 1);
        apply_plan_op(
            &mut p,
            &mut q,
            &op(
                "replace",
                "/apiStages/a:prod/throttle",
                Some(r#"{"//GET":{"rateLimit":1.0,"burstLimit":1}}"#),
            ),
        )
        .unwrap();
        assert_eq!(
            p.api_stages[0].throttle.keys().collect::<Vec<_>>(),
            vec!["//GET"]
        );
        apply_plan_op(
            &mut p,
            &mut q,
            &op("remove", "/apiStages/a:prod/throttle", None),
        )
        .unwrap();
        assert!(p.api_stages[0].throttle.is_empty());

        for bad_op in [
            op("remove", "/apiStages", None),
            op("remove", "/apiStages", Some("nocolon")),
            op("replace", "/id", Some("x")),
            op("replace", "/throttle/rateLimit", Some("fast")),
            op(
                "replace",
                "/apiStages/a:prod/throttle/pets/GET/rateLimit",
                Some("1"),
            ),
        ] {
            assert!(
                matches!(
                    apply_plan_op(&mut p, &mut q, &bad_op),
                    Err(AdminError::BadRequest(_))
                ),
                "{bad_op:?}"
            );
        }
        let err =
            apply_plan_op(&mut p, &mut q, &op("remove", "/apiStages", Some("a:nope"))).unwrap_err();
        assert_eq!(
            err.to_string(),
            "Invalid API Stage {api: a, stage: nope} specified for usageplan p1"
        );
    }
}
