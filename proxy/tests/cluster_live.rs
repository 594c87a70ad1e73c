//! Real processes on loopback: 2 proxies and 4 agents in one gossip cluster (the fast "local"
//! timing profile). Killed agents leave the proxies' pools, a SIGTERM drains without failing a
//! request, and a node with the wrong key never joins.

mod common;

use std::time::Duration;

use common::*;

const KEY: &str = "c2x1aWNlLXRlc3Qta2V5LTMyLWJ5dGVzLWxvbmchISE="; // 32 bytes, test only
const OTHER_KEY: &str = "b3RoZXItdGVzdC1rZXktMzItYnl0ZXMtbG9uZyEhISE=";

fn pool_addrs(proxy: &Proxy) -> Vec<String> {
    let v: serde_json::Value =
        serde_json::from_str(&proxy.admin_req("GET", "/api/pools", b"").text()).unwrap();
    v["pools"][0]["backends"]
        .as_array()
        .unwrap()
        .iter()
        .map(|b| b["addr"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn agents_join_leave_drain_and_wrong_keys_are_rejected() {
    let b = backends(4);
    let dir = scratch_dir("cluster");
    let pool = "[[pool]]\nname = \"web\"\nstrategy = \"builtin:round-robin\"\nretries = 2\n[[route]]\npool = \"web\"\n";
    let g1 = gossip_addr(11);
    let g2 = gossip_addr(12);
    let p1 = Proxy::start_in(
        dir.sub("p1"),
        &format!("{pool}{}", cluster_section("proxy-1", g1, KEY, &[])),
    );
    let p2 = Proxy::start_in(
        dir.sub("p2"),
        &format!("{pool}{}", cluster_section("proxy-2", g2, KEY, &[g1])),
    );
    let mut agents: Vec<Option<Agent>> = (0..4)
        .map(|i| {
            let g = gossip_addr(21 + i as u8);
            Some(Agent::start(
                &dir,
                &format!("agent-{i}"),
                &cluster_section(&format!("agent-{i}"), g, KEY, &[g1, g2]),
                b[i].0,
            ))
        })
        .collect();

    // Both proxies learn all four services and route to them.
    for p in [&p1, &p2] {
        assert!(
            wait_for(Duration::from_secs(30), || routable(p) == 4),
            "pool never reached 4 backends: {:?}\n{}",
            pool_addrs(p),
            agents[0].as_ref().unwrap().log()
        );
        expect_spread(p, 8, 4);
    }
    let info = p1.admin_req("GET", "/api/cluster", b"").text();
    assert!(
        info.contains("\"agent-3\"") && info.contains("\"proxy-2\""),
        "{info}"
    );

    // The CLI views: a table and a Graphviz map with an edge per proxy, backend and pool.
    let admin = p1.admin.to_string();
    let cli = |args: &[&str]| {
        let out = sluice_cli(&[args, &["--admin", admin.as_str()]].concat());
        assert!(out.ok, "{args:?}: {}", out.stderr);
        out.stdout
    };
    let table = cli(&["cluster", "info"]);
    assert_eq!(
        table
            .lines()
            .filter(|l| l.contains(" backend ") && l.contains(" alive "))
            .count(),
        4,
        "{table}"
    );
    let dot = cli(&["cluster", "map"]);
    assert!(dot.starts_with("digraph sluice {"), "{dot}");
    assert_eq!(dot.matches("\"proxy-1\" -> \"agent-").count(), 4, "{dot}");

    // `plugin load --cluster` reaches every proxy through one admin address (rolled out over
    // gossip; proxy/tests/rollout.rs covers refusals and late joiners).
    let wasm = dir.join("first.wasm");
    std::fs::write(&wasm, first_only()).unwrap();
    let out = sluice_cli(&[
        "plugin",
        "load",
        "--cluster",
        "--pool",
        "web",
        "--admin",
        &p1.admin.to_string(),
        wasm.to_str().unwrap(),
    ]);
    assert!(out.ok, "{}", out.stderr);
    let ok_rows = out
        .stdout
        .lines()
        .filter(|l| l.starts_with("proxy-") && l.split_whitespace().nth(1) == Some("ok"))
        .count();
    assert_eq!(ok_rows, 2, "{}", out.stdout);
    for p in [&p1, &p2] {
        assert_eq!(pools_json(p)["pools"][0]["strategy"]["generation"], 2);
    }
    // Back to rotation for the rest of the test.
    let rr = dir.join("rr.wasm");
    std::fs::write(&rr, sluice::builtin::get("round-robin").unwrap()).unwrap();
    let out = sluice_cli(&[
        "plugin",
        "load",
        "--cluster",
        "--pool",
        "web",
        "--admin",
        &p2.admin.to_string(),
        rr.to_str().unwrap(),
    ]);
    assert!(out.ok, "{}", out.stderr);

    // SIGKILL: no goodbye; both proxies drop it once the cluster declares it down.
    let killed = b[0].0.to_string();
    agents[0].as_ref().unwrap().signal("-KILL");
    for p in [&p1, &p2] {
        assert!(
            wait_for(Duration::from_secs(30), || !pool_addrs(p).contains(&killed)),
            "killed agent still in {:?}",
            pool_addrs(p)
        );
    }

    // SIGTERM: the agent drains; a bounded load loop meanwhile sees no failure.
    let drained = b[1].0.to_string();
    let addr = p1.listen;
    let served = |i: usize| b[i].1.served.load(std::sync::atomic::Ordering::Relaxed);
    let served_before = served(1);
    let load = Load::start(3, 20_000, Duration::from_secs(60), move |c| {
        keepalive_get(c, addr, "/")
    });
    // The drain must overlap traffic: wait until the load reaches the draining backend, and
    // keep it going until the backend has left the pool and others served after that.
    assert!(
        wait_for(Duration::from_secs(10), || served(1) >= served_before + 20),
        "the load never reached the backend to drain"
    );
    agents[1].as_ref().unwrap().signal("-TERM");
    assert!(
        wait_for(Duration::from_secs(20), || !pool_addrs(&p1)
            .contains(&drained)),
        "the drained backend is still in the pool"
    );
    let served_at_leave = served(2);
    assert!(
        wait_for(Duration::from_secs(10), || served(2) > served_at_leave + 20),
        "no request was served after the drained backend left"
    );
    assert!(!load.is_finished(), "the load ended during the drain");
    let results = load.stop();
    let failed = results
        .iter()
        .filter(|r| !matches!(r, Ok(r) if r.status == 200))
        .count();
    assert_eq!(
        failed,
        0,
        "{failed} of {} requests failed during the drain",
        results.len()
    );
    let mut agent1 = agents[1].take().unwrap();
    assert!(
        agent1.wait_exit(Duration::from_secs(10)).is_some(),
        "agent did not exit after draining"
    );
    assert!(
        agent1.log().contains("left the cluster"),
        "{}",
        agent1.log()
    );

    // A node with the wrong key never joins, and its packets are counted as rejected.
    let bad = Agent::start(
        &dir,
        "intruder",
        &cluster_section("intruder", gossip_addr(31), OTHER_KEY, &[g1]),
        b[3].0,
    );
    let rejected = |p: &Proxy| -> u64 {
        let v: serde_json::Value =
            serde_json::from_str(&p.admin_req("GET", "/api/cluster", b"").text()).unwrap();
        v["transport"]["rejected_decrypt"].as_u64().unwrap()
    };
    assert!(
        wait_for(Duration::from_secs(15), || rejected(&p1) > 0),
        "no rejected packets counted"
    );
    assert!(!p1
        .admin_req("GET", "/api/cluster", b"")
        .text()
        .contains("intruder"));
    drop(bad);
    drop(agents);
}

#[test]
fn a_second_node_with_the_same_name_refuses_to_start() {
    let dir = scratch_dir("cluster-name");
    let b = backends(1);
    let g1 = gossip_addr(41);
    let first = Agent::start(
        &dir,
        "a",
        &cluster_section("same-name", g1, KEY, &[]),
        b[0].0,
    );
    assert!(
        wait_for(Duration::from_secs(20), || first
            .log()
            .contains("agent joined the cluster")),
        "the first agent did not start: {}",
        first.log()
    );
    let g2 = gossip_addr(42);
    let dup = Agent::start(
        &dir,
        "b",
        &cluster_section("same-name", g2, KEY, &[g1]),
        b[0].0,
    );
    let mut dup = dup;
    assert!(
        dup.wait_exit(Duration::from_secs(20)).is_some(),
        "duplicate name kept running"
    );
    let log = dup.log();
    assert!(log.contains("already used by the live member"), "{log}");
    drop(first);
}

const NEW_KEY: &str = "bmV3LXJvdGF0ZWQta2V5LTMyLWJ5dGVzLWxvbmchISE=";

#[test]
fn keys_rotate_without_a_restart() {
    let b = backends(1);
    let dir = scratch_dir("cluster-rotate");
    let g1 = gossip_addr(51);
    let p1 = Proxy::start_in(
        dir.sub("p1"),
        &format!(
            "[[pool]]\nname = \"web\"\n[[route]]\npool = \"web\"\n{}",
            cluster_section("rot-proxy", g1, KEY, &[])
        ),
    );
    let g2 = gossip_addr(52);
    let agent = Agent::start(
        &dir,
        "rot-agent",
        &cluster_section("rot-agent", g2, KEY, &[g1]),
        b[0].0,
    );
    assert!(
        wait_for(Duration::from_secs(20), || routable(&p1) == 1),
        "agent never joined"
    );
    let agent_cfg = agent.dir.join("agent.toml");
    let set_agent_keys = |keys: &[&str]| {
        let text = std::fs::read_to_string(&agent_cfg).unwrap();
        let list: Vec<String> = keys.iter().map(|k| format!("\"{k}\"")).collect();
        let lines: Vec<String> = text
            .lines()
            .map(|l| {
                if l.starts_with("key = ") || l.starts_with("keys = ") {
                    format!("keys = [{}]", list.join(", "))
                } else {
                    l.to_string()
                }
            })
            .collect();
        std::fs::write(&agent_cfg, lines.join("\n") + "\n").unwrap();
        let reloads = agent.log().matches("cluster keys reloaded").count();
        agent.signal("-HUP");
        // The agent has applied its new keys once it says so.
        assert!(
            wait_for(Duration::from_secs(10), || agent
                .log()
                .matches("cluster keys reloaded")
                .count()
                > reloads),
            "the agent did not reload its keys: {}",
            agent.log()
        );
    };
    let key_op = |op: &str, key: &str| {
        let r = p1.admin_req(
            "POST",
            "/api/cluster/keys",
            format!("{{\"op\": \"{op}\", \"key\": \"{key}\"}}").as_bytes(),
        );
        assert_eq!(r.status, 200, "{op}: {}", r.text());
    };
    // 1. everyone learns the new key; 2. everyone encrypts with it; 3. the old key goes.
    key_op("install", NEW_KEY);
    set_agent_keys(&[KEY, NEW_KEY]);
    key_op("use", NEW_KEY);
    set_agent_keys(&[NEW_KEY, KEY]);
    let r = p1.admin_req(
        "POST",
        "/api/cluster/keys",
        format!("{{\"op\": \"remove\", \"key\": \"{NEW_KEY}\"}}").as_bytes(),
    );
    assert_eq!(
        r.status,
        422,
        "the key in use cannot be removed: {}",
        r.text()
    );
    key_op("remove", KEY);
    set_agent_keys(&[NEW_KEY]);
    assert_eq!(agent.log().matches("cluster keys reloaded").count(), 3);
    // The cluster keeps working on the new key alone: gossip keeps arriving at the proxy, none of
    // it is rejected, and the agent stays a live, routable member.
    let transport = |p: &Proxy| {
        let v: serde_json::Value =
            serde_json::from_str(&p.admin_req("GET", "/api/cluster", b"").text()).unwrap();
        (
            v["transport"]["udp_received"].as_u64().unwrap(),
            v["transport"]["rejected_decrypt"].as_u64().unwrap(),
        )
    };
    let (received, rejected) = transport(&p1);
    assert!(
        wait_for(Duration::from_secs(20), || transport(&p1).0
            >= received + 20),
        "gossip stopped arriving after the old key was removed"
    );
    assert_eq!(
        transport(&p1).1,
        rejected,
        "packets were rejected after the rotation"
    );
    assert!(
        wait_for(Duration::from_secs(10), || routable(&p1) == 1),
        "{}",
        p1.admin_req("GET", "/api/cluster", b"").text()
    );
    let cluster = || -> serde_json::Value {
        serde_json::from_str(&p1.admin_req("GET", "/api/cluster", b"").text()).unwrap()
    };
    assert_eq!(cluster()["keys"], 1);
    assert!(
        wait_for(Duration::from_secs(10), || cluster()["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "rot-agent" && m["state"] == "alive")),
        "{}",
        cluster()
    );
}

#[test]
fn a_cut_off_proxy_keeps_its_last_known_good_pools_and_shows_its_tuning() {
    let dir = scratch_dir("cluster-lkg");
    let b = backends(2);
    let g1 = gossip_addr(51);
    let pool =
        "[[pool]]\nname = \"web\"\nstrategy = \"builtin:round-robin\"\n[[route]]\npool = \"web\"\n";
    let p = Proxy::start_in(
        dir.clone(),
        &format!("{pool}{}", cluster_section("proxy-lkg", g1, KEY, &[])),
    );
    let agents: Vec<Agent> = (0..2)
        .map(|i| {
            Agent::start(
                &dir,
                &format!("lkg-{i}"),
                &cluster_section(&format!("lkg-{i}"), gossip_addr(52 + i as u8), KEY, &[g1]),
                b[i].0,
            )
        })
        .collect();
    assert!(
        wait_for(Duration::from_secs(30), || routable(&p) == 2),
        "pool never reached 2 backends: {:?}",
        pool_addrs(&p)
    );
    let cluster = || -> serde_json::Value {
        serde_json::from_str(&p.admin_req("GET", "/api/cluster", b"").text()).unwrap()
    };
    // The timings follow the 3 live members, not the default expected_size of 32.
    assert!(
        wait_for(Duration::from_secs(10), || cluster()["tuning"]["members"]
            == 3),
        "{}",
        cluster()["tuning"]
    );
    let metrics = || p.admin_req("GET", "/metrics", b"").text();
    assert!(
        wait_for(Duration::from_secs(5), || metrics()
            .contains("sluice_cluster_tuning{setting=\"members\"} 3")),
        "{}",
        metrics()
    );
    assert!(
        cluster()["tuning"]["suspicion_timeout_ms"]
            .as_u64()
            .unwrap()
            > 0
    );
    assert_eq!(cluster()["routing"]["last_known_good"], false);

    // One of two backends dies: an ordinary failure, the pool drops it.
    agents[0].signal("-KILL");
    let first = b[0].0.to_string();
    assert!(
        wait_for(Duration::from_secs(30), || !pool_addrs(&p).contains(&first)),
        "killed agent still in {:?}",
        pool_addrs(&p)
    );
    assert_eq!(cluster()["routing"]["last_known_good"], false);

    // The last one goes too: from here the proxy cannot tell whether it or the cluster is cut
    // off, so it keeps what it had and says so.
    agents[1].signal("-KILL");
    assert!(
        wait_for(Duration::from_secs(30), || cluster()["routing"]
            ["last_known_good"]
            == true),
        "{}",
        cluster()["routing"]
    );
    let reason = cluster()["routing"]["reason"].as_str().unwrap().to_string();
    assert!(
        reason.contains("no other cluster member is reachable"),
        "{reason}"
    );
    assert!(metrics().contains("sluice_cluster_last_known_good 1"));
    // Still there well after the cluster declared it down everywhere it could.
    let last = b[1].0.to_string();
    let v = cluster();
    let members = v["members"].as_array().unwrap();
    assert!(
        wait_for(Duration::from_secs(30), || cluster()["members"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m["name"] == "lkg-1" && m["state"] == "down")),
        "{members:?}"
    );
    assert!(pool_addrs(&p).contains(&last), "{:?}", pool_addrs(&p));
    drop(agents);
}
