//! The WebAssembly plugin host shared by strategies and health checks: one wasmtime `Engine`
//! (pooling allocator, epoch deadlines), the ABI's host imports, compilation and validation of
//! plugin bytes into a [`PluginVersion`].
//!
//! The wire contract is `sdk/ABI.md`; this module and the SDK are its only two readers.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use wasmtime::{
    Caller, Config, Engine, InstanceAllocationStrategy, InstancePre, Linker, Module,
    PoolingAllocationConfig, Store, StoreLimits, StoreLimitsBuilder,
};

use prometheus::IntCounter;

use crate::backend::{BackendStats, BackendTable};
use crate::cold_lock::ColdLock;

/// The ABI version this host speaks (`sluice_abi_version` export): the SDK's, the one source.
pub const ABI_VERSION: i32 = sluice_sdk::ABI_VERSION;
/// Shared counters per pool (`counter_add` slots).
pub const COUNTER_SLOTS: usize = sluice_sdk::COUNTER_SLOTS as usize;
/// Log budget of one plugin instance per second: lines, then bytes. Lines over it are dropped
/// and counted (`sluice_plugin_log_dropped_total`); one summary line says how many.
pub const LOG_LINES_PER_SEC: u32 = 20;
/// See [`LOG_LINES_PER_SEC`].
pub const LOG_BYTES_PER_SEC: usize = 16 * 1024;
/// Memory a plugin instance may use.
pub const MAX_PLUGIN_MEMORY: usize = 64 << 20;
/// Epoch tick period; deadlines are counted in ticks. Coarse on purpose: the ticker thread wakes
/// once per tick on every proxy, and a faster tick measurably costs proxy CPU.
pub const EPOCH_TICK: Duration = Duration::from_millis(5);
/// Deadline of one `sluice_pick` call, in ticks (2 ticks: 5–10 ms).
pub const PICK_DEADLINE_TICKS: u64 = 2;
/// Deadline of `sluice_init` and table pushes, in ticks (≈ 1 s).
pub const INIT_DEADLINE_TICKS: u64 = 200;

/// What a plugin is for (`sluice_plugin_kind` export).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PluginKind {
    /// Picks backends.
    Strategy,
    /// Judges backend health.
    Health,
}

impl PluginKind {
    fn code(self) -> i32 {
        match self {
            PluginKind::Strategy => sluice_sdk::PluginKind::Strategy as i32,
            PluginKind::Health => sluice_sdk::PluginKind::HealthCheck as i32,
        }
    }
    /// Lower-case name, as used in metrics and the API.
    pub fn as_str(self) -> &'static str {
        match self {
            PluginKind::Strategy => "strategy",
            PluginKind::Health => "health",
        }
    }
}

/// Why a plugin was refused. Each message says what is wrong and what to do.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PluginError {
    /// Not a valid WebAssembly module.
    #[error("not a valid WebAssembly module: {0}; build the plugin for the wasm32-unknown-unknown target")]
    Compile(String),
    /// A required export is missing or has the wrong type.
    #[error("plugin does not export `{name}` with the expected signature ({detail}); is it built with sluice-sdk's export macro?")]
    MissingExport {
        /// Export name.
        name: &'static str,
        /// What went wrong.
        detail: String,
    },
    /// Unsupported ABI version.
    #[error("plugin ABI version {found} is not supported by this sluice (supports {ABI_VERSION}); rebuild the plugin with a matching sluice-sdk")]
    AbiVersion {
        /// What the plugin declared.
        found: i32,
    },
    /// A strategy loaded as a health check or vice versa.
    #[error("plugin is a {found} plugin, but a {expected} plugin is needed here")]
    WrongKind {
        /// Declared kind.
        found: String,
        /// Needed kind.
        expected: &'static str,
    },
    /// Instantiation failed (missing import, memory limit...).
    #[error("plugin cannot be instantiated: {0}")]
    Instantiate(String),
    /// `sluice_init` refused the configuration or trapped.
    #[error("plugin init failed: {0}")]
    Init(String),
    /// The trial pick against the current table failed.
    #[error("plugin failed its trial pick against the current backends: {0}")]
    TrialPick(String),
    /// The plugin imports something the host does not provide (WASI, another module's function).
    #[error("plugin imports `{module}::{name}`, which sluice does not provide: plugins run without WASI, files, sockets or clocks of their own, and may import only the `sluice` host calls listed in sdk/ABI.md (build for wasm32-unknown-unknown, not wasm32-wasip1)")]
    Import {
        /// Import module.
        module: String,
        /// Import name.
        name: String,
    },
    /// The plugin source could not be found.
    #[error("{0}")]
    Source(String),
    /// More code than a plugin may have (compiling it would take too long and too much memory).
    #[error("plugin has {what}; the limit is {limit} (a strategy or health check built with sluice-sdk is typically well under 1 MiB of code); build it with opt-level = \"s\" and LTO, and leave out what it does not use")]
    TooLarge {
        /// What was found, e.g. "12 MiB of code".
        what: String,
        /// The limit, in the same words.
        limit: String,
    },
}

/// Most code a plugin may have: the compiler's time and memory grow with the code, so this bounds
/// them (docs/security.md has figures) before anything runs.
pub const MAX_CODE_BYTES: u32 = 4 << 20;
/// Most functions a plugin may define.
pub const MAX_FUNCTIONS: u32 = 50_000;

/// One loaded plugin version: compiled, validated, ready to instantiate on any thread.
pub struct PluginVersion {
    /// Pre-linked module; instantiation is a few microseconds with the pooling allocator.
    pub pre: InstancePre<HostState>,
    /// Hex sha256 of the wasm bytes.
    pub sha256: String,
    /// Human name: `builtin:round-robin`, a file name, or `uploaded`.
    pub name: String,
    /// Increases with every version loaded into the same host.
    pub generation: u64,
    /// The JSON config handed to `sluice_init`.
    pub config_json: Arc<[u8]>,
}

/// A request head as strategies see it, whichever HTTP path parsed it: pingora's
/// [`http::request::Parts`] or the lean HTTP/1 path's in-place [`crate::head::ParsedRequest`].
pub trait HeadView {
    /// The method token.
    fn method(&self) -> &[u8];
    /// The authority (target's, else the `Host` header's), port included.
    fn authority(&self) -> Option<&[u8]>;
    /// The path, without the query.
    fn path(&self) -> &[u8];
    /// The query after `?`.
    fn query(&self) -> Option<&[u8]>;
    /// Path and query (`/` when the target has neither).
    fn path_and_query(&self) -> &[u8];
    /// Calls `found` with each value of header `name` (case-insensitive) in order, until it
    /// returns `Some`.
    fn find_header<'s>(
        &'s self,
        name: &[u8],
        found: &mut dyn FnMut(&'s [u8]) -> Option<&'s [u8]>,
    ) -> Option<&'s [u8]>;
}

impl HeadView for http::request::Parts {
    fn method(&self) -> &[u8] {
        self.method.as_str().as_bytes()
    }
    fn authority(&self) -> Option<&[u8]> {
        self.uri
            .host()
            .map(str::as_bytes)
            .or_else(|| self.headers.get(http::header::HOST).map(|h| h.as_bytes()))
    }
    fn path(&self) -> &[u8] {
        self.uri.path().as_bytes()
    }
    fn query(&self) -> Option<&[u8]> {
        self.uri.query().map(str::as_bytes)
    }
    fn path_and_query(&self) -> &[u8] {
        self.uri
            .path_and_query()
            .map(|p| p.as_str())
            .unwrap_or("/")
            .as_bytes()
    }
    fn find_header<'s>(
        &'s self,
        name: &[u8],
        found: &mut dyn FnMut(&'s [u8]) -> Option<&'s [u8]>,
    ) -> Option<&'s [u8]> {
        let name = http::header::HeaderName::from_bytes(name).ok()?;
        self.headers
            .get_all(name)
            .iter()
            .find_map(|v| found(v.as_bytes()))
    }
}

/// The per-request attributes a plugin may read (ABI "request attribute kinds").
pub struct RequestView<'a> {
    /// Request head (method, target, headers).
    pub header: &'a dyn HeadView,
    /// Client address.
    pub client_ip: Option<IpAddr>,
    /// Returns true for backend indexes already tried by this request.
    pub excluded: &'a dyn Fn(usize) -> bool,
}

impl RequestView<'_> {
    /// The attribute of `kind` (`name` for headers, cookies and query parameters), or `None`.
    /// Text form of the client IP is written into `scratch`. `Err(())` means an unknown kind,
    /// which the ABI answers with -2; there is nothing more to say about it.
    #[allow(clippy::result_unit_err)]
    pub fn attr<'s>(
        &'s self,
        kind: i32,
        name: &[u8],
        scratch: &'s mut String,
    ) -> Result<Option<&'s [u8]>, ()> {
        use sluice_sdk::attr_kind;
        use std::fmt::Write;
        let head = self.header;
        Ok(match kind {
            attr_kind::CLIENT_IP => match self.client_ip {
                Some(ip) => {
                    scratch.clear();
                    let _ = write!(scratch, "{ip}");
                    Some(scratch.as_bytes())
                }
                None => None,
            },
            attr_kind::METHOD => Some(head.method()),
            attr_kind::HOST => head.authority().map(crate::http1::strip_port),
            attr_kind::PATH => Some(head.path()),
            attr_kind::HEADER => head.find_header(name, &mut Some),
            attr_kind::COOKIE => head.find_header(b"cookie", &mut |v| find_pair(v, b';', name)),
            attr_kind::QUERY => head.query().and_then(|q| find_pair(q, b'&', name)),
            attr_kind::URI => Some(head.path_and_query()),
            _ => return Err(()),
        })
    }
}

/// Finds `name=value` in a `sep`-separated list (cookies, query strings).
fn find_pair<'a>(list: &'a [u8], sep: u8, name: &[u8]) -> Option<&'a [u8]> {
    list.split(|&c| c == sep).find_map(|pair| {
        let pair = pair.trim_ascii();
        let eq = pair.iter().position(|&c| c == b'=')?;
        (&pair[..eq] == name).then(|| &pair[eq + 1..])
    })
}

/// The ABI hash, `mix64(fnv1a64(bytes))` (sdk/ABI.md, "The hash"): the SDK's own function, so
/// host and plugins cannot drift apart.
pub use sluice_sdk::hash_bytes as abi_hash;

/// The current request, as a raw pointer valid only during one synchronous plugin call.
#[derive(Clone, Copy)]
struct RequestPtr(*const RequestView<'static>);

// SAFETY: the pointer is set, dereferenced and cleared within one synchronous call on one thread
// (`HostState::with_request`); a store that moves between threads (the health host's, behind a
// mutex) never carries a non-null pointer across that move.
unsafe impl Send for RequestPtr {}
// SAFETY: as above; shared references to a `HostState` never dereference a pointer that is not
// live on the current call stack.
unsafe impl Sync for RequestPtr {}

/// State of one plugin instance's `Store`.
pub struct HostState {
    limits: StoreLimits,
    /// Set only for the duration of a `sluice_pick` call (see [`HostState::with_request`]).
    request: RequestPtr,
    /// The table last pushed to this instance; `backend_*` host calls index into it.
    pub table: Option<Arc<BackendTable>>,
    counters: Arc<[AtomicI64; COUNTER_SLOTS]>,
    /// Reason recorded by `set_error`.
    pub error: Option<String>,
    rng: u64,
    scratch: String,
    plugin: Arc<str>,
    log: LogBudget,
}

/// The per-instance log budget: at most [`LOG_LINES_PER_SEC`] lines and [`LOG_BYTES_PER_SEC`]
/// bytes per one-second window. What is over is dropped and counted; the first line of the next
/// window that logs says how many were dropped.
struct LogBudget {
    window: Instant,
    lines: u32,
    bytes: usize,
    dropped: u64,
    dropped_total: Option<IntCounter>,
}

impl LogBudget {
    fn new(dropped_total: Option<IntCounter>) -> LogBudget {
        LogBudget {
            window: Instant::now(),
            lines: 0,
            bytes: 0,
            dropped: 0,
            dropped_total,
        }
    }

    /// Whether a line of `len` bytes may be written now; `Some(n)` also reports `n` lines
    /// dropped in earlier windows (to be mentioned once).
    fn admit(&mut self, len: usize, now: Instant) -> (bool, u64) {
        let mut reported = 0;
        if now.duration_since(self.window) >= Duration::from_secs(1) {
            self.window = now;
            self.lines = 0;
            self.bytes = 0;
            reported = std::mem::take(&mut self.dropped);
        }
        if self.lines >= LOG_LINES_PER_SEC || self.bytes + len > LOG_BYTES_PER_SEC {
            self.dropped += 1;
            if let Some(c) = &self.dropped_total {
                c.inc();
            }
            return (false, reported);
        }
        self.lines += 1;
        self.bytes += len;
        (true, reported)
    }
}

impl HostState {
    /// State for a new instance; lines over its log budget are counted in `log_dropped`.
    pub fn new(
        counters: Arc<[AtomicI64; COUNTER_SLOTS]>,
        plugin: Arc<str>,
        log_dropped: Option<IntCounter>,
    ) -> HostState {
        static SEED: AtomicU64 = AtomicU64::new(0x9e37_79b9_7f4a_7c15);
        HostState {
            limits: StoreLimitsBuilder::new()
                .memory_size(MAX_PLUGIN_MEMORY)
                .instances(1)
                .build(),
            request: RequestPtr(std::ptr::null()),
            table: None,
            counters,
            error: None,
            rng: SEED.fetch_add(0x9e37_79b9_7f4a_7c15, Ordering::Relaxed) | 1,
            scratch: String::new(),
            plugin,
            log: LogBudget::new(log_dropped),
        }
    }

    /// Runs `f` with `req` readable by the plugin's host calls.
    pub fn with_request<R>(
        store: &mut Store<HostState>,
        req: &RequestView<'_>,
        f: impl FnOnce(&mut Store<HostState>) -> R,
    ) -> R {
        // SAFETY: the pointer is only dereferenced by host calls made during `f`, which runs
        // synchronously while `req` is borrowed, and it is cleared before returning (also on
        // unwind, via the guard), so it never outlives `req`.
        store.data_mut().request = RequestPtr((req as *const RequestView<'_>).cast());
        struct Clear<'a>(&'a mut Store<HostState>);
        impl Drop for Clear<'_> {
            fn drop(&mut self) {
                self.0.data_mut().request = RequestPtr(std::ptr::null());
            }
        }
        let guard = Clear(store);
        f(guard.0)
    }

    fn request(&self) -> Option<&RequestView<'_>> {
        // SAFETY: see `with_request`: non-null only while the referenced view is alive.
        unsafe { self.request.0.as_ref() }
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: fast, per instance, not for cryptography (documented in the ABI).
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// The process-wide plugin engine.
#[derive(Clone)]
pub struct PluginEngine {
    engine: Engine,
    linker: Arc<Linker<HostState>>,
    /// Compiled modules by sha256 of their bytes, so a reload that keeps (or repeats) a plugin
    /// does not compile it again. Bounded: compiling is the slow part, not memory.
    modules: Arc<ColdLock<HashMap<[u8; 32], Module>>>,
    /// (module, name) of every host import the linker defines: the whole sandbox.
    host_imports: Arc<[(String, String)]>,
}

/// Instance slots for `threads` workers and `pools` pools (see [`PluginEngine::sized_for`]):
/// twice the steady need (old and new versions during a swap), with room for four more pools.
pub fn slots_for(threads: usize, pools: usize) -> u32 {
    let per_pool = threads.saturating_add(1);
    let need = pools
        .saturating_add(4)
        .saturating_mul(per_pool)
        .saturating_mul(2);
    (need.saturating_add(16) as u64).clamp(u64::from(DEFAULT_SLOTS), u64::from(MAX_SLOTS)) as u32
}

/// Compiled modules kept for reuse by [`PluginEngine::compile`].
const MODULE_CACHE: usize = 64;

/// Instance slots of an engine made by [`PluginEngine::new`] (tests, tools, benches).
const DEFAULT_SLOTS: u32 = 64;
/// The most instance slots an engine reserves, whatever the config.
const MAX_SLOTS: u32 = 10_000;
/// Guard region after each linear memory. Memories are reserved at their 64 MiB cap, so
/// compiled code checks bounds explicitly and the guard only has to catch small overruns.
const MEMORY_GUARD: u64 = 2 << 20;

impl PluginEngine {
    /// An engine with a small pool of instance slots; see [`PluginEngine::sized_for`].
    pub fn new() -> anyhow::Result<PluginEngine> {
        PluginEngine::with_slots(DEFAULT_SLOTS)
    }

    /// An engine whose pooling allocator fits `threads` worker threads and `pools` pools: each
    /// pool has one strategy instance per thread and one health instance, a swap or reload holds
    /// the old and new versions for a moment, and a reload may add pools. Each slot reserves
    /// (does not commit) 66 MiB of address space: the plugin memory cap and a guard.
    pub fn sized_for(threads: usize, pools: usize) -> anyhow::Result<PluginEngine> {
        PluginEngine::with_slots(slots_for(threads, pools))
    }

    /// Creates the engine with `slots` instance slots and starts its epoch ticker thread.
    pub fn with_slots(slots: u32) -> anyhow::Result<PluginEngine> {
        let mut pool = PoolingAllocationConfig::default();
        pool.total_memories(slots)
            .total_core_instances(slots)
            .total_tables(slots)
            .max_memory_size(MAX_PLUGIN_MEMORY);
        let mut cfg = Config::new();
        cfg.epoch_interruption(true)
            .memory_reservation(MAX_PLUGIN_MEMORY as u64)
            .memory_guard_size(MEMORY_GUARD)
            .memory_reservation_for_growth(0)
            .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&cfg)?;
        let linker = Arc::new(build_linker(&engine)?);
        let ticker = engine.weak();
        std::thread::Builder::new()
            .name("sluice-epoch".into())
            .spawn(move || {
                while let Some(engine) = ticker.upgrade() {
                    engine.increment_epoch();
                    drop(engine);
                    std::thread::sleep(EPOCH_TICK);
                }
            })?;
        let mut probe = Store::new(
            &engine,
            HostState::new(
                Arc::new([const { AtomicI64::new(0) }; COUNTER_SLOTS]),
                Arc::from(""),
                None,
            ),
        );
        let host_imports = linker
            .iter(&mut probe)
            .map(|(m, n, _)| (m.to_string(), n.to_string()))
            .collect();
        Ok(PluginEngine {
            engine,
            linker,
            modules: Arc::default(),
            host_imports,
        })
    }

    /// The wasmtime engine.
    pub fn engine(&self) -> &Engine {
        &self.engine
    }

    /// What can be refused before compiling, read from the module's sections: an import the
    /// host does not provide (the sandbox: a plugin gets the `sluice` host calls of ABI.md and
    /// nothing else, no WASI, files, sockets or clocks of its own), and more code than [`MAX_CODE_BYTES`] or [`MAX_FUNCTIONS`].
    /// Compiling is the expensive part (time and memory grow with the code), so a module that
    /// would be refused anyway, or would take too long, never reaches the compiler.
    fn precheck(&self, bytes: &[u8]) -> Result<(), PluginError> {
        use wasmparser::{Parser, Payload};
        let malformed = |e: wasmparser::BinaryReaderError| PluginError::Compile(e.to_string());
        for payload in Parser::new(0).parse_all(bytes) {
            match payload.map_err(malformed)? {
                Payload::ImportSection(imports) => {
                    for import in imports.into_imports() {
                        let import = import.map_err(malformed)?;
                        let provided = self
                            .host_imports
                            .iter()
                            .any(|(m, n)| m == import.module && n == import.name);
                        if !provided {
                            return Err(PluginError::Import {
                                module: import.module.to_string(),
                                name: import.name.to_string(),
                            });
                        }
                    }
                }
                Payload::CodeSectionStart { count, size, .. } => {
                    if size > MAX_CODE_BYTES {
                        return Err(PluginError::TooLarge {
                            what: format!("{} KiB of code", size >> 10),
                            limit: format!("{} KiB", MAX_CODE_BYTES >> 10),
                        });
                    }
                    if count > MAX_FUNCTIONS {
                        return Err(PluginError::TooLarge {
                            what: format!("{count} functions"),
                            limit: format!("{MAX_FUNCTIONS} functions"),
                        });
                    }
                    // Nothing after the code section needs reading.
                    return Ok(());
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Compiles `bytes` and checks exports, ABI version and kind. Does not run `init`.
    pub fn compile(
        &self,
        bytes: &[u8],
        kind: PluginKind,
        name: &str,
        generation: u64,
        config_json: Arc<[u8]>,
    ) -> Result<PluginVersion, PluginError> {
        if !bytes.starts_with(b"\0asm") {
            return Err(PluginError::Compile(
                "the upload does not start with the wasm magic bytes (\\0asm); only binary modules are accepted (text .wat must be compiled first, e.g. with wasm-tools parse)".into(),
            ));
        }
        self.precheck(bytes)?;
        let digest: [u8; 32] = Sha256::digest(bytes).into();
        let module = self.module(&digest, bytes)?;
        for (export, params, results) in required_exports(kind) {
            check_export(&module, export, params, results)?;
        }
        if module
            .get_export("memory")
            .and_then(|m| m.memory().cloned())
            .is_none()
        {
            return Err(PluginError::MissingExport {
                name: "memory",
                detail: "no exported memory".into(),
            });
        }
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| PluginError::Instantiate(root_cause(&e)))?;
        let version = PluginVersion {
            pre,
            sha256: hex::encode(digest),
            name: name.to_string(),
            generation,
            config_json,
        };
        // Version and kind are checked on a throwaway instance, before anything else runs.
        let mut store = self.store(
            Arc::new([const { AtomicI64::new(0) }; COUNTER_SLOTS]),
            name,
            None,
        );
        let instance = version
            .pre
            .instantiate(&mut store)
            .map_err(|e| PluginError::Instantiate(root_cause(&e)))?;
        store.set_epoch_deadline(INIT_DEADLINE_TICKS);
        let call_i32 =
            |store: &mut Store<HostState>, name: &'static str| -> Result<i32, PluginError> {
                let f = instance
                    .get_typed_func::<(), i32>(&mut *store, name)
                    .map_err(|e| PluginError::MissingExport {
                        name,
                        detail: root_cause(&e),
                    })?;
                f.call(&mut *store, ()).map_err(|e| {
                    PluginError::Instantiate(format!("`{name}` trapped: {}", root_cause(&e)))
                })
            };
        let abi = call_i32(&mut store, "sluice_abi_version")?;
        if abi != ABI_VERSION {
            return Err(PluginError::AbiVersion { found: abi });
        }
        let found = call_i32(&mut store, "sluice_plugin_kind")?;
        if found != kind.code() {
            let found = match found {
                0 => "strategy".to_string(),
                1 => "health".to_string(),
                n => format!("unknown (kind {n})"),
            };
            return Err(PluginError::WrongKind {
                found,
                expected: kind.as_str(),
            });
        }
        Ok(version)
    }

    /// The compiled module for `bytes` (whose sha256 is `digest`), from the cache or compiled now.
    fn module(&self, digest: &[u8; 32], bytes: &[u8]) -> Result<Module, PluginError> {
        // Admin-path only (reloads and uploads), never taken per request.
        #[allow(clippy::disallowed_types, clippy::disallowed_methods)]
        let cached = self.modules.lock().get(digest).cloned();
        if let Some(m) = cached {
            return Ok(m);
        }
        let module = Module::from_binary(&self.engine, bytes)
            .map_err(|e| PluginError::Compile(root_cause(&e)))?;
        let mut modules = self.modules.lock();
        if modules.len() >= MODULE_CACHE {
            modules.clear();
        }
        modules.insert(*digest, module.clone());
        Ok(module)
    }

    /// A store for one instance of plugin `name`.
    pub fn store(
        &self,
        counters: Arc<[AtomicI64; COUNTER_SLOTS]>,
        name: &str,
        log_dropped: Option<IntCounter>,
    ) -> Store<HostState> {
        let mut store = Store::new(
            &self.engine,
            HostState::new(counters, Arc::from(name), log_dropped),
        );
        store.limiter(|s| &mut s.limits);
        store
    }
}

fn required_exports(
    kind: PluginKind,
) -> Vec<(
    &'static str,
    &'static [wasmtime::ValType],
    &'static [wasmtime::ValType],
)> {
    use wasmtime::ValType::I32;
    let mut v: Vec<(
        &'static str,
        &'static [wasmtime::ValType],
        &'static [wasmtime::ValType],
    )> = vec![
        ("sluice_abi_version", &[], &[I32]),
        ("sluice_plugin_kind", &[], &[I32]),
    ];
    // Version and kind are checked first so an old or mismatched plugin gets that message,
    // not a complaint about some other export.
    v.push(("sluice_alloc", &[I32], &[I32]));
    v.push(("sluice_init", &[I32, I32], &[I32]));
    if kind == PluginKind::Strategy {
        v.push(("sluice_set_backends", &[I32, I32], &[I32]));
        v.push(("sluice_pick", &[I32], &[I32]));
    }
    v
}

fn check_export(
    module: &Module,
    name: &'static str,
    params: &[wasmtime::ValType],
    results: &[wasmtime::ValType],
) -> Result<(), PluginError> {
    let Some(ty) = module.get_export(name) else {
        return Err(PluginError::MissingExport {
            name,
            detail: "not exported".into(),
        });
    };
    let Some(f) = ty.func() else {
        return Err(PluginError::MissingExport {
            name,
            detail: "not a function".into(),
        });
    };
    let same = |a: &mut dyn ExactSizeIterator<Item = wasmtime::ValType>,
                b: &[wasmtime::ValType]| {
        a.len() == b.len() && a.zip(b).all(|(x, y)| wasmtime::ValType::eq(&x, y))
    };
    if !same(&mut f.params(), params) || !same(&mut f.results(), results) {
        return Err(PluginError::MissingExport {
            name,
            detail: format!("found {f}"),
        });
    }
    Ok(())
}

/// A plugin version as served: the version and the per-version state a host keeps beside it
/// (for strategies, every worker thread's instance). Dropping the last handle drops that state,
/// so replacing a version or removing its pool frees every instance and allocator slot.
pub struct Live<T> {
    /// The version.
    pub version: Arc<PluginVersion>,
    /// Host state that lives exactly as long as this version serves (or is still in use).
    pub state: T,
}

/// A validated version that is ready to publish: the result of [`VersionSlot::prepare`].
pub struct Prepared(PluginVersion);

impl From<PluginVersion> for Prepared {
    fn from(v: PluginVersion) -> Prepared {
        Prepared(v)
    }
}

impl Prepared {
    /// The prepared version.
    pub fn version(&self) -> &PluginVersion {
        &self.0
    }
}

/// How many loads and swaps of one pool's plugin of one kind are remembered (the oldest go).
pub const SWAP_HISTORY: usize = 16;

/// One entry of a plugin's swap history, for the admin API and dashboard.
#[derive(Debug, Clone, serde::Serialize)]
pub struct SwapRecord {
    /// Wall-clock time, Unix milliseconds.
    pub at_unix_ms: u64,
    /// `loaded` (the pool's first version), `swapped` or `rejected` (the old version stayed).
    pub result: &'static str,
    /// The version's name (`builtin:...`, a file name, or `uploaded`); empty for a rejection.
    pub name: String,
    /// The version's sha256 (not for a rejection).
    pub sha256: Option<String>,
    /// The version's generation (not for a rejection).
    pub generation: Option<u64>,
    /// Why a rejected version was refused.
    pub error: Option<String>,
}

impl SwapRecord {
    fn of(result: &'static str, v: &PluginVersion) -> SwapRecord {
        SwapRecord {
            at_unix_ms: crate::history::unix_ms(),
            result,
            name: v.name.clone(),
            sha256: Some(v.sha256.clone()),
            generation: Some(v.generation),
            error: None,
        }
    }
}

/// The serving version of one pool's plugin of one kind, and how a new one replaces it. Shared by
/// the strategy and health hosts: prepare (everything that can fail), then publish (cannot fail).
pub struct VersionSlot<T> {
    pool: String,
    kind: PluginKind,
    current: arc_swap::ArcSwap<Live<T>>,
    next_generation: AtomicU64,
    swaps_ok: IntCounter,
    swaps_rejected: IntCounter,
    /// The last [`SWAP_HISTORY`] loads, swaps and rejections, oldest first.
    history: ColdLock<std::collections::VecDeque<SwapRecord>>,
}

impl<T: Default> VersionSlot<T> {
    /// A slot serving `first`.
    pub fn new(
        pool: &str,
        kind: PluginKind,
        first: Prepared,
        series: &crate::metrics::SeriesScope,
        metrics: &crate::metrics::Metrics,
    ) -> VersionSlot<T> {
        let next = first.0.generation + 1;
        let loaded = SwapRecord::of("loaded", &first.0);
        VersionSlot {
            pool: pool.to_string(),
            kind,
            current: arc_swap::ArcSwap::from_pointee(Live {
                version: Arc::new(first.0),
                state: T::default(),
            }),
            next_generation: AtomicU64::new(next),
            swaps_ok: series.counter(&metrics.plugin_swaps, &[kind.as_str(), "ok"]),
            swaps_rejected: series.counter(&metrics.plugin_swaps, &[kind.as_str(), "rejected"]),
            history: ColdLock::new([loaded].into()),
        }
    }

    /// The last loads, swaps and rejections, oldest first.
    pub fn swap_history(&self) -> Vec<SwapRecord> {
        self.history.lock().iter().cloned().collect()
    }

    fn remember(&self, record: SwapRecord) {
        let mut h = self.history.lock();
        if h.len() == SWAP_HISTORY {
            h.pop_front();
        }
        h.push_back(record);
    }

    /// The version serving now, with its state; lock-free.
    pub fn load(&self) -> arc_swap::Guard<Arc<Live<T>>> {
        self.current.load()
    }

    /// The version serving now.
    pub fn version(&self) -> Arc<PluginVersion> {
        self.current.load().version.clone()
    }

    /// Runs `validate(generation, config)` for a candidate; publishes nothing. `config_json:
    /// None` keeps the current version's config.
    pub fn prepare(
        &self,
        config_json: Option<Arc<[u8]>>,
        validate: impl FnOnce(u64, Arc<[u8]>) -> Result<PluginVersion, PluginError>,
    ) -> Result<Prepared, PluginError> {
        let config = config_json.unwrap_or_else(|| self.current.load().version.config_json.clone());
        let generation = self.next_generation.fetch_add(1, Ordering::Relaxed);
        validate(generation, config).map(Prepared)
    }

    /// Makes a prepared version the serving one. Cannot fail.
    pub fn publish(&self, prepared: Prepared) -> Arc<PluginVersion> {
        let version = Arc::new(prepared.0);
        self.current.store(Arc::new(Live {
            version: version.clone(),
            state: T::default(),
        }));
        self.swaps_ok.inc();
        self.remember(SwapRecord::of("swapped", &version));
        tracing::info!(pool = %self.pool, kind = self.kind.as_str(), plugin = %version.name, sha256 = %version.sha256, generation = version.generation, "plugin swapped");
        version
    }

    /// Prepare and publish in one step (the API's hot swap); a rejection is counted and the old
    /// version keeps serving.
    pub fn swap(
        &self,
        config_json: Option<Arc<[u8]>>,
        validate: impl FnOnce(u64, Arc<[u8]>) -> Result<PluginVersion, PluginError>,
    ) -> Result<Arc<PluginVersion>, PluginError> {
        match self.prepare(config_json, validate) {
            Ok(p) => Ok(self.publish(p)),
            Err(e) => {
                self.swaps_rejected.inc();
                self.remember(SwapRecord {
                    at_unix_ms: crate::history::unix_ms(),
                    result: "rejected",
                    name: String::new(),
                    sha256: None,
                    generation: None,
                    error: Some(e.to_string()),
                });
                Err(e)
            }
        }
    }
}

/// Why a plugin call could not be used. Strategy and health hosts count each reason in
/// `sluice_plugin_faults_total{reason}` and log it.
#[derive(Debug)]
#[non_exhaustive]
pub enum Fault {
    /// The plugin trapped (or a host call refused it).
    Trap(String),
    /// The call ran past its epoch deadline.
    Deadline,
    /// A strategy returned an index outside the table or already tried.
    BadIndex(i32),
    /// A health plugin returned a malformed probe or verdict.
    BadAnswer(String),
    /// The instance could not be rebuilt.
    Instantiate(String),
    /// The instance is waiting out its rebuild backoff.
    Backoff,
}

impl std::fmt::Display for Fault {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fault::Trap(t) => write!(f, "{t}"),
            Fault::Deadline => write!(f, "deadline exceeded (the plugin ran too long)"),
            Fault::BadIndex(i) => write!(
                f,
                "returned index {i}, which is out of range or already tried"
            ),
            Fault::BadAnswer(why) => write!(f, "{why}"),
            Fault::Instantiate(e) => write!(f, "cannot rebuild the instance: {e}"),
            Fault::Backoff => write!(f, "instance is waiting to be rebuilt"),
        }
    }
}

impl Fault {
    /// Classifies a wasmtime call error.
    pub fn from_call(e: wasmtime::Error) -> Fault {
        if is_deadline(&e) {
            Fault::Deadline
        } else {
            Fault::Trap(root_cause(&e))
        }
    }

    /// The `reason` label.
    pub fn reason(&self) -> &'static str {
        match self {
            Fault::Trap(_) => "trap",
            Fault::Deadline => "deadline",
            Fault::BadIndex(_) => "bad_index",
            Fault::BadAnswer(_) => "bad_answer",
            Fault::Instantiate(_) => "instantiate",
            Fault::Backoff => "backoff",
        }
    }
}

/// One counter per [`Fault`] reason, in one pool's series.
pub struct FaultCounters {
    trap: IntCounter,
    deadline: IntCounter,
    bad_index: IntCounter,
    bad_answer: IntCounter,
    instantiate: IntCounter,
}

impl FaultCounters {
    /// The counters of `kind` plugins in `series` (a pool's scope).
    pub fn new(
        series: &crate::metrics::SeriesScope,
        metrics: &crate::metrics::Metrics,
        kind: PluginKind,
    ) -> FaultCounters {
        let c = |reason| series.counter(&metrics.plugin_faults, &[kind.as_str(), reason]);
        FaultCounters {
            trap: c("trap"),
            deadline: c("deadline"),
            bad_index: c("bad_index"),
            bad_answer: c("bad_answer"),
            instantiate: c("instantiate"),
        }
    }

    /// The count of each reason so far.
    pub fn totals(&self) -> [(&'static str, u64); 5] {
        [
            ("trap", self.trap.get()),
            ("deadline", self.deadline.get()),
            ("bad_index", self.bad_index.get()),
            ("bad_answer", self.bad_answer.get()),
            ("instantiate", self.instantiate.get()),
        ]
    }

    /// Counts `fault`; a backoff is not a new fault and is not counted.
    pub fn count(&self, fault: &Fault) {
        match fault {
            Fault::Trap(_) => self.trap.inc(),
            Fault::Deadline => self.deadline.inc(),
            Fault::BadIndex(_) => self.bad_index.inc(),
            Fault::BadAnswer(_) => self.bad_answer.inc(),
            Fault::Instantiate(_) => self.instantiate.inc(),
            Fault::Backoff => {}
        }
    }
}

/// A live, initialized instance of a plugin version: its store, memory and allocator, with
/// `sluice_init` already run. Strategy and health hosts add their own exports on top.
pub struct Guest {
    /// The instance's store.
    pub store: Store<HostState>,
    /// The wasm instance, to look up kind-specific exports.
    pub instance: wasmtime::Instance,
    memory: wasmtime::Memory,
    alloc: wasmtime::TypedFunc<i32, i32>,
}

impl Guest {
    /// Instantiates `version` with `counters` and runs its `sluice_init` with the version's config.
    pub fn new(
        engine: &PluginEngine,
        version: &PluginVersion,
        counters: Arc<[AtomicI64; COUNTER_SLOTS]>,
        log_dropped: Option<IntCounter>,
    ) -> Result<Guest, PluginError> {
        let mut store = engine.store(counters, &version.name, log_dropped);
        let instance = version
            .pre
            .instantiate(&mut store)
            .map_err(|e| PluginError::Instantiate(root_cause(&e)))?;
        let memory =
            instance
                .get_memory(&mut store, "memory")
                .ok_or(PluginError::MissingExport {
                    name: "memory",
                    detail: "no exported memory".into(),
                })?;
        let alloc = typed(&instance, &mut store, "sluice_alloc")?;
        let init: wasmtime::TypedFunc<(i32, i32), i32> =
            typed(&instance, &mut store, "sluice_init")?;
        let mut guest = Guest {
            store,
            instance,
            memory,
            alloc,
        };
        guest.store.set_epoch_deadline(INIT_DEADLINE_TICKS);
        let (ptr, len) = guest
            .write(&version.config_json)
            .map_err(|e| PluginError::Init(root_cause(&e)))?;
        let rc = init
            .call(&mut guest.store, (ptr, len))
            .map_err(|e| PluginError::Init(root_cause(&e)))?;
        if rc != 0 {
            let why = guest
                .store
                .data_mut()
                .error
                .take()
                .unwrap_or_else(|| format!("sluice_init returned {rc}"));
            return Err(PluginError::Init(why));
        }
        Ok(guest)
    }

    /// A typed export of this instance.
    pub fn func<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
        &mut self,
        name: &'static str,
    ) -> Result<wasmtime::TypedFunc<P, R>, PluginError> {
        typed(&self.instance, &mut self.store, name)
    }

    /// Copies `bytes` into a guest buffer from `sluice_alloc`.
    pub fn write(&mut self, bytes: &[u8]) -> wasmtime::Result<(i32, i32)> {
        let len = i32::try_from(bytes.len())?;
        let ptr = self.alloc.call(&mut self.store, len)?;
        wasmtime::ensure!(
            ptr != 0 || len == 0,
            "sluice_alloc({len}) returned 0 (out of memory)"
        );
        self.memory
            .write(&mut self.store, usize::try_from(ptr)?, bytes)?;
        Ok((ptr, len))
    }

    /// The guest's memory contents.
    pub fn memory(&self) -> &[u8] {
        self.memory.data(&self.store)
    }
}

fn typed<P: wasmtime::WasmParams, R: wasmtime::WasmResults>(
    instance: &wasmtime::Instance,
    store: &mut Store<HostState>,
    name: &'static str,
) -> Result<wasmtime::TypedFunc<P, R>, PluginError> {
    instance
        .get_typed_func(store, name)
        .map_err(|e| PluginError::MissingExport {
            name,
            detail: root_cause(&e),
        })
}

/// Longest error text shown for a plugin (the rest is cut: an upload must not be echoed back).
const MAX_ERROR_TEXT: usize = 1024;

/// The innermost message of a wasmtime error chain, which is the one an operator can act on,
/// cut to [`MAX_ERROR_TEXT`] bytes.
pub fn root_cause(e: &wasmtime::Error) -> String {
    let mut msg = full_root_cause(e);
    if msg.len() > MAX_ERROR_TEXT {
        let mut end = MAX_ERROR_TEXT;
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        let cut = msg.len() - end;
        msg.truncate(end);
        msg.push_str(&format!("… ({cut} more bytes)"));
    }
    msg
}

fn full_root_cause(e: &wasmtime::Error) -> String {
    let mut msg = e.to_string();
    if let Some(trap) = e.downcast_ref::<wasmtime::Trap>() {
        msg = match trap {
            wasmtime::Trap::Interrupt => "deadline exceeded (the plugin ran too long)".to_string(),
            other => format!("trap: {other}"),
        };
    } else if let Some(src) = e.chain().last() {
        if src.to_string() != msg {
            msg = format!("{msg}: {src}");
        }
    }
    msg
}

/// True when the error is a deadline hit (epoch interruption).
pub fn is_deadline(e: &wasmtime::Error) -> bool {
    matches!(
        e.downcast_ref::<wasmtime::Trap>(),
        Some(wasmtime::Trap::Interrupt)
    )
}

fn memory(caller: &mut Caller<'_, HostState>) -> Option<wasmtime::Memory> {
    caller.get_export("memory").and_then(|e| e.into_memory())
}

fn read_guest(caller: &mut Caller<'_, HostState>, ptr: i32, len: i32) -> Option<Vec<u8>> {
    let mem = memory(caller)?;
    let (ptr, len) = (usize::try_from(ptr).ok()?, usize::try_from(len).ok()?);
    mem.data(&caller)
        .get(ptr..ptr.checked_add(len)?)
        .map(<[u8]>::to_vec)
}

fn build_linker(engine: &Engine) -> anyhow::Result<Linker<HostState>> {
    let mut l = Linker::new(engine);
    l.func_wrap(
        "sluice",
        "log",
        |mut c: Caller<'_, HostState>, level: i32, ptr: i32, len: i32| {
            let Some(bytes) = read_guest(&mut c, ptr, len.min(4096)) else {
                return;
            };
            let (admitted, dropped_before) = c.data_mut().log.admit(bytes.len(), Instant::now());
            let plugin = c.data().plugin.clone();
            if dropped_before > 0 {
                tracing::warn!(target: "sluice::plugin", plugin = &*plugin, dropped = dropped_before, "plugin log lines dropped: over the instance's budget of {LOG_LINES_PER_SEC} lines / {LOG_BYTES_PER_SEC} bytes per second");
            }
            if !admitted {
                return;
            }
            let msg = String::from_utf8_lossy(&bytes);
            use sluice_sdk::log::Level;
            match Level::from_i32(level) {
                Some(Level::Error) => tracing::error!(target: "sluice::plugin", plugin = &*plugin, "{msg}"),
                Some(Level::Warn) => tracing::warn!(target: "sluice::plugin", plugin = &*plugin, "{msg}"),
                Some(Level::Info) => tracing::info!(target: "sluice::plugin", plugin = &*plugin, "{msg}"),
                _ => tracing::debug!(target: "sluice::plugin", plugin = &*plugin, "{msg}"),
            }
        },
    )?;
    l.func_wrap(
        "sluice",
        "set_error",
        |mut c: Caller<'_, HostState>, ptr: i32, len: i32| {
            if let Some(bytes) = read_guest(&mut c, ptr, len.min(4096)) {
                c.data_mut().error = Some(String::from_utf8_lossy(&bytes).into_owned());
            }
        },
    )?;
    l.func_wrap("sluice", "now_ms", || {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0)
    })?;
    let started = Instant::now();
    l.func_wrap("sluice", "monotonic_ns", move || {
        started.elapsed().as_nanos() as i64
    })?;
    l.func_wrap("sluice", "random_u64", |mut c: Caller<'_, HostState>| {
        c.data_mut().next_random() as i64
    })?;
    l.func_wrap(
        "sluice",
        "counter_add",
        |c: Caller<'_, HostState>, slot: i32, delta: i64| -> wasmtime::Result<i64> {
            let counter = usize::try_from(slot)
                .ok()
                .and_then(|s| c.data().counters.get(s))
                .ok_or_else(|| {
                    wasmtime::format_err!(
                        "counter_add: slot {slot} is outside 0..={}",
                        COUNTER_SLOTS - 1
                    )
                })?;
            Ok(counter.fetch_add(delta, Ordering::Relaxed))
        },
    )?;
    l.func_wrap(
        "sluice",
        "request_attr",
        |mut c: Caller<'_, HostState>,
         kind: i32,
         name_ptr: i32,
         name_len: i32,
         buf_ptr: i32,
         buf_cap: i32|
         -> i32 {
            with_attr(&mut c, kind, name_ptr, name_len, |data, value| {
                let Some(value) = value else { return -1 };
                let n = value.len().min(usize::try_from(buf_cap).unwrap_or(0));
                match usize::try_from(buf_ptr)
                    .ok()
                    .and_then(|p| data.get_mut(p..p.checked_add(n)?))
                {
                    Some(dst) => dst.copy_from_slice(&value[..n]),
                    None => return -2,
                }
                value.len().min(i32::MAX as usize) as i32
            })
        },
    )?;
    l.func_wrap(
        "sluice",
        "request_hash",
        |mut c: Caller<'_, HostState>,
         kind: i32,
         name_ptr: i32,
         name_len: i32,
         out_ptr: i32|
         -> i32 {
            with_attr(&mut c, kind, name_ptr, name_len, |data, value| {
                let Some(value) = value else { return 0 };
                match usize::try_from(out_ptr)
                    .ok()
                    .and_then(|p| data.get_mut(p..p.checked_add(8)?))
                {
                    Some(dst) => dst.copy_from_slice(&abi_hash(value).to_le_bytes()),
                    None => return -2,
                }
                1
            })
        },
    )?;
    l.func_wrap(
        "sluice",
        "excluded",
        |c: Caller<'_, HostState>, index: i32| -> i32 {
            match (c.data().request(), usize::try_from(index)) {
                (Some(req), Ok(i)) => i32::from((req.excluded)(i)),
                _ => 0,
            }
        },
    )?;
    fn stat<R>(c: &Caller<'_, HostState>, index: i32, f: impl Fn(&BackendStats) -> R) -> Option<R> {
        let table = c.data().table.as_ref()?;
        let b = table.backends.get(usize::try_from(index).ok()?)?;
        Some(f(&b.stats))
    }
    l.func_wrap(
        "sluice",
        "backend_inflight",
        |c: Caller<'_, HostState>, i: i32| -> i32 {
            stat(&c, i, |s| s.inflight().clamp(0, i32::MAX as i64) as i32).unwrap_or(-1)
        },
    )?;
    l.func_wrap(
        "sluice",
        "backend_latency_us",
        |c: Caller<'_, HostState>, i: i32| -> i64 {
            stat(&c, i, |s| s.latency_us() as i64).unwrap_or(-1)
        },
    )?;
    l.func_wrap(
        "sluice",
        "backend_failures",
        |c: Caller<'_, HostState>, i: i32| -> i32 {
            stat(&c, i, |s| s.failures() as i32).unwrap_or(-1)
        },
    )?;
    Ok(l)
}

/// Looks up request attribute `kind` (its name read from guest memory at `name_ptr`) and hands
/// the guest memory and the value (`None`: the request has no such attribute) to `f`. Answers -2
/// itself when there is no request (outside `sluice_pick`), no memory, or the kind is unknown.
fn with_attr(
    c: &mut Caller<'_, HostState>,
    kind: i32,
    name_ptr: i32,
    name_len: i32,
    f: impl FnOnce(&mut [u8], Option<&[u8]>) -> i32,
) -> i32 {
    let Some(mem) = memory(c) else { return -2 };
    let (data, state) = mem.data_and_store_mut(c);
    // SAFETY: see `HostState::with_request`.
    let Some(req) = (unsafe { state.request.0.as_ref() }) else {
        return -2;
    };
    // Copied to the stack because `f` may write `data`; names longer than 256 bytes match
    // nothing real (header names are far shorter).
    let mut name_buf = [0u8; 256];
    let name = guest_slice(data, name_ptr, name_len).unwrap_or(&[]);
    let n = name.len().min(name_buf.len());
    name_buf[..n].copy_from_slice(&name[..n]);
    match req.attr(kind, &name_buf[..n], &mut state.scratch) {
        Err(()) => -2,
        Ok(value) => f(data, value),
    }
}

fn guest_slice(data: &[u8], ptr: i32, len: i32) -> Option<&[u8]> {
    let (p, n) = (usize::try_from(ptr).ok()?, usize::try_from(len).ok()?);
    data.get(p..p.checked_add(n)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_matches_the_documented_function() {
        // Values fixed forever by the ABI (computed from its written definition).
        assert_eq!(abi_hash(b""), 0xefd0_1f60_ba99_2926);
        assert_eq!(abi_hash(b"127.0.0.1"), 0xcede_3ba3_b641_7b22);
        assert_eq!(abi_hash(b"x-user"), 0x87a0_7faf_2b22_9b46);
    }

    /// Both request paths give strategies the same attributes.
    #[test]
    fn attributes_are_read_from_the_request() {
        let (parts, ()) = http::Request::get("/a/b?x=1&user=42")
            .header("host", "example.com:8080")
            .header("cookie", "a=1; sid=abc")
            .header("x-canary", "yes")
            .body(())
            .unwrap()
            .into_parts();
        let buf = b"GET /a/b?x=1&user=42 HTTP/1.1\r\nhost: example.com:8080\r\ncookie: a=1; sid=abc\r\nx-canary: yes\r\n\r\n";
        let mut spans = Vec::new();
        let head = crate::head::parse_request(buf, &mut spans, 4096)
            .unwrap()
            .unwrap();
        let lean = crate::head::ParsedRequest {
            buf,
            head: &head,
            headers: &spans,
        };
        let heads: [&dyn HeadView; 2] = [&parts, &lean];
        for h in heads {
            let no = |_: usize| false;
            let view = RequestView {
                header: h,
                client_ip: Some("10.1.2.3".parse().unwrap()),
                excluded: &no,
            };
            let mut s = String::new();
            let mut get = |k: i32, n: &str| {
                view.attr(k, n.as_bytes(), &mut s)
                    .unwrap()
                    .map(|v| String::from_utf8(v.to_vec()).unwrap())
            };
            assert_eq!(get(0, "").as_deref(), Some("10.1.2.3"));
            assert_eq!(get(1, "").as_deref(), Some("GET"));
            assert_eq!(get(2, "").as_deref(), Some("example.com"));
            assert_eq!(get(3, "").as_deref(), Some("/a/b"));
            assert_eq!(get(4, "X-Canary").as_deref(), Some("yes"));
            assert_eq!(get(5, "sid").as_deref(), Some("abc"));
            assert_eq!(get(6, "user").as_deref(), Some("42"));
            assert_eq!(get(6, "nope"), None);
            assert_eq!(get(7, "").as_deref(), Some("/a/b?x=1&user=42"));
            assert!(view.attr(99, b"", &mut String::new()).is_err());
        }
    }
}
