//! What a member keeps on disk across restarts: its identity generation (the *state file*) and
//! its keyring (the *key file*, rewritten after a key rotation).
//!
//! # Why the generation is persisted
//! foca tells a restarted member from its former self by the identity's generation: the higher
//! one wins the address. Taking the wall clock alone would lock a node out after a clock step
//! backwards (its new identity would lose against the one the cluster still remembers), so the
//! generation is `max(wall clock ms, persisted + 1)` ([`next_generation`]) and the value in use
//! is written back at start and after every automatic rejoin. Without a state file the wall
//! clock is all there is, as before.
//!
//! Both files are written atomically: a temporary file in the same directory, flushed to disk,
//! then renamed over the old one, so a crash leaves either the old or the new content, never a
//! torn file. Both get mode 0600 whatever the old file had: a key file holds the cluster's
//! secret, and a copy readable by others (a 0644 file written by hand) is not carried over.

use std::io::Write;
use std::path::{Path, PathBuf};

/// The generation a starting member takes: above everything it used before, and the wall clock
/// when that is higher (so a member without a state file still outranks its former self).
pub fn next_generation(now_ms: u64, persisted: Option<u64>) -> u64 {
    let after = persisted.map_or(1, |p| p.saturating_add(1));
    now_ms.max(after)
}

/// Why a state or key file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}")]
pub struct PersistError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong and what to do.
    pub what: String,
}

const STATE_HEADER: &str =
    "# sluice cluster state, written by sluice: the identity generation of this node.\n";

/// Reads the generation from a state file; `Ok(None)` when the file does not exist yet.
pub fn read_generation(path: &Path) -> Result<Option<u64>, PersistError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(PersistError {
                path: path.to_path_buf(),
                what: format!("cannot read the cluster state file: {e}"),
            })
        }
    };
    let value = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .find_map(|l| l.strip_prefix("generation"))
        .and_then(|rest| rest.trim().strip_prefix('='))
        .and_then(|v| v.trim().parse::<u64>().ok());
    match value {
        Some(g) => Ok(Some(g)),
        None => Err(PersistError {
            path: path.to_path_buf(),
            what: "the cluster state file has no valid `generation = N` line; fix it, or delete it to start from the wall clock".into(),
        }),
    }
}

/// Writes the generation to a state file (atomically).
pub fn write_generation(path: &Path, generation: u64) -> Result<(), PersistError> {
    let text = format!("{STATE_HEADER}generation = {generation}\n");
    write_atomic(path, text.as_bytes(), 0o600)
}

/// Writes a keyring to a key file (atomically), one base64 key per line, primary first, in the
/// format `[cluster] key_file` reads.
pub fn write_key_file(path: &Path, keys: &[String]) -> Result<(), PersistError> {
    let mut text = String::from(
        "# sluice cluster keys, primary (encrypting) key first; rewritten by sluice after a key rotation.\n",
    );
    for k in keys {
        text.push_str(k);
        text.push('\n');
    }
    write_atomic(path, text.as_bytes(), 0o600)
}

/// Replaces `path` with `bytes`: writes a temporary file with permissions `mode` beside it,
/// syncs it and renames it over `path`.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PersistError> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let err = |what: String| PersistError {
        path: path.to_path_buf(),
        what,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| err("not a file path".into()))?;
    // The pid keeps two processes sharing a directory from writing one temporary file.
    let tmp = dir.join(format!(
        ".{}.tmp.{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        // `mode` above only applies to a new file; a stale temporary one may have others.
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        // The rename itself is durable once the directory is synced.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        err(format!(
            "cannot write it: {e}; check that sluice may write in {}",
            dir.display()
        ))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn scratch(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!(
            "sluice-gossip-persist-{}-{tag}",
            std::process::id()
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn generation_is_the_wall_clock_or_above_the_persisted_one() {
        // No state: the wall clock.
        assert_eq!(next_generation(1_000, None), 1_000);
        // The clock moved on since the last start: the clock.
        assert_eq!(next_generation(5_000, Some(1_000)), 5_000);
        // The clock stepped back behind the persisted value: still above it.
        assert_eq!(next_generation(1_000, Some(5_000)), 5_001);
        assert_eq!(next_generation(5_000, Some(5_000)), 5_001);
        // A clock before the epoch reads as 0.
        assert_eq!(next_generation(0, None), 1);
        assert_eq!(next_generation(0, Some(u64::MAX)), u64::MAX);
    }

    #[test]
    fn state_file_round_trips_and_restarts_climb_even_with_a_clock_behind() {
        let dir = scratch("state");
        let path = dir.join("node.state");
        assert_eq!(read_generation(&path).unwrap(), None);
        let clock_ms = 2_000;
        let mut last = 0;
        for _ in 0..3 {
            let g = next_generation(clock_ms, read_generation(&path).unwrap());
            assert!(g > last, "{g} after {last}");
            write_generation(&path, g).unwrap();
            last = g;
        }
        assert_eq!(last, 2_002);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        std::fs::write(&path, "generation = soon\n").unwrap();
        let e = read_generation(&path).unwrap_err().to_string();
        assert!(e.contains("no valid `generation = N` line"), "{e}");
    }

    #[test]
    fn key_files_are_replaced_whole_and_readable_by_their_owner_only() {
        let dir = scratch("keys");
        let path = dir.join("cluster.key");
        write_key_file(&path, &["a".into(), "b".into()]).unwrap();
        let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode(&path), 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        write_key_file(&path, &["c".into()]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let keys: Vec<&str> = text.lines().filter(|l| !l.starts_with('#')).collect();
        assert_eq!(keys, ["c"]);
        assert_eq!(
            mode(&path),
            0o600,
            "a world-readable key file is not carried over"
        );
        // Nothing left beside it.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
        let e = write_key_file(&dir.join("missing/cluster.key"), &[]).unwrap_err();
        assert!(e.to_string().contains("cannot write it"), "{e}");
    }
}
