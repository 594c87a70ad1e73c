//! The running state of a proxy, built from a [`Config`] and replaced piece by piece on reload
//! or hot swap. Everything the request path reads sits behind an `ArcSwap`; changes are prepared
//! and validated completely before anything is published, so a bad file or plugin changes nothing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::builtin;
use crate::config::{Config, HealthConfig, PluginRef, PoolConfig};
use crate::health::HealthHost;
use crate::metrics::Metrics;
use crate::plugin::{PluginEngine, PluginError, PluginVersion};
use crate::pool::{BackendTable, Pool, PoolSettings};
use crate::route::{Route, Router};
use crate::strategy::StrategyHost;

/// Why a reload or swap was refused.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ApplyError {
    /// The config file is invalid.
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    /// A plugin was refused.
    #[error("pool \"{pool}\": strategy {plugin}: {source}")]
    Plugin {
        /// Pool.
        pool: String,
        /// Plugin source.
        plugin: String,
        /// Why.
        source: PluginError,
    },
    /// No such pool.
    #[error("no pool named \"{0}\"; GET /api/pools lists the pools")]
    UnknownPool(String),
    /// Health swap on a pool without health checks.
    #[error("pool \"{0}\" has no health checks; add `health = {{ plugin = \"builtin:http\", ... }}` to the pool in the config and reload first")]
    NoHealth(String),
    /// Reload without a file (demo mode).
    #[error("this proxy was not started from a config file, so there is nothing to reload")]
    NoConfigFile,
}

/// What a successful reload did.
#[derive(Debug, Default, serde::Serialize)]
pub struct ReloadReport {
    /// Pools created.
    pub added: Vec<String>,
    /// Pools removed.
    pub removed: Vec<String>,
    /// Pools whose backends, settings or strategy changed.
    pub changed: Vec<String>,
    /// Things that need a restart to take effect.
    pub warnings: Vec<String>,
}

/// The proxy's live state.
pub struct Runtime {
    /// The plugin engine.
    pub engine: PluginEngine,
    /// Metrics.
    pub metrics: Metrics,
    pools: ArcSwap<HashMap<String, Arc<Pool>>>,
    router: ArcSwap<Router>,
    /// The strategy entry of the config each pool was last loaded from (to tell whether a reload
    /// changes it; an unchanged entry keeps a plugin hot-swapped through the API).
    pool_sources: Mutex<HashMap<String, (PluginRef, Option<HealthConfig>)>>,
    config: ArcSwap<Config>,
    config_path: Option<PathBuf>,
    /// Serializes reloads and swaps against each other (never taken on the request path).
    admin_lock: Mutex<()>,
    /// This proxy's cluster member, when `[cluster]` is configured.
    pub cluster: std::sync::OnceLock<crate::cluster::ClusterHandle>,
}

impl Runtime {
    /// Builds the state for `config`, validating every plugin.
    pub fn new(
        config: Config,
        config_path: Option<PathBuf>,
        engine: PluginEngine,
        metrics: Metrics,
    ) -> Result<Runtime, ApplyError> {
        let rt = Runtime {
            engine,
            metrics,
            pools: ArcSwap::from_pointee(HashMap::new()),
            router: ArcSwap::from_pointee(Router::new(Vec::new())),
            pool_sources: Mutex::new(HashMap::new()),
            config: ArcSwap::from_pointee(config.clone()),
            config_path,
            admin_lock: Mutex::new(()),
            cluster: std::sync::OnceLock::new(),
        };
        rt.apply(config)?;
        Ok(rt)
    }

    /// The current router.
    pub fn router(&self) -> arc_swap::Guard<Arc<Router>> {
        self.router.load()
    }

    /// A pool by name.
    pub fn pool(&self, name: &str) -> Option<Arc<Pool>> {
        self.pools.load().get(name).cloned()
    }

    /// All pools, sorted by name.
    pub fn pools(&self) -> Vec<Arc<Pool>> {
        let mut v: Vec<_> = self.pools.load().values().cloned().collect();
        v.sort_by(|a, b| a.name.cmp(&b.name));
        v
    }

    /// Time-driven pool upkeep: re-admits ejected backends, advances slow start, re-evaluates
    /// zone load. Called by a background ticker.
    pub fn maintain(&self) {
        for pool in self.pools.load().values() {
            crate::outlier::maintain(pool);
        }
    }

    /// The config currently applied.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// Re-reads the config file and applies it.
    pub fn reload(&self) -> Result<ReloadReport, ApplyError> {
        let path = self.config_path.as_ref().ok_or(ApplyError::NoConfigFile)?;
        let result = Config::load(path)
            .map_err(ApplyError::from)
            .and_then(|cfg| self.apply(cfg));
        let label = if result.is_ok() { "ok" } else { "rejected" };
        self.metrics.reloads.with_label_values(&[label]).inc();
        match &result {
            Ok(r) => {
                tracing::info!(added = ?r.added, removed = ?r.removed, changed = ?r.changed, "config reloaded")
            }
            Err(e) => {
                tracing::error!(error = %e, "config reload rejected; the running config stays")
            }
        }
        result
    }

    /// Applies a validated config: prepares every pool first, then publishes all at once.
    pub fn apply(&self, cfg: Config) -> Result<ReloadReport, ApplyError> {
        let _guard = self.admin_lock.lock().unwrap_or_else(|p| p.into_inner());
        let old_pools = self.pools.load_full();
        let old_cfg = self.config.load_full();
        let mut report = ReloadReport::default();
        if !old_pools.is_empty() {
            if listen_set(&old_cfg) != listen_set(&cfg) {
                report
                    .warnings
                    .push("listen addresses changed; restart sluice to apply them".into());
            }
            if old_cfg.server.threads != cfg.server.threads {
                report
                    .warnings
                    .push("[server] threads changed; restart sluice to apply it".into());
            }
        }
        let zone = cfg.server.zone.clone();
        let mut sources = self.pool_sources.lock().unwrap_or_else(|p| p.into_inner());

        // Phase 1: prepare. Nothing live is touched; any error returns here.
        enum Plan {
            New(Arc<Pool>),
            Update {
                pool: Arc<Pool>,
                backends: Vec<crate::config::BackendSpec>,
                strategy: Option<(Vec<u8>, String, Arc<[u8]>)>,
                health: HealthPlan,
            },
        }
        let mut plans = Vec::new();
        for pc in &cfg.pool {
            let name = pc.name.get_ref().clone();
            let specs = Config::backends(pc);
            let settings = settings_of(pc);
            let plugin_ref = pc.strategy.get_ref().clone();
            let plugin_err = |source: PluginError| ApplyError::Plugin {
                pool: name.clone(),
                plugin: plugin_ref.source().to_string(),
                source,
            };
            match old_pools.get(&name) {
                Some(pool) => {
                    let new_health = pc.health.as_ref().map(|h| h.get_ref().clone());
                    let health = if sources.get(&name).is_some_and(|(_, h)| *h == new_health) {
                        HealthPlan::Keep
                    } else if let Some(hc) = &new_health {
                        let loaded = self
                            .load_health(hc, &cfg, pool.members.load().first().map(|b| &**b))
                            .map_err(|source| ApplyError::Plugin {
                                pool: name.clone(),
                                plugin: hc.plugin.clone(),
                                source,
                            })?;
                        HealthPlan::Set(loaded.0, loaded.1, loaded.2)
                    } else {
                        HealthPlan::Remove
                    };
                    let unchanged = sources.get(&name).is_some_and(|(r, _)| *r == plugin_ref);
                    let strategy = if unchanged {
                        None
                    } else {
                        let (bytes, display) =
                            builtin::load_source(plugin_ref.source(), &cfg.base_dir)
                                .map_err(|m| plugin_err(PluginError::Source(m)))?;
                        // Validate against the table the pool will have after this reload.
                        let trial = Arc::new(BackendTable::new(
                            0,
                            prospective(pool, &specs, &self.metrics),
                            zone.as_deref(),
                        ));
                        pool.strategy
                            .check(&bytes, &display, plugin_ref.config_json().into(), &trial)
                            .map_err(plugin_err)?;
                        Some((bytes, display, Arc::<[u8]>::from(plugin_ref.config_json())))
                    };
                    plans.push(Plan::Update {
                        pool: pool.clone(),
                        backends: specs,
                        strategy,
                        health,
                    });
                }
                None => {
                    let (bytes, display) = builtin::load_source(plugin_ref.source(), &cfg.base_dir)
                        .map_err(|m| plugin_err(PluginError::Source(m)))?;
                    let pool = self
                        .new_pool(
                            &name,
                            &specs,
                            settings,
                            &bytes,
                            &display,
                            plugin_ref.config_json().into(),
                            zone.clone(),
                        )
                        .map_err(plugin_err)?;
                    if let Some(hc) = &pc.health {
                        let hc = hc.get_ref();
                        let herr = |source| ApplyError::Plugin {
                            pool: name.clone(),
                            plugin: hc.plugin.clone(),
                            source,
                        };
                        let (bytes, display, config) = self
                            .load_health(hc, &cfg, pool.members.load().first().map(|b| &**b))
                            .map_err(herr)?;
                        let first = pool.members.load().first().cloned();
                        let host = HealthHost::new(
                            &self.engine,
                            &name,
                            &bytes,
                            &display,
                            config,
                            first.as_deref(),
                            &self.metrics,
                        )
                        .map_err(herr)?;
                        pool.health.store(Some(Arc::new(host)));
                    }
                    plans.push(Plan::New(Arc::new(pool)));
                }
            }
        }

        // Phase 2: publish.
        let mut pools = HashMap::new();
        for plan in plans {
            match plan {
                Plan::New(pool) => {
                    report.added.push(pool.name.clone());
                    pools.insert(pool.name.clone(), pool);
                }
                Plan::Update {
                    pool,
                    backends,
                    strategy,
                    health,
                } => {
                    let pc = cfg
                        .pool
                        .iter()
                        .find(|p| *p.name.get_ref() == pool.name)
                        .expect("planned from cfg");
                    let settings = settings_of(pc);
                    // Settings first: new backends take their initial health state from them.
                    let mut changed = false;
                    if **pool.settings.load() != settings {
                        pool.settings.store(Arc::new(settings));
                        changed = true;
                    }
                    changed |= pool.set_static_backends(&backends);
                    match health {
                        HealthPlan::Keep => {}
                        HealthPlan::Remove => {
                            pool.health.store(None);
                            for b in pool.members.load().iter() {
                                b.stats
                                    .healthy
                                    .store(true, std::sync::atomic::Ordering::Relaxed);
                                b.stats
                                    .health_factor
                                    .store(100, std::sync::atomic::Ordering::Relaxed);
                            }
                            changed = true;
                        }
                        HealthPlan::Set(bytes, display, config) => {
                            let first = pool.members.load().first().cloned();
                            let result = match pool.health.load_full() {
                                Some(host) => host
                                    .swap(&bytes, &display, Some(config), first.as_deref())
                                    .map(drop),
                                None => HealthHost::new(
                                    &self.engine,
                                    &pool.name,
                                    &bytes,
                                    &display,
                                    config,
                                    first.as_deref(),
                                    &self.metrics,
                                )
                                .map(|h| pool.health.store(Some(Arc::new(h)))),
                            };
                            if let Err(e) = result {
                                report.warnings.push(format!(
                                    "pool \"{}\": health check not changed: {e}",
                                    pool.name
                                ));
                            }
                            changed = true;
                        }
                    }
                    pool.rebuild_table();
                    if let Some((bytes, display, config)) = strategy {
                        let table = pool.table.load_full();
                        if let Err(e) = pool.strategy.swap(&bytes, &display, Some(config), &table) {
                            // Validated in phase 1 against the same table; only a resource limit
                            // can get here. The old version keeps serving.
                            report
                                .warnings
                                .push(format!("pool \"{}\": strategy not swapped: {e}", pool.name));
                        }
                        changed = true;
                    }
                    if changed {
                        report.changed.push(pool.name.clone());
                    }
                    pools.insert(pool.name.clone(), pool);
                }
            }
        }
        for name in old_pools.keys().filter(|n| !pools.contains_key(*n)) {
            report.removed.push(name.clone());
        }
        let routes = cfg
            .route
            .iter()
            .map(|r| Route {
                host: r.host.as_ref().map(|h| h.to_ascii_lowercase()),
                path_prefix: r.path_prefix.clone(),
                pool: pools[r.pool.get_ref()].clone(),
            })
            .collect();
        sources.clear();
        for pc in &cfg.pool {
            sources.insert(
                pc.name.get_ref().clone(),
                (
                    pc.strategy.get_ref().clone(),
                    pc.health.as_ref().map(|h| h.get_ref().clone()),
                ),
            );
        }
        self.pools.store(Arc::new(pools));
        self.router.store(Arc::new(Router::new(routes)));
        self.config.store(Arc::new(cfg));
        Ok(report)
    }

    #[allow(clippy::too_many_arguments)]
    fn new_pool(
        &self,
        name: &str,
        specs: &[crate::config::BackendSpec],
        settings: PoolSettings,
        bytes: &[u8],
        display: &str,
        config_json: Arc<[u8]>,
        zone: Option<String>,
    ) -> Result<Pool, PluginError> {
        let backends = crate::pool::backends_from_specs(specs, &self.metrics, name);
        let table = Arc::new(BackendTable::new(1, backends, zone.as_deref()));
        let strategy = StrategyHost::new(
            &self.engine,
            name,
            bytes,
            display,
            config_json,
            &table,
            &self.metrics,
        )?;
        Ok(Pool::new(
            name,
            specs,
            settings,
            strategy,
            self.metrics.clone(),
            zone,
        ))
    }

    /// Reads and validates a health plugin.
    fn load_health(
        &self,
        hc: &HealthConfig,
        cfg: &Config,
        sample: Option<&crate::pool::Backend>,
    ) -> Result<LoadedPlugin, PluginError> {
        let (bytes, display) =
            builtin::load_source(&hc.plugin, &cfg.base_dir).map_err(PluginError::Source)?;
        let config: Arc<[u8]> = hc.config_json().into();
        HealthHost::check(&self.engine, &bytes, &display, config.clone(), sample)?;
        Ok((bytes, display, config))
    }

    /// Hot-swaps a pool's health check with uploaded wasm bytes.
    pub fn swap_health(&self, pool: &str, bytes: &[u8]) -> Result<Arc<PluginVersion>, ApplyError> {
        let _guard = self.admin_lock.lock().unwrap_or_else(|p| p.into_inner());
        let p = self
            .pool(pool)
            .ok_or_else(|| ApplyError::UnknownPool(pool.to_string()))?;
        let host = p
            .health
            .load_full()
            .ok_or_else(|| ApplyError::NoHealth(pool.to_string()))?;
        let first = p.members.load().first().cloned();
        host.swap(bytes, "uploaded", None, first.as_deref())
            .map_err(|source| ApplyError::Plugin {
                pool: pool.to_string(),
                plugin: "upload".into(),
                source,
            })
    }

    /// Hot-swaps a pool's strategy with uploaded wasm bytes.
    pub fn swap_strategy(
        &self,
        pool: &str,
        bytes: &[u8],
    ) -> Result<Arc<PluginVersion>, ApplyError> {
        let _guard = self.admin_lock.lock().unwrap_or_else(|p| p.into_inner());
        let p = self
            .pool(pool)
            .ok_or_else(|| ApplyError::UnknownPool(pool.to_string()))?;
        let table = p.table.load_full();
        p.strategy
            .swap(bytes, "uploaded", None, &table)
            .map_err(|source| ApplyError::Plugin {
                pool: pool.to_string(),
                plugin: "upload".into(),
                source,
            })
    }
}

/// A plugin read and validated: bytes, display name, JSON config.
type LoadedPlugin = (Vec<u8>, String, Arc<[u8]>);

/// What a reload does to a pool's health check.
enum HealthPlan {
    Keep,
    Remove,
    Set(Vec<u8>, String, Arc<[u8]>),
}

fn settings_of(pc: &PoolConfig) -> PoolSettings {
    let o = &pc.outlier;
    let health = pc.health.as_ref().map(|h| {
        let h = h.get_ref();
        crate::pool::HealthSchedule {
            interval: h.interval,
            idle_interval: h.idle_interval.unwrap_or(h.interval * 5),
            jitter: h.jitter.unwrap_or(h.interval / 10),
            timeout: h.timeout,
            rise: h.rise,
            fall: h.fall,
            start_unhealthy: h.initial == "unhealthy",
            concurrency: h.concurrency,
        }
    });
    PoolSettings {
        retries: pc.retries,
        retry_on_5xx: pc.retry_on.iter().any(|r| r.get_ref() == "5xx"),
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
    }
}

fn listen_set(c: &Config) -> Vec<String> {
    let mut v: Vec<String> = c
        .server
        .listen
        .iter()
        .map(|s| s.get_ref().clone())
        .collect();
    if let Some(t) = &c.server.tls {
        v.extend(t.listen.iter().map(|s| format!("tls:{}", s.get_ref())));
    }
    v.push(format!("admin:{}", c.admin.listen.get_ref()));
    v
}

/// Backends a pool would have with `specs` (for validating a plugin before publishing).
fn prospective(
    pool: &Pool,
    specs: &[crate::config::BackendSpec],
    metrics: &Metrics,
) -> Vec<Arc<crate::pool::Backend>> {
    let current = pool.table.load();
    specs
        .iter()
        .map(
            |s| match current.backends.iter().find(|b| b.addr == s.addr) {
                Some(b) => b.clone(),
                None => {
                    crate::pool::backends_from_specs(std::slice::from_ref(s), metrics, &pool.name)
                        .remove(0)
                }
            },
        )
        .collect()
}
