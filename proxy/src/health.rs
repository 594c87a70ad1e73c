//! The health-check plugin host: asks a pool's health plugin what probe to run against a backend
//! and what the result means. The host does the I/O ([`crate::health_probe`]) and the scheduling
//! ([`crate::health_scheduler`]); a plugin only decides.
//!
//! Unlike strategies, health plugins are not on the request path: one instance per pool serves
//! the scheduler. A fault never marks a backend down; the caller keeps the last known state.

use std::sync::atomic::AtomicI64;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use wasmtime::TypedFunc;

use crate::metrics::Metrics;
use crate::plugin::VersionSlot;
use crate::plugin::{
    root_cause, Guest, PluginEngine, PluginError, PluginKind, PluginVersion, COUNTER_SLOTS,
};
use crate::pool::Backend;

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

/// One backend as a single table entry (the table format without the count).
fn encode_backend(b: &Backend) -> Vec<u8> {
    let mut out = Vec::with_capacity(48);
    crate::pool::encode_entry(&mut out, b, b.weight, None);
    out
}

struct Instance {
    generation: u64,
    guest: Guest,
    probe: TypedFunc<(i32, i32), i64>,
    evaluate: TypedFunc<(i32, i32), i32>,
}

impl Instance {
    fn new(engine: &PluginEngine, version: &PluginVersion) -> Result<Instance, PluginError> {
        let mut guest = Guest::new(
            engine,
            version,
            Arc::new([const { AtomicI64::new(0) }; COUNTER_SLOTS]),
        )?;
        let probe = guest.func("sluice_health_probe")?;
        let evaluate = guest.func("sluice_health_evaluate")?;
        Ok(Instance {
            generation: version.generation,
            guest,
            probe,
            evaluate,
        })
    }

    fn probe(&mut self, backend: &Backend) -> Result<Probe, String> {
        // The deadline first: writing calls the guest's allocator, which must not run under the
        // stale deadline of the previous call.
        self.guest.store.set_epoch_deadline(HEALTH_CALL_TICKS);
        let (ptr, len) = self
            .guest
            .write(&encode_backend(backend))
            .map_err(|e| root_cause(&e))?;
        let packed = self
            .probe
            .call(&mut self.guest.store, (ptr, len))
            .map_err(|e| root_cause(&e))?;
        let (p, n) = (
            (packed as u64 >> 32) as usize,
            (packed as u64 & 0xffff_ffff) as usize,
        );
        let data = self.guest.memory();
        let bytes = p
            .checked_add(n)
            .and_then(|end| data.get(p..end))
            .ok_or_else(|| format!("probe pointer {p}+{n} is outside the plugin's memory"))?;
        Probe::decode(bytes).map_err(|e| e.to_string())
    }

    fn evaluate(&mut self, result: &ProbeResult) -> Result<Verdict, String> {
        self.guest.store.set_epoch_deadline(HEALTH_CALL_TICKS);
        let encoded = result.encode().map_err(|e| e.to_string())?;
        let (ptr, len) = self.guest.write(&encoded).map_err(|e| root_cause(&e))?;
        let rc = self
            .evaluate
            .call(&mut self.guest.store, (ptr, len))
            .map_err(|e| root_cause(&e))?;
        Verdict::from_abi(rc).ok_or_else(|| {
            format!("sluice_health_evaluate returned {rc}; expected -1, 1..=99 or 100")
        })
    }
}

/// Runs one pool's health plugin.
pub struct HealthHost {
    pool: String,
    engine: PluginEngine,
    versions: VersionSlot,
    /// The scheduler's instance. A plain mutex: health checks are off the request path and each
    /// call is bounded by a deadline.
    instance: Mutex<Option<Instance>>,
    metrics: Metrics,
}

impl HealthHost {
    /// Loads and validates the first version of a pool's health plugin.
    pub fn new(
        engine: &PluginEngine,
        pool: &str,
        bytes: &[u8],
        name: &str,
        config_json: Arc<[u8]>,
        sample: Option<&Backend>,
        metrics: &Metrics,
    ) -> Result<HealthHost, PluginError> {
        let version = validate(engine, bytes, name, 1, config_json, sample)?;
        Ok(HealthHost {
            pool: pool.to_string(),
            engine: engine.clone(),
            versions: VersionSlot::new(pool, PluginKind::Health, version, metrics),
            instance: Mutex::new(None),
            metrics: metrics.clone(),
        })
    }

    /// The version in use.
    pub fn current(&self) -> Arc<PluginVersion> {
        self.versions.current.load_full()
    }

    /// Validates and installs a new version; on error the old one stays.
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

    /// Validates without installing.
    pub fn check(
        engine: &PluginEngine,
        bytes: &[u8],
        name: &str,
        config_json: Arc<[u8]>,
        sample: Option<&Backend>,
    ) -> Result<(), PluginError> {
        validate(engine, bytes, name, 0, config_json, sample).map(drop)
    }

    fn with_instance<R>(
        &self,
        f: impl FnOnce(&mut Instance) -> Result<R, String>,
    ) -> Result<R, String> {
        let version = self.versions.current.load();
        let mut guard = self.instance.lock().unwrap_or_else(|p| p.into_inner());
        if guard
            .as_ref()
            .is_none_or(|i| i.generation != version.generation)
        {
            *guard = Some(Instance::new(&self.engine, &version).map_err(|e| e.to_string())?);
        }
        let inst = guard.as_mut().expect("set above");
        let result = f(inst);
        if result.is_err() {
            // Rebuilt on the next call: a trap may have left the instance's state inconsistent.
            *guard = None;
            self.metrics
                .plugin_faults
                .with_label_values(&[&self.pool, "health", "trap"])
                .inc();
        }
        result
    }

    /// The probe to run against `backend`.
    pub fn probe(&self, backend: &Backend) -> Result<Probe, String> {
        self.with_instance(|i| i.probe(backend))
    }

    /// The plugin's verdict on `result`, the outcome of the probe it asked for.
    pub fn evaluate(&self, result: &ProbeResult) -> Result<Verdict, String> {
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
    let mut inst = Instance::new(engine, &version)?;
    let fallback;
    let backend = match sample {
        Some(b) => b,
        None => {
            fallback = crate::pool::backends_from_specs(
                &[crate::config::BackendSpec::loopback(1)],
                &Metrics::new(),
                "validation",
            );
            &fallback[0]
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
