//! Plugins embedded in the binary, addressed as `builtin:NAME`.

use std::path::Path;

include!(concat!(env!("OUT_DIR"), "/builtins.rs"));

/// Names of all built-in plugins.
pub fn names() -> impl Iterator<Item = &'static str> {
    BUILTINS.iter().map(|(n, _, _)| *n)
}

/// Names of the built-in strategies.
pub fn strategy_names() -> impl Iterator<Item = &'static str> {
    BUILTINS
        .iter()
        .filter(|(_, k, _)| *k == "strategy")
        .map(|(n, _, _)| *n)
}

/// Names of the built-in health checks.
pub fn health_names() -> impl Iterator<Item = &'static str> {
    BUILTINS
        .iter()
        .filter(|(_, k, _)| *k == "health")
        .map(|(n, _, _)| *n)
}

/// Bytes of a built-in plugin.
pub fn get(name: &str) -> Option<&'static [u8]> {
    BUILTINS
        .iter()
        .find(|(n, _, _)| *n == name)
        .map(|(_, _, b)| *b)
}

/// A round-robin written in the host, not a plugin: it measures what the Wasm strategy costs
/// (benches/load). It carries the built-in round-robin plugin as its version, so the API and a
/// hot swap treat it like any other strategy; swapping in a plugin replaces it.
pub const NATIVE_ROUND_ROBIN: &str = "native:round-robin";

/// Reads a plugin given as `builtin:NAME`, [`NATIVE_ROUND_ROBIN`] or a path (relative to
/// `base_dir`). Returns the bytes and a display name.
pub fn load_source(source: &str, base_dir: &Path) -> Result<(Vec<u8>, String), String> {
    if source == NATIVE_ROUND_ROBIN {
        let rr = get("round-robin").ok_or("the round-robin built-in is missing")?;
        return Ok((rr.to_vec(), source.to_string()));
    }
    if let Some(name) = source.strip_prefix("builtin:") {
        return get(name)
            .map(|b| (b.to_vec(), source.to_string()))
            .ok_or_else(|| {
                format!(
                    "unknown built-in plugin \"{name}\"; built-ins are: {}",
                    names().collect::<Vec<_>>().join(", ")
                )
            });
    }
    let path = if Path::new(source).is_absolute() {
        Path::new(source).to_path_buf()
    } else {
        base_dir.join(source)
    };
    std::fs::read(&path)
        .map(|b| {
            (
                b,
                path.file_name()
                    .map(|f| f.to_string_lossy().into_owned())
                    .unwrap_or_else(|| source.into()),
            )
        })
        .map_err(|e| format!("cannot read plugin file \"{}\": {e}", path.display()))
}
