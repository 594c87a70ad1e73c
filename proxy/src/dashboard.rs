//! The dashboard served by the admin listener: plain HTML, CSS and JavaScript kept as files in
//! `proxy/dashboard/` and embedded in the binary at build time, so it works with no file beside
//! the binary and no network (nothing is loaded from elsewhere).
//!
//! `GET /` is the page, `GET /dashboard/{file}` its script and style. The page reads the admin
//! API (`/api/overview`, `/api/pools`, `/api/history`, and `/api/cluster` when the overview says
//! the proxy is clustered) and calls its mutating routes with the token the operator enters once.

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
