//! Idle upstream connections, kept per backend and per worker thread.
//!
//! Each worker thread runs its own single-threaded runtime, and a connection belongs to the
//! runtime that opened it, so each thread keeps its own idle list: taking and returning a
//! connection touches no shared state and no lock. Lists live in the backend, so a backend that
//! leaves its pool closes its idle connections when the last table holding it is dropped.
//!
//! There is no per-connection watcher task: a connection the backend closed while idle is found
//! when it is taken (tokio records the peer's FIN as read readiness, so checking costs no system
//! call for a connection that is still open). Connections idle past their pool's `idle_timeout`
//! are closed by one sweeper task per worker thread, once a second, or when met on taking.
//!
//! Each connection is kept under its pool's connection key ([`crate::upstream_tls::Upstream::conn_key`]):
//! a connection made with one protocol or TLS identity is never handed to a request made under
//! another (after a reload that changed them).

use std::cell::RefCell;
use std::io::Read;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use thread_local::ThreadLocal;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// A connection to a backend: plain TCP, or TLS over it.
pub enum UpstreamConn {
    /// HTTP in plain text.
    Plain(TcpStream),
    /// HTTPS (boxed: the TLS state is large, and made once per connection, not per request).
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl UpstreamConn {
    /// True when the backend closed the connection, sent something nobody asked for, or it
    /// broke: it must not be reused. Costs no system call while the connection is quiet.
    fn is_stale(&mut self) -> bool {
        let mut probe = [0u8; 1];
        let tcp = match self {
            UpstreamConn::Plain(s) => s,
            UpstreamConn::Tls(s) => {
                // Decrypted bytes already buffered count as unasked-for data too.
                let (tcp, tls) = s.get_mut();
                match tls.reader().read(&mut probe) {
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
                    _ => return true,
                }
                tcp
            }
        };
        !matches!(tcp.try_read(&mut probe), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
    }
}

impl AsyncRead for UpstreamConn {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamConn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamConn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamConn {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            UpstreamConn::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamConn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamConn::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamConn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            UpstreamConn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamConn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Idle connections kept per backend per worker thread; more are closed when returned.
pub const MAX_IDLE_PER_THREAD: usize = 128;
/// How often each worker thread closes its expired idle connections.
pub const SWEEP_PERIOD: Duration = Duration::from_secs(1);

struct Idle {
    stream: UpstreamConn,
    key: u64,
    expires: Instant,
}

/// The idle connections to one backend.
#[derive(Default)]
pub struct IdleConns {
    per_thread: ThreadLocal<RefCell<Vec<Idle>>>,
}

impl std::fmt::Debug for IdleConns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdleConns").finish_non_exhaustive()
    }
}

thread_local! {
    /// The idle lists this thread has put connections in, for its sweeper; `None` until the
    /// sweeper is started.
    static SWEEP: RefCell<Option<Vec<Weak<IdleConns>>>> = const { RefCell::new(None) };
}

impl IdleConns {
    /// The most recently returned connection of this thread kept under `key` that is still
    /// open and not expired; stale ones met on the way are closed.
    pub fn take(&self, key: u64, now: Instant) -> Option<UpstreamConn> {
        let list = self.per_thread.get()?;
        let mut list = list.borrow_mut();
        while let Some(mut idle) = list.pop() {
            // Closed (0), broken, data nobody asked for, or made under other settings.
            if now >= idle.expires || idle.key != key || idle.stream.is_stale() {
                continue;
            }
            return Some(idle.stream);
        }
        None
    }

    /// Keeps `stream`, made under connection key `key`, for reuse by this thread until
    /// `now + max_idle` (closes it when the thread's list is full). Must run inside the worker's
    /// tokio runtime: the first call on a thread starts its sweeper there.
    pub fn put(self: &Arc<Self>, stream: UpstreamConn, key: u64, now: Instant, max_idle: Duration) {
        let mut fresh = false;
        let list = self.per_thread.get_or(|| {
            fresh = true;
            RefCell::new(Vec::new())
        });
        let mut list = list.borrow_mut();
        if list.len() < MAX_IDLE_PER_THREAD {
            list.push(Idle {
                stream,
                key,
                expires: now + max_idle,
            });
        }
        drop(list);
        if fresh {
            register_for_sweep(Arc::downgrade(self));
        }
    }

    /// Closes this thread's connections that expired by `now`.
    fn sweep_here(&self, now: Instant) {
        if let Some(list) = self.per_thread.get() {
            list.borrow_mut().retain(|i| i.expires > now);
        }
    }

    /// Idle connections kept by this thread.
    pub fn len_here(&self) -> usize {
        self.per_thread.get().map_or(0, |l| l.borrow().len())
    }
}

fn register_for_sweep(conns: Weak<IdleConns>) {
    let start = SWEEP.with(|s| {
        let mut s = s.borrow_mut();
        let start = s.is_none();
        s.get_or_insert_with(Vec::new).push(conns);
        start
    });
    if start {
        // The task stays on this thread: each worker runs a single-threaded runtime.
        tokio::spawn(async {
            let mut tick = tokio::time::interval(SWEEP_PERIOD);
            loop {
                tick.tick().await;
                sweep_thread(Instant::now());
            }
        });
    }
}

/// Closes this thread's expired connections and forgets lists whose backend is gone.
fn sweep_thread(now: Instant) {
    SWEEP.with(|s| {
        if let Some(lists) = s.borrow_mut().as_mut() {
            lists.retain(|w| match w.upgrade() {
                Some(conns) => {
                    conns.sweep_here(now);
                    true
                }
                None => false,
            });
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn open_connections_are_reused_closed_and_expired_ones_are_not() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = Arc::new(IdleConns::default());
        let ttl = Duration::from_secs(60);
        let t0 = Instant::now();

        let conn = |s| UpstreamConn::Plain(s);
        let a = TcpStream::connect(addr).await.unwrap();
        let _a_peer = listener.accept().await.unwrap();
        pool.put(conn(a), 0, t0, ttl);
        assert!(pool.take(7, t0).is_none(), "kept under another key: closed");
        let a = TcpStream::connect(addr).await.unwrap();
        let _a_peer = listener.accept().await.unwrap();
        pool.put(conn(a), 0, t0, ttl);
        assert!(pool.take(0, t0).is_some(), "open: reused");
        assert_eq!(pool.len_here(), 0);

        let b = TcpStream::connect(addr).await.unwrap();
        let (b_peer, _) = listener.accept().await.unwrap();
        drop(b_peer);
        // The FIN arrives while the connection is idle: tokio marks it readable.
        b.readable().await.unwrap();
        pool.put(conn(b), 0, t0, ttl);
        assert!(
            pool.take(0, t0).is_none(),
            "a connection the backend closed was handed out"
        );

        let c = TcpStream::connect(addr).await.unwrap();
        let _c_peer = listener.accept().await.unwrap();
        pool.put(conn(c), 0, t0, ttl);
        let later = t0 + Duration::from_secs(61);
        assert!(pool.take(0, later).is_none(), "expired");
        assert_eq!(pool.len_here(), 0);

        // The sweeper closes expired connections nobody takes.
        let d = TcpStream::connect(addr).await.unwrap();
        let _d_peer = listener.accept().await.unwrap();
        pool.put(conn(d), 0, t0, ttl);
        sweep_thread(t0 + Duration::from_secs(59));
        assert_eq!(pool.len_here(), 1);
        sweep_thread(later);
        assert_eq!(pool.len_here(), 0);
    }
}
