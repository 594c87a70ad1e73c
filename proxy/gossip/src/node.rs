//! The sans-IO membership node: foca plus metadata and anti-entropy, with no sockets or clocks.
//!
//! A [`Node`] is driven by calls — a packet arrived, a timer fired, the operator changed the
//! metadata — each taking the current time in milliseconds. Every call may queue [`Output`]s
//! (datagrams, stream requests, timers to set), which the driver collects with
//! [`Node::take_outputs`], and [`Event`]s, collected with [`Node::take_events`]. The tokio
//! runtime and the virtual-time simulator are two drivers of this same code. Message bodies are
//! versioned and extensible ([`crate::message`]).
//!
//! # Ownership: a member's metadata comes from that member
//! Every member holds the same symmetric cluster key, so a signature-free rule has to rest on
//! where a record comes from, not on who claims to have written it. A node stores member X's
//! metadata record only from a reply on a stream it opened itself to X's gossip address: the
//! reply to a [`GetMeta`](crate::message) request, or X's own record in the reply to a
//! push-pull with X. Everything else about X — a broadcast relayed by others, a digest in a
//! third member's push-pull — is a *hint* ("X has generation g, version v"): it makes the node
//! fetch the record from X, and nothing else. So a key holder can announce services only in
//! its own record, and a forged hint costs at most one small request to the member it names.
//!
//! Bounds that keep forged or broken hints from pinning anything:
//! - a record is stored only for the generation foca currently knows for that address, so
//!   metadata never outruns membership (a higher generation must first win foca's own rules);
//! - a hint counts only for the generation of the record held, and may be at most
//!   [`MAX_VERSION_STEP`] versions ahead of it; no version may exceed [`MAX_VERSION`]:
//!   `u64::MAX` can never be reached, let alone pinned; the owner's own reply is authoritative
//!   (a fetched record older than the hint ends the hint);
//! - at most [`MAX_FETCHES_IN_FLIGHT`] fetches run at once, one per member, each retried after
//!   foca's probe timeout while the member is active and its record still missing or stale,
//!   and after a doubling back-off once a member's fetches keep timing out;
//! - records and hints of a member are dropped once foca forgets it (`remove_down_after`,
//!   `[cluster] forget_after`), so state is bounded by the membership.
//!
//! # Push-pull exchanges digests, not records
//! The periodic push-pull carries foca's members and a digest (address, generation, version,
//! left) per record, ~20 bytes instead of the ~300 of a record; each side then fetches what it
//! lacks from the owners. A node that knows no member yet (it is joining) applies the seed's
//! state without re-broadcasting it: the cluster already knows all of it.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::{Buf, BufMut};

use foca::{
    BroadcastHandler, Codec, Foca, Header, Identity, Invalidates, Member, Message as FocaMessage,
    Notification, PostcardCodec, State, Timer,
};
use rand_foca::rngs::SmallRng;
use rand_foca::{RngExt, SeedableRng};
use serde::{Deserialize, Serialize};

use super::message::{Broadcast, Digest, StreamMessage, EMULATE_NEXT_VERSION_ENV};
pub use super::message::{PushPullState, Record};
use super::wire::Kind;
use super::{
    push_pull_scale, retransmissions, suspicion_scale, MemberInfo, MemberState, NodeMeta, Tuning,
};

/// A hint may announce a version at most this far ahead of the record this node holds for
/// that member (or of 0 when it holds none).
pub const MAX_VERSION_STEP: u64 = 1 << 16;

/// No record or hint may carry a version above this (a member changing its metadata a
/// thousand times a second would need ~9 000 years to reach it).
pub const MAX_VERSION: u64 = 1 << 48;

/// Metadata fetches a node runs at once (a joining node fetches every member's record). Half
/// of the transport's default outbound streams ([`crate::DEFAULT_MAX_OUTBOUND_STREAMS`]), so
/// that a joining node's fetches leave room for its push-pulls and fallback probes.
pub const MAX_FETCHES_IN_FLIGHT: usize = crate::DEFAULT_MAX_OUTBOUND_STREAMS / 2;

/// A member whose fetches keep timing out (its gossip TCP port unreachable, say) is asked again
/// at once after the first timeout, then after 1, 2, 4... fetch timeouts, at most this many:
/// each unanswered fetch holds one of the transport's outbound streams until the transport's
/// own timeout, so retrying every fetch timeout would let a few unreachable members hold them all.
pub const MAX_FETCH_BACKOFF_TIMEOUTS: u32 = 64;

/// Highest local-health score (memberlist's default): a node that keeps failing its probes or
/// running late probes at most 9 times slower.
pub const MAX_LOCAL_HEALTH: u32 = 8;

/// An unconfirmed suspicion lasts this many times the base suspicion timeout (Lifeguard's α;
/// memberlist uses 6). Confirmations bring it down to the base timeout.
pub const SUSPICION_MAX_MULT: u32 = 4;

/// Independent confirmations (votes beyond the first suspector's) that bring a suspicion down
/// to the base timeout (memberlist: SuspicionMult − 2).
pub const SUSPICION_CONFIRMATIONS: u32 = 2;

// Voters remembered per suspicion: enough for any hold threshold an operator may set.
const MAX_VOTERS: usize = 16;

// Votes for a suspicion this node never started are forgotten after this many probe periods.
const VOTE_TTL_PROBES: u64 = 300;

// A stream request whose reply has not come is forgotten after this many probe periods (a late
// reply within them is still used).
const REQUEST_TTL_PROBES: u64 = 30;

/// foca identity: the gossip address plus a generation.
///
/// The generation starts at the wall-clock time in milliseconds, so a restarted node comes
/// back with a higher identity and wins foca's address conflict against its former self;
/// [`Identity::renew`] bumps it when foca finds itself declared down, so the node rejoins on
/// its own.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct NodeId {
    /// Gossip address (UDP and TCP).
    pub addr: SocketAddr,
    /// Restart / rejoin counter; higher wins.
    pub generation: u64,
}

impl Identity for NodeId {
    type Addr = SocketAddr;

    fn renew(&self) -> Option<Self> {
        // At the largest generation there is no higher one to rejoin with.
        Some(NodeId {
            addr: self.addr,
            generation: self.generation.checked_add(1)?,
        })
    }

    fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn win_addr_conflict(&self, adversary: &Self) -> bool {
        self.generation > adversary.generation
    }
}

/// A timer the driver must hand back to [`Node::handle_timer`] after the requested delay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NodeTimer {
    /// One of foca's own timers (probes, suspicion, periodic gossip...).
    Foca(Timer<NodeId>),
    /// Time for a push-pull state exchange with a random member.
    PushPull,
    /// The stream request with this id got no reply in time: free its slot and retry.
    FetchTimeout(u64),
    /// The back-off after fetches of this member timed out has passed: fetch again if needed.
    FetchRetry(SocketAddr),
    /// A step of a Lifeguard suspicion: the deadline that applies once `step` independent
    /// confirmations have been heard has passed.
    Suspicion {
        /// The suspected member.
        target: SuspicionKey,
        /// Confirmations needed for this deadline.
        step: u32,
    },
}

/// A suspicion: the member's address, generation and the incarnation it was suspected at.
pub type SuspicionKey = (SocketAddr, u64, u16);

/// Something the driver must do for the node.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send a foca packet (wrap as [`Kind::Foca`]; it fits a datagram once sealed).
    Packet {
        /// Destination gossip address.
        to: SocketAddr,
        /// foca's bytes.
        body: Vec<u8>,
    },
    /// Open a stream to `to`, send `body` as [`Kind::PushPull`], and feed the reply (a
    /// [`Kind::PushPullReply`]) to [`Node::handle_stream_reply`] with `to` and `id`: the
    /// transport, not the replier, says who answered which request. The body is a push-pull
    /// state or a metadata request ([`crate::message`]).
    PushPull {
        /// Destination gossip address.
        to: SocketAddr,
        /// The request's id (random; 0 when no reply is awaited).
        id: u64,
        /// The request.
        body: Vec<u8>,
    },
    /// Our direct ping of `to` got no ack within the probe timeout (Lifeguard's TCP fallback
    /// probe, as memberlist does it): open a stream to `to`, send `body` — the same foca ping —
    /// as a [`Kind::Probe`], and feed the reply (a [`Kind::ProbeAck`] holding foca's ack) to
    /// [`Node::handle_packet`] as if it had come by datagram. Give up after `within`: the probe
    /// cycle is over by then and foca would ignore the ack. So datagram loss alone, which the
    /// indirect probes share when it is the target's link that drops, does not make a member
    /// suspect while its TCP still answers.
    ProbeStream {
        /// The probed member's gossip address.
        to: SocketAddr,
        /// foca's ping.
        body: Vec<u8>,
        /// How long the answer is still useful.
        within: Duration,
    },
    /// Call [`Node::handle_timer`] with `timer` after `after`.
    Timer {
        /// Delay.
        after: Duration,
        /// What to hand back.
        timer: NodeTimer,
    },
}

/// A membership happening, for drivers that react to changes (and for the simulator's counts).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// foca learned a new active member.
    MemberUp(SocketAddr),
    /// foca declared a previously active member down (or it left).
    MemberDown(SocketAddr),
    /// Newer metadata for this member was stored.
    Meta(SocketAddr),
    /// We are known by at least one member.
    Active,
    /// We know no active member any more: seeds should be retried.
    Idle,
    /// We were declared down and rejoined with a new generation.
    Rejoined,
    /// Our own probe of this member failed (directly and indirectly): we suspect it, vote,
    /// and run a suspicion timer.
    Suspected(SocketAddr),
}

/// "My probe of `target` failed": the independent confirmation Lifeguard's suspicion counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SuspectVote {
    /// The suspected member.
    pub target: SocketAddr,
    /// Its generation.
    pub generation: u64,
    /// The incarnation it was suspected at (a refutation raises it and voids the votes).
    pub incarnation: u16,
    /// Who failed to reach it.
    pub voter: SocketAddr,
}

impl SuspectVote {
    fn key(&self) -> SuspicionKey {
        (self.target, self.generation, self.incarnation)
    }
}

struct MetaRecord {
    generation: u64,
    version: u64,
    left: bool,
    meta: NodeMeta,
}

impl MetaRecord {
    fn order(&self) -> (u64, u64) {
        (self.generation, self.version)
    }
}

/// Why a record or hint was refused (counted in [`NodeErrors::refused`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Refusal {
    // A version above MAX_VERSION, or a hint more than MAX_VERSION_STEP ahead.
    VersionJump,
}

// Shared between the node and the broadcast handler that foca owns (foca offers no way back
// to its handler). Only ever locked from the thread driving the node, so it is never contended.
#[derive(Default)]
struct MetaStore {
    self_addr: Option<SocketAddr>,
    records: HashMap<SocketAddr, MetaRecord>,
    // The newest (generation, version) heard of per member, when newer than its record.
    hints: HashMap<SocketAddr, (u64, u64)>,
    // The generation foca reported for each member when it came up or restarted (Rename):
    // hints about it count before its record is fetched.
    current: HashMap<SocketAddr, u64>,
    // "This member left" (generation, version) heard from others: a hint, so it never changes
    // the record; see MetaStore::hint.
    left_notes: HashMap<SocketAddr, (u64, u64)>,
    // Addresses whose record changed since the node last looked.
    changed: Vec<SocketAddr>,
    // Addresses with a new hint: the node checks them against foca and fetches.
    hinted: Vec<SocketAddr>,
    // Who voted for each suspicion, and the probe tick it was first heard of.
    votes: HashMap<SuspicionKey, (Vec<SocketAddr>, u64)>,
    // Suspicions that got a new voter since the node last looked.
    voted: Vec<SuspicionKey>,
    // The node's probe counter, for vote expiry.
    tick: u64,
    refused: u64,
    skipped: u64,
}

impl MetaStore {
    fn record_order(&self, addr: &SocketAddr) -> (u64, u64) {
        self.records.get(addr).map_or((0, 0), MetaRecord::order)
    }

    /// Notes a hint; returns whether it was news (and so should be relayed).
    ///
    /// Only hints about the generation of the record held, or the one foca last reported the
    /// member up or restarted under, count: a hint naming any other generation (a made-up one
    /// above all) changes nothing and cannot block the real hints that follow. So a restarted
    /// member's changes are heard before its new record is fetched.
    fn hint(&mut self, d: Digest) -> bool {
        let held = self
            .records
            .get(&d.addr)
            .is_some_and(|r| r.generation == d.generation);
        if Some(d.addr) == self.self_addr
            || !(held || self.current.get(&d.addr) == Some(&d.generation))
        {
            return false;
        }
        if let Err(Refusal::VersionJump) = self.check_hint(&d) {
            self.refused += 1;
            return false;
        }
        let mut news = false;
        if d.left {
            // A graceful leave: the owner is gone, so there is nothing to fetch. Noted beside
            // its record, never in it: the note only tells Left from Down while foca has that
            // generation down, and the owner's next record ends it.
            let held = self.records.get(&d.addr).is_some_and(|r| r.left);
            let known = self.left_notes.get(&d.addr).copied();
            if !held && known.is_none_or(|k| d.order() > k) {
                self.left_notes.insert(d.addr, d.order());
                self.changed.push(d.addr);
                news = known.is_none();
            }
            return news;
        }
        let known = self
            .record_order(&d.addr)
            .max(self.hints.get(&d.addr).copied().unwrap_or((0, 0)));
        if d.order() > known {
            self.hints.insert(d.addr, d.order());
            self.hinted.push(d.addr);
            news = true;
        }
        news
    }

    fn check_hint(&self, d: &Digest) -> Result<(), Refusal> {
        let base = self.records.get(&d.addr).map_or(0, |r| r.version);
        if d.version > MAX_VERSION || d.version > base.saturating_add(MAX_VERSION_STEP) {
            return Err(Refusal::VersionJump);
        }
        Ok(())
    }

    /// Drops the hint about `addr` if it is no newer than `upto` (the owner has answered for it).
    fn settle_hint(&mut self, addr: &SocketAddr, upto: (u64, u64)) {
        if self.hints.get(addr).is_some_and(|h| *h <= upto) {
            self.hints.remove(addr);
        }
    }

    /// Takes `records` from `from`'s reply to a request sent about the hint `asked`: only
    /// `from`'s own record, of the `generation` foca knows for it. That record replaces one of
    /// any other generation, a higher one too (a member restarted with its clock stepped back is
    /// not locked out by its old record). The hint asked about is settled whatever the answer (a
    /// made-up version is not asked about again); a newer one stays.
    fn take_owner_reply(
        &mut self,
        from: SocketAddr,
        generation: Option<u64>,
        records: Vec<Record>,
        asked: (u64, u64),
    ) {
        for r in records {
            if r.addr != from || Some(r.generation) != generation {
                // Not the owner's own record, or of a generation foca does not know.
                self.refused += 1;
                continue;
            }
            if self
                .records
                .get(&from)
                .is_some_and(|h| h.generation != r.generation)
            {
                self.records.remove(&from);
            }
            self.accept_from_owner(r);
        }
        self.settle_hint(&from, asked);
    }

    /// Stores a record received from its owner, if it is newer; the owner's word ends any
    /// hint about it. Returns whether it was stored.
    fn accept_from_owner(&mut self, r: Record) -> bool {
        if Some(r.addr) == self.self_addr {
            return false;
        }
        // Like a hint, an owner's record may not jump more than MAX_VERSION_STEP ahead of the
        // one held: a version is never pinned out of the owner's own reach.
        let base = self.records.get(&r.addr).map_or(0, |h| h.version);
        if r.version > MAX_VERSION || r.version > base.saturating_add(MAX_VERSION_STEP) {
            self.refused += 1;
            return false;
        }
        // A hint newer than this record (heard while it was on its way) stays, to be fetched.
        self.settle_hint(&r.addr, r.order());
        self.left_notes.remove(&r.addr);
        if r.order() <= self.record_order(&r.addr) && self.records.contains_key(&r.addr) {
            return false;
        }
        self.changed.push(r.addr);
        self.records.insert(
            r.addr,
            MetaRecord {
                generation: r.generation,
                version: r.version,
                left: r.left,
                meta: r.meta,
            },
        );
        true
    }

    /// Whether `addr` at `generation` left: its own record says so, or (to be used only while
    /// foca has that generation down) another member said so.
    fn left(&self, addr: &SocketAddr, generation: u64) -> bool {
        self.records
            .get(addr)
            .is_some_and(|r| r.left && r.generation >= generation)
            || self
                .left_notes
                .get(addr)
                .is_some_and(|&(g, _)| g == generation)
    }

    /// Whether the record of `addr` at `generation` is missing or older than a hint.
    fn wants(&self, addr: &SocketAddr, generation: u64) -> bool {
        match self.records.get(addr) {
            None => true,
            Some(r) if r.generation < generation => true,
            Some(r) => self
                .hints
                .get(addr)
                .is_some_and(|h| *h > r.order() && h.0 == generation),
        }
    }

    /// Records a vote; returns whether it was new.
    fn vote(&mut self, v: SuspectVote) -> bool {
        let tick = self.tick;
        let (voters, _) = self
            .votes
            .entry(v.key())
            .or_insert_with(|| (Vec::new(), tick));
        if voters.contains(&v.voter) || voters.len() >= MAX_VOTERS {
            return false;
        }
        voters.push(v.voter);
        self.voted.push(v.key());
        true
    }

    /// Distinct members that voted for this suspicion.
    fn voters(&self, key: &SuspicionKey) -> u32 {
        self.votes.get(key).map_or(0, |(v, _)| v.len() as u32)
    }
}

/// Key of a custom broadcast in foca's dissemination queue.
#[derive(Debug)]
enum BroadcastKey {
    Meta { addr: SocketAddr, order: (u64, u64) },
    Vote(SuspectVote),
    // What a node emulating the next version sends (a newer one replaces an older one).
    NextVersion,
}

impl Invalidates for BroadcastKey {
    // A newer hint about the same member replaces an older one still queued; votes replace
    // nothing but themselves.
    fn invalidates(&self, other: &Self) -> bool {
        match (self, other) {
            (
                BroadcastKey::Meta { addr, order },
                BroadcastKey::Meta {
                    addr: a2,
                    order: o2,
                },
            ) => addr == a2 && order >= o2,
            (BroadcastKey::Vote(a), BroadcastKey::Vote(b)) => a == b,
            (BroadcastKey::NextVersion, BroadcastKey::NextVersion) => true,
            _ => false,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("undecodable custom broadcast")]
struct BroadcastDecodeError;

struct MetaHandler {
    store: Arc<Mutex<MetaStore>>,
}

impl BroadcastHandler<NodeId> for MetaHandler {
    type Key = BroadcastKey;
    type Error = BroadcastDecodeError;

    fn receive_item(
        &mut self,
        data: &[u8],
        sender: Option<&NodeId>,
    ) -> Result<Option<BroadcastKey>, BroadcastDecodeError> {
        match Broadcast::decode(data).ok_or(BroadcastDecodeError)? {
            Broadcast::Hint(d) => {
                let key = BroadcastKey::Meta {
                    addr: d.addr,
                    order: d.order(),
                };
                if sender.is_none() {
                    // Our own hint (added by `Node::publish_meta`).
                    return Ok(Some(key));
                }
                Ok(lock(&self.store).hint(d).then_some(key))
            }
            Broadcast::Vote(v) => {
                if sender.is_none() {
                    // Our own vote (added by `Node::vote`, which already stored it).
                    return Ok(Some(BroadcastKey::Vote(v)));
                }
                Ok(lock(&self.store).vote(v).then_some(BroadcastKey::Vote(v)))
            }
            Broadcast::Unknown if sender.is_none() => {
                // Our own, as a node emulating the next version sends it.
                Ok(Some(BroadcastKey::NextVersion))
            }
            Broadcast::Unknown => {
                // A kind of a newer version: neither applied nor relayed (this version cannot
                // tell which copy is newer).
                lock(&self.store).skipped += 1;
                Ok(None)
            }
        }
    }
}

fn lock(store: &Mutex<MetaStore>) -> MutexGuard<'_, MetaStore> {
    // A panic while holding this lock would already have torn down the node's driver; the
    // data itself stays consistent (every mutation is a single insert), so keep going.
    store.lock().unwrap_or_else(|e| e.into_inner())
}

// foca's side effects, collected during one call.
struct Outbox {
    outputs: Vec<Output>,
    events: Vec<Event>,
    // Lifeguard: probe timers are stretched by this (1 + local-health score)...
    probe_multiplier: u32,
    // ...and suspicion timers are taken over by the node: (timer, foca's timeout).
    suspicions: Vec<(Timer<NodeId>, Duration)>,
    // Members whose probe by us failed during this call.
    probe_failed: Vec<NodeId>,
    // Members that came back under a new generation (restarted) during this call.
    renamed: Vec<SocketAddr>,
}

impl Default for Outbox {
    fn default() -> Self {
        Outbox {
            outputs: Vec::new(),
            events: Vec::new(),
            probe_multiplier: 1,
            suspicions: Vec::new(),
            probe_failed: Vec::new(),
            renamed: Vec::new(),
        }
    }
}

impl foca::Runtime<NodeId> for Outbox {
    fn notify(&mut self, notification: Notification<'_, NodeId>) {
        let event = match notification {
            Notification::MemberUp(id) => Event::MemberUp(id.addr),
            Notification::MemberDown(id) => Event::MemberDown(id.addr),
            // Same address, new generation: a restart; the view refresh picks up the new id.
            Notification::Rename(_, id) => {
                self.renamed.push(id.addr);
                Event::Meta(id.addr)
            }
            Notification::Active => Event::Active,
            Notification::Idle | Notification::Defunct => Event::Idle,
            Notification::Rejoin(_) => Event::Rejoined,
            Notification::ProbeFailed(_, id) => {
                self.probe_failed.push(id.clone());
                return;
            }
            Notification::DataReceived(_) | Notification::DataSent(_) => return,
        };
        self.events.push(event);
    }

    fn send_to(&mut self, to: NodeId, data: &[u8]) {
        self.outputs.push(Output::Packet {
            to: to.addr,
            body: data.to_vec(),
        });
    }

    fn submit_after(&mut self, event: Timer<NodeId>, after: Duration) {
        let after = match event {
            Timer::ChangeSuspectToDown { .. } => {
                self.suspicions.push((event, after));
                return;
            }
            Timer::ProbeRandomMember(_) | Timer::SendIndirectProbe { .. } => {
                after * self.probe_multiplier
            }
            _ => after,
        };
        self.outputs.push(Output::Timer {
            after,
            timer: NodeTimer::Foca(event),
        });
    }
}

// A suspicion this node runs (its own probe failed): foca's timer, held back until the
// deadline for the confirmations heard so far has passed.
struct Suspicion {
    timer: Timer<NodeId>,
    // Confirmations that lead to the base timeout for this suspicion (0 in tiny clusters).
    wanted: u32,
    // The lowest step whose deadline has passed.
    passed: Option<u32>,
}

struct ViewEntry {
    generation: u64,
    incarnation: u16,
    state: MemberState,
    meta_version: u64,
    has_meta: bool,
    last_change_ms: u64,
    suspectors: u32,
    // Refresh pass in which foca last listed this member; older entries were forgotten by foca.
    seen: u64,
}

/// Counters of what the node rejected after decryption.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct NodeErrors {
    /// foca packets it refused (malformed, from ourselves, too big...).
    pub foca: u64,
    /// Stream messages (push-pull states, metadata requests and replies) that did not decode.
    pub state: u64,
    /// Records and hints refused by the ownership bounds (a version too far ahead, a record
    /// for another generation than foca's, a record not from its owner).
    pub refused: u64,
    /// Messages of a kind this version does not know (from a newer version), skipped.
    pub skipped: u64,
}

/// A stream request this node sent and still expects an answer to.
#[derive(Debug)]
struct Request {
    /// Where it went.
    to: SocketAddr,
    /// The probe tick it was sent at.
    sent_tick: u64,
    /// Its fetch slot was already given back (its timeout came, or it is a push-pull, which
    /// takes none).
    freed: bool,
    /// The hint held about `to` when it was sent: the owner's answer settles it (and any older
    /// one), not a newer one heard meanwhile.
    hint: Option<(u64, u64)>,
}

/// The membership state machine of one member. See the module docs.
pub struct Node {
    foca: Foca<NodeId, CheckedCodec, SmallRng, MetaHandler>,
    outbox: Outbox,
    // Member identities refused for a generation too far ahead (see generation_allowed),
    // counted by the codec foca owns and by push-pull merges.
    generations_refused: Arc<AtomicU64>,
    store: Arc<Mutex<MetaStore>>,
    meta: NodeMeta,
    version: u64,
    left: bool,
    connected: bool,
    push_pull_every: Duration,
    // Metadata fetches: stream requests in flight by id, members queued for a fetch, members
    // being fetched.
    requests: HashMap<u64, Request>,
    fetch_queue: VecDeque<SocketAddr>,
    fetching: HashSet<SocketAddr>,
    in_flight: usize,
    fetch_timeout: Duration,
    // Members whose fetches timed out in a row (the generation, and how many times), and those
    // waiting out the back-off that follows (the generation it is for; see
    // [`MAX_FETCH_BACKOFF_TIMEOUTS`]). A new identity at the address starts afresh: what its
    // former self did not answer says nothing about it.
    fetch_failures: HashMap<SocketAddr, (u64, u32)>,
    backing_off: HashMap<SocketAddr, u64>,
    // Behave as the next body version (tests of a mixed-version cluster only).
    next_version: bool,
    rng: SmallRng,
    view: HashMap<SocketAddr, ViewEntry>,
    refresh_pass: u64,
    self_seen: (u64, u64, bool),
    self_change_ms: u64,
    errors: NodeErrors,
    // Self-tuning: the config foca runs with, the size it was computed for, and the units the
    // size-dependent values scale from.
    config: foca::Config,
    size_hint: u32,
    suspicion_unit: Duration,
    push_pull_unit: Duration,
    tuning: Tuning,
    tuning_changed: bool,
    // Lifeguard.
    health: u32,
    probe_tick: u64,
    // Probe tick of the last lateness or overload report (at most one point per period;
    // u64::MAX before the first).
    late_tick: u64,
    suspicions: HashMap<SuspicionKey, Suspicion>,
    // The direct ping of the current probe cycle, for the TCP fallback.
    probe: Option<DirectProbe>,
}

// The ping foca sent at the start of a probe cycle, and whether its ack has come back.
struct DirectProbe {
    target: NodeId,
    number: foca::ProbeNumber,
    ping: Vec<u8>,
    acked: bool,
}

/// How far ahead of this node's wall clock a member's generation may be, in ms. Generations
/// are wall-clock milliseconds at start (`persist::next_generation`: the clock, or one more
/// than the last persisted generation, whichever is higher), plus one per rejoin. Members'
/// clocks must already agree within 120 s (the transport refuses messages sent further from
/// its clock); the 10 s beyond that are for rejoins. A higher generation would win every
/// address conflict (`NodeId::win_addr_conflict`): a key holder gossiping a member under
/// `u64::MAX` would rename it everywhere and lock it out until forgotten.
pub const MAX_GENERATION_AHEAD_MS: u64 = 130_000;

/// Whether a member identity's generation is believable now: at most
/// [`MAX_GENERATION_AHEAD_MS`] ahead of this node's wall clock.
pub fn generation_allowed(generation: u64) -> bool {
    generation <= crate::clock::wall_ms().saturating_add(MAX_GENERATION_AHEAD_MS)
}

/// foca's codec, refusing identities whose generation is not believable
/// ([`generation_allowed`]): a packet naming one is dropped before foca sees any of it.
pub struct CheckedCodec {
    refused: Arc<AtomicU64>,
}

impl CheckedCodec {
    fn check(&self, ids: &[&NodeId]) -> Result<(), postcard::Error> {
        if ids.iter().all(|id| generation_allowed(id.generation)) {
            Ok(())
        } else {
            self.refused.fetch_add(1, Ordering::Relaxed);
            Err(postcard::Error::DeserializeBadEncoding)
        }
    }
}

impl Codec<NodeId> for CheckedCodec {
    type Error = postcard::Error;

    fn encode_header(
        &mut self,
        header: &Header<NodeId>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        PostcardCodec.encode_header(header, buf)
    }

    fn decode_header(&mut self, buf: impl Buf) -> Result<Header<NodeId>, Self::Error> {
        let header = PostcardCodec.decode_header(buf)?;
        let named = match &header.message {
            FocaMessage::PingReq { target: id, .. }
            | FocaMessage::IndirectPing { origin: id, .. }
            | FocaMessage::IndirectAck { target: id, .. }
            | FocaMessage::ForwardedAck { origin: id, .. } => Some(id),
            _ => None,
        };
        let mut ids = vec![&header.src, &header.dst];
        ids.extend(named);
        self.check(&ids)?;
        Ok(header)
    }

    fn encode_member(
        &mut self,
        member: &Member<NodeId>,
        buf: impl BufMut,
    ) -> Result<(), Self::Error> {
        PostcardCodec.encode_member(member, buf)
    }

    fn decode_member(&mut self, buf: impl Buf) -> Result<Member<NodeId>, Self::Error> {
        let member = PostcardCodec.decode_member(buf)?;
        self.check(&[member.id()])?;
        Ok(member)
    }
}

// The header of a foca packet (its updates and broadcasts are left unread).
fn foca_header(body: &[u8]) -> Option<Header<NodeId>> {
    PostcardCodec.decode_header(body).ok()
}

impl std::fmt::Debug for Node {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Node")
            .field("id", self.foca.identity())
            .field("name", &self.meta.name)
            .finish()
    }
}

impl Node {
    /// A node with identity `id` that has not joined anything yet. `seed` seeds its randomness
    /// (member selection); give each node a different one. `config` and `push_pull_every` are
    /// those of `expected_size` ([`crate::profile_settings`]); once the node has joined, the
    /// size-dependent values follow the live member count.
    pub fn new(
        id: NodeId,
        meta: NodeMeta,
        config: foca::Config,
        push_pull_every: Duration,
        expected_size: u32,
        seed: u64,
        now_ms: u64,
    ) -> Node {
        let store = Arc::new(Mutex::new(MetaStore {
            self_addr: Some(id.addr),
            ..MetaStore::default()
        }));
        let handler = MetaHandler {
            store: store.clone(),
        };
        let generations_refused = Arc::new(AtomicU64::new(0));
        // A metadata fetch is one small round trip: retry after foca's probe timeout (500 ms
        // on a LAN), not a whole stream timeout; a late reply is still taken.
        let fetch_timeout = config.probe_rtt;
        let size_hint = expected_size.max(1);
        let suspicion_unit = config
            .suspect_to_down_after
            .div_f64(suspicion_scale(size_hint));
        let push_pull_unit = push_pull_every / push_pull_scale(size_hint);
        let foca = Foca::with_custom_broadcast(
            id,
            config.clone(),
            SmallRng::seed_from_u64(seed),
            CheckedCodec {
                refused: generations_refused.clone(),
            },
            handler,
        );
        let mut node = Node {
            foca,
            outbox: Outbox::default(),
            generations_refused,
            store,
            meta,
            version: 1,
            left: false,
            connected: false,
            push_pull_every,
            requests: HashMap::new(),
            fetch_queue: VecDeque::new(),
            fetching: HashSet::new(),
            in_flight: 0,
            fetch_timeout,
            fetch_failures: HashMap::new(),
            backing_off: HashMap::new(),
            next_version: std::env::var_os(EMULATE_NEXT_VERSION_ENV).is_some(),
            rng: SmallRng::seed_from_u64(seed ^ 0x9e37_79b9_7f4a_7c15),
            view: HashMap::new(),
            refresh_pass: 0,
            self_seen: (0, 0, false),
            self_change_ms: now_ms,
            errors: NodeErrors::default(),
            tuning: Tuning {
                members: size_hint,
                probe_interval: config.probe_period,
                suspicion_timeout: config.suspect_to_down_after,
                suspicion_max_timeout: config.suspect_to_down_after * SUSPICION_MAX_MULT,
                confirmations: SUSPICION_CONFIRMATIONS,
                retransmissions: config.max_transmissions.get(),
                push_pull_interval: push_pull_every,
                local_health: 0,
            },
            config,
            size_hint,
            suspicion_unit,
            push_pull_unit,
            tuning_changed: true,
            health: 0,
            probe_tick: 0,
            late_tick: u64::MAX,
            suspicions: HashMap::new(),
            probe: None,
        };
        if node.next_version {
            tracing::warn!(
                "{EMULATE_NEXT_VERSION_ENV} is set: this node emulates the next gossip body version (tests only)"
            );
        }
        node.publish_meta();
        // A random first delay spreads the cluster's exchanges over the interval.
        let first = node
            .push_pull_every
            .mul_f64(node.rng.random_range(0.5..1.5));
        node.outbox.outputs.push(Output::Timer {
            after: first,
            timer: NodeTimer::PushPull,
        });
        node
    }

    /// Our current identity (the generation changes on an automatic rejoin).
    pub fn id(&self) -> &NodeId {
        self.foca.identity()
    }

    /// Our metadata.
    pub fn meta(&self) -> &NodeMeta {
        &self.meta
    }

    /// Whether some active member knows us (false before joining and after losing every peer).
    pub fn is_connected(&self) -> bool {
        self.connected
    }

    /// Whether [`Node::leave`] was called.
    pub fn has_left(&self) -> bool {
        self.left
    }

    /// What the node refused so far.
    pub fn errors(&self) -> NodeErrors {
        let store = lock(&self.store);
        NodeErrors {
            refused: store.refused + self.generations_refused.load(Ordering::Relaxed),
            skipped: store.skipped,
            ..self.errors
        }
    }

    /// Number of active members foca knows (ourselves excluded).
    pub fn num_active(&self) -> usize {
        self.foca.num_members()
    }

    /// The timings in use now (see [`Tuning`]).
    pub fn tuning(&self) -> Tuning {
        self.tuning
    }

    /// The timings, if they changed since the last call (for drivers that publish them).
    pub fn take_tuning_change(&mut self) -> Option<Tuning> {
        std::mem::take(&mut self.tuning_changed).then_some(self.tuning)
    }

    /// Suspicions this node is running now (its own probe failed and the member is not down
    /// yet).
    pub fn open_suspicions(&self) -> usize {
        self.suspicions.len()
    }

    /// Tells the node one of its timers fired `late` after it was due (the driver or the
    /// machine was busy). Lifeguard: lateness beyond half a probe timeout raises the
    /// local-health score, at most once per probe period.
    pub fn timer_lateness(&mut self, late: Duration) {
        if late >= self.config.probe_rtt / 2 {
            self.note_unwell();
        }
    }

    /// Tells the node that inbound packets were dropped because it did not keep up. Raises the
    /// local-health score, at most once per probe period.
    pub fn inbound_dropped(&mut self) {
        self.note_unwell();
    }

    fn note_unwell(&mut self) {
        if self.late_tick != self.probe_tick {
            self.late_tick = self.probe_tick;
            self.set_health(self.health + 1);
        }
    }

    fn set_health(&mut self, score: u32) {
        let score = score.min(MAX_LOCAL_HEALTH);
        if score != self.health {
            self.health = score;
            self.outbox.probe_multiplier = 1 + score;
            self.tuning.local_health = score;
            self.tuning.probe_interval = self.config.probe_period * (1 + score);
            self.tuning_changed = true;
        }
    }

    // Self-tuning: recomputes the size-dependent settings from the live member count.
    fn retune(&mut self) {
        let n = if self.connected {
            self.foca.num_members() as u32 + 1
        } else {
            self.size_hint
        };
        if n == self.tuning.members {
            return;
        }
        let mut cfg = self.config.clone();
        cfg.max_transmissions = retransmissions(n);
        cfg.suspect_to_down_after = self.suspicion_unit.mul_f64(suspicion_scale(n));
        if self.foca.set_config(cfg.clone()).is_err() {
            // Only probe timings and enabling periodic tasks are refused; we change neither.
            self.errors.foca += 1;
            return;
        }
        self.config = cfg;
        self.push_pull_every = self.push_pull_unit * push_pull_scale(n);
        self.tuning.members = n;
        self.tuning.suspicion_timeout = self.config.suspect_to_down_after;
        self.tuning.suspicion_max_timeout = self.config.suspect_to_down_after * SUSPICION_MAX_MULT;
        self.tuning.retransmissions = self.config.max_transmissions.get();
        self.tuning.push_pull_interval = self.push_pull_every;
        self.tuning_changed = true;
    }

    // Our probe of `id` failed: vote, so that others' suspicions of it count us.
    fn vote(&mut self, id: &NodeId) {
        let Some(m) = self
            .foca
            .iter_membership_state()
            .find(|m| m.id() == id && m.state() == State::Suspect)
        else {
            return; // refuted or down meanwhile: nothing to confirm
        };
        let v = SuspectVote {
            target: id.addr,
            generation: id.generation,
            incarnation: m.incarnation(),
            voter: self.id().addr,
        };
        if lock(&self.store).vote(v)
            && self
                .foca
                .add_broadcast(&Broadcast::Vote(v).encode(self.next_version))
                .is_err()
        {
            self.errors.foca += 1;
        }
    }

    // foca asked for its suspect-to-down timer: run it Lifeguard's way instead. The deadline
    // starts at SUSPICION_MAX_MULT times foca's timeout and falls, logarithmically, to foca's
    // timeout as independent confirmations arrive; one timer per step checks it.
    fn start_suspicion(&mut self, timer: Timer<NodeId>, base: Duration) {
        let Timer::ChangeSuspectToDown {
            member_id,
            incarnation,
            ..
        } = &timer
        else {
            return;
        };
        let key = (member_id.addr, member_id.generation, *incarnation);
        if self.suspicions.contains_key(&key) {
            // foca asks again when our next probe of a member we already suspect fails too:
            // the suspicion we run already started, and our vote is already counted.
            return;
        }
        self.outbox.events.push(Event::Suspected(member_id.addr));
        // memberlist: with fewer members than confirmations + 2, confirmations cannot come.
        let members = self.foca.num_members() as u32 + 1;
        let wanted = if members < SUSPICION_CONFIRMATIONS + 2 {
            0
        } else {
            SUSPICION_CONFIRMATIONS
        };
        let max = if wanted == 0 {
            base
        } else {
            base * SUSPICION_MAX_MULT
        };
        for step in 0..=wanted {
            let frac = if wanted == 0 {
                1.0
            } else {
                f64::from(step + 1).ln() / f64::from(wanted + 1).ln()
            };
            let after = max.saturating_sub((max - base).mul_f64(frac)).max(base);
            self.outbox.outputs.push(Output::Timer {
                after,
                timer: NodeTimer::Suspicion { target: key, step },
            });
        }
        self.suspicions.insert(
            key,
            Suspicion {
                timer,
                wanted,
                passed: None,
            },
        );
    }

    // Declares the member down if the deadline for the confirmations heard so far has passed.
    fn check_suspicion(&mut self, key: SuspicionKey) {
        let Some(s) = self.suspicions.get(&key) else {
            return;
        };
        let Some(passed) = s.passed else { return };
        let confirmations = lock(&self.store)
            .voters(&key)
            .saturating_sub(1)
            .min(s.wanted);
        if confirmations < passed {
            return;
        }
        let s = self.suspicions.remove(&key).expect("present");
        lock(&self.store).votes.remove(&key);
        if self.foca.handle_timer(s.timer, &mut self.outbox).is_err() {
            self.errors.foca += 1;
        }
    }

    // Forgets votes for suspicions this node does not run, once they are old.
    fn expire_votes(&mut self) {
        let tick = self.probe_tick;
        let mut store = lock(&self.store);
        store.tick = tick;
        if tick.is_multiple_of(16) {
            let running = &self.suspicions;
            store
                .votes
                .retain(|k, (_, born)| running.contains_key(k) || *born + VOTE_TTL_PROBES > tick);
        }
    }

    /// Asks `seeds` to let us in: a SWIM announce to each and a push-pull with one of them,
    /// which brings us the members and the digests of their metadata (fetched from each member
    /// next) and makes the seed fetch ours.
    pub fn join(&mut self, seeds: &[SocketAddr]) {
        let own = self.id().addr;
        let seeds: Vec<SocketAddr> = seeds.iter().copied().filter(|s| *s != own).collect();
        for seed in &seeds {
            // Generation 0: foca accepts an announce addressed to any generation of its address.
            if self
                .foca
                .announce(
                    NodeId {
                        addr: *seed,
                        generation: 0,
                    },
                    &mut self.outbox,
                )
                .is_err()
            {
                self.errors.foca += 1;
            }
        }
        if !seeds.is_empty() {
            let to = seeds[self.rng.random_range(0..seeds.len())];
            self.push_pull(to);
        }
        self.after_call();
    }

    /// Feeds a decrypted foca packet.
    pub fn handle_packet(&mut self, body: &[u8]) {
        if self.left {
            // A node that left is silent. Were it to listen, it would hear of its own death
            // and foca would rejoin it under a renewed identity.
            return;
        }
        self.note_ack(body);
        if self.foca.handle_data(body, &mut self.outbox).is_err() {
            self.errors.foca += 1;
        }
        self.after_call();
    }

    // Whether `body` answers the direct ping of the current probe cycle (then no fallback is
    // needed). Only packets arriving while that ping is unanswered are looked at.
    fn note_ack(&mut self, body: &[u8]) {
        let Some(p) = self.probe.as_mut().filter(|p| !p.acked) else {
            return;
        };
        if let Some(h) = foca_header(body) {
            p.acked = h.src == p.target && h.message == FocaMessage::Ack(p.number);
        }
    }

    // After foca started a probe cycle (between `from` and the end of the outputs): remember
    // the ping it sent, for the fallback.
    fn remember_ping(&mut self, from: usize) {
        self.probe = None;
        let outputs = &self.outbox.outputs[from..];
        let Some(target) = outputs.iter().find_map(|o| match o {
            Output::Timer {
                timer: NodeTimer::Foca(Timer::SendIndirectProbe { probed_id, .. }),
                ..
            } => Some(probed_id.clone()),
            _ => None,
        }) else {
            return;
        };
        self.probe = outputs.iter().find_map(|o| match o {
            Output::Packet { to, body } if *to == target.addr => match foca_header(body) {
                Some(Header {
                    message: FocaMessage::Ping(number),
                    ..
                }) => Some(DirectProbe {
                    target: target.clone(),
                    number,
                    ping: body.clone(),
                    acked: false,
                }),
                _ => None,
            },
            _ => None,
        });
    }

    // foca moved the probe of `target` to its indirect stage: unless the ping was answered,
    // also send it over a stream.
    fn fallback_probe(&mut self, target: &NodeId) {
        let Some(p) = self
            .probe
            .as_ref()
            .filter(|p| !p.acked && p.target == *target)
        else {
            return;
        };
        if !self.foca.iter_members().any(|m| m.id() == target) {
            return;
        }
        let m = self.outbox.probe_multiplier;
        let within = (self.config.probe_period * m).saturating_sub(self.config.probe_rtt * m);
        self.outbox.outputs.push(Output::ProbeStream {
            to: target.addr,
            body: p.ping.clone(),
            within,
        });
    }

    // A ping that came over a stream ([`Output::ProbeStream`]): foca's ack to it, taken out
    // of the outputs to travel back on the same stream. Anything but a ping is refused.
    fn answer_probe(&mut self, body: &[u8]) -> Option<Vec<u8>> {
        let header = foca_header(body)?;
        if !matches!(header.message, FocaMessage::Ping(_)) {
            self.errors.foca += 1;
            return None;
        }
        let from = self.outbox.outputs.len();
        if self.foca.handle_data(body, &mut self.outbox).is_err() {
            self.errors.foca += 1;
            return None;
        }
        let at = self.outbox.outputs[from..]
            .iter()
            .position(|o| matches!(o, Output::Packet { to, .. } if *to == header.src.addr))?;
        match self.outbox.outputs.remove(from + at) {
            Output::Packet { body, .. } => Some(body),
            _ => None,
        }
    }

    /// Hands back a timer requested through [`Output::Timer`].
    pub fn handle_timer(&mut self, timer: NodeTimer) {
        if self.left {
            return;
        }
        match timer {
            NodeTimer::Foca(t) => {
                let probe = matches!(t, Timer::ProbeRandomMember(_));
                let indirect = match &t {
                    Timer::SendIndirectProbe { probed_id, .. } => Some(probed_id.clone()),
                    _ => None,
                };
                let failed_before = self.outbox.probe_failed.len();
                let outputs_before = self.outbox.outputs.len();
                if self.foca.handle_timer(t, &mut self.outbox).is_err() {
                    self.errors.foca += 1;
                }
                if let Some(target) = indirect {
                    self.fallback_probe(&target);
                }
                if probe {
                    self.remember_ping(outputs_before);
                    // A new probe cycle: the previous probe either failed (foca reported it) or
                    // was answered. Lifeguard: failures raise the local-health score, answers
                    // lower it.
                    let failed = self.outbox.probe_failed.len() > failed_before;
                    self.probe_tick += 1;
                    self.set_health(if failed {
                        self.health + 1
                    } else {
                        self.health.saturating_sub(1)
                    });
                    self.retune();
                    self.expire_votes();
                    if self.probe_tick.is_multiple_of(8) {
                        self.prune();
                    }
                }
            }
            NodeTimer::Suspicion { target, step } => {
                if let Some(s) = self.suspicions.get_mut(&target) {
                    s.passed = Some(s.passed.map_or(step, |p| p.min(step)));
                    self.check_suspicion(target);
                }
            }
            NodeTimer::PushPull => {
                let after = self
                    .push_pull_every
                    .mul_f64(self.rng.random_range(0.9..1.1));
                self.outbox.outputs.push(Output::Timer {
                    after,
                    timer: NodeTimer::PushPull,
                });
                if let Some(to) = self.random_member() {
                    self.push_pull(to);
                    if self.next_version {
                        // The next version's optional request: this version must skip it.
                        self.outbox.outputs.push(Output::PushPull {
                            to,
                            id: 0,
                            body: StreamMessage::Unknown.encode(true),
                        });
                    }
                }
            }
            NodeTimer::FetchTimeout(id) => {
                if let Some(r) = self.requests.get_mut(&id) {
                    if !r.freed {
                        // Keep the entry a while: a late reply is still welcome.
                        r.freed = true;
                        let to = r.to;
                        self.in_flight -= 1;
                        self.fetching.remove(&to);
                        self.fetch_timed_out(to);
                    }
                }
            }
            NodeTimer::FetchRetry(addr) => {
                self.backing_off.remove(&addr);
                self.want(addr);
            }
        }
        self.after_call();
    }

    /// Feeds a decrypted stream message. A request ([`Kind::PushPull`]) returns the body of
    /// the reply ([`Kind::PushPullReply`]) to write back on the same stream; a [`Kind::Probe`]
    /// returns foca's ack to it ([`Kind::ProbeAck`]).
    pub fn handle_stream(&mut self, kind: Kind, body: &[u8]) -> Option<Vec<u8>> {
        if self.left {
            return None;
        }
        let reply = match kind {
            Kind::Foca => {
                // A foca packet sent as a frame: this version never does (its packets fit its
                // datagrams, and datagrams up to the largest allowed size are received whatever
                // udp_payload_size says, which is what lets the setting change node by node).
                // Accepted all the same, within the kind's limit (wire::Kind::max_body).
                if self.foca.handle_data(body, &mut self.outbox).is_err() {
                    self.errors.foca += 1;
                }
                None
            }
            Kind::PushPull => match StreamMessage::decode(body) {
                Some(msg) => self.serve(msg),
                None => {
                    self.errors.state += 1;
                    None
                }
            },
            // A reply is only taken with the transport's word on who sent it and to which
            // request (handle_stream_reply); unsolicited, it is nobody's answer.
            Kind::PushPullReply => {
                lock(&self.store).refused += 1;
                None
            }
            Kind::Probe => self.answer_probe(body),
            // Served by the driver from its blob store; never the node's business.
            Kind::BlobGet | Kind::Blob => None,
            // The driver feeds an ack to handle_packet; it is no request.
            Kind::ProbeAck => None,
        };
        self.after_call();
        reply
    }

    /// The driver had no outbound stream free for request `id` ([`Output::PushPull`]), so it
    /// was never sent. A metadata fetch gives its slot back and is tried again one fetch
    /// timeout later (the streams are likely still taken at the next input), without counting
    /// against the member as a timeout would; a push-pull is simply skipped (the next period
    /// sends another).
    pub fn request_not_sent(&mut self, id: u64) {
        let Some(Request { to, freed, .. }) = self.requests.remove(&id) else {
            return;
        };
        if freed {
            return;
        }
        self.in_flight -= 1;
        self.fetching.remove(&to);
        if let Some(generation) = self.foca_generation(to) {
            self.backing_off.insert(to, generation);
            self.outbox.outputs.push(Output::Timer {
                after: self.fetch_timeout,
                timer: NodeTimer::FetchRetry(to),
            });
        }
    }

    /// Feeds the reply to our stream request `id` ([`Output::PushPull`]), read on the stream
    /// the driver opened to `from`, the address the request was sent to.
    pub fn handle_stream_reply(&mut self, from: SocketAddr, id: u64, body: &[u8]) {
        if self.left {
            return;
        }
        match StreamMessage::decode(body) {
            Some(msg) => self.take_reply(from, id, msg),
            None => {
                self.errors.state += 1;
                // The request is answered all the same: its slot is free.
                self.end_request(from, id);
            }
        }
        self.after_call();
    }

    // Ends request `id` sent to `from`: frees its fetch slot. Returns the hint it was sent to
    // settle if it was ours.
    fn end_request(&mut self, from: SocketAddr, id: u64) -> Option<(u64, u64)> {
        if self.requests.get(&id).is_none_or(|r| r.to != from) {
            return None;
        }
        let r = self.requests.remove(&id)?;
        if !r.freed {
            self.in_flight -= 1;
            self.fetching.remove(&r.to);
        }
        Some(r.hint.unwrap_or((0, 0)))
    }

    // Registers request `id` to `to`, with the hint it is to settle.
    fn register_request(&mut self, id: u64, to: SocketAddr, freed: bool) {
        let hint = lock(&self.store).hints.get(&to).copied();
        let request = Request {
            to,
            sent_tick: self.probe_tick,
            freed,
            hint,
        };
        self.requests.insert(id, request);
    }

    // Answers a stream request.
    fn serve(&mut self, msg: StreamMessage) -> Option<Vec<u8>> {
        match msg {
            StreamMessage::State { id, state } => {
                // Reply with our state as it was before merging theirs: what they lack. A pure
                // pull (a joining node, which has no members yet) also gets the names, so that
                // it can refuse to start under a name already in use.
                let mut reply = self.state();
                if state.members.is_empty() {
                    let active: HashSet<SocketAddr> =
                        self.foca.iter_members().map(|m| m.id().addr).collect();
                    let store = lock(&self.store);
                    reply.names = store
                        .records
                        .iter()
                        .filter(|(a, r)| {
                            !r.left && (active.contains(*a) || !store.left(a, r.generation))
                        })
                        .map(|(a, r)| (*a, r.meta.name.clone()))
                        .collect();
                    reply.names.sort_unstable();
                }
                self.apply_state(state, true);
                Some(StreamMessage::State { id, state: reply }.encode(self.next_version))
            }
            StreamMessage::GetMeta { id } => {
                let records = vec![self.own_record()];
                Some(StreamMessage::Metas { id, records }.encode(self.next_version))
            }
            StreamMessage::Metas { .. } => {
                self.errors.state += 1;
                None
            }
            StreamMessage::Unknown => {
                lock(&self.store).skipped += 1;
                None
            }
        }
    }

    // Takes the reply to our stream request `req` read from `from`: only if `req` went to
    // `from` and the reply names it; records are accepted only for `from`'s own address.
    fn take_reply(&mut self, from: SocketAddr, req: u64, msg: StreamMessage) {
        let (id, records, state) = match msg {
            StreamMessage::State { id, mut state } => {
                (id, std::mem::take(&mut state.records), Some(state))
            }
            StreamMessage::Metas { id, records } => (id, records, None),
            StreamMessage::GetMeta { .. } | StreamMessage::Unknown => {
                lock(&self.store).skipped += 1;
                self.end_request(from, req);
                return;
            }
        };
        let asked = match self.end_request(from, req) {
            Some(asked) if id == req => asked,
            _ => {
                // Not the answer of the member we asked to the request we sent it.
                lock(&self.store).refused += 1;
                return;
            }
        };
        // Members first (so that foca knows the responder's generation), then its own record,
        // then the digests: a digest of the record just taken is no news.
        let digests = state.map(|s| {
            self.merge_members(s.members, true);
            s.digests
        });
        let generation = self.foca_generation(from);
        let mut store = lock(&self.store);
        store.take_owner_reply(from, generation, records, asked);
        for d in digests.into_iter().flatten() {
            store.hint(d);
        }
        let newer_hint = store.hints.get(&from).is_some_and(|h| *h > asked);
        let still_wanted = generation.is_some_and(|g| store.wants(&from, g));
        drop(store);
        if still_wanted && !newer_hint {
            // The owner answered without a record this node could take (one this version
            // cannot read, or refused): like a timeout, so that such a member is asked again
            // after the back-off, not in a loop of round trips.
            self.fetch_timed_out(from);
        } else {
            // It answers (even late): the next fetch need not wait. And a newer hint may have
            // come while this reply was on its way: asked again.
            if !still_wanted {
                self.fetch_failures.remove(&from);
            }
            self.want(from);
        }
    }

    // Applies foca members from a push-pull state (see `apply_state` for `broadcast`).
    fn merge_members(&mut self, mut members: Vec<Member<NodeId>>, broadcast: bool) {
        let broadcast = broadcast && self.foca.num_members() > 0;
        let before = members.len();
        members.retain(|m| generation_allowed(m.id().generation));
        if members.len() < before {
            self.generations_refused
                .fetch_add((before - members.len()) as u64, Ordering::Relaxed);
        }
        // A Down member at an address this node does not know is left out, as memberlist does
        // with dead nodes it does not know: nothing routes to it, and taking it in would start
        // its `forget_after` over here, so a member every node but one had forgotten would come
        // back from that one's push-pulls and circulate for ever.
        // Entries about this node stay: foca answers its own reported death by rejoining.
        let known: HashSet<SocketAddr> = self
            .foca
            .iter_membership_state()
            .map(|m| m.id().addr)
            .chain([self.id().addr])
            .collect();
        members.retain(|m| m.state() != State::Down || known.contains(&m.id().addr));
        if self
            .foca
            .apply_many(members.into_iter(), broadcast, &mut self.outbox)
            .is_err()
        {
            self.errors.state += 1;
        }
    }

    /// Merges a push-pull state into ours: foca's members, and the digests as hints (the
    /// records themselves are fetched from their owners). `broadcast` tells foca whether to
    /// re-disseminate what was new; a node that knows no member yet (it is joining) never does,
    /// since the cluster already knows all of it.
    pub fn apply_state(&mut self, state: PushPullState, broadcast: bool) {
        self.merge_members(state.members, broadcast);
        {
            let mut store = lock(&self.store);
            for d in state.digests {
                store.hint(d);
            }
        }
        self.after_call();
    }

    /// Loads a state including its records, trusting all of them: for simulations and tests
    /// that start from a converged cluster. Nothing is re-broadcast.
    pub fn preload_state(&mut self, state: PushPullState) {
        let _ = self
            .foca
            .apply_many(state.members.into_iter(), false, &mut self.outbox);
        {
            let mut store = lock(&self.store);
            for r in state.records {
                store.accept_from_owner(r);
            }
        }
        self.after_call();
    }

    /// Our state as sent in a push-pull: foca's members, digests of the live records we hold,
    /// and our own record.
    pub fn state(&self) -> PushPullState {
        let mut members: Vec<Member<NodeId>> = self.foca.iter_membership_state().cloned().collect();
        if !self.left {
            // foca does not list itself; incarnation 0 never overrides fresher knowledge.
            members.push(Member::alive(self.id().clone()));
        }
        // Digests of the live records only: active members', ours, and those of members that
        // left (which tells Left from Down).
        let active: HashSet<SocketAddr> = self.foca.iter_members().map(|m| m.id().addr).collect();
        let own = self.id().addr;
        let store = lock(&self.store);
        let mut digests: Vec<Digest> = store
            .records
            .iter()
            .filter(|(addr, r)| r.left || **addr == own || active.contains(*addr))
            .map(|(addr, r)| Digest {
                addr: *addr,
                generation: r.generation,
                version: r.version,
                left: r.left,
            })
            .collect();
        drop(store);
        // HashMap order differs per process; a fixed order keeps simulations reproducible.
        digests.sort_unstable_by_key(|d| d.addr);
        PushPullState {
            members,
            digests,
            records: vec![self.own_record()],
            names: Vec::new(),
        }
    }

    /// Replaces our metadata and spreads it (e.g. `draining = true`).
    pub fn set_meta(&mut self, meta: NodeMeta) {
        if meta == self.meta {
            return;
        }
        self.meta = meta;
        self.version += 1;
        self.publish_meta();
        // Push it out now rather than at the next periodic gossip tick.
        let _ = self.foca.gossip(&mut self.outbox);
        self.after_call();
    }

    /// Leaves the cluster gracefully: marks our metadata as left and declares ourselves down,
    /// by gossip and by a reliable push to one member. The node stays silent afterwards.
    pub fn leave(&mut self) {
        if self.left {
            return;
        }
        self.left = true;
        self.version += 1;
        self.publish_meta();
        let push_to = self.random_member();
        let _ = self.foca.leave_cluster(&mut self.outbox);
        if let Some(to) = push_to {
            let mut state = self.state();
            state.members.push(Member::down(self.id().clone()));
            self.outbox.outputs.push(Output::PushPull {
                to,
                id: 0,
                body: StreamMessage::State { id: 0, state }.encode(self.next_version),
            });
        }
        self.after_call();
    }

    /// Outputs queued since the last call.
    pub fn take_outputs(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.outbox.outputs)
    }

    /// Events queued since the last call.
    pub fn take_events(&mut self) -> Vec<Event> {
        std::mem::take(&mut self.outbox.events)
    }

    /// Brings the member view up to date with foca and the metadata store; returns whether
    /// anything visible in [`Node::members`] changed. O(members): call it once per batch of
    /// inputs, not per packet, when inputs are many.
    pub fn refresh(&mut self, now_ms: u64) -> bool {
        self.refresh_pass += 1;
        let pass = self.refresh_pass;
        let mut changed = false;
        let store = lock(&self.store);
        for m in self.foca.iter_membership_state() {
            let id = m.id();
            let rec = store.records.get(&id.addr);
            let state = match m.state() {
                State::Alive => MemberState::Alive,
                State::Suspect => MemberState::Suspect,
                State::Down if store.left(&id.addr, id.generation) => MemberState::Left,
                State::Down => MemberState::Down,
            };
            let meta_version = rec.map_or(0, |r| r.version);
            let has_meta = rec.is_some();
            let suspectors = if state == MemberState::Suspect {
                store
                    .voters(&(id.addr, id.generation, m.incarnation()))
                    .max(1)
            } else {
                0
            };
            let entry = self.view.entry(id.addr).or_insert_with(|| {
                changed = true;
                ViewEntry {
                    generation: id.generation,
                    incarnation: m.incarnation(),
                    state,
                    meta_version,
                    has_meta,
                    last_change_ms: now_ms,
                    suspectors,
                    seen: pass,
                }
            });
            entry.seen = pass;
            // A new suspector changes what proxies hold, but not since when the member is
            // suspect (the hold delay counts from last_change_ms).
            if entry.suspectors != suspectors {
                entry.suspectors = suspectors;
                changed = true;
            }
            let now = (
                id.generation,
                m.incarnation(),
                state,
                meta_version,
                has_meta,
            );
            if now
                != (
                    entry.generation,
                    entry.incarnation,
                    entry.state,
                    entry.meta_version,
                    entry.has_meta,
                )
            {
                (
                    entry.generation,
                    entry.incarnation,
                    entry.state,
                    entry.meta_version,
                    entry.has_meta,
                ) = now;
                entry.last_change_ms = now_ms;
                changed = true;
            }
        }
        drop(store);
        let before = self.view.len();
        self.view.retain(|_, e| e.seen == pass);
        changed |= self.view.len() != before;
        let own = (self.id().generation, self.version, self.left);
        if own != self.self_seen {
            self.self_seen = own;
            self.self_change_ms = now_ms;
            changed = true;
        }
        changed
    }

    /// Every member whose metadata we have, ourselves first, as of the last [`Node::refresh`].
    /// Members foca knows but whose metadata has not arrived yet are left out: without it a
    /// proxy could not use them anyway.
    pub fn members(&self) -> Vec<MemberInfo> {
        let store = lock(&self.store);
        let mut out = Vec::with_capacity(self.view.len() + 1);
        out.push(MemberInfo {
            meta: self.meta.clone(),
            gossip_addr: self.id().addr,
            state: if self.left {
                MemberState::Left
            } else {
                MemberState::Alive
            },
            // foca keeps its own incarnation private; others see the real value.
            incarnation: 0,
            generation: self.id().generation,
            meta_version: self.version,
            last_change_ms: self.self_change_ms,
            is_self: true,
            suspectors: 0,
        });
        let mut others: Vec<MemberInfo> = self
            .view
            .iter()
            .filter_map(|(addr, e)| {
                let meta = store.records.get(addr)?.meta.clone();
                Some(MemberInfo {
                    meta,
                    gossip_addr: *addr,
                    state: e.state,
                    incarnation: u64::from(e.incarnation),
                    generation: e.generation,
                    meta_version: e.meta_version,
                    last_change_ms: e.last_change_ms,
                    is_self: false,
                    suspectors: e.suspectors,
                })
            })
            .collect();
        others.sort_by(|a, b| {
            a.meta
                .name
                .cmp(&b.meta.name)
                .then(a.gossip_addr.cmp(&b.gossip_addr))
        });
        out.extend(others);
        out
    }

    /// The members seen Suspect at the last [`Node::refresh`]: address, since when (the
    /// `now_ms` of the refresh that first saw the suspicion) and how many independent
    /// suspectors this node has heard of.
    pub fn suspects(&self) -> impl Iterator<Item = (SocketAddr, u64, u32)> + '_ {
        self.view
            .iter()
            .filter(|(_, e)| e.state == MemberState::Suspect)
            .map(|(a, e)| (*a, e.last_change_ms, e.suspectors))
    }

    /// How foca sees `addr` right now (O(members), for tests and the simulator), with Left
    /// distinguished from Down.
    pub fn member_state(&self, addr: SocketAddr) -> Option<MemberState> {
        let m = self
            .foca
            .iter_membership_state()
            .find(|m| m.id().addr == addr)?;
        Some(match m.state() {
            State::Alive => MemberState::Alive,
            State::Suspect => MemberState::Suspect,
            State::Down => {
                let left = lock(&self.store).left(&addr, m.id().generation);
                if left {
                    MemberState::Left
                } else {
                    MemberState::Down
                }
            }
        })
    }

    /// Whether we hold metadata for `addr`.
    pub fn has_meta(&self, addr: SocketAddr) -> bool {
        lock(&self.store).records.contains_key(&addr)
    }

    /// The metadata we hold for `addr`, with its version.
    pub fn meta_of(&self, addr: SocketAddr) -> Option<(u64, NodeMeta)> {
        let store = lock(&self.store);
        let r = store.records.get(&addr)?;
        Some((r.version, r.meta.clone()))
    }

    /// How many metadata records and hints we hold (ours included): bounded by the members
    /// foca knows.
    pub fn held_records(&self) -> (usize, usize) {
        let store = lock(&self.store);
        (store.records.len(), store.hints.len())
    }

    fn random_member(&mut self) -> Option<SocketAddr> {
        let n = self.foca.num_members();
        if n == 0 {
            return None;
        }
        let pick = self.rng.random_range(0..n);
        self.foca.iter_members().nth(pick).map(|m| m.id().addr)
    }

    // A push-pull of our state with `to`, as a request whose reply we will recognize.
    fn push_pull(&mut self, to: SocketAddr) {
        let id = self.new_request(to);
        let body = StreamMessage::State {
            id,
            state: self.state(),
        }
        .encode(self.next_version);
        self.outbox.outputs.push(Output::PushPull { to, id, body });
    }

    fn new_request(&mut self, to: SocketAddr) -> u64 {
        let id = self.fresh_request_id();
        // Freed at once: a push-pull takes no fetch slot.
        self.register_request(id, to, true);
        id
    }

    // A random request id, not 0 and not in use: nobody can guess the id of a request we
    // send to someone else.
    fn fresh_request_id(&mut self) -> u64 {
        loop {
            let id: u64 = self.rng.random();
            if id != 0 && !self.requests.contains_key(&id) {
                return id;
            }
        }
    }

    fn own_record(&self) -> Record {
        Record {
            addr: self.id().addr,
            generation: self.id().generation,
            version: self.version,
            left: self.left,
            meta: self.meta.clone(),
        }
    }

    // The generation foca knows for `addr`, if it lists it.
    fn foca_generation(&self, addr: SocketAddr) -> Option<u64> {
        self.foca
            .iter_membership_state()
            .find(|m| m.id().addr == addr)
            .map(|m| m.id().generation)
    }

    // A fetch from `to` got no answer in time: asked again at once the first time, then after a
    // back-off that doubles with every further timeout in a row.
    fn fetch_timed_out(&mut self, to: SocketAddr) {
        let Some(generation) = self.foca_generation(to) else {
            return;
        };
        if self.backing_off.get(&to) == Some(&generation) {
            // A late answer to an earlier request: the back-off already runs.
            return;
        }
        let failures = self.fetch_failures.entry(to).or_insert((generation, 0));
        if failures.0 != generation {
            *failures = (generation, 0);
        }
        failures.1 = failures.1.saturating_add(1);
        let failures = failures.1;
        if failures == 1 {
            self.want(to);
            return;
        }
        let factor = 1u32
            .checked_shl(failures - 2)
            .unwrap_or(u32::MAX)
            .min(MAX_FETCH_BACKOFF_TIMEOUTS);
        self.backing_off.insert(to, generation);
        self.outbox.outputs.push(Output::Timer {
            after: self.fetch_timeout * factor,
            timer: NodeTimer::FetchRetry(to),
        });
    }

    // Queues a fetch of `addr`'s record if it is active, missing or stale, and not queued or
    // backing off yet.
    fn want(&mut self, addr: SocketAddr) {
        if addr == self.id().addr
            || self.fetching.contains(&addr)
            || self.fetch_queue.contains(&addr)
        {
            return;
        }
        let Some(generation) = self
            .foca
            .iter_members()
            .find(|m| m.id().addr == addr)
            .map(|m| m.id().generation)
        else {
            // Not an active member: nothing to fetch, and a hint about it is not kept (a
            // flood of hints about made-up members costs no memory).
            lock(&self.store).hints.remove(&addr);
            return;
        };
        if self.backing_off.get(&addr) == Some(&generation) {
            return;
        }
        if lock(&self.store).wants(&addr, generation) {
            self.fetch_queue.push_back(addr);
        }
    }

    // Starts queued fetches while slots are free.
    fn pump_fetches(&mut self) {
        while self.in_flight < MAX_FETCHES_IN_FLIGHT {
            let Some(to) = self.fetch_queue.pop_front() else {
                return;
            };
            let id = self.fresh_request_id();
            self.register_request(id, to, false);
            self.in_flight += 1;
            self.fetching.insert(to);
            let body = StreamMessage::GetMeta { id }.encode(self.next_version);
            self.outbox.outputs.push(Output::PushPull { to, id, body });
            self.outbox.outputs.push(Output::Timer {
                after: self.fetch_timeout,
                timer: NodeTimer::FetchTimeout(id),
            });
        }
    }

    // Drops the records and hints of members foca no longer lists (it forgot them), and
    // requests whose reply never came.
    fn prune(&mut self) {
        let generations: HashMap<SocketAddr, u64> = self
            .foca
            .iter_membership_state()
            .map(|m| (m.id().addr, m.id().generation))
            .collect();
        let listed: HashSet<SocketAddr> = generations.keys().copied().collect();
        let own = self.id().addr;
        let mut store = lock(&self.store);
        // A record of a generation above foca's is stale (the member restarted with its clock
        // stepped back); one below is kept until the restarted member's record arrives.
        store
            .records
            .retain(|a, r| *a == own || generations.get(a).is_some_and(|&g| r.generation <= g));
        store.hints.retain(|a, _| listed.contains(a));
        store.left_notes.retain(|a, _| listed.contains(a));
        store.current.retain(|a, _| listed.contains(a));
        drop(store);
        // (`backing_off` empties itself: each entry's retry timer is pending.)
        self.fetch_failures.retain(|a, _| listed.contains(a));
        let tick = self.probe_tick;
        // Entries whose slot is still taken wait for their timeout, which frees them.
        self.requests
            .retain(|_, r| !r.freed || r.sent_tick + REQUEST_TTL_PROBES > tick);
    }

    // Stores our record and queues a hint for dissemination.
    fn publish_meta(&mut self) {
        let own = self.own_record();
        let digest = own.digest();
        lock(&self.store).records.insert(
            own.addr,
            MetaRecord {
                generation: own.generation,
                version: own.version,
                left: own.left,
                meta: own.meta,
            },
        );
        if self
            .foca
            .add_broadcast(&Broadcast::Hint(digest).encode(self.next_version))
            .is_err()
        {
            self.errors.foca += 1;
        }
        if self.next_version
            && self
                .foca
                .add_broadcast(&Broadcast::Unknown.encode(true))
                .is_err()
        {
            self.errors.foca += 1;
        }
    }

    // Work common to every input: react to foca's notifications, hints and fetches.
    fn after_call(&mut self) {
        // Lifeguard first: it may declare members down, which the event loop below must see.
        for id in std::mem::take(&mut self.outbox.probe_failed) {
            self.vote(&id);
        }
        for (timer, base) in std::mem::take(&mut self.outbox.suspicions) {
            self.start_suspicion(timer, base);
        }
        let voted = std::mem::take(&mut lock(&self.store).voted);
        for key in voted {
            self.check_suspicion(key);
        }
        let mut rejoined = false;
        let mut wanted = std::mem::take(&mut self.outbox.renamed);
        let ups = self.outbox.events.iter().filter_map(|e| match e {
            Event::MemberUp(addr) => Some(*addr),
            _ => None,
        });
        let ups: Vec<SocketAddr> = wanted.iter().copied().chain(ups).collect();
        for addr in ups {
            if let Some(g) = self.foca_generation(addr) {
                lock(&self.store).current.insert(addr, g);
            }
        }
        for e in &self.outbox.events {
            match e {
                Event::Active => self.connected = true,
                Event::Idle => self.connected = false,
                Event::Rejoined => rejoined = true,
                // A new member: ask it for its record (it is the only source we trust).
                Event::MemberUp(addr) => wanted.push(*addr),
                _ => {}
            }
        }
        if rejoined && !self.left {
            // Our generation changed: republish so our metadata is keyed by the new identity.
            self.publish_meta();
        }
        let (changed, hinted) = {
            let mut store = lock(&self.store);
            (
                std::mem::take(&mut store.changed),
                std::mem::take(&mut store.hinted),
            )
        };
        wanted.extend(hinted);
        for addr in wanted {
            self.want(addr);
        }
        self.pump_fetches();
        self.outbox
            .events
            .extend(changed.into_iter().map(Event::Meta));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{profile_settings, Profile, Role, Service};

    fn node(port: u16, name: &str) -> Node {
        let (cfg, pp) = profile_settings(Profile::Local, 8);
        let id = NodeId {
            addr: ([127, 0, 0, 1], port).into(),
            generation: 1,
        };
        Node::new(
            id,
            NodeMeta::new(name, Role::Backend),
            cfg,
            pp,
            8,
            u64::from(port),
            0,
        )
    }

    // Delivers `from`'s outputs to `to`; returns whether anything moved.
    fn deliver(from: &mut Node, to: &mut Node) -> bool {
        let mut moved = false;
        for out in from.take_outputs() {
            match out {
                Output::Packet { body, .. } => {
                    to.handle_packet(&body);
                    moved = true;
                }
                Output::PushPull { to: addr, id, body } => {
                    if let Some(reply) = to.handle_stream(Kind::PushPull, &body) {
                        from.handle_stream_reply(addr, id, &reply);
                    }
                    moved = true;
                }
                Output::ProbeStream { body, .. } => {
                    if let Some(ack) = to.handle_stream(Kind::Probe, &body) {
                        from.handle_packet(&ack);
                    }
                    moved = true;
                }
                Output::Timer { .. } => {}
            }
        }
        moved
    }

    // Nodes a, b and c, joined through a, with everyone's records exchanged.
    fn three_joined() -> (Node, Node, Node) {
        let (mut a, mut b, mut c) = (node(1, "a"), node(2, "b"), node(3, "c"));
        b.join(&[a.id().addr]);
        pump(&mut a, &mut b);
        c.join(&[a.id().addr]);
        pump(&mut a, &mut c);
        pump(&mut b, &mut c);
        (a, b, c)
    }

    // Delivers packets and stream exchanges between two nodes until both are quiet.
    fn pump(a: &mut Node, b: &mut Node) {
        for _ in 0..50 {
            let ab = deliver(a, b);
            let ba = deliver(b, a);
            if !ab && !ba {
                return;
            }
        }
    }

    // Starts a probe cycle of `a`: its outputs (the ping, the indirect-stage timer, ...).
    fn probe_cycle(a: &mut Node) -> Vec<Output> {
        // Token 0: the node never changed identity here.
        a.handle_timer(NodeTimer::Foca(Timer::ProbeRandomMember(0)));
        a.take_outputs()
    }

    fn ping_and_indirect_timer(outputs: &[Output], to: SocketAddr) -> (Vec<u8>, NodeTimer) {
        let ping = outputs.iter().find_map(|o| match o {
            Output::Packet { to: t, body } if *t == to => Some(body.clone()),
            _ => None,
        });
        let timer = outputs.iter().find_map(|o| match o {
            Output::Timer {
                timer: t @ NodeTimer::Foca(Timer::SendIndirectProbe { .. }),
                ..
            } => Some(t.clone()),
            _ => None,
        });
        (
            ping.expect("a ping"),
            timer.expect("an indirect-stage timer"),
        )
    }

    fn probe_stream(outputs: &[Output]) -> Option<(SocketAddr, Vec<u8>)> {
        outputs.iter().find_map(|o| match o {
            Output::ProbeStream { to, body, within } => {
                assert!(!within.is_zero());
                Some((*to, body.clone()))
            }
            _ => None,
        })
    }

    #[test]
    fn a_ping_lost_over_udp_is_sent_over_a_stream_whose_ack_keeps_the_member_alive() {
        let (mut a, mut b) = (node(1, "a"), node(2, "b"));
        b.join(&[a.id().addr]);
        pump(&mut a, &mut b);
        let b_addr = b.id().addr;
        a.take_events();

        // The ping is lost; at the indirect stage the same ping goes over a stream, and the
        // ack that comes back answers the probe.
        let (ping, indirect) = ping_and_indirect_timer(&probe_cycle(&mut a), b_addr);
        a.handle_timer(indirect);
        let (to, body) = probe_stream(&a.take_outputs()).expect("a fallback probe");
        assert_eq!((to, &body), (b_addr, &ping));
        let ack = b.handle_stream(Kind::Probe, &body).expect("b acks a ping");
        assert!(
            b.take_outputs()
                .iter()
                .all(|o| !matches!(o, Output::Packet { to, .. } if *to == a.id().addr)),
            "the ack travels on the stream, not also as a datagram"
        );
        a.handle_packet(&ack);
        // The next cycle finds the probe answered. This time its ping is answered over UDP,
        // so no stream is needed.
        let (ping, indirect) = ping_and_indirect_timer(&probe_cycle(&mut a), b_addr);
        assert!(!a.take_events().contains(&Event::Suspected(b_addr)));
        b.handle_packet(&ping);
        for o in b.take_outputs() {
            if let Output::Packet { to, body } = o {
                if to == a.id().addr {
                    a.handle_packet(&body);
                }
            }
        }
        a.handle_timer(indirect);
        assert_eq!(probe_stream(&a.take_outputs()), None);

        // Control: a ping lost and its stream failing too makes the member suspect.
        let (_, indirect) = ping_and_indirect_timer(&probe_cycle(&mut a), b_addr);
        assert!(!a.take_events().contains(&Event::Suspected(b_addr)));
        a.handle_timer(indirect);
        assert!(probe_stream(&a.take_outputs()).is_some());
        probe_cycle(&mut a);
        assert!(a.take_events().contains(&Event::Suspected(b_addr)));

        // Over a stream, only pings are answered.
        assert_eq!(b.handle_stream(Kind::Probe, &ack), None);
        assert_eq!(b.handle_stream(Kind::Probe, b"junk"), None);
    }

    #[test]
    fn join_exchanges_metadata_and_updates_spread() {
        let (mut a, mut b) = (node(1, "a"), node(2, "b"));
        b.join(&[a.id().addr]);
        pump(&mut a, &mut b);
        assert!(a.is_connected() && b.is_connected());
        assert!(a.refresh(5) && b.refresh(5));
        assert_eq!(
            a.members()
                .iter()
                .map(|m| m.meta.name.as_str())
                .collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert_eq!(b.members()[1].state, MemberState::Alive);

        let mut meta = b.meta().clone();
        meta.draining = true;
        meta.services.push(Service {
            pool: "web".into(),
            addr: ([127, 0, 0, 1], 9001).into(),
            weight: 2,
            zone: None,
            tags: None,
        });
        b.set_meta(meta.clone());
        pump(&mut a, &mut b);
        assert_eq!(a.meta_of(b.id().addr), Some((2, meta)));
        assert!(a.refresh(6));
        assert_eq!(a.members()[1].last_change_ms, 6);
        assert!(!a.refresh(7), "nothing changed");
    }

    #[test]
    fn large_metadata_is_fetched_from_its_owner() {
        let (mut a, mut b) = (node(1, "a"), node(2, "b"));
        b.join(&[a.id().addr]);
        pump(&mut a, &mut b);
        let mut meta = b.meta().clone();
        meta.tags = (0..100).map(|i| format!("tag-number-{i}")).collect();
        b.set_meta(meta.clone());
        pump(&mut a, &mut b);
        assert_eq!(a.meta_of(b.id().addr), Some((2, meta)));
    }

    fn web_service(port: u16) -> Service {
        Service {
            pool: "web".into(),
            addr: ([10, 9, 9, 9], port).into(),
            weight: 1,
            zone: None,
            tags: None,
        }
    }

    // The body of a reply to request `id` carrying `records`.
    fn metas(id: u64, records: Vec<Record>) -> Vec<u8> {
        StreamMessage::Metas { id, records }.encode(false)
    }

    // Makes `a` ask `b` for its record now; the request's id.
    fn ask(a: &mut Node, b: SocketAddr) -> u64 {
        a.want(b);
        a.pump_fetches();
        request_ids(a)[0].1
    }

    // The stream requests among `n`'s outputs: (destination, id).
    fn request_ids(n: &mut Node) -> Vec<(SocketAddr, u64)> {
        n.take_outputs()
            .into_iter()
            .filter_map(|o| match o {
                Output::PushPull { to, id, .. } => Some((to, id)),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_reply_counts_only_from_the_member_the_request_went_to() {
        let (mut a, b, mut c) = three_joined();
        let b_addr = b.id().addr;
        assert_eq!(a.meta_of(b_addr).map(|(v, _)| v), Some(1));
        // b changes; a hears of it and asks b.
        let mut real = b.own_record();
        real.version = 2;
        hear_hint(&mut a, &mut c, real.digest());
        let asked = request_ids(&mut a);
        assert_eq!(asked.len(), 1, "{asked:?}");
        let (to, id) = asked[0];
        assert_eq!(to, b_addr);
        // c, who somehow learnt the id, answers first in b's name on its own stream: a
        // record of b's with a version that would pin it.
        let mut forged = b.own_record();
        forged.version = 1 << 48;
        forged.meta.services.push(web_service(80));
        let refused = a.errors().refused;
        a.handle_stream_reply(c.id().addr, id, &metas(id, vec![forged.clone()]));
        assert_eq!(a.meta_of(b_addr).map(|(v, _)| v), Some(1), "still b's own");
        assert_eq!(a.errors().refused, refused + 1);
        // b's own answer, even with the wrong id in its body, is not taken either.
        a.handle_stream_reply(b_addr, id, &metas(id ^ 1, vec![b.own_record()]));
        assert_eq!(a.errors().refused, refused + 2);
        // Even from b, a version more than MAX_VERSION_STEP ahead of the one held is refused.
        let id = ask(&mut a, b_addr);
        a.handle_stream_reply(
            b_addr,
            id,
            &metas(
                id,
                vec![Record {
                    version: 2 + MAX_VERSION_STEP,
                    ..b.own_record()
                }],
            ),
        );
        assert_eq!(a.meta_of(b_addr).map(|(v, _)| v), Some(1));
        assert_eq!(a.errors().refused, refused + 3);
    }

    #[test]
    fn a_record_is_accepted_only_from_its_owner() {
        let (mut a, mut b, mut c) = three_joined();
        let b_addr = b.id().addr;
        assert_eq!(a.meta_of(b_addr).map(|(v, _)| v), Some(1));
        // c holds the key and forges b's record: a service of its choosing, in b's name.
        let mut forged = b.own_record();
        forged.version = 2;
        forged.meta.services.push(web_service(80));
        // 1. In a push-pull request c sends to a: records in a request are never taken.
        let mut state = c.state();
        state.records.push(forged.clone());
        a.handle_stream(
            Kind::PushPull,
            &StreamMessage::State { id: 0, state }.encode(false),
        );
        // 2. In the reply to a's own push-pull with c: only c's record would be taken.
        a.push_pull(c.id().addr);
        let id = request_ids(&mut a)[0].1;
        let mut state = c.state();
        state.records = vec![forged.clone()];
        a.handle_stream_reply(
            c.id().addr,
            id,
            &StreamMessage::State { id, state }.encode(false),
        );
        // 3. As a reply to a request a never sent.
        a.handle_stream_reply(c.id().addr, 999, &metas(999, vec![forged.clone()]));
        assert_eq!(a.meta_of(b_addr).map(|(v, _)| v), Some(1), "still b's own");
        assert!(a.errors().refused >= 2, "{:?}", a.errors());

        // 4. A hint relayed by c makes a ask b itself, which answers with what it really has.
        hear_hint(&mut a, &mut c, forged.digest());
        let asked: Vec<SocketAddr> = a
            .take_outputs()
            .into_iter()
            .filter_map(|o| match o {
                Output::PushPull { to, id, body } => {
                    if let Some(reply) = b.handle_stream(Kind::PushPull, &body) {
                        a.handle_stream_reply(to, id, &reply);
                    }
                    Some(to)
                }
                _ => None,
            })
            .collect();
        assert_eq!(asked, [b_addr], "the hint was checked with its owner");
        assert_eq!(a.meta_of(b_addr), Some((1, b.meta().clone())));
        assert_eq!(a.held_records().1, 0, "the owner's answer ended the hint");

        // 5. A version beyond the step, or u64::MAX, is refused outright: nothing is asked.
        let refused = a.errors().refused;
        for version in [1 + MAX_VERSION_STEP + 1, u64::MAX] {
            let d = Digest {
                version,
                ..forged.digest()
            };
            hear_hint(&mut a, &mut c, d);
            assert!(
                !a.take_outputs()
                    .iter()
                    .any(|o| matches!(o, Output::PushPull { .. })),
                "version {version} made a ask"
            );
        }
        assert_eq!(a.errors().refused, refused + 2);
        // 6. Nor does a made-up generation pin anything: b's next real change still arrives.
        let d = Digest {
            generation: u64::MAX,
            ..forged.digest()
        };
        hear_hint(&mut a, &mut c, d);
        let mut meta = b.meta().clone();
        meta.draining = true;
        b.set_meta(meta.clone());
        pump(&mut a, &mut b);
        assert_eq!(a.meta_of(b_addr), Some((2, meta)));
    }

    // The digest of `n`'s own record, at `version`.
    fn digest_at(n: &Node, version: u64) -> Digest {
        Digest {
            version,
            ..n.own_record().digest()
        }
    }

    // `to` hears the hint `d`, relayed by `from` in a foca packet.
    fn hear_hint(to: &mut Node, from: &mut Node, d: Digest) {
        let packet = foca_packet_with(from, to.id().clone(), &Broadcast::Hint(d));
        to.handle_packet(&packet);
    }

    // A foca packet from `from` to `to` carrying one custom broadcast.
    fn foca_packet_with(from: &mut Node, to: NodeId, b: &Broadcast) -> Vec<u8> {
        let mut foca: Foca<NodeId, PostcardCodec, SmallRng, MetaHandler> =
            Foca::with_custom_broadcast(
                from.id().clone(),
                from.config.clone(),
                SmallRng::seed_from_u64(1),
                PostcardCodec,
                MetaHandler {
                    store: Arc::new(Mutex::new(MetaStore::default())),
                },
            );
        let mut out = Outbox::default();
        foca.apply_many(std::iter::once(Member::alive(to)), false, &mut out)
            .expect("applies");
        foca.add_broadcast(&b.encode(false)).expect("fits");
        out.outputs.clear();
        foca.broadcast(&mut out).expect("broadcasts");
        out.outputs
            .into_iter()
            .find_map(|o| match o {
                Output::Packet { body, .. } => Some(body),
                _ => None,
            })
            .expect("a packet")
    }

    #[test]
    fn the_next_versions_fields_and_kinds_are_skipped_not_refused() {
        let (mut a, mut b) = (node(1, "a"), node(2, "b"));
        // b behaves as the next version: extra fields in its metadata and services, a body
        // version one higher, a broadcast kind and a request kind a does not know.
        b.next_version = true;
        b.join(&[a.id().addr]);
        pump(&mut a, &mut b);
        let mut meta = b.meta().clone();
        meta.services.push(web_service(8080));
        b.set_meta(meta.clone());
        pump(&mut a, &mut b);
        b.handle_timer(NodeTimer::PushPull);
        pump(&mut a, &mut b);
        assert_eq!(a.meta_of(b.id().addr), Some((2, meta)));
        assert_eq!(b.meta_of(a.id().addr), Some((1, a.meta().clone())));
        let e = a.errors();
        assert!(e.skipped >= 2, "{e:?}");
        assert_eq!((e.foca, e.state, e.refused), (0, 0, 0), "{e:?}");
    }

    #[test]
    fn a_joiner_applies_the_seed_state_without_rebroadcasting_it() {
        let mut seed = node(1, "seed");
        let mut others: Vec<Node> = (2..8).map(|p| node(p, &format!("n{p}"))).collect();
        for o in &mut others {
            o.join(&[seed.id().addr]);
            pump(&mut seed, o);
        }
        let mut joiner = node(20, "joiner");
        let reply = seed
            .handle_stream(Kind::PushPull, &PushPullState::default().encode())
            .expect("a reply");
        let before = joiner.foca.updates_backlog();
        joiner.apply_state(PushPullState::decode(&reply).expect("a state"), true);
        assert_eq!(joiner.num_active(), 7, "it knows every member");
        assert_eq!(
            joiner.foca.updates_backlog(),
            before,
            "and gossips none of them"
        );
        // It asks each member for its own record, and nobody else.
        let mut asked: Vec<SocketAddr> = joiner
            .take_outputs()
            .into_iter()
            .filter_map(|o| match o {
                Output::PushPull { to, .. } => Some(to),
                _ => None,
            })
            .collect();
        asked.sort();
        let mut members: Vec<SocketAddr> = others.iter().map(|o| o.id().addr).collect();
        members.push(seed.id().addr);
        members.sort();
        assert_eq!(asked, members);
    }

    #[test]
    fn a_left_hint_changes_no_record() {
        let (mut a, mut b, mut c) = three_joined();
        let b_addr = b.id().addr;
        assert_eq!(a.meta_of(b_addr).map(|(v, _)| v), Some(1));
        // c says b left, far ahead of b's real version.
        let mut forged = b.own_record().digest();
        forged.version = 1 + MAX_VERSION_STEP;
        forged.left = true;
        hear_hint(&mut a, &mut c, forged);
        a.take_outputs();
        assert_eq!(
            a.meta_of(b_addr).map(|(v, _)| v),
            Some(1),
            "record untouched"
        );
        assert_eq!(a.member_state(b_addr), Some(MemberState::Alive));
        assert!(
            !a.state().digests.iter().any(|d| d.addr == b_addr && d.left),
            "not passed on in push-pulls"
        );
        // b's real next version still arrives, and ends the note.
        b.set_meta(NodeMeta {
            services: vec![web_service(80)],
            ..b.meta().clone()
        });
        for _ in 0..20 {
            if !(deliver(&mut b, &mut a) | deliver(&mut a, &mut b)) {
                break;
            }
        }
        assert_eq!(a.meta_of(b_addr).map(|(v, _)| v), Some(2));
        assert!(lock(&a.store).left_notes.is_empty());
    }

    #[test]
    fn a_generation_ahead_of_the_clock_is_refused() {
        let (mut a, mut b, mut c) = (node(1, "a"), node(2, "b"), node(3, "c"));
        b.join(&[a.id().addr]);
        pump(&mut a, &mut b);
        c.join(&[a.id().addr]);
        pump(&mut a, &mut c);
        let b_addr = b.id().addr;
        let forged = NodeId {
            addr: b_addr,
            generation: u64::MAX,
        };
        assert!(!generation_allowed(forged.generation));
        assert!(generation_allowed(crate::persist::next_generation(
            crate::clock::wall_ms(),
            None
        )));
        let refused = a.errors().refused;
        // 1. In a push-pull state.
        let mut state = c.state();
        state.members.push(Member::alive(forged.clone()));
        a.handle_stream(
            Kind::PushPull,
            &StreamMessage::State { id: 0, state }.encode(false),
        );
        assert_eq!(a.foca_generation(b_addr), Some(1), "b is not renamed");
        assert_eq!(a.errors().refused, refused + 1);
        // 2. As the sender of a foca packet: dropped whole.
        let mut foca: Foca<NodeId, PostcardCodec, SmallRng, MetaHandler> =
            Foca::with_custom_broadcast(
                forged.clone(),
                c.config.clone(),
                SmallRng::seed_from_u64(1),
                PostcardCodec,
                MetaHandler {
                    store: Arc::new(Mutex::new(MetaStore::default())),
                },
            );
        let mut out = Outbox::default();
        foca.announce(a.id().clone(), &mut out).expect("announces");
        let Some(Output::Packet { body, .. }) = out.outputs.pop() else {
            panic!("no announce");
        };
        a.handle_packet(&body);
        assert_eq!(a.foca_generation(b_addr), Some(1), "b is not renamed");
        assert_eq!(a.errors().refused, refused + 2);
    }

    #[test]
    fn a_late_reply_keeps_a_newer_hint() {
        let (mut a, b, mut c) = three_joined();
        let b_addr = b.id().addr;
        let hint = |version| digest_at(&b, version);
        // Hint v2: a asks b.
        hear_hint(&mut a, &mut c, hint(2));
        let (to, id) = request_ids(&mut a)[0];
        assert_eq!(to, b_addr);
        // Hint v3 while the fetch is under way.
        hear_hint(&mut a, &mut c, hint(3));
        a.take_outputs();
        // b's reply with v2.
        let v2 = Record {
            version: 2,
            ..b.own_record()
        };
        a.handle_stream_reply(b_addr, id, &metas(id, vec![v2]));
        assert_eq!(a.meta_of(b_addr).map(|(v, _)| v), Some(2));
        assert_eq!(a.held_records().1, 1, "the v3 hint is kept");
        let asked = request_ids(&mut a);
        assert_eq!(asked.len(), 1, "and b is asked again: {asked:?}");
        assert_eq!(asked[0].0, b_addr);
    }

    #[test]
    fn fetches_from_a_member_that_never_answers_back_off_until_it_does() {
        let (mut a, b, mut c) = three_joined();
        let b_addr = b.id().addr;
        let hint = |version| digest_at(&b, version);
        let mut hear = |a: &mut Node, version| hear_hint(a, &mut c, hint(version));
        // What a fetch timeout leads to: a new request at once, or a wait (in fetch timeouts)
        // and then, when the retry timer fires, the request.
        let time_out = |a: &mut Node, id| -> (u32, (SocketAddr, u64)) {
            a.handle_timer(NodeTimer::FetchTimeout(id));
            let mut wait = 0;
            let mut asked = Vec::new();
            for out in a.take_outputs() {
                match out {
                    Output::PushPull { to, id, .. } => asked.push((to, id)),
                    Output::Timer {
                        after,
                        timer: NodeTimer::FetchRetry(addr),
                    } => {
                        assert_eq!(addr, b_addr);
                        wait = (after.as_millis() / a.fetch_timeout.as_millis()) as u32;
                    }
                    _ => {}
                }
            }
            if wait > 0 {
                assert!(asked.is_empty(), "asked while backing off: {asked:?}");
                a.handle_timer(NodeTimer::FetchRetry(b_addr));
                asked = request_ids(a);
            }
            assert_eq!(asked.len(), 1, "{asked:?}");
            (wait, asked[0])
        };
        hear(&mut a, 2);
        let mut asked = request_ids(&mut a)[0];
        let mut waits = Vec::new();
        for _ in 0..9 {
            assert_eq!(asked.0, b_addr);
            let (wait, next) = time_out(&mut a, asked.1);
            waits.push(wait);
            asked = next;
        }
        assert_eq!(waits, [0, 1, 2, 4, 8, 16, 32, 64, 64]);
        // A newer hint does not cut a back-off short.
        a.handle_timer(NodeTimer::FetchTimeout(asked.1));
        a.take_outputs();
        hear(&mut a, 3);
        assert!(request_ids(&mut a).is_empty());
        a.handle_timer(NodeTimer::FetchRetry(b_addr));
        let (_, id) = request_ids(&mut a)[0];
        // b answers at last: the next fetch that times out is retried at once again.
        let v3 = Record {
            version: 3,
            ..b.own_record()
        };
        a.handle_stream_reply(b_addr, id, &metas(id, vec![v3]));
        assert_eq!(a.meta_of(b_addr).map(|(v, _)| v), Some(3));
        hear(&mut a, 4);
        let (_, id) = request_ids(&mut a)[0];
        assert_eq!(time_out(&mut a, id).0, 0);
    }

    #[test]
    fn an_answer_without_a_usable_record_is_asked_again_only_after_a_back_off() {
        let (mut a, b, _c) = three_joined();
        let b_addr = b.id().addr;
        // a lacks b's record (say b's metadata has a field this version cannot read).
        lock(&a.store).records.remove(&b_addr);
        let id = ask(&mut a, b_addr);
        // b answers with nothing a can take: asked once more at once...
        a.handle_stream_reply(b_addr, id, &metas(id, vec![]));
        let asked = request_ids(&mut a);
        assert_eq!(asked.len(), 1, "{asked:?}");
        // ...then only after a back-off, not in a loop of round trips.
        a.handle_stream_reply(b_addr, asked[0].1, &metas(asked[0].1, vec![]));
        let outputs = a.take_outputs();
        assert!(
            !outputs.iter().any(|o| matches!(o, Output::PushPull { .. })),
            "{outputs:?}"
        );
        assert!(
            outputs.iter().any(|o| matches!(
                o,
                Output::Timer {
                    timer: NodeTimer::FetchRetry(x),
                    ..
                } if *x == b_addr
            )),
            "{outputs:?}"
        );
    }

    #[test]
    fn a_fetch_the_driver_could_not_send_is_queued_again_and_not_counted() {
        let (mut a, b, _c) = three_joined();
        let b_addr = b.id().addr;
        lock(&a.store).records.remove(&b_addr);
        let id = ask(&mut a, b_addr);
        a.request_not_sent(id);
        assert_eq!(a.in_flight, 0);
        let retry = a.take_outputs();
        assert!(
            retry.contains(&Output::Timer {
                after: a.fetch_timeout,
                timer: NodeTimer::FetchRetry(b_addr)
            }),
            "{retry:?}"
        );
        // Its timeout is no longer anything to act on; the retry timer starts the fetch again.
        a.handle_timer(NodeTimer::FetchTimeout(id));
        assert!(request_ids(&mut a).is_empty());
        a.handle_timer(NodeTimer::FetchRetry(b_addr));
        let asked = request_ids(&mut a);
        assert_eq!(asked.len(), 1, "{asked:?}");
        assert_eq!(asked[0].0, b_addr);
        assert!(a.fetch_failures.is_empty(), "{:?}", a.fetch_failures);
    }

    #[test]
    fn a_down_member_is_taken_from_a_push_pull_only_if_known() {
        let (mut a, b, _c) = three_joined();
        let state_of = |n: &Node, addr: SocketAddr| {
            n.foca
                .iter_membership_state()
                .find(|m| m.id().addr == addr)
                .map(|m| m.state())
        };
        // Forgotten here (or never heard of): a Down entry in a push-pull does not bring it back.
        let gone = NodeId {
            addr: ([127, 0, 0, 1], 9).into(),
            generation: 1,
        };
        let down = |id: &NodeId| PushPullState {
            members: vec![Member::down(id.clone())],
            ..PushPullState::default()
        };
        a.apply_state(down(&gone), true);
        assert_eq!(state_of(&a, gone.addr), None);
        // Known: its death counts.
        assert_eq!(state_of(&a, b.id().addr), Some(State::Alive));
        a.apply_state(down(b.id()), true);
        assert_eq!(state_of(&a, b.id().addr), Some(State::Down));
    }

    #[test]
    fn a_hint_about_a_restarted_members_new_generation_counts() {
        let (mut a, mut b, mut c) = (node(1, "a"), node(2, "b"), node(3, "c"));
        b.join(&[a.id().addr]);
        pump(&mut a, &mut b);
        c.join(&[a.id().addr]);
        pump(&mut a, &mut c);
        let b_addr = b.id().addr;
        assert_eq!(a.meta_of(b_addr).map(|(v, _)| v), Some(1));
        // b restarts under generation 2; a hears of it (and asks b).
        let b2 = NodeId {
            addr: b_addr,
            generation: 2,
        };
        let mut state = c.state();
        state.members.push(Member::alive(b2));
        a.handle_stream(
            Kind::PushPull,
            &StreamMessage::State { id: 0, state }.encode(false),
        );
        assert_eq!(a.foca_generation(b_addr), Some(2));
        a.take_outputs();
        // A change b makes under generation 2 before its record arrived is noted.
        let d = Digest {
            addr: b_addr,
            generation: 2,
            version: 2,
            left: false,
        };
        hear_hint(&mut a, &mut c, d);
        assert_eq!(a.held_records().1, 1, "the hint is kept");
    }

    #[test]
    fn a_record_of_foca_s_generation_replaces_a_higher_one() {
        let (mut a, mut b) = (node(1, "a"), node(2, "b"));
        b.join(&[a.id().addr]);
        pump(&mut a, &mut b);
        let b_addr = b.id().addr;
        // a holds a record of b from a later generation than the one b now runs under (b
        // restarted with its clock stepped back).
        lock(&a.store)
            .records
            .get_mut(&b_addr)
            .expect("b's record")
            .generation = 1_000;
        a.fetch_queue.push_back(b_addr);
        a.pump_fetches();
        let (to, id) = request_ids(&mut a)[0];
        assert_eq!(to, b_addr);
        let reply = b
            .handle_stream(Kind::PushPull, &StreamMessage::GetMeta { id }.encode(false))
            .expect("a reply");
        a.handle_stream_reply(b_addr, id, &reply);
        let store = lock(&a.store);
        assert_eq!(store.records.get(&b_addr).map(|r| r.generation), Some(1));
    }

    #[test]
    fn leave_is_seen_as_left() {
        let (mut a, mut b) = (node(1, "a"), node(2, "b"));
        b.join(&[a.id().addr]);
        pump(&mut a, &mut b);
        b.leave();
        pump(&mut a, &mut b);
        assert_eq!(a.member_state(b.id().addr), Some(MemberState::Left));
        a.refresh(9);
        assert_eq!(a.members()[1].state, MemberState::Left);
    }

    #[test]
    fn name_conflict_is_found_in_the_reply_to_a_pure_pull() {
        let (mut a, mut b) = (node(1, "same"), node(2, "b"));
        b.join(&[a.id().addr]);
        pump(&mut a, &mut b);
        // What a starting node asks a seed before joining: the names come with the reply.
        let reply = b
            .handle_stream(Kind::PushPull, &PushPullState::default().encode())
            .expect("a reply");
        let state = PushPullState::decode(&reply).expect("a state");
        assert_eq!(
            state.name_taken("same", ([127, 0, 0, 1], 3).into()),
            Some(a.id().addr)
        );
        assert_eq!(
            state.name_taken("same", a.id().addr),
            None,
            "a restart at the same address is not a conflict"
        );
        assert_eq!(state.name_taken("other", ([127, 0, 0, 1], 3).into()), None);
    }

    #[test]
    fn lateness_raises_local_health_once_per_probe_period_and_stretches_probes() {
        let (mut a, mut b) = (node(1, "a"), node(2, "b"));
        b.join(&[a.id().addr]);
        pump(&mut a, &mut b);
        let base = a.tuning().probe_interval;
        assert_eq!(a.tuning().local_health, 0);
        // Slightly late timers are normal; half a probe timeout late is not.
        a.timer_lateness(Duration::from_millis(1));
        assert_eq!(a.tuning().local_health, 0);
        a.timer_lateness(Duration::from_secs(1));
        a.timer_lateness(Duration::from_secs(1));
        assert_eq!(a.tuning().local_health, 1, "at most one point per period");
        assert_eq!(a.tuning().probe_interval, base * 2);
        assert_eq!(a.take_tuning_change().map(|t| t.local_health), Some(1));
        // The next probe timer foca asks for is stretched by the multiplier.
        a.take_outputs();
        let probe = Timer::ProbeRandomMember(0);
        foca::Runtime::submit_after(&mut a.outbox, probe.clone(), base);
        let stretched = a.take_outputs().into_iter().find_map(|o| match o {
            Output::Timer {
                after,
                timer: NodeTimer::Foca(t),
            } if t == probe => Some(after),
            _ => None,
        });
        assert_eq!(stretched, Some(base * 2));
        a.inbound_dropped();
        assert_eq!(a.tuning().local_health, 1, "same period: no second point");
    }

    #[test]
    fn garbage_is_counted_not_applied() {
        let mut a = node(1, "a");
        a.handle_packet(b"\xff\xff\xff");
        assert_eq!(a.handle_stream(Kind::PushPull, b"\xff\xff\xff\xff"), None);
        assert_eq!(
            a.errors(),
            NodeErrors {
                foca: 1,
                state: 1,
                ..NodeErrors::default()
            }
        );
    }
}
