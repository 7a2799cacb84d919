//! Every bad upload is refused with INVALID_ARGUMENT or FAILED_PRECONDITION naming the file and the
//! problem, and leaves the repository exactly as it was; bearer tokens guard both ports.

mod admin_support;
mod common;

use std::path::Path;

use adapterdrop_serve::proto::ListTasksRequest;
use admin_support::*;
use common::TestServer;
use tonic::Code;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_bundles_are_refused_by_file_and_nothing_is_written() {
    let repo = temp_repo(&["sent"]);
    let server = TestServer::start_on(repo.path(), &[("ADAPTERDROP__ADMIN__MAX_BUNDLE_BYTES", "200000")]);
    let mut a = admin(&server.admin_addr()).await;
    let before = task_dir_listing(repo.path());
    let top = |p: &Path| {
        let mut v: Vec<_> = std::fs::read_dir(p).unwrap().map(|e| e.unwrap().file_name()).collect();
        v.sort();
        v
    };
    let top_before = top(repo.path());

    let mut cases: Vec<(&str, Vec<adapterdrop_serve::proto::RegisterTaskRequest>, Code, Vec<&str>)> = Vec::new();
    // Path traversal and bad names, in the header...
    for name in ["../evil", "a/b", "/abs", "..", ".hidden", "", "a..b", "tab\tname"] {
        cases.push((
            "bad name",
            messages(header(name, None, false, false), &source("sent"), 1 << 20),
            Code::InvalidArgument,
            vec!["is not valid"],
        ));
    }
    let long = "x".repeat(65);
    cases.push((
        "long name",
        messages(header(&long, None, false, false), &source("sent"), 1 << 20),
        Code::InvalidArgument,
        vec!["is not valid"],
    ));
    // ...and in file paths.
    for path in ["../../evil.onnx", "/tmp/evil.onnx", "slots/../../../evil.onnx", ".task.json", "slots//x.onnx"] {
        let mut m = messages(header("ok-name", None, false, false), &source("sent"), 1 << 20);
        m.push(chunk_msg(path, b"data"));
        cases.push(("bad path", m, Code::InvalidArgument, vec!["is not allowed"]));
    }
    // Corrupt ONNX.
    let corrupt = bundle_copy("sent");
    std::fs::write(corrupt.path().join("slots/layer1_ffn.onnx"), b"\x08\x07garbage, not a protobuf").unwrap();
    cases.push((
        "corrupt onnx",
        messages(header("corrupt", None, false, false), corrupt.path(), 1 << 20),
        Code::InvalidArgument,
        vec!["slots/layer1_ffn.onnx", "not a loadable ONNX graph"],
    ));
    // Wrong hidden size: MiniLM's 384-wide adapter on the 32-wide bert-tiny.
    let wide = bundle_copy("sent");
    std::fs::copy(source("mini-pfeiffer").join("slots/layer0_ffn.onnx"), wide.path().join("slots/layer0_ffn.onnx")).unwrap();
    cases.push((
        "hidden size",
        messages(header("wide", None, false, false), wide.path(), 1 << 20),
        Code::InvalidArgument,
        vec!["slots/layer0_ffn.onnx", "expected 32", "hidden size"],
    ));
    // Drop config that does not match the adapters present: sent-layers has no layer-1 slot.
    let drop = bundle_copy("sent-layers");
    edit_manifest(drop.path(), |m| m["drop"] = serde_json::json!({"drop_first": 0}));
    cases.push((
        "drop config",
        messages(header("drop", None, false, false), drop.path(), 1 << 20),
        Code::InvalidArgument,
        vec!["task.json", "layer 1 is not dropped"],
    ));
    let range = bundle_copy("sent");
    edit_manifest(range.path(), |m| m["drop"] = serde_json::json!({"robust": {"default": 0, "min": 0, "max": 5}}));
    cases.push((
        "drop range",
        messages(header("range", None, false, false), range.path(), 1 << 20),
        Code::InvalidArgument,
        vec!["task.json", "robust range"],
    ));
    // Slot at a layer the backbone does not have.
    let layer = bundle_copy("sent");
    edit_manifest(layer.path(), |m| m["slots"][1]["layer"] = serde_json::json!(7));
    cases.push((
        "layer index",
        messages(header("layer", None, false, false), layer.path(), 1 << 20),
        Code::InvalidArgument,
        vec!["task.json", "layer 7"],
    ));
    // Head label count differs from the head's width.
    let labels = bundle_copy("sent");
    edit_manifest(labels.path(), |m| m["head"]["labels"] = serde_json::json!(["a", "b", "c"]));
    cases.push((
        "labels",
        messages(header("labels", None, false, false), labels.path(), 1 << 20),
        Code::InvalidArgument,
        vec!["head.onnx", "expected 3"],
    ));
    // Unknown backbone: a state of this server, not of the bundle.
    let bb = bundle_copy("sent");
    edit_manifest(bb.path(), |m| m["backbone"] = serde_json::json!("bert-huge"));
    cases.push((
        "backbone",
        messages(header("bb", None, false, false), bb.path(), 1 << 20),
        Code::FailedPrecondition,
        vec!["task.json", "bert-huge", "not loaded"],
    ));
    // Missing head file, missing manifest, unreferenced extra file, invalid JSON.
    let nohead = bundle_copy("sent");
    std::fs::remove_file(nohead.path().join("head.onnx")).unwrap();
    cases.push((
        "no head",
        messages(header("nohead", None, false, false), nohead.path(), 1 << 20),
        Code::InvalidArgument,
        vec!["head.onnx", "missing"],
    ));
    let nomanifest = bundle_copy("sent");
    std::fs::remove_file(nomanifest.path().join("task.json")).unwrap();
    cases.push((
        "no manifest",
        messages(header("nomanifest", None, false, false), nomanifest.path(), 1 << 20),
        Code::InvalidArgument,
        vec!["task.json", "missing"],
    ));
    let extra = bundle_copy("sent");
    std::fs::write(extra.path().join("notes.txt"), b"hello").unwrap();
    cases.push((
        "extra file",
        messages(header("extra", None, false, false), extra.path(), 1 << 20),
        Code::InvalidArgument,
        vec!["notes.txt", "not referenced"],
    ));
    let json = bundle_copy("sent");
    std::fs::write(json.path().join("task.json"), b"{ not json").unwrap();
    cases.push((
        "bad json",
        messages(header("json", None, false, false), json.path(), 1 << 20),
        Code::InvalidArgument,
        vec!["task.json", "invalid JSON"],
    ));
    // Too big (admin.max_bundle_bytes = 200000 here).
    let big = bundle_copy("sent");
    std::fs::write(big.path().join("head.onnx"), vec![0u8; 250_000]).unwrap();
    cases.push((
        "too big",
        messages(header("big", None, false, false), big.path(), 64 << 10),
        Code::InvalidArgument,
        vec!["head.onnx", "admin.max_bundle_bytes"],
    ));
    // Protocol misuse: no header first, two headers, a file sent twice, version 0, nothing at all.
    let m = messages(header("proto", None, false, false), &source("sent"), 1 << 20);
    cases.push(("chunk first", m[1..].to_vec(), Code::InvalidArgument, vec!["first message must be a `header`"]));
    let mut two = m.clone();
    two.push(m[0].clone());
    cases.push(("two headers", two, Code::InvalidArgument, vec!["second `header`"]));
    let mut twice = m.clone();
    twice.push(m[1].clone());
    cases.push(("twice", twice, Code::InvalidArgument, vec!["sent twice"]));
    cases.push((
        "version 0",
        messages(header("v0", Some(0), false, false), &source("sent"), 1 << 20),
        Code::InvalidArgument,
        vec!["positive"],
    ));
    cases.push(("empty", vec![], Code::InvalidArgument, vec!["empty upload"]));

    for (what, msgs, code, needles) in cases {
        let err = register_msgs(&mut a, msgs, None).await.expect_err(what);
        assert_eq!(err.code(), code, "{what}: {}", err.message());
        for n in needles {
            assert!(err.message().contains(n), "{what}: `{n}` not in: {}", err.message());
        }
        // Messages name files relative to the bundle, never the server's staging paths.
        assert!(!err.message().contains(".staging-"), "{what}: {}", err.message());
    }

    // Nothing was written: tasks/ is as before (no task, no staging dir), nothing escaped the repository.
    assert_eq!(task_dir_listing(repo.path()), before);
    assert_eq!(top(repo.path()), top_before);
    assert!(!repo.path().parent().unwrap().join("evil.onnx").exists() && !Path::new("/tmp/evil.onnx").exists());
    // Nothing is served either, and the server is healthy and still serves its task.
    let mut c = inference(&server.addr).await;
    let tasks = c.list_tasks(ListTasksRequest {}).await.unwrap().into_inner().tasks;
    let registered = tasks.iter().map(|t| t.name.as_str()).filter(|n| !n.ends_with("/embedding")); // built-in tasks aside
    assert_eq!(registered.collect::<Vec<_>>(), vec!["sent"]);
    infer(&mut c, "sent", None).await.unwrap();
    // After all that, a good upload still works.
    register(&mut a, header("good", None, false, false), &source("sent")).await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_guard_the_admin_and_inference_services() {
    let repo = temp_repo(&["sent"]);
    let server = TestServer::start_on(
        repo.path(),
        &[("ADAPTERDROP__AUTH__ADMIN_TOKEN", "admin-s3cret"), ("ADAPTERDROP__AUTH__INFERENCE_TOKEN", "12345")],
    );
    let admin_addr = server.admin_addr();
    let mut a = admin(&admin_addr).await;
    let msgs = || messages(header("tok", None, false, false), &source("sent"), 1 << 20);

    for (token, what) in [(None, "missing"), (Some("wrong"), "wrong"), (Some("12345"), "inference token on admin")] {
        let err = register_msgs(&mut a, msgs(), token).await.expect_err(what);
        assert_eq!(err.code(), Code::Unauthenticated, "{what}");
        assert!(err.message().contains("admin"), "{what}: {}", err.message());
        let err = a.list_tasks(with_token(ListTasksRequest {}, token)).await.expect_err(what);
        assert_eq!(err.code(), Code::Unauthenticated, "{what}");
    }
    let err = a.list_tasks(ListTasksRequest {}).await.unwrap_err();
    assert!(err.message().contains("auth.admin_token") && err.message().contains("Bearer"), "{}", err.message());
    assert!(!repo.path().join("tasks/tok").exists());
    register_msgs(&mut a, msgs(), Some("admin-s3cret")).await.expect("right token");

    let mut c = inference(&server.addr).await;
    let req = || infer_req("tok", None, None, &["fine"]);
    for (token, what) in [(None, "missing"), (Some("1234"), "wrong"), (Some("admin-s3cret"), "admin token on inference")] {
        let err = c.infer(with_token(req(), token)).await.expect_err(what);
        assert_eq!(err.code(), Code::Unauthenticated, "{what}");
        assert!(err.message().contains("inference"), "{what}: {}", err.message());
    }
    c.infer(with_token(req(), Some("12345"))).await.expect("inference token (numeric, from the environment)");
    // Health answers without a token on both ports (Kubernetes probes).
    for addr in [server.addr.clone(), admin_addr] {
        let ch = tonic::transport::Channel::from_shared(format!("http://{addr}")).unwrap().connect().await.unwrap();
        let status = HealthClient::new(ch).check(HealthCheckRequest { service: "tok".into() }).await.unwrap().into_inner().status;
        assert_eq!(status, 1, "SERVING on {addr}");
    }
}
