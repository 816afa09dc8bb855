//! The rules of tollgate, free of I/O and async: the record model (API keys, usage plans), GCRA
//! throttling, calendar quota windows and the injectable clock. Everything here is exact and
//! deterministic given a clock reading, so it is where most unit tests live.

pub mod clock;
pub mod credits;
pub mod event;
pub mod gcra;
pub mod model;
pub mod quota;
pub mod rules;
pub mod shadow;
pub mod sharing;
pub mod signature;
pub mod source_ips;

pub use clock::{Clock, ManualClock, SystemClock};
pub use credits::{CreditDecision, Credits, Refill};
pub use gcra::{Gcra, GcraState, ThrottleDecision};
pub use model::{ApiKey, ApiStage, KeyHash, QuotaSettings, ThrottleSettings, UsagePlan};
pub use quota::{EpochDay, MAX_REMAINING, Period, Quota, QuotaCount, QuotaWindow};
pub use sharing::ShareBy;
pub use source_ips::IpNetworks;
