//! Weighted random choice, the built-in `builtin:random` strategy.
//!
//! # Algorithm
//!
//! Each request goes to backend `i` with probability `weight(i) / total weight`, drawn
//! independently from the host's fast per-thread generator (`random_u64`). Independent draws
//! need no coordination between worker threads at all (no shared counter, no cache line bounced
//! between cores), which is why random is a good choice for very large pools and many threads;
//! the price is that shares are only proportional on average.
//!
//! - **Precomputed cumulative weights.** `on_backends` builds the running sums of the weights
//!   once per table change; a pick maps one random number onto `[0, total)` and finds its
//!   backend by binary search: O(log n), no allocation, one host call.
//! - **Retries are exact.** On a retry the backends this request already tried are removed
//!   from the draw and the remaining weight is redistributed, so the retry is again weighted
//!   random among the untried backends (not "redraw until lucky", which has no bound).
//! - A weight of 0 (which the host does not send) counts as 1.
//!
//! # Configuration
//!
//! None; any key is refused so that a misspelt option is reported at load time.
//!
//! ```toml
//! strategy = "builtin:random"
//! ```

use sluice_sdk::select::{self, random_below};
use sluice_sdk::{Backends, Config, Request, Strategy};

/// Weighted random over precomputed cumulative weights.
#[derive(Debug, Default)]
pub struct Random {
    /// `cumulative[i]` is the sum of the weights of backends `0..=i`.
    cumulative: Vec<u64>,
    /// Per-backend weight of the current table (0 counted as 1), for retries.
    weights: Vec<u64>,
    /// Retry scratch: `true` if backend `i` was tried by the current request.
    tried: Vec<bool>,
}

impl Strategy for Random {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown_keys(&[])?;
        Ok(Random::default())
    }

    fn on_backends(&mut self, backends: &Backends) {
        self.weights = select::weights(backends);
        let mut sum = 0;
        self.cumulative = self
            .weights
            .iter()
            .map(|&w| {
                sum += w;
                sum
            })
            .collect();
        self.tried = vec![false; backends.len()];
    }

    fn pick(&mut self, req: &mut Request, _backends: &Backends) -> Option<usize> {
        let total = *self.cumulative.last()?;
        if req.attempt() == 0 {
            let x = random_below(total);
            // The first backend whose running sum exceeds x owns the point x.
            return Some(self.cumulative.partition_point(|&c| c <= x));
        }
        // Retry: draw over the weight of the untried backends only.
        let mut remaining = 0;
        for (i, tried) in self.tried.iter_mut().enumerate() {
            *tried = req.is_excluded(i);
            if !*tried {
                remaining += self.weights[i];
            }
        }
        if remaining == 0 {
            return None;
        }
        let mut x = random_below(remaining);
        for (i, &w) in self.weights.iter().enumerate() {
            if self.tried[i] {
                continue;
            }
            if x < w {
                return Some(i);
            }
            x -= w;
        }
        // Unreachable: x < remaining, the sum of the untried weights walked above.
        None
    }
}

sluice_sdk::export_strategy!(Random);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::testing::{weighted_backends, Harness, MockHost, TestRequest};

    fn harness(weights: &[u32]) -> Harness<Random> {
        Harness::with_backends("{}", &weighted_backends(weights)).unwrap()
    }

    fn counts(h: &mut Harness<Random>, req: &TestRequest, n: usize, k: usize) -> Vec<usize> {
        let mut c = vec![0; k];
        for _ in 0..n {
            c[h.pick(req).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn shares_follow_weights() {
        let mut h = harness(&[1, 2, 3, 4]);
        let n = 20_000;
        let c = counts(&mut h, &TestRequest::new(), n, 4);
        for (i, &got) in c.iter().enumerate() {
            let expected = n as f64 * (i + 1) as f64 / 10.0;
            // 5 standard deviations of a binomial count: never flaky at the fixed mock seed,
            // and far tighter than any real bias would pass.
            let sd = (expected * (1.0 - (i + 1) as f64 / 10.0)).sqrt();
            assert!((got as f64 - expected).abs() < 5.0 * sd, "{c:?}");
        }
    }

    #[test]
    fn retries_redistribute_over_untried_backends() {
        let mut h = harness(&[1, 1, 2]);
        let req = TestRequest::new().attempt(1).exclude(2);
        let c = counts(&mut h, &req, 4000, 3);
        assert_eq!(c[2], 0);
        assert!(c[0] > 1700 && c[1] > 1700, "{c:?}");
        assert_eq!(
            h.pick(&TestRequest::new().attempt(2).exclude(0).exclude(2)),
            Some(1)
        );
        let all = TestRequest::new()
            .attempt(3)
            .exclude(0)
            .exclude(1)
            .exclude(2);
        assert_eq!(h.pick(&all), None);
        let mut tried = h.retries(&TestRequest::new());
        tried.sort_unstable();
        assert_eq!(tried, [0, 1, 2]);
    }

    #[test]
    fn empty_and_single_tables() {
        let mut h = harness(&[]);
        assert_eq!(h.pick(&TestRequest::new()), None);
        assert_eq!(h.pick(&TestRequest::new().attempt(1)), None);
        h.set_backends(&weighted_backends(&[3]));
        assert_eq!(counts(&mut h, &TestRequest::new(), 50, 1), [50]);
    }

    #[test]
    fn draws_depend_on_the_host_generator() {
        let mut h = harness(&[1; 8]);
        MockHost::seed_random(1);
        let a: Vec<_> = (0..16).map(|_| h.pick(&TestRequest::new())).collect();
        MockHost::seed_random(1);
        let b: Vec<_> = (0..16).map(|_| h.pick(&TestRequest::new())).collect();
        assert_eq!(a, b, "same seed, same draws");
        assert!(a.iter().collect::<std::collections::HashSet<_>>().len() > 3);
    }

    #[test]
    fn refuses_configuration() {
        assert!(Harness::<Random>::new(r#"{"seed": 1}"#)
            .unwrap_err()
            .contains("`seed`"));
    }
}
