//! The request path on pingora: listener → route → pool → strategy → peer, with retries on
//! connect failures and the bookkeeping (in-flight, latency, status) strategies read back.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::Bytes;
use pingora::http::ResponseHeader;
use pingora::prelude::*;
use pingora::proxy::{FailToProxy, ProxyHttp, Session};

use crate::plugin::RequestView;
use crate::pool::{Backend, Pool};
use crate::runtime::Runtime;

/// The pingora proxy application.
pub struct SluiceProxy {
    runtime: Arc<Runtime>,
}

impl SluiceProxy {
    /// A proxy serving `runtime`'s routes.
    pub fn new(runtime: Arc<Runtime>) -> SluiceProxy {
        SluiceProxy { runtime }
    }
}

/// Per-request state.
pub struct RequestCtx {
    pool: Option<Arc<Pool>>,
    /// The backend currently holding an in-flight slot for this request.
    current: Option<Arc<Backend>>,
    /// Backends whose connect failed; excluded from later attempts.
    tried: Vec<SocketAddr>,
    attempt: u32,
    started: Instant,
    upstream_status: Option<u16>,
    /// Short reason sent with an error response.
    reason: Option<String>,
}

impl RequestCtx {
    /// Releases the in-flight slot and records the outcome.
    fn finish_backend(&mut self, status: Option<u16>) {
        if let Some(b) = self.current.take() {
            b.stats.inflight.dec();
            b.stats.record(status, self.started.elapsed());
            if let Some(pool) = &self.pool {
                crate::outlier::after_request(pool, &b);
            }
        }
    }

    /// Whether another attempt is allowed and possible.
    fn may_retry(&self) -> bool {
        let Some(pool) = &self.pool else { return false };
        let retries = pool.settings.load().retries;
        self.attempt <= retries && pool.table.load().len() > self.tried.len()
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
            pool: None,
            current: None,
            tried: Vec::new(),
            attempt: 0,
            started: Instant::now(),
            upstream_status: None,
            reason: None,
        }
    }

    async fn request_filter(&self, session: &mut Session, ctx: &mut RequestCtx) -> Result<bool> {
        let pool = {
            let router = self.runtime.router();
            router
                .route(request_host(session), session.req_header().uri.path())
                .cloned()
        };
        let Some(pool) = pool else {
            respond(session, 404, "no route matches this request\n").await?;
            return Ok(true);
        };
        if pool.table.load().is_empty() {
            self.runtime
                .metrics
                .no_backend
                .with_label_values(&[&pool.name])
                .inc();
            respond(
                session,
                503,
                &format!("no backend available in pool \"{}\"\n", pool.name),
            )
            .await?;
            return Ok(true);
        }
        pool.requests
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        ctx.pool = Some(pool);
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
        let table = pool.table.load();
        let client_ip = session
            .client_addr()
            .and_then(|a| a.as_inet())
            .map(|a| a.ip());
        let tried = &ctx.tried;
        let excluded = |i: usize| {
            table
                .backends
                .get(i)
                .is_some_and(|b| tried.contains(&b.addr))
        };
        let view = RequestView {
            header: session.req_header(),
            client_ip,
            excluded: &excluded,
        };
        let Some(index) = pool.strategy.pick(&table, &view, ctx.attempt) else {
            self.runtime
                .metrics
                .no_backend
                .with_label_values(&[&pool.name])
                .inc();
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
        backend.stats.inflight.inc();
        let settings = pool.settings.load();
        let mut peer = HttpPeer::new(backend.addr, false, String::new());
        peer.options.connection_timeout = Some(settings.connect_timeout);
        peer.options.read_timeout = Some(settings.read_timeout);
        peer.options.idle_timeout = Some(settings.idle_timeout);
        ctx.current = Some(backend);
        Ok(Box::new(peer))
    }

    fn fail_to_connect(
        &self,
        _session: &mut Session,
        _peer: &HttpPeer,
        ctx: &mut RequestCtx,
        mut e: Box<Error>,
    ) -> Box<Error> {
        if let Some(b) = &ctx.current {
            ctx.tried.push(b.addr);
        }
        ctx.finish_backend(None);
        // A connect failure never reached the backend, so retrying is safe for every method.
        let retry = ctx.may_retry();
        if retry {
            if let Some(pool) = &ctx.pool {
                self.runtime
                    .metrics
                    .retries
                    .with_label_values(&[&pool.name, "connect"])
                    .inc();
            }
        }
        e.set_retry(retry);
        e
    }

    async fn upstream_response_filter(
        &self,
        session: &mut Session,
        resp: &mut ResponseHeader,
        ctx: &mut RequestCtx,
    ) -> Result<()> {
        let status = resp.status.as_u16();
        if status >= 500 {
            let policy_allows = ctx.pool.as_ref().is_some_and(|p| {
                let s = p.settings.load();
                s.retry_on_5xx
                    && (s.retry_non_idempotent || session.req_header().method.is_idempotent())
            });
            // Nothing has been sent downstream yet, so the request can still go elsewhere
            // (pingora replays it; bodies larger than its retry buffer are not retried).
            if policy_allows && ctx.may_retry() && !session.as_ref().retry_buffer_truncated() {
                if let Some(b) = &ctx.current {
                    ctx.tried.push(b.addr);
                }
                ctx.finish_backend(Some(status));
                if let Some(pool) = &ctx.pool {
                    self.runtime
                        .metrics
                        .retries
                        .with_label_values(&[&pool.name, "5xx"])
                        .inc();
                }
                let mut e = Error::explain(
                    ErrorType::HTTPStatus(status),
                    "backend answered 5xx; retrying on another backend",
                );
                e.set_retry(true);
                return Err(e);
            }
        }
        ctx.upstream_status = Some(status);
        Ok(())
    }

    async fn fail_to_proxy(
        &self,
        session: &mut Session,
        e: &Error,
        ctx: &mut RequestCtx,
    ) -> FailToProxy {
        let code = match e.etype() {
            ErrorType::HTTPStatus(code) => *code,
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
                _ => format!("{e}\n"),
            });
            if let Err(err) = respond(session, code, &reason).await {
                tracing::debug!(error = %err, "could not send the error response downstream");
            }
        }
        FailToProxy {
            error_code: code,
            can_reuse_downstream: false,
        }
    }

    async fn logging(&self, _session: &mut Session, _e: Option<&Error>, ctx: &mut RequestCtx) {
        // No upstream status means no response came back (connect or read failure).
        ctx.finish_backend(ctx.upstream_status);
    }
}

/// Sends a short plain-text response.
async fn respond(session: &mut Session, code: u16, body: &str) -> Result<()> {
    let mut resp = ResponseHeader::build(code, Some(3))?;
    resp.insert_header(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")?;
    resp.insert_header(http::header::CONTENT_LENGTH, body.len().to_string())?;
    session.set_keepalive(None);
    session.write_response_header(Box::new(resp), false).await?;
    session
        .write_response_body(Some(Bytes::copy_from_slice(body.as_bytes())), true)
        .await?;
    Ok(())
}
