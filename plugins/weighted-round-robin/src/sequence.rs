//! The interleaved weighted sequence shared by `weighted-round-robin` and `ip-hash`.
//!
//! Both strategies map a number (a ticket from the shared counter, or a hash of the client IP)
//! onto a list in which backend `i` appears in proportion to its weight, and both walk forward
//! through that list on a retry. The list is the smooth weighted round-robin order (nginx's
//! algorithm), so neighbouring slots belong to different backends as far as the weights allow:
//! walking forward from a failed backend spreads its retries over the others instead of piling
//! them onto the next backend in table order.
//!
//! `ip-hash` includes this file with `#[path]` rather than depending on this crate, because a
//! dependency on a plugin crate would link that plugin's wasm exports into the dependent plugin
//! as well.

use sluice_sdk::select::{self, Visited};
use sluice_sdk::{Backends, Request};

/// Longest sequence built. A sum of weights above it is scaled down proportionally (every
/// backend keeps at least one slot), which bounds both memory and the O(len × n) build.
pub const MAX_SEQUENCE: u64 = 4096;

/// Greatest common divisor.
fn gcd(mut a: u64, mut b: u64) -> u64 {
    while b != 0 {
        (a, b) = (b, a % b);
    }
    a
}

/// Weights as the strategies use them: 0 (which the host does not send, but a plugin must not
/// trust blindly) counts as 1; all are divided by their greatest common divisor, so only the
/// proportions count (the host's slow start scales every weight by 100, which would otherwise
/// make the sequence 100 times longer); and a sum still above `cap` is scaled down
/// proportionally with every backend keeping at least 1.
pub fn scaled_weights(backends: &Backends, cap: u64) -> Vec<u32> {
    let mut raw = select::weights(backends);
    let divisor = raw.iter().fold(0, |g, &w| gcd(g, w)).max(1);
    for w in &mut raw {
        *w /= divisor;
    }
    let total: u64 = raw.iter().sum();
    if total <= cap {
        return raw.iter().map(|&w| w as u32).collect();
    }
    raw.iter()
        .map(|&w| ((w * cap / total).max(1)) as u32)
        .collect()
}

/// The smooth weighted round-robin order of `weights` (all >= 1), one full cycle: each step
/// adds every backend's weight to its running score, takes the highest score (lowest index on
/// a tie) and subtracts the total from it. Weights 5, 1, 1 give `0 0 1 0 2 0 0`.
pub fn smooth_order(weights: &[u32]) -> Vec<u32> {
    let total: i64 = weights.iter().map(|&w| i64::from(w)).sum();
    let mut current = vec![0i64; weights.len()];
    let mut order = Vec::with_capacity(usize::try_from(total).unwrap_or(0));
    for _ in 0..total {
        let mut best = 0;
        for (i, &w) in weights.iter().enumerate() {
            current[i] += i64::from(w);
            if current[i] > current[best] {
                best = i;
            }
        }
        current[best] -= total;
        order.push(best as u32);
    }
    order
}

/// A weighted sequence plus the scratch space for retry walks, rebuilt on every table change
/// so that picks allocate nothing.
#[derive(Debug, Default)]
pub struct WeightedSequence {
    order: Vec<u32>,
    /// Backends already checked during the current walk, so each costs at most one `excluded`
    /// host call per pick however often it recurs.
    visited: Visited,
}

impl WeightedSequence {
    /// Rebuilds the sequence for `backends`. Every backend gets at least one slot, so a walk
    /// over one full cycle visits every backend.
    pub fn rebuild(&mut self, backends: &Backends) {
        let cap = MAX_SEQUENCE.max(backends.len() as u64);
        self.order = smooth_order(&scaled_weights(backends, cap));
        self.visited = Visited::new(backends.len());
    }

    /// Length of one cycle (0 for an empty table).
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// The slots in order, for tests and diagnostics.
    #[allow(dead_code)] // used by the unit tests of one of the two including crates only
    pub fn order(&self) -> &[u32] {
        &self.order
    }

    /// The backend at position `pos` (taken modulo the cycle), or on a retry the first backend
    /// at or after it that `req` has not tried yet. `None` if the table is empty or every
    /// backend was tried.
    pub fn pick_at(&mut self, pos: u64, req: &Request) -> Option<usize> {
        let len = self.order.len();
        if len == 0 {
            return None;
        }
        let start = (pos % len as u64) as usize;
        if req.attempt() == 0 {
            // Nothing is excluded on the first attempt: no host call at all.
            return Some(self.order[start] as usize);
        }
        self.visited.clear();
        for k in 0..len {
            let i = self.order[(start + k) % len] as usize;
            if !self.visited.insert(i) {
                continue;
            }
            if !req.is_excluded(i) {
                return Some(i);
            }
            if self.visited.is_full() {
                break; // every backend was tried
            }
        }
        None
    }
}
