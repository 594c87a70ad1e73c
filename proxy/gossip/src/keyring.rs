//! The cluster keyring: AES-256-GCM keys that seal every gossip packet and stream frame.
//!
//! The first key (the *primary*) encrypts; every installed key can decrypt. That order is what
//! makes a rolling key change possible without a partition: install the new key everywhere,
//! then make it primary everywhere, then remove the old one everywhere.
//!
//! A sealed message is `key id (1 byte) || nonce (12 bytes) || ciphertext || tag (16 bytes)`.
//!
//! **Key id.** The first byte of SHA-256(`"sluice gossip key id"` || key) names the key that
//! sealed the message, so a receiver tries only the installed keys with that id — normally
//! one, a few on a 1-in-256 collision — instead of trial-decrypting with every key. A message
//! whose id matches no installed key costs no decryption at all. One byte of a hash says
//! nothing useful about the key.
//!
//! **Nonces.** The nonce is 96 random bits per message. GCM's security needs a nonce never to
//! repeat under one key; with random nonces NIST SP 800-38D caps a key at 2^32 messages, which
//! keeps the chance of any repeat below 2^-32. A node sends tens to a few hundred messages a
//! second, so a cluster of 100 nodes at 100 messages/s each reaches 2^32 messages in about 5
//! days: rotate the key (install, use, remove; see `docs/security.md`) well before that —
//! monthly for small clusters, weekly for large or busy ones.
//!
//! The cluster name is the associated data, so a packet from another cluster that happens to
//! share a key is rejected just like a forged one.

use aes_gcm::aead::{Aead, AeadInPlace, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use sha2::{Digest, Sha256};

/// Length of a key in bytes (AES-256).
pub const KEY_LEN: usize = 32;
/// Bytes a sealed message adds to its plaintext: the key id, the nonce and the GCM tag.
pub const SEAL_OVERHEAD: usize = KEY_ID_LEN + NONCE_LEN + TAG_LEN;
const KEY_ID_LEN: usize = 1;
const NONCE_LEN: usize = 12;
const TAG_LEN: usize = 16;

/// Why a keyring operation or a key string was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum KeyError {
    /// The text is not base64 of exactly 32 bytes.
    #[error(
        "a cluster key must be base64 of exactly 32 bytes (generate one with `sluice genkey`): {0}"
    )]
    Invalid(String),
    /// A keyring needs at least one key to encrypt with.
    #[error("the keyring is empty; give at least one key (generate one with `sluice genkey`)")]
    Empty,
    /// The key is not installed.
    #[error("that key is not installed in the keyring; install it first")]
    NotInstalled,
    /// Removing the primary key would leave the node unable to encrypt.
    #[error("refusing to remove the primary key; make another key primary with use_key first")]
    RemovePrimary,
}

/// A set of AES-256-GCM keys; the first is the primary (encrypting) key.
#[derive(Clone)]
pub struct Keyring {
    // Cipher instances are built once per key: the AES key schedule is not free and is needed
    // for every packet.
    keys: Vec<InstalledKey>,
}

#[derive(Clone)]
struct InstalledKey {
    key: [u8; KEY_LEN],
    id: u8,
    cipher: Aes256Gcm,
}

/// The key id of `key`: the byte a sealed message starts with (see the module docs).
pub fn key_id(key: &[u8; KEY_LEN]) -> u8 {
    let mut h = Sha256::new();
    h.update(b"sluice gossip key id");
    h.update(key);
    h.finalize()[0]
}

impl std::fmt::Debug for Keyring {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("keys", &self.keys.len())
            .finish()
    }
}

/// Parses a base64 key (standard alphabet, padding optional) into its 32 bytes.
pub fn parse_key(text: &str) -> Result<[u8; KEY_LEN], KeyError> {
    let text = text.trim();
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(text)
        .or_else(|_| base64::engine::general_purpose::STANDARD_NO_PAD.decode(text))
        .map_err(|e| KeyError::Invalid(e.to_string()))?;
    <[u8; KEY_LEN]>::try_from(bytes.as_slice())
        .map_err(|_| KeyError::Invalid(format!("decoded to {} bytes, not {KEY_LEN}", bytes.len())))
}

/// A new random key as base64: what `sluice genkey` prints.
pub fn generate_key() -> String {
    let key: [u8; KEY_LEN] = rand::random();
    base64::engine::general_purpose::STANDARD.encode(key)
}

impl Keyring {
    /// A keyring from base64 keys; the first becomes the primary. Duplicates are ignored.
    pub fn from_base64<S: AsRef<str>>(keys: &[S]) -> Result<Self, KeyError> {
        let mut ring = Keyring { keys: Vec::new() };
        for key in keys {
            ring.install_raw(parse_key(key.as_ref())?);
        }
        if ring.keys.is_empty() {
            return Err(KeyError::Empty);
        }
        Ok(ring)
    }

    /// Number of installed keys.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether no key is installed (never true for a keyring built by [`Keyring::from_base64`]).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Installed keys as base64, primary first.
    pub fn keys_base64(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| base64::engine::general_purpose::STANDARD.encode(k.key))
            .collect()
    }

    /// Fingerprints of the installed keys, primary first (see [`crate::rotation::fingerprint`]).
    pub fn fingerprints(&self) -> Vec<crate::rotation::Fingerprint> {
        self.keys
            .iter()
            .map(|k| crate::rotation::fingerprint_raw(&k.key))
            .collect()
    }

    /// Removes every key but the primary (the last step of a rotation).
    pub fn retain_primary(&mut self) {
        self.keys.truncate(1);
    }

    /// Adds a key for decryption (it does not become primary). Installing a present key is a no-op.
    pub fn install(&mut self, key: &str) -> Result<(), KeyError> {
        self.install_raw(parse_key(key)?);
        Ok(())
    }

    fn install_raw(&mut self, key: [u8; KEY_LEN]) {
        if !self.keys.iter().any(|k| k.key == key) {
            self.keys.push(InstalledKey {
                key,
                id: key_id(&key),
                cipher: Aes256Gcm::new(&key.into()),
            });
        }
    }

    /// Makes an installed key the primary (encrypting) key.
    pub fn use_key(&mut self, key: &str) -> Result<(), KeyError> {
        let key = parse_key(key)?;
        let pos = self
            .keys
            .iter()
            .position(|k| k.key == key)
            .ok_or(KeyError::NotInstalled)?;
        let entry = self.keys.remove(pos);
        self.keys.insert(0, entry);
        Ok(())
    }

    /// Removes a key that is not the primary.
    pub fn remove(&mut self, key: &str) -> Result<(), KeyError> {
        let key = parse_key(key)?;
        let pos = self
            .keys
            .iter()
            .position(|k| k.key == key)
            .ok_or(KeyError::NotInstalled)?;
        if pos == 0 {
            return Err(KeyError::RemovePrimary);
        }
        self.keys.remove(pos);
        Ok(())
    }

    /// Encrypts `plain` with the primary key and `aad` as associated data, prefixed with the
    /// key's id.
    pub fn seal(&self, plain: &[u8], aad: &[u8]) -> Vec<u8> {
        let nonce: [u8; NONCE_LEN] = rand::random();
        let primary = &self.keys[0];
        let sealed = primary
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plain, aad })
            // aes-gcm only fails for plaintexts beyond 64 GiB, which nothing here produces.
            .expect("AES-GCM encryption of a bounded message");
        let mut out = Vec::with_capacity(SEAL_OVERHEAD + plain.len());
        out.push(primary.id);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&sealed);
        out
    }

    /// Decrypts a sealed message with the installed keys whose id it names. `None` when none
    /// authenticates it (unknown key id, wrong key, wrong cluster name, truncated or tampered):
    /// the caller drops it unparsed.
    pub fn open(&self, sealed: &[u8], aad: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < SEAL_OVERHEAD {
            return None;
        }
        let (id, rest) = (sealed[0], &sealed[KEY_ID_LEN..]);
        let (nonce, body) = rest.split_at(NONCE_LEN);
        let nonce = Nonce::from_slice(nonce);
        self.keys
            .iter()
            .filter(|k| k.id == id)
            .find_map(|k| k.cipher.decrypt(nonce, Payload { msg: body, aad }).ok())
    }

    /// [`Keyring::open`] on an owned buffer: the tag is checked on the ciphertext where it lies,
    /// and only then is it decrypted in place, so a large frame is never copied before it
    /// authenticates. Returns the buffer cut down to the plaintext.
    pub fn open_in_place(&self, mut sealed: Vec<u8>, aad: &[u8]) -> Option<Vec<u8>> {
        if sealed.len() < SEAL_OVERHEAD {
            return None;
        }
        let id = sealed[0];
        let mut nonce = [0u8; NONCE_LEN];
        nonce.copy_from_slice(&sealed[KEY_ID_LEN..KEY_ID_LEN + NONCE_LEN]);
        let tag_at = sealed.len() - TAG_LEN;
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&sealed[tag_at..]);
        let body = KEY_ID_LEN + NONCE_LEN..tag_at;
        // aes-gcm checks the tag before it touches the buffer, so a key that fails leaves the
        // ciphertext intact for the next candidate.
        let opened = self.keys.iter().filter(|k| k.id == id).any(|k| {
            k.cipher
                .decrypt_in_place_detached(
                    Nonce::from_slice(&nonce),
                    aad,
                    &mut sealed[body.clone()],
                    (&tag).into(),
                )
                .is_ok()
        });
        if !opened {
            return None;
        }
        sealed.truncate(tag_at);
        sealed.drain(..KEY_ID_LEN + NONCE_LEN);
        Some(sealed)
    }

    /// How many installed keys a message sealed under key id `id` would be tried with.
    pub fn candidates(&self, id: u8) -> usize {
        self.keys.iter().filter(|k| k.id == id).count()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seal_then_open_round_trips_and_adds_fixed_overhead() {
        let ring = Keyring::from_base64(&[generate_key()]).unwrap();
        let sealed = ring.seal(b"hello", b"prod");
        assert_eq!(sealed.len(), 5 + SEAL_OVERHEAD);
        assert_eq!(ring.open(&sealed, b"prod").as_deref(), Some(&b"hello"[..]));
    }

    #[test]
    fn opening_in_place_matches_open_and_survives_a_failed_candidate() {
        let (k1, k2) = (generate_key(), generate_key());
        let ring = Keyring::from_base64(std::slice::from_ref(&k1)).unwrap();
        let sealed = ring.seal(b"hello in place", b"prod");
        assert_eq!(
            ring.open_in_place(sealed.clone(), b"prod").as_deref(),
            Some(&b"hello in place"[..])
        );
        assert_eq!(ring.open_in_place(sealed.clone(), b"dev"), None);
        assert_eq!(ring.open_in_place(sealed[..10].to_vec(), b"prod"), None);
        // Two installed keys under one id (forced): the wrong one is tried first and fails
        // without damaging the buffer, the right one then opens it.
        let mut both = Keyring::from_base64(&[k2, k1]).unwrap();
        let id = both.keys[1].id;
        both.keys[0].id = id;
        assert_eq!(both.candidates(id), 2);
        assert_eq!(
            both.open_in_place(sealed, b"prod").as_deref(),
            Some(&b"hello in place"[..])
        );
    }

    #[test]
    fn nonces_differ_per_message() {
        let ring = Keyring::from_base64(&[generate_key()]).unwrap();
        assert_ne!(ring.seal(b"x", b"c"), ring.seal(b"x", b"c"));
    }

    #[test]
    fn wrong_key_is_rejected() {
        let a = Keyring::from_base64(&[generate_key()]).unwrap();
        let b = Keyring::from_base64(&[generate_key()]).unwrap();
        assert_eq!(b.open(&a.seal(b"secret", b"c"), b"c"), None);
    }

    #[test]
    fn cluster_name_mismatch_is_rejected() {
        let ring = Keyring::from_base64(&[generate_key()]).unwrap();
        assert_eq!(ring.open(&ring.seal(b"secret", b"prod"), b"staging"), None);
    }

    #[test]
    fn tampered_or_truncated_is_rejected() {
        let ring = Keyring::from_base64(&[generate_key()]).unwrap();
        let mut sealed = ring.seal(b"secret", b"c");
        let last = sealed.len() - 1;
        sealed[last] ^= 1;
        assert_eq!(ring.open(&sealed, b"c"), None);
        assert_eq!(ring.open(&sealed[..10], b"c"), None);
    }

    #[test]
    fn rotation_install_use_remove() {
        let (old, new) = (generate_key(), generate_key());
        let mut a = Keyring::from_base64(std::slice::from_ref(&old)).unwrap();
        let mut b = Keyring::from_base64(std::slice::from_ref(&old)).unwrap();
        // Step 1: both can read the new key, neither writes it yet.
        a.install(&new).unwrap();
        b.install(&new).unwrap();
        // Step 2: a switches first; b still reads a's packets and a still reads b's.
        a.use_key(&new).unwrap();
        assert!(b.open(&a.seal(b"1", b"c"), b"c").is_some());
        assert!(a.open(&b.seal(b"2", b"c"), b"c").is_some());
        assert_eq!(a.remove(&new), Err(KeyError::RemovePrimary));
        // Step 3: once everyone uses the new key, the old one goes.
        b.use_key(&new).unwrap();
        a.remove(&old).unwrap();
        assert_eq!(a.len(), 1);
        let old_only = Keyring::from_base64(&[old]).unwrap();
        assert_eq!(a.open(&old_only.seal(b"3", b"c"), b"c"), None);
        assert_eq!(a.use_key(&generate_key()), Err(KeyError::NotInstalled));
    }

    #[test]
    fn a_message_names_its_key_and_only_that_key_is_tried() {
        let (k1, k2) = (generate_key(), generate_key());
        let ring = Keyring::from_base64(&[k1.clone(), k2.clone()]).unwrap();
        let sealed = ring.seal(b"x", b"c");
        assert_eq!(sealed[0], key_id(&parse_key(&k1).unwrap()));
        // A known id finds its key (collisions among installed keys are tried in turn).
        assert!(ring.candidates(sealed[0]) >= 1);
        // The id is authenticated in effect: naming another key makes the message fail.
        let mut renamed = sealed.clone();
        renamed[0] = key_id(&parse_key(&k2).unwrap());
        if renamed[0] != sealed[0] {
            assert_eq!(ring.open(&renamed, b"c"), None);
        }
        // An id no installed key has is refused without trying any key.
        let unknown = (0..=255u8).find(|id| ring.candidates(*id) == 0).unwrap();
        let mut stray = sealed;
        stray[0] = unknown;
        assert_eq!(ring.open(&stray, b"c"), None);
    }

    #[test]
    fn key_parsing() {
        assert!(parse_key(&generate_key()).is_ok());
        assert!(matches!(
            parse_key("not base64!"),
            Err(KeyError::Invalid(_))
        ));
        assert!(matches!(parse_key("AAAA"), Err(KeyError::Invalid(_))));
        assert_eq!(
            Keyring::from_base64::<&str>(&[]).unwrap_err(),
            KeyError::Empty
        );
    }
}
