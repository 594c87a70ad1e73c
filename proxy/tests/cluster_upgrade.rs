//! A rolling upgrade, in real processes on loopback: proxies and agents of two adjacent gossip
//! body versions in one cluster, every proxy routing to every backend.
//!
//! Why this models an upgrade: an older binary cannot be built here, so half of the processes
//! run with `SLUICE_GOSSIP_TEST_NEXT_VERSION` set, which makes them behave as the *next*
//! version on the wire: their bodies carry the next version number, their metadata and every
//! service carry a field this version does not know, and they send a broadcast kind and a
//! request kind this version does not know — exactly what a release that extends the format is
//! allowed to do (`sluice_gossip::message`, "Compatibility rules"). Mid-upgrade, old and new
//! nodes gossip with each other in both directions, so a cluster of normal and "next" processes
//! is the cluster halfway through a rolling upgrade: the normal ones are version N facing N+1,
//! the others N+1 facing N.

mod common;

use std::time::Duration;

use common::*;

const KEY: &str = "c2x1aWNlLXRlc3Qta2V5LTMyLWJ5dGVzLWxvbmchISE="; // 32 bytes, test only
const NEXT: (&str, &str) = ("SLUICE_GOSSIP_TEST_NEXT_VERSION", "1");
const EMULATING: &str = "emulates the next gossip body version";

#[test]
fn proxies_and_agents_one_version_apart_route_to_every_backend() {
    let b = backends(4);
    let dir = scratch_dir("cluster-upgrade");
    let pool =
        "[[pool]]\nname = \"web\"\nstrategy = \"builtin:round-robin\"\n[[route]]\npool = \"web\"\n";
    let (g1, g2) = (gossip_addr(61), gossip_addr(62));
    // The first proxy is of this version, the second of the next one.
    let old_proxy = Proxy::start_in(
        dir.sub("old-proxy"),
        &format!("{pool}{}", cluster_section("old-proxy", g1, KEY, &[])),
    );
    let new_proxy = Proxy::start_env(
        dir.sub("new-proxy"),
        "",
        &format!("{pool}{}", cluster_section("new-proxy", g2, KEY, &[g1])),
        None,
        &[NEXT],
    );
    // Agents alternate: 0 and 2 of this version, 1 and 3 of the next, each joining through
    // the proxy of the other version.
    let agents: Vec<Agent> = (0..4)
        .map(|i| {
            let name = format!("agent-{i}");
            let seed = if i % 2 == 0 { g2 } else { g1 };
            let cluster = cluster_section(&name, gossip_addr(71 + i as u8), KEY, &[seed]);
            let env: &[(&str, &str)] = if i % 2 == 1 { &[NEXT] } else { &[] };
            Agent::start_env(&dir, &name, &cluster, b[i].0, env)
        })
        .collect();

    for p in [&old_proxy, &new_proxy] {
        assert!(
            wait_for(Duration::from_secs(30), || routable(p) == 4),
            "a proxy never reached 4 backends: {}\n{}",
            p.admin_req("GET", "/api/cluster", b"").text(),
            p.log()
        );
        // Every backend answers through every proxy.
        let t = tally((0..12).map(|_| p.get("/").text()));
        assert_eq!(t.len(), 4, "{t:?}");
    }
    // The "next" processes really ran as the next version, and each proxy sees every member
    // of the other version alive with its metadata.
    assert!(new_proxy.log().contains(EMULATING), "{}", new_proxy.log());
    assert!(!old_proxy.log().contains(EMULATING));
    assert!(agents[1].log().contains(EMULATING), "{}", agents[1].log());
    for p in [&old_proxy, &new_proxy] {
        let v: serde_json::Value =
            serde_json::from_str(&p.admin_req("GET", "/api/cluster", b"").text()).unwrap();
        let alive: Vec<&str> = v["members"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|m| m["state"] == "alive")
            .map(|m| m["name"].as_str().unwrap())
            .collect();
        for name in [
            "old-proxy",
            "new-proxy",
            "agent-0",
            "agent-1",
            "agent-2",
            "agent-3",
        ] {
            assert!(alive.contains(&name), "{name} missing from {alive:?}");
        }
    }
    // The old proxy met the next version's message kinds and skipped them; it refused no
    // metadata (everything the next version added to it was skipped field by field).
    let transport = |p: &Proxy| -> serde_json::Value {
        serde_json::from_str::<serde_json::Value>(&p.admin_req("GET", "/api/cluster", b"").text())
            .unwrap()["transport"]
            .clone()
    };
    assert!(
        wait_for(Duration::from_secs(10), || transport(&old_proxy)
            ["unknown_skipped"]
            .as_u64()
            .unwrap()
            > 0),
        "{}",
        transport(&old_proxy)
    );
    assert_eq!(transport(&old_proxy)["metadata_refused"], 0);
    drop(agents);
}
