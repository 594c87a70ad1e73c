//! `[server.limits]`: clients that send too slowly, too much, or open too many connections are
//! cut off with the right status, counted, and never stop other clients or the admin API.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use common::*;

fn limited(
    tag: &str,
    limits: &str,
) -> (
    Proxy,
    Vec<(
        std::net::SocketAddr,
        std::sync::Arc<sluice::demo::DemoBackend>,
    )>,
) {
    let b = backends(1);
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [{}]\n[[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    let p = Proxy::start_full(scratch_dir(tag), &format!("limits = {{ {limits} }}"), &body);
    (p, b)
}

/// True when the proxy closed `c` (EOF or reset) before `limit`.
fn closed_within(c: &mut TcpStream, limit: Duration) -> bool {
    c.set_read_timeout(Some(limit)).unwrap();
    let mut b = [0u8; 256];
    loop {
        match c.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e)
                if e.kind() == std::io::ErrorKind::WouldBlock
                    || e.kind() == std::io::ErrorKind::TimedOut =>
            {
                return false
            }
            Err(_) => return true,
        }
    }
}

/// Silent connections and clients that dribble their head a byte at a time are closed by the
/// header timeout, while a normal client and the admin API are served throughout.
#[test]
fn slow_and_silent_clients_are_closed_by_the_header_timeout() {
    let (p, _b) = limited(
        "limits-slow",
        "header_timeout = \"1s\", keepalive_timeout = \"1s\"",
    );
    let addr = p.listen;
    // 20 dribblers: one byte every 200 ms, far slower than the head needs.
    let dribblers: Vec<_> = (0..20)
        .map(|_| {
            std::thread::spawn(move || {
                let mut c = TcpStream::connect(addr).unwrap();
                let head = b"GET / HTTP/1.1\r\nHost: slow\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
                let started = Instant::now();
                for byte in head.chunks(1) {
                    if c.write_all(byte).is_err() {
                        return Some(started.elapsed());
                    }
                    std::thread::sleep(Duration::from_millis(200));
                }
                None
            })
        })
        .collect();
    // 100 silent connections and 20 idle kept-alive ones (one request, then nothing).
    let mut silent: Vec<TcpStream> = (0..100)
        .map(|_| TcpStream::connect(addr).unwrap())
        .collect();
    let mut idle: Vec<TcpStream> = (0..20)
        .map(|_| {
            let mut c = TcpStream::connect(addr).unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut b = [0u8; 512];
            assert!(c.read(&mut b).unwrap() > 0);
            c
        })
        .collect();
    // Normal clients and the admin API keep being served meanwhile.
    for _ in 0..10 {
        assert_eq!(p.get("/").status, 200);
        assert_eq!(p.admin_req("GET", "/healthz", b"").status, 200);
    }
    for c in silent.iter_mut().chain(idle.iter_mut()) {
        assert!(
            closed_within(c, Duration::from_secs(20)),
            "a silent or idle connection was left open"
        );
    }
    for d in dribblers {
        let cut = d.join().unwrap();
        assert!(
            cut.is_some(),
            "a dribbling client sent its whole head (about 16 s) without being cut off"
        );
    }
    assert!(p.metric("sluice_limit_rejections_total{reason=\"header_timeout\"}") >= 120.0);
    assert_eq!(p.get("/").status, 200);
}

#[test]
fn oversized_heads_and_bodies_are_refused_before_the_backend() {
    let (p, b) = limited(
        "limits-size",
        "max_header_bytes = 2048, max_body_bytes = 1000",
    );
    let reply = |req: &[u8]| {
        let mut c = TcpStream::connect(p.listen).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.write_all(req);
        let mut out = Vec::new();
        let _ = c.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    };
    let big_head = format!(
        "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(4000)
    );
    assert!(reply(big_head.as_bytes()).starts_with("HTTP/1.1 431 "));
    let r = reply(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 413 "), "{r}");
    assert!(r.contains("over the limit of 1000"), "{r}");
    // Refused with its body already on the way: the answer still arrives. (sluice also reads and
    // drops such a body for a moment before closing, as nginx's lingering close does; on loopback
    // the answer arrives either way, so this does not tell the two apart.)
    let mut with_body = b"PUT / HTTP/1.1\r\nHost: x\r\nContent-Length: 200000\r\n\r\n".to_vec();
    with_body.extend(std::iter::repeat_n(b'z', 200_000));
    let r = reply(&with_body);
    assert!(r.starts_with("HTTP/1.1 413 "), "{}", &r[..r.len().min(200)]);
    let served_before = b[0].1.served.load(Ordering::SeqCst);
    // Within the limit: served.
    let mut ok =
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 900\r\nConnection: close\r\n\r\n".to_vec();
    ok.extend(std::iter::repeat_n(b'x', 900));
    assert!(reply(&ok).starts_with("HTTP/1.1 200 "));
    assert_eq!(b[0].1.served.load(Ordering::SeqCst), served_before + 1);
    // A chunked body that grows past the limit is cut off with 413.
    let mut chunked = b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    chunked.extend(sluice::http1::encode_chunked(&[b'y'; 300_000], 500));
    let r = reply(&chunked);
    assert!(r.starts_with("HTTP/1.1 413 "), "{}", &r[..r.len().min(200)]);
    assert!(p.metric("sluice_limit_rejections_total{reason=\"body_size\"}") >= 2.0);
    assert!(p.metric("sluice_limit_rejections_total{reason=\"header_size\"}") >= 1.0);
}

/// One connection over `max_connections` is closed at once; the admin API has its own listener
/// and stays up; closing a connection frees its place.
#[test]
fn the_connection_cap_closes_extra_connections_and_frees_places() {
    let (p, _b) = limited("limits-conns", "max_connections = 5");
    let mut held: Vec<TcpStream> = (0..5)
        .map(|_| {
            let mut c = TcpStream::connect(p.listen).unwrap();
            c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
            let mut b = [0u8; 512];
            assert!(
                c.read(&mut b).unwrap() > 0,
                "a connection under the cap was not served"
            );
            c
        })
        .collect();
    let mut extra = TcpStream::connect(p.listen).unwrap();
    let _ = extra.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(
        closed_within(&mut extra, Duration::from_secs(10)),
        "the sixth connection was served"
    );
    assert_eq!(p.admin_req("GET", "/healthz", b"").status, 200);
    assert!(p.metric("sluice_limit_rejections_total{reason=\"connections\"}") >= 1.0);
    drop(held.pop());
    assert!(
        wait_for(Duration::from_secs(10), || p
            .metric("sluice_downstream_connections")
            <= 4.0),
        "the closed connection's place was not freed"
    );
    assert_eq!(p.get("/").status, 200, "a freed place is taken again");
}

/// HTTP/2 requests (and HTTP/1 on the pingora engine, when the suite runs on it) get the same
/// head and body limits: 431 for a large head, 413 for a declared or a streamed body over the
/// limit, none of them reaching the backend.
#[test]
fn http2_requests_get_the_same_size_limits() {
    let b = backends(1);
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [{}]\n[[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    let p = Proxy::start_full(
        scratch_dir("limits-h2"),
        "h2c = true\nlimits = { max_header_bytes = 2048, max_body_bytes = 1000 }",
        &body,
    );
    let url = format!("http://{}/", p.listen);
    let curl = |args: &[&str], stdin: &[u8]| {
        let mut child = std::process::Command::new("curl")
            .args(["-s", "--max-time", "10", "--http2-prior-knowledge"])
            .args(["-o", "/dev/null", "-w", "%{http_version} %{http_code}"])
            .args(args)
            .arg(&url)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let mut input = child.stdin.take().unwrap();
        let _ = input.write_all(stdin);
        drop(input);
        let out = child.wait_with_output().unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let served = || b[0].1.served.load(Ordering::SeqCst);
    assert_eq!(curl(&[], b""), "2 200");
    let before = served();
    let big = format!("X-Big: {}", "a".repeat(4000));
    assert_eq!(curl(&["-H", &big], b""), "2 431");
    let declared = "z".repeat(5000);
    assert_eq!(curl(&["--data-binary", &declared], b""), "2 413");
    // Streamed from stdin: no Content-Length, so it is counted as it arrives.
    assert_eq!(curl(&["-X", "POST", "-T", "-"], &[b'y'; 300_000]), "2 413");
    assert_eq!(curl(&["--data-binary", &"x".repeat(900)], b""), "2 200");
    assert!(p.metric("sluice_limit_rejections_total{reason=\"body_size\"}") >= 2.0);
    assert!(p.metric("sluice_limit_rejections_total{reason=\"header_size\"}") >= 1.0);
    // Only the two requests within the limits reached the backend... or the streamed one too,
    // cut off before its end: the backend never saw a complete request over the limit.
    assert!(served() - before <= 2, "{} served", served() - before);
}
