//! Black-box tests: the real `tollgate` binary against a real upstream HTTP server on 127.0.0.1, with
//! real SQLite files in temporary directories. One test binary, one module per concern.

#![allow(clippy::unwrap_used, missing_docs)]

/// Starting the binary, a test upstream, and an HTTP client.
mod util;

/// The AWS-compatible admin API: SigV4, every operation's shape and errors, live effect on the data plane.
mod admin;
/// What is checked is what the backend reads: methods and `_` field names as Flask on wsgiref reads
/// them, over HTTP/1.1, HTTP/2 and the decision endpoint.
mod backend_reads;
/// Cluster mode: instances sharing exact limits through real redis-server processes (and a cluster).
mod cluster;
/// Config validation: exit codes and file:line:field messages, `check`, nothing bound on failure.
mod config;
/// The dashboard in headless Chromium: sign in, keys, a key's 90 days, disabling it; sessions and CSRF.
mod dashboard;
/// The request pipeline end to end: every status AWS defines, headers, streaming, the mock integration.
mod data_plane;
/// Request smuggling against a sloppy upstream: hidden requests never reach it, answers never cross
/// between clients.
mod desync;

/// Webhooks: signed deliveries to a real receiver, retried, kept when failed, sent once by a fleet.
mod events;
mod exports;
/// Forward-auth: the real nginx and Caddy in front of an upstream, tollgate deciding.
mod forward_auth;
/// HTTP/2 to clients: ALPN and prior knowledge, multiplexed streams each admitted and counted once,
/// header bounds, the rapid-reset pattern.
mod http2;
/// Callers with JWTs: apiKeySource AUTHORIZER, a verified claim naming the key.
mod jwt;
/// Listener limits: connection caps, head timeouts, body limits, fields that steer backends; the
/// admin plane cannot starve the data plane.
mod limits;
/// Malformed requests get 4xx and never take the process down.
mod malformed;
/// Partner accounts: source-IP allowlists behind trusted proxies and not, on both stores.
mod partners;
/// Path confusion: every normalisation trick against a real nginx that normalises; the upstream sees
/// only paths admitted for the request's key.
mod paths;
/// Durable metering: graceful restarts lose nothing, a crash loses at most one flush interval.
mod persistence;
/// Serverless Framework files: the seed runs as is, CORS, `import serverless`.
mod serverless;
/// HTTPS at the edge: real handshakes with curl and rustls clients, SNI, reloads, mTLS, `check`.
mod tls;
/// `tollgate usage` reports AWS GetUsage's shape.
mod usage;
