//! The one HTTP/1 head parser and chunked decoder for sluice's own small HTTP speakers: the health
//! prober, the CLI's admin client and the demo backends. The proxy's request path parses heads with
//! [`crate::head`] and uses the chunked decoder here to find where forwarded bodies end.
//!
//! Sans-IO: callers read bytes their own way (blocking or async) and feed them in. `httparse`
//! parses heads; framing and the chunked decoder are written here because they are small, and a
//! full HTTP client or server crate would add minutes to every cold build for three callers that
//! talk to known peers.

/// Largest head accepted; a longer one is an error, not a reason to keep reading.
pub const MAX_HEAD: usize = 64 * 1024;
/// Headers accepted per head.
const MAX_HEADERS: usize = 64;

/// Why bytes are not HTTP/1.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ParseError {
    /// The head is malformed.
    #[error("malformed HTTP/1 head: {0}")]
    Head(String),
    /// The head is longer than [`MAX_HEAD`].
    #[error("HTTP/1 head longer than {MAX_HEAD} bytes")]
    HeadTooLong,
    /// A chunked body is malformed.
    #[error("malformed chunked body: {0}")]
    Chunked(&'static str),
}

/// How a message's body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body.
    Empty,
    /// `Content-Length` bytes.
    Length(usize),
    /// `Transfer-Encoding: chunked`; decode with [`ChunkedDecoder`].
    Chunked,
    /// Until the connection closes (responses only).
    UntilClose,
}

/// A parsed head: the request or status line's fields, headers (names lower-cased), framing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Head {
    /// Request method (empty for responses).
    pub method: String,
    /// Request target (empty for responses).
    pub path: String,
    /// Response status (0 for requests).
    pub status: u16,
    /// `0` for HTTP/1.0, `1` for HTTP/1.1.
    pub version: u8,
    /// Headers in order, names lower-cased.
    pub headers: Vec<(String, String)>,
    /// How the body is delimited.
    pub framing: Framing,
}

impl Head {
    /// The first value of header `name` (lower-case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// True when the connection ends after this message (`Connection: close`, or HTTP/1.0
    /// without keep-alive).
    pub fn closes(&self) -> bool {
        match self.header("connection") {
            Some(v) if v.eq_ignore_ascii_case("close") => true,
            Some(v) if v.eq_ignore_ascii_case("keep-alive") => false,
            _ => self.version == 0,
        }
    }
}

fn headers_of(raw: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    raw.iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

/// Body framing from headers; `no_length` is the framing when neither header is present.
fn framing(headers: &[(String, String)], no_length: Framing) -> Result<Framing, ParseError> {
    let chunked = headers.iter().any(|(k, v)| {
        k == "transfer-encoding"
            && v.rsplit(',')
                .next()
                .is_some_and(|last| last.trim().eq_ignore_ascii_case("chunked"))
    });
    if chunked {
        return Ok(Framing::Chunked);
    }
    let mut lengths = headers.iter().filter(|(k, _)| k == "content-length");
    match lengths.next() {
        None => Ok(no_length),
        Some((_, v)) => {
            let n = v
                .trim()
                .parse::<usize>()
                .map_err(|_| ParseError::Head(format!("bad content-length {v:?}")))?;
            if lengths.any(|(_, other)| other.trim() != v.trim()) {
                return Err(ParseError::Head(
                    "conflicting content-length headers".into(),
                ));
            }
            Ok(if n == 0 {
                Framing::Empty
            } else {
                Framing::Length(n)
            })
        }
    }
}

fn check_partial(buf: &[u8]) -> Result<Option<(Head, usize)>, ParseError> {
    if buf.len() > MAX_HEAD {
        Err(ParseError::HeadTooLong)
    } else {
        Ok(None)
    }
}

/// Parses a response head at the start of `buf`: `Ok(None)` while it is incomplete, else the
/// head and its length. `head_request` marks the answer to a `HEAD` request (no body).
pub fn parse_response(buf: &[u8], head_request: bool) -> Result<Option<(Head, usize)>, ParseError> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut hs);
    match resp.parse(buf) {
        Ok(httparse::Status::Partial) => check_partial(buf),
        Err(e) => Err(ParseError::Head(e.to_string())),
        Ok(httparse::Status::Complete(n)) => {
            let status = resp.code.unwrap_or(0);
            let headers = headers_of(resp.headers);
            let no_body =
                head_request || (100..200).contains(&status) || status == 204 || status == 304;
            let framing = if no_body {
                Framing::Empty
            } else {
                framing(&headers, Framing::UntilClose)?
            };
            Ok(Some((
                Head {
                    method: String::new(),
                    path: String::new(),
                    status,
                    version: resp.version.unwrap_or(1),
                    headers,
                    framing,
                },
                n,
            )))
        }
    }
}

/// Parses a request head at the start of `buf`: `Ok(None)` while it is incomplete.
pub fn parse_request(buf: &[u8]) -> Result<Option<(Head, usize)>, ParseError> {
    let mut hs = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut hs);
    match req.parse(buf) {
        Ok(httparse::Status::Partial) => check_partial(buf),
        Err(e) => Err(ParseError::Head(e.to_string())),
        Ok(httparse::Status::Complete(n)) => {
            let headers = headers_of(req.headers);
            let framing = framing(&headers, Framing::Empty)?;
            Ok(Some((
                Head {
                    method: req.method.unwrap_or("").to_string(),
                    path: req.path.unwrap_or("").to_string(),
                    status: 0,
                    version: req.version.unwrap_or(1),
                    headers,
                    framing,
                },
                n,
            )))
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// In a chunk-size line: the value so far, digits seen, inside an extension, CR seen.
    Size {
        value: u64,
        digits: u8,
        ext: bool,
        cr: bool,
    },
    /// Chunk data bytes left.
    Data(u64),
    /// The CRLF after chunk data: how many of its bytes were seen.
    DataEnd(u8),
    /// Trailer section: length of the current line, CR seen.
    Trailer {
        len: usize,
        cr: bool,
    },
    Done,
}

const SIZE_START: State = State::Size {
    value: 0,
    digits: 0,
    ext: false,
    cr: false,
};

/// Decodes a `Transfer-Encoding: chunked` body fed in pieces of any size.
#[derive(Debug, Clone)]
pub struct ChunkedDecoder {
    state: State,
}

impl Default for ChunkedDecoder {
    fn default() -> Self {
        ChunkedDecoder { state: SIZE_START }
    }
}

impl ChunkedDecoder {
    /// A decoder at the start of a body.
    pub fn new() -> ChunkedDecoder {
        ChunkedDecoder::default()
    }

    /// True once the last chunk and the trailers were read.
    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes from `input`, appending body bytes to `out`. Returns how many input bytes were
    /// used: all of them unless the body ended inside `input` (what follows is the next message).
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<usize, ParseError> {
        self.run(input, |data| out.extend_from_slice(data))
    }

    /// Like [`ChunkedDecoder::decode`] but keeps nothing: validates the framing and finds the
    /// end of the body, for a proxy that forwards the chunked bytes unchanged.
    pub fn scan(&mut self, input: &[u8]) -> Result<usize, ParseError> {
        self.run(input, |_| {})
    }

    fn run(&mut self, input: &[u8], mut data: impl FnMut(&[u8])) -> Result<usize, ParseError> {
        let mut i = 0;
        while i < input.len() {
            match &mut self.state {
                State::Done => return Ok(i),
                State::Data(left) => {
                    let n = (*left).min((input.len() - i) as u64) as usize;
                    data(&input[i..i + n]);
                    i += n;
                    *left -= n as u64;
                    if *left == 0 {
                        self.state = State::DataEnd(0);
                    }
                    continue;
                }
                State::DataEnd(seen) => {
                    let want = if *seen == 0 { b'\r' } else { b'\n' };
                    if input[i] != want {
                        return Err(ParseError::Chunked("chunk data not followed by CRLF"));
                    }
                    *seen += 1;
                    if *seen == 2 {
                        self.state = SIZE_START;
                    }
                }
                State::Size {
                    value,
                    digits,
                    ext,
                    cr,
                } => {
                    let b = input[i];
                    if *cr {
                        if b != b'\n' {
                            return Err(ParseError::Chunked("CR without LF in a chunk-size line"));
                        }
                        if *digits == 0 {
                            return Err(ParseError::Chunked("chunk-size line without a size"));
                        }
                        self.state = if *value == 0 {
                            State::Trailer { len: 0, cr: false }
                        } else {
                            State::Data(*value)
                        };
                    } else if b == b'\r' {
                        *cr = true;
                    } else if *ext {
                        // Chunk extensions are ignored, but a control byte in one (a bare LF
                        // above all) is refused: a peer that ends the line there would read
                        // the body differently.
                        if (b < 0x20 && b != b'\t') || b == 0x7f {
                            return Err(ParseError::Chunked("control byte in a chunk extension"));
                        }
                    } else if b == b';' {
                        *ext = true;
                    } else if let Some(d) = (b as char).to_digit(16) {
                        if *digits >= 15 {
                            return Err(ParseError::Chunked("chunk size too large"));
                        }
                        *value = *value * 16 + u64::from(d);
                        *digits += 1;
                    } else if b == b' ' || b == b'\t' {
                        // Whitespace before an extension.
                    } else {
                        return Err(ParseError::Chunked("bad character in a chunk size"));
                    }
                }
                State::Trailer { len, cr } => {
                    let b = input[i];
                    if *cr {
                        if b != b'\n' {
                            return Err(ParseError::Chunked("CR without LF in the trailers"));
                        }
                        if *len == 0 {
                            self.state = State::Done;
                            return Ok(i + 1);
                        }
                        *len = 0;
                        *cr = false;
                    } else if b == b'\r' {
                        *cr = true;
                    } else if b == b'\n' {
                        return Err(ParseError::Chunked("bare LF in the trailers"));
                    } else {
                        *len += 1;
                        if *len > MAX_HEAD {
                            return Err(ParseError::Chunked("trailer line too long"));
                        }
                    }
                }
            }
            i += 1;
        }
        Ok(i)
    }
}

/// A chunked encoding of `body` split into chunks of `size` bytes (tests and the demo backends).
pub fn encode_chunked(body: &[u8], size: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 32);
    for chunk in body.chunks(size.max(1)) {
        out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
        out.extend_from_slice(chunk);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// `host` without its port: `example.com:8080` → `example.com`, `[::1]:80` → `[::1]`.
pub fn strip_port(host: &[u8]) -> &[u8] {
    if host.first() == Some(&b'[') {
        return match host.iter().position(|&c| c == b']') {
            Some(end) => &host[..=end],
            None => host,
        };
    }
    match host.iter().rposition(|&c| c == b':') {
        Some(i) => &host[..i],
        None => host,
    }
}

/// [`strip_port`] for text.
pub fn strip_port_str(host: &str) -> &str {
    let stripped = strip_port(host.as_bytes()).len();
    &host[..stripped]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn heads_parse_with_their_framing() {
        let (h, n) = parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nX-A: b\r\n\r\nhello",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!((h.status, h.framing, n), (200, Framing::Length(5), 46));
        assert_eq!(h.header("x-a"), Some("b"));
        let (h, _) = parse_response(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n\r\n",
            false,
        )
        .unwrap()
        .unwrap();
        assert_eq!(h.framing, Framing::Chunked);
        let (h, _) = parse_response(b"HTTP/1.0 200 OK\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::UntilClose);
        assert!(h.closes());
        let (h, _) = parse_response(b"HTTP/1.1 204 No Content\r\n\r\n", false)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Empty);
        let (h, _) = parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n", true)
            .unwrap()
            .unwrap();
        assert_eq!(h.framing, Framing::Empty, "the answer to HEAD has no body");
        assert_eq!(
            parse_response(b"HTTP/1.1 200 OK\r\nContent", false),
            Ok(None)
        );
        assert!(parse_response(
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
            false
        )
        .is_err());
        assert!(parse_response(b"HTTP/1.1 200 OK\r\nContent-Length: x\r\n\r\n", false).is_err());
        let (r, _) = parse_request(b"GET /status HTTP/1.1\r\nConnection: close\r\n\r\n")
            .unwrap()
            .unwrap();
        assert_eq!(
            (r.method.as_str(), r.path.as_str(), r.framing),
            ("GET", "/status", Framing::Empty)
        );
        assert!(r.closes());
    }

    #[test]
    fn a_long_partial_head_is_refused() {
        let mut head = b"HTTP/1.1 200 OK\r\nX: ".to_vec();
        head.extend(std::iter::repeat_n(b'a', MAX_HEAD));
        assert_eq!(parse_response(&head, false), Err(ParseError::HeadTooLong));
    }

    #[test]
    fn chunked_bodies_decode_and_bad_ones_are_named() {
        let mut out = Vec::new();
        let mut d = ChunkedDecoder::new();
        let input = b"5;ext=1\r\nhello\r\n6\r\n world\r\n0\r\nTrailer: x\r\n\r\nNEXT";
        let used = d.decode(input, &mut out).unwrap();
        assert_eq!(out, b"hello world");
        assert!(d.is_done());
        assert_eq!(&input[used..], b"NEXT");
        for (bad, why) in [
            (&b"zz\r\n"[..], "bad character in a chunk size"),
            (b"\r\n", "chunk-size line without a size"),
            (b"1\r\nab", "chunk data not followed by CRLF"),
            (b"1\rx", "CR without LF in a chunk-size line"),
            (b"ffffffffffffffff\r\n", "chunk size too large"),
            (b"1;a\nb\r\n", "control byte in a chunk extension"),
            (b"0\r\nX: y\nZ\r\n\r\n", "bare LF in the trailers"),
        ] {
            let err = ChunkedDecoder::new()
                .decode(bad, &mut Vec::new())
                .unwrap_err();
            assert_eq!(err, ParseError::Chunked(why));
        }
    }

    #[test]
    fn ports_are_stripped() {
        assert_eq!(strip_port_str("example.com:8080"), "example.com");
        assert_eq!(strip_port_str("example.com"), "example.com");
        assert_eq!(strip_port_str("[::1]:80"), "[::1]");
        assert_eq!(strip_port(b"10.0.0.1:1"), b"10.0.0.1");
    }

    proptest! {
        /// Encode then decode, fed in arbitrary pieces, gives the body back and stops exactly
        /// at the end of the encoding.
        #[test]
        fn chunked_round_trips_in_any_pieces(
            body in prop::collection::vec(any::<u8>(), 0..2000),
            size in 1usize..300,
            cuts in prop::collection::vec(1usize..64, 1..50),
        ) {
            let mut encoded = encode_chunked(&body, size);
            encoded.extend_from_slice(b"GET");
            let mut d = ChunkedDecoder::new();
            let mut out = Vec::new();
            let mut pos = 0;
            let mut cut = cuts.iter().cycle();
            while !d.is_done() {
                let end = (pos + cut.next().unwrap()).min(encoded.len());
                pos += d.decode(&encoded[pos..end], &mut out).unwrap();
            }
            prop_assert_eq!(out, body);
            prop_assert_eq!(&encoded[pos..], b"GET");
        }
    }
}
