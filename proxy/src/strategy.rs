//! The strategy host: runs a pool's strategy plugin on every request.
//!
//! Each worker thread keeps its own instance of the pool's current plugin version (thread-local,
//! so the request path takes no lock). A new version is published through an `ArcSwap`; a thread
//! notices the changed generation on its next pick and instantiates the new version first. `pick`
//! is synchronous and never held across an `.await`, so a swap needs no drain and fails no request.
//!
//! A trap, a deadline hit or a nonsense index is a *fault*: that request is served by a native
//! round-robin over the same table, the fault is counted and logged, and the thread's instance is
//! rebuilt after a growing backoff.

use std::cell::RefCell;
use std::sync::atomic::{AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use wasmtime::TypedFunc;

use crate::metrics::Metrics;
use crate::plugin::VersionSlot;
use crate::plugin::{
    is_deadline, root_cause, Guest, HostState, PluginEngine, PluginError, PluginKind,
    PluginVersion, RequestView, COUNTER_SLOTS, INIT_DEADLINE_TICKS, PICK_DEADLINE_TICKS,
};
use crate::pool::BackendTable;

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// A live instance of one plugin version on one thread.
struct Instance {
    generation: u64,
    table_generation: u64,
    guest: Guest,
    set_backends: TypedFunc<(i32, i32), i32>,
    pick: TypedFunc<i32, i32>,
}

impl Instance {
    /// Instantiates `version` and runs its `sluice_init`.
    fn new(
        engine: &PluginEngine,
        version: &PluginVersion,
        counters: Arc<[AtomicI64; COUNTER_SLOTS]>,
    ) -> Result<Instance, PluginError> {
        let mut guest = Guest::new(engine, version, counters)?;
        let set_backends = guest.func("sluice_set_backends")?;
        let pick = guest.func("sluice_pick")?;
        Ok(Instance {
            generation: version.generation,
            table_generation: 0,
            guest,
            set_backends,
            pick,
        })
    }

    /// Pushes `table` if this instance has not seen its generation yet.
    fn sync_table(&mut self, table: &Arc<BackendTable>) -> wasmtime::Result<()> {
        if self.table_generation == table.generation {
            return Ok(());
        }
        self.guest.store.set_epoch_deadline(INIT_DEADLINE_TICKS);
        let (ptr, len) = self.guest.write(&table.encoded)?;
        // Installed first so `backend_*` host calls made while the plugin digests the table see it.
        self.guest.store.data_mut().table = Some(table.clone());
        // Forces a re-push if the call below fails.
        self.table_generation = 0;
        let rc = self.set_backends.call(&mut self.guest.store, (ptr, len))?;
        wasmtime::ensure!(rc == 0, "sluice_set_backends returned {rc}");
        self.table_generation = table.generation;
        Ok(())
    }

    fn pick(
        &mut self,
        table: &Arc<BackendTable>,
        req: &RequestView<'_>,
        attempt: u32,
    ) -> Result<Option<usize>, Fault> {
        self.sync_table(table).map_err(Fault::from_call)?;
        self.guest.store.set_epoch_deadline(PICK_DEADLINE_TICKS);
        let pick = &self.pick;
        let attempt = i32::try_from(attempt).unwrap_or(i32::MAX);
        let idx = HostState::with_request(&mut self.guest.store, req, |s| pick.call(s, attempt))
            .map_err(Fault::from_call)?;
        match usize::try_from(idx) {
            Err(_) if idx == -1 => Ok(None),
            Ok(i) if i < table.len() && !(req.excluded)(i) => Ok(Some(i)),
            _ => Err(Fault::BadIndex(idx)),
        }
    }
}

/// Why a plugin call could not be used.
#[derive(Debug)]
enum Fault {
    Trap(String),
    Deadline,
    BadIndex(i32),
    Instantiate(String),
    Backoff,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Trap(t) => write!(f, "{t}"),
            Fault::Deadline => write!(f, "deadline exceeded (the plugin ran too long)"),
            Fault::BadIndex(i) => write!(
                f,
                "returned index {i}, which is out of range or already tried"
            ),
            Fault::Instantiate(e) => write!(f, "cannot rebuild the instance: {e}"),
            Fault::Backoff => write!(f, "instance is waiting to be rebuilt"),
        }
    }
}

impl Fault {
    fn from_call(e: wasmtime::Error) -> Fault {
        if is_deadline(&e) {
            Fault::Deadline
        } else {
            Fault::Trap(root_cause(&e))
        }
    }
    fn reason(&self) -> &'static str {
        match self {
            Fault::Trap(_) => "trap",
            Fault::Deadline => "deadline",
            Fault::BadIndex(_) => "bad_index",
            Fault::Instantiate(_) => "instantiate",
            Fault::Backoff => "backoff",
        }
    }
}

/// A thread's instance of one pool's strategy, with its rebuild backoff.
struct Slot {
    generation: u64,
    instance: Option<Instance>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

thread_local! {
    /// Indexed by `StrategyHost::id`: O(1) and lock-free.
    static SLOTS: RefCell<Vec<Option<Slot>>> = const { RefCell::new(Vec::new()) };
}

static NEXT_HOST_ID: AtomicUsize = AtomicUsize::new(0);

struct FaultCounters {
    trap: IntCounter,
    deadline: IntCounter,
    bad_index: IntCounter,
    instantiate: IntCounter,
}

/// Runs one pool's strategy plugin.
pub struct StrategyHost {
    id: usize,
    pool: String,
    engine: PluginEngine,
    versions: VersionSlot,
    counters: Arc<[AtomicI64; COUNTER_SLOTS]>,
    fallback_rr: AtomicUsize,
    picks: IntCounter,
    fallbacks: IntCounter,
    faults: FaultCounters,
}

impl StrategyHost {
    /// Loads and validates the first version of a pool's strategy against `table`.
    pub fn new(
        engine: &PluginEngine,
        pool: &str,
        bytes: &[u8],
        name: &str,
        config_json: Arc<[u8]>,
        table: &Arc<BackendTable>,
        metrics: &Metrics,
    ) -> Result<StrategyHost, PluginError> {
        let counters = Arc::new([const { AtomicI64::new(0) }; COUNTER_SLOTS]);
        let version = validate(engine, bytes, name, 1, config_json, table)?;
        let fault = |reason: &str| {
            metrics
                .plugin_faults
                .with_label_values(&[pool, "strategy", reason])
        };
        Ok(StrategyHost {
            id: NEXT_HOST_ID.fetch_add(1, Ordering::Relaxed),
            pool: pool.to_string(),
            engine: engine.clone(),
            versions: VersionSlot::new(pool, PluginKind::Strategy, version, metrics),
            counters,
            fallback_rr: AtomicUsize::new(0),
            picks: metrics.plugin_picks.with_label_values(&[pool]),
            fallbacks: metrics.fallback_picks.with_label_values(&[pool]),
            faults: FaultCounters {
                trap: fault("trap"),
                deadline: fault("deadline"),
                bad_index: fault("bad_index"),
                instantiate: fault("instantiate"),
            },
        })
    }

    /// The version serving now.
    pub fn current(&self) -> Arc<PluginVersion> {
        self.versions.current.load_full()
    }

    /// Validates `bytes` (compile, ABI version, instantiate, init with `config_json`, one trial pick
    /// against `table`) and makes it the serving version. On error the old version keeps serving.
    /// `config_json: None` keeps the current version's config.
    pub fn swap(
        &self,
        bytes: &[u8],
        name: &str,
        config_json: Option<Arc<[u8]>>,
        table: &Arc<BackendTable>,
    ) -> Result<Arc<PluginVersion>, PluginError> {
        self.versions.swap(config_json, |generation, config| {
            validate(&self.engine, bytes, name, generation, config, table)
        })
    }

    /// Validates a candidate version exactly as [`StrategyHost::swap`] would, without publishing it.
    pub fn check(
        &self,
        bytes: &[u8],
        name: &str,
        config_json: Arc<[u8]>,
        table: &Arc<BackendTable>,
    ) -> Result<(), PluginError> {
        validate(&self.engine, bytes, name, 0, config_json, table).map(drop)
    }

    /// Picks a backend of `table` for a request. `None` means no backend is available.
    /// Never fails because of the plugin: faults fall back to a native round-robin.
    pub fn pick(
        &self,
        table: &Arc<BackendTable>,
        req: &RequestView<'_>,
        attempt: u32,
    ) -> Option<usize> {
        if table.is_empty() {
            return None;
        }
        let version = self.versions.current.load();
        let outcome = SLOTS.with(|slots| {
            let mut slots = slots.borrow_mut();
            if slots.len() <= self.id {
                slots.resize_with(self.id + 1, || None);
            }
            let slot = slots[self.id].get_or_insert_with(|| Slot {
                generation: 0,
                instance: None,
                retry_at: None,
                backoff: FIRST_BACKOFF,
            });
            if slot.generation != version.generation {
                *slot = Slot {
                    generation: version.generation,
                    instance: None,
                    retry_at: None,
                    backoff: FIRST_BACKOFF,
                };
            }
            if slot.instance.is_none() {
                if slot.retry_at.is_some_and(|t| Instant::now() < t) {
                    return Err(Fault::Backoff);
                }
                match Instance::new(&self.engine, &version, self.counters.clone()) {
                    Ok(i) => slot.instance = Some(i),
                    Err(e) => {
                        let fault = Fault::Instantiate(e.to_string());
                        self.poison(slot, &fault);
                        return Err(fault);
                    }
                }
            }
            let Some(instance) = slot.instance.as_mut() else {
                return Err(Fault::Backoff);
            };
            match instance.pick(table, req, attempt) {
                Ok(pick) => {
                    slot.backoff = FIRST_BACKOFF;
                    Ok(pick)
                }
                Err(fault) => {
                    self.poison(slot, &fault);
                    Err(fault)
                }
            }
        });
        match outcome {
            Ok(pick) => {
                self.picks.inc();
                pick
            }
            Err(_) => {
                self.fallbacks.inc();
                self.fallback_pick(table, req)
            }
        }
    }

    /// Drops a faulty instance and schedules its rebuild.
    fn poison(&self, slot: &mut Slot, fault: &Fault) {
        let counter = match fault {
            Fault::Trap(_) => &self.faults.trap,
            Fault::Deadline => &self.faults.deadline,
            Fault::BadIndex(_) => &self.faults.bad_index,
            Fault::Instantiate(_) => &self.faults.instantiate,
            Fault::Backoff => return,
        };
        counter.inc();
        let generation = slot
            .instance
            .as_ref()
            .map_or(slot.generation, |i| i.generation);
        tracing::warn!(
            pool = %self.pool, generation, reason = fault.reason(), detail = %fault, retry_in = ?slot.backoff,
            "strategy plugin fault; request served by the native fallback, instance will be rebuilt"
        );
        slot.instance = None;
        slot.retry_at = Some(Instant::now() + slot.backoff);
        slot.backoff = (slot.backoff * 2).min(MAX_BACKOFF);
    }

    /// Native round-robin over the table, skipping backends this request already tried.
    fn fallback_pick(&self, table: &BackendTable, req: &RequestView<'_>) -> Option<usize> {
        let n = table.len();
        let start = self.fallback_rr.fetch_add(1, Ordering::Relaxed);
        (0..n)
            .map(|k| (start + k) % n)
            .find(|&i| !(req.excluded)(i))
    }
}

/// Compiles and fully exercises a plugin version on a throwaway instance.
fn validate(
    engine: &PluginEngine,
    bytes: &[u8],
    name: &str,
    generation: u64,
    config_json: Arc<[u8]>,
    table: &Arc<BackendTable>,
) -> Result<PluginVersion, PluginError> {
    let version = engine.compile(bytes, PluginKind::Strategy, name, generation, config_json)?;
    // The trial runs on its own counters so it does not shift the live rotation.
    let trial_counters = Arc::new([const { AtomicI64::new(0) }; COUNTER_SLOTS]);
    let mut instance = Instance::new(engine, &version, trial_counters)?;
    let header = pingora::http::RequestHeader::build("GET", b"/", None)
        .map_err(|e| PluginError::TrialPick(e.to_string()))?;
    let none = |_: usize| false;
    let req = RequestView {
        header: &header,
        client_ip: None,
        excluded: &none,
    };
    match instance.pick(table, &req, 0) {
        Ok(_) => Ok(version),
        Err(Fault::BadIndex(i)) => Err(PluginError::TrialPick(format!(
            "returned index {i}, but the pool has {} backends (valid: 0..{} or -1 for none)",
            table.len(),
            table.len()
        ))),
        Err(Fault::Deadline) => Err(PluginError::TrialPick(
            "deadline exceeded (the plugin ran too long)".into(),
        )),
        Err(Fault::Trap(t)) => Err(PluginError::TrialPick(t)),
        Err(other) => Err(PluginError::TrialPick(other.to_string())),
    }
}
