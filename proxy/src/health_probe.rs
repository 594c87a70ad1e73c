//! Runs a probe against a backend: all health-check I/O is the host's, with one timeout over the
//! whole exchange.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::health::{Outcome, ProbeResult, ProbeSpec, BODY_PREFIX};

/// Runs `spec` against `addr` within `timeout`.
pub async fn run(addr: SocketAddr, spec: &ProbeSpec, timeout: Duration) -> ProbeResult {
    let start = Instant::now();
    match tokio::time::timeout(timeout, exchange(addr, spec)).await {
        Ok(Ok(mut r)) => {
            r.latency = start.elapsed();
            r
        }
        Ok(Err(outcome)) => ProbeResult::failed(outcome, start.elapsed()),
        Err(_) => ProbeResult::failed(Outcome::TimedOut, start.elapsed()),
    }
}

async fn exchange(addr: SocketAddr, spec: &ProbeSpec) -> Result<ProbeResult, Outcome> {
    let mut stream = TcpStream::connect(addr).await.map_err(|_| Outcome::ConnectFailed)?;
    let _ = stream.set_nodelay(true);
    let done = |status, headers, body| ProbeResult { outcome: Outcome::Completed, latency: Duration::ZERO, status, headers, body };
    match spec {
        ProbeSpec::TcpConnect => Ok(done(0, Vec::new(), Vec::new())),
        ProbeSpec::Tcp { send, read } => {
            stream.write_all(send).await.map_err(|_| Outcome::IoError)?;
            let mut buf = vec![0u8; *read as usize];
            let mut filled = 0;
            while filled < buf.len() {
                match stream.read(&mut buf[filled..]).await {
                    Ok(0) => break,
                    Ok(n) => filled += n,
                    Err(_) => return Err(Outcome::IoError),
                }
            }
            buf.truncate(filled);
            Ok(done(0, Vec::new(), buf))
        }
        ProbeSpec::Http { method, path, headers, body } => {
            let has_host = headers.iter().any(|(n, _)| n.eq_ignore_ascii_case("host"));
            let mut req = format!("{method} {path} HTTP/1.1\r\n");
            if !has_host {
                req.push_str(&format!("host: {addr}\r\n"));
            }
            for (n, v) in headers {
                req.push_str(&format!("{n}: {v}\r\n"));
            }
            req.push_str(&format!("user-agent: sluice-health\r\nconnection: close\r\ncontent-length: {}\r\n\r\n", body.len()));
            stream.write_all(req.as_bytes()).await.map_err(|_| Outcome::IoError)?;
            stream.write_all(body).await.map_err(|_| Outcome::IoError)?;
            read_response(&mut stream).await
        }
    }
}

/// Reads a response head and up to [`BODY_PREFIX`] bytes of its body.
async fn read_response(stream: &mut TcpStream) -> Result<ProbeResult, Outcome> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    loop {
        let mut hs = [httparse::EMPTY_HEADER; 64];
        let mut resp = httparse::Response::new(&mut hs);
        match resp.parse(&buf) {
            Ok(httparse::Status::Complete(n)) => {
                let status = resp.code.unwrap_or(0);
                let headers: Vec<(String, String)> =
                    resp.headers.iter().map(|h| (h.name.to_ascii_lowercase(), String::from_utf8_lossy(h.value).into_owned())).collect();
                let len = headers.iter().find(|(k, _)| k == "content-length").and_then(|(_, v)| v.trim().parse::<usize>().ok());
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
                return Ok(ProbeResult { outcome: Outcome::Completed, latency: Duration::ZERO, status, headers, body });
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
