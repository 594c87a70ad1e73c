//! Backends given as host names: resolved at start, re-resolved every `dns_refresh`, every
//! address a member; a changed answer adds and removes backends under traffic, a failed refresh
//! keeps the last good addresses, and a name that does not resolve at start refuses the config.

mod common;

use std::collections::BTreeSet;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;

/// The `dns` entry of the first pool in `GET /api/pools`.
fn dns_state(p: &Proxy) -> serde_json::Value {
    pools_json(p)["pools"][0]["dns"][0].clone()
}

/// The member addresses of the first pool.
fn members(p: &Proxy) -> BTreeSet<String> {
    pools_json(p)["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["addr"].as_str().unwrap().to_string())
        .collect()
}

/// Three loopback addresses only this test process uses (from its pid, like `unique_addr`).
fn own_ips() -> [Ipv4Addr; 3] {
    let pid = std::process::id();
    let high = ((pid >> 16) & 0x3f) as u8;
    [64, 128, 192].map(|top| Ipv4Addr::new(127, top | high, (pid >> 8) as u8, pid as u8))
}

/// Replaces `path` at once (write then rename), so the resolver never reads half a file.
fn write_hosts(path: &std::path::Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

#[test]
fn a_localhost_backend_serves_and_shows_its_resolution_state() {
    let b = backends(1);
    let port = b[0].0.port();
    let p = Proxy::start(
        "dns-localhost",
        &format!(
            "[[pool]]\nname = \"web\"\ndns_refresh = \"200ms\"\nbackends = [{{ addr = \"localhost:{port}\", weight = 3, zone = \"eu\" }}]\n[[route]]\npool = \"web\"\n"
        ),
    );
    let r = p.get("/");
    assert_eq!(r.status, 200);
    assert_eq!(r.text().trim(), "b1");
    let member = format!("127.0.0.1:{port}");
    assert!(members(&p).contains(&member), "{:?}", members(&p));
    assert_eq!(backend_field(&p, &member, "weight"), 3);
    assert_eq!(backend_field(&p, &member, "zone"), "eu");
    let dns = dns_state(&p);
    assert_eq!(dns["name"], format!("localhost:{port}"));
    assert!(
        dns["addresses"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("127.0.0.1")),
        "{dns}"
    );
    assert!(dns["last_error"].is_null(), "{dns}");
    assert!(dns["next_refresh_in_ms"].as_u64().unwrap() <= 200, "{dns}");
    assert_eq!(pools_json(&p)["pools"][0]["dns_refresh_ms"], 200);
    // The name is resolved again and again.
    let first = dns["resolved_at_unix_ms"].as_u64().unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || dns_state(&p)
            ["resolved_at_unix_ms"]
            .as_u64()
            .unwrap()
            > first),
        "no refresh: {}",
        dns_state(&p)
    );
    assert_eq!(p.metric("sluice_dns_resolution_failures_total"), 0.0);
}

#[test]
fn a_changed_answer_adds_and_removes_backends_under_traffic() {
    let [ip_a, ip_b, ip_c] = own_ips();
    let port = unique_port();
    let at: Vec<(&str, SocketAddr)> = vec![
        ("a", (ip_a, port).into()),
        ("b", (ip_b, port).into()),
        ("c", (ip_c, port).into()),
    ];
    let b = sluice::demo::spawn_backends_on(&at).unwrap();
    let dir = scratch_dir("dns-change");
    let hosts = dir.join("hosts");
    write_hosts(&hosts, &format!("{ip_a} api.test\n{ip_b} api.test\n"));
    let p = Proxy::start_in(
        dir,
        &format!(
            "[dns]\nhosts_file = \"hosts\"\n[[pool]]\nname = \"web\"\ndns_refresh = \"200ms\"\nbackends = [\"api.test:{port}\"]\n[[route]]\npool = \"web\"\n"
        ),
    );
    let (a, bb, c) = (
        format!("{ip_a}:{port}"),
        format!("{ip_b}:{port}"),
        format!("{ip_c}:{port}"),
    );
    assert_eq!(members(&p), BTreeSet::from([a.clone(), bb.clone()]));

    // Traffic on kept-alive connections throughout the change.
    let listen = p.listen;
    let load = Load::start(4, 20_000, Duration::from_secs(60), move |conn| {
        keepalive_get(conn, listen, "/")
    });
    assert!(wait_for(Duration::from_secs(10), || {
        b[0].1.served.load(Ordering::Relaxed) > 20 && b[1].1.served.load(Ordering::Relaxed) > 20
    }));
    let b_before = backend_field(&p, &bb, "requests")["2xx"].as_u64().unwrap();

    // The answer changes: a goes, c comes, b stays.
    write_hosts(&hosts, &format!("{ip_b} api.test\n{ip_c} api.test\n"));
    assert!(
        wait_for(Duration::from_secs(10), || members(&p)
            == BTreeSet::from([bb.clone(), c.clone()])),
        "members: {:?}",
        members(&p)
    );
    assert!(
        wait_for(Duration::from_secs(10), || b[2]
            .1
            .served
            .load(Ordering::Relaxed)
            > 20),
        "the new address gets no traffic"
    );
    let a_after = b[0].1.served.load(Ordering::Relaxed);
    // b kept its statistics through the change.
    assert!(backend_field(&p, &bb, "requests")["2xx"].as_u64().unwrap() > b_before);

    // A failed refresh keeps the last good addresses, counted and shown.
    std::fs::remove_file(&hosts).unwrap();
    assert!(
        wait_for(Duration::from_secs(10), || p
            .metric("sluice_dns_resolution_failures_total{pool=\"web\"}")
            >= 2.0),
        "no failure counted"
    );
    let dns = dns_state(&p);
    assert!(
        dns["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("cannot read the hosts file")),
        "{dns}"
    );
    assert!(dns["consecutive_failures"].as_u64().unwrap() >= 2, "{dns}");
    assert_eq!(members(&p), BTreeSet::from([bb.clone(), c.clone()]));
    assert!(p.log().contains("DNS refresh failed"), "{}", p.log());

    let c_before = b[2].1.served.load(Ordering::Relaxed);
    assert!(wait_for(Duration::from_secs(10), || b[2]
        .1
        .served
        .load(Ordering::Relaxed)
        > c_before + 20));
    let results = load.stop();
    let failures: Vec<_> = results
        .iter()
        .filter(|r| !matches!(r, Ok(r) if r.status == 200))
        .collect();
    assert!(
        failures.is_empty(),
        "{} failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    // Once removed, a is sent nothing new (requests already on their way may end there).
    assert!(
        b[0].1.served.load(Ordering::Relaxed) <= a_after + 8,
        "a still served after its removal"
    );
}

#[test]
fn a_name_that_does_not_resolve_refuses_the_config_with_its_line() {
    let dir = scratch_dir("dns-refuse");
    std::fs::write(dir.join("hosts"), "127.0.0.1 known.test\n").unwrap();
    let config = dir.join("sluice.toml");
    let listen = unique_addr();
    let admin = unique_addr();
    std::fs::write(
        &config,
        format!("[server]\nlisten = [\"{listen}\"]\n[admin]\nlisten = \"{admin}\"\n[dns]\nhosts_file = \"hosts\"\n[[pool]]\nname = \"web\"\nbackends = [\"known.test:80\",\n  \"no-such-host.invalid:80\"]\n[[route]]\npool = \"web\"\n"),
    )
    .unwrap();
    let path = config.to_str().unwrap();
    for cmd in ["check", "run"] {
        let out = sluice_cli(&[cmd, "--config", path]);
        assert!(!out.ok, "{cmd} accepted it: {}", out.stdout);
        assert!(
            out.stderr.contains("sluice.toml:10:3:")
                && out
                    .stderr
                    .contains("\"no-such-host.invalid\" does not resolve"),
            "{cmd}: {}",
            out.stderr
        );
    }
}

/// A reload that adds a name that does not resolve is refused and the old pool keeps serving; a
/// reload that adds one that does gives its addresses at once.
#[test]
fn a_reload_resolves_new_names_and_refuses_unresolvable_ones() {
    let b = backends(2);
    let dir = scratch_dir("dns-reload");
    std::fs::write(dir.join("hosts"), "127.0.0.1 two.test\n").unwrap();
    let pool = |entries: &str| {
        format!("[[pool]]\nname = \"web\"\nbackends = [{entries}]\n[[route]]\npool = \"web\"\n")
    };
    let p = Proxy::start_in(
        dir,
        &format!(
            "[dns]\nhosts_file = \"hosts\"\n{}",
            pool(&format!("\"{}\"", b[0].0))
        ),
    );
    p.rewrite_pools(&pool(&format!("\"{}\", \"nowhere.invalid:80\"", b[0].0)));
    let text = std::fs::read_to_string(&p.config_path).unwrap();
    let line = 1 + text
        .lines()
        .position(|l| l.contains("nowhere.invalid"))
        .unwrap();
    let at = format!("sluice.toml:{line}:32:");
    let r = p.admin_req("POST", "/api/reload", b"");
    assert_eq!(r.status, 422, "{}", r.text());
    assert!(
        serde_json::from_str::<serde_json::Value>(&r.text()).unwrap()["error"]
            .as_str()
            .is_some_and(|e| e.contains(&at) && e.contains("\"nowhere.invalid\" does not resolve")),
        "{}",
        r.text()
    );
    assert_eq!(p.get("/").status, 200);
    p.reload_with(&pool(&format!(
        "\"{}\", \"two.test:{}\"",
        b[0].0,
        b[1].0.port()
    )));
    assert_eq!(
        members(&p),
        BTreeSet::from([b[0].0.to_string(), b[1].0.to_string()])
    );
}
