//! Shared set-up for sluice's benchmarks: backend tables, a request to pick for, and a loaded
//! strategy. Built on `sluice-core` alone: no HTTP server is needed to measure a pick.

use std::sync::Arc;

use sluice_core::backend::BackendTable;
use sluice_core::config::BackendSpec;
use sluice_core::metrics::Metrics;
use sluice_core::plugin::PluginEngine;
use sluice_core::strategy::StrategyHost;

/// A table of `n` backends on 127.0.0.1, weight 1.
pub fn table(n: usize, metrics: &Metrics) -> Arc<BackendTable> {
    let specs: Vec<BackendSpec> = (0..n)
        .map(|i| BackendSpec::loopback(10000 + i as u16))
        .collect();
    Arc::new(BackendTable::from_specs(&specs, metrics, "bench", None))
}

/// A typical request head.
pub fn request_header() -> http::request::Parts {
    http::Request::get("/index.html?user=42")
        .header("host", "example.com")
        .header("user-agent", "bench")
        .body(())
        .expect("valid request")
        .into_parts()
        .0
}

/// The built-in strategy `name`, loaded with its default config and validated against `table`.
pub fn strategy(
    engine: &PluginEngine,
    name: &str,
    table: &Arc<BackendTable>,
    metrics: &Metrics,
) -> StrategyHost {
    let wasm = sluice_core::builtin::get(name).expect("a built-in strategy");
    let first = StrategyHost::prepare_first(engine, wasm, name, Arc::from(&b"{}"[..]), table)
        .expect("built-in strategies load");
    StrategyHost::new(engine, "bench", first, metrics)
}
