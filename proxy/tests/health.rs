//! Active health checks on real backends: fall/rise with traffic flowing, probe timeouts,
//! degraded weights, hot swap, and misbehaving health plugins that must never take a backend down.

mod common;

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;

fn health_of(proxy: &Proxy, addr: &str) -> serde_json::Value {
    let v = pools_json(proxy);
    v["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .find(|b| b["addr"] == addr)
        .unwrap()["health"]
        .clone()
}

fn http_health_pool(list: &str, extra: &str) -> String {
    format!(
        "[[pool]]\nname = \"web\"\nbackends = [{list}]\noutlier = {{ enabled = false }}\npanic_threshold = 0\n\
         health = {{ plugin = \"builtin:http\", interval = \"100ms\", jitter = \"10ms\", timeout = \"300ms\", rise = 2, fall = 2, config = {{ path = \"/healthz\" }} {extra} }}\n\
         [[route]]\npool = \"web\"\n"
    )
}

#[test]
fn failing_backend_leaves_after_fall_and_returns_after_rise_with_traffic_flowing() {
    let b = backends(3);
    let proxy = Proxy::start("health-fall", &http_health_pool(&backend_list(&b), ""));
    let bad = b[0].0.to_string();
    // New backends start unhealthy and join after their first pass.
    assert!(wait_for(Duration::from_secs(10), || (0..3).all(
        |i| health_of(&proxy, &b[i].0.to_string())["state"] == "healthy"
    )));

    b[0].1.status.store(500, Ordering::Relaxed);
    assert!(
        wait_for(Duration::from_secs(10), || health_of(&proxy, &bad)["state"]
            == "unhealthy"),
        "not marked down"
    );
    let h = health_of(&proxy, &bad);
    assert!(h["consecutive_fails"].as_u64().unwrap() >= 2, "{h}");
    assert!(
        h["last_result"].as_str().unwrap().contains("HTTP 500"),
        "{h}"
    );

    // While it is down, a bounded load loop never reaches it.
    let addr = proxy.listen;
    let results = bounded_load(4, 50, Duration::from_secs(30), move |c| {
        keepalive_get(c, addr, "/")
    });
    for r in &results {
        let r = r.as_ref().expect("request failed");
        assert_eq!(r.status, 200);
        assert_ne!(r.text().trim(), "b1", "routed to a down backend");
    }

    b[0].1.status.store(200, Ordering::Relaxed);
    assert!(
        wait_for(Duration::from_secs(10), || health_of(&proxy, &bad)["state"]
            == "healthy"),
        "not re-added"
    );
    assert!(
        health_of(&proxy, &bad)["consecutive_passes"]
            .as_u64()
            .unwrap()
            >= 2
    );
    assert!(wait_for(Duration::from_secs(5), || (0..6).any(|_| proxy
        .get("/")
        .text()
        .trim()
        == "b1")));
    // Up at start, down, up again: three changes for b1, one each for the others.
    assert!(proxy.metric("sluice_health_flaps_total{pool=\"web\"}") >= 5.0);
    assert!(proxy.metric("sluice_health_checks_total{pool=\"web\",result=\"fail\"}") >= 2.0);
}

#[test]
fn a_backend_that_never_answers_times_out_and_is_marked_down() {
    let b = backends(1);
    // Accepts connections and never answers.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let silent_addr = silent.local_addr().unwrap();
    let done = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop = done.clone();
    let holder = std::thread::spawn(move || {
        let mut held = Vec::new();
        silent.set_nonblocking(true).unwrap();
        let end = Instant::now() + Duration::from_secs(30);
        while Instant::now() < end && !stop.load(Ordering::Relaxed) {
            if let Ok((s, _)) = silent.accept() {
                held.push(s);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    let list = format!("\"{}\", \"{silent_addr}\"", b[0].0);
    let proxy = Proxy::start("health-timeout", &http_health_pool(&list, ""));
    assert!(wait_for(Duration::from_secs(10), || health_of(
        &proxy,
        &b[0].0.to_string()
    )["state"]
        == "healthy"));
    let h = health_of(&proxy, &silent_addr.to_string());
    assert_ne!(h["state"], "healthy", "{h}");
    assert!(wait_for(Duration::from_secs(10), || health_of(
        &proxy,
        &silent_addr.to_string()
    )["last_result"]
        .as_str()
        .unwrap_or("")
        .contains("timed out")));
    for _ in 0..10 {
        assert_eq!(proxy.get("/").text().trim(), "b1");
    }
    drop(proxy);
    done.store(true, Ordering::Relaxed);
    holder.join().unwrap();
}

/// A health plugin in WAT. `probe` returns a TCP-connect probe; `evaluate` says healthy when the
/// exchange completed. `bad` replaces the behaviour from the second call of each instance on:
/// `trap`, `loop` or `garbage` (a malformed probe). The trial run on a fresh instance passes.
fn wat_health(bad: &str) -> Vec<u8> {
    let (probe_bad, eval_bad) = match bad {
        "trap" => ("", "(if (i32.gt_u (global.get $calls) (i32.const 1)) (then unreachable))"),
        "loop" => ("", "(if (i32.gt_u (global.get $calls) (i32.const 1)) (then (loop $l (br $l))))"),
        "garbage" => ("(if (i32.gt_u (global.get $calls) (i32.const 1)) (then (return (i64.or (i64.shl (i64.const 2100) (i64.const 32)) (i64.const 1)))))", ""),
        _ => ("", ""),
    };
    let text = format!(
        r#"(module
  (memory (export "memory") 2)
  (data (i32.const 2048) "\00")
  (data (i32.const 2100) "\09")
  (global $calls (mut i32) (i32.const 0))
  (func (export "sluice_abi_version") (result i32) (i32.const 1))
  (func (export "sluice_plugin_kind") (result i32) (i32.const 1))
  (func (export "sluice_alloc") (param i32) (result i32) (i32.const 4096))
  (func (export "sluice_init") (param i32 i32) (result i32) (i32.const 0))
  (func (export "sluice_health_probe") (param i32 i32) (result i64)
    (global.set $calls (i32.add (global.get $calls) (i32.const 1)))
    {probe_bad}
    (i64.or (i64.shl (i64.const 2048) (i64.const 32)) (i64.const 1)))
  (func (export "sluice_health_evaluate") (param $p i32) (param i32) (result i32)
    {eval_bad}
    (if (result i32) (i32.eqz (i32.load8_u (local.get $p))) (then (i32.const 100)) (else (i32.const -1))))
)"#
    )
    .into_bytes();
    wat::parse_bytes(&text).expect("valid WAT").into_owned()
}

#[test]
fn misbehaving_health_plugins_never_mark_a_backend_down() {
    let b = backends(2);
    // fall = 1: a single counted failure would take a backend down.
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [{}]\noutlier = {{ enabled = false }}\n\
         health = {{ plugin = \"builtin:tcp\", interval = \"50ms\", jitter = \"5ms\", timeout = \"300ms\", rise = 1, fall = 1 }}\n[[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    let proxy = Proxy::start("health-bad", &body);
    let all_healthy =
        |proxy: &Proxy| (0..2).all(|i| health_of(proxy, &b[i].0.to_string())["state"] == "healthy");
    assert!(wait_for(Duration::from_secs(10), || all_healthy(&proxy)));

    for bad in ["trap", "loop", "garbage"] {
        let resp = proxy.admin_req("PUT", "/api/pools/web/health", &wat_health(bad));
        assert_eq!(resp.status, 200, "{bad}: {}", resp.text());
        let errors_before =
            proxy.metric("sluice_health_checks_total{pool=\"web\",result=\"error\"}");
        assert!(
            wait_for(Duration::from_secs(10), || proxy.metric(
                "sluice_health_checks_total{pool=\"web\",result=\"error\"}"
            ) >= errors_before + 3.0),
            "{bad}: no check errors counted"
        );
        assert!(
            all_healthy(&proxy),
            "{bad}: a plugin fault took a backend down: {}",
            pools_json(&proxy)
        );
        assert_eq!(
            proxy.metric("sluice_health_checks_total{pool=\"web\",result=\"fail\"}"),
            0.0,
            "{bad}"
        );
        for _ in 0..4 {
            assert_eq!(proxy.get("/").status, 200);
        }
    }
    assert!(proxy
        .log()
        .contains("health check error; backend state unchanged"));

    // Bad uploads are refused with the reason, and the running check stays.
    let before = pools_json(&proxy)["pools"][0]["health_check"]["sha256"].clone();
    for (wasm, expect) in [
        (b"junk".to_vec(), "not a valid WebAssembly module"),
        (
            wat_strategy(1, "(i32.const 0)", "(i32.const 0)"),
            "plugin is a strategy plugin, but a health plugin is needed here",
        ),
    ] {
        let r = proxy.admin_req("PUT", "/api/pools/web/health", &wasm);
        assert_eq!(r.status, 422, "{}", r.text());
        assert!(r.text().contains(expect), "{}", r.text());
    }
    assert_eq!(
        pools_json(&proxy)["pools"][0]["health_check"]["sha256"],
        before
    );
}

#[test]
fn health_swap_on_a_pool_without_checks_is_refused() {
    let b = backends(1);
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [{}]\n[[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    let proxy = Proxy::start("health-none", &body);
    let r = proxy.admin_req("PUT", "/api/pools/web/health", &wat_health(""));
    assert_eq!(r.status, 409, "{}", r.text());
    assert!(r.text().contains("has no health checks"), "{}", r.text());
}
