//! The glue between the health-check ABI exports and a [`HealthCheck`]. Used by
//! `export_health_check!` on wasm32 and by
//! [`testing::HealthHarness`](crate::testing::HealthHarness) natively, so tests run the same
//! decode/encode path the host does. Not part of the public API.

use crate::runtime::{alloc_body, init_body, Inbox, Instance};
use crate::{host, Backend, Config, HealthCheck, ProbeResult, Verdict};
use std::cell::RefCell;
use std::thread::LocalKey;

/// One health-check plugin instance's state.
pub struct HealthRuntime<H> {
    check: Option<H>,
    inbox: Inbox,
    /// The encoded probe last returned by `sluice_health_probe`. It is a separate buffer from
    /// the inbox, so it stays valid across the `sluice_alloc` the host makes to pass the result;
    /// it is overwritten by the next probe.
    outbox: Vec<u8>,
    /// The backend of the last `sluice_health_probe`, which `sluice_health_evaluate` is about.
    backend: Option<Backend>,
}

impl<H> Default for HealthRuntime<H> {
    fn default() -> Self {
        Self::new()
    }
}

impl<H> HealthRuntime<H> {
    /// An instance before `sluice_init`; `const` so it can initialise a `thread_local!`.
    pub const fn new() -> Self {
        HealthRuntime {
            check: None,
            inbox: Inbox::new(),
            outbox: Vec::new(),
            backend: None,
        }
    }

    /// The check, once initialised.
    pub fn check(&self) -> Option<&H> {
        self.check.as_ref()
    }

    /// The check, once initialised.
    pub fn check_mut(&mut self) -> Option<&mut H> {
        self.check.as_mut()
    }

    /// The backend of the last probe.
    pub fn last_backend(&self) -> Option<&Backend> {
        self.backend.as_ref()
    }

    /// `sluice_alloc`: a writable buffer of `len` bytes, `None` if memory is exhausted.
    pub fn alloc(&mut self, len: usize) -> Option<&mut [u8]> {
        self.inbox.alloc(len)
    }
}

impl<H: HealthCheck> HealthRuntime<H> {
    /// `sluice_init` with the JSON config at `ptr..ptr+len`.
    pub fn init(&mut self, ptr: usize, len: usize) -> Result<(), String> {
        let config = Config::from_slice(self.inbox.get(ptr, len)?)?;
        self.check = Some(H::init(&config)?);
        Ok(())
    }

    /// `sluice_health_probe` with the encoded backend entry at `ptr..ptr+len`: the encoded
    /// probe, which stays in this runtime until the next probe.
    pub fn probe(&mut self, ptr: usize, len: usize) -> Result<&[u8], String> {
        let backend = Backend::decode(self.inbox.get(ptr, len)?).map_err(|e| e.to_string())?;
        let check = self
            .check
            .as_mut()
            .ok_or("sluice_health_probe called before sluice_init")?;
        let probe = check.probe(&backend);
        self.outbox = probe.encode()?;
        self.backend = Some(backend);
        Ok(&self.outbox)
    }

    /// `sluice_health_evaluate` with the encoded result at `ptr..ptr+len`: the ABI verdict
    /// (`-1`, `1..=99` or `100`).
    pub fn evaluate(&mut self, ptr: usize, len: usize) -> Result<i32, String> {
        let result = ProbeResult::decode(self.inbox.get(ptr, len)?)?;
        let check = self
            .check
            .as_mut()
            .ok_or("sluice_health_evaluate called before sluice_init")?;
        let backend = self
            .backend
            .as_ref()
            .ok_or("sluice_health_evaluate called before sluice_health_probe")?;
        let verdict: Verdict = check.evaluate(backend, &result);
        Ok(verdict.to_abi())
    }
}

/// Where `export_health_check!` keeps the instance.
pub type HealthSlot<H> = LocalKey<RefCell<HealthRuntime<H>>>;

// The bodies of the exports, kept here rather than in the macro so they are type-checked once,
// in this crate. Pointers are wasm32 `i32` offsets.

impl<H: HealthCheck> Instance for HealthRuntime<H> {
    fn alloc_buffer(&mut self, len: usize) -> Option<&mut [u8]> {
        self.alloc(len)
    }
    fn init_from(&mut self, ptr: usize, len: usize) -> Result<(), String> {
        self.init(ptr, len)
    }
}

/// Body of `sluice_alloc`.
pub fn health_export_alloc<H: HealthCheck>(slot: &'static HealthSlot<H>, len: i32) -> i32 {
    alloc_body(slot, len)
}

/// Body of `sluice_init`.
pub fn health_export_init<H: HealthCheck>(slot: &'static HealthSlot<H>, ptr: i32, len: i32) -> i32 {
    init_body(slot, ptr, len)
}

/// Body of `sluice_health_probe`: `(ptr << 32) | len` of the encoded probe, or `0` (an empty
/// probe, which the host refuses as malformed: a plugin fault) after logging why.
pub fn health_export_probe<H: HealthCheck>(
    slot: &'static HealthSlot<H>,
    ptr: i32,
    len: i32,
) -> i64 {
    slot.with_borrow_mut(
        |rt| match rt.probe(ptr as u32 as usize, len as u32 as usize) {
            Ok(bytes) => pack(bytes.as_ptr() as usize, bytes.len()),
            Err(msg) => {
                host::log(crate::log::Level::Error as i32, &msg);
                0
            }
        },
    )
}

/// Body of `sluice_health_evaluate`: the verdict, or `0` (a fault) after logging why.
pub fn health_export_evaluate<H: HealthCheck>(
    slot: &'static HealthSlot<H>,
    ptr: i32,
    len: i32,
) -> i32 {
    match slot.with_borrow_mut(|rt| rt.evaluate(ptr as u32 as usize, len as u32 as usize)) {
        Ok(v) => v,
        Err(msg) => {
            host::log(crate::log::Level::Error as i32, &msg);
            0
        }
    }
}

/// `(ptr << 32) | len` as the ABI's `i64`. Pointers and lengths are 32-bit on wasm32.
fn pack(ptr: usize, len: usize) -> i64 {
    (((ptr as u64 & 0xffff_ffff) << 32) | (len as u64 & 0xffff_ffff)) as i64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pack_puts_the_pointer_high() {
        assert_eq!(pack(0x1234, 0x56), 0x0000_1234_0000_0056);
        assert_eq!(pack(0xffff_fff0, 0xffff_ffff) as u64, 0xffff_fff0_ffff_ffff);
    }
}
