//! The running state of a proxy, built from a [`Config`] and replaced piece by piece on reload
//! or hot swap. Everything the request path reads sits behind an `ArcSwap`; changes are prepared
//! and validated completely before anything is published, so a bad file or plugin changes nothing.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use crate::cold_lock::ColdLock;

use arc_swap::ArcSwap;

use crate::backend::{Backend, BackendTable};
use crate::builtin;
use crate::config::{BackendSpec, Config, HealthConfig, PluginRef, PoolConfig};
use crate::dns::{DnsState, Resolver};
use crate::health::HealthHost;
use crate::metrics::Metrics;
use crate::plugin::{PluginEngine, PluginError, PluginVersion, Prepared};
use crate::pool::{Pool, PoolSettings};
use crate::route::{Route, Router};
use crate::spawn::SpawnSpec;
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
    /// A part outside the pools (the TLS certificates) refused the new config.
    #[error("{0}")]
    Listeners(String),
    /// Reload without a file (demo mode).
    #[error("this proxy was not started from a config file, so there is nothing to reload")]
    NoConfigFile,
    /// The `[cluster]` section changed in a way that needs a restart, or its key file could
    /// not be read.
    #[error("{0}")]
    Cluster(String),
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
    /// What changed in the cluster member (`keys`, `peers`, `hold and mass-failure settings`).
    pub cluster: Vec<String>,
    /// What changed in the TLS certificates and client certificate checks.
    pub tls: Vec<String>,
}

/// A part of the proxy outside this crate that a reload also updates (the TLS certificates).
/// [`ReloadHook::prepare`] does everything that can fail, before anything is published; the
/// commit it returns runs after the pools are published and cannot fail.
pub trait ReloadHook: Send + Sync {
    /// Reads and checks what `cfg` asks for, or says why it cannot be applied.
    #[allow(clippy::type_complexity)]
    fn prepare(&self, cfg: &Config) -> Result<Box<dyn FnOnce(&mut ReloadReport) + Send>, String>;
}

/// The proxy's live state.
pub struct Runtime {
    /// The plugin engine.
    pub engine: PluginEngine,
    /// Metrics.
    pub metrics: Metrics,
    /// The last minutes of traffic per pool and backend (sampled by a background task).
    pub history: crate::history::History,
    pools: ArcSwap<HashMap<String, Arc<Pool>>>,
    router: ArcSwap<Router>,
    /// The strategy entry of the config each pool was last loaded from (to tell whether a reload
    /// changes it; an unchanged entry keeps a plugin hot-swapped through the API).
    pool_sources: ColdLock<HashMap<String, (PluginRef, Option<HealthConfig>)>>,
    config: ArcSwap<Config>,
    config_path: Option<PathBuf>,
    /// Serializes reloads and swaps against each other (never taken on the request path).
    admin_lock: ColdLock<()>,
    /// This proxy's cluster member, when `[cluster]` is configured.
    pub cluster: std::sync::OnceLock<crate::cluster::ClusterHandle>,
    /// What the membership watcher last decided (held suspects, last-known-good pools).
    pub cluster_status: ArcSwap<crate::membership::RoutingStatus>,
    /// The `[cluster]` hold and mass-failure settings in force (a reload may change them).
    pub cluster_routing: ArcSwap<crate::membership::RoutingSettings>,
    /// The keys the applied file's `[cluster]` section gave (to tell whether a reload changes
    /// them; see [`crate::cluster_config::ClusterReload::keys`]).
    cluster_keys: ColdLock<Vec<String>>,
    /// How backend host names are resolved (`[dns]`).
    resolver: ArcSwap<Resolver>,
    /// What else a reload updates (set once by the server).
    reload_hook: std::sync::OnceLock<Box<dyn ReloadHook>>,
    /// Spawned instances run (set by the server once it starts the spawner): a reload then
    /// checks that the ports of instances it adds are free.
    spawning: std::sync::atomic::AtomicBool,
    /// The per-client-IP rate limit of both request paths (`[server.limits] rate_limit`), set
    /// at start.
    pub rate_limiter: Option<crate::rate_limit::RateLimiter>,
    /// How the last reload of the config file ended (`None`: none yet), for the dashboard: a
    /// SIGHUP's refusal is otherwise only in the log and a metric.
    last_reload: arc_swap::ArcSwapOption<ReloadOutcome>,
}

/// How a reload of the config file ended.
#[derive(Debug, Clone, PartialEq)]
pub struct ReloadOutcome {
    /// When it ended (milliseconds since the Unix epoch).
    pub unix_ms: u64,
    /// Why it was refused (the running config stayed); `None`: it was applied.
    pub error: Option<String>,
}

impl Runtime {
    /// Builds the state for `config`, validating every plugin.
    pub fn new(
        config: Config,
        config_path: Option<PathBuf>,
        engine: PluginEngine,
        metrics: Metrics,
    ) -> Result<Runtime, ApplyError> {
        let rate_limiter = config.server.limits.rate_limit.map(|c| {
            let rejected = metrics.limit_rejections.with_label_values(&["rate_limit"]);
            crate::rate_limit::RateLimiter::new(&c, rejected)
        });
        let rt = Runtime {
            engine,
            metrics,
            history: crate::history::History::default(),
            pools: ArcSwap::from_pointee(HashMap::new()),
            router: ArcSwap::from_pointee(Router::new(Vec::new())),
            pool_sources: ColdLock::new(HashMap::new()),
            config: ArcSwap::from_pointee(config.clone()),
            config_path,
            admin_lock: ColdLock::new(()),
            cluster: std::sync::OnceLock::new(),
            cluster_status: ArcSwap::from_pointee(Default::default()),
            cluster_routing: ArcSwap::from_pointee(
                config
                    .cluster
                    .as_ref()
                    .map(|c| c.get_ref().routing())
                    .unwrap_or_default(),
            ),
            // The cluster itself starts from the same file and fails the start if it cannot
            // read it; this copy is only what reloads compare against.
            cluster_keys: ColdLock::new(cluster_keys(&config).unwrap_or_default()),
            resolver: ArcSwap::from_pointee(Resolver::default()),
            reload_hook: std::sync::OnceLock::new(),
            spawning: std::sync::atomic::AtomicBool::new(false),
            rate_limiter,
            last_reload: Default::default(),
        };
        rt.apply(config)?;
        Ok(rt)
    }

    /// Makes every later reload also prepare and commit `hook` (set once; a second is ignored).
    pub fn set_reload_hook(&self, hook: Box<dyn ReloadHook>) {
        let _ = self.reload_hook.set(hook);
    }

    /// Says that this runtime's spawn tables are being run, so that later reloads refuse
    /// instances whose port another process holds.
    pub fn set_spawning(&self) {
        self.spawning
            .store(true, std::sync::atomic::Ordering::Relaxed);
    }

    /// The spawn tables of `pc`. Once instances run, the port of each instance that is not
    /// running yet must be free: a port another process holds refuses the config.
    fn plan_spawns(
        &self,
        pc: &PoolConfig,
        cfg: &Config,
    ) -> Result<Vec<Arc<SpawnSpec>>, ApplyError> {
        let specs = cfg.spawn_specs(pc);
        if !self.spawning.load(std::sync::atomic::Ordering::Relaxed) {
            return Ok(specs);
        }
        let owned: Vec<String> = self
            .pools()
            .iter()
            .flat_map(|p| p.instance_status())
            .map(|i| i.addr)
            .collect();
        for (spec, table) in specs.iter().zip(&pc.spawn) {
            for addr in spec.addrs().filter(|a| !owned.contains(&a.to_string())) {
                if let Err(e) = std::net::TcpListener::bind(addr) {
                    return Err(cfg
                        .error_at(table.span(), format!(
                            "pool \"{}\": spawn \"{}\": port {addr} is not free ({e}); another process holds it, so the instance could not listen there; stop that process or change start_port",
                            pc.name.get_ref(), spec.name
                        ))
                        .into());
                }
            }
        }
        Ok(specs)
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

    /// The resolver of backend host names, as the applied config describes it.
    pub fn resolver(&self) -> Arc<Resolver> {
        self.resolver.load_full()
    }

    /// The config currently applied.
    pub fn config(&self) -> Arc<Config> {
        self.config.load_full()
    }

    /// The config file reloads read (`None`: started without one, as the demo is).
    pub fn config_path(&self) -> Option<&std::path::Path> {
        self.config_path.as_deref()
    }

    /// Re-reads the config file and applies it.
    pub fn reload(&self) -> Result<ReloadReport, ApplyError> {
        let path = self.config_path.as_ref().ok_or(ApplyError::NoConfigFile)?;
        let result = Config::load(path)
            .map_err(ApplyError::from)
            .and_then(|cfg| self.apply(cfg));
        let label = if result.is_ok() { "ok" } else { "rejected" };
        self.metrics.reloads.with_label_values(&[label]).inc();
        self.last_reload.store(Some(Arc::new(ReloadOutcome {
            unix_ms: crate::cluster::clock::wall_ms(),
            error: result.as_ref().err().map(ToString::to_string),
        })));
        match &result {
            Ok(r) => {
                tracing::info!(added = ?r.added, removed = ?r.removed, changed = ?r.changed, tls = ?r.tls, cluster = ?r.cluster, "config reloaded");
                for w in &r.warnings {
                    tracing::warn!("reload: {w}");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "config reload rejected; the running config stays")
            }
        }
        result
    }

    /// How the last [`Runtime::reload`] ended; `None` before the first.
    pub fn last_reload(&self) -> Option<Arc<ReloadOutcome>> {
        self.last_reload.load_full()
    }

    /// Applies a config: prepares every pool first (everything that can fail: reading, compiling
    /// and validating each plugin once, building new pools), then publishes all at once with
    /// operations that cannot fail. A rejected config changes nothing.
    pub fn apply(&self, cfg: Config) -> Result<ReloadReport, ApplyError> {
        let _guard = self.admin_lock.lock();
        let old_pools = self.pools.load_full();
        let mut sources = self.pool_sources.lock();
        let plans = cfg
            .pool
            .iter()
            .map(|pc| match old_pools.get(pc.name.get_ref()) {
                Some(pool) => self.plan_update(pool, pc, &cfg, &sources),
                None => self.plan_new(pc, &cfg).map(Plan::New),
            })
            .collect::<Result<Vec<_>, _>>()?;
        // Routes compile (regexes, header names) from a config `Config::validate` accepted.
        let route_rules = cfg
            .route
            .iter()
            .map(|spanned| {
                let r = spanned.get_ref();
                let rules = r
                    .rules_config(spanned.span())
                    .compile()
                    .map_err(|e| cfg.error_at(e.span, e.message))?;
                let host = r.host.as_ref().map(|h| h.to_ascii_lowercase());
                Ok((host, r.path_prefix.clone(), rules))
            })
            .collect::<Result<Vec<_>, crate::config::ConfigError>>()?;
        let new_keys = cluster_keys(&cfg).map_err(ApplyError::Cluster)?;
        let cluster = {
            let old = self.config.load();
            crate::cluster_config::reload_plan(
                old.cluster.as_ref().map(|c| c.get_ref()),
                cfg.cluster.as_ref().map(|c| c.get_ref()),
                &self.cluster_keys.lock(),
                &new_keys,
            )
            .map_err(ApplyError::Cluster)?
        };
        if let (Some(keys), Some(handle)) = (&cluster.keys, self.cluster.get()) {
            crate::membership::check_key_change(handle, keys).map_err(ApplyError::Cluster)?;
        }
        let commit = match self.reload_hook.get() {
            Some(hook) => Some(hook.prepare(&cfg).map_err(ApplyError::Listeners)?),
            None => None,
        };

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
        let routes = route_rules
            .into_iter()
            .map(|(host, path_prefix, rules)| Route {
                host,
                path_prefix,
                rules: rules.resolve(|name| pools[&name].clone()),
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
        self.resolver.store(Arc::new(cfg.resolver()));
        self.pools.store(Arc::new(pools));
        self.router.store(Arc::new(Router::new(routes)));
        self.config.store(Arc::new(cfg));
        if let Some(commit) = commit {
            commit(&mut report);
        }
        self.apply_cluster(cluster, new_keys, &mut report);
        Ok(report)
    }

    // Applies what a reload changes in the cluster member. The keys were validated with the
    // config, so the keyring operations cannot be refused; a member that has stopped only
    // logs.
    fn apply_cluster(
        &self,
        plan: crate::cluster_config::ClusterReload,
        keys: Vec<String>,
        report: &mut ReloadReport,
    ) {
        *self.cluster_keys.lock() = keys;
        if let Some(routing) = plan.routing {
            self.cluster_routing.store(Arc::new(routing));
            report.cluster.push("hold and mass-failure settings".into());
        }
        let Some(handle) = self.cluster.get() else {
            return;
        };
        if let Some(keys) = &plan.keys {
            match crate::membership::apply_keys(handle, keys) {
                Ok(()) => report.cluster.push("keys".into()),
                Err(e) => {
                    tracing::error!(error = %e, "reload: the cluster keys could not be applied")
                }
            }
        }
        if let Some(peers) = plan.peers {
            if handle.set_peers(peers).is_ok() {
                report.cluster.push("peers".into());
            }
        }
    }

    /// The resolution state of `pc`'s host names. A name the running `pool` already has (with
    /// the same resolver) keeps its state, the refresher keeps it current; a new one is resolved
    /// now, and one that does not resolve refuses the config, naming its line.
    fn resolve_names(
        &self,
        pc: &PoolConfig,
        cfg: &Config,
        pool: Option<&Pool>,
    ) -> Result<Vec<DnsState>, ApplyError> {
        let names = Config::dns_names(pc);
        if names.is_empty() {
            return Ok(Vec::new());
        }
        let resolver = cfg.resolver();
        let known = match pool {
            Some(p) if **self.resolver.load() == resolver => p.dns_states(),
            _ => Vec::new(),
        };
        names
            .into_iter()
            .map(|(name, span)| {
                let same = |s: &&DnsState| s.name.host == name.host && s.name.port == name.port;
                if let Some(state) = known.iter().find(same) {
                    let mut state = state.clone();
                    state.name = name;
                    state.in_flight = false;
                    return Ok(state);
                }
                let addrs = resolver.lookup(&name.host).map_err(|e| {
                    cfg.error_at(span, format!(
                        "pool \"{}\": backend host name \"{}\" does not resolve: {e}; check the name and the resolver (or [dns] hosts_file), or list the backend by address",
                        pc.name.get_ref(),
                        name.host
                    ))
                })?;
                Ok(DnsState::resolved(name, addrs, pc.dns_refresh))
            })
            .collect()
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
        let dns = self.resolve_names(pc, cfg, Some(pool))?;
        let all_specs = crate::pool::config_members(&specs, &dns);
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
                prospective(pool, &all_specs),
                cfg.server.zone.as_deref(),
            ));
            Some(
                pool.strategy
                    .prepare(&bytes, &display, plugin_ref.config_json().into(), &trial)
                    .map_err(plugin_error(name, plugin_ref.source()))?,
            )
        };
        Ok(Plan::Update(Box::new(PoolUpdate {
            pool: pool.clone(),
            spawns: self.plan_spawns(pc, cfg)?,
            settings: pool_settings(pc, cfg)?,
            backends: specs,
            dns,
            strategy,
            health,
        })))
    }

    /// Builds a new pool with its plugins, unpublished.
    fn plan_new(&self, pc: &PoolConfig, cfg: &Config) -> Result<Arc<Pool>, ApplyError> {
        let name = pc.name.get_ref();
        let dns = self.resolve_names(pc, cfg, None)?;
        let literal = Config::backends(pc);
        let specs = crate::pool::config_members(&literal, &dns);
        let zone = cfg.server.zone.clone();
        let plugin_ref = pc.strategy.get_ref();
        let (bytes, display) = load(plugin_ref.source(), cfg, name)?;
        let settings = pool_settings(pc, cfg)?;
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
        // Records where the members came from; the members themselves stay as built.
        pool.set_config_backends(&literal, dns);
        pool.set_spawns(self.plan_spawns(pc, cfg)?);
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
    /// `config` (JSON) replaces the plugin's config; `None` keeps the current one.
    pub fn swap_health(
        &self,
        pool: &str,
        bytes: &[u8],
        config: Option<Arc<[u8]>>,
    ) -> Result<Arc<PluginVersion>, ApplyError> {
        let _guard = self.admin_lock.lock();
        let p = self
            .pool(pool)
            .ok_or_else(|| ApplyError::UnknownPool(pool.to_string()))?;
        let host = p
            .health()
            .ok_or_else(|| ApplyError::NoHealth(pool.to_string()))?;
        let first = p.members().first().cloned();
        host.swap(bytes, "uploaded", config, first.as_deref())
            .map_err(|source| ApplyError::Plugin {
                pool: pool.to_string(),
                plugin: "upload".into(),
                source,
            })
    }

    /// Hot-swaps a pool's strategy with uploaded wasm bytes; `config` (JSON) replaces the
    /// plugin's config, `None` keeps the current one.
    pub fn swap_strategy(
        &self,
        pool: &str,
        bytes: &[u8],
        config: Option<Arc<[u8]>>,
    ) -> Result<Arc<PluginVersion>, ApplyError> {
        let _guard = self.admin_lock.lock();
        let p = self
            .pool(pool)
            .ok_or_else(|| ApplyError::UnknownPool(pool.to_string()))?;
        let table = p.table_full();
        p.strategy
            .swap(bytes, "uploaded", config, &table)
            .map_err(|source| ApplyError::Plugin {
                pool: pool.to_string(),
                plugin: "upload".into(),
                source,
            })
    }
}

/// The pool's settings, its upstream TLS files read and checked; an error names the config line.
fn pool_settings(pc: &PoolConfig, cfg: &Config) -> Result<PoolSettings, ApplyError> {
    PoolSettings::load(pc, cfg).map_err(|m| {
        let span = pc.tls.as_ref().map_or(pc.name.span(), |t| t.span());
        ApplyError::Config(cfg.error_at(span, m))
    })
}

/// What a reload does to one existing pool, prepared and validated; [`PoolUpdate::publish`]
/// applies it and cannot fail.
struct PoolUpdate {
    pool: Arc<Pool>,
    spawns: Vec<Arc<SpawnSpec>>,
    settings: PoolSettings,
    backends: Vec<BackendSpec>,
    dns: Vec<DnsState>,
    strategy: Option<Prepared>,
    health: HealthPlan,
}

impl PoolUpdate {
    /// Applies the update; true when anything changed.
    fn publish(self) -> bool {
        let pool = &self.pool;
        // Settings first: new backends take their initial health state from them.
        let mut changed = pool.set_settings(self.settings.clone());
        changed |= pool.set_config_backends(&self.backends, self.dns);
        changed |= pool.set_spawns(self.spawns);
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
    Update(Box<PoolUpdate>),
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

/// The keys `cfg`'s `[cluster]` names (its `key`, or its `key_file` read now); none without
/// `[cluster]`. A key file that cannot be read is an error, never "no keys".
fn cluster_keys(cfg: &Config) -> Result<Vec<String>, String> {
    match &cfg.cluster {
        Some(c) => c.get_ref().to_config(&cfg.base_dir).map(|c| c.keys),
        None => Ok(Vec::new()),
    }
}

/// Settings that only a restart applies.
fn restart_warnings(old: &Config, new: &Config) -> Vec<String> {
    let mut warnings = crate::listener::restart_changes(old, new);
    if !old.access_log_writer_needed() && new.access_log_writer_needed() {
        warnings.push("a route's access_log turns logging on while [server.access_log] format is \"off\", so no log writer runs; restart sluice to apply it".into());
    }
    if old.admin.metrics_per_backend != new.admin.metrics_per_backend {
        warnings.push("[admin] metrics_per_backend changed; restart sluice to apply it".into());
    }
    if old.server.limits.rate_limit != new.server.limits.rate_limit {
        warnings.push("[server.limits] rate_limit changed; restart sluice to apply it".into());
    }
    warnings
}

/// Backends a pool would have with `specs` (for validating a plugin before publishing). New
/// addresses get statistics in a throwaway registry, so validation adds no live series.
fn prospective(pool: &Pool, specs: &[BackendSpec]) -> Vec<Arc<Backend>> {
    let current = pool.members();
    let scratch = Metrics::new();
    specs
        .iter()
        .map(|s| {
            let previous = current.iter().find(|b| b.addr == s.addr);
            Arc::new(Backend::new(
                &scratch,
                &pool.name,
                s,
                previous.map(|b| &**b),
                true,
            ))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn config(pools: &[(&str, &str)]) -> Config {
        let mut text = String::from("[server]\nlisten = [\"127.0.0.1:1\"]\n");
        for (name, strategy) in pools {
            text.push_str(&format!(
                "[[pool]]\nname = \"{name}\"\nstrategy = \"{strategy}\"\nbackends = [\"127.0.0.1:9001\", \"127.0.0.1:9002\"]\n[[route]]\nhost = \"{name}\"\npool = \"{name}\"\n"
            ));
        }
        Config::parse(&text, "test.toml", Path::new(".")).unwrap()
    }

    fn runtime(pools: &[(&str, &str)]) -> Runtime {
        Runtime::new(
            config(pools),
            None,
            PluginEngine::new().unwrap(),
            Metrics::new(),
        )
        .unwrap()
    }

    #[test]
    fn a_reload_reports_added_removed_and_changed_pools() {
        let rt = runtime(&[("a", "builtin:round-robin"), ("b", "builtin:round-robin")]);
        let a = rt.pool("a").unwrap();
        let report = rt
            .apply(config(&[
                ("a", "builtin:random"),
                ("c", "builtin:round-robin"),
            ]))
            .unwrap();
        assert_eq!(report.added, vec!["c"]);
        assert_eq!(report.removed, vec!["b"]);
        assert_eq!(report.changed, vec!["a"]);
        assert!(
            Arc::ptr_eq(&a, &rt.pool("a").unwrap()),
            "a changed pool is updated in place"
        );
        assert_eq!(a.strategy.current().name, "builtin:random");
        assert_eq!(a.strategy.current().generation, 2);
        assert!(rt.pool("b").is_none());
    }

    /// `native:round-robin` rotates in the host (no plugin call), and a swap replaces it.
    #[test]
    fn the_native_round_robin_rotates_without_the_plugin_until_swapped() {
        let rt = runtime(&[("a", crate::builtin::NATIVE_ROUND_ROBIN)]);
        let a = rt.pool("a").unwrap();
        assert_eq!(a.strategy.current().name, "native:round-robin");
        let table = a.table_full();
        let (head, ()) = http::Request::new(()).into_parts();
        let none = |_: usize| false;
        let view = crate::plugin::RequestView {
            header: &head,
            client_ip: None,
            excluded: &none,
        };
        let picks: Vec<_> = (0..6)
            .map(|_| a.strategy.pick(&table, &view, 0).unwrap())
            .collect();
        let n = table.len();
        assert!(n > 1);
        for w in picks.windows(2) {
            assert_eq!(w[1], (w[0] + 1) % n, "not a rotation: {picks:?}");
        }
        let text = String::from_utf8(rt.metrics.render()).unwrap();
        assert!(
            text.contains("sluice_fallback_picks_total{pool=\"a\"} 0"),
            "native picks are not plugin faults: {text}"
        );
        rt.swap_strategy("a", crate::builtin::get("random").unwrap(), None)
            .unwrap();
        assert_ne!(a.strategy.current().name, "native:round-robin");
    }

    #[test]
    fn an_unchanged_entry_keeps_the_running_plugin() {
        let rt = runtime(&[("a", "builtin:round-robin")]);
        let swapped = rt
            .swap_strategy("a", crate::builtin::get("random").unwrap(), None)
            .unwrap();
        let report = rt.apply(config(&[("a", "builtin:round-robin")])).unwrap();
        assert!(report.changed.is_empty(), "{report:?}");
        assert_eq!(
            rt.pool("a").unwrap().strategy.current().sha256,
            swapped.sha256
        );
    }

    #[test]
    fn a_reload_hands_the_spawn_tables_to_the_pool() {
        let with = |instances: u16| {
            let text = format!("[server]\nlisten = [\"127.0.0.1:1\"]\n[[pool]]\nname = \"a\"\n[[pool.spawn]]\ncommand = \"sh\"\nstart_port = 9100\ninstances = {instances}\n[[route]]\npool = \"a\"\n");
            Config::parse(&text, "test.toml", Path::new(".")).unwrap()
        };
        let rt = Runtime::new(with(3), None, PluginEngine::new().unwrap(), Metrics::new()).unwrap();
        let a = rt.pool("a").unwrap();
        assert_eq!(a.spawns()[0].instances, 3);
        assert!(rt.apply(with(3)).unwrap().changed.is_empty());
        let report = rt.apply(with(1)).unwrap();
        assert_eq!(report.changed, vec!["a"]);
        assert_eq!(a.spawns()[0].instances, 1);
        assert_eq!(
            a.members().len(),
            0,
            "instances join only once they accept connections"
        );
    }

    #[test]
    fn the_swap_history_keeps_the_last_swaps_and_rejections() {
        let rt = runtime(&[("a", "builtin:round-robin")]);
        let a = rt.pool("a").unwrap();
        let random = crate::builtin::get("random").unwrap();
        for _ in 0..crate::plugin::SWAP_HISTORY {
            rt.swap_strategy("a", random, None).unwrap();
        }
        assert!(rt.swap_strategy("a", b"junk", None).is_err());
        let h = a.strategy.swap_history();
        assert_eq!(h.len(), crate::plugin::SWAP_HISTORY, "bounded");
        assert_eq!(h[0].result, "swapped", "the first load went first: {h:?}");
        let last = h.last().unwrap();
        assert_eq!(last.result, "rejected");
        assert!(last.error.as_deref().unwrap().contains("magic"), "{last:?}");
        let before = &h[h.len() - 2];
        assert_eq!(before.generation, Some(a.strategy.current().generation));
        assert_eq!(
            before.sha256.as_deref(),
            Some(&*a.strategy.current().sha256)
        );
    }

    #[test]
    fn a_rejected_config_changes_nothing() {
        let rt = runtime(&[("a", "builtin:round-robin")]);
        let before = String::from_utf8(rt.metrics.render()).unwrap();
        let bad = config(&[("a", "builtin:random"), ("z", "builtin:no-such-plugin")]);
        let err = rt.apply(bad).unwrap_err().to_string();
        assert!(err.contains("pool \"z\""), "{err}");
        let a = rt.pool("a").unwrap();
        assert_eq!(
            a.strategy.current().name,
            "builtin:round-robin",
            "a's new plugin was not published"
        );
        assert_eq!(a.strategy.current().generation, 1);
        assert!(rt.pool("z").is_none());
        assert_eq!(String::from_utf8(rt.metrics.render()).unwrap(), before);
    }
}
