//! Wire format shared by the UDP and TCP transports: the envelope around every message.
//!
//! ```text
//! sealed     key id (1) | nonce (12) | AES-256-GCM(plaintext, aad = cluster name) | tag (16)
//! plaintext  kind (1) | flags (1) | session (8) | counter (8) | sent at (4) | body
//! frame      length (u32, big endian) | sealed                      (TCP only)
//! ```
//!
//! - The key id and the seal are the [`Keyring`]'s (see [`super::keyring`]): a receiver tries
//!   only the key the id names, and nothing is parsed before it authenticates.
//! - `flags`: the [`WIRE_VERSION`] in the high nibble; bit 0 set when the body is deflated
//!   ([`encode_plain`] does it before sealing — ciphertext does not compress — and only when it
//!   saves bytes, so small probes never pay for it).
//! - `session`, `counter`, `sent at` form the [`Stamp`]: a random id per process start, a
//!   counter the sender increments for every message it seals, and the sender's wall clock in
//!   seconds. The receiver's [`crate::replay`] window refuses a stamp it has seen, or one from
//!   too far in the past or future — that is the replay protection. They travel inside the
//!   seal, so a forger cannot choose them.
//!
//! UDP carries one sealed message per datagram, at most the configured UDP payload size
//! ([`crate::TransportConfig::udp_payload_size`]); anything larger goes over TCP. TCP frames are
//! read in chunks as bytes arrive ([`read_frame_body`]): a declared length is a promise, never
//! an allocation.

use std::io::{Read, Write};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::keyring::Keyring;

/// The default and largest datagram sizes the UDP transport sends, and the smallest allowed.
/// Every member receives datagrams up to [`MAX_UDP_PAYLOAD`], whatever it sends.
///
/// A datagram's payload is the path MTU minus 28 bytes of IPv4 and UDP headers, or 48 bytes
/// over IPv6. 1400 bytes fits an Ethernet MTU with those headers and some tunnel overhead.
/// Overlays with smaller MTUs (WireGuard, MTU 1420: 1392-byte payloads over IPv4, 1372 over
/// IPv6) need a smaller setting; below 1024 bytes a
/// SWIM packet could not carry a member's metadata broadcast next to its header, and above
/// 9000 (jumbo frames) datagrams would be fragmented on any network.
pub const DEFAULT_UDP_PAYLOAD: usize = 1400;
/// See [`DEFAULT_UDP_PAYLOAD`].
pub const MIN_UDP_PAYLOAD: usize = 1024;
/// See [`DEFAULT_UDP_PAYLOAD`].
pub const MAX_UDP_PAYLOAD: usize = 9000;
/// Largest TCP frame accepted. A full state of 10 000 members with metadata stays well below.
/// It is never allocated up front: a frame's buffer grows as its bytes arrive.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Largest foca packet (a [`Kind::Foca`], [`Kind::Probe`] or [`Kind::ProbeAck`] body) a
/// receiver accepts, inflated: what fits a datagram of [`MAX_UDP_PAYLOAD`] once sealed. The
/// largest allowed size, not this node's setting, so a member with a larger
/// `udp_payload_size` is still understood while the setting is changed one node at a time.
pub const MAX_FOCA_BODY: usize = MAX_UDP_PAYLOAD - HEADER_LEN - crate::keyring::SEAL_OVERHEAD;
/// Largest [`Kind::BlobGet`] body accepted: the request is a 32-byte key.
pub const MAX_BLOB_GET_BODY: usize = 64;
/// Bytes the plaintext header adds to a body: kind, flags and the [`Stamp`].
pub const HEADER_LEN: usize = 2 + STAMP_LEN;
const STAMP_LEN: usize = 8 + 8 + 4;
const COMPRESSED: u8 = 1;
/// Version of everything inside the seal (this header, foca's packets, the postcard-encoded
/// metadata and state), kept in the high nibble of the flags byte. postcard encodes fields by
/// position, so any change to `NodeMeta`/`Service` must bump this: a node then drops (and
/// counts as malformed) authenticated messages of another version instead of misreading them.
///
/// 4: key id before the nonce, the [`Stamp`] in the header, [`Kind::Probe`]/[`Kind::ProbeAck`].
/// Version 3 messages do not even authenticate here (their first byte is part of the nonce,
/// not a key id), so a v4 member counts them as `rejected_decrypt`, not `malformed`: v3 and
/// v4 members cannot talk to each other at all.
pub const WIRE_VERSION: u8 = 4;
const VERSION_SHIFT: u8 = 4;
// Bodies shorter than this are never worth deflating.
const COMPRESS_MIN: usize = 128;
// A frame's buffer grows by at most this much per read.
const READ_CHUNK: usize = 64 * 1024;

/// What a message carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A foca (SWIM) packet.
    Foca = 1,
    /// A push-pull request carrying the sender's full state (may be empty: a pure pull).
    PushPull = 2,
    /// The reply to a push-pull: the receiver's full state.
    PushPullReply = 3,
    /// A request for a stored blob (TCP only), see [`crate::blobs`].
    BlobGet = 4,
    /// The reply to a [`Kind::BlobGet`].
    Blob = 5,
    /// A foca ping sent over TCP because its datagram got no ack in time (TCP only; see
    /// [`crate::node::Output::ProbeStream`]).
    Probe = 6,
    /// The reply to a [`Kind::Probe`]: foca's ack, fed to foca like a datagram.
    ProbeAck = 7,
}

impl Kind {
    /// The largest body of this kind a receiver accepts, after inflation: a small compressed
    /// message must not make it hold more than the kind can legitimately carry.
    pub fn max_body(self) -> usize {
        match self {
            Kind::Foca | Kind::Probe | Kind::ProbeAck => MAX_FOCA_BODY,
            Kind::BlobGet => MAX_BLOB_GET_BODY,
            Kind::PushPull | Kind::PushPullReply | Kind::Blob => MAX_FRAME,
        }
    }

    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Foca),
            2 => Some(Kind::PushPull),
            3 => Some(Kind::PushPullReply),
            4 => Some(Kind::BlobGet),
            5 => Some(Kind::Blob),
            6 => Some(Kind::Probe),
            7 => Some(Kind::ProbeAck),
            _ => None,
        }
    }
}

/// Who sealed a message and when: what the receiver's replay window checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Stamp {
    /// Random per process start of the sender.
    pub session: u64,
    /// Incremented by the sender for every message it seals (starting at 1).
    pub counter: u64,
    /// The sender's wall clock when sealing, in seconds since the Unix epoch.
    pub sent_at_s: u32,
}

impl Stamp {
    fn encode(&self, out: &mut Vec<u8>) {
        out.extend_from_slice(&self.session.to_be_bytes());
        out.extend_from_slice(&self.counter.to_be_bytes());
        out.extend_from_slice(&self.sent_at_s.to_be_bytes());
    }

    fn decode(b: &[u8; STAMP_LEN]) -> Stamp {
        let u64_at = |i: usize| {
            let mut w = [0u8; 8];
            w.copy_from_slice(&b[i..i + 8]);
            u64::from_be_bytes(w)
        };
        let mut t = [0u8; 4];
        t.copy_from_slice(&b[16..20]);
        Stamp {
            session: u64_at(0),
            counter: u64_at(8),
            sent_at_s: u32::from_be_bytes(t),
        }
    }
}

/// A decoded message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    /// What it carries.
    pub kind: Kind,
    /// Who sealed it and when.
    pub stamp: Stamp,
    /// The (inflated) body.
    pub body: Vec<u8>,
}

/// Why a decrypted message could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than the header, or an unknown kind / flag / version.
    #[error("malformed message")]
    Malformed,
    /// The deflated body did not inflate.
    #[error("bad compressed body")]
    BadCompression,
    /// The body, inflated, is larger than its kind allows ([`Kind::max_body`]).
    #[error("body larger than its kind allows")]
    TooLarge,
    /// The receiver's buffer budget could not hold the inflated body.
    #[error("no buffer budget left for the inflated body")]
    OverBudget,
}

/// Builds a plaintext message, deflating the body when `compress` is set and it pays off.
pub fn encode_plain(kind: Kind, stamp: Stamp, body: &[u8], compress: bool) -> Vec<u8> {
    let header = |flags: u8, len: usize| {
        let mut out = Vec::with_capacity(HEADER_LEN + len);
        out.push(kind as u8);
        out.push(flags | (WIRE_VERSION << VERSION_SHIFT));
        stamp.encode(&mut out);
        out
    };
    if compress && body.len() >= COMPRESS_MIN {
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        // Writing into a Vec cannot fail; an error would only mean "send it uncompressed".
        let deflated = enc
            .write_all(body)
            .and_then(|_| enc.finish())
            .unwrap_or_default();
        if !deflated.is_empty() && deflated.len() < body.len() {
            let mut out = header(COMPRESSED, deflated.len());
            out.extend_from_slice(&deflated);
            return out;
        }
    }
    let mut out = header(0, body.len());
    out.extend_from_slice(body);
    out
}

// The header of a plaintext: kind, stamp, whether the body is deflated.
fn decode_header(plain: &[u8]) -> Result<(Kind, Stamp, bool), WireError> {
    if plain.len() < HEADER_LEN {
        return Err(WireError::Malformed);
    }
    let kind = Kind::from_byte(plain[0]).ok_or(WireError::Malformed)?;
    if plain[1] >> VERSION_SHIFT != WIRE_VERSION {
        return Err(WireError::Malformed);
    }
    let compressed = match plain[1] & ((1 << VERSION_SHIFT) - 1) {
        0 => false,
        COMPRESSED => true,
        _ => return Err(WireError::Malformed),
    };
    let stamp = Stamp::decode(plain[2..HEADER_LEN].try_into().expect("length checked"));
    Ok((kind, stamp, compressed))
}

// The body of a plaintext whose header was read: the buffer itself when it is raw, else
// inflated into a buffer that grows as output comes, asking `grow(new capacity)` first.
fn take_body(
    mut plain: Vec<u8>,
    kind: Kind,
    compressed: bool,
    grow: impl FnMut(usize) -> bool,
) -> Result<Vec<u8>, WireError> {
    let max = kind.max_body();
    if !compressed {
        if plain.len() - HEADER_LEN > max {
            return Err(WireError::TooLarge);
        }
        plain.drain(..HEADER_LEN);
        return Ok(plain);
    }
    inflate(&plain[HEADER_LEN..], max, grow)
}

// Inflates at most `max` bytes: a small "deflate bomb" stops at its kind's limit, and the
// buffer grows (like a frame's) only as output arrives, each growth asked of `grow` first.
fn inflate(
    deflated: &[u8],
    max: usize,
    mut grow: impl FnMut(usize) -> bool,
) -> Result<Vec<u8>, WireError> {
    let mut dec = flate2::read::DeflateDecoder::new(deflated);
    let mut out: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let n = dec
            .read(&mut chunk)
            .map_err(|_| WireError::BadCompression)?;
        if n == 0 {
            return Ok(out);
        }
        let need = out.len() + n;
        if need > max {
            return Err(WireError::TooLarge);
        }
        if need > out.capacity() {
            let cap = (out.capacity() * 2).max(READ_CHUNK).max(need).min(max);
            if !grow(cap) {
                return Err(WireError::OverBudget);
            }
            out.reserve_exact(cap - out.len());
        }
        out.extend_from_slice(&chunk[..n]);
    }
}

/// Splits a plaintext message into its kind, stamp and (inflated) body, within the kind's
/// limit ([`Kind::max_body`]).
pub fn decode_plain(plain: &[u8]) -> Result<Message, WireError> {
    let (kind, stamp, compressed) = decode_header(plain)?;
    Ok(Message {
        kind,
        stamp,
        body: take_body(plain.to_vec(), kind, compressed, |_| true)?,
    })
}

/// Encodes and seals a message: what goes into a datagram or a frame.
pub fn seal(
    ring: &Keyring,
    cluster: &str,
    kind: Kind,
    stamp: Stamp,
    body: &[u8],
    compress: bool,
) -> Vec<u8> {
    ring.seal(
        &encode_plain(kind, stamp, body, compress),
        cluster.as_bytes(),
    )
}

/// Why a received message was dropped.
#[derive(Debug, PartialEq, Eq)]
pub enum OpenError {
    /// No key authenticated it (unknown key id, wrong key, wrong cluster, forged or damaged).
    Decrypt,
    /// It authenticated but its plaintext is malformed.
    Wire(WireError),
    /// It authenticated but the stamp check refused it (a replay, or too old or new).
    Replay,
}

/// Opens a sealed message. Nothing is parsed unless the keyring authenticates it, and the body
/// is inflated only once `accept` took the stamp (the replay check), and only up to its kind's
/// limit ([`Kind::max_body`]).
pub fn open(
    ring: &Keyring,
    cluster: &str,
    sealed: &[u8],
    accept: impl FnOnce(&Stamp) -> bool,
) -> Result<Message, OpenError> {
    open_owned(ring, cluster, sealed.to_vec(), accept, |_| true)
}

/// [`open`] for a buffer the caller owns (a TCP frame): it is decrypted in place and a raw body
/// is returned in it, so nothing is copied; an inflated body's buffer asks `grow(new capacity)`
/// before each growth, so a budget can refuse it ([`WireError::OverBudget`]).
pub fn open_owned(
    ring: &Keyring,
    cluster: &str,
    sealed: Vec<u8>,
    accept: impl FnOnce(&Stamp) -> bool,
    grow: impl FnMut(usize) -> bool,
) -> Result<Message, OpenError> {
    let plain = ring
        .open_in_place(sealed, cluster.as_bytes())
        .ok_or(OpenError::Decrypt)?;
    let (kind, stamp, compressed) = decode_header(&plain).map_err(OpenError::Wire)?;
    if !accept(&stamp) {
        return Err(OpenError::Replay);
    }
    let body = take_body(plain, kind, compressed, grow).map_err(OpenError::Wire)?;
    Ok(Message { kind, stamp, body })
}

/// Writes one length-prefixed frame.
pub async fn write_frame<W: AsyncWrite + Unpin>(w: &mut W, sealed: &[u8]) -> std::io::Result<()> {
    if sealed.len() > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "frame too large",
        ));
    }
    let mut buf = Vec::with_capacity(4 + sealed.len());
    buf.extend_from_slice(&(sealed.len() as u32).to_be_bytes());
    buf.extend_from_slice(sealed);
    w.write_all(&buf).await?;
    w.flush().await
}

/// Reads a frame's length prefix, refusing lengths above `max` (at most [`MAX_FRAME`]).
pub async fn read_frame_len<R: AsyncRead + Unpin>(r: &mut R, max: usize) -> std::io::Result<usize> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > max.min(MAX_FRAME) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    Ok(len)
}

/// Reads a frame body of `len` bytes, 64 KiB per read at most, calling `grow(new capacity)`
/// before its buffer grows; `grow` returning false stops the read (a memory budget). The
/// buffer starts at 64 KiB and doubles only when full, so it never holds more than twice what
/// has arrived (plus the first chunk), whatever the declared length.
pub async fn read_frame_body<R: AsyncRead + Unpin>(
    r: &mut R,
    len: usize,
    mut grow: impl FnMut(usize) -> bool,
) -> std::io::Result<Vec<u8>> {
    let mut buf: Vec<u8> = Vec::new();
    while buf.len() < len {
        if buf.len() == buf.capacity() {
            let cap = (buf.capacity() * 2).max(READ_CHUNK).min(len);
            if !grow(cap) {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::OutOfMemory,
                    "frame buffer budget exhausted",
                ));
            }
            buf.reserve_exact(cap - buf.len());
        }
        let room = (buf.capacity() - buf.len())
            .min(len - buf.len())
            .min(READ_CHUNK);
        let start = buf.len();
        buf.resize(start + room, 0);
        let n = r.read(&mut buf[start..]).await?;
        buf.truncate(start + n);
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf)
}

/// Reads one length-prefixed frame of at most [`MAX_FRAME`] bytes, growing its buffer as bytes
/// arrive.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let len = read_frame_len(r, MAX_FRAME).await?;
    read_frame_body(r, len, |_| true).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::generate_key;

    const STAMP: Stamp = Stamp {
        session: 0x0102_0304_0506_0708,
        counter: 42,
        sent_at_s: 1_800_000_000,
    };

    fn msg(kind: Kind, body: &[u8]) -> Message {
        Message {
            kind,
            stamp: STAMP,
            body: body.to_vec(),
        }
    }

    #[test]
    fn plain_round_trip_with_and_without_compression() {
        let body: Vec<u8> = b"member-metadata "
            .iter()
            .cycle()
            .take(2000)
            .copied()
            .collect();
        for compress in [false, true] {
            let plain = encode_plain(Kind::PushPull, STAMP, &body, compress);
            if compress {
                assert!(plain.len() < body.len() / 4, "repetitive body deflates");
            }
            assert_eq!(decode_plain(&plain), Ok(msg(Kind::PushPull, &body)));
        }
    }

    #[test]
    fn small_or_incompressible_bodies_are_sent_raw() {
        let raw = WIRE_VERSION << VERSION_SHIFT;
        let plain = encode_plain(Kind::Foca, STAMP, b"tiny", true);
        assert_eq!((plain[1], plain.len()), (raw, HEADER_LEN + 4));
        let noise: Vec<u8> = (0..1000).map(|_| rand::random::<u8>()).collect();
        assert_eq!(encode_plain(Kind::Foca, STAMP, &noise, true)[1], raw);
    }

    #[test]
    fn malformed_plaintext_is_rejected() {
        let v = WIRE_VERSION << VERSION_SHIFT;
        let with = |kind: u8, flags: u8, body: &[u8]| {
            let mut p = vec![kind, flags];
            STAMP.encode(&mut p);
            p.extend_from_slice(body);
            p
        };
        assert_eq!(decode_plain(&[1]), Err(WireError::Malformed));
        // Too short for the stamp.
        assert_eq!(decode_plain(&[1, v, 0, 0, 0]), Err(WireError::Malformed));
        assert_eq!(decode_plain(&with(9, v, b"")), Err(WireError::Malformed));
        assert_eq!(
            decode_plain(&with(1, v | 7, b"")),
            Err(WireError::Malformed)
        );
        assert_eq!(
            decode_plain(&with(1, v | COMPRESSED, &[0xff, 0xff])),
            Err(WireError::BadCompression)
        );
        // Another wire version (0 = before versioning, 3 = before the stamp) is refused.
        for old in [0, 3 << VERSION_SHIFT, (WIRE_VERSION + 1) << VERSION_SHIFT] {
            assert_eq!(decode_plain(&with(1, old, b"x")), Err(WireError::Malformed));
        }
        assert_eq!(decode_plain(&with(1, v, b"x")), Ok(msg(Kind::Foca, b"x")));
    }

    #[test]
    fn bodies_are_capped_by_kind_after_inflation() {
        let ring = Keyring::from_base64(&[generate_key()]).unwrap();
        let zeros = |n: usize| vec![0u8; n];
        let open_it = |kind: Kind, body: &[u8], compress: bool| {
            open(
                &ring,
                "c",
                &seal(&ring, "c", kind, STAMP, body, compress),
                |_| true,
            )
            .map(|m| m.body.len())
        };
        // What a key holder can craft: the best deflate of `n` zeros, sealed.
        let bomb_of = |kind: Kind, n: usize| {
            let mut enc =
                flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
            enc.write_all(&zeros(n)).unwrap();
            let mut plain = vec![kind as u8, COMPRESSED | (WIRE_VERSION << VERSION_SHIFT)];
            STAMP.encode(&mut plain);
            plain.extend_from_slice(&enc.finish().unwrap());
            ring.seal(&plain, b"c")
        };
        let too_large = Err(OpenError::Wire(WireError::TooLarge));
        for kind in [Kind::Foca, Kind::Probe, Kind::ProbeAck] {
            // A datagram-sized sealed message inflating far beyond a foca packet is refused
            // once the inflated bytes pass the limit; one at the limit is fine.
            let bomb = bomb_of(kind, 1 << 20);
            assert!(bomb.len() < DEFAULT_UDP_PAYLOAD, "{}", bomb.len());
            assert_eq!(
                open(&ring, "c", &bomb, |_| true).map(|m| m.body.len()),
                too_large
            );
            assert_eq!(
                open_it(kind, &zeros(MAX_FOCA_BODY), true),
                Ok(MAX_FOCA_BODY)
            );
            assert_eq!(open_it(kind, &zeros(MAX_FOCA_BODY + 1), false), too_large);
        }
        assert_eq!(open_it(Kind::BlobGet, &[1; 32], true), Ok(32));
        assert_eq!(open_it(Kind::BlobGet, &zeros(1000), true), too_large);
        for kind in [Kind::PushPull, Kind::PushPullReply, Kind::Blob] {
            assert_eq!(open_it(kind, &zeros(1 << 20), true), Ok(1 << 20));
        }
        let bomb = bomb_of(Kind::PushPull, MAX_FRAME + 1);
        assert!(bomb.len() < 64 * 1024, "{}", bomb.len());
        assert_eq!(
            open(&ring, "c", &bomb, |_| true).map(|m| m.body.len()),
            too_large
        );
    }

    #[test]
    fn an_inflated_body_grows_only_as_the_budget_allows() {
        let ring = Keyring::from_base64(&[generate_key()]).unwrap();
        let sealed = seal(&ring, "c", Kind::PushPull, STAMP, &[5u8; 1 << 20], true);
        let mut asked = Vec::new();
        let m = open_owned(
            &ring,
            "c",
            sealed.clone(),
            |_| true,
            |cap| {
                asked.push(cap);
                true
            },
        )
        .unwrap();
        assert_eq!(m.body, vec![5u8; 1 << 20]);
        assert_eq!(asked.first(), Some(&READ_CHUNK), "starts at one chunk");
        assert!(asked.windows(2).all(|w| w[0] < w[1]), "{asked:?}");
        // The budget refuses growth past 256 KiB: the body is refused, not allocated.
        let refused = open_owned(&ring, "c", sealed, |_| true, |cap| cap <= 256 * 1024);
        assert_eq!(refused, Err(OpenError::Wire(WireError::OverBudget)));
        // A raw body is returned in the sealed buffer itself: no budget asked.
        let raw = seal(&ring, "c", Kind::PushPull, STAMP, &[6u8; 200_000], false);
        let m = open_owned(&ring, "c", raw, |_| true, |_| false).unwrap();
        assert_eq!(m.body.len(), 200_000);
    }

    #[test]
    fn sealed_messages_open_only_with_the_right_key_and_cluster() {
        let ring = Keyring::from_base64(&[generate_key()]).unwrap();
        let other = Keyring::from_base64(&[generate_key()]).unwrap();
        let sealed = seal(&ring, "prod", Kind::Foca, STAMP, b"ping", true);
        assert_eq!(
            open(&ring, "prod", &sealed, |_| true),
            Ok(msg(Kind::Foca, b"ping"))
        );
        assert_eq!(
            open(&other, "prod", &sealed, |_| true),
            Err(OpenError::Decrypt)
        );
        assert_eq!(
            open(&ring, "dev", &sealed, |_| true),
            Err(OpenError::Decrypt)
        );
        // The stamp check sees the sender's stamp and can refuse the message.
        assert_eq!(
            open(&ring, "prod", &sealed, |s| {
                assert_eq!(*s, STAMP);
                false
            }),
            Err(OpenError::Replay)
        );
    }

    #[tokio::test]
    async fn frames_round_trip_and_oversized_lengths_are_refused() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        write_frame(&mut a, b"one").await.unwrap();
        write_frame(&mut a, &[7u8; 5000]).await.unwrap();
        assert_eq!(read_frame(&mut b).await.unwrap(), b"one");
        assert_eq!(read_frame(&mut b).await.unwrap(), vec![7u8; 5000]);
        a.write_all(&(MAX_FRAME as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        assert_eq!(
            read_frame(&mut b).await.unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
        // A smaller limit of the caller's applies too.
        a.write_all(&1000u32.to_be_bytes()).await.unwrap();
        assert_eq!(
            read_frame_len(&mut b, 999).await.unwrap_err().kind(),
            std::io::ErrorKind::InvalidData
        );
    }

    #[tokio::test]
    async fn a_declared_length_is_not_allocated_before_its_bytes_arrive() {
        let (mut a, mut b) = tokio::io::duplex(1 << 16);
        // 16 MiB declared, 10 bytes sent, then the sender goes away.
        a.write_all(&(MAX_FRAME as u32).to_be_bytes())
            .await
            .unwrap();
        a.write_all(&[1u8; 10]).await.unwrap();
        drop(a);
        let len = read_frame_len(&mut b, MAX_FRAME).await.unwrap();
        let mut largest = 0;
        let err = read_frame_body(&mut b, len, |cap| {
            largest = largest.max(cap);
            true
        })
        .await
        .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::UnexpectedEof);
        assert_eq!(largest, READ_CHUNK, "only the first chunk was reserved");

        // Growth is reported before it happens, and a refusal stops the read.
        let (mut a, mut b) = tokio::io::duplex(1 << 20);
        let body = vec![3u8; 300_000];
        a.write_all(&body).await.unwrap();
        let mut grants = Vec::new();
        let got = read_frame_body(&mut b, body.len(), |cap| {
            grants.push(cap);
            true
        })
        .await
        .unwrap();
        assert_eq!(got, body);
        assert!(grants.windows(2).all(|w| w[0] < w[1]), "{grants:?}");
        assert_eq!(grants.last(), Some(&body.len()));
        a.write_all(&body).await.unwrap();
        let err = read_frame_body(&mut b, body.len(), |cap| cap <= READ_CHUNK)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), std::io::ErrorKind::OutOfMemory);
    }
}
