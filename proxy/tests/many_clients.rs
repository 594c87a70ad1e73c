//! Thousands of slow clients at once: 5,000 connections that dribble their request head are all
//! cut off by the header timeout, normal clients and the admin API are served meanwhile, and the
//! memory those connections took is given back afterwards.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::*;

const DRIBBLERS: usize = 5_000;

#[test]
fn five_thousand_dribbling_clients_are_cut_off_and_their_memory_returned() {
    let b = backends(1);
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [{}]\n[[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    // The default limits, with a shorter header timeout so the test does not wait a minute.
    let p = Proxy::start_full(
        scratch_dir("many-clients"),
        "limits = { header_timeout = \"3s\" }",
        &body,
    );
    for _ in 0..50 {
        assert_eq!(p.get("/").status, 200);
    }
    let rss_before = proc_status_kib(p.pid(), "VmRSS:");

    // Open every connection and send the first bytes of a head, then one byte per round.
    let head = b"GET / HTTP/1.1\r\nHost: slow\r\nX-Pad: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\r\n\r\n";
    let mut conns: Vec<TcpStream> = (0..DRIBBLERS)
        .map(|_| {
            let mut c = TcpStream::connect(p.listen).expect("connect");
            c.write_all(&head[..4]).unwrap();
            c.set_nonblocking(true).unwrap();
            c
        })
        .collect();
    assert!(
        wait_for(Duration::from_secs(20), || p
            .metric("sluice_downstream_connections")
            >= DRIBBLERS as f64),
        "the proxy did not hold all {DRIBBLERS} connections at once: {}",
        p.metric("sluice_downstream_connections")
    );
    let rss_peak = proc_status_kib(p.pid(), "VmRSS:");

    // Keep dribbling (one byte per connection per round) while normal clients and the admin API
    // are served, until the proxy has closed every dribbler. Bounded: the head is 90 bytes and a
    // round takes well under a second, so no connection could finish its head before ~90 s.
    let started = Instant::now();
    let mut open: Vec<(TcpStream, usize)> = conns.drain(..).map(|c| (c, 4)).collect();
    let mut served = 0;
    while !open.is_empty() && started.elapsed() < Duration::from_secs(60) {
        open.retain_mut(|(c, sent)| {
            let mut probe = [0u8; 512];
            match c.read(&mut probe) {
                Ok(0) => return false,
                Ok(_) => return false, // an error response (408) counts as cut off too
                Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                Err(_) => return false,
            }
            // The last byte is never sent: no head can complete, only the timeout ends these.
            if *sent < head.len() - 1 {
                match c.write(&head[*sent..*sent + 1]) {
                    Ok(n) => *sent += n,
                    Err(e) if e.kind() == ErrorKind::WouldBlock => {}
                    Err(_) => return false,
                }
            }
            true
        });
        assert_eq!(p.get("/").status, 200, "a normal client was not served");
        assert_eq!(p.admin_req("GET", "/healthz", b"").status, 200);
        served += 1;
        std::thread::sleep(Duration::from_millis(250));
    }
    assert!(
        open.is_empty(),
        "{} dribbling connections were still open after 60 s",
        open.len()
    );
    assert!(served > 0);
    assert!(
        p.metric("sluice_limit_rejections_total{reason=\"header_timeout\"}") >= DRIBBLERS as f64
    );
    assert!(
        wait_for(Duration::from_secs(10), || p
            .metric("sluice_downstream_connections")
            == 0.0),
        "connections still counted open"
    );

    // The memory is given back: RSS returns close to where it was before the flood.
    let grown = rss_peak.saturating_sub(rss_before);
    let mut rss_after = 0;
    let returned = wait_for(Duration::from_secs(15), || {
        rss_after = proc_status_kib(p.pid(), "VmRSS:");
        rss_after.saturating_sub(rss_before) <= (grown / 4).max(8 * 1024)
    });
    assert!(
        returned,
        "RSS {rss_before} KiB before, {rss_peak} KiB with {DRIBBLERS} connections, {rss_after} KiB after they closed"
    );
    eprintln!("RSS {rss_before} KiB before, {rss_peak} KiB with {DRIBBLERS} connections, {rss_after} KiB after");
    assert_eq!(p.get("/").status, 200);
}
