//! Assembles the pingora server from a config: the proxy service, the admin service and the
//! background tasks (SIGHUP reload), then runs it until a signal stops it.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use pingora::apps::HttpServerOptions;
use pingora::listeners::{L4BufferSettings, ListenerConfig};
use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server, ShutdownSignal, ShutdownSignalWatch, ShutdownWatch};
use pingora::services::background::{background_service, BackgroundService};
use pingora::services::listening::Service;

use crate::access_log::AccessLog;
use crate::admin::AdminApp;
use crate::config::{ClientLimits, Config};
use crate::lean::LeanApp;
use crate::metrics::Metrics;
use crate::plugin::PluginEngine;
use crate::proxy::SluiceProxy;
use crate::runtime::Runtime;
use crate::spawn::Spawner;

/// Builds the runtime for `config` (validating every plugin) without starting listeners.
pub fn build_runtime(config: Config, config_path: Option<PathBuf>) -> anyhow::Result<Arc<Runtime>> {
    let engine = PluginEngine::sized_for(config.server.threads, config.pool.len())?;
    let metrics = Metrics::with_per_backend(config.admin.metrics_per_backend);
    let rt = Runtime::new(config, config_path, engine, metrics)?;
    Ok(Arc::new(rt))
}

/// Returns to the OS the heap this thread freed. Compiling plugins (start, reload, swap) takes
/// tens of MB of short-lived heap; mimalloc keeps freed pages for reuse and only purges them on
/// later allocator calls, which an idle proxy does not make, so idle RSS would stay at the
/// compile peak. Called on the thread that compiled, after it finished.
pub fn release_free_memory() {
    // SAFETY: mi_collect only frees memory mimalloc owns and no longer uses; it is safe to call
    // at any time from any thread (a no-op for heaps another allocator serves).
    unsafe { libmimalloc_sys::mi_collect(true) }
}

/// Every address the process listens on: proxy (plain and TLS) and admin.
fn listen_addrs(config: &Config) -> Vec<String> {
    let mut addrs: Vec<String> = config
        .listeners()
        .iter()
        .map(|l| l.addr.to_string())
        .collect();
    addrs.push(config.admin.listen.get_ref().clone());
    addrs
}

/// The access log files a config writes to (resolved; `-` is standard output), one per listener
/// that logs.
fn log_paths(config: &Config) -> Vec<(std::net::SocketAddr, PathBuf)> {
    config
        .listeners()
        .iter()
        .filter(|l| l.access_log.format != crate::access_log::LogFormat::Off)
        .filter_map(|l| {
            let p = l
                .access_log
                .path
                .as_ref()
                .filter(|p| p.as_os_str() != "-")?;
            Some((l.addr, config.resolve_path(&p.to_string_lossy())))
        })
        .collect()
}

/// Checks what `run` needs beyond the config file itself, so `check` catches it and `run` never
/// starts half-alive: every listen address can be bound, every access log directory exists, and
/// every TLS certificate chain, key and client CA is readable, bounded in size and parses, and
/// each key belongs to its certificate.
///
/// `in_use_ok` is for `sluice check`, which is often run beside the sluice it is checking a file
/// for: an address already in use is then a warning (returned), not an error. An address this host
/// does not have, or may not bind, is an error either way.
pub fn preflight(config: &Config, in_use_ok: bool) -> anyhow::Result<Vec<String>> {
    let mut warnings = Vec::new();
    for a in listen_addrs(config) {
        match TcpListener::bind(&a) {
            Ok(_) => {}
            Err(e) if in_use_ok && e.kind() == std::io::ErrorKind::AddrInUse => warnings.push(
                format!("{a} is in use now (fine if it is the running sluice's own address)"),
            ),
            Err(e) => anyhow::bail!(
                "cannot listen on {a}: {e}; is another process (or another sluice) using it? change `listen` in the config"
            ),
        }
    }
    // A port held by another process would make an instance fail, or worse, look ready.
    for pool in &config.pool {
        for spec in config.spawn_specs(pool) {
            for a in spec.addrs() {
                match TcpListener::bind(a) {
                    Ok(_) => {}
                    Err(e) if in_use_ok && e.kind() == std::io::ErrorKind::AddrInUse => warnings.push(format!(
                        "{a} (spawned instance of pool \"{}\") is in use now (fine if it is the running sluice's own instance)",
                        pool.name.get_ref()
                    )),
                    Err(e) => anyhow::bail!(
                        "pool \"{}\": spawn \"{}\": cannot listen on {a}: {e}; is another process using the port? change start_port in the config, or stop that process",
                        pool.name.get_ref(), spec.name
                    ),
                }
            }
        }
    }
    for (listener, path) in log_paths(config) {
        let dir = path.parent().filter(|d| !d.as_os_str().is_empty());
        if dir.is_some_and(|d| !d.is_dir()) {
            anyhow::bail!(
                "access_log of listener {listener}: path {}: the directory does not exist; create it or give another path",
                path.display()
            );
        }
    }
    crate::tls::check(config)?;
    if let Some(c) = &config.cluster {
        c.get_ref()
            .check_files(&config.base_dir)
            .map_err(anyhow::Error::msg)?;
    }
    Ok(warnings)
}

/// How long the listeners may take to come up before the process gives up.
const STARTUP_DEADLINE: Duration = Duration::from_secs(30);

/// Whether every listener is up (the admin API's `/readyz`).
#[derive(Debug, Default)]
pub struct Readiness(AtomicBool);

impl Readiness {
    /// True once every listener accepted a connection.
    pub fn is_ready(&self) -> bool {
        self.0.load(Ordering::Acquire)
    }
}

/// Tells systemd (`Type=notify`) what the service is doing: `READY=1` once every listener accepts
/// connections, `STOPPING=1` when a graceful stop begins. Does nothing outside systemd (no
/// `NOTIFY_SOCKET`). Written here rather than taken from a crate: the protocol is one datagram
/// of text to the socket systemd names, abstract (`@name`) or a path.
pub fn notify_service_manager(state: &str) {
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::net::{SocketAddr, UnixDatagram};
    let Some(target) = std::env::var_os("NOTIFY_SOCKET") else {
        return;
    };
    let target = target.as_bytes();
    let addr = match target.strip_prefix(b"@") {
        Some(name) => SocketAddr::from_abstract_name(name),
        None => SocketAddr::from_pathname(std::ffi::OsStr::from_bytes(target)),
    };
    let sent = addr.and_then(|a| UnixDatagram::unbound()?.send_to_addr(state.as_bytes(), &a));
    if let Err(e) = sent {
        tracing::warn!(error = %e, state, "could not notify the service manager (NOTIFY_SOCKET)");
    }
}

/// Watches the start: until every listener accepts connections, a panic in any thread (pingora
/// panics when a listener or its TLS setup fails) ends the process with status 1, and so does a
/// listener still down after [`STARTUP_DEADLINE`]. Once all are up, `ready` turns true and panics
/// are left to the default handling.
fn watch_startup(addrs: Vec<String>, ready: Arc<Readiness>) {
    let starting = Arc::new(AtomicBool::new(true));
    let default_hook = std::panic::take_hook();
    let still_starting = starting.clone();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        if still_starting.load(Ordering::Acquire) {
            tracing::error!(panic = %info, "a service failed while sluice was starting; exiting");
            eprintln!("error: a service failed while sluice was starting: {info}");
            std::process::exit(1);
        }
    }));
    std::thread::Builder::new()
        .name("sluice-startup".into())
        .spawn(move || {
            let deadline = Instant::now() + STARTUP_DEADLINE;
            for a in &addrs {
                while std::net::TcpStream::connect(a.as_str()).is_err() {
                    if Instant::now() > deadline {
                        tracing::error!(listen = %a, "listener did not come up; exiting");
                        eprintln!("error: the listener on {a} did not come up within {STARTUP_DEADLINE:?}; exiting");
                        std::process::exit(1);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            starting.store(false, Ordering::Release);
            ready.0.store(true, Ordering::Release);
            tracing::info!(listeners = addrs.len(), "all listeners are up");
            notify_service_manager("READY=1");
        })
        .expect("a thread can be spawned at start");
}

/// Runs the proxy until SIGTERM/SIGINT (graceful: see [`Drain`]) or SIGQUIT (hand the
/// listeners to a process started with `upgrade`, then the same). `upgrade` takes the
/// listeners from the running process over `[server] upgrade_sock` instead of binding them.
/// `ready` is called once everything is validated, right before the listeners start.
pub fn run(
    config: Config,
    config_path: Option<PathBuf>,
    upgrade: bool,
    ready: impl FnOnce(&Runtime),
) -> anyhow::Result<()> {
    // An upgrade takes over addresses the old process still listens on.
    preflight(&config, upgrade)?;
    let runtime = build_runtime(config.clone(), config_path)?;
    release_free_memory();
    // Spawned instances start now, in the background; each joins its pool once its port accepts.
    let rt = runtime.clone();
    let spawner = Arc::new(Spawner::start(move || rt.pools())?);
    runtime.set_spawning();
    let readiness = Arc::new(Readiness::default());
    // Join the cluster before any listener opens: a name conflict or a bad key stops us here.
    let cluster = match &config.cluster {
        Some(section) => {
            let section = section.get_ref();
            let cfg = section
                .to_config(&config.base_dir)
                .map_err(anyhow::Error::msg)?;
            let mut meta =
                crate::cluster::NodeMeta::new(section.node_name(), crate::cluster::Role::Proxy);
            meta.zone = config.server.zone.clone().unwrap_or_default();
            meta.admin = Some(config.admin.listen.get_ref().clone());
            let node = crate::membership::ClusterNode::start(cfg, meta.clone())?;
            let _ = runtime.cluster.set(node.handle.clone());
            node.spawn(crate::membership::watch(
                runtime.clone(),
                node.handle.clone(),
            ));
            // A name clash found while running: this proxy is the newcomer and has left the
            // cluster; it stops rather than route from a view it no longer follows.
            let handle = node.handle.clone();
            node.spawn(async move {
                if let Some(why) = handle.stopped().await {
                    tracing::error!(error = %why, "left the cluster; exiting");
                    eprintln!("error: {why}");
                    std::process::exit(1);
                }
            });
            let options = crate::rollout::RolloutOptions {
                accept: section.plugin_rollout,
                // A test hook (see `RolloutOptions`), never set outside the rollout tests.
                corrupt_announced: std::env::var_os("SLUICE_TEST_CORRUPT_ROLLOUT").is_some(),
            };
            let rollout = crate::rollout::Rollout::new(node.handle.clone(), meta, options);
            node.spawn(rollout.clone().run(runtime.clone()));
            tracing::info!(gossip = %node.handle.gossip_addr(), "joined the cluster");
            Some((node, rollout))
        }
        None => None,
    };
    let rollout = cluster.as_ref().map(|(_, r)| r.clone());

    let conf = ServerConf {
        threads: config.server.threads,
        // One single-threaded runtime per worker: no work-stealing bookkeeping on the request
        // path (measured in benches/RESULTS.md). The strategy's thread-local instances suit it too.
        work_stealing: false,
        // pingora sleeps this long after a graceful shutdown starts, then drops what is left;
        // `Drain` exits earlier as soon as no client connection is open.
        grace_period_seconds: Some(config.server.shutdown_grace.as_secs_f64().ceil() as u64),
        graceful_shutdown_timeout_seconds: Some(1),
        upgrade_sock: config.server.upgrade_sock.to_string_lossy().into_owned(),
        ..ServerConf::default()
    };
    let opt = pingora::server::configuration::Opt {
        upgrade,
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(opt, conf);
    server.bootstrap();

    // pingora-proxy serves HTTP/2, and HTTP/1 too when `[server] http1 = "pingora"`.
    // Validated by Config::load already; the same rules serve both request paths.
    let forwarding = config
        .server
        .forwarding
        .build()
        .map_err(anyhow::Error::msg)?;
    let mut logs = LogWriters {
        by_path: HashMap::new(),
        dropped: runtime
            .metrics
            .access_log_dropped
            .with_label_values::<&str>(&[]),
    };
    let access_log = logs.get(&config.server.access_log, &config)?;
    let forwarding_ = forwarding.clone();
    let runtime_ = runtime.clone();
    let conf = server.configuration.clone();
    let h2c = config.server.h2c;
    // pingora-proxy for listeners with this access log and these limits.
    let pingora_app = move |log: AccessLog, limits: ClientLimits| {
        let idle = limits.keepalive_timeout;
        let mut app = pingora::proxy::http_proxy(
            &conf,
            SluiceProxy::new(runtime_.clone(), forwarding_.clone(), log, limits),
        );
        let mut opts = HttpServerOptions::default();
        opts.h2c = h2c;
        // An HTTP/2 connection with no stream open is closed like an idle HTTP/1 one.
        opts.h2_idle_timeout = Some(idle);
        app.server_options = Some(opts);
        app
    };
    // Every client connection is admitted by the lean app (connection cap), which serves HTTP/1
    // itself or hands the connection to pingora-proxy.
    let mut lean = LeanApp::new(
        runtime.clone(),
        pingora_app(access_log.clone(), config.server.limits),
        config.server.h2c,
        config.server.http1,
        config.server.limits,
        forwarding,
        access_log,
    );
    // Listeners with settings of their own; the others take the defaults above. Listeners with
    // the same log and limits share one pingora-proxy.
    let mut fallbacks = Vec::new();
    for l in config.listeners() {
        if l.limits == config.server.limits && l.access_log == config.server.access_log {
            continue;
        }
        let log = logs.get(&l.access_log, &config)?;
        let key = (l.access_log.clone(), l.limits);
        let fallback = match fallbacks.iter().find(|(k, _)| *k == key) {
            Some((_, f)) => Arc::clone(f),
            None => {
                let f = Arc::new(pingora_app(log.clone(), l.limits));
                fallbacks.push((key, f.clone()));
                f
            }
        };
        lean.listener(l.addr, l.limits, log, fallback);
    }
    let mut proxy = Service::new("sluice-proxy".to_string(), lean);
    let tls = crate::tls::Tls::start(&config)?;
    for l in config.listeners() {
        let addr = l.addr.to_string();
        match &tls {
            Some(tls) if l.tls.is_some() => {
                proxy.add_tls_with_settings(&addr, None, tls.settings(l.addr)?)
            }
            _ => {
                // No L4 read buffer on plain listeners: both HTTP/1 engines and h2 read into
                // their own buffers, so pingora's default 64 KiB one only added a copy per read
                // and 64 KiB to every open connection (5,000 slow clients held 300 MB through it).
                let unbuffered_reads = L4BufferSettings::default().read(0);
                proxy.add_listener(ListenerConfig::tcp(&addr).l4_buffer(unbuffered_reads));
            }
        }
    }
    // A reload swaps certificates and client CAs in place (or, without TLS listeners, only
    // checks them, for the restart that would open one).
    let admin_tls = tls.clone();
    match tls {
        Some(tls) => runtime.set_reload_hook(Box::new(tls)),
        None => runtime.set_reload_hook(Box::new(crate::tls::CheckOnly)),
    }
    server.add_service(proxy);

    let mut admin = Service::new(
        "sluice-admin".to_string(),
        AdminApp::new(
            runtime.clone(),
            config.admin.token.as_deref(),
            config.admin.protect_reads,
            readiness.clone(),
        )
        .with_server_info(crate::dashboard::ServerInfo::new(
            config.listeners(),
            admin_tls,
        ))
        .with_rollout(rollout),
    );
    if config.admin.token.is_none()
        && config
            .admin
            .listen
            .get_ref()
            .parse::<std::net::SocketAddr>()
            .is_ok_and(|a| !a.ip().is_loopback())
    {
        tracing::warn!(
            listen = %config.admin.listen.get_ref(),
            "THE ADMIN API IS OPEN TO THE NETWORK WITHOUT A TOKEN ([admin] allow_unauthenticated = true): anyone who reaches it can reload the config, swap plugins and drain backends; set [admin] token"
        );
    }
    admin.add_tcp(config.admin.listen.get_ref());
    admin.threads = Some(1);
    server.add_service(admin);

    server.add_service(background_service(
        "sigusr1-reopen-log",
        ReopenLog(logs.by_path.values().cloned().collect()),
    ));
    server.add_service(background_service(
        "drain-on-shutdown",
        Drain {
            runtime: runtime.clone(),
            access_logs: logs.by_path.into_values().collect(),
            grace: config.server.shutdown_grace,
            spawner: spawner.clone(),
        },
    ));
    server.add_service(background_service(
        "sighup-reload",
        SighupReload {
            runtime: runtime.clone(),
        },
    ));
    server.add_service(background_service(
        "pool-upkeep",
        PoolUpkeep {
            runtime: runtime.clone(),
        },
    ));
    server.add_service(background_service(
        "dashboard-history",
        HistorySampler {
            runtime: runtime.clone(),
        },
    ));
    server.add_service(background_service(
        "health-checks",
        HealthChecks {
            runtime: runtime.clone(),
        },
    ));
    server.add_service(background_service(
        "dns-refresh",
        DnsRefresh {
            runtime: runtime.clone(),
        },
    ));

    watch_startup(listen_addrs(&config), readiness);
    ready(&runtime);
    // The cluster member lives as long as the process; pingora exits the process on shutdown.
    std::mem::forget(cluster);
    server.run(RunArgs {
        shutdown_signal: Box::new(Signals),
    });
    // pingora's grace ended before `Drain` was done: the instances still get their stop.
    let limit = stop_limit(&runtime);
    if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
    {
        rt.block_on(spawner.stop(false, limit));
    }
    std::process::exit(0)
}

/// SIGTERM and SIGINT shut down gracefully (pingora's SIGINT is immediate; operators and
/// orchestrators expect both to drain, as nginx's SIGQUIT and Envoy's drain do); SIGQUIT hands
/// the listeners over for an upgrade first. A second SIGTERM/SIGINT exits at once ([`Drain`]).
struct Signals;

#[async_trait::async_trait]
impl ShutdownSignalWatch for Signals {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let mut quit = signal(SignalKind::quit()).expect("signal handlers install at start");
        let mut term = signal(SignalKind::terminate()).expect("signal handlers install at start");
        let mut int = signal(SignalKind::interrupt()).expect("signal handlers install at start");
        tokio::select! {
            _ = quit.recv() => {
                tracing::info!("SIGQUIT: handing the listeners to the new process, then draining");
                ShutdownSignal::GracefulUpgrade
            }
            _ = term.recv() => ShutdownSignal::GracefulTerminate,
            _ = int.recv() => ShutdownSignal::GracefulTerminate,
        }
    }
}

/// The graceful end of the process. Once pingora broadcasts shutdown (at once on
/// SIGTERM/SIGINT; after the listeners were handed over on SIGQUIT) the listeners no longer
/// accept, idle keep-alive connections close and busy ones close after their response. This
/// leaves the cluster gracefully, waits until no client connection is open or `grace` has
/// passed, lets the access log write out, and exits.
struct Drain {
    runtime: Arc<Runtime>,
    /// Every access log writer (one per file).
    access_logs: Vec<AccessLog>,
    grace: std::time::Duration,
    /// The spawned instances, stopped once the clients are gone.
    spawner: Arc<Spawner>,
}

/// How long stopping every spawned instance may take: the longest `stop_grace`, and time to
/// reap what had to be killed.
fn stop_limit(runtime: &Runtime) -> Duration {
    let longest = runtime
        .pools()
        .iter()
        .flat_map(|p| p.spawns().iter().map(|s| s.stop_grace).collect::<Vec<_>>())
        .max()
        .unwrap_or_default();
    longest + Duration::from_secs(6)
}

#[async_trait::async_trait]
impl BackgroundService for Drain {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        use tokio::signal::unix::{signal, SignalKind};
        let _ = shutdown.changed().await;
        notify_service_manager("STOPPING=1");
        let open = self
            .runtime
            .metrics
            .downstream_open
            .with_label_values::<&str>(&[]);
        tracing::info!(
            grace = %humantime::format_duration(self.grace),
            open_connections = open.get(),
            "shutting down: accepting no new connections, letting requests in flight finish"
        );
        let mut term = signal(SignalKind::terminate()).ok();
        let mut int = signal(SignalKind::interrupt()).ok();
        if let Some(cluster) = self.runtime.cluster.get() {
            match tokio::time::timeout(std::time::Duration::from_secs(2), cluster.leave()).await {
                Ok(Ok(())) => tracing::info!("left the cluster"),
                _ => tracing::warn!(
                    "could not announce leaving the cluster; the others will find this node gone"
                ),
            }
        }
        let deadline = tokio::time::Instant::now() + self.grace;
        let mut hurry = false;
        loop {
            if open.get() <= 0 {
                tracing::info!("every client connection is closed");
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(
                    open_connections = open.get(),
                    "shutdown grace is over; closing the connections still open"
                );
                break;
            }
            tokio::select! {
                _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
                Some(_) = async { term.as_mut()?.recv().await } => {
                    tracing::warn!("second SIGTERM: exiting now");
                    hurry = true;
                    break;
                }
                Some(_) = async { int.as_mut()?.recv().await } => {
                    tracing::warn!("second SIGINT: exiting now");
                    hurry = true;
                    break;
                }
            }
        }
        // The instances served the requests that were in flight; now they stop too.
        let instances: usize = self
            .runtime
            .pools()
            .iter()
            .map(|p| p.instance_status().len())
            .sum();
        if instances > 0 {
            tracing::info!(instances, "stopping the spawned instances");
        }
        let limit = stop_limit(&self.runtime);
        let stopping = self.spawner.stop(hurry, limit);
        tokio::pin!(stopping);
        let stopped = loop {
            tokio::select! {
                stopped = &mut stopping => break stopped,
                Some(_) = async { term.as_mut()?.recv().await } => {
                    tracing::warn!("another SIGTERM: killing the spawned instances");
                    self.spawner.stop(true, Duration::ZERO).await;
                }
                Some(_) = async { int.as_mut()?.recv().await } => {
                    tracing::warn!("another SIGINT: killing the spawned instances");
                    self.spawner.stop(true, Duration::ZERO).await;
                }
            }
        };
        if !stopped {
            tracing::warn!("spawned instances still running at exit are killed by the kernel");
        } else if instances > 0 {
            tracing::info!("every spawned instance has stopped");
        }
        let deadline = Instant::now() + std::time::Duration::from_secs(2);
        let written = self
            .access_logs
            .iter()
            .all(|log| log.wait_written(deadline.saturating_duration_since(Instant::now())));
        if !written {
            tracing::warn!("access log lines still queued at exit were lost");
        }
        tracing::info!("sluice exits");
        std::process::exit(0);
    }
}

/// Re-admits ejected backends, advances slow-start ramps and re-evaluates zone load.
struct PoolUpkeep {
    runtime: Arc<Runtime>,
}

/// How often pools are maintained; bounds how late an ejection ends.
const UPKEEP_PERIOD: std::time::Duration = std::time::Duration::from_millis(100);

#[async_trait]
impl BackgroundService for PoolUpkeep {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(UPKEEP_PERIOD);
        loop {
            tokio::select! {
                _ = tick.tick() => self.runtime.maintain(),
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Samples the dashboard's history of every pool and backend once a second.
struct HistorySampler {
    runtime: Arc<Runtime>,
}

#[async_trait]
impl BackgroundService for HistorySampler {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let mut tick = tokio::time::interval(crate::history::SAMPLE_PERIOD);
        // After a stall, go on a second from now: no burst of samples one after another.
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => self.runtime.history.sample(&self.runtime.pools()),
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Runs the active health checks of every pool that has them.
struct HealthChecks {
    runtime: Arc<Runtime>,
}

#[async_trait]
impl BackgroundService for HealthChecks {
    async fn start(&self, shutdown: ShutdownWatch) {
        let runtime = self.runtime.clone();
        crate::health_scheduler::run(move || runtime.pools(), shutdown).await;
    }
}

/// Re-resolves the backend host names of every pool when due.
struct DnsRefresh {
    runtime: Arc<Runtime>,
}

#[async_trait]
impl BackgroundService for DnsRefresh {
    async fn start(&self, shutdown: ShutdownWatch) {
        let (pools, resolver) = (self.runtime.clone(), self.runtime.clone());
        crate::dns::run(move || pools.pools(), move || resolver.resolver(), shutdown).await;
    }
}

/// Access log writers, one per file: listeners that log to the same file share its writer.
struct LogWriters {
    /// By resolved path; `None` is standard output.
    by_path: HashMap<Option<PathBuf>, AccessLog>,
    dropped: prometheus::IntCounter,
}

impl LogWriters {
    /// The log `cfg` describes, starting its writer if no listener writes to that file yet.
    fn get(
        &mut self,
        cfg: &crate::access_log::AccessLogConfig,
        config: &Config,
    ) -> anyhow::Result<AccessLog> {
        // A listener that logs nothing still gets a writer when a route logs in a format of
        // its own: a route's `access_log` overrides the listener's, which overrides the global.
        if cfg.format == crate::access_log::LogFormat::Off && !config.access_log_writer_needed() {
            return Ok(AccessLog::off());
        }
        let path = cfg
            .path
            .as_ref()
            .filter(|p| p.as_os_str() != "-")
            .map(|p| config.resolve_path(&p.to_string_lossy()));
        if let Some(w) = self.by_path.get(&path) {
            return Ok(w.with_format(cfg.format));
        }
        let wanted = crate::access_log::AccessLogConfig {
            format: cfg.format,
            path: path.clone(),
        };
        let w = AccessLog::start_with_writer(&wanted, true, self.dropped.clone()).map_err(|e| {
            anyhow::anyhow!(
                "access_log: cannot open {} for appending: {e}",
                path.as_deref()
                    .unwrap_or(std::path::Path::new("-"))
                    .display()
            )
        })?;
        self.by_path.insert(path, w.clone());
        Ok(w)
    }
}

/// Reopens the access log files on SIGUSR1 (after logrotate moved them).
struct ReopenLog(Vec<AccessLog>);

#[async_trait]
impl BackgroundService for ReopenLog {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Ok(mut usr1) =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::user_defined1())
        else {
            tracing::warn!("cannot install the SIGUSR1 handler; the access log is not reopened");
            return;
        };
        loop {
            tokio::select! {
                _ = usr1.recv() => {
                    for log in &self.0 {
                        log.reopen();
                    }
                    tracing::info!("SIGUSR1: access log reopened");
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}

/// Reloads the config file on SIGHUP.
struct SighupReload {
    runtime: Arc<Runtime>,
}

#[async_trait]
impl BackgroundService for SighupReload {
    async fn start(&self, mut shutdown: ShutdownWatch) {
        let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        else {
            tracing::warn!("cannot install the SIGHUP handler; use POST /api/reload instead");
            return;
        };
        loop {
            tokio::select! {
                _ = hup.recv() => {
                    let rt = self.runtime.clone();
                    // Errors are logged by reload itself; the running config stays.
                    let _ = tokio::task::spawn_blocking(move || {
                        let r = rt.reload();
                        release_free_memory();
                        r
                    })
                    .await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }
}
