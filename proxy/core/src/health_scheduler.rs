//! Schedules health probes: per backend every interval (± jitter, slower while the pool has no
//! traffic), at most `concurrency` at once per pool, with rise/fall thresholds. A state change
//! rebuilds the pool's table at once, which pushes it to the strategy before its next pick.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;

use crate::backend::{Backend, HealthRecord};
use crate::clock::now_ms;
use crate::health::{HealthHost, Verdict};
use crate::pool::{HealthSchedule, HealthUpdate, Pool};

/// How often the scheduler looks for due probes; bounds how late a probe starts.
const SCAN_PERIOD: Duration = Duration::from_millis(25);

/// Runs until `shutdown` changes, probing the pools `pools()` returns at each scan.
pub async fn run(
    pools: impl Fn() -> Vec<Arc<Pool>>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut limits: HashMap<String, (u32, Arc<Semaphore>)> = HashMap::new();
    let mut tick = tokio::time::interval(SCAN_PERIOD);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = now_ms();
        let pools = pools();
        limits.retain(|name, _| pools.iter().any(|p| p.name == *name));
        for pool in pools {
            let (Some(host), Some(schedule)) = (pool.health(), pool.settings().health.clone())
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
            for b in pool.members().iter() {
                if pool.override_of(b.addr).mode == crate::pool::AdminMode::Disabled {
                    continue;
                }
                {
                    let mut rec = b.stats.health.lock();
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
}

impl ProbeTask {
    async fn run(self) {
        let verdict = match self.host.probe(&self.backend) {
            Err(e) => Err(format!("plugin failed to give a probe: {e}")),
            Ok(spec) => {
                let tls = self.pool.settings().upstream.tls.clone();
                let result = crate::health_probe::run(
                    self.backend.addr,
                    &spec,
                    self.schedule.timeout,
                    tls.as_deref(),
                )
                .await;
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
        let now = now_ms();
        let update = {
            let mut rec = self.backend.stats.health.lock();
            rec.in_flight = false;
            let traffic = self.pool.requests();
            let idle = traffic == rec.pool_requests_seen;
            rec.pool_requests_seen = traffic;
            let base = if idle {
                self.schedule.idle_interval
            } else {
                self.schedule.interval
            };
            rec.next_due_ms = now + jittered(base, self.schedule.jitter).as_millis() as u64;
            if let Err(e) = &verdict {
                tracing::warn!(pool = %self.pool.name, backend = %self.backend.addr_text, error = %e, "health check error; backend state unchanged");
            }
            let update = step(
                &mut rec,
                self.backend.stats.is_healthy(),
                &verdict,
                &self.schedule,
            );
            if matches!(
                update,
                HealthUpdate::Fail { down: true } | HealthUpdate::Pass { up: true, .. }
            ) {
                rec.last_change_ms = now;
            }
            update
        };
        self.pool.apply_health(&self.backend, update);
    }
}

/// The health state machine, free of I/O and clocks: folds one check's result into `rec` (the
/// backend is `healthy` now) and says what the pool should do. A plugin error says nothing about
/// the backend; a fresh backend needs one pass, later ones `rise` passes; `fall` failures take a
/// healthy backend down.
pub fn step(
    rec: &mut HealthRecord,
    healthy: bool,
    verdict: &Result<(Verdict, String), String>,
    schedule: &HealthSchedule,
) -> HealthUpdate {
    match verdict {
        Err(e) => {
            rec.last_result = format!("check error: {e}");
            HealthUpdate::Error
        }
        Ok((Verdict::Unhealthy, desc)) => {
            rec.fails += 1;
            rec.passes = 0;
            rec.last_result = format!("fail: {desc}");
            let down = healthy && rec.fails >= schedule.fall;
            rec.checked = true;
            HealthUpdate::Fail { down }
        }
        Ok((v, desc)) => {
            rec.passes += 1;
            rec.fails = 0;
            let factor = match v {
                Verdict::Degraded(p) => u32::from(*p),
                _ => 100,
            };
            rec.last_result = if factor < 100 {
                format!("pass, degraded to {factor}%: {desc}")
            } else {
                format!("pass: {desc}")
            };
            let up = !healthy && (!rec.checked || rec.passes >= schedule.rise);
            rec.checked = true;
            HealthUpdate::Pass { up, factor }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(rise: u32, fall: u32) -> HealthSchedule {
        HealthSchedule {
            interval: Duration::from_secs(1),
            idle_interval: Duration::from_secs(5),
            jitter: Duration::ZERO,
            timeout: Duration::from_secs(1),
            rise,
            fall,
            start_unhealthy: true,
            concurrency: 4,
        }
    }

    fn pass() -> Result<(Verdict, String), String> {
        Ok((Verdict::Healthy, "HTTP 200".into()))
    }

    fn fail() -> Result<(Verdict, String), String> {
        Ok((Verdict::Unhealthy, "HTTP 500".into()))
    }

    #[test]
    fn a_fresh_backend_needs_one_pass_then_rise_and_fall_apply() {
        let s = schedule(2, 3);
        let mut rec = HealthRecord::default();
        // Fresh and unhealthy: the first pass brings it up.
        assert_eq!(
            step(&mut rec, false, &pass(), &s),
            HealthUpdate::Pass {
                up: true,
                factor: 100
            }
        );
        // Healthy: two failures are not enough, the third takes it down.
        assert_eq!(
            step(&mut rec, true, &fail(), &s),
            HealthUpdate::Fail { down: false }
        );
        assert_eq!(
            step(&mut rec, true, &fail(), &s),
            HealthUpdate::Fail { down: false }
        );
        assert_eq!(
            step(&mut rec, true, &fail(), &s),
            HealthUpdate::Fail { down: true }
        );
        // Down after a completed check: it takes `rise` passes to come back.
        assert_eq!(
            step(&mut rec, false, &pass(), &s),
            HealthUpdate::Pass {
                up: false,
                factor: 100
            }
        );
        assert_eq!(
            step(&mut rec, false, &pass(), &s),
            HealthUpdate::Pass {
                up: true,
                factor: 100
            }
        );
    }

    #[test]
    fn errors_change_nothing_and_a_pass_resets_failures() {
        let s = schedule(1, 2);
        let mut rec = HealthRecord::default();
        step(&mut rec, true, &fail(), &s);
        assert_eq!(
            step(&mut rec, true, &Err("trap".into()), &s),
            HealthUpdate::Error
        );
        assert_eq!(rec.fails, 1, "an error is neither a pass nor a failure");
        assert_eq!(
            step(&mut rec, true, &pass(), &s),
            HealthUpdate::Pass {
                up: false,
                factor: 100
            }
        );
        assert_eq!(
            step(&mut rec, true, &fail(), &s),
            HealthUpdate::Fail { down: false }
        );
        let degraded = Ok((Verdict::Degraded(40), "load".into()));
        assert_eq!(
            step(&mut rec, true, &degraded, &s),
            HealthUpdate::Pass {
                up: false,
                factor: 40
            }
        );
        assert!(rec.last_result.contains("degraded to 40%"));
    }
}
