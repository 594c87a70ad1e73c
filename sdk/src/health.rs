//! Health checks: the [`HealthCheck`] trait and the values that cross the boundary with it.
//!
//! The host does all the I/O and the scheduling; a health-check plugin only decides *what* to
//! send to a backend ([`Probe`]) and *how to judge* what came back ([`ProbeResult`] →
//! [`Verdict`]). Both values have an exact binary encoding, defined in `ABI.md`
//! ("Health-check exports"); [`Probe::encode`] / [`Probe::decode`] and [`ProbeResult::encode`] /
//! [`ProbeResult::decode`] implement it for both sides.

use crate::{Backend, Config};
use std::borrow::Cow;
use std::fmt;
use std::time::Duration;

/// An active health check. Implement it and export it with
/// [`export_health_check!`](crate::export_health_check).
///
/// For every check of every backend the host calls [`probe`](HealthCheck::probe), runs the
/// probe itself under the pool's timeout, then calls [`evaluate`](HealthCheck::evaluate) with
/// what it observed. Interval, jitter, timeout and the rise/fall thresholds are the host's; a
/// plugin sees one check at a time and returns one verdict.
///
/// A plugin fault (a panic, a deadline hit, a probe that cannot be encoded) never marks a
/// backend down: the host counts the check as an error and keeps the backend's last state.
///
/// See the [crate documentation](crate#health-checks) for a complete example.
pub trait HealthCheck: Sized + 'static {
    /// Creates the check from the pool's `health.config` (`{}` when none is set). Runs once per
    /// instance. An `Err` refuses the plugin with that message; `?` works on
    /// [`ConfigError`](crate::ConfigError).
    fn init(config: &Config) -> Result<Self, String>;

    /// The probe to run against `backend`. The default is [`Probe::TcpConnect`]: the backend
    /// is healthy if it accepts a connection.
    fn probe(&mut self, backend: &Backend) -> Probe {
        let _ = backend;
        Probe::TcpConnect
    }

    /// Judges `result`, the outcome of the probe last returned for `backend`.
    ///
    /// The default is [`Verdict::Healthy`] when [`ProbeResult::is_success`] (the exchange
    /// completed and, for HTTP, the status is 200–399), [`Verdict::Unhealthy`] otherwise.
    fn evaluate(&mut self, backend: &Backend, result: &ProbeResult) -> Verdict {
        let _ = backend;
        Verdict::from(result.is_success())
    }
}

// ---------------------------------------------------------------------------------------------
// Probe

/// Probe kind byte of [`Probe::TcpConnect`].
const KIND_TCP_CONNECT: u8 = 0;
/// Probe kind byte of [`Probe::Http`].
const KIND_HTTP: u8 = 1;
/// Probe kind byte of [`Probe::Tcp`].
const KIND_TCP: u8 = 2;

/// What the host should do to check a backend.
///
/// Build one with the constructors and chain the HTTP helpers:
///
/// ```
/// use sluice_sdk::Probe;
///
/// let probe = Probe::http_get("/healthz?deep=1")
///     .header("host", "api.internal")
///     .header("x-probe", "sluice");
/// let Probe::Http { method, path, headers, .. } = &probe else { unreachable!() };
/// assert_eq!((method.as_str(), path.as_str(), headers.len()), ("GET", "/healthz?deep=1", 2));
///
/// assert_eq!(Probe::tcp("PING\r\n", 7), Probe::Tcp { send: b"PING\r\n".to_vec(), read: 7 });
/// ```
///
/// The host validates a probe before running it; [`Probe::encode`] applies the same rules, so
/// a probe that would be refused fails in a native test ([`HealthHarness`] encodes every
/// probe) rather than as a plugin fault in production.
///
/// [`HealthHarness`]: crate::testing::HealthHarness
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Probe {
    /// Connect to the backend and close again: healthy means "the connection was accepted".
    TcpConnect,
    /// One HTTP/1.1 request. The host adds `host` (the backend address, unless `headers` has
    /// one), `user-agent`, `connection: close` and `content-length`, and reads the status, the
    /// headers and the first 4 KiB of the body.
    Http {
        /// The method, ASCII upper-case (`"GET"`).
        method: String,
        /// The request target: starts with `/`, may carry a query, no spaces or controls.
        path: String,
        /// Extra request headers, in order. A `host` header (any case) replaces the default.
        headers: Vec<(String, String)>,
        /// The request body (usually empty).
        body: Vec<u8>,
    },
    /// A raw TCP exchange: connect, send `send`, then read up to `read` bytes.
    Tcp {
        /// Bytes to send after connecting; may be empty (e.g. to read a banner).
        send: Vec<u8>,
        /// How many bytes to read back; `0` reads nothing. The host stops early at EOF; a
        /// backend that sends fewer bytes and keeps the connection open runs into the timeout.
        read: u32,
    },
}

impl Probe {
    /// A TCP connect probe, [`Probe::TcpConnect`].
    pub fn tcp_connect() -> Self {
        Probe::TcpConnect
    }

    /// An HTTP request with `method` and `path`, no extra headers and no body.
    pub fn http(method: impl Into<String>, path: impl Into<String>) -> Self {
        Probe::Http {
            method: method.into(),
            path: path.into(),
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// `GET path`.
    pub fn http_get(path: impl Into<String>) -> Self {
        Self::http("GET", path)
    }

    /// A raw TCP exchange: send `send`, then read up to `read` bytes.
    pub fn tcp(send: impl Into<Vec<u8>>, read: u32) -> Self {
        Probe::Tcp {
            send: send.into(),
            read,
        }
    }

    /// Adds a request header to an HTTP probe.
    ///
    /// # Panics
    ///
    /// If the probe is not [`Probe::Http`]: only HTTP requests have headers.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        match &mut self {
            Probe::Http { headers, .. } => headers.push((name.into(), value.into())),
            _ => panic!("Probe::header is only for HTTP probes"),
        }
        self
    }

    /// Sets the body of an HTTP probe.
    ///
    /// # Panics
    ///
    /// If the probe is not [`Probe::Http`]; the bytes a TCP probe sends are given to
    /// [`Probe::tcp`].
    pub fn body(mut self, bytes: impl Into<Vec<u8>>) -> Self {
        match &mut self {
            Probe::Http { body, .. } => *body = bytes.into(),
            _ => panic!("Probe::body is only for HTTP probes"),
        }
        self
    }

    /// Checks the probe against the rules the host applies, without encoding it. Useful in
    /// [`HealthCheck::init`] to refuse a bad configuration at load time.
    pub fn validate(&self) -> Result<(), WireError> {
        self.encode().map(drop)
    }

    /// Encodes the probe in the ABI format, what `sluice_health_probe` returns.
    ///
    /// Fails if the host would refuse the probe: a method that is not ASCII upper-case letters,
    /// a path that does not start with `/` or contains spaces or control characters, a header
    /// name that is empty or not an HTTP token, a header value with CR, LF or NUL, or a field
    /// longer than its length prefix allows.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::new();
        match self {
            Probe::TcpConnect => out.push(KIND_TCP_CONNECT),
            Probe::Http {
                method,
                path,
                headers,
                body,
            } => {
                check_method(method).map_err(WireError::probe)?;
                check_path(path).map_err(WireError::probe)?;
                out.push(KIND_HTTP);
                put_u16_bytes(
                    &mut out,
                    method.as_bytes(),
                    "method longer than 65535 bytes",
                )?;
                put_u16_bytes(&mut out, path.as_bytes(), "path longer than 65535 bytes")?;
                let n = u16::try_from(headers.len())
                    .map_err(|_| WireError::probe("more than 65535 headers"))?;
                out.extend_from_slice(&n.to_le_bytes());
                for (name, value) in headers {
                    check_header(name, value).map_err(WireError::probe)?;
                    put_u16_bytes(
                        &mut out,
                        name.as_bytes(),
                        "header name longer than 65535 bytes",
                    )?;
                    put_u16_bytes(
                        &mut out,
                        value.as_bytes(),
                        "header value longer than 65535 bytes",
                    )?;
                }
                put_u32_bytes(&mut out, body, "body longer than 4 GiB")?;
            }
            Probe::Tcp { send, read } => {
                out.push(KIND_TCP);
                put_u32_bytes(&mut out, send, "bytes to send longer than 4 GiB")?;
                out.extend_from_slice(&read.to_le_bytes());
            }
        }
        Ok(out)
    }

    /// Decodes a probe in the ABI format (what the host receives). Strict: truncation, trailing
    /// bytes, an unknown kind, invalid UTF-8 and anything [`Probe::encode`] refuses are errors.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes, "probe");
        let probe = match r.u8()? {
            KIND_TCP_CONNECT => Probe::TcpConnect,
            KIND_HTTP => {
                let method = r.string16()?;
                let path = r.string16()?;
                let n = r.u16()?;
                let mut headers = Vec::with_capacity(usize::from(n).min(r.remaining() / 4));
                for _ in 0..n {
                    headers.push((r.string16()?, r.string16()?));
                }
                let body = r.bytes32()?.to_vec();
                let probe = Probe::Http {
                    method,
                    path,
                    headers,
                    body,
                };
                // The field rules, checked once on the decoded value.
                probe.validate()?;
                probe
            }
            KIND_TCP => {
                let send = r.bytes32()?.to_vec();
                let read = r.u32()?;
                Probe::Tcp { send, read }
            }
            _ => return Err(r.error_before(1, "unknown probe kind")),
        };
        r.finish()?;
        Ok(probe)
    }
}

fn check_method(method: &str) -> Result<(), &'static str> {
    if method.is_empty() || !method.bytes().all(|c| c.is_ascii_uppercase()) {
        return Err("method must be ASCII upper-case letters, e.g. \"GET\"");
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), &'static str> {
    if !path.starts_with('/') {
        return Err("path must start with '/'");
    }
    if path
        .bytes()
        .any(|c| c.is_ascii_whitespace() || c.is_ascii_control())
    {
        return Err("path must not contain spaces or control characters");
    }
    Ok(())
}

/// RFC 9110 `tchar`: the characters of a header name.
fn is_token_char(c: u8) -> bool {
    c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c)
}

fn check_header(name: &str, value: &str) -> Result<(), &'static str> {
    if name.is_empty() || !name.bytes().all(is_token_char) {
        return Err("header name must be a non-empty HTTP token");
    }
    if value.bytes().any(|c| matches!(c, b'\r' | b'\n' | 0)) {
        return Err("header value must not contain CR, LF or NUL");
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// ProbeResult

/// How a probe ended; the discriminants are the ABI's `outcome` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Outcome {
    /// The exchange completed: connected and, for HTTP, a response was read. Says nothing about
    /// the status; look at [`ProbeResult::status`].
    Completed = 0,
    /// The connection was refused or the backend was unreachable.
    ConnectFailed = 1,
    /// The pool's health timeout elapsed before the exchange completed.
    TimedOut = 2,
    /// Another I/O error, or a response that was not valid HTTP.
    IoError = 3,
}

impl Outcome {
    /// Maps an ABI `outcome` byte to an `Outcome`, `None` if unknown.
    pub const fn from_u8(v: u8) -> Option<Outcome> {
        match v {
            0 => Some(Outcome::Completed),
            1 => Some(Outcome::ConnectFailed),
            2 => Some(Outcome::TimedOut),
            3 => Some(Outcome::IoError),
            _ => None,
        }
    }
}

/// What the host observed when it ran a [`Probe`]: what
/// [`HealthCheck::evaluate`] judges.
///
/// In a plugin the host provides it. In tests, build one with the constructors and the
/// `with_*` methods:
///
/// ```
/// use sluice_sdk::{Outcome, ProbeResult};
///
/// let r = ProbeResult::http(503)
///     .with_header("Retry-After", "5")
///     .with_body("draining")
///     .with_latency_ms(12);
/// assert_eq!(r.status(), Some(503));
/// assert_eq!(r.header("retry-after"), Some("5"));
/// assert_eq!(r.body_str(), "draining");
/// assert!(!r.is_success());
///
/// assert_eq!(ProbeResult::timed_out().outcome(), Outcome::TimedOut);
/// ```
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ProbeResult {
    outcome: Outcome,
    latency_us: u32,
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl ProbeResult {
    fn with_outcome(outcome: Outcome) -> Self {
        ProbeResult {
            outcome,
            latency_us: 0,
            status: 0,
            headers: Vec::new(),
            body: Vec::new(),
        }
    }

    /// A completed HTTP exchange with `status`, no headers and an empty body.
    pub fn http(status: u16) -> Self {
        ProbeResult {
            status,
            ..Self::with_outcome(Outcome::Completed)
        }
    }

    /// A completed TCP probe: the connection was accepted (and, for a raw TCP probe, nothing was
    /// read; add what was read with [`with_body`](Self::with_body) or use
    /// [`tcp_read`](Self::tcp_read)).
    pub fn connected() -> Self {
        Self::with_outcome(Outcome::Completed)
    }

    /// A completed raw TCP exchange that read `bytes`.
    pub fn tcp_read(bytes: impl Into<Vec<u8>>) -> Self {
        Self::connected().with_body(bytes)
    }

    /// The connection was refused or the backend unreachable.
    pub fn connect_failed() -> Self {
        Self::with_outcome(Outcome::ConnectFailed)
    }

    /// The exchange ran into the timeout.
    pub fn timed_out() -> Self {
        Self::with_outcome(Outcome::TimedOut)
    }

    /// An I/O or protocol error.
    pub fn io_error() -> Self {
        Self::with_outcome(Outcome::IoError)
    }

    /// Sets the outcome.
    pub fn with_outcome_of(mut self, outcome: Outcome) -> Self {
        self.outcome = outcome;
        self
    }

    /// Sets the HTTP status (`0` = none).
    pub fn with_status(mut self, status: u16) -> Self {
        self.status = status;
        self
    }

    /// Adds a response header. The name is lower-cased, as the host delivers names.
    pub fn with_header(mut self, name: &str, value: impl Into<String>) -> Self {
        self.headers.push((name.to_ascii_lowercase(), value.into()));
        self
    }

    /// Sets the body prefix (HTTP) or the bytes read (raw TCP).
    pub fn with_body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets the latency in milliseconds (saturating at `u32::MAX` µs, about 71 minutes).
    pub fn with_latency_ms(self, ms: u32) -> Self {
        self.with_latency(Duration::from_millis(u64::from(ms)))
    }

    /// Sets the latency (microsecond resolution, saturating at `u32::MAX` µs).
    pub fn with_latency(mut self, latency: Duration) -> Self {
        self.latency_us = u32::try_from(latency.as_micros()).unwrap_or(u32::MAX);
        self
    }

    /// How the probe ended.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// `true` if the exchange completed ([`Outcome::Completed`]), whatever the status.
    pub fn is_completed(&self) -> bool {
        self.outcome == Outcome::Completed
    }

    /// `true` if the exchange completed and, when there is an HTTP status, it is 200–399. What
    /// the default [`HealthCheck::evaluate`] calls healthy.
    pub fn is_success(&self) -> bool {
        self.is_completed() && self.status().is_none_or(|s| (200..400).contains(&s))
    }

    /// Time from the start of the connect to the end of the exchange (or the failure).
    pub fn latency(&self) -> Duration {
        Duration::from_micros(u64::from(self.latency_us))
    }

    /// [`latency`](Self::latency) in microseconds, as it crossed the boundary.
    pub fn latency_us(&self) -> u32 {
        self.latency_us
    }

    /// The HTTP status; `None` for TCP probes and for failures.
    pub fn status(&self) -> Option<u16> {
        (self.status != 0).then_some(self.status)
    }

    /// The first value of response header `name`, matched case-insensitively.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    /// All response headers in order, names lower-case.
    pub fn headers(&self) -> impl Iterator<Item = (&str, &str)> {
        self.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// The body prefix (HTTP, at most 4 KiB) or the bytes read (raw TCP).
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    /// [`body`](Self::body) as text. Invalid UTF-8 (including a multi-byte character cut off
    /// at the end of the prefix) becomes U+FFFD; borrowed when the bytes are valid.
    pub fn body_str(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.body)
    }

    /// `true` if `needle` occurs in [`body`](Self::body), compared as bytes. An empty needle is
    /// always found.
    pub fn body_contains(&self, needle: impl AsRef<[u8]>) -> bool {
        let needle = needle.as_ref();
        needle.is_empty() || self.body.windows(needle.len()).any(|w| w == needle)
    }

    /// Encodes the result in the ABI format (what the host sends to `sluice_health_evaluate`).
    /// Fails if a header or the header list is longer than a `u16` length allows, or the body
    /// longer than a `u32`.
    pub fn encode(&self) -> Result<Vec<u8>, WireError> {
        let mut out = Vec::with_capacity(13 + self.body.len());
        out.push(self.outcome as u8);
        out.extend_from_slice(&self.latency_us.to_le_bytes());
        out.extend_from_slice(&self.status.to_le_bytes());
        let n = u16::try_from(self.headers.len())
            .map_err(|_| WireError::result("more than 65535 headers"))?;
        out.extend_from_slice(&n.to_le_bytes());
        for (name, value) in &self.headers {
            put_u16_bytes(
                &mut out,
                name.as_bytes(),
                "header name longer than 65535 bytes",
            )
            .and_then(|()| {
                put_u16_bytes(
                    &mut out,
                    value.as_bytes(),
                    "header value longer than 65535 bytes",
                )
            })
            .map_err(WireError::into_result)?;
        }
        put_u32_bytes(&mut out, &self.body, "body longer than 4 GiB")
            .map_err(WireError::into_result)?;
        Ok(out)
    }

    /// Decodes a result in the ABI format (what `sluice_health_evaluate` receives). Strict about
    /// the layout: truncation, trailing bytes and an unknown outcome are errors. Header names
    /// are lower-cased; header values that are not UTF-8 (HTTP allows Latin-1 there) are
    /// decoded lossily rather than refused.
    pub fn decode(bytes: &[u8]) -> Result<Self, WireError> {
        let mut r = Reader::new(bytes, "probe result");
        let outcome =
            Outcome::from_u8(r.u8()?).ok_or_else(|| r.error_before(1, "unknown outcome"))?;
        let latency_us = r.u32()?;
        let status = r.u16()?;
        let n = r.u16()?;
        let mut headers = Vec::with_capacity(usize::from(n).min(r.remaining() / 4));
        for _ in 0..n {
            let name = String::from_utf8_lossy(r.bytes16()?).to_ascii_lowercase();
            let value = String::from_utf8_lossy(r.bytes16()?).into_owned();
            headers.push((name, value));
        }
        let body = r.bytes32()?.to_vec();
        r.finish()?;
        Ok(ProbeResult {
            outcome,
            latency_us,
            status,
            headers,
            body,
        })
    }
}

// ---------------------------------------------------------------------------------------------
// Verdict

/// A health check's judgement of one probe: what [`HealthCheck::evaluate`] returns.
///
/// On the wire (`sluice_health_evaluate`'s return value, [`Verdict::to_abi`]) it is `100` for
/// healthy, `-1` for unhealthy and `1..=99` for degraded.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Verdict {
    /// The backend gets its full weight.
    Healthy,
    /// The backend should get no traffic. The host marks it down after the pool's `fall`
    /// consecutive unhealthy verdicts.
    Unhealthy,
    /// The backend is healthy but its weight is multiplied by this percentage. Meaningful
    /// values are `1..=99`; [`Verdict::to_abi`] clamps others into that range (a degraded
    /// backend keeps at least 1 %; use [`Verdict::Unhealthy`] to take it out).
    Degraded(u8),
}

impl Verdict {
    /// [`Verdict::Degraded`] with `percent` clamped to `1..=99`, e.g. from a computed value.
    pub fn degraded(percent: u32) -> Verdict {
        Verdict::Degraded(percent.clamp(1, 99) as u8)
    }

    /// The value `sluice_health_evaluate` returns: `100`, `-1`, or the percentage clamped to
    /// `1..=99`. Never one of the values the host treats as a fault.
    pub fn to_abi(self) -> i32 {
        match self {
            Verdict::Healthy => 100,
            Verdict::Unhealthy => -1,
            Verdict::Degraded(p) => i32::from(p.clamp(1, 99)),
        }
    }

    /// Maps a `sluice_health_evaluate` return value back to a verdict; `None` for the values
    /// the host treats as a fault (`0`, above `100`, below `-1`).
    pub fn from_abi(v: i32) -> Option<Verdict> {
        match v {
            -1 => Some(Verdict::Unhealthy),
            100 => Some(Verdict::Healthy),
            1..=99 => Some(Verdict::Degraded(v as u8)),
            _ => None,
        }
    }

    /// `true` unless [`Verdict::Unhealthy`].
    pub fn is_healthy(self) -> bool {
        self != Verdict::Unhealthy
    }

    /// The share of its weight the backend keeps: 100 healthy, 0 unhealthy, else the (clamped)
    /// percentage.
    pub fn weight_percent(self) -> u8 {
        match self {
            Verdict::Healthy => 100,
            Verdict::Unhealthy => 0,
            Verdict::Degraded(p) => p.clamp(1, 99),
        }
    }
}

/// `true` → [`Verdict::Healthy`], `false` → [`Verdict::Unhealthy`].
impl From<bool> for Verdict {
    fn from(healthy: bool) -> Self {
        if healthy {
            Verdict::Healthy
        } else {
            Verdict::Unhealthy
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Wire format

/// A probe or probe result that could not be encoded or decoded.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WireError {
    context: &'static str,
    what: &'static str,
    offset: Option<usize>,
}

impl WireError {
    fn probe(what: &'static str) -> Self {
        WireError {
            context: "probe",
            what,
            offset: None,
        }
    }

    fn result(what: &'static str) -> Self {
        WireError {
            context: "probe result",
            what,
            offset: None,
        }
    }

    fn into_result(self) -> Self {
        WireError {
            context: "probe result",
            ..self
        }
    }

    /// The byte offset of a decoding error; `None` for an encoding error.
    pub fn offset(&self) -> Option<usize> {
        self.offset
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.offset {
            Some(at) => write!(f, "{}: {} at byte {at}", self.context, self.what),
            None => write!(f, "{}: {}", self.context, self.what),
        }
    }
}

impl std::error::Error for WireError {}

impl From<WireError> for String {
    fn from(e: WireError) -> String {
        e.to_string()
    }
}

/// Appends `b` with a `u16` length prefix; `too_long` is the error if it does not fit.
fn put_u16_bytes(out: &mut Vec<u8>, b: &[u8], too_long: &'static str) -> Result<(), WireError> {
    let len = u16::try_from(b.len()).map_err(|_| WireError::probe(too_long))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(b);
    Ok(())
}

/// Appends `b` with a `u32` length prefix; `too_long` is the error if it does not fit.
fn put_u32_bytes(out: &mut Vec<u8>, b: &[u8], too_long: &'static str) -> Result<(), WireError> {
    let len = u32::try_from(b.len()).map_err(|_| WireError::probe(too_long))?;
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(b);
    Ok(())
}

struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
    context: &'static str,
}

impl<'a> Reader<'a> {
    fn new(bytes: &'a [u8], context: &'static str) -> Self {
        Reader {
            bytes,
            pos: 0,
            context,
        }
    }

    fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    /// An error about the field that ended `back` bytes ago.
    fn error_before(&self, back: usize, what: &'static str) -> WireError {
        WireError {
            context: self.context,
            what,
            offset: Some(self.pos - back),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], WireError> {
        if self.remaining() < n {
            return Err(self.error_before(0, "truncated"));
        }
        let s = &self.bytes[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    fn u8(&mut self) -> Result<u8, WireError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, WireError> {
        let b = self.take(2)?;
        Ok(u16::from_le_bytes([b[0], b[1]]))
    }

    fn u32(&mut self) -> Result<u32, WireError> {
        let b = self.take(4)?;
        Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn bytes16(&mut self) -> Result<&'a [u8], WireError> {
        let len = self.u16()?;
        self.take(usize::from(len))
    }

    fn bytes32(&mut self) -> Result<&'a [u8], WireError> {
        let len = self.u32()?;
        let len = usize::try_from(len).map_err(|_| self.error_before(4, "length too large"))?;
        self.take(len)
    }

    fn string16(&mut self) -> Result<String, WireError> {
        let b = self.bytes16()?;
        String::from_utf8(b.to_vec()).map_err(|_| self.error_before(b.len(), "invalid UTF-8"))
    }

    fn finish(&self) -> Result<(), WireError> {
        if self.remaining() != 0 {
            return Err(self.error_before(0, "trailing bytes"));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probes() -> Vec<Probe> {
        vec![
            Probe::TcpConnect,
            Probe::http_get("/healthz"),
            Probe::http("POST", "/check?deep=1")
                .header("host", "api.internal")
                .header("X-Token", "s3cr3t value\twith tab")
                .body(r#"{"ping":true}"#),
            Probe::tcp("", 0),
            Probe::tcp("PING\r\n", 7),
            Probe::tcp(vec![0, 159, 255], 65536),
        ]
    }

    fn results() -> Vec<ProbeResult> {
        vec![
            ProbeResult::http(200),
            ProbeResult::http(503)
                .with_header("Content-Type", "application/json")
                .with_header("x-a", "")
                .with_body(r#"{"status":"down"}"#)
                .with_latency_ms(1234),
            ProbeResult::connected().with_latency(Duration::from_micros(17)),
            ProbeResult::tcp_read(vec![0xff, 0, b'+']),
            ProbeResult::connect_failed(),
            ProbeResult::timed_out().with_latency_ms(1000),
            ProbeResult::io_error(),
        ]
    }

    #[test]
    fn probes_roundtrip() {
        for p in probes() {
            let bytes = p.encode().unwrap();
            assert_eq!(Probe::decode(&bytes).unwrap(), p, "{p:?}");
        }
    }

    #[test]
    fn results_roundtrip() {
        for r in results() {
            let bytes = r.encode().unwrap();
            assert_eq!(ProbeResult::decode(&bytes).unwrap(), r, "{r:?}");
        }
    }

    #[test]
    fn probe_encoding_is_the_abi_layout() {
        // Spelled out byte by byte from ABI.md, so a change to either side shows up here.
        assert_eq!(Probe::TcpConnect.encode().unwrap(), [0]);
        let http = Probe::http_get("/h").header("host", "x").body("b");
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            &[1][..],                      // kind: HTTP
            &[3, 0], b"GET",               // method
            &[2, 0], b"/h",                // path
            &[1, 0],                       // one header
            &[4, 0], b"host", &[1, 0], b"x",
            &1u32.to_le_bytes(), b"b",     // body
        ]
        .concat();
        assert_eq!(http.encode().unwrap(), expected);
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            &[2][..],                      // kind: raw TCP
            &2u32.to_le_bytes(), b"hi",    // send
            &4u32.to_le_bytes(),           // read
        ]
        .concat();
        assert_eq!(Probe::tcp("hi", 4).encode().unwrap(), expected);
    }

    #[test]
    fn result_encoding_is_the_abi_layout() {
        let r = ProbeResult::http(200)
            .with_latency(Duration::from_micros(258))
            .with_header("A", "b")
            .with_body("ok");
        #[rustfmt::skip]
        let expected: Vec<u8> = [
            &[0][..],                      // outcome: completed
            &258u32.to_le_bytes(),         // latency_us
            &200u16.to_le_bytes(),         // status
            &[1, 0],                       // one header
            &[1, 0], b"a", &[1, 0], b"b",  // lower-cased name, value
            &2u32.to_le_bytes(), b"ok",    // body
        ]
        .concat();
        assert_eq!(r.encode().unwrap(), expected);
        let d = ProbeResult::decode(&expected).unwrap();
        assert_eq!(d.latency(), Duration::from_micros(258));
        assert_eq!(d.header("A"), Some("b"));
        assert_eq!(
            ProbeResult::connect_failed().encode().unwrap(),
            [1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]
        );
    }

    #[test]
    fn rejects_corrupt_encodings() {
        for p in probes() {
            let bytes = p.encode().unwrap();
            for cut in 0..bytes.len() {
                assert!(Probe::decode(&bytes[..cut]).is_err(), "{p:?} cut at {cut}");
            }
            let mut trailing = bytes.clone();
            trailing.push(0);
            let e = Probe::decode(&trailing).unwrap_err();
            assert!(e.to_string().contains("trailing"), "{e}");
        }
        for r in results() {
            let bytes = r.encode().unwrap();
            for cut in 0..bytes.len() {
                assert!(
                    ProbeResult::decode(&bytes[..cut]).is_err(),
                    "{r:?} cut at {cut}"
                );
            }
            let mut trailing = bytes.clone();
            trailing.push(0);
            assert!(ProbeResult::decode(&trailing).is_err());
        }
        assert_eq!(
            Probe::decode(&[7]).unwrap_err().to_string(),
            "probe: unknown probe kind at byte 0"
        );
        let mut bad = ProbeResult::http(200).encode().unwrap();
        bad[0] = 4;
        assert_eq!(
            ProbeResult::decode(&bad).unwrap_err().to_string(),
            "probe result: unknown outcome at byte 0"
        );
        // A huge length must not allocate.
        let huge = [[2u8].as_slice(), &u32::MAX.to_le_bytes()].concat();
        assert!(Probe::decode(&huge).is_err());
        let mut bad_utf8 = Probe::http_get("/ab").encode().unwrap();
        bad_utf8[9] = 0xff;
        assert_eq!(
            Probe::decode(&bad_utf8).unwrap_err().to_string(),
            "probe: invalid UTF-8 at byte 8"
        );
    }

    #[test]
    fn probes_the_host_would_refuse_do_not_encode() {
        let bad = [
            (Probe::http("get", "/"), "upper-case"),
            (Probe::http("", "/"), "upper-case"),
            (Probe::http_get("healthz"), "start with '/'"),
            (Probe::http_get("/a b"), "spaces"),
            (Probe::http_get("/a\r\nX: y"), "spaces"),
            (Probe::http_get("/").header("", "x"), "token"),
            (Probe::http_get("/").header("a b", "x"), "token"),
            (Probe::http_get("/").header("a:", "x"), "token"),
            (Probe::http_get("/").header("a", "x\r\nb: c"), "CR, LF"),
            (Probe::http_get(format!("/{}", "a".repeat(70_000))), "65535"),
        ];
        for (p, msg) in bad {
            let e = p.encode().unwrap_err().to_string();
            assert!(e.starts_with("probe: ") && e.contains(msg), "{p:?}: {e}");
            assert!(p.validate().is_err());
        }
        // The decoder enforces the same rules on what it receives.
        let mut lower = Probe::http_get("/").encode().unwrap();
        lower[3] = b'g';
        assert!(Probe::decode(&lower).is_err());
    }

    #[test]
    #[should_panic(expected = "only for HTTP probes")]
    fn header_on_a_tcp_probe_panics() {
        let _ = Probe::tcp_connect().header("a", "b");
    }

    #[test]
    fn result_accessors() {
        let r = ProbeResult::http(204)
            .with_header("X-Multi", "1")
            .with_header("x-multi", "2")
            .with_body(vec![b'o', b'k', 0xe2, 0x82]); // "ok" + a cut-off "€"
        assert_eq!(r.header("x-MULTI"), Some("1"));
        assert_eq!(r.headers().count(), 2);
        assert_eq!(r.header("missing"), None);
        assert_eq!(r.body_str(), "ok\u{fffd}");
        assert!(r.body_contains("ok") && r.body_contains("") && !r.body_contains("okk"));
        assert!(r.is_success());
        assert!(!ProbeResult::http(404).is_success());
        assert!(!ProbeResult::http(199).is_success());
        assert!(ProbeResult::http(399).is_success());
        assert!(ProbeResult::connected().is_success());
        assert_eq!(ProbeResult::connected().status(), None);
        assert!(!ProbeResult::timed_out().is_success());
        assert!(!ProbeResult::timed_out().with_status(200).is_success());
        assert_eq!(
            ProbeResult::http(200)
                .with_latency(Duration::from_secs(10_000))
                .latency_us(),
            u32::MAX
        );
        let r = ProbeResult::connected().with_outcome_of(Outcome::IoError);
        assert_eq!(r.outcome(), Outcome::IoError);
        assert!(!r.is_completed());
    }

    #[test]
    fn verdicts_map_to_the_abi() {
        assert_eq!(Verdict::Healthy.to_abi(), 100);
        assert_eq!(Verdict::Unhealthy.to_abi(), -1);
        assert_eq!(Verdict::Degraded(40).to_abi(), 40);
        assert_eq!(Verdict::Degraded(0).to_abi(), 1);
        assert_eq!(Verdict::Degraded(150).to_abi(), 99);
        assert_eq!(Verdict::degraded(0), Verdict::Degraded(1));
        assert_eq!(Verdict::degraded(1000), Verdict::Degraded(99));
        for v in -1..=100 {
            match Verdict::from_abi(v) {
                Some(verdict) => assert_eq!(verdict.to_abi(), v),
                None => assert_eq!(v, 0),
            }
        }
        assert_eq!(Verdict::from_abi(101), None);
        assert_eq!(Verdict::from_abi(-2), None);
        assert_eq!(Verdict::from(true), Verdict::Healthy);
        assert!(!Verdict::from(false).is_healthy());
        assert!(Verdict::Degraded(5).is_healthy());
        assert_eq!(Verdict::Degraded(0).weight_percent(), 1);
        assert_eq!(Verdict::Unhealthy.weight_percent(), 0);
    }
}
