//! Write sluice load-balancing strategies and health checks in Rust and run them as
//! WebAssembly plugins.
//!
//! There are two kinds of plugin: a [`Strategy`] chooses a backend for each request, a
//! [`HealthCheck`] decides how backends are probed and judged (see [Health
//! checks](#health-checks)). One crate builds one plugin.
//!
//! A *strategy* decides, for each request, which backend of a pool receives it. sluice runs the
//! strategy inside a sandboxed wasm instance per worker thread and calls it on every request, so
//! it is written as ordinary, synchronous Rust that must be quick: a pick runs under a deadline
//! (10 ms by default) and should take well under a microsecond.
//!
//! # The lifecycle
//!
//! 1. [`Strategy::init`] runs once per instance with the pool's [`Config`]. Returning `Err`
//!    refuses the plugin; the message is shown to the operator (`sluice plugin load` prints it).
//! 2. [`Strategy::on_backends`] runs after init and whenever membership, weight or health
//!    changes, with the new [`Backends`] table. Precompute here (groups, hash rings): this is
//!    the place for allocation.
//! 3. [`Strategy::pick`] runs per request and returns an index into the table, or `None` to
//!    answer `503`. On a retry ([`Request::attempt`] > 0) it must skip backends the request
//!    already tried ([`Request::is_excluded`]).
//!
//! Nothing about a request is sent to the plugin up front: [`Request`] and [`Backends`] ask the
//! host for exactly what the strategy uses (a header, a hash of a cookie, the in-flight count of
//! a backend), one cheap host call each.
//!
//! # A complete strategy
//!
//! Sticky sessions by a cookie, with rendezvous hashing so that adding or removing a backend
//! moves only the sessions that must move; requests without the cookie go to the backend with
//! the fewest requests in flight.
//!
//! ```
//! use sluice_sdk::{hash_bytes, Attr, Backends, Config, Request, Strategy};
//!
//! pub struct Sticky {
//!     cookie: String,
//!     /// Hash of each backend's address, by table index; rebuilt on table changes so that
//!     /// `pick` allocates nothing.
//!     addr_hashes: Vec<u64>,
//! }
//!
//! impl Strategy for Sticky {
//!     fn init(config: &Config) -> Result<Self, String> {
//!         config.reject_unknown_keys(&["cookie"])?;
//!         let cookie = config.get_str("cookie")?.unwrap_or("session").to_owned();
//!         Ok(Sticky { cookie, addr_hashes: Vec::new() })
//!     }
//!
//!     fn on_backends(&mut self, backends: &Backends) {
//!         self.addr_hashes = backends.iter().map(|b| hash_bytes(b.addr().as_bytes())).collect();
//!     }
//!
//!     fn pick(&mut self, req: &mut Request, backends: &Backends) -> Option<usize> {
//!         let candidates = (0..backends.len()).filter(|&i| !req.is_excluded(i));
//!         match req.hash(Attr::Cookie(&self.cookie)) {
//!             // Highest score wins; a retry naturally falls to the next-highest.
//!             Some(session) => candidates
//!                 .max_by_key(|&i| hash_bytes(&(session ^ self.addr_hashes[i]).to_le_bytes())),
//!             None => candidates.min_by_key(|&i| backends.inflight(i).unwrap_or(u32::MAX)),
//!         }
//!     }
//! }
//!
//! // Emits the wasm exports when compiled for wasm32; natively it only checks the type.
//! sluice_sdk::export_strategy!(Sticky);
//!
//! // Unit test it natively against the mock host:
//! use sluice_sdk::testing::{backends, Harness, MockHost, TestRequest};
//!
//! let mut h = Harness::<Sticky>::new(r#"{"cookie": "sid"}"#).unwrap();
//! h.set_backends(&backends(3));
//! MockHost::set_inflight(0, 5);
//! MockHost::set_inflight(1, 2);
//! MockHost::set_inflight(2, 9);
//! assert_eq!(h.pick(&TestRequest::new()), Some(1));
//!
//! let alice = TestRequest::new().cookie("sid", "alice");
//! let home = h.pick(&alice).unwrap();
//! assert_eq!(h.pick(&alice), Some(home), "sticky");
//! let retry = h.pick(&alice.clone().attempt(1).exclude(home)).unwrap();
//! assert_ne!(retry, home);
//!
//! assert!(Harness::<Sticky>::new(r#"{"cooky": "sid"}"#).unwrap_err().contains("cooky"));
//! ```
//!
//! # Setting up a plugin crate
//!
//! ```toml
//! [lib]
//! crate-type = ["cdylib", "rlib"]   # cdylib is the plugin; rlib lets tests link it natively
//!
//! [dependencies]
//! sluice-sdk = "0.1"
//!
//! [profile.release]
//! opt-level = "s"
//! lto = true
//! codegen-units = 1
//! panic = "abort"
//! ```
//!
//! Build with `cargo build --release --target wasm32-unknown-unknown` and load the `.wasm` from
//! `target/wasm32-unknown-unknown/release/` with `sluice plugin load --pool NAME FILE`, or
//! through the admin API (`PUT /api/pools/NAME/strategy` with the module as the body). The
//! crate's `README.md` walks through it.
//!
//! # Testing
//!
//! On every target other than wasm32 the host functions are served by
//! [`testing::MockHost`], and [`testing::Harness`] runs the full lifecycle, so a plain
//! `cargo test` tests the strategy; [`testing::HealthHarness`] does the same for a health
//! check. See the [`testing`] module.
//!
//! # Rules for the request path
//!
//! - **Do not allocate per pick.** Allocate in `init` and `on_backends`; the text accessors of
//!   [`Request`] reuse one buffer.
//! - **Avoid formatting on the hot path.** `format!` pulls in the formatting machinery and
//!   allocates; log static strings from `pick`.
//! - **State is per instance.** Each worker thread has its own instance (and instances are
//!   rebuilt after a fault), so fields of your strategy are per thread. For pool-wide state use
//!   [`counter_add`]: sixteen atomic counters shared by every instance, surviving plugin swaps.
//! - **A panic is a trap.** The host serves that request with its own round-robin, counts a
//!   plugin fault, logs the panic message and rebuilds the instance. Returning an index outside
//!   the table is a fault too.
//!
//! # Health checks
//!
//! A health-check plugin decides *what* to send to a backend and *how to judge* the answer;
//! the host does all the I/O and the scheduling (interval, jitter, timeout, and the rise/fall
//! thresholds that turn single verdicts into a backend going down or coming back up).
//!
//! 1. [`HealthCheck::init`] runs once per instance with the pool's `health.config`.
//! 2. For every check the host calls [`HealthCheck::probe`] with the [`Backend`] and runs the
//!    returned [`Probe`]: a TCP connect, an HTTP/1.1 request, or a raw TCP exchange.
//! 3. It then calls [`HealthCheck::evaluate`] with the [`ProbeResult`] (outcome, latency, HTTP
//!    status, headers, the first 4 KiB of the body) and applies the [`Verdict`]: healthy,
//!    unhealthy, or healthy but [degraded](Verdict::Degraded) to a percentage of its weight.
//!
//! Both methods have defaults (TCP connect; healthy if the exchange completed with a 2xx/3xx
//! status), so a check overrides only what it changes. A panic or an unencodable probe is a
//! plugin fault, which never marks a backend down: the check counts as an error and the
//! backend keeps its last state.
//!
//! A check of a JSON status document that takes overloaded backends partly out of rotation:
//!
//! ```
//! use sluice_sdk::{Backend, Config, HealthCheck, Probe, ProbeResult, Verdict};
//!
//! pub struct StatusDoc {
//!     path: String,
//! }
//!
//! impl HealthCheck for StatusDoc {
//!     fn init(config: &Config) -> Result<Self, String> {
//!         config.reject_unknown_keys(&["path"])?;
//!         let path = config.get_str("path")?.unwrap_or("/status").to_owned();
//!         // Refuse a path the host would refuse now, at load time, not on every check.
//!         Probe::http_get(path.as_str()).validate()?;
//!         Ok(StatusDoc { path })
//!     }
//!
//!     fn probe(&mut self, _backend: &Backend) -> Probe {
//!         Probe::http_get(self.path.as_str()).header("accept", "application/json")
//!     }
//!
//!     fn evaluate(&mut self, _backend: &Backend, result: &ProbeResult) -> Verdict {
//!         if result.status() != Some(200) {
//!             return Verdict::Unhealthy; // also covers connect failures and timeouts
//!         }
//!         let Ok(doc) = sluice_sdk::serde_json::from_slice::<sluice_sdk::serde_json::Value>(
//!             result.body(),
//!         ) else {
//!             return Verdict::Unhealthy;
//!         };
//!         match doc["load"].as_f64() {
//!             Some(load) if load > 0.8 => Verdict::degraded(((1.0 - load) * 500.0).round() as u32),
//!             _ => Verdict::Healthy,
//!         }
//!     }
//! }
//!
//! // Emits the wasm exports when compiled for wasm32; natively it only checks the type.
//! sluice_sdk::export_health_check!(StatusDoc);
//!
//! // Unit test it natively; every call goes through the ABI encoding, as in the proxy:
//! use sluice_sdk::testing::HealthHarness;
//!
//! let mut h = HealthHarness::<StatusDoc>::new(r#"{"path": "/status?full=1"}"#).unwrap();
//! let backend = Backend::new("10.0.0.1:80");
//! assert_eq!(
//!     h.probe(&backend),
//!     Probe::http_get("/status?full=1").header("accept", "application/json")
//! );
//! let ok = ProbeResult::http(200).with_body(r#"{"load": 0.5}"#);
//! assert_eq!(h.evaluate(&backend, &ok), Verdict::Healthy);
//! let busy = ProbeResult::http(200).with_body(r#"{"load": 0.9}"#);
//! assert_eq!(h.evaluate(&backend, &busy), Verdict::Degraded(50));
//! assert_eq!(h.evaluate(&backend, &ProbeResult::http(503)), Verdict::Unhealthy);
//! assert_eq!(h.evaluate(&backend, &ProbeResult::timed_out()), Verdict::Unhealthy);
//!
//! assert!(HealthHarness::<StatusDoc>::new(r#"{"path": "status"}"#)
//!     .unwrap_err()
//!     .contains("start with '/'"));
//! ```
//!
//! Build and load it like a strategy, as the `health` plugin of a pool: `health = { plugin =
//! "path/NAME.wasm", interval = "2s", config = { path = "/status" } }`, or hot-load it with
//! `sluice plugin load --kind health --pool NAME FILE` (admin API: `PUT
//! /api/pools/NAME/health`).
//!
//! # Plugin kinds
//!
//! The ABI has two plugin kinds ([`PluginKind`]): strategies ([`Strategy`],
//! [`export_strategy!`]) and health checks ([`HealthCheck`], [`export_health_check!`]). The
//! host refuses to load a plugin as the wrong kind.
//!
//! The wire contract is `ABI.md` in this crate's source; `sluice.wit` describes it in WIT for
//! authors using other languages.

#![warn(missing_docs)]

mod config;
mod hash;
mod health;
mod health_runtime;
mod host;
pub mod log;
mod request;
mod runtime;
pub mod select;
mod table;
// Native only: on wasm32 the real host serves the host calls. Also compiled for rustdoc so the
// module is documented whatever the doc target.
#[cfg(any(doc, not(target_arch = "wasm32")))]
pub mod testing;

pub use config::{Config, ConfigError};
pub use hash::hash_bytes;
pub use health::{HealthCheck, Outcome, Probe, ProbeResult, Verdict, WireError};
pub use host::{counter_add, monotonic_ns, now_ms, random_u64, HostError, COUNTER_SLOTS};
pub use request::{attr_kind, Attr, Request};
pub use table::{Backend, Backends, TableError};

/// Re-exported so plugins can derive `Deserialize` for their config without their own serde
/// dependency: `#[serde(crate = "sluice_sdk::serde")]`.
pub use serde;
/// Re-exported for [`Config::get`] and [`Config::as_map`] values.
pub use serde_json;

/// The ABI version this SDK implements; what `sluice_abi_version` returns.
pub const ABI_VERSION: i32 = 1;

/// The plugin kinds of the ABI; what `sluice_plugin_kind` returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum PluginKind {
    /// A load-balancing strategy: [`Strategy`], exported with [`export_strategy!`].
    Strategy = 0,
    /// An active health check: [`HealthCheck`], exported with [`export_health_check!`].
    HealthCheck = 1,
}

/// A load-balancing strategy. Implement it and export it with [`export_strategy!`].
///
/// See the [crate documentation](crate) for the lifecycle and a complete example.
pub trait Strategy: Sized + 'static {
    /// Creates the strategy from the pool's configuration (`{}` when none is set). Runs once per
    /// instance. An `Err` refuses the plugin with that message; `?` works on [`ConfigError`].
    fn init(config: &Config) -> Result<Self, String>;

    /// Receives the new backend table; runs after `init` and on every change, always before the
    /// next `pick`. The default does nothing, for strategies that only read `backends` in `pick`.
    fn on_backends(&mut self, backends: &Backends) {
        let _ = backends;
    }

    /// Chooses a backend for `req`: an index into `backends`, or `None` to answer `503`.
    ///
    /// Must not return an index for which [`Request::is_excluded`] is true (only possible when
    /// [`Request::attempt`] is above 0), nor one outside the table.
    fn pick(&mut self, req: &mut Request, backends: &Backends) -> Option<usize>;
}

/// Exports a [`Strategy`] type as the plugin's entry points.
///
/// Use it once, in the plugin crate's root: `sluice_sdk::export_strategy!(MyStrategy);`.
///
/// On `wasm32` it emits the `#[no_mangle]` functions `ABI.md` requires (`sluice_abi_version`,
/// `sluice_plugin_kind`, `sluice_alloc`, `sluice_init`, `sluice_set_backends`, `sluice_pick`)
/// and the instance state behind them. On other targets it emits nothing but a check that the
/// type implements [`Strategy`], so several plugin crates can be linked into one native test
/// binary without clashing symbols.
#[macro_export]
macro_rules! export_strategy {
    ($strategy:ty) => {
        const _: () = {
            fn assert_strategy<S: $crate::Strategy>() {}
            let _ = assert_strategy::<$strategy>;
        };

        #[cfg(target_arch = "wasm32")]
        const _: () = {
            ::std::thread_local! {
                static SLUICE_RUNTIME: ::core::cell::RefCell<$crate::__private::Runtime<$strategy>> =
                    const { ::core::cell::RefCell::new($crate::__private::Runtime::new()) };
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn sluice_abi_version() -> i32 {
                $crate::ABI_VERSION
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn sluice_plugin_kind() -> i32 {
                $crate::PluginKind::Strategy as i32
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn sluice_alloc(len: i32) -> i32 {
                $crate::__private::export_alloc(&SLUICE_RUNTIME, len)
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn sluice_init(ptr: i32, len: i32) -> i32 {
                $crate::__private::export_init(&SLUICE_RUNTIME, ptr, len)
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn sluice_set_backends(ptr: i32, len: i32) -> i32 {
                $crate::__private::export_set_backends(&SLUICE_RUNTIME, ptr, len)
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn sluice_pick(attempt: i32) -> i32 {
                $crate::__private::export_pick(&SLUICE_RUNTIME, attempt)
            }
        };
    };
}

/// Exports a [`HealthCheck`] type as the plugin's entry points.
///
/// Use it once, in the plugin crate's root: `sluice_sdk::export_health_check!(MyCheck);`.
///
/// On `wasm32` it emits the `#[no_mangle]` functions `ABI.md` requires of a health check
/// (`sluice_abi_version`, `sluice_plugin_kind` returning `1`, `sluice_alloc`, `sluice_init`,
/// `sluice_health_probe`, `sluice_health_evaluate`) and the instance state behind them. On
/// other targets it emits nothing but a check that the type implements [`HealthCheck`], so
/// several plugin crates can be linked into one native test binary.
///
/// The encoded probe that `sluice_health_probe` returns lives in the instance state until the
/// next probe. A probe that cannot be encoded (see [`Probe::encode`]) is logged and returned
/// empty, which the host counts as a plugin fault.
#[macro_export]
macro_rules! export_health_check {
    ($check:ty) => {
        const _: () = {
            fn assert_health_check<H: $crate::HealthCheck>() {}
            let _ = assert_health_check::<$check>;
        };

        #[cfg(target_arch = "wasm32")]
        const _: () = {
            ::std::thread_local! {
                static SLUICE_HEALTH_RUNTIME: ::core::cell::RefCell<
                    $crate::__private::HealthRuntime<$check>,
                > = const { ::core::cell::RefCell::new($crate::__private::HealthRuntime::new()) };
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn sluice_abi_version() -> i32 {
                $crate::ABI_VERSION
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn sluice_plugin_kind() -> i32 {
                $crate::PluginKind::HealthCheck as i32
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn sluice_alloc(len: i32) -> i32 {
                $crate::__private::health_export_alloc(&SLUICE_HEALTH_RUNTIME, len)
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn sluice_init(ptr: i32, len: i32) -> i32 {
                $crate::__private::health_export_init(&SLUICE_HEALTH_RUNTIME, ptr, len)
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn sluice_health_probe(ptr: i32, len: i32) -> i64 {
                $crate::__private::health_export_probe(&SLUICE_HEALTH_RUNTIME, ptr, len)
            }

            #[unsafe(no_mangle)]
            pub extern "C" fn sluice_health_evaluate(ptr: i32, len: i32) -> i32 {
                $crate::__private::health_export_evaluate(&SLUICE_HEALTH_RUNTIME, ptr, len)
            }
        };
    };
}

#[doc(hidden)]
pub mod __private {
    //! Used by the export macros and the test harnesses; not a stable API.
    pub use crate::health_runtime::{
        health_export_alloc, health_export_evaluate, health_export_init, health_export_probe,
        HealthRuntime, HealthSlot,
    };
    pub use crate::runtime::{
        export_alloc, export_init, export_pick, export_set_backends, Runtime, Slot,
    };
}

#[cfg(test)]
mod tests;
