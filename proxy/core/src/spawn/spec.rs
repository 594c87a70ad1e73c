//! `[[pool.spawn]]`: the table as written, its validated form, and what the API shows of each
//! instance.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::config::{duration, in_range, BackendSpec};

/// Most instances one spawn table may start.
pub const MAX_INSTANCES: u64 = 256;

/// Environment variables sluice sets itself in every instance.
const RESERVED_ENV: [&str; 2] = ["PORT", "SLUICE_INSTANCE"];

/// `[[pool.spawn]]` as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SpawnConfig {
    /// Prefix of the instances' names (`NAME#n`); default: the pool's name.
    #[serde(default)]
    pub name: Option<String>,
    /// The program: a path (relative to the config file) or a name looked up in `PATH`.
    pub command: String,
    /// Its arguments.
    #[serde(default)]
    pub args: Vec<String>,
    /// How many instances run.
    #[serde(default = "default_instances")]
    pub instances: u64,
    /// Port of instance 0; instance n listens on `start_port + n`.
    pub start_port: u64,
    /// Extra environment variables (the instances inherit sluice's environment too).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Address the instances listen on and are reached at.
    #[serde(default = "default_host")]
    pub host: String,
    /// Working directory (relative to the config file); default: the config file's directory.
    #[serde(default)]
    pub dir: Option<String>,
    /// Weight of each instance in the pool.
    #[serde(default = "default_weight")]
    pub weight: u32,
    /// How long a stopping instance may take: first to finish its requests in flight, then to
    /// exit after SIGTERM, before it gets SIGKILL.
    #[serde(default = "default_stop_grace", with = "duration")]
    pub stop_grace: Duration,
    /// Delay before the first restart of an instance that exited.
    #[serde(default = "default_restart_delay", with = "duration")]
    pub restart_delay: Duration,
    /// The delay doubles with each restart in a row up to this; an instance that ran this long
    /// starts again from `restart_delay`.
    #[serde(default = "default_max_restart_delay", with = "duration")]
    pub max_restart_delay: Duration,
    /// An instance whose port does not accept connections this long after its start is stopped
    /// and restarted.
    #[serde(default = "default_ready_timeout", with = "duration")]
    pub ready_timeout: Duration,
}

fn default_instances() -> u64 {
    1
}
fn default_host() -> String {
    "127.0.0.1".into()
}
fn default_weight() -> u32 {
    1
}
fn default_stop_grace() -> Duration {
    Duration::from_secs(10)
}
fn default_restart_delay() -> Duration {
    Duration::from_millis(250)
}
fn default_max_restart_delay() -> Duration {
    Duration::from_secs(30)
}
fn default_ready_timeout() -> Duration {
    Duration::from_secs(30)
}

/// A spawn table after validation, with paths resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpawnSpec {
    /// The pool the instances belong to.
    pub pool: String,
    /// Prefix of the instances' names.
    pub name: String,
    /// The program as written (for the API and logs).
    pub command: String,
    /// The program to run: resolved against the config file's directory when it is a path.
    pub program: PathBuf,
    /// Arguments.
    pub args: Vec<String>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub dir: PathBuf,
    /// Listen address.
    pub host: IpAddr,
    /// Port of instance 0.
    pub start_port: u16,
    /// Number of instances.
    pub instances: u16,
    /// Weight of each instance.
    pub weight: u32,
    /// See [`SpawnConfig::stop_grace`].
    pub stop_grace: Duration,
    /// See [`SpawnConfig::restart_delay`].
    pub restart_delay: Duration,
    /// See [`SpawnConfig::max_restart_delay`].
    pub max_restart_delay: Duration,
    /// See [`SpawnConfig::ready_timeout`].
    pub ready_timeout: Duration,
}

impl SpawnSpec {
    /// Validates `c`, a spawn table of pool `pool` in a file whose directory is `base_dir`.
    /// The message names the problem and the fix (the caller adds the file:line).
    pub fn new(pool: &str, c: &SpawnConfig, base_dir: &Path) -> Result<SpawnSpec, String> {
        let name = c.name.clone().unwrap_or_else(|| pool.to_string());
        if name.is_empty()
            || !name
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || ch == '-' || ch == '_')
        {
            return Err(format!(
                "spawn name \"{name}\" is invalid; use letters, digits, '-' and '_'"
            ));
        }
        let at = |m: String| format!("spawn \"{name}\": {m}");
        if c.command.trim().is_empty() {
            return Err(at("command is empty; give the program to run, e.g. command = \"python3\", args = [\"server.py\"]".into()));
        }
        let program = resolve_program(&c.command, base_dir).map_err(at)?;
        in_range(c.instances, 0..=MAX_INSTANCES, "instances").map_err(at)?;
        in_range(c.start_port, 1..=65535, "start_port").map_err(at)?;
        let last = c.start_port + c.instances.max(1) - 1;
        if last > 65535 {
            return Err(at(format!(
                "instances {} from start_port {} would need port {last}; ports end at 65535, so lower start_port or instances",
                c.instances, c.start_port
            )));
        }
        let host: IpAddr = c.host.parse().map_err(|_| {
            at(format!(
                "host \"{}\" is not an IP address; write it like \"127.0.0.1\" or \"::1\"",
                c.host
            ))
        })?;
        for (k, v) in &c.env {
            if RESERVED_ENV.contains(&k.as_str()) {
                return Err(at(format!(
                    "env sets {k}, which sluice sets for each instance (PORT = start_port + n, SLUICE_INSTANCE = n); remove it"
                )));
            }
            if k.is_empty() || k.contains('=') || k.contains('\0') || v.contains('\0') {
                return Err(at(format!(
                    "env variable \"{}\" is not a valid name (or its value holds a NUL byte); use a name without '='",
                    k.escape_debug()
                )));
            }
        }
        let dir = match &c.dir {
            Some(d) => base_dir.join(d),
            None => base_dir.to_path_buf(),
        };
        // An empty base directory (a config file named without a directory) is the current one.
        let dir = if dir.as_os_str().is_empty() {
            PathBuf::from(".")
        } else {
            dir
        };
        if !dir.is_dir() {
            return Err(at(format!(
                "dir \"{}\" is not a directory; create it or change dir (relative to the config file)",
                dir.display()
            )));
        }
        in_range(u64::from(c.weight), 1..=1_000_000, "weight").map_err(at)?;
        let durations = [
            ("stop_grace", c.stop_grace, Duration::ZERO),
            ("restart_delay", c.restart_delay, Duration::from_millis(10)),
            (
                "max_restart_delay",
                c.max_restart_delay,
                Duration::from_millis(10),
            ),
            ("ready_timeout", c.ready_timeout, Duration::from_millis(100)),
        ];
        for (what, d, min) in durations {
            let max = Duration::from_secs(3600);
            if d < min || d > max {
                return Err(at(format!(
                    "{what} is {}; allowed: {} to {}",
                    humantime::format_duration(d),
                    humantime::format_duration(min),
                    humantime::format_duration(max)
                )));
            }
        }
        if c.max_restart_delay < c.restart_delay {
            return Err(at("max_restart_delay must be at least restart_delay".into()));
        }
        Ok(SpawnSpec {
            pool: pool.to_string(),
            name,
            command: c.command.clone(),
            program,
            args: c.args.clone(),
            env: c.env.clone(),
            dir,
            host,
            start_port: c.start_port as u16,
            instances: c.instances as u16,
            weight: c.weight,
            stop_grace: c.stop_grace,
            restart_delay: c.restart_delay,
            max_restart_delay: c.max_restart_delay,
            ready_timeout: c.ready_timeout,
        })
    }

    /// Whether instances of `self` and `other` run the same way (everything but the number of
    /// instances is equal): a running instance is replaced when this turns false.
    pub fn same_instances(&self, other: &SpawnSpec) -> bool {
        let mut a = self.clone();
        a.instances = other.instances;
        a == *other
    }

    /// The address of instance `n`.
    pub fn addr(&self, n: u16) -> SocketAddr {
        SocketAddr::new(self.host, self.start_port + n)
    }

    /// The name of instance `n` (`web#2`).
    pub fn instance_name(&self, n: u16) -> String {
        format!("{}#{n}", self.name)
    }

    /// Every instance's address.
    pub fn addrs(&self) -> impl Iterator<Item = SocketAddr> + '_ {
        (0..self.instances).map(|n| self.addr(n))
    }

    /// The pool member instance `n` is.
    pub fn member(&self, n: u16) -> BackendSpec {
        BackendSpec {
            addr: self.addr(n),
            weight: self.weight,
            zone: String::new(),
            tags: Vec::new(),
        }
    }

    /// The inclusive port range the instances use (empty when there are none).
    pub fn ports(&self) -> std::ops::Range<u32> {
        let start = u32::from(self.start_port);
        start..start + u32::from(self.instances)
    }

    /// The restart delay after `consecutive` restarts in a row (0 for the first).
    pub fn backoff(&self, consecutive: u32) -> Duration {
        let factor = 1u32 << consecutive.min(20);
        self.restart_delay
            .saturating_mul(factor)
            .min(self.max_restart_delay)
    }

    /// Whether some instance of `self` and of `other` would listen on the same address.
    pub fn overlaps(&self, other: &SpawnSpec) -> bool {
        ips_overlap(self.host, other.host)
            && self.ports().start < other.ports().end
            && other.ports().start < self.ports().end
    }

    /// Whether some instance would listen on `addr`'s port on an address overlapping its IP.
    pub fn uses(&self, addr: SocketAddr) -> bool {
        ips_overlap(self.host, addr.ip()) && self.ports().contains(&u32::from(addr.port()))
    }
}

/// Two listen IPs conflict when equal, or when either is the unspecified address.
fn ips_overlap(a: IpAddr, b: IpAddr) -> bool {
    a == b || a.is_unspecified() || b.is_unspecified()
}

/// The program to execute for `command`: a path (with a `/`) relative to `base_dir` must exist,
/// a bare name must be found in `PATH`.
fn resolve_program(command: &str, base_dir: &Path) -> Result<PathBuf, String> {
    if command.contains('/') {
        let p = Path::new(command);
        let path = if p.is_absolute() {
            p.to_path_buf()
        } else {
            base_dir.join(p)
        };
        if !path.is_file() {
            return Err(format!(
                "command \"{}\" does not exist; give the path of a program (relative paths are relative to the config file) or a name found in PATH",
                path.display()
            ));
        }
        return Ok(path);
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    let found = std::env::split_paths(&path)
        .map(|d| d.join(command))
        .any(|p| is_executable(&p));
    if !found {
        return Err(format!(
            "command \"{command}\" is not found in PATH; install it, or give its path (relative paths are relative to the config file)"
        ));
    }
    // Executed by name: the child looks it up in PATH as a shell would.
    Ok(PathBuf::from(command))
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    p.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// What an instance is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum InstanceState {
    /// Started; its port does not accept connections yet (not a pool member).
    Starting,
    /// Its port accepts connections: a pool member.
    Ready,
    /// It exited (or failed to start or to become ready) and waits for its restart.
    Restarting,
    /// Out of the pool, finishing its requests in flight before it is stopped.
    Draining,
    /// Sent SIGTERM; waiting for it to exit.
    Stopping,
}

/// One instance as `GET /api/pools` shows it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct InstanceStatus {
    /// `NAME#n`.
    pub name: String,
    /// The address it listens on.
    pub addr: String,
    /// Its process id while it runs.
    pub pid: Option<u32>,
    /// What it is doing.
    pub state: InstanceState,
    /// How many times it was restarted.
    pub restarts: u64,
    /// How its last run ended (exit status, or why it was stopped), when it ran before.
    pub last_exit: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(text: &str) -> Result<SpawnSpec, String> {
        let c: SpawnConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        SpawnSpec::new("web", &c, Path::new("."))
    }

    #[test]
    fn a_table_with_defaults_is_valid() {
        let s = spec("command = \"sh\"\nstart_port = 9001\ninstances = 3\n").unwrap();
        assert_eq!(s.name, "web");
        assert_eq!(s.instance_name(2), "web#2");
        assert_eq!(s.addr(2), "127.0.0.1:9003".parse().unwrap());
        assert_eq!(s.addrs().count(), 3);
        assert_eq!(s.backoff(0), Duration::from_millis(250));
        assert_eq!(s.backoff(2), Duration::from_secs(1));
        assert_eq!(s.backoff(30), Duration::from_secs(30));
    }

    #[test]
    fn bad_tables_are_refused_with_the_fix() {
        let cases = [
            ("command = \"\"\nstart_port = 1", "command is empty"),
            ("command = \"no-such-program-here\"\nstart_port = 1", "is not found in PATH"),
            ("command = \"./missing.py\"\nstart_port = 1", "does not exist"),
            ("command = \"sh\"\nstart_port = 0", "start_port is 0; allowed: 1 to 65535"),
            ("command = \"sh\"\nstart_port = 65535\ninstances = 2", "would need port 65536"),
            ("command = \"sh\"\nstart_port = 1\ninstances = 1000", "instances is 1000; allowed: 0 to 256"),
            ("command = \"sh\"\nstart_port = 1\nhost = \"localhost\"", "is not an IP address"),
            ("command = \"sh\"\nstart_port = 1\nenv = { PORT = \"1\" }", "env sets PORT"),
            ("command = \"sh\"\nstart_port = 1\nenv = { \"A=B\" = \"1\" }", "not a valid name"),
            ("command = \"sh\"\nstart_port = 1\ndir = \"no/such/dir\"", "is not a directory"),
            ("command = \"sh\"\nstart_port = 1\nrestart_delay = \"2s\"\nmax_restart_delay = \"1s\"", "max_restart_delay must be at least"),
            ("command = \"sh\"\nstart_port = 1\nstop_grace = \"2h\"", "stop_grace is 2h"),
            ("command = \"sh\"\nstart_port = 1\nname = \"a b\"", "spawn name \"a b\" is invalid"),
        ];
        for (text, want) in cases {
            let e = spec(text).unwrap_err();
            assert!(e.contains(want), "{text:?}: {e}");
        }
    }

    #[test]
    fn overlaps_compare_addresses_and_port_ranges() {
        let a = spec("command = \"sh\"\nstart_port = 9000\ninstances = 3\n").unwrap();
        let b = spec("command = \"sh\"\nstart_port = 9002\n").unwrap();
        let c = spec("command = \"sh\"\nstart_port = 9003\n").unwrap();
        let d = spec("command = \"sh\"\nstart_port = 9001\nhost = \"127.0.0.2\"\n").unwrap();
        let e = spec("command = \"sh\"\nstart_port = 9001\nhost = \"0.0.0.0\"\n").unwrap();
        assert!(a.overlaps(&b) && b.overlaps(&a));
        assert!(!a.overlaps(&c));
        assert!(!a.overlaps(&d));
        assert!(a.overlaps(&e));
        assert!(a.uses("127.0.0.1:9002".parse().unwrap()));
        assert!(a.uses("0.0.0.0:9000".parse().unwrap()));
        assert!(!a.uses("127.0.0.1:9003".parse().unwrap()));
    }
}
