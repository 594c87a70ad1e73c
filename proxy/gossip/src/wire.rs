//! Wire format shared by the UDP and TCP transports.
//!
//! Plaintext message: `kind (1 byte) | flags (1 byte) | body`, where body is deflated when
//! the `COMPRESSED` flag is set. The plaintext is then sealed by the [`Keyring`]
//! (see [`super::keyring`]) with the cluster name as associated data. UDP carries one sealed
//! message per datagram; TCP carries `length (u32, big endian) | sealed message` frames.
//!
//! Compression happens before encryption (ciphertext does not compress) and only when it
//! actually saves bytes, so small probes never pay for it.

use std::io::{Read, Write};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::keyring::Keyring;

/// Largest datagram the UDP transport sends; anything bigger goes over TCP.
pub const MAX_UDP_PACKET: usize = 1400;
/// Largest TCP frame accepted. A full state of 10 000 members with metadata stays well below.
pub const MAX_FRAME: usize = 16 * 1024 * 1024;
/// Bytes the plaintext header adds to a body.
pub const HEADER_LEN: usize = 2;
const COMPRESSED: u8 = 1;
/// Version of everything inside the seal (this header, foca's packets, the postcard-encoded
/// metadata and state), kept in the high nibble of the flags byte. postcard encodes fields by
/// position, so any change to `NodeMeta`/`Service` must bump this: a node then drops (and
/// counts as malformed) messages of another version instead of misreading them.
pub const WIRE_VERSION: u8 = 3;
const VERSION_SHIFT: u8 = 4;
// Bodies shorter than this are never worth deflating.
const COMPRESS_MIN: usize = 128;

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
}

impl Kind {
    fn from_byte(b: u8) -> Option<Kind> {
        match b {
            1 => Some(Kind::Foca),
            2 => Some(Kind::PushPull),
            3 => Some(Kind::PushPullReply),
            4 => Some(Kind::BlobGet),
            5 => Some(Kind::Blob),
            _ => None,
        }
    }
}

/// Why a decrypted message could not be decoded.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    /// Shorter than the header, or an unknown kind / flag.
    #[error("malformed message")]
    Malformed,
    /// The deflated body did not inflate, or inflated beyond [`MAX_FRAME`].
    #[error("bad compressed body")]
    BadCompression,
}

/// Builds a plaintext message, deflating the body when `compress` is set and it pays off.
pub fn encode_plain(kind: Kind, body: &[u8], compress: bool) -> Vec<u8> {
    if compress && body.len() >= COMPRESS_MIN {
        let mut enc = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
        // Writing into a Vec cannot fail; an error would only mean "send it uncompressed".
        let deflated = enc
            .write_all(body)
            .and_then(|_| enc.finish())
            .unwrap_or_default();
        if !deflated.is_empty() && deflated.len() < body.len() {
            let mut out = Vec::with_capacity(HEADER_LEN + deflated.len());
            out.push(kind as u8);
            out.push(COMPRESSED | (WIRE_VERSION << VERSION_SHIFT));
            out.extend_from_slice(&deflated);
            return out;
        }
    }
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.push(kind as u8);
    out.push(WIRE_VERSION << VERSION_SHIFT);
    out.extend_from_slice(body);
    out
}

/// Splits a plaintext message into its kind and (inflated) body.
pub fn decode_plain(plain: &[u8]) -> Result<(Kind, Vec<u8>), WireError> {
    if plain.len() < HEADER_LEN {
        return Err(WireError::Malformed);
    }
    let kind = Kind::from_byte(plain[0]).ok_or(WireError::Malformed)?;
    if plain[1] >> VERSION_SHIFT != WIRE_VERSION {
        return Err(WireError::Malformed);
    }
    match plain[1] & ((1 << VERSION_SHIFT) - 1) {
        0 => Ok((kind, plain[HEADER_LEN..].to_vec())),
        COMPRESSED => {
            let mut out = Vec::new();
            // take() bounds the inflated size so a small "deflate bomb" cannot exhaust memory.
            flate2::read::DeflateDecoder::new(&plain[HEADER_LEN..])
                .take(MAX_FRAME as u64 + 1)
                .read_to_end(&mut out)
                .map_err(|_| WireError::BadCompression)?;
            if out.len() > MAX_FRAME {
                return Err(WireError::BadCompression);
            }
            Ok((kind, out))
        }
        _ => Err(WireError::Malformed),
    }
}

/// Encodes and seals a message: what goes into a datagram or a frame.
pub fn seal(ring: &Keyring, cluster: &str, kind: Kind, body: &[u8], compress: bool) -> Vec<u8> {
    ring.seal(&encode_plain(kind, body, compress), cluster.as_bytes())
}

/// Why a received message was dropped.
#[derive(Debug, PartialEq, Eq)]
pub enum OpenError {
    /// No key authenticated it (wrong key, wrong cluster, forged or damaged).
    Decrypt,
    /// It authenticated but its plaintext is malformed.
    Wire(WireError),
}

/// Opens a sealed message. Nothing is parsed unless the keyring authenticates it.
pub fn open(ring: &Keyring, cluster: &str, sealed: &[u8]) -> Result<(Kind, Vec<u8>), OpenError> {
    let plain = ring
        .open(sealed, cluster.as_bytes())
        .ok_or(OpenError::Decrypt)?;
    decode_plain(&plain).map_err(OpenError::Wire)
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

/// Reads one length-prefixed frame, refusing lengths above [`MAX_FRAME`] before allocating.
pub async fn read_frame<R: AsyncRead + Unpin>(r: &mut R) -> std::io::Result<Vec<u8>> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len).await?;
    let len = u32::from_be_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "frame too large",
        ));
    }
    let mut buf = vec![0u8; len];
    r.read_exact(&mut buf).await?;
    Ok(buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keyring::generate_key;

    #[test]
    fn plain_round_trip_with_and_without_compression() {
        let body: Vec<u8> = b"member-metadata "
            .iter()
            .cycle()
            .take(2000)
            .copied()
            .collect();
        for compress in [false, true] {
            let plain = encode_plain(Kind::PushPull, &body, compress);
            if compress {
                assert!(plain.len() < body.len() / 4, "repetitive body deflates");
            }
            assert_eq!(decode_plain(&plain), Ok((Kind::PushPull, body.clone())));
        }
    }

    #[test]
    fn small_or_incompressible_bodies_are_sent_raw() {
        let raw = WIRE_VERSION << VERSION_SHIFT;
        let plain = encode_plain(Kind::Foca, b"tiny", true);
        assert_eq!(plain[1], raw);
        let noise: Vec<u8> = (0..1000).map(|_| rand::random::<u8>()).collect();
        assert_eq!(encode_plain(Kind::Foca, &noise, true)[1], raw);
    }

    #[test]
    fn malformed_plaintext_is_rejected() {
        assert_eq!(decode_plain(&[1]), Err(WireError::Malformed));
        assert_eq!(decode_plain(&[9, 0]), Err(WireError::Malformed));
        let v = WIRE_VERSION << VERSION_SHIFT;
        assert_eq!(decode_plain(&[1, v | 7]), Err(WireError::Malformed));
        assert_eq!(
            decode_plain(&[1, v | COMPRESSED, 0xff, 0xff]),
            Err(WireError::BadCompression)
        );
        // Another wire version (0 = before versioning) is refused, not misread.
        assert_eq!(decode_plain(&[1, 0, b'x']), Err(WireError::Malformed));
        assert_eq!(
            decode_plain(&[1, (WIRE_VERSION + 1) << VERSION_SHIFT, b'x']),
            Err(WireError::Malformed)
        );
    }

    #[test]
    fn sealed_messages_open_only_with_the_right_key_and_cluster() {
        let ring = Keyring::from_base64(&[generate_key()]).unwrap();
        let other = Keyring::from_base64(&[generate_key()]).unwrap();
        let sealed = seal(&ring, "prod", Kind::Foca, b"ping", true);
        assert_eq!(
            open(&ring, "prod", &sealed),
            Ok((Kind::Foca, b"ping".to_vec()))
        );
        assert_eq!(open(&other, "prod", &sealed), Err(OpenError::Decrypt));
        assert_eq!(open(&ring, "dev", &sealed), Err(OpenError::Decrypt));
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
    }
}
