//! sluice: a load-balancing reverse proxy on pingora whose balancing strategies and health checks
//! are WebAssembly plugins, hot-swappable while traffic flows.
//!
//! This crate is the server around `sluice-core`: [`proxy`] is the request path on pingora
//! (listener → route → pool → strategy → peer), [`tls`] terminates TLS, [`admin`] the API and dashboard, [`server`]
//! assembles a process, [`agent`] runs `sluice agent`, and the CLI lives in `main.rs`. The
//! engine's modules are re-exported here under their own names.

pub mod admin;
pub mod agent;
pub mod client;
pub mod dashboard;
pub mod demo;
pub mod lean;
pub mod proxy;
pub mod rewind;
pub mod scaffold;
pub mod server;
pub mod tls;
pub mod tls_name;

pub use sluice_core::{
    access_log, backend, builtin, clock, cluster, cluster_config, cold_lock, config, dns,
    forwarding, head, health, health_probe, health_scheduler, history, http1, latency, lease,
    listener, membership, metrics, outlier, plugin, pool, rate_limit, rollout, route, route_rules,
    runtime, simulate, spawn, strategy, upstream, upstream_tls,
};
