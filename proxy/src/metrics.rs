//! Prometheus metrics. One registry per process, handed to the parts that record (no globals),
//! so tests can read them. Hot-path handles are resolved once (per backend, per pool) and then
//! only incremented: the request path never looks up a label set.

use prometheus::{Encoder, IntCounterVec, IntGaugeVec, Opts, Registry, TextEncoder};

/// All metric families of a sluice process. Cloning is cheap (handles are shared).
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `sluice_requests_total{pool,backend,code}`.
    pub requests: IntCounterVec,
    /// `sluice_backend_inflight{pool,backend}`.
    pub backend_inflight: IntGaugeVec,
    /// `sluice_plugin_picks_total{pool}`: picks answered by the plugin.
    pub plugin_picks: IntCounterVec,
    /// `sluice_plugin_faults_total{pool,kind,reason}`: traps, deadlines, bad indexes, failed rebuilds.
    pub plugin_faults: IntCounterVec,
    /// `sluice_fallback_picks_total{pool}`: picks made by the native fallback.
    pub fallback_picks: IntCounterVec,
    /// `sluice_plugin_swaps_total{pool,kind,result}`.
    pub plugin_swaps: IntCounterVec,
    /// `sluice_no_backend_total{pool}`: requests answered 503 because no backend was available.
    pub no_backend: IntCounterVec,
    /// `sluice_config_reloads_total{result}`.
    pub reloads: IntCounterVec,
    /// `sluice_outlier_ejections_total{pool}`.
    pub ejections: IntCounterVec,
    /// `sluice_retries_total{pool,reason}`.
    pub retries: IntCounterVec,
    /// `sluice_health_checks_total{pool,result}`: pass, fail, error (plugin fault).
    pub health_checks: IntCounterVec,
    /// `sluice_health_flaps_total{pool}`: health state changes.
    pub health_flaps: IntCounterVec,
    /// `sluice_backend_healthy{pool,backend}`: 1 healthy, 0 not.
    pub backend_healthy: IntGaugeVec,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    /// A fresh registry with every sluice metric registered.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c =
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let requests = counter(
            "sluice_requests_total",
            "Proxied requests by pool, backend and status class.",
            &["pool", "backend", "code"],
        );
        let plugin_picks = counter(
            "sluice_plugin_picks_total",
            "Backend picks answered by the strategy plugin.",
            &["pool"],
        );
        let plugin_faults = counter(
            "sluice_plugin_faults_total",
            "Plugin faults (trap, deadline, bad_index, instantiate) by pool and plugin kind.",
            &["pool", "kind", "reason"],
        );
        let fallback_picks = counter(
            "sluice_fallback_picks_total",
            "Picks made by the native round-robin fallback after a plugin fault.",
            &["pool"],
        );
        let plugin_swaps = counter(
            "sluice_plugin_swaps_total",
            "Plugin hot-swap attempts by result.",
            &["pool", "kind", "result"],
        );
        let no_backend = counter(
            "sluice_no_backend_total",
            "Requests answered 503 because the pool had no available backend.",
            &["pool"],
        );
        let reloads = counter(
            "sluice_config_reloads_total",
            "Configuration reloads by result.",
            &["result"],
        );
        let ejections = counter(
            "sluice_outlier_ejections_total",
            "Backends ejected by passive outlier detection.",
            &["pool"],
        );
        let retries = counter(
            "sluice_retries_total",
            "Requests retried on another backend, by reason (connect, 5xx).",
            &["pool", "reason"],
        );
        let health_checks = counter(
            "sluice_health_checks_total",
            "Active health checks by result (pass, fail, error).",
            &["pool", "result"],
        );
        let health_flaps = counter(
            "sluice_health_flaps_total",
            "Backend health state changes.",
            &["pool"],
        );
        let backend_healthy = IntGaugeVec::new(
            Opts::new(
                "sluice_backend_healthy",
                "1 when the backend passes its health checks.",
            ),
            &["pool", "backend"],
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(backend_healthy.clone()))
            .expect("metric registered once");
        let backend_inflight = IntGaugeVec::new(
            Opts::new("sluice_backend_inflight", "Requests in flight per backend."),
            &["pool", "backend"],
        )
        .expect("valid metric definition");
        registry
            .register(Box::new(backend_inflight.clone()))
            .expect("metric registered once");
        Metrics {
            registry,
            requests,
            backend_inflight,
            plugin_picks,
            plugin_faults,
            fallback_picks,
            plugin_swaps,
            no_backend,
            reloads,
            ejections,
            retries,
            health_checks,
            health_flaps,
            backend_healthy,
        }
    }

    /// Drops the series of a backend that left its pool.
    pub fn forget_backend(&self, pool: &str, backend: &str) {
        let _ = self.backend_inflight.remove_label_values(&[pool, backend]);
        let _ = self.backend_healthy.remove_label_values(&[pool, backend]);
        for class in crate::pool::STATUS_CLASSES {
            // Absent series are fine: a backend may never have seen a class.
            let _ = self.requests.remove_label_values(&[pool, backend, class]);
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}
