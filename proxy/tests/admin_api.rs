//! The admin API as operators use it: draining, disabling and re-weighting a backend at run time
//! (effective at once, visible in /api/pools, kept across a reload, logged), its routing rules
//! (404, 405 with Allow, HEAD), and who may use it (token, protected reads, non-loopback refusal).

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;

const TOKEN: &str = "s3cret-admin-token";

fn authed(proxy: &Proxy, method: &str, path: &str, body: &[u8]) -> HttpResponse {
    let auth = format!("Bearer {TOKEN}");
    request(proxy.admin, method, path, &[("authorization", &auth)], body).unwrap()
}

fn state_of(proxy: &Proxy, addr: &str) -> String {
    backend_field(proxy, addr, "state")
        .as_str()
        .unwrap()
        .to_string()
}

fn served_by(proxy: &Proxy, n: usize) -> std::collections::BTreeMap<String, usize> {
    tally((0..n).map(|_| {
        let r = proxy.get("/");
        assert_eq!(r.status, 200, "{}", r.text());
        r.text()
    }))
}

/// Pools with health checks every 100 ms (so disabling visibly stops them) over `list`. The
/// generous timeout and fall keep a slow probe on a loaded machine from taking a backend out,
/// which would upset the exact tallies.
fn pool_with_health(list: &str, strategy: &str) -> String {
    format!(
        "token = \"{TOKEN}\"\n[[pool]]\nname = \"web\"\nstrategy = \"{strategy}\"\nbackends = [{list}]\n\
         health = {{ plugin = \"builtin:http\", interval = \"100ms\", jitter = \"10ms\", timeout = \"2s\", rise = 1, fall = 3, config = {{ path = \"/healthz\" }} }}\n\
         [[route]]\npool = \"web\"\n"
    )
}

#[test]
fn drain_lets_in_flight_requests_finish_and_sends_new_ones_elsewhere() {
    let b = backends(2);
    let (a1, a2) = (b[0].0.to_string(), b[1].0.to_string());
    let proxy = Proxy::start(
        "admin-drain",
        &pool_with_health(&backend_list(&b), "builtin:round-robin"),
    );
    assert!(wait_for(Duration::from_secs(10), || state_of(&proxy, &a1)
        == "routable"
        && state_of(&proxy, &a2) == "routable"));

    // A slow request is in flight on b1 when it is drained.
    b[0].1.delay_ms.store(1500, Ordering::Relaxed);
    let listen = proxy.listen;
    let slow: Vec<_> = (0..2)
        .map(|_| std::thread::spawn(move || request(listen, "GET", "/", &[], b"").unwrap()))
        .collect();
    assert!(
        wait_for(Duration::from_secs(10), || backend_field(
            &proxy, &a1, "inflight"
        ) == 1),
        "no request reached b1"
    );
    let path = format!("/api/pools/web/backends/{a1}/drain");
    // Without the token nothing changes.
    assert_eq!(proxy.admin_req("POST", &path, b"").status, 401);
    let r = authed(&proxy, "POST", &path, b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(state_of(&proxy, &a1), "draining");
    b[0].1.delay_ms.store(0, Ordering::Relaxed);

    // New requests go to b2 only, at once.
    let seen = served_by(&proxy, 20);
    assert_eq!(seen.get("b2"), Some(&20), "{seen:?}");
    // The request that was in flight on b1 finishes normally.
    for t in slow {
        assert_eq!(t.join().unwrap().status, 200);
    }
    assert!(wait_for(Duration::from_secs(5), || state_of(&proxy, &a1)
        == "drained"));
    assert_eq!(backend_field(&proxy, &a1, "admin_mode"), "draining");
    assert!(proxy
        .log()
        .contains("backend changed through the admin API"));

    // Kept across a reload of the same config.
    assert_eq!(authed(&proxy, "POST", "/api/reload", b"").status, 200);
    let seen = served_by(&proxy, 10);
    assert_eq!(seen.get("b2"), Some(&10), "{seen:?}");

    // Undrain: b1 takes traffic again.
    let r = authed(
        &proxy,
        "POST",
        &format!("/api/pools/web/backends/{a1}/undrain"),
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    let seen = served_by(&proxy, 20);
    assert_eq!(seen.get("b1"), Some(&10), "{seen:?}");
    assert_eq!(state_of(&proxy, &a1), "routable");
}

#[test]
fn disable_stops_traffic_and_health_checks_and_weight_reshapes_the_split() {
    let b = backends(2);
    let (a1, a2) = (b[0].0.to_string(), b[1].0.to_string());
    let proxy = Proxy::start(
        "admin-disable",
        &pool_with_health(&backend_list(&b), "builtin:weighted-round-robin"),
    );
    assert!(wait_for(Duration::from_secs(10), || state_of(&proxy, &a1)
        == "routable"
        && state_of(&proxy, &a2) == "routable"));

    let r = authed(
        &proxy,
        "POST",
        &format!("/api/pools/web/backends/{a1}/disable"),
        b"",
    );
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(state_of(&proxy, &a1), "disabled");
    let seen = served_by(&proxy, 10);
    assert_eq!(seen.get("b2"), Some(&10), "{seen:?}");
    // No more health probes reach b1 (one already under way may still land).
    let before = b[0].1.served.load(Ordering::Relaxed);
    let b2_before = b[1].1.served.load(Ordering::Relaxed);
    assert!(wait_for(Duration::from_secs(10), || b[1]
        .1
        .served
        .load(Ordering::Relaxed)
        >= b2_before + 5));
    assert!(
        b[0].1.served.load(Ordering::Relaxed) <= before + 1,
        "a disabled backend is still health checked"
    );
    let r = authed(
        &proxy,
        "POST",
        &format!("/api/pools/web/backends/{a1}/enable"),
        b"",
    );
    assert_eq!(r.status, 200);
    assert!(wait_for(Duration::from_secs(10), || state_of(&proxy, &a1)
        == "routable"));

    // Weight 3 for b1 against b2's 1: three requests in four go to b1.
    let weight = format!("/api/pools/web/backends/{a1}/weight");
    for bad in [&b"0"[..], b"-1", b"\"heavy\"", b"{\"weight\": 2000000}"] {
        let r = authed(&proxy, "PUT", &weight, bad);
        assert_eq!(r.status, 400, "{}", r.text());
    }
    let r = authed(&proxy, "PUT", &weight, b"{\"weight\": 3}");
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(backend_field(&proxy, &a1, "weight_override"), 3);
    assert_eq!(backend_field(&proxy, &a1, "effective_weight"), 3);
    let seen = served_by(&proxy, 40);
    assert_eq!(seen.get("b1"), Some(&30), "{seen:?}");
    // DELETE goes back to the configured weight.
    assert_eq!(authed(&proxy, "DELETE", &weight, b"").status, 200);
    assert_eq!(backend_field(&proxy, &a1, "effective_weight"), 1);

    // Unknown pools and backends are named in a 404.
    let r = authed(
        &proxy,
        "POST",
        "/api/pools/nope/backends/1.2.3.4:5/drain",
        b"",
    );
    assert_eq!(r.status, 404);
    assert!(r.text().contains("no pool \\\"nope\\\""), "{}", r.text());
    let r = authed(
        &proxy,
        "POST",
        "/api/pools/web/backends/127.0.0.1:1/drain",
        b"",
    );
    assert_eq!(r.status, 404);
    assert!(r.text().contains("not a backend of pool"), "{}", r.text());
    let r = authed(
        &proxy,
        "POST",
        "/api/pools/web/backends/nonsense/drain",
        b"",
    );
    assert_eq!(r.status, 400);
}

#[test]
fn admin_routes_answer_404_405_and_head_and_can_protect_reads() {
    let b = backends(1);
    let body = format!(
        "token = \"{TOKEN}\"\nprotect_reads = true\n[[pool]]\nname = \"web\"\nbackends = [{}]\n[[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    let proxy = Proxy::start("admin-routes", &body);
    // Probes stay open; reads need the token.
    assert_eq!(proxy.admin_req("GET", "/healthz", b"").status, 200);
    assert_eq!(proxy.admin_req("GET", "/readyz", b"").status, 200);
    assert_eq!(proxy.admin_req("GET", "/api/pools", b"").status, 401);
    assert_eq!(proxy.admin_req("GET", "/metrics", b"").status, 401);
    assert_eq!(authed(&proxy, "GET", "/api/pools", b"").status, 200);
    // The dashboard's data follows protect_reads; the page and its files stay open.
    for path in ["/api/history", "/api/overview"] {
        assert_eq!(proxy.admin_req("GET", path, b"").status, 401, "{path}");
        assert_eq!(authed(&proxy, "GET", path, b"").status, 200, "{path}");
    }
    for (path, kind) in [
        ("/", "text/html; charset=utf-8"),
        ("/dashboard/app.js", "text/javascript; charset=utf-8"),
        ("/dashboard/style.css", "text/css; charset=utf-8"),
    ] {
        let r = proxy.admin_req("GET", path, b"");
        assert_eq!(r.status, 200, "{path}");
        assert_eq!(r.header("content-type"), Some(kind), "{path}");
        assert!(!r.body.is_empty(), "{path}");
    }
    assert_eq!(
        proxy.admin_req("GET", "/dashboard/nothing.js", b"").status,
        404
    );
    let r = authed(&proxy, "GET", "/api/history?seconds=soon", b"");
    assert_eq!(r.status, 400);
    assert!(r.text().contains("whole number of seconds"), "{}", r.text());
    // Unknown route: 404 (before any token check); wrong method: 405 with Allow.
    assert_eq!(proxy.admin_req("GET", "/api/nothing", b"").status, 404);
    assert_eq!(proxy.admin_req("GET", "/nothing", b"").status, 404);
    let r = proxy.admin_req("DELETE", "/api/pools", b"");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("GET, HEAD"));
    let r = proxy.admin_req("GET", "/api/reload", b"");
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow"), Some("POST"));
    // HEAD answers like GET, without a body.
    let get = authed(&proxy, "GET", "/metrics", b"");
    let head = authed(&proxy, "HEAD", "/metrics", b"");
    assert_eq!(head.status, 200);
    assert!(head.body.is_empty());
    assert_eq!(head.header("content-type"), get.header("content-type"));
    assert_eq!(proxy.admin_req("HEAD", "/healthz", b"").status, 200);
}

#[test]
fn an_open_admin_listener_on_the_network_is_refused_unless_asked_for() {
    let dir = scratch_dir("admin-open");
    let write = |admin: &str| {
        let path = dir.join("sluice.toml");
        std::fs::write(
            &path,
            format!("[server]\nlisten = [\"127.0.0.1:18080\"]\n[admin]\n{admin}\n[[pool]]\nname = \"web\"\nbackends = [\"127.0.0.1:18081\"]\n[[route]]\npool = \"web\"\n"),
        )
        .unwrap();
        sluice_cli(&["check", "--config", path.to_str().unwrap()])
    };
    let out = write("listen = \"0.0.0.0:19900\"");
    assert!(!out.ok);
    assert!(
        out.stderr.contains("not a loopback address") && out.stderr.contains("[admin] token"),
        "{}",
        out.stderr
    );
    assert!(write("listen = \"0.0.0.0:19900\"\ntoken = \"t0ken\"").ok);
    assert!(write("listen = \"0.0.0.0:19900\"\nallow_unauthenticated = true").ok);
    assert!(write("listen = \"127.0.0.1:19900\"").ok);
    let out = write("listen = \"127.0.0.1:19900\"\nprotect_reads = true");
    assert!(
        !out.ok && out.stderr.contains("protect_reads"),
        "{}",
        out.stderr
    );
    let out = write("listen = \"127.0.0.1:19900\"\ntoken = \"\"");
    assert!(
        !out.ok && out.stderr.contains("token is empty"),
        "{}",
        out.stderr
    );
}

/// A strategy whose picks follow its config: backend 1 when the config is longer than `{}`,
/// else backend 0.
fn config_following_strategy() -> Vec<u8> {
    wat_strategy(
        1,
        "(i32.store (i32.const 64) (i32.gt_u (local.get 1) (i32.const 2))) (i32.const 0)",
        "(i32.load (i32.const 64))",
    )
}

#[test]
fn a_plugin_is_hot_loaded_with_its_config_or_keeps_the_pool_s() {
    let b = backends(2);
    let body = format!(
        "token = \"{TOKEN}\"\n[[pool]]\nname = \"web\"\nbackends = [{}]\n[[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    let proxy = Proxy::start("admin-config", &body);
    let wasm = config_following_strategy();
    let file = proxy.dir.join("s.wasm");
    std::fs::write(&file, &wasm).unwrap();
    let load = |config: Option<&str>| {
        let admin = proxy.admin.to_string();
        let mut args = vec![
            "plugin",
            "load",
            "--pool",
            "web",
            "--admin",
            &admin,
            "--token",
            TOKEN,
            file.to_str().unwrap(),
        ];
        if let Some(c) = config {
            args.extend(["--config", c]);
        }
        sluice_cli(&args)
    };
    // With a config: the plugin sees it.
    let out = load(Some(r#"{"side": "second", "note": "a & b = c?"}"#));
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(served_by(&proxy, 6).get("b2"), Some(&6));
    // Without one, the pool's current config (the one just given) stays.
    let out = load(None);
    assert!(out.ok, "{}", out.stderr);
    assert_eq!(served_by(&proxy, 6).get("b2"), Some(&6));
    // An empty object replaces it.
    assert!(load(Some("{}")).ok);
    assert_eq!(served_by(&proxy, 6).get("b1"), Some(&6));
    // Bad configs are refused before anything changes, by the CLI and by the API.
    let out = load(Some("[1, 2]"));
    assert!(
        !out.ok && out.stderr.contains("JSON object"),
        "{}",
        out.stderr
    );
    let r = authed(
        &proxy,
        "PUT",
        "/api/pools/web/strategy?config=%7Bnope",
        &wasm,
    );
    assert_eq!(r.status, 400);
    assert!(r.text().contains("not JSON"), "{}", r.text());
    assert_eq!(served_by(&proxy, 6).get("b1"), Some(&6));
}
