//! The `sluice` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "sluice",
    version,
    about = "Load-balancing reverse proxy with hot-swappable WebAssembly strategies"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Format of sluice's own log on stderr: `text` (coloured only when stderr is a terminal)
    /// or `json` (one object per line).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Run the proxy from a config file.
    Run {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
        /// Take the listeners over from the running sluice (zero-downtime binary upgrade):
        /// start this, then send SIGQUIT to the old process. See docs/operations.md.
        #[arg(long)]
        upgrade: bool,
    },
    /// Validate a config file (schema, addresses, plugins) and exit 0, or non-zero with the reason.
    Check {
        /// The TOML config file.
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Run a self-contained demo: three backends, a proxy on 127.0.0.1:8080, admin on 127.0.0.1:9900.
    Demo,
    /// Print a new random 256-bit cluster key (base64).
    Genkey,
    /// Run on a backend host: join the cluster and announce this host's services.
    Agent {
        /// The agent's TOML config ([cluster], [agent], [[service]]).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Inspect the cluster through a proxy's admin API.
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
        /// Admin API address.
        #[arg(long, global = true, default_value = "127.0.0.1:9900")]
        admin: String,
        /// Bearer token, if the admin API has one.
        #[arg(long, global = true, env = "SLUICE_ADMIN_TOKEN")]
        token: Option<String>,
    },
    /// Work with plugins.
    Plugin {
        #[command(subcommand)]
        command: PluginCommand,
    },
}

#[derive(Subcommand)]
enum ClusterCommand {
    /// Table of members: name, role, zone, addresses, state, services.
    Info,
    /// The cluster as a Graphviz DOT graph (proxies → backends by pool).
    Map {
        /// Render to SVG with Graphviz `dot` instead of printing DOT.
        #[arg(long)]
        svg: bool,
    },
    /// Rotate the whole cluster to a new key in one go: every member installs it, then
    /// encrypts with it, then drops every other key, and writes its keyring back to its
    /// key_file. Prints the members that took part.
    RotateKey {
        /// The new base64 key (default: a new random one, printed once).
        #[arg(long)]
        key: Option<String>,
        /// How long to wait for every member to confirm each phase.
        #[arg(long, default_value = "60s", value_parser = sluice::rollout::parse_wait)]
        wait: Duration,
        /// A member seen as Down not to wait for (repeatable). It keeps the old key: give it
        /// the new one before it comes back.
        #[arg(long, value_name = "NAME")]
        exclude: Vec<String>,
    },
    /// Change this proxy's keyring alone: install a key, use it to encrypt, remove an old one
    /// (see rotate-key for the whole cluster).
    Keys {
        /// install, use or remove.
        #[arg(value_parser = ["install", "use", "remove"])]
        op: String,
        /// The base64 key.
        key: String,
    },
}

#[derive(Subcommand)]
enum PluginCommand {
    /// Scaffold a strategy crate that builds and passes its own tests out of the box.
    New {
        /// Crate name (also the directory created).
        name: String,
        /// Directory to create it in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Path to the sluice-sdk crate (default: the SDK this sluice was built from).
        #[arg(long)]
        sdk: Option<PathBuf>,
    },
    /// Run a strategy against simulated traffic and print the distribution and key movement.
    Test {
        /// The .wasm file, or builtin:NAME.
        file: String,
        /// Simulated backends.
        #[arg(long, default_value_t = 5)]
        backends: usize,
        /// Requests per phase (one backend is removed between the two phases).
        #[arg(long, default_value_t = 10000)]
        requests: usize,
        /// Distinct keys (clients).
        #[arg(long, default_value_t = 1000)]
        keys: usize,
        /// The plugin's configuration as JSON.
        #[arg(long, default_value = "{}")]
        config: String,
    },
    /// Hot-load a plugin into a running proxy's pool through its admin API.
    Load {
        /// The pool.
        #[arg(long)]
        pool: String,
        /// The .wasm file.
        file: PathBuf,
        /// Plugin kind.
        #[arg(long, default_value = "strategy", value_parser = ["strategy", "health"])]
        kind: String,
        /// Admin API address.
        #[arg(long, default_value = "127.0.0.1:9900")]
        admin: String,
        /// Bearer token, if the admin API has one.
        #[arg(long, env = "SLUICE_ADMIN_TOKEN")]
        token: Option<String>,
        /// Roll it out to every proxy of the cluster: `--admin`'s proxy announces it over
        /// gossip, each proxy fetches, checks and swaps it, and each one's result is printed.
        #[arg(long)]
        cluster: bool,
        /// With --cluster: how long to wait for every proxy's result.
        #[arg(long, default_value = "30s", value_parser = sluice::rollout::parse_wait, requires = "cluster")]
        wait: Duration,
        /// The plugin's config as a JSON object (replaces the pool's); without it the pool's
        /// current config is kept.
        #[arg(long)]
        config: Option<String>,
    },
}

fn main() -> ExitCode {
    no_transparent_huge_pages();
    let cli = Cli::parse();
    let filter = tracing_subscriber::EnvFilter::try_from_env("SLUICE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let log = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match cli.log_format {
        LogFormat::Json => log.json().init(),
        // Colour codes only for a terminal: in files and journals they are noise.
        LogFormat::Text => log
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Turns transparent huge pages off for this process. mimalloc asks for huge pages on its arenas,
/// so every 2 MiB region the heap touches becomes resident whole: an idle proxy held 16 MiB of
/// mostly empty huge pages. The request path allocates nothing, so it loses nothing by it.
fn no_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integer arguments and touches no memory of ours.
    let r = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if r != 0 {
        // Older kernels: not fatal, only more resident memory.
        tracing::debug!("transparent huge pages could not be turned off");
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config, upgrade } => {
            let cfg = sluice::config::Config::load(&config)?;
            sluice::server::run(cfg, Some(config), upgrade, |rt| {
                let c = rt.config();
                let listen: Vec<_> = c
                    .listeners()
                    .iter()
                    .map(|l| format!("{}{}", l.addr, if l.tls.is_some() { " (TLS)" } else { "" }))
                    .collect();
                tracing::info!(listen = ?listen, admin = %c.admin.listen.get_ref(), pools = rt.pools().len(), "sluice is running");
            })
        }
        Command::Check { config } => {
            let cfg = sluice::config::Config::load(&config)?;
            for warning in sluice::server::preflight(&cfg, true)? {
                eprintln!("warning: {warning}");
            }
            let pools = cfg.pool.len();
            let routes = cfg.route.len();
            // Loads and exercises every plugin exactly as `run` would, without listening.
            let rt = sluice::server::build_runtime(cfg, Some(config.clone()))?;
            for p in rt.pools() {
                let v = p.strategy.current();
                let spawned: u32 = p.spawns().iter().map(|s| u32::from(s.instances)).sum();
                let spawned = if spawned > 0 {
                    format!(" (+{spawned} spawned instances once they accept connections)")
                } else {
                    String::new()
                };
                println!(
                    "pool {}: {} backends{spawned}, strategy {} (sha256 {})",
                    p.name,
                    p.table().len(),
                    v.name,
                    &v.sha256[..16]
                );
            }
            println!("{}: OK ({pools} pools, {routes} routes)", config.display());
            Ok(())
        }
        Command::Demo => demo(),
        Command::Genkey => {
            use base64::Engine;
            let key: [u8; 32] = rand::random();
            println!("{}", base64::engine::general_purpose::STANDARD.encode(key));
            Ok(())
        }
        Command::Agent { config } => {
            let cfg = sluice::agent::AgentConfig::load(&config)?;
            sluice::agent::run(cfg, &config)
        }
        Command::Cluster {
            command,
            admin,
            token,
        } => cluster_command(command, &admin, token),
        Command::Plugin {
            command: PluginCommand::New { name, dir, sdk },
        } => {
            let sdk = sdk
                .or_else(sluice::scaffold::default_sdk_path)
                .ok_or_else(|| {
                    anyhow::anyhow!("cannot find sluice-sdk; pass --sdk PATH/TO/sluice/sdk")
                })?;
            let root =
                sluice::scaffold::new_strategy(&dir, &name, &sdk).map_err(anyhow::Error::msg)?;
            println!("created {}", root.display());
            println!("next: cd {} && cargo test && cargo build --release --target wasm32-unknown-unknown", root.display());
            Ok(())
        }
        Command::Plugin {
            command:
                PluginCommand::Test {
                    file,
                    backends,
                    requests,
                    keys,
                    config,
                },
        } => {
            serde_json::from_str::<serde_json::Value>(&config)
                .map_err(|e| anyhow::anyhow!("--config is not valid JSON: {e}"))?;
            let (bytes, name) = sluice::builtin::load_source(&file, std::path::Path::new("."))
                .map_err(anyhow::Error::msg)?;
            let params = sluice::simulate::SimParams {
                backends,
                requests,
                keys,
                config_json: config,
            };
            let report = sluice::simulate::run(&bytes, &name, &params)?;
            print!("{}", report.render(&name, &params));
            Ok(())
        }
        Command::Plugin {
            command:
                PluginCommand::Load {
                    pool,
                    file,
                    kind,
                    admin,
                    token,
                    cluster,
                    wait,
                    config,
                },
        } => {
            let bytes = std::fs::read(&file)
                .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
            let query = match &config {
                None => String::new(),
                Some(c) => {
                    let v: serde_json::Value = serde_json::from_str(c)
                        .map_err(|e| anyhow::anyhow!("--config is not valid JSON: {e}"))?;
                    anyhow::ensure!(
                        v.is_object(),
                        "--config must be a JSON object, like '{{\"zones\": 2}}'"
                    );
                    let enc = percent_encoding::utf8_percent_encode(
                        c,
                        percent_encoding::NON_ALPHANUMERIC,
                    );
                    format!("?config={enc}")
                }
            };
            if cluster {
                return rollout(&admin, token, &pool, &kind, &query, wait, &bytes);
            }
            let v = put_plugin(&admin, token, &pool, &kind, &query, &bytes)?;
            println!(
                "{admin}: {kind} loaded into pool {pool}: sha256 {} generation {}",
                v["sha256"].as_str().unwrap_or("?"),
                v["generation"]
            );
            Ok(())
        }
    }
}

/// Rolls a plugin out to the cluster through one proxy and prints each proxy's result.
fn rollout(
    admin: &str,
    token: Option<String>,
    pool: &str,
    kind: &str,
    query: &str,
    wait: Duration,
    bytes: &[u8],
) -> anyhow::Result<()> {
    let sep = if query.is_empty() { '?' } else { '&' };
    let path = format!(
        "/api/cluster/plugins/{pool}/{kind}{query}{sep}wait={}ms",
        wait.as_millis()
    );
    // The proxy answers once every proxy did, or after `wait`.
    let v = admin_call_within(admin, token, "POST", &path, bytes, long_call_timeout(wait))
        .map_err(|e| e.context("the proxy refused the rollout"))?;
    println!(
        "{kind} for pool {pool}: sha256 {} version {} announced by {}",
        v["sha256"].as_str().unwrap_or("?"),
        v["version"],
        v["announced_by"].as_str().unwrap_or("?")
    );
    let nodes = v["nodes"].as_array().cloned().unwrap_or_default();
    let width = nodes
        .iter()
        .filter_map(|n| n["name"].as_str())
        .map(str::len)
        .max()
        .unwrap_or(0)
        .max(4);
    println!("{:<width$}  {:<9}  DETAIL", "NODE", "RESULT");
    let mut failed = 0;
    for n in &nodes {
        let result = n["result"].as_str().unwrap_or("?");
        if result != "ok" {
            failed += 1;
        }
        let detail = match result {
            "no answer" => format!("no result within {}", humantime::format_duration(wait)),
            _ => n["error"].as_str().unwrap_or("").to_string(),
        };
        println!(
            "{:<width$}  {result:<9}  {detail}",
            n["name"].as_str().unwrap_or("?")
        );
    }
    anyhow::ensure!(
        failed == 0,
        "{failed} of {} proxies do not run the plugin (they keep their previous version)",
        nodes.len()
    );
    Ok(())
}

/// PUTs a plugin to one proxy's admin API.
fn put_plugin(
    admin: &str,
    token: Option<String>,
    pool: &str,
    kind: &str,
    query: &str,
    bytes: &[u8],
) -> anyhow::Result<serde_json::Value> {
    admin_call(
        admin,
        token,
        "PUT",
        &format!("/api/pools/{pool}/{kind}{query}"),
        bytes,
    )
    .map_err(|e| anyhow::anyhow!("the proxy refused the plugin: {e:#}"))
}

fn admin_call(
    admin: &str,
    token: Option<String>,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<serde_json::Value> {
    admin_call_within(admin, token, method, path, body, ADMIN_TIMEOUT)
}

/// How long an ordinary admin call may take.
const ADMIN_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a call the proxy answers within `wait` may take (a key rotation, a cluster plugin
/// rollout): `wait` plus a margin.
fn long_call_timeout(wait: Duration) -> Duration {
    wait.saturating_add(Duration::from_secs(15))
}

/// Whether `--admin` points at another host (not a loopback address).
fn admin_is_remote(admin: &str) -> bool {
    admin
        .parse::<std::net::SocketAddr>()
        .is_ok_and(|a| !a.ip().is_loopback())
}

fn admin_call_within(
    admin: &str,
    token: Option<String>,
    method: &str,
    path: &str,
    body: &[u8],
    within: Duration,
) -> anyhow::Result<serde_json::Value> {
    let addr = admin
        .parse()
        .map_err(|_| anyhow::anyhow!("--admin {admin} is not an IP:port"))?;
    let auth = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", a.as_str())).collect();
    let resp = sluice::client::HttpConn::connect(addr, within)
        .and_then(|mut c| c.request(method, path, &headers, body))
        .map_err(|e| {
            anyhow::anyhow!("cannot reach the admin API at {admin}: {e}; is sluice running?")
        })?;
    let v: serde_json::Value =
        serde_json::from_slice(&resp.body).unwrap_or(serde_json::Value::Null);
    if resp.status != 200 {
        anyhow::bail!(
            "{} ({}): {}",
            path,
            resp.status,
            v["error"].as_str().unwrap_or(&resp.text())
        );
    }
    Ok(v)
}

fn cluster_command(
    command: ClusterCommand,
    admin: &str,
    token: Option<String>,
) -> anyhow::Result<()> {
    match command {
        ClusterCommand::RotateKey { key, wait, exclude } => {
            let generated = key.is_none();
            let key = key.unwrap_or_else(sluice::cluster::generate_key);
            if admin_is_remote(admin) {
                eprintln!("warning: --admin {admin} is not a loopback address: the new key travels to it over plain HTTP; run this on the proxy's host or over a trusted network");
            }
            if generated {
                // Before the call: whatever happens to it, the key is not lost.
                eprintln!("new key (keep it: members without a key_file need it in their config, and a failed rotation may have installed it already):\n{key}");
            }
            let body = serde_json::json!({
                "key": key,
                "wait": humantime::format_duration(wait).to_string(),
                "exclude": exclude,
            })
            .to_string();
            // The proxy answers once the rotation ended, or once `wait` is over.
            let v = admin_call_within(
                admin,
                token,
                "POST",
                "/api/cluster/rotate-key",
                body.as_bytes(),
                long_call_timeout(wait),
            )?;
            let members = v["members"].as_array().cloned().unwrap_or_default();
            println!(
                "every member now uses key {} alone ({} members):",
                v["fingerprint"].as_str().unwrap_or("?"),
                members.len()
            );
            for m in &members {
                println!(
                    "  {:<20} {}",
                    m["name"].as_str().unwrap_or(""),
                    m["address"].as_str().unwrap_or("")
                );
            }
            if generated {
                println!("the new key (printed above) is written to the members' key files; give it to the configs of members without one");
            }
            Ok(())
        }
        ClusterCommand::Keys { op, key } => {
            let body = serde_json::json!({ "op": op, "key": key }).to_string();
            admin_call(admin, token, "POST", "/api/cluster/keys", body.as_bytes())?;
            println!("key {op}: done");
            Ok(())
        }
        ClusterCommand::Info => {
            let v = admin_call(admin, token, "GET", "/api/cluster", b"")?;
            println!(
                "{:<20} {:<8} {:<8} {:<22} {:<9} services",
                "name", "role", "zone", "address", "state"
            );
            for m in v["members"].as_array().into_iter().flatten() {
                let services: Vec<String> = m["services"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|s| {
                        format!(
                            "{}={}",
                            s["pool"].as_str().unwrap_or(""),
                            s["addr"].as_str().unwrap_or("")
                        )
                    })
                    .collect();
                println!(
                    "{:<20} {:<8} {:<8} {:<22} {:<9} {}",
                    m["name"].as_str().unwrap_or(""),
                    m["role"].as_str().unwrap_or(""),
                    m["zone"].as_str().unwrap_or(""),
                    m["address"].as_str().unwrap_or(""),
                    m["state"].as_str().unwrap_or(""),
                    services.join(" ")
                );
            }
            Ok(())
        }
        ClusterCommand::Map { svg } => {
            let v = admin_call(admin, token, "GET", "/api/cluster", b"")?;
            let dot = sluice::membership::cluster_dot(&v);
            if !svg {
                print!("{dot}");
                return Ok(());
            }
            use std::io::Write;
            let mut child = std::process::Command::new("dot")
                .arg("-Tsvg")
                .stdin(std::process::Stdio::piped())
                .spawn()
                .map_err(|e| anyhow::anyhow!("--svg needs Graphviz `dot` ({e}); install graphviz or drop --svg and pipe the DOT text yourself"))?;
            child
                .stdin
                .take()
                .expect("piped")
                .write_all(dot.as_bytes())?;
            anyhow::ensure!(child.wait()?.success(), "dot failed");
            Ok(())
        }
    }
}

fn demo() -> anyhow::Result<()> {
    let backends = sluice::demo::spawn_backends(&["backend-1", "backend-2", "backend-3"])?;
    let list: Vec<String> = backends.iter().map(|(a, _)| format!("\"{a}\"")).collect();
    let text = format!(
        r#"
[server]
listen = ["127.0.0.1:8080"]
threads = 2
[admin]
listen = "127.0.0.1:9900"
[[pool]]
name = "demo"
strategy = "builtin:round-robin"
backends = [{}]
[[route]]
path_prefix = "/"
pool = "demo"
"#,
        list.join(", ")
    );
    let cfg = sluice::config::Config::parse(&text, "demo config", std::path::Path::new("."))?;
    sluice::server::run(cfg, None, false, |_| {
        println!("sluice demo is running (Ctrl-C to stop)");
        println!(
            "  three demo backends: {}",
            backends
                .iter()
                .map(|(a, _)| a.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
        println!("  proxy, Wasm round-robin:  curl http://127.0.0.1:8080/      (repeat: backend-1, -2, -3, ...)");
        println!("  pools and backends:       curl http://127.0.0.1:9900/api/pools");
        println!("  Prometheus metrics:       curl http://127.0.0.1:9900/metrics");
        println!("  dashboard:                http://127.0.0.1:9900/");
        println!("  hot-swap the strategy:    curl -X PUT --data-binary @my_strategy.wasm http://127.0.0.1:9900/api/pools/demo/strategy");
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotate_key_waits_longer_than_the_rotation_and_warns_off_loopback() {
        assert_eq!(
            long_call_timeout(Duration::from_secs(60)),
            Duration::from_secs(75)
        );
        assert!(long_call_timeout(Duration::MAX) >= Duration::from_secs(15));
        assert!(!admin_is_remote("127.0.0.1:9901"));
        assert!(!admin_is_remote("[::1]:9901"));
        assert!(admin_is_remote("10.0.0.5:9901"));
        assert!(
            !admin_is_remote("not an address"),
            "refused later, with its own error"
        );
    }
}
