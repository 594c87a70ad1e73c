//! The glue between the ABI exports and a [`Strategy`]. Used by `export_strategy!` on wasm32
//! and by [`testing::Harness`](crate::testing::Harness) natively, so tests run the same code
//! path as the host does. Not part of the public API.

use crate::{host, Backends, Config, Request, Strategy};
use std::cell::RefCell;
use std::thread::LocalKey;

/// One plugin instance's state.
pub struct Runtime<S> {
    strategy: Option<S>,
    backends: Backends,
    request: Request,
    inbox: Inbox,
}

/// The one buffer `sluice_alloc` hands out. Reused, so a table push does not leak: a buffer is
/// valid until the next `sluice_alloc`, which is how the host uses it (alloc, fill, call).
/// Shared by the strategy and health-check runtimes.
pub(crate) struct Inbox(Vec<u8>);

impl Inbox {
    pub(crate) const fn new() -> Self {
        Inbox(Vec::new())
    }

    /// `sluice_alloc`: a writable buffer of `len` bytes, `None` if memory is exhausted.
    pub(crate) fn alloc(&mut self, len: usize) -> Option<&mut [u8]> {
        self.0.clear();
        // try_reserve so that exhaustion answers 0 as the ABI asks instead of aborting.
        self.0.try_reserve_exact(len).ok()?;
        self.0.resize(len, 0);
        Some(&mut self.0[..])
    }

    /// The bytes at `ptr..ptr+len`, which must lie in the buffer `alloc` handed out. Checking
    /// instead of trusting the pointer keeps the runtimes free of `unsafe`.
    pub(crate) fn get(&self, ptr: usize, len: usize) -> Result<&[u8], String> {
        let base = self.0.as_ptr() as usize;
        ptr.checked_sub(base)
            .and_then(|start| self.0.get(start..start.checked_add(len)?))
            .ok_or_else(|| String::from("buffer was not obtained from sluice_alloc"))
    }
}

impl<S> Default for Runtime<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S> Runtime<S> {
    /// An instance before `sluice_init`; `const` so it can initialise a `thread_local!`.
    pub const fn new() -> Self {
        Runtime {
            strategy: None,
            backends: Backends::new(),
            request: Request::new(),
            inbox: Inbox::new(),
        }
    }

    /// The strategy, once initialised.
    pub fn strategy(&self) -> Option<&S> {
        self.strategy.as_ref()
    }

    /// The strategy, once initialised.
    pub fn strategy_mut(&mut self) -> Option<&mut S> {
        self.strategy.as_mut()
    }

    /// The last table pushed.
    pub fn backends(&self) -> &Backends {
        &self.backends
    }

    /// `sluice_alloc`: a writable buffer of `len` bytes, `None` if memory is exhausted.
    pub fn alloc(&mut self, len: usize) -> Option<&mut [u8]> {
        self.inbox.alloc(len)
    }

    /// The bytes at `ptr..ptr+len`, which must lie in the buffer `alloc` handed out.
    fn inbox(&self, ptr: usize, len: usize) -> Result<&[u8], String> {
        self.inbox.get(ptr, len)
    }
}

impl<S: Strategy> Runtime<S> {
    /// `sluice_init` with the JSON config at `ptr..ptr+len`.
    pub fn init(&mut self, ptr: usize, len: usize) -> Result<(), String> {
        let config = Config::from_slice(self.inbox(ptr, len)?)?;
        self.strategy = Some(S::init(&config)?);
        Ok(())
    }

    /// `sluice_set_backends` with the encoded table at `ptr..ptr+len`.
    pub fn set_backends(&mut self, ptr: usize, len: usize) -> Result<(), String> {
        let table = Backends::decode(self.inbox(ptr, len)?).map_err(|e| e.to_string())?;
        let strategy = self
            .strategy
            .as_mut()
            .ok_or("sluice_set_backends called before sluice_init")?;
        self.backends = table;
        strategy.on_backends(&self.backends);
        Ok(())
    }

    /// `sluice_pick`: an index, or `-1` for no backend.
    pub fn pick(&mut self, attempt: i32) -> i32 {
        let Some(strategy) = self.strategy.as_mut() else {
            // Host bug. A panic is a trap, which the host handles as a plugin fault (fallback
            // round-robin plus rebuild): better than answering 503 with -1.
            panic!("sluice_pick called before sluice_init");
        };
        self.request.begin(u32::try_from(attempt).unwrap_or(0));
        match strategy.pick(&mut self.request, &self.backends) {
            None => -1,
            // An out-of-range index is passed on, not hidden: the host counts it as a plugin
            // fault, which is what the author needs to see.
            Some(i) => i32::try_from(i).unwrap_or(i32::MAX),
        }
    }
}

/// Where `export_strategy!` keeps the instance. wasm32-unknown-unknown has one thread, so the
/// thread-local is a plain static there, and the `RefCell` check is the only cost.
pub type Slot<S> = LocalKey<RefCell<Runtime<S>>>;

// The functions below are the bodies of the exports, kept here rather than in the macro so they
// are type-checked once, in this crate. Pointers are wasm32 `i32` offsets.

/// What both plugin kinds' runtimes offer the exports they have in common (`sluice_alloc`,
/// `sluice_init`), so those bodies are written once for strategies and health checks.
pub(crate) trait Instance {
    /// `sluice_alloc`: a writable buffer of `len` bytes, `None` if memory is exhausted.
    fn alloc_buffer(&mut self, len: usize) -> Option<&mut [u8]>;
    /// `sluice_init` with the JSON config at `ptr..ptr+len`.
    fn init_from(&mut self, ptr: usize, len: usize) -> Result<(), String>;
}

impl<S: Strategy> Instance for Runtime<S> {
    fn alloc_buffer(&mut self, len: usize) -> Option<&mut [u8]> {
        self.alloc(len)
    }
    fn init_from(&mut self, ptr: usize, len: usize) -> Result<(), String> {
        self.init(ptr, len)
    }
}

/// Body of `sluice_alloc` for either plugin kind: the buffer's address, `0` on failure.
pub(crate) fn alloc_body<R: Instance>(slot: &'static LocalKey<RefCell<R>>, len: i32) -> i32 {
    let Ok(len) = usize::try_from(len) else {
        return 0;
    };
    slot.with_borrow_mut(|rt| {
        rt.alloc_buffer(len)
            .map_or(0, |buf| buf.as_mut_ptr() as usize as i32)
    })
}

/// Body of `sluice_init` for either plugin kind: `0`, or `1` after `set_error` with the reason.
pub(crate) fn init_body<R: Instance>(
    slot: &'static LocalKey<RefCell<R>>,
    ptr: i32,
    len: i32,
) -> i32 {
    #[cfg(target_arch = "wasm32")]
    install_panic_hook();
    match slot.with_borrow_mut(|rt| rt.init_from(ptr as u32 as usize, len as u32 as usize)) {
        Ok(()) => 0,
        Err(msg) => {
            host::set_error(&msg);
            1
        }
    }
}

/// Body of `sluice_alloc`.
pub fn export_alloc<S: Strategy>(slot: &'static Slot<S>, len: i32) -> i32 {
    alloc_body(slot, len)
}

/// Body of `sluice_init`.
pub fn export_init<S: Strategy>(slot: &'static Slot<S>, ptr: i32, len: i32) -> i32 {
    init_body(slot, ptr, len)
}

/// Body of `sluice_set_backends`.
pub fn export_set_backends<S: Strategy>(slot: &'static Slot<S>, ptr: i32, len: i32) -> i32 {
    match slot.with_borrow_mut(|rt| rt.set_backends(ptr as u32 as usize, len as u32 as usize)) {
        Ok(()) => 0,
        Err(msg) => {
            // Non-zero is a fault on the host; log why, or the operator only sees "fault".
            host::log(crate::log::Level::Error as i32, &msg);
            1
        }
    }
}

/// Body of `sluice_pick`.
pub fn export_pick<S: Strategy>(slot: &'static Slot<S>, attempt: i32) -> i32 {
    slot.with_borrow_mut(|rt| rt.pick(attempt))
}

/// A panic becomes a trap either way; the hook makes the host log say why before it does.
#[cfg(target_arch = "wasm32")]
fn install_panic_hook() {
    std::panic::set_hook(Box::new(|info| {
        host::log(
            crate::log::Level::Error as i32,
            &format!("plugin panicked: {info}"),
        );
    }));
}
