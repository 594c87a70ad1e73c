//! Weighted least connections, the built-in `builtin:least-connections` strategy.
//!
//! # Algorithm
//!
//! Each request goes to the backend with the lowest `inflight / weight`: the fewest requests
//! in flight relative to its capacity. In-flight counts come from the host and are shared by
//! all worker threads, so every instance sees the same pool-wide load. Compared to round-robin
//! it adapts to backends that are slow or stuck: their requests pile up and they stop being
//! chosen.
//!
//! - **Exact comparison.** `a/wa < b/wb` is evaluated as `a·wb < b·wa` in 64-bit integers, so
//!   no floating point and no rounding decide a pick.
//! - **Ties are broken at random, in proportion to weight.** Ties are the common case when the
//!   pool is idle or lightly loaded (everyone at 0). Breaking them by table order would send all
//!   light traffic to backend 0; breaking them uniformly would ignore weights at low load.
//!   Weighted reservoir sampling over the tied backends makes an idle pool behave exactly like
//!   `builtin:random`. Only one host call (`random_u64`) seeds the draws of a pick, and only
//!   when a tie occurs.
//! - **Retries** skip backends the request already tried; if every backend was tried there is
//!   no backend.
//! - A pick makes one `backend_inflight` host call per backend, so it is O(n); for very large
//!   pools prefer `builtin:p2c`, which looks at two.
//! - A weight of 0 (which the host does not send) counts as 1.
//!
//! # Configuration
//!
//! None; any key is refused so that a misspelt option is reported at load time.
//!
//! ```toml
//! strategy = "builtin:least-connections"
//! ```

use sluice_sdk::select::{self, SplitMix64};
use sluice_sdk::{random_u64, Backends, Config, Request, Strategy};

/// Lowest in-flight per unit of weight, weighted-random among ties.
#[derive(Debug, Default)]
pub struct LeastConnections {
    /// Effective weight per backend (0 counted as 1), refreshed on every table change.
    weights: Vec<u64>,
}

impl Strategy for LeastConnections {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown_keys(&[])?;
        Ok(LeastConnections::default())
    }

    fn on_backends(&mut self, backends: &Backends) {
        self.weights = select::weights(backends);
    }

    fn pick(&mut self, req: &mut Request, backends: &Backends) -> Option<usize> {
        let retry = req.attempt() > 0;
        // (index, inflight, weight) of the best so far, and the weight of all backends tied
        // with it (for weighted reservoir sampling).
        let mut best: Option<(usize, u64, u64)> = None;
        let mut tied_weight = 0u64;
        // Seeded by one host draw on the first tie: cheap local randomness for the
        // tie-breaks of this pick, instead of one host call per tied backend.
        let mut draws: Option<SplitMix64> = None;
        for (i, &w) in self.weights.iter().enumerate() {
            if retry && req.is_excluded(i) {
                continue;
            }
            // Out of range cannot happen for an index of the pushed table; treat it as
            // maximally loaded rather than trusting it.
            let load = backends.inflight(i).map_or(u64::MAX >> 32, u64::from);
            match best {
                None => {
                    best = Some((i, load, w));
                    tied_weight = w;
                }
                Some((_, bl, bw)) => {
                    let (lhs, rhs) = (load * bw, bl * w);
                    if lhs < rhs {
                        best = Some((i, load, w));
                        tied_weight = w;
                    } else if lhs == rhs {
                        // Keep the incumbent with probability tied/(tied + w): over all ties
                        // each is chosen with probability weight / sum of tied weights.
                        tied_weight += w;
                        let d = draws.get_or_insert_with(|| SplitMix64::new(random_u64()));
                        if d.next_below(tied_weight) < w {
                            best = Some((i, load, w));
                        }
                    }
                }
            }
        }
        best.map(|(i, _, _)| i)
    }
}

sluice_sdk::export_strategy!(LeastConnections);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::testing::{weighted_backends, Harness, MockHost, TestRequest};

    fn harness(weights: &[u32]) -> Harness<LeastConnections> {
        Harness::with_backends("{}", &weighted_backends(weights)).unwrap()
    }

    #[test]
    fn picks_the_least_loaded() {
        let mut h = harness(&[1, 1, 1]);
        MockHost::set_inflight(0, 4);
        MockHost::set_inflight(1, 1);
        MockHost::set_inflight(2, 3);
        for _ in 0..20 {
            assert_eq!(h.pick(&TestRequest::new()), Some(1));
        }
    }

    #[test]
    fn load_is_relative_to_weight() {
        let mut h = harness(&[4, 1]);
        MockHost::set_inflight(0, 6); // 1.5 per unit of weight
        MockHost::set_inflight(1, 2); // 2 per unit
        assert_eq!(h.pick(&TestRequest::new()), Some(0));
        MockHost::set_inflight(0, 9); // 2.25 per unit
        assert_eq!(h.pick(&TestRequest::new()), Some(1));
    }

    #[test]
    fn ties_are_weighted_random() {
        let mut h = harness(&[1, 3]);
        let mut c = [0i32; 2];
        for _ in 0..8000 {
            c[h.pick(&TestRequest::new()).unwrap()] += 1;
        }
        // Expected 2000 / 6000; sd ≈ 39.
        assert!((c[0] - 2000).abs() < 200, "{c:?}");
        // Only equally loaded backends tie: a busier one is never chosen.
        let mut h3 = harness(&[1, 1, 1]);
        MockHost::set_inflight(1, 2);
        let picks: std::collections::HashSet<_> = (0..200)
            .map(|_| h3.pick(&TestRequest::new()).unwrap())
            .collect();
        assert_eq!(picks, [0, 2].into_iter().collect());
    }

    #[test]
    fn retries_skip_tried_backends() {
        let mut h = harness(&[1, 1, 1]);
        MockHost::set_inflight(0, 0);
        MockHost::set_inflight(1, 5);
        MockHost::set_inflight(2, 9);
        assert_eq!(h.pick(&TestRequest::new().attempt(1).exclude(0)), Some(1));
        assert_eq!(h.retries(&TestRequest::new()), [0, 1, 2]);
        let all = TestRequest::new()
            .attempt(3)
            .exclude(0)
            .exclude(1)
            .exclude(2);
        assert_eq!(h.pick(&all), None);
    }

    #[test]
    fn empty_and_single_tables() {
        let mut h = harness(&[]);
        assert_eq!(h.pick(&TestRequest::new()), None);
        h.set_backends(&weighted_backends(&[2]));
        MockHost::set_inflight(0, 100);
        assert_eq!(h.pick(&TestRequest::new()), Some(0));
    }

    #[test]
    fn refuses_configuration() {
        assert!(Harness::<LeastConnections>::new(r#"{"bias": 1}"#)
            .unwrap_err()
            .contains("`bias`"));
    }
}
