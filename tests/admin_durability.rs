//! Crash safety and draining: kill -9 in the middle of an upload or at random moments of repeated
//! registrations leaves old or new task versions, never half of one, and start-up removes the
//! leftovers; requests in flight on an unregistered version complete.

mod admin_support;
mod common;

use std::time::Duration;

use adapterdrop_serve::proto::{RegisterTaskRequest, TaskStatus};
use admin_support::*;
use common::TestServer;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_upload_leaves_nothing_after_restart() {
    let repo = temp_repo(&["sent"]);
    let mut server = TestServer::start_on(repo.path(), &[]);
    let mut a = admin(&server.admin_addr()).await;
    let before = task_dir_listing(repo.path());
    let all = messages(header("half", None, false, false), &source("sent"), 4096);
    let (tx, rx) = tokio::sync::mpsc::channel::<RegisterTaskRequest>(8);
    let upload = tokio::spawn(async move { register_msgs_stream(&mut a, rx).await });
    // Send about half of the bundle, then stall as a slow client would.
    for m in &all[..all.len() / 2] {
        tx.send(m.clone()).await.unwrap();
    }
    let staged = wait_until(|| {
        staging_dirs(repo.path())
            .iter()
            .any(|d| repo.path().join("tasks").join(d).join("upload").read_dir().is_ok_and(|mut r| r.next().is_some()))
    })
    .await;
    assert!(staged, "the upload never reached the staging directory");
    server.kill9();
    let outcome = upload.await.unwrap();
    assert!(outcome.is_err(), "the upload cannot succeed: {outcome:?}");
    assert_eq!(staging_dirs(repo.path()).len(), 1, "the killed upload's staging directory is still there");

    let server = TestServer::start_on(repo.path(), &[]);
    assert!(staging_dirs(repo.path()).is_empty(), "start-up removes leftovers");
    assert_eq!(task_dir_listing(repo.path()), before);
    let mut c = inference(&server.addr).await;
    assert_eq!(infer(&mut c, "half", None).await.unwrap_err().code(), tonic::Code::NotFound);
    infer(&mut c, "sent", None).await.unwrap();
}

async fn register_msgs_stream(
    a: &mut adapterdrop_serve::proto::admin_client::AdminClient<tonic::transport::Channel>,
    rx: tokio::sync::mpsc::Receiver<RegisterTaskRequest>,
) -> Result<(), tonic::Status> {
    a.register_task(tokio_stream::wrappers::ReceiverStream::new(rx)).await.map(|_| ())
}

async fn wait_until(mut f: impl FnMut() -> bool) -> bool {
    for _ in 0..200 {
        if f() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

/// What the churn client was told: versions acknowledged as registered (and not acknowledged
/// as removed since), and versions whose removal was asked for but not answered.
#[derive(Default)]
struct Acked {
    present: std::collections::BTreeSet<u32>,
    maybe_removed: std::collections::BTreeSet<u32>,
}

/// Registrations, pins and removals in a loop until the server dies.
async fn churn(addr: String, acked: std::sync::Arc<std::sync::Mutex<Acked>>, round: usize) {
    let mut a = admin(&addr).await;
    for i in round.. {
        let bundle = source(if i % 3 == 0 { "topic" } else { "sent" });
        let Ok(r) = register(&mut a, header("churn", None, i % 2 == 0, false), &bundle).await else { break };
        let v = r.task.unwrap().version;
        acked.lock().unwrap().present.insert(v);
        if i % 4 == 3 {
            acked.lock().unwrap().maybe_removed.insert(v);
            if unregister(&mut a, "churn", Some(v)).await.is_err() {
                break;
            }
            let mut acked = acked.lock().unwrap();
            acked.present.remove(&v);
            acked.maybe_removed.remove(&v);
        }
    }
}

/// kill -9 at 20 random moments of registrations, pins and removals (the seed is printed; set
/// KILL9_SEED to replay): after each restart no acknowledged version is lost, every version on
/// disk loads READY and serves (never half of one), and the leftovers are gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_of_registrations_never_leaves_half_a_task() {
    const ROUNDS: usize = 20;
    let repo = temp_repo(&["sent"]);
    let no_poll = ("ADAPTERDROP__REPOSITORY__POLL_INTERVAL_S", "0");
    let seed: u64 = std::env::var("KILL9_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64);
    eprintln!("KILL9_SEED={seed}");
    let mut rng = seed | 1;
    let mut next_delay = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng % 600
    };
    let acked = std::sync::Arc::new(std::sync::Mutex::new(Acked::default()));
    let (started, mut lost, mut half, mut survived) = (std::time::Instant::now(), 0, 0, 0);
    let mut server = TestServer::start_on(repo.path(), &[no_poll]);
    let mut admin_addr = server.admin_addr();
    for round in 0..ROUNDS {
        let delay_ms = next_delay();
        let work = tokio::spawn(churn(admin_addr.clone(), acked.clone(), round));
        tokio::time::sleep(Duration::from_millis(delay_ms)).await;
        server.kill9();
        let _ = work.await;

        // The restarted server checks this round and churns in the next.
        server = TestServer::start_on(repo.path(), &[no_poll]);
        admin_addr = server.admin_addr();
        assert!(staging_dirs(repo.path()).is_empty(), "round {round}: leftovers not cleaned");
        let mut a = admin(&admin_addr).await;
        let churned: Vec<_> = list(&mut a).await.into_iter().filter(|t| t.name == "churn").collect();
        let listed: std::collections::BTreeSet<u32> = churned.iter().map(|t| t.version).collect();
        let missing: Vec<u32> = {
            let mut seen = acked.lock().unwrap();
            let missing = seen.present.iter().filter(|v| !listed.contains(v) && !seen.maybe_removed.contains(v)).copied().collect();
            // Versions the client could not hear about either way are settled by what the disk says.
            seen.present = listed.clone();
            seen.maybe_removed.clear();
            missing
        };
        lost += missing.len();
        let mut c = inference(&server.addr).await;
        for t in &churned {
            let ready = t.status == TaskStatus::Ready as i32;
            let serves = infer(&mut c, "churn", Some(t.version)).await.is_ok();
            half += usize::from(!ready || !serves);
        }
        let on_disk =
            std::fs::read_dir(repo.path().join("tasks/churn")).map(|r| r.flatten().filter(|e| e.path().is_dir()).count()).unwrap_or(0);
        assert_eq!(on_disk, churned.len(), "round {round}: directories on disk vs versions listed");
        if !churned.is_empty() {
            infer(&mut c, "churn", None).await.unwrap_or_else(|e| panic!("round {round}: {e}"));
        }
        assert!(missing.is_empty(), "round {round}: acknowledged versions lost: {missing:?}");
        survived = churned.len();
        // Keep the repository small, so every restart loads about as much.
        for v in listed.iter().rev().skip(4) {
            unregister(&mut a, "churn", Some(*v)).await.unwrap();
            acked.lock().unwrap().present.remove(v);
        }
        eprintln!("round {round}: killed after {delay_ms} ms; {} churn versions on disk, all ready and serving", churned.len());
    }
    assert_eq!(half, 0, "versions that were listed but not ready or not serving");
    eprintln!(
        "kill -9 runs: {ROUNDS}, acknowledged versions lost: {lost}, half versions served: {half}, versions at the end: {survived}, {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_in_flight_on_an_unregistered_version_complete() {
    let repo = temp_repo(&["sent"]);
    // A long batching window holds requests in the queue while the version is removed.
    let server = TestServer::start_on(repo.path(), &[("ADAPTERDROP__BATCHING__MAX_BATCH_DELAY_MS", "1500")]);
    let mut a = admin(&server.admin_addr()).await;
    register(&mut a, header("leaving", None, false, false), &source("sent")).await.unwrap();
    let mut pending = Vec::new();
    for _ in 0..4 {
        let mut c = inference(&server.addr).await;
        pending.push(tokio::spawn(async move { infer(&mut c, "leaving", None).await }));
    }
    tokio::time::sleep(Duration::from_millis(400)).await;
    let removed = unregister(&mut a, "leaving", None).await.unwrap().removed;
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].status, TaskStatus::Draining as i32, "requests still hold it");
    assert!(!repo.path().join("tasks/leaving").exists(), "gone from disk at once");
    let listed: Vec<_> = list(&mut a).await.into_iter().filter(|t| t.name == "leaving").collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0].status, TaskStatus::Draining as i32);
    let mut c = inference(&server.addr).await;
    assert_eq!(infer(&mut c, "leaving", None).await.unwrap_err().code(), tonic::Code::NotFound, "no new requests");
    // Health forgets the name at once (NOT_SERVING was sent to watchers first).
    let mut health = HealthClient::new(server.channel().await);
    let status = health.check(HealthCheckRequest { service: "leaving".into() }).await;
    assert_eq!(status.unwrap_err().code(), tonic::Code::NotFound);
    for p in pending {
        let r = p.await.unwrap().expect("in-flight request completes");
        assert_eq!((r.results[0].task.as_str(), r.results[0].version), ("leaving", 1));
    }
    // Drained: no longer listed at all.
    assert!(list(&mut a).await.iter().all(|t| t.name != "leaving"));
}

/// Deterministic crashes at the steps of a commit (`ADAPTERDROP_CRASH_AT` aborts the process there):
/// before the publishing rename the old state survives, after it the new one, never a mix.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_at_each_commit_step_leaves_the_old_or_the_new_version() {
    let repo = temp_repo(&["sent"]);
    let no_poll = ("ADAPTERDROP__REPOSITORY__POLL_INTERVAL_S", "0");
    let crash = |point: &'static str| TestServer::start_on(repo.path(), &[no_poll, ("ADAPTERDROP_CRASH_AT", point)]);
    let restart = || TestServer::start_on(repo.path(), &[no_poll]);
    let versions = |repo: &std::path::Path| -> Vec<u32> {
        let mut v: Vec<u32> = std::fs::read_dir(repo.join("tasks/crash"))
            .map(|r| r.flatten().filter_map(|e| e.file_name().to_str()?.parse().ok()).collect())
            .unwrap_or_default();
        v.sort();
        v
    };

    // Validated and fsynced, killed before the rename: the version never existed.
    let mut s = crash("before-publish");
    let mut a = admin(&s.admin_addr()).await;
    assert!(register(&mut a, header("crash", None, true, false), &source("sent")).await.is_err());
    assert!(s.wait_exit(Duration::from_secs(10)).is_some(), "aborted");
    assert_eq!(staging_dirs(repo.path()).len(), 1, "the fully staged version is left in staging");
    let s = restart();
    assert!(staging_dirs(repo.path()).is_empty());
    assert!(versions(repo.path()).is_empty());
    let mut c = inference(&s.addr).await;
    assert_eq!(infer(&mut c, "crash", None).await.unwrap_err().code(), tonic::Code::NotFound);
    drop(s);

    // Killed right after the rename (before serving it and before the DEFAULT pin): the version
    // is complete and served after the restart, just not pinned.
    let mut s = crash("after-publish");
    let mut a = admin(&s.admin_addr()).await;
    assert!(register(&mut a, header("crash", None, true, false), &source("sent")).await.is_err());
    assert!(s.wait_exit(Duration::from_secs(10)).is_some(), "aborted");
    let s = restart();
    assert!(staging_dirs(repo.path()).is_empty());
    assert_eq!(versions(repo.path()), vec![1]);
    assert!(!repo.path().join("tasks/crash/DEFAULT").exists());
    let mut c = inference(&s.addr).await;
    assert_eq!(infer(&mut c, "crash", None).await.unwrap().results[0].version, 1);
    // A replacement killed after the atomic swap: the new content is in place, the old one is
    // only in staging (cleaned at the next start).
    let mut a = admin(&s.admin_addr()).await;
    register(&mut a, header("crash", None, false, false), &source("sent")).await.unwrap();
    drop(s);
    let mut s = crash("after-publish");
    let mut a = admin(&s.admin_addr()).await;
    assert!(register(&mut a, header("crash", Some(2), false, true), &source("topic")).await.is_err());
    assert!(s.wait_exit(Duration::from_secs(10)).is_some(), "aborted");
    let s = restart();
    assert!(staging_dirs(repo.path()).is_empty());
    let mut a = admin(&s.admin_addr()).await;
    let info = a.get_task(adapterdrop_serve::proto::GetTaskRequest { name: "crash".into(), version: Some(2) }).await.unwrap().into_inner();
    let topic_labels: Vec<String> = serde_json::from_str::<serde_json::Value>(
        &std::fs::read_to_string(source("topic").join("task.json")).unwrap(),
    )
    .unwrap()["head"]["labels"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| l.as_str().unwrap().to_string())
        .collect();
    assert_eq!((info.status, info.labels), (TaskStatus::Ready as i32, topic_labels), "the replacement won");
    drop(s);

    // Unregister killed after the version left tasks/ but before it was deleted: gone for good.
    let mut s = crash("after-retire");
    let mut a = admin(&s.admin_addr()).await;
    assert!(unregister(&mut a, "crash", Some(1)).await.is_err());
    assert!(s.wait_exit(Duration::from_secs(10)).is_some(), "aborted");
    let s = restart();
    assert!(staging_dirs(repo.path()).is_empty());
    assert_eq!(versions(repo.path()), vec![2]);
    let mut c = inference(&s.addr).await;
    assert_eq!(infer(&mut c, "crash", None).await.unwrap().results[0].version, 2);
    drop(s);

    // A version published just before a crash is not in LAST_VERSION yet; removing it raises the
    // record first, so its number is not handed out again.
    let last = || std::fs::read_to_string(repo.path().join("tasks/crash/LAST_VERSION")).unwrap().trim().to_string();
    let mut s = crash("after-publish");
    let mut a = admin(&s.admin_addr()).await;
    assert!(register(&mut a, header("crash", None, false, false), &source("sent")).await.is_err());
    assert!(s.wait_exit(Duration::from_secs(10)).is_some(), "aborted");
    assert_eq!(last(), "2");
    let s = restart();
    assert_eq!(versions(repo.path()), vec![2, 3]);
    let mut a = admin(&s.admin_addr()).await;
    unregister(&mut a, "crash", Some(3)).await.unwrap();
    assert_eq!(last(), "3");
    assert_eq!(register(&mut a, header("crash", None, false, false), &source("sent")).await.unwrap().task.unwrap().version, 4);
}

/// Item 21: a crash right after a pinned version is retired never leaves a pin naming a missing
/// version (the pin goes first), and a stale pin an older release left is cleared at start-up, so
/// a later upload of that number does not silently become the default.
#[cfg(feature = "fault-injection")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crash_after_retiring_the_pinned_version_leaves_no_stale_pin() {
    let repo = temp_repo(&[]);
    let no_poll = ("ADAPTERDROP__REPOSITORY__POLL_INTERVAL_S", "0");
    let default_file = repo.path().join("tasks/pin/DEFAULT");
    let s = TestServer::start_on(repo.path(), &[no_poll]);
    let mut a = admin(&s.admin_addr()).await;
    for v in 1..=3 {
        register(&mut a, header("pin", Some(v), v == 1, false), &source("sent")).await.unwrap();
    }
    assert_eq!(std::fs::read_to_string(&default_file).unwrap().trim(), "1");
    drop(s);

    let mut s = TestServer::start_on(repo.path(), &[no_poll, ("ADAPTERDROP_CRASH_AT", "after-retire")]);
    let mut a = admin(&s.admin_addr()).await;
    assert!(unregister(&mut a, "pin", Some(1)).await.is_err());
    assert!(s.wait_exit(Duration::from_secs(10)).is_some(), "aborted");
    assert!(!default_file.exists(), "the pin of the retired version survived the crash");
    let check = |what: &'static str| {
        let repo = repo.path().to_path_buf();
        async move {
            let s = TestServer::start_on(&repo, &[no_poll]);
            let mut a = admin(&s.admin_addr()).await;
            let listed: Vec<_> = list(&mut a).await.into_iter().filter(|t| t.name == "pin").collect();
            assert!(listed.iter().all(|t| !t.default_pinned), "{what}: listed as pinned: {listed:?}");
            assert_eq!(listed.iter().map(|t| t.version).collect::<Vec<_>>(), vec![2, 3], "{what}");
            // Version 1 uploaded again is not the default: the highest ready version is.
            register(&mut a, header("pin", Some(1), false, false), &source("sent")).await.unwrap();
            let mut c = inference(&s.addr).await;
            assert_eq!(infer(&mut c, "pin", None).await.unwrap().results[0].version, 3, "{what}");
            assert!(!repo.join("tasks/pin/DEFAULT").exists(), "{what}");
            unregister(&mut a, "pin", Some(1)).await.unwrap();
        }
    };
    check("after the crash").await;
    // A pin naming a missing version, as an older release could leave it: cleared at start-up.
    std::fs::write(&default_file, "1\n").unwrap();
    check("stale pin on disk").await;
}
