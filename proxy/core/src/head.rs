//! The proxy's HTTP/1 head parser: request and response heads parsed in place, as byte spans
//! into the connection's read buffer, so forwarding a head costs no allocation.
//!
//! `httparse` tokenizes; this module adds the message rules a proxy must enforce so that it and
//! the backend never disagree about where a message ends (request smuggling). A request is
//! refused when it has both `Content-Length` and `Transfer-Encoding`, differing or malformed
//! `Content-Length` values, a `Transfer-Encoding` other than exactly `chunked` (or any on
//! HTTP/1.0), more than one `Host`, a `Host` or target authority that is malformed, carries
//! userinfo, or differs from the other, or a target that is neither origin-form, absolute-form nor
//! `*` for `OPTIONS`. `httparse` itself refuses obsolete line folding, bare CR, control bytes and
//! invalid tokens. Heads are re-serialized with CRLF when forwarded, so a bare-LF line ending
//! accepted here never reaches a backend.

use crate::http1::ChunkedDecoder;

/// Headers accepted per head (pingora's limit as well); more is answered 431.
pub const MAX_HEADERS: usize = 256;

/// A byte range of the buffer a head was parsed from.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Span {
    start: u32,
    end: u32,
}

impl Span {
    fn within(buf: &[u8], part: &[u8]) -> Span {
        let start = part.as_ptr() as usize - buf.as_ptr() as usize;
        Span {
            start: start as u32,
            end: (start + part.len()) as u32,
        }
    }

    /// The bytes of this span in `buf` (the buffer it was parsed from).
    pub fn of<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        &buf[self.start as usize..self.end as usize]
    }

    /// The same span with its start moved `n` bytes on (at most to its end).
    fn skip(self, n: usize) -> Span {
        Span {
            start: (self.start + n as u32).min(self.end),
            end: self.end,
        }
    }

    /// The first `n` bytes of this span.
    fn take(self, n: usize) -> Span {
        Span {
            start: self.start,
            end: (self.start + n as u32).min(self.end),
        }
    }
}

/// One header line: name and value spans.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HeaderSpan {
    /// The name, as sent (case kept).
    pub name: Span,
    /// The value, without surrounding whitespace.
    pub value: Span,
}

/// How a message body is delimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    /// No body.
    None,
    /// `Content-Length` bytes.
    Length(u64),
    /// `Transfer-Encoding: chunked`.
    Chunked,
    /// Until the connection closes (responses only).
    UntilClose,
}

/// Why a head is refused: the status to answer with and a short reason for the client and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HeadError {
    /// 400, 431 or 501.
    pub status: u16,
    /// What was wrong, one line.
    pub reason: &'static str,
}

const fn bad(reason: &'static str) -> HeadError {
    HeadError {
        status: 400,
        reason,
    }
}

/// A parsed request head. Spans point into the buffer given to [`parse_request`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestHead {
    /// Bytes the head takes at the start of the buffer, final blank line included.
    pub len: usize,
    /// Method token.
    pub method: Span,
    /// Request target as sent.
    pub target: Span,
    /// Path and query of the target (the target itself unless it is absolute-form).
    pub path_and_query: Span,
    /// Length of the path within `path_and_query` (the query follows a `?`).
    pub path_len: u32,
    /// The authority: of an absolute-form target, else of the `Host` header.
    pub host: Option<Span>,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Request body framing.
    pub framing: BodyFraming,
    /// The client asked to close the connection after this exchange (`Connection: close`, or
    /// HTTP/1.0 without `keep-alive`).
    pub close: bool,
    /// An HTTP/1.1 protocol upgrade (`Upgrade` with `Connection: upgrade`).
    pub upgrade: bool,
    /// `Expect: 100-continue`.
    pub expect_continue: bool,
    /// Idempotent method (RFC 9110 9.2.2): may be replayed on another backend.
    pub idempotent: bool,
    /// `HEAD` (the response has no body whatever its headers say).
    pub is_head: bool,
    /// `Connection` names other headers (hop-by-hop by that listing, RFC 9110 7.6.1).
    pub connection_lists: bool,
}

impl RequestHead {
    /// The path (no query).
    pub fn path<'b>(&self, buf: &'b [u8]) -> &'b [u8] {
        self.path_and_query.take(self.path_len as usize).of(buf)
    }

    /// The query string after `?`, if any.
    pub fn query<'b>(&self, buf: &'b [u8]) -> Option<&'b [u8]> {
        let pq = self.path_and_query.of(buf);
        let p = self.path_len as usize;
        (p < pq.len()).then(|| &pq[p + 1..])
    }
}

/// A parsed response head.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseHead {
    /// Bytes the head takes at the start of the buffer.
    pub len: usize,
    /// Status code.
    pub status: u16,
    /// The reason phrase.
    pub reason: Span,
    /// 0 for HTTP/1.0, 1 for HTTP/1.1.
    pub version: u8,
    /// Body framing.
    pub framing: BodyFraming,
    /// The backend closes the connection after this response.
    pub close: bool,
    /// `Connection` names other headers.
    pub connection_lists: bool,
}

/// Case-insensitive header name comparison (names are ASCII tokens).
pub fn name_is(name: &[u8], want: &[u8]) -> bool {
    name.eq_ignore_ascii_case(want)
}

/// Whether a comma-separated header value lists `token` (case-insensitively).
pub fn has_token(value: &[u8], token: &[u8]) -> bool {
    value
        .split(|&c| c == b',')
        .any(|t| t.trim_ascii().eq_ignore_ascii_case(token))
}

/// The headers whose meaning ends at this hop (RFC 9110 7.6.1); the proxy writes its own.
pub fn is_hop_by_hop(name: &[u8]) -> bool {
    name_is(name, b"connection")
        || name_is(name, b"keep-alive")
        || name_is(name, b"proxy-connection")
}

/// True when a `Connection` header lists a token other than `close`, `keep-alive` and `upgrade`.
fn lists_others(value: &[u8]) -> bool {
    value.split(|&c| c == b',').any(|t| {
        let t = t.trim_ascii();
        !(t.is_empty()
            || t.eq_ignore_ascii_case(b"close")
            || t.eq_ignore_ascii_case(b"keep-alive")
            || t.eq_ignore_ascii_case(b"upgrade"))
    })
}

/// Whether header `name` is named in one of the `Connection` headers among `headers` (so it is
/// hop-by-hop and not forwarded).
pub fn listed_in_connection(buf: &[u8], headers: &[HeaderSpan], name: &[u8]) -> bool {
    headers
        .iter()
        .filter(|h| name_is(h.name.of(buf), b"connection"))
        .any(|h| has_token(h.value.of(buf), name))
}

/// Parses a `Content-Length` value: ASCII digits only (no sign, no spaces inside), with the
/// comma-joined identical copies RFC 9110 8.6 allows.
fn content_length(value: &[u8]) -> Result<u64, HeadError> {
    let mut result = None;
    for part in value.split(|&c| c == b',') {
        let part = part.trim_ascii();
        if part.is_empty() || part.len() > 18 || !part.iter().all(u8::is_ascii_digit) {
            return Err(bad("malformed Content-Length"));
        }
        let n = part.iter().fold(0u64, |n, d| n * 10 + u64::from(d - b'0'));
        match result {
            Some(prev) if prev != n => return Err(bad("conflicting Content-Length values")),
            _ => result = Some(n),
        }
    }
    result.ok_or(bad("malformed Content-Length"))
}

/// Framing headers as they accumulate over the header lines.
#[derive(Default)]
struct Framing {
    length: Option<u64>,
    /// `Transfer-Encoding` lines seen, and whether their whole list is exactly `chunked`.
    te_lines: u32,
    te_chunked_only: bool,
    /// The last coding of the last `Transfer-Encoding` line is `chunked`.
    te_last_chunked: bool,
}

impl Framing {
    fn add(&mut self, name: &[u8], value: &[u8]) -> Result<(), HeadError> {
        if name_is(name, b"content-length") {
            let n = content_length(value)?;
            if self.length.is_some_and(|prev| prev != n) {
                return Err(bad("conflicting Content-Length headers"));
            }
            self.length = Some(n);
        } else if name_is(name, b"transfer-encoding") {
            self.te_lines += 1;
            self.te_chunked_only = self.te_lines == 1 && value.eq_ignore_ascii_case(b"chunked");
            self.te_last_chunked = value
                .rsplit(|&c| c == b',')
                .next()
                .is_some_and(|t| t.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
        Ok(())
    }
}

/// Checks a `Host` value or a target's authority: `host[:port]` with no userinfo, path,
/// whitespace or control bytes.
fn valid_authority(a: &[u8]) -> bool {
    !a.is_empty()
        && a.iter().all(|&c| {
            c.is_ascii_alphanumeric()
                || matches!(
                    c,
                    b'-' | b'.'
                        | b'_'
                        | b'~'
                        | b':'
                        | b'['
                        | b']'
                        | b'%'
                        | b'!'
                        | b'$'
                        | b'&'
                        | b'\''
                        | b'('
                        | b')'
                        | b'*'
                        | b'+'
                        | b','
                        | b';'
                        | b'='
                )
        })
}

fn is_idempotent(method: &[u8]) -> bool {
    matches!(
        method,
        b"GET" | b"HEAD" | b"PUT" | b"DELETE" | b"OPTIONS" | b"TRACE"
    )
}

/// Parses a request head at the start of `buf` into `headers` (cleared first; kept between
/// calls so its capacity is reused). `Ok(None)` while the head is incomplete; an incomplete
/// head longer than `max_len` is refused with 431.
pub fn parse_request(
    buf: &[u8],
    headers: &mut Vec<HeaderSpan>,
    max_len: usize,
) -> Result<Option<RequestHead>, HeadError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut raw);
    let len = match req.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max_len => n,
        Ok(_) if buf.len() > max_len => {
            return Err(HeadError {
                status: 431,
                reason: "request head too large",
            })
        }
        Ok(httparse::Status::Complete(_)) | Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HeadError {
                status: 431,
                reason: "too many request headers",
            })
        }
        Err(_) => return Err(bad("malformed request head")),
    };
    let (Some(method), Some(target), Some(version)) = (req.method, req.path, req.version) else {
        return Err(bad("malformed request line"));
    };
    let method = method.as_bytes();
    let target_b = target.as_bytes();
    headers.clear();
    let mut framing = Framing::default();
    let mut host: Option<Span> = None;
    let (mut close, mut keep_alive, mut conn_upgrade) = (false, false, false);
    let mut connection_lists = false;
    let (mut has_upgrade, mut expect_continue) = (false, false);
    for h in req.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value.trim_ascii();
        framing.add(name, value)?;
        if name_is(name, b"host") {
            if host.is_some() {
                return Err(bad("more than one Host header"));
            }
            if !valid_authority(value) {
                return Err(bad("malformed Host header"));
            }
            host = Some(Span::within(buf, value));
        } else if name_is(name, b"connection") {
            close |= has_token(value, b"close");
            keep_alive |= has_token(value, b"keep-alive");
            conn_upgrade |= has_token(value, b"upgrade");
            connection_lists |= lists_others(value);
        } else if name_is(name, b"upgrade") {
            has_upgrade = true;
        } else if name_is(name, b"expect") {
            expect_continue |= value.eq_ignore_ascii_case(b"100-continue");
        }
        headers.push(HeaderSpan {
            name: Span::within(buf, name),
            value: Span::within(buf, value),
        });
    }
    let framing = match (framing.length, framing.te_lines) {
        (Some(_), 1..) => return Err(bad("both Content-Length and Transfer-Encoding")),
        (_, 1..) if version == 0 => return Err(bad("Transfer-Encoding in an HTTP/1.0 request")),
        (_, 1..) if framing.te_chunked_only => BodyFraming::Chunked,
        (_, 1..) => {
            return Err(HeadError {
                status: 501,
                reason: "unsupported Transfer-Encoding (only chunked is accepted)",
            })
        }
        (Some(0) | None, _) => BodyFraming::None,
        (Some(n), _) => BodyFraming::Length(n),
    };
    if method == b"CONNECT" {
        return Err(HeadError {
            status: 501,
            reason: "CONNECT is not supported",
        });
    }
    let target_span = Span::within(buf, target_b);
    let path_and_query = if target_b.first() == Some(&b'/') {
        target_span
    } else if target_b == b"*" {
        if method != b"OPTIONS" {
            return Err(bad("request target * is only for OPTIONS"));
        }
        target_span
    } else {
        // absolute-form: scheme "://" authority [path-abempty] ["?" query]
        let rest = [&b"http://"[..], b"https://"]
            .iter()
            .find(|s| target_b.len() >= s.len() && target_b[..s.len()].eq_ignore_ascii_case(s))
            .map(|s| s.len())
            .ok_or(bad("malformed request target"))?;
        let auth_len = target_b[rest..]
            .iter()
            .position(|&c| c == b'/' || c == b'?')
            .unwrap_or(target_b.len() - rest);
        let authority = &target_b[rest..rest + auth_len];
        if !valid_authority(authority) {
            return Err(bad("malformed authority in the request target"));
        }
        if let Some(h) = host {
            if h.of(buf) != authority {
                return Err(bad(
                    "Host header differs from the request target's authority",
                ));
            }
        }
        host = Some(Span::within(buf, authority));
        target_span.skip(rest + auth_len)
    };
    if version == 1 && host.is_none() {
        return Err(bad("HTTP/1.1 request without Host"));
    }
    let pq = path_and_query.of(buf);
    let path_len = pq.iter().position(|&c| c == b'?').unwrap_or(pq.len()) as u32;
    Ok(Some(RequestHead {
        len,
        method: Span::within(buf, method),
        target: target_span,
        path_and_query,
        path_len,
        host,
        version,
        framing,
        close: close || (version == 0 && !keep_alive),
        upgrade: version == 1 && has_upgrade && conn_upgrade,
        expect_continue: version == 1 && expect_continue,
        idempotent: is_idempotent(method),
        is_head: method == b"HEAD",
        connection_lists,
    }))
}

/// Parses a backend's response head at the start of `buf` into `headers`. `head_request` marks
/// the answer to `HEAD`. `Ok(None)` while incomplete; errors mean the backend is broken (502).
pub fn parse_response(
    buf: &[u8],
    headers: &mut Vec<HeaderSpan>,
    head_request: bool,
    max_len: usize,
) -> Result<Option<ResponseHead>, HeadError> {
    let mut raw = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut raw);
    let len = match resp.parse(buf) {
        Ok(httparse::Status::Complete(n)) if n <= max_len => n,
        Ok(_) if buf.len() > max_len => return Err(bad("response head too large")),
        Ok(_) => return Ok(None),
        Err(_) => return Err(bad("malformed response head")),
    };
    let (Some(status), Some(version)) = (resp.code, resp.version) else {
        return Err(bad("malformed status line"));
    };
    let reason = resp.reason.unwrap_or("").as_bytes();
    headers.clear();
    let mut framing = Framing::default();
    let (mut close, mut keep_alive, mut connection_lists) = (false, false, false);
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        let value = h.value.trim_ascii();
        if name_is(name, b"connection") {
            close |= has_token(value, b"close");
            keep_alive |= has_token(value, b"keep-alive");
            connection_lists |= lists_others(value);
        }
        framing.add(name, value)?;
        headers.push(HeaderSpan {
            name: Span::within(buf, name),
            value: Span::within(buf, value),
        });
    }
    let no_body = head_request || (100..200).contains(&status) || status == 204 || status == 304;
    let body = if no_body {
        BodyFraming::None
    } else if framing.te_lines > 0 {
        // RFC 9112 6.3: Transfer-Encoding wins over Content-Length; a response whose final
        // coding is not chunked is delimited by the connection closing.
        if framing.te_last_chunked {
            BodyFraming::Chunked
        } else {
            BodyFraming::UntilClose
        }
    } else {
        match framing.length {
            Some(0) => BodyFraming::None,
            Some(n) => BodyFraming::Length(n),
            None => BodyFraming::UntilClose,
        }
    };
    let reason = if reason.is_empty() {
        Span::default()
    } else {
        Span::within(buf, reason)
    };
    Ok(Some(ResponseHead {
        len,
        status,
        reason,
        version,
        framing: body,
        close: close || (version == 0 && !keep_alive) || body == BodyFraming::UntilClose,
        connection_lists,
    }))
}

/// A parsed request with its buffer and header spans: what strategies read on the lean path.
#[derive(Debug, Clone, Copy)]
pub struct ParsedRequest<'a> {
    /// The buffer the head was parsed from.
    pub buf: &'a [u8],
    /// The head.
    pub head: &'a RequestHead,
    /// Its headers.
    pub headers: &'a [HeaderSpan],
}

impl crate::plugin::HeadView for ParsedRequest<'_> {
    fn method(&self) -> &[u8] {
        self.head.method.of(self.buf)
    }
    fn authority(&self) -> Option<&[u8]> {
        self.head.host.map(|h| h.of(self.buf))
    }
    fn path(&self) -> &[u8] {
        self.head.path(self.buf)
    }
    fn query(&self) -> Option<&[u8]> {
        self.head.query(self.buf)
    }
    fn path_and_query(&self) -> &[u8] {
        match self.head.path_and_query.of(self.buf) {
            b"" => b"/",
            pq => pq,
        }
    }
    fn find_header<'s>(
        &'s self,
        name: &[u8],
        found: &mut dyn FnMut(&'s [u8]) -> Option<&'s [u8]>,
    ) -> Option<&'s [u8]> {
        self.headers
            .iter()
            .filter(|h| name_is(h.name.of(self.buf), name))
            .find_map(|h| found(h.value.of(self.buf)))
    }
}

impl crate::forwarding::IncomingHeaders for ParsedRequest<'_> {
    fn each_value<'s>(&'s self, name: &[u8], each: &mut dyn FnMut(&'s [u8])) {
        for h in self.headers {
            if name_is(h.name.of(self.buf), name) {
                each(h.value.of(self.buf));
            }
        }
    }
}

/// Writes headers into a head being assembled (`name: value` CRLF).
#[derive(Debug)]
pub struct HeadWriter<'a>(pub &'a mut Vec<u8>);

impl crate::forwarding::HeaderSink for HeadWriter<'_> {
    fn start(&mut self, name: &str) {
        self.0.extend_from_slice(name.as_bytes());
        self.0.extend_from_slice(b": ");
    }
    fn push(&mut self, part: &[u8]) {
        self.0.extend_from_slice(part);
    }
    fn end(&mut self) {
        self.0.extend_from_slice(b"\r\n");
    }
}

/// Tracks where a forwarded body ends without copying or decoding it: bytes pass through
/// unchanged, and [`BodyCursor::advance`] says how many of them still belong to the body.
#[derive(Debug, Clone)]
pub enum BodyCursor {
    /// This many bytes left.
    Length(u64),
    /// A chunked body, validated as it passes (a malformed one is an error, never forwarded
    /// past the fault).
    Chunked(ChunkedDecoder),
    /// Until the peer closes.
    UntilClose,
    /// Complete.
    Done,
}

impl BodyCursor {
    /// A cursor at the start of a body with `framing`.
    pub fn new(framing: BodyFraming) -> BodyCursor {
        match framing {
            BodyFraming::None | BodyFraming::Length(0) => BodyCursor::Done,
            BodyFraming::Length(n) => BodyCursor::Length(n),
            BodyFraming::Chunked => BodyCursor::Chunked(ChunkedDecoder::new()),
            BodyFraming::UntilClose => BodyCursor::UntilClose,
        }
    }

    /// True once the whole body has passed.
    pub fn is_done(&self) -> bool {
        matches!(self, BodyCursor::Done)
    }

    /// Consumes body bytes from the start of `input`; returns how many belong to the body (the
    /// rest is the next message).
    pub fn advance(&mut self, input: &[u8]) -> Result<usize, crate::http1::ParseError> {
        let used = match self {
            BodyCursor::Done => 0,
            BodyCursor::UntilClose => input.len(),
            BodyCursor::Length(left) => {
                let n = (*left).min(input.len() as u64);
                *left -= n;
                n as usize
            }
            BodyCursor::Chunked(d) => d.scan(input)?,
        };
        let done = match self {
            BodyCursor::Length(0) => true,
            BodyCursor::Chunked(d) => d.is_done(),
            _ => false,
        };
        if done {
            *self = BodyCursor::Done;
        }
        Ok(used)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(text: &[u8]) -> Result<Option<RequestHead>, HeadError> {
        parse_request(text, &mut Vec::new(), 64 * 1024)
    }

    fn refused(text: &str) -> HeadError {
        req(text.as_bytes()).expect_err(text)
    }

    #[test]
    fn a_plain_request_is_parsed_in_place() {
        let buf = b"GET /a/b?x=1&y=2 HTTP/1.1\r\nHost: Example.com:8080\r\nX-A:  v \r\n\r\nNEXT";
        let mut hs = Vec::new();
        let h = parse_request(buf, &mut hs, 1024).unwrap().unwrap();
        assert_eq!(&buf[h.len..], b"NEXT");
        assert_eq!(h.method.of(buf), b"GET");
        assert_eq!(h.path(buf), b"/a/b");
        assert_eq!(h.query(buf), Some(&b"x=1&y=2"[..]));
        assert_eq!(h.host.unwrap().of(buf), b"Example.com:8080");
        assert_eq!(h.framing, BodyFraming::None);
        assert!(h.idempotent && !h.close && !h.upgrade);
        assert_eq!(hs.len(), 2);
        assert_eq!(hs[1].value.of(buf), b"v");
        assert_eq!(req(b"GET / HTTP/1.1\r\nHost: a"), Ok(None));
    }

    #[test]
    fn absolute_form_takes_its_authority() {
        let buf = b"GET http://a.example/p?q HTTP/1.1\r\nHost: a.example\r\n\r\n";
        let h = req(buf).unwrap().unwrap();
        assert_eq!(h.host.unwrap().of(buf), b"a.example");
        assert_eq!(h.path(buf), b"/p");
        let buf = b"GET http://a.example HTTP/1.1\r\n\r\n";
        let h = req(buf).unwrap().unwrap();
        assert_eq!(h.path(buf), b"");
    }

    #[test]
    fn framing_close_and_upgrade_are_read() {
        let buf =
            b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5, 5\r\nConnection: close\r\n\r\n";
        let h = req(buf).unwrap().unwrap();
        assert_eq!(h.framing, BodyFraming::Length(5));
        assert!(h.close && !h.idempotent);
        let buf = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: Chunked\r\n\r\n";
        assert_eq!(req(buf).unwrap().unwrap().framing, BodyFraming::Chunked);
        let buf = b"GET / HTTP/1.0\r\n\r\n";
        assert!(
            req(buf).unwrap().unwrap().close,
            "HTTP/1.0 closes by default"
        );
        let buf = b"GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n";
        assert!(!req(buf).unwrap().unwrap().close);
        let buf = b"GET /ws HTTP/1.1\r\nHost: a\r\nConnection: keep-alive, Upgrade\r\nUpgrade: websocket\r\n\r\n";
        let h = req(buf).unwrap().unwrap();
        assert!(h.upgrade && !h.connection_lists);
        let buf =
            b"GET / HTTP/1.1\r\nHost: a\r\nConnection: close, X-Secret\r\nX-Secret: 1\r\n\r\n";
        let mut spans = Vec::new();
        let h = parse_request(buf, &mut spans, 1024).unwrap().unwrap();
        assert!(h.connection_lists);
        assert!(listed_in_connection(buf, &spans, b"x-secret"));
        assert!(!listed_in_connection(buf, &spans, b"host"));
        let buf = b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n";
        assert!(req(buf).unwrap().unwrap().expect_continue);
    }

    /// Every smuggling shape is refused with its reason, as pingora's own parser refuses them
    /// (and a few it tolerates: both framing headers, codings other than chunked).
    #[test]
    fn smuggling_shapes_are_refused() {
        let cases: &[(&str, u16)] = &[
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 3, 4\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +3\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 0x10\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1 2\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 99999999999999999999\r\n\r\n", 400),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n", 501),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n", 501),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n", 501),
            ("POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n", 501),
            ("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX-Folded: a\r\n b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nBad Name: x\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n", 400),
            ("G(T / HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET /a b HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: user@a\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\nHost: a/b\r\n\r\n", 400),
            ("GET / HTTP/1.1\r\n\r\n", 400),
            ("GET http://a/ HTTP/1.1\r\nHost: b\r\n\r\n", 400),
            ("GET http://u@a/ HTTP/1.1\r\nHost: u@a\r\n\r\n", 400),
            ("GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET a HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a:443\r\n\r\n", 501),
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 400),
        ];
        for (text, status) in cases {
            let e = refused(text);
            assert_eq!(e.status, *status, "{text:?}: {}", e.reason);
        }
        assert!(req(b"OPTIONS * HTTP/1.1\r\nHost: a\r\n\r\n")
            .unwrap()
            .is_some());
    }

    #[test]
    fn long_heads_and_many_headers_are_431() {
        let mut long = b"GET / HTTP/1.1\r\nHost: a\r\nX: ".to_vec();
        long.extend(std::iter::repeat_n(b'a', 2000));
        assert_eq!(
            parse_request(&long, &mut Vec::new(), 1024)
                .unwrap_err()
                .status,
            431
        );
        let mut many = b"GET / HTTP/1.1\r\nHost: a\r\n".to_vec();
        for i in 0..MAX_HEADERS {
            many.extend(format!("X-{i}: v\r\n").as_bytes());
        }
        many.extend(b"\r\n");
        assert_eq!(req(&many).unwrap_err().status, 431);
    }

    #[test]
    fn responses_parse_with_framing() {
        let mut hs = Vec::new();
        let buf = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello";
        let r = parse_response(buf, &mut hs, false, 1024).unwrap().unwrap();
        assert_eq!(
            (r.status, r.framing, r.close),
            (200, BodyFraming::Length(5), false)
        );
        assert_eq!(r.reason.of(buf), b"OK");
        let buf = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\n";
        let r = parse_response(buf, &mut hs, true, 1024).unwrap().unwrap();
        assert_eq!(r.framing, BodyFraming::None, "HEAD answers have no body");
        let buf =
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\nContent-Length: 3\r\n\r\n";
        let r = parse_response(buf, &mut hs, false, 1024).unwrap().unwrap();
        assert_eq!(r.framing, BodyFraming::Chunked);
        let buf = b"HTTP/1.0 200 OK\r\n\r\n";
        let r = parse_response(buf, &mut hs, false, 1024).unwrap().unwrap();
        assert_eq!((r.framing, r.close), (BodyFraming::UntilClose, true));
        let buf = b"HTTP/1.1 304 Not Modified\r\nContent-Length: 9\r\n\r\n";
        let r = parse_response(buf, &mut hs, false, 1024).unwrap().unwrap();
        assert_eq!(r.framing, BodyFraming::None);
        let buf = b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
        assert!(parse_response(buf, &mut hs, false, 1024).is_err());
        let buf = b"HTTP/1.1 101 Switching Protocols\r\nConnection: upgrade\r\n\r\n";
        let r = parse_response(buf, &mut hs, false, 1024).unwrap().unwrap();
        assert_eq!((r.status, r.framing), (101, BodyFraming::None));
    }

    #[test]
    fn body_cursor_stops_at_the_end_of_the_body() {
        let mut c = BodyCursor::new(BodyFraming::Length(4));
        assert_eq!(c.advance(b"ab").unwrap(), 2);
        assert_eq!(c.advance(b"cdNEXT").unwrap(), 2);
        assert!(c.is_done());
        let mut c = BodyCursor::new(BodyFraming::Chunked);
        let body = b"3\r\nabc\r\n0\r\n\r\nNEXT";
        assert_eq!(c.advance(body).unwrap(), body.len() - 4);
        assert!(c.is_done());
        let mut c = BodyCursor::new(BodyFraming::Chunked);
        assert!(
            c.advance(b"3;ext\nx\r\nabc\r\n").is_err(),
            "bare LF in an extension"
        );
    }
}
