//! sluice-core: everything sluice decides, without the HTTP server.
//!
//! A request meets these modules in this order: [`route`] (host and path to a pool) → [`pool`]
//! (the routable backend table and its policies) → [`strategy`] (the Wasm pick, with a native
//! fallback) → a [`backend::Lease`] that holds the chosen backend's in-flight slot until the
//! attempt ends. [`plugin`] is the wasmtime host shared by every plugin kind; [`health`] and
//! [`health_scheduler`] run the active checks; [`runtime`] holds the swappable state and applies
//! reloads; [`membership`] feeds pools from the gossip cluster, [`dns`] from backend host names
//! and [`spawn`] from the instances sluice starts itself.
//!
//! The pingora request path lives in the `sluice` crate; nothing here depends on it, so the
//! conformance tests and benches of strategies build without it.

pub mod access_log;
pub mod backend;
pub mod builtin;
pub mod cluster_config;
pub mod cold_lock;
pub mod config;
pub mod dns;
pub mod forwarding;
pub mod fuzzing;
pub mod head;
pub mod health;
pub mod health_probe;
pub mod health_scheduler;
pub mod history;
pub mod http1;
pub mod latency;
pub mod lease;
pub mod listener;
pub mod membership;
pub mod metrics;
pub mod outlier;
pub mod plugin;
pub mod pool;
pub mod rate_limit;
pub mod rollout;
pub mod route;
pub mod route_rules;
pub mod runtime;
pub mod simulate;
pub mod spawn;
pub mod strategy;
pub mod upstream;
pub mod upstream_tls;

/// Gossip cluster membership (the `sluice-gossip` crate).
pub use sluice_gossip as cluster;
pub use sluice_gossip::clock;
