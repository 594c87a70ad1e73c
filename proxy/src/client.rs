//! A minimal blocking HTTP/1.1 client for the CLI (talking to the admin API) and the test suite.
//!
//! Hand-written on std and sluice's one HTTP/1 parser ([`crate::http1`]): requests are small, to
//! loopback, and a full client stack would add minutes to every cold build.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::http1::{self, ChunkedDecoder, Framing};

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
        let bad = |e: &dyn std::fmt::Display| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, e.to_string())
        };
        let (head, n) = loop {
            if let Some(done) = http1::parse_response(&self.buf, head_only).map_err(|e| bad(&e))? {
                break done;
            }
            if self.fill()? == 0 {
                return Err(bad(&"connection closed before a response"));
            }
        };
        self.buf.drain(..n);
        let body = match head.framing {
            Framing::Empty => Vec::new(),
            Framing::Length(len) => {
                while self.buf.len() < len {
                    if self.fill()? == 0 {
                        return Err(bad(&"connection closed inside the body"));
                    }
                }
                self.buf.drain(..len).collect()
            }
            Framing::Chunked => {
                let mut decoder = ChunkedDecoder::new();
                let mut body = Vec::new();
                loop {
                    let used = decoder.decode(&self.buf, &mut body).map_err(|e| bad(&e))?;
                    self.buf.drain(..used);
                    if decoder.is_done() {
                        break body;
                    }
                    if self.fill()? == 0 {
                        return Err(std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            "closed in chunked body",
                        ));
                    }
                }
            }
            Framing::UntilClose => {
                self.stream.read_to_end(&mut self.buf)?;
                std::mem::take(&mut self.buf)
            }
        };
        Ok(HttpResponse {
            status: head.status,
            headers: head.headers,
            body,
        })
    }

    /// Reads more bytes into the buffer; 0 at end of stream.
    fn fill(&mut self) -> std::io::Result<usize> {
        let mut chunk = [0u8; 8192];
        let k = self.stream.read(&mut chunk)?;
        self.buf.extend_from_slice(&chunk[..k]);
        Ok(k)
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
