//! Prometheus metrics. One registry per process, handed to the parts that record (no globals),
//! so tests can read them. Hot-path handles are resolved once (per backend, per pool) and then
//! only incremented: the request path never looks up a label set.
//!
//! Series that belong to a pool or a backend are created through a [`SeriesScope`], an owned value
//! that removes them from the registry when the last holder drops it: a removed pool or backend
//! leaves no series behind, and nothing has to remember to "forget" them.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use crate::cold_lock::ColdLock;

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

/// Status classes used as the `code` label of `sluice_requests_total`.
pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

/// Upper bounds (seconds) of the request-path histograms: from a loopback round trip (0.5 ms)
/// to a slow backend (10 s), roughly three per decade.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

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
    /// `sluice_plugin_log_dropped_total{pool,kind}`: plugin log lines over the rate budget.
    pub plugin_log_dropped: IntCounterVec,
    /// `sluice_no_backend_total{pool}`: requests answered 503 because no backend was available.
    pub no_backend: IntCounterVec,
    /// `sluice_config_reloads_total{result}`.
    pub reloads: IntCounterVec,
    /// `sluice_outlier_ejections_total{pool}`.
    pub ejections: IntCounterVec,
    /// `sluice_retries_total{pool,reason}`.
    pub retries: IntCounterVec,
    /// `sluice_upstream_aborts_total{pool}`: responses cut off because the backend failed after
    /// the response head had gone downstream (the client connection is aborted).
    pub upstream_aborts: IntCounterVec,
    /// `sluice_health_checks_total{pool,result}`: pass, fail, error (plugin fault).
    pub health_checks: IntCounterVec,
    /// `sluice_health_flaps_total{pool}`: health state changes.
    pub health_flaps: IntCounterVec,
    /// `sluice_backend_healthy{pool,backend}`: 1 healthy, 0 not.
    pub backend_healthy: IntGaugeVec,
    /// `sluice_downstream_connections`: client connections open now.
    pub downstream_open: IntGaugeVec,
    /// `sluice_downstream_accepted_total`: client connections accepted.
    pub downstream_accepted: IntCounterVec,
    /// `sluice_access_log_dropped_total`: access log lines dropped because the writer was behind.
    pub access_log_dropped: IntCounterVec,
    /// `sluice_dns_resolution_failures_total{pool}`: failed refreshes of backend host names (the
    /// last good addresses stay).
    pub dns_failures: IntCounterVec,
    /// `sluice_spawn_restarts_total{pool}`: spawned instances restarted after they exited (or
    /// failed to start or to accept connections).
    pub spawn_restarts: IntCounterVec,
    /// `sluice_limit_rejections_total{reason}`: clients cut off by a `[server.limits]` setting
    /// (`connections`, `header_timeout`, `body_timeout`, `header_size`, `body_size`, `rate_limit`).
    pub limit_rejections: IntCounterVec,
    /// `sluice_cluster_tuning{setting}`: the gossip timings in use now (they follow the live
    /// member count and local health).
    pub cluster_tuning: IntGaugeVec,
    /// `sluice_cluster_last_known_good`: 1 while pools keep their last-known-good cluster members.
    pub cluster_last_known_good: IntGaugeVec,
    /// `sluice_cluster_refused_announcements_total{pool}`: services cluster members announced
    /// into the pool that `[[cluster.allow]]` refused, each counted once.
    pub cluster_refused: IntCounterVec,
    /// `sluice_cluster_transport_total{event}`: the gossip transport's counters
    /// (`sluice_gossip::Stats::events`): datagrams and frames, refusals, fallback probes.
    pub cluster_transport: IntCounterVec,
    /// `sluice_cluster_transport_bytes_total{direction}`: gossip bytes `sent` and `received`.
    pub cluster_transport_bytes: IntCounterVec,
    /// `sluice_cluster_tcp_buffer_bytes`: bytes gossip TCP frame buffers hold now.
    pub cluster_tcp_buffer: IntGaugeVec,
    /// `sluice_cluster_duplicate_names_total`: clashes of two live members with one name this
    /// node saw (the newcomer leaves).
    pub cluster_duplicate_names: IntCounterVec,
    /// `sluice_cluster_key_file_errors_total`: keyring changes that could not be written back
    /// to `[cluster] key_file`.
    pub cluster_key_file_errors: IntCounterVec,
    /// Request-path histograms per pool (`{pool}`).
    pub pool_timings: TimingFamilies,
    /// Request-path histograms per backend (`{pool,backend}`); series exist only when
    /// [`Metrics::per_backend`] is on.
    pub backend_timings: TimingFamilies,
    /// `sluice_request_body_bytes_total{pool}`: request body bytes read from clients.
    pub request_bytes: IntCounterVec,
    /// `sluice_response_body_bytes_total{pool}`: response body bytes sent to clients.
    pub response_bytes: IntCounterVec,
    /// Backends get their own histograms (`[admin] metrics_per_backend`).
    per_backend: bool,
    scopes: Arc<ColdLock<HashMap<Vec<String>, Weak<ScopeInner>>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

/// The three request-path histogram families, at one level (pool or backend).
#[derive(Clone)]
pub struct TimingFamilies {
    /// `…request_duration_seconds`: from the complete request head to the end of the response.
    pub duration: HistogramVec,
    /// `…upstream_connect_seconds`: connecting to a backend (new connections only).
    pub connect: HistogramVec,
    /// `…upstream_response_seconds`: from the request sent to the response head received.
    pub response: HistogramVec,
}

/// The request-path histograms of one pool or one backend, resolved once.
#[derive(Clone)]
pub struct Timings {
    /// See [`TimingFamilies::duration`].
    pub duration: Histogram,
    /// See [`TimingFamilies::connect`].
    pub connect: Histogram,
    /// See [`TimingFamilies::response`].
    pub response: Histogram,
}

impl std::fmt::Debug for Timings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Timings")
    }
}

impl Metrics {
    /// A fresh registry with every sluice metric registered (no per-backend histograms).
    pub fn new() -> Metrics {
        Metrics::with_per_backend(false)
    }

    /// A fresh registry; `per_backend` gives every backend its own request-path histograms
    /// (a series set per backend: off by default to bound cardinality).
    pub fn with_per_backend(per_backend: bool) -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str, labels: &[&str]| {
            let c =
                IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            registry
                .register(Box::new(c.clone()))
                .expect("metric registered once");
            c
        };
        let gauge = |name: &str, help: &str, labels: &[&str]| {
            let g =
                IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric definition");
            registry
                .register(Box::new(g.clone()))
                .expect("metric registered once");
            g
        };
        let histogram = |name: &str, help: &str, labels: &[&str]| {
            let opts = HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec());
            let h = HistogramVec::new(opts, labels).expect("valid metric definition");
            registry
                .register(Box::new(h.clone()))
                .expect("metric registered once");
            h
        };
        let timings = |prefix: &str, what: &str, labels: &[&str]| {
            TimingFamilies {
            duration: histogram(
                &format!("{prefix}request_duration_seconds"),
                &format!("Requests {what}: from the complete request head to the end of the response."),
                labels,
            ),
            connect: histogram(
                &format!("{prefix}upstream_connect_seconds"),
                &format!("New upstream connections {what}: time to connect (reused connections are not observed)."),
                labels,
            ),
            response: histogram(
                &format!("{prefix}upstream_response_seconds"),
                &format!("Upstream answers {what}: from the request sent to the response head received."),
                labels,
            ),
        }
        };
        Metrics {
            pool_timings: timings("sluice_", "per pool", &["pool"]),
            backend_timings: timings("sluice_backend_", "per backend", &["pool", "backend"]),
            request_bytes: counter(
                "sluice_request_body_bytes_total",
                "Request body bytes read from clients, per pool (heads not counted).",
                &["pool"],
            ),
            response_bytes: counter(
                "sluice_response_body_bytes_total",
                "Response body bytes sent to clients, per pool (heads not counted).",
                &["pool"],
            ),
            per_backend,
            requests: counter(
                "sluice_requests_total",
                "Proxied requests by pool, backend and status class.",
                &["pool", "backend", "code"],
            ),
            backend_inflight: gauge(
                "sluice_backend_inflight",
                "Requests in flight per backend.",
                &["pool", "backend"],
            ),
            plugin_picks: counter(
                "sluice_plugin_picks_total",
                "Backend picks answered by the strategy plugin.",
                &["pool"],
            ),
            plugin_faults: counter(
                "sluice_plugin_faults_total",
                "Plugin faults (trap, deadline, bad_index, instantiate) by pool and plugin kind.",
                &["pool", "kind", "reason"],
            ),
            fallback_picks: counter(
                "sluice_fallback_picks_total",
                "Picks made by the native round-robin fallback after a plugin fault.",
                &["pool"],
            ),
            plugin_swaps: counter(
                "sluice_plugin_swaps_total",
                "Plugin hot-swap attempts by result.",
                &["pool", "kind", "result"],
            ),
            plugin_log_dropped: counter(
                "sluice_plugin_log_dropped_total",
                "Plugin log lines dropped because the instance exceeded its log budget.",
                &["pool", "kind"],
            ),
            no_backend: counter(
                "sluice_no_backend_total",
                "Requests answered 503 because the pool had no available backend.",
                &["pool"],
            ),
            reloads: counter(
                "sluice_config_reloads_total",
                "Configuration reloads by result.",
                &["result"],
            ),
            ejections: counter(
                "sluice_outlier_ejections_total",
                "Backends ejected by passive outlier detection.",
                &["pool"],
            ),
            retries: counter(
                "sluice_retries_total",
                "Requests retried on another backend, by reason (connect, reused, 5xx).",
                &["pool", "reason"],
            ),
            upstream_aborts: counter(
                "sluice_upstream_aborts_total",
                "Responses aborted downstream because the backend failed after the response head was sent.",
                &["pool"],
            ),
            health_checks: counter(
                "sluice_health_checks_total",
                "Active health checks by result (pass, fail, error).",
                &["pool", "result"],
            ),
            health_flaps: counter(
                "sluice_health_flaps_total",
                "Backend health state changes.",
                &["pool"],
            ),
            backend_healthy: gauge(
                "sluice_backend_healthy",
                "1 when the backend passes its health checks.",
                &["pool", "backend"],
            ),
            downstream_open: gauge(
                "sluice_downstream_connections",
                "Client connections open now.",
                &[],
            ),
            downstream_accepted: counter(
                "sluice_downstream_accepted_total",
                "Client connections accepted.",
                &[],
            ),
            access_log_dropped: counter(
                "sluice_access_log_dropped_total",
                "Access log lines dropped because the writer thread was behind.",
                &[],
            ),
            dns_failures: counter(
                "sluice_dns_resolution_failures_total",
                "Failed refreshes of backend host names; the last good addresses stay.",
                &["pool"],
            ),
            spawn_restarts: counter(
                "sluice_spawn_restarts_total",
                "Spawned instances restarted after they exited, failed to start or to accept connections.",
                &["pool"],
            ),
            cluster_tuning: gauge(
                "sluice_cluster_tuning",
                "Gossip timings in use now, by setting: members, probe_interval_ms, suspicion_timeout_ms, suspicion_max_timeout_ms, retransmissions, push_pull_interval_ms, local_health.",
                &["setting"],
            ),
            cluster_last_known_good: gauge(
                "sluice_cluster_last_known_good",
                "1 while this proxy keeps its last-known-good pools because it sees itself cut off or a mass failure.",
                &[],
            ),
            cluster_refused: counter(
                "sluice_cluster_refused_announcements_total",
                "Services cluster members announced into the pool that [[cluster.allow]] refused, each counted once.",
                &["pool"],
            ),
            cluster_transport: counter(
                "sluice_cluster_transport_total",
                "Gossip transport events since this member started, by event (the counters of the member's transport statistics, also in GET /api/cluster as transport).",
                &["event"],
            ),
            cluster_transport_bytes: counter(
                "sluice_cluster_transport_bytes_total",
                "Gossip bytes sent and received over UDP and TCP (sealed, with frame headers), by direction.",
                &["direction"],
            ),
            cluster_tcp_buffer: gauge(
                "sluice_cluster_tcp_buffer_bytes",
                "Bytes gossip TCP frame buffers hold now (bounded by the inbound buffer budget).",
                &[],
            ),
            cluster_duplicate_names: counter(
                "sluice_cluster_duplicate_names_total",
                "Clashes of two live cluster members with one node name seen by this node; the later one leaves.",
                &[],
            ),
            cluster_key_file_errors: counter(
                "sluice_cluster_key_file_errors_total",
                "Keyring changes (a key rotation) that could not be written back to [cluster] key_file.",
                &[],
            ),
            limit_rejections: counter(
                "sluice_limit_rejections_total",
                "Clients cut off by a [server.limits] setting, by reason.",
                &["reason"],
            ),
            registry,
            scopes: Arc::default(),
        }
    }

    /// Whether backends get their own request-path histograms.
    pub fn per_backend(&self) -> bool {
        self.per_backend
    }

    /// The scope of the series labelled with `key` (`[pool]` or `[pool, backend]`): an existing
    /// live scope for the same key is shared, so a pool that is replaced by one of the same name
    /// keeps its series.
    pub fn scope(&self, key: &[&str]) -> SeriesScope {
        let key: Vec<String> = key.iter().map(|s| s.to_string()).collect();
        let mut scopes = self.scopes.lock();
        if let Some(inner) = scopes.get(&key).and_then(Weak::upgrade) {
            return SeriesScope { inner };
        }
        let inner = Arc::new(ScopeInner {
            key: key.clone(),
            scopes: Arc::downgrade(&self.scopes),
            series: ColdLock::new(Vec::new()),
        });
        scopes.insert(key, Arc::downgrade(&inner));
        SeriesScope { inner }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8192);
        // Encoding into a Vec cannot fail for well-formed families.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// A family a scope created a series in.
#[derive(Clone)]
enum Family {
    Counter(IntCounterVec),
    Gauge(IntGaugeVec),
    Histogram(HistogramVec),
}

impl Family {
    fn name(&self) -> &str {
        match self {
            Family::Counter(v) => &v.desc()[0].fq_name,
            Family::Gauge(v) => &v.desc()[0].fq_name,
            Family::Histogram(v) => &v.desc()[0].fq_name,
        }
    }

    fn remove(&self, labels: &[String]) {
        let labels: Vec<&str> = labels.iter().map(String::as_str).collect();
        // Absent series are fine: another scope of the same key may have removed it.
        let _ = match self {
            Family::Counter(v) => v.remove_label_values(&labels),
            Family::Gauge(v) => v.remove_label_values(&labels),
            Family::Histogram(v) => v.remove_label_values(&labels),
        };
    }
}

struct ScopeInner {
    key: Vec<String>,
    scopes: Weak<ColdLock<HashMap<Vec<String>, Weak<ScopeInner>>>>,
    series: ColdLock<Vec<(Family, Vec<String>)>>,
}

impl Drop for ScopeInner {
    fn drop(&mut self) {
        let series = std::mem::take(self.series.get_mut());
        let Some(scopes) = self.scopes.upgrade() else {
            return; // the registry itself is gone
        };
        let mut scopes = scopes.lock();
        match scopes.get(&self.key).and_then(Weak::upgrade) {
            // A successor for the same key was created while this one was dropping: it now owns
            // the series (its handles point at them), so hand them over instead of removing them.
            Some(successor) => successor.series.lock().extend(series),
            None => {
                scopes.remove(&self.key);
                for (family, labels) in &series {
                    family.remove(labels);
                }
            }
        }
    }
}

/// The series of one pool or one backend. Every handle obtained through it is removed from the
/// registry when the last clone of the scope (for that key) is dropped.
#[derive(Clone)]
pub struct SeriesScope {
    inner: Arc<ScopeInner>,
}

impl std::fmt::Debug for SeriesScope {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SeriesScope({:?})", self.inner.key)
    }
}

impl SeriesScope {
    fn labels(&self, extra: &[&str]) -> Vec<String> {
        let mut labels = self.inner.key.clone();
        labels.extend(extra.iter().map(|s| s.to_string()));
        labels
    }

    fn remember(&self, family: Family, labels: Vec<String>) {
        let mut series = self.inner.series.lock();
        let name = family.name();
        if !series.iter().any(|(f, l)| *l == labels && f.name() == name) {
            series.push((family, labels));
        }
    }

    /// The counter of `family` with this scope's labels followed by `extra`.
    pub fn counter(&self, family: &IntCounterVec, extra: &[&str]) -> IntCounter {
        let labels = self.labels(extra);
        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        let c = family.with_label_values(&refs);
        self.remember(Family::Counter(family.clone()), labels);
        c
    }

    /// The gauge of `family` with this scope's labels followed by `extra`.
    pub fn gauge(&self, family: &IntGaugeVec, extra: &[&str]) -> IntGauge {
        let labels = self.labels(extra);
        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        let g = family.with_label_values(&refs);
        self.remember(Family::Gauge(family.clone()), labels);
        g
    }

    /// The histogram of `family` with this scope's labels.
    pub fn histogram(&self, family: &HistogramVec) -> Histogram {
        let labels = self.labels(&[]);
        let refs: Vec<&str> = labels.iter().map(String::as_str).collect();
        let h = family.with_label_values(&refs);
        self.remember(Family::Histogram(family.clone()), labels);
        h
    }

    /// The three request-path histograms of `families` with this scope's labels.
    pub fn timings(&self, families: &TimingFamilies) -> Timings {
        Timings {
            duration: self.histogram(&families.duration),
            connect: self.histogram(&families.connect),
            response: self.histogram(&families.response),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rendered(m: &Metrics) -> String {
        String::from_utf8(m.render()).unwrap()
    }

    #[test]
    fn a_scope_removes_its_series_when_the_last_holder_drops() {
        let m = Metrics::new();
        let a = m.scope(&["web"]);
        a.counter(&m.plugin_picks, &[]).inc();
        let b = m.scope(&["web"]);
        b.counter(&m.retries, &["connect"]).inc();
        drop(a);
        assert!(rendered(&m).contains("sluice_plugin_picks_total{pool=\"web\"} 1"));
        drop(b);
        let text = rendered(&m);
        assert!(!text.contains("pool=\"web\""), "{text}");
    }

    #[test]
    fn histograms_of_a_scope_go_with_it() {
        let m = Metrics::with_per_backend(true);
        let pool = m.scope(&["web"]);
        let backend = m.scope(&["web", "127.0.0.1:1"]);
        pool.timings(&m.pool_timings).duration.observe(0.003);
        backend.timings(&m.backend_timings).response.observe(0.02);
        let text = rendered(&m);
        assert!(
            text.contains("sluice_request_duration_seconds_bucket{pool=\"web\",le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(text.contains(
            "sluice_backend_upstream_response_seconds_count{backend=\"127.0.0.1:1\",pool=\"web\"} 1"
        ));
        drop((pool, backend));
        let text = rendered(&m);
        assert!(!text.contains("pool=\"web\""), "{text}");
    }

    #[test]
    fn scopes_of_other_keys_are_untouched() {
        let m = Metrics::new();
        let web = m.scope(&["web", "127.0.0.1:1"]);
        let api = m.scope(&["api", "127.0.0.1:1"]);
        web.gauge(&m.backend_inflight, &[]).set(3);
        api.gauge(&m.backend_inflight, &[]).set(4);
        drop(web);
        let text = rendered(&m);
        assert!(!text.contains("pool=\"web\""));
        assert!(text.contains("pool=\"api\""));
    }
}
