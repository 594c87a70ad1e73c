//! Many [`Node`]s in one process on virtual time over a seeded lossy network.
//!
//! No sockets, no sleeps, no encryption: the simulator moves the nodes' outputs through an
//! event queue ordered by virtual time, dropping datagrams with a fixed probability and delaying
//! them by a random latency, all drawn from one seeded generator so a run is reproducible.
//! Push-pull streams are delivered reliably (TCP retransmits) with the same latency. Byte
//! counts include what the real transport would add (plaintext header, nonce, tag, frame
//! length), but not IP/UDP/TCP headers.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap, HashSet};
use std::net::{Ipv4Addr, SocketAddr};

use rand_foca::rngs::SmallRng;
use rand_foca::{RngExt, SeedableRng};

use super::keyring::SEAL_OVERHEAD;
use super::node::{Event, Node, NodeId, NodeTimer, Output, PushPullState};
use super::wire::{Kind, HEADER_LEN};
use super::{profile_settings, NodeMeta, Profile, Role, Service};

/// Network and cluster parameters of a simulation.
#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Probability that a datagram is lost.
    pub loss: f64,
    /// Minimum one-way latency, ms.
    pub min_delay_ms: u64,
    /// Maximum one-way latency, ms.
    pub max_delay_ms: u64,
    /// Seed of every random choice (network and nodes).
    pub seed: u64,
    /// Timing profile of every node.
    pub profile: Profile,
    /// Expected cluster size given to the profile.
    pub expected_size: u32,
}

impl SimConfig {
    /// A LAN-profile network with 1–5 ms latency and the given loss.
    pub fn lan(expected_size: u32, loss: f64, seed: u64) -> Self {
        SimConfig {
            loss,
            min_delay_ms: 1,
            max_delay_ms: 5,
            seed,
            profile: Profile::Lan,
            expected_size,
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
    /// Bytes on the wire (see the module docs for what is counted).
    pub bytes: u64,
}

enum Delivery {
    Timer(NodeTimer),
    Packet(Vec<u8>),
    PushPull { from: usize, body: Vec<u8> },
    PushPullReply(Vec<u8>),
}

struct SimNode {
    node: Node,
    crashed: bool,
}

/// The simulated cluster. Node `i` has gossip address `10.(i/65536).(i/256%256).(i%256):7946`
/// and name `node-i`.
pub struct Sim {
    cfg: SimConfig,
    now_ms: u64,
    nodes: Vec<SimNode>,
    by_addr: HashMap<SocketAddr, usize>,
    // (time, sequence) → index into `pending`; the sequence keeps same-time events in order.
    queue: BinaryHeap<Reverse<(u64, u64, usize)>>,
    pending: Vec<Option<(usize, Delivery)>>,
    free: Vec<usize>,
    seq: u64,
    rng: SmallRng,
    stats: SimStats,
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

/// Metadata of simulated node `i`: a backend offering one service to pool "web".
pub fn sim_meta(i: usize) -> NodeMeta {
    let mut meta = NodeMeta::new(format!("node-{i}"), Role::Backend);
    meta.zone = format!("zone-{}", i % 3);
    meta.services.push(Service {
        pool: "web".into(),
        addr: SocketAddr::new(sim_addr(i).ip(), 8080),
        weight: 1,
        zone: None,
        tags: None,
    });
    meta
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

    /// Node `i`.
    pub fn node(&self, i: usize) -> &Node {
        &self.nodes[i].node
    }

    /// Whether node `i` was crashed.
    pub fn is_crashed(&self, i: usize) -> bool {
        self.nodes[i].crashed
    }

    /// Adds a node that knows nobody yet; returns its index.
    pub fn add_node(&mut self) -> usize {
        let i = self.nodes.len();
        let (foca_cfg, push_pull) = profile_settings(self.cfg.profile, self.cfg.expected_size);
        let seed = self.rng.random::<u64>();
        let id = NodeId {
            addr: sim_addr(i),
            generation: 1,
        };
        let node = Node::new(id, sim_meta(i), foca_cfg, push_pull, seed, self.now_ms);
        self.by_addr.insert(sim_addr(i), i);
        self.nodes.push(SimNode {
            node,
            crashed: false,
        });
        self.dispatch(i, &mut |_, _, _| {});
        i
    }

    /// Adds `n` nodes that already know each other (alive, with metadata), as if they had
    /// converged long ago: each is given the full state without rebroadcasting it. Building a
    /// large cluster this way skips the join storm that is not what the benchmarks measure.
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
                .metas
                .extend(s.metas.into_iter().filter(|m| m.addr == sim_addr(i)));
        }
        for i in first..first + n {
            self.nodes[i].node.apply_state(state.clone(), false);
            self.dispatch(i, &mut |_, _, _| {});
        }
    }

    /// Makes node `i` join through `seeds`.
    pub fn join(&mut self, i: usize, seeds: &[usize]) {
        let seeds: Vec<SocketAddr> = seeds.iter().map(|s| sim_addr(*s)).collect();
        self.nodes[i].node.join(&seeds);
        self.dispatch(i, &mut |_, _, _| {});
    }

    /// Stops node `i` without a word: its timers and the packets sent to it are dropped.
    pub fn crash(&mut self, i: usize) {
        self.nodes[i].crashed = true;
    }

    /// Node `i` leaves gracefully.
    pub fn leave(&mut self, i: usize) {
        self.nodes[i].node.leave();
        self.dispatch(i, &mut |_, _, _| {});
    }

    /// Node `i` changes its metadata.
    pub fn set_meta(&mut self, i: usize, meta: NodeMeta) {
        self.nodes[i].node.set_meta(meta);
        self.dispatch(i, &mut |_, _, _| {});
    }

    /// Runs until virtual time `until_ms`, calling `on_event(now_ms, node, event)` for every
    /// membership event of a live node.
    pub fn run_until(&mut self, until_ms: u64, mut on_event: impl FnMut(u64, usize, &Event)) {
        while let Some(&Reverse((at, _, slot))) = self.queue.peek() {
            if at > until_ms {
                break;
            }
            self.queue.pop();
            self.now_ms = at;
            let (to, delivery) = self.pending[slot].take().expect("queued slot is filled");
            self.free.push(slot);
            if self.nodes[to].crashed {
                continue;
            }
            let node = &mut self.nodes[to].node;
            match delivery {
                Delivery::Timer(t) => node.handle_timer(t),
                Delivery::Packet(body) => node.handle_packet(&body),
                Delivery::PushPullReply(body) => {
                    node.handle_stream(Kind::PushPullReply, &body);
                }
                Delivery::PushPull { from, body } => {
                    if let Some(reply) = node.handle_stream(Kind::PushPull, &body) {
                        self.stats.bytes += stream_bytes(reply.len());
                        let delay = self.delay();
                        self.schedule(delay, from, Delivery::PushPullReply(reply));
                    }
                }
            }
            self.dispatch(to, &mut on_event);
        }
        self.now_ms = self.now_ms.max(until_ms);
    }

    fn delay(&mut self) -> u64 {
        self.rng
            .random_range(self.cfg.min_delay_ms..=self.cfg.max_delay_ms)
    }

    fn schedule(&mut self, after_ms: u64, to: usize, d: Delivery) {
        let slot = match self.free.pop() {
            Some(s) => {
                self.pending[s] = Some((to, d));
                s
            }
            None => {
                self.pending.push(Some((to, d)));
                self.pending.len() - 1
            }
        };
        self.seq += 1;
        self.queue
            .push(Reverse((self.now_ms + after_ms, self.seq, slot)));
    }

    // Moves node `i`'s outputs into the network and reports its events.
    fn dispatch(&mut self, i: usize, on_event: &mut dyn FnMut(u64, usize, &Event)) {
        let outputs = self.nodes[i].node.take_outputs();
        for e in self.nodes[i].node.take_events() {
            on_event(self.now_ms, i, &e);
        }
        for out in outputs {
            match out {
                Output::Timer { after, timer } => {
                    // Round up so a timer never fires before it is due.
                    let ms = after.as_micros().div_ceil(1000) as u64;
                    self.schedule(ms, i, Delivery::Timer(timer));
                }
                Output::Packet { to, body } => {
                    self.stats.packets_sent += 1;
                    self.stats.bytes += (body.len() + HEADER_LEN + SEAL_OVERHEAD) as u64;
                    let Some(&dst) = self.by_addr.get(&to) else {
                        continue;
                    };
                    if self.rng.random_bool(self.cfg.loss) {
                        self.stats.packets_dropped += 1;
                        continue;
                    }
                    let delay = self.delay();
                    self.schedule(delay, dst, Delivery::Packet(body));
                }
                Output::PushPull { to, body } => {
                    self.stats.push_pulls += 1;
                    self.stats.bytes += stream_bytes(body.len());
                    let Some(&dst) = self.by_addr.get(&to) else {
                        continue;
                    };
                    let delay = self.delay();
                    self.schedule(delay, dst, Delivery::PushPull { from: i, body });
                }
            }
        }
    }
}

fn stream_bytes(body: usize) -> u64 {
    (4 + HEADER_LEN + SEAL_OVERHEAD + body) as u64
}
