//! The power-of-two-choices pick shared by `p2c` and `peak-ewma`: draw two distinct untried
//! candidates, keep the one with the lower cost per unit of weight. The strategies differ only
//! in what a backend's cost is.
//!
//! `peak-ewma` includes this file with `#[path]` rather than depending on this crate, because a
//! dependency on a plugin crate would link that plugin's wasm exports into the dependent plugin
//! as well.

use sluice_sdk::select::{self, scale};
use sluice_sdk::{random_u64, Backends, Request};

/// Two distinct candidates drawn uniformly from the backends a request has not tried yet, and
/// the weights to compare them by.
#[derive(Debug, Default)]
pub struct Choices {
    /// Effective weight per backend (0 counted as 1).
    weights: Vec<u64>,
    /// Retry scratch: the untried indices. Sized on table changes so retries do not allocate.
    untried: Vec<u32>,
}

/// Two uniform draws from one 64-bit random number: the high half of `r × n` is uniform in
/// `0..n` and the low half is again a uniform fraction, which the second draw scales onto
/// `0..n-1` (Lemire's multiply-shift, applied twice). One host call instead of two; each draw
/// is biased by less than `n / 2^64`.
fn two_draws(n: u64) -> (u64, u64) {
    let r = random_u64();
    (scale(r, n), scale(r.wrapping_mul(n), n - 1))
}

/// Two distinct positions in `0..m` in random order, `(0, None)` for `m == 1`, `None` for 0.
fn pair(m: usize) -> Option<(usize, Option<usize>)> {
    match m {
        0 => None,
        1 => Some((0, None)),
        _ => {
            let (a, b) = two_draws(m as u64);
            // `b` is drawn from m-1 values: shift past `a` to make it distinct.
            let b = if b >= a { b + 1 } else { b };
            Some((a as usize, Some(b as usize)))
        }
    }
}

impl Choices {
    /// Takes the weights of a new table and sizes the scratch space for it.
    pub fn on_backends(&mut self, backends: &Backends) {
        self.weights = select::weights(backends);
        self.untried = Vec::with_capacity(backends.len());
    }

    /// The candidates for `req`: two distinct untried indices in random order, `(i, None)`
    /// when only one is left untried, `None` when none is.
    pub fn draw(&mut self, req: &Request) -> Option<(usize, Option<usize>)> {
        let n = self.weights.len();
        if req.attempt() == 0 {
            return pair(n);
        }
        self.untried.clear();
        self.untried
            .extend((0..n).filter(|&i| !req.is_excluded(i)).map(|i| i as u32));
        let (a, b) = pair(self.untried.len())?;
        let untried = &self.untried;
        Some((untried[a] as usize, b.map(|b| untried[b] as usize)))
    }

    /// The pick for `req`: of the two candidates, the one with the lower `cost / weight`; the
    /// first drawn on a tie. `cost` is asked for the first candidate, then the second.
    ///
    /// `cost_a / wa <= cost_b / wb` is compared as `cost_a·wb <= cost_b·wa` in integers, so no
    /// rounding decides a pick. Products saturate: real costs are far below 2^64, but a cost
    /// built from nonsensical host values could overflow u128 times a weight, and saturating
    /// keeps the comparison total instead of panicking.
    pub fn pick(&mut self, req: &Request, mut cost: impl FnMut(usize) -> u128) -> Option<usize> {
        let (a, b) = match self.draw(req)? {
            (a, None) => return Some(a),
            (a, Some(b)) => (a, b),
        };
        let (ca, cb) = (cost(a), cost(b));
        let (wa, wb) = (u128::from(self.weights[a]), u128::from(self.weights[b]));
        if ca.saturating_mul(wb) <= cb.saturating_mul(wa) {
            Some(a)
        } else {
            Some(b)
        }
    }
}
