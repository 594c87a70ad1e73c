//! sluice: a load-balancing reverse proxy on pingora whose balancing strategies are WebAssembly
//! plugins, hot-swappable while traffic flows.
//!
//! The request path, one module per stage: [`proxy`] (pingora phases) → [`route`] (host and
//! path prefix to a pool) → [`pool`] (backend table and live stats) → [`strategy`] (the Wasm
//! pick, with a native fallback) → back to [`proxy`] for the peer. [`plugin`] is the wasmtime host
//! shared by every plugin kind; [`runtime`] holds the swappable state; [`admin`] is the API.

pub mod admin;
pub mod agent;
pub mod builtin;
pub mod client;
pub mod clock;
pub mod cluster;
pub mod config;
pub mod dashboard;
pub mod demo;
pub mod health;
pub mod health_probe;
pub mod health_scheduler;
pub mod membership;
pub mod metrics;
pub mod outlier;
pub mod plugin;
pub mod pool;
pub mod proxy;
pub mod route;
pub mod runtime;
pub mod scaffold;
pub mod server;
pub mod simulate;
pub mod strategy;
