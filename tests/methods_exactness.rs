//! Issue 14 item 3: adapter methods beyond sequential bottlenecks, registered at run time
//! (weights-only: the library's own AdapterHub directories) and served on the adapter banks exactly
//! like the AdapterHub `adapters` library computes them, at every drop depth, on every backbone.
//! Expected values: the library's outputs in `tests/fixtures/adapterhub-breadth/<b>/reference.json`.

mod admin_support;
mod common;

use adapterdrop_serve::proto::{GetTaskRequest, TaskStatus, TokenizedInputs, infer_request::Inputs};
use admin_support::{admin, messages, register_msgs, robust, weights_header};
use common::breadth::{BACKBONES, adapter_dir, assert_close, assert_kserve_fan_out, breadth_repo, reference, unpadded};
use common::{TestServer, copy_dir, infer_logits};

/// Fixture task -> the method name the server reports for it.
const METHODS: [(&str, &str); 3] = [("par_bn", "par_bn"), ("lora", "lora"), ("ia3", "ia3")];

/// A private copy of the breadth repository's backbones (registration writes into it).
fn backbones_only() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for b in BACKBONES {
        copy_dir(&breadth_repo().join("backbones").join(b), &dir.path().join("backbones").join(b));
    }
    std::fs::create_dir_all(dir.path().join("tasks")).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_methods_match_the_library_at_every_drop_depth() {
    let repo = backbones_only();
    let server = TestServer::start_on(repo.path(), &[]);
    let mut a = admin(&server.admin_addr()).await;
    let mut worst = 0.0f64;
    for b in BACKBONES {
        let fx = reference(b);
        let layers = fx["num_layers"].as_u64().unwrap() as u32;
        for (fixture, method) in METHODS {
            let name = format!("{b}-{}", fixture.replace('_', "-"));
            let h = weights_header(&name, b, robust(0, 0, layers));
            let resp = register_msgs(&mut a, messages(h, &adapter_dir(b, fixture), 1 << 20), None)
                .await
                .unwrap_or_else(|s| panic!("register {name}: {s}"));
            let info = resp.task.unwrap();
            assert_eq!((info.status, info.adapter_method.as_str()), (TaskStatus::Ready as i32, method), "{}", info.status_reason);
            let spec = &fx["tasks"][fixture];
            let ids = unpadded(&fx["inputs"][spec["inputs"].as_str().unwrap()]);
            for n in 0..=layers {
                let got = infer_logits(&server, &name, n, Inputs::Tokens(TokenizedInputs { sequences: ids.clone() })).await;
                worst = worst.max(assert_close(&format!("{name} n={n}"), &got, &spec["outputs"][n.to_string()]["logits"]));
            }
        }
    }
    kserve_fan_out_matches_the_library(&server).await;
    mixed_batch_matches_the_library(&server).await;
    // Persisted like any version: served the same after a restart.
    drop(server);
    let server = TestServer::start_on(repo.path(), &[]);
    let mut c = server.client().await;
    let t = c.get_task(GetTaskRequest { name: "bert-par-bn".into(), version: None }).await.unwrap().into_inner();
    assert_eq!(t.status, TaskStatus::Ready as i32, "{}", t.status_reason);
    let fx = reference("bert");
    let got =
        infer_logits(&server, "bert-par-bn", 2, Inputs::Tokens(TokenizedInputs { sequences: unpadded(&fx["inputs"]["texts"]) })).await;
    assert_close("bert-par-bn after restart n=2", &got, &fx["tasks"]["par_bn"]["outputs"]["2"]["logits"]);
    eprintln!("methods exactness: worst max abs diff {worst:e} over 5 backbones x {} methods x every drop depth", METHODS.len());
}

/// KServe v2, as a Triton client sends it: text in, the three methods in one request (`tasks`
/// fan-out over the same inputs, one pass), each output named `<task>/logits`, = the library.
async fn kserve_fan_out_matches_the_library(server: &TestServer) {
    assert_kserve_fan_out(
        server,
        &reference("bert"),
        "bert-lora",
        "bert-ia3,bert-par-bn",
        &[("logits", "lora"), ("bert-ia3/logits", "ia3"), ("bert-par-bn/logits", "par_bn")],
    )
    .await;
}

/// What the banks cannot serve is refused at registration with the config key and value to change,
/// and nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_methods_are_refused_naming_the_config_key() {
    use admin_support::edit_json;
    let repo = backbones_only();
    let server = TestServer::start_on(repo.path(), &[]);
    let mut a = admin(&server.admin_addr()).await;
    type Edit = fn(&mut serde_json::Value);
    let cases: [(&str, Edit, &str); 6] = [
        ("lora", |v| v["config"]["architecture"] = "prefix_tuning".into(), "architecture=\"prefix_tuning\" is not supported"),
        ("lora", |v| v["config"]["composition_mode"] = "gate".into(), "composition_mode='gate' is not supported"),
        ("lora", |v| v["config"]["use_dora"] = true.into(), "use_dora=true is not supported"),
        ("lora", |v| v["config"]["attn_matrices"] = serde_json::json!(["q", "o"]), "attn_matrices entry \"o\" is not supported"),
        ("lora", |v| v["config"]["r"] = 1e9.into(), "r=1000000000 must be a whole number from 1 to 4096"),
        ("lang", |v| v["config"]["use_gating"] = false.into(), "inv_adapter=\"nice\" is not supported"),
    ];
    for (fixture, edit, want) in cases {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&adapter_dir("bert", fixture), dir.path());
        if fixture == "lang" {
            copy_dir(&adapter_dir("bert", "stack"), &dir.path().join("head"));
            for f in ["head_config.json", "model_head.safetensors"] {
                std::fs::rename(dir.path().join("head").join(f), dir.path().join(f)).unwrap();
            }
            std::fs::remove_dir_all(dir.path().join("head")).unwrap();
        }
        edit_json(&dir.path().join("adapter_config.json"), edit);
        let s = register_msgs(&mut a, messages(weights_header("bad", "bert", robust(0, 0, 3)), dir.path(), 1 << 20), None)
            .await
            .expect_err("must be refused");
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{want}: {}", s.message());
        assert!(s.message().contains("adapter_config.json") && s.message().contains(want), "{want}: {}", s.message());
    }
    assert!(!repo.path().join("tasks/bad").exists(), "nothing written");
}

/// One request mixing the methods at different drop depths (rows split before the embeddings'
/// output enters layer 0 and at the FFN slot before a layer whose LoRA / (IA)^3 rows differ): each
/// task's answer is still the library's at its own depth.
async fn mixed_batch_matches_the_library(server: &TestServer) {
    use adapterdrop_serve::proto::{InferRequest, TaskRef};
    let fx = reference("bert");
    let refs = [("bert-lora", "lora", 1), ("bert-ia3", "ia3", 2), ("bert-par-bn", "par_bn", 0), ("bert-lora", "lora", 0)];
    let req = InferRequest {
        tasks: refs
            .iter()
            .map(|(t, _, n)| TaskRef { name: t.to_string(), version: None, drop_first: Some(*n), ..Default::default() })
            .collect(),
        inputs: Some(Inputs::Tokens(TokenizedInputs { sequences: unpadded(&fx["inputs"]["texts"]) })),
        ..Default::default()
    };
    let resp = server.client().await.infer(req).await.expect("mixed request").into_inner();
    for ((task, fixture, n), result) in refs.iter().zip(&resp.results) {
        let got: Vec<Vec<f32>> = result.sequences.iter().map(|s| s.logits.clone()).collect();
        assert_close(&format!("mixed {task} n={n}"), &got, &fx["tasks"][*fixture]["outputs"][n.to_string()]["logits"]);
    }
}
