//! Pool membership from the gossip cluster: the `[cluster]` config section, starting this
//! process's cluster member, and keeping every pool's backends equal to its static entries plus
//! the services cluster members announce for it.
//!
//! A *suspect* or *draining* member stays in the pool but receives no new requests at once; a
//! *down* or *left* member leaves the pool.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::cluster::{Cluster, ClusterConfig, ClusterHandle, MemberState, NodeMeta, Profile, Role};
use crate::config::BackendSpec;
use crate::runtime::Runtime;

/// `[cluster]`: joins this process to a gossip cluster.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Cluster name; also authenticated in every packet, so clusters sharing a key stay apart.
    pub name: String,
    /// This node's unique name (default: host name and gossip port).
    #[serde(default)]
    pub node_name: Option<String>,
    /// Address to bind UDP and TCP gossip on.
    pub bind_addr: String,
    /// Address others reach this node at (default: `bind_addr`).
    #[serde(default)]
    pub advertise_addr: Option<String>,
    /// Base64 AES-256 key (`sluice genkey`).
    #[serde(default)]
    pub key: Option<String>,
    /// Several keys: the first encrypts, all decrypt (key rotation).
    #[serde(default)]
    pub keys: Vec<String>,
    /// A file holding the key(s), one per line.
    #[serde(default)]
    pub key_file: Option<String>,
    /// Seeds; may be empty for the first node.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Deflate large messages.
    #[serde(default)]
    pub compression: bool,
    /// Timing profile: "lan" (default), "wan" or "local" (fast, for one machine).
    #[serde(default = "default_profile")]
    pub profile: String,
    /// Expected cluster size (tunes dissemination and suspicion).
    #[serde(default = "default_expected_size")]
    pub expected_size: u32,
}

fn default_profile() -> String {
    "lan".into()
}
fn default_expected_size() -> u32 {
    32
}

impl ClusterSection {
    /// Validates the section and builds the runtime config. `base` resolves `key_file`.
    pub fn to_config(&self, base: &Path) -> Result<ClusterConfig, String> {
        let bind: SocketAddr = self.bind_addr.parse().map_err(|_| {
            format!(
                "[cluster] bind_addr \"{}\" is not an IP:port; write it like \"127.0.0.1:7946\"",
                self.bind_addr
            )
        })?;
        let advertise = match &self.advertise_addr {
            Some(a) => Some(
                a.parse()
                    .map_err(|_| format!("[cluster] advertise_addr \"{a}\" is not an IP:port"))?,
            ),
            None => None,
        };
        let mut keys: Vec<String> = self
            .key
            .iter()
            .cloned()
            .chain(self.keys.iter().cloned())
            .collect();
        if let Some(f) = &self.key_file {
            let p = if Path::new(f).is_absolute() {
                Path::new(f).to_path_buf()
            } else {
                base.join(f)
            };
            let text = std::fs::read_to_string(&p)
                .map_err(|e| format!("[cluster] key_file {}: {e}", p.display()))?;
            keys.extend(
                text.lines()
                    .map(str::trim)
                    .filter(|l| !l.is_empty() && !l.starts_with('#'))
                    .map(String::from),
            );
        }
        if keys.is_empty() {
            return Err("[cluster] needs a key: set key = \"...\" (generate one with `sluice genkey`), keys = [...] or key_file".into());
        }
        for k in &keys {
            crate::cluster::keyring::parse_key(k).map_err(|e| format!("[cluster] key: {e}"))?;
        }
        let profile = match self.profile.as_str() {
            "lan" => Profile::Lan,
            "wan" => Profile::Wan,
            "local" => Profile::Local,
            other => {
                return Err(format!(
                    "[cluster] profile \"{other}\" is unknown; use \"lan\", \"wan\" or \"local\""
                ))
            }
        };
        if self.name.is_empty() {
            return Err("[cluster] name must not be empty".into());
        }
        Ok(ClusterConfig {
            cluster_name: self.name.clone(),
            bind_addr: bind,
            advertise_addr: advertise,
            keys,
            peers: self.peers.clone(),
            profile,
            compression: self.compression,
            expected_size: self.expected_size.max(1),
        })
    }

    /// The node name: configured, or host name plus gossip port.
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .unwrap_or_else(|_| "node".into());
            let port = self.bind_addr.rsplit(':').next().unwrap_or("0");
            format!("{host}-{port}")
        })
    }
}

/// A cluster member running on its own small tokio runtime (the proxy's runtimes belong to
/// pingora's services), so it can be started and checked before any listener opens.
pub struct ClusterNode {
    /// The member.
    pub handle: ClusterHandle,
    runtime: tokio::runtime::Runtime,
}

impl ClusterNode {
    /// Joins the cluster; fails on a name conflict, a bad key or an address in use.
    pub fn start(config: ClusterConfig, meta: NodeMeta) -> anyhow::Result<ClusterNode> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("sluice-gossip")
            .enable_all()
            .build()?;
        let handle = runtime.block_on(Cluster::start(config, meta))?;
        Ok(ClusterNode { handle, runtime })
    }

    /// Spawns `fut` on the cluster's runtime.
    pub fn spawn<F: std::future::Future<Output = ()> + Send + 'static>(&self, fut: F) {
        self.runtime.spawn(fut);
    }

    /// Runs `fut` to completion on the cluster's runtime.
    pub fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        self.runtime.block_on(fut)
    }
}

/// The gossip-announced backends of `pool` in `members`, with their hold state
/// (true = in the pool but no new requests: suspect or draining).
pub fn gossip_backends(
    members: &[crate::cluster::MemberInfo],
    pool: &str,
) -> Vec<(BackendSpec, bool)> {
    let mut out: Vec<(BackendSpec, bool)> = Vec::new();
    for m in members.iter().filter(|m| m.meta.role == Role::Backend) {
        if matches!(m.state, MemberState::Down | MemberState::Left) {
            continue;
        }
        let hold = m.state == MemberState::Suspect || m.meta.draining;
        for s in m.meta.services.iter().filter(|s| s.pool == pool) {
            if out.iter().any(|(b, _)| b.addr == s.addr) {
                continue; // the same address announced twice: first one wins
            }
            let spec = BackendSpec {
                addr: s.addr,
                weight: s.weight.max(1),
                zone: s.zone.clone().unwrap_or_else(|| m.meta.zone.clone()),
                tags: s.tags.clone().unwrap_or_else(|| m.meta.tags.clone()),
            };
            out.push((spec, hold));
        }
    }
    out.sort_by_key(|(b, _)| b.addr);
    out
}

/// Applies the cluster's current members to every pool.
pub fn sync_pools(runtime: &Runtime, handle: &ClusterHandle) {
    let members = handle.members_snapshot();
    for pool in runtime.pools() {
        let gossip = gossip_backends(&members, &pool.name);
        pool.set_gossip_backends(&gossip.iter().map(|(b, _)| b.clone()).collect::<Vec<_>>());
        let mut changed = false;
        for b in pool.members.load().iter() {
            let hold = gossip.iter().any(|(g, h)| g.addr == b.addr && *h);
            if b.stats.cluster_hold.swap(hold, Ordering::Relaxed) != hold {
                changed = true;
            }
        }
        if changed {
            pool.rebuild_table();
        }
    }
}

/// Keeps pools in step with the cluster until the process ends.
pub async fn watch(runtime: Arc<Runtime>, handle: ClusterHandle) {
    let mut changes = handle.changes();
    sync_pools(&runtime, &handle);
    loop {
        // Also re-sync periodically: a reload may have added pools that members announce for.
        let _ = tokio::time::timeout(Duration::from_secs(1), changes.changed()).await;
        sync_pools(&runtime, &handle);
    }
}

/// The cluster as the admin API shows it (`GET /api/cluster`).
pub fn cluster_json(handle: &ClusterHandle) -> serde_json::Value {
    let now = crate::clock::now_ms();
    let members: Vec<serde_json::Value> = handle
        .members()
        .iter()
        .map(|m| {
            serde_json::json!({
                "name": m.meta.name,
                "role": match m.meta.role { Role::Proxy => "proxy", Role::Backend => "backend" },
                "zone": m.meta.zone,
                "tags": m.meta.tags,
                "address": m.gossip_addr.to_string(),
                "state": match m.state {
                    MemberState::Alive if m.meta.draining => "draining",
                    MemberState::Alive => "alive",
                    MemberState::Suspect => "suspect",
                    MemberState::Down => "down",
                    MemberState::Left => "left",
                },
                "incarnation": m.incarnation,
                "generation": m.generation,
                "services": m.meta.services.iter().map(|s| serde_json::json!({ "pool": s.pool, "addr": s.addr.to_string(), "weight": s.weight })).collect::<Vec<_>>(),
                "last_change_ms_ago": now.saturating_sub(m.last_change_ms),
                "self": m.is_self,
                "admin": m.meta.admin,
            })
        })
        .collect();
    let st = handle.stats();
    serde_json::json!({
        "members": members,
        "transport": {
            "udp_sent": st.udp_sent, "udp_received": st.udp_received, "tcp_sent": st.tcp_sent, "tcp_received": st.tcp_received,
            "bytes_sent": st.bytes_sent, "bytes_received": st.bytes_received,
            "rejected_decrypt": st.rejected_decrypt, "malformed": st.malformed,
        },
        "keys": handle.keys().len(),
    })
}

/// Applies a keyring operation: `install`, `use` or `remove`.
pub fn keyring_op(handle: &ClusterHandle, op: &str, key: &str) -> Result<(), String> {
    match op {
        "install" => handle.keyring_install(key),
        "use" => handle.keyring_use(key),
        "remove" => handle.keyring_remove(key),
        other => {
            return Err(format!(
                "unknown key operation \"{other}\"; use install, use or remove"
            ))
        }
    }
    .map_err(|e| e.to_string())
}

/// The cluster (as returned by `GET /api/cluster`) as a Graphviz DOT graph: proxies and backends
/// as nodes coloured by state, an edge from each proxy to each backend per pool it serves.
pub fn cluster_dot(cluster: &serde_json::Value) -> String {
    use std::fmt::Write;
    let esc = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let mut out =
        String::from("digraph sluice {\n  rankdir=LR;\n  node [fontname=\"Helvetica\"];\n");
    let members = cluster["members"].as_array().cloned().unwrap_or_default();
    for m in &members {
        let name = m["name"].as_str().unwrap_or("?");
        let state = m["state"].as_str().unwrap_or("?");
        let color = match state {
            "alive" => "darkgreen",
            "suspect" | "draining" => "orange",
            _ => "gray",
        };
        let shape = if m["role"] == "proxy" {
            "box"
        } else {
            "ellipse"
        };
        let _ = writeln!(
            out,
            "  \"{}\" [shape={shape}, color={color}, label=\"{}\\n{}\\n{}\"];",
            esc(name),
            esc(name),
            esc(m["address"].as_str().unwrap_or("")),
            esc(state)
        );
    }
    for p in members.iter().filter(|m| m["role"] == "proxy") {
        for b in members.iter().filter(|m| m["role"] == "backend") {
            for s in b["services"].as_array().into_iter().flatten() {
                let _ = writeln!(
                    out,
                    "  \"{}\" -> \"{}\" [label=\"{}\"];",
                    esc(p["name"].as_str().unwrap_or("?")),
                    esc(b["name"].as_str().unwrap_or("?")),
                    esc(s["pool"].as_str().unwrap_or(""))
                );
            }
        }
    }
    out.push_str("}\n");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::{MemberInfo, Service};

    fn member(
        name: &str,
        state: MemberState,
        draining: bool,
        services: Vec<Service>,
    ) -> MemberInfo {
        let mut meta = NodeMeta::new(name, Role::Backend);
        meta.zone = "eu".into();
        meta.draining = draining;
        meta.services = services;
        MemberInfo {
            meta,
            gossip_addr: "127.0.0.1:7946".parse().unwrap(),
            state,
            incarnation: 0,
            generation: 0,
            meta_version: 0,
            last_change_ms: 0,
            is_self: false,
        }
    }

    fn svc(pool: &str, port: u16, zone: Option<&str>) -> Service {
        Service {
            pool: pool.into(),
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            weight: 1,
            zone: zone.map(String::from),
            tags: None,
        }
    }

    #[test]
    fn pool_members_follow_member_states() {
        let members = vec![
            member(
                "alive",
                MemberState::Alive,
                false,
                vec![svc("web", 1, None), svc("api", 2, None)],
            ),
            member(
                "suspect",
                MemberState::Suspect,
                false,
                vec![svc("web", 3, None)],
            ),
            member(
                "draining",
                MemberState::Alive,
                true,
                vec![svc("web", 4, Some("us"))],
            ),
            member("down", MemberState::Down, false, vec![svc("web", 5, None)]),
            member("left", MemberState::Left, false, vec![svc("web", 6, None)]),
        ];
        let web = gossip_backends(&members, "web");
        let got: Vec<(u16, bool, &str)> = web
            .iter()
            .map(|(b, hold)| (b.addr.port(), *hold, b.zone.as_str()))
            .collect();
        // Down and left members are gone; suspect and draining ones stay, held from new requests.
        assert_eq!(
            got,
            vec![(1, false, "eu"), (3, true, "eu"), (4, true, "us")]
        );
        assert_eq!(gossip_backends(&members, "api").len(), 1);
        assert!(gossip_backends(&members, "none").is_empty());
    }

    #[test]
    fn cluster_sections_are_validated() {
        let section = |extra: &str| -> ClusterSection {
            toml::from_str(&format!(
                "name = \"c\"\nbind_addr = \"127.0.0.1:7946\"\n{extra}"
            ))
            .unwrap()
        };
        assert!(section("")
            .to_config(Path::new("."))
            .unwrap_err()
            .contains("needs a key"));
        assert!(section("key = \"short\"")
            .to_config(Path::new("."))
            .unwrap_err()
            .contains("[cluster] key"));
        let key = crate::cluster::keyring::generate_key();
        assert!(section(&format!("key = \"{key}\"\nprofile = \"fast\""))
            .to_config(Path::new("."))
            .unwrap_err()
            .contains("profile \"fast\" is unknown"));
        let cfg = section(&format!("key = \"{key}\"\npeers = [\"127.0.0.1:7947\"]"))
            .to_config(Path::new("."))
            .unwrap();
        assert_eq!(cfg.peers, vec!["127.0.0.1:7947".to_string()]);
    }
}
