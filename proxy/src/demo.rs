//! Demo backends: tiny HTTP/1.1 servers that answer with their own name. Used by `sluice demo`
//! and by the test suite as real backends on loopback.
//!
//! Written on tokio and sluice's one HTTP/1 parser ([`crate::http1`]) rather than a full HTTP
//! server crate: it needs keep-alive and fixed responses only, and a second HTTP stack would
//! lengthen every build.

use std::sync::atomic::{AtomicU16, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::http1::{self, ChunkedDecoder, Framing};

/// Behaviour of a demo backend, adjustable while it runs.
#[derive(Debug)]
pub struct DemoBackend {
    /// Name returned in the body and the `x-backend` header.
    pub name: String,
    /// Status code of responses (200 unless changed).
    pub status: AtomicU16,
    /// Delay before each response, in milliseconds.
    pub delay_ms: AtomicU64,
    /// Requests served (all paths, health probes included).
    pub served: AtomicU64,
    /// Load reported at `/status`, in thousandths (a JSON document `{"status":"ok","load":0.25}`).
    pub load_permille: AtomicU64,
}

impl DemoBackend {
    /// A backend named `name` answering 200 at once.
    pub fn new(name: &str) -> Arc<DemoBackend> {
        Arc::new(DemoBackend {
            name: name.into(),
            status: AtomicU16::new(200),
            delay_ms: AtomicU64::new(0),
            served: AtomicU64::new(0),
            load_permille: AtomicU64::new(0),
        })
    }
}

/// Serves `backend` on `listener` until the runtime stops.
pub async fn serve(listener: TcpListener, backend: Arc<DemoBackend>) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let backend = backend.clone();
        tokio::spawn(async move {
            // Connection errors end that connection only.
            let _ = connection(stream, backend).await;
        });
    }
}

async fn connection(mut stream: TcpStream, backend: Arc<DemoBackend>) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(4096);
    let mut chunk = [0u8; 4096];
    loop {
        // Read one request head (and skip its body).
        let (head, head_len) = loop {
            match http1::parse_request(&buf) {
                Ok(Some(done)) => break done,
                Ok(None) => {}
                Err(_) => return Ok(()),
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        };
        buf.drain(..head_len);
        let mut decoder = ChunkedDecoder::new();
        let mut skipped = Vec::new();
        loop {
            match head.framing {
                Framing::Length(len) if buf.len() >= len => {
                    buf.drain(..len);
                    break;
                }
                Framing::Chunked => {
                    let used = match decoder.decode(&buf, &mut skipped) {
                        Ok(used) => used,
                        Err(_) => return Ok(()),
                    };
                    buf.drain(..used);
                    skipped.clear();
                    if decoder.is_done() {
                        break;
                    }
                }
                Framing::Length(_) => {}
                Framing::Empty | Framing::UntilClose => break,
            }
            let n = stream.read(&mut chunk).await?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let close = head.closes();
        let status_doc = head.path == "/status";

        let delay = backend.delay_ms.load(Ordering::Relaxed);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        backend.served.fetch_add(1, Ordering::Relaxed);
        let status = backend.status.load(Ordering::Relaxed);
        let body = if status_doc {
            let load = backend.load_permille.load(Ordering::Relaxed) as f64 / 1000.0;
            format!("{{\"status\":\"ok\",\"load\":{load}}}\n")
        } else {
            format!("{}\n", backend.name)
        };
        let resp = format!(
            "HTTP/1.1 {status} {}\r\ncontent-type: text/plain\r\nx-backend: {}\r\ncontent-length: {}\r\n{}\r\n{body}",
            http::StatusCode::from_u16(status).ok().and_then(|s| s.canonical_reason()).unwrap_or("Status"),
            backend.name,
            body.len(),
            if close { "connection: close\r\n" } else { "" },
        );
        stream.write_all(resp.as_bytes()).await?;
        if close {
            return Ok(());
        }
    }
}

/// Starts `names.len()` demo backends on ephemeral loopback ports in a background thread.
/// Returns their addresses and handles, in order.
pub fn spawn_backends(
    names: &[&str],
) -> std::io::Result<Vec<(std::net::SocketAddr, Arc<DemoBackend>)>> {
    let local: std::net::SocketAddr = ([127, 0, 0, 1], 0).into();
    let at: Vec<_> = names.iter().map(|n| (*n, local)).collect();
    spawn_backends_on(&at)
}

/// Starts a demo backend named `name` on each `addr` (port 0 = an ephemeral one) in a
/// background thread. Returns their addresses and handles, in order.
pub fn spawn_backends_on(
    at: &[(&str, std::net::SocketAddr)],
) -> std::io::Result<Vec<(std::net::SocketAddr, Arc<DemoBackend>)>> {
    let mut out = Vec::new();
    let mut listeners = Vec::new();
    for (name, addr) in at {
        let l = std::net::TcpListener::bind(addr)?;
        l.set_nonblocking(true)?;
        let backend = DemoBackend::new(name);
        out.push((l.local_addr()?, backend.clone()));
        listeners.push((l, backend));
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    std::thread::Builder::new()
        .name("sluice-demo-backends".into())
        .spawn(move || {
            rt.block_on(async move {
                let mut tasks = Vec::new();
                for (l, b) in listeners {
                    match TcpListener::from_std(l) {
                        Ok(l) => tasks.push(tokio::spawn(serve(l, b))),
                        Err(e) => tracing::error!(error = %e, "demo backend listener failed"),
                    }
                }
                for t in tasks {
                    let _ = t.await;
                }
            })
        })?;
    Ok(out)
}
