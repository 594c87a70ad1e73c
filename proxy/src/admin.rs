//! The admin API: pools, metrics, hot swap and reload. Served by pingora on its own listener.
//!
//! Mutating routes (`PUT`, `POST`, `DELETE`) require `Authorization: Bearer TOKEN` when
//! `[admin] token` is set, and read routes too with `[admin] protect_reads`. Unknown routes are
//! 404, a known route with the wrong method 405 with `Allow`, and `HEAD` works wherever `GET` does.

use std::sync::Arc;

use async_trait::async_trait;
use http::{Method, Response, StatusCode};
use pingora::apps::http_app::ServeHttp;
use pingora::protocols::http::ServerSession;
use serde_json::json;

use crate::metrics::STATUS_CLASSES;
use crate::pool::{AdminMode, Override, MAX_WEIGHT};
use crate::runtime::{ApplyError, Runtime};

/// Largest plugin upload accepted.
const MAX_UPLOAD: usize = 32 << 20;

/// The admin application.
pub struct AdminApp {
    runtime: Arc<Runtime>,
    /// SHA-256 of the token: comparing digests in constant time leaks neither the token's bytes
    /// nor its length.
    token: Option<[u8; 32]>,
    protect_reads: bool,
    readiness: Arc<crate::server::Readiness>,
    /// Listeners and certificates, for `/api/overview`.
    server: crate::dashboard::ServerInfo,
    rollout: Option<Arc<crate::rollout::Rollout>>,
}

fn digest(token: &[u8]) -> [u8; 32] {
    use sha2::Digest;
    sha2::Sha256::digest(token).into()
}

/// The methods each admin route answers (`HEAD` goes with `GET`); `None` for no such route.
fn allowed_methods(segments: &[&str]) -> Option<&'static [&'static str]> {
    Some(match segments {
        [""]
        | ["metrics"]
        | ["healthz"]
        | ["readyz"]
        | ["api", "pools"]
        | ["api", "cluster"]
        | ["api", "overview"]
        | ["api", "history"] => &["GET", "HEAD"],
        ["dashboard", file] if crate::dashboard::asset(file).is_some() => &["GET", "HEAD"],
        ["api", "pools", _, "strategy" | "health"] => &["PUT"],
        ["api", "pools", _, "backends", _, "drain" | "undrain" | "disable" | "enable"] => &["POST"],
        ["api", "pools", _, "backends", _, "weight"] => &["PUT", "DELETE"],
        ["api", "cluster", "keys"] | ["api", "cluster", "rotate-key"] | ["api", "reload"] => {
            &["POST"]
        }
        ["api", "cluster", "plugins", _, "strategy" | "health"] => &["POST"],
        _ => return None,
    })
}

impl AdminApp {
    /// Admin API over `runtime`; `token` protects mutating routes (and read routes with
    /// `protect_reads`); `readiness` answers `/readyz`.
    pub fn new(
        runtime: Arc<Runtime>,
        token: Option<&str>,
        protect_reads: bool,
        readiness: Arc<crate::server::Readiness>,
    ) -> AdminApp {
        AdminApp {
            runtime,
            token: token.map(|t| digest(t.as_bytes())),
            protect_reads,
            readiness,
            server: crate::dashboard::ServerInfo::default(),
            rollout: None,
        }
    }

    /// Shows the listeners and certificates of `server` in `/api/overview`.
    pub fn with_server_info(mut self, server: crate::dashboard::ServerInfo) -> AdminApp {
        self.server = server;
        self
    }

    /// Serves cluster rollouts (`POST /api/cluster/plugins/...`) through `rollout`.
    pub fn with_rollout(mut self, rollout: Option<Arc<crate::rollout::Rollout>>) -> AdminApp {
        self.rollout = rollout;
        self
    }

    fn authorized(&self, session: &ServerSession) -> bool {
        use subtle::ConstantTimeEq;
        let Some(token) = &self.token else {
            return true;
        };
        let got = session
            .req_header()
            .headers
            .get(http::header::AUTHORIZATION)
            .and_then(|v| v.as_bytes().strip_prefix(b"Bearer "));
        got.is_some_and(|t| bool::from(digest(t).ct_eq(token)))
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
                        let o = p.override_of(b.addr);
                        let state = if o.mode == AdminMode::Disabled {
                            "disabled"
                        } else if o.mode == AdminMode::Draining {
                            if b.stats.inflight() > 0 {
                                "draining"
                            } else {
                                "drained"
                            }
                        } else if b.stats.is_ejected(now) {
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
                            "weight_override": o.weight,
                            "admin_mode": o.mode,
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
                    json!({
                        "name": v.name, "sha256": v.sha256, "generation": v.generation,
                        "faults": faults_json(h.fault_totals()),
                        "swaps": h.swap_history(),
                    })
                });
                json!({
                    "name": p.name,
                    "health_check": health,
                    "strategy": {
                        "name": v.name, "sha256": v.sha256, "generation": v.generation,
                        "faults": faults_json(p.strategy.fault_totals()),
                        "swaps": p.strategy.swap_history(),
                    },
                    "retries": s.retries,
                    "connect_timeout_ms": s.connect_timeout.as_millis() as u64,
                    "table_generation": table.generation,
                    "panic_mode": table.panic,
                    "backends": backends,
                    "dns": p.dns_states().iter().map(crate::dns::DnsState::to_json).collect::<Vec<_>>(),
                    "dns_refresh_ms": s.dns_refresh.as_millis() as u64,
                    "spawn": p.spawns().iter().map(|t| json!({
                        "name": t.name,
                        "command": t.command,
                        "args": t.args,
                        "host": t.host.to_string(),
                        "start_port": t.start_port,
                        "instances": t.instances,
                    })).collect::<Vec<_>>(),
                    "instances": p.instance_status(),
                })
            })
            .collect();
        json!({ "pools": pools })
    }
}

/// Fault counts by reason, as an object.
fn faults_json(totals: [(&str, u64); 5]) -> serde_json::Value {
    totals
        .iter()
        .map(|(reason, n)| (reason.to_string(), json!(n)))
        .collect::<serde_json::Map<_, _>>()
        .into()
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
        "next_check_in_ms": (rec.next_due_ms > 0).then(|| rec.next_due_ms.saturating_sub(now)),
    })
}

fn reply(status: StatusCode, content_type: &str, body: Vec<u8>) -> Response<Vec<u8>> {
    Response::builder()
        .status(status)
        .header(http::header::CONTENT_TYPE, content_type)
        .header(http::header::CONTENT_LENGTH, body.len())
        .body(body)
        .expect("static header names and values are valid")
}

/// A dashboard file. `no-cache`: a new binary's page is picked up at once. The policy keeps
/// the page to its own origin (no script, style or image from elsewhere).
fn asset_reply(a: &crate::dashboard::Asset) -> Response<Vec<u8>> {
    let mut resp = reply(StatusCode::OK, a.content_type, a.body.to_vec());
    let h = resp.headers_mut();
    h.insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-cache"),
    );
    h.insert(
        http::header::X_CONTENT_TYPE_OPTIONS,
        http::HeaderValue::from_static("nosniff"),
    );
    h.insert(
        http::header::CONTENT_SECURITY_POLICY,
        http::HeaderValue::from_static(
            "default-src 'self'; img-src 'self' data:; frame-ancestors 'none'",
        ),
    );
    resp
}

/// `?seconds=N` of `/api/history` (default: all that is kept).
fn history_seconds(query: Option<&str>) -> Result<usize, String> {
    let raw = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("seconds="));
    match raw {
        None => Ok(crate::history::HISTORY_LEN),
        Some(v) => v.parse::<usize>().map_err(|_| {
            format!(
                "seconds must be a whole number of seconds (at most {} are kept), not \"{v}\"",
                crate::history::HISTORY_LEN - 1
            )
        }),
    }
}

/// How long a key rotation waits for every member by default (each phase needs one round of
/// gossip through the cluster).
const DEFAULT_ROTATION_WAIT: std::time::Duration = std::time::Duration::from_secs(60);

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
        let head = session.req_header().method == Method::HEAD;
        let mut resp = self.route(session).await;
        if head {
            // The headers GET would send (Content-Length included), without the body.
            resp.body_mut().clear();
        }
        resp
    }
}

impl AdminApp {
    async fn route(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let method = match &session.req_header().method {
            m if *m == Method::HEAD => Method::GET,
            m => m.clone(),
        };
        let path = session.req_header().uri.path().to_string();
        let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
        let Some(allowed) = allowed_methods(&segments) else {
            return error_reply(
                StatusCode::NOT_FOUND,
                format!("no admin route {path}; see /api/pools, /metrics, /"),
            );
        };
        if !allowed.contains(&method.as_str()) {
            let mut resp = error_reply(
                StatusCode::METHOD_NOT_ALLOWED,
                format!(
                    "{method} is not allowed on {path}; use {}",
                    allowed.join(", ")
                ),
            );
            if let Ok(v) = http::HeaderValue::from_str(&allowed.join(", ")) {
                resp.headers_mut().insert(http::header::ALLOW, v);
            }
            return resp;
        }
        // The dashboard's own files are open like the page; its data follows protect_reads.
        let open_read = matches!(
            segments.as_slice(),
            [""] | ["healthz"] | ["readyz"] | ["dashboard", _]
        );
        let needs_token = method != Method::GET || (self.protect_reads && !open_read);
        if needs_token && !self.authorized(session) {
            return error_reply(
                StatusCode::UNAUTHORIZED,
                "this route needs `Authorization: Bearer TOKEN` ([admin] token)",
            );
        }
        match (method.as_str(), segments.as_slice()) {
            ("GET", [""]) => asset_reply(crate::dashboard::INDEX),
            ("GET", ["dashboard", file]) => match crate::dashboard::asset(file) {
                Some(a) => asset_reply(a),
                None => unreachable!("allowed_methods admits only known files"),
            },
            ("GET", ["api", "overview"]) => json_reply(
                StatusCode::OK,
                self.server
                    .overview_json(&self.runtime, self.token.is_some(), self.protect_reads),
            ),
            ("GET", ["api", "history"]) => {
                match history_seconds(session.req_header().uri.query()) {
                    Ok(seconds) => {
                        json_reply(StatusCode::OK, self.runtime.history.to_json(seconds))
                    }
                    Err(msg) => error_reply(StatusCode::BAD_REQUEST, msg),
                }
            }
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
                let config = match plugin_config(session.req_header().uri.query()) {
                    Ok(c) => c,
                    Err(msg) => return error_reply(StatusCode::BAD_REQUEST, msg),
                };
                let rt = self.runtime.clone();
                let (p, k) = (pool.clone(), kind.clone());
                // Compilation takes milliseconds of CPU: keep it off the admin runtime's reactor.
                let result = tokio::task::spawn_blocking(move || {
                    let r = if k == "health" {
                        rt.swap_health(&p, &body, config)
                    } else {
                        rt.swap_strategy(&p, &body, config)
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
                Some(h) => json_reply(
                    StatusCode::OK,
                    crate::membership::cluster_json(&self.runtime, h),
                ),
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
                    Ok(_) if h.rotation_running() => error_reply(
                        StatusCode::CONFLICT,
                        "a key rotation is running on this node; keys cannot be changed by hand meanwhile. Wait for it to end (GET /api/cluster), then try again",
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
            ("POST", ["api", "cluster", "rotate-key"]) => self.rotate_key(session).await,
            ("POST", ["api", "cluster", "plugins", pool, kind]) => {
                let (pool, kind) = (pool.to_string(), kind.to_string());
                self.cluster_rollout(session, &pool, &kind).await
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
            ("POST", ["api", "pools", pool, "backends", addr, action]) => {
                let action = *action;
                self.override_backend(pool, addr, action, |o| match action {
                    "drain" => o.mode = AdminMode::Draining,
                    "disable" => o.mode = AdminMode::Disabled,
                    _ => o.mode = AdminMode::Active, // undrain, enable
                })
            }
            ("PUT", ["api", "pools", pool, "backends", addr, "weight"]) => {
                let (pool, addr) = (pool.to_string(), addr.to_string());
                let body = match read_body(session).await {
                    Ok(b) => b,
                    Err(resp) => return resp,
                };
                let weight = match parse_weight(&body) {
                    Ok(w) => w,
                    Err(msg) => return error_reply(StatusCode::BAD_REQUEST, msg),
                };
                self.override_backend(&pool, &addr, "weight", |o| o.weight = Some(weight))
            }
            ("DELETE", ["api", "pools", pool, "backends", addr, "weight"]) => {
                self.override_backend(pool, addr, "weight reset", |o| o.weight = None)
            }
            _ => unreachable!("allowed_methods lists every route matched here"),
        }
    }

    /// Announces a plugin to every proxy of the cluster and answers with each one's result
    /// once all have answered or the wait (`?wait=30s` by default) is over.
    async fn cluster_rollout(
        &self,
        session: &mut ServerSession,
        pool: &str,
        kind: &str,
    ) -> Response<Vec<u8>> {
        let Some(rollout) = self.rollout.clone() else {
            return error_reply(
                StatusCode::NOT_FOUND,
                "this proxy is not in a cluster; add a [cluster] section to the config, or load into this proxy alone with PUT /api/pools/{pool}/{kind}",
            );
        };
        let kind = crate::rollout::PluginKind::parse(kind).expect("routed on strategy|health");
        let query = session.req_header().uri.query().map(String::from);
        let config = match plugin_config(query.as_deref()) {
            Ok(c) => c.map(|c| String::from_utf8_lossy(&c).into_owned()),
            Err(msg) => return error_reply(StatusCode::BAD_REQUEST, msg),
        };
        let wait = match rollout_wait(query.as_deref()) {
            Ok(w) => w,
            Err(msg) => return error_reply(StatusCode::BAD_REQUEST, msg),
        };
        let body = match read_body(session).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        let ann = match rollout.announce(pool, kind, &body, config) {
            Ok(a) => a,
            Err(e) => return error_reply(StatusCode::BAD_REQUEST, e),
        };
        let nodes = rollout.wait(&ann, wait).await;
        let ok = nodes.iter().all(|n| n.result == "ok");
        json_reply(
            StatusCode::OK,
            json!({
                "pool": pool, "kind": kind.as_str(), "sha256": ann.sha256, "version": ann.version,
                "announced_by": ann.by, "ok": ok, "nodes": nodes,
            }),
        )
    }

    /// Rotates the whole cluster to a new key (`{"key": "BASE64", "wait": "60s", "exclude":
    /// ["NAME"]}`; `exclude` names Down members not to wait for), answering
    /// once every member uses it alone, or with the members that did not confirm a phase.
    async fn rotate_key(&self, session: &mut ServerSession) -> Response<Vec<u8>> {
        let Some(h) = self.runtime.cluster.get().cloned() else {
            return error_reply(
                StatusCode::NOT_FOUND,
                "this proxy is not in a cluster; add a [cluster] section to the config",
            );
        };
        let body = match read_body(session).await {
            Ok(b) => b,
            Err(resp) => return resp,
        };
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Rotate {
            key: String,
            #[serde(default)]
            wait: Option<String>,
            /// Names of Down members not to wait for.
            #[serde(default)]
            exclude: Vec<String>,
        }
        let req = match serde_json::from_slice::<Rotate>(&body) {
            Ok(r) => r,
            Err(e) => {
                return error_reply(
                    StatusCode::BAD_REQUEST,
                    format!("expected {{\"key\": \"BASE64\", \"wait\": \"60s\", \"exclude\": [\"NAME\"]}} (a new key from `sluice genkey`; wait and exclude are optional): {e}"),
                )
            }
        };
        let wait = match req.wait.as_deref().map(crate::rollout::parse_wait) {
            None => DEFAULT_ROTATION_WAIT,
            Some(Ok(w)) => w,
            Some(Err(e)) => return error_reply(StatusCode::BAD_REQUEST, e),
        };
        match h.rotate_key_excluding(&req.key, wait, &req.exclude).await {
            Ok(report) => json_reply(
                StatusCode::OK,
                json!({
                    "ok": true, "id": report.id, "fingerprint": report.fingerprint,
                    "members": report.members.iter().map(|(name, addr)| json!({ "name": name, "address": addr.to_string() })).collect::<Vec<_>>(),
                }),
            ),
            Err(e @ crate::cluster::ClusterError::Key(_)) => {
                error_reply(StatusCode::BAD_REQUEST, e)
            }
            Err(e @ crate::cluster::ClusterError::Busy(_)) => error_reply(StatusCode::CONFLICT, e),
            Err(e) => error_reply(StatusCode::UNPROCESSABLE_ENTITY, e),
        }
    }

    /// Applies an operator's change to one backend of a pool, logs it, and answers with the
    /// backend's override.
    fn override_backend(
        &self,
        pool: &str,
        addr: &str,
        action: &str,
        change: impl FnOnce(&mut Override),
    ) -> Response<Vec<u8>> {
        let Some(p) = self
            .runtime
            .pools()
            .iter()
            .find(|p| p.name == pool)
            .cloned()
        else {
            return error_reply(
                StatusCode::NOT_FOUND,
                format!("no pool \"{pool}\"; GET /api/pools lists them"),
            );
        };
        // An IPv6 backend's brackets and colons may come %-escaped.
        let addr_text = percent_encoding::percent_decode_str(addr).decode_utf8_lossy();
        let Ok(sock) = addr_text.parse::<std::net::SocketAddr>() else {
            return error_reply(
                StatusCode::BAD_REQUEST,
                format!("\"{addr_text}\" is not a backend address; give it as IP:port, as /api/pools shows it"),
            );
        };
        match p.set_override(sock, change) {
            None => error_reply(
                StatusCode::NOT_FOUND,
                format!("{sock} is not a backend of pool \"{pool}\"; GET /api/pools lists them"),
            ),
            Some(o) => {
                tracing::info!(pool, backend = %sock, action, mode = ?o.mode, weight = ?o.weight, "backend changed through the admin API");
                json_reply(
                    StatusCode::OK,
                    json!({ "pool": pool, "backend": sock.to_string(), "override": o }),
                )
            }
        }
    }
}

/// The plugin config of an upload: the `config` query parameter, a %-encoded JSON object.
/// `None` (no parameter) keeps the pool's current config.
fn plugin_config(query: Option<&str>) -> Result<Option<Arc<[u8]>>, String> {
    let Some(raw) = query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("config="))
    else {
        return Ok(None);
    };
    let text = percent_encoding::percent_decode_str(&raw.replace('+', " "))
        .decode_utf8()
        .map_err(|_| "the config parameter is not UTF-8 once %-decoded".to_string())?
        .into_owned();
    match serde_json::from_str::<serde_json::Value>(&text) {
        Ok(v) if v.is_object() => Ok(Some(Arc::from(text.into_bytes()))),
        Ok(_) => Err("the config parameter must be a JSON object, like {\"zones\": 2}".into()),
        Err(e) => Err(format!("the config parameter is not JSON: {e}")),
    }
}

/// How long a cluster rollout waits for every proxy: the `wait` query parameter ("30s" when
/// absent), see [`crate::rollout::parse_wait`].
fn rollout_wait(query: Option<&str>) -> Result<std::time::Duration, String> {
    query
        .into_iter()
        .flat_map(|q| q.split('&'))
        .find_map(|kv| kv.strip_prefix("wait="))
        .map_or(
            Ok(std::time::Duration::from_secs(30)),
            crate::rollout::parse_wait,
        )
}

/// A weight from a body holding a bare number or `{"weight": N}`.
fn parse_weight(body: &[u8]) -> Result<u32, String> {
    let v: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| format!("expected a weight such as 5 or {{\"weight\": 5}}: {e}"))?;
    let n = v.get("weight").unwrap_or(&v).as_u64();
    match n {
        Some(w) if (1..=u64::from(MAX_WEIGHT)).contains(&w) => Ok(w as u32),
        _ => Err(format!(
            "the weight must be a whole number from 1 to {MAX_WEIGHT}; to stop traffic, POST .../drain instead"
        )),
    }
}
