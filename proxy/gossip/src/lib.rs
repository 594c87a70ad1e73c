//! sluice-gossip: cluster membership — which proxies and backends exist, what they offer and
//! whether they are alive.
//!
//! Layers, bottom up:
//! - [`keyring`]: AES-256-GCM keys; every packet and frame is sealed, the cluster name is the
//!   associated data, and anything that does not authenticate is dropped unparsed.
//! - [`wire`]: the envelope — key id, plaintext header with the sender's [`wire::Stamp`],
//!   optional deflate, TCP framing read as bytes arrive.
//! - [`replay`]: the window that accepts each authenticated stamp once.
//! - [`node`]: a sans-IO state machine around [foca](https://docs.rs/foca) (SWIM with indirect
//!   probes and suspicion) plus metadata dissemination and push-pull anti-entropy. It takes
//!   packets, timer events and "now", and returns packets to send and timers to set, so the same
//!   code runs on real sockets and in the virtual-time simulator.
//! - [`runtime`]: the tokio driver ([`Cluster::start`] → [`ClusterHandle`]) with the UDP and
//!   TCP transports and their limits ([`TransportConfig`]), seed retries and the membership
//!   snapshot the proxy reads.
//! - [`blobs`]: content addressed by the caller's digest, kept by a member and fetched by
//!   others over the same authenticated TCP transport (the proxy's plugin rollout).
//! - [`persist`]: the identity generation and the keyring kept on disk across restarts.
//! - [`rotation`]: cluster-wide key rotation carried by gossip ([`ClusterHandle::rotate_key`]).
//! - [`names`]: duplicate node names found while running; the newcomer gives its name up.
//! - [`routing`]: what a proxy does with what it sees — when a suspect member's services are
//!   held, and when to keep the last-known-good pools instead of following the view.
//! - [`sim`]: many nodes in one process on virtual time over a seeded network (bursty and
//!   asymmetric loss, slow nodes, partitions, churn), for tests and the `gossip_sim` benchmark.
//!
//! # Self-tuning and Lifeguard
//! Timings follow the live member count, not a configured size: [`ClusterConfig::expected_size`]
//! is only the starting point until the node has joined. Failure detection follows Lifeguard
//! (as memberlist implements it): a node that sees itself late — its own probes failing, its
//! timers firing late, its inbound queue overflowing — raises a local-health score that
//! stretches its probe interval and timeout, so a busy node stops accusing healthy ones; and a
//! suspicion starts long and shrinks as other members independently confirm it (each node whose
//! own probe fails broadcasts a vote). [`Tuning`] shows the current values.
//!
//! # Why metadata travels beside the identity, and comes from its owner
//! foca puts the sender's and the receiver's identity in the header of *every* packet. A
//! backend with a few services has ~300 bytes of metadata, so carrying it in the identity would
//! multiply the probe traffic several times over and an identity change (e.g. `draining =
//! true`) would make foca declare the old identity down, which the proxy would see as a death.
//! So the identity is lean — gossip address + generation ([`node::NodeId`]) — and metadata is a
//! record keyed by gossip address and ordered by (generation, version). A change is announced
//! by a small foca custom broadcast (a hint: address, generation, version), and each node
//! fetches the record itself from its owner over the authenticated TCP transport; the periodic
//! push-pull exchanges digests of the records and repairs anything a broadcast missed. A record
//! is accepted only from its owner, so a member can announce services only for itself (see
//! [`node`], "Ownership"). Message bodies are versioned and extensible ([`message`]), so nodes
//! one version apart run in one cluster during an upgrade.

pub mod blobs;
pub mod clock;
pub mod keyring;
mod limits;
pub mod message;
pub mod names;
pub mod node;
pub mod persist;
pub mod replay;
pub mod rotation;
pub mod routing;
pub mod runtime;
pub mod sim;
#[doc(hidden)]
pub mod testing;
pub mod wire;

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use keyring::{generate_key, KeyError, Keyring};
pub use routing::{HoldPolicy, LastKnownGood, ViewHealth};
pub use runtime::{Cluster, ClusterHandle, Stats};

/// What a member is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    /// A sluice proxy: consumes services.
    Proxy,
    /// A backend host running `sluice agent`: offers services.
    Backend,
}

/// A service a member offers to one pool.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Service {
    /// Name of the pool that should route to it.
    pub pool: String,
    /// Address proxies connect to.
    pub addr: SocketAddr,
    /// Relative weight for weighted strategies.
    pub weight: u32,
    /// Zone of this service when it differs from the node's.
    #[serde(default)]
    pub zone: Option<String>,
    /// Tags of this service when they differ from the node's.
    #[serde(default)]
    pub tags: Option<Vec<String>>,
}

/// A member's self-description, spread to the whole cluster and updated with
/// [`ClusterHandle::set_meta`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeMeta {
    /// Unique name in the cluster; a node whose name is alive elsewhere refuses to start, and
    /// a clash found while running makes the newcomer leave (see [`names`]).
    pub name: String,
    /// Proxy or backend.
    pub role: Role,
    /// Zone, for zone-aware strategies ("" when unset).
    pub zone: String,
    /// Free-form tags passed to strategies.
    pub tags: Vec<String>,
    /// Services offered (backends) — empty for proxies.
    pub services: Vec<Service>,
    /// The member asks for no new requests (e.g. before maintenance) but is still alive.
    pub draining: bool,
    /// A proxy's admin API address (shown by `sluice cluster info` and `GET /api/cluster`).
    pub admin: Option<String>,
    /// State of higher-level features that rides along with the metadata, by feature name
    /// (the proxy's plugin rollout keeps its announcements and results under `"rollout"`).
    /// Opaque to gossip; it counts towards the metadata size like everything else.
    pub extensions: std::collections::BTreeMap<String, Vec<u8>>,
}

impl NodeMeta {
    /// Metadata with only a name and a role.
    pub fn new(name: impl Into<String>, role: Role) -> Self {
        NodeMeta {
            name: name.into(),
            role,
            zone: String::new(),
            tags: Vec::new(),
            services: Vec::new(),
            draining: false,
            admin: None,
            extensions: std::collections::BTreeMap::new(),
        }
    }
}

/// How a member is seen from this node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum MemberState {
    /// Answering probes.
    Alive,
    /// Failed a probe and has not refuted it yet: still a member, but proxies should send it
    /// no new requests until it is Alive again.
    Suspect,
    /// Declared dead by the cluster.
    Down,
    /// Left gracefully (announced its departure).
    Left,
}

impl MemberState {
    /// Alive or Suspect: foca still counts it as a member.
    pub fn is_active(self) -> bool {
        matches!(self, MemberState::Alive | MemberState::Suspect)
    }
}

/// One member as seen from this node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberInfo {
    /// The member's latest known metadata.
    pub meta: NodeMeta,
    /// Its gossip address (UDP and TCP).
    pub gossip_addr: SocketAddr,
    /// Alive, Suspect, Down or Left.
    pub state: MemberState,
    /// foca's incarnation number: bumped by the member each time it refutes a suspicion.
    pub incarnation: u64,
    /// Identity generation: higher after a restart or an automatic rejoin.
    pub generation: u64,
    /// Version of its metadata; bumped by every `set_meta`.
    pub meta_version: u64,
    /// When this node last saw the state, incarnation or metadata change, in milliseconds on
    /// the node's clock ([`crate::clock::now_ms`] for the real runtime, virtual ms in the simulator).
    pub last_change_ms: u64,
    /// This entry is the local node.
    pub is_self: bool,
    /// For a Suspect member: how many members independently failed to reach it, as far as this
    /// node has heard (at least 1); 0 otherwise. See [`HoldPolicy`].
    #[serde(default)]
    pub suspectors: u32,
}

/// The timings a node uses now, derived from the live member count and its local health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Tuning {
    /// Cluster size the timings are computed for: active members, this node included, once
    /// joined; `expected_size` before that.
    pub members: u32,
    /// Probe interval including the local-health multiplier.
    pub probe_interval: Duration,
    /// How long a suspicion lasts once enough members confirmed it.
    pub suspicion_timeout: Duration,
    /// How long an unconfirmed suspicion lasts (Lifeguard starts here and shrinks).
    pub suspicion_max_timeout: Duration,
    /// Independent confirmations that bring a suspicion down to `suspicion_timeout`.
    pub confirmations: u32,
    /// How many times each update is gossiped.
    pub retransmissions: u8,
    /// Interval of the full state exchange with a random member.
    pub push_pull_interval: Duration,
    /// Local-health score, 0 (healthy) to [`node::MAX_LOCAL_HEALTH`]: probes wait (1 + score)
    /// times longer.
    pub local_health: u32,
}

/// Timing profile: foca's settings plus how often to push-pull. Written `"lan"`, `"wan"` or
/// `"local"` in config files.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// foca's `Config::new_lan`: 1 s probe period, push-pull every 30 s (scaled up for large
    /// clusters).
    Lan,
    /// foca's `Config::new_wan`: 5 s probe period, push-pull every 60 s (scaled).
    Wan,
    /// Fast timings for tests on one machine: 200 ms probes, ~1 s suspicion (times log10 of
    /// the size above 10 members), 2 s push-pull.
    Local,
}

/// `expected_size` when none is configured.
pub const DEFAULT_EXPECTED_SIZE: u32 = 32;

/// `forget_after` when none is configured: an hour (foca's own default is a day). Long enough
/// for `sluice cluster info` to show what went down and for any restart at the same address;
/// short enough that a cluster with churn holds records of the last hour's members only.
pub const DEFAULT_FORGET_AFTER: Duration = Duration::from_secs(3600);

/// Everything [`Cluster::start`] needs besides the node's metadata.
#[derive(Debug, Clone)]
pub struct ClusterConfig {
    /// Cluster name: authenticated as associated data, so clusters sharing a key stay apart.
    pub cluster_name: String,
    /// Address to bind UDP and TCP on (same port for both). Port 0 picks a free port.
    pub bind_addr: SocketAddr,
    /// Address other members reach us at; defaults to the bound address, and is required when
    /// binding an unspecified IP such as 0.0.0.0.
    pub advertise_addr: Option<SocketAddr>,
    /// Base64 AES-256 keys (`sluice genkey`); the first encrypts, all decrypt.
    pub keys: Vec<String>,
    /// Seeds as `host:port`; empty for the first node. Resolved on every retry.
    pub peers: Vec<String>,
    /// Timing profile.
    pub profile: Profile,
    /// Deflate large messages (push-pull, big metadata) before encrypting.
    pub compression: bool,
    /// Expected cluster size: the starting point for retransmissions, suspicion timeout and
    /// push-pull interval until the node has joined; after that they follow the live member
    /// count.
    pub expected_size: u32,
    /// How long a member that is down (or left) is remembered: then foca forgets it and every
    /// node drops its metadata record, so the state each node holds is bounded by the members
    /// alive or gone within this time.
    pub forget_after: Duration,
    /// Where the keyring is written back after every change (a rotation, a key operation),
    /// atomically and with mode 0600; `None` keeps changes in memory only.
    pub key_file: Option<std::path::PathBuf>,
    /// Where the identity generation is kept across restarts ([`persist`]); `None` takes the
    /// wall clock alone.
    pub state_file: Option<std::path::PathBuf>,
    /// Whether `state_file` is only a default the operator did not ask for: then a state file
    /// that cannot be read or written is logged and the wall clock used instead of failing the
    /// start. A corrupt state file is never fatal.
    pub state_file_optional: bool,
    /// Datagram size and connection limits.
    pub transport: TransportConfig,
}

/// Sizes and limits of the transports. What an unauthenticated sender can make a node spend is
/// bounded by these (see `docs/security.md`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TransportConfig {
    /// Largest datagram sent: the path MTU minus the IP and UDP headers (28 bytes over IPv4,
    /// 48 over IPv6). [`wire::MIN_UDP_PAYLOAD`]..=[`wire::MAX_UDP_PAYLOAD`], default
    /// [`wire::DEFAULT_UDP_PAYLOAD`]. foca's packets are sized to fit it once sealed.
    /// Datagrams are received up to [`wire::MAX_UDP_PAYLOAD`] whatever this says (longer ones
    /// are dropped before any decryption), so the setting can be changed one member at a time.
    pub udp_payload_size: usize,
    /// Inbound TCP connections served at once; more are closed on accept and counted.
    pub tcp_max_connections: usize,
    /// Inbound TCP connections served at once from one source address: an IPv4 address, or an
    /// IPv6 /64 (an IPv4-mapped IPv6 address counts as its IPv4 address).
    pub tcp_max_connections_per_addr: usize,
    /// Outbound stream exchanges (push-pulls, blob fetches, large packets, fallback probes) in
    /// flight at once; more are skipped and counted (gossip retries on its own).
    pub max_outbound_streams: usize,
}

/// [`TransportConfig::tcp_max_connections`] by default.
pub const DEFAULT_TCP_MAX_CONNECTIONS: usize = 128;
/// [`TransportConfig::tcp_max_connections_per_addr`] by default.
pub const DEFAULT_TCP_MAX_CONNECTIONS_PER_ADDR: usize = 16;
/// [`TransportConfig::max_outbound_streams`] by default.
pub const DEFAULT_MAX_OUTBOUND_STREAMS: usize = 32;

impl Default for TransportConfig {
    fn default() -> Self {
        TransportConfig {
            udp_payload_size: wire::DEFAULT_UDP_PAYLOAD,
            tcp_max_connections: DEFAULT_TCP_MAX_CONNECTIONS,
            tcp_max_connections_per_addr: DEFAULT_TCP_MAX_CONNECTIONS_PER_ADDR,
            max_outbound_streams: DEFAULT_MAX_OUTBOUND_STREAMS,
        }
    }
}

impl TransportConfig {
    /// Checks the ranges; the error names the setting and what to write instead.
    pub fn validate(&self) -> Result<(), String> {
        let (min, max) = (wire::MIN_UDP_PAYLOAD, wire::MAX_UDP_PAYLOAD);
        if !(min..=max).contains(&self.udp_payload_size) {
            return Err(format!(
                "udp_payload_size = {} is out of range; use {min} to {max} bytes (default {}; the path MTU minus 28 bytes of IPv4/UDP headers or 48 of IPv6/UDP, e.g. 1392 under WireGuard over IPv4)",
                self.udp_payload_size,
                wire::DEFAULT_UDP_PAYLOAD
            ));
        }
        for (name, v, default) in [
            (
                "tcp_max_connections",
                self.tcp_max_connections,
                DEFAULT_TCP_MAX_CONNECTIONS,
            ),
            (
                "tcp_max_connections_per_addr",
                self.tcp_max_connections_per_addr,
                DEFAULT_TCP_MAX_CONNECTIONS_PER_ADDR,
            ),
            (
                "max_outbound_streams",
                self.max_outbound_streams,
                DEFAULT_MAX_OUTBOUND_STREAMS,
            ),
        ] {
            if !(1..=65_536).contains(&v) {
                return Err(format!(
                    "{name} = {v} is out of range; use 1 to 65536 (default {default})"
                ));
            }
        }
        Ok(())
    }
}

/// foca's largest packet for datagrams of `udp_payload_size` bytes: what is left once the
/// plaintext header and the seal are added, so every SWIM packet fits one datagram.
pub fn foca_packet_size(udp_payload_size: usize) -> std::num::NonZeroUsize {
    std::num::NonZeroUsize::new(
        udp_payload_size
            .max(wire::MIN_UDP_PAYLOAD)
            .saturating_sub(wire::HEADER_LEN + keyring::SEAL_OVERHEAD),
    )
    .expect("MIN_UDP_PAYLOAD is larger than the overhead")
}

impl ClusterConfig {
    /// A LAN config with one key, no seeds, no compression and an expected size of 32.
    pub fn new(
        cluster_name: impl Into<String>,
        bind_addr: SocketAddr,
        key: impl Into<String>,
    ) -> Self {
        ClusterConfig {
            cluster_name: cluster_name.into(),
            bind_addr,
            advertise_addr: None,
            keys: vec![key.into()],
            peers: Vec::new(),
            profile: Profile::Lan,
            compression: false,
            expected_size: DEFAULT_EXPECTED_SIZE,
            forget_after: DEFAULT_FORGET_AFTER,
            transport: TransportConfig::default(),
            key_file: None,
            state_file: None,
            state_file_optional: false,
        }
    }
}

/// Why the cluster could not start or an operation failed.
#[derive(Debug, thiserror::Error)]
pub enum ClusterError {
    /// A key or keyring operation was refused.
    #[error(transparent)]
    Key(#[from] KeyError),
    /// A socket could not be bound or used.
    #[error("cluster transport on {addr}: {source}; is another process using this address? set [cluster] bind_addr to a free IP:port")]
    Io {
        /// The address involved.
        addr: SocketAddr,
        /// The OS error.
        source: std::io::Error,
    },
    /// The configuration is inconsistent.
    #[error("cluster config: {0}")]
    Config(String),
    /// Another live member already uses this node's name.
    #[error("the name {name:?} of this node ({this}) is already used by the live member at {other}; give this node a unique [cluster] node_name (or stop the other member first)")]
    NameConflict {
        /// The contested name.
        name: String,
        /// This node's gossip address.
        this: SocketAddr,
        /// Gossip address of the member that has it.
        other: SocketAddr,
    },
    /// A cluster-wide key rotation did not complete.
    #[error("key rotation: {0}")]
    Rotation(String),
    /// Refused because a key rotation is running on this node (another rotation, or a key
    /// change by hand that would race it).
    #[error("a key rotation is running: {0}")]
    Busy(String),
    /// A state or key file could not be read or written.
    #[error(transparent)]
    Persist(#[from] persist::PersistError),
    /// The cluster task has stopped (after `leave`, or it panicked).
    #[error("the cluster task has stopped")]
    Stopped,
}

/// foca settings and the push-pull interval of a profile for a cluster of about `size` members.
pub fn profile_settings(profile: Profile, size: u32) -> (foca::Config, Duration) {
    let n = std::num::NonZeroU32::new(size.max(1)).expect("max(1) is non-zero");
    let (mut cfg, push_pull) = match profile {
        Profile::Lan => (foca::Config::new_lan(n), Duration::from_secs(30)),
        Profile::Wan => (foca::Config::new_wan(n), Duration::from_secs(60)),
        Profile::Local => {
            let mut c = foca::Config::new_lan(n);
            c.probe_period = Duration::from_millis(200);
            c.probe_rtt = Duration::from_millis(60);
            c.suspect_to_down_after = Duration::from_millis(1000).mul_f64(suspicion_scale(size));
            c.periodic_gossip = Some(foca::PeriodicParams {
                frequency: Duration::from_millis(50),
                num_members: std::num::NonZeroUsize::new(3).expect("3 is non-zero"),
            });
            c.periodic_announce = Some(foca::PeriodicParams {
                frequency: Duration::from_secs(2),
                num_members: std::num::NonZeroUsize::new(1).expect("1 is non-zero"),
            });
            c.periodic_announce_to_down_members = Some(foca::PeriodicParams {
                frequency: Duration::from_secs(3),
                num_members: std::num::NonZeroUsize::new(2).expect("2 is non-zero"),
            });
            (c, Duration::from_secs(2))
        }
    };
    cfg.max_transmissions = retransmissions(size);
    // foca's packets are sealed afterwards: leave room for the header and the seal so that
    // every SWIM packet still fits one datagram (of the default size; the runtime applies
    // the configured one).
    cfg.max_packet_size = foca_packet_size(wire::DEFAULT_UDP_PAYLOAD);
    (cfg, push_pull * push_pull_scale(size))
}

/// How many times each update is gossiped in a cluster of `size`.
///
/// foca sends each update log10(n+1)*4 times (memberlist's default), which leaves each node a
/// ~e^-(that) chance of missing a given update: in simulation a few nodes per hundred-node crash
/// only learned of it from their own probe, tens of seconds later. Half as many transmissions
/// again cost little (updates are rare) and make such misses negligible.
pub fn retransmissions(size: u32) -> std::num::NonZeroU8 {
    let foca = (f64::from(size.saturating_add(1)).log10() * 4.0).clamp(1.0, 170.0) as u8;
    std::num::NonZeroU8::new(foca.max(1).saturating_mul(3) / 2).unwrap_or(std::num::NonZeroU8::MIN)
}

/// The push-pull interval of a cluster of `size` as a multiple of the profile's base interval.
///
/// A full state exchange costs O(members) bytes, so like memberlist we exchange less often as
/// the cluster grows beyond 32 members, which keeps the per-node bandwidth roughly flat.
pub fn push_pull_scale(size: u32) -> u32 {
    if size > 32 {
        (f64::from(size).log2() - 5.0).ceil() as u32 + 1
    } else {
        1
    }
}

/// The suspicion timeout of a cluster of `size` as a multiple of its value for one member:
/// max(1, log10(size)), as in foca and memberlist.
pub fn suspicion_scale(size: u32) -> f64 {
    f64::from(size.max(1)).log10().max(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sealed_foca_packet_fills_the_datagram_size_exactly() {
        for size in [
            wire::MIN_UDP_PAYLOAD,
            1392,
            wire::DEFAULT_UDP_PAYLOAD,
            wire::MAX_UDP_PAYLOAD,
        ] {
            let foca = foca_packet_size(size).get();
            assert_eq!(foca + wire::HEADER_LEN + keyring::SEAL_OVERHEAD, size);
            // Room for several metadata hints and votes (each under 64 bytes) next to foca's
            // header and a few member updates.
            assert!(foca >= 4 * 64 + 300, "{size}: {foca}");
        }
        let (cfg, _) = profile_settings(Profile::Lan, 32);
        assert_eq!(
            cfg.max_packet_size,
            foca_packet_size(wire::DEFAULT_UDP_PAYLOAD)
        );
    }

    #[test]
    fn the_largest_foca_body_accepted_is_the_largest_datagram_s_packet() {
        assert_eq!(
            wire::MAX_FOCA_BODY,
            foca_packet_size(wire::MAX_UDP_PAYLOAD).get()
        );
    }

    #[test]
    fn transport_settings_are_range_checked_with_the_fix_in_the_message() {
        assert_eq!(TransportConfig::default().validate(), Ok(()));
        let bad = |f: fn(&mut TransportConfig)| {
            let mut t = TransportConfig::default();
            f(&mut t);
            t.validate().unwrap_err()
        };
        assert!(bad(|t| t.udp_payload_size = 1023).starts_with(
            "udp_payload_size = 1023 is out of range; use 1024 to 9000 bytes (default 1400"
        ));
        assert!(bad(|t| t.udp_payload_size = 9001).contains("use 1024 to 9000"));
        assert!(bad(|t| t.tcp_max_connections = 0)
            .starts_with("tcp_max_connections = 0 is out of range; use 1 to 65536 (default 128)"));
        assert!(bad(|t| t.tcp_max_connections_per_addr = 0)
            .contains("tcp_max_connections_per_addr = 0 is out of range"));
        assert!(bad(|t| t.max_outbound_streams = 100_000)
            .contains("max_outbound_streams = 100000 is out of range"));
    }
}
