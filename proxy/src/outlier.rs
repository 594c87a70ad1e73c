//! Passive outlier detection, from real traffic: a backend with too many consecutive failures
//! (connect errors, 5xx) is ejected from its pool for a time that grows with each ejection,
//! unless that would eject more than the allowed share of the pool. Ejected backends come back
//! by themselves when their time is up ([`maintain`], run by a background ticker).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::now_ms;
use crate::pool::{Backend, Pool};

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

/// Called after every finished request to `backend`: ejects it when it crossed the threshold.
/// The common case is one atomic load.
pub fn after_request(pool: &Pool, backend: &Arc<Backend>) {
    let policy = pool.settings.load();
    let p = &policy.outlier;
    if !p.enabled || backend.stats.failures() < p.consecutive_failures {
        return;
    }
    pool.with_rebuild_lock(|| {
        let now = now_ms();
        if backend.stats.is_ejected(now) || backend.stats.failures() < p.consecutive_failures {
            return; // another thread got here first
        }
        let members = pool.members.load();
        let ejected = members.iter().filter(|b| b.stats.is_ejected(now)).count();
        let cap = ((members.len() as u64 * u64::from(p.max_ejected_percent)) / 100).max(u64::from(members.len() > 1)) as usize;
        if ejected >= cap {
            tracing::warn!(pool = %pool.name, backend = %backend.addr_text, ejected, cap, "outlier not ejected: the pool's ejection cap is reached");
            return;
        }
        let n = backend.stats.ejections.fetch_add(1, Ordering::Relaxed) + 1;
        let time = p.base_ejection_time.saturating_mul(n).min(p.max_ejection_time);
        backend.stats.ejected_until_ms.store(now + time.as_millis() as u64, Ordering::Relaxed);
        pool.metrics.ejections.with_label_values(&[&pool.name]).inc();
        tracing::warn!(
            pool = %pool.name, backend = %backend.addr_text, failures = backend.stats.failures(), ejection = n, duration = ?time,
            "backend ejected by outlier detection"
        );
    });
}

/// Re-admits backends whose ejection ended, decays ejection counts after a clean period, and
/// rebuilds the table when anything time-dependent (slow start, zone load) changed.
pub fn maintain(pool: &Pool) {
    let now = now_ms();
    let policy = pool.settings.load();
    for b in pool.members.load().iter() {
        let until = b.stats.ejected_until_ms.load(Ordering::Relaxed);
        if until != 0 && until <= now {
            b.stats.ejected_until_ms.store(0, Ordering::Relaxed);
            // Failures that led to the ejection are forgiven; the ramp (if any) restarts.
            b.stats.reset_failures();
            b.stats.admitted_at_ms.store(now, Ordering::Relaxed);
            tracing::info!(pool = %pool.name, backend = %b.addr_text, "ejected backend re-admitted");
        } else if until == 0 && b.stats.ejections.load(Ordering::Relaxed) > 0 {
            let clean_for = now.saturating_sub(b.stats.admitted_at_ms.load(Ordering::Relaxed));
            if clean_for > policy.outlier.max_ejection_time.as_millis() as u64 {
                b.stats.ejections.store(0, Ordering::Relaxed);
            }
        }
    }
    pool.rebuild_table();
}
