//! The transport's limits on what others can make a member hold: inbound connection places
//! (in all and per IP address) and the byte budget of TCP frame buffers. Each is an owned
//! value that gives its share back when dropped, so no path can leak a place.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::wire;

/// An inbound TCP connection must deliver its frame's length prefix within this, or it is
/// closed (and counted in [`crate::Stats::tcp_timeouts`]). Members write the whole frame at
/// once, so two seconds is plenty even across continents.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// Bytes all TCP frames being read at once may hold (inbound requests and the replies to our
/// own requests): four of the largest frames. A frame that would need more is dropped and
/// counted ([`crate::Stats::tcp_frames_refused`]).
pub const INBOUND_BUFFER_BUDGET: usize = 4 * wire::MAX_FRAME;

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

    /// A place for a connection from `ip`, or None when all are taken (in all or for `ip`).
    pub(crate) fn take(self: &Arc<Self>, ip: IpAddr) -> Option<InboundSlot> {
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

/// The share of [`INBOUND_BUFFER_BUDGET`] (a semaphore of KiB) one frame's buffer holds;
/// given back when dropped.
#[derive(Default)]
pub(crate) struct BufferGrant {
    permit: Option<OwnedSemaphorePermit>,
    kib: u32,
}

impl BufferGrant {
    /// Extends the grant to `bytes`; false (and nothing taken) when the budget has not that much left.
    pub(crate) fn grow(&mut self, budget: &Arc<Semaphore>, bytes: usize) -> bool {
        let want = bytes.div_ceil(1024) as u32;
        if want <= self.kib {
            return true;
        }
        let Ok(more) = budget.clone().try_acquire_many_owned(want - self.kib) else {
            return false;
        };
        match &mut self.permit {
            Some(p) => p.merge(more),
            None => self.permit = Some(more),
        }
        self.kib = want;
        true
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
        let budget = Arc::new(Semaphore::new(100)); // KiB
        let mut g = BufferGrant::default();
        assert!(g.grow(&budget, 64 * 1024));
        assert!(g.grow(&budget, 10), "within what is granted");
        assert_eq!(budget.available_permits(), 36);
        let mut h = BufferGrant::default();
        assert!(!h.grow(&budget, 37 * 1024), "more than is left");
        assert_eq!(budget.available_permits(), 36, "a refusal takes nothing");
        assert!(g.grow(&budget, 100 * 1024));
        drop(g);
        assert_eq!(budget.available_permits(), 100);
    }
}
