//! Nothing starts half-alive: `check` refuses what `run` could not serve, with the reason and the
//! allowed range; `run` refuses the same before "sluice is running"; readiness is reported
//! apart from liveness.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::*;

const POOL: &str =
    "[[pool]]\nname = \"web\"\nbackends = [\"127.0.0.1:9001\"]\n[[route]]\npool = \"web\"\n";

fn check(dir: &Path, text: &str) -> CliOutput {
    let path = dir.join("s.toml");
    std::fs::write(&path, text).unwrap();
    sluice_cli(&["check", "--config", path.to_str().unwrap()])
}

#[test]
fn check_refuses_configs_that_could_not_serve() {
    let dir = scratch_dir("check-bounds");
    let listen = unique_addr();
    let server = format!("[server]\nlisten = [\"{listen}\"]\n");
    let cases: Vec<(&str, String, &str)> = vec![
        ("empty file", String::new(), "the file is empty"),
        (
            "no listener",
            format!("[server]\nlisten = []\n{POOL}"),
            "[server] listen is empty",
        ),
        (
            "threads out of range",
            format!("[server]\nlisten = [\"{listen}\"]\nthreads = 99999999999\n{POOL}"),
            "[server] threads is 99999999999; allowed: 1 to 1024",
        ),
        (
            "admin on a proxy address",
            format!("{server}[admin]\nlisten = \"{listen}\"\n{POOL}"),
            "is both a proxy and the admin listen address",
        ),
        (
            "zero timeout",
            format!("{server}[[pool]]\nname = \"web\"\nconnect_timeout = \"0s\"\nbackends = [\"127.0.0.1:9001\"]\n[[route]]\npool = \"web\"\n"),
            "pool \"web\": connect_timeout is 0s; allowed: 1ms to 1day",
        ),
        (
            "duplicate backends",
            format!("{server}[[pool]]\nname = \"web\"\nbackends = [\"127.0.0.1:9001\", \"127.0.0.1:9001\"]\n[[route]]\npool = \"web\"\n"),
            "backend 127.0.0.1:9001 is listed twice",
        ),
        (
            "no route",
            format!("{server}[[pool]]\nname = \"web\"\nbackends = [\"127.0.0.1:9001\"]\n"),
            "no [[pool]] or no [[route]]",
        ),
        (
            "health rise out of range",
            format!("{server}[[pool]]\nname = \"web\"\nbackends = [\"127.0.0.1:9001\"]\nhealth = {{ plugin = \"builtin:tcp\", rise = 0 }}\n[[route]]\npool = \"web\"\n"),
            "health rise is 0; allowed: 1 to 1000",
        ),
    ];
    for (name, text, expect) in cases {
        let out = check(&dir, &text);
        assert!(!out.ok, "{name}: accepted");
        assert!(
            out.stderr.contains(expect),
            "{name}: expected {expect:?} in {}",
            out.stderr
        );
    }
    let out = check(&dir, &format!("{server}{POOL}"));
    assert!(out.ok, "a sound config is accepted: {}", out.stderr);
}

#[test]
fn bad_tls_files_stop_check_and_run_before_anything_listens() {
    let dir = scratch_dir("tls-check");
    self_signed(&dir, "a.pem", "a.key");
    self_signed(&dir, "b.pem", "b.key");
    let server = |cert: &str, key: &str| {
        format!(
            "[server]\nlisten = [\"{}\"]\n[server.tls]\nlisten = [\"{}\"]\ncert = \"{cert}\"\nkey = \"{key}\"\n[admin]\nlisten = \"{}\"\n{POOL}",
            unique_addr(),
            unique_addr(),
            unique_addr()
        )
    };
    let cases = [
        (
            "missing certificate",
            server("nope.pem", "a.key"),
            "nope.pem",
        ),
        (
            "key of another certificate",
            server("a.pem", "b.key"),
            "does not fit the certificate",
        ),
        ("not PEM", server("s.toml", "a.key"), "no PEM certificate"),
    ];
    for (name, text, expect) in cases {
        let out = check(&dir, &text);
        assert!(!out.ok, "{name}: check accepted it");
        assert!(out.stderr.contains(expect), "{name}: {}", out.stderr);

        // `run` refuses it too, at once, without claiming to run.
        let path = dir.join("s.toml");
        let started = Instant::now();
        let run = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["run", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(!run.status.success(), "{name}: run exited 0");
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "{name}: run took too long to give up"
        );
        let all = format!(
            "{}{}",
            String::from_utf8_lossy(&run.stdout),
            String::from_utf8_lossy(&run.stderr)
        );
        assert!(!all.contains("sluice is running"), "{name}: {all}");
        assert!(all.contains(expect), "{name}: {all}");
    }
    let out = check(&dir, &server("a.pem", "a.key"));
    assert!(out.ok, "a matching pair is accepted: {}", out.stderr);
}

#[test]
fn readiness_is_reported_apart_from_liveness() {
    let b = backends(1);
    let proxy = Proxy::start(
        "ready",
        &format!(
            "[[pool]]\nname = \"web\"\nbackends = [{}]\n[[route]]\npool = \"web\"\n",
            backend_list(&b)
        ),
    );
    // Proxy::start waited for /readyz; both answer now.
    assert_eq!(proxy.admin_req("GET", "/healthz", b"").status, 200);
    let ready = proxy.admin_req("GET", "/readyz", b"");
    assert_eq!((ready.status, ready.text().trim()), (200, "ready"));
    assert!(proxy.log().contains("all listeners are up"));
}

/// The plugin engine reserves address space for its instance slots from the threads and pools
/// configured (it once reserved about 4 TiB, which broke under `RLIMIT_AS`): four pools with
/// strategies and a health check start and serve under an 8 GiB limit, and stay small at rest.
#[test]
fn four_pools_start_under_an_address_space_limit_and_stay_small_at_rest() {
    let b = backends(4);
    let mut body = String::new();
    for (i, strategy) in ["round-robin", "least-connections", "ring-hash", "p2c"]
        .iter()
        .enumerate()
    {
        body.push_str(&format!(
            "[[pool]]\nname = \"p{i}\"\nstrategy = \"builtin:{strategy}\"\nbackends = [\"{}\"]\n",
            b[i].0
        ));
        if i == 2 {
            body.push_str("health = { plugin = \"builtin:http\", interval = \"1s\" }\n");
        }
        body.push_str(&format!(
            "[[route]]\npath_prefix = \"/p{i}\"\npool = \"p{i}\"\n"
        ));
    }
    let limit_kib = 8 * 1024 * 1024;
    let p = Proxy::start_limited(scratch_dir("rlimit-as"), "", &body, Some(limit_kib));
    for i in 0..4 {
        assert_eq!(p.get(&format!("/p{i}/x")).status, 200, "pool p{i}");
    }
    let pid = p.pid();
    let (size, rss) = (
        proc_status_kib(pid, "VmSize:"),
        proc_status_kib(pid, "VmRSS:"),
    );
    println!("4 pools at rest: VmSize {size} KiB, VmRSS {rss} KiB");
    assert!(size < limit_kib, "VmSize {size} KiB");
    assert!(rss <= 40 * 1024, "idle RSS {rss} KiB is over 40 MiB");
}
