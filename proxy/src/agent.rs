//! `sluice agent --config FILE`: runs on a backend host, joins the cluster and announces the
//! host's services to the proxies. Optionally checks each local service before announcing it.
//! On SIGTERM or SIGINT it drains: it marks itself draining (proxies stop sending new requests
//! at once), waits a grace period for requests in flight, then leaves the cluster.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

use crate::cluster::{NodeMeta, Role, Service};
use crate::membership::{ClusterNode, ClusterSection};

/// The agent's config file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// Same section as the proxy's.
    pub cluster: ClusterSection,
    /// Node-level settings.
    #[serde(default)]
    pub agent: AgentSection,
    /// Services this host offers.
    #[serde(default)]
    pub service: Vec<ServiceSection>,
}

/// `[agent]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentSection {
    /// Zone of this host (default: the first service's `zone`).
    #[serde(default)]
    pub zone: Option<String>,
    /// Tags of this host, passed to strategies (default: the first service's `tags`).
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// How long to keep serving after announcing the drain, before leaving.
    #[serde(default = "default_grace", with = "crate::config::duration")]
    pub drain_grace: Duration,
    /// How often local checks run.
    #[serde(default = "default_check_interval", with = "crate::config::duration")]
    pub check_interval: Duration,
}

impl Default for AgentSection {
    fn default() -> Self {
        AgentSection {
            zone: None,
            tags: None,
            drain_grace: default_grace(),
            check_interval: default_check_interval(),
        }
    }
}

fn default_grace() -> Duration {
    Duration::from_secs(5)
}
fn default_check_interval() -> Duration {
    Duration::from_secs(2)
}

/// `[[service]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServiceSection {
    /// Pool the proxies put it in.
    pub pool: String,
    /// Address the proxies connect to.
    pub addr: String,
    /// Relative weight.
    #[serde(default = "one")]
    pub weight: u32,
    /// Zone of this service (default: the node's; also the node's when `[agent] zone` is not set).
    #[serde(default)]
    pub zone: Option<String>,
    /// Tags of this service (default: the node's; also the node's when `[agent] tags` is not set).
    #[serde(default)]
    pub tags: Option<Vec<String>>,
    /// Local check before announcing: `"tcp"` (connect) or `"http:/path"` (a 2xx/3xx answer).
    #[serde(default)]
    pub check: Option<String>,
}

fn one() -> u32 {
    1
}

/// A validated service.
#[derive(Debug, Clone)]
struct LocalService {
    service: Service,
    check: Option<LocalCheck>,
}

#[derive(Debug, Clone)]
enum LocalCheck {
    Tcp,
    Http(String),
}

impl AgentConfig {
    /// Reads and validates an agent config file.
    pub fn load(path: &Path) -> anyhow::Result<AgentConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| {
            anyhow::anyhow!("{}: cannot read the agent config: {e}", path.display())
        })?;
        let cfg: AgentConfig = crate::config::parse_toml(&text, &path.display().to_string())?;
        let base = path.parent().unwrap_or(Path::new("."));
        cfg.cluster
            .check_files(base)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        if cfg.service.is_empty() {
            anyhow::bail!(
                "{}: no [[service]] entries; an agent announces at least one service (pool, addr)",
                path.display()
            );
        }
        cfg.services()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        Ok(cfg)
    }

    fn services(&self) -> Result<Vec<LocalService>, String> {
        self.service
            .iter()
            .map(|s| {
                let addr: SocketAddr = s.addr.parse().map_err(|_| format!("[[service]] addr \"{}\" is not an IP:port", s.addr))?;
                if s.weight == 0 {
                    return Err(format!("[[service]] {}: weight starts at 1", s.addr));
                }
                let check = match s.check.as_deref() {
                    None => None,
                    Some("tcp") => Some(LocalCheck::Tcp),
                    Some(c) if c.starts_with("http:/") => Some(LocalCheck::Http(c["http:".len()..].to_string())),
                    Some(other) => return Err(format!("[[service]] {}: check \"{other}\" is unknown; use \"tcp\" or \"http:/path\"", s.addr)),
                };
                Ok(LocalService { service: Service { pool: s.pool.clone(), addr, weight: s.weight, zone: s.zone.clone(), tags: s.tags.clone() }, check })
            })
            .collect()
    }

    fn meta(&self, services: Vec<Service>) -> NodeMeta {
        let mut meta = NodeMeta::new(self.cluster.node_name(), Role::Backend);
        meta.zone = self
            .agent
            .zone
            .clone()
            .or_else(|| self.service.iter().find_map(|s| s.zone.clone()))
            .unwrap_or_default();
        meta.tags = self
            .agent
            .tags
            .clone()
            .or_else(|| self.service.iter().find_map(|s| s.tags.clone()))
            .unwrap_or_default();
        meta.services = services;
        meta
    }
}

/// Whether a local service passes its check (no check = passes).
async fn passes(s: &LocalService) -> bool {
    let spec = match &s.check {
        None => return true,
        Some(LocalCheck::Tcp) => crate::health::Probe::tcp_connect(),
        Some(LocalCheck::Http(path)) => crate::health::Probe::http_get(path.clone()),
    };
    // Completed, and for HTTP a 2xx or 3xx status.
    crate::health_probe::run(s.service.addr, &spec, Duration::from_secs(2), None)
        .await
        .is_success()
}

async fn passing(services: &[LocalService]) -> Vec<Service> {
    let mut out = Vec::new();
    for s in services {
        if passes(s).await {
            out.push(s.service.clone());
        }
    }
    out
}

/// The `[cluster]` section and keys in force, for SIGHUP reloads.
struct Applied {
    section: ClusterSection,
    keys: Vec<String>,
}

impl Applied {
    /// Re-reads the file and applies what may change live in `[cluster]` (keys, peers); a
    /// change that needs a restart, or an invalid file, changes nothing.
    fn reload(
        &mut self,
        path: &Path,
        handle: &crate::cluster::ClusterHandle,
    ) -> anyhow::Result<usize> {
        let base = path.parent().unwrap_or(Path::new("."));
        let cfg = AgentConfig::load(path)?;
        let keys = cfg
            .cluster
            .to_config(base)
            .map_err(anyhow::Error::msg)?
            .keys;
        let plan = crate::cluster_config::reload_plan(
            Some(&self.section),
            Some(&cfg.cluster),
            &self.keys,
            &keys,
        )
        .map_err(anyhow::Error::msg)?;
        if let Some(k) = &plan.keys {
            crate::membership::apply_keys(handle, k).map_err(anyhow::Error::msg)?;
        }
        if let Some(peers) = plan.peers {
            handle.set_peers(peers)?;
        }
        self.section = cfg.cluster;
        self.keys = keys;
        Ok(handle.keys().len())
    }
}

/// Runs the agent until SIGTERM/SIGINT, then drains and leaves. SIGHUP re-reads the file's
/// `[cluster]` keys and peers (key rotation without a restart). Ends with an error when the
/// member gave its name up to an older member with the same name.
pub fn run(cfg: AgentConfig, path: &Path) -> anyhow::Result<()> {
    let base = path.parent().unwrap_or(Path::new("."));
    let cluster_cfg = cfg.cluster.to_config(base).map_err(anyhow::Error::msg)?;
    let services = cfg.services().map_err(anyhow::Error::msg)?;
    // Checks run before the first announcement, so proxies never see a service that is not up.
    let probe_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let first = probe_rt.block_on(passing(&services));
    drop(probe_rt);
    for s in services.iter().filter(|s| !first.contains(&s.service)) {
        tracing::warn!(addr = %s.service.addr, pool = %s.service.pool, "local check failed; not announced until it passes");
    }
    let start_keys = cluster_cfg.keys.clone();
    let node = ClusterNode::start(cluster_cfg, cfg.meta(first.clone()))?;
    tracing::info!(name = %cfg.cluster.node_name(), gossip = %node.handle.gossip_addr(), services = first.len(), "agent joined the cluster");
    let handle = node.handle.clone();
    let mut applied = Applied {
        section: cfg.cluster.clone(),
        keys: start_keys,
    };
    node.block_on(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        let mut int = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
        let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?;
        let mut announced = first;
        let mut tick = tokio::time::interval(cfg.agent.check_interval);
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = int.recv() => break,
                why = handle.stopped() => {
                    // Gave its name up (the only way the member stops on its own).
                    let why = why.map_or_else(|| anyhow::anyhow!("the cluster member stopped"), anyhow::Error::from);
                    return Err(why);
                }
                _ = hup.recv() => {
                    match applied.reload(path, &handle) {
                        Ok(n) => tracing::info!(keys = n, "cluster keys reloaded"),
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "reload rejected; the running config stays"),
                    }
                }
                _ = tick.tick() => {
                    let now = passing(&services).await;
                    if now != announced {
                        tracing::info!(before = announced.len(), now = now.len(), "announced services changed after local checks");
                        handle.set_meta(cfg.meta(now.clone()))?;
                        announced = now;
                    }
                }
            }
        }
        tracing::info!(grace = ?cfg.agent.drain_grace, "draining: proxies stop sending new requests; leaving after the grace period");
        let mut meta = cfg.meta(announced);
        meta.draining = true;
        handle.set_meta(meta)?;
        tokio::time::sleep(cfg.agent.drain_grace).await;
        handle.leave().await?;
        tracing::info!("left the cluster");
        Ok::<(), anyhow::Error>(())
    })
}
