//! Spawned instances (`[[pool.spawn]]`): real sluice processes starting real Python servers on
//! loopback. Each server answers with its `SLUICE_INSTANCE`, `PORT` and pid, so a response says
//! which process served it.

mod common;

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

/// A small HTTP/1.1 server: listens on HOST:PORT, answers every GET with
/// `instance N port P pid X`, prints a line when it listens and when it gets SIGTERM. Each
/// response goes out in one write, so a SIGKILL lands before a response or after it, never
/// between its head and its body (which no proxy could hide from the client).
const SERVER: &str = r#"
import os, sys, signal
from http.server import ThreadingHTTPServer, BaseHTTPRequestHandler
host, port, inst = os.environ["HOST"], int(os.environ["PORT"]), os.environ["SLUICE_INSTANCE"]
class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    def do_GET(self):
        body = f"instance {inst} port {port} pid {os.getpid()}\n".encode()
        head = f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n\r\n".encode()
        self.wfile.write(head + body)
    def log_message(self, *args):
        pass
ThreadingHTTPServer.daemon_threads = True
server = ThreadingHTTPServer((host, port), Handler)
def stop(*args):
    print("got SIGTERM", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, signal.SIG_IGN if os.environ.get("IGNORE_TERM") else stop)
print(f"listening on {port} as instance {inst}", flush=True)
server.serve_forever()
"#;

/// The IP every instance of this test process listens on (the per-process loopback address of
/// `unique_addr`, so ports cannot clash with other test processes).
fn host() -> IpAddr {
    unique_addr().ip()
}

/// A `[[pool]]` "web" with `instances` spawned servers from `start_port`, and its route.
fn pool(host: IpAddr, start_port: u16, instances: u16) -> String {
    pool_with(host, start_port, instances, "", "5s")
}

/// [`pool`] with more `env` entries (`, KEY = "value"`) and a `stop_grace`.
fn pool_with(host: IpAddr, start_port: u16, instances: u16, env: &str, grace: &str) -> String {
    format!(
        r#"[[pool]]
name = "web"
[[pool.spawn]]
command = "python3"
args = ["server.py"]
instances = {instances}
start_port = {start_port}
host = "{host}"
env = {{ HOST = "{host}"{env} }}
stop_grace = "{grace}"
restart_delay = "100ms"
[[route]]
pool = "web"
"#
    )
}

fn start(tag: &str, start_port: u16, instances: u16) -> Proxy {
    start_with(tag, &pool(host(), start_port, instances), instances)
}

/// Starts sluice with the test server and `body`, and waits for its `instances` to be ready.
fn start_with(tag: &str, body: &str, instances: u16) -> Proxy {
    let dir = scratch_dir(tag);
    std::fs::write(dir.join("server.py"), SERVER).unwrap();
    let proxy = Proxy::start_in(dir, body);
    assert!(
        wait_for(Duration::from_secs(30), || ready(&proxy).len()
            == usize::from(instances)
            && routable(&proxy) == usize::from(instances)),
        "instances did not become ready: {}\n{}",
        pools_json(&proxy),
        proxy.log()
    );
    proxy
}

/// `GET /api/pools` instances of pool "web".
fn instances(proxy: &Proxy) -> Vec<serde_json::Value> {
    pools_json(proxy)["pools"][0]["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
}

/// Name → pid of the ready instances.
fn ready(proxy: &Proxy) -> Vec<(String, u32)> {
    instances(proxy)
        .iter()
        .filter(|i| i["state"] == "ready")
        .map(|i| {
            (
                i["name"].as_str().unwrap().to_string(),
                i["pid"].as_u64().unwrap() as u32,
            )
        })
        .collect()
}

fn pid_of(proxy: &Proxy, name: &str) -> Option<u32> {
    ready(proxy)
        .into_iter()
        .find(|(n, _)| n == name)
        .map(|(_, p)| p)
}

/// Whether process `pid` exists and is not a zombie.
fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| {
        s.rsplit(')')
            .next()
            .is_some_and(|r| !r.trim_start().starts_with('Z'))
    })
}

/// Idempotent GETs from `threads` kept-alive clients until `stop` is set (or a bound is hit).
struct Load {
    stop: Arc<AtomicBool>,
    handles: Vec<std::thread::JoinHandle<Vec<Result<String, String>>>>,
}

/// Bounds of one load client: requests and time.
const LOAD_MAX_REQUESTS: usize = 50_000;
const LOAD_MAX_TIME: Duration = Duration::from_secs(60);

impl Load {
    fn start(proxy: &Proxy, threads: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let addr = proxy.listen;
        let handles = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let started = Instant::now();
                    let mut conn = None;
                    let mut out = Vec::new();
                    while !stop.load(Ordering::Relaxed)
                        && out.len() < LOAD_MAX_REQUESTS
                        && started.elapsed() < LOAD_MAX_TIME
                    {
                        out.push(match keepalive_get(&mut conn, addr, "/") {
                            Ok(r) if r.status == 200 => Ok(r.text()),
                            Ok(r) => Err(format!("status {}: {}", r.status, r.text())),
                            Err(e) => Err(e),
                        });
                        // Pace the clients a little: the machine is shared.
                        std::thread::sleep(Duration::from_millis(2));
                    }
                    out
                })
            })
            .collect();
        Load { stop, handles }
    }

    /// Stops the clients; every answer body, asserting none failed (`proxy`'s warnings are shown
    /// when some did).
    fn finish(self, proxy: &Proxy) -> Vec<String> {
        self.stop.store(true, Ordering::Relaxed);
        let results: Vec<_> = self
            .handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect();
        let failed: Vec<_> = results.iter().filter_map(|r| r.as_ref().err()).collect();
        if !failed.is_empty() {
            let log = proxy.log();
            let warnings: Vec<&str> = log
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            panic!(
                "{} of {} requests failed, first: {:?}\nsluice's warnings:\n{}",
                failed.len(),
                results.len(),
                &failed[..failed.len().min(5)],
                warnings.join("\n")
            );
        }
        results.into_iter().map(Result::unwrap).collect()
    }
}

/// The pids that answered.
fn pids(bodies: &[String]) -> BTreeSet<u32> {
    bodies
        .iter()
        .filter_map(|b| b.split_whitespace().last()?.parse().ok())
        .collect()
}

#[test]
fn requests_spread_over_every_instance_which_gets_its_port_and_number() {
    let proxy = start("spawn-spread", 31_000, 3);
    let bodies: Vec<String> = (0..30).map(|_| proxy.get("/").text()).collect();
    let seen: BTreeSet<String> = bodies
        .iter()
        .map(|b| b.split(" pid ").next().unwrap().to_string())
        .collect();
    let want: BTreeSet<String> = (0..3)
        .map(|n| format!("instance {n} port {}", 31_000 + n))
        .collect();
    assert_eq!(seen, want, "{bodies:?}");
    // Each instance's output is in sluice's log, prefixed with its name.
    let log = proxy.log();
    for n in 0..3 {
        let line = format!("web#{n}: listening on {} as instance {n}", 31_000 + n);
        assert!(log.contains(&line), "no {line:?} in the log:\n{log}");
    }
    let i = instances(&proxy);
    assert_eq!(i[2]["addr"], format!("{}:31002", host()));
    assert_eq!(i[2]["restarts"], 0);
}

#[test]
fn a_killed_instance_is_restarted_and_rejoins_without_failed_requests() {
    let proxy = start("spawn-restart", 31_010, 3);
    let old = pid_of(&proxy, "web#1").unwrap();
    let load = Load::start(&proxy, 4);
    // The load reaches the instance before it dies.
    assert!(wait_for(Duration::from_secs(10), || {
        proxy.metric("sluice_requests_total") >= 200.0
    }));
    send_signal(old, "-KILL");
    let back = wait_for(Duration::from_secs(30), || {
        pid_of(&proxy, "web#1").is_some_and(|p| p != old) && routable(&proxy) == 3
    });
    assert!(back, "web#1 did not come back: {}", pools_json(&proxy));
    let new = pid_of(&proxy, "web#1").unwrap();
    // The load goes on until the new process has answered some requests.
    let before = proxy.metric("sluice_requests_total");
    assert!(wait_for(Duration::from_secs(10), || {
        proxy.metric("sluice_requests_total") >= before + 200.0
    }));
    let bodies = load.finish(&proxy);
    let answered = pids(&bodies);
    assert!(
        answered.contains(&old) && answered.contains(&new),
        "the load did not span the restart: {answered:?} (old {old}, new {new})"
    );
    let i = instances(&proxy);
    let web1 = i.iter().find(|i| i["name"] == "web#1").unwrap();
    assert_eq!(web1["restarts"], 1, "{web1}");
    assert_eq!(
        proxy.metric("sluice_spawn_restarts_total{pool=\"web\"}"),
        1.0
    );
    assert!(
        web1["last_exit"].as_str().unwrap().contains("SIGKILL"),
        "{web1}"
    );
    assert!(!alive(old));
    let log = proxy.log();
    assert!(
        log.contains("web#1 exited (signal: 9 (SIGKILL)); it left the pool; restarting it in"),
        "{log}"
    );
}

#[test]
fn reloads_change_the_number_of_instances_without_failed_requests() {
    let proxy = start("spawn-scale", 31_020, 3);
    let before: Vec<u32> = ready(&proxy).iter().map(|(_, p)| *p).collect();
    let load = Load::start(&proxy, 4);
    assert!(wait_for(Duration::from_secs(10), || {
        proxy.metric("sluice_requests_total") >= 200.0
    }));
    // 3 → 1: two instances drain and stop.
    proxy.reload_with(&pool(host(), 31_020, 1));
    assert!(
        wait_for(Duration::from_secs(30), || instances(&proxy).len() == 1
            && before[1..].iter().all(|p| !alive(*p))),
        "instances did not stop: {}",
        pools_json(&proxy)
    );
    assert_eq!(routable(&proxy), 1);
    assert_eq!(
        pid_of(&proxy, "web#0"),
        Some(before[0]),
        "the instance that stays keeps running"
    );
    let mark = proxy.metric("sluice_requests_total");
    assert!(wait_for(Duration::from_secs(10), || {
        proxy.metric("sluice_requests_total") >= mark + 200.0
    }));
    // 1 → 3: two new instances join.
    proxy.reload_with(&pool(host(), 31_020, 3));
    assert!(
        wait_for(Duration::from_secs(30), || ready(&proxy).len() == 3
            && routable(&proxy) == 3),
        "instances did not start: {}",
        pools_json(&proxy)
    );
    let after: Vec<u32> = ready(&proxy).iter().map(|(_, p)| *p).collect();
    let mark = proxy.metric("sluice_requests_total");
    assert!(wait_for(Duration::from_secs(10), || {
        proxy.metric("sluice_requests_total") >= mark + 200.0
    }));
    let bodies = load.finish(&proxy);
    let answered = pids(&bodies);
    for p in before.iter().chain(&after) {
        assert!(
            answered.contains(p),
            "pid {p} answered nothing: the load did not span both reloads ({answered:?})"
        );
    }
    let log = proxy.log();
    assert!(log.contains("web#2 left the pool; letting its requests in flight finish"));
    assert!(log.contains("web#2: got SIGTERM"), "{log}");
}

#[test]
fn a_changed_table_replaces_the_instances_one_at_a_time_without_failed_requests() {
    let proxy = start("spawn-rolling", 31_050, 3);
    let before: BTreeSet<u32> = ready(&proxy).iter().map(|(_, p)| *p).collect();
    let load = Load::start(&proxy, 4);
    assert!(wait_for(Duration::from_secs(10), || {
        proxy.metric("sluice_requests_total") >= 200.0
    }));
    proxy.reload_with(&pool_with(host(), 31_050, 3, ", RELEASE = \"2\"", "5s"));
    let replaced = wait_for(Duration::from_secs(60), || {
        let now = ready(&proxy);
        now.len() == 3 && now.iter().all(|(_, p)| !before.contains(p)) && routable(&proxy) == 3
    });
    assert!(replaced, "not replaced: {}", pools_json(&proxy));
    let after: BTreeSet<u32> = ready(&proxy).iter().map(|(_, p)| *p).collect();
    let mark = proxy.metric("sluice_requests_total");
    assert!(wait_for(Duration::from_secs(10), || {
        proxy.metric("sluice_requests_total") >= mark + 200.0
    }));
    let answered = pids(&load.finish(&proxy));
    assert!(
        before.iter().chain(&after).all(|p| answered.contains(p)),
        "the load did not span the replacement: {answered:?}, before {before:?}, after {after:?}"
    );
    // One at a time: the log shows each old instance stopped before the next one left.
    let log = proxy.log();
    let left: Vec<usize> = (0..3)
        .map(|n| log.find(&format!("web#{n} left the pool")).unwrap())
        .collect();
    let joined_again: Vec<usize> = (0..3)
        .map(|n| log.rfind(&format!("web#{n} accepts connections")).unwrap())
        .collect();
    let mut order: Vec<usize> = (0..3).collect();
    order.sort_by_key(|n| left[*n]);
    for w in order.windows(2) {
        assert!(
            joined_again[w[0]] < left[w[1]],
            "web#{} left before web#{} was back",
            w[1],
            w[0]
        );
    }
}

#[test]
fn a_reload_refuses_a_port_another_process_holds_and_a_removed_pool_stops_its_instances() {
    let proxy = start("spawn-busy", 31_060, 1);
    let pid = pid_of(&proxy, "web#0").unwrap();
    let holder = std::net::TcpListener::bind((host(), 31_062)).unwrap();
    proxy.rewrite_pools(&pool(host(), 31_060, 3));
    let r = proxy.admin_req("POST", "/api/reload", b"");
    assert_ne!(r.status, 200, "{}", r.text());
    let want = format!("spawn \"web\": port {}:31062 is not free", host());
    let error: serde_json::Value = serde_json::from_str(&r.text()).unwrap();
    let error = error["error"].as_str().unwrap();
    let text = std::fs::read_to_string(&proxy.config_path).unwrap();
    let line = text.lines().position(|l| l == "[[pool.spawn]]").unwrap() + 1;
    let at = format!("sluice.toml:{line}:1: pool \"web\"");
    assert!(error.contains(&want) && error.contains(&at), "{error}");
    assert_eq!(
        instances(&proxy).len(),
        1,
        "a refused reload changes nothing"
    );
    drop(holder);
    proxy.reload_with("[[route]]\nrespond = { status = 200, body = \"no pools\" }\n");
    assert!(
        wait_for(Duration::from_secs(30), || !alive(pid)),
        "the instance of a removed pool still runs"
    );
    assert_eq!(proxy.get("/").text(), "no pools");
}

#[test]
fn sigterm_stops_every_instance_gracefully() {
    let mut proxy = start("spawn-sigterm", 31_030, 2);
    let pids: Vec<u32> = ready(&proxy).iter().map(|(_, p)| *p).collect();
    assert_eq!(proxy.get("/").status, 200);
    proxy.signal("-TERM");
    let status = proxy.wait_exit(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    for p in &pids {
        assert!(!alive(*p), "instance {p} outlived sluice");
    }
    let log = proxy.log();
    for n in 0..2 {
        assert!(log.contains(&format!("web#{n}: got SIGTERM")), "{log}");
    }
    assert!(log.contains("every spawned instance has stopped"), "{log}");
}

#[test]
fn an_instance_that_ignores_sigterm_is_killed_after_its_stop_grace() {
    let body = pool_with(host(), 31_070, 1, ", IGNORE_TERM = \"1\"", "1s");
    let mut proxy = start_with("spawn-grace", &body, 1);
    let pid = pid_of(&proxy, "web#0").unwrap();
    proxy.signal("-TERM");
    let status = proxy.wait_exit(Duration::from_secs(30));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(!alive(pid));
    let log = proxy.log();
    assert!(
        log.contains("killed: it did not exit within stop_grace after SIGTERM"),
        "{log}"
    );
}

#[test]
fn a_second_sigterm_kills_the_instances_at_once() {
    let body = pool_with(host(), 31_080, 1, ", IGNORE_TERM = \"1\"", "1h");
    let mut proxy = start_with("spawn-hurry", &body, 1);
    let pid = pid_of(&proxy, "web#0").unwrap();
    proxy.signal("-TERM");
    assert!(wait_for(Duration::from_secs(10), || proxy
        .log()
        .contains("stopping the spawned instances")));
    proxy.signal("-TERM");
    // Well within the hour of stop_grace.
    let status = proxy.wait_exit(Duration::from_secs(20));
    assert!(status.is_some_and(|s| s.success()), "{status:?}");
    assert!(!alive(pid));
    assert!(proxy.log().contains("killing the spawned instances"));
}

#[test]
fn a_killed_sluice_leaves_no_instance_behind() {
    let mut proxy = start("spawn-sigkill", 31_040, 2);
    let pids: Vec<u32> = ready(&proxy).iter().map(|(_, p)| *p).collect();
    proxy.kill();
    assert!(
        wait_for(Duration::from_secs(10), || pids.iter().all(|p| !alive(*p))),
        "instances outlived a SIGKILLed sluice: {pids:?}"
    );
}

#[test]
fn check_refuses_bad_spawn_tables_naming_the_line() {
    let dir = scratch_dir("spawn-check");
    let ip = host();
    let write = |dir: &Path, body: &str| {
        let text = format!(
            "[server]\nlisten = [\"{ip}:31090\"]\n[admin]\nlisten = \"{ip}:31091\"\n{body}"
        );
        let path = dir.join("sluice.toml");
        std::fs::write(&path, text).unwrap();
        sluice_cli(&["check", "--config", path.to_str().unwrap()])
    };
    let table = |port: u16, n: u16, extra: &str| {
        format!(
            "[[pool.spawn]]\ncommand = \"python3\"\nstart_port = {port}\ninstances = {n}\nhost = \"{ip}\"\n{extra}"
        )
    };
    let cases = [
        (
            format!(
                "[[pool]]\nname = \"a\"\n{}[[pool]]\nname = \"b\"\n{}",
                table(31_100, 3, ""),
                table(31_102, 1, "")
            ),
            format!("sluice.toml:14:1: pool \"b\": spawn \"b\": ports 31102-31102 on {ip} overlap those of spawn \"a\" of pool \"a\" (line 7)"),
        ),
        (
            format!("[[pool]]\nname = \"a\"\n{}", table(31_089, 2, "")),
            format!("an instance would listen on {ip}:31090, which is a proxy listener"),
        ),
        (
            format!("[[pool]]\nname = \"a\"\n{}", table(31_100, 300, "")),
            "pool \"a\": spawn \"a\": instances is 300; allowed: 0 to 256".to_string(),
        ),
        (
            format!("[[pool]]\nname = \"a\"\n{}", table(0, 1, "")),
            "start_port is 0".to_string(),
        ),
        (
            "[[pool]]\nname = \"a\"\n[[pool.spawn]]\ncommand = \"\"\nstart_port = 31100\n".into(),
            "command is empty".to_string(),
        ),
        (
            format!(
                "[[pool]]\nname = \"a\"\nbackends = [\"{ip}:31100\"]\n{}",
                table(31_100, 1, "")
            ),
            "which the pool also lists in backends".to_string(),
        ),
        (
            format!("[[pool]]\nname = \"a\"\n{}", table(31_100, 1, "env = { PORT = \"1\" }\n")),
            "env sets PORT".to_string(),
        ),
        (
            format!("[[pool]]\nname = \"a\"\n{}", table(31_100, 1, "colour = \"red\"\n")),
            "unknown field `colour`".to_string(),
        ),
    ];
    for (body, want) in cases {
        let out = write(&dir, &format!("{body}[[route]]\npool = \"a\"\n"));
        assert!(!out.ok, "accepted: {body}");
        assert!(
            out.stderr.contains(&want),
            "{body}\nwant {want:?}\ngot {}",
            out.stderr
        );
    }
    let out = write(
        &dir,
        &format!(
            "[[pool]]\nname = \"a\"\n{}[[route]]\npool = \"a\"\n",
            table(31_100, 2, "")
        ),
    );
    assert!(out.ok, "{}", out.stderr);
    assert!(
        out.stdout
            .contains("pool a: 0 backends (+2 spawned instances"),
        "{}",
        out.stdout
    );
}
