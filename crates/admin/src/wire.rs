//! AWS API Gateway's JSON shapes for keys, plans, plan keys and usage, exactly as botocore's service
//! model names them (`item` for lists, `values` for usage, epoch-second timestamps).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tollgate_core::{ApiStage, QuotaSettings, ThrottleSettings};

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
    /// Legacy stage keys: always empty.
    pub stage_keys: Vec<String>,
    /// Tags: always empty.
    pub tags: BTreeMap<String, String>,
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
    /// Tags (present on Get, absent on Create and in lists, as AWS does).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tags: Option<BTreeMap<String, String>>,
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

/// AWS `Usage`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UsageOut {
    /// The plan.
    pub usage_plan_id: String,
    /// First day, `YYYY-MM-DD`.
    pub start_date: String,
    /// Last day, `YYYY-MM-DD`.
    pub end_date: String,
    /// Token for the next page of keys.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub position: Option<String>,
    /// Per key id, `[used, remaining]` per day.
    pub values: BTreeMap<String, Vec<[u64; 2]>>,
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
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateApiKeyIn {
    /// Name.
    pub name: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Enabled (AWS default: false).
    pub enabled: Option<bool>,
    /// Value (generated when absent or empty).
    pub value: Option<String>,
    /// Customer id.
    pub customer_id: Option<String>,
    /// Accepted and ignored, as tollgate has no legacy stage keys.
    pub stage_keys: Option<serde_json::Value>,
    /// Accepted and ignored: ids are always distinct.
    pub generate_distinct_id: Option<bool>,
    /// Accepted and ignored.
    pub tags: Option<serde_json::Value>,
}

/// ThrottleSettings as sent: every member optional.
#[derive(Debug, Clone, Copy, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ThrottleIn {
    /// Requests per second.
    pub rate_limit: Option<f64>,
    /// Bucket size.
    pub burst_limit: Option<i64>,
}

/// QuotaSettings as sent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct QuotaIn {
    /// Requests per period.
    pub limit: Option<i64>,
    /// Day shift.
    pub offset: Option<i64>,
    /// DAY, WEEK or MONTH.
    pub period: Option<String>,
}

/// ApiStage as sent.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ApiStageIn {
    /// The API id.
    pub api_id: Option<String>,
    /// The stage name.
    pub stage: Option<String>,
    /// Per-method throttles.
    pub throttle: Option<BTreeMap<String, ThrottleIn>>,
}

/// CreateUsagePlan's body.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateUsagePlanIn {
    /// Name (required).
    pub name: Option<String>,
    /// Description.
    pub description: Option<String>,
    /// Covered API stages.
    pub api_stages: Option<Vec<ApiStageIn>>,
    /// Per-key throttle.
    pub throttle: Option<ThrottleIn>,
    /// Per-key quota.
    pub quota: Option<QuotaIn>,
    /// Accepted and ignored.
    pub tags: Option<serde_json::Value>,
}

/// CreateUsagePlanKey's body.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CreateUsagePlanKeyIn {
    /// The API key's id.
    pub key_id: Option<String>,
    /// Must be `API_KEY`.
    pub key_type: Option<String>,
}

/// One JSON-Patch-like operation, as AWS takes them.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PatchOp {
    /// add, remove, replace, move, copy, test.
    pub op: Option<String>,
    /// The target path.
    pub path: Option<String>,
    /// The new value, always a string.
    pub value: Option<String>,
    /// Source path for move/copy.
    pub from: Option<String>,
}

/// The body of every Update* call.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PatchIn {
    /// The operations, applied in order.
    #[serde(default)]
    pub patch_operations: Vec<PatchOp>,
}
