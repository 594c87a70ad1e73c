//! Cluster-wide plugin rollout over gossip, with real processes on loopback: three proxies
//! take a strategy from `sluice plugin load --cluster`, a fourth started later catches up, and
//! a plugin whose kept bytes are damaged is refused by its sha256 on every proxy, which keep
//! the version they run.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::*;
use sha2::Digest;

fn strategy_sha(p: &Proxy) -> String {
    pools_json(p)["pools"][0]["strategy"]["sha256"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

fn proxies_alive(p: &Proxy) -> usize {
    let v: serde_json::Value =
        serde_json::from_str(&p.admin_req("GET", "/api/cluster", b"").text()).unwrap();
    v["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["role"] == "proxy" && m["state"] == "alive")
        .count()
}

// The backends 12 requests reach.
fn reached(p: &Proxy) -> HashSet<String> {
    (0..12).map(|_| p.get("/").text()).collect()
}

// The result column of each node's row in the command's table.
fn rows(stdout: &str) -> Vec<(String, String)> {
    stdout
        .lines()
        .filter(|l| l.starts_with("proxy-"))
        .map(|l| {
            let mut cols = l.split("  ").filter(|c| !c.is_empty());
            let name = cols.next().unwrap_or_default().trim().to_string();
            let result = cols.next().unwrap_or_default().trim().to_string();
            (name, result)
        })
        .collect()
}

#[test]
fn cluster_rollout_reaches_every_proxy_late_joiners_and_refuses_bad_hashes() {
    let b = backends(3);
    let dir = scratch_dir("rollout");
    let pool = format!(
        "[[pool]]\nname = \"web\"\nstrategy = \"builtin:round-robin\"\nbackends = [{}]\n[[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    let gossip: Vec<_> = (0..4).map(|i| gossip_addr(41 + i)).collect();
    let start = |i: usize, peers: &[std::net::SocketAddr], env: &[(&str, &str)]| {
        let d = dir.sub(&format!("p{i}"));
        let name = format!("proxy-{}", i + 1);
        let body = format!(
            "{pool}{}",
            cluster_section(&name, gossip[i], CLUSTER_KEY, peers)
        );
        Proxy::start_env(d, "", &body, None, env)
    };
    let p1 = start(0, &[], &[]);
    let mut p2 = start(1, &[gossip[0]], &[]);
    // proxy-3 keeps a damaged copy of what it announces (a test-only hook).
    let p3 = start(2, &[gossip[0]], &[("SLUICE_TEST_CORRUPT_ROLLOUT", "1")]);
    for p in [&p1, &p2, &p3] {
        assert!(
            wait_for(Duration::from_secs(30), || proxies_alive(p) == 3),
            "the three proxies never saw each other: {}",
            p.admin_req("GET", "/api/cluster", b"").text()
        );
        assert_eq!(reached(p).len(), 3, "round-robin before the rollout");
    }

    // Roll a strategy out through proxy-1: every proxy reports ok and runs it.
    let wasm = first_only();
    let want = hex::encode(sha2::Sha256::digest(&wasm));
    let file = dir.join("first.wasm");
    std::fs::write(&file, &wasm).unwrap();
    let load = |p: &Proxy, file: &std::path::Path| {
        sluice_cli(&[
            "plugin",
            "load",
            "--pool",
            "web",
            "--cluster",
            "--wait",
            "30s",
            "--admin",
            &p.admin.to_string(),
            file.to_str().unwrap(),
        ])
    };
    let out = load(&p1, &file);
    assert!(out.ok, "{}\n{}\n{}", out.stdout, out.stderr, p2.log());
    assert!(out.stdout.contains(&want), "{}", out.stdout);
    let mut got = rows(&out.stdout);
    got.sort();
    let ok = |names: &[&str]| -> Vec<(String, String)> {
        names
            .iter()
            .map(|n| (n.to_string(), "ok".to_string()))
            .collect()
    };
    assert_eq!(
        got,
        ok(&["proxy-1", "proxy-2", "proxy-3"]),
        "{}",
        out.stdout
    );
    for p in [&p1, &p2, &p3] {
        assert_eq!(strategy_sha(p), want);
        assert_eq!(reached(p).len(), 1, "the rolled-out strategy routes");
    }

    // A proxy started after the rollout catches up on its own.
    let p4 = start(3, &[gossip[1]], &[]);
    assert!(
        wait_for(Duration::from_secs(30), || strategy_sha(&p4) == want),
        "the late joiner never caught up: {}\n{}",
        pools_json(&p4),
        p4.log()
    );
    assert_eq!(reached(&p4).len(), 1);
    // GET /api/cluster shows what each proxy follows and its result.
    let cluster: serde_json::Value =
        serde_json::from_str(&p4.admin_req("GET", "/api/cluster", b"").text()).unwrap();
    let me = cluster["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["self"] == true)
        .unwrap()
        .clone();
    assert_eq!(me["rollout"]["desired"][0]["sha256"], want.as_str(), "{me}");
    assert_eq!(me["rollout"]["desired"][0]["by"], "proxy-1", "{me}");
    assert_eq!(me["rollout"]["results"][0]["sha256"], want.as_str(), "{me}");
    assert_eq!(
        me["rollout"]["results"][0]["error"],
        serde_json::Value::Null,
        "{me}"
    );
    // So does one that restarts (back on its config's round-robin at first).
    p2.restart();
    assert!(
        wait_for(Duration::from_secs(30), || strategy_sha(&p2) == want),
        "the restarted proxy never caught up: {}\n{}",
        pools_json(&p2),
        p2.log()
    );
    assert_eq!(reached(&p2).len(), 1);
    assert!(wait_for(Duration::from_secs(30), || proxies_alive(&p3) == 4));

    // proxy-3 announces a plugin but keeps damaged bytes: every proxy, proxy-3 included,
    // refuses them by their sha256, says so, and keeps running the previous strategy.
    let other = wat_strategy(1, "(i32.const 0)", "(i32.const 1)");
    let other_sha = hex::encode(sha2::Sha256::digest(&other));
    let file = dir.join("second.wasm");
    std::fs::write(&file, &other).unwrap();
    let out = load(&p3, &file);
    assert!(
        !out.ok,
        "a refused rollout fails the command: {}",
        out.stdout
    );
    assert!(out.stdout.contains(&other_sha), "{}", out.stdout);
    assert!(
        out.stderr.contains("4 of 4 proxies do not run the plugin"),
        "{}",
        out.stderr
    );
    let mut got = rows(&out.stdout);
    got.sort();
    let rejected: Vec<(String, String)> = ["proxy-1", "proxy-2", "proxy-3", "proxy-4"]
        .iter()
        .map(|n| (n.to_string(), "rejected".to_string()))
        .collect();
    assert_eq!(got, rejected, "{}", out.stdout);
    let mismatches = out
        .stdout
        .lines()
        .filter(|l| l.contains("sha256 mismatch") && l.contains(&other_sha))
        .count();
    assert_eq!(mismatches, 4, "each proxy says why: {}", out.stdout);
    for p in [&p1, &p2, &p3, &p4] {
        assert_eq!(strategy_sha(p), want, "the previous strategy stays");
        assert_eq!(reached(p).len(), 1);
    }
}

#[test]
fn proxies_that_cannot_or_will_not_take_a_rollout_say_why() {
    let b = backends(2);
    let dir = scratch_dir("rollout-refusals");
    let pool = |name: &str, extra: &str| {
        format!(
            "[[pool]]\nname = \"{name}\"\nstrategy = \"builtin:round-robin\"\nbackends = [{}]\n{extra}[[route]]\npool = \"{name}\"\n",
            backend_list(&b)
        )
    };
    let gossip: Vec<_> = (0..3).map(|i| gossip_addr(51 + i)).collect();
    let start = |i: usize, body: String| {
        let d = dir.sub(&format!("p{i}"));
        Proxy::start_in(d, &body)
    };
    let peers = |i: usize| if i == 0 { vec![] } else { vec![gossip[0]] };
    let section = |i: usize| {
        cluster_section(
            &format!("proxy-{}", i + 1),
            gossip[i],
            CLUSTER_KEY,
            &peers(i),
        )
    };
    // proxy-1 has the pool and an admin token, proxy-2 has no pool "web", proxy-3 opts out.
    let checked =
        "health = { plugin = \"builtin:tcp\", interval = \"200ms\", initial = \"healthy\" }\n";
    let p1 = start(
        0,
        format!("token = \"s3cret\"\n{}{}", pool("web", checked), section(0)),
    );
    let p2 = start(1, format!("{}{}", pool("api", ""), section(1)));
    let p3 = start(
        2,
        format!("{}{}plugin_rollout = false\n", pool("web", ""), section(2)),
    );
    assert!(
        wait_for(Duration::from_secs(30), || proxies_alive(&p1) == 3),
        "{}",
        p1.admin_req("GET", "/api/cluster", b"").text()
    );
    let before = strategy_sha(&p3);
    let file = dir.join("first.wasm");
    std::fs::write(&file, first_only()).unwrap();
    let load = |file: &std::path::Path, extra: &[&str]| {
        let admin = p1.admin.to_string();
        let args = [
            &[
                "plugin",
                "load",
                "--pool",
                "web",
                "--cluster",
                "--admin",
                admin.as_str(),
                file.to_str().unwrap(),
            ][..],
            extra,
        ]
        .concat();
        sluice_cli(&args)
    };

    // The rollout route is a mutating admin route: no token, no rollout.
    let out = load(&file, &[]);
    assert!(!out.ok);
    assert!(out.stderr.contains("(401)"), "{}", out.stderr);
    let auth = [("authorization", "Bearer s3cret")];
    let bad_wait = request(
        p1.admin,
        "POST",
        "/api/cluster/plugins/web/strategy?wait=forever",
        &auth,
        &first_only(),
    )
    .unwrap();
    assert_eq!(bad_wait.status, 400);
    assert!(bad_wait.text().contains("wait forever is not a duration"));

    let out = load(&file, &["--token", "s3cret"]);
    assert!(!out.ok, "{}", out.stdout);
    let row = |name: &str| -> String {
        out.stdout
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row for {name}: {}", out.stdout))
            .to_string()
    };
    assert!(row("proxy-1").contains("  ok"), "{}", out.stdout);
    assert!(
        row("proxy-2").contains("rejected") && row("proxy-2").contains("no pool named \"web\""),
        "{}",
        out.stdout
    );
    assert!(
        row("proxy-3").contains("rejected") && row("proxy-3").contains("plugin_rollout = false"),
        "{}",
        out.stdout
    );
    assert!(
        out.stderr.contains("2 of 3 proxies do not run the plugin"),
        "{}",
        out.stderr
    );
    assert_eq!(reached(&p1).len(), 1);
    assert_eq!(reached(&p2).len(), 2, "proxy-2's own pool is untouched");
    assert_eq!(
        strategy_sha(&p3),
        before,
        "the opted-out proxy keeps its plugin"
    );
    assert_eq!(reached(&p3).len(), 2);

    // Health checks roll out the same way, with their config.
    let http = sluice::builtin::get("http").unwrap();
    let http_sha = hex::encode(sha2::Sha256::digest(http));
    let file = dir.join("http.wasm");
    std::fs::write(&file, http).unwrap();
    let out = load(
        &file,
        &[
            "--token",
            "s3cret",
            "--kind",
            "health",
            "--config",
            r#"{"path": "/"}"#,
        ],
    );
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("proxy-1") && l.contains("  ok")),
        "{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(
        out.stdout
            .lines()
            .any(|l| l.starts_with("proxy-3") && l.contains("plugin_rollout = false")),
        "{}",
        out.stdout
    );
    assert_eq!(
        pools_json(&p1)["pools"][0]["health_check"]["sha256"],
        http_sha.as_str()
    );
    // The HTTP check now probes both backends, and they pass it.
    let http_passes = || {
        b.iter().all(|(addr, _)| {
            let h = backend_field(&p1, &addr.to_string(), "health");
            let last = h["last_result"].as_str().unwrap_or_default();
            last.starts_with("pass") && last.contains("HTTP 200")
        })
    };
    assert!(
        wait_for(Duration::from_secs(10), http_passes),
        "{}",
        pools_json(&p1)
    );
    assert_eq!(routable(&p1), 2);
}
