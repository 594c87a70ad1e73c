//! The access log: one line per request, written by a thread of its own so the request path
//! never waits on a disk.
//!
//! Lines travel in recycled buffers through two bounded lock-free queues: a request takes a
//! free buffer, writes its line, and queues it; the writer thread writes queued lines and gives
//! the buffers back. When no buffer is free or the queue is full, the line is dropped and
//! counted (`sluice_access_log_dropped_total`): logging never blocks or grows without bound,
//! and once warm it allocates nothing.
//!
//! A log file is opened for appending and reopened when [`AccessLog::reopen`] is called (on
//! SIGUSR1), so `logrotate` can move it away and signal: see docs/config.md.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crossbeam_queue::ArrayQueue;
use prometheus::IntCounter;
use serde::Deserialize;

/// How lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LogFormat {
    /// No access log.
    #[default]
    Off,
    /// NCSA common log format with sluice's fields appended.
    Common,
    /// One JSON object per line (fields in docs/config.md).
    Json,
}

/// `[server.access_log]`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// `off`, `common` or `json`.
    #[serde(default)]
    pub format: LogFormat,
    /// The file to append to; absent or `"-"` means standard output.
    #[serde(default)]
    pub path: Option<PathBuf>,
}

/// Lines that may wait for the writer.
const QUEUE: usize = 8192;
/// Initial capacity of a line buffer.
const LINE: usize = 512;
/// How often the writer looks for lines when it found none.
const POLL: Duration = Duration::from_millis(10);

struct Shared {
    full: ArrayQueue<Vec<u8>>,
    free: ArrayQueue<Vec<u8>>,
    reopen: AtomicBool,
    dropped: IntCounter,
    /// Lines queued and not yet written and flushed.
    unwritten: std::sync::atomic::AtomicUsize,
}

/// The access log of the process (cheap to clone).
#[derive(Clone)]
pub struct AccessLog {
    format: LogFormat,
    shared: Option<Arc<Shared>>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

enum Sink {
    Stdout(std::io::Stdout),
    File(std::io::BufWriter<std::fs::File>, PathBuf),
}

fn open(path: &PathBuf) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

impl AccessLog {
    /// A log that writes nothing.
    pub fn off() -> AccessLog {
        AccessLog {
            format: LogFormat::Off,
            shared: None,
        }
    }

    /// Opens the log `config` describes and starts its writer thread. Fails when the file
    /// cannot be opened for appending.
    pub fn start(config: &AccessLogConfig, dropped: IntCounter) -> std::io::Result<AccessLog> {
        AccessLog::start_with_writer(config, config.format != LogFormat::Off, dropped)
    }

    /// [`AccessLog::start`], starting the writer also when the default format is `off` if
    /// `writer` says so (a route logs with its own format).
    pub fn start_with_writer(
        config: &AccessLogConfig,
        writer: bool,
        dropped: IntCounter,
    ) -> std::io::Result<AccessLog> {
        if !writer {
            return Ok(AccessLog::off());
        }
        let mut sink = match &config.path {
            Some(p) if p.as_os_str() != "-" => {
                Sink::File(std::io::BufWriter::new(open(p)?), p.clone())
            }
            _ => Sink::Stdout(std::io::stdout()),
        };
        let shared = Arc::new(Shared {
            full: ArrayQueue::new(QUEUE),
            free: ArrayQueue::new(2 * QUEUE),
            reopen: AtomicBool::new(false),
            dropped,
            unwritten: std::sync::atomic::AtomicUsize::new(0),
        });
        for _ in 0..QUEUE {
            let _ = shared.free.push(Vec::with_capacity(LINE));
        }
        let s = shared.clone();
        std::thread::Builder::new()
            .name("sluice-access-log".into())
            .spawn(move || loop {
                let mut wrote = 0;
                while let Some(mut line) = s.full.pop() {
                    let _ = match &mut sink {
                        Sink::Stdout(o) => o.write_all(&line),
                        Sink::File(f, _) => f.write_all(&line),
                    };
                    line.clear();
                    let _ = s.free.push(line);
                    wrote += 1;
                }
                if wrote > 0 {
                    let _ = match &mut sink {
                        Sink::Stdout(o) => o.flush(),
                        Sink::File(f, _) => f.flush(),
                    };
                    s.unwritten.fetch_sub(wrote, Ordering::AcqRel);
                }
                if s.reopen.swap(false, Ordering::AcqRel) {
                    if let Sink::File(f, path) = &mut sink {
                        let _ = f.flush();
                        match open(path) {
                            Ok(file) => *f = std::io::BufWriter::new(file),
                            Err(e) => tracing::error!(path = %path.display(), error = %e, "cannot reopen the access log; still writing to the old file"),
                        }
                    }
                }
                if wrote == 0 {
                    std::thread::park_timeout(POLL);
                }
            })?;
        Ok(AccessLog {
            format: config.format,
            shared: Some(shared),
        })
    }

    /// This log's writer with lines in `format` by default (listeners that share a file may
    /// differ in format; with `Off`, only routes with a format of their own write to it).
    pub fn with_format(&self, format: LogFormat) -> AccessLog {
        AccessLog {
            format,
            shared: self.shared.clone(),
        }
    }

    /// The line format (`Off` when nothing is logged).
    pub fn format(&self) -> LogFormat {
        self.format
    }

    /// Waits (at most `limit`) until every line queued so far is written and flushed; false
    /// when some were still waiting at the limit. For a clean exit.
    pub fn wait_written(&self, limit: std::time::Duration) -> bool {
        let Some(s) = &self.shared else {
            return true;
        };
        let until = std::time::Instant::now() + limit;
        while s.unwritten.load(Ordering::Acquire) > 0 {
            if std::time::Instant::now() >= until {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }

    /// Reopens the log file (after it was rotated away).
    pub fn reopen(&self) {
        if let Some(s) = &self.shared {
            s.reopen.store(true, Ordering::Release);
        }
    }

    /// A buffer for one line, or `None` (logging off, or every buffer in use: counted).
    pub fn line(&self) -> Option<Line> {
        self.line_as(self.format)
    }

    /// [`AccessLog::line`] in `format` (a route's own), or `None` (`format` is `off`, no writer
    /// runs, or every buffer is in use: counted).
    pub fn line_as(&self, format: LogFormat) -> Option<Line> {
        if format == LogFormat::Off {
            return None;
        }
        let s = self.shared.as_ref()?;
        match s.free.pop() {
            Some(buf) => Some(Line {
                buf,
                format,
                shared: s.clone(),
            }),
            None => {
                s.dropped.inc();
                None
            }
        }
    }
}

/// What is known of a request when its line is started.
#[derive(Debug, Clone, Copy)]
pub struct RequestFields<'a> {
    /// When the request head was complete (or, for a head that was refused, when it was).
    pub time: SystemTime,
    /// The client's address (the connection's peer).
    pub client: Option<(IpAddr, u16)>,
    /// Method token (`None`: the head was refused before it could be parsed).
    pub method: Option<&'a [u8]>,
    /// Host (authority), if any.
    pub host: Option<&'a [u8]>,
    /// Request target as sent (`None` when the head could not be parsed).
    pub target: Option<&'a [u8]>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1, 2 for HTTP/2 (`None` when the head could not be parsed).
    pub version: Option<u8>,
    /// TLS version (`TLSv1.3`) on a TLS listener.
    pub tls: Option<&'a str>,
    /// The server name the client asked for in its TLS handshake (SNI).
    pub sni: Option<&'a str>,
}

/// What is known when the request ended.
#[derive(Debug, Clone, Copy, Default)]
pub struct ResponseFields<'a> {
    /// Status sent (0: none, the connection was aborted).
    pub status: u16,
    /// Bytes read from the client for this request (head and body).
    pub bytes_in: u64,
    /// Bytes sent to the client for this request.
    pub bytes_out: u64,
    /// From the complete request head to the end of the response.
    pub duration: Duration,
    /// Time to connect to the backend (zero for a reused connection).
    pub connect: Option<Duration>,
    /// From the request sent to the response head received.
    pub response: Option<Duration>,
    /// Pool name.
    pub pool: Option<&'a str>,
    /// Backend address of the last attempt.
    pub backend: Option<&'a str>,
    /// Attempts made.
    pub attempts: u32,
    /// The pool's strategy generation.
    pub generation: Option<u64>,
    /// The request id sent upstream.
    pub request_id: Option<&'a [u8]>,
}

/// One line being written; queued by [`Line::finish`], returned unwritten when dropped.
pub struct Line {
    buf: Vec<u8>,
    format: LogFormat,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Line {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Line")
    }
}

impl Line {
    /// Writes the request's fields (call once, first).
    pub fn request(&mut self, r: &RequestFields<'_>) {
        let b = &mut self.buf;
        let time = humantime::format_rfc3339_millis(r.time);
        let version: Option<&str> = r.version.map(|v| match v {
            0 => "HTTP/1.0",
            2 => "HTTP/2",
            _ => "HTTP/1.1",
        });
        match self.format {
            LogFormat::Json => {
                let _ = write!(b, "{{\"time\":\"{time}\",\"client_ip\":");
                match r.client {
                    Some((ip, port)) => {
                        let _ = write!(b, "\"{ip}\",\"client_port\":{port}");
                    }
                    None => b.extend_from_slice(b"null,\"client_port\":null"),
                }
                b.extend_from_slice(b",\"method\":");
                json_opt(b, r.method);
                b.extend_from_slice(b",\"host\":");
                json_opt(b, r.host);
                b.extend_from_slice(b",\"path\":");
                json_opt(b, r.target);
                b.extend_from_slice(b",\"protocol\":");
                json_opt(b, version.map(str::as_bytes));
                b.extend_from_slice(b",\"tls\":");
                json_opt(b, r.tls.map(str::as_bytes));
                b.extend_from_slice(b",\"sni\":");
                json_opt(b, r.sni.map(str::as_bytes));
            }
            LogFormat::Common | LogFormat::Off => {
                match r.client {
                    Some((ip, _)) => {
                        let _ = write!(b, "{ip}");
                    }
                    None => b.push(b'-'),
                }
                let _ = write!(b, " - - [{time}] ");
                match (r.method, r.target, version) {
                    (Some(method), Some(target), Some(version)) => {
                        b.push(b'"');
                        clean(b, method);
                        b.push(b' ');
                        clean(b, target);
                        let _ = write!(b, " {version}\"");
                    }
                    // A head that could not be parsed: no request line, as nginx logs it.
                    _ => b.extend_from_slice(b"\"-\""),
                }
            }
        }
    }

    /// Writes the response's fields and queues the line for the writer.
    pub fn finish(mut self, r: &ResponseFields<'_>) {
        let b = &mut self.buf;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        match self.format {
            LogFormat::Json => {
                let _ = write!(
                    b,
                    ",\"status\":{},\"bytes_in\":{},\"bytes_out\":{},\"duration_ms\":{:.3}",
                    r.status,
                    r.bytes_in,
                    r.bytes_out,
                    ms(r.duration)
                );
                match r.connect {
                    Some(d) => {
                        let _ = write!(b, ",\"upstream_connect_ms\":{:.3}", ms(d));
                    }
                    None => b.extend_from_slice(b",\"upstream_connect_ms\":null"),
                }
                match r.response {
                    Some(d) => {
                        let _ = write!(b, ",\"upstream_response_ms\":{:.3}", ms(d));
                    }
                    None => b.extend_from_slice(b",\"upstream_response_ms\":null"),
                }
                b.extend_from_slice(b",\"pool\":");
                json_opt(b, r.pool.map(str::as_bytes));
                b.extend_from_slice(b",\"backend\":");
                json_opt(b, r.backend.map(str::as_bytes));
                let _ = write!(b, ",\"attempts\":{},\"generation\":", r.attempts);
                match r.generation {
                    Some(g) => {
                        let _ = write!(b, "{g}");
                    }
                    None => b.extend_from_slice(b"null"),
                }
                b.extend_from_slice(b",\"request_id\":");
                json_opt(b, r.request_id);
                b.extend_from_slice(b"}\n");
            }
            LogFormat::Common | LogFormat::Off => {
                let _ = write!(
                    b,
                    " {} {} {:.3} {} {} ",
                    r.status,
                    r.bytes_out,
                    ms(r.duration),
                    r.pool.unwrap_or("-"),
                    r.backend.unwrap_or("-"),
                );
                match r.request_id {
                    Some(id) => clean(b, id),
                    None => b.push(b'-'),
                }
                b.push(b'\n');
            }
        }
        let buf = std::mem::take(&mut self.buf);
        // Counted before the push, so the writer can never count it written first.
        self.shared.unwritten.fetch_add(1, Ordering::AcqRel);
        if let Err(buf) = self.shared.full.push(buf) {
            self.shared.unwritten.fetch_sub(1, Ordering::AcqRel);
            self.shared.dropped.inc();
            let mut buf = buf;
            buf.clear();
            let _ = self.shared.free.push(buf);
        }
    }
}

impl Drop for Line {
    fn drop(&mut self) {
        // Not finished (or already queued, leaving an empty Vec): give a real buffer back.
        if self.buf.capacity() > 0 {
            self.buf.clear();
            let _ = self.shared.free.push(std::mem::take(&mut self.buf));
        }
    }
}

/// Bytes as a JSON string: escapes quotes, backslashes and control bytes; bytes that are not
/// UTF-8 are written as `\u00XX` of their value (heads are ASCII; this keeps the line valid).
fn json_str(b: &mut Vec<u8>, s: &[u8]) {
    b.push(b'"');
    for &c in s {
        match c {
            b'"' => b.extend_from_slice(b"\\\""),
            b'\\' => b.extend_from_slice(b"\\\\"),
            0x20..=0x7e => b.push(c),
            _ => {
                let _ = write!(b, "\\u{:04x}", c);
            }
        }
    }
    b.push(b'"');
}

fn json_opt(b: &mut Vec<u8>, s: Option<&[u8]>) {
    match s {
        Some(s) => json_str(b, s),
        None => b.extend_from_slice(b"null"),
    }
}

/// Bytes for the common format: printable ASCII, anything else (and `"`) as `\xHH`.
fn clean(b: &mut Vec<u8>, s: &[u8]) {
    for &c in s {
        if (0x21..=0x7e).contains(&c) && c != b'"' {
            b.push(c);
        } else {
            let _ = write!(b, "\\x{c:02x}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fields() -> (RequestFields<'static>, ResponseFields<'static>) {
        (
            RequestFields {
                time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
                client: Some(("10.0.0.1".parse().unwrap(), 5555)),
                method: Some(b"GET"),
                host: Some(b"a.example"),
                target: Some(b"/p?q=\"x\""),
                version: Some(1),
                tls: Some("TLSv1.3"),
                sni: Some("a.example"),
            },
            ResponseFields {
                status: 200,
                bytes_in: 40,
                bytes_out: 120,
                duration: Duration::from_micros(1500),
                connect: Some(Duration::ZERO),
                response: Some(Duration::from_micros(900)),
                pool: Some("web"),
                backend: Some("10.0.0.2:80"),
                attempts: 1,
                generation: Some(3),
                request_id: Some(b"abc"),
            },
        )
    }

    #[test]
    fn json_lines_parse_and_carry_every_field() {
        let dir = std::env::temp_dir().join(format!("sluice-al-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("access.log");
        let log = AccessLog::start(
            &AccessLogConfig {
                format: LogFormat::Json,
                path: Some(path.clone()),
            },
            IntCounter::new("d", "d").unwrap(),
        )
        .unwrap();
        let (req, resp) = fields();
        let mut line = log.line().unwrap();
        line.request(&req);
        line.finish(&resp);
        let mut text = String::new();
        for _ in 0..500 {
            text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.ends_with('\n') {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let v: serde_json::Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(v["time"], "2023-11-14T22:13:20.000Z");
        assert_eq!(v["client_ip"], "10.0.0.1");
        assert_eq!(v["path"], "/p?q=\"x\"");
        assert_eq!(v["status"], 200);
        assert_eq!(v["duration_ms"], 1.5);
        assert_eq!(v["backend"], "10.0.0.2:80");
        assert_eq!(v["generation"], 3);
        assert_eq!(v["request_id"], "abc");
        assert_eq!(v["tls"], "TLSv1.3");
        assert_eq!(v["sni"], "a.example");
        assert_eq!(v["upstream_response_ms"], 0.9);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_refused_head_has_no_request_line() {
        let shared = Arc::new(Shared {
            full: ArrayQueue::new(4),
            free: ArrayQueue::new(4),
            reopen: AtomicBool::new(false),
            dropped: IntCounter::new("d", "d").unwrap(),
            unwritten: std::sync::atomic::AtomicUsize::new(0),
        });
        let _ = shared.free.push(Vec::new());
        let _ = shared.free.push(Vec::new());
        let (mut req, _) = fields();
        (req.method, req.target, req.version, req.host) = (None, None, None, None);
        let resp = ResponseFields {
            status: 431,
            bytes_out: 20,
            ..ResponseFields::default()
        };
        for format in [LogFormat::Json, LogFormat::Common] {
            let log = AccessLog {
                format,
                shared: Some(shared.clone()),
            };
            let mut line = log.line().unwrap();
            line.request(&req);
            line.finish(&resp);
        }
        let json = String::from_utf8(shared.full.pop().unwrap()).unwrap();
        let v: serde_json::Value = serde_json::from_str(json.trim()).unwrap();
        assert_eq!(v["status"], 431);
        assert_eq!(v["method"], serde_json::Value::Null);
        assert_eq!(v["path"], serde_json::Value::Null);
        assert_eq!(v["protocol"], serde_json::Value::Null);
        assert_eq!(v["sni"], "a.example");
        assert_eq!(v["upstream_connect_ms"], serde_json::Value::Null);
        let common = String::from_utf8(shared.full.pop().unwrap()).unwrap();
        assert!(
            common.starts_with("10.0.0.1 - - [2023-11-14T22:13:20.000Z] \"-\" 431 20 0.000 - - -"),
            "{common}"
        );
    }

    #[test]
    fn a_full_log_drops_and_counts_instead_of_waiting() {
        let dropped = IntCounter::new("d", "d").unwrap();
        let shared = Arc::new(Shared {
            full: ArrayQueue::new(1),
            free: ArrayQueue::new(4),
            reopen: AtomicBool::new(false),
            dropped: dropped.clone(),
            unwritten: std::sync::atomic::AtomicUsize::new(0),
        });
        let _ = shared.free.push(Vec::with_capacity(8));
        let log = AccessLog {
            format: LogFormat::Common,
            shared: Some(shared),
        };
        let (req, resp) = fields();
        let mut line = log.line().unwrap();
        line.request(&req);
        assert!(log.line().is_none(), "no second buffer");
        assert_eq!(dropped.get(), 1);
        line.finish(&resp);
        let shared = log.shared.as_ref().unwrap();
        let queued = shared.full.pop().unwrap();
        let text = String::from_utf8(queued).unwrap();
        assert!(
            text.starts_with("10.0.0.1 - - [2023-11-14T22:13:20.000Z] \"GET /p?q=\\x22x\\x22 HTTP/1.1\" 200 120 1.500 web 10.0.0.2:80 abc"),
            "{text}"
        );
    }
}
