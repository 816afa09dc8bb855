//! Plan resolution: a usage plan's (api, stage) and per-method throttle names resolved once per
//! rebuild into indices of the configured APIs, so a request compares numbers, not names.

use std::sync::Arc;

use tollgate_core::gcra::Gcra;
use tollgate_core::quota::Quota;
use tollgate_core::shadow::Enforcement;
use tollgate_core::{ShareBy, ThrottleSettings, UsagePlan};

use crate::config::GatewayConfig;
use crate::route::RouteMatch;

/// (api, stage, route) indices into the configured APIs.
pub(crate) type RouteAt = (usize, usize, usize);

/// A usage plan as the request path applies it.
#[derive(Debug)]
pub(crate) struct PlanRules {
    pub(crate) id: Arc<str>,
    /// The operator's name for it, for the metrics.
    pub(crate) name: Arc<str>,
    pub(crate) throttle: Option<Gcra>,
    pub(crate) quota: Option<Quota>,
    /// (api, stage) indices it covers.
    pub(crate) stages: Vec<(usize, usize)>,
    /// Per-method throttles.
    pub(crate) methods: Vec<(RouteAt, ThrottleSettings)>,
    /// What its keys share their limits by (none: each key has its own).
    pub(crate) share_by: Option<ShareBy>,
    /// The name its counts are kept under: its id, or in shadow its shadow name.
    pub(crate) counts_as: Arc<str>,
    /// In shadow: its limits refuse nothing.
    pub(crate) shadow: bool,
    /// In shadow, the RateLimit headers are sent too.
    pub(crate) shadow_headers: bool,
}

impl PlanRules {
    /// Resolves what `plan` covers in the configured APIs (unknown APIs, stages and methods are
    /// reported once per plan).
    pub(crate) fn resolve(plan: &UsagePlan, config: &GatewayConfig) -> Self {
        let mut stages = Vec::new();
        let mut methods = Vec::new();
        for api_stage in &plan.api_stages {
            let Some((a, api)) = config
                .apis
                .iter()
                .enumerate()
                .find(|(_, a)| a.id == api_stage.api_id)
            else {
                tracing::warn!(plan = %plan.id, api = %api_stage.api_id, "usage plan names an unknown API; ignored");
                continue;
            };
            let Some(s) = api.stages.iter().position(|s| s.name == api_stage.stage) else {
                tracing::warn!(plan = %plan.id, api = %api.id, stage = %api_stage.stage, "usage plan names an unknown stage; ignored");
                continue;
            };
            stages.push((a, s));
            for (method_key, settings) in &api_stage.throttle {
                match api
                    .routes
                    .iter()
                    .position(|r| r.throttle_key() == *method_key)
                {
                    Some(r) => methods.push(((a, s, r), *settings)),
                    None => tracing::warn!(plan = %plan.id, method = %method_key,
                        "usage plan throttles a method the API does not have; ignored"),
                }
            }
        }
        Self {
            id: plan.id.as_str().into(),
            name: plan.name.as_str().into(),
            throttle: plan.throttle.map(Gcra::new),
            quota: plan.quota.map(Quota::new),
            stages,
            methods,
            share_by: plan.limits_share_by(),
            counts_as: plan.counts_as().into(),
            shadow: plan.enforcement() == Enforcement::Shadow,
            shadow_headers: plan.shadow_headers(),
        }
    }

    /// Whether the plan covers the stage `m` matched.
    pub(crate) fn covers(&self, m: &RouteMatch) -> bool {
        self.stages.contains(&(m.api, m.stage))
    }

    /// Where the matched route is, when the plan has a per-method throttle for it.
    pub(crate) fn method_at(&self, m: &RouteMatch) -> Option<RouteAt> {
        let at = (m.api, m.stage, m.route);
        self.methods
            .iter()
            .any(|(here, _)| *here == at)
            .then_some(at)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use http::Method;
    use tollgate_core::ApiStage;

    use super::*;
    use crate::testing::{config, throttle};

    #[test]
    fn resolves_names_to_indices_and_skips_unknown_ones() {
        let config = config(None, None);
        let stage = |api: &str, stage: &str, method: Option<&str>| ApiStage {
            api_id: api.into(),
            stage: stage.into(),
            throttle: method
                .map(|m| BTreeMap::from([(m.to_owned(), throttle(1.0, 1))]))
                .unwrap_or_default(),
        };
        let plan = UsagePlan {
            id: "p".into(),
            name: "p".into(),
            description: None,
            api_stages: vec![
                stage("warranty", "dev", Some("/registrations/{id}/GET")),
                stage("warranty", "staging", None),
                stage("elsewhere", "prod", None),
                stage("warranty", "prod", Some("/nowhere/GET")),
            ],
            throttle: None,
            quota: None,
            ..UsagePlan::default()
        };
        let rules = PlanRules::resolve(&plan, &config);
        assert_eq!(rules.stages, vec![(0, 1), (0, 0)]);
        assert_eq!(rules.methods.len(), 1);
        assert_eq!(rules.methods[0].0, (0, 1, 1));

        let router = crate::route::Router::new(&config.apis).unwrap();
        let get_dev = router.route(&Method::GET, "/dev/registrations/7").unwrap();
        assert!(rules.covers(&get_dev));
        assert_eq!(rules.method_at(&get_dev), Some((0, 1, 1)));
        let put_dev = router
            .route(&Method::PUT, "/dev/registrations/7/warranty")
            .unwrap();
        assert_eq!(rules.method_at(&put_dev), None);
    }
}
