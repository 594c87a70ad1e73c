//! The tokio driver: sockets, timers and the membership snapshot around a [`Node`].
//!
//! One task owns the [`Node`] and is the only one to touch it; the UDP receiver, the TCP
//! acceptor and the outgoing stream exchanges are separate tasks that talk to it through a
//! channel. Decryption happens in those tasks, so a flood of forged packets never reaches the
//! driver. After every batch of inputs the driver refreshes the member view and, when it
//! changed, publishes a new snapshot and bumps the `changes()` counter — that is how a member
//! turning Suspect reaches the proxy within the same event-loop turn foca decided it.
//!
//! # What an unauthenticated sender can cost
//! - A datagram: one `recv` and, if it is no longer than [`wire::MAX_UDP_PAYLOAD`] (whatever
//!   this node sends: see [`TransportConfig::udp_payload_size`]) and names an installed key id,
//!   one AES-GCM decryption of at most that size (no key id match: none).
//! - A TCP connection: a slot among [`TransportConfig::tcp_max_connections`] (and
//!   [`TransportConfig::tcp_max_connections_per_addr`] for its IPv4 address or IPv6 /64) for at
//!   most [`HEADER_TIMEOUT`] unless it sends a length prefix, then for at most the stream
//!   timeout; the frame's buffer grows only as bytes arrive, all inbound frames together hold
//!   at most [`INBOUND_BUFFER_BUDGET`] bytes and those from one address at most
//!   [`INBOUND_BUFFER_PER_SOURCE`]. Refusals are counted in [`Stats`].
//! - A replayed authenticated message: one decryption, then the [`crate::replay`] window
//!   refuses it.
//!
//! A key holder can do more: its frames are decrypted (those over 64 KiB on a blocking
//! thread, two at a time, so the member's task keeps running) and inflated, each body to at
//! most its kind's limit ([`Kind::max_body`]: a foca packet, a blob key, a frame), an inbound
//! frame's inflated body counted in the inbound budget until the member's task has consumed
//! it; and it can hold a connection for the stream timeout to send its frame and again while
//! the reply is written (about 10 s).

use std::collections::BinaryHeap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream, UdpSocket};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinHandle;
use tokio::time::{timeout, Instant};

use super::blobs::{self, BlobError, BlobKey, BlobStore};
use super::keyring::Keyring;
use super::limits::{BufferBudget, BufferGrant, InboundSlot, InboundSlots};
use super::names::{self, Clash};
use super::node::{Event, Node, NodeId, NodeTimer, Output, PushPullState};
use super::persist;
use super::replay::{Refusal, ReplayGuard};
pub use super::rotation::RotationReport;
use super::rotation::{self, KeyringState, Phase, Rotation};
use super::wire::{self, Kind, Message, OpenError, Stamp};
use super::{
    foca_packet_size, profile_settings, ClusterConfig, ClusterError, MemberInfo, NodeMeta, Profile,
    TransportConfig, Tuning,
};
use crate::clock::now_ms;

// One stream exchange (connect, write, read) must finish within this.
const STREAM_TIMEOUT: Duration = Duration::from_secs(5);
pub use super::limits::{
    HEADER_TIMEOUT, INBOUND_BUFFER_BUDGET, INBOUND_BUFFER_PER_SOURCE, REPLY_BUFFER_BUDGET,
};
// Frames larger than this are opened (decrypted, inflated) on a blocking thread, at most
// OPENERS at a time, so that a few large frames never stall the member's task.
const BLOCKING_OPEN_MIN: usize = 64 * 1024;
const OPENERS: usize = 2;

/// Transport counters since start.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct Stats {
    /// Datagrams sent.
    pub udp_sent: u64,
    /// Datagrams received (before decryption).
    pub udp_received: u64,
    /// TCP frames sent.
    pub tcp_sent: u64,
    /// TCP frames received (before decryption).
    pub tcp_received: u64,
    /// Bytes sent over both transports (sealed, with frame headers).
    pub bytes_sent: u64,
    /// Bytes received over both transports.
    pub bytes_received: u64,
    /// Datagrams and frames dropped because no key authenticated them.
    pub rejected_decrypt: u64,
    /// Authenticated messages that were malformed or refused by the protocol.
    pub malformed: u64,
    /// Authenticated messages whose body, inflated, is larger than its kind allows (a foca
    /// packet, a blob key, a frame): refused as soon as the inflated bytes pass the limit.
    pub oversized_bodies: u64,
    /// Authenticated datagrams dropped because the member's task did not keep up.
    pub inbound_dropped: u64,
    /// Datagrams longer than the largest allowed UDP payload size ([`wire::MAX_UDP_PAYLOAD`],
    /// whatever this member sends), dropped before any decryption.
    pub udp_oversized: u64,
    /// Authenticated messages refused by the replay window: seen before, older than the
    /// window, or sent further than the allowed clock skew from now.
    pub rejected_replay: u64,
    /// Inbound TCP connections closed on accept: too many open in all or from that address.
    pub tcp_refused: u64,
    /// Inbound TCP connections closed because their frame did not arrive in time: no length
    /// prefix within [`HEADER_TIMEOUT`], or not the whole frame within the stream timeout.
    pub tcp_timeouts: u64,
    /// TCP frames refused: a declared length above the frame limit (or, for a reply, above
    /// what its kind needs), or more buffer (the frame, or its inflated body) than its budget
    /// or its source address's share had left.
    pub tcp_frames_refused: u64,
    /// Outbound stream exchanges not started because the outbound limit was reached.
    pub outbound_skipped: u64,
    /// Fallback probes sent over TCP because a direct ping got no ack in time.
    pub probe_fallbacks: u64,
    /// Of those, answered by an ack over TCP: probes that UDP alone would have failed. Many
    /// of them mean datagrams are being lost (a firewall dropping UDP, an MTU problem).
    pub probe_fallback_acks: u64,
    /// Metadata records and hints the node refused: a record not from its owner, a hint too
    /// far ahead (see [`crate::node`], "Ownership").
    pub metadata_refused: u64,
    /// Authenticated messages of a kind a newer version added, skipped (a mixed-version
    /// cluster during an upgrade; see [`crate::message`]).
    pub unknown_skipped: u64,
    /// Bytes TCP frame buffers and inflated bodies hold now (rounded up to KiB per frame); at
    /// most [`INBOUND_BUFFER_BUDGET`] plus [`REPLY_BUFFER_BUDGET`]. A gauge, not a counter.
    pub tcp_buffer_bytes: u64,
    /// Clashes of two alive members with one name seen by this member (each counted once).
    pub duplicate_names: u64,
    /// Keyring changes that could not be written to the key file.
    pub key_file_errors: u64,
}

impl Stats {
    /// Every counter but the byte counts, by name (the field names): what the proxy exports
    /// as `sluice_cluster_transport_total{event}`.
    pub fn events(&self) -> [(&'static str, u64); 18] {
        [
            ("udp_sent", self.udp_sent),
            ("udp_received", self.udp_received),
            ("tcp_sent", self.tcp_sent),
            ("tcp_received", self.tcp_received),
            ("rejected_decrypt", self.rejected_decrypt),
            ("rejected_replay", self.rejected_replay),
            ("malformed", self.malformed),
            ("oversized_bodies", self.oversized_bodies),
            ("inbound_dropped", self.inbound_dropped),
            ("udp_oversized", self.udp_oversized),
            ("tcp_refused", self.tcp_refused),
            ("tcp_timeouts", self.tcp_timeouts),
            ("tcp_frames_refused", self.tcp_frames_refused),
            ("outbound_skipped", self.outbound_skipped),
            ("probe_fallbacks", self.probe_fallbacks),
            ("probe_fallback_acks", self.probe_fallback_acks),
            ("metadata_refused", self.metadata_refused),
            ("unknown_skipped", self.unknown_skipped),
        ]
    }
}

#[derive(Default)]
struct Counters {
    udp_sent: AtomicU64,
    udp_received: AtomicU64,
    tcp_sent: AtomicU64,
    tcp_received: AtomicU64,
    bytes_sent: AtomicU64,
    bytes_received: AtomicU64,
    rejected_decrypt: AtomicU64,
    malformed: AtomicU64,
    oversized_bodies: AtomicU64,
    inbound_dropped: AtomicU64,
    udp_oversized: AtomicU64,
    rejected_replay: AtomicU64,
    tcp_refused: AtomicU64,
    tcp_timeouts: AtomicU64,
    tcp_frames_refused: AtomicU64,
    outbound_skipped: AtomicU64,
    probe_fallbacks: AtomicU64,
    probe_fallback_acks: AtomicU64,
    // Copied from the node's own counters after every turn.
    metadata_refused: AtomicU64,
    unknown_skipped: AtomicU64,
    duplicate_names: AtomicU64,
    key_file_errors: AtomicU64,
}

fn add(c: &AtomicU64, n: usize) {
    c.fetch_add(n as u64, Ordering::Relaxed);
}

// State shared by the handle, the driver and the I/O tasks.
pub(crate) struct Shared {
    cluster_name: String,
    compression: bool,
    pub(crate) keyring: ArcSwap<Keyring>,
    // Serializes keyring edits (load-modify-store); readers never take it.
    keyring_edit: Mutex<()>,
    members: ArcSwap<Vec<MemberInfo>>,
    tuning: ArcSwap<Tuning>,
    counters: Counters,
    gossip_addr: SocketAddr,
    blobs: BlobStore,
    transport: TransportConfig,
    // Our stamp: a random session per start and a counter per sealed message.
    session: u64,
    sealed: AtomicU64,
    replay: Mutex<ReplayGuard>,
    inbound: Arc<InboundSlots>,
    // Inbound frames and their inflated bodies (INBOUND_BUFFER_BUDGET), and the replies to our
    // own requests (REPLY_BUFFER_BUDGET).
    buffers: Arc<BufferBudget>,
    replies: Arc<BufferBudget>,
    // Places on a blocking thread for opening large frames (BLOCKING_OPEN_MIN).
    openers: Arc<Semaphore>,
    outbound: Arc<Semaphore>,
    // Why this member stopped on its own: (name, the member that keeps it). Set once.
    refusal: OnceLock<(String, SocketAddr)>,
    // Where the keyring is written back, if anywhere.
    key_file: Option<PathBuf>,
    // This node coordinates a key rotation (one at a time).
    pub(crate) coordinating: AtomicBool,
}

fn wall_clock_s() -> u64 {
    crate::clock::wall_ms() / 1000
}

impl Shared {
    fn stamp(&self) -> Stamp {
        Stamp {
            session: self.session,
            counter: self.sealed.fetch_add(1, Ordering::Relaxed) + 1,
            sent_at_s: wall_clock_s() as u32,
        }
    }

    fn seal(&self, kind: Kind, body: &[u8]) -> Vec<u8> {
        wire::seal(
            &self.keyring.load(),
            &self.cluster_name,
            kind,
            self.stamp(),
            body,
            self.compression,
        )
    }

    // Opens a received message, counting what is dropped; `grow` is asked before an inflated
    // body's buffer grows.
    fn open(&self, sealed: Vec<u8>, grow: impl FnMut(usize) -> bool) -> Option<Message> {
        let fresh = |stamp: &Stamp| {
            let mut guard = self.replay.lock().unwrap_or_else(|e| e.into_inner());
            match guard.accept(stamp, wall_clock_s()) {
                Ok(()) => true,
                Err(why) => {
                    if why == Refusal::Skew {
                        tracing::debug!(sent_at_s = stamp.sent_at_s, "gossip message outside the clock skew; are the members' clocks synchronised?");
                    }
                    false
                }
            }
        };
        let ring = self.keyring.load();
        match wire::open_owned(&ring, &self.cluster_name, sealed, fresh, grow) {
            Ok(m) => Some(m),
            Err(OpenError::Decrypt) => {
                add(&self.counters.rejected_decrypt, 1);
                None
            }
            Err(OpenError::Wire(wire::WireError::TooLarge)) => {
                add(&self.counters.oversized_bodies, 1);
                None
            }
            Err(OpenError::Wire(wire::WireError::OverBudget)) => {
                add(&self.counters.tcp_frames_refused, 1);
                None
            }
            Err(OpenError::Wire(_)) => {
                add(&self.counters.malformed, 1);
                None
            }
            Err(OpenError::Replay) => {
                add(&self.counters.rejected_replay, 1);
                None
            }
        }
    }

    // A place for an outbound exchange, or None (counted) when all are taken.
    fn outbound_slot(&self) -> Option<OwnedSemaphorePermit> {
        let slot = self.outbound.clone().try_acquire_owned().ok();
        if slot.is_none() {
            add(&self.counters.outbound_skipped, 1);
        }
        slot
    }

    // Opens a TCP frame whose buffer `grant` holds; the grant grows to hold the inflated body
    // too and is returned with the message, to be dropped once the body is consumed. Large
    // frames are opened on a blocking thread.
    async fn open_frame(
        self: &Arc<Self>,
        frame: Vec<u8>,
        mut grant: BufferGrant,
    ) -> Option<(Message, BufferGrant)> {
        let held = frame.capacity();
        let open = move |shared: &Shared| {
            let m = shared.open(frame, |cap| grant.grow(held + cap))?;
            Some((m, grant))
        };
        if held <= BLOCKING_OPEN_MIN {
            return open(self);
        }
        // Waiting here is bounded: every waiter holds a connection place and buffer budget.
        let _place = self.openers.clone().acquire_owned().await.ok()?;
        let shared = self.clone();
        tokio::task::spawn_blocking(move || open(&shared))
            .await
            .ok()
            .flatten()
    }

    // Reads one frame within `grant`'s budget: the frame and the share it holds, or None
    // (a refused length or budget is counted; I/O errors are the caller's timeout or the
    // peer's business).
    async fn read_frame<R: tokio::io::AsyncRead + Unpin>(
        &self,
        r: &mut R,
        len: usize,
        mut grant: BufferGrant,
    ) -> Option<(Vec<u8>, BufferGrant)> {
        match wire::read_frame_body(r, len, |cap| grant.grow(cap)).await {
            Ok(frame) => Some((frame, grant)),
            Err(e) => {
                if e.kind() == std::io::ErrorKind::OutOfMemory {
                    add(&self.counters.tcp_frames_refused, 1);
                }
                None
            }
        }
    }

    async fn read_frame_len<R: tokio::io::AsyncRead + Unpin>(
        &self,
        r: &mut R,
        max: usize,
    ) -> Option<usize> {
        match wire::read_frame_len(r, max).await {
            Ok(len) => Some(len),
            Err(e) => {
                if e.kind() == std::io::ErrorKind::InvalidData {
                    add(&self.counters.tcp_frames_refused, 1);
                }
                None
            }
        }
    }

    fn edit_keyring(
        &self,
        f: impl FnOnce(&mut Keyring) -> Result<(), super::KeyError>,
    ) -> Result<(), ClusterError> {
        let _guard = self.keyring_edit.lock().unwrap_or_else(|e| e.into_inner());
        let mut ring = Keyring::clone(&self.keyring.load());
        f(&mut ring)?;
        self.keyring.store(Arc::new(ring));
        Ok(())
    }

    // One sealed request and its opened reply (a frame of at most `max_reply` bytes, held in
    // the replies' budget by the returned grant) over a fresh TCP connection, counted, within
    // `limit`; `None` on any failure (unreachable, timeout, closed early, refused reply).
    async fn round_trip(
        self: &Arc<Self>,
        to: SocketAddr,
        sealed: &[u8],
        limit: Duration,
        max_reply: usize,
    ) -> Option<(Message, BufferGrant)> {
        let run = async {
            let mut stream = TcpStream::connect(to).await.ok()?;
            wire::write_frame(&mut stream, sealed).await.ok()?;
            add(&self.counters.tcp_sent, 1);
            add(&self.counters.bytes_sent, sealed.len() + 4);
            let len = self.read_frame_len(&mut stream, max_reply).await?;
            let grant = self.replies.grant(None);
            let (reply, grant) = self.read_frame(&mut stream, len, grant).await?;
            add(&self.counters.tcp_received, 1);
            add(&self.counters.bytes_received, reply.len() + 4);
            self.open_frame(reply, grant).await
        };
        timeout(limit, run).await.ok().flatten()
    }

    // One push-pull exchange over TCP: the reply's body and the budget it holds; `None` on any
    // failure (no outbound slot, unreachable, timeout, bad reply).
    async fn exchange(
        self: &Arc<Self>,
        to: SocketAddr,
        body: &[u8],
    ) -> Option<(Vec<u8>, BufferGrant)> {
        let slot = self.outbound_slot()?;
        self.exchange_in(slot, to, body).await
    }

    // [`Shared::exchange`] in an outbound slot already taken (and held until it ends).
    async fn exchange_in(
        self: &Arc<Self>,
        _slot: OwnedSemaphorePermit,
        to: SocketAddr,
        body: &[u8],
    ) -> Option<(Vec<u8>, BufferGrant)> {
        let sealed = self.seal(Kind::PushPull, body);
        match self
            .round_trip(to, &sealed, STREAM_TIMEOUT, wire::MAX_FRAME)
            .await?
        {
            (
                Message {
                    kind: Kind::PushPullReply,
                    body,
                    ..
                },
                held,
            ) => Some((body, held)),
            _ => {
                add(&self.counters.malformed, 1);
                None
            }
        }
    }

    // Asks `from` for a blob (see the blobs module for the exchange). Unlike gossip, a fetch
    // waits (within the stream timeout) for an outbound slot.
    async fn fetch_blob(
        self: &Arc<Self>,
        from: SocketAddr,
        key: &BlobKey,
    ) -> Result<Vec<u8>, BlobError> {
        let _slot = timeout(STREAM_TIMEOUT, self.outbound.clone().acquire_owned())
            .await
            .ok()
            .and_then(Result::ok)
            .ok_or(BlobError::Unreachable(from))?;
        let sealed = self.seal(Kind::BlobGet, key);
        let (reply, _held) = self
            .round_trip(from, &sealed, STREAM_TIMEOUT, wire::MAX_FRAME)
            .await
            .ok_or(BlobError::Unreachable(from))?;
        let parsed = match reply {
            Message {
                kind: Kind::Blob,
                body,
                ..
            } => blobs::parse_reply(&body),
            _ => None,
        };
        match parsed {
            Some(Some(bytes)) => Ok(bytes),
            Some(None) => Err(BlobError::NotFound(from)),
            None => {
                add(&self.counters.malformed, 1);
                Err(BlobError::Unreachable(from))
            }
        }
    }

    // Sends foca's ping over TCP and returns the ack it gets back within `within`.
    async fn probe(
        self: &Arc<Self>,
        to: SocketAddr,
        ping: &[u8],
        within: Duration,
    ) -> Option<Vec<u8>> {
        let _slot = self.outbound_slot()?;
        add(&self.counters.probe_fallbacks, 1);
        let sealed = self.seal(Kind::Probe, ping);
        // An ack is a foca packet: it fits the largest datagram once sealed.
        let (reply, _held) = self
            .round_trip(to, &sealed, within, wire::MAX_UDP_PAYLOAD)
            .await?;
        match reply {
            Message {
                kind: Kind::ProbeAck,
                body,
                ..
            } => {
                add(&self.counters.probe_fallback_acks, 1);
                Some(body)
            }
            _ => {
                add(&self.counters.malformed, 1);
                None
            }
        }
    }

    // Sends a message too large for a datagram as a one-way frame.
    async fn send_frame(&self, to: SocketAddr, sealed: Vec<u8>) {
        let Some(_slot) = self.outbound_slot() else {
            return;
        };
        let run = async {
            let mut stream = TcpStream::connect(to).await.ok()?;
            wire::write_frame(&mut stream, &sealed).await.ok()
        };
        if timeout(STREAM_TIMEOUT, run).await.ok().flatten().is_some() {
            add(&self.counters.tcp_sent, 1);
            add(&self.counters.bytes_sent, sealed.len() + 4);
        }
    }
}

pub(crate) enum Command {
    SetMeta(NodeMeta),
    Leave(oneshot::Sender<()>),
    // The keyring was edited through the handle: publish and persist it.
    KeyringChanged,
    // The rotation this member coordinates (None: none any more).
    Rotate(Option<Rotation>),
    SetPeers(Vec<String>),
}

// What reaches the driver. A body that came over TCP travels with the buffer budget it
// holds, given back once the driver has handled it.
enum Inbound {
    Packet(Vec<u8>, BufferGrant),
    Stream {
        kind: Kind,
        body: Vec<u8>,
        held: BufferGrant,
        reply: oneshot::Sender<Option<Vec<u8>>>,
    },
    // The reply to our request `id`, read on the stream we opened to `from`.
    StreamReply {
        from: SocketAddr,
        id: u64,
        body: Vec<u8>,
        held: BufferGrant,
    },
    Seeds(Vec<SocketAddr>),
}

/// Entry point of the gossip runtime.
#[derive(Debug)]
pub struct Cluster;

/// A handle to a running cluster member. Cheap to clone; the member keeps running while any
/// handle exists, and stops silently (no leave announcement — other members will declare it
/// down) when the last one is dropped. Call [`ClusterHandle::leave`] for a graceful exit.
#[derive(Clone)]
pub struct ClusterHandle {
    pub(crate) shared: Arc<Shared>,
    pub(crate) commands: mpsc::UnboundedSender<Command>,
    changes: watch::Receiver<u64>,
}

impl std::fmt::Debug for ClusterHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterHandle")
            .field("gossip_addr", &self.shared.gossip_addr)
            .finish()
    }
}

impl ClusterHandle {
    /// Every member whose metadata is known, this node first, as of the last change.
    pub fn members(&self) -> Vec<MemberInfo> {
        self.shared.members.load().as_ref().clone()
    }

    /// The same snapshot without copying it.
    pub fn members_snapshot(&self) -> Arc<Vec<MemberInfo>> {
        self.shared.members.load_full()
    }

    /// A counter bumped whenever a member joins, changes state (Suspect included), changes
    /// metadata or goes away. Await `changed()` on it, then read [`ClusterHandle::members`].
    pub fn changes(&self) -> watch::Receiver<u64> {
        self.changes.clone()
    }

    /// Replaces this node's metadata and spreads it to the cluster.
    pub fn set_meta(&self, meta: NodeMeta) -> Result<(), ClusterError> {
        self.commands
            .send(Command::SetMeta(meta))
            .map_err(|_| ClusterError::Stopped)
    }

    /// Announces a graceful departure (others see this node as Left), then stops the member.
    /// Returns once the announcement was sent (bounded by a few seconds).
    pub async fn leave(&self) -> Result<(), ClusterError> {
        let (tx, rx) = oneshot::channel();
        self.commands
            .send(Command::Leave(tx))
            .map_err(|_| ClusterError::Stopped)?;
        rx.await.map_err(|_| ClusterError::Stopped)
    }

    /// Adds a decryption key (base64) on this member only (see [`ClusterHandle::rotate_key`]
    /// for the whole cluster). Written back to the key file, if any.
    pub fn keyring_install(&self, key: &str) -> Result<(), ClusterError> {
        self.refuse_during_rotation()?;
        self.shared.edit_keyring(|r| r.install(key))?;
        self.keyring_changed()
    }

    /// Makes an installed key the one that encrypts, on this member only.
    pub fn keyring_use(&self, key: &str) -> Result<(), ClusterError> {
        self.refuse_during_rotation()?;
        self.shared.edit_keyring(|r| r.use_key(key))?;
        self.keyring_changed()
    }

    /// Removes a key on this member only; the primary key cannot be removed.
    pub fn keyring_remove(&self, key: &str) -> Result<(), ClusterError> {
        self.refuse_during_rotation()?;
        self.shared.edit_keyring(|r| r.remove(key))?;
        self.keyring_changed()
    }

    /// Whether a key rotation runs on this node: it coordinates one, or follows one another
    /// member announces.
    pub fn rotation_running(&self) -> bool {
        self.shared.coordinating.load(Ordering::Acquire)
            || rotation::winning(&self.members_snapshot()).is_some()
    }

    // A key change by hand (API, reload) in the middle of a rotation would undo its steps.
    fn refuse_during_rotation(&self) -> Result<(), ClusterError> {
        if self.rotation_running() {
            return Err(ClusterError::Busy(
                "keys cannot be changed by hand meanwhile (the rotation would undo the change, or the change would break the rotation); wait for the rotation to end (GET /api/cluster shows the keys), then try again".into(),
            ));
        }
        Ok(())
    }

    fn keyring_changed(&self) -> Result<(), ClusterError> {
        self.commands
            .send(Command::KeyringChanged)
            .map_err(|_| ClusterError::Stopped)
    }

    /// Whether keyring changes are written back to a key file.
    pub fn keys_persisted(&self) -> bool {
        self.shared.key_file.is_some()
    }

    /// Replaces the seeds retried while no member is reachable (a reload of `peers`).
    pub fn set_peers(&self, peers: Vec<String>) -> Result<(), ClusterError> {
        self.commands
            .send(Command::SetPeers(peers))
            .map_err(|_| ClusterError::Stopped)
    }

    /// Waits until the member stops. Returns why when it stopped on its own: it gave its name
    /// up to an older member ([`ClusterError::NameConflict`], see [`crate::names`]).
    pub async fn stopped(&self) -> Option<ClusterError> {
        self.commands.closed().await;
        self.refusal()
    }

    /// Why the member stopped on its own, if it did.
    pub fn refusal(&self) -> Option<ClusterError> {
        self.shared
            .refusal
            .get()
            .map(|(name, other)| ClusterError::NameConflict {
                name: name.clone(),
                this: self.shared.gossip_addr,
                other: *other,
            })
    }

    /// Installed keys (base64), primary first.
    pub fn keys(&self) -> Vec<String> {
        self.shared.keyring.load().keys_base64()
    }

    /// Transport counters.
    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        Stats {
            udp_sent: get(&c.udp_sent),
            udp_received: get(&c.udp_received),
            tcp_sent: get(&c.tcp_sent),
            tcp_received: get(&c.tcp_received),
            bytes_sent: get(&c.bytes_sent),
            bytes_received: get(&c.bytes_received),
            rejected_decrypt: get(&c.rejected_decrypt),
            malformed: get(&c.malformed),
            oversized_bodies: get(&c.oversized_bodies),
            inbound_dropped: get(&c.inbound_dropped),
            udp_oversized: get(&c.udp_oversized),
            rejected_replay: get(&c.rejected_replay),
            tcp_refused: get(&c.tcp_refused),
            tcp_timeouts: get(&c.tcp_timeouts),
            tcp_frames_refused: get(&c.tcp_frames_refused),
            outbound_skipped: get(&c.outbound_skipped),
            probe_fallbacks: get(&c.probe_fallbacks),
            probe_fallback_acks: get(&c.probe_fallback_acks),
            metadata_refused: get(&c.metadata_refused),
            unknown_skipped: get(&c.unknown_skipped),
            tcp_buffer_bytes: (self.shared.buffers.held() + self.shared.replies.held()) as u64,
            duplicate_names: get(&c.duplicate_names),
            key_file_errors: get(&c.key_file_errors),
        }
    }

    /// The timings in use now: they follow the live member count and local health.
    pub fn tuning(&self) -> Tuning {
        **self.shared.tuning.load()
    }

    /// The address other members reach this one at.
    pub fn gossip_addr(&self) -> SocketAddr {
        self.shared.gossip_addr
    }

    /// The blobs this member serves to the others (see [`crate::blobs`]).
    pub fn blobs(&self) -> &BlobStore {
        &self.shared.blobs
    }

    /// Fetches the blob under `key` from the member at `from` (its gossip address). The bytes
    /// are whatever that member holds under the key: check them before use.
    pub async fn fetch_blob(&self, from: SocketAddr, key: &BlobKey) -> Result<Vec<u8>, BlobError> {
        if from == self.shared.gossip_addr {
            return self
                .shared
                .blobs
                .get(key)
                .map(|b| b.to_vec())
                .ok_or(BlobError::NotFound(from));
        }
        self.shared.fetch_blob(from, key).await
    }

    /// Whether the member is still running (false after `leave` or a crash of its task).
    pub fn is_running(&self) -> bool {
        !self.commands.is_closed()
    }
}

// Binds TCP and UDP on the same port; with port 0 the kernel's choice for TCP may be taken
// for UDP, so try a few times.
async fn bind(addr: SocketAddr) -> Result<(TcpListener, UdpSocket), ClusterError> {
    let io = |source| ClusterError::Io { addr, source };
    let mut last = None;
    for _ in 0..if addr.port() == 0 { 16 } else { 1 } {
        let tcp = TcpListener::bind(addr).await.map_err(io)?;
        let port = tcp.local_addr().map_err(io)?.port();
        match UdpSocket::bind(SocketAddr::new(addr.ip(), port)).await {
            Ok(udp) => return Ok((tcp, udp)),
            Err(e) => last = Some(e),
        }
    }
    Err(io(last.unwrap_or_else(|| {
        std::io::Error::other("could not bind UDP")
    })))
}

async fn resolve(peers: &[String], own: SocketAddr) -> Vec<SocketAddr> {
    let mut out = Vec::new();
    for p in peers {
        if let Ok(Ok(addrs)) =
            timeout(Duration::from_secs(2), tokio::net::lookup_host(p.as_str())).await
        {
            out.extend(addrs.filter(|a| *a != own));
        }
    }
    out.dedup();
    out
}

fn seed_backoff(profile: Profile) -> (Duration, Duration) {
    match profile {
        Profile::Local => (Duration::from_millis(100), Duration::from_secs(2)),
        Profile::Lan => (Duration::from_secs(1), Duration::from_secs(30)),
        Profile::Wan => (Duration::from_secs(2), Duration::from_secs(60)),
    }
}

impl Cluster {
    /// Binds the transports, joins through `config.peers` and runs the member in the
    /// background.
    ///
    /// Before announcing itself, the node pulls the members (with digests and names) from a
    /// seed (retrying for up to 2 s with the Local profile, 5 s LAN, 10 s WAN) and fails with
    /// [`ClusterError::NameConflict`] if a live member at another address has the same name.
    /// When no seed answers in that time it starts anyway and keeps retrying the seeds with
    /// exponential backoff — also later, whenever it loses every peer.
    pub async fn start(
        config: ClusterConfig,
        meta: NodeMeta,
    ) -> Result<ClusterHandle, ClusterError> {
        let keyring = Keyring::from_base64(&config.keys)?;
        if config.cluster_name.is_empty() {
            return Err(ClusterError::Config(
                "the cluster name must not be empty".into(),
            ));
        }
        if meta.name.is_empty() {
            return Err(ClusterError::Config(
                "the node name must not be empty".into(),
            ));
        }
        config.transport.validate().map_err(ClusterError::Config)?;
        let (tcp, udp) = bind(config.bind_addr).await?;
        let bound = udp.local_addr().map_err(|source| ClusterError::Io {
            addr: config.bind_addr,
            source,
        })?;
        let gossip_addr = config.advertise_addr.unwrap_or(bound);
        if gossip_addr.ip().is_unspecified() {
            return Err(ClusterError::Config(format!(
                "bound to {bound}: set advertise_addr to an address other members can reach"
            )));
        }
        let shared = Arc::new(Shared {
            cluster_name: config.cluster_name.clone(),
            compression: config.compression,
            keyring: ArcSwap::from_pointee(keyring),
            keyring_edit: Mutex::new(()),
            members: ArcSwap::from_pointee(Vec::new()),
            tuning: ArcSwap::from_pointee(Tuning::default()),
            counters: Counters::default(),
            gossip_addr,
            blobs: BlobStore::default(),
            transport: config.transport,
            session: rand::random(),
            sealed: AtomicU64::new(0),
            replay: Mutex::new(ReplayGuard::default()),
            inbound: InboundSlots::new(
                config.transport.tcp_max_connections,
                config.transport.tcp_max_connections_per_addr,
            ),
            buffers: BufferBudget::new(INBOUND_BUFFER_BUDGET, INBOUND_BUFFER_PER_SOURCE),
            replies: BufferBudget::new(REPLY_BUFFER_BUDGET, REPLY_BUFFER_BUDGET),
            openers: Arc::new(Semaphore::new(OPENERS)),
            outbound: Arc::new(Semaphore::new(config.transport.max_outbound_streams)),
            refusal: OnceLock::new(),
            key_file: config.key_file.clone(),
            coordinating: AtomicBool::new(false),
        });

        let (mut foca_cfg, push_pull) = profile_settings(config.profile, config.expected_size);
        foca_cfg.remove_down_after = Some(config.forget_after);
        foca_cfg.max_packet_size = foca_packet_size(config.transport.udp_payload_size);
        // A restarted node must outrank its previous identity, whatever the clock did.
        let (generation, state_usable) = persist::start_generation(
            config.state_file.as_deref(),
            config.state_file_optional,
            crate::clock::wall_ms(),
        )?;
        let id = NodeId {
            addr: gossip_addr,
            generation,
        };
        let base_meta = meta.clone();
        let mut meta = meta;
        meta.extensions.insert(
            rotation::EXTENSION.to_string(),
            KeyringState::of_ring(&shared.keyring.load(), None, 0, None).encode(),
        );
        let mut node = Node::new(
            id,
            meta.clone(),
            foca_cfg,
            push_pull,
            config.expected_size,
            rand::random(),
            now_ms(),
        );

        let seeds = join_check(&shared, &config, &meta, &mut node).await?;
        node.join(&seeds);
        // Publish before returning so that members() is never empty, even before the first turn.
        node.refresh(now_ms());
        shared.members.store(Arc::new(node.members()));
        shared.tuning.store(Arc::new(node.tuning()));

        let (in_tx, in_rx) = mpsc::channel(1024);
        let (cmd_tx, cmd_rx) = mpsc::unbounded_channel();
        let (changes_tx, changes_rx) = watch::channel(0u64);
        let udp = Arc::new(udp);
        let io_tasks = vec![
            tokio::spawn(udp_receiver(shared.clone(), udp.clone(), in_tx.clone())),
            tokio::spawn(tcp_acceptor(shared.clone(), tcp, in_tx.clone())),
        ];
        let driver = Driver {
            shared: shared.clone(),
            node,
            udp,
            in_tx,
            timers: BinaryHeap::new(),
            timer_seq: 0,
            peers: config.peers.clone(),
            backoff: seed_backoff(config.profile),
            next_seed_try: Instant::now() + seed_backoff(config.profile).0,
            seed_delay: seed_backoff(config.profile).0,
            changes: changes_tx,
            dropped_seen: 0,
            base_meta,
            rotation: None,
            applied: (0, Phase::Install),
            state_file: config.state_file.clone().filter(|_| state_usable),
            persist_error: None,
            clashes_seen: std::collections::HashSet::new(),
        };
        tokio::spawn(driver.run(cmd_rx, in_rx, io_tasks));
        Ok(ClusterHandle {
            shared,
            commands: cmd_tx,
            changes: changes_rx,
        })
    }
}

// Pulls the state from a seed and checks the name; returns the resolved seeds.
async fn join_check(
    shared: &Arc<Shared>,
    config: &ClusterConfig,
    meta: &NodeMeta,
    node: &mut Node,
) -> Result<Vec<SocketAddr>, ClusterError> {
    if config.peers.is_empty() {
        return Ok(Vec::new());
    }
    let limit = match config.profile {
        Profile::Local => Duration::from_secs(2),
        Profile::Lan => Duration::from_secs(5),
        Profile::Wan => Duration::from_secs(10),
    };
    let deadline = Instant::now() + limit;
    let (mut delay, max) = seed_backoff(config.profile);
    let empty = PushPullState::default().encode();
    let mut seeds = Vec::new();
    while Instant::now() < deadline {
        seeds = resolve(&config.peers, shared.gossip_addr).await;
        for seed in &seeds {
            let left = deadline.saturating_duration_since(Instant::now());
            let Ok(Some((reply, _held))) = timeout(left, shared.exchange(*seed, &empty)).await
            else {
                continue;
            };
            let Some(state) = PushPullState::decode(&reply) else {
                continue;
            };
            if let Some(other) = state.name_taken(&meta.name, shared.gossip_addr) {
                return Err(ClusterError::NameConflict {
                    name: meta.name.clone(),
                    this: shared.gossip_addr,
                    other,
                });
            }
            node.apply_state(state, true);
            return Ok(seeds);
        }
        tokio::time::sleep(delay.min(deadline.saturating_duration_since(Instant::now()))).await;
        delay = (delay * 2).min(max);
    }
    tracing::warn!(peers = ?config.peers, "no cluster seed answered; starting alone and retrying in the background");
    Ok(seeds)
}

async fn udp_receiver(shared: Arc<Shared>, udp: Arc<UdpSocket>, tx: mpsc::Sender<Inbound>) {
    // Datagrams up to the largest allowed size are accepted whatever this node sends
    // (udp_payload_size applies to sending), so the setting can change one node at a time.
    // One byte more: a longer datagram is truncated to this, which is how we tell it was too
    // long.
    let max = wire::MAX_UDP_PAYLOAD;
    let mut buf = vec![0u8; max + 1];
    loop {
        let Ok((n, _from)) = udp.recv_from(&mut buf).await else {
            // ICMP errors surface here on some platforms; they say nothing about the socket.
            continue;
        };
        add(&shared.counters.udp_received, 1);
        add(&shared.counters.bytes_received, n);
        if n > max {
            add(&shared.counters.udp_oversized, 1);
            continue;
        }
        match shared.open(buf[..n].to_vec(), |_| true) {
            Some(Message {
                kind: Kind::Foca,
                body,
                ..
            }) => {
                // Under overload drop rather than queue without bound: SWIM tolerates loss.
                match tx.try_send(Inbound::Packet(body, BufferGrant::default())) {
                    Err(mpsc::error::TrySendError::Closed(_)) => return,
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        add(&shared.counters.inbound_dropped, 1)
                    }
                    Ok(()) => {}
                }
            }
            Some(_) => add(&shared.counters.malformed, 1),
            None => {}
        }
    }
}

async fn tcp_acceptor(shared: Arc<Shared>, listener: TcpListener, tx: mpsc::Sender<Inbound>) {
    loop {
        let Ok((stream, from)) = listener.accept().await else {
            // Out of file descriptors and the like: back off instead of spinning.
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        // Refused connections are closed at once (dropped here), before any task or buffer.
        let Some(slot) = shared.inbound.take(from.ip()) else {
            add(&shared.counters.tcp_refused, 1);
            continue;
        };
        let grant = shared.buffers.grant(Some(from.ip()));
        tokio::spawn(serve_stream(
            shared.clone(),
            stream,
            tx.clone(),
            slot,
            grant,
        ));
    }
}

async fn serve_stream(
    shared: Arc<Shared>,
    mut stream: TcpStream,
    tx: mpsc::Sender<Inbound>,
    _slot: InboundSlot,
    grant: BufferGrant,
) {
    let started = Instant::now();
    let Ok(len) = timeout(
        HEADER_TIMEOUT,
        shared.read_frame_len(&mut stream, wire::MAX_FRAME),
    )
    .await
    else {
        add(&shared.counters.tcp_timeouts, 1);
        return;
    };
    let Some(len) = len else { return };
    let read = shared.read_frame(&mut stream, len, grant);
    let (frame, grant) = match timeout(STREAM_TIMEOUT.saturating_sub(started.elapsed()), read).await
    {
        Ok(Some(read)) => read,
        Ok(None) => return,
        Err(_) => {
            add(&shared.counters.tcp_timeouts, 1);
            return;
        }
    };
    let run = async {
        add(&shared.counters.tcp_received, 1);
        add(&shared.counters.bytes_received, frame.len() + 4);
        let (Message { kind, body, .. }, held) = shared.open_frame(frame, grant).await?;
        match kind {
            Kind::Foca => tx.send(Inbound::Packet(body, held)).await.ok(),
            Kind::PushPull | Kind::Probe => {
                let (reply_tx, reply_rx) = oneshot::channel();
                tx.send(Inbound::Stream {
                    kind,
                    body,
                    held,
                    reply: reply_tx,
                })
                .await
                .ok()?;
                let reply = reply_rx.await.ok()??;
                let reply_kind = if kind == Kind::Probe {
                    Kind::ProbeAck
                } else {
                    Kind::PushPullReply
                };
                let sealed = shared.seal(reply_kind, &reply);
                wire::write_frame(&mut stream, &sealed).await.ok()?;
                add(&shared.counters.tcp_sent, 1);
                add(&shared.counters.bytes_sent, sealed.len() + 4);
                Some(())
            }
            Kind::BlobGet => {
                let Some(reply) = shared.blobs.answer(&body) else {
                    add(&shared.counters.malformed, 1);
                    return None;
                };
                let sealed = shared.seal(Kind::Blob, &reply);
                wire::write_frame(&mut stream, &sealed).await.ok()?;
                add(&shared.counters.tcp_sent, 1);
                add(&shared.counters.bytes_sent, sealed.len() + 4);
                Some(())
            }
            Kind::PushPullReply | Kind::Blob | Kind::ProbeAck => {
                add(&shared.counters.malformed, 1);
                None
            }
        }
    };
    let _ = timeout(STREAM_TIMEOUT, run).await;
}

struct Scheduled {
    at: Instant,
    seq: u64,
    timer: NodeTimer,
}

impl PartialEq for Scheduled {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl Eq for Scheduled {}
impl PartialOrd for Scheduled {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Scheduled {
    // Reversed: BinaryHeap is a max-heap and we want the earliest timer on top.
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

struct Driver {
    shared: Arc<Shared>,
    node: Node,
    udp: Arc<UdpSocket>,
    in_tx: mpsc::Sender<Inbound>,
    timers: BinaryHeap<Scheduled>,
    timer_seq: u64,
    peers: Vec<String>,
    backoff: (Duration, Duration),
    next_seed_try: Instant,
    seed_delay: Duration,
    changes: watch::Sender<u64>,
    // inbound_dropped as last reported to the node's local health.
    dropped_seen: u64,
    // The metadata the owner set; the keyring extension is added on publishing.
    base_meta: NodeMeta,
    // The rotation this member coordinates.
    rotation: Option<Rotation>,
    // The highest rotation step applied to the keyring.
    applied: (u64, Phase),
    state_file: Option<PathBuf>,
    // Why the key file could not be written after the last keyring change, published in the
    // keyring state (a rotation does not go past its install phase meanwhile).
    persist_error: Option<String>,
    // Name clashes already counted and logged.
    clashes_seen: std::collections::HashSet<Clash>,
}

impl Driver {
    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command>,
        mut inbound: mpsc::Receiver<Inbound>,
        io_tasks: Vec<JoinHandle<()>>,
    ) {
        self.flush().await;
        loop {
            let next_timer = self
                .timers
                .peek()
                .map_or(Instant::now() + Duration::from_secs(3600), |t| t.at);
            let retry_seeds = !self.peers.is_empty() && !self.node.is_connected();
            let mut leaving = None;
            tokio::select! {
                cmd = commands.recv() => match cmd {
                    None => break,
                    Some(Command::SetMeta(meta)) => {
                        self.base_meta = meta;
                        self.publish_meta();
                    }
                    Some(Command::Leave(done)) => leaving = Some(done),
                    Some(Command::KeyringChanged) => {
                        self.persist_keys();
                        self.publish_meta();
                    }
                    Some(Command::Rotate(r)) => {
                        self.rotation = r;
                        self.follow_rotation();
                        self.publish_meta();
                    }
                    Some(Command::SetPeers(peers)) => {
                        self.peers = peers;
                        self.seed_delay = self.backoff.0;
                        self.next_seed_try = Instant::now();
                    }
                },
                Some(msg) = inbound.recv() => match msg {
                    // Each body's budget (`_held`) is given back at the end of its arm.
                    Inbound::Packet(body, _held) => self.node.handle_packet(&body),
                    Inbound::Stream { kind, body, held: _held, reply } => {
                        let _ = reply.send(self.node.handle_stream(kind, &body));
                    }
                    Inbound::StreamReply { from, id, body, held: _held } => {
                        self.node.handle_stream_reply(from, id, &body);
                    }
                    Inbound::Seeds(seeds) => self.node.join(&seeds),
                },
                _ = tokio::time::sleep_until(next_timer) => {
                    let now = Instant::now();
                    while self.timers.peek().is_some_and(|t| t.at <= now) {
                        let t = self.timers.pop().expect("peeked");
                        self.node.timer_lateness(now.saturating_duration_since(t.at));
                        self.node.handle_timer(t.timer);
                    }
                }
                _ = tokio::time::sleep_until(self.next_seed_try), if retry_seeds => {
                    self.seed_delay = (self.seed_delay * 2).min(self.backoff.1);
                    self.next_seed_try = Instant::now() + self.seed_delay;
                    let (peers, own, tx) = (self.peers.clone(), self.shared.gossip_addr, self.in_tx.clone());
                    tokio::spawn(async move {
                        let seeds = resolve(&peers, own).await;
                        if !seeds.is_empty() {
                            let _ = tx.send(Inbound::Seeds(seeds)).await;
                        }
                    });
                }
            }
            if let Some(done) = leaving.take() {
                self.node.leave();
                self.flush_leaving().await;
                // Closed before acknowledging, so is_running() is false once leave() returns.
                commands.close();
                let _ = done.send(());
                break;
            }
            self.flush().await;
            // This member gave its name up (another keeps it): leave, so the others see it go
            // at once, and stop.
            if self.shared.refusal.get().is_some() {
                self.node.leave();
                self.flush_leaving().await;
                commands.close();
                break;
            }
        }
        for t in io_tasks {
            t.abort();
        }
    }

    // Carries out the node's outputs and publishes membership changes.
    async fn flush(&mut self) {
        // A second round only when following a rotation changed our keyring state: that
        // state is news for the others at once.
        for _ in 0..2 {
            if !self.flush_once().await {
                break;
            }
        }
    }

    // One round of flush; returns whether our metadata changed meanwhile.
    async fn flush_once(&mut self) -> bool {
        for out in self.node.take_outputs() {
            match out {
                Output::Packet { to, body } => self.send_packet(to, &body).await,
                Output::PushPull { to, id, body } => {
                    // The slot first: a request that finds none is never sent, and the node is
                    // told so at once (it says nothing about the member it was for).
                    let Some(slot) = self.shared.outbound_slot() else {
                        self.node.request_not_sent(id);
                        continue;
                    };
                    let (shared, tx) = (self.shared.clone(), self.in_tx.clone());
                    tokio::spawn(async move {
                        if let Some((body, held)) = shared.exchange_in(slot, to, &body).await {
                            let reply = Inbound::StreamReply {
                                from: to,
                                id,
                                body,
                                held,
                            };
                            let _ = tx.send(reply).await;
                        }
                    });
                }
                Output::ProbeStream { to, body, within } => {
                    let (shared, tx) = (self.shared.clone(), self.in_tx.clone());
                    tokio::spawn(async move {
                        if let Some(ack) = shared.probe(to, &body, within).await {
                            let _ = tx.send(Inbound::Packet(ack, BufferGrant::default())).await;
                        }
                    });
                }
                Output::Timer { after, timer } => {
                    self.timer_seq += 1;
                    self.timers.push(Scheduled {
                        at: Instant::now() + after,
                        seq: self.timer_seq,
                        timer,
                    });
                }
            }
        }
        for e in self.node.take_events() {
            match e {
                Event::Idle => {
                    // Lost every peer: start over with the seeds, quickly.
                    self.seed_delay = self.backoff.0;
                    self.next_seed_try = Instant::now() + self.backoff.0;
                }
                Event::Active => self.seed_delay = self.backoff.0,
                Event::Rejoined => self.persist_generation(),
                _ => {}
            }
        }
        let dropped = self.shared.counters.inbound_dropped.load(Ordering::Relaxed);
        if dropped != self.dropped_seen {
            self.dropped_seen = dropped;
            self.node.inbound_dropped();
        }
        let errors = self.node.errors();
        let c = &self.shared.counters;
        c.metadata_refused.store(errors.refused, Ordering::Relaxed);
        c.unknown_skipped.store(errors.skipped, Ordering::Relaxed);
        if let Some(t) = self.node.take_tuning_change() {
            self.shared.tuning.store(Arc::new(t));
        }
        if !self.node.refresh(now_ms()) {
            return false;
        }
        self.shared.members.store(Arc::new(self.node.members()));
        self.changes.send_modify(|v| *v += 1);
        self.check_names();
        if self.follow_rotation() {
            self.publish_meta();
            return true;
        }
        false
    }

    // The owner's metadata plus this member's keyring state, to the node (which ignores an
    // unchanged one).
    fn publish_meta(&mut self) {
        let mut meta = self.base_meta.clone();
        let state = KeyringState::of_ring(
            &self.shared.keyring.load(),
            self.rotation.clone(),
            self.applied.0,
            self.persist_error.clone(),
        );
        meta.extensions
            .insert(rotation::EXTENSION.to_string(), state.encode());
        self.node.set_meta(meta);
    }

    // Applies the rotation step the cluster asks for now (ours or the highest an alive member
    // announces), once per step. Returns whether the keyring changed.
    fn follow_rotation(&mut self) -> bool {
        let members = self.shared.members.load();
        let theirs = rotation::winning(&members).map(|(r, by)| (r, by.gossip_addr));
        let ours = self.rotation.clone().map(|r| (r, self.shared.gossip_addr));
        let Some(r) = ours
            .into_iter()
            .chain(theirs)
            .max_by_key(|(r, by)| rotation::precedence(r, *by))
            .map(|(r, _)| r)
        else {
            return false;
        };
        if (r.id, r.phase) <= self.applied {
            return false;
        }
        self.applied = (r.id, r.phase);
        let mut changed = false;
        let result = self.shared.edit_keyring(|ring| {
            changed = rotation::apply(ring, &r)?;
            Ok(())
        });
        match result {
            Ok(()) => {
                tracing::info!(
                    rotation = r.id,
                    phase = r.phase.as_str(),
                    changed,
                    "key rotation: step applied"
                );
                if changed {
                    if self.shared.key_file.is_none() {
                        tracing::warn!(rotation = r.id, "key rotation: this node has no [cluster] key_file, so its new keys are kept in memory only; update the keys in its config before it restarts, or it comes back with the old key");
                    }
                    self.persist_keys();
                }
                changed
            }
            Err(e) => {
                tracing::warn!(rotation = r.id, error = %e, "key rotation: the announced key is unusable; ignoring this rotation");
                false
            }
        }
    }

    // Counts and logs name clashes once each; gives our name up when we are the newcomer.
    fn check_names(&mut self) {
        let members = self.shared.members.load();
        let clashes = names::clashes(&members);
        for c in &clashes {
            if !self.clashes_seen.insert(c.clone()) {
                continue;
            }
            add(&self.shared.counters.duplicate_names, 1);
            if c.newcomer == self.shared.gossip_addr {
                tracing::error!(name = %c.name, this = %c.newcomer, other = %c.incumbent, "another live member has this node's name and was there first; leaving the cluster. Give this node a unique [cluster] node_name");
                let _ = self.shared.refusal.set((c.name.clone(), c.incumbent));
            } else {
                tracing::warn!(name = %c.name, keeps = %c.incumbent, newcomer = %c.newcomer, "two live members have the same name; the newcomer should leave. Give each node a unique [cluster] node_name");
            }
        }
        // Forget clashes that ended, so a recurrence counts again.
        self.clashes_seen.retain(|c| clashes.contains(c));
    }

    fn persist_keys(&mut self) {
        let Some(path) = &self.shared.key_file else {
            return;
        };
        let keys = self.shared.keyring.load().keys_base64();
        match persist::write_key_file(path, &keys) {
            Ok(()) => {
                self.persist_error = None;
                tracing::info!(path = %path.display(), keys = keys.len(), "keyring written to the key file")
            }
            Err(e) => {
                self.persist_error = Some(e.to_string());
                add(&self.shared.counters.key_file_errors, 1);
                tracing::error!(error = %e, "the keyring changed but the key file could not be written; this node restarts with its old keys unless you fix the file");
            }
        }
    }

    fn persist_generation(&self) {
        if let Some(path) = &self.state_file {
            if let Err(e) = persist::write_generation(path, self.node.id().generation) {
                tracing::warn!(error = %e, path = %path.display(), "could not record the new identity generation after a rejoin, so a restart may come back under an older one that the cluster ignores; make [cluster] state_file writable");
            }
        }
    }

    // Like flush, but waits for the reliable leave push instead of spawning it.
    async fn flush_leaving(&mut self) {
        for out in self.node.take_outputs() {
            match out {
                Output::Packet { to, body } => self.send_packet(to, &body).await,
                Output::PushPull { to, body, .. } => {
                    let _ = self.shared.exchange(to, &body).await;
                }
                Output::Timer { .. } | Output::ProbeStream { .. } => {}
            }
        }
        self.node.refresh(now_ms());
        self.shared.members.store(Arc::new(self.node.members()));
        self.changes.send_modify(|v| *v += 1);
    }

    async fn send_packet(&self, to: SocketAddr, body: &[u8]) {
        let sealed = self.shared.seal(Kind::Foca, body);
        if sealed.len() <= self.shared.transport.udp_payload_size {
            if self.udp.send_to(&sealed, to).await.is_ok() {
                add(&self.shared.counters.udp_sent, 1);
                add(&self.shared.counters.bytes_sent, sealed.len());
            }
        } else {
            let shared = self.shared.clone();
            tokio::spawn(async move { shared.send_frame(to, sealed).await });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{generate_key, MemberState, Role, Service};

    use crate::testing::{config, eventually, member, state_of};

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn three_nodes_on_loopback() {
        let key = generate_key();
        let a = member(&key, &[], "a", Role::Proxy).await;
        let seed = [a.gossip_addr()];
        let mut b_meta = NodeMeta::new("b", Role::Backend);
        b_meta.services.push(Service {
            pool: "web".into(),
            addr: "127.0.0.1:9001".parse().expect("valid"),
            weight: 3,
            zone: None,
            tags: None,
        });
        let b = Cluster::start(config(&key, &seed), b_meta.clone())
            .await
            .expect("b starts");
        let c = member(&key, &seed, "c", Role::Backend).await;
        let mut changes = a.changes();

        for h in [&a, &b, &c] {
            eventually(10, "all three alive everywhere", || {
                ["a", "b", "c"]
                    .iter()
                    .all(|n| state_of(h, n) == Some(MemberState::Alive))
            })
            .await;
        }
        let mut seen = a
            .members()
            .into_iter()
            .find(|m| m.meta.name == "b")
            .expect("b known");
        // The runtime adds the keyring state it publishes (see crate::rotation).
        assert!(seen
            .meta
            .extensions
            .remove(crate::rotation::EXTENSION)
            .is_some());
        assert_eq!(
            (seen.meta, seen.gossip_addr),
            (b_meta.clone(), b.gossip_addr())
        );
        assert!(changes.has_changed().expect("a is running"));
        changes.mark_unchanged();

        // Metadata updates spread.
        b_meta.draining = true;
        b.set_meta(b_meta.clone()).expect("b is running");
        // Each member fetches b's new record from b on its own: wait on both views.
        for (h, what) in [(&a, "a sees b draining"), (&c, "c sees b draining")] {
            eventually(10, what, || {
                h.members()
                    .iter()
                    .any(|m| m.meta.name == "b" && m.meta.draining)
            })
            .await;
        }
        assert!(changes.has_changed().expect("a is running"));

        // The same name at another address is refused at start.
        match Cluster::start(config(&key, &seed), NodeMeta::new("b", Role::Backend)).await {
            Err(ClusterError::NameConflict { name, other, .. }) => {
                assert_eq!((name.as_str(), other), ("b", b.gossip_addr()));
            }
            other => panic!("expected a name conflict, got {other:?}"),
        }

        // A node with another key never gets in, and its packets are counted as rejected.
        let rejected_before = a.stats().rejected_decrypt;
        let stranger = Cluster::start(
            config(&generate_key(), &seed),
            NodeMeta::new("x", Role::Proxy),
        )
        .await
        .expect("starts alone");
        eventually(10, "a rejects the stranger's packets", || {
            a.stats().rejected_decrypt > rejected_before + 2
        })
        .await;
        assert_eq!(
            stranger.members().len(),
            1,
            "the stranger knows only itself"
        );
        assert!(a.members().iter().all(|m| m.meta.name != "x"));
        eventually(10, "the stranger's datagrams are rejected too", || {
            stranger.stats().udp_sent > 0
        })
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(
            stranger.members().len(),
            1,
            "still alone after its announces"
        );

        // A graceful leave is seen as Left, not Down.
        c.leave().await.expect("c leaves");
        assert!(!c.is_running());
        for h in [&a, &b] {
            eventually(10, "c left", || state_of(h, "c") == Some(MemberState::Left)).await;
        }
        // c's leave takes nobody else with it. With two members left, one stalled probe can
        // make b suspect for a moment (b refutes it), so this waits for Alive.
        eventually(10, "b stays alive", || {
            state_of(&a, "b") == Some(MemberState::Alive)
        })
        .await;
        let s = a.stats();
        assert!(
            s.udp_sent > 0 && s.udp_received > 0 && s.tcp_received > 0 && s.bytes_sent > 0,
            "{s:?}"
        );
    }

    #[tokio::test]
    async fn blobs_are_fetched_over_the_authenticated_transport() {
        let key = generate_key();
        let a = member(&key, &[], "a", Role::Proxy).await;
        let b = member(&key, &[a.gossip_addr()], "b", Role::Proxy).await;
        let bytes: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        a.blobs()
            .insert([7; 32], Arc::from(bytes.clone()))
            .expect("fits");
        assert_eq!(b.fetch_blob(a.gossip_addr(), &[7; 32]).await, Ok(bytes));
        assert_eq!(
            b.fetch_blob(a.gossip_addr(), &[8; 32]).await,
            Err(BlobError::NotFound(a.gossip_addr()))
        );
        // A member with another key gets no answer it can open.
        let stranger = Cluster::start(
            config(&generate_key(), &[]),
            NodeMeta::new("x", Role::Proxy),
        )
        .await
        .expect("starts alone");
        let rejected = a.stats().rejected_decrypt;
        assert_eq!(
            stranger.fetch_blob(a.gossip_addr(), &[7; 32]).await,
            Err(BlobError::Unreachable(a.gossip_addr()))
        );
        assert!(a.stats().rejected_decrypt > rejected);
    }

    #[tokio::test]
    async fn a_probe_reply_longer_than_a_datagram_is_refused_unread() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let h = Cluster::start(
            config(&generate_key(), &[]),
            NodeMeta::new("p", Role::Proxy),
        )
        .await
        .expect("starts");
        // A "member" that answers any frame with a 100 kB one.
        let fake = TcpListener::bind("127.0.0.1:0").await.expect("binds");
        let to = fake.local_addr().expect("bound");
        tokio::spawn(async move {
            let (mut s, _) = fake.accept().await.expect("dialled");
            let _ = wire::read_frame(&mut s).await;
            let _ = s.write_all(&100_000u32.to_be_bytes()).await;
            let _ = s.write_all(&[0u8; 1024]).await;
            let _ = s.read(&mut [0u8; 1]).await;
        });
        let before = h.stats();
        let ack = h.shared.probe(to, b"ping", STREAM_TIMEOUT).await;
        let after = h.stats();
        assert_eq!(ack, None);
        assert_eq!(
            (
                after.tcp_frames_refused - before.tcp_frames_refused,
                after.tcp_received - before.tcp_received,
                after.tcp_buffer_bytes
            ),
            (1, 0, 0),
            "{after:?}"
        );
    }

    #[tokio::test]
    async fn keyring_operations_through_the_handle() {
        let (k1, k2) = (generate_key(), generate_key());
        let h = member(&k1, &[], "k", Role::Proxy).await;
        h.keyring_install(&k2).expect("install");
        assert_eq!(h.keys(), [k1.clone(), k2.clone()]);
        assert!(matches!(
            h.keyring_remove(&k1),
            Err(ClusterError::Key(crate::KeyError::RemovePrimary))
        ));
        h.keyring_use(&k2).expect("use");
        h.keyring_remove(&k1).expect("remove the old primary");
        assert_eq!(h.keys(), [k2]);
        assert!(matches!(
            h.keyring_install("nope"),
            Err(ClusterError::Key(_))
        ));
    }
}
