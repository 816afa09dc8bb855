//! The records tollgate keeps, named and shaped as in AWS API Gateway.

use std::collections::BTreeMap;
use std::fmt;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::credits::{CREDIT_REFILL_TAG, Refill};
use crate::shadow::{ENFORCEMENT_TAG, Enforcement, SHADOW_HEADERS_TAG, parse_switch};
use crate::sharing::{LIMITS_SHARE_BY_TAG, ShareBy};
use crate::source_ips::{IpNetworks, SOURCE_IPS_TAG};

/// AWS `QuotaPeriodType`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum Period {
    /// A UTC calendar day.
    Day,
    /// A week starting on Sunday (plus `offset` days).
    Week,
    /// A month starting on the 1st (plus `offset` days).
    Month,
}

impl Period {
    /// Every period, in AWS's order.
    pub const ALL: [Self; 3] = [Self::Day, Self::Week, Self::Month];

    /// The period AWS names `name` (`DAY`, `WEEK`, `MONTH`).
    pub fn named(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.to_string() == name)
    }

    /// The largest `offset` this period accepts.
    pub fn max_offset(self) -> u32 {
        match self {
            Period::Day => 0,
            Period::Week => 6,
            Period::Month => 27,
        }
    }
}

impl fmt::Display for Period {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Period::Day => "DAY",
            Period::Week => "WEEK",
            Period::Month => "MONTH",
        })
    }
}

/// AWS `ThrottleSettings`: a token bucket refilled at `rateLimit` per second holding `burstLimit`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ThrottleSettings {
    /// Steady-state requests per second (may be fractional, e.g. 0.1).
    pub rate_limit: f64,
    /// Bucket capacity: the most requests admitted at one instant.
    pub burst_limit: u32,
}

/// AWS `QuotaSettings`: at most `limit` requests per calendar `period` (UTC), the period start shifted
/// by `offset` days.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaSettings {
    /// Requests allowed per period.
    pub limit: u32,
    /// Day shift of the period start: DAY 0; WEEK 0-6 (0 = Sunday); MONTH 0-27 (0 = the 1st).
    #[serde(default)]
    pub offset: u32,
    /// The calendar period.
    pub period: Period,
}

/// Why a [`QuotaSettings`] is not acceptable; the messages name the AWS field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum QuotaError {
    /// `offset` outside the range its period allows.
    #[error("quota offset {offset} is out of range for period {period} (allowed: 0 to {max})")]
    OffsetOutOfRange {
        /// The offending offset.
        offset: u32,
        /// The period it was given with.
        period: Period,
        /// The largest allowed offset.
        max: u32,
    },
}

impl QuotaSettings {
    /// Checks `offset` against the period, as tollgate's binding decision in AWS-COMPAT.md requires.
    pub fn validate(&self) -> Result<(), QuotaError> {
        let max = self.period.max_offset();
        if self.offset > max {
            return Err(QuotaError::OffsetOutOfRange {
                offset: self.offset,
                period: self.period,
                max,
            });
        }
        Ok(())
    }
}

/// AWS `ApiStage`: one (api, stage) a usage plan covers, with optional per-method throttles keyed by
/// `"/resource/path/METHOD"`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiStage {
    /// The API's id.
    pub api_id: String,
    /// The stage name.
    pub stage: String,
    /// Per-method throttles that replace the plan throttle for that method.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub throttle: BTreeMap<String, ThrottleSettings>,
}

/// AWS `UsagePlan`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsagePlan {
    /// Store-assigned id (6 lowercase alphanumerics).
    pub id: String,
    /// Operator-chosen name.
    pub name: String,
    /// Free text.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// The (api, stage) pairs this plan covers.
    #[serde(default)]
    pub api_stages: Vec<ApiStage>,
    /// Per-key throttle, shared across the plan's stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub throttle: Option<ThrottleSettings>,
    /// Per-key quota, shared across the plan's stages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaSettings>,
    /// AWS tags.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: Tags,
    /// AWS Marketplace product code: kept and returned, unused.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub product_code: Option<String>,
}

impl UsagePlan {
    /// What the plan's keys share their limits by, from its [`LIMITS_SHARE_BY_TAG`] (none: each key
    /// has its own). A value that does not parse (written past validation) shares nothing.
    pub fn limits_share_by(&self) -> Option<ShareBy> {
        self.tags
            .get(LIMITS_SHARE_BY_TAG)
            .and_then(|v| ShareBy::parse(v).ok())
    }

    /// Whether the quota counts of this plan, changed from `before`, start again from what the
    /// store counted: its quota, what its keys share, or its enforcement (shadow counts are kept
    /// apart) changed.
    pub fn recounts_from(&self, before: &UsagePlan) -> bool {
        self.quota != before.quota
            || self.limits_share_by() != before.limits_share_by()
            || self.enforcement() != before.enforcement()
    }
}

/// AWS resource tags: key → value.
pub type Tags = BTreeMap<String, String>;

/// The most tags a resource may carry (AWS's limit).
pub const MAX_TAGS: usize = 50;

/// The reserved tag carrying a key's expiry (RFC 3339), so that AWS's own tools can set it.
pub const EXPIRES_TAG: &str = "tollgate:expiresAt";

/// Checks tags the way AWS does: at most 50, keys of 1 to 128 characters not starting with `aws:`,
/// values of at most 256; and that [`EXPIRES_TAG`] holds a time, [`SOURCE_IPS_TAG`] CIDRs,
/// [`LIMITS_SHARE_BY_TAG`] a [`ShareBy`], [`CREDIT_REFILL_TAG`] a [`Refill`], [`ENFORCEMENT_TAG`] an
/// [`Enforcement`] and [`SHADOW_HEADERS_TAG`] `true` or `false`. With AWS's messages where AWS has one.
pub fn validate_tags(tags: &Tags) -> Result<(), String> {
    if tags.len() > MAX_TAGS {
        return Err(format!(
            "Too many tags: a resource can have at most {MAX_TAGS}"
        ));
    }
    for (k, v) in tags {
        if k.is_empty() || k.chars().count() > 128 {
            return Err("Invalid tag key. Tag keys must be 1 to 128 characters long".into());
        }
        if k.get(..4).is_some_and(|p| p.eq_ignore_ascii_case("aws:")) {
            return Err(
                "Invalid tag key. Tag keys cannot start with 'aws:' (case insensitive)".into(),
            );
        }
        if v.chars().count() > 256 {
            return Err(format!(
                "Invalid tag value for key '{k}'. Tag values can be at most 256 characters long"
            ));
        }
        if k == EXPIRES_TAG {
            parse_expiry(v)?;
        }
        if k == SOURCE_IPS_TAG {
            IpNetworks::parse(v).map_err(|e| format!("Invalid tag value for key '{k}': {e}"))?;
        }
        if k == CREDIT_REFILL_TAG {
            Refill::parse(v).map_err(|e| format!("Invalid tag value for key '{k}': {e}"))?;
        }
        if k == ENFORCEMENT_TAG {
            Enforcement::parse(v).map_err(|e| format!("Invalid tag value for key '{k}': {e}"))?;
        }
        if k == SHADOW_HEADERS_TAG {
            parse_switch(v).map_err(|e| format!("Invalid tag value for key '{k}': {e}"))?;
        }
        if k == LIMITS_SHARE_BY_TAG {
            ShareBy::parse(v).map_err(|e| format!("Invalid tag value for key '{k}': {e}"))?;
        }
    }
    Ok(())
}

/// An expiry as written in [`EXPIRES_TAG`] or `expiresAt`: an RFC 3339 time, as epoch nanoseconds.
pub fn parse_expiry(text: &str) -> Result<u64, String> {
    let at: jiff::Timestamp = text.parse().map_err(|_| {
        format!(
            "Invalid expiresAt '{text}': expected an RFC 3339 time such as 2027-01-31T00:00:00Z"
        )
    })?;
    u64::try_from(at.as_nanosecond())
        .map_err(|_| format!("Invalid expiresAt '{text}': before 1970"))
}

/// SHA-256 of an API key value: all tollgate keeps of the value by default.
#[derive(Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyHash(pub [u8; 32]);

impl KeyHash {
    /// Hashes a presented or configured key value.
    pub fn of(value: impl AsRef<[u8]>) -> Self {
        Self(Sha256::digest(value.as_ref()).into())
    }
}

impl fmt::Debug for KeyHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Only a prefix: enough to tell hashes apart in a debug dump.
        write!(f, "KeyHash({}…)", hex::encode(&self.0[..4]))
    }
}

/// AWS `ApiKey`, minus the value: only its hash is kept.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ApiKey {
    /// Store-assigned id (10 lowercase alphanumerics).
    pub id: String,
    /// Operator-chosen name.
    pub name: String,
    /// Free text.
    pub description: Option<String>,
    /// AWS Marketplace customer id, kept for compatibility.
    pub customer_id: Option<String>,
    /// Disabled keys are refused with 403.
    pub enabled: bool,
    /// SHA-256 of the value.
    pub value_hash: KeyHash,
    /// The value sealed with the operator's key (AES-256-GCM), only when values are stored encrypted.
    pub sealed_value: Option<Vec<u8>>,
    /// Creation time, epoch seconds.
    pub created_date: i64,
    /// Last change, epoch seconds.
    pub last_updated_date: i64,
    /// AWS tags ([`EXPIRES_TAG`] among them).
    pub tags: Tags,
    /// The value's first 4 characters (empty for keys stored before tollgate kept them).
    pub value_prefix: String,
    /// The value's length in characters (0 when not known).
    pub value_length: u32,
    /// The value before the last rotation, still accepted until its grace period ends.
    pub previous: Option<PreviousValue>,
    /// The key holds credits (it was given some, or has a refill): its requests spend them.
    pub credits: bool,
}

/// A rotated key's old value: its hash, and the instant (epoch nanoseconds) it stops working.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PreviousValue {
    /// SHA-256 of the old value.
    pub hash: KeyHash,
    /// From this instant the old value is refused.
    pub until: u64,
}

impl ApiKey {
    /// When the key stops working (epoch nanoseconds), from its [`EXPIRES_TAG`].
    pub fn expires_at(&self) -> Option<u64> {
        self.tags
            .get(EXPIRES_TAG)
            .and_then(|v| parse_expiry(v).ok())
    }

    /// The key's credit refill, from its [`CREDIT_REFILL_TAG`].
    pub fn refill(&self) -> Option<Refill> {
        self.tags
            .get(CREDIT_REFILL_TAG)
            .and_then(|v| Refill::parse(v).ok())
    }

    /// The networks the key may be used from, from its [`SOURCE_IPS_TAG`] (none: anywhere).
    pub fn source_ips(&self) -> Option<IpNetworks> {
        self.tags.get(SOURCE_IPS_TAG).map(|v| IpNetworks::stored(v))
    }

    /// Gives the key the value `value` (whose hash is `hash`); the current value stays accepted until
    /// `until` (epoch nanoseconds), replacing any earlier grace at once: at most two values live.
    pub fn rotate(&mut self, value: &str, hash: KeyHash, until: u64) {
        self.previous = Some(PreviousValue {
            hash: self.value_hash,
            until,
        });
        self.value_hash = hash;
        self.set_value_hint(value);
    }

    /// Records what is kept in the clear of `value`: its first 4 characters and its length.
    pub fn set_value_hint(&mut self, value: &str) {
        self.value_prefix = value.chars().take(4).collect();
        self.value_length = u32::try_from(value.chars().count()).unwrap_or(u32::MAX);
    }
}

/// Length bounds AWS puts on a key value.
pub const KEY_VALUE_LEN: std::ops::RangeInclusive<usize> = 20..=128;

/// Checks a key value the way AWS does (20 to 128 characters), with AWS's messages.
pub fn validate_key_value(value: &str) -> Result<(), &'static str> {
    let len = value.chars().count();
    if len < *KEY_VALUE_LEN.start() {
        Err("API Key value should be at least 20 characters")
    } else if len > *KEY_VALUE_LEN.end() {
        Err("API Key value exceeds maximum size of 128 characters")
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_hash_is_sha256() {
        let h = KeyHash::of("abc");
        assert_eq!(hex::encode(&h.0[..2]), "ba78");
        assert_eq!(format!("{h:?}"), "KeyHash(ba7816bf…)");
    }

    #[test]
    fn key_value_bounds_use_aws_messages() {
        assert_eq!(
            validate_key_value(&"a".repeat(19)),
            Err("API Key value should be at least 20 characters")
        );
        assert_eq!(validate_key_value(&"a".repeat(20)), Ok(()));
        assert_eq!(validate_key_value(&"a".repeat(128)), Ok(()));
        assert_eq!(
            validate_key_value(&"a".repeat(129)),
            Err("API Key value exceeds maximum size of 128 characters")
        );
    }

    #[test]
    fn quota_offset_ranges() {
        let q = |period, offset| {
            QuotaSettings {
                limit: 1,
                offset,
                period,
            }
            .validate()
        };
        assert!(q(Period::Day, 0).is_ok());
        assert!(q(Period::Day, 1).is_err());
        assert!(q(Period::Week, 6).is_ok());
        assert!(q(Period::Week, 7).is_err());
        assert!(q(Period::Month, 27).is_ok());
        assert_eq!(
            q(Period::Month, 28).unwrap_err().to_string(),
            "quota offset 28 is out of range for period MONTH (allowed: 0 to 27)"
        );
    }
}
