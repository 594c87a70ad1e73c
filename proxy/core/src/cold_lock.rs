//! [`ColdLock`]: the one std mutex the request-path crates may use, for state that only admin,
//! reload, health-scheduling and membership code touches. `clippy.toml` bans `std::sync::Mutex`
//! in this crate so that a lock cannot appear on the request path unnoticed; this wrapper is the
//! audited exception, and its name says at every use that the code holding it is cold.
//!
//! A poisoned lock is entered anyway: the data it guards (health records, reload bookkeeping,
//! metric scopes) stays consistent field by field, and refusing to serve because another thread
//! panicked would be worse.

#![allow(clippy::disallowed_types)] // the audited exception described above

use std::sync::{Mutex, MutexGuard};

/// A mutex for code off the request path. See the module documentation.
#[derive(Debug, Default)]
pub struct ColdLock<T>(Mutex<T>);

impl<T> ColdLock<T> {
    /// A lock guarding `value`.
    pub const fn new(value: T) -> ColdLock<T> {
        ColdLock(Mutex::new(value))
    }

    /// Locks, entering a poisoned lock as well.
    pub fn lock(&self) -> MutexGuard<'_, T> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The value, without locking (exclusive access).
    pub fn get_mut(&mut self) -> &mut T {
        self.0.get_mut().unwrap_or_else(|p| p.into_inner())
    }
}
