//! Backends given as host names (`backends = ["api.internal:8080"]`): every address the name
//! resolves to (A and AAAA) becomes a backend with the entry's weight, zone and tags.
//!
//! A name is resolved when the config is applied (start and reload: a name that does not resolve
//! then is refused with its file:line, so nothing starts half-alive and a bad reload changes
//! nothing), then again every `dns_refresh` by [`run`], off the request path. A changed answer
//! goes through the pool's membership change ([`crate::pool::Pool::dns_answer`]), which keeps the
//! statistics, leases and idle connections of addresses that stay; a failed refresh keeps the last
//! good addresses, counts the failure and logs it.
//!
//! Resolution uses the system resolver (`getaddrinfo`, through `std::net::ToSocketAddrs`, on a
//! blocking thread), which honours `/etc/hosts`, `nsswitch.conf` and `resolv.conf` but does not
//! report TTLs: the refresh interval is fixed, so set it at or below the records' TTL. The
//! optional `[dns] hosts_file` answers the names it lists before the system resolver is asked,
//! re-read at every resolution (pinning names without touching `/etc/hosts`; tests use it to
//! change an answer over time).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::now_ms;
use crate::config::BackendSpec;
use crate::pool::Pool;

/// A backend entry naming a host: what to resolve, and what every resolved address gets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsName {
    /// The host name, lowercase, without a trailing dot.
    pub host: String,
    /// The port every address is used with.
    pub port: u16,
    /// Weight of each resolved backend.
    pub weight: u32,
    /// Zone of each resolved backend ("" = none).
    pub zone: String,
    /// Tags of each resolved backend.
    pub tags: Vec<String>,
}

impl DnsName {
    /// `host:port` as written (the entry's identity in the API and logs).
    pub fn label(&self) -> String {
        format!("{}:{}", self.host, self.port)
    }

    /// The backend for one resolved address.
    pub fn spec(&self, ip: IpAddr) -> BackendSpec {
        BackendSpec {
            addr: SocketAddr::new(ip, self.port),
            weight: self.weight,
            zone: self.zone.clone(),
            tags: self.tags.clone(),
        }
    }

    /// Whether `host` is a syntactically valid DNS name (RFC 1123 labels, at most 253 bytes).
    pub fn valid_host(host: &str) -> bool {
        let host = host.strip_suffix('.').unwrap_or(host);
        !host.is_empty()
            && host.len() <= 253
            && host.split('.').all(|label| {
                !label.is_empty()
                    && label.len() <= 63
                    && !label.starts_with('-')
                    && !label.ends_with('-')
                    && label
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
            })
            // An all-numeric name would be an IP address gone wrong ("10.0.0.300").
            && !host.bytes().all(|b| b.is_ascii_digit() || b == b'.')
    }
}

/// One name's resolution state: the last good answer and how the last attempts went.
#[derive(Debug, Clone)]
pub struct DnsState {
    /// The entry.
    pub name: DnsName,
    /// The last good answer, sorted and without duplicates.
    pub addrs: Vec<IpAddr>,
    /// When it was obtained ([`crate::clock::now_ms`]).
    pub resolved_ms: u64,
    /// The same moment as wall-clock milliseconds since the Unix epoch (for the API).
    pub resolved_unix_ms: u64,
    /// Why the last attempt failed, while the last attempt failed.
    pub last_error: Option<String>,
    /// Failed attempts since the last good one.
    pub consecutive_failures: u64,
    /// When the next refresh is due.
    pub next_due_ms: u64,
    /// A refresh is running.
    pub in_flight: bool,
}

impl DnsState {
    /// The state of a name just resolved to `addrs` (at apply time), next due after `refresh`.
    pub fn resolved(name: DnsName, addrs: Vec<IpAddr>, refresh: Duration) -> DnsState {
        let now = now_ms();
        DnsState {
            name,
            addrs,
            resolved_ms: now,
            resolved_unix_ms: unix_ms(),
            last_error: None,
            consecutive_failures: 0,
            next_due_ms: now + refresh.as_millis() as u64,
            in_flight: false,
        }
    }

    /// The backends this name stands for now.
    pub fn specs(&self) -> impl Iterator<Item = BackendSpec> + '_ {
        self.addrs.iter().map(|ip| self.name.spec(*ip))
    }

    /// Records one refresh; true when the answer changed the addresses.
    pub fn record(&mut self, answer: Result<Vec<IpAddr>, String>, refresh: Duration) -> bool {
        let now = now_ms();
        self.in_flight = false;
        self.next_due_ms = now + refresh.as_millis() as u64;
        match answer {
            Ok(addrs) => {
                self.resolved_ms = now;
                self.resolved_unix_ms = unix_ms();
                self.last_error = None;
                self.consecutive_failures = 0;
                let changed = self.addrs != addrs;
                self.addrs = addrs;
                changed
            }
            Err(e) => {
                self.last_error = Some(e);
                self.consecutive_failures += 1;
                false
            }
        }
    }

    /// The state for the admin API (`GET /api/pools`).
    pub fn to_json(&self) -> serde_json::Value {
        let now = now_ms();
        serde_json::json!({
            "name": self.name.label(),
            "addresses": self.addrs.iter().map(IpAddr::to_string).collect::<Vec<_>>(),
            "resolved_at_unix_ms": self.resolved_unix_ms,
            "resolved_ms_ago": now.saturating_sub(self.resolved_ms),
            "last_error": self.last_error,
            "consecutive_failures": self.consecutive_failures,
            "next_refresh_in_ms": self.next_due_ms.saturating_sub(now),
        })
    }
}

fn unix_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Largest `[dns] hosts_file` read.
const MAX_HOSTS_FILE: u64 = 1 << 20;

/// Resolves host names: `[dns] hosts_file` first when set, then the system resolver.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Resolver {
    /// A hosts-format file ("IP name [alias...]" per line, `#` comments), re-read every time.
    pub hosts_file: Option<PathBuf>,
}

impl Resolver {
    /// Every address of `host`, sorted and without duplicates; blocks (call it off the async
    /// runtime, e.g. through [`Resolver::lookup_async`]).
    pub fn lookup(&self, host: &str) -> Result<Vec<IpAddr>, String> {
        if let Some(path) = &self.hosts_file {
            let text = read_bounded(path)
                .map_err(|e| format!("cannot read the hosts file {}: {e}", path.display()))?;
            if let Some(addrs) = hosts_lookup(&text, host) {
                return Ok(addrs);
            }
        }
        let mut addrs: Vec<IpAddr> = (host, 0)
            .to_socket_addrs()
            .map_err(|e| e.to_string())?
            .map(|a| a.ip())
            .collect();
        addrs.sort();
        addrs.dedup();
        if addrs.is_empty() {
            return Err("the name has no addresses".into());
        }
        Ok(addrs)
    }

    /// [`Resolver::lookup`] on a blocking thread. The system resolver bounds its own time
    /// (`resolv.conf` timeout and attempts); one name never has two lookups running.
    pub async fn lookup_async(self: Arc<Self>, host: String) -> Result<Vec<IpAddr>, String> {
        tokio::task::spawn_blocking(move || self.lookup(&host))
            .await
            .unwrap_or_else(|e| Err(format!("the resolver thread failed: {e}")))
    }
}

fn read_bounded(path: &std::path::Path) -> std::io::Result<String> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(path)?
        .take(MAX_HOSTS_FILE)
        .read_to_string(&mut text)?;
    Ok(text)
}

/// The addresses a hosts-format `text` gives `host` (case-insensitive), or `None` when it does
/// not list the name.
fn hosts_lookup(text: &str, host: &str) -> Option<Vec<IpAddr>> {
    let host = host.strip_suffix('.').unwrap_or(host);
    let mut addrs: Vec<IpAddr> = text
        .lines()
        .filter_map(|line| {
            let mut words = line.split('#').next()?.split_whitespace();
            let ip: IpAddr = words.next()?.parse().ok()?;
            words.any(|w| w.eq_ignore_ascii_case(host)).then_some(ip)
        })
        .collect();
    if addrs.is_empty() {
        return None;
    }
    addrs.sort();
    addrs.dedup();
    Some(addrs)
}

/// How often the refresher looks for due names; bounds how late a refresh starts.
const SCAN_PERIOD: Duration = Duration::from_millis(50);

/// Re-resolves every pool's names when due, until `shutdown` changes. `pools()` and
/// `resolver()` are asked at each scan, so reloads take effect at once.
pub async fn run(
    pools: impl Fn() -> Vec<Arc<Pool>>,
    resolver: impl Fn() -> Arc<Resolver>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let mut tick = tokio::time::interval(SCAN_PERIOD);
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            _ = shutdown.changed() => return,
        }
        let now = now_ms();
        for pool in pools() {
            for name in pool.due_dns_names(now) {
                let pool = pool.clone();
                let resolver = resolver();
                tokio::spawn(async move {
                    let answer = resolver.lookup_async(name.host.clone()).await;
                    pool.dns_answer(&name, answer);
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_are_checked() {
        for ok in ["localhost", "api.internal", "a-b.example.com.", "svc_1.ns"] {
            assert!(DnsName::valid_host(ok), "{ok}");
        }
        for bad in [
            "",
            "-a.b",
            "a..b",
            "10.0.0.300",
            "a b",
            "x:y",
            &"a".repeat(64),
        ] {
            assert!(!DnsName::valid_host(bad), "{bad}");
        }
    }

    #[test]
    fn the_hosts_file_answers_the_names_it_lists() {
        let text = "# test names\n127.0.0.2 api.test api\n::1 api.test\n127.0.0.3 API.TEST # again\n10.0.0.1 other\nnot-an-ip api.test\n";
        let got = hosts_lookup(text, "api.test").unwrap();
        let want: Vec<IpAddr> = vec![
            "127.0.0.2".parse().unwrap(),
            "127.0.0.3".parse().unwrap(),
            "::1".parse().unwrap(),
        ];
        assert_eq!(got, want);
        assert_eq!(hosts_lookup(text, "api.test.").unwrap(), want);
        assert_eq!(hosts_lookup(text, "missing"), None);
    }

    #[test]
    fn the_system_resolver_answers_localhost_and_a_listed_name_wins() {
        let system = Resolver::default();
        let addrs = system.lookup("localhost").unwrap();
        assert!(addrs.iter().all(|a| a.is_loopback()), "{addrs:?}");
        let dir = std::env::temp_dir().join(format!("sluice-dns-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("hosts");
        std::fs::write(&file, "127.0.0.9 localhost\n").unwrap();
        let pinned = Resolver {
            hosts_file: Some(file.clone()),
        };
        assert_eq!(
            pinned.lookup("localhost").unwrap(),
            vec!["127.0.0.9".parse::<IpAddr>().unwrap()]
        );
        std::fs::remove_file(&file).unwrap();
        let e = pinned.lookup("localhost").unwrap_err();
        assert!(e.contains("cannot read the hosts file"), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_failed_refresh_keeps_the_last_good_answer() {
        let name = DnsName {
            host: "api.test".into(),
            port: 80,
            weight: 2,
            zone: "eu".into(),
            tags: vec![],
        };
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let refresh = Duration::from_secs(1);
        let mut s = DnsState::resolved(name, vec![a], refresh);
        assert!(!s.record(Err("timed out".into()), refresh));
        assert_eq!(s.addrs, vec![a]);
        assert_eq!(s.consecutive_failures, 1);
        assert_eq!(s.last_error.as_deref(), Some("timed out"));
        assert!(s.record(Ok(vec![a, b]), refresh));
        assert_eq!(s.consecutive_failures, 0);
        assert!(s.last_error.is_none());
        let specs: Vec<_> = s.specs().collect();
        assert_eq!(specs[1].addr, "127.0.0.3:80".parse().unwrap());
        assert_eq!((specs[1].weight, specs[1].zone.as_str()), (2, "eu"));
        assert!(!s.record(Ok(vec![a, b]), refresh), "same answer, no change");
    }
}
