//! Soak: load with plugin swaps, reloads that add and remove pools, membership churn and a
//! population of slow clients, then checks that nothing accumulated: RSS after warm-up, file
//! descriptors and metric series back at their baseline, no failed request.
//!
//! The test suite runs a smoke version of a few seconds; `scripts/soak` runs it for 30 minutes
//! (`SOAK_SECS`) and prints the figures for docs/reliability.md. RSS growth is asserted (≤ 5 %)
//! only on runs of 5 minutes or more: over a few seconds allocator warm-up dominates.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn soak_time() -> Duration {
    let secs = std::env::var("SOAK_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(6u64);
    Duration::from_secs(secs.clamp(2, 24 * 3600))
}

fn fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

fn series(proxy: &Proxy) -> usize {
    proxy
        .admin_req("GET", "/metrics", b"")
        .text()
        .lines()
        .filter(|l| !l.starts_with('#'))
        .count()
}

#[test]
fn nothing_accumulates_under_load_and_churn() {
    let b = backends(3);
    let all = backend_list(&b);
    let two = backend_list(&b[..2]);
    // Short upstream idle timeout, so pooled connections go back to baseline quickly at the end.
    let config = |list: &str, tmp: bool| {
        let mut text = format!("[[pool]]\nname = \"web\"\nbackends = [{list}]\nidle_timeout = \"500ms\"\n[[route]]\npath_prefix = \"/\"\npool = \"web\"\n");
        if tmp {
            text.push_str(&format!("[[pool]]\nname = \"tmp\"\nbackends = [{list}]\nidle_timeout = \"500ms\"\n[[route]]\npath_prefix = \"/tmp\"\npool = \"tmp\"\n"));
        }
        text
    };
    let proxy = Proxy::start("soak", &config(&all, false));
    let pid = proxy.pid();
    // One reload first, so the reload counter's series is part of the baseline.
    assert_eq!(proxy.admin_req("POST", "/api/reload", b"").status, 200);
    let base_fds = fds(pid);
    let base_series = series(&proxy);
    let total = soak_time();
    let started = Instant::now();
    let stop = Arc::new(AtomicBool::new(false));

    // Load: 4 kept-alive clients, GETs to both pools.
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let addr = proxy.listen;
    let loaders: Vec<_> = (0..4)
        .map(|t| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut conn = None;
                let path = if t % 2 == 0 { "/" } else { "/tmp/x" };
                while !stop.load(Ordering::Relaxed) {
                    match keepalive_get(&mut conn, addr, path) {
                        // /tmp may be routed to "web" while the tmp pool is absent: both are 200.
                        Ok(r) if r.status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                        _ => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();

    // Slow clients: each sends a request head one byte every 200 ms, then starts over.
    let slow: Vec<_> = (0..16)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let head = b"GET / HTTP/1.1\r\nHost: slow\r\nX-Pad: aaaaaaaaaaaaaaaa\r\n\r\n";
                while !stop.load(Ordering::Relaxed) {
                    let Ok(mut s) = TcpStream::connect(addr) else {
                        std::thread::sleep(Duration::from_millis(200));
                        continue;
                    };
                    for byte in head.chunks(1) {
                        if stop.load(Ordering::Relaxed) || s.write_all(byte).is_err() {
                            break;
                        }
                        std::thread::sleep(Duration::from_millis(200));
                    }
                }
            })
        })
        .collect();

    // Churn once a second: a pool added or removed, a backend leaving or joining, and every
    // third second a plugin swap.
    let mut rss_after_warmup = 0;
    let plugins = ["round-robin", "least-connections", "random"];
    let mut tick = 0usize;
    while started.elapsed() < total {
        if rss_after_warmup == 0 && started.elapsed() >= total / 5 {
            rss_after_warmup = proc_status_kib(pid, "VmRSS:");
        }
        let list = if tick.is_multiple_of(2) { &two } else { &all };
        proxy.reload_with(&config(list, tick.is_multiple_of(2)));
        if tick.is_multiple_of(3) {
            let wasm = sluice::builtin::get(plugins[(tick / 3) % plugins.len()]).unwrap();
            assert_eq!(proxy.put_strategy("web", wasm).status, 200);
        }
        tick += 1;
        let next = Instant::now() + Duration::from_secs(1);
        while Instant::now() < next && started.elapsed() < total {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let rss_end = proc_status_kib(pid, "VmRSS:");
    stop.store(true, Ordering::Relaxed);
    for h in loaders.into_iter().chain(slow) {
        h.join().unwrap();
    }
    // Back to the starting config; then everything that was per-connection or per-pool must go.
    proxy.reload_with(&config(&all, false));
    let fds_back = wait_for(Duration::from_secs(10), || fds(pid) <= base_fds + 2);
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let growth = (rss_end as f64 / rss_after_warmup.max(1) as f64 - 1.0) * 100.0;
    println!(
        "soak: {:?}, {tick} churn rounds, {ok} requests ok, {failed} failed; RSS {rss_after_warmup} KiB after warm-up, \
         {rss_end} KiB at the end ({growth:+.1} %); fds {base_fds} at start, {} at the end; series {base_series} at start, {} at the end",
        total,
        fds(pid),
        series(&proxy)
    );
    assert!(ok > 0);
    assert_eq!(failed, 0, "requests failed during the soak");
    assert!(
        fds_back,
        "file descriptors did not return to the baseline ({base_fds}): {}",
        fds(pid)
    );
    assert_eq!(
        series(&proxy),
        base_series,
        "metric series did not return to the baseline"
    );
    if total >= Duration::from_secs(300) {
        assert!(growth <= 5.0, "RSS grew {growth:.1} % after warm-up");
    }
}
