//! Runs a probe against a backend: all health-check I/O is the host's, with one timeout over the
//! whole exchange.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::health::{Outcome, Probe, ProbeResult, BODY_PREFIX};

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

/// Runs `spec` against `addr` within `timeout`.
pub async fn run(addr: SocketAddr, spec: &Probe, timeout: Duration) -> ProbeResult {
    let start = Instant::now();
    if let Probe::Tcp { send, read } = spec {
        return raw_tcp(addr, send, (*read).min(MAX_TCP_READ), start, timeout).await;
    }
    match tokio::time::timeout(timeout, exchange(addr, spec)).await {
        Ok(Ok(r)) => r.with_latency(start.elapsed()),
        Ok(Err(outcome)) => failed(outcome, start.elapsed()),
        Err(_) => failed(Outcome::TimedOut, start.elapsed()),
    }
}

async fn exchange(addr: SocketAddr, spec: &Probe) -> Result<ProbeResult, Outcome> {
    let mut stream = TcpStream::connect(addr)
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
            stream
                .write_all(req.as_bytes())
                .await
                .map_err(|_| Outcome::IoError)?;
            stream.write_all(body).await.map_err(|_| Outcome::IoError)?;
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
async fn read_response(stream: &mut TcpStream) -> Result<ProbeResult, Outcome> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut hs);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let status = resp.code.unwrap_or(0);
                let headers: Vec<(String, String)> = resp
                    .headers
                    .iter()
                    .map(|h| {
                        (
                            h.name.to_ascii_lowercase(),
                            String::from_utf8_lossy(h.value).into_owned(),
                        )
                    })
                    .collect();
                let len = headers
                    .iter()
                    .find(|(k, _)| k == "content-length")
                    .and_then(|(_, v)| v.trim().parse::<usize>().ok());
                let chunked = headers.iter().any(|(k, v)| {
                    k == "transfer-encoding" && v.to_ascii_lowercase().contains("chunked")
                });
                if chunked {
                    let body = read_chunked_prefix(stream, buf[n..].to_vec()).await;
                    return Ok(http_result(status, headers, body));
                }
                let want = len.unwrap_or(BODY_PREFIX).min(BODY_PREFIX);
                let mut body = buf[n..].to_vec();
                while body.len() < want {
                    match stream.read(&mut chunk).await {
                        Ok(0) => break,
                        Ok(k) => body.extend_from_slice(&chunk[..k]),
                        Err(_) => break,
                    }
                }
                body.truncate(want);
                return Ok(http_result(status, headers, body));
            }
            Ok(httparse::Status::Partial) if buf.len() < 64 * 1024 => {}
            _ => return Err(Outcome::IoError),
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return Err(Outcome::IoError),
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
}

/// Decodes a chunked body until [`BODY_PREFIX`] bytes, the last chunk, or the end of the stream.
async fn read_chunked_prefix(stream: &mut TcpStream, mut raw: Vec<u8>) -> Vec<u8> {
    let mut body = Vec::new();
    let mut chunk = [0u8; 2048];
    let mut pos = 0;
    loop {
        // Parse as many complete chunks as `raw` holds.
        while let Some(line_end) = raw[pos..]
            .windows(2)
            .position(|w| w == b"\r\n")
            .map(|p| pos + p)
        {
            let size_text = String::from_utf8_lossy(&raw[pos..line_end]);
            let Ok(size) =
                usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            else {
                return body;
            };
            if size == 0 {
                return body;
            }
            let data_start = line_end + 2;
            if raw.len() < data_start + size + 2 {
                // Take what is there when it already fills the prefix.
                if body.len() + raw.len().saturating_sub(data_start) >= BODY_PREFIX {
                    body.extend_from_slice(&raw[data_start..]);
                    body.truncate(BODY_PREFIX);
                    return body;
                }
                break;
            }
            body.extend_from_slice(&raw[data_start..data_start + size]);
            pos = data_start + size + 2;
            if body.len() >= BODY_PREFIX {
                body.truncate(BODY_PREFIX);
                return body;
            }
        }
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return body,
            Ok(k) => raw.extend_from_slice(&chunk[..k]),
        }
        if raw.len() > 256 * 1024 {
            return body;
        }
    }
}
