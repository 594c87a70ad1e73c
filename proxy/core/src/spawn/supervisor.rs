//! The [`Spawner`]: one thread that runs every pool's spawned instances and keeps them in line
//! with the config.
//!
//! Every [`SCAN_PERIOD`] it compares what the pools ask for ([`Pool::spawns`], replaced by each
//! reload) with the instances it runs: it starts missing ones, drains and stops those a reload
//! removed, and replaces those whose table changed one at a time (each new one must be ready
//! before the next old one goes). All children are spawned from this one thread, which lives as
//! long as the process: the kernel kills them when it ends (see `sys::contain`).

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::instance::{self, Order};
use super::spec::SpawnSpec;
use crate::pool::Pool;

/// How often the instances are reconciled with the config; bounds how late a reload's change
/// of `instances` starts.
const SCAN_PERIOD: Duration = Duration::from_millis(100);

/// The thread that runs the spawned instances. [`Spawner::stop`] stops them all.
#[derive(Debug)]
pub struct Spawner {
    /// `None` while running; `Some(hurry)` once told to stop.
    stop: watch::Sender<Option<bool>>,
    /// True once every instance has exited.
    done: watch::Receiver<bool>,
}

impl Spawner {
    /// Starts the thread; `pools()` is asked at each scan, so reloads take effect at once.
    pub fn start(pools: impl Fn() -> Vec<Arc<Pool>> + Send + 'static) -> std::io::Result<Spawner> {
        let (stop, stop_rx) = watch::channel(None);
        let (done_tx, done) = watch::channel(false);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        std::thread::Builder::new()
            .name("sluice-spawn".into())
            .spawn(move || {
                rt.block_on(supervise(pools, stop_rx));
                let _ = done_tx.send(true);
            })?;
        Ok(Spawner { stop, done })
    }

    /// Stops every instance: SIGTERM, then SIGKILL after its `stop_grace`; with `hurry`,
    /// SIGKILL at once (a later call with `hurry` speeds up an earlier one). Waits at most
    /// `limit`; true when all have exited.
    pub async fn stop(&self, hurry: bool, limit: Duration) -> bool {
        self.stop
            .send_modify(|s| *s = Some(hurry || s.unwrap_or(false)));
        let mut done = self.done.clone();
        let ended = tokio::time::timeout(limit, done.wait_for(|d| *d))
            .await
            .is_ok_and(|r| r.is_ok());
        ended
    }
}

/// An instance task and how to reach it.
struct Running {
    pool: Arc<Pool>,
    spec: Arc<SpawnSpec>,
    orders: watch::Sender<Order>,
    task: JoinHandle<()>,
    ready: Arc<AtomicBool>,
    /// Told to drain and stop; its port is busy until its task ends.
    leaving: bool,
}

impl Running {
    fn leave(&mut self) {
        self.leaving = true;
        self.orders.send_replace(Order::Drain);
    }

    fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
    }
}

/// Pool, spawn table name, instance number.
type Key = (String, String, u16);

async fn supervise(pools: impl Fn() -> Vec<Arc<Pool>>, mut stop: watch::Receiver<Option<bool>>) {
    let mut running: BTreeMap<Key, Running> = BTreeMap::new();
    let mut tick = tokio::time::interval(SCAN_PERIOD);
    while stop.borrow().is_none() {
        tokio::select! {
            _ = tick.tick() => reconcile(&pools(), &mut running),
            r = stop.changed() => if r.is_err() { break },
        }
    }
    let hurry = |stop: &watch::Receiver<Option<bool>>| stop.borrow().unwrap_or(false);
    let order = |hurry: bool| if hurry { Order::Kill } else { Order::Stop };
    let first = order(hurry(&stop));
    for r in running.values() {
        r.orders.send_replace(first);
    }
    let senders: Vec<_> = running.values().map(|r| r.orders.clone()).collect();
    let all_ended = async {
        for (_, r) in running {
            let _ = r.task.await;
        }
    };
    tokio::pin!(all_ended);
    loop {
        tokio::select! {
            _ = &mut all_ended => break,
            r = stop.changed() => {
                if r.is_err() || hurry(&stop) {
                    for s in &senders {
                        s.send_replace(Order::Kill);
                    }
                }
                if r.is_err() {
                    // Nobody waits for the end any more; finish the kills anyway.
                    (&mut all_ended).await;
                    break;
                }
            }
        }
    }
}

/// Brings the running instances in line with what `pools` ask for.
fn reconcile(pools: &[Arc<Pool>], running: &mut BTreeMap<Key, Running>) {
    running.retain(|_, r| !r.task.is_finished());
    let mut desired: BTreeMap<Key, (Arc<Pool>, Arc<SpawnSpec>)> = BTreeMap::new();
    for pool in pools {
        for spec in pool.spawns().iter() {
            for n in 0..spec.instances {
                let key = (pool.name.clone(), spec.name.clone(), n);
                desired.insert(key, (pool.clone(), spec.clone()));
            }
        }
    }
    // Instances no longer asked for (or of a pool that was removed, even if one of the same
    // name was added back) drain and stop.
    for (key, r) in running.iter_mut() {
        let kept = desired
            .get(key)
            .is_some_and(|(p, _)| Arc::ptr_eq(p, &r.pool));
        if !kept && !r.leaving {
            r.leave();
        }
    }
    replace_outdated(&desired, running);
    // Missing ones start; one whose address a leaving instance (of this or another table) still
    // holds waits for it: started now, it could not listen, and the old one would answer for it.
    let held: BTreeSet<SocketAddr> = running.iter().map(|(k, r)| r.spec.addr(k.2)).collect();
    for (key, (pool, spec)) in desired {
        if running.contains_key(&key) || held.contains(&spec.addr(key.2)) {
            continue;
        }
        let (orders, rx) = watch::channel(Order::Run);
        let ready = Arc::new(AtomicBool::new(false));
        let task = tokio::spawn(instance::run(
            pool.clone(),
            spec.clone(),
            key.2,
            rx,
            ready.clone(),
        ));
        running.insert(
            key,
            Running {
                pool,
                spec,
                orders,
                task,
                ready,
                leaving: false,
            },
        );
    }
}

/// Instances whose spawn table changed are replaced: those not serving at once, serving ones one
/// at a time per table, only while every other instance of the table serves.
fn replace_outdated(
    desired: &BTreeMap<Key, (Arc<Pool>, Arc<SpawnSpec>)>,
    running: &mut BTreeMap<Key, Running>,
) {
    let outdated = |key: &Key, r: &Running| {
        !r.leaving
            && desired
                .get(key)
                .is_some_and(|(_, spec)| !spec.same_instances(&r.spec))
    };
    let mut busy: BTreeMap<(String, String), bool> = BTreeMap::new();
    for (key, r) in running.iter() {
        let group = (key.0.clone(), key.1.clone());
        let b = r.leaving || (!r.is_ready() && !outdated(key, r));
        *busy.entry(group).or_default() |= b;
    }
    // A desired instance that is not running yet (about to start) keeps its table busy too.
    for key in desired.keys().filter(|k| !running.contains_key(*k)) {
        busy.insert((key.0.clone(), key.1.clone()), true);
    }
    let keys: Vec<Key> = running
        .iter()
        .filter(|(k, r)| outdated(k, r))
        .map(|(k, _)| k.clone())
        .collect();
    for key in keys {
        let group = (key.0.clone(), key.1.clone());
        let Some(r) = running.get_mut(&key) else {
            continue;
        };
        if !r.is_ready() {
            r.leave();
        } else if !busy.get(&group).copied().unwrap_or(false) {
            r.leave();
            busy.insert(group, true);
        }
    }
}
