//! Route rules over real sockets: matching on method, header and path regex; request and
//! response header edits; path rewrites; redirects and fixed responses; the per-route access
//! log; and their validation by `sluice check`.
//!
//! `scripts/test` runs this file on both HTTP/1 engines (`SLUICE_TEST_HTTP1`); the h2c test
//! covers pingora's HTTP/2 path on either.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sluice::cold_lock::ColdLock;
use sluice::http1::{self, Framing};

/// Request heads a backend received, in order.
#[derive(Default)]
struct Seen(ColdLock<Vec<http1::Head>>);

impl Seen {
    fn last(&self) -> http1::Head {
        self.0
            .lock()
            .last()
            .cloned()
            .expect("the backend saw no request")
    }
    fn count(&self) -> usize {
        self.0.lock().len()
    }
}

/// All values of `name` in `head`.
fn values(head: &http1::Head, name: &str) -> Vec<String> {
    head.headers
        .iter()
        .filter(|(n, _)| n == name)
        .map(|(_, v)| v.clone())
        .collect()
}

/// A keep-alive backend that records each request head and answers `200` with body `name`
/// and the headers `x-internal: secret` and `x-kept: yes`.
fn recording_backend(name: &'static str) -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind(unique_addr()).unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let s = s.clone();
            std::thread::spawn(move || {
                let _ = conn.set_read_timeout(Some(Duration::from_secs(20)));
                let mut buf = Vec::new();
                loop {
                    let (head, n) = loop {
                        match http1::parse_request(&buf) {
                            Ok(Some(done)) => break done,
                            Ok(None) => {}
                            Err(_) => return,
                        }
                        let mut chunk = [0u8; 8192];
                        match conn.read(&mut chunk) {
                            Ok(0) | Err(_) => return,
                            Ok(k) => buf.extend_from_slice(&chunk[..k]),
                        }
                    };
                    buf.drain(..n);
                    if let Framing::Length(len) = head.framing {
                        while buf.len() < len {
                            let mut chunk = [0u8; 8192];
                            match conn.read(&mut chunk) {
                                Ok(0) | Err(_) => return,
                                Ok(k) => buf.extend_from_slice(&chunk[..k]),
                            }
                        }
                        buf.drain(..len);
                    }
                    s.0.lock().push(head);
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\nx-internal: secret\r\nx-kept: yes\r\n\r\n{name}",
                        name.len()
                    );
                    if conn.write_all(resp.as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, seen)
}

/// Sends `request` as written on a new connection (closed after it) and reads the answer.
fn raw(addr: SocketAddr, request: &str) -> HttpResponse {
    let mut c = TcpStream::connect(addr).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(request.as_bytes()).unwrap();
    let mut all = Vec::new();
    let _ = c.read_to_end(&mut all);
    let head_only = request.starts_with("HEAD ");
    let (head, n) = http1::parse_response(&all, head_only)
        .unwrap()
        .unwrap_or_else(|| panic!("no response head in {:?}", String::from_utf8_lossy(&all)));
    HttpResponse {
        status: head.status,
        headers: head.headers,
        body: all[n..].to_vec(),
    }
}

/// curl with HTTP/2 prior knowledge: (status, headers lower-cased, body).
fn curl_h2(url: &str, extra: &[&str]) -> (u16, String, String) {
    let dir = scratch_dir("routes-curl");
    let headers = dir.join("headers");
    let out = Command::new("curl")
        .args(["-s", "--max-time", "10", "--http2-prior-knowledge", "-D"])
        .arg(&headers)
        .args(["-w", "\n%{http_version} %{http_code}"])
        .args(extra)
        .arg(url)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, meta) = text.rsplit_once('\n').unwrap_or(("", ""));
    let (version, code) = meta.split_once(' ').unwrap_or(("", "0"));
    assert_eq!(version, "2", "not HTTP/2: {text}");
    let headers = std::fs::read_to_string(&headers)
        .unwrap_or_default()
        .to_ascii_lowercase();
    (code.parse().unwrap(), headers, body.to_string())
}

const EDITS: &str = r#"
request_headers = { set = { x-set = "new" }, add = { x-add = "added" }, remove = ["x-remove"] }
response_headers = { set = { x-resp = "set" }, add = { x-extra = "1" }, remove = ["x-internal"] }
"#;

/// Header edits both ways and path rewrites reach the backend and the client, query kept.
#[test]
fn header_edits_and_path_rewrites() {
    let (backend, seen) = recording_backend("api");
    let body = format!(
        "[[pool]]\nname = \"api\"\nbackends = [\"{backend}\"]\n\
         [[route]]\npath_prefix = \"/api\"\npool = \"api\"\nstrip_prefix = \"/api\"\n{EDITS}\n\
         [[route]]\npath_prefix = \"/v1/\"\npool = \"api\"\nreplace_prefix = {{ from = \"/v1/\", to = \"/v2/\" }}\n\
         [[route]]\npath_prefix = \"/\"\npool = \"api\"\n"
    );
    let p = Proxy::start("routes-edits", &body);

    let r = request(
        p.listen,
        "GET",
        "/api/users?q=1&r=2",
        &[
            ("x-set", "old"),
            ("x-set", "older"),
            ("x-remove", "gone"),
            ("x-add", "client"),
        ],
        b"",
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.text());
    let h = seen.last();
    assert_eq!(h.path, "/users?q=1&r=2", "prefix stripped, query kept");
    assert_eq!(
        values(&h, "x-set"),
        ["new"],
        "set replaces every incoming field"
    );
    assert!(values(&h, "x-remove").is_empty(), "removed");
    assert_eq!(
        values(&h, "x-add"),
        ["client", "added"],
        "add keeps the client's"
    );
    assert!(
        h.header("x-forwarded-for").is_some(),
        "forwarding headers still added"
    );
    assert_eq!(r.header("x-resp"), Some("set"));
    assert_eq!(r.header("x-extra"), Some("1"));
    assert_eq!(r.header("x-internal"), None, "removed from the response");
    assert_eq!(r.header("x-kept"), Some("yes"));
    assert_eq!(r.text(), "api");

    // Stripping the whole path leaves "/".
    request(p.listen, "GET", "/api", &[], b"").unwrap();
    assert_eq!(seen.last().path, "/");
    // replace_prefix.
    request(p.listen, "GET", "/v1/items?x=%20y", &[], b"").unwrap();
    assert_eq!(seen.last().path, "/v2/items?x=%20y");
    // A route without rules forwards as it came.
    let r = request(p.listen, "GET", "/other?a", &[("x-remove", "kept")], b"").unwrap();
    let h = seen.last();
    assert_eq!(h.path, "/other?a");
    assert_eq!(values(&h, "x-remove"), ["kept"]);
    assert_eq!(r.header("x-internal"), Some("secret"));
}

/// Redirects (fixed, scheme change keeping host, path and query) and fixed responses, on a
/// kept-alive connection; none of them reaches a backend.
#[test]
fn redirects_and_fixed_responses() {
    let (backend, seen) = recording_backend("web");
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [\"{backend}\"]\n\
         [[route]]\nhost = \"old.example\"\nredirect = {{ status = 301, to = \"https://new.example/\" }}\n\
         [[route]]\npath_prefix = \"/secure\"\nredirect = {{ scheme = \"https\", status = 308 }}\n\
         [[route]]\npath_prefix = \"/moved\"\nredirect = {{ host = \"other.example\", port = 8443 }}\n\
         [[route]]\npath_prefix = \"/healthz\"\nrespond = {{ body = \"ok\\n\" }}\n\
         response_headers = {{ set = {{ cache-control = \"no-store\" }} }}\n\
         [[route]]\npath_prefix = \"/gone\"\nrespond = {{ status = 410, body = \"{{\\\"gone\\\":true}}\", content_type = \"application/json\" }}\n\
         [[route]]\npath_prefix = \"/empty\"\nrespond = {{ status = 204 }}\n\
         [[route]]\npath_prefix = \"/\"\npool = \"web\"\n"
    );
    let p = Proxy::start("routes-redirects", &body);

    let r = raw(
        p.listen,
        "GET /any/path?x=1 HTTP/1.1\r\nHost: OLD.example:8080\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 301);
    assert_eq!(r.header("location"), Some("https://new.example/"));
    assert_eq!(r.header("content-length"), Some("0"));

    let r = raw(
        p.listen,
        "GET /secure/a?b=1 HTTP/1.1\r\nHost: site.example:8080\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some("https://site.example/secure/a?b=1"),
        "a new scheme drops the old port, keeps host, path and query"
    );
    // An HTTP/1.0 request without a host cannot keep its host.
    let r = raw(p.listen, "GET /secure/a HTTP/1.0\r\n\r\n");
    assert_eq!(r.status, 400, "{}", r.text());
    assert_eq!(r.header("location"), None);
    let r = raw(
        p.listen,
        "GET /moved/x HTTP/1.1\r\nHost: site.example\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(r.status, 302, "the default status");
    assert_eq!(
        r.header("location"),
        Some("http://other.example:8443/moved/x")
    );

    // Fixed responses, several on one connection.
    let mut c = HttpConn::connect(p.listen, Duration::from_secs(10)).unwrap();
    let r = c.request("GET", "/healthz", &[], b"").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "ok\n"));
    assert_eq!(r.header("content-type"), Some("text/plain; charset=utf-8"));
    assert_eq!(
        r.header("cache-control"),
        Some("no-store"),
        "response edits apply"
    );
    let r = c.request("GET", "/gone/x", &[], b"").unwrap();
    assert_eq!((r.status, r.text().as_str()), (410, "{\"gone\":true}"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let r = c.request("HEAD", "/healthz", &[], b"").unwrap();
    assert_eq!(r.status, 200);
    assert!(r.body.is_empty(), "HEAD has no body");
    let r = c.request("GET", "/empty", &[], b"").unwrap();
    assert_eq!(r.status, 204);
    assert!(r.body.is_empty());
    // A request with a body is answered too (the body is read or the connection closed).
    let r = c.request("POST", "/healthz", &[], b"payload").unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(seen.count(), 0, "nothing reached the backend");
    // The pool route still proxies.
    let r = request(p.listen, "GET", "/x", &[], b"").unwrap();
    assert_eq!((r.status, r.text().as_str()), (200, "web"));
    assert_eq!(seen.count(), 1);
}

/// Method, header and regex conditions; more conditions win over file order at equal prefix;
/// nothing matching is a 404.
#[test]
fn matching_on_method_header_and_regex() {
    let (backend, seen) = recording_backend("canary");
    let body = format!(
        "[[pool]]\nname = \"canary\"\nbackends = [\"{backend}\"]\n\
         [[route]]\npath_prefix = \"/m\"\nrespond = {{ body = \"read\" }}\n\
         [[route]]\npath_prefix = \"/m\"\nmethods = [\"post\", \"PUT\"]\nrespond = {{ body = \"write\" }}\n\
         [[route]]\npath_prefix = \"/h\"\nrespond = {{ body = \"stable\" }}\n\
         [[route]]\npath_prefix = \"/h\"\nheaders = {{ x-canary = \"1\" }}\npool = \"canary\"\n\
         [[route]]\npath_prefix = \"/h\"\nheaders = {{ x-debug = true, x-canary = false }}\nrespond = {{ body = \"debug\" }}\n\
         [[route]]\npath_regex = \"^/items/[0-9]+$\"\nrespond = {{ body = \"item\" }}\n"
    );
    let p = Proxy::start("routes-match", &body);
    let text = |method: &str, path: &str, headers: &[(&str, &str)]| {
        let r = request(p.listen, method, path, headers, b"").unwrap();
        (r.status, r.text())
    };
    assert_eq!(text("GET", "/m", &[]), (200, "read".into()));
    assert_eq!(text("POST", "/m", &[]), (200, "write".into()));
    assert_eq!(text("PUT", "/m/x", &[]), (200, "write".into()));
    assert_eq!(text("GET", "/h", &[]), (200, "stable".into()));
    assert_eq!(
        text("GET", "/h", &[("x-canary", "2")]),
        (200, "stable".into())
    );
    assert_eq!(
        text("GET", "/h", &[("X-Canary", "1")]),
        (200, "canary".into())
    );
    assert_eq!(seen.count(), 1);
    assert_eq!(text("GET", "/h", &[("x-debug", "")]), (200, "debug".into()));
    assert_eq!(
        text("GET", "/h", &[("x-debug", "1"), ("x-canary", "1")]),
        (200, "canary".into()),
        "equally specific: file order"
    );
    assert_eq!(text("GET", "/items/42", &[]), (200, "item".into()));
    assert_eq!(
        text("GET", "/items/42?q=1", &[]),
        (200, "item".into()),
        "the query is not matched"
    );
    assert_eq!(text("GET", "/items/4x", &[]).0, 404);
    assert_eq!(text("GET", "/nothing", &[]).0, 404);
}

/// Over HTTP/2 (h2c, pingora's path): edits, rewrites, redirects and fixed responses.
#[test]
fn rules_apply_over_h2c() {
    let (backend, seen) = recording_backend("api");
    let body = format!(
        "[[pool]]\nname = \"api\"\nbackends = [\"{backend}\"]\n\
         [[route]]\npath_prefix = \"/api\"\npool = \"api\"\nstrip_prefix = \"/api\"\n{EDITS}\n\
         [[route]]\npath_prefix = \"/old\"\nredirect = {{ scheme = \"https\", status = 301 }}\n\
         [[route]]\npath_prefix = \"/ping\"\nmethods = [\"GET\"]\nrespond = {{ body = \"pong\" }}\n"
    );
    let p = Proxy::start_full(scratch_dir("routes-h2c"), "h2c = true", &body);
    let base = format!("http://{}", p.listen);

    let (code, headers, text) = curl_h2(
        &format!("{base}/api/a/b?k=v"),
        &["-H", "x-set: old", "-H", "x-remove: 1"],
    );
    assert_eq!((code, text.as_str()), (200, "api"));
    assert!(headers.contains("x-resp: set"), "{headers}");
    assert!(!headers.contains("x-internal"), "{headers}");
    let h = seen.last();
    assert_eq!(h.path, "/a/b?k=v");
    assert_eq!(values(&h, "x-set"), ["new"]);
    assert!(values(&h, "x-remove").is_empty());
    assert_eq!(values(&h, "x-add"), ["added"]);

    let (code, headers, _) = curl_h2(&format!("{base}/old/page?x=1"), &[]);
    assert_eq!(code, 301);
    let want = format!("location: https://{}/old/page?x=1", p.listen.ip());
    assert!(headers.contains(&want), "{want} in {headers}");

    let (code, _, text) = curl_h2(&format!("{base}/ping"), &[]);
    assert_eq!((code, text.as_str()), (200, "pong"));
    let (code, _, _) = curl_h2(&format!("{base}/ping"), &["-X", "DELETE"]);
    assert_eq!(code, 404, "method not listed, no other route");
}

/// A route can turn the access log off or on with its own format; answers sluice gives
/// itself are logged with no pool.
#[test]
fn access_log_per_route() {
    let (backend, _seen) = recording_backend("web");
    let dir = scratch_dir("routes-access-log");
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [\"{backend}\"]\n\
         [[route]]\npath_prefix = \"/quiet\"\npool = \"web\"\naccess_log = \"off\"\n\
         [[route]]\npath_prefix = \"/common\"\npool = \"web\"\naccess_log = \"common\"\n\
         [[route]]\npath_prefix = \"/r\"\nredirect = {{ to = \"/elsewhere\", status = 307 }}\n\
         [[route]]\npath_prefix = \"/\"\npool = \"web\"\n"
    );
    let p = Proxy::start_full(
        dir.clone(),
        "access_log = { format = \"json\", path = \"access.log\" }",
        &body,
    );
    for path in ["/quiet/1", "/common/2", "/r/3", "/loud/4"] {
        assert_ne!(request(p.listen, "GET", path, &[], b"").unwrap().status, 0);
    }
    let path = dir.join("access.log");
    let mut text = String::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            text = std::fs::read_to_string(&path).unwrap_or_default();
            text.lines().count() >= 3
        }),
        "access log lines did not appear: {text}"
    );
    assert!(
        !text.contains("/quiet/1"),
        "route with access_log = off: {text}"
    );
    let common = text
        .lines()
        .find(|l| l.contains("/common/2"))
        .expect("common line");
    assert!(
        common.contains("\"GET /common/2 HTTP/1.1\" 200"),
        "{common}"
    );
    let json = |p: &str| -> serde_json::Value {
        let l = text.lines().find(|l| l.contains(p)).expect(p);
        serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))
    };
    let redirect = json("/r/3");
    assert_eq!(redirect["status"], 307);
    assert_eq!(redirect["pool"], serde_json::Value::Null);
    assert_eq!(json("/loud/4")["pool"], "web");

    // With the log off by default, a route turns it on.
    let dir = scratch_dir("routes-access-log-on");
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [\"{backend}\"]\n\
         [[route]]\npath_prefix = \"/audit\"\npool = \"web\"\naccess_log = \"json\"\n\
         [[route]]\npath_prefix = \"/\"\npool = \"web\"\n"
    );
    let p = Proxy::start_full(dir.clone(), "access_log = { path = \"access.log\" }", &body);
    request(p.listen, "GET", "/plain", &[], b"").unwrap();
    request(p.listen, "GET", "/audit/1", &[], b"").unwrap();
    let path = dir.join("access.log");
    assert!(
        wait_for(Duration::from_secs(10), || {
            text = std::fs::read_to_string(&path).unwrap_or_default();
            text.contains("/audit/1")
        }),
        "the route's line did not appear: {text}"
    );
    assert!(!text.contains("/plain"), "{text}");
}

/// A reload applies new route rules; a bad one is refused and the old rules keep serving.
#[test]
fn reload_applies_route_rules() {
    let pool = "[[pool]]\nname = \"web\"\nbackends = [\"127.0.0.1:9\"]\n";
    let p = Proxy::start(
        "routes-reload",
        &format!("{pool}[[route]]\npath_prefix = \"/\"\nrespond = {{ body = \"one\" }}\n"),
    );
    assert_eq!(p.get("/").text(), "one");
    p.reload_with(&format!(
        "{pool}[[route]]\npath_prefix = \"/\"\nrespond = {{ body = \"two\" }}\n"
    ));
    assert_eq!(p.get("/").text(), "two");
    p.rewrite_pools(&format!(
        "{pool}[[route]]\npath_prefix = \"/\"\npath_regex = \"(\"\nrespond = {{ body = \"three\" }}\n"
    ));
    let r = p.admin_req("POST", "/api/reload", b"");
    assert_ne!(r.status, 200);
    assert!(
        r.text().contains("path_regex is not a valid regex"),
        "{}",
        r.text()
    );
    assert_eq!(p.get("/").text(), "two");
}

/// `sluice check` refuses bad route rules with the route, the line and what to do.
#[test]
fn check_refuses_bad_route_rules() {
    let dir = scratch_dir("routes-check");
    let head = "[server]\nlisten = [\"127.0.0.1:18080\"]\n[admin]\nlisten = \"127.0.0.1:19900\"\n[[pool]]\nname = \"web\"\nbackends = [\"127.0.0.1:9001\"]\n";
    let cases = [
        (
            "[[route]]\npath_prefix = \"/\"\n",
            ":8:1: route 1: the route has nowhere to send requests; give it exactly one of `pool",
        ),
        (
            "[[route]]\npool = \"web\"\nrespond = { body = \"x\" }\n",
            ":10:11: route 1: the route has more than one of `pool`, `redirect` and `respond`",
        ),
        (
            "[[route]]\npool = \"web\"\npath_regex = \"[a-\"\n",
            ":10:14: route 1: path_regex is not a valid regex",
        ),
        (
            "[[route]]\npool = \"web\"\nresponse_headers = { remove = [\"Transfer-Encoding\"] }\n",
            "header \"Transfer-Encoding\" cannot be edited",
        ),
        (
            "[[route]]\npool = \"web\"\nrequest_headers = { set = { X-Forwarded-For = \"1.2.3.4\" } }\n",
            "it is managed by [server.forwarding]",
        ),
        (
            "[[route]]\nredirect = { status = 200, to = \"/x\" }\n",
            "redirect status 200 is not a redirect; use 301, 302, 303, 307 or 308",
        ),
    ];
    for (route, want) in cases {
        let path = dir.join("sluice.toml");
        std::fs::write(&path, format!("{head}{route}")).unwrap();
        let out = sluice_cli(&["check", "--config", path.to_str().unwrap()]);
        assert!(!out.ok, "{route:?} accepted");
        assert!(
            out.stderr.contains(want),
            "{route:?}: expected {want:?} in {}",
            out.stderr
        );
    }
    // A config whose only route redirects needs no pool.
    let path = dir.join("sluice.toml");
    std::fs::write(
        &path,
        "[server]\nlisten = [\"127.0.0.1:18080\"]\n[[route]]\nredirect = { scheme = \"https\", status = 308 }\n",
    )
    .unwrap();
    let out = sluice_cli(&["check", "--config", path.to_str().unwrap()]);
    assert!(out.ok, "{}", out.stderr);
}
