//! The request being balanced, as seen from `pick`.

use crate::host;

/// A request attribute the host can copy or hash. The discriminants are the ABI's `kind`
/// numbers; see [`Attr::kind`].
///
/// Marked non-exhaustive because the ABI may add kinds without a version change.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Attr<'a> {
    /// Client IP address in text form (`"127.0.0.1"`, `"::1"`).
    ClientIp,
    /// Method (`"GET"`).
    Method,
    /// Host: the `Host` header or HTTP/2 authority, without port.
    Host,
    /// Path without the query string.
    Path,
    /// The first value of the named header (name matched case-insensitively).
    Header(&'a str),
    /// The named cookie.
    Cookie(&'a str),
    /// The named query parameter, raw (not percent-decoded).
    Query(&'a str),
    /// Path and query as sent.
    Uri,
}

/// The ABI's attribute `kind` numbers (`request_attr`, `request_hash`): the one definition the
/// host reads too.
pub mod attr_kind {
    /// [`super::Attr::ClientIp`].
    pub const CLIENT_IP: i32 = 0;
    /// [`super::Attr::Method`].
    pub const METHOD: i32 = 1;
    /// [`super::Attr::Host`].
    pub const HOST: i32 = 2;
    /// [`super::Attr::Path`].
    pub const PATH: i32 = 3;
    /// [`super::Attr::Header`].
    pub const HEADER: i32 = 4;
    /// [`super::Attr::Cookie`].
    pub const COOKIE: i32 = 5;
    /// [`super::Attr::Query`].
    pub const QUERY: i32 = 6;
    /// [`super::Attr::Uri`].
    pub const URI: i32 = 7;
}

impl Attr<'_> {
    /// The ABI `kind` number.
    pub const fn kind(&self) -> i32 {
        match self {
            Attr::ClientIp => attr_kind::CLIENT_IP,
            Attr::Method => attr_kind::METHOD,
            Attr::Host => attr_kind::HOST,
            Attr::Path => attr_kind::PATH,
            Attr::Header(_) => attr_kind::HEADER,
            Attr::Cookie(_) => attr_kind::COOKIE,
            Attr::Query(_) => attr_kind::QUERY,
            Attr::Uri => attr_kind::URI,
        }
    }

    /// The name for named kinds, `""` for the others (the host ignores it then).
    pub const fn name(&self) -> &str {
        match self {
            Attr::Header(n) | Attr::Cookie(n) | Attr::Query(n) => n,
            _ => "",
        }
    }
}

/// Initial size of the attribute buffer: most attributes (IPs, methods, session cookies) fit, so
/// the usual case is one host call and, after the first request, no allocation at all.
const INITIAL_BUF: usize = 256;

/// The request a [`Strategy::pick`](crate::Strategy::pick) is choosing a backend for.
///
/// Nothing about the request crosses the boundary unless asked: each accessor is one host call.
/// The text accessors copy into a buffer owned by this `Request` and reused for every request of
/// the instance, so they do not allocate once the buffer has grown to fit. The price is that the
/// returned `&str` borrows the `Request`: finish with one attribute (compare it, hash it, copy
/// it) before asking for the next. To choose by a hash, [`Request::hash`] is cheaper still; it
/// copies nothing.
///
/// Outside `pick` (in `init` or `on_backends`) there is no request and every attribute is
/// `None`.
#[derive(Debug, Default)]
pub struct Request {
    attempt: u32,
    // Kept at len == usable size, zero-filled, so the host can write into it without unsafe
    // `set_len` on our side.
    buf: Vec<u8>,
}

impl Request {
    pub(crate) const fn new() -> Self {
        Request {
            attempt: 0,
            buf: Vec::new(),
        }
    }

    pub(crate) fn begin(&mut self, attempt: u32) {
        self.attempt = attempt;
    }

    /// `0` for the first try, counting up on each retry of this request.
    pub fn attempt(&self) -> u32 {
        self.attempt
    }

    /// `true` if backend `i` was already tried by this request; `pick` must not return it.
    /// Always `false` on attempt 0, where strategies may skip the call.
    pub fn is_excluded(&self, i: usize) -> bool {
        match i32::try_from(i) {
            Ok(i) => host::excluded(i) == 1,
            // No table index is that large, so it cannot have been tried.
            Err(_) => false,
        }
    }

    /// The raw bytes of `attr`, `None` if the request has none.
    pub fn attr_bytes(&mut self, attr: Attr<'_>) -> Option<&[u8]> {
        if self.buf.is_empty() {
            self.buf.resize(INITIAL_BUF, 0);
        }
        let (kind, name) = (attr.kind(), attr.name());
        // The host reports the full length when the buffer is too small: grow once and ask
        // again. Bounded so a misbehaving host cannot keep us looping until the deadline.
        for _ in 0..3 {
            let n = usize::try_from(host::request_attr(kind, name, &mut self.buf)).ok()?;
            if n <= self.buf.len() {
                return Some(&self.buf[..n]);
            }
            self.buf.resize(n, 0);
        }
        None
    }

    /// `attr` as text; `None` if absent or not valid UTF-8 (use [`Request::attr_bytes`] for
    /// header values that may carry other bytes).
    pub fn attr(&mut self, attr: Attr<'_>) -> Option<&str> {
        self.attr_bytes(attr)
            .and_then(|b| std::str::from_utf8(b).ok())
    }

    /// The client IP address in text form.
    pub fn client_ip(&mut self) -> Option<&str> {
        self.attr(Attr::ClientIp)
    }

    /// The method, e.g. `"GET"`.
    pub fn method(&mut self) -> Option<&str> {
        self.attr(Attr::Method)
    }

    /// The host (the `Host` header or HTTP/2 authority), without port.
    pub fn host(&mut self) -> Option<&str> {
        self.attr(Attr::Host)
    }

    /// The path, without the query string.
    pub fn path(&mut self) -> Option<&str> {
        self.attr(Attr::Path)
    }

    /// Path and query as sent.
    pub fn uri(&mut self) -> Option<&str> {
        self.attr(Attr::Uri)
    }

    /// The first value of header `name` (case-insensitive).
    pub fn header(&mut self, name: &str) -> Option<&str> {
        self.attr(Attr::Header(name))
    }

    /// The value of cookie `name`.
    pub fn cookie(&mut self, name: &str) -> Option<&str> {
        self.attr(Attr::Cookie(name))
    }

    /// The raw (not percent-decoded) value of query parameter `name`.
    pub fn query(&mut self, name: &str) -> Option<&str> {
        self.attr(Attr::Query(name))
    }

    /// The host's hash of `attr` without copying it, `None` if the request has no such
    /// attribute. Equal to [`hash_bytes`](crate::hash_bytes) of the attribute's bytes.
    pub fn hash(&self, attr: Attr<'_>) -> Option<u64> {
        match host::request_hash(attr.kind(), attr.name()) {
            (1, h) => Some(h),
            _ => None,
        }
    }
}
