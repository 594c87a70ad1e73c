//! The shipped examples work: the quickstart config validates, and the custom strategy crate
//! builds to wasm and is hot-loaded into a running proxy with `sluice plugin load`.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn quickstart_config_checks() {
    let quickstart = repo_root().join("examples/quickstart.toml");
    let out = sluice_cli(&["check", "--config", quickstart.to_str().unwrap()]);
    assert!(out.ok, "{}", out.stderr);
}

/// Builds an example crate for wasm32 exactly as its README says and returns the module.
fn build_example(dir: &str, wasm_name: &str) -> Vec<u8> {
    let target_dir = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target"))
        .join("examples-wasm");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "--target",
            "wasm32-unknown-unknown",
            "--manifest-path",
        ])
        .arg(repo_root().join(dir).join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target_dir)
        .env_remove("CARGO_ENCODED_RUSTFLAGS")
        .env_remove("RUSTFLAGS")
        .status()
        .unwrap();
    assert!(status.success(), "building the example strategy failed");
    std::fs::read(
        target_dir
            .join("wasm32-unknown-unknown/release")
            .join(wasm_name),
    )
    .unwrap()
}

#[test]
fn custom_strategy_example_is_built_and_hot_loaded() {
    let wasm = build_example("examples/custom-strategy", "canary_strategy.wasm");
    let b = backends(3);
    let body = format!(
        "[[pool]]\nname = \"web\"\nbackends = [\"{}\", \"{}\", {{ addr = \"{}\", tags = [\"canary\"] }}]\n[[route]]\npool = \"web\"\n",
        b[0].0, b[1].0, b[2].0
    );
    let proxy = Proxy::start("canary", &body);
    let file = proxy.dir.join("canary_strategy.wasm");
    std::fs::write(&file, &wasm).unwrap();
    let out = sluice_cli(&[
        "plugin",
        "load",
        "--pool",
        "web",
        "--admin",
        &proxy.admin.to_string(),
        file.to_str().unwrap(),
    ]);
    assert!(out.ok, "{}", out.stderr);
    assert!(out.stdout.contains("sha256"));

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
    let out = sluice_cli(&[
        "plugin",
        "load",
        "--pool",
        "web",
        "--admin",
        &proxy.admin.to_string(),
        file.to_str().unwrap(),
    ]);
    assert!(!out.ok);
    assert!(out.stderr.contains("not a valid WebAssembly module"));
}

/// The custom health check reads each backend's JSON status document and degrades the weight of
/// a loaded backend, which shifts a weighted strategy's distribution away from it.
#[test]
fn custom_health_example_degrades_a_loaded_backend() {
    let wasm = build_example("examples/custom-health", "load_aware_health.wasm");
    let b = backends(2);
    let dir = scratch_dir("custom-health");
    std::fs::write(dir.join("load_aware_health.wasm"), &wasm).unwrap();
    let body = format!(
        "[[pool]]\nname = \"web\"\nstrategy = \"builtin:weighted-round-robin\"\nbackends = [{}]\n\
         health = {{ plugin = \"load_aware_health.wasm\", interval = \"100ms\", jitter = \"10ms\", rise = 1, fall = 1, config = {{ path = \"/status\" }} }}\n\
         [[route]]\npool = \"web\"\n",
        backend_list(&b)
    );
    let proxy = Proxy::start_in(dir, &body);
    let healthy = |proxy: &Proxy| {
        let v: serde_json::Value =
            serde_json::from_str(&proxy.admin_req("GET", "/api/pools", b"").text()).unwrap();
        v["pools"][0]["backends"]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b["health"]["weight_percent"].as_u64().unwrap_or(0))
            .collect::<Vec<_>>()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while proxy
        .admin_req("GET", "/api/pools", b"")
        .text()
        .matches("\"state\": \"healthy\"")
        .count()
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "backends never became healthy"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let even = tally((0..40).map(|_| proxy.get("/").text()));
    assert_eq!(even.get("b1"), Some(&20), "{even:?}");

    // b1 reports load 0.85: degraded to 50 % of its weight.
    b[0].1
        .load_permille
        .store(850, std::sync::atomic::Ordering::Relaxed);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while healthy(&proxy)[0] == 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "never degraded: {}\n{}",
            proxy.admin_req("GET", "/api/pools", b"").text(),
            proxy.log()
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    assert_eq!(healthy(&proxy), vec![50, 100]);
    let skewed = tally((0..60).map(|_| proxy.get("/").text()));
    assert_eq!(
        skewed.get("b1"),
        Some(&20),
        "weights 50:100 give b1 a third: {skewed:?}"
    );
    assert_eq!(skewed.get("b2"), Some(&40), "{skewed:?}");
}
