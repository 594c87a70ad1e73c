//! The last stage of a pick: a [`Lease`] holds the chosen backend's in-flight slot for one
//! attempt of one request, and gives it back when dropped, recording the attempt's outcome when
//! one is known. Whatever ends the attempt (a response, a connect failure, a stale pooled
//! connection that the server retries, a client that goes away, a panic), the slot is released
//! exactly once, because releasing is `Drop`.

use std::sync::Arc;
use std::time::Instant;

use crate::backend::Backend;

/// What owns the backends a lease is taken on (a [`crate::pool::Pool`]): told when an attempt
/// with a known outcome ends, so it can apply outlier detection.
pub trait LeaseOwner: Send + Sync {
    /// The owner's name, for logs.
    fn name(&self) -> &str;
    /// An attempt on `backend` ended and its outcome was recorded.
    fn after_request(&self, backend: &Backend);
}

/// How an attempt ended, as far as the backend's record is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Not known (the client left, or the attempt failed for a reason that says nothing about
    /// the backend, such as a pooled connection it had closed): nothing is recorded.
    Unknown,
    /// The backend answered with this status.
    Status(u16),
    /// The backend failed: no answer, or an answer cut off mid-body.
    Failed,
}

/// An in-flight slot on one backend of one pool.
#[must_use = "dropping a lease releases its in-flight slot at once"]
pub struct Lease {
    pool: Arc<dyn LeaseOwner>,
    backend: Arc<Backend>,
    started: Instant,
    latency: Option<std::time::Duration>,
    outcome: Outcome,
}

impl std::fmt::Debug for Lease {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lease")
            .field("pool", &self.pool.name())
            .field("backend", &self.backend.addr_text)
            .field("outcome", &self.outcome)
            .finish()
    }
}

impl Lease {
    /// Takes an in-flight slot on `backend` of `pool`.
    pub(crate) fn new(pool: Arc<dyn LeaseOwner>, backend: Arc<Backend>) -> Lease {
        backend.stats.acquire();
        Lease {
            pool,
            backend,
            started: Instant::now(),
            latency: None,
            outcome: Outcome::Unknown,
        }
    }

    /// The leased backend.
    pub fn backend(&self) -> &Arc<Backend> {
        &self.backend
    }

    /// The outcome recorded so far.
    pub fn outcome(&self) -> Outcome {
        self.outcome
    }

    /// Records `latency` instead of the time the lease was held (simulations on virtual time).
    pub fn set_latency(&mut self, latency: std::time::Duration) {
        self.latency = Some(latency);
    }

    /// Sets what is recorded when the lease ends (the last call wins).
    pub fn set_outcome(&mut self, outcome: Outcome) {
        self.outcome = outcome;
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.backend.stats.release();
        let status = match self.outcome {
            Outcome::Unknown => return,
            Outcome::Status(s) => Some(s),
            Outcome::Failed => None,
        };
        let latency = self.latency.unwrap_or_else(|| self.started.elapsed());
        self.backend.stats.record(status, latency);
        self.pool.after_request(&self.backend);
    }
}
