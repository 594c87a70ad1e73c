//! Drawing the two candidates of a power-of-two-choices pick; shared by `p2c` and `peak-ewma`.
//!
//! `peak-ewma` includes this file with `#[path]` rather than depending on this crate, because a
//! dependency on a plugin crate would link that plugin's wasm exports into the dependent plugin
//! as well.

use sluice_sdk::{random_u64, Request};

/// Two distinct candidates drawn uniformly from the backends a request has not tried yet.
#[derive(Debug, Default)]
pub struct Choices {
    /// Retry scratch: the untried indices. Sized on table changes so retries do not allocate.
    untried: Vec<u32>,
}

/// Two uniform draws from one 64-bit random number: the high half of `r × n` is uniform in
/// `0..n` and the low half is again a uniform fraction, which the second draw scales onto
/// `0..n-1` (Lemire's multiply-shift, applied twice). One host call instead of two; each draw
/// is biased by less than `n / 2^64`.
fn two_draws(n: u64) -> (u64, u64) {
    let wide = u128::from(random_u64()) * u128::from(n);
    let first = (wide >> 64) as u64;
    let fraction = wide as u64;
    let second = ((u128::from(fraction) * u128::from(n - 1)) >> 64) as u64;
    (first, second)
}

impl Choices {
    /// Prepares the scratch space for a table of `n` backends.
    pub fn resize(&mut self, n: usize) {
        self.untried = Vec::with_capacity(n);
    }

    /// The candidates for `req` among `n` backends: two distinct untried indices in random
    /// order, `(i, None)` when only one is left untried, `None` when none is.
    pub fn draw(&mut self, req: &Request, n: usize) -> Option<(usize, Option<usize>)> {
        if req.attempt() == 0 {
            return match n {
                0 => None,
                1 => Some((0, None)),
                _ => {
                    let (a, b) = two_draws(n as u64);
                    // `b` is drawn from n-1 values: shift past `a` to make it distinct.
                    let b = if b >= a { b + 1 } else { b };
                    Some((a as usize, Some(b as usize)))
                }
            };
        }
        self.untried.clear();
        self.untried
            .extend((0..n).filter(|&i| !req.is_excluded(i)).map(|i| i as u32));
        match self.untried.len() {
            0 => None,
            1 => Some((self.untried[0] as usize, None)),
            m => {
                let (a, b) = two_draws(m as u64);
                let b = if b >= a { b + 1 } else { b };
                Some((
                    self.untried[a as usize] as usize,
                    Some(self.untried[b as usize] as usize),
                ))
            }
        }
    }
}
