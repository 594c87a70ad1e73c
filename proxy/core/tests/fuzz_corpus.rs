//! Runs every kept fuzz input through its target, on stable, as part of the test suite: the corpus
//! the fuzzer built (`proxy/fuzz/corpus/TARGET`) and every crash it ever found
//! (`proxy/fuzz/regressions/TARGET`), so a fixed crash stays fixed. The targets are the same
//! functions cargo-fuzz runs (`sluice_core::fuzzing`).

use std::path::{Path, PathBuf};

use sluice_core::fuzzing;

fn inputs(kind: &str, target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .collect();
    files.sort();
    files
}

fn run(target: &str, f: fn(&[u8])) -> usize {
    let mut n = 0;
    for kind in ["corpus", "regressions"] {
        for path in inputs(kind, target) {
            let data = std::fs::read(&path).unwrap();
            // A panic names the input that caused it.
            let result = std::panic::catch_unwind(|| f(&data));
            assert!(result.is_ok(), "{target}: {} panics", path.display());
            n += 1;
        }
    }
    n
}

#[test]
fn every_kept_fuzz_input_runs_clean() {
    let counts = [
        ("config", run("config", fuzzing::config)),
        ("http1", run("http1", fuzzing::http1)),
        (
            "gossip_packet",
            run("gossip_packet", fuzzing::gossip_packet),
        ),
        ("sdk_codecs", run("sdk_codecs", fuzzing::sdk_codecs)),
        ("plugin_load", run("plugin_load", fuzzing::plugin_load)),
    ];
    for (target, n) in counts {
        assert!(n > 0, "{target}: no corpus kept; run scripts/fuzz {target}");
    }
}
