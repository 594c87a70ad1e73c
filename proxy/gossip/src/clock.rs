//! A process-wide monotonic clock in milliseconds, cheap enough to store in atomics.

use std::sync::OnceLock;
use std::time::Instant;

fn origin() -> Instant {
    static ORIGIN: OnceLock<Instant> = OnceLock::new();
    *ORIGIN.get_or_init(Instant::now)
}

/// Milliseconds since the process's first call, starting at 1 (0 means "never" in our atomics).
pub fn now_ms() -> u64 {
    origin().elapsed().as_millis() as u64 + 1
}

/// Wall-clock milliseconds since the Unix epoch (0 before it): identity generations, rotation
/// ids and replay stamps, which must compare across processes and restarts.
pub fn wall_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
