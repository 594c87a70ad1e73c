//! Passive outlier detection, from real traffic: a backend with too many consecutive failures
//! (connect errors, 5xx) is ejected from its pool for a time that grows with each ejection,
//! unless that would eject more than the allowed share of the pool. Ejected backends come back
//! by themselves when their time is up. The pool applies these rules when a lease with a known
//! outcome ends and in [`crate::pool::Pool::maintain`]; this module holds the policy and its
//! arithmetic.

use std::time::Duration;

/// Outlier detection settings of a pool.
#[derive(Debug, Clone, PartialEq)]
pub struct OutlierPolicy {
    /// Off when false.
    pub enabled: bool,
    /// Consecutive failures that eject a backend.
    pub consecutive_failures: u32,
    /// First ejection time; the n-th ejection lasts n times this.
    pub base_ejection_time: Duration,
    /// Upper bound of one ejection.
    pub max_ejection_time: Duration,
    /// At most this percentage of the pool's members is ejected at once (at least one backend
    /// may always be ejected in a pool of two or more).
    pub max_ejected_percent: u32,
}

impl Default for OutlierPolicy {
    fn default() -> Self {
        OutlierPolicy {
            enabled: true,
            consecutive_failures: 5,
            base_ejection_time: Duration::from_secs(30),
            max_ejection_time: Duration::from_secs(300),
            max_ejected_percent: 50,
        }
    }
}

impl OutlierPolicy {
    /// True when `failures` consecutive failures call for an ejection.
    pub fn should_eject(&self, failures: u32) -> bool {
        self.enabled && failures >= self.consecutive_failures
    }

    /// How many of `members` backends may be ejected at once.
    pub fn cap(&self, members: usize) -> usize {
        let share = (members as u64 * u64::from(self.max_ejected_percent)) / 100;
        share.max(u64::from(members > 1)) as usize
    }

    /// How long the `n`-th ejection (1-based) lasts.
    pub fn ejection_time(&self, n: u32) -> Duration {
        self.base_ejection_time
            .saturating_mul(n)
            .min(self.max_ejection_time)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ejection_grows_and_is_capped() {
        let p = OutlierPolicy::default();
        assert_eq!(p.ejection_time(1), Duration::from_secs(30));
        assert_eq!(p.ejection_time(3), Duration::from_secs(90));
        assert_eq!(p.ejection_time(100), Duration::from_secs(300));
    }

    #[test]
    fn cap_allows_one_in_small_pools() {
        let p = OutlierPolicy::default();
        assert_eq!(p.cap(1), 0);
        assert_eq!(p.cap(2), 1);
        assert_eq!(p.cap(3), 1);
        assert_eq!(p.cap(10), 5);
        assert!(!p.should_eject(4));
        assert!(p.should_eject(5));
        let off = OutlierPolicy {
            enabled: false,
            ..p
        };
        assert!(!off.should_eject(50));
    }
}
