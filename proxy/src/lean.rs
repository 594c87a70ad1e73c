//! The lean HTTP/1.1 path: one task per downstream connection forwards each request head as the
//! bytes that were parsed (re-serialized with sluice's edits), streams bodies both ways without
//! channels, and keeps upstream connections per backend and per worker thread.
//!
//! pingora still owns the listeners, TLS, HTTP/2, the server lifecycle and timeouts' clock; a
//! connection that negotiated HTTP/2 (ALPN `h2`, or the h2c preface when `h2c` is on) is handed
//! to pingora-proxy's path whole, before any byte is read. The choice is made once per
//! connection. Everything HTTP/1.x stays here, including upgrades (WebSocket), `Expect:
//! 100-continue`, pipelined requests and HTTP/1.0 clients.
//!
//! Per request the host does no allocation on the success path: the read buffer, header spans and
//! the head being written are per-connection buffers reused from one request to the next.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use pingora::apps::ServerApp;
use pingora::protocols::{Stream, ALPN};
use pingora::server::ShutdownWatch;
use prometheus::{IntCounter, IntGauge};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::access_log::{AccessLog, LogFormat, RequestFields, ResponseFields};
use crate::config::{ClientLimits, Http1Engine};
use crate::forwarding::IncomingHeaders;
use crate::forwarding::{Forwarding, Hop, RequestId};
use crate::head::{
    self, is_hop_by_hop, name_is, BodyCursor, BodyFraming, HeadError, HeadWriter, HeaderSpan,
    ParsedRequest, RequestHead, ResponseHead,
};
use crate::lease::{Lease, Outcome};
use crate::plugin::RequestView;
use crate::pool::Pool;
use crate::route::Route;
use crate::route_rules::{Action, HeaderEdits, Rules};
use crate::runtime::Runtime;
use crate::tls_name::server_name;
use crate::upstream::UpstreamConn;
use crate::upstream_tls::UpstreamTls;

/// Largest response head accepted from a backend.
const MAX_RESPONSE_HEAD: usize = 64 * 1024;
/// A request body up to this size is read whole before the backend is chosen, so a failed
/// attempt can be replayed on another backend (pingora's retry buffer is the same size).
const REPLAY_MAX: u64 = 64 * 1024;
/// How long a write to the client may stall.
const CLIENT_WRITE_TIMEOUT: Duration = Duration::from_secs(60);
/// The h2c connection preface (RFC 9113 3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// The proxy service's application: every client connection is admitted here (the connection
/// cap), then served by the lean path (HTTP/1.x) or by pingora-proxy (HTTP/2, and HTTP/1.x when
/// `[server] http1 = "pingora"`).
pub struct LeanApp<F> {
    runtime: Arc<Runtime>,
    h2c: bool,
    engine: Http1Engine,
    forwarding: Forwarding,
    /// Settings of connections whose listener is not known (`[server.limits]`,
    /// `[server.access_log]`); `limits.max_connections` caps all listeners together.
    default: ListenerState<F>,
    /// Each listener's settings, found once per connection from the address it arrived on.
    by_addr: HashMap<SocketAddr, ListenerState<F>>,
    /// Listeners on an unspecified IP (`0.0.0.0:443`), by port.
    by_port: HashMap<u16, SocketAddr>,
    open: AtomicU64,
    counters: LimitCounters,
}

/// What one listener gives its connections.
struct ListenerState<F> {
    limits: ClientLimits,
    log: AccessLog,
    /// pingora-proxy for this listener's HTTP/2 (and HTTP/1 with `http1 = "pingora"`).
    fallback: Arc<F>,
    /// Connections open on this listener.
    open: AtomicU64,
}

/// The downstream counters, resolved once.
struct LimitCounters {
    open: IntGauge,
    accepted: IntCounter,
    connections: IntCounter,
    header_timeout: IntCounter,
    body_timeout: IntCounter,
    header_size: IntCounter,
    body_size: IntCounter,
}

impl<F> LeanApp<F> {
    /// Serves `runtime`'s routes; HTTP/2 connections (and HTTP/1 ones when `engine` says so)
    /// go to `fallback`. `limits` and `log` serve connections of listeners not given with
    /// [`LeanApp::listener`].
    pub fn new(
        runtime: Arc<Runtime>,
        fallback: F,
        h2c: bool,
        engine: Http1Engine,
        limits: ClientLimits,
        forwarding: Forwarding,
        log: AccessLog,
    ) -> LeanApp<F> {
        let m = &runtime.metrics;
        let reason = |r: &str| m.limit_rejections.with_label_values(&[r]);
        let counters = LimitCounters {
            open: m.downstream_open.with_label_values::<&str>(&[]),
            accepted: m.downstream_accepted.with_label_values::<&str>(&[]),
            connections: reason("connections"),
            header_timeout: reason("header_timeout"),
            body_timeout: reason("body_timeout"),
            header_size: reason("header_size"),
            body_size: reason("body_size"),
        };
        LeanApp {
            runtime,
            h2c,
            engine,
            forwarding,
            default: ListenerState {
                limits,
                log,
                fallback: Arc::new(fallback),
                open: AtomicU64::new(0),
            },
            by_addr: HashMap::new(),
            by_port: HashMap::new(),
            open: AtomicU64::new(0),
            counters,
        }
    }

    /// Gives connections arriving on `addr` their own limits, access log and pingora-proxy.
    /// Its `max_connections` caps this listener's connections (the global cap still holds).
    pub fn listener(
        &mut self,
        addr: SocketAddr,
        limits: ClientLimits,
        log: AccessLog,
        fallback: Arc<F>,
    ) {
        if addr.ip().is_unspecified() {
            self.by_port.insert(addr.port(), addr);
        }
        let state = ListenerState {
            limits,
            log,
            fallback,
            open: AtomicU64::new(0),
        };
        self.by_addr.insert(addr, state);
    }

    /// The listener `stream` arrived on (two hash lookups at most, once per connection).
    fn listener_of(&self, stream: &Stream) -> &ListenerState<F> {
        if self.by_addr.is_empty() {
            return &self.default;
        }
        let local = stream
            .get_socket_digest()
            .and_then(|d| d.local_addr().and_then(|a| a.as_inet()).copied());
        let Some(local) = local else {
            return &self.default;
        };
        self.by_addr
            .get(&local)
            .or_else(|| {
                // A listener on 0.0.0.0 or [::] sees the address the client dialled.
                let wild = self.by_port.get(&local.port())?;
                self.by_addr.get(wild)
            })
            .unwrap_or(&self.default)
    }

    /// A place for one more client connection on `listener`, or `None` at `max_connections`
    /// (the global one or the listener's).
    fn admit<'a>(&'a self, listener: &'a ListenerState<F>) -> Option<ConnSlot<'a, F>> {
        let n = self.open.fetch_add(1, Ordering::Relaxed) + 1;
        let here = listener.open.fetch_add(1, Ordering::Relaxed) + 1;
        if n > self.default.limits.max_connections || here > listener.limits.max_connections {
            self.open.fetch_sub(1, Ordering::Relaxed);
            listener.open.fetch_sub(1, Ordering::Relaxed);
            self.counters.connections.inc();
            return None;
        }
        self.counters.accepted.inc();
        self.counters.open.inc();
        Some(ConnSlot(self, listener))
    }
}

/// One admitted client connection; dropping it frees the place.
struct ConnSlot<'a, F>(&'a LeanApp<F>, &'a ListenerState<F>);

impl<F> Drop for ConnSlot<'_, F> {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
        self.1.open.fetch_sub(1, Ordering::Relaxed);
        self.0.counters.open.dec();
    }
}

#[async_trait]
impl<F: ServerApp + Send + Sync + 'static> ServerApp for LeanApp<F> {
    async fn process_new(
        self: &Arc<Self>,
        mut stream: Stream,
        shutdown: &ShutdownWatch,
    ) -> Option<Stream> {
        let listener = self.listener_of(&stream);
        // Over the cap the connection is closed at once, before anything is read or allocated.
        let _slot = self.admit(listener)?;
        let tls = stream.get_ssl_digest().is_some();
        let h2 = matches!(stream.selected_alpn_proto(), Some(ALPN::H2));
        let h2c = !tls && self.h2c && {
            let mut preface = [0u8; H2_PREFACE.len()];
            // A stream that cannot peek is served as HTTP/1 (pingora does the same).
            matches!(stream.try_peek(&mut preface).await, Ok(true)) && preface == H2_PREFACE
        };
        if h2 || h2c {
            return listener.fallback.process_new(stream, shutdown).await;
        }
        let (stream, read) = if self.engine == Http1Engine::Pingora {
            (stream, BytesMut::new())
        } else {
            let _here = ThreadConn::open();
            // `Some` when a request is for an HTTP/2 pool: pingora-proxy serves the connection
            // from this request on.
            Conn::new(self, listener, stream, tls)
                .serve(shutdown.clone())
                .await?
        };
        // pingora's HTTP/1 engine times each read of a head; the lean path's whole-head
        // deadline goes with the connection.
        let stream: Stream = Box::new(
            crate::rewind::Rewound::new(read, stream).with_head_deadline(
                listener.limits.header_timeout,
                self.counters.header_timeout.clone(),
            ),
        );
        listener.fallback.process_new(stream, shutdown).await
    }

    async fn cleanup(&self) {
        // Listeners with the same settings share one pingora-proxy: clean each up once.
        let mut done: Vec<&Arc<F>> = Vec::new();
        for l in std::iter::once(&self.default).chain(self.by_addr.values()) {
            if !done.iter().any(|f| Arc::ptr_eq(f, &l.fallback)) {
                l.fallback.cleanup().await;
                done.push(&l.fallback);
            }
        }
    }
}

/// How many client connections must have closed on a worker thread since its heap was last
/// trimmed before the next trim.
const TRIM_AFTER_CLOSED: u32 = 64;

thread_local! {
    /// This worker thread's client connections: open now, and the most open since its heap was
    /// last trimmed.
    static THREAD_CONNS: std::cell::Cell<(u32, u32)> = const { std::cell::Cell::new((0, 0)) };
    static TRIMMER_STARTED: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// One client connection served on this worker thread; dropping it counts it closed.
///
/// mimalloc keeps the pages freed by closed connections for reuse and purges them only on later
/// allocator calls on the same thread, so after a burst of connections (thousands of slow
/// clients) a quiet thread would hold their memory indefinitely. Each worker thread therefore
/// runs a small task that, once a second, returns its free heap to the OS when many connections
/// have closed since the last time: cheap, and off the request path.
struct ThreadConn;

impl ThreadConn {
    fn open() -> ThreadConn {
        THREAD_CONNS.with(|c| {
            let (open, peak) = c.get();
            c.set((open + 1, peak.max(open + 1)));
        });
        if !TRIMMER_STARTED.with(|s| s.replace(true)) {
            // Worker threads run single-threaded runtimes: this task stays on this thread.
            tokio::spawn(async {
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tick.tick().await;
                    let (open, peak) = THREAD_CONNS.with(|c| c.get());
                    if peak - open >= TRIM_AFTER_CLOSED {
                        crate::server::release_free_memory();
                        THREAD_CONNS.with(|c| c.set((open, open)));
                    }
                }
            });
        }
        ThreadConn
    }
}

impl Drop for ThreadConn {
    fn drop(&mut self) {
        THREAD_CONNS.with(|c| {
            let (open, peak) = c.get();
            c.set((open - 1, peak));
        });
    }
}

/// What a pool allows for one request, copied out of its settings once.
#[derive(Clone)]
struct Policy {
    retries: u32,
    retry_on_connect: bool,
    retry_on_error: bool,
    retry_on_5xx: bool,
    retry_non_idempotent: bool,
    connect_timeout: Duration,
    read_timeout: Duration,
    idle_timeout: Duration,
    /// Idle connections are kept and taken under this key.
    conn_key: u64,
    /// HTTPS to the backends.
    tls: Option<Arc<UpstreamTls>>,
}

impl Policy {
    fn of(pool: &Pool) -> Policy {
        let s = pool.settings();
        Policy {
            retries: s.retries,
            retry_on_connect: s.retry_on_connect,
            retry_on_error: s.retry_on_error,
            retry_on_5xx: s.retry_on_5xx,
            retry_non_idempotent: s.retry_non_idempotent,
            connect_timeout: s.connect_timeout,
            read_timeout: s.read_timeout,
            idle_timeout: s.idle_timeout,
            conn_key: s.upstream.conn_key(),
            tls: s.upstream.tls.clone(),
        }
    }
}

/// How an exchange left the downstream connection.
#[derive(Debug, PartialEq, Eq)]
enum Next {
    /// Ready for the next request.
    KeepAlive,
    /// Must close.
    Close,
    /// The request at the start of the buffer is for an HTTP/2 pool: hand the connection to
    /// pingora-proxy, unread request included.
    HandOff,
}

/// Why an attempt on a backend failed.
enum AttemptError {
    /// Connecting failed or timed out; nothing was sent.
    Connect { timed_out: bool },
    /// The backend failed before any byte of its response arrived: the request may be replayed.
    NoResponse { timed_out: bool },
    /// The backend failed after its response head was sent downstream: abort the client.
    Aborted,
    /// The client failed or left: nothing to answer.
    Client,
    /// The backend sent something that is not HTTP.
    BadResponse,
    /// The backend answered this 5xx, nothing was sent downstream, and the pool retries it.
    Retry5xx(u16),
    /// A streamed request body went over `max_body_bytes` before any answer.
    BodyTooLarge,
}

/// What the metrics and the access log say about the request being served (reset per request).
#[derive(Default)]
struct Record {
    /// A line is being written: collect the fields only the log needs.
    logging: bool,
    status: u16,
    /// Request body bytes read from the client (as received: chunk framing included).
    body_in: u64,
    /// Bytes of response heads (1xx and final) written to the client: what else was written
    /// is body.
    heads_out: u64,
    /// The last attempt's connect time (zero for a reused connection).
    connect: Option<Duration>,
    /// The last attempt opened a new connection, whose connect time is not observed yet.
    connected_new: bool,
    /// The last attempt's time from the request sent to the response head.
    response: Option<Duration>,
    pool: Option<Arc<Pool>>,
    backend: Option<Arc<crate::backend::Backend>>,
    attempts: u32,
    generation: Option<u64>,
    request_id: Option<RequestId>,
}

/// What an attempt may do with the request.
#[derive(Clone, Copy)]
struct Attempt<'a> {
    /// A 5xx answer is to be retried on another backend.
    retry_5xx: bool,
    /// Body bytes in the buffer after the head.
    body_here: usize,
    /// The request id to add (the request has none).
    request_id: Option<RequestId>,
    /// The route's edits.
    rules: &'a Rules<Arc<Pool>>,
}

/// One downstream connection and its reused buffers.
struct Conn<'r> {
    runtime: &'r Arc<Runtime>,
    limits: ClientLimits,
    counters: &'r LimitCounters,
    forwarding: &'r Forwarding,
    log: &'r AccessLog,
    /// What the access log says about the request being served.
    rec: Record,
    /// Bytes written to the client on this connection.
    bytes_out: u64,
    client_port: u16,
    /// The TLS digest (version, and the SNI name in its extension) on a TLS listener.
    tls_version: Option<Arc<pingora::protocols::tls::SslDigest>>,
    /// The peer is a trusted proxy: its forwarding headers are believed.
    trusted_peer: bool,
    scheme: &'static str,
    /// When the head being read must be complete.
    head_deadline: Option<tokio::time::Instant>,
    io: Stream,
    client_ip: Option<IpAddr>,
    /// Bytes read from the client: the current request's head, then its body or the next
    /// pipelined request.
    buf: BytesMut,
    spans: Vec<HeaderSpan>,
    /// Bytes read from the backend.
    ubuf: BytesMut,
    uspans: Vec<HeaderSpan>,
    /// A head being written.
    out: Vec<u8>,
}

impl<'r> Conn<'r> {
    fn new<F>(
        app: &'r LeanApp<F>,
        listener: &'r ListenerState<F>,
        io: Stream,
        tls: bool,
    ) -> Conn<'r> {
        let (runtime, limits, counters) = (&app.runtime, listener.limits, &app.counters);
        let peer = io
            .get_socket_digest()
            .and_then(|d| d.peer_addr().and_then(|a| a.as_inet()).copied());
        let client_ip = peer.map(|a| a.ip());
        Conn {
            runtime,
            limits,
            counters,
            forwarding: &app.forwarding,
            log: &listener.log,
            rec: Record::default(),
            bytes_out: 0,
            client_port: peer.map_or(0, |a| a.port()),
            tls_version: io.get_ssl_digest(),
            trusted_peer: app.forwarding.trusts(client_ip),
            scheme: if tls { "https" } else { "http" },
            // A new connection must send its first head within the header timeout.
            head_deadline: Some(tokio::time::Instant::now() + limits.header_timeout),
            io,
            client_ip,
            // Allocated when first needed (the first read reserves 4 KiB), so a connection that
            // never completes a head holds a few KiB, not a request's worth of buffers.
            buf: BytesMut::new(),
            spans: Vec::new(),
            ubuf: BytesMut::new(),
            uspans: Vec::new(),
            out: Vec::new(),
        }
    }

    /// The client's address: the forwarded client's when the peer is a trusted proxy.
    fn client_ip_of(&self, head: &RequestHead) -> Option<IpAddr> {
        if !self.trusted_peer {
            return self.client_ip;
        }
        let parsed = ParsedRequest {
            buf: &self.buf,
            head,
            headers: &self.spans,
        };
        self.forwarding.client_ip(&self.hop(head), &parsed)
    }

    /// This hop, as the forwarding headers describe it.
    fn hop<'h>(&'h self, head: &RequestHead) -> Hop<'h> {
        Hop {
            peer: self.client_ip,
            trusted: self.trusted_peer,
            scheme: self.scheme,
            host: head.host.map(|h| h.of(&self.buf)),
        }
    }

    /// Serves requests until the connection closes; returns the connection and the bytes read
    /// from it when it is to be handed to pingora-proxy ([`Next::HandOff`]).
    async fn serve(mut self, mut shutdown: ShutdownWatch) -> Option<(Stream, BytesMut)> {
        loop {
            let head = match self.read_head(&mut shutdown).await {
                Ok(Some(h)) => h,
                Ok(None) => return None,
                Err(e) => {
                    self.log_refused(e.status, e.reason.len() as u64);
                    let _ = self.send_error(e.status, e.reason, false).await;
                    return None;
                }
            };
            let route = {
                let router = self.runtime.router();
                let parsed = ParsedRequest {
                    buf: &self.buf,
                    head: &head,
                    headers: &self.spans,
                };
                router.select(&parsed, self.scheme == "https").cloned()
            };
            let format = route
                .as_ref()
                .and_then(|r| r.rules.access_log)
                .unwrap_or(self.log.format());
            let next = self
                .recorded_exchange(&head, route.as_deref(), format, &shutdown)
                .await;
            match next {
                Next::KeepAlive if !*shutdown.borrow() => {}
                Next::HandOff => return Some((self.io, self.buf)),
                _ => return None,
            }
        }
    }

    /// [`Conn::exchange`] with its metrics and its access log line in `format` (the request's
    /// fields are taken before the exchange, since the buffer moves on after it).
    async fn recorded_exchange(
        &mut self,
        head: &RequestHead,
        route: Option<&Route>,
        format: LogFormat,
        shutdown: &ShutdownWatch,
    ) -> Next {
        let started = Instant::now();
        let mut line = self.log.line_as(format);
        if let Some(line) = &mut line {
            let tls = self.tls_version.as_deref();
            line.request(&RequestFields {
                time: std::time::SystemTime::now(),
                client: self.client_ip.map(|ip| (ip, self.client_port)),
                method: Some(head.method.of(&self.buf)),
                host: head.host.map(|h| h.of(&self.buf)),
                target: Some(head.target.of(&self.buf)),
                version: Some(head.version),
                tls: tls.map(|d| d.version.as_ref()),
                sni: tls.and_then(server_name),
            });
        }
        self.rec = Record {
            logging: line.is_some(),
            ..Record::default()
        };
        let out_before = self.bytes_out;
        let next = self.exchange(head, route, shutdown).await;
        if next == Next::HandOff {
            // pingora-proxy serves and logs this request.
            return next;
        }
        let duration = started.elapsed();
        let body_out = (self.bytes_out - out_before).saturating_sub(self.rec.heads_out);
        if let Some(pool) = &self.rec.pool {
            let c = &pool.counters;
            c.timings.duration.observe(duration.as_secs_f64());
            c.request_bytes.inc_by(self.rec.body_in);
            c.response_bytes.inc_by(body_out);
            let backend = self.rec.backend.as_ref();
            if let Some(t) = backend.and_then(|b| b.stats.timings.as_ref()) {
                t.duration.observe(duration.as_secs_f64());
            }
        }
        if let Some(line) = line {
            let r = &self.rec;
            line.finish(&ResponseFields {
                status: r.status,
                bytes_in: r.body_in,
                bytes_out: body_out,
                duration,
                connect: r.connect,
                response: r.response,
                pool: r.pool.as_ref().map(|p| p.name.as_str()),
                backend: r.backend.as_ref().map(|b| b.addr_text.as_str()),
                attempts: r.attempts,
                generation: r.generation,
                request_id: r.request_id.as_ref().map(RequestId::as_bytes),
            });
        }
        next
    }

    /// The access log line of a request refused before its head was parsed (`status`, with an
    /// error body of `body_out` bytes): what is known of the connection, no request line.
    fn log_refused(&self, status: u16, body_out: u64) {
        let Some(mut line) = self.log.line() else {
            return;
        };
        let tls = self.tls_version.as_deref();
        line.request(&RequestFields {
            time: std::time::SystemTime::now(),
            client: self.client_ip.map(|ip| (ip, self.client_port)),
            method: None,
            host: None,
            target: None,
            version: None,
            tls: tls.map(|d| d.version.as_ref()),
            sni: tls.and_then(server_name),
        });
        line.finish(&ResponseFields {
            status,
            bytes_out: body_out,
            ..ResponseFields::default()
        });
    }

    /// Observes the connect and response times of the attempt that just ended on `backend`.
    fn observe_attempt(&mut self, pool: &Pool, backend: &crate::backend::Backend) {
        let own = backend.stats.timings.as_ref();
        if std::mem::take(&mut self.rec.connected_new) {
            if let Some(d) = self.rec.connect {
                pool.counters.timings.connect.observe(d.as_secs_f64());
                if let Some(t) = own {
                    t.connect.observe(d.as_secs_f64());
                }
            }
        }
        if let Some(d) = self.rec.response {
            pool.counters.timings.response.observe(d.as_secs_f64());
            if let Some(t) = own {
                t.response.observe(d.as_secs_f64());
            }
        }
    }

    /// Reads until a whole request head is in the buffer. `None`: the client closed, timed out
    /// while idle, or the server is shutting down between requests.
    async fn read_head(
        &mut self,
        shutdown: &mut ShutdownWatch,
    ) -> Result<Option<RequestHead>, HeadError> {
        let max_head = self.limits.max_header_bytes as usize;
        loop {
            if !self.buf.is_empty() {
                match head::parse_request(&self.buf, &mut self.spans, max_head) {
                    Ok(Some(h)) => {
                        self.head_deadline = None;
                        return Ok(Some(h));
                    }
                    Ok(None) => {}
                    Err(e) => {
                        if e.status == 431 {
                            self.counters.header_size.inc();
                        }
                        return Err(e);
                    }
                }
                // The head has started: it must be complete within the header timeout.
                if self.head_deadline.is_none() {
                    self.head_deadline =
                        Some(tokio::time::Instant::now() + self.limits.header_timeout);
                }
            }
            self.buf.reserve(4096);
            let read = match self.head_deadline {
                Some(deadline) => {
                    match tokio::time::timeout_at(deadline, self.io.read_buf(&mut self.buf)).await {
                        Ok(r) => r,
                        Err(_) => {
                            // A client too slow to send its head (or silent since it connected).
                            self.counters.header_timeout.inc();
                            if !self.buf.is_empty() {
                                // A head had started: logged as nginx does (408, nothing sent).
                                self.log_refused(408, 0);
                            }
                            return Ok(None);
                        }
                    }
                }
                // Idle between requests: a shutdown closes the connection now.
                None => {
                    let idle = self.limits.keepalive_timeout;
                    tokio::select! {
                        // The read first: the shutdown watch is only registered with when the
                        // client has nothing to read yet.
                        biased;
                        r = tokio::time::timeout(idle, self.io.read_buf(&mut self.buf)) => match r {
                            Ok(r) => r,
                            Err(_) => return Ok(None),
                        },
                        _ = shutdown.changed() => return Ok(None),
                    }
                }
            };
            match read {
                Ok(n) if n > 0 => {}
                _ => return Ok(None),
            }
        }
    }

    /// Serves one request whose head is at the start of `buf`, on `route` (`None`: no route
    /// matched).
    async fn exchange(
        &mut self,
        head: &RequestHead,
        route: Option<&Route>,
        shutdown: &ShutdownWatch,
    ) -> Next {
        let client_ip = self.client_ip_of(head);
        if let (Some(limiter), Some(ip)) = (&self.runtime.rate_limiter, client_ip) {
            if let Err(wait) = limiter.check(ip) {
                let secs = crate::rate_limit::retry_after_secs(wait);
                let body = format!("too many requests from this client; retry in {secs} s\n");
                return self.send_answer(429, Some(secs), &body, head.is_head).await;
            }
        }
        let Some(route) = route else {
            return self
                .send_error(404, "no route matches this request\n", head.is_head)
                .await;
        };
        let pool = match &route.rules.action {
            Action::Pool(pool) => pool,
            Action::Redirect(_) | Action::Respond(_) => return self.answer(head, route).await,
        };
        if pool.settings().upstream.protocol.is_h2() {
            // The lean path speaks HTTP/1 to backends only.
            return Next::HandOff;
        }
        self.rec.pool = Some(pool.clone());
        if pool.table().is_empty() {
            pool.counters.no_backend.inc();
            let reason = format!("no backend available in pool \"{}\"\n", pool.name);
            return self.send_error(503, &reason, head.is_head).await;
        }
        pool.count_request();
        if self.rec.logging {
            self.rec.generation = Some(pool.strategy.current().generation);
        }
        let policy = Policy::of(pool);
        let max_body = self.limits.max_body_bytes;
        if let BodyFraming::Length(n) = head.framing {
            if max_body > 0 && n > max_body {
                self.counters.body_size.inc();
                let reason = format!("request body of {n} bytes is over the limit of {max_body}\n");
                return self.send_error(413, &reason, false).await;
            }
        }

        // A small body is read whole first, so the request stays replayable.
        if let BodyFraming::Length(n) = head.framing {
            if n <= REPLAY_MAX && !head.expect_continue {
                let want = head.len + n as usize;
                while self.buf.len() < want {
                    self.buf.reserve(want - self.buf.len());
                    let read = self.io.read_buf(&mut self.buf);
                    match tokio::time::timeout(self.limits.body_timeout, read).await {
                        Ok(Ok(n)) if n > 0 => {}
                        Ok(_) => return Next::Close,
                        Err(_) => {
                            self.counters.body_timeout.inc();
                            return Next::Close;
                        }
                    }
                }
            }
        }
        // The body's bytes already here, and whether that is all of it.
        let mut body = BodyCursor::new(head.framing);
        let body_here = match body.advance(&self.buf[head.len..]) {
            Ok(n) => n,
            Err(_) => {
                return self
                    .send_error(400, "malformed chunked body\n", false)
                    .await
            }
        };
        let replayable = body.is_done() && !head.expect_continue;
        self.rec.body_in = body_here as u64;

        // Who the client is, and the request id, once for every attempt.
        let request_id = {
            let parsed = ParsedRequest {
                buf: &self.buf,
                head,
                headers: &self.spans,
            };
            let request_id = self
                .forwarding
                .needs_request_id(&parsed)
                .then(RequestId::generate);
            if self.rec.logging {
                self.rec.request_id = request_id.or_else(|| {
                    // The client's own id, if it fits.
                    let name = self.forwarding.request_id_name()?;
                    let mut own = None;
                    parsed.each_value(name.as_bytes(), &mut |v| {
                        own = own.or_else(|| RequestId::copy_of(v));
                    });
                    own
                });
            }
            request_id
        };

        let mut tried: Vec<SocketAddr> = Vec::new();
        let mut attempt = 0u32;
        loop {
            let picked = {
                let table = pool.table();
                let view_head = ParsedRequest {
                    buf: &self.buf,
                    head,
                    headers: &self.spans,
                };
                let excluded = |i: usize| {
                    table
                        .backends
                        .get(i)
                        .is_some_and(|b| tried.contains(&b.addr))
                };
                let view = RequestView {
                    header: &view_head,
                    client_ip,
                    excluded: &excluded,
                };
                pool.strategy
                    .pick(&table, &view, attempt)
                    .map(|i| table.backends[i].clone())
            };
            let Some(backend) = picked else {
                pool.counters.no_backend.inc();
                let (code, reason) = if tried.is_empty() {
                    (
                        503,
                        format!("no backend available in pool \"{}\"\n", pool.name),
                    )
                } else {
                    (
                        502,
                        format!(
                            "all {} backends tried in pool \"{}\" failed\n",
                            tried.len(),
                            pool.name
                        ),
                    )
                };
                return self.send_error(code, &reason, head.is_head).await;
            };
            attempt += 1;
            let may_retry = |tried: &[SocketAddr]| {
                attempt <= policy.retries && pool.table().len() > tried.len()
            };
            // A 5xx is retried only where nothing was sent downstream and the request can be
            // replayed elsewhere.
            let retry_5xx = policy.retry_on_5xx
                && replayable
                && (policy.retry_non_idempotent || head.idempotent)
                && attempt <= policy.retries
                && pool.table().len() > tried.len() + 1;
            self.rec.attempts = attempt;
            self.rec.backend = Some(backend.clone());
            let mut lease = pool.lease(backend);
            let attempt_io = Attempt {
                retry_5xx,
                body_here,
                request_id,
                rules: &route.rules,
            };
            let result = self
                .attempt(head, &mut lease, &mut body, attempt_io, &policy, shutdown)
                .await;
            self.observe_attempt(pool, lease.backend());
            let addr = lease.backend().addr;
            match result {
                Ok(next) => return next,
                Err((AttemptError::Connect { timed_out }, _)) => {
                    lease.set_outcome(Outcome::Failed);
                    drop(lease);
                    tried.push(addr);
                    if policy.retry_on_connect && may_retry(&tried) {
                        pool.counters.retry_connect.inc();
                        continue;
                    }
                    return self.gateway_error(timed_out, head.is_head).await;
                }
                Err((AttemptError::Retry5xx(status), _)) => {
                    lease.set_outcome(Outcome::Status(status));
                    drop(lease);
                    tried.push(addr);
                    pool.counters.retry_5xx.inc();
                    continue;
                }
                Err((AttemptError::NoResponse { timed_out }, reused)) => {
                    // pingora's rule: only an idempotent request is replayed after it was sent.
                    let replay = replayable && head.idempotent;
                    if reused && replay {
                        // A pooled connection the backend had closed says nothing about the
                        // backend: release the slot, record nothing, pick again.
                        drop(lease);
                        pool.counters.retry_reused.inc();
                        continue;
                    }
                    lease.set_outcome(Outcome::Failed);
                    drop(lease);
                    tried.push(addr);
                    if replay && policy.retry_on_error && may_retry(&tried) {
                        pool.counters.retry_error.inc();
                        continue;
                    }
                    return self.gateway_error(timed_out, head.is_head).await;
                }
                Err((AttemptError::BadResponse, _)) => {
                    lease.set_outcome(Outcome::Failed);
                    return self
                        .send_error(
                            502,
                            "bad gateway: the backend's response is not HTTP/1\n",
                            head.is_head,
                        )
                        .await;
                }
                Err((AttemptError::Aborted, _)) => {
                    lease.set_outcome(Outcome::Failed);
                    pool.counters.upstream_aborts.inc();
                    tracing::warn!(pool = %pool.name, backend = %lease.backend().addr_text,
                        "backend failed after the response head was sent; client connection aborted");
                    return Next::Close;
                }
                Err((AttemptError::Client, _)) => return Next::Close,
                Err((AttemptError::BodyTooLarge, _)) => {
                    // Not the backend's doing: nothing is recorded against it.
                    drop(lease);
                    self.counters.body_size.inc();
                    let reason = format!("request body is over the limit of {max_body} bytes\n");
                    return self.send_error(413, &reason, false).await;
                }
            }
        }
    }

    /// One attempt on the leased backend. `Ok` once a response was relayed; otherwise the
    /// error, with whether the upstream connection was a reused one.
    async fn attempt(
        &mut self,
        head: &RequestHead,
        lease: &mut Lease,
        body: &mut BodyCursor,
        how: Attempt<'_>,
        policy: &Policy,
        shutdown: &ShutdownWatch,
    ) -> Result<Next, (AttemptError, bool)> {
        let body_here = how.body_here;
        let backend = lease.backend().clone();
        let now = Instant::now();
        // This attempt's times replace the last one's (a failed connect leaves none).
        (self.rec.connect, self.rec.response) = (None, None);
        let (mut up, reused) = match backend.conns.take(policy.conn_key, now) {
            Some(s) => {
                self.rec.connect = Some(Duration::ZERO);
                (s, true)
            }
            None => {
                let connect = connect(backend.addr, policy.tls.as_deref());
                match tokio::time::timeout(policy.connect_timeout, connect).await {
                    Ok(Ok(s)) => {
                        self.rec.connect = Some(now.elapsed());
                        self.rec.connected_new = true;
                        (s, false)
                    }
                    Ok(Err(e)) => {
                        if let Some(e) = e.get_ref().filter(|_| policy.tls.is_some()) {
                            tracing::warn!(backend = %backend.addr_text, error = %e, "TLS handshake with the backend failed");
                        }
                        return Err((AttemptError::Connect { timed_out: false }, false));
                    }
                    Err(_) => return Err((AttemptError::Connect { timed_out: true }, false)),
                }
            }
        };
        let fail = |e: AttemptError| Err((e, reused));

        // The head, and the body bytes already read, in one write.
        self.out.clear();
        // Built from the fields (not `self.hop`) so `self.out` can be borrowed beside it.
        let hop = Hop {
            peer: self.client_ip,
            trusted: self.trusted_peer,
            scheme: self.scheme,
            host: head.host.map(|h| h.of(&self.buf)),
        };
        write_request_head(
            &mut self.out,
            &ParsedRequest {
                buf: &self.buf,
                head,
                headers: &self.spans,
            },
            self.forwarding,
            &hop,
            how.request_id.as_ref().map(RequestId::as_bytes),
            how.rules,
        );
        let mut sent_body = false;
        if !head.expect_continue {
            self.out
                .extend_from_slice(&self.buf[head.len..head.len + body_here]);
            sent_body = true;
        }
        if upstream_write(&mut up, &self.out, policy.read_timeout)
            .await
            .is_err()
        {
            return fail(AttemptError::NoResponse { timed_out: false });
        }
        let mut consumed = head.len + body_here;
        if sent_body {
            if let Err(e) = self
                .relay_request_body(&mut up, body, &mut consumed, head.len, policy)
                .await
            {
                return fail(e);
            }
        }

        // The response head; 1xx answers are relayed and the real one awaited.
        let sent_at = Instant::now();
        self.ubuf.clear();
        let resp = loop {
            let resp = match self.read_response_head(&mut up, head, policy).await {
                Ok(r) => r,
                Err(e) => return fail(e),
            };
            if (100..200).contains(&resp.status) && resp.status != 101 {
                if head.version == 1 {
                    let informational = self.ubuf.split_to(resp.len);
                    self.rec.heads_out += resp.len as u64;
                    if self.client_write(&informational).await.is_err() {
                        return fail(AttemptError::Client);
                    }
                } else {
                    self.ubuf.advance(resp.len);
                }
                if resp.status == 100 && !sent_body {
                    // The backend wants the body: what is buffered, then the rest as it comes.
                    let buffered = &self.buf[head.len..head.len + body_here];
                    if upstream_write(&mut up, buffered, policy.read_timeout)
                        .await
                        .is_err()
                    {
                        return fail(AttemptError::NoResponse { timed_out: false });
                    }
                    sent_body = true;
                    if let Err(e) = self
                        .relay_request_body(&mut up, body, &mut consumed, head.len, policy)
                        .await
                    {
                        return fail(e);
                    }
                }
                continue;
            }
            break resp;
        };

        let status = resp.status;
        self.rec.response = Some(sent_at.elapsed());
        self.rec.status = status;
        if status >= 500 && how.retry_5xx {
            // The connection is dropped with the unread body.
            return fail(AttemptError::Retry5xx(status));
        }
        lease.set_outcome(Outcome::Status(status));

        // The client's connection survives only if its request body was read whole.
        let request_done = sent_body && body.is_done();
        let close = head.close
            || resp.framing == BodyFraming::UntilClose
            || !request_done
            || *shutdown.borrow();
        let upgrade = status == 101;
        self.out.clear();
        write_response_head(
            &mut self.out,
            &self.ubuf,
            &resp,
            &self.uspans,
            close,
            head.version,
            &how.rules.response_headers,
        );
        self.rec.heads_out += self.out.len() as u64;
        self.ubuf.advance(resp.len);

        if upgrade {
            return self.tunnel(up, consumed).await.map_err(|e| (e, reused));
        }

        // Response body: what came with the head goes out with it.
        let mut rbody = BodyCursor::new(resp.framing);
        let used = match rbody.advance(&self.ubuf) {
            Ok(n) => n,
            Err(_) => return fail(AttemptError::BadResponse),
        };
        self.out.extend_from_slice(&self.ubuf[..used]);
        let extra = self.ubuf.len() > used;
        if self.client_write_out().await.is_err() {
            return fail(AttemptError::Client);
        }
        while !rbody.is_done() {
            self.ubuf.clear();
            self.ubuf.reserve(16 * 1024);
            let n = match tokio::time::timeout(policy.read_timeout, up.read_buf(&mut self.ubuf))
                .await
            {
                Ok(Ok(n)) => n,
                _ => return fail(AttemptError::Aborted),
            };
            if n == 0 {
                if matches!(rbody, BodyCursor::UntilClose) {
                    break;
                }
                return fail(AttemptError::Aborted);
            }
            let used = match rbody.advance(&self.ubuf) {
                Ok(n) => n,
                Err(_) => return fail(AttemptError::Aborted),
            };
            let chunk = self.ubuf.split_to(used);
            if self.client_write(&chunk).await.is_err() {
                return fail(AttemptError::Client);
            }
            if !self.ubuf.is_empty() {
                // Bytes after the end of the response: the connection is not clean.
                return self.finish(consumed, close);
            }
        }
        let reusable =
            !resp.close && !extra && request_done && !matches!(rbody, BodyCursor::UntilClose);
        if reusable {
            backend
                .conns
                .put(up, policy.conn_key, Instant::now(), policy.idle_timeout);
        }
        self.finish(consumed, close)
    }

    /// Ends an exchange: drops the request from the buffer.
    fn finish(&mut self, consumed: usize, close: bool) -> Result<Next, (AttemptError, bool)> {
        self.buf.advance(consumed.min(self.buf.len()));
        Ok(if close { Next::Close } else { Next::KeepAlive })
    }

    /// Relays the rest of a request body from the client to the backend, once what was buffered
    /// has been sent; nothing when the body was whole in the buffer (which then stays, so the
    /// request can be replayed). Bytes after the body (a pipelined request) stay in `buf`.
    async fn relay_request_body(
        &mut self,
        up: &mut UpstreamConn,
        body: &mut BodyCursor,
        consumed: &mut usize,
        head_len: usize,
        policy: &Policy,
    ) -> Result<(), AttemptError> {
        if body.is_done() {
            return Ok(());
        }
        // A large or streamed body: no replay after this.
        // Whatever of the body was buffered has been sent.
        let mut relayed = (*consumed).saturating_sub(head_len) as u64;
        self.buf.advance(*consumed);
        *consumed = 0;
        let max_body = self.limits.max_body_bytes;
        while !body.is_done() {
            if self.buf.is_empty() {
                self.buf.reserve(16 * 1024);
                let read = self.io.read_buf(&mut self.buf);
                match tokio::time::timeout(self.limits.body_timeout, read).await {
                    Ok(Ok(n)) if n > 0 => {}
                    Ok(_) => return Err(AttemptError::Client),
                    Err(_) => {
                        self.counters.body_timeout.inc();
                        return Err(AttemptError::Client);
                    }
                }
            }
            let used = body.advance(&self.buf).map_err(|_| AttemptError::Client)?;
            relayed += used as u64;
            self.rec.body_in += used as u64;
            if max_body > 0 && relayed > max_body {
                // Counted on the wire (chunk framing included), so a chunked body is cut a
                // little before its data reaches the limit.
                return Err(AttemptError::BodyTooLarge);
            }
            let chunk = self.buf.split_to(used);
            upstream_write(up, &chunk, policy.read_timeout)
                .await
                .map_err(|_| AttemptError::NoResponse { timed_out: false })?;
        }
        Ok(())
    }

    /// Reads a response head into `ubuf` (which may already hold the start of one).
    async fn read_response_head(
        &mut self,
        up: &mut UpstreamConn,
        req: &RequestHead,
        policy: &Policy,
    ) -> Result<ResponseHead, AttemptError> {
        loop {
            if !self.ubuf.is_empty() {
                match head::parse_response(
                    &self.ubuf,
                    &mut self.uspans,
                    req.is_head,
                    MAX_RESPONSE_HEAD,
                ) {
                    Ok(Some(r)) => return Ok(r),
                    Ok(None) => {}
                    Err(_) => return Err(AttemptError::BadResponse),
                }
            }
            self.ubuf.reserve(16 * 1024);
            match tokio::time::timeout(policy.read_timeout, up.read_buf(&mut self.ubuf)).await {
                Ok(Ok(n)) if n > 0 => {}
                Ok(_) => return Err(AttemptError::NoResponse { timed_out: false }),
                Err(_) => return Err(AttemptError::NoResponse { timed_out: true }),
            }
        }
    }

    /// After a `101 Switching Protocols`: the response head goes out, then bytes flow both ways
    /// until either side closes.
    async fn tunnel(
        &mut self,
        mut up: UpstreamConn,
        consumed: usize,
    ) -> Result<Next, AttemptError> {
        // Whatever either side sent after its head belongs to the new protocol.
        self.out.extend_from_slice(&self.ubuf);
        self.ubuf.clear();
        if self.client_write_out().await.is_err() {
            return Err(AttemptError::Client);
        }
        self.buf.advance(consumed.min(self.buf.len()));
        if !self.buf.is_empty() {
            if up.write_all(&self.buf).await.is_err() || up.flush().await.is_err() {
                return Ok(Next::Close);
            }
            self.buf.clear();
        }
        // The upgraded protocol's bytes count as body (what a broken tunnel moved is not known).
        if let Ok((client_to_up, up_to_client)) =
            tokio::io::copy_bidirectional(&mut self.io, &mut up).await
        {
            self.rec.body_in += client_to_up;
            self.bytes_out += up_to_client;
        }
        Ok(Next::Close)
    }

    async fn client_write_out(&mut self) -> std::io::Result<()> {
        let out = std::mem::take(&mut self.out);
        let r = self.client_write(&out).await;
        self.out = out;
        r
    }

    async fn client_write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.bytes_out += bytes.len() as u64;
        let io = &mut self.io;
        match tokio::time::timeout(CLIENT_WRITE_TIMEOUT, async {
            io.write_all(bytes).await?;
            io.flush().await
        })
        .await
        {
            Ok(r) => r,
            Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
        }
    }

    /// Answers a request on a route that redirects or responds by itself. The connection stays
    /// open when the request's body (if any) is already read whole; otherwise it closes.
    async fn answer(&mut self, head: &RequestHead, route: &Route) -> Next {
        use std::io::Write;
        let mut body = BodyCursor::new(head.framing);
        let body_here = body.advance(&self.buf[head.len..]).unwrap_or(0);
        let close = head.close || !body.is_done() || head.upgrade;
        let edits = &route.rules.response_headers;
        let (status, fixed_body): (u16, &[u8]) = match &route.rules.action {
            Action::Redirect(r) => (r.status, b""),
            Action::Respond(f) => (f.status, &f.body),
            Action::Pool(_) => (500, b""),
        };
        self.rec.status = status;
        self.rec.body_in = body_here as u64;
        self.out.clear();
        let _ = write!(
            self.out,
            "HTTP/1.1 {status} {}\r\n",
            http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or("")
        );
        match &route.rules.action {
            Action::Redirect(r) if !edits.drops(b"location") => {
                self.out.extend_from_slice(b"Location: ");
                let host = head.host.map(|h| h.of(&self.buf));
                let target = match head.path_and_query.of(&self.buf) {
                    b"" => b"/".as_slice(),
                    pq => pq,
                };
                if !r.location(self.scheme, host, target, &mut self.out) {
                    return self
                        .send_error(
                            400,
                            "the request has no host to redirect to\n",
                            head.is_head,
                        )
                        .await;
                }
                self.out.extend_from_slice(b"\r\n");
            }
            Action::Respond(f) => {
                if let Some(t) = f
                    .content_type
                    .as_ref()
                    .filter(|_| !edits.drops(b"content-type"))
                {
                    put_header(&mut self.out, b"Content-Type", t.as_bytes());
                }
            }
            _ => {}
        }
        let _ = write!(self.out, "Content-Length: {}\r\n", fixed_body.len());
        put_fields(&mut self.out, edits);
        if close {
            self.out.extend_from_slice(b"Connection: close\r\n");
        } else if head.version == 0 {
            self.out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
        self.rec.heads_out += self.out.len() as u64;
        if !head.is_head {
            self.out.extend_from_slice(fixed_body);
        }
        let sent = self.client_write_out().await.is_ok();
        if close {
            if sent {
                let _ = self.io.shutdown().await;
                self.linger().await;
            }
            return Next::Close;
        }
        if !sent {
            return Next::Close;
        }
        self.buf.advance(head.len + body_here);
        Next::KeepAlive
    }

    /// Answers with a short plain-text error and closes (the request's body, if any, is not
    /// read). Returns [`Next::Close`].
    async fn send_error(&mut self, status: u16, body: &str, head_request: bool) -> Next {
        self.send_answer(status, None, body, head_request).await
    }

    /// [`Conn::send_error`], with a `Retry-After` of `retry_after` seconds when given.
    async fn send_answer(
        &mut self,
        status: u16,
        retry_after: Option<u64>,
        body: &str,
        head_request: bool,
    ) -> Next {
        use std::io::Write;
        self.rec.status = status;
        self.out.clear();
        let _ = write!(
            self.out,
            "HTTP/1.1 {status} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n",
            http::StatusCode::from_u16(status)
                .ok()
                .and_then(|s| s.canonical_reason())
                .unwrap_or(""),
            body.len()
        );
        if let Some(secs) = retry_after {
            let _ = write!(self.out, "retry-after: {secs}\r\n");
        }
        self.out.extend_from_slice(b"\r\n");
        self.rec.heads_out += self.out.len() as u64;
        if !head_request {
            self.out.extend_from_slice(body.as_bytes());
        }
        if self.client_write_out().await.is_ok() {
            let _ = self.io.shutdown().await;
            self.linger().await;
        }
        Next::Close
    }

    /// The answer when the backend failed (502) or did not answer in time (504).
    async fn gateway_error(&mut self, timed_out: bool, head_request: bool) -> Next {
        if timed_out {
            self.send_error(504, "gateway timeout\n", head_request)
                .await
        } else {
            self.send_error(502, "bad gateway: the backend failed\n", head_request)
                .await
        }
    }

    /// After an error answer, reads and discards what the client is still sending (a body sluice
    /// refused), for a moment and up to a bound, before closing. Closing with unread data makes
    /// the kernel send a reset, which can destroy the answer before the client reads it.
    async fn linger(&mut self) {
        let deadline = tokio::time::Instant::now() + LINGER_TIME;
        let mut drained = 0;
        let mut sink = [0u8; 8192];
        while drained < LINGER_BYTES {
            match tokio::time::timeout_at(deadline, self.io.read(&mut sink)).await {
                Ok(Ok(n)) if n > 0 => drained += n,
                _ => return,
            }
        }
    }
}

/// How long, and how much, a refused request's body is read and dropped before the connection
/// (or HTTP/2 stream) is closed.
pub(crate) const LINGER_TIME: Duration = Duration::from_secs(2);
pub(crate) const LINGER_BYTES: usize = 1 << 20;

async fn upstream_write(
    up: &mut UpstreamConn,
    bytes: &[u8],
    limit: Duration,
) -> std::io::Result<()> {
    let write = async {
        up.write_all(bytes).await?;
        // TLS buffers what is written until flushed; plain TCP's flush does nothing.
        up.flush().await
    };
    match tokio::time::timeout(limit, write).await {
        Ok(r) => r,
        Err(_) => Err(std::io::ErrorKind::TimedOut.into()),
    }
}

/// A new connection to `addr`, over TLS when the pool has it (the handshake checks the
/// backend's certificate as `[pool.tls]` says).
async fn connect(addr: SocketAddr, tls: Option<&UpstreamTls>) -> std::io::Result<UpstreamConn> {
    let tcp = TcpStream::connect(addr).await?;
    let _ = tcp.set_nodelay(true);
    let Some(tls) = tls else {
        return Ok(UpstreamConn::Plain(tcp));
    };
    let connector = pingora::tls::TlsConnector::from(tls.http1.clone());
    let stream = connector.connect(tls.server_name(addr.ip()), tcp).await?;
    Ok(UpstreamConn::Tls(Box::new(stream)))
}

/// The request head as sent upstream: the request line and headers as parsed, without the
/// hop-by-hop headers (the upstream connection is sluice's own and kept alive) except those an
/// upgrade needs, and with the forwarding headers rewritten by `fwd`'s rules.
fn write_request_head(
    out: &mut Vec<u8>,
    req: &ParsedRequest<'_>,
    fwd: &Forwarding,
    hop: &Hop<'_>,
    request_id: Option<&[u8]>,
    rules: &Rules<Arc<Pool>>,
) {
    let (buf, head) = (req.buf, req.head);
    out.extend_from_slice(head.method.of(buf));
    out.push(b' ');
    match rules.rewrite.as_ref().and_then(|r| r.apply(head.path(buf))) {
        Some((prefix, rest)) => {
            // The rewritten path, in origin form, with the query kept.
            out.extend_from_slice(prefix);
            out.extend_from_slice(rest);
            if let Some(q) = head.query(buf) {
                out.push(b'?');
                out.extend_from_slice(q);
            }
        }
        None => out.extend_from_slice(head.target.of(buf)),
    }
    out.extend_from_slice(if head.version == 0 {
        b" HTTP/1.0\r\n"
    } else {
        b" HTTP/1.1\r\n"
    });
    for h in req.headers {
        let name = h.name.of(buf);
        if is_hop_by_hop(name) && !(head.upgrade && name_is(name, b"connection")) {
            continue;
        }
        if fwd.rewrites(name) || rules.request_headers.drops(name) {
            continue;
        }
        // Headers the client named in `Connection` were for sluice only (the upgrade's own
        // `Upgrade` header goes on).
        if head.connection_lists
            && !(head.upgrade && name_is(name, b"upgrade"))
            && head::listed_in_connection(buf, req.headers, name)
        {
            continue;
        }
        put_header(out, name, h.value.of(buf));
    }
    fwd.write(hop, req, request_id, &mut HeadWriter(out));
    put_fields(out, &rules.request_headers);
    if head.version == 0 {
        // HTTP/1.0 closes by default; sluice keeps its upstream connections.
        out.extend_from_slice(b"Connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

/// The response head as sent downstream: status line normalised to HTTP/1.1, the backend's
/// headers without its hop-by-hop ones, and sluice's own `Connection` for the client.
fn write_response_head(
    out: &mut Vec<u8>,
    buf: &[u8],
    resp: &ResponseHead,
    spans: &[HeaderSpan],
    close: bool,
    client_version: u8,
    edits: &HeaderEdits,
) {
    let upgrade = resp.status == 101;
    let s = resp.status;
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(&[
        b'0' + (s / 100 % 10) as u8,
        b'0' + (s / 10 % 10) as u8,
        b'0' + (s % 10) as u8,
        b' ',
    ]);
    out.extend_from_slice(resp.reason.of(buf));
    out.extend_from_slice(b"\r\n");
    for h in spans {
        let name = h.name.of(buf);
        if is_hop_by_hop(name) && !(upgrade && name_is(name, b"connection")) {
            continue;
        }
        if resp.framing == BodyFraming::Chunked && name_is(name, b"content-length") {
            continue;
        }
        if edits.drops(name) {
            continue;
        }
        if resp.connection_lists
            && !(upgrade && name_is(name, b"upgrade"))
            && head::listed_in_connection(buf, spans, name)
        {
            continue;
        }
        put_header(out, name, h.value.of(buf));
    }
    put_fields(out, edits);
    if !upgrade {
        if close {
            out.extend_from_slice(b"Connection: close\r\n");
        } else if client_version == 0 {
            out.extend_from_slice(b"Connection: keep-alive\r\n");
        }
    }
    out.extend_from_slice(b"\r\n");
}

/// The fields a route's header edits add (`set`, then `add`).
fn put_fields(out: &mut Vec<u8>, edits: &HeaderEdits) {
    for (name, value) in edits.fields() {
        put_header(out, name.as_str().as_bytes(), value.as_bytes());
    }
}

fn put_header(out: &mut Vec<u8>, name: &[u8], value: &[u8]) {
    out.extend_from_slice(name);
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}
