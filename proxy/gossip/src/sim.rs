//! Many [`Node`]s in one process on virtual time over a seeded, unkind network.
//!
//! No sockets, no sleeps, no encryption: the simulator moves the nodes' outputs through an
//! event queue ordered by virtual time, all random choices drawn from one seeded generator so a
//! run is reproducible. What the network and the nodes can do wrong:
//! - datagram loss, i.i.d. ([`LossModel::Uniform`]) or in bursts ([`LossModel::Bursty`], a
//!   Gilbert–Elliott channel per receiving node), plus extra per-node send or receive loss
//!   for asymmetric links ([`Sim::set_link_loss`]);
//! - push-pull and fallback-probe streams (TCP) that fail ([`SimConfig::tcp_loss`]) or are
//!   slow ([`SimConfig::tcp_extra_delay_ms`]);
//! - slow nodes ([`Sim::set_slow`]): the node handles every input late by a random delay, in
//!   no particular order (a starved gossip thread), timers included — the node is told how
//!   late, as the real runtime tells it;
//! - partitions that heal ([`Sim::partition`]); crashes, joins and restarts (churn).
//!
//! Timers start at random phases ([`Sim::add_converged`]), so nodes do not probe in lockstep.
//! Byte counts include what the real transport adds (plaintext header, nonce, tag, frame
//! length) and the IP/UDP/TCP headers (20 + 8 per datagram; 20 + 20 per TCP segment of up to
//! 1448 bytes and 7 segments per connection for its handshake and teardown).
//!
//! With [`Sim::observe`], some nodes act as proxies: every 100 ms they refresh their view and
//! apply the production [`HoldPolicy`], and the simulator counts how long healthy members'
//! services were held and when a crashed member became held.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};

use rand_foca::rngs::SmallRng;
use rand_foca::{RngExt, SeedableRng};

use super::keyring::SEAL_OVERHEAD;
use super::message::StreamMessage;
use super::node::{Event, Node, NodeId, NodeTimer, Output, PushPullState};
use super::routing::HoldPolicy;
use super::wire::{Kind, HEADER_LEN};
use super::{profile_settings, NodeMeta, Profile, Role, Service};

/// How datagrams are lost.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LossModel {
    /// Each datagram independently with [`SimConfig::loss`].
    Uniform,
    /// Gilbert–Elliott, per receiving node: a good state with little loss and a bad state in
    /// which `bad_loss` of the datagrams are lost, lasting `mean_bad_ms` on average; the
    /// time spent in each is set so the average loss is [`SimConfig::loss`].
    Bursty {
        /// Loss in the bad state.
        bad_loss: f64,
        /// Mean length of a bad period, ms.
        mean_bad_ms: f64,
    },
}

/// Network and cluster parameters of a simulation.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Average probability that a datagram is lost.
    pub loss: f64,
    /// How that loss is distributed.
    pub loss_model: LossModel,
    /// Probability that a push-pull stream exchange fails (no delivery, no reply).
    pub tcp_loss: f64,
    /// Extra latency of a stream exchange over a datagram (handshake, slow start), ms.
    pub tcp_extra_delay_ms: u64,
    /// Minimum one-way latency, ms.
    pub min_delay_ms: u64,
    /// Maximum one-way latency, ms.
    pub max_delay_ms: u64,
    /// Seed of every random choice (network and nodes).
    pub seed: u64,
    /// Timing profile of every node.
    pub profile: Profile,
    /// Expected cluster size given to every node (a starting hint; nodes tune themselves to
    /// the live member count).
    pub expected_size: u32,
    /// How long nodes remember a down member ([`crate::ClusterConfig::forget_after`]).
    pub forget_after: std::time::Duration,
    /// Carry the nodes' TCP fallback probes ([`crate::node::Output::ProbeStream`]); `false`
    /// drops them, as a network that blocks the gossip port's TCP (or a node without the
    /// fallback) would. On by default.
    pub probe_fallback: bool,
}

impl SimConfig {
    /// A LAN-profile network with 1–5 ms latency, i.i.d. loss and reliable streams.
    pub fn lan(expected_size: u32, loss: f64, seed: u64) -> Self {
        SimConfig {
            loss,
            loss_model: LossModel::Uniform,
            tcp_loss: 0.0,
            tcp_extra_delay_ms: 0,
            min_delay_ms: 1,
            max_delay_ms: 5,
            seed,
            profile: Profile::Lan,
            expected_size,
            forget_after: crate::DEFAULT_FORGET_AFTER,
            probe_fallback: true,
        }
    }

    /// The shipped defaults (LAN profile, `expected_size` 32) over an unkind network: 1–5 ms
    /// latency, `loss` in bursts (half the datagrams lost during bad periods of 200 ms on
    /// average), the same share of stream exchanges failing, streams 2–10 ms slower.
    pub fn realistic(loss: f64, seed: u64) -> Self {
        SimConfig {
            loss,
            loss_model: LossModel::Bursty {
                bad_loss: 0.5,
                mean_bad_ms: 200.0,
            },
            tcp_loss: loss,
            tcp_extra_delay_ms: 10,
            min_delay_ms: 1,
            max_delay_ms: 5,
            seed,
            profile: Profile::Lan,
            expected_size: crate::DEFAULT_EXPECTED_SIZE,
            forget_after: crate::DEFAULT_FORGET_AFTER,
            probe_fallback: true,
        }
    }
}

/// Traffic totals of a simulation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimStats {
    /// Datagrams handed to the network.
    pub packets_sent: u64,
    /// Datagrams the network dropped.
    pub packets_dropped: u64,
    /// Push-pull exchanges started.
    pub push_pulls: u64,
    /// Push-pull exchanges the network failed.
    pub push_pulls_failed: u64,
    /// TCP fallback probes started.
    pub probe_streams: u64,
    /// Of those, acks that came back in time.
    pub probe_stream_acks: u64,
    /// Bytes on the wire (see the module docs for what is counted).
    pub bytes: u64,
    /// Of the push-pull exchanges, those that fetched one member's record from it (GetMeta).
    pub meta_fetches: u64,
}

/// What went wrong, counted as it happened (see [`Sim::counts`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SimCounts {
    /// A node's own probe failed for a member that was running (not crashed): the node
    /// started a suspicion and voted.
    pub false_suspicions: u64,
    /// Of those, suspicions of members marked slow (they really were unresponsive for a while).
    pub false_suspicions_of_slow: u64,
    /// A running member declared down somewhere.
    pub false_deaths: u64,
    /// Observer-milliseconds during which a running member's services were held by an
    /// observer (summed over observers; see [`Sim::observe`]).
    pub held_healthy_ms: u64,
    /// Of those, for members marked slow.
    pub held_slow_ms: u64,
    /// The longest single hold of a running member by one observer, ms.
    pub longest_false_hold_ms: u64,
}

enum Delivery {
    Timer(NodeTimer),
    Packet(Vec<u8>),
    PushPull {
        from: usize,
        id: u64,
        body: Vec<u8>,
    },
    // The reply from `from` (the address dialled) to request `id`.
    PushPullReply {
        from: SocketAddr,
        id: u64,
        body: Vec<u8>,
    },
    // A fallback probe; its ack is useless after `expires_ms`.
    Probe {
        from: usize,
        body: Vec<u8>,
        expires_ms: u64,
    },
}

struct Pending {
    to: usize,
    // The node's incarnation in the simulator: a restarted node gets nothing meant for its
    // previous life.
    epoch: u32,
    // When it was due (timers report their lateness).
    due_ms: u64,
    // Already delayed by a slow node.
    lagged: bool,
    delivery: Delivery,
}

struct SimNode {
    node: Node,
    crashed: bool,
    epoch: u32,
    generation: u64,
    // Gilbert–Elliott state of this node's inbound link.
    bad: bool,
    switch_at: u64,
    send_loss: f64,
    recv_loss: f64,
    // A slow node's maximum processing delay, ms.
    slow: Option<u64>,
}

// The observers' view of holds.
struct Observing {
    observers: Vec<usize>,
    policy: HoldPolicy,
    next_ms: u64,
    // (observer, target) → when the observer started holding the target.
    holding: HashMap<(usize, usize), u64>,
    // (observer, target) → first time the observer held the target, kept after the hold ends.
    first_held: HashMap<(usize, usize), u64>,
}

/// Observers refresh their view this often.
pub const OBSERVE_EVERY_MS: u64 = 100;

/// The simulated cluster. Node `i` has gossip address `10.(i/65536).(i/256%256).(i%256):7946`
/// and name `node-i`.
pub struct Sim {
    cfg: SimConfig,
    now_ms: u64,
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, usize>,
    // (time, sequence) → index into `pending`; the sequence keeps same-time events in order.
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    pending: Vec<Option<Pending>>,
    free: Vec<usize>,
    seq: u64,
    rng: SmallRng,
    stats: SimStats,
    counts: SimCounts,
    // Side of each node during a partition, and when it heals.
    partition: Option<(Vec<bool>, u64)>,
    observing: Option<Observing>,
}

impl std::fmt::Debug for Sim {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sim")
            .field("now_ms", &self.now_ms)
            .field("nodes", &self.nodes.len())
            .finish()
    }
}

/// Gossip address of simulated node `i`.
pub fn sim_addr(i: usize) -> SocketAddr {
    let ip = Ipv4Addr::new(10, (i >> 16) as u8, (i >> 8) as u8, i as u8);
    SocketAddr::new(ip.into(), 7946)
}

/// Metadata of simulated node `i`: a backend in one of three zones with a few tags, offering
/// a service to pool "web" and one to pool "api" — about 300 bytes encoded, like a real agent.
pub fn sim_meta(i: usize) -> NodeMeta {
    let mut meta = NodeMeta::new(
        format!("backend-{i:05}.eu-west.example.internal"),
        Role::Backend,
    );
    meta.zone = format!("eu-west-{}", i % 3);
    meta.tags = vec![
        "tier:frontend".into(),
        "canary:false".into(),
        format!("rack:r{:03}", i % 200),
        "build:2026.11.30-1".into(),
        "team:payments".into(),
        "region:eu-west-1".into(),
        "kernel:6.8.0-45-generic".into(),
        "owner:checkout-platform".into(),
        "instance:m6i.2xlarge".into(),
        "az:eu-west-1b".into(),
        "sla:gold".into(),
    ];
    let ip = sim_addr(i).ip();
    meta.services.push(Service {
        pool: "web".into(),
        addr: SocketAddr::new(ip, 8080),
        weight: 1,
        zone: None,
        tags: None,
    });
    meta.services.push(Service {
        pool: "api-internal".into(),
        addr: SocketAddr::new(ip, 9090),
        weight: 2,
        zone: None,
        tags: Some(vec!["grpc".into(), "v2".into()]),
    });
    meta
}

// IP + UDP headers of a datagram.
const UDP_OVERHEAD: u64 = 28;
// IP + TCP headers of a segment, the payload of a segment, and the segments of a connection's
// handshake and teardown.
const TCP_SEGMENT_OVERHEAD: u64 = 40;
const TCP_MSS: u64 = 1448;
const TCP_CONNECTION_SEGMENTS: u64 = 7;

fn stream_bytes(body: usize) -> u64 {
    let framed = (4 + HEADER_LEN + SEAL_OVERHEAD + body) as u64;
    framed + framed.div_ceil(TCP_MSS) * TCP_SEGMENT_OVERHEAD
}

impl Sim {
    /// Adds a node, joins it through `seeds`, and runs until `need` other nodes know it (foca
    /// reported it up and its metadata arrived) or `limit_ms` of virtual time passed. Returns the
    /// new node's index and the time it took, if it got there.
    pub fn join_and_time(
        &mut self,
        seeds: &[usize],
        need: usize,
        limit_ms: u64,
    ) -> (usize, Option<u64>) {
        let new = self.add_node();
        let addr = sim_addr(new);
        let start = self.now_ms();
        self.join(new, seeds);
        let (mut up, mut meta) = (HashSet::new(), HashSet::new());
        while self.now_ms() - start < limit_ms {
            let t = self.now_ms() + 10;
            self.run_until(t, |_, node, e| match e {
                Event::MemberUp(a) if *a == addr => {
                    up.insert(node);
                }
                Event::Meta(a) if *a == addr => {
                    meta.insert(node);
                }
                _ => {}
            });
            if up.intersection(&meta).count() >= need {
                return (new, Some(self.now_ms() - start));
            }
        }
        (new, None)
    }

    /// An empty simulation at virtual time 0.
    pub fn new(cfg: SimConfig) -> Sim {
        let rng = SmallRng::seed_from_u64(cfg.seed);
        Sim {
            cfg,
            now_ms: 0,
            nodes: Vec::new(),
            by_addr: HashMap::new(),
            queue: BinaryHeap::new(),
            pending: Vec::new(),
            free: Vec::new(),
            seq: 0,
            rng,
            stats: SimStats::default(),
            counts: SimCounts::default(),
            partition: None,
            observing: None,
        }
    }

    /// Virtual time, ms.
    pub fn now_ms(&self) -> u64 {
        self.now_ms
    }

    /// Number of nodes ever added (crashed ones included).
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// Whether no node was added yet.
    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }

    /// Traffic so far.
    pub fn stats(&self) -> SimStats {
        self.stats
    }

    /// What went wrong so far.
    pub fn counts(&self) -> SimCounts {
        self.counts
    }

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i].node
    }

    /// Refreshes node `i`'s member view at `now_ms` (as a driver does after its inputs).
    pub fn refresh(&mut self, i: usize, now_ms: u64) {
        self.nodes[i].node.refresh(now_ms);
    }

    /// Whether node `i` was crashed.
    pub fn is_crashed(&self, i: usize) -> bool {
        self.nodes[i].crashed
    }

    fn new_node(&mut self, i: usize, generation: u64) -> Node {
        let (mut foca_cfg, push_pull) = profile_settings(self.cfg.profile, self.cfg.expected_size);
        foca_cfg.remove_down_after = Some(self.cfg.forget_after);
        let seed = self.rng.random::<u64>();
        let id = NodeId {
            addr: sim_addr(i),
            generation,
        };
        Node::new(
            id,
            sim_meta(i),
            foca_cfg,
            push_pull,
            self.cfg.expected_size,
            seed,
            self.now_ms,
        )
    }

    /// Adds a node that knows nobody yet; returns its index.
    pub fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let node = self.new_node(i, 1);
        self.by_addr.insert(sim_addr(i), i);
        self.nodes.push(SimNode {
            node,
            crashed: false,
            epoch: 0,
            generation: 1,
            // Toggled to good at the first datagram, which starts the chain at time 0.
            bad: true,
            switch_at: 0,
            send_loss: 0.0,
            recv_loss: 0.0,
            slow: None,
        });
        self.dispatch(i, 0, &mut |_, _, _| {});
        i
    }

    /// Adds `n` nodes that already know each other (alive, with metadata), as if they had
    /// converged long ago: each is given the full state without rebroadcasting it. Building a
    /// large cluster this way skips the join storm that is not what the benchmarks measure.
    /// Each node's timers start at a random phase within a probe period.
    pub fn add_converged(&mut self, n: usize) {
        let first = self.nodes.len();
        for _ in 0..n {
            self.add_node();
        }
        let mut state = PushPullState::default();
        for i in first..first + n {
            let s = self.nodes[i].node.state();
            state
                .members
                .extend(s.members.into_iter().filter(|m| m.id().addr == sim_addr(i)));
            state
                .records
                .extend(s.records.into_iter().filter(|r| r.addr == sim_addr(i)));
        }
        let period = self.nodes[first].node.tuning().probe_interval.as_millis() as u64;
        for i in first..first + n {
            self.nodes[i].node.preload_state(state.clone());
            let phase = self.rng.random_range(0..period.max(1));
            self.dispatch(i, phase, &mut |_, _, _| {});
        }
    }

    /// Makes node `i` join through `seeds`.
    pub fn join(&mut self, i: usize, seeds: &[usize]) {
        let seeds: Vec<SocketAddr> = seeds.iter().map(|s| sim_addr(*s)).collect();
        self.nodes[i].node.join(&seeds);
        self.dispatch(i, 0, &mut |_, _, _| {});
    }

    /// Stops node `i` without a word: its timers and the packets sent to it are dropped.
    pub fn crash(&mut self, i: usize) {
        self.nodes[i].crashed = true;
    }

    /// Starts crashed node `i` again at the same address with a higher generation (a process
    /// restart) and joins it through `seeds`.
    pub fn restart(&mut self, i: usize, seeds: &[usize]) {
        let generation = self.nodes[i].generation + 1;
        let node = self.new_node(i, generation);
        let n = &mut self.nodes[i];
        n.node = node;
        n.generation = generation;
        n.epoch += 1;
        n.crashed = false;
        self.dispatch(i, 0, &mut |_, _, _| {});
        self.join(i, seeds);
    }

    /// Node `i` leaves gracefully.
    pub fn leave(&mut self, i: usize) {
        self.nodes[i].node.leave();
        self.dispatch(i, 0, &mut |_, _, _| {});
    }

    /// Node `i` changes its metadata.
    pub fn set_meta(&mut self, i: usize, meta: NodeMeta) {
        self.nodes[i].node.set_meta(meta);
        self.dispatch(i, 0, &mut |_, _, _| {});
    }

    /// Extra loss on node `i`'s outbound and inbound datagrams (asymmetric links).
    pub fn set_link_loss(&mut self, i: usize, send: f64, recv: f64) {
        self.nodes[i].send_loss = send;
        self.nodes[i].recv_loss = recv;
    }

    /// Makes node `i` slow: it handles every input (packets, streams, timers) late by a
    /// uniform random delay of up to `max_lag_ms`, so not in the order they arrived.
    pub fn set_slow(&mut self, i: usize, max_lag_ms: u64) {
        self.nodes[i].slow = Some(max_lag_ms);
    }

    /// Whether node `i` was made slow.
    pub fn is_slow(&self, i: usize) -> bool {
        self.nodes[i].slow.is_some()
    }

    /// Cuts `side` off from every other node (datagrams and streams) for `for_ms`.
    pub fn partition(&mut self, side: &[usize], for_ms: u64) {
        let mut sides = vec![false; self.nodes.len()];
        for &i in side {
            sides[i] = true;
        }
        self.partition = Some((sides, self.now_ms + for_ms));
    }

    /// Makes `observers` act as proxies applying `policy` (see the module docs).
    pub fn observe(&mut self, observers: Vec<usize>, policy: HoldPolicy) {
        self.observing = Some(Observing {
            observers,
            policy,
            next_ms: self.now_ms,
            holding: HashMap::new(),
            first_held: HashMap::new(),
        });
    }

    /// When `observer` first held `target`'s services, if it did.
    pub fn first_held(&self, observer: usize, target: usize) -> Option<u64> {
        self.observing
            .as_ref()?
            .first_held
            .get(&(observer, target))
            .copied()
    }

    /// Runs until virtual time `until_ms`, calling `on_event(now_ms, node, event)` for every
    /// membership event of a live node.
    pub fn run_until(&mut self, until_ms: u64, mut on_event: impl FnMut(u64, usize, &Event)) {
        while let Some(&Reverse((at, _, slot))) = self.queue.peek() {
            if at > until_ms {
                break;
            }
            self.observe_until(at);
            self.queue.pop();
            self.now_ms = at;
            let p = self.pending[slot].take().expect("queued slot is filled");
            self.free.push(slot);
            let to = p.to;
            if self.nodes[to].crashed || self.nodes[to].epoch != p.epoch {
                continue;
            }
            if let (Some(max), false) = (self.nodes[to].slow, p.lagged) {
                let lag = self.rng.random_range(0..=max);
                self.requeue(at + lag, Pending { lagged: true, ..p });
                continue;
            }
            let node = &mut self.nodes[to].node;
            match p.delivery {
                Delivery::Timer(t) => {
                    node.timer_lateness(std::time::Duration::from_millis(at - p.due_ms));
                    node.handle_timer(t)
                }
                Delivery::Packet(body) => node.handle_packet(&body),
                Delivery::PushPullReply { from, id, body } => {
                    node.handle_stream_reply(from, id, &body);
                }
                Delivery::PushPull { from, id, body } => {
                    let me = node.id().addr;
                    if let Some(reply) = node.handle_stream(Kind::PushPull, &body) {
                        self.stats.bytes += stream_bytes(reply.len());
                        let delay = self.delay() + self.cfg.tcp_extra_delay_ms;
                        let reply = Delivery::PushPullReply {
                            from: me,
                            id,
                            body: reply,
                        };
                        self.schedule(delay, from, reply);
                    }
                }
                Delivery::Probe {
                    from,
                    body,
                    expires_ms,
                } => {
                    if let Some(ack) = node.handle_stream(Kind::Probe, &body) {
                        self.stats.bytes += stream_bytes(ack.len());
                        let delay = self.delay() + self.cfg.tcp_extra_delay_ms;
                        // The prober's stream timeout: a late ack is never read.
                        if self.now_ms + delay <= expires_ms {
                            self.stats.probe_stream_acks += 1;
                            self.schedule(delay, from, Delivery::Packet(ack));
                        }
                    }
                }
            }
            self.dispatch(to, 0, &mut on_event);
        }
        self.observe_until(until_ms);
        self.now_ms = self.now_ms.max(until_ms);
    }

    // Lets observers look at their views at every observation time up to `t`.
    fn observe_until(&mut self, t: u64) {
        let Some(mut obs) = self.observing.take() else {
            return;
        };
        while obs.next_ms <= t {
            let now = obs.next_ms;
            for &o in &obs.observers {
                if self.nodes[o].crashed {
                    continue;
                }
                self.nodes[o].node.refresh(now);
                let held: Vec<usize> = self.nodes[o]
                    .node
                    .suspects()
                    .filter(|(_, since, n)| obs.policy.holds_suspect(*n, *since, now))
                    .filter_map(|(a, _, _)| self.by_addr.get(&a).copied())
                    .collect();
                for &target in &held {
                    obs.holding.entry((o, target)).or_insert(now);
                    obs.first_held.entry((o, target)).or_insert(now);
                    if !self.nodes[target].crashed {
                        self.counts.held_healthy_ms += OBSERVE_EVERY_MS;
                        if self.nodes[target].slow.is_some() {
                            self.counts.held_slow_ms += OBSERVE_EVERY_MS;
                        }
                    }
                }
                let nodes = &self.nodes;
                let counts = &mut self.counts;
                obs.holding.retain(|&(ob, target), since| {
                    if ob != o || held.contains(&target) {
                        return true;
                    }
                    if !nodes[target].crashed {
                        counts.longest_false_hold_ms =
                            counts.longest_false_hold_ms.max(now - *since);
                    }
                    false
                });
            }
            obs.next_ms += OBSERVE_EVERY_MS;
        }
        self.observing = Some(obs);
    }

    fn exp(&mut self, mean: f64) -> u64 {
        let u: f64 = self.rng.random_range(f64::EPSILON..1.0);
        (-u.ln() * mean) as u64
    }

    fn delay(&mut self) -> u64 {
        self.rng
            .random_range(self.cfg.min_delay_ms..=self.cfg.max_delay_ms)
    }

    fn schedule(&mut self, after_ms: u64, to: usize, d: Delivery) {
        let p = Pending {
            to,
            epoch: self.nodes[to].epoch,
            due_ms: self.now_ms + after_ms,
            lagged: false,
            delivery: d,
        };
        self.requeue(self.now_ms + after_ms, p);
    }

    fn requeue(&mut self, at: u64, p: Pending) {
        let slot = match self.free.pop() {
            Some(s) => {
                self.pending[s] = Some(p);
                s
            }
            None => {
                self.pending.push(Some(p));
                self.pending.len() - 1
            }
        };
        self.seq += 1;
        self.queue.push(Reverse((at, self.seq, slot)));
    }

    fn partitioned(&mut self, a: usize, b: usize) -> bool {
        match &self.partition {
            Some((_, heal)) if *heal <= self.now_ms => {
                self.partition = None;
                false
            }
            Some((sides, _)) => {
                sides.get(a).copied().unwrap_or(false) != sides.get(b).copied().unwrap_or(false)
            }
            None => false,
        }
    }

    // Whether a datagram from `from` to `to` is lost now.
    fn lost(&mut self, from: usize, to: usize) -> bool {
        let link = match self.cfg.loss_model {
            LossModel::Uniform => self.cfg.loss,
            LossModel::Bursty {
                bad_loss,
                mean_bad_ms,
            } => {
                // Good-state loss is a fifth of the average; the bad share of time follows.
                let good_loss = self.cfg.loss * 0.2;
                let bad_share =
                    ((self.cfg.loss - good_loss) / (bad_loss - good_loss)).clamp(0.0, 1.0);
                let mean_good_ms = if bad_share > 0.0 {
                    mean_bad_ms * (1.0 - bad_share) / bad_share
                } else {
                    f64::INFINITY
                };
                while self.nodes[to].switch_at <= self.now_ms {
                    let bad = !self.nodes[to].bad;
                    let mean = if bad { mean_bad_ms } else { mean_good_ms };
                    let len = if mean.is_finite() {
                        self.exp(mean).max(1)
                    } else {
                        u64::MAX / 2
                    };
                    let n = &mut self.nodes[to];
                    n.bad = bad;
                    n.switch_at += len;
                }
                if self.nodes[to].bad {
                    bad_loss
                } else {
                    good_loss
                }
            }
        };
        let keep =
            (1.0 - link) * (1.0 - self.nodes[from].send_loss) * (1.0 - self.nodes[to].recv_loss);
        self.rng.random_bool((1.0 - keep).clamp(0.0, 1.0))
    }

    // Moves node `i`'s outputs into the network (timers shifted by `phase_ms`) and reports
    // its events, counting false suspicions and deaths.
    fn dispatch(&mut self, i: usize, phase_ms: u64, on_event: &mut dyn FnMut(u64, usize, &Event)) {
        let outputs = self.nodes[i].node.take_outputs();
        for e in self.nodes[i].node.take_events() {
            match e {
                Event::Suspected(a) | Event::MemberDown(a) => {
                    if let Some(&t) = self.by_addr.get(&a) {
                        if !self.nodes[t].crashed && !self.nodes[t].node.has_left() {
                            if matches!(e, Event::Suspected(_)) {
                                self.counts.false_suspicions += 1;
                                if self.nodes[t].slow.is_some() {
                                    self.counts.false_suspicions_of_slow += 1;
                                }
                            } else {
                                self.counts.false_deaths += 1;
                            }
                        }
                    }
                }
                _ => {}
            }
            on_event(self.now_ms, i, &e);
        }
        for out in outputs {
            match out {
                Output::Timer { after, timer } => {
                    // Round up so a timer never fires before it is due.
                    let ms = after.as_micros().div_ceil(1000) as u64;
                    self.schedule(ms + phase_ms, i, Delivery::Timer(timer));
                }
                Output::Packet { to, body } => {
                    self.stats.packets_sent += 1;
                    self.stats.bytes +=
                        (body.len() + HEADER_LEN + SEAL_OVERHEAD) as u64 + UDP_OVERHEAD;
                    let Some(&dst) = self.by_addr.get(&to) else {
                        continue;
                    };
                    if self.partitioned(i, dst) || self.lost(i, dst) {
                        self.stats.packets_dropped += 1;
                        continue;
                    }
                    let delay = self.delay();
                    self.schedule(delay, dst, Delivery::Packet(body));
                }
                Output::ProbeStream { to, body, within } => {
                    if !self.cfg.probe_fallback {
                        continue;
                    }
                    self.stats.probe_streams += 1;
                    self.stats.bytes +=
                        stream_bytes(body.len()) + TCP_CONNECTION_SEGMENTS * TCP_SEGMENT_OVERHEAD;
                    let Some(&dst) = self.by_addr.get(&to) else {
                        continue;
                    };
                    if self.partitioned(i, dst) || self.rng.random_bool(self.cfg.tcp_loss) {
                        continue;
                    }
                    let expires_ms = self.now_ms + within.as_millis() as u64;
                    let delay = self.delay() + self.cfg.tcp_extra_delay_ms;
                    self.schedule(
                        delay,
                        dst,
                        Delivery::Probe {
                            from: i,
                            body,
                            expires_ms,
                        },
                    );
                }
                Output::PushPull { to, id, body } => {
                    self.stats.push_pulls += 1;
                    if matches!(
                        StreamMessage::decode(&body),
                        Some(StreamMessage::GetMeta { .. })
                    ) {
                        self.stats.meta_fetches += 1;
                    }
                    self.stats.bytes +=
                        stream_bytes(body.len()) + TCP_CONNECTION_SEGMENTS * TCP_SEGMENT_OVERHEAD;
                    let Some(&dst) = self.by_addr.get(&to) else {
                        continue;
                    };
                    if self.partitioned(i, dst) || self.rng.random_bool(self.cfg.tcp_loss) {
                        self.stats.push_pulls_failed += 1;
                        continue;
                    }
                    let delay = self.delay() + self.cfg.tcp_extra_delay_ms;
                    self.schedule(delay, dst, Delivery::PushPull { from: i, id, body });
                }
            }
        }
    }
}
