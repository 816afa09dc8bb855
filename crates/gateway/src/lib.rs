//! tollgate's data plane: routes requests to APIs and stages, admits them through the API key, the
//! usage plan's throttles and quota, forwards them to the upstream and meters them.
//!
//! Where things are: `server` (accept loops, flusher, the control plane's handle; TLS handshakes
//! with `tls`'s certificates) hands each client, plain or TLS (`client`), to `conn` (an HTTP/1.1
//! connection's request loop) or, for HTTP/2, to `h2` (one task per stream). Both are sessions of
//! `exchange`, the one exchange every request goes through, in named phases: route, admit, answer,
//! send, log. Heads are parsed and framed by `http1` (the codec) and `rewrite` (which fields pass the
//! proxy, `X-Forwarded-*`); the path is normalised (`path`), matched (`route`) and admitted (`admit`,
//! answering with `limits`; the key's limits on this instance or in Redis, `shared_limits`; where the
//! request came from, for keys used only from some networks, `client_ip`), then
//! forwarded (`forward`'s pieces, over `proxy`'s upstream connections) or answered (`response`). What
//! admission reads is a `snapshot` of the records: the `key_table`, the resolved `plans`, and the live
//! state in `slots` that survives rebuilds; `meter` counts usage (and refusals, and last use) per day;
//! `state` is what all of these share. A JWT caller's key comes from `jwt` (its authorizer's verified
//! claim); a proxy in front asks `verify`'s decision endpoint instead of being proxied; `trace`,
//! `access_log` and `metrics` say what happened.

pub mod access_log;
mod admit;
pub mod alerts;
mod client;
mod client_ip;
pub mod config;
mod conn;
mod deadline;
mod exchange;
pub mod exporters;
mod forward;
mod h2;
mod http1;
pub mod jwt;
mod key_table;
mod limits;
mod local_limits;
mod meter;
mod metrics;
pub mod path;
mod plans;
mod proxy;
mod response;
pub mod rewrite;
pub mod route;
mod server;
mod shared_limits;
mod slots;
mod snapshot;
mod state;
#[cfg(test)]
mod testing;
pub mod tls;
mod trace;
pub mod verify;
pub mod webhooks;

pub use admit::{Admission, admit_locally};
pub use client_ip::ClientAddress;
pub use config::GatewayConfig;
pub use server::{
    DEFAULT_HEAD_TIMEOUT, DescriptorBudget, Gateway, GatewayError, GatewayHandle, GatewayOptions,
    Listeners,
};
pub use snapshot::Snapshot;
