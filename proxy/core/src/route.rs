//! Routing: which pool serves a request, by host and path prefix.

use std::sync::Arc;

use crate::pool::Pool;

/// One `[[route]]`.
pub struct Route {
    /// Lower-case host without port; `None` matches every host.
    pub host: Option<String>,
    /// Path prefix.
    pub path_prefix: String,
    /// Target pool.
    pub pool: Arc<Pool>,
}

/// The routes, ordered most specific first: host routes before host-less ones, then the longest
/// prefix. The first match wins, so matching is a short linear scan with no allocation.
pub struct Router {
    routes: Vec<Route>,
}

impl Router {
    /// Orders `routes` by specificity.
    pub fn new(mut routes: Vec<Route>) -> Router {
        // Stable sort: equally specific routes keep their file order.
        routes.sort_by_key(|r| (r.host.is_none(), std::cmp::Reverse(r.path_prefix.len())));
        Router { routes }
    }

    /// The pool for a request to `host` (may include a port) and `path`.
    pub fn route(&self, host: Option<&str>, path: &str) -> Option<&Arc<Pool>> {
        self.route_bytes(host.map(str::as_bytes), path.as_bytes())
    }

    /// [`Router::route`] on the bytes of a head.
    pub fn route_bytes(&self, host: Option<&[u8]>, path: &[u8]) -> Option<&Arc<Pool>> {
        let host = host.map(crate::http1::strip_port);
        self.routes
            .iter()
            .find(|r| {
                let host_ok = match (&r.host, host) {
                    (None, _) => true,
                    (Some(want), Some(h)) => want.as_bytes().eq_ignore_ascii_case(h),
                    (Some(_), None) => false,
                };
                host_ok && path.starts_with(r.path_prefix.as_bytes())
            })
            .map(|r| &r.pool)
    }

    /// The routes in match order.
    pub fn routes(&self) -> &[Route] {
        &self.routes
    }
}
