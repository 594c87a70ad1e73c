//! The health-check plugin host: asks a pool's health plugin what probe to run against a backend
//! and what the result means. The host does the I/O ([`crate::health_probe`]) and the scheduling
//! ([`crate::health_scheduler`]); a plugin only decides.
//!
//! Unlike strategies, health plugins are not on the request path: one instance per pool serves
//! the scheduler. A fault never marks a backend down; the caller keeps the last known state.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use wasmtime::TypedFunc;

use crate::metrics::Metrics;
use crate::plugin::{
    root_cause, Guest, PluginEngine, PluginError, PluginKind, PluginVersion, COUNTER_SLOTS,
};
use crate::pool::Backend;

/// Deadline of one `sluice_health_probe` / `sluice_health_evaluate` call, in epoch ticks (≈ 50 ms).
const HEALTH_CALL_TICKS: u64 = 10;
/// Largest body prefix handed to a plugin.
pub const BODY_PREFIX: usize = 4096;

/// What to send to a backend (ABI "Probe encoding").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeSpec {
    /// Connect and close.
    TcpConnect,
    /// One HTTP/1.1 request.
    Http {
        /// Method.
        method: String,
        /// Path and query.
        path: String,
        /// Extra headers.
        headers: Vec<(String, String)>,
        /// Body.
        body: Vec<u8>,
    },
    /// Raw TCP exchange.
    Tcp {
        /// Bytes to send.
        send: Vec<u8>,
        /// Bytes to read back.
        read: u32,
    },
}

/// How a probe ended (ABI "Result encoding").
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The exchange completed.
    Completed = 0,
    /// The connection was refused or unreachable.
    ConnectFailed = 1,
    /// The timeout elapsed.
    TimedOut = 2,
    /// Another I/O or protocol error.
    IoError = 3,
}

/// What a probe observed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// How it ended.
    pub outcome: Outcome,
    /// Duration of the exchange.
    pub latency: Duration,
    /// HTTP status (0 for TCP probes and failures).
    pub status: u16,
    /// Response headers, names lower-case.
    pub headers: Vec<(String, String)>,
    /// Body prefix or bytes read.
    pub body: Vec<u8>,
}

impl ProbeResult {
    /// A result with no response.
    pub fn failed(outcome: Outcome, latency: Duration) -> ProbeResult {
        ProbeResult {
            outcome,
            latency,
            status: 0,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// ABI encoding.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(16 + self.body.len());
        out.push(self.outcome as u8);
        out.extend_from_slice(
            &(self.latency.as_micros().min(u32::MAX as u128) as u32).to_le_bytes(),
        );
        out.extend_from_slice(&self.status.to_le_bytes());
        let headers = &self.headers[..self.headers.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(headers.len() as u16).to_le_bytes());
        for (n, v) in headers {
            put16(&mut out, n.as_bytes());
            put16(&mut out, v.as_bytes());
        }
        out.extend_from_slice(&(self.body.len() as u32).to_le_bytes());
        out.extend_from_slice(&self.body);
        out
    }

    /// Short description for the API and logs.
    pub fn describe(&self) -> String {
        match self.outcome {
            Outcome::Completed if self.status > 0 => {
                format!("HTTP {} in {} ms", self.status, self.latency.as_millis())
            }
            Outcome::Completed => format!("completed in {} ms", self.latency.as_millis()),
            Outcome::ConnectFailed => "connect failed".into(),
            Outcome::TimedOut => format!("timed out after {} ms", self.latency.as_millis()),
            Outcome::IoError => "I/O error".into(),
        }
    }
}

fn put16(out: &mut Vec<u8>, b: &[u8]) {
    let b = &b[..b.len().min(u16::MAX as usize)];
    out.extend_from_slice(&(b.len() as u16).to_le_bytes());
    out.extend_from_slice(b);
}

/// A plugin's judgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Route traffic at full weight.
    Healthy,
    /// Route traffic at this percentage of the weight (1..=99).
    Degraded(u8),
    /// Do not route traffic.
    Unhealthy,
}

/// Decodes a probe returned by a plugin.
pub fn decode_probe(b: &[u8]) -> Result<ProbeSpec, String> {
    struct R<'a>(&'a [u8]);
    impl<'a> R<'a> {
        fn take(&mut self, n: usize) -> Result<&'a [u8], String> {
            if self.0.len() < n {
                return Err("probe encoding is truncated".into());
            }
            let (a, rest) = self.0.split_at(n);
            self.0 = rest;
            Ok(a)
        }
        fn u16(&mut self) -> Result<usize, String> {
            Ok(u16::from_le_bytes(self.take(2)?.try_into().expect("2 bytes")) as usize)
        }
        fn u32(&mut self) -> Result<usize, String> {
            Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4 bytes")) as usize)
        }
        fn str16(&mut self) -> Result<String, String> {
            let n = self.u16()?;
            String::from_utf8(self.take(n)?.to_vec())
                .map_err(|_| "probe text is not UTF-8".to_string())
        }
    }
    let mut r = R(b);
    let kind = r.take(1)?[0];
    let spec = match kind {
        0 => ProbeSpec::TcpConnect,
        1 => {
            let method = r.str16()?;
            let path = r.str16()?;
            if method.is_empty() || !method.bytes().all(|c| c.is_ascii_uppercase()) {
                return Err(format!("probe method \"{method}\" is not an HTTP method"));
            }
            if !path.starts_with('/')
                || path
                    .bytes()
                    .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
            {
                return Err(format!(
                    "probe path \"{path}\" must start with '/' and contain no spaces"
                ));
            }
            let n = r.u16()?;
            let mut headers = Vec::with_capacity(n);
            for _ in 0..n {
                let (name, value) = (r.str16()?, r.str16()?);
                if name.is_empty()
                    || name.bytes().any(|c| !c.is_ascii_graphic() || c == b':')
                    || value.bytes().any(|c| c == b'\r' || c == b'\n')
                {
                    return Err(format!("probe header \"{name}\" is malformed"));
                }
                headers.push((name, value));
            }
            let len = r.u32()?;
            let body = r.take(len)?.to_vec();
            ProbeSpec::Http {
                method,
                path,
                headers,
                body,
            }
        }
        2 => {
            let len = r.u32()?;
            let send = r.take(len)?.to_vec();
            let read = r.u32()? as u32;
            ProbeSpec::Tcp {
                send,
                read: read.min(64 * 1024),
            }
        }
        k => return Err(format!("unknown probe kind {k}")),
    };
    if !r.0.is_empty() {
        return Err("probe encoding has trailing bytes".into());
    }
    Ok(spec)
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

    fn probe(&mut self, backend: &Backend) -> Result<ProbeSpec, String> {
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
        decode_probe(bytes)
    }

    fn evaluate(&mut self, result: &ProbeResult) -> Result<Verdict, String> {
        self.guest.store.set_epoch_deadline(HEALTH_CALL_TICKS);
        let (ptr, len) = self
            .guest
            .write(&result.encode())
            .map_err(|e| root_cause(&e))?;
        match self
            .evaluate
            .call(&mut self.guest.store, (ptr, len))
            .map_err(|e| root_cause(&e))?
        {
            -1 => Ok(Verdict::Unhealthy),
            100 => Ok(Verdict::Healthy),
            p @ 1..=99 => Ok(Verdict::Degraded(p as u8)),
            other => Err(format!(
                "sluice_health_evaluate returned {other}; expected -1, 1..=99 or 100"
            )),
        }
    }
}

/// Runs one pool's health plugin.
pub struct HealthHost {
    pool: String,
    engine: PluginEngine,
    current: ArcSwap<PluginVersion>,
    next_generation: AtomicU64,
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
            current: ArcSwap::from_pointee(version),
            next_generation: AtomicU64::new(2),
            instance: Mutex::new(None),
            metrics: metrics.clone(),
        })
    }

    /// The version in use.
    pub fn current(&self) -> Arc<PluginVersion> {
        self.current.load_full()
    }

    /// Validates and installs a new version; on error the old one stays.
    pub fn swap(
        &self,
        bytes: &[u8],
        name: &str,
        config_json: Option<Arc<[u8]>>,
        sample: Option<&Backend>,
    ) -> Result<Arc<PluginVersion>, PluginError> {
        let config = config_json.unwrap_or_else(|| self.current.load().config_json.clone());
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        let result = validate(&self.engine, bytes, name, generation, config, sample);
        let outcome = if result.is_ok() { "ok" } else { "rejected" };
        self.metrics
            .plugin_swaps
            .with_label_values(&[&self.pool, "health", outcome])
            .inc();
        let version = Arc::new(result?);
        self.current.store(version.clone());
        tracing::info!(pool = %self.pool, plugin = %version.name, sha256 = %version.sha256, generation, "health check swapped");
        Ok(version)
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
        let version = self.current.load();
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
    pub fn probe(&self, backend: &Backend) -> Result<ProbeSpec, String> {
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
                &[crate::config::BackendSpec {
                    addr: "127.0.0.1:1".parse().expect("valid"),
                    weight: 1,
                    zone: String::new(),
                    tags: Vec::new(),
                }],
                &Metrics::new(),
                "validation",
            );
            &fallback[0]
        }
    };
    inst.probe(backend)
        .map_err(|e| PluginError::TrialPick(format!("trial probe: {e}")))?;
    inst.evaluate(&ProbeResult::failed(
        Outcome::ConnectFailed,
        Duration::from_millis(1),
    ))
    .map_err(|e| PluginError::TrialPick(format!("trial evaluation: {e}")))?;
    Ok(version)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn probes_decode_and_bad_ones_are_named() {
        assert_eq!(decode_probe(&[0]), Ok(ProbeSpec::TcpConnect));
        let mut http = vec![1, 3, 0];
        http.extend_from_slice(b"GET");
        http.extend_from_slice(&[8, 0]);
        http.extend_from_slice(b"/healthz");
        http.extend_from_slice(&[1, 0, 4, 0]);
        http.extend_from_slice(b"host");
        http.extend_from_slice(&[1, 0, b'x', 0, 0, 0, 0]);
        assert_eq!(
            decode_probe(&http),
            Ok(ProbeSpec::Http {
                method: "GET".into(),
                path: "/healthz".into(),
                headers: vec![("host".into(), "x".into())],
                body: vec![]
            })
        );
        assert!(decode_probe(&http[..http.len() - 1])
            .unwrap_err()
            .contains("truncated"));
        assert!(decode_probe(&[9])
            .unwrap_err()
            .contains("unknown probe kind 9"));
        let mut bad_path = vec![1, 3, 0];
        bad_path.extend_from_slice(b"GET");
        bad_path.extend_from_slice(&[3, 0]);
        bad_path.extend_from_slice(b"a b");
        assert!(decode_probe(&bad_path)
            .unwrap_err()
            .contains("must start with '/'"));
        assert_eq!(
            decode_probe(&[2, 2, 0, 0, 0, b'h', b'i', 4, 0, 0, 0]),
            Ok(ProbeSpec::Tcp {
                send: b"hi".to_vec(),
                read: 4
            })
        );
    }

    #[test]
    fn results_encode_as_documented() {
        let r = ProbeResult {
            outcome: Outcome::Completed,
            latency: Duration::from_micros(258),
            status: 200,
            headers: vec![("a".into(), "b".into())],
            body: b"ok".to_vec(),
        };
        assert_eq!(
            r.encode(),
            vec![0, 2, 1, 0, 0, 200, 0, 1, 0, 1, 0, b'a', 1, 0, b'b', 2, 0, 0, 0, b'o', b'k']
        );
    }
}
