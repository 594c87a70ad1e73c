//! A client connection handed to pingora-proxy's HTTP/1 engine, with what the lean path adds to
//! it:
//! - bytes the lean path already read are served again first (pingora 0.9's `Stream` has no way
//!   to give bytes back), then the connection itself;
//! - a whole-head deadline: pingora times each *read* of a request head, so a client sending one
//!   byte at a time would never be cut off. [`HeadClock`] watches the bytes go by and fails
//!   the read once a head has taken longer than `header_timeout`, as the lean path does.
//!
//! Every other trait pingora asks of a connection (TLS details, digests, shutdown) is forwarded
//! to the connection.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use async_trait::async_trait;
use bytes::{Buf, BytesMut};
use pingora::protocols::raw_connect::ProxyDigest;
use pingora::protocols::tls::{SslDigest, TlsRef};
use pingora::protocols::{
    GetProxyDigest, GetSocketDigest, GetTimingDigest, Peek, Shutdown, SocketDigest, Ssl, Stream,
    TimingDigest, UniqueID, UniqueIDType, ALPN,
};
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// `inner` with `read` in front of it, and optionally a whole-head deadline.
pub struct Rewound {
    read: BytesMut,
    inner: Stream,
    head: Option<HeadClock>,
}

impl Rewound {
    /// A connection whose next reads return `read`, then what `inner` receives.
    pub fn new(read: BytesMut, inner: Stream) -> Rewound {
        Rewound {
            read,
            inner,
            head: None,
        }
    }

    /// Each request head read through this connection must be complete within `limit` of its
    /// first byte (the first one: of the connection being accepted); a late one fails the read
    /// (pingora then closes the connection) and counts in `timeouts`.
    pub fn with_head_deadline(mut self, limit: Duration, timeouts: IntCounter) -> Rewound {
        self.head = Some(HeadClock::new(limit, timeouts));
        self
    }
}

/// Where a connection is in its request/response cycle, as far as its bytes tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    /// Reading a request head: the deadline runs.
    Head,
    /// The head is complete: the body (if any) is pingora's `body_timeout`'s business.
    Body,
    /// A final response is being written; the next request's first byte restarts the clock.
    /// (The wait for it is the keep-alive timeout's business.)
    Answered,
    /// `101 Switching Protocols` was sent: the bytes are no longer HTTP/1.
    Tunnel,
    /// The deadline passed: every further read fails.
    Expired,
}

/// The whole-head deadline. It does not parse HTTP: a head ends at the first empty line
/// (`\n\n` or `\n\r\n`, the ends httparse accepts), and a response is recognised by the status
/// line pingora writes in one piece. The one guess it makes: after a response, bytes that do not
/// start like a request line (a method's capital letter, or the empty lines RFC 9112 lets a client
/// send first) are taken as the rest of a body the backend answered early, and are not timed.
struct HeadClock {
    limit: Duration,
    phase: Phase,
    /// The last head byte seen (CRs skipped) was a line feed.
    at_line_start: bool,
    /// The request line has begun.
    started: bool,
    deadline: Pin<Box<Sleep>>,
    timeouts: IntCounter,
}

impl HeadClock {
    fn new(limit: Duration, timeouts: IntCounter) -> HeadClock {
        HeadClock {
            limit,
            phase: Phase::Head,
            at_line_start: false,
            started: false,
            deadline: Box::pin(tokio::time::sleep(limit)),
            timeouts,
        }
    }

    /// Checked before a read: the error to return when the head is late.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Option<std::io::Error> {
        let late = match self.phase {
            Phase::Head => self.deadline.as_mut().poll(cx).is_ready(),
            Phase::Expired => true,
            _ => false,
        };
        if !late {
            return None;
        }
        if self.phase == Phase::Head {
            self.timeouts.inc();
            self.phase = Phase::Expired;
        }
        Some(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            "request head not complete within header_timeout",
        ))
    }

    /// Bytes the client sent, in order.
    fn received(&mut self, bytes: &[u8]) {
        if self.phase == Phase::Answered {
            match bytes.first() {
                Some(b) if b.is_ascii_uppercase() || *b == b'\r' || *b == b'\n' => {
                    self.phase = Phase::Head;
                    self.at_line_start = false;
                    self.started = false;
                    let next = Instant::now() + self.limit;
                    self.deadline.as_mut().reset(next);
                }
                _ => return,
            }
        }
        if self.phase != Phase::Head {
            return;
        }
        for &b in bytes {
            match b {
                // An empty line ends the head, once the request line has begun (empty lines
                // before it are allowed).
                b'\n' if self.at_line_start && self.started => {
                    self.phase = Phase::Body;
                    return;
                }
                b'\n' => self.at_line_start = true,
                b'\r' => {}
                _ => {
                    self.at_line_start = false;
                    self.started = true;
                }
            }
        }
    }

    /// Bytes the proxy sends, in order.
    fn sent(&mut self, bytes: &[u8]) {
        if !matches!(self.phase, Phase::Head | Phase::Body) {
            return;
        }
        // "HTTP/1.1 101 ..." — the status code is bytes 9..12.
        match bytes.get(9..12) {
            Some(b"101") => self.phase = Phase::Tunnel,
            // 100 Continue and other informational answers: the request goes on.
            Some([b'1', _, _]) => {}
            _ => self.phase = Phase::Answered,
        }
    }
}

impl std::fmt::Debug for Rewound {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rewound")
            .field("read", &self.read.len())
            .field("phase", &self.head.as_ref().map(|h| h.phase))
            .field("inner", &self.inner)
            .finish()
    }
}

impl AsyncRead for Rewound {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        if let Some(e) = this.head.as_mut().and_then(|h| h.poll_expired(cx)) {
            return Poll::Ready(Err(e));
        }
        let before = buf.filled().len();
        let polled = if this.read.is_empty() {
            Pin::new(&mut this.inner).poll_read(cx, buf)
        } else {
            let n = this.read.len().min(buf.remaining());
            buf.put_slice(&this.read[..n]);
            this.read.advance(n);
            Poll::Ready(Ok(()))
        };
        if let (Some(head), Poll::Ready(Ok(()))) = (this.head.as_mut(), &polled) {
            head.received(&buf.filled()[before..]);
        }
        polled
    }
}

impl AsyncWrite for Rewound {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let Some(head) = this.head.as_mut() {
            head.sent(buf);
        }
        Pin::new(&mut this.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        if let (Some(head), Some(first)) = (this.head.as_mut(), bufs.iter().find(|b| !b.is_empty()))
        {
            head.sent(first);
        }
        Pin::new(&mut this.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[async_trait]
impl Shutdown for Rewound {
    async fn shutdown(&mut self) {
        self.inner.shutdown().await
    }
}

impl UniqueID for Rewound {
    fn id(&self) -> UniqueIDType {
        self.inner.id()
    }
}

impl Ssl for Rewound {
    fn get_ssl(&self) -> Option<&TlsRef> {
        self.inner.get_ssl()
    }
    fn get_ssl_digest(&self) -> Option<Arc<SslDigest>> {
        self.inner.get_ssl_digest()
    }
    fn selected_alpn_proto(&self) -> Option<ALPN> {
        self.inner.selected_alpn_proto()
    }
}

impl GetTimingDigest for Rewound {
    fn get_timing_digest(&self) -> Vec<Option<TimingDigest>> {
        self.inner.get_timing_digest()
    }
    fn get_read_pending_time(&self) -> Duration {
        self.inner.get_read_pending_time()
    }
    fn get_write_pending_time(&self) -> Duration {
        self.inner.get_write_pending_time()
    }
}

impl GetProxyDigest for Rewound {
    fn get_proxy_digest(&self) -> Option<Arc<ProxyDigest>> {
        self.inner.get_proxy_digest()
    }
    fn set_proxy_digest(&mut self, digest: ProxyDigest) {
        self.inner.set_proxy_digest(digest)
    }
}

impl GetSocketDigest for Rewound {
    fn get_socket_digest(&self) -> Option<Arc<SocketDigest>> {
        self.inner.get_socket_digest()
    }
    fn set_socket_digest(&mut self, digest: SocketDigest) {
        self.inner.set_socket_digest(digest)
    }
}

#[async_trait]
impl Peek for Rewound {
    /// Peeks at the bytes given back. They are an HTTP/1 request, so what pingora peeks for
    /// (the HTTP/2 preface) is never there; a short request is padded with zeros, which do not
    /// match it either. (Saying "cannot peek" would make pingora assume HTTP/2.)
    async fn try_peek(&mut self, buf: &mut [u8]) -> std::io::Result<bool> {
        if self.read.is_empty() {
            return self.inner.try_peek(buf).await;
        }
        let n = self.read.len().min(buf.len());
        buf[..n].copy_from_slice(&self.read[..n]);
        buf[n..].fill(0);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn clock() -> HeadClock {
        clock_for(Duration::from_secs(5))
    }

    fn clock_for(limit: Duration) -> HeadClock {
        HeadClock::new(limit, IntCounter::new("t", "t").unwrap())
    }

    #[tokio::test]
    async fn a_head_ends_at_its_empty_line_even_when_split_across_reads() {
        let mut c = clock();
        for piece in [&b"\r\nGET / HTTP/1.1\r"[..], b"\nHost: a\r\n", b"\r", b"\n"] {
            assert_eq!(c.phase, Phase::Head);
            c.received(piece);
        }
        assert_eq!(c.phase, Phase::Body);
        // LF-only line ends, as httparse accepts.
        let mut c = clock();
        c.received(b"GET / HTTP/1.1\nHost: a\n\n");
        assert_eq!(c.phase, Phase::Body);
    }

    #[tokio::test]
    async fn the_next_request_restarts_the_clock_and_a_late_body_does_not() {
        let mut c = clock();
        c.received(b"GET / HTTP/1.1\r\nHost: a\r\n\r\n");
        c.sent(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok");
        assert_eq!(c.phase, Phase::Answered);
        // The rest of a body the backend answered early is not a head.
        c.received(b"\x00\x01binary");
        assert_eq!(c.phase, Phase::Answered);
        c.received(b"POST /next HTTP/1.1\r\n");
        assert_eq!(c.phase, Phase::Head);
        c.received(b"\r\n");
        assert_eq!(c.phase, Phase::Body);
    }

    #[tokio::test]
    async fn informational_answers_keep_the_request_going_and_101_ends_http() {
        let mut c = clock();
        c.received(b"PUT / HTTP/1.1\r\nExpect: 100-continue\r\n\r\n");
        c.sent(b"HTTP/1.1 100 Continue\r\n\r\n");
        assert_eq!(c.phase, Phase::Body);
        c.received(b"body bytes\n\nwith empty lines");
        assert_eq!(c.phase, Phase::Body);
        let mut c = clock();
        c.received(b"GET /ws HTTP/1.1\r\nUpgrade: websocket\r\n\r\n");
        c.sent(b"HTTP/1.1 101 Switching Protocols\r\n\r\n");
        assert_eq!(c.phase, Phase::Tunnel);
        c.received(b"GET frames that look like a request");
        assert_eq!(c.phase, Phase::Tunnel);
    }

    #[tokio::test]
    async fn a_late_head_fails_every_read_and_is_counted_once() {
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut c = clock_for(Duration::from_secs(3600));
        c.received(b"GET / HT");
        assert!(c.poll_expired(&mut cx).is_none());
        // Waiting on the deadline itself: past it, exactly (a finished Sleep stays ready).
        let mut c = clock_for(Duration::from_millis(1));
        c.received(b"GET / HT");
        c.deadline.as_mut().await;
        assert!(c.poll_expired(&mut cx).is_some());
        assert!(c.poll_expired(&mut cx).is_some());
        assert_eq!(c.timeouts.get(), 1);
        // Once a head is complete, its clock no longer matters.
        let mut c = clock_for(Duration::from_millis(1));
        c.received(b"GET / HTTP/1.1\r\n\r\n");
        c.deadline.as_mut().await;
        assert!(c.poll_expired(&mut cx).is_none());
    }
}
