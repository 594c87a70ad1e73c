//! Blobs: byte strings a member keeps and serves to the others over the authenticated TCP
//! transport, each under a 32-byte key chosen by the caller (the proxy uses the sha256 of the
//! bytes, and checks it after every fetch: this layer trusts the cluster key, not the holder).
//!
//! Gossip only carries *that* a blob exists (in the metadata of whoever announces it); the
//! bytes move point to point, on demand:
//!
//! ```text
//! request  Kind::BlobGet  body = key (32 bytes)
//! reply    Kind::Blob     body = 0x01 | bytes      the blob
//!                         body = 0x00              not held here
//! ```
//!
//! Both are ordinary sealed TCP frames ([`crate::wire`]), so a blob is bounded by
//! [`MAX_BLOB`] and deflated like any large message when compression is on. A store keeps at
//! most [`MAX_BLOBS`] blobs and [`MAX_STORE_BYTES`] bytes, dropping the oldest first.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use crate::wire;

/// The key of a blob: the proxy uses the sha256 of its bytes.
pub type BlobKey = [u8; 32];

/// Largest blob a store accepts and a fetch reads: what fits one TCP frame with its headers.
pub const MAX_BLOB: usize = wire::MAX_FRAME - 1024;
/// Blobs a store keeps; inserting one more drops the oldest.
pub const MAX_BLOBS: usize = 16;
/// Bytes a store keeps; inserting beyond drops the oldest blobs.
pub const MAX_STORE_BYTES: usize = 64 << 20;

const FOUND: u8 = 1;
const NOT_FOUND: u8 = 0;

/// Why a blob could not be stored or fetched.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BlobError {
    /// Larger than [`MAX_BLOB`].
    #[error("{size} bytes is larger than the {max}-byte limit of a blob")]
    TooLarge {
        /// Its size.
        size: usize,
        /// The limit.
        max: usize,
    },
    /// The member did not answer (connection refused, timeout, unauthenticated reply).
    #[error("no answer from {0}")]
    Unreachable(std::net::SocketAddr),
    /// The member answered that it does not hold the blob.
    #[error("{0} does not hold it")]
    NotFound(std::net::SocketAddr),
}

/// The blobs one member serves. Cheap to share; edits take a short lock off any hot path.
#[derive(Debug, Default)]
pub struct BlobStore {
    blobs: Mutex<VecDeque<(BlobKey, Arc<[u8]>)>>,
}

impl BlobStore {
    /// Keeps `bytes` under `key` (replacing a blob with the same key) and drops the oldest
    /// blobs beyond the store's bounds.
    pub fn insert(&self, key: BlobKey, bytes: Arc<[u8]>) -> Result<(), BlobError> {
        if bytes.len() > MAX_BLOB {
            return Err(BlobError::TooLarge {
                size: bytes.len(),
                max: MAX_BLOB,
            });
        }
        let mut blobs = self.blobs.lock().unwrap_or_else(|e| e.into_inner());
        blobs.retain(|(k, _)| *k != key);
        blobs.push_back((key, bytes));
        let mut total: usize = blobs.iter().map(|(_, b)| b.len()).sum();
        while blobs.len() > MAX_BLOBS || (total > MAX_STORE_BYTES && blobs.len() > 1) {
            if let Some((_, old)) = blobs.pop_front() {
                total -= old.len();
            }
        }
        Ok(())
    }

    /// The blob under `key`, if held.
    pub fn get(&self, key: &BlobKey) -> Option<Arc<[u8]>> {
        let blobs = self.blobs.lock().unwrap_or_else(|e| e.into_inner());
        blobs.iter().find(|(k, _)| k == key).map(|(_, b)| b.clone())
    }

    /// Whether a blob is held under `key`.
    pub fn contains(&self, key: &BlobKey) -> bool {
        self.get(key).is_some()
    }

    /// The reply body to a [`wire::Kind::BlobGet`] request body; `None` if the request is
    /// malformed.
    pub fn answer(&self, request: &[u8]) -> Option<Vec<u8>> {
        let key: BlobKey = request.try_into().ok()?;
        Some(match self.get(&key) {
            Some(bytes) => {
                let mut out = Vec::with_capacity(1 + bytes.len());
                out.push(FOUND);
                out.extend_from_slice(&bytes);
                out
            }
            None => vec![NOT_FOUND],
        })
    }
}

/// Splits a [`wire::Kind::Blob`] reply body: `Some(Some(bytes))` found, `Some(None)` not held,
/// `None` malformed.
pub fn parse_reply(body: &[u8]) -> Option<Option<Vec<u8>>> {
    match body.split_first()? {
        (&FOUND, bytes) if bytes.len() <= MAX_BLOB => Some(Some(bytes.to_vec())),
        (&NOT_FOUND, []) => Some(None),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_requests_and_stays_bounded() {
        let store = BlobStore::default();
        store.insert([1; 32], Arc::from(&b"one"[..])).unwrap();
        assert_eq!(
            parse_reply(&store.answer(&[1; 32]).unwrap()),
            Some(Some(b"one".to_vec()))
        );
        assert_eq!(parse_reply(&store.answer(&[2; 32]).unwrap()), Some(None));
        assert_eq!(store.answer(b"short"), None, "a key is 32 bytes");
        assert_eq!(parse_reply(&[]), None);
        assert_eq!(parse_reply(&[NOT_FOUND, 1]), None);
        for i in 0..MAX_BLOBS as u8 {
            store.insert([i + 10; 32], Arc::from(&[i][..])).unwrap();
        }
        assert!(!store.contains(&[1; 32]), "the oldest blob was dropped");
        assert!(store.contains(&[10; 32]) && store.contains(&[25; 32]));
        let big = vec![0u8; MAX_BLOB + 1];
        assert_eq!(
            store.insert([3; 32], Arc::from(big)),
            Err(BlobError::TooLarge {
                size: MAX_BLOB + 1,
                max: MAX_BLOB
            })
        );
    }
}
