//! The dashboard served by the admin listener: plain HTML, CSS and JavaScript kept as files in
//! `proxy/dashboard/` and embedded in the binary at build time, so it works with no file beside
//! the binary and no network (nothing is loaded from elsewhere).
//!
//! `GET /` is the page, `GET /dashboard/{file}` its script and style. The page reads the admin
//! API (`/api/overview`, `/api/pools`, `/api/history`, and `/api/cluster` when the overview says
//! the proxy is clustered) and calls its mutating routes with the token the operator enters once.
//! `/api/overview` is made here; the history behind `/api/history` is [`crate::history`].

use serde_json::json;

use crate::runtime::Runtime;

/// One embedded file.
#[derive(Debug)]
pub struct Asset {
    /// The file name under `/dashboard/`.
    pub name: &'static str,
    /// Its `Content-Type`.
    pub content_type: &'static str,
    /// Its bytes.
    pub body: &'static [u8],
}

/// The page itself, served at `/`.
pub const INDEX: &Asset = &Asset {
    name: "index.html",
    content_type: "text/html; charset=utf-8",
    body: include_bytes!("../dashboard/index.html"),
};

/// Every file under `/dashboard/`.
const ASSETS: &[Asset] = &[
    Asset {
        name: "app.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../dashboard/app.js"),
    },
    Asset {
        name: "charts.js",
        content_type: "text/javascript; charset=utf-8",
        body: include_bytes!("../dashboard/charts.js"),
    },
    Asset {
        name: "style.css",
        content_type: "text/css; charset=utf-8",
        body: include_bytes!("../dashboard/style.css"),
    },
];

/// The file `name` under `/dashboard/`.
pub fn asset(name: &str) -> Option<&'static Asset> {
    ASSETS.iter().find(|a| a.name == name)
}

/// What `/api/overview` shows beyond the runtime: the listeners opened at start (a reload does
/// not change them) and the TLS state, whose certificates a reload does change.
#[derive(Default)]
pub struct ServerInfo {
    listeners: Vec<serde_json::Value>,
    tls: Option<crate::tls::Tls>,
}

impl ServerInfo {
    /// The listeners the proxy opened and its TLS state (`None` without TLS listeners).
    pub fn new(
        listeners: &[crate::listener::Listener],
        tls: Option<crate::tls::Tls>,
    ) -> ServerInfo {
        ServerInfo {
            listeners: listeners.iter().map(listener_json).collect(),
            tls,
        }
    }

    /// What the page needs besides the pools: whether this proxy is in a cluster (so it asks
    /// for `/api/cluster` only then), whether the admin API wants a token, listeners,
    /// certificates and routes.
    pub fn overview_json(
        &self,
        runtime: &Runtime,
        token_required: bool,
        protect_reads: bool,
    ) -> serde_json::Value {
        let cfg = runtime.config();
        let certificates = self
            .tls
            .as_ref()
            .map(crate::tls::Tls::certificates)
            .unwrap_or_default();
        json!({
            "version": env!("CARGO_PKG_VERSION"),
            "clustered": runtime.cluster.get().is_some(),
            "zone": cfg.server.zone,
            "token_required": token_required,
            "protect_reads": protect_reads,
            "reloadable": runtime.config_path().is_some(),
            "last_reload": runtime.last_reload().map(|r| json!({
                "result": if r.error.is_some() { "rejected" } else { "ok" },
                "unix_ms": r.unix_ms,
                "error": r.error,
            })),
            "listeners": self.listeners,
            "certificates": certificates,
            "routes": cfg.route.iter().map(|r| route_json(r.get_ref())).collect::<Vec<_>>(),
            "history": {
                "interval_ms": crate::history::SAMPLE_PERIOD.as_millis() as u64,
                "points": crate::history::HISTORY_LEN - 1,
            },
        })
    }
}

fn listener_json(l: &crate::listener::Listener) -> serde_json::Value {
    let client_auth = match &l.tls {
        Some(Some(check)) if check.required => "required",
        Some(Some(_)) => "optional",
        _ => "none",
    };
    json!({
        "address": l.addr.to_string(),
        "tls": l.tls.is_some(),
        "client_auth": client_auth,
        "max_connections": l.limits.max_connections,
    })
}

fn route_json(r: &crate::config::RouteConfig) -> serde_json::Value {
    let action = if r.redirect.is_some() {
        "redirect"
    } else if r.respond.is_some() {
        "respond"
    } else {
        "pool"
    };
    json!({
        "host": r.host,
        "path_prefix": r.path_prefix,
        "path_regex": r.path_regex.as_ref().map(|s| s.get_ref()),
        "methods": r.methods.as_ref().map(|m| m.get_ref()),
        "scheme": r.scheme.as_ref().map(|s| s.get_ref()),
        "pool": r.pool.as_ref().map(|p| p.get_ref()),
        "action": action,
    })
}
