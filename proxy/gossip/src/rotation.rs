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
//! it. When two rotations overlap, the one with the higher id wins everywhere (two coordinators
//! that picked the same id: the one with the higher gossip address, whatever their phases) and
//! the other coordinator gives up with an error.

use std::net::SocketAddr;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::clock::wall_ms;
use crate::keyring::{parse_key, KeyError, Keyring, KEY_LEN};
use crate::runtime::Command;
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
    /// Why this member's last keyring change could not be written to its key file, while that
    /// lasts: a rotation does not go past [`Phase::Install`] then (the member would restart
    /// with a key nobody accepts any more).
    pub persist_error: Option<String>,
}

// The state as the first rotating sluice published it, without `persist_error`.
#[derive(Deserialize)]
struct KeyringStateV1 {
    keys: Vec<Fingerprint>,
    rotation: Option<Rotation>,
    applied: u64,
}

impl KeyringState {
    /// The state of `ring`, with the rotation this member coordinates and the highest one it
    /// followed.
    pub fn of_ring(
        ring: &Keyring,
        rotation: Option<Rotation>,
        applied: u64,
        persist_error: Option<String>,
    ) -> KeyringState {
        KeyringState {
            keys: ring.fingerprints(),
            rotation,
            applied,
            persist_error,
        }
    }

    /// The state a member published; `None` when it publishes none (an older sluice) or one in
    /// a format this version does not read.
    pub fn of(meta: &NodeMeta) -> Option<KeyringState> {
        let bytes = meta.extensions.get(EXTENSION)?;
        let (format, body) = bytes.split_first()?;
        if *format != FORMAT {
            return None;
        }
        postcard::from_bytes(body).ok().or_else(|| {
            let v1: KeyringStateV1 = postcard::from_bytes(body).ok()?;
            Some(KeyringState {
                keys: v1.keys,
                rotation: v1.rotation,
                applied: v1.applied,
                persist_error: None,
            })
        })
    }

    /// The bytes to publish.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = vec![FORMAT];
        out.extend(postcard::to_allocvec(self).expect("serializing plain data cannot fail"));
        out
    }
}

/// Which of two rotations wins: the higher id, then (two coordinators that picked one id in the
/// same millisecond) the higher address of the member that publishes it. Never the phase: of
/// two rotations with one id, the one further along would win now and lose at its rival's next
/// step, and members would switch between two new keys.
pub fn precedence(r: &Rotation, by: SocketAddr) -> (u64, SocketAddr) {
    (r.id, by)
}

/// The rotation other members ask for now: the one with the highest id among those published
/// by alive members other than this one.
///
/// Rotation ids are wall-clock milliseconds; one more than [`MAX_ID_AHEAD`] ahead of this
/// node's clock is ignored, so that a bogus id (near `u64::MAX`) cannot win every later
/// rotation or leave no id above it.
pub fn winning(members: &[MemberInfo]) -> Option<(Rotation, &MemberInfo)> {
    winning_at(members, wall_ms())
}

/// How far ahead of this node's wall clock a rotation id may be: a day, far more than any
/// clock skew a cluster runs with.
pub const MAX_ID_AHEAD: Duration = Duration::from_secs(24 * 3600);

fn plausible_id(id: u64, now_ms: u64) -> bool {
    id <= now_ms.saturating_add(MAX_ID_AHEAD.as_millis() as u64)
}

fn winning_at(members: &[MemberInfo], now_ms: u64) -> Option<(Rotation, &MemberInfo)> {
    members
        .iter()
        .filter(|m| !m.is_self && m.state == MemberState::Alive)
        .filter_map(|m| Some((KeyringState::of(&m.meta)?.rotation?, m)))
        .filter(|(r, _)| plausible_id(r.id, now_ms))
        .max_by_key(|(r, m)| precedence(r, m.gossip_addr))
}

/// The id for a new rotation started at `now_ms`: above every plausible id any member
/// published (see [`winning`]).
pub fn next_id(members: &[MemberInfo], now_ms: u64) -> Result<u64, ClusterError> {
    let seen = members
        .iter()
        .filter_map(|m| KeyringState::of(&m.meta))
        .flat_map(|k| [k.applied, k.rotation.map_or(0, |r| r.id)])
        .filter(|id| plausible_id(*id, now_ms))
        .max()
        .unwrap_or(0);
    let after = seen.checked_add(1).ok_or_else(|| {
        ClusterError::Rotation("rotation ids are exhausted (an id at the largest value was published); restart the members with a correct clock".into())
    })?;
    Ok(now_ms.max(after))
}

/// Whether a rotation waits for `m`: active or Down (a Down member may come back; it must not
/// miss the rotation, or it keeps a key nobody accepts any more), unless it is a Down member
/// named in `exclude`. Members that left are not waited for.
fn awaited(m: &MemberInfo, exclude: &[String]) -> bool {
    match m.state {
        MemberState::Alive | MemberState::Suspect => true,
        MemberState::Down => !exclude.contains(&m.meta.name),
        MemberState::Left => false,
    }
}

/// Members other than this one whose confirmation a phase still waits for ([`awaited`]), as
/// `name (address)`.
pub fn pending(
    members: &[MemberInfo],
    phase: Phase,
    new: &Fingerprint,
    exclude: &[String],
) -> Vec<String> {
    members
        .iter()
        .filter(|m| !m.is_self && awaited(m, exclude))
        .filter(|m| !KeyringState::of(&m.meta).is_some_and(|k| phase.done_by(&k.keys, new)))
        .map(|m| {
            let down = if m.state == MemberState::Down {
                ", down"
            } else {
                ""
            };
            format!("{} ({}{down})", m.meta.name, m.gossip_addr)
        })
        .collect()
}

/// Members (this one included) that report a key file they could not write, as
/// `name (address): problem`.
pub fn persist_failures(members: &[MemberInfo]) -> Vec<String> {
    members
        .iter()
        .filter(|m| m.is_self || m.state != MemberState::Left)
        .filter_map(|m| {
            let e = KeyringState::of(&m.meta)?.persist_error?;
            Some(format!("{} ({}): {e}", m.meta.name, m.gossip_addr))
        })
        .collect()
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

// This node's one rotation at a time: taken by `rotate_key`, given back when dropped.
struct Coordinating<'a>(&'a std::sync::atomic::AtomicBool);

impl<'a> Coordinating<'a> {
    fn take(flag: &'a std::sync::atomic::AtomicBool) -> Option<Coordinating<'a>> {
        use std::sync::atomic::Ordering;
        flag.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
            .then_some(Coordinating(flag))
    }
}

impl Drop for Coordinating<'_> {
    fn drop(&mut self) {
        self.0.store(false, std::sync::atomic::Ordering::Release);
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
        self.rotate_key_excluding(key, limit, &[]).await
    }

    /// [`Self::rotate_key`], not waiting for the Down members named in `exclude` (members seen
    /// as Down are waited for otherwise: they may only be cut off and come back). An excluded
    /// member keeps the old key: give it the new one out of band before it rejoins.
    ///
    /// One rotation at a time per node: a second call while one runs fails with
    /// [`ClusterError::Busy`].
    pub async fn rotate_key_excluding(
        &self,
        key: &str,
        limit: Duration,
        exclude: &[String],
    ) -> Result<RotationReport, ClusterError> {
        let fp = fingerprint(key)?;
        let Some(_coordinating) = Coordinating::take(&self.shared.coordinating) else {
            return Err(ClusterError::Busy(
                "this node already coordinates a key rotation; wait for it to end (its caller gets the result), then run this one again if it is still needed".into(),
            ));
        };
        let deadline = Instant::now() + limit;
        let id = next_id(&self.members_snapshot(), wall_ms())?;
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
                .send(Command::Rotate(Some(r.clone())))
                .map_err(|_| ClusterError::Stopped)?;
            tracing::info!(
                rotation = id,
                phase = phase.as_str(),
                "key rotation: phase announced"
            );
            loop {
                let members = self.members_snapshot();
                if let Some((other, by)) = winning(&members) {
                    if precedence(&other, by.gossip_addr) > precedence(&r, self.gossip_addr()) {
                        return Err(ClusterError::Rotation(format!(
                            "a later rotation started by {} ({}) replaced this one; it finishes the job, or run this one again after it",
                            by.meta.name, by.gossip_addr
                        )));
                    }
                }
                let own_done = phase.done_by(&self.shared.keyring.load().fingerprints(), &fp);
                let pending = pending(&members, phase, &fp, exclude);
                // Past Install a member that cannot write its key file would restart with a
                // key nobody accepts any more.
                if own_done && pending.is_empty() {
                    let failures = persist_failures(&members);
                    if phase == Phase::Install && !failures.is_empty() {
                        return Err(ClusterError::Rotation(format!(
                            "stopped after the install phase (no member uses the new key yet): the key file could not be written on {}; fix that (the path must be writable by sluice, or set [cluster] key_file elsewhere), then run the rotation again",
                            failures.join("; ")
                        )));
                    }
                    confirmed = members
                        .iter()
                        .filter(|m| m.is_self || awaited(m, exclude))
                        .map(|m| (m.meta.name.clone(), m.gossip_addr))
                        .collect();
                    break;
                }
                if Instant::now() >= deadline {
                    let earlier = if phase == Phase::Install {
                        "no member uses the new key yet"
                    } else {
                        "every member has done the earlier phases, so the cluster keeps working"
                    };
                    return Err(ClusterError::Rotation(format!(
                        "phase {} was not confirmed within {limit:?} by {}; {earlier}. Check that they run a sluice that rotates keys and are reachable, then run the rotation again; a member that is down for good can be left out with --exclude NAME (give it the new key before it comes back)",
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
            persist_error: None,
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
        // Two coordinators with one id: the higher address wins, however far each has got.
        let tie = vec![
            member("e", 5, MemberState::Alive, Some(ks(7, Phase::Use))),
            member("f", 6, MemberState::Alive, Some(ks(7, Phase::Install))),
        ];
        let (r, by) = winning(&tie).unwrap();
        assert_eq!((r.phase, by.meta.name.as_str()), (Phase::Install, "f"));
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

    fn ks_with(keys: &[&str], rotation: Option<Rotation>, applied: u64) -> KeyringState {
        KeyringState {
            keys: keys.iter().map(|k| fingerprint(k).unwrap()).collect(),
            rotation,
            applied,
            persist_error: None,
        }
    }

    #[test]
    fn down_members_are_waited_for_unless_excluded_and_left_ones_never() {
        let (old, new) = (generate_key(), generate_key());
        let fp = fingerprint(&new).unwrap();
        let members = vec![
            member(
                "up",
                1,
                MemberState::Alive,
                Some(ks_with(&[&old, &new], None, 0)),
            ),
            member(
                "cut-off",
                2,
                MemberState::Down,
                Some(ks_with(&[&old], None, 0)),
            ),
            member(
                "gone",
                3,
                MemberState::Left,
                Some(ks_with(&[&old], None, 0)),
            ),
            member(
                "slow",
                4,
                MemberState::Suspect,
                Some(ks_with(&[&old], None, 0)),
            ),
        ];
        assert_eq!(
            pending(&members, Phase::Install, &fp, &[]),
            ["cut-off (127.0.0.1:2, down)", "slow (127.0.0.1:4)"]
        );
        assert_eq!(
            pending(
                &members,
                Phase::Install,
                &fp,
                &["cut-off".into(), "slow".into()]
            ),
            ["slow (127.0.0.1:4)"],
            "only Down members can be excluded"
        );
    }

    #[test]
    fn a_member_that_cannot_write_its_key_file_is_named() {
        let key = generate_key();
        let mut broken = ks_with(&[&key], None, 0);
        broken.persist_error = Some("/etc/sluice/cluster.key: read-only".into());
        let mut me = member("me", 1, MemberState::Alive, Some(broken.clone()));
        me.is_self = true;
        let members = vec![
            me,
            member("ok", 2, MemberState::Alive, Some(ks_with(&[&key], None, 0))),
            member("gone", 3, MemberState::Left, Some(broken)),
        ];
        assert_eq!(
            persist_failures(&members),
            ["me (127.0.0.1:1): /etc/sluice/cluster.key: read-only"]
        );
        // The state round-trips with the error, and a state without it (the first format)
        // still reads.
        let st = KeyringState::of(&members[0].meta).unwrap();
        assert!(st.persist_error.is_some());
        #[derive(Serialize)]
        struct V1 {
            keys: Vec<Fingerprint>,
            rotation: Option<Rotation>,
            applied: u64,
        }
        let mut bytes = vec![FORMAT];
        bytes.extend(
            postcard::to_allocvec(&V1 {
                keys: st.keys.clone(),
                rotation: None,
                applied: 3,
            })
            .unwrap(),
        );
        let mut meta = NodeMeta::new("v1", Role::Backend);
        meta.extensions.insert(EXTENSION.into(), bytes);
        let v1 = KeyringState::of(&meta).unwrap();
        assert_eq!((v1.keys, v1.applied, v1.persist_error), (st.keys, 3, None));
    }

    #[test]
    fn rotation_ids_never_overflow_and_ids_far_ahead_are_ignored() {
        let key = generate_key();
        let now = 1_000_000;
        let rot = |id| {
            Some(Rotation {
                id,
                key: key.clone(),
                phase: Phase::Install,
            })
        };
        let bogus = vec![
            member(
                "a",
                1,
                MemberState::Alive,
                Some(ks_with(&[&key], rot(u64::MAX), u64::MAX)),
            ),
            member(
                "b",
                2,
                MemberState::Alive,
                Some(ks_with(&[&key], rot(now + 5), 0)),
            ),
        ];
        let (r, by) = winning_at(&bogus, now).unwrap();
        assert_eq!((r.id, by.meta.name.as_str()), (now + 5, "b"));
        assert_eq!(next_id(&bogus, now).unwrap(), now + 6);
        // Only bogus ids: the clock.
        assert_eq!(next_id(&bogus[..1], now).unwrap(), now);
        assert!(winning_at(&bogus[..1], now).is_none());
        // Within a day ahead counts (clock skew); the largest id plausible at a clock near the
        // end of time leaves no id above it, which is an error rather than a wrap to 0.
        let day = MAX_ID_AHEAD.as_millis() as u64;
        let ahead = vec![member(
            "c",
            3,
            MemberState::Alive,
            Some(ks_with(&[&key], rot(now + day), 0)),
        )];
        assert_eq!(next_id(&ahead, now).unwrap(), now + day + 1);
        assert!(next_id(&bogus[..1], u64::MAX - 1).is_err());
    }
}
