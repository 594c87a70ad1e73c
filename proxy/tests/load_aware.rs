//! Load-aware strategies on real traffic: a deliberately slow backend on loopback receives
//! clearly fewer requests under least-connections, P2C and peak-EWMA.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;

fn slow_backend_gets_fewer(strategy: &str) {
    let b = backends(3);
    b[0].1.delay_ms.store(60, Ordering::Relaxed);
    let body = format!(
        "[[pool]]\nname = \"web\"\nstrategy = \"builtin:{strategy}\"\nbackends = [{}]\n[[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    let proxy = Proxy::start(strategy, &body);
    let addr = proxy.listen;
    // 8 concurrent clients, 60 requests each, at most 60 s.
    let results = bounded_load(8, 60, Duration::from_secs(60), move |c| {
        keepalive_get(c, addr, "/")
    });
    assert!(
        results
            .iter()
            .all(|r| matches!(r, Ok(r) if r.status == 200)),
        "{strategy}: a request failed"
    );
    let served: Vec<u64> = b
        .iter()
        .map(|(_, be)| be.served.load(Ordering::Relaxed))
        .collect();
    let fast_avg = (served[1] + served[2]) as f64 / 2.0;
    assert!(
        (served[0] as f64) < fast_avg * 0.5,
        "{strategy}: slow backend served {} vs fast average {fast_avg} ({served:?})",
        served[0]
    );
}

#[test]
fn least_connections_avoids_the_slow_backend() {
    slow_backend_gets_fewer("least-connections");
}

#[test]
fn p2c_avoids_the_slow_backend() {
    slow_backend_gets_fewer("p2c");
}

#[test]
fn peak_ewma_avoids_the_slow_backend() {
    slow_backend_gets_fewer("peak-ewma");
}
