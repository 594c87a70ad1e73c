//! The health-check plugin host: asks a pool's health plugin what probe to run against a backend
//! and what the result means. The host does the I/O ([`crate::health_probe`]) and the scheduling
//! ([`crate::health_scheduler`]); a plugin only decides.
//!
//! Unlike strategies, health plugins are not on the request path: one instance per pool serves
//! the scheduler. A fault never marks a backend down; the caller keeps the last known state.

use std::sync::atomic::AtomicI64;
use std::sync::Arc;

use std::time::Duration;

use prometheus::IntCounter;
use wasmtime::TypedFunc;

use crate::backend::Backend;
use crate::cold_lock::ColdLock;
use crate::config::BackendSpec;
use crate::metrics::{Metrics, SeriesScope};
use crate::plugin::{
    Fault, FaultCounters, Guest, PluginEngine, PluginError, PluginKind, PluginVersion, Prepared,
    VersionSlot, COUNTER_SLOTS,
};

/// Deadline of one `sluice_health_probe` / `sluice_health_evaluate` call, in epoch ticks (≈ 50 ms).
const HEALTH_CALL_TICKS: u64 = 10;
/// Largest body prefix handed to a plugin.
pub const BODY_PREFIX: usize = 4096;

// The probe, result and verdict types and their wire encoding are the SDK's: one codec is read
// by both sides of the ABI, so host and plugins cannot disagree on a byte.
pub use sluice_sdk::{Outcome, Probe, ProbeResult, Verdict};

/// Short description of a probe result, for the API and logs.
pub fn describe(r: &ProbeResult) -> String {
    let ms = r.latency().as_millis();
    match (r.outcome(), r.status()) {
        (Outcome::Completed, Some(status)) => format!("HTTP {status} in {ms} ms"),
        (Outcome::Completed, None) => format!("completed in {ms} ms"),
        (Outcome::ConnectFailed, _) => "connect failed".into(),
        (Outcome::TimedOut, _) => format!("timed out after {ms} ms"),
        _ => "I/O error".into(),
    }
}

struct Instance {
    guest: Guest,
    probe: TypedFunc<(i32, i32), i64>,
    evaluate: TypedFunc<(i32, i32), i32>,
}

impl Instance {
    fn new(
        engine: &PluginEngine,
        version: &PluginVersion,
        log_dropped: Option<IntCounter>,
    ) -> Result<Instance, PluginError> {
        let mut guest = Guest::new(
            engine,
            version,
            Arc::new([const { AtomicI64::new(0) }; COUNTER_SLOTS]),
            log_dropped,
        )?;
        let probe = guest.func("sluice_health_probe")?;
        let evaluate = guest.func("sluice_health_evaluate")?;
        Ok(Instance {
            guest,
            probe,
            evaluate,
        })
    }

    fn probe(&mut self, backend: &Backend) -> Result<Probe, Fault> {
        // The deadline first: writing calls the guest's allocator, which must not run under the
        // stale deadline of the previous call.
        self.guest.store.set_epoch_deadline(HEALTH_CALL_TICKS);
        let (ptr, len) = self
            .guest
            .write(&backend.encode_entry())
            .map_err(Fault::from_call)?;
        let packed = self
            .probe
            .call(&mut self.guest.store, (ptr, len))
            .map_err(Fault::from_call)?;
        let (p, n) = (
            (packed as u64 >> 32) as usize,
            (packed as u64 & 0xffff_ffff) as usize,
        );
        let data = self.guest.memory();
        let bytes = p
            .checked_add(n)
            .and_then(|end| data.get(p..end))
            .ok_or_else(|| {
                Fault::BadAnswer(format!(
                    "probe pointer {p}+{n} is outside the plugin's memory"
                ))
            })?;
        Probe::decode(bytes).map_err(|e| Fault::BadAnswer(e.to_string()))
    }

    fn evaluate(&mut self, result: &ProbeResult) -> Result<Verdict, Fault> {
        self.guest.store.set_epoch_deadline(HEALTH_CALL_TICKS);
        let encoded = result
            .encode()
            .map_err(|e| Fault::BadAnswer(e.to_string()))?;
        let (ptr, len) = self.guest.write(&encoded).map_err(Fault::from_call)?;
        let rc = self
            .evaluate
            .call(&mut self.guest.store, (ptr, len))
            .map_err(Fault::from_call)?;
        Verdict::from_abi(rc).ok_or_else(|| {
            Fault::BadAnswer(format!(
                "sluice_health_evaluate returned {rc}; expected -1, 1..=99 or 100"
            ))
        })
    }
}

/// The scheduler's instance of one version, owned by that version. A plain mutex: health
/// checks are off the request path and each call is bounded by a deadline.
type InstanceCell = ColdLock<Option<Instance>>;

/// Runs one pool's health plugin.
pub struct HealthHost {
    engine: PluginEngine,
    versions: VersionSlot<InstanceCell>,
    faults: FaultCounters,
    log_dropped: IntCounter,
    _series: SeriesScope,
}

impl HealthHost {
    /// Validates a first version (compile, instantiate, init, a trial probe against `sample` and
    /// a trial evaluation), without a host yet.
    pub fn prepare_first(
        engine: &PluginEngine,
        bytes: &[u8],
        name: &str,
        config_json: Arc<[u8]>,
        sample: Option<&Backend>,
    ) -> Result<Prepared, PluginError> {
        validate(engine, bytes, name, 1, config_json, sample).map(Prepared::from)
    }

    /// A host serving `first` (from [`HealthHost::prepare_first`]).
    pub fn new(
        engine: &PluginEngine,
        pool: &str,
        first: Prepared,
        metrics: &Metrics,
    ) -> HealthHost {
        let series = metrics.scope(&[pool]);
        HealthHost {
            engine: engine.clone(),
            versions: VersionSlot::new(pool, PluginKind::Health, first, &series, metrics),
            faults: FaultCounters::new(&series, metrics, PluginKind::Health),
            log_dropped: series.counter(&metrics.plugin_log_dropped, &["health"]),
            _series: series,
        }
    }

    /// The version in use.
    pub fn current(&self) -> Arc<PluginVersion> {
        self.versions.version()
    }

    /// The last loads, swaps and rejected swaps, oldest first.
    pub fn swap_history(&self) -> Vec<crate::plugin::SwapRecord> {
        self.versions.swap_history()
    }

    /// Faults counted so far, by reason.
    pub fn fault_totals(&self) -> [(&'static str, u64); 5] {
        self.faults.totals()
    }

    /// Validates a candidate without installing it. `config_json: None` keeps the current config.
    pub fn prepare(
        &self,
        bytes: &[u8],
        name: &str,
        config_json: Option<Arc<[u8]>>,
        sample: Option<&Backend>,
    ) -> Result<Prepared, PluginError> {
        self.versions.prepare(config_json, |generation, config| {
            validate(&self.engine, bytes, name, generation, config, sample)
        })
    }

    /// Installs a version from [`HealthHost::prepare`]. Cannot fail.
    pub fn publish(&self, prepared: Prepared) -> Arc<PluginVersion> {
        self.versions.publish(prepared)
    }

    /// Validates and installs a new version; on error the old one stays (and the rejection is
    /// counted).
    pub fn swap(
        &self,
        bytes: &[u8],
        name: &str,
        config_json: Option<Arc<[u8]>>,
        sample: Option<&Backend>,
    ) -> Result<Arc<PluginVersion>, PluginError> {
        self.versions.swap(config_json, |generation, config| {
            validate(&self.engine, bytes, name, generation, config, sample)
        })
    }

    fn with_instance<R>(
        &self,
        f: impl FnOnce(&mut Instance) -> Result<R, Fault>,
    ) -> Result<R, Fault> {
        let live = self.versions.load();
        let mut guard = live.state.lock();
        let result = (|| {
            if guard.is_none() {
                let inst =
                    Instance::new(&self.engine, &live.version, Some(self.log_dropped.clone()))
                        .map_err(|e| Fault::Instantiate(e.to_string()))?;
                *guard = Some(inst);
            }
            f(guard.as_mut().ok_or(Fault::Backoff)?)
        })();
        if let Err(fault) = &result {
            // Rebuilt on the next call: a trap may have left the instance's state inconsistent.
            *guard = None;
            self.faults.count(fault);
        }
        result
    }

    /// The probe to run against `backend`.
    pub fn probe(&self, backend: &Backend) -> Result<Probe, Fault> {
        self.with_instance(|i| i.probe(backend))
    }

    /// The plugin's verdict on `result`, the outcome of the probe it asked for.
    pub fn evaluate(&self, result: &ProbeResult) -> Result<Verdict, Fault> {
        self.with_instance(|i| i.evaluate(result))
    }
}

fn validate(
    engine: &PluginEngine,
    bytes: &[u8],
    name: &str,
    generation: u64,
    config_json: Arc<[u8]>,
    sample: Option<&Backend>,
) -> Result<PluginVersion, PluginError> {
    let version = engine.compile(bytes, PluginKind::Health, name, generation, config_json)?;
    let mut inst = Instance::new(engine, &version, None)?;
    let fallback;
    let backend = match sample {
        Some(b) => b,
        None => {
            // A throwaway registry: the sample's series must not appear in the live one.
            fallback = Backend::new(
                &Metrics::new(),
                "validation",
                &BackendSpec::loopback(1),
                None,
                true,
            );
            &fallback
        }
    };
    inst.probe(backend)
        .map_err(|e| PluginError::TrialPick(format!("trial probe: {e}")))?;
    inst.evaluate(&ProbeResult::connect_failed().with_latency(Duration::from_millis(1)))
        .map_err(|e| PluginError::TrialPick(format!("trial evaluation: {e}")))?;
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_decode_and_bad_ones_are_named() {
        let decode = |b: &[u8]| Probe::decode(b).map_err(|e| e.to_string());
        assert_eq!(decode(&[0]), Ok(Probe::TcpConnect));
        let mut http = vec![1, 3, 0];
        http.extend_from_slice(b"GET");
        http.extend_from_slice(&[8, 0]);
        http.extend_from_slice(b"/healthz");
        http.extend_from_slice(&[1, 0, 4, 0]);
        http.extend_from_slice(b"host");
        http.extend_from_slice(&[1, 0, b'x', 0, 0, 0, 0]);
        assert_eq!(
            decode(&http),
            Ok(Probe::Http {
                method: "GET".into(),
                path: "/healthz".into(),
                headers: vec![("host".into(), "x".into())],
                body: vec![]
            })
        );
        assert!(decode(&http[..http.len() - 1])
            .unwrap_err()
            .contains("truncated"));
        assert!(decode(&[9]).unwrap_err().contains("unknown probe kind"));
        let mut bad_path = vec![1, 3, 0];
        bad_path.extend_from_slice(b"GET");
        bad_path.extend_from_slice(&[3, 0]);
        bad_path.extend_from_slice(b"a b");
        bad_path.extend_from_slice(&[0, 0, 0, 0, 0, 0]); // no headers, empty body
        assert!(decode(&bad_path)
            .unwrap_err()
            .contains("must start with '/'"));
        assert_eq!(
            decode(&[2, 2, 0, 0, 0, b'h', b'i', 4, 0, 0, 0]),
            Ok(Probe::Tcp {
                send: b"hi".to_vec(),
                read: 4
            })
        );
    }

    #[test]
    fn results_encode_as_documented() {
        let r = ProbeResult::http(200)
            .with_header("a", "b")
            .with_body(b"ok".to_vec())
            .with_latency(Duration::from_micros(258));
        assert_eq!(
            r.encode().unwrap(),
            vec![0, 2, 1, 0, 0, 200, 0, 1, 0, 1, 0, b'a', 1, 0, b'b', 2, 0, 0, 0, b'o', b'k']
        );
    }
}
