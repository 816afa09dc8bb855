//! Shadow mode: a usage plan tried before it refuses anything. Its limits are computed exactly, on
//! counters kept apart from the enforced ones (so switching to `enforce` starts clean), and what
//! they would have refused is only counted.

use std::borrow::Cow;
use std::fmt;

use crate::model::UsagePlan;

/// The reserved plan tag that sets the enforcement, so that AWS's own tools can set it.
pub const ENFORCEMENT_TAG: &str = "tollgate:enforcement";

/// The reserved plan tag that sends RateLimit headers in shadow mode (`true`).
pub const SHADOW_HEADERS_TAG: &str = "tollgate:shadowHeaders";

/// What a plan does with a request its limits refuse.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Enforcement {
    /// Refuses it (AWS's behaviour).
    #[default]
    Enforce,
    /// Lets it through and counts it as refused in shadow.
    Shadow,
}

impl Enforcement {
    /// The enforcement named `text` (`enforce`, `shadow`), or an error naming the choices.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "enforce" => Ok(Self::Enforce),
            "shadow" => Ok(Self::Shadow),
            other => Err(format!(
                "unknown enforcement {other:?}: the choices are \"enforce\" and \"shadow\""
            )),
        }
    }
}

impl fmt::Display for Enforcement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Enforce => "enforce",
            Self::Shadow => "shadow",
        })
    }
}

/// The name plan `plan_id`'s counts are kept under while it is in shadow.
pub fn shadow_counts(plan_id: &str) -> String {
    format!("{plan_id}:shadow")
}

/// Whether `text` is a [`SHADOW_HEADERS_TAG`] value.
pub fn parse_switch(text: &str) -> Result<bool, String> {
    match text {
        "true" => Ok(true),
        "false" => Ok(false),
        other => Err(format!("{other:?} is not true or false")),
    }
}

impl UsagePlan {
    /// The plan's enforcement, from its [`ENFORCEMENT_TAG`] (a value written past validation
    /// enforces).
    pub fn enforcement(&self) -> Enforcement {
        self.tags
            .get(ENFORCEMENT_TAG)
            .and_then(|v| Enforcement::parse(v).ok())
            .unwrap_or_default()
    }

    /// Whether a plan in shadow sends RateLimit headers, from its [`SHADOW_HEADERS_TAG`].
    pub fn shadow_headers(&self) -> bool {
        self.tags
            .get(SHADOW_HEADERS_TAG)
            .is_some_and(|v| parse_switch(v) == Ok(true))
    }

    /// The name the plan's counts are kept under: its id, or in shadow its id and `:shadow` (plan
    /// ids are alphanumeric, so no plan's own counts meet these).
    pub fn counts_as(&self) -> Cow<'_, str> {
        match self.enforcement() {
            Enforcement::Enforce => Cow::Borrowed(&self.id),
            Enforcement::Shadow => Cow::Owned(shadow_counts(&self.id)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_plan_in_shadow_counts_apart() {
        let mut plan = UsagePlan {
            id: "p1".into(),
            ..UsagePlan::default()
        };
        assert_eq!(
            (plan.enforcement(), &*plan.counts_as()),
            (Enforcement::Enforce, "p1")
        );
        plan.tags.insert(ENFORCEMENT_TAG.into(), "shadow".into());
        assert_eq!(
            (plan.enforcement(), &*plan.counts_as()),
            (Enforcement::Shadow, "p1:shadow")
        );
        assert!(!plan.shadow_headers());
        plan.tags.insert(SHADOW_HEADERS_TAG.into(), "true".into());
        assert!(plan.shadow_headers());
        let err = Enforcement::parse("Shadow").unwrap_err();
        assert!(err.contains("\"shadow\""), "{err}");
        assert!(parse_switch("yes").is_err());
    }
}
