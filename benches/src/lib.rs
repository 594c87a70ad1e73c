//! Shared set-up for sluice's benchmarks: backend tables and a request to pick for.

use std::sync::Arc;

use sluice::config::BackendSpec;
use sluice::metrics::Metrics;
use sluice::pool::{backends_from_specs, BackendTable};

/// A table of `n` backends on 127.0.0.1, weight 1.
pub fn table(n: usize, metrics: &Metrics) -> Arc<BackendTable> {
    let specs: Vec<BackendSpec> = (0..n)
        .map(|i| BackendSpec::loopback(10000 + i as u16))
        .collect();
    Arc::new(BackendTable::new(
        1,
        backends_from_specs(&specs, metrics, "bench"),
        None,
    ))
}

/// A typical request header.
pub fn request_header() -> pingora::http::RequestHeader {
    let mut h = pingora::http::RequestHeader::build("GET", b"/index.html?user=42", None)
        .expect("valid request");
    h.insert_header("host", "example.com")
        .expect("valid header");
    h.insert_header("user-agent", "bench")
        .expect("valid header");
    h
}
