//! Exported bundles carry their AdapterHub files (`task.json` key `adapterhub`); the server parses
//! them at load and registration and refuses a bundle whose AdapterHub files are broken or say
//! something else than its graphs, with INVALID_ARGUMENT naming the file.

mod admin_support;
mod common;

use std::path::Path;

use adapterdrop_serve::repository::adapterhub::safetensors;
use adapterdrop_serve::repository::{Bundle, Location, RegisterOptions};
use admin_support::*;
use tonic::Code;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bundles_load_their_adapterhub_weights_and_bad_ones_are_refused() {
    let repo = temp_repo(&["sent", "topic"]);
    let (app, registrar) = in_process_app(repo.path());

    // Loaded at start-up: the weights are there, for the task's slots, with its labels.
    let sent = app.registry.resolve("sent", None).unwrap();
    let w = sent.adapterhub.as_ref().expect("sent carries its AdapterHub files");
    assert_eq!(w.head.labels, sent.manifest.head.labels);
    // The bottleneck weights went into the backbone's banks (held once, not also in the task).
    assert!(w.slots.is_empty());
    let rows = sent.bank.as_ref().expect("the backbone has layer graphs: a bank task").rows.id();
    {
        let store = sent.backbone.banked.as_ref().unwrap().banks.store();
        for &(layer, location) in sent.slots.keys() {
            assert!(store.index(rows, layer, location) > 0, "layer {layer} {location:?} has a bank row");
        }
    }
    assert!(sent.slots.contains_key(&(0, Location::Ffn)));

    type Edit = Box<dyn Fn(&Path)>;
    let cases: Vec<(&str, Edit, &str)> = vec![
        (
            "labels differ",
            Box::new(|d: &Path| edit_json(&d.join("task.json"), |v| v["head"]["labels"] = serde_json::json!(["x", "y"]))),
            "task.json: head classification",
        ),
        (
            "weights not finite",
            Box::new(|d: &Path| {
                let p = d.join("adapterhub/adapter.safetensors");
                let mut t = safetensors::parse(&std::fs::read(&p).unwrap()).unwrap();
                t.values_mut().next().unwrap().data[0] = f32::INFINITY;
                std::fs::write(&p, safetensors::serialize(&t)).unwrap();
            }),
            "adapterhub/adapter.safetensors: ",
        ),
        (
            "unsupported config",
            Box::new(|d: &Path| edit_json(&d.join("adapterhub/adapter_config.json"), |v| v["config"]["use_gating"] = true.into())),
            "adapterhub/adapter_config.json: unsupported adapter: use_gating",
        ),
        (
            "weights missing",
            Box::new(|d: &Path| edit_json(&d.join("adapterhub/adapter_config.json"), |v| v["config"]["mh_adapter"] = true.into())),
            "adapterhub/adapter.safetensors: key",
        ),
        (
            "slots differ",
            Box::new(|d: &Path| {
                edit_json(&d.join("adapterhub/adapter_config.json"), |v| v["config"]["leave_out"] = serde_json::json!([1]));
                let p = d.join("adapterhub/adapter.safetensors");
                let mut t = safetensors::parse(&std::fs::read(&p).unwrap()).unwrap();
                t.retain(|k, _| !k.contains("layer.1."));
                std::fs::write(&p, safetensors::serialize(&t)).unwrap();
            }),
            "task.json: the slots [\"0:ffn\", \"1:ffn\"] differ from those of the AdapterHub adapter",
        ),
        (
            "file missing",
            Box::new(|d: &Path| std::fs::remove_file(d.join("adapterhub/head_config.json")).unwrap()),
            "adapterhub/head_config.json",
        ),
        (
            "unnamed file",
            Box::new(|d: &Path| std::fs::write(d.join("adapterhub/pytorch_adapter.bin"), b"x").unwrap()),
            "adapterhub/pytorch_adapter.bin: not referenced",
        ),
        (
            "escape",
            Box::new(|d: &Path| {
                std::fs::remove_dir_all(d.join("adapterhub")).unwrap();
                edit_json(&d.join("task.json"), |v| v["adapterhub"] = "../x".into())
            }),
            "inside the task directory",
        ),
    ];
    for (what, edit, want) in cases {
        let bundle = Bundle::copy_of(&registrar.tasks_root(), &source("sent")).unwrap();
        edit(bundle.dir());
        let err = registrar.register("bad", bundle, RegisterOptions::default()).await.expect_err(what);
        assert_eq!(err.code(), Code::InvalidArgument, "{what}: {err}");
        assert!(err.to_string().contains(want), "{what}: {err}");
        assert!(app.registry.resolve("bad", None).is_err());
    }
    assert!(staging_dirs(repo.path()).is_empty());

    // A good bundle registers with its weights, and a bundle without the key still works.
    let bundle = Bundle::copy_of(&registrar.tasks_root(), &source("topic")).unwrap();
    let done = registrar.register("good", bundle, RegisterOptions::default()).await.unwrap();
    assert!(done.entry.task.unwrap().adapterhub.is_some());
    let bundle = Bundle::copy_of(&registrar.tasks_root(), &source("topic")).unwrap();
    std::fs::remove_dir_all(bundle.dir().join("adapterhub")).unwrap();
    edit_json(&bundle.dir().join("task.json"), |v| drop(v.as_object_mut().unwrap().remove("adapterhub")));
    let done = registrar.register("graphs-only", bundle, RegisterOptions::default()).await.unwrap();
    assert!(done.entry.task.unwrap().adapterhub.is_none());
}
