//! `sluice plugin test`: runs a strategy plugin, through the same host as the proxy, against
//! simulated traffic, and reports how it spreads requests and keys.
//!
//! The simulation runs on a virtual clock. Requests arrive at a fixed rate, and each backend
//! answers with its own latency, so in-flight counts and latency averages (what least-connections,
//! P2C and peak-EWMA read) behave as they would under load. Each request carries one of `keys`
//! keys in every attribute a hashing strategy may use. Halfway through, one backend is removed,
//! and the report counts how many keys moved.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Duration;

use crate::backend::BackendTable;
use crate::config::BackendSpec;
use crate::lease::{Lease, Outcome};
use crate::metrics::Metrics;
use crate::plugin::{PluginEngine, PluginError, RequestView};
use crate::pool::{Pool, PoolSettings};
use crate::strategy::StrategyHost;

/// Simulation parameters.
#[derive(Debug, Clone)]
pub struct SimParams {
    /// Number of backends.
    pub backends: usize,
    /// Requests per phase (before and after the removal).
    pub requests: usize,
    /// Distinct keys (clients).
    pub keys: usize,
    /// Plugin configuration (JSON).
    pub config_json: String,
}

/// What the simulation measured.
#[derive(Debug, Clone)]
pub struct SimReport {
    /// Backend addresses.
    pub addrs: Vec<String>,
    /// Picks per backend before the removal.
    pub before: Vec<u64>,
    /// Picks per backend after the removal (the removed one stays at 0).
    pub after: Vec<u64>,
    /// Index of the removed backend.
    pub removed: usize,
    /// Keys seen in both phases.
    pub keys_compared: usize,
    /// Keys whose backend changed although their old backend was not removed.
    pub keys_moved_needlessly: usize,
    /// Keys whose backend changed, in total.
    pub keys_moved: usize,
    /// Requests for which no backend was picked.
    pub no_backend: u64,
    /// Picks served by the native fallback after a plugin fault.
    pub fallback_picks: u64,
    /// The plugin's sha256.
    pub sha256: String,
}

/// Backend `i`'s simulated latency: 200 µs, 400 µs, ... so load-aware strategies have something to see.
fn latency_of(i: usize) -> Duration {
    Duration::from_micros(200 * (i as u64 + 1))
}

/// Runs the simulation.
pub fn run(wasm: &[u8], name: &str, params: &SimParams) -> Result<SimReport, PluginError> {
    let n = params.backends.max(1);
    if n > 50_000 {
        return Err(PluginError::Source(format!(
            "--backends {n} is too many; simulate at most 50000"
        )));
    }
    let engine = PluginEngine::new().map_err(|e| PluginError::Instantiate(e.to_string()))?;
    let metrics = Metrics::new();
    let specs: Vec<BackendSpec> = (0..n)
        .map(|i| BackendSpec::loopback(9001 + i as u16))
        .collect();
    let full = Arc::new(BackendTable::from_specs(&specs, &metrics, "sim", None));
    let first = StrategyHost::prepare_first(
        &engine,
        wasm,
        name,
        Arc::from(params.config_json.as_bytes()),
        &full,
    )?;
    drop(full);
    let host = StrategyHost::new(&engine, "sim", first, &metrics);
    let settings = PoolSettings {
        panic_threshold: 0,
        ..PoolSettings::default()
    };
    let pool = Arc::new(Pool::new(
        "sim",
        &specs,
        settings,
        host,
        metrics.clone(),
        None,
    ));
    let host = &pool.strategy;
    let all = pool.members().to_vec();
    let removed = n / 2;
    let reduced: Vec<BackendSpec> = specs
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != removed)
        .map(|(_, s)| s.clone())
        .collect();

    let mut report = SimReport {
        addrs: all.iter().map(|b| b.addr_text.clone()).collect(),
        before: vec![0; n],
        after: vec![0; n],
        removed,
        keys_compared: 0,
        keys_moved_needlessly: 0,
        keys_moved: 0,
        no_backend: 0,
        fallback_picks: 0,
        sha256: host.current().sha256.clone(),
    };
    let keys = params.keys.max(1);
    let mut first_backend: HashMap<usize, usize> = HashMap::new();
    let mut second_backend: HashMap<usize, usize> = HashMap::new();
    // (completion time in µs, sequence number) -> the attempt's lease
    let mut in_flight: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new();
    let mut leases: HashMap<u64, Lease> = HashMap::new();
    let mut seq = 0u64;
    let mut now_us: u64 = 0;
    let none = |_: usize| false;
    for phase in 0..2 {
        if phase == 1 {
            pool.set_static_backends(&reduced);
        }
        let table = pool.table_full();
        for r in 0..params.requests {
            now_us += 50;
            while let Some(Reverse((done, id))) = in_flight.peek().copied() {
                if done > now_us {
                    break;
                }
                in_flight.pop();
                leases.remove(&id); // ends the attempt: releases the slot, records the latency
            }
            let key = r % keys;
            let header = key_request(key);
            let ip = std::net::IpAddr::from([10, (key >> 16) as u8, (key >> 8) as u8, key as u8]);
            let view = RequestView {
                header: &header,
                client_ip: Some(ip),
                excluded: &none,
            };
            let Some(idx) = host.pick(&table, &view, 0) else {
                report.no_backend += 1;
                continue;
            };
            let backend = &table.backends[idx];
            let global = all
                .iter()
                .position(|b| b.addr == backend.addr)
                .expect("table backends come from `all`");
            if phase == 0 {
                report.before[global] += 1;
                first_backend.insert(key, global);
            } else {
                report.after[global] += 1;
                second_backend.entry(key).or_insert(global);
            }
            let mut lease = pool.lease(backend.clone());
            lease.set_outcome(Outcome::Status(200));
            lease.set_latency(latency_of(global));
            seq += 1;
            leases.insert(seq, lease);
            in_flight.push(Reverse((
                now_us + latency_of(global).as_micros() as u64,
                seq,
            )));
        }
    }
    for (key, before) in &first_backend {
        if let Some(after) = second_backend.get(key) {
            report.keys_compared += 1;
            if before != after {
                report.keys_moved += 1;
                if *before != removed {
                    report.keys_moved_needlessly += 1;
                }
            }
        }
    }
    drop(leases);
    report.fallback_picks = metrics.fallback_picks.with_label_values(&["sim"]).get();
    Ok(report)
}

/// A request carrying `key` in every attribute kind a strategy may hash.
fn key_request(key: usize) -> http::request::Parts {
    let k = format!("k{key}");
    let (parts, ()) = http::Request::get(format!("/k/{key}?key={k}"))
        .header("host", "sim.example")
        .header("x-key", k.as_str())
        .header("cookie", format!("session={k}"))
        .body(())
        .expect("ASCII request parts are valid")
        .into_parts();
    parts
}

impl SimReport {
    /// The report as a table for people.
    pub fn render(&self, name: &str, params: &SimParams) -> String {
        let mut out = String::new();
        let total_before: u64 = self.before.iter().sum();
        let total_after: u64 = self.after.iter().sum();
        let pct = |x: u64, t: u64| {
            if t == 0 {
                0.0
            } else {
                100.0 * x as f64 / t as f64
            }
        };
        let _ = writeln!(out, "plugin {name} (sha256 {})", &self.sha256[..16]);
        let _ = writeln!(
            out,
            "{} backends, {} keys, {} requests per phase; backend i answers in {} µs × (i+1)",
            self.addrs.len(),
            params.keys,
            params.requests,
            latency_of(0).as_micros()
        );
        let _ = writeln!(
            out,
            "\n{:<18} {:>9} {:>7}   {:>9} {:>7}",
            "backend", "before", "share", "after", "share"
        );
        for (i, a) in self.addrs.iter().enumerate() {
            let mark = if i == self.removed {
                " (removed midway)"
            } else {
                ""
            };
            let _ = writeln!(
                out,
                "{a:<18} {:>9} {:>6.1}%   {:>9} {:>6.1}%{mark}",
                self.before[i],
                pct(self.before[i], total_before),
                self.after[i],
                pct(self.after[i], total_after)
            );
        }
        let _ = writeln!(
            out,
            "\nkeys moved after the removal: {} of {} ({:.1}%); ideal for consistent hashing: {:.1}%",
            self.keys_moved,
            self.keys_compared,
            pct(self.keys_moved as u64, self.keys_compared as u64),
            100.0 / self.addrs.len() as f64
        );
        let _ = writeln!(
            out,
            "keys moved although their backend stayed: {} ({:.1}%)",
            self.keys_moved_needlessly,
            pct(self.keys_moved_needlessly as u64, self.keys_compared as u64)
        );
        let _ = writeln!(
            out,
            "requests without a backend: {}, fallback picks after plugin faults: {}",
            self.no_backend, self.fallback_picks
        );
        out
    }
}
