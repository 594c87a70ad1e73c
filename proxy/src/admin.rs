//! The admin API: pools, metrics, hot swap and reload. Served by pingora on its own listener.
//!
//! Mutating routes (`PUT`, `POST`) require `Authorization: Bearer TOKEN` when `[admin] token` is set.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::metrics::STATUS_CLASSES;
use crate::runtime::{ApplyError, Runtime};

/// Largest plugin upload accepted.
const MAX_UPLOAD: usize = 32 << 20;

/// The admin application.
pub struct AdminApp {
    runtime: Arc<Runtime>,
    token: Option<String>,
    readiness: Arc<crate::server::Readiness>,
}

impl AdminApp {
    /// Admin API over `runtime`; `token` protects mutating routes; `readiness` answers `/readyz`.
    pub fn new(
        runtime: Arc<Runtime>,
        token: Option<String>,
        readiness: Arc<crate::server::Readiness>,
    ) -> AdminApp {
        AdminApp {
            runtime,
            token,
            readiness,
        }
    }

    fn authorized(&self, session: &ServerSession) -> bool {
        let Some(token) = &self.token else {
            return true;
        };
        let got = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok());
        got.and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|t| constant_time_eq(t.as_bytes(), token.as_bytes()))
    }

    /// JSON description of every pool (also used by the CLI and dashboard).
    pub fn pools_json(runtime: &Runtime) -> serde_json::Value {
        let pools: Vec<_> = runtime
            .pools()
            .iter()
            .map(|p| {
                let v = p.strategy.current();
                let table = p.table();
                let s = p.settings();
                let now = crate::clock::now_ms();
                let members = p.members();
                let backends: Vec<_> = members
                    .iter()
                    .map(|b| {
                        let in_table = table
                            .backends
                            .iter()
                            .position(|t| std::sync::Arc::ptr_eq(t, b));
                        let ejected_until = b.stats.ejected_until_ms();
                        let state = if b.stats.is_ejected(now) {
                            "ejected"
                        } else if !b.stats.is_healthy() {
                            "unhealthy"
                        } else if in_table.is_some() {
                            "routable"
                        } else {
                            "standby"
                        };
                        let requests: serde_json::Map<_, _> = STATUS_CLASSES
                            .iter()
                            .enumerate()
                            .map(|(i, c)| (c.to_string(), json!(b.stats.requests_in_class(i))))
                            .collect();
                        json!({
                            "addr": b.addr_text,
                            "weight": b.weight,
                            "zone": b.zone,
                            "tags": b.tags,
                            "inflight": b.stats.inflight(),
                            "latency_ewma_us": b.stats.latency_us(),
                            "consecutive_failures": b.stats.failures(),
                            "requests": requests,
                            "state": state,
                            "effective_weight": in_table.map(|i| table.weights[i]),
                            "ejections": b.stats.ejections(),
                            "ejected_for_ms": ejected_until.saturating_sub(now),
                            "health": health_json(b, now, p.health().is_some()),
                        })
                    })
                    .collect();
                let health = p.health().map(|h| {
                    let v = h.current();
                    json!({ "name": v.name, "sha256": v.sha256, "generation": v.generation })
                });
                json!({
                    "name": p.name,
                    "health_check": health,
                    "strategy": { "name": v.name, "sha256": v.sha256, "generation": v.generation },
                    "retries": s.retries,
                    "connect_timeout_ms": s.connect_timeout.as_millis() as u64,
                    "table_generation": table.generation,
                    "panic_mode": table.panic,
                    "backends": backends,
                })
            })
            .collect();
        json!({ "pools": pools })
    }
}

fn health_json(b: &crate::backend::Backend, now: u64, checked_pool: bool) -> serde_json::Value {
    if !checked_pool {
        return serde_json::Value::Null;
    }
    let rec = b.stats.health.lock().clone();
    let healthy = b.stats.is_healthy();
    json!({
        "state": if !rec.checked && !healthy { "pending" } else if healthy { "healthy" } else { "unhealthy" },
        "weight_percent": b.stats.health_factor(),
        "last_result": rec.last_result,
        "last_change_ms_ago": (rec.last_change_ms > 0).then(|| now.saturating_sub(rec.last_change_ms)),
        "consecutive_passes": rec.passes,
        "consecutive_fails": rec.fails,
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("static header names and values are valid")
}

fn json_reply(status: StatusCode, v: serde_json::Value) -> Response<Vec<u8>> {
    let mut body = serde_json::to_vec_pretty(&v).unwrap_or_default();
    body.push(b'\n');
    reply(status, "application/json", body)
}

fn error_reply(status: StatusCode, msg: impl std::fmt::Display) -> Response<Vec<u8>> {
    json_reply(status, json!({ "error": msg.to_string() }))
}

async fn read_body(session: &mut ServerSession) -> Result<Vec<u8>, Response<Vec<u8>>> {
    let mut body = Vec::new();
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                body.extend_from_slice(&chunk);
                if body.len() > MAX_UPLOAD {
                    return Err(error_reply(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("body larger than {MAX_UPLOAD} bytes"),
                    ));
                }
            }
            Ok(None) => return Ok(body),
            Err(e) => {
                return Err(error_reply(
                    StatusCode::BAD_REQUEST,
                    format!("cannot read the request body: {e}"),
                ))
            }
        }
    }
}

#[async_trait]
impl ServeHttp for AdminApp {
    async fn response(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = session.req_header().method.clone();
        let path = session.req_header().uri.path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        if method != Method::GET && method != Method::HEAD && !self.authorized(session) {
            return error_reply(
                StatusCode::UNAUTHORIZED,
                "this route needs `Authorization: Bearer TOKEN` ([admin] token)",
            );
        }
        match (method.as_str(), segments.as_slice()) {
            ("GET", [""]) => reply(
                StatusCode::OK,
                "text/html; charset=utf-8",
                crate::dashboard::PAGE.as_bytes().to_vec(),
            ),
            ("GET", ["metrics"]) => reply(
                StatusCode::OK,
                "text/plain; version=0.0.4",
                self.runtime.metrics.render(),
            ),
            // Liveness: the process answers.
            ("GET", ["healthz"]) => reply(StatusCode::OK, "text/plain", b"ok\n".to_vec()),
            // Readiness: every listener is up.
            ("GET", ["readyz"]) if self.readiness.is_ready() => {
                reply(StatusCode::OK, "text/plain", b"ready\n".to_vec())
            }
            ("GET", ["readyz"]) => reply(
                StatusCode::SERVICE_UNAVAILABLE,
                "text/plain",
                b"starting: not every listener is up yet\n".to_vec(),
            ),
            ("GET", ["api", "pools"]) => {
                json_reply(StatusCode::OK, Self::pools_json(&self.runtime))
            }
            ("PUT", ["api", "pools", pool, kind @ ("strategy" | "health")]) => {
                let (pool, kind) = (pool.to_string(), kind.to_string());
                let body = match read_body(session).await {
                    Ok(b) => b,
                    Err(resp) => return resp,
                };
                if body.is_empty() {
                    return error_reply(StatusCode::BAD_REQUEST, "empty body; send the plugin's .wasm bytes (curl --data-binary @plugin.wasm)");
                }
                let rt = self.runtime.clone();
                let (p, k) = (pool.clone(), kind.clone());
                // Compilation takes milliseconds of CPU: keep it off the admin runtime's reactor.
                let result = tokio::task::spawn_blocking(move || {
                    let r = if k == "health" {
                        rt.swap_health(&p, &body)
                    } else {
                        rt.swap_strategy(&p, &body)
                    };
                    crate::server::release_free_memory();
                    r
                })
                .await;
                match result {
                    Ok(Ok(v)) => json_reply(
                        StatusCode::OK,
                        json!({ "pool": pool, "kind": kind, "sha256": v.sha256, "generation": v.generation }),
                    ),
                    Ok(Err(e @ ApplyError::UnknownPool(_))) => {
                        error_reply(StatusCode::NOT_FOUND, e)
                    }
                    Ok(Err(e @ ApplyError::NoHealth(_))) => error_reply(StatusCode::CONFLICT, e),
                    Ok(Err(e)) => error_reply(StatusCode::UNPROCESSABLE_ENTITY, e),
                    Err(e) => error_reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("swap task failed: {e}"),
                    ),
                }
            }
            ("GET", ["api", "cluster"]) => match self.runtime.cluster.get() {
                Some(h) => json_reply(StatusCode::OK, crate::membership::cluster_json(h)),
                None => error_reply(
                    StatusCode::NOT_FOUND,
                    "this proxy is not in a cluster; add a [cluster] section to the config",
                ),
            },
            ("POST", ["api", "cluster", "keys"]) => {
                let Some(h) = self.runtime.cluster.get().cloned() else {
                    return error_reply(StatusCode::NOT_FOUND, "this proxy is not in a cluster");
                };
                let body = match read_body(session).await {
                    Ok(b) => b,
                    Err(resp) => return resp,
                };
                #[derive(serde::Deserialize)]
                struct KeyOp {
                    op: String,
                    key: String,
                }
                match serde_json::from_slice::<KeyOp>(&body) {
                    Err(e) => error_reply(
                        StatusCode::BAD_REQUEST,
                        format!(
                            "expected {{\"op\": \"install|use|remove\", \"key\": \"BASE64\"}}: {e}"
                        ),
                    ),
                    Ok(k) => match crate::membership::keyring_op(&h, &k.op, &k.key) {
                        Ok(()) => json_reply(
                            StatusCode::OK,
                            json!({ "ok": true, "keys": h.keys().len() }),
                        ),
                        Err(e) => error_reply(StatusCode::UNPROCESSABLE_ENTITY, e),
                    },
                }
            }
            ("POST", ["api", "reload"]) => {
                let rt = self.runtime.clone();
                let reload = move || {
                    let r = rt.reload();
                    crate::server::release_free_memory();
                    r
                };
                match tokio::task::spawn_blocking(reload).await {
                    Ok(Ok(report)) => json_reply(
                        StatusCode::OK,
                        json!({ "reloaded": true, "report": report }),
                    ),
                    Ok(Err(e @ ApplyError::NoConfigFile)) => error_reply(StatusCode::CONFLICT, e),
                    Ok(Err(e)) => error_reply(StatusCode::UNPROCESSABLE_ENTITY, e),
                    Err(e) => error_reply(
                        StatusCode::INTERNAL_SERVER_ERROR,
                        format!("reload task failed: {e}"),
                    ),
                }
            }
            (_, ["api", ..]) | (_, ["metrics"]) => error_reply(
                StatusCode::METHOD_NOT_ALLOWED,
                format!("{method} is not allowed on {path}"),
            ),
            _ => error_reply(
                StatusCode::NOT_FOUND,
                format!("no admin route {path}; see /api/pools, /metrics, /"),
            ),
        }
    }
}
