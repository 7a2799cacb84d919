//! Per-task `grpc.health.v1` status that follows the task lifecycle: a task name is SERVING exactly
//! when a request without a version would be served (it has a ready default version); names that
//! disappear are reported NOT_SERVING once, then forgotten (NOT_FOUND).

use std::collections::BTreeSet;
use std::sync::Arc;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::repository::{Registry, TaskState};

/// Sets every task name's status from the registry now.
pub async fn sync(registry: &Registry, health: &mut HealthReporter, known: &mut BTreeSet<String>) {
    // Versions still draining after removal do not keep a name known.
    let names: BTreeSet<String> = registry.entries().into_iter().filter(|e| e.state != TaskState::Draining).map(|e| e.name).collect();
    for name in &names {
        let ready = registry.default_version(name).is_some();
        health.set_service_status(name, if ready { ServingStatus::Serving } else { ServingStatus::NotServing }).await;
    }
    for gone in known.difference(&names) {
        health.set_service_status(gone, ServingStatus::NotServing).await;
        health.clear_service_status(gone).await;
    }
    *known = names;
}

/// Follows registry changes until aborted (at shutdown, before everything goes NOT_SERVING).
pub fn follow(registry: Arc<Registry>, mut health: HealthReporter) -> tokio::task::JoinHandle<()> {
    let mut changes = registry.subscribe();
    tokio::spawn(async move {
        let mut known = BTreeSet::new();
        loop {
            changes.borrow_and_update();
            sync(&registry, &mut health, &mut known).await;
            if changes.changed().await.is_err() {
                break;
            }
        }
    })
}
