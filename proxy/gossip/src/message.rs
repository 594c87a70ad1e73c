//! Versioned, extensible bodies of the gossip messages, and the metadata record.
//!
//! The envelope ([`crate::wire`]) says what kind of frame it is and seals it; this module says
//! what is inside the bodies the [`crate::node::Node`] exchanges: foca custom broadcasts (inside
//! SWIM packets) and the stream requests and replies that ride in [`crate::wire::Kind::PushPull`]
//! and [`crate::wire::Kind::PushPullReply`] frames.
//!
//! # Layout
//! ```text
//! body   = version (1 byte) | kind (1 byte) | field*
//! field  = tag (1 byte) | length (LEB128 varint) | value
//! ```
//! A value is either postcard (positional) for small shapes that never change (an address, a
//! number, a list of foca members) or a nested field list for structures that grow
//! ([`NodeMeta`], [`Service`], a metadata record).
//!
//! # Compatibility rules (what lets versions N and N+1 run in one cluster during an upgrade)
//! - A reader skips fields whose tag it does not know and uses defaults for fields that are
//!   absent, so a new version may *add* fields anywhere, nested ones included.
//! - A reader ignores messages whose kind it does not know: a broadcast of an unknown kind is
//!   neither applied nor relayed, a request of an unknown kind gets no reply (the sender's
//!   request times out), so a new version may add message kinds as long as they are optional.
//! - The version byte is the sender's [`BODY_VERSION`]; it is informational (readers never
//!   refuse a version). A change that old readers would misread — reusing a tag for another
//!   type, changing a positional value, making a new kind mandatory — is not allowed: add a new
//!   tag or kind instead, and retire the old one a version later.

use std::net::SocketAddr;

use foca::Member;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::node::{NodeId, SuspectVote};
use crate::{NodeMeta, Role, Service};

/// Version of the bodies this build writes.
pub const BODY_VERSION: u8 = 1;

/// Environment variable that makes a node behave as the *next* body version, for tests of a
/// mixed-version cluster only: it writes [`BODY_VERSION`] + 1, adds a field unknown to this
/// version to its metadata and each service, and sends messages of a kind unknown to this
/// version. Nothing else changes, so a cluster mixing such nodes with normal ones models an
/// upgrade in progress.
#[doc(hidden)]
pub const EMULATE_NEXT_VERSION_ENV: &str = "SLUICE_GOSSIP_TEST_NEXT_VERSION";

/// Message kinds.
pub(crate) mod kind {
    /// Broadcast: a member's metadata changed (a hint; the record is fetched from the member).
    pub const META_HINT: u8 = 1;
    /// Broadcast: a Lifeguard suspicion vote.
    pub const SUSPECT_VOTE: u8 = 2;
    /// Stream request and reply: foca members and metadata digests (push-pull).
    pub const STATE: u8 = 16;
    /// Stream request: the receiver's own metadata record.
    pub const GET_META: u8 = 17;
    /// Stream reply to [`GET_META`].
    pub const METAS: u8 = 18;
    /// A kind no version defines; what a node emulating the next version sends.
    pub const NEXT_VERSION_PROBE: u8 = 250;
}

// A field tag used only by a node emulating the next version (unknown to this one).
const NEXT_VERSION_TAG: u8 = 200;

/// Builds a field list.
#[derive(Debug, Default)]
pub(crate) struct Fields(Vec<u8>);

impl Fields {
    /// A body: version, kind, then fields added with [`Fields::put`] / [`Fields::raw`].
    pub(crate) fn body(kind: u8, next_version: bool) -> Fields {
        let version = if next_version {
            BODY_VERSION + 1
        } else {
            BODY_VERSION
        };
        Fields(vec![version, kind])
    }

    /// A field whose value is `v` in postcard.
    pub(crate) fn put<T: Serialize + ?Sized>(&mut self, tag: u8, v: &T) -> &mut Fields {
        let bytes =
            postcard::to_allocvec(v).expect("serializing plain data into a Vec cannot fail");
        self.raw(tag, &bytes)
    }

    /// A field whose value is `bytes` as they are (a nested field list).
    pub(crate) fn raw(&mut self, tag: u8, bytes: &[u8]) -> &mut Fields {
        self.0.push(tag);
        let mut n = bytes.len();
        loop {
            let b = (n & 0x7f) as u8;
            n >>= 7;
            if n == 0 {
                self.0.push(b);
                break;
            }
            self.0.push(b | 0x80);
        }
        self.0.extend_from_slice(bytes);
        self
    }

    pub(crate) fn into_bytes(self) -> Vec<u8> {
        self.0
    }
}

/// (tag, value) pairs of a field list, in order.
pub(crate) type FieldList<'a> = Vec<(u8, &'a [u8])>;

/// Splits a field list into (tag, value) pairs; `None` if it is truncated or malformed.
pub(crate) fn parse_fields(mut b: &[u8]) -> Option<FieldList<'_>> {
    let mut out = Vec::new();
    while let Some((&tag, rest)) = b.split_first() {
        b = rest;
        let mut len = 0usize;
        // At most 4 bytes of length: 256 MiB, far above any frame.
        for i in 0..4 {
            let (&byte, rest) = b.split_first()?;
            b = rest;
            len |= usize::from(byte & 0x7f) << (7 * i);
            if byte & 0x80 == 0 {
                break;
            }
            if i == 3 {
                return None;
            }
        }
        if b.len() < len {
            return None;
        }
        out.push((tag, &b[..len]));
        b = &b[len..];
    }
    Some(out)
}

/// Splits a body into (sender's version, kind, fields); `None` if it is malformed.
pub(crate) fn parse_body(b: &[u8]) -> Option<(u8, u8, FieldList<'_>)> {
    match b {
        [version, kind, rest @ ..] if *version > 0 => Some((*version, *kind, parse_fields(rest)?)),
        _ => None,
    }
}

fn get<T: DeserializeOwned>(v: &[u8]) -> Option<T> {
    postcard::from_bytes(v).ok()
}

fn role_code(r: Role) -> u8 {
    match r {
        Role::Proxy => 0,
        Role::Backend => 1,
    }
}

/// Encodes metadata as a nested field list.
pub fn encode_meta(m: &NodeMeta, next_version: bool) -> Vec<u8> {
    let mut f = Fields::default();
    f.put(1, &m.name).put(2, &role_code(m.role));
    if !m.zone.is_empty() {
        f.put(3, &m.zone);
    }
    if !m.tags.is_empty() {
        f.put(4, &m.tags);
    }
    for s in &m.services {
        f.raw(5, &encode_service(s, next_version));
    }
    if m.draining {
        f.put(6, &true);
    }
    if let Some(a) = &m.admin {
        f.put(7, a);
    }
    for (k, v) in &m.extensions {
        f.put(8, &(k, v));
    }
    if next_version {
        f.put(NEXT_VERSION_TAG, "a field of the next version");
    }
    f.into_bytes()
}

fn encode_service(s: &Service, next_version: bool) -> Vec<u8> {
    let mut f = Fields::default();
    f.put(1, &s.pool).put(2, &s.addr).put(3, &s.weight);
    if let Some(z) = &s.zone {
        f.put(4, z);
    }
    if let Some(t) = &s.tags {
        f.put(5, t);
    }
    if next_version {
        f.put(NEXT_VERSION_TAG, &7u32);
    }
    f.into_bytes()
}

/// Decodes metadata; unknown fields are skipped. `None` if a known field is malformed or the
/// name or role is missing (or the role is one this version does not know).
pub fn decode_meta(b: &[u8]) -> Option<NodeMeta> {
    let mut name = None;
    let mut role = None;
    let mut m = NodeMeta::new("", Role::Backend);
    for (tag, v) in parse_fields(b)? {
        match tag {
            1 => name = Some(get::<String>(v)?),
            2 => {
                role = Some(match get::<u8>(v)? {
                    0 => Role::Proxy,
                    1 => Role::Backend,
                    _ => return None,
                })
            }
            3 => m.zone = get(v)?,
            4 => m.tags = get(v)?,
            5 => m.services.push(decode_service(v)?),
            6 => m.draining = get(v)?,
            7 => m.admin = Some(get(v)?),
            8 => {
                let (k, val): (String, Vec<u8>) = get(v)?;
                m.extensions.insert(k, val);
            }
            _ => {}
        }
    }
    m.name = name?;
    m.role = role?;
    Some(m)
}

fn decode_service(b: &[u8]) -> Option<Service> {
    let (mut pool, mut addr, mut weight) = (None, None, 1);
    let (mut zone, mut tags) = (None, None);
    for (tag, v) in parse_fields(b)? {
        match tag {
            1 => pool = Some(get(v)?),
            2 => addr = Some(get(v)?),
            3 => weight = get(v)?,
            4 => zone = Some(get(v)?),
            5 => tags = Some(get(v)?),
            _ => {}
        }
    }
    Some(Service {
        pool: pool?,
        addr: addr?,
        weight,
        zone,
        tags,
    })
}

/// A member's metadata record as its owner publishes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Whose metadata (the owner's gossip address).
    pub addr: SocketAddr,
    /// The owner's identity generation when it was published.
    pub generation: u64,
    /// Bumped by every change at the owner.
    pub version: u64,
    /// The owner left the cluster gracefully.
    pub left: bool,
    /// The metadata.
    pub meta: NodeMeta,
}

impl Record {
    /// (generation, version): what orders records of one member.
    pub fn order(&self) -> (u64, u64) {
        (self.generation, self.version)
    }

    /// Its digest.
    pub fn digest(&self) -> Digest {
        Digest {
            addr: self.addr,
            generation: self.generation,
            version: self.version,
            left: self.left,
        }
    }

    fn encode(&self, next_version: bool) -> Vec<u8> {
        let mut f = Fields::default();
        f.put(1, &self.addr)
            .put(2, &self.generation)
            .put(3, &self.version)
            .put(4, &self.left)
            .raw(5, &encode_meta(&self.meta, next_version));
        f.into_bytes()
    }

    fn decode(b: &[u8]) -> Option<Record> {
        let (mut addr, mut generation, mut version, mut left, mut meta) =
            (None, None, None, false, None);
        for (tag, v) in parse_fields(b)? {
            match tag {
                1 => addr = Some(get(v)?),
                2 => generation = Some(get(v)?),
                3 => version = Some(get(v)?),
                4 => left = get(v)?,
                5 => meta = Some(decode_meta(v)?),
                _ => {}
            }
        }
        Some(Record {
            addr: addr?,
            generation: generation?,
            version: version?,
            left,
            meta: meta?,
        })
    }
}

/// What a push-pull carries about one record instead of the record itself: enough to tell
/// whether the receiver's copy is older. Positional (postcard); a later version that needs
/// more per record adds a new field to the state, not to this struct.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Digest {
    /// Whose record.
    pub addr: SocketAddr,
    /// The owner's generation.
    pub generation: u64,
    /// The record's version.
    pub version: u64,
    /// The owner left gracefully.
    pub left: bool,
}

impl Digest {
    /// (generation, version): what orders records of one member.
    pub fn order(&self) -> (u64, u64) {
        (self.generation, self.version)
    }
}

/// A custom broadcast.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Broadcast {
    /// A member's record changed: fetch it from the member.
    Hint(Digest),
    /// A suspicion vote.
    Vote(SuspectVote),
    /// A kind this version does not know: skipped, not relayed.
    Unknown,
}

impl Broadcast {
    pub(crate) fn encode(&self, next_version: bool) -> Vec<u8> {
        match self {
            Broadcast::Hint(d) => {
                let mut f = Fields::body(kind::META_HINT, next_version);
                f.put(1, &d.addr)
                    .put(2, &d.generation)
                    .put(3, &d.version)
                    .put(4, &d.left);
                f.into_bytes()
            }
            Broadcast::Vote(v) => {
                let mut f = Fields::body(kind::SUSPECT_VOTE, next_version);
                f.put(1, v);
                f.into_bytes()
            }
            Broadcast::Unknown => {
                let mut f = Fields::body(kind::NEXT_VERSION_PROBE, next_version);
                f.put(1, "a broadcast of the next version");
                f.into_bytes()
            }
        }
    }

    pub(crate) fn decode(b: &[u8]) -> Option<Broadcast> {
        let (_, k, fields) = parse_body(b)?;
        match k {
            kind::META_HINT => {
                let (mut addr, mut generation, mut version, mut left) = (None, None, None, false);
                for (tag, v) in fields {
                    match tag {
                        1 => addr = Some(get(v)?),
                        2 => generation = Some(get(v)?),
                        3 => version = Some(get(v)?),
                        4 => left = get(v)?,
                        _ => {}
                    }
                }
                Some(Broadcast::Hint(Digest {
                    addr: addr?,
                    generation: generation?,
                    version: version?,
                    left,
                }))
            }
            kind::SUSPECT_VOTE => {
                let v = fields.iter().find(|(t, _)| *t == 1)?.1;
                Some(Broadcast::Vote(get(v)?))
            }
            _ => Some(Broadcast::Unknown),
        }
    }
}

/// A push-pull state: foca's members, digests of the metadata records, and optionally the
/// sender's own record and the names of the members.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PushPullState {
    /// Every member foca knows, with incarnation and state (the sender included).
    pub members: Vec<Member<NodeId>>,
    /// A digest of every record the sender holds.
    pub digests: Vec<Digest>,
    /// Records carried in full: only the sender's own, which a receiver accepts only when it
    /// opened the stream to the sender (see [`crate::node`], "Ownership").
    pub records: Vec<Record>,
    /// Names of the active members, in the reply to a pull with no members of its own (a
    /// joining node checks that its name is free).
    pub names: Vec<(SocketAddr, String)>,
}

impl PushPullState {
    /// Decodes a state received in a push-pull message.
    pub fn decode(body: &[u8]) -> Option<PushPullState> {
        match StreamMessage::decode(body)? {
            StreamMessage::State { state, .. } => Some(state),
            _ => None,
        }
    }

    /// Encodes this state as a push-pull request (an empty state is a pure pull).
    pub fn encode(&self) -> Vec<u8> {
        StreamMessage::State {
            id: 0,
            state: self.clone(),
        }
        .encode(false)
    }

    /// The address of a live member (other than `self_addr`) already using `name`, if any.
    pub fn name_taken(&self, name: &str, self_addr: SocketAddr) -> Option<SocketAddr> {
        self.names.iter().find_map(|(addr, n)| {
            let active = self
                .members
                .iter()
                .any(|m| m.id().addr == *addr && m.state() != foca::State::Down);
            (n == name && *addr != self_addr && active).then_some(*addr)
        })
    }
}

/// A message on a stream (inside a push-pull frame).
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum StreamMessage {
    /// A push-pull request, or its reply (same id).
    State { id: u64, state: PushPullState },
    /// "Send me your own record."
    GetMeta { id: u64 },
    /// The reply to [`StreamMessage::GetMeta`].
    Metas { id: u64, records: Vec<Record> },
    /// A kind this version does not know.
    Unknown,
}

impl StreamMessage {
    pub(crate) fn encode(&self, next_version: bool) -> Vec<u8> {
        let f = match self {
            StreamMessage::State { id, state } => {
                let mut f = Fields::body(kind::STATE, next_version);
                f.put(1, id).put(2, &state.members).put(3, &state.digests);
                if !state.names.is_empty() {
                    f.put(4, &state.names);
                }
                for r in &state.records {
                    f.raw(5, &r.encode(next_version));
                }
                f
            }
            StreamMessage::GetMeta { id } => {
                let mut f = Fields::body(kind::GET_META, next_version);
                f.put(1, id);
                f
            }
            StreamMessage::Metas { id, records } => {
                let mut f = Fields::body(kind::METAS, next_version);
                f.put(1, id);
                for r in records {
                    f.raw(5, &r.encode(next_version));
                }
                f
            }
            StreamMessage::Unknown => {
                let mut f = Fields::body(kind::NEXT_VERSION_PROBE, next_version);
                f.put(1, "a request of the next version");
                f
            }
        };
        f.into_bytes()
    }

    pub(crate) fn decode(b: &[u8]) -> Option<StreamMessage> {
        let (_, k, fields) = parse_body(b)?;
        // The kind first: another version's kind may use these tags for other things.
        if ![kind::STATE, kind::GET_META, kind::METAS].contains(&k) {
            return Some(StreamMessage::Unknown);
        }
        let mut id = 0;
        let mut state = PushPullState::default();
        for (tag, v) in &fields {
            match tag {
                1 => id = get(v)?,
                2 => state.members = get(v)?,
                3 => state.digests = get(v)?,
                4 => state.names = get(v)?,
                // A record this version cannot read is left out, not the whole reply with it:
                // the others still count, and that member's digest still leads to a fetch.
                5 => state.records.extend(Record::decode(v)),
                _ => {}
            }
        }
        Some(match k {
            kind::STATE => StreamMessage::State { id, state },
            kind::GET_META => StreamMessage::GetMeta { id },
            kind::METAS => StreamMessage::Metas {
                id,
                records: state.records,
            },
            _ => StreamMessage::Unknown,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> NodeMeta {
        let mut m = NodeMeta::new("agent-1", Role::Backend);
        m.zone = "eu".into();
        m.tags = vec!["a".into()];
        m.services.push(Service {
            pool: "web".into(),
            addr: ([10, 0, 0, 1], 8080).into(),
            weight: 3,
            zone: Some("us".into()),
            tags: None,
        });
        m.draining = true;
        m.admin = Some("127.0.0.1:9900".into());
        m.extensions.insert("rollout".into(), vec![1, 2, 3]);
        m
    }

    #[test]
    fn metadata_round_trips_and_unknown_fields_are_skipped() {
        let m = meta();
        assert_eq!(decode_meta(&encode_meta(&m, false)), Some(m.clone()));
        // The next version adds fields to the metadata and to every service: this version
        // reads the same metadata.
        let next = encode_meta(&m, true);
        assert!(next.len() > encode_meta(&m, false).len());
        assert_eq!(decode_meta(&next), Some(m));
        let bare = NodeMeta::new("p", Role::Proxy);
        assert_eq!(decode_meta(&encode_meta(&bare, false)), Some(bare));
    }

    #[test]
    fn malformed_or_incomplete_metadata_is_refused() {
        let bytes = encode_meta(&meta(), false);
        assert_eq!(decode_meta(&bytes[..bytes.len() - 1]), None, "truncated");
        let mut no_name = Fields::default();
        no_name.put(2, &1u8);
        assert_eq!(decode_meta(&no_name.into_bytes()), None);
        let mut bad_role = Fields::default();
        bad_role.put(1, "x").put(2, &9u8);
        assert_eq!(decode_meta(&bad_role.into_bytes()), None);
    }

    #[test]
    fn messages_round_trip_and_unknown_kinds_decode_as_unknown() {
        let d = Digest {
            addr: ([10, 0, 0, 2], 7946).into(),
            generation: 5,
            version: 9,
            left: true,
        };
        for next in [false, true] {
            let b = Broadcast::Hint(d).encode(next);
            assert_eq!(b[0], BODY_VERSION + u8::from(next));
            assert_eq!(Broadcast::decode(&b), Some(Broadcast::Hint(d)));
        }
        assert_eq!(
            Broadcast::decode(&Broadcast::Unknown.encode(true)),
            Some(Broadcast::Unknown)
        );
        let record = Record {
            addr: d.addr,
            generation: 5,
            version: 9,
            left: false,
            meta: meta(),
        };
        let state = PushPullState {
            members: vec![Member::alive(NodeId {
                addr: d.addr,
                generation: 5,
            })],
            digests: vec![d],
            records: vec![record.clone()],
            names: vec![(d.addr, "agent-1".into())],
        };
        let msg = StreamMessage::State { id: 7, state };
        assert_eq!(StreamMessage::decode(&msg.encode(true)), Some(msg));
        let metas = StreamMessage::Metas {
            id: 3,
            records: vec![record.clone()],
        };
        assert_eq!(StreamMessage::decode(&metas.encode(false)), Some(metas));
        assert_eq!(
            StreamMessage::decode(&StreamMessage::Unknown.encode(true)),
            Some(StreamMessage::Unknown)
        );
        // Another version's kind is not read as one of ours, whatever its fields hold.
        let mut f = Fields::body(kind::NEXT_VERSION_PROBE, true);
        f.put(1, &vec![9u8; 40]).put(5, "not a record");
        assert_eq!(
            StreamMessage::decode(&f.into_bytes()),
            Some(StreamMessage::Unknown)
        );
        // One unreadable record costs only itself.
        let mut f = Fields::body(kind::METAS, false);
        f.put(1, &3u64)
            .raw(5, &[0xff; 7])
            .raw(5, &record.encode(false));
        assert_eq!(
            StreamMessage::decode(&f.into_bytes()),
            Some(StreamMessage::Metas {
                id: 3,
                records: vec![record.clone()]
            })
        );
        assert_eq!(StreamMessage::decode(&[0, kind::STATE]), None, "version 0");
        assert_eq!(StreamMessage::decode(&[1]), None);
        assert_eq!(StreamMessage::decode(&[1, kind::STATE, 1, 9]), None);
    }

    #[test]
    fn field_lengths_above_127_bytes_use_several_length_bytes() {
        let long = "x".repeat(300);
        let mut f = Fields::default();
        f.put(1, &long).put(2, &1u8);
        let bytes = f.into_bytes();
        let fields = parse_fields(&bytes).expect("well formed");
        assert_eq!(fields.len(), 2);
        assert_eq!(get::<String>(fields[0].1), Some(long));
    }
}
