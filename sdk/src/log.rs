//! Logging through the host.
//!
//! Messages go to the proxy's log, tagged with the pool and plugin, and are rate-limited by the
//! host, so a plugin cannot flood the log from `pick`. Building a message with `format!`
//! allocates and pulls formatting code into the module: prefer static messages on the request
//! path and keep formatted ones for `init` and `on_backends`.
//!
//! Under `cargo test` the messages are recorded by [`MockHost`](crate::testing::MockHost) and
//! printed to stderr.

use crate::host;

/// Severity of a log message; the discriminants are the ABI's `level` values.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Something is broken.
    Error = 0,
    /// Something is suspicious but the plugin carries on.
    Warn = 1,
    /// Normal but noteworthy events.
    Info = 2,
    /// Detail for debugging a plugin.
    Debug = 3,
}

impl Level {
    /// Maps an ABI level number back to a `Level`, `None` if unknown.
    pub const fn from_i32(level: i32) -> Option<Level> {
        match level {
            0 => Some(Level::Error),
            1 => Some(Level::Warn),
            2 => Some(Level::Info),
            3 => Some(Level::Debug),
            _ => None,
        }
    }
}

/// Logs `msg` at `level`.
pub fn log(level: Level, msg: &str) {
    host::log(level as i32, msg);
}

/// Logs `msg` as an error.
pub fn error(msg: &str) {
    log(Level::Error, msg);
}

/// Logs `msg` as a warning.
pub fn warn(msg: &str) {
    log(Level::Warn, msg);
}

/// Logs `msg` as information.
pub fn info(msg: &str) {
    log(Level::Info, msg);
}

/// Logs `msg` as debug detail.
pub fn debug(msg: &str) {
    log(Level::Debug, msg);
}
