//! Ownership on the request path and of plugin instances, tried through a real sluice process:
//! in-flight slots are released whatever ends an attempt, a backend failing mid-body never yields
//! a good-looking response, removed pools leave no instances or series behind, and plugins cannot
//! flood the log.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;

/// Reads one request head from `s`; false when the connection ends first.
fn read_head(s: &mut TcpStream) -> bool {
    let mut buf = [0u8; 4096];
    let mut head = Vec::new();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return false,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    true
}

/// A backend that answers every request with a keep-alive response and then closes the
/// connection without saying so (as servers do after `keepalive_requests` or an idle timeout),
/// so the proxy's pooled connection to it is always stale on reuse. It closes only once the next
/// request has arrived, so the proxy cannot see the close coming and must retry every reuse.
fn closing_backend(stop: Arc<AtomicBool>) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            if stop.load(Ordering::Relaxed) {
                return;
            }
            let Ok(mut s) = conn else { continue };
            std::thread::spawn(move || {
                if !read_head(&mut s) {
                    return;
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
                // Closed after one answer, with no `Connection: close`, once the request that
                // reuses the connection has been sent (or the proxy drops it).
                read_head(&mut s);
            });
        }
    });
    addr
}

#[test]
fn in_flight_returns_to_zero_when_backends_close_kept_alive_connections() {
    let stop = Arc::new(AtomicBool::new(false));
    let b1 = closing_backend(stop.clone());
    let b2 = closing_backend(stop.clone());
    let proxy = Proxy::start(
        "leak",
        &format!(
            "[[pool]]\nname = \"web\"\nstrategy = \"builtin:least-connections\"\nbackends = [\"{b1}\", \"{b2}\"]\n[[route]]\npath_prefix = \"/\"\npool = \"web\"\n"
        ),
    );
    let addr = proxy.listen;
    let results = bounded_load(8, 150, Duration::from_secs(60), move |conn| {
        keepalive_get(conn, addr, "/")
    });
    let ok = results
        .iter()
        .filter(|r| r.as_ref().is_ok_and(|r| r.status == 200))
        .count();
    assert!(ok > 0, "no request succeeded");
    // The stale connections were retried (this is the path that leaked).
    assert!(
        proxy.metric("sluice_retries_total{pool=\"web\",reason=\"reused\"}") > 0.0,
        "no reused-connection retry happened, so the test did not exercise the leak: {}",
        proxy.admin_req("GET", "/metrics", b"").text()
    );
    // The last lease is released just after its client has the answer, so wait for it; a
    // leaked slot stays taken for good.
    for b in [b1, b2] {
        assert!(
            wait_for(Duration::from_secs(5), || backend_field(
                &proxy,
                &b.to_string(),
                "inflight"
            ) == 0),
            "in-flight of {b} stayed above 0 after the load"
        );
    }
    assert_eq!(proxy.metric("sluice_backend_inflight{"), 0.0);
    stop.store(true, Ordering::Relaxed);
}

/// A backend that sends a response head and part of the body, then closes the connection.
fn failing_midway(chunked: bool) -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut s) = conn else { continue };
            std::thread::spawn(move || {
                if !read_head(&mut s) {
                    return;
                }
                let part = vec![b'x'; 1024];
                let mut out = Vec::new();
                if chunked {
                    out.extend_from_slice(
                        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n",
                    );
                    out.extend_from_slice(&part);
                    out.extend_from_slice(b"\r\n");
                } else {
                    out.extend_from_slice(b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n");
                    out.extend_from_slice(&part);
                }
                let _ = s.write_all(&out);
                let _ = s.flush();
                std::thread::sleep(Duration::from_millis(100));
                // Dropped: the body ends early, which the proxy reads as a premature close.
            });
        }
    });
    addr
}

/// Everything the proxy sends for one request, until it closes the connection.
fn raw_exchange(addr: SocketAddr) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                panic!("the proxy kept the connection open after the backend failed")
            }
            Err(_) => break, // reset: also an abort
        }
    }
    out
}

fn one_backend_pool(b: SocketAddr) -> String {
    format!("[[pool]]\nname = \"web\"\nbackends = [\"{b}\"]\nretries = 0\n[[route]]\npath_prefix = \"/\"\npool = \"web\"\n")
}

#[test]
fn a_backend_failing_mid_body_aborts_the_client_connection() {
    for chunked in [false, true] {
        let b = failing_midway(chunked);
        let proxy = Proxy::start_full(scratch_dir("midbody"), "h2c = true", &one_backend_pool(b));
        let raw = raw_exchange(proxy.listen);
        let text = String::from_utf8_lossy(&raw);
        assert!(text.starts_with("HTTP/1.1 200"), "{text}");
        assert!(
            !text.contains("bad gateway") && !text.contains("backend failed"),
            "an error body was appended to the response: {text}"
        );
        let body_start = raw.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
        if chunked {
            assert!(
                !raw.ends_with(b"0\r\n\r\n"),
                "a truncated chunked body was terminated cleanly: {text}"
            );
        } else {
            assert!(
                raw.len() - body_start < 100_000,
                "got a full-length body from a failed backend"
            );
        }
        assert!(
            wait_for(Duration::from_secs(5), || proxy
                .metric("sluice_upstream_aborts_total{pool=\"web\"}")
                >= 1.0),
            "abort not counted"
        );
        assert!(
            proxy.log().contains("client connection aborted"),
            "abort not logged"
        );

        // HTTP/2 (h2c): the stream is reset, so curl reports a failure instead of a 200.
        let out = std::process::Command::new("curl")
            .args([
                "-s",
                "-o",
                "/dev/null",
                "--http2-prior-knowledge",
                "--max-time",
                "10",
            ])
            .arg(format!("http://{}/", proxy.listen))
            .output()
            .unwrap();
        assert!(
            !out.status.success(),
            "curl over h2 accepted a truncated response (chunked = {chunked})"
        );
        // The failed attempts were recorded as failures, and no slot stayed taken. curl can see
        // the stream reset before the proxy has dropped the request's lease, so wait for it.
        assert!(
            wait_for(Duration::from_secs(5), || proxy
                .metric("sluice_requests_total{backend=")
                >= 2.0),
            "the attempts were not recorded"
        );
        assert!(
            wait_for(Duration::from_secs(5), || proxy
                .metric("sluice_backend_inflight{")
                == 0.0),
            "an in-flight slot stayed taken"
        );
    }
}

/// A strategy that logs a line on every pick.
fn chatty_strategy() -> Vec<u8> {
    wat::parse_str(
        r#"(module
  (import "sluice" "log" (func $log (param i32 i32 i32)))
  (memory (export "memory") 2)
  (data (i32.const 16) "chatty plugin says hello")
  (func (export "sluice_abi_version") (result i32) (i32.const 1))
  (func (export "sluice_plugin_kind") (result i32) (i32.const 0))
  (func (export "sluice_alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "sluice_init") (param i32 i32) (result i32) (i32.const 0))
  (func (export "sluice_set_backends") (param i32 i32) (result i32) (i32.const 0))
  (func (export "sluice_pick") (param i32) (result i32)
    (call $log (i32.const 2) (i32.const 16) (i32.const 24))
    (i32.const 0))
)"#,
    )
    .unwrap()
}

#[test]
fn a_plugin_logging_on_every_pick_is_held_to_its_budget() {
    let b = backends(1);
    let proxy = Proxy::start(
        "chatty",
        &format!("[[pool]]\nname = \"web\"\nbackends = [{}]\n[[route]]\npath_prefix = \"/\"\npool = \"web\"\n", backend_list(&b)),
    );
    let resp = proxy.put_strategy("web", &chatty_strategy());
    assert_eq!(resp.status, 200, "{}", resp.text());
    let addr = proxy.listen;
    let started = std::time::Instant::now();
    let results = bounded_load(4, 250, Duration::from_secs(30), move |conn| {
        keepalive_get(conn, addr, "/")
    });
    let secs = started.elapsed().as_secs() + 1;
    assert!(results
        .iter()
        .all(|r| r.as_ref().is_ok_and(|r| r.status == 200)));
    let lines = proxy.log().matches("chatty plugin says hello").count() as u64;
    // Two worker threads, so two instances (plus the validation instance's trial pick): each may
    // write 20 lines a second.
    let budget = 20 * 3 * (secs + 1);
    assert!(lines > 0, "the plugin's lines are logged at all");
    assert!(
        lines <= budget,
        "{lines} plugin lines in {secs} s exceed the budget of {budget}"
    );
    let dropped = proxy.metric("sluice_plugin_log_dropped_total{kind=\"strategy\",pool=\"web\"}");
    assert!(
        dropped as u64 + lines >= 1000,
        "every pick either logged or was counted as dropped ({dropped} dropped, {lines} logged)"
    );
}

/// VmRSS of `pid` in KiB.

#[test]
fn pools_added_and_removed_2000_times_free_their_instances_and_series() {
    let b = backends(2);
    let list = backend_list(&b);
    let base = format!(
        "[[pool]]\nname = \"web\"\nbackends = [{list}]\n[[route]]\npath_prefix = \"/\"\npool = \"web\"\n"
    );
    let proxy = Proxy::start("cycles", &base);
    let with_tmp = |i: usize| {
        format!(
            "{base}[[pool]]\nname = \"tmp{i}\"\nbackends = [{list}]\n[[route]]\npath_prefix = \"/tmp\"\npool = \"tmp{i}\"\n"
        )
    };
    let mut conn = None;
    let mut start_rss = 0;
    for i in 0..2000 {
        if i == 100 {
            // Allocators and caches have settled.
            start_rss = proc_status_kib(proxy.pid(), "VmRSS:");
        }
        proxy.reload_with(&with_tmp(i));
        // Two requests over two connections reach both worker threads' instances.
        for _ in 0..2 {
            let r = keepalive_get(&mut conn, proxy.listen, "/tmp").unwrap();
            assert_eq!(r.status, 200);
            conn = None;
        }
        proxy.reload_with(&base);
    }
    let text = proxy.admin_req("GET", "/metrics", b"").text();
    assert!(
        !text.contains("pool=\"tmp"),
        "removed pools left series behind"
    );
    // The instance slots were freed: a hot swap of the remaining pool still succeeds and its
    // picks are the plugin's.
    let resp = proxy.put_strategy("web", &first_only());
    assert_eq!(resp.status, 200, "{}", resp.text());
    for _ in 0..20 {
        assert_eq!(proxy.get("/").status, 200);
    }
    assert_eq!(
        proxy.metric("sluice_fallback_picks_total{pool=\"web\"}"),
        0.0
    );
    let end_rss = proc_status_kib(proxy.pid(), "VmRSS:");
    assert!(
        end_rss * 10 <= start_rss * 11,
        "RSS grew from {start_rss} KiB to {end_rss} KiB over 1900 add/remove cycles"
    );
}

#[test]
fn a_rejected_reload_adds_no_series() {
    let b = backends(1);
    let base = format!(
        "[[pool]]\nname = \"web\"\nbackends = [{}]\n[[route]]\npath_prefix = \"/\"\npool = \"web\"\n",
        backend_list(&b)
    );
    let proxy = Proxy::start("rejected", &base);
    let series = |p: &Proxy| -> Vec<String> {
        let mut v: Vec<String> = p
            .admin_req("GET", "/metrics", b"")
            .text()
            .lines()
            .filter(|l| !l.starts_with('#') && !l.starts_with("sluice_config_reloads_total"))
            .map(|l| l.rsplit_once(' ').unwrap().0.to_string())
            .collect();
        v.sort();
        v
    };
    let before = series(&proxy);
    let wasm = proxy.dir.join("bad.wasm");
    std::fs::write(&wasm, b"\0asm\x01\0\0\0garbage").unwrap();
    let head = std::fs::read_to_string(&proxy.config_path).unwrap();
    std::fs::write(
        &proxy.config_path,
        format!(
            "{head}[[pool]]\nname = \"new\"\nstrategy = \"bad.wasm\"\nbackends = [\"127.0.0.1:1\"]\n"
        ),
    )
    .unwrap();
    let r = proxy.admin_req("POST", "/api/reload", b"");
    assert!(r.status >= 400, "{}", r.text());
    assert_eq!(
        series(&proxy),
        before,
        "a rejected reload changed the series"
    );
    assert_eq!(
        proxy.metric("sluice_config_reloads_total{result=\"rejected\"}"),
        1.0
    );
}
