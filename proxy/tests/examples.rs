//! The shipped examples work: the quickstart config validates, and the custom strategy crate
//! builds to wasm and is hot-loaded into a running proxy with `sluice plugin load`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf()
}

#[test]
fn quickstart_config_checks() {
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["check", "--config"])
        .arg(repo_root().join("examples/quickstart.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

/// Builds examples/custom-strategy for wasm32 exactly as its README says.
fn build_canary() -> Vec<u8> {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("examples-wasm");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args(["build", "--release", "--target", "wasm32-unknown-unknown", "--manifest-path"])
        .arg(repo_root().join("examples/custom-strategy/Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .status()
        .unwrap();
    assert!(status.success(), "building the example strategy failed");
    std::fs::read(target_dir.join("wasm32-unknown-unknown/release/canary_strategy.wasm")).unwrap()
}

#[test]
fn custom_strategy_example_is_built_and_hot_loaded() {
    let wasm = build_canary();
    let b = backends(3);
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [\"{}\", \"{}\", {{ addr = \"{}\", tags = [\"canary\"] }}]\n[[route]]\npool = \"web\"\n",
        b[0].0, b[1].0, b[2].0
    );
    let proxy = Proxy::start("canary", &body);
    let file = proxy.dir.join("canary_strategy.wasm");
    std::fs::write(&file, &wasm).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["plugin", "load", "--pool", "web", "--admin", &proxy.admin.to_string()])
        .arg(&file)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("sha256"));

    // Requests with the canary header go to the canary backend only; the rest avoid it.
    for _ in 0..20 {
        let r = request(proxy.listen, "GET", "/", &[("x-canary", "1")], b"").unwrap();
        assert_eq!(r.text().trim(), "b3");
    }
    let plain = tally((0..20).map(|_| proxy.get("/").text()));
    assert_eq!(plain.get("b1"), Some(&10), "{plain:?}");
    assert_eq!(plain.get("b2"), Some(&10), "{plain:?}");

    // A refused load reports the reason and exits non-zero.
    std::fs::write(&file, b"junk").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["plugin", "load", "--pool", "web", "--admin", &proxy.admin.to_string()])
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a valid WebAssembly module"));
}
