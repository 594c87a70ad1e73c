//! Small building blocks that several strategies need in the same form: effective weights,
//! uniform draws, a cheap local random stream and a visited set for retry walks.
//!
//! They are here rather than in each plugin so that every strategy rounds, draws and walks
//! the same way: a fix or an optimisation lands in all of them at once.
//!
//! ```
//! use sluice_sdk::select::{scale, SplitMix64, Visited};
//!
//! // The high half of `x × range`: uniform in `0..range` for a uniform `x`.
//! assert_eq!(scale(u64::MAX, 10), 9);
//! assert_eq!(scale(0, 10), 0);
//!
//! let mut rng = SplitMix64::new(7);
//! assert_ne!(rng.next_u64(), rng.next_u64());
//!
//! let mut seen = Visited::new(3);
//! seen.clear();
//! assert!(seen.insert(2));
//! assert!(!seen.insert(2), "already visited in this walk");
//! seen.clear();
//! assert!(!seen.contains(2), "a new walk starts empty");
//! ```

use crate::{random_u64, Backends};

/// Each backend's weight widened to `u64`, with 0 counted as 1.
///
/// The host never sends a weight of 0, but a plugin must not trust that blindly: a zero
/// weight would divide by zero or drop a backend from every draw.
pub fn weights(backends: &Backends) -> Vec<u64> {
    backends
        .iter()
        .map(|b| u64::from(b.weight().max(1)))
        .collect()
}

/// Maps `x` onto `0..range` by taking the high half of the 128-bit product `x × range`
/// (Lemire's multiply-shift): uniform for a uniform `x`, with a bias below `range / 2^64`,
/// and no division. `range` 0 gives 0.
pub fn scale(x: u64, range: u64) -> u64 {
    ((u128::from(x) * u128::from(range)) >> 64) as u64
}

/// A uniform draw from `0..range` with one [`random_u64`] host call; see [`scale`].
pub fn random_below(range: u64) -> u64 {
    scale(random_u64(), range)
}

/// SplitMix64, a tiny non-cryptographic generator.
///
/// Seeded from one [`random_u64`] host call, it supplies the further draws of a single pick
/// locally, instead of one host call per draw. The SDK's mock host uses it too.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SplitMix64(u64);

impl SplitMix64 {
    /// A generator starting from `seed`.
    pub const fn new(seed: u64) -> Self {
        SplitMix64(seed)
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// A draw from `0..range`; see [`scale`].
    pub fn next_below(&mut self, range: u64) -> u64 {
        scale(self.next_u64(), range)
    }
}

/// The set of backend indices already visited by one retry walk, for walks over a list in
/// which a backend recurs (a ring, a lookup table, a weighted sequence): each backend then
/// costs at most one [`Request::is_excluded`](crate::Request::is_excluded) host call per pick
/// however often it recurs, and the walk can stop once every backend was seen.
///
/// Size it in `on_backends`; [`clear`](Visited::clear) is O(1) (it moves to a new epoch
/// instead of wiping the set), so picks neither allocate nor pay per backend to start a walk.
#[derive(Clone, Debug, Default)]
pub struct Visited {
    /// `stamps[i] == epoch` means index `i` was visited in the current walk.
    stamps: Vec<u32>,
    epoch: u32,
    count: usize,
}

impl Visited {
    /// An empty set for indices `0..n`.
    pub fn new(n: usize) -> Self {
        Visited {
            stamps: vec![0; n],
            epoch: 1,
            count: 0,
        }
    }

    /// Empties the set to start a new walk.
    pub fn clear(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        if self.epoch == 0 {
            // Stamps from 2^32 walks ago would look current: clear them once per wrap.
            self.stamps.fill(0);
            self.epoch = 1;
        }
        self.count = 0;
    }

    /// Marks `i` visited; `true` if it was not yet. Panics if `i` is not below `n`.
    pub fn insert(&mut self, i: usize) -> bool {
        if self.stamps[i] == self.epoch {
            return false;
        }
        self.stamps[i] = self.epoch;
        self.count += 1;
        true
    }

    /// `true` if `i` was visited in the current walk. Panics if `i` is not below `n`.
    pub fn contains(&self, i: usize) -> bool {
        self.stamps[i] == self.epoch
    }

    /// `true` once every index `0..n` was visited: the walk has nothing left to find.
    pub fn is_full(&self) -> bool {
        self.count == self.stamps.len()
    }
}
