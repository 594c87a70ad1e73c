//! Every built-in strategy through the real host: one Wasm pick at 8, 64 and 1024 backends, and
//! the cost of pushing a new table (what a membership change costs each worker thread).
//! The baseline in the same run is the native round-robin pick of `benches/pick.rs`.
//!
//! Run: `cargo bench -p sluice-benches --bench strategies`

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use sluice_benches::{request_header, strategy, table};
use sluice_core::backend::BackendTable;
use sluice_core::metrics::Metrics;
use sluice_core::plugin::{PluginEngine, RequestView};

fn strategies(c: &mut Criterion) {
    let engine = PluginEngine::new().expect("engine");
    let metrics = Metrics::new();
    let header = request_header();
    let none = |_: usize| false;
    let view = RequestView {
        header: &header,
        client_ip: Some("10.0.0.1".parse().unwrap()),
        excluded: &none,
    };
    let mut picks = c.benchmark_group("strategy_pick");
    picks
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for n in [8usize, 64, 1024] {
        let t = table(n, &metrics);
        let counter = AtomicUsize::new(0);
        picks.bench_with_input(BenchmarkId::new("native-baseline", n), &n, |b, _| {
            b.iter(|| black_box(counter.fetch_add(1, Ordering::Relaxed) % t.len()))
        });
        for name in sluice_core::builtin::strategy_names() {
            let host = strategy(&engine, name, &t, &metrics);
            picks.bench_with_input(BenchmarkId::new(name, n), &n, |b, _| {
                b.iter(|| black_box(host.pick(&t, &view, 0)))
            });
        }
    }
    picks.finish();

    // A table push: alternate between two tables of the same size so every pick first pushes.
    let mut pushes = c.benchmark_group("table_push");
    pushes
        .measurement_time(Duration::from_secs(2))
        .warm_up_time(Duration::from_millis(500));
    for n in [8usize, 64, 1024] {
        let a = table(n, &metrics);
        let b = Arc::new(BackendTable::new(
            a.generation + 1,
            a.backends.clone(),
            None,
        ));
        for name in sluice_core::builtin::strategy_names() {
            let host = strategy(&engine, name, &a, &metrics);
            let flip = AtomicUsize::new(0);
            pushes.bench_with_input(BenchmarkId::new(name, n), &n, |bench, _| {
                bench.iter(|| {
                    let t = if flip.fetch_add(1, Ordering::Relaxed).is_multiple_of(2) {
                        &a
                    } else {
                        &b
                    };
                    black_box(host.pick(t, &view, 0))
                })
            });
        }
    }
    pushes.finish();
}

criterion_group!(benches, strategies);
criterion_main!(benches);
