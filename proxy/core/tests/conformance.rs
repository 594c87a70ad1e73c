//! The conformance suite every built-in strategy must pass, run against the real plugin host:
//! each `builtin:NAME` is the embedded wasm module, compiled by wasmtime and driven through
//! `StrategyHost::pick` exactly as on the request path.
//!
//! Generic rules are checked for every strategy the binary embeds (`sluice_core::builtin::strategy_names()`):
//! an empty table has no backend, a single backend always gets the request, and a retry never
//! returns a backend the request already tried. Rules that depend on what a strategy is for (a
//! weight-proportional share, stickiness of a key, consistent hashing, bounded loads) are
//! checked for the strategies whose [`profile`] claims them; a new built-in must be given a
//! profile here, or `every_builtin_strategy_has_a_profile` fails.
//!
//! Every pick also asserts that the plugin answered it: a pick served by the host's native
//! fallback (after a trap, a deadline or a bad index) would otherwise hide a broken plugin
//! behind a plausible-looking answer.
//!
//! Kept fast (seconds) by compiling each (strategy, config) once for the whole suite and
//! swapping tables instead of rebuilding hosts, and by small proptest case counts.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use sluice_core::cold_lock::ColdLock;

use prometheus::IntCounter;
use proptest::prelude::*;
use sluice_core::backend::{BackendTable, InflightSlot};
use sluice_core::config::BackendSpec;
use sluice_core::metrics::Metrics;
use sluice_core::plugin::{PluginEngine, PluginError, RequestView};
use sluice_core::strategy::StrategyHost;

// ---------------------------------------------------------------------------------------------
// What each strategy promises
// ---------------------------------------------------------------------------------------------

/// How a strategy spreads requests over idle backends.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Spread {
    /// In proportion to weight (by rotation, by random draws, or over many distinct keys).
    Weighted,
    /// Evenly, but only when weights are equal (round-robin ignores weights; the two-choice
    /// strategies let the heavier candidate win when idle).
    EqualWeightsOnly,
}

/// What the suite checks beyond the generic rules.
#[derive(Clone, Copy, Debug)]
struct Profile {
    spread: Spread,
    /// Multiplier on the chi-square critical value. 1 for strategies whose shares are exact in
    /// expectation; more where the mechanism itself is only approximately proportional (ring
    /// arcs) or where the spread is a side effect rather than the goal (two choices, idle).
    tolerance: f64,
    /// The same client IP always reaches the same backend.
    sticky_by_client_ip: bool,
    /// Consistent hashing with `key`, `fallback` and `bounded_load` options.
    consistent: bool,
}

/// The profile of built-in strategy `name`; `None` for one the suite does not know yet.
fn profile(name: &str) -> Option<Profile> {
    let p = |spread, tolerance, sticky, consistent| Profile {
        spread,
        tolerance,
        sticky_by_client_ip: sticky,
        consistent,
    };
    Some(match name {
        "round-robin" => p(Spread::EqualWeightsOnly, 1.0, false, false),
        "weighted-round-robin" | "random" => p(Spread::Weighted, 1.0, false, false),
        // Idle ties are broken at random in proportion to weight.
        "least-connections" => p(Spread::Weighted, 1.0, false, false),
        "p2c" | "peak-ewma" => p(Spread::EqualWeightsOnly, 4.0, false, false),
        "ip-hash" => p(Spread::Weighted, 1.0, true, false),
        "maglev" => p(Spread::Weighted, 1.0, true, true),
        // 160 points per weight unit leave arcs a few percent off their ideal length.
        "ring-hash" => p(Spread::Weighted, 4.0, true, true),
        _ => return None,
    })
}

// ---------------------------------------------------------------------------------------------
// Fixtures: one engine, one metrics registry, one compiled host per (strategy, config)
// ---------------------------------------------------------------------------------------------

fn engine() -> &'static PluginEngine {
    static ENGINE: OnceLock<PluginEngine> = OnceLock::new();
    ENGINE.get_or_init(|| PluginEngine::new().expect("plugin engine"))
}

fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}

/// Every table gets a new generation, so a host pushes it to its instance before picking.
fn next_generation() -> u64 {
    static GENERATION: AtomicU64 = AtomicU64::new(1);
    GENERATION.fetch_add(1, Ordering::Relaxed)
}

/// A table of backends `10.0.x.y:80` with the given weights. Each table has its own pool label,
/// so its in-flight gauges are its own even though tests run in parallel.
fn table(weights: &[u32]) -> Arc<BackendTable> {
    let specs: Vec<BackendSpec> = weights
        .iter()
        .enumerate()
        .map(|(i, &weight)| BackendSpec {
            addr: format!("10.0.{}.{}:80", i / 250, i % 250 + 1)
                .parse()
                .unwrap(),
            weight,
            zone: String::new(),
            tags: Vec::new(),
        })
        .collect();
    let generation = next_generation();
    let t = BackendTable::from_specs(&specs, metrics(), &format!("table-{generation}"), None);
    Arc::new(BackendTable::new(generation, t.backends, None))
}

/// Puts `loads[i]` requests in flight on backend `i` of `t` until the slots are dropped.
fn set_load(t: &BackendTable, loads: &[i64]) -> Vec<InflightSlot> {
    t.backends
        .iter()
        .zip(loads)
        .flat_map(|(b, &n)| (0..n).map(|_| InflightSlot::new(&b.stats)))
        .collect()
}

/// `t` without backend `removed`: the same backends (same statistics), a new generation.
fn without(t: &BackendTable, removed: usize) -> Arc<BackendTable> {
    let mut backends = t.backends.clone();
    backends.remove(removed);
    Arc::new(BackendTable::new(next_generation(), backends, None))
}

/// A strategy loaded into the host, with the counter that reveals faults.
struct Loaded {
    host: StrategyHost,
    fallbacks: IntCounter,
}

/// The host for `builtin:name` with `config`, compiled on first use and shared by all tests;
/// `None` if the built-in is not a strategy (a health-check plugin).
fn load(name: &str, config: &str) -> Option<Arc<Loaded>> {
    type Cache = ColdLock<HashMap<(String, String), Option<Arc<Loaded>>>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    // Held while compiling so two tests never compile the same module twice.
    let mut cache = cache.lock();
    cache
        .entry((name.to_string(), config.to_string()))
        .or_insert_with(|| {
            let bytes = sluice_core::builtin::get(name).expect("listed by builtin::strategy_names");
            let pool = format!("{name} {config}");
            // Validated against an empty table: the trial pick must answer -1, which is the
            // plugin-level half of the "empty table" rule (the host never asks a plugin to
            // pick from an empty table).
            let result = StrategyHost::prepare_first(
                engine(),
                bytes,
                &format!("builtin:{name}"),
                Arc::from(config.as_bytes()),
                &table(&[]),
            )
            .map(|first| StrategyHost::new(engine(), &pool, first, metrics()));
            match result {
                Ok(host) => Some(Arc::new(Loaded {
                    host,
                    fallbacks: metrics().fallback_picks.with_label_values(&[&pool]),
                })),
                Err(PluginError::WrongKind { .. }) => None,
                Err(e) => panic!("builtin:{name} with config {config} was refused: {e}"),
            }
        })
        .clone()
}

/// Built-in strategies with their default configuration.
fn strategies() -> Vec<(&'static str, Arc<Loaded>)> {
    sluice_core::builtin::strategy_names()
        .filter_map(|name| load(name, "{}").map(|s| (name, s)))
        .collect()
}

/// A request as a strategy sees it.
struct Req {
    header: http::request::Parts,
    client_ip: Option<IpAddr>,
    excluded: Vec<usize>,
    attempt: u32,
}

impl Req {
    fn new() -> Req {
        Req {
            header: http::Request::get("/path").body(()).unwrap().into_parts().0,
            client_ip: Some(IpAddr::V4(Ipv4Addr::new(127, 0, 0, 1))),
            excluded: Vec::new(),
            attempt: 0,
        }
    }

    /// From client `n`: distinct IPs for distinct `n`.
    fn from_client(n: u32) -> Req {
        Req {
            client_ip: Some(IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))),
            ..Req::new()
        }
    }

    fn header(mut self, name: &'static str, value: &str) -> Req {
        self.header
            .headers
            .insert(name, http::HeaderValue::from_str(value).unwrap());
        self
    }

    /// A retry that already tried `excluded`.
    fn retry(mut self, excluded: &[usize]) -> Req {
        self.excluded = excluded.to_vec();
        self.attempt = excluded.len().max(1) as u32;
        self
    }
}

impl Loaded {
    /// Picks for `req` from `t`, asserting that the plugin (not the host's fallback) answered.
    ///
    /// A pick's deadline is 5–10 ms of wall time. On a loaded machine the thread can be
    /// descheduled past it; the host then rightly answers with its fallback and rebuilds the
    /// instance after a short backoff. That is the machine's timing, not the plugin's answer, so
    /// such a pick is asked again (for up to 10 s); any other fault fails at once.
    fn pick(&self, t: &Arc<BackendTable>, req: &Req) -> Option<usize> {
        let excluded = |i: usize| req.excluded.contains(&i);
        let view = RequestView {
            header: &req.header,
            client_ip: req.client_ip,
            excluded: &excluded,
        };
        let name = &self.host.current().name;
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            let before = self.fallbacks.get();
            let picked = self.host.pick(t, &view, req.attempt);
            // Every fault but a missed deadline (traps, bad indexes, bad answers, ...).
            let other: u64 = self
                .host
                .fault_totals()
                .iter()
                .filter(|(reason, _)| *reason != "deadline")
                .map(|(_, n)| n)
                .sum();
            assert_eq!(
                other, 0,
                "{name}: a pick was served by the host's fallback because the plugin trapped or \
                 returned a bad index; see the warning in the log"
            );
            if self.fallbacks.get() == before {
                return picked;
            }
            assert!(
                Instant::now() < give_up,
                "{name}: picks kept running past their deadline for 10 s"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Runs `check` for every strategy and reports every failure, not just the first.
fn for_each_strategy(check: impl Fn(&str, &Loaded) -> Result<(), String>) {
    let all = strategies();
    assert!(
        all.len() >= 2,
        "expected the built-in strategies, found {}",
        all.len()
    );
    let failures: Vec<String> = all
        .iter()
        .filter_map(|(name, s)| check(name, s).err().map(|e| format!("{name}: {e}")))
        .collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

// ---------------------------------------------------------------------------------------------
// Statistics
// ---------------------------------------------------------------------------------------------

/// Pearson's chi-square statistic of `observed` against shares proportional to `weights`.
fn chi_square(observed: &[u64], weights: &[u32]) -> f64 {
    let n: u64 = observed.iter().sum();
    let total: f64 = weights.iter().map(|&w| f64::from(w)).sum();
    observed
        .iter()
        .zip(weights)
        .map(|(&o, &w)| {
            let e = n as f64 * f64::from(w) / total;
            (o as f64 - e).powi(2) / e
        })
        .sum()
}

/// The chi-square value exceeded with probability about 10^-6 at `df` degrees of freedom
/// (Wilson–Hilferty approximation, z = 4.75): a fair strategy fails the check once in a
/// million runs, a biased one fails it reliably at the pick counts used here.
fn chi_square_critical(df: usize) -> f64 {
    let df = df as f64;
    let a = 2.0 / (9.0 * df);
    df * (1.0 - a + 4.75 * a.sqrt()).powi(3)
}

// ---------------------------------------------------------------------------------------------
// Generic rules
// ---------------------------------------------------------------------------------------------

#[test]
fn every_builtin_strategy_has_a_profile() {
    let unknown: Vec<_> = strategies()
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| profile(name).is_none())
        .collect();
    assert!(
        unknown.is_empty(),
        "add a conformance profile to proxy/tests/conformance.rs for {unknown:?}"
    );
    let names: Vec<_> = strategies().into_iter().map(|(n, _)| n).collect();
    for expected in [
        "round-robin",
        "weighted-round-robin",
        "random",
        "least-connections",
        "p2c",
        "peak-ewma",
        "ip-hash",
        "ring-hash",
        "maglev",
    ] {
        assert!(
            names.contains(&expected),
            "builtin:{expected} is missing from {names:?}"
        );
    }
}

#[test]
fn empty_table_has_no_backend() {
    // `load` validated every strategy against an empty table (plugin level); this is the
    // host level, for first attempts and retries.
    for_each_strategy(|_, s| {
        let empty = table(&[]);
        for req in [Req::new(), Req::new().retry(&[0])] {
            if let Some(i) = s.pick(&empty, &req) {
                return Err(format!("picked {i} from an empty table"));
            }
        }
        Ok(())
    });
}

#[test]
fn single_backend_always_gets_the_request() {
    for_each_strategy(|_, s| {
        for weight in [1, 7] {
            let one = table(&[weight]);
            for n in 0..100 {
                let picked = s.pick(&one, &Req::from_client(n));
                if picked != Some(0) {
                    return Err(format!("picked {picked:?} from a table of one"));
                }
            }
            // A retry with nothing excluded (the failure was not a backend's) still picks it.
            let mut retry = Req::new();
            retry.attempt = 1;
            if s.pick(&one, &retry) != Some(0) {
                return Err("no pick on a retry with nothing excluded".into());
            }
            if let Some(i) = s.pick(&one, &Req::new().retry(&[0])) {
                return Err(format!("picked {i} although the only backend was tried"));
            }
        }
        Ok(())
    });
}

#[test]
fn retries_find_the_only_untried_backend() {
    for_each_strategy(|_, s| {
        let t = table(&[1, 3, 1, 2, 5]);
        for keep in 0..5 {
            let tried: Vec<usize> = (0..5).filter(|&i| i != keep).collect();
            for n in 0..20 {
                let picked = s.pick(&t, &Req::from_client(n).retry(&tried));
                if picked != Some(keep) {
                    return Err(format!(
                        "tried {tried:?}, picked {picked:?} instead of {keep}"
                    ));
                }
            }
        }
        let all = [0, 1, 2, 3, 4];
        if let Some(i) = s.pick(&t, &Req::new().retry(&all)) {
            return Err(format!("picked {i} after every backend was tried"));
        }
        Ok(())
    });
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    /// Whatever was tried, in whatever table, the pick is untried, and there is one if any
    /// backend is untried.
    #[test]
    fn retries_never_return_a_tried_backend(
        weights in prop::collection::vec(1u32..=5, 1..=12),
        tried_mask in any::<u16>(),
        client in any::<u32>(),
        busy in prop::collection::vec(0i64..=8, 12),
    ) {
        let t = table(&weights);
        let _busy = set_load(&t, &busy);
        let tried: Vec<usize> = (0..weights.len()).filter(|i| tried_mask >> i & 1 == 1).collect();
        for_each_strategy(|_, s| {
            let picked = s.pick(&t, &Req::from_client(client).retry(&tried));
            match picked {
                Some(i) if tried.contains(&i) => Err(format!("picked {i}, tried {tried:?}")),
                None if tried.len() < weights.len() => Err(format!("no pick, only {tried:?} tried")),
                _ => Ok(()),
            }
        });
    }
}

// ---------------------------------------------------------------------------------------------
// Distribution
// ---------------------------------------------------------------------------------------------

#[test]
fn idle_traffic_spreads_as_the_profile_promises() {
    const PICKS: u32 = 12_000;
    for_each_strategy(|name, s| {
        let p = profile(name).ok_or("no profile")?;
        let weights: &[u32] = match p.spread {
            Spread::Weighted => &[1, 2, 3, 4, 2],
            Spread::EqualWeightsOnly => &[1, 1, 1, 1, 1],
        };
        let t = table(weights);
        let mut counts = vec![0u64; weights.len()];
        for n in 0..PICKS {
            // Distinct clients so key-based strategies spread too; the others ignore them.
            let i = s.pick(&t, &Req::from_client(n)).ok_or("no pick")?;
            counts[i] += 1;
        }
        let x2 = chi_square(&counts, weights);
        let limit = chi_square_critical(weights.len() - 1) * p.tolerance;
        if x2 > limit {
            return Err(format!(
                "counts {counts:?} for weights {weights:?}: chi-square {x2:.1} > {limit:.1}"
            ));
        }
        Ok(())
    });
}

#[test]
fn chi_square_check_detects_an_unweighted_spread() {
    // The distribution check must be able to fail: an even spread over weights 1,2,3,4,2.
    let even = [2400u64; 5];
    assert!(chi_square(&even, &[1, 2, 3, 4, 2]) > 4.0 * chi_square_critical(4));
    assert!(chi_square(&[2400, 2400, 2400, 2400, 2400], &[1; 5]) < 1e-9);
}

// ---------------------------------------------------------------------------------------------
// Key affinity and consistent hashing
// ---------------------------------------------------------------------------------------------

#[test]
fn the_same_client_keeps_its_backend() {
    for_each_strategy(|name, s| {
        if !profile(name).ok_or("no profile")?.sticky_by_client_ip {
            return Ok(());
        }
        let t = table(&[1, 2, 1, 3, 1, 1]);
        for client in 0..20 {
            let req = Req::from_client(client * 7919);
            let home = s.pick(&t, &req);
            for _ in 0..100 {
                let again = s.pick(&t, &req);
                if again != home {
                    return Err(format!("client {client}: {home:?} then {again:?}"));
                }
            }
        }
        Ok(())
    });
}

/// The consistent-hashing strategies, each with `config`.
fn consistent(config: &str) -> Vec<(&'static str, Arc<Loaded>)> {
    sluice_core::builtin::strategy_names()
        .filter(|name| profile(name).is_some_and(|p| p.consistent))
        .filter_map(|name| load(name, config).map(|s| (name, s)))
        .collect()
}

#[test]
fn header_keys_are_sticky_and_fall_back_to_the_client_ip() {
    let all = consistent(r#"{"key": "header:x-user", "fallback": "client_ip"}"#);
    assert_eq!(all.len(), 2, "ring-hash and maglev");
    let t = table(&[1, 1, 2, 1, 1, 1, 1]);
    for (name, s) in all {
        for user in ["alice", "bob", "carol", "dave"] {
            let home = s.pick(&t, &Req::new().header("x-user", user));
            for client in 0..50 {
                let picked = s.pick(&t, &Req::from_client(client).header("x-user", user));
                assert_eq!(picked, home, "{name}: user {user} moved with the client IP");
            }
        }
        for client in 0..20 {
            let home = s.pick(&t, &Req::from_client(client));
            for _ in 0..20 {
                assert_eq!(
                    s.pick(&t, &Req::from_client(client)),
                    home,
                    "{name}: fallback"
                );
            }
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(16))]

    /// Removing one of n backends moves about the removed backend's share of the keys, and
    /// (almost) only those.
    #[test]
    fn removing_a_backend_moves_few_keys(
        weights in prop::collection::vec(1u32..=3, 3..=12),
        removed in any::<prop::sample::Index>(),
        first_client in any::<u32>(),
    ) {
        const KEYS: u32 = 1500;
        let removed = removed.index(weights.len());
        let before_table = table(&weights);
        let after_table = without(&before_table, removed);
        let removed_addr = before_table.backends[removed].addr;
        let total: u32 = weights.iter().sum();
        let share = f64::from(weights[removed]) / f64::from(total);
        for (name, s) in consistent("{}") {
            let requests: Vec<Req> = (0..KEYS)
                .map(|k| Req::from_client(first_client.wrapping_add(k.wrapping_mul(2_654_435_761))))
                .collect();
            // All picks on one table, then all on the other: alternating would make the host
            // push a new table (and the plugin rebuild its ring or lookup table) on every pick.
            let homes = |t: &Arc<BackendTable>| -> Vec<std::net::SocketAddr> {
                requests.iter().map(|r| t.backends[s.pick(t, r).unwrap()].addr).collect()
            };
            let (before_homes, after_homes) = (homes(&before_table), homes(&after_table));
            let (mut moved, mut moved_from_survivors) = (0u32, 0u32);
            for (before, after) in before_homes.iter().zip(&after_homes) {
                if before != after {
                    moved += 1;
                    if *before != removed_addr {
                        moved_from_survivors += 1;
                    }
                }
            }
            let moved_fraction = f64::from(moved) / f64::from(KEYS);
            prop_assert!(
                moved_fraction < 2.0 * share + 0.03,
                "{}: {:.3} of keys moved, removed backend's share {:.3}", name, moved_fraction, share
            );
            let churn = f64::from(moved_from_survivors) / f64::from(KEYS);
            prop_assert!(churn < 0.03, "{}: {:.3} of keys moved between surviving backends", name, churn);
            if name == "ring-hash" {
                // On a ring a surviving backend loses no arc at all.
                prop_assert_eq!(moved_from_survivors, 0);
            }
        }
    }

    /// With `bounded_load = c`, no pick takes a backend past
    /// `ceil(c × (total_inflight + 1) × weight / total_weight)`, however skewed the keys.
    #[test]
    fn bounded_load_is_never_exceeded(
        weights in prop::collection::vec(1u32..=4, 2..=8),
        initial in prop::collection::vec(0i64..=20, 8),
        c in prop::sample::select(vec![1.0f64, 1.25, 2.0]),
        hot_clients in prop::collection::vec(any::<u32>(), 1..=3),
    ) {
        const PICKS: usize = 120;
        let t = table(&weights);
        let total_weight = f64::from(weights.iter().sum::<u32>());
        for (name, s) in consistent(&format!(r#"{{"bounded_load": {c}}}"#)) {
            let mut running = set_load(&t, &initial);
            for k in 0..PICKS {
                let req = Req::from_client(hot_clients[k % hot_clients.len()]);
                let i = s.pick(&t, &req).unwrap();
                let loads: Vec<i64> = t.backends.iter().map(|b| b.stats.inflight()).collect();
                let total: i64 = loads.iter().sum();
                // The plugin's formula, in the same floating-point operations.
                let scale = c * (total + 1) as f64 / total_weight;
                let bound = (scale * f64::from(weights[i])).ceil();
                prop_assert!(
                    loads[i] as f64 + 1.0 <= bound,
                    "{} (c = {}): picked {} with loads {:?}, weights {:?}: {} + 1 > {}",
                    name, c, i, loads, weights, loads[i], bound
                );
                running.push(InflightSlot::new(&t.backends[i].stats));
            }
        }
    }
}
