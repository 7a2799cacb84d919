//! Start-up: a clear failure without the right ONNX Runtime; broken tasks refused by name while
//! healthy ones serve; per-task health and reflection.

mod common;

use std::path::Path;

use adapterdrop_serve::proto::{InferRequest, ListTasksRequest, TaskRef, TaskStatus, Texts, infer_request::Inputs};
use common::{TestServer, copy_dir, ort_library, run_to_exit, test_repo};
use tonic_health::pb::{HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient};

#[test]
fn missing_or_wrong_onnx_runtime_fails_with_a_clear_message() {
    let repo = test_repo();
    let repo = repo.to_str().unwrap();
    let (ok, out) = run_to_exit(&[("ADAPTERDROP__REPOSITORY__PATH", repo)]);
    assert!(!ok && out.contains("ONNX Runtime library not found") && out.contains("ORT_DYLIB_PATH"), "{out}");
    let (ok, out) = run_to_exit(&[("ADAPTERDROP__REPOSITORY__PATH", repo), ("ORT_DYLIB_PATH", "/nonexistent/libonnxruntime.so")]);
    assert!(!ok && out.contains("/nonexistent/libonnxruntime.so does not exist"), "{out}");
    // Any shared library that is not ONNX Runtime 1.31 is refused before use.
    let libc = ["/lib/x86_64-linux-gnu/libc.so.6", "/usr/lib/x86_64-linux-gnu/libc.so.6", "/lib/aarch64-linux-gnu/libc.so.6"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("libc");
    let (ok, out) = run_to_exit(&[("ADAPTERDROP__REPOSITORY__PATH", repo), ("ADAPTERDROP__RUNTIME__LIBRARY_PATH", libc)]);
    assert!(!ok && out.contains("not ONNX Runtime"), "{out}");
    let (ok, out) =
        run_to_exit(&[("ORT_DYLIB_PATH", ort_library().to_str().unwrap()), ("ADAPTERDROP__REPOSITORY__PATH", "/nonexistent/repo")]);
    assert!(!ok && out.contains("does not exist"), "{out}");
}

#[tokio::test]
async fn broken_tasks_are_refused_by_file_and_healthy_ones_still_serve() {
    let dir = tempfile::tempdir().unwrap();
    let repo = dir.path();
    copy_dir(&test_repo().join("backbones"), &repo.join("backbones"));
    std::fs::remove_dir_all(repo.join("backbones/minilm")).ok();
    for t in ["sent", "topic", "score", "rand-pfeiffer"] {
        copy_dir(&test_repo().join("tasks").join(t), &repo.join("tasks").join(t));
    }
    // topic: a slot graph that is not ONNX. score: a missing head. rand-pfeiffer@2: a slot from a
    // backbone of another hidden size (sent's 32-wide slot on a 32-wide backbone is fine, so take
    // the wrong-width graph from the test repo's MiniLM task).
    std::fs::write(repo.join("tasks/topic/1/slots/layer1_ffn.onnx"), b"not an onnx file").unwrap();
    std::fs::remove_file(repo.join("tasks/score/1/head.onnx")).unwrap();
    copy_dir(&repo.join("tasks/rand-pfeiffer/1"), &repo.join("tasks/rand-pfeiffer/2"));
    let manifest = repo.join("tasks/rand-pfeiffer/2/task.json");
    std::fs::write(&manifest, std::fs::read_to_string(&manifest).unwrap().replace("\"version\": 1", "\"version\": 2")).unwrap();
    std::fs::copy(
        test_repo().join("tasks/mini-pfeiffer/1/slots/layer0_ffn.onnx"),
        repo.join("tasks/rand-pfeiffer/2/slots/layer0_ffn.onnx"),
    )
    .unwrap();

    let server = TestServer::start_on(repo, &[]);
    let mut c = server.client().await;
    let list = c.list_tasks(ListTasksRequest {}).await.unwrap().into_inner().tasks;
    let status = |name: &str, v: u32| list.iter().find(|t| t.name == name && t.version == v).unwrap_or_else(|| panic!("{name}@{v} listed"));
    assert_eq!(status("sent", 1).status, TaskStatus::Ready as i32);
    let topic = status("topic", 1);
    assert_eq!(topic.status, TaskStatus::Failed as i32);
    assert!(
        topic.status_reason.contains("layer1_ffn.onnx") && topic.status_reason.contains("not a loadable ONNX graph"),
        "{}",
        topic.status_reason
    );
    let score = status("score", 1);
    assert!(score.status_reason.contains("head.onnx") && score.status_reason.contains("missing"), "{}", score.status_reason);
    let wide = status("rand-pfeiffer", 2);
    assert!(wide.status_reason.contains("layer0_ffn.onnx") && wide.status_reason.contains("expected 32"), "{}", wide.status_reason);
    // The healthy version stays the default.
    assert!(status("rand-pfeiffer", 1).is_default_version);

    let infer = |task: &str| InferRequest {
        tasks: vec![TaskRef { name: task.into(), ..Default::default() }],
        inputs: Some(Inputs::Texts(Texts { texts: vec!["fine".into()] })),
        truncate: false,
        return_fusion_weights: false,
        id: String::new(),
        ..Default::default()
    };
    c.infer(infer("sent")).await.expect("healthy task serves");
    c.infer(infer("rand-pfeiffer")).await.expect("default version serves");
    let err = c.infer(infer("topic")).await.expect_err("failed task");
    assert_eq!(err.code(), tonic::Code::FailedPrecondition);
    assert!(err.message().contains("layer1_ffn.onnx"), "{}", err.message());

    let mut health = HealthClient::new(server.channel().await);
    let check = |s: &str| HealthCheckRequest { service: s.into() };
    assert_eq!(health.check(check("")).await.unwrap().into_inner().status, ServingStatus::Serving as i32);
    assert_eq!(health.check(check("sent")).await.unwrap().into_inner().status, ServingStatus::Serving as i32);
    assert_eq!(health.check(check("topic")).await.unwrap().into_inner().status, ServingStatus::NotServing as i32);
    // A failed newer version does not take down the ready default version.
    assert_eq!(health.check(check("rand-pfeiffer")).await.unwrap().into_inner().status, ServingStatus::Serving as i32);
    assert_eq!(health.check(check("score")).await.unwrap().into_inner().status, ServingStatus::NotServing as i32);
    assert_eq!(health.check(check("adapterdrop.v1.Inference")).await.unwrap().into_inner().status, ServingStatus::Serving as i32);
    assert_eq!(health.check(check("unknown")).await.unwrap_err().code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn runtime_library_path_alone_is_enough() {
    // No ORT_DYLIB_PATH: the library comes from the config key only (as in a container that sets
    // runtime.library_path in its config file).
    let lib = ort_library();
    let server = TestServer::start(&[("ORT_DYLIB_PATH", ""), ("ADAPTERDROP__RUNTIME__LIBRARY_PATH", lib.to_str().unwrap())]);
    let mut c = server.client().await;
    let req = InferRequest {
        tasks: vec![TaskRef { name: "sent".into(), ..Default::default() }],
        inputs: Some(Inputs::Texts(Texts { texts: vec!["fine".into()] })),
        ..Default::default()
    };
    assert_eq!(c.infer(req).await.expect("served").into_inner().results.len(), 1);
}
