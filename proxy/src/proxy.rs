//! The request path on pingora: listener → route → pool → strategy → peer, with retries on
//! connect failures and the bookkeeping (in-flight, latency, status) strategies read back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};

use crate::access_log::{AccessLog, RequestFields, ResponseFields};
use crate::config::ClientLimits;
use crate::forwarding::{Forwarding, HeaderSink, Hop, RequestId};
use crate::lease::{Lease, Outcome};
use crate::metrics::Timings;
use crate::plugin::RequestView;
use crate::pool::Pool;
use crate::route::Route;
use crate::route_rules::{Action, HeaderEdits};
use crate::runtime::Runtime;
use crate::tls_name::server_name;
use crate::upstream_tls::{Upstream, UpstreamTls};
use pingora::protocols::tls::CaType;
use pingora::utils::tls::{parse_x509, CertKey, WrappedX509};
use prometheus::Histogram;
use sluice_core::config::UpstreamProtocol;

/// The pingora proxy application.
pub struct SluiceProxy {
    runtime: Arc<Runtime>,
    forwarding: Forwarding,
    log: AccessLog,
    /// The client limits of the listeners this proxy serves: the head and body sizes and the
    /// body timeout are checked here for HTTP/2 and for `http1 = "pingora"`.
    limits: ClientLimits,
}

impl SluiceProxy {
    /// A proxy serving `runtime`'s routes, with `forwarding`'s headers, under `limits`.
    pub fn new(
        runtime: Arc<Runtime>,
        forwarding: Forwarding,
        log: AccessLog,
        limits: ClientLimits,
    ) -> SluiceProxy {
        SluiceProxy {
            runtime,
            forwarding,
            log,
            limits,
        }
    }

    /// Counts a request cut off by a client limit.
    fn rejected(&self, reason: &str) {
        self.runtime
            .metrics
            .limit_rejections
            .with_label_values(&[reason])
            .inc();
    }

    /// This hop as the forwarding headers describe it.
    fn hop<'s>(&self, session: &'s Session) -> Hop<'s> {
        let peer = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
        Hop {
            peer,
            trusted: self.forwarding.trusts(peer),
            scheme: if tls { "https" } else { "http" },
            host: request_host(session).map(str::as_bytes),
        }
    }
}

/// Collects forwarding headers for pingora's request header.
#[derive(Default)]
struct Collected(Vec<(String, Vec<u8>)>);

impl HeaderSink for Collected {
    fn start(&mut self, name: &str) {
        self.0.push((name.to_string(), Vec::new()));
    }
    fn push(&mut self, part: &[u8]) {
        if let Some((_, value)) = self.0.last_mut() {
            value.extend_from_slice(part);
        }
    }
    fn end(&mut self) {}
}

/// Per-request state.
pub struct RequestCtx {
    /// The matched route (its edits apply to the request and response).
    route: Option<Arc<Route>>,
    pool: Option<Arc<Pool>>,
    /// The current attempt's in-flight slot. Replacing or dropping it releases the slot and
    /// records the outcome set on it, so no retry path can leak or double-count.
    lease: Option<Lease>,
    /// Backends whose attempt failed; excluded from later attempts.
    tried: Vec<SocketAddr>,
    attempt: u32,
    /// Short reason sent with an error response.
    reason: Option<String>,
    /// The request id sluice added (the same on every attempt).
    request_id: Option<RequestId>,
    /// When the request started, and the last attempt's backend (for the access log).
    started: Instant,
    backend: Option<Arc<crate::backend::Backend>>,
    /// The current attempt's timeline: when its peer was chosen, its connect time (zero for a
    /// reused connection), when the request was sent, and the time to the response head.
    attempt_started: Option<Instant>,
    connect: Option<Duration>,
    sent_at: Option<Instant>,
    response: Option<Duration>,
    /// Request body bytes seen so far (for `max_body_bytes`).
    body_bytes: u64,
}

impl RequestCtx {
    /// Ends the current attempt with `outcome`; `exclude` keeps its backend out of retries.
    fn end_attempt(&mut self, outcome: Outcome, exclude: bool) {
        if let Some(mut lease) = self.lease.take() {
            if exclude {
                self.tried.push(lease.backend().addr);
            }
            lease.set_outcome(outcome);
        }
    }

    /// Observes `took` in the pool's histogram `which` picks, and in the backend's own when
    /// per-backend metrics are on.
    fn observe(&self, which: impl Fn(&Timings) -> &Histogram, took: Duration) {
        let secs = took.as_secs_f64();
        if let Some(pool) = &self.pool {
            which(&pool.counters.timings).observe(secs);
        }
        let own = self.backend.as_ref().and_then(|b| b.stats.timings.as_ref());
        if let Some(t) = own {
            which(t).observe(secs);
        }
    }

    /// Whether another attempt is allowed and possible.
    fn may_retry(&self) -> bool {
        let Some(pool) = &self.pool else { return false };
        let retries = pool.settings().retries;
        self.attempt <= retries && pool.table().len() > self.tried.len()
    }
}

fn request_host(session: &Session) -> Option<&str> {
    let req = session.req_header();
    req.uri.host().or_else(|| {
        req.headers
            .get(http::header::HOST)
            .and_then(|h| h.to_str().ok())
    })
}

#[async_trait]
impl ProxyHttp for SluiceProxy {
    type CTX = RequestCtx;

    fn new_ctx(&self) -> RequestCtx {
        RequestCtx {
            route: None,
            pool: None,
            lease: None,
            tried: Vec::new(),
            attempt: 0,
            reason: None,
            request_id: None,
            started: Instant::now(),
            backend: None,
            attempt_started: None,
            connect: None,
            sent_at: None,
            response: None,
            body_bytes: 0,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        if let Some(limiter) = &self.runtime.rate_limiter {
            let client_ip = self
                .forwarding
                .client_ip(&self.hop(session), &session.req_header().headers);
            if let Some(Err(wait)) = client_ip.map(|ip| limiter.check(ip)) {
                let secs = crate::rate_limit::retry_after_secs(wait);
                let body = format!("too many requests from this client; retry in {secs} s\n");
                respond_with(session, 429, Some(secs), &body).await?;
                return Ok(true);
            }
        }
        // The lean path enforces these while reading; pingora has read the head already (its own
        // cap is larger), so a head over the limit is refused here, as is a declared body.
        let limits = &self.limits;
        if head_bytes(session.req_header()) > limits.max_header_bytes {
            self.rejected("header_size");
            respond(session, 431, "request header fields too large\n").await?;
            return Ok(true);
        }
        let declared = session
            .req_header()
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        let max_body = limits.max_body_bytes;
        if let Some(n) = declared.filter(|n| max_body > 0 && *n > max_body) {
            self.rejected("body_size");
            let reason = format!("request body of {n} bytes is over the limit of {max_body}\n");
            respond(session, 413, &reason).await?;
            linger(session).await;
            return Ok(true);
        }
        // HTTP/1 (pingora engine): the wait between two reads of the body. A no-op on HTTP/2,
        // whose streams share the connection's idle timeout.
        session.set_read_timeout(Some(limits.body_timeout));
        // HTTP/1 (pingora engine): how long a kept-alive connection may then wait idle for its
        // next request (whole seconds). One the request does not keep alive (`Connection: close`,
        // HTTP/1.0 without keep-alive) stays off.
        if session.get_keepalive().is_some() {
            session.set_keepalive(Some(limits.keepalive_timeout.as_secs().max(1)));
        }
        let route = {
            let router = self.runtime.router();
            let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
            let head: &http::request::Parts = session.req_header();
            router.select(head, tls).cloned()
        };
        let Some(route) = route else {
            respond(session, 404, "no route matches this request\n").await?;
            return Ok(true);
        };
        ctx.route = Some(route.clone());
        let pool = match &route.rules.action {
            Action::Pool(pool) => pool.clone(),
            Action::Redirect(_) | Action::Respond(_) => {
                answer(session, &route).await?;
                return Ok(true);
            }
        };
        // Known from here on, so the request is counted in the pool's metrics whatever happens.
        ctx.pool = Some(pool.clone());
        if pool.table().is_empty() {
            pool.counters.no_backend.inc();
            respond(
                session,
                503,
                &format!("no backend available in pool \"{}\"\n", pool.name),
            )
            .await?;
            return Ok(true);
        }
        pool.count_request();
        Ok(false)
    }

    async fn upstream_peer(
        &self,
        session: &mut Session,
        ctx: &mut RequestCtx,
    ) -> Result<Box<HttpPeer>> {
        let Some(pool) = ctx.pool.clone() else {
            return Error::e_explain(ErrorType::InternalError, "no pool selected");
        };
        // A retry starts a new attempt: the previous one's slot is released here at the latest.
        ctx.lease = None;
        let table = pool.table();
        let client_ip = self
            .forwarding
            .client_ip(&self.hop(session), &session.req_header().headers);
        let tried = &ctx.tried;
        let excluded = |i: usize| {
            table
                .backends
                .get(i)
                .is_some_and(|b| tried.contains(&b.addr))
        };
        let head: &http::request::Parts = session.req_header();
        let view = RequestView {
            header: head,
            client_ip,
            excluded: &excluded,
        };
        let Some(index) = pool.strategy.pick(&table, &view, ctx.attempt) else {
            pool.counters.no_backend.inc();
            ctx.reason = Some(if ctx.tried.is_empty() {
                format!("no backend available in pool \"{}\"\n", pool.name)
            } else {
                format!(
                    "all {} backends tried in pool \"{}\" failed\n",
                    ctx.tried.len(),
                    pool.name
                )
            });
            let code = if ctx.tried.is_empty() { 503 } else { 502 };
            return Error::e_explain(ErrorType::HTTPStatus(code), "no backend available");
        };
        let backend = table.backends[index].clone();
        ctx.attempt += 1;
        let settings = pool.settings();
        let mut peer = HttpPeer::new(backend.addr, false, String::new());
        peer.options.connection_timeout = Some(settings.connect_timeout);
        peer.options.read_timeout = Some(settings.read_timeout);
        peer.options.idle_timeout = Some(settings.idle_timeout);
        upstream_protocol(&mut peer, &settings.upstream, backend.addr.ip());
        ctx.backend = Some(backend.clone());
        ctx.lease = Some(pool.lease(backend));
        ctx.attempt_started = Some(Instant::now());
        (ctx.connect, ctx.sent_at, ctx.response) = (None, None, None);
        Ok(Box::new(peer))
    }

    async fn connected_to_upstream(
        &self,
        _session: &mut Session,
        reused: bool,
        _peer: &HttpPeer,
        #[cfg(unix)] _fd: std::os::unix::io::RawFd,
        #[cfg(windows)] _sock: std::os::windows::io::RawSocket,
        _digest: Option<&pingora::protocols::Digest>,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if reused {
            ctx.connect = Some(Duration::ZERO);
            return Ok(());
        }
        // From the pick to the connection established (pingora's pool lookup included).
        let Some(took) = ctx.attempt_started.map(|t| t.elapsed()) else {
            return Ok(());
        };
        ctx.connect = Some(took);
        ctx.observe(|t| &t.connect, took);
        Ok(())
    }

    async fn request_body_filter(
        &self,
        session: &mut Session,
        body: &mut Option<Bytes>,
        end_of_stream: bool,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // A chunked (or HTTP/2) body is counted as it streams and cut off at the limit: the
        // client gets 413 if no response has started, and the backend a broken request.
        ctx.body_bytes += body.as_ref().map_or(0, |b| b.len() as u64);
        let max = self.limits.max_body_bytes;
        if max > 0 && ctx.body_bytes > max {
            self.rejected("body_size");
            ctx.reason = Some(format!("request body is over the limit of {max} bytes\n"));
            session.set_keepalive(None);
            return Error::e_explain(
                ErrorType::HTTPStatus(413),
                format!("request body over max_body_bytes ({max})"),
            );
        }
        // The whole request is sent once its last body bytes are (the head was sent before).
        if end_of_stream && ctx.sent_at.is_some() {
            ctx.sent_at = Some(Instant::now());
        }
        Ok(())
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        ctx.end_attempt(Outcome::Failed, true);
        // A connect failure never reached the backend, so retrying is safe for every method.
        let allowed = ctx
            .pool
            .as_ref()
            .is_some_and(|p| p.settings().retry_on_connect);
        let retry = allowed && ctx.may_retry();
        if retry {
            if let Some(pool) = &ctx.pool {
                pool.counters.retry_connect.inc();
            }
        }
        e.set_retry(retry);
        e
    }

    fn error_while_proxy(
        &self,
        peer: &HttpPeer,
        session: &mut Session,
        e: Box<Error>,
        ctx: &mut RequestCtx,
        client_reused: bool,
    ) -> Box<Error> {
        // pingora's own rule: a failure on a reused upstream connection (the backend had closed
        // it) may be retried when the request can be replayed.
        let mut e = e.more_context(format!("Peer: {peer}"));
        if e.etype() == &ErrorType::HTTPStatus(413) {
            // The client's body passed the limit: not the backend's fault, and not to retry.
            e.set_retry(false);
            ctx.end_attempt(Outcome::Unknown, false);
            return e;
        }
        if !session.req_header().method.is_idempotent() || session.as_ref().retry_buffer_truncated()
        {
            e.set_retry(false);
        } else {
            e.retry.decide_reuse(client_reused);
        }
        if ctx.lease.is_none() {
            // The attempt was already ended by sluice itself (a 5xx being retried): nothing to add.
            return e;
        }
        if e.retry() {
            // A stale pooled connection says nothing about the backend: release the slot,
            // record nothing, and let it be picked again.
            ctx.end_attempt(Outcome::Unknown, false);
            if let Some(pool) = &ctx.pool {
                pool.counters.retry_reused.inc();
            }
            return e;
        }
        // The backend failed before answering (reset, closed, timed out). An idempotent request
        // that can be replayed goes to another backend, as nginx's `proxy_next_upstream error`.
        let no_answer = ctx
            .lease
            .as_ref()
            .is_some_and(|l| l.outcome() == Outcome::Unknown);
        let replayable = session.req_header().method.is_idempotent()
            && !session.as_ref().retry_buffer_truncated();
        let allowed = ctx
            .pool
            .as_ref()
            .is_some_and(|p| p.settings().retry_on_error);
        if no_answer && replayable && allowed && e.esource() == &ErrorSource::Upstream {
            ctx.end_attempt(Outcome::Failed, true);
            if ctx.may_retry() {
                if let Some(pool) = &ctx.pool {
                    pool.counters.retry_error.inc();
                }
                e.set_retry(true);
            }
        }
        e
    }

    async fn upstream_request_filter(
        &self,
        session: &mut Session,
        upstream_request: &mut pingora::http::RequestHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        // The head goes upstream right after this filter.
        ctx.sent_at = Some(Instant::now());
        let incoming = &session.req_header().headers;
        if ctx.request_id.is_none() && self.forwarding.needs_request_id(incoming) {
            ctx.request_id = Some(RequestId::generate());
        }
        let mut out = Collected::default();
        self.forwarding.write(
            &self.hop(session),
            incoming,
            ctx.request_id.as_ref().map(RequestId::as_bytes),
            &mut out,
        );
        let rewritten: Vec<http::HeaderName> = upstream_request
            .headers
            .keys()
            .filter(|n| self.forwarding.rewrites(n.as_str().as_bytes()))
            .cloned()
            .collect();
        for name in rewritten {
            upstream_request.remove_header(&name);
        }
        for (name, value) in out.0 {
            let value = http::HeaderValue::from_bytes(&value).map_err(|e| {
                Error::because(ErrorType::InternalError, "forwarding header value", e)
            })?;
            upstream_request.append_header(name, value)?;
        }
        // pingora drops `TE` as hop-by-hop, but HTTP/2 keeps `TE: trailers` (RFC 9113 8.2.2),
        // and gRPC servers require it: an HTTP/1.1 client's gRPC request keeps it.
        let h2 = ctx
            .pool
            .as_ref()
            .is_some_and(|p| p.settings().upstream.protocol.is_h2());
        if h2 && upstream_request.headers.get(http::header::TE).is_none() && asks_trailers(incoming)
        {
            upstream_request.insert_header(http::header::TE, "trailers")?;
        }
        if let Some(route) = &ctx.route {
            let rules = &route.rules;
            let edits = &rules.request_headers;
            for name in edits.dropped() {
                upstream_request.remove_header(name);
            }
            for (name, value) in edits.fields() {
                upstream_request.append_header(name, value.clone())?;
            }
            let uri = &upstream_request.uri;
            if let Some((prefix, rest)) = rules
                .rewrite
                .as_ref()
                .and_then(|r| r.apply(uri.path().as_bytes()))
            {
                // The rewritten path with the query kept; scheme and authority (HTTP/2) stay.
                let mut pq = Vec::with_capacity(prefix.len() + rest.len() + 64);
                pq.extend_from_slice(prefix);
                pq.extend_from_slice(rest);
                if let Some(q) = uri.query() {
                    pq.push(b'?');
                    pq.extend_from_slice(q.as_bytes());
                }
                let mut parts = uri.clone().into_parts();
                parts.path_and_query =
                    Some(http::uri::PathAndQuery::try_from(pq).map_err(|e| {
                        Error::because(ErrorType::InternalError, "rewritten path", e)
                    })?);
                let new = http::Uri::from_parts(parts)
                    .map_err(|e| Error::because(ErrorType::InternalError, "rewritten path", e))?;
                upstream_request.set_uri(new);
            }
        }
        Ok(())
    }

    async fn response_filter(
        &self,
        _session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        if let Some(route) = &ctx.route {
            edit_response(resp, &route.rules.response_headers)?;
        }
        Ok(())
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        if !(100..200).contains(&status) || status == 101 {
            if let Some(took) = ctx.sent_at.take().map(|t| t.elapsed()) {
                ctx.response = Some(took);
                ctx.observe(|t| &t.response, took);
            }
        }
        if status >= 500 {
            let policy_allows = ctx.pool.as_ref().is_some_and(|p| {
                let s = p.settings();
                s.retry_on_5xx
                    && (s.retry_non_idempotent || session.req_header().method.is_idempotent())
            });
            // Nothing has been sent downstream yet, so the request can still go elsewhere
            // (pingora replays it; bodies larger than its retry buffer are not retried).
            if policy_allows && ctx.may_retry() && !session.as_ref().retry_buffer_truncated() {
                ctx.end_attempt(Outcome::Status(status), true);
                if let Some(pool) = &ctx.pool {
                    pool.counters.retry_5xx.inc();
                }
                let mut e = Error::explain(
                    ErrorType::HTTPStatus(status),
                    "backend answered 5xx; retrying on another backend",
                );
                e.set_retry(true);
                return Err(e);
            }
        }
        if let Some(lease) = &mut ctx.lease {
            lease.set_outcome(Outcome::Status(status));
        }
        // The backend's keep-alive terms are about its connection to sluice, not the client's.
        resp.remove_header("keep-alive");
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        if head_sent(session) {
            // The response is under way: an error body would be appended to it and read as a
            // good answer. Abort instead (h1: close without the last chunk or with a short body;
            // h2: RST_STREAM), so the client sees a failed response.
            if e.esource() == &ErrorSource::Upstream {
                if let Some(pool) = &ctx.pool {
                    pool.counters.upstream_aborts.inc();
                    tracing::warn!(pool = %pool.name, backend = ctx.lease.as_ref().map(|l| l.backend().addr_text.as_str()).unwrap_or("-"), error = %e, "backend failed after the response head was sent; client connection aborted");
                }
            }
            session.shutdown().await;
            return FailToProxy {
                error_code: 0,
                can_reuse_downstream: false,
            };
        }
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
            // A backend that did not answer in time is a gateway timeout, as nginx says.
            ErrorType::ConnectTimedout | ErrorType::ReadTimedout | ErrorType::WriteTimedout
                if e.esource() == &ErrorSource::Upstream =>
            {
                504
            }
            _ => match e.esource() {
                ErrorSource::Upstream => 502,
                ErrorSource::Downstream => match e.etype() {
                    ErrorType::WriteError | ErrorType::ReadError | ErrorType::ConnectionClosed => 0,
                    _ => 400,
                },
                _ => 500,
            },
        };
        if code > 0 {
            let reason = ctx.reason.take().unwrap_or_else(|| match code {
                502 => "bad gateway: the backend failed\n".to_string(),
                504 => "gateway timeout\n".to_string(),
                // The error's own text can name a backend's address: clients get the status's
                // reason, the log gets the detail.
                _ => {
                    tracing::debug!(error = %e, code, "request failed");
                    let reason = http::StatusCode::from_u16(code)
                        .ok()
                        .and_then(|s| s.canonical_reason())
                        .unwrap_or("error");
                    format!("{}\n", reason.to_ascii_lowercase())
                }
            });
            if let Err(err) = respond(session, code, &reason).await {
                tracing::debug!(error = %err, "could not send the error response downstream");
            }
            if code == 413 {
                linger(session).await;
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, session: &mut Session, e: Option<&Error>, ctx: &mut RequestCtx) {
        let duration = ctx.started.elapsed();
        // Body bytes only: a head's size is not defined the same way on HTTP/1 and HTTP/2.
        let (body_in, body_out) = (
            session.body_bytes_read() as u64,
            session.body_bytes_sent() as u64,
        );
        if let Some(pool) = &ctx.pool {
            pool.counters.request_bytes.inc_by(body_in);
            pool.counters.response_bytes.inc_by(body_out);
        }
        ctx.observe(|t| &t.duration, duration);
        let format = ctx
            .route
            .as_ref()
            .and_then(|r| r.rules.access_log)
            .unwrap_or(self.log.format());
        if let Some(mut line) = self.log.line_as(format) {
            let req = session.req_header();
            let peer = session.client_addr().and_then(|a| a.as_inet()).copied();
            let tls = session.digest().and_then(|d| d.ssl_digest.clone());
            line.request(&RequestFields {
                time: std::time::SystemTime::now() - duration,
                client: peer.map(|a| (a.ip(), a.port())),
                method: Some(req.method.as_str().as_bytes()),
                host: request_host(session).map(str::as_bytes),
                target: Some(
                    req.uri
                        .path_and_query()
                        .map_or(b"/".as_slice(), |p| p.as_str().as_bytes()),
                ),
                version: Some(match req.version {
                    http::Version::HTTP_10 => 0,
                    http::Version::HTTP_2 => 2,
                    _ => 1,
                }),
                tls: tls.as_ref().map(|d| d.version.as_ref()),
                sni: tls.as_deref().and_then(server_name),
            });
            let id = self
                .forwarding
                .request_id_name()
                .and_then(|n| req.headers.get(n).map(|v| v.as_bytes().to_vec()));
            let generated = ctx.request_id;
            line.finish(&ResponseFields {
                status: session.response_written().map_or(0, |r| r.status.as_u16()),
                bytes_in: body_in,
                bytes_out: body_out,
                duration,
                connect: ctx.connect,
                response: ctx.response,
                pool: ctx.pool.as_ref().map(|p| p.name.as_str()),
                backend: ctx.backend.as_ref().map(|b| b.addr_text.as_str()),
                attempts: ctx.attempt,
                generation: ctx.pool.as_ref().map(|p| p.strategy.current().generation),
                request_id: generated
                    .as_ref()
                    .map(RequestId::as_bytes)
                    .or(id.as_deref()),
            });
        }
        // An upstream error ends the attempt as a failure even if a status had come back (the
        // body broke off); a downstream error (the client left) says nothing about the backend.
        if let (Some(e), Some(lease)) = (e, &mut ctx.lease) {
            if e.esource() == &ErrorSource::Upstream {
                lease.set_outcome(Outcome::Failed);
            }
        }
        ctx.lease = None;
    }
}

/// Most concurrent requests sent over one HTTP/2 connection to a backend.
const MAX_H2_STREAMS: usize = 100;

/// Sets the peer's protocol (ALPN, HTTP/2 prior knowledge) and TLS settings from the pool's.
fn upstream_protocol(peer: &mut HttpPeer, upstream: &Upstream, ip: std::net::IpAddr) {
    match upstream.protocol {
        UpstreamProtocol::Http1 => {}
        // Over TLS, ALPN offers only h2; in plain text pingora speaks HTTP/2 with prior
        // knowledge when the lowest version allowed is 2.
        UpstreamProtocol::H2 | UpstreamProtocol::H2c => {
            peer.options.set_http_version(2, 2);
            peer.options.max_h2_streams = MAX_H2_STREAMS;
        }
    }
    // Connections made under other protocol or TLS settings are not reused (pingora's reuse
    // key covers neither the CA nor the ALPN).
    peer.group_key = upstream.conn_key();
    let Some(tls) = &upstream.tls else { return };
    peer.scheme = pingora::upstreams::peer::Scheme::HTTPS;
    // pingora skips every check when the SNI is empty: without a configured name the
    // backend's address is given, which rustls checks against the certificate's IP
    // addresses and does not send as SNI.
    peer.sni = match &tls.sni {
        Some(sni) => sni.clone(),
        None => ip.to_string(),
    };
    peer.options.verify_cert = tls.verify;
    peer.options.verify_hostname = tls.verify;
    if let Some(form) = pingora_form(tls) {
        peer.options.ca = form.ca.clone();
        peer.client_cert_key = form.client.clone();
    }
}

/// A pool's CA certificates and client certificate in pingora's own types.
struct PingoraTls {
    ca: Option<Arc<CaType>>,
    client: Option<Arc<CertKey>>,
}

/// The pingora form of `tls`, built once per loaded TLS setting (on its first request) and kept
/// beside it.
fn pingora_form(tls: &UpstreamTls) -> Option<&PingoraTls> {
    let any = tls.engine_form.get_or_init(|| {
        let x509 = |der: &[u8]| WrappedX509::new(der.to_vec(), parse_x509);
        let form = PingoraTls {
            ca: tls.ca.as_ref().map(|certs| {
                let certs: Vec<WrappedX509> = certs.iter().map(|c| x509(c.as_ref())).collect();
                Arc::from(certs.into_boxed_slice())
            }),
            client: tls.client.as_ref().map(|(chain, key)| {
                Arc::new(CertKey::new(
                    chain.iter().map(|c| c.as_ref().to_vec()).collect(),
                    key.secret_der().to_vec(),
                ))
            }),
        };
        Arc::new(form)
    });
    // Only this function fills the slot, so the type always matches.
    any.downcast_ref::<PingoraTls>()
}

/// Whether the request's `TE` lists `trailers`.
fn asks_trailers(headers: &http::HeaderMap) -> bool {
    headers.get_all(http::header::TE).iter().any(|v| {
        v.to_str().is_ok_and(|v| {
            v.split(',').any(|t| {
                t.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .eq_ignore_ascii_case("trailers")
            })
        })
    })
}

/// True once a final response head has gone downstream (a `100 Continue` does not count).
fn head_sent(session: &Session) -> bool {
    session
        .response_written()
        .is_some_and(|r| !r.status.is_informational() || r.status.as_u16() == 101)
}

/// Applies a route's response header edits.
fn edit_response(resp: &mut ResponseHeader, edits: &HeaderEdits) -> Result<()> {
    for name in edits.dropped() {
        resp.remove_header(name);
    }
    for (name, value) in edits.fields() {
        resp.append_header(name, value.clone())?;
    }
    Ok(())
}

/// Answers a request on a route that redirects or responds by itself.
async fn answer(session: &mut Session, route: &Route) -> Result<()> {
    let edits = &route.rules.response_headers;
    let (status, body): (u16, &[u8]) = match &route.rules.action {
        Action::Redirect(r) => (r.status, b""),
        Action::Respond(f) => (f.status, &f.body),
        Action::Pool(_) => (500, b""),
    };
    let mut resp = ResponseHeader::build(status, Some(4))?;
    match &route.rules.action {
        Action::Redirect(r) => {
            let tls = session.digest().is_some_and(|d| d.ssl_digest.is_some());
            let req = session.req_header();
            let host = request_host(session).map(str::as_bytes);
            let target = req
                .uri
                .path_and_query()
                .map_or(b"/".as_slice(), |p| p.as_str().as_bytes());
            let mut location = Vec::with_capacity(128);
            let scheme = if tls { "https" } else { "http" };
            if !r.location(scheme, host, target, &mut location) {
                return respond(session, 400, "the request has no host to redirect to\n").await;
            }
            let location = http::HeaderValue::from_bytes(&location)
                .map_err(|e| Error::because(ErrorType::InternalError, "redirect location", e))?;
            resp.insert_header(http::header::LOCATION, location)?;
        }
        Action::Respond(f) => {
            if let Some(t) = &f.content_type {
                resp.insert_header(http::header::CONTENT_TYPE, t.clone())?;
            }
        }
        Action::Pool(_) => {}
    }
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    edit_response(&mut resp, edits)?;
    if !session.is_body_empty() {
        // The request's body is not read: the connection cannot carry another request.
        session.set_keepalive(None);
    }
    let head_only = session.req_header().method == http::Method::HEAD;
    session
        .write_response_header(Box::new(resp), head_only || body.is_empty())
        .await?;
    if !head_only && !body.is_empty() {
        session
            .write_response_body(Some(Bytes::copy_from_slice(body)), true)
            .await?;
    }
    Ok(())
}

/// The size of a request head as it would be on the HTTP/1 wire (request line and header
/// lines), the measure `max_header_bytes` limits on every path.
fn head_bytes(head: &http::request::Parts) -> u64 {
    let line = head.method.as_str().len()
        + head.uri.path_and_query().map_or(1, |p| p.as_str().len())
        + " HTTP/1.1\r\n".len()
        + 1;
    let fields: usize = head
        .headers
        .iter()
        .map(|(k, v)| k.as_str().len() + 2 + v.len() + 2)
        .sum();
    (line + fields + 2) as u64
}

/// After refusing a request, reads and drops what the client still sends of its body, for a
/// moment and up to a bound (as the lean path does). Ending an HTTP/2 stream whose body is still
/// arriving resets it, and the reset discards the answer still queued; on HTTP/1, closing with
/// unread data makes the kernel reset the connection.
async fn linger(session: &mut Session) {
    use crate::lean::{LINGER_BYTES, LINGER_TIME};
    let deadline = tokio::time::Instant::now() + LINGER_TIME;
    let mut drained = 0;
    while drained < LINGER_BYTES && !session.is_body_done() {
        match tokio::time::timeout_at(deadline, session.read_request_body()).await {
            Ok(Ok(Some(b))) => drained += b.len(),
            _ => return,
        }
    }
}

/// Sends a short plain-text response, unless a response is already under way.
async fn respond(session: &mut Session, code: u16, body: &str) -> Result<()> {
    respond_with(session, code, None, body).await
}

/// [`respond`], with a `Retry-After` of `retry_after` seconds when given.
async fn respond_with(
    session: &mut Session,
    code: u16,
    retry_after: Option<u64>,
    body: &str,
) -> Result<()> {
    if head_sent(session) {
        return Ok(());
    }
    let mut resp = ResponseHeader::build(code, Some(4))?;
    resp.insert_header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    if let Some(secs) = retry_after {
        resp.insert_header(http::header::RETRY_AFTER, secs.to_string())?;
    }
    session.set_keepalive(None);
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::copy_from_slice(body.as_bytes())), true)
        .await?;
    Ok(())
}
