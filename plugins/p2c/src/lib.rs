//! Power of two choices on in-flight requests, the built-in `builtin:p2c` strategy.
//!
//! # Algorithm
//!
//! For each request draw two distinct backends uniformly at random and send the request to the
//! less loaded one, where load is `(inflight + 1) / weight`: the share of its capacity the
//! backend would be using *with* this request. Two random choices already make the maximum
//! load exponentially better than one (Mitzenmacher's "power of two choices"), while a pick
//! costs two `backend_inflight` host calls whatever the pool size, so it scales where
//! `builtin:least-connections` (which reads every backend) does not. Because different threads
//! draw different pairs, it also avoids the herd effect of everyone sending to the one
//! least-loaded backend at once.
//!
//! - **Weights.** The `+ 1` makes weights count even when the pool is idle: between two idle
//!   backends the heavier one wins, and equal candidates are decided by the random draw order.
//!   A consequence worth knowing: with unequal weights and requests that never overlap, the
//!   lightest backend only wins against equally light ones, so under very low concurrency the
//!   traffic leans towards heavy backends; once requests overlap, loads settle in proportion
//!   to weight.
//! - **Retries** draw both candidates from the backends the request has not tried; with one
//!   left it is the pick, with none there is no backend.
//! - One `random_u64` host call per pick supplies both draws; no allocation per pick.
//! - A weight of 0 (which the host does not send) counts as 1.
//!
//! # Configuration
//!
//! None; any key is refused so that a misspelt option is reported at load time.
//!
//! ```toml
//! strategy = "builtin:p2c"
//! ```

mod choices;

use choices::Choices;
use sluice_sdk::{Backends, Config, Request, Strategy};

/// Power of two choices on `(inflight + 1) / weight`.
#[derive(Debug, Default)]
pub struct P2c {
    choices: Choices,
}

impl P2c {
    /// `(inflight + 1)` of backend `i`; an index the host does not know counts as heavily
    /// loaded rather than being trusted.
    fn load(backends: &Backends, i: usize) -> u64 {
        backends.inflight(i).map_or(u64::from(u32::MAX), u64::from) + 1
    }
}

impl Strategy for P2c {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown_keys(&[])?;
        Ok(P2c::default())
    }

    fn on_backends(&mut self, backends: &Backends) {
        self.choices.on_backends(backends);
    }

    fn pick(&mut self, req: &mut Request, backends: &Backends) -> Option<usize> {
        // Loads and weights are below 2^33 and 2^32, so the products never saturate.
        self.choices
            .pick(req, |i| u128::from(Self::load(backends, i)))
    }
}

sluice_sdk::export_strategy!(P2c);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::testing::{weighted_backends, Harness, MockHost, TestRequest};

    fn harness(weights: &[u32]) -> Harness<P2c> {
        Harness::with_backends("{}", &weighted_backends(weights)).unwrap()
    }

    #[test]
    fn idle_equal_backends_spread_uniformly() {
        let mut h = harness(&[1, 1, 1, 1]);
        let mut c = [0i32; 4];
        for _ in 0..8000 {
            c[h.pick(&TestRequest::new()).unwrap()] += 1;
        }
        // Expected 2000 each; sd ≈ 39.
        assert!(c.iter().all(|&x| (x - 2000).abs() < 200), "{c:?}");
    }

    #[test]
    fn the_most_loaded_backend_is_never_chosen() {
        // Of any two distinct candidates, the busiest backend always loses.
        let mut h = harness(&[1, 1, 1, 1]);
        MockHost::set_inflight(2, 50);
        MockHost::set_inflight(0, 3);
        let mut c = [0; 4];
        for _ in 0..3000 {
            c[h.pick(&TestRequest::new()).unwrap()] += 1;
        }
        assert_eq!(c[2], 0, "{c:?}");
        // Backend 0 wins only against 2: 1/6 of pairs, each pair drawn in two orders.
        assert!(c[0] > 300 && c[0] < 700, "{c:?}");
    }

    #[test]
    fn load_is_relative_to_weight() {
        let mut h = harness(&[4, 1]);
        MockHost::set_inflight(0, 5); // (5+1)/4 = 1.5
        MockHost::set_inflight(1, 1); // (1+1)/1 = 2
        for _ in 0..20 {
            assert_eq!(h.pick(&TestRequest::new()), Some(0));
        }
        MockHost::set_inflight(0, 8); // 9/4 = 2.25
        for _ in 0..20 {
            assert_eq!(h.pick(&TestRequest::new()), Some(1));
        }
    }

    #[test]
    fn retries_choose_among_untried_backends() {
        let mut h = harness(&[1, 1, 1, 1, 1]);
        for _ in 0..200 {
            let req = TestRequest::new().attempt(2).exclude(1).exclude(3);
            let i = h.pick(&req).unwrap();
            assert!(i != 1 && i != 3);
        }
        let one_left = (0..4).fold(TestRequest::new().attempt(4), TestRequest::exclude);
        assert_eq!(h.pick(&one_left), Some(4));
        assert_eq!(h.pick(&one_left.exclude(4)), None);
        let mut tried = h.retries(&TestRequest::new());
        tried.sort_unstable();
        assert_eq!(tried, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn empty_and_single_tables() {
        let mut h = harness(&[]);
        assert_eq!(h.pick(&TestRequest::new()), None);
        h.set_backends(&weighted_backends(&[1]));
        assert_eq!(h.pick(&TestRequest::new()), Some(0));
        assert_eq!(h.pick(&TestRequest::new().attempt(1).exclude(0)), None);
    }

    #[test]
    fn candidates_are_distinct_and_cover_the_table() {
        let mut h = harness(&[1, 1]);
        // With two backends both are always candidates: the less loaded always wins.
        MockHost::set_inflight(0, 1);
        for _ in 0..50 {
            assert_eq!(h.pick(&TestRequest::new()), Some(1));
        }
    }

    #[test]
    fn refuses_configuration() {
        assert!(Harness::<P2c>::new(r#"{"choices": 3}"#)
            .unwrap_err()
            .contains("`choices`"));
    }
}
