//! Per-task `grpc.health.v1` status that follows the task lifecycle: a task name is SERVING exactly
//! when a request without a version would be served (it has a ready default version); names that
//! disappear are reported NOT_SERVING once, then forgotten (NOT_FOUND). Everything goes NOT_SERVING
//! when the engine stops or shutdown begins; at shutdown the statuses are then forgotten, which ends
//! open Watch streams.

use std::collections::BTreeMap;
use std::sync::Arc;

use tonic_health::ServingStatus;
use tonic_health::server::HealthReporter;

use crate::repository::Registry;

/// Brings every task name's status in line with the registry, touching only names whose status
/// changed since `known`; after the first call it reads only the names the registry reports as
/// changed (one registration among 10,000 tasks costs one lookup, not a walk over 10,000 names).
pub async fn sync(registry: &Registry, health: &mut HealthReporter, known: &mut BTreeMap<String, bool>) {
    let Some(touched) = registry.take_touched() else {
        // Versions still draining after removal do not keep a name known.
        let now = registry.serving_names();
        for (name, ready) in &now {
            if known.get(name) != Some(ready) {
                set(health, name, *ready).await;
            }
        }
        for gone in known.keys().filter(|n| !now.contains_key(*n)) {
            forget(health, gone).await;
        }
        *known = now;
        return;
    };
    for name in touched {
        match registry.serving(&name) {
            Some(ready) if known.get(&name) != Some(&ready) => {
                set(health, &name, ready).await;
                known.insert(name, ready);
            }
            Some(_) => {}
            None => {
                if known.remove(&name).is_some() {
                    forget(health, &name).await;
                }
            }
        }
    }
}

/// Sets `name`'s status from the registry now, by the follower's rule: SERVING exactly when a
/// request without a version would be served; a name with no version left (draining ones aside)
/// goes NOT_SERVING for watchers and is then forgotten (NOT_FOUND). The admin service calls it so
/// that a change is visible on health before its RPC answers; one lookup, whatever the number of
/// tasks.
pub async fn report(health: &mut HealthReporter, registry: &Registry, name: &str) {
    match registry.serving(name) {
        Some(ready) => set(health, name, ready).await,
        None => forget(health, name).await,
    }
}

async fn set(health: &HealthReporter, name: &str, ready: bool) {
    health.set_service_status(name, if ready { ServingStatus::Serving } else { ServingStatus::NotServing }).await;
}

/// NOT_SERVING once (for open watches), then NOT_FOUND.
async fn forget(health: &mut HealthReporter, name: &str) {
    health.set_service_status(name, ServingStatus::NotServing).await;
    health.clear_service_status(name).await;
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

/// The services that answer inference, whose status follows the engine.
fn inference_services() -> [&'static str; 3] {
    use tonic::server::NamedService;
    type Native = crate::proto::inference_server::InferenceServer<super::native::NativeApi>;
    type KServe = crate::kserve_proto::grpc_inference_service_server::GrpcInferenceServiceServer<super::kserve::KServeApi>;
    ["", <Native as NamedService>::NAME, <KServe as NamedService>::NAME]
}

/// Reports NOT_SERVING for the server (`""`), both inference services and every task name.
pub async fn not_serving(health: &HealthReporter, registry: &Registry) {
    for name in inference_services() {
        health.set_service_status(name, ServingStatus::NotServing).await;
    }
    for entry in registry.entries() {
        health.set_service_status(&entry.name, ServingStatus::NotServing).await;
    }
}

/// Forgets every status, which ends open Watch streams (each sees the last status first), so
/// they do not hold a draining server for its whole grace period.
pub async fn end_watches(health: &mut HealthReporter, registry: &Registry) {
    for name in inference_services() {
        health.clear_service_status(name).await;
    }
    for entry in registry.entries() {
        health.clear_service_status(&entry.name).await;
    }
}

/// Health follows the engine, as text-embeddings-inference's backend health does: when the
/// engine thread or the queue actor stops, the server and every service go NOT_SERVING for good
/// (the orchestrator restarts the process; the reason is in the log) and KServe ServerReady
/// answers false.
pub fn follow_engine(
    mut failed: tokio::sync::watch::Receiver<Option<String>>,
    health: HealthReporter,
    registry: Arc<Registry>,
    task_follower: tokio::task::AbortHandle,
    not_ready: Arc<std::sync::atomic::AtomicBool>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let reason = match failed.wait_for(Option::is_some).await {
            Ok(r) => r.clone().unwrap_or_default(),
            Err(_) => return,
        };
        task_follower.abort();
        not_ready.store(true, std::sync::atomic::Ordering::Relaxed);
        not_serving(&health, &registry).await;
        tracing::error!(reason, "health is NOT_SERVING: the inference engine stopped; restart the server");
    })
}
