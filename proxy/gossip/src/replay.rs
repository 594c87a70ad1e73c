//! Replay protection: which authenticated messages a node has already accepted.
//!
//! Every sealed message carries a [`Stamp`] (sender session, counter, wall-clock second; see
//! [`crate::wire`]). A [`ReplayGuard`] accepts a stamp once:
//! - its second must lie within [`MAX_SKEW_S`] of the receiver's clock, so a message captured
//!   earlier is refused even by a receiver that has never heard of its session (after a
//!   restart, or once the session was evicted);
//! - per session, a sliding window of the last [`WINDOW`] counters (a bitmap indexed by counter,
//!   as in RFC 6479) remembers which were seen; a counter seen before, or older than the window,
//!   is refused.
//!
//! The counter is the sender's count over *all* its messages, to every member, so a receiver
//! sees gaps; the window only has to cover the messages the sender seals while one of them is
//! in flight. 960 counters is seconds of a busy node's traffic, more than any datagram or frame
//! spends on the way; a message delayed beyond that is dropped as if lost.
//!
//! The table holds at most [`MAX_SESSIONS`] sessions (about 150 bytes each) and evicts the one
//! heard from least recently. Only authenticated messages reach it, so only key holders create
//! sessions: one per member process start. Nodes on clocks further apart than the skew cannot
//! talk; keep clocks synchronised (NTP).

use std::collections::HashMap;

use crate::wire::Stamp;

/// How far a message's send time may be from the receiver's clock, in seconds.
pub const MAX_SKEW_S: u64 = 120;
/// Sessions remembered; beyond that the least recently heard is forgotten.
pub const MAX_SESSIONS: usize = 4096;
const WORDS: usize = 16;
/// Counters behind the newest that a session's window still tells apart.
pub const WINDOW: u64 = (WORDS as u64 - 1) * 64;

/// Why a stamp was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Seen before.
    Replay,
    /// Older than the session's window.
    TooOld,
    /// Sent more than [`MAX_SKEW_S`] from our clock.
    Skew,
}

struct Window {
    // Newest counter accepted.
    top: u64,
    bits: [u64; WORDS],
    // When this session was last accepted from, in the guard's accept count.
    used: u64,
}

impl Window {
    fn new(counter: u64, used: u64) -> Window {
        let mut w = Window {
            top: counter,
            bits: [0; WORDS],
            used,
        };
        w.bits[Self::word(counter)] |= Self::bit(counter);
        w
    }

    fn word(counter: u64) -> usize {
        ((counter / 64) % WORDS as u64) as usize
    }

    fn bit(counter: u64) -> u64 {
        1 << (counter % 64)
    }

    fn accept(&mut self, counter: u64) -> Result<(), Refusal> {
        if counter > self.top {
            // Clear the words the window slides over (all of them after a long jump).
            let (from, to) = (self.top / 64, counter / 64);
            for i in 1..=(to - from).min(WORDS as u64) {
                self.bits[Self::word((from + i) * 64)] = 0;
            }
            self.top = counter;
        } else if self.top - counter >= WINDOW {
            return Err(Refusal::TooOld);
        }
        let (w, b) = (Self::word(counter), Self::bit(counter));
        if self.bits[w] & b != 0 {
            return Err(Refusal::Replay);
        }
        self.bits[w] |= b;
        Ok(())
    }
}

/// The receiver's memory of accepted stamps. See the module docs.
#[derive(Default)]
pub struct ReplayGuard {
    sessions: HashMap<u64, Window>,
    accepted: u64,
}

impl std::fmt::Debug for ReplayGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplayGuard")
            .field("sessions", &self.sessions.len())
            .finish()
    }
}

impl ReplayGuard {
    /// Accepts `stamp` if it is new and its send time within the skew of `now_s` (our wall
    /// clock, seconds since the Unix epoch); records it.
    pub fn accept(&mut self, stamp: &Stamp, now_s: u64) -> Result<(), Refusal> {
        if u64::from(stamp.sent_at_s).abs_diff(now_s) > MAX_SKEW_S {
            return Err(Refusal::Skew);
        }
        self.accepted += 1;
        let used = self.accepted;
        if let Some(w) = self.sessions.get_mut(&stamp.session) {
            w.accept(stamp.counter)?;
            w.used = used;
            return Ok(());
        }
        if self.sessions.len() >= MAX_SESSIONS {
            // O(sessions), but only when a new session arrives at a full table: a member
            // process starting in a cluster larger than the table.
            if let Some(oldest) = self
                .sessions
                .iter()
                .min_by_key(|(_, w)| w.used)
                .map(|(s, _)| *s)
            {
                self.sessions.remove(&oldest);
            }
        }
        self.sessions
            .insert(stamp.session, Window::new(stamp.counter, used));
        Ok(())
    }

    /// Sessions remembered now.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether no session is remembered.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: u64 = 1_800_000_000;

    fn stamp(session: u64, counter: u64) -> Stamp {
        Stamp {
            session,
            counter,
            sent_at_s: NOW as u32,
        }
    }

    #[test]
    fn each_stamp_is_accepted_once_in_any_order_within_the_window() {
        let mut g = ReplayGuard::default();
        for c in [5, 3, 9, 4, 900, 100, 41] {
            assert_eq!(g.accept(&stamp(1, c), NOW), Ok(()), "counter {c}");
        }
        for c in [5, 3, 9, 4, 900, 100, 41] {
            assert_eq!(g.accept(&stamp(1, c), NOW), Err(Refusal::Replay), "{c}");
        }
        // Other sessions have their own windows.
        assert_eq!(g.accept(&stamp(2, 5), NOW), Ok(()));
        // Older than the window behind the newest: refused though never seen.
        g.accept(&stamp(1, 2000), NOW).unwrap();
        assert_eq!(
            g.accept(&stamp(1, 2000 - WINDOW), NOW),
            Err(Refusal::TooOld)
        );
        assert_eq!(g.accept(&stamp(1, 2001 - WINDOW), NOW), Ok(()));
    }

    #[test]
    fn a_long_jump_clears_the_whole_window() {
        let mut g = ReplayGuard::default();
        for c in 1..=WINDOW {
            g.accept(&stamp(1, c), NOW).unwrap();
        }
        let far = 10 * WINDOW + 7;
        g.accept(&stamp(1, far), NOW).unwrap();
        // Every counter still inside the window is fresh: no stale bits survived the jump.
        for c in far - WINDOW + 1..far {
            assert_eq!(g.accept(&stamp(1, c), NOW), Ok(()), "counter {c}");
        }
        assert_eq!(g.accept(&stamp(1, far), NOW), Err(Refusal::Replay));
    }

    #[test]
    fn stamps_outside_the_clock_skew_are_refused() {
        let mut g = ReplayGuard::default();
        let mut s = stamp(1, 1);
        s.sent_at_s = (NOW - MAX_SKEW_S - 1) as u32;
        assert_eq!(g.accept(&s, NOW), Err(Refusal::Skew));
        s.sent_at_s = (NOW + MAX_SKEW_S + 1) as u32;
        assert_eq!(g.accept(&s, NOW), Err(Refusal::Skew));
        s.sent_at_s = (NOW - MAX_SKEW_S) as u32;
        assert_eq!(g.accept(&s, NOW), Ok(()));
        assert_eq!(g.len(), 1);
    }

    #[test]
    fn the_table_is_bounded_and_forgets_the_least_recently_heard() {
        let mut g = ReplayGuard::default();
        for s in 0..MAX_SESSIONS as u64 {
            g.accept(&stamp(s, 1), NOW).unwrap();
        }
        // Session 0 speaks again, so session 1 is now the least recently heard.
        g.accept(&stamp(0, 2), NOW).unwrap();
        g.accept(&stamp(u64::MAX, 1), NOW).unwrap();
        assert_eq!(g.len(), MAX_SESSIONS);
        assert_eq!(g.accept(&stamp(0, 2), NOW), Err(Refusal::Replay));
        // Session 1 was forgotten: its window starts over (the clock skew still bounds this).
        assert_eq!(g.accept(&stamp(1, 1), NOW), Ok(()));
    }
}
