//! What a usage plan may say: the checks the config file and the admin API both apply, in one
//! place, with AWS's messages where AWS has them.

use crate::model::{ApiStage, ThrottleSettings};

/// What usage plans may name of one configured API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiOutline {
    /// The API's id.
    pub id: String,
    /// Its stages' names.
    pub stages: Vec<String>,
    /// Its routes' per-method throttle keys (`"/path/METHOD"`).
    pub methods: Vec<String>,
}

/// Why a usage plan's API stage does not fit the configured APIs; messages are AWS's where AWS has one.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum PlanError {
    /// No such API.
    #[error("Invalid API Stage {{api: {api}, stage: {stage}}}: no API {api:?} is configured")]
    UnknownApi {
        /// The API id.
        api: String,
        /// The stage.
        stage: String,
    },
    /// The API has no such stage.
    #[error("Invalid API Stage {{api: {api}, stage: {stage}}}: API {api:?} has no stage {stage:?}")]
    UnknownStage {
        /// The API id.
        api: String,
        /// The stage.
        stage: String,
    },
    /// Per-method throttles need a plan throttle (AWS's rule and message).
    #[error("Can not define fine grain throttling if usage plan throttle is not defined.")]
    FineGrainWithoutPlanThrottle,
    /// A per-method throttle key names no route.
    #[error("{key:?} names no route of this API; use \"/path/METHOD\", one of: {}", known.join(", "))]
    UnknownMethod {
        /// The offending key.
        key: String,
        /// The keys that exist.
        known: Vec<String>,
    },
    /// A negative, infinite or NaN rate.
    #[error("rateLimit must be a number of requests per second, 0 or more")]
    BadRate,
}

/// Checks a throttle's values.
pub fn check_throttle(t: &ThrottleSettings) -> Result<(), PlanError> {
    if t.rate_limit.is_finite() && t.rate_limit >= 0.0 {
        Ok(())
    } else {
        Err(PlanError::BadRate)
    }
}

/// Checks that `stage` names a configured API stage and that its per-method throttles name routes of
/// that API (and are allowed: the plan must have a throttle).
pub fn check_api_stage(
    apis: &[ApiOutline],
    stage: &ApiStage,
    plan_has_throttle: bool,
) -> Result<(), PlanError> {
    let api = apis
        .iter()
        .find(|a| a.id == stage.api_id)
        .ok_or_else(|| PlanError::UnknownApi {
            api: stage.api_id.clone(),
            stage: stage.stage.clone(),
        })?;
    if !api.stages.contains(&stage.stage) {
        return Err(PlanError::UnknownStage {
            api: stage.api_id.clone(),
            stage: stage.stage.clone(),
        });
    }
    if !stage.throttle.is_empty() && !plan_has_throttle {
        return Err(PlanError::FineGrainWithoutPlanThrottle);
    }
    for (key, t) in &stage.throttle {
        if !api.methods.contains(key) {
            return Err(PlanError::UnknownMethod {
                key: key.clone(),
                known: api.methods.clone(),
            });
        }
        check_throttle(t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn api_stages_are_checked_against_the_outline() {
        let apis = [ApiOutline {
            id: "warranty".into(),
            stages: vec!["prod".into()],
            methods: vec!["/registrations/{id}/PUT".into()],
        }];
        let t = ThrottleSettings {
            rate_limit: 1.0,
            burst_limit: 1,
        };
        let stage = |api: &str, stage: &str, method: Option<(&str, ThrottleSettings)>| ApiStage {
            api_id: api.into(),
            stage: stage.into(),
            throttle: method
                .map(|(k, t)| BTreeMap::from([(k.to_owned(), t)]))
                .unwrap_or_default(),
        };
        assert_eq!(
            check_api_stage(&apis, &stage("warranty", "prod", None), false),
            Ok(())
        );
        assert!(matches!(
            check_api_stage(&apis, &stage("other", "prod", None), false),
            Err(PlanError::UnknownApi { .. })
        ));
        assert!(matches!(
            check_api_stage(&apis, &stage("warranty", "dev", None), false),
            Err(PlanError::UnknownStage { .. })
        ));
        let put = Some(("/registrations/{id}/PUT", t));
        assert_eq!(
            check_api_stage(&apis, &stage("warranty", "prod", put), false),
            Err(PlanError::FineGrainWithoutPlanThrottle)
        );
        assert_eq!(
            check_api_stage(&apis, &stage("warranty", "prod", put), true),
            Ok(())
        );
        assert!(matches!(
            check_api_stage(&apis, &stage("warranty", "prod", Some(("/x/GET", t))), true),
            Err(PlanError::UnknownMethod { .. })
        ));
        let nan = ThrottleSettings {
            rate_limit: f64::NAN,
            burst_limit: 1,
        };
        assert_eq!(check_throttle(&nan), Err(PlanError::BadRate));
        let bad = Some(("/registrations/{id}/PUT", nan));
        assert_eq!(
            check_api_stage(&apis, &stage("warranty", "prod", bad), true),
            Err(PlanError::BadRate)
        );
    }
}
