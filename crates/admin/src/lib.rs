//! tollgate's control plane: AWS API Gateway's management API for API keys, usage plans, usage plan
//! keys and usage, authenticated with SigV4, so the AWS CLI and SDKs work with `--endpoint-url`.

mod answer;
mod body;
mod dashboard;
pub mod data_plane;
mod error;
mod exposition;
mod failures;
pub mod http;
mod import;
mod local;
pub mod seal;
pub mod service;
pub mod sigv4;
pub mod wire;
