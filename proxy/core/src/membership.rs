//! Pool membership from the gossip cluster: the `[cluster]` config section, starting this
//! process's cluster member, and keeping every pool's backends equal to its static entries plus
//! the services cluster members announce for it.
//!
//! A *draining* member stays in the pool but receives no new requests at once; a *suspect*
//! one too, once the suspicion is corroborated ([`HoldPolicy`]); a *down* or *left* member
//! leaves the pool. When this proxy sees every other member fail, or a large share of them at
//! once ([`LastKnownGood`]), it keeps the pools as they were and says so.

use std::sync::Arc;
use std::time::Duration;

use crate::cluster::routing::Freeze;
use crate::cluster::{
    Cluster, ClusterConfig, ClusterHandle, HoldPolicy, LastKnownGood, MemberState, NodeMeta, Role,
};
use crate::config::BackendSpec;
use crate::runtime::Runtime;

pub use crate::cluster_config::ClusterSection;

/// Which pools cluster members may announce services into, and from which address ranges
/// (`[[cluster.allow]]`). Empty: every announcement is accepted (the default).
///
/// The gossip layer already makes sure a member announces only for itself (its record comes
/// from it); this says what a member may announce at all, as this proxy's operator sees it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct AllowList {
    rules: Vec<(String, Vec<ipnet::IpNet>)>,
}

impl AllowList {
    /// Rules of (pool or "*", address ranges; empty = any address).
    pub fn new(rules: Vec<(String, Vec<ipnet::IpNet>)>) -> AllowList {
        AllowList { rules }
    }

    /// Whether a member may announce a service at `addr` into `pool`. An IPv4-mapped IPv6
    /// address (`[::ffff:10.1.2.3]`) is judged as the IPv4 address it is.
    pub fn allows(&self, pool: &str, addr: std::net::SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        self.rules.is_empty()
            || self.rules.iter().any(|(p, nets)| {
                (p == "*" || p == pool) && (nets.is_empty() || nets.iter().any(|n| n.contains(&ip)))
            })
    }
}

/// A refused announcement: member name, pool, service address.
pub type Refusal = (String, String, std::net::SocketAddr);

/// The refused announcements of the last sync, so that each is logged and counted once when it
/// starts, not at every sync while it lasts. It holds the current ones only: no more than the
/// services members announce, which the metadata this node holds already bounds (a fixed cap
/// would have to forget some, and log them all again each time it did).
#[derive(Debug, Default)]
pub struct RefusalLog {
    seen: std::collections::HashSet<Refusal>,
}

impl RefusalLog {
    /// Takes the refusals of a sync; returns those the previous sync did not have.
    pub fn update(&mut self, now: impl IntoIterator<Item = Refusal>) -> Vec<Refusal> {
        let now: std::collections::HashSet<Refusal> = now.into_iter().collect();
        let new = now.difference(&self.seen).cloned().collect();
        self.seen = now;
        new
    }
}

/// How a proxy turns the membership view into pool contents (`[cluster]` hold, mass-failure
/// and allow-list settings).
#[derive(Debug, Clone, PartialEq)]
pub struct RoutingSettings {
    /// When a suspect member's services are held.
    pub hold: HoldPolicy,
    /// Keep the last-known-good pools when more than this share of the members fail...
    pub mass_failure_share: f64,
    /// ...within this window.
    pub mass_failure_window: Duration,
    /// What members may announce.
    pub allow: AllowList,
}

impl Default for RoutingSettings {
    fn default() -> Self {
        RoutingSettings {
            hold: HoldPolicy::default(),
            mass_failure_share: 0.5,
            mass_failure_window: Duration::from_secs(30),
            allow: AllowList::default(),
        }
    }
}

/// What the membership watcher last decided, for `GET /api/cluster`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RoutingStatus {
    /// Why the pools keep their last-known-good contents, when they do.
    pub last_known_good: Option<String>,
    /// Members whose services are held because they are suspect.
    pub held_suspects: usize,
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

/// The gossip-announced backends of `pool` in `members` at `now_ms`, with their hold state
/// (true = in the pool but no new requests: draining, or suspect as `policy` decides).
/// Announcements `allow` refuses are left out and added to `refused`.
pub fn gossip_backends(
    members: &[crate::cluster::MemberInfo],
    pool: &str,
    policy: &HoldPolicy,
    allow: &AllowList,
    now_ms: u64,
    refused: &mut Vec<Refusal>,
) -> Vec<(BackendSpec, bool)> {
    let mut out: Vec<(BackendSpec, bool)> = Vec::new();
    for m in members.iter().filter(|m| m.meta.role == Role::Backend) {
        if matches!(m.state, MemberState::Down | MemberState::Left) {
            continue;
        }
        let hold = policy.holds(m, now_ms) || m.meta.draining;
        for s in m.meta.services.iter().filter(|s| s.pool == pool) {
            if !allow.allows(pool, s.addr) {
                refused.push((m.meta.name.clone(), pool.to_string(), s.addr));
                continue;
            }
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

/// Applies the cluster's current members to every pool, unless `guard` decides to keep the
/// last-known-good pools; publishes the status and the tuning metrics. Returns when a suspect
/// member will become held if nothing changes (clock of [`crate::clock::now_ms`]).
pub fn sync_pools(
    runtime: &Runtime,
    handle: &ClusterHandle,
    settings: &RoutingSettings,
    guard: &mut LastKnownGood,
    refusals: &mut RefusalLog,
) -> Option<u64> {
    let members = handle.members_snapshot();
    let now = crate::clock::now_ms();
    publish_tuning(runtime, handle);
    publish_transport(runtime, handle);
    let before = guard.frozen();
    let frozen = guard.update(&members, now);
    match (before, frozen) {
        (None, Some(why)) => {
            tracing::warn!(reason = %why, "keeping the last-known-good pools instead of following the cluster view")
        }
        (Some(_), None) => tracing::info!("the cluster view is healthy again; pools follow it"),
        _ => {}
    }
    let held_suspects = members
        .iter()
        .filter(|m| settings.hold.holds(m, now))
        .count();
    let status = RoutingStatus {
        last_known_good: frozen.map(|f: Freeze| f.to_string()),
        held_suspects,
    };
    if **runtime.cluster_status.load() != status {
        runtime.cluster_status.store(Arc::new(status));
    }
    runtime
        .metrics
        .cluster_last_known_good
        .with_label_values::<&str>(&[])
        .set(i64::from(frozen.is_some()));
    if frozen.is_some() {
        return None;
    }
    let mut refused = Vec::new();
    for pool in runtime.pools() {
        let backends = gossip_backends(
            &members,
            &pool.name,
            &settings.hold,
            &settings.allow,
            now,
            &mut refused,
        );
        pool.set_gossip_backends(&backends);
    }
    for r in refusals.update(refused) {
        if let Some(pool) = runtime.pool(&r.1) {
            pool.counters.cluster_refused.inc();
        }
        tracing::warn!(member = %r.0, pool = %r.1, addr = %r.2, "refused a cluster member's service: [[cluster.allow]] does not allow this pool or address; add a rule if it should be routed");
    }
    members
        .iter()
        .filter_map(|m| settings.hold.held_at(m, now))
        .min()
}

fn publish_tuning(runtime: &Runtime, handle: &ClusterHandle) {
    let t = handle.tuning();
    let g = &runtime.metrics.cluster_tuning;
    let ms = |d: Duration| d.as_millis() as i64;
    g.with_label_values(&["members"]).set(i64::from(t.members));
    g.with_label_values(&["probe_interval_ms"])
        .set(ms(t.probe_interval));
    g.with_label_values(&["suspicion_timeout_ms"])
        .set(ms(t.suspicion_timeout));
    g.with_label_values(&["suspicion_max_timeout_ms"])
        .set(ms(t.suspicion_max_timeout));
    g.with_label_values(&["retransmissions"])
        .set(i64::from(t.retransmissions));
    g.with_label_values(&["push_pull_interval_ms"])
        .set(ms(t.push_pull_interval));
    g.with_label_values(&["local_health"])
        .set(i64::from(t.local_health));
}

// Brings a counter up to the member's `total`: the metric is only ever increased, by what the
// member counted since the last publication.
fn catch_up(c: prometheus::IntCounter, total: u64) {
    let delta = total.saturating_sub(c.get());
    if delta > 0 {
        c.inc_by(delta);
    }
}

// Publishes the member's counters (the gossip runtime counts; the metrics follow its totals).
fn publish_transport(runtime: &Runtime, handle: &ClusterHandle) {
    let st = handle.stats();
    let m = &runtime.metrics;
    catch_up(
        m.cluster_duplicate_names.with_label_values::<&str>(&[]),
        st.duplicate_names,
    );
    catch_up(
        m.cluster_key_file_errors.with_label_values::<&str>(&[]),
        st.key_file_errors,
    );
    for (event, total) in st.events() {
        catch_up(m.cluster_transport.with_label_values(&[event]), total);
    }
    catch_up(
        m.cluster_transport_bytes.with_label_values(&["sent"]),
        st.bytes_sent,
    );
    catch_up(
        m.cluster_transport_bytes.with_label_values(&["received"]),
        st.bytes_received,
    );
    m.cluster_tcp_buffer
        .with_label_values::<&str>(&[])
        .set(st.tcp_buffer_bytes as i64);
}

/// Keeps pools in step with the cluster until the process ends, with the routing settings of
/// [`Runtime::cluster_routing`] (a reload may change them).
pub async fn watch(runtime: Arc<Runtime>, handle: ClusterHandle) {
    let mut changes = handle.changes();
    let mut settings = RoutingSettings::clone(&runtime.cluster_routing.load());
    let mut guard = LastKnownGood::new(settings.mass_failure_share, settings.mass_failure_window);
    let mut refusals = RefusalLog::default();
    loop {
        let now = RoutingSettings::clone(&runtime.cluster_routing.load());
        if now != settings {
            if (now.mass_failure_share, now.mass_failure_window)
                != (settings.mass_failure_share, settings.mass_failure_window)
            {
                guard = LastKnownGood::new(now.mass_failure_share, now.mass_failure_window);
            }
            settings = now;
        }
        let next_hold = sync_pools(&runtime, &handle, &settings, &mut guard, &mut refusals);
        // Re-sync on every change, when a suspect's hold delay runs out, and at least every
        // second: a reload may have added pools that members announce for.
        let wait = next_hold.map_or(Duration::from_secs(1), |at| {
            Duration::from_millis(at.saturating_sub(crate::clock::now_ms()))
                .clamp(Duration::from_millis(10), Duration::from_secs(1))
        });
        if let Ok(Err(_)) = tokio::time::timeout(wait, changes.changed()).await {
            // The cluster member has stopped (shutdown): nothing will change any more, and
            // `changed()` would now return at once, turning this loop into a busy one.
            return;
        }
    }
}

/// The cluster as the admin API shows it (`GET /api/cluster`).
pub fn cluster_json(runtime: &Runtime, handle: &ClusterHandle) -> serde_json::Value {
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
                "suspectors": m.suspectors,
                "self": m.is_self,
                "admin": m.meta.admin,
                "keys": crate::cluster::rotation::KeyringState::of(&m.meta)
                    .map(|k| k.keys.iter().map(crate::cluster::rotation::fingerprint_hex).collect::<Vec<_>>()),
                "rotation": crate::cluster::rotation::KeyringState::of(&m.meta)
                    .and_then(|k| k.rotation)
                    .map(|r| serde_json::json!({ "id": r.id, "phase": r.phase.as_str() })),
                "rollout": (m.meta.role == Role::Proxy).then(|| crate::rollout::Published::of(&m.meta)),
            })
        })
        .collect();
    let st = handle.stats();
    let t = handle.tuning();
    let status = runtime.cluster_status.load();
    serde_json::json!({
        "members": members,
        "tuning": {
            "members": t.members,
            "probe_interval_ms": t.probe_interval.as_millis() as u64,
            "suspicion_timeout_ms": t.suspicion_timeout.as_millis() as u64,
            "suspicion_max_timeout_ms": t.suspicion_max_timeout.as_millis() as u64,
            "confirmations": t.confirmations,
            "retransmissions": t.retransmissions,
            "push_pull_interval_ms": t.push_pull_interval.as_millis() as u64,
            "local_health": t.local_health,
        },
        "routing": {
            "last_known_good": status.last_known_good.is_some(),
            "reason": status.last_known_good,
            "held_suspects": status.held_suspects,
        },
        // Every counter of sluice_gossip::Stats, by its field name.
        "transport": st,
        "keys": handle.keys().len(),
        "keyring": {
            "fingerprints": handle.keys().iter().filter_map(|k| crate::cluster::rotation::fingerprint(k).ok()).map(|f| crate::cluster::rotation::fingerprint_hex(&f)).collect::<Vec<_>>(),
            "persisted": handle.keys_persisted(),
            "key_file_errors": st.key_file_errors,
        },
        "duplicate_names": st.duplicate_names,
    })
}

/// Makes this member's keyring equal to `keys` (the first one encrypting) without a restart:
/// new keys are installed first, the primary switched, old keys removed last. Every key must
/// already have been validated (a `[cluster]` section that `to_config` accepted).
pub fn apply_keys(handle: &ClusterHandle, keys: &[String]) -> Result<(), String> {
    let have = handle.keys();
    if have == keys {
        return Ok(());
    }
    check_key_change(handle, keys)?;
    for k in keys.iter().filter(|k| !have.contains(k)) {
        handle.keyring_install(k).map_err(|e| e.to_string())?;
    }
    if let Some(first) = keys.first() {
        handle.keyring_use(first).map_err(|e| e.to_string())?;
    }
    for k in have.iter().filter(|k| !keys.contains(k)) {
        handle.keyring_remove(k).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// Refuses a reload that changes the keys while a key rotation runs on this node (the reload
/// and the rotation would undo each other's steps). Keys equal to the keyring in memory — a key
/// file the rotation itself rewrote — are no change and pass.
pub fn check_key_change(handle: &ClusterHandle, keys: &[String]) -> Result<(), String> {
    if handle.keys() != keys && handle.rotation_running() {
        return Err("[cluster] keys: a key rotation is running on this node, so the keys cannot change by a reload now; wait for it to end (the key file then holds the new keys), or undo the key change, then reload again".into());
    }
    Ok(())
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

    #[tokio::test]
    async fn transport_counters_are_exported_once_as_metrics_and_json() {
        let text = "[server]\nlisten = [\"127.0.0.1:1\"]\n[[pool]]\nname = \"web\"\nbackends = [\"127.0.0.1:9001\"]\n[[route]]\npool = \"web\"\n";
        let cfg = crate::config::Config::parse(text, "t.toml", std::path::Path::new(".")).unwrap();
        let rt = Runtime::new(
            cfg,
            None,
            crate::plugin::PluginEngine::new().unwrap(),
            crate::metrics::Metrics::new(),
        )
        .unwrap();
        let mut c = crate::cluster::ClusterConfig::new(
            "m",
            "127.0.0.1:0".parse().unwrap(),
            crate::cluster::generate_key(),
        );
        c.profile = crate::cluster::Profile::Local;
        let h = crate::cluster::Cluster::start(c, NodeMeta::new("p", Role::Proxy))
            .await
            .unwrap();
        let udp = tokio::net::UdpSocket::bind("127.0.0.1:0").await.unwrap();
        udp.send_to(&[0u8; 10_000], h.gossip_addr()).await.unwrap();
        for _ in 0..500 {
            if h.stats().udp_oversized == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(h.stats().udp_oversized, 1);
        // Published twice: counted once.
        publish_transport(&rt, &h);
        publish_transport(&rt, &h);
        let metrics = String::from_utf8(rt.metrics.render()).unwrap();
        for line in [
            "sluice_cluster_transport_total{event=\"udp_oversized\"} 1",
            "sluice_cluster_transport_total{event=\"rejected_replay\"} 0",
            // (a datagram is counted up to one byte over the largest payload size: what recv saw)
            "sluice_cluster_transport_bytes_total{direction=\"received\"} 9001",
            "sluice_cluster_tcp_buffer_bytes 0",
        ] {
            assert!(metrics.contains(line), "{line} in\n{metrics}");
        }
        let json = cluster_json(&rt, &h);
        assert_eq!(json["transport"]["udp_oversized"], 1);
        assert_eq!(json["transport"]["probe_fallbacks"], 0);
    }

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
            suspectors: 0,
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
        let policy = HoldPolicy::default();
        let all = AllowList::default();
        let at = |now: u64| -> Vec<(u16, bool, String)> {
            gossip_backends(&members, "web", &policy, &all, now, &mut Vec::new())
                .iter()
                .map(|(b, hold)| (b.addr.port(), *hold, b.zone.clone()))
                .collect()
        };
        // Down and left members are gone; suspect and draining ones stay. A draining one is
        // held at once; a suspect one with a single suspector only after the hold delay.
        let row = |p: u16, h: bool, z: &str| (p, h, z.to_string());
        assert_eq!(
            at(1000),
            vec![row(1, false, "eu"), row(3, false, "eu"), row(4, true, "us")]
        );
        assert_eq!(
            at(3000),
            vec![row(1, false, "eu"), row(3, true, "eu"), row(4, true, "us")]
        );
        // A second independent suspector holds it at once.
        let mut corroborated = members.clone();
        corroborated[1].suspectors = 2;
        let web = |m: &[MemberInfo], pool: &str| {
            gossip_backends(m, pool, &policy, &all, 0, &mut Vec::new())
        };
        assert!(web(&corroborated, "web")[1].1);
        assert_eq!(web(&members, "api").len(), 1);
        assert!(web(&members, "none").is_empty());

        // An allow-list keeps out what it does not name, and reports it.
        let only_port_1 =
            AllowList::new(vec![("web".into(), vec!["127.0.0.1/32".parse().unwrap()])]);
        let mut refused = Vec::new();
        let kept = gossip_backends(&members, "web", &policy, &only_port_1, 0, &mut refused);
        assert_eq!(kept.len(), 3, "all on 127.0.0.1");
        let mapped: std::net::SocketAddr = "[::ffff:127.0.0.1]:80".parse().unwrap();
        assert!(
            only_port_1.allows("web", mapped),
            "an IPv4-mapped address is its IPv4 one"
        );
        let v6_any = AllowList::new(vec![("web".into(), vec!["::/0".parse().unwrap()])]);
        assert!(
            !v6_any.allows("web", mapped),
            "::/0 does not admit IPv4 through mapping"
        );
        let api_only = AllowList::new(vec![("api".into(), vec![])]);
        let kept = gossip_backends(&members, "web", &policy, &api_only, 0, &mut refused);
        assert!(kept.is_empty());
        assert_eq!(
            refused,
            [
                (
                    "alive".to_string(),
                    "web".to_string(),
                    members[0].meta.services[0].addr
                ),
                (
                    "suspect".into(),
                    "web".into(),
                    members[1].meta.services[0].addr
                ),
                (
                    "draining".into(),
                    "web".into(),
                    members[2].meta.services[0].addr
                ),
            ]
        );
        let mut log = RefusalLog::default();
        let mut all = log.update(refused.clone());
        all.sort();
        let mut want = refused.clone();
        want.sort();
        assert_eq!(all, want);
        assert!(
            log.update(refused.clone()).is_empty(),
            "logged and counted once while it lasts"
        );
        // The first stops, then comes back: new again; the others never stopped.
        assert!(log.update(refused[1..].to_vec()).is_empty());
        assert_eq!(
            log.update(refused.clone()),
            refused[..1],
            "it started again"
        );
    }
}
