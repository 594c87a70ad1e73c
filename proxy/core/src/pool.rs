//! Pools: a pool owns its routing state (members, health, cluster hold, ejection, weights) and
//! the table built from it. Every change goes through a method here that rebuilds the table
//! under one lock and publishes it with `ArcSwap`; the request path only loads the table, picks,
//! and takes a [`Lease`].

use std::collections::{BTreeMap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::cold_lock::ColdLock;
use std::time::Duration;

use arc_swap::{ArcSwap, ArcSwapOption, Guard};
use prometheus::IntCounter;

use crate::backend::{Backend, BackendTable};
use crate::clock::now_ms;
use crate::config::{BackendSpec, PoolConfig};
use crate::dns::{DnsName, DnsState};
use crate::health::HealthHost;
use crate::lease::{Lease, LeaseOwner};
use crate::metrics::{Metrics, SeriesScope, Timings};
use crate::spawn::{InstanceStatus, SpawnSpec};
use crate::strategy::StrategyHost;

/// What an operator set on one backend through the runtime API. Kept by the pool per address,
/// so it outlives table rebuilds, membership changes that keep the address, and config reloads
/// that keep the pool; it is dropped when the address leaves the pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Override {
    /// Whether the backend takes new requests.
    pub mode: AdminMode,
    /// Replaces the configured weight while set.
    pub weight: Option<u32>,
}

/// An operator's say on whether a backend takes traffic.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum AdminMode {
    /// Routed as its health and ejection state allow.
    #[default]
    Active,
    /// No new requests; those in flight finish. Health checks go on.
    Draining,
    /// No new requests and no health checks.
    Disabled,
}

/// Largest weight the runtime API accepts (the config's own bound).
pub const MAX_WEIGHT: u32 = 1_000_000;

/// Per-pool upstream settings and balancing policies.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolSettings {
    /// Extra attempts after a failure that may be retried.
    pub retries: u32,
    /// Retry a connect failure on another backend (`retry_on` has `"connect-failure"`).
    pub retry_on_connect: bool,
    /// Also retry a 5xx answer (on another backend).
    pub retry_on_5xx: bool,
    /// Retry an idempotent request whose backend failed before answering (reset, closed, timed
    /// out), as nginx's `proxy_next_upstream error timeout` does.
    pub retry_on_error: bool,
    /// Retry non-idempotent methods too (a connect failure is always retried: it never reached the backend).
    pub retry_non_idempotent: bool,
    /// TCP connect timeout.
    pub connect_timeout: Duration,
    /// Read timeout.
    pub read_timeout: Duration,
    /// Upstream keep-alive idle timeout.
    pub idle_timeout: Duration,
    /// Passive outlier detection.
    pub outlier: crate::outlier::OutlierPolicy,
    /// Ramp a new or re-admitted backend's weight over this window (zero = off).
    pub slow_start: Duration,
    /// Below this percentage of routable members, balance over all members (0 = never).
    pub panic_threshold: u32,
    /// Prefer backends in the proxy's zone.
    pub zone_aware: bool,
    /// Spill out of the local zone when its in-flight requests per weight unit exceed this.
    pub zone_spill_inflight: u32,
    /// Active health-check schedule (the plugin itself is [`Pool::health`]).
    pub health: Option<HealthSchedule>,
    /// How often backend host names are resolved again.
    pub dns_refresh: Duration,
    /// The protocol and TLS settings backends are reached with.
    pub upstream: crate::upstream_tls::Upstream,
}

/// When and how often a pool's backends are probed.
#[derive(Debug, Clone, PartialEq)]
pub struct HealthSchedule {
    /// Time between probes of one backend.
    pub interval: Duration,
    /// Interval while the pool has no traffic.
    pub idle_interval: Duration,
    /// ± random spread per interval.
    pub jitter: Duration,
    /// Probe timeout.
    pub timeout: Duration,
    /// Passes to become healthy.
    pub rise: u32,
    /// Failures to become unhealthy.
    pub fall: u32,
    /// New backends start unhealthy (not routed until their first pass).
    pub start_unhealthy: bool,
    /// Probes at once.
    pub concurrency: u32,
}

/// Per-pool counters, resolved once; their series go when the pool does.
pub struct PoolCounters {
    /// Requests answered 503 for want of a backend.
    pub no_backend: IntCounter,
    /// Retries after a connect failure.
    pub retry_connect: IntCounter,
    /// Retries after a pooled connection turned out closed.
    pub retry_reused: IntCounter,
    /// Retries after a 5xx answer.
    pub retry_5xx: IntCounter,
    /// Retries after the backend failed before answering.
    pub retry_error: IntCounter,
    /// Responses aborted mid-body because the backend failed.
    pub upstream_aborts: IntCounter,
    /// Request duration, upstream connect and response time histograms.
    pub timings: Timings,
    /// Request body bytes read from clients.
    pub request_bytes: IntCounter,
    /// Response body bytes sent to clients.
    pub response_bytes: IntCounter,
    ejections: IntCounter,
    health_flaps: IntCounter,
    health_pass: IntCounter,
    health_fail: IntCounter,
    health_error: IntCounter,
    dns_failures: IntCounter,
    /// Spawned instances restarted.
    pub spawn_restarts: IntCounter,
    /// Cluster announcements into this pool refused by `[[cluster.allow]]`.
    pub cluster_refused: IntCounter,
    _series: SeriesScope,
}

impl PoolCounters {
    fn new(metrics: &Metrics, pool: &str) -> PoolCounters {
        let s = metrics.scope(&[pool]);
        PoolCounters {
            no_backend: s.counter(&metrics.no_backend, &[]),
            retry_connect: s.counter(&metrics.retries, &["connect"]),
            retry_reused: s.counter(&metrics.retries, &["reused"]),
            retry_5xx: s.counter(&metrics.retries, &["5xx"]),
            retry_error: s.counter(&metrics.retries, &["error"]),
            upstream_aborts: s.counter(&metrics.upstream_aborts, &[]),
            timings: s.timings(&metrics.pool_timings),
            request_bytes: s.counter(&metrics.request_bytes, &[]),
            response_bytes: s.counter(&metrics.response_bytes, &[]),
            ejections: s.counter(&metrics.ejections, &[]),
            health_flaps: s.counter(&metrics.health_flaps, &[]),
            health_pass: s.counter(&metrics.health_checks, &["pass"]),
            health_fail: s.counter(&metrics.health_checks, &["fail"]),
            health_error: s.counter(&metrics.health_checks, &["error"]),
            dns_failures: s.counter(&metrics.dns_failures, &[]),
            spawn_restarts: s.counter(&metrics.spawn_restarts, &[]),
            cluster_refused: s.counter(&metrics.cluster_refused, &[]),
            _series: s,
        }
    }
}

/// What an active health check concluded about a backend (see [`Pool::apply_health`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthUpdate {
    /// The plugin faulted: the backend's state stays.
    Error,
    /// A failed check; `down` when it crossed the fall threshold.
    Fail {
        /// Mark the backend unhealthy now.
        down: bool,
    },
    /// A passed check with a weight percentage; `up` when it crossed the rise threshold.
    Pass {
        /// Mark the backend healthy now.
        up: bool,
        /// Weight percentage (100 = full).
        factor: u32,
    },
}

/// A pool: its members, the routable table built from them, its strategy and its settings,
/// each swappable while traffic flows.
pub struct Pool {
    /// The pool's name.
    pub name: String,
    members: ArcSwap<Vec<Arc<Backend>>>,
    table: ArcSwap<BackendTable>,
    /// The strategy plugin.
    pub strategy: StrategyHost,
    settings: ArcSwap<PoolSettings>,
    health: ArcSwapOption<HealthHost>,
    metrics: Metrics,
    /// Counters of this pool.
    pub counters: PoolCounters,
    local_zone: Option<String>,
    /// Serializes table rebuilds; held only on membership changes, never per request.
    rebuild: ColdLock<()>,
    /// Requests routed to this pool (the health scheduler slows down while it does not move).
    requests: AtomicU64,
    /// Set while the "ejection cap reached" warning stands, so it is logged once per state.
    cap_warned: AtomicBool,
    /// Where members come from. Merged into `members`.
    sources: ColdLock<Sources>,
    /// Operator overrides by backend address (runtime API); written under `rebuild`.
    overrides: ArcSwap<HashMap<SocketAddr, Override>>,
    /// The `[[pool.spawn]]` tables of the applied config (the spawner runs them).
    spawns: ArcSwap<Vec<Arc<SpawnSpec>>>,
    /// What each spawned instance is doing, by name (written by its task, read by the API).
    instances: ColdLock<BTreeMap<String, InstanceStatus>>,
}

/// Where a pool's members come from, merged in this order (an address listed by an earlier
/// source is not added again).
#[derive(Default)]
struct Sources {
    /// Backends the config gives as addresses.
    addrs: Vec<BackendSpec>,
    /// Backends the config gives as host names, with their resolution state.
    dns: Vec<DnsState>,
    /// Spawned instances whose port accepts connections, by address.
    spawned: Vec<BackendSpec>,
    /// Backends announced by gossip cluster members.
    gossip: Vec<BackendSpec>,
}

impl Pool {
    /// A new pool with the given backends.
    pub fn new(
        name: &str,
        specs: &[BackendSpec],
        settings: PoolSettings,
        strategy: StrategyHost,
        metrics: Metrics,
        local_zone: Option<String>,
    ) -> Pool {
        let healthy = !settings.start_unhealthy();
        let members: Vec<Arc<Backend>> = specs
            .iter()
            .map(|s| Arc::new(Backend::new(&metrics, name, s, None, healthy)))
            .collect();
        let table = BackendTable::new(1, members.clone(), local_zone.as_deref());
        let pool = Pool {
            name: name.to_string(),
            members: ArcSwap::from_pointee(members),
            table: ArcSwap::from_pointee(table),
            strategy,
            settings: ArcSwap::from_pointee(settings),
            health: ArcSwapOption::empty(),
            counters: PoolCounters::new(&metrics, name),
            metrics,
            local_zone,
            rebuild: ColdLock::new(()),
            requests: AtomicU64::new(0),
            cap_warned: AtomicBool::new(false),
            sources: ColdLock::new(Sources {
                addrs: specs.to_vec(),
                ..Sources::default()
            }),
            overrides: ArcSwap::from_pointee(HashMap::new()),
            spawns: ArcSwap::from_pointee(Vec::new()),
            instances: ColdLock::new(BTreeMap::new()),
        };
        pool.rebuild_table();
        pool
    }

    /// Every member, routable or not.
    pub fn members(&self) -> Guard<Arc<Vec<Arc<Backend>>>> {
        self.members.load()
    }

    /// The routable table strategies pick from.
    pub fn table(&self) -> Guard<Arc<BackendTable>> {
        self.table.load()
    }

    /// The routable table, as an owned handle.
    pub fn table_full(&self) -> Arc<BackendTable> {
        self.table.load_full()
    }

    /// Upstream settings and policies.
    pub fn settings(&self) -> Guard<Arc<PoolSettings>> {
        self.settings.load()
    }

    /// The health-check plugin, when the pool has one.
    pub fn health(&self) -> Option<Arc<HealthHost>> {
        self.health.load_full()
    }

    /// Requests routed to this pool so far.
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Counts a request routed here.
    pub fn count_request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }

    /// Takes an in-flight slot on `backend` for one attempt.
    pub fn lease(self: &Arc<Self>, backend: Arc<Backend>) -> Lease {
        Lease::new(self.clone(), backend)
    }

    /// Replaces the settings; true when they changed. New backends take their initial health
    /// state from them, so a reload sets them before the backends.
    pub fn set_settings(&self, settings: PoolSettings) -> bool {
        let _guard = self.lock();
        if **self.settings.load() == settings {
            return false;
        }
        self.settings.store(Arc::new(settings));
        self.rebuild_locked(now_ms());
        true
    }

    /// Installs or removes the health-check plugin. Removing it marks every member healthy at
    /// full weight (nothing judges them any more).
    pub fn set_health_host(&self, host: Option<Arc<HealthHost>>) {
        let _guard = self.lock();
        let removed = host.is_none();
        self.health.store(host);
        if removed {
            let now = now_ms();
            for b in self.members.load().iter() {
                b.stats.set_healthy(true, now);
                b.stats.set_health_factor(100);
            }
            self.rebuild_locked(now);
        }
    }

    /// The operator's override of the backend at `addr` (the default when none is set).
    pub fn override_of(&self, addr: SocketAddr) -> Override {
        self.overrides
            .load()
            .get(&addr)
            .copied()
            .unwrap_or_default()
    }

    /// Changes the operator's override of the member at `addr` and rebuilds the table, so it
    /// applies to the next request. `None` when `addr` is not a member of this pool.
    pub fn set_override(
        &self,
        addr: SocketAddr,
        change: impl FnOnce(&mut Override),
    ) -> Option<Override> {
        let _guard = self.lock();
        if !self.members.load().iter().any(|b| b.addr == addr) {
            return None;
        }
        let mut map = HashMap::clone(&self.overrides.load());
        let o = map.entry(addr).or_default();
        change(o);
        let result = *o;
        if result == Override::default() {
            map.remove(&addr);
        }
        self.overrides.store(Arc::new(map));
        self.rebuild_locked(now_ms());
        Some(result)
    }

    /// Replaces the backends the config gives as addresses; host names and gossip members stay.
    /// True when members changed.
    pub fn set_static_backends(&self, specs: &[BackendSpec]) -> bool {
        let mut sources = self.sources.lock();
        sources.addrs = specs.to_vec();
        self.set_backends(&merge_sources(&sources))
    }

    /// Replaces the backends from the config file: `specs` given as addresses, `dns` as host
    /// names (already resolved); gossip members stay. True when members changed.
    pub fn set_config_backends(&self, specs: &[BackendSpec], dns: Vec<DnsState>) -> bool {
        let mut sources = self.sources.lock();
        sources.addrs = specs.to_vec();
        sources.dns = dns;
        self.set_backends(&merge_sources(&sources))
    }

    /// The resolution state of the pool's host names.
    pub fn dns_states(&self) -> Vec<DnsState> {
        self.sources.lock().dns.clone()
    }

    /// The host names due for a refresh at `now`, marked as being refreshed.
    pub fn due_dns_names(&self, now: u64) -> Vec<DnsName> {
        let mut sources = self.sources.lock();
        sources
            .dns
            .iter_mut()
            .filter(|s| !s.in_flight && s.next_due_ms <= now)
            .map(|s| {
                s.in_flight = true;
                s.name.clone()
            })
            .collect()
    }

    /// Applies a refresh of `name`: a changed answer replaces its backends (those whose address
    /// stays keep their statistics, leases and idle connections); a failure keeps the last good
    /// addresses and is counted and logged. True when members changed.
    pub fn dns_answer(&self, name: &DnsName, answer: Result<Vec<IpAddr>, String>) -> bool {
        let refresh = self.settings.load().dns_refresh;
        let mut sources = self.sources.lock();
        // A reload may have removed or changed the entry meanwhile: then the answer is stale.
        let Some(state) = sources.dns.iter_mut().find(|s| s.name == *name) else {
            return false;
        };
        if let Err(e) = &answer {
            self.counters.dns_failures.inc();
            tracing::warn!(pool = %self.name, name = %name.label(), error = %e, kept = ?state.addrs, "DNS refresh failed; keeping the last good addresses");
        }
        let before = state.addrs.clone();
        if !state.record(answer, refresh) {
            return false;
        }
        tracing::info!(pool = %self.name, name = %name.label(), before = ?before, after = ?state.addrs, "DNS answer changed; updating the pool");
        self.set_backends(&merge_sources(&sources))
    }

    /// The pool's `[[pool.spawn]]` tables.
    pub fn spawns(&self) -> Arc<Vec<Arc<SpawnSpec>>> {
        self.spawns.load_full()
    }

    /// Replaces the spawn tables (a reload); true when they changed. Running instances follow
    /// through the spawner.
    pub fn set_spawns(&self, specs: Vec<Arc<SpawnSpec>>) -> bool {
        let current = self.spawns.load();
        let same = current.len() == specs.len() && current.iter().zip(&specs).all(|(a, b)| a == b);
        if same {
            return false;
        }
        self.spawns.store(Arc::new(specs));
        true
    }

    /// Adds (`member`) or removes a spawned instance's address; true when members changed.
    pub fn set_spawned_member(&self, spec: BackendSpec, member: bool) -> bool {
        let mut sources = self.sources.lock();
        let at = sources.spawned.iter().position(|s| s.addr == spec.addr);
        match (at, member) {
            (None, true) => {
                sources.spawned.push(spec);
                sources.spawned.sort_by_key(|s| s.addr);
            }
            (Some(i), false) => {
                sources.spawned.remove(i);
            }
            _ => return false,
        }
        self.set_backends(&merge_sources(&sources))
    }

    /// The member at `addr`, if any.
    pub fn member_at(&self, addr: SocketAddr) -> Option<Arc<Backend>> {
        self.members.load().iter().find(|b| b.addr == addr).cloned()
    }

    /// Records what a spawned instance is doing.
    pub fn set_instance_status(&self, status: InstanceStatus) {
        self.instances.lock().insert(status.name.clone(), status);
    }

    /// Forgets a spawned instance that stopped for good.
    pub fn remove_instance_status(&self, name: &str) {
        self.instances.lock().remove(name);
    }

    /// Every spawned instance, by name.
    pub fn instance_status(&self) -> Vec<InstanceStatus> {
        self.instances.lock().values().cloned().collect()
    }

    /// Replaces the backends announced by cluster members (with whether each is held: its member
    /// is suspect or draining); static ones stay. True when the table changed.
    pub fn set_gossip_backends(&self, specs: &[(BackendSpec, bool)]) -> bool {
        let mut sources = self.sources.lock();
        let plain: Vec<BackendSpec> = specs.iter().map(|(s, _)| s.clone()).collect();
        let mut changed = false;
        if sources.gossip != plain {
            sources.gossip = plain;
            changed = self.set_backends(&merge_sources(&sources));
        }
        drop(sources);
        let _guard = self.lock();
        let mut held = false;
        for b in self.members.load().iter() {
            let hold = specs.iter().any(|(g, h)| g.addr == b.addr && *h);
            held |= b.stats.set_hold(hold);
        }
        if held {
            changed |= self.rebuild_locked(now_ms());
        }
        changed
    }

    /// Applies an active health check's conclusion about `backend`; true when its state or
    /// weight changed (the table is rebuilt then).
    pub fn apply_health(&self, backend: &Backend, update: HealthUpdate) -> bool {
        let c = &self.counters;
        match update {
            HealthUpdate::Error => c.health_error.inc(),
            HealthUpdate::Fail { .. } => c.health_fail.inc(),
            HealthUpdate::Pass { .. } => c.health_pass.inc(),
        }
        let _guard = self.lock();
        let now = now_ms();
        let stats = &backend.stats;
        let (flapped, reweighed) = match update {
            HealthUpdate::Error => return false,
            HealthUpdate::Fail { down } => (down && stats.set_healthy(false, now), false),
            HealthUpdate::Pass { up, factor } => (
                up && stats.set_healthy(true, now),
                stats.set_health_factor(factor),
            ),
        };
        if flapped {
            c.health_flaps.inc();
            tracing::info!(pool = %self.name, backend = %backend.addr_text, healthy = stats.is_healthy(), "backend health changed");
        }
        if flapped || reweighed {
            self.rebuild_locked(now);
        }
        flapped || reweighed
    }

    /// Called when a lease that recorded an outcome ends: ejects the backend when it crossed
    /// the failure threshold. The common case is two atomic loads; a failing backend is decided
    /// by the one request that wins a compare-and-swap, which alone takes the rebuild lock.
    fn eject_if_failing(&self, backend: &Backend) {
        let settings = self.settings.load();
        let policy = &settings.outlier;
        let stats = &backend.stats;
        if !policy.should_eject(stats.failures()) || !stats.try_begin_ejection() {
            return;
        }
        {
            let _guard = self.lock();
            let now = now_ms();
            if !stats.is_ejected(now) && policy.should_eject(stats.failures()) {
                let members = self.members.load();
                let ejected = members.iter().filter(|b| b.stats.is_ejected(now)).count();
                let cap = policy.cap(members.len());
                if ejected >= cap {
                    if !self.cap_warned.swap(true, Ordering::Relaxed) {
                        tracing::warn!(pool = %self.name, backend = %backend.addr_text, ejected, cap, "outlier not ejected: the pool's ejection cap is reached (logged once until the ejected set changes)");
                    }
                } else {
                    let n = stats.ejections() + 1;
                    let time = policy.ejection_time(n);
                    stats.eject(now + time.as_millis() as u64);
                    self.counters.ejections.inc();
                    self.cap_warned.store(false, Ordering::Relaxed);
                    tracing::warn!(
                        pool = %self.name, backend = %backend.addr_text, failures = stats.failures(), ejection = n, duration = ?time,
                        "backend ejected by outlier detection"
                    );
                    self.rebuild_locked(now);
                }
            }
        }
        stats.end_ejection();
    }

    /// Time-driven upkeep, run by a background ticker: re-admits backends whose ejection ended,
    /// forgets ejections after a clean period, and rebuilds the table when anything
    /// time-dependent (slow start, zone load) changed.
    pub fn maintain(&self) {
        self.maintain_at(now_ms());
    }

    /// [`Pool::maintain`] as of `now` (tests drive it on virtual time).
    fn maintain_at(&self, now: u64) {
        let _guard = self.lock();
        let max = self.settings.load().outlier.max_ejection_time.as_millis() as u64;
        for b in self.members.load().iter() {
            let until = b.stats.ejected_until_ms();
            if until != 0 && until <= now {
                b.stats.readmit(now);
                self.cap_warned.store(false, Ordering::Relaxed);
                tracing::info!(pool = %self.name, backend = %b.addr_text, "ejected backend re-admitted");
            } else if until == 0
                && b.stats.ejections() > 0
                && now.saturating_sub(b.stats.admitted_at_ms()) > max
            {
                b.stats.forget_ejections();
            }
        }
        self.rebuild_locked(now);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, ()> {
        self.rebuild.lock()
    }

    /// Replaces all members, keeping the statistics of backends whose address stays.
    /// Returns true when the membership changed.
    fn set_backends(&self, specs: &[BackendSpec]) -> bool {
        let _guard = self.lock();
        let old = self.members.load_full();
        let same = old.len() == specs.len()
            && old.iter().zip(specs).all(|(b, s)| {
                b.addr == s.addr && b.weight == s.weight && b.zone == s.zone && b.tags == s.tags
            });
        if same {
            return false;
        }
        let now = now_ms();
        let healthy = !self.settings.load().start_unhealthy();
        let members: Vec<_> = specs
            .iter()
            .map(|s| {
                let previous = old.iter().find(|b| b.addr == s.addr);
                let is_new = previous.is_none();
                // With health checks a new backend is not routed before its first pass.
                let b = Arc::new(Backend::new(
                    &self.metrics,
                    &self.name,
                    s,
                    previous.map(|b| &**b),
                    healthy,
                ));
                if is_new {
                    // A backend joining a running pool starts its slow-start ramp now.
                    b.stats.set_admitted(now);
                }
                b
            })
            .collect();
        // An override lasts while its address is a member.
        let overrides = self.overrides.load();
        if overrides
            .keys()
            .any(|a| !members.iter().any(|b| b.addr == *a))
        {
            let kept = overrides
                .iter()
                .filter(|(a, _)| members.iter().any(|b| b.addr == **a))
                .map(|(a, o)| (*a, *o))
                .collect();
            self.overrides.store(Arc::new(kept));
        }
        // Removed backends' statistics (and so their series) go with the last table that
        // holds them.
        self.members.store(Arc::new(members));
        self.rebuild_locked(now);
        true
    }

    /// Recomputes the routable table from members, health, ejections, zone and slow start.
    /// Publishes (and so pushes to the strategy) only when something changed.
    pub fn rebuild_table(&self) -> bool {
        let _guard = self.lock();
        self.rebuild_locked(now_ms())
    }

    fn rebuild_locked(&self, now: u64) -> bool {
        let all = self.members.load();
        let policy = self.settings.load();
        let overrides = self.overrides.load();
        let weight_of = |b: &Backend| {
            overrides
                .get(&b.addr)
                .and_then(|o| o.weight)
                .unwrap_or(b.weight)
        };
        // Drained and disabled backends are out of everything below, panic mode included.
        let members: Vec<Arc<Backend>> = all
            .iter()
            .filter(|b| {
                overrides
                    .get(&b.addr)
                    .is_none_or(|o| o.mode == AdminMode::Active)
            })
            .cloned()
            .collect();
        let routable: Vec<Arc<Backend>> = members
            .iter()
            .filter(|b| b.stats.is_routable(now))
            .cloned()
            .collect();
        // Panic mode (Envoy's panic threshold): with too few routable members, a partial outage
        // would overload the survivors, so balance over everyone and let retries sort it out.
        let panic = !members.is_empty()
            && policy.panic_threshold > 0
            && (routable.len() as u64) * 100
                < u64::from(policy.panic_threshold) * members.len() as u64;
        let mut chosen = if panic { members.clone() } else { routable };
        if let (true, Some(zone)) = (policy.zone_aware, self.local_zone.as_deref()) {
            let local: Vec<Arc<Backend>> =
                chosen.iter().filter(|b| b.zone == zone).cloned().collect();
            let local_members = members.iter().filter(|b| b.zone == zone).count();
            let weight: u64 = local.iter().map(|b| u64::from(weight_of(b))).sum();
            let inflight: i64 = local.iter().map(|b| b.stats.inflight().max(0)).sum();
            // Stay local while most local members are routable and they are not overloaded.
            let healthy_enough = local.len() * 10 >= local_members * 7;
            let overloaded =
                weight > 0 && inflight as u64 > weight * u64::from(policy.zone_spill_inflight);
            if !local.is_empty() && healthy_enough && !overloaded && local.len() < chosen.len() {
                chosen = local;
            }
        }
        // Weights are scaled by 100 only while some backend is degraded or ramping, so that
        // fractions have resolution; otherwise strategies see the configured weights.
        let scaled = chosen
            .iter()
            .any(|b| b.stats.health_factor() < 100 || ramping(b, policy.slow_start, now));
        let weights: Vec<u32> = chosen
            .iter()
            .map(|b| effective_weight(b, weight_of(b), policy.slow_start, now, scaled))
            .collect();
        let current = self.table.load();
        let unchanged = current.panic == panic
            && current.weights == weights
            && current.backends.len() == chosen.len()
            && current
                .backends
                .iter()
                .zip(&chosen)
                .all(|(a, b)| Arc::ptr_eq(a, b));
        if unchanged {
            return false;
        }
        let table = BackendTable::with_weights(
            current.generation + 1,
            chosen,
            weights,
            self.local_zone.as_deref(),
            panic,
        );
        self.table.store(Arc::new(table));
        true
    }
}

impl LeaseOwner for Pool {
    fn name(&self) -> &str {
        &self.name
    }

    fn after_request(&self, backend: &Backend) {
        self.eject_if_failing(backend);
    }
}

impl PoolSettings {
    /// New backends start unhealthy (health checks with `initial = "unhealthy"`).
    pub fn start_unhealthy(&self) -> bool {
        self.health.as_ref().is_some_and(|h| h.start_unhealthy)
    }
}

impl PoolSettings {
    /// The pool's settings with its upstream protocol and TLS material loaded (files relative to
    /// `config`'s file); the error names the problem.
    pub fn load(pc: &PoolConfig, config: &crate::config::Config) -> Result<PoolSettings, String> {
        let mut settings = PoolSettings::from(pc);
        settings.upstream = crate::upstream_tls::Upstream::load(pc, config)?;
        Ok(settings)
    }
}

/// The settings without the upstream TLS material, which needs files: see [`PoolSettings::load`].
impl From<&PoolConfig> for PoolSettings {
    fn from(pc: &PoolConfig) -> PoolSettings {
        let o = &pc.outlier;
        let health = pc.health.as_ref().map(|h| {
            let h = h.get_ref();
            HealthSchedule {
                interval: h.interval,
                idle_interval: h.idle_interval.unwrap_or(h.interval * 5),
                jitter: h.jitter.unwrap_or(h.interval / 10),
                timeout: h.timeout,
                rise: h.rise,
                fall: h.fall,
                start_unhealthy: h.initial == crate::config::InitialHealth::Unhealthy,
                concurrency: h.concurrency,
            }
        });
        PoolSettings {
            retries: pc.retries,
            retry_on_connect: pc
                .retry_on
                .contains(&crate::config::RetryOn::ConnectFailure),
            retry_on_5xx: pc.retry_on.contains(&crate::config::RetryOn::Status5xx),
            retry_on_error: pc.retry_on.contains(&crate::config::RetryOn::Error),
            retry_non_idempotent: pc.retry_non_idempotent,
            connect_timeout: pc.connect_timeout,
            read_timeout: pc.read_timeout,
            idle_timeout: pc.idle_timeout,
            outlier: crate::outlier::OutlierPolicy {
                enabled: o.enabled,
                consecutive_failures: o.consecutive_failures,
                base_ejection_time: o.base_ejection_time,
                max_ejection_time: o.max_ejection_time,
                max_ejected_percent: o.max_ejected_percent,
            },
            slow_start: pc.slow_start,
            panic_threshold: pc.panic_threshold,
            zone_aware: pc.zone_aware,
            zone_spill_inflight: pc.zone_spill_inflight,
            health,
            dns_refresh: pc.dns_refresh,
            upstream: crate::upstream_tls::Upstream {
                protocol: pc.protocol,
                tls: None,
            },
        }
    }
}

impl Default for PoolSettings {
    /// The settings of a pool configured with nothing but its name.
    fn default() -> PoolSettings {
        let pc: PoolConfig =
            toml::from_str("name = \"default\"").expect("a pool needs only a name");
        PoolSettings::from(&pc)
    }
}

/// The members a pool gets from its config: `specs` given as addresses, then the addresses of
/// the resolved names `dns` (each address once).
pub fn config_members(specs: &[BackendSpec], dns: &[DnsState]) -> Vec<BackendSpec> {
    merge_sources(&Sources {
        addrs: specs.to_vec(),
        dns: dns.to_vec(),
        spawned: Vec::new(),
        gossip: Vec::new(),
    })
}

/// Addresses from the config first, then resolved names, then spawned instances, then gossip
/// entries, each address once.
fn merge_sources(sources: &Sources) -> Vec<BackendSpec> {
    let mut all = sources.addrs.clone();
    let more = sources
        .dns
        .iter()
        .flat_map(DnsState::specs)
        .chain(sources.spawned.iter().cloned())
        .chain(sources.gossip.iter().cloned());
    for spec in more {
        if !all.iter().any(|s| s.addr == spec.addr) {
            all.push(spec);
        }
    }
    all
}

/// True while `b` is in its slow-start window.
fn ramping(b: &Backend, slow_start: Duration, now: u64) -> bool {
    let admitted = b.stats.admitted_at_ms();
    !slow_start.is_zero()
        && admitted != 0
        && now.saturating_sub(admitted) < slow_start.as_millis() as u64
}

/// `weight` with the health factor and slow start of `b` applied; `scaled` multiplies by 100
/// first.
fn effective_weight(b: &Backend, weight: u32, slow_start: Duration, now: u64, scaled: bool) -> u32 {
    if !scaled {
        return weight;
    }
    let mut w =
        f64::from(weight) * 100.0 * f64::from(b.stats.health_factor().clamp(1, 100)) / 100.0;
    if ramping(b, slow_start, now) {
        let since = now.saturating_sub(b.stats.admitted_at_ms()) as f64;
        // Linear ramp from 10 % (a fresh backend still gets some traffic to warm up).
        w *= 0.1 + 0.9 * since / slow_start.as_millis().max(1) as f64;
    }
    (w as u32).max(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lease::Outcome;
    use crate::plugin::PluginEngine;

    /// A pool of `n` loopback backends with the built-in round-robin and default policies.
    fn pool(n: u16, settings: PoolSettings) -> Arc<Pool> {
        let metrics = Metrics::new();
        let engine = PluginEngine::new().unwrap();
        let specs: Vec<BackendSpec> = (0..n).map(|i| BackendSpec::loopback(9000 + i)).collect();
        let table = Arc::new(BackendTable::from_specs(&specs, &metrics, "t", None));
        let wasm = crate::builtin::get("round-robin").unwrap();
        let first = StrategyHost::prepare_first(&engine, wasm, "rr", Arc::from(&b"{}"[..]), &table)
            .unwrap();
        let strategy = StrategyHost::new(&engine, "t", first, &metrics);
        Arc::new(Pool::new("t", &specs, settings, strategy, metrics, None))
    }

    fn fail(pool: &Arc<Pool>, i: usize, times: u32) {
        let b = pool.members()[i].clone();
        for _ in 0..times {
            let mut lease = pool.lease(b.clone());
            lease.set_outcome(Outcome::Failed);
        }
    }

    #[test]
    fn leases_release_their_slot_whatever_the_outcome() {
        let p = pool(2, PoolSettings::default());
        let b = p.members()[0].clone();
        let leases: Vec<_> = (0..3).map(|_| p.lease(b.clone())).collect();
        assert_eq!(b.stats.inflight(), 3);
        drop(leases);
        assert_eq!(b.stats.inflight(), 0);
        assert_eq!(
            b.stats.requests_in_class(1),
            0,
            "unknown outcomes record nothing"
        );
        let mut l = p.lease(b.clone());
        l.set_outcome(Outcome::Status(200));
        drop(l);
        assert_eq!(b.stats.requests_in_class(1), 1);
    }

    #[test]
    fn consecutive_failures_eject_then_time_readmits() {
        let p = pool(3, PoolSettings::default());
        fail(&p, 0, 4);
        assert_eq!(p.table().len(), 3, "four failures are below the threshold");
        fail(&p, 0, 1);
        assert_eq!(p.table().len(), 2, "the fifth ejects");
        assert!(p.members()[0].stats.is_ejected(now_ms()));
        assert_eq!(p.counters.ejections.get(), 1);
        // 30 s later (virtual time), the backend comes back with its failures forgiven.
        p.maintain_at(now_ms() + 31_000);
        assert_eq!(p.table().len(), 3);
        assert_eq!(p.members()[0].stats.failures(), 0);
        // A second ejection lasts twice as long.
        fail(&p, 0, 5);
        let until = p.members()[0].stats.ejected_until_ms();
        assert!(until >= now_ms() + 59_000, "second ejection is 60 s");
    }

    #[test]
    fn the_ejection_cap_holds_and_warns_once() {
        let p = pool(2, PoolSettings::default());
        fail(&p, 0, 5);
        fail(&p, 1, 5);
        assert_eq!(p.table().len(), 1, "only one of two may be ejected");
        assert!(p.cap_warned.load(Ordering::Relaxed));
        fail(&p, 1, 5);
        assert_eq!(p.counters.ejections.get(), 1);
        // Re-admission clears the warning state, so the next refusal is logged again.
        p.maintain_at(now_ms() + 31_000);
        assert!(!p.cap_warned.load(Ordering::Relaxed));
    }

    #[test]
    fn retry_on_selects_what_is_retried() {
        let settings = |text: &str| {
            let pc: PoolConfig = toml::from_str(&format!("name = \"p\"\n{text}")).unwrap();
            let s = PoolSettings::from(&pc);
            (s.retry_on_connect, s.retry_on_error, s.retry_on_5xx)
        };
        assert_eq!(settings(""), (true, true, false), "the default");
        assert_eq!(settings("retry_on = [\"5xx\"]"), (false, false, true));
        assert_eq!(settings("retry_on = []"), (false, false, false));
    }

    #[test]
    fn spawned_instances_join_and_leave_beside_the_static_backends() {
        let p = pool(2, PoolSettings::default());
        let instance = BackendSpec::loopback(9100);
        assert!(p.set_spawned_member(instance.clone(), true));
        assert!(
            !p.set_spawned_member(instance.clone(), true),
            "already a member"
        );
        assert_eq!(p.table().len(), 3);
        assert!(p.member_at(instance.addr).is_some());
        // A reload of the static backends keeps the instance.
        p.set_static_backends(&[BackendSpec::loopback(9000)]);
        let addrs: Vec<u16> = p.members().iter().map(|b| b.addr.port()).collect();
        assert_eq!(addrs, vec![9000, 9100]);
        assert!(p.set_spawned_member(instance.clone(), false));
        assert!(p.member_at(instance.addr).is_none());
        assert_eq!(p.table().len(), 1);
    }

    #[test]
    fn health_updates_go_through_the_pool() {
        let p = pool(2, PoolSettings::default());
        let b = p.members()[1].clone();
        assert!(p.apply_health(&b, HealthUpdate::Fail { down: true }));
        assert_eq!(p.table().len(), 1);
        assert!(
            !p.apply_health(&b, HealthUpdate::Error),
            "an error changes nothing"
        );
        assert!(p.apply_health(
            &b,
            HealthUpdate::Pass {
                up: true,
                factor: 50
            }
        ));
        assert_eq!(p.table().len(), 2);
        assert_eq!(
            p.table().weights,
            vec![100, 50],
            "degraded weights are scaled"
        );
        // Cluster holds: held backends stay members but leave the table.
        let held = vec![(BackendSpec::loopback(9000), true)];
        p.set_gossip_backends(&held);
        assert_eq!(p.members().len(), 2);
        assert_eq!(p.table().len(), 1);
    }
}
