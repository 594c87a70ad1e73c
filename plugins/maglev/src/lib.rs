//! Maglev consistent hashing, the built-in `builtin:maglev` strategy.
//!
//! # Algorithm
//!
//! Google's Maglev (Eisenbud et al., NSDI 2016) maps keys through a lookup table of prime size
//! `M` (65537 by default). Each backend derives from its address an `offset` and a `skip`
//! (`skip` in `1..M`, so since `M` is prime, `offset + j·skip mod M` for `j = 0..M` is a
//! permutation of the table), and the backends take turns claiming their next preferred free
//! entry until the table is full. A request's key is hashed by the host and the request goes
//! to `table[hash mod M]`: a single array read, O(1) however many backends there are.
//!
//! Compared to `builtin:ring-hash`, shares are almost exactly proportional to weight (each
//! backend gets its share of `M` entries, ± 1) and lookups are faster, while removing one of
//! `n` backends still moves only slightly more than 1/n of the keys (the entries of the removed
//! backend, plus a few others where the permutations interact). Rebuilding the table on a
//! table change costs O(M log M) at most, done once in `on_backends`, never per request.
//!
//! - **Weights.** Each round every backend earns its weight in credit, and claims one entry for
//!   every `max_weight` of credit, so entries are split in proportion to weight while the claims
//!   stay interleaved (Envoy's weighted Maglev does the same).
//! - **Retries and failures walk forward** through the table from the key's entry to the next
//!   entry owned by a backend the request has not tried. Table entries are a pseudo-random mix
//!   of backends, so a failed backend's keys spread over all the others, deterministically.
//! - **Bounded loads** (optional, `bounded_load = c`): the walk also skips backends whose
//!   in-flight count would exceed `ceil(c × (total_inflight + 1) × weight / total_weight)`, as
//!   in `builtin:ring-hash`.
//! - The table must be larger than the number of backends, and should be much larger (the
//!   paper suggests M > 100 × n) for even shares; a backend that cannot claim any entry (more
//!   backends than entries) gets no traffic except as a last resort on retries, which is logged.
//! - A weight of 0 (which the host does not send) counts as 1.
//!
//! # Configuration
//!
//! | key | values | default |
//! |---|---|---|
//! | `key` | `"client_ip"`, `"header:NAME"`, `"cookie:NAME"`, `"path"`, `"query:NAME"` | `"client_ip"` |
//! | `fallback` | `"random"` or `"client_ip"`: what to hash for a request without its key | `"random"` |
//! | `table_size` | a prime between 3 and 1048573 (e.g. 5021, 65537) | `65537` |
//! | `bounded_load` | factor ≥ 1 (e.g. `1.25`); absent = unbounded | absent |
//!
//! Any other key is refused.
//!
//! ```toml
//! strategy = { plugin = "builtin:maglev", config = { key = "cookie:sid", table_size = 5021 } }
//! ```

// Key selection, fallback and the bounded-load walk are shared with `builtin:ring-hash`, which
// owns the file. Included by path: every directory under plugins/ is built as a plugin, so
// there is no room for a plain library crate, and depending on the ring-hash crate would link
// its wasm exports into this plugin too.
#[path = "../../ring-hash/src/key.rs"]
mod key;

use key::{HashKey, CONFIG_KEYS};
use sluice_sdk::select;
use sluice_sdk::{hash_bytes, Backends, Config, ConfigError, Request, Strategy};

/// The table size unless configured: a prime a little above 2^16, the paper's choice.
const DEFAULT_TABLE_SIZE: u64 = 65_537;
/// The largest prime below 2^20: a 4 MiB table, still built well within the push deadline.
const MAX_TABLE_SIZE: u64 = 1_048_573;
/// Marks a table entry nobody has claimed yet during the build.
const EMPTY: u32 = u32::MAX;

/// Maglev lookup-table hashing.
#[derive(Debug)]
pub struct Maglev {
    key: HashKey,
    size: u64,
    /// `table[e]` is the backend owning entry `e`; empty when there are no backends.
    table: Vec<u32>,
}

fn is_prime(n: u64) -> bool {
    if n < 2 {
        return false;
    }
    let mut d = 2;
    while d * d <= n {
        if n.is_multiple_of(d) {
            return false;
        }
        d += 1;
    }
    true
}

/// Fills a table of `size` entries for backends with the given addresses and weights (>= 1).
fn populate(addrs: &[&str], weights: &[u64], size: u64) -> Vec<u32> {
    let n = addrs.len();
    if n == 0 {
        return Vec::new();
    }
    // Each backend's permutation: start at `offset`, step by `skip`. Two independent hashes of
    // the address (the second salted), so the two do not correlate.
    let mut position = Vec::with_capacity(n);
    let mut skip = Vec::with_capacity(n);
    let mut salted = String::new();
    for addr in addrs {
        position.push(hash_bytes(addr.as_bytes()) % size);
        salted.clear();
        salted.push_str(addr);
        salted.push_str("#skip");
        skip.push(hash_bytes(salted.as_bytes()) % (size - 1) + 1);
    }
    let max_weight = weights.iter().copied().max().unwrap_or(1);
    let mut credit = vec![0u64; n];
    let mut table = vec![EMPTY; size as usize];
    let mut filled = 0u64;
    while filled < size {
        for i in 0..n {
            credit[i] += weights[i];
            if credit[i] < max_weight {
                continue;
            }
            credit[i] -= max_weight;
            // Claim the next free entry of backend i's permutation. The permutation visits
            // every entry, and the table is not full, so this ends.
            loop {
                let e = position[i] as usize;
                position[i] = (position[i] + skip[i]) % size;
                if table[e] == EMPTY {
                    table[e] = i as u32;
                    filled += 1;
                    break;
                }
            }
            if filled == size {
                break;
            }
        }
    }
    table
}

impl Strategy for Maglev {
    fn init(config: &Config) -> Result<Self, String> {
        let mut allowed = CONFIG_KEYS.to_vec();
        allowed.push("table_size");
        config.reject_unknown_keys(&allowed)?;
        let key = HashKey::from_config(config)?;
        let size = config.get_u64("table_size")?.unwrap_or(DEFAULT_TABLE_SIZE);
        if !(3..=MAX_TABLE_SIZE).contains(&size) || !is_prime(size) {
            return Err(ConfigError::for_key(
                "table_size",
                format!(
                    "must be a prime between 3 and {MAX_TABLE_SIZE} (e.g. 5021 or 65537), \
                     got {size}"
                ),
            )
            .into());
        }
        Ok(Maglev {
            key,
            size,
            table: Vec::new(),
        })
    }

    fn on_backends(&mut self, backends: &Backends) {
        self.key.on_backends(backends);
        let addrs: Vec<&str> = backends.iter().map(|b| b.addr()).collect();
        let weights = select::weights(backends);
        self.table = populate(&addrs, &weights, self.size);
        if backends.len() as u64 > self.size {
            sluice_sdk::log::warn(&format!(
                "maglev: {} backends but only {} table entries; some backends get no traffic. \
                 Raise `table_size` to a prime well above 100 × the number of backends",
                backends.len(),
                self.size
            ));
        }
    }

    fn pick(&mut self, req: &mut Request, backends: &Backends) -> Option<usize> {
        if self.table.is_empty() {
            return None;
        }
        let size = self.table.len();
        let start = (self.key.hash(req) % size as u64) as usize;
        self.key.choose(req, backends, &self.table, start)
    }
}

sluice_sdk::export_strategy!(Maglev);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::testing::{
        backends, nth_client_ip as ip, weighted_backends, Harness, MockHost, TestRequest,
    };
    use sluice_sdk::Backend;

    fn harness(config: &str, table: &[Backend]) -> Harness<Maglev> {
        Harness::with_backends(config, table).unwrap()
    }

    fn entries_per_backend(h: &Harness<Maglev>, n: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for &e in &h.strategy().table {
            c[e as usize] += 1;
        }
        c
    }

    #[test]
    fn primes() {
        assert!(is_prime(5021) && is_prime(65_537) && is_prime(MAX_TABLE_SIZE));
        assert!(!is_prime(65_536) && !is_prime(1) && !is_prime(5023 * 3));
    }

    #[test]
    fn entries_are_split_evenly() {
        let h = harness(r#"{"table_size": 5021}"#, &backends(7));
        let c = entries_per_backend(&h, 7);
        assert_eq!(c.iter().sum::<usize>(), 5021);
        // 5021 / 7 = 717.3: every backend within one entry of its share.
        assert!(c.iter().all(|&x| (717..=718).contains(&x)), "{c:?}");
    }

    #[test]
    fn entries_follow_weights() {
        let h = harness("{}", &weighted_backends(&[1, 2, 5]));
        let c = entries_per_backend(&h, 3);
        for (i, w) in [1.0, 2.0, 5.0].iter().enumerate() {
            let share = 65_537.0 * w / 8.0;
            assert!((c[i] as f64 - share).abs() <= 2.0, "{c:?}");
        }
    }

    #[test]
    fn same_key_same_backend_and_few_moves() {
        let table = backends(10);
        let mut h = harness("{}", &table);
        let keys: Vec<TestRequest> = (0..5000)
            .map(|i| TestRequest::new().client_ip(&ip(i)))
            .collect();
        let before: Vec<String> = keys
            .iter()
            .map(|r| {
                let i = h.pick(r).unwrap();
                assert_eq!(h.pick(r), Some(i));
                h.backends()[i].addr().to_owned()
            })
            .collect();
        let removed = table[4].addr().to_owned();
        let mut smaller = table.clone();
        smaller.remove(4);
        h.set_backends(&smaller);
        let (mut moved, mut stayed_moved) = (0, 0);
        for (r, old) in keys.iter().zip(&before) {
            let i = h.pick(r).unwrap();
            let new = h.backends()[i].addr();
            if new != old {
                moved += 1;
                if *old != removed {
                    stayed_moved += 1;
                }
            }
        }
        // About 1/10 had to move; Maglev moves a few more than strictly necessary.
        assert!(moved < 5000 * 2 / 10, "{moved}");
        assert!(
            stayed_moved < 5000 / 50,
            "{stayed_moved} keys of surviving backends moved"
        );
    }

    #[test]
    fn retries_walk_the_table() {
        let mut h = harness(r#"{"table_size": 5021}"#, &backends(4));
        let req = TestRequest::new().client_ip("198.51.100.9");
        let home = h.pick(&req).unwrap();
        let retry = req.clone().attempt(1).exclude(home);
        let second = h.pick(&retry).unwrap();
        assert_ne!(second, home);
        assert_eq!(h.pick(&retry), Some(second));
        let mut tried = h.retries(&req);
        tried.sort_unstable();
        assert_eq!(tried, [0, 1, 2, 3]);
    }

    #[test]
    fn bounded_load_is_respected() {
        let mut h = harness(r#"{"bounded_load": 1.5, "table_size": 5021}"#, &backends(5));
        let hot = TestRequest::new().client_ip("10.7.7.7");
        let mut loads = [0u32; 5];
        for _ in 0..300 {
            let i = h.pick(&hot).unwrap();
            let total: u32 = loads.iter().sum();
            let cap = (1.5 * f64::from(total + 1) / 5.0).ceil();
            assert!(f64::from(loads[i]) + 1.0 <= cap, "{loads:?} picked {i}");
            loads[i] += 1;
            MockHost::set_inflight(i, loads[i]);
        }
    }

    #[test]
    fn header_key() {
        let mut h = harness(
            r#"{"key": "header:x-user", "fallback": "client_ip"}"#,
            &backends(6),
        );
        let bob = TestRequest::new().header("x-user", "bob");
        let home = h.pick(&bob);
        assert!((0..30).all(|i| h.pick(&bob.clone().client_ip(&ip(i))) == home));
    }

    #[test]
    fn more_backends_than_entries_is_survivable() {
        let mut h = harness(r#"{"table_size": 3}"#, &backends(5));
        assert!(MockHost::take_logs()
            .iter()
            .any(|l| l.message.contains("no traffic")));
        assert!(h.pick(&TestRequest::new()).unwrap() < 5);
        // Retries still reach the backends that own no entry, once the others were tried.
        let mut tried = h.retries(&TestRequest::new());
        tried.sort_unstable();
        assert_eq!(tried, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn empty_and_single_tables() {
        let mut h = harness("{}", &[]);
        assert_eq!(h.pick(&TestRequest::new()), None);
        h.set_backends(&backends(1));
        assert_eq!(h.pick(&TestRequest::new()), Some(0));
        assert_eq!(h.pick(&TestRequest::new().attempt(1).exclude(0)), None);
    }

    #[test]
    fn config_is_strict() {
        let err = |cfg: &str| Harness::<Maglev>::new(cfg).unwrap_err();
        assert!(err(r#"{"table_size": 65536}"#).contains("must be a prime"));
        assert!(err(r#"{"table_size": 2}"#).contains("must be a prime"));
        assert!(err(r#"{"tablesize": 5021}"#).contains("`tablesize`"));
        assert!(err(r#"{"vnodes": 100}"#).contains("`vnodes`"));
        assert!(err(r#"{"bounded_load": 0.9}"#).contains("`bounded_load`"));
        assert!(Harness::<Maglev>::new(r#"{"table_size": 5021, "key": "path"}"#).is_ok());
    }
}
