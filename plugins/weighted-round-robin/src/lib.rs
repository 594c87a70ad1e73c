//! Smooth weighted round-robin, the built-in `builtin:weighted-round-robin` strategy.
//!
//! # Algorithm
//!
//! Each backend receives requests in proportion to its weight, *interleaved* the way nginx
//! does it rather than in bursts: weights 5, 1, 1 for backends a, b, c give the cycle
//! `a a b a c a a`, not `a a a a a b c`. A burst would hand a heavy backend several requests
//! back to back and leave the light ones idle meanwhile.
//!
//! - **One exact pool-wide cycle.** Every worker thread runs its own instance, so the usual
//!   per-instance "current weight" state would produce one interleaving per thread and, summed
//!   over threads, bursts again. Instead the full cycle (length = sum of weights) is computed
//!   once per table change in `on_backends`, and each pick indexes it with a ticket from the
//!   pool's shared counter: `sequence[counter_add(0, 1) % len]`. That is one global sequence
//!   across all threads, and the pick itself is an array read.
//! - **Bounded precomputation.** Weights are divided by their greatest common divisor (only
//!   proportions matter, and the host's slow start scales all weights by 100); if they still
//!   sum to more than 4096 they are scaled down proportionally (every backend keeps at least
//!   one slot), which bounds memory and the build time of the cycle while keeping the
//!   proportions to within 1/4096.
//! - **Retries move on.** On a retry the pick walks forward through the cycle to the first
//!   backend the request has not tried yet; since the cycle is interleaved, the retries of a
//!   failing backend spread over the others in weight order.
//! - **Weights are effective weights.** The host already multiplies the configured weight by
//!   a health factor; a backend that is recovering gets a smaller share until it is healthy.
//!
//! It shares counter slot 0 with `builtin:round-robin`, so swapping between the two continues
//! the rotation instead of restarting it.
//!
//! # Configuration
//!
//! None; any key is refused so that a misspelt option is reported at load time.
//!
//! ```toml
//! [[pool]]
//! name = "web"
//! strategy = "builtin:weighted-round-robin"
//! backends = [{ addr = "10.0.0.1:80", weight = 5 }, { addr = "10.0.0.2:80" }]
//! ```

mod sequence;

use sequence::WeightedSequence;
use sluice_sdk::{counter_add, Backends, Config, Request, Strategy};

/// The shared counter this strategy takes tickets from (the same one round-robin uses).
const ROTATION_SLOT: u32 = 0;

/// Smooth weighted round-robin over a precomputed pool-wide cycle.
#[derive(Debug)]
pub struct WeightedRoundRobin {
    sequence: WeightedSequence,
}

impl Strategy for WeightedRoundRobin {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown_keys(&[])?;
        Ok(WeightedRoundRobin {
            sequence: WeightedSequence::default(),
        })
    }

    fn on_backends(&mut self, backends: &Backends) {
        self.sequence.rebuild(backends);
    }

    fn pick(&mut self, req: &mut Request, _backends: &Backends) -> Option<usize> {
        if self.sequence.len() == 0 {
            return None;
        }
        // The ticket is read as u64 so a counter that wrapped past i64::MAX still indexes the
        // cycle (one skipped step per 2^64 picks is harmless).
        let ticket = counter_add(ROTATION_SLOT, 1).ok()? as u64;
        self.sequence.pick_at(ticket, req)
    }
}

sluice_sdk::export_strategy!(WeightedRoundRobin);

#[cfg(test)]
mod tests {
    use super::*;
    use sequence::{scaled_weights, smooth_order};
    use sluice_sdk::testing::{weighted_backends, Harness, MockHost, TestRequest};

    fn harness(weights: &[u32]) -> Harness<WeightedRoundRobin> {
        Harness::with_backends("{}", &weighted_backends(weights)).unwrap()
    }

    fn picks(h: &mut Harness<WeightedRoundRobin>, n: usize) -> Vec<usize> {
        (0..n)
            .map(|_| h.pick(&TestRequest::new()).unwrap())
            .collect()
    }

    #[test]
    fn interleaves_like_nginx() {
        let mut h = harness(&[5, 1, 1]);
        assert_eq!(
            picks(&mut h, 14),
            [0, 0, 1, 0, 2, 0, 0, 0, 0, 1, 0, 2, 0, 0]
        );
    }

    #[test]
    fn shares_follow_weights_exactly_per_cycle() {
        let weights = [3, 1, 4, 2];
        let mut h = harness(&weights);
        let mut counts = [0; 4];
        for i in picks(&mut h, 10 * 7) {
            counts[i] += 1;
        }
        assert_eq!(counts, [21, 7, 28, 14]);
    }

    #[test]
    fn equal_weights_are_plain_round_robin() {
        let mut h = harness(&[2, 2, 2]);
        assert_eq!(picks(&mut h, 6), [0, 1, 2, 0, 1, 2]);
    }

    #[test]
    fn cycle_is_shared_between_instances() {
        // A second instance continues the first one's position in the one pool-wide cycle.
        let mut a = harness(&[5, 1, 1]);
        let mut b = harness(&[5, 1, 1]);
        MockHost::set_counter(ROTATION_SLOT, 2); // `new` reset the mock; pretend 2 picks ran
        let req = TestRequest::new();
        assert_eq!(
            [a.pick(&req), b.pick(&req), a.pick(&req)],
            [Some(1), Some(0), Some(2)]
        );
    }

    #[test]
    fn retries_walk_forward_past_tried_backends() {
        let mut h = harness(&[5, 1, 1]);
        // Position 0 is backend 0, which failed: the next slot is 0 again, then 1.
        MockHost::set_counter(ROTATION_SLOT, 0);
        assert_eq!(h.pick(&TestRequest::new().attempt(1).exclude(0)), Some(1));
        MockHost::set_counter(ROTATION_SLOT, 5); // slots 5, 6 are backend 0, then wraps to 0, 0, 1
        assert_eq!(
            h.pick(&TestRequest::new().attempt(2).exclude(0).exclude(1)),
            Some(2)
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
        h.set_backends(&weighted_backends(&[7]));
        assert_eq!(picks(&mut h, 5), [0; 5]);
        assert_eq!(h.pick(&TestRequest::new().attempt(1).exclude(0)), None);
    }

    #[test]
    fn zero_weight_counts_as_one() {
        let mut h = harness(&[0, 1]);
        let mut seen = picks(&mut h, 4);
        seen.sort_unstable();
        assert_eq!(seen, [0, 0, 1, 1]);
    }

    #[test]
    fn large_weights_are_scaled_down_keeping_proportions() {
        let weights = [100_000, 50_000, 1];
        let h = harness(&weights);
        let len = h.strategy().sequence.len();
        assert!(len <= 4096 + weights.len(), "{len}");
        let scaled = scaled_weights(h.backends(), 4096);
        assert_eq!(scaled[0], 2 * scaled[1] + (scaled[0] % 2)); // 2:1 up to rounding
        assert_eq!(scaled[2], 1, "a tiny weight keeps one slot");
        let order = h.strategy().sequence.order();
        assert!(order.contains(&2));
    }

    #[test]
    fn only_weight_proportions_matter() {
        // The host's slow start scales every weight by 100: same cycle as 5, 1, 1.
        let mut h = harness(&[500, 100, 100]);
        assert_eq!(h.strategy().sequence.len(), 7);
        assert_eq!(picks(&mut h, 7), [0, 0, 1, 0, 2, 0, 0]);
    }

    #[test]
    fn smooth_order_never_repeats_a_backend_more_than_needed() {
        // Equal weights never produce a backend twice in a row.
        let order = smooth_order(&[3, 3, 3]);
        assert!(order.windows(2).all(|w| w[0] != w[1]), "{order:?}");
    }

    #[test]
    fn follows_table_changes() {
        let mut h = harness(&[1, 1]);
        picks(&mut h, 3);
        h.set_backends(&weighted_backends(&[1, 1, 1, 1]));
        assert!(picks(&mut h, 8).iter().all(|&i| i < 4));
    }

    #[test]
    fn refuses_configuration() {
        let err = Harness::<WeightedRoundRobin>::new(r#"{"weights": [1]}"#).unwrap_err();
        assert!(err.contains("`weights`"), "{err}");
    }
}
