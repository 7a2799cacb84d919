//! Per-task `grpc.health.v1` status that follows the task lifecycle: a task name is SERVING exactly
//! when a request without a version would be served (it has a ready default version); names that
//! disappear are reported NOT_SERVING once, then forgotten (NOT_FOUND).

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::repository::Registry;

/// Brings every task name's status in line with the registry, touching only names whose status
/// changed since `known` (one registration among 10,000 tasks updates one name, not 10,000).
pub async fn sync(registry: &Registry, health: &mut HealthReporter, known: &mut BTreeMap<String, bool>) {
    // Versions still draining after removal do not keep a name known.
    let now = registry.serving_names();
    for (name, ready) in &now {
        if known.get(name) != Some(ready) {
            health.set_service_status(name, if *ready { ServingStatus::Serving } else { ServingStatus::NotServing }).await;
        }
    }
    for gone in known.keys().filter(|n| !now.contains_key(*n)) {
        health.set_service_status(gone, ServingStatus::NotServing).await;
        health.clear_service_status(gone).await;
    }
    *known = now;
}

/// Follows registry changes until aborted (at shutdown, before everything goes NOT_SERVING).
pub fn follow(registry: Arc<Registry>, mut health: HealthReporter) -> tokio::task::JoinHandle<()> {
    let mut changes = registry.subscribe();
    tokio::spawn(async move {
        let mut known = BTreeMap::new();
        loop {
            changes.borrow_and_update();
            sync(&registry, &mut health, &mut known).await;
            if changes.changed().await.is_err() {
                break;
            }
        }
    })
}
