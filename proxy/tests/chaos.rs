//! Chaos under a bounded load: backends killed and restarted, a backend that stalls, and a reload
//! plus a plugin swap every second. Each scenario prints its figures on a `chaos:` line.
//!
//! The test suite runs short smoke versions (a few seconds each); `scripts/chaos` runs them for
//! longer (`CHAOS_SECS`) and collects the figures for docs/reliability.md.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use sluice::cold_lock::ColdLock;
use std::time::{Duration, Instant};

use common::*;

/// How long each scenario runs.
fn chaos_time() -> Duration {
    let secs = std::env::var("CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4u64);
    Duration::from_secs(secs.clamp(1, 3600))
}

/// A keep-alive HTTP/1.1 backend that can be killed (listener closed, every connection cut) and
/// restarted on the same address, as a crashing and restarting server would be.
struct Killable {
    addr: SocketAddr,
    alive: Arc<AtomicBool>,
    conns: Arc<ColdLock<Vec<TcpStream>>>,
    served: Arc<AtomicU64>,
}

impl Killable {
    fn start() -> Killable {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let b = Killable {
            addr: l.local_addr().unwrap(),
            alive: Arc::new(AtomicBool::new(true)),
            conns: Arc::default(),
            served: Arc::default(),
        };
        b.serve(l);
        b
    }

    fn serve(&self, l: TcpListener) {
        let (alive, conns, served) = (self.alive.clone(), self.conns.clone(), self.served.clone());
        std::thread::spawn(move || {
            for s in l.incoming() {
                if !alive.load(Ordering::SeqCst) {
                    return; // dropping the listener refuses new connections
                }
                let Ok(mut s) = s else { continue };
                conns.lock().push(s.try_clone().unwrap());
                let served = served.clone();
                std::thread::spawn(move || {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 4096];
                    loop {
                        let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                            match s.read(&mut chunk) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                            continue;
                        };
                        let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
                        let len: usize = head
                            .lines()
                            .find_map(|l| l.strip_prefix("content-length:"))
                            .and_then(|v| v.trim().parse().ok())
                            .unwrap_or(0);
                        while buf.len() < end + 4 + len {
                            match s.read(&mut chunk) {
                                Ok(0) | Err(_) => return,
                                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                            }
                        }
                        buf.drain(..end + 4 + len);
                        served.fetch_add(1, Ordering::Relaxed);
                        if s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
                            .is_err()
                        {
                            return;
                        }
                    }
                });
            }
        });
    }

    /// Kills the server: no new connections, every open one cut.
    fn kill(&self) {
        self.alive.store(false, Ordering::SeqCst);
        // Wake the accept loop so it drops the listener.
        let _ = TcpStream::connect(self.addr);
        for c in self.conns.lock().drain(..) {
            let _ = c.shutdown(std::net::Shutdown::Both);
        }
    }

    /// Restarts it on the same address.
    fn restart(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        let l = loop {
            match TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20));
                }
                Err(e) => panic!("cannot restart the backend on {}: {e}", self.addr),
            }
        };
        self.alive.store(true, Ordering::SeqCst);
        self.serve(l);
    }
}

fn state_of(proxy: &Proxy, addr: SocketAddr) -> String {
    backend_field(proxy, &addr.to_string(), "state")
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Runs GETs (and, on one thread, POSTs) against `addr` until `stop`; returns
/// (GETs, GETs failed, POSTs, POSTs failed).
fn load_until(addr: SocketAddr, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<[u64; 4]> {
    std::thread::spawn(move || {
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let (mut n, mut failed) = (0u64, 0u64);
                    let mut conn: Option<HttpConn> = None;
                    // Bounded in count as well as by `stop`.
                    while !stop.load(Ordering::Relaxed) && n < 1_000_000 {
                        let method = if t == 0 { "POST" } else { "GET" };
                        if conn.is_none() {
                            conn = HttpConn::connect(addr, Duration::from_secs(10)).ok();
                        }
                        let ok = match conn.as_mut() {
                            Some(c) => match c.request(method, "/", &[], b"x") {
                                Ok(r) => r.status == 200,
                                Err(_) => {
                                    conn = None;
                                    false
                                }
                            },
                            None => false,
                        };
                        n += 1;
                        if !ok {
                            failed += 1;
                            conn = None;
                        }
                    }
                    (t, n, failed)
                })
            })
            .collect();
        let mut out = [0u64; 4];
        for h in threads {
            let (t, n, failed) = h.join().unwrap();
            let i = if t == 0 { 2 } else { 0 };
            out[i] += n;
            out[i + 1] += failed;
        }
        out
    })
}

#[test]
fn backends_killed_and_restarted_under_load() {
    let backends: Vec<Killable> = (0..3).map(|_| Killable::start()).collect();
    let list: Vec<String> = backends.iter().map(|b| format!("\"{}\"", b.addr)).collect();
    let proxy = Proxy::start(
        "chaos-kill",
        &format!(
            "[[pool]]\nname = \"web\"\nbackends = [{}]\nretries = 2\nconnect_timeout = \"200ms\"\noutlier = {{ consecutive_failures = 3, base_ejection_time = \"1s\", max_ejection_time = \"2s\" }}\n[[route]]\npool = \"web\"\n",
            list.join(", ")
        ),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let load = load_until(proxy.listen, stop.clone());
    let end = Instant::now() + chaos_time();
    let mut kills = 0;
    let mut out_of_rotation = Vec::new();
    let mut i = 0;
    while Instant::now() < end {
        let b = &backends[i % backends.len()];
        i += 1;
        // Kill it once traffic reaches it.
        let before = b.served.load(Ordering::Relaxed);
        wait_for(Duration::from_secs(10), || {
            b.served.load(Ordering::Relaxed) > before
        });
        let killed_at = Instant::now();
        b.kill();
        kills += 1;
        if wait_for(Duration::from_secs(10), || {
            state_of(&proxy, b.addr) == "ejected"
        }) {
            out_of_rotation.push(killed_at.elapsed());
        }
        b.restart();
        // Back in rotation once its ejection ends and it serves again.
        let served = b.served.load(Ordering::Relaxed);
        assert!(
            wait_for(Duration::from_secs(20), || b.served.load(Ordering::Relaxed)
                > served),
            "a restarted backend never came back into rotation"
        );
    }
    stop.store(true, Ordering::Relaxed);
    let [gets, gets_failed, posts, posts_failed] = load.join().unwrap();
    let worst = out_of_rotation.iter().max().copied().unwrap_or_default();
    println!(
        "chaos: backends killed and restarted: {kills} kills, {gets} GETs ({gets_failed} failed), \
         {posts} POSTs ({posts_failed} failed), out of rotation after at most {worst:?} ({} of {kills} ejections seen)",
        out_of_rotation.len()
    );
    assert!(kills >= 1 && gets > 0);
    assert_eq!(
        gets_failed, 0,
        "idempotent requests were lost while backends died"
    );
    // A POST can fail only if it was in flight on the backend that died.
    assert!(
        posts_failed <= kills,
        "{posts_failed} POSTs failed over {kills} kills"
    );
    assert!(wait_for(Duration::from_secs(5), || proxy
        .metric("sluice_backend_inflight{")
        == 0.0));
}

#[test]
fn a_reload_and_a_plugin_swap_every_second_fail_no_request() {
    let b = backends(3);
    let list = backend_list(&b);
    // Alternately adds and removes a pool and changes a pool setting, so each reload changes
    // something.
    let config = |extra_pool: bool, slow_start_ms: usize| {
        let mut text = format!(
            "[[pool]]\nname = \"web\"\nbackends = [{list}]\nslow_start = \"{slow_start_ms}ms\"\n[[route]]\npath_prefix = \"/\"\npool = \"web\"\n"
        );
        if extra_pool {
            text.push_str(&format!("[[pool]]\nname = \"extra\"\nbackends = [{list}]\nstrategy = \"builtin:random\"\n[[route]]\npath_prefix = \"/extra\"\npool = \"extra\"\n"));
        }
        text
    };
    let proxy = Proxy::start("chaos-reload", &config(false, 0));
    let stop = Arc::new(AtomicBool::new(false));
    let load = load_until(proxy.listen, stop.clone());
    let end = Instant::now() + chaos_time();
    let (mut reloads, mut swaps) = (0, 0);
    let plugins = ["round-robin", "random", "least-connections", "p2c"];
    let served = || -> u64 {
        b.iter()
            .map(|(_, x)| x.served.load(Ordering::Relaxed))
            .sum()
    };
    // The reloads must overlap the load: it is under way before the first one...
    assert!(
        wait_for(Duration::from_secs(10), || served() > 100),
        "the load did not start"
    );
    let served_at_first = served();
    while Instant::now() < end {
        proxy.reload_with(&config(reloads % 2 == 0, 100 * (reloads % 3)));
        reloads += 1;
        let wasm = sluice::builtin::get(plugins[swaps % plugins.len()]).unwrap();
        let r = proxy.put_strategy("web", wasm);
        assert_eq!(r.status, 200, "{}", r.text());
        swaps += 1;
        // One a second, while the load runs.
        let next = Instant::now() + Duration::from_secs(1);
        while Instant::now() < next.min(end) {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    // ...and still running after the last.
    let served_at_last = served();
    assert!(
        wait_for(Duration::from_secs(10), || served() > served_at_last),
        "no request was served after the last reload"
    );
    assert!(
        served_at_last > served_at_first,
        "no request between the reloads"
    );
    stop.store(true, Ordering::Relaxed);
    let [gets, gets_failed, posts, posts_failed] = load.join().unwrap();
    println!(
        "chaos: reload and plugin swap every second: {reloads} reloads, {swaps} swaps, {gets} GETs ({gets_failed} failed), {posts} POSTs ({posts_failed} failed)"
    );
    assert!(gets > 0 && reloads >= 1);
    assert_eq!((gets_failed, posts_failed), (0, 0));
    assert_eq!(
        proxy.metric("sluice_fallback_picks_total{pool=\"web\"}"),
        0.0
    );
    assert!(wait_for(Duration::from_secs(5), || proxy
        .metric("sluice_backend_inflight{")
        == 0.0));
}

#[test]
fn a_stalled_backend_is_ejected_and_the_rest_keep_serving() {
    let b = backends(3);
    let proxy = Proxy::start(
        "chaos-stall",
        &format!(
            "[[pool]]\nname = \"web\"\nbackends = [{}]\nread_timeout = \"300ms\"\noutlier = {{ consecutive_failures = 3, base_ejection_time = \"60s\" }}\n[[route]]\npool = \"web\"\n",
            backend_list(&b)
        ),
    );
    let stop = Arc::new(AtomicBool::new(false));
    let load = load_until(proxy.listen, stop.clone());
    wait_for(Duration::from_secs(10), || {
        b[0].1.served.load(Ordering::Relaxed) > 10
    });
    let stalled_at = Instant::now();
    b[0].1.delay_ms.store(60_000, Ordering::Relaxed);
    let stalled = b[0].0.to_string();
    assert!(
        wait_for(Duration::from_secs(20), || {
            backend_field(&proxy, &stalled, "state") == "ejected"
        }),
        "the stalled backend was never ejected"
    );
    let ejected_after = stalled_at.elapsed();
    // From now on nothing reaches it; the others serve everything.
    let others = || -> u64 {
        b[1..]
            .iter()
            .map(|(_, x)| x.served.load(Ordering::Relaxed))
            .sum()
    };
    let served = others();
    let until = Instant::now() + chaos_time();
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(50));
    }
    stop.store(true, Ordering::Relaxed);
    let [gets, gets_failed, posts, posts_failed] = load.join().unwrap();
    println!(
        "chaos: a stalled backend: ejected after {ejected_after:?}; {gets} GETs ({gets_failed} failed), {posts} POSTs ({posts_failed} failed)"
    );
    assert!(others() > served, "the other backends stopped serving");
    // Only requests caught on the stalled backend before its ejection fail (read timeout): at most
    // the ejection threshold per load thread.
    assert!(
        gets_failed + posts_failed <= 3 * 4,
        "{} requests failed",
        gets_failed + posts_failed
    );
    b[0].1.delay_ms.store(0, Ordering::Relaxed);
}

#[test]
fn a_proxy_of_three_killed_and_restarted_leaves_the_others_serving() {
    let b = backends(2);
    let dir = scratch_dir("chaos-cluster");
    let pool = "[[pool]]\nname = \"web\"\n[[route]]\npool = \"web\"\n";
    let seeds = [gossip_addr(61), gossip_addr(62), gossip_addr(63)];
    let mut proxies: Vec<Proxy> = (0..3)
        .map(|i| {
            let d = dir.sub(&format!("p{i}"));
            let peers: Vec<SocketAddr> = seeds[..i].to_vec();
            Proxy::start_in(
                d,
                &format!(
                    "{pool}{}",
                    cluster_section(&format!("proxy-{i}"), seeds[i], CLUSTER_KEY, &peers)
                ),
            )
        })
        .collect();
    let _agents: Vec<Agent> = (0..2)
        .map(|i| {
            Agent::start(
                &dir,
                &format!("agent-{i}"),
                &cluster_section(
                    &format!("agent-{i}"),
                    gossip_addr(71 + i as u8),
                    CLUSTER_KEY,
                    &seeds,
                ),
                b[i].0,
            )
        })
        .collect();
    for p in &proxies {
        assert!(
            wait_for(Duration::from_secs(30), || routable(p) == 2),
            "cluster never formed: {}",
            p.log()
        );
    }
    // Load on the first two proxies while the third dies and comes back, again and again.
    let stop = Arc::new(AtomicBool::new(false));
    let loads = [
        load_until(proxies[0].listen, stop.clone()),
        load_until(proxies[1].listen, stop.clone()),
    ];
    let end = Instant::now() + chaos_time();
    let (mut restarts, mut converged) = (0, Vec::new());
    let served = || -> u64 {
        b.iter()
            .map(|(_, x)| x.served.load(Ordering::Relaxed))
            .sum()
    };
    while Instant::now() < end {
        // Each restart must overlap the load on the other two proxies.
        let before = served();
        assert!(
            wait_for(Duration::from_secs(10), || served() > before + 50),
            "the load stopped"
        );
        let since = Instant::now();
        proxies[2].kill();
        proxies[2].restart();
        restarts += 1;
        assert!(
            wait_for(Duration::from_secs(30), || routable(&proxies[2]) == 2),
            "the restarted proxy's pool never filled: {}",
            proxies[2].log()
        );
        converged.push(since.elapsed());
        // The others never lose their members while it is away.
        assert_eq!(routable(&proxies[0]), 2);
    }
    stop.store(true, Ordering::Relaxed);
    let mut totals = [0u64; 4];
    for l in loads {
        for (t, v) in totals.iter_mut().zip(l.join().unwrap()) {
            *t += v;
        }
    }
    let [gets, gets_failed, posts, posts_failed] = totals;
    let worst = converged.iter().max().copied().unwrap_or_default();
    println!(
        "chaos: a proxy of three killed and restarted: {restarts} restarts, back with a full pool at most {worst:?} after the kill; \
         the other two: {gets} GETs ({gets_failed} failed), {posts} POSTs ({posts_failed} failed)"
    );
    assert!(gets > 0);
    assert_eq!((gets_failed, posts_failed), (0, 0));
}
