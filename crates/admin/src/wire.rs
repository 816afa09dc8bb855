//! AWS API Gateway's JSON shapes for keys, plans, plan keys and usage, exactly as botocore's service
//! model names them (`item` for lists, `values` for usage, epoch-second timestamps). The request
//! shapes (`…In`) are what the service reads and what the CLI sends.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tollgate_core::model::Tags;
use tollgate_core::{ApiStage, QuotaSettings, ThrottleSettings};

/// A JSON-Pointer segment (RFC 6901) as a patch operation's `path` writes it: `~` as `~0`, `/` as
/// `~1` (a method throttle's resource path holds slashes).
pub fn pointer_escape(segment: &str) -> String {
    segment.replace('~', "~0").replace('/', "~1")
}

/// The segment [`pointer_escape`] wrote.
pub fn pointer_unescape(segment: &str) -> String {
    segment.replace("~1", "/").replace("~0", "~")
}

/// AWS `ApiKey`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiKeyOut {
    /// Key id.
    pub id: String,
    /// The value: on create, and with `includeValue` when values are stored encrypted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Name.
    pub name: String,
    /// Customer id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    /// Description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Enabled.
    pub enabled: bool,
    /// Epoch seconds.
    pub created_date: i64,
    /// Epoch seconds.
    pub last_updated_date: i64,
    /// tollgate's own: when the key was last presented (epoch seconds, to the minute), if ever.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_used_date: Option<u64>,
    /// Legacy stage keys: always empty.
    pub stage_keys: Vec<String>,
    /// Tags.
    pub tags: Tags,
    /// tollgate's own: when the key stops working (RFC 3339), from the tag `tollgate:expiresAt`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
    /// tollgate's own: the value's first 4 characters, kept in the clear to tell keys apart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_prefix: Option<String>,
    /// tollgate's own: the value's length in characters.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value_length: Option<u32>,
    /// tollgate's own: after a rotation, until when (RFC 3339) the value before it is still accepted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub previous_value_expires_at: Option<String>,
    /// tollgate's own, on GetApiKey: the key's prepaid credits, when it holds some.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub credits: Option<CreditsOut>,
}

/// A key's prepaid credits.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreditsOut {
    /// Credits left.
    pub balance: u64,
    /// What the balance comes back up to, each period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refill: Option<RefillOut>,
}

/// A credits refill.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RefillOut {
    /// The amount.
    pub amount: u64,
    /// `DAY`, `WEEK` or `MONTH`.
    pub period: String,
}

/// tollgate's AddCredits body.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreditsIn {
    /// Credits to add.
    pub add: Option<i64>,
    /// Adds once per API key: a repeat adds nothing.
    pub idempotency_key: Option<String>,
}

/// tollgate's AddCredits answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreditsAdded {
    /// The API key.
    pub id: String,
    /// Whether this call added them (`false`: the idempotency key was used before).
    pub added: bool,
    /// The key's credits now.
    pub credits: CreditsOut,
}

/// tollgate's RotateApiKey body.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RotateApiKeyIn {
    /// The new value (generated when absent or empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// How long the current value keeps working, in seconds (default: a day).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grace_seconds: Option<u64>,
}

/// AWS `UsagePlan`.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct UsagePlanOut {
    /// Plan id.
    pub id: String,
    /// Name.
    pub name: String,
    /// Description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Covered API stages.
    pub api_stages: Vec<ApiStage>,
    /// Per-key throttle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle: Option<ThrottleSettings>,
    /// Per-key quota.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaSettings>,
    /// AWS Marketplace product code.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub product_code: Option<String>,
    /// Tags: always on Get; on Create and in lists only when there are some, as AWS does.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Tags>,
}

/// AWS `UsagePlanKey`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UsagePlanKeyOut {
    /// The API key's id.
    pub id: String,
    /// Always `API_KEY`.
    #[serde(rename = "type")]
    pub key_type: &'static str,
    /// The key value, when values are stored encrypted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// The key's name.
    pub name: String,
}

/// A page of a list: AWS puts the items under `item`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Page<T> {
    /// Token for the next page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
    /// The items.
    pub item: Vec<T>,
}

/// AWS `Usage` (`V`: `[used, remaining]`), or tollgate's detailed usage (`V`: [`DayDetail`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageOut<V = [u64; 2]> {
    /// The plan.
    pub usage_plan_id: String,
    /// First day, `YYYY-MM-DD`.
    pub start_date: String,
    /// Last day, `YYYY-MM-DD`.
    pub end_date: String,
    /// Token for the next page of keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
    /// Per key id, one value per day.
    pub values: BTreeMap<String, Vec<V>>,
}

/// A customer's usage in a plan that shares limits by customer (tollgate's own report, in GetUsage's
/// terms): `items` its keys together, `values` each key.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct CustomerUsageOut {
    /// The plan.
    pub usage_plan_id: String,
    /// The customer.
    pub customer_id: String,
    /// First day, `YYYY-MM-DD`.
    pub start_date: String,
    /// Last day, `YYYY-MM-DD`.
    pub end_date: String,
    /// The days.
    #[serde(flatten)]
    pub usage: tollgate_store::report::CustomerUsage,
}

/// AWS `ImportApiKeys` result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ImportOut {
    /// Ids of the imported keys.
    pub ids: Vec<String>,
    /// Rows that were skipped, and why.
    pub warnings: Vec<String>,
}

/// CreateApiKey's body.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateApiKeyIn {
    /// Name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Enabled (AWS default: false).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
    /// Value (generated when absent or empty).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Customer id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub customer_id: Option<String>,
    /// Accepted and ignored, as tollgate has no legacy stage keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage_keys: Option<serde_json::Value>,
    /// Accepted and ignored: ids are always distinct.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub generate_distinct_id: Option<bool>,
    /// Tags.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Tags>,
    /// tollgate's own: when the key stops working (RFC 3339), kept as the tag `tollgate:expiresAt`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expires_at: Option<String>,
}

/// ThrottleSettings as sent: every member optional.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ThrottleIn {
    /// Requests per second.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<f64>,
    /// Bucket size.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub burst_limit: Option<i64>,
}

/// QuotaSettings as sent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaIn {
    /// Requests per period.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    /// Day shift.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offset: Option<i64>,
    /// DAY, WEEK or MONTH.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub period: Option<String>,
}

/// ApiStage as sent.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiStageIn {
    /// The API id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_id: Option<String>,
    /// The stage name.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// Per-method throttles.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle: Option<BTreeMap<String, ThrottleIn>>,
}

/// CreateUsagePlan's body.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateUsagePlanIn {
    /// Name (required).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Description.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Covered API stages.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub api_stages: Option<Vec<ApiStageIn>>,
    /// Per-key throttle.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub throttle: Option<ThrottleIn>,
    /// Per-key quota.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub quota: Option<QuotaIn>,
    /// Tags.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<Tags>,
}

/// CreateUsagePlanKey's body.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateUsagePlanKeyIn {
    /// The API key's id.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_id: Option<String>,
    /// Must be `API_KEY`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key_type: Option<String>,
}

/// One JSON-Patch-like operation, as AWS takes them.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PatchOp {
    /// add, remove, replace, move, copy, test.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub op: Option<String>,
    /// The target path.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The new value, always a string.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
    /// Source path for move/copy.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
}

impl PatchOp {
    /// An `op` on `path`, with `value` when the operation takes one (AWS's values are strings).
    pub fn new(op: &str, path: impl Into<String>, value: Option<String>) -> Self {
        Self {
            op: Some(op.to_owned()),
            path: Some(path.into()),
            value,
            from: None,
        }
    }
}

/// The body of every Update* call.
#[derive(Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PatchIn {
    /// The operations, applied in order.
    #[serde(default)]
    pub patch_operations: Vec<PatchOp>,
}
