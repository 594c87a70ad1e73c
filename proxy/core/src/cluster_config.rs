//! The `[cluster]` section of proxy and agent files, and how it becomes a gossip node's
//! configuration (see [`crate::membership`] for what the node then does to pools).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cluster::{ClusterConfig, Profile};

/// `[cluster]`: joins this process to a gossip cluster.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    /// Cluster name; also authenticated in every packet, so clusters sharing a key stay apart.
    pub name: String,
    /// This node's unique name (default: host name and advertise address, see
    /// [`ClusterSection::node_name`]).
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
    /// A file holding the key(s), one per line, primary first. sluice writes the keyring back
    /// to it after a key rotation, so it may not be combined with `key`/`keys`.
    #[serde(default)]
    pub key_file: Option<String>,
    /// Where the node keeps its identity generation across restarts (default: the key file's
    /// path with `.state` appended; none without a key file).
    #[serde(default)]
    pub state_file: Option<String>,
    /// Seeds; may be empty for the first node.
    #[serde(default)]
    pub peers: Vec<String>,
    /// Deflate large messages.
    #[serde(default)]
    pub compression: bool,
    /// Timing profile: "lan" (default), "wan" or "local" (fast, for one machine).
    #[serde(default = "default_profile")]
    pub profile: Profile,
    /// Expected cluster size: the starting point of the timings until the node has joined;
    /// then they follow the live member count.
    #[serde(default = "default_expected_size")]
    pub expected_size: u32,
    /// Proxies: hold a suspect member's services once this many members independently
    /// suspect it...
    #[serde(default = "default_hold_suspectors")]
    pub hold_suspectors: u32,
    /// ...or once it has been suspect this long.
    #[serde(
        default = "default_hold_after",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub hold_after: Duration,
    /// Proxies: keep the last-known-good pools when more than this share of the members fail
    /// within `mass_failure_window` (or when no other member is alive).
    #[serde(default = "default_mass_failure_share")]
    pub mass_failure_share: f64,
    /// See `mass_failure_share`.
    #[serde(
        default = "default_mass_failure_window",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub mass_failure_window: Duration,
    /// How long a member that went down (or left) is remembered before every node forgets it
    /// and drops its metadata.
    #[serde(
        default = "default_forget_after",
        deserialize_with = "crate::config::duration::deserialize"
    )]
    pub forget_after: Duration,
    /// Proxies: which pools members may announce services into, and from which address
    /// ranges (`[[cluster.allow]]`); none = every announcement is accepted.
    #[serde(default)]
    pub allow: Vec<AllowEntry>,
    /// A proxy applies plugins rolled out to the cluster (`sluice plugin load --cluster`).
    #[serde(default = "default_plugin_rollout")]
    pub plugin_rollout: bool,
    /// Largest gossip datagram, sent and accepted (smaller for low-MTU overlays).
    #[serde(default = "default_udp_payload_size")]
    pub udp_payload_size: usize,
    /// Inbound gossip TCP connections served at once.
    #[serde(default = "default_tcp_max_connections")]
    pub tcp_max_connections: usize,
    /// Inbound gossip TCP connections served at once from one IP address.
    #[serde(default = "default_tcp_max_connections_per_addr")]
    pub tcp_max_connections_per_addr: usize,
}

/// Largest `key_file` read: far more than any keyring needs (a key is 44 bytes of base64), and
/// small enough that pointing it at the wrong file (a log, a device) fails at once.
pub const MAX_KEY_FILE: u64 = 64 * 1024;

fn default_udp_payload_size() -> usize {
    crate::cluster::wire::DEFAULT_UDP_PAYLOAD
}
fn default_tcp_max_connections() -> usize {
    crate::cluster::DEFAULT_TCP_MAX_CONNECTIONS
}
fn default_tcp_max_connections_per_addr() -> usize {
    crate::cluster::DEFAULT_TCP_MAX_CONNECTIONS_PER_ADDR
}

/// Whether this process can create files in `dir` (tried for real: permission bits alone miss
/// read-only mounts).
fn dir_writable(dir: &Path) -> bool {
    let probe = dir.join(format!(".sluice-check.{}", std::process::id()));
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&probe)
    {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            true
        }
        Err(e) => e.kind() == std::io::ErrorKind::AlreadyExists,
    }
}

// Reads a key file of at most MAX_KEY_FILE bytes.
fn read_key_file(p: &Path) -> Result<String, String> {
    use std::io::Read;
    let file =
        std::fs::File::open(p).map_err(|e| format!("[cluster] key_file {}: {e}", p.display()))?;
    let mut bytes = Vec::new();
    file.take(MAX_KEY_FILE + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("[cluster] key_file {}: {e}", p.display()))?;
    if bytes.len() as u64 > MAX_KEY_FILE {
        return Err(format!(
            "[cluster] key_file {} is larger than {} KiB; it should hold only base64 keys, one per line (from `sluice genkey`): check the path",
            p.display(),
            MAX_KEY_FILE / 1024
        ));
    }
    String::from_utf8(bytes).map_err(|_| {
        format!(
            "[cluster] key_file {} is not text; it should hold base64 keys, one per line (from `sluice genkey`)",
            p.display()
        )
    })
}

fn default_plugin_rollout() -> bool {
    true
}

/// `[[cluster.allow]]`: members may announce services into `pool` ("*": any pool) at
/// addresses in `addrs` (CIDR ranges or single IPs; left out: any address).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AllowEntry {
    /// A pool name, or "*".
    pub pool: String,
    /// Address ranges the services' addresses must be in; `None` (left out): any address. An
    /// empty list is refused rather than read as "any", which it looks nothing like.
    #[serde(default)]
    pub addrs: Option<Vec<String>>,
}

fn parse_range(s: &str) -> Result<ipnet::IpNet, String> {
    s.parse::<ipnet::IpNet>()
        .or_else(|_| s.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
        .map_err(|_| {
            format!(
                "[[cluster.allow]] addrs: \"{s}\" is not an address range; write it like \"10.0.0.0/8\", \"fd00::/8\" or a single IP"
            )
        })
}

fn default_forget_after() -> Duration {
    crate::cluster::DEFAULT_FORGET_AFTER
}

fn default_profile() -> Profile {
    Profile::Lan
}
fn default_expected_size() -> u32 {
    crate::cluster::DEFAULT_EXPECTED_SIZE
}
fn default_hold_suspectors() -> u32 {
    crate::membership::RoutingSettings::default()
        .hold
        .suspectors
}
fn default_hold_after() -> Duration {
    crate::membership::RoutingSettings::default().hold.after
}
fn default_mass_failure_share() -> f64 {
    crate::membership::RoutingSettings::default().mass_failure_share
}
fn default_mass_failure_window() -> Duration {
    crate::membership::RoutingSettings::default().mass_failure_window
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
        if self.key_file.is_some() && !keys.is_empty() {
            return Err("[cluster] has both key/keys and key_file; keep only key_file (sluice writes rotated keys back to it, and a key left in the config would come back at the next start)".into());
        }
        let key_file = self.key_file_path(base);
        if let Some(p) = &key_file {
            let text = read_key_file(p)?;
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
        let profile = self.profile;
        if self.name.is_empty() {
            return Err("[cluster] name must not be empty".into());
        }
        if !(1..=16).contains(&self.hold_suspectors) {
            return Err(format!(
                "[cluster] hold_suspectors = {} is out of range; use 1 to 16 (default 2)",
                self.hold_suspectors
            ));
        }
        if !(self.mass_failure_share > 0.0 && self.mass_failure_share <= 1.0) {
            return Err(format!(
                "[cluster] mass_failure_share = {} is out of range; use a share above 0 and at most 1 (default 0.5; 1 turns the mass-failure guard off)",
                self.mass_failure_share
            ));
        }
        if self.mass_failure_window.is_zero() {
            return Err(
                "[cluster] mass_failure_window must be longer than 0; write it like \"30s\"".into(),
            );
        }
        for a in &self.allow {
            if a.pool.is_empty() {
                return Err("[[cluster.allow]] pool must not be empty; name a pool, or \"*\" for every pool".into());
            }
            match &a.addrs {
                Some(ranges) if ranges.is_empty() => {
                    return Err(format!(
                        "[[cluster.allow]] pool = \"{}\" has addrs = [], which would allow no address; list the ranges its services may use, or leave addrs out to allow any address",
                        a.pool
                    ));
                }
                Some(ranges) => {
                    for r in ranges {
                        parse_range(r)?;
                    }
                }
                None => {}
            }
        }
        if self.forget_after < Duration::from_secs(1) {
            return Err(format!(
                "[cluster] forget_after = {:?} is too short; use at least \"1s\" (default \"1h\")",
                self.forget_after
            ));
        }
        let transport = crate::cluster::TransportConfig {
            udp_payload_size: self.udp_payload_size,
            tcp_max_connections: self.tcp_max_connections,
            tcp_max_connections_per_addr: self.tcp_max_connections_per_addr,
            ..crate::cluster::TransportConfig::default()
        };
        transport.validate().map_err(|e| format!("[cluster] {e}"))?;
        let state_file = match &self.state_file {
            Some(f) if f.is_empty() => {
                return Err(
                    "[cluster] state_file must not be empty; give a path or remove the key".into(),
                )
            }
            Some(f) => Some(base.join(f)),
            None => key_file.as_ref().map(|k| {
                let mut name = k.clone().into_os_string();
                name.push(".state");
                name.into()
            }),
        };
        Ok(ClusterConfig {
            cluster_name: self.name.clone(),
            bind_addr: bind,
            advertise_addr: advertise,
            keys,
            peers: self.peers.clone(),
            profile,
            compression: self.compression,
            expected_size: self.expected_size.max(1),
            forget_after: self.forget_after,
            transport,
            key_file,
            state_file_optional: self.state_file.is_none(),
            state_file,
        })
    }

    /// Checks that the directories of the files the node writes (the key file after a
    /// rotation, the state file at start) exist, so that `check` finds what `run` would stop on.
    /// Returns warnings for directories sluice cannot write in (a read-only `/etc`, a secret
    /// mount): a rotation could not persist the new keys, or the identity generation would
    /// follow the wall clock alone.
    pub fn check_files(&self, base: &Path) -> Result<Vec<String>, String> {
        let cfg = self.to_config(base)?;
        let files = [("key_file", cfg.key_file), ("state_file", cfg.state_file)];
        let mut warnings = Vec::new();
        for (key, path) in files {
            let Some(path) = path else { continue };
            // A symbolic link is written through: its target's directory is the one written in.
            let path = crate::cluster::persist::written_path(&path).map_err(|e| {
                format!(
                    "[cluster] {key}: {} is a symbolic link that cannot be followed: {e}; point it at an existing file, or give another path",
                    path.display()
                )
            })?;
            let dir = path
                .parent()
                .filter(|d| !d.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            if !dir.is_dir() {
                return Err(format!(
                    "[cluster] {key}: the directory {} of {} does not exist; create it (sluice writes this file) or give another path",
                    dir.display(),
                    path.display()
                ));
            }
            if !dir_writable(dir) {
                let effect = if key == "key_file" {
                    "a key rotation cannot write the new keys there (it stops at the install phase)"
                } else if self.state_file.is_none() {
                    "this default state file is skipped and the identity generation follows the wall clock alone"
                } else {
                    "the node refuses to start"
                };
                warnings.push(format!(
                    "[cluster] {key}: sluice cannot write in {} (read-only or not its own), so {effect}; make it writable, or set {key} to a path in a writable directory such as /var/lib/sluice",
                    dir.display(),
                ));
            }
        }
        Ok(warnings)
    }

    /// `key_file` resolved against `base`.
    pub fn key_file_path(&self, base: &Path) -> Option<PathBuf> {
        // (`join` keeps an absolute path as it is.)
        self.key_file.as_deref().map(|f| base.join(f))
    }

    /// How a proxy turns the membership view into pools (call after [`Self::to_config`]
    /// validated the section).
    pub fn routing(&self) -> crate::membership::RoutingSettings {
        crate::membership::RoutingSettings {
            hold: crate::cluster::HoldPolicy {
                suspectors: self.hold_suspectors,
                after: self.hold_after,
            },
            mass_failure_share: self.mass_failure_share,
            mass_failure_window: self.mass_failure_window,
            allow: crate::membership::AllowList::new(
                self.allow
                    .iter()
                    .map(|a| {
                        let ranges = a.addrs.iter().flatten();
                        let nets = ranges.filter_map(|r| parse_range(r).ok());
                        (a.pool.clone(), nets.collect())
                    })
                    .collect(),
            ),
        }
    }

    /// The node name: configured, or `HOST@ADDR` with the host name and the address other
    /// members reach this node at (`advertise_addr`, else `bind_addr`), so that nodes on one
    /// host differ by address and nodes on different hosts by host name.
    pub fn node_name(&self) -> String {
        self.node_name.clone().unwrap_or_else(|| {
            let host = std::fs::read_to_string("/etc/hostname")
                .map(|h| h.trim().to_string())
                .ok()
                .filter(|h| !h.is_empty())
                .unwrap_or_else(|| "node".into());
            default_node_name(
                &host,
                self.advertise_addr.as_deref().unwrap_or(&self.bind_addr),
            )
        })
    }
}

/// What a reload may change in a running member's `[cluster]` section.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ClusterReload {
    /// The keys the new file gives, when they differ from what the old file gave: the keyring
    /// is brought to them (install, use, remove). Compared with the old file rather than the
    /// running keyring, so that a reload does not undo a cluster-wide rotation on a node whose
    /// keys are written in its config.
    pub keys: Option<Vec<String>>,
    /// New seeds.
    pub peers: Option<Vec<String>>,
    /// New hold and mass-failure settings (proxies).
    pub routing: Option<crate::membership::RoutingSettings>,
}

impl ClusterReload {
    /// Whether the reload changes nothing in the cluster member.
    pub fn is_empty(&self) -> bool {
        *self == ClusterReload::default()
    }
}

/// Compares the `[cluster]` sections of the running file (`old`, whose keys were `old_keys`)
/// and of the new one (`new`, already validated; `new_keys` from its `to_config`). Keys, peers
/// and the hold and mass-failure settings apply live; anything else that changed refuses the
/// whole reload, naming the key and saying that it needs a restart.
pub fn reload_plan(
    old: Option<&ClusterSection>,
    new: Option<&ClusterSection>,
    old_keys: &[String],
    new_keys: &[String],
) -> Result<ClusterReload, String> {
    let (old, new) = match (old, new) {
        (None, None) => return Ok(ClusterReload::default()),
        (None, Some(_)) => return Err("[cluster] was added; joining a cluster needs a restart of sluice (the running config stays)".into()),
        (Some(_), None) => return Err("[cluster] was removed; leaving the cluster needs a restart of sluice (the running config stays); to stop routing to cluster members, give the pools static backends instead".into()),
        (Some(o), Some(n)) => (o, n),
    };
    fn show<T: std::fmt::Debug>(v: &T) -> String {
        format!("{v:?}")
    }
    // The configured name, not the computed default: that follows the host name, which may have
    // changed since the node started without anything in the config having changed.
    let node_name = |s: &ClusterSection| match &s.node_name {
        Some(name) => show(name),
        None => "the default (HOST@ADDR)".to_string(),
    };
    // Every setting a reload cannot apply, each once: its name, then its old and new values.
    macro_rules! fixed {
        ($($field:ident),*) => {
            [$((stringify!($field), show(&old.$field), show(&new.$field))),*]
        };
    }
    let mut fixed = vec![("node_name", node_name(old), node_name(new))];
    fixed.extend(fixed!(
        name,
        bind_addr,
        advertise_addr,
        key_file,
        state_file,
        profile,
        compression,
        expected_size,
        plugin_rollout,
        forget_after,
        udp_payload_size,
        tcp_max_connections,
        tcp_max_connections_per_addr
    ));
    for (key, was, now) in fixed {
        if was != now {
            return Err(format!("[cluster] {key} changed from {was} to {now}; it cannot change while the node runs: restart sluice to apply it (the running config stays)"));
        }
    }
    Ok(ClusterReload {
        keys: (old_keys != new_keys).then(|| new_keys.to_vec()),
        peers: (old.peers != new.peers).then(|| new.peers.clone()),
        routing: (old.routing() != new.routing()).then(|| new.routing()),
    })
}

fn default_node_name(host: &str, addr: &str) -> String {
    format!("{host}@{addr}")
}

#[cfg(test)]
mod tests {
    use super::*;

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
        let err = toml::from_str::<ClusterSection>(&format!(
            "name = \"c\"\nbind_addr = \"127.0.0.1:7946\"\nkey = \"{key}\"\nprofile = \"fast\""
        ))
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("unknown variant `fast`, expected one of `lan`, `wan`, `local`"),
            "{err}"
        );
        let cfg = section(&format!("key = \"{key}\"\npeers = [\"127.0.0.1:7947\"]"))
            .to_config(Path::new("."))
            .unwrap();
        assert_eq!(cfg.peers, vec!["127.0.0.1:7947".to_string()]);

        // Hold and mass-failure settings: defaults, parsing and range checks.
        let s = section(&format!("key = \"{key}\""));
        assert_eq!(s.routing(), crate::membership::RoutingSettings::default());
        let s = section(&format!(
            "key = \"{key}\"\nhold_suspectors = 3\nhold_after = \"500ms\"\nmass_failure_share = 0.25\nmass_failure_window = \"1m\""
        ));
        s.to_config(Path::new(".")).unwrap();
        let r = s.routing();
        assert_eq!(
            (
                r.hold.suspectors,
                r.hold.after,
                r.mass_failure_share,
                r.mass_failure_window
            ),
            (3, Duration::from_millis(500), 0.25, Duration::from_secs(60))
        );
        // Allow-lists: none accepts everything; otherwise pool and address must match a rule.
        assert!(s
            .routing()
            .allow
            .allows("any", "192.0.2.1:80".parse().unwrap()));
        let s = section(&format!(
            "key = \"{key}\"\n[[allow]]\npool = \"web\"\naddrs = [\"10.1.0.0/16\", \"fd00::1\"]\n[[allow]]\npool = \"*\"\naddrs = [\"192.168.0.0/24\"]"
        ));
        s.to_config(Path::new(".")).unwrap();
        let allow = s.routing().allow;
        for (pool, addr, ok) in [
            ("web", "10.1.2.3:80", true),
            ("web", "[fd00::1]:80", true),
            ("web", "10.2.0.1:80", false),
            ("api", "10.1.2.3:80", false),
            ("api", "192.168.0.9:80", true),
            ("web", "192.168.0.9:80", true),
        ] {
            assert_eq!(
                allow.allows(pool, addr.parse().unwrap()),
                ok,
                "{pool} {addr}"
            );
        }
        for (bad, what) in [
            ("hold_suspectors = 0", "hold_suspectors = 0 is out of range"),
            (
                "mass_failure_share = 1.5",
                "mass_failure_share = 1.5 is out of range",
            ),
            (
                "mass_failure_window = \"0s\"",
                "mass_failure_window must be longer than 0",
            ),
            (
                "forget_after = \"10ms\"",
                "forget_after = 10ms is too short",
            ),
            (
                "[[allow]]\npool = \"web\"\naddrs = [\"10.0.0/8\"]",
                "\"10.0.0/8\" is not an address range",
            ),
            ("[[allow]]\npool = \"\"", "pool must not be empty"),
            (
                "[[allow]]\npool = \"web\"\naddrs = []",
                "has addrs = [], which would allow no address",
            ),
        ] {
            let err = section(&format!("key = \"{key}\"\n{bad}"))
                .to_config(Path::new("."))
                .unwrap_err();
            assert!(err.contains(what), "{err}");
        }
    }

    #[test]
    fn transport_settings_have_defaults_and_ranges() {
        let key = crate::cluster::keyring::generate_key();
        let parse = |extra: &str| {
            toml::from_str::<ClusterSection>(&format!(
                "name = \"c\"\nbind_addr = \"127.0.0.1:7946\"\nkey = \"{key}\"\n{extra}"
            ))
            .unwrap()
            .to_config(Path::new("."))
        };
        assert_eq!(
            parse("").unwrap().transport,
            crate::cluster::TransportConfig::default()
        );
        let t = parse(
            "udp_payload_size = 1200\ntcp_max_connections = 10\ntcp_max_connections_per_addr = 2",
        )
        .unwrap()
        .transport;
        assert_eq!(
            (
                t.udp_payload_size,
                t.tcp_max_connections,
                t.tcp_max_connections_per_addr
            ),
            (1200, 10, 2)
        );
        for (bad, what) in [
            (
                "udp_payload_size = 576",
                "[cluster] udp_payload_size = 576 is out of range; use 1024 to 9000 bytes",
            ),
            (
                "udp_payload_size = 65507",
                "udp_payload_size = 65507 is out of range",
            ),
            (
                "tcp_max_connections = 0",
                "[cluster] tcp_max_connections = 0 is out of range; use 1 to 65536",
            ),
            (
                "tcp_max_connections_per_addr = 0",
                "tcp_max_connections_per_addr = 0 is out of range",
            ),
        ] {
            let err = parse(bad).unwrap_err();
            assert!(err.contains(what), "{err}");
        }
    }

    #[test]
    fn key_files_are_read_with_a_size_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let key = crate::cluster::keyring::generate_key();
        let section = |file: &str| -> ClusterSection {
            toml::from_str(&format!(
                "name = \"c\"\nbind_addr = \"127.0.0.1:7946\"\nkey_file = \"{file}\""
            ))
            .unwrap()
        };
        // Keys, comments and blank lines, relative to the config's directory.
        std::fs::write(dir.join("keys"), format!("# cluster keys\n\n{key}\n")).unwrap();
        let cfg = section("keys").to_config(&dir).unwrap();
        assert_eq!(cfg.keys, vec![key.clone()]);
        // A file beyond the limit (here 1 MiB: the wrong file, say a log) is refused by name.
        let big = dir.join("big");
        let mut text = format!("{key}\n");
        while text.len() < 1 << 20 {
            text.push_str("# padding padding padding padding padding padding\n");
        }
        std::fs::write(&big, text).unwrap();
        let err = section("big").to_config(&dir).unwrap_err();
        assert!(
            err.contains(&format!("key_file {} is larger than 64 KiB", big.display())),
            "{err}"
        );
        std::fs::write(dir.join("binary"), [0xffu8, 0xfe, 0, 1]).unwrap();
        let err = section("binary").to_config(&dir).unwrap_err();
        assert!(err.contains("is not text"), "{err}");
        // An endless device is refused after reading just past the limit, not read forever.
        if Path::new("/dev/zero").exists() {
            let err = section("/dev/zero").to_config(&dir).unwrap_err();
            assert!(err.contains("is larger than 64 KiB"), "{err}");
        }
    }

    #[test]
    fn default_names_differ_per_advertise_address() {
        let section = |extra: &str| -> ClusterSection {
            toml::from_str(&format!(
                "name = \"c\"\nbind_addr = \"0.0.0.0:7946\"\n{extra}"
            ))
            .unwrap()
        };
        // Same host, same port, different addresses: different names.
        let a = section("advertise_addr = \"10.0.0.1:7946\"").node_name();
        let b = section("advertise_addr = \"10.0.0.2:7946\"").node_name();
        assert_ne!(a, b);
        assert!(a.ends_with("@10.0.0.1:7946"), "{a}");
        assert!(section("").node_name().ends_with("@0.0.0.0:7946"));
        assert_eq!(
            default_node_name("web1", "10.0.0.1:7946"),
            "web1@10.0.0.1:7946"
        );
        assert_eq!(section("node_name = \"n1\"").node_name(), "n1");
    }

    #[test]
    fn key_files_and_state_files() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_path_buf();
        let key = crate::cluster::keyring::generate_key();
        std::fs::write(dir.join("cluster.key"), format!("# comment\n{key}\n")).unwrap();
        let section = |extra: &str| -> ClusterSection {
            toml::from_str(&format!(
                "name = \"c\"\nbind_addr = \"127.0.0.1:7946\"\n{extra}"
            ))
            .unwrap()
        };
        let cfg = section("key_file = \"cluster.key\"")
            .to_config(&dir)
            .unwrap();
        assert_eq!(cfg.keys, std::slice::from_ref(&key));
        assert_eq!(cfg.key_file, Some(dir.join("cluster.key")));
        assert_eq!(
            cfg.state_file,
            Some(dir.join("cluster.key.state")),
            "beside the key file"
        );
        assert!(
            cfg.state_file_optional,
            "a default: unwritable is a warning"
        );
        assert_eq!(
            section("key_file = \"cluster.key\"").check_files(&dir),
            Ok(vec![]),
            "a writable directory: no warning"
        );
        // A symbolic link is written through, so its target must be reachable.
        std::os::unix::fs::symlink("gone/node.state", dir.join("linked.state")).unwrap();
        let err = section("key_file = \"cluster.key\"\nstate_file = \"linked.state\"")
            .check_files(&dir)
            .unwrap_err();
        assert!(
            err.contains("state_file") && err.contains("symbolic link that cannot be followed"),
            "{err}"
        );
        let cfg =
            section("key_file = \"cluster.key\"\nstate_file = \"/var/lib/sluice/node.state\"")
                .to_config(&dir)
                .unwrap();
        assert_eq!(
            cfg.state_file,
            Some(PathBuf::from("/var/lib/sluice/node.state"))
        );
        assert!(!cfg.state_file_optional, "configured: a failure is fatal");
        let cfg = section(&format!("key = \"{key}\""))
            .to_config(&dir)
            .unwrap();
        assert_eq!((cfg.key_file, cfg.state_file), (None, None));
        let err = section(&format!("key = \"{key}\"\nkey_file = \"cluster.key\""))
            .to_config(&dir)
            .unwrap_err();
        assert!(
            err.contains("both key/keys and key_file; keep only key_file"),
            "{err}"
        );
        let err = section("key_file = \"missing.key\"")
            .to_config(&dir)
            .unwrap_err();
        assert!(err.contains("[cluster] key_file"), "{err}");
    }

    #[test]
    fn reloads_apply_keys_peers_and_hold_settings_and_refuse_the_rest() {
        let k1 = crate::cluster::keyring::generate_key();
        let k2 = crate::cluster::keyring::generate_key();
        let section = |lines: &[&str]| -> ClusterSection {
            let mut text = format!("name = \"c\"\nkey = \"{k1}\"\n");
            for key in ["node_name", "bind_addr", "peers"] {
                if !lines.iter().any(|l| l.starts_with(key)) {
                    text.push_str(match key {
                        "node_name" => "node_name = \"n\"\n",
                        "bind_addr" => "bind_addr = \"127.0.0.1:7946\"\n",
                        _ => "peers = [\"127.0.0.1:7947\"]\n",
                    });
                }
            }
            for l in lines {
                text.push_str(l);
                text.push('\n');
            }
            toml::from_str(&text).unwrap()
        };
        let same_keys = [k1.clone()];
        let plan = |old: &ClusterSection, new: &ClusterSection| {
            reload_plan(Some(old), Some(new), &same_keys, &same_keys)
        };
        let old = section(&[]);
        assert!(plan(&old, &old).unwrap().is_empty());
        let p = plan(&old, &section(&["peers = []", "hold_after = \"1s\""])).unwrap();
        assert_eq!(p.peers, Some(vec![]));
        assert_eq!(p.routing.unwrap().hold.after, Duration::from_secs(1));
        assert_eq!(p.keys, None);
        let two = [k2.clone(), k1.clone()];
        let p = reload_plan(Some(&old), Some(&old), &same_keys, &two).unwrap();
        assert_eq!(p.keys.as_deref(), Some(&two[..]));
        for (line, want) in [
            (
                "bind_addr = \"127.0.0.1:7000\"",
                "[cluster] bind_addr changed from \"127.0.0.1:7946\" to \"127.0.0.1:7000\"",
            ),
            (
                "advertise_addr = \"10.0.0.1:7946\"",
                "[cluster] advertise_addr changed",
            ),
            (
                "node_name = \"m\"",
                "[cluster] node_name changed from \"n\" to \"m\"",
            ),
            ("profile = \"wan\"", "[cluster] profile changed"),
            ("state_file = \"x.state\"", "[cluster] state_file changed"),
            (
                "udp_payload_size = 1200",
                "[cluster] udp_payload_size changed",
            ),
            (
                "tcp_max_connections = 64",
                "[cluster] tcp_max_connections changed",
            ),
            (
                "tcp_max_connections_per_addr = 4",
                "[cluster] tcp_max_connections_per_addr changed",
            ),
        ] {
            let err = plan(&old, &section(&[line])).unwrap_err();
            assert!(
                err.contains(want) && err.contains("restart sluice to apply it"),
                "{err}"
            );
        }
        let added = reload_plan(None, Some(&old), &[], &same_keys).unwrap_err();
        assert!(added.contains("[cluster] was added"), "{added}");
        let removed = reload_plan(Some(&old), None, &same_keys, &[]).unwrap_err();
        assert!(removed.contains("[cluster] was removed"), "{removed}");
        assert!(reload_plan(None, None, &[], &[]).unwrap().is_empty());
    }
}
