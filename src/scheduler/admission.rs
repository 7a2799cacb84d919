//! Admission: a request takes its place in the queue before any work (decoding, tokenizing) is
//! spent on it, and is refused at once when the queue is full by count (`batching.max_queued`)
//! or by the wait the work already queued would cause (`batching.max_queue_wait_ms`, or the
//! request's own deadline).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;

use crate::engine::Pace;

/// The work the queue holds, in engine work units (see [`crate::engine::units`]).
#[derive(Default)]
pub struct Load {
    /// Admitted requests still being decoded or tokenized: their size is not known yet.
    pending: AtomicU64,
    /// Units of queued and running jobs.
    queued_units: AtomicU64,
    /// Average units of one job (an exponential average), standing in for pending requests.
    job_units: AtomicU64,
    pub pace: Arc<Pace>,
}

impl Load {
    /// How long the work admitted so far will keep the engine busy, at its measured pace.
    pub fn estimated_wait(&self) -> Duration {
        let pending = self.pending.load(Ordering::Relaxed).saturating_mul(self.job_units.load(Ordering::Relaxed));
        let units = self.queued_units.load(Ordering::Relaxed).saturating_add(pending);
        Duration::from_nanos(units.saturating_mul(self.pace.ns_per_unit()))
    }

    fn note_job(&self, units: u64) {
        let old = self.job_units.load(Ordering::Relaxed);
        let next = if old == 0 { units } else { (old.saturating_mul(7) / 8).saturating_add(units / 8) };
        self.job_units.store(next, Ordering::Relaxed);
    }
}

/// A place in the queue, held from admission until the answer (or the client going away).
pub struct Admission {
    pub(super) load: Arc<Load>,
    /// Set once the job is tokenized and queued: its units count in the load until dropped.
    pub(super) units: Option<u64>,
    pub(super) _permit: OwnedSemaphorePermit,
    pub(super) _depth: Depth,
}

impl Admission {
    pub(super) fn new(load: Arc<Load>, permit: OwnedSemaphorePermit, depth: prometheus::IntGauge) -> Self {
        load.pending.fetch_add(1, Ordering::Relaxed);
        depth.inc();
        Self { load, units: None, _permit: permit, _depth: Depth(depth) }
    }

    /// The job's size is known: it stops being pending and counts with its real units.
    pub(super) fn queued(&mut self, units: u64) {
        if self.units.is_none() {
            self.load.pending.fetch_sub(1, Ordering::Relaxed);
            self.load.queued_units.fetch_add(units, Ordering::Relaxed);
            self.load.note_job(units);
            self.units = Some(units);
        }
    }
}

impl Drop for Admission {
    fn drop(&mut self) {
        match self.units {
            None => self.load.pending.fetch_sub(1, Ordering::Relaxed),
            Some(u) => self.load.queued_units.fetch_sub(u, Ordering::Relaxed),
        };
    }
}

/// Counts the request in the queue-depth gauge while it lives.
pub(super) struct Depth(prometheus::IntGauge);

impl Drop for Depth {
    fn drop(&mut self) {
        self.0.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_estimate_counts_queued_units_and_pending_requests_at_the_measured_pace() {
        let load = Arc::new(Load::default());
        let permits = Arc::new(tokio::sync::Semaphore::new(4));
        let gauge = prometheus::IntGauge::new("depth", "test").unwrap();
        assert_eq!(load.estimated_wait(), Duration::ZERO, "no pace measured yet: nothing is refused");
        load.pace.record_for_test(1_000, Duration::from_millis(10));
        let mut a = Admission::new(load.clone(), permits.clone().try_acquire_owned().unwrap(), gauge.clone());
        a.queued(2_000);
        assert_eq!(load.estimated_wait(), Duration::from_millis(20));
        // A pending request counts as an average job (2,000 units so far).
        let b = Admission::new(load.clone(), permits.clone().try_acquire_owned().unwrap(), gauge.clone());
        assert_eq!(load.estimated_wait(), Duration::from_millis(40));
        assert_eq!(gauge.get(), 2);
        drop(a);
        drop(b);
        assert_eq!(load.estimated_wait(), Duration::ZERO);
        assert_eq!(gauge.get(), 0);
        assert_eq!(permits.available_permits(), 4);
    }
}
