//! Pools of backends: the live per-backend statistics shared by all worker threads, and the
//! immutable backend table that is rebuilt (and pushed to the strategy) only when membership changes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use prometheus::{IntCounter, IntGauge};

use crate::config::BackendSpec;
use crate::metrics::Metrics;
use crate::strategy::StrategyHost;

/// Live load data of one backend, read by strategies through host calls in O(1).
///
/// Shared by every worker thread; survives config reloads while the backend's address stays.
#[derive(Debug)]
pub struct BackendStats {
    /// Requests currently in flight (also exported as the `sluice_backend_inflight` gauge).
    pub inflight: IntGauge,
    /// Latency EWMA in microseconds (0 = no sample yet).
    latency_ewma_us: AtomicU64,
    /// Consecutive failures (connect errors and 5xx), reset by a success.
    consecutive_failures: AtomicU32,
    /// Requests by status class: 1xx..5xx, then "error" (no response).
    by_class: [IntCounter; 6],
    /// Passive outlier detection: ejected until this time ([`crate::clock::now_ms`]), 0 = not ejected.
    pub ejected_until_ms: AtomicU64,
    /// How often this backend was ejected (grows the ejection time; decays after a clean period).
    pub ejections: AtomicU32,
    /// When the backend (re)joined the routable set; slow start ramps from here.
    pub admitted_at_ms: AtomicU64,
    /// Active health state (true until a health check says otherwise).
    pub healthy: AtomicBool,
    /// The cluster member announcing this backend is suspect or draining: no new requests.
    pub cluster_hold: AtomicBool,
    /// Weight percentage from a "degraded" health verdict (100 = full weight).
    pub health_factor: AtomicU32,
    /// Health-check bookkeeping, touched only by the health scheduler and the admin API.
    pub health: Mutex<HealthRecord>,
}

/// Per-backend health-check state.
#[derive(Debug, Default, Clone)]
pub struct HealthRecord {
    /// At least one check has completed.
    pub checked: bool,
    /// Consecutive passes.
    pub passes: u32,
    /// Consecutive failures.
    pub fails: u32,
    /// Last result, for people.
    pub last_result: String,
    /// When the state last changed ([`crate::clock::now_ms`]).
    pub last_change_ms: u64,
    /// When the next probe is due.
    pub next_due_ms: u64,
    /// A probe is running.
    pub in_flight: bool,
    /// Pool request count at the last probe (no change = the pool is idle).
    pub pool_requests_seen: u64,
}

/// Status classes used as the `code` label.
pub const STATUS_CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

impl BackendStats {
    fn new(metrics: &Metrics, pool: &str, addr: &str) -> BackendStats {
        BackendStats {
            inflight: metrics.backend_inflight.with_label_values(&[pool, addr]),
            latency_ewma_us: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            by_class: STATUS_CLASSES.map(|c| metrics.requests.with_label_values(&[pool, addr, c])),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            admitted_at_ms: AtomicU64::new(0),
            healthy: AtomicBool::new(true),
            cluster_hold: AtomicBool::new(false),
            health_factor: AtomicU32::new(100),
            health: Mutex::new(HealthRecord::default()),
        }
    }

    /// True while ejected by outlier detection.
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// True when the backend may take traffic (healthy, not ejected, not held by the cluster).
    pub fn is_routable(&self, now_ms: u64) -> bool {
        self.healthy.load(Ordering::Relaxed)
            && !self.cluster_hold.load(Ordering::Relaxed)
            && !self.is_ejected(now_ms)
    }

    /// Latency EWMA in microseconds.
    pub fn latency_us(&self) -> u64 {
        self.latency_ewma_us.load(Ordering::Relaxed)
    }

    /// Consecutive failures.
    pub fn failures(&self) -> u32 {
        self.consecutive_failures.load(Ordering::Relaxed)
    }

    /// Records the end of a request. `status` is `None` when no response came back.
    pub fn record(&self, status: Option<u16>, latency: Duration) {
        let class = match status {
            Some(s @ 100..=599) => (s / 100 - 1) as usize,
            _ => 5,
        };
        self.by_class[class].inc();
        if status.is_some_and(|s| s < 500) {
            self.consecutive_failures.store(0, Ordering::Relaxed);
            // A racy read-modify-write: concurrent samples may overwrite each other, which only
            // drops a sample from an average; a CAS loop would cost more than it is worth.
            let sample = latency.as_micros().min(u64::MAX as u128) as u64;
            let old = self.latency_ewma_us.load(Ordering::Relaxed);
            let new = if old == 0 {
                sample.max(1)
            } else {
                (old * 7 + sample) / 8
            };
            self.latency_ewma_us.store(new.max(1), Ordering::Relaxed);
        } else {
            self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Forgets consecutive failures (after an ejection ends).
    pub fn reset_failures(&self) {
        self.consecutive_failures.store(0, Ordering::Relaxed);
    }

    /// Requests finished with this status class index (see [`STATUS_CLASSES`]).
    pub fn requests_in_class(&self, class: usize) -> u64 {
        self.by_class[class].get()
    }
}

/// One backend of a pool.
#[derive(Debug)]
pub struct Backend {
    /// Address.
    pub addr: SocketAddr,
    /// `addr` as text, the backend's identity in the ABI table, metrics and the API.
    pub addr_text: String,
    /// Configured weight.
    pub weight: u32,
    /// Zone ("" = none).
    pub zone: String,
    /// Tags.
    pub tags: Vec<String>,
    /// Live statistics.
    pub stats: Arc<BackendStats>,
}

/// The backends a strategy chooses among, with a generation that changes whenever the set does.
///
/// Built once per membership change; `encoded` is the ABI table the strategy receives.
#[derive(Debug)]
pub struct BackendTable {
    /// Changes whenever the contents change.
    pub generation: u64,
    /// Routable backends; a strategy's pick is an index into this.
    pub backends: Vec<Arc<Backend>>,
    /// Effective weights (configured weight with slow start applied), parallel to `backends`.
    pub weights: Vec<u32>,
    /// The table in the ABI wire format (sdk/ABI.md, "Backend table format").
    pub encoded: Vec<u8>,
    /// True when built in panic mode (too few routable backends, so all are used).
    pub panic: bool,
}

impl BackendTable {
    /// Builds and encodes a table with the configured weights.
    pub fn new(
        generation: u64,
        backends: Vec<Arc<Backend>>,
        local_zone: Option<&str>,
    ) -> BackendTable {
        let weights = backends.iter().map(|b| b.weight).collect();
        BackendTable::with_weights(generation, backends, weights, local_zone, false)
    }

    fn with_weights(
        generation: u64,
        backends: Vec<Arc<Backend>>,
        weights: Vec<u32>,
        local_zone: Option<&str>,
        panic: bool,
    ) -> BackendTable {
        let encoded = encode_table(&backends, &weights, local_zone);
        BackendTable {
            generation,
            backends,
            weights,
            encoded,
            panic,
        }
    }

    /// Number of backends.
    pub fn len(&self) -> usize {
        self.backends.len()
    }

    /// True when no backend can take traffic.
    pub fn is_empty(&self) -> bool {
        self.backends.is_empty()
    }
}

/// Encodes backends in the ABI table format.
pub fn encode_table(
    backends: &[Arc<Backend>],
    weights: &[u32],
    local_zone: Option<&str>,
) -> Vec<u8> {
    let mut out = Vec::with_capacity(4 + backends.len() * 48);
    out.extend_from_slice(&(backends.len() as u32).to_le_bytes());
    for (b, w) in backends.iter().zip(weights) {
        encode_entry(&mut out, b, *w, local_zone);
    }
    out
}

/// Appends one table entry (the ABI table format without the count); health plugins get a
/// backend in this form too.
pub fn encode_entry(out: &mut Vec<u8>, b: &Backend, weight: u32, local_zone: Option<&str>) {
    fn put_str(out: &mut Vec<u8>, s: &str) {
        let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(b.len() as u16).to_le_bytes());
        out.extend_from_slice(b);
    }
    out.extend_from_slice(&weight.max(1).to_le_bytes());
    let local = local_zone.is_some_and(|z| !z.is_empty() && z == b.zone);
    out.extend_from_slice(&u32::from(local).to_le_bytes());
    put_str(out, &b.addr_text);
    put_str(out, &b.zone);
    out.extend_from_slice(&(b.tags.len().min(u16::MAX as usize) as u16).to_le_bytes());
    for t in b.tags.iter().take(u16::MAX as usize) {
        put_str(out, t);
    }
}

/// Per-pool upstream settings and balancing policies.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    /// Extra attempts after a failure that may be retried.
    pub retries: u32,
    /// Also retry a 5xx answer (on another backend).
    pub retry_on_5xx: bool,
    /// Retry non-idempotent methods too (a connect failure is always retried: it never reached the backend).
    pub retry_non_idempotent: bool,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Read timeout.
    pub read_timeout: Duration,
    /// Upstream keep-alive idle timeout.
    pub idle_timeout: Duration,
    /// Passive outlier detection.
    pub outlier: crate::outlier::OutlierPolicy,
    /// Ramp a new or re-admitted backend's weight over this window (zero = off).
    pub slow_start: Duration,
    /// Below this percentage of routable members, balance over all members (0 = never).
    pub panic_threshold: u32,
    /// Prefer backends in the proxy's zone.
    pub zone_aware: bool,
    /// Spill out of the local zone when its in-flight requests per weight unit exceed this.
    pub zone_spill_inflight: u32,
    /// Active health-check schedule (the plugin itself is [`Pool::health`]).
    pub health: Option<HealthSchedule>,
}

/// When and how often a pool's backends are probed.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSchedule {
    /// Time between probes of one backend.
    pub interval: Duration,
    /// Interval while the pool has no traffic.
    pub idle_interval: Duration,
    /// ± random spread per interval.
    pub jitter: Duration,
    /// Probe timeout.
    pub timeout: Duration,
    /// Passes to become healthy.
    pub rise: u32,
    /// Failures to become unhealthy.
    pub fall: u32,
    /// New backends start unhealthy (not routed until their first pass).
    pub start_unhealthy: bool,
    /// Probes at once.
    pub concurrency: u32,
}

/// A pool: its members, the routable table built from them, its strategy and its settings,
/// each swappable while traffic flows.
pub struct Pool {
    /// The pool's name.
    pub name: String,
    /// Every configured backend, routable or not.
    pub members: ArcSwap<Vec<Arc<Backend>>>,
    /// Current routable backends (what the strategy sees).
    pub table: ArcSwap<BackendTable>,
    /// The strategy plugin.
    pub strategy: StrategyHost,
    /// Upstream settings and policies.
    pub settings: ArcSwap<PoolSettings>,
    pub(crate) metrics: Metrics,
    local_zone: Option<String>,
    /// Serializes table rebuilds; held only on membership changes, never per request.
    rebuild: Mutex<()>,
    /// The health-check plugin, when the pool has one.
    pub health: arc_swap::ArcSwapOption<crate::health::HealthHost>,
    /// Requests routed to this pool (the health scheduler slows down while it does not move).
    pub requests: AtomicU64,
    /// Where members come from: (static config, gossip cluster). Merged into `members`.
    sources: Mutex<(Vec<BackendSpec>, Vec<BackendSpec>)>,
}

impl Pool {
    /// A new pool with the given backends.
    pub fn new(
        name: &str,
        specs: &[BackendSpec],
        settings: PoolSettings,
        strategy: StrategyHost,
        metrics: Metrics,
        local_zone: Option<String>,
    ) -> Pool {
        let members: Vec<Arc<Backend>> = specs
            .iter()
            .map(|s| Arc::new(make_backend(&metrics, name, s, None)))
            .collect();
        if settings.health.as_ref().is_some_and(|h| h.start_unhealthy) {
            for b in &members {
                b.stats.healthy.store(false, Ordering::Relaxed);
            }
        }
        let table = BackendTable::new(1, members.clone(), local_zone.as_deref());
        let pool = Pool {
            name: name.to_string(),
            members: ArcSwap::from_pointee(members),
            table: ArcSwap::from_pointee(table),
            strategy,
            settings: ArcSwap::from_pointee(settings),
            metrics,
            local_zone,
            rebuild: Mutex::new(()),
            health: arc_swap::ArcSwapOption::empty(),
            requests: AtomicU64::new(0),
            sources: Mutex::new((specs.to_vec(), Vec::new())),
        };
        pool.rebuild_table();
        pool
    }

    /// Replaces the backends from the config file; gossip members stay. True when members changed.
    pub fn set_static_backends(&self, specs: &[BackendSpec]) -> bool {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        sources.0 = specs.to_vec();
        self.set_backends(&merge_sources(&sources))
    }

    /// Replaces the backends announced by cluster members; static ones stay. True when members changed.
    pub fn set_gossip_backends(&self, specs: &[BackendSpec]) -> bool {
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        if sources.1 == specs {
            return false;
        }
        sources.1 = specs.to_vec();
        self.set_backends(&merge_sources(&sources))
    }

    /// Replaces all members, keeping the statistics of backends whose address stays.
    /// Returns true when the membership changed.
    fn set_backends(&self, specs: &[BackendSpec]) -> bool {
        let _guard = self.rebuild.lock().unwrap_or_else(|p| p.into_inner());
        let old = self.members.load_full();
        let same = old.len() == specs.len()
            && old.iter().zip(specs).all(|(b, s)| {
                b.addr == s.addr && b.weight == s.weight && b.zone == s.zone && b.tags == s.tags
            });
        if same {
            return false;
        }
        let now = crate::clock::now_ms();
        let start_unhealthy = self
            .settings
            .load()
            .health
            .as_ref()
            .is_some_and(|h| h.start_unhealthy);
        let members: Vec<_> = specs
            .iter()
            .map(|s| {
                let stats = old
                    .iter()
                    .find(|b| b.addr == s.addr)
                    .map(|b| b.stats.clone());
                let is_new = stats.is_none();
                let b = Arc::new(make_backend(&self.metrics, &self.name, s, stats));
                if is_new {
                    // A backend joining a running pool starts its slow-start ramp now...
                    b.stats.admitted_at_ms.store(now, Ordering::Relaxed);
                    // ...and, with health checks, is not routed before its first pass.
                    if start_unhealthy {
                        b.stats.healthy.store(false, Ordering::Relaxed);
                    }
                }
                b
            })
            .collect();
        for gone in old
            .iter()
            .filter(|b| !specs.iter().any(|s| s.addr == b.addr))
        {
            self.metrics.forget_backend(&self.name, &gone.addr_text);
        }
        self.members.store(Arc::new(members));
        self.rebuild_locked(now);
        true
    }

    /// Recomputes the routable table from members, health, ejections, zone and slow start.
    /// Publishes (and so pushes to the strategy) only when something changed.
    pub fn rebuild_table(&self) -> bool {
        let _guard = self.rebuild.lock().unwrap_or_else(|p| p.into_inner());
        self.rebuild_locked(crate::clock::now_ms())
    }

    /// Holds the rebuild lock for callers that change backend state first (ejection).
    pub(crate) fn with_rebuild_lock<R>(&self, f: impl FnOnce() -> R) -> R {
        let _guard = self.rebuild.lock().unwrap_or_else(|p| p.into_inner());
        let r = f();
        self.rebuild_locked(crate::clock::now_ms());
        r
    }

    fn rebuild_locked(&self, now: u64) -> bool {
        let members = self.members.load();
        let policy = self.settings.load();
        let routable: Vec<Arc<Backend>> = members
            .iter()
            .filter(|b| b.stats.is_routable(now))
            .cloned()
            .collect();
        // Panic mode (Envoy's panic threshold): with too few routable members, a partial outage
        // would overload the survivors, so balance over everyone and let retries sort it out.
        let panic = !members.is_empty()
            && policy.panic_threshold > 0
            && (routable.len() as u64) * 100
                < u64::from(policy.panic_threshold) * members.len() as u64;
        let mut chosen = if panic { members.to_vec() } else { routable };
        if let (true, Some(zone)) = (policy.zone_aware, self.local_zone.as_deref()) {
            let local: Vec<Arc<Backend>> =
                chosen.iter().filter(|b| b.zone == zone).cloned().collect();
            let local_members = members.iter().filter(|b| b.zone == zone).count();
            let weight: u64 = local.iter().map(|b| u64::from(b.weight)).sum();
            let inflight: i64 = local.iter().map(|b| b.stats.inflight.get().max(0)).sum();
            // Stay local while most local members are routable and they are not overloaded.
            let healthy_enough = local.len() * 10 >= local_members * 7;
            let overloaded =
                weight > 0 && inflight as u64 > weight * u64::from(policy.zone_spill_inflight);
            if !local.is_empty() && healthy_enough && !overloaded && local.len() < chosen.len() {
                chosen = local;
            }
        }
        // Weights are scaled by 100 only while some backend is degraded or ramping, so that
        // fractions have resolution; otherwise strategies see the configured weights.
        let scaled = chosen.iter().any(|b| {
            b.stats.health_factor.load(Ordering::Relaxed) < 100
                || ramping(b, policy.slow_start, now)
        });
        let weights: Vec<u32> = chosen
            .iter()
            .map(|b| effective_weight(b, policy.slow_start, now, scaled))
            .collect();
        let current = self.table.load();
        let unchanged = current.panic == panic
            && current.weights == weights
            && current.backends.len() == chosen.len()
            && current
                .backends
                .iter()
                .zip(&chosen)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if unchanged {
            return false;
        }
        let table = BackendTable::with_weights(
            current.generation + 1,
            chosen,
            weights,
            self.local_zone.as_deref(),
            panic,
        );
        self.table.store(Arc::new(table));
        true
    }
}

/// Static entries first, then gossip entries at addresses the config does not list.
fn merge_sources(sources: &(Vec<BackendSpec>, Vec<BackendSpec>)) -> Vec<BackendSpec> {
    let mut all = sources.0.clone();
    all.extend(
        sources
            .1
            .iter()
            .filter(|g| !sources.0.iter().any(|s| s.addr == g.addr))
            .cloned(),
    );
    all
}

/// True while `b` is in its slow-start window.
fn ramping(b: &Backend, slow_start: Duration, now: u64) -> bool {
    let admitted = b.stats.admitted_at_ms.load(Ordering::Relaxed);
    !slow_start.is_zero()
        && admitted != 0
        && now.saturating_sub(admitted) < slow_start.as_millis() as u64
}

/// Weight with the health factor and slow start applied; `scaled` multiplies by 100 first.
fn effective_weight(b: &Backend, slow_start: Duration, now: u64, scaled: bool) -> u32 {
    if !scaled {
        return b.weight;
    }
    let mut w = f64::from(b.weight)
        * 100.0
        * f64::from(b.stats.health_factor.load(Ordering::Relaxed).clamp(1, 100))
        / 100.0;
    if ramping(b, slow_start, now) {
        let since = now.saturating_sub(b.stats.admitted_at_ms.load(Ordering::Relaxed)) as f64;
        // Linear ramp from 10 % (a fresh backend still gets some traffic to warm up).
        w *= 0.1 + 0.9 * since / slow_start.as_millis().max(1) as f64;
    }
    (w as u32).max(1)
}

/// Fresh backends (new statistics) for `specs`.
pub fn backends_from_specs(
    specs: &[BackendSpec],
    metrics: &Metrics,
    pool: &str,
) -> Vec<Arc<Backend>> {
    specs
        .iter()
        .map(|s| Arc::new(make_backend(metrics, pool, s, None)))
        .collect()
}

fn make_backend(
    metrics: &Metrics,
    pool: &str,
    s: &BackendSpec,
    stats: Option<Arc<BackendStats>>,
) -> Backend {
    let addr_text = s.addr.to_string();
    let stats = stats.unwrap_or_else(|| Arc::new(BackendStats::new(metrics, pool, &addr_text)));
    Backend {
        addr: s.addr,
        addr_text,
        weight: s.weight,
        zone: s.zone.clone(),
        tags: s.tags.clone(),
        stats,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_encoding_matches_the_abi() {
        let m = Metrics::new();
        let spec = BackendSpec {
            addr: "127.0.0.1:9001".parse().unwrap(),
            weight: 3,
            zone: "eu".into(),
            tags: vec!["canary".into()],
        };
        let b = Arc::new(make_backend(&m, "p", &spec, None));
        let enc = encode_table(&[b], &[3], Some("eu"));
        let mut expect = vec![1, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 14, 0];
        expect.extend_from_slice(b"127.0.0.1:9001");
        expect.extend_from_slice(&[2, 0]);
        expect.extend_from_slice(b"eu");
        expect.extend_from_slice(&[1, 0, 6, 0]);
        expect.extend_from_slice(b"canary");
        assert_eq!(enc, expect);
    }

    #[test]
    fn stats_track_failures_and_latency() {
        let m = Metrics::new();
        let s = BackendStats::new(&m, "p", "a");
        s.record(None, Duration::from_millis(1));
        s.record(Some(502), Duration::from_millis(1));
        assert_eq!(s.failures(), 2);
        s.record(Some(200), Duration::from_micros(800));
        assert_eq!(s.failures(), 0);
        assert_eq!(s.latency_us(), 800);
        s.record(Some(200), Duration::from_micros(1600));
        assert_eq!(s.latency_us(), 900);
        assert_eq!(s.requests_in_class(1), 2);
        assert_eq!(s.requests_in_class(4), 1);
        assert_eq!(s.requests_in_class(5), 1);
    }
}
