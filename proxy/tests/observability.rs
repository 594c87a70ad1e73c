//! Observability of the request path, read the way an operator reads it: `/metrics` parsed after
//! real requests through a real proxy (histogram counts, byte counters, per-backend series only
//! when asked for, series gone with their pool), and access log JSON lines with every documented
//! field, over plain HTTP/1, TLS (version and SNI) and HTTP/2.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use sluice::client::HttpConn;

fn pool_route(name: &str, prefix: &str, list: &str) -> String {
    format!(
        "[[pool]]\nname = \"{name}\"\nbackends = [{list}]\n[[route]]\npath_prefix = \"{prefix}\"\npool = \"{name}\"\n"
    )
}

fn metrics_text(p: &Proxy) -> String {
    p.admin_req("GET", "/metrics", b"").text()
}

/// The value of the series named exactly `series` (name and labels), if present.
fn series(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Every access log line so far, once at least `n` are there.
fn log_lines(path: &std::path::Path, n: usize) -> Vec<serde_json::Value> {
    let mut lines = Vec::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            lines = std::fs::read_to_string(path)
                .unwrap_or_default()
                .lines()
                .map(String::from)
                .collect();
            lines.len() >= n
        }),
        "{n} access log lines did not appear: {lines:?}"
    );
    lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect()
}

/// The fields docs/config.md lists for `format = "json"`: every line has every one.
const FIELDS: [&str; 20] = [
    "time",
    "client_ip",
    "client_port",
    "method",
    "host",
    "path",
    "protocol",
    "tls",
    "sni",
    "status",
    "bytes_in",
    "bytes_out",
    "duration_ms",
    "upstream_connect_ms",
    "upstream_response_ms",
    "pool",
    "backend",
    "attempts",
    "generation",
    "request_id",
];

fn assert_every_field(line: &serde_json::Value) {
    let obj = line.as_object().expect("a JSON object");
    for f in FIELDS {
        assert!(obj.contains_key(f), "field {f} missing from {line}");
    }
}

/// Every proxied request is one observation in each per-pool histogram; the upstream response
/// histogram sees the backend's delay; body bytes are counted both ways; no per-backend series
/// exist without `[admin] metrics_per_backend`.
#[test]
fn request_histograms_and_byte_counters_count_every_request() {
    let b = backends(2);
    for (_, backend) in &b {
        backend.delay_ms.store(20, Ordering::Relaxed);
    }
    let p = Proxy::start("obs-counts", &pool_route("web", "/", &backend_list(&b)));
    const GETS: usize = 12;
    const POSTS: usize = 4;
    const BODY: usize = 1000;
    let mut conn = HttpConn::connect(p.listen, Duration::from_secs(10)).unwrap();
    for _ in 0..GETS {
        let r = conn.request("GET", "/a", &[], b"").unwrap();
        assert_eq!(r.status, 200);
    }
    for _ in 0..POSTS {
        let r = conn.request("POST", "/a", &[], &[b'x'; BODY]).unwrap();
        assert_eq!(r.status, 200);
    }
    drop(conn);
    let n = (GETS + POSTS) as f64;
    let count = |name: &str| {
        series(&metrics_text(&p), &format!("{name}_count{{pool=\"web\"}}")).unwrap_or(-1.0)
    };
    // The last request is observed after its response went out: wait for it.
    assert!(
        wait_for(Duration::from_secs(10), || count(
            "sluice_request_duration_seconds"
        ) == n),
        "request duration count {} != {n}",
        count("sluice_request_duration_seconds")
    );
    let text = metrics_text(&p);
    let get = |s: &str| series(&text, s).unwrap_or_else(|| panic!("no series {s} in\n{text}"));
    assert_eq!(
        get("sluice_upstream_response_seconds_count{pool=\"web\"}"),
        n
    );
    // Upstream connections: at least one new one, and never more than one per request (the
    // others were reused and are not observed).
    let connects = get("sluice_upstream_connect_seconds_count{pool=\"web\"}");
    assert!((1.0..=n).contains(&connects), "{connects} connects");
    // Each backend waited 20 ms before answering: no answer falls in the buckets below that,
    // and the sums are at least the waits.
    assert_eq!(
        get("sluice_upstream_response_seconds_bucket{pool=\"web\",le=\"0.01\"}"),
        0.0
    );
    assert_eq!(
        get("sluice_upstream_response_seconds_bucket{pool=\"web\",le=\"+Inf\"}"),
        n
    );
    assert!(get("sluice_upstream_response_seconds_sum{pool=\"web\"}") >= n * 0.02);
    assert!(get("sluice_request_duration_seconds_sum{pool=\"web\"}") >= n * 0.02);
    assert_eq!(
        get("sluice_request_duration_seconds_bucket{pool=\"web\",le=\"0.01\"}"),
        0.0
    );
    // Bodies only: the demo backends answer "b1\n" or "b2\n".
    assert_eq!(
        get("sluice_request_body_bytes_total{pool=\"web\"}"),
        (POSTS * BODY) as f64
    );
    assert_eq!(
        get("sluice_response_body_bytes_total{pool=\"web\"}"),
        n * 3.0
    );
    assert!(
        !text.contains("sluice_backend_request_duration_seconds_count{")
            && !text.contains("sluice_backend_upstream_"),
        "per-backend series without metrics_per_backend:\n{text}"
    );
}

/// With `[admin] metrics_per_backend = true` each backend has its own histograms, whose counts
/// add up to the pool's; a pool removed by a reload takes every one of its series with it.
#[test]
fn per_backend_histograms_follow_the_option_and_leave_with_their_pool() {
    let b = backends(2);
    let list = backend_list(&b);
    let both = format!(
        "{}{}",
        pool_route("api", "/api", &list),
        pool_route("web", "/", &list)
    );
    // The body follows `[admin]`, so its first line is an `[admin]` key.
    let p = Proxy::start(
        "obs-per-backend",
        &format!("metrics_per_backend = true\n{both}"),
    );
    let mut conn = None;
    for path in ["/api/x", "/api/y", "/api/z", "/w", "/w"] {
        assert_eq!(
            keepalive_get(&mut conn, p.listen, path).unwrap().status,
            200
        );
    }
    drop(conn);
    let per_backend = |text: &str, pool: &str| -> f64 {
        b.iter()
            .map(|(addr, _)| {
                series(
                    text,
                    &format!(
                        "sluice_backend_request_duration_seconds_count{{backend=\"{addr}\",pool=\"{pool}\"}}"
                    ),
                )
                .unwrap_or(0.0)
            })
            .sum()
    };
    assert!(
        wait_for(Duration::from_secs(10), || {
            let text = metrics_text(&p);
            per_backend(&text, "api") == 3.0 && per_backend(&text, "web") == 2.0
        }),
        "per-backend counts: {}",
        metrics_text(&p)
    );
    let text = metrics_text(&p);
    for (addr, _) in &b {
        for family in ["upstream_connect", "upstream_response"] {
            let name =
                format!("sluice_backend_{family}_seconds_count{{backend=\"{addr}\",pool=\"api\"}}");
            assert!(series(&text, &name).is_some(), "no {name}");
        }
    }
    assert_eq!(
        series(
            &text,
            "sluice_upstream_response_seconds_count{pool=\"api\"}"
        ),
        Some(3.0)
    );

    // The api pool goes: none of its series stay, the web pool's do.
    p.reload_with(&pool_route("web", "/", &list));
    let text = metrics_text(&p);
    assert!(
        !text.contains("pool=\"api\""),
        "a removed pool left series:\n{text}"
    );
    assert_eq!(per_backend(&text, "web"), 2.0);
    assert_eq!(
        series(&text, "sluice_request_duration_seconds_count{pool=\"web\"}"),
        Some(2.0)
    );
}

/// Plain HTTP/1: every documented field is on every line, with the upstream times of a proxied
/// request, body byte counts, and no TLS.
#[test]
fn access_log_lines_carry_every_documented_field() {
    let b = backends(1);
    let dir = scratch_dir("obs-log");
    let p = Proxy::start_full(
        dir.clone(),
        "access_log = { format = \"json\", path = \"access.log\" }",
        &pool_route("web", "/", &backend_list(&b)),
    );
    let mut conn = HttpConn::connect(p.listen, Duration::from_secs(10)).unwrap();
    let r = conn.request("POST", "/first?q=1", &[], b"hello").unwrap();
    assert_eq!(r.status, 200);
    // A reused upstream connection logs a connect time of zero. The lean path always reuses it
    // for the next request; pingora-proxy's shared pool now and then opens a new one (pingora
    // issue 201), so on that engine one of a few requests must show the reuse.
    let seconds = if lean_engine() { 1 } else { 5 };
    for _ in 0..seconds {
        let r = conn.request("GET", "/second", &[], b"").unwrap();
        assert_eq!(r.status, 200);
    }
    drop(conn);
    let lines = log_lines(&dir.join("access.log"), 1 + seconds);
    for l in &lines {
        assert_every_field(l);
        assert_eq!(l["protocol"], "HTTP/1.1");
        assert_eq!(l["tls"], serde_json::Value::Null);
        assert_eq!(l["sni"], serde_json::Value::Null);
        assert_eq!(l["pool"], "web");
        assert_eq!(l["backend"], b[0].0.to_string());
        assert_eq!(l["attempts"], 1);
        assert!(l["generation"].is_u64(), "{l}");
        assert!(l["client_port"].as_u64().unwrap() > 0);
        assert!(l["upstream_connect_ms"].as_f64().unwrap() >= 0.0, "{l}");
        let response = l["upstream_response_ms"].as_f64().unwrap();
        assert!(response <= l["duration_ms"].as_f64().unwrap(), "{l}");
        assert_eq!(l["bytes_out"], 3, "the body \"b1\\n\" only: {l}");
        assert!(humantime::parse_rfc3339(l["time"].as_str().unwrap()).is_ok());
    }
    let first = lines.iter().find(|l| l["path"] == "/first?q=1").unwrap();
    assert_eq!(first["method"], "POST");
    assert_eq!(first["host"], p.listen.to_string());
    assert_eq!(first["bytes_in"], 5);
    let seconds: Vec<_> = lines.iter().filter(|l| l["path"] == "/second").collect();
    assert!(seconds.iter().all(|l| l["bytes_in"] == 0), "{seconds:?}");
    assert!(
        seconds.iter().any(|l| l["upstream_connect_ms"] == 0.0),
        "a later request reused the upstream connection: {seconds:?}"
    );
}

/// Over TLS the line carries the TLS version and the SNI name the client sent, on HTTP/1.1 and
/// on HTTP/2, and the HTTP/2 request is observed in the pool's histograms too.
#[test]
fn tls_requests_log_their_version_and_sni() {
    let b = backends(1);
    let dir = scratch_dir("obs-tls");
    self_signed(&dir, "cert.pem", "key.pem");
    let tls_addr = unique_addr();
    let server = format!(
        "access_log = {{ format = \"json\", path = \"access.log\" }}\ntls = {{ listen = [\"{tls_addr}\"], cert = \"cert.pem\", key = \"key.pem\" }}"
    );
    let p = Proxy::start_full(
        dir.clone(),
        &server,
        &pool_route("web", "/", &backend_list(&b)),
    );
    let port = tls_addr.port();
    let resolve = format!("localhost:{port}:{}", tls_addr.ip());
    for (version, path) in [("--http1.1", "/one"), ("--http2", "/two")] {
        let out = Command::new("curl")
            .args([
                "-s",
                "-k",
                "--max-time",
                "10",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
            ])
            .args([version, "--resolve", &resolve])
            .arg(format!("https://localhost:{port}{path}"))
            .output()
            .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "200",
            "curl {version}"
        );
    }
    let lines = log_lines(&dir.join("access.log"), 2);
    for (path, protocol) in [("/one", "HTTP/1.1"), ("/two", "HTTP/2")] {
        let l = lines
            .iter()
            .find(|l| l["path"] == path)
            .unwrap_or_else(|| panic!("no line for {path}: {lines:?}"));
        assert_every_field(l);
        assert_eq!(l["protocol"], protocol, "{l}");
        assert_eq!(l["sni"], "localhost", "{l}");
        assert!(
            l["tls"].as_str().is_some_and(|v| v.starts_with("TLS")),
            "{l}"
        );
        assert!(l["upstream_response_ms"].is_f64(), "{l}");
        assert!(l["upstream_connect_ms"].is_f64(), "{l}");
        assert_eq!(l["status"], 200);
        assert_eq!(l["bytes_out"], 3, "{l}");
    }
    assert!(wait_for(Duration::from_secs(10), || p
        .metric("sluice_request_duration_seconds_count{pool=\"web\"}")
        == 2.0));
}

/// Heads refused before they could be parsed still get a line (the lean path's own refusals;
/// pingora-proxy answers those itself, before sluice sees a request).
#[test]
fn refused_heads_are_logged_with_what_is_known() {
    if !lean_engine() {
        eprintln!("skipped: on the pingora engine, unparsable heads never reach sluice's logging");
        return;
    }
    let dir = scratch_dir("obs-refused");
    let p = Proxy::start_full(
        dir.clone(),
        "access_log = { format = \"json\", path = \"access.log\" }\nlimits = { header_timeout = \"1s\", max_header_bytes = 1024 }",
        &pool_route("web", "/", "\"127.0.0.1:1\""),
    );
    let answer = |bytes: &[u8]| -> String {
        let mut c = TcpStream::connect(p.listen).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
        c.write_all(bytes).unwrap();
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    // A head over max_header_bytes, then a request line that is not HTTP.
    let big = format!("GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(2048));
    assert!(answer(big.as_bytes()).starts_with("HTTP/1.1 431"));
    assert!(answer(b"NOT HTTP AT ALL\r\n\r\n").starts_with("HTTP/1.1 400"));
    // A head that never completes: cut off by the header timeout, nothing sent.
    assert_eq!(answer(b"GET /slow HTTP/1.1\r\nHost: x\r\n"), "");
    let lines = log_lines(&dir.join("access.log"), 3);
    let mut statuses: Vec<u64> = lines
        .iter()
        .map(|l| l["status"].as_u64().unwrap())
        .collect();
    statuses.sort();
    assert_eq!(statuses, [400, 408, 431]);
    for l in &lines {
        assert_every_field(l);
        assert!(l["client_ip"].as_str().unwrap().starts_with("127."), "{l}");
        assert_eq!(l["method"], serde_json::Value::Null, "{l}");
        assert_eq!(l["path"], serde_json::Value::Null, "{l}");
        assert_eq!(l["pool"], serde_json::Value::Null, "{l}");
        assert_eq!(l["attempts"], 0, "{l}");
    }
}
