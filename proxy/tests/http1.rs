//! HTTP/1 behaviour of the request path, over real sockets: smuggling shapes, pipelining,
//! bodies (chunked, large, `Expect: 100-continue`), `HEAD`, HTTP/1.0, informational answers,
//! upgrades, hop-by-hop headers and upstream connection reuse.
//!
//! `scripts/test` runs this file on both HTTP/1 engines (`SLUICE_TEST_HTTP1`): the lean path and
//! pingora-proxy's. Where the two differ on purpose, the test says so.

mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use sluice::cold_lock::ColdLock;
use sluice::http1::{self, ChunkedDecoder, Framing};

/// What the test backend saw.
#[derive(Default)]
struct Seen {
    connections: AtomicUsize,
    /// Request heads in arrival order: "METHOD path" then the headers, lower-cased.
    requests: ColdLock<Vec<http1::Head>>,
}

impl Seen {
    fn paths(&self) -> Vec<String> {
        self.requests
            .lock()
            .iter()
            .map(|h| h.path.clone())
            .collect()
    }
}

/// A backend that answers each request with what it received: `method path`, then
/// `body <length> <sum>`; special paths answer with a 103 first, a chunked body, or switch
/// protocols and echo bytes.
fn echo_backend() -> (SocketAddr, Arc<Seen>) {
    let listener = TcpListener::bind(unique_addr()).unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Seen::default());
    let s = seen.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            s.connections.fetch_add(1, Ordering::SeqCst);
            let s = s.clone();
            std::thread::spawn(move || {
                let _ = serve_echo(conn, &s);
            });
        }
    });
    (addr, seen)
}

fn serve_echo(mut c: TcpStream, seen: &Seen) -> std::io::Result<()> {
    c.set_read_timeout(Some(Duration::from_secs(20)))?;
    let mut buf = Vec::new();
    loop {
        let (head, n) = loop {
            if let Some(done) = http1::parse_request(&buf).map_err(std::io::Error::other)? {
                break done;
            }
            let mut chunk = [0u8; 16 * 1024];
            let got = c.read(&mut chunk)?;
            if got == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..got]);
        };
        buf.drain(..n);
        seen.requests.lock().push(head.clone());
        if head.header("expect") == Some("100-continue") {
            c.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
        }
        let mut body = Vec::new();
        match head.framing {
            Framing::Length(len) => {
                while buf.len() < len {
                    let mut chunk = [0u8; 64 * 1024];
                    let got = c.read(&mut chunk)?;
                    if got == 0 {
                        return Ok(());
                    }
                    buf.extend_from_slice(&chunk[..got]);
                }
                body = buf.drain(..len).collect();
            }
            Framing::Chunked => {
                let mut d = ChunkedDecoder::new();
                loop {
                    let used = d.decode(&buf, &mut body).map_err(std::io::Error::other)?;
                    buf.drain(..used);
                    if d.is_done() {
                        break;
                    }
                    let mut chunk = [0u8; 16 * 1024];
                    let got = c.read(&mut chunk)?;
                    if got == 0 {
                        return Ok(());
                    }
                    buf.extend_from_slice(&chunk[..got]);
                }
            }
            _ => {}
        }
        let sum: u64 = body.iter().map(|&b| u64::from(b)).sum();
        let text = format!("{} {}\nbody {} {sum}\n", head.method, head.path, body.len());
        match head.path.as_str() {
            "/ws" => {
                c.write_all(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n")?;
                // Echo until the client closes, bytes already read first.
                c.write_all(&buf)?;
                let mut chunk = [0u8; 4096];
                loop {
                    let got = c.read(&mut chunk)?;
                    if got == 0 {
                        return Ok(());
                    }
                    c.write_all(&chunk[..got])?;
                }
            }
            "/hints" => {
                c.write_all(b"HTTP/1.1 103 Early Hints\r\nLink: </a.css>; rel=preload\r\n\r\n")?;
                respond(&mut c, &head, &text)?;
            }
            "/chunked" => {
                let mut out = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
                out.extend(http1::encode_chunked(text.as_bytes(), 7));
                c.write_all(&out)?;
            }
            _ => respond(&mut c, &head, &text)?,
        }
        if head.closes() {
            return Ok(());
        }
    }
}

fn respond(c: &mut TcpStream, head: &http1::Head, text: &str) -> std::io::Result<()> {
    let mut out = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nKeep-Alive: timeout=5\r\n\r\n",
        text.len()
    )
    .into_bytes();
    if head.method != "HEAD" {
        out.extend_from_slice(text.as_bytes());
    }
    c.write_all(&out)
}

fn proxy_for(tag: &str, backend: SocketAddr) -> Proxy {
    Proxy::start(
        tag,
        &format!(
            "[[pool]]\nname = \"web\"\nbackends = [\"{backend}\"]\nretry_on = []\n[[route]]\npath_prefix = \"/\"\npool = \"web\"\n"
        ),
    )
}

fn connect(p: &Proxy) -> TcpStream {
    let c = TcpStream::connect(p.listen).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c
}

/// Reads one response: head, then the body by its framing (`head_request`: none).
fn read_response(
    c: &mut TcpStream,
    carry: &mut Vec<u8>,
    head_request: bool,
) -> (http1::Head, Vec<u8>) {
    let (head, n) = loop {
        if let Some(done) = http1::parse_response(carry, head_request).unwrap() {
            break done;
        }
        let mut chunk = [0u8; 16 * 1024];
        let got = c.read(&mut chunk).unwrap();
        assert!(
            got > 0,
            "connection closed before a response head: {:?}",
            String::from_utf8_lossy(carry)
        );
        carry.extend_from_slice(&chunk[..got]);
    };
    carry.drain(..n);
    let mut body = Vec::new();
    let mut decoder = ChunkedDecoder::new();
    loop {
        match head.framing {
            Framing::Empty => break,
            Framing::Length(len) if carry.len() >= len => {
                body = carry.drain(..len).collect();
                break;
            }
            Framing::Chunked => {
                let used = decoder.decode(carry, &mut body).unwrap();
                carry.drain(..used);
                if decoder.is_done() {
                    break;
                }
            }
            _ => {}
        }
        let mut chunk = [0u8; 16 * 1024];
        let got = c.read(&mut chunk).unwrap();
        if got == 0 {
            assert_eq!(head.framing, Framing::UntilClose, "body cut short");
            body = std::mem::take(carry);
            break;
        }
        carry.extend_from_slice(&chunk[..got]);
    }
    (head, body)
}

fn closed(c: &mut TcpStream) -> bool {
    let mut b = [0u8; 1];
    matches!(c.read(&mut b), Ok(0) | Err(_))
}

/// Each shape is followed, on the same connection, by a request to `/smuggled` hidden in its
/// body; a proxy that frames the message differently from the backend would deliver it. The
/// lean path refuses every shape outright; pingora-proxy refuses most and neutralises the rest
/// (it drops `Content-Length` when `Transfer-Encoding` is present and closes the connection).
#[test]
fn request_smuggling_shapes_never_reach_the_backend() {
    let (backend, seen) = echo_backend();
    let p = proxy_for("h1-smuggle", backend);
    let hidden = "GET /smuggled HTTP/1.1\r\nHost: x\r\n\r\n";
    let shapes: Vec<(String, u16)> = vec![
        (format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}"), 400),
        (format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 4\r\n\r\n0\r\n\r\n{hidden}"), 400),
        (format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nContent-Length: {}\r\n\r\n{hidden}", hidden.len()), 400),
        (format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: 0, {}\r\n\r\n{hidden}", hidden.len()), 400),
        (format!("POST /a HTTP/1.1\r\nHost: x\r\nContent-Length: +0\r\n\r\n{hidden}"), 400),
        (format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n{hidden}"), 501),
        (format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n{hidden}"), 501),
        (format!("POST /a HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n{hidden}"), 400),
        (format!("POST /a HTTP/1.1\r\nHost: x\r\nX-Fold: a\r\n b\r\nContent-Length: 0\r\n\r\n{hidden}"), 400),
        (format!("POST /a HTTP/1.1\r\nHost: x\r\nX-Bad: a\rb\r\nContent-Length: 0\r\n\r\n{hidden}"), 400),
        (format!("POST /a HTTP/1.1\r\nHost: x\r\nBad Name: a\r\nContent-Length: 0\r\n\r\n{hidden}"), 400),
        (format!("POST /a HTTP/1.1\r\nHost: x\r\nHost: y\r\nContent-Length: 0\r\n\r\n{hidden}"), 400),
        (format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5;x\nyz\r\nhello\r\n0\r\n\r\n{hidden}"), 400),
        (format!("POST /a HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n{hidden}"), 400),
    ];
    for (text, status) in &shapes {
        let mut c = connect(&p);
        c.write_all(text.as_bytes()).unwrap();
        let mut all = Vec::new();
        let _ = c.read_to_end(&mut all);
        let reply = String::from_utf8_lossy(&all);
        assert!(
            !reply.contains(&backend.ip().to_string()),
            "the answer names the backend: {reply:?}"
        );
        if lean_engine() {
            assert!(
                reply.starts_with(&format!("HTTP/1.1 {status} ")),
                "{text:?} answered {reply:?}"
            );
        }
    }
    // A last, well-formed request proves the backend is reachable at all.
    let mut c = connect(&p);
    c.write_all(b"GET /last HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (h, _) = read_response(&mut c, &mut Vec::new(), false);
    assert_eq!(h.status, 200);
    let paths = seen.paths();
    assert!(
        !paths.iter().any(|p| p == "/smuggled"),
        "smuggled through: {paths:?}"
    );
    if lean_engine() {
        assert_eq!(paths, ["/last"], "a refused request reached the backend");
    }
}

/// Lean path only: pingora-proxy 0.9 reads pipelined requests only behind an opt-in sluice does
/// not turn on (docs/config.md, `http1`).
#[test]
fn pipelined_requests_are_answered_in_order_with_their_bodies() {
    if !lean_engine() {
        return;
    }
    let (backend, seen) = echo_backend();
    let p = proxy_for("h1-pipeline", backend);
    let mut c = connect(&p);
    let chunked = String::from_utf8(http1::encode_chunked(b"abcdefghij", 3)).unwrap();
    let batch = format!(
        "GET /one HTTP/1.1\r\nHost: x\r\n\r\n\
         POST /two HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello\
         POST /three HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n{chunked}\
         GET /four HTTP/1.1\r\nHost: x\r\n\r\n"
    );
    c.write_all(batch.as_bytes()).unwrap();
    let mut carry = Vec::new();
    let mut bodies = Vec::new();
    for _ in 0..4 {
        let (h, body) = read_response(&mut c, &mut carry, false);
        assert_eq!(h.status, 200);
        bodies.push(String::from_utf8(body).unwrap());
    }
    let sum = |s: &[u8]| s.iter().map(|&b| u64::from(b)).sum::<u64>();
    assert_eq!(bodies[0], "GET /one\nbody 0 0\n");
    assert_eq!(bodies[1], format!("POST /two\nbody 5 {}\n", sum(b"hello")));
    assert_eq!(
        bodies[2],
        format!("POST /three\nbody 10 {}\n", sum(b"abcdefghij"))
    );
    assert_eq!(bodies[3], "GET /four\nbody 0 0\n");
    assert_eq!(seen.paths(), ["/one", "/two", "/three", "/four"]);
}

#[test]
fn large_and_chunked_bodies_stream_both_ways_intact() {
    let (backend, _seen) = echo_backend();
    let p = proxy_for("h1-bodies", backend);
    let mut c = connect(&p);
    let mut carry = Vec::new();
    // 3 MiB: far past the replay buffer, so it streams.
    let body: Vec<u8> = (0..3 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let sum: u64 = body.iter().map(|&b| u64::from(b)).sum();
    let mut req = format!(
        "PUT /big HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(&body);
    c.write_all(&req).unwrap();
    let (h, got) = read_response(&mut c, &mut carry, false);
    assert_eq!(h.status, 200);
    assert_eq!(
        String::from_utf8(got).unwrap(),
        format!("PUT /big\nbody {} {sum}\n", body.len())
    );
    // A chunked upload in small chunks, then a chunked answer, on the same connection.
    let mut req = b"POST /up HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    req.extend(http1::encode_chunked(&body[..200_000], 1000));
    c.write_all(&req).unwrap();
    let (h, got) = read_response(&mut c, &mut carry, false);
    assert_eq!(h.status, 200);
    let sum2: u64 = body[..200_000].iter().map(|&b| u64::from(b)).sum();
    assert_eq!(
        String::from_utf8(got).unwrap(),
        format!("POST /up\nbody 200000 {sum2}\n")
    );
    c.write_all(b"GET /chunked HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (h, got) = read_response(&mut c, &mut carry, false);
    assert_eq!((h.status, h.framing), (200, Framing::Chunked));
    assert_eq!(String::from_utf8(got).unwrap(), "GET /chunked\nbody 0 0\n");
}

#[test]
fn expect_continue_waits_for_the_backend() {
    let (backend, _seen) = echo_backend();
    let p = proxy_for("h1-expect", backend);
    let mut c = connect(&p);
    c.write_all(b"PUT /e HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\nContent-Length: 4\r\n\r\n")
        .unwrap();
    let mut carry = Vec::new();
    let (h, _) = read_response(&mut c, &mut carry, false);
    assert_eq!(h.status, 100, "the client is told to send its body");
    c.write_all(b"data").unwrap();
    let (h, body) = read_response(&mut c, &mut carry, false);
    assert_eq!(h.status, 200);
    assert!(String::from_utf8(body)
        .unwrap()
        .starts_with("PUT /e\nbody 4 "));
}

#[test]
fn head_http10_and_informational_answers() {
    let (backend, _seen) = echo_backend();
    let p = proxy_for("h1-misc", backend);
    // HEAD: the head says how long the body would be, no body follows, the connection goes on.
    let mut c = connect(&p);
    let mut carry = Vec::new();
    c.write_all(b"HEAD /h HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    let (h, body) = read_response(&mut c, &mut carry, true);
    assert_eq!(h.status, 200);
    assert!(body.is_empty());
    assert!(h.header("content-length").is_some());
    c.write_all(b"GET /after HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (h, body) = read_response(&mut c, &mut carry, false);
    assert_eq!(h.status, 200);
    assert_eq!(String::from_utf8(body).unwrap(), "GET /after\nbody 0 0\n");

    // HTTP/1.0 without keep-alive: answered, then closed.
    let mut c = connect(&p);
    c.write_all(b"GET /old HTTP/1.0\r\n\r\n").unwrap();
    let mut all = Vec::new();
    c.read_to_end(&mut all).unwrap();
    let text = String::from_utf8(all).unwrap();
    assert!(
        text.starts_with("HTTP/1.1 200") || text.starts_with("HTTP/1.0 200"),
        "{text}"
    );
    assert!(text.ends_with("GET /old\nbody 0 0\n"), "{text}");

    // A 103 reaches the client before the final answer.
    let mut c = connect(&p);
    let mut carry = Vec::new();
    c.write_all(b"GET /hints HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let (h, _) = read_response(&mut c, &mut carry, false);
    assert_eq!(h.status, 103);
    assert_eq!(h.header("link"), Some("</a.css>; rel=preload"));
    let (h, _) = read_response(&mut c, &mut carry, false);
    assert_eq!(h.status, 200);
}

/// Lean path only: pingora-proxy refuses this upgrade (it does not treat the request it sends
/// upstream as an upgrade and answers the backend's 101 with 502).
#[test]
fn upgrades_become_a_two_way_tunnel() {
    if !lean_engine() {
        return;
    }
    let (backend, _seen) = echo_backend();
    let p = proxy_for("h1-upgrade", backend);
    let mut c = connect(&p);
    c.write_all(b"GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n\r\n")
        .unwrap();
    let mut carry = Vec::new();
    let (h, _) = read_response(&mut c, &mut carry, false);
    assert_eq!(h.status, 101);
    assert_eq!(h.header("upgrade"), Some("echo"));
    for msg in [&b"ping"[..], b"a longer message over the tunnel"] {
        c.write_all(msg).unwrap();
        let mut got = std::mem::take(&mut carry);
        while got.len() < msg.len() {
            let mut chunk = [0u8; 256];
            let n = c.read(&mut chunk).unwrap();
            assert!(n > 0, "tunnel closed");
            got.extend_from_slice(&chunk[..n]);
        }
        assert_eq!(got, msg);
    }
}

/// The backend sees neither the client's hop-by-hop headers nor one connection per client
/// connection: sluice keeps its own upstream connections alive and reuses them.
#[test]
fn hop_by_hop_headers_stay_and_upstream_connections_are_reused() {
    let (backend, seen) = echo_backend();
    let p = proxy_for("h1-hop", backend);
    for i in 0..20 {
        let mut c = connect(&p);
        let req = format!(
            "GET /r{i} HTTP/1.1\r\nHost: x\r\nConnection: close, X-Hop\r\nProxy-Connection: keep-alive\r\nKeep-Alive: timeout=9\r\nX-Hop: secret\r\nX-Kept: yes\r\n\r\n"
        );
        c.write_all(req.as_bytes()).unwrap();
        let (h, _) = read_response(&mut c, &mut Vec::new(), false);
        assert_eq!(h.status, 200);
        assert!(
            h.header("keep-alive").is_none(),
            "the backend's Keep-Alive reached the client"
        );
        assert!(closed(&mut c), "Connection: close was not honoured");
    }
    let reqs = seen.requests.lock();
    assert_eq!(reqs.len(), 20);
    for r in reqs.iter() {
        assert_eq!(r.header("x-kept"), Some("yes"));
        if lean_engine() {
            for h in ["connection", "proxy-connection", "keep-alive", "x-hop"] {
                assert!(r.header(h).is_none(), "{h} was forwarded: {:?}", r.headers);
            }
        }
    }
    drop(reqs);
    let conns = seen.connections.load(Ordering::SeqCst);
    // The lean path keeps one idle connection per worker thread (2 here); pingora's shared pool
    // reuses too, less tightly.
    let most = if lean_engine() { 2 } else { 10 };
    assert!(
        conns <= most,
        "{conns} upstream connections for 20 sequential requests"
    );
}

fn header_of(h: &http1::Head, name: &str) -> String {
    h.header(name).unwrap_or("").to_string()
}

/// Forwarding headers are on by default, and an untrusted client's own are replaced: it cannot
/// claim another address. `Via` records the hop; a request id is added when absent and kept
/// when present.
#[test]
fn forwarding_headers_are_set_and_a_client_cannot_spoof_them() {
    let (backend, seen) = echo_backend();
    let p = proxy_for("h1-forwarding", backend);
    let mut c = connect(&p);
    let mut carry = Vec::new();
    c.write_all(
        b"GET /f HTTP/1.1\r\nHost: shop.example\r\nX-Forwarded-For: 6.6.6.6\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\nVia: 1.0 fred\r\n\r\n",
    )
    .unwrap();
    assert_eq!(read_response(&mut c, &mut carry, false).0.status, 200);
    c.write_all(b"GET /g HTTP/1.1\r\nHost: shop.example\r\nX-Request-Id: mine-123\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut c, &mut carry, false).0.status, 200);
    let reqs = seen.requests.lock();
    let first = &reqs[0];
    let xff = header_of(first, "x-forwarded-for");
    let ip: std::net::IpAddr = xff
        .parse()
        .unwrap_or_else(|_| panic!("X-Forwarded-For {xff:?}"));
    assert!(ip.is_loopback(), "{xff}");
    assert_eq!(header_of(first, "x-forwarded-proto"), "http");
    assert_eq!(header_of(first, "x-forwarded-host"), "shop.example");
    assert_eq!(header_of(first, "via"), "1.0 fred, 1.1 sluice");
    let id = header_of(first, "x-request-id");
    assert!(
        id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit()),
        "{id:?}"
    );
    assert_eq!(
        first
            .headers
            .iter()
            .filter(|(n, _)| n == "x-forwarded-for")
            .count(),
        1,
        "the client's own X-Forwarded-For went through"
    );
    assert_eq!(header_of(&reqs[1], "x-request-id"), "mine-123");
}

/// Behind a trusted proxy the incoming chain is kept and extended.
#[test]
fn a_trusted_proxy_chain_is_extended() {
    let (backend, seen) = echo_backend();
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [\"{backend}\"]\n[[route]]\npath_prefix = \"/\"\npool = \"web\"\n"
    );
    let p = Proxy::start_full(
        scratch_dir("h1-trusted"),
        "forwarding = { trusted_proxies = [\"127.0.0.0/8\", \"::1\"], forwarded = true }",
        &body,
    );
    let mut c = connect(&p);
    c.write_all(b"GET / HTTP/1.1\r\nHost: a\r\nX-Forwarded-For: 198.51.100.9\r\nX-Forwarded-Proto: https\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut c, &mut Vec::new(), false).0.status, 200);
    let reqs = seen.requests.lock();
    let xff = header_of(&reqs[0], "x-forwarded-for");
    assert!(xff.starts_with("198.51.100.9, 127."), "{xff}");
    assert_eq!(
        header_of(&reqs[0], "x-forwarded-proto"),
        "https",
        "kept from a trusted proxy"
    );
    assert!(header_of(&reqs[0], "forwarded").starts_with("for=127."));
}

/// One JSON line per request, written off the request path, with the fields docs/config.md lists.
#[test]
fn access_log_lines_are_json_with_the_request_and_its_upstream() {
    let (backend, _seen) = echo_backend();
    let dir = scratch_dir("h1-access-log");
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [\"{backend}\"]\n[[route]]\npath_prefix = \"/\"\npool = \"web\"\n"
    );
    let p = Proxy::start_full(
        dir.clone(),
        "access_log = { format = \"json\", path = \"access.log\" }",
        &body,
    );
    let mut c = connect(&p);
    let mut carry = Vec::new();
    c.write_all(b"GET /logged?x=1 HTTP/1.1\r\nHost: shop.example\r\nX-Request-Id: given-1\r\n\r\n")
        .unwrap();
    assert_eq!(read_response(&mut c, &mut carry, false).0.status, 200);
    c.write_all(b"POST /second HTTP/1.1\r\nHost: shop.example\r\nContent-Length: 3\r\n\r\nabc")
        .unwrap();
    assert_eq!(read_response(&mut c, &mut carry, false).0.status, 200);
    let path = dir.join("access.log");
    let mut lines = Vec::new();
    assert!(
        wait_for(Duration::from_secs(10), || {
            lines = std::fs::read_to_string(&path)
                .unwrap_or_default()
                .lines()
                .map(String::from)
                .collect();
            lines.len() >= 2
        }),
        "access log lines did not appear: {lines:?}"
    );
    let v: Vec<serde_json::Value> = lines
        .iter()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let first = v
        .iter()
        .find(|l| l["path"] == "/logged?x=1")
        .expect("first line");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["host"], "shop.example");
    assert_eq!(first["status"], 200);
    assert_eq!(first["pool"], "web");
    assert_eq!(first["backend"], backend.to_string());
    assert_eq!(first["request_id"], "given-1");
    assert!(first["client_ip"].as_str().unwrap().starts_with("127."));
    assert!(first["duration_ms"].as_f64().unwrap() >= 0.0);
    assert!(first["bytes_out"].as_u64().unwrap() > 0);
    let second = v
        .iter()
        .find(|l| l["path"] == "/second")
        .expect("second line");
    assert_eq!(second["method"], "POST");
    assert_eq!(second["attempts"], 1);
    assert_eq!(
        second["request_id"].as_str().unwrap().len(),
        32,
        "a generated id"
    );
    // sluice's own log goes to a file here, not a terminal: no colour codes in it.
    let own = p.log();
    assert!(own.contains("INFO"), "{own}");
    assert!(!own.contains('\x1b'), "ANSI escapes in a log file");
}

/// A backend that accepts and never answers is a gateway timeout (504), with nothing about the
/// backend's address in the body.
#[test]
fn a_silent_backend_is_a_gateway_timeout() {
    let silent = TcpListener::bind(unique_addr()).unwrap();
    let addr = silent.local_addr().unwrap();
    // The backend holds what it accepts, unanswered, until the test is done with it.
    let (done, wait) = std::sync::mpsc::channel::<()>();
    let held = std::thread::spawn(move || {
        let conn = silent.incoming().next();
        let _ = wait.recv();
        drop(conn);
    });
    let p = Proxy::start(
        "h1-timeout",
        &format!(
            "[[pool]]\nname = \"web\"\nbackends = [\"{addr}\"]\nread_timeout = \"300ms\"\nretry_on = []\n[[route]]\npath_prefix = \"/\"\npool = \"web\"\n"
        ),
    );
    let r = p.get("/slow");
    assert_eq!(r.status, 504, "{}", r.text());
    assert!(!r.text().contains(&addr.to_string()), "{}", r.text());
    drop(done);
    held.join().unwrap();
}
