//! The last minutes of traffic, for the dashboard's charts: requests per second, error rate, p50
//! and p99 latency of every pool and every backend, one point a second.
//!
//! A background task calls [`History::sample`] once a second: it reads the counters the request
//! path keeps anyway (requests by status class, the latency histogram of each backend, the pool's
//! "no backend" count), turns the difference since the last sample into a point, and writes it
//! into a fixed ring per series. Nothing is added to the request path beyond what it records
//! already. Memory is bounded: [`HISTORY_LEN`] points of 16 bytes per pool and per backend. A
//! series goes with its pool or backend at the next sample.
//!
//! Reads take no lock. Each ring has one writer (the sampler, serialized by a cold lock) and any
//! number of readers: the writer fills slot `t % HISTORY_LEN` and then publishes `t + 1` as the
//! tick count with `Release`; a reader loads the count with `Acquire` and reads the
//! `HISTORY_LEN - 1` points before it, never the slot the writer fills next.
//!
//! What a point means: attempts on backends (a retried request counts once per attempt) and
//! requests answered 503 for want of a backend, per second of the interval; the error rate is the
//! share of those that ended in a 5xx, no answer, or no backend; latencies are the time from
//! the pick to the end of the attempt, read from log-linear buckets (within 25 %).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Weak};
use std::time::Instant;

use arc_swap::ArcSwap;

use crate::backend::BackendStats;
use crate::cold_lock::ColdLock;
use crate::latency::{quantile_us, BUCKETS};
use crate::pool::Pool;

/// Points kept per series: five minutes at one a second.
pub const HISTORY_LEN: usize = 300;

/// How often [`History::sample`] is meant to run.
pub const SAMPLE_PERIOD: std::time::Duration = std::time::Duration::from_secs(1);

/// One point: requests/s, error ratio, p50 ms, p99 ms (f32 bits; NaN = no request).
type Slot = [AtomicU32; 4];

/// The ring of one pool or one backend.
pub struct Series {
    /// The pool.
    pub pool: String,
    /// The backend's address, `None` for the pool as a whole.
    pub backend: Option<String>,
    /// The first tick this series has a point for.
    born: u64,
    slots: Box<[Slot]>,
}

impl Series {
    fn new(pool: &str, backend: Option<&str>, born: u64) -> Series {
        Series {
            pool: pool.to_string(),
            backend: backend.map(str::to_string),
            born,
            slots: (0..HISTORY_LEN)
                .map(|_| std::array::from_fn(|_| AtomicU32::new(f32::NAN.to_bits())))
                .collect(),
        }
    }

    fn write(&self, tick: u64, point: [f32; 4]) {
        let slot = &self.slots[(tick % HISTORY_LEN as u64) as usize];
        for (cell, v) in slot.iter().zip(point) {
            cell.store(v.to_bits(), Ordering::Relaxed);
        }
    }

    fn read(&self, tick: u64) -> Option<[f32; 4]> {
        if tick < self.born {
            return None;
        }
        let slot = &self.slots[(tick % HISTORY_LEN as u64) as usize];
        Some(std::array::from_fn(|i| {
            f32::from_bits(slot[i].load(Ordering::Relaxed))
        }))
    }
}

/// What the sampler remembers of a series between two samples.
struct Last {
    series: Arc<Series>,
    /// The statistics read (a backend that left and came back has new ones: its counters
    /// restart). Weak: the history must not keep a removed backend's metric series alive.
    stats: Weak<BackendStats>,
    /// The counters at the last sample (for a pool: its "no backend" answers).
    reading: Reading,
}

#[derive(Default)]
struct Sampler {
    at: Option<Instant>,
    last: HashMap<(String, Option<String>), Last>,
}

/// Recent points of every pool and backend (see the module documentation).
pub struct History {
    /// Samples taken so far; the newest point is at tick `ticks - 1`.
    ticks: AtomicU64,
    /// Unix time (ms) of each slot's sample.
    times: Box<[AtomicU64]>,
    series: ArcSwap<Vec<Arc<Series>>>,
    sampler: ColdLock<Sampler>,
}

impl Default for History {
    fn default() -> Self {
        History {
            ticks: AtomicU64::new(0),
            times: (0..HISTORY_LEN).map(|_| AtomicU64::new(0)).collect(),
            series: ArcSwap::from_pointee(Vec::new()),
            sampler: ColdLock::new(Sampler::default()),
        }
    }
}

/// Counters read from one backend at one sample, or their difference since the last one.
#[derive(Clone, Copy)]
struct Reading {
    requests: u64,
    errors: u64,
    latency: [u64; BUCKETS],
}

impl Reading {
    const ZERO: Reading = Reading {
        requests: 0,
        errors: 0,
        latency: [0; BUCKETS],
    };

    fn of(stats: &BackendStats) -> Reading {
        let by_class: Vec<u64> = (0..crate::metrics::STATUS_CLASSES.len())
            .map(|c| stats.requests_in_class(c))
            .collect();
        Reading {
            requests: by_class.iter().sum(),
            // 5xx and "error" (no answer): the last two classes.
            errors: by_class[4] + by_class[5],
            latency: stats.latency_counts(),
        }
    }

    /// What happened since `last` (nothing for a first reading: there is no base yet).
    fn since(&self, last: Option<&Last>) -> Reading {
        let Some(l) = last else {
            return Reading::ZERO;
        };
        Reading {
            requests: self.requests.saturating_sub(l.reading.requests),
            errors: self.errors.saturating_sub(l.reading.errors),
            latency: std::array::from_fn(|i| self.latency[i].saturating_sub(l.reading.latency[i])),
        }
    }

    fn add(&mut self, other: &Reading) {
        self.requests += other.requests;
        self.errors += other.errors;
        for (a, b) in self.latency.iter_mut().zip(other.latency) {
            *a += b;
        }
    }

    /// The point of this difference over `secs` seconds.
    fn point(&self, secs: f64) -> [f32; 4] {
        let ratio = if self.requests == 0 {
            f32::NAN
        } else {
            self.errors as f32 / self.requests as f32
        };
        let ms = |q| quantile_us(&self.latency, q).map_or(f32::NAN, |us| (us / 1000.0) as f32);
        [
            (self.requests as f64 / secs) as f32,
            ratio,
            ms(0.5),
            ms(0.99),
        ]
    }
}

/// The series list being built by one sample.
struct NextSample {
    tick: u64,
    secs: f64,
    list: Vec<Arc<Series>>,
    last: HashMap<(String, Option<String>), Last>,
}

impl NextSample {
    /// Writes the point of `delta` into the series of `key` (made now when `prev` is `None`)
    /// and remembers `reading` as its base for the next sample.
    fn keep(
        &mut self,
        key: (String, Option<String>),
        prev: Option<Last>,
        delta: &Reading,
        reading: Reading,
        stats: Weak<BackendStats>,
    ) {
        let series = prev.map_or_else(
            || Arc::new(Series::new(&key.0, key.1.as_deref(), self.tick)),
            |l| l.series,
        );
        series.write(self.tick, delta.point(self.secs));
        self.list.push(series.clone());
        self.last.insert(
            key,
            Last {
                series,
                stats,
                reading,
            },
        );
    }
}

impl History {
    /// Takes one sample of `pools` (called every [`SAMPLE_PERIOD`]); series of pools and backends
    /// that are gone are dropped.
    pub fn sample(&self, pools: &[Arc<Pool>]) {
        let mut sampler = self.sampler.lock();
        let now = Instant::now();
        let secs = sampler
            .at
            .map_or(1.0, |at| now.duration_since(at).as_secs_f64())
            .max(0.001);
        sampler.at = Some(now);
        let tick = self.ticks.load(Ordering::Relaxed);
        let mut last = std::mem::take(&mut sampler.last);
        let mut next = NextSample {
            tick,
            secs,
            list: Vec::new(),
            last: HashMap::new(),
        };
        for pool in pools {
            // The pool's point is the sum of its backends' differences plus the new "no
            // backend" answers, so a backend that joins or leaves is no jump in the pool's chart.
            let mut pool_delta = Reading::ZERO;
            for b in pool.members().iter() {
                let key = (pool.name.clone(), Some(b.addr_text.clone()));
                let reading = Reading::of(&b.stats);
                // The same address with new statistics (it left and came back) starts afresh.
                let prev = last
                    .remove(&key)
                    .filter(|l| std::ptr::eq(l.stats.as_ptr(), Arc::as_ptr(&b.stats)));
                let delta = reading.since(prev.as_ref());
                pool_delta.add(&delta);
                next.keep(key, prev, &delta, reading, Arc::downgrade(&b.stats));
            }
            let key = (pool.name.clone(), None);
            let no_backend = pool.counters.no_backend.get();
            let reading = Reading {
                requests: no_backend,
                errors: no_backend,
                latency: [0; BUCKETS],
            };
            let prev = last.remove(&key);
            pool_delta.add(&reading.since(prev.as_ref()));
            next.keep(key, prev, &pool_delta, reading, Weak::new());
        }
        // What is left in `last` belongs to pools and backends that are gone: dropped here.
        drop(last);
        sampler.last = next.last;
        let list = next.list;
        let slot = (tick % HISTORY_LEN as u64) as usize;
        self.times[slot].store(unix_ms(), Ordering::Relaxed);
        let changed = {
            let old = self.series.load();
            old.len() != list.len() || old.iter().zip(&list).any(|(a, b)| !Arc::ptr_eq(a, b))
        };
        if changed {
            self.series.store(Arc::new(list));
        }
        self.ticks.store(tick + 1, Ordering::Release);
    }

    /// The points of the last `seconds` seconds (at most [`HISTORY_LEN`] - 1) as JSON: the sample
    /// times, then per pool its series and its backends' (a value is `null` where there was no
    /// request, or before the series existed).
    pub fn to_json(&self, seconds: usize) -> serde_json::Value {
        let end = self.ticks.load(Ordering::Acquire);
        let n = (seconds.min(HISTORY_LEN - 1) as u64).min(end);
        let ticks = end - n..end;
        let times: Vec<u64> = ticks
            .clone()
            .map(|t| self.times[(t % HISTORY_LEN as u64) as usize].load(Ordering::Relaxed))
            .collect();
        let series = self.series.load();
        let values = |s: &Series| {
            let mut out: [Vec<serde_json::Value>; 4] = Default::default();
            for t in ticks.clone() {
                let p = s.read(t);
                for (i, col) in out.iter_mut().enumerate() {
                    col.push(number(p.map_or(f32::NAN, |p| p[i]), DIGITS[i]));
                }
            }
            let [rps, error_rate, p50_ms, p99_ms] = out;
            serde_json::json!({
                "rps": rps, "error_rate": error_rate, "p50_ms": p50_ms, "p99_ms": p99_ms,
            })
        };
        let mut pools: Vec<serde_json::Value> = Vec::new();
        for s in series.iter().filter(|s| s.backend.is_none()) {
            let backends: Vec<_> = series
                .iter()
                .filter(|b| b.pool == s.pool && b.backend.is_some())
                .map(|b| {
                    let mut v = values(b);
                    v["addr"] = b.backend.clone().into();
                    v
                })
                .collect();
            let mut v = values(s);
            v["name"] = s.pool.clone().into();
            v["backends"] = backends.into();
            pools.push(v);
        }
        serde_json::json!({
            "interval_ms": SAMPLE_PERIOD.as_millis() as u64,
            "times": times,
            "pools": pools,
        })
    }
}

/// Wall-clock time in milliseconds since the Unix epoch (for people and browsers; the
/// monotonic [`crate::clock::now_ms`] is for durations).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Decimals kept of each field (rps, error ratio, p50 ms, p99 ms).
const DIGITS: [i32; 4] = [2, 4, 3, 3];

/// `v` rounded to `digits` decimals, `null` for NaN.
fn number(v: f32, digits: i32) -> serde_json::Value {
    if v.is_nan() {
        return serde_json::Value::Null;
    }
    let scale = 10f64.powi(digits);
    serde_json::json!((f64::from(v) * scale).round() / scale)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::lease::Outcome;
    use crate::runtime::Runtime;
    use std::time::Duration;

    fn config(backends: &[&str]) -> Config {
        let list: Vec<String> = backends.iter().map(|b| format!("\"{b}\"")).collect();
        let text = format!(
            "[server]\nlisten = [\"127.0.0.1:1\"]\n[[pool]]\nname = \"web\"\nbackends = [{}]\n[[route]]\npool = \"web\"\n",
            list.join(", ")
        );
        Config::parse(&text, "test.toml", std::path::Path::new(".")).unwrap()
    }

    #[test]
    fn points_follow_traffic_and_series_go_with_their_backend() {
        let rt = Runtime::new(
            config(&["127.0.0.1:9001", "127.0.0.1:9002"]),
            None,
            crate::plugin::PluginEngine::new().unwrap(),
            crate::metrics::Metrics::new(),
        )
        .unwrap();
        let history = History::default();
        history.sample(&rt.pools());
        let pool = rt.pool("web").unwrap();
        let first = pool.members()[0].clone();
        for status in [200, 200, 500] {
            let mut lease = pool.lease(first.clone());
            lease.set_latency(Duration::from_millis(10));
            lease.set_outcome(Outcome::Status(status));
        }
        history.sample(&rt.pools());
        let j = history.to_json(60);
        assert_eq!(j["times"].as_array().unwrap().len(), 2, "{j}");
        let web = &j["pools"][0];
        assert_eq!(web["name"], "web");
        let b = &web["backends"][0];
        assert_eq!(b["addr"], "127.0.0.1:9001");
        assert_eq!(b["rps"][0], 0.0, "the first sample is the base: {j}");
        assert!(b["rps"][1].as_f64().unwrap() > 0.0, "{j}");
        assert_eq!(b["error_rate"][1], 0.3333, "{j}");
        let p50 = b["p50_ms"][1].as_f64().unwrap();
        assert!((7.5..=12.5).contains(&p50), "p50 {p50}: {j}");
        assert!(
            web["backends"][1]["p50_ms"][1].is_null(),
            "no request, no latency: {j}"
        );
        assert_eq!(
            web["rps"][1], b["rps"][1],
            "the pool sums its backends: {j}"
        );
        assert_eq!(web["error_rate"][1], 0.3333);

        rt.apply(config(&["127.0.0.1:9002"])).unwrap();
        history.sample(&rt.pools());
        let j = history.to_json(60);
        let backends = j["pools"][0]["backends"].as_array().unwrap();
        assert_eq!(backends.len(), 1, "{j}");
        assert_eq!(backends[0]["addr"], "127.0.0.1:9002");
        assert_eq!(j["times"].as_array().unwrap().len(), 3);
        assert_eq!(history.to_json(1)["times"].as_array().unwrap().len(), 1);
    }
}
