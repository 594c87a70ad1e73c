//! The host functions of module `"sluice"`, behind safe wrappers.
//!
//! On `wasm32` they are the real imports. On every other target the same wrappers call the
//! thread-local test double in [`crate::testing`], so strategies (and this crate) can be
//! unit-tested with a plain `cargo test`. Everything above this module is target-independent.

use std::fmt;

/// Number of shared counters a pool offers; valid slots are `0..COUNTER_SLOTS`.
pub const COUNTER_SLOTS: u32 = 16;

/// An error detected on the guest side before it could reach the host.
///
/// The host traps on some invalid arguments (a counter slot out of range); a trap is a plugin
/// fault that rebuilds the instance, so the SDK checks those arguments first and reports them
/// as a value instead.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum HostError {
    /// The counter slot is not in `0..COUNTER_SLOTS`.
    SlotOutOfRange {
        /// The slot that was asked for.
        slot: u32,
    },
}

impl fmt::Display for HostError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostError::SlotOutOfRange { slot } => {
                write!(
                    f,
                    "counter slot {slot} is out of range (0..={})",
                    COUNTER_SLOTS - 1
                )
            }
        }
    }
}

impl std::error::Error for HostError {}

/// Atomically adds `delta` to the pool's shared counter `slot` and returns the **previous** value.
///
/// Counters are shared by every worker thread and every instance of the pool's plugin, and they
/// survive a plugin swap, so `counter_add(0, 1)? % n` is an exact global rotation. Arithmetic
/// wraps. Slots are validated here, so an invalid slot is an `Err`, never a host trap.
pub fn counter_add(slot: u32, delta: i64) -> Result<i64, HostError> {
    if slot >= COUNTER_SLOTS {
        return Err(HostError::SlotOutOfRange { slot });
    }
    // In range, so the cast is lossless.
    Ok(imp::counter_add(slot as i32, delta))
}

/// 64 random bits from the host's fast per-thread generator. Not for cryptography.
pub fn random_u64() -> u64 {
    imp::random_u64() as u64
}

/// Wall-clock time in milliseconds since the Unix epoch. It can jump; use
/// [`monotonic_ns`] to measure intervals.
pub fn now_ms() -> i64 {
    imp::now_ms()
}

/// A monotonic clock in nanoseconds with an arbitrary origin shared by all instances in the
/// process, so instances can compare timestamps they stored in shared counters.
pub fn monotonic_ns() -> i64 {
    imp::monotonic_ns()
}

pub(crate) use imp::{
    backend_failures, backend_inflight, backend_latency_us, excluded, log, request_attr,
    request_hash, set_error,
};

#[cfg(target_arch = "wasm32")]
mod imp {
    // The Rust names carry a prefix and `link_name` gives the ABI name. Only the ABI name
    // appears in the import section; the prefix keeps these declarations from being confused
    // with unrelated C symbols such as libm's `log`.
    #[link(wasm_import_module = "sluice")]
    unsafe extern "C" {
        #[link_name = "log"]
        fn sluice_log(level: i32, ptr: *const u8, len: usize);
        #[link_name = "set_error"]
        fn sluice_set_error(ptr: *const u8, len: usize);
        #[link_name = "now_ms"]
        safe fn sluice_now_ms() -> i64;
        #[link_name = "monotonic_ns"]
        safe fn sluice_monotonic_ns() -> i64;
        #[link_name = "random_u64"]
        safe fn sluice_random_u64() -> i64;
        #[link_name = "counter_add"]
        safe fn sluice_counter_add(slot: i32, delta: i64) -> i64;
        #[link_name = "request_attr"]
        fn sluice_request_attr(
            kind: i32,
            name_ptr: *const u8,
            name_len: usize,
            buf_ptr: *mut u8,
            buf_cap: usize,
        ) -> i32;
        #[link_name = "request_hash"]
        fn sluice_request_hash(
            kind: i32,
            name_ptr: *const u8,
            name_len: usize,
            out: *mut u64,
        ) -> i32;
        #[link_name = "excluded"]
        safe fn sluice_excluded(index: i32) -> i32;
        #[link_name = "backend_inflight"]
        safe fn sluice_backend_inflight(index: i32) -> i32;
        #[link_name = "backend_latency_us"]
        safe fn sluice_backend_latency_us(index: i32) -> i64;
        #[link_name = "backend_failures"]
        safe fn sluice_backend_failures(index: i32) -> i32;
    }

    pub fn log(level: i32, msg: &str) {
        // SAFETY: the host only reads `len` bytes at `ptr`, which `msg` owns for the call.
        unsafe { sluice_log(level, msg.as_ptr(), msg.len()) }
    }

    pub fn set_error(msg: &str) {
        // SAFETY: as for `log`.
        unsafe { sluice_set_error(msg.as_ptr(), msg.len()) }
    }

    pub fn now_ms() -> i64 {
        sluice_now_ms()
    }

    pub fn monotonic_ns() -> i64 {
        sluice_monotonic_ns()
    }

    pub fn random_u64() -> i64 {
        sluice_random_u64()
    }

    pub fn counter_add(slot: i32, delta: i64) -> i64 {
        sluice_counter_add(slot, delta)
    }

    pub fn request_attr(kind: i32, name: &str, buf: &mut [u8]) -> i32 {
        // SAFETY: the host reads `name` and writes at most `buf.len()` bytes into `buf`; both
        // are valid and exclusively ours for the duration of the call.
        unsafe { sluice_request_attr(kind, name.as_ptr(), name.len(), buf.as_mut_ptr(), buf.len()) }
    }

    pub fn request_hash(kind: i32, name: &str) -> (i32, u64) {
        let mut out = 0u64;
        // SAFETY: the host reads `name` and writes 8 bytes to `out`, a live local.
        let rc = unsafe { sluice_request_hash(kind, name.as_ptr(), name.len(), &mut out) };
        (rc, out)
    }

    pub fn excluded(index: i32) -> i32 {
        sluice_excluded(index)
    }

    pub fn backend_inflight(index: i32) -> i32 {
        sluice_backend_inflight(index)
    }

    pub fn backend_latency_us(index: i32) -> i64 {
        sluice_backend_latency_us(index)
    }

    pub fn backend_failures(index: i32) -> i32 {
        sluice_backend_failures(index)
    }
}

#[cfg(not(target_arch = "wasm32"))]
mod imp {
    // Same signatures as the wasm32 wrappers, served by the test double.
    pub use crate::testing::mock::{
        backend_failures, backend_inflight, backend_latency_us, counter_add, excluded, log,
        monotonic_ns, now_ms, random_u64, request_attr, request_hash, set_error,
    };
}
