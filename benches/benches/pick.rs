//! One pick through the Wasm round-robin strategy (the full host path: thread-local instance,
//! generation checks, epoch deadline, the call) versus the same logic in native Rust.
//!
//! Run: `cargo bench -p sluice-benches --bench pick`

use std::sync::atomic::{AtomicUsize, Ordering};

use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion};
use sluice_benches::{request_header, strategy, table};
use sluice_core::metrics::Metrics;
use sluice_core::plugin::{PluginEngine, RequestView};

fn pick(c: &mut Criterion) {
    let engine = PluginEngine::new().expect("engine");
    let metrics = Metrics::new();
    let header = request_header();
    let none = |_: usize| false;
    let view = RequestView {
        header: &header,
        client_ip: Some("10.0.0.1".parse().unwrap()),
        excluded: &none,
    };
    let mut group = c.benchmark_group("pick");
    for n in [8usize, 64] {
        let table = table(n, &metrics);
        let host = strategy(&engine, "round-robin", &table, &metrics);
        group.bench_with_input(BenchmarkId::new("wasm_round_robin", n), &n, |b, _| {
            b.iter(|| black_box(host.pick(&table, &view, 0)))
        });
        // The same algorithm natively: a shared counter modulo the table length, skipping
        // excluded backends.
        let counter = AtomicUsize::new(0);
        group.bench_with_input(BenchmarkId::new("native_round_robin", n), &n, |b, _| {
            b.iter(|| {
                let len = table.len();
                let start = counter.fetch_add(1, Ordering::Relaxed);
                black_box(
                    (0..len)
                        .map(|k| (start + k) % len)
                        .find(|&i| !(view.excluded)(i)),
                )
            })
        });
    }
    group.finish();
}

criterion_group!(benches, pick);
criterion_main!(benches);
