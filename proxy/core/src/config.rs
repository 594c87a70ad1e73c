//! The TOML configuration file: its schema, defaults and validation.
//!
//! Every error names the file, the line and column, what was found and what is expected, so an
//! operator can fix it without reading our code. Parsing never touches running state: a file is
//! fully validated before anything is swapped (see [`crate::runtime`]).

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;
use toml::Spanned;

/// A configuration problem, already phrased for the operator.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("{path}: cannot read the config file: {source}")]
    Read {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or does not match the schema.
    #[error("{path}:{line}:{column}: {message}")]
    Invalid {
        /// The file.
        path: String,
        /// 1-based line.
        line: usize,
        /// 1-based column.
        column: usize,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// The whole file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// `[server]`: the proxy listeners.
    #[serde(default)]
    pub server: ServerConfig,
    /// `[admin]`: the admin API listener.
    #[serde(default)]
    pub admin: AdminConfig,
    /// `[[pool]]` entries.
    #[serde(default)]
    pub pool: Vec<PoolConfig>,
    /// `[[route]]` entries, matched most specific first.
    #[serde(default)]
    pub route: Vec<Spanned<RouteConfig>>,
    /// `[cluster]`: join a gossip cluster; pools then also take members from it.
    #[serde(default)]
    pub cluster: Option<Spanned<crate::cluster_config::ClusterSection>>,
    /// `[dns]`: how backend host names are resolved.
    #[serde(default)]
    pub dns: DnsConfig,
    /// Directory relative plugin paths are resolved against (the config file's directory).
    #[serde(skip)]
    pub base_dir: PathBuf,
    /// The file this was read from, for messages.
    #[serde(skip)]
    pub source_name: String,
    #[serde(skip)]
    source_text: String,
    /// Every proxy listener with its settings, resolved at load.
    #[serde(skip)]
    listeners: Vec<crate::listener::Listener>,
}

/// `[server]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ServerConfig {
    /// Plain-text listen addresses (HTTP/1.1, and HTTP/2 prior knowledge when `h2c` is set).
    /// Absent: `127.0.0.1:8080`, unless `[[server.listener]]` entries are given. Read the resolved
    /// set from [`Config::listeners`].
    #[serde(default)]
    pub listen: Option<Vec<Spanned<String>>>,
    /// Worker threads for the proxy.
    #[serde(default = "default_threads")]
    pub threads: usize,
    /// The zone this proxy runs in (used by zone-aware balancing).
    #[serde(default)]
    pub zone: Option<String>,
    /// Accept HTTP/2 over plain text (prior knowledge).
    #[serde(default)]
    pub h2c: bool,
    /// TLS termination.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    /// Which engine serves HTTP/1.x downstream connections (HTTP/2 always takes pingora's).
    #[serde(default)]
    pub http1: Http1Engine,
    /// What a client may take: timeouts, sizes, connections.
    #[serde(default)]
    pub limits: ClientLimits,
    /// Forwarding headers and whose to believe.
    #[serde(default)]
    pub forwarding: crate::forwarding::ForwardingConfig,
    /// One line per request.
    #[serde(default)]
    pub access_log: crate::access_log::AccessLogConfig,
    /// On SIGTERM/SIGINT (and after handing the listeners over in an upgrade), how long
    /// requests in flight may take to finish before the process exits anyway.
    #[serde(default = "default_shutdown_grace", with = "duration")]
    pub shutdown_grace: Duration,
    /// The Unix socket over which an old process hands its listeners to a new one started
    /// with `sluice run --upgrade`.
    #[serde(default = "default_upgrade_sock")]
    pub upgrade_sock: PathBuf,
    /// `[[server.listener]]`: listeners with their own TLS, limits or access log.
    #[serde(default)]
    pub listener: Vec<crate::listener::ListenerConfig>,
}

/// `[server.limits]`: what one client may take, on every listener. Defaults follow nginx's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClientLimits {
    /// From a request's first byte (a new connection: from its accept) to the end of its head.
    #[serde(default = "default_header_timeout", with = "duration")]
    pub header_timeout: Duration,
    /// How long a kept-alive connection may wait idle for its next request.
    #[serde(default = "default_keepalive_timeout", with = "duration")]
    pub keepalive_timeout: Duration,
    /// Longest wait between two reads of a request body.
    #[serde(default = "default_body_timeout", with = "duration")]
    pub body_timeout: Duration,
    /// Largest request head in bytes; a larger one is answered 431.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: u64,
    /// Largest request body in bytes, answered 413 above; 0 means no limit.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Client connections open at once; one more is closed as soon as it is accepted.
    #[serde(default = "default_max_connections")]
    pub max_connections: u64,
    /// Per-client-IP token bucket (429 with Retry-After when empty); off when absent.
    #[serde(default)]
    pub rate_limit: Option<crate::rate_limit::RateLimitConfig>,
}

impl Default for ClientLimits {
    fn default() -> Self {
        ClientLimits {
            header_timeout: default_header_timeout(),
            keepalive_timeout: default_keepalive_timeout(),
            body_timeout: default_body_timeout(),
            max_header_bytes: default_max_header_bytes(),
            max_body_bytes: default_max_body_bytes(),
            max_connections: default_max_connections(),
            rate_limit: None,
        }
    }
}

impl ClientLimits {
    /// Every value within its range, or a message starting with `section` (the table it is in).
    pub fn check(&self, section: &str) -> Result<(), String> {
        for (what, d) in [
            ("header_timeout", self.header_timeout),
            ("keepalive_timeout", self.keepalive_timeout),
            ("body_timeout", self.body_timeout),
        ] {
            duration_in_range(
                d,
                Duration::from_millis(100)..=Duration::from_secs(3600),
                what,
            )
            .map_err(|m| format!("{section} {m}"))?;
        }
        for (what, v, range) in [
            (
                "max_header_bytes",
                self.max_header_bytes,
                1024..=1024 * 1024,
            ),
            ("max_body_bytes", self.max_body_bytes, 0..=1 << 40),
            ("max_connections", self.max_connections, 1..=1_000_000),
        ] {
            in_range(v, range, what).map_err(|m| format!("{section} {m}"))?;
        }
        if let Some(r) = &self.rate_limit {
            r.validate()?;
        }
        Ok(())
    }
}

fn default_header_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_keepalive_timeout() -> Duration {
    Duration::from_secs(75)
}
fn default_body_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_header_bytes() -> u64 {
    64 * 1024
}
fn default_max_body_bytes() -> u64 {
    100 * 1024 * 1024
}
fn default_max_connections() -> u64 {
    10_000
}

/// `[server] http1`: the engine for HTTP/1.x downstream connections.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Http1Engine {
    /// sluice's lean forwarder: heads forwarded as parsed, one task per connection, pooled
    /// upstream connections per worker thread.
    #[default]
    Lean,
    /// pingora-proxy's general HTTP/1 cycle (the path HTTP/2 takes).
    Pingora,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: None,
            threads: default_threads(),
            zone: None,
            h2c: false,
            tls: None,
            http1: Http1Engine::Lean,
            limits: ClientLimits::default(),
            forwarding: crate::forwarding::ForwardingConfig::default(),
            access_log: crate::access_log::AccessLogConfig::default(),
            shutdown_grace: default_shutdown_grace(),
            upgrade_sock: default_upgrade_sock(),
            listener: Vec::new(),
        }
    }
}

/// `[server.tls]`: TLS listeners terminating HTTP/1.1 and HTTP/2 (ALPN), the certificates every
/// TLS listener serves (chosen by SNI), and the default client-certificate check.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// TLS listen addresses.
    #[serde(default)]
    pub listen: Vec<Spanned<String>>,
    /// PEM certificate chain (with `key`: the first certificate).
    #[serde(default)]
    pub cert: Option<PathBuf>,
    /// PEM private key of `cert`.
    #[serde(default)]
    pub key: Option<PathBuf>,
    /// `[[server.tls.certificate]]`: more certificates.
    #[serde(default)]
    pub certificate: Vec<Spanned<crate::listener::CertificateConfig>>,
    /// PEM file of the CAs that sign client certificates (mTLS) on every TLS listener.
    #[serde(default)]
    pub client_ca: Option<PathBuf>,
    /// Whether a client certificate is required (default when `client_ca` is set) or optional.
    #[serde(default)]
    pub client_auth: Option<crate::listener::ClientAuth>,
}

/// `[dns]`: how backend host names are resolved (see [`crate::dns`]).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// A hosts-format file whose names are answered before the system resolver is asked,
    /// re-read at every resolution (relative paths are relative to the config file).
    #[serde(default)]
    pub hosts_file: Option<Spanned<String>>,
}

/// `[admin]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Listen address of the admin API and dashboard.
    #[serde(default = "default_admin_listen_spanned")]
    pub listen: Spanned<String>,
    /// Bearer token required by mutating routes; none means open (bind to loopback then).
    #[serde(default)]
    pub token: Option<String>,
    /// A file holding the token (its first line, trimmed), so the config itself can be
    /// world-readable; read when the config is loaded.
    #[serde(default)]
    pub token_file: Option<Spanned<String>>,
    /// Require the token on read routes too (`/api/...`, `/metrics`); `/healthz`, `/readyz`
    /// and the dashboard page itself stay open for probes.
    #[serde(default)]
    pub protect_reads: bool,
    /// Allow an admin listener on a non-loopback address without a token. Anyone who can reach
    /// it can then reload the config and swap plugins, so it must be asked for explicitly.
    #[serde(default)]
    pub allow_unauthenticated: bool,
    /// Give every backend its own request-path histograms (a series set per backend, so off
    /// by default to bound the number of series).
    #[serde(default)]
    pub metrics_per_backend: bool,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: Spanned::new(0..0, default_admin_listen()),
            token: None,
            token_file: None,
            protect_reads: false,
            allow_unauthenticated: false,
            metrics_per_backend: false,
        }
    }
}

/// `[[pool]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PoolConfig {
    /// The pool's name, referred to by routes and the admin API.
    pub name: Spanned<String>,
    /// The strategy plugin.
    #[serde(default = "default_strategy")]
    pub strategy: Spanned<PluginRef>,
    /// The health-check plugin and its schedule.
    #[serde(default)]
    pub health: Option<Spanned<HealthConfig>>,
    /// Static backends: addresses, or host names resolved through DNS.
    #[serde(default)]
    pub backends: Vec<Spanned<BackendEntry>>,
    /// How often backend host names are resolved again.
    #[serde(default = "default_dns_refresh", with = "duration")]
    pub dns_refresh: Duration,
    /// How many more backends to try after a failed connect (0 = no retry).
    #[serde(default = "default_retries")]
    pub retries: u32,
    /// Upstream TCP connect timeout.
    #[serde(default = "default_connect_timeout", with = "duration")]
    pub connect_timeout: Duration,
    /// Upstream read timeout (time between bytes of the response).
    #[serde(default = "default_read_timeout", with = "duration")]
    pub read_timeout: Duration,
    /// How long an idle upstream keep-alive connection is kept.
    #[serde(default = "default_idle_timeout", with = "duration")]
    pub idle_timeout: Duration,
    /// Which failures are retried: `"connect-failure"` (always safe), `"error"` (no answer;
    /// idempotent methods) and `"5xx"`.
    #[serde(default = "default_retry_on")]
    pub retry_on: Vec<RetryOn>,
    /// Retry non-idempotent methods (POST, PATCH) on 5xx too. Off by default: the backend may
    /// already have acted on the request.
    #[serde(default)]
    pub retry_non_idempotent: bool,
    /// Passive outlier detection.
    #[serde(default)]
    pub outlier: OutlierConfig,
    /// Ramp a new or re-admitted backend's weight over this window ("0s" = off).
    #[serde(default = "zero_duration", with = "duration")]
    pub slow_start: Duration,
    /// Percent of routable members below which the pool balances over all members (0 = never).
    #[serde(default = "default_panic_threshold")]
    pub panic_threshold: u32,
    /// Prefer backends in the proxy's `[server] zone` while enough of them are routable and not overloaded.
    #[serde(default = "default_true")]
    pub zone_aware: bool,
    /// In-flight requests per weight unit above which the local zone spills over to others.
    #[serde(default = "default_zone_spill")]
    pub zone_spill_inflight: u32,
    /// How sluice speaks to the backends: HTTP/1.1, HTTP/2 over TLS, or HTTP/2 in plain text.
    #[serde(default)]
    pub protocol: UpstreamProtocol,
    /// `[pool.tls]`: TLS to the backends (HTTPS).
    #[serde(default)]
    pub tls: Option<Spanned<UpstreamTlsConfig>>,
    /// `[[pool.spawn]]`: backends sluice starts and keeps running itself.
    #[serde(default)]
    pub spawn: Vec<Spanned<crate::spawn::SpawnConfig>>,
}

/// `[[pool]] protocol`: what is spoken to the backends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamProtocol {
    /// HTTP/1.1, over TLS when the pool has a `[pool.tls]` table.
    #[default]
    Http1,
    /// HTTP/2 over TLS (ALPN `h2`); `[pool.tls]` is optional and defaults apply.
    H2,
    /// HTTP/2 over plain TCP with prior knowledge (gRPC backends without TLS).
    H2c,
}

impl UpstreamProtocol {
    /// True for HTTP/2, which only the pingora-proxy path speaks to backends.
    pub fn is_h2(self) -> bool {
        self != UpstreamProtocol::Http1
    }
}

/// `[pool.tls]`: how sluice connects to backends over TLS.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// The name sent as SNI and checked against the backend's certificate. None: no SNI, and the
    /// certificate is checked against the backend's IP address.
    #[serde(default)]
    pub sni: Option<String>,
    /// PEM file of the CA certificates to trust; none means the system's roots.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// PEM certificate chain presented to backends that ask for one.
    #[serde(default)]
    pub client_cert: Option<PathBuf>,
    /// PEM private key of `client_cert`.
    #[serde(default)]
    pub client_key: Option<PathBuf>,
    /// Check the backend's certificate (default true). Only an explicit `verify = false` turns it off.
    #[serde(default)]
    pub verify: Option<bool>,
}

/// `outlier = { ... }`: passive outlier detection from real traffic.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OutlierConfig {
    /// Off when false.
    #[serde(default = "default_true")]
    pub enabled: bool,
    /// Consecutive failures (connect errors, 5xx) that eject a backend.
    #[serde(default = "default_consecutive")]
    pub consecutive_failures: u32,
    /// First ejection time; the n-th lasts n times this.
    #[serde(default = "default_base_ejection", with = "duration")]
    pub base_ejection_time: Duration,
    /// Longest ejection.
    #[serde(default = "default_max_ejection", with = "duration")]
    pub max_ejection_time: Duration,
    /// Most of the pool (percent) ejected at once.
    #[serde(default = "default_max_ejected_percent")]
    pub max_ejected_percent: u32,
}

impl Default for OutlierConfig {
    fn default() -> Self {
        OutlierConfig {
            enabled: true,
            consecutive_failures: default_consecutive(),
            base_ejection_time: default_base_ejection(),
            max_ejection_time: default_max_ejection(),
            max_ejected_percent: default_max_ejected_percent(),
        }
    }
}

fn default_true() -> bool {
    true
}
fn default_dns_refresh() -> Duration {
    Duration::from_secs(30)
}
fn default_consecutive() -> u32 {
    5
}
fn default_base_ejection() -> Duration {
    Duration::from_secs(30)
}
fn default_max_ejection() -> Duration {
    Duration::from_secs(300)
}
fn default_max_ejected_percent() -> u32 {
    50
}
fn default_retry_on() -> Vec<RetryOn> {
    vec![RetryOn::ConnectFailure, RetryOn::Error]
}

/// A failure a pool retries on another backend (`retry_on`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum RetryOn {
    /// The connection could not be made: the backend never saw the request.
    #[serde(rename = "connect-failure")]
    ConnectFailure,
    /// The backend failed before answering: reset, closed or timed out after the request was
    /// sent (idempotent methods only: the backend may have acted on it).
    #[serde(rename = "error")]
    Error,
    /// The backend answered 5xx (idempotent methods only, unless `retry_non_idempotent`).
    #[serde(rename = "5xx")]
    Status5xx,
}

/// A backend's health before its first check (`initial`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum InitialHealth {
    /// Not routed until it passes a check.
    #[default]
    Unhealthy,
    /// Routed at once.
    Healthy,
}
fn zero_duration() -> Duration {
    Duration::ZERO
}
fn default_panic_threshold() -> u32 {
    50
}
fn default_zone_spill() -> u32 {
    64
}

/// A plugin reference: `"builtin:NAME"`, a path, or `{ plugin = ..., config = { ... } }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PluginRef {
    /// Just the plugin.
    Name(String),
    /// The plugin with its own settings.
    WithConfig {
        /// `builtin:NAME` or a path to a `.wasm` file.
        plugin: String,
        /// Handed to the plugin's init as JSON.
        #[serde(default)]
        config: toml::Table,
    },
}

impl PluginRef {
    /// The `builtin:NAME` or path.
    pub fn source(&self) -> &str {
        match self {
            PluginRef::Name(s) => s,
            PluginRef::WithConfig { plugin, .. } => plugin,
        }
    }
    /// The plugin's settings as the JSON handed to its init.
    pub fn config_json(&self) -> Vec<u8> {
        match self {
            PluginRef::Name(_) => b"{}".to_vec(),
            PluginRef::WithConfig { config, .. } => {
                serde_json::to_vec(config).unwrap_or_else(|_| b"{}".to_vec())
            }
        }
    }
}

/// `health = { plugin = ..., interval = "2s", ... }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// `builtin:NAME` or a path.
    pub plugin: String,
    /// Time between probes of one backend.
    #[serde(default = "default_interval", with = "duration")]
    pub interval: Duration,
    /// Probe timeout.
    #[serde(default = "default_health_timeout", with = "duration")]
    pub timeout: Duration,
    /// Passes needed to become healthy.
    #[serde(default = "default_rise")]
    pub rise: u32,
    /// Failures needed to become unhealthy.
    #[serde(default = "default_fall")]
    pub fall: u32,
    /// Random spread added to each interval (± this), so probes of many proxies do not align.
    #[serde(default, with = "opt_duration")]
    pub jitter: Option<Duration>,
    /// Interval while the pool has no traffic (default: 5 × interval).
    #[serde(default, with = "opt_duration")]
    pub idle_interval: Option<Duration>,
    /// State of a backend before its first check: "unhealthy" (not routed until it passes once) or "healthy".
    #[serde(default)]
    pub initial: InitialHealth,
    /// Probes of this pool running at once.
    #[serde(default = "default_health_concurrency")]
    pub concurrency: u32,
    /// The plugin's own settings.
    #[serde(default)]
    pub config: toml::Table,
}

impl HealthConfig {
    /// The plugin's settings as the JSON handed to its init.
    pub fn config_json(&self) -> Vec<u8> {
        serde_json::to_vec(&self.config).unwrap_or_else(|_| b"{}".to_vec())
    }
}

fn default_health_concurrency() -> u32 {
    16
}

/// Optional durations, written as strings.
mod opt_duration {
    use serde::Deserializer;
    use std::time::Duration;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        super::duration::deserialize(d).map(Some)
    }
}

/// A static backend: `"127.0.0.1:9001"` or `{ addr = ..., weight = 2, zone = "eu", tags = [...] }`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum BackendEntry {
    /// Just the address.
    Addr(String),
    /// Address with attributes.
    Full {
        /// `IP:port`, or `host:port` resolved through DNS (never on the request path).
        addr: String,
        /// Relative weight, at least 1.
        #[serde(default = "default_weight")]
        weight: u32,
        /// Zone of the backend.
        #[serde(default)]
        zone: Option<String>,
        /// Free-form tags strategies can select on (e.g. `canary`).
        #[serde(default)]
        tags: Vec<String>,
    },
}

/// A backend entry after validation: an address, or a host name every address of which
/// becomes a backend.
#[derive(Debug, Clone, PartialEq)]
pub enum BackendTarget {
    /// `IP:port`.
    Addr(BackendSpec),
    /// `host:port`.
    Name(crate::dns::DnsName),
}

/// A backend after validation (and resolution).
#[derive(Debug, Clone, PartialEq)]
pub struct BackendSpec {
    /// Resolved address.
    pub addr: SocketAddr,
    /// Weight >= 1.
    pub weight: u32,
    /// Zone, "" when none.
    pub zone: String,
    /// Tags.
    pub tags: Vec<String>,
}

impl BackendSpec {
    /// A backend at `127.0.0.1:port` with weight 1, no zone and no tags (simulations, benches).
    pub fn loopback(port: u16) -> BackendSpec {
        BackendSpec {
            addr: std::net::SocketAddr::from(([127, 0, 0, 1], port)),
            weight: 1,
            zone: String::new(),
            tags: Vec::new(),
        }
    }
}

/// `[[route]]`: requests that match go to `pool`, or are answered by a redirect or a fixed
/// response; header and path rules edit what is forwarded (docs/config.md, "[[route]]").
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Exact host (without port), case-insensitive; none matches any host.
    #[serde(default)]
    pub host: Option<String>,
    /// Path prefix; the longest matching prefix wins.
    #[serde(default = "default_prefix")]
    pub path_prefix: String,
    /// The path must also match this regex.
    #[serde(default)]
    pub path_regex: Option<Spanned<String>>,
    /// Match only plain-text (`"http"`) or TLS (`"https"`) connections.
    #[serde(default)]
    pub scheme: Option<Spanned<String>>,
    /// The method must be one of these.
    #[serde(default)]
    pub methods: Option<Spanned<Vec<String>>>,
    /// Header conditions: a value (exact), `true` (present) or `false` (absent).
    #[serde(default)]
    pub headers:
        Option<Spanned<std::collections::BTreeMap<String, crate::route_rules::HeaderMatchConfig>>>,
    /// The pool to use (exactly one of `pool`, `redirect`, `respond`).
    #[serde(default)]
    pub pool: Option<Spanned<String>>,
    /// Answer with a redirect.
    #[serde(default)]
    pub redirect: Option<Spanned<crate::route_rules::RedirectConfig>>,
    /// Answer with a fixed response.
    #[serde(default)]
    pub respond: Option<Spanned<crate::route_rules::RespondConfig>>,
    /// Remove this prefix from the path sent upstream.
    #[serde(default)]
    pub strip_prefix: Option<Spanned<String>>,
    /// Replace a path prefix in the path sent upstream.
    #[serde(default)]
    pub replace_prefix: Option<Spanned<crate::route_rules::ReplacePrefixConfig>>,
    /// Edits of the request head sent upstream.
    #[serde(default)]
    pub request_headers: Option<Spanned<crate::route_rules::HeaderEditsConfig>>,
    /// Edits of the response head sent downstream.
    #[serde(default)]
    pub response_headers: Option<Spanned<crate::route_rules::HeaderEditsConfig>>,
    /// Access log format for this route's requests: `off`, `common` or `json` (default: the
    /// `[server.access_log]` format).
    #[serde(default)]
    pub access_log: Option<crate::access_log::LogFormat>,
}

impl RouteConfig {
    /// The parts [`crate::route_rules`] compiles; `span` is the route's own.
    pub fn rules_config(
        &self,
        span: std::ops::Range<usize>,
    ) -> crate::route_rules::RulesConfig<'_> {
        crate::route_rules::RulesConfig {
            span,
            path_regex: self.path_regex.as_ref(),
            scheme: self.scheme.as_ref(),
            methods: self.methods.as_ref(),
            headers: self.headers.as_ref(),
            pool: self.pool.as_ref(),
            redirect: self.redirect.as_ref(),
            respond: self.respond.as_ref(),
            strip_prefix: self.strip_prefix.as_ref(),
            replace_prefix: self.replace_prefix.as_ref(),
            request_headers: self.request_headers.as_ref(),
            response_headers: self.response_headers.as_ref(),
            access_log: self.access_log,
        }
    }
}

pub(crate) fn default_listen() -> Vec<Spanned<String>> {
    vec![Spanned::new(0..0, "127.0.0.1:8080".to_string())]
}
fn default_threads() -> usize {
    std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_upgrade_sock() -> PathBuf {
    PathBuf::from("/tmp/sluice-upgrade.sock")
}
fn default_admin_listen() -> String {
    "127.0.0.1:9900".to_string()
}
fn default_admin_listen_spanned() -> Spanned<String> {
    Spanned::new(0..0, default_admin_listen())
}
fn default_strategy() -> Spanned<PluginRef> {
    Spanned::new(0..0, PluginRef::Name("builtin:round-robin".into()))
}
fn default_retries() -> u32 {
    2
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_read_timeout() -> Duration {
    Duration::from_secs(30)
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_interval() -> Duration {
    Duration::from_secs(2)
}
fn default_health_timeout() -> Duration {
    Duration::from_secs(1)
}
fn default_rise() -> u32 {
    2
}
fn default_fall() -> u32 {
    3
}
fn default_weight() -> u32 {
    1
}
fn default_prefix() -> String {
    "/".into()
}

/// Durations are written as strings: `"200ms"`, `"2s"`, `"1m 30s"`. Also used by the agent's file.
pub mod duration {
    use serde::{Deserialize, Deserializer};
    use std::time::Duration;
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_duration(&s).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration \"{s}\" ({e}); write it like \"200ms\", \"2s\" or \"1m\""
            ))
        })
    }
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
        Config::parse(&text, &path.display().to_string(), &base)
    }

    /// Parses and validates config text. `name` is used in messages, `base_dir` for relative paths.
    pub fn parse(text: &str, name: &str, base_dir: &Path) -> Result<Config, ConfigError> {
        let mut cfg: Config = parse_toml(text, name)?;
        cfg.base_dir = base_dir.to_path_buf();
        cfg.source_name = name.to_string();
        cfg.source_text = text.to_string();
        cfg.read_token_file()?;
        cfg.listeners = cfg.validate()?;
        Ok(cfg)
    }

    /// Whether the access log's writer must run: `[server.access_log]` logs, or a route does.
    pub fn access_log_writer_needed(&self) -> bool {
        use crate::access_log::LogFormat;
        self.server.access_log.format != LogFormat::Off
            || self
                .route
                .iter()
                .any(|r| r.get_ref().access_log.is_some_and(|f| f != LogFormat::Off))
    }

    /// Every proxy listener (plain, `[server.tls] listen`, `[[server.listener]]`) with its
    /// resolved TLS, limits and access log settings.
    pub fn listeners(&self) -> &[crate::listener::Listener] {
        &self.listeners
    }

    /// The text the config was parsed from.
    pub(crate) fn source_text(&self) -> &str {
        &self.source_text
    }

    /// An error located at `span` of this file.
    pub fn error_at(
        &self,
        span: std::ops::Range<usize>,
        message: impl Into<String>,
    ) -> ConfigError {
        let (line, column) = line_col(&self.source_text, span.start);
        ConfigError::Invalid {
            path: self.source_name.clone(),
            line,
            column,
            message: message.into(),
        }
    }

    /// Reads `[admin] token_file` into `[admin] token`.
    fn read_token_file(&mut self) -> Result<(), ConfigError> {
        use std::io::Read;
        let Some(file) = self.admin.token_file.clone() else {
            return Ok(());
        };
        let at = |m: String| self.error_at(file.span(), m);
        if self.admin.token.is_some() {
            return Err(at("[admin] has both token and token_file; keep one".into()));
        }
        let path = self.resolve_path(file.get_ref());
        let mut text = String::new();
        std::fs::File::open(&path)
            .and_then(|f| f.take(4096).read_to_string(&mut text))
            .map_err(|e| {
                at(format!(
                    "[admin] token_file {}: {e}; create it with e.g. `openssl rand -hex 32 > {}` (readable by sluice only)",
                    path.display(),
                    path.display()
                ))
            })?;
        let token = text.lines().next().unwrap_or("").trim();
        if token.is_empty() {
            return Err(at(format!("[admin] token_file {} has no token on its first line; put a long random string there (e.g. `openssl rand -hex 32`)", path.display())));
        }
        self.admin.token = Some(token.to_string());
        Ok(())
    }

    /// Checks the whole file; returns the resolved listeners.
    fn validate(&self) -> Result<Vec<crate::listener::Listener>, ConfigError> {
        if self.source_text.trim().is_empty() {
            return Err(self.error_at(0..0, "the file is empty; a proxy needs at least a [[pool]] and a [[route]] (docs/config.md has a minimal example)"));
        }
        in_range(
            self.server.threads as u64,
            1..=MAX_THREADS,
            "[server] threads",
        )
        .map_err(|m| self.error_at(0..0, m))?;
        duration_in_range(
            self.server.shutdown_grace,
            Duration::ZERO..=Duration::from_secs(3600),
            "[server] shutdown_grace",
        )
        .map_err(|m| self.error_at(0..0, m))?;
        self.server
            .limits
            .check("[server.limits]")
            .map_err(|m| self.error_at(0..0, m))?;
        self.server
            .forwarding
            .build()
            .map_err(|m| self.error_at(0..0, m))?;
        let admin = parse_listen(self.admin.listen.get_ref())
            .map_err(|m| self.error_at(self.admin.listen.span(), m))?;
        match self.admin.token.as_deref() {
            Some("") => return Err(self.error_at(self.admin.listen.span(), "[admin] token is empty; give a long random string (e.g. `openssl rand -hex 32`) or remove the key")),
            None if !admin.ip().is_loopback() && !self.admin.allow_unauthenticated => {
                return Err(self.error_at(self.admin.listen.span(), format!("[admin] listen = \"{admin}\" is not a loopback address and [admin] has no token, so anyone who reaches it could reload the config and swap plugins; set [admin] token (or listen on 127.0.0.1), or write allow_unauthenticated = true to accept that")));
            }
            _ => {}
        }
        if self.admin.protect_reads && self.admin.token.is_none() {
            return Err(self.error_at(
                self.admin.listen.span(),
                "[admin] protect_reads = true needs [admin] token; set a token or remove protect_reads",
            ));
        }
        let listeners = self.resolve_listeners()?;
        if let Some(c) = &self.cluster {
            c.get_ref()
                .to_config(&self.base_dir)
                .map_err(|m| self.error_at(c.span(), m))?;
        }
        if let Some(f) = &self.dns.hosts_file {
            let path = self.resolve_path(f.get_ref());
            if !path.is_file() {
                return Err(self.error_at(f.span(), format!("[dns] hosts_file \"{}\" does not exist; give the path of a hosts-format file (relative paths are relative to the config file) or remove the key", path.display())));
            }
        }
        let mut names = HashSet::new();
        let mut spawned = Vec::new();
        for pool in &self.pool {
            let name = pool.name.get_ref();
            if name.is_empty()
                || !name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            {
                return Err(self.error_at(
                    pool.name.span(),
                    format!("pool name \"{name}\" is invalid; use letters, digits, '-' and '_'"),
                ));
            }
            if !names.insert(name.as_str()) {
                return Err(self.error_at(
                    pool.name.span(),
                    format!("pool \"{name}\" is defined twice"),
                ));
            }
            let mut addrs = HashSet::new();
            let mut hosts = HashSet::new();
            for b in &pool.backends {
                let target = b
                    .get_ref()
                    .target()
                    .map_err(|m| self.error_at(b.span(), format!("pool \"{name}\": {m}")))?;
                let twice = match &target {
                    BackendTarget::Addr(spec) => {
                        (!addrs.insert(spec.addr)).then(|| spec.addr.to_string())
                    }
                    BackendTarget::Name(n) => (!hosts.insert(n.label())).then(|| n.label()),
                };
                if let Some(entry) = twice {
                    return Err(self.error_at(b.span(), format!("pool \"{name}\": backend {entry} is listed twice; list each address once and use weight to send it more traffic")));
                }
            }
            let at = |m: String| self.error_at(pool.name.span(), format!("pool \"{name}\": {m}"));
            in_range(u64::from(pool.retries), 0..=MAX_RETRIES, "retries").map_err(at)?;
            for (what, d) in [
                ("connect_timeout", pool.connect_timeout),
                ("read_timeout", pool.read_timeout),
                ("idle_timeout", pool.idle_timeout),
                (
                    "outlier.base_ejection_time",
                    pool.outlier.base_ejection_time,
                ),
                ("outlier.max_ejection_time", pool.outlier.max_ejection_time),
            ] {
                duration_in_range(d, Duration::from_millis(1)..=MAX_DURATION, what).map_err(at)?;
            }
            duration_in_range(pool.slow_start, Duration::ZERO..=MAX_DURATION, "slow_start")
                .map_err(at)?;
            duration_in_range(
                pool.dns_refresh,
                Duration::from_millis(100)..=MAX_DURATION,
                "dns_refresh",
            )
            .map_err(at)?;
            if pool.outlier.max_ejection_time < pool.outlier.base_ejection_time {
                return Err(at(
                    "outlier.max_ejection_time must be at least base_ejection_time".into(),
                ));
            }
            in_range(
                u64::from(pool.zone_spill_inflight),
                1..=1_000_000,
                "zone_spill_inflight",
            )
            .map_err(at)?;
            if pool.panic_threshold > 100 || pool.outlier.max_ejected_percent > 100 {
                return Err(self.error_at(pool.name.span(), format!("pool \"{name}\": panic_threshold and outlier.max_ejected_percent are percentages (0-100)")));
            }
            if pool.outlier.consecutive_failures == 0 {
                return Err(self.error_at(pool.name.span(), format!("pool \"{name}\": outlier.consecutive_failures must be at least 1 (use enabled = false to turn detection off)")));
            }
            self.upstream_ok(pool)?;
            self.spawn_ok(pool, &admin, &listeners, &mut spawned)?;
            self.plugin_source_ok(pool.strategy.get_ref().source(), pool.strategy.span(), name)?;
            if let Some(h) = &pool.health {
                self.plugin_source_ok(&h.get_ref().plugin, h.span(), name)?;
                let hc = h.get_ref();
                let at =
                    |m: String| self.error_at(h.span(), format!("pool \"{name}\": health {m}"));
                for (what, d) in [
                    ("interval", Some(hc.interval)),
                    ("timeout", Some(hc.timeout)),
                    ("idle_interval", hc.idle_interval),
                ] {
                    if let Some(d) = d {
                        duration_in_range(d, Duration::from_millis(10)..=MAX_DURATION, what)
                            .map_err(at)?;
                    }
                }
                in_range(u64::from(hc.rise), 1..=1000, "rise").map_err(at)?;
                in_range(u64::from(hc.fall), 1..=1000, "fall").map_err(at)?;
                in_range(u64::from(hc.concurrency), 1..=10_000, "concurrency").map_err(at)?;
            }
        }
        for (i, spanned) in self.route.iter().enumerate() {
            let route = spanned.get_ref();
            let rules = route
                .rules_config(spanned.span())
                .compile()
                .map_err(|e| self.error_at(e.span, format!("route {}: {}", i + 1, e.message)))?;
            if let crate::route_rules::Action::Pool(pool) = &rules.action {
                if !names.contains(pool.as_str()) {
                    let known: Vec<_> = names.iter().copied().collect();
                    let span = route.pool.as_ref().map_or(spanned.span(), Spanned::span);
                    return Err(self.error_at(
                        span,
                        format!(
                            "route {} refers to pool \"{pool}\", which is not defined; define a [[pool]] with name = \"{pool}\" (defined pools: {})",
                            i + 1,
                            if known.is_empty() { "none".to_string() } else { known.join(", ") }
                        ),
                    ));
                }
            }
            if !route.path_prefix.starts_with('/') {
                return Err(self.error_at(
                    spanned.span(),
                    format!("route {}: path_prefix must start with '/'", i + 1),
                ));
            }
        }
        // A config whose routes only redirect or respond needs no pool (an unknown pool was
        // refused above).
        if self.route.is_empty() {
            return Err(self.error_at(0..0, "the config defines no [[pool]] or no [[route]], so every request would fail; add both (docs/config.md has a minimal example)"));
        }
        Ok(listeners)
    }

    /// The pool's spawn tables are valid, and no instance would listen where another instance, a
    /// listener or one of the pool's backends is. `spawned` collects the tables seen so far.
    fn spawn_ok(
        &self,
        pool: &PoolConfig,
        admin: &SocketAddr,
        listeners: &[crate::listener::Listener],
        spawned: &mut Vec<(crate::spawn::SpawnSpec, std::ops::Range<usize>)>,
    ) -> Result<(), ConfigError> {
        let name = pool.name.get_ref();
        let first = spawned.len();
        for s in &pool.spawn {
            let at = |m: String| self.error_at(s.span(), format!("pool \"{name}\": {m}"));
            let spec =
                crate::spawn::SpawnSpec::new(name, s.get_ref(), &self.base_dir).map_err(at)?;
            let prefix = format!("spawn \"{}\"", spec.name);
            if spawned[first..].iter().any(|(o, _)| o.name == spec.name) {
                return Err(at(format!("{prefix}: two spawn tables of this pool are named \"{}\"; give each a different name", spec.name)));
            }
            if let Some((other, span)) = spawned.iter().find(|(o, _)| o.overlaps(&spec)) {
                let (line, _) = line_col(&self.source_text, span.start);
                return Err(at(format!(
                    "{prefix}: ports {}-{} on {} overlap those of spawn \"{}\" of pool \"{}\" (line {line}); give each its own ports",
                    spec.start_port, spec.start_port + spec.instances.max(1) - 1, spec.host, other.name, other.pool
                )));
            }
            let busy = listeners
                .iter()
                .map(|l| (l.addr, "a proxy listener"))
                .chain([(*admin, "the admin listener")]);
            for (addr, what) in busy {
                if spec.uses(addr) {
                    return Err(at(format!("{prefix}: an instance would listen on {addr}, which is {what}; change start_port")));
                }
            }
            if let Some(b) = Config::backends(pool)
                .iter()
                .find(|b| spec.addrs().any(|a| a == b.addr))
            {
                return Err(at(format!("{prefix}: an instance would listen on {}, which the pool also lists in backends; remove it from backends (the instance joins the pool by itself)", b.addr)));
            }
            spawned.push((spec, s.span()));
        }
        Ok(())
    }

    /// The validated spawn tables of a pool.
    pub fn spawn_specs(&self, pool: &PoolConfig) -> Vec<std::sync::Arc<crate::spawn::SpawnSpec>> {
        pool.spawn
            .iter()
            .filter_map(|s| {
                crate::spawn::SpawnSpec::new(pool.name.get_ref(), s.get_ref(), &self.base_dir).ok()
            })
            .map(std::sync::Arc::new)
            .collect()
    }

    /// `protocol` and `[pool.tls]` agree with each other (the files are read when the pool is
    /// built: [`crate::upstream_tls`]).
    fn upstream_ok(&self, pool: &PoolConfig) -> Result<(), ConfigError> {
        let name = pool.name.get_ref();
        let Some(tls) = &pool.tls else {
            return Ok(());
        };
        let at = |m: &str| self.error_at(tls.span(), format!("pool \"{name}\": [pool.tls] {m}"));
        let t = tls.get_ref();
        if pool.protocol == UpstreamProtocol::H2c {
            return Err(at("is set, but protocol = \"h2c\" is HTTP/2 without TLS; remove [pool.tls], or use protocol = \"h2\" for HTTP/2 over TLS"));
        }
        if t.client_cert.is_some() != t.client_key.is_some() {
            return Err(at("needs both client_cert and client_key (a PEM certificate chain and its private key), or neither"));
        }
        if t.verify == Some(false) && t.ca_file.is_some() {
            return Err(at("has ca_file and verify = false: with verify = false no certificate is checked, so ca_file would be ignored; remove one of them"));
        }
        if let Some(sni) = &t.sni {
            if rustls::pki_types::ServerName::try_from(sni.as_str()).is_err() {
                return Err(at(&format!("sni \"{sni}\" is not a host name; write a DNS name such as \"api.example.com\" (or leave it out to check the certificate against the backend's IP address)")));
            }
        }
        Ok(())
    }

    fn plugin_source_ok(
        &self,
        source: &str,
        span: std::ops::Range<usize>,
        pool: &str,
    ) -> Result<(), ConfigError> {
        if source.starts_with("builtin:") || source == crate::builtin::NATIVE_ROUND_ROBIN {
            return Ok(());
        }
        let path = self.resolve_path(source);
        if !path.is_file() {
            return Err(self.error_at(
                span,
                format!(
                    "pool \"{pool}\": plugin file \"{}\" does not exist; give a path to a .wasm file (relative paths are relative to the config file) or a built-in such as \"builtin:round-robin\"",
                    path.display()
                ),
            ));
        }
        Ok(())
    }

    /// Resolves a plugin path relative to the config file.
    pub fn resolve_path(&self, p: &str) -> PathBuf {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            self.base_dir.join(p)
        }
    }

    /// Validated backends of a pool given as addresses.
    pub fn backends(pool: &PoolConfig) -> Vec<BackendSpec> {
        pool.backends
            .iter()
            .filter_map(|b| match b.get_ref().target() {
                Ok(BackendTarget::Addr(spec)) => Some(spec),
                _ => None,
            })
            .collect()
    }

    /// Validated backends of a pool given as host names, with where each is written.
    pub fn dns_names(pool: &PoolConfig) -> Vec<(crate::dns::DnsName, std::ops::Range<usize>)> {
        pool.backends
            .iter()
            .filter_map(|b| match b.get_ref().target() {
                Ok(BackendTarget::Name(n)) => Some((n, b.span())),
                _ => None,
            })
            .collect()
    }

    /// The resolver `[dns]` describes.
    pub fn resolver(&self) -> crate::dns::Resolver {
        crate::dns::Resolver {
            hosts_file: self
                .dns
                .hosts_file
                .as_ref()
                .map(|f| self.resolve_path(f.get_ref())),
        }
    }
}

impl BackendEntry {
    /// Validates the entry: an address, or a host name to resolve.
    pub fn target(&self) -> Result<BackendTarget, String> {
        let (addr, weight, zone, tags) = match self {
            BackendEntry::Addr(a) => (a, 1, None, Vec::new()),
            BackendEntry::Full {
                addr,
                weight,
                zone,
                tags,
            } => (addr, *weight, zone.clone(), tags.clone()),
        };
        let malformed = || {
            format!("backend address \"{addr}\" is not an IP:port or host:port; write it like \"127.0.0.1:9001\", \"[::1]:9001\" or \"api.internal:9001\"")
        };
        let (parsed, host) = match addr.parse::<SocketAddr>() {
            Ok(a) => (a, None),
            Err(_) => {
                let (host, port) = addr.rsplit_once(':').ok_or_else(malformed)?;
                let port: u16 = port.parse().map_err(|_| malformed())?;
                if !crate::dns::DnsName::valid_host(host) {
                    return Err(malformed());
                }
                let host = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
                (SocketAddr::from(([0, 0, 0, 0], port)), Some(host))
            }
        };
        if parsed.port() == 0 {
            return Err(format!("backend address \"{addr}\" has port 0"));
        }
        if weight == 0 {
            return Err(format!("backend \"{addr}\" has weight 0; weights start at 1 (remove the backend to stop traffic)"));
        }
        let zone = zone.unwrap_or_default();
        Ok(match host {
            None => BackendTarget::Addr(BackendSpec {
                addr: parsed,
                weight,
                zone,
                tags,
            }),
            Some(host) => BackendTarget::Name(crate::dns::DnsName {
                host,
                port: parsed.port(),
                weight,
                zone,
                tags,
            }),
        })
    }
}

pub(crate) fn parse_listen(s: &str) -> Result<SocketAddr, String> {
    s.parse().map_err(|_| {
        format!("listen address \"{s}\" is not an IP:port; write it like \"127.0.0.1:8080\"")
    })
}

/// Most worker threads a proxy may run.
pub const MAX_THREADS: u64 = 1024;
/// Most retries a pool may make.
pub const MAX_RETRIES: u64 = 16;
/// Longest duration any setting accepts (a day); longer ones are mistakes.
pub const MAX_DURATION: Duration = Duration::from_secs(24 * 3600);

/// `value` within `range`, or a message naming `what` and the allowed range.
pub(crate) fn in_range(
    value: u64,
    range: std::ops::RangeInclusive<u64>,
    what: &str,
) -> Result<(), String> {
    if range.contains(&value) {
        Ok(())
    } else {
        Err(format!(
            "{what} is {value}; allowed: {} to {}",
            range.start(),
            range.end()
        ))
    }
}

/// `d` within `range`, or a message naming `what` and the allowed range.
fn duration_in_range(
    d: Duration,
    range: std::ops::RangeInclusive<Duration>,
    what: &str,
) -> Result<(), String> {
    if range.contains(&d) {
        Ok(())
    } else {
        Err(format!(
            "{what} is {}; allowed: {} to {}",
            humantime::format_duration(d),
            humantime::format_duration(*range.start()),
            humantime::format_duration(*range.end())
        ))
    }
}

/// Deserializes TOML, locating errors at file:line:column. Shared with the agent's file.
pub fn parse_toml<T: serde::de::DeserializeOwned>(
    text: &str,
    name: &str,
) -> Result<T, ConfigError> {
    toml::from_str(text).map_err(|e| {
        let (line, column) = e.span().map(|s| line_col(text, s.start)).unwrap_or((1, 1));
        ConfigError::Invalid {
            path: name.into(),
            line,
            column,
            message: e.message().trim().to_string(),
        }
    })
}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let column = before
        .rsplit('\n')
        .next()
        .map(|l| l.chars().count())
        .unwrap_or(0)
        + 1;
    (line, column)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(text: &str) -> String {
        Config::parse(text, "t.toml", Path::new("."))
            .unwrap_err()
            .to_string()
    }

    #[test]
    fn the_documented_form_parses() {
        let cfg = Config::parse(
            r#"
[server]
listen = ["127.0.0.1:8080"]
threads = 1
[admin]
listen = "127.0.0.1:9900"
[[pool]]
name = "web"
strategy = "builtin:round-robin"
health = { plugin = "builtin:http", interval = "2s", timeout = "1s", rise = 2, fall = 3, config = { path = "/healthz" } }
backends = ["127.0.0.1:9001", { addr = "127.0.0.1:9002", weight = 2, zone = "eu", tags = ["canary"] }]
[[route]]
path_prefix = "/"
pool = "web"
"#,
            "t.toml",
            Path::new("."),
        )
        .unwrap();
        let b = Config::backends(&cfg.pool[0]);
        assert_eq!(b[1].weight, 2);
        assert_eq!(b[1].tags, vec!["canary".to_string()]);
        assert_eq!(
            cfg.pool[0].health.as_ref().unwrap().get_ref().interval,
            Duration::from_secs(2)
        );
    }

    #[test]
    fn unknown_key_names_line_and_key() {
        let e = err("[server]\nlisten = [\"127.0.0.1:1\"]\nthreds = 2\n");
        assert!(e.starts_with("t.toml:3:1:"), "{e}");
        assert!(e.contains("unknown field `threds`"), "{e}");
    }

    #[test]
    fn unknown_pool_in_route() {
        let e = err("[[pool]]\nname = \"web\"\n[[route]]\npool = \"api\"\n");
        assert!(e.starts_with("t.toml:4:8:"), "{e}");
        assert!(
            e.contains("refers to pool \"api\", which is not defined"),
            "{e}"
        );
        assert!(e.contains("defined pools: web"), "{e}");
    }

    #[test]
    fn bad_backend_address() {
        let e = err("[[pool]]\nname = \"web\"\nbackends = [\"localhost:80x\"]\n");
        assert!(e.starts_with("t.toml:3:13:"), "{e}");
        assert!(e.contains("is not an IP:port or host:port"), "{e}");
        for bad in ["10.0.0.300:80", "api internal:80", "api.internal", ":80"] {
            let e = err(&format!(
                "[[pool]]\nname = \"web\"\nbackends = [\"{bad}\"]\n"
            ));
            assert!(e.contains("is not an IP:port or host:port"), "{bad}: {e}");
        }
        let e = err(
            "[[pool]]\nname = \"web\"\nbackends = [\"Api.Internal:80\", \"api.internal.:80\"]\n",
        );
        assert!(e.contains("backend api.internal:80 is listed twice"), "{e}");
    }

    #[test]
    fn missing_plugin_file() {
        let e = err("[[pool]]\nname = \"web\"\nstrategy = \"nope/missing.wasm\"\n");
        assert!(e.starts_with("t.toml:3:12:"), "{e}");
        assert!(e.contains("does not exist"), "{e}");
    }

    #[test]
    fn bad_duration_and_zero_weight() {
        let e = err("[[pool]]\nname = \"web\"\nconnect_timeout = \"soon\"\n");
        assert!(e.contains("invalid duration \"soon\""), "{e}");
        let e =
            err("[[pool]]\nname = \"web\"\nbackends = [{ addr = \"127.0.0.1:1\", weight = 0 }]\n");
        assert!(e.contains("weight 0"), "{e}");
    }

    #[test]
    fn duplicate_pool() {
        let e = err("[[pool]]\nname = \"web\"\n[[pool]]\nname = \"web\"\n");
        assert!(
            e.starts_with("t.toml:4:8:") && e.contains("defined twice"),
            "{e}"
        );
    }

    const WEB: &str = "[[pool]]\nname = \"web\"\nbackends = [\"127.0.0.1:9001\"]\n";

    #[test]
    fn route_rule_errors_name_the_route_line_and_fix() {
        let cases = [
            ("[[route]]\npath_prefix = \"/\"\n", "t.toml:4:1:", "route 1: the route has nowhere to send requests"),
            ("[[route]]\npool = \"web\"\nredirect = { to = \"/x\" }\n", "t.toml:6:12:", "more than one of `pool`, `redirect` and `respond`"),
            ("[[route]]\npool = \"web\"\npath_regex = \"^/(a\"\n", "t.toml:6:14:", "path_regex is not a valid regex: regex parse error"),
            ("[[route]]\npool = \"web\"\nrequest_headers = { set = { Connection = \"x\" } }\n", "t.toml:6:19:", "header \"Connection\" cannot be edited"),
            ("[[route]]\npool = \"web\"\nrequest_headers = { remove = [\"Host\"] }\n", "t.toml:6:19:", "header \"Host\" cannot be edited"),
            ("[[route]]\npool = \"web\"\nresponse_headers = { add = { \"bad name\" = \"x\" } }\n", "t.toml:6:20:", "\"bad name\" is not a valid header name"),
            ("[[route]]\npool = \"web\"\nrequest_headers = { set = { x-a = \"a\\nb\" } }\n", "t.toml:6:19:", "not a valid header value"),
            ("[[route]]\nredirect = { status = 200, to = \"/x\" }\n", "t.toml:5:12:", "redirect status 200 is not a redirect"),
            ("[[route]]\nredirect = { status = 301 }\n", "t.toml:5:12:", "redirect needs a target"),
            ("[[route]]\nrespond = { status = 99 }\n", "t.toml:5:11:", "respond: status 99"),
            ("[[route]]\nrespond = { status = 204, body = \"x\" }\n", "t.toml:5:11:", "a 204 response has no body"),
            ("[[route]]\nrespond = { body = \"x\" }\nstrip_prefix = \"/a\"\n", "t.toml:6:16:", "strip_prefix edits the request sent to a pool"),
            ("[[route]]\npool = \"web\"\nstrip_prefix = \"api\"\n", "t.toml:6:16:", "strip_prefix \"api\" is not a path"),
            ("[[route]]\npool = \"web\"\nmethods = [\"G ET\"]\n", "t.toml:6:11:", "\"G ET\" is not an HTTP method"),
            ("[[route]]\npool = \"web\"\naccess_log = \"loud\"\n", "t.toml:6:", "unknown variant `loud`"),
        ];
        for (route, at, want) in cases {
            let e = err(&format!("{WEB}{route}"));
            assert!(e.starts_with(at) && e.contains(want), "{route:?}: {e}");
        }
    }

    #[test]
    fn routes_without_pools_need_no_pool() {
        let cfg = Config::parse(
            "[[route]]\nredirect = { scheme = \"https\", status = 308 }\n",
            "t.toml",
            Path::new("."),
        )
        .unwrap();
        assert!(cfg.pool.is_empty());
        assert!(!cfg.access_log_writer_needed());
        let cfg = Config::parse(
            &format!("{WEB}[[route]]\npool = \"web\"\naccess_log = \"json\"\n"),
            "t.toml",
            Path::new("."),
        )
        .unwrap();
        assert!(cfg.access_log_writer_needed());
    }
}
