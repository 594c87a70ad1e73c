//! The transport's limits on what others can make a member hold: inbound connection places
//! (in all and per source address) and the byte budgets of TCP frame buffers (inbound frames,
//! with a cap per source address, and the replies to this member's own requests). Each is an
//! owned value that gives its share back when dropped, so no path can leak a place.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::wire;

/// An inbound TCP connection must deliver its frame's length prefix within this, or it is
/// closed (and counted in [`crate::Stats::tcp_timeouts`]). Members write the whole frame at
/// once, so two seconds is plenty even across continents.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes all inbound TCP frames being read and handled at once may hold: the frames and their
/// inflated bodies until the member has consumed them. Four of the largest frames. A frame
/// that would need more is dropped and counted ([`crate::Stats::tcp_frames_refused`]).
pub const INBOUND_BUFFER_BUDGET: usize = 4 * wire::MAX_FRAME;
/// The share of [`INBOUND_BUFFER_BUDGET`] the frames from one source address (an IPv4
/// address, an IPv6 /64) may hold at once: one largest frame and its inflated body, so a
/// single sender without the key cannot starve the others.
pub const INBOUND_BUFFER_PER_SOURCE: usize = 2 * wire::MAX_FRAME;
/// Bytes the replies to this member's own requests (push-pull replies, fallback-probe acks,
/// blobs) may hold at once: a budget of their own, so inbound traffic cannot starve them.
/// Their number is bounded by [`crate::TransportConfig::max_outbound_streams`].
pub const REPLY_BUFFER_BUDGET: usize = 4 * wire::MAX_FRAME;

/// The address a per-address limit counts under: an IPv4 address as it is (an IPv4-mapped
/// IPv6 one as its IPv4), an IPv6 address by its /64, which a single host usually has whole.
pub(crate) fn source_key(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Addr::from(u128::from(v6) & !((1u128 << 64) - 1))),
        },
    }
}

/// Inbound TCP connections being served, in all and per IP address.
pub(crate) struct InboundSlots {
    total: Arc<Semaphore>,
    per_addr: Mutex<HashMap<IpAddr, usize>>,
    max_per_addr: usize,
}

/// One inbound connection's place; given back when dropped.
pub(crate) struct InboundSlot {
    slots: Arc<InboundSlots>,
    ip: IpAddr,
    _total: OwnedSemaphorePermit,
}

impl InboundSlots {
    /// Room for `max` connections in all and `max_per_addr` from one IP address.
    pub(crate) fn new(max: usize, max_per_addr: usize) -> Arc<InboundSlots> {
        Arc::new(InboundSlots {
            total: Arc::new(Semaphore::new(max)),
            per_addr: Mutex::new(HashMap::new()),
            max_per_addr,
        })
    }

    /// A place for a connection from `ip`, or None when all are taken (in all or for `ip`'s
    /// [`source_key`]).
    pub(crate) fn take(self: &Arc<Self>, ip: IpAddr) -> Option<InboundSlot> {
        let ip = source_key(ip);
        let total = self.total.clone().try_acquire_owned().ok()?;
        let mut per = self.per_addr.lock().unwrap_or_else(|e| e.into_inner());
        let n = per.entry(ip).or_insert(0);
        if *n >= self.max_per_addr {
            return None;
        }
        *n += 1;
        Some(InboundSlot {
            slots: self.clone(),
            ip,
            _total: total,
        })
    }
}

impl Drop for InboundSlot {
    fn drop(&mut self) {
        let mut per = self
            .slots
            .per_addr
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                per.remove(&self.ip);
            }
        }
    }
}

/// A byte budget for frame buffers (a semaphore of KiB), optionally capped per source address.
pub(crate) struct BufferBudget {
    kib: Arc<Semaphore>,
    total_kib: usize,
    per_source: Mutex<HashMap<IpAddr, u32>>,
    max_per_source_kib: u32,
}

impl BufferBudget {
    /// A budget of `bytes`, of which one source may hold `per_source` bytes.
    pub(crate) fn new(bytes: usize, per_source: usize) -> Arc<BufferBudget> {
        Arc::new(BufferBudget {
            kib: Arc::new(Semaphore::new(bytes / 1024)),
            total_kib: bytes / 1024,
            per_source: Mutex::new(HashMap::new()),
            max_per_source_kib: (per_source / 1024) as u32,
        })
    }

    /// Bytes granted now (in whole KiB per grant).
    pub(crate) fn held(&self) -> usize {
        self.total_kib.saturating_sub(self.kib.available_permits()) * 1024
    }

    /// An empty grant that grows from this budget, counted against `source`'s share when given.
    pub(crate) fn grant(self: &Arc<Self>, source: Option<IpAddr>) -> BufferGrant {
        BufferGrant {
            budget: Some(self.clone()),
            source: source.map(source_key),
            permit: None,
            kib: 0,
        }
    }
}

/// The share of a [`BufferBudget`] one frame's buffers hold; given back when dropped. The
/// default grant has no budget and cannot grow (a datagram's body needs none).
#[derive(Default)]
pub(crate) struct BufferGrant {
    budget: Option<Arc<BufferBudget>>,
    source: Option<IpAddr>,
    permit: Option<OwnedSemaphorePermit>,
    kib: u32,
}

impl BufferGrant {
    /// Extends the grant to `bytes`; false (and nothing taken) when the budget, or the
    /// source's share of it, has not that much left.
    pub(crate) fn grow(&mut self, bytes: usize) -> bool {
        let want = bytes.div_ceil(1024) as u32;
        if want <= self.kib {
            return true;
        }
        let Some(budget) = &self.budget else {
            return false;
        };
        let extra = want - self.kib;
        let mut shares = self
            .source
            .map(|_| budget.per_source.lock().unwrap_or_else(|e| e.into_inner()));
        if let (Some(shares), Some(src)) = (&shares, self.source) {
            let held = shares.get(&src).copied().unwrap_or(0);
            if held + extra > budget.max_per_source_kib {
                return false;
            }
        }
        let Ok(more) = budget.kib.clone().try_acquire_many_owned(extra) else {
            return false;
        };
        if let (Some(shares), Some(src)) = (&mut shares, self.source) {
            *shares.entry(src).or_insert(0) += extra;
        }
        match &mut self.permit {
            Some(p) => p.merge(more),
            None => self.permit = Some(more),
        }
        self.kib = want;
        true
    }
}

impl Drop for BufferGrant {
    fn drop(&mut self) {
        let (Some(budget), Some(src)) = (&self.budget, self.source) else {
            return;
        };
        if self.kib == 0 {
            return;
        }
        let mut shares = budget.per_source.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = shares.get_mut(&src) {
            *n = n.saturating_sub(self.kib);
            if *n == 0 {
                shares.remove(&src);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connection_places_are_capped_in_all_and_per_address_and_come_back_on_drop() {
        let slots = InboundSlots::new(3, 2);
        let (a, b, c): (IpAddr, IpAddr, IpAddr) = (
            "10.0.0.1".parse().unwrap(),
            "10.0.0.2".parse().unwrap(),
            "10.0.0.3".parse().unwrap(),
        );
        let a1 = slots.take(a).unwrap();
        let a2 = slots.take(a).unwrap();
        assert!(slots.take(a).is_none(), "per address");
        let b1 = slots.take(b).unwrap();
        assert!(slots.take(c).is_none(), "in all");
        drop(a1);
        let c1 = slots.take(c).unwrap();
        assert!(slots.take(a).is_none(), "the place went to c");
        drop((a2, b1, c1));
        assert!(slots.per_addr.lock().unwrap().is_empty());
        assert_eq!(slots.total.available_permits(), 3);
    }

    #[test]
    fn buffer_grants_grow_within_the_budget_and_return_it_on_drop() {
        let budget = BufferBudget::new(100 * 1024, 100 * 1024);
        let mut g = budget.grant(None);
        assert!(g.grow(64 * 1024));
        assert!(g.grow(10), "within what is granted");
        assert_eq!(budget.held(), 64 * 1024);
        let mut h = budget.grant(None);
        assert!(!h.grow(37 * 1024), "more than is left");
        assert_eq!(budget.held(), 64 * 1024, "a refusal takes nothing");
        assert!(g.grow(100 * 1024));
        drop(g);
        assert_eq!(budget.held(), 0);
        assert!(!BufferGrant::default().grow(1), "no budget, no growth");
    }

    #[test]
    fn one_source_holds_at_most_its_share_and_others_still_get_theirs() {
        let budget = BufferBudget::new(100 * 1024, 40 * 1024);
        let (a, b): (IpAddr, IpAddr) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let mut a1 = budget.grant(Some(a));
        let mut a2 = budget.grant(Some(a));
        assert!(a1.grow(30 * 1024));
        assert!(!a2.grow(11 * 1024), "over a's share across its frames");
        assert!(a2.grow(10 * 1024));
        let mut b1 = budget.grant(Some(b));
        assert!(b1.grow(40 * 1024), "b's share is untouched by a");
        // Unsourced grants (not used for inbound frames) only see the total.
        let mut r = budget.grant(None);
        assert!(r.grow(20 * 1024));
        assert!(!r.grow(21 * 1024), "the total is spent");
        drop((a1, r));
        assert!(a2.grow(40 * 1024), "a's share came back");
        drop((a2, b1));
        assert_eq!(budget.held(), 0);
        assert!(budget.per_source.lock().unwrap().is_empty());
    }

    #[test]
    fn ipv6_counts_by_slash_64_and_v4_mapped_as_ipv4() {
        let key = |s: &str| source_key(s.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::2"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:10.0.0.1"), key("10.0.0.1"));
        assert_ne!(key("10.0.0.1"), key("10.0.0.2"));
        let slots = InboundSlots::new(10, 2);
        let _x = slots.take("2001:db8::1".parse().unwrap()).unwrap();
        let _y = slots.take("2001:db8::ffff:2".parse().unwrap()).unwrap();
        assert!(
            slots.take("2001:db8::3".parse().unwrap()).is_none(),
            "one /64"
        );
        let _z = slots.take("::ffff:10.0.0.1".parse().unwrap()).unwrap();
        let _w = slots.take("10.0.0.1".parse().unwrap()).unwrap();
        assert!(
            slots.take("10.0.0.1".parse().unwrap()).is_none(),
            "mapped = v4"
        );
    }
}
