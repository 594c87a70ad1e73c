//! Unit-testing strategies natively, without wasm or a proxy.
//!
//! On non-wasm targets the SDK's host calls are served by [`MockHost`], a test double with
//! thread-local state (each `#[test]` runs on its own thread, so tests do not see each other's
//! state). [`Harness`] drives a strategy through the same lifecycle the host uses (config bytes
//! into `sluice_init`, an encoded table into `sluice_set_backends`, then `sluice_pick`),
//! through the same code the wasm exports run.
//!
//! ```
//! use sluice_sdk::testing::{Harness, MockHost, TestRequest};
//! use sluice_sdk::{Backend, Backends, Config, Request, Strategy};
//!
//! /// Picks the backend with the fewest requests in flight.
//! struct LeastInflight;
//!
//! impl Strategy for LeastInflight {
//!     fn init(_: &Config) -> Result<Self, String> {
//!         Ok(LeastInflight)
//!     }
//!     fn pick(&mut self, req: &mut Request, backends: &Backends) -> Option<usize> {
//!         (0..backends.len())
//!             .filter(|&i| !req.is_excluded(i))
//!             .min_by_key(|&i| backends.inflight(i).unwrap_or(u32::MAX))
//!     }
//! }
//!
//! let mut h = Harness::<LeastInflight>::new("{}").unwrap();
//! h.set_backends(&[Backend::new("a:1"), Backend::new("b:1"), Backend::new("c:1")]);
//! MockHost::set_inflight(0, 3);
//! MockHost::set_inflight(2, 1);
//! assert_eq!(h.pick(&TestRequest::new()), Some(1));
//! // A retry after backend 1 failed:
//! assert_eq!(h.pick(&TestRequest::new().attempt(1).exclude(1)), Some(2));
//! // The host's own retry loop, until every backend was tried:
//! assert_eq!(h.retries(&TestRequest::new()), vec![1, 2, 0]);
//! ```

//!
//! Health checks are tested the same way with [`HealthHarness`]: it encodes every backend,
//! probe and result in the ABI format and decodes it again, as the proxy does.
//!
//! ```
//! use sluice_sdk::testing::HealthHarness;
//! use sluice_sdk::{Backend, Config, HealthCheck, Probe, ProbeResult, Verdict};
//!
//! /// `GET /ready`; only `204 No Content` counts, and a slow answer degrades the backend.
//! struct Ready;
//!
//! impl HealthCheck for Ready {
//!     fn init(_: &Config) -> Result<Self, String> {
//!         Ok(Ready)
//!     }
//!     fn probe(&mut self, _: &Backend) -> Probe {
//!         Probe::http_get("/ready")
//!     }
//!     fn evaluate(&mut self, _: &Backend, r: &ProbeResult) -> Verdict {
//!         match r.status() {
//!             Some(204) if r.latency().as_millis() > 500 => Verdict::Degraded(50),
//!             Some(204) => Verdict::Healthy,
//!             _ => Verdict::Unhealthy,
//!         }
//!     }
//! }
//!
//! let mut h = HealthHarness::<Ready>::new("{}").unwrap();
//! let b = Backend::new("10.0.0.1:80");
//! assert_eq!(h.probe(&b), Probe::http_get("/ready"));
//! assert_eq!(h.evaluate(&b, &ProbeResult::http(204)), Verdict::Healthy);
//! assert_eq!(h.evaluate(&b, &ProbeResult::http(204).with_latency_ms(800)), Verdict::Degraded(50));
//! assert_eq!(h.evaluate(&b, &ProbeResult::http(200)), Verdict::Unhealthy);
//! assert_eq!(h.evaluate(&b, &ProbeResult::connect_failed()), Verdict::Unhealthy);
//! ```

use crate::__private::{HealthRuntime, Runtime};
use crate::log::Level;
use crate::select::SplitMix64;
use crate::{
    hash_bytes, Attr, Backend, Backends, HealthCheck, Probe, ProbeResult, Strategy, Verdict,
    COUNTER_SLOTS,
};
use std::cell::RefCell;

/// A request as the mock host presents it to `pick`.
///
/// By default it looks like `GET /` from `127.0.0.1` with no `Host`, headers, cookies or query
/// parameters, on attempt 0 with nothing excluded. `path` and `uri` are independent: set both
/// if the strategy reads both.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestRequest {
    attempt: u32,
    excluded: Vec<usize>,
    client_ip: Option<String>,
    method: Option<String>,
    host: Option<String>,
    path: Option<String>,
    uri: Option<String>,
    headers: Vec<(String, String)>,
    cookies: Vec<(String, String)>,
    query: Vec<(String, String)>,
}

impl Default for TestRequest {
    fn default() -> Self {
        TestRequest {
            attempt: 0,
            excluded: Vec::new(),
            client_ip: Some("127.0.0.1".into()),
            method: Some("GET".into()),
            host: None,
            path: Some("/".into()),
            uri: Some("/".into()),
            headers: Vec::new(),
            cookies: Vec::new(),
            query: Vec::new(),
        }
    }
}

impl TestRequest {
    /// `GET /` from `127.0.0.1`, first attempt.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the attempt number.
    pub fn attempt(mut self, attempt: u32) -> Self {
        self.attempt = attempt;
        self
    }

    /// Marks backend `index` as already tried.
    pub fn exclude(mut self, index: usize) -> Self {
        self.excluded.push(index);
        self
    }

    /// Sets the client IP.
    pub fn client_ip(mut self, ip: &str) -> Self {
        self.client_ip = Some(ip.into());
        self
    }

    /// Makes `attr` absent: for a named kind, removes every entry with that name (any case for
    /// headers); otherwise clears the default value.
    pub fn without(mut self, attr: Attr<'_>) -> Self {
        let name = attr.name();
        match attr {
            Attr::ClientIp => self.client_ip = None,
            Attr::Method => self.method = None,
            Attr::Host => self.host = None,
            Attr::Path => self.path = None,
            Attr::Uri => self.uri = None,
            Attr::Header(_) => self.headers.retain(|(k, _)| !k.eq_ignore_ascii_case(name)),
            Attr::Cookie(_) => self.cookies.retain(|(k, _)| k != name),
            Attr::Query(_) => self.query.retain(|(k, _)| k != name),
        }
        self
    }

    /// Sets the method.
    pub fn method(mut self, method: &str) -> Self {
        self.method = Some(method.into());
        self
    }

    /// Sets the host.
    pub fn host(mut self, host: &str) -> Self {
        self.host = Some(host.into());
        self
    }

    /// Sets the path (without query).
    pub fn path(mut self, path: &str) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Sets path and query as sent.
    pub fn uri(mut self, uri: &str) -> Self {
        self.uri = Some(uri.into());
        self
    }

    /// Adds a header; lookups are case-insensitive and return the first value.
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    /// Adds a cookie.
    pub fn cookie(mut self, name: &str, value: &str) -> Self {
        self.cookies.push((name.into(), value.into()));
        self
    }

    /// Adds a query parameter (raw).
    pub fn query(mut self, name: &str, value: &str) -> Self {
        self.query.push((name.into(), value.into()));
        self
    }

    /// The attribute's value as the host would see it; `Err(())` for an unknown kind.
    fn value(&self, kind: i32, name: &str) -> Result<Option<&[u8]>, ()> {
        fn find<'a>(list: &'a [(String, String)], name: &str, any_case: bool) -> Option<&'a [u8]> {
            list.iter()
                .find(|(k, _)| {
                    if any_case {
                        k.eq_ignore_ascii_case(name)
                    } else {
                        k == name
                    }
                })
                .map(|(_, v)| v.as_bytes())
        }
        fn opt(s: &Option<String>) -> Option<&[u8]> {
            s.as_deref().map(str::as_bytes)
        }
        Ok(match kind {
            0 => opt(&self.client_ip),
            1 => opt(&self.method),
            2 => opt(&self.host),
            3 => opt(&self.path),
            4 => find(&self.headers, name, true),
            5 => find(&self.cookies, name, false),
            6 => find(&self.query, name, false),
            7 => opt(&self.uri),
            _ => return Err(()),
        })
    }
}

/// A message a plugin logged.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LogRecord {
    /// Its level.
    pub level: Level,
    /// Its text.
    pub message: String,
}

struct State {
    counters: [i64; COUNTER_SLOTS as usize],
    rng: SplitMix64,
    now_ms: i64,
    monotonic_ns: i64,
    table_len: usize,
    inflight: Vec<u32>,
    latency_us: Vec<u64>,
    failures: Vec<u32>,
    request: Option<TestRequest>,
    logs: Vec<LogRecord>,
    last_error: Option<String>,
}

/// Fixed start values so tests are reproducible: the seed is arbitrary, the clock is
/// 2023-11-14T22:13:20Z.
const DEFAULT_SEED: u64 = 0x5eed;
const DEFAULT_NOW_MS: i64 = 1_700_000_000_000;

impl State {
    const fn new() -> Self {
        State {
            counters: [0; COUNTER_SLOTS as usize],
            rng: SplitMix64::new(DEFAULT_SEED),
            now_ms: DEFAULT_NOW_MS,
            monotonic_ns: 0,
            table_len: 0,
            inflight: Vec::new(),
            latency_us: Vec::new(),
            failures: Vec::new(),
            request: None,
            logs: Vec::new(),
            last_error: None,
        }
    }
}

thread_local! {
    static STATE: RefCell<State> = const { RefCell::new(State::new()) };
}

fn with<R>(f: impl FnOnce(&mut State) -> R) -> R {
    STATE.with_borrow_mut(f)
}

/// The test double for the host, holding this thread's mock state.
///
/// All state is per thread and is reset by [`Harness::new`], so set per-backend statistics
/// after creating the harness (and, since they are kept by index, after `set_backends`).
/// Clocks stand still unless moved with [`MockHost::advance_ms`] or the setters; the random
/// generator is deterministic.
#[derive(Debug)]
pub struct MockHost(());

impl MockHost {
    /// Resets all mock state of this thread to its defaults.
    pub fn reset() {
        with(|s| *s = State::new());
    }

    /// Sets requests in flight to backend `index` (of the current table).
    pub fn set_inflight(index: usize, n: u32) {
        with(|s| set_stat(&mut s.inflight, index, n));
    }

    /// Sets the latency average of backend `index`.
    pub fn set_latency_us(index: usize, us: u64) {
        with(|s| set_stat(&mut s.latency_us, index, us));
    }

    /// Sets the consecutive failures of backend `index`.
    pub fn set_failures(index: usize, n: u32) {
        with(|s| set_stat(&mut s.failures, index, n));
    }

    /// The value of shared counter `slot`. Panics if `slot` is out of range.
    pub fn counter(slot: u32) -> i64 {
        with(|s| s.counters[slot as usize])
    }

    /// Sets shared counter `slot`, e.g. to test wrap-around. Panics if `slot` is out of range.
    pub fn set_counter(slot: u32, value: i64) {
        with(|s| s.counters[slot as usize] = value);
    }

    /// Re-seeds the random generator behind `random_u64`.
    pub fn seed_random(seed: u64) {
        with(|s| s.rng = SplitMix64::new(seed));
    }

    /// Sets the wall clock.
    pub fn set_now_ms(ms: i64) {
        with(|s| s.now_ms = ms);
    }

    /// Sets the monotonic clock.
    pub fn set_monotonic_ns(ns: i64) {
        with(|s| s.monotonic_ns = ns);
    }

    /// Moves both clocks forward.
    pub fn advance_ms(ms: i64) {
        with(|s| {
            s.now_ms += ms;
            s.monotonic_ns += ms * 1_000_000;
        });
    }

    /// Installs `req` as the current request, as the host does for the duration of a pick.
    /// [`Harness::pick`] does this for you; it is public for testing helpers that take a
    /// [`Request`](crate::Request) outside a harness.
    pub fn begin_request(req: &TestRequest) {
        with(|s| s.request = Some(req.clone()));
    }

    /// Removes the current request: attributes are absent again, as outside `sluice_pick`.
    pub fn end_request() {
        with(|s| s.request = None);
    }

    /// Takes the messages logged so far.
    pub fn take_logs() -> Vec<LogRecord> {
        with(|s| std::mem::take(&mut s.logs))
    }

    /// The last message passed to `set_error`.
    pub fn last_error() -> Option<String> {
        with(|s| s.last_error.clone())
    }
}

fn set_stat<T: Default + Clone>(v: &mut Vec<T>, index: usize, value: T) {
    if v.len() <= index {
        v.resize(index + 1, T::default());
    }
    v[index] = value;
}

/// Reads a per-backend statistic the way the host answers: `-1` out of range, else the value
/// (0 if never set).
fn stat<T: Copy + Default>(s: &State, v: &[T], index: i32) -> Option<T> {
    let i = usize::try_from(index).ok().filter(|&i| i < s.table_len)?;
    Some(v.get(i).copied().unwrap_or_default())
}

/// The host functions, served from [`State`] with the ABI's return conventions, so the SDK's
/// handling of them (grow-and-retry, -1/-2 codes) is exercised by native tests too.
pub(crate) mod mock {
    use super::*;

    pub fn log(level: i32, msg: &str) {
        let level = Level::from_i32(level).unwrap_or(Level::Error);
        // Printed as well as recorded: libtest shows it for failing tests only.
        eprintln!("[plugin {level:?}] {msg}");
        with(|s| {
            s.logs.push(LogRecord {
                level,
                message: msg.to_owned(),
            })
        });
    }

    pub fn set_error(msg: &str) {
        with(|s| s.last_error = Some(msg.to_owned()));
    }

    pub fn now_ms() -> i64 {
        with(|s| s.now_ms)
    }

    pub fn monotonic_ns() -> i64 {
        with(|s| s.monotonic_ns)
    }

    pub fn random_u64() -> i64 {
        // SplitMix64: tiny, and good enough for spreading picks in tests.
        with(|s| s.rng.next_u64() as i64)
    }

    pub fn counter_add(slot: i32, delta: i64) -> i64 {
        with(|s| {
            // The real host traps here; the SDK validates first, so reaching this is an SDK bug.
            let c = &mut s.counters[usize::try_from(slot).expect("negative counter slot")];
            let prev = *c;
            *c = prev.wrapping_add(delta);
            prev
        })
    }

    pub fn request_attr(kind: i32, name: &str, buf: &mut [u8]) -> i32 {
        with(|s| {
            let Some(req) = &s.request else { return -2 };
            match req.value(kind, name) {
                Err(()) => -2,
                Ok(None) => -1,
                Ok(Some(v)) => {
                    let n = v.len().min(buf.len());
                    buf[..n].copy_from_slice(&v[..n]);
                    i32::try_from(v.len()).expect("attribute longer than i32::MAX")
                }
            }
        })
    }

    pub fn request_hash(kind: i32, name: &str) -> (i32, u64) {
        with(|s| {
            let Some(req) = &s.request else {
                return (-2, 0);
            };
            match req.value(kind, name) {
                Err(()) => (-2, 0),
                Ok(None) => (0, 0),
                Ok(Some(v)) => (1, hash_bytes(v)),
            }
        })
    }

    pub fn excluded(index: i32) -> i32 {
        with(|s| {
            let tried = s
                .request
                .as_ref()
                .is_some_and(|r| usize::try_from(index).is_ok_and(|i| r.excluded.contains(&i)));
            i32::from(tried)
        })
    }

    pub fn backend_inflight(index: i32) -> i32 {
        with(|s| stat(s, &s.inflight, index).map_or(-1, |v| v.min(i32::MAX as u32) as i32))
    }

    pub fn backend_latency_us(index: i32) -> i64 {
        with(|s| stat(s, &s.latency_us, index).map_or(-1, |v| v.min(i64::MAX as u64) as i64))
    }

    pub fn backend_failures(index: i32) -> i32 {
        with(|s| stat(s, &s.failures, index).map_or(-1, |v| v.min(i32::MAX as u32) as i32))
    }
}

/// Copies `bytes` into the buffer `sluice_alloc` handed out (`None`: allocation failed) and
/// returns its pointer, as the host does before every call that passes data in.
fn fill(buf: Option<&mut [u8]>, bytes: &[u8]) -> Result<usize, &'static str> {
    let buf = buf.ok_or("sluice_alloc failed")?;
    buf.copy_from_slice(bytes);
    Ok(buf.as_ptr() as usize)
}

/// The outcome of `sluice_init` as the host sees it: a refusal is also recorded with
/// `set_error`, where the host reads the message from.
fn init_outcome<T>(result: Result<(), String>, instance: T) -> Result<T, String> {
    result
        .map(|()| instance)
        .inspect_err(|msg| mock::set_error(msg))
}

/// Runs a strategy's whole lifecycle natively, against [`MockHost`].
///
/// Every step goes through the same path as in wasm: the config is passed as JSON bytes, the
/// table is encoded in the ABI format and decoded again, and picks come back as ABI return
/// values. [`Harness::pick`] also checks the ABI's rules on the result, so a strategy that
/// returns an out-of-range or already-tried index fails the test instead of causing a plugin
/// fault in production.
pub struct Harness<S: Strategy> {
    rt: Runtime<S>,
}

// Without an `S: Debug` bound, so `Harness::new(..).unwrap_err()` works for any strategy.
impl<S: Strategy> std::fmt::Debug for Harness<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Harness")
            .field("strategy", &std::any::type_name::<S>())
            .field("backends", self.rt.backends())
            .finish()
    }
}

impl<S: Strategy> Harness<S> {
    /// Resets [`MockHost`] and initialises the strategy with `config_json`; `Err` is the
    /// message the host would show the operator.
    pub fn new(config_json: &str) -> Result<Self, String> {
        MockHost::reset();
        let mut rt = Runtime::new();
        let bytes = config_json.as_bytes();
        let ptr = fill(rt.alloc(bytes.len()), bytes)?;
        let result = rt.init(ptr, bytes.len());
        init_outcome(result, Harness { rt })
    }

    /// [`Harness::new`] followed by [`Harness::set_backends`]: the usual start of a test.
    ///
    /// ```
    /// # use sluice_sdk::testing::{weighted_backends, Harness, TestRequest};
    /// # use sluice_sdk::{Backends, Config, Request, Strategy};
    /// # struct First;
    /// # impl Strategy for First {
    /// #     fn init(_: &Config) -> Result<Self, String> { Ok(First) }
    /// #     fn pick(&mut self, _: &mut Request, b: &Backends) -> Option<usize> {
    /// #         (!b.is_empty()).then_some(0)
    /// #     }
    /// # }
    /// let mut h = Harness::<First>::with_backends("{}", &weighted_backends(&[5, 1])).unwrap();
    /// assert_eq!(h.backends()[0].weight(), 5);
    /// assert_eq!(h.pick(&TestRequest::new()), Some(0));
    /// ```
    pub fn with_backends(config_json: &str, backends: &[Backend]) -> Result<Self, String> {
        let mut h = Self::new(config_json)?;
        h.set_backends(backends);
        Ok(h)
    }

    /// Pushes a new backend table, as the host does on every change. Per-backend statistics in
    /// [`MockHost`] are kept by index. Panics if the table cannot be encoded or the push fails.
    pub fn set_backends(&mut self, backends: &[Backend]) {
        let bytes = Backends::from(backends.to_vec())
            .encode()
            .expect("encode backend table");
        let ptr = fill(self.rt.alloc(bytes.len()), &bytes).unwrap();
        with(|s| s.table_len = backends.len());
        if let Err(msg) = self.rt.set_backends(ptr, bytes.len()) {
            panic!("sluice_set_backends failed: {msg}");
        }
    }

    /// Runs one pick for `req`. Panics if the strategy breaks the ABI's rules: an index outside
    /// the table, or one `req` marks as excluded.
    pub fn pick(&mut self, req: &TestRequest) -> Option<usize> {
        MockHost::begin_request(req);
        let raw = self.rt.pick(i32::try_from(req.attempt).unwrap_or(i32::MAX));
        MockHost::end_request();
        let n = self.rt.backends().len();
        match usize::try_from(raw) {
            Err(_) if raw == -1 => None,
            Ok(i) if i < n => {
                assert!(
                    !req.excluded.contains(&i),
                    "strategy picked backend {i}, already tried by this request (attempt {})",
                    req.attempt
                );
                Some(i)
            }
            _ => panic!("strategy returned {raw} for a table of {n} backends: a plugin fault"),
        }
    }

    /// Simulates the host retrying `req` until the strategy gives up or every backend was tried:
    /// each pick is excluded from the next attempt. Returns the picks in order.
    pub fn retries(&mut self, req: &TestRequest) -> Vec<usize> {
        let mut req = req.clone();
        let mut picks = Vec::new();
        while picks.len() < self.rt.backends().len() {
            let Some(i) = self.pick(&req) else { break };
            picks.push(i);
            let next = req.attempt + 1;
            req = req.attempt(next).exclude(i);
        }
        picks
    }

    /// The strategy, to inspect its state.
    pub fn strategy(&self) -> &S {
        self.rt.strategy().expect("initialised in new")
    }

    /// The strategy, to adjust its state.
    pub fn strategy_mut(&mut self) -> &mut S {
        self.rt.strategy_mut().expect("initialised in new")
    }

    /// The table the strategy last received.
    pub fn backends(&self) -> &Backends {
        self.rt.backends()
    }
}

/// A shorthand for tests: `n` backends `10.0.0.1:80`, `10.0.0.2:80`, ... with weight 1.
pub fn backends(n: usize) -> Vec<Backend> {
    (1..=n)
        .map(|i| Backend::new(format!("10.0.{}.{}:80", i / 256, i % 256)))
        .collect()
}

/// [`backends`] with the given weights, in order: `weighted_backends(&[5, 1])` is
/// `10.0.0.1:80` with weight 5 and `10.0.0.2:80` with weight 1.
pub fn weighted_backends(weights: &[u32]) -> Vec<Backend> {
    backends(weights.len())
        .into_iter()
        .zip(weights)
        .map(|(b, &w)| b.with_weight(w))
        .collect()
}

/// The `i`-th of 2^24 distinct client IPs, `10.x.y.z` with `x.y.z` the low 24 bits of `i`: a
/// test's stand-in for many clients, e.g. to check that hashed keys spread.
pub fn nth_client_ip(i: u32) -> String {
    format!("10.{}.{}.{}", i >> 16 & 255, i >> 8 & 255, i & 255)
}

/// Runs a health check's lifecycle natively, against [`MockHost`].
///
/// Every step goes through the same path as in wasm: the config is passed as JSON bytes, the
/// backend is encoded as a table entry and decoded again, the probe the check returns is
/// encoded (and so validated against the host's rules) and decoded again, and so is the
/// result; the verdict comes back as the ABI's `i32`. A probe the host would refuse, or a
/// verdict it would treat as a fault, fails the test with the reason.
///
/// Like the host, every evaluation follows a probe of the same backend: [`evaluate`] first
/// runs [`probe`] for the backend unless the previous call was exactly that probe.
///
/// [`evaluate`]: HealthHarness::evaluate
/// [`probe`]: HealthHarness::probe
pub struct HealthHarness<H: HealthCheck> {
    rt: HealthRuntime<H>,
    /// Set by `probe`, consumed by `evaluate`: the backend whose probe awaits its result.
    pending: Option<Backend>,
}

// Without an `H: Debug` bound, so `HealthHarness::new(..).unwrap_err()` works for any check.
impl<H: HealthCheck> std::fmt::Debug for HealthHarness<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HealthHarness")
            .field("check", &std::any::type_name::<H>())
            .field("last_backend", &self.rt.last_backend())
            .finish()
    }
}

impl<H: HealthCheck> HealthHarness<H> {
    /// Resets [`MockHost`] and initialises the check with `config_json`; `Err` is the message
    /// the host would show the operator.
    pub fn new(config_json: &str) -> Result<Self, String> {
        MockHost::reset();
        let mut rt = HealthRuntime::new();
        let bytes = config_json.as_bytes();
        let ptr = fill(rt.alloc(bytes.len()), bytes)?;
        let result = rt.init(ptr, bytes.len());
        init_outcome(result, HealthHarness { rt, pending: None })
    }

    /// Asks the check for the probe to run against `backend`, as the host does at the start
    /// of every check.
    ///
    /// # Panics
    ///
    /// If the probe cannot be encoded or would be refused by the host (the message says why):
    /// in production that is a plugin fault.
    pub fn probe(&mut self, backend: &Backend) -> Probe {
        let bytes = backend.encode().expect("encode backend entry");
        let ptr = fill(self.rt.alloc(bytes.len()), &bytes).unwrap();
        let probe = match self.rt.probe(ptr, bytes.len()) {
            Ok(encoded) => Probe::decode(encoded),
            Err(msg) => panic!("sluice_health_probe failed (a plugin fault): {msg}"),
        };
        self.pending = Some(backend.clone());
        probe.unwrap_or_else(|e| panic!("the host would refuse the probe: {e}"))
    }

    /// Judges `result` for `backend`, as the host does after running the probe. Probes
    /// `backend` first unless the previous call was `probe(backend)`.
    ///
    /// # Panics
    ///
    /// If the probe or the evaluation fails, or the check returns a value the host treats as
    /// a fault.
    pub fn evaluate(&mut self, backend: &Backend, result: &ProbeResult) -> Verdict {
        if self.pending.as_ref() != Some(backend) {
            self.probe(backend);
        }
        self.pending = None;
        let bytes = result.encode().expect("encode probe result");
        let ptr = fill(self.rt.alloc(bytes.len()), &bytes).unwrap();
        match self.rt.evaluate(ptr, bytes.len()) {
            Ok(raw) => Verdict::from_abi(raw).unwrap_or_else(|| {
                panic!("health check returned {raw}: a plugin fault (valid: -1, 1..=99, 100)")
            }),
            Err(msg) => panic!("sluice_health_evaluate failed (a plugin fault): {msg}"),
        }
    }

    /// One whole check: [`probe`](Self::probe), then [`evaluate`](Self::evaluate) with the
    /// result `respond` gives for that probe (a fake backend).
    pub fn check(
        &mut self,
        backend: &Backend,
        respond: impl FnOnce(&Probe) -> ProbeResult,
    ) -> Verdict {
        let probe = self.probe(backend);
        let result = respond(&probe);
        self.evaluate(backend, &result)
    }

    /// The check, to inspect its state.
    pub fn health_check(&self) -> &H {
        self.rt.check().expect("initialised in new")
    }

    /// The check, to adjust its state.
    pub fn health_check_mut(&mut self) -> &mut H {
        self.rt.check_mut().expect("initialised in new")
    }
}
