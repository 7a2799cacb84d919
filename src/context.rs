//! What one server instance's layers share: its metrics registry and its per-task statistics.
//!
//! [`crate::server::App`] owns one and hands it down (API, router, scheduler, engine, metrics
//! port), so nothing reaches for a process-wide global: two servers in one process count apart,
//! and the engine depends on the recorders it is given, not on the metrics module's statics.
//! The other per-instance state lives with its owner: loaded graphs are shared through the
//! [`crate::runtime::Runtime`]'s graph cache, task loading runs on the
//! [`crate::repository::Registrar`]'s loader thread.

use std::sync::Arc;

use crate::metrics::Metrics;
use crate::stats::Stats;

pub struct Context {
    /// Prometheus metrics, served on the metrics port.
    pub metrics: Metrics,
    /// Cumulative per-task-version counters (KServe ModelStatistics).
    pub stats: Stats,
}

impl Context {
    pub fn new() -> Arc<Self> {
        Arc::new(Self { metrics: Metrics::new(), stats: Stats::default() })
    }
}
