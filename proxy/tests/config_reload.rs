//! `sluice check`, config reload (API and SIGHUP), routing and the no-backend answer.

mod common;

use std::time::{Duration, Instant};

use common::*;

fn check(dir: &std::path::Path, text: &str) -> (bool, String) {
    let path = dir.join("check.toml");
    std::fs::write(&path, text).unwrap();
    let out = sluice_cli(&["check", "--config", path.to_str().unwrap()]);
    (out.ok, format!("{}{}", out.stdout, out.stderr))
}

#[test]
fn check_accepts_good_files_and_names_each_error_class() {
    let dir = scratch_dir("check");
    let (ok, out) = check(
        &dir,
        "[[pool]]\nname = \"web\"\nbackends = [\"127.0.0.1:9001\"]\n[[route]]\npool = \"web\"\n",
    );
    assert!(ok, "{out}");
    assert!(out.contains("OK (1 pools, 1 routes)"), "{out}");
    let cases = [
        (
            "[server]\nthreads = 1\nlisten_on = \"x\"\n",
            "check.toml:3:1: unknown field `listen_on`",
        ),
        (
            "[[pool]]\nname = \"web\"\n[[route]]\npool = \"api\"\n",
            "check.toml:4:8: route 1 refers to pool \"api\", which is not defined",
        ),
        (
            "[[pool]]\nname = \"web\"\nbackends = [\"10.0.0.1\"]\n",
            "check.toml:3:13: pool \"web\": backend address \"10.0.0.1\" is not an IP:port",
        ),
        (
            "[[pool]]\nname = \"web\"\nstrategy = \"missing.wasm\"\n",
            "does not exist",
        ),
        (
            "[[pool]]\nname = \"web\"\nstrategy = \"builtin:nope\"\n[[route]]\npool = \"web\"\n",
            "unknown built-in plugin \"nope\"; built-ins are: ",
        ),
        (
            "[server]\nlisten = [\"nowhere\"]\n",
            "check.toml:2:11: listen address \"nowhere\" is not an IP:port",
        ),
    ];
    for (text, expect) in cases {
        let (ok, out) = check(&dir, text);
        assert!(!ok, "accepted: {text}");
        assert!(out.contains(expect), "expected {expect:?} in {out}");
    }
    // A plugin file that exists but is not a valid plugin is caught by check too.
    std::fs::write(dir.join("bad.wasm"), b"nope").unwrap();
    let (ok, out) = check(
        &dir,
        "[[pool]]\nname = \"web\"\nstrategy = \"bad.wasm\"\n[[route]]\npool = \"web\"\n",
    );
    assert!(
        !ok && out.contains("not a valid WebAssembly module"),
        "{out}"
    );
}

fn pool_cfg(backends: &str, extra: &str) -> String {
    format!("[[pool]]\nname = \"web\"\nbackends = [{backends}]\n{extra}\n[[route]]\npath_prefix = \"/\"\npool = \"web\"\n")
}

#[test]
fn reload_applies_good_files_and_keeps_serving_on_bad_ones() {
    let b = backends(3);
    let one = format!("\"{}\"", b[0].0);
    let proxy = Proxy::start("reload", &pool_cfg(&one, ""));
    assert_eq!(tally((0..6).map(|_| proxy.get("/").text())).len(), 1);

    // A bad file: refused with the reason, nothing changes.
    proxy.rewrite_pools(&pool_cfg(&one, "bogus = 1"));
    let r = proxy.admin_req("POST", "/api/reload", b"");
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(r.text().contains("unknown field `bogus`"), "{}", r.text());
    assert_eq!(tally((0..6).map(|_| proxy.get("/").text())).len(), 1);
    // The overview (and so the dashboard) shows how the last reload ended, whoever asked.
    let last_reload = || -> serde_json::Value {
        let o: serde_json::Value =
            serde_json::from_str(&proxy.admin_req("GET", "/api/overview", b"").text()).unwrap();
        o["last_reload"].clone()
    };
    let last = last_reload();
    assert_eq!(last["result"], "rejected", "{last}");
    assert!(
        last["error"]
            .as_str()
            .is_some_and(|e| e.contains("unknown field `bogus`")),
        "{last}"
    );
    assert!(last["unix_ms"].as_u64().is_some_and(|t| t > 0), "{last}");

    // A good file with all three backends.
    proxy.rewrite_pools(&pool_cfg(&backend_list(&b), ""));
    let r = proxy.admin_req("POST", "/api/reload", b"");
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(
        r.text().contains("\"changed\": [\n      \"web\""),
        "{}",
        r.text()
    );
    let t = tally((0..30).map(|_| proxy.get("/").text()));
    assert_eq!(
        t.values().copied().collect::<Vec<_>>(),
        vec![10, 10, 10],
        "{t:?}"
    );
    let last = last_reload();
    assert_eq!(
        (&last["result"], &last["error"]),
        (&"ok".into(), &serde_json::Value::Null),
        "{last}"
    );

    // SIGHUP does the same: back to one backend.
    proxy.rewrite_pools(&pool_cfg(&format!("\"{}\"", b[1].0), ""));
    proxy.signal("-HUP");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let t = tally((0..3).map(|_| proxy.get("/").text()));
        if t.len() == 1 && t.contains_key("b2") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "SIGHUP reload not applied: {t:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(proxy.metric("sluice_config_reloads_total{result=\"ok\"}") >= 2.0);
    assert_eq!(
        proxy.metric("sluice_config_reloads_total{result=\"rejected\"}"),
        1.0
    );

    // A SIGHUP's refusal is shown too (otherwise it is only in the log and the metric).
    proxy.rewrite_pools(&pool_cfg(&one, "bogus = 2"));
    proxy.signal("-HUP");
    assert!(
        wait_for(Duration::from_secs(10), || last_reload()["result"]
            == "rejected"),
        "{}",
        last_reload()
    );
    assert_eq!(tally((0..6).map(|_| proxy.get("/").text())).len(), 1);
}

#[test]
fn routes_by_host_and_prefix_and_answers_503_without_backends() {
    let b = backends(2);
    let body = format!(
        "[[pool]]\nname = \"api\"\nbackends = [\"{}\"]\n[[pool]]\nname = \"web\"\nbackends = [\"{}\"]\n[[pool]]\nname = \"empty\"\n\
         [[route]]\npath_prefix = \"/\"\npool = \"web\"\n[[route]]\npath_prefix = \"/api\"\npool = \"api\"\n\
         [[route]]\nhost = \"empty.example\"\npool = \"empty\"\n",
        b[0].0, b[1].0
    );
    let proxy = Proxy::start("routes", &body);
    assert_eq!(proxy.get("/api/x").text().trim(), "b1");
    assert_eq!(proxy.get("/other").text().trim(), "b2");
    let r = raw_get_with_host(proxy.listen, "EMPTY.example:8080");
    assert!(r.starts_with("HTTP/1.1 503"), "{r}");
    assert!(r.contains("no backend available in pool \"empty\""), "{r}");
}

fn raw_get_with_host(addr: std::net::SocketAddr, host: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(
        s,
        "GET / HTTP/1.1\r\nhost: {host}\r\nconnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn connect_failures_are_retried_on_another_backend() {
    let b = backends(2);
    // A port with nothing listening, between two live backends.
    let dead = unique_addr().to_string();
    let list = format!("\"{}\", \"{dead}\", \"{}\"", b[0].0, b[1].0);
    // Outlier detection off: this test is about retries alone (see policies.rs for ejection).
    let proxy = Proxy::start(
        "retry",
        &pool_cfg(&list, "retries = 2\noutlier = { enabled = false }"),
    );
    for i in 0..60 {
        let r = proxy.get("/");
        assert_eq!(r.status, 200, "request {i}: {} {}", r.status, r.text());
    }
    let pools = proxy.admin_req("GET", "/api/pools", b"").text();
    // Exact rotation [b1, dead, b2]: the retry after the dead backend consumes the next slot
    // (b2), so every second request tries the dead one first: 30 connect errors, all retried.
    assert!(pools.contains("\"error\": 30"), "{pools}");

    // With retries disabled, the failure surfaces as 502 with a reason.
    proxy.rewrite_pools(&pool_cfg(&format!("\"{dead}\""), "retries = 0"));
    assert_eq!(proxy.admin_req("POST", "/api/reload", b"").status, 200);
    let r = proxy.get("/");
    assert_eq!(r.status, 502, "{}", r.text());
}

#[test]
fn mutating_admin_routes_need_the_bearer_token() {
    let b = backends(1);
    // The body continues the [admin] section the harness writes, so `token` lands there.
    let body = format!(
        "token = \"s3cret\"\n{}",
        pool_cfg(&format!("\"{}\"", b[0].0), "")
    );
    let proxy = Proxy::start("token", &body);
    let wasm = wat_strategy(1, "(i32.const 0)", "(i32.const 0)");
    for auth in [
        None,
        Some("Bearer nope"),
        Some("s3cret"),
        Some("Basic s3cret"),
        Some("Bearer s3cre"),
    ] {
        let headers: Vec<(&str, &str)> = auth.iter().map(|a| ("authorization", *a)).collect();
        let r = request(
            proxy.admin,
            "PUT",
            "/api/pools/web/strategy",
            &headers,
            &wasm,
        )
        .unwrap();
        assert_eq!(r.status, 401, "{auth:?}: {}", r.text());
        let r = request(proxy.admin, "POST", "/api/reload", &headers, b"").unwrap();
        assert_eq!(r.status, 401, "{auth:?}");
    }
    // Reads stay open; the right token is accepted.
    assert_eq!(proxy.admin_req("GET", "/api/pools", b"").status, 200);
    let ok = [("authorization", "Bearer s3cret")];
    assert_eq!(
        request(proxy.admin, "PUT", "/api/pools/web/strategy", &ok, &wasm)
            .unwrap()
            .status,
        200
    );
    assert_eq!(
        request(proxy.admin, "POST", "/api/reload", &ok, b"")
            .unwrap()
            .status,
        200
    );
    // The CLI passes the token too.
    let file = proxy.dir.join("s.wasm");
    std::fs::write(&file, &wasm).unwrap();
    let out = sluice_cli(&[
        "plugin",
        "load",
        "--pool",
        "web",
        "--admin",
        &proxy.admin.to_string(),
        "--token",
        "s3cret",
        file.to_str().unwrap(),
    ]);
    assert!(out.ok, "{}", out.stderr);
}
