//! Hostile and broken uploads cost nothing: graphs are checked from their bytes (operators, sizes,
//! external data), every graph of a task runs in the trial (fusion and adapter output graphs
//! too), the trial run is time-bounded and blocks no other change, stalled uploads are cut off,
//! version numbers never wrap.

mod admin_support;
mod common;

use std::path::Path;
use std::time::{Duration, Instant};

use adapterdrop_serve::proto::{RegisterTaskRequest, SetDefaultVersionRequest, TaskStatus};
use adapterdrop_serve::repository::graph_check::{OpPolicy, check_file};
use admin_support::graphs;
use admin_support::*;
use common::TestServer;
use tonic::Code;

fn no_poll() -> (&'static str, &'static str) {
    ("ADAPTERDROP__REPOSITORY__POLL_INTERVAL_S", "0")
}

/// Peak resident memory of a process (VmHWM), in MiB.
fn peak_rss_mib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() / 1024
}

fn with_file(task: &str, file: &str, bytes: &[u8]) -> tempfile::TempDir {
    let dir = bundle_copy(task);
    std::fs::write(dir.path().join(file), bytes).unwrap();
    dir
}

async fn refused(
    a: &mut adapterdrop_serve::proto::admin_client::AdminClient<tonic::transport::Channel>,
    name: &str,
    dir: &Path,
) -> tonic::Status {
    let started = Instant::now();
    let err = register(a, header(name, None, false, false), dir).await.expect_err(name);
    eprintln!("{name}: refused after {:?}: {}", started.elapsed(), err.message());
    assert!(started.elapsed() < Duration::from_secs(20), "{name}: refused only after {:?}", started.elapsed());
    err
}

#[test]
fn every_graph_the_exporters_write_passes_the_upload_checks() {
    let mut stack = vec![common::test_repo().join("tasks")];
    let mut checked = 0;
    while let Some(dir) = stack.pop() {
        for e in std::fs::read_dir(&dir).unwrap().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "onnx") {
                check_file(&p, &OpPolicy::default()).unwrap_or_else(|e| panic!("{e}"));
                checked += 1;
            }
        }
    }
    assert!(checked > 50, "only {checked} graphs found");
}

/// Item 8: fusion graphs and adapter output graphs are uploaded and run in the trial like slots.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fusion_uploads_run_every_graph_in_the_trial() {
    let repo = temp_repo(&[]);
    let server = TestServer::start_on(repo.path(), &[no_poll()]);
    let mut a = admin(&server.admin_addr()).await;
    let before = task_dir_listing(repo.path());
    let cases = [
        ("fusion", "fusion/layer0_ffn.onnx", graphs::nan_fusion()),
        ("fusion", "adapters/fb/layer1_ffn.onnx", graphs::nan_up()),
        ("fa-plain", "adapters/fa/layer0_ffn.onnx", graphs::nan_up()),
    ];
    for (task, file, bytes) in cases {
        let err = refused(&mut a, "broken", with_file(task, file, &bytes).path()).await;
        assert_eq!(err.code(), Code::InvalidArgument, "{task} {file}: {}", err.message());
        assert!(err.message().contains(file) && err.message().contains("non-finite"), "{task} {file}: {}", err.message());
    }
    assert_eq!(task_dir_listing(repo.path()), before, "refused uploads leave nothing");
    // The intact bundles register and serve.
    let mut c = inference(&server.addr).await;
    for task in ["fusion", "fa-plain"] {
        let name = format!("up-{task}");
        let info = register(&mut a, header(&name, None, false, false), &source(task)).await.unwrap().task.unwrap();
        assert_eq!(info.status, TaskStatus::Ready as i32, "{task}: {}", info.status_reason);
        let r = infer(&mut c, &name, None).await.unwrap();
        assert_eq!(r.results[0].sequences.len(), 2);
    }
}

/// Item 22: hostile graphs are refused from their bytes, fast, without the memory they ask for.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_graphs_and_manifests_are_refused_before_they_run() {
    let repo = temp_repo(&["sent"]);
    let server = TestServer::start_on(repo.path(), &[no_poll()]);
    let mut a = admin(&server.admin_addr()).await;
    let before = task_dir_listing(repo.path());
    let big_manifest = bundle_copy("sent");
    edit_manifest(big_manifest.path(), |m| m["description"] = serde_json::json!("x".repeat(2 << 20)));
    let cases: Vec<(&str, tempfile::TempDir, Vec<&str>)> = vec![
        ("loop", with_file("sent", "head.onnx", &graphs::loop_head()), vec!["head.onnx", "`Loop`", "may not use"]),
        ("tile", with_file("sent", "head.onnx", &graphs::tile_head()), vec!["head.onnx", "`Tile`", "may not use"]),
        ("broadcast", with_file("sent", "head.onnx", &graphs::broadcast_head()), vec!["head.onnx", "would produce", "Add"]),
        ("external", with_file("sent", "head.onnx", &graphs::external_data_head()), vec!["head.onnx", "another file"]),
        ("manifest", big_manifest, vec!["task.json", "bytes a manifest may have"]),
    ];
    for (what, dir, needles) in cases {
        let err = refused(&mut a, what, dir.path()).await;
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {}", err.message());
        for n in needles {
            assert!(err.message().contains(n), "{what}: `{n}` not in: {}", err.message());
        }
    }
    assert_eq!(task_dir_listing(repo.path()), before);
    let peak = peak_rss_mib(server.pid());
    eprintln!("peak resident memory after the hostile uploads: {peak} MiB");
    assert!(peak < 1024, "the server grew to {peak} MiB");
    infer(&mut inference(&server.addr).await, "sent", None).await.unwrap();
}

/// Item 22: a graph that runs forever (an operator an operator trusted through
/// `admin.extra_task_ops`) is stopped by the trial's time limit, and while it runs every other
/// change goes ahead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_endless_trial_run_is_stopped_and_blocks_nothing() {
    let repo = temp_repo(&["sent"]);
    let server = TestServer::start_on(
        repo.path(),
        &[no_poll(), ("ADAPTERDROP__ADMIN__EXTRA_TASK_OPS", "Loop"), ("ADAPTERDROP__ADMIN__TRIAL_TIMEOUT_MS", "3000")],
    );
    let addr = server.admin_addr();
    let mut a = admin(&addr).await;
    let endless = with_file("sent", "head.onnx", &graphs::loop_head());
    let path = endless.path().to_path_buf();
    let started = Instant::now();
    let spin = tokio::spawn(async move { register(&mut admin(&addr).await, header("spin", None, false, false), &path).await });
    // Wait until it is in its trial run (listed LOADING).
    let mut loading = false;
    for _ in 0..200 {
        loading = list(&mut a).await.iter().any(|t| t.name == "spin" && t.status == TaskStatus::Loading as i32);
        if loading {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(loading, "the endless upload never showed as LOADING");
    // Other changes do not wait for it.
    let others = async {
        register(&mut a, header("other", None, false, false), &source("sent")).await.unwrap();
        a.set_default_version(SetDefaultVersionRequest { name: "sent".into(), version: Some(1) }).await.unwrap();
        unregister(&mut a, "other", None).await.unwrap();
    };
    tokio::time::timeout(Duration::from_secs(20), others).await.expect("other changes waited for the endless trial run");
    let others_done = started.elapsed();
    assert!(list(&mut a).await.iter().any(|t| t.name == "spin" && t.status == TaskStatus::Loading as i32), "others finished first");

    let err =
        tokio::time::timeout(Duration::from_secs(30), spin).await.expect("the endless trial run was never stopped").unwrap().unwrap_err();
    let stopped = started.elapsed();
    eprintln!("other changes done after {others_done:?}; endless trial stopped after {stopped:?}");
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("head.onnx") && err.message().contains("admin.trial_timeout_ms"), "{}", err.message());
    assert!(stopped < Duration::from_secs(15), "stopped only after {stopped:?}");
    assert!(!repo.path().join("tasks/spin").exists());
    assert!(staging_dirs(repo.path()).is_empty());
    assert!(list(&mut a).await.iter().all(|t| t.name != "spin"));
}

/// Item 25: an upload that stops sending is cut off and its staging directory removed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_upload_is_cut_off_and_its_staging_removed() {
    let repo = temp_repo(&[]);
    let server = TestServer::start_on(repo.path(), &[no_poll(), ("ADAPTERDROP__ADMIN__UPLOAD_IDLE_TIMEOUT_S", "1")]);
    let mut a = admin(&server.admin_addr()).await;
    let all = messages(header("stall", None, false, false), &source("sent"), 4096);
    let (tx, rx) = tokio::sync::mpsc::channel::<RegisterTaskRequest>(all.len());
    for m in &all[..all.len() / 2] {
        tx.send(m.clone()).await.unwrap();
    }
    let started = Instant::now();
    let upload = a.register_task(tokio_stream::wrappers::ReceiverStream::new(rx));
    // The sender stays open: the client is alive but sends nothing more.
    let err = tokio::time::timeout(Duration::from_secs(15), upload).await.expect("the stalled upload was never cut off").unwrap_err();
    eprintln!("stalled upload cut off after {:?}", started.elapsed());
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    assert!(err.message().contains("admin.upload_idle_timeout_s"), "{}", err.message());
    assert!(staging_dirs(repo.path()).is_empty(), "staging directory left: {:?}", staging_dirs(repo.path()));
    drop(tx);
    register(&mut a, header("stall", None, false, false), &source("sent")).await.unwrap();

    // A client that keeps trickling is cut off by the whole-upload limit.
    let server = TestServer::start_on(repo.path(), &[no_poll(), ("ADAPTERDROP__ADMIN__UPLOAD_TIMEOUT_S", "1")]);
    let mut a = admin(&server.admin_addr()).await;
    let all = messages(header("trickle", None, false, false), &source("sent"), 256);
    let trickle = async_stream(all, Duration::from_millis(100));
    let started = Instant::now();
    let err = tokio::time::timeout(Duration::from_secs(15), a.register_task(trickle)).await.expect("never cut off").unwrap_err();
    eprintln!("trickling upload cut off after {:?}", started.elapsed());
    assert_eq!(err.code(), Code::DeadlineExceeded, "{}", err.message());
    assert!(err.message().contains("admin.upload_timeout_s"), "{}", err.message());
    assert!(staging_dirs(repo.path()).is_empty());
}

/// The messages, one every `every`.
fn async_stream(msgs: Vec<RegisterTaskRequest>, every: Duration) -> tokio_stream::wrappers::ReceiverStream<RegisterTaskRequest> {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        for m in msgs {
            tokio::time::sleep(every).await;
            if tx.send(m).await.is_err() {
                break;
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Item 20: version numbers never wrap to 0; the last ones are refused with a clear message.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn version_numbers_never_overflow() {
    let repo = temp_repo(&[]);
    let server = TestServer::start_on(repo.path(), &[no_poll()]);
    let mut a = admin(&server.admin_addr()).await;
    let err = register(&mut a, header("vtest", Some(u32::MAX), false, false), &source("sent")).await.unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument, "{}", err.message());
    assert!(err.message().contains("too large") && err.message().contains("2147483647"), "{}", err.message());
    let top = i32::MAX as u32;
    register(&mut a, header("vtest", Some(top), false, false), &source("sent")).await.unwrap();
    let err = register(&mut a, header("vtest", None, false, false), &source("sent")).await.unwrap_err();
    assert_eq!(err.code(), Code::FailedPrecondition, "{}", err.message());
    assert!(err.message().contains("give a free version explicitly"), "{}", err.message());
    // An explicit number still works, and removing the top one does not free its number...
    assert_eq!(register(&mut a, header("vtest", Some(5), false, false), &source("sent")).await.unwrap().task.unwrap().version, 5);
    unregister(&mut a, "vtest", Some(top)).await.unwrap();
    assert_eq!(register(&mut a, header("vtest", None, false, false), &source("sent")).await.unwrap_err().code(), Code::FailedPrecondition);
    // ...but removing the whole task starts numbering again.
    unregister(&mut a, "vtest", None).await.unwrap();
    assert_eq!(register(&mut a, header("vtest", None, false, false), &source("sent")).await.unwrap().task.unwrap().version, 1);
}
