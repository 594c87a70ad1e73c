//! Shared test support: real sluice processes, real demo backends, all on loopback.
#![allow(dead_code)] // each test binary uses a different subset

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub use sluice::client::{request, HttpConn, HttpResponse};
pub use sluice::demo::DemoBackend;

/// The proxy under test runs the lean HTTP/1 path (the default), not pingora-proxy's engine:
/// `scripts/test` runs the request-path tests a second time with `SLUICE_TEST_HTTP1=pingora`.
pub fn lean_engine() -> bool {
    std::env::var("SLUICE_TEST_HTTP1").map_or(true, |e| e.is_empty() || e == "lean")
}

/// A loopback address no other test uses, without the bind-then-drop race: every test process
/// gets its own 127.x.y.z address (from its pid, which no concurrent process shares) and every
/// call a new port on it, below the kernel's ephemeral range so no outgoing connection takes it.
pub fn unique_addr() -> SocketAddr {
    let pid = std::process::id();
    let ip = std::net::Ipv4Addr::new(
        127,
        64 | ((pid >> 16) & 0x3f) as u8,
        (pid >> 8) as u8,
        pid as u8,
    );
    SocketAddr::from((ip, unique_port()))
}

/// A port no other call in this process returned (20000..30000); see [`unique_addr`].
pub fn unique_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    assert!(n < 10_000, "out of test ports");
    20_000 + n as u16
}

/// A fresh scratch directory for one test (config, logs, certificates, plugin files).
pub fn scratch_dir(tag: &str) -> ScratchDir {
    static N: AtomicU32 = AtomicU32::new(0);
    let dir = std::env::temp_dir().join(format!(
        "sluice-test-{}-{tag}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    ScratchDir {
        path: dir.clone(),
        root: Arc::new(ScratchRoot(dir)),
    }
}

/// A test's scratch directory (or a directory in it), removed when the last handle is dropped (the
/// test and each process started in it hold one) unless the test is failing: then it is kept, and
/// its path printed, for the post-mortem (the proxies' logs are in it).
#[derive(Clone, Debug)]
pub struct ScratchDir {
    path: PathBuf,
    root: Arc<ScratchRoot>,
}

impl ScratchDir {
    /// The directory `name` in this one, created; it lives as long as this one's root.
    pub fn sub(&self, name: &str) -> ScratchDir {
        let path = self.path.join(name);
        std::fs::create_dir_all(&path).unwrap();
        ScratchDir {
            path,
            root: self.root.clone(),
        }
    }
}

#[derive(Debug)]
struct ScratchRoot(PathBuf);

impl Drop for ScratchRoot {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("kept the failed test's directory {}", self.0.display());
        } else {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

impl std::ops::Deref for ScratchDir {
    type Target = std::path::Path;
    fn deref(&self) -> &std::path::Path {
        &self.path
    }
}

impl AsRef<std::path::Path> for ScratchDir {
    fn as_ref(&self) -> &std::path::Path {
        &self.path
    }
}

pub fn backends(n: usize) -> Vec<(SocketAddr, Arc<DemoBackend>)> {
    let names: Vec<String> = (1..=n).map(|i| format!("b{i}")).collect();
    let refs: Vec<&str> = names.iter().map(String::as_str).collect();
    sluice::demo::spawn_backends(&refs).unwrap()
}

pub fn backend_list(b: &[(SocketAddr, Arc<DemoBackend>)]) -> String {
    b.iter()
        .map(|(a, _)| format!("\"{a}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A running `sluice run` process, killed on drop.
pub struct Proxy {
    child: Child,
    pub listen: SocketAddr,
    pub admin: SocketAddr,
    pub config_path: PathBuf,
    pub dir: ScratchDir,
}

impl Proxy {
    /// Writes `body` (the config without [server]/[admin]) and starts sluice on fresh ports.
    pub fn start(tag: &str, body: &str) -> Proxy {
        let dir = scratch_dir(tag);
        Proxy::start_in(dir, body)
    }

    pub fn start_in(dir: ScratchDir, body: &str) -> Proxy {
        Proxy::start_full(dir, "", body)
    }

    /// `server_extra` goes into the `[server]` section (e.g. `h2c = true` or a `[server.tls]` table
    /// placed after `body` is not possible, so give TLS as an inline table: `tls = { ... }`).
    pub fn start_full(dir: ScratchDir, server_extra: &str, body: &str) -> Proxy {
        Proxy::start_limited(dir, server_extra, body, None)
    }

    /// [`Proxy::start_full`] with the process's address space limited (`ulimit -v`, KiB).
    pub fn start_limited(
        dir: ScratchDir,
        server_extra: &str,
        body: &str,
        address_space_kib: Option<u64>,
    ) -> Proxy {
        Proxy::start_env(dir, server_extra, body, address_space_kib, &[])
    }

    /// [`Proxy::start_limited`] with extra environment variables for the process.
    pub fn start_env(
        dir: ScratchDir,
        server_extra: &str,
        body: &str,
        address_space_kib: Option<u64>,
        env: &[(&str, &str)],
    ) -> Proxy {
        let listen = unique_addr();
        let admin = unique_addr();
        // The request-path tests run on both HTTP/1 engines: `SLUICE_TEST_HTTP1=pingora` picks
        // pingora-proxy's, the default is the lean path.
        let engine = match std::env::var("SLUICE_TEST_HTTP1") {
            Ok(e) if !e.is_empty() => format!("http1 = \"{e}\"\n"),
            _ => String::new(),
        };
        let text = format!("[server]\nlisten = [\"{listen}\"]\nthreads = 2\n{engine}{server_extra}\n[admin]\nlisten = \"{admin}\"\n{body}");
        let config_path = dir.join("sluice.toml");
        std::fs::write(&config_path, text).unwrap();
        let child = Proxy::spawn(&dir, &config_path, address_space_kib, &[], env);
        let mut p = Proxy {
            child,
            listen,
            admin,
            config_path,
            dir,
        };
        p.wait_ready();
        p
    }

    fn spawn(
        dir: &std::path::Path,
        config_path: &std::path::Path,
        address_space_kib: Option<u64>,
        extra_args: &[&str],
        env: &[(&str, &str)],
    ) -> Child {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("sluice.log"))
            .unwrap();
        let mut cmd = match address_space_kib {
            None => Command::new(env!("CARGO_BIN_EXE_sluice")),
            Some(kib) => {
                // The shell sets the limit, then becomes sluice (same pid).
                let mut c = Command::new("sh");
                c.args([
                    "-c",
                    &format!("ulimit -v {kib} && exec \"$0\" \"$@\""),
                    env!("CARGO_BIN_EXE_sluice"),
                ]);
                c
            }
        };
        cmd.args(["run", "--config"])
            .arg(config_path)
            .args(extra_args)
            .env("SLUICE_LOG", "info")
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap()
    }

    /// Replaces the config file's pools and routes (everything from the first `[[pool]]` on) with
    /// `body`, keeping the `[server]` and `[admin]` sections the proxy was started with.
    pub fn rewrite_pools(&self, body: &str) {
        let text = std::fs::read_to_string(&self.config_path).unwrap();
        let head = text.split("[[pool]]").next().unwrap();
        std::fs::write(&self.config_path, format!("{head}{body}")).unwrap();
    }

    /// [`Proxy::rewrite_pools`], then `POST /api/reload`, asserting it was applied.
    pub fn reload_with(&self, body: &str) {
        self.rewrite_pools(body);
        let r = self.admin_req("POST", "/api/reload", b"");
        assert_eq!(r.status, 200, "reload refused: {}", r.text());
    }

    /// SIGKILLs the process (no goodbye, as a crash).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the process again with the same config and addresses, and waits until it is ready.
    pub fn restart(&mut self) {
        self.kill();
        self.child = Proxy::spawn(&self.dir, &self.config_path, None, &[], &[]);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("sluice exited early with {status}: {}", self.log());
            }
            let admin_ok =
                request(self.admin, "GET", "/readyz", &[], b"").is_ok_and(|r| r.status == 200);
            if admin_ok && std::net::TcpStream::connect(self.listen).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("sluice did not become ready in 30 s: {}", self.log());
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("sluice.log")).unwrap_or_default()
    }

    pub fn get(&self, path: &str) -> HttpResponse {
        request(self.listen, "GET", path, &[], b"").unwrap()
    }

    pub fn admin_req(&self, method: &str, path: &str, body: &[u8]) -> HttpResponse {
        request(self.admin, method, path, &[], body).unwrap()
    }

    pub fn put_strategy(&self, pool: &str, wasm: &[u8]) -> HttpResponse {
        self.admin_req("PUT", &format!("/api/pools/{pool}/strategy"), wasm)
    }

    /// Value of a metric line starting with `prefix` (e.g. `sluice_fallback_picks_total{pool="web"}`).
    pub fn metric(&self, prefix: &str) -> f64 {
        let text = self.admin_req("GET", "/metrics", b"").text();
        text.lines()
            .filter(|l| l.starts_with(prefix))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends a signal (`-TERM`, `-QUIT`, `-HUP`).
    pub fn signal(&self, sig: &str) {
        send_signal(self.child.id(), sig);
    }

    /// The exit status, once the process has exited within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_child(&mut self.child, limit)
    }

    /// A second process on the same config, started with `--upgrade`: it waits to be handed
    /// this one's listeners (send this one SIGQUIT). Not waited for.
    pub fn start_upgrade(&self) -> Proxy {
        Proxy {
            child: Proxy::spawn(&self.dir, &self.config_path, None, &["--upgrade"], &[]),
            listen: self.listen,
            admin: self.admin,
            config_path: self.config_path.clone(),
            dir: self.dir.clone(),
        }
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Counts responses by body (the demo backends answer with their name).
pub fn tally(
    responses: impl IntoIterator<Item = String>,
) -> std::collections::BTreeMap<String, usize> {
    let mut m = std::collections::BTreeMap::new();
    for r in responses {
        *m.entry(r.trim().to_string()).or_insert(0) += 1;
    }
    m
}

/// Waits until `n` GETs in a row through `proxy` reach `backends` different backends (each of
/// them, under round-robin). On a loaded machine one stalled probe can make a cluster member
/// suspect for a moment and take it out of the pool, so the tally is taken again for up to 10 s;
/// fails the test with the last one.
pub fn expect_spread(proxy: &Proxy, n: usize, backends: usize) {
    let mut t = Default::default();
    assert!(
        wait_for(Duration::from_secs(10), || {
            t = tally((0..n).map(|_| proxy.get("/").text()));
            t.len() == backends
        }),
        "{n} requests did not reach {backends} backends: {t:?}"
    );
}

/// A strategy plugin in WAT with the given pick body (`(param $attempt i32) (result i32)`),
/// init body (`(param i32 i32) (result i32)`) and ABI version. Real wasm, compiled by the host.
pub fn wat_strategy(version: i32, init_body: &str, pick_body: &str) -> Vec<u8> {
    let text = format!(
        r#"(module
  (import "sluice" "counter_add" (func $counter_add (param i32 i64) (result i64)))
  (import "sluice" "request_attr" (func $request_attr (param i32 i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 2)
  (data (i32.const 16) "x-bad")
  (global $n (mut i32) (i32.const 0))
  (func (export "sluice_abi_version") (result i32) (i32.const {version}))
  (func (export "sluice_plugin_kind") (result i32) (i32.const 0))
  (func (export "sluice_alloc") (param $len i32) (result i32) (i32.const 1024))
  (func (export "sluice_init") (param i32 i32) (result i32) {init_body})
  (func (export "sluice_set_backends") (param $ptr i32) (param $len i32) (result i32)
    (global.set $n (i32.load (local.get $ptr))) (i32.const 0))
  (func (export "sluice_pick") (param $attempt i32) (result i32) {pick_body})
)"#
    );
    wat::parse_str(text).expect("valid WAT")
}

/// Picks backend 0 always.
pub fn first_only() -> Vec<u8> {
    wat_strategy(1, "(i32.const 0)", "(i32.const 0)")
}

/// Client load in the background: `f` run from `threads` threads until [`Load::stop`], and in
/// any case at most `per_thread` times each and for at most `max_time`, so it ends by itself.
pub struct Load {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<Vec<Result<HttpResponse, String>>>>,
}

impl Load {
    pub fn start<F>(threads: usize, per_thread: usize, max_time: Duration, f: F) -> Load
    where
        F: Fn(&mut Option<HttpConn>) -> Result<HttpResponse, String> + Send + Sync + 'static,
    {
        let f = Arc::new(f);
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let threads = (0..threads)
            .map(|_| {
                let (f, stop) = (f.clone(), stop.clone());
                std::thread::spawn(move || {
                    let mut conn = None;
                    let mut out = Vec::new();
                    for _ in 0..per_thread {
                        if start.elapsed() > max_time || stop.load(Ordering::Relaxed) {
                            break;
                        }
                        out.push(f(&mut conn));
                    }
                    out
                })
            })
            .collect();
        Load { stop, threads }
    }

    /// Every thread has ended (its count or time ran out).
    pub fn is_finished(&self) -> bool {
        self.threads.iter().all(|t| t.is_finished())
    }

    /// Waits for the load to end by itself; every result, in no particular order.
    pub fn join(mut self) -> Vec<Result<HttpResponse, String>> {
        std::mem::take(&mut self.threads)
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect()
    }

    /// Ends the load once each thread's current request is done; every result.
    pub fn stop(self) -> Vec<Result<HttpResponse, String>> {
        self.stop.store(true, Ordering::Relaxed);
        self.join()
    }
}

impl Drop for Load {
    /// A load nobody collected (its test failed first) stops too, rather than running on
    /// against the next tests until its own bounds.
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Runs `f` from `threads` threads, `per_thread` times each, stopping early at `max_time`.
pub fn bounded_load<F>(
    threads: usize,
    per_thread: usize,
    max_time: Duration,
    f: F,
) -> Vec<Result<HttpResponse, String>>
where
    F: Fn(&mut Option<HttpConn>) -> Result<HttpResponse, String> + Send + Sync + 'static,
{
    Load::start(threads, per_thread, max_time, f).join()
}

/// One GET over a kept-alive connection. No client-side retry: any error counts as a failure.
pub fn keepalive_get(
    conn: &mut Option<HttpConn>,
    addr: SocketAddr,
    path: &str,
) -> Result<HttpResponse, String> {
    if conn.is_none() {
        *conn = Some(HttpConn::connect(addr, Duration::from_secs(10)).map_err(|e| e.to_string())?);
    }
    let result = conn.as_mut().unwrap().request("GET", path, &[], b"");
    match result {
        Ok(r) => {
            if r.header("connection")
                .is_some_and(|v| v.eq_ignore_ascii_case("close"))
            {
                *conn = None;
            }
            Ok(r)
        }
        Err(e) => {
            *conn = None;
            Err(e.to_string())
        }
    }
}

/// Polls `cond` every 20 ms until it holds or `limit` passes; returns whether it held.
pub fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// `GET /api/pools` as JSON.
pub fn pools_json(proxy: &Proxy) -> serde_json::Value {
    serde_json::from_str(&proxy.admin_req("GET", "/api/pools", b"").text()).unwrap()
}

/// A field of one backend of the first pool in `GET /api/pools`.
pub fn backend_field(proxy: &Proxy, addr: &str, field: &str) -> serde_json::Value {
    let v = pools_json(proxy);
    v["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["addr"] == addr)
        .unwrap()[field]
        .clone()
}

/// What a `sluice` command printed.
pub struct CliOutput {
    /// Exit status 0.
    pub ok: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

/// Runs the `sluice` binary with `args`.
pub fn sluice_cli(args: &[&str]) -> CliOutput {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(args)
        .output()
        .unwrap();
    CliOutput {
        ok: out.status.success(),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// A test cluster key (base64 of 32 bytes).
pub const CLUSTER_KEY: &str = "dGVzdC1jbHVzdGVyLWtleS0zMi1ieXRlcy1sb25nISE=";

/// A `[cluster]` section on the fast `local` timing profile.
pub fn cluster_section(name: &str, bind: SocketAddr, key: &str, peers: &[SocketAddr]) -> String {
    let peers: Vec<String> = peers.iter().map(|p| format!("\"{p}\"")).collect();
    format!(
        "[cluster]\nname = \"test\"\nnode_name = \"{name}\"\nbind_addr = \"{bind}\"\nkey = \"{key}\"\npeers = [{}]\nprofile = \"local\"\n",
        peers.join(", ")
    )
}

/// A gossip address on `127.0.0.{ip_last}`, as a separate host would have, with a port no other
/// call in this process returned (no bind-then-drop race).
pub fn gossip_addr(ip_last: u8) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, ip_last], unique_port()))
}

/// A running `sluice agent` process, killed on drop.
pub struct Agent {
    pub child: Child,
    pub dir: PathBuf,
}

impl Agent {
    /// Starts an agent in `dir/name` announcing `service` for pool "web".
    pub fn start(dir: &std::path::Path, name: &str, cluster: &str, service: SocketAddr) -> Agent {
        Agent::start_env(dir, name, cluster, service, &[])
    }

    /// [`Agent::start`] with extra environment variables for the process.
    pub fn start_env(
        dir: &std::path::Path,
        name: &str,
        cluster: &str,
        service: SocketAddr,
        env: &[(&str, &str)],
    ) -> Agent {
        let dir = dir.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        let cfg = format!("{cluster}\n[agent]\ndrain_grace = \"1500ms\"\ncheck_interval = \"500ms\"\n[[service]]\npool = \"web\"\naddr = \"{service}\"\ncheck = \"tcp\"\n");
        std::fs::write(dir.join("agent.toml"), cfg).unwrap();
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["agent", "--config"])
            .arg(dir.join("agent.toml"))
            .envs(env.iter().copied())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Agent { child, dir }
    }

    /// Sends a signal (`-TERM`, `-KILL`, `-HUP`).
    pub fn signal(&self, sig: &str) {
        send_signal(self.child.id(), sig);
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// Waits (at most `limit`) until the log contains `needle`; fails the test showing the log.
    pub fn expect_log(&self, needle: &str, limit: Duration) {
        assert!(
            wait_for(limit, || self.log().contains(needle)),
            "the agent never logged {needle:?}:\n{}",
            self.log()
        );
    }

    /// The exit status, once the process has exited within `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        wait_child(&mut self.child, limit)
    }
}

/// The exit status of `child`, once it has exited within `limit`.
fn wait_child(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let mut status = None;
    wait_for(limit, || {
        status = child.try_wait().unwrap();
        status.is_some()
    });
    status
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Backends of the first pool in `proxy`'s `GET /api/pools` that are routable.
pub fn routable(proxy: &Proxy) -> usize {
    pools_json(proxy)["pools"][0]["backends"]
        .as_array()
        .map(|a| a.iter().filter(|b| b["state"] == "routable").count())
        .unwrap_or(0)
}

/// Writes a self-signed EC certificate for localhost and 127.0.0.1 to `dir/cert` and its key to
/// `dir/key` (openssl, installed by the set-up script).
pub fn self_signed(dir: &std::path::Path, cert: &str, key: &str) {
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-days", "1", "-subj", "/CN=localhost"])
        .args([
            "-addext",
            "subjectAltName=DNS:localhost,IP:127.0.0.1",
            "-keyout",
        ])
        .arg(dir.join(key))
        .arg("-out")
        .arg(dir.join(cert))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `kB` field of `/proc/PID/status` (`"VmRSS:"`, `"VmSize:"`), in KiB.
pub fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A test certificate authority: `dir/{name}.pem` and `dir/{name}.key` (openssl).
pub fn test_ca(dir: &std::path::Path, name: &str) {
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "2",
            "-subj",
            &format!("/CN={name}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// A certificate for common name `cn` and DNS names `dns`, signed by the CA `ca` (see
/// [`test_ca`]), usable by servers and clients: `dir/{name}.pem` and `dir/{name}.key`.
pub fn signed_cert(dir: &std::path::Path, ca: &str, name: &str, cn: &str, dns: &[&str]) {
    let mut ext = String::from(
        "basicConstraints=critical,CA:FALSE\nextendedKeyUsage=serverAuth,clientAuth\n",
    );
    if !dns.is_empty() {
        let sans: Vec<String> = dns.iter().map(|d| format!("DNS:{d}")).collect();
        ext.push_str(&format!("subjectAltName={}\n", sans.join(",")));
    }
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &format!("/CN={cn}"),
            "-keyout",
            &format!("{name}.key"),
            "-out",
            &format!("{name}.csr"),
        ],
    );
    static SERIAL: AtomicU32 = AtomicU32::new(1);
    let serial = format!(
        "{}{}",
        std::process::id(),
        SERIAL.fetch_add(1, Ordering::Relaxed)
    );
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &format!("{name}.csr"),
            "-CA",
            &format!("{ca}.pem"),
            "-CAkey",
            &format!("{ca}.key"),
            "-set_serial",
            &serial,
            "-days",
            "1",
            "-extfile",
            &format!("{name}.ext"),
            "-out",
            &format!("{name}.pem"),
        ],
    );
}

/// Runs `openssl ARGS` in `dir`, failing the test with its stderr when it fails.
pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Sends `sig` (`-TERM`, `-KILL`, ...) to process `pid`, as an operator would with `kill`.
pub fn send_signal(pid: u32, sig: &str) {
    assert!(Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap()
        .success());
}
