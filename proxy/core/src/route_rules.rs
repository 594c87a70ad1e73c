//! What a route does besides naming a pool: header edits, path rewrites, redirects and fixed
//! responses, and the extra match conditions (method, header, path regex).
//!
//! Everything is checked and precompiled when the config is loaded (names and values parsed, the
//! regex compiled), so the request path only compares and copies bytes. The same compiled rules
//! serve the lean path (which writes bytes) and the pingora path (which edits header maps).

use std::collections::BTreeMap;
use std::ops::Range;

use http::{HeaderName, HeaderValue};
use serde::Deserialize;
use toml::Spanned;

/// `request_headers` / `response_headers`: `{ set = {..}, add = {..}, remove = [..] }`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HeaderEditsConfig {
    /// Replace every incoming field of the name with this one value.
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    /// Append a field, keeping incoming ones.
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    /// Drop every incoming field of the name.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `replace_prefix = { from = "/old", to = "/new" }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReplacePrefixConfig {
    /// The prefix to replace.
    pub from: String,
    /// What replaces it.
    pub to: String,
}

/// `redirect = { ... }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// 301, 302, 303, 307 or 308.
    #[serde(default = "default_redirect_status")]
    pub status: u16,
    /// A fixed `Location` (an absolute URL or a path).
    #[serde(default)]
    pub to: Option<String>,
    /// Scheme of the new URL (the request's path and query are kept).
    #[serde(default)]
    pub scheme: Option<String>,
    /// Host of the new URL.
    #[serde(default)]
    pub host: Option<String>,
    /// Port of the new URL.
    #[serde(default)]
    pub port: Option<u16>,
}

fn default_redirect_status() -> u16 {
    302
}

/// `respond = { status = 200, body = "...", content_type = "..." }`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RespondConfig {
    /// Status code.
    #[serde(default = "default_respond_status")]
    pub status: u16,
    /// Body text.
    #[serde(default)]
    pub body: String,
    /// `Content-Type` (default `text/plain; charset=utf-8` when there is a body).
    #[serde(default)]
    pub content_type: Option<String>,
}

fn default_respond_status() -> u16 {
    200
}

/// A `headers` match entry: a string is an exact value, `true` means present, `false` absent.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum HeaderMatchConfig {
    /// The header has a field with exactly this value.
    Value(String),
    /// The header is present (`true`) or absent (`false`).
    Present(bool),
}

/// A config problem in one route: where, and what to do.
#[derive(Debug)]
pub struct RuleError {
    /// Where in the file (the route's own span when the key has none).
    pub span: Range<usize>,
    /// The message.
    pub message: String,
}

fn err<T>(span: Range<usize>, message: impl Into<String>) -> Result<T, RuleError> {
    Err(RuleError {
        span,
        message: message.into(),
    })
}

/// Headers no route may edit: they frame the message or the connection, or say where it goes,
/// and sluice manages them itself. The forwarding headers are `[server.forwarding]`'s.
const NOT_EDITABLE: [&str; 14] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "host",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
    "via",
];

/// A header name from the config: valid, lower-cased, and not one sluice manages.
fn editable_name(name: &str, span: &Range<usize>, what: &str) -> Result<HeaderName, RuleError> {
    let parsed = HeaderName::from_bytes(name.as_bytes()).map_err(|_| RuleError {
        span: span.clone(),
        message: format!(
            "{what}: \"{name}\" is not a valid header name; use letters, digits and '-'"
        ),
    })?;
    if NOT_EDITABLE.contains(&parsed.as_str()) {
        let why = if parsed.as_str().starts_with("x-forwarded")
            || parsed == "forwarded"
            || parsed == "via"
        {
            "it is managed by [server.forwarding]; configure it there"
        } else {
            "it frames the message or the connection, which sluice manages itself"
        };
        return err(
            span.clone(),
            format!("{what}: header \"{name}\" cannot be edited: {why}"),
        );
    }
    Ok(parsed)
}

fn header_value(
    value: &str,
    name: &str,
    span: &Range<usize>,
    what: &str,
) -> Result<HeaderValue, RuleError> {
    HeaderValue::from_str(value).map_err(|_| RuleError {
        span: span.clone(),
        message: format!("{what}: the value of \"{name}\" is not a valid header value (no control characters such as line breaks)"),
    })
}

/// Header edits, compiled: the names whose incoming fields are dropped, then the fields written.
#[derive(Debug, Default, Clone)]
pub struct HeaderEdits {
    /// `remove` and `set` names (lower-case): incoming fields with these names are not kept.
    drop: Vec<HeaderName>,
    /// `set`, then `add` fields, written after the kept ones.
    write: Vec<(HeaderName, HeaderValue)>,
}

impl HeaderEdits {
    /// Compiles `cfg` (`what` names it in messages, e.g. `request_headers`).
    pub fn compile(cfg: &Spanned<HeaderEditsConfig>, what: &str) -> Result<HeaderEdits, RuleError> {
        let span = cfg.span();
        let c = cfg.get_ref();
        let mut edits = HeaderEdits::default();
        for name in &c.remove {
            let n = editable_name(name, &span, &format!("{what}.remove"))?;
            if c.set.keys().any(|s| s.eq_ignore_ascii_case(name)) {
                return err(span, format!("{what}: \"{name}\" is both removed and set; `set` already replaces incoming fields, so keep only one"));
            }
            edits.drop.push(n);
        }
        for (name, value) in &c.set {
            let n = editable_name(name, &span, &format!("{what}.set"))?;
            let v = header_value(value, name, &span, &format!("{what}.set"))?;
            edits.drop.push(n.clone());
            edits.write.push((n, v));
        }
        for (name, value) in &c.add {
            let n = editable_name(name, &span, &format!("{what}.add"))?;
            if c.remove.iter().any(|r| r.eq_ignore_ascii_case(name)) {
                return err(span, format!("{what}: \"{name}\" is both removed and added; use `set` to replace incoming fields with one value"));
            }
            let v = header_value(value, name, &span, &format!("{what}.add"))?;
            edits.write.push((n, v));
        }
        Ok(edits)
    }

    /// No edits at all.
    pub fn is_empty(&self) -> bool {
        self.drop.is_empty() && self.write.is_empty()
    }

    /// Whether an incoming field named `name` (any case) is dropped.
    pub fn drops(&self, name: &[u8]) -> bool {
        self.drop
            .iter()
            .any(|d| d.as_str().as_bytes().eq_ignore_ascii_case(name))
    }

    /// The names whose incoming fields are dropped.
    pub fn dropped(&self) -> &[HeaderName] {
        &self.drop
    }

    /// The fields to write after the kept ones.
    pub fn fields(&self) -> &[(HeaderName, HeaderValue)] {
        &self.write
    }
}

/// A path rewrite: the part of the path that replaces a matched prefix.
#[derive(Debug, Clone)]
pub enum PathRewrite {
    /// `strip_prefix`: the prefix goes; the path keeps a leading `/`.
    Strip(Box<[u8]>),
    /// `replace_prefix`.
    Replace {
        /// Prefix to replace.
        from: Box<[u8]>,
        /// Its replacement.
        to: Box<[u8]>,
    },
}

/// A path prefix for a rewrite: starts with `/`, and is a valid path (no query, no spaces).
fn rewrite_path(p: &str, span: &Range<usize>, what: &str) -> Result<Box<[u8]>, RuleError> {
    let valid = p.starts_with('/')
        && !p.contains(['?', '#'])
        && p.parse::<http::uri::PathAndQuery>().is_ok();
    if !valid {
        return err(
            span.clone(),
            format!("{what} \"{p}\" is not a path; write it like \"/api\" (starting with '/', no query, no spaces)"),
        );
    }
    Ok(p.as_bytes().into())
}

impl PathRewrite {
    /// The path as sent upstream, in two parts to write one after the other; `None` when the
    /// path does not start with the prefix (it then goes unchanged).
    pub fn apply<'a>(&'a self, path: &'a [u8]) -> Option<(&'a [u8], &'a [u8])> {
        match self {
            PathRewrite::Strip(prefix) => {
                let rest = path.strip_prefix(&**prefix)?;
                Some((if rest.starts_with(b"/") { b"" } else { b"/" }, rest))
            }
            PathRewrite::Replace { from, to } => {
                let rest = path.strip_prefix(&**from)?;
                // "/" replacing "/api" in "/api/x" gives "/x", not "//x".
                let rest = match (to.ends_with(b"/"), rest.strip_prefix(b"/")) {
                    (true, Some(r)) => r,
                    _ => rest,
                };
                Some((to, rest))
            }
        }
    }
}

/// A redirect.
#[derive(Debug, Clone)]
pub struct Redirect {
    /// 301, 302, 303, 307 or 308.
    pub status: u16,
    target: RedirectTarget,
}

#[derive(Debug, Clone)]
enum RedirectTarget {
    /// `to`: this exact `Location`.
    Fixed(Box<[u8]>),
    /// Built from the request: scheme, host and port replaced as given, path and query kept.
    Rebuilt {
        scheme: Option<Box<str>>,
        host: Option<Box<[u8]>>,
        port: Option<u16>,
    },
}

impl Redirect {
    fn compile(cfg: &Spanned<RedirectConfig>) -> Result<Redirect, RuleError> {
        let span = cfg.span();
        let c = cfg.get_ref();
        if !matches!(c.status, 301 | 302 | 303 | 307 | 308) {
            return err(
                span,
                format!(
                    "redirect status {} is not a redirect; use 301, 302, 303, 307 or 308",
                    c.status
                ),
            );
        }
        let rebuilt = c.scheme.is_some() || c.host.is_some() || c.port.is_some();
        let target = match (&c.to, rebuilt) {
            (Some(_), true) => {
                return err(span, "redirect: `to` is a whole fixed URL, so it cannot be combined with scheme, host or port; give either `to` or those")
            }
            (None, false) => {
                return err(span, "redirect needs a target: `to = \"https://example.com/new\"`, or `scheme = \"https\"` (and/or host, port) to keep the request's path and query")
            }
            (Some(to), false) => {
                if to.is_empty() || HeaderValue::from_str(to).is_err() || to.contains(' ') {
                    return err(span, format!("redirect: `to` \"{to}\" is not a URL; write it like \"https://example.com/new\" or \"/new\""));
                }
                RedirectTarget::Fixed(to.as_bytes().into())
            }
            (None, true) => {
                if let Some(s) = &c.scheme {
                    if s != "http" && s != "https" {
                        return err(span, format!("redirect: scheme \"{s}\" is not supported; use \"http\" or \"https\""));
                    }
                }
                if let Some(h) = &c.host {
                    let ok = !h.is_empty()
                        && !h.contains([':', '/', '?', '#', '@'])
                        && h.parse::<http::uri::Authority>().is_ok();
                    if !ok {
                        return err(span, format!("redirect: host \"{h}\" is not a host name; write it like \"example.com\" (no scheme, port or path: give `port` on its own)"));
                    }
                }
                if c.port == Some(0) {
                    return err(span, "redirect: port 0 is not a port");
                }
                RedirectTarget::Rebuilt {
                    scheme: c.scheme.as_deref().map(Into::into),
                    host: c.host.as_ref().map(|h| h.to_ascii_lowercase().into_bytes().into()),
                    port: c.port,
                }
            }
        };
        Ok(Redirect {
            status: c.status,
            target,
        })
    }

    /// Writes the `Location` value for a request with `scheme`, `host` (as sent, port included)
    /// and `path_and_query`. `false` when it cannot be built: the request has no host and the
    /// redirect keeps it.
    pub fn location(
        &self,
        scheme: &str,
        host: Option<&[u8]>,
        path_and_query: &[u8],
        out: &mut Vec<u8>,
    ) -> bool {
        use std::io::Write;
        match &self.target {
            RedirectTarget::Fixed(to) => out.extend_from_slice(to),
            RedirectTarget::Rebuilt {
                scheme: new_scheme,
                host: new_host,
                port,
            } => {
                let out_scheme = new_scheme.as_deref().unwrap_or(scheme);
                out.extend_from_slice(out_scheme.as_bytes());
                out.extend_from_slice(b"://");
                match (new_host, host) {
                    (Some(h), _) => out.extend_from_slice(h),
                    (None, Some(h)) => out.extend_from_slice(crate::http1::strip_port(h)),
                    (None, None) => return false,
                }
                match port {
                    Some(p) => {
                        let _ = write!(out, ":{p}");
                    }
                    // Same scheme and host: the request's port stays. A new scheme or host
                    // takes its default port.
                    None if out_scheme == scheme && new_host.is_none() => {
                        if let Some(h) = host {
                            out.extend_from_slice(&h[crate::http1::strip_port(h).len()..]);
                        }
                    }
                    None => {}
                }
                out.extend_from_slice(if path_and_query.is_empty() {
                    b"/"
                } else {
                    path_and_query
                });
            }
        }
        true
    }
}

/// A fixed response.
#[derive(Debug, Clone)]
pub struct FixedResponse {
    /// Status code.
    pub status: u16,
    /// Body bytes.
    pub body: Box<[u8]>,
    /// `Content-Type`, when there is a body.
    pub content_type: Option<HeaderValue>,
}

impl FixedResponse {
    fn compile(cfg: &Spanned<RespondConfig>) -> Result<FixedResponse, RuleError> {
        let span = cfg.span();
        let c = cfg.get_ref();
        if !(200..=599).contains(&c.status) {
            return err(
                span,
                format!(
                    "respond: status {} is not a final status; use 200-599",
                    c.status
                ),
            );
        }
        if matches!(c.status, 204 | 304) && !c.body.is_empty() {
            return err(
                span,
                format!(
                    "respond: a {} response has no body; remove `body` or use another status",
                    c.status
                ),
            );
        }
        let content_type = match (&c.content_type, c.body.is_empty()) {
            (Some(t), _) => Some(HeaderValue::from_str(t).map_err(|_| RuleError {
                span: span.clone(),
                message: format!("respond: content_type \"{t}\" is not a valid header value"),
            })?),
            (None, false) => Some(HeaderValue::from_static("text/plain; charset=utf-8")),
            (None, true) => None,
        };
        Ok(FixedResponse {
            status: c.status,
            body: c.body.as_bytes().into(),
            content_type,
        })
    }
}

/// What a matched route does.
#[derive(Debug, Clone)]
pub enum Action<P> {
    /// Proxy to this pool (its name in a compiled config, the pool itself once resolved).
    Pool(P),
    /// Answer with a redirect.
    Redirect(Redirect),
    /// Answer with a fixed response.
    Respond(FixedResponse),
}

/// What a route's config says besides host and prefix, compiled.
#[derive(Debug, Clone)]
pub struct Rules<P> {
    /// The connection must be TLS (`Some(true)`, `scheme = "https"`) or plain text
    /// (`Some(false)`, `scheme = "http"`).
    pub tls: Option<bool>,
    /// The path (without query) must match this regex.
    pub path_regex: Option<regex::bytes::Regex>,
    /// The method must be one of these (empty: any).
    pub methods: Vec<Box<str>>,
    /// Every one of these header conditions must hold.
    pub headers: Vec<HeaderMatch>,
    /// What the route does.
    pub action: Action<P>,
    /// Path rewrite before forwarding.
    pub rewrite: Option<PathRewrite>,
    /// Edits of the request head sent upstream.
    pub request_headers: HeaderEdits,
    /// Edits of the response head sent downstream.
    pub response_headers: HeaderEdits,
    /// Access log format for this route's requests (`None`: `[server.access_log]`'s).
    pub access_log: Option<crate::access_log::LogFormat>,
}

impl<P> Rules<P> {
    /// Match conditions beyond host and prefix (a tie-breaker in the match order).
    pub fn conditions(&self) -> usize {
        usize::from(self.path_regex.is_some())
            + usize::from(self.tls.is_some())
            + usize::from(!self.methods.is_empty())
            + self.headers.len()
    }

    /// Replaces the pool name by what `resolve` gives for it.
    pub fn resolve<Q>(self, resolve: impl FnOnce(P) -> Q) -> Rules<Q> {
        Rules {
            tls: self.tls,
            path_regex: self.path_regex,
            methods: self.methods,
            headers: self.headers,
            action: match self.action {
                Action::Pool(p) => Action::Pool(resolve(p)),
                Action::Redirect(r) => Action::Redirect(r),
                Action::Respond(f) => Action::Respond(f),
            },
            rewrite: self.rewrite,
            request_headers: self.request_headers,
            response_headers: self.response_headers,
            access_log: self.access_log,
        }
    }
}

/// One header condition.
#[derive(Debug, Clone)]
pub struct HeaderMatch {
    /// Lower-case name.
    pub name: HeaderName,
    /// What must hold.
    pub want: HeaderWant,
}

/// What a header condition asks.
#[derive(Debug, Clone)]
pub enum HeaderWant {
    /// A field with exactly this value.
    Value(Box<[u8]>),
    /// At least one field.
    Present,
    /// No field.
    Absent,
}

/// The parts of `[[route]]` compiled here.
#[derive(Debug)]
pub struct RulesConfig<'a> {
    /// The route's own span (for errors on keys that have none).
    pub span: Range<usize>,
    /// `scheme`.
    pub scheme: Option<&'a Spanned<String>>,
    /// `path_regex`.
    pub path_regex: Option<&'a Spanned<String>>,
    /// `methods`.
    pub methods: Option<&'a Spanned<Vec<String>>>,
    /// `headers`.
    pub headers: Option<&'a Spanned<BTreeMap<String, HeaderMatchConfig>>>,
    /// `pool`.
    pub pool: Option<&'a Spanned<String>>,
    /// `redirect`.
    pub redirect: Option<&'a Spanned<RedirectConfig>>,
    /// `respond`.
    pub respond: Option<&'a Spanned<RespondConfig>>,
    /// `strip_prefix`.
    pub strip_prefix: Option<&'a Spanned<String>>,
    /// `replace_prefix`.
    pub replace_prefix: Option<&'a Spanned<ReplacePrefixConfig>>,
    /// `request_headers`.
    pub request_headers: Option<&'a Spanned<HeaderEditsConfig>>,
    /// `response_headers`.
    pub response_headers: Option<&'a Spanned<HeaderEditsConfig>>,
    /// `access_log`.
    pub access_log: Option<crate::access_log::LogFormat>,
}

impl RulesConfig<'_> {
    /// Checks and compiles the rules; the pool stays a name.
    pub fn compile(&self) -> Result<Rules<String>, RuleError> {
        let action = match (self.pool, self.redirect, self.respond) {
            (Some(p), None, None) => Action::Pool(p.get_ref().clone()),
            (None, Some(r), None) => Action::Redirect(Redirect::compile(r)?),
            (None, None, Some(f)) => Action::Respond(FixedResponse::compile(f)?),
            (None, None, None) => {
                return err(self.span.clone(), "the route has nowhere to send requests; give it exactly one of `pool = \"NAME\"`, `redirect = { ... }` or `respond = { ... }`")
            }
            _ => {
                let span = self.redirect.map(Spanned::span).or(self.respond.map(Spanned::span)).unwrap_or(self.span.clone());
                return err(span, "the route has more than one of `pool`, `redirect` and `respond`; keep exactly one")
            }
        };
        let proxied = matches!(action, Action::Pool(_));
        let path_regex = match self.path_regex {
            None => None,
            Some(re) => Some(
                regex::bytes::Regex::new(re.get_ref()).map_err(|e| RuleError {
                    span: re.span(),
                    message: format!("path_regex is not a valid regex: {e}"),
                })?,
            ),
        };
        let tls = match self.scheme {
            None => None,
            Some(s) if s.get_ref() == "https" => Some(true),
            Some(s) if s.get_ref() == "http" => Some(false),
            Some(s) => {
                return err(
                    s.span(),
                    format!("scheme = \"{}\" is not \"http\" or \"https\"; it matches plain-text or TLS connections", s.get_ref()),
                )
            }
        };
        let mut methods = Vec::new();
        if let Some(m) = self.methods {
            if m.get_ref().is_empty() {
                return err(m.span(), "methods is empty, so the route would match nothing; list methods like [\"GET\", \"HEAD\"] or remove the key");
            }
            for method in m.get_ref() {
                if http::Method::from_bytes(method.as_bytes()).is_err() || method.is_empty() {
                    return err(
                        m.span(),
                        format!(
                            "methods: \"{method}\" is not an HTTP method; write it like \"GET\""
                        ),
                    );
                }
                // Methods are case-sensitive on the wire; clients send them upper-case.
                methods.push(method.to_ascii_uppercase().into_boxed_str());
            }
        }
        let mut headers = Vec::new();
        if let Some(h) = self.headers {
            for (name, want) in h.get_ref() {
                let n = HeaderName::from_bytes(name.as_bytes()).map_err(|_| RuleError {
                    span: h.span(),
                    message: format!("headers: \"{name}\" is not a valid header name"),
                })?;
                let want = match want {
                    HeaderMatchConfig::Value(v) => {
                        header_value(v, name, &h.span(), "headers")?;
                        HeaderWant::Value(v.as_bytes().into())
                    }
                    HeaderMatchConfig::Present(true) => HeaderWant::Present,
                    HeaderMatchConfig::Present(false) => HeaderWant::Absent,
                };
                headers.push(HeaderMatch { name: n, want });
            }
        }
        let rewrite = match (self.strip_prefix, self.replace_prefix) {
            (Some(s), Some(_)) => {
                return err(s.span(), "strip_prefix and replace_prefix both rewrite the path; keep one (replace_prefix with to = \"/\" strips)")
            }
            (Some(s), None) => Some(PathRewrite::Strip(rewrite_path(s.get_ref(), &s.span(), "strip_prefix")?)),
            (None, Some(r)) => {
                let c = r.get_ref();
                Some(PathRewrite::Replace {
                    from: rewrite_path(&c.from, &r.span(), "replace_prefix.from")?,
                    to: rewrite_path(&c.to, &r.span(), "replace_prefix.to")?,
                })
            }
            (None, None) => None,
        };
        let request_headers = match self.request_headers {
            Some(c) => HeaderEdits::compile(c, "request_headers")?,
            None => HeaderEdits::default(),
        };
        if !proxied {
            let pointless = [
                (self.strip_prefix.map(Spanned::span), "strip_prefix"),
                (self.replace_prefix.map(Spanned::span), "replace_prefix"),
                (self.request_headers.map(Spanned::span), "request_headers"),
            ];
            if let Some((Some(span), key)) = pointless.into_iter().find(|(s, _)| s.is_some()) {
                return err(span, format!("{key} edits the request sent to a pool, but this route answers by itself (redirect or respond); remove {key}"));
            }
        }
        let response_headers = match self.response_headers {
            Some(c) => HeaderEdits::compile(c, "response_headers")?,
            None => HeaderEdits::default(),
        };
        Ok(Rules {
            tls,
            path_regex,
            methods,
            headers,
            action,
            rewrite,
            request_headers,
            response_headers,
            access_log: self.access_log,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_keep_one_leading_slash() {
        let strip = PathRewrite::Strip(b"/api".as_slice().into());
        let join = |r: &PathRewrite, p: &[u8]| r.apply(p).map(|(a, b)| [a, b].concat());
        assert_eq!(join(&strip, b"/api/x").as_deref(), Some(b"/x".as_slice()));
        assert_eq!(join(&strip, b"/api").as_deref(), Some(b"/".as_slice()));
        assert_eq!(join(&strip, b"/other"), None);
        let root = PathRewrite::Replace {
            from: b"/api".as_slice().into(),
            to: b"/".as_slice().into(),
        };
        assert_eq!(join(&root, b"/api/x").as_deref(), Some(b"/x".as_slice()));
        let v2 = PathRewrite::Replace {
            from: b"/v1/".as_slice().into(),
            to: b"/v2/".as_slice().into(),
        };
        assert_eq!(
            join(&v2, b"/v1/users").as_deref(),
            Some(b"/v2/users".as_slice())
        );
    }

    #[test]
    fn redirect_locations() {
        let https = Redirect {
            status: 301,
            target: RedirectTarget::Rebuilt {
                scheme: Some("https".into()),
                host: None,
                port: None,
            },
        };
        let mut out = Vec::new();
        assert!(https.location("http", Some(b"Example.com:8080"), b"/a?b=1", &mut out));
        assert_eq!(out, b"https://Example.com/a?b=1");
        out.clear();
        assert!(!https.location("http", None, b"/a", &mut out));
        let same = Redirect {
            status: 302,
            target: RedirectTarget::Rebuilt {
                scheme: None,
                host: Some(b"new.example".as_slice().into()),
                port: Some(8443),
            },
        };
        out.clear();
        assert!(same.location("https", Some(b"[::1]:80"), b"/x", &mut out));
        assert_eq!(out, b"https://new.example:8443/x");
    }
}
