//! Heap allocations per proxied request, counted by a global allocator in the proxy's own
//! process, for three servers: sluice on its lean HTTP/1 path, sluice on pingora-proxy's path,
//! and a plain pingora-proxy with no sluice logic (one fixed upstream peer). `lean-rules` is the
//! lean path on a route with every rule kind (method, header and regex match, path rewrite,
//! request and response header edits).
//!
//!     cargo bench -p sluice --bench allocs            # all three, a table
//!     ALLOC_REQUESTS=50000 cargo bench -p sluice --bench allocs
//!
//! Each server runs in a child process of this bench (pingora owns its process). The load
//! client and the backend run in that process too, on threads that do not count, so the figure
//! is what the proxy's threads allocate. Background work (pool upkeep, health timers) is taken
//! out by subtracting an idle period of the same length measured right before.

use std::alloc::{GlobalAlloc, Layout};
use std::cell::Cell;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Counts allocations made by threads that are not marked as load/backend threads.
struct Counting;

static ALLOCS: AtomicU64 = AtomicU64::new(0);
static BYTES: AtomicU64 = AtomicU64::new(0);

thread_local! {
    /// Set on the bench's own threads (client, backend): their allocations do not count.
    static EXCLUDED: Cell<bool> = const { Cell::new(false) };
}

fn count(size: usize) {
    if !EXCLUDED.try_with(Cell::get).unwrap_or(true) {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        BYTES.fetch_add(size as u64, Ordering::Relaxed);
    }
}

// SAFETY: every call is forwarded unchanged to mimalloc, which upholds GlobalAlloc's contract;
// counting touches only atomics and a const-initialised thread-local (no allocation).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { mimalloc::MiMalloc.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        count(layout.size());
        // SAFETY: forwarded with the caller's layout.
        unsafe { mimalloc::MiMalloc.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        count(new_size);
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { mimalloc::MiMalloc.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { mimalloc::MiMalloc.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn exclude_this_thread() {
    EXCLUDED.with(|e| e.set(true));
}

const RESPONSE: &[u8] =
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok";

/// A keep-alive backend answering every request with a fixed 200.
fn backend() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        exclude_this_thread();
        for c in l.incoming() {
            let Ok(mut c) = c else { return };
            std::thread::spawn(move || {
                exclude_this_thread();
                let mut buf = [0u8; 8192];
                let mut have = 0;
                loop {
                    let Ok(n) = c.read(&mut buf[have..]) else {
                        return;
                    };
                    if n == 0 {
                        return;
                    }
                    have += n;
                    // Requests carry no body here: answer each complete head.
                    while let Some(end) = buf[..have].windows(4).position(|w| w == b"\r\n\r\n") {
                        if c.write_all(RESPONSE).is_err() {
                            return;
                        }
                        buf.copy_within(end + 4..have, 0);
                        have -= end + 4;
                    }
                }
            });
        }
    });
    addr
}

fn free_addr() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

/// Sends `n` GETs over each of `conns` kept-alive connections; returns responses received.
fn load(proxy: SocketAddr, conns: usize, n: usize) -> usize {
    let handles: Vec<_> = (0..conns)
        .map(|_| {
            std::thread::spawn(move || {
                exclude_this_thread();
                let mut c = TcpStream::connect(proxy).unwrap();
                c.set_nodelay(true).unwrap();
                let mut buf = [0u8; 4096];
                let mut ok = 0;
                for _ in 0..n {
                    c.write_all(
                        b"GET /bench HTTP/1.1\r\nHost: bench\r\nUser-Agent: allocs\r\n\r\n",
                    )
                    .unwrap();
                    let mut have = 0;
                    // Every response ends with the 2-byte body "ok".
                    while !(have >= 4 && buf[..have].ends_with(b"\r\n\r\nok")) {
                        let got = c.read(&mut buf[have..]).unwrap();
                        assert!(got > 0, "proxy closed the connection");
                        have += got;
                    }
                    if buf.starts_with(b"HTTP/1.1 200") {
                        ok += 1;
                    }
                }
                ok
            })
        })
        .collect();
    handles.into_iter().map(|h| h.join().unwrap()).sum()
}

fn wait_listening(addr: SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(addr).is_err() {
        assert!(Instant::now() < deadline, "{addr} never came up");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs in the child: starts `mode`'s server, measures, prints one result line, exits.
fn child(mode: &str, requests: usize) -> ! {
    let upstream = backend();
    let listen = free_addr();
    match mode {
        "plain-pingora" => {
            std::thread::spawn(move || plain_pingora(listen, upstream));
        }
        mode => {
            let admin = free_addr();
            let (engine, rules) = match mode.strip_suffix("-rules") {
                Some(engine) => (
                    engine,
                    "methods = [\"GET\"]\nheaders = { user-agent = \"allocs\" }\npath_regex = \"^/bench$\"\n\
                     replace_prefix = { from = \"/bench\", to = \"/b\" }\n\
                     request_headers = { set = { x-a = \"1\" }, add = { x-b = \"2\" }, remove = [\"user-agent\"] }\n\
                     response_headers = { set = { x-c = \"3\" }, remove = [\"content-type\"] }\n",
                ),
                None => (mode, ""),
            };
            let text = format!(
                "[server]\nlisten = [\"{listen}\"]\nthreads = 1\nhttp1 = \"{engine}\"\n[admin]\nlisten = \"{admin}\"\n\
                 [[pool]]\nname = \"bench\"\nstrategy = \"builtin:round-robin\"\nbackends = [\"{upstream}\"]\n\
                 [[route]]\npath_prefix = \"/\"\npool = \"bench\"\n{rules}"
            );
            let cfg = sluice::config::Config::parse(&text, "bench.toml", std::path::Path::new("."))
                .unwrap();
            std::thread::spawn(move || sluice::server::run(cfg, None, false, |_| {}).unwrap());
        }
    }
    wait_listening(listen);
    let conns = 4;
    let per_conn = requests / conns;
    // Warm up: connections, pools, lazily built state.
    load(listen, conns, 500);
    let t = Instant::now();
    let (a0, b0) = (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    let ok = load(listen, conns, per_conn);
    let took = t.elapsed();
    let (a1, b1) = (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    // The idle baseline: as long as the measurement, no requests.
    std::thread::sleep(took);
    let (a2, b2) = (
        ALLOCS.load(Ordering::Relaxed),
        BYTES.load(Ordering::Relaxed),
    );
    assert_eq!(ok, conns * per_conn, "every request must be answered 200");
    let idle = a2 - a1;
    let busy = (a1 - a0).saturating_sub(idle);
    let busy_bytes = (b1 - b0).saturating_sub(b2 - b1);
    println!(
        "RESULT {mode} {ok} {:.2} {:.0} {idle}",
        busy as f64 / ok as f64,
        busy_bytes as f64 / ok as f64
    );
    std::process::exit(0);
}

/// pingora-proxy with nothing of sluice: every request to one fixed peer.
fn plain_pingora(listen: SocketAddr, upstream: SocketAddr) {
    use pingora::prelude::*;
    use pingora::server::configuration::ServerConf;
    struct Plain(SocketAddr);
    #[async_trait::async_trait]
    impl pingora::proxy::ProxyHttp for Plain {
        type CTX = ();
        fn new_ctx(&self) {}
        async fn upstream_peer(
            &self,
            _s: &mut pingora::proxy::Session,
            _c: &mut (),
        ) -> Result<Box<HttpPeer>> {
            Ok(Box::new(HttpPeer::new(self.0, false, String::new())))
        }
    }
    let conf = ServerConf {
        threads: 1,
        work_stealing: false,
        ..ServerConf::default()
    };
    let mut server = pingora::server::Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let mut svc = pingora::proxy::http_proxy_service(&server.configuration, Plain(upstream));
    svc.add_tcp(&listen.to_string());
    server.add_service(svc);
    server.run_forever();
}

fn main() {
    let requests: usize = std::env::var("ALLOC_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000)
        .max(1000);
    if let Ok(mode) = std::env::var("ALLOC_MODE") {
        child(&mode, requests);
    }
    // `cargo bench` passes `--bench`; a filter argument picks modes.
    let filter: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with("--"))
        .collect();
    let me = std::env::current_exe().unwrap();
    println!("heap allocations per proxied request (whole proxy process, keep-alive GET, {requests} requests over 4 connections)");
    println!("| server | requests | allocations per request | bytes allocated per request | background allocations in an equal idle period |");
    println!("|---|---:|---:|---:|---:|");
    for mode in ["lean", "lean-rules", "pingora", "plain-pingora"] {
        if !filter.is_empty() && !filter.iter().any(|f| mode.contains(f.as_str())) {
            continue;
        }
        let out = std::process::Command::new(&me)
            .env("ALLOC_MODE", mode)
            .env("ALLOC_REQUESTS", requests.to_string())
            .env("SLUICE_LOG", "error")
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        match text.lines().find_map(|l| l.strip_prefix("RESULT ")) {
            Some(r) => {
                let f: Vec<&str> = r.split(' ').collect();
                let label = match f[0] {
                    "lean" => "sluice, lean HTTP/1 path",
                    "lean-rules" => "sluice, lean path, route with every rule kind",
                    "pingora" => "sluice, pingora-proxy path",
                    _ => "plain pingora-proxy (no sluice logic)",
                };
                println!("| {label} | {} | {} | {} | {} |", f[1], f[2], f[3], f[4]);
            }
            None => {
                eprintln!(
                    "{mode}: no result\n{text}\n{}",
                    String::from_utf8_lossy(&out.stderr)
                );
                std::process::exit(1);
            }
        }
    }
}
