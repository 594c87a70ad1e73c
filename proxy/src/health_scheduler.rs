//! Schedules health probes: per backend every interval (± jitter, slower while the pool has no
//! traffic), at most `concurrency` at once per pool, with rise/fall thresholds. A state change
//! rebuilds the pool's table at once, which pushes it to the strategy before its next pick.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::clock::now_ms;
use crate::health::{HealthHost, Verdict};
use crate::pool::{Backend, HealthSchedule, Pool};
use crate::runtime::Runtime;

/// How often the scheduler looks for due probes; bounds how late a probe starts.
const SCAN_PERIOD: Duration = Duration::from_millis(25);

/// Runs until `shutdown` changes.
pub async fn run(runtime: Arc<Runtime>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
    let mut limits: HashMap<String, (u32, Arc<Semaphore>)> = HashMap::new();
    let mut tick = tokio::time::interval(SCAN_PERIOD);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = now_ms();
        for pool in runtime.pools() {
            let (Some(host), Some(schedule)) =
                (pool.health.load_full(), pool.settings.load().health.clone())
            else {
                continue;
            };
            let (_, sem) = limits
                .entry(pool.name.clone())
                .and_modify(|(n, s)| {
                    if *n != schedule.concurrency {
                        *n = schedule.concurrency;
                        *s = Arc::new(Semaphore::new(schedule.concurrency as usize));
                    }
                })
                .or_insert_with(|| {
                    (
                        schedule.concurrency,
                        Arc::new(Semaphore::new(schedule.concurrency as usize)),
                    )
                });
            for b in pool.members.load().iter() {
                {
                    let mut rec = b.stats.health.lock().unwrap_or_else(|p| p.into_inner());
                    if rec.in_flight || now < rec.next_due_ms {
                        continue;
                    }
                    rec.in_flight = true;
                }
                let task = ProbeTask {
                    pool: pool.clone(),
                    host: host.clone(),
                    backend: b.clone(),
                    schedule: schedule.clone(),
                    runtime: runtime.clone(),
                };
                let sem = sem.clone();
                tokio::spawn(async move {
                    // The semaphore is never closed, so acquiring only waits.
                    let _permit = sem.acquire_owned().await;
                    task.run().await;
                });
            }
        }
    }
}

struct ProbeTask {
    pool: Arc<Pool>,
    host: Arc<HealthHost>,
    backend: Arc<Backend>,
    schedule: HealthSchedule,
    runtime: Arc<Runtime>,
}

impl ProbeTask {
    async fn run(self) {
        let verdict = match self.host.probe(&self.backend) {
            Err(e) => Err(format!("plugin failed to give a probe: {e}")),
            Ok(spec) => {
                let result =
                    crate::health_probe::run(self.backend.addr, &spec, self.schedule.timeout).await;
                self.host
                    .evaluate(&result)
                    .map(|v| (v, crate::health::describe(&result)))
                    .map_err(|e| {
                        format!(
                            "plugin failed to judge {}: {e}",
                            crate::health::describe(&result)
                        )
                    })
            }
        };
        self.apply(verdict);
    }

    fn apply(&self, verdict: Result<(Verdict, String), String>) {
        let m = &self.runtime.metrics;
        let stats = &self.backend.stats;
        let now = now_ms();
        let mut changed = false;
        // A degraded factor that moved changes weights without changing health state.
        let mut reweighed = false;
        {
            let mut rec = stats.health.lock().unwrap_or_else(|p| p.into_inner());
            rec.in_flight = false;
            let traffic = self.pool.requests.load(Ordering::Relaxed);
            let idle = traffic == rec.pool_requests_seen;
            rec.pool_requests_seen = traffic;
            let base = if idle {
                self.schedule.idle_interval
            } else {
                self.schedule.interval
            };
            rec.next_due_ms = now + jittered(base, self.schedule.jitter).as_millis() as u64;
            let healthy = stats.healthy.load(Ordering::Relaxed);
            match verdict {
                Err(e) => {
                    // A plugin fault says nothing about the backend: keep the last state.
                    m.health_checks
                        .with_label_values(&[&self.pool.name, "error"])
                        .inc();
                    tracing::warn!(pool = %self.pool.name, backend = %self.backend.addr_text, error = %e, "health check error; backend state unchanged");
                    rec.last_result = format!("check error: {e}");
                }
                Ok((Verdict::Unhealthy, desc)) => {
                    m.health_checks
                        .with_label_values(&[&self.pool.name, "fail"])
                        .inc();
                    rec.fails += 1;
                    rec.passes = 0;
                    rec.last_result = format!("fail: {desc}");
                    if healthy && rec.fails >= self.schedule.fall {
                        stats.healthy.store(false, Ordering::Relaxed);
                        changed = true;
                    }
                    rec.checked = true;
                }
                Ok((v, desc)) => {
                    m.health_checks
                        .with_label_values(&[&self.pool.name, "pass"])
                        .inc();
                    rec.passes += 1;
                    rec.fails = 0;
                    let factor = match v {
                        Verdict::Degraded(p) => u32::from(p),
                        _ => 100,
                    };
                    rec.last_result = if factor < 100 {
                        format!("pass, degraded to {factor}%: {desc}")
                    } else {
                        format!("pass: {desc}")
                    };
                    // Before its first completed check a backend needs one pass; afterwards `rise`.
                    if !healthy && (!rec.checked || rec.passes >= self.schedule.rise) {
                        stats.healthy.store(true, Ordering::Relaxed);
                        stats.admitted_at_ms.store(now, Ordering::Relaxed);
                        changed = true;
                    }
                    reweighed = stats.health_factor.swap(factor, Ordering::Relaxed) != factor;
                    rec.checked = true;
                }
            }
            if changed {
                rec.last_change_ms = now;
            }
        }
        if changed {
            let up = stats.healthy.load(Ordering::Relaxed);
            m.health_flaps.with_label_values(&[&self.pool.name]).inc();
            m.backend_healthy
                .with_label_values(&[&self.pool.name, &self.backend.addr_text])
                .set(i64::from(up));
            tracing::info!(pool = %self.pool.name, backend = %self.backend.addr_text, healthy = up, "backend health changed");
        }
        if changed || reweighed {
            self.pool.rebuild_table();
        }
    }
}

/// `base` ± up to `jitter`, never below a tenth of `base`.
fn jittered(base: Duration, jitter: Duration) -> Duration {
    if jitter.is_zero() {
        return base;
    }
    let j = jitter.as_millis() as i64;
    let delta = (rand::random::<u64>() % (2 * j as u64 + 1)) as i64 - j;
    let ms = (base.as_millis() as i64 + delta).max(base.as_millis() as i64 / 10);
    Duration::from_millis(ms as u64)
}
