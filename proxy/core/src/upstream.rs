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

use std::cell::RefCell;
use std::sync::{Arc, Weak};
use std::time::{Duration, Instant};

use thread_local::ThreadLocal;
use tokio::net::TcpStream;

/// Idle connections kept per backend per worker thread; more are closed when returned.
pub const MAX_IDLE_PER_THREAD: usize = 128;
/// How often each worker thread closes its expired idle connections.
pub const SWEEP_PERIOD: Duration = Duration::from_secs(1);

struct Idle {
    stream: TcpStream,
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
    /// The most recently returned connection of this thread that is still open and not
    /// expired; stale ones met on the way are closed.
    pub fn take(&self, now: Instant) -> Option<TcpStream> {
        let list = self.per_thread.get()?;
        let mut list = list.borrow_mut();
        while let Some(idle) = list.pop() {
            if now >= idle.expires {
                continue;
            }
            let mut probe = [0u8; 1];
            match idle.stream.try_read(&mut probe) {
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Some(idle.stream),
                // Closed (0), broken, or data nobody asked for: not reusable.
                _ => continue,
            }
        }
        None
    }

    /// Keeps `stream` for reuse by this thread until `now + max_idle` (closes it when the
    /// thread's list is full). Must run inside the worker's tokio runtime: the first call on a
    /// thread starts its sweeper there.
    pub fn put(self: &Arc<Self>, stream: TcpStream, now: Instant, max_idle: Duration) {
        let mut fresh = false;
        let list = self.per_thread.get_or(|| {
            fresh = true;
            RefCell::new(Vec::new())
        });
        let mut list = list.borrow_mut();
        if list.len() < MAX_IDLE_PER_THREAD {
            list.push(Idle {
                stream,
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

        let a = TcpStream::connect(addr).await.unwrap();
        let _a_peer = listener.accept().await.unwrap();
        pool.put(a, t0, ttl);
        assert!(pool.take(t0).is_some(), "open: reused");
        assert_eq!(pool.len_here(), 0);

        let b = TcpStream::connect(addr).await.unwrap();
        let (b_peer, _) = listener.accept().await.unwrap();
        drop(b_peer);
        // The FIN arrives while the connection is idle: tokio marks it readable.
        b.readable().await.unwrap();
        pool.put(b, t0, ttl);
        assert!(
            pool.take(t0).is_none(),
            "a connection the backend closed was handed out"
        );

        let c = TcpStream::connect(addr).await.unwrap();
        let _c_peer = listener.accept().await.unwrap();
        pool.put(c, t0, ttl);
        let later = t0 + Duration::from_secs(61);
        assert!(pool.take(later).is_none(), "expired");
        assert_eq!(pool.len_here(), 0);

        // The sweeper closes expired connections nobody takes.
        let d = TcpStream::connect(addr).await.unwrap();
        let _d_peer = listener.accept().await.unwrap();
        pool.put(d, t0, ttl);
        sweep_thread(t0 + Duration::from_secs(59));
        assert_eq!(pool.len_here(), 1);
        sweep_thread(later);
        assert_eq!(pool.len_here(), 0);
    }
}
