//! `sluice plugin new` and `sluice plugin test`, as an author would use them.

mod common;

use std::path::PathBuf;
use std::process::Command;

use common::*;

fn sluice(args: &[&str]) -> (bool, String, String) {
    let out = sluice_cli(args);
    (out.ok, out.stdout, out.stderr)
}

fn number_after(text: &str, prefix: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .unwrap_or_else(|| panic!("no line {prefix:?} in {text}"));
    line[prefix.len()..]
        .trim()
        .split(|c: char| !c.is_ascii_digit())
        .next()
        .unwrap()
        .parse()
        .unwrap()
}

#[test]
fn plugin_test_reports_distribution_and_key_movement() {
    let (ok, out, err) = sluice(&[
        "plugin",
        "test",
        "builtin:round-robin",
        "--backends",
        "4",
        "--requests",
        "4000",
        "--keys",
        "400",
    ]);
    assert!(ok, "{err}");
    // Exact rotation: 1000 each before, and 4000/3 after one of four is removed.
    assert_eq!(
        out.lines().filter(|l| l.contains(" 1000 ")).count(),
        4,
        "{out}"
    );
    assert!(out.contains("(removed midway)"), "{out}");
    assert_eq!(number_after(&out, "requests without a backend: "), 0);
    // Round-robin is not consistent: most keys move.
    assert!(
        number_after(&out, "keys moved after the removal: ") > 200,
        "{out}"
    );

    let (ok, _, err) = sluice(&[
        "plugin",
        "test",
        "builtin:round-robin",
        "--config",
        "{not json",
    ]);
    assert!(!ok && err.contains("--config is not valid JSON"), "{err}");
    let (ok, _, err) = sluice(&[
        "plugin",
        "test",
        "builtin:round-robin",
        "--config",
        "{\"bogus\": 1}",
    ]);
    assert!(!ok && err.contains("plugin init failed"), "{err}");
}

#[test]
fn scaffolded_strategy_builds_tests_and_runs() {
    let dir = scratch_dir("scaffold");
    let (ok, out, err) = sluice(&[
        "plugin",
        "new",
        "my-strategy",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    assert!(ok, "{err}");
    assert!(out.contains("created"), "{out}");
    let crate_dir = dir.join("my-strategy");
    let (ok, _, err) = sluice(&[
        "plugin",
        "new",
        "my-strategy",
        "--dir",
        dir.to_str().unwrap(),
    ]);
    assert!(!ok && err.contains("already exists"), "{err}");

    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"))
        .join("examples-wasm");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let run = |args: &[&str]| {
        let out = Command::new(&cargo)
            .args(args)
            .arg("--target-dir")
            .arg(&target)
            .current_dir(&crate_dir)
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTFLAGS")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cargo {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let tests = run(&["test", "--release"]);
    assert!(tests.contains("test result: ok. 3 passed"), "{tests}");
    run(&["build", "--release", "--target", "wasm32-unknown-unknown"]);
    let wasm = target.join("wasm32-unknown-unknown/release/my_strategy.wasm");
    let (ok, out, err) = sluice(&[
        "plugin",
        "test",
        wasm.to_str().unwrap(),
        "--requests",
        "2000",
    ]);
    assert!(ok, "{err}");
    assert_eq!(number_after(&out, "requests without a backend: "), 0);
    assert_eq!(
        out.lines().filter(|l| l.starts_with("127.0.0.1:")).count(),
        5,
        "{out}"
    );
}
