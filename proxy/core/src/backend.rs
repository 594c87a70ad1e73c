//! Backends: their live statistics shared by every worker thread, and the immutable table a
//! strategy picks from, rebuilt only when membership, health or weights change.
//!
//! The atomics that decide routing (health, cluster hold, ejection, ramp start) are private:
//! they change only through the owning [`crate::pool::Pool`]'s methods, which rebuild the table
//! under its lock. The request path only reads them, and holds in-flight slots through
//! [`crate::lease::Lease`].

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

use std::time::Duration;

use prometheus::{IntCounter, IntGauge};

use crate::cold_lock::ColdLock;
use crate::config::BackendSpec;
use crate::metrics::{Metrics, SeriesScope, Timings, STATUS_CLASSES};

/// Live load data of one backend, read by strategies through host calls in O(1).
///
/// Shared by every worker thread; survives config reloads while the backend's address stays.
/// Its metric series live exactly as long as it does.
#[derive(Debug)]
pub struct BackendStats {
    /// Requests in flight (also the `sluice_backend_inflight` series): the truth strategies read.
    /// Changed only by leases and in-flight slots.
    inflight: IntGauge,
    /// Latency EWMA in microseconds (0 = no sample yet).
    latency_ewma_us: AtomicU64,
    /// Consecutive failures (connect errors and 5xx), reset by a success.
    consecutive_failures: AtomicU32,
    /// Requests by status class: 1xx..5xx, then "error" (no response).
    by_class: [IntCounter; 6],
    healthy_gauge: IntGauge,
    /// Passive outlier detection: ejected until this time ([`crate::clock::now_ms`]), 0 = not.
    ejected_until_ms: AtomicU64,
    /// How often this backend was ejected (grows the ejection time; decays after a clean period).
    ejections: AtomicU32,
    /// Set by the one request that won the right to decide an ejection (compare-and-swap).
    ejecting: AtomicBool,
    /// When the backend (re)joined the routable set; slow start ramps from here.
    admitted_at_ms: AtomicU64,
    /// Active health state.
    healthy: AtomicBool,
    /// The cluster member announcing this backend is suspect or draining: no new requests.
    cluster_hold: AtomicBool,
    /// Weight percentage from a "degraded" health verdict (100 = full weight).
    health_factor: AtomicU32,
    /// Health-check bookkeeping, touched only by the health scheduler and the admin API.
    pub health: ColdLock<HealthRecord>,
    /// This backend's own request-path histograms (`[admin] metrics_per_backend`).
    pub timings: Option<Timings>,
    /// Attempts by latency, for the dashboard's percentiles.
    latency: crate::latency::LatencyHistogram,
    _series: SeriesScope,
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

impl BackendStats {
    /// Fresh statistics with their series in `metrics`, labelled `pool` and `addr`.
    pub fn new(metrics: &Metrics, pool: &str, addr: &str, healthy: bool) -> BackendStats {
        let series = metrics.scope(&[pool, addr]);
        let healthy_gauge = series.gauge(&metrics.backend_healthy, &[]);
        healthy_gauge.set(i64::from(healthy));
        BackendStats {
            inflight: series.gauge(&metrics.backend_inflight, &[]),
            latency_ewma_us: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            by_class: STATUS_CLASSES.map(|c| series.counter(&metrics.requests, &[c])),
            healthy_gauge,
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            ejecting: AtomicBool::new(false),
            admitted_at_ms: AtomicU64::new(0),
            healthy: AtomicBool::new(healthy),
            cluster_hold: AtomicBool::new(false),
            health_factor: AtomicU32::new(100),
            health: ColdLock::new(HealthRecord::default()),
            timings: metrics
                .per_backend()
                .then(|| series.timings(&metrics.backend_timings)),
            latency: Default::default(),
            _series: series,
        }
    }

    /// Requests in flight now.
    pub fn inflight(&self) -> i64 {
        self.inflight.get()
    }

    /// Takes an in-flight slot; only [`crate::lease::Lease`] calls this and its `Drop` the inverse.
    pub(crate) fn acquire(&self) {
        self.inflight.inc();
    }

    /// Gives an in-flight slot back (see [`BackendStats::acquire`]).
    pub(crate) fn release(&self) {
        self.inflight.dec();
    }

    /// True while ejected by outlier detection.
    pub fn is_ejected(&self, now_ms: u64) -> bool {
        self.ejected_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Until when the backend is ejected (0 = not ejected).
    pub fn ejected_until_ms(&self) -> u64 {
        self.ejected_until_ms.load(Ordering::Relaxed)
    }

    /// How often the backend was ejected recently.
    pub fn ejections(&self) -> u32 {
        self.ejections.load(Ordering::Relaxed)
    }

    /// Active health state.
    pub fn is_healthy(&self) -> bool {
        self.healthy.load(Ordering::Relaxed)
    }

    /// True while the cluster holds the backend (member suspect or draining).
    pub fn is_held(&self) -> bool {
        self.cluster_hold.load(Ordering::Relaxed)
    }

    /// Weight percentage from the last health verdict.
    pub fn health_factor(&self) -> u32 {
        self.health_factor.load(Ordering::Relaxed)
    }

    /// When the backend was last admitted (slow start ramps from here; 0 = at start).
    pub fn admitted_at_ms(&self) -> u64 {
        self.admitted_at_ms.load(Ordering::Relaxed)
    }

    /// True when the backend may take traffic (healthy, not ejected, not held by the cluster).
    pub fn is_routable(&self, now_ms: u64) -> bool {
        self.is_healthy() && !self.is_held() && !self.is_ejected(now_ms)
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
    pub(crate) fn record(&self, status: Option<u16>, latency: Duration) {
        let class = match status {
            Some(s @ 100..=599) => (s / 100 - 1) as usize,
            _ => 5,
        };
        self.by_class[class].inc();
        self.latency.record(latency);
        if status.is_some_and(|s| s < 500) {
            // Read first: a store on every request would bounce the line between cores even
            // while it stays 0.
            if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
                self.consecutive_failures.store(0, Ordering::Relaxed);
            }
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

    /// Requests finished with this status class index (see [`STATUS_CLASSES`]).
    pub fn requests_in_class(&self, class: usize) -> u64 {
        self.by_class[class].get()
    }

    /// Attempts with a known outcome so far, by latency bucket.
    pub fn latency_counts(&self) -> [u64; crate::latency::BUCKETS] {
        self.latency.counts()
    }

    // Writers below are for the owning pool only (pool.rs), under its rebuild lock.

    pub(crate) fn set_healthy(&self, healthy: bool, now: u64) -> bool {
        let was = self.healthy.swap(healthy, Ordering::Relaxed);
        self.healthy_gauge.set(i64::from(healthy));
        if healthy && !was {
            self.admitted_at_ms.store(now, Ordering::Relaxed);
        }
        was != healthy
    }

    pub(crate) fn set_health_factor(&self, factor: u32) -> bool {
        self.health_factor.swap(factor, Ordering::Relaxed) != factor
    }

    pub(crate) fn set_hold(&self, hold: bool) -> bool {
        self.cluster_hold.swap(hold, Ordering::Relaxed) != hold
    }

    pub(crate) fn set_admitted(&self, now: u64) {
        self.admitted_at_ms.store(now, Ordering::Relaxed);
    }

    /// Wins the right to decide this backend's ejection; false when another thread has it.
    pub(crate) fn try_begin_ejection(&self) -> bool {
        self.ejecting
            .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
            .is_ok()
    }

    pub(crate) fn end_ejection(&self) {
        self.ejecting.store(false, Ordering::Release);
    }

    /// Ejects until `until`; returns the ejection count including this one.
    pub(crate) fn eject(&self, until: u64) -> u32 {
        self.ejected_until_ms.store(until, Ordering::Relaxed);
        self.ejections.fetch_add(1, Ordering::Relaxed) + 1
    }

    /// Ends an ejection: failures that led to it are forgiven and the ramp restarts.
    pub(crate) fn readmit(&self, now: u64) {
        self.ejected_until_ms.store(0, Ordering::Relaxed);
        self.consecutive_failures.store(0, Ordering::Relaxed);
        self.admitted_at_ms.store(now, Ordering::Relaxed);
    }

    pub(crate) fn forget_ejections(&self) {
        self.ejections.store(0, Ordering::Relaxed);
    }
}

/// One request in flight on a backend, outside the request path (simulations, tests, benches):
/// released when dropped, like a [`crate::lease::Lease`] but recording nothing.
#[derive(Debug)]
#[must_use = "dropping the slot releases it at once"]
pub struct InflightSlot(Arc<BackendStats>);

impl InflightSlot {
    /// Takes a slot on `stats`.
    pub fn new(stats: &Arc<BackendStats>) -> InflightSlot {
        stats.acquire();
        InflightSlot(stats.clone())
    }
}

impl Drop for InflightSlot {
    fn drop(&mut self) {
        self.0.release();
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
    /// Idle connections to it, kept across table rebuilds like `stats`.
    pub conns: Arc<crate::upstream::IdleConns>,
}

impl Backend {
    /// A backend for `spec`, with the statistics and idle connections of `previous` (the same
    /// address in the table before) carried over, or fresh ones.
    pub fn new(
        metrics: &Metrics,
        pool: &str,
        spec: &BackendSpec,
        previous: Option<&Backend>,
        healthy: bool,
    ) -> Backend {
        let addr_text = spec.addr.to_string();
        let stats = previous
            .map(|b| b.stats.clone())
            .unwrap_or_else(|| Arc::new(BackendStats::new(metrics, pool, &addr_text, healthy)));
        let conns = previous.map(|b| b.conns.clone()).unwrap_or_default();
        Backend {
            addr: spec.addr,
            addr_text,
            weight: spec.weight,
            zone: spec.zone.clone(),
            tags: spec.tags.clone(),
            stats,
            conns,
        }
    }

    /// This backend as the SDK describes it (the ABI table entry).
    pub fn to_abi(&self, weight: u32, local_zone: Option<&str>) -> sluice_sdk::Backend {
        // Config and cluster validation bound these lengths; clamping keeps encoding infallible.
        const MAX: usize = u16::MAX as usize;
        let clamp = |s: &str| {
            let mut end = s.len().min(MAX);
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            s[..end].to_string()
        };
        let local = local_zone.is_some_and(|z| !z.is_empty() && z == self.zone);
        let mut b = sluice_sdk::Backend::new(clamp(&self.addr_text))
            .with_weight(weight.max(1))
            .with_zone(clamp(&self.zone))
            .with_local_zone(local);
        for t in self.tags.iter().take(MAX) {
            b = b.with_tag(clamp(t));
        }
        b
    }

    /// The ABI table entry without a count (what a health plugin receives).
    pub fn encode_entry(&self) -> Vec<u8> {
        self.to_abi(self.weight, None)
            .encode()
            .expect("lengths are clamped to the ABI's limits")
    }
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

    /// Builds and encodes a table with explicit weights.
    pub fn with_weights(
        generation: u64,
        backends: Vec<Arc<Backend>>,
        weights: Vec<u32>,
        local_zone: Option<&str>,
        panic: bool,
    ) -> BackendTable {
        let encoded = backends
            .iter()
            .zip(&weights)
            .map(|(b, w)| b.to_abi(*w, local_zone))
            .collect::<sluice_sdk::Backends>()
            .encode()
            .expect("lengths are clamped to the ABI's limits");
        BackendTable {
            generation,
            backends,
            weights,
            encoded,
            panic,
        }
    }

    /// A table of fresh backends for `specs` (simulations, benches, validation).
    pub fn from_specs(
        specs: &[BackendSpec],
        metrics: &Metrics,
        pool: &str,
        local_zone: Option<&str>,
    ) -> BackendTable {
        let backends = specs
            .iter()
            .map(|s| Arc::new(Backend::new(metrics, pool, s, None, true)))
            .collect();
        BackendTable::new(1, backends, local_zone)
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
        let t = BackendTable::from_specs(&[spec], &m, "p", Some("eu"));
        let mut expect = vec![1, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0, 14, 0];
        expect.extend_from_slice(b"127.0.0.1:9001");
        expect.extend_from_slice(&[2, 0]);
        expect.extend_from_slice(b"eu");
        expect.extend_from_slice(&[1, 0, 6, 0]);
        expect.extend_from_slice(b"canary");
        assert_eq!(t.encoded, expect);
        // A health plugin's entry: the same without the count, and no local-zone flag.
        let mut entry = expect[4..].to_vec();
        entry[4] = 0;
        assert_eq!(t.backends[0].encode_entry(), entry);
    }

    #[test]
    fn stats_track_failures_and_latency() {
        let m = Metrics::new();
        let s = BackendStats::new(&m, "p", "a", true);
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

    #[test]
    fn series_go_with_the_last_stats() {
        let m = Metrics::new();
        let s = BackendStats::new(&m, "p", "127.0.0.1:1", true);
        s.record(Some(200), Duration::from_millis(1));
        assert!(String::from_utf8(m.render())
            .unwrap()
            .contains("127.0.0.1:1"));
        drop(s);
        assert!(!String::from_utf8(m.render())
            .unwrap()
            .contains("127.0.0.1:1"));
    }
}
