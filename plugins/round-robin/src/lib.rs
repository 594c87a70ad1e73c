//! The built-in round-robin strategy of sluice, written as an ordinary plugin.
//!
//! It is deliberately the smallest useful strategy, and a model for writing others:
//!
//! - **Pool-wide rotation.** Every worker thread runs its own instance, so a counter in the
//!   struct would rotate per thread, and with several threads two requests could land on the
//!   same backend back to back. Instead each pick takes a ticket from the pool's shared counter
//!   (`counter_add(0, 1)`), which is atomic across threads and instances and survives a plugin
//!   swap, so `ticket % n` is one exact global rotation.
//! - **Retries move on.** On a retry it walks forward from its ticket to the first backend this
//!   request has not tried yet, so a failing backend is not picked twice for one request.
//! - **Nothing per request but host calls.** No allocation and no formatting in `pick`; on the
//!   first attempt it makes a single host call.
//!
//! Weights are ignored: every backend in the table gets the same share. The table only holds
//! backends that may receive traffic, so unhealthy ones are already left out by the host.
//!
//! It takes no configuration; any key is refused so a typo does not pass silently.

use sluice_sdk::{counter_add, Backends, Config, Request, Strategy};

/// The shared counter this strategy rotates on.
const ROTATION_SLOT: u32 = 0;

/// Round-robin over the table in index order.
#[derive(Debug)]
pub struct RoundRobin;

impl Strategy for RoundRobin {
    fn init(config: &Config) -> Result<Self, String> {
        config.reject_unknown_keys(&[])?;
        Ok(RoundRobin)
    }

    fn pick(&mut self, req: &mut Request, backends: &Backends) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        // A valid slot cannot fail; `?` rather than `unwrap` keeps panic paths out of the module.
        let ticket = counter_add(ROTATION_SLOT, 1).ok()? as u64;
        // The ticket is a u64 before the modulo so a counter that wrapped past i64::MAX still
        // yields an index (the rotation skips once per 2^64 picks, which is harmless).
        let start = (ticket % n as u64) as usize;
        if req.attempt() == 0 {
            // Nothing is excluded on the first attempt: skip the host call.
            return Some(start);
        }
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| !req.is_excluded(i))
    }
}

sluice_sdk::export_strategy!(RoundRobin);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::testing::{backends, Harness, MockHost, TestRequest};

    fn harness(n: usize) -> Harness<RoundRobin> {
        Harness::with_backends("{}", &backends(n)).unwrap()
    }

    #[test]
    fn rotates_in_order() {
        let mut h = harness(3);
        let picks: Vec<_> = (0..7)
            .map(|_| h.pick(&TestRequest::new()).unwrap())
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2, 0]);
        assert_eq!(MockHost::counter(ROTATION_SLOT), 7);
    }

    #[test]
    fn rotation_is_shared_between_instances() {
        // Two instances (two worker threads in the proxy) share the pool's counter, so they
        // interleave into one rotation instead of each starting at 0.
        let mut a = harness(4);
        let mut b = Harness::<RoundRobin>::new("{}").unwrap();
        MockHost::set_counter(ROTATION_SLOT, 1); // `new` reset the mock; pretend `a` ran once
        b.set_backends(&backends(4));
        let req = TestRequest::new();
        assert_eq!(
            [b.pick(&req), a.pick(&req), b.pick(&req)],
            [Some(1), Some(2), Some(3)]
        );
    }

    #[test]
    fn empty_table_has_no_backend() {
        let mut h = harness(0);
        assert_eq!(h.pick(&TestRequest::new()), None);
        assert_eq!(h.pick(&TestRequest::new().attempt(1)), None);
    }

    #[test]
    fn retries_skip_tried_backends() {
        let mut h = harness(4);
        // The ticket points at 1 and 1 was tried: move on to 2.
        MockHost::set_counter(ROTATION_SLOT, 1);
        assert_eq!(h.pick(&TestRequest::new().attempt(1).exclude(1)), Some(2));
        // Wraps around the end of the table.
        MockHost::set_counter(ROTATION_SLOT, 3);
        assert_eq!(
            h.pick(&TestRequest::new().attempt(2).exclude(3).exclude(0)),
            Some(1)
        );
        // Everything tried: no backend.
        let all = (0..4).fold(TestRequest::new().attempt(4), TestRequest::exclude);
        assert_eq!(h.pick(&all), None);
    }

    #[test]
    fn a_request_tries_every_backend_once() {
        let mut h = harness(5);
        let mut tried = h.retries(&TestRequest::new());
        assert_eq!(tried.len(), 5);
        tried.sort_unstable();
        assert_eq!(tried, [0, 1, 2, 3, 4]);
    }

    #[test]
    fn survives_counter_wrap() {
        let mut h = harness(3);
        MockHost::set_counter(ROTATION_SLOT, -1); // u64::MAX as a ticket
        let first = h.pick(&TestRequest::new()).unwrap();
        assert_eq!(first, (u64::MAX % 3) as usize);
        assert!(h.pick(&TestRequest::new()).unwrap() < 3);
    }

    #[test]
    fn follows_table_changes() {
        let mut h = harness(2);
        assert_eq!(h.pick(&TestRequest::new()), Some(0));
        h.set_backends(&backends(5));
        assert_eq!(h.pick(&TestRequest::new()), Some(1));
        assert_eq!(h.pick(&TestRequest::new()), Some(2));
    }

    #[test]
    fn refuses_configuration() {
        let err = Harness::<RoundRobin>::new(r#"{"weights": true}"#).unwrap_err();
        assert!(
            err.contains("`weights`") && err.contains("no configuration"),
            "{err}"
        );
    }
}
