//! tollgate's data plane: routes requests to APIs and stages, admits them through the API key, the
//! usage plan's throttles and quota, forwards them to the upstream and meters them.

pub mod config;
mod conn;
pub mod http1;
pub mod limiter;
pub mod meter;
pub mod metrics;
pub mod path;
pub mod proxy;
pub mod response;
pub mod route;
mod server;
pub mod snapshot;

pub use config::GatewayConfig;
pub use server::{
    DEFAULT_HEAD_TIMEOUT, DescriptorBudget, Gateway, GatewayError, GatewayHandle, GatewayOptions,
    period_usage,
};
pub use snapshot::Snapshot;
