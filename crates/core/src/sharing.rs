//! Limits shared by a customer's keys: a usage plan that opts in (`limitsShareBy: customerId`, or
//! the tag [`LIMITS_SHARE_BY_TAG`]) draws every key with the same `customerId` on one set of
//! throttle buckets and one quota count. Keys without a `customerId` keep their own.

use std::fmt;

/// The reserved plan tag that switches sharing on, so that AWS's own tools can set it.
pub const LIMITS_SHARE_BY_TAG: &str = "tollgate:limitsShareBy";

/// What a plan's keys share their limits by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShareBy {
    /// Keys with the same AWS `customerId`.
    CustomerId,
}

impl ShareBy {
    /// The value named `text` (`customerId`, AWS's field name), or an error naming the choices.
    pub fn parse(text: &str) -> Result<Self, String> {
        match text {
            "customerId" => Ok(Self::CustomerId),
            other => Err(format!(
                "unknown limitsShareBy {other:?}: the one choice is \"customerId\""
            )),
        }
    }
}

impl fmt::Display for ShareBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::CustomerId => "customerId",
        })
    }
}

/// The customer whose limits a key of a sharing plan draws on: its `customerId`, when it has a
/// non-empty one (an empty `customerId` names nobody, so such a key keeps its own limits).
pub fn customer_of(share_by: Option<ShareBy>, customer_id: Option<&str>) -> Option<&str> {
    match share_by? {
        ShareBy::CustomerId => customer_id.filter(|c| !c.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn share_by_names_and_customers() {
        assert_eq!(ShareBy::parse("customerId"), Ok(ShareBy::CustomerId));
        assert_eq!(ShareBy::CustomerId.to_string(), "customerId");
        let err = ShareBy::parse("customerID").unwrap_err();
        assert!(
            err.contains("\"customerID\"") && err.contains("customerId"),
            "{err}"
        );
        let shared = Some(ShareBy::CustomerId);
        assert_eq!(customer_of(shared, Some("acme")), Some("acme"));
        assert_eq!(
            customer_of(shared, Some("")),
            None,
            "an empty id names nobody"
        );
        assert_eq!(customer_of(shared, None), None);
        assert_eq!(
            customer_of(None, Some("acme")),
            None,
            "the plan does not share"
        );
    }
}
