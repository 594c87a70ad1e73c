//! Runs a probe against a backend: all health-check I/O is the host's, with one timeout over the
//! whole exchange. HTTP probes of a pool with `[pool.tls]` go over TLS, checked as its requests
//! are.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::health::{Outcome, Probe, ProbeResult, BODY_PREFIX};
use crate::http1::{self, ChunkedDecoder, Framing};
use crate::upstream::UpstreamConn;
use crate::upstream_tls::UpstreamTls;

/// Most bytes a raw TCP probe may ask to read back.
const MAX_TCP_READ: u32 = 64 * 1024;

/// A result with no response.
fn failed(outcome: Outcome, latency: Duration) -> ProbeResult {
    ProbeResult::io_error()
        .with_outcome_of(outcome)
        .with_latency(latency)
}

/// A completed HTTP exchange.
fn http_result(status: u16, headers: Vec<(String, String)>, body: Vec<u8>) -> ProbeResult {
    headers
        .iter()
        .fold(ProbeResult::http(status), |r, (n, v)| {
            r.with_header(n, v.as_str())
        })
        .with_body(body)
}

/// Runs `spec` against `addr` within `timeout`; HTTP over TLS when `tls` is given.
pub async fn run(
    addr: SocketAddr,
    spec: &Probe,
    timeout: Duration,
    tls: Option<&UpstreamTls>,
) -> ProbeResult {
    let start = Instant::now();
    if let Probe::Tcp { send, read } = spec {
        return raw_tcp(addr, send, (*read).min(MAX_TCP_READ), start, timeout).await;
    }
    match tokio::time::timeout(timeout, exchange(addr, spec, tls)).await {
        Ok(Ok(r)) => r.with_latency(start.elapsed()),
        Ok(Err(outcome)) => failed(outcome, start.elapsed()),
        Err(_) => failed(Outcome::TimedOut, start.elapsed()),
    }
}

async fn exchange(
    addr: SocketAddr,
    spec: &Probe,
    tls: Option<&UpstreamTls>,
) -> Result<ProbeResult, Outcome> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|_| Outcome::ConnectFailed)?;
    let _ = stream.set_nodelay(true);
    match spec {
        Probe::TcpConnect => Ok(ProbeResult::connected()),
        Probe::Http {
            method,
            path,
            headers,
            body,
        } => {
            let has_host = headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host"));
            let mut req = format!("{method} {path} HTTP/1.1\r\n");
            if !has_host {
                req.push_str(&format!("host: {addr}\r\n"));
            }
            for (n, v) in headers {
                req.push_str(&format!("{n}: {v}\r\n"));
            }
            req.push_str(&format!(
                "user-agent: sluice-health\r\nconnection: close\r\ncontent-length: {}\r\n\r\n",
                body.len()
            ));
            let mut stream = match tls {
                None => UpstreamConn::Plain(stream),
                Some(tls) => {
                    let connector = tokio_rustls::TlsConnector::from(tls.http1.clone());
                    let s = connector
                        .connect(tls.server_name(addr.ip()), stream)
                        .await
                        .map_err(|_| Outcome::ConnectFailed)?;
                    UpstreamConn::Tls(Box::new(s))
                }
            };
            stream
                .write_all(req.as_bytes())
                .await
                .map_err(|_| Outcome::IoError)?;
            stream.write_all(body).await.map_err(|_| Outcome::IoError)?;
            stream.flush().await.map_err(|_| Outcome::IoError)?;
            read_response(&mut stream).await
        }
        // Raw TCP runs in `raw_tcp`; the codec yields no other kind.
        _ => Err(Outcome::IoError),
    }
}

/// A raw TCP exchange. Bytes read before the timeout are kept: a server that answers and then
/// keeps the connection open (Redis' `+PONG`) is a completed exchange, not a timeout.
async fn raw_tcp(
    addr: SocketAddr,
    send: &[u8],
    read: u32,
    start: Instant,
    timeout: Duration,
) -> ProbeResult {
    let deadline = tokio::time::Instant::from_std(start + timeout);
    let failed = |outcome| failed(outcome, start.elapsed());
    let mut stream = match tokio::time::timeout_at(deadline, TcpStream::connect(addr)).await {
        Err(_) => return failed(Outcome::TimedOut),
        Ok(Err(_)) => return failed(Outcome::ConnectFailed),
        Ok(Ok(s)) => s,
    };
    match tokio::time::timeout_at(deadline, stream.write_all(send)).await {
        Err(_) => return failed(Outcome::TimedOut),
        Ok(Err(_)) => return failed(Outcome::IoError),
        Ok(Ok(())) => {}
    }
    let mut buf = vec![0u8; read as usize];
    let mut filled = 0;
    while filled < buf.len() {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf[filled..])).await {
            Err(_) if filled == 0 => return failed(Outcome::TimedOut),
            Err(_) | Ok(Ok(0)) => break,
            Ok(Ok(n)) => filled += n,
            Ok(Err(_)) => return failed(Outcome::IoError),
        }
    }
    buf.truncate(filled);
    ProbeResult::tcp_read(buf).with_latency(start.elapsed())
}

/// Reads a response head and up to [`BODY_PREFIX`] bytes of its body (de-chunked).
async fn read_response(stream: &mut UpstreamConn) -> Result<ProbeResult, Outcome> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    let (head, n) = loop {
        match http1::parse_response(&buf, false) {
            Ok(Some(done)) => break done,
            Ok(None) => {}
            Err(_) => return Err(Outcome::IoError),
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(Outcome::IoError),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    };
    let mut raw = buf.split_off(n);
    let mut body = Vec::new();
    let mut decoder = ChunkedDecoder::new();
    // What is read after the prefix is full, or the stream ends, does not matter to the verdict.
    loop {
        match head.framing {
            Framing::Empty => break,
            Framing::Chunked => {
                if decoder.decode(&raw, &mut body).is_err() || decoder.is_done() {
                    break;
                }
            }
            Framing::Length(len) => {
                body.extend_from_slice(&raw);
                if body.len() >= len {
                    break;
                }
            }
            Framing::UntilClose => body.extend_from_slice(&raw),
        }
        if body.len() >= BODY_PREFIX {
            break;
        }
        raw.clear();
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => break,
            Ok(k) => raw.extend_from_slice(&chunk[..k]),
        }
    }
    if let Framing::Length(len) = head.framing {
        body.truncate(len);
    }
    body.truncate(BODY_PREFIX);
    Ok(http_result(head.status, head.headers, body))
}
