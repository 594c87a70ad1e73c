//! What a proxy does with the membership view, shared by the proxy and the simulator so that
//! the simulator measures the rules production applies.
//!
//! - [`HoldPolicy`]: a Suspect member's services get no new requests only once the suspicion
//!   is corroborated — by enough independent suspectors, or by lasting long enough. A single
//!   node's failed probe (a slow proxy, one lossy link) is refuted within a second or two and
//!   should not move traffic anywhere.
//! - [`LastKnownGood`]: a node that sees every other member fail (it is the one cut off), or a
//!   large share of them fail at once, keeps its pools as they were instead of emptying them.

use std::time::Duration;

use super::{MemberInfo, MemberState};

/// When a Suspect member's services are held (kept in the pool, no new requests).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldPolicy {
    /// Held once this many members independently failed to reach it.
    pub suspectors: u32,
    /// Held once this node has seen it suspect for this long, whatever the count.
    pub after: Duration,
}

impl Default for HoldPolicy {
    /// Two suspectors or 3 s. A crashed member is probed by about one member per second, so a
    /// second independent suspector is typically heard of within 1–3 s; a false suspicion from
    /// one slow or badly connected node is usually refuted in under 2 s. Lower values hold
    /// crashed members sooner at the price of holding healthy ones on every false suspicion.
    fn default() -> Self {
        HoldPolicy {
            suspectors: 2,
            after: Duration::from_secs(3),
        }
    }
}

impl HoldPolicy {
    /// Whether `m`'s services are held at `now_ms` (same clock as `m.last_change_ms`) because
    /// it is suspect. Draining is a separate reason to hold, decided by the caller.
    pub fn holds(&self, m: &MemberInfo, now_ms: u64) -> bool {
        m.state == MemberState::Suspect
            && self.holds_suspect(m.suspectors, m.last_change_ms, now_ms)
    }

    /// Whether a member suspect since `since_ms` by `suspectors` members is held at `now_ms`.
    pub fn holds_suspect(&self, suspectors: u32, since_ms: u64, now_ms: u64) -> bool {
        suspectors >= self.suspectors
            || now_ms.saturating_sub(since_ms) >= self.after.as_millis() as u64
    }

    /// When a suspect member that is not held yet will be held if nothing changes.
    pub fn held_at(&self, m: &MemberInfo, now_ms: u64) -> Option<u64> {
        (m.state == MemberState::Suspect && !self.holds(m, now_ms))
            .then(|| m.last_change_ms + self.after.as_millis() as u64)
    }
}

/// Counts over the view, other members only.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ViewHealth {
    /// Members that have not left.
    pub others: usize,
    /// Of those, Alive.
    pub alive: usize,
    /// Of those, Suspect or Down.
    pub failed: usize,
    /// Failed members whose state changed within the window.
    pub failed_recently: usize,
}

impl ViewHealth {
    /// Counts `members` at `now_ms`; "recently" means within `window`.
    pub fn of(members: &[MemberInfo], now_ms: u64, window: Duration) -> ViewHealth {
        let since = now_ms.saturating_sub(window.as_millis() as u64);
        let mut h = ViewHealth::default();
        for m in members.iter().filter(|m| !m.is_self) {
            match m.state {
                MemberState::Left => continue,
                MemberState::Alive => h.alive += 1,
                MemberState::Suspect | MemberState::Down => {
                    h.failed += 1;
                    if m.last_change_ms >= since {
                        h.failed_recently += 1;
                    }
                }
            }
            h.others += 1;
        }
        h
    }
}

/// Why the pools keep their last-known-good contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Freeze {
    /// No other member is alive: this node is probably the one cut off.
    Isolated,
    /// More than the configured share of the members failed within the window.
    MassFailure {
        /// Members failed (suspect or down) now.
        failed: usize,
        /// Members that have not left.
        of: usize,
    },
}

impl std::fmt::Display for Freeze {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Freeze::Isolated => {
                f.write_str("no other cluster member is reachable (this node may be cut off)")
            }
            Freeze::MassFailure { failed, of } => {
                write!(f, "{failed} of {of} cluster members failed at once")
            }
        }
    }
}

/// Decides, view after view, whether pools follow the membership or keep what they had.
///
/// Enters when no other member is alive, or when more than `share` of the members (and at
/// least two) failed within `window`. Leaves when some member is alive again and the members
/// failed now, whatever their age, are back to `share` or fewer (they returned, left, or were
/// forgotten). Members that leave gracefully never count as failed. A node that saw nobody
/// alive stays frozen after it forgot the failed members, until one is alive again.
#[derive(Debug, Clone)]
pub struct LastKnownGood {
    share: f64,
    window: Duration,
    frozen: Option<Freeze>,
}

impl LastKnownGood {
    /// A guard that triggers above `share` (0–1) failed within `window`.
    pub fn new(share: f64, window: Duration) -> LastKnownGood {
        LastKnownGood {
            share,
            window,
            frozen: None,
        }
    }

    /// Looks at a new view; returns the reason to keep the last-known-good pools, if any.
    pub fn update(&mut self, members: &[MemberInfo], now_ms: u64) -> Option<Freeze> {
        let h = ViewHealth::of(members, now_ms, self.window);
        let limit = self.share * h.others as f64;
        // Once isolated, a node stays so while nobody is alive, also after it has forgotten
        // every failed member (`forget_after`): forgetting is not news from the cluster. Only
        // members that left gracefully end it.
        let left = members
            .iter()
            .any(|m| !m.is_self && m.state == MemberState::Left);
        let forgotten = h.others == 0 && !left && self.frozen == Some(Freeze::Isolated);
        let isolated = (h.others > 0 || forgotten) && h.alive == 0;
        // Entering takes a burst of recent failures; staying takes only that they persist.
        let stays = self.frozen.is_some() && h.failed as f64 > limit;
        let enters = h.failed_recently >= 2 && h.failed_recently as f64 > limit;
        self.frozen = if isolated {
            Some(Freeze::Isolated)
        } else if stays || enters {
            Some(Freeze::MassFailure {
                failed: h.failed,
                of: h.others,
            })
        } else {
            None
        };
        self.frozen
    }

    /// The current reason, as of the last update.
    pub fn frozen(&self) -> Option<Freeze> {
        self.frozen
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{NodeMeta, Role};

    fn m(i: u16, state: MemberState, changed: u64, suspectors: u32) -> MemberInfo {
        MemberInfo {
            meta: NodeMeta::new(format!("n{i}"), Role::Backend),
            gossip_addr: ([127, 0, 0, 1], i).into(),
            state,
            incarnation: 0,
            generation: 1,
            meta_version: 1,
            last_change_ms: changed,
            is_self: i == 0,
            suspectors,
        }
    }

    #[test]
    fn a_suspect_is_held_after_enough_suspectors_or_time() {
        let p = HoldPolicy::default();
        let lone = m(1, MemberState::Suspect, 10_000, 1);
        assert!(!p.holds(&lone, 12_999));
        assert_eq!(p.held_at(&lone, 12_999), Some(13_000));
        assert!(p.holds(&lone, 13_000));
        assert!(p.holds(&m(1, MemberState::Suspect, 10_000, 2), 10_000));
        assert!(!p.holds(&m(1, MemberState::Alive, 0, 0), 99_999));
    }

    #[test]
    fn isolation_and_mass_failure_freeze_until_members_return() {
        let mut g = LastKnownGood::new(0.3, Duration::from_secs(10));
        let mut view: Vec<MemberInfo> = (0..10).map(|i| m(i, MemberState::Alive, 0, 0)).collect();
        assert_eq!(g.update(&view, 60_000), None);
        // One failure is churn, not a mass failure.
        view[1].state = MemberState::Down;
        view[1].last_change_ms = 60_000;
        assert_eq!(g.update(&view, 60_000), None);
        // Four of nine within the window: keep the pools.
        for v in &mut view[2..5] {
            v.state = MemberState::Suspect;
            v.last_change_ms = 61_000;
        }
        assert_eq!(
            g.update(&view, 61_000),
            Some(Freeze::MassFailure { failed: 4, of: 9 })
        );
        // Still frozen long after the window while they stay failed.
        assert!(g.update(&view, 600_000).is_some());
        // Two come back: 2 of 9 is under the share.
        view[2].state = MemberState::Alive;
        view[3].state = MemberState::Alive;
        assert_eq!(g.update(&view, 600_000), None);
        // Everyone else failed: isolated.
        for v in &mut view[1..] {
            v.state = MemberState::Down;
        }
        assert_eq!(g.update(&view, 600_000), Some(Freeze::Isolated));
        // Still isolated once every failed member is forgotten.
        let alone = vec![view[0].clone()];
        assert_eq!(g.update(&alone, 9_000_000), Some(Freeze::Isolated));
        // Members that left do not count.
        for v in &mut view[1..] {
            v.state = MemberState::Left;
        }
        assert_eq!(g.update(&view, 600_000), None);
    }
}
