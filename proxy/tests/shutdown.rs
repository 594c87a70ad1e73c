//! Restarts that drop nothing: SIGTERM lets the requests in flight finish within
//! `shutdown_grace` and then exits at once, and `sluice run --upgrade` + SIGQUIT hands the
//! listeners to a new process under load with no failed request.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;

fn pool(b: &[(std::net::SocketAddr, Arc<sluice::demo::DemoBackend>)]) -> String {
    format!(
        "[[pool]]\nname = \"web\"\nbackends = [{}]\n[[route]]\npool = \"web\"\n",
        backend_list(b)
    )
}

#[test]
fn sigterm_lets_requests_in_flight_finish_then_exits_without_waiting_out_the_grace() {
    let b = backends(1);
    let mut proxy = Proxy::start_full(
        scratch_dir("shutdown"),
        "shutdown_grace = \"60s\"",
        &pool(&b),
    );
    // An idle kept-alive connection, which the shutdown closes.
    let mut idle = TcpStream::connect(proxy.listen).unwrap();
    idle.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 512];
    assert!(idle.read(&mut buf).unwrap() > 0);

    // Eight slow requests in flight when SIGTERM arrives.
    b[0].1.delay_ms.store(1500, Ordering::Relaxed);
    let listen = proxy.listen;
    let slow: Vec<_> = (0..8)
        .map(|_| std::thread::spawn(move || request(listen, "GET", "/", &[], b"")))
        .collect();
    assert!(
        wait_for(Duration::from_secs(10), || proxy
            .metric("sluice_backend_inflight{")
            >= 8.0),
        "the slow requests did not all reach the backend"
    );
    let signalled = Instant::now();
    proxy.signal("-TERM");

    // Every request that had started completes normally.
    for t in slow {
        let r = t.join().unwrap().expect("a request in flight failed");
        assert_eq!(r.status, 200);
    }
    // The idle connection was closed, not left for the grace to end.
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    assert!(
        matches!(idle.read(&mut buf), Ok(0) | Err(_)),
        "an idle keep-alive connection stayed open"
    );
    // The process exits on its own once nothing is open: far sooner than the 60 s grace.
    let status = proxy
        .wait_exit(Duration::from_secs(20))
        .expect("sluice did not exit after its last request finished");
    assert!(status.success(), "exit status {status}");
    assert!(signalled.elapsed() < Duration::from_secs(20));
    let log = proxy.log();
    assert!(log.contains("shutting down"), "{log}");
    assert!(log.contains("every client connection is closed"), "{log}");
    // Nothing listens any more.
    assert!(TcpStream::connect(listen).is_err());
}

#[test]
fn an_upgrade_to_a_second_process_under_load_fails_no_request() {
    let b = backends(2);
    let dir = scratch_dir("upgrade");
    let sock = dir.join("upgrade.sock");
    let mut old = Proxy::start_full(
        dir,
        &format!(
            "shutdown_grace = \"30s\"\nupgrade_sock = \"{}\"",
            sock.display()
        ),
        &pool(&b),
    );
    for (_, be) in &b {
        be.delay_ms.store(100, Ordering::Relaxed);
    }
    // A bounded load loop on fresh connections, across the hand-over and after it.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let listen = old.listen;
    let workers: Vec<_> = (0..6)
        .map(|_| {
            let (stop, ok, failed) = (stop.clone(), ok.clone(), failed.clone());
            std::thread::spawn(move || {
                let started = Instant::now();
                let mut errors = Vec::new();
                for _ in 0..2_000 {
                    if stop.load(Ordering::Relaxed) || started.elapsed() > Duration::from_secs(60) {
                        break;
                    }
                    match request(listen, "GET", "/", &[], b"") {
                        Ok(r) if r.status == 200 => {
                            ok.fetch_add(1, Ordering::Relaxed);
                        }
                        other => {
                            failed.fetch_add(1, Ordering::Relaxed);
                            errors.push(format!("{:?}", other.map(|r| r.status)));
                        }
                    }
                }
                errors
            })
        })
        .collect();
    assert!(wait_for(Duration::from_secs(10), || ok
        .load(Ordering::Relaxed)
        >= 20));

    let mut new = old.start_upgrade();
    // The new process is waiting for the listeners once its socket exists.
    assert!(
        wait_for(Duration::from_secs(20), || sock.exists()),
        "the new process did not open {}: {}",
        sock.display(),
        old.log()
    );
    // Requests are in flight on the old process when it hands over.
    assert!(wait_for(Duration::from_secs(10), || old
        .metric("sluice_backend_inflight{")
        >= 1.0));
    old.signal("-QUIT");
    let status = old
        .wait_exit(Duration::from_secs(40))
        .expect("the old process did not exit after the hand-over");
    assert!(status.success(), "old process exit status {status}");
    // The new process serves on the same addresses, admin API included.
    let after_handover = ok.load(Ordering::Relaxed);
    assert!(
        wait_for(Duration::from_secs(10), || ok.load(Ordering::Relaxed)
            >= after_handover + 20),
        "no request was served after the old process exited"
    );
    assert_eq!(
        request(new.admin, "GET", "/readyz", &[], b"")
            .unwrap()
            .status,
        200
    );
    assert!(new.wait_exit(Duration::from_millis(10)).is_none());
    stop.store(true, Ordering::Relaxed);
    let errors: Vec<String> = workers
        .into_iter()
        .flat_map(|w| w.join().unwrap())
        .collect();
    assert_eq!(
        failed.load(Ordering::Relaxed),
        0,
        "failed requests across the upgrade: {errors:?}; log: {}",
        new.log()
    );
}
