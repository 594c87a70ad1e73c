//! Gossip membership at scale, simulated: ~100 nodes in one process on virtual time over a
//! seeded lossy network (see `sluice_gossip::sim`). No sockets, no sleeps; every run is the
//! same run.

use std::collections::HashSet;

use sluice_gossip::node::Event;
use sluice_gossip::routing::Freeze;
use sluice_gossip::sim::{sim_addr, Sim, SimConfig};
use sluice_gossip::{profile_settings, HoldPolicy, LastKnownGood, MemberState, Profile};

const N: usize = 100;
const SECOND: u64 = 1000;

// A cluster of `N` nodes built by real joins: node 0 first, then one node every 100 ms, each
// through node 0 and a random earlier node as seeds.
fn joined_cluster(loss: f64, seed: u64) -> Sim {
    let mut sim = Sim::new(SimConfig::lan(N as u32, loss, seed));
    sim.add_node();
    for i in 1..N {
        sim.add_node();
        sim.join(i, &[0, (i * 7919) % i]);
        let t = sim.now_ms() + 100;
        sim.run_until(t, |_, _, _| {});
    }
    sim
}

// Whether every live node sees every other live node Alive with its metadata.
fn converged(sim: &Sim) -> bool {
    let live: Vec<usize> = (0..sim.len())
        .filter(|i| !sim.is_crashed(*i) && !sim.node(*i).has_left())
        .collect();
    live.iter().all(|&i| {
        live.iter().all(|&j| {
            i == j
                || (sim.node(i).member_state(sim_addr(j)) == Some(MemberState::Alive)
                    && sim.node(i).has_meta(sim_addr(j)))
        })
    })
}

fn run_until_converged(sim: &mut Sim, limit_ms: u64) -> u64 {
    let start = sim.now_ms();
    while !converged(sim) {
        if sim.now_ms() - start >= limit_ms {
            for i in 0..sim.len() {
                for j in 0..sim.len() {
                    if i != j
                        && !(sim.node(i).member_state(sim_addr(j)) == Some(MemberState::Alive)
                            && sim.node(i).has_meta(sim_addr(j)))
                    {
                        eprintln!(
                            "{i} sees {j}: {:?} meta {}",
                            sim.node(i).member_state(sim_addr(j)),
                            sim.node(i).has_meta(sim_addr(j))
                        );
                    }
                }
            }
            panic!("not converged after {limit_ms} ms");
        }
        let t = sim.now_ms() + 500;
        sim.run_until(t, |_, _, _| {});
    }
    sim.now_ms() - start
}

#[test]
fn joins_reach_every_node_and_a_late_join_spreads_fast() {
    let mut sim = joined_cluster(0.01, 1);
    let took = run_until_converged(&mut sim, 60 * SECOND);
    eprintln!("100 staggered joins converged {took} ms after the last one");

    // One more node joins a settled cluster: every node must learn it (alive + metadata).
    let (_, all_at) = sim.join_and_time(&[3], N, 30 * SECOND);
    let took = all_at.expect("every node learns the new member within 30 s");
    eprintln!("a join reached all {N} nodes in {took} ms");
    assert!(took <= 5 * SECOND, "join took {took} ms");
}

#[test]
fn a_crashed_node_is_down_everywhere_and_nobody_else_dies() {
    let mut sim = joined_cluster(0.01, 2);
    run_until_converged(&mut sim, 60 * SECOND);

    let victim = 42;
    let victim_addr = sim_addr(victim);
    sim.crash(victim);
    let start = sim.now_ms();
    let mut false_deaths = Vec::new();
    let mut saw_down: HashSet<usize> = HashSet::new();
    let mut all_down_at = None;
    // Ten simulated minutes at 1 % loss: the victim must be Down everywhere, nobody else ever.
    while sim.now_ms() - start < 600 * SECOND {
        let t = sim.now_ms() + 100;
        sim.run_until(t, |now, node, e| {
            if let Event::MemberDown(a) = e {
                if *a == victim_addr {
                    saw_down.insert(node);
                } else {
                    false_deaths.push((now, node, *a));
                }
            }
        });
        if all_down_at.is_none() && saw_down.len() == N - 1 {
            all_down_at = Some(sim.now_ms() - start);
        }
    }
    let took = all_down_at.expect("every live node marks the crashed node down");
    eprintln!("crash detected by all {} live nodes in {took} ms", N - 1);
    assert!(took <= 30 * SECOND, "detection took {took} ms");
    assert!(false_deaths.is_empty(), "false deaths: {false_deaths:?}");
    for i in (0..N).filter(|i| *i != victim) {
        assert_eq!(
            sim.node(i).member_state(victim_addr),
            Some(MemberState::Down),
            "as seen by {i}"
        );
    }
    let s = sim.stats();
    eprintln!("traffic: {s:?}");
    assert!(s.packets_dropped > 0, "the network was lossy");
}

#[test]
fn metadata_changes_and_leaves_spread() {
    let mut sim = joined_cluster(0.01, 3);
    run_until_converged(&mut sim, 60 * SECOND);

    let mut meta = sim.node(7).meta().clone();
    meta.draining = true;
    sim.set_meta(7, meta.clone());
    sim.leave(9);
    let t = sim.now_ms() + 10 * SECOND;
    sim.run_until(t, |_, _, _| {});
    for i in (0..N).filter(|i| *i != 9) {
        assert_eq!(
            sim.node(i).meta_of(sim_addr(7)),
            Some((2, meta.clone())),
            "node {i}"
        );
        assert_eq!(
            sim.node(i).member_state(sim_addr(9)),
            Some(MemberState::Left),
            "node {i}"
        );
    }
}

// A settled cluster of `n` nodes on the shipped defaults over a bursty, lossy network.
fn realistic_cluster(n: usize, loss: f64, seed: u64) -> Sim {
    let mut sim = Sim::new(SimConfig::realistic(loss, seed));
    sim.add_converged(n);
    sim.run_until(10 * SECOND, |_, _, _| {});
    sim
}

#[test]
fn timings_follow_the_live_member_count_not_the_hint() {
    let mut sim = realistic_cluster(N, 0.01, 4);
    let want = |size: u32| {
        let (cfg, pp) = profile_settings(Profile::Lan, size);
        (
            size,
            cfg.suspect_to_down_after,
            cfg.max_transmissions.get(),
            pp,
        )
    };
    let got = |sim: &Sim, i: usize| {
        let t = sim.node(i).tuning();
        (
            t.members,
            t.suspicion_timeout,
            t.retransmissions,
            t.push_pull_interval,
        )
    };
    // Started with expected_size = 32; 100 members are live.
    assert_eq!(SimConfig::realistic(0.01, 4).expected_size, 32);
    for i in [0, 50, 99] {
        assert_eq!(got(&sim, i), want(N as u32), "node {i}");
        assert_eq!(
            sim.node(i).tuning().suspicion_max_timeout,
            want(N as u32).1 * sluice_gossip::node::SUSPICION_MAX_MULT
        );
    }
    // Half the cluster leaves: the rest retune to 50.
    for i in 50..N {
        sim.leave(i);
    }
    let t = sim.now_ms() + 30 * SECOND;
    sim.run_until(t, |_, _, _| {});
    assert_eq!(got(&sim, 0), want(50));
}

#[test]
fn the_tcp_fallback_probe_keeps_udp_loss_from_making_members_suspect() {
    // 5 % bursty datagram loss (and 5 % of TCP exchanges failing): the same cluster, the same
    // seed, with and without the fallback probe.
    let run = |fallback: bool| {
        let mut cfg = SimConfig::realistic(0.05, 8);
        cfg.probe_fallback = fallback;
        let mut sim = Sim::new(cfg);
        sim.add_converged(N);
        sim.run_until(10 * SECOND, |_, _, _| {});
        let c0 = sim.counts();
        sim.run_until(310 * SECOND, |_, _, _| {});
        let c = sim.counts();
        (c.false_suspicions - c0.false_suspicions, c, sim.stats())
    };
    let (without, c_without, _) = run(false);
    let (with, c_with, stats) = run(true);
    eprintln!(
        "{N} nodes, 300 s at 5 % bursty loss: false suspicions {without} without the fallback, {with} with it ({stats:?})"
    );
    assert_eq!((c_without.false_deaths, c_with.false_deaths), (0, 0));
    assert!(
        stats.probe_streams > 0 && stats.probe_stream_acks > 0,
        "{stats:?}"
    );
    assert!(
        without > 0,
        "the lossy network must cause false suspicions without the fallback, or this proves nothing"
    );
    assert!(
        with * 3 <= without,
        "the fallback should remove most false suspicions: {with} with it, {without} without"
    );
}

#[test]
fn slow_nodes_do_not_get_healthy_members_held() {
    // No loss, so that whatever healthy member gets suspected was suspected by a slow node.
    let run = |policy: HoldPolicy| {
        let mut sim = realistic_cluster(N, 0.0, 5);
        // Two nodes handle everything up to 5 s late; five others act as proxies.
        sim.set_slow(10, 5 * SECOND);
        sim.set_slow(20, 5 * SECOND);
        sim.observe(vec![1, 2, 3, 4, 5], policy);
        let t = sim.now_ms() + 1200 * SECOND;
        sim.run_until(t, |_, _, _| {});
        sim
    };
    let sim = run(HoldPolicy::default());
    let c = sim.counts();
    eprintln!(
        "20 minutes, 2 slow nodes of {N}: {c:?}; their local health {:?}",
        [sim.node(10).tuning(), sim.node(20).tuning()]
    );
    assert_eq!(c.false_deaths, 0, "{c:?}");
    assert!(
        c.false_suspicions > c.false_suspicions_of_slow,
        "the slow nodes did suspect healthy members: {c:?}"
    );
    // The slow nodes themselves may be held (they do stop answering); the healthy members
    // they failed to reach in time must not lose traffic anywhere.
    assert_eq!(c.held_healthy_ms - c.held_slow_ms, 0, "{c:?}");
    // Lifeguard: the slow nodes saw themselves late and slowed their probing down.
    assert!(
        sim.node(10).tuning().local_health > 0 || sim.node(20).tuning().local_health > 0,
        "local health rose on a slow node"
    );
    // The same run holding every suspect at once does hold healthy members.
    let naive = run(HoldPolicy {
        suspectors: 1,
        after: std::time::Duration::ZERO,
    })
    .counts();
    eprintln!("the same, holding every suspect at once: {naive:?}");
    assert!(naive.held_healthy_ms > naive.held_slow_ms, "{naive:?}");
}

#[test]
fn a_crash_is_held_fast_and_detected_on_a_bursty_network() {
    let mut sim = realistic_cluster(N, 0.05, 6);
    let observers: Vec<usize> = (1..6).collect();
    sim.observe(observers.clone(), HoldPolicy::default());
    let victim = 77;
    sim.crash(victim);
    let start = sim.now_ms();
    let mut down = HashSet::new();
    let t = start + 120 * SECOND;
    sim.run_until(t, |_, node, e| {
        if *e == Event::MemberDown(sim_addr(victim)) {
            down.insert(node);
        }
    });
    assert_eq!(
        down.len(),
        N - 1,
        "every live node marks the crashed node down"
    );
    let held: Vec<u64> = observers
        .iter()
        .map(|o| sim.first_held(*o, victim).expect("held by every observer") - start)
        .collect();
    eprintln!("crash held by the observers after {held:?} ms");
    assert!(held.iter().all(|ms| *ms <= 15 * SECOND), "{held:?}");
    assert_eq!(sim.counts().false_deaths, 0, "{:?}", sim.counts());
}

#[test]
fn a_partition_heals_and_the_cut_off_side_keeps_its_pools() {
    let mut sim = realistic_cluster(60, 0.01, 7);
    let small: Vec<usize> = (0..10).collect();
    let mut guard = LastKnownGood::new(0.5, std::time::Duration::from_secs(30));
    let mut frozen_seen = false;
    sim.partition(&small, 90 * SECOND);
    let heal = sim.now_ms() + 90 * SECOND;
    while sim.now_ms() < heal {
        let t = sim.now_ms() + SECOND;
        sim.run_until(t, |_, _, _| {});
        let now = sim.now_ms();
        // Node 0 is on the small side: it sees 50 of 59 members fail within seconds.
        let members = members_of(&mut sim, 0, now);
        if let Some(f) = guard.update(&members, now) {
            assert!(matches!(f, Freeze::MassFailure { .. }), "{f:?}");
            frozen_seen = true;
        }
    }
    assert!(
        frozen_seen,
        "the cut-off side kept its last-known-good pools"
    );
    // Healed: every node sees every other alive again, and the guard lets go.
    let took = run_until_converged(&mut sim, 120 * SECOND);
    eprintln!("partition healed, converged {took} ms later");
    let now = sim.now_ms();
    let members = members_of(&mut sim, 0, now);
    assert_eq!(guard.update(&members, now), None);
}

#[test]
fn churn_restarts_rejoin_and_nobody_else_dies() {
    let mut sim = realistic_cluster(N, 0.01, 8);
    // Every 20 s a node crashes and its replacement restarts 5 s later at the same address.
    for round in 0..10 {
        let victim = 30 + round * 3;
        sim.crash(victim);
        let t = sim.now_ms() + 5 * SECOND;
        sim.run_until(t, |_, _, _| {});
        sim.restart(victim, &[0]);
        let t = sim.now_ms() + 15 * SECOND;
        sim.run_until(t, |_, _, _| {});
    }
    run_until_converged(&mut sim, 60 * SECOND);
    assert_eq!(sim.counts().false_deaths, 0, "{:?}", sim.counts());
}

// Node `i`'s member list as a proxy sees it at `now`.
fn members_of(sim: &mut Sim, i: usize, now: u64) -> Vec<sluice_gossip::MemberInfo> {
    sim.refresh(i, now);
    sim.node(i).members()
}

#[test]
fn simulated_metadata_is_the_size_of_a_real_agents() {
    // Two services, a zone, eleven tags and a long host name: about 300 bytes, as the
    // benchmark's traffic figures assume.
    let len = postcard::to_allocvec(&sluice_gossip::sim::sim_meta(123))
        .expect("encodes")
        .len();
    assert!((270..=330).contains(&len), "{len} bytes");
}

#[test]
fn a_metadata_change_is_fetched_from_its_owner_once_per_node() {
    let mut sim = realistic_cluster(N, 0.01, 9);
    let mut meta = sim.node(7).meta().clone();
    meta.draining = true;
    let before = sim.stats();
    sim.set_meta(7, meta.clone());
    let t = sim.now_ms() + 5 * SECOND;
    sim.run_until(t, |_, _, _| {});
    for i in (0..N).filter(|i| *i != 7) {
        assert_eq!(
            sim.node(i).meta_of(sim_addr(7)),
            Some((2, meta.clone())),
            "node {i}"
        );
        assert_eq!(sim.node(i).errors().refused, 0, "node {i}");
    }
    // The change travelled as a small hint; every other node then asked node 7 for its record,
    // about once each (a fetch lost on the network is retried), instead of pulling anyone's
    // full state.
    let fetches = sim.stats().meta_fetches - before.meta_fetches;
    eprintln!("one metadata change: {fetches} fetches");
    assert!(
        (N as u64 - 1..=(N as u64 - 1) * 11 / 10).contains(&fetches),
        "{fetches} fetches"
    );
}

#[test]
fn forgotten_members_records_are_pruned_everywhere() {
    let mut cfg = SimConfig::realistic(0.01, 10);
    cfg.forget_after = std::time::Duration::from_secs(30);
    let mut sim = Sim::new(cfg);
    sim.add_converged(N);
    sim.run_until(10 * SECOND, |_, _, _| {});
    let crashed = [11, 22, 33];
    for v in crashed {
        sim.crash(v);
    }
    sim.leave(44);
    let gone: Vec<usize> = crashed.into_iter().chain([44]).collect();
    let live: Vec<usize> = (0..N).filter(|i| !gone.contains(i)).collect();
    // Detected within ~20 s; still listed (down or left), with their records, until forgotten.
    let t = sim.now_ms() + 25 * SECOND;
    sim.run_until(t, |_, _, _| {});
    assert_eq!(
        sim.node(0).member_state(sim_addr(44)),
        Some(MemberState::Left)
    );
    // Forgotten 30 s after they went down; records pruned within 8 probe periods after that.
    let t = sim.now_ms() + 60 * SECOND;
    sim.run_until(t, |_, _, _| {});
    for &i in &live {
        for &g in &gone {
            assert_eq!(sim.node(i).member_state(sim_addr(g)), None, "{i} sees {g}");
            assert!(!sim.node(i).has_meta(sim_addr(g)), "{i} keeps {g}'s record");
        }
        assert_eq!(
            sim.node(i).held_records(),
            (live.len(), 0),
            "node {i} holds exactly the live members' records"
        );
    }
    // The survivors are all still there.
    run_until_converged(&mut sim, 10 * SECOND);
}
