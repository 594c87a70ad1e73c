//! Gossip membership at 1000 nodes on virtual time (see `sluice_gossip::sim`).
//!
//! `cargo run --release -p sluice-benches --bin gossip_sim [-- --nodes N --runs R --hour-secs S]`
//!
//! Prints, for the LAN profile over a network with 1–5 ms latency:
//! - the time until 99.9 % of the nodes know a joining node (alive and with its metadata),
//! - the time until every live node marks a crashed node down at 1 % loss (p99 over the runs;
//!   with few runs that is the maximum),
//! - false deaths (a live node declared down anywhere) over one simulated hour at 1 % and 5 % loss,
//! - idle traffic per node per second during that hour.

use std::collections::HashSet;
use std::time::Instant;

use sluice_gossip::node::Event;
use sluice_gossip::sim::{sim_addr, Sim, SimConfig};

const SECOND: u64 = 1000;

struct Args {
    nodes: usize,
    runs: u64,
    hour_secs: u64,
}

fn args() -> Args {
    let mut a = Args {
        nodes: 1000,
        runs: 5,
        hour_secs: 3600,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let value = || {
            pair.get(1)
                .and_then(|v| v.parse::<u64>().ok())
                .expect("a number after the flag")
        };
        match pair[0].as_str() {
            "--nodes" => a.nodes = value() as usize,
            "--runs" => a.runs = value(),
            "--hour-secs" => a.hour_secs = value(),
            other => panic!("unknown argument {other}; use --nodes N --runs R --hour-secs S"),
        }
    }
    a
}

// A settled cluster of `n` nodes.
fn cluster(n: usize, loss: f64, seed: u64) -> Sim {
    let mut sim = Sim::new(SimConfig::lan(n as u32, loss, seed));
    sim.add_converged(n);
    sim.run_until(10 * SECOND, |_, _, _| {});
    sim
}

// Milliseconds until 99.9 % of the other nodes know a new node (MemberUp + metadata).
fn join_time(sim: &mut Sim, n: usize) -> Option<u64> {
    let seed = (sim.now_ms() as usize * 31) % n;
    let need = (n as f64 * 0.999).ceil() as usize;
    sim.join_and_time(&[seed], need, 60 * SECOND).1
}

// Milliseconds until every live node marks a crashed node down.
fn detect_time(sim: &mut Sim, victim: usize) -> Option<u64> {
    let addr = sim_addr(victim);
    let live = (0..sim.len())
        .filter(|i| *i != victim && !sim.is_crashed(*i))
        .count();
    sim.crash(victim);
    let start = sim.now_ms();
    let mut down = HashSet::new();
    while sim.now_ms() - start < 120 * SECOND {
        let t = sim.now_ms() + 10;
        sim.run_until(t, |_, node, e| {
            if *e == Event::MemberDown(addr) {
                down.insert(node);
            }
        });
        if down.len() >= live {
            return Some(sim.now_ms() - start);
        }
    }
    None
}

// False deaths and idle bytes per node per second over `secs` simulated seconds.
fn idle_hour(n: usize, loss: f64, secs: u64, seed: u64) -> (usize, f64) {
    let mut sim = cluster(n, loss, seed);
    let (start, bytes0) = (sim.now_ms(), sim.stats().bytes);
    let mut deaths = 0;
    sim.run_until(start + secs * SECOND, |_, _, e| {
        if matches!(e, Event::MemberDown(_)) {
            deaths += 1;
        }
    });
    let per_node_sec = (sim.stats().bytes - bytes0) as f64 / n as f64 / secs as f64;
    (deaths, per_node_sec)
}

fn fmt_ms(v: Option<u64>) -> String {
    v.map_or("not reached".into(), |ms| {
        format!("{:.2} s", ms as f64 / 1000.0)
    })
}

fn main() {
    let a = args();
    let n = a.nodes;
    println!(
        "gossip simulation: {n} nodes, LAN profile, 1-5 ms latency, {} runs",
        a.runs
    );

    let mut joins = Vec::new();
    let mut detects = Vec::new();
    for run in 0..a.runs {
        let wall = Instant::now();
        let mut sim = cluster(n, 0.01, 100 + run);
        let j = join_time(&mut sim, n);
        let d = detect_time(&mut sim, (run as usize * 97 + 13) % n);
        println!(
            "run {run}: join to 99.9 % {}, crash down everywhere {} ({:.1} s wall)",
            fmt_ms(j),
            fmt_ms(d),
            wall.elapsed().as_secs_f64()
        );
        joins.push(j.unwrap_or(u64::MAX));
        detects.push(d.unwrap_or(u64::MAX));
    }
    joins.sort_unstable();
    detects.sort_unstable();
    let p99 = |v: &[u64]| v[((v.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)];
    let median = |v: &[u64]| v[v.len() / 2];
    println!(
        "join known by 99.9 %: median {}, max {} (goal <= 2.0 s)",
        fmt_ms(Some(median(&joins))),
        fmt_ms(Some(*joins.last().expect("runs >= 1")))
    );
    println!(
        "crash marked down by all live nodes at 1 % loss: p99 {} (goal <= 20 s)",
        fmt_ms(Some(p99(&detects)))
    );

    for loss in [0.01, 0.05] {
        let wall = Instant::now();
        let (deaths, bps) = idle_hour(n, loss, a.hour_secs, 7);
        println!(
            "{:.0} % loss, {} simulated s: false deaths {deaths} (goal 0), idle traffic {:.0} B/node/s (goal <= 5000) ({:.1} s wall)",
            loss * 100.0,
            a.hour_secs,
            bps,
            wall.elapsed().as_secs_f64()
        );
    }
}
