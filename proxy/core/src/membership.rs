//! Pool membership from the gossip cluster: the `[cluster]` config section, starting this
//! process's cluster member, and keeping every pool's backends equal to its static entries plus
//! the services cluster members announce for it.
//!
//! A *suspect* or *draining* member stays in the pool but receives no new requests at once; a
//! *down* or *left* member leaves the pool.

use std::sync::Arc;
use std::time::Duration;

use crate::cluster::{Cluster, ClusterConfig, ClusterHandle, MemberState, NodeMeta, Role};
use crate::config::BackendSpec;
use crate::runtime::Runtime;

pub use crate::cluster_config::ClusterSection;

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
        pool.set_gossip_backends(&gossip_backends(&members, &pool.name));
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
                "rollout": (m.meta.role == Role::Proxy).then(|| crate::rollout::Published::of(&m.meta)),
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
    use std::net::SocketAddr;

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
}
