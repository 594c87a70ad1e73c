//! What ships for production: the sample configs pass `sluice check`, and `sluice run` tells a
//! systemd `Type=notify` unit when it is ready and when it is stopping.

mod common;

use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::*;

/// The repository's `packaging/` directory.
fn packaging(file: &str) -> String {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../packaging")
        .join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// `text` with its machine-level paths and ports moved into `dir` and onto free loopback ports,
/// so the check runs anywhere; everything else (TLS files, token file, pools, health checks,
/// routes, limits, logs) is checked as shipped.
fn localised(text: &str, replacements: &[(&str, String)]) -> String {
    let mut out = text.to_string();
    for (from, to) in replacements {
        assert!(out.contains(from), "the sample no longer has {from}");
        out = out.replace(from, to);
    }
    out
}

fn check(dir: &Path, text: &str) -> CliOutput {
    let path = dir.join("sluice.toml");
    std::fs::write(&path, text).unwrap();
    sluice_cli(&["check", "--config", path.to_str().unwrap()])
}

#[test]
fn the_production_sample_config_passes_check() {
    let dir = scratch_dir("packaging-sample");
    std::fs::create_dir_all(dir.join("tls")).unwrap();
    std::fs::create_dir_all(dir.join("log")).unwrap();
    self_signed(&dir, "tls/site.pem", "tls/site.key");
    let text = localised(
        &packaging("sluice.toml"),
        &[
            ("0.0.0.0:80\"", format!("{}\"", unique_addr())),
            ("0.0.0.0:443\"", format!("{}\"", unique_addr())),
            ("127.0.0.1:9900\"", format!("{}\"", unique_addr())),
            (
                "/var/log/sluice/access.log",
                dir.join("log/access.log").display().to_string(),
            ),
            (
                "/run/sluice/upgrade.sock",
                dir.join("upgrade.sock").display().to_string(),
            ),
        ],
    );
    // Without its token file the sample is refused, with the fix in the message.
    let out = check(&dir, &text);
    assert!(!out.ok, "{}", out.stdout);
    assert!(
        out.stderr.contains("token_file") && out.stderr.contains("openssl rand -hex 32"),
        "{}",
        out.stderr
    );
    std::fs::write(
        dir.join("admin.token"),
        "0123456789abcdef0123456789abcdef\n",
    )
    .unwrap();
    let out = check(&dir, &text);
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
    // A key that does not belong to the certificate is caught too: the TLS files are checked.
    self_signed(&dir, "other.pem", "tls/site.key");
    let out = check(&dir, &text);
    assert!(!out.ok, "a mismatched key passed check");
}

#[test]
fn the_container_config_passes_check() {
    let dir = scratch_dir("packaging-container");
    std::fs::write(dir.join("token"), "a-long-random-container-token\n").unwrap();
    let text = localised(
        &packaging("container.toml"),
        &[
            ("0.0.0.0:8080\"", format!("{}\"", unique_addr())),
            // Still on every interface: the token is what makes that acceptable.
            ("0.0.0.0:9900\"", format!("0.0.0.0:{}\"", unique_port())),
            (
                "/run/secrets/sluice_admin_token",
                dir.join("token").display().to_string(),
            ),
            (
                "/run/sluice/upgrade.sock",
                dir.join("upgrade.sock").display().to_string(),
            ),
        ],
    );
    let out = check(&dir, &text);
    assert!(out.ok, "{}{}", out.stdout, out.stderr);
}

/// Under systemd (`Type=notify`), `READY=1` arrives once every listener accepts connections, and
/// `STOPPING=1` when SIGTERM starts the graceful stop.
#[test]
fn run_notifies_systemd_when_ready_and_when_stopping() {
    let dir = scratch_dir("packaging-notify");
    let socket = dir.join("notify.sock");
    let manager = UnixDatagram::bind(&socket).unwrap();
    manager
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let b = backends(1);
    let (listen, admin) = (unique_addr(), unique_addr());
    // `admin` only needs to be free: the test talks to the proxy listener.
    let config = format!(
        "[server]\nlisten = [\"{listen}\"]\nshutdown_grace = \"5s\"\nupgrade_sock = \"{}\"\n[admin]\nlisten = \"{admin}\"\n\
         [[pool]]\nname = \"web\"\nbackends = [{}]\n[[route]]\npool = \"web\"\n",
        dir.join("upgrade.sock").display(),
        backend_list(&b)
    );
    std::fs::write(dir.join("sluice.toml"), config).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["run", "--config"])
        .arg(dir.join("sluice.toml"))
        .env("NOTIFY_SOCKET", &socket)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buf = [0u8; 256];
    let n = manager.recv(&mut buf).expect("no READY=1 within 60 s");
    assert_eq!(&buf[..n], b"READY=1");
    // Ready means serving: the listener answers right away.
    let resp = sluice::client::request(listen, "GET", "/", &[], b"");
    assert_eq!(resp.map(|r| r.status).ok(), Some(200));
    send_signal(child.id(), "-TERM");
    let n = manager.recv(&mut buf).expect("no STOPPING=1 within 60 s");
    assert_eq!(&buf[..n], b"STOPPING=1");
    let exited = wait_for(Duration::from_secs(30), || {
        child.try_wait().ok().flatten().is_some()
    });
    assert!(exited, "sluice did not exit after SIGTERM");
}
