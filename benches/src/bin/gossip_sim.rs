//! Gossip membership at 1000 nodes on virtual time (see `sluice_gossip::sim`), on the shipped
//! defaults (LAN profile, `expected_size` 32: the nodes tune themselves to the live count).
//!
//! `cargo run --profile quick -p sluice-benches --bin gossip_sim [-- --nodes N --runs R --hour-secs S]`
//! (`--runs 0` or `--hour-secs 0` skips that part; `--hold-after-ms MS` and
//! `--hold-suspectors K` change the proxies' hold policy from its defaults; `--probe-fallback 0`
//! drops the nodes' TCP fallback probes, to compare)
//!
//! Network: 1–5 ms latency, loss in bursts (Gilbert–Elliott per receiving node: half the
//! datagrams lost during bad periods of 200 ms on average, the average loss as given), the same
//! share of TCP exchanges failing, TCP 10 ms slower. Metadata ~300 bytes per node. 1 % of the
//! nodes act as proxies applying the default hold policy (2 suspectors or 3 s).
//!
//! Prints, over `R` runs (p99 only with at least 100 runs):
//! - the time until 99.9 % of the nodes know a joining node (alive and with its metadata),
//! - the time until every live node marks a crashed node down, and until every proxy holds it,
//!
//! and over `S` simulated seconds at 1 % and 5 % loss with 1 % slow nodes (each input handled
//! up to 2 s late): false suspicions per node-hour, seconds healthy services were held, false
//! deaths, and traffic per node including IP/UDP/TCP headers.

use std::collections::HashSet;
use std::time::Instant;

use sluice_gossip::node::Event;
use sluice_gossip::sim::{sim_addr, Sim, SimConfig};
use sluice_gossip::HoldPolicy;

const SECOND: u64 = 1000;

struct Args {
    nodes: usize,
    runs: u64,
    hour_secs: u64,
    hold: HoldPolicy,
    probe_fallback: bool,
}

fn args() -> Args {
    let mut a = Args {
        nodes: 1000,
        runs: 100,
        hour_secs: 3600,
        hold: HoldPolicy::default(),
        probe_fallback: true,
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
            "--hold-after-ms" => a.hold.after = std::time::Duration::from_millis(value()),
            "--hold-suspectors" => a.hold.suspectors = value() as u32,
            "--probe-fallback" => a.probe_fallback = value() != 0,
            other => panic!("unknown argument {other}; use --nodes N --runs R --hour-secs S"),
        }
    }
    a
}

// The nodes acting as proxies: 1 % of them, at least 3, spread over the cluster.
fn observers(n: usize) -> Vec<usize> {
    let k = (n / 100).max(3);
    (0..k).map(|i| 1 + i * (n / k)).collect()
}

// A settled cluster of `n` nodes on defaults.
fn cluster(n: usize, loss: f64, seed: u64, hold: HoldPolicy, probe_fallback: bool) -> Sim {
    let mut cfg = SimConfig::realistic(loss, seed);
    cfg.probe_fallback = probe_fallback;
    let mut sim = Sim::new(cfg);
    sim.add_converged(n);
    sim.observe(observers(n), hold);
    sim.run_until(10 * SECOND, |_, _, _| {});
    sim
}

// Milliseconds until 99.9 % of the other nodes know a new node (MemberUp + metadata), and the
// metadata fetches until then (each node asks the joiner for its record, the joiner asks every
// member for theirs).
fn join_time(sim: &mut Sim, n: usize) -> (Option<u64>, u64) {
    let seed = (sim.now_ms() as usize * 31) % n;
    let need = (n as f64 * 0.999).ceil() as usize;
    let before = sim.stats();
    let t = sim.join_and_time(&[seed], need, 60 * SECOND).1;
    (t, sim.stats().meta_fetches - before.meta_fetches)
}

// Milliseconds until every live node marks a crashed node down, and until every proxy holds it.
fn detect_time(sim: &mut Sim, n: usize, victim: usize) -> (Option<u64>, Option<u64>) {
    let addr = sim_addr(victim);
    let live = (0..sim.len())
        .filter(|i| *i != victim && !sim.is_crashed(*i))
        .count();
    let obs: Vec<usize> = observers(n).into_iter().filter(|o| *o != victim).collect();
    sim.crash(victim);
    let start = sim.now_ms();
    let mut down = HashSet::new();
    let (mut held, mut all_down) = (None, None);
    while sim.now_ms() - start < 120 * SECOND {
        let t = sim.now_ms() + 10;
        sim.run_until(t, |_, node, e| {
            if *e == Event::MemberDown(addr) {
                down.insert(node);
            }
        });
        if held.is_none() && obs.iter().all(|o| sim.first_held(*o, victim).is_some()) {
            held = obs
                .iter()
                .filter_map(|o| sim.first_held(*o, victim))
                .max()
                .map(|at| at - start);
        }
        if all_down.is_none() && down.len() >= live {
            all_down = Some(sim.now_ms() - start);
        }
        if all_down.is_some() && held.is_some() {
            break;
        }
    }
    (all_down, held)
}

struct Hour {
    false_suspicions_per_node_hour: f64,
    false_suspicions_of_healthy: u64,
    false_suspicions_of_slow: u64,
    held_healthy_s: f64,
    held_slow_s: f64,
    longest_hold_s: f64,
    false_deaths: u64,
    bytes_per_node_sec: f64,
}

// `secs` simulated seconds with 1 % slow nodes, after a minute in which every node makes its
// first push-pull (scheduled from expected_size before the node retuned itself).
fn idle_hour(n: usize, loss: f64, secs: u64, seed: u64, a: &Args) -> Hour {
    let mut sim = cluster(n, loss, seed, a.hold, a.probe_fallback);
    sim.run_until(60 * SECOND, |_, _, _| {});
    let obs = observers(n);
    let slow = (n / 100).max(1);
    for i in 0..slow {
        // Not an observer: a slow proxy would measure itself.
        let s = 2 + i * (n / slow);
        if !obs.contains(&s) {
            sim.set_slow(s, 2 * SECOND);
        }
    }
    let (start, bytes0, c0) = (sim.now_ms(), sim.stats().bytes, sim.counts());
    sim.run_until(start + secs * SECOND, |_, _, _| {});
    let c = sim.counts();
    let node_hours = n as f64 * secs as f64 / 3600.0;
    let fs = c.false_suspicions - c0.false_suspicions;
    let fs_slow = c.false_suspicions_of_slow - c0.false_suspicions_of_slow;
    Hour {
        false_suspicions_per_node_hour: fs as f64 / node_hours,
        false_suspicions_of_healthy: fs - fs_slow,
        false_suspicions_of_slow: fs_slow,
        held_healthy_s: (c.held_healthy_ms - c0.held_healthy_ms) as f64 / 1000.0,
        held_slow_s: (c.held_slow_ms - c0.held_slow_ms) as f64 / 1000.0,
        longest_hold_s: c.longest_false_hold_ms as f64 / 1000.0,
        false_deaths: c.false_deaths - c0.false_deaths,
        bytes_per_node_sec: (sim.stats().bytes - bytes0) as f64 / n as f64 / secs as f64,
    }
}

fn fmt_ms(v: u64) -> String {
    if v == u64::MAX {
        "not reached".into()
    } else {
        format!("{:.2} s", v as f64 / 1000.0)
    }
}

fn summary(name: &str, v: &mut [u64], runs: u64, goal: &str) {
    v.sort_unstable();
    let at = |q: f64| v[((v.len() as f64 * q).ceil() as usize).saturating_sub(1)];
    let p99 = if runs >= 100 {
        format!("p99 {}", fmt_ms(at(0.99)))
    } else {
        format!("p99 not quoted ({runs} runs < 100)")
    };
    println!(
        "{name}: median {}, {p99}, max {} (goal {goal})",
        fmt_ms(at(0.5)),
        fmt_ms(*v.last().expect("runs >= 1"))
    );
}

fn main() {
    let a = args();
    let n = a.nodes;
    println!(
        "gossip simulation: {n} nodes, defaults (LAN, expected_size 32), bursty loss, {} runs, proxies hold after {} suspectors or {:?}, TCP fallback probe {}",
        a.runs, a.hold.suspectors, a.hold.after, if a.probe_fallback { "on" } else { "off" }
    );
    let (mut joins, mut downs, mut holds) = (Vec::new(), Vec::new(), Vec::new());
    let wall = Instant::now();
    for run in 0..a.runs {
        let mut sim = cluster(n, 0.01, 100 + run, a.hold, a.probe_fallback);
        let (j, fetches) = join_time(&mut sim, n);
        let (d, h) = detect_time(&mut sim, n, (run as usize * 97 + 13) % n);
        println!(
            "run {run}: join to 99.9 % {} ({fetches} metadata fetches until then), crash held by all proxies {}, down everywhere {} ({:.0} s wall so far)",
            fmt_ms(j.unwrap_or(u64::MAX)),
            fmt_ms(h.unwrap_or(u64::MAX)),
            fmt_ms(d.unwrap_or(u64::MAX)),
            wall.elapsed().as_secs_f64()
        );
        joins.push(j.unwrap_or(u64::MAX));
        downs.push(d.unwrap_or(u64::MAX));
        holds.push(h.unwrap_or(u64::MAX));
    }
    if a.runs > 0 {
        summary(
            "join known by 99.9 %, 1 % loss",
            &mut joins,
            a.runs,
            "<= 2.0 s",
        );
        summary(
            "crash down everywhere, 1 % loss",
            &mut downs,
            a.runs,
            "<= 20 s",
        );
        summary(
            "crash held by all proxies, 1 % loss",
            &mut holds,
            a.runs,
            "<= 5 s",
        );
    }

    for loss in [0.01, 0.05].into_iter().filter(|_| a.hour_secs > 0) {
        let wall = Instant::now();
        let h = idle_hour(n, loss, a.hour_secs, 7, &a);
        println!(
            "{:.0} % loss, 1 % slow nodes, {} simulated s: false suspicions {:.2} per node-hour ({} of healthy members, {} of slow ones; goal <= 1), healthy services held {:.1} observer-s ({:.1} of them slow members', longest hold {:.1} s), false deaths {} (goal 0), traffic {:.0} B/node/s (goal <= 5000) ({:.0} s wall)",
            loss * 100.0,
            a.hour_secs,
            h.false_suspicions_per_node_hour,
            h.false_suspicions_of_healthy,
            h.false_suspicions_of_slow,
            h.held_healthy_s,
            h.held_slow_s,
            h.longest_hold_s,
            h.false_deaths,
            h.bytes_per_node_sec,
            wall.elapsed().as_secs_f64()
        );
    }
}
