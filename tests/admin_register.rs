//! Registration at run time over gRPC: an uploaded task serves exactly like the same task loaded
//! from disk; versions, default pins, replacement; a restart serves everything registered.

mod admin_support;
mod common;

use adapterdrop_serve::proto::{GetTaskRequest, SetDefaultVersionRequest, TaskStatus};
use admin_support::*;
use common::TestServer;
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

const TEXTS: [&str; 3] = ["a gripping, beautifully shot film", "the plot never comes together", "ok"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_task_serves_like_the_same_task_from_disk_and_survives_a_restart() {
    let repo = temp_repo(&["sent"]);
    let mut server = TestServer::start_on(repo.path(), &[("ADAPTERDROP__REPOSITORY__POLL_INTERVAL_S", "0")]);
    let mut admin_c = admin(&server.admin_addr()).await;
    let mut c = inference(&server.addr).await;
    let mut health = HealthClient::new(server.channel().await);
    let check = |s: &str| HealthCheckRequest { service: s.into() };
    assert_eq!(health.check(check("sent-up")).await.unwrap_err().code(), tonic::Code::NotFound);

    // Small chunks: files arrive in many pieces.
    let resp = register_msgs(&mut admin_c, messages(header("sent-up", None, false, false), &source("sent"), 1000), None).await.unwrap();
    let info = resp.task.unwrap();
    assert_eq!((info.name.as_str(), info.version, info.status), ("sent-up", 1, TaskStatus::Ready as i32));
    assert!(info.is_default_version && !info.default_pinned);
    assert_eq!(resp.files_received, 8, "task.json, 2 slots, head and 4 AdapterHub files");
    assert!(resp.bytes_received > 1000);
    assert_eq!(health.check(check("sent-up")).await.unwrap().into_inner().status, ServingStatus::Serving as i32);
    // On disk under its own name, task.json rewritten to it.
    let manifest = std::fs::read_to_string(repo.path().join("tasks/sent-up/1/task.json")).unwrap();
    assert!(manifest.contains("\"name\": \"sent-up\""), "{manifest}");

    for drop in [None, Some(0), Some(1), Some(2)] {
        let disk = c.infer(infer_req("sent", None, drop, &TEXTS)).await.unwrap().into_inner();
        let up = c.infer(infer_req("sent-up", None, drop, &TEXTS)).await.unwrap().into_inner();
        assert_eq!(up.results[0].task, "sent-up");
        for (a, b) in disk.results[0].sequences.iter().zip(&up.results[0].sequences) {
            assert_eq!(a.logits, b.logits, "drop {drop:?}: uploaded task differs from the disk copy");
            assert_eq!(a.label, b.label);
        }
        assert_eq!(disk.results[0].dropped_layers, up.results[0].dropped_layers);
    }
    // Both ports list it the same way.
    let listed = c.list_tasks(adapterdrop_serve::proto::ListTasksRequest {}).await.unwrap().into_inner().tasks;
    assert!(listed.iter().any(|t| t.name == "sent-up" && t.status == TaskStatus::Ready as i32));
    assert_eq!(list(&mut admin_c).await, listed);

    // Restart (SIGTERM, then a fresh process on the same repository): still served, same answers.
    let before = c.infer(infer_req("sent-up", None, None, &TEXTS)).await.unwrap().into_inner();
    server.terminate();
    assert!(server.wait_exit(std::time::Duration::from_secs(30)).is_some_and(|s| s.success()));
    let server = TestServer::start_on(repo.path(), &[("ADAPTERDROP__REPOSITORY__POLL_INTERVAL_S", "0")]);
    let mut c = inference(&server.addr).await;
    let after = c.infer(infer_req("sent-up", None, None, &TEXTS)).await.unwrap().into_inner();
    assert_eq!(before.results[0].sequences, after.results[0].sequences);
    assert_eq!(after.results[0].version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn versions_default_pins_and_replacement() {
    let repo = temp_repo(&[]);
    let mut server = TestServer::start_on(repo.path(), &[("ADAPTERDROP__REPOSITORY__POLL_INTERVAL_S", "0")]);
    let mut a = admin(&server.admin_addr()).await;
    let mut c = inference(&server.addr).await;
    let version = |r: adapterdrop_serve::proto::InferResponse| r.results[0].version;

    // Versions count up: task@1, task@2; the default is the highest ready one.
    assert_eq!(register(&mut a, header("multi", None, false, false), &source("sent")).await.unwrap().task.unwrap().version, 1);
    assert_eq!(register(&mut a, header("multi", None, false, false), &source("topic")).await.unwrap().task.unwrap().version, 2);
    assert_eq!(version(infer(&mut c, "multi", None).await.unwrap()), 2);
    assert_eq!(version(infer(&mut c, "multi", Some(1)).await.unwrap()), 1);
    // `task@N` is the same as naming the version.
    assert_eq!(version(infer(&mut c, "multi@1", None).await.unwrap()), 1);
    assert_eq!(infer(&mut c, "multi@x", None).await.unwrap_err().code(), tonic::Code::InvalidArgument);
    assert_eq!(infer(&mut c, "multi@1", Some(2)).await.unwrap_err().code(), tonic::Code::InvalidArgument);

    // Pin version 1: requests without a version get it; persisted as tasks/multi/DEFAULT.
    let info = a.set_default_version(SetDefaultVersionRequest { name: "multi".into(), version: Some(1) }).await.unwrap().into_inner();
    assert_eq!((info.version, info.is_default_version, info.default_pinned), (1, true, true));
    assert_eq!(version(infer(&mut c, "multi", None).await.unwrap()), 1);
    assert_eq!(std::fs::read_to_string(repo.path().join("tasks/multi/DEFAULT")).unwrap().trim(), "1");

    // A new version registered with set_default takes over at once.
    let r = register(&mut a, header("multi", None, true, false), &source("sent")).await.unwrap().task.unwrap();
    assert_eq!((r.version, r.is_default_version, r.default_pinned), (3, true, true));
    assert_eq!(version(infer(&mut c, "multi", None).await.unwrap()), 3);

    // An existing version is not overwritten by accident...
    let err = register(&mut a, header("multi", Some(2), false, false), &source("sent")).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("multi@2") && err.message().contains("replace"), "{}", err.message());
    // ...but can be replaced atomically: version 2 is now a `sent` copy (2 labels, not topic's).
    let topic_labels = a.get_task(GetTaskRequest { name: "multi".into(), version: Some(2) }).await.unwrap().into_inner().labels;
    let r = register(&mut a, header("multi", Some(2), false, true), &source("sent")).await.unwrap().task.unwrap();
    assert_ne!(r.labels, topic_labels);
    assert_eq!(r.labels, vec!["negative", "positive"]);
    assert_eq!(infer(&mut c, "multi", Some(2)).await.unwrap().results[0].sequences[0].scores.len(), 2);

    // Clearing the pin: back to the highest ready version.
    let info = a.set_default_version(SetDefaultVersionRequest { name: "multi".into(), version: None }).await.unwrap().into_inner();
    assert_eq!((info.version, info.default_pinned), (3, false));
    assert!(!repo.path().join("tasks/multi/DEFAULT").exists());
    // Pinning a missing version fails and changes nothing.
    let err = a.set_default_version(SetDefaultVersionRequest { name: "multi".into(), version: Some(9) }).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::NotFound);

    // Unregistering the pinned version drops the pin; the next highest serves.
    a.set_default_version(SetDefaultVersionRequest { name: "multi".into(), version: Some(3) }).await.unwrap();
    let removed = unregister(&mut a, "multi", Some(3)).await.unwrap().removed;
    assert_eq!(removed.iter().map(|t| t.version).collect::<Vec<_>>(), vec![3]);
    assert!(!repo.path().join("tasks/multi/3").exists() && !repo.path().join("tasks/multi/DEFAULT").exists());
    assert_eq!(version(infer(&mut c, "multi", None).await.unwrap()), 2);
    assert_eq!(infer(&mut c, "multi", Some(3)).await.unwrap_err().code(), tonic::Code::NotFound);
    // A removed version's number is never handed out again (`multi@3` named other bytes): the next
    // is above every number ever assigned, recorded in tasks/multi/LAST_VERSION. An explicit
    // version raises the record too. After removal of all versions, numbering starts at 1.
    assert_eq!(register(&mut a, header("multi", None, false, false), &source("sent")).await.unwrap().task.unwrap().version, 4);
    assert_eq!(std::fs::read_to_string(repo.path().join("tasks/multi/LAST_VERSION")).unwrap().trim(), "4");
    unregister(&mut a, "multi", Some(4)).await.unwrap();
    assert_eq!(register(&mut a, header("multi", Some(7), false, false), &source("sent")).await.unwrap().task.unwrap().version, 7);
    unregister(&mut a, "multi", Some(7)).await.unwrap();
    assert_eq!(register(&mut a, header("multi", None, false, false), &source("sent")).await.unwrap().task.unwrap().version, 8);
    let removed = unregister(&mut a, "multi", None).await.unwrap().removed;
    assert_eq!(removed.len(), 3);
    assert!(!repo.path().join("tasks/multi").exists());
    assert_eq!(infer(&mut c, "multi", None).await.unwrap_err().code(), tonic::Code::NotFound);
    assert_eq!(unregister(&mut a, "multi", None).await.unwrap_err().code(), tonic::Code::NotFound);
    let bad =
        a.unregister_task(adapterdrop_serve::proto::UnregisterTaskRequest { name: "x".into(), version: None, all_versions: false }).await;
    assert_eq!(bad.unwrap_err().code(), tonic::Code::InvalidArgument);

    // The pin survives a restart.
    register(&mut a, header("multi", None, false, false), &source("sent")).await.unwrap();
    register(&mut a, header("multi", None, false, false), &source("sent")).await.unwrap();
    a.set_default_version(SetDefaultVersionRequest { name: "multi".into(), version: Some(1) }).await.unwrap();
    server.kill9();
    let server = TestServer::start_on(repo.path(), &[]);
    let mut c = inference(&server.addr).await;
    assert_eq!(version(infer(&mut c, "multi", None).await.unwrap()), 1);
    let info = c.get_task(GetTaskRequest { name: "multi".into(), version: None }).await.unwrap().into_inner();
    assert!(info.default_pinned && info.version == 1);
}

/// A version is LOADING while it is validated (held there by the `ADAPTERDROP_PAUSE_AT` test hook):
/// listed as such, refused with UNAVAILABLE when named, not SERVING on health, and the name's
/// default stays on the ready version; then it turns READY and serves.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_version_is_loading_while_validated_then_ready() {
    let repo = temp_repo(&[]);
    let server = TestServer::start_on(
        repo.path(),
        &[("ADAPTERDROP__REPOSITORY__POLL_INTERVAL_S", "0"), ("ADAPTERDROP_PAUSE_AT", "before-publish:1500")],
    );
    let mut a = admin(&server.admin_addr()).await;
    let mut c = inference(&server.addr).await;
    let mut health = HealthClient::new(server.channel().await);
    let check = |s: &str| HealthCheckRequest { service: s.into() };
    // Version 1 ready first (it also waits at the pause).
    register(&mut a, header("slow", None, false, false), &source("sent")).await.unwrap();

    let mut a2 = a.clone();
    let second = tokio::spawn(async move { register(&mut a2, header("slow", None, false, false), &source("sent")).await });
    let mut seen = None;
    for _ in 0..100 {
        let tasks = list(&mut a).await;
        if let Some(t) = tasks.iter().find(|t| t.name == "slow" && t.version == 2) {
            seen = Some(t.clone());
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let loading = seen.expect("version 2 listed while it is validated");
    assert_eq!(loading.status, TaskStatus::Loading as i32, "{loading:?}");
    let err = infer(&mut c, "slow", Some(2)).await.unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unavailable, "{err:?}");
    assert!(err.message().contains("slow@2") && err.message().contains("not ready"), "{}", err.message());
    // Meanwhile the name is served by version 1, and health says so.
    assert_eq!(infer(&mut c, "slow", None).await.unwrap().results[0].version, 1);
    assert_eq!(health.check(check("slow")).await.unwrap().into_inner().status, ServingStatus::Serving as i32);

    let done = second.await.unwrap().unwrap().task.unwrap();
    assert_eq!((done.version, done.status), (2, TaskStatus::Ready as i32));
    assert_eq!(infer(&mut c, "slow", None).await.unwrap().results[0].version, 2);
}
