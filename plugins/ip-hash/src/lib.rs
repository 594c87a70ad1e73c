//! Client-IP affinity, the built-in `builtin:ip-hash` strategy.
//!
//! # Algorithm
//!
//! The host hashes the client's IP address (`request.hash(Attr::ClientIp)`, no copy into the
//! plugin) and the hash, modulo the length of a weighted slot list, names the backend: the same
//! client keeps reaching the same backend while the table is unchanged, which keeps per-client
//! caches and in-memory sessions warm without cookies.
//!
//! - **Weighted slots, interleaved.** Backend `i` owns `weight(i)` slots (weights divided by
//!   their greatest common divisor, the sum scaled down proportionally above 4096 slots), laid
//!   out in smooth weighted round-robin order, so clients spread in proportion to weight.
//! - **Retries and failures walk forward** through the slot list to the first backend the
//!   request has not tried. Since the slots are interleaved, the clients of a failed backend
//!   spread over the others instead of all landing on its neighbour in table order. The walk
//!   is deterministic, so a retried client also keeps its second choice stable.
//! - **Not consistent hashing.** Adding or removing a backend remaps most clients (the list
//!   length changes), and so does any change of weight proportions, including every step of
//!   a slow-start ramp; when that matters use `builtin:ring-hash` or `builtin:maglev`, which
//!   move only about 1/n of the keys.
//! - A request without a client IP (e.g. arriving over a Unix socket) goes to a random slot.
//! - A weight of 0 (which the host does not send) counts as 1.
//!
//! # Configuration
//!
//! None; any key is refused so that a misspelt option is reported at load time.
//!
//! ```toml
//! strategy = "builtin:ip-hash"
//! ```

// The weighted, interleaved slot list and its retry walk are shared with
// `builtin:weighted-round-robin`. Included by path, not by depending on that crate, because the
// dependency would link its wasm exports into this plugin too.
#[path = "../../weighted-round-robin/src/sequence.rs"]
mod sequence;

use sequence::WeightedSequence;
use sluice_sdk::{random_u64, Attr, Backends, Config, Request, Strategy};

/// Hash of the client IP modulo a weighted slot list.
#[derive(Debug)]
pub struct IpHash {
    slots: WeightedSequence,
}

impl Strategy for IpHash {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown_keys(&[])?;
        Ok(IpHash {
            slots: WeightedSequence::default(),
        })
    }

    fn on_backends(&mut self, backends: &Backends) {
        self.slots.rebuild(backends);
    }

    fn pick(&mut self, req: &mut Request, _backends: &Backends) -> Option<usize> {
        if self.slots.len() == 0 {
            return None;
        }
        let h = req.hash(Attr::ClientIp).unwrap_or_else(random_u64);
        self.slots.pick_at(h, req)
    }
}

sluice_sdk::export_strategy!(IpHash);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::testing::{nth_client_ip as ip, weighted_backends, Harness, TestRequest};

    fn harness(weights: &[u32]) -> Harness<IpHash> {
        Harness::with_backends("{}", &weighted_backends(weights)).unwrap()
    }

    #[test]
    fn same_client_same_backend() {
        let mut h = harness(&[1, 1, 1, 1, 1]);
        for i in 0..50 {
            let req = TestRequest::new().client_ip(&ip(i));
            let first = h.pick(&req);
            assert!((0..20).all(|_| h.pick(&req) == first));
        }
    }

    #[test]
    fn clients_spread_by_weight() {
        let mut h = harness(&[1, 2, 5]);
        let mut c = [0; 3];
        let n = 16_000;
        for i in 0..n {
            c[h.pick(&TestRequest::new().client_ip(&ip(i))).unwrap()] += 1;
        }
        for (i, &w) in [1.0, 2.0, 5.0].iter().enumerate() {
            let expected = n as f64 * w / 8.0;
            assert!((c[i] as f64 - expected).abs() < 0.06 * expected, "{c:?}");
        }
    }

    #[test]
    fn hash_is_the_hosts_hash_of_the_ip() {
        let mut h = harness(&[1; 7]);
        let order = h.strategy().slots.order().to_vec();
        let expected = order[(sluice_sdk::hash_bytes(b"192.0.2.7") % 7) as usize] as usize;
        assert_eq!(
            h.pick(&TestRequest::new().client_ip("192.0.2.7")),
            Some(expected)
        );
    }

    #[test]
    fn retries_walk_forward_deterministically() {
        let mut h = harness(&[1, 1, 1, 1]);
        let req = TestRequest::new().client_ip("198.51.100.1");
        let home = h.pick(&req).unwrap();
        let retry = req.clone().attempt(1).exclude(home);
        let second = h.pick(&retry).unwrap();
        assert_ne!(second, home);
        assert_eq!(
            second,
            (home + 1) % 4,
            "equal weights: the next slot is the next backend"
        );
        assert_eq!(h.pick(&retry), Some(second), "stable second choice");
        let mut tried = h.retries(&req);
        tried.sort_unstable();
        assert_eq!(tried, [0, 1, 2, 3]);
    }

    #[test]
    fn missing_client_ip_goes_anywhere() {
        let mut h = harness(&[1, 1, 1, 1]);
        let req = TestRequest::new().without(Attr::ClientIp);
        let seen: std::collections::HashSet<_> = (0..100).map(|_| h.pick(&req).unwrap()).collect();
        assert!(seen.len() > 1);
    }

    #[test]
    fn empty_and_single_tables() {
        let mut h = harness(&[]);
        assert_eq!(h.pick(&TestRequest::new()), None);
        h.set_backends(&weighted_backends(&[9]));
        assert_eq!(h.pick(&TestRequest::new()), Some(0));
        assert_eq!(h.pick(&TestRequest::new().attempt(1).exclude(0)), None);
    }

    #[test]
    fn refuses_configuration() {
        assert!(Harness::<IpHash>::new(r#"{"key": "path"}"#)
            .unwrap_err()
            .contains("`key`"));
    }
}
