//! Issue 14 item 4: `Stack(lang, task)` (MAD-X: a language adapter, with its invertible adapter at
//! the embeddings, under a task adapter) registered at run time weights-only and served on the
//! adapter banks exactly like the AdapterHub `adapters` library computes it, at every drop depth
//! (AdapterDrop on the stack; the invertible adapter is not a layer and stays on), beside other
//! tasks in one request, natively and over KServe, on all five backbones (on ELECTRA the invertible
//! adapter runs before `embeddings_project`). Expected values: the library's outputs in
//! `tests/fixtures/adapterhub-breadth/<b>/reference.json` (`tasks.stack`).

mod admin_support;
mod common;

use std::path::Path;

use adapterdrop_serve::proto::{BundleHeader, InferRequest, TaskRef, TaskStatus, TokenizedInputs, infer_request::Inputs};
use admin_support::{admin, messages, register_msgs, robust, weights_header};
use common::breadth::{BACKBONES, adapter_dir, assert_close, assert_kserve_fan_out, breadth_repo, reference, unpadded};
use common::{TestServer, copy_dir, infer_logits, metric_sum, scrape};

/// A private copy of the breadth repository's backbones (registration writes into it).
fn backbones_only() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for b in BACKBONES {
        copy_dir(&breadth_repo().join("backbones").join(b), &dir.path().join("backbones").join(b));
    }
    std::fs::create_dir_all(dir.path().join("tasks")).unwrap();
    dir
}

/// The upload of `Stack(lang, stack)` on backbone `b`: the task adapter's four files and the
/// language adapter's two under `stack/` (what `tools/register_task.py --weights-only --stack` sends).
fn stack_upload(b: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    copy_dir(&adapter_dir(b, "stack"), dir.path());
    copy_dir(&adapter_dir(b, "lang"), &dir.path().join("stack"));
    dir
}

fn stack_header(name: &str, b: &str, composition: &str, layers: u32) -> BundleHeader {
    let mut h = weights_header(name, b, robust(0, 0, layers));
    h.adapterhub.as_mut().unwrap().composition = composition.into();
    h
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registered_stack_matches_the_library_at_every_drop_depth() {
    let repo = backbones_only();
    let server = TestServer::start_on(repo.path(), &[]);
    let mut a = admin(&server.admin_addr()).await;
    let mut worst = 0.0f64;
    for b in BACKBONES {
        let fx = reference(b);
        let layers = fx["num_layers"].as_u64().unwrap() as u32;
        let name = format!("{b}-stack");
        let up = stack_upload(b);
        let resp = register_msgs(&mut a, messages(stack_header(&name, b, "Stack(lang, stack)", layers), up.path(), 1 << 20), None)
            .await
            .unwrap_or_else(|s| panic!("register {name}: {s}"));
        let info = resp.task.unwrap();
        assert_eq!(info.status, TaskStatus::Ready as i32, "{}", info.status_reason);
        let spec = &fx["tasks"]["stack"];
        let ids = unpadded(&fx["inputs"][spec["inputs"].as_str().unwrap()]);
        let mut depths = Vec::new();
        for n in 0..=layers {
            let got = infer_logits(&server, &name, n, Inputs::Tokens(TokenizedInputs { sequences: ids.clone() })).await;
            let diff = assert_close(&format!("{name} n={n}"), &got, &spec["outputs"][n.to_string()]["logits"]);
            depths.push(format!("n={n}: {diff:.1e}"));
            worst = worst.max(diff);
        }
        eprintln!("stack exactness {name}: max abs diff vs the library {}", depths.join(", "));
    }
    for b in ["bert", "electra"] {
        let name = format!("{b}-pfeiffer");
        let pf = messages(weights_header(&name, b, robust(0, 0, 3)), &adapter_dir(b, "pfeiffer"), 1 << 20);
        register_msgs(&mut a, pf, None).await.unwrap_or_else(|s| panic!("register {name}: {s}"));
        mixed_request_matches_the_library(&server, b).await;
        kserve_matches_the_library(&server, b).await;
    }
    eprintln!("stack exactness: worst max abs diff {worst:e} over 5 backbones x every drop depth");
}

/// One request: the stack at two depths beside a plain Pfeiffer task on the same inputs (rows split
/// before layer 0, where only the stack's rows take the invertible adapter; on ELECTRA before
/// `embeddings_project`, which then runs for every row), each = the library.
async fn mixed_request_matches_the_library(server: &TestServer, b: &str) {
    let fx = reference(b);
    let (stack, pfeiffer) = (format!("{b}-stack"), format!("{b}-pfeiffer"));
    let refs = [(&stack, "stack", 2), (&pfeiffer, "pfeiffer", 0), (&stack, "stack", 0), (&pfeiffer, "pfeiffer", 3)];
    let req = InferRequest {
        tasks: refs.iter().map(|(t, _, n)| TaskRef { name: t.to_string(), drop_first: Some(*n), ..Default::default() }).collect(),
        inputs: Some(Inputs::Tokens(TokenizedInputs { sequences: unpadded(&fx["inputs"]["texts"]) })),
        ..Default::default()
    };
    let layers = fx["num_layers"].as_f64().unwrap();
    let runs = graph_runs(server);
    let resp = server.client().await.infer(req).await.expect("mixed request").into_inner();
    for ((task, fixture, n), result) in refs.iter().zip(&resp.results) {
        let got: Vec<Vec<f32>> = result.sequences.iter().map(|s| s.logits.clone()).collect();
        assert_close(&format!("mixed {task} n={n}"), &got, &fx["tasks"][*fixture]["outputs"][n.to_string()]["logits"]);
    }
    // Embeddings + one run per layer (heads on the host); ELECTRA's `embeddings_project` once more,
    // only in a batch with an invertible adapter.
    let project = if b == "electra" { 1.0 } else { 0.0 };
    assert_eq!(graph_runs(server) - runs, 1.0 + layers + project, "{b}: session runs of the mixed request");
    let runs = graph_runs(server);
    let got = infer_logits(server, &pfeiffer, 1, Inputs::Tokens(TokenizedInputs { sequences: unpadded(&fx["inputs"]["texts"]) })).await;
    assert_close(&format!("{pfeiffer} n=1"), &got, &fx["tasks"]["pfeiffer"]["outputs"]["1"]["logits"]);
    assert_eq!(graph_runs(server) - runs, 1.0 + layers, "{b}: a batch without a Stack runs no extra graph");
}

fn graph_runs(server: &TestServer) -> f64 {
    metric_sum(&scrape(&server.metrics_addr), "adapterdrop_graph_runs_total", "")
}

/// KServe v2 as a Triton client sends it: text in, the stack and the Pfeiffer task fanned out.
async fn kserve_matches_the_library(server: &TestServer, b: &str) {
    let (stack, pfeiffer) = (format!("{b}-stack"), format!("{b}-pfeiffer"));
    let also = format!("{pfeiffer}/logits");
    assert_kserve_fan_out(server, &reference(b), &stack, &pfeiffer, &[("logits", "stack"), (also.as_str(), "pfeiffer")]).await;
}

/// Compositions the banks do not serve, and uploads that do not say what they are, are refused
/// with INVALID_ARGUMENT naming what to change; nothing is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsupported_compositions_are_refused_by_name() {
    let repo = backbones_only();
    let server = TestServer::start_on(repo.path(), &[]);
    let mut a = admin(&server.admin_addr()).await;
    let stacked = stack_upload("bert");
    let plain = adapter_dir("bert", "pfeiffer");
    let long = format!("Stack({}, stack)", "x".repeat(300));
    let cases: [(&str, &Path, &str); 10] = [
        (long.as_str(), stacked.path(), "header.adapterhub.composition is 314 bytes; at most 256"),
        ("Fuse(lang, stack)", stacked.path(), "Fuse is not supported"),
        ("Split(lang, stack, splits=[4])", stacked.path(), "Split is not supported"),
        ("BatchSplit(lang, stack, batch_sizes=[1, 1])", stacked.path(), "BatchSplit is not supported"),
        ("Parallel(lang, stack)", stacked.path(), "Parallel is not supported"),
        ("Stack(Fuse(lang, x), stack)", stacked.path(), "Fuse inside Stack is not supported"),
        ("Stack(a, lang, stack)", stacked.path(), "Stack of 3 adapters is not supported"),
        ("Stack(other, stack)", stacked.path(), "names Stack(other, stack) but the uploaded adapters are 'lang' (stack/) and 'stack'"),
        ("", stacked.path(), "composition is empty"),
        ("Stack(lang, pfeiffer)", plain.as_path(), "under stack/"),
    ];
    for (composition, dir, want) in cases {
        let s = register_msgs(&mut a, messages(stack_header("bad", "bert", composition, 3), dir, 1 << 20), None)
            .await
            .expect_err("must be refused");
        assert_eq!(s.code(), tonic::Code::InvalidArgument, "{composition}: {}", s.message());
        assert!(s.message().contains(want), "{composition}: want {want:?} in {}", s.message());
    }
    assert!(!repo.path().join("tasks/bad").exists(), "nothing written");
}
