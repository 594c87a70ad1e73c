//! The strategy host: runs a pool's strategy plugin on every request.
//!
//! Each worker thread keeps its own instance of the pool's current plugin version, in storage the
//! *version* owns (`thread_local::ThreadLocal`, so the request path takes no lock). A new version
//! is published through an `ArcSwap`; a thread's next pick finds no instance for it and
//! instantiates one. When the old version's last reader is done, dropping it drops every thread's
//! instance of it, and with them their pooling-allocator slots. `pick` is synchronous and never
//! held across an `.await`, so a swap needs no drain and fails no request.
//!
//! A trap, a deadline hit or a nonsense index is a *fault*: that request is served by a native
//! round-robin over the same table, the fault is counted and logged, and the thread's instance is
//! rebuilt after a growing backoff.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use prometheus::IntCounter;
use thread_local::ThreadLocal;
use wasmtime::TypedFunc;

use crate::backend::BackendTable;
use crate::metrics::{Metrics, SeriesScope};
use crate::plugin::{
    Fault, FaultCounters, Guest, HostState, PluginEngine, PluginError, PluginKind, PluginVersion,
    Prepared, RequestView, VersionSlot, COUNTER_SLOTS, INIT_DEADLINE_TICKS, PICK_DEADLINE_TICKS,
};

const FIRST_BACKOFF: Duration = Duration::from_millis(50);
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// A live instance of one plugin version on one thread.
struct Instance {
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
        log_dropped: Option<IntCounter>,
    ) -> Result<Instance, PluginError> {
        let mut guest = Guest::new(engine, version, counters, log_dropped)?;
        let set_backends = guest.func("sluice_set_backends")?;
        let pick = guest.func("sluice_pick")?;
        Ok(Instance {
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

/// A thread's instance of the serving version, with its rebuild backoff.
struct Slot {
    instance: Option<Instance>,
    retry_at: Option<Instant>,
    backoff: Duration,
}

impl Default for Slot {
    fn default() -> Slot {
        Slot {
            instance: None,
            retry_at: None,
            backoff: FIRST_BACKOFF,
        }
    }
}

/// Every worker thread's instance of one version; owned by that version.
type Instances = ThreadLocal<RefCell<Slot>>;

/// Runs one pool's strategy plugin.
pub struct StrategyHost {
    pool: String,
    engine: PluginEngine,
    versions: VersionSlot<Instances>,
    counters: Arc<[AtomicI64; COUNTER_SLOTS]>,
    fallback_rr: AtomicUsize,
    /// The serving version is [`crate::builtin::NATIVE_ROUND_ROBIN`]: picks skip the plugin.
    native: AtomicBool,
    picks: IntCounter,
    fallbacks: IntCounter,
    log_dropped: IntCounter,
    faults: FaultCounters,
    _series: SeriesScope,
}

impl StrategyHost {
    /// Validates a first version of a pool's strategy against `table`, without a host yet
    /// (a reload prepares every new pool's plugin before publishing anything).
    pub fn prepare_first(
        engine: &PluginEngine,
        bytes: &[u8],
        name: &str,
        config_json: Arc<[u8]>,
        table: &Arc<BackendTable>,
    ) -> Result<Prepared, PluginError> {
        // The first version of a host is generation 1.
        validate(engine, bytes, name, 1, config_json, table).map(Prepared::from)
    }

    /// A host serving `first` (from [`StrategyHost::prepare_first`]).
    pub fn new(
        engine: &PluginEngine,
        pool: &str,
        first: Prepared,
        metrics: &Metrics,
    ) -> StrategyHost {
        let series = metrics.scope(&[pool]);
        let native = AtomicBool::new(is_native(first.version()));
        StrategyHost {
            pool: pool.to_string(),
            engine: engine.clone(),
            versions: VersionSlot::new(pool, PluginKind::Strategy, first, &series, metrics),
            counters: Arc::new([const { AtomicI64::new(0) }; COUNTER_SLOTS]),
            fallback_rr: AtomicUsize::new(0),
            native,
            picks: series.counter(&metrics.plugin_picks, &[]),
            fallbacks: series.counter(&metrics.fallback_picks, &[]),
            log_dropped: series.counter(&metrics.plugin_log_dropped, &["strategy"]),
            faults: FaultCounters::new(&series, metrics, PluginKind::Strategy),
            _series: series,
        }
    }

    /// The version serving now.
    pub fn current(&self) -> Arc<PluginVersion> {
        self.versions.version()
    }

    /// The last loads, swaps and rejected swaps, oldest first.
    pub fn swap_history(&self) -> Vec<crate::plugin::SwapRecord> {
        self.versions.swap_history()
    }

    /// Faults counted so far, by reason.
    pub fn fault_totals(&self) -> [(&'static str, u64); 5] {
        self.faults.totals()
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
        let version = self.versions.swap(config_json, |generation, config| {
            validate(&self.engine, bytes, name, generation, config, table)
        })?;
        self.native.store(is_native(&version), Ordering::Relaxed);
        Ok(version)
    }

    /// Validates a candidate exactly as [`StrategyHost::swap`] would, without publishing it.
    pub fn prepare(
        &self,
        bytes: &[u8],
        name: &str,
        config_json: Arc<[u8]>,
        table: &Arc<BackendTable>,
    ) -> Result<Prepared, PluginError> {
        self.versions
            .prepare(Some(config_json), |generation, config| {
                validate(&self.engine, bytes, name, generation, config, table)
            })
    }

    /// Publishes a version from [`StrategyHost::prepare`]. Cannot fail.
    pub fn publish(&self, prepared: Prepared) -> Arc<PluginVersion> {
        let version = self.versions.publish(prepared);
        self.native.store(is_native(&version), Ordering::Relaxed);
        version
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
        if self.native.load(Ordering::Relaxed) {
            self.picks.inc();
            return self.fallback_pick(table, req);
        }
        let live = self.versions.load();
        let mut slot = live.state.get_or_default().borrow_mut();
        let outcome = (|| {
            if slot.instance.is_none() {
                if slot.retry_at.is_some_and(|t| Instant::now() < t) {
                    return Err(Fault::Backoff);
                }
                match Instance::new(
                    &self.engine,
                    &live.version,
                    self.counters.clone(),
                    Some(self.log_dropped.clone()),
                ) {
                    Ok(i) => slot.instance = Some(i),
                    Err(e) => return Err(Fault::Instantiate(e.to_string())),
                }
            }
            let instance = slot.instance.as_mut().ok_or(Fault::Backoff)?;
            instance.pick(table, req, attempt)
        })();
        match outcome {
            Ok(pick) => {
                slot.backoff = FIRST_BACKOFF;
                self.picks.inc();
                pick
            }
            Err(fault) => {
                self.poison(&mut slot, live.version.generation, &fault);
                self.fallbacks.inc();
                self.fallback_pick(table, req)
            }
        }
    }

    /// Drops a faulty instance and schedules its rebuild.
    fn poison(&self, slot: &mut Slot, generation: u64, fault: &Fault) {
        if matches!(fault, Fault::Backoff) {
            return;
        }
        self.faults.count(fault);
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

fn is_native(version: &PluginVersion) -> bool {
    version.name == crate::builtin::NATIVE_ROUND_ROBIN
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
    let mut instance = Instance::new(engine, &version, trial_counters, None)?;
    let (header, ()) = http::Request::new(()).into_parts();
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
