//! Cluster-wide key rotation, carried by gossip ([`crate::ClusterHandle::rotate_key`]).
//!
//! Every member publishes its keyring's state in its metadata under the [`EXTENSION`]
//! extension ([`KeyringState`]): the fingerprints of its keys, primary first — never the keys
//! themselves. The member that runs a rotation (the *coordinator*, the one whose admin API was
//! called) adds a [`Rotation`] to its own state: the new key and a [`Phase`]. Metadata travels
//! sealed with the sender's primary key like every gossip message, so the new key is only ever
//! readable by members that already hold a cluster key.
//!
//! The phases are the three steps of a rolling key change, each started only once every active
//! member (Alive or Suspect) reports that it finished the previous one:
//! 1. [`Phase::Install`]: every member adds the new key; it decrypts with it but still encrypts
//!    with the old primary, which everyone can read.
//! 2. [`Phase::Use`]: every member makes the new key primary. Each switches at its own moment;
//!    both keys decrypt everywhere, so nothing is lost in between.
//! 3. [`Phase::Retire`]: every member removes every other key. Nobody encrypts with the old
//!    key any more (every member reported the new primary), so nothing is lost either.
//!
//! Then the coordinator drops the rotation from its metadata, so the key stops travelling.
//! Each member writes its keyring back to its `key_file` after every change.
//!
//! A member that is down during a rotation misses it: it comes back with the old key only and
//! cannot talk to the cluster any more. Give it the new key (its `key_file`) before restarting
//! it. When two rotations overlap, the one with the higher id wins everywhere and the other
//! coordinator gives up with an error.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::keyring::{parse_key, KeyError, Keyring, KEY_LEN};
use crate::runtime::{wall_clock_ms, Command};
use crate::{ClusterError, ClusterHandle, MemberInfo, MemberState, NodeMeta};

/// The metadata extension holding a member's [`KeyringState`]. Owned by the gossip runtime:
/// whatever a caller of `set_meta` puts under this name is replaced.
pub const EXTENSION: &str = "keyring";

/// Format byte in front of the encoded state; a member ignores states in a format it does not
/// know (an older or newer sluice).
const FORMAT: u8 = 1;

/// The first 8 bytes of a key's SHA-256: enough to tell keys apart, says nothing about the key.
pub type Fingerprint = [u8; 8];

/// The fingerprint of a raw key.
pub fn fingerprint_raw(key: &[u8; KEY_LEN]) -> Fingerprint {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(key);
    let mut out = [0u8; 8];
    out.copy_from_slice(&digest[..8]);
    out
}

/// The fingerprint of a base64 key.
pub fn fingerprint(key: &str) -> Result<Fingerprint, KeyError> {
    Ok(fingerprint_raw(&parse_key(key)?))
}

/// A fingerprint as 16 hex digits (as `GET /api/cluster` shows it).
pub fn fingerprint_hex(fp: &Fingerprint) -> String {
    fp.iter().map(|b| format!("{b:02x}")).collect()
}

/// A step of a rotation, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Phase {
    /// Add the new key (decrypt with it).
    Install,
    /// Make it the primary (encrypt with it).
    Use,
    /// Remove every other key.
    Retire,
}

impl Phase {
    /// Lower-case name, for logs and errors.
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Install => "install",
            Phase::Use => "use",
            Phase::Retire => "retire",
        }
    }

    /// Whether a member whose keys are `keys` (primary first) has done this phase for `new`.
    pub fn done_by(self, keys: &[Fingerprint], new: &Fingerprint) -> bool {
        match self {
            Phase::Install => keys.contains(new),
            Phase::Use => keys.first() == Some(new),
            Phase::Retire => keys == [*new],
        }
    }
}

/// A rotation in progress, as its coordinator publishes it.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rotation {
    /// Orders overlapping rotations: the coordinator's wall-clock milliseconds, raised above
    /// every rotation id it has seen.
    pub id: u64,
    /// The new key (base64).
    pub key: String,
    /// What every member should do now.
    pub phase: Phase,
}

impl std::fmt::Debug for Rotation {
    // Never print key material.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rotation")
            .field("id", &self.id)
            .field("phase", &self.phase)
            .finish()
    }
}

/// What every member publishes under [`EXTENSION`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyringState {
    /// Fingerprints of the installed keys, primary first.
    pub keys: Vec<Fingerprint>,
    /// The rotation this member coordinates, if any.
    pub rotation: Option<Rotation>,
    /// The highest rotation id this member has followed, so that a later rotation started on
    /// a member whose clock is behind still gets a higher id.
    pub applied: u64,
}

impl KeyringState {
    /// The state of `ring`, with the rotation this member coordinates and the highest one it
    /// followed.
    pub fn of_ring(ring: &Keyring, rotation: Option<Rotation>, applied: u64) -> KeyringState {
        KeyringState {
            keys: ring.fingerprints(),
            rotation,
            applied,
        }
    }

    /// The state a member published; `None` when it publishes none (an older sluice) or one in
    /// a format this version does not read.
    pub fn of(meta: &NodeMeta) -> Option<KeyringState> {
        let bytes = meta.extensions.get(EXTENSION)?;
        let (format, body) = bytes.split_first()?;
        (*format == FORMAT)
            .then(|| postcard::from_bytes(body).ok())
            .flatten()
    }

    /// The bytes to publish.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT];
        out.extend(postcard::to_allocvec(self).expect("serializing plain data cannot fail"));
        out
    }
}

/// The rotation other members ask for now: the one with the highest id among those published
/// by alive members other than this one.
pub fn winning(members: &[MemberInfo]) -> Option<(Rotation, &MemberInfo)> {
    members
        .iter()
        .filter(|m| !m.is_self && m.state == MemberState::Alive)
        .filter_map(|m| Some((KeyringState::of(&m.meta)?.rotation?, m)))
        .max_by_key(|(r, m)| (r.id, r.phase, m.gossip_addr))
}

/// Brings `ring` to where `rotation`'s phase wants it (doing the earlier phases too, for a
/// member that missed them). Returns whether the keyring changed.
pub fn apply(ring: &mut Keyring, rotation: &Rotation) -> Result<bool, KeyError> {
    let new = fingerprint(&rotation.key)?;
    let before = ring.fingerprints();
    ring.install(&rotation.key)?;
    if rotation.phase >= Phase::Use {
        ring.use_key(&rotation.key)?;
    }
    if rotation.phase >= Phase::Retire {
        ring.retain_primary();
    }
    debug_assert!(rotation.phase.done_by(&ring.fingerprints(), &new));
    Ok(ring.fingerprints() != before)
}

// The coordinator's side: announcing each phase and waiting for every member's confirmation.

/// A completed cluster-wide key rotation ([`ClusterHandle::rotate_key`]).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RotationReport {
    /// The rotation's id.
    pub id: u64,
    /// Fingerprint of the new key (16 hex digits).
    pub fingerprint: String,
    /// Name and gossip address of every member that confirmed the last phase, this one included.
    pub members: Vec<(String, SocketAddr)>,
}

// The rotation a coordinator announces, withdrawn from its metadata when dropped.
struct Announced<'a>(&'a tokio::sync::mpsc::UnboundedSender<Command>);

impl Drop for Announced<'_> {
    fn drop(&mut self) {
        // A stopped member publishes nothing any more: nothing to withdraw.
        let _ = self.0.send(Command::Rotate(None));
    }
}

impl ClusterHandle {
    /// Rotates the whole cluster to `key` (base64): every active member installs it, then
    /// makes it primary, then removes every other key, each phase starting once every member
    /// reported the previous one done (see [`crate::rotation`]). Returns the members that took
    /// part, or an error naming the members that did not confirm a phase within `limit`; the
    /// cluster keeps working at whatever phase it stopped.
    pub async fn rotate_key(
        &self,
        key: &str,
        limit: Duration,
    ) -> Result<RotationReport, ClusterError> {
        let fp = fingerprint(key)?;
        let deadline = Instant::now() + limit;
        let seen = self
            .members_snapshot()
            .iter()
            .filter_map(|m| KeyringState::of(&m.meta))
            .map(|k| k.applied.max(k.rotation.map_or(0, |r| r.id)))
            .max()
            .unwrap_or(0);
        let id = wall_clock_ms().max(seen + 1);
        let mut changes = self.changes();
        let mut confirmed = Vec::new();
        // However this ends (done, refused, or the caller gone), the key stops travelling.
        let _announced = Announced(&self.commands);
        for phase in [Phase::Install, Phase::Use, Phase::Retire] {
            let r = Rotation {
                id,
                key: key.to_string(),
                phase,
            };
            self.commands
                .send(Command::Rotate(Some(r)))
                .map_err(|_| ClusterError::Stopped)?;
            tracing::info!(
                rotation = id,
                phase = phase.as_str(),
                "key rotation: phase announced"
            );
            loop {
                let members = self.members_snapshot();
                if let Some((other, by)) = winning(&members) {
                    if other.id > id {
                        return Err(ClusterError::Rotation(format!(
                            "a later rotation started by {} ({}) replaced this one; it finishes the job, or run this one again after it",
                            by.meta.name, by.gossip_addr
                        )));
                    }
                }
                let own_done = phase.done_by(&self.shared.keyring.load().fingerprints(), &fp);
                let pending: Vec<String> = members
                    .iter()
                    .filter(|m| !m.is_self && m.state.is_active())
                    .filter(|m| {
                        !KeyringState::of(&m.meta).is_some_and(|k| phase.done_by(&k.keys, &fp))
                    })
                    .map(|m| format!("{} ({})", m.meta.name, m.gossip_addr))
                    .collect();
                if own_done && pending.is_empty() {
                    confirmed = members
                        .iter()
                        .filter(|m| m.is_self || m.state.is_active())
                        .map(|m| (m.meta.name.clone(), m.gossip_addr))
                        .collect();
                    break;
                }
                if Instant::now() >= deadline {
                    let earlier = match phase {
                        Phase::Install => "no member uses the new key yet".to_string(),
                        _ => {
                            "every member has done the earlier phases, so the cluster keeps working"
                                .to_string()
                        }
                    };
                    return Err(ClusterError::Rotation(format!(
                        "phase {} was not confirmed within {limit:?} by {}; {earlier}. Check that they run a sluice that rotates keys and are reachable, then run the rotation again",
                        phase.as_str(),
                        if pending.is_empty() { "this member".to_string() } else { pending.join(", ") },
                    )));
                }
                let next = deadline.min(Instant::now() + Duration::from_millis(100));
                if let Ok(Err(_)) = tokio::time::timeout_at(next, changes.changed()).await {
                    return Err(ClusterError::Stopped);
                }
            }
        }
        tracing::info!(
            rotation = id,
            members = confirmed.len(),
            "key rotation complete: every member uses the new key alone"
        );
        Ok(RotationReport {
            id,
            fingerprint: fingerprint_hex(&fp),
            members: confirmed,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{generate_key, Role};

    fn member(name: &str, port: u16, state: MemberState, ks: Option<KeyringState>) -> MemberInfo {
        let mut meta = NodeMeta::new(name, Role::Backend);
        if let Some(ks) = ks {
            meta.extensions.insert(EXTENSION.into(), ks.encode());
        }
        MemberInfo {
            meta,
            gossip_addr: ([127, 0, 0, 1], port).into(),
            state,
            incarnation: 0,
            generation: 1,
            meta_version: 1,
            last_change_ms: 0,
            is_self: false,
            suspectors: 0,
        }
    }

    #[test]
    fn phases_bring_every_keyring_to_the_new_key_alone() {
        let (old, extra, new) = (generate_key(), generate_key(), generate_key());
        let mut ring = Keyring::from_base64(&[old.clone(), extra]).unwrap();
        let fp = fingerprint(&new).unwrap();
        let mut r = Rotation {
            id: 1,
            key: new.clone(),
            phase: Phase::Install,
        };
        assert!(apply(&mut ring, &r).unwrap());
        assert!(
            !apply(&mut ring, &r).unwrap(),
            "applying twice changes nothing"
        );
        assert!(Phase::Install.done_by(&ring.fingerprints(), &fp));
        assert!(!Phase::Use.done_by(&ring.fingerprints(), &fp));
        assert_eq!(
            ring.keys_base64()[0],
            old,
            "still encrypting with the old key"
        );
        r.phase = Phase::Use;
        assert!(apply(&mut ring, &r).unwrap());
        assert!(Phase::Use.done_by(&ring.fingerprints(), &fp));
        assert_eq!(ring.len(), 3, "every key still decrypts");
        r.phase = Phase::Retire;
        assert!(apply(&mut ring, &r).unwrap());
        assert_eq!(ring.keys_base64(), std::slice::from_ref(&new));
        // A member that missed the first phases does them all at once.
        let mut late = Keyring::from_base64(std::slice::from_ref(&old)).unwrap();
        assert!(apply(&mut late, &r).unwrap());
        assert_eq!(late.keys_base64(), [new]);
        r.key = "short".into();
        assert!(apply(&mut late, &r).is_err());
    }

    #[test]
    fn the_highest_rotation_of_an_alive_member_wins_and_states_round_trip() {
        let key = generate_key();
        let ks = |id: u64, phase: Phase| KeyringState {
            keys: vec![fingerprint(&key).unwrap()],
            rotation: Some(Rotation {
                id,
                key: key.clone(),
                phase,
            }),
            applied: 0,
        };
        let members = vec![
            member("a", 1, MemberState::Alive, Some(ks(5, Phase::Use))),
            member("b", 2, MemberState::Suspect, Some(ks(9, Phase::Install))),
            member("c", 3, MemberState::Alive, Some(ks(7, Phase::Install))),
            member("d", 4, MemberState::Alive, None),
        ];
        let (r, by) = winning(&members).unwrap();
        assert_eq!(
            (r.id, r.phase, by.meta.name.as_str()),
            (7, Phase::Install, "c")
        );
        assert_eq!(KeyringState::of(&members[0].meta), Some(ks(5, Phase::Use)));
        assert_eq!(KeyringState::of(&members[3].meta), None);
        let mut unknown = members[0].clone();
        unknown
            .meta
            .extensions
            .insert(EXTENSION.into(), vec![99, 1, 2]);
        assert_eq!(KeyringState::of(&unknown.meta), None, "a future format");
        assert!(!format!("{r:?}").contains(&key), "keys are never printed");
        assert_eq!(
            fingerprint_hex(&[0, 1, 2, 3, 4, 5, 6, 0xff]),
            "00010203040506ff"
        );
    }
}
