//! Weights-only registration (issue 12, item 4): the admin API accepts a bare AdapterHub adapter
//! directory plus serving metadata, validates it (supported config, shapes against the backbone,
//! finite values, a trial run of the head), writes task.json itself and persists the version like
//! any other, so a restart serves it again. Every bad upload is refused with a status naming the
//! file and leaves the repository as it was.

mod admin_support;
mod common;

use std::path::Path;

use adapterdrop_serve::proto::{BundleHeader, GetTaskRequest, InferRequest, TaskStatus};
use adapterdrop_serve::proto::{TaskRef, Texts, infer_request::Inputs};
use adapterdrop_serve::repository::adapterhub::safetensors;
use admin_support::*;
use common::TestServer;
use tonic::Code;

/// A writable copy of the `sent` task's AdapterHub files (what `save_adapter` wrote).
fn adapter_dir() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&source("sent").join("adapterhub"), dir.path());
    dir
}

fn edit_json(path: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let mut v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).unwrap()).unwrap();
    edit(&mut v);
    std::fs::write(path, serde_json::to_vec(&v).unwrap()).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn adapterhub_directory_registers_persists_and_bad_ones_are_refused() {
    let repo = temp_repo(&["sent"]);
    let mut server = TestServer::start_on(repo.path(), &[("ADAPTERDROP__REPOSITORY__POLL_INTERVAL_S", "0")]);
    let mut a = admin(&server.admin_addr()).await;

    let dir = adapter_dir();
    let resp = register_msgs(&mut a, messages(weights_header("w", "bert-tiny", robust(1, 0, 2)), dir.path(), 1000), None).await.unwrap();
    assert_eq!(resp.files_received, 4);
    let info = resp.task.unwrap();
    assert_eq!((info.name.as_str(), info.version, info.status), ("w", 1, TaskStatus::Ready as i32));
    let sent = a.get_task(GetTaskRequest { name: "sent".into(), version: None }).await.unwrap().into_inner();
    assert_eq!(info.labels, sent.labels, "labels come from head_config.json");
    assert_eq!((info.head_type.as_str(), info.adapter_method.as_str()), ("classification", "seq_bn"));
    assert_eq!(info.drop, robust(1, 0, 2));
    // On disk: the files verbatim under adapterhub/, and a task.json the server wrote.
    let v = repo.path().join("tasks/w/1");
    for f in ["adapter_config.json", "adapter.safetensors", "head_config.json", "model_head.safetensors"] {
        assert_eq!(std::fs::read(v.join("adapterhub").join(f)).unwrap(), std::fs::read(dir.path().join(f)).unwrap(), "{f}");
    }
    let manifest: serde_json::Value = serde_json::from_slice(&std::fs::read(v.join("task.json")).unwrap()).unwrap();
    assert_eq!((manifest["name"].as_str(), manifest["adapterhub"].as_str()), (Some("w"), Some("adapterhub")));
    assert!(manifest["head"].get("graph").is_none() && manifest["slots"].as_array().unwrap().is_empty());

    // Served on the adapter banks: the same numbers as `sent`, the exported bundle of the same
    // adapter, at the same drop depth, in one batch (one lane each).
    let mut c = inference(&server.addr).await;
    let req = InferRequest {
        tasks: ["w", "sent"]
            .iter()
            .map(|t| TaskRef { name: t.to_string(), version: None, drop_first: Some(1), ..Default::default() })
            .collect(),
        inputs: Some(Inputs::Texts(Texts { texts: vec!["a fine film".into(), "a dull one".into()] })),
        ..Default::default()
    };
    let resp = c.infer(req).await.expect("a weights-only task is served").into_inner();
    for (w, s) in resp.results[0].sequences.iter().zip(&resp.results[1].sequences) {
        let d = w.logits.iter().zip(&s.logits).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
        assert!(d <= 1e-6, "weights-only vs exported bundle: {d:e}");
        assert_eq!(w.label, s.label);
    }

    // Bad uploads: nothing is written, the status names the file or field.
    let before = task_dir_listing(repo.path());
    type Edit = Box<dyn Fn(&Path)>;
    let none: Edit = Box::new(|_: &Path| {});
    let cases: Vec<(&str, BundleHeader, Edit, Code, &str)> = vec![
        ("unknown backbone", weights_header("x", "nope", robust(0, 0, 2)), Box::new(|_: &Path| {}), Code::FailedPrecondition, "`nope`"),
        ("no drop", weights_header("x", "bert-tiny", None), Box::new(|_: &Path| {}), Code::InvalidArgument, "drop is required"),
        (
            "drop too deep",
            weights_header("x", "bert-tiny", robust(0, 0, 9)),
            Box::new(|_: &Path| {}),
            Code::InvalidArgument,
            "robust range",
        ),
        (
            "missing file",
            weights_header("x", "bert-tiny", robust(0, 0, 2)),
            Box::new(|d: &Path| std::fs::remove_file(d.join("model_head.safetensors")).unwrap()),
            Code::InvalidArgument,
            "model_head.safetensors: missing",
        ),
        (
            "extra file",
            weights_header("x", "bert-tiny", robust(0, 0, 2)),
            Box::new(|d: &Path| std::fs::write(d.join("pytorch_adapter.bin"), b"x").unwrap()),
            Code::InvalidArgument,
            "pytorch_adapter.bin: not an AdapterHub adapter file",
        ),
        (
            "nan",
            weights_header("x", "bert-tiny", robust(0, 0, 2)),
            Box::new(|d: &Path| {
                let p = d.join("adapter.safetensors");
                let mut t = safetensors::parse(&std::fs::read(&p).unwrap()).unwrap();
                t.values_mut().last().unwrap().data[3] = f32::NAN;
                std::fs::write(&p, safetensors::serialize(&t)).unwrap();
            }),
            Code::InvalidArgument,
            "adapter.safetensors: ",
        ),
        (
            "unsupported",
            weights_header("x", "bert-tiny", robust(0, 0, 2)),
            Box::new(|d: &Path| edit_json(&d.join("adapter_config.json"), |v| v["config"]["non_linearity"] = "leakyrelu".into())),
            Code::InvalidArgument,
            "adapter_config.json: unsupported adapter: non_linearity",
        ),
        (
            "wrong backbone",
            weights_header("x", "tiny-random-absent", robust(0, 0, 2)),
            Box::new(|_: &Path| {}),
            Code::FailedPrecondition,
            "not loaded",
        ),
        (
            "left out but served",
            weights_header("x", "bert-tiny", robust(0, 0, 2)),
            Box::new(|d: &Path| {
                edit_json(&d.join("adapter_config.json"), |v| v["config"]["leave_out"] = serde_json::json!([0]));
                let p = d.join("adapter.safetensors");
                let mut t = safetensors::parse(&std::fs::read(&p).unwrap()).unwrap();
                t.retain(|k, _| !k.contains("layer.0."));
                std::fs::write(&p, safetensors::serialize(&t)).unwrap();
            }),
            Code::InvalidArgument,
            "layer 0 is not dropped",
        ),
        ("good control", weights_header("ok2", "bert-tiny", robust(1, 1, 2)), none, Code::Ok, ""),
    ];
    for (what, h, edit, code, want) in cases {
        let dir = adapter_dir();
        edit(dir.path());
        match register_msgs(&mut a, messages(h, dir.path(), 1 << 20), None).await {
            Ok(_) => assert_eq!(code, Code::Ok, "{what}: accepted"),
            Err(e) => {
                assert_eq!(e.code(), code, "{what}: {}", e.message());
                assert!(e.message().contains(want), "{what}: {}", e.message());
                assert_eq!(task_dir_listing(repo.path()), before, "{what}: the repository changed");
            }
        }
        assert!(staging_dirs(repo.path()).is_empty(), "{what}");
    }
    // A robust range starting at 1 may leave layer 0 out.
    let dir = adapter_dir();
    edit_json(&dir.path().join("adapter_config.json"), |v| v["config"]["leave_out"] = serde_json::json!([0]));
    let p = dir.path().join("adapter.safetensors");
    let mut t = safetensors::parse(&std::fs::read(&p).unwrap()).unwrap();
    t.retain(|k, _| !k.contains("layer.0."));
    std::fs::write(&p, safetensors::serialize(&t)).unwrap();
    register_msgs(&mut a, messages(weights_header("left", "bert-tiny", robust(1, 1, 2)), dir.path(), 1 << 20), None).await.unwrap();

    // A restart loads every weights-only version from disk.
    server.kill9();
    let server = TestServer::start_on(repo.path(), &[("ADAPTERDROP__REPOSITORY__POLL_INTERVAL_S", "0")]);
    let mut a = admin(&server.admin_addr()).await;
    for name in ["w", "ok2", "left"] {
        let info = a.get_task(GetTaskRequest { name: name.into(), version: None }).await.unwrap().into_inner();
        assert_eq!(info.status, TaskStatus::Ready as i32, "{name}: {}", info.status_reason);
    }
}
