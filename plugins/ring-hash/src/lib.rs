//! Consistent hashing on a ring (ketama style), the built-in `builtin:ring-hash` strategy.
//!
//! # Algorithm
//!
//! Every backend is placed on a 64-bit hash ring at `vnodes × weight` points, the hashes of
//! `"ADDR#0"`, `"ADDR#1"`, ... (`hash_bytes`, the ABI hash). A request's key is hashed by the
//! host and the request goes to the owner of the first point clockwise from it, found by
//! binary search. Because points depend only on the backend's address, adding or removing one
//! backend moves only the keys of the arcs it gains or loses, about 1/n of them, while every
//! other key keeps its backend: caches behind the proxy stay warm through scaling and
//! deploys. Many points per backend even out the arc lengths, so shares follow weights to
//! within a few percent (more `vnodes`, tighter shares, bigger ring).
//!
//! - **The ring is built in `on_backends`** (only on table changes) as two sorted arrays, point
//!   hashes and owners; a pick is one host hash call plus a binary search, no allocation.
//! - **Retries and failures walk clockwise** to the next point owned by a backend the request
//!   has not tried, the classic ring successor, so a key's second choice is stable too.
//! - **Bounded loads** (optional, `bounded_load = c`): the walk also skips backends whose
//!   in-flight count would exceed `ceil(c × (total_inflight + 1) × weight / total_weight)`,
//!   "consistent hashing with bounded loads" (Mirrokni, Thorup, Zadimoghaddam 2018). A hot key
//!   then overflows to the next backends on the ring instead of overloading its home, at the
//!   cost of one `backend_inflight` host call per backend per pick.
//! - **Size.** When every weight is a multiple of 100 (the host scales weights by 100 while a
//!   backend ramps up or is degraded), they are divided by 100 first, so weights 100, 200 build
//!   the same ring as 1, 2. The divisor never depends on which backends are present, so removing
//!   one does not re-lay the others' points. The ring holds at most 2^18 points; above that the points
//!   per backend are scaled down proportionally (each keeps at least one), which costs some
//!   extra key movement when the table changes.
//! - A weight of 0 (which the host does not send) counts as 1.
//!
//! # Configuration
//!
//! | key | values | default |
//! |---|---|---|
//! | `key` | `"client_ip"`, `"header:NAME"`, `"cookie:NAME"`, `"path"`, `"query:NAME"` | `"client_ip"` |
//! | `fallback` | `"random"` or `"client_ip"`: what to hash for a request without its key | `"random"` |
//! | `vnodes` | points per unit of weight, 1 to 10000 | `160` |
//! | `bounded_load` | factor ≥ 1 (e.g. `1.25`); absent = unbounded | absent |
//!
//! Any other key is refused.
//!
//! ```toml
//! strategy = { plugin = "builtin:ring-hash", config = { key = "header:x-user", bounded_load = 1.25 } }
//! ```

pub mod key;

use key::{HashKey, CONFIG_KEYS};
use sluice_sdk::select;
use sluice_sdk::{hash_bytes, Backends, Config, ConfigError, Request, Strategy};
use std::fmt::Write;

/// Points per unit of weight unless configured; ketama's 160 keeps shares within a few percent.
const DEFAULT_VNODES: u64 = 160;
/// The factor the host applies to all weights while some backend is degraded or ramping.
const HOST_WEIGHT_SCALE: u64 = 100;
/// Largest `vnodes` accepted.
const MAX_VNODES: u64 = 10_000;
/// Most points on the ring: 2^18 points are 3 MiB, built in well under the push deadline.
const MAX_POINTS: u64 = 1 << 18;

/// Consistent hashing on a ring with virtual nodes.
#[derive(Debug)]
pub struct RingHash {
    key: HashKey,
    vnodes: u64,
    /// Point hashes in ascending order...
    points: Vec<u64>,
    /// ...and the backend owning each point.
    owners: Vec<u32>,
}

impl RingHash {
    /// The point hashes of backend `addr`, `count` of them, appended to `out`.
    fn place(addr: &str, count: u64, index: u32, buf: &mut String, out: &mut Vec<(u64, u32)>) {
        for j in 0..count {
            buf.clear();
            // Writing into a String cannot fail.
            let _ = write!(buf, "{addr}#{j}");
            out.push((hash_bytes(buf.as_bytes()), index));
        }
    }
}

impl Strategy for RingHash {
    fn init(config: &Config) -> Result<Self, String> {
        let mut allowed = CONFIG_KEYS.to_vec();
        allowed.push("vnodes");
        config.reject_unknown_keys(&allowed)?;
        let key = HashKey::from_config(config)?;
        let vnodes = config.get_u64("vnodes")?.unwrap_or(DEFAULT_VNODES);
        if !(1..=MAX_VNODES).contains(&vnodes) {
            return Err(ConfigError::for_key(
                "vnodes",
                format!("must be between 1 and {MAX_VNODES}, got {vnodes}"),
            )
            .into());
        }
        Ok(RingHash {
            key,
            vnodes,
            points: Vec::new(),
            owners: Vec::new(),
        })
    }

    fn on_backends(&mut self, backends: &Backends) {
        self.key.on_backends(backends);
        let mut weights = select::weights(backends);
        // While a backend ramps up or is degraded, the host sends every weight multiplied by
        // 100 (sdk/ABI.md). Undo exactly that scale, and nothing else: a divisor that depended on
        // the membership (such as the weights' GCD) would re-lay the whole ring when one backend
        // leaves, moving far more than its own keys.
        let divisor = if weights.iter().all(|w| w % HOST_WEIGHT_SCALE == 0) {
            HOST_WEIGHT_SCALE
        } else {
            1
        };
        for w in &mut weights {
            *w /= divisor;
        }
        let wanted: u64 = weights.iter().map(|w| w * self.vnodes).sum();
        let mut ring = Vec::with_capacity(wanted.min(MAX_POINTS + backends.len() as u64) as usize);
        let mut buf = String::new();
        for (i, (b, w)) in backends.iter().zip(&weights).enumerate() {
            let count = if wanted <= MAX_POINTS {
                w * self.vnodes
            } else {
                (w * self.vnodes * MAX_POINTS / wanted).max(1)
            };
            Self::place(b.addr(), count, i as u32, &mut buf, &mut ring);
        }
        // Sorting by (hash, owner) makes a (vanishingly rare) hash collision resolve the same
        // way in every instance.
        ring.sort_unstable();
        self.points = ring.iter().map(|p| p.0).collect();
        self.owners = ring.iter().map(|p| p.1).collect();
    }

    fn pick(&mut self, req: &mut Request, backends: &Backends) -> Option<usize> {
        let len = self.points.len();
        if len == 0 {
            return None;
        }
        let h = self.key.hash(req);
        // First point at or after h; past the last point the ring wraps to the first.
        let start = self.points.partition_point(|&p| p < h);
        self.key.choose(req, backends, &self.owners, start)
    }
}

sluice_sdk::export_strategy!(RingHash);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::testing::{
        backends, nth_client_ip as ip, weighted_backends, Harness, MockHost, TestRequest,
    };
    use sluice_sdk::{Attr, Backend};

    fn harness(config: &str, table: &[Backend]) -> Harness<RingHash> {
        Harness::with_backends(config, table).unwrap()
    }

    fn addr_of(h: &mut Harness<RingHash>, req: &TestRequest) -> String {
        let i = h.pick(req).unwrap();
        h.backends()[i].addr().to_owned()
    }

    #[test]
    fn same_key_same_backend() {
        let mut h = harness("{}", &backends(6));
        for i in 0..50 {
            let req = TestRequest::new().client_ip(&ip(i));
            let home = h.pick(&req);
            assert!((0..20).all(|_| h.pick(&req) == home));
        }
    }

    #[test]
    fn removing_a_backend_moves_only_its_keys() {
        let table = backends(8);
        let mut h = harness("{}", &table);
        let before: Vec<String> = (0..4000)
            .map(|i| addr_of(&mut h, &TestRequest::new().client_ip(&ip(i))))
            .collect();
        let removed = table[3].addr().to_owned();
        let mut smaller = table.clone();
        smaller.remove(3);
        h.set_backends(&smaller);
        let mut moved = 0;
        for (i, old) in before.iter().enumerate() {
            let new = addr_of(&mut h, &TestRequest::new().client_ip(&ip(i as u32)));
            if *old == removed {
                moved += 1;
            } else {
                assert_eq!(*old, new, "a key of a surviving backend moved");
            }
        }
        // About 1/8 of the keys lived on the removed backend.
        assert!((300..700).contains(&moved), "{moved}");
    }

    #[test]
    fn shares_follow_weights() {
        let mut h = harness("{}", &weighted_backends(&[1, 2, 4]));
        let mut c = [0; 3];
        let n = 14_000;
        for i in 0..n {
            c[h.pick(&TestRequest::new().client_ip(&ip(i))).unwrap()] += 1;
        }
        for (i, w) in [1.0, 2.0, 4.0].iter().enumerate() {
            let expected = n as f64 * w / 7.0;
            assert!((c[i] as f64 - expected).abs() < 0.15 * expected, "{c:?}");
        }
    }

    #[test]
    fn header_key_with_client_ip_fallback() {
        let cfg = r#"{"key": "header:x-user", "fallback": "client_ip"}"#;
        let mut h = harness(cfg, &backends(5));
        let alice = TestRequest::new()
            .header("X-User", "alice")
            .client_ip("10.9.9.9");
        let home = h.pick(&alice);
        for i in 0..20 {
            // The client IP does not matter while the header is present.
            assert_eq!(h.pick(&alice.clone().client_ip(&ip(i))), home);
        }
        // No header: the client IP decides, stably.
        let anon = TestRequest::new().client_ip("10.1.1.1");
        let anon_home = h.pick(&anon);
        assert!((0..20).all(|_| h.pick(&anon) == anon_home));
        // The header's hash is the host's: the same as a client IP with the same text.
        let mut by_ip = harness("{}", &backends(5));
        assert_eq!(by_ip.pick(&TestRequest::new().client_ip("alice")), home);
    }

    #[test]
    fn random_fallback_spreads_keyless_requests() {
        let mut h = harness(r#"{"key": "cookie:sid"}"#, &backends(4));
        let seen: std::collections::HashSet<_> = (0..200)
            .map(|_| h.pick(&TestRequest::new()).unwrap())
            .collect();
        assert_eq!(seen.len(), 4);
        let sticky = TestRequest::new().cookie("sid", "s1");
        let home = h.pick(&sticky);
        assert!((0..20).all(|_| h.pick(&sticky) == home));
    }

    #[test]
    fn path_and_query_keys() {
        let mut h = harness(r#"{"key": "path"}"#, &backends(5));
        let a = TestRequest::new().path("/videos/42").client_ip("10.0.0.1");
        let home = h.pick(&a);
        assert_eq!(h.pick(&a.clone().client_ip("10.0.0.2")), home);
        let mut q = harness(
            r#"{"key": "query:u", "fallback": "client_ip"}"#,
            &backends(5),
        );
        let r = TestRequest::new().query("u", "7");
        let home = q.pick(&r);
        assert_eq!(q.pick(&r.clone().client_ip("10.2.3.4")), home);
        let keyless = TestRequest::new().without(Attr::Query("u"));
        let first = q.pick(&keyless);
        assert!((0..10).all(|_| q.pick(&keyless) == first));
    }

    #[test]
    fn retries_take_the_ring_successor() {
        let mut h = harness("{}", &backends(5));
        let req = TestRequest::new().client_ip("203.0.113.5");
        let home = h.pick(&req).unwrap();
        let retry = req.clone().attempt(1).exclude(home);
        let second = h.pick(&retry).unwrap();
        assert_ne!(second, home);
        assert_eq!(h.pick(&retry), Some(second), "stable second choice");
        let mut tried = h.retries(&req);
        tried.sort_unstable();
        assert_eq!(tried, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn bounded_load_diverts_a_hot_key() {
        let mut h = harness(r#"{"bounded_load": 1.25}"#, &backends(4));
        let hot = TestRequest::new().client_ip("10.7.7.7");
        let home = h.pick(&hot).unwrap();
        // Simulate the hot key's requests piling up: each pick adds one in flight.
        let mut loads = [0u32; 4];
        for _ in 0..200 {
            let i = h.pick(&hot).unwrap();
            let total: u32 = loads.iter().sum();
            let cap = (1.25 * f64::from(total + 1) / 4.0).ceil();
            assert!(f64::from(loads[i]) + 1.0 <= cap, "{loads:?} picked {i}");
            loads[i] += 1;
            MockHost::set_inflight(i, loads[i]);
        }
        assert!(loads.iter().all(|&l| l > 0), "{loads:?}");
        assert!(loads[home] >= *loads.iter().max().unwrap() - 1, "{loads:?}");
        // Unloaded, the hot key is back home.
        for i in 0..4 {
            MockHost::set_inflight(i, 0);
        }
        assert_eq!(h.pick(&hot), Some(home));
    }

    #[test]
    fn bounded_load_with_everything_but_one_excluded() {
        let mut h = harness(r#"{"bounded_load": 1.0}"#, &backends(3));
        MockHost::set_inflight(1, 100); // far over any bound, but the only one left
        let req = TestRequest::new().attempt(2).exclude(0).exclude(2);
        assert_eq!(h.pick(&req), Some(1));
        assert_eq!(h.pick(&req.exclude(1)), None);
    }

    #[test]
    fn only_weight_proportions_matter() {
        let a = harness("{}", &weighted_backends(&[100, 200, 300]));
        let b = harness("{}", &weighted_backends(&[1, 2, 3]));
        assert_eq!(a.strategy().points.len(), 6 * 160);
        assert_eq!(a.strategy().points, b.strategy().points);
    }

    #[test]
    fn large_rings_are_capped() {
        let h = harness(r#"{"vnodes": 100}"#, &weighted_backends(&[1000; 20]));
        let len = h.strategy().points.len() as u64;
        assert!(len <= MAX_POINTS + 20, "{len}");
        assert!(h.strategy().points.windows(2).all(|w| w[0] <= w[1]));
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
        let err = |cfg: &str| Harness::<RingHash>::new(cfg).unwrap_err();
        assert!(err(r#"{"vnode": 10}"#).contains("`vnode`"));
        assert!(err(r#"{"vnodes": 0}"#).contains("between 1 and"));
        assert!(err(r#"{"key": "header:"}"#).contains("needs a name"));
        assert!(err(r#"{"fallback": "first"}"#).contains("`fallback`"));
        assert!(Harness::<RingHash>::new(r#"{"key": "cookie:sid", "vnodes": 40}"#).is_ok());
    }
}
