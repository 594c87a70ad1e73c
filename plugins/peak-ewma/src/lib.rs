//! Latency-aware power of two choices, the built-in `builtin:peak-ewma` strategy.
//!
//! # Algorithm
//!
//! Like `builtin:p2c`, each request draws two distinct backends at random and takes the
//! cheaper one, but the cost also accounts for how fast each backend answers:
//!
//! ```text
//! cost(i) = latency_us(i) × (inflight(i) + 1) / weight(i)
//! ```
//!
//! `latency_us` is the host's exponentially weighted moving average of the backend's response
//! time, and `inflight + 1` estimates how long this request would queue behind the ones already
//! there, so the cost approximates the expected wait. A backend that slows down (GC pause,
//! noisy neighbour, cold cache) is avoided as soon as its average moves, before it starts
//! failing; this is the approach of Finagle's and Linkerd's "peak EWMA" balancers, with the
//! moving average maintained by the host rather than by each instance.
//!
//! - **Backends without a sample** (new, or never answered) have latency 0; they are costed
//!   at `default_latency_us` instead (1 µs unless configured), so they are attractive and get
//!   their first requests quickly, but their in-flight count still counts: a new backend is not
//!   flooded with every request until its first response arrives.
//! - **Exact comparison** in 128-bit integers: no floating point decides a pick.
//! - **Retries** draw both candidates from the backends the request has not tried.
//! - One `random_u64`, two `backend_inflight` and two `backend_latency_us` host calls per pick,
//!   whatever the pool size; no allocation per pick.
//! - A weight of 0 (which the host does not send) counts as 1.
//!
//! # Configuration
//!
//! | key | type | default | meaning |
//! |---|---|---|---|
//! | `default_latency_us` | integer ≥ 1 | `1` | latency assumed for a backend with no sample yet |
//!
//! Any other key is refused.
//!
//! ```toml
//! strategy = { plugin = "builtin:peak-ewma", config = { default_latency_us = 500 } }
//! ```

// The candidate draw is shared with `builtin:p2c`. Included by path, not by depending on the
// p2c crate, because that dependency would link p2c's wasm exports into this plugin too.
#[path = "../../p2c/src/choices.rs"]
mod choices;

use choices::Choices;
use sluice_sdk::{Backends, Config, ConfigError, Request, Strategy};

/// Power of two choices on `latency × (inflight + 1) / weight`.
#[derive(Debug)]
pub struct PeakEwma {
    default_latency_us: u64,
    choices: Choices,
}

/// Upper bound of `default_latency_us`: an hour. Anything larger is surely a unit mistake.
const MAX_DEFAULT_LATENCY_US: u64 = 3_600_000_000;

impl PeakEwma {
    /// The numerator of backend `i`'s cost, `latency × (inflight + 1)`. Out-of-range answers
    /// (which the host does not give for a pushed index) count as very expensive.
    fn cost(default_latency_us: u64, backends: &Backends, i: usize) -> u128 {
        let latency = match backends.latency_us(i) {
            Some(0) => default_latency_us,
            Some(us) => us,
            None => u64::from(u32::MAX),
        };
        let load = backends.inflight(i).map_or(u64::from(u32::MAX), u64::from) + 1;
        u128::from(latency) * u128::from(load)
    }
}

impl Strategy for PeakEwma {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown_keys(&["default_latency_us"])?;
        let default_latency_us = config.get_u64("default_latency_us")?.unwrap_or(1);
        if !(1..=MAX_DEFAULT_LATENCY_US).contains(&default_latency_us) {
            return Err(ConfigError::for_key(
                "default_latency_us",
                format!("must be between 1 and {MAX_DEFAULT_LATENCY_US} microseconds"),
            )
            .into());
        }
        Ok(PeakEwma {
            default_latency_us,
            choices: Choices::default(),
        })
    }

    fn on_backends(&mut self, backends: &Backends) {
        self.choices.on_backends(backends);
    }

    fn pick(&mut self, req: &mut Request, backends: &Backends) -> Option<usize> {
        // A cost is below 2^97 and a weight below 2^32: only nonsensical host values make
        // the comparison saturate.
        let default_latency_us = self.default_latency_us;
        self.choices
            .pick(req, |i| Self::cost(default_latency_us, backends, i))
    }
}

sluice_sdk::export_strategy!(PeakEwma);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::testing::{backends, weighted_backends, Harness, MockHost, TestRequest};

    fn harness(n: usize, config: &str) -> Harness<PeakEwma> {
        Harness::with_backends(config, &backends(n)).unwrap()
    }

    fn counts(h: &mut Harness<PeakEwma>, n: usize, picks: usize) -> Vec<usize> {
        let mut c = vec![0; n];
        for _ in 0..picks {
            c[h.pick(&TestRequest::new()).unwrap()] += 1;
        }
        c
    }

    #[test]
    fn avoids_the_slow_backend() {
        let mut h = harness(3, "{}");
        MockHost::set_latency_us(0, 1_000);
        MockHost::set_latency_us(1, 50_000);
        MockHost::set_latency_us(2, 1_200);
        let c = counts(&mut h, 3, 3000);
        assert_eq!(c[1], 0, "{c:?}");
        // 0 beats 2 on latency alone.
        assert!(c[0] > c[2], "{c:?}");
    }

    #[test]
    fn queueing_offsets_speed() {
        let mut h = harness(2, "{}");
        MockHost::set_latency_us(0, 1_000);
        MockHost::set_latency_us(1, 3_000);
        MockHost::set_inflight(0, 4); // 1000 × 5 = 5000 > 3000 × 1
        assert_eq!(counts(&mut h, 2, 20), [0, 20]);
        MockHost::set_inflight(0, 1); // 1000 × 2 = 2000 < 3000
        assert_eq!(counts(&mut h, 2, 20), [20, 0]);
    }

    #[test]
    fn unknown_latency_is_attractive_but_not_free() {
        let mut h = harness(2, r#"{"default_latency_us": 100}"#);
        MockHost::set_latency_us(0, 1_000);
        // Backend 1 has no sample: costed at 100 µs, so it wins while lightly loaded...
        MockHost::set_inflight(1, 3);
        assert_eq!(counts(&mut h, 2, 10), [0, 10]);
        // ...but not once its queue outweighs its assumed speed: 100 × 12 > 1000 × 1.
        MockHost::set_inflight(1, 11);
        assert_eq!(counts(&mut h, 2, 10), [10, 0]);
    }

    #[test]
    fn idle_equal_backends_spread() {
        let mut h = harness(4, "{}");
        let c = counts(&mut h, 4, 8000);
        assert!(c.iter().all(|&x| (x as i32 - 2000).abs() < 200), "{c:?}");
    }

    #[test]
    fn weight_divides_cost() {
        let mut h = Harness::<PeakEwma>::with_backends("{}", &weighted_backends(&[4, 1])).unwrap();
        MockHost::set_latency_us(0, 3_000); // 3000 / 4 = 750
        MockHost::set_latency_us(1, 1_000); // 1000 / 1
        assert_eq!(counts(&mut h, 2, 20), [20, 0]);
    }

    #[test]
    fn retries_and_small_tables() {
        let mut h = harness(4, "{}");
        MockHost::set_latency_us(2, 1);
        let req = TestRequest::new().attempt(1).exclude(2);
        for _ in 0..100 {
            assert_ne!(h.pick(&req), Some(2));
        }
        let mut tried = h.retries(&TestRequest::new());
        tried.sort_unstable();
        assert_eq!(tried, [0, 1, 2, 3]);
        let mut empty = harness(0, "{}");
        assert_eq!(empty.pick(&TestRequest::new()), None);
        let mut one = harness(1, "{}");
        assert_eq!(one.pick(&TestRequest::new()), Some(0));
        assert_eq!(one.pick(&TestRequest::new().attempt(1).exclude(0)), None);
    }

    #[test]
    fn config_is_strict() {
        let err = Harness::<PeakEwma>::new(r#"{"default_latency": 5}"#).unwrap_err();
        assert!(err.contains("`default_latency`"), "{err}");
        let err = Harness::<PeakEwma>::new(r#"{"default_latency_us": 0}"#).unwrap_err();
        assert!(err.contains("between 1 and"), "{err}");
        let err = Harness::<PeakEwma>::new(r#"{"default_latency_us": "1ms"}"#).unwrap_err();
        assert!(err.contains("non-negative integer"), "{err}");
    }
}
