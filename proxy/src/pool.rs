//! Pools of backends: the live per-backend statistics shared by all worker threads, and the
//! immutable backend table that is rebuilt (and pushed to the strategy) only when membership changes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
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
        }
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
            let new = if old == 0 { sample.max(1) } else { (old * 7 + sample) / 8 };
            self.latency_ewma_us.store(new.max(1), Ordering::Relaxed);
        } else {
            self.consecutive_failures.fetch_add(1, Ordering::Relaxed);
        }
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
    /// The table in the ABI wire format (sdk/ABI.md, "Backend table format").
    pub encoded: Vec<u8>,
}

impl BackendTable {
    /// Builds and encodes a table.
    pub fn new(generation: u64, backends: Vec<Arc<Backend>>, local_zone: Option<&str>) -> BackendTable {
        let encoded = encode_table(&backends, local_zone);
        BackendTable { generation, backends, encoded }
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
pub fn encode_table(backends: &[Arc<Backend>], local_zone: Option<&str>) -> Vec<u8> {
    fn put_str(out: &mut Vec<u8>, s: &str) {
        let b = &s.as_bytes()[..s.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(b.len() as u16).to_le_bytes());
        out.extend_from_slice(b);
    }
    let mut out = Vec::with_capacity(4 + backends.len() * 48);
    out.extend_from_slice(&(backends.len() as u32).to_le_bytes());
    for b in backends {
        out.extend_from_slice(&b.weight.to_le_bytes());
        let local = local_zone.is_some_and(|z| !z.is_empty() && z == b.zone);
        out.extend_from_slice(&u32::from(local).to_le_bytes());
        put_str(&mut out, &b.addr_text);
        put_str(&mut out, &b.zone);
        out.extend_from_slice(&(b.tags.len().min(u16::MAX as usize) as u16).to_le_bytes());
        for t in b.tags.iter().take(u16::MAX as usize) {
            put_str(&mut out, t);
        }
    }
    out
}

/// Per-pool upstream settings.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    /// Extra attempts after a failed connect.
    pub retries: u32,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Read timeout.
    pub read_timeout: Duration,
    /// Upstream keep-alive idle timeout.
    pub idle_timeout: Duration,
}

/// A pool: its backend table, its strategy and its settings, each swappable while traffic flows.
pub struct Pool {
    /// The pool's name.
    pub name: String,
    /// Current routable backends.
    pub table: ArcSwap<BackendTable>,
    /// The strategy plugin.
    pub strategy: StrategyHost,
    /// Upstream settings.
    pub settings: ArcSwap<PoolSettings>,
    metrics: Metrics,
    local_zone: Option<String>,
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
        let backends = specs.iter().map(|s| Arc::new(make_backend(&metrics, name, s, None))).collect();
        let table = BackendTable::new(1, backends, local_zone.as_deref());
        Pool {
            name: name.to_string(),
            table: ArcSwap::from_pointee(table),
            strategy,
            settings: ArcSwap::from_pointee(settings),
            metrics,
            local_zone,
        }
    }

    /// Replaces the static backends, keeping the statistics of backends whose address stays.
    /// Returns true when the table changed.
    pub fn set_backends(&self, specs: &[BackendSpec]) -> bool {
        let old = self.table.load_full();
        let same = old.backends.len() == specs.len()
            && old.backends.iter().zip(specs).all(|(b, s)| {
                b.addr == s.addr && b.weight == s.weight && b.zone == s.zone && b.tags == s.tags
            });
        if same {
            return false;
        }
        let backends: Vec<_> = specs
            .iter()
            .map(|s| {
                let stats = old.backends.iter().find(|b| b.addr == s.addr).map(|b| b.stats.clone());
                Arc::new(make_backend(&self.metrics, &self.name, s, stats))
            })
            .collect();
        for gone in old.backends.iter().filter(|b| !specs.iter().any(|s| s.addr == b.addr)) {
            self.metrics.forget_backend(&self.name, &gone.addr_text);
        }
        self.table.store(Arc::new(BackendTable::new(old.generation + 1, backends, self.local_zone.as_deref())));
        true
    }
}

/// Fresh backends (new statistics) for `specs`.
pub fn backends_from_specs(specs: &[BackendSpec], metrics: &Metrics, pool: &str) -> Vec<Arc<Backend>> {
    specs.iter().map(|s| Arc::new(make_backend(metrics, pool, s, None))).collect()
}

fn make_backend(metrics: &Metrics, pool: &str, s: &BackendSpec, stats: Option<Arc<BackendStats>>) -> Backend {
    let addr_text = s.addr.to_string();
    let stats = stats.unwrap_or_else(|| Arc::new(BackendStats::new(metrics, pool, &addr_text)));
    Backend { addr: s.addr, addr_text, weight: s.weight, zone: s.zone.clone(), tags: s.tags.clone(), stats }
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
        let enc = encode_table(&[b], Some("eu"));
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
