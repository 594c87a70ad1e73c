//! `sluice plugin new NAME`: writes a strategy crate that builds and passes its own tests as is.

use std::path::{Path, PathBuf};

/// Where the SDK this binary was built with lives, if that checkout is still there.
pub fn default_sdk_path() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).parent()?.join("sdk");
    p.join("Cargo.toml").is_file().then_some(p)
}

/// Creates `dir/NAME/` with a strategy crate depending on the SDK at `sdk`.
pub fn new_strategy(dir: &Path, name: &str, sdk: &Path) -> Result<PathBuf, String> {
    if name.is_empty()
        || !name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        || name.starts_with(|c: char| c.is_ascii_digit())
    {
        return Err(format!("\"{name}\" is not a valid crate name; use letters, digits, '-' and '_', starting with a letter"));
    }
    let root = dir.join(name);
    if root.exists() {
        return Err(format!(
            "{} already exists; choose another name or remove it",
            root.display()
        ));
    }
    let sdk = std::fs::canonicalize(sdk).map_err(|e| format!("SDK path {}: {e}", sdk.display()))?;
    if !sdk.join("Cargo.toml").is_file() {
        return Err(format!(
            "{} is not the sluice-sdk crate (no Cargo.toml); pass --sdk PATH/TO/sluice/sdk",
            sdk.display()
        ));
    }
    let lib = name.replace('-', "_");
    let files: [(&str, String); 4] = [
        (
            "Cargo.toml",
            CARGO_TOML
                .replace("{name}", name)
                .replace("{sdk}", &sdk.display().to_string().replace('\\', "/")),
        ),
        ("src/lib.rs", LIB_RS.to_string()),
        (
            "README.md",
            README.replace("{name}", name).replace("{lib}", &lib),
        ),
        (".gitignore", "target/\n".to_string()),
    ];
    for (path, text) in files {
        let p = root.join(path);
        if let Some(parent) = p.parent() {
            std::fs::create_dir_all(parent)
                .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
        }
        std::fs::write(&p, text).map_err(|e| format!("cannot write {}: {e}", p.display()))?;
    }
    Ok(root)
}

const CARGO_TOML: &str = r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"
publish = false

[lib]
# cdylib is the wasm plugin; rlib lets `cargo test` run the strategy natively.
crate-type = ["cdylib", "rlib"]

[dependencies]
sluice-sdk = { path = "{sdk}" }

# A crate of its own, not part of another workspace.
[workspace]

[profile.release]
opt-level = "s"
lto = true
codegen-units = 1
panic = "abort"
strip = true
"#;

const LIB_RS: &str = r##"//! A sluice strategy: the backend with the fewest requests in flight per unit of weight,
//! ties broken by a pool-wide rotation.
//!
//! Build: `cargo build --release --target wasm32-unknown-unknown`
//! Try:   `sluice plugin test target/wasm32-unknown-unknown/release/<crate>.wasm`

use sluice_sdk::{counter_add, Backends, Config, Request, Strategy};

/// The strategy's state. Settings from the pool's `config` table arrive in `init`.
pub struct LeastLoaded;

impl Strategy for LeastLoaded {
    fn init(config: &Config) -> Result<Self, String> {
        // Refuse settings we do not understand, so a typo is reported at load time.
        config.reject_unknown_keys(&[])?;
        Ok(LeastLoaded)
    }

    fn pick(&mut self, req: &mut Request, backends: &Backends) -> Option<usize> {
        let n = backends.len();
        if n == 0 {
            return None;
        }
        // Start the scan at a rotating position so equal loads are shared out evenly.
        let start = counter_add(0, 1).ok()? as u64 % n as u64;
        let mut best: Option<(u64, usize)> = None;
        for k in 0..n {
            let i = (start as usize + k) % n;
            if req.is_excluded(i) {
                continue;
            }
            let weight = u64::from(backends[i].weight().max(1));
            let load = u64::from(backends.inflight(i).unwrap_or(0)) * 1000 / weight;
            if best.is_none_or(|(l, _)| load < l) {
                best = Some((load, i));
            }
        }
        best.map(|(_, i)| i)
    }
}

sluice_sdk::export_strategy!(LeastLoaded);

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_sdk::testing::{backends, Harness, MockHost, TestRequest};

    #[test]
    fn picks_the_least_loaded_backend() {
        let mut h = Harness::<LeastLoaded>::new("{}").unwrap();
        h.set_backends(&backends(3));
        MockHost::set_inflight(0, 5);
        MockHost::set_inflight(1, 1);
        MockHost::set_inflight(2, 3);
        assert_eq!(h.pick(&TestRequest::new()), Some(1));
    }

    #[test]
    fn retries_avoid_tried_backends_and_empty_pools_have_none() {
        let mut h = Harness::<LeastLoaded>::new("{}").unwrap();
        h.set_backends(&backends(3));
        assert_eq!(h.retries(&TestRequest::new()).len(), 3);
        h.set_backends(&[]);
        assert_eq!(h.pick(&TestRequest::new()), None);
    }

    #[test]
    fn unknown_settings_are_refused() {
        assert!(Harness::<LeastLoaded>::new(r#"{"bogus": 1}"#).is_err());
    }
}
"##;

const README: &str = r#"# {name}

A sluice strategy plugin.

```sh
cargo test                                                # native unit tests, no wasm needed
cargo build --release --target wasm32-unknown-unknown     # the plugin
sluice plugin test target/wasm32-unknown-unknown/release/{lib}.wasm --backends 5 --requests 10000
sluice plugin load --pool web target/wasm32-unknown-unknown/release/{lib}.wasm   # hot-load into a running proxy
```

In a config file: `strategy = { plugin = "path/to/{lib}.wasm", config = { } }`.
"#;
