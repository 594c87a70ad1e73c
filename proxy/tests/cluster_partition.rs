//! A network partition, for real and under load: a proxy, three agents and their HTTP backends
//! run inside a network namespace this test creates, and nftables in that namespace cuts one agent
//! (gossip and backend) off. It is declared down and leaves the pool; when the rule is removed it
//! rejoins and the pool converges again. All the while a client in the namespace sends GETs
//! through the proxy, and none of them may fail. Everything is observed through the CLI
//! (`sluice cluster info`) and the admin API, run inside the namespace.
//!
//! Skipped, with the reason printed, where namespaces cannot be created (no root, no iproute2).

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const KEY: &str = "c2x1aWNlLXRlc3Qta2V5LTMyLWJ5dGVzLWxvbmchISE=";

struct Netns(String);

impl Netns {
    fn create(name: &str) -> Result<Netns, String> {
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        let out = Command::new("ip")
            .args(["netns", "add", name])
            .output()
            .map_err(|e| format!("ip: {e}"))?;
        if !out.status.success() {
            return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
        }
        let ns = Netns(name.to_string());
        ns.run(&["ip", "link", "set", "lo", "up"])?;
        Ok(ns)
    }

    fn cmd(&self, args: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(args);
        c
    }

    fn run(&self, args: &[&str]) -> Result<String, String> {
        let out = self.cmd(args).output().map_err(|e| e.to_string())?;
        if !out.status.success() {
            return Err(format!(
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A keep-alive HTTP/1.1 server that writes each response in one write, so the partition cannot
/// cut a response between its head and its body (a response already under way is lost on any
/// proxy; the test counts requests, not that).
const BACKEND: &str = r#"
import socketserver, sys
class Handler(socketserver.StreamRequestHandler):
    def handle(self):
        while self.rfile.readline():
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            self.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
socketserver.ThreadingTCPServer.allow_reuse_address = True
socketserver.ThreadingTCPServer.daemon_threads = True
socketserver.ThreadingTCPServer((sys.argv[1], int(sys.argv[2])), Handler).serve_forever()
"#;

fn cluster(name: &str, ip: &str, peers: &str) -> String {
    format!("[cluster]\nname = \"part\"\nnode_name = \"{name}\"\nbind_addr = \"{ip}:7946\"\nkey = \"{KEY}\"\npeers = [{peers}]\nprofile = \"local\"\n")
}

fn wait_for(limit: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if cond() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

#[test]
fn a_partitioned_node_is_evicted_and_rejoins_after_healing() {
    let ns = match Netns::create(&format!("sluice-part-{}", std::process::id())) {
        Ok(ns) => ns,
        Err(why) => {
            println!("SKIPPED: cannot create a network namespace here ({why})");
            return;
        }
    };
    if ns.run(&["nft", "list", "tables"]).is_err() {
        println!("SKIPPED: nftables is not usable in the namespace (install the nftables package)");
        return;
    }
    let sluice = env!("CARGO_BIN_EXE_sluice");
    let dir = std::env::temp_dir().join(format!("sluice-part-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let mut procs = Procs(Vec::new());
    let spawn = |procs: &mut Procs, name: &str, args: &[&str]| {
        let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
        procs.0.push(
            ns.cmd(&[sluice])
                .args(args)
                .stdout(log.try_clone().unwrap())
                .stderr(log)
                .stdin(Stdio::null())
                .spawn()
                .unwrap(),
        );
    };

    let proxy_cfg = format!(
        "[server]\nlisten = [\"127.0.0.1:8080\"]\nthreads = 1\n[admin]\nlisten = \"127.0.0.1:9900\"\n\
         [[pool]]\nname = \"web\"\nconnect_timeout = \"300ms\"\nread_timeout = \"2s\"\n[[route]]\npool = \"web\"\n{}",
        cluster("proxy", "127.0.0.10", "")
    );
    std::fs::write(dir.join("proxy.toml"), proxy_cfg).unwrap();
    spawn(
        &mut procs,
        "proxy",
        &["run", "--config", dir.join("proxy.toml").to_str().unwrap()],
    );
    for i in 1..=3 {
        let ip = format!("127.0.0.{}", 20 + i);
        // The service the agent announces: a small HTTP server on its address.
        procs.0.push(
            ns.cmd(&["python3", "-c", BACKEND, &ip, "9000"])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        let cfg = format!(
            "{}[agent]\ndrain_grace = \"100ms\"\n[[service]]\npool = \"web\"\naddr = \"{ip}:9000\"\n",
            cluster(&format!("agent-{i}"), &ip, "\"127.0.0.10:7946\"")
        );
        let path = dir.join(format!("agent-{i}.toml"));
        std::fs::write(&path, cfg).unwrap();
        spawn(
            &mut procs,
            &format!("agent-{i}"),
            &["agent", "--config", path.to_str().unwrap()],
        );
    }

    let info = || ns.run(&[sluice, "cluster", "info"]).unwrap_or_default();
    let state_of = |name: &str| {
        // Columns: name role [zone] address state services; the zone may be empty, so find the
        // state as the word after the gossip address.
        info()
            .lines()
            .find(|l| l.split_whitespace().next() == Some(name))
            .and_then(|l| {
                let words: Vec<&str> = l.split_whitespace().collect();
                let at = words.iter().position(|w| w.ends_with(":7946"))?;
                words.get(at + 1).map(|s| s.to_string())
            })
            .unwrap_or_default()
    };
    let pool = || {
        ns.run(&["curl", "-s", "http://127.0.0.1:9900/api/pools"])
            .unwrap_or_default()
    };
    assert!(
        wait_for(Duration::from_secs(30), || pool()
            .matches("127.0.0.2")
            .count()
            == 3),
        "cluster never formed: {}\n{}",
        info(),
        std::fs::read_to_string(dir.join("proxy.log")).unwrap_or_default()
    );

    for i in 1..=3 {
        let url = format!("http://127.0.0.{}:9000/", 20 + i);
        assert!(
            wait_for(Duration::from_secs(30), || ns
                .run(&["curl", "-sf", "--max-time", "2", &url])
                .is_ok()),
            "backend {url} never answered"
        );
    }
    let t0 = Instant::now();
    // Load: batches of GETs through the proxy from inside the namespace (one curl per batch,
    // its connection kept alive), until told to stop, bounded in batches and time.
    let stop = Arc::new(AtomicBool::new(false));
    let partitioned = Arc::new(AtomicBool::new(false));
    let (ok, failed, during) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let load = {
        let (stop, partitioned) = (stop.clone(), partitioned.clone());
        let (ok, failed, during) = (ok.clone(), failed.clone(), during.clone());
        let batch = dir.join("batch.curl");
        let urls: String = (0..50)
            .map(|i| format!("url = \"http://127.0.0.1:8080/?n={i}\"\noutput = \"/dev/null\"\n"))
            .collect();
        std::fs::write(&batch, urls).unwrap();
        let ns_name = ns.0.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            let deadline = started + Duration::from_secs(180);
            for _ in 0..2_000 {
                if stop.load(Ordering::SeqCst) || Instant::now() > deadline {
                    break;
                }
                let during_partition = partitioned.load(Ordering::SeqCst);
                let out = Command::new("ip")
                    .args(["netns", "exec", &ns_name, "curl", "-s", "--max-time", "20"])
                    .args(["-w", "%{http_code}\\n", "-K"])
                    .arg(&batch)
                    .output()
                    .unwrap();
                for code in String::from_utf8_lossy(&out.stdout).lines() {
                    if code == "200" {
                        ok.fetch_add(1, Ordering::SeqCst);
                        if during_partition && partitioned.load(Ordering::SeqCst) {
                            during.fetch_add(1, Ordering::SeqCst);
                        }
                    } else {
                        failed.fetch_add(1, Ordering::SeqCst);
                        eprintln!(
                            "partition load: status {code} (partitioned: {during_partition}, at {:?})",
                            started.elapsed()
                        );
                    }
                }
            }
        })
    };
    assert!(
        wait_for(Duration::from_secs(30), || ok.load(Ordering::SeqCst) >= 100),
        "the load does not get through: {} ok, {} failed",
        ok.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst)
    );

    // Cut agent-3 off: drop everything from and to its address.
    for rule in [
        "add table inet partition",
        "add chain inet partition input { type filter hook input priority 0; policy accept; }",
        "add rule inet partition input ip saddr 127.0.0.23 drop",
        "add rule inet partition input ip daddr 127.0.0.23 drop",
    ] {
        let mut args = vec!["nft"];
        args.extend(rule.split(' '));
        // nft takes the rule as separate words; braces and semicolons are words of their own.
        ns.run(&args).unwrap();
    }
    partitioned.store(true, Ordering::SeqCst);
    eprintln!("partition: cut at {:?}", t0.elapsed());
    assert!(
        wait_for(Duration::from_secs(30), || state_of("agent-3") == "down"),
        "not declared down: {}",
        info()
    );
    assert!(
        wait_for(Duration::from_secs(10), || !pool().contains("127.0.0.23")),
        "not evicted from the pool: {}",
        pool()
    );
    assert_eq!(state_of("agent-1"), "alive", "{}", info());

    // Requests kept flowing while it was cut off.
    assert!(
        wait_for(Duration::from_secs(30), || during.load(Ordering::SeqCst)
            >= 100),
        "no load overlapped the partition"
    );

    // Heal: it rejoins (with a newer identity) and the pool converges.
    partitioned.store(false, Ordering::SeqCst);
    eprintln!("partition: healed at {:?}", t0.elapsed());
    ns.run(&["nft", "delete", "table", "inet", "partition"])
        .unwrap();
    assert!(
        wait_for(Duration::from_secs(40), || state_of("agent-3") == "alive"),
        "did not rejoin: {}",
        info()
    );
    assert!(
        wait_for(Duration::from_secs(10), || pool()
            .matches("127.0.0.2")
            .count()
            == 3),
        "pool did not converge: {}",
        pool()
    );
    let after_heal = ok.load(Ordering::SeqCst);
    assert!(
        wait_for(Duration::from_secs(30), || ok.load(Ordering::SeqCst)
            >= after_heal + 100),
        "the load stopped after healing"
    );
    stop.store(true, Ordering::SeqCst);
    load.join().unwrap();
    println!(
        "chaos: agent partitioned and healed: {} GETs ok ({} while partitioned), {} failed",
        ok.load(Ordering::SeqCst),
        during.load(Ordering::SeqCst),
        failed.load(Ordering::SeqCst)
    );
    assert_eq!(
        failed.load(Ordering::SeqCst),
        0,
        "GETs failed across the partition"
    );
    drop(procs);
    let _ = std::fs::remove_dir_all(&dir);
}
