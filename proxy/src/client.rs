//! A minimal blocking HTTP/1.1 client for the CLI (talking to the admin API) and the test suite.
//!
//! Hand-written on std + httparse: requests are small, to loopback, with known framing
//! (content-length or close), and a full client stack would add minutes to every cold build.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

/// A response.
#[derive(Debug, Clone)]
pub struct HttpResponse {
    /// Status code.
    pub status: u16,
    /// Headers, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// Body.
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// Body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// First header value by lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A keep-alive connection to one server.
pub struct HttpConn {
    stream: TcpStream,
    addr: SocketAddr,
    buf: Vec<u8>,
}

impl HttpConn {
    /// Connects with a timeout applied to connect, reads and writes.
    pub fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<HttpConn> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(HttpConn {
            stream,
            addr,
            buf: Vec::new(),
        })
    }

    /// Sends one request and reads its response.
    pub fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<HttpResponse> {
        let mut head = format!(
            "{method} {path} HTTP/1.1\r\nhost: {}\r\ncontent-length: {}\r\n",
            self.addr,
            body.len()
        );
        for (n, v) in headers {
            head.push_str(&format!("{n}: {v}\r\n"));
        }
        head.push_str("\r\n");
        self.stream.write_all(head.as_bytes())?;
        self.stream.write_all(body)?;
        self.read_response(method == "HEAD")
    }

    fn read_response(&mut self, head_only: bool) -> std::io::Result<HttpResponse> {
        let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
        let mut chunk = [0u8; 8192];
        loop {
            let mut hs = [httparse::EMPTY_HEADER; 64];
            let mut resp = httparse::Response::new(&mut hs);
            if let httparse::Status::Complete(n) =
                resp.parse(&self.buf).map_err(|e| bad(&e.to_string()))?
            {
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
                let chunked = headers
                    .iter()
                    .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
                self.buf.drain(..n);
                let body = if head_only || status == 204 || status == 304 {
                    Vec::new()
                } else if let Some(len) = len {
                    while self.buf.len() < len {
                        let k = self.stream.read(&mut chunk)?;
                        if k == 0 {
                            return Err(bad("connection closed inside the body"));
                        }
                        self.buf.extend_from_slice(&chunk[..k]);
                    }
                    self.buf.drain(..len).collect()
                } else if chunked {
                    self.read_chunked()?
                } else {
                    self.stream.read_to_end(&mut self.buf)?;
                    std::mem::take(&mut self.buf)
                };
                return Ok(HttpResponse {
                    status,
                    headers,
                    body,
                });
            }
            let k = self.stream.read(&mut chunk)?;
            if k == 0 {
                return Err(bad("connection closed before a response"));
            }
            self.buf.extend_from_slice(&chunk[..k]);
        }
    }

    fn read_chunked(&mut self) -> std::io::Result<Vec<u8>> {
        let mut body = Vec::new();
        let mut chunk = [0u8; 8192];
        loop {
            let line_end = loop {
                if let Some(p) = self.buf.windows(2).position(|w| w == b"\r\n") {
                    break p;
                }
                let k = self.stream.read(&mut chunk)?;
                if k == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "closed in chunked body",
                    ));
                }
                self.buf.extend_from_slice(&chunk[..k]);
            };
            let size_text = String::from_utf8_lossy(&self.buf[..line_end]).to_string();
            let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
                .map_err(|_| {
                    std::io::Error::new(std::io::ErrorKind::InvalidData, "bad chunk size")
                })?;
            while self.buf.len() < line_end + 2 + size + 2 {
                let k = self.stream.read(&mut chunk)?;
                if k == 0 {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "closed in chunk",
                    ));
                }
                self.buf.extend_from_slice(&chunk[..k]);
            }
            body.extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
            self.buf.drain(..line_end + 2 + size + 2);
            if size == 0 {
                return Ok(body);
            }
        }
    }
}

/// One request on a fresh connection.
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<HttpResponse> {
    HttpConn::connect(addr, Duration::from_secs(10))?.request(method, path, headers, body)
}
