//! sluice-gossip: cluster membership — which proxies and backends exist, what they offer and
//! whether they are alive.
//!
//! Layers, bottom up:
//! - [`keyring`]: AES-256-GCM keys; every packet and frame is sealed, the cluster name is the
//!   associated data, and anything that does not authenticate is dropped unparsed.
//! - [`wire`]: the plaintext header, optional deflate, TCP framing.
//! - [`node`]: a sans-IO state machine around [foca](https://docs.rs/foca) (SWIM with indirect
//!   probes and suspicion) plus metadata dissemination and push-pull anti-entropy. It takes
//!   packets, timer events and "now", and returns packets to send and timers to set, so the same
//!   code runs on real sockets and in the virtual-time simulator.
//! - [`runtime`]: the tokio driver ([`Cluster::start`] → [`ClusterHandle`]) with the UDP and
//!   TCP transports, seed retries and the membership snapshot the proxy reads.
//! - [`blobs`]: content addressed by the caller's digest, kept by a member and fetched by
//!   others over the same authenticated TCP transport (the proxy's plugin rollout).
//! - [`sim`]: many nodes in one process on virtual time over a seeded lossy network, for tests
//!   and the `gossip_sim` benchmark.
//!
//! # Why metadata travels in custom broadcasts, not in the identity
//! foca puts the sender's and the receiver's identity in the header of *every* packet. A
//! backend with a few services has ~150 bytes of metadata, so carrying it in the identity would
//! multiply the probe traffic several times over and an identity change (e.g. `draining =
//! true`) would make foca declare the old identity down, which the proxy would see as a death.
//! So the identity is lean — gossip address + generation ([`node::NodeId`]) — and metadata is a
//! foca custom broadcast keyed by gossip address and ordered by (generation, version): a newer
//! version replaces older ones still queued for dissemination, and the periodic push-pull
//! repairs anything the broadcast missed. Metadata too large for a datagram is announced as a
//! small stub and fetched over TCP.

pub mod blobs;
pub mod clock;
pub mod keyring;
pub mod node;
pub mod runtime;
pub mod sim;
pub mod wire;

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use keyring::{generate_key, KeyError, Keyring};
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
    /// Unique name in the cluster; a node whose name is alive elsewhere refuses to start.
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
    /// Fast timings for tests on one machine: 200 ms probes, ~1 s suspicion, 2 s push-pull.
    Local,
}

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
    /// Expected cluster size: scales foca's retransmissions and suspicion timeout.
    pub expected_size: u32,
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
            expected_size: 32,
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
    #[error("the name {name:?} is already used by the live member at {other}; give this node a unique name")]
    NameConflict {
        /// The contested name.
        name: String,
        /// Gossip address of the member that has it.
        other: SocketAddr,
    },
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
            c.suspect_to_down_after = Duration::from_millis(1000);
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
    // foca sends each update log10(n+1)*4 times (memberlist's default), which leaves each node
    // a ~e^-(that) chance of missing a given update: in simulation a few nodes per hundred-node
    // crash only learned of it from their own probe, tens of seconds later. Half as many
    // transmissions again cost little (updates are rare) and make such misses negligible.
    cfg.max_transmissions =
        std::num::NonZeroU8::new(cfg.max_transmissions.get().saturating_mul(3) / 2)
            .unwrap_or(cfg.max_transmissions);
    // foca's packets are sealed afterwards: leave room for the header and the seal so that
    // every SWIM packet still fits one datagram.
    cfg.max_packet_size = std::num::NonZeroUsize::new(
        wire::MAX_UDP_PACKET - wire::HEADER_LEN - keyring::SEAL_OVERHEAD,
    )
    .expect("positive");
    // A full state exchange costs O(members) bytes, so like memberlist we exchange less often as
    // the cluster grows beyond 32 members, which keeps the per-node bandwidth roughly flat.
    let scale = if size > 32 {
        (f64::from(size).log2() - 5.0).ceil() as u32 + 1
    } else {
        1
    };
    (cfg, push_pull * scale)
}
