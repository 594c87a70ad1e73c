//! The running state of a proxy, built from a [`Config`] and replaced piece by piece on reload
//! or hot swap. Everything the request path reads sits behind an `ArcSwap`; changes are prepared
//! and validated completely before anything is published, so a bad file or plugin changes nothing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use arc_swap::ArcSwap;

use crate::backend::{Backend, BackendTable};
use crate::builtin;
use crate::config::{BackendSpec, Config, HealthConfig, PluginRef, PoolConfig};
use crate::health::HealthHost;
use crate::metrics::Metrics;
use crate::plugin::{PluginEngine, PluginError, PluginVersion, Prepared};
use crate::pool::{Pool, PoolSettings};
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
            pool.maintain();
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

    /// Applies a config: prepares every pool first (everything that can fail: reading, compiling
    /// and validating each plugin once, building new pools), then publishes all at once with
    /// operations that cannot fail. A rejected config changes nothing.
    pub fn apply(&self, cfg: Config) -> Result<ReloadReport, ApplyError> {
        let _guard = self.admin_lock.lock().unwrap_or_else(|p| p.into_inner());
        let old_pools = self.pools.load_full();
        let mut sources = self.pool_sources.lock().unwrap_or_else(|p| p.into_inner());
        let plans = cfg
            .pool
            .iter()
            .map(|pc| match old_pools.get(pc.name.get_ref()) {
                Some(pool) => self.plan_update(pool, pc, &cfg, &sources),
                None => self.plan_new(pc, &cfg).map(Plan::New),
            })
            .collect::<Result<Vec<_>, _>>()?;

        // Publish. Nothing below can fail.
        let mut report = ReloadReport::default();
        if !old_pools.is_empty() {
            report.warnings = restart_warnings(&self.config.load(), &cfg);
        }
        let mut pools = HashMap::new();
        for plan in plans {
            let pool = match plan {
                Plan::New(pool) => {
                    report.added.push(pool.name.clone());
                    pool
                }
                Plan::Update(update) => {
                    let pool = update.pool.clone();
                    if update.publish() {
                        report.changed.push(pool.name.clone());
                    }
                    pool
                }
            };
            pools.insert(pool.name.clone(), pool);
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

    /// Prepares the changes to an existing pool.
    fn plan_update(
        &self,
        pool: &Arc<Pool>,
        pc: &PoolConfig,
        cfg: &Config,
        sources: &HashMap<String, (PluginRef, Option<HealthConfig>)>,
    ) -> Result<Plan, ApplyError> {
        let name = pc.name.get_ref();
        let specs = Config::backends(pc);
        let plugin_ref = pc.strategy.get_ref();
        let new_health = pc.health.as_ref().map(|h| h.get_ref().clone());
        let health = if sources.get(name).is_some_and(|(_, h)| *h == new_health) {
            HealthPlan::Keep
        } else if let Some(hc) = &new_health {
            let sample = pool.members().first().cloned();
            let (bytes, display) = load(&hc.plugin, cfg, name)?;
            let config: Arc<[u8]> = hc.config_json().into();
            let plugin_err = plugin_error(name, &hc.plugin);
            match pool.health() {
                Some(host) => HealthPlan::Swap(
                    host.clone(),
                    host.prepare(&bytes, &display, Some(config), sample.as_deref())
                        .map_err(plugin_err)?,
                ),
                None => HealthPlan::Install(Arc::new(HealthHost::new(
                    &self.engine,
                    name,
                    HealthHost::prepare_first(
                        &self.engine,
                        &bytes,
                        &display,
                        config,
                        sample.as_deref(),
                    )
                    .map_err(plugin_err)?,
                    &self.metrics,
                ))),
            }
        } else {
            HealthPlan::Remove
        };
        let unchanged = sources.get(name).is_some_and(|(r, _)| r == plugin_ref);
        let strategy = if unchanged {
            None
        } else {
            let (bytes, display) = load(plugin_ref.source(), cfg, name)?;
            // Validated against the table the pool will have after this reload.
            let trial = Arc::new(BackendTable::new(
                0,
                prospective(pool, &specs),
                cfg.server.zone.as_deref(),
            ));
            Some(
                pool.strategy
                    .prepare(&bytes, &display, plugin_ref.config_json().into(), &trial)
                    .map_err(plugin_error(name, plugin_ref.source()))?,
            )
        };
        Ok(Plan::Update(PoolUpdate {
            pool: pool.clone(),
            settings: PoolSettings::from(pc),
            backends: specs,
            strategy,
            health,
        }))
    }

    /// Builds a new pool with its plugins, unpublished.
    fn plan_new(&self, pc: &PoolConfig, cfg: &Config) -> Result<Arc<Pool>, ApplyError> {
        let name = pc.name.get_ref();
        let specs = Config::backends(pc);
        let zone = cfg.server.zone.clone();
        let plugin_ref = pc.strategy.get_ref();
        let (bytes, display) = load(plugin_ref.source(), cfg, name)?;
        let settings = PoolSettings::from(pc);
        let healthy = !settings.start_unhealthy();
        let backends: Vec<Arc<Backend>> = specs
            .iter()
            .map(|s| Arc::new(Backend::new(&self.metrics, name, s, None, healthy)))
            .collect();
        let table = Arc::new(BackendTable::new(1, backends, zone.as_deref()));
        let first = StrategyHost::prepare_first(
            &self.engine,
            &bytes,
            &display,
            plugin_ref.config_json().into(),
            &table,
        )
        .map_err(plugin_error(name, plugin_ref.source()))?;
        let strategy = StrategyHost::new(&self.engine, name, first, &self.metrics);
        let pool = Pool::new(name, &specs, settings, strategy, self.metrics.clone(), zone);
        drop(table);
        if let Some(hc) = &pc.health {
            let hc = hc.get_ref();
            let (bytes, display) = load(&hc.plugin, cfg, name)?;
            let sample = pool.members().first().cloned();
            let first = HealthHost::prepare_first(
                &self.engine,
                &bytes,
                &display,
                hc.config_json().into(),
                sample.as_deref(),
            )
            .map_err(plugin_error(name, &hc.plugin))?;
            pool.set_health_host(Some(Arc::new(HealthHost::new(
                &self.engine,
                name,
                first,
                &self.metrics,
            ))));
        }
        Ok(Arc::new(pool))
    }

    /// Hot-swaps a pool's health check with uploaded wasm bytes.
    pub fn swap_health(&self, pool: &str, bytes: &[u8]) -> Result<Arc<PluginVersion>, ApplyError> {
        let _guard = self.admin_lock.lock().unwrap_or_else(|p| p.into_inner());
        let p = self
            .pool(pool)
            .ok_or_else(|| ApplyError::UnknownPool(pool.to_string()))?;
        let host = p
            .health()
            .ok_or_else(|| ApplyError::NoHealth(pool.to_string()))?;
        let first = p.members().first().cloned();
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
        let table = p.table_full();
        p.strategy
            .swap(bytes, "uploaded", None, &table)
            .map_err(|source| ApplyError::Plugin {
                pool: pool.to_string(),
                plugin: "upload".into(),
                source,
            })
    }
}

/// What a reload does to one existing pool, prepared and validated; [`PoolUpdate::publish`]
/// applies it and cannot fail.
struct PoolUpdate {
    pool: Arc<Pool>,
    settings: PoolSettings,
    backends: Vec<BackendSpec>,
    strategy: Option<Prepared>,
    health: HealthPlan,
}

impl PoolUpdate {
    /// Applies the update; true when anything changed.
    fn publish(self) -> bool {
        let pool = &self.pool;
        // Settings first: new backends take their initial health state from them.
        let mut changed = pool.set_settings(self.settings.clone());
        changed |= pool.set_static_backends(&self.backends);
        match self.health {
            HealthPlan::Keep => {}
            HealthPlan::Remove => {
                pool.set_health_host(None);
                changed = true;
            }
            HealthPlan::Install(host) => {
                pool.set_health_host(Some(host));
                changed = true;
            }
            HealthPlan::Swap(host, prepared) => {
                host.publish(prepared);
                changed = true;
            }
        }
        if let Some(prepared) = self.strategy {
            pool.strategy.publish(prepared);
            changed = true;
        }
        changed
    }
}

/// A reload's plan for one pool.
enum Plan {
    New(Arc<Pool>),
    Update(PoolUpdate),
}

/// What a reload does to a pool's health check.
enum HealthPlan {
    Keep,
    Remove,
    Install(Arc<HealthHost>),
    Swap(Arc<HealthHost>, Prepared),
}

/// Reads a plugin's bytes for pool `pool`.
fn load(source: &str, cfg: &Config, pool: &str) -> Result<(Vec<u8>, String), ApplyError> {
    builtin::load_source(source, &cfg.base_dir)
        .map_err(|m| plugin_error(pool, source)(PluginError::Source(m)))
}

fn plugin_error<'a>(pool: &'a str, plugin: &'a str) -> impl Fn(PluginError) -> ApplyError + 'a {
    move |source| ApplyError::Plugin {
        pool: pool.to_string(),
        plugin: plugin.to_string(),
        source,
    }
}

/// Settings that only a restart applies.
fn restart_warnings(old: &Config, new: &Config) -> Vec<String> {
    let mut warnings = Vec::new();
    if listen_set(old) != listen_set(new) {
        warnings.push("listen addresses changed; restart sluice to apply them".into());
    }
    if old.server.threads != new.server.threads {
        warnings.push("[server] threads changed; restart sluice to apply it".into());
    }
    warnings
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

/// Backends a pool would have with `specs` (for validating a plugin before publishing). New
/// addresses get statistics in a throwaway registry, so validation adds no live series.
fn prospective(pool: &Pool, specs: &[BackendSpec]) -> Vec<Arc<Backend>> {
    let current = pool.members();
    let scratch = Metrics::new();
    specs
        .iter()
        .map(|s| {
            let stats = current
                .iter()
                .find(|b| b.addr == s.addr)
                .map(|b| b.stats.clone());
            Arc::new(Backend::new(&scratch, &pool.name, s, stats, true))
        })
        .collect()
}
