//! Gossip membership at scale, simulated: ~100 nodes in one process on virtual time over a
//! seeded lossy network (see `sluice_gossip::sim`). No sockets, no sleeps; every run is the
//! same run.

use std::collections::HashSet;

use sluice_gossip::node::Event;
use sluice_gossip::sim::{sim_addr, Sim, SimConfig};
use sluice_gossip::MemberState;

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
