//! `[server.limits] rate_limit`: a client over its token bucket is answered 429 with
//! `Retry-After`, counted and logged, while another client address is served; the same on both
//! HTTP/1 engines and on HTTP/2.

mod common;

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

/// Two loopback source addresses only this test process uses (from its pid).
fn client_ips() -> [Ipv4Addr; 2] {
    let pid = std::process::id();
    let high = ((pid >> 16) & 0x3f) as u8;
    [128, 192].map(|top| Ipv4Addr::new(127, top | high, (pid >> 8) as u8, pid as u8))
}

/// A connection to `to` from `from` (any port).
fn connect_from(from: Ipv4Addr, to: SocketAddr) -> TcpStream {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let s = rt.block_on(async {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.bind(SocketAddr::from((from, 0))).unwrap();
        socket.connect(to).await.unwrap()
    });
    let s = s.into_std().unwrap();
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s
}

/// One `GET /` from `from` on a new connection: (status, Retry-After).
fn get_from(from: Ipv4Addr, to: SocketAddr) -> (u16, Option<String>) {
    let mut c = connect_from(from, to);
    c.write_all(b"GET /limited HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = c.read_to_end(&mut out);
    let text = String::from_utf8_lossy(&out);
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let retry_after = text
        .split("\r\n\r\n")
        .next()
        .unwrap_or("")
        .lines()
        .find_map(|l| {
            let (name, value) = l.split_once(':')?;
            name.eq_ignore_ascii_case("retry-after")
                .then(|| value.trim().to_string())
        });
    (status, retry_after)
}

/// Sends with `send` until an answer is `limited` (at most 30 times): the answers, and how many
/// passed beyond the bucket's 5 at most (one token a second refills it while the loop runs, and
/// a loaded machine can make the loop slow).
fn until_limited<T>(mut send: impl FnMut() -> T, limited: impl Fn(&T) -> bool) -> (Vec<T>, usize) {
    let started = Instant::now();
    let mut answers = Vec::new();
    while answers.len() < 30 && !answers.last().is_some_and(&limited) {
        answers.push(send());
    }
    let most = 5 + started.elapsed().as_secs_f64().ceil() as usize;
    (answers, most)
}

fn limited_proxy(tag: &str, extra: &str) -> (Proxy, ScratchDir) {
    let b = backends(1);
    let dir = scratch_dir(tag);
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [{}]\n[[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    // A bucket of 5, refilled at one token a second.
    let server = format!(
        "limits = {{ rate_limit = {{ requests_per_second = 1, burst = 5 }} }}\naccess_log = {{ format = \"json\", path = \"access.log\" }}\n{extra}"
    );
    let p = Proxy::start_full(dir.clone(), &server, &body);
    std::mem::forget(b);
    (p, dir)
}

#[test]
fn a_burst_over_the_bucket_is_answered_429_and_other_clients_are_served() {
    let (p, dir) = limited_proxy("ratelimit", "");
    let [first, second] = client_ips();
    let (statuses, most) = until_limited(|| get_from(first, p.listen), |(s, _)| *s == 429);
    let ok = statuses.iter().filter(|(s, _)| *s == 200).count();
    let limited: Vec<_> = statuses.iter().filter(|(s, _)| *s == 429).collect();
    // The burst (5) passes, and no more than the tokens added meanwhile.
    assert!((5..=most).contains(&ok), "{statuses:?}");
    assert_eq!((ok, limited.len()), (statuses.len() - 1, 1), "{statuses:?}");
    for (_, retry_after) in &limited {
        let secs: u64 = retry_after
            .as_deref()
            .expect("Retry-After")
            .parse()
            .unwrap();
        assert!((1..=2).contains(&secs), "{retry_after:?}");
    }
    // Another client address has its own bucket.
    for _ in 0..5 {
        assert_eq!(get_from(second, p.listen).0, 200);
    }
    assert_eq!(
        p.metric("sluice_limit_rejections_total{reason=\"rate_limit\"}"),
        limited.len() as f64
    );
    // Each rejection is in the access log, with the client's address.
    let path = dir.join("access.log");
    let mut lines: Vec<serde_json::Value> = Vec::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            lines = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .filter_map(|l| serde_json::from_str(l).ok())
                .collect();
            lines.iter().filter(|l| l["status"] == 429).count() == limited.len()
        }),
        "{lines:?}"
    );
    assert!(lines
        .iter()
        .filter(|l| l["status"] == 429)
        .all(|l| l["client_ip"] == first.to_string()));
}

/// Behind a trusted proxy, the bucket is the forwarded client's.
#[test]
fn behind_a_trusted_proxy_the_forwarded_client_is_limited() {
    let (p, _dir) = limited_proxy(
        "ratelimit-fwd",
        "forwarding = { trusted_proxies = [\"127.0.0.0/8\"] }",
    );
    let [from, _] = client_ips();
    let get = |client: &str| {
        let mut c = connect_from(from, p.listen);
        let req = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {client}\r\nConnection: close\r\n\r\n"
        );
        c.write_all(req.as_bytes()).unwrap();
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out.split(' ').nth(1).unwrap_or("").to_string()
    };
    let (statuses, most) = until_limited(|| get("203.0.113.7"), |s| s == "429");
    assert_eq!(
        statuses.last().map(String::as_str),
        Some("429"),
        "{statuses:?}"
    );
    assert!((6..=most + 1).contains(&statuses.len()), "{statuses:?}");
    assert_eq!(get("203.0.113.8"), "200", "another forwarded client");
}

/// HTTP/2 streams are limited too (pingora-proxy's path).
#[test]
fn http2_requests_are_limited() {
    let (p, _dir) = limited_proxy("ratelimit-h2", "h2c = true");
    let [from, _] = client_ips();
    let url = format!("http://{}/h2", p.listen);
    let from = IpAddr::V4(from).to_string();
    let curl = || {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "--max-time", "10"])
            .args(["--http2-prior-knowledge", "--interface", &from])
            .args(["-w", "%{http_version} %{http_code}", &url])
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let (codes, most) = until_limited(curl, |c| c == "2 429");
    assert!(codes.iter().all(|c| c.starts_with("2 ")), "{codes:?}");
    assert_eq!(codes.last().map(String::as_str), Some("2 429"), "{codes:?}");
    let ok = codes.iter().filter(|c| *c == "2 200").count();
    assert!((5..=most).contains(&ok), "{codes:?}");
}
