//! Routing: which route serves a request, by host, path prefix, and the optional method, header
//! and path-regex conditions; the route then names a pool, or answers itself (redirect, fixed
//! response). What a route does besides choosing is in [`crate::route_rules`].

use std::sync::Arc;

use crate::plugin::HeadView;
use crate::pool::Pool;
use crate::route_rules::{Action, HeaderWant, Rules};

/// One `[[route]]`, compiled.
pub struct Route {
    /// Lower-case host without port; `None` matches every host.
    pub host: Option<String>,
    /// Path prefix.
    pub path_prefix: String,
    /// Conditions, action and edits.
    pub rules: Rules<Arc<Pool>>,
}

impl Route {
    /// A route to `pool` on `host` and `path_prefix`, with no other rule.
    pub fn to_pool(host: Option<&str>, path_prefix: &str, pool: Arc<Pool>) -> Route {
        Route {
            host: host.map(str::to_ascii_lowercase),
            path_prefix: path_prefix.to_string(),
            rules: Rules {
                tls: None,
                path_regex: None,
                methods: Vec::new(),
                headers: Vec::new(),
                action: Action::Pool(pool),
                rewrite: None,
                request_headers: Default::default(),
                response_headers: Default::default(),
                access_log: None,
            },
        }
    }

    /// The pool requests go to, unless the route answers by itself.
    pub fn pool(&self) -> Option<&Arc<Pool>> {
        match &self.rules.action {
            Action::Pool(p) => Some(p),
            _ => None,
        }
    }

    /// Whether `head` (with `host` already stripped of its port), on a TLS connection or not,
    /// meets every condition.
    fn matches(&self, host: Option<&[u8]>, tls: bool, head: &dyn HeadView) -> bool {
        let host_ok = match (&self.host, host) {
            (None, _) => true,
            (Some(want), Some(h)) => want.as_bytes().eq_ignore_ascii_case(h),
            (Some(_), None) => false,
        };
        if !host_ok || !head.path().starts_with(self.path_prefix.as_bytes()) {
            return false;
        }
        let r = &self.rules;
        if r.tls.is_some_and(|want| want != tls) {
            return false;
        }
        if !r.methods.is_empty() {
            let method = head.method();
            if !r.methods.iter().any(|m| m.as_bytes() == method) {
                return false;
            }
        }
        for h in &r.headers {
            let name = h.name.as_str().as_bytes();
            let ok = match &h.want {
                HeaderWant::Present => head.find_header(name, &mut Some).is_some(),
                HeaderWant::Absent => head.find_header(name, &mut Some).is_none(),
                HeaderWant::Value(v) => head
                    .find_header(name, &mut |got| (got.trim_ascii() == &**v).then_some(got))
                    .is_some(),
            };
            if !ok {
                return false;
            }
        }
        // Last: the only condition that costs more than a comparison.
        r.path_regex
            .as_ref()
            .is_none_or(|re| re.is_match(head.path()))
    }
}

/// The routes, ordered most specific first: host routes before host-less ones, then the longest
/// prefix, then the route with more conditions (methods, headers, path_regex), then file order.
/// The first match wins, so matching is a short linear scan with no allocation.
pub struct Router {
    routes: Vec<Arc<Route>>,
}

impl Router {
    /// Orders `routes` by specificity.
    pub fn new(mut routes: Vec<Route>) -> Router {
        // Stable sort: equally specific routes keep their file order.
        routes.sort_by_key(|r| {
            (
                r.host.is_none(),
                std::cmp::Reverse(r.path_prefix.len()),
                std::cmp::Reverse(r.rules.conditions()),
            )
        });
        Router {
            routes: routes.into_iter().map(Arc::new).collect(),
        }
    }

    /// The route for a request that came over TLS or not, or `None` (answered 404).
    pub fn select(&self, head: &dyn HeadView, tls: bool) -> Option<&Arc<Route>> {
        let host = head.authority().map(crate::http1::strip_port);
        self.routes.iter().find(|r| r.matches(host, tls, head))
    }

    /// The routes in match order.
    pub fn routes(&self) -> &[Arc<Route>] {
        &self.routes
    }
}
