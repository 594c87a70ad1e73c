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

/// The generation a starting member takes ([`next_generation`]) with the state file at `path`,
/// which is read and then rewritten with the result. Returns it and whether the state file is
/// usable for later writes (after a rejoin).
///
/// A corrupt state file is logged and overwritten: the wall clock is as good as it gets then.
/// When `optional` (the file is a default the operator did not configure), a file that cannot
/// be read or written is logged too and the wall clock used; otherwise that fails the start.
pub fn start_generation(
    path: Option<&Path>,
    optional: bool,
    now_ms: u64,
) -> Result<(u64, bool), PersistError> {
    let Some(path) = path else {
        return Ok((next_generation(now_ms, None), false));
    };
    let persisted = match read_generation(path) {
        Ok(g) => g,
        Err(e) if e.corrupt || optional => {
            tracing::warn!(error = %e, "the identity generation falls back to the wall clock");
            None
        }
        Err(e) => return Err(e),
    };
    let generation = next_generation(now_ms, persisted);
    match write_generation(path, generation) {
        Ok(()) => Ok((generation, true)),
        Err(e) if optional => {
            tracing::warn!(error = %e, "the default [cluster] state_file cannot be written, so this node's identity generation follows the wall clock alone (a clock stepped back can lock it out after a restart); set state_file to a writable path, such as /var/lib/sluice/cluster.state");
            Ok((generation, false))
        }
        Err(e) => Err(e),
    }
}

/// Why a state or key file could not be read or written.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {what}")]
pub struct PersistError {
    /// The file.
    pub path: PathBuf,
    /// What went wrong and what to do.
    pub what: String,
    /// The file was read but holds no valid content (as opposed to an I/O failure).
    pub corrupt: bool,
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
                corrupt: false,
            })
        }
    };
    let value = text
        .lines()
        .map(str::trim)
        .find_map(|l| l.strip_prefix("generation"))
        .and_then(|rest| rest.trim().strip_prefix('='))
        .and_then(|v| v.trim().parse::<u64>().ok());
    match value {
        Some(g) => Ok(Some(g)),
        None => Err(PersistError {
            path: path.to_path_buf(),
            what: "the cluster state file has no valid `generation = N` line; fix it, or delete it to start from the wall clock".into(),
            corrupt: true,
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

/// The file [`write_atomic`] replaces for `path`: `path` itself, or the file its symbolic link
/// points to. Its directory is where the temporary file goes, so that is what must be writable.
pub fn written_path(path: &Path) -> std::io::Result<PathBuf> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_symlink() => std::fs::canonicalize(path),
        _ => Ok(path.to_path_buf()),
    }
}

/// Replaces `path` with `bytes`: writes a temporary file with permissions `mode` beside it,
/// syncs it and renames it over `path`. A symbolic link at `path` (a key file a secrets manager
/// placed, say) stays: the file it points to is replaced.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> Result<(), PersistError> {
    use std::os::unix::fs::PermissionsExt;
    let err = |what: String| PersistError {
        path: path.to_path_buf(),
        what,
        corrupt: false,
    };
    let target =
        written_path(path).map_err(|e| err(format!("cannot follow its symbolic link: {e}")))?;
    let dir = target
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = target
        .file_name()
        .ok_or_else(|| err("not a file path".into()))?;
    let result = (|| -> std::io::Result<()> {
        // tempfile: a fresh random name opened with O_EXCL, so neither another process writing
        // beside us nor a link planted at a guessable name is ever written through; dropped
        // before the rename (any error), it removes itself.
        let mut tmp = tempfile::Builder::new()
            .prefix(&format!(".{}.", name.to_string_lossy()))
            .suffix(".tmp")
            .permissions(std::fs::Permissions::from_mode(mode))
            .tempfile_in(dir)?;
        tmp.write_all(bytes)?;
        tmp.as_file().sync_all()?;
        tmp.persist(&target).map_err(|e| e.error)?;
        // The rename itself is durable once the directory is synced.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    result.map_err(|e| {
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

    // A directory removed when the test ends.
    fn scratch() -> tempfile::TempDir {
        tempfile::tempdir().unwrap()
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
        let tmp = scratch();
        let dir = tmp.path();
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
    fn a_corrupt_or_unwritable_default_state_file_falls_back_to_the_wall_clock() {
        let tmp = scratch();
        let dir = tmp.path();
        let path = dir.join("node.state");
        // Corrupt: never fatal; the file is rewritten with the clock.
        for optional in [false, true] {
            std::fs::write(&path, "generation = soon\n").unwrap();
            assert_eq!(
                start_generation(Some(&path), optional, 7_000).unwrap(),
                (7_000, true)
            );
            assert_eq!(read_generation(&path).unwrap(), Some(7_000));
        }
        // The largest generation does not overflow.
        write_generation(&path, u64::MAX).unwrap();
        assert_eq!(
            start_generation(Some(&path), false, 7_000).unwrap(),
            (u64::MAX, true)
        );
        // A directory that does not exist (like a read-only one): fatal only when configured.
        let missing = dir.join("missing/node.state");
        assert_eq!(
            start_generation(Some(&missing), true, 7_000).unwrap(),
            (7_000, false)
        );
        let e = start_generation(Some(&missing), false, 7_000).unwrap_err();
        assert!(e.to_string().contains("cannot write it"), "{e}");
        assert_eq!(
            start_generation(None, false, 7_000).unwrap(),
            (7_000, false)
        );
    }

    #[test]
    fn key_files_are_replaced_whole_and_readable_by_their_owner_only() {
        let tmp = scratch();
        let dir = tmp.path();
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
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 1);
        // A symbolic link stays one: the file it points to is what changes.
        let real = dir.join("real.key");
        std::fs::rename(&path, &real).unwrap();
        std::os::unix::fs::symlink("real.key", &path).unwrap();
        write_key_file(&path, &["d".into()]).unwrap();
        assert!(std::fs::symlink_metadata(&path)
            .unwrap()
            .file_type()
            .is_symlink());
        assert!(std::fs::read_to_string(&real).unwrap().contains("\nd\n"));
        assert_eq!(mode(&real), 0o600);
        assert_eq!(std::fs::read_dir(dir).unwrap().count(), 2);
        let e = write_key_file(&dir.join("missing/cluster.key"), &[]).unwrap_err();
        assert!(e.to_string().contains("cannot write it"), "{e}");
    }
}
