//! The per-client-IP rate limit (`[server.limits] rate_limit`): a token bucket per client,
//! answered `429 Too Many Requests` with `Retry-After` when empty.
//!
//! Each bucket is one GCRA "theoretical arrival time" (the algorithm of `governor` and of
//! nginx's `limit_req`): a request is allowed when it would not move the time more than `burst`
//! intervals ahead of now, and then moves it one interval on.
//!
//! Hand-written rather than `governor`'s keyed limiter because of memory: governor keeps one map
//! entry per client seen until `retain_recent` sweeps, so a scan from many source addresses (cheap
//! with IPv6) grows it without bound between sweeps. Here the table is allocated once, at start:
//! a set-associative array (`WAYS` slots per set, the set chosen by a keyed hash), where a new
//! client takes the slot of its set whose bucket is fullest (an idle client, forgotten at no cost:
//! a full bucket is what a new client gets anyway), so a client being limited is the last one
//! evicted. Lock-free: a slot is two atomics; two threads racing on one slot can only let one
//! request more or fewer through, never corrupt the table.
//!
//! IPv6 clients are keyed by their /64: one subscriber usually holds a whole /64, and keying by
//! address would give each of them 2^64 buckets.

use std::hash::{BuildHasher, Hash, Hasher};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use prometheus::IntCounter;

/// Slots per set.
const WAYS: usize = 8;

/// `rate_limit = { requests_per_second = 100, burst = 200 }`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitConfig {
    /// Sustained requests per second allowed to one client.
    pub requests_per_second: u32,
    /// Requests one client may send at once after being idle (the bucket's size).
    #[serde(default)]
    pub burst: Option<u32>,
    /// Clients tracked at once (the table's size, allocated at start: 16 bytes each).
    #[serde(default = "default_max_clients")]
    pub max_clients: u32,
}

fn default_max_clients() -> u32 {
    65_536
}

impl RateLimitConfig {
    /// The bucket size: `burst`, or one second's worth of requests.
    pub fn burst(&self) -> u32 {
        self.burst.unwrap_or(self.requests_per_second)
    }

    /// Checks the ranges, or says which value is wrong.
    pub fn validate(&self) -> Result<(), String> {
        let what = "[server.limits] rate_limit";
        if !(1..=1_000_000).contains(&self.requests_per_second) {
            return Err(format!(
                "{what} requests_per_second is {}; allowed: 1 to 1000000",
                self.requests_per_second
            ));
        }
        if !(1..=1_000_000).contains(&self.burst()) {
            return Err(format!(
                "{what} burst is {}; allowed: 1 to 1000000",
                self.burst()
            ));
        }
        if !(64..=16_777_216).contains(&self.max_clients) {
            return Err(format!(
                "{what} max_clients is {}; allowed: 64 to 16777216",
                self.max_clients
            ));
        }
        Ok(())
    }
}

#[derive(Default)]
struct Slot {
    /// The client's key hash (never 0), or 0 when free.
    key: AtomicU64,
    /// The bucket's theoretical arrival time, in nanoseconds since `origin`.
    tat: AtomicU64,
}

/// The limiter shared by every worker thread and both request paths.
pub struct RateLimiter {
    slots: Box<[Slot]>,
    /// `sets - 1` (sets is a power of two).
    set_mask: u64,
    hasher: std::collections::hash_map::RandomState,
    /// Nanoseconds per request at the sustained rate.
    interval: u64,
    /// How far ahead of now a bucket may run: `burst` intervals.
    window: u64,
    origin: Instant,
    rejected: IntCounter,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter")
            .field("clients", &self.slots.len())
            .field("interval_ns", &self.interval)
            .field("window_ns", &self.window)
            .finish()
    }
}

impl RateLimiter {
    /// A limiter for `config` (validated), counting rejections in `rejected`.
    pub fn new(config: &RateLimitConfig, rejected: IntCounter) -> RateLimiter {
        let sets = (config.max_clients as usize)
            .div_ceil(WAYS)
            .next_power_of_two();
        let interval = 1_000_000_000 / u64::from(config.requests_per_second.max(1));
        RateLimiter {
            slots: (0..sets * WAYS).map(|_| Slot::default()).collect(),
            set_mask: sets as u64 - 1,
            hasher: Default::default(),
            interval,
            window: interval * u64::from(config.burst().max(1)),
            origin: Instant::now(),
            rejected,
        }
    }

    /// Takes a token for `client`: `Ok` to serve the request, or `Err(wait)` when its bucket is
    /// empty, `wait` being how long until it has a token again. Counts rejections.
    pub fn check(&self, client: IpAddr) -> Result<(), Duration> {
        let now = self.origin.elapsed().as_nanos() as u64 + 1;
        self.check_at(client, now)
            .inspect_err(|_| self.rejected.inc())
    }

    fn check_at(&self, client: IpAddr, now: u64) -> Result<(), Duration> {
        let key = self.key(client);
        let slot = self.slot_for(key, now);
        let mut tat = slot.tat.load(Ordering::Relaxed);
        loop {
            let next = tat.max(now) + self.interval;
            if next - now > self.window {
                return Err(Duration::from_nanos(next - now - self.window));
            }
            match slot
                .tat
                .compare_exchange_weak(tat, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return Ok(()),
                Err(current) => tat = current,
            }
        }
    }

    /// The client's key: a keyed hash of its address (IPv6: its /64; IPv4-mapped IPv6 as IPv4),
    /// never 0.
    fn key(&self, client: IpAddr) -> u64 {
        let mut h = self.hasher.build_hasher();
        match client.to_canonical() {
            IpAddr::V4(v4) => v4.octets().hash(&mut h),
            IpAddr::V6(v6) => v6.octets()[..8].hash(&mut h),
        }
        h.finish().max(1)
    }

    /// The client's slot: the one holding `key` in its set, or the set's slot with the fullest
    /// bucket (lowest arrival time: free and idle slots first), taken over for `key`.
    fn slot_for(&self, key: u64, now: u64) -> &Slot {
        let first = ((key >> 32 ^ key) & self.set_mask) as usize * WAYS;
        let set = &self.slots[first..first + WAYS];
        if let Some(slot) = set.iter().find(|s| s.key.load(Ordering::Relaxed) == key) {
            return slot;
        }
        let victim = set
            .iter()
            .min_by_key(|s| match s.key.load(Ordering::Relaxed) {
                0 => 0,
                _ => s.tat.load(Ordering::Relaxed),
            })
            .expect("a set has slots");
        // The new client starts with a full bucket. A request of the evicted client racing with
        // this may move the arrival time once more: one request's worth, never more.
        victim
            .tat
            .store(now.saturating_sub(self.window), Ordering::Relaxed);
        victim.key.store(key, Ordering::Relaxed);
        victim
    }
}

/// `Retry-After` in whole seconds, rounded up, at least 1.
pub fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_nanos().div_ceil(1_000_000_000).max(1) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limiter(rps: u32, burst: u32, max_clients: u32) -> RateLimiter {
        let c = RateLimitConfig {
            requests_per_second: rps,
            burst: Some(burst),
            max_clients,
        };
        c.validate().unwrap();
        RateLimiter::new(&c, IntCounter::new("t", "t").unwrap())
    }

    const SEC: u64 = 1_000_000_000;

    #[test]
    fn a_burst_passes_then_the_rate_holds() {
        let l = limiter(10, 5, 1024);
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let t = 100 * SEC;
        for i in 0..5 {
            assert!(l.check_at(ip, t).is_ok(), "request {i} of the burst");
        }
        let wait = l.check_at(ip, t).unwrap_err();
        assert_eq!(wait, Duration::from_millis(100), "one token every 100 ms");
        assert_eq!(retry_after_secs(wait), 1);
        assert!(l.check_at(ip, t + SEC / 10).is_ok());
        assert!(l.check_at(ip, t + SEC / 10).is_err());
        // Another client has its own bucket.
        assert!(l.check_at("192.0.2.2".parse().unwrap(), t).is_ok());
        // After a quiet second the bucket is full again.
        for _ in 0..5 {
            assert!(l.check_at(ip, t + 2 * SEC).is_ok());
        }
        assert!(l.check_at(ip, t + 2 * SEC).is_err());
    }

    #[test]
    fn ipv6_clients_share_their_64() {
        let l = limiter(1, 1, 1024);
        let t = 10 * SEC;
        assert!(l.check_at("2001:db8::1".parse().unwrap(), t).is_ok());
        assert!(l.check_at("2001:db8::2".parse().unwrap(), t).is_err());
        assert!(l.check_at("2001:db8:0:1::1".parse().unwrap(), t).is_ok());
        assert!(l.check_at("::ffff:192.0.2.7".parse().unwrap(), t).is_ok());
        assert!(
            l.check_at("192.0.2.7".parse().unwrap(), t).is_err(),
            "IPv4-mapped is IPv4"
        );
    }

    /// A scan from a million addresses leaves the table its size, and a client being limited
    /// throughout stays limited: a new client evicts the fullest bucket, never the emptiest.
    #[test]
    fn a_scan_neither_grows_the_table_nor_frees_a_limited_client() {
        let l = limiter(1, 2, 64);
        let slots = l.slots.len();
        let hog: IpAddr = "198.51.100.1".parse().unwrap();
        let t = 10 * SEC;
        assert!(l.check_at(hog, t).is_ok() && l.check_at(hog, t).is_ok());
        for i in 0..1_000_000u32 {
            let ip = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            let _ = l.check_at(ip, t + u64::from(i));
            if i % 1000 == 0 {
                assert!(l.check_at(hog, t + u64::from(i)).is_err(), "at {i}");
            }
        }
        assert_eq!(l.slots.len(), slots);
    }

    #[test]
    fn ranges_are_checked() {
        let c = |rps, burst, max| RateLimitConfig {
            requests_per_second: rps,
            burst,
            max_clients: max,
        };
        assert!(c(0, None, 1024)
            .validate()
            .unwrap_err()
            .contains("requests_per_second is 0"));
        assert!(c(1, Some(0), 1024)
            .validate()
            .unwrap_err()
            .contains("burst is 0"));
        assert!(c(1, None, 1)
            .validate()
            .unwrap_err()
            .contains("max_clients is 1"));
        assert_eq!(c(50, None, 1024).burst(), 50);
    }
}
